//! The benchmarks' traffic generator (`cargo xtask bench`, `pps` section). Never attached.
//!
//! The bench runs it with `BPF_PROG_TEST_RUN` and `BPF_F_TEST_XDP_LIVE_FRAMES` on a template frame
//! (Ethernet + IPv4 without options + TCP, built by the bench). Every run's XDP_TX is really sent out
//! of the interface named by `ingress_ifindex` as an xdp_frame: no socket buffer, no qdisc, several
//! Mpps per core, where trafgen (one skb per frame) reached 0.1–0.3 Mpps into a veth.
//!
//! The kernel recycles the frames' pages without restoring the template, so a run sees whatever the
//! last run on that page left: each run writes every field it varies and adjusts the checksums
//! incrementally from the values it finds, which is right for a fresh page and a recycled one alike.
//!
//! Configuration comes in read-only globals the loader sets (`EbpfLoader::set_global`, which fails
//! on a name that is not here): the verifier sees them as constants.

use aya_ebpf::{bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext};
use xdp_lb_common::checksum;

/// 0: established, the TCP source port cycles over `GEN_FLOWS` ports from `GEN_FIRST_PORT`;
/// 1: new, the IPv4 source address is `GEN_FIRST_ADDR` + the run's number (a new flow every packet).
#[unsafe(no_mangle)]
static GEN_MODE: u32 = 0;
const MODE_NEW: u32 = 1;
#[unsafe(no_mangle)]
static GEN_FLOWS: u32 = 1024;
#[unsafe(no_mangle)]
static GEN_FIRST_PORT: u32 = 10_000;
/// Host byte order.
#[unsafe(no_mangle)]
static GEN_FIRST_ADDR: u32 = 0x0a80_0000;

/// Runs so far on this CPU: the sequence number of the next frame.
#[map]
static GEN_COUNTER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

// The template's layout: Ethernet, IPv4 (IHL 5), TCP.
const ETH_TYPE: usize = 12;
const IP: usize = 14;
const IP_CHECK: usize = IP + 10;
const IP_SRC: usize = IP + 12;
const TCP: usize = IP + 20;
const TCP_CHECK: usize = TCP + 16;
const MIN_LEN: usize = TCP + 20;

#[xdp]
pub fn xdp_generator(ctx: XdpContext) -> u32 {
    match generate(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        // Not the template this program is written for: nothing is sent, and the bench's check
        // (frames sent vs runs) reports it.
        None => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn read_global(value: &u32) -> u32 {
    // SAFETY: a valid reference; volatile so the compiler keeps the load the loader's value lands in.
    unsafe { core::ptr::read_volatile(value) }
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Option<()> {
    let data = ctx.data();
    if data + MIN_LEN > ctx.data_end() {
        return None;
    }
    let at = |offset: usize| (data + offset) as *mut u16;
    // SAFETY: every access below lies inside the MIN_LEN bytes checked above, at even offsets of
    // packet memory (2-byte aligned), which XDP programs may write.
    unsafe {
        // 0x0800 (IPv4), version 4 with IHL 5, protocol 6 (TCP): as loaded from packet memory.
        if *at(ETH_TYPE) != 0x0800u16.to_be() || *(at(IP) as *const u8) != 0x45 || *((data + IP + 9) as *const u8) != 6 {
            return None;
        }
        let counter = GEN_COUNTER.get_ptr_mut(0)?;
        let n = *counter;
        *counter = n + 1;
        if read_global(&GEN_MODE) == MODE_NEW {
            let addr = read_global(&GEN_FIRST_ADDR).wrapping_add(n as u32);
            let (old_hi, old_lo) = (*at(IP_SRC), *at(IP_SRC + 2));
            let (hi, lo) = (((addr >> 16) as u16).to_be(), (addr as u16).to_be());
            *at(IP_SRC) = hi;
            *at(IP_SRC + 2) = lo;
            // The address is in the IPv4 header and in TCP's pseudo-header.
            for check in [IP_CHECK, TCP_CHECK] {
                let c = checksum::update_u16(*at(check), old_hi, hi);
                *at(check) = checksum::update_u16(c, old_lo, lo);
            }
        } else {
            let flows = read_global(&GEN_FLOWS).max(1) as u64;
            let port = ((read_global(&GEN_FIRST_PORT) as u64 + n % flows) as u16).to_be();
            let old = *at(TCP);
            *at(TCP) = port;
            *at(TCP_CHECK) = checksum::update_u16(*at(TCP_CHECK), old, port);
        }
    }
    Some(())
}
