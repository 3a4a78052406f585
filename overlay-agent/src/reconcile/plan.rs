//! The plan of a pass: from what changed (the dirty keys), what is desired and what exists, the
//! set of things the pass has to look at. No I/O happens here; the pass then brings each of
//! them to what is desired.
//!
//! A change reaches further than its own key: a container's endpoints live in its namespace, a
//! network's endpoints are in the maps only while this host takes part in it, and a host's
//! endpoints point at its VTEP. The plan follows those links, so that the pass touches every
//! object a change can affect and nothing else.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
};

use super::{local::Local, mirror::Mirror};
use crate::{
    desired::{Desired, Dirty, Ep, Id},
    model::{Container, Network},
    sandbox,
};

/// This host, as the plan and the plumbing see it.
#[derive(Clone, Debug)]
pub struct Here {
    /// The host's name.
    pub me: String,
    /// What the agent starts the names of the sandboxes it makes with.
    pub sandbox_prefix: String,
}

impl Here {
    /// The namespace a container of this host lives in.
    pub fn netns_of(&self, c: &Container) -> PathBuf {
        c.netns.clone().unwrap_or_else(|| sandbox::path(&self.sandbox_prefix, &c.name))
    }

    /// The namespace of a container by name, also once it is no longer desired: then the one
    /// it was set up in (`sandboxes`: a foreign one for `--netns`), or the one the agent would
    /// have made.
    fn netns_of_name(&self, desired: &Desired, sandboxes: &BTreeMap<String, PathBuf>, name: &str) -> PathBuf {
        match desired.container(name) {
            Some(c) => self.netns_of(c),
            None => sandboxes.get(name).cloned().unwrap_or_else(|| sandbox::path(&self.sandbox_prefix, name)),
        }
    }

    /// The endpoint with its network and container, if it should have an interface here.
    pub fn local_here<'a>(
        &self,
        desired: &'a Desired,
        id: &str,
    ) -> Option<(&'a Ep, &'a Network, &'a Container)> {
        let e = desired.endpoint(id).filter(|e| *e.host == *self.me)?;
        let n = desired.network(&e.network_id)?;
        let c = desired.container(e.container.as_deref()?)?;
        Some((e, n, c))
    }

    /// The VNI of a network this host takes part in (has an endpoint of), or None.
    pub fn joined_vni(&self, desired: &Desired, network_id: &str) -> Option<u32> {
        let n = desired.network(network_id)?;
        desired
            .endpoints_of_network(network_id)
            .any(|id| self.local_here(desired, id).is_some())
            .then_some(n.vni)
    }
}

/// What exists on this host as a pass starts (after adoption, on a full pass).
pub struct Existing<'a> {
    /// Local endpoints whose interface exists.
    pub locals: &'a HashMap<Id, Local>,
    /// Containers set up here (the agent made their sandbox, or used their `--netns`), with
    /// their namespace.
    pub sandboxes: BTreeMap<String, PathBuf>,
    /// What the maps hold.
    pub mirror: &'a Mirror,
}

/// What a pass looks at. Each set may hold more than what will change: the pass compares each
/// member with what is desired and acts only where they differ.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Containers whose sandbox may have to be made or removed.
    pub containers: BTreeSet<String>,
    /// Endpoints whose interface on this host may have to be made, remade or removed.
    pub locals: BTreeSet<Id>,
    /// Networks whose participation may change, each with the VNI this host should carry for
    /// it (None: the host takes no part in it).
    pub networks: BTreeMap<String, Option<u32>>,
    /// Endpoints whose ENDPOINTS entry may change.
    pub entries: BTreeSet<Id>,
    /// Hosts whose PEERS entry may change.
    pub peers: BTreeSet<String>,
    /// A full pass: afterwards, whatever nothing desired explains is removed.
    pub full: bool,
}

