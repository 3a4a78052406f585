//! What an operator sees of a running agent: where its HTTP listener binds, what `/readyz`
//! says when the host is broken and when it is repaired, `/metrics` figures, and the `monitor`
//! stream of drops.

use std::{net::Ipv4Addr, time::Duration};

use overlay_tests::{
    agent::Source,
    in_ns,
    scenario::{Scenario, network},
    skip_unless_privileged,
    topology::Topology,
    try_sh, wait_for,
};

/// `GET http://<addr><path>` from namespace `ns`: the status code and body (None: nothing
/// answered).
fn get(ns: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let out = try_sh(&mut in_ns(ns, &["curl", "-s", "-m", "3", "-w", "\n%{http_code}", &url]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    let code = code.trim().parse().ok().filter(|&c| c != 0)?;
    Some((code, body.to_owned()))
}

/// Two hosts (h2 without an agent: a neighbour on the underlay), one container on h1, whose
/// agent reads a state file.
fn one_host(tag: &str) -> (Topology, std::path::PathBuf) {
    let topo = Topology::new(tag, 2);
    let mut s = Scenario::new(&topo, &[network("blue", 4097, "10.10.0.0/24")]);
    s.attach("c1", "h1", "blue", Ipv4Addr::new(10, 10, 0, 11));
    let state = topo.run.path("state.json");
    s.write(&state);
    (topo, state)
}

/// Without `--health-addr` the agent serves on localhost only (inside its host's namespace);
/// the flag exposes it on another address, here the host's underlay address, where its
/// neighbours reach it.
#[test]
fn the_listener_is_on_localhost_unless_exposed() {
    if skip_unless_privileged() {
        return;
    }
    let (mut topo, state) = one_host("obs-listen");
    topo.start_agent("h1", Source::File(&state), &[]);
    let h1 = topo.host("h1");
    let (ns, vtep) = (h1.ns.clone(), h1.vtep);
    let neighbour = topo.host("h2").ns.clone();
    let local =
        wait_for(Duration::from_secs(20), || get(&ns, "127.0.0.1:9700", "/healthz").filter(|r| r.0 == 200));
    assert_eq!(local.map(|(code, _)| code), Some(200), "/healthz on localhost by default");
    let outside = format!("{vtep}:9700");
    assert_eq!(get(&neighbour, &outside, "/healthz"), None, "not reachable from a neighbour");
    // /healthz answers as soon as the agent serves: each agent is let finish its first pass
    // before the next replaces it, so that the count of passes below says which ran.
    let log_path = topo.host("h1").log.clone();
    let passes =
        || std::fs::read_to_string(&log_path).unwrap_or_default().matches("full reconcile done").count();
    let reconciled = |n: usize| wait_for(Duration::from_secs(20), || (passes() >= n).then_some(())).is_some();
    assert!(reconciled(1), "the first agent never reconciled");

    topo.start_agent("h1", Source::File(&state), &["--health-addr", "0.0.0.0:9700"]);
    let exposed =
        wait_for(Duration::from_secs(20), || get(&neighbour, &outside, "/healthz").filter(|r| r.0 == 200));
    assert_eq!(exposed.map(|(code, _)| code), Some(200), "exposed with --health-addr 0.0.0.0:9700");
    assert!(reconciled(2), "the second agent never reconciled");

    // `off`: the agent runs (it takes the container over again) and serves nothing.
    topo.start_agent("h1", Source::File(&state), &["--health-addr", "off"]);
    let log = || std::fs::read_to_string(&topo.host("h1").log).unwrap_or_default();
    let third = wait_for(Duration::from_secs(20), || (passes() >= 3).then_some(()));
    assert!(third.is_some(), "the third agent reconciled: {}", log());
    assert_eq!(log().matches("endpoint listening").count(), 2, "{}", log());
    assert_eq!(get(&ns, "127.0.0.1:9700", "/healthz"), None, "no listener with --health-addr off");
}

/// Polls `GET /readyz` on 127.0.0.1:9700 in `ns` every 100 ms on a thread of its own, keeping
/// every answer, so that a short unready spell is seen however the test's own steps are timed.
struct Watcher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(u16, serde_json::Value)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(ns: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ns, s, st) = (ns.to_owned(), seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some((code, body)) = get(&ns, "127.0.0.1:9700", "/readyz")
                    && let Ok(body) = serde_json::from_str(&body)
                {
                    s.lock().expect("seen").push((code, body));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self { stop, seen, thread: Some(thread) }
    }

    /// The first answer `pred` accepts, waiting up to `timeout` for it.
    fn wait(
        &self,
        timeout: Duration,
        pred: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        wait_for(timeout, || {
            self.seen
                .lock()
                .expect("seen")
                .iter()
                .find(|(code, body)| pred(*code, body))
                .map(|(_, b)| b.clone())
        })
    }

    /// Forgets what was seen so far.
    fn clear(&self) {
        self.seen.lock().expect("seen").clear();
    }

    fn last(&self) -> Option<(u16, serde_json::Value)> {
        self.seen.lock().expect("seen").last().cloned()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a /readyz body says check `name` failed.
fn failed(body: &serde_json::Value, name: &str) -> bool {
    body["failed"].as_array().is_some_and(|f| f.iter().any(|n| n == name))
}

/// The id of the bpf_link pinned at `pin`, as bpftool shows it.
fn link_id(pin: &std::path::Path) -> u64 {
    let out = overlay_tests::sh(
        std::process::Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(pin),
    );
    let link: serde_json::Value = serde_json::from_str(&out).expect("bpftool JSON");
    link["id"].as_u64().unwrap_or_else(|| panic!("no link id in {out}"))
}

/// An attachment detached by hand (`bpftool link detach`: the link and its pin stay, the
/// interface is gone from it) makes /readyz 503 naming `programs_attached` and the pin; the
/// agent attaches it again on its own within a second or two, and /readyz is 200 again. Both
/// for a container's veth and for the uplink, with the container reaching its gateway after.
#[test]
fn readiness_fails_while_an_attachment_is_detached_and_the_agent_repairs_it() {
    if skip_unless_privileged() {
        return;
    }
    let (mut topo, state) = one_host("obs-detach");
    topo.start_agent("h1", Source::File(&state), &[]);
    let h1 = topo.host("h1");
    let (ns, links) = (h1.ns.clone(), h1.pin_dir.join("links"));
    let watcher = Watcher::start(&ns);
    let ready = watcher.wait(Duration::from_secs(20), |code, _| code == 200);
    assert!(ready.is_some(), "never ready: {:?}", watcher.last());
    let endpoint = std::fs::read_dir(&links)
        .expect("links")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ep_")))
        .expect("the container's attachment");
    let container = topo.host("h1").container_ns("c1");
    for pin in [endpoint, links.join("uplink_tc")] {
        let id = link_id(&pin);
        watcher.clear();
        overlay_tests::sh(std::process::Command::new("bpftool").args([
            "link",
            "detach",
            "id",
            &id.to_string(),
        ]));
        let name = pin.display().to_string();
        let unready = watcher.wait(Duration::from_secs(10), |code, body| {
            code == 503 && failed(body, "programs_attached") && body["reasons"].to_string().contains(&name)
        });
        assert!(unready.is_some(), "{name} detached and still ready: {:?}", watcher.last());
        let again = watcher.wait(Duration::from_secs(10), |code, _| code == 200);
        assert!(again.is_some(), "{name} not repaired: {:?}", watcher.last());
        assert_ne!(link_id(&pin), id, "{name}: a new attachment is pinned");
    }
    let health: serde_json::Value =
        serde_json::from_str(&get(&ns, "127.0.0.1:9700", "/healthz").expect("healthz").1).expect("JSON");
    assert_eq!(health["datapath"]["reattached"], 2, "{health}");
    // The container's path works through the new attachment: ARP for its gateway is answered
    // by from_container.
    let arp = try_sh(&mut in_ns(&container, &["ping", "-c", "1", "-W", "2", "10.10.0.1"]));
    let neigh = String::from_utf8_lossy(
        &try_sh(&mut in_ns(&container, &["ip", "neigh", "show", "10.10.0.1"])).stdout,
    )
    .into_owned();
    assert!(neigh.contains("lladdr"), "the gateway's ARP is answered again: {neigh} ({arp:?})");
}

/// etcd stopped: /readyz stays 200 for the grace (the lease TTL), then turns 503 naming
/// `etcd_watch`; etcd started again: the watch comes back and /readyz is 200, with the
/// reconnect counted.
#[test]
fn readiness_fails_when_etcd_is_gone_past_its_grace() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut c) = overlay_tests::cluster::Cluster::start("obs-etcd", 1, 4) else { return };
    let ns = c.topo.host("h1").ns.clone();
    let watcher = Watcher::start(&ns);
    assert!(watcher.wait(Duration::from_secs(20), |code, _| code == 200).is_some(), "{:?}", watcher.last());
    c.etcd.stop();
    let stopped = std::time::Instant::now();
    watcher.clear();
    let unready =
        watcher.wait(Duration::from_secs(20), |code, body| code == 503 && failed(body, "etcd_watch"));
    assert!(unready.is_some(), "etcd gone and still ready: {:?}", watcher.last());
    let after = stopped.elapsed();
    assert!(after >= Duration::from_secs(3), "unready after {after:?}, before the grace of 4 s");
    watcher.clear();
    c.etcd.restart().expect("etcd restarted");
    let again = watcher.wait(Duration::from_secs(30), |code, _| code == 200);
    assert!(again.is_some(), "not ready again: {:?}", watcher.last());
    let body = again.unwrap_or_default();
    assert!(body["health"]["etcd"]["reconnects"].as_u64() >= Some(1), "{body}");
}

/// The control plane's figures in `/metrics`, parsed with a Prometheus text parser: objects of
/// the desired state by kind, the latency of an endpoint's creation to its ready report and of
/// the watch's events to their application, the etcd watch's state, its reconnects and the
/// failed lease renewals across an etcd restart, readiness check by check, and the process's
/// own figures.
#[test]
#[expect(clippy::float_cmp, reason = "counts are integers, which f64 holds exactly")]
fn metrics_show_the_control_plane_and_the_process() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut c) = overlay_tests::cluster::Cluster::start("obs-mx", 2, 4) else { return };
    c.ok(&["network", "create", "--subnet", "10.70.0.0/24", "blue"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "blue", "c1"]);
    c.ok(&["container", "create", "--host", "h2", "--network", "blue", "c2"]);
    let value = |scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .and_then(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
    };
    let scrape = |c: &overlay_tests::cluster::Cluster| {
        let text = c.metrics("h1");
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text")
    };
    // Both endpoints known to h1 (its own and c2 from the watch).
    let settled = wait_for(Duration::from_secs(10), || {
        let s = scrape(&c);
        (value(&s, "overlay_objects", Some(("kind", "endpoints"))) == Some(2.0)).then_some(s)
    });
    let s = settled.unwrap_or_else(|| panic!("h1 never counted 2 endpoints: {}", c.metrics("h1")));
    for (kind, n) in [("networks", 1.0), ("containers", 1.0), ("hosts", 2.0)] {
        assert_eq!(value(&s, "overlay_objects", Some(("kind", kind))), Some(n), "{kind}");
    }
    assert_eq!(value(&s, "overlay_etcd_connected", None), Some(1.0));
    assert_eq!(value(&s, "overlay_ready_check", Some(("check", "programs_attached"))), Some(1.0));
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let started = value(&s, "overlay_process_start_time_seconds", None).expect("start time");
    assert!(now - started < 600.0 && now >= started - 2.0, "started at {started}, now {now}");
    assert!(value(&s, "overlay_process_resident_memory_bytes", None).is_some_and(|v| v > 1e6));
    assert!(value(&s, "overlay_process_open_fds", None).is_some_and(|v| v > 3.0));
    assert!(value(&s, "overlay_process_cpu_seconds_total", None).is_some_and(|v| v > 0.0));
    // Latencies: c1 is the one endpoint created on h1 while its agent ran, reported ready once;
    // the watch brought h1 the events of all three creations.
    let text = c.metrics("h1");
    let plain = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert_eq!(plain("overlay_endpoint_ready_latency_seconds_count"), 1.0);
    let took = plain("overlay_endpoint_ready_latency_seconds_sum");
    assert!(took > 0.0 && took < 10.0, "c1 took {took} s to be ready");
    assert!(plain("overlay_etcd_watch_lag_seconds_count") >= 1.0);
    let reconnects = value(&s, "overlay_etcd_reconnects_total", None).expect("reconnects");
    let renewals = value(&s, "overlay_lease_renewals_failed_total", None).expect("renewals failed");

    // etcd away for a few seconds: the watch and the renewals fail, then come back.
    c.etcd.stop();
    let down = wait_for(Duration::from_secs(10), || {
        (value(&scrape(&c), "overlay_etcd_connected", None) == Some(0.0)).then_some(())
    });
    assert!(down.is_some(), "the watch is not seen down");
    std::thread::sleep(Duration::from_secs(3));
    c.etcd.restart().expect("etcd restarted");
    let back = wait_for(Duration::from_secs(20), || {
        let s = scrape(&c);
        (value(&s, "overlay_etcd_connected", None) == Some(1.0)).then_some(s)
    });
    let s = back.unwrap_or_else(|| panic!("the watch is not back: {}", c.metrics("h1")));
    assert_eq!(value(&s, "overlay_etcd_reconnects_total", None), Some(reconnects + 1.0));
    assert!(value(&s, "overlay_lease_renewals_failed_total", None).is_some_and(|v| v > renewals));
}
