//! The container's egress: TC ingress on the host side of every endpoint's veth.
//!
//! Sees every frame a container sends. ARP is answered here, and DNS queries to the network's
//! gateway for names the maps hold (dns.rs); the rest of the DNS sent to the gateway goes up the
//! host's stack to the agent's resolver; IPv4 goes straight to a local
//! endpoint's veth or is encapsulated toward the host of a remote one; IPv4 to an address
//! outside the network goes up the host's stack, which routes and masquerades it, where the
//! network has a way out (docs/egress.md); everything else, and anything with a source that is
//! not the endpoint's own, is dropped.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use overlay_common::{
    dns::DNS_PORT,
    maps::{ENDPOINT_LOCAL, Endpoint, EndpointKey, NETWORK_EGRESS, NETWORK_ENCRYPTED, NETWORK_RESOLVER},
    monitor::HOOK_FROM_CONTAINER,
    stats::{self, DropReason},
    wire::{ArpHdr, ETH_P_ARP, ETH_P_IP, EthHdr, IpProto, Ipv4Hdr, UdpHdr, ether_type, is_fragment},
};

use crate::{
    arp, dns, encap, ipv4,
    maps::{ENDPOINTS, IFACES, NETWORKS, SUBNETS, config},
    monitor,
    packet::Packet,
    skb::{PACKET_HOST, deliver, linear},
    stats::count,
};

/// Bytes the program reads of every frame, which must be in the linear part of the skb:
/// Ethernet and then ARP, or an IPv4 header without options and the fixed TCP header after it
/// (`ipv4::read_len`). A header with options makes the program pull the rest of it then.
///
/// No more than that: pulling makes the skb's head the program's own, which for a TCP sender's
/// packet (a clone, its headers alone in the head, 66 bytes) means a new head, copied, and
/// payload moved into it, on every super-packet, on paths (to a local container, up the
/// host's stack) that write nothing. Encapsulation makes the head writable itself.
const HEADERS: u32 = (EthHdr::LEN + Ipv4Hdr::LEN + 20) as u32;
const _: () = assert!(HEADERS as usize >= EthHdr::LEN + ArpHdr::LEN);

#[inline(always)]
pub fn process(ctx: &TcContext) -> Result<i32, DropReason> {
    // SAFETY: reading a field of the context the kernel gave us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: copied out at once.
    let iface = *unsafe { IFACES.get(ifindex) }.ok_or(DropReason::UnknownIface)?;

    // An 802.1Q tag the container put on (a VLAN interface on eth0, or a raw socket): the kernel
    // took it out of the frame into the skb, where encapsulation would keep it and the uplink
    // would send it, with the container's VLAN and priority, onto the underlay.
    // SAFETY: reading a field of the context the kernel gave us.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Err(DropReason::VlanTagged);
    }
    let len = ctx.len();
    let mut pkt = linear(ctx, HEADERS, len, DropReason::Malformed)?;
    let eth: EthHdr = pkt.read(0).ok_or(DropReason::Malformed)?;
    if eth.src_addr != iface.mac {
        return Err(DropReason::Spoofed);
    }
    match ether_type(&eth) {
        ETH_P_IP => {}
        ETH_P_ARP => return arp::reply(pkt, ifindex, &iface),
        _ => return Err(DropReason::Unsupported),
    }

    let ip: Ipv4Hdr = pkt.read(EthHdr::LEN).ok_or(DropReason::Malformed)?;
    if ip.vihl != 0x45 {
        // Options: the rest of the header, and the transport header after it.
        let want = (EthHdr::LEN + ipv4::read_len(ip.ihl() as usize)) as u32;
        pkt = linear(ctx, want, len, DropReason::Malformed)?;
    }
    // The packet must be one the receiving container's kernel takes in (its headers describe
    // it), or it would be discarded there, on this host or another, where no counter sees it.
    // SAFETY: reading a field of the context the kernel gave us.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if ip.version() != 4 || !ipv4::whole(pkt, &ip, EthHdr::LEN, len as usize, gso) {
        return Err(DropReason::Malformed);
    }
    if ip.src_addr != iface.ip {
        // A DHCP client's discover or request: from 0.0.0.0 to everyone, over UDP.
        if ip.src_addr == [0; 4] && ip.dst_addr == [255; 4] && ip.proto == IpProto::Udp as u8 {
            return Err(DropReason::Dhcp);
        }
        return Err(DropReason::Spoofed);
    }
    if let Some(q) = resolver_query(&pkt, &ip, iface.vni) {
        if q.udp {
            match dns::query(ctx, ifindex, &iface, q.gateway, eth)? {
                dns::Verdict::Answered(verdict) => return Ok(verdict),
                dns::Verdict::ToResolver => {}
            }
        }
        if q.flags & NETWORK_RESOLVER != 0 {
            return to_resolver(ctx);
        }
        // No resolver here: the gateway is no endpoint, so the lookup below drops it
        // (no_endpoint), as anything else sent to the gateway.
    }

    // The key carries the sender's VNI: a destination on another network is simply not found.
    // SAFETY: copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(EndpointKey { vni: iface.vni, ip: ip.dst_addr }) }).copied()
    else {
        // Only after the overlay's own lookup missed: the fast path pays nothing for egress.
        return to_outside(ctx, iface.vni, ip.dst_addr);
    };

    if ep.flags & ENDPOINT_LOCAL != 0 {
        monitor::flow(ctx, HOOK_FROM_CONTAINER, stats::TX_LOCAL, iface.vni, 0);
        return to_local(ctx, &ep);
    }
    // An encrypted network's frames leave this host only protected, and this kernel has no
    // cipher for them (no ESP, no AEAD: docs/encryption.md): fail closed, never in the clear.
    // SAFETY: copied out at once.
    if let Some(net) = unsafe { NETWORKS.get(iface.vni) }
        && net.flags & NETWORK_ENCRYPTED != 0
    {
        return Err(DropReason::NoCipher);
    }
    let cfg = config().ok_or(DropReason::NoConfig)?;
    encap::to_remote(ctx, cfg, iface.vni, &ep, eth, ip.tos)
}

