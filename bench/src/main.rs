//! overlay-bench: measures the same container-to-container path across two hosts on three
//! topologies built side by side (no overlay, Docker-style kernel VXLAN, this project's eBPF
//! datapath) in interleaved rounds, plus the eBPF agent's control-plane figures, and writes
//! samples.json (every sample), summary.md (the tables) and latency.png (the distributions).
//!
//! `overlay-bench --quick` is the smoke run (seconds): every stage once, tiny sizes.

mod agent;
mod control;
mod egress;
mod icmp;
mod measure;
mod monitor;
mod names;
mod plot;
mod pods;
mod report;
mod state;
mod stats;
mod store;
mod sys;
mod topology;
mod worker;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use overlay_tests::Run;

use crate::{
    measure::{Plan, Test},
    report::{ControlPlane, Machine, Results, Sample, Tools, TopologyInfo},
    topology::{BuildOptions, EbpfSource, Kind, Topology},
};

#[derive(Parser)]
#[command(
    name = "overlay-bench",
    version,
    about = "Benchmark: no overlay vs kernel VXLAN vs the eBPF overlay"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    worker: Option<WorkerCmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The smoke run: one short round and tiny control-plane sizes (seconds, not minutes).
    #[arg(long)]
    quick: bool,
    /// Rounds; each runs every test on every topology, in the order no overlay, kernel VXLAN,
    /// eBPF [default: 5, quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Where to write samples.json, summary.md and latency.png [default:
    /// bench-results/<UTC timestamp>/].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The overlay-agent binary [default: next to this binary].
    #[arg(long, env = "OVERLAY_AGENT_BIN")]
    agent: Option<PathBuf>,
    /// XDP mode of the eBPF topology's agents (auto: TC only on veth uplinks).
    #[arg(long, default_value = "auto")]
    xdp_mode: String,
    /// Requests per request/response test [default: 20000, quick: 1000].
    #[arg(long)]
    rr_count: Option<usize>,
    /// Seconds of each single-stream TCP test [default: 4, quick: 1].
    #[arg(long)]
    stream_secs: Option<u32>,
    /// Seconds counted by each 64-byte UDP packet-rate test [default: 2, quick: 0.5].
    #[arg(long)]
    pps_secs: Option<f64>,
    /// Offered TCP load of the CPU-per-GB test, Gbit/s.
    #[arg(long, default_value_t = 4.0)]
    cpu_tcp_gbps: f64,
    /// Offered 64-byte UDP load of the CPU-per-packet test, packets/s.
    #[arg(long, default_value_t = 100_000)]
    cpu_udp_pps: u64,
    /// Endpoints timed from creation to reachable, through etcd and then through the state
    /// file [default: 100, quick: 3].
    #[arg(long)]
    reach_count: Option<usize>,
    /// Endpoint counts the agent load is timed with [default: 10000,100000; quick: 1000].
    #[arg(long, value_delimiter = ',')]
    load_sizes: Option<Vec<usize>>,
    /// Agent starts per load size [default: 3, quick: 1].
    #[arg(long)]
    load_repeats: Option<usize>,
    /// Where the agent of the load stage reads its state: a fresh etcd filled beforehand (the
    /// issue asks for the control plane against a real etcd), or a state file.
    #[arg(long, value_enum, default_value = "etcd")]
    load_source: EbpfSource,
    /// Skip the data-plane rounds.
    #[arg(long)]
    no_data_plane: bool,
    /// Skip the control-plane figures.
    #[arg(long)]
    no_control_plane: bool,
    /// Skip the secondary endpoint-to-reachable figure through the state file (the etcd one
    /// is always measured with the control plane).
    #[arg(long)]
    no_file_reach: bool,
    /// Also put the tables into this README, between `<!-- overlay-bench:begin -->` and
    /// `<!-- overlay-bench:end -->` (appended if the markers are missing); with --names, between
    /// `<!-- overlay-bench:names:begin -->` and `<!-- overlay-bench:names:end -->`; with --pods,
    /// between `<!-- overlay-bench:pods:begin -->` and `<!-- overlay-bench:pods:end -->`; with
    /// --egress, between `<!-- overlay-bench:egress:begin -->` and `<!-- overlay-bench:egress:end -->`.
    #[arg(long)]
    readme: Option<PathBuf>,
    /// Run only the names stage: query latency and throughput of the datapath's answers, the
    /// agent's resolver and dnsmasq, and name created -> resolvable on another host.
    #[arg(long, conflicts_with_all = ["pods", "egress"])]
    names: bool,
    /// Run only the pods stage: a pod created through CRI (containerd's RunPodSandbox) ->
    /// pingable from another host, beside a container created with the CLI.
    #[arg(long, conflicts_with = "egress")]
    pods: bool,
    /// Run only the egress stage: throughput and request/response latency from a container to
    /// a server outside, through its host, against Docker's design (docker_gwbridge with
    /// MASQUERADE) built beside it in the same run (takes --rounds, --rr-count, --stream-secs).
    #[arg(long)]
    egress: bool,
    /// MTU of the Docker-design container in the egress stage [default: 1500, Docker's].
    #[arg(long)]
    egress_docker_mtu: Option<u32>,
    /// Run only the monitor stage: the 64-byte UDP packet rate of the eBPF topology with
    /// `overlay-agent monitor --flows` attached and detached (and with --monitor-baseline-agent)
    /// in interleaved rounds (takes --rounds, --pps-secs).
    #[arg(long, conflicts_with_all = ["names", "pods", "egress"])]
    monitor: bool,
    /// An overlay-agent built before the monitor existed: the monitor stage measures it too, on
    /// a topology of its own, as the detached figure's baseline.
    #[arg(long)]
    monitor_baseline_agent: Option<PathBuf>,
    /// Pods measured by the pods stage, and as many CLI containers [default: 50, quick: 3].
    #[arg(long)]
    pod_count: Option<usize>,
}

