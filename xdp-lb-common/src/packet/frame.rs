//! Access to a frame's bytes in bounds-checked windows.
//!
//! The XDP verifier accepts a packet access only after a comparison against the frame's end that
//! covers it, so every access goes through a window: [`Frame::window`] checks `len` bytes at an
//! offset once, and the loads and stores inside it are unchecked. Fields are accessed in 16-bit
//! units: every IP, TCP and UDP field the data plane touches sits at an even offset, and frames start
//! 2-byte aligned, so the loads are aligned (byte-array fields would compile to single-byte loads).

use crate::addr::Addr;

#[cfg(target_endian = "big")]
compile_error!("Frame composes 32-bit words from 16-bit halves in little-endian order");

/// A frame whose bytes can be read and written through bounds-checked windows.
// A frame is never empty (it holds at least an Ethernet header when parsed), so no `is_empty`.
#[allow(clippy::len_without_is_empty)]
pub trait Frame {
    /// Where a checked run of bytes starts.
    type Window: Copy;

    /// Frame length in bytes.
    fn len(&self) -> usize;

    /// The `len` bytes at `offset`, if they lie inside the frame.
    fn window(&self, offset: usize, len: usize) -> Option<Self::Window>;

    /// The byte at `at` in `window`.
    ///
    /// # Safety
    /// `at + 1` must not exceed the length the window was checked for.
    unsafe fn load8(&self, window: Self::Window, at: usize) -> u8;

    /// Two bytes at `at` in `window`, as one native-order load from memory would give them.
    ///
    /// # Safety
    /// `at + 2` must not exceed the window's length, and the bytes must be 2-byte aligned in the frame.
    unsafe fn load16(&self, window: Self::Window, at: usize) -> u16;

    /// # Safety
    /// As for [`Frame::load16`].
    unsafe fn store16(&mut self, window: Self::Window, at: usize, value: u16);

    /// Four bytes as one word in memory order (what a 32-bit load would give on this little-endian CPU).
    ///
    /// # Safety
    /// As for [`Frame::load16`], for 4 bytes.
    #[inline(always)]
    unsafe fn load32(&self, window: Self::Window, at: usize) -> u32 {
        unsafe { self.load16(window, at) as u32 | (self.load16(window, at + 2) as u32) << 16 }
    }

    /// # Safety
    /// As for [`Frame::load32`].
    #[inline(always)]
    unsafe fn store32(&mut self, window: Self::Window, at: usize, value: u32) {
        unsafe {
            self.store16(window, at, value as u16);
            self.store16(window, at + 2, (value >> 16) as u16);
        }
    }

    /// # Safety
    /// As for [`Frame::load16`], for 16 bytes.
    #[inline(always)]
    unsafe fn load_addr(&self, window: Self::Window, at: usize) -> Addr {
        unsafe {
            [
                self.load32(window, at),
                self.load32(window, at + 4),
                self.load32(window, at + 8),
                self.load32(window, at + 12),
            ]
        }
    }

    /// # Safety
    /// As for [`Frame::load_addr`].
    #[inline(always)]
    unsafe fn store_addr(&mut self, window: Self::Window, at: usize, addr: &Addr) {
        unsafe {
            self.store32(window, at, addr[0]);
            self.store32(window, at + 4, addr[1]);
            self.store32(window, at + 8, addr[2]);
            self.store32(window, at + 12, addr[3]);
        }
    }
}

/// A frame held in a byte slice. Every access is checked against its window and its alignment, so a
/// parser bug that the verifier would reject in the kernel panics here (the fuzzers rely on this).
pub struct SliceFrame<'a> {
    bytes: &'a mut [u8],
}

#[derive(Clone, Copy, Debug)]
pub struct SliceWindow {
    offset: usize,
    len: usize,
}

impl<'a> SliceFrame<'a> {
    pub fn new(bytes: &'a mut [u8]) -> Self {
        Self { bytes }
    }

    fn range(&self, window: SliceWindow, at: usize, size: usize) -> core::ops::Range<usize> {
        assert!(at + size <= window.len, "access {at}+{size} outside a {}-byte window", window.len);
        let start = window.offset + at;
        // Not `is_multiple_of`: this crate is also built by the older Debian rustc for BPF.
        #[allow(clippy::manual_is_multiple_of)]
        let aligned = size == 1 || start % 2 == 0;
        assert!(aligned, "{size}-byte access at odd frame offset {start}");
        start..start + size
    }
}

impl Frame for SliceFrame<'_> {
    type Window = SliceWindow;

    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn window(&self, offset: usize, len: usize) -> Option<SliceWindow> {
        (offset + len <= self.bytes.len()).then_some(SliceWindow { offset, len })
    }

    unsafe fn load8(&self, window: SliceWindow, at: usize) -> u8 {
        self.bytes[self.range(window, at, 1)][0]
    }

    unsafe fn load16(&self, window: SliceWindow, at: usize) -> u16 {
        let r = self.range(window, at, 2);
        u16::from_ne_bytes([self.bytes[r.start], self.bytes[r.start + 1]])
    }

    unsafe fn store16(&mut self, window: SliceWindow, at: usize, value: u16) {
        let r = self.range(window, at, 2);
        self.bytes[r].copy_from_slice(&value.to_ne_bytes());
    }
}