/// Delivers the frame into the namespace of an endpoint on this host, without a trip through
/// the host's stack: bpf_redirect_peer puts it on the ingress of the container side of the
/// endpoint's veth.
#[inline(always)]
fn to_local(ctx: &TcContext, ep: &Endpoint) -> Result<i32, DropReason> {
    deliver(ctx, ep.ifindex, stats::TX_LOCAL, DropReason::NoEndpoint)
}

/// A packet to no endpoint of the sender's network. One to an address outside the network's
/// subnet goes up the host's stack, to be routed and masqueraded out, where the network has a
/// way out here; the stack delivers it as if the container's veth had received it for the
/// host (the frame is addressed to the gateway's MAC, no device's here: mark it for this
/// host). In the subnet, or in another overlay network's (`SUBNETS`), it is nobody's for the
/// sender; broadcast, multicast and the ranges no host routes (0/8, 127/8) never leave.
#[inline(always)]
fn to_outside(ctx: &TcContext, vni: u32, dst: [u8; 4]) -> Result<i32, DropReason> {
    // SAFETY: copied out at once.
    let net = *unsafe { NETWORKS.get(vni) }.ok_or(DropReason::NoEndpoint)?;
    if net.contains(dst) || dst[0] == 0 || dst[0] == 127 || dst[0] >= 224 {
        return Err(DropReason::NoEndpoint);
    }
    // Another network of the overlay: isolated from this one, here as on the overlay.
    if SUBNETS.get(&aya_ebpf::btf_maps::lpm_trie::Key::new(32, dst)).is_some() {
        return Err(DropReason::NoEndpoint);
    }
    if net.flags & NETWORK_EGRESS == 0 {
        return Err(DropReason::NoEgress);
    }
    monitor::flow(ctx, HOOK_FROM_CONTAINER, stats::TO_HOST, vni, 0);
    let len = ctx.len();
    ctx.change_type(PACKET_HOST).map_err(|_| DropReason::NoEgress)?;
    count(stats::TO_HOST, len);
    Ok(TC_ACT_OK)
}

/// A DNS message from a container to its network's resolver address (the gateway), port 53.
struct ResolverQuery {
    gateway: [u8; 4],
    /// The network's `NETWORK_*` flags.
    flags: u8,
    /// Over UDP (a query the maps may answer); otherwise over TCP.
    udp: bool,
}

/// Whether `ip` (from a container on network `vni`) is DNS for the network's gateway: UDP or
/// TCP to the gateway, port 53, not a fragment and without IPv4 options (no resolver client
/// sends them; such a packet goes on like any other).
#[inline(always)]
fn resolver_query(pkt: &Packet, ip: &Ipv4Hdr, vni: u32) -> Option<ResolverQuery> {
    let udp = ip.proto == IpProto::Udp as u8;
    if !(udp || ip.proto == IpProto::Tcp as u8) || ip.vihl != 0x45 || is_fragment(ip) {
        return None;
    }
    // Both transport headers start with the source and destination ports.
    let ports: UdpHdr = pkt.read(EthHdr::LEN + Ipv4Hdr::LEN)?;
    if ports.dst_port() != DNS_PORT {
        return None;
    }
    // SAFETY: copied out at once.
    let net = *unsafe { NETWORKS.get(vni) }?;
    (net.gateway == ip.dst_addr && net.gateway != [0; 4]).then_some(ResolverQuery {
        gateway: net.gateway,
        flags: net.flags,
        udp,
    })
}

/// Hands DNS the maps cannot answer to the agent's resolver: up the host's stack, where the
/// gateway address is local (docs/names.md, "The agent's resolver"). The frame is addressed to
/// the gateway's MAC, which is no device's here, so the stack took it for another host's
/// (PACKET_OTHERHOST) and would discard it: mark it for this host.
#[inline(always)]
fn to_resolver(ctx: &TcContext) -> Result<i32, DropReason> {
    let len = ctx.len();
    ctx.change_type(PACKET_HOST).map_err(|_| DropReason::DnsAnswerFailed)?;
    count(stats::TO_RESOLVER, len);
    Ok(TC_ACT_OK)
}
