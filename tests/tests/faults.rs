//! The control plane failing under running containers (issue 9's table): etcd paused, a host cut
//! off from etcd, an agent down for longer than a restart, etcd restarted empty, etcd restored
//! from an older backup, a second agent for a host. In each, pings run between containers on
//! different hosts every 10 ms, and what they lost is asserted: a control-plane fault must never
//! cost a running container a packet, nor delete it.
//!
//! Each test has its own cluster (etcd and three agents, default liveness TTL of 30 s unless
//! said), since each breaks its etcd in its own way.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use overlay_tests::{
    cluster::{Cluster, ETCD_IP},
    ip_in,
    ping::{Loss, Ping},
    skip_unless_privileged, wait_for,
};

/// The default liveness TTL: every fault below is shorter.
const TTL: u64 = 30;

/// Three hosts with a container each on one network: a on h1, b on h2, z on h3.
struct Three {
    c: Cluster,
    a: Ipv4Addr,
    b: Ipv4Addr,
    z: Ipv4Addr,
}

impl Three {
    fn start(tag: &str) -> Option<Self> {
        let c = Cluster::start(tag, 3, TTL)?;
        c.ok(&["network", "create", "--subnet", "10.91.0.0/24", "net"]);
        for (host, name) in [("h1", "a"), ("h2", "b"), ("h3", "z")] {
            c.ok(&["container", "create", "--host", host, "--network", "net", name]);
        }
        let (a, b, z) = (c.address("net", "a"), c.address("net", "b"), c.address("net", "z"));
        for (host, name, to) in [("h1", "a", b), ("h2", "b", z), ("h3", "z", a)] {
            assert!(c.comes_to_reach(host, name, to), "{name} -> {to} before the fault");
        }
        Some(Self { c, a, b, z })
    }

    /// Pings around the ring of hosts: h1 -> h2 -> h3 -> h1.
    fn pings(&self) -> Vec<(String, Ping)> {
        [("h1", "a", self.b), ("h2", "b", self.z), ("h3", "z", self.a)]
            .into_iter()
            .map(|(host, name, to)| {
                (format!("{name} -> {to}"), Ping::start(&self.c.container_ns(host, name), to))
            })
            .collect()
    }
}

/// Stops the pings and asserts none lost anything (and that they ran since `started`, the
/// moment the fault began, give or take a second).
fn assert_no_loss(pings: Vec<(String, Ping)>, started: Instant) {
    let at_least = started.elapsed().saturating_sub(Duration::from_secs(1));
    // At 100 a second; a loaded machine may send somewhat fewer.
    let expected = at_least.as_secs() * 50;
    let losses: Vec<(String, Loss)> = pings.into_iter().map(|(what, p)| (what, p.stop())).collect();
    for (what, loss) in &losses {
        assert!(loss.sent >= expected, "{what}: only {} pings sent: {losses:?}", loss.sent);
        assert_eq!(loss.lost(), 0, "{what} lost {} of {} pings: {losses:?}", loss.lost(), loss.sent);
    }
}

/// Every host is alive and its agent registered and free of the brake.
fn assert_all_registered(c: &Cluster) {
    for host in ["h1", "h2", "h3"] {
        assert!(c.wait_registered(host), "{host} is not alive again");
        let ready = wait_for(Duration::from_secs(10), || {
            let (code, body) = c.health(host, "GET", "/readyz")?;
            (code == 200).then_some(body)
        });
        assert!(ready.is_some(), "{host} not ready: {:?}", c.health(host, "GET", "/readyz"));
    }
}

fn containers(c: &Cluster) -> Vec<String> {
    let ls = c.ok(&["container", "ls"]);
    ls.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect()
}

fn netns_inode(name: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(Path::new("/run/netns").join(name)).ok().map(|m| m.ino())
}

