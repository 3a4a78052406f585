//! What the reconciler's unit tests share: a desired state built in a few lines, an in-memory
//! kernel that records every map write, and a pass that runs the plan and the mirror over it
//! without root (local interfaces are stood in for by numbered records).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
};

use overlay_common::{
    dns::{NameAddrs, NameKey},
    maps::{Endpoint as MapEndpoint, EndpointKey, Iface, Network as MapNetwork},
};

use super::{
    Outcome,
    local::Local,
    mirror::{Found, Mirror},
    plan::{Existing, Here, Plan},
};
use crate::{
    datapath::{Error, MapWriter},
    desired::{Desired, Dirty, Id},
    model::{Container, Endpoint, Host, Network, State},
};

/// This host.
pub const ME: &str = "h1";

pub fn here() -> Here {
    Here { me: ME.to_owned(), sandbox_prefix: "t-".to_owned() }
}

/// One write to a map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    PutEndpoint(EndpointKey, MapEndpoint),
    RemoveEndpoint(EndpointKey),
    PutIface(u32, Iface),
    RemoveIface(u32),
    PutPeer(Ipv4Addr),
    RemovePeer(Ipv4Addr),
    PutNetwork(u32, MapNetwork),
    RemoveNetwork(u32),
}

/// One write to NAMES (kept apart from the other maps' writes: most tests are about those).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameCall {
    Put(NameKey, NameAddrs),
    Remove(NameKey),
}

/// The maps as the kernel would hold them, and the writes that made them so.
#[derive(Debug, Default)]
pub struct Kernel {
    pub endpoints: BTreeMap<EndpointKey, MapEndpoint>,
    pub ifaces: BTreeMap<u32, Iface>,
    pub peers: BTreeSet<Ipv4Addr>,
    pub networks: BTreeMap<u32, MapNetwork>,
    pub names: BTreeMap<NameKey, NameAddrs>,
    pub subnets: BTreeMap<ipnet::Ipv4Net, u32>,
    pub calls: Vec<Call>,
    pub name_calls: Vec<NameCall>,
}

impl Kernel {
    /// What the maps hold, as a previous agent would have left it.
    pub fn found(&self) -> Found {
        Found {
            endpoints: self.endpoints.iter().map(|(k, v)| (*k, *v)).collect(),
            ifaces: self.ifaces.iter().map(|(k, v)| (*k, *v)).collect(),
            peers: self.peers.iter().copied().collect(),
            networks: self.networks.iter().map(|(k, v)| (*k, *v)).collect(),
            names: self.names.iter().map(|(k, v)| (*k, *v)).collect(),
            subnets: self.subnets.clone(),
        }
    }

    /// The writes since the last call.
    pub fn take_calls(&mut self) -> Vec<Call> {
        std::mem::take(&mut self.calls)
    }

    /// The VNI -> (address, VTEP) entries of ENDPOINTS, for short assertions.
    pub fn entries(&self) -> Vec<(u32, Ipv4Addr, Ipv4Addr)> {
        self.endpoints.iter().map(|(k, v)| (k.vni, Ipv4Addr::from(k.ip), Ipv4Addr::from(v.vtep))).collect()
    }
}

impl MapWriter for Kernel {
    fn put_endpoint(&mut self, key: EndpointKey, value: MapEndpoint) -> Result<(), Error> {
        self.calls.push(Call::PutEndpoint(key, value));
        self.endpoints.insert(key, value);
        Ok(())
    }
    fn remove_endpoint(&mut self, key: &EndpointKey) -> Result<(), Error> {
        self.calls.push(Call::RemoveEndpoint(*key));
        self.endpoints.remove(key);
        Ok(())
    }
    fn put_iface(&mut self, ifindex: u32, value: Iface) -> Result<(), Error> {
        self.calls.push(Call::PutIface(ifindex, value));
        self.ifaces.insert(ifindex, value);
        Ok(())
    }
    fn remove_iface(&mut self, ifindex: u32) -> Result<(), Error> {
        self.calls.push(Call::RemoveIface(ifindex));
        self.ifaces.remove(&ifindex);
        Ok(())
    }
    fn put_peer(&mut self, vtep: Ipv4Addr) -> Result<(), Error> {
        self.calls.push(Call::PutPeer(vtep));
        self.peers.insert(vtep);
        Ok(())
    }
    fn remove_peer(&mut self, vtep: Ipv4Addr) -> Result<(), Error> {
        self.calls.push(Call::RemovePeer(vtep));
        self.peers.remove(&vtep);
        Ok(())
    }
    fn put_network(&mut self, vni: u32, value: MapNetwork) -> Result<(), Error> {
        self.calls.push(Call::PutNetwork(vni, value));
        self.networks.insert(vni, value);
        Ok(())
    }
    fn remove_network(&mut self, vni: u32) -> Result<(), Error> {
        self.calls.push(Call::RemoveNetwork(vni));
        self.networks.remove(&vni);
        Ok(())
    }
    fn put_name(&mut self, key: NameKey, value: NameAddrs) -> Result<(), Error> {
        self.name_calls.push(NameCall::Put(key, value));
        self.names.insert(key, value);
        Ok(())
    }
    fn remove_name(&mut self, key: &NameKey) -> Result<(), Error> {
        self.name_calls.push(NameCall::Remove(*key));
        self.names.remove(key);
        Ok(())
    }
    // Kept apart from `calls`, whose tests count endpoint, peer and network writes.
    fn put_subnet(&mut self, subnet: ipnet::Ipv4Net, vni: u32) -> Result<(), Error> {
        self.subnets.insert(subnet, vni);
        Ok(())
    }
    fn remove_subnet(&mut self, subnet: ipnet::Ipv4Net) -> Result<(), Error> {
        self.subnets.remove(&subnet);
        Ok(())
    }
}

