//! Counting: every verdict a program returns is counted here, once, by its code.
//! A drop is counted under its `DropReason`'s code; the programs' errors are that enum itself.

use crate::maps::STATS;

#[inline(always)]
pub fn count(code: u32, bytes: u32) {
    if let Some(c) = STATS.get_ptr_mut(code) {
        // SAFETY: per-CPU slot of this CPU; programs run with migration disabled, so nothing
        // else writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}
