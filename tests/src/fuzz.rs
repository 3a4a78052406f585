//! The fuzz suite's host and its seeded frame generator.
//!
//! Frame `i` of a run is a pure function of (seed, direction, i): each frame draws from its own
//! PRNG seeded from those three, so any one frame can be made again from the seed and index a
//! failure prints, without generating the ones before it. The first indices of each direction
//! sweep truncations at every length of a few valid frames; the rest are valid frames with
//! their header fields mutated, cut, extended, or replaced by random bytes.

use std::fmt::Write as _;

use fastrand::Rng;

use crate::frames::{
    self, BROADCAST, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Ip, Ipv4, Mac, Tunnel, reseal_ipv4,
};

pub const VTEP: Ip = [198, 18, 0, 1];
pub const UPLINK_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0xff, 0x01];
/// The known peers, with the MACs they send from.
pub const PEERS: [(Ip, Mac); 2] =
    [([198, 18, 0, 2], [0x02, 0, 0, 0, 0xff, 0x02]), ([198, 18, 0, 3], [0x02, 0, 0, 0, 0xff, 0x03])];
/// An underlay address that is not a peer.
pub const STRANGER: Ip = [198, 18, 0, 99];

pub const BLUE: u32 = 0x0a_0b_0c;
pub const RED: u32 = 0x01_02_03;
/// Networks: (VNI, gateway address, gateway MAC); red has no gateway.
pub const NETWORKS: [(u32, Ip, Mac); 2] =
    [(BLUE, [10, 1, 0, 254], [0x02, 0, 0, 0, 0x01, 0xfe]), (RED, [0; 4], [0; 6])];

/// Where an endpoint lives: behind a host-side veth of this host, or behind a peer's VTEP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Home {
    Local(&'static str),
    Remote(Ip),
}

#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub vni: u32,
    pub ip: Ip,
    pub mac: Mac,
    pub home: Home,
}

const fn ep(vni: u32, ip: Ip, mac_last: u8, home: Home) -> Endpoint {
    Endpoint { vni, ip, mac: [0x02, 0, 0, 0, (vni & 0xff) as u8, mac_last], home }
}

/// A and B (blue) and X (red) on this host; R (blue) and Q (red) behind the first peer, S
/// (blue) behind the second. Q's address looks like a blue one: only the VNI says otherwise.
pub const ENDPOINTS: [Endpoint; 6] = [
    ep(BLUE, [10, 1, 0, 1], 1, Home::Local("veth-a")),
    ep(BLUE, [10, 1, 0, 2], 2, Home::Local("veth-b")),
    ep(RED, [10, 2, 0, 1], 1, Home::Local("veth-x")),
    ep(BLUE, [10, 1, 0, 3], 3, Home::Remote(PEERS[0].0)),
    ep(RED, [10, 1, 0, 9], 9, Home::Remote(PEERS[0].0)),
    ep(BLUE, [10, 1, 0, 4], 4, Home::Remote(PEERS[1].0)),
];
/// The host-side veths, and one no endpoint is registered on.
pub const IFACES: [&str; 5] = ["veth-a", "veth-b", "veth-x", "uplink", "stray"];

/// The endpoint with `ip` on network `vni`.
pub fn endpoint(vni: u32, ip: Ip) -> Option<&'static Endpoint> {
    ENDPOINTS.iter().find(|e| e.vni == vni && e.ip == ip)
}

pub fn local(dev: &str) -> Option<&'static Endpoint> {
    ENDPOINTS.iter().find(|e| matches!(e.home, Home::Local(d) if d == dev))
}

/// A generated frame: the bytes, the veth it is sent on (from-container frames), a GSO segment
/// size it claims (0: none), and what was done to it, for the failure message.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub dev: &'static str,
    pub gso_size: u32,
    pub what: String,
}

/// Which program a frame is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    FromContainer,
    Uplink,
}

/// The generator of one run.
pub struct Gen {
    seed: u64,
    sweeps: [Sweep; 2],
}

