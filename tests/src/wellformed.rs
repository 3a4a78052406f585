//! An independent judge of what the programs send on: written here from the RFCs and from what
//! a receiving Linux kernel drops, sharing no code with the programs (it reads raw bytes, not
//! overlay-common's header structs), so the fuzz suite checks the programs against it rather
//! than against themselves.
//!
//! "Well-formed" is what the overlay promises: a frame it hands to a container is one the
//! container's kernel takes in as it is, not one it discards where no overlay counter sees
//! it. That is structure, not integrity: checksums of the inner packet are end to end (its
//! receiver verifies them, as it does for a packet corrupted on any link), and are not judged.

use std::fmt::Write as _;

const ETH_LEN: usize = 14;
/// The shortest Ethernet frame without its FCS; a sender pads shorter ones with zeros.
const MIN_FRAME: usize = 60;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The RFC 1071 sum of `bytes`, folded; a header with a correct checksum sums to 0xffff.
fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 =
        bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Whether the IPv4 header `h` (options included) carries a correct checksum.
pub fn ipv4_checksum_ok(h: &[u8]) -> bool {
    ones_sum(h) == 0xffff
}

/// Checks an Ethernet frame carrying IPv4 as a container will receive it: the IPv4 header
/// describes its packet (version 4, a header length of at least 20 bytes within the packet, a
/// total length equal to what the frame carries, or shorter by Ethernet padding in a minimum
/// frame), and an unfragmented TCP, UDP or ICMP packet holds its whole transport header (TCP:
/// a data offset of 5 words or more within the segment; UDP: a length from 8 bytes to what the
/// packet carries, as Linux's udp_rcv takes; ICMP: its 8-byte header). A GSO packet (`gso`)
/// is longer than its first segment's lengths say, so only its headers are judged.
pub fn container_ipv4(frame: &[u8], gso: bool) -> Result<(), String> {
    if frame.len() < ETH_LEN + 20 {
        return Err(format!("{} bytes: no room for Ethernet and IPv4", frame.len()));
    }
    if be16(frame, 12) != 0x0800 {
        return Err(format!("ethertype {:#06x}, not IPv4", be16(frame, 12)));
    }
    let ip = &frame[ETH_LEN..];
    let (version, ihl) = (ip[0] >> 4, usize::from(ip[0] & 0x0f) * 4);
    if version != 4 {
        return Err(format!("IP version {version}"));
    }
    if ihl < 20 || ihl > ip.len() {
        return Err(format!("IPv4 header length {ihl} in {} bytes", ip.len()));
    }
    let tot = usize::from(be16(ip, 2));
    if tot < ihl {
        return Err(format!("IPv4 total length {tot} shorter than its header ({ihl})"));
    }
    let padded = frame.len() <= MIN_FRAME && tot <= ip.len();
    if !gso && tot != ip.len() && !padded {
        return Err(format!("IPv4 total length {tot}, {} bytes carried", ip.len()));
    }
    let frags = be16(ip, 6);
    if frags & 0x3fff != 0 {
        // A fragment: its transport header is whole only once reassembled.
        return Ok(());
    }
    let l4 = if gso { &ip[ihl..] } else { &ip[ihl..tot] };
    match ip[9] {
        6 => {
            if l4.len() < 20 {
                return Err(format!("TCP header cut short: {} bytes", l4.len()));
            }
            let doff = usize::from(l4[12] >> 4) * 4;
            if doff < 20 || doff > l4.len() {
                return Err(format!("TCP data offset {doff} in a {}-byte segment", l4.len()));
            }
        }
        17 => {
            if l4.len() < 8 {
                return Err(format!("UDP header cut short: {} bytes", l4.len()));
            }
            let ulen = usize::from(be16(l4, 4));
            if ulen < 8 || (!gso && ulen > l4.len()) {
                return Err(format!("UDP length {ulen} in {} bytes", l4.len()));
            }
        }
        1 if l4.len() < 8 => return Err(format!("ICMP header cut short: {} bytes", l4.len())),
        _ => {}
    }
    Ok(())
}

/// The parts of a VXLAN frame as this overlay sends it onto the underlay.
#[derive(Debug, PartialEq, Eq)]
pub struct Vxlan<'a> {
    pub src_mac: [u8; 6],
    pub src_vtep: [u8; 4],
    pub dst_vtep: [u8; 4],
    pub tos: u8,
    pub src_port: u16,
    pub vni: u32,
    pub inner: &'a [u8],
}

