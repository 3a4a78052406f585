//! The egress stage (`overlay-bench --egress`): a container's traffic to "the outside" through
//! its host, on this project's path against Docker's (docker_gwbridge: a bridge, MASQUERADE)
//! built beside it in the same run, on the same underlay, to the same server (issue 12).
//!
//! ```text
//!  outside 198.19.0.2 ── router (the underlay namespace, 198.18.0.254) ── br0 (the switch)
//!      ├─ h1 198.18.0.1: overlay-agent (etcd), container c 10.74.0.2 on network "out", MTU 1500
//!      │     (its route to the overlay subnet: MTU 1450)
//!      └─ d1 198.18.0.2: docker_gwbridge 172.18.0.1/16, container dc 172.18.0.2, MTU 1500
//! ```
//!
//! * overlay: the tests' cluster with one host (`Cluster`: real etcd, the agent), a network
//!   with a way out and a container on it, created with the CLI. Its packets to the outside go
//!   up h1's stack from the TC program of its veth, are masqueraded by the agent's table `ip
//!   overlay`, and the replies come back by the agent's routes (docs/egress.md).
//! * Docker's design, as dockerd sets up docker_gwbridge on a host of an overlay swarm: a
//!   Linux bridge holding 172.18.0.1/16, the container's veth in it (Docker's default MTU,
//!   1500), its default route via the bridge, `ip_forward` on, and dockerd's own iptables rules
//!   for a bridge network whose containers may not talk to each other (`enable_icc=false`, as
//!   docker_gwbridge is made): `MASQUERADE` of the subnet out of anything but the bridge, the
//!   `FORWARD` chain with `DOCKER-USER`, both isolation stages, the conntrack accept and the
//!   ICC drop, policy DROP. Loaded with `iptables-restore` (iptables-nft here, as on Docker's
//!   current hosts).
//!
//! The same router, the same outside with one echo server (the harness's worker) and one
//! iperf3 server; the underlay routes neither container subnet, so traffic that works at all
//! was masqueraded. Rounds alternate the two sides test by test, overlay first in even rounds
//! and Docker's design first in odd ones (`order`); request/response runs in blocks that take
//! turns A B B A within a round (`RR_BLOCKS`), so drift over a round weighs on both sides alike.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    Proc, Run,
    cluster::Cluster,
    in_ns, ip, ip_in,
    outside::{self, OUTSIDE},
    try_sh,
    underlay::{self, Member, Options},
    wait_for,
};
use serde::{Deserialize, Serialize};

use crate::{
    report::{Spread, num},
    stats::percentile,
    sys::{CpuMeter, read_line_timeout, sysctl_in, worker_in},
    topology::{ECHO_PORT, IPERF_PORT},
    worker::RrResult,
};

const NET: &str = "out";
const SUBNET: &str = "10.74.0.0/24";
/// The Docker-design host's address on the underlay (h1 is 198.18.0.1).
const DOCKER_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// docker_gwbridge's defaults: the bridge's address and subnet, the first container's address.
const GWBRIDGE: &str = "docker_gwbridge";
const GWBRIDGE_ADDR: &str = "172.18.0.1";
const GWBRIDGE_SUBNET: &str = "172.18.0.0/16";
const DOCKER_CONTAINER_ADDR: &str = "172.18.0.2/16";
/// Docker's default MTU for a bridge network's containers (`--egress-docker-mtu` changes it);
/// the overlay's are uplink - 50.
pub const DOCKER_MTU: u32 = 1500;
/// The link from the router to the outside: as large as the underlay's, so no path MTU
/// below either container's interface.
const OUTSIDE_MTU: u32 = 1500;

/// Sizes of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EgressPlan {
    pub rounds: usize,
    pub rr_count: usize,
    pub rr_warmup: usize,
    pub rr_size: usize,
    /// Seconds of each iperf3 test.
    pub stream_secs: u32,
    /// The MTU of the Docker-design container's interface and its bridge port.
    pub docker_mtu: u32,
}

