//! Bounds-checked access to packet bytes, shared by the TC and XDP programs.
//!
//! The verifier only accepts a packet access after a comparison against `data_end` on the same
//! path; every header access goes through `header`, `read` or `write` so that comparison is
//! always there. Headers are copied in and out with unaligned reads and writes: `EthHdr` has
//! alignment 2 (see overlay_common::wire) and nothing promises that a header in a packet sits at
//! an even address.

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

    /// Where a `T` at `offset` would be, if the packet is long enough to hold it.
    #[inline(always)]
    fn header<T>(&self, offset: usize) -> Option<*mut T> {
        let at = self.start + offset;
        if at + size_of::<T>() > self.end {
            return None;
        }
        Some(at as *mut T)
    }

    /// A copy of the header of type `T` at `offset`, if the packet is long enough to hold it.
    /// `T` is a wire header: plain bytes, for which every pattern is a valid value.
    /// The address of `len` bytes at `offset`, all within the packet: for helpers that read
    /// packet memory themselves (bpf_csum_diff).
    #[inline(always)]
    pub fn slice(&self, offset: usize, len: usize) -> Option<*mut u8> {
        let at = self.start + offset;
        if at + len > self.end {
            return None;
        }
        Some(at as *mut u8)
    }

    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let at = self.header::<T>(offset)?;
        // SAFETY: `at..at + size_of::<T>()` lies inside the packet (checked above); the read
        // makes no alignment assumption.
        Some(unsafe { at.read_unaligned() })
    }

    /// Writes `value` at `offset`; false if the packet is too short to hold it.
    #[inline(always)]
    pub fn write<T: Copy>(&self, offset: usize, value: T) -> bool {
        let Some(at) = self.header::<T>(offset) else { return false };
        // SAFETY: as in `read`; the programs own the packet bytes they are handed.
        unsafe { at.write_unaligned(value) };
        true
    }
}
