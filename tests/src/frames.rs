//! Frames built byte by byte for the packet tests, with the wire structs of overlay-common.
//!
//! Nothing here calls datapath code: lengths and checksums are computed from first principles
//! (RFC 791, RFC 768, RFC 793, RFC 1071, RFC 7348), so a test that compares what a program
//! produced with what is built here checks the program against the standards, not against
//! itself.

use std::mem::size_of;

use overlay_common::wire::{
    ArpHdr, ETH_P_IP, EthHdr, IPV4_DF, Ipv4Hdr, OUTER_IP_OFF, OUTER_UDP_OFF, UdpHdr, VxlanEncap, VxlanHdr,
};

pub type Mac = [u8; 6];
pub type Ip = [u8; 4];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETH_P_IPV6: u16 = 0x86dd;

/// IP protocol numbers (IANA), as the tests write them into headers.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The on-wire header structs (network-types'): `#[repr(C)]`, byte arrays and one `u16`
/// (`EthHdr::ether_type`, network order), no padding, so every byte pattern is a valid value and
/// their bytes are exactly the header's bytes.
pub trait Header: Copy {}
impl Header for EthHdr {}
impl Header for Ipv4Hdr {}
impl Header for UdpHdr {}
impl Header for VxlanHdr {}
impl Header for ArpHdr {}
impl Header for VxlanEncap {}

/// The bytes of a header.
pub fn bytes_of<T: Header>(h: &T) -> &[u8] {
    // SAFETY: `Header` types are plain byte arrays with no padding (see the trait).
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref::<T>(h).cast::<u8>(), size_of::<T>()) }
}

/// The header of type `T` at `off` in `frame`.
pub fn read<T: Header>(frame: &[u8], off: usize) -> T {
    let b = &frame[off..off + size_of::<T>()];
    // SAFETY: bounds-checked by the slice above; any byte pattern is a valid `T`, and
    // read_unaligned makes no alignment assumption.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
}

/// Changes the header of type `T` at `off` in `frame` in place.
pub fn edit<T: Header>(frame: &mut [u8], off: usize, f: impl FnOnce(&mut T)) {
    let mut h: T = read(frame, off);
    f(&mut h);
    frame[off..off + size_of::<T>()].copy_from_slice(bytes_of(&h));
}

/// The RFC 1071 Internet checksum of `data` with `initial` (a partial one's-complement sum,
/// e.g. of a pseudo-header) folded in: the value to store in a checksum field that was zero
/// while summing.
pub fn internet_checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = u64::from(initial);
    for chunk in data.chunks(2) {
        // An odd trailing byte is summed as if followed by a zero byte.
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u64::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether an IPv4 header (with its checksum field) sums to zero, i.e. its checksum is valid.
pub fn ipv4_checksum_ok(header: &[u8]) -> bool {
    internet_checksum(0, header) == 0
}

/// Recomputes the checksum of the IPv4 header at `off` after a test changed one of its fields.
pub fn reseal_ipv4(frame: &mut [u8], off: usize) {
    edit::<Ipv4Hdr>(frame, off, |ip| ip.check = [0; 2]);
    let ihl = usize::from(frame[off] & 0x0f) * 4;
    let check = internet_checksum(0, &frame[off..off + ihl]);
    edit::<Ipv4Hdr>(frame, off, |ip| ip.check = check.to_be_bytes());
}

/// The one's-complement sum of the IPv4 pseudo-header TCP and UDP checksums cover.
fn pseudo_header_sum(src: Ip, dst: Ip, protocol: u8, len: usize) -> u32 {
    let words = [
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([dst[0], dst[1]]),
        u16::from_be_bytes([dst[2], dst[3]]),
        u16::from(protocol),
        len as u16,
    ];
    words.iter().map(|w| u32::from(*w)).sum()
}

pub fn ethernet(dst: Mac, src: Mac, ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let eth = EthHdr { dst_addr: dst, src_addr: src, ether_type: ether_type.to_be() };
    [bytes_of(&eth), payload].concat()
}

/// The fields of an IPv4 header a test chooses; lengths and checksum are computed.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4 {
    pub src: Ip,
    pub dst: Ip,
    pub protocol: u8,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset.
    pub frag_off: u16,
    pub ttl: u8,
}

