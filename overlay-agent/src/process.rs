//! The agent process's own figures for `/metrics`, read from /proc/self at each scrape, as the
//! Prometheus clients of other languages export them (`process_*`): CPU time, resident memory,
//! open descriptors, start time. Four small files: no crate needed.

use std::io;

/// What /proc says of this process now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    /// User and system CPU time.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub open_fds: u64,
    /// Unix time the process started.
    pub start_time_seconds: f64,
}

/// Reads the figures of this process.
pub fn read() -> io::Result<Figures> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let boot = std::fs::read_to_string("/proc/stat")?;
    let open_fds = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    parse(&stat, &statm, &boot, ticks.max(1) as f64, page.max(1) as u64, open_fds)
        .ok_or_else(|| io::Error::other("unexpected /proc/self/stat, statm or /proc/stat"))
}

/// The figures from the text of /proc/self/stat, /proc/self/statm and /proc/stat.
fn parse(stat: &str, statm: &str, boot: &str, ticks: f64, page: u64, open_fds: u64) -> Option<Figures> {
    // The command name (field 2) is in parentheses and may hold spaces: count fields after it.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 (utime), 15 (stime) and 22 (starttime), counted from 1 with the name as 2.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let cpu_seconds = (field(14)? + field(15)?) as f64 / ticks;
    let started_after_boot = field(22)? as f64 / ticks;
    let btime: u64 = boot.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(Figures {
        cpu_seconds,
        resident_bytes: resident_pages * page,
        open_fds,
        start_time_seconds: btime as f64 + started_after_boot,
    })
}

#[cfg(test)]
mod tests {
    use super::{Figures, parse};

    #[test]
    fn figures_come_from_the_right_fields() {
        // A name with a space and a parenthesis, as a process may have.
        let stat = "4242 (overlay agent) S 1 4242 4242 0 -1 4194560 2000 0 0 0 250 150 0 0 20 0 9 0 \
                    12345 200000000 3000 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let statm = "50000 3000 1000 100 0 8000 0\n";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 10\n";
        let f = parse(stat, statm, boot, 100.0, 4096, 12).expect("parses");
        assert_eq!(
            f,
            Figures {
                cpu_seconds: 4.0,
                resident_bytes: 3000 * 4096,
                open_fds: 12,
                start_time_seconds: 1_700_000_000.0 + 123.45
            }
        );
    }

    #[test]
    fn this_process_has_figures() {
        let f = super::read().expect("/proc/self");
        assert!(f.resident_bytes > 0 && f.open_fds > 0 && f.start_time_seconds > 1.6e9, "{f:?}");
    }
}
