//! The maps, declared with BTF so `bpftool map dump` prints named fields.
//! Layouts live in overlay-common, where the agent sees the same definitions.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use overlay_common::{
    dns::{MAX_NAMES, NameAddrs, NameKey},
    maps::{
        Config, Counter, Endpoint, EndpointKey, Iface, MAX_ENDPOINTS, MAX_IFACES, MAX_NETWORKS, MAX_PEERS,
        MAX_SUBNETS, Network, Peer, PeerKey,
    },
    monitor::{FlowKey, MAX_FLOWS_SEEN, MONITOR_RING_BYTES, MonitorCtl, MonitorEvent},
    stats::STATS_LEN,
};

/// (VNI, IPv4) -> where that endpoint is. Local and remote endpoints of every network this host
/// takes part in.
#[btf_map]
pub static ENDPOINTS: HashMap<
    EndpointKey,
    Endpoint,
    { MAX_ENDPOINTS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Host-side veth ifindex -> the endpoint behind it (network, address, MAC).
#[btf_map]
pub static IFACES: HashMap<u32, Iface, { MAX_IFACES as usize }> = HashMap::new();

/// VTEP addresses of the other hosts.
#[btf_map]
pub static PEERS: HashMap<PeerKey, Peer, { MAX_PEERS as usize }> = HashMap::new();

/// VNI -> network, for the networks that have an endpoint on this host.
#[btf_map]
pub static NETWORKS: HashMap<u32, Network, { MAX_NETWORKS as usize }> = HashMap::new();

/// Subnet of every network of the overlay (longest prefix match on an IPv4 address) -> its VNI.
/// What the from-container program asks before it hands a packet to the host's stack: an
/// address on any overlay network stays on the overlay (another network's is nobody's for the
/// sender), only the rest may leave by the host.
#[btf_map]
pub static SUBNETS: LpmTrie<[u8; 4], u32, { MAX_SUBNETS as usize }> = LpmTrie::new();

/// (VNI, name in DNS wire format) -> the name's IPv4 addresses, for the names of every network
/// this host takes part in (dns.rs answers from it).
#[btf_map]
pub static NAMES: HashMap<NameKey, NameAddrs, { MAX_NAMES as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// One map key per CPU, where dns.rs builds the key of a query's name: it does not fit on the
/// stack beside the rest of the from-container path. Not pinned: it holds nothing between runs.
#[btf_map]
pub static NAME_SCRATCH: PerCpuArray<NameKey, 1> = PerCpuArray::new();

/// This host's tunnel configuration (one entry, index 0).
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Packets and bytes per counter code (see overlay_common::stats), per CPU.
#[btf_map]
pub static STATS: PerCpuArray<Counter, { STATS_LEN as usize }> = PerCpuArray::new();

/// Events for `overlay-agent monitor` (monitor.rs), written only while one listens.
#[btf_map]
pub static MONITOR: RingBuf<MonitorEvent, { MONITOR_RING_BYTES as usize }> = RingBuf::new();

/// Whether a monitor listens, and for what (one entry, index 0; written by the monitor).
#[btf_map]
pub static MONITOR_CTL: Array<MonitorCtl, 1> = Array::new();

/// Flows whose first packet a monitor session has seen -> that session. Touched only while a
/// monitor listens for flows; not pinned (the sessions number on from the control entry).
#[btf_map]
pub static FLOWS_SEEN: LruHashMap<FlowKey, u32, { MAX_FLOWS_SEEN as usize }> = LruHashMap::new();

/// The host configuration, or None before the agent wrote it.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    let cfg = CONFIG.get(0)?;
    // A zero VTEP means the agent has not configured this host yet.
    if cfg.vtep == [0; 4] { None } else { Some(cfg) }
}
