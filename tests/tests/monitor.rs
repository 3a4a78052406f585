//! `overlay-agent monitor` end to end: the real binary on a host of a two-host overlay with
//! etcd, while containers fail to talk in each way the tests can provoke (wrong network,
//! unknown destination, spoofed source, malformed VXLAN from the other host, a frame too big
//! for the overlay, a dead host); every drop shows with its reason and fields, each flow once,
//! and a filtered monitor shows only what its filter lets through.

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    process::Stdio,
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::Duration,
};

use overlay_tests::{
    Proc, binary,
    cluster::Cluster,
    frames::{self, IPPROTO_UDP, Ipv4, Tunnel, ethernet, udp},
    in_ns, sh, skip_unless_privileged, try_sh, wait_for,
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_overlay-probe");
const BLUE_VNI: u64 = 5001;
const RED_VNI: u64 = 5002;

/// A running `overlay-agent monitor --json` on a host, its output gathered as it comes.
struct Monitor {
    proc: Proc,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Starts it on `host` of `c` with `args`, and waits until it listens.
    fn start(c: &Cluster, host: &str, args: &[&str]) -> Self {
        let h = c.topo.host(host);
        let bin = binary("overlay-agent");
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["monitor", "--json", "--pin-dir"])
            .arg(&h.pin_dir)
            .args(["--netns", &h.ns, "--etcd-endpoints", &c.url])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn("monitor", &mut cmd);
        let stdout = proc.take_stdout().expect("stdout");
        let stderr = proc.take_stderr().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("monitor: {line}");
                let _ = tx.send(line);
            }
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let gathered = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("monitor> {line}");
                let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                gathered.lock().expect("lines").push(v);
            }
        });
        let listening = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        assert!(listening.contains("listening"), "the monitor did not start: {listening:?}");
        Self { proc, lines, reader: Some(reader) }
    }

    /// Waits until an event `matches` (what has come so far otherwise).
    fn wait(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let seen = wait_for(Duration::from_secs(10), || {
            self.lines.lock().expect("lines").iter().find(|v| matches(v)).cloned()
        });
        seen.unwrap_or_else(|| panic!("no {what} event; got {:#?}", self.lines.lock().expect("lines")))
    }

    /// SIGTERM: it prints what is still in the ring buffer and exits cleanly; every event.
    fn stop(mut self) -> Vec<Value> {
        assert!(self.proc.terminate(Duration::from_secs(10)), "the monitor did not exit cleanly on SIGTERM");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the reader");
        }
        self.lines.lock().expect("lines").clone()
    }
}

fn ip(v: &Value, field: &str) -> Option<Ipv4Addr> {
    v[field].as_str()?.parse().ok()
}

fn is_drop(v: &Value, reason: &str) -> bool {
    v["event"] == "drop" && v["reason"] == reason
}

fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let text = sh(&mut in_ns(ns, &["cat", &format!("/sys/class/net/{dev}/address")]));
    let bytes: Vec<u8> = text.trim().split(':').map(|b| u8::from_str_radix(b, 16).expect("MAC")).collect();
    bytes.try_into().expect("6 bytes")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `frame` out of `dev` in namespace `ns` as it is (overlay-probe frame).
fn send_frame(ns: &str, dev: &str, frame: &[u8]) {
    sh(&mut in_ns(ns, &[PROBE, "frame", dev, &hex(frame)]));
}

/// Two hosts with a short lease; blue: a (h1), b (h2); red: r (h2).
fn cluster(tag: &str) -> Option<(Cluster, Ipv4Addr, Ipv4Addr, Ipv4Addr)> {
    let c = Cluster::start(tag, 2, 4)?;
    c.ok(&["network", "create", "--subnet", "10.94.0.0/24", "-o", &format!("vni={BLUE_VNI}"), "blue"]);
    c.ok(&["network", "create", "--subnet", "10.95.0.0/24", "-o", &format!("vni={RED_VNI}"), "red"]);
    for (host, net, name) in [("h1", "blue", "a"), ("h2", "blue", "b"), ("h2", "red", "r")] {
        c.ok(&["container", "create", "--host", host, "--network", net, name]);
    }
    let (a, b, r) = (c.address("blue", "a"), c.address("blue", "b"), c.address("red", "r"));
    assert!(c.comes_to_reach("h1", "a", b), "a -> b before the failures");
    Some((c, a, b, r))
}

