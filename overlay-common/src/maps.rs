//! Keys and values of the BPF maps, and the names they are pinned under.
//!
//! The agent writes every map; the programs only read them (except the per-CPU counters).
//! Addresses are stored as byte arrays in network order so that `bpftool map dump` prints
//! them as `[10,0,9,2]` rather than as a byte-swapped integer. No bool, enum or Option appears
//! in a value: the kernel sees bytes, and both sides must agree on every one of them.

use core::mem::{align_of, offset_of, size_of};

/// Pinned map names (the symbol names in the eBPF object, and the file names under the
/// agent's pin directory).
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
pub const MAP_IFACES: &str = "IFACES";
pub const MAP_PEERS: &str = "PEERS";
pub const MAP_NETWORKS: &str = "NETWORKS";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_STATS: &str = "STATS";
pub const MAP_SUBNETS: &str = "SUBNETS";

/// Every pinned map, in the order the agent checks and reports them.
pub const PINNED_MAPS: [&str; 10] = [
    MAP_ENDPOINTS,
    MAP_IFACES,
    MAP_PEERS,
    MAP_NETWORKS,
    MAP_CONFIG,
    MAP_STATS,
    crate::dns::MAP_NAMES,
    MAP_SUBNETS,
    crate::monitor::MAP_MONITOR,
    crate::monitor::MAP_MONITOR_CTL,
];

/// Capacity of the endpoint map: every endpoint of every network this host takes part in,
/// local and remote. The map is not preallocated, so an idle host pays for what it holds.
pub const MAX_ENDPOINTS: u32 = 1 << 18;
pub const MAX_IFACES: u32 = 4096;
pub const MAX_PEERS: u32 = 4096;
pub const MAX_NETWORKS: u32 = 4096;
/// Capacity of `SUBNETS`: the subnet of every network of the overlay (not only this host's).
pub const MAX_SUBNETS: u32 = 4096;

/// Key of `ENDPOINTS`: an address is only meaningful inside its network, so the VNI is part
/// of the key. This is what isolates networks from each other: a lookup from one network can
/// never find an endpoint of another.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub vni: u32,
    pub ip: [u8; 4],
}

/// `Endpoint::flags`: the endpoint lives on this host, behind `ifindex`.
pub const ENDPOINT_LOCAL: u16 = 1;

/// Value of `ENDPOINTS`: where an endpoint is and what its MAC is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub mac: [u8; 6],
    pub flags: u16,
    /// Host-side veth of a local endpoint; 0 for a remote one.
    pub ifindex: u32,
    /// VTEP (underlay IPv4) of the host a remote endpoint lives on; 0.0.0.0 for a local one.
    pub vtep: [u8; 4],
}

/// Value of `IFACES`, keyed by the ifindex of an endpoint's host-side veth: who is allowed to
/// send from that veth. The from-container program drops anything else (anti-spoofing).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iface {
    pub vni: u32,
    pub ip: [u8; 4],
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Key of `PEERS`: the VTEP address of another host. VXLAN from any other source is dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    pub vtep: [u8; 4],
}

/// Value of `PEERS`. The map is a set today; the value has room for per-peer state later.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Peer {
    pub reserved: u32,
}

/// Value of `NETWORKS`, keyed by VNI: the networks this host takes part in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    /// The gateway address, answered by the ARP responder so containers can hold a default
    /// route; 0.0.0.0 when the network has none.
    pub gateway: [u8; 4],
    pub gateway_mac: [u8; 6],
    /// `NETWORK_*` bits.
    pub flags: u8,
    /// The subnet's prefix length: with `gateway`, which lies in it, it says which destinations
    /// are on the network (the rest leave by the host with `NETWORK_EGRESS`). Was padding: a
    /// pinned map of an older agent reads 0 here, and carries no `NETWORK_EGRESS`.
    pub prefix_len: u8,
}

impl Network {
    /// Whether `ip` lies in the network's subnet (the one the gateway is in).
    #[inline(always)]
    pub fn contains(&self, ip: [u8; 4]) -> bool {
        let bits = u32::from(self.prefix_len);
        if bits == 0 {
            return true;
        }
        let mask = if bits >= 32 { u32::MAX } else { !(u32::MAX >> bits) };
        u32::from_be_bytes(self.gateway) & mask == u32::from_be_bytes(ip) & mask
    }
}

