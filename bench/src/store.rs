//! The harness's client of the store (etcd), for the eBPF topology whose agents follow etcd.
//!
//! etcd listens on the underlay bridge, which only the hosts' namespaces reach, so the client is
//! a worker (`overlay-bench worker store`) that the harness starts inside a host's namespace, as
//! a container runtime on that host would run. It keeps one connection open and answers one
//! JSON request per line on stdin with one JSON line on stdout. It takes its own timestamps
//! around each store call (CLOCK_MONOTONIC, which every namespace shares), so the time of
//! the pipe between harness and worker is not part of what is measured.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_agent::{
    model::State,
    store::{
        ContainerSpec, NetworkSpec, Store, StoreConfig,
        etcd_client::{Txn, TxnOp},
    },
};
use overlay_tests::{Proc, Run, cluster, etcd::Etcd};
use serde::{Deserialize, Serialize};

use crate::{
    state::{NewEndpoint, Published, Publisher},
    sys::{mono_ns, read_line_timeout, worker_in},
};

/// Starts etcd in `underlay` (whose bridge br0 joins the hosts), at 198.18.0.254 as the test
/// suite's `Cluster` runs it. Its data lives in /dev/shm (so fsync costs nothing), and goes on
/// a signal too.
pub fn start_etcd(run: &Run, underlay: &str) -> anyhow::Result<Etcd> {
    if Etcd::binary().is_none() {
        bail!("no etcd binary (Debian package etcd-server; or set OVERLAY_ETCD_BIN)");
    }
    cluster::start_etcd(run, underlay).context("starting etcd")
}

/// One request to the worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// The names of the registered hosts (each has an agent holding its lease).
    Hosts,
    /// Creates an overlay network.
    Network { name: String, subnet: String, gateway: Ipv4Addr, vni: u32 },
    /// Creates a container connected to `network` at `ip`; with `netns`, in a namespace made by
    /// someone else (the harness), else in one its host's agent makes.
    Container { name: String, host: String, netns: Option<PathBuf>, network: String, ip: Ipv4Addr },
    /// Writes every network, host, container and endpoint of a whole state under the keys the
    /// store keeps them at, without the store's own checks and indexes (a create call per
    /// container reads every address of the network, too slow for 100k): what the agents read.
    Fill { state: State },
}

/// What the worker answers (as `Result<Answer, String>`: `{"Ok": ...}` or `{"Err": "..."}`).
#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Hosts(Vec<String>),
    /// CLOCK_MONOTONIC just before the store call and just after it returned (committed).
    Written {
        started_mono_ns: u64,
        finished_mono_ns: u64,
    },
}

/// The worker: connects to `etcd`, says `ready`, then serves requests until stdin closes.
pub fn serve(etcd: &str) -> anyhow::Result<()> {
    // One worker thread: the store calls are one at a time.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let store = rt.block_on(Store::connect(&StoreConfig::new([etcd])))?;
    // The connection is made lazily; one read makes it before the first timed call.
    rt.block_on(store.hosts())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let request: Request = serde_json::from_str(&line?).context("parsing a request")?;
        let answer = rt.block_on(handle(&store, request)).map_err(|e| format!("{e:#}"));
        serde_json::to_writer(&mut out, &answer)?;
        writeln!(out)?;
        out.flush()?;
    }
    Ok(())
}

async fn handle(store: &Store, request: Request) -> anyhow::Result<Answer> {
    match request {
        Request::Hosts => Ok(Answer::Hosts(
            store.hosts().await?.into_iter().filter(|e| e.alive.is_some()).map(|e| e.host.name).collect(),
        )),
        Request::Network { name, subnet, gateway, vni } => {
            let spec = NetworkSpec {
                name,
                subnet: Some(subnet),
                gateway: Some(gateway.to_string()),
                options: vec![format!("vni={vni}")],
                ..Default::default()
            };
            let started_mono_ns = mono_ns();
            store.create_network(&spec).await?;
            Ok(Answer::Written { started_mono_ns, finished_mono_ns: mono_ns() })
        }
        Request::Container { name, host, netns, network, ip } => {
            let spec = ContainerSpec {
                name,
                host,
                netns,
                network: Some(network),
                ip: Some(ip),
                names: Default::default(),
                ports: Vec::new(),
            };
            let started_mono_ns = mono_ns();
            store.create_container(&spec).await?;
            Ok(Answer::Written { started_mono_ns, finished_mono_ns: mono_ns() })
        }
        Request::Fill { state } => {
            let started_mono_ns = mono_ns();
            fill(store, &state).await?;
            Ok(Answer::Written { started_mono_ns, finished_mono_ns: mono_ns() })
        }
    }
}