#[test]
fn etcd_paused_for_20s_costs_no_packet_and_deletes_nothing() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut t) = Three::start("f-pause") else { return };
    let pings = t.pings();
    let started = Instant::now();
    t.c.etcd.pause();
    sleep(Duration::from_secs(20));
    t.c.etcd.resume();
    sleep(Duration::from_secs(3));
    assert_no_loss(pings, started);
    assert_eq!(containers(&t.c), ["a", "b", "z"]);
    assert_all_registered(&t.c);
    // The agents follow the store again: a change made now arrives everywhere.
    t.c.ok(&["container", "create", "--host", "h3", "--network", "net", "late"]);
    let late = t.c.address("net", "late");
    assert!(t.c.comes_to_reach("h1", "a", late), "a -> late (created after the pause)");
}

#[test]
fn a_host_cut_off_from_etcd_for_15s_keeps_its_containers_and_catches_up() {
    if skip_unless_privileged() {
        return;
    }
    let Some(t) = Three::start("f-cut") else { return };
    let h1 = t.c.topo.host("h1").ns.clone();
    let a_ns = netns_inode(&t.c.container_ns("h1", "a"));
    let pings = t.pings();
    let started = Instant::now();
    // Only etcd is out of h1's reach: its peers are not.
    ip_in(&h1, &["route", "add", "blackhole", &format!("{ETCD_IP}/32")]).expect("blackhole");
    // Meanwhile a container arrives on h2 (made from h2: h1 cannot reach etcd), which h1
    // cannot hear of yet.
    let made = t.c.cli_on("h2", &["container", "create", "--host", "h2", "--network", "net", "meanwhile"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    sleep(Duration::from_secs(15));
    ip_in(&h1, &["route", "del", "blackhole", &format!("{ETCD_IP}/32")]).expect("unblackhole");
    let meanwhile = t.c.address("net", "meanwhile");
    assert!(t.c.comes_to_reach("h1", "a", meanwhile), "h1 caught up: a -> meanwhile");
    assert_no_loss(pings, started);
    assert_eq!(netns_inode(&t.c.container_ns("h1", "a")), a_ns, "a's sandbox is the same one");
    assert_eq!(containers(&t.c), ["a", "b", "meanwhile", "z"]);
    assert_all_registered(&t.c);
}

#[test]
fn an_agent_down_for_15s_leaves_its_containers_running_and_takes_them_back() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut t) = Three::start("f-restart") else { return };
    let a_ns = netns_inode(&t.c.container_ns("h1", "a"));
    let pings = t.pings();
    let started = Instant::now();
    t.c.kill_agent("h1");
    sleep(Duration::from_secs(15));
    t.c.start_agent("h1");
    assert!(t.c.topo.wait_log("h1", "full reconcile done", Duration::from_secs(20)));
    sleep(Duration::from_secs(2));
    assert_no_loss(pings, started);
    assert_eq!(netns_inode(&t.c.container_ns("h1", "a")), a_ns, "a's sandbox is the same one");
    assert_eq!(containers(&t.c), ["a", "b", "z"]);
    assert_all_registered(&t.c);
    let log = std::fs::read_to_string(&t.c.topo.host("h1").log).unwrap_or_default();
    assert!(!log.contains("safety brake"), "a restart against an intact store is not braked");
}

