//! Events for `overlay-agent monitor`: drops, and the first packet of each forwarded flow,
//! written to the `MONITOR` ring buffer only while a monitor listens (overlay_common::monitor).
//!
//! While nobody listens each hook costs one lookup in the one-entry `MONITOR_CTL` array (which
//! the verifier inlines into a few instructions) and a test of its flags: no clock, no copy.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    monitor::{
        EVENT_DROP, EVENT_FLOW, FlowKey, HEAD_LEN, HOOK_FROM_CONTAINER, MONITOR_DROPS, MONITOR_FLOWS,
        MonitorCtl, MonitorEvent,
    },
    stats,
    wire::{EthHdr, IpProto, Ipv4Hdr, UdpHdr, is_fragment},
};

use crate::{
    maps::{FLOWS_SEEN, IFACES, MONITOR, MONITOR_CTL},
    skb::packet,
    stats::count,
};

/// The control entry, if a monitor listens for `what` (and its lease has not run out).
#[inline(always)]
fn listening(what: u32) -> Option<*mut MonitorCtl> {
    let ctl = MONITOR_CTL.get_ptr_mut(0)?;
    // SAFETY: a pointer into the array's value, valid for the program's run.
    if unsafe { (*ctl).flags } & what == 0 {
        return None;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above.
    if now > unsafe { (*ctl).expires_ns } {
        return None;
    }
    Some(ctl)
}

/// Reserves an event in the ring buffer and fills what every event has; None (and the loss
/// counted) when the buffer is full.
#[inline(always)]
fn reserve(
    kind: u8,
    hook: u8,
    code: u32,
    ifindex: u32,
    vni: u32,
    len: u32,
) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<MonitorEvent>> {
    let Some(mut entry) = MONITOR.reserve(0) else {
        count(stats::MONITOR_LOST, len);
        return None;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved event; each field is written before the event is submitted.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).kind = kind;
        (*ev).hook = hook;
        (*ev)._pad = 0;
        (*ev).code = code;
        (*ev).ifindex = ifindex;
        (*ev).vni = vni;
        (*ev).len = len;
        (*ev).cap_len = 0;
    }
    Some(entry)
}

/// The VNI of the endpoint behind host-side veth `ifindex`, 0 if there is none.
#[inline(always)]
fn iface_vni(ifindex: u32) -> u32 {
    // SAFETY: copied out at once.
    unsafe { IFACES.get(ifindex) }.map_or(0, |i| i.vni)
}

/// Copies the frame's first bytes into the event, with the helper `load`: HEAD_LEN of them, or
/// for a shorter frame the longest of a few sizes that fits (the helpers take a size the
/// verifier must know the bounds of; a size computed from the frame's length loses them on the
/// way through the compiler's zero-extensions, constants cannot). The sizes are where the
/// headers end: Ethernet; IPv4; its ports; a VXLAN frame's inner IPv4 and ports.
#[inline(always)]
fn capture(
    entry: &mut aya_ebpf::maps::ring_buf::RingBufEntry<MonitorEvent>,
    len: u32,
    load: impl Fn(*mut u8, u32) -> i64,
) {
    let ev = entry.as_mut_ptr();
    // SAFETY: `head` is HEAD_LEN bytes of the reserved event; every size below is at most that.
    let to = unsafe { (&raw mut (*ev).head).cast::<u8>() };
    let n = if len >= HEAD_LEN as u32 {
        (load(to, HEAD_LEN as u32) == 0).then_some(HEAD_LEN as u32)
    } else if len >= 112 {
        (load(to, 112) == 0).then_some(112)
    } else if len >= 96 {
        (load(to, 96) == 0).then_some(96)
    } else if len >= 88 {
        (load(to, 88) == 0).then_some(88)
    } else if len >= 64 {
        (load(to, 64) == 0).then_some(64)
    } else if len >= 42 {
        (load(to, 42) == 0).then_some(42)
    } else if len >= 34 {
        (load(to, 34) == 0).then_some(34)
    } else if len >= 14 {
        (load(to, 14) == 0).then_some(14)
    } else {
        None
    };
    if let Some(n) = n {
        // SAFETY: as in reserve.
        unsafe { (*ev).cap_len = n };
    }
}

