//! End to end through the control plane: a real etcd, an agent per host following it, and the
//! `overlay` CLI run on a host the way a person drives `docker network`.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use overlay_agent::{
    netlink::netns::NetnsGuard,
    store::{ContainerSpec, ContainerStatus, EndpointStatus, Store, StoreConfig},
};
use overlay_tests::{
    cluster::{Cluster, HEALTH_ADDR},
    in_ns, ip, ip_in, link_mtu, skip_unless_privileged, subnet_route, try_sh, wait_for,
};

const PROBE: &str = env!("CARGO_BIN_EXE_overlay-probe");

fn reaches(c: &Cluster, host: &str, name: &str, ip: Ipv4Addr) -> bool {
    c.reaches(host, name, ip)
}

fn comes_to_reach(c: &Cluster, host: &str, name: &str, ip: Ipv4Addr) -> bool {
    c.comes_to_reach(host, name, ip)
}

fn interfaces(c: &Cluster, host: &str, name: &str) -> String {
    String::from_utf8_lossy(
        &try_sh(&mut in_ns(&c.container_ns(host, name), &["ip", "-o", "-4", "addr"])).stdout,
    )
    .into_owned()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

type Statuses = (BTreeMap<String, EndpointStatus>, BTreeMap<String, ContainerStatus>);

/// Runs `f` on a store connected the way the CLI connects, from h1 (etcd is on the underlay,
/// which only the hosts reach).
fn on_h1<T: Send + 'static, F: Future<Output = T>>(
    c: &Cluster,
    f: impl FnOnce(Store) -> F + Send + 'static,
) -> T {
    let h1 = Path::new("/run/netns").join(&c.topo.host("h1").ns);
    let url = c.url.clone();
    // A thread of its own enters h1's namespace; the test's threads stay put.
    std::thread::spawn(move || {
        let _in_h1 = NetnsGuard::enter_path(&h1).expect("entering h1");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let store = Store::connect(&StoreConfig::new([url])).await.expect("connect");
            f(store).await
        })
    })
    .join()
    .expect("reading the store")
}

/// Every status the agents reported, read from etcd the way the CLI reads it.
fn statuses(c: &Cluster) -> Statuses {
    on_h1(c, |store| async move { store.statuses().await.expect("statuses") })
}

/// Every key under the store's prefix, with its value and lease.
fn dump(c: &Cluster) -> BTreeMap<String, (String, i64)> {
    on_h1(c, |store| async move { store.dump().await.expect("dump") })
}

/// The body of `host`'s /healthz.
fn health(c: &Cluster, host: &str) -> serde_json::Value {
    let out =
        try_sh(&mut in_ns(&c.topo.host(host).ns, &["curl", "-s", &format!("http://{HEALTH_ADDR}/healthz")]));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{host}'s /healthz: {e}"))
}