/// The traffic programs and the store client, run by the harness inside the namespaces.
#[derive(Subcommand)]
enum WorkerCmd {
    #[command(hide = true, subcommand)]
    Worker(Worker),
}

#[derive(Subcommand)]
enum Worker {
    /// TCP and UDP echo server.
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 4 * 3600)]
        lifetime_secs: u64,
    },
    /// Request/response client.
    Rr {
        #[arg(long)]
        proto: String,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 100)]
        warmup: usize,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// UDP receiver counting datagrams in a window.
    UdpSink {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 300)]
        warmup_ms: u64,
        #[arg(long, default_value_t = 5000)]
        first_timeout_ms: u64,
    },
    /// UDP sender.
    UdpFlood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long)]
        secs: f64,
        #[arg(long)]
        pps: Option<u64>,
    },
    /// Waits for the first datagram and says when it came.
    ProbeRx {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        timeout_ms: u64,
    },
    /// Sends a datagram every interval.
    ProbeTx {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        interval_us: u64,
        #[arg(long)]
        timeout_ms: u64,
    },
    /// Pings an address until the first reply and says when it came.
    PingProbe {
        #[arg(long)]
        to: std::net::Ipv4Addr,
        #[arg(long)]
        interval_us: u64,
        #[arg(long)]
        timeout_ms: u64,
    },
    /// A client of the store: one JSON request per line on stdin (`store::Request`).
    Store {
        #[arg(long)]
        etcd: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.worker {
        Some(WorkerCmd::Worker(w)) => run_worker(w),
        None => run(cli.run),
    };
    if let Err(e) = result {
        eprintln!("overlay-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run_worker(w: Worker) -> anyhow::Result<()> {
    let ms = Duration::from_millis;
    match w {
        Worker::Serve { port, lifetime_secs } => worker::serve(port, Duration::from_secs(lifetime_secs)),
        Worker::Rr { proto, to, size, count, warmup, timeout_ms } => {
            worker::rr(&proto, to, size, count, warmup, ms(timeout_ms))
        }
        Worker::UdpSink { port, secs, warmup_ms, first_timeout_ms } => {
            worker::udp_sink(port, secs, ms(warmup_ms), ms(first_timeout_ms))
        }
        Worker::UdpFlood { to, size, secs, pps } => worker::udp_flood(to, size, secs, pps),
        Worker::ProbeRx { port, timeout_ms } => worker::probe_rx(port, ms(timeout_ms)),
        Worker::ProbeTx { to, interval_us, timeout_ms } => {
            worker::probe_tx(to, Duration::from_micros(interval_us), ms(timeout_ms))
        }
        Worker::PingProbe { to, interval_us, timeout_ms } => {
            worker::ping_probe(to, Duration::from_micros(interval_us), ms(timeout_ms))
        }
        Worker::Store { etcd } => store::serve(&etcd),
    }
}

/// The overlay-agent to run: --agent, else the one in OVERLAY_BIN_DIR (where `cargo xtask`
/// built it), else the one built next to this binary.
fn agent_binary(arg: Option<PathBuf>, exe: &Path) -> anyhow::Result<PathBuf> {
    let path = match (arg, std::env::var_os("OVERLAY_BIN_DIR")) {
        (Some(p), _) => p,
        (None, Some(dir)) => Path::new(&dir).join("overlay-agent"),
        (None, None) => exe.parent().context("binary directory")?.join("overlay-agent"),
    };
    if !path.is_file() {
        bail!(
            "no overlay-agent at {} (build it with `cargo build --release -p overlay-agent`, or pass --agent)",
            path.display()
        );
    }
    Ok(path)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (network namespaces, BPF programs)");
    }
    overlay_tests::ensure_bpffs().context("mounting bpffs at /sys/fs/bpf")?;
    sys::require_program("ip", "iproute2")?;
    sys::require_program("bridge", "iproute2")?;
    sys::require_program("iperf3", "iperf3")?;
    if args.names {
        return run_names(&args);
    }
    if args.pods {
        return run_pods(&args);
    }
    if args.egress {
        return run_egress(&args);
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let agent_bin = agent_binary(args.agent.clone(), &exe)?;
    let quick = args.quick;
    let rounds = args.rounds.unwrap_or(if quick { 1 } else { 5 }).max(1);
    let plan = Plan {
        rr_count: args.rr_count.unwrap_or(if quick { 1000 } else { 20_000 }),
        rr_warmup: if quick { 50 } else { 500 },
        rr_size: 64,
        stream_secs: args.stream_secs.unwrap_or(if quick { 1 } else { 4 }),
        pps_secs: args.pps_secs.unwrap_or(if quick { 0.5 } else { 2.0 }),
        pps_warmup_ms: if quick { 100 } else { 300 },
        pps_payload: 64,
        cpu_tcp_bps: (args.cpu_tcp_gbps * 1e9) as u64,
        cpu_tcp_secs: if quick { 1 } else { 2 },
        cpu_udp_pps: args.cpu_udp_pps,
        cpu_udp_secs: if quick { 0.5 } else { 2.0 },
    };
    let reach_count = args.reach_count.unwrap_or(if quick { 3 } else { 100 });
    let load_sizes =
        args.load_sizes.clone().unwrap_or(if quick { vec![1000] } else { vec![10_000, 100_000] });
    let load_repeats = args.load_repeats.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let (started_utc, stamp) = report::utc_now();
    let out_dir = args.out.clone().unwrap_or_else(|| Path::new("bench-results").join(&stamp));
    report::settle(args.quick);
    let mut machine = Machine::probe();

    // Everything the run makes is named after its id and goes when it drops, or on a signal.
    let run = Run::new("ob");
    overlay_tests::cleanup_on_signal().context("installing the signal handler")?;
    eprintln!(
        "overlay-bench: run {} ({} rounds{}), writing to {}",
        run.id,
        rounds,
        if quick { ", quick" } else { "" },
        out_dir.display()
    );

    let opts = BuildOptions {
        agent_binary: &agent_bin,
        xdp_mode: &args.xdp_mode,
        self_exe: &exe,
        ebpf_source: EbpfSource::File,
        tag: None,
    };
    if args.monitor {
        return run_monitor(&args, &run, &opts, &exe, &plan, rounds, &out_dir);
    }
    let mut topologies = Vec::new();
    for kind in Kind::ALL {
        let t = Instant::now();
        topologies
            .push(Topology::build(&run, kind, &opts).with_context(|| format!("building {}", kind.key()))?);
        eprintln!("  built {:<13} in {:>5} ms", kind.key(), t.elapsed().as_millis());
    }

    let mut samples = Vec::new();
    let mut errors = Vec::new();
    if !args.no_data_plane {
        for round in 0..rounds {
            for test in Test::ALL {
                for topo in &topologies {
                    let started_unix_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let data = measure::run(test, topo, &exe, &plan)
                        .with_context(|| format!("round {round}: {} on {}", test.key(), topo.kind.key()))?;
                    let sample = Sample { round, topology: topo.kind, test, started_unix_ms, data };
                    eprintln!(
                        "  round {}/{rounds} {:<10} {:<13} {}",
                        round + 1,
                        test.key(),
                        topo.kind.key(),
                        brief(&sample)
                    );
                    samples.push(sample);
                }
            }
        }
    }

    let mut cp = ControlPlane::default();
    if !args.no_control_plane && !args.no_file_reach {
        let ebpf = topologies.iter_mut().find(|t| t.kind == Kind::Ebpf).context("no eBPF topology")?;
        let r = control::endpoint_to_reachable(&run, ebpf, &exe, reach_count);
        record_reach("file", r, &mut cp, &mut errors);
    }
    // The data-plane topologies are done with: stop their agents and servers before the
    // control-plane stages, so those run on an otherwise quiet machine.
    drop(topologies);
    if !args.no_control_plane {
        // The figure the issue asks for: the eBPF topology once more, its agents following etcd.
        let t = Instant::now();
        let etcd_opts = BuildOptions { ebpf_source: EbpfSource::Etcd, ..opts };
        let r = Topology::build(&run, Kind::Ebpf, &etcd_opts).context("building the topology").and_then(
            |mut topo| {
                eprintln!("  built ebpf on etcd  in {:>5} ms", t.elapsed().as_millis());
                control::endpoint_to_reachable(&run, &mut topo, &exe, reach_count)
            },
        );
        record_reach("etcd", r, &mut cp, &mut errors);
    }
    if !args.no_control_plane {
        'sizes: for &n in &load_sizes {
            for rep in 0..load_repeats {
                match control::load(&run, &agent_bin, &exe, args.load_source, n, rep) {
                    Ok(l) => {
                        eprintln!(
                            "  load {n:>6} endpoints ({}): {:>7.1} ms to maps filled (reconcile {:.1} ms), VmRSS {:.1} MiB, VmHWM {:.1} MiB",
                            l.source,
                            l.wall_ms,
                            l.reconcile_ms,
                            l.vm_rss_kib as f64 / 1024.0,
                            l.vm_hwm_kib as f64 / 1024.0
                        );
                        cp.loads.push(l);
                    }
                    Err(e) => {
                        errors.push(format!("load {n}: {e:#}"));
                        cp.load_error = Some(format!("{n} endpoints: {e:#}"));
                        break 'sizes;
                    }
                }
            }
        }
    }

    machine.loadavg_end = report::loadavg();
    let figures = report::figures(&samples, rounds);
    let targets = report::check_targets(&figures, &cp);
    let results = Results {
        schema: 2,
        started_utc,
        finished_utc: report::utc_now().0,
        command: command_line(),
        quick,
        machine,
        rounds,
        xdp_mode: args.xdp_mode.clone(),
        plan: plan.clone(),
        tools: Tools::describe(&plan),
        topologies: Kind::ALL
            .iter()
            .map(|k| TopologyInfo {
                key: k.key().into(),
                title: k.title().into(),
                description: k.describe().into(),
            })
            .collect(),
        samples,
        control_plane: cp,
        figures,
        targets,
        errors,
    };
    report::write_outputs(&out_dir, &results)?;
    plot::latency_png(&out_dir.join("latency.png"), &results).context("drawing latency.png")?;
    if let Some(readme) = &args.readme {
        report::update_readme(readme, &results, &out_dir)?;
    }
    print!("{}", report::markdown(&results));
    eprintln!("overlay-bench: wrote {}/{{samples.json,summary.md,latency.png}}", out_dir.display());
    drop(run);
    if !results.errors.is_empty() {
        bail!("{} stage(s) failed: {}", results.errors.len(), results.errors.join("; "));
    }
    Ok(())
}

/// Puts an endpoint-to-reachable result (or its failure) in the results, and says it.
fn record_reach(
    source: &str,
    result: anyhow::Result<control::Reach>,
    cp: &mut ControlPlane,
    errors: &mut Vec<String>,
) {
    match result {
        Ok(r) => {
            let (p50, p99) = r.percentiles().unwrap_or((f64::NAN, f64::NAN));
            eprintln!(
                "  endpoint-to-reachable ({source}): p50 {p50:.1} ms, p99 {p99:.1} ms over {} endpoints ({} never reachable)",
                r.samples_ms.len(),
                r.unreachable
            );
            cp.reach.push(r);
        }
        Err(e) => {
            errors.push(format!("endpoint-to-reachable ({source}): {e:#}"));
            cp.reach_errors.push(format!("{source}: {e:#}"));
        }
    }
}

/// How this run was started, with the program named without its build directory.
fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut()
        && let Some(name) = Path::new(first.as_str()).file_name()
    {
        *first = name.to_string_lossy().into_owned();
    }
    args.join(" ")
}

