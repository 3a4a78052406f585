//! From samples to figures: per-round values, medians with their spread, ratios to both
//! baselines, the target checks; and the outputs (samples.json, summary.md, the README section).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    control::{Load, Reach},
    measure::{Data, Plan, Test},
    stats::{percentile, percentiles_ms},
    topology::Kind,
};

/// One test on one topology in one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub round: usize,
    pub topology: Kind,
    pub test: Test,
    /// Wall-clock start, ms since the Unix epoch (to see drift along the run).
    pub started_unix_ms: u64,
    pub data: Data,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub os: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub mem_total_gib: f64,
    /// 1-minute load average when the run started and ended: how busy the machine was.
    pub loadavg_start: f64,
    pub loadavg_end: f64,
}

impl Machine {
    pub fn probe() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default();
        let mem_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            os,
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            mem_total_gib: mem_kib / (1024.0 * 1024.0),
            loadavg_start: loadavg(),
            loadavg_end: 0.0,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} ({} CPUs), {:.0} GiB, {}, kernel {}; load average {:.2} at start, {:.2} at end",
            self.cpu_model,
            self.cpus,
            self.mem_total_gib,
            self.os,
            self.kernel,
            self.loadavg_start,
            self.loadavg_end
        )
    }
}

/// Waits (at most `MAX_SETTLE`) until the machine is quiet: the 1-minute load average below
/// half its CPUs. `cargo xtask bench` builds right before the run, and on two cores the build's
/// load would otherwise still weigh on the first rounds. Not for a quick (smoke) run.
pub fn settle(quick: bool) {
    const MAX_SETTLE: std::time::Duration = std::time::Duration::from_mins(3);
    if quick {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let quiet = cpus as f64 / 2.0;
    let started = std::time::Instant::now();
    let first = loadavg();
    if first < quiet {
        return;
    }
    eprintln!("overlay-bench: load average {first:.2}; waiting for it to fall below {quiet:.1}");
    while loadavg() >= quiet && started.elapsed() < MAX_SETTLE {
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    eprintln!("overlay-bench: load average {:.2} after {:.0} s", loadavg(), started.elapsed().as_secs_f64());
}

pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Median with its spread over rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The per-round values, in round order.
    pub values: Vec<f64>,
}

impl Spread {
    pub fn of(values: Vec<f64>) -> Option<Self> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]) };
        Some(Self { median, min: sorted[0], max: sorted[n - 1], values })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

/// A figure: a number per round per topology, derived from one test's samples.
pub struct FigureDef {
    pub key: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub better: Better,
    pub test: Test,
    pub value: fn(&Data) -> Option<f64>,
}

fn rr_percentile(d: &Data, p: f64) -> Option<f64> {
    let Data::Rr { rtt_ns, .. } = d else { return None };
    let mut sorted = rtt_ns.clone();
    sorted.sort_unstable();
    let v = percentile(&sorted, p);
    v.is_finite().then_some(v / 1000.0)
}