impl Plan {
    pub fn new(here: &Here, desired: &Desired, mut dirty: Dirty, existing: &Existing<'_>) -> Self {
        let Existing { locals, sandboxes, mirror } = existing;
        if dirty.full {
            // Everything desired, and everything that exists, which is how what nothing desires
            // any more is found and removed.
            dirty
                .networks
                .extend(desired.networks().map(|n| n.id.clone()).chain(mirror.joined_ids().cloned()));
            dirty.endpoints.extend(
                desired
                    .endpoint_ids()
                    .cloned()
                    .chain(mirror.entry_ids().cloned())
                    .chain(locals.keys().cloned()),
            );
            dirty
                .containers
                .extend(desired.containers().map(|c| c.name.clone()).chain(sandboxes.keys().cloned()));
            dirty.hosts.extend(desired.hosts().map(|h| h.name.clone()).chain(mirror.peer_names().cloned()));
        }
        let Dirty { networks: dirty_networks, endpoints, containers, hosts, full } = dirty;

        // Local endpoints: the changed ones, those of changed containers (desired, or existing
        // in the container's namespace), and those of changed networks.
        let mut local_set: BTreeSet<Id> = endpoints.clone();
        for c in &containers {
            local_set.extend(desired.endpoints_of_container(c).cloned());
            let netns = here.netns_of_name(desired, sandboxes, c);
            local_set.extend(locals.iter().filter(|(_, l)| l.netns == netns).map(|(id, _)| id.clone()));
        }
        for n in &dirty_networks {
            local_set.extend(desired.endpoints_of_network(n).cloned());
            local_set.extend(locals.iter().filter(|(_, l)| *l.network_id == **n).map(|(id, _)| id.clone()));
        }

        // Networks whose participation may change with these endpoints: the one each is desired
        // in, and the one its interface was made for.
        let mut network_ids: BTreeSet<String> = dirty_networks;
        for id in &local_set {
            for network_id in
                [desired.endpoint(id).map(|e| &e.network_id), locals.get(id).map(|l| &l.network_id)]
                    .into_iter()
                    .flatten()
            {
                // A full pass visits every endpoint, so allocate only for networks not seen yet.
                if !network_ids.contains(&**network_id) {
                    network_ids.insert(network_id.to_string());
                }
            }
        }

        // Map entries: the changed endpoints, the local ones, every endpoint of a network this
        // host joins, leaves or sees under another VNI (including entries whose endpoint is gone
        // from the desired state), and the endpoints of changed hosts (their VTEP).
        let mut entries: BTreeSet<Id> = endpoints;
        entries.extend(local_set.iter().cloned());
        let mut networks = BTreeMap::new();
        for n in network_ids {
            let vni = here.joined_vni(desired, &n);
            if vni != mirror.joined(&n) {
                entries.extend(desired.endpoints_of_network(&n).cloned());
                entries.extend(
                    mirror
                        .entry_ids()
                        .filter(|id| desired.endpoint(id).is_none_or(|e| *e.network_id == *n))
                        .cloned(),
                );
            }
            networks.insert(n, vni);
        }
        for h in &hosts {
            entries.extend(desired.endpoints_of_host(h).cloned());
        }

        Self { containers, locals: local_set, networks, entries, peers: hosts, full }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet, HashMap},
        net::Ipv4Addr,
    };

    use super::{Existing, Plan};
    use crate::{
        desired::{Desired, Dirty, Id},
        model::{Object, ObjectRef, Update},
        reconcile::{
            local::Local,
            mirror::Mirror,
            testing::{Pass, add_endpoint, add_network, here, network, sandbox_path, state},
        },
    };

    fn ids(set: &BTreeSet<Id>) -> Vec<&str> {
        set.iter().map(|i| &**i).collect()
    }

    fn plan(desired: &Desired, dirty: Dirty, locals: &HashMap<Id, Local>, mirror: &Mirror) -> Plan {
        Plan::new(&here(), desired, dirty, &Existing { locals, sandboxes: BTreeMap::new(), mirror })
    }

    #[test]
    fn a_new_container_brings_its_endpoints_and_their_network() {
        let mut s = state();
        add_network(&mut s, "n1", 100, 1);
        add_endpoint(&mut s, "a", "n1", "ca", "h1", Ipv4Addr::new(10, 0, 1, 2));
        add_endpoint(&mut s, "b", "n1", "cb", "h2", Ipv4Addr::new(10, 0, 1, 3));
        let mut desired = Desired::new("h1");
        desired.apply(Update::Snapshot(s), &mut Dirty::default());
        // Only the container changed (its endpoint and network were known already).
        let dirty = Dirty { containers: ["ca".to_owned()].into(), ..Dirty::default() };
        let p = plan(&desired, dirty, &HashMap::new(), &Mirror::default());
        assert_eq!(ids(&p.locals), ["a"]);
        // Joining n1 brings every endpoint of it into the maps, the remote one included.
        assert_eq!(p.networks.into_iter().collect::<Vec<_>>(), [("n1".to_owned(), Some(100))]);
        assert_eq!(ids(&p.entries), ["a", "b"]);
        assert!(p.peers.is_empty() && !p.full);
    }

    #[test]
    fn a_removed_container_reaches_the_interfaces_in_its_namespace() {
        let mut pass = Pass::new();
        let mut s = state();
        add_network(&mut s, "n1", 100, 1);
        add_endpoint(&mut s, "a", "n1", "ca", "h1", Ipv4Addr::new(10, 0, 1, 2));
        pass.snapshot(s.clone(), true);
        assert_eq!(pass.locals["a"].netns, sandbox_path("ca"));

        // The container goes; its endpoint is (wrongly) still desired: the interface in the
        // container's namespace is looked at all the same.
        s.containers.remove("ca");
        let mut dirty = Dirty::default();
        pass.desired.apply(Update::Snapshot(s), &mut dirty);
        assert_eq!(dirty.containers, ["ca".to_owned()].into());
        let p = plan(&pass.desired, dirty, &pass.locals, &pass.mirror);
        assert_eq!(ids(&p.locals), ["a"]);
        assert_eq!(p.networks.get("n1"), Some(&None), "n1 has no local endpoint left");
    }

    #[test]
    fn a_removed_container_in_a_foreign_namespace_reaches_the_interfaces_there() {
        let mut pass = Pass::new();
        let mut s = state();
        add_network(&mut s, "n1", 100, 1);
        add_endpoint(&mut s, "a", "n1", "ca", "h1", Ipv4Addr::new(10, 0, 1, 2));
        let foreign = std::path::PathBuf::from("/run/netns/other-runtime");
        s.containers.get_mut("ca").expect("ca").netns = Some(foreign.clone());
        pass.snapshot(s.clone(), true);
        assert_eq!(pass.locals["a"].netns, foreign);

        // As in the test above, but the namespace is not one the agent names: only what the
        // agent recorded of the container says where its interfaces are.
        s.containers.remove("ca");
        let mut dirty = Dirty::default();
        pass.desired.apply(Update::Snapshot(s), &mut dirty);
        let sandboxes = [("ca".to_owned(), foreign)].into();
        let existing = Existing { locals: &pass.locals, sandboxes, mirror: &pass.mirror };
        let p = Plan::new(&here(), &pass.desired, dirty, &existing);
        assert_eq!(ids(&p.locals), ["a"]);
    }

    #[test]
    fn a_network_left_touches_all_its_entries() {
        let mut pass = Pass::new();
        let mut s = state();
        add_network(&mut s, "n1", 100, 1);
        add_endpoint(&mut s, "a", "n1", "ca", "h1", Ipv4Addr::new(10, 0, 1, 2));
        add_endpoint(&mut s, "b", "n1", "cb", "h2", Ipv4Addr::new(10, 0, 1, 3));
        add_endpoint(&mut s, "c", "n1", "cc", "h3", Ipv4Addr::new(10, 0, 1, 4));
        pass.snapshot(s, true);

        // Only the local endpoint goes, and the remote c with it; b stays desired.
        let mut dirty = Dirty::default();
        pass.desired.apply(Update::Delete(ObjectRef::Endpoint("a".into())), &mut dirty);
        pass.desired.apply(Update::Delete(ObjectRef::Endpoint("c".into())), &mut dirty);
        let p = plan(&pass.desired, dirty, &pass.locals, &pass.mirror);
        assert_eq!(p.networks.get("n1"), Some(&None));
        // b did not change, but this host no longer carries n1: its entry must go too.
        assert_eq!(ids(&p.entries), ["a", "b", "c"]);
    }

    #[test]
    fn a_vni_change_touches_entries_of_endpoints_gone_from_the_desired_state() {
        let mut pass = Pass::new();
        let mut s = state();
        add_network(&mut s, "n1", 100, 1);
        add_endpoint(&mut s, "a", "n1", "ca", "h1", Ipv4Addr::new(10, 0, 1, 2));
        add_endpoint(&mut s, "b", "n1", "cb", "h2", Ipv4Addr::new(10, 0, 1, 3));
        add_endpoint(&mut s, "x", "n1", "cx", "h2", Ipv4Addr::new(10, 0, 1, 9));
        pass.snapshot(s, true);

        // x goes, but the pass that removes its entry has not happened (it failed and waits
        // for its retry) when n1 gets another VNI.
        pass.desired.apply(Update::Delete(ObjectRef::Endpoint("x".into())), &mut Dirty::default());
        let mut dirty = Dirty::default();
        pass.desired.apply(Update::Put(Object::Network(network("n1", 200, 1))), &mut dirty);
        let p = plan(&pass.desired, dirty, &pass.locals, &pass.mirror);
        assert_eq!(p.networks.get("n1"), Some(&Some(200)));
        // x is no longer desired, yet its entry (under the old VNI) is one to remove.
        assert_eq!(ids(&p.entries), ["a", "b", "x"]);
    }

    #[test]
    fn a_full_pass_covers_what_exists_and_what_is_desired() {
        let mut pass = Pass::new();
        let mut s = state();
        add_network(&mut s, "n1", 100, 1);
        add_endpoint(&mut s, "a", "n1", "ca", "h1", Ipv4Addr::new(10, 0, 1, 2));
        add_endpoint(&mut s, "b", "n1", "cb", "h2", Ipv4Addr::new(10, 0, 1, 3));
        pass.snapshot(s, true);

        // Everything vanished from the desired state without a word (a store wiped clean).
        pass.desired = Desired::new("h1");
        let dirty = Dirty { full: true, ..Dirty::default() };
        let existing = Existing {
            locals: &pass.locals,
            sandboxes: [("old".to_owned(), sandbox_path("old"))].into(),
            mirror: &pass.mirror,
        };
        let p = Plan::new(&here(), &pass.desired, dirty, &existing);
        assert!(p.full);
        assert_eq!(ids(&p.locals), ["a", "b"]);
        assert_eq!(ids(&p.entries), ["a", "b"]);
        assert_eq!(p.networks.into_iter().collect::<Vec<_>>(), [("n1".to_owned(), None)]);
        assert_eq!(p.containers, ["old".to_owned()].into());
        assert_eq!(p.peers, ["h2".to_owned(), "h3".to_owned()].into());
    }
}