/// Checks a VXLAN frame as the overlay sends it (RFC 7348 section 5 with this datapath's
/// choices: an option-less outer IPv4 header with DF, TTL 64 and a correct checksum, lengths
/// that describe the frame, UDP from an ephemeral port to 4789 with a zero checksum, the I
/// flag alone) and returns its parts. `gso`: the outer lengths describe only the first
/// segment of a GSO packet (and are clamped at 65535), so they are not compared.
pub fn vxlan(frame: &[u8], gso: bool) -> Result<Vxlan<'_>, String> {
    const HDRS: usize = ETH_LEN + 20 + 8 + 8;
    if frame.len() < HDRS + ETH_LEN {
        return Err(format!("{} bytes: shorter than VXLAN around an Ethernet header", frame.len()));
    }
    let mut why = String::new();
    let ip = &frame[ETH_LEN..ETH_LEN + 20];
    if be16(frame, 12) != 0x0800 {
        let _ = write!(why, "outer ethertype {:#06x}; ", be16(frame, 12));
    }
    if ip[0] != 0x45 {
        let _ = write!(why, "outer version/IHL {:#04x}; ", ip[0]);
    }
    if !gso && usize::from(be16(ip, 2)) != frame.len() - ETH_LEN {
        let _ = write!(why, "outer total length {} for {} bytes; ", be16(ip, 2), frame.len() - ETH_LEN);
    }
    if be16(ip, 6) != 0x4000 {
        let _ = write!(why, "outer flags/fragment {:#06x}, not DF alone; ", be16(ip, 6));
    }
    if ip[8] != 64 || ip[9] != 17 {
        let _ = write!(why, "outer TTL {} protocol {}; ", ip[8], ip[9]);
    }
    if !ipv4_checksum_ok(ip) {
        why.push_str("outer IPv4 checksum wrong; ");
    }
    let udp = &frame[ETH_LEN + 20..ETH_LEN + 28];
    let src_port = be16(udp, 0);
    if src_port < 49152 || be16(udp, 2) != 4789 || be16(udp, 6) != 0 {
        let _ = write!(why, "UDP ports {src_port} -> {} checksum {:#06x}; ", be16(udp, 2), be16(udp, 6));
    }
    if !gso && usize::from(be16(udp, 4)) != frame.len() - ETH_LEN - 20 {
        let _ = write!(why, "UDP length {} for {} bytes; ", be16(udp, 4), frame.len() - ETH_LEN - 20);
    }
    let vx = &frame[ETH_LEN + 28..HDRS];
    if vx[0] != 0x08 || vx[1..4] != [0, 0, 0] || vx[7] != 0 {
        let _ = write!(why, "VXLAN header {vx:02x?}; ");
    }
    if !why.is_empty() {
        return Err(why);
    }
    let mut src_mac = [0; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    Ok(Vxlan {
        src_mac,
        src_vtep: ip[12..16].try_into().expect("4 bytes"),
        dst_vtep: ip[16..20].try_into().expect("4 bytes"),
        tos: ip[1],
        src_port,
        vni: u32::from_be_bytes([0, vx[4], vx[5], vx[6]]),
        inner: &frame[HDRS..],
    })
}

/// Checks an ARP reply (RFC 826) sent to `requester` (MAC, IPv4) for `target`: Ethernet from
/// the owner's MAC to the requester's, Ethernet/IPv4 with the standard lengths, operation 2,
/// sender the owner, target the requester. Returns the owner's MAC.
pub fn arp_reply(frame: &[u8], requester: ([u8; 6], [u8; 4]), target: [u8; 4]) -> Result<[u8; 6], String> {
    if frame.len() < ETH_LEN + 28 || be16(frame, 12) != 0x0806 {
        return Err("not an ARP frame".into());
    }
    let a = &frame[ETH_LEN..ETH_LEN + 28];
    let sha: [u8; 6] = a[8..14].try_into().expect("6 bytes");
    let fixed = [be16(a, 0), be16(a, 2), u16::from(a[4]), u16::from(a[5]), be16(a, 6)];
    if fixed != [1, 0x0800, 6, 4, 2] {
        return Err(format!("ARP htype/ptype/hlen/plen/op {fixed:?}"));
    }
    if frame[..6] != requester.0 || frame[6..12] != sha {
        return Err("Ethernet addresses are not owner -> requester".into());
    }
    if a[14..18] != target || a[18..24] != requester.0 || a[24..28] != requester.1 {
        return Err("ARP addresses are not owner -> requester".into());
    }
    Ok(sha)
}

