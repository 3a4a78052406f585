//! Counter codes: the index of each counter in the per-CPU `STATS` array.
//!
//! Codes below [`DROP_BASE`] count packets that went somewhere; codes from `DROP_BASE` on count
//! packets dropped, one [`DropReason`] each. [`name`] names every code for the agent's `stats`
//! command, its logs and metric labels, so a reason has one number and one name everywhere.

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
/// DNS queries from containers answered from the `NAMES` map (see `dns`).
pub const DNS_ANSWER: u32 = 6;
/// DNS queries from containers handed to the agent's resolver through the host's stack: names
/// the map cannot answer, other types, DNS over TCP (see `Network::flags`).
pub const TO_RESOLVER: u32 = 7;
/// Packets from containers to addresses outside their network, handed to the host's stack to
/// be routed and masqueraded out (see `NETWORK_EGRESS`). Replies come back through the host's
/// stack, which delivers them to the veth itself: no program counts them.
pub const TO_HOST: u32 = 8;
/// Events for `overlay-agent monitor` that found its ring buffer full and were lost (the
/// packets themselves went on as ever).
pub const MONITOR_LOST: u32 = 9;
/// ICMP "fragmentation needed" sent back to containers for packets too big for the overlay
/// that said Don't Fragment (each also counted as a `too_big` drop).
pub const FRAG_NEEDED: u32 = 10;

/// The first code of a drop reason: codes from here to [`STATS_LEN`] belong to [`DropReason`].
pub const DROP_BASE: u32 = 16;

/// Why a packet was dropped. The discriminant is the reason's counter code in `STATS` (pinned
/// maps outlive an upgrade of the agent, so a reason keeps its number for good), and
/// [`DropReason::name`] is the one table of names: the agent's `stats` table and JSON, its drop
/// log lines and metric labels all print these.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// A frame on a veth the agent has not registered (it is being set up or torn down).
    UnknownIface = 16,
    /// Source MAC or IPv4 that is not the sending endpoint's own.
    Spoofed = 17,
    /// An ethertype the overlay does not carry (it carries IPv4 and answers ARP).
    Unsupported = 18,
    /// A frame from a container too short for the headers it claims, or an IPv4 packet whose
    /// headers do not describe it (as for `InnerMalformed`).
    Malformed = 19,
    /// No endpoint owns the destination on the sender's network (unknown, or on another network).
    NoEndpoint = 20,
    /// An ARP request for an address nobody on the sender's network owns (nor its gateway), or
    /// an ARP packet that is not Ethernet/IPv4.
    Arp = 21,
    /// The agent has not configured this host yet.
    NoConfig = 22,
    /// The kernel refused to grow the frame for the VXLAN headers.
    EncapFailed = 23,
    /// VXLAN from a source that is not a known peer VTEP.
    UnknownPeer = 24,
    /// VXLAN with a VNI that no network on this host has.
    UnknownVni = 25,
    /// VXLAN header without the I flag, or with a reserved bit set (as Linux's vxlan, which
    /// takes them for extensions it was not told to expect: GBP, GPE).
    BadFlags = 26,
    /// VXLAN frame that ends inside one of its headers.
    Truncated = 27,
    /// Outer IPv4 or UDP length that does not match the frame.
    BadLength = 28,
    /// A fragment of a VXLAN frame (VTEPs never fragment; RFC 7348 lets receivers discard them).
    Fragment = 29,
    /// VXLAN for this host whose outer IPv4 header checksum is wrong. (An outer header with
    /// options is not taken for VXLAN at all: VTEPs never send one, and it goes to the host stack.)
    BadOuterIp = 30,
    /// Inner frame that is not IPv4 (the overlay never sends anything else).
    InnerNotIpv4 = 31,
    /// Inner source that the sending VTEP does not own.
    InnerSpoofed = 32,
    /// Inner destination that is not an endpoint on this host.
    NotLocal = 33,
    /// The kernel refused to shrink the frame or redirect it.
    DecapFailed = 34,
    /// Frame too large for the uplink once encapsulated (a container raised its MTU).
    TooBig = 35,
    /// An RFC 5227 probe (sender address 0.0.0.0) or announcement (a request for the sender's
    /// own address): duplicate-address detection, which has nobody to ask, since the overlay's
    /// addresses come from its IPAM.
    ArpProbe = 36,
    /// An ARP reply (or another operation) from a container with its own addresses: nobody asked
    /// it, since the responder answers every request. One claiming another address is spoofed.
    ArpNotRequest = 37,
    /// A broadcast from 0.0.0.0 over UDP: a DHCP client. The overlay's addresses come from its
    /// IPAM; there is no DHCP server to reach.
    Dhcp = 38,
    /// VXLAN whose outer header says Congestion Experienced around an inner packet that is not
    /// ECN-capable: the mark cannot reach its receiver, so the congestion is signalled the only
    /// way left, by dropping it (RFC 6040 section 4.2, as Linux's vxlan does).
    CongestedNotEct = 39,
    /// VXLAN for this host with outer IPv4 options. VTEPs never send them, and the host's stack,
    /// which has no socket on the VXLAN port, would answer a forged source with an ICMP error.
    OuterOptions = 40,
    /// VXLAN for this host sent to a broadcast or multicast MAC rather than the uplink's.
    BadOuterMac = 41,
    /// An inner IPv4 packet whose headers do not describe it: a header length under 20 bytes, a
    /// total length other than what the frame carries, or (unfragmented) a TCP, UDP or ICMP
    /// header cut short, a TCP data offset or UDP length past the packet.
    InnerMalformed = 42,
    /// A frame with an 802.1Q tag, which the kernel carries beside the frame (`vlan_tci`): from
    /// a container it would leave on the underlay with the container's VLAN and priority; on
    /// VXLAN for this host it would ride into the container.
    VlanTagged = 43,
    /// A DNS query to the gateway's port 53 that ends inside its header or its question.
    DnsTruncated = 44,
    /// A DNS response (QR set) sent to the gateway's port 53: nobody there asked a question.
    DnsNotQuery = 45,
    /// A DNS query whose counts no query has: not exactly one question, or answer or authority
    /// records.
    DnsBadCounts = 46,
    /// A query name with a label over 63 bytes or of a reserved label type (RFC 6891 section 5).
    DnsBadLabel = 47,
    /// A query name longer than DNS allows (255 bytes in wire format).
    DnsNameTooLong = 48,
    /// A compression pointer in the question (a lone question has nothing to point back to;
    /// pointers are how lookup loops are made).
    DnsCompression = 49,
    /// The kernel refused to resize a DNS query into its answer or to write it, or to hand a
    /// query on to the host stack for the resolver.
    DnsAnswerFailed = 50,
    /// A packet from a container to an address outside its network, on a network with no way
    /// out on this host: `--internal`, without a gateway, or before the host's egress path is
    /// in place. (Broadcast, multicast and the host-local ranges never leave: `no_endpoint`.)
    NoEgress = 51,
    /// Plaintext VXLAN claiming the VNI of an encrypted network: an encrypted network's frames
    /// cross the underlay only protected, so this one was forged or sent by a host that would
    /// not encrypt (docs/encryption.md).
    PlaintextEncrypted = 52,
    /// A frame of an encrypted network for another host, on a host with no cipher path: it is
    /// dropped rather than sent in the clear (fail closed; docs/encryption.md says what the
    /// kernel lacks).
    NoCipher = 53,
}

