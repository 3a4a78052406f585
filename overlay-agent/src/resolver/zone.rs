//! What the agent's resolver answers for itself: the names of the networks this host takes part
//! in, and who may ask for which. Built from the desired state after each pass that changed it.
//!
//! The same names as the `NAMES` map (reconcile/names.rs: container names, aliases and services,
//! each also as `<name>.<network>`), without the map's limits (any number of addresses, any
//! length), plus the reverse (PTR) names of every address in the networks' subnets. A container
//! on several networks resolves the names of all of them, whichever gateway it asks: the client
//! is known by its source address, which belongs to one endpoint since subnets never overlap.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use crate::desired::Desired;

/// One network's names.
struct NetZone {
    subnet: Ipv4Net,
    /// Lowercased dotted names (no final dot) -> their addresses, in address order.
    names: HashMap<String, Vec<Ipv4Addr>>,
    /// Address -> the name its PTR record gives: `<container>.<network>`, as Docker's.
    reverse: HashMap<Ipv4Addr, String>,
}

/// The names the resolver answers, per client.
#[derive(Default)]
pub struct Zone {
    nets: Vec<NetZone>,
    /// The address of each endpoint on this host -> the networks (indexes into `nets`) its
    /// container is on.
    clients: HashMap<Ipv4Addr, Vec<usize>>,
}

/// What the zone says of a name, for the client that asked.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A name of one of the client's networks, with all its addresses.
    Addresses(Vec<Ipv4Addr>),
    /// The reverse name of an address in one of the client's subnets: the name of whoever holds
    /// it (None: nobody; the answer is NXDOMAIN, never a question for the upstreams about the
    /// overlay's private addresses).
    Pointer(Option<String>),
    /// Not the overlay's: for the upstream resolvers.
    NotOurs,
}

impl Zone {
    /// The zone of host `me`: the networks its endpoints are on.
    pub fn build(desired: &Desired, me: &str) -> Self {
        let mut zone = Self::default();
        let mut index: HashMap<String, usize> = HashMap::new();
        for id in desired.endpoints_of_host(me) {
            let Some(ep) = desired.endpoint(id) else { continue };
            let Some(container) = &ep.container else { continue };
            // Every network of the container, not only this endpoint's.
            let networks: BTreeSet<String> = desired
                .endpoints_of_container(container)
                .filter_map(|id| desired.endpoint(id))
                .map(|e| e.network_id.to_string())
                .collect();
            let mut of_client = Vec::new();
            for net in networks {
                let at = if let Some(at) = index.get(&net) {
                    *at
                } else {
                    let Some(z) = net_zone(desired, &net) else { continue };
                    zone.nets.push(z);
                    index.insert(net, zone.nets.len() - 1);
                    zone.nets.len() - 1
                };
                of_client.push(at);
            }
            zone.clients.insert(ep.ipv4, of_client);
        }
        zone
    }

    /// What `name` (dotted, any case, with or without the final dot) is for `client`.
    pub fn find(&self, client: Ipv4Addr, name: &str) -> Found {
        let Some(nets) = self.clients.get(&client) else { return Found::NotOurs };
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if let Some(ip) = reverse_address(&name) {
            for &at in nets {
                let net = &self.nets[at];
                if net.subnet.contains(&ip) {
                    return Found::Pointer(net.reverse.get(&ip).cloned());
                }
            }
            return Found::NotOurs;
        }
        let mut addrs: Vec<Ipv4Addr> = Vec::new();
        for &at in nets {
            if let Some(found) = self.nets[at].names.get(&name) {
                addrs.extend(found);
            }
        }
        if addrs.is_empty() {
            return Found::NotOurs;
        }
        addrs.sort_unstable();
        addrs.dedup();
        Found::Addresses(addrs)
    }

    /// Whether `client` is an endpoint of this host (anyone else has no business here).
    pub fn knows(&self, client: Ipv4Addr) -> bool {
        self.clients.contains_key(&client)
    }
}

fn net_zone(desired: &Desired, id: &str) -> Option<NetZone> {
    let n = desired.network(id)?;
    let mut names: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
    let mut reverse = HashMap::new();
    let network = n.name.to_ascii_lowercase();
    for id in desired.endpoints_of_network(&n.id) {
        let Some(e) = desired.endpoint(id) else { continue };
        reverse.insert(e.ipv4, format!("{}.{}", e.name, n.name));
        for name in std::iter::once(&e.name).chain(e.aliases.iter()) {
            let name = name.to_ascii_lowercase();
            names.entry(format!("{name}.{network}")).or_default().push(e.ipv4);
            names.entry(name).or_default().push(e.ipv4);
        }
    }
    for addrs in names.values_mut() {
        addrs.sort_unstable();
        addrs.dedup();
    }
    Some(NetZone { subnet: n.subnet, names, reverse })
}

