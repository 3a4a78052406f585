//! The uplink: where VXLAN from other hosts arrives.
//!
//! XDP runs first, on every frame the uplink receives. It classifies the frame, drops anything
//! malformed or unauthorised at the earliest and cheapest point, strips the outer headers of a
//! valid frame and leaves the endpoint it belongs to in the metadata area.
//!
//! Delivery into the container is left to TC ingress, because XDP cannot do it without
//! damage: XDP_REDIRECT into a veth turns the frame into a bare xdp_frame, which loses the
//! skb's checksum state (a CHECKSUM_PARTIAL frame from a local or virtual sender then fails
//! the container's checksum check) and bypasses GRO. Passing the decapsulated frame up instead
//! lets the driver's GRO merge the inner TCP segments, and TC then moves the merged skb into
//! the container with bpf_redirect_peer, metadata intact.
//!
//! TC also covers what XDP cannot: a driver without metadata support, or no XDP program at all;
//! then TC classifies and decapsulates the frame itself with the same rules.

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    helpers::bpf_xdp_adjust_meta,
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    maps::{XDP_META_MAGIC, XdpMeta},
    monitor::HOOK_UPLINK_TC,
    stats::{self, DropReason},
    wire::{ETH_P_8021AD, ETH_P_8021Q, EthHdr, ether_type},
};

use crate::{
    decap::{self, Verdict},
    maps::config,
    monitor,
    packet::Packet,
    skb::{deliver, linear},
    stats::count,
};

/// What XDP leaves for TC when it has already decided the frame is not ours.
const META_PASS: u32 = 0;

/// The XDP half: classify, drop, decapsulate (decap.rs), and tell TC where the frame goes.
#[inline(always)]
pub fn xdp(ctx: &XdpContext) -> Result<u32, DropReason> {
    // Not configured yet: the uplink is just the host's interface.
    let Some(cfg) = config() else { return Ok(xdp_action::XDP_PASS) };
    let pkt = Packet { start: ctx.data(), end: ctx.data_end() };
    // A tagged frame (802.1Q or 802.1ad, VLAN 0 with a priority among them) is left to TC,
    // uncounted and without metadata: the kernel takes the tag out before TC, which then judges
    // the frame as it does on a TC-only uplink (vlan_tagged if it is VXLAN for this host).
    // Passed here as not ours, a priority-tagged one would reach the stack as untagged UDP to
    // the VXLAN port, which no socket holds: an ICMP error to whatever source it claims.
    if let Some(eth) = pkt.read::<EthHdr>(0)
        && matches!(ether_type(&eth), ETH_P_8021Q | ETH_P_8021AD)
    {
        return Ok(xdp_action::XDP_PASS);
    }
    match decap::classify(pkt, pkt.len(), false, cfg) {
        Verdict::Pass => {
            count(stats::UPLINK_PASS, pkt.len() as u32);
            // Tell TC it need not look at this frame again (best effort: without metadata TC
            // just classifies it once more).
            let _ = set_meta(ctx, META_PASS);
            Ok(xdp_action::XDP_PASS)
        }
        Verdict::Drop(drop) => Err(drop),
        Verdict::Deliver(ifindex) => {
            // Without room for metadata (the driver has none) TC cannot be told where the frame
            // goes; leave it encapsulated and let TC decapsulate it.
            if set_meta(ctx, ifindex).is_err() {
                return Ok(xdp_action::XDP_PASS);
            }
            decap::strip_xdp(ctx, pkt.len())?;
            Ok(xdp_action::XDP_PASS)
        }
    }
}

/// Writes the metadata TC reads: which endpoint veth the frame is for (or META_PASS).
#[inline(always)]
fn set_meta(ctx: &XdpContext, ifindex: u32) -> Result<(), ()> {
    // SAFETY: plain helper call; it fails without touching the frame if there is no room.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(size_of::<XdpMeta>() as i32)) } != 0 {
        return Err(());
    }
    let meta = ctx.metadata();
    if meta + size_of::<XdpMeta>() > ctx.data() {
        return Err(());
    }
    // SAFETY: bounds-checked against the start of the packet data just above.
    unsafe { *(meta as *mut XdpMeta) = XdpMeta { magic: XDP_META_MAGIC, ifindex } };
    Ok(())
}

/// The TC half: deliver what XDP decapsulated, or classify and decapsulate (decap.rs) when XDP
/// could not.
#[inline(always)]
pub fn tc(ctx: &TcContext) -> Result<i32, DropReason> {
    if let Some(meta) = meta(ctx) {
        if meta.ifindex == META_PASS {
            return Ok(TC_ACT_OK);
        }
        // Tagged VXLAN that XDP saw untagged (a NIC that takes tags out in hardware): the tag
        // must not ride into the container.
        if vlan_present(ctx) {
            return Err(DropReason::VlanTagged);
        }
        monitor::flow(ctx, HOOK_UPLINK_TC, stats::RX_DELIVER, 0, meta.ifindex);
        return deliver(ctx, meta.ifindex, stats::RX_DELIVER, DropReason::DecapFailed);
    }

    let Some(cfg) = config() else { return Ok(TC_ACT_OK) };
    let len = ctx.len();
    // First only as much as says whether it may be VXLAN for us: everything else (the host's
    // own traffic, and containers' through the host) passes without its head being pulled,
    // which for a forwarded super-packet means a new head, copied, and payload moved into it.
    let pkt = linear(ctx, decap::PEEK as u32, len, DropReason::Truncated)?;
    if !decap::maybe_ours(pkt, cfg) {
        count(stats::UPLINK_PASS, len);
        return Ok(TC_ACT_OK);
    }
    let pkt = linear(ctx, decap::HEADERS as u32, len, DropReason::Truncated)?;
    // SAFETY: reading a field of the context the kernel gave us.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    match decap::classify(pkt, len as usize, gso, cfg) {
        // Counted here when TC classifies alone (no XDP on the uplink); with XDP, the XDP half
        // counted it and left META_PASS, handled above.
        Verdict::Pass => {
            count(stats::UPLINK_PASS, len);
            Ok(TC_ACT_OK)
        }
        Verdict::Drop(drop) => Err(drop),
        Verdict::Deliver(ifindex) => {
            // VXLAN that arrived tagged (the kernel took the tag out into the skb): delivered,
            // the tag would ride into the container. (With XDP in front, a tagged frame is not
            // IPv4 to XDP and goes to the stack, which has no VLAN device for it.)
            if vlan_present(ctx) {
                return Err(DropReason::VlanTagged);
            }
            decap::strip_tc(ctx, pkt)?;
            monitor::flow(ctx, HOOK_UPLINK_TC, stats::RX_DELIVER, 0, ifindex);
            deliver(ctx, ifindex, stats::RX_DELIVER, DropReason::DecapFailed)
        }
    }
}

/// Whether the kernel took an 802.1Q/802.1ad tag out of the frame into the skb.
#[inline(always)]
fn vlan_present(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of the context the kernel gave us.
    unsafe { (*ctx.skb.skb).vlan_present != 0 }
}

/// The metadata our XDP program left on this frame, if any.
#[inline(always)]
fn meta(ctx: &TcContext) -> Option<XdpMeta> {
    // SAFETY: reading fields of the context the kernel gave us.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize) };
    if meta + size_of::<XdpMeta>() > data {
        return None;
    }
    // SAFETY: bounds-checked against the start of the packet data just above.
    let m = unsafe { *(meta as *const XdpMeta) };
    if m.magic == XDP_META_MAGIC { Some(m) } else { None }
}
