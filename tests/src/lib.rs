//! Support for the privileged tests (and the benchmark, `overlay-bench`, which builds its hosts
//! the same way): test hosts are network namespaces, joined by veths to a bridge in an
//! "underlay" namespace; every name a run creates starts with the run's unique id, and a `Run`
//! guard removes all of it (processes, namespaces, pins, files) when it is dropped, whether the
//! test passed or panicked, and also on SIGINT/SIGTERM once `cleanup_on_signal` is installed.

/// The command line of an agent on a simulated host, and where it reads its desired state.
pub mod agent;
/// Hosts, etcd on the underlay and an agent per host following it; the CLI run from a host.
pub mod cluster;
/// The CNI plugin run as a runtime runs it: CNI_* variables, the netconf on stdin.
pub mod cni;
/// containerd (its CRI plugin) on a simulated host, and a pause image made locally.
pub mod containerd;
/// A CRI client: the kubelet's calls for pod sandboxes.
pub mod cri;
/// Real Docker engines (Debian's dockerd) on the simulated hosts, isolated from the machine's.
pub mod docker;
/// A real etcd server per guard, on free ports, killed and removed when dropped.
pub mod etcd;
/// Frames for the packet tests, built byte by byte with lengths and checksums from the RFCs.
pub mod frames;
/// The fuzz suite's seeded generator of mutated, truncated and random frames.
pub mod fuzz;
/// The world beyond the hosts, behind a router on the underlay: egress tests and benchmark.
pub mod outside;
/// Just enough of the pcap format to read back what crossed the underlay.
pub mod pcap;
/// Peers that name themselves and the client that asks them (published ports).
pub mod peer;
/// A ping for the length of a fault, and what it lost.
pub mod ping;
/// Podman (CNI backend) on a simulated host, with its own roots and CNI directories.
pub mod podman;
/// Desired states built with the agent's model types.
pub mod scenario;
/// A program run on one frame with BPF_PROG_TEST_RUN: the context structs and the results.
pub mod testrun;
/// Simulated hosts on the underlay, each with its agent, pin and state directories.
pub mod topology;
/// The switch: a bridge in its own namespace, each host's `eth0` a veth into it.
pub mod underlay;
/// An independent checker of the frames the programs hand to containers and to the underlay.
pub mod wellformed;

