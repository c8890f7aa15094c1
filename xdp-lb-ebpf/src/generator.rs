//! The benchmarks' traffic generator (`cargo xtask bench`, `pps` section). Never attached.
//!
//! The bench runs it with `BPF_PROG_TEST_RUN` and `BPF_F_TEST_XDP_LIVE_FRAMES` on a template frame
//! (Ethernet + IPv4 without options + TCP, built by the bench). Every run's XDP_TX is really sent out
//! of the interface named by `ingress_ifindex` as an xdp_frame: no socket buffer, no qdisc, several
//! Mpps per core, where trafgen (one skb per frame) reached 0.1–0.3 Mpps into a veth.
//!
//! The kernel recycles a frame's page once its receiver is done with it, without restoring the
//! template, and a receiver may have rewritten it (xdp-lb nat translates the addresses in place, the
//! reference swaps the MACs): every run therefore writes the whole header from `GEN_TEMPLATE`, then
//! the field it varies, with checksums adjusted incrementally from the template's.
//!
//! Configuration comes in read-only globals the loader sets (`EbpfLoader::override_global`, which
//! fails on a name that is not here): the verifier sees them as constants.

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
/// The frame's first `HEADER_LEN` bytes (Ethernet, IPv4 without options, TCP), as 16-bit words in
/// memory order: the bytes of the wire, checksums valid.
#[unsafe(no_mangle)]
static GEN_TEMPLATE: [u16; HEADER_WORDS] = [1; HEADER_WORDS];

/// Runs so far on this CPU: the sequence number of the next frame.
#[map]
static GEN_COUNTER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

// Offsets in the template: Ethernet, IPv4 (IHL 5), TCP.
const IP: usize = 14;
const IP_CHECK: usize = IP + 10;
const IP_SRC: usize = IP + 12;
const TCP: usize = IP + 20;
const TCP_CHECK: usize = TCP + 16;
const HEADER_LEN: usize = TCP + 20;
const HEADER_WORDS: usize = HEADER_LEN / 2;

#[xdp]
pub fn xdp_generator(ctx: XdpContext) -> u32 {
    match generate(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        // A frame shorter than the header: nothing is sent, and the bench's accounting (frames
        // offered vs taken by the receiver) shows it.
        None => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn read_global(value: &u32) -> u32 {
    // SAFETY: a valid reference; volatile so the compiler keeps the load the loader's value lands in.
    unsafe { core::ptr::read_volatile(value) }
}

/// The template's word at byte `offset` (even).
#[inline(always)]
fn template(offset: usize) -> u16 {
    // SAFETY: a valid reference to an element of the global; volatile so the compiler reads the
    // value the loader wrote instead of folding in the placeholder.
    unsafe { core::ptr::read_volatile(&GEN_TEMPLATE[offset / 2]) }
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Option<()> {
    let data = ctx.data();
    if data + HEADER_LEN > ctx.data_end() {
        return None;
    }
    let at = |offset: usize| (data + offset) as *mut u16;
    // SAFETY: every store below lies inside the HEADER_LEN bytes checked above, at even offsets of
    // packet memory, which XDP programs may write.
    unsafe {
        for word in 0..HEADER_WORDS {
            *at(word * 2) = template(word * 2);
        }
        let counter = GEN_COUNTER.get_ptr_mut(0)?;
        let n = *counter;
        *counter = n + 1;
        if read_global(&GEN_MODE) == MODE_NEW {
            let addr = read_global(&GEN_FIRST_ADDR).wrapping_add(n as u32);
            let (hi, lo) = (((addr >> 16) as u16).to_be(), (addr as u16).to_be());
            *at(IP_SRC) = hi;
            *at(IP_SRC + 2) = lo;
            // The address is in the IPv4 header and in TCP's pseudo-header.
            for check in [IP_CHECK, TCP_CHECK] {
                let c = checksum::update_u16(template(check), template(IP_SRC), hi);
                *at(check) = checksum::update_u16(c, template(IP_SRC + 2), lo);
            }
        } else {
            let flows = read_global(&GEN_FLOWS).max(1) as u64;
            let port = ((read_global(&GEN_FIRST_PORT) as u64 + n % flows) as u16).to_be();
            *at(TCP) = port;
            *at(TCP_CHECK) = checksum::update_u16(template(TCP_CHECK), template(TCP), port);
        }
    }
    Some(())
}
