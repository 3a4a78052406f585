//! The desired state the eBPF topology's agents read from a file, built from the agent's own
//! model types so a change to the model breaks this build instead of silently feeding the agents
//! a stale layout; and `Publisher`, how the harness adds endpoints to either source.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use overlay_agent::model::{Container, Endpoint, Host, Network, State};

use crate::sys::mono_ns;

/// A 64-hex-digit id as Docker makes them, derived from `seed` (splitmix64), so runs are
/// reproducible and the first 12 digits (the agent's veth name) differ between endpoints.
pub fn object_id(seed: u64) -> String {
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut out = String::with_capacity(64);
    for _ in 0..4 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let _ = write!(out, "{z:016x}");
    }
    out
}

pub fn network(id: &str, name: &str, vni: u32, subnet: &str, gateway: Ipv4Addr) -> anyhow::Result<Network> {
    Ok(Network::new(id, name, vni, subnet.parse().with_context(|| format!("subnet {subnet}"))?, gateway))
}

pub fn host(name: &str, vtep: Ipv4Addr) -> Host {
    Host::new(name, vtep)
}

pub fn container(name: &str, host: &str, netns: Option<PathBuf>) -> Container {
    Container {
        name: name.to_owned(),
        host: host.to_owned(),
        netns,
        handover: false,
        ports: Vec::new(),
        created: String::new(),
        revision: 0,
    }
}

pub fn endpoint(id: &str, network_id: &str, container: &str, host: &str, ip: Ipv4Addr) -> Endpoint {
    Endpoint::new(id, network_id, container, host, ip)
}

/// Adds a container and its one endpoint on `network_id`.
pub fn add_container(state: &mut State, c: Container, e: Endpoint) {
    state.containers.insert(c.name.clone(), c);
    state.endpoints.insert(e.id.clone(), e);
}

/// Writes the state file the way an editor should: a temporary file renamed over the old one,
/// so an agent never reads half a file.
pub fn write_state(path: &Path, state: &State) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec(state)?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// An endpoint for the agents to make: a container in a namespace the harness made (as a
/// container runtime does), with one address on the topology's network.
pub struct NewEndpoint<'a> {
    pub name: &'a str,
    pub host: &'a str,
    pub netns: &'a Path,
    pub ip: Ipv4Addr,
    /// Distinct for every endpoint of a run: seeds the ids the harness makes up.
    pub seq: u64,
}

/// When a publication started (the clock of endpoint-to-reachable starts here) and when the
/// source had it (the file renamed into place, or etcd's transaction committed); both
/// CLOCK_MONOTONIC, ns.
#[derive(Clone, Copy, Debug)]
pub struct Published {
    pub started_mono_ns: u64,
    pub finished_mono_ns: u64,
}

/// Where the harness publishes new endpoints to the eBPF topology's agents: the state file they
/// poll (`FilePublisher`) or etcd, which they watch (`store::EtcdPublisher`). The stage that
/// measures endpoint-to-reachable only talks to this trait.
pub trait Publisher {
    /// What the figures are labelled with ("file", "etcd").
    fn source(&self) -> &'static str;
    /// Publishes a new container with its endpoint.
    fn publish(&mut self, ep: &NewEndpoint<'_>) -> anyhow::Result<Published>;
    /// The harness pauses a random time up to this before each publication: for a source the
    /// agents poll, a little more than the poll period, so that publishing falls anywhere in it.
    fn phase_spread(&self) -> Duration;
}

/// The state file the agents poll (every 200 ms: `overlay_agent::source::file`).
pub struct FilePublisher {
    pub path: PathBuf,
    pub state: State,
    /// The network the endpoints join, by id.
    pub network_id: String,
}

impl FilePublisher {
    pub fn new(path: PathBuf, state: State, network_id: &str) -> anyhow::Result<Self> {
        write_state(&path, &state)?;
        Ok(Self { path, state, network_id: network_id.to_owned() })
    }
}

impl Publisher for FilePublisher {
    fn source(&self) -> &'static str {
        "file"
    }

    fn phase_spread(&self) -> Duration {
        // The agents poll the file every 200 ms.
        Duration::from_millis(250)
    }

    fn publish(&mut self, ep: &NewEndpoint<'_>) -> anyhow::Result<Published> {
        let id = object_id(1_000_000 + ep.seq);
        let started_mono_ns = mono_ns();
        add_container(
            &mut self.state,
            container(ep.name, ep.host, Some(ep.netns.to_owned())),
            endpoint(&id, &self.network_id, ep.name, ep.host, ep.ip),
        );
        write_state(&self.path, &self.state)?;
        Ok(Published { started_mono_ns, finished_mono_ns: mono_ns() })
    }
}