/// One line about a sample, for the progress log.
fn brief(s: &Sample) -> String {
    use measure::Data;
    match &s.data {
        Data::Rr { rtt_ns, lost, .. } => {
            let mut v = rtt_ns.clone();
            v.sort_unstable();
            format!(
                "p50 {:.1} µs  p99 {:.1} µs  ({} samples, {} lost)",
                stats::percentile(&v, 0.5) / 1e3,
                stats::percentile(&v, 0.99) / 1e3,
                v.len(),
                lost
            )
        }
        Data::Stream { bits_per_second, retransmits, .. } => {
            format!("{:.2} Gbit/s ({retransmits} retransmits)", bits_per_second / 1e9)
        }
        Data::Pps { packets, secs, sent, .. } => {
            format!("{:.0} kpps received ({packets} of {sent} sent)", *packets as f64 / secs.max(1e-9) / 1e3)
        }
        Data::CpuTcp { bytes, cpu, .. } => format!(
            "{:.3} CPU-s/GB ({:.2} GB; whole machine {:.2} CPU-s)",
            cpu.traffic_secs / (*bytes as f64 / 1e9).max(1e-12),
            *bytes as f64 / 1e9,
            cpu.machine_busy_secs
        ),
        Data::CpuUdp { total_packets, cpu, .. } => format!(
            "{:.2} µs CPU/packet ({total_packets} packets; whole machine {:.2} CPU-s)",
            cpu.traffic_secs * 1e6 / (*total_packets as f64).max(1.0),
            cpu.machine_busy_secs
        ),
    }
}