/// A UDP frame from container a that claims another source address.
fn spoofed_from_a(c: &Cluster, b: Ipv4Addr) -> Vec<u8> {
    let a_ns = c.container_ns("h1", "a");
    let (src, dst) = ([10, 94, 0, 99], b.octets());
    let dst_mac = mac_of(&c.container_ns("h2", "b"), "eth0");
    ethernet(dst_mac, mac_of(&a_ns, "eth0"), 0x0800, &Ipv4::new(src, dst, IPPROTO_UDP).packet(&udp(src, dst, 4444, 7000, b"spoof")))
}

#[test]
fn monitor_shows_each_drop_with_its_fields_and_each_flow_once() {
    if skip_unless_privileged() {
        return;
    }
    let Some((c, a, b, r)) = cluster("mon-all") else { return };
    let a_ns = c.container_ns("h1", "a");
    let (h1, h2) = (c.topo.host("h1"), c.topo.host("h2"));
    let mon = Monitor::start(&c, "h1", &["--flows"]);

    // A flow: three pings, one event.
    assert!(try_sh(&mut in_ns(&a_ns, &["ping", "-c", "3", "-i", "0.2", "-W", "1", &b.to_string()])).status.success());
    let flow = mon.wait("flow a -> b", |v| v["event"] == "flow" && ip(v, "dst") == Some(b));
    assert_eq!((&flow["reason"], &flow["hook"], &flow["proto"]), (&"tx_encap".into(), &"from_container".into(), &"icmp".into()), "{flow}");
    assert_eq!((ip(&flow, "src"), &flow["vni"]), (Some(a), &BLUE_VNI.into()), "{flow}");

    // Wrong network: a (blue) to r (red).
    let _ = try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", &r.to_string()]));
    let d = mon.wait("wrong network", |v| is_drop(v, "no_endpoint") && ip(v, "dst") == Some(r));
    assert_eq!((&d["hook"], ip(&d, "src"), &d["vni"], &d["proto"]), (&"from_container".into(), Some(a), &BLUE_VNI.into(), &"icmp".into()), "{d}");
    assert!(d["interface"].is_string() && d["ifindex"].as_u64() > Some(0), "{d}");

    // Unknown destination on a's own network: its ARP request is unanswerable.
    let nobody = Ipv4Addr::new(10, 94, 0, 200);
    let _ = try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", &nobody.to_string()]));
    let d = mon.wait("unknown destination", |v| is_drop(v, "arp_unanswerable") && ip(v, "dst") == Some(nobody));
    assert_eq!((&d["proto"], ip(&d, "src"), &d["vni"]), (&"arp".into(), Some(a), &BLUE_VNI.into()), "{d}");

    // Spoofed source.
    send_frame(&a_ns, "eth0", &spoofed_from_a(&c, b));
    let d = mon.wait("spoofed source", |v| is_drop(v, "spoofed_source"));
    assert_eq!((ip(&d, "src"), ip(&d, "dst"), &d["sport"], &d["dport"], &d["proto"]), (Some(Ipv4Addr::new(10, 94, 0, 99)), Some(b), &4444.into(), &7000.into(), &"udp".into()), "{d}");

    // Malformed VXLAN from h2: no I flag.
    let inner = ethernet(mac_of(&a_ns, "eth0"), [2, 0, 0, 0, 0, 9], 0x0800, &Ipv4::new(b.octets(), a.octets(), IPPROTO_UDP).packet(&udp(b.octets(), a.octets(), 5555, 7000, b"x")));
    let tunnel = Tunnel {
        src_mac: mac_of(&h2.ns, "eth0"),
        dst_mac: mac_of(&h1.ns, "eth0"),
        src_vtep: h2.vtep.octets(),
        dst_vtep: h1.vtep.octets(),
        src_port: 51234,
        vni: BLUE_VNI as u32,
    };
    let mut frame = frames::vxlan(&tunnel, &inner);
    frame[42] = 0; // the VXLAN flags
    send_frame(&h2.ns, "eth0", &frame);
    let d = mon.wait("malformed VXLAN", |v| is_drop(v, "bad_vxlan_flags"));
    assert!(d["hook"].as_str().is_some_and(|h| h.starts_with("uplink")), "{d}");
    assert_eq!((ip(&d, "outer_src"), ip(&d, "outer_dst"), &d["vni"]), (Some(h2.vtep), Some(h1.vtep), &BLUE_VNI.into()), "{d}");
    assert_eq!((ip(&d, "src"), ip(&d, "dst"), &d["sport"]), (Some(b), Some(a), &5555.into()), "{d}");

    // MTU: a raises its MTU past what the overlay carries (see datapath.rs).
    sh(&mut in_ns(&a_ns, &["ip", "link", "set", "eth0", "mtu", "1454"]));
    let _ = try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1426", &b.to_string()]));
    let d = mon.wait("too big", |v| is_drop(v, "too_big"));
    assert_eq!((ip(&d, "src"), ip(&d, "dst"), &d["len"]), (Some(a), Some(b), &1468.into()), "{d}");
    sh(&mut in_ns(&a_ns, &["ip", "link", "set", "eth0", "mtu", "1450"]));

    let all = mon.stop();
    // Each ping of three was one flow.
    let flows = all.iter().filter(|v| v["event"] == "flow" && ip(v, "dst") == Some(b) && v["proto"] == "icmp").count();
    assert_eq!(flows, 1, "{all:#?}");
    // The monitor is gone: its flags are cleared (bpftool reads the control entry).
    let ctl = h1.map("MONITOR_CTL");
    assert_eq!(ctl[0]["value"]["flags"], 0, "{ctl}");
}

