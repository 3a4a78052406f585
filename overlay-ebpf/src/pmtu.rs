//! Path MTU for containers: a packet too big for the overlay that says Don't Fragment gets ICMP
//! "fragmentation needed" back, with the overlay's MTU (RFC 1191), as the kernel's own VXLAN
//! device answers one (skb_tunnel_check_pmtu). The sender's stack learns the MTU for that
//! destination and its application hears why (tracepath, a QUIC stack probing the path,
//! anything reading IP_RECVERR); without it the packet would vanish, counted only here.
//!
//! Ordinary sockets never send one: they size packets by the route to the overlay's subnet,
//! which the agent gives the overlay's MTU. What arrives here comes from sockets that size them
//! by the interface (IP_PMTUDISC_PROBE, INTERFACE, OMIT: the interface has the uplink's MTU for
//! the way out), packet sockets, or a container that changed its routes. The packet itself is
//! dropped and counted `too_big` in every case; one without DF (OMIT) gets no answer, as no
//! router answers those, and would need fragmenting, which a TC program cannot do.
//!
//! The answer is the packet itself, cut and rewritten in place: its headers stay as the quote,
//! 28 bytes of new IPv4 and ICMP headers go in front of them, and it goes back out of the veth
//! it came in on. A GSO packet (segments too large for the overlay, from a TCP stack whose
//! route to the overlay was given a larger MTU) is answered the same way: cutting it makes it
//! one plain packet (bpf_skb_change_tail linearises it and clears GSO), a copy of up to 64 KiB
//! each time a sender still has to learn the MTU.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use overlay_common::{
    monitor::HOOK_FROM_CONTAINER,
    stats::{self, DropReason},
    wire::{EthHdr, IPV4_DF, IpProto, Ipv4Hdr, ipv4_header_sum, is_fragment},
};

use crate::{
    csum::{fold, words},
    skb::{linear, packet, redirected},
};

/// What the answer quotes of the packet: its IPv4 header (one without options; a packet with
/// options gets no answer) and the 20 bytes after it. RFC 792 asks for 8; 20 keep a TCP
/// segment's checksum field in the skb, which bpf_skb_change_tail refuses to cut while a
/// checksum offload is pending on it.
const QUOTE: usize = Ipv4Hdr::LEN + 20;

/// IPv4 and ICMP headers of the answer, put in front of the quote.
const ROOM: usize = Ipv4Hdr::LEN + IcmpFragNeeded::LEN;

/// ICMP destination unreachable (type 3), fragmentation needed and DF set (code 4), with the
/// next hop's MTU (RFC 1191).
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpFragNeeded {
    kind: u8,
    code: u8,
    check: [u8; 2],
    unused: [u8; 2],
    mtu: [u8; 2],
}

impl IcmpFragNeeded {
    const LEN: usize = 8;
}

/// ICMP message types that are errors: no error is ever sent about one (RFC 1122 3.2.2).
const ICMP_ERRORS: [u8; 5] = [3, 4, 5, 11, 12];

/// Drops the frame from a container that would not fit the uplink once encapsulated, counted
/// `too_big`, and answers it with ICMP fragmentation needed, giving `mtu`, when it asked for
/// that (DF). `eth` is the frame's Ethernet header, `dst_mac` the destination endpoint's MAC,
/// which the answer comes from (not whatever the container addressed). Always a verdict: the
/// drop is counted here.
#[inline(always)]
pub fn too_big(ctx: &TcContext, eth: EthHdr, dst_mac: [u8; 6], mtu: u32) -> i32 {
    // Counted and shown as sent, before the frame becomes the answer.
    crate::tc_dropped(ctx, HOOK_FROM_CONTAINER, DropReason::TooBig);
    answer(ctx, eth, dst_mac, mtu).unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn answer(ctx: &TcContext, eth: EthHdr, dst_mac: [u8; 6], mtu: u32) -> Option<i32> {
    let len = ctx.len();
    let pkt = linear(ctx, (EthHdr::LEN + QUOTE) as u32, len, DropReason::TooBig).ok()?;
    let ip: Ipv4Hdr = pkt.read(EthHdr::LEN)?;
    // DF, no options, the whole datagram, and not itself an ICMP error.
    if u16::from_be_bytes(ip.frags) & IPV4_DF == 0 || ip.vihl != 0x45 || is_fragment(&ip) {
        return None;
    }
    if ip.proto == IpProto::Icmp as u8 && ICMP_ERRORS.contains(&pkt.read::<u8>(EthHdr::LEN + Ipv4Hdr::LEN)?) {
        return None;
    }
    // The quote's sum, read where it lies (a copy would not fit the program's stack).
    let quote = pkt.slice(EthHdr::LEN, QUOTE)?;
    // SAFETY: plain helper call; `quote` is QUOTE bytes of the packet, checked above.
    let quote_sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, quote.cast(), QUOTE as u32, 0) };
    if quote_sum < 0 {
        return None;
    }

    let mut icmp =
        IcmpFragNeeded { kind: 3, code: 4, check: [0; 2], unused: [0; 2], mtu: (mtu as u16).to_be_bytes() };
    let icmp_sum = words(&[icmp.kind, icmp.code]) + words(&icmp.mtu);
    // bpf_csum_diff's sum is of 32-bit words in memory order: folded, the 16-bit sum's bytes
    // come out swapped on a little-endian machine, which is where BPF runs here.
    icmp.check = (!fold(icmp_sum + u32::from(fold(quote_sum as u32).swap_bytes()))).to_be_bytes();
    // From the destination, as the kernel's VXLAN device answers for a bridged port: the
    // sender has no router between it and the other container to hear from.
    let mut reply_ip = Ipv4Hdr {
        vihl: 0x45,
        // Network control precedence, as the kernel's ICMP errors carry.
        tos: 0xc0,
        tot_len: ((ROOM + QUOTE) as u16).to_be_bytes(),
        id: [0; 2],
        frags: [0; 2],
        ttl: 64,
        proto: IpProto::Icmp as u8,
        check: [0; 2],
        src_addr: ip.dst_addr,
        dst_addr: ip.src_addr,
    };
    reply_ip.check = ipv4_header_sum(&reply_ip).to_be_bytes();
    let reply_eth = EthHdr { dst_addr: eth.src_addr, src_addr: dst_mac, ether_type: eth.ether_type };

    // Cut after the quote, then open room for the new headers between Ethernet and the quote.
    // SAFETY: plain helper call on our skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (EthHdr::LEN + QUOTE) as u32, 0) } != 0 {
        return None;
    }
    ctx.adjust_room(ROOM as i32, BPF_ADJ_ROOM_MAC, 0).ok()?;
    let pkt = packet(ctx);
    if !pkt.write(0, reply_eth)
        || !pkt.write(EthHdr::LEN, reply_ip)
        || !pkt.write(EthHdr::LEN + Ipv4Hdr::LEN, icmp)
    {
        return None;
    }
    // SAFETY: reading a field of the context the kernel gave us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Egress of the host-side veth is the container's ingress.
    // SAFETY: plain helper call.
    let sent = unsafe { bpf_redirect(ifindex, 0) };
    redirected(sent, stats::FRAG_NEEDED, pkt.len() as u32, DropReason::TooBig).ok()
}
