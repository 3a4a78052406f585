//! One measurement of one figure on one topology: the client in container a (host h1), the
//! server in container b (host h2), so every packet crosses the underlay between the hosts.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use overlay_tests::{Proc, in_ns};

use crate::{
    sys::{CpuMeter, CpuUse, read_line_timeout, worker_in},
    topology::{ECHO_PORT, IPERF_PORT, SINK_PORT, Topology},
    worker::{FloodResult, RrResult, SinkResult},
};

/// How long and how hard each test runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// Requests per request/response test (after the warm-up).
    pub rr_count: usize,
    pub rr_warmup: usize,
    /// Request and response size, bytes.
    pub rr_size: usize,
    /// Seconds of the single-stream TCP test (iperf3 takes whole seconds).
    pub stream_secs: u32,
    /// Seconds counted by the 64-byte UDP test, after `pps_warmup_ms` of traffic.
    pub pps_secs: f64,
    pub pps_warmup_ms: u64,
    /// UDP payload of the packet-rate test, bytes.
    pub pps_payload: usize,
    /// Offered load of the CPU-cost tests: TCP bits/s and 64-byte UDP packets/s, the same on
    /// every topology, so CPU time is compared for the same work.
    pub cpu_tcp_bps: u64,
    pub cpu_tcp_secs: u32,
    pub cpu_udp_pps: u64,
    pub cpu_udp_secs: f64,
}

/// The tests of a round, in the order they run on each topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Test {
    TcpRr,
    UdpRr,
    TcpStream,
    UdpPps,
    CpuTcp,
    CpuUdp,
}

impl Test {
    pub const ALL: [Test; 6] =
        [Test::TcpRr, Test::UdpRr, Test::TcpStream, Test::UdpPps, Test::CpuTcp, Test::CpuUdp];

    pub fn key(self) -> &'static str {
        match self {
            Test::TcpRr => "tcp-rr",
            Test::UdpRr => "udp-rr",
            Test::TcpStream => "tcp-stream",
            Test::UdpPps => "udp-pps",
            Test::CpuTcp => "cpu-tcp",
            Test::CpuUdp => "cpu-udp",
        }
    }
}

/// What one test measured: the raw material of the figures, kept whole in samples.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Data {
    /// Request/response: every round-trip time, ns.
    Rr { proto: String, size: usize, rtt_ns: Vec<u64>, lost: u64 },
    /// iperf3, one TCP stream, as fast as it goes (bytes as the receiver counted them).
    Stream { secs: f64, bytes: u64, bits_per_second: f64, retransmits: u64, cpu: CpuUse },
    /// UDP datagrams as fast as the sender can: `packets` received in the window of `secs`,
    /// `total_packets` over the whole exchange (what `cpu` paid for), `sent` by the sender.
    Pps { payload: usize, secs: f64, packets: u64, total_packets: u64, sent: u64, cpu: CpuUse },
    /// TCP at a fixed offered rate: the CPU time it cost for the bytes received.
    CpuTcp { offered_bps: u64, secs: f64, bytes: u64, cpu: CpuUse },
    /// 64-byte UDP at a fixed offered rate: the CPU time it cost for every packet received.
    CpuUdp { offered_pps: u64, payload: usize, secs: f64, total_packets: u64, sent: u64, cpu: CpuUse },
}

pub fn run(test: Test, topo: &Topology, exe: &Path, plan: &Plan) -> anyhow::Result<Data> {
    match test {
        Test::TcpRr => rr(topo, exe, "tcp", plan),
        Test::UdpRr => rr(topo, exe, "udp", plan),
        Test::TcpStream => {
            let r = iperf(topo, plan.stream_secs, None)?;
            Ok(Data::Stream {
                secs: r.secs,
                bytes: r.bytes,
                bits_per_second: r.bits_per_second,
                retransmits: r.retransmits,
                cpu: r.cpu,
            })
        }
        Test::UdpPps => {
            let (sink, flood, cpu) =
                udp(topo, exe, plan.pps_payload, plan.pps_secs, plan.pps_warmup_ms, None)?;
            Ok(Data::Pps {
                payload: plan.pps_payload,
                secs: sink.secs,
                packets: sink.packets,
                total_packets: sink.total_packets,
                sent: flood.sent,
                cpu,
            })
        }
        Test::CpuTcp => {
            let r = iperf(topo, plan.cpu_tcp_secs, Some(plan.cpu_tcp_bps))?;
            Ok(Data::CpuTcp { offered_bps: plan.cpu_tcp_bps, secs: r.secs, bytes: r.bytes, cpu: r.cpu })
        }
        Test::CpuUdp => {
            let (sink, flood, cpu) = udp(
                topo,
                exe,
                plan.pps_payload,
                plan.cpu_udp_secs,
                plan.pps_warmup_ms,
                Some(plan.cpu_udp_pps),
            )?;
            Ok(Data::CpuUdp {
                offered_pps: plan.cpu_udp_pps,
                payload: plan.pps_payload,
                secs: flood.secs,
                total_packets: sink.total_packets,
                sent: flood.sent,
                cpu,
            })
        }
    }
}