/// `--names`: the names stage alone, its table in <out>/names.md (and the README if asked).
fn run_names(args: &RunArgs) -> anyhow::Result<()> {
    sys::require_program("dnsmasq", "dnsmasq-base")?;
    let plan = names::NamesPlan::new(args.quick);
    let (_, stamp) = report::utc_now();
    let out_dir =
        args.out.clone().unwrap_or_else(|| Path::new("bench-results").join(format!("{stamp}-names")));
    overlay_tests::cleanup_on_signal().context("installing the signal handler")?;
    eprintln!("overlay-bench: names stage, writing to {}", out_dir.display());
    let figures = names::run(&plan)?;
    let cmd = format!("cargo xtask bench -- --names{}", if args.quick { " --quick" } else { "" });
    let table = names::markdown(&figures, &cmd);
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("names.md"), &table)?;
    print!("{table}");
    if let Some(readme) = &args.readme {
        report::replace_between(
            readme,
            "<!-- overlay-bench:names:begin -->",
            "<!-- overlay-bench:names:end -->",
            &table,
        )?;
    }
    Ok(())
}

/// `--monitor`: the monitor stage alone, its table in <out>/monitor.md (and in the README
/// between `<!-- overlay-bench:monitor:begin -->` and `<!-- overlay-bench:monitor:end -->`).
fn run_monitor(
    args: &RunArgs,
    run: &Run,
    opts: &BuildOptions<'_>,
    exe: &Path,
    plan: &measure::Plan,
    rounds: usize,
    out_dir: &Path,
) -> anyhow::Result<()> {
    let table = monitor::run(
        run,
        opts,
        args.monitor_baseline_agent.as_deref(),
        exe,
        plan,
        rounds,
        &format!("cargo xtask bench -- {}", command_line_args()),
    )?;
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("monitor.md"), &table)?;
    print!("{table}");
    if let Some(readme) = &args.readme {
        report::replace_between(
            readme,
            "<!-- overlay-bench:monitor:begin -->",
            "<!-- overlay-bench:monitor:end -->",
            &table,
        )?;
    }
    Ok(())
}