#[test]
fn etcd_restarted_empty_is_detected_and_the_brake_keeps_every_container() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut t) = Three::start("f-empty") else { return };
    let pings = t.pings();
    let started = Instant::now();
    t.c.etcd.restart_empty().expect("etcd restarted empty");
    // Every agent notices, registers its host again, and holds the empty state.
    for host in ["h1", "h2", "h3"] {
        let braked = wait_for(Duration::from_secs(15), || {
            let (code, body) = t.c.health(host, "GET", "/readyz")?;
            let brake = &body["health"]["brake"];
            (code == 503 && brake["would_remove"] == 1 && body["health"]["registered"] == true).then_some(())
        });
        assert!(braked.is_some(), "{host}: {:?}", t.c.health(host, "GET", "/readyz"));
    }
    // An agent restarted against the empty store holds it too, instead of tearing down, also
    // once it has registered in the empty store and recorded that store as the one it follows
    // (at most a second later): what it holds is remembered in its state directory.
    assert!(t.c.wait_registered("h2"));
    sleep(Duration::from_secs(2));
    t.c.kill_agent("h2");
    t.c.start_agent("h2");
    let braked_again = wait_for(Duration::from_secs(20), || {
        let (code, body) = t.c.health("h2", "GET", "/readyz")?;
        (code == 503 && body["health"]["brake"]["would_remove"] == 1).then_some(())
    });
    assert!(braked_again.is_some(), "h2 restarted braked: {:?}", t.c.health("h2", "GET", "/readyz"));
    sleep(Duration::from_secs(2));
    assert_no_loss(pings, started);
    for (host, name) in [("h1", "a"), ("h2", "b"), ("h3", "z")] {
        assert!(netns_inode(&t.c.container_ns(host, name)).is_some(), "{name}'s sandbox is gone");
    }
    let log = std::fs::read_to_string(&t.c.topo.host("h1").log).unwrap_or_default();
    assert!(log.contains("went backwards") || log.contains("another cluster"), "h1 says why");
    // Every host registered itself again in the empty store.
    for host in ["h1", "h2", "h3"] {
        if !t.c.wait_registered(host) {
            t.c.topo.dump_logs();
            panic!("{host} did not register again: {}", t.c.ok(&["host", "ls"]));
        }
    }

    // The operator's go-ahead on h3: it applies what the store says, and z goes.
    let (code, _) = t.c.health("h3", "POST", "/brake/release").expect("release");
    assert_eq!(code, 200);
    assert!(
        wait_for(Duration::from_secs(10), || netns_inode(&t.c.container_ns("h3", "z"))
            .is_none()
            .then_some(()))
        .is_some(),
        "released, h3 applies the empty state"
    );
    let (code, body) = t.c.health("h3", "GET", "/readyz").expect("h3 health");
    assert_eq!((code, &body["health"]["brake"]), (200, &serde_json::Value::Null), "{body}");
    let (code, _) = t.c.health("h3", "POST", "/brake/release").expect("release again");
    assert_eq!(code, 409, "nothing left to release");
    // The others still hold theirs.
    assert!(netns_inode(&t.c.container_ns("h1", "a")).is_some());
}

#[test]
fn etcd_restored_from_an_older_backup_is_detected_and_followed() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut t) = Three::start("f-rollback") else { return };
    t.c.ok(&["container", "create", "--host", "h2", "--network", "net", "b2"]);
    let backup = t.c.etcd.backup().expect("backup");
    // After the backup: d on h2, which the restored store will not know.
    t.c.ok(&["container", "create", "--host", "h2", "--network", "net", "d"]);
    let d = t.c.address("net", "d");
    assert!(t.c.comes_to_reach("h1", "a", d));
    let pings = t.pings();
    let started = Instant::now();
    t.c.etcd.restore(backup.path()).expect("restore");
    // Written after the restore, at revisions the agents had already passed in the old
    // history: without the check they would never see it.
    t.c.ok(&["container", "create", "--host", "h3", "--network", "net", "e"]);
    let e = t.c.address("net", "e");
    assert!(t.c.comes_to_reach("h1", "a", e), "a -> e (created after the restore)");
    // d is gone from the store, so from h2 (one of its three containers: not braked) and from
    // every map.
    assert!(
        wait_for(Duration::from_secs(10), || netns_inode(&t.c.container_ns("h2", "d"))
            .is_none()
            .then_some(()))
        .is_some(),
        "d removed on h2"
    );
    // The restored store had d's address free, so e may have it: h1 must send it to e's host.
    let h3_vtep: Vec<serde_json::Value> =
        t.c.topo.host("h3").vtep.octets().iter().map(|o| serde_json::json!(o)).collect();
    let d_gone = wait_for(Duration::from_secs(10), || match t.c.map_entry("h1", d) {
        None => Some(()),
        Some(v) if e == d && v["vtep"].as_array() == Some(&h3_vtep) => Some(()),
        Some(_) => None,
    });
    assert!(d_gone.is_some(), "h1 still sends d's address to h2: {:?}", t.c.map_entry("h1", d));
    sleep(Duration::from_secs(1));
    assert_no_loss(pings, started);
    for host in ["h1", "h2", "h3"] {
        let (_, body) = t.c.health(host, "GET", "/healthz").expect("health");
        assert!(body["store_resets"].as_u64() >= Some(1), "{host} noticed: {body}");
        let log = std::fs::read_to_string(&t.c.topo.host(host).log).unwrap_or_default();
        assert!(log.contains("went backwards"), "{host}'s log says the store went back");
    }
    assert_all_registered(&t.c);
}