fn rr(topo: &Topology, exe: &Path, proto: &str, plan: &Plan) -> anyhow::Result<Data> {
    let mut cmd = worker_in(topo.client_ns(), exe);
    cmd.args(["rr", "--proto", proto, "--to", &topo.server_addr(ECHO_PORT).to_string()])
        .args(["--size", &plan.rr_size.to_string(), "--count", &plan.rr_count.to_string()])
        .args(["--warmup", &plan.rr_warmup.to_string(), "--timeout-ms", "1000"])
        .stdout(Stdio::piped());
    let mut client = Proc::try_spawn(&format!("{proto} rr client"), &mut cmd)?;
    // Generous: a lost UDP request costs a whole timeout.
    let limit = Duration::from_mins(1) + Duration::from_millis(plan.rr_count as u64 / 10);
    let out = client.wait_output(limit)?;
    let r: RrResult = serde_json::from_str(out.trim()).context("parsing the rr client's result")?;
    Ok(Data::Rr { proto: proto.to_owned(), size: plan.rr_size, rtt_ns: r.rtt_ns, lost: r.lost })
}

struct Iperf {
    secs: f64,
    bytes: u64,
    bits_per_second: f64,
    retransmits: u64,
    cpu: CpuUse,
}

/// One iperf3 client run against the server container's iperf3, single stream.
fn iperf(topo: &Topology, secs: u32, rate_bps: Option<u64>) -> anyhow::Result<Iperf> {
    let server = topo.server_addr(IPERF_PORT);
    let mut last_error = String::new();
    // The server may still be finishing the previous test (iperf3 serves one at a time).
    for _ in 0..30 {
        let mut cmd = in_ns(topo.client_ns(), &["iperf3"]);
        cmd.args(["-c", &server.ip().to_string(), "-p", &server.port().to_string()]).args([
            "-t",
            &secs.to_string(),
            "-J",
        ]);
        if let Some(rate) = rate_bps {
            cmd.args(["-b", &rate.to_string()]);
        }
        let meter = CpuMeter::start(&[topo.iperf_server_pid()])?;
        let out = cmd.stdin(Stdio::null()).output().context("running iperf3")?;
        let cpu = meter.finish()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
        if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
            err.clone_into(&mut last_error);
            if err.contains("busy") || err.contains("unable to connect") || err.contains("Connection refused")
            {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            bail!("iperf3: {err}");
        }
        let recv = &v["end"]["sum_received"];
        return Ok(Iperf {
            secs: recv["seconds"].as_f64().unwrap_or(0.0),
            bytes: recv["bytes"].as_u64().unwrap_or(0),
            bits_per_second: recv["bits_per_second"].as_f64().unwrap_or(0.0),
            retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
            cpu,
        });
    }
    bail!("iperf3 could not run: {last_error}")
}

/// The UDP sink in the server container, the sender in the client container.
fn udp(
    topo: &Topology,
    exe: &Path,
    payload: usize,
    secs: f64,
    warmup_ms: u64,
    pps: Option<u64>,
) -> anyhow::Result<(SinkResult, FloodResult, CpuUse)> {
    let sink_args = [
        "udp-sink",
        "--port",
        &SINK_PORT.to_string(),
        "--secs",
        &secs.to_string(),
        "--warmup-ms",
        &warmup_ms.to_string(),
        "--first-timeout-ms",
        "5000",
    ];
    let meter = CpuMeter::start(&[])?;
    let (mut sink, out) = spawn_ready_worker(topo.server_ns(), exe, "udp sink", &sink_args)?;
    // The sender outlasts the sink's window (first packet + warm-up + window) by a margin.
    let send_secs = warmup_ms as f64 / 1000.0 + secs + 0.3;
    let mut cmd = worker_in(topo.client_ns(), exe);
    cmd.args(["udp-flood", "--to", &topo.server_addr(SINK_PORT).to_string()])
        .args(["--size", &payload.to_string(), "--secs", &send_secs.to_string()])
        .stdout(Stdio::piped());
    if let Some(rate) = pps {
        cmd.args(["--pps", &rate.to_string()]);
    }
    let mut flood = Proc::try_spawn("udp sender", &mut cmd)?;
    let limit = Duration::from_secs_f64(send_secs + 10.0);
    let flood_out = flood.wait_output(limit)?;
    let sink_out = wait_rest(&mut sink, out, limit)?;
    // Both workers are reaped: their CPU time is in.
    let cpu = meter.finish()?;
    let flood: FloodResult = serde_json::from_str(flood_out.trim()).context("parsing the sender's result")?;
    let sink: SinkResult = serde_json::from_str(sink_out.trim()).context("parsing the sink's result")?;
    Ok((sink, flood, cpu))
}

/// The rest of a worker's stdout (after its `ready` line) once it exits.
pub fn wait_rest(
    proc: &mut Proc,
    mut out: std::process::ChildStdout,
    limit: Duration,
) -> anyhow::Result<String> {
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut text);
        text
    });
    proc.wait_output(limit)?;
    reader.join().map_err(|_| anyhow::anyhow!("reader thread panicked"))
}

/// `ip netns exec <ns> <exe> worker ...` with stdout piped, after its `ready` line.
pub fn spawn_ready_worker(
    ns: &str,
    exe: &Path,
    name: &str,
    args: &[&str],
) -> anyhow::Result<(Proc, std::process::ChildStdout)> {
    let mut cmd = worker_in(ns, exe);
    cmd.args(args).stdout(Stdio::piped());
    let mut proc = Proc::try_spawn(name, &mut cmd)?;
    let (line, out) = read_line_timeout(proc.take_stdout().context("worker stdout")?, Duration::from_secs(5))
        .with_context(|| format!("{name}: waiting for ready"))?;
    if line != "ready" {
        bail!("{name} said {line:?}");
    }
    Ok((proc, out))
}
