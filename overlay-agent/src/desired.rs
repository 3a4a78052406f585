//! The desired state as the agent holds it: what this host needs of the model, the indexes the
//! reconciler needs (endpoints by network, by host, by container), and the record of what
//! changed.
//!
//! A host carries every endpoint of the networks it takes part in, so this is where the agent's
//! memory goes at scale (100k endpoints and more). It keeps no more than it uses: containers of
//! other hosts are not kept at all, and ids, network ids and host names are shared (`Arc<str>`)
//! between the endpoint, the indexes, the dirty sets and the reconciler's mirrors instead of
//! copied into each. Every endpoint keeps the names it answers to on its network (the `NAMES`
//! map holds the names of every endpoint of the networks this host takes part in, docs/names.md):
//! its container's name, one `Arc<str>` per endpoint that a local endpoint's `container` shares,
//! and its aliases and services, interned like network ids since many endpoints share them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use crate::model::{Container, Endpoint, Host, MacAddr, Network, Object, ObjectRef, State, Update};

/// An endpoint id (or network id, or host name) shared rather than copied.
pub type Id = Arc<str>;

/// An endpoint as the agent keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ep {
    pub id: Id,
    pub network_id: Id,
    pub host: Id,
    /// The container, for an endpoint on this host (the only ones the agent makes interfaces
    /// for); None for a remote endpoint.
    pub container: Option<Id>,
    /// The container's name, for every endpoint: the first name it answers to.
    pub name: Id,
    /// Its other names on the network: aliases, then services (empty: no allocation).
    pub aliases: Box<[Id]>,
    pub ipv4: Ipv4Addr,
    pub mac: MacAddr,
    /// The interface's name in the container when a runtime chose it (CNI_IFNAME); kept for
    /// this host's endpoints only.
    pub ifname: Option<Id>,
}

/// What changed since the last reconcile, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub networks: BTreeSet<String>,
    pub endpoints: BTreeSet<Id>,
    pub containers: BTreeSet<String>,
    pub hosts: BTreeSet<String>,
    /// Look at everything, and remove whatever nothing desires (startup and periodic resync).
    pub full: bool,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.full && self.len() == 0
    }

    /// Number of keys (a full pass counts as none).
    pub fn len(&self) -> usize {
        self.networks.len() + self.endpoints.len() + self.containers.len() + self.hosts.len()
    }

    pub fn merge(&mut self, other: Dirty) {
        self.networks.extend(other.networks);
        self.endpoints.extend(other.endpoints);
        self.containers.extend(other.containers);
        self.hosts.extend(other.hosts);
        self.full |= other.full;
    }
}

#[derive(Debug, Default)]
pub struct Desired {
    /// This host's name.
    me: String,
    networks: BTreeMap<String, Network>,
    hosts: BTreeMap<String, Host>,
    /// This host's containers only.
    containers: BTreeMap<String, Container>,
    endpoints: HashMap<Id, Ep>,
    by_network: HashMap<Id, HashSet<Id>>,
    by_host: HashMap<Id, HashSet<Id>>,
    /// This host's endpoints only.
    by_container: HashMap<Id, BTreeSet<Id>>,
    /// Network ids, host names, aliases and services, one copy each.
    names: HashSet<Id>,
}

fn index_add(index: &mut HashMap<Id, HashSet<Id>>, key: &Id, id: &Id) {
    index.entry(key.clone()).or_default().insert(id.clone());
}