#[test]
fn a_second_agent_for_a_host_is_refused_and_changes_nothing() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut t) = Three::start("f-dup") else { return };
    let pings = t.pings();
    let started = Instant::now();
    let agent = overlay_tests::binary("overlay-agent");
    let url = t.c.url.clone();
    let run = |ns: &str, vtep: Ipv4Addr, pins: &Path, state: &Path, prefix: &str| {
        let mut cmd = Command::new(&agent);
        cmd.args(["run", "--host", "h1", "--uplink", "eth0", "--vtep", &vtep.to_string(), "--netns", ns])
            .arg("--pin-dir")
            .arg(pins)
            .arg("--state-dir")
            .arg(state)
            .args(["--netns-prefix", prefix, "--etcd-endpoints", &url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("second agent");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut child = child;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                let out = child.wait_with_output().expect("output");
                return (status, String::from_utf8_lossy(&out.stderr).into_owned());
            }
            assert!(Instant::now() < deadline, "the second agent kept running");
            sleep(Duration::from_millis(100));
        }
    };
    let h1 = t.c.topo.host("h1");
    let (h1_ns, h1_vtep, h1_pins, h1_state, h1_prefix) =
        (h1.ns.clone(), h1.vtep, h1.pin_dir.clone(), h1.state_dir.clone(), h1.netns_prefix.clone());

    // On the same machine, with h1's own directories: the state directory's lock refuses it
    // before it touches anything.
    let (status, err) = run(&h1_ns, h1_vtep, &h1_pins, &h1_state, &h1_prefix);
    assert!(!status.success());
    assert!(err.contains("another agent for host \"h1\" is running (pid"), "{err}");

    // On "another machine" (h3's namespace, whose own agent is stopped for it), with another
    // VTEP: the store refuses it, naming the agent that holds h1.
    t.c.kill_agent("h3");
    let h3 = t.c.topo.host("h3");
    let (h3_ns, h3_vtep, h3_pins, h3_prefix) =
        (h3.ns.clone(), h3.vtep, h3.pin_dir.clone(), h3.netns_prefix.clone());
    let elsewhere = t.c.topo.run.path("state-impostor");
    let (status, err) = run(&h3_ns, h3_vtep, &h3_pins, &elsewhere, &h3_prefix);
    assert!(!status.success());
    assert!(
        err.contains("host \"h1\" is served by agent")
            && err.contains("VTEP 198.18.0.1")
            && err.contains("a live host's VTEP cannot change"),
        "{err}"
    );
    t.c.start_agent("h3");
    assert!(t.c.topo.wait_log("h3", "full reconcile done", Duration::from_secs(20)));
    sleep(Duration::from_secs(2));
    assert_no_loss(pings, started);

    // h1's record still names its own VTEP, and its peers still send to it.
    let hosts = t.c.ok(&["host", "ls"]);
    let row = hosts.lines().find(|l| l.starts_with("h1 ")).expect("h1 listed");
    assert!(row.contains("198.18.0.1 ") && row.contains("alive"), "{row}");
    let entry = t.c.map_entry("h2", t.a).expect("h2 maps a");
    let vtep: Vec<serde_json::Value> = h1_vtep.octets().iter().map(|o| serde_json::json!(o)).collect();
    assert_eq!(entry["vtep"].as_array(), Some(&vtep), "h2 still sends a's traffic to h1");
}