impl Gen {
    pub fn new(seed: u64) -> Self {
        let sweep = |dir| {
            let mut rng = Rng::with_seed(seed ^ 0x2545_f491_4f6c_dd1d);
            let bases = match dir {
                Direction::FromContainer => (0..6).map(|k| container_base(&mut rng, k)).collect(),
                Direction::Uplink => (0..6).map(|k| uplink_base(&mut rng, k)).collect(),
            };
            Sweep { bases }
        };
        Self { seed, sweeps: [sweep(Direction::FromContainer), sweep(Direction::Uplink)] }
    }

    /// Frame `i` for `dir`.
    pub fn frame(&self, dir: Direction, i: u64) -> Frame {
        let salt = match dir {
            Direction::FromContainer => 0x5bd1_e995,
            Direction::Uplink => 0x9e37_79b9,
        };
        if let Some(f) = self.sweeps[dir as usize].cut(i) {
            return f;
        }
        let mut rng = Rng::with_seed(self.seed ^ salt ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        match dir {
            Direction::FromContainer => from_container(&mut rng),
            Direction::Uplink => uplink(&mut rng),
        }
    }
}

/// Truncations at every length of each base frame: raw cuts, and (for VXLAN) cuts with the
/// outer lengths made to agree.
struct Sweep {
    bases: Vec<Frame>,
}

impl Sweep {
    fn cut(&self, mut i: u64) -> Option<Frame> {
        for base in &self.bases {
            let n = base.bytes.len() as u64 + 1;
            let vxlan = base.dev == "uplink";
            let kinds = if vxlan { 2 } else { 1 };
            if i < n * kinds {
                let len = (i % n) as usize;
                let mut f = base.clone();
                // The outer IPv4 header (options included) must be whole for its lengths to be
                // made to agree.
                let ihl = usize::from(base.bytes[14] & 0x0f) * 4;
                if i >= n && len >= 14 + ihl.max(20) {
                    frames::truncate_consistently(&mut f.bytes, len);
                    f.what = format!("{}, cut to {len} bytes with its lengths made to agree", base.what);
                } else {
                    f.bytes.truncate(len);
                    f.what = format!("{}, cut to {len} bytes", base.what);
                }
                return Some(f);
            }
            i -= n * kinds;
        }
        None
    }
}

/// A payload length: mostly small, sometimes up to a full frame or a little past it.
fn size(rng: &mut Rng) -> usize {
    match rng.u8(0..8) {
        0..=3 => rng.usize(0..64),
        4..=6 => rng.usize(0..1500),
        _ => rng.usize(1380..1480),
    }
}

/// An IPv4 packet from `src` to `dst`: UDP, TCP (with or without options), ICMP, another
/// protocol, with or without IPv4 options, a fragment now and then, any DSCP/ECN.
fn ipv4_packet(rng: &mut Rng, src: Ip, dst: Ip, what: &mut String) -> Vec<u8> {
    let len = size(rng);
    let pay = frames::payload(len);
    let (proto, l4) = match rng.u8(0..8) {
        0..=2 => (IPPROTO_UDP, frames::udp(src, dst, rng.u16(..), rng.u16(..), &pay)),
        3..=5 => {
            let mut t = frames::tcp(src, dst, rng.u16(..), rng.u16(..), &pay);
            if rng.u8(0..4) == 0 && pay.len() >= 40 {
                // Options: a data offset past 5 words over bytes of the payload.
                t[12] = rng.u8(6..=10) << 4;
                what.push_str("TCP with options, ");
            }
            (IPPROTO_TCP, t)
        }
        6 => (IPPROTO_ICMP, frames::icmp_echo(rng.u16(..), rng.u16(..), &pay)),
        _ => (rng.u8(..), pay),
    };
    let mut ip = Ipv4::new(src, dst, proto).tos(rng.u8(..));
    let mut hdr_opts = 0;
    match rng.u8(0..10) {
        0 => {
            ip.frag_off = 0x2000;
            what.push_str("first fragment, ");
        }
        1 => {
            ip.frag_off = rng.u16(1..0x2000) | if rng.bool() { 0x2000 } else { 0 };
            what.push_str("later fragment, ");
        }
        2 => hdr_opts = rng.usize(1..=10) * 4,
        _ => {}
    }
    let mut p = ip.packet(&l4);
    if hdr_opts > 0 {
        // NOP options after the fixed header; lengths and checksum made right.
        p.splice(20..20, std::iter::repeat_n(1u8, hdr_opts));
        p[0] = 0x45 + (hdr_opts / 4) as u8;
        let tot = p.len() as u16;
        p[2..4].copy_from_slice(&tot.to_be_bytes());
        what.push_str("IPv4 options, ");
        let mut f = [vec![0; 14], p].concat();
        reseal_ipv4(&mut f, 14);
        p = f.split_off(14);
    }
    p
}

/// An inner Ethernet frame from `src` to `dst` of one of the kinds a container or a peer can
/// send: IPv4 mostly, ARP, IPv6, 802.1Q (VLAN 0 with priority 7 among them) or 802.1ad
/// tagged, padded to the Ethernet minimum.
fn ether(rng: &mut Rng, src: (Mac, Ip), dst: (Mac, Ip), what: &mut String) -> Vec<u8> {
    let ip = ipv4_packet(rng, src.1, dst.1, what);
    let mut f = match rng.u8(0..16) {
        0 => {
            what.push_str("ARP request, ");
            frames::ethernet(BROADCAST, src.0, 0x0806, &frames::arp(1, src.0, src.1, [0; 6], dst.1))
        }
        1 => {
            what.push_str("IPv6, ");
            frames::ethernet(
                dst.0,
                src.0,
                ETH_P_IPV6,
                &frames::ipv6_udp(rng.u16(..), 4789, &frames::payload(size(rng))),
            )
        }
        2 | 3 => {
            let (tpid, tci) = match rng.u8(0..3) {
                0 => (0x8100, 7 << 13),
                1 => (0x8100, rng.u16(..)),
                _ => (0x88a8, rng.u16(..)),
            };
            let _ = write!(what, "tagged {tpid:#06x} tci {tci:#06x}, ");
            let body = [&tci.to_be_bytes()[..], &0x0800u16.to_be_bytes(), &ip].concat();
            frames::ethernet(dst.0, src.0, tpid, &body)
        }
        _ => frames::ethernet(dst.0, src.0, 0x0800, &ip),
    };
    if f.len() < 60 && rng.bool() {
        f.resize(60, 0);
        what.push_str("padded to 60, ");
    }
    f
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.usize(0..items.len())]
}

