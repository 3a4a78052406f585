//! containerd (Debian's 1.6, its CRI plugin) on a simulated host: the runtime under a kubelet.
//! It runs in the host's network namespace (`nsenter --net`) with its root, state, sockets, runc
//! root, CNI bin and conf directories under the run's directory, and the pause image made here
//! from busybox-static (an OCI layout imported with `ctr`), so it pulls nothing and touches no
//! other containerd. Its CNI conf directory holds one conflist naming the host's agent socket;
//! its bin directory only `overlay-cni`.
//!
//! What cannot be moved: the shims' sockets live under /run/containerd/s (a path fixed in
//! containerd 1.6), and pod namespaces under /run/netns (`cni-<uuid>`), where the agent opens
//! them. `Containerd::stop` removes every sandbox through CRI, stops the daemon, kills whatever
//! is left in its pods' cgroup parent, and removes /run/containerd if it did not exist before.
//! `restrict_oom_score_adj`: root here lacks CAP_SYS_RESOURCE (../shared/runtimes/RECIPES.md).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use crate::{
    Proc, Run, binary,
    cri::Cri,
    docker::{collect_procs, remove_cgroup},
    sh_result, wait_for,
};

pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const CTR: &str = "/usr/bin/ctr";
/// The reference CNI plugins' loopback (containernetworking-plugins).
pub const LOOPBACK: &str = "/usr/lib/cni/loopback";
/// The sandbox image, made locally.
pub const PAUSE: &str = "overlay.local/pause:1";
/// Where containerd 1.6 puts its shims' sockets whatever its configuration says.
const SHIM_DIR: &str = "/run/containerd";

/// Why containerd cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    [
        (CONTAINERD, "containerd"),
        (CTR, "containerd"),
        ("/usr/bin/containerd-shim-runc-v2", "containerd"),
        (LOOPBACK, "containernetworking-plugins"),
    ]
    .into_iter()
    .find(|(p, _)| !Path::new(p).exists())
    .map(|(p, package)| format!("no {p} (install {package}, or run ./setup)"))
}

/// One host's containerd.
pub struct Containerd {
    pub host: String,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
    /// The cgroup parent its pods are given (one path component, named after the run and host).
    pub cgroup: String,
    /// Whether /run/containerd existed before this containerd started.
    had_shim_dir: bool,
    proc: Option<Proc>,
}

