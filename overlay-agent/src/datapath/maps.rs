//! Typed handles on the pinned maps, and the check that a pinned map has the layout this build
//! expects before the agent writes a byte into it.

use std::mem::size_of;

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use overlay_common::{
    dns::{MAP_NAMES, NameAddrs, NameKey},
    maps::{
        Config, Counter, Endpoint, EndpointKey, Iface, MAP_CONFIG, MAP_ENDPOINTS, MAP_IFACES, MAP_NETWORKS,
        MAP_PEERS, MAP_STATS, MAP_SUBNETS, Network, PINNED_MAPS, Peer, PeerKey,
    },
    monitor::{MAP_MONITOR, MAP_MONITOR_CTL, MonitorCtl},
    stats::STATS_LEN,
};

use super::{Error, pins::PinDir};

pub struct Maps {
    pub endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    pub ifaces: HashMap<MapData, u32, Iface>,
    pub peers: HashMap<MapData, PeerKey, Peer>,
    pub networks: HashMap<MapData, u32, Network>,
    pub config: Array<MapData, Config>,
    pub stats: PerCpuArray<MapData, Counter>,
    pub names: HashMap<MapData, NameKey, NameAddrs>,
    /// Every overlay network's subnet -> its VNI (longest prefix match).
    pub subnets: LpmTrie<MapData, [u8; 4], u32>,
}

/// Key and value sizes of each pinned map, as this build lays them out.
fn expected_layout(name: &str) -> (usize, usize) {
    match name {
        MAP_ENDPOINTS => (size_of::<EndpointKey>(), size_of::<Endpoint>()),
        MAP_IFACES => (size_of::<u32>(), size_of::<Iface>()),
        MAP_PEERS => (size_of::<PeerKey>(), size_of::<Peer>()),
        MAP_NETWORKS => (size_of::<u32>(), size_of::<Network>()),
        MAP_CONFIG => (size_of::<u32>(), size_of::<Config>()),
        MAP_STATS => (size_of::<u32>(), size_of::<Counter>()),
        MAP_NAMES => (size_of::<NameKey>(), size_of::<NameAddrs>()),
        MAP_SUBNETS => (size_of::<LpmKey<[u8; 4]>>(), size_of::<u32>()),
        // A ring buffer has neither keys nor values.
        MAP_MONITOR => (0, 0),
        MAP_MONITOR_CTL => (size_of::<u32>(), size_of::<MonitorCtl>()),
        _ => unreachable!("not one of PINNED_MAPS: {name}"),
    }
}

/// Refuses to reuse a pinned map whose layout differs from this build's: writing today's
/// structs into yesterday's map would corrupt what the running programs read.
pub fn check_pinned(pins: &PinDir) -> Result<(), Error> {
    for name in PINNED_MAPS {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| Error::Map(name, e))?;
        let (key, value) = expected_layout(name);
        // STATS is indexed by counter code: one of another length (an earlier build's, with
        // fewer drop reasons) would leave codes beyond its end uncounted and unreadable. Its
        // pin is dropped so the loader makes one of this build's length: the running programs
        // keep the old map until the new ones take over their links, so nothing stops
        // forwarding; only the counters start again from zero.
        if name == MAP_STATS && info.max_entries() != STATS_LEN {
            tracing::warn!(
                path = %path.display(),
                found = info.max_entries(),
                expected = STATS_LEN,
                "the pinned counters are an earlier build's: replacing them (the counters restart from zero)"
            );
            std::fs::remove_file(&path).map_err(|e| Error::Pin(path.display().to_string(), e))?;
            continue;
        }
        if info.key_size() as usize != key || info.value_size() as usize != value {
            return Err(Error::Layout {
                map: name,
                path: path.display().to_string(),
                found: (info.key_size(), info.value_size()),
                expected: (key as u32, value as u32),
            });
        }
    }
    Ok(())
}

impl Maps {
    /// Takes the maps out of a loaded object (they are already pinned by the loader).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, Error> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(Error::Map(name, MapError::InvalidName { name: name.into() }))
        };
        Ok(Self {
            endpoints: HashMap::try_from(take(MAP_ENDPOINTS)?).map_err(|e| Error::Map(MAP_ENDPOINTS, e))?,
            ifaces: HashMap::try_from(take(MAP_IFACES)?).map_err(|e| Error::Map(MAP_IFACES, e))?,
            peers: HashMap::try_from(take(MAP_PEERS)?).map_err(|e| Error::Map(MAP_PEERS, e))?,
            networks: HashMap::try_from(take(MAP_NETWORKS)?).map_err(|e| Error::Map(MAP_NETWORKS, e))?,
            config: Array::try_from(take(MAP_CONFIG)?).map_err(|e| Error::Map(MAP_CONFIG, e))?,
            stats: PerCpuArray::try_from(take(MAP_STATS)?).map_err(|e| Error::Map(MAP_STATS, e))?,
            names: HashMap::try_from(take(MAP_NAMES)?).map_err(|e| Error::Map(MAP_NAMES, e))?,
            subnets: LpmTrie::try_from(take(MAP_SUBNETS)?).map_err(|e| Error::Map(MAP_SUBNETS, e))?,
        })
    }
}

/// Counters summed over CPUs, indexed by counter code.
pub type Totals = Vec<Counter>;

/// Reads the per-CPU counters and sums them.
pub fn read_stats(stats: &PerCpuArray<MapData, Counter>) -> Result<Totals, MapError> {
    let mut out = vec![Counter::default(); STATS_LEN as usize];
    for (code, slot) in out.iter_mut().enumerate() {
        let per_cpu: PerCpuValues<Counter> = stats.get(&(code as u32), 0)?;
        for c in per_cpu.iter() {
            slot.packets += c.packets;
            slot.bytes += c.bytes;
        }
    }
    Ok(out)
}

/// Opens the counters of a host from its pins, for `overlay-agent stats` (no agent needed).
pub fn open_stats(pins: &PinDir) -> Result<PerCpuArray<MapData, Counter>, Error> {
    let data = MapData::from_pin(pins.map(MAP_STATS)).map_err(|e| Error::Map(MAP_STATS, e))?;
    PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(|e| Error::Map(MAP_STATS, e))
}

/// The pinned `IFACES` entries of a host (host-side veth ifindex -> its endpoint), for
/// `overlay-agent monitor`'s container filter.
pub fn read_ifaces(pins: &PinDir) -> Result<std::collections::BTreeMap<u32, Iface>, Error> {
    let data = MapData::from_pin(pins.map(MAP_IFACES)).map_err(|e| Error::Map(MAP_IFACES, e))?;
    let map: HashMap<MapData, u32, Iface> =
        HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|e| Error::Map(MAP_IFACES, e))?;
    map.iter().collect::<Result<_, _>>().map_err(|e| Error::Map(MAP_IFACES, e))
}
