//! Desired states for the end-to-end tests, built with the agent's own model types.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use overlay_agent::model::{Container, Endpoint, Host, MacAddr, Network, State};
use sha2::{Digest, Sha256};

use crate::topology::Topology;

/// A 64-hex-digit id derived from `seed` (stable across runs, like Docker's ids in shape).
pub fn id(seed: &str) -> String {
    format!("{:x}", Sha256::digest(seed.as_bytes()))
}

pub fn network(name: &str, vni: u32, subnet: &str) -> Network {
    let subnet: Ipv4Net = subnet.parse().expect("subnet");
    Network::new(
        &id(&format!("network {name}")),
        name,
        vni,
        subnet,
        Ipv4Addr::from(u32::from(subnet.network()) + 1),
    )
}

/// Builds a state: the topology's hosts, the given networks, and containers placed as
/// `(container, host, network name, address)`.
pub struct Scenario {
    pub state: State,
}

impl Scenario {
    pub fn new(topo: &Topology, networks: &[Network]) -> Self {
        let mut state = State::default();
        for h in &topo.hosts {
            state.hosts.insert(h.name.clone(), Host::new(h.name.clone(), h.vtep));
        }
        for n in networks {
            state.networks.insert(n.id.clone(), n.clone());
        }
        Self { state }
    }

    pub fn network(&self, name: &str) -> &Network {
        self.state.network_by_name(name).unwrap_or_else(|| panic!("no network {name}"))
    }

    /// Adds a container (if new) on `host` and connects it to `network` with `ip`.
    pub fn attach(&mut self, container: &str, host: &str, network: &str, ip: Ipv4Addr) -> &mut Self {
        self.state.containers.entry(container.into()).or_insert_with(|| Container {
            name: container.into(),
            host: host.into(),
            netns: None,
            handover: false,
            ports: Vec::new(),
            created: String::new(),
            revision: 0,
        });
        let network_id = self.network(network).id.clone();
        let e = Endpoint {
            id: id(&format!("endpoint {container} {network}")),
            network_id,
            container: container.into(),
            ipv4: ip,
            mac: MacAddr::from_ip(ip),
            host: host.into(),
            aliases: Vec::new(),
            services: Vec::new(),
            ifname: None,
        };
        self.state.endpoints.insert(e.id.clone(), e);
        self
    }

    pub fn detach(&mut self, container: &str, network: &str) -> &mut Self {
        let network_id = self.network(network).id.clone();
        self.state.endpoints.retain(|_, e| !(e.container == container && e.network_id == network_id));
        self
    }

    pub fn remove_container(&mut self, container: &str) -> &mut Self {
        self.state.endpoints.retain(|_, e| e.container != container);
        self.state.containers.remove(container);
        self
    }

    /// Writes the state where a file-source agent reads it (atomically: write, then rename).
    pub fn write(&self, path: &std::path::Path) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state).expect("json")).expect("write state");
        std::fs::rename(&tmp, path).expect("rename state");
    }
}