/// A drop in a TC program: the frame as the program saw it when it gave up.
#[inline(always)]
pub fn drop_tc(ctx: &TcContext, hook: u8, code: u32, len: u32) {
    if listening(MONITOR_DROPS).is_none() {
        return;
    }
    // SAFETY: reading a field of the context the kernel gave us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let vni = if hook == HOOK_FROM_CONTAINER { iface_vni(ifindex) } else { 0 };
    let Some(mut entry) = reserve(EVENT_DROP, hook, code, ifindex, vni, len) else { return };
    let skb = ctx.skb.skb;
    capture(&mut entry, len, |to, n| {
        // SAFETY: plain helper call into the reserved event.
        unsafe { aya_ebpf::helpers::generated::bpf_skb_load_bytes(skb.cast(), 0, to.cast(), n) }
    });
    entry.submit(0);
}

/// A drop in the XDP program.
#[inline(always)]
pub fn drop_xdp(ctx: &XdpContext, hook: u8, code: u32, len: u32) {
    if listening(MONITOR_DROPS).is_none() {
        return;
    }
    // SAFETY: reading a field of the context the kernel gave us.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let Some(mut entry) = reserve(EVENT_DROP, hook, code, ifindex, 0, len) else { return };
    let md = ctx.ctx;
    capture(&mut entry, len, |to, n| {
        // SAFETY: plain helper call into the reserved event.
        unsafe { bpf_xdp_load_bytes(md, 0, to.cast(), n) }
    });
    entry.submit(0);
}

/// A packet a TC program forwards (counted under `code`), whose frame starts with the
/// Ethernet and IPv4 headers of the flow: an event if its flow is new to this monitor session.
/// `vni` is the flow's network, 0 to take it from the veth `target` it is delivered to.
#[inline(always)]
pub fn flow(ctx: &TcContext, hook: u8, code: u32, vni: u32, target: u32) {
    let Some(ctl) = listening(MONITOR_FLOWS) else { return };
    // Taken afresh: a helper the caller ran may have moved the frame.
    let pkt = packet(ctx);
    let Some(ip) = pkt.read::<Ipv4Hdr>(EthHdr::LEN) else { return };
    let vni = if vni == 0 { iface_vni(target) } else { vni };
    let mut key = FlowKey {
        vni,
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport: 0,
        dport: 0,
        proto: ip.proto,
        code: code as u8,
        _pad: 0,
    };
    let ports = ip.proto == IpProto::Tcp as u8 || ip.proto == IpProto::Udp as u8;
    if ports && ip.vihl == 0x45 && !is_fragment(&ip) {
        // TCP's header starts with the ports as UDP's does.
        if let Some(udp) = pkt.read::<UdpHdr>(EthHdr::LEN + Ipv4Hdr::LEN) {
            key.sport = u16::from_ne_bytes(udp.src);
            key.dport = u16::from_ne_bytes(udp.dst);
        }
    }
    // SAFETY: reading the session the monitor wrote.
    let session = unsafe { (*ctl).session };
    // SAFETY: copied out at once.
    if unsafe { FLOWS_SEEN.get(key) }.copied() == Some(session) {
        return;
    }
    let _ = FLOWS_SEEN.insert(key, session, 0);
    // SAFETY: reading a field of the context the kernel gave us.
    let hook_ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len();
    let Some(mut entry) = reserve(EVENT_FLOW, hook, code, hook_ifindex, vni, len) else { return };
    let skb = ctx.skb.skb;
    capture(&mut entry, len, |to, n| {
        // SAFETY: plain helper call into the reserved event.
        unsafe { aya_ebpf::helpers::generated::bpf_skb_load_bytes(skb.cast(), 0, to.cast(), n) }
    });
    entry.submit(0);
}
