//! Which frames on the uplink are VXLAN for this host, and whether each one may be delivered.
//!
//! Shared by the uplink's XDP program and its TC fallback so both apply exactly the same rules.
//! The order of the checks is the order of the headers: a frame is dropped for the first thing
//! wrong with it, and frames that are not VXLAN for this host are never touched.

use overlay_common::{
    VXLAN_PORT,
    maps::{Config, ENDPOINT_LOCAL, EndpointKey, PeerKey},
    stats::DropReason,
    wire::{
        ETH_P_IP, EthHdr, INNER_ETH_OFF, INNER_IP_OFF, IPPROTO_UDP, Ipv4Hdr, OUTER_IP_OFF, OUTER_UDP_OFF,
        UdpHdr, VXLAN_FLAG_I, VXLAN_OFF, VxlanHdr,
    },
};

use crate::{
    maps::{ENDPOINTS, NETWORKS, PEERS},
    packet::Packet,
};

/// Bytes of headers the checks read: everything up to and including the inner IPv4 header.
pub const HEADERS: usize = INNER_IP_OFF + Ipv4Hdr::LEN;

pub enum Verdict {
    /// Not VXLAN for this host: leave it to the host stack.
    Pass,
    /// A valid frame for the local endpoint behind this host-side veth.
    Deliver(u32),
    Drop(DropReason),
}

/// Classifies a frame whose first bytes are `pkt`. `wire_len` is the frame's full length and
/// `gso` says whether it is an unsegmented GSO packet, whose outer lengths describe only its
/// first segment.
#[inline(always)]
pub fn classify(pkt: Packet, wire_len: usize, gso: bool, cfg: &Config) -> Verdict {
    match check(pkt, wire_len, gso, cfg) {
        Ok(Some(ifindex)) => Verdict::Deliver(ifindex),
        Ok(None) => Verdict::Pass,
        Err(drop) => Verdict::Drop(drop),
    }
}

#[inline(always)]
fn check(pkt: Packet, wire_len: usize, gso: bool, cfg: &Config) -> Result<Option<u32>, DropReason> {
    let truncated = DropReason::Truncated;

    // Is it ours? Anything that is not UDP to our VTEP's port 4789 passes untouched.
    let Some(eth) = pkt.header::<EthHdr>(0) else { return Ok(None) };
    // SAFETY: every header pointer below was bounds-checked by Packet::header.
    if unsafe { (*eth).ether_type() } != ETH_P_IP {
        return Ok(None);
    }
    let Some(ip) = pkt.header::<Ipv4Hdr>(OUTER_IP_OFF) else { return Ok(None) };
    let ip = unsafe { *ip };
    if ip.protocol != IPPROTO_UDP || ip.dst != cfg.vtep {
        return Ok(None);
    }
    // Options would move the UDP header; VTEPs never send them, and such a frame is left to
    // the stack, which has no socket on the VXLAN port and answers it as it would any stray UDP.
    if ip.version_ihl != 0x45 {
        return Ok(None);
    }
    // A later fragment carries no UDP header: nothing here says whether it is VXLAN.
    if ip.frag_off() & overlay_common::wire::IPV4_FRAG_OFFSET_MASK != 0 {
        return Ok(None);
    }
    // UDP to our VTEP with a cut-off UDP header is garbage whatever its port: drop and count.
    let udp = unsafe { *pkt.header::<UdpHdr>(OUTER_UDP_OFF).ok_or(truncated)? };
    if udp.dst_port() != VXLAN_PORT {
        return Ok(None);
    }

    // From here on the frame is VXLAN for this host: deliver it or drop it with a reason.
    if ip.is_fragment() {
        return Err(DropReason::Fragment);
    }
    if ip.checksum() != 0 {
        return Err(DropReason::BadOuterIp);
    }
    // SAFETY: copied out at once.
    if unsafe { PEERS.get(PeerKey { vtep: ip.src }) }.is_none() {
        return Err(DropReason::UnknownPeer);
    }
    let vxlan = unsafe { *pkt.header::<VxlanHdr>(VXLAN_OFF).ok_or(truncated)? };
    if vxlan.flags & VXLAN_FLAG_I == 0 {
        return Err(DropReason::BadFlags);
    }
    let vni = vxlan.vni();
    if unsafe { NETWORKS.get(vni) }.is_none() {
        return Err(DropReason::UnknownVni);
    }
    let inner_eth = unsafe { *pkt.header::<EthHdr>(INNER_ETH_OFF).ok_or(truncated)? };
    if inner_eth.ether_type() != ETH_P_IP {
        return Err(DropReason::InnerNotIpv4);
    }
    let inner_ip = unsafe { *pkt.header::<Ipv4Hdr>(INNER_IP_OFF).ok_or(truncated)? };

    // The lengths must describe this frame exactly: IPv4 total length up to the end of the
    // frame and UDP length up to the end of the IPv4 payload. An unsegmented GSO packet (seen
    // by TC, or by generic XDP) is exempt: it is longer than its headers say when the encap
    // clamped them at 0xffff, and segmentation would rewrite them.
    let ip_len = ip.tot_len() as usize;
    let gso = gso || (ip_len == 0xffff && wire_len > ip_len + EthHdr::LEN);
    if !gso && (ip_len + EthHdr::LEN != wire_len || udp.length() as usize + Ipv4Hdr::LEN != ip_len) {
        return Err(DropReason::BadLength);
    }
    if inner_ip.version_ihl >> 4 != 4 {
        return Err(DropReason::InnerNotIpv4);
    }

    // The inner source must be an endpoint that lives behind the VTEP the frame came from, with
    // its own MAC: a host can only speak for its own containers, as they are.
    let src = unsafe { ENDPOINTS.get(EndpointKey { vni, ip: inner_ip.src }) };
    match src {
        Some(src) if src.flags & ENDPOINT_LOCAL == 0 && src.vtep == ip.src && src.mac == inner_eth.src => {}
        _ => return Err(DropReason::InnerSpoofed),
    }
    let dst = unsafe { ENDPOINTS.get(EndpointKey { vni, ip: inner_ip.dst }) };
    match dst {
        Some(dst) if dst.flags & ENDPOINT_LOCAL != 0 => Ok(Some(dst.ifindex)),
        _ => Err(DropReason::NotLocal),
    }
}
