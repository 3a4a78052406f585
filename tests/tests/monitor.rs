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
    lines: Arc<Mutex<Vec<String>>>,
    json: bool,
    reader: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Starts it on `host` of `c` with `args`, and waits until it listens.
    fn start(c: &Cluster, host: &str, args: &[&str]) -> Self {
        Self::start_as(c, host, args, true)
    }

    /// `start`, printing text (not JSON) if `json` is false.
    fn start_as(c: &Cluster, host: &str, args: &[&str], json: bool) -> Self {
        let h = c.topo.host(host);
        let bin = binary("overlay-agent");
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["monitor", "--pin-dir"])
            .arg(&h.pin_dir)
            .args(json.then_some("--json"))
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
                gathered.lock().expect("lines").push(line);
            }
        });
        let listening = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        assert!(listening.contains("listening"), "the monitor did not start: {listening:?}");
        Self { proc, lines, json, reader: Some(reader) }
    }

    /// Waits until a line `matches` (what has come so far otherwise).
    fn wait_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let seen = wait_for(Duration::from_secs(10), || {
            self.lines.lock().expect("lines").iter().find(|l| matches(l)).cloned()
        });
        seen.unwrap_or_else(|| panic!("no {what} event; got {:#?}", self.lines.lock().expect("lines")))
    }

    /// Waits until an event `matches`.
    fn wait(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        assert!(self.json);
        let line = self.wait_line(what, |l| matches(&parse(l)));
        parse(&line)
    }

    /// SIGTERM: it prints what is still in the ring buffer and exits cleanly; every line.
    fn stop_lines(mut self) -> Vec<String> {
        assert!(self.proc.terminate(Duration::from_secs(10)), "the monitor did not exit cleanly on SIGTERM");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the reader");
        }
        self.lines.lock().expect("lines").clone()
    }

    /// `stop_lines`, as JSON.
    fn stop(self) -> Vec<Value> {
        self.stop_lines().iter().map(|l| parse(l)).collect()
    }
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

impl Monitor {}

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
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = std::fmt::Write::write_fmt(&mut s, format_args!("{b:02x}"));
        s
    })
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
    ethernet(
        dst_mac,
        mac_of(&a_ns, "eth0"),
        0x0800,
        &Ipv4::new(src, dst, IPPROTO_UDP).packet(&udp(src, dst, 4444, 7000, b"spoof")),
    )
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
    assert!(
        try_sh(&mut in_ns(&a_ns, &["ping", "-c", "3", "-i", "0.2", "-W", "1", &b.to_string()]))
            .status
            .success()
    );
    let flow = mon.wait("flow a -> b", |v| v["event"] == "flow" && ip(v, "dst") == Some(b));
    assert_eq!(
        (&flow["reason"], &flow["hook"], &flow["proto"]),
        (&"tx_encap".into(), &"from_container".into(), &"icmp".into()),
        "{flow}"
    );
    assert_eq!((ip(&flow, "src"), &flow["vni"]), (Some(a), &BLUE_VNI.into()), "{flow}");

    // Wrong network: a (blue) to r (red).
    let _ = try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", &r.to_string()]));
    let d = mon.wait("wrong network", |v| is_drop(v, "no_endpoint") && ip(v, "dst") == Some(r));
    assert_eq!(
        (&d["hook"], ip(&d, "src"), &d["vni"], &d["proto"]),
        (&"from_container".into(), Some(a), &BLUE_VNI.into(), &"icmp".into()),
        "{d}"
    );
    assert!(d["interface"].is_string() && d["ifindex"].as_u64() > Some(0), "{d}");

    // Unknown destination on a's own network: its ARP request is unanswerable.
    let nobody = Ipv4Addr::new(10, 94, 0, 200);
    let _ = try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", &nobody.to_string()]));
    let d =
        mon.wait("unknown destination", |v| is_drop(v, "arp_unanswerable") && ip(v, "dst") == Some(nobody));
    assert_eq!((&d["proto"], ip(&d, "src"), &d["vni"]), (&"arp".into(), Some(a), &BLUE_VNI.into()), "{d}");

    // Spoofed source.
    send_frame(&a_ns, "eth0", &spoofed_from_a(&c, b));
    let d = mon.wait("spoofed source", |v| is_drop(v, "spoofed_source"));
    assert_eq!(
        (ip(&d, "src"), ip(&d, "dst"), &d["sport"], &d["dport"], &d["proto"]),
        (Some(Ipv4Addr::new(10, 94, 0, 99)), Some(b), &4444.into(), &7000.into(), &"udp".into()),
        "{d}"
    );

    // Malformed VXLAN from h2: no I flag.
    let inner = ethernet(
        mac_of(&a_ns, "eth0"),
        [2, 0, 0, 0, 0, 9],
        0x0800,
        &Ipv4::new(b.octets(), a.octets(), IPPROTO_UDP).packet(&udp(
            b.octets(),
            a.octets(),
            5555,
            7000,
            b"x",
        )),
    );
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
    assert_eq!(
        (ip(&d, "outer_src"), ip(&d, "outer_dst"), &d["vni"]),
        (Some(h2.vtep), Some(h1.vtep), &BLUE_VNI.into()),
        "{d}"
    );
    assert_eq!((ip(&d, "src"), ip(&d, "dst"), &d["sport"]), (Some(b), Some(a), &5555.into()), "{d}");

    // MTU: a socket that sizes its packets by the interface (1500, for the way out) rather than
    // by the route to the overlay (1450): IP_PMTUDISC_PROBE, as tracepath does.
    let _ = try_sh(&mut in_ns(&a_ns, &[PROBE, "datagram", &format!("{b}:9"), "1426", "probe"]));
    let d = mon.wait("too big", |v| is_drop(v, "too_big"));
    assert_eq!((ip(&d, "src"), ip(&d, "dst"), &d["len"]), (Some(a), Some(b), &1468.into()), "{d}");
    assert_eq!(d["proto"], "udp", "{d}");

    let all = mon.stop();
    // Each ping of three was one flow.
    let flows = all
        .iter()
        .filter(|v| v["event"] == "flow" && ip(v, "dst") == Some(b) && v["proto"] == "icmp")
        .count();
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

