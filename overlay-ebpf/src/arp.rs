//! The ARP responder: containers resolve every address on their network from the endpoint map,
//! so no ARP request ever leaves the host and nothing is flooded.

use aya_ebpf::helpers::bpf_redirect;
use overlay_common::{
    maps::{EndpointKey, Iface},
    stats::{self, DropReason},
    wire::{ARP_OP_REPLY, ARP_OP_REQUEST, ArpHdr, EthHdr, is_ethernet_ipv4},
};

use crate::{
    maps::{ENDPOINTS, NETWORKS},
    packet::Packet,
    skb::redirected,
};

/// Answers an ARP request from the endpoint behind `ifindex` in place and sends the reply
/// straight back out of the same veth to the container.
#[inline(always)]
pub fn reply(pkt: Packet, ifindex: u32, iface: &Iface) -> Result<i32, DropReason> {
    let mut eth: EthHdr = pkt.read(0).ok_or(DropReason::Malformed)?;
    let mut arp: ArpHdr = pkt.read(EthHdr::LEN).ok_or(DropReason::Malformed)?;

    if !is_ethernet_ipv4(&arp) {
        return Err(DropReason::Arp);
    }
    // Who speaks first: a container cannot send ARP in someone else's name.
    if arp.sha != iface.mac {
        return Err(DropReason::Spoofed);
    }
    // An RFC 5227 probe: "does anyone have the address I am about to use?".
    if arp.spa == [0; 4] {
        return Err(DropReason::ArpProbe);
    }
    if arp.spa != iface.ip {
        return Err(DropReason::Spoofed);
    }
    // Replies and announcements in its own name: nobody asked (the responder answers every
    // request itself).
    if arp.oper() != ARP_OP_REQUEST {
        return Err(DropReason::ArpNotRequest);
    }
    let target = arp.tpa;
    // A request for its own address is an announcement (gratuitous ARP): nobody else to answer.
    if target == iface.ip {
        return Err(DropReason::ArpProbe);
    }
    let owner_mac = owner(iface.vni, target).ok_or(DropReason::Arp)?;

    eth.dst_addr = eth.src_addr;
    eth.src_addr = owner_mac;
    arp.set_oper(ARP_OP_REPLY);
    arp.tha = arp.sha;
    arp.tpa = arp.spa;
    arp.sha = owner_mac;
    arp.spa = target;
    // Both fit: they were read from the same places.
    if !pkt.write(0, eth) || !pkt.write(EthHdr::LEN, arp) {
        return Err(DropReason::Malformed);
    }

    // Egress of the host-side veth is the container's ingress.
    // SAFETY: plain helper call.
    redirected(unsafe { bpf_redirect(ifindex, 0) }, stats::ARP_REPLY, pkt.len() as u32, DropReason::Arp)
}

/// The MAC that owns `ip` on network `vni`: an endpoint, or the network's gateway.
#[inline(always)]
fn owner(vni: u32, ip: [u8; 4]) -> Option<[u8; 6]> {
    // SAFETY: the value is copied out before anything else can touch the map entry.
    if let Some(ep) = unsafe { ENDPOINTS.get(EndpointKey { vni, ip }) } {
        return Some(ep.mac);
    }
    // SAFETY: as above.
    let net = unsafe { NETWORKS.get(vni) }?;
    if net.gateway == ip && ip != [0; 4] { Some(net.gateway_mac) } else { None }
}