pub fn network(id: &str, vni: u32, third_octet: u8) -> Network {
    Network::new(
        id,
        id,
        vni,
        format!("10.0.{third_octet}.0/24").parse().unwrap(),
        Ipv4Addr::new(10, 0, third_octet, 1),
    )
}

pub fn host(name: &str, vtep: Ipv4Addr) -> Host {
    Host::new(name, vtep)
}

/// The VTEP of test host `hN`.
pub fn vtep(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 0, n)
}

/// A desired state with hosts h1 (this one), h2 and h3.
pub fn state() -> State {
    let mut s = State::default();
    for n in 1..=3 {
        let name = format!("h{n}");
        s.hosts.insert(name.clone(), host(&name, vtep(n)));
    }
    s
}

pub fn add_network(s: &mut State, id: &str, vni: u32, third_octet: u8) {
    s.networks.insert(id.to_owned(), network(id, vni, third_octet));
}

/// Adds endpoint `id` of container `container` (made on `host` if missing) with address `ip`.
pub fn add_endpoint(s: &mut State, id: &str, network_id: &str, container: &str, host: &str, ip: Ipv4Addr) {
    s.containers.entry(container.to_owned()).or_insert_with(|| Container {
        name: container.to_owned(),
        host: host.to_owned(),
        netns: None,
        handover: false,
        ports: Vec::new(),
        created: String::new(),
        revision: 0,
    });
    s.endpoints.insert(id.to_owned(), Endpoint::new(id, network_id, container, host, ip));
}

/// The plan and the mirror of one host, over an in-memory kernel.
pub struct Pass {
    pub desired: Desired,
    pub mirror: Mirror,
    pub kernel: Kernel,
    pub locals: HashMap<Id, Local>,
    /// The gateways the resolver serves (as `ResolverPath` reports them to the mirror).
    pub served: BTreeSet<Ipv4Addr>,
    /// Networks with a way out (what the egress path would say).
    pub egress: BTreeSet<String>,
    next_ifindex: u32,
}

impl Pass {
    pub fn new() -> Self {
        Self::over(Kernel::default())
    }

    /// A fresh agent over a kernel that holds what a previous one left.
    pub fn over(kernel: Kernel) -> Self {
        Self {
            desired: Desired::new(ME),
            mirror: Mirror::new(kernel.found()),
            kernel,
            locals: HashMap::new(),
            served: BTreeSet::new(),
            egress: BTreeSet::new(),
            next_ifindex: 100,
        }
    }

    /// Loads `state` as a snapshot and reconciles the maps; returns the plan it followed.
    pub fn snapshot(&mut self, state: State, full: bool) -> Plan {
        let mut dirty = Dirty { full, ..Dirty::default() };
        self.desired.apply(crate::model::Update::Snapshot(state), &mut dirty);
        self.run(dirty)
    }

    pub fn run(&mut self, dirty: Dirty) -> Plan {
        let here = here();
        let existing = Existing { locals: &self.locals, sandboxes: BTreeMap::new(), mirror: &self.mirror };
        let plan = Plan::new(&here, &self.desired, dirty, &existing);
        let mut out = Outcome::default();
        // What Locals::sync does, without the interfaces: a local endpoint gets an ifindex and
        // its IFACES entry, or loses them with its ENDPOINTS entry.
        for id in &plan.locals {
            match (here.local_here(&self.desired, id), self.locals.contains_key(id)) {
                (Some((e, n, c)), false) => {
                    self.next_ifindex += 1;
                    let ifindex = self.next_ifindex;
                    self.locals.insert(
                        id.clone(),
                        Local {
                            ifindex,
                            host_name: format!("ov{id}"),
                            ifname: "eth0".to_owned(),
                            netns: here.netns_of(c),
                            network_id: e.network_id.clone(),
                            container: c.name.clone(),
                        },
                    );
                    let iface = Iface { vni: n.vni, ip: e.ipv4.octets(), mac: e.mac.0, _pad: [0; 2] };
                    self.mirror.put_iface(&mut self.kernel, ifindex, iface).unwrap();
                }
                (None, true) => {
                    let l = self.locals.remove(id).unwrap();
                    self.mirror.remove_entry(&mut self.kernel, id).unwrap();
                    self.mirror.remove_iface(&mut self.kernel, l.ifindex).unwrap();
                }
                _ => {}
            }
        }
        self.mirror.set_served(self.served.clone());
        self.mirror.set_egress(self.egress.clone());
        self.mirror.apply(&mut self.kernel, &here, &self.desired, &plan, &self.locals, &mut out);
        assert!(out.retry.is_empty(), "an in-memory kernel never fails: {:?}", out.retry);
        plan
    }
}

/// The path test sandboxes get.
pub fn sandbox_path(name: &str) -> PathBuf {
    crate::sandbox::path(&here().sandbox_prefix, name)
}