impl DropReason {
    /// Every reason, in code order.
    pub const ALL: [Self; 38] = [
        Self::UnknownIface,
        Self::Spoofed,
        Self::Unsupported,
        Self::Malformed,
        Self::NoEndpoint,
        Self::Arp,
        Self::NoConfig,
        Self::EncapFailed,
        Self::UnknownPeer,
        Self::UnknownVni,
        Self::BadFlags,
        Self::Truncated,
        Self::BadLength,
        Self::Fragment,
        Self::BadOuterIp,
        Self::InnerNotIpv4,
        Self::InnerSpoofed,
        Self::NotLocal,
        Self::DecapFailed,
        Self::TooBig,
        Self::ArpProbe,
        Self::ArpNotRequest,
        Self::Dhcp,
        Self::CongestedNotEct,
        Self::OuterOptions,
        Self::BadOuterMac,
        Self::InnerMalformed,
        Self::VlanTagged,
        Self::DnsTruncated,
        Self::DnsNotQuery,
        Self::DnsBadCounts,
        Self::DnsBadLabel,
        Self::DnsNameTooLong,
        Self::DnsCompression,
        Self::DnsAnswerFailed,
        Self::NoEgress,
        Self::PlaintextEncrypted,
        Self::NoCipher,
    ];

    /// The reason's counter code: its index in `STATS`.
    #[inline(always)]
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The reason counted under `code`, if any.
    pub const fn from_code(code: u32) -> Option<Self> {
        if code < DROP_BASE {
            return None;
        }
        let i = (code - DROP_BASE) as usize;
        if i < Self::ALL.len() { Some(Self::ALL[i]) } else { None }
    }

