//! Names answered in the datapath: a container's DNS query to its network's gateway address,
//! UDP port 53, is answered here, on the container's own veth, from the `NAMES` map, when the map
//! can answer it (docs/names.md, "In the datapath").
//!
//! Accepted for an answer: a query (QR 0, opcode QUERY) with one question and no answer or
//! authority records, at most one additional record (an EDNS OPT, left out of the answer), a
//! question name without compression of at most `NAME_LEN` bytes, class IN, type A (every
//! address, in rotating order from a random start) or AAAA (NOERROR with no answer: the overlay
//! is IPv4-only). The answer is built in place: MACs, addresses and ports swapped, the DNS
//! header rewritten, the question left as the container sent it (case included), the records
//! appended, lengths and checksums computed, and the frame sent back into the container.
//!
//! A query that is malformed is dropped and counted with its reason. Anything else sent there
//! (a name not in the map, another type or class, another opcode, a longer name) is not for
//! this file: [`Verdict::ToResolver`] hands it back to the from-container program, where the
//! userspace resolver's path begins.

use core::mem::size_of;

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use overlay_common::{
    dns::{
        ARecord, DNS_AA, DNS_CLASS_IN, DNS_MAX_LABEL, DNS_MAX_NAME, DNS_OPCODE_MASK, DNS_PORT, DNS_QR,
        DNS_RA, DNS_RD, DNS_TYPE_A, DNS_TYPE_AAAA, DnsHdr, NAME_ADDRS, NAME_LEN, NameKey,
    },
    maps::Iface,
    stats::{self, DropReason},
    wire::{EthHdr, EtherType, IPV4_DF, IpProto, Ipv4Hdr, UdpHdr, ipv4_header_sum},
};

use crate::{
    csum::{fold, words},
    maps::{NAME_SCRATCH, NAMES},
    skb::redirected,
};

/// What became of a query to the gateway's port 53.
pub enum Verdict {
    /// Answered from the map: the program's verdict for the frame, now the answer.
    Answered(i32),
    /// Not answerable from the map: the frame goes on, unchanged, where the from-container
    /// program sends anything else to the gateway.
    ToResolver,
}

/// Offsets in a query frame (the caller checked that the IPv4 header has no options).
const UDP_OFF: usize = EthHdr::LEN + Ipv4Hdr::LEN;
const DNS_OFF: usize = UDP_OFF + UdpHdr::LEN;
const QNAME_OFF: usize = DNS_OFF + DnsHdr::LEN;

const _: () = assert!(NAME_LEN.is_power_of_two());

/// TTL of the answer's IPv4 header, as Linux sends by default.
const ANSWER_TTL: u8 = 64;

