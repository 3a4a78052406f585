use std::{net::Ipv4Addr, str::FromStr as _};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};

use super::{Action, Outcome, PLAIN_UDP, answer};
use crate::{
    desired::{Desired, Dirty},
    model::{State, Update},
    reconcile::testing::{add_endpoint, add_network},
    resolver::zone::{Zone, testing::sample},
};

const WEB1: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const API: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const DB: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 3);

fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new();
    m.set_id(0x1234)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    m
}

fn ask(zone: &Zone, client: Ipv4Addr, m: &Message) -> Action {
    answer(zone, client, &m.to_vec().unwrap(), true)
}

/// The reply, parsed, and how it was counted.
fn reply(action: Action) -> (Message, Outcome) {
    match action {
        Action::Reply(bytes, outcome) => (Message::from_vec(&bytes).expect("a reply we can parse"), outcome),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = m
        .answers()
        .iter()
        .map(|r| match r.data() {
            RData::A(a) => a.0,
            other => panic!("not an A record: {other:?}"),
        })
        .collect();
    out.sort();
    out
}

#[test]
fn overlay_names_are_answered_with_every_address_authoritatively_and_with_ttl_0() {
    let z = sample();
    let (m, outcome) = reply(ask(&z, WEB1, &query("WWW.", RecordType::A)));
    assert_eq!(outcome, Outcome::Answered);
    assert_eq!(
        (m.id(), m.message_type(), m.response_code()),
        (0x1234, MessageType::Response, ResponseCode::NoError)
    );
    assert!(m.authoritative() && m.recursion_desired() && m.recursion_available() && !m.truncated());
    assert_eq!(m.queries().len(), 1, "the question is echoed");
    assert_eq!(addresses(&m), vec![WEB1, API]);
    assert!(m.answers().iter().all(|r| r.ttl() == 0));
}

#[test]
fn aaaa_of_an_overlay_name_is_noerror_without_answers_and_other_names_go_upstream() {
    let z = sample();
    let (m, _) = reply(ask(&z, WEB1, &query("db.n1.", RecordType::AAAA)));
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
    assert_eq!(ask(&z, WEB1, &query("example.com.", RecordType::A)), Action::Forward);
    // db is not on api's network: not the overlay's to answer for api.
    assert_eq!(ask(&z, API, &query("db.", RecordType::A)), Action::Forward);
}

#[test]
fn reverse_names_in_overlay_subnets_get_ptr_or_nxdomain() {
    let z = sample();
    let (m, _) = reply(ask(&z, WEB1, &query("3.1.0.10.in-addr.arpa.", RecordType::PTR)));
    let targets: Vec<String> = m
        .answers()
        .iter()
        .map(|r| match r.data() {
            RData::PTR(p) => p.0.to_ascii(),
            other => panic!("not a PTR: {other:?}"),
        })
        .collect();
    assert_eq!(targets, vec!["db.n1."]);
    let (m, _) = reply(ask(&z, WEB1, &query("77.1.0.10.in-addr.arpa.", RecordType::PTR)));
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    assert_eq!(ask(&z, WEB1, &query("8.8.8.8.in-addr.arpa.", RecordType::PTR)), Action::Forward);
    let _ = DB;
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped_and_counted() {
    let z = sample();
    // Shorter than a header: nothing to answer.
    assert_eq!(answer(&z, WEB1, &[0x12, 0x34, 1], true), Action::Drop(Outcome::Short));
    // A response.
    let mut r = query("web.", RecordType::A);
    r.set_message_type(MessageType::Response);
    assert_eq!(ask(&z, WEB1, &r), Action::Drop(Outcome::NotQuery));
    // Someone who is no endpoint here.
    assert_eq!(
        ask(&z, Ipv4Addr::new(192, 0, 2, 1), &query("web.", RecordType::A)),
        Action::Drop(Outcome::Stranger)
    );

    // A header promising a question that is not there; a question whose name points at itself
    // (a compression loop); a label running past the end.
    let header = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let mut looped = header.to_vec();
    looped.extend([0xc0, 12, 0, 1, 0, 1]);
    let mut past_end = header.to_vec();
    past_end.extend([40, b'a', b'b']);
    for bad in [header.to_vec(), looped, past_end] {
        let Action::Reply(bytes, Outcome::Formerr) = answer(&z, WEB1, &bad, true) else {
            panic!("no FORMERR for {bad:?}");
        };
        assert_eq!(bytes[..2], [0xab, 0xcd], "same ID");
        assert_eq!(bytes[2], 0x81, "QR, opcode QUERY, RD copied");
        assert_eq!(bytes[3] & 0x0f, 1, "FORMERR");
    }

    // Two questions.
    let mut two = query("web.", RecordType::A);
    two.add_query(Query::query(Name::from_str("db.").unwrap(), RecordType::A));
    let (m, outcome) = reply(ask(&z, WEB1, &two));
    assert_eq!((m.response_code(), outcome), (ResponseCode::FormErr, Outcome::Formerr));
}

#[test]
fn other_opcodes_get_notimp_and_edns_versions_other_than_0_badvers() {
    let z = sample();
    let mut notify = query("web.", RecordType::SOA);
    notify.set_op_code(OpCode::Notify);
    let (m, outcome) = reply(ask(&z, WEB1, &notify));
    assert_eq!((m.response_code(), outcome), (ResponseCode::NotImp, Outcome::NotImplemented));

    let mut v1 = query("web.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_version(1).set_max_payload(1232);
    v1.set_edns(edns);
    let (m, outcome) = reply(ask(&z, WEB1, &v1));
    // 16 is BADVERS in an OPT-carrying answer (the library decodes the number as BADSIG, its
    // TSIG twin).
    assert_eq!((u16::from(m.response_code()), outcome), (16, Outcome::BadVersion));
}

/// A zone where `many` names 60 endpoints of one network, all on h1.
fn crowded() -> Zone {
    let mut s = State::default();
    add_network(&mut s, "n1", 100, 1);
    for i in 0..60u8 {
        let id = format!("e{i}");
        add_endpoint(&mut s, &id, "n1", &format!("c{i}"), "h1", Ipv4Addr::new(10, 0, 1, 10 + i));
        s.endpoints.get_mut(&id).unwrap().aliases = vec!["many".to_owned()];
    }
    let mut d = Desired::new("h1");
    d.apply(Update::Snapshot(s), &mut Dirty::default());
    Zone::build(&d, "h1")
}

#[test]
fn an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp_or_with_edns() {
    let z = crowded();
    let client = Ipv4Addr::new(10, 0, 1, 10);
    let q = query("many.", RecordType::A);
    let Action::Reply(bytes, Outcome::Truncated) = ask(&z, client, &q) else { panic!("not truncated") };
    assert!(bytes.len() <= PLAIN_UDP);
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.truncated() && m.answers().is_empty());
    // Over TCP: all 60.
    let (m, outcome) = reply(answer(&z, client, &q.to_vec().unwrap(), false));
    assert_eq!((m.answers().len(), outcome), (60, Outcome::Answered));
    // With EDNS offering 1232 bytes: they fit (60 * 16 bytes).
    let mut e = q.clone();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    e.set_edns(edns);
    let (m, _) = reply(ask(&z, client, &e));
    assert_eq!(m.answers().len(), 60);
    assert_eq!(m.extensions().as_ref().map(Edns::max_payload), Some(1232));
}

/// Mutated queries (bytes flipped, cut, grown, counts changed), seeded so a failure repeats: no
/// panic, and every reply is a response with the query's ID, or the query is dropped.
#[test]
fn mutated_queries_never_panic_and_every_reply_answers_the_query_it_came_for() {
    let z = sample();
    let mut seeds: Vec<Vec<u8>> = [
        ("web.", RecordType::A),
        ("3.1.0.10.in-addr.arpa.", RecordType::PTR),
        ("example.com.", RecordType::AAAA),
    ]
    .iter()
    .map(|(n, t)| query(n, *t).to_vec().unwrap())
    .collect();
    let mut with_edns = query("www.n1.", RecordType::A);
    with_edns.set_edns(Edns::new());
    seeds.push(with_edns.to_vec().unwrap());
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut replies, mut forwards, mut drops) = (0, 0, 0);
    for i in 0..20_000 {
        let mut q = seeds[i % seeds.len()].clone();
        for _ in 0..=(next() % 4) {
            let at = (next() as usize) % q.len();
            match next() % 4 {
                0 => q[at] = next() as u8,
                1 => q.truncate(at.max(1)),
                2 => q.insert(at, next() as u8),
                _ => q[at] ^= 1 << (next() % 8),
            }
        }
        for udp in [true, false] {
            match answer(&z, WEB1, &q, udp) {
                Action::Reply(bytes, _) => {
                    replies += 1;
                    assert!(
                        bytes.len() >= 12 && bytes[..2] == q[..2] && bytes[2] & 0x80 != 0,
                        "{q:02x?} -> {bytes:02x?}"
                    );
                    if udp {
                        assert!(bytes.len() <= 1232, "a UDP answer over the size we offer");
                    }
                }
                Action::Forward => forwards += 1,
                Action::Drop(_) => drops += 1,
            }
        }
    }
    // The mutations reach every kind of end, or the test says little.
    assert!(replies > 1000 && forwards > 100 && drops > 100, "{replies} {forwards} {drops}");
}
