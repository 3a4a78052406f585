//! The overlay's datapath. Three programs, all driven by the maps the agent fills:
//!
//! - `from_container` (TC ingress on the host side of every endpoint veth): the container's
//!   egress. ARP answers, DNS answers for names in the maps, local delivery, VXLAN
//!   encapsulation, anti-spoofing.
//! - `uplink_xdp` (XDP on the uplink): VXLAN validation, drops and decapsulation.
//! - `uplink_tc` (TC ingress on the uplink): delivery of decapsulated frames into containers,
//!   and the whole decapsulation where XDP could not do it.
//!
//! Each entry point is a thin wrapper that turns the result of its `try` function into a
//! verdict and counts drops with their reason, so no error is ever passed on silently.
#![no_std]
#![no_main]

mod arp;
mod csum;
mod decap;
mod dns;
mod encap;
mod from_container;
mod ipv4;
mod maps;
mod monitor;
mod packet;
mod pmtu;
mod skb;
mod stats;
mod uplink;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::{info, warn};
use overlay_common::{
    maps::CONFIG_DEBUG_DROPS,
    monitor::{HOOK_FROM_CONTAINER, HOOK_UPLINK_TC, HOOK_UPLINK_XDP},
    stats::DropReason,
};

use crate::stats::count;

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    match from_container::process(&ctx) {
        Ok(verdict) => verdict,
        Err(drop) => {
            tc_dropped(&ctx, HOOK_FROM_CONTAINER, drop);
            TC_ACT_SHOT
        }
    }
}

#[xdp]
pub fn uplink_xdp(ctx: XdpContext) -> u32 {
    match uplink::xdp(&ctx) {
        Ok(verdict) => verdict,
        Err(drop) => {
            let len = (ctx.data_end() - ctx.data()) as u32;
            dropped(&ctx, drop, len);
            monitor::drop_xdp(&ctx, HOOK_UPLINK_XDP, drop.code(), len);
            xdp_action::XDP_DROP
        }
    }
}

#[classifier]
pub fn uplink_tc(ctx: TcContext) -> i32 {
    match uplink::tc(&ctx) {
        Ok(verdict) => verdict,
        Err(drop) => {
            tc_dropped(&ctx, HOOK_UPLINK_TC, drop);
            TC_ACT_SHOT
        }
    }
}

/// Counts a drop by reason (the entry points then hand it to the monitor, monitor.rs, which
/// writes it only while one listens). The rare events (the kernel refused to grow, shrink or redirect a
/// frame; no configuration yet) are always logged: they mean something is wrong with the host,
/// not with the packet. Every other drop is logged only when the operator switched drop logging
/// on, so the fast path carries no log call by default.
/// Counts a TC program's drop of the frame in `ctx` and shows it to the monitor, at the
/// frame's length as it is now.
#[inline(always)]
pub(crate) fn tc_dropped(ctx: &TcContext, hook: u8, drop: DropReason) {
    let len = ctx.len();
    dropped(ctx, drop, len);
    monitor::drop_tc(ctx, hook, drop.code(), len);
}

#[inline(always)]
fn dropped<C: aya_ebpf::EbpfContext>(ctx: &C, drop: DropReason, len: u32) {
    // The programs log the code; the agent prints it as the reason's name (DropReason::name).
    count(drop.code(), len);
    if drop.is_fault() {
        warn!(ctx, "drop reason={} len={}", drop.code(), len);
    } else if let Some(cfg) = maps::CONFIG.get(0)
        && cfg.flags & CONFIG_DEBUG_DROPS != 0
    {
        // Info, not debug: these records exist only because the operator asked for them.
        info!(ctx, "drop reason={} len={}", drop.code(), len);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
