//! The harness's smoke runs (`overlay-bench --quick`, and `--egress --quick`; seconds), so the
//! benchmark keeps working as the code under it changes. They check that every topology (every
//! side) passed traffic in every test and that the control-plane stages produced figures; they
//! never check a speed (this machine is shared with the rest of the test suite, and the targets
//! are for the real run to report).

use std::process::Command;

use serde_json::Value;

#[test]
fn quick_bench_passes_traffic_on_every_topology() {
    if overlay_tests::skip_unless_privileged() {
        return;
    }
    if Command::new("iperf3").arg("--version").output().is_err()
        && overlay_tests::skip("iperf3 is not installed (install iperf3, or run ./setup)")
    {
        return;
    }
    if overlay_tests::etcd::Etcd::binary().is_none()
        && overlay_tests::skip("no etcd binary (install etcd-server, or run ./setup)")
    {
        return;
    }
    let out = tempfile::tempdir().expect("temp dir");
    let run = Command::new(env!("CARGO_BIN_EXE_overlay-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(out.path())
        .arg("--agent")
        .arg(overlay_tests::binary("overlay-agent"))
        .output()
        .expect("running overlay-bench");
    assert!(
        run.status.success(),
        "overlay-bench --quick failed ({}):\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );

    let text = std::fs::read_to_string(out.path().join("samples.json")).expect("samples.json");
    let results: Value = serde_json::from_str(&text).expect("samples.json parses");
    let samples = results["samples"].as_array().expect("samples");
    for topology in ["no-overlay", "kernel-vxlan", "ebpf"] {
        let data = |test: &str| -> &Value {
            let s = samples
                .iter()
                .find(|s| s["topology"] == topology && s["test"] == test)
                .unwrap_or_else(|| panic!("no {test} sample for {topology}"));
            &s["data"]
        };
        for test in ["tcp-rr", "udp-rr"] {
            let rtts = data(test)["rtt_ns"].as_array().map_or(0, Vec::len);
            assert!(rtts > 0, "{topology}: {test} got no answers");
        }
        assert!(data("tcp-stream")["bytes"].as_u64().unwrap_or(0) > 0, "{topology}: no TCP stream bytes");
        assert!(data("udp-pps")["packets"].as_u64().unwrap_or(0) > 0, "{topology}: no UDP packets");
        assert!(data("cpu-tcp")["bytes"].as_u64().unwrap_or(0) > 0, "{topology}: no bytes in the CPU test");
        assert!(
            data("cpu-udp")["total_packets"].as_u64().unwrap_or(0) > 0,
            "{topology}: no packets in the CPU test"
        );
    }

    let cp = &results["control_plane"];
    for source in ["etcd", "file"] {
        let reach = cp["reach"].as_array().and_then(|r| r.iter().find(|r| r["source"] == source));
        let reached = reach.and_then(|r| r["samples_ms"].as_array()).map_or(0, Vec::len);
        assert!(reached > 0, "no endpoint became reachable through {source}: {}", cp["reach_errors"]);
    }
    let loaded = cp["loads"].as_array().and_then(|l| l.first()).and_then(|l| l["map_entries"].as_u64());
    assert!(loaded.unwrap_or(0) > 0, "the load stage filled no map: {}", cp["load_error"]);

    assert!(
        std::fs::read_to_string(out.path().join("summary.md")).expect("summary.md").contains("| Figure |")
    );
    let png = std::fs::read(out.path().join("latency.png")).expect("latency.png");
    assert!(png.starts_with(b"\x89PNG"), "latency.png is not a PNG");
}

/// The egress stage's smoke run (`--egress --quick`): both ways out (the overlay's and Docker's
/// design) carried every test's traffic, and the table was written.
#[test]
fn quick_egress_stage_passes_traffic_on_both_sides() {
    if overlay_tests::skip_unless_privileged() {
        return;
    }
    for (program, package) in [("iperf3", "iperf3"), ("iptables-restore", "iptables")] {
        if Command::new(program).arg("--version").output().is_err()
            && overlay_tests::skip(&format!("{program} is not installed (install {package}, or run ./setup)"))
        {
            return;
        }
    }
    if overlay_tests::etcd::Etcd::binary().is_none()
        && overlay_tests::skip("no etcd binary (install etcd-server, or run ./setup)")
    {
        return;
    }
    let out = tempfile::tempdir().expect("temp dir");
    let run = Command::new(env!("CARGO_BIN_EXE_overlay-bench"))
        .args(["--egress", "--quick", "--out"])
        .arg(out.path())
        .output()
        .expect("running overlay-bench");
    assert!(
        run.status.success(),
        "overlay-bench --egress --quick failed ({}):\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(out.path().join("egress.json")).expect("egress.json");
    let results: Value = serde_json::from_str(&text).expect("egress.json parses");
    let samples = results["samples"].as_array().expect("samples");
    for side in ["overlay", "docker-design"] {
        for figure in [
            "tcp-rr-p50",
            "tcp-rr-p99",
            "udp-rr-p50",
            "udp-rr-p99",
            "stream-out",
            "stream-in",
            "stream-out4",
            "cpu-per-gb",
        ] {
            let value = samples
                .iter()
                .find(|s| s["side"] == side && s["figure"] == figure)
                .and_then(|s| s["value"].as_f64());
            assert!(value.is_some_and(|v| v > 0.0), "{side}: {figure} is {value:?}");
        }
    }
    let table = std::fs::read_to_string(out.path().join("egress.md")).expect("egress.md");
    assert!(table.contains("| Figure | eBPF overlay"), "{table}");
}
