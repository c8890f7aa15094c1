//! Loads and stores of packet fields in 16-bit units.
//!
//! Every IP, TCP and UDP field the program touches sits at an even offset from the frame start, and
//! XDP frames start at least 2-byte aligned, so 16-bit accesses are always aligned. Reading a field
//! through network-types' byte arrays would compile to single-byte loads (the BPF backend assumes
//! nothing about their alignment), which costs instructions and stack on the hot path.

use xdp_lb_common::addr::Addr;

#[cfg(target_endian = "big")]
compile_error!("wire.rs composes 32-bit words from 16-bit halves in little-endian order");

/// # Safety
/// `p` must be 2-byte aligned and point at 2 readable bytes.
#[inline(always)]
pub unsafe fn load16(p: *const u8) -> u16 {
    unsafe { (p as *const u16).read() }
}

/// # Safety
/// `p` must be 2-byte aligned and point at 2 writable bytes.
#[inline(always)]
pub unsafe fn store16(p: *mut u8, value: u16) {
    unsafe { (p as *mut u16).write(value) }
}

/// Four bytes as one word in memory order (what a 32-bit load would give on this little-endian CPU).
///
/// # Safety
/// `p` must be 2-byte aligned and point at 4 readable bytes.
#[inline(always)]
pub unsafe fn load32(p: *const u8) -> u32 {
    unsafe { load16(p) as u32 | (load16(p.add(2)) as u32) << 16 }
}

/// # Safety
/// `p` must be 2-byte aligned and point at 4 writable bytes.
#[inline(always)]
pub unsafe fn store32(p: *mut u8, value: u32) {
    unsafe {
        store16(p, value as u16);
        store16(p.add(2), (value >> 16) as u16);
    }
}

/// # Safety
/// `p` must be 2-byte aligned and point at 16 readable bytes.
#[inline(always)]
pub unsafe fn load_addr(p: *const u8) -> Addr {
    unsafe { [load32(p), load32(p.add(4)), load32(p.add(8)), load32(p.add(12))] }
}

/// # Safety
/// `p` must be 2-byte aligned and point at 16 writable bytes.
#[inline(always)]
pub unsafe fn store_addr(p: *mut u8, addr: &Addr) {
    unsafe {
        store32(p, addr[0]);
        store32(p.add(4), addr[1]);
        store32(p.add(8), addr[2]);
        store32(p.add(12), addr[3]);
    }
}
