//! The resolver's sockets: UDP and TCP on port 53 of each gateway this host serves, and the
//! tasks that answer or relay what arrives there.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    task::JoinHandle,
    time::timeout,
};
use tracing::{debug, info};

use super::{
    answer::{Action, Outcome, answer},
    upstream::{self, Upstreams},
    zone::Zone,
};

/// The resolver's counters by outcome, for `/metrics` (label `outcome`).
pub type Counts = Family<Vec<(String, String)>, Counter>;

/// Queries relayed at once (each waits for an upstream); more are answered SERVFAIL.
const MAX_RELAYS: usize = 512;
/// TCP connections open at once; more are closed on accept.
const MAX_TCP: usize = 128;
/// What one client (container address) may hold of those: a container that floods the
/// resolver with names only upstreams know, or opens idle TCP connections, cannot take the
/// resolver from the other containers of its host.
const CLIENT_RELAYS: usize = 64;
const CLIENT_TCP: usize = 8;
/// How long a TCP client may stay silent between queries (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
const DNS_PORT: u16 = 53;

/// What the tasks share.
struct Shared {
    zone: RwLock<Arc<Zone>>,
    upstreams: Upstreams,
    counts: Counts,
    relays: Arc<Semaphore>,
    tcp: Arc<Semaphore>,
    /// What each client holds now: (relays, TCP connections).
    held: Mutex<HashMap<Ipv4Addr, (usize, usize)>>,
}

impl Shared {
    fn zone(&self) -> Arc<Zone> {
        self.zone.read().expect("zone").clone()
    }

    /// Takes one of `client`'s relays (TCP connections if `tcp`), if it has one left.
    fn take(self: &Arc<Self>, client: Ipv4Addr, tcp: bool) -> Option<Held> {
        let mut held = self.held.lock().expect("held");
        let (relays, conns) = held.entry(client).or_default();
        let (n, max) = if tcp { (conns, CLIENT_TCP) } else { (relays, CLIENT_RELAYS) };
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Held { shared: self.clone(), client, tcp })
    }

    fn count(&self, outcome: Outcome) {
        self.counts.get_or_create(&vec![("outcome".to_owned(), outcome.name().to_owned())]).inc();
    }
}

/// One relay or TCP connection of a client; given back on drop.
struct Held {
    shared: Arc<Shared>,
    client: Ipv4Addr,
    tcp: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.shared.held.lock().expect("held");
        if let Some(counts) = held.get_mut(&self.client) {
            let n = if self.tcp { &mut counts.1 } else { &mut counts.0 };
            *n = n.saturating_sub(1);
            if *counts == (0, 0) {
                held.remove(&self.client);
            }
        }
    }
}

/// The resolver of one agent: its zone, and its sockets per served gateway.
pub struct Resolver {
    shared: Arc<Shared>,
    listeners: BTreeMap<Ipv4Addr, Listener>,
}

/// The tasks of one gateway's sockets; dropping it closes them.
struct Listener(Vec<JoinHandle<()>>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.iter().for_each(JoinHandle::abort);
    }
}

impl Resolver {
    pub fn new(upstreams: Upstreams, counts: Counts) -> Self {
        info!(upstreams = upstreams.describe(), "resolver: names outside the overlay go to these");
        for outcome in Outcome::ALL {
            let _ = counts.get_or_create(&vec![("outcome".to_owned(), outcome.name().to_owned())]);
        }
        let shared = Shared {
            zone: RwLock::new(Arc::new(Zone::default())),
            upstreams,
            counts,
            relays: Arc::new(Semaphore::new(MAX_RELAYS)),
            tcp: Arc::new(Semaphore::new(MAX_TCP)),
            held: Mutex::new(HashMap::new()),
        };
        Self { shared: Arc::new(shared), listeners: BTreeMap::new() }
    }

    pub fn set_zone(&self, zone: Zone) {
        *self.shared.zone.write().expect("zone") = Arc::new(zone);
    }

    /// Listens on port 53 of every gateway in `served`, and of no other. What cannot be bound
    /// is returned (and tried again on the next call).
    pub fn listen(&mut self, served: &BTreeSet<Ipv4Addr>) -> Vec<(Ipv4Addr, std::io::Error)> {
        self.listeners.retain(|gw, _| served.contains(gw));
        let mut errors = Vec::new();
        for gw in served {
            if self.listeners.contains_key(gw) {
                continue;
            }
            match self.bind(*gw) {
                Ok(listener) => {
                    info!(gateway = %gw, "resolver listening on port 53 (UDP and TCP)");
                    self.listeners.insert(*gw, listener);
                }
                Err(e) => errors.push((*gw, e)),
            }
        }
        errors
    }

