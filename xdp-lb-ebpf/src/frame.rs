//! [`Frame`] over XDP packet memory: the shared parser and rewriter (`xdp_lb_common::packet`) run on
//! the frame in place. A window is the address its bounds check proved; the verifier sees each
//! access guarded by that check.

use aya_ebpf::programs::XdpContext;
use xdp_lb_common::packet::Frame;

pub struct XdpFrame<'a> {
    ctx: &'a XdpContext,
}

impl<'a> XdpFrame<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a XdpContext) -> Self {
        Self { ctx }
    }
}

impl Frame for XdpFrame<'_> {
    type Window = usize;

    #[inline(always)]
    fn len(&self) -> usize {
        self.ctx.data_end() - self.ctx.data()
    }

    #[inline(always)]
    fn window(&self, offset: usize, len: usize) -> Option<usize> {
        let start = self.ctx.data() + offset;
        if start + len > self.ctx.data_end() {
            return None;
        }
        Some(start)
    }

    #[inline(always)]
    unsafe fn load8(&self, window: usize, at: usize) -> u8 {
        // SAFETY: the caller keeps `at` inside the checked window.
        unsafe { ((window + at) as *const u8).read() }
    }

    #[inline(always)]
    unsafe fn load16(&self, window: usize, at: usize) -> u16 {
        // SAFETY: inside the checked window and 2-byte aligned (the caller's contract).
        unsafe { ((window + at) as *const u16).read() }
    }

    #[inline(always)]
    unsafe fn store16(&mut self, window: usize, at: usize, value: u16) {
        // SAFETY: as for load16; XDP packet memory is writable.
        unsafe { ((window + at) as *mut u16).write(value) }
    }
}