use std::{
    path::{Path, PathBuf},
    process::{Child, ChildStderr, ChildStdout, Command, Output, Stdio},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Set (by `cargo xtask test` when it runs the tests as root) when every test must run: a
/// missing prerequisite is then a failure naming it, not a skip. A run that should test
/// everything cannot pass by skipping because setup forgot a package.
pub const REQUIRE_ALL_ENV: &str = "OVERLAY_TESTS_REQUIRE_ALL";

/// Says why the calling test cannot run here ("skipping: <test>: <why>") and returns true, so a
/// test can `if skip("...") { return; }`. Panics instead when `OVERLAY_TESTS_REQUIRE_ALL` is set.
pub fn skip(why: &str) -> bool {
    let test = std::thread::current().name().unwrap_or("test").to_owned();
    assert!(
        !std::env::var_os(REQUIRE_ALL_ENV).is_some_and(|v| !v.is_empty() && v != "0"),
        "{test} cannot run: {why} ({REQUIRE_ALL_ENV} is set, so this is a failure, not a skip)"
    );
    eprintln!("skipping: {test}: {why}");
    true
}

/// Returns true (after saying why) when the test cannot run here: it needs root and a BPF
/// filesystem. Privileged tests start with `if skip_unless_privileged() { return; }`.
pub fn skip_unless_privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root (network namespaces, BPF programs)");
    }
    if let Err(e) = ensure_bpffs() {
        return skip(&format!("no BPF filesystem at /sys/fs/bpf: {e}"));
    }
    false
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() -> std::io::Result<()> {
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
    sh_result(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `sh` for callers that report errors instead of panicking: the command's stdout, or an error
/// naming the command with its status, stdout and stderr.
pub fn sh_result(cmd: &mut Command) -> anyhow::Result<String> {
    let out = {
        let _running = Starting::enter();
        cmd.output().with_context(|| format!("running {cmd:?}"))?
    };
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

/// Runs a command and returns its output, success or not.
pub fn try_sh(cmd: &mut Command) -> Output {
    let _running = Starting::enter();
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// `ip <args>`, which must succeed (the error names the command, its status and output).
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    sh_result(Command::new("ip").args(args)).map(drop)
}

/// `ip -n <ns> <args>`: iproute2 acting inside a namespace; `ip` otherwise.
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    sh_result(Command::new("ip").args(["-n", ns]).args(args)).map(drop)
}

/// `ip netns exec <ns> <args...>`
pub fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

/// `args` run in the network namespace `ns`: a name (`ip netns exec`) or a path (`nsenter`,
/// for a namespace a runtime made outside /run/netns's names).
pub fn in_net(ns: &str, args: &[&str]) -> Command {
    if ns.starts_with('/') {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={ns}")).args(args);
        cmd
    } else {
        in_ns(ns, args)
    }
}

/// The MTU of interface `dev` in namespace `ns` (a name or a path).
pub fn link_mtu(ns: &str, dev: &str) -> u32 {
    let text = sh(&mut in_net(ns, &["ip", "-o", "link", "show", dev]));
    let mtu = text.split_whitespace().skip_while(|w| *w != "mtu").nth(1);
    mtu.and_then(|m| m.parse().ok()).unwrap_or_else(|| panic!("MTU of {dev} in {ns}: {text:?}"))
}

/// The route to the subnet of `dev` in `ns` (a name or a path), as the agent made it: (prefix, source, MTU).
/// The MTU is the overlay's; the interface's own may be larger (the uplink's).
pub fn subnet_route(ns: &str, dev: &str) -> (String, String, Option<u32>) {
    let text = sh(&mut in_net(ns, &["ip", "-o", "-4", "route", "show", "dev", dev, "scope", "link"]));
    let line = text.lines().next().unwrap_or_else(|| panic!("no route to {dev}'s subnet in {ns}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
    let src = after("src").unwrap_or_else(|| panic!("no source in {line:?}")).to_owned();
    (words[0].to_owned(), src, after("mtu").and_then(|m| m.parse().ok()))
}

/// Sets the MTU of the route to `dev`'s subnet in `ns` (a name or a path), what a container's sockets size their
/// overlay packets by (raising the interface's MTU first where it is lower): how a test makes a
/// container send more than the overlay carries.
pub fn set_overlay_mtu(ns: &str, dev: &str, mtu: u32) {
    if link_mtu(ns, dev) < mtu {
        sh(&mut in_net(ns, &["ip", "link", "set", dev, "mtu", &mtu.to_string()]));
    }
    let (prefix, src, _) = subnet_route(ns, dev);
    let mtu = mtu.to_string();
    sh(&mut in_net(
        ns,
        &["ip", "route", "replace", &prefix, "dev", dev, "scope", "link", "src", &src, "mtu", &mtu],
    ));
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
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from)
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
        Self::try_spawn(name, cmd).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `spawn` for callers that report errors instead of panicking.
    pub fn try_spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = {
            let _starting = Starting::enter();
            cmd.stdin(Stdio::null()).spawn().with_context(|| format!("starting {name}: {cmd:?}"))?
        };
        Ok(Self { child: Some(child), name: name.to_owned() })
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

    /// Its stdout, if it was spawned with `Stdio::piped()` and not taken yet.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// Its stderr, if it was spawned with `Stdio::piped()` and not taken yet.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.as_mut().and_then(|c| c.stderr.take())
    }

    /// Waits up to `timeout` for it to exit by itself, and returns its stdout (if piped and not
    /// taken); kills it after `timeout`. An error if it exits unsuccessfully or runs too long.
    pub fn wait_output(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let mut stdout = self.take_stdout();
        // Read on a thread, so a child that writes more than a pipe holds cannot block.
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(out) = stdout.as_mut() {
                let _ = std::io::Read::read_to_string(out, &mut text);
            }
            text
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            let child = self.child.as_mut().with_context(|| format!("{}: not running", self.name))?;
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
        live_runs().push(LiveRun { id: id.clone(), paths: vec![dir.path().to_owned()] });
        Self { id, dir, procs: Vec::new() }
    }

    /// Also removes `path` (a file or directory this run made outside its own directory, e.g.
    /// etcd's data) if a signal ends the process; on an ordinary exit its owner removes it.
    pub fn remove_on_signal(&self, path: &Path) {
        if let Some(run) = live_runs().iter_mut().find(|r| r.id == self.id) {
            run.paths.push(path.to_owned());
        }
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
        live_runs().retain(|r| r.id != self.id);
    }
}

/// A `Run` not dropped yet: what the signal handler removes.
struct LiveRun {
    id: String,
    /// Its directory, and what `remove_on_signal` added.
    paths: Vec<PathBuf>,
}

fn live_runs() -> std::sync::MutexGuard<'static, Vec<LiveRun>> {
    static LIVE: Mutex<Vec<LiveRun>> = Mutex::new(Vec::new());
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Set when a signal's sweep begins: from then on the commands and processes started through
/// `sh`, `sh_result`, `try_sh` and `Proc` wait for the exit instead (on every thread but the
/// sweeper's), so that the rest of the program, which runs on meanwhile and sees its
/// namespaces vanish, cannot make new ones behind the sweep.
static SWEEPING: AtomicBool = AtomicBool::new(false);
/// Commands started through those functions that have not finished (or, for `Proc`, not
/// started) yet: the sweep waits for them.
static STARTING: AtomicUsize = AtomicUsize::new(0);

std::thread_local! {
    static IS_SWEEPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Counts a command in `STARTING` while it lives; blocks for good once a sweep has begun.
struct Starting;

impl Starting {
    fn enter() -> Self {
        STARTING.fetch_add(1, Ordering::SeqCst);
        if SWEEPING.load(Ordering::SeqCst) && !IS_SWEEPER.get() {
            STARTING.fetch_sub(1, Ordering::SeqCst);
            // The sweeper exits the process shortly.
            loop {
                std::thread::park();
            }
        }
        Self
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        STARTING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// SIGKILLs every child of this process (agents, workers, etcd: the sweep's first step, so none
/// of them makes anything more).
fn kill_children() {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else { return };
    for pid in dir.filter_map(|e| e.ok()?.file_name().into_string().ok()?.parse::<i32>().ok()) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid == Some(me.as_str()) {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The write end of the pipe the signal handler writes the signal number to (-1: no handler).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; the pipe stays open for the life of the process.
    unsafe { libc::write(SIGNAL_PIPE.load(Ordering::Relaxed), (&raw const byte).cast(), 1) };
}

/// Makes SIGINT, SIGTERM and SIGHUP remove everything of every `Run` still alive (what their
/// Drop would do: processes in their namespaces, the namespaces, pins, files) and then exit
/// with 128 + the signal. For long-running programs built on `Run` (the benchmark): exit on a
/// signal runs no destructors, so without this an interrupted run leaves its namespaces behind.
///
/// The handler itself only writes the signal number to a pipe (nothing else is safe in a
/// handler); a thread reading the pipe does the sweep: it stops the shared primitives from
/// starting anything new, waits for the commands already started, kills this process's
/// children, removes each run's namespaces, pins and files, and exits. Installing it twice is a
/// no-op.
pub fn cleanup_on_signal() -> std::io::Result<()> {
    if SIGNAL_PIPE.load(Ordering::Relaxed) >= 0 {
        return Ok(());
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two descriptors we pass room for.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let [read_end, write_end] = fds;
    SIGNAL_PIPE.store(write_end, Ordering::Relaxed);
    std::thread::Builder::new().name("signal-cleanup".into()).spawn(move || {
        let mut signal = 0u8;
        loop {
            // SAFETY: reading one byte into a u8 we own.
            let n = unsafe { libc::read(read_end, (&raw mut signal).cast(), 1) };
            if n == 1 {
                break;
            }
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        IS_SWEEPER.set(true);
        SWEEPING.store(true, Ordering::SeqCst);
        let runs: Vec<(String, Vec<PathBuf>)> =
            live_runs().iter().map(|r| (r.id.clone(), r.paths.clone())).collect();
        eprintln!(
            "interrupted (signal {signal}): removing everything of run(s) {:?}",
            runs.iter().map(|r| &r.0).collect::<Vec<_>>()
        );
        // What was started before the sweep began finishes first (ip commands take
        // milliseconds; a longer one is not waited for past two seconds).
        let _ = wait_for(Duration::from_secs(2), || (STARTING.load(Ordering::SeqCst) == 0).then_some(()));
        kill_children();
        for (id, paths) in runs {
            cleanup_prefix(&id);
            for path in paths {
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
        std::process::exit(128 + i32::from(signal));
    })?;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: an all-zero sigaction is valid; we fill the handler, flags and an empty mask.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: sigemptyset and sigaction on structs we own.
        unsafe { libc::sigemptyset(&raw mut action.sa_mask) };
        if unsafe { libc::sigaction(signal, &raw const action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
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

/// The processes (but this one) whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == me {
            continue;
        }
        if let (Ok(pid), Ok(cmdline)) = (name.parse::<i32>(), std::fs::read(entry.path().join("cmdline")))
            && String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle)
        {
            found.push(pid);
        }
    }
    found
}

/// The MAC of `dev` in namespace `ns`.
pub fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let text = sh(&mut in_ns(ns, &["cat", &format!("/sys/class/net/{dev}/address")]));
    let bytes: Vec<u8> = text.trim().split(':').map(|b| u8::from_str_radix(b, 16).expect("MAC")).collect();
    bytes.try_into().expect("6 bytes")
}

/// `bytes` as hex digits, for `overlay-probe frame`.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
