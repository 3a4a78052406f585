//! On-the-wire header layouts.
//!
//! Every multi-byte field is a byte array in network order, so each struct has alignment 1
//! and can be read at any packet offset without an unaligned reference.

use core::mem::size_of;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_ICMP: u8 = 1;

pub const ARP_HTYPE_ETHERNET: u16 = 1;
pub const ARP_OP_REQUEST: u16 = 1;
pub const ARP_OP_REPLY: u16 = 2;

/// The VXLAN "I" flag: the VNI field is valid (RFC 7348 section 5).
pub const VXLAN_FLAG_I: u8 = 0x08;

/// IPv4 flags/fragment-offset field: "don't fragment" and the fragment bits.
pub const IPV4_DF: u16 = 0x4000;
pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

impl EthHdr {
    pub const LEN: usize = size_of::<Self>();

    #[inline(always)]
    pub fn ether_type(&self) -> u16 {
        u16::from_be_bytes(self.ether_type)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Hdr {
    pub const LEN: usize = size_of::<Self>();

    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.version_ihl >> 4
    }

    /// Header length in bytes.
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }

    #[inline(always)]
    pub fn tot_len(&self) -> u16 {
        u16::from_be_bytes(self.tot_len)
    }

    #[inline(always)]
    pub fn frag_off(&self) -> u16 {
        u16::from_be_bytes(self.frag_off)
    }

    /// True for any fragment: more-fragments set or a non-zero offset.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.frag_off() & (IPV4_MF | IPV4_FRAG_OFFSET_MASK) != 0
    }

    /// The RFC 1071 checksum of this header as stored (the `check` field included).
    /// A correct header sums to 0; fill `check` with this value computed over a header whose
    /// `check` is zero.
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        // SAFETY: Ipv4Hdr is 20 bytes of plain data with alignment 1.
        let bytes: &[u8; 20] = unsafe { &*(self as *const Self as *const [u8; 20]) };
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < 20 {
            sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
            i += 2;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

impl UdpHdr {
    pub const LEN: usize = size_of::<Self>();

    #[inline(always)]
    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes(self.dst_port)
    }

    /// The UDP length field (header and payload).
    #[inline(always)]
    pub fn length(&self) -> u16 {
        u16::from_be_bytes(self.len)
    }
}

/// VXLAN header (RFC 7348): 8 bits of flags, 24 reserved, 24 bits of VNI, 8 reserved.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanHdr {
    pub flags: u8,
    pub reserved1: [u8; 3],
    pub vni: [u8; 3],
    pub reserved2: u8,
}

impl VxlanHdr {
    pub const LEN: usize = size_of::<Self>();

    #[inline(always)]
    pub fn new(vni: u32) -> Self {
        let b = vni.to_be_bytes();
        Self { flags: VXLAN_FLAG_I, reserved1: [0; 3], vni: [b[1], b[2], b[3]], reserved2: 0 }
    }

    #[inline(always)]
    pub fn vni(&self) -> u32 {
        u32::from_be_bytes([0, self.vni[0], self.vni[1], self.vni[2]])
    }
}

/// An ARP packet for Ethernet/IPv4 (RFC 826), the only kind a container sends us.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpHdr {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub op: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

impl ArpHdr {
    pub const LEN: usize = size_of::<Self>();

    #[inline(always)]
    pub fn op(&self) -> u16 {
        u16::from_be_bytes(self.op)
    }

    /// True when this is an Ethernet/IPv4 ARP packet with the standard address lengths.
    #[inline(always)]
    pub fn is_ethernet_ipv4(&self) -> bool {
        u16::from_be_bytes(self.htype) == ARP_HTYPE_ETHERNET
            && u16::from_be_bytes(self.ptype) == ETH_P_IP
            && self.hlen == 6
            && self.plen == 4
    }
}

/// Everything VXLAN puts in front of the inner IPv4 header, as the encapsulating program writes
/// it in one store: outer Ethernet, outer IPv4, UDP, VXLAN and the inner Ethernet header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    assert!(EthHdr::LEN == 14);
    assert!(Ipv4Hdr::LEN == 20);
    assert!(UdpHdr::LEN == 8);
    assert!(VxlanHdr::LEN == 8);
    assert!(ArpHdr::LEN == 28);
    assert!(VxlanEncap::LEN == 64);
    assert!(INNER_IP_OFF == 64);
    // What the encapsulation adds in front of the inner IPv4 header, minus the inner Ethernet
    // header that was already there, is the overhead the MTU accounts for.
    assert!(INNER_IP_OFF - EthHdr::LEN == crate::VXLAN_OVERHEAD as usize);
    assert!(core::mem::align_of::<VxlanEncap>() == 1);
    assert!(core::mem::align_of::<ArpHdr>() == 1);
};
