//! Bounds-checked access to packet bytes, shared by the TC and XDP programs.
//!
//! The verifier only accepts a packet access after a comparison against `data_end` on the same
//! path; every header read goes through `header` so that comparison is always there. The wire
//! structs have alignment 1, so a reference at any offset is sound.

use core::mem::size_of;

/// The linear bytes of a packet: `[start, end)`.
#[derive(Clone, Copy)]
pub struct Packet {
    pub start: usize,
    pub end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// A header of type `T` at `offset`, if the packet is long enough to hold it.
    #[inline(always)]
    pub fn header<T>(&self, offset: usize) -> Option<*mut T> {
        let at = self.start + offset;
        if at + size_of::<T>() > self.end {
            return None;
        }
        Some(at as *mut T)
    }
}
