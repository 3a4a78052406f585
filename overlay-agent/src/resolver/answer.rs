//! One query in, one decision out: answer it from the zone, hand it on to the upstreams as it
//! came, or refuse it. No I/O, so every case is a unit test.
//!
//! Parsing and building messages is hickory-proto's (the DNS library of the hickory resolver and
//! server, kept up by their maintainers): names, compression, EDNS and their edge cases are its
//! business, not a hand-written parser's. A message it cannot read is answered FORMERR when it
//! has a header to answer, and dropped when it has not.

use std::net::Ipv4Addr;

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, rdata},
};

use super::zone::{Found, Zone};

/// The UDP payload a client without EDNS takes (RFC 1035).
pub const PLAIN_UDP: usize = 512;
/// The payload our answers offer with EDNS: what fits a packet on any path (DNS flag day 2020).
const EDNS_PAYLOAD: u16 = 1232;

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this message back.
    Reply(Vec<u8>, Outcome),
    /// Not the overlay's: relay the query, unchanged, to the upstream resolvers.
    Forward,
    /// Nothing to answer (a response, or no header): drop it, counted.
    Drop(Outcome),
}

/// How a query ended, for the resolver's counters (a metric label each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Answered from the zone (addresses, an empty NOERROR, a PTR, or NXDOMAIN for a reverse
    /// name in an overlay subnet).
    Answered,
    /// Answered from the zone with TC set: too many addresses for the client's UDP size.
    Truncated,
    /// Relayed to an upstream resolver and its answer relayed back.
    Forwarded,
    /// No upstream answered (or there is none): SERVFAIL.
    UpstreamFailed,
    /// A message the library cannot parse, or more than one question: FORMERR.
    Formerr,
    /// An opcode other than QUERY: NOTIMP.
    NotImplemented,
    /// An EDNS version other than 0: BADVERS.
    BadVersion,
    /// Dropped: shorter than a header.
    Short,
    /// Dropped: a response sent to the resolver.
    NotQuery,
    /// Dropped: from an address that is no endpoint of this host.
    Stranger,
}

impl Outcome {
    pub const ALL: [Self; 10] = [
        Self::Answered,
        Self::Truncated,
        Self::Forwarded,
        Self::UpstreamFailed,
        Self::Formerr,
        Self::NotImplemented,
        Self::BadVersion,
        Self::Short,
        Self::NotQuery,
        Self::Stranger,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Truncated => "truncated",
            Self::Forwarded => "forwarded",
            Self::UpstreamFailed => "upstream_failed",
            Self::Formerr => "formerr",
            Self::NotImplemented => "notimp",
            Self::BadVersion => "badvers",
            Self::Short => "short",
            Self::NotQuery => "not_query",
            Self::Stranger => "stranger",
        }
    }
}

/// Decides what to do with `query` from `client`. `udp` is whether it came over UDP (where an
/// answer must fit the client's payload size, or be truncated so it asks again over TCP).
pub fn answer(zone: &Zone, client: Ipv4Addr, query: &[u8], udp: bool) -> Action {
    if query.len() < 12 {
        return Action::Drop(Outcome::Short);
    }
    if query[2] & 0x80 != 0 {
        return Action::Drop(Outcome::NotQuery);
    }
    if !zone.knows(client) {
        return Action::Drop(Outcome::Stranger);
    }
    let Ok(msg) = Message::from_vec(query) else {
        return error_from_header(query, ResponseCode::FormErr, Outcome::Formerr);
    };
    if msg.op_code() != OpCode::Query {
        return reply(query, &msg, ResponseCode::NotImp, Vec::new(), udp, Outcome::NotImplemented);
    }
    if msg.extensions().as_ref().is_some_and(|e| e.version() != 0) {
        return reply(query, &msg, ResponseCode::BADVERS, Vec::new(), udp, Outcome::BadVersion);
    }
    let [q] = msg.queries() else {
        return reply(query, &msg, ResponseCode::FormErr, Vec::new(), udp, Outcome::Formerr);
    };
    if q.query_class() != DNSClass::IN {
        return Action::Forward;
    }
    match zone.find(client, &q.name().to_ascii()) {
        Found::NotOurs => Action::Forward,
        Found::Pointer(None) => {
            reply(query, &msg, ResponseCode::NXDomain, Vec::new(), udp, Outcome::Answered)
        }
        Found::Pointer(Some(target)) => {
            let records = match (q.query_type(), Name::from_ascii(format!("{target}."))) {
                (RecordType::PTR, Ok(target)) => {
                    vec![Record::from_rdata(q.name().clone(), 0, RData::PTR(rdata::PTR(target)))]
                }
                _ => Vec::new(),
            };
            reply(query, &msg, ResponseCode::NoError, records, udp, Outcome::Answered)
        }
        Found::Addresses(addrs) => {
            // Other types (AAAA above all: the overlay is IPv4-only) of a name that exists:
            // NOERROR with no answer, so clients do not take the name for missing.
            let records = if q.query_type() == RecordType::A { a_records(q, addrs) } else { Vec::new() };
            reply(query, &msg, ResponseCode::NoError, records, udp, Outcome::Answered)
        }
    }
}