#[test]
fn a_filtered_monitor_shows_only_what_its_filter_lets_through() {
    if skip_unless_privileged() {
        return;
    }
    let Some((c, _a, b, _r)) = cluster("mon-filt") else { return };
    let a_ns = c.container_ns("h1", "a");
    let h1 = c.topo.host("h1");
    let nobody = "10.94.0.200";

    // Another network: nothing, though a's drops are counted.
    let mon = Monitor::start(&c, "h1", &["--network", "red", "--flows"]);
    let before = h1.counter("drop/arp_unanswerable") + h1.counter("drop/spoofed_source");
    let _ = try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", nobody]));
    send_frame(&a_ns, "eth0", &spoofed_from_a(&c, b));
    assert!(try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", &b.to_string()])).status.success());
    let counted = wait_for(Duration::from_secs(5), || {
        (h1.counter("drop/arp_unanswerable") + h1.counter("drop/spoofed_source") >= before + 2).then_some(())
    });
    assert!(counted.is_some(), "the drops were not counted");
    assert_eq!(mon.stop(), Vec::<Value>::new(), "a monitor of red showed blue's events");

    // One reason of one container, by name: the spoof alone.
    let mon = Monitor::start(&c, "h1", &["--container", "a", "--reason", "spoofed_source"]);
    let _ = try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", nobody]));
    send_frame(&a_ns, "eth0", &spoofed_from_a(&c, b));
    mon.wait("spoofed source", |v| is_drop(v, "spoofed_source"));
    let all = mon.stop();
    assert_eq!(all.len(), 1, "{all:#?}");

    // Bad filters are refused before anything listens.
    let out = try_sh(
        std::process::Command::new(binary("overlay-agent"))
            .args(["monitor", "--pin-dir"])
            .arg(&h1.pin_dir)
            .args(["--reason", "no_such_reason"]),
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no_endpoint"), "{out:?}");
    assert_eq!(h1.map("MONITOR_CTL")[0]["value"]["flags"], 0);
}

/// The runbook's dead host: while h2's lease runs, a's packets to b leave (a tx_encap flow) and
/// nothing answers; once it ran out, b left h1's maps and they are dropped as no_endpoint.
#[test]
fn monitor_shows_a_dead_host_as_the_runbook_says() {
    if skip_unless_privileged() {
        return;
    }
    let Some((mut c, a, b, _r)) = cluster("mon-dead") else { return };
    let a_ns = c.container_ns("h1", "a");
    let h2_ns = c.topo.host("h2").ns.clone();
    let mon = Monitor::start(&c, "h1", &["--flows"]);
    // h2 goes dark: its agent dies and its uplink goes down.
    c.kill_agent("h2");
    sh(&mut in_ns(&h2_ns, &["ip", "link", "set", "eth0", "down"]));
    assert!(!try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", &b.to_string()])).status.success());
    let flow = mon.wait("flow a -> b", |v| v["event"] == "flow" && ip(v, "dst") == Some(b));
    assert_eq!((&flow["reason"], ip(&flow, "src")), (&"tx_encap".into(), Some(a)), "{flow}");
    // The lease (4 s) runs out; h1 forgets b.
    let gone = wait_for(Duration::from_secs(20), || (!c.maps_hold("h1", b)).then_some(()));
    assert!(gone.is_some(), "h1 still holds b after h2's lease ran out");
    assert!(c.host_state("h2").is_some_and(|s| s.starts_with("down")), "{:?}", c.host_state("h2"));
    let _ = try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", &b.to_string()]));
    let d = mon.wait("no endpoint for b", |v| is_drop(v, "no_endpoint") && ip(v, "dst") == Some(b));
    assert_eq!((ip(&d, "src"), &d["vni"]), (Some(a), &BLUE_VNI.into()), "{d}");
    mon.stop();
}