pub const FIGURES: &[FigureDef] = &[
    FigureDef {
        key: "tcp-rr-p50",
        title: "TCP request/response p50",
        unit: "µs",
        better: Better::Lower,
        test: Test::TcpRr,
        value: |d| rr_percentile(d, 0.50),
    },
    FigureDef {
        key: "tcp-rr-p99",
        title: "TCP request/response p99",
        unit: "µs",
        better: Better::Lower,
        test: Test::TcpRr,
        value: |d| rr_percentile(d, 0.99),
    },
    FigureDef {
        key: "tcp-rr-p99.9",
        title: "TCP request/response p99.9",
        unit: "µs",
        better: Better::Lower,
        test: Test::TcpRr,
        value: |d| rr_percentile(d, 0.999),
    },
    FigureDef {
        key: "udp-rr-p50",
        title: "UDP request/response p50",
        unit: "µs",
        better: Better::Lower,
        test: Test::UdpRr,
        value: |d| rr_percentile(d, 0.50),
    },
    FigureDef {
        key: "udp-rr-p99",
        title: "UDP request/response p99",
        unit: "µs",
        better: Better::Lower,
        test: Test::UdpRr,
        value: |d| rr_percentile(d, 0.99),
    },
    FigureDef {
        key: "udp-rr-p99.9",
        title: "UDP request/response p99.9",
        unit: "µs",
        better: Better::Lower,
        test: Test::UdpRr,
        value: |d| rr_percentile(d, 0.999),
    },
    FigureDef {
        key: "tcp-stream",
        title: "TCP throughput, single stream",
        unit: "Gbit/s",
        better: Better::Higher,
        test: Test::TcpStream,
        value: |d| match d {
            Data::Stream { bits_per_second, .. } => Some(bits_per_second / 1e9),
            _ => None,
        },
    },
    FigureDef {
        key: "udp-pps",
        title: "64-byte UDP packets received",
        unit: "kpps",
        better: Better::Higher,
        test: Test::UdpPps,
        value: |d| match d {
            Data::Pps { packets, secs, .. } if *secs > 0.0 => Some(*packets as f64 / secs / 1000.0),
            _ => None,
        },
    },
    FigureDef {
        key: "cpu-per-gb",
        title: "CPU per GB received (TCP at a fixed rate)",
        unit: "CPU-s/GB",
        better: Better::Lower,
        test: Test::CpuTcp,
        value: |d| match d {
            Data::CpuTcp { bytes, cpu, .. } if *bytes > 0 => Some(cpu.traffic_secs / (*bytes as f64 / 1e9)),
            _ => None,
        },
    },
    FigureDef {
        key: "cpu-per-packet",
        title: "CPU per 64-byte UDP packet received (fixed rate)",
        unit: "µs",
        better: Better::Lower,
        test: Test::CpuUdp,
        value: |d| match d {
            Data::CpuUdp { total_packets, cpu, .. } if *total_packets > 0 => {
                Some(cpu.traffic_secs * 1e6 / *total_packets as f64)
            }
            _ => None,
        },
    },
];

/// One figure summarised.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Figure {
    pub key: String,
    pub title: String,
    pub unit: String,
    pub better: Better,
    /// By topology key.
    pub topologies: BTreeMap<String, Spread>,
    /// Per-round ratios (same round, so the same drift), summarised.
    pub ebpf_vs_no_overlay: Option<Spread>,
    pub ebpf_vs_kernel_vxlan: Option<Spread>,
    pub kernel_vxlan_vs_no_overlay: Option<Spread>,
}

impl Figure {
    pub fn get(&self, kind: Kind) -> Option<&Spread> {
        self.topologies.get(kind.key())
    }
}

pub fn figures(samples: &[Sample], rounds: usize) -> Vec<Figure> {
    FIGURES
        .iter()
        .map(|def| {
            // values[kind][round]
            let mut per: BTreeMap<Kind, Vec<Option<f64>>> =
                Kind::ALL.iter().map(|k| (*k, vec![None; rounds])).collect();
            for s in samples.iter().filter(|s| s.test == def.test) {
                if let (Some(v), Some(slot)) =
                    ((def.value)(&s.data), per.get_mut(&s.topology).and_then(|r| r.get_mut(s.round)))
                {
                    *slot = Some(v);
                }
            }
            let ratio = |a: Kind, b: Kind| {
                let v: Vec<f64> = per[&a]
                    .iter()
                    .zip(&per[&b])
                    .filter_map(|(x, y)| Some(x.as_ref()? / y.as_ref()?))
                    .collect();
                Spread::of(v)
            };
            Figure {
                key: def.key.to_owned(),
                title: def.title.to_owned(),
                unit: def.unit.to_owned(),
                better: def.better,
                topologies: per
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((k.key().to_owned(), Spread::of(v.iter().flatten().copied().collect())?))
                    })
                    .collect(),
                ebpf_vs_no_overlay: ratio(Kind::Ebpf, Kind::NoOverlay),
                ebpf_vs_kernel_vxlan: ratio(Kind::Ebpf, Kind::KernelVxlan),
                kernel_vxlan_vs_no_overlay: ratio(Kind::KernelVxlan, Kind::NoOverlay),
            }
        })
        .collect()
}