/// Answers or judges the query `ip` in the frame whose Ethernet header is `eth`, sent by the
/// endpoint `iface` behind the host-side veth `ifindex` to its gateway `gateway`, port 53.
#[inline(always)]
pub fn query(
    ctx: &TcContext,
    ifindex: u32,
    iface: &Iface,
    gateway: [u8; 4],
    eth: EthHdr,
) -> Result<Verdict, DropReason> {
    let len = ctx.len() as usize;
    let udp: UdpHdr = crate::skb::packet(ctx).read(UDP_OFF).ok_or(DropReason::DnsTruncated)?;
    // The message ends where UDP says; a datagram longer than the frame is cut short.
    let msg_end = UDP_OFF + udp.len() as usize;
    if msg_end > len || msg_end < DNS_OFF {
        return Err(DropReason::DnsTruncated);
    }
    // Every read below is checked against the message's end too: Ethernet padding or bytes
    // after the datagram are not part of it.
    let msg = Msg { ctx, end: msg_end };

    let hdr: DnsHdr = msg.read(DNS_OFF)?;
    let flags = u16::from_be_bytes(hdr.flags);
    if flags & DNS_QR != 0 {
        return Err(DropReason::DnsNotQuery);
    }
    // NOTIFY, UPDATE and the rest are the resolver's to refuse.
    if flags & DNS_OPCODE_MASK != 0 {
        return Ok(Verdict::ToResolver);
    }
    if u16::from_be_bytes(hdr.qdcount) != 1 || hdr.ancount != [0; 2] || hdr.nscount != [0; 2] {
        return Err(DropReason::DnsBadCounts);
    }

    let key = NAME_SCRATCH.get_ptr_mut(0).ok_or(DropReason::DnsAnswerFailed)?;
    // SAFETY: this CPU's slot; programs run with migration disabled and nothing else uses it.
    let key = unsafe { &mut *key };
    key.vni = iface.vni;
    let Some(q) = question(msg, key)? else { return Ok(Verdict::ToResolver) };
    let tail: [u8; 4] = msg.read(QNAME_OFF + q.name_len)?;
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let qclass = u16::from_be_bytes([tail[2], tail[3]]);
    if qclass != DNS_CLASS_IN
        || (qtype != DNS_TYPE_A && qtype != DNS_TYPE_AAAA)
        || u16::from_be_bytes(hdr.arcount) > 1
    {
        return Ok(Verdict::ToResolver);
    }
    // SAFETY: read while the answer is written; the agent replaces a value whole, and `count`
    // is read once, so a concurrent update gives the old or the new addresses, never a mix
    // beyond `count`.
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by reference: the key stays in its map slot instead of a copy on the stack"
    )]
    let Some(found) = (unsafe { NAMES.get(&*key) }) else { return Ok(Verdict::ToResolver) };
    let count = found.count as usize;
    if count == 0 || count > NAME_ADDRS {
        return Ok(Verdict::ToResolver);
    }
    let answers = if qtype == DNS_TYPE_A { count } else { 0 };

    let reply = Reply {
        eth,
        client: iface.ip,
        gateway,
        client_port: udp.src,
        id: hdr.id,
        // RD copied, as RFC 1035 asks; the rest of the query's flags have no meaning here.
        flags: DNS_QR | DNS_AA | DNS_RA | (flags & DNS_RD),
        name_len: q.name_len,
        name_sum: q.sum,
        tail,
    };
    reply.write(ctx, &found.addrs, answers)?;
    let new_len = QNAME_OFF + q.name_len + 4 + answers * ARecord::LEN;
    // Egress of the host-side veth is the container's ingress, as for ARP replies.
    // SAFETY: plain helper call.
    let verdict = redirected(
        unsafe { bpf_redirect(ifindex, 0) },
        stats::DNS_ANSWER,
        new_len as u32,
        DropReason::DnsAnswerFailed,
    )?;
    Ok(Verdict::Answered(verdict))
}

/// The DNS message in the frame: its bytes up to where UDP says the datagram ends.
///
/// Read with bpf_skb_load_bytes rather than through packet pointers: the name is read at
/// offsets that depend on its labels, which the verifier cannot bound against the packet's end
/// the way it does fixed header offsets, and the helper also reads a question that lies in a
/// paged fragment.
#[derive(Clone, Copy)]
struct Msg<'a> {
    ctx: &'a TcContext,
    end: usize,
}

impl Msg<'_> {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, DropReason> {
        if offset + size_of::<T>() > self.end {
            return Err(DropReason::DnsTruncated);
        }
        self.ctx.load(offset).map_err(|_| DropReason::DnsTruncated)
    }
}

/// The question's name, parsed: its key is in this CPU's `NAME_SCRATCH` slot.
struct Question {
    /// Bytes of the name in wire format, the final zero included.
    name_len: usize,
    /// One's-complement sum of the name's bytes as sent (for the UDP checksum), in 16-bit words
    /// from the name's first byte.
    sum: u32,
}

