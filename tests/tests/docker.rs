//! Docker drives the overlay: real dockerd engines (Debian's docker.io), one per simulated host,
//! started once for the whole suite and stopped, with everything they made, at its end.

use std::time::Duration;

use overlay_tests::{
    docker::{self, Dockerd, IMAGE},
    skip, skip_unless_privileged,
    topology::Topology,
    wait_for,
};

/// The hosts and their engines; the engines are dropped (stopped) before the hosts.
struct Env {
    engines: Vec<Dockerd>,
    topo: Topology,
}

impl Env {
    fn start(hosts: usize) -> Self {
        let topo = Topology::new("dk", hosts);
        let rootfs = docker::busybox_rootfs(&topo.run).unwrap_or_else(|e| panic!("busybox rootfs: {e:#}"));
        let engines = topo
            .hosts
            .iter()
            .map(|h| {
                let d = Dockerd::start(&topo.run, &h.name, &h.ns).unwrap_or_else(|e| panic!("{e:#}"));
                d.import_busybox(&rootfs)
                    .unwrap_or_else(|e| panic!("importing busybox on {}: {e:#}", h.name));
                d
            })
            .collect();
        Self { engines, topo }
    }

    fn engine(&self, host: &str) -> &Dockerd {
        self.engines.iter().find(|d| d.host == host).unwrap_or_else(|| panic!("no dockerd on {host}"))
    }
}

/// The processes whose command line mentions `needle`.
fn any_process_mentions(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn docker_engines_per_host() {
    if skip_unless_privileged() {
        return;
    }
    if let Some(why) = docker::missing() {
        skip(&why);
        return;
    }
    // What the machine's own Docker and containerd directories hold before: the engines must
    // leave them as they are (theirs are on a tmpfs over /run in their mount namespaces).
    let machine_dirs = || -> Vec<Option<Vec<std::ffi::OsString>>> {
        ["/run/docker", "/run/containerd"]
            .iter()
            .map(|d| std::fs::read_dir(d).ok().map(|e| e.flatten().map(|e| e.file_name()).collect()))
            .collect()
    };
    let before = machine_dirs();
    let env = Env::start(2);
    let run_dir = env.topo.run.dir.path().to_owned();
    let cgroups: Vec<String> = env.engines.iter().map(|d| d.cgroup.clone()).collect();

    // Each host's engine is its own: its own version answer, image and containers, and the
    // host's namespace as its network (a container on the host network sees eth0 with the
    // host's underlay address).
    for h in ["h1", "h2"] {
        let d = env.engine(h);
        let version =
            d.ok(&["version", "--format", "{{.Server.Version}}"]).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(version.starts_with("20.10"), "{h}: server version {version}");
        d.ok(&["run", "--rm", "--network", "none", IMAGE, "true"]).unwrap_or_else(|e| panic!("{e:#}"));
        let addr = d
            .ok(&["run", "--rm", "--network", "host", IMAGE, "ip", "-4", "addr", "show", "eth0"])
            .unwrap_or_else(|e| panic!("{e:#}"));
        let vtep = env.topo.host(h).vtep.to_string();
        assert!(addr.contains(&format!("inet {vtep}/")), "{h}'s container on the host network: {addr}");
    }
    // A container left running, so the teardown has one to remove.
    env.engine("h1")
        .ok(&["run", "-d", "--network", "none", IMAGE, "sleep", "600"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let h1 = env.engine("h1");
    assert_eq!(h1.container_pids().len(), 1, "the running container's process, by its cgroup");
    assert_eq!(machine_dirs(), before, "the machine's /run/docker or /run/containerd changed");

    drop(env);
    // Gone: the daemons, their containerd and shims, the containers' processes and cgroups,
    // the run's files.
    let left = wait_for(Duration::from_secs(10), || {
        let procs = any_process_mentions(&run_dir.to_string_lossy());
        procs.is_empty().then_some(())
    });
    assert!(left.is_some(), "processes left: {:#?}", any_process_mentions(&run_dir.to_string_lossy()));
    for cg in cgroups {
        let leftovers: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
            .expect("cgroups")
            .flatten()
            .map(|e| e.path().join(&cg))
            .filter(|p| p.exists())
            .collect();
        assert!(leftovers.is_empty(), "cgroups left: {leftovers:?}");
    }
    assert!(!run_dir.exists(), "the run's directory is left");
}
