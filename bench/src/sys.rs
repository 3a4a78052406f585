//! Running commands, owning child processes, reading the kernel's CPU and memory accounting, and
//! removing everything a run made.
//!
//! Every namespace, pin and file a run creates is named after the run's id, so cleanup is one
//! sweep by prefix. The sweep runs when the `Scope` guard drops (normal exit, error, panic) and
//! from the SIGINT/SIGTERM handler, which cannot reach the guards owned by the main thread.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// Runs a command; its stdout on success, its stderr in the error otherwise.
pub fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>`.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    sh(Command::new("ip").args(args)).map(drop)
}

/// `ip -n <ns> <args>`: iproute2 acting inside a namespace.
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    sh(Command::new("ip").args(["-n", ns]).args(args)).map(drop)
}

/// `ip netns exec <ns> <program> <args>`: a command run inside a namespace (ip execs it, so the
/// child's pid is the program's).
pub fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Sets sysctls inside a namespace (`net.*` keys are per namespace).
pub fn sysctl_in(ns: &str, settings: &[&str]) -> anyhow::Result<()> {
    sh(in_ns(ns, "sysctl").arg("-qw").args(settings)).map(drop)
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, whatever its
/// namespace, so times taken by the workers compare with the harness's.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A child process, killed and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd.stdin(Stdio::null()).spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self { child: Some(child), name: name.to_owned() })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    pub fn child_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut().and_then(|c| c.stderr.take())
    }

    /// Whether it has exited (and reaped it if so).
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// SIGTERM, then SIGKILL if it is still there after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for it to exit by itself, up to `timeout`; its stdout, if it was piped.
    pub fn wait_output(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let mut stdout = self.take_stdout();
        // Read on a thread so a worker that writes more than a pipe holds cannot block.
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(out) = stdout.as_mut() {
                let _ = std::io::Read::read_to_string(out, &mut text);
            }
            text
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            let child = self.child.as_mut().context("no process")?;
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.child = None;
        let text = reader.join().unwrap_or_default();
        if !status.success() {
            bail!("{} failed ({status}); stdout: {}", self.name, text.trim());
        }
        Ok(text)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
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

/// Everything of one run: its id (the prefix of every name it makes), its temporary directory,
/// its pin root. Dropping it removes all of that.
pub struct Scope {
    pub id: String,
    pub dir: tempfile::TempDir,
}

impl Scope {
    pub fn new() -> anyhow::Result<Self> {
        // Short: interface and namespace names are built from it (interfaces take 15 bytes).
        let id = format!("ob{:05x}", std::process::id() & 0xfffff);
        let dir = tempfile::Builder::new().prefix(&format!("{id}-")).tempdir()?;
        let scope = Self { id, dir };
        register_cleanup(&scope.id, scope.dir.path());
        Ok(scope)
    }

    /// A namespace name of this run.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    pub fn pin_root(&self) -> PathBuf {
        Path::new("/sys/fs/bpf").join(&self.id)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        cleanup_prefix(&self.id);
    }
}

static CLEANUP: OnceLock<(String, PathBuf)> = OnceLock::new();

fn register_cleanup(id: &str, dir: &Path) {
    let _ = CLEANUP.set((id.to_owned(), dir.to_owned()));
}

/// On SIGINT/SIGTERM/SIGHUP: sweep everything named after the run, then exit. The guards on the
/// main thread never run (exit skips destructors), so the sweep is all of the cleanup.
pub fn install_signal_cleanup() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        if let Some((id, dir)) = CLEANUP.get() {
            eprintln!("interrupted: removing the namespaces, pins and files of {id}");
            cleanup_prefix(id);
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    })
    .context("installing the signal handler")
}

/// Kills the processes in, and deletes, every namespace whose name starts with `prefix`; removes
/// /sys/fs/bpf/<prefix>. Idempotent; reports nothing (it runs on error paths).
pub fn cleanup_prefix(prefix: &str) {
    let names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    let ours: Vec<&String> = names.iter().filter(|n| n.starts_with(prefix)).collect();
    // Processes first (agents entered their host namespace; holders and workers live in the
    // container namespaces), so no agent recreates what is being removed.
    for name in &ours {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).stderr(Stdio::null()).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: plain kill(2) of a process inside one of our namespaces.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
    for name in &ours {
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
    }
    let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(prefix));
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
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
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

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there (the agents pin under it).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")) {
        return Ok(());
    }
    sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])).map(drop)
}

/// A program on PATH, or an error saying which package provides it.
pub fn require_program(name: &str, package: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{name} is not installed (Debian package {package})");
    }
    Ok(())
}
