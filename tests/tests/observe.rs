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

    topo.start_agent("h1", Source::File(&state), &["--health-addr", "0.0.0.0:9700"]);
    let exposed =
        wait_for(Duration::from_secs(20), || get(&neighbour, &outside, "/healthz").filter(|r| r.0 == 200));
    assert_eq!(exposed.map(|(code, _)| code), Some(200), "exposed with --health-addr 0.0.0.0:9700");

    // `off`: the agent runs (it takes the container over again) and serves nothing.
    topo.start_agent("h1", Source::File(&state), &["--health-addr", "off"]);
    let log = || std::fs::read_to_string(&topo.host("h1").log).unwrap_or_default();
    let third = wait_for(Duration::from_secs(20), || {
        (log().matches("full reconcile done").count() >= 3).then_some(())
    });
    assert!(third.is_some(), "the third agent reconciled: {}", log());
    assert_eq!(log().matches("endpoint listening").count(), 2, "{}", log());
    assert_eq!(get(&ns, "127.0.0.1:9700", "/healthz"), None, "no listener with --health-addr off");
}
