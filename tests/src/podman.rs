//! Podman (Debian's 4.3, CNI backend) on a simulated host: every `podman` command runs in the
//! host's network namespace (`nsenter --net`, not `ip netns exec`, whose fresh /sys lacks the
//! cgroup hierarchies) with a root, run root, tmp dir, events log, containers.conf and CNI
//! config and plugin directories of its own under the run's directory, so it touches neither the
//! machine's podman state nor another host's. Its CNI plugin directory holds `overlay-cni` only,
//! and its network directory one conflist naming the host's agent socket.
//!
//! containers.conf sets the ulimits podman would otherwise copy from its own: root here lacks
//! CAP_SYS_RESOURCE, so raising a container's limits fails (../shared/runtimes/RECIPES.md).
//! Podman has no daemon: `Podman::stop` (also on drop) removes every container it ran, whose
//! conmon and processes go with them.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{Run, binary, sh_result, try_sh};

pub const PODMAN: &str = "/usr/bin/podman";
/// The image made from busybox-static (`podman import`).
pub const IMAGE: &str = "localhost/overlay-test-busybox:1";

/// Why podman cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    (!Path::new(PODMAN).exists()).then(|| format!("no {PODMAN} (install podman, or run ./setup)"))
}

/// One host's podman.
pub struct Podman {
    pub host: String,
    /// The host's network namespace, by name.
    pub ns: String,
    pub dir: PathBuf,
}

impl Podman {
    /// Sets up podman for `host` (namespace `ns`): its directories, containers.conf, the CNI
    /// plugin and a conflist for `network` whose plugin talks to `socket`.
    pub fn new(run: &Run, host: &str, ns: &str, network: &str, socket: &Path) -> anyhow::Result<Self> {
        let dir = run.path(&format!("podman-{host}"));
        let (bin, netd) = (dir.join("cni-bin"), dir.join("net.d"));
        for d in [&bin, &netd, &dir.join("tmp")] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::copy(binary("overlay-cni"), bin.join("overlay-cni")).context("installing overlay-cni")?;
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            // The capability makes podman pass `-p` on (in its lowercase spelling), for the
            // plugin to refuse rather than have podman drop it silently.
            "plugins": [{"type": "overlay-cni", "agentSocket": socket, "capabilities": {"portMappings": true}}],
        });
        std::fs::write(netd.join(format!("50-{network}.conflist")), conflist.to_string())?;
        let conf = format!(
            r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}"]
network_config_dir = "{netd}"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{events}"
tmp_dir = "{tmp}"
runtime = "runc"
"#,
            bin = bin.display(),
            netd = netd.display(),
            events = dir.join("events.log").display(),
            tmp = dir.join("tmp").display(),
        );
        std::fs::write(dir.join("containers.conf"), conf)?;
        // Its own (empty) registries and storage configuration: the machine's are not ours.
        std::fs::write(dir.join("registries.conf"), "unqualified-search-registries = []\n")?;
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            dir.join("root").display(),
            dir.join("runroot").display()
        );
        std::fs::write(dir.join("storage.conf"), storage)?;
        Ok(Self { host: host.to_owned(), ns: ns.to_owned(), dir })
    }

    /// `podman` with this host's roots and configuration, in the host's namespace.
    pub fn podman(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(PODMAN)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            // Not the machine's registries or storage configuration.
            .env("CONTAINERS_REGISTRIES_CONF", self.dir.join("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"));
        cmd
    }

    /// `podman <args>`, which must succeed: its stdout.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        sh_result(self.podman().args(args)).with_context(|| format!("podman {args:?} on {}", self.host))
    }

    /// Imports the busybox root filesystem (`docker::busybox_rootfs`) as [`IMAGE`].
    pub fn import_busybox(&self, rootfs: &Path) -> anyhow::Result<()> {
        self.ok(&["import", &rootfs.to_string_lossy(), IMAGE]).map(drop)
    }

    /// Removes every container this podman ran (their processes, conmon and namespaces go with
    /// them).
    pub fn stop(&self) {
        let _ = try_sh(self.podman().args(["rm", "--all", "--force", "--time", "0"]));
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        self.stop();
    }
}
