//! Control-plane figures of the eBPF agent:
//!
//! * endpoint-to-reachable: time from an endpoint being created (in etcd, which the agents
//!   watch; and, as a secondary figure, in the state file the agents poll) to the first packet
//!   from a container on another host arriving in it;
//! * load time: an agent started on a state of N endpoints (a file, or etcd), until its maps
//!   hold them all;
//! * the agent's memory once it holds 100k endpoints.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use overlay_agent::{
    datapath::PinDir,
    model::{MacAddr, State},
};
use overlay_common::maps::{Endpoint as MapEndpoint, EndpointKey, MAP_ENDPOINTS};
use overlay_tests::{
    Run,
    agent::{AgentCommand, Source},
    cleanup_prefix, ip, ip_in,
    underlay::{self, Member},
};
use serde::{Deserialize, Serialize};

use crate::{
    agent::{Agent, AgentArgs},
    measure::{spawn_ready_worker, wait_rest},
    state::{self, NewEndpoint},
    stats::percentiles_ms,
    store::{Request, StoreClient, start_etcd},
    sys::{mono_ns, proc_status_kib},
    topology::{CONTAINERS, EbpfSource, HOSTS, Topology},
    worker::ProbeRxResult,
};

/// Endpoint-to-reachable samples.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reach {
    /// Where the endpoints were created ("etcd": the store, which the agents watch; "file": the
    /// state file, which the agents poll every 200 ms).
    pub source: String,
    /// One per endpoint, milliseconds, in order.
    pub samples_ms: Vec<f64>,
    /// Of each sample, the write itself: until the source had the endpoint (etcd's
    /// transaction committed, or the file renamed into place), milliseconds, in order.
    #[serde(default)]
    pub write_ms: Vec<f64>,
    /// Endpoints whose first packet never arrived (within 5 s).
    pub unreachable: usize,
}

impl Reach {
    /// (p50, p99) of the samples, ms.
    pub fn percentiles(&self) -> Option<(f64, f64)> {
        percentiles_ms(&self.samples_ms)
    }
}

/// Address of the i-th probed endpoint (in the data-plane network, after its two containers).
fn reach_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 0, 10 + i as u8)
}

pub const REACH_MAX: usize = 240;
const PROBE_PORT: u16 = 7100;

/// Endpoint-to-reachable on an eBPF topology, through its publisher (etcd or the state file).
///
/// For each endpoint: the harness makes the container's namespace itself (as a container
/// runtime does before it asks for the network) and starts a UDP receiver in it, bound to any
/// address; container a on h1 starts sending a probe every 200 µs to the new address (with a
/// permanent neighbor entry, so no ARP retry timer of container a's kernel is measured). After
/// a random pause the clock starts and the endpoint is created, on h2, with that namespace:
/// with etcd the store client (on h2) takes the time just before its create call, which reads
/// the network's addresses and commits the container and its endpoint in one transaction;
/// with the file source, just before the new state file is written. The sample ends when the
/// receiver gets its first probe: by then h2's agent has made the interface and h1's agent has
/// the remote entry in its map. Every clock is CLOCK_MONOTONIC.
pub fn endpoint_to_reachable(
    run: &Run,
    topo: &mut Topology,
    exe: &Path,
    count: usize,
) -> anyhow::Result<Reach> {
    if count > REACH_MAX {
        bail!("at most {REACH_MAX} endpoints fit the data-plane subnet");
    }
    let host = HOSTS[CONTAINERS[1].host].name;
    let client_ns = topo.client_ns().to_owned();
    let publisher = topo.publisher.as_mut().context("the eBPF topology has no publisher")?;
    let spread = publisher.phase_spread();
    let mut reach = Reach { source: publisher.source().to_owned(), ..Default::default() };
    let mut rng = XorShift(mono_ns() | 1);
    for i in 0..count {
        let addr = reach_ip(i);
        let name = format!("x{i}");
        let ns = Topology::container_ns(run, topo.tag, host, &name);
        ip(&["netns", "add", &ns])?;
        ip_in(&ns, &["link", "set", "lo", "up"])?;
        let rx_args = ["probe-rx", "--port", &PROBE_PORT.to_string(), "--timeout-ms", "5000"];
        let (mut rx, rx_out) = spawn_ready_worker(&ns, exe, "probe receiver", &rx_args)?;
        let mac = MacAddr::from_ip(addr).to_string();
        ip_in(
            &client_ns,
            &["neigh", "replace", &addr.to_string(), "lladdr", &mac, "dev", "eth0", "nud", "permanent"],
        )?;
        let to = SocketAddr::from((addr, PROBE_PORT)).to_string();
        let tx_args = ["probe-tx", "--to", &to, "--interval-us", "200", "--timeout-ms", "6000"];
        let (mut tx, _tx_out) = spawn_ready_worker(&client_ns, exe, "probe sender", &tx_args)?;

        // A random pause, so the moment of publishing falls anywhere in the file source's poll
        // period: without it, every iteration would start at the same phase (right after the
        // previous endpoint's poll), and all samples would wait about as long.
        std::thread::sleep(Duration::from_micros(rng.next() % spread.as_micros().max(1) as u64));
        let netns = Path::new("/run/netns").join(&ns);
        let published =
            publisher.publish(&NewEndpoint { name: &name, host, netns: &netns, ip: addr, seq: i as u64 })?;
        let out = wait_rest(&mut rx, rx_out, Duration::from_secs(8))?;
        tx.kill();
        let r: ProbeRxResult =
            serde_json::from_str(out.trim()).context("parsing the probe receiver's result")?;
        let t0 = published.started_mono_ns;
        match r.arrived_mono_ns {
            Some(at) => {
                reach.samples_ms.push(at.saturating_sub(t0) as f64 / 1e6);
                reach.write_ms.push(published.finished_mono_ns.saturating_sub(t0) as f64 / 1e6);
            }
            None => reach.unreachable += 1,
        }
    }
    Ok(reach)
}

