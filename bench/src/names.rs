//! The names stage (`overlay-bench --names`): how fast a container's DNS questions are answered,
//! by whom, and how soon a new container's name resolves on another host (docs/names.md).
//!
//! One run, real agents and etcd (the tests' `Cluster`), a client container on h2 and `web` on
//! h1 with two aliases of the same length class: one the datapath answers from `NAMES` (62
//! characters: 64 bytes in wire format, the longest a key holds) and one it cannot (63
//! characters), which the agent's resolver answers. The same two names are also served by
//! dnsmasq inside the client's namespace on 127.0.0.11 (where Docker's embedded resolver sits):
//! a conventional userspace resolver on the shortest path there is. Each is asked by the same
//! client (`overlay-probe dns-bench`) in interleaved rounds: latency with one query at a time,
//! throughput with 32 outstanding.

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use overlay_tests::{Proc, binary, cluster::Cluster, in_ns, try_sh, wait_for};

use crate::stats::percentiles_ms;

/// Sizes of one run.
pub struct NamesPlan {
    pub rounds: usize,
    pub latency_count: usize,
    pub qps_count: usize,
    pub new_names: usize,
}

impl NamesPlan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self { rounds: 1, latency_count: 300, qps_count: 2000, new_names: 5 }
        } else {
            Self { rounds: 3, latency_count: 5000, qps_count: 50_000, new_names: 100 }
        }
    }
}

/// Who answers.
const SERVERS: [&str; 3] = ["datapath (NAMES map)", "agent's resolver", "dnsmasq in the container"];

/// What one `dns-bench` run printed.
struct Bench {
    p50_us: f64,
    p99_us: f64,
    qps: f64,
}