/// The address a reverse name (`d.c.b.a.in-addr.arpa`) stands for, if it names one whole.
fn reverse_address(name: &str) -> Option<Ipv4Addr> {
    let octets = name.strip_suffix(".in-addr.arpa")?;
    let mut parts = octets.split('.');
    let mut out = [0u8; 4];
    for slot in out.iter_mut().rev() {
        let part = parts.next()?;
        // Decimal without leading zeros, as reverse names are written.
        if part.is_empty() || part.len() > 1 && part.starts_with('0') {
            return None;
        }
        *slot = part.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(out))
}

/// A zone for tests: n1 (10.0.1.0/24) and n2 (10.0.2.0/24); on h1, web on both (10.0.1.2 with
/// alias www, 10.0.2.2) and api on n2 (10.0.2.3, alias www); db on n1 on h2 (10.0.1.3).
#[cfg(test)]
pub mod testing {
    use std::net::Ipv4Addr;

    use super::Zone;
    use crate::{
        desired::{Desired, Dirty},
        model::{State, Update},
        reconcile::testing::{add_endpoint, add_network},
    };

    pub fn sample() -> Zone {
        let mut s = State::default();
        add_network(&mut s, "n1", 100, 1);
        add_network(&mut s, "n2", 200, 2);
        for (id, net, container, host, ip, aliases) in [
            ("a", "n1", "web", "h1", [10, 0, 1, 2], &["www"][..]),
            ("b", "n2", "web", "h1", [10, 0, 2, 2], &[]),
            ("c", "n2", "api", "h1", [10, 0, 2, 3], &["www"]),
            ("d", "n1", "db", "h2", [10, 0, 1, 3], &[]),
        ] {
            add_endpoint(&mut s, id, net, container, host, Ipv4Addr::from(ip));
            s.endpoints.get_mut(id).unwrap().aliases = aliases.iter().map(|a| (*a).to_owned()).collect();
        }
        let mut d = Desired::new("h1");
        d.apply(Update::Snapshot(s), &mut Dirty::default());
        Zone::build(&d, "h1")
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{Found, reverse_address, testing::sample as zone};

    const WEB1: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
    const WEB2: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    const API: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
    const DB: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 3);

    #[test]
    fn a_container_on_two_networks_resolves_both_whichever_address_it_asks_from() {
        let z = zone();
        for client in [WEB1, WEB2] {
            assert_eq!(z.find(client, "db"), Found::Addresses(vec![DB]));
            assert_eq!(z.find(client, "API.n2."), Found::Addresses(vec![API]));
            // An alias on both networks: every address.
            assert_eq!(z.find(client, "www"), Found::Addresses(vec![WEB1, API]));
        }
        // api is only on n2: n1's names are not its to resolve.
        assert_eq!(z.find(API, "db"), Found::NotOurs);
        assert_eq!(z.find(API, "www"), Found::Addresses(vec![API]));
        assert_eq!(z.find(API, "www.n1"), Found::NotOurs);
        // A remote endpoint, or anyone else, is no client of this host's resolver.
        assert!(!z.knows(DB) && z.knows(API));
        assert_eq!(z.find(DB, "web"), Found::NotOurs);
    }

    #[test]
    fn reverse_names_in_the_clients_subnets_are_answered_and_others_are_not_ours() {
        let z = zone();
        assert_eq!(z.find(WEB1, "3.1.0.10.in-addr.arpa"), Found::Pointer(Some("db.n1".into())));
        assert_eq!(z.find(WEB1, "99.1.0.10.in-addr.arpa."), Found::Pointer(None));
        // Not in api's subnets: the upstreams' question.
        assert_eq!(z.find(API, "3.1.0.10.in-addr.arpa"), Found::NotOurs);
        assert_eq!(z.find(WEB1, "1.0.10.in-addr.arpa"), Found::NotOurs);
        assert_eq!(z.find(WEB1, "8.8.8.8.in-addr.arpa"), Found::NotOurs);
    }

    #[test]
    fn only_whole_canonical_reverse_names_are_addresses() {
        assert_eq!(reverse_address("4.3.2.1.in-addr.arpa"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        for bad in [
            "3.2.1.in-addr.arpa",
            "5.4.3.2.1.in-addr.arpa",
            "04.3.2.1.in-addr.arpa",
            "256.3.2.1.in-addr.arpa",
            "a.3.2.1.in-addr.arpa",
            "4.3.2.1",
        ] {
            assert_eq!(reverse_address(bad), None, "{bad}");
        }
    }
}