/// xorshift64: enough randomness for spreading start times.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One agent start on a state of `endpoints` remote endpoints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Load {
    /// Where the agent read the state: "file" or "etcd".
    pub source: String,
    pub endpoints: usize,
    /// Remote hosts the endpoints are spread over.
    pub remote_hosts: usize,
    /// Agent process start → its "full reconcile done" log line, ms (the whole start: reading
    /// the state (the file parsed, or etcd connected to and read), BPF load and attach, the one
    /// local veth, every map write).
    pub wall_ms: f64,
    /// The reconcile pass alone, as the agent timed it (took_ms).
    pub reconcile_ms: f64,
    /// Entries in the pinned endpoint map afterwards, counted by the harness.
    pub map_entries: usize,
    /// The agent's resident memory after the load, and its peak, KiB.
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
}

/// What the agents log when they cannot get their state from etcd (they retry for ever).
const ETCD_FAILURES: [&str; 2] =
    ["cannot read the desired state from etcd; retrying", "cannot reach etcd; the datapath keeps forwarding"];

/// Starts an agent on a fresh host h1 whose network has one local endpoint and `n` remote ones
/// (100 per remote host, at most 1000 hosts), read from a state file or from a fresh etcd
/// filled beforehand, and times it until its maps hold them.
pub fn load(
    run: &Run,
    agent_binary: &Path,
    exe: &Path,
    source: EbpfSource,
    n: usize,
    rep: usize,
) -> anyhow::Result<Load> {
    let tag = format!("l{n}-{rep}");
    // `<run>-<tag>-h`, `<run>-<tag>-u` and the agent's sandboxes `<run>-<tag>-<container>`: one
    // prefix for all.
    let host_ns = run.ns(&format!("{tag}-h"));
    let (st, remote_hosts) = load_state(n)?;
    let state_file = run.path(&format!("{tag}-state.json"));
    // With the etcd source: etcd, which lives until the agent has stopped, and its URL.
    let mut etcd = None;
    let url;
    let agent_source = match source {
        EbpfSource::File => {
            // A host with an uplink and nothing else (the agent attaches to it; no traffic flows).
            ip(&["netns", "add", &host_ns])?;
            ip_in(&host_ns, &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])?;
            ip_in(&host_ns, &["link", "set", "eth0", "up"])?;
            ip_in(&host_ns, &["link", "set", "eth0p", "up"])?;
            ip_in(&host_ns, &["addr", "add", "198.18.0.1/24", "dev", "eth0"])?;
            state::write_state(&state_file, &st)?;
            Source::File(&state_file)
        }
        EbpfSource::Etcd => {
            // The host on an underlay with etcd on it, filled before the agent starts. h1 is
            // left out of the store: its agent registers it.
            let underlay_ns = run.ns(&format!("{tag}-u"));
            underlay::build(
                &underlay_ns,
                &[Member { ns: &host_ns, addr: HOSTS[0].vtep }],
                underlay::Options::default(),
            )?;
            let started = start_etcd(run, &underlay_ns)?;
            url = started.url();
            etcd = Some(started);
            let mut st = st;
            st.hosts.remove("h1");
            StoreClient::spawn(&host_ns, exe, &url)?.write(&Request::Fill { state: st })?;
            Source::Etcd(&url)
        }
    };

    let pin_dir = run.pin_root().join(&tag);
    let state_dir = run.path(&format!("{tag}-agent"));
    let netns_prefix = run.ns(&format!("{tag}-"));
    let t0 = mono_ns();
    let mut agent = Agent::spawn(AgentArgs {
        binary: agent_binary,
        agent: AgentCommand {
            host: "h1",
            uplink: "eth0",
            vtep: Ipv4Addr::new(198, 18, 0, 1),
            netns: &host_ns,
            pin_dir: &pin_dir,
            state_dir: &state_dir,
            netns_prefix: &netns_prefix,
            source: &agent_source,
        },
        xdp_mode: "off",
        log: run.path(&format!("agent-{tag}.log")),
    })?;
    let done = agent.wait_for_unless("full reconcile done", &ETCD_FAILURES, Duration::from_mins(2))?;
    let wall_ms = done.mono_ns.saturating_sub(t0) as f64 / 1e6;
    let reconcile_ms = done.fields["took_ms"].as_f64().unwrap_or(f64::NAN);
    let reported = done.fields["map_endpoints"].as_u64().unwrap_or(0) as usize;
    let vm_rss_kib = proc_status_kib(agent.pid(), "VmRSS")?;
    let vm_hwm_kib = proc_status_kib(agent.pid(), "VmHWM")?;
    let map_entries = count_endpoints(&PinDir::new(&pin_dir))?;
    agent.stop();
    drop(etcd);
    if map_entries != n + 1 || reported != n + 1 {
        bail!("the agent's map holds {map_entries} endpoints (it says {reported}), not {}", n + 1);
    }
    // This load's namespaces and pins are done with; the Run would remove them too.
    cleanup_prefix(&run.ns(&tag));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let _ = std::fs::remove_file(&state_file);
    Ok(Load {
        source: source.key().to_owned(),
        endpoints: n,
        remote_hosts,
        wall_ms,
        reconcile_ms,
        map_entries,
        vm_rss_kib,
        vm_hwm_kib,
    })
}