/// `Request::Fill`: plain puts, as many to a transaction as etcd takes (--max-txn-ops, 128).
async fn fill(store: &Store, state: &State) -> anyhow::Result<()> {
    fn put<T: Serialize>(key: String, value: &T) -> anyhow::Result<TxnOp> {
        Ok(TxnOp::put(key, serde_json::to_vec(value)?, None))
    }
    let k = store.keys();
    let mut puts = Vec::new();
    for n in state.networks.values() {
        puts.push(put(k.network(&n.id), n)?);
    }
    // Registered and alive (without leases: these hosts have no agents to renew them).
    for h in state.hosts.values() {
        puts.push(put(k.host(&h.name), h)?);
        puts.push(put(k.alive_host(&h.name), h)?);
    }
    for c in state.containers.values() {
        puts.push(put(k.container(&c.name), c)?);
    }
    for e in state.endpoints.values() {
        puts.push(put(k.endpoint(&e.network_id, &e.id), e)?);
    }
    let mut kv = store.client().kv_client();
    let mut puts = puts.into_iter().peekable();
    while puts.peek().is_some() {
        let batch: Vec<TxnOp> = puts.by_ref().take(128).collect();
        kv.txn(Txn::new().and_then(batch)).await.context("writing the state to etcd")?;
    }
    Ok(())
}

/// The harness's end of a store worker.
pub struct StoreClient {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    proc: Proc,
}

impl StoreClient {
    /// Starts a worker in namespace `ns`, connected to etcd at `url`.
    pub fn spawn(ns: &str, exe: &Path, url: &str) -> anyhow::Result<Self> {
        let mut cmd = worker_in(ns, exe);
        cmd.args(["store", "--etcd", url]).stdout(Stdio::piped());
        // Not Proc::try_spawn, which gives the child a null stdin: this one reads its requests
        // from a pipe.
        let mut child = cmd.stdin(Stdio::piped()).spawn().with_context(|| format!("starting {cmd:?}"))?;
        let stdin = child.stdin.take().context("store client stdin")?;
        let mut proc = Proc { child: Some(child), name: "store client".into() };
        let out = proc.take_stdout().context("store client stdout")?;
        let (line, out) = read_line_timeout(out, Duration::from_secs(20))
            .with_context(|| format!("store client: connecting to {url}"))?;
        if line != "ready" {
            bail!("store client said {line:?}");
        }
        Ok(Self { stdin, stdout: BufReader::new(out), proc })
    }

    /// Sends one request and reads its answer. The worker answers every request (each store
    /// call gives up after the store's request timeout), so this does not wait forever.
    pub fn call(&mut self, request: &Request) -> anyhow::Result<Answer> {
        serde_json::to_writer(&mut self.stdin, request)?;
        writeln!(self.stdin)?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let exited = !self.proc.is_running();
            bail!("the store client closed its output (exited: {exited})");
        }
        let answer: Result<Answer, String> =
            serde_json::from_str(line.trim()).with_context(|| format!("store client said {line:?}"))?;
        answer.map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Waits until every host in `hosts` is registered (its agent has a lease).
    pub fn wait_registered(&mut self, hosts: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let Answer::Hosts(registered) = self.call(&Request::Hosts)? else { bail!("not a host list") };
            if hosts.iter().all(|h| registered.iter().any(|r| r == h)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("hosts {hosts:?} not all registered within {timeout:?} (registered: {registered:?})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a write request; its start and end.
    pub fn write(&mut self, request: &Request) -> anyhow::Result<Published> {
        match self.call(request)? {
            Answer::Written { started_mono_ns, finished_mono_ns } => {
                Ok(Published { started_mono_ns, finished_mono_ns })
            }
            other => bail!("unexpected answer {other:?}"),
        }
    }
}

/// Endpoints published as containers created through the store, which the agents watch.
pub struct EtcdPublisher {
    pub client: StoreClient,
    /// The network the endpoints join, by name.
    pub network: String,
    /// Declared last: etcd outlives the client (and, in the topology, the agents).
    #[expect(dead_code, reason = "held for its Drop, which stops etcd")]
    pub etcd: Etcd,
}

impl Publisher for EtcdPublisher {
    fn source(&self) -> &'static str {
        "etcd"
    }

    fn phase_spread(&self) -> Duration {
        // The agents are told at once (a watch): there is no period to spread over. A short
        // random pause only keeps the samples from starting in step with the agents' reports
        // on the previous endpoint.
        Duration::from_millis(50)
    }

    fn publish(&mut self, ep: &NewEndpoint<'_>) -> anyhow::Result<Published> {
        self.client.write(&Request::Container {
            name: ep.name.to_owned(),
            host: ep.host.to_owned(),
            netns: Some(ep.netns.to_owned()),
            network: self.network.clone(),
            ip: ep.ip,
        })
    }
}
