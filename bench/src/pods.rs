//! The pods stage (`overlay-bench --pods`): how soon a pod created through CRI, as a kubelet
//! creates it, is reachable from another host, beside a container created with the CLI, in the
//! same run and measured the same way (issue 13).
//!
//! The tests' cluster (real etcd, an agent per host serving the CNI plugin on `--cni-socket`),
//! containerd 1.6 on h2 with its CRI plugin running `overlay-cni` (tests/src/containerd.rs), and
//! a client container on h1. Pods and CLI containers are created on h2 in turns, one at a time,
//! after one of each that is not counted (containerd's first sandbox unpacks the pause image's
//! snapshot). The addresses come from the store's IPAM, lowest free first, and nothing is
//! removed during the stage, so each new container's address is known before it is created; the
//! runtime's answer (PodSandboxStatus) or `overlay network inspect` then confirms it.
//!
//! For each one the client on h1 pings that address every 200 µs (`worker ping_probe`, with a
//! permanent neighbour entry, so no ARP retry timer of the client's kernel is measured); then
//! the clock starts and the container is created:
//!
//! * pod: the harness's CRI client calls RunPodSandbox on containerd's socket (containerd makes
//!   the namespace, runs the CNI ADD, which the agent on h2 answers by writing the store and
//!   plumbing the veth, and starts the pause container);
//! * CLI: `overlay container create --host h2 --network pods NAME` run on h2 (`nsenter --net`
//!   into the host's namespace, as a person on h2 would run it); the agent makes the namespace.
//!
//! The sample ends at the first echo reply, which needs h2's interface up and h1's agent to have
//! the new endpoint in its map. Every clock is CLOCK_MONOTONIC.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_agent::model::MacAddr;
use overlay_tests::{
    binary,
    cluster::Cluster,
    cni,
    containerd::{self, Containerd},
    cri, docker, ip_in, try_sh,
};
use serde::{Deserialize, Serialize};

use crate::{
    measure::{spawn_ready_worker, wait_rest},
    report::num,
    stats::percentiles_ms,
    sys::mono_ns,
    worker::ProbeRxResult,
};

const NET: &str = "pods";
const SUBNET: &str = "10.82.0.0/16";
/// Where the pods and the CLI containers are created; the client pings from the other host.
const HOST: &str = "h2";
const CLIENT_HOST: &str = "h1";
/// Kubernetes namespace of the pods (their overlay names are `p<i>.bench`).
const POD_NAMESPACE: &str = "bench";
/// How long the client waits for a new container's first reply.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Sizes of one run.
pub struct PodsPlan {
    /// Pods measured, and as many CLI containers.
    pub count: usize,
}

impl PodsPlan {
    pub fn new(quick: bool, count: Option<usize>) -> Self {
        Self { count: count.unwrap_or(if quick { 3 } else { 50 }).max(1) }
    }
}

/// The samples of one way of creating a container.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Series {
    /// "CRI RunPodSandbox" or "overlay container create".
    pub via: String,
    /// The call itself: from its start until it returned, ms, in order.
    pub call_ms: Vec<f64>,
    /// From the call's start to the first echo reply, ms, in order.
    pub start_to_reply_ms: Vec<f64>,
    /// From the call's return to the first echo reply, ms (0 when the reply came first).
    pub return_to_reply_ms: Vec<f64>,
    /// Containers whose first reply came before the call returned.
    pub replied_before_return: usize,
    /// Containers that never replied (within 10 s).
    pub unreachable: usize,
}

impl Series {
    fn new(via: &str) -> Self {
        Self { via: via.to_owned(), ..Default::default() }
    }

    /// Adds one container: CLOCK_MONOTONIC at the call's start and return, and at the first
    /// reply (None: none came).
    fn record(&mut self, started: u64, returned: u64, replied: Option<u64>) {
        let ms = |ns: u64| ns as f64 / 1e6;
        self.call_ms.push(ms(returned.saturating_sub(started)));
        match replied {
            Some(at) => {
                self.start_to_reply_ms.push(ms(at.saturating_sub(started)));
                self.return_to_reply_ms.push(ms(at.saturating_sub(returned)));
                if at < returned {
                    self.replied_before_return += 1;
                }
            }
            None => self.unreachable += 1,
        }
    }
}