/// This run's arguments, as given.
fn command_line_args() -> String {
    std::env::args().skip(1).collect::<Vec<_>>().join(" ")
}

/// `--pods`: the pods stage alone, its table in <out>/pods.md and its samples in
/// <out>/pods.json (and the table in the README if asked).
fn run_pods(args: &RunArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let plan = pods::PodsPlan::new(args.quick, args.pod_count);
    let (started_utc, stamp) = report::utc_now();
    let out_dir =
        args.out.clone().unwrap_or_else(|| Path::new("bench-results").join(format!("{stamp}-pods")));
    overlay_tests::cleanup_on_signal().context("installing the signal handler")?;
    report::settle(args.quick);
    let mut machine = Machine::probe();
    eprintln!("overlay-bench: pods stage ({} pods), writing to {}", plan.count, out_dir.display());
    let figures = pods::run(&plan, &exe)?;
    let cmd = format!(
        "cargo xtask bench -- --pods{}{}",
        if args.quick { " --quick" } else { "" },
        args.pod_count.map(|n| format!(" --pod-count {n}")).unwrap_or_default()
    );
    machine.loadavg_end = report::loadavg();
    let table = format!(
        "{}\nRun of {started_utc} UTC on {}. Samples: `{}/pods.json`.\n",
        pods::markdown(&figures, &cmd),
        machine.describe(),
        out_dir.display()
    );
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("pods.md"), &table)?;
    std::fs::write(out_dir.join("pods.json"), serde_json::to_string_pretty(&figures)?)?;
    print!("{table}");
    if let Some(readme) = &args.readme {
        report::replace_between(
            readme,
            "<!-- overlay-bench:pods:begin -->",
            "<!-- overlay-bench:pods:end -->",
            &table,
        )?;
    }
    let never: usize = figures.series.iter().map(|s| s.unreachable).sum();
    if never > 0 {
        bail!("{never} container(s) never replied");
    }
    Ok(())
}

