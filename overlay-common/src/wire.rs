//! On-the-wire headers.
//!
//! The headers themselves are network-types' (`EthHdr`, `Ipv4Hdr`, `UdpHdr`, `VxlanHdr`,
//! `ArpHdr`), re-exported here so the programs and the tests name them from one place. What
//! network-types lacks lives here: the numbers the overlay compares fields with (in host
//! order), the IPv4 header checksum, the whole VXLAN encapsulation as one struct with its
//! offsets, and the compile-time checks of every size and offset the datapath relies on.
//!
//! Alignment: every field is a byte array except `EthHdr::ether_type`, a `u16` holding the
//! bytes in network order, which gives `EthHdr` (and `VxlanEncap`) alignment 2. The programs
//! therefore copy headers in and out of the packet with unaligned reads and writes
//! (`overlay-ebpf`'s `Packet::read`/`write`) instead of taking references into it.

use core::mem::{align_of, offset_of, size_of};

pub use network_types::{
    arp::ArpHdr,
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
    udp::UdpHdr,
    vxlan::{VXLAN_I_FLAG_MASK, VxlanHdr},
};

/// Ethertypes in host order, as [`ether_type`] returns them (network-types' `EtherType` holds
/// them byte-swapped for comparing with the raw field).
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
/// VLAN tags: 802.1Q (C-tag) and 802.1ad (S-tag, QinQ).
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const ARP_HTYPE_ETHERNET: u16 = 1;
pub const ARP_OP_REQUEST: u16 = 1;
pub const ARP_OP_REPLY: u16 = 2;

/// IPv4 flags/fragment-offset field: "don't fragment", "more fragments" and the offset bits.
pub const IPV4_DF: u16 = 0x4000;
pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;

/// The ethertype of `eth`, in host order.
#[inline(always)]
pub fn ether_type(eth: &EthHdr) -> u16 {
    u16::from_be(eth.ether_type)
}

/// True for any IPv4 fragment: more-fragments set or a non-zero offset.
#[inline(always)]
pub fn is_fragment(ip: &Ipv4Hdr) -> bool {
    u16::from_be_bytes(ip.frags) & (IPV4_MF | IPV4_FRAG_OFFSET_MASK) != 0
}

