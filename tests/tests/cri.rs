//! containerd's CRI drives the overlay through the CNI plugin, as a kubelet would: Debian's
//! containerd 1.6 on two simulated hosts (`tests/src/containerd.rs`), each with its own root,
//! state, sockets and CNI directories, driven by a CRI client (`tests/src/cri.rs`) with
//! RunPodSandbox, PodSandboxStatus, StopPodSandbox and RemovePodSandbox. The daemons start once
//! for the suite and are stopped, with every sandbox, at its end, pass or fail.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use overlay_tests::{
    cluster::Cluster,
    cni,
    containerd::{self, Containerd},
    cri, docker, in_ns,
    peer::{ask, serve},
    processes_mentioning, sh, skip, skip_unless_privileged, try_sh, wait_for,
};

const NET: &str = "pods";

struct Env {
    /// Dropped first: every sandbox removed while the agents still answer DEL.
    runtimes: Vec<Containerd>,
    cluster: Cluster,
}

impl Env {
    fn cri(&self, host: &str) -> cri::Cri {
        let c = self
            .runtimes
            .iter()
            .find(|c| c.host == host)
            .unwrap_or_else(|| panic!("no containerd on {host}"));
        c.cri().unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn cgroup(&self, host: &str) -> String {
        self.runtimes.iter().find(|c| c.host == host).map(|c| c.cgroup.clone()).unwrap_or_default()
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.cluster.keys(prefix)
    }

    fn veths(&self, host: &str) -> Vec<String> {
        let out = sh(&mut in_ns(&self.cluster.topo.host(host).ns, &["ip", "-o", "link", "show"]));
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with("ov"))
            .collect()
    }

    /// The namespace path the overlay holds for container `name` (the pod's sandbox).
    fn netns(&self, name: &str) -> String {
        let out = self.cluster.ok(&["container", "inspect", name]);
        let c: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
        let c = if c.is_array() { c[0].clone() } else { c };
        let key = &c["NetworkSettings"]["SandboxKey"];
        key.as_str().filter(|k| !k.is_empty()).unwrap_or_else(|| panic!("no SandboxKey: {c}")).to_owned()
    }
}

fn pings(netns: &str, to: Ipv4Addr) -> bool {
    try_sh(
        Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["ping", "-c", "1", "-W", "1"])
            .arg(to.to_string()),
    )
    .status
    .success()
}

fn comes_to_ping(netns: &str, to: Ipv4Addr) -> bool {
    wait_for(Duration::from_secs(10), || pings(netns, to).then_some(())).is_some()
}