/// The figures, for the report.
pub struct Names {
    /// Per server: p50 and p99 of the rounds' p50s and p99s (µs), answers per second (median).
    pub latency: Vec<(&'static str, f64, f64, f64)>,
    /// Created -> resolvable from another host: (p50 ms, p99 ms, names).
    pub resolvable: Option<(f64, f64, usize)>,
}

pub fn run(plan: &NamesPlan) -> anyhow::Result<Names> {
    let c = Cluster::start("bnames", 2, 10).context("no etcd (run ./setup)")?;
    measure(&c, plan)
}

fn measure(c: &Cluster, plan: &NamesPlan) -> anyhow::Result<Names> {
    let kernel_name = format!("k{}", "x".repeat(61));
    let resolver_name = format!("r{}", "x".repeat(62));
    ok(c, &["network", "create", "--subnet", "10.80.0.0/16", "front"])?;
    ok(c, &["container", "create", "--host", "h2", "--network", "front", "client"])?;
    ok(
        c,
        &[
            "container",
            "create",
            "--host",
            "h1",
            "--network",
            "front",
            "--alias",
            &kernel_name,
            "--alias",
            &resolver_name,
            "web",
        ],
    )?;
    let web = c.address("front", "web");
    let gw = c.inspect("front")["IPAM"]["Config"][0]["Gateway"].as_str().context("gateway")?.to_owned();
    let ns = c.container_ns("h2", "client");

    // dnsmasq beside the client, holding the same names; nothing upstream.
    try_sh(&mut in_ns(&ns, &["ip", "link", "set", "lo", "up"]));
    let records: Vec<String> =
        [&kernel_name, &resolver_name].iter().map(|n| format!("--host-record={n},{web}")).collect();
    let mut args = vec![
        "dnsmasq",
        "--keep-in-foreground",
        "--user=root",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.11",
        "--pid-file=",
        "--log-facility=/dev/null",
    ];
    args.extend(records.iter().map(String::as_str));
    let mut dnsmasq = Proc::spawn("dnsmasq", &mut in_ns(&ns, &args));

    let targets = [
        (gw.as_str(), kernel_name.as_str()),
        (gw.as_str(), resolver_name.as_str()),
        ("127.0.0.11", resolver_name.as_str()),
    ];
    for (server, name) in targets {
        let answered = wait_for(Duration::from_secs(10), || bench_once(&ns, server, name, 10, 1).ok());
        if answered.is_none() {
            bail!("{name} is not answered by {server}");
        }
    }
    let before = c.topo.host("h2").counter("dns_answer");
    let mut lat: Vec<Vec<Bench>> = (0..3).map(|_| Vec::new()).collect();
    let mut tput: Vec<Vec<Bench>> = (0..3).map(|_| Vec::new()).collect();
    for _ in 0..plan.rounds {
        for (i, (server, name)) in targets.iter().enumerate() {
            lat[i].push(bench_once(&ns, server, name, plan.latency_count, 1)?);
            tput[i].push(bench_once(&ns, server, name, plan.qps_count, 32)?);
        }
    }
    // The datapath did answer the kernel name's queries (and only those).
    let answered_in_kernel = c.topo.host("h2").counter("dns_answer") - before;
    let expected = (plan.latency_count + plan.qps_count + 400) * plan.rounds;
    if answered_in_kernel < expected as u64 {
        bail!("the datapath answered {answered_in_kernel} queries, fewer than the {expected} asked of it");
    }
    dnsmasq.kill();

    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let latency = SERVERS
        .iter()
        .enumerate()
        .map(|(i, who)| {
            let mut p50: Vec<f64> = lat[i].iter().map(|b| b.p50_us).collect();
            let mut p99: Vec<f64> = lat[i].iter().map(|b| b.p99_us).collect();
            let mut qps: Vec<f64> = tput[i].iter().map(|b| b.qps).collect();
            (*who, median(&mut p50), median(&mut p99), median(&mut qps))
        })
        .collect();
    let resolvable = resolvable(c, &ns, &gw, plan.new_names)?;
    Ok(Names { latency, resolvable })
}

/// Created (the CLI started on h1) -> the name answered to the client on h2, for `n` new
/// containers one after another.
fn resolvable(c: &Cluster, ns: &str, gw: &str, n: usize) -> anyhow::Result<Option<(f64, f64, usize)>> {
    let probe = binary("overlay-probe");
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("new{i}");
        let mut waiter = Proc::spawn(
            "dns-wait",
            in_ns(ns, &[probe.to_str().context("path")?, "dns-wait", gw, &name, "10000"])
                .stdout(Stdio::piped()),
        );
        let mut out = BufReader::new(waiter.take_stdout().context("stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("dns-wait: {line}");
        }
        let t0 = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros();
        ok(c, &["container", "create", "--host", "h1", "--network", "front", &name])?;
        line.clear();
        out.read_line(&mut line)?;
        let t1: u128 = line.trim().parse().with_context(|| format!("{name} never resolved: {line:?}"))?;
        ms.push((t1.saturating_sub(t0)) as f64 / 1000.0);
        waiter.kill();
    }
    Ok(percentiles_ms(&ms).map(|(p50, p99)| (p50, p99, ms.len())))
}

fn bench_once(ns: &str, server: &str, name: &str, count: usize, window: usize) -> anyhow::Result<Bench> {
    let probe = binary("overlay-probe");
    let out = try_sh(&mut in_ns(
        ns,
        &[
            probe.to_str().context("path")?,
            "dns-bench",
            server,
            name,
            &count.to_string(),
            &window.to_string(),
        ],
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<f64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    if !out.status.success() || f.len() != 4 {
        bail!("dns-bench {server} {name}: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(Bench { p50_us: f[0], p99_us: f[1], qps: f[2] })
}

fn ok(c: &Cluster, args: &[&str]) -> anyhow::Result<()> {
    let out = c.cli(args);
    if !out.status.success() {
        bail!("overlay {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The stage's table, in markdown.
pub fn markdown(n: &Names, cmd: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "Names (`{cmd}`): a container on h2 asks for a name of a container on h1.\n");
    let _ = writeln!(out, "| answered by | p50 µs | p99 µs | answers/s (32 outstanding) | p50 vs datapath |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    let base = n.latency.first().map_or(f64::NAN, |l| l.1);
    for (who, p50, p99, qps) in &n.latency {
        let _ = writeln!(out, "| {who} | {p50:.1} | {p99:.1} | {qps:.0} | {:.2}× |", p50 / base);
    }
    if let Some((p50, p99, count)) = n.resolvable {
        let _ = writeln!(
            out,
            "\nName created (`overlay container create` on h1) -> answered on h2: p50 {p50:.1} ms, p99 {p99:.1} ms over {count} names."
        );
    }
    out
}