/// The stage's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pods {
    /// containerd's version, as CRI's Version call gives it.
    pub runtime: String,
    pub series: Vec<Series>,
}

pub fn run(plan: &PodsPlan, exe: &Path) -> anyhow::Result<Pods> {
    if let Some(why) = containerd::missing() {
        bail!("{why}");
    }
    let socket_args = |run: &overlay_tests::Run, host: &str| {
        vec!["--cni-socket".to_owned(), cni::socket(run, host).to_string_lossy().into_owned()]
    };
    let c = Cluster::start_with("bpods", 2, 30, socket_args).context("no etcd (run ./setup)")?;
    let run = &c.topo.run;
    ok(&c, &["network", "create", "--subnet", SUBNET, NET])?;
    let rootfs = docker::busybox_rootfs(run).context("making the pause image's root filesystem")?;
    let t = Instant::now();
    // Declared after the cluster, so dropped before it: every sandbox is removed (CNI DEL)
    // while the agents still answer, and the daemon, shims and cgroups go, on error too.
    let runtime = Containerd::start(run, HOST, &c.topo.host(HOST).ns, NET, &cni::socket(run, HOST), &rootfs)?;
    eprintln!("  containerd on {HOST} up in {} ms", t.elapsed().as_millis());
    measure(&c, &runtime, exe, plan)
}

fn measure(c: &Cluster, runtime: &Containerd, exe: &Path, plan: &PodsPlan) -> anyhow::Result<Pods> {
    let mut cri = runtime.cri()?;
    let version = cri.version().context("CRI Version")?;
    ok(c, &["container", "create", "--host", CLIENT_HOST, "--network", NET, "client"])?;
    let client_ns = c.container_ns(CLIENT_HOST, "client");
    // Lowest free first, nothing freed: each next container takes the address after the last.
    let mut next = u32::from(c.address(NET, "client")) + 1;
    let mut pods = Series::new("CRI RunPodSandbox");
    let mut clis = Series::new("overlay container create");
    // Round 0 is the warm-up, not counted.
    for i in 0..=plan.count {
        let addr = Ipv4Addr::from(next);
        let (started, returned, replied) = timed(&client_ns, exe, addr, || {
            let config = cri::pod(&format!("p{i}"), POD_NAMESPACE, &format!("uid-p{i}"), &runtime.cgroup);
            cri.run_pod_sandbox(config).map_err(|s| anyhow::anyhow!("RunPodSandbox p{i}: {}", s.message()))
        })?;
        let id = returned.1;
        let got =
            cri.pod_sandbox_status(&id).map_err(|s| anyhow::anyhow!("PodSandboxStatus: {}", s.message()))?;
        let got = got.network.map(|n| n.ip).unwrap_or_default();
        if got != addr.to_string() {
            bail!("pod p{i} has address {got:?}, not the next free one, {addr}");
        }
        next += 1;

        let addr = Ipv4Addr::from(next);
        let name = format!("c{i}");
        let (c_started, c_returned, c_replied) = timed(&client_ns, exe, addr, || cli_on_host(c, &name))?;
        let got = c.address(NET, &name);
        if got != addr {
            bail!("container {name} has address {got}, not the next free one, {addr}");
        }
        next += 1;
        if i > 0 {
            pods.record(started, returned.0, replied);
            clis.record(c_started, c_returned.0, c_replied);
        }
        eprintln!(
            "  {} p{i}: reply {} ms after RunPodSandbox started; c{i}: {} ms after the CLI started",
            if i == 0 { "warm-up" } else { "       " },
            since(started, replied),
            since(c_started, c_replied),
        );
    }
    let runtime = format!("{} {}", version.runtime_name, version.runtime_version);
    Ok(Pods { runtime, series: vec![pods, clis] })
}

