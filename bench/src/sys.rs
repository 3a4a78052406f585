//! The harness's own plumbing on top of the shared primitives of `overlay_tests` (`Run`, `Proc`,
//! `sh_result`, `in_ns`, `ip`, `ip_in`, `cleanup_prefix`, which the privileged tests use too): a
//! sysctl shorthand that returns errors instead of panicking, one clock for every namespace, the
//! workers' "ready" line, and the kernel's CPU and memory accounting.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{ChildStdout, Command},
    time::Duration,
};

use anyhow::{Context as _, bail};
use overlay_tests::{in_ns, sh_result};
use serde::{Deserialize, Serialize};

/// Sets sysctls inside a namespace (`net.*` keys are per namespace).
pub fn sysctl_in(ns: &str, settings: &[&str]) -> anyhow::Result<()> {
    sh_result(in_ns(ns, &["sysctl", "-qw"]).args(settings)).map(drop)
}

/// `ip netns exec <ns> <exe> worker`: one of the harness's own workers (`worker.rs`, a hidden
/// subcommand of this binary) inside a namespace; ip execs it, so the child's pid is the worker's.
pub fn worker_in(ns: &str, exe: &Path) -> Command {
    let mut cmd = in_ns(ns, &[]);
    cmd.arg(exe).arg("worker");
    cmd
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, whatever its
/// namespace, so times taken by the workers compare with the harness's.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads the first line of a child's stdout, up to `timeout` (how workers say "ready").
pub fn read_line_timeout(out: ChildStdout, timeout: Duration) -> anyhow::Result<(String, ChildStdout)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut line = String::new();
        let got = reader.read_line(&mut line);
        // The worker writes one line and then nothing until it is done, so nothing is buffered
        // past the line: handing the inner pipe back loses no output.
        let _ = tx.send((got, line, reader.into_inner()));
    });
    match rx.recv_timeout(timeout) {
        Ok((Ok(n), line, out)) if n > 0 => Ok((line.trim().to_owned(), out)),
        Ok((Ok(_), _, _)) => bail!("the worker closed its output before saying anything"),
        Ok((Err(e), _, _)) => Err(e.into()),
        Err(_) => bail!("no line within {timeout:?}"),
    }
}

/// Whole-machine CPU time from /proc/stat, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal (guest time is inside user).
    pub busy: u64,
}

impl CpuTimes {
    pub fn read() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/stat")?;
        let line = text.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
        if v.len() < 8 {
            bail!("unexpected /proc/stat line: {line}");
        }
        // user nice system idle iowait irq softirq steal
        Ok(Self { busy: v[0] + v[1] + v[2] + v[5] + v[6] + v[7] })
    }

    /// CPU-seconds spent busy between `self` and `later`.
    pub fn busy_secs_until(&self, later: &Self) -> f64 {
        later.busy.saturating_sub(self.busy) as f64 / clk_tck()
    }
}

/// Clock ticks per second of /proc/stat (USER_HZ).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// CPU time a test cost, two ways.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CpuUse {
    /// Run time of the traffic's own processes (the programs the test ran, reaped children of
    /// the harness, and the long-running server when there is one) plus the ksoftirqd threads.
    /// With veths the whole datapath (both hosts' TC programs, bridges, vxlan devices, routing)
    /// runs in softirq on the sending process's stack or in ksoftirqd, and this kernel charges
    /// softirq time to whatever task it interrupted (no IRQ_TIME_ACCOUNTING), so this is the
    /// packet path's cost without the rest of a shared machine.
    pub traffic_secs: f64,
    /// Busy time of the whole machine over the same interval (/proc/stat): includes everything
    /// else running at the time.
    pub machine_busy_secs: f64,
}

/// Measures `CpuUse` over an interval.
pub struct CpuMeter {
    children: f64,
    ksoftirqd: u64,
    extra: Vec<(u32, u64)>,
    machine: CpuTimes,
}

impl CpuMeter {
    /// `extra`: long-running processes of the test that are not reaped inside the interval.
    pub fn start(extra: &[u32]) -> anyhow::Result<Self> {
        Ok(Self {
            children: children_cpu_secs(),
            ksoftirqd: ksoftirqd_ns(),
            extra: extra.iter().map(|p| (*p, schedstat_ns(*p).unwrap_or(0))).collect(),
            machine: CpuTimes::read()?,
        })
    }

    /// Call after the test's processes have been reaped.
    pub fn finish(&self) -> anyhow::Result<CpuUse> {
        let machine = CpuTimes::read()?;
        let extra: u64 = self
            .extra
            .iter()
            .map(|(pid, before)| schedstat_ns(*pid).unwrap_or(*before).saturating_sub(*before))
            .sum();
        let traffic = (children_cpu_secs() - self.children).max(0.0)
            + (ksoftirqd_ns().saturating_sub(self.ksoftirqd) + extra) as f64 / 1e9;
        Ok(CpuUse { traffic_secs: traffic, machine_busy_secs: self.machine.busy_secs_until(&machine) })
    }
}

/// User + system time of every child this process has reaped, seconds (exact totals: the
/// kernel scales them to the children's run time).
fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &raw mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Time a process has run on a CPU, ns (/proc/<pid>/schedstat).
fn schedstat_ns(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Run time of all ksoftirqd threads, ns.
fn ksoftirqd_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .filter_map(schedstat_ns)
        .sum()
}

/// A `VmXxx:` field of /proc/<pid>/status, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kib = line[field.len() + 1..].split_whitespace().next().context("empty field")?;
    Ok(kib.parse()?)
}

/// A program on PATH, or an error saying which package provides it.
pub fn require_program(name: &str, package: &str) -> anyhow::Result<()> {
    let found =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    if !found {
        bail!("{name} is not installed (Debian package {package})");
    }
    Ok(())
}
