//! Published ports (`-p`, CNI `portMappings`, Docker's port map): a host port is the host's, so
//! one container at a time holds it. Each is a key `<prefix>/ports/<host>/<proto>/<port>` holding
//! the container's name, written in the transaction that makes the container (under the host's
//! lease, as the container) and deleted in the one that removes it: a second container asking
//! for the port is refused with the holder's name, and nothing of it is written.
//!
//! The host address a port is published on is not part of the key: `198.18.0.1:80` and
//! `198.18.0.2:80` on one host are refused as a conflict, stricter than Docker, so that a
//! wildcard and a specific address can never both match one packet.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    ops::RangeInclusive,
};

use etcd_client::{Compare, KeyValue, TxnOp};
use overlay_common::VXLAN_PORT;

use super::{
    Result, StoreError,
    endpoint::put_leased,
    etcd::{Range, absent},
    keys::Keys,
};
use crate::model::{Container, Network, PortMapping, Proto};

/// Most ports one container publishes. Each is a key written in the one etcd transaction that
/// makes the container, and etcd refuses a transaction of more than 128 writes (its
/// `--max-txn-ops` default); the container's own keys need the rest. Refused up front with
/// this reason, rather than by etcd with "too many operations".
pub const MAX_PER_CONTAINER: usize = 100;

/// Where Docker's `-p 80` (no host port) takes one from: dockerd's own default range.
pub const ANY_HOST_PORT: RangeInclusive<u16> = 49153..=60999;

/// A port to publish as a runtime asks for it: one host port, or the first free one of a range
/// (Docker's `-p 8080-8090:80`, and `-p 80`, which takes any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRequest {
    pub proto: Proto,
    pub host_ip: Option<Ipv4Addr>,
    pub host_ports: RangeInclusive<u16>,
    pub container_port: u16,
}

impl PortRequest {
    pub fn shown(&self) -> String {
        let ip = self.host_ip.map(|ip| format!("{ip}:")).unwrap_or_default();
        let (start, end) = (self.host_ports.start(), self.host_ports.end());
        let ports = if start == end { start.to_string() } else { format!("{start}-{end}") };
        format!("{ip}{ports}:{}/{}", self.container_port, self.proto.as_str())
    }
}

/// Docker's `-p` as the project's CLI takes it: `[HOST_IP:][HOST_PORT[-END]:]CONTAINER_PORT[-END][/tcp|/udp]`.
/// No host port (`80`, `198.18.0.1::80`) takes one of [`ANY_HOST_PORT`]; a host range for one
/// container port (`8080-8090:80`) takes its first free port; a container range takes a host
/// range as long, port by port (`8000-8001:80-81`), or any host ports (`80-81`).
pub fn parse_publish(text: &str) -> std::result::Result<Vec<PortRequest>, String> {
    let (ports, proto) = match text.rsplit_once('/') {
        Some((p, "tcp")) => (p, Proto::Tcp),
        Some((p, "udp")) => (p, Proto::Udp),
        Some((_, other)) => return Err(format!("protocol {other:?} is neither tcp nor udp")),
        None => (text, Proto::Tcp),
    };
    let parts: Vec<&str> = ports.split(':').collect();
    let (host_ip, host, container) = match parts.as_slice() {
        [c] => (None, "", *c),
        [h, c] => (None, *h, *c),
        [ip, h, c] => {
            let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
            ((!ip.is_unspecified()).then_some(ip), *h, *c)
        }
        _ => return Err("expected [HOST_IP:][HOST_PORT[-END]:]CONTAINER_PORT[-END][/tcp|/udp]".into()),
    };
    let range = |what: &str, p: &str| -> std::result::Result<RangeInclusive<u16>, String> {
        let port = |n: &str| match n.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{what} {p:?} is not a port or range of ports (1-65535)")),
            Ok(n) => Ok(n),
        };
        let (start, end) = match p.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(p)?, port(p)?),
        };
        if start > end {
            return Err(format!("{what} range {p:?} ends before it starts"));
        }
        Ok(start..=end)
    };
    let container = range("container port", container)?;
    let host = if host.is_empty() { None } else { Some(range("host port", host)?) };
    let request = |host_ports: RangeInclusive<u16>, container_port: u16| PortRequest {
        proto,
        host_ip,
        host_ports,
        container_port,
    };
    let (c_start, c_end) = (*container.start(), *container.end());
    Ok(match host {
        None => container.map(|c| request(ANY_HOST_PORT, c)).collect(),
        Some(h) if c_start == c_end => vec![request(h, c_start)],
        Some(h) if h.len() == container.len() => h.zip(container).map(|(h, c)| request(h..=h, c)).collect(),
        Some(h) => {
            return Err(format!(
                "host ports {}-{} and container ports {c_start}-{c_end} are not ranges of one length",
                h.start(),
                h.end()
            ));
        }
    })
}