impl EgressPlan {
    pub fn new(
        quick: bool,
        rounds: Option<usize>,
        rr_count: Option<usize>,
        stream_secs: Option<u32>,
        docker_mtu: Option<u32>,
    ) -> Self {
        Self {
            rounds: rounds.unwrap_or(if quick { 1 } else { 5 }).max(1),
            rr_count: rr_count.unwrap_or(if quick { 1000 } else { 20_000 }),
            rr_warmup: if quick { 50 } else { 500 },
            rr_size: 64,
            stream_secs: stream_secs.unwrap_or(if quick { 1 } else { 4 }).max(1),
            docker_mtu: docker_mtu.unwrap_or(DOCKER_MTU),
        }
    }
}

/// The two ways out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Overlay,
    DockerDesign,
}

impl Side {
    pub const ALL: [Side; 2] = [Side::Overlay, Side::DockerDesign];

    pub fn title(self, plan: &EgressPlan) -> String {
        match self {
            Side::Overlay => "eBPF overlay (MTU 1500; 1450 to the overlay)".to_owned(),
            Side::DockerDesign => format!("Docker's design (MTU {})", plan.docker_mtu),
        }
    }
}

/// What the stage reports, each a number per round per side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Figure {
    TcpRrP50,
    TcpRrP99,
    UdpRrP50,
    UdpRrP99,
    StreamOut,
    StreamIn,
    StreamOut4,
    CpuPerGb,
}

impl Figure {
    pub const ALL: [Figure; 8] = [
        Figure::TcpRrP50,
        Figure::TcpRrP99,
        Figure::UdpRrP50,
        Figure::UdpRrP99,
        Figure::StreamOut,
        Figure::StreamIn,
        Figure::StreamOut4,
        Figure::CpuPerGb,
    ];

    fn title(self) -> &'static str {
        match self {
            Figure::TcpRrP50 => "TCP request/response p50 (µs, lower is better)",
            Figure::TcpRrP99 => "TCP request/response p99 (µs, lower is better)",
            Figure::UdpRrP50 => "UDP request/response p50 (µs, lower is better)",
            Figure::UdpRrP99 => "UDP request/response p99 (µs, lower is better)",
            Figure::StreamOut => "TCP container → outside, 1 stream (Gbit/s, higher is better)",
            Figure::StreamIn => "TCP outside → container, 1 stream (Gbit/s, higher is better)",
            Figure::StreamOut4 => "TCP container → outside, 4 streams (Gbit/s, higher is better)",
            Figure::CpuPerGb => "CPU per GB, container → outside, 1 stream (CPU-s/GB, lower is better)",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub round: usize,
    pub side: Side,
    pub figure: Figure,
    pub value: f64,
}

/// The stage's samples.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Egress {
    pub plan: EgressPlan,
    pub samples: Vec<Sample>,
}

impl Egress {
    /// One side's values of `figure`, in round order.
    fn values(&self, side: Side, figure: Figure) -> Vec<f64> {
        self.samples.iter().filter(|s| s.side == side && s.figure == figure).map(|s| s.value).collect()
    }

    /// overlay ÷ Docker's design, per round.
    fn ratios(&self, figure: Figure) -> Vec<f64> {
        let mine = self.values(Side::Overlay, figure);
        let theirs = self.values(Side::DockerDesign, figure);
        mine.iter().zip(&theirs).map(|(a, b)| a / b).collect()
    }

    /// The median ratio of `figure` (NaN: not measured).
    pub fn ratio(&self, figure: Figure) -> f64 {
        Spread::of(self.ratios(figure)).map_or(f64::NAN, |s| s.median)
    }
}

/// Where each side's client runs, and what the harness keeps running for the stage.
struct Sides {
    overlay_ns: String,
    docker_ns: String,
    /// The echo server and the iperf3 server in the outside, killed when dropped.
    servers: Vec<Proc>,
}

impl Sides {
    fn ns(&self, side: Side) -> &str {
        match side {
            Side::Overlay => &self.overlay_ns,
            Side::DockerDesign => &self.docker_ns,
        }
    }