/// A valid frame a container on this host may send (`k` picks the kind for the sweep).
fn container_base(rng: &mut Rng, k: u8) -> Frame {
    let me = pick(rng, &ENDPOINTS[..3]);
    let Home::Local(dev) = me.home else { unreachable!("local endpoints") };
    let same_net: Vec<Endpoint> =
        ENDPOINTS.iter().filter(|e| e.vni == me.vni && e.ip != me.ip).copied().collect();
    let mut what = String::new();
    let bytes = match k % 4 {
        // A DHCP client's discover: from 0.0.0.0 to everyone, UDP 68 to 67.
        3 if rng.u8(0..4) == 0 => {
            what.push_str("DHCP discover, ");
            let dgram = frames::udp([0; 4], [255; 4], 68, 67, &[0; 240]);
            frames::ethernet(
                BROADCAST,
                me.mac,
                0x0800,
                &Ipv4::new([0; 4], [255; 4], IPPROTO_UDP).packet(&dgram),
            )
        }
        0 => {
            let to = pick(rng, &same_net);
            let _ = write!(what, "IPv4 to {:?}, ", to.home);
            frames::ethernet(to.mac, me.mac, 0x0800, &ipv4_packet(rng, me.ip, to.ip, &mut what))
        }
        1 | 3 => {
            let target = match rng.u8(0..3) {
                0 => pick(rng, &same_net).ip,
                1 => NETWORKS.iter().find(|n| n.0 == me.vni).map_or([0; 4], |n| n.1),
                _ => [10, 1, 0, rng.u8(..)],
            };
            what.push_str("ARP request, ");
            frames::ethernet(BROADCAST, me.mac, 0x0806, &frames::arp(1, me.mac, me.ip, [0; 6], target))
        }
        _ => {
            let to = pick(rng, &same_net);
            ether(rng, (me.mac, me.ip), (to.mac, to.ip), &mut what)
        }
    };
    Frame { bytes, dev, gso_size: 0, what: format!("from {dev}: {what}") }
}

