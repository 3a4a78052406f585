//! Whether an IPv4 packet is one a container's kernel takes in as it is: shared by the
//! container's egress (before delivery or encapsulation) and decapsulation (before delivery),
//! so a packet the receiving kernel would discard, where no overlay counter sees it, is
//! dropped and counted here instead.
//!
//! Structure only: checksums are end to end (the receiver verifies them, as it does for a
//! packet corrupted on any link).

use overlay_common::wire::{EthHdr, IpProto, Ipv4Hdr, is_fragment};

use crate::packet::Packet;

/// The shortest Ethernet frame (without its FCS): shorter ones are padded up to it.
const MIN_FRAME: usize = 60;

/// Bytes from the start of an IPv4 header through the part of a transport header this module
/// reads: the longest IPv4 header and the fixed TCP header. A TC caller makes this much (or the
/// whole packet, if shorter) linear first, or [`read_len`] of the header it has.
pub const READ: usize = 60 + 20;

/// What this module reads of a packet whose IPv4 header is `ihl` bytes long: the header and the
/// fixed TCP header after it (the longest transport header it looks into). Less than [`READ`]
/// for the packets there are (no options: 40 bytes), which a TCP sender's linear part always
/// holds, so no pull is needed for them.
#[inline(always)]
pub fn read_len(ihl: usize) -> usize {
    ihl + TCP_MIN
}

/// Where the TCP header keeps its data offset, and the shortest TCP, UDP and ICMP headers.
const TCP_DOFF_OFF: usize = 12;
const TCP_MIN: usize = 20;
const UDP_MIN: usize = 8;
const ICMP_MIN: usize = 8;

/// True when the IPv4 header `ip`, at `off` in `pkt`, describes the frame of `frame_len` bytes
/// (from its Ethernet header) it came in: a header of at least 20 bytes, a total length equal
/// to what the frame carries (or shorter by the padding of a minimum Ethernet frame), and, for
/// an unfragmented TCP, UDP or ICMP packet, its whole transport header: a TCP data offset from
/// 5 words to the segment's length, a UDP length from 8 bytes to the packet's (as Linux's
/// udp_rcv takes it), ICMP's 8 bytes. Version 4 is the caller's to check.
///
/// A GSO packet (`gso`) is longer than its headers say until it is segmented: only what its
/// headers claim is checked, against the bytes there are.
#[inline(always)]
pub fn whole(pkt: Packet, ip: &Ipv4Hdr, off: usize, frame_len: usize, gso: bool) -> bool {
    let (ihl, tot) = (ip.ihl() as usize, ip.tot_len() as usize);
    let carried = frame_len - EthHdr::LEN;
    let padded = frame_len <= MIN_FRAME && tot <= carried;
    if ihl < Ipv4Hdr::LEN || tot < ihl || ihl > carried || (!gso && tot != carried && !padded) {
        return false;
    }
    // A fragment's transport header is whole only once the receiver reassembled it.
    if is_fragment(ip) {
        return true;
    }
    let l4_len = if gso { carried - ihl } else { tot - ihl };
    let l4 = off + ihl;
    if ip.proto == IpProto::Tcp as u8 {
        if l4_len < TCP_MIN {
            return false;
        }
        let Some(b) = pkt.read::<u8>(l4 + TCP_DOFF_OFF) else { return false };
        let doff = usize::from(b >> 4) * 4;
        doff >= TCP_MIN && doff <= l4_len
    } else if ip.proto == IpProto::Udp as u8 {
        if l4_len < UDP_MIN {
            return false;
        }
        let Some(len) = pkt.read::<[u8; 2]>(l4 + 4) else { return false };
        let ulen = usize::from(u16::from_be_bytes(len));
        ulen >= UDP_MIN && (gso || ulen <= l4_len)
    } else if ip.proto == IpProto::Icmp as u8 {
        l4_len >= ICMP_MIN
    } else {
        true
    }
}