/// The runbook of docs/observability.md, "my containers cannot talk", on the real failures it
/// names, with the tools it names: the text monitor, `stats`, /metrics and bpftool (what they
/// print is in the test's output, `--nocapture`, and in the doc). Wrong network: a (blue) to r
/// (red). MTU: a raised its MTU. Dead host: h2's agent dies and its uplink goes down; while
/// its lease runs a's packets to b leave (a tx_encap flow) and nothing answers; once it ran
/// out, b left h1's maps and they are dropped as no_endpoint.
#[test]
fn the_runbook_on_a_wrong_network_an_mtu_and_a_dead_host() {
    if skip_unless_privileged() {
        return;
    }
    let Some((mut c, a, b, r)) = cluster("mon-book") else { return };
    let a_ns = c.container_ns("h1", "a");
    let h2_ns = c.topo.host("h2").ns.clone();
    let show = |what: &str, text: &str| eprintln!("===== {what}\n{}", text.trim_end());
    let drops_metric = |c: &Cluster| -> String {
        c.metrics("h1")
            .lines()
            .filter(|l| l.starts_with("overlay_datapath_drops_total{"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let stats = |c: &Cluster| {
        sh(std::process::Command::new(binary("overlay-agent"))
            .args(["stats", "--pin-dir"])
            .arg(&c.topo.host("h1").pin_dir))
    };
    let mon = Monitor::start_as(&c, "h1", &["--flows"], false);

    // Wrong network.
    let _ = try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", &r.to_string()]));
    let line =
        mon.wait_line("wrong network", |l| l.contains(" drop no_endpoint") && l.contains(&format!("-> {r}")));
    assert!(line.contains(&format!("vni {BLUE_VNI} icmp {a} -> {r}")), "{line}");
    show("stats on h1 (wrong network)", &stats(&c));
    let metric = drops_metric(&c);
    assert!(metric.contains("reason=\"no_endpoint\""), "{metric}");
    show("/metrics drops on h1", &metric);

    // MTU: a packet sized by the interface (1500) instead of the route to the overlay (1450).
    let _ = try_sh(&mut in_ns(&a_ns, &[PROBE, "datagram", &format!("{b}:9"), "1426", "probe"]));
    let line = mon.wait_line("too big", |l| l.contains(" drop too_big"));
    assert!(
        line.contains(&format!("udp {a}:"))
            && line.contains(&format!(" -> {b}:9 "))
            && line.ends_with("len 1468"),
        "{line}"
    );
    show("ip route get in a", &sh(&mut in_ns(&a_ns, &["ip", "route", "get", &b.to_string()])));

    // Dead host.
    c.kill_agent("h2");
    sh(&mut in_ns(&h2_ns, &["ip", "link", "set", "eth0", "down"]));
    assert!(!try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", &b.to_string()])).status.success());
    let line = mon.wait_line("flow a -> b", |l| {
        l.contains(" flow tx_encap") && l.contains(&format!("icmp {a} -> {b}"))
    });
    assert!(line.contains(&format!("vni {BLUE_VNI}")), "{line}");
    show(
        "bpftool ENDPOINTS on h1 while h2's lease runs",
        &serde_json::to_string(&c.map("h1", "ENDPOINTS")).expect("JSON"),
    );
    let gone = wait_for(Duration::from_secs(20), || (!c.maps_hold("h1", b)).then_some(()));
    assert!(gone.is_some(), "h1 still holds b after h2's lease ran out");
    let state = c.host_state("h2");
    assert!(state.as_deref().is_some_and(|s| s.starts_with("down")), "{state:?}");
    show("overlay host ls", &String::from_utf8_lossy(&c.cli(&["host", "ls"]).stdout));
    let _ = try_sh(&mut in_ns(&a_ns, &["ping", "-c", "1", "-W", "1", &b.to_string()]));
    let line = mon.wait_line("no endpoint for b", |l| {
        l.contains(" drop no_endpoint") && l.contains(&format!("{a} -> {b}"))
    });
    assert!(line.contains(&format!("vni {BLUE_VNI}")), "{line}");
    show(
        "bpftool ENDPOINTS on h1 after h2's lease ran out",
        &serde_json::to_string(&c.map("h1", "ENDPOINTS")).expect("JSON"),
    );
    show("monitor on h1", &mon.stop_lines().join("\n"));
}
