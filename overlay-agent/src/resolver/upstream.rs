//! The upstream resolvers, and relaying a query to them.
//!
//! Upstreams are the host's own (the `nameserver` lines of its resolv.conf, read again when the
//! file changes), or those given with `--dns-upstream`. A query is relayed as the client sent it
//! and the upstream's answer returned as it came: over UDP for a UDP query, over TCP for a TCP
//! one, so a truncated UDP answer reaches the client with TC set and the client's retry over
//! TCP is relayed over TCP. A relay needs no resolver library: it only matches the answer's ID.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

/// How long one upstream gets to answer before the next is asked (glibc's clients wait 5 s
/// for a whole try, so two upstreams fit).
const PER_SERVER: Duration = Duration::from_secs(2);
/// Most upstreams asked for one query.
const MAX_TRIES: usize = 3;

/// Where queries that are not the overlay's go.
pub struct Upstreams {
    /// Given on the command line: used as they are, resolv.conf is not read.
    fixed: Vec<SocketAddr>,
    resolv_conf: PathBuf,
    /// resolv.conf's modification time when last read, and its servers.
    read: Mutex<(Option<SystemTime>, Vec<SocketAddr>)>,
}

impl Upstreams {
    pub fn new(fixed: Vec<SocketAddr>, resolv_conf: PathBuf) -> Self {
        Self { fixed, resolv_conf, read: Mutex::new((None, Vec::new())) }
    }

    /// The servers to ask, in order.
    pub fn servers(&self) -> Vec<SocketAddr> {
        if !self.fixed.is_empty() {
            return self.fixed.clone();
        }
        let modified = std::fs::metadata(&self.resolv_conf).and_then(|m| m.modified()).ok();
        let mut read = self.read.lock().expect("upstreams");
        if read.0 != modified || modified.is_none() {
            let text = std::fs::read_to_string(&self.resolv_conf).unwrap_or_default();
            *read = (modified, nameservers(&text));
        }
        read.1.clone()
    }

    /// Where the servers come from, for the log.
    pub fn describe(&self) -> String {
        if self.fixed.is_empty() {
            format!("{} ({:?} now)", self.resolv_conf.display(), self.servers())
        } else {
            format!("{:?}", self.fixed)
        }
    }
}

/// The `nameserver` addresses of a resolv.conf, port 53 (IPv6 link-local scopes are dropped:
/// the agent would not know which link).
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()).flatten()
        })
        .filter_map(|addr| addr.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Relays a UDP query to the upstreams in turn; the first answer with the query's ID is
/// returned. None: nobody answered.
pub async fn relay_udp(servers: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    in_turn(servers, |server| udp_once(server, query)).await
}

/// Relays a TCP query (without its length prefix) to the upstreams in turn.
pub async fn relay_tcp(servers: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    in_turn(servers, |server| tcp_once(server, query)).await
}

/// Asks the upstreams one after another, each for at most `PER_SERVER`, until one answers.
async fn in_turn<F: Future<Output = Option<Vec<u8>>>>(
    servers: &[SocketAddr],
    ask: impl Fn(SocketAddr) -> F,
) -> Option<Vec<u8>> {
    for server in servers.iter().take(MAX_TRIES) {
        if let Ok(Some(answer)) = timeout(PER_SERVER, ask(*server)).await {
            return Some(answer);
        }
    }
    None
}

async fn udp_once(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
    // A fresh socket, so a fresh random source port per query: an off-path attacker must guess
    // it as well as the ID.
    let sock = UdpSocket::bind(local).await.ok()?;
    sock.connect(server).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await.ok()?;
        if is_answer_to(&buf[..n], query) {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

async fn tcp_once(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await.ok()?;
    write_framed(&mut stream, query).await.ok()?;
    let answer = read_framed(&mut stream).await.ok()?;
    is_answer_to(&answer, query).then_some(answer)
}

/// Whether `answer` is a response carrying `query`'s ID.
fn is_answer_to(answer: &[u8], query: &[u8]) -> bool {
    answer.len() >= 12 && answer[..2] == query[..2] && answer[2] & 0x80 != 0
}

/// One DNS message over TCP: two bytes of length, then the message (RFC 1035 4.2.2).
pub async fn read_framed(stream: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

pub async fn write_framed(stream: &mut (impl AsyncWriteExt + Unpin), msg: &[u8]) -> std::io::Result<()> {
    let len =
        u16::try_from(msg.len()).map_err(|_| std::io::Error::other("a DNS message over 65535 bytes"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend(len.to_be_bytes());
    out.extend(msg);
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::{is_answer_to, nameservers};

    #[test]
    fn nameserver_lines_are_read_and_the_rest_ignored() {
        let text = "# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver  2001:db8::1 \noptions ndots:2\nnameserver fe80::1%eth0\nnameserver bogus\n";
        let got: Vec<String> = nameservers(text).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["192.0.2.53:53", "[2001:db8::1]:53"]);
    }

    #[test]
    fn only_a_response_with_the_querys_id_is_its_answer() {
        let query = [0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let mut answer = query;
        answer[2] |= 0x80;
        assert!(is_answer_to(&answer, &query));
        assert!(!is_answer_to(&query, &query), "a query is no answer");
        answer[1] = 0x35;
        assert!(!is_answer_to(&answer, &query), "another ID");
        assert!(!is_answer_to(&answer[..11], &query));
    }
}