/// A valid VXLAN frame from a peer to one of this host's endpoints (`k` for the sweep).
fn uplink_base(rng: &mut Rng, k: u8) -> Frame {
    let remote: Vec<Endpoint> =
        ENDPOINTS.iter().filter(|e| matches!(e.home, Home::Remote(_))).copied().collect();
    let from = pick(rng, &remote);
    let Home::Remote(vtep) = from.home else { unreachable!("remote endpoints") };
    let peer = PEERS.iter().find(|p| p.0 == vtep).expect("a peer");
    let locals: Vec<Endpoint> =
        ENDPOINTS.iter().filter(|e| e.vni == from.vni && matches!(e.home, Home::Local(_))).copied().collect();
    let to = pick(rng, &locals);
    let mut what = String::new();
    let inner = if k.is_multiple_of(2) {
        frames::ethernet(to.mac, from.mac, 0x0800, &ipv4_packet(rng, from.ip, to.ip, &mut what))
    } else {
        ether(rng, (from.mac, from.ip), (to.mac, to.ip), &mut what)
    };
    let t = Tunnel {
        src_mac: peer.1,
        dst_mac: UPLINK_MAC,
        src_vtep: vtep,
        dst_vtep: VTEP,
        src_port: rng.u16(..),
        vni: from.vni,
    };
    let mut bytes = frames::vxlan(&t, &inner);
    // Any outer DSCP/ECN (congestion marked on the way among them).
    bytes[15] = rng.u8(..);
    // Now and then outer IPv4 options (NOPs), lengths made to agree.
    if rng.u8(0..32) == 0 {
        let opts = rng.usize(1..=10) * 4;
        bytes.splice(34..34, std::iter::repeat_n(1u8, opts));
        bytes[14] = 0x45 + (opts / 4) as u8;
        let tot = (bytes.len() - 14) as u16;
        bytes[16..18].copy_from_slice(&tot.to_be_bytes());
        what.push_str("outer IPv4 options, ");
    }
    reseal_ipv4(&mut bytes, 14);
    Frame {
        bytes,
        dev: "uplink",
        gso_size: 0,
        what: format!("VXLAN from {vtep:?} vni {:#x}: {what}", from.vni),
    }
}

/// Header regions of a frame whose network header starts at `l3` (the inner one for VXLAN):
/// (name, start, end) for the field mutations.
fn regions(f: &[u8], vxlan: bool) -> Vec<(&'static str, usize, usize)> {
    let mut r = Vec::new();
    let inner = if vxlan {
        r.extend([
            ("outer Ethernet", 0, 14),
            ("outer IPv4", 14, 34),
            ("outer UDP", 34, 42),
            ("VXLAN", 42, 50),
        ]);
        50
    } else {
        0
    };
    r.push(("Ethernet", inner, inner + 14));
    let l3 = inner + 14;
    let ihl = f.get(l3).map_or(20, |b| usize::from(b & 0x0f) * 4).max(20);
    r.push(("IPv4/ARP", l3, l3 + ihl.max(28)));
    r.push(("L4", l3 + ihl, l3 + ihl + 20));
    r.retain(|&(_, s, _)| s < f.len());
    for x in &mut r {
        x.2 = x.2.min(f.len());
    }
    r
}

/// Changes one field of `f` (a byte or a 16-bit word) to a value a bug would trip over.
fn mutate_field(rng: &mut Rng, f: &mut [u8], vxlan: bool, what: &mut String) {
    let regions = regions(f, vxlan);
    if regions.is_empty() {
        return;
    }
    let (name, start, end) = pick(rng, &regions);
    let at = rng.usize(start..end);
    let old = f[at];
    let new = match rng.u8(0..8) {
        0 => 0,
        1 => 0xff,
        2 => old.wrapping_add(1),
        3 => old.wrapping_sub(1),
        4 => old ^ (1 << rng.u8(0..8)),
        _ => rng.u8(..),
    };
    f[at] = new;
    // Sometimes the whole 16-bit word (lengths, ports, ethertypes).
    if rng.bool() && at + 1 < end {
        f[at + 1] = rng.u8(..);
    }
    let _ = write!(what, "{name} byte {} {old:#04x}->{new:#04x}, ", at - start);
}

