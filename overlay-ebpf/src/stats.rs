//! Counting: every verdict a program returns is counted here, once, by its code.

use overlay_common::stats;

use crate::maps::STATS;

#[inline(always)]
pub fn count(code: u32, bytes: u32) {
    if let Some(c) = STATS.get_ptr_mut(code) {
        // SAFETY: per-CPU slot of this CPU; programs run with migration disabled, so nothing
        // else writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// A reason a packet is dropped: one of the `overlay_common::stats::DROP_*` codes.
#[derive(Clone, Copy)]
pub struct Drop(pub u32);

impl Drop {
    pub const MALFORMED: Self = Self(stats::DROP_MALFORMED);
}
