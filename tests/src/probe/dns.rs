//! The probe's DNS: an upstream resolver for the tests to point the agents at, and a client
//! that prints what an answer says, for the resolver's tests (tests/tests/names.rs).
//!
//! - `dns-serve IP:PORT`: UDP and TCP on IP:PORT (an address of its own, so answers leave from
//!   the address asked, as a client's connected socket requires), answering `outside.test` (A 198.18.99.1),
//!   `big.outside.test` (60 A records: more than a plain UDP answer holds, so over UDP without
//!   EDNS it answers with TC set and no records, as real servers do) and NXDOMAIN for the rest;
//!   prints "listening", then one line per query: "<udp|tcp> <name> <type>".
//! - `dns-query SERVER NAME TYPE [tcp]`: one query (RD set, no EDNS) to SERVER port 53; prints
//!   "rcode=<n> tc=<0|1> aa=<0|1> <answers, sorted, space separated>".
//! - `dns-raw SERVER HEX [tcp]`: sends the bytes as they are; prints the answer in hex.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    str::FromStr as _,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};

type Result = std::result::Result<(), String>;

const TIMEOUT: Duration = Duration::from_secs(3);

pub fn serve(addr: std::net::SocketAddr) -> Result {
    let udp = UdpSocket::bind(addr).map_err(|e| e.to_string())?;
    let tcp = TcpListener::bind(addr).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            std::thread::spawn(move || serve_tcp(stream));
        }
    });
    println!("listening");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65535];
    while let Ok((n, from)) = udp.recv_from(&mut buf) {
        if let Some(reply) = respond(&buf[..n], true) {
            let _ = udp.send_to(&reply, from);
        }
    }
    Ok(())
}

fn serve_tcp(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut msg).is_err() {
            return;
        }
        let Some(reply) = respond(&msg, false) else { return };
        let mut out = (reply.len() as u16).to_be_bytes().to_vec();
        out.extend(reply);
        if stream.write_all(&out).is_err() {
            return;
        }
    }
}

fn respond(query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    let q = msg.queries().first()?.clone();
    let name = q.name().to_ascii().to_ascii_lowercase();
    println!("{} {} {}", if udp { "udp" } else { "tcp" }, name, q.query_type());
    let _ = std::io::stdout().flush();
    let mut out = Message::new();
    out.set_id(msg.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(msg.recursion_desired())
        .set_recursion_available(true)
        .add_query(q.clone());
    let a = |ip: Ipv4Addr| Record::from_rdata(q.name().clone(), 60, RData::A(rdata::A(ip)));
    match (name.as_str(), q.query_type()) {
        ("outside.test.", RecordType::A) => {
            out.add_answer(a(Ipv4Addr::new(198, 18, 99, 1)));
        }
        ("big.outside.test.", RecordType::A) => {
            if udp && msg.extensions().is_none() {
                out.set_truncated(true);
            } else {
                out.add_answers((0..60).map(|i| a(Ipv4Addr::new(198, 18, 99, 10 + i))));
            }
        }
        ("outside.test." | "big.outside.test.", _) => {}
        _ => {
            out.set_response_code(ResponseCode::NXDomain);
        }
    }
    out.to_vec().ok()
}

pub fn query(server: &str, name: &str, qtype: &str, tcp: bool) -> Result {
    let mut m = Message::new();
    m.set_id(fastrand::u16(..))
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    let qtype = RecordType::from_str(qtype).map_err(|e| e.to_string())?;
    m.add_query(Query::query(Name::from_str(name).map_err(|e| e.to_string())?, qtype));
    let reply = exchange(server, &m.to_vec().map_err(|e| e.to_string())?, tcp)?;
    let r = Message::from_vec(&reply).map_err(|e| format!("unparsable answer: {e}"))?;
    if r.id() != m.id() {
        return Err("an answer with another ID".into());
    }
    let mut answers: Vec<String> = r
        .answers()
        .iter()
        .map(|rec| match rec.data() {
            RData::A(a) => a.0.to_string(),
            RData::PTR(p) => p.0.to_ascii(),
            other => other.to_string(),
        })
        .collect();
    answers.sort();
    println!(
        "rcode={} tc={} aa={} {}",
        u16::from(r.response_code()),
        u8::from(r.truncated()),
        u8::from(r.authoritative()),
        answers.join(" ")
    );
    Ok(())
}

pub fn raw(server: &str, hex: &str, tcp: bool) -> Result {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16).map_err(|e| e.to_string()))
        .collect::<std::result::Result<_, _>>()?;
    let reply = exchange(server, &bytes, tcp)?;
    let hex: String = reply.iter().fold(String::new(), |mut out, b| {
        use std::fmt::Write as _;
        let _ = write!(out, "{b:02x}");
        out
    });
    println!("{hex}");
    Ok(())
}

fn exchange(server: &str, query: &[u8], tcp: bool) -> std::result::Result<Vec<u8>, String> {
    let to = (server.parse::<Ipv4Addr>().map_err(|e| e.to_string())?, 53);
    if tcp {
        let mut s = TcpStream::connect_timeout(&to.into(), TIMEOUT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
        let mut out = (query.len() as u16).to_be_bytes().to_vec();
        out.extend(query);
        s.write_all(&out).map_err(|e| e.to_string())?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).map_err(|e| format!("no answer: {e}"))?;
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut msg).map_err(|e| e.to_string())?;
        return Ok(msg);
    }
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    s.send_to(query, to).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65535];
    let (n, _) = s.recv_from(&mut buf).map_err(|e| format!("no answer: {e}"))?;
    buf.truncate(n);
    Ok(buf)
}
