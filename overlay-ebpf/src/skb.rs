//! What the TC programs share: the packet view of an skb and delivery into a container.

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect_peer, programs::TcContext};

use overlay_common::stats::DropReason;

use crate::{packet::Packet, stats::count};

/// linux/if_packet.h: the frame is for this host.
pub const PACKET_HOST: u32 = 0;

/// Hands the frame to the container behind the host-side veth `ifindex`.
///
/// The frame was received on another device whose MAC it does not carry, so the stack marked
/// it PACKET_OTHERHOST; the container's IP layer would discard it as such. It is for that
/// container, so mark it PACKET_HOST first.
#[inline(always)]
pub fn deliver(ctx: &TcContext, ifindex: u32, counter: u32, failure: DropReason) -> Result<i32, DropReason> {
    let len = ctx.len();
    ctx.change_type(PACKET_HOST).map_err(|_| failure)?;
    // SAFETY: plain helper call.
    redirected(unsafe { bpf_redirect_peer(ifindex, 0) }, counter, len, failure)
}

/// Turns what a redirect helper returned into the program's verdict: on success count the
/// frame under `counter` and return TC_ACT_REDIRECT; otherwise it is dropped for `failure`.
#[inline(always)]
pub fn redirected(helper: i64, counter: u32, bytes: u32, failure: DropReason) -> Result<i32, DropReason> {
    if helper == i64::from(TC_ACT_REDIRECT) {
        count(counter, bytes);
        Ok(TC_ACT_REDIRECT)
    } else {
        Err(failure)
    }
}

#[inline(always)]
pub fn packet(ctx: &TcContext) -> Packet {
    Packet { start: ctx.data(), end: ctx.data_end() }
}

/// The packet, with its first `want` bytes (or all `len`, if fewer) in the linear part: pulled
/// only when they are not there already (headers in a paged fragment), `err` if that fails.
/// Pull no more than the path reads: pulling makes the skb's head the program's own.
#[inline(always)]
pub fn linear(ctx: &TcContext, want: u32, len: u32, err: DropReason) -> Result<Packet, DropReason> {
    let pkt = packet(ctx);
    let want = if len < want { len } else { want };
    if (pkt.len() as u32) >= want {
        return Ok(pkt);
    }
    ctx.pull_data(want).map_err(|_| err)?;
    Ok(packet(ctx))
}
