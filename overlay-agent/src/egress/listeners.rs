//! The host's own servers, which a published port must not take from them.
//!
//! Docker publishes a port by binding it on the host (docker-proxy), so `-p 22:80` on a host
//! whose sshd listens on port 22 fails with "address already in use". Here a published port is
//! a DNAT rule, which would silently take the host's sshd away from everyone but the host's own
//! processes. So before writing the rules the agent reads which ports the host's sockets hold
//! (TCP listening, UDP bound) and leaves out a published port that one of them serves on an
//! address the rule would catch: any address of the host, loopback included (the host's own
//! processes reach published ports on 127.0.0.1 too, as Docker's proxy serves them there), but
//! the overlay's own (the gateways, where the agent's resolver listens and the rule does not
//! apply). So `-p 53:53/udp` on a host whose stub resolver holds 127.0.0.53:53 is left out, as
//! Docker's fails there, instead of taking the host's own name lookups.
//!
//! Read from `/proc/net/tcp` and `/proc/net/udp` of the agent's namespace (the host's): a fixed
//! format the kernel has kept since 2.2, two columns of it used; a sock_diag client would bring
//! a netlink family the agent does not otherwise speak for the same two facts.

use std::{collections::BTreeSet, net::Ipv4Addr};

use crate::model::Proto;

/// A host socket that serves a port: its protocol, address (0.0.0.0 for all) and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub proto: Proto,
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// As `ss` shows a socket: `0.0.0.0:22/tcp`.
impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto.as_str())
    }
}

/// TCP sockets in LISTEN and UDP sockets not connected to a peer: what serves a port.
const TCP_LISTEN: &str = "0A";
const UDP_UNCONNECTED: &str = "07";

/// The host's listening sockets now (IPv4; an IPv6 socket bound to `::` serves IPv4 too, where
/// the host allows it, so those count as 0.0.0.0).
pub fn read() -> BTreeSet<Listener> {
    let mut out = BTreeSet::new();
    for (path, proto, state, v6) in [
        ("/proc/net/tcp", Proto::Tcp, TCP_LISTEN, false),
        ("/proc/net/udp", Proto::Udp, UDP_UNCONNECTED, false),
        ("/proc/net/tcp6", Proto::Tcp, TCP_LISTEN, true),
        ("/proc/net/udp6", Proto::Udp, UDP_UNCONNECTED, true),
    ] {
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(parse(&text, proto, state, v6));
        }
    }
    out
}

/// The sockets of one `/proc/net/{tcp,udp}[6]` table in state `state`.
fn parse(text: &str, proto: Proto, state: &str, v6: bool) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let st = cols.nth(1)?;
            if st != state {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let addr = if v6 {
                // Only the unspecified address (all zeroes) and v4-mapped ones matter here.
                match addr {
                    a if a.chars().all(|c| c == '0') => Ipv4Addr::UNSPECIFIED,
                    a if a.len() == 32 && a[..16].chars().all(|c| c == '0') && &a[16..24] == "FFFF0000" => {
                        v4(&a[24..])?
                    }
                    _ => return None,
                }
            } else {
                v4(addr)?
            };
            Some(Listener { proto, addr, port })
        })
        .collect()
}

/// An address as the kernel prints it: the network-order word read as a number of this
/// machine, in hex (`0100007F` is 127.0.0.1 on a little-endian host).
fn v4(hex: &str) -> Option<Ipv4Addr> {
    let word = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(word.to_ne_bytes()))
}

/// The listener of the host that a rule publishing `port`/`proto` on `host_ip` (None: every
/// address of the host, loopback included) would take traffic from, if any. The overlay's own
/// addresses (`ours`) are not caught by the rule.
pub fn conflict(
    listeners: &BTreeSet<Listener>,
    proto: Proto,
    host_ip: Option<Ipv4Addr>,
    port: u16,
    ours: impl Fn(Ipv4Addr) -> bool,
) -> Option<Listener> {
    listeners.iter().copied().find(|l| {
        l.proto == proto
            && l.port == port
            && !ours(l.addr)
            && match host_ip {
                None => true,
                Some(ip) => l.addr.is_unspecified() || l.addr == ip,
            }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str =
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 010047C6:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: 010012C6:9C40 FE0012C6:0959 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";

    #[test]
    fn listening_sockets_are_read_from_the_kernels_table() {
        let got = parse(TCP, Proto::Tcp, TCP_LISTEN, false);
        let shown: Vec<String> = got.iter().map(|l| format!("{}:{}", l.addr, l.port)).collect();
        // The established connection (st 01) is no server.
        assert_eq!(shown, ["0.0.0.0:22", "127.0.0.1:8080", "198.71.0.1:80"]);
    }

    #[test]
    fn a_port_served_on_an_address_the_rule_catches_conflicts() {
        let listeners: BTreeSet<Listener> = parse(TCP, Proto::Tcp, TCP_LISTEN, false).into_iter().collect();
        let none = |_| false;
        assert_eq!(conflict(&listeners, Proto::Tcp, None, 22, none).map(|l| l.port), Some(22));
        assert!(conflict(&listeners, Proto::Udp, None, 22, none).is_none(), "UDP 22 is free");
        // A server on loopback only: the host's own processes would reach the container instead.
        assert_eq!(
            conflict(&listeners, Proto::Tcp, None, 8080, none).map(|l| l.addr),
            Some(Ipv4Addr::LOCALHOST)
        );
        assert!(conflict(&listeners, Proto::Tcp, Some(Ipv4Addr::LOCALHOST), 8080, none).is_some());
        assert!(conflict(&listeners, Proto::Tcp, Some("198.18.0.1".parse().unwrap()), 8080, none).is_none());
        assert!(conflict(&listeners, Proto::Tcp, None, 80, none).is_some());
        assert!(conflict(&listeners, Proto::Tcp, Some("198.18.0.1".parse().unwrap()), 80, none).is_none());
        let gateway = |a: Ipv4Addr| a == Ipv4Addr::new(198, 71, 0, 1);
        assert!(conflict(&listeners, Proto::Tcp, None, 80, gateway).is_none(), "the overlay's own");
        let v6 = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 0 0
   1: 0000000000000000FFFF00000100007F:0036 00000000000000000000000000000000:0000 07 0 0
";
        let got = parse(v6, Proto::Udp, UDP_UNCONNECTED, true);
        assert_eq!(got[0].addr, Ipv4Addr::UNSPECIFIED);
        assert_eq!((got[1].addr, got[1].port), (Ipv4Addr::LOCALHOST, 0x36));
    }
}