/// Makes the IPv4 checksums right again after mutations, where the header is whole: mostly
/// done, so that mutations reach past the checksum check.
fn reseal(rng: &mut Rng, f: &mut [u8], l3: usize) {
    if f.len() >= l3 + 20 && f[l3] >> 4 == 4 && rng.u8(0..4) != 0 {
        let ihl = usize::from(f[l3] & 0x0f) * 4;
        if ihl >= 20 && f.len() >= l3 + ihl {
            reseal_ipv4(f, l3);
        }
    }
}

/// Mutations of a valid frame: none (a valid frame must come through), header fields, a cut,
/// bytes added, or everything after a prefix replaced by random bytes.
fn mutate(rng: &mut Rng, mut f: Frame, vxlan: bool) -> Frame {
    let mut what = String::new();
    match rng.u8(0..16) {
        0..=2 => {}
        3..=11 => {
            for _ in 0..rng.u8(1..=3) {
                mutate_field(rng, &mut f.bytes, vxlan, &mut what);
            }
            if vxlan {
                reseal(rng, &mut f.bytes, 64);
            }
            reseal(rng, &mut f.bytes, 14);
        }
        12 => {
            let len = rng.usize(0..=f.bytes.len());
            f.bytes.truncate(len);
            let _ = write!(what, "cut to {len}, ");
        }
        13 => {
            let n = rng.usize(1..=24);
            f.bytes.extend((0..n).map(|_| rng.u8(..)));
            let _ = write!(what, "{n} bytes added, ");
        }
        _ => {
            let keep = rng.usize(0..=f.bytes.len());
            for b in &mut f.bytes[keep..] {
                *b = rng.u8(..);
            }
            let _ = write!(what, "random after byte {keep}, ");
        }
    }
    f.what = format!("{}mutated: {what}", f.what);
    f
}

/// Random bytes, mostly short.
fn random_bytes(rng: &mut Rng, dev: &'static str) -> Frame {
    let len = if rng.bool() { rng.usize(0..80) } else { rng.usize(0..1600) };
    let bytes = (0..len).map(|_| rng.u8(..)).collect();
    Frame { bytes, dev, gso_size: 0, what: format!("{len} random bytes") }
}

fn from_container(rng: &mut Rng) -> Frame {
    let mut f = if rng.u8(0..16) == 0 {
        let dev = pick(rng, &["veth-a", "veth-b", "veth-x"]);
        random_bytes(rng, dev)
    } else {
        let k = rng.u8(..);
        let base = container_base(rng, k);
        mutate(rng, base, false)
    };
    // Now and then a frame sent on a veth no endpoint is registered on, or from another
    // endpoint's veth than its own.
    match rng.u8(0..32) {
        0 => f.dev = "stray",
        1 => f.dev = pick(rng, &["veth-a", "veth-b", "veth-x"]),
        _ => {}
    }
    // A GSO packet with a segment size of its sender's choosing (PACKET_VNET_HDR).
    if rng.u8(0..16) == 0 {
        f.gso_size = rng.u32(1..2000);
        let _ = write!(f.what, "gso_size {}", f.gso_size);
    }
    f
}

fn uplink(rng: &mut Rng) -> Frame {
    match rng.u8(0..32) {
        0 | 1 => random_bytes(rng, "uplink"),
        2 => {
            // UDP to the VXLAN port of this host with random contents, from a peer or not.
            let src = if rng.bool() { PEERS[0].0 } else { STRANGER };
            let body: Vec<u8> = (0..size(rng)).map(|_| rng.u8(..)).collect();
            let dgram = frames::udp(src, VTEP, rng.u16(..), 4789, &body);
            let bytes = frames::ethernet(
                UPLINK_MAC,
                PEERS[0].1,
                0x0800,
                &Ipv4::new(src, VTEP, IPPROTO_UDP).packet(&dgram),
            );
            Frame { bytes, dev: "uplink", gso_size: 0, what: "UDP to 4789 with random contents".into() }
        }
        3 => {
            // The host's own traffic: not VXLAN.
            let mut what = String::from("host traffic: ");
            let bytes = ether(rng, (PEERS[0].1, PEERS[0].0), (UPLINK_MAC, VTEP), &mut what);
            Frame { bytes, dev: "uplink", gso_size: 0, what }
        }
        _ => {
            let k = rng.u8(..);
            let base = uplink_base(rng, k);
            mutate(rng, base, true)
        }
    }
}