#[test]
fn cri_suite() {
    if skip_unless_privileged() {
        return;
    }
    if let Some(why) = containerd::missing() {
        skip(&why);
        return;
    }
    let Some(cluster) = Cluster::start_with("cri", 2, 30, |run, host| {
        vec!["--cni-socket".to_owned(), cni::socket(run, host).to_string_lossy().into_owned()]
    }) else {
        return;
    };
    cluster.ok(&["network", "create", "--subnet", "10.0.32.0/24", NET]);
    let run_dir = cluster.topo.run.dir.path().to_owned();
    let had_shims = std::path::Path::new("/run/containerd/s").exists();
    let rootfs =
        docker::busybox_rootfs(&cluster.topo.run).unwrap_or_else(|e| panic!("busybox rootfs: {e:#}"));
    let runtimes = cluster
        .topo
        .hosts
        .iter()
        .map(|h| {
            let socket = cni::socket(&cluster.topo.run, &h.name);
            Containerd::start(&cluster.topo.run, &h.name, &h.ns, NET, &socket, &rootfs)
                .unwrap_or_else(|e| panic!("{e:#}"))
        })
        .collect();
    let env = Env { runtimes, cluster };
    let namespaces = netns_names();

    let mut c1 = env.cri("h1");
    let mut c2 = env.cri("h2");
    let v = c1.version().expect("Version");
    assert_eq!(v.runtime_name, "containerd", "{v:?}");

    // A pod on each host: ready, with the overlay's address, reaching the other across hosts.
    let a = c1
        .run_pod_sandbox(cri::pod("web", "default", "uid-a", &env.cgroup("h1")))
        .expect("RunPodSandbox web");
    let b = c2
        .run_pod_sandbox(cri::pod("web", "other", "uid-b", &env.cgroup("h2")))
        .expect("RunPodSandbox web/other");
    let sa = c1.pod_sandbox_status(&a).expect("status a");
    let sb = c2.pod_sandbox_status(&b).expect("status b");
    assert_eq!((sa.state, sb.state), (0, 0), "not ready: {sa:?} {sb:?}");
    let ip_a: Ipv4Addr = sa.network.as_ref().map(|n| n.ip.parse().expect("ip")).expect("a's address");
    let ip_b: Ipv4Addr = sb.network.as_ref().map(|n| n.ip.parse().expect("ip")).expect("b's address");
    // The same pod name in two namespaces: two containers of the overlay.
    assert_eq!(env.cluster.address(NET, "web.default"), ip_a);
    assert_eq!(env.cluster.address(NET, "web.other"), ip_b);
    let (ns_a, ns_b) = (env.netns("web.default"), env.netns("web.other"));
    assert!(ns_a.contains("/netns/cni-"), "containerd's namespace: {ns_a}");
    assert!(comes_to_ping(&ns_a, ip_b), "pod on h1 does not reach the pod on h2");
    assert!(comes_to_ping(&ns_b, ip_a), "pod on h2 does not reach the pod on h1");
    // A CLI container reaches the pod on the other host.
    env.cluster.ok(&["container", "create", "--host", "h2", "--network", NET, "cli"]);
    assert!(env.cluster.comes_to_reach("h2", "cli", ip_a), "the CLI container does not reach the pod");
    env.cluster.ok(&["container", "rm", "cli"]);

    // A hostPort reaches the plugin in containerd's capitalised spelling and is published on
    // h1's address: h2 reaches the pod through it. Another pod asking for it is refused naming
    // the holder; containerd cleans up, and removing the first pod frees the port.
    let host_port = |name: &str, uid: &str| {
        let mut pod = cri::pod(name, "default", uid, &env.cgroup("h1"));
        pod.port_mappings.push(cri::PortMapping {
            protocol: 0,
            container_port: 80,
            host_port: 18082,
            host_ip: String::new(),
        });
        pod
    };
    let ported = c1.run_pod_sandbox(host_port("ported", "uid-p")).expect("a hostPort pod");
    let ported_ns = env.netns("ported.default");
    let peer =
        serve(ported_ns.rsplit('/').next().expect("netns name"), "ported peer", &["peer", "80", "ported"]);
    let h2 = env.cluster.topo.host("h2").ns.clone();
    let answer = wait_for(Duration::from_secs(10), || ask(&h2, "198.18.0.1:18082", "tcp"));
    assert_eq!(answer.as_deref(), Some("ported 198.18.0.2"), "the hostPort from h2");
    let err = c1.run_pod_sandbox(host_port("second", "uid-s")).expect_err("two pods got hostPort 18082");
    assert!(
        err.message().contains("18082") && err.message().contains("\"ported.default\""),
        "{}",
        err.message()
    );
    drop(peer);
    c1.stop_pod_sandbox(&ported).expect("StopPodSandbox");
    c1.remove_pod_sandbox(&ported).expect("RemovePodSandbox");
    assert!(env.keys("ports/").is_empty(), "the pod's port is left: {:?}", env.keys("ports/"));

    // Stop (CNI DEL), twice, then Remove: the pod leaves the overlay; nothing is left.
    for (c, id) in [(&mut c1, &a), (&mut c2, &b)] {
        c.stop_pod_sandbox(id).expect("StopPodSandbox");
        c.stop_pod_sandbox(id).expect("StopPodSandbox again");
        c.remove_pod_sandbox(id).expect("RemovePodSandbox");
        c.remove_pod_sandbox(id).expect("RemovePodSandbox again");
    }
    for prefix in ["containers/", "endpoints/", "attachments/", "ipam/"] {
        assert!(env.keys(prefix).is_empty(), "{prefix} left: {:?}", env.keys(prefix));
    }
    assert!(env.veths("h1").is_empty() && env.veths("h2").is_empty(), "interfaces left");
    assert!(!std::path::Path::new(&ns_a).exists(), "containerd left {ns_a}");

    // The pod again (a kubelet's next attempt): a new sandbox, on the overlay under the same name.
    let mut again = cri::pod("web", "default", "uid-a", &env.cgroup("h1"));
    again.metadata.as_mut().expect("metadata").attempt = 1;
    let a2 = c1.run_pod_sandbox(again).expect("RunPodSandbox again");
    let ip = c1.pod_sandbox_status(&a2).expect("status").network.map(|n| n.ip).unwrap_or_default();
    assert_eq!(env.cluster.address(NET, "web.default").to_string(), ip);

    drop((c1, c2));
    drop(env);
    let left = wait_for(Duration::from_secs(10), || {
        processes_mentioning(&run_dir.to_string_lossy()).is_empty().then_some(())
    });
    assert!(left.is_some(), "processes left: {:?}", processes_mentioning(&run_dir.to_string_lossy()));
    assert!(!run_dir.exists(), "the run's directory is left");
    let now = netns_names();
    assert!(now.iter().all(|n| namespaces.contains(n)), "namespaces left: {now:?} (before: {namespaces:?})");
    assert!(!std::path::Path::new("/run/containerd/s").exists() || had_shims, "shim sockets left");
}

fn netns_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}