impl Containerd {
    /// Writes the configuration and CNI directories of `host`'s containerd (in namespace `ns`),
    /// starts it, waits until CRI answers, and imports the pause image made from `rootfs` (a
    /// tar of a root filesystem with busybox).
    pub fn start(
        run: &Run,
        host: &str,
        ns: &str,
        network: &str,
        socket: &Path,
        rootfs: &Path,
    ) -> anyhow::Result<Self> {
        let dir = run.path(&format!("containerd-{host}"));
        let (bin, netd) = (dir.join("cni-bin"), dir.join("net.d"));
        for d in [&bin, &netd] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::copy(binary("overlay-cni"), bin.join("overlay-cni")).context("installing overlay-cni")?;
        // containerd's CRI brings every pod's lo up with the reference loopback plugin.
        std::fs::copy(LOOPBACK, bin.join("loopback")).context("installing loopback")?;
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            // Declared so that a pod's hostPort reaches the plugin (and is refused there).
            "plugins": [{"type": "overlay-cni", "agentSocket": socket, "capabilities": {"portMappings": true}}],
        });
        std::fs::write(netd.join(format!("50-{network}.conflist")), conflist.to_string())?;
        let sock = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{netd}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = sock.display(),
            runc = dir.join("runc").display(),
            bin = bin.display(),
            netd = netd.display(),
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let log = dir.join("containerd.log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg(CONTAINERD)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        let had_shim_dir = Path::new(SHIM_DIR).exists();
        let proc = Proc::try_spawn(&format!("containerd {host}"), &mut cmd)?;
        let c = Self {
            host: host.to_owned(),
            cgroup: format!("{}-{host}", run.id),
            sock,
            log,
            dir,
            had_shim_dir,
            proc: Some(proc),
        };
        let up = wait_for(Duration::from_secs(30), || {
            c.sock.exists().then(|| Cri::connect(&c.sock).ok()?.version().ok()).flatten()
        });
        if up.is_none() {
            bail!("containerd on {host} did not answer CRI within 30 s; its log:\n{}", c.log_tail(30));
        }
        let image = pause_image(&c.dir, rootfs)?;
        sh_result(c.ctr(&["images", "import"]).arg(&image))?;
        let images = sh_result(&mut c.ctr(&["images", "list", "--quiet"]))?;
        if !images.lines().any(|l| l == PAUSE) {
            bail!("the pause image is not in containerd on {host} after the import: {images}");
        }
        Ok(c)
    }

    /// `ctr` on this containerd, in CRI's namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(CTR);
        cmd.arg("--address").arg(&self.sock).args(["--namespace", "k8s.io"]).args(args);
        cmd
    }

    pub fn cri(&self) -> anyhow::Result<Cri> {
        Cri::connect(&self.sock)
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in self.cgroup_dirs() {
            collect_procs(&dir, &mut pids);
        }
        pids
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        let mut dirs = vec![root.join(&self.cgroup)];
        if let Ok(entries) = std::fs::read_dir(root) {
            dirs.extend(entries.flatten().map(|e| e.path().join(&self.cgroup)));
        }
        dirs.retain(|d| d.is_dir());
        dirs
    }

    /// Removes every sandbox (Stop, Remove: their CNI DELs), stops the daemon, kills what is
    /// left in its pods' cgroups and removes them. Safe to call twice.
    pub fn stop(&mut self) {
        let Some(mut proc) = self.proc.take() else { return };
        if let Ok(out) = self.ctr(&["containers", "list", "--quiet"]).output()
            && let Ok(mut cri) = self.cri()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = cri.stop_pod_sandbox(id);
                let _ = cri.remove_pod_sandbox(id);
            }
        }
        proc.terminate(Duration::from_secs(10));
        // The shims outlive the daemon; their command lines name its socket.
        for pid in crate::processes_mentioning(&self.sock.to_string_lossy()) {
            // SAFETY: plain kill(2) of this containerd's shim.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for pid in self.pids() {
            // SAFETY: plain kill(2) of a process in this containerd's pods' cgroups.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = wait_for(Duration::from_secs(5), || self.pids().is_empty().then_some(()));
        for dir in self.cgroup_dirs() {
            remove_cgroup(&dir);
        }
        if !self.had_shim_dir {
            let _ = std::fs::remove_dir_all(SHIM_DIR);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- containerd {} (last 30 lines) -----\n{}", self.host, self.log_tail(30));
        }
        self.stop();
    }
}

/// An OCI image layout (tar) of the pause image: `rootfs` as its one layer, `sleep` forever as
/// its entrypoint, named [`PAUSE`] for `ctr images import`.
fn pause_image(dir: &Path, rootfs: &Path) -> anyhow::Result<PathBuf> {
    let layout = dir.join("pause-oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> anyhow::Result<(String, usize)> {
        let digest = format!("{:x}", Sha256::digest(bytes));
        std::fs::write(blobs.join(&digest), bytes)?;
        Ok((format!("sha256:{digest}"), bytes.len()))
    };
    let (layer, layer_size) = put(&std::fs::read(rootfs)?)?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/sleep", "2147483647"]},
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    });
    let (config, config_size) = put(config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}],
    });
    let (manifest, manifest_size) = put(manifest.to_string().as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": PAUSE, "org.opencontainers.image.ref.name": "1"},
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion": "1.0.0"}"#)?;
    let tar = dir.join("pause.tar");
    sh_result(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&tar).arg("."))?;
    Ok(tar)
}
