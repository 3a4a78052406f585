//! The monitor's maps: a ring buffer of events (drops, and each forwarded flow's first packet)
//! that the programs write only while `overlay-agent monitor` listens, and the control entry
//! through which it says that it listens.
//!
//! Nothing is written while nobody listens: a drop costs one array lookup more (the control
//! entry's flags), a forwarded packet the same, and nothing else. The monitor sets the flags
//! with an expiry a few seconds ahead and renews it every second; the programs compare it with
//! `bpf_ktime_get_ns` (CLOCK_MONOTONIC) only once a flag is set. A monitor killed without a
//! chance to clear the flags (`kill -9`) thus stops the writes within [`MONITOR_LEASE_NS`].

use core::mem::{align_of, offset_of, size_of};

/// The ring buffer of [`MonitorEvent`]s (pinned beside the other maps).
pub const MAP_MONITOR: &str = "MONITOR";
/// The control entry, [`MonitorCtl`] at index 0 (pinned beside the other maps).
pub const MAP_MONITOR_CTL: &str = "MONITOR_CTL";

/// Bytes of the ring buffer: a power of two and a multiple of the page size, room for about
/// 5000 events between two reads of the monitor. Events that find it full are lost, and counted
/// (`stats::MONITOR_LOST`, which the monitor reports).
pub const MONITOR_RING_BYTES: u32 = 1 << 20;

/// `MonitorCtl::flags`: write an event for every dropped packet.
pub const MONITOR_DROPS: u32 = 1;
/// `MonitorCtl::flags`: write an event for the first packet of each flow the programs forward.
pub const MONITOR_FLOWS: u32 = 2;

/// How far ahead the monitor sets `MonitorCtl::expires_ns` each time it renews it (every
/// second): how long the programs go on writing after a monitor died without clearing it.
pub const MONITOR_LEASE_NS: u64 = 5_000_000_000;

/// Entries of the map of flows seen (an LRU hash): flows beyond it push out the least recently
/// seen, which then show again when they send again.
pub const MAX_FLOWS_SEEN: u32 = 65_536;

/// The single entry of `MONITOR_CTL`, written by the monitor; the programs only read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorCtl {
    /// `MONITOR_*` bits; 0 while nobody listens.
    pub flags: u32,
    /// The monitor's session: a flow seen in an earlier session is new to this one (the map of
    /// flows seen holds the session a flow was last reported in).
    pub session: u32,
    /// CLOCK_MONOTONIC nanoseconds after which the programs stop writing.
    pub expires_ns: u64,
    /// The listening monitor's process id, so that a second one can say who holds it.
    pub pid: u32,
    pub _pad: u32,
}

/// `MonitorEvent::kind`.
pub const EVENT_DROP: u8 = 1;
pub const EVENT_FLOW: u8 = 2;

/// `MonitorEvent::hook`: which program wrote the event.
pub const HOOK_FROM_CONTAINER: u8 = 1;
pub const HOOK_UPLINK_XDP: u8 = 2;
pub const HOOK_UPLINK_TC: u8 = 3;

/// Bytes of the packet's start an event carries: the headers of a VXLAN frame with IPv4
/// options inside and out (50 + 14 + 60 would be 124), and of any container frame.
pub const HEAD_LEN: usize = 128;

/// One event in the ring buffer. The programs copy the frame's first bytes as they are; the
/// monitor reads the 5-tuple (and for VXLAN the VNI and the outer addresses) from them, so the
/// programs parse nothing they do not already have.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonitorEvent {
    /// bpf_ktime_get_ns() when it was written.
    pub ts_ns: u64,
    /// `EVENT_*`.
    pub kind: u8,
    /// `HOOK_*`.
    pub hook: u8,
    pub _pad: u16,
    /// A drop's reason code, or the counter code a forwarded packet was counted under
    /// (`stats::TX_LOCAL`, `TX_ENCAP`, `TO_HOST`, `RX_DELIVER`).
    pub code: u32,
    /// The interface the program ran on (a container's host-side veth, or the uplink).
    pub ifindex: u32,
    /// The network, where the program knows it without parsing (the sender's veth, the
    /// receiver's); 0 otherwise (the monitor reads VXLAN's).
    pub vni: u32,
    /// The frame's length.
    pub len: u32,
    /// How many bytes of `head` hold the frame's start.
    pub cap_len: u32,
    pub head: [u8; HEAD_LEN],
}

/// Key of the map of flows seen: a flow is its network and 5-tuple, in the direction it was
/// forwarded, and the way it was forwarded (`code`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub vni: u32,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Network order, as on the wire (0 for a fragment, or a protocol without ports).
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub code: u8,
    pub _pad: u16,
}

const _: () = {
    assert!(size_of::<MonitorCtl>() == 24 && align_of::<MonitorCtl>() == 8);
    assert!(offset_of!(MonitorCtl, expires_ns) == 8);
    assert!(offset_of!(MonitorCtl, pid) == 16);
    assert!(size_of::<MonitorEvent>() == 32 + HEAD_LEN && align_of::<MonitorEvent>() == 8);
    assert!(offset_of!(MonitorEvent, code) == 12);
    assert!(offset_of!(MonitorEvent, cap_len) == 28);
    assert!(offset_of!(MonitorEvent, head) == 32);
    assert!(size_of::<FlowKey>() == 20);
    // The ring buffer's size must be a power of two and whole pages.
    assert!(MONITOR_RING_BYTES.is_power_of_two() && MONITOR_RING_BYTES.is_multiple_of(4096));
};

#[cfg(feature = "user")]
mod pod {
    use super::{FlowKey, MonitorCtl, MonitorEvent};
    // SAFETY: repr(C), Copy, padding spelled out; every bit pattern is a valid value.
    unsafe impl aya::Pod for MonitorCtl {}
    unsafe impl aya::Pod for MonitorEvent {}
    unsafe impl aya::Pod for FlowKey {}
}
