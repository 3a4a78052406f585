//! VXLAN decapsulation on the uplink, the mirror of encap.rs: which frames are VXLAN for this
//! host, whether each one may be delivered, and the removal of the outer headers, in XDP
//! ([`strip_xdp`]) and in TC ([`strip_tc`]).
//!
//! The checks are shared by the uplink's XDP program and its TC fallback so both apply exactly
//! the same rules. Their order is the order of the headers: a frame is dropped for the first
//! thing wrong with it, and frames that are not VXLAN for this host are never touched.

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    VXLAN_OVERHEAD, VXLAN_PORT,
    maps::{Config, ENDPOINT_LOCAL, EndpointKey, NETWORK_ENCRYPTED, PeerKey},
    stats::{self, DropReason},
    wire::{
        ECN_CE, ECN_MASK, ECN_NOT_ECT, ETH_P_IP, EthHdr, INNER_ETH_OFF, INNER_IP_OFF, IpProto, Ipv4Hdr,
        OUTER_IP_OFF, OUTER_UDP_OFF, UdpHdr, VXLAN_I_FLAG_MASK, VXLAN_OFF, VxlanHdr, ether_type,
        ipv4_header_sum, is_fragment, set_ce,
    },
};

use crate::{
    ipv4,
    maps::{ENDPOINTS, NETWORKS, PEERS},
    packet::Packet,
    stats::count,
};

/// Bytes of headers the checks read: everything up to the inner IPv4 header, and that header
/// with the start of the transport header after it (ipv4::READ).
pub const HEADERS: usize = INNER_IP_OFF + ipv4::READ;

/// Bytes [`maybe_ours`] reads: the outer Ethernet and IPv4 headers.
pub const PEEK: usize = OUTER_UDP_OFF;