impl Ipv4 {
    /// What a Linux host sends by default: DF set (path MTU discovery), TTL 64.
    pub fn new(src: Ip, dst: Ip, protocol: u8) -> Self {
        Self { src, dst, protocol, tos: 0, id: 0x1c46, frag_off: IPV4_DF, ttl: 64 }
    }

    pub fn tos(self, tos: u8) -> Self {
        Self { tos, ..self }
    }

    /// The header for `payload_len` bytes of payload, checksum filled in.
    pub fn header(&self, payload_len: usize) -> Ipv4Hdr {
        let mut h = Ipv4Hdr {
            vihl: 0x45,
            tos: self.tos,
            tot_len: ((Ipv4Hdr::LEN + payload_len) as u16).to_be_bytes(),
            id: self.id.to_be_bytes(),
            frags: self.frag_off.to_be_bytes(),
            ttl: self.ttl,
            proto: self.protocol,
            check: [0; 2],
            src_addr: self.src,
            dst_addr: self.dst,
        };
        h.check = internet_checksum(0, bytes_of(&h)).to_be_bytes();
        h
    }

    /// The packet: header and payload.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        [bytes_of(&self.header(payload.len())), payload].concat()
    }
}

/// A UDP datagram (header and payload) with its RFC 768 checksum.
pub fn udp(src: Ip, dst: Ip, src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let len = UdpHdr::LEN + payload.len();
    let mut h = UdpHdr {
        src: src_port.to_be_bytes(),
        dst: dst_port.to_be_bytes(),
        len: (len as u16).to_be_bytes(),
        check: [0; 2],
    };
    let mut dgram = [bytes_of(&h), payload].concat();
    let check = internet_checksum(pseudo_header_sum(src, dst, IPPROTO_UDP, len), &dgram);
    // A computed zero is sent as all ones (zero means "no checksum").
    h.check = if check == 0 { 0xffff } else { check }.to_be_bytes();
    dgram[..UdpHdr::LEN].copy_from_slice(bytes_of(&h));
    dgram
}

/// A TCP segment (20-byte header, ACK|PSH, and payload) with its checksum.
pub fn tcp(src: Ip, dst: Ip, src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&src_port.to_be_bytes());
    seg.extend_from_slice(&dst_port.to_be_bytes());
    seg.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // sequence number
    seg.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes()); // acknowledgment number
    seg.push(5 << 4); // data offset: 5 words, no options
    seg.push(0x18); // ACK | PSH
    seg.extend_from_slice(&64240u16.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0]); // checksum, filled below
    seg.extend_from_slice(&[0, 0]); // urgent pointer
    seg.extend_from_slice(payload);
    let check = internet_checksum(pseudo_header_sum(src, dst, IPPROTO_TCP, seg.len()), &seg);
    seg[16..18].copy_from_slice(&check.to_be_bytes());
    seg
}

/// An ICMP echo request with its checksum.
pub fn icmp_echo(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut msg = vec![8, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(payload);
    let check = internet_checksum(0, &msg);
    msg[2..4].copy_from_slice(&check.to_be_bytes());
    msg
}

/// `n` bytes of recognisable payload (a counting pattern, so a shifted copy shows).
pub fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// An Ethernet/IPv4 ARP packet (RFC 826), without the Ethernet header.
pub fn arp(op: u16, sha: Mac, spa: Ip, tha: Mac, tpa: Ip) -> Vec<u8> {
    let a = ArpHdr {
        htype: 1u16.to_be_bytes(),
        ptype: ETH_P_IP.to_be_bytes(),
        hlen: 6,
        plen: 4,
        oper: op.to_be_bytes(),
        sha,
        spa,
        tha,
        tpa,
    };
    bytes_of(&a).to_vec()
}

/// A minimal IPv6 UDP packet (fixed header, UDP header, `payload`), enough for a program to see
/// its ethertype, version and ports. The UDP checksum is left zero: nothing here verifies it.
pub fn ipv6_udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let udp = UdpHdr {
        src: src_port.to_be_bytes(),
        dst: dst_port.to_be_bytes(),
        len: ((UdpHdr::LEN + payload.len()) as u16).to_be_bytes(),
        check: [0; 2],
    };
    ipv6(IPPROTO_UDP, &[bytes_of(&udp), payload].concat())
}