#[test]
fn the_cli_drives_networks_containers_and_connections() {
    if skip_unless_privileged() {
        return;
    }
    let Some(c) = Cluster::start("cli", 3, 10) else { return };
    c.ok(&["network", "create", "--subnet", "10.30.0.0/24", "blue"]);
    c.ok(&[
        "network",
        "create",
        "-d",
        "overlay",
        "--subnet",
        "10.40.0.0/24",
        "--ip-range",
        "10.40.0.128/25",
        "--gateway",
        "10.40.0.1",
        "--aux-address",
        "router=10.40.0.128",
        "-o",
        "mtu=1400",
        "red",
    ]);
    let ls = c.ok(&["network", "ls"]);
    assert!(ls.contains("blue") && ls.contains("red"), "{ls}");

    // The CLI returns once the container's host made it real.
    c.ok(&["container", "create", "--host", "h1", "--network", "blue", "c1"]);
    c.ok(&["container", "create", "--host", "h2", "--network", "blue", "c2"]);
    c.ok(&["container", "create", "--host", "h3", "--network", "red", "c3"]);
    let (c1, c2, c3) = (c.address("blue", "c1"), c.address("blue", "c2"), c.address("red", "c3"));
    assert!(interfaces(&c, "h1", "c1").contains(&format!("{c1}/24")), "c1 has its address");
    // IPAM honours the ip-range and never hands out the auxiliary address.
    assert!(c3.octets()[3] > 128, "red hands out from 10.40.0.128/25, got {c3}");
    // -o mtu=1400 is below what the uplink allows (1450), so the container's overlay traffic
    // gets 1400 (the route to its subnet); its way out through the host gets the uplink's 1500.
    let c3_ns = c.container_ns("h3", "c3");
    assert_eq!(subnet_route(&c3_ns, "eth0").2, Some(1400), "c3's route to red");
    assert_eq!(link_mtu(&c3_ns, "eth0"), 1500, "c3's eth0");

    // `network inspect` looks like Docker's.
    let blue = c.inspect("blue");
    assert_eq!(blue["Name"], "blue");
    assert_eq!(blue["Driver"], "overlay");
    assert_eq!(blue["Scope"], "global");
    assert_eq!(blue["Id"].as_str().map(str::len), Some(64));
    assert_eq!(blue["IPAM"]["Config"][0]["Subnet"], "10.30.0.0/24");
    let containers = blue["Containers"].as_object().expect("Containers");
    assert_eq!(containers.len(), 2, "{blue}");
    for entry in containers.values() {
        let ip: Ipv4Addr = entry["IPv4Address"].as_str().unwrap().split('/').next().unwrap().parse().unwrap();
        let o = ip.octets();
        assert_eq!(entry["MacAddress"], format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]));
        assert_eq!(entry["EndpointID"].as_str().map(str::len), Some(64));
    }

    // Reachable across hosts on the same network, isolated across networks.
    assert!(comes_to_reach(&c, "h1", "c1", c2), "c1 -> c2");
    assert!(reaches(&c, "h2", "c2", c1), "c2 -> c1");
    assert!(!reaches(&c, "h1", "c1", c3), "c1 (blue) reached c3 (red)");
    // `container exec` runs a command in the container, from the container's host.
    let exec =
        c.cli_on("h2", &["container", "exec", "c2", "--", "ping", "-c", "1", "-W", "1", &c1.to_string()]);
    assert!(exec.status.success(), "container exec: {}", String::from_utf8_lossy(&exec.stderr));

    // Connect at runtime: c1 gets a second interface, on red, and reaches c3 through it.
    c.ok(&["network", "connect", "red", "c1"]);
    let c1_red = c.address("red", "c1");
    let ifs = interfaces(&c, "h1", "c1");
    assert!(ifs.contains("eth1") && ifs.contains(&c1_red.to_string()), "c1 after connect: {ifs}");
    assert!(comes_to_reach(&c, "h1", "c1", c3), "c1 -> c3 once connected to red");
    assert!(!reaches(&c, "h2", "c2", c3), "c2 is still only on blue");
    // Disconnect: the interface goes, and with it the path.
    c.ok(&["network", "disconnect", "red", "c1"]);
    assert!(!interfaces(&c, "h1", "c1").contains("eth1"), "eth1 removed on disconnect");
    assert!(!reaches(&c, "h1", "c1", c3), "c1 still reaches red after disconnect");
    assert!(reaches(&c, "h1", "c1", c2), "c1 lost blue when leaving red");

    // A network with endpoints cannot go; the error names what holds it.
    let err = c.refused(&["network", "rm", "blue"]);
    assert!(err.contains("c1") || err.contains("endpoint"), "{err}");

    // Removing a container takes its sandbox away on its host.
    let c2_ns = c.container_ns("h2", "c2");
    assert!(netns_exists(&c2_ns));
    c.ok(&["container", "rm", "c2"]);
    assert!(!netns_exists(&c2_ns), "c2's namespace is gone");
    assert!(
        wait_for(Duration::from_secs(5), || (!c.maps_hold("h1", c2)).then_some(())).is_some(),
        "h1 still maps c2"
    );
    c.ok(&["container", "rm", "c1", "c3"]);
    c.ok(&["network", "rm", "blue", "red"]);
    assert!(!c.ok(&["network", "ls"]).contains("blue"));

    // Each agent answers its health endpoint.
    for h in &c.topo.hosts {
        let out = try_sh(&mut in_ns(&h.ns, &["curl", "-sf", &format!("http://{HEALTH_ADDR}/healthz")]));
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && body.contains("\"ready\":true"), "{}: /healthz: {body}", h.name);
        // Its log, written to a file, is plain text: no terminal colour codes.
        let log = std::fs::read_to_string(&h.log).expect("agent log");
        assert!(
            log.contains("full reconcile done") && !log.contains('\u{1b}'),
            "{}'s log has escape codes",
            h.name
        );
    }
    // `overlay-agent stats` pointed at the wrong pin directory says which one it tried.
    let stats = try_sh(std::process::Command::new(overlay_tests::binary("overlay-agent")).args([
        "stats",
        "--pin-dir",
        "/sys/fs/bpf/no-such-overlay-host",
    ]));
    let err = String::from_utf8_lossy(&stats.stderr);
    assert!(!stats.status.success() && err.contains("/sys/fs/bpf/no-such-overlay-host"), "{err}");
}