/// The A records of `addrs`, starting at a random one: a name shared by several endpoints
/// spreads its clients, as the datapath's answers do.
fn a_records(q: &Query, mut addrs: Vec<Ipv4Addr>) -> Vec<Record> {
    let start = usize::from(rand_u16()) % addrs.len();
    addrs.rotate_left(start);
    addrs.into_iter().map(|ip| Record::from_rdata(q.name().clone(), 0, RData::A(rdata::A(ip)))).collect()
}

/// A cheap random number: which address comes first needs no cryptography.
fn rand_u16() -> u16 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish() as u16
}

/// The answer to `msg`: its ID, opcode, RD and question, our flags, `records`, and EDNS if it
/// had EDNS. Over UDP, an answer larger than the client takes is sent without its records and
/// with TC set: the client asks again over TCP.
fn reply(
    query: &[u8],
    msg: &Message,
    code: ResponseCode,
    records: Vec<Record>,
    udp: bool,
    outcome: Outcome,
) -> Action {
    let mut out = Message::new();
    out.set_id(msg.id())
        .set_message_type(MessageType::Response)
        .set_op_code(msg.op_code())
        .set_authoritative(true)
        .set_recursion_desired(msg.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    if msg.op_code() == OpCode::Query {
        out.add_queries(msg.queries().iter().cloned());
    }
    let limit = match msg.extensions() {
        Some(edns) => {
            let mut ours = Edns::new();
            ours.set_max_payload(EDNS_PAYLOAD).set_version(0);
            out.set_edns(ours);
            usize::from(edns.max_payload().clamp(PLAIN_UDP as u16, EDNS_PAYLOAD))
        }
        None => PLAIN_UDP,
    };
    out.add_answers(records);
    let Ok(bytes) = out.to_vec() else {
        return error_from_header(query, ResponseCode::ServFail, Outcome::Formerr);
    };
    if udp && bytes.len() > limit {
        out.take_answers();
        out.set_truncated(true);
        return Action::Reply(out.to_vec().unwrap_or_default(), Outcome::Truncated);
    }
    Action::Reply(bytes, outcome)
}

/// An answer with only a header, for a message whose rest cannot be read: its ID and opcode,
/// RD copied, `code`.
fn error_from_header(query: &[u8], code: ResponseCode, outcome: Outcome) -> Action {
    if query.len() < 12 {
        return Action::Drop(Outcome::Short);
    }
    let mut out = [0u8; 12];
    out[..2].copy_from_slice(&query[..2]);
    // QR, the query's opcode, RD.
    out[2] = 0x80 | (query[2] & 0x79);
    // RA, the code.
    out[3] = 0x80 | (u16::from(code) as u8 & 0x0f);
    Action::Reply(out.to_vec(), outcome)
}

#[cfg(test)]
mod tests;
