//! ICMP echo, as the pods stage's prober sends and recognises it (`worker::ping_probe`): a pod
//! made by a runtime has no process of the harness's in it to receive a probe, but its kernel
//! answers a ping as soon as its interface has the address and the path to it exists.

use std::net::Ipv4Addr;

const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;

/// An echo request (no IP header: a raw ICMP socket's kernel adds it) with identifier `id`,
/// sequence number `seq` and 8 bytes of payload.
pub fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = ECHO_REQUEST;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"overlay!");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Whether `packet` (as a raw ICMP socket receives it: the IPv4 header, then ICMP) is an echo
/// reply from `from` to a request with identifier `id`.
pub fn is_echo_reply(packet: &[u8], from: Ipv4Addr, id: u16) -> bool {
    let Some(&first) = packet.first() else { return false };
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || packet.len() < ihl + 8 || packet[12..16] != from.octets() {
        return false;
    }
    let icmp = &packet[ihl..];
    icmp[0] == ECHO_REPLY && icmp[1] == 0 && icmp[4..6] == id.to_be_bytes()
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 =
        data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_checksum_verifies() {
        let p = echo_request(0x1234, 7);
        assert_eq!((p[0], p[1]), (8, 0));
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
        // A correct checksum makes the whole message sum to 0xffff (its complement, 0).
        assert_eq!(checksum(&p), 0);
        // RFC 1071's example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    fn reply(from: Ipv4Addr, ty: u8, id: u16) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0];
        ip.extend_from_slice(&from.octets());
        ip.extend_from_slice(&[10, 0, 0, 2]);
        let mut icmp = echo_request(id, 1).to_vec();
        icmp[0] = ty;
        ip.extend(icmp);
        ip
    }

    #[test]
    fn only_our_reply_from_the_pod_counts() {
        let pod = Ipv4Addr::new(10, 82, 0, 9);
        assert!(is_echo_reply(&reply(pod, ECHO_REPLY, 42), pod, 42));
        // Another prober's reply, another address, our own request looped back, a stub.
        assert!(!is_echo_reply(&reply(pod, ECHO_REPLY, 43), pod, 42));
        assert!(!is_echo_reply(&reply(Ipv4Addr::new(10, 82, 0, 8), ECHO_REPLY, 42), pod, 42));
        assert!(!is_echo_reply(&reply(pod, ECHO_REQUEST, 42), pod, 42));
        assert!(!is_echo_reply(&reply(pod, ECHO_REPLY, 42)[..24], pod, 42));
        assert!(!is_echo_reply(&[], pod, 42));
    }
}
