//! VXLAN encapsulation toward another host.
//!
//! The frame is grown in place with bpf_skb_adjust_room and the encap flags, which tell the
//! kernel where the inner headers now are and that this is a UDP tunnel carrying Ethernet. That
//! is what keeps a GSO/TSO super-packet from the container valid: when it is segmented later
//! (by the uplink or anything on the way), every segment gets its own outer headers and the
//! inner checksums are finished per segment.

use aya_ebpf::{
    bindings::{
        BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_get_hash_recalc, bpf_redirect_neigh},
    programs::TcContext,
};
use overlay_common::{
    VXLAN_OVERHEAD, VXLAN_PORT, VXLAN_SRC_PORT_MAX, VXLAN_SRC_PORT_MIN,
    maps::{Config, Endpoint},
    monitor::HOOK_FROM_CONTAINER,
    stats::{self, DropReason},
    wire::{EthHdr, EtherType, IPV4_DF, IpProto, Ipv4Hdr, UdpHdr, VxlanEncap, VxlanHdr, ipv4_header_sum},
};

use crate::skb::redirected;

/// Outer TTL, as the kernel's vxlan device uses by default.
const OUTER_TTL: u8 = 64;

/// bpf_skb_adjust_room flags for VXLAN over IPv4.
/// FIXED_GSO: container MTUs already leave room for the 50 bytes we add, so the segment size
/// the container's TCP chose stays right and must not be shrunk by the kernel.
const ENCAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
    // Length of the inner L2 header, so the kernel's inner_mac_header points at it.
    | ((EthHdr::LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);

/// Encapsulates the frame for the remote endpoint `ep` on network `vni` and hands it to the
/// uplink, with the outer MACs filled from the host's neighbour table.
#[inline(always)]
pub fn to_remote(
    ctx: &TcContext,
    cfg: &Config,
    vni: u32,
    ep: &Endpoint,
    inner_eth: EthHdr,
    inner_tos: u8,
) -> Result<i32, DropReason> {
    let skb = ctx.skb.skb;
    let len = ctx.len();
    // SAFETY: reading fields of the context the kernel gave us.
    let gso = unsafe { (*skb).gso_size } != 0;
    // A frame that would not fit the uplink once encapsulated would be dropped silently by the
    // device; drop it here where it is counted. (Only from a socket that sizes its packets by
    // the interface, which has the uplink's MTU for the way out, not by the route to the
    // overlay, or from a container that changed its routes or MTU: pmtu.rs.)
    // A GSO packet is judged by the segments it will become: its segment size plus the inner
    // IPv4 and TCP/UDP headers each segment repeats (a sender that set its own gso_size, e.g.
    // through PACKET_VNET_HDR, can ask for more than fits).
    let ip_len = if gso {
        // SAFETY: reading a field of the context the kernel gave us.
        (unsafe { (*skb).gso_size }) + segment_headers(ctx)?
    } else {
        len - EthHdr::LEN as u32
    };
    if ip_len + VXLAN_OVERHEAD > cfg.uplink_mtu {
        // A packet that asked not to be fragmented hears back the MTU (pmtu.rs). A GSO packet
        // too: it is a TCP stack's burst of segments sized by a path MTU it believes, which
        // the answer corrects (its retransmission then fits), as the kernel's VXLAN device
        // answers one; dropped alone, the connection would stall.
        return Ok(crate::pmtu::too_big(ctx, inner_eth, ep.mac, cfg.uplink_mtu - VXLAN_OVERHEAD));
    }
    // Past the last check of the packet, before its headers change: the monitor sees the
    // container's packet as sent.
    crate::monitor::flow(ctx, HOOK_FROM_CONTAINER, stats::TX_ENCAP, vni, 0);
    // Hash of the inner flow, taken before the headers change, for the UDP source port.
    // SAFETY: plain helper call on our skb.
    let hash = unsafe { bpf_get_hash_recalc(skb) };

    ctx.adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .map_err(|_| DropReason::EncapFailed)?;

    let outer_len = len + VXLAN_OVERHEAD - EthHdr::LEN as u32;
    // A GSO super-packet can be longer than an IPv4 length can say; segmentation rewrites the
    // outer lengths of every segment, so clamping here only affects the unsegmented view.
    let ip_len = if outer_len > 0xffff { 0xffff } else { outer_len as u16 };
    let udp_len = ip_len - Ipv4Hdr::LEN as u16;
    let span = u64::from(VXLAN_SRC_PORT_MAX - VXLAN_SRC_PORT_MIN) + 1;
    let src_port = VXLAN_SRC_PORT_MIN + ((u64::from(hash) * span) >> 32) as u16;

    let mut hdr = VxlanEncap {
        // bpf_redirect_neigh fills in the next hop's MAC.
        outer_eth: EthHdr::new([0; 6], cfg.uplink_mac, EtherType::Ipv4),
        outer_ip: Ipv4Hdr {
            vihl: 0x45,
            // DSCP and ECN of the inner packet (RFC 6040 normal mode), so the underlay can
            // honour its class and mark congestion.
            tos: inner_tos,
            tot_len: ip_len.to_be_bytes(),
            id: [0; 2],
            // VTEPs must not fragment (RFC 7348 section 4.3); DF also makes an ID unnecessary.
            frags: IPV4_DF.to_be_bytes(),
            ttl: OUTER_TTL,
            proto: IpProto::Udp as u8,
            check: [0; 2],
            src_addr: cfg.vtep,
            dst_addr: ep.vtep,
        },
        udp: UdpHdr {
            src: src_port.to_be_bytes(),
            dst: VXLAN_PORT.to_be_bytes(),
            len: udp_len.to_be_bytes(),
            // Zero UDP checksum is allowed for VXLAN over IPv4 (RFC 7348); the inner packet
            // carries its own checksums end to end.
            check: [0; 2],
        },
        vxlan: VxlanHdr::new(vni),
        inner_eth,
    };
    hdr.outer_ip.check = ipv4_header_sum(&hdr.outer_ip).to_be_bytes();

    ctx.store(0, &hdr, 0).map_err(|_| DropReason::EncapFailed)?;

    // SAFETY: plain helper call; a null params pointer asks for a FIB lookup on the outer
    // destination, which resolves the next hop whether it is the peer or a router.
    let verdict = unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    redirected(verdict, stats::TX_ENCAP, len + VXLAN_OVERHEAD, DropReason::EncapFailed)
}

/// The inner IPv4 and TCP or UDP header bytes every segment of a GSO packet carries. (A TCP
/// header beyond the linear part counts as its minimum: the check is then a little lenient,
/// never wrong the other way.)
#[inline(always)]
fn segment_headers(ctx: &TcContext) -> Result<u32, DropReason> {
    let pkt = crate::skb::packet(ctx);
    let ip: Ipv4Hdr = pkt.read(EthHdr::LEN).ok_or(DropReason::Malformed)?;
    let ihl = ip.ihl() as usize;
    let l4 = if ip.proto == IpProto::Tcp as u8 {
        // Data offset: the high nibble of the TCP header's 13th byte, in 32-bit words.
        pkt.read::<u8>(EthHdr::LEN + ihl + TCP_DOFF_OFF).map_or(TCP_MIN, |b| u32::from(b >> 4) * 4)
    } else if ip.proto == IpProto::Udp as u8 {
        UdpHdr::LEN as u32
    } else {
        0
    };
    Ok(ihl as u32 + l4)
}

/// Where the TCP header keeps its data offset, and its shortest length.
const TCP_DOFF_OFF: usize = 12;
const TCP_MIN: u32 = 20;
