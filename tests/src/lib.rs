//! Support for the privileged tests: test hosts are network namespaces, joined by veths to a
//! bridge in an "underlay" namespace; every name a run creates starts with the run's unique id,
//! and a `Run` guard removes all of it (processes, namespaces, pins, files) when it is dropped,
//! whether the test passed or panicked.

pub mod cluster;
pub mod etcd;
pub mod frames;
pub mod pcap;
pub mod scenario;
pub mod topology;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Returns true (after saying why) when the test cannot run here: it needs root and a BPF
/// filesystem. Privileged tests start with `if skip_unless_privileged() { return; }`.
pub fn skip_unless_privileged() -> bool {
    let test = std::thread::current().name().unwrap_or("test").to_owned();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: {test}: needs root (network namespaces, BPF programs)");
        return true;
    }
    if let Err(e) = ensure_bpffs() {
        eprintln!("skipping: {test}: no BPF filesystem at /sys/fs/bpf: {e}");
        return true;
    }
    false
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
fn ensure_bpffs() -> std::io::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")) {
        return Ok(());
    }
    let ok = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?.success();
    if ok { Ok(()) } else { Err(std::io::Error::other("mount -t bpf failed")) }
}

/// A short id unique to this process and call, usable as a prefix of interface and namespace
/// names (interface names are limited to 15 bytes).
pub fn unique_id(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{tag}{:04x}{n}", std::process::id() & 0xffff)
}

/// Runs a command and returns its stdout; panics with its stderr if it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its output, success or not.
pub fn try_sh(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// `ip netns exec <ns> <args...>`
pub fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A binary of the workspace, as `cargo xtask test` built it (OVERLAY_BIN_DIR), or from the
/// debug or release target directory.
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("OVERLAY_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    for profile in ["debug", "release"] {
        let path = target_dir().join(profile).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} is not built: run the tests with `cargo xtask test`")
}

/// A child process killed (and reaped) when dropped.
pub struct Proc {
    pub child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let child = cmd.stdin(Stdio::null()).spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { child: Some(child), name: name.to_owned() }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited by itself in time.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let clean = wait_for(timeout, || child.try_wait().ok().flatten()).is_some_and(|s| s.success());
        let _ = child.kill();
        let _ = child.wait();
        clean
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Everything a test run creates is named after `id`; dropping the run removes it all:
/// processes inside its namespaces, the namespaces, its pins under /sys/fs/bpf, its files.
pub struct Run {
    pub id: String,
    pub dir: tempfile::TempDir,
    /// Processes to stop first (agents, etcd), in order.
    pub procs: Vec<Proc>,
}

impl Run {
    pub fn new(tag: &str) -> Self {
        let id = unique_id(tag);
        let dir = tempfile::Builder::new().prefix(&format!("{id}-")).tempdir().expect("temp dir");
        Self { id, dir, procs: Vec::new() }
    }

    /// A namespace name of this run.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    /// This run's pin root.
    pub fn pin_root(&self) -> PathBuf {
        Path::new("/sys/fs/bpf").join(&self.id)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Removes everything named after this run (also usable mid-test).
    pub fn cleanup(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        cleanup_prefix(&self.id);
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Kills the processes in, and deletes, every namespace of run `prefix` (named `<prefix>-...`);
/// removes /sys/fs/bpf/<prefix>. The dash matters: run `x1` must not take run `x10`'s namespaces.
pub fn cleanup_prefix(prefix: &str) {
    let ours = format!("{prefix}-");
    let names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    let names: Vec<&String> = names.iter().filter(|n| n.starts_with(&ours)).collect();
    for name in &names {
        let pids = try_sh(Command::new("ip").args(["netns", "pids", name.as_str()]));
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    for name in &names {
        let _ = try_sh(Command::new("ip").args(["netns", "del", name.as_str()]));
    }
    let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(prefix));
}