/// Checks the answer to a frame too big for the overlay, `sent` (RFC 792 and 1191 as a Linux
/// sender takes them): Ethernet from `owner` (the MAC of the destination's endpoint, whatever
/// `sent` was addressed to) to `sent`'s source; IPv4 without
/// options, unfragmented, ICMP, from `sent`'s destination to its source, with a correct
/// checksum and the length carried; ICMP type 3 code 4 with a correct checksum, `mtu` as the
/// next hop's MTU, and then `sent`'s IPv4 header and at least the 8 bytes after it, unchanged.
/// Only a packet that said Don't Fragment, without options and not itself an ICMP error, may
/// be answered.
pub fn frag_needed(frame: &[u8], sent: &[u8], owner: [u8; 6], mtu: u16) -> Result<(), String> {
    container_ipv4(frame, false)?;
    let (ip, orig) = (&frame[ETH_LEN..], &sent[ETH_LEN..]);
    if be16(orig, 6) & 0x4000 == 0 {
        return Err("answered a packet without DF".into());
    }
    if orig[0] != 0x45 || be16(orig, 6) & 0x3fff != 0 {
        return Err("answered a packet with options or a fragment".into());
    }
    if orig[9] == 1 && [3, 4, 5, 11, 12].contains(&orig[20]) {
        return Err(format!("answered an ICMP error (type {}) with one", orig[20]));
    }
    if frame[..6] != sent[6..12] || frame[6..12] != owner {
        return Err("Ethernet addresses are not the destination's owner -> the sender".into());
    }
    if ip[0] != 0x45 || ip[9] != 1 || be16(ip, 6) & 0x3fff != 0 || ip[8] == 0 {
        return Err(format!("IPv4 header {:02x?}: not option-less unfragmented ICMP", &ip[..20]));
    }
    if !ipv4_checksum_ok(&ip[..20]) {
        return Err("IPv4 header checksum".into());
    }
    if ip[12..16] != orig[16..20] || ip[16..20] != orig[12..16] {
        return Err("IPv4 addresses are not the sent packet's, swapped".into());
    }
    let icmp = &ip[20..usize::from(be16(ip, 2))];
    if icmp.len() < 8 + 28 {
        return Err(format!("ICMP message of {} bytes quotes less than a header and 8 bytes", icmp.len()));
    }
    if (icmp[0], icmp[1], be16(icmp, 6)) != (3, 4, mtu) {
        return Err(format!("ICMP type {} code {} MTU {}, not 3/4/{mtu}", icmp[0], icmp[1], be16(icmp, 6)));
    }
    if ones_sum(icmp) != 0xffff {
        return Err("ICMP checksum".into());
    }
    let quote = &icmp[8..];
    if quote.len() > orig.len() || quote != &orig[..quote.len()] {
        return Err("the quote is not the start of the sent packet".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{self, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Tunnel};

    fn udp_frame(len: usize) -> Vec<u8> {
        let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        frames::ethernet(
            [2; 6],
            [4; 6],
            0x0800,
            &Ipv4::new(a, b, IPPROTO_UDP).packet(&frames::udp(a, b, 1, 2, &vec![7; len])),
        )
    }

    #[test]
    fn container_ipv4_judges_structure() {
        assert_eq!(container_ipv4(&udp_frame(100), false), Ok(()));
        // Padding to the Ethernet minimum is allowed; trailing bytes in a larger frame are not.
        let mut padded = udp_frame(0);
        padded.resize(60, 0);
        assert_eq!(container_ipv4(&padded, false), Ok(()));
        let mut trailing = udp_frame(100);
        trailing.push(0);
        assert!(container_ipv4(&trailing, false).is_err());
        let mut ihl = udp_frame(100);
        ihl[14] = 0x44;
        assert!(container_ipv4(&ihl, false).is_err());
        // A UDP length beyond the packet, or under its header.
        let mut ulen = udp_frame(10);
        ulen[14 + 20 + 5] += 1;
        assert!(container_ipv4(&ulen, false).is_err());
        // A TCP segment whose header is cut short, and one whose data offset runs past it.
        let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        let short = frames::ethernet([2; 6], [4; 6], 0x0800, &Ipv4::new(a, b, IPPROTO_TCP).packet(&[0; 12]));
        assert!(container_ipv4(&short, false).is_err());
        let mut doff = frames::ethernet(
            [2; 6],
            [4; 6],
            0x0800,
            &Ipv4::new(a, b, IPPROTO_TCP).packet(&frames::tcp(a, b, 1, 2, b"x")),
        );
        assert_eq!(container_ipv4(&doff, false), Ok(()));
        doff[14 + 20 + 12] = 0x60;
        assert!(container_ipv4(&doff, false).is_err());
        // A later fragment carries no transport header to judge.
        let mut frag = short.clone();
        frag[14 + 6] = 0x00;
        frag[14 + 7] = 0x10;
        assert_eq!(container_ipv4(&frag, false), Ok(()));
    }

    #[test]
    fn vxlan_parts() {
        let t = Tunnel {
            src_mac: [2; 6],
            dst_mac: [4; 6],
            src_vtep: [1; 4],
            dst_vtep: [3; 4],
            src_port: 50000,
            vni: 0x0a_0b0c,
        };
        let inner = udp_frame(10);
        let f = frames::vxlan(&t, &inner);
        let v = vxlan(&f, false).expect("well-formed");
        assert_eq!(
            (v.vni, v.inner, v.src_vtep, v.dst_vtep, v.src_port),
            (0x0a_0b0c, &inner[..], [1; 4], [3; 4], 50000)
        );
        let mut bad = f.clone();
        bad[14 + 28] = 0x0c;
        assert!(vxlan(&bad, false).is_err());
        let mut low = f.clone();
        low[14 + 20] = 0x10;
        assert!(vxlan(&low, false).is_err(), "source port 4096..");
    }
}