/// `Network::flags`: the agent's resolver serves this network on this host (the gateway address
/// is local in the host's namespace, with the routes its answers take back to the containers):
/// DNS the program cannot answer from `NAMES`, and DNS over TCP, to the gateway's port 53 is
/// handed to the host's stack. Without it such packets are dropped (`no_endpoint`), as anything
/// else sent to the gateway: the host's stack would route them on, not answer them.
pub const NETWORK_RESOLVER: u8 = 1;

/// `Network::flags`: containers of this network on this host have a way out through the host
/// (docs/egress.md): unicast to an address outside the subnet is handed to the host's stack,
/// which routes and masquerades it. Set while the network is not `--internal`, has a gateway
/// and the host's egress path (routes back to the containers, NAT) is in place; without it such
/// packets are dropped (`no_egress`).
pub const NETWORK_EGRESS: u8 = 2;

/// `Network::flags`: the network was created `-o encrypted` (docs/encryption.md). Its frames
/// may cross the underlay only protected: plaintext VXLAN claiming its VNI is dropped on the
/// uplink (`plaintext_encrypted`), and, since no cipher path exists on this kernel yet, the
/// from-container program drops its frames for other hosts (`no_cipher`) rather than send them
/// in the clear. Same-host delivery never touches the underlay and is unaffected.
pub const NETWORK_ENCRYPTED: u8 = 4;

/// `Config::flags`: log every dropped packet through aya-log (off by default: the fast path
/// carries no log call unless an operator asks for it).
pub const CONFIG_DEBUG_DROPS: u32 = 1;

/// The single entry of `CONFIG`: this host's side of the tunnel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// This host's VTEP address (outer source on encap, outer destination on decap).
    pub vtep: [u8; 4],
    /// The uplink encapsulated frames leave through.
    pub uplink_ifindex: u32,
    /// Outer source MAC written on encapsulation (bpf_redirect_neigh rewrites both MACs
    /// from the neighbour table; this keeps the frame well formed until then).
    pub uplink_mac: [u8; 6],
    pub _pad: [u8; 2],
    pub flags: u32,
    /// MTU of the uplink, for inspection (the programs do not need it: container MTUs are set
    /// so that encapsulated frames fit).
    pub uplink_mtu: u32,
}

/// Value of the per-CPU `STATS` array, indexed by the codes in [`crate::stats`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// What the uplink XDP program leaves in the packet's metadata area for the uplink TC program
/// after it decapsulated a frame: the host-side veth of the endpoint it belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpMeta {
    pub magic: u32,
    pub ifindex: u32,
}

/// Marks metadata written by our XDP program (anything else in the metadata area is ignored).
pub const XDP_META_MAGIC: u32 = 0x7678_6c6e; // "vxln"

// Layout checks: both the eBPF object and the agent compile these, so a change on one side that
// the other does not see fails the build instead of corrupting a map.
const _: () = {
    assert!(size_of::<EndpointKey>() == 8 && align_of::<EndpointKey>() == 4);
    assert!(offset_of!(EndpointKey, ip) == 4);
    assert!(size_of::<Endpoint>() == 16 && align_of::<Endpoint>() == 4);
    assert!(offset_of!(Endpoint, flags) == 6);
    assert!(offset_of!(Endpoint, ifindex) == 8);
    assert!(offset_of!(Endpoint, vtep) == 12);
    assert!(size_of::<Iface>() == 16 && align_of::<Iface>() == 4);
    assert!(offset_of!(Iface, mac) == 8);
    assert!(size_of::<PeerKey>() == 4);
    assert!(size_of::<Peer>() == 4);
    assert!(size_of::<Network>() == 12);
    assert!(offset_of!(Network, gateway_mac) == 4);
    assert!(offset_of!(Network, flags) == 10);
    assert!(size_of::<Config>() == 24 && align_of::<Config>() == 4);
    assert!(offset_of!(Config, uplink_mac) == 8);
    assert!(offset_of!(Config, flags) == 16);
    assert!(size_of::<Counter>() == 16 && align_of::<Counter>() == 8);
    assert!(size_of::<XdpMeta>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    use super::{Config, Counter, Endpoint, EndpointKey, Iface, Network, Peer, PeerKey};
    // SAFETY: all of these are repr(C), Copy, and every bit pattern is a valid value.
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for Iface {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for Peer {}
    unsafe impl aya::Pod for Network {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Counter {}
}