fn ipv6(next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(next_header);
    p.push(64); // hop limit
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(payload);
    p
}

/// The outer side of a VXLAN frame as a remote VTEP sends it.
#[derive(Clone, Copy, Debug)]
pub struct Tunnel {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src_vtep: Ip,
    pub dst_vtep: Ip,
    pub src_port: u16,
    pub vni: u32,
}

/// A VXLAN frame (RFC 7348 section 5): outer Ethernet, outer IPv4 (no options, DF), UDP to
/// 4789 with a zero checksum, VXLAN with the I flag and `t.vni`, then `inner` (an Ethernet
/// frame) unchanged.
pub fn vxlan(t: &Tunnel, inner: &[u8]) -> Vec<u8> {
    let vni = t.vni.to_be_bytes();
    let vx = VxlanHdr { flags: 0x08, _reserved1: [0; 3], vni: [vni[1], vni[2], vni[3]], _reserved2: 0 };
    let udp_len = UdpHdr::LEN + VxlanHdr::LEN + inner.len();
    let udp = UdpHdr {
        src: t.src_port.to_be_bytes(),
        dst: 4789u16.to_be_bytes(),
        len: (udp_len as u16).to_be_bytes(),
        check: [0; 2],
    };
    let ip = Ipv4::new(t.src_vtep, t.dst_vtep, IPPROTO_UDP).header(udp_len);
    let eth = EthHdr { dst_addr: t.dst_mac, src_addr: t.src_mac, ether_type: ETH_P_IP.to_be() };
    [bytes_of(&eth), bytes_of(&ip), bytes_of(&udp), bytes_of(&vx), inner].concat()
}

/// Cuts an encapsulated frame to `len` bytes and makes its outer IPv4 total length, and its UDP
/// length where the UDP header survives, describe what is left (checksum resealed): a frame
/// that is short because it is truncated, not because a length field lies.
pub fn truncate_consistently(frame: &mut Vec<u8>, len: usize) {
    frame.truncate(len);
    let ip_len = (len - OUTER_IP_OFF) as u16;
    edit::<Ipv4Hdr>(frame, OUTER_IP_OFF, |ip| ip.tot_len = ip_len.to_be_bytes());
    if len >= OUTER_UDP_OFF + UdpHdr::LEN {
        let udp_len = (len - OUTER_UDP_OFF) as u16;
        edit::<UdpHdr>(frame, OUTER_UDP_OFF, |u| u.len = udp_len.to_be_bytes());
    }
    reseal_ipv4(frame, OUTER_IP_OFF);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of RFC 1071 section 3 (and a header whose checksum is well known),
    /// so the checksum the packet tests rely on is itself checked.
    #[test]
    fn checksum_matches_known_values() {
        let rfc1071 = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(0, &rfc1071), !0xddf2);
        // A well-known example header (Wikipedia, "IPv4 header checksum"): checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01,
            0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(0, &h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(ipv4_checksum_ok(&h));
    }

    #[test]
    fn vxlan_frame_layout() {
        let t = Tunnel {
            src_mac: [2, 0, 0, 0, 0, 2],
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_vtep: [198, 18, 0, 2],
            dst_vtep: [198, 18, 0, 1],
            src_port: 50_000,
            vni: 0x000a_0b0c,
        };
        let inner = ethernet([1; 6], [2; 6], ETH_P_IP, &[0xaa; 30]);
        let f = vxlan(&t, &inner);
        assert_eq!(f.len(), 50 + inner.len());
        assert_eq!(&f[14..16], &[0x45, 0]);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, f.len() - 14);
        assert!(ipv4_checksum_ok(&f[14..34]));
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4789);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]) as usize, f.len() - 34);
        assert_eq!(&f[42..50], &[0x08, 0, 0, 0, 0x0a, 0x0b, 0x0c, 0]);
        assert_eq!(&f[50..], &inner[..]);
    }
}