    fn iperf_pid(&self) -> u32 {
        self.servers.iter().find(|p| p.name == "iperf3 server").map_or(0, Proc::pid)
    }
}

pub fn run(plan: &EgressPlan, exe: &Path) -> anyhow::Result<Egress> {
    let c = Cluster::start("begress", 1, 10).context("no etcd (run ./setup)")?;
    // Everything below is named after the cluster's run: its namespaces (the Docker-design host
    // with its bridge and iptables rules, its container, the outside) go with the cluster,
    // on an error too.
    let h1 = c.topo.host("h1").ns.clone();
    let docker_host = c.topo.run.ns("d1");
    let out_ns = c.topo.run.ns("out");
    let member = Member { ns: &docker_host, addr: DOCKER_HOST };
    // The same switch port as h1's (the tests' topology queues them).
    underlay::attach(&c.topo.underlay, "p2", &member, Options { port_queue: Some(1000) })
        .context("adding the Docker-design host")?;
    outside::build(&c.topo.underlay, &out_ns, OUTSIDE_MTU, &[&h1, &docker_host])
        .context("building the outside")?;

    ok(&c, &["network", "create", "--subnet", SUBNET, NET])?;
    ok(&c, &["container", "create", "--host", "h1", "--network", NET, "c"])?;
    let overlay_ns = c.container_ns("h1", "c");
    let docker_ns = docker_design(&c.topo.run, &docker_host, plan.docker_mtu)?;

    let mut sides = Sides { overlay_ns, docker_ns, servers: Vec::new() };
    start_servers(&mut sides, &out_ns, exe)?;
    for side in Side::ALL {
        let ns = sides.ns(side).to_owned();
        let reached = wait_for(Duration::from_secs(10), || {
            let ping = try_sh(&mut in_ns(&ns, &["ping", "-c", "1", "-W", "1", &OUTSIDE.to_string()]));
            ping.status.success().then_some(())
        });
        if reached.is_none() {
            bail!("the container of {} does not reach the outside", side.title(plan));
        }
    }
    // `sides` (the servers) goes first, then the cluster: its agent, then every namespace.
    measure(&sides, exe, plan)
}