/// The control-plane figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlPlane {
    /// Endpoint-to-reachable, one per source: etcd (the figure the target is checked on), then
    /// the state file (secondary: what the file source's 200 ms poll costs).
    pub reach: Vec<Reach>,
    /// Stages that failed, each naming its source.
    pub reach_errors: Vec<String>,
    /// Loads of the agent, each from the source it names.
    pub loads: Vec<Load>,
    pub load_error: Option<String>,
}

impl ControlPlane {
    /// Endpoint-to-reachable through `source` ("etcd", "file").
    pub fn reach(&self, source: &str) -> Option<&Reach> {
        self.reach.iter().find(|r| r.source == source)
    }

    /// Where the loads read their state ("file", "etcd"; one source per run).
    pub fn load_source(&self) -> &str {
        self.loads.first().map_or("file", |l| l.source.as_str())
    }

    /// Loads of `n` endpoints, summarised: (wall ms, reconcile ms, RSS MiB, HWM MiB).
    pub fn load_summary(&self, n: usize) -> Option<(Spread, Spread, Spread, Spread)> {
        let l: Vec<&Load> = self.loads.iter().filter(|l| l.endpoints == n).collect();
        let s = |f: &dyn Fn(&Load) -> f64| Spread::of(l.iter().map(|x| f(x)).collect());
        Some((
            s(&|x| x.wall_ms)?,
            s(&|x| x.reconcile_ms)?,
            s(&|x| x.vm_rss_kib as f64 / 1024.0)?,
            s(&|x| x.vm_hwm_kib as f64 / 1024.0)?,
        ))
    }
}

/// A target of the issue, checked against this run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetCheck {
    pub target: String,
    /// None: not measured in this run.
    pub met: Option<bool>,
    pub detail: String,
}