/// A runtime's host address for a published port, as CNI's `hostIP` and Docker's `HostIP` give
/// it: "" and 0.0.0.0 are every address of the host (`Some(None)`), an IPv4 address that one;
/// an IPv6 one is `None`, to be left out (the overlay carries IPv4; runtimes send `::` beside
/// `0.0.0.0` where the host has IPv6). Anything else is not an address.
pub fn host_ip(text: &str) -> std::result::Result<Option<Option<Ipv4Addr>>, std::net::AddrParseError> {
    if text.is_empty() {
        return Ok(Some(None));
    }
    Ok(match text.parse::<std::net::IpAddr>()? {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => Some(None),
        std::net::IpAddr::V4(ip) => Some(Some(ip)),
        std::net::IpAddr::V6(_) => None,
    })
}

/// The key that holds published port `p` on `host`.
fn key(k: &Keys, host: &str, proto: Proto, port: u16) -> String {
    k.port(host, proto.as_str(), port)
}

/// What to read for [`claim`]: every port published on `host`.
pub(super) fn read(k: &Keys, host: &str) -> Range {
    Range::Prefix(k.ports(host))
}

/// The ports [`read`] found, key -> holder, for [`claim`].
pub(super) fn taken(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            (String::from_utf8_lossy(kv.key()).into_owned(), String::from_utf8_lossy(kv.value()).into_owned())
        })
        .collect()
}

/// The deletes of a removed container's published ports (with its key, in one transaction).
pub(super) fn deletes(k: &Keys, c: &Container) -> Vec<TxnOp> {
    c.ports.iter().map(|p| TxnOp::delete(key(k, &c.host, p.proto, p.host_port), None)).collect()
}

/// Refuses requests that cannot work, before anything is read: port 0, an empty range, the
/// same host port asked for twice, more ports than [`MAX_PER_CONTAINER`]. `what` names the option
/// in the error.
pub(super) fn check(what: &'static str, requests: &[PortRequest]) -> Result<()> {
    if requests.len() > MAX_PER_CONTAINER {
        let (first, last) = (&requests[0], &requests[requests.len() - 1]);
        return Err(StoreError::Invalid {
            what,
            value: format!("{} ... {}", first.shown(), last.shown()),
            reason: format!(
                "{} ports: a container publishes at most {MAX_PER_CONTAINER} (each is a key written with the container in one etcd transaction)",
                requests.len()
            ),
        });
    }
    let mut fixed = BTreeSet::new();
    for r in requests {
        if r.container_port == 0 || *r.host_ports.start() == 0 || r.host_ports.is_empty() {
            return Err(StoreError::Invalid {
                what,
                value: r.shown(),
                reason: "ports are 1-65535, and a range's start is not above its end".into(),
            });
        }
        if r.proto == Proto::Udp && r.host_ports == (VXLAN_PORT..=VXLAN_PORT) {
            return Err(StoreError::Invalid {
                what,
                value: r.shown(),
                reason: format!("UDP {VXLAN_PORT} is the overlay's own (VXLAN between the hosts)"),
            });
        }
        if r.host_ports.start() == r.host_ports.end() && !fixed.insert((r.proto, *r.host_ports.start())) {
            return Err(StoreError::Invalid {
                what,
                value: r.shown(),
                reason: format!("host port {}/{} is asked for twice", r.host_ports.start(), r.proto.as_str()),
            });
        }
    }
    Ok(())
}