/// Parses the question's name into the map key in `key`. None for a valid name too long for
/// the map.
///
/// In three steps the verifier can follow: one load of the name's first `NAME_LEN` bytes, a
/// walk from label to label (its only state is where the next length byte is), then a byte
/// loop that sums, lowercases and clears what follows the name, with no decision that depends
/// on the bytes. The key lives in a per-CPU map slot: the program's 512-byte stack has no room
/// for it beside the rest of the from-container path.
#[inline(always)]
fn question(msg: Msg<'_>, key: &mut NameKey) -> Result<Option<Question>, DropReason> {
    let avail = msg.end.saturating_sub(QNAME_OFF);
    let avail = if avail > NAME_LEN { NAME_LEN } else { avail };
    if avail == 0 {
        return Err(DropReason::DnsTruncated);
    }
    // The verifier wants to see the length within 1..=NAME_LEN on the register passed to the
    // helper; the compiler knows it is and would drop a plain mask. A volatile read hides what
    // it knows, so the mask (a no-op on the value) stays. NAME_LEN is a power of two.
    // SAFETY: reading a local.
    let len = (unsafe { core::ptr::read_volatile(&raw const avail) } - 1) as u32 & (NAME_LEN as u32 - 1);
    // SAFETY: `len + 1` bytes (1..=NAME_LEN) into the key's NAME_LEN.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            msg.ctx.skb.skb as *const _,
            QNAME_OFF as u32,
            key.name.as_mut_ptr().cast(),
            len + 1,
        )
    };
    if loaded != 0 {
        return Err(DropReason::DnsTruncated);
    }

    let mut at = 0usize;
    let mut hops = 0;
    let name_len = loop {
        // Each label takes at least two bytes of the NAME_LEN: this many hops always end.
        if hops > NAME_LEN / 2 {
            return Err(DropReason::DnsNameTooLong);
        }
        if at >= NAME_LEN {
            // Longer than the map's names: valid or not, it is never answered here.
            long_name(msg, QNAME_OFF + at)?;
            return Ok(None);
        }
        if at >= avail {
            return Err(DropReason::DnsTruncated);
        }
        let b = *key.name.get(at).ok_or(DropReason::DnsTruncated)?;
        if b == 0 {
            break at + 1;
        }
        check_label(b)?;
        at += 1 + b as usize;
        hops += 1;
    };

    let mut sum: u32 = 0;
    let mut i = 0;
    while i < NAME_LEN {
        let b = key.name[i];
        if i < name_len {
            sum += if i & 1 == 0 { u32::from(b) << 8 } else { u32::from(b) };
            // Length bytes (at most 63) are never letters: lowercasing every byte is safe.
            key.name[i] = b.to_ascii_lowercase();
        } else {
            // Bytes after the name (its type and class, or an earlier query's) are padding.
            key.name[i] = 0;
        }
        i += 1;
    }
    Ok(Some(Question { name_len, sum }))
}

/// Checks the rest of a name too long for the map, from the length byte at `at`, hopping from
/// label to label.
#[inline(always)]
fn long_name(msg: Msg<'_>, mut at: usize) -> Result<(), DropReason> {
    // Each hop passes at least one byte: this many cover the longest valid name.
    let mut hops = 0;
    while hops < DNS_MAX_NAME - NAME_LEN + 1 {
        // The final zero byte must be at most the 255th of the name.
        if at >= QNAME_OFF + DNS_MAX_NAME {
            return Err(DropReason::DnsNameTooLong);
        }
        let b: u8 = msg.read(at)?;
        if b == 0 {
            return Ok(());
        }
        check_label(b)?;
        at += 1 + b as usize;
        hops += 1;
    }
    Err(DropReason::DnsNameTooLong)
}

/// A label's length byte: neither a compression pointer nor a reserved label type (both have
/// one of the top two bits set), nor longer than 63.
#[inline(always)]
fn check_label(b: u8) -> Result<(), DropReason> {
    if b & 0xc0 == 0xc0 {
        return Err(DropReason::DnsCompression);
    }
    if b > DNS_MAX_LABEL {
        return Err(DropReason::DnsBadLabel);
    }
    Ok(())
}

/// What the answer is made of, besides the addresses.
struct Reply {
    eth: EthHdr,
    client: [u8; 4],
    gateway: [u8; 4],
    client_port: [u8; 2],
    id: [u8; 2],
    flags: u16,
    name_len: usize,
    name_sum: u32,
    /// QTYPE and QCLASS of the question, as sent.
    tail: [u8; 4],
}

