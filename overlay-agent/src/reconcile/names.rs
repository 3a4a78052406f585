//! The `NAMES` entries a network should have: what the datapath answers from (docs/names.md,
//! "In the datapath"). The mirror (mirror.rs) writes them like every other map, only what
//! changed.
//!
//! Every endpoint of the network answers to its container's name, each alias and each service,
//! each of them also as `<name>.<network name>`. A name several endpoints share resolves to all
//! their addresses, in address order (the program rotates them per answer). A name with more
//! addresses than an entry holds (`NAME_ADDRS`), or too long for a key (`NAME_LEN`), is left
//! out: its query goes to the userspace resolver, which answers it whole.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use overlay_common::dns::{NAME_ADDRS, NameAddrs, NameKey, name_key};

use crate::{desired::Desired, model::Network};

/// The entries network `n`, carried under `vni`, should have in `NAMES`.
pub fn network_names(desired: &Desired, n: &Network, vni: u32) -> BTreeMap<NameKey, NameAddrs> {
    let mut addrs: BTreeMap<NameKey, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    let mut add = |name: &str, ip: Ipv4Addr| {
        for name in [name.to_owned(), format!("{name}.{}", n.name)] {
            if let Some(key) = name_key(vni, &name) {
                addrs.entry(key).or_default().insert(ip);
            }
        }
    };
    for id in desired.endpoints_of_network(&n.id) {
        let Some(e) = desired.endpoint(id) else { continue };
        add(&e.name, e.ipv4);
        for alias in &e.aliases {
            add(alias, e.ipv4);
        }
    }
    addrs
        .into_iter()
        .filter(|(_, ips)| ips.len() <= NAME_ADDRS)
        .map(|(key, ips)| {
            let mut value = NameAddrs { count: ips.len() as u32, addrs: [[0; 4]; NAME_ADDRS] };
            for (slot, ip) in value.addrs.iter_mut().zip(ips) {
                *slot = ip.octets();
            }
            (key, value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use overlay_common::dns::{NAME_ADDRS, name_key};

    use super::network_names;
    use crate::{
        desired::{Desired, Dirty},
        model::{Endpoint, State, Update},
        reconcile::testing::add_network,
    };

    fn ep(
        id: &str,
        net: &str,
        container: &str,
        ip: [u8; 4],
        aliases: &[&str],
        services: &[&str],
    ) -> Endpoint {
        let mut e = Endpoint::new(id, net, container, "h2", Ipv4Addr::from(ip));
        e.aliases = aliases.iter().map(|a| (*a).to_owned()).collect();
        e.services = services.iter().map(|s| (*s).to_owned()).collect();
        e
    }

    fn desired(endpoints: Vec<Endpoint>) -> Desired {
        let mut s = State::default();
        add_network(&mut s, "n1", 100, 1);
        add_network(&mut s, "n2", 200, 2);
        for e in endpoints {
            s.endpoints.insert(e.id.clone(), e);
        }
        let mut d = Desired::new("h1");
        d.apply(Update::Snapshot(s), &mut Dirty::default());
        d
    }

    /// The names of network `id` as (name, addresses) in key order, for short assertions.
    fn names(d: &Desired, id: &str, vni: u32) -> Vec<(String, Vec<Ipv4Addr>)> {
        let n = d.network(id).unwrap();
        network_names(d, n, vni)
            .into_iter()
            .map(|(k, v)| {
                assert_eq!(k.vni, vni);
                // Back from wire format to dotted, for reading.
                let mut name = String::new();
                let mut at = 0;
                while k.name[at] != 0 {
                    let len = k.name[at] as usize;
                    if !name.is_empty() {
                        name.push('.');
                    }
                    name.push_str(std::str::from_utf8(&k.name[at + 1..=at + len]).unwrap());
                    at += 1 + len;
                }
                let ips = v.addrs[..v.count as usize].iter().map(|a| Ipv4Addr::from(*a)).collect();
                (name, ips)
            })
            .collect()
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 1, last)
    }

    #[test]
    fn every_endpoint_answers_to_its_container_aliases_and_services_plain_and_qualified() {
        let d = desired(vec![
            ep("a", "n1", "Web", [10, 0, 1, 2], &["www"], &["front"]),
            ep("b", "n1", "db", [10, 0, 1, 3], &[], &[]),
            // Another network's endpoint is none of n1's names.
            ep("c", "n2", "other", [10, 0, 2, 2], &["www"], &[]),
        ]);
        let mut got = names(&d, "n1", 100);
        got.sort();
        let expected: Vec<(String, Vec<Ipv4Addr>)> = [
            ("db", 3),
            ("db.n1", 3),
            ("front", 2),
            ("front.n1", 2),
            // Lowercased: DNS names compare case-insensitively.
            ("web", 2),
            ("web.n1", 2),
            ("www", 2),
            ("www.n1", 2),
        ]
        .into_iter()
        .map(|(n, last)| (n.to_owned(), vec![ip(last)]))
        .collect();
        assert_eq!(got, expected);
        assert_eq!(names(&d, "n2", 200).len(), 4, "other, other.n2, www, www.n2");
    }

    #[test]
    fn a_shared_name_has_every_address_and_too_many_leave_it_to_the_resolver() {
        let mut eps: Vec<Endpoint> = (0..NAME_ADDRS as u8)
            .map(|i| ep(&format!("e{i}"), "n1", &format!("c{i}"), [10, 0, 1, 10 + i], &["api"], &[]))
            .collect();
        let d = desired(eps.clone());
        let api = names(&d, "n1", 100).into_iter().find(|(n, _)| n == "api").unwrap();
        assert_eq!(api.1, (0..NAME_ADDRS as u8).map(|i| ip(10 + i)).collect::<Vec<_>>());

        // One more backend than an entry holds: the name is not in the map at all (never a
        // subset); the containers' own names stay.
        eps.push(ep("e-last", "n1", "c-last", [10, 0, 1, 99], &["api"], &[]));
        let d = desired(eps);
        let got = names(&d, "n1", 100);
        assert!(!got.iter().any(|(n, _)| n == "api" || n == "api.n1"), "{got:?}");
        assert!(got.iter().any(|(n, _)| n == "c-last"));
    }

    #[test]
    fn removing_an_endpoint_removes_its_names_and_its_share_of_shared_ones() {
        let mut d = desired(vec![
            ep("a", "n1", "web", [10, 0, 1, 2], &["api"], &[]),
            ep("b", "n1", "web2", [10, 0, 1, 3], &["api"], &[]),
        ]);
        d.apply(Update::Delete(crate::model::ObjectRef::Endpoint("b".into())), &mut Dirty::default());
        let got = names(&d, "n1", 100);
        assert_eq!(got.iter().find(|(n, _)| n == "api").unwrap().1, [ip(2)]);
        assert!(!got.iter().any(|(n, _)| n.starts_with("web2")));
    }

    #[test]
    fn names_too_long_for_a_key_are_left_out() {
        let long = "x".repeat(60);
        let d = desired(vec![ep("a", "n1", &long, [10, 0, 1, 2], &[], &[])]);
        // "<60 x>" fits (62 bytes in wire format); "<60 x>.n1" does not.
        assert_eq!(names(&d, "n1", 100), [(long.clone(), vec![ip(2)])]);
        assert!(name_key(100, &format!("{long}.n1")).is_none());
    }
}