/// Builds Docker's design on `host`; returns the container's namespace.
fn docker_design(run: &Run, host: &str, mtu: u32) -> anyhow::Result<String> {
    let ns = run.ns("dc");
    ip(&["netns", "add", &ns])?;
    ip_in(&ns, &["link", "set", "lo", "up"])?;
    ip_in(host, &["link", "add", GWBRIDGE, "type", "bridge"])?;
    ip_in(host, &["addr", "add", &format!("{GWBRIDGE_ADDR}/16"), "dev", GWBRIDGE])?;
    ip_in(host, &["link", "set", GWBRIDGE, "up"])?;
    ip_in(host, &["link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
    let mtu = mtu.to_string();
    ip_in(host, &["link", "set", "veth0", "mtu", &mtu, "master", GWBRIDGE, "up"])?;
    ip_in(&ns, &["link", "set", "eth0", "mtu", &mtu, "up"])?;
    ip_in(&ns, &["addr", "add", DOCKER_CONTAINER_ADDR, "dev", "eth0"])?;
    ip_in(&ns, &["route", "add", "default", "via", GWBRIDGE_ADDR])?;
    sysctl_in(host, &["net.ipv4.ip_forward=1"])?;
    let mut restore = in_ns(host, &["iptables-restore", "-w"]);
    restore.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = restore.spawn().context("starting iptables-restore")?;
    child.stdin.take().context("stdin")?.write_all(docker_rules().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("iptables-restore of Docker's rules: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(ns)
}

/// The iptables rules dockerd installs for docker_gwbridge (a bridge network with
/// `enable_icc=false`, no published port), in `iptables-save` form.
fn docker_rules() -> String {
    let b = GWBRIDGE;
    let s = GWBRIDGE_SUBNET;
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s {s} ! -o {b} -j MASQUERADE
-A DOCKER -i {b} -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o {b} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o {b} -j DOCKER
-A FORWARD -i {b} ! -o {b} -j ACCEPT
-A FORWARD -i {b} -o {b} -j DROP
-A DOCKER-ISOLATION-STAGE-1 -i {b} ! -o {b} -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o {b} -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
"
    )
}

/// The echo server and the iperf3 server in the outside, for the whole stage.
fn start_servers(sides: &mut Sides, out_ns: &str, exe: &Path) -> anyhow::Result<()> {
    let mut cmd = worker_in(out_ns, exe);
    cmd.args(["serve", "--port", &ECHO_PORT.to_string()]).stdout(Stdio::piped());
    let mut serve = Proc::try_spawn("echo server", &mut cmd)?;
    let out = serve.take_stdout().context("echo server stdout")?;
    let (line, _) = read_line_timeout(out, Duration::from_secs(5)).context("echo server")?;
    if line != "ready" {
        bail!("echo server said {line:?}");
    }
    sides.servers.push(serve);
    let mut cmd = in_ns(out_ns, &["iperf3", "-s", "-p", &IPERF_PORT.to_string()]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    sides.servers.push(Proc::try_spawn("iperf3 server", &mut cmd)?);
    Ok(())
}

/// Request/response blocks per side and round, taking turns A B B A (A: the round's first
/// side). One long run per side let whatever changed over a few seconds (the other CPU's
/// work, the previous test's tail, frequency) land on one side only: per-round TCP p50 ratios
/// spread 0.85-1.24 that way, more than the difference being measured.
const RR_BLOCKS: usize = 4;

/// The order of the two sides in `round`: the first side of a round measures right after the
/// previous round's heaviest test (4 iperf3 streams), so it alternates.
fn order(round: usize) -> [Side; 2] {
    if round.is_multiple_of(2) { Side::ALL } else { [Side::DockerDesign, Side::Overlay] }
}

/// Which side runs each request/response block of `round`: A B B A, repeated.
fn rr_turns(round: usize) -> impl Iterator<Item = Side> {
    let [a, b] = order(round);
    (0..RR_BLOCKS * 2).map(move |i| if matches!(i % 4, 0 | 3) { a } else { b })
}

fn measure(sides: &Sides, exe: &Path, plan: &EgressPlan) -> anyhow::Result<Egress> {
    let mut samples = Vec::new();
    let block = plan.rr_count.div_ceil(RR_BLOCKS).max(1);
    for round in 0..plan.rounds {
        let mut add = |side: Side, figure: Figure, value: f64| {
            samples.push(Sample { round, side, figure, value });
        };
        for proto in ["tcp", "udp"] {
            let mut rtts: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
            for side in rr_turns(round) {
                rtts[side as usize].extend(rr(sides.ns(side), exe, proto, plan, block)?);
            }
            for side in order(round) {
                let rtt = &mut rtts[side as usize];
                rtt.sort_unstable();
                let (p50, p99) = (percentile(rtt, 0.5) / 1e3, percentile(rtt, 0.99) / 1e3);
                let (f50, f99) = if proto == "tcp" {
                    (Figure::TcpRrP50, Figure::TcpRrP99)
                } else {
                    (Figure::UdpRrP50, Figure::UdpRrP99)
                };
                add(side, f50, p50);
                add(side, f99, p99);
                progress(
                    round,
                    plan,
                    side,
                    &format!("{proto} rr"),
                    &format!("p50 {p50:.1} µs, p99 {p99:.1} µs"),
                );
            }
        }
        for (figure, extra) in [
            (Figure::StreamOut, &[][..]),
            (Figure::StreamIn, &["-R"][..]),
            (Figure::StreamOut4, &["-P", "4"][..]),
        ] {
            for side in order(round) {
                let meter = CpuMeter::start(&[sides.iperf_pid()])?;
                let (bytes, bps, retransmits) = iperf(sides.ns(side), plan.stream_secs, extra)?;
                let cpu = meter.finish()?;
                add(side, figure, bps / 1e9);
                let mut line = format!("{:.2} Gbit/s", bps / 1e9);
                if figure == Figure::StreamOut {
                    let per_gb = cpu.traffic_secs / (bytes as f64 / 1e9).max(1e-12);
                    add(side, Figure::CpuPerGb, per_gb);
                    line = format!("{line}, {per_gb:.3} CPU-s/GB");
                }
                // Not a figure, but what tells a lossy path from a slow one.
                line = format!("{line}, {retransmits} retransmits");
                progress(round, plan, side, &format!("iperf3 {}", extra.join(" ")), &line);
            }
        }
    }
    Ok(Egress { plan: plan.clone(), samples })
}

fn progress(round: usize, plan: &EgressPlan, side: Side, test: &str, what: &str) {
    eprintln!("  round {}/{} {test:<13} {:<27} {what}", round + 1, plan.rounds, side.title(plan));
}

/// The harness's request/response client in `ns`, to the outside's echo server: the round
/// trips, ns (a UDP request lost is left out, as in the main stages).
fn rr(ns: &str, exe: &Path, proto: &str, plan: &EgressPlan, count: usize) -> anyhow::Result<Vec<u64>> {
    let to = SocketAddr::from((OUTSIDE, ECHO_PORT));
    let mut cmd = worker_in(ns, exe);
    cmd.args(["rr", "--proto", proto, "--to", &to.to_string()])
        .args(["--size", &plan.rr_size.to_string(), "--count", &count.to_string()])
        .args(["--warmup", &plan.rr_warmup.to_string(), "--timeout-ms", "1000"])
        .stdout(Stdio::piped());
    let mut client = Proc::try_spawn(&format!("{proto} rr client"), &mut cmd)?;
    let limit = Duration::from_mins(1) + Duration::from_millis(count as u64 / 10);
    let out = client.wait_output(limit)?;
    let r: RrResult = serde_json::from_str(out.trim()).context("parsing the rr client's result")?;
    if r.rtt_ns.is_empty() {
        bail!("{proto} rr from {ns}: no answer");
    }
    Ok(r.rtt_ns)
}

/// iperf3 from `ns` to the outside's server with `extra` flags: (bytes, bits/s) as the
/// receiver counted them, and the sender's retransmissions.
fn iperf(ns: &str, secs: u32, extra: &[&str]) -> anyhow::Result<(u64, f64, u64)> {
    let mut last_error = String::new();
    // The server may still be finishing the previous test (iperf3 serves one at a time).
    for _ in 0..30 {
        let mut cmd = in_ns(ns, &["iperf3", "-c", &OUTSIDE.to_string(), "-p", &IPERF_PORT.to_string()]);
        cmd.args(["-t", &secs.to_string(), "-J"]).args(extra);
        let out = cmd.stdin(Stdio::null()).output().context("running iperf3")?;
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
        let bytes = recv["bytes"].as_u64().unwrap_or(0);
        let bps = recv["bits_per_second"].as_f64().unwrap_or(0.0);
        if bytes == 0 {
            bail!("iperf3 from {ns} moved nothing");
        }
        let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
        return Ok((bytes, bps, retransmits));
    }
    bail!("iperf3 could not run: {last_error}")
}

fn ok(c: &Cluster, args: &[&str]) -> anyhow::Result<()> {
    let out = c.cli(args);
    if !out.status.success() {
        bail!("overlay {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The stage's table, in markdown.
pub fn markdown(e: &Egress, cmd: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let p = &e.plan;
    let _ = writeln!(
        out,
        "Egress (`{cmd}`): a container to a server in the outside namespace (behind the underlay's router), through its host, masqueraded. Rounds: {}, the two sides alternating test by test (each side first in every other round). Each cell: median over rounds (min–max); ratio: median of the per-round ratios (min–max). Request/response: the harness's client and echo server, {} requests of {} bytes per side and round, one at a time, in {RR_BLOCKS} blocks per side taking turns A B B A (each after {} warm-up). Throughput: iperf3, {} s per test, the receiver's count. CPU: run time of iperf3 (both ends) and the ksoftirqd threads per GB received.\n",
        p.rounds, p.rr_count, p.rr_size, p.rr_warmup, p.stream_secs
    );
    let _ = writeln!(
        out,
        "| Figure | {} | {} | overlay ÷ Docker's design |",
        Side::Overlay.title(p),
        Side::DockerDesign.title(p)
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for figure in Figure::ALL {
        let cells: Vec<String> =
            Side::ALL.iter().map(|&side| cell(Spread::of(e.values(side, figure)).as_ref(), num)).collect();
        let ratio = cell(Spread::of(e.ratios(figure)).as_ref(), |v| format!("{v:.2}"));
        let _ = writeln!(out, "| {} | {} | {} | {ratio} |", figure.title(), cells[0], cells[1]);
    }
    let goal = |met: bool| if met { "met" } else { "**missed**" };
    let (tput, p50) = (e.ratio(Figure::StreamOut), e.ratio(Figure::TcpRrP50));
    let _ = writeln!(
        out,
        "\nGoals (issue 12): throughput ≥ 1.0× Docker's design: {} (container → outside, 1 stream: {tput:.2}×); TCP request/response p50 ≤ 1.0×: {} ({p50:.2}×).",
        goal(tput >= 1.0),
        goal(p50 <= 1.0)
    );
    out
}

fn cell(s: Option<&Spread>, fmt: impl Fn(f64) -> String) -> String {
    match s {
        Some(s) if s.values.len() > 1 => format!("{} ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max)),
        Some(s) => fmt(s.median),
        None => "–".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: usize, side: Side, figure: Figure, value: f64) -> Sample {
        Sample { round, side, figure, value }
    }

    #[test]
    fn each_side_goes_first_in_every_other_round_and_blocks_take_turns_abba() {
        assert_eq!(order(0), [Side::Overlay, Side::DockerDesign]);
        assert_eq!(order(1), [Side::DockerDesign, Side::Overlay]);
        let (o, d) = (Side::Overlay, Side::DockerDesign);
        assert_eq!(rr_turns(0).collect::<Vec<_>>(), [o, d, d, o, o, d, d, o]);
        assert_eq!(rr_turns(3).collect::<Vec<_>>(), [d, o, o, d, d, o, o, d]);
        // Every side runs RR_BLOCKS blocks in every round.
        assert_eq!(rr_turns(5).filter(|&s| s == o).count(), RR_BLOCKS);
    }

    #[test]
    fn ratios_are_per_round_and_the_goals_read_from_their_medians() {
        let plan = EgressPlan::new(true, Some(3), None, None, None);
        let mut samples = Vec::new();
        // Throughput: overlay 10, 12, 9 against Docker 10, 10, 10: ratios 1.0, 1.2, 0.9.
        for (round, (a, b)) in [(10.0, 10.0), (12.0, 10.0), (9.0, 10.0)].into_iter().enumerate() {
            samples.push(sample(round, Side::Overlay, Figure::StreamOut, a));
            samples.push(sample(round, Side::DockerDesign, Figure::StreamOut, b));
        }
        // p50: 30 against 25 in every round: 1.2.
        for round in 0..3 {
            samples.push(sample(round, Side::Overlay, Figure::TcpRrP50, 30.0));
            samples.push(sample(round, Side::DockerDesign, Figure::TcpRrP50, 25.0));
        }
        let e = Egress { plan, samples };
        assert!((e.ratio(Figure::StreamOut) - 1.0).abs() < 1e-9);
        assert!(e.ratio(Figure::UdpRrP50).is_nan());
        let table = markdown(&e, "x");
        assert!(
            table.contains(
                "| TCP container → outside, 1 stream (Gbit/s, higher is better) | 10.0 (9.00–12.0) | 10.0 (10.0–10.0) | 1.00 (0.90–1.20) |"
            ),
            "{table}"
        );
        assert!(table.contains("| UDP request/response p50 (µs, lower is better) | – | – | – |"), "{table}");
        assert!(
            table.contains("1 stream: 1.00×); TCP request/response p50 ≤ 1.0×: **missed** (1.20×)"),
            "{table}"
        );
    }
}