pub fn check_targets(figs: &[Figure], cp: &ControlPlane) -> Vec<TargetCheck> {
    let fig = |key: &str| figs.iter().find(|f| f.key == key);
    let mut out = Vec::new();
    for key in ["tcp-rr-p50", "tcp-rr-p99", "udp-rr-p50", "udp-rr-p99"] {
        let target = format!("{key}: eBPF ≤ 1.05 × no overlay and < kernel VXLAN");
        let check = fig(key).and_then(|f| {
            let (e, v, r) = (f.get(Kind::Ebpf)?, f.get(Kind::KernelVxlan)?, f.ebpf_vs_no_overlay.as_ref()?);
            let floor = f.get(Kind::NoOverlay)?;
            Some(TargetCheck {
                target: target.clone(),
                met: Some(r.median <= 1.05 && e.median < v.median),
                detail: format!(
                    "eBPF {} µs = {:.2} × no overlay ({} µs); kernel VXLAN {} µs",
                    num(e.median),
                    r.median,
                    num(floor.median),
                    num(v.median)
                ),
            })
        });
        out.push(check.unwrap_or(TargetCheck { target, met: None, detail: "not measured".into() }));
    }
    let target = "TCP throughput: eBPF ≥ 0.95 × no overlay".to_owned();
    out.push(
        fig("tcp-stream")
            .and_then(|f| {
                let (e, r, floor) =
                    (f.get(Kind::Ebpf)?, f.ebpf_vs_no_overlay.as_ref()?, f.get(Kind::NoOverlay)?);
                Some(TargetCheck {
                    target: target.clone(),
                    met: Some(r.median >= 0.95),
                    detail: format!(
                        "eBPF {} Gbit/s = {:.2} × no overlay ({} Gbit/s)",
                        num(e.median),
                        r.median,
                        num(floor.median)
                    ),
                })
            })
            .unwrap_or(TargetCheck { target, met: None, detail: "not measured".into() }),
    );
    let target = "64-byte UDP packet rate: eBPF ≥ 1.3 × kernel VXLAN".to_owned();
    out.push(
        fig("udp-pps")
            .and_then(|f| {
                let (e, r, v) =
                    (f.get(Kind::Ebpf)?, f.ebpf_vs_kernel_vxlan.as_ref()?, f.get(Kind::KernelVxlan)?);
                Some(TargetCheck {
                    target: target.clone(),
                    met: Some(r.median >= 1.3),
                    detail: format!(
                        "eBPF {} kpps = {:.2} × kernel VXLAN ({} kpps)",
                        num(e.median),
                        r.median,
                        num(v.median)
                    ),
                })
            })
            .unwrap_or(TargetCheck { target, met: None, detail: "not measured".into() }),
    );
    let reach = cp.reach("etcd");
    out.push(match reach.and_then(|r| Some((r, r.percentiles()?))) {
        Some((r, (p50, p99))) => TargetCheck {
            target: "endpoint-to-reachable p99 < 100 ms (etcd)".into(),
            met: Some(p99 < 100.0 && r.unreachable == 0),
            detail: format!(
                "p99 {} ms, p50 {} ms over {} endpoints{}",
                num(p99),
                num(p50),
                r.samples_ms.len(),
                if r.unreachable > 0 {
                    format!("; {} never reachable", r.unreachable)
                } else {
                    String::new()
                }
            ),
        },
        None => TargetCheck {
            target: "endpoint-to-reachable p99 < 100 ms (etcd)".into(),
            met: None,
            detail: "not measured".into(),
        },
    });
    let load = cp.load_summary(100_000);
    let source = cp.load_source();
    out.push(match &load {
        Some((wall, ..)) => TargetCheck {
            target: format!("100k endpoints loaded in < 2 s ({source})"),
            met: Some(wall.median < 2000.0),
            detail: format!("{} ms from agent start to maps filled (median)", num(wall.median)),
        },
        None => TargetCheck {
            target: "100k endpoints loaded in < 2 s".into(),
            met: None,
            detail: "not measured in this run".into(),
        },
    });
    out.push(match &load {
        Some((_, _, rss, hwm)) => TargetCheck {
            target: format!("agent < 64 MiB at 100k endpoints ({source})"),
            met: Some(rss.median < 64.0),
            detail: format!("VmRSS {} MiB (peak VmHWM {} MiB)", num(rss.median), num(hwm.median)),
        },
        None => TargetCheck {
            target: "agent < 64 MiB at 100k endpoints".into(),
            met: None,
            detail: "not measured in this run".into(),
        },
    });
    out
}

/// Which program measured what.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Tools {
    pub latency: String,
    pub throughput: String,
    pub packet_rate: String,
    pub cpu: String,
    pub control_plane: String,
}

