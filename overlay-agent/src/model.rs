//! The desired state: networks, endpoints, containers and hosts, as the store holds them.
//!
//! This is the Container Network Model of libnetwork: a *container* (sandbox) is a network
//! namespace on one host; an *endpoint* is its interface on one *network*; a network is a set of
//! endpoints that may talk to each other and to nobody else, stretched across *hosts* by VXLAN
//! with its own VNI. The agent of each host makes the part of this state that concerns it real.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::PathBuf, str::FromStr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The only driver this project implements.
pub const DRIVER_OVERLAY: &str = "overlay";

/// VNIs are 24 bits (RFC 7348). 0 is reserved here so that "no VNI" can never be a real one;
/// 0xFFFFFF is reserved by some implementations, so we never hand it out either.
pub const VNI_MIN: u32 = 1;
pub const VNI_MAX: u32 = 0xFF_FFFE;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// 64 hex digits, as Docker's network IDs.
    pub id: String,
    /// Unique among networks.
    pub name: String,
    pub driver: String,
    pub vni: u32,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Where endpoint addresses come from; the whole subnet when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<Ipv4Net>,
    /// Addresses reserved for other devices on the network, never handed out (name -> address).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aux_addresses: BTreeMap<String, Ipv4Addr>,
    /// MTU requested for containers (`-o mtu=N`); each host uses at most its uplink MTU minus
    /// the VXLAN overhead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339 creation time.
    #[serde(default)]
    pub created: String,
    /// `--internal`: containers talk to each other only, as on Docker's internal networks: no
    /// way out through their hosts, no published ports (docs/egress.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal: bool,
    /// `-o encrypted` (Docker's `--opt encrypted`): its frames may cross the underlay only
    /// encrypted and authenticated, never in the clear (docs/encryption.md). Set at creation,
    /// never changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

impl Network {
    /// A network of the overlay driver with nothing but its addressing: no range, auxiliary
    /// addresses, MTU, options, labels or creation time.
    pub fn new(id: &str, name: &str, vni: u32, subnet: Ipv4Net, gateway: Ipv4Addr) -> Self {
        Self {
            id: id.to_owned(),
            name: name.to_owned(),
            driver: DRIVER_OVERLAY.to_owned(),
            vni,
            subnet,
            gateway,
            ip_range: None,
            aux_addresses: BTreeMap::new(),
            mtu: None,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
            created: String::new(),
            internal: false,
            encrypted: false,
        }
    }

    /// Whether its containers have a way out through their hosts: not internal, and with a
    /// gateway for their default route.
    pub fn has_egress(&self) -> bool {
        !self.internal && !self.gateway.is_unspecified()
    }

    /// The MAC the ARP responder gives for the gateway address.
    pub fn gateway_mac(&self) -> MacAddr {
        MacAddr::from_ip(self.gateway)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// 64 hex digits, as Docker's endpoint IDs.
    pub id: String,
    pub network_id: String,
    /// Name of the container this endpoint belongs to; unique per network across all hosts.
    pub container: String,
    pub ipv4: Ipv4Addr,
    pub mac: MacAddr,
    /// The host the container lives on.
    pub host: String,
    /// More names the container answers to on this network (`--alias`); several endpoints may
    /// share one, which then resolves to all their addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The services of this network the endpoint is a backend of (`service attach`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// The name its interface must have in the container (a CNI runtime's `CNI_IFNAME`); when
    /// absent the agent takes the lowest free `ethN`. Set only for endpoints made through the
    /// CNI plugin, which is how CNI's GC tells them apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
}

impl Endpoint {
    /// Container `container`'s endpoint on `network_id` with address `ip`; its MAC is derived
    /// from the address, as for every endpoint the store allocates.
    pub fn new(id: &str, network_id: &str, container: &str, host: &str, ip: Ipv4Addr) -> Self {
        Self {
            id: id.to_owned(),
            network_id: network_id.to_owned(),
            container: container.to_owned(),
            ipv4: ip,
            mac: MacAddr::from_ip(ip),
            host: host.to_owned(),
            aliases: Vec::new(),
            services: Vec::new(),
            ifname: None,
        }
    }
}

/// A service published on a network (`overlay service publish NAME.NETWORK`): a name that
/// resolves, on that network, to the addresses of the endpoints attached to it as backends
/// (`Endpoint::services`). Only the CLI and the store read these; the agents see the backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub network_id: String,
    #[serde(default)]
    pub created: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    pub host: String,
    /// A namespace made by another runtime (e.g. /proc/<pid>/ns/net). When absent, the agent
    /// creates the sandbox itself and removes it with the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The runtime moves each endpoint's interface into `netns` itself (Docker, through the
    /// remote driver's Join): the agent makes the veth pair in its host's namespace, hands the
    /// container side over under a temporary name, and never opens `netns`, which may be out
    /// of its sight (in the runtime's mount namespace).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handover: bool,
    /// Ports published on its host's addresses (`-p`), forwarded to its address on its first
    /// network with a way out (docs/egress.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    #[serde(default)]
    pub created: String,
    /// The create revision of the container's key in the store (0: not from a store). A
    /// container removed and created again under the same name has a new one, so the agent's
    /// reports about the old one are never taken for the new. The key holds it, not the value.
    #[serde(skip)]
    pub revision: i64,
}