fn index_remove(index: &mut HashMap<Id, HashSet<Id>>, key: &str, id: &str) {
    if let Some(set) = index.get_mut(key) {
        set.remove(id);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

impl Desired {
    pub fn new(me: &str) -> Self {
        Self { me: me.to_owned(), ..Self::default() }
    }

    /// Applies one update and records what it changed.
    pub fn apply(&mut self, update: Update, dirty: &mut Dirty) {
        match update {
            Update::Snapshot(state) => self.replace(state, dirty),
            Update::Put(Object::Endpoint(e)) => {
                let ep = self.compact(e);
                dirty.endpoints.insert(ep.id.clone());
                self.remove_endpoint(&ep.id);
                self.insert_endpoint(ep);
            }
            Update::Put(Object::Network(n)) => {
                dirty.networks.insert(n.id.clone());
                self.networks.insert(n.id.clone(), n);
            }
            Update::Put(Object::Host(h)) => {
                dirty.hosts.insert(h.name.clone());
                self.hosts.insert(h.name.clone(), h);
            }
            Update::Put(Object::Container(c)) => {
                // Another host's container concerns this host only if it was ours until now.
                if c.host == self.me {
                    dirty.containers.insert(c.name.clone());
                    self.containers.insert(c.name.clone(), c);
                } else if self.containers.remove(&c.name).is_some() {
                    dirty.containers.insert(c.name);
                }
            }
            Update::Delete(ObjectRef::Endpoint(id)) => {
                if let Some(ep) = self.remove_endpoint(&id) {
                    dirty.endpoints.insert(ep.id);
                }
            }
            Update::Delete(ObjectRef::Network(id)) => {
                self.networks.remove(&id);
                dirty.networks.insert(id);
            }
            Update::Delete(ObjectRef::Host(name)) => {
                self.hosts.remove(&name);
                dirty.hosts.insert(name);
            }
            Update::Delete(ObjectRef::Container(name)) => {
                if self.containers.remove(&name).is_some() {
                    dirty.containers.insert(name);
                }
            }
        }
    }

    fn replace(&mut self, state: State, dirty: &mut Dirty) {
        let State { networks, endpoints, containers, hosts } = state;
        diff(&self.networks, &networks, &mut dirty.networks);
        diff(&self.hosts, &hosts, &mut dirty.hosts);
        let containers: BTreeMap<String, Container> =
            containers.into_iter().filter(|(_, c)| c.host == self.me).collect();
        diff(&self.containers, &containers, &mut dirty.containers);
        self.networks = networks;
        self.hosts = hosts;
        self.containers = containers;

        // Converted one by one, so the model's copy of each endpoint is freed as we go.
        self.names.clear();
        let old = std::mem::take(&mut self.endpoints);
        self.by_network.clear();
        self.by_host.clear();
        self.by_container.clear();
        for (_, e) in endpoints {
            let ep = self.compact(e);
            if old.get(&ep.id) != Some(&ep) {
                dirty.endpoints.insert(ep.id.clone());
            }
            self.insert_endpoint(ep);
        }
        for id in old.into_keys() {
            if !self.endpoints.contains_key(&id) {
                dirty.endpoints.insert(id);
            }
        }
        self.endpoints.shrink_to_fit();
    }

    /// The agent's form of an endpoint: shared names, and no container for a remote one.
    fn compact(&mut self, e: Endpoint) -> Ep {
        let local = e.host == self.me;
        let name = Id::from(e.container);
        let aliases = e.aliases.iter().chain(&e.services).map(|a| self.intern(a)).collect();
        let ifname = e.ifname.filter(|_| local).map(|n| self.intern(&n));
        Ep {
            id: Id::from(e.id),
            network_id: self.intern(&e.network_id),
            host: self.intern(&e.host),
            container: local.then(|| name.clone()),
            name,
            aliases,
            ipv4: e.ipv4,
            mac: e.mac,
            ifname,
        }
    }

    fn intern(&mut self, name: &str) -> Id {
        if let Some(id) = self.names.get(name) {
            return id.clone();
        }
        let id = Id::from(name);
        self.names.insert(id.clone());
        id
    }

    fn insert_endpoint(&mut self, ep: Ep) {
        index_add(&mut self.by_network, &ep.network_id, &ep.id);
        index_add(&mut self.by_host, &ep.host, &ep.id);
        if let Some(c) = &ep.container {
            self.by_container.entry(c.clone()).or_default().insert(ep.id.clone());
        }
        self.endpoints.insert(ep.id.clone(), ep);
    }

    fn remove_endpoint(&mut self, id: &str) -> Option<Ep> {
        let ep = self.endpoints.remove(id)?;
        index_remove(&mut self.by_network, &ep.network_id, id);
        index_remove(&mut self.by_host, &ep.host, id);
        if let Some(c) = &ep.container
            && let Some(set) = self.by_container.get_mut(c)
        {
            set.remove(id);
            if set.is_empty() {
                self.by_container.remove(c);
            }
        }
        Some(ep)
    }

    /// Marks the endpoints whose interface vanished from under the agent (a link event), with
    /// their containers: the namespace may have gone too, and has to be made before them.
    pub fn mark_vanished(&self, endpoints: impl IntoIterator<Item = String>, dirty: &mut Dirty) {
        for id in endpoints {
            match self.endpoints.get(id.as_str()) {
                Some(e) => {
                    dirty.endpoints.insert(e.id.clone());
                    if let Some(c) = &e.container {
                        dirty.containers.insert(c.to_string());
                    }
                }
                // Not desired: the pass clears what the maps still hold of it.
                None => {
                    dirty.endpoints.insert(id.into());
                }
            }
        }
    }

    pub fn network(&self, id: &str) -> Option<&Network> {
        self.networks.get(id)
    }

    pub fn networks(&self) -> impl Iterator<Item = &Network> {
        self.networks.values()
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.get(name)
    }

    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.values()
    }

    /// A container of this host.
    pub fn container(&self, name: &str) -> Option<&Container> {
        self.containers.get(name)
    }

    pub fn containers(&self) -> impl Iterator<Item = &Container> {
        self.containers.values()
    }

    pub fn endpoint(&self, id: &str) -> Option<&Ep> {
        self.endpoints.get(id)
    }

    pub fn endpoint_ids(&self) -> impl Iterator<Item = &Id> {
        self.endpoints.keys()
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    pub fn endpoints_of_network(&self, id: &str) -> impl Iterator<Item = &Id> {
        self.by_network.get(id).into_iter().flatten()
    }

    pub fn endpoints_of_host(&self, name: &str) -> impl Iterator<Item = &Id> {
        self.by_host.get(name).into_iter().flatten()
    }

    /// The endpoints of a container of this host.
    pub fn endpoints_of_container(&self, name: &str) -> impl Iterator<Item = &Id> {
        self.by_container.get(name).into_iter().flatten()
    }
}

/// Marks every key whose value differs between `old` and `new` (added, removed or changed).
fn diff<V: PartialEq>(old: &BTreeMap<String, V>, new: &BTreeMap<String, V>, out: &mut BTreeSet<String>) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.insert(k.clone());
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.insert(k.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str, net: &str, host: &str) -> Endpoint {
        Endpoint {
            id: id.into(),
            network_id: net.into(),
            container: format!("c-{id}"),
            ipv4: Ipv4Addr::new(10, 0, 0, 2),
            mac: MacAddr::from_ip(Ipv4Addr::new(10, 0, 0, 2)),
            host: host.into(),
            aliases: Vec::new(),
            services: Vec::new(),
            ifname: None,
        }
    }

    fn ids(set: &BTreeSet<Id>) -> Vec<&str> {
        set.iter().map(|i| &**i).collect()
    }

    #[test]
    fn a_vanished_endpoint_marks_its_container() {
        let mut d = Desired::new("h1");
        let mut s = State::default();
        s.endpoints.insert("a".into(), ep("a", "n1", "h1"));
        d.apply(Update::Snapshot(s), &mut Dirty::default());
        let mut dirty = Dirty::default();
        d.mark_vanished(["a".to_owned(), "gone".to_owned()], &mut dirty);
        assert_eq!(ids(&dirty.endpoints), ["a", "gone"]);
        assert_eq!(dirty.containers, ["c-a".to_owned()].into());
        assert!(!dirty.full);
    }

    #[test]
    fn snapshot_marks_only_what_changed() {
        let mut d = Desired::new("h1");
        let mut s = State::default();
        s.endpoints.insert("a".into(), ep("a", "n1", "h1"));
        s.endpoints.insert("b".into(), ep("b", "n1", "h2"));
        let mut dirty = Dirty::default();
        d.apply(Update::Snapshot(s.clone()), &mut dirty);
        assert_eq!(ids(&dirty.endpoints), ["a", "b"]);

        s.endpoints.remove("a");
        s.endpoints.insert("c".into(), ep("c", "n2", "h1"));
        let mut dirty = Dirty::default();
        d.apply(Update::Snapshot(s), &mut dirty);
        assert_eq!(ids(&dirty.endpoints), ["a", "c"]);
        assert_eq!(d.endpoints_of_network("n1").map(|i| &**i).collect::<Vec<_>>(), ["b"]);
        assert_eq!(d.endpoints_of_host("h1").map(|i| &**i).collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn put_moves_an_endpoint_between_indexes() {
        let mut d = Desired::new("h1");
        let mut dirty = Dirty::default();
        d.apply(Update::Put(Object::Endpoint(ep("a", "n1", "h1"))), &mut dirty);
        assert_eq!(d.endpoints_of_container("c-a").count(), 1);
        d.apply(Update::Put(Object::Endpoint(ep("a", "n2", "h2"))), &mut dirty);
        assert_eq!(d.endpoints_of_network("n1").count(), 0);
        assert_eq!(d.endpoints_of_network("n2").map(|i| &**i).collect::<Vec<_>>(), ["a"]);
        // Now remote: no container, not indexed by one.
        assert_eq!(d.endpoint("a").unwrap().container, None);
        assert_eq!(d.endpoints_of_container("c-a").count(), 0);
        d.apply(Update::Delete(ObjectRef::Endpoint("a".into())), &mut dirty);
        assert_eq!(d.endpoints_of_host("h2").count(), 0);
        assert_eq!(d.endpoint_count(), 0);
    }

    #[test]
    fn only_this_hosts_containers_are_kept() {
        let mut d = Desired::new("h1");
        let mut s = State::default();
        for (name, host) in [("mine", "h1"), ("theirs", "h2")] {
            s.containers.insert(
                name.into(),
                Container {
                    name: name.into(),
                    host: host.into(),
                    netns: None,
                    handover: false,
                    ports: Vec::new(),
                    created: String::new(),
                    revision: 0,
                },
            );
        }
        let mut dirty = Dirty::default();
        d.apply(Update::Snapshot(s), &mut dirty);
        assert!(d.container("mine").is_some() && d.container("theirs").is_none());
        assert_eq!(dirty.containers, BTreeSet::from(["mine".to_owned()]));
        // A container that moves away from this host is a change here.
        let mut dirty = Dirty::default();
        let moved = Container {
            name: "mine".into(),
            host: "h2".into(),
            netns: None,
            handover: false,
            ports: Vec::new(),
            created: String::new(),
            revision: 0,
        };
        d.apply(Update::Put(Object::Container(moved)), &mut dirty);
        assert!(d.container("mine").is_none());
        assert_eq!(dirty.containers, BTreeSet::from(["mine".to_owned()]));
    }

    #[test]
    fn names_are_shared_not_copied() {
        let mut d = Desired::new("h1");
        let mut dirty = Dirty::default();
        d.apply(Update::Put(Object::Endpoint(ep("a", "net", "h2"))), &mut dirty);
        d.apply(Update::Put(Object::Endpoint(ep("b", "net", "h2"))), &mut dirty);
        let (a, b) = (d.endpoint("a").unwrap(), d.endpoint("b").unwrap());
        assert!(Arc::ptr_eq(&a.network_id, &b.network_id) && Arc::ptr_eq(&a.host, &b.host));
    }
}