impl Tools {
    pub fn describe(plan: &Plan) -> Self {
        Self {
            latency: format!(
                "overlay-bench's own client and server (not sockperf): one TCP connection (TCP_NODELAY) or one \
                 UDP socket, {} requests of {} bytes after {} warm-up, one outstanding at a time, each timed \
                 with CLOCK_MONOTONIC from before the send to after the whole echo is read",
                plan.rr_count, plan.rr_size, plan.rr_warmup
            ),
            throughput: format!(
                "iperf3 (Debian), one TCP stream for {} s; the figure is the receiver's byte count",
                plan.stream_secs
            ),
            packet_rate: format!(
                "overlay-bench's own UDP sender (sendmmsg, batches of 64, {}-byte payload) and receiver \
                 (recvmmsg); datagrams received in {} s after {} ms of warm-up",
                plan.pps_payload, plan.pps_secs, plan.pps_warmup_ms
            ),
            cpu: format!(
                "the same load offered to every topology, TCP at {} Gbit/s for {} s (iperf3 -b) and {}-byte UDP \
                 at {} packets/s for {} s; CPU time = run time of the test's own processes (sender, receiver, \
                 iperf3 server) + the ksoftirqd threads. With veths the whole datapath of both hosts runs in \
                 softirq on the sender's stack or in ksoftirqd, and this kernel (no IRQ_TIME_ACCOUNTING) charges \
                 softirq time to the task it ran on, so this is the packet path's cost on both hosts together \
                 (they share one kernel), programs included, without the rest of a shared machine. The whole \
                 machine's busy time over the same interval (/proc/stat) is in samples.json as \
                 machine_busy_secs",
                plan.cpu_tcp_bps as f64 / 1e9,
                plan.cpu_tcp_secs,
                plan.pps_payload,
                plan.cpu_udp_pps,
                plan.cpu_udp_secs
            ),
            control_plane: "endpoint-to-reachable: the harness creates the container's namespace with a UDP \
                 receiver in it, container a on the other host probes the new address every 200 µs, and the \
                 clock runs from creating the endpoint to the first probe received (CLOCK_MONOTONIC). etcd: a \
                 real etcd on the underlay (198.18.0.254), agents following it (--etcd-endpoints), the container \
                 created with its namespace and address by the store API (create_container) from a client on \
                 the endpoint's host, the clock started just before that call, after a random 0–50 ms pause. \
                 File source (secondary): the endpoint added to the state file the agents poll every 200 ms, \
                 after a random 0–250 ms pause so publishing falls anywhere in the poll period. Load: an \
                 agent started on a state with one local and N remote endpoints (a state file, or a fresh \
                 etcd filled beforehand, as labelled), from process start to its 'full reconcile done' log \
                 line; the pinned endpoint map is then counted. Memory: /proc/<agent>/status VmRSS and \
                 VmHWM right after that load"
                .into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopologyInfo {
    pub key: String,
    pub title: String,
    pub description: String,
}

/// Everything a run produced: samples.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub schema: u32,
    pub started_utc: String,
    pub finished_utc: String,
    pub command: String,
    pub quick: bool,
    pub machine: Machine,
    pub rounds: usize,
    pub xdp_mode: String,
    pub plan: Plan,
    pub tools: Tools,
    pub topologies: Vec<TopologyInfo>,
    pub samples: Vec<Sample>,
    pub control_plane: ControlPlane,
    pub figures: Vec<Figure>,
    pub targets: Vec<TargetCheck>,
    /// Stages that failed; the run still writes what it has.
    pub errors: Vec<String>,
}

/// A number with three significant digits (enough for noisy figures).
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(s: Option<&Spread>) -> String {
    match s {
        Some(s) if s.values.len() > 1 => format!("{} ({}–{})", num(s.median), num(s.min), num(s.max)),
        Some(s) => num(s.median),
        None => "–".into(),
    }
}

fn ratio_cell(s: Option<&Spread>) -> String {
    match s {
        Some(s) if s.values.len() > 1 => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        Some(s) => format!("{:.2}", s.median),
        None => "–".into(),
    }
}

fn mark(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// The tables and notes, in Markdown (summary.md, and the README's section).
pub fn markdown(r: &Results) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "Run of {} UTC on {}.", r.started_utc, r.machine.describe());
    let _ = writeln!(m);
    let _ = writeln!(
        m,
        "Command: `{}`{}",
        r.command,
        if r.quick { " (quick smoke run: figures are not meaningful)" } else { "" }
    );
    let _ = writeln!(m);
    let _ = writeln!(
        m,
        "Container a on host h1 to container b on host h2, on three topologies built side by side with the same \
         hosts, containers and underlay. Rounds: {}, interleaved (no overlay, kernel VXLAN, eBPF, then again), \
         so drift on the machine hits all three alike. Each cell: median over rounds (min–max). Ratios: median \
         of the per-round ratios (min–max). eBPF XDP mode: {}.",
        r.rounds, r.xdp_mode
    );
    let _ = writeln!(m);
    let _ = writeln!(
        m,
        "| Figure | no overlay | kernel VXLAN | eBPF | eBPF ÷ no overlay | eBPF ÷ kernel VXLAN | kernel VXLAN ÷ no overlay |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|");
    for f in &r.figures {
        let better = match f.better {
            Better::Lower => "lower is better",
            Better::Higher => "higher is better",
        };
        let _ = writeln!(
            m,
            "| {} ({}, {}) | {} | {} | {} | {} | {} | {} |",
            f.title,
            f.unit,
            better,
            cell(f.get(Kind::NoOverlay)),
            cell(f.get(Kind::KernelVxlan)),
            cell(f.get(Kind::Ebpf)),
            ratio_cell(f.ebpf_vs_no_overlay.as_ref()),
            ratio_cell(f.ebpf_vs_kernel_vxlan.as_ref()),
            ratio_cell(f.kernel_vxlan_vs_no_overlay.as_ref()),
        );
    }
    let _ = writeln!(m);
    let _ = writeln!(
        m,
        "Control plane (eBPF agent only; the baselines have no control plane of their own here):"
    );
    let _ = writeln!(m);
    let _ = writeln!(m, "| Figure | value |");
    let _ = writeln!(m, "|---|---|");
    let cp = &r.control_plane;
    for reach in &cp.reach {
        let Some((p50, p99)) = reach.percentiles() else { continue };
        let (min, max) =
            reach.samples_ms.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let label = match reach.source.as_str() {
            "etcd" => "etcd".to_owned(),
            "file" => "file source, secondary: the agents poll the file every 200 ms".to_owned(),
            other => other.to_owned(),
        };
        let write = percentiles_ms(&reach.write_ms)
            .map(|(w50, w99)| format!("; the write alone p50 {} ms, p99 {} ms", num(w50), num(w99)))
            .unwrap_or_default();
        let _ = writeln!(
            m,
            "| endpoint created → first packet from the other host ({label}), {} endpoints | p50 {} ms, p99 {} ms (min {}, max {}{write}){} |",
            reach.samples_ms.len(),
            num(p50),
            num(p99),
            num(min),
            num(max),
            if reach.unreachable > 0 {
                format!("; {} never reachable", reach.unreachable)
            } else {
                String::new()
            }
        );
    }
    for e in &cp.reach_errors {
        let _ = writeln!(m, "| endpoint-to-reachable | failed: {} |", e.replace('|', "/").replace('\n', " "));
    }
    let source = match cp.load_source() {
        "file" => "file source",
        other => other,
    };
    let mut sizes: Vec<usize> = cp.loads.iter().map(|l| l.endpoints).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes {
        if let Some((wall, rec, rss, hwm)) = cp.load_summary(n) {
            let _ = writeln!(
                m,
                "| load {n} endpoints ({source}): agent start → maps filled (reconcile pass alone) | {} ms ({} ms) |",
                cell(Some(&wall)),
                cell(Some(&rec))
            );
            let _ = writeln!(
                m,
                "| agent memory at {n} endpoints ({source}): VmRSS (peak VmHWM) | {} MiB ({} MiB) |",
                cell(Some(&rss)),
                cell(Some(&hwm))
            );
        }
    }
    if let Some(e) = &cp.load_error {
        let _ =
            writeln!(m, "| endpoint load ({source}) | failed: {} |", e.replace('|', "/").replace('\n', " "));
    }
    let _ = writeln!(m);
    let _ = writeln!(m, "Targets (checked on the medians of this run):");
    let _ = writeln!(m);
    for t in &r.targets {
        let _ = writeln!(m, "- {}: {} — {}", t.target, mark(t.met), t.detail);
    }
    if !r.errors.is_empty() {
        let _ = writeln!(m);
        let _ = writeln!(m, "Stages that failed:");
        for e in &r.errors {
            let _ = writeln!(m, "- {}", e.replace('\n', " "));
        }
    }
    let _ = writeln!(m);
    let _ = writeln!(m, "How each figure is measured:");
    let _ = writeln!(m);
    let _ = writeln!(m, "- Latency: {}.", r.tools.latency);
    let _ = writeln!(m, "- Throughput: {}.", r.tools.throughput);
    let _ = writeln!(m, "- Packet rate: {}.", r.tools.packet_rate);
    let _ = writeln!(m, "- CPU: {}.", r.tools.cpu);
    let _ = writeln!(m, "- Control plane: {}.", r.tools.control_plane);
    for t in &r.topologies {
        let _ = writeln!(m, "- {}: {}.", t.title, t.description);
    }
    m
}

pub fn write_outputs(dir: &Path, r: &Results) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_vec(r)?;
    std::fs::write(dir.join("samples.json"), json)?;
    let md = format!("# overlay-bench results\n\n{}", markdown(r));
    std::fs::write(dir.join("summary.md"), md)?;
    Ok(())
}