impl Reply {
    /// Resizes the frame to the answer and writes everything but the question's name, which
    /// stays where the query had it.
    #[inline(always)]
    fn write(
        &self,
        ctx: &TcContext,
        addrs: &[[u8; 4]; NAME_ADDRS],
        answers: usize,
    ) -> Result<(), DropReason> {
        let fail = DropReason::DnsAnswerFailed;
        let records_off = QNAME_OFF + self.name_len + 4;
        let new_len = records_off + answers * ARecord::LEN;
        let udp_len = (new_len - UDP_OFF) as u16;
        // SAFETY: plain helper call on our skb; it trims an EDNS OPT or grows room for records.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len as u32, 0) } != 0 {
            return Err(fail);
        }

        let eth = EthHdr::new(self.eth.src_addr, self.eth.dst_addr, EtherType::Ipv4);
        let mut ip = Ipv4Hdr {
            vihl: 0x45,
            tos: 0,
            tot_len: ((new_len - EthHdr::LEN) as u16).to_be_bytes(),
            id: [0; 2],
            frags: IPV4_DF.to_be_bytes(),
            ttl: ANSWER_TTL,
            proto: IpProto::Udp as u8,
            check: [0; 2],
            src_addr: self.gateway,
            dst_addr: self.client,
        };
        ip.check = ipv4_header_sum(&ip).to_be_bytes();
        let dns = DnsHdr {
            id: self.id,
            flags: self.flags.to_be_bytes(),
            qdcount: 1u16.to_be_bytes(),
            ancount: (answers as u16).to_be_bytes(),
            nscount: [0; 2],
            arcount: [0; 2],
        };

        // The UDP checksum, from scratch: the query's may be only a partial one (a container's
        // stack leaves the rest to an offload that never happens on a veth). Every byte is one
        // written here, or a byte of the name whose sum the parse kept.
        let mut sum = words(&self.gateway) + words(&self.client) + u32::from(IpProto::Udp as u8);
        sum += u32::from(udp_len) * 2 + u32::from(DNS_PORT) + u32::from(u16::from_be_bytes(self.client_port));
        sum += u32::from(u16::from_be_bytes(dns.id)) + u32::from(self.flags) + 1 + answers as u32;
        // The name starts at an even offset of the datagram (8 + 12); what follows it starts at
        // an odd one when the name's length is odd, and then sums byte-swapped (RFC 1071).
        sum += self.name_sum;
        let start = first(answers);
        let mut after = words(&self.tail);
        let mut i = 0;
        while i < NAME_ADDRS {
            if i >= answers {
                break;
            }
            // start < answers and i < answers: one subtraction wraps the rotation around.
            let idx = if start + i >= answers { start + i - answers } else { start + i };
            let addr = *addrs.get(idx).ok_or(fail)?;
            let record = ARecord::new(addr);
            after += words(&record.name)
                + words(&record.rtype)
                + words(&record.class)
                + words(&record.ttl)
                + words(&record.rdlength)
                + words(&addr);
            ctx.store(records_off + i * ARecord::LEN, &record, 0).map_err(|_| fail)?;
            i += 1;
        }
        let after = fold(after);
        sum += u32::from(if self.name_len & 1 == 1 { after.swap_bytes() } else { after });
        let check = !fold(sum);
        let udp = UdpHdr {
            src: DNS_PORT.to_be_bytes(),
            dst: self.client_port,
            len: udp_len.to_be_bytes(),
            // Zero would mean "no checksum": a computed zero is sent as all ones (RFC 768).
            check: if check == 0 { 0xffff } else { check }.to_be_bytes(),
        };

        ctx.store(0, &eth, 0).map_err(|_| fail)?;
        ctx.store(EthHdr::LEN, &ip, 0).map_err(|_| fail)?;
        ctx.store(UDP_OFF, &udp, 0).map_err(|_| fail)?;
        ctx.store(DNS_OFF, &dns, 0).map_err(|_| fail)?;
        Ok(())
    }
}

/// Where the rotation of the addresses starts: anywhere, so that clients that take the first
/// address spread over all of them.
#[inline(always)]
fn first(answers: usize) -> usize {
    if answers == 0 {
        return 0;
    }
    // SAFETY: plain helper call.
    let r = unsafe { bpf_get_prandom_u32() };
    r as usize % answers
}