/// The state of a load: host h1 with container c0, and `n` containers on remote hosts (100 per
/// host, at most 1000 hosts), all on one network; and the number of remote hosts.
fn load_state(n: usize) -> anyhow::Result<(State, usize)> {
    let remote_hosts = n.div_ceil(100).clamp(1, 1000);
    let network = state::object_id(2_000_000);
    let mut st = State::default();
    st.networks.insert(
        network.clone(),
        state::network(&network, "load", 5000, "10.64.0.0/14", Ipv4Addr::new(10, 64, 0, 1))?,
    );
    st.hosts.insert("h1".into(), state::host("h1", Ipv4Addr::new(198, 18, 0, 1)));
    for k in 0..remote_hosts {
        let vtep = Ipv4Addr::new(198, 18, 4 + (k / 250) as u8, 1 + (k % 250) as u8);
        st.hosts.insert(format!("r{k}"), state::host(&format!("r{k}"), vtep));
    }
    let base = u32::from(Ipv4Addr::new(10, 64, 0, 2));
    state::add_container(
        &mut st,
        state::container("c0", "h1", None),
        state::endpoint(&state::object_id(3_000_000), &network, "c0", "h1", Ipv4Addr::from(base)),
    );
    for i in 0..n {
        let host = format!("r{}", i % remote_hosts);
        let name = format!("c{}", i + 1);
        let ip = Ipv4Addr::from(base + 1 + i as u32);
        let id = state::object_id(4_000_000 + i as u64);
        state::add_container(
            &mut st,
            state::container(&name, &host, None),
            state::endpoint(&id, &network, &name, &host, ip),
        );
    }
    Ok((st, remote_hosts))
}

/// Entries in a host's pinned endpoint map.
fn count_endpoints(pins: &PinDir) -> anyhow::Result<usize> {
    let path = pins.map(MAP_ENDPOINTS);
    let data = aya::maps::MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map: aya::maps::HashMap<_, EndpointKey, MapEndpoint> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
    Ok(map.keys().filter_map(Result::ok).count())
}
