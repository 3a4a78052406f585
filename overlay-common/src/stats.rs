//! Counter codes: the index of each counter in the per-CPU `STATS` array.
//!
//! Codes below [`DROP_BASE`] count packets that went somewhere; codes from `DROP_BASE` on count
//! packets dropped, one code per reason. The same table names them for the agent's `stats`
//! command, so a reason has one number and one name everywhere.

/// Frames from a container encapsulated toward another host (direction: tx).
pub const TX_ENCAP: u32 = 0;
/// Frames from a container delivered to an endpoint on the same host.
pub const TX_LOCAL: u32 = 1;
/// ARP requests from containers answered from the endpoint map.
pub const ARP_REPLY: u32 = 2;
/// VXLAN frames decapsulated on the uplink (direction: rx).
pub const RX_DECAP: u32 = 3;
/// Decapsulated frames handed to a container's veth.
pub const RX_DELIVER: u32 = 4;
/// Uplink frames that are not VXLAN for this host, passed untouched to the host stack.
pub const UPLINK_PASS: u32 = 5;

pub const DROP_BASE: u32 = 16;
/// A frame on a veth the agent has not registered (it is being set up or torn down).
pub const DROP_UNKNOWN_IFACE: u32 = 16;
/// Source MAC or IPv4 that is not the sending endpoint's own.
pub const DROP_SPOOFED: u32 = 17;
/// An ethertype the overlay does not carry (it carries IPv4 and answers ARP).
pub const DROP_UNSUPPORTED: u32 = 18;
/// A frame from a container too short for the headers it claims.
pub const DROP_MALFORMED: u32 = 19;
/// No endpoint owns the destination on the sender's network (unknown, or on another network).
pub const DROP_NO_ENDPOINT: u32 = 20;
/// An ARP packet that is not a request we can answer.
pub const DROP_ARP: u32 = 21;
/// The agent has not configured this host yet.
pub const DROP_NO_CONFIG: u32 = 22;
/// The kernel refused to grow the frame for the VXLAN headers.
pub const DROP_ENCAP_FAILED: u32 = 23;
/// VXLAN from a source that is not a known peer VTEP.
pub const DROP_UNKNOWN_PEER: u32 = 24;
/// VXLAN with a VNI that no network on this host has.
pub const DROP_UNKNOWN_VNI: u32 = 25;
/// VXLAN header without the I flag.
pub const DROP_BAD_FLAGS: u32 = 26;
/// VXLAN frame that ends inside one of its headers.
pub const DROP_TRUNCATED: u32 = 27;
/// Outer IPv4 or UDP length that does not match the frame.
pub const DROP_BAD_LENGTH: u32 = 28;
/// A fragment of a VXLAN frame (VTEPs never fragment; RFC 7348 lets receivers discard them).
pub const DROP_FRAGMENT: u32 = 29;
/// VXLAN for this host whose outer IPv4 header checksum is wrong. (An outer header with
/// options is not taken for VXLAN at all: VTEPs never send one, and it goes to the host stack.)
pub const DROP_BAD_OUTER_IP: u32 = 30;
/// Inner frame that is not IPv4 (the overlay never sends anything else).
pub const DROP_INNER_NOT_IPV4: u32 = 31;
/// Inner source that the sending VTEP does not own.
pub const DROP_INNER_SPOOFED: u32 = 32;
/// Inner destination that is not an endpoint on this host.
pub const DROP_NOT_LOCAL: u32 = 33;
/// The kernel refused to shrink the frame or redirect it.
pub const DROP_DECAP_FAILED: u32 = 34;

/// Frame too large for the uplink once encapsulated (a container raised its MTU).
pub const DROP_TOO_BIG: u32 = 35;

/// Length of the `STATS` array (room for new codes without a layout change).
pub const STATS_LEN: u32 = 48;

/// Name of a counter code, as printed by the agent and used as a metric label.
pub const fn name(code: u32) -> Option<&'static str> {
    Some(match code {
        TX_ENCAP => "tx_encap",
        TX_LOCAL => "tx_local",
        ARP_REPLY => "arp_reply",
        RX_DECAP => "rx_decap",
        RX_DELIVER => "rx_deliver",
        UPLINK_PASS => "uplink_pass",
        DROP_UNKNOWN_IFACE => "unknown_iface",
        DROP_SPOOFED => "spoofed_source",
        DROP_UNSUPPORTED => "unsupported_ethertype",
        DROP_MALFORMED => "malformed",
        DROP_NO_ENDPOINT => "no_endpoint",
        DROP_ARP => "arp_unanswerable",
        DROP_NO_CONFIG => "no_config",
        DROP_ENCAP_FAILED => "encap_failed",
        DROP_UNKNOWN_PEER => "unknown_peer",
        DROP_UNKNOWN_VNI => "unknown_vni",
        DROP_BAD_FLAGS => "bad_vxlan_flags",
        DROP_TRUNCATED => "truncated",
        DROP_BAD_LENGTH => "bad_length",
        DROP_FRAGMENT => "outer_fragment",
        DROP_BAD_OUTER_IP => "bad_outer_ip",
        DROP_INNER_NOT_IPV4 => "inner_not_ipv4",
        DROP_INNER_SPOOFED => "inner_spoofed",
        DROP_NOT_LOCAL => "not_local",
        DROP_DECAP_FAILED => "decap_failed",
        DROP_TOO_BIG => "too_big",
        _ => return None,
    })
}

pub const fn is_drop(code: u32) -> bool {
    code >= DROP_BASE
}

/// Drops that say something is wrong with the host rather than with the packet (the kernel
/// refused to grow, shrink or redirect a frame; no configuration yet). The programs always log
/// these; other drops only when drop logging is on.
pub const fn is_fault(code: u32) -> bool {
    matches!(code, DROP_ENCAP_FAILED | DROP_DECAP_FAILED | DROP_NO_CONFIG)
}

const _: () = {
    assert!(DROP_TOO_BIG < STATS_LEN);
};