pub const README_BEGIN: &str = "<!-- overlay-bench:begin -->";
pub const README_END: &str = "<!-- overlay-bench:end -->";

/// Replaces the README's section between the markers with this run's tables (appends the
/// section, with its markers, when there is none yet).
/// Puts `text` between the markers `begin` and `end` of the file at `path` (appended, with the
/// markers, if they are missing).
pub fn replace_between(path: &Path, begin: &str, end: &str, text: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let section = format!("{begin}\n{text}{end}");
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if e > b => format!("{}{section}{}", &old[..b], &old[e + end.len()..]),
        _ => format!("{old}{}{section}\n", if old.is_empty() || old.ends_with('\n') { "" } else { "\n" }),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

pub fn update_readme(path: &Path, r: &Results, out_dir: &Path) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let section = format!(
        "{README_BEGIN}\n{}\nPlot: `{}`. Raw samples: `{}`.\n{README_END}",
        markdown(r),
        out_dir.join("latency.png").display(),
        out_dir.join("samples.json").display()
    );
    let new = match (old.find(README_BEGIN), old.find(README_END)) {
        (Some(b), Some(e)) if e > b => format!("{}{section}{}", &old[..b], &old[e + README_END.len()..]),
        _ => format!(
            "{old}{}## Benchmark\n\n{section}\n",
            if old.is_empty() || old.ends_with("\n\n") { "" } else { "\n" }
        ),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

/// Now, in UTC: (RFC 3339, compact for directory names).
pub fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
        format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_median_min_max() {
        let s = Spread::of(vec![3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert!(Spread::of(vec![]).is_none());
    }

    #[test]
    fn ratios_pair_rounds() {
        let sample = |round, topology, bps| Sample {
            round,
            topology,
            test: Test::TcpStream,
            started_unix_ms: 0,
            data: Data::Stream {
                secs: 1.0,
                bytes: 1,
                bits_per_second: bps,
                retransmits: 0,
                cpu: Default::default(),
            },
        };
        let samples = vec![
            sample(0, Kind::NoOverlay, 10e9),
            sample(0, Kind::Ebpf, 9e9),
            sample(1, Kind::NoOverlay, 20e9),
            sample(1, Kind::Ebpf, 20e9),
        ];
        let figs = figures(&samples, 2);
        let f = figs.iter().find(|f| f.key == "tcp-stream").unwrap();
        let r = f.ebpf_vs_no_overlay.as_ref().unwrap();
        assert_eq!(r.values, vec![0.9, 1.0]);
        assert!(f.ebpf_vs_kernel_vxlan.is_none());
    }

    #[test]
    fn utc_dates() {
        let (iso, compact) = utc_now();
        assert_eq!(iso.len(), 20);
        assert_eq!(compact.len(), 15);
    }
}