/// A published port: `[HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]`, as Docker's `-p`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    pub proto: Proto,
    /// Only this address of the host; every address of it when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(f, "{}:{}/{}", self.host_port, self.container_port, self.proto.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    /// Underlay address VXLAN is sent to and from.
    pub vtep: Ipv4Addr,
    /// MTU of the host's uplink, for inspection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_mtu: Option<u32>,
    /// The store lease the key was read under (0: none): for `hosts/`, the host's records lease
    /// (its containers and endpoints live under it); for `alive/`, its liveness lease.
    #[serde(default)]
    pub lease: i64,
    /// The agent that serves the host: a second agent for the same host is refused while this
    /// one is alive, and told who holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentIdentity>,
}

impl Host {
    pub fn new(name: impl Into<String>, vtep: Ipv4Addr) -> Self {
        Self { name: name.into(), vtep, uplink_mtu: None, lease: 0, agent: None }
    }
}

/// Who an agent is: what makes two agents for one host tell each other apart, and what an
/// operator needs to find the one that holds a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentIdentity {
    /// Random, kept in the agent's state directory: a restarted agent is the same agent.
    pub id: String,
    /// The machine's hostname.
    pub machine: String,
    pub pid: u32,
    /// The identity (`<dev>:<inode>`) of the network namespace the agent runs in: the host's
    /// own namespace, which `container create --netns` must never be given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// Everything the store holds, keyed the way the store keys it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// By network id.
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
    /// By endpoint id.
    #[serde(default)]
    pub endpoints: BTreeMap<String, Endpoint>,
    /// By container name.
    #[serde(default)]
    pub containers: BTreeMap<String, Container>,
    /// By host name.
    #[serde(default)]
    pub hosts: BTreeMap<String, Host>,
}

/// One object of the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Network(Network),
    Endpoint(Endpoint),
    Container(Container),
    Host(Host),
}

/// Which object, by kind and key (id for networks and endpoints, name for the others).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectRef {
    Network(String),
    Endpoint(String),
    Container(String),
    Host(String),
}

/// A change to the state, as a source delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// The whole state, replacing what came before (first load, or the source lost track).
    Snapshot(State),
    Put(Object),
    Delete(ObjectRef),
}

impl State {
    pub fn put(&mut self, object: Object) {
        match object {
            Object::Network(n) => drop(self.networks.insert(n.id.clone(), n)),
            Object::Endpoint(e) => drop(self.endpoints.insert(e.id.clone(), e)),
            Object::Container(c) => drop(self.containers.insert(c.name.clone(), c)),
            Object::Host(h) => drop(self.hosts.insert(h.name.clone(), h)),
        }
    }

    pub fn delete(&mut self, what: &ObjectRef) {
        match what {
            ObjectRef::Network(id) => drop(self.networks.remove(id)),
            ObjectRef::Endpoint(id) => drop(self.endpoints.remove(id)),
            ObjectRef::Container(name) => drop(self.containers.remove(name)),
            ObjectRef::Host(name) => drop(self.hosts.remove(name)),
        }
    }

    pub fn network_by_name(&self, name: &str) -> Option<&Network> {
        self.networks.values().find(|n| n.name == name)
    }
}

/// A MAC address, written as `02:42:0a:00:09:02`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The MAC Docker derives from an IPv4 address: the locally administered prefix 02:42
    /// followed by the address, so it is unique wherever the address is.
    pub fn from_ip(ip: Ipv4Addr) -> Self {
        let o = ip.octets();
        Self([0x02, 0x42, o[0], o[1], o[2], o[3]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| format!("invalid MAC address {s:?}"))?;
            if part.len() != 2 {
                return Err(format!("invalid MAC address {s:?}"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| format!("invalid MAC address {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("invalid MAC address {s:?}"));
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_from_ip_is_dockers() {
        let mac = MacAddr::from_ip(Ipv4Addr::new(10, 0, 9, 2));
        assert_eq!(mac.to_string(), "02:42:0a:00:09:02");
        assert_eq!("02:42:0a:00:09:02".parse::<MacAddr>().unwrap(), mac);
    }

    #[test]
    fn bad_macs_are_refused() {
        for bad in ["", "02:42:0a:00:09", "02:42:0a:00:09:02:01", "zz:42:0a:00:09:02", "2:42:a:0:9:2"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
