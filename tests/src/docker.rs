//! Real Docker engines on the simulated hosts: one dockerd per host namespace (Debian's
//! docker.io, 20.10), each with everything of its own under the test run's directory, and the
//! busybox image they run, imported from a busybox-static rootfs (no registry).
//!
//! What keeps a dockerd from touching the machine or another dockerd:
//! - it runs in the host's network namespace (`nsenter --net`, not `ip netns exec`, which would
//!   mount a fresh /sys without the cgroup hierarchies dockerd needs);
//! - in a mount namespace of its own, with a tmpfs over /run: the machine's /run/docker and
//!   /run/containerd are out of its sight (a dockerd that finds /run/containerd/containerd.sock
//!   uses that containerd instead of starting its own), and its mounts (sandbox namespaces,
//!   the containers' root filesystems) vanish with it;
//! - `/run/docker/plugins`, where dockerd 20.10 looks for plugin sockets (the path is fixed in
//!   its source, pkg/plugins/discovery.go), is the host's own plugin directory bind-mounted
//!   there: the agent of that host puts its socket in it, and no other dockerd sees it;
//! - its own --data-root, --exec-root, socket, pidfile and config file, and a cgroup parent
//!   named after the run and host, by which its containers' processes are found and killed;
//! - no iptables, IP forwarding, masquerading or default bridge (--bridge=none), and the vfs
//!   storage driver (no overlay mounts to leak).
//!
//! The client is Debian's /usr/bin/docker, named by path: a machine may have another `docker`
//! (a newer client) earlier in PATH.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{Proc, Run, sh_result, wait_for};

/// Debian's docker.io daemon and the client of the same release.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
pub const DOCKER: &str = "/usr/bin/docker";
/// busybox-static's binary, from which the test image is made.
pub const BUSYBOX: &str = "/bin/busybox";
/// The image the tests run, as `docker import` names it.
pub const IMAGE: &str = "overlay-test-busybox:1";

/// Why Docker cannot run here, if it cannot (the packages setup installs are missing).
pub fn missing() -> Option<String> {
    for (path, package) in [(DOCKERD, "docker.io"), (DOCKER, "docker.io"), (BUSYBOX, "busybox-static")] {
        if !Path::new(path).exists() {
            return Some(format!("no {path} (install {package}, or run ./setup)"));
        }
    }
    None
}

/// A tar of a root filesystem holding busybox and a link for each of its applets, made once
/// per run: what `docker import` turns into the test image.
pub fn busybox_rootfs(run: &Run) -> anyhow::Result<PathBuf> {
    let tar = run.path("busybox-rootfs.tar");
    if tar.exists() {
        return Ok(tar);
    }
    let root = run.path("busybox-rootfs");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(BUSYBOX, bin.join("busybox")).context("copying busybox")?;
    let applets = sh_result(Command::new(BUSYBOX).arg("--list"))?;
    for applet in applets.split_whitespace().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    // /etc holds the files Docker bind-mounts over (hosts, resolv.conf, hostname).
    std::fs::create_dir_all(root.join("etc"))?;
    sh_result(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg("."))?;
    std::fs::remove_dir_all(&root)?;
    Ok(tar)
}

/// The plugin directory of `host`'s engine (seen by it as /run/docker/plugins).
pub fn plugin_dir(run: &Run, host: &str) -> PathBuf {
    run.path(&format!("docker-{host}")).join("plugins")
}

/// The driver name the tests give the agent's plugin, and its socket in `host`'s plugin
/// directory: what `overlay-agent run --docker-plugin` is given.
pub const DRIVER: &str = "overlay-ebpf";
pub fn plugin_socket(run: &Run, host: &str) -> PathBuf {
    plugin_dir(run, host).join(format!("{DRIVER}.sock"))
}

/// One host's Docker engine.
pub struct Dockerd {
    pub host: String,
    /// The host's network namespace.
    pub ns: String,
    /// Everything of this dockerd: data-root, exec-root, socket, pidfile, log, client config.
    pub dir: PathBuf,
    /// This host's plugin directory: dockerd sees it as /run/docker/plugins.
    pub plugins: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
    /// The cgroup parent of its containers (one path component, named after the run and host).
    pub cgroup: String,
    proc: Option<Proc>,
}