fn since(t0: u64, t: Option<u64>) -> String {
    t.map_or_else(|| "never".to_owned(), |t| format!("{:.1}", t.saturating_sub(t0) as f64 / 1e6))
}

/// Starts the client's pings to `addr`, then runs `create` between two clock readings; returns
/// (call start, (call return, what it returned), first reply).
fn timed<T>(
    client_ns: &str,
    exe: &Path,
    addr: Ipv4Addr,
    create: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(u64, (u64, T), Option<u64>)> {
    let mac = MacAddr::from_ip(addr).to_string();
    ip_in(
        client_ns,
        &["neigh", "replace", &addr.to_string(), "lladdr", &mac, "dev", "eth0", "nud", "permanent"],
    )?;
    let timeout_ms = REACH_TIMEOUT.as_millis().to_string();
    let args = ["ping-probe", "--to", &addr.to_string(), "--interval-us", "200", "--timeout-ms", &timeout_ms];
    let (mut prober, out) = spawn_ready_worker(client_ns, exe, "ping prober", &args)?;
    let started = mono_ns();
    let made = create();
    let returned = mono_ns();
    let made = made?;
    let out = wait_rest(&mut prober, out, REACH_TIMEOUT + Duration::from_secs(5))?;
    let r: ProbeRxResult = serde_json::from_str(out.trim()).context("parsing the prober's result")?;
    Ok((started, (returned, made), r.arrived_mono_ns))
}

/// `overlay container create --host h2 --network pods NAME`, run in h2's namespace.
fn cli_on_host(c: &Cluster, name: &str) -> anyhow::Result<()> {
    let out = try_sh(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", c.topo.host(HOST).ns))
            .arg(binary("overlay"))
            .args([
                "--etcd-endpoints",
                &c.url,
                "container",
                "create",
                "--host",
                HOST,
                "--network",
                NET,
                name,
            ]),
    );
    if !out.status.success() {
        bail!("overlay container create {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn ok(c: &Cluster, args: &[&str]) -> anyhow::Result<()> {
    let out = c.cli(args);
    if !out.status.success() {
        bail!("overlay {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The stage's table, in markdown.
pub fn markdown(p: &Pods, cmd: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Pods (`{cmd}`, {}): created on h2 in turns with CLI containers; a container on h1 pings each new address every 200 µs. Milliseconds, p50 / p99.\n",
        p.runtime
    );
    let _ = writeln!(
        out,
        "| created by | count | the call itself (start → return) | call started → first reply | call returned → first reply (0: before) | replied before the call returned | never replied |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let pair = |v: &[f64]| {
        percentiles_ms(v).map_or_else(|| "–".to_owned(), |(p50, p99)| format!("{} / {}", num(p50), num(p99)))
    };
    for s in &p.series {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            s.via,
            s.call_ms.len(),
            pair(&s.call_ms),
            pair(&s.start_to_reply_ms),
            pair(&s.return_to_reply_ms),
            s.replied_before_return,
            s.unreachable
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_before_the_return_counts_from_the_return_as_zero() {
        let mut s = Series::new("CRI RunPodSandbox");
        // Call 0–100 ms, reply at 130 ms; call 0–100 ms, reply at 60 ms; no reply.
        s.record(0, 100_000_000, Some(130_000_000));
        s.record(1_000_000_000, 1_100_000_000, Some(1_060_000_000));
        s.record(0, 50_000_000, None);
        assert_eq!(s.call_ms, [100.0, 100.0, 50.0]);
        assert_eq!(s.start_to_reply_ms, [130.0, 60.0]);
        assert_eq!(s.return_to_reply_ms, [30.0, 0.0]);
        assert_eq!((s.replied_before_return, s.unreachable), (1, 1));
        let table = markdown(&Pods { runtime: "containerd 1.6".into(), series: vec![s] }, "x");
        assert!(
            table.contains("| CRI RunPodSandbox | 3 | 100 / 100 | 60.0 / 130 | 0.000 / 30.0 | 1 | 1 |"),
            "{table}"
        );
    }
}
