//! Names answered in the datapath: the `NAMES` map's layout and the DNS wire constants the
//! from-container program and the agent share (docs/names.md, "In the datapath").
//!
//! A container asks its network's gateway address, UDP port 53. The program on its veth answers
//! A and AAAA queries for the names `NAMES` holds under the container's network; everything else
//! sent there goes on as it did before (the userspace resolver's path).

use core::mem::{align_of, offset_of, size_of};

/// Pinned map name (see `maps::PINNED_MAPS`).
pub const MAP_NAMES: &str = "NAMES";

/// Capacity of `NAMES`: up to three names per endpoint (container name, one alias, one service,
/// each also as `<name>.<network>`) over a good share of `MAX_ENDPOINTS`. Not preallocated.
pub const MAX_NAMES: u32 = 1 << 18;

/// Longest name the map holds, in DNS wire format (length-prefixed labels and the final zero
/// byte): 64 bytes, a name of up to 62 characters such as `<container>.<network>`. The key is
/// built on the program's 512-byte stack and every byte of the question is parsed in a bounded
/// loop, so the bound is kept small; a longer name is never in the map and its query goes to the
/// userspace resolver, which has no such limit.
pub const NAME_LEN: usize = 64;

/// Most addresses one name maps to in the kernel. A name shared by more endpoints (a service
/// with many backends) is left out of the map by the agent, so its query goes to the userspace
/// resolver, which answers every address: the kernel never answers with a subset.
pub const NAME_ADDRS: usize = 8;

/// Key of `NAMES`: a name means something only inside its network, as an address does.
/// `name` is the query name in wire format, ASCII letters lowercased (DNS names compare
/// case-insensitively, RFC 4343), zero-padded to `NAME_LEN`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey {
    pub vni: u32,
    pub name: [u8; NAME_LEN],
}

/// Value of `NAMES`: the IPv4 addresses the name resolves to, `count` of them (1..=NAME_ADDRS),
/// the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameAddrs {
    pub count: u32,
    pub addrs: [[u8; 4]; NAME_ADDRS],
}

/// The resolver's port on the gateway address.
pub const DNS_PORT: u16 = 53;

/// A DNS header (RFC 1035 section 4.1.1), fields in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsHdr {
    pub id: [u8; 2],
    pub flags: [u8; 2],
    pub qdcount: [u8; 2],
    pub ancount: [u8; 2],
    pub nscount: [u8; 2],
    pub arcount: [u8; 2],
}

impl DnsHdr {
    pub const LEN: usize = size_of::<Self>();
}

/// Flag bits of `DnsHdr::flags` (host order).
pub const DNS_QR: u16 = 0x8000;
pub const DNS_OPCODE_MASK: u16 = 0x7800;
pub const DNS_AA: u16 = 0x0400;
pub const DNS_RD: u16 = 0x0100;
pub const DNS_RA: u16 = 0x0080;

pub const DNS_TYPE_A: u16 = 1;
pub const DNS_TYPE_AAAA: u16 = 28;
pub const DNS_CLASS_IN: u16 = 1;

/// Longest label and longest name in wire format (RFC 1035 section 2.3.4).
pub const DNS_MAX_LABEL: u8 = 63;
pub const DNS_MAX_NAME: usize = 255;

/// TTL of an answer from the map: 0, "use it for this query, cache nothing" (RFC 1035 section
/// 3.2.1). Answering costs no more than a map lookup, and a cached answer would outlive a
/// `container rm`: the overlay promises names that are never stale.
pub const DNS_ANSWER_TTL: u32 = 0;

/// One A record of an answer, as the program appends it: the name is a compression pointer to
/// the question (offset 12 in the DNS message), then type, class, TTL, length and the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ARecord {
    pub name: [u8; 2],
    pub rtype: [u8; 2],
    pub class: [u8; 2],
    pub ttl: [u8; 4],
    pub rdlength: [u8; 2],
    pub addr: [u8; 4],
}

impl ARecord {
    pub const LEN: usize = size_of::<Self>();

    /// The record for `addr`, its name pointing at the question.
    pub const fn new(addr: [u8; 4]) -> Self {
        Self {
            name: (0xc000 | DnsHdr::LEN as u16).to_be_bytes(),
            rtype: DNS_TYPE_A.to_be_bytes(),
            class: DNS_CLASS_IN.to_be_bytes(),
            ttl: DNS_ANSWER_TTL.to_be_bytes(),
            rdlength: 4u16.to_be_bytes(),
            addr,
        }
    }
}

/// The key for `name` (dotted, e.g. `web.frontend`, without a trailing dot) on `vni`, or None if
/// it is no valid name or too long for the map. Used by the agent; the program builds the same
/// bytes from the query.
pub fn name_key(vni: u32, name: &str) -> Option<NameKey> {
    let mut key = NameKey { vni, name: [0; NAME_LEN] };
    let mut at = 0;
    for label in name.split('.') {
        let len = label.len();
        if len == 0 || len > DNS_MAX_LABEL as usize || at + 1 + len >= NAME_LEN {
            return None;
        }
        key.name[at] = len as u8;
        for (i, b) in label.bytes().enumerate() {
            key.name[at + 1 + i] = b.to_ascii_lowercase();
        }
        at += 1 + len;
    }
    // The final zero byte is already there: `at < NAME_LEN` was checked above.
    Some(key)
}

const _: () = {
    assert!(size_of::<NameKey>() == 4 + NAME_LEN && align_of::<NameKey>() == 4);
    assert!(offset_of!(NameKey, name) == 4);
    assert!(size_of::<NameAddrs>() == 4 + 4 * NAME_ADDRS && align_of::<NameAddrs>() == 4);
    assert!(offset_of!(NameAddrs, addrs) == 4);
    assert!(DnsHdr::LEN == 12 && align_of::<DnsHdr>() == 1);
    assert!(ARecord::LEN == 16 && align_of::<ARecord>() == 1);
    assert!(offset_of!(ARecord, ttl) == 6 && offset_of!(ARecord, addr) == 12);
};

#[cfg(feature = "user")]
mod pod {
    use super::{NameAddrs, NameKey};
    // SAFETY: repr(C), Copy, no padding, and every bit pattern is a valid value.
    unsafe impl aya::Pod for NameKey {}
    unsafe impl aya::Pod for NameAddrs {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::format;

    use super::*;

    #[test]
    fn keys_are_wire_format_lowercased_and_bounded() {
        let key = name_key(7, "Web.FrontEnd").expect("a valid name");
        assert_eq!(&key.name[..14], b"\x03web\x08frontend\x00");
        assert!(key.name[14..].iter().all(|b| *b == 0));
        assert_eq!(key.vni, 7);
        // 62 characters fit (64 bytes of wire format with the length byte and the final zero).
        let longest = "a".repeat(62);
        assert!(name_key(1, &longest).is_some());
        assert!(name_key(1, &format!("{longest}b")).is_none());
        for bad in ["", "a..b", ".a", "a.", &"x".repeat(64)] {
            assert!(name_key(1, bad).is_none(), "{bad:?}");
        }
    }
}
