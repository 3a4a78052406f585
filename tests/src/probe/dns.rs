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
//! - `dns-bench SERVER NAME COUNT WINDOW`, `dns-wait SERVER NAME TIMEOUT_MS`: for the
//!   benchmark's names stage (bench/src/names.rs), below.

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

/// A query for `name` (A, RD) with ID 0, as bytes: the benchmark sets the ID per query.
fn query_bytes(name: &str) -> std::result::Result<Vec<u8>, String> {
    let mut m = Message::new();
    m.set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_str(name).map_err(|e| e.to_string())?, RecordType::A));
    m.to_vec().map_err(|e| e.to_string())
}

/// Whether `reply` answers query `id` with NOERROR and at least one record.
fn answered(reply: &[u8], id: u16) -> bool {
    reply.len() >= 2 && reply[..2] == id.to_be_bytes() && has_records(reply)
}

/// RCODE NOERROR, the low 4 bits of a message's fourth byte.
const NOERROR: u8 = 0;

/// Whether `reply` is a response with RCODE NOERROR and records.
fn has_records(reply: &[u8]) -> bool {
    reply.len() >= 12 && reply[2] & 0x80 != 0 && reply[3] & 0x0f == NOERROR && reply[6..8] != [0, 0]
}

/// `dns-bench SERVER NAME COUNT WINDOW`: COUNT queries for NAME over UDP, at most WINDOW
/// unanswered at a time, after 200 not counted; prints "<p50 µs> <p99 µs> <answers/s> <lost>".
/// WINDOW 1 is latency (each query waits for its answer); a larger one, throughput.
pub fn bench(server: &str, name: &str, count: usize, window: usize) -> Result {
    use std::time::Instant;
    const WARMUP: usize = 200;
    let to = (server.parse::<Ipv4Addr>().map_err(|e| e.to_string())?, 53);
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| e.to_string())?;
    let mut q = query_bytes(name)?;
    let total = WARMUP + count;
    let mut sent_at: Vec<Option<Instant>> = vec![None; 65536];
    let (mut sent, mut done, mut lost) = (0usize, 0usize, 0usize);
    let mut rtt_ns: Vec<u64> = Vec::with_capacity(count);
    let mut buf = [0u8; 2048];
    let mut started = None;
    while done < total {
        while sent < total && sent - done < window.max(1) {
            let id = (sent % 65536) as u16;
            q[..2].copy_from_slice(&id.to_be_bytes());
            sent_at[usize::from(id)] = Some(Instant::now());
            s.send(&q).map_err(|e| e.to_string())?;
            sent += 1;
        }
        match s.recv(&mut buf) {
            Ok(n) if n >= 2 => {
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                let Some(at) = sent_at[usize::from(id)].take() else { continue };
                if !answered(&buf[..n], id) {
                    return Err(format!("no answer for {name} from {server}: {:02x?}", &buf[..n.min(12)]));
                }
                done += 1;
                if done == WARMUP {
                    started = Some(Instant::now());
                } else if done > WARMUP {
                    rtt_ns.push(at.elapsed().as_nanos() as u64);
                }
            }
            Ok(_) => {}
            Err(_) => {
                // Whatever is outstanding after 200 ms is lost: send as many again.
                let outstanding = sent - done;
                lost += outstanding;
                done += outstanding;
                sent_at.fill(None);
            }
        }
    }
    let secs = started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    rtt_ns.sort_unstable();
    let pct = |p: f64| {
        rtt_ns
            .get(((p * rtt_ns.len() as f64).ceil() as usize).clamp(1, rtt_ns.len().max(1)) - 1)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{:.1} {:.1} {:.0} {lost}",
        pct(0.5) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0,
        rtt_ns.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// `dns-wait SERVER NAME TIMEOUT_MS`: prints "ready", then asks for NAME every millisecond
/// until it is answered; prints the Unix time of the answer in microseconds.
pub fn wait(server: &str, name: &str, timeout_ms: u64) -> Result {
    use std::time::{Instant, SystemTime, UNIX_EPOCH};
    let to = (server.parse::<Ipv4Addr>().map_err(|e| e.to_string())?, 53);
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(1))).map_err(|e| e.to_string())?;
    let mut q = query_bytes(name)?;
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_millis(timeout_ms);
    let mut buf = [0u8; 2048];
    let mut id = 0u16;
    while Instant::now() < end {
        id = id.wrapping_add(1);
        q[..2].copy_from_slice(&id.to_be_bytes());
        s.send(&q).map_err(|e| e.to_string())?;
        // Answers to earlier tries may still come: any that answers the name will do.
        while let Ok(n) = s.recv(&mut buf) {
            if has_records(&buf[..n]) {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?;
                println!("{}", now.as_micros());
                return Ok(());
            }
        }
    }
    Err(format!("{name} not answered within {timeout_ms} ms"))
}
