//! The desired state as the agent holds it: the model plus the indexes the reconciler needs
//! (endpoints by network, by host, by container), and the record of what changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{Endpoint, Object, ObjectRef, State, Update};

/// What changed since the last reconcile, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub networks: BTreeSet<String>,
    pub endpoints: BTreeSet<String>,
    pub containers: BTreeSet<String>,
    pub hosts: BTreeSet<String>,
    /// Look at everything, and remove whatever nothing desires (startup and periodic resync).
    pub full: bool,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.full
            && self.networks.is_empty()
            && self.endpoints.is_empty()
            && self.containers.is_empty()
            && self.hosts.is_empty()
    }

    pub fn merge(&mut self, other: Dirty) {
        self.networks.extend(other.networks);
        self.endpoints.extend(other.endpoints);
        self.containers.extend(other.containers);
        self.hosts.extend(other.hosts);
        self.full |= other.full;
    }

    pub fn everything() -> Self {
        Self { full: true, ..Self::default() }
    }

    fn mark(&mut self, what: &ObjectRef) {
        match what {
            ObjectRef::Network(id) => drop(self.networks.insert(id.clone())),
            ObjectRef::Endpoint(id) => drop(self.endpoints.insert(id.clone())),
            ObjectRef::Container(name) => drop(self.containers.insert(name.clone())),
            ObjectRef::Host(name) => drop(self.hosts.insert(name.clone())),
        }
    }
}

#[derive(Debug, Default)]
pub struct Desired {
    pub state: State,
    by_network: HashMap<String, BTreeSet<String>>,
    by_host: HashMap<String, BTreeSet<String>>,
    by_container: HashMap<String, BTreeSet<String>>,
}

fn index_add(index: &mut HashMap<String, BTreeSet<String>>, key: &str, id: &str) {
    index.entry(key.to_owned()).or_default().insert(id.to_owned());
}

fn index_remove(index: &mut HashMap<String, BTreeSet<String>>, key: &str, id: &str) {
    if let Some(set) = index.get_mut(key) {
        set.remove(id);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

impl Desired {
    /// Applies one update and records what it changed.
    pub fn apply(&mut self, update: Update, dirty: &mut Dirty) {
        match update {
            Update::Snapshot(state) => self.replace(state, dirty),
            Update::Put(object) => {
                let what = object_ref(&object);
                if let Object::Endpoint(e) = &object {
                    self.unindex(&e.id);
                    self.index(e);
                }
                self.state.put(object);
                dirty.mark(&what);
            }
            Update::Delete(what) => {
                if let ObjectRef::Endpoint(id) = &what {
                    self.unindex(id);
                }
                self.state.delete(&what);
                dirty.mark(&what);
            }
        }
    }

    fn replace(&mut self, state: State, dirty: &mut Dirty) {
        diff(&self.state.networks, &state.networks, &mut dirty.networks);
        diff(&self.state.endpoints, &state.endpoints, &mut dirty.endpoints);
        diff(&self.state.containers, &state.containers, &mut dirty.containers);
        diff(&self.state.hosts, &state.hosts, &mut dirty.hosts);
        self.by_network.clear();
        self.by_host.clear();
        self.by_container.clear();
        for e in state.endpoints.values() {
            self.index(e);
        }
        self.state = state;
    }

    fn index(&mut self, e: &Endpoint) {
        index_add(&mut self.by_network, &e.network_id, &e.id);
        index_add(&mut self.by_host, &e.host, &e.id);
        index_add(&mut self.by_container, &e.container, &e.id);
    }

    fn unindex(&mut self, id: &str) {
        if let Some(old) = self.state.endpoints.get(id) {
            let old = old.clone();
            index_remove(&mut self.by_network, &old.network_id, id);
            index_remove(&mut self.by_host, &old.host, id);
            index_remove(&mut self.by_container, &old.container, id);
        }
    }

    pub fn endpoints_of_network(&self, id: &str) -> impl Iterator<Item = &String> {
        self.by_network.get(id).into_iter().flatten()
    }

    pub fn endpoints_of_host(&self, name: &str) -> impl Iterator<Item = &String> {
        self.by_host.get(name).into_iter().flatten()
    }

    pub fn endpoints_of_container(&self, name: &str) -> impl Iterator<Item = &String> {
        self.by_container.get(name).into_iter().flatten()
    }
}

fn object_ref(object: &Object) -> ObjectRef {
    match object {
        Object::Network(n) => ObjectRef::Network(n.id.clone()),
        Object::Endpoint(e) => ObjectRef::Endpoint(e.id.clone()),
        Object::Container(c) => ObjectRef::Container(c.name.clone()),
        Object::Host(h) => ObjectRef::Host(h.name.clone()),
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
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::MacAddr;

    fn ep(id: &str, net: &str, host: &str) -> Endpoint {
        Endpoint {
            id: id.into(),
            network_id: net.into(),
            container: format!("c-{id}"),
            ipv4: Ipv4Addr::new(10, 0, 0, 2),
            mac: MacAddr::from_ip(Ipv4Addr::new(10, 0, 0, 2)),
            host: host.into(),
        }
    }

    #[test]
    fn snapshot_marks_only_what_changed() {
        let mut d = Desired::default();
        let mut s = State::default();
        s.endpoints.insert("a".into(), ep("a", "n1", "h1"));
        s.endpoints.insert("b".into(), ep("b", "n1", "h2"));
        let mut dirty = Dirty::default();
        d.apply(Update::Snapshot(s.clone()), &mut dirty);
        assert_eq!(dirty.endpoints, BTreeSet::from(["a".into(), "b".into()]));

        s.endpoints.remove("a");
        s.endpoints.insert("c".into(), ep("c", "n2", "h1"));
        let mut dirty = Dirty::default();
        d.apply(Update::Snapshot(s), &mut dirty);
        assert_eq!(dirty.endpoints, BTreeSet::from(["a".into(), "c".into()]));
        assert_eq!(d.endpoints_of_network("n1").collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(d.endpoints_of_host("h1").collect::<Vec<_>>(), vec!["c"]);
    }

    #[test]
    fn put_moves_an_endpoint_between_indexes() {
        let mut d = Desired::default();
        let mut dirty = Dirty::default();
        d.apply(Update::Put(Object::Endpoint(ep("a", "n1", "h1"))), &mut dirty);
        d.apply(Update::Put(Object::Endpoint(ep("a", "n2", "h2"))), &mut dirty);
        assert_eq!(d.endpoints_of_network("n1").count(), 0);
        assert_eq!(d.endpoints_of_network("n2").collect::<Vec<_>>(), vec!["a"]);
        d.apply(Update::Delete(ObjectRef::Endpoint("a".into())), &mut dirty);
        assert_eq!(d.endpoints_of_host("h2").count(), 0);
        assert!(d.state.endpoints.is_empty());
    }
}