/// Whether the frame may be VXLAN for this host (IPv4, UDP, to our VTEP), from its first
/// [`PEEK`] bytes: what is not passes untouched, as [`classify`] would pass it, without the
/// rest of the headers being made linear.
#[inline(always)]
pub fn maybe_ours(pkt: Packet, cfg: &Config) -> bool {
    let Some(eth) = pkt.read::<EthHdr>(0) else { return false };
    if ether_type(&eth) != ETH_P_IP {
        return false;
    }
    let Some(ip) = pkt.read::<Ipv4Hdr>(OUTER_IP_OFF) else { return false };
    ip.proto == IpProto::Udp as u8 && ip.dst_addr == cfg.vtep
}

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
    let Some(eth) = pkt.read::<EthHdr>(0) else { return Ok(None) };
    if ether_type(&eth) != ETH_P_IP {
        return Ok(None);
    }
    let Some(ip) = pkt.read::<Ipv4Hdr>(OUTER_IP_OFF) else { return Ok(None) };
    if ip.proto != IpProto::Udp as u8 || ip.dst_addr != cfg.vtep {
        return Ok(None);
    }
    // A later fragment carries no UDP header: nothing here says whether it is VXLAN.
    if ip.frag_offset() != 0 {
        return Ok(None);
    }
    // Options move the UDP header. VTEPs never send them; VXLAN with options is dropped rather
    // than left to the stack, which has no socket on the VXLAN port and would answer a forged
    // source with an ICMP error (a reflection). Other UDP with options is the stack's.
    if ip.vihl != 0x45 {
        let ihl = ip.ihl() as usize;
        if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
            return Ok(None);
        }
        let udp: UdpHdr = pkt.read(OUTER_IP_OFF + ihl).ok_or(truncated)?;
        return if udp.dst_port() == VXLAN_PORT { Err(DropReason::OuterOptions) } else { Ok(None) };
    }
    // UDP to our VTEP with a cut-off UDP header is garbage whatever its port: drop and count.
    let udp: UdpHdr = pkt.read(OUTER_UDP_OFF).ok_or(truncated)?;
    if udp.dst_port() != VXLAN_PORT {
        return Ok(None);
    }

    // Sent to another host's MAC (a promiscuous uplink, a flooding switch): the stack discards
    // it as not for this host. To a group MAC: VTEPs never do that; drop it.
    if eth.dst_addr != cfg.uplink_mac {
        return if eth.dst_addr[0] & 1 != 0 { Err(DropReason::BadOuterMac) } else { Ok(None) };
    }

    // From here on the frame is VXLAN for this host: deliver it or drop it with a reason.
    if is_fragment(&ip) {
        return Err(DropReason::Fragment);
    }
    if ipv4_header_sum(&ip) != 0 {
        return Err(DropReason::BadOuterIp);
    }
    // SAFETY: copied out at once.
    if unsafe { PEERS.get(PeerKey { vtep: ip.src_addr }) }.is_none() {
        return Err(DropReason::UnknownPeer);
    }
    let vxlan: VxlanHdr = pkt.read(VXLAN_OFF).ok_or(truncated)?;
    // The I flag and nothing else, as Linux's vxlan insists unless told of an extension (GBP,
    // GPE) that gives the other bits a meaning; RFC 7348's "ignore them" would let such a frame
    // be taken for what it is not.
    if vxlan.flags != VXLAN_I_FLAG_MASK || vxlan._reserved1 != [0; 3] || vxlan._reserved2 != 0 {
        return Err(DropReason::BadFlags);
    }
    let vni = vxlan.vni();
    // SAFETY: copied out at once.
    let Some(net) = (unsafe { NETWORKS.get(vni) }).copied() else {
        return Err(DropReason::UnknownVni);
    };
    // Frames of an encrypted network cross the underlay only protected: plaintext VXLAN claiming
    // its VNI is forged (VXLAN has no authentication; anyone on the underlay can send it with a
    // peer's address) or from a host that would not encrypt. The uplink never takes it.
    if net.flags & NETWORK_ENCRYPTED != 0 {
        return Err(DropReason::PlaintextEncrypted);
    }
    let inner_eth: EthHdr = pkt.read(INNER_ETH_OFF).ok_or(truncated)?;
    if ether_type(&inner_eth) != ETH_P_IP {
        return Err(DropReason::InnerNotIpv4);
    }
    let inner_ip: Ipv4Hdr = pkt.read(INNER_IP_OFF).ok_or(truncated)?;

    // The lengths must describe this frame exactly: IPv4 total length up to the end of the
    // frame and UDP length up to the end of the IPv4 payload. An unsegmented GSO packet (seen
    // by TC, or by generic XDP) is exempt: it is longer than its headers say when the encap
    // clamped them at 0xffff, and segmentation would rewrite them.
    let ip_len = ip.tot_len() as usize;
    let gso = gso || (ip_len == 0xffff && wire_len > ip_len + EthHdr::LEN);
    if !gso && (ip_len + EthHdr::LEN != wire_len || udp.len() as usize + Ipv4Hdr::LEN != ip_len) {
        return Err(DropReason::BadLength);
    }
    if inner_ip.version() != 4 {
        return Err(DropReason::InnerNotIpv4);
    }
    // The inner packet must describe itself, headers and transport header whole: the receiving
    // container's kernel would drop it otherwise, where no counter of ours sees it. Shorter
    // than the frame is allowed only as Ethernet padding, in a frame of the 60-byte minimum.
    if !ipv4::whole(pkt, &inner_ip, INNER_IP_OFF, wire_len - INNER_ETH_OFF, gso) {
        return Err(DropReason::InnerMalformed);
    }

    // The inner source must be an endpoint that lives behind the VTEP the frame came from, with
    // its own MAC: a host can only speak for its own containers, as they are.
    // SAFETY: both endpoint lookups are read at once, before anything can change the entries.
    let src = unsafe { ENDPOINTS.get(EndpointKey { vni, ip: inner_ip.src_addr }) };
    match src {
        Some(src)
            if src.flags & ENDPOINT_LOCAL == 0
                && src.vtep == ip.src_addr
                && src.mac == inner_eth.src_addr => {}
        _ => return Err(DropReason::InnerSpoofed),
    }
    let dst = unsafe { ENDPOINTS.get(EndpointKey { vni, ip: inner_ip.dst_addr }) };
    let ifindex = match dst {
        Some(dst) if dst.flags & ENDPOINT_LOCAL != 0 => dst.ifindex,
        _ => return Err(DropReason::NotLocal),
    };

    // RFC 6040 section 4.2 (normal mode, as Linux's vxlan decapsulates): congestion the underlay
    // marked on the outer header reaches the receiver as CE on an ECN-capable inner packet, and
    // as a drop on one whose sender would not understand the mark. Written in place, so both
    // the XDP and the TC path deliver it (marking twice changes nothing).
    if ip.tos & ECN_MASK == ECN_CE && inner_ip.tos & ECN_MASK != ECN_CE {
        if inner_ip.tos & ECN_MASK == ECN_NOT_ECT {
            return Err(DropReason::CongestedNotEct);
        }
        let mut marked = inner_ip;
        set_ce(&mut marked);
        if !pkt.write(INNER_IP_OFF, marked) {
            return Err(truncated);
        }
    }
    Ok(Some(ifindex))
}

/// Decapsulates, in XDP, a frame [`classify`] said to deliver: `len` bytes long, it starts
/// `VXLAN_OVERHEAD` bytes later, with the inner Ethernet header. Metadata written in front of
/// the data before this call moves along with the data start.
#[inline(always)]
pub fn strip_xdp(ctx: &XdpContext, len: usize) -> Result<(), DropReason> {
    // SAFETY: plain helper call on our frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, VXLAN_OVERHEAD as i32) } != 0 {
        return Err(DropReason::DecapFailed);
    }
    count(stats::RX_DECAP, (len - VXLAN_OVERHEAD as usize) as u32);
    Ok(())
}

/// Decapsulates, in TC, a frame [`classify`] said to deliver, whose headers are in `pkt`.
/// bpf_skb_adjust_room removes outer IPv4, UDP, VXLAN and the inner Ethernet header from behind
/// the outer Ethernet header (FIXED_GSO keeps a GRO-merged packet's segment size; DECAP_L3_IPV4
/// tells the kernel the tunnel is gone), then the inner Ethernet header goes where the outer one
/// was.
#[inline(always)]
pub fn strip_tc(ctx: &TcContext, pkt: Packet) -> Result<(), DropReason> {
    let len = ctx.len();
    let inner_eth: EthHdr = pkt.read(INNER_ETH_OFF).ok_or(DropReason::Truncated)?;
    ctx.adjust_room(
        -(VXLAN_OVERHEAD as i32),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4),
    )
    .map_err(|_| DropReason::DecapFailed)?;
    ctx.store(0, &inner_eth, 0).map_err(|_| DropReason::DecapFailed)?;
    count(stats::RX_DECAP, len - VXLAN_OVERHEAD);
    Ok(())
}
