//! Podman drives the overlay through the CNI plugin: Debian's podman 4.3 with its CNI backend on
//! two simulated hosts (`tests/src/podman.rs`: its own roots, configuration and CNI directories,
//! in the host's namespace), each host's conflist naming its agent's `--cni-socket`. Podman has
//! no daemon to start; everything it ran is removed at the end, pass or fail.

use std::{net::Ipv4Addr, time::Duration};

use overlay_tests::{
    binary,
    cluster::Cluster,
    cni, docker, in_ns,
    peer::ask,
    podman::{self, IMAGE, Podman},
    sh, skip, skip_unless_privileged, subnet_route, try_sh, wait_for,
};

const NET: &str = "pods";

struct Env {
    /// Dropped first: every container removed while the agents still answer DEL.
    engines: Vec<Podman>,
    cluster: Cluster,
}

impl Env {
    fn podman(&self, host: &str) -> &Podman {
        self.engines.iter().find(|p| p.host == host).unwrap_or_else(|| panic!("no podman on {host}"))
    }

    fn ok(&self, host: &str, args: &[&str]) -> String {
        self.podman(host).ok(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn ip(&self, host: &str, container: &str) -> Ipv4Addr {
        let f = format!("{{{{(index .NetworkSettings.Networks \"{NET}\").IPAddress}}}}");
        let out = self.ok(host, &["inspect", "-f", &f, container]);
        out.trim().parse().unwrap_or_else(|e| panic!("{container}'s address: {out:?}: {e}"))
    }

    fn pings(&self, host: &str, container: &str, to: Ipv4Addr) -> bool {
        let out = try_sh(
            self.podman(host)
                .podman()
                .args(["exec", container, "ping", "-c", "1", "-W", "1"])
                .arg(to.to_string()),
        );
        out.status.success()
    }

    fn comes_to_ping(&self, host: &str, container: &str, to: Ipv4Addr) -> bool {
        wait_for(Duration::from_secs(10), || self.pings(host, container, to).then_some(())).is_some()
    }

    fn veths(&self, host: &str) -> Vec<String> {
        let out = sh(&mut in_ns(&self.cluster.topo.host(host).ns, &["ip", "-o", "link", "show"]));
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with("ov"))
            .collect()
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.cluster.keys(prefix)
    }
}

/// The processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
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

fn netns_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn podman_suite() {
    if skip_unless_privileged() {
        return;
    }
    let no_busybox = || {
        (!std::path::Path::new(docker::BUSYBOX).exists())
            .then(|| format!("no {} (install busybox-static, or run ./setup)", docker::BUSYBOX))
    };
    if let Some(why) = podman::missing().or_else(no_busybox) {
        skip(&why);
        return;
    }
    let Some(cluster) = Cluster::start_with("pm", 2, 30, |run, host| {
        vec!["--cni-socket".to_owned(), cni::socket(run, host).to_string_lossy().into_owned()]
    }) else {
        return;
    };
    cluster.ok(&["network", "create", "--subnet", "10.0.31.0/24", NET]);
    let run_dir = cluster.topo.run.dir.path().to_owned();
    // containers/image keeps a blob-info cache here whatever podman's roots are (`podman
    // import` writes it); the suite removes it afterwards if it made it.
    let image_cache = std::path::Path::new("/var/lib/containers");
    let had_image_cache = image_cache.exists();
    let rootfs =
        docker::busybox_rootfs(&cluster.topo.run).unwrap_or_else(|e| panic!("busybox rootfs: {e:#}"));
    let engines = cluster
        .topo
        .hosts
        .iter()
        .map(|h| {
            let p =
                Podman::new(&cluster.topo.run, &h.name, &h.ns, NET, &cni::socket(&cluster.topo.run, &h.name))
                    .unwrap_or_else(|e| panic!("{e:#}"));
            p.import_busybox(&rootfs).unwrap_or_else(|e| panic!("{e:#}"));
            p
        })
        .collect();
    let env = Env { engines, cluster };
    let namespaces = netns_names();

    // A container on each host, on the overlay network, reaching the other across hosts.
    for (host, name) in [("h1", "pa"), ("h2", "pb")] {
        env.ok(host, &["run", "-d", "--name", name, "--network", NET, IMAGE, "sleep", "600"]);
    }
    let (a, b) = (env.ip("h1", "pa"), env.ip("h2", "pb"));
    assert!(env.comes_to_ping("h1", "pa", b), "pa on h1 does not reach pb ({b}) on h2");
    assert!(env.comes_to_ping("h2", "pb", a), "pb on h2 does not reach pa ({a}) on h1");
    // Podman's container name is the overlay container's (K8S_POD_NAME without a namespace).
    assert_eq!(env.cluster.address(NET, "pa"), a);
    let route = env.ok("h1", &["exec", "pa", "ip", "route"]);
    assert!(route.contains("default via 10.0.31.1 dev eth0"), "{route}");
    let link = env.ok("h1", &["exec", "pa", "ip", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1500"), "the uplink's MTU, for the way out: {link}");
    // busybox's `ip route` leaves metrics out: the route's MTU read from the host.
    let sandbox = env.ok("h1", &["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", "pa"]);
    assert_eq!(subnet_route(sandbox.trim(), "eth0").2, Some(1450), "the overlay's MTU, on the route to it");
    // A CLI container on h2 reaches the podman container on h1, and back.
    env.cluster.ok(&["container", "create", "--host", "h2", "--network", NET, "cli"]);
    let cli = env.cluster.address(NET, "cli");
    assert!(env.comes_to_ping("h1", "pa", cli), "pa does not reach the CLI container");
    assert!(env.cluster.comes_to_reach("h2", "cli", a), "the CLI container does not reach pa");
    env.cluster.ok(&["container", "rm", "cli"]);

    // `-p` reaches the plugin in podman's lowercase spelling and publishes the port on h1's
    // address: h2 reaches the container through it, and the container sees h2's own address.
    let probe = format!("{}:/probe:ro", binary("overlay-probe").display());
    let mounts = ["-v", &probe, "-v", "/usr/lib:/lib:ro", "-v", "/usr/lib64:/lib64:ro"];
    let mut args = vec!["run", "-d", "--name", "pp", "-p", "18081:80", "--network", NET];
    args.extend(mounts);
    args.extend([IMAGE, "/probe", "peer", "80", "pp"]);
    env.ok("h1", &args);
    let h2 = env.cluster.topo.host("h2").ns.clone();
    let answer = wait_for(Duration::from_secs(10), || ask(&h2, "198.18.0.1:18081", "tcp"));
    assert_eq!(answer.as_deref(), Some("pp 198.18.0.2"), "the published port from h2");
    // The same host port for another container: refused naming the holder, nothing left of it.
    let out = try_sh(env.podman("h1").podman().args([
        "run",
        "-d",
        "--name",
        "pq",
        "-p",
        "18081:80",
        "--network",
        NET,
        IMAGE,
        "sleep",
        "600",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second podman run -p 18081 passed");
    assert!(err.contains("18081") && err.contains("\"pp\""), "{err}");
    let _ = try_sh(env.podman("h1").podman().args(["rm", "-f", "pq"]));
    assert!(!env.keys("containers/").iter().any(|k| k.ends_with("/pq")), "the refused container was written");
    env.ok("h1", &["rm", "-f", "-t", "0", "pp"]);
    assert!(env.keys("ports/").is_empty(), "podman rm left its port: {:?}", env.keys("ports/"));

    // podman rm: CNI DEL for each; nothing is left in etcd or on the hosts.
    env.ok("h1", &["rm", "-f", "-t", "0", "pa"]);
    env.ok("h2", &["rm", "-f", "-t", "0", "pb"]);
    for prefix in ["containers/", "endpoints/", "attachments/", "ipam/"] {
        assert!(env.keys(prefix).is_empty(), "{prefix} left: {:?}", env.keys(prefix));
    }
    assert!(env.veths("h1").is_empty() && env.veths("h2").is_empty(), "interfaces left");

    // Again after rm: the same name works (the old sandbox is gone).
    env.ok("h1", &["run", "-d", "--name", "pa", "--network", NET, IMAGE, "sleep", "600"]);
    let again = env.ip("h1", "pa");
    assert_eq!(env.cluster.address(NET, "pa"), again);
    assert!(env.cluster.maps_hold("h1", again), "h1's maps do not hold the new pa");

    drop(env);
    // Gone: every container's process and conmon, the namespaces podman made, the run's files.
    let left = wait_for(Duration::from_secs(10), || {
        processes_mentioning(&run_dir.to_string_lossy()).is_empty().then_some(())
    });
    assert!(left.is_some(), "processes left: {:#?}", processes_mentioning(&run_dir.to_string_lossy()));
    let now = netns_names();
    assert!(now.iter().all(|n| namespaces.contains(n)), "namespaces left: {now:?} (before: {namespaces:?})");
    assert!(!run_dir.exists(), "the run's directory is left");
    if !had_image_cache {
        std::fs::remove_dir_all(image_cache).expect("removing podman's blob-info cache");
    }
}