impl Dockerd {
    /// Starts a dockerd in namespace `ns` for host `host` of `run` and waits until it answers.
    pub fn start(run: &Run, host: &str, ns: &str) -> anyhow::Result<Self> {
        let dir = run.path(&format!("docker-{host}"));
        let plugins = plugin_dir(run, host);
        std::fs::create_dir_all(&plugins)?;
        let config = dir.join("daemon.json");
        // Its own (empty) config: /etc/docker/daemon.json, if the machine has one, is not ours.
        std::fs::write(&config, "{}\n")?;
        let mut d = Self {
            host: host.to_owned(),
            ns: ns.to_owned(),
            sock: dir.join("docker.sock"),
            log: dir.join("dockerd.log"),
            cgroup: format!("{}-{host}", run.id),
            plugins,
            dir,
            proc: None,
        };
        d.spawn()?;
        Ok(d)
    }

    /// Starts the daemon (again) with its directories as they are, and waits until it answers.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let host = self.host.clone();
        let ns = self.ns.clone();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .args(["unshare", "--mount", "--propagation", "slave", "sh", "-c"])
            .arg(
                "mount -t tmpfs -o mode=755 overlay-test-run /run && mkdir -p /run/docker/plugins \
                 && mount --bind \"$1\" /run/docker/plugins && shift && exec \"$@\"",
            )
            .arg("sh")
            .arg(&self.plugins)
            .arg(DOCKERD)
            .arg("--config-file")
            .arg(self.dir.join("daemon.json"))
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .args(["--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none"])
            .args(["--storage-driver=vfs", "--shutdown-timeout=2"])
            .arg(format!("--cgroup-parent={}", self.cgroup))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        self.proc = Some(Proc::try_spawn(&format!("dockerd {host}"), &mut cmd)?);
        let up = wait_for(Duration::from_mins(1), || {
            let out = self.docker().args(["version", "--format", "{{.Server.Version}}"]).output().ok()?;
            out.status.success().then_some(())
        });
        if up.is_none() {
            bail!("dockerd on {host} did not answer within a minute; its log:\n{}", self.log_tail(40));
        }
        Ok(())
    }

    /// Restarts the daemon as an operator would (`systemctl restart docker`): SIGTERM, which
    /// stops its containers, then the same daemon again, which starts those with a restart
    /// policy and cleans up after the rest.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.terminate(Duration::from_secs(15));
        }
        self.spawn()
    }

    /// `docker -H <this dockerd>`, with a client configuration of its own.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.env("DOCKER_CONFIG", self.dir.join("client"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()));
        cmd
    }

    /// `docker <args>` against this dockerd, which must succeed: its stdout.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        sh_result(self.docker().args(args)).with_context(|| format!("docker on {}", self.host))
    }

    /// Imports the busybox rootfs as `IMAGE`.
    pub fn import_busybox(&self, rootfs: &Path) -> anyhow::Result<()> {
        sh_result(self.docker().arg("import").arg(rootfs).arg(IMAGE)).map(drop)
    }

    /// The processes of this dockerd's containers (found by their cgroup parent).
    pub fn container_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in self.cgroup_dirs() {
            collect_procs(&dir, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// This dockerd's cgroup parent in each hierarchy that has it (v1: one per controller).
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        let mut dirs = vec![root.join(&self.cgroup)];
        if let Ok(entries) = std::fs::read_dir(root) {
            dirs.extend(entries.flatten().map(|e| e.path().join(&self.cgroup)));
        }
        dirs.retain(|d| d.is_dir());
        dirs
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops it and everything it started: its containers first (`rm -f`), then the daemon
    /// (SIGTERM, SIGKILL after a while), then whatever is still in its containers' cgroups, and
    /// removes those cgroups. Its mounts go with its mount namespace. Safe to call twice.
    pub fn stop(&mut self) {
        let Some(mut proc) = self.proc.take() else { return };
        if proc.is_running() {
            let ids = self.docker().args(["ps", "-aq"]).output().map(|o| o.stdout).unwrap_or_default();
            let ids = String::from_utf8_lossy(&ids).into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = self.docker().args(["rm", "-f"]).args(&ids).output();
            }
        }
        // nsenter and unshare exec, so this is dockerd itself; its containerd and the shims
        // are in the host's namespace, which the run's cleanup empties.
        proc.terminate(Duration::from_secs(15));
        for pid in self.container_pids() {
            // SAFETY: plain kill(2) of a process in this dockerd's cgroups.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = wait_for(Duration::from_secs(5), || self.container_pids().is_empty().then_some(()));
        for dir in self.cgroup_dirs() {
            remove_cgroup(&dir);
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- dockerd {} (last 30 lines) -----\n{}", self.host, self.log_tail(30));
        }
        self.stop();
    }
}

pub(crate) fn collect_procs(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_procs(&e.path(), pids);
            }
        }
    }
}

/// Removes a cgroup and its children, deepest first (rmdir is how cgroups are removed).
pub(crate) fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
