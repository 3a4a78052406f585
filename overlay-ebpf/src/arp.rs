//! The ARP responder: containers resolve every address on their network from the endpoint map,
//! so no ARP request ever leaves the host and nothing is flooded.

use aya_ebpf::helpers::bpf_redirect;
use overlay_common::{
    maps::{EndpointKey, Iface},
    stats::{self, DropReason},
    wire::{ARP_OP_REPLY, ARP_OP_REQUEST, ArpHdr, EthHdr},
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
    let eth = pkt.header::<EthHdr>(0).ok_or(DropReason::Malformed)?;
    let arp = pkt.header::<ArpHdr>(EthHdr::LEN).ok_or(DropReason::Malformed)?;
    // SAFETY: both pointers were bounds-checked against the packet above.
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };

    if !arp.is_ethernet_ipv4() || arp.op() != ARP_OP_REQUEST {
        return Err(DropReason::Arp);
    }
    // The requester must be the endpoint itself: a container cannot ask in someone else's name.
    if arp.sha != iface.mac || arp.spa != iface.ip {
        return Err(DropReason::Spoofed);
    }
    let target = arp.tpa;
    // A request for its own address is a gratuitous ARP or a duplicate-address probe: there is
    // nobody else to answer for it.
    if target == iface.ip {
        return Err(DropReason::Arp);
    }
    let owner_mac = owner(iface.vni, target).ok_or(DropReason::Arp)?;

    eth.dst = eth.src;
    eth.src = owner_mac;
    arp.op = ARP_OP_REPLY.to_be_bytes();
    arp.tha = arp.sha;
    arp.tpa = arp.spa;
    arp.sha = owner_mac;
    arp.spa = target;

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