    /// The reason's name, as printed by the agent and used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Self::UnknownIface => "unknown_iface",
            Self::Spoofed => "spoofed_source",
            Self::Unsupported => "unsupported_ethertype",
            Self::Malformed => "malformed",
            Self::NoEndpoint => "no_endpoint",
            Self::Arp => "arp_unanswerable",
            Self::NoConfig => "no_config",
            Self::EncapFailed => "encap_failed",
            Self::UnknownPeer => "unknown_peer",
            Self::UnknownVni => "unknown_vni",
            Self::BadFlags => "bad_vxlan_flags",
            Self::Truncated => "truncated",
            Self::BadLength => "bad_length",
            Self::Fragment => "outer_fragment",
            Self::BadOuterIp => "bad_outer_ip",
            Self::InnerNotIpv4 => "inner_not_ipv4",
            Self::InnerSpoofed => "inner_spoofed",
            Self::NotLocal => "not_local",
            Self::DecapFailed => "decap_failed",
            Self::TooBig => "too_big",
            Self::ArpProbe => "arp_probe",
            Self::ArpNotRequest => "arp_not_request",
            Self::Dhcp => "dhcp",
            Self::CongestedNotEct => "ce_not_ect",
            Self::OuterOptions => "outer_options",
            Self::BadOuterMac => "bad_outer_mac",
            Self::InnerMalformed => "inner_malformed",
            Self::VlanTagged => "vlan_tagged",
            Self::DnsTruncated => "dns_truncated",
            Self::DnsNotQuery => "dns_not_query",
            Self::DnsBadCounts => "dns_bad_counts",
            Self::DnsBadLabel => "dns_bad_label",
            Self::DnsNameTooLong => "dns_name_too_long",
            Self::DnsCompression => "dns_compression",
            Self::DnsAnswerFailed => "dns_answer_failed",
            Self::NoEgress => "no_egress",
            Self::PlaintextEncrypted => "plaintext_encrypted",
            Self::NoCipher => "no_cipher",
        }
    }

    /// Drops that say something is wrong with the host rather than with the packet (the kernel
    /// refused to grow, shrink or redirect a frame; no configuration yet). The programs always
    /// log these; other drops only when drop logging is on.
    #[inline(always)]
    pub const fn is_fault(self) -> bool {
        matches!(self, Self::EncapFailed | Self::DecapFailed | Self::NoConfig | Self::DnsAnswerFailed)
    }
}

impl From<DropReason> for u32 {
    fn from(reason: DropReason) -> Self {
        reason.code()
    }
}

/// Length of the `STATS` array (room for new codes without a layout change; the agent refuses
/// a pinned `STATS` of another length, see `check_pinned`).
pub const STATS_LEN: u32 = 64;

/// Name of a counter code, as printed by the agent and used as a metric label: the packets that
/// went somewhere by the table below, drops by [`DropReason::name`].
pub const fn name(code: u32) -> Option<&'static str> {
    Some(match code {
        TX_ENCAP => "tx_encap",
        TX_LOCAL => "tx_local",
        ARP_REPLY => "arp_reply",
        RX_DECAP => "rx_decap",
        RX_DELIVER => "rx_deliver",
        UPLINK_PASS => "uplink_pass",
        DNS_ANSWER => "dns_answer",
        TO_RESOLVER => "to_resolver",
        TO_HOST => "to_host",
        MONITOR_LOST => "monitor_lost",
        FRAG_NEEDED => "frag_needed",
        _ => match DropReason::from_code(code) {
            Some(reason) => reason.name(),
            None => return None,
        },
    })
}

pub const fn is_drop(code: u32) -> bool {
    code >= DROP_BASE
}

const _: () = {
    // ALL lists every reason once, in code order from DROP_BASE, so from_code inverts code, and
    // every code fits in STATS.
    let mut i = 0;
    while i < DropReason::ALL.len() {
        assert!(DropReason::ALL[i].code() == DROP_BASE + i as u32);
        i += 1;
    }
    assert!(DropReason::NoCipher.code() < STATS_LEN);
    assert!(DNS_ANSWER < DROP_BASE);
};

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn codes_and_names_are_one_table() {
        let mut names = BTreeSet::new();
        for reason in DropReason::ALL {
            assert_eq!(DropReason::from_code(reason.code()), Some(reason));
            assert_eq!(name(reason.code()), Some(reason.name()));
            assert!(is_drop(reason.code()));
            assert!(names.insert(reason.name()), "{} named twice", reason.name());
        }
        for code in [
            TX_ENCAP,
            TX_LOCAL,
            ARP_REPLY,
            RX_DECAP,
            RX_DELIVER,
            UPLINK_PASS,
            DNS_ANSWER,
            TO_RESOLVER,
            TO_HOST,
            MONITOR_LOST,
        ] {
            assert!(!is_drop(code));
            assert!(names.insert(name(code).expect("named")));
        }
        assert_eq!(DropReason::from_code(DROP_BASE - 1), None);
        assert_eq!(DropReason::from_code(DropReason::NoCipher.code() + 1), None);
        assert_eq!(name(STATS_LEN - 1), None);
    }
}
