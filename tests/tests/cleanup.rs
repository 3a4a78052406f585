//! A test that fails must still leave nothing behind: no namespace, no pin, no process.

use std::{net::Ipv4Addr, sync::Mutex, time::Duration};

use overlay_tests::{
    agent::Source,
    scenario::{Scenario, network},
    skip_unless_privileged,
    topology::Topology,
};

/// Every process whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{}: {cmdline}", name.to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn a_panicking_test_leaves_no_namespace_pin_or_process() {
    if skip_unless_privileged() {
        return;
    }
    let id = Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let mut topo = Topology::new("cleanup", 2);
        *id.lock().unwrap() = topo.run.id.clone();
        let mut s = Scenario::new(&topo, &[network("blue", 4097, "10.10.0.0/24")]);
        s.attach("a", "h1", "blue", Ipv4Addr::new(10, 10, 0, 2)).attach(
            "b",
            "h2",
            "blue",
            Ipv4Addr::new(10, 10, 0, 3),
        );
        let state = topo.run.path("state.json");
        s.write(&state);
        topo.start_agent("h1", Source::File(&state), &[]);
        topo.start_agent("h2", Source::File(&state), &[]);
        assert!(topo.wait_log("h1", "endpoint up", Duration::from_secs(20)));
        assert!(topo.wait_log("h2", "endpoint up", Duration::from_secs(20)));
        // There is something to clean up: agents, sandbox holders, namespaces, pins.
        assert!(!processes_mentioning(&topo.run.id).is_empty());
        assert!(topo.run.pin_root().exists());
        panic!("a deliberate failure, to see what it leaves behind");
    });
    assert!(result.is_err(), "the scenario was meant to fail");
    let id = id.into_inner().unwrap();
    assert!(!id.is_empty());
    let namespaces: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(&id)).collect()
        })
        .unwrap_or_default();
    assert!(namespaces.is_empty(), "namespaces left: {namespaces:?}");
    assert!(!std::path::Path::new("/sys/fs/bpf").join(&id).exists(), "pins left");
    let procs = processes_mentioning(&id);
    assert!(procs.is_empty(), "processes left: {procs:#?}");
}