    fn bind(&self, gw: Ipv4Addr) -> std::io::Result<Listener> {
        let addr = SocketAddr::from((gw, DNS_PORT));
        let udp = std::net::UdpSocket::bind(addr)?;
        udp.set_nonblocking(true)?;
        let udp = Arc::new(UdpSocket::from_std(udp)?);
        let tcp = std::net::TcpListener::bind(addr)?;
        tcp.set_nonblocking(true)?;
        let tcp = TcpListener::from_std(tcp)?;
        Ok(Listener(vec![
            tokio::spawn(serve_udp(self.shared.clone(), udp)),
            tokio::spawn(serve_tcp(self.shared.clone(), tcp)),
        ]))
    }
}

async fn serve_udp(shared: Arc<Shared>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                // ICMP errors for earlier answers surface here; the socket is still good.
                debug!(error = %e, "resolver: UDP receive");
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        let query = buf[..n].to_vec();
        match answer(&shared.zone(), *from.ip(), &query, true) {
            Action::Reply(bytes, outcome) => {
                shared.count(outcome);
                let _ = sock.send_to(&bytes, from).await;
            }
            Action::Drop(outcome) => shared.count(outcome),
            Action::Forward => {
                let (Ok(permit), Some(mine)) =
                    (shared.relays.clone().try_acquire_owned(), shared.take(*from.ip(), false))
                else {
                    shared.count(Outcome::UpstreamFailed);
                    let _ = sock.send_to(&servfail(&query), from).await;
                    continue;
                };
                let (shared, sock) = (shared.clone(), sock.clone());
                tokio::spawn(async move {
                    let _permit = (permit, mine);
                    let servers = shared.upstreams.servers();
                    let reply = relayed(&shared, upstream::relay_udp(&servers, &query).await, &query);
                    let _ = sock.send_to(&reply, from).await;
                });
            }
        }
    }
}

async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((stream, from)) = listener.accept().await else { continue };
        let SocketAddr::V4(from) = from else { continue };
        let (Ok(permit), Some(mine)) =
            (shared.tcp.clone().try_acquire_owned(), shared.take(*from.ip(), true))
        else {
            debug!(client = %from, "resolver: too many TCP connections, closing a new one");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = (permit, mine);
            tcp_session(&shared, stream, *from.ip()).await;
        });
    }
}

/// Queries one after another on one TCP connection, until the client closes it, stays silent
/// too long, or sends what gets no answer.
async fn tcp_session(shared: &Shared, mut stream: TcpStream, client: Ipv4Addr) {
    loop {
        let Ok(Ok(query)) = timeout(TCP_IDLE, upstream::read_framed(&mut stream)).await else { return };
        let reply = match answer(&shared.zone(), client, &query, false) {
            Action::Reply(bytes, outcome) => {
                shared.count(outcome);
                bytes
            }
            Action::Drop(outcome) => {
                shared.count(outcome);
                return;
            }
            Action::Forward => {
                let servers = shared.upstreams.servers();
                relayed(shared, upstream::relay_tcp(&servers, &query).await, &query)
            }
        };
        if upstream::write_framed(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

/// What goes back for a relayed query: the upstream's answer, or SERVFAIL when none came.
fn relayed(shared: &Shared, reply: Option<Vec<u8>>, query: &[u8]) -> Vec<u8> {
    if let Some(reply) = reply {
        shared.count(Outcome::Forwarded);
        reply
    } else {
        shared.count(Outcome::UpstreamFailed);
        servfail(query)
    }
}

/// SERVFAIL for `query` (which the caller parsed far enough to relay: it has a header).
fn servfail(query: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[..2].copy_from_slice(&query[..2]);
    // QR, the query's opcode and RD; RA, SERVFAIL.
    out[2] = 0x80 | (query[2] & 0x79);
    out[3] = 0x82;
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{CLIENT_RELAYS, CLIENT_TCP, Counts, Resolver};
    use crate::resolver::upstream::Upstreams;

    #[test]
    fn one_client_cannot_hold_more_than_its_share_and_gets_it_back() {
        let r = Resolver::new(Upstreams::new(Vec::new(), "/nonexistent".into()), Counts::default());
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3));
        let mut held: Vec<_> =
            (0..CLIENT_RELAYS).map(|_| r.shared.take(a, false).expect("a relay")).collect();
        assert!(r.shared.take(a, false).is_none(), "a's relays are used up");
        assert!(r.shared.take(b, false).is_some(), "b is not held back by a");
        let tcp: Vec<_> = (0..CLIENT_TCP).map(|_| r.shared.take(a, true).expect("a connection")).collect();
        assert!(r.shared.take(a, true).is_none());
        held.pop();
        assert!(r.shared.take(a, false).is_some(), "a relay given back is a's again");
        drop((held, tcp));
        assert!(r.shared.held.lock().unwrap().is_empty(), "nothing left of a client that holds nothing");
    }
}