/// Refuses ports on a network with no way out: a published port leads through the host, which
/// an `--internal` network (or one without a gateway) does not have.
pub fn check_network(what: &'static str, net: &Network, requests: &[PortRequest]) -> Result<()> {
    if requests.is_empty() || net.has_egress() {
        return Ok(());
    }
    Err(StoreError::Invalid {
        what,
        value: requests.iter().map(PortRequest::shown).collect::<Vec<_>>().join(","),
        reason: format!(
            "network {:?} has no way out ({}): ports are published on networks with one",
            net.name,
            if net.internal { "--internal" } else { "no gateway" }
        ),
    })
}

/// Chooses the host ports of `requests` for container `holder` on `host`, given `taken` (what
/// [`read`] found, through [`taken`]): a fixed port held by another container is refused naming it; a range
/// takes its first free port. Returns the ports, and the compares and writes that hold them in
/// the caller's transaction (each key still absent: a racing claim makes the commit fail and
/// the caller read again).
pub(super) fn claim(
    k: &Keys,
    host: &str,
    holder: &str,
    requests: &[PortRequest],
    taken: &BTreeMap<String, String>,
    lease: i64,
) -> Result<(Vec<PortMapping>, Vec<Compare>, Vec<TxnOp>)> {
    let mut held: BTreeSet<String> = taken.keys().cloned().collect();
    let holder_of =
        |key: &str| taken.get(key).cloned().unwrap_or_else(|| "another port of this request".to_owned());
    let (mut ports, mut compares, mut ops) = (Vec::new(), Vec::new(), Vec::new());
    for r in requests {
        let free = r
            .host_ports
            .clone()
            .filter(|&p| !(r.proto == Proto::Udp && p == VXLAN_PORT))
            .find(|&p| !held.contains(&key(k, host, r.proto, p)));
        let Some(port) = free else {
            let first = key(k, host, r.proto, *r.host_ports.start());
            return Err(if r.host_ports.start() == r.host_ports.end() {
                StoreError::PortTaken {
                    port: *r.host_ports.start(),
                    proto: r.proto.as_str(),
                    host: host.to_owned(),
                    holder: holder_of(&first),
                }
            } else {
                StoreError::Invalid {
                    what: "published port",
                    value: r.shown(),
                    reason: format!("every host port of the range is published already on host {host:?}"),
                }
            });
        };
        let key = key(k, host, r.proto, port);
        held.insert(key.clone());
        compares.push(absent(&key));
        ops.push(put_leased(key, holder.to_owned(), lease));
        ports.push(PortMapping {
            proto: r.proto,
            host_ip: r.host_ip,
            host_port: port,
            container_port: r.container_port,
        });
    }
    Ok((ports, compares, ops))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ports: RangeInclusive<u16>) -> PortRequest {
        PortRequest { proto: Proto::Tcp, host_ip: None, host_ports: ports, container_port: 80 }
    }

    #[test]
    fn publish_takes_dockers_forms() {
        let one = |t: &str| {
            let mut v = parse_publish(t).unwrap();
            assert_eq!(v.len(), 1, "{t}");
            v.remove(0)
        };
        assert_eq!(one("8080:80"), req(8080..=8080));
        assert_eq!(one("8080-8090:80"), req(8080..=8090));
        assert_eq!(one("80"), req(ANY_HOST_PORT));
        let r = one("198.18.0.1::53/udp");
        assert_eq!(
            (r.proto, r.host_ip, r.host_ports),
            (Proto::Udp, Some("198.18.0.1".parse().unwrap()), ANY_HOST_PORT)
        );
        assert_eq!(one("0.0.0.0:8080:80").host_ip, None);
        let pairs: Vec<(u16, u16)> = parse_publish("8000-8002:80-82")
            .unwrap()
            .iter()
            .map(|r| (*r.host_ports.start(), r.container_port))
            .collect();
        assert_eq!(pairs, [(8000, 80), (8001, 81), (8002, 82)]);
        assert_eq!(parse_publish("80-81").unwrap().len(), 2);
        for bad in
            ["8000-8001:80-82", "9000-8000:80", "0:80", "80:0", "a:80", "1.2.3:80:80", "80/sctp", "1:2:3:4"]
        {
            assert!(parse_publish(bad).is_err(), "{bad} was taken");
        }
    }

    #[test]
    fn the_vxlan_port_is_never_published() {
        let udp = |ports| PortRequest { proto: Proto::Udp, ..req(ports) };
        let err = check("-p", &[udp(4789..=4789)]).unwrap_err().to_string();
        assert!(err.contains("VXLAN"), "{err}");
        assert!(check("-p", &[req(4789..=4789)]).is_ok(), "TCP 4789 is anybody's");
        let k = Keys::new("/t");
        let (ports, ..) = claim(&k, "h1", "c", &[udp(4789..=4790)], &BTreeMap::new(), 0).unwrap();
        assert_eq!(ports[0].host_port, 4790, "a range skips UDP 4789");
    }

    #[test]
    fn a_range_takes_its_first_free_port_and_a_fixed_one_names_its_holder() {
        let k = Keys::new("/t");
        let taken: BTreeMap<String, String> =
            [("/t/ports/h1/tcp/8080", "web"), ("/t/ports/h1/tcp/8081", "api")]
                .map(|(k, v)| (k.into(), v.into()))
                .into();
        let (ports, compares, ops) =
            claim(&k, "h1", "new", &[req(8080..=8090), req(8083..=8083)], &taken, 0).unwrap();
        assert_eq!(ports.iter().map(|p| p.host_port).collect::<Vec<_>>(), [8082, 8083]);
        assert_eq!((compares.len(), ops.len()), (2, 2));
        // Two ranges in one request do not take the same port.
        let (ports, ..) = claim(&k, "h1", "new", &[req(8080..=8090), req(8080..=8090)], &taken, 0).unwrap();
        assert_eq!(ports.iter().map(|p| p.host_port).collect::<Vec<_>>(), [8082, 8083]);
        match claim(&k, "h1", "new", &[req(8081..=8081)], &taken, 0) {
            Err(StoreError::PortTaken { port: 8081, holder, .. }) => assert_eq!(holder, "api"),
            other => panic!("{other:?}"),
        }
        assert!(
            claim(&k, "h1", "new", &[req(8080..=8081)], &taken, 0)
                .unwrap_err()
                .to_string()
                .contains("every host port")
        );
        // Another host's ports and the other protocol are free.
        assert!(claim(&k, "h2", "new", &[req(8080..=8080)], &taken, 0).is_ok());
        let udp = PortRequest { proto: Proto::Udp, ..req(8080..=8080) };
        assert!(claim(&k, "h1", "new", &[udp], &taken, 0).is_ok());
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_read() {
        assert!(check("-p", &[req(8080..=8080), req(8081..=8090)]).is_ok());
        assert!(
            check("-p", &[req(8080..=8080), req(8080..=8080)]).unwrap_err().to_string().contains("twice")
        );
        assert!(check("-p", &[req(0..=0)]).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = req(9000..=8000);
        assert!(check("-p", &[backwards]).is_err());
        assert!(check("-p", &[PortRequest { container_port: 0, ..req(80..=80) }]).is_err());
        let many = |n: u16| parse_publish(&format!("10000-{}:10000-{}", 9999 + n, 9999 + n)).unwrap();
        assert!(check("-p", &many(MAX_PER_CONTAINER as u16)).is_ok());
        let err = check("-p", &many(MAX_PER_CONTAINER as u16 + 1)).unwrap_err().to_string();
        assert!(err.contains("101 ports") && err.contains("at most 100"), "{err}");
    }
}