/// The RFC 1071 checksum of an option-less IPv4 header as stored (its `check` field
/// included). A correct header sums to 0; to fill `check`, compute this over the header with
/// `check` zero. (Not network-types' `Ipv4Hdr::checksum`, which returns the stored field.)
#[inline(always)]
pub fn ipv4_header_sum(ip: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 bytes of byte arrays (alignment 1, no padding).
    let bytes: &[u8; Ipv4Hdr::LEN] =
        unsafe { &*core::ptr::from_ref::<Ipv4Hdr>(ip).cast::<[u8; Ipv4Hdr::LEN]>() };
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < Ipv4Hdr::LEN {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The ECN field: the low two bits of the IPv4 TOS byte (RFC 3168).
pub const ECN_MASK: u8 = 0b11;
/// Not ECN-Capable Transport: the sender does not understand congestion marks.
pub const ECN_NOT_ECT: u8 = 0b00;
/// Congestion Experienced.
pub const ECN_CE: u8 = 0b11;

/// Marks `ip` Congestion Experienced and updates its header checksum incrementally (RFC 1624:
/// HC' = ~(~HC + ~m + m'), m the 16-bit word holding the TOS byte).
#[inline(always)]
pub fn set_ce(ip: &mut Ipv4Hdr) {
    let old = u16::from_be_bytes([ip.vihl, ip.tos]);
    ip.tos |= ECN_CE;
    let new = u16::from_be_bytes([ip.vihl, ip.tos]);
    let mut sum = u32::from(!u16::from_be_bytes(ip.check)) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip.check = (!(sum as u16)).to_be_bytes();
}

/// True when `arp` is an Ethernet/IPv4 ARP packet with the standard address lengths, the only
/// kind a container sends us (RFC 826).
#[inline(always)]
pub fn is_ethernet_ipv4(arp: &ArpHdr) -> bool {
    arp.htype() == ARP_HTYPE_ETHERNET && arp.ptype() == ETH_P_IP && arp.hlen == 6 && arp.plen == 4
}

/// Everything VXLAN puts in front of the inner IPv4 header, as the encapsulating program writes
/// it in one store: outer Ethernet, outer IPv4, UDP, VXLAN and the inner Ethernet header.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VxlanEncap {
    pub outer_eth: EthHdr,
    pub outer_ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub vxlan: VxlanHdr,
    pub inner_eth: EthHdr,
}

impl VxlanEncap {
    pub const LEN: usize = size_of::<Self>();
}

/// Offsets of the VXLAN headers in an encapsulated frame with a 20-byte outer IPv4 header.
pub const OUTER_IP_OFF: usize = EthHdr::LEN;
pub const OUTER_UDP_OFF: usize = OUTER_IP_OFF + Ipv4Hdr::LEN;
pub const VXLAN_OFF: usize = OUTER_UDP_OFF + UdpHdr::LEN;
pub const INNER_ETH_OFF: usize = VXLAN_OFF + VxlanHdr::LEN;
pub const INNER_IP_OFF: usize = INNER_ETH_OFF + EthHdr::LEN;

const _: () = {
    // The sizes of the standards; a release of network-types that changed one fails here.
    assert!(EthHdr::LEN == 14);
    assert!(Ipv4Hdr::LEN == 20);
    assert!(UdpHdr::LEN == 8);
    assert!(VxlanHdr::LEN == 8);
    assert!(ArpHdr::LEN == 28);
    // Field offsets the programs read and write by name.
    assert!(offset_of!(EthHdr, src_addr) == 6 && offset_of!(EthHdr, ether_type) == 12);
    assert!(offset_of!(Ipv4Hdr, tos) == 1 && offset_of!(Ipv4Hdr, tot_len) == 2);
    assert!(offset_of!(Ipv4Hdr, frags) == 6 && offset_of!(Ipv4Hdr, proto) == 9);
    assert!(offset_of!(Ipv4Hdr, check) == 10);
    assert!(offset_of!(Ipv4Hdr, src_addr) == 12 && offset_of!(Ipv4Hdr, dst_addr) == 16);
    assert!(offset_of!(UdpHdr, dst) == 2 && offset_of!(UdpHdr, len) == 4);
    assert!(offset_of!(VxlanHdr, vni) == 4);
    assert!(offset_of!(ArpHdr, oper) == 6 && offset_of!(ArpHdr, sha) == 8);
    assert!(offset_of!(ArpHdr, spa) == 14 && offset_of!(ArpHdr, tha) == 18);
    assert!(offset_of!(ArpHdr, tpa) == 24);
    // The encapsulation is the headers back to back, with no padding between them.
    assert!(VxlanEncap::LEN == 64);
    assert!(offset_of!(VxlanEncap, outer_ip) == OUTER_IP_OFF);
    assert!(offset_of!(VxlanEncap, udp) == OUTER_UDP_OFF);
    assert!(offset_of!(VxlanEncap, vxlan) == VXLAN_OFF);
    assert!(offset_of!(VxlanEncap, inner_eth) == INNER_ETH_OFF);
    assert!(INNER_IP_OFF == 64);
    // What the encapsulation adds in front of the inner IPv4 header, minus the inner Ethernet
    // header that was already there, is the overhead the MTU accounts for.
    assert!(INNER_IP_OFF - EthHdr::LEN == crate::VXLAN_OVERHEAD as usize);
    // Only EthHdr's u16 raises an alignment above 1 (see the module comment).
    assert!(align_of::<EthHdr>() == 2 && align_of::<VxlanEncap>() == 2);
    assert!(align_of::<Ipv4Hdr>() == 1 && align_of::<UdpHdr>() == 1);
    assert!(align_of::<VxlanHdr>() == 1 && align_of::<ArpHdr>() == 1);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-known header (Wikipedia, "IPv4 header checksum"): checksum 0xb861.
    const HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0,
        0xa8, 0x00, 0xc7,
    ];

    fn header() -> Ipv4Hdr {
        // SAFETY: Ipv4Hdr is 20 bytes of byte arrays; any pattern is a valid value.
        unsafe { core::ptr::read_unaligned(HEADER.as_ptr().cast::<Ipv4Hdr>()) }
    }

    #[test]
    fn ipv4_header_sum_checks_and_fills() {
        let mut ip = header();
        assert_eq!(ipv4_header_sum(&ip), 0, "a correct header sums to 0");
        ip.check = [0; 2];
        assert_eq!(ipv4_header_sum(&ip), 0xb861);
        ip.check = [0xb8, 0x60];
        assert_ne!(ipv4_header_sum(&ip), 0);
    }

    #[test]
    fn set_ce_keeps_the_checksum_right() {
        for tos in [0x00, 0x01, 0x02, 0xb8, 0xba, 0xff] {
            let mut ip = header();
            ip.tos = tos;
            ip.check = [0; 2];
            ip.check = ipv4_header_sum(&ip).to_be_bytes();
            set_ce(&mut ip);
            assert_eq!(ip.tos, tos | ECN_CE, "tos {tos:#x}");
            assert_eq!(ipv4_header_sum(&ip), 0, "incremental update of tos {tos:#x}");
        }
    }

    #[test]
    fn fields_in_host_order() {
        let ip = header();
        assert!(!is_fragment(&ip), "DF alone is not a fragment");
        let mut first = ip;
        first.frags = IPV4_MF.to_be_bytes();
        assert!(is_fragment(&first));
        let mut later = ip;
        later.frags = 0x00b9u16.to_be_bytes();
        assert!(is_fragment(&later));

        let eth = EthHdr::new([1; 6], [2; 6], EtherType::Arp);
        assert_eq!(ether_type(&eth), ETH_P_ARP);
        assert_eq!(VxlanHdr::new(0x12_3456).vni, [0x12, 0x34, 0x56]);
    }
}