/// `--egress`: the egress stage alone, its table in <out>/egress.md and its samples in
/// <out>/egress.json (and the table in the README if asked).
fn run_egress(args: &RunArgs) -> anyhow::Result<()> {
    sys::require_program("iptables-restore", "iptables")?;
    let exe = std::env::current_exe().context("locating this binary")?;
    let plan = egress::EgressPlan::new(
        args.quick,
        args.rounds,
        args.rr_count,
        args.stream_secs,
        args.egress_docker_mtu,
    );
    let (started_utc, stamp) = report::utc_now();
    let out_dir =
        args.out.clone().unwrap_or_else(|| Path::new("bench-results").join(format!("{stamp}-egress")));
    overlay_tests::cleanup_on_signal().context("installing the signal handler")?;
    report::settle(args.quick);
    let mut machine = Machine::probe();
    eprintln!("overlay-bench: egress stage ({} rounds), writing to {}", plan.rounds, out_dir.display());
    let figures = egress::run(&plan, &exe)?;
    let mut cmd = "cargo xtask bench -- --egress".to_owned();
    for (flag, value) in [
        ("--quick", args.quick.then(String::new)),
        ("--rounds", args.rounds.map(|n| n.to_string())),
        ("--rr-count", args.rr_count.map(|n| n.to_string())),
        ("--stream-secs", args.stream_secs.map(|n| n.to_string())),
        ("--egress-docker-mtu", args.egress_docker_mtu.map(|n| n.to_string())),
    ] {
        if let Some(v) = value {
            cmd = format!("{cmd} {flag}{}{v}", if v.is_empty() { "" } else { " " });
        }
    }
    machine.loadavg_end = report::loadavg();
    let table = format!(
        "{}\nRun of {started_utc} UTC on {}. Samples: `{}/egress.json`.\n",
        egress::markdown(&figures, &cmd),
        machine.describe(),
        out_dir.display()
    );
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("egress.md"), &table)?;
    std::fs::write(out_dir.join("egress.json"), serde_json::to_string_pretty(&figures)?)?;
    print!("{table}");
    if let Some(readme) = &args.readme {
        report::replace_between(
            readme,
            "<!-- overlay-bench:egress:begin -->",
            "<!-- overlay-bench:egress:end -->",
            &table,
        )?;
    }
    Ok(())
}