/// Sixteen containers created at once, from CLIs on three hosts: sixteen distinct addresses,
/// all reachable.
#[test]
fn sixteen_concurrent_allocations_from_three_hosts_get_distinct_addresses() {
    if skip_unless_privileged() {
        return;
    }
    let Some(c) = Cluster::start("alloc", 3, 10) else { return };
    c.ok(&["network", "create", "--subnet", "10.50.0.0/24", "green"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "green", "c0"]);
    let mut running: Vec<(String, Child)> = Vec::new();
    let overlay = overlay_tests::binary("overlay");
    for i in 1..=16 {
        let (cli_host, target) = (format!("h{}", i % 3 + 1), format!("h{}", (i + 1) % 3 + 1));
        let name = format!("c{i}");
        let child = in_ns(
            &c.topo.host(&cli_host).ns,
            &[
                overlay.to_str().unwrap(),
                "--etcd-endpoints",
                &c.url,
                "container",
                "create",
                "--host",
                &target,
                "--network",
                "green",
                &name,
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cli");
        running.push((name, child));
    }
    for (name, child) in running {
        let out = child.wait_with_output().expect("cli");
        assert!(out.status.success(), "creating {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let green = c.inspect("green");
    let addresses: BTreeSet<String> = green["Containers"]
        .as_object()
        .expect("Containers")
        .values()
        .map(|e| e["IPv4Address"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(addresses.len(), 17, "17 containers, 17 distinct addresses: {addresses:?}");
    for i in 1..=16 {
        let ip = c.address("green", &format!("c{i}"));
        assert!(comes_to_reach(&c, "h1", "c0", ip), "c0 -> c{i} ({ip})");
    }
}

/// An agent killed while the desired state changes catches up when it comes back: what was
/// created meanwhile appears, what was removed goes, and a veth deleted by hand is remade.
#[test]
fn an_agent_killed_while_state_changes_converges_when_restarted() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut c) = Cluster::start("conv", 2, 15) else { return };
    c.ok(&["network", "create", "--subnet", "10.60.0.0/24", "net"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "net", "a"]);
    c.ok(&["container", "create", "--host", "h2", "--network", "net", "b"]);
    let b = c.address("net", "b");
    let b_ns = c.container_ns("h2", "b");

    c.kill_agent("h2");
    // While h2's agent is down: nobody can make these real on h2, so do not wait for it.
    c.ok(&["--timeout", "0", "container", "create", "--host", "h2", "--network", "net", "d"]);
    c.ok(&["--timeout", "0", "container", "rm", "b"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "net", "e"]);
    let (a, d, e) = (c.address("net", "a"), c.address("net", "d"), c.address("net", "e"));
    assert!(netns_exists(&b_ns), "nothing removes b while its agent is down");

    c.start_agent("h2");
    assert!(
        wait_for(Duration::from_secs(20), || netns_exists(&c.container_ns("h2", "d")).then_some(()))
            .is_some(),
        "d was never created"
    );
    assert!(
        wait_for(Duration::from_secs(20), || (!netns_exists(&b_ns)).then_some(())).is_some(),
        "b was never removed"
    );
    assert!(comes_to_reach(&c, "h2", "d", a), "d -> a");
    assert!(comes_to_reach(&c, "h2", "d", e), "d -> e (created while h2 was down)");
    // b's address went back to the pool; e may have been given it. Either way, no map may
    // still send it to b: on h1 it is e's (local) or nothing, on h2 it is e's (behind h1) or
    // nothing.
    let h1_vtep: Vec<serde_json::Value> =
        c.topo.host("h1").vtep.octets().iter().map(|o| serde_json::json!(o)).collect();
    match (e == b, c.map_entry("h2", b)) {
        (true, Some(v)) => assert!(
            v["flags"] == 0 && v["vtep"].as_array() == Some(&h1_vtep),
            "h2 maps b's old address to {v}"
        ),
        (false, Some(v)) => panic!("h2 still maps b: {v}"),
        (_, None) => assert!(e != b, "h2 lost e, which has b's old address"),
    }
    if e != b {
        assert!(!c.maps_hold("h1", b), "h1 still maps b");
    }

    // Drift: the container's interface deleted behind the agent's back comes back at the next
    // resync (every 5 s here).
    let veth = try_sh(&mut in_ns(&c.topo.host("h2").ns, &["ip", "-o", "link", "show", "type", "veth"]));
    let veths = String::from_utf8_lossy(&veth.stdout).into_owned();
    let victim = veths
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .find(|n| n.starts_with("ov"))
        .expect("an endpoint veth");
    let victim = victim.split('@').next().unwrap().to_owned();
    try_sh(&mut in_ns(&c.topo.host("h2").ns, &["ip", "link", "del", &victim]));
    assert!(!reaches(&c, "h2", "d", a), "d still reaches a without its interface");
    assert!(
        wait_for(Duration::from_secs(20), || reaches(&c, "h2", "d", a).then_some(())).is_some(),
        "the deleted interface was not remade"
    );
    let _ = d;
}

/// A host whose agent dies disappears from every other host's maps once its liveness lease runs
/// out, and comes back when its agent does; nothing of it is deleted meanwhile.
#[test]
fn a_dead_hosts_endpoints_leave_the_maps_when_its_lease_expires_and_return_with_it() {
    if skip_unless_privileged() {
        return;
    }
    let ttl = 3;
    let Some(mut c) = Cluster::start("lease", 3, ttl) else { return };
    c.ok(&["network", "create", "--subnet", "10.70.0.0/24", "net"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "net", "a"]);
    c.ok(&["container", "create", "--host", "h2", "--network", "net", "b"]);
    c.ok(&["container", "create", "--host", "h3", "--network", "net", "z"]);
    let z = c.address("net", "z");
    let h3 = c.topo.host("h3").vtep;
    for host in ["h1", "h2"] {
        assert!(
            wait_for(Duration::from_secs(5), || c.maps_hold(host, z).then_some(())).is_some(),
            "{host} maps z"
        );
        assert!(c.peers_hold(host, h3), "{host} has h3 as a peer");
    }
    assert!(comes_to_reach(&c, "h1", "a", z));

    c.kill_agent("h3");
    let killed = Instant::now();
    for host in ["h1", "h2"] {
        let gone = wait_for(Duration::from_secs(ttl + 10), || {
            (!c.maps_hold(host, z) && !c.peers_hold(host, h3)).then_some(())
        });
        assert!(gone.is_some(), "{host} still maps the dead host's endpoint or VTEP");
    }
    // Not before the lease could have run out: a live host is never dropped early.
    assert!(killed.elapsed() >= Duration::from_secs(ttl - 1), "removed after {:?}", killed.elapsed());
    let state = c.host_state("h3").expect("h3 stays registered");
    assert!(state.starts_with("down (records removed in"), "{state}");
    assert!(!reaches(&c, "h1", "a", z));
    // Its records stay: z is still a container on h3 with its address.
    assert!(c.ok(&["container", "ls"]).lines().any(|l| l.starts_with("z ") && l.contains(&z.to_string())));
    let refusal = c.refused(&["host", "rm", "h2"]);
    assert!(refusal.contains("host \"h2\" is alive"), "{refusal}");

    // The agent comes back: h3 is alive again and z is reachable, nothing recreated.
    c.start_agent("h3");
    assert!(c.wait_registered("h3"));
    for host in ["h1", "h2"] {
        assert!(
            wait_for(Duration::from_secs(5), || c.maps_hold(host, z).then_some(())).is_some(),
            "{host} maps z again"
        );
    }
    assert!(comes_to_reach(&c, "h1", "a", z), "a -> z after h3 came back");
}

/// etcd going away and coming back breaks no packet path, and changes made afterwards arrive.
#[test]
fn an_etcd_outage_keeps_traffic_flowing_and_later_changes_arrive() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut c) = Cluster::start("outage", 3, 15) else { return };
    c.ok(&["network", "create", "--subnet", "10.80.0.0/24", "net"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "net", "a"]);
    c.ok(&["container", "create", "--host", "h2", "--network", "net", "b"]);
    let b = c.address("net", "b");
    let server = overlay_tests::Proc::spawn(
        "echo server in b",
        in_ns(&c.container_ns("h2", "b"), &[PROBE, "serve", "7000"]).stdout(Stdio::null()),
    );
    c.topo.run.procs.push(server);
    assert!(
        wait_for(Duration::from_secs(5), || try_sh(&mut in_ns(
            &c.container_ns("h1", "a"),
            &[PROBE, "tcp", &format!("{b}:7000")]
        ))
        .status
        .success()
        .then_some(()))
        .is_some()
    );
    let session = in_ns(&c.container_ns("h1", "a"), &[PROBE, "session", &format!("{b}:7000"), "6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("session");

    std::thread::sleep(Duration::from_secs(1));
    c.etcd.stop();
    std::thread::sleep(Duration::from_secs(3));
    c.etcd.restart().expect("etcd restart");

    let out = session.wait_with_output().expect("session");
    assert!(
        out.status.success(),
        "the connection broke during the outage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let gap: u64 = report.split_whitespace().nth(1).and_then(|g| g.parse().ok()).expect("gap");
    assert!(gap < 500, "traffic paused {gap} ms during the etcd outage");

    // The agents resumed their watches: a change made now reaches every host.
    c.ok(&["container", "create", "--host", "h3", "--network", "net", "late"]);
    let late = c.address("net", "late");
    assert!(comes_to_reach(&c, "h1", "a", late), "a -> late (created after the outage)");
    assert!(comes_to_reach(&c, "h2", "b", late), "b -> late");
}

#[test]
fn an_mtu_an_uplink_cannot_carry_is_refused_or_clamped_with_a_warning() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut c) = Cluster::start("mtu", 2, 15) else { return };
    // Both uplinks carry 1500 bytes, so 1450 inside VXLAN.
    let err = c.refused(&["network", "create", "--subnet", "10.70.0.0/24", "-o", "mtu=1451", "big"]);
    assert!(
        err.contains("MTU 1451 is more than host \"h1\" can carry: its uplink's MTU 1500 leaves 1450"),
        "{err}"
    );
    c.ok(&["network", "create", "--subnet", "10.70.0.0/24", "-o", "mtu=1450", "big"]);

    // h2's uplink shrinks after the network was made, and its agent starts again with it.
    c.kill_agent("h2");
    let h2 = c.topo.host("h2");
    ip_in(&h2.ns, &["link", "set", &h2.uplink, "mtu", "1400"]).expect("lowering h2's uplink MTU");
    c.start_agent("h2");
    c.ok(&["container", "create", "--host", "h2", "--network", "big", "a"]);
    let a_ns = c.container_ns("h2", "a");
    assert_eq!(
        subnet_route(&a_ns, "eth0").2,
        Some(1350),
        "a's overlay traffic gets what h2's uplink carries"
    );
    assert_eq!(link_mtu(&a_ns, "eth0"), 1400, "a's traffic out through h2 gets the uplink's MTU");
    assert!(c.topo.wait_log("h2", "clamped", Duration::from_secs(5)), "h2's agent says it clamped the MTU");
    let log = std::fs::read_to_string(&c.topo.host("h2").log).expect("h2's log");
    let line = log.lines().find(|l| l.contains("clamped")).expect("the clamp's line");
    assert!(line.contains("1450") && line.contains("1350"), "the warning names both MTUs: {line}");
}

/// A container in a namespace another runtime made (`--netns`): the agent puts its endpoint in
/// that namespace, and `container rm` takes the endpoint out again and reports the container
/// gone at once, leaving the namespace (not the agent's) in place.
#[test]
fn a_container_in_a_foreign_namespace_is_removed_but_its_namespace_stays() {
    if skip_unless_privileged() {
        return;
    }
    let Some(c) = Cluster::start("netns", 2, 15) else { return };
    // The other runtime's namespace, named after the run so the run's cleanup removes it.
    let foreign = c.topo.run.ns("foreign");
    ip(&["netns", "add", &foreign]).expect("creating the foreign namespace");
    let path = Path::new("/run/netns").join(&foreign);
    c.ok(&["network", "create", "--subnet", "10.90.0.0/24", "net"]);
    c.ok(&["container", "create", "--host", "h2", "--network", "net", "b"]);
    c.ok(&[
        "container",
        "create",
        "--host",
        "h1",
        "--netns",
        path.to_str().unwrap(),
        "--network",
        "net",
        "f",
    ]);
    let b = c.address("net", "b");
    let eth0 = || try_sh(&mut in_ns(&foreign, &["ip", "-o", "link", "show", "eth0"])).status.success();
    assert!(eth0(), "f's endpoint is in the foreign namespace");
    let reached = wait_for(Duration::from_secs(10), || {
        try_sh(&mut in_ns(&foreign, &["ping", "-c", "1", "-W", "1", &b.to_string()]))
            .status
            .success()
            .then_some(())
    });
    assert!(reached.is_some(), "f (h1, foreign namespace) -> b (h2)");
    let (eps, ctrs) = statuses(&c);
    assert!(ctrs.contains_key("f") && eps.values().any(|s| s.container == "f"), "f reported ready");

    // The CLI waits up to 30 s for the host to report the container gone.
    let started = Instant::now();
    c.ok(&["container", "rm", "f"]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "container rm took {took:?}");
    assert!(!eth0(), "f's endpoint is still in the foreign namespace");
    assert!(netns_exists(&foreign), "the foreign namespace was removed with the container");
    let (eps, ctrs) = statuses(&c);
    assert_eq!(ctrs.keys().collect::<Vec<_>>(), ["b"], "container statuses left: {ctrs:?}");
    assert!(eps.values().all(|s| s.container == "b"), "endpoint statuses left: {eps:?}");
    // b is untouched.
    assert!(ip_in(&c.container_ns("h2", "b"), &["link", "show", "eth0"]).is_ok(), "b keeps its endpoint");
}

/// A path to the machine's initial network namespace that the CLI (root, in h1's namespace)
/// can open: init's, or else this test's own if it runs in the initial one, as the kernel's
/// fixed inode number for it says (some sandboxes deny even root access to init's).
fn initial_netns_path() -> Option<String> {
    if std::fs::File::open("/proc/1/ns/net").is_ok() {
        return Some("/proc/1/ns/net".into());
    }
    let own = format!("/proc/{}/ns/net", std::process::id());
    let ino = std::fs::metadata(&own).ok()?.ino();
    (ino == 0xEFFF_FFF9).then_some(own)
}

/// `container create --netns` with a path that plainly is not a namespace of the container's
/// own is refused by the CLI before anything is written: the machine's initial namespace, a
/// plain file, a missing path.
#[test]
fn container_create_refuses_a_netns_path_that_is_not_a_namespace_of_its_own() {
    if skip_unless_privileged() {
        return;
    }
    let Some(c) = Cluster::start("netnsbad", 2, 15) else { return };
    c.ok(&["network", "create", "--subnet", "10.91.0.0/24", "net"]);
    let file = c.topo.run.path("not-a-namespace");
    std::fs::write(&file, b"").expect("a plain file");
    let missing = c.topo.run.path("missing");
    let mut cases = vec![
        (file.display().to_string(), "is a plain file, not a network namespace"),
        (missing.display().to_string(), "No such file or directory"),
        ("/proc/self/ns/mnt".to_owned(), "is a mount namespace, not a network namespace"),
    ];
    match initial_netns_path() {
        Some(path) => cases.push((path, "is the machine's initial network namespace")),
        None => eprintln!("skipping the initial-namespace case: cannot open one from here"),
    }
    for (path, why) in &cases {
        let before = dump(&c);
        let err =
            c.refused(&["container", "create", "--host", "h1", "--netns", path, "--network", "net", "x"]);
        assert!(
            err.contains(&format!("invalid --netns {path:?}")) && err.contains(why),
            "--netns {path}: {err}"
        );
        assert_eq!(dump(&c), before, "--netns {path} changed the store");
    }
    let ls = c.ok(&["container", "ls"]);
    assert!(!ls.lines().any(|l| l.starts_with("x ")), "{ls}");
}

/// The container's host refuses a `--netns` that is its own namespace (here: the namespace its
/// agent runs in), and says so in the store: the CLI prints the agent's error at once instead
/// of timing out, `container ls` and /healthz show the failure, no interface is added to the
/// host, and `container rm` then removes it and its status.
#[test]
fn the_host_refuses_its_own_namespace_and_the_cli_prints_why() {
    if skip_unless_privileged() {
        return;
    }
    let Some(c) = Cluster::start("netnsown", 2, 15) else { return };
    c.ok(&["network", "create", "--subnet", "10.92.0.0/24", "net"]);
    let h1_ns = c.topo.host("h1").ns.clone();
    let own = Path::new("/run/netns").join(&h1_ns);
    let links =
        || String::from_utf8_lossy(&try_sh(&mut in_ns(&h1_ns, &["ip", "-o", "link"])).stdout).into_owned();
    let names = |out: String| -> BTreeSet<String> {
        out.lines().filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned())).collect()
    };
    let before = names(links());

    let started = Instant::now();
    let err = c.refused(&[
        "container",
        "create",
        "--host",
        "h1",
        "--netns",
        own.to_str().unwrap(),
        "--network",
        "net",
        "own",
    ]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "the CLI waited {took:?} for a host that had said why");
    assert!(
        err.contains(r#"host "h1" cannot make container "own""#)
            && err.contains("this host's own network namespace")
            && !err.contains("is the agent"),
        "{err}"
    );
    assert!(err.contains("overlay container rm own"), "the CLI says how to remove it: {err}");
    let ls = c.ok(&["container", "ls"]);
    assert!(ls.lines().any(|l| l.starts_with("own ") && l.ends_with("failed")), "{ls}");
    let (_, ctrs) = statuses(&c);
    let status = ctrs.get("own").expect("own's status");
    assert!(status.error.as_deref().is_some_and(|e| e.contains("own network namespace")), "{status:?}");
    let failures = health(&c, "h1")["failures"].clone();
    assert_eq!(failures[0]["container"], "own", "h1's health: {failures}");
    assert!(failures[0]["error"].as_str().is_some_and(|e| e.contains("own network namespace")), "{failures}");
    // The agent retries meanwhile, and still never puts an interface in its own namespace.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(names(links()), before, "h1's interfaces changed");

    let started = Instant::now();
    c.ok(&["container", "rm", "own"]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "container rm took {took:?}");
    let (eps, ctrs) = statuses(&c);
    assert!(ctrs.is_empty() && eps.is_empty(), "statuses left: {ctrs:?} {eps:?}");
    assert!(
        wait_for(Duration::from_secs(5), || health(&c, "h1")["failures"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(()))
        .is_some(),
        "h1's health still lists failures: {}",
        health(&c, "h1")
    );
    assert_eq!(names(links()), before, "h1's interfaces changed");
}

/// A host refuses another host's namespace. Host records name their agent's namespace
/// (`AgentIdentity::netns`) once registration fills it in.
#[test]
fn a_host_refuses_another_hosts_namespace() {
    if skip_unless_privileged() {
        return;
    }
    let Some(c) = Cluster::start("netnsother", 2, 15) else { return };
    let h2 = Path::new("/run/netns").join(&c.topo.host("h2").ns);
    let started = Instant::now();
    let err = c.refused(&["container", "create", "--host", "h1", "--netns", h2.to_str().unwrap(), "other"]);
    assert!(started.elapsed() < Duration::from_secs(10), "the CLI waited for a host that had said why");
    assert!(
        err.contains(r#"host "h1" cannot make container "other""#)
            && err.contains(r#"host "h2"'s own network namespace"#),
        "{err}"
    );
    c.ok(&["container", "rm", "other"]);
    let (_, ctrs) = statuses(&c);
    assert!(ctrs.is_empty(), "statuses left: {ctrs:?}");
}

/// A fault the host reported clears when its cause does: the agent keeps trying, and replaces
/// its error with the sandbox. (Written to the store directly: the CLI refuses a missing path
/// up front.)
#[test]
fn a_reported_failure_is_replaced_once_the_host_can_make_the_container() {
    if skip_unless_privileged() {
        return;
    }
    let Some(c) = Cluster::start("netnslate", 2, 15) else { return };
    let late = c.topo.run.ns("late");
    let path = Path::new("/run/netns").join(&late);
    let spec = ContainerSpec {
        name: "late".into(),
        host: "h1".into(),
        netns: Some(path.clone()),
        ..Default::default()
    };
    on_h1(&c, move |store| async move { store.create_container(&spec).await.expect("create") });
    let failed =
        wait_for(Duration::from_secs(10), || statuses(&c).1.get("late").and_then(|s| s.error.clone()));
    let failed = failed.expect("h1 reports that it cannot make late");
    assert!(failed.contains("No such file or directory"), "{failed}");
    assert!(health(&c, "h1")["failures"].to_string().contains("late"), "{}", health(&c, "h1"));

    ip(&["netns", "add", &late]).expect("creating the namespace");
    let ready = wait_for(Duration::from_secs(15), || {
        statuses(&c).1.get("late").filter(|s| s.error.is_none()).cloned()
    });
    assert_eq!(ready.expect("h1 reports late ready").netns, path);
    assert_eq!(health(&c, "h1")["failures"], serde_json::json!([]), "{}", health(&c, "h1"));
    c.ok(&["container", "rm", "late"]);
    assert!(statuses(&c).1.is_empty(), "late's status is left");
}

/// Names in the CLI: `--alias` at create and connect, `--publish-service`, `service
/// publish/attach/detach/ls/inspect/unpublish`, and `container inspect` in Docker's shape with
/// Aliases and DNSNames; refusals exit non-zero naming the holder.
#[test]
fn the_cli_gives_containers_aliases_and_services() {
    if skip_unless_privileged() {
        return;
    }
    let Some(c) = Cluster::start("nm", 2, 10) else { return };
    c.ok(&["network", "create", "--subnet", "10.50.0.0/24", "front"]);
    c.ok(&["network", "create", "--subnet", "10.51.0.0/24", "back"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "front", "--alias", "www", "web"]);
    c.ok(&["container", "create", "--host", "h2", "--publish-service", "db.back", "db1"]);
    c.ok(&["network", "connect", "--alias", "store", "back", "web"]);
    c.ok(&["service", "publish", "api.front"]);
    c.ok(&["service", "attach", "web", "api.front"]);

    let inspect: serde_json::Value =
        serde_json::from_str(&c.ok(&["container", "inspect", "web"])).expect("JSON");
    let front = &inspect[0]["NetworkSettings"]["Networks"]["front"];
    assert_eq!(front["IPAddress"], "10.50.0.2", "{inspect}");
    assert_eq!(front["IPPrefixLen"], 24);
    assert_eq!(front["Gateway"], "10.50.0.1");
    assert_eq!(front["MacAddress"], "02:42:0a:32:00:02");
    assert_eq!(front["Aliases"], serde_json::json!(["www"]));
    assert_eq!(front["DNSNames"], serde_json::json!(["web", "www", "api"]));
    assert_eq!(front["EndpointID"].as_str().map(str::len), Some(64));
    assert_eq!(inspect[0]["NetworkSettings"]["Networks"]["back"]["Aliases"], serde_json::json!(["store"]));
    assert_eq!(inspect[0]["Host"], "h1");

    let ls = c.ok(&["service", "ls"]);
    assert!(
        ls.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["api", "front", "web=10.50.0.2"]),
        "{ls}"
    );
    assert!(
        ls.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["db", "back", "db1=10.51.0.2"]),
        "{ls}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&c.ok(&["service", "inspect", "db.back"])).expect("JSON");
    assert_eq!(info[0]["Backends"][0]["Container"], "db1", "{info}");
    assert_eq!(info[0]["Backends"][0]["Host"], "h2", "{info}");

    // Refused, naming why.
    let err = c.refused(&["service", "publish", "www.front"]);
    assert!(
        err.contains("name \"www\" on network \"front\" is taken by an alias of container \"web\""),
        "{err}"
    );
    let err = c.refused(&["service", "unpublish", "api.front"]);
    assert!(err.contains("has backends (web)"), "{err}");
    let err =
        c.refused(&["container", "create", "--host", "h1", "--network", "front", "--alias", "api", "x"]);
    assert!(err.contains("is taken by service \"api\""), "{err}");
    let err = c.refused(&["container", "inspect", "ghost"]);
    assert!(err.contains("container \"ghost\" not found"), "{err}");
    c.ok(&["service", "detach", "web", "api.front"]);
    c.ok(&["service", "unpublish", "api.front"]);
    assert!(!c.ok(&["service", "ls"]).contains("api"));
}

/// The value of `name` with label `key="value"` in a scrape, parsed by prometheus-parse.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, key: &str, value: &str) -> f64 {
    scrape.samples.iter().find(|s| s.metric == name && s.labels.get(key) == Some(value)).map_or(0.0, |s| {
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        }
    })
}

fn scrape(c: &Cluster, host: &str) -> prometheus_parse::Scrape {
    let text = c.metrics(host);
    assert!(text.contains("overlay_ready"), "no metrics from {host}: {text}");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("parses as Prometheus text")
}

/// `/metrics` during traffic, read with a Prometheus text parser: a known number of pings moves
/// tx_encap and rx_deliver by exactly that much, pings to another network's container move the
/// no_endpoint drops by exactly that much, every datapath counter equals what `overlay-agent
/// stats` reads from the same map, and the agent's own figures are there.
#[test]
// Counters are integers, which f64 holds exactly: the comparisons are meant to be exact.
#[allow(clippy::float_cmp)]
fn metrics_count_what_the_datapath_did() {
    if skip_unless_privileged() {
        return;
    }
    let Some(c) = Cluster::start("mx", 2, 10) else { return };
    c.ok(&["network", "create", "--subnet", "10.60.0.0/24", "blue"]);
    c.ok(&["network", "create", "--subnet", "10.61.0.0/24", "red"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "blue", "c1"]);
    c.ok(&["container", "create", "--host", "h2", "--network", "blue", "c2"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "red", "c3"]);
    let (c2, c3) = (c.address("blue", "c2"), c.address("red", "c3"));
    assert!(comes_to_reach(&c, "h1", "c1", c2), "c1 reaches c2");

    let before = scrape(&c, "h1");
    let ns = c.container_ns("h1", "c1");
    let ping = |to: Ipv4Addr, n: &str| {
        try_sh(&mut in_ns(&ns, &["ping", "-c", n, "-i", "0.2", "-W", "1", &to.to_string()]))
    };
    assert!(ping(c2, "5").status.success());
    assert!(!ping(c3, "3").status.success(), "another network is out of reach");
    let after = scrape(&c, "h1");
    let delta = |name: &str, key: &str, value: &str| {
        sample(&after, name, key, value) - sample(&before, name, key, value)
    };
    assert_eq!(delta("overlay_datapath_packets_total", "event", "tx_encap"), 5.0);
    assert_eq!(delta("overlay_datapath_packets_total", "event", "rx_deliver"), 5.0);
    assert_eq!(delta("overlay_datapath_drops_total", "reason", "no_endpoint"), 3.0);
    assert!(delta("overlay_datapath_bytes_total", "event", "tx_encap") >= 5.0 * 98.0);

    // The same figures as `overlay-agent stats`, counter by counter.
    let stats = try_sh(
        std::process::Command::new(overlay_tests::binary("overlay-agent"))
            .args(["stats", "--json", "--pin-dir"])
            .arg(&c.topo.host("h1").pin_dir),
    );
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
    let now = scrape(&c, "h1");
    for (label, v) in stats.as_object().expect("object") {
        let (name, key, value) = match label.strip_prefix("drop/") {
            Some(reason) => ("overlay_datapath_drops_total", "reason", reason),
            None => ("overlay_datapath_packets_total", "event", label.as_str()),
        };
        assert_eq!(sample(&now, name, key, value), v["packets"].as_f64().unwrap_or(-1.0), "{label}");
    }
    // The agent's own figures.
    let plain = |name: &str| {
        now.samples.iter().find(|s| s.metric == name).map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
    };
    assert_eq!(plain("overlay_ready"), Some(1.0));
    assert_eq!(plain("overlay_registered"), Some(1.0));
    assert!(plain("overlay_reconcile_passes_total").is_some_and(|v| v >= 1.0));
    assert!(plain("overlay_endpoint_map_entries").is_some_and(|v| v >= 2.0));
    let text = c.metrics("h1");
    assert!(text.contains("overlay_reconcile_duration_seconds_bucket{le="), "the histogram: {text}");
}
