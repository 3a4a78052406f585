//! The agent's mirror of the maps it fills (ENDPOINTS, IFACES, PEERS, NETWORKS, NAMES): exactly what the
//! kernel holds, so that a pass writes only what changes, and who each entry is for, which the
//! maps themselves cannot say.
//!
//! At startup the mirror holds what a previous agent left, owned by nobody. A pass claims each
//! entry it finds desired; after a full pass, what is still unclaimed is an orphan and goes.
//! That is how a restarted agent takes the datapath over without a gap in forwarding.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use overlay_common::{
    dns::{NAME_LEN, NameAddrs, NameKey},
    maps::{
        ENDPOINT_LOCAL, Endpoint as MapEndpoint, EndpointKey, Iface, NETWORK_EGRESS, NETWORK_ENCRYPTED,
        NETWORK_RESOLVER, Network as MapNetwork,
    },
};
use tracing::warn;

use super::{
    Outcome,
    local::Local,
    names::network_names,
    plan::{Here, Plan},
};
use crate::{
    datapath::{Error, MapWriter, Maps},
    desired::{Desired, Id},
};

/// What the kernel maps held when the agent started (left by a previous agent, or nothing).
#[derive(Debug, Default)]
pub struct Found {
    pub endpoints: HashMap<EndpointKey, MapEndpoint>,
    pub ifaces: HashMap<u32, Iface>,
    pub peers: Vec<Ipv4Addr>,
    pub networks: HashMap<u32, MapNetwork>,
    pub names: HashMap<NameKey, NameAddrs>,
    pub subnets: BTreeMap<ipnet::Ipv4Net, u32>,
}

impl Found {
    pub fn read(maps: &Maps) -> Result<Self, Error> {
        Ok(Self {
            endpoints: maps
                .endpoints
                .iter()
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Map("ENDPOINTS", e))?,
            ifaces: maps.ifaces.iter().collect::<Result<_, _>>().map_err(|e| Error::Map("IFACES", e))?,
            peers: maps
                .peers
                .keys()
                .map(|k| k.map(|k| Ipv4Addr::from(k.vtep)))
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Map("PEERS", e))?,
            networks: maps
                .networks
                .iter()
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Map("NETWORKS", e))?,
            names: maps.names.iter().collect::<Result<_, _>>().map_err(|e| Error::Map("NAMES", e))?,
            subnets: maps
                .subnets
                .iter()
                .map(|r| {
                    r.map(|(k, vni)| {
                        let net = ipnet::Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8)
                            .unwrap_or_default();
                        (net, vni)
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Map("SUBNETS", e))?,
        })
    }
}

/// Peers present in the kernel map, and whether a host still claims them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerState {
    Claimed,
    Orphan,
}

#[derive(Debug, Default)]
pub struct Mirror {
    endpoints: HashMap<EndpointKey, MapEndpoint>,
    /// The endpoint each ENDPOINTS entry is for. Another endpoint may take an address over (the
    /// old one is being replaced): the entry then belongs to the newcomer alone.
    key_owner: HashMap<EndpointKey, Id>,
    /// The entry each endpoint has (the reverse of `key_owner`).
    endpoint_key: HashMap<Id, EndpointKey>,
    ifaces: HashMap<u32, Iface>,
    /// The VTEP of each peer host.
    peers: HashMap<String, Ipv4Addr>,
    /// The PEERS map. Two host names may share a VTEP (a host renamed): the entry stays while
    /// either claims it.
    peer_set: HashMap<Ipv4Addr, PeerState>,
    /// Networks this host takes part in: id -> VNI, the key of its NETWORKS entry.
    joined: HashMap<String, u32>,
    networks: HashMap<u32, MapNetwork>,
    /// The NAMES map, in key order so that one network's names are one range.
    names: BTreeMap<NameKey, NameAddrs>,
    /// The gateways the agent's resolver serves on this host (the resolver's path says which
    /// before each pass): their networks' entries carry `NETWORK_RESOLVER`.
    served: BTreeSet<Ipv4Addr>,
    /// The networks whose containers have a way out through this host (the egress path says
    /// which before each pass): their entries carry `NETWORK_EGRESS`.
    egress: BTreeSet<String>,
    /// The SUBNETS map: every network of the overlay, this host's or not.
    subnets: BTreeMap<ipnet::Ipv4Net, u32>,
}

impl Mirror {
    /// Starts from what the kernel holds, none of it claimed yet.
    pub fn new(found: Found) -> Self {
        Self {
            endpoints: found.endpoints,
            ifaces: found.ifaces,
            peer_set: found.peers.into_iter().map(|vtep| (vtep, PeerState::Orphan)).collect(),
            networks: found.networks,
            names: found.names.into_iter().collect(),
            subnets: found.subnets,
            ..Self::default()
        }
    }

    /// Which gateways the resolver serves, for the passes from now on.
    pub fn set_served(&mut self, served: BTreeSet<Ipv4Addr>) {
        self.served = served;
    }

    /// Which networks have a way out through this host, for the passes from now on.
    pub fn set_egress(&mut self, egress: BTreeSet<String>) {
        self.egress = egress;
    }

    /// Number of entries in the endpoint map (local and remote).
    pub fn endpoint_entries(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether endpoint `id` has its ENDPOINTS entry.
    pub fn has_entry(&self, id: &str) -> bool {
        self.endpoint_key.contains_key(id)
    }

    /// The endpoints that have an ENDPOINTS entry.
    pub fn entry_ids(&self) -> impl Iterator<Item = &Id> {
        self.endpoint_key.keys()
    }

    /// The VNI the maps carry network `id` under, if this host takes part in it.
    pub fn joined(&self, id: &str) -> Option<u32> {
        self.joined.get(id).copied()
    }

    pub fn joined_ids(&self) -> impl Iterator<Item = &String> {
        self.joined.keys()
    }

    /// The hosts that have a PEERS entry.
    pub fn peer_names(&self) -> impl Iterator<Item = &String> {
        self.peers.keys()
    }

    /// Brings the maps to what is desired for everything the plan names (networks first: the
    /// entries are keyed by their VNI), and after a full pass removes the orphans. What fails is
    /// logged and put in `out.retry`.
    pub fn apply(
        &mut self,
        w: &mut impl MapWriter,
        here: &Here,
        desired: &Desired,
        plan: &Plan,
        locals: &HashMap<Id, Local>,
        out: &mut Outcome,
    ) {
        let (served, egress) = &(self.served.clone(), self.egress.clone());
        let named = self.named_vnis(desired, plan);
        for (n, vni) in &plan.networks {
            let want = vni.zip(desired.network(n)).map(|(vni, n)| (vni, network_value(n, served, egress)));
            if let Err(e) = self.sync_network(w, n, want) {
                warn!(network = %n, error = format!("{e:#}"), "cannot update the network map");
                out.retry.networks.insert(n.clone());
            }
        }
        // Whether the resolver serves a joined network, or it has a way out, changes without the
        // network changing (its gateway address made after a failure, the egress path put in
        // place): written only where it differs.
        let others: Vec<(String, u32)> = self
            .joined
            .iter()
            .filter(|(id, _)| !plan.networks.contains_key(*id))
            .map(|(id, vni)| (id.clone(), *vni))
            .collect();
        for (id, vni) in others {
            let Some(n) = desired.network(&id) else { continue };
            if let Err(e) = self.sync_network(w, &id, Some((vni, network_value(n, served, egress)))) {
                warn!(network = %id, error = format!("{e:#}"), "cannot update the network map");
                out.retry.networks.insert(id);
            }
        }
        self.sync_subnets(w, desired, out);
        for id in &plan.entries {
            let result = match self.wanted_entry(here, desired, locals, id) {
                Some((key, value)) => self.put_entry(w, id, key, value),
                None => self.remove_entry(w, id),
            };
            if let Err(e) = result {
                warn!(endpoint = %id, error = format!("{e:#}"), "cannot update the endpoint map");
                out.retry.endpoints.insert(id.clone());
            }
        }
        for h in &plan.peers {
            let want = desired.host(h).filter(|h| h.name != here.me).map(|h| h.vtep);
            if let Err(e) = self.sync_peer(w, h, want) {
                warn!(host = %h, error = format!("{e:#}"), "cannot update the peer map");
                out.retry.hosts.insert(h.clone());
            }
        }
        for vni in named {
            let want = self
                .joined
                .iter()
                .find(|(_, v)| **v == vni)
                .and_then(|(id, _)| desired.network(id))
                .map(|n| network_names(desired, n, vni))
                .unwrap_or_default();
            if let Err(e) = self.sync_names(w, vni, &want) {
                warn!(vni, error = format!("{e:#}"), "cannot update the name map");
                out.retry.full = true;
            }
        }
        if plan.full {
            let live: BTreeSet<u32> = locals.values().map(|l| l.ifindex).collect();
            if let Err(e) = self.remove_orphans(w, &live) {
                warn!(error = format!("{e:#}"), "cannot remove stale map entries");
                out.retry.full = true;
            }
        }
    }

    /// The VNIs whose names this pass may change, taken before it changes anything: those of the
    /// networks it looks at and of the endpoints it looks at, as carried until now and as
    /// desired. A full pass looks at every network carried and every VNI with names (a network
    /// left, or names a previous agent left under a VNI nothing carries, lose them all).
    fn named_vnis(&self, desired: &Desired, plan: &Plan) -> BTreeSet<u32> {
        let mut vnis: BTreeSet<u32> = BTreeSet::new();
        for (n, vni) in &plan.networks {
            vnis.extend(self.joined.get(n).copied().into_iter().chain(*vni));
        }
        for id in &plan.entries {
            vnis.extend(self.endpoint_key.get(id).map(|k| k.vni));
            if let Some(e) = desired.endpoint(id) {
                vnis.extend(
                    plan.networks.get(&*e.network_id).copied().unwrap_or_else(|| self.joined(&e.network_id)),
                );
            }
        }
        if plan.full {
            vnis.extend(self.joined.values().copied());
            vnis.extend(self.names.keys().map(|k| k.vni));
        }
        vnis
    }

    /// Brings the names under `vni` to `want`, writing only what differs.
    fn sync_names(
        &mut self,
        w: &mut impl MapWriter,
        vni: u32,
        want: &BTreeMap<NameKey, NameAddrs>,
    ) -> Result<(), Error> {
        let range = NameKey { vni, name: [0; NAME_LEN] }..=NameKey { vni, name: [u8::MAX; NAME_LEN] };
        let stale: Vec<NameKey> =
            self.names.range(range).map(|(k, _)| *k).filter(|k| !want.contains_key(k)).collect();
        for key in stale {
            w.remove_name(&key)?;
            self.names.remove(&key);
        }
        for (key, value) in want {
            if self.names.get(key) != Some(value) {
                w.put_name(*key, *value)?;
                self.names.insert(*key, *value);
            }
        }
        Ok(())
    }

    /// Number of entries in the name map.
    #[cfg(test)]
    pub fn name_entries(&self) -> usize {
        self.names.len()
    }

    /// What the endpoint map should hold for endpoint `id`, if anything.
    fn wanted_entry(
        &self,
        here: &Here,
        desired: &Desired,
        locals: &HashMap<Id, Local>,
        id: &str,
    ) -> Option<(EndpointKey, MapEndpoint)> {
        let e = desired.endpoint(id)?;
        let vni = *self.joined.get(&*e.network_id)?;
        let key = EndpointKey { vni, ip: e.ipv4.octets() };
        if *e.host == *here.me {
            let l = locals.get(id)?;
            Some((key, MapEndpoint { mac: e.mac.0, flags: ENDPOINT_LOCAL, ifindex: l.ifindex, vtep: [0; 4] }))
        } else {
            let h = desired.host(&e.host)?;
            Some((key, MapEndpoint { mac: e.mac.0, flags: 0, ifindex: 0, vtep: h.vtep.octets() }))
        }
    }

    /// Gives endpoint `id` the entry `key` -> `value` (moving it if its key changed).
    pub fn put_entry(
        &mut self,
        w: &mut impl MapWriter,
        id: &Id,
        key: EndpointKey,
        value: MapEndpoint,
    ) -> Result<(), Error> {
        if let Some(old) = self.endpoint_key.get(id).copied()
            && old != key
        {
            self.remove_entry(w, id)?;
        }
        if self.endpoints.get(&key) != Some(&value) {
            w.put_endpoint(key, value)?;
            self.endpoints.insert(key, value);
        }
        if let Some(previous) = self.key_owner.insert(key, id.clone())
            && previous != *id
        {
            // Another endpoint held this address (it is being replaced): it no longer owns it.
            self.endpoint_key.remove(&previous);
        }
        self.endpoint_key.insert(id.clone(), key);
        Ok(())
    }

    /// Removes endpoint `id`'s entry, unless another endpoint has taken its address over.
    pub fn remove_entry(&mut self, w: &mut impl MapWriter, id: &str) -> Result<(), Error> {
        let Some(key) = self.endpoint_key.remove(id) else { return Ok(()) };
        if self.key_owner.get(&key).is_some_and(|owner| **owner == *id) {
            self.key_owner.remove(&key);
            w.remove_endpoint(&key)?;
            self.endpoints.remove(&key);
        }
        Ok(())
    }

    pub fn put_iface(&mut self, w: &mut impl MapWriter, ifindex: u32, value: Iface) -> Result<(), Error> {
        if self.ifaces.get(&ifindex) != Some(&value) {
            w.put_iface(ifindex, value)?;
            self.ifaces.insert(ifindex, value);
        }
        Ok(())
    }

    pub fn remove_iface(&mut self, w: &mut impl MapWriter, ifindex: u32) -> Result<(), Error> {
        if self.ifaces.remove(&ifindex).is_some() {
            w.remove_iface(ifindex)?;
        }
        Ok(())
    }

    /// Carries network `id` under the VNI and value in `want`, or not at all.
    fn sync_network(
        &mut self,
        w: &mut impl MapWriter,
        id: &str,
        want: Option<(u32, MapNetwork)>,
    ) -> Result<(), Error> {
        if let Some(old) = self.joined.get(id).copied()
            && Some(old) != want.map(|(vni, _)| vni)
        {
            self.joined.remove(id);
            if self.networks.remove(&old).is_some() {
                w.remove_network(old)?;
            }
        }
        if let Some((vni, value)) = want {
            if self.networks.get(&vni) != Some(&value) {
                w.put_network(vni, value)?;
                self.networks.insert(vni, value);
            }
            self.joined.insert(id.to_owned(), vni);
        }
        Ok(())
    }

    /// Gives host `name` the peer VTEP in `want`, or none.
    fn sync_peer(&mut self, w: &mut impl MapWriter, name: &str, want: Option<Ipv4Addr>) -> Result<(), Error> {
        let have = self.peers.get(name).copied();
        if want == have {
            if let Some(vtep) = want {
                self.peer_set.insert(vtep, PeerState::Claimed);
            }
            return Ok(());
        }
        if let Some(old) = have {
            self.peers.remove(name);
            // Another host could share the address (a host renamed): keep it while claimed.
            if !self.peers.values().any(|v| *v == old) {
                w.remove_peer(old)?;
                self.peer_set.remove(&old);
            }
        }
        if let Some(vtep) = want {
            if self.peer_set.get(&vtep) != Some(&PeerState::Claimed) {
                w.put_peer(vtep)?;
            }
            self.peer_set.insert(vtep, PeerState::Claimed);
            self.peers.insert(name.to_owned(), vtep);
        }
        Ok(())
    }

    /// Removes the entries nothing claimed (after a full pass). `live` are the ifindexes of the
    /// local endpoints' interfaces.
    fn remove_orphans(&mut self, w: &mut impl MapWriter, live: &BTreeSet<u32>) -> Result<(), Error> {
        let stale: Vec<EndpointKey> =
            self.endpoints.keys().filter(|k| !self.key_owner.contains_key(k)).copied().collect();
        for key in stale {
            w.remove_endpoint(&key)?;
            self.endpoints.remove(&key);
        }
        let stale: Vec<u32> = self.ifaces.keys().filter(|i| !live.contains(i)).copied().collect();
        for ifindex in stale {
            w.remove_iface(ifindex)?;
            self.ifaces.remove(&ifindex);
        }
        let joined: BTreeSet<u32> = self.joined.values().copied().collect();
        let stale: Vec<u32> = self.networks.keys().filter(|v| !joined.contains(v)).copied().collect();
        for vni in stale {
            w.remove_network(vni)?;
            self.networks.remove(&vni);
        }
        let stale: Vec<Ipv4Addr> =
            self.peer_set.iter().filter(|(_, s)| **s == PeerState::Orphan).map(|(v, _)| *v).collect();
        for vtep in stale {
            w.remove_peer(vtep)?;
            self.peer_set.remove(&vtep);
        }
        Ok(())
    }
}

impl Mirror {
    /// Brings SUBNETS to every network's subnet (a handful of entries: compared in full on
    /// every pass, written where they differ).
    fn sync_subnets(&mut self, w: &mut impl MapWriter, desired: &Desired, out: &mut Outcome) {
        let want: BTreeMap<ipnet::Ipv4Net, u32> =
            desired.networks().map(|n| (n.subnet.trunc(), n.vni)).collect();
        let stale: Vec<ipnet::Ipv4Net> =
            self.subnets.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for net in stale {
            match w.remove_subnet(net) {
                Ok(()) => {
                    self.subnets.remove(&net);
                }
                Err(e) => {
                    warn!(subnet = %net, error = format!("{e:#}"), "cannot update the subnet map");
                    out.retry.full = true;
                }
            }
        }
        for (net, vni) in want {
            if self.subnets.get(&net) == Some(&vni) {
                continue;
            }
            match w.put_subnet(net, vni) {
                Ok(()) => {
                    self.subnets.insert(net, vni);
                }
                Err(e) => {
                    warn!(subnet = %net, error = format!("{e:#}"), "cannot update the subnet map");
                    out.retry.full = true;
                }
            }
        }
    }
}

/// The `NETWORKS` value of network `n`: its gateway and subnet, whether the resolver serves it
/// here (its gateway among the `served` addresses), whether it has a way out (among
/// `egress`), and whether it is encrypted.
fn network_value(
    n: &crate::model::Network,
    served: &BTreeSet<Ipv4Addr>,
    egress: &BTreeSet<String>,
) -> MapNetwork {
    let mut flags = 0;
    if served.contains(&n.gateway) {
        flags |= NETWORK_RESOLVER;
    }
    if egress.contains(&n.id) {
        flags |= NETWORK_EGRESS;
    }
    if n.encrypted {
        flags |= NETWORK_ENCRYPTED;
    }
    MapNetwork {
        gateway: n.gateway.octets(),
        gateway_mac: n.gateway_mac().0,
        flags,
        prefix_len: n.subnet.prefix_len(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use overlay_common::maps::{
        ENDPOINT_LOCAL, Endpoint as MapEndpoint, EndpointKey, NETWORK_EGRESS, NETWORK_ENCRYPTED,
        NETWORK_RESOLVER,
    };

    use super::Mirror;
    use crate::{
        desired::{Dirty, Id},
        model::{Object, ObjectRef, Update},
        reconcile::testing::{
            Call, Kernel, NameCall, Pass, add_endpoint, add_network, host, network, state, vtep,
        },
    };

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 3);
    const C: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 4);

    /// h1 (this host) with a on n1 (VNI 100); b on h2, c on h3.
    fn three_hosts() -> crate::model::State {
        let mut s = state();
        add_network(&mut s, "n1", 100, 1);
        add_endpoint(&mut s, "a", "n1", "ca", "h1", A);
        add_endpoint(&mut s, "b", "n1", "cb", "h2", B);
        add_endpoint(&mut s, "c", "n1", "cc", "h3", C);
        s
    }

    fn delete(pass: &mut Pass, what: ObjectRef) {
        let mut dirty = Dirty::default();
        pass.desired.apply(Update::Delete(what), &mut dirty);
        pass.run(dirty);
    }

    fn put(pass: &mut Pass, what: Object) {
        let mut dirty = Dirty::default();
        pass.desired.apply(Update::Put(what), &mut dirty);
        pass.run(dirty);
    }

    #[test]
    fn adds_write_once() {
        let mut pass = Pass::new();
        pass.snapshot(three_hosts(), true);
        let k = &pass.kernel;
        assert_eq!(k.entries(), [(100, A, Ipv4Addr::UNSPECIFIED), (100, B, vtep(2)), (100, C, vtep(3))]);
        let a = k.endpoints[&EndpointKey { vni: 100, ip: A.octets() }];
        assert_eq!((a.flags, a.ifindex), (ENDPOINT_LOCAL, pass.locals["a"].ifindex));
        assert_eq!(k.ifaces.keys().copied().collect::<Vec<_>>(), [pass.locals["a"].ifindex]);
        assert_eq!(k.networks.keys().copied().collect::<Vec<_>>(), [100]);
        assert_eq!(k.peers, [vtep(2), vtep(3)].into(), "every other host is a peer, not this one");
        assert_eq!(pass.mirror.endpoint_entries(), 3);

        // The same state again, every key dirty: nothing to write.
        pass.kernel.take_calls();
        pass.snapshot(three_hosts(), true);
        assert_eq!(pass.kernel.take_calls(), []);
    }

    #[test]
    fn a_network_carries_the_resolver_flag_exactly_while_its_gateway_is_served() {
        let mut pass = Pass::new();
        pass.snapshot(three_hosts(), true);
        let flags = |p: &Pass| p.kernel.networks[&100].flags;
        assert_eq!(flags(&pass), 0, "nothing served yet");
        // The resolver's path comes up between passes; a pass that changes nothing about the
        // network still writes the flag, and only that.
        pass.served = [Ipv4Addr::new(10, 0, 1, 1)].into();
        pass.kernel.take_calls();
        pass.run(Dirty::default());
        assert_eq!(flags(&pass), NETWORK_RESOLVER);
        assert_eq!(pass.kernel.take_calls().len(), 1, "one NETWORKS write");
        pass.run(Dirty::default());
        assert!(pass.kernel.take_calls().is_empty(), "written once");
        // Another network's gateway is no reason for the flag.
        pass.served = [Ipv4Addr::new(10, 0, 9, 1)].into();
        pass.run(Dirty::default());
        assert_eq!(flags(&pass), 0);
    }

    #[test]
    fn a_network_carries_its_prefix_and_the_egress_flag_exactly_while_it_has_a_way_out() {
        let mut pass = Pass::new();
        pass.snapshot(three_hosts(), true);
        let entry = |p: &Pass| p.kernel.networks[&100];
        assert_eq!((entry(&pass).flags, entry(&pass).prefix_len), (0, 24), "no way out yet");
        let id = pass.mirror.joined_ids().next().cloned().expect("a joined network");
        pass.egress = [id].into();
        pass.kernel.take_calls();
        pass.run(Dirty::default());
        assert_eq!(entry(&pass).flags, NETWORK_EGRESS);
        assert_eq!(pass.kernel.take_calls().len(), 1, "one NETWORKS write");
        pass.egress.clear();
        pass.run(Dirty::default());
        assert_eq!(entry(&pass).flags, 0);
    }

    #[test]
    fn an_encrypted_network_carries_the_encrypted_flag_and_a_plain_one_does_not() {
        let mut s = three_hosts();
        add_network(&mut s, "n2", 200, 2);
        add_endpoint(&mut s, "d", "n2", "cd", "h1", Ipv4Addr::new(10, 0, 2, 4));
        for n in s.networks.values_mut().filter(|n| n.vni == 100) {
            n.encrypted = true;
        }
        let mut pass = Pass::new();
        pass.snapshot(s, true);
        assert_eq!(pass.kernel.networks[&100].flags, NETWORK_ENCRYPTED);
        assert_eq!(pass.kernel.networks[&200].flags, 0);
    }

    #[test]
    fn every_network_of_the_overlay_has_its_subnet_here_and_a_removed_one_goes() {
        let mut pass = Pass::new();
        let mut s = three_hosts();
        // n2 has no endpoint on h1: not joined here, but its subnet is still the overlay's.
        add_network(&mut s, "n2", 200, 2);
        pass.snapshot(s, true);
        let subnets: Vec<(String, u32)> =
            pass.kernel.subnets.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        assert_eq!(subnets, [("10.0.1.0/24".to_owned(), 100), ("10.0.2.0/24".to_owned(), 200)]);
        delete(&mut pass, ObjectRef::Network("n2".into()));
        assert_eq!(pass.kernel.subnets.len(), 1, "{:?}", pass.kernel.subnets);
    }

    #[test]
    fn a_removed_endpoint_takes_its_entry_alone() {
        let mut pass = Pass::new();
        pass.snapshot(three_hosts(), true);
        pass.kernel.take_calls();
        delete(&mut pass, ObjectRef::Endpoint("c".into()));
        assert_eq!(
            pass.kernel.take_calls(),
            [Call::RemoveEndpoint(EndpointKey { vni: 100, ip: C.octets() })]
        );
        // h3 still is a host: its VTEP stays a peer.
        assert!(pass.kernel.peers.contains(&vtep(3)));
    }

    #[test]
    fn a_network_leaving_the_host_takes_its_entries_and_vni() {
        let mut pass = Pass::new();
        let mut s = three_hosts();
        add_network(&mut s, "n2", 200, 2);
        add_endpoint(&mut s, "d", "n2", "cd", "h1", Ipv4Addr::new(10, 0, 2, 2));
        add_endpoint(&mut s, "e", "n2", "ce", "h2", Ipv4Addr::new(10, 0, 2, 3));
        pass.snapshot(s, true);
        assert_eq!(pass.kernel.networks.keys().copied().collect::<Vec<_>>(), [100, 200]);

        // The last local endpoint of n1 goes: b and c stay desired, but not here.
        delete(&mut pass, ObjectRef::Endpoint("a".into()));
        let k = &pass.kernel;
        assert_eq!(k.networks.keys().copied().collect::<Vec<_>>(), [200]);
        assert!(k.entries().iter().all(|(vni, _, _)| *vni == 200), "{:?}", k.entries());
        assert_eq!(k.entries().len(), 2);
        assert_eq!(k.ifaces.len(), 1, "a's IFACES entry is gone, d's stays");
        // Peers are hosts, not networks: h2 and h3 stay.
        assert_eq!(k.peers, [vtep(2), vtep(3)].into());
        assert_eq!(pass.mirror.joined("n1"), None);
        assert_eq!(pass.mirror.endpoint_entries(), 2);
    }

    #[test]
    fn a_new_vni_moves_every_entry_of_the_network() {
        let mut pass = Pass::new();
        let mut s = three_hosts();
        pass.snapshot(s.clone(), true);
        s.networks.insert("n1".into(), network("n1", 101, 1));
        // c went away in the same batch: its entry under the old VNI must not stay behind.
        s.endpoints.remove("c");
        pass.snapshot(s, false);
        let k = &pass.kernel;
        assert_eq!(k.networks.keys().copied().collect::<Vec<_>>(), [101]);
        assert_eq!(k.entries(), [(101, A, Ipv4Addr::UNSPECIFIED), (101, B, vtep(2))]);
    }

    #[test]
    fn a_peer_vtep_goes_with_its_last_host_name() {
        let mut pass = Pass::new();
        let mut s = three_hosts();
        // h2 renamed h2b: for a while both names claim its VTEP.
        s.hosts.insert("h2b".into(), host("h2b", vtep(2)));
        pass.snapshot(s, true);
        assert_eq!(pass.kernel.peers, [vtep(2), vtep(3)].into());

        pass.kernel.take_calls();
        delete(&mut pass, ObjectRef::Host("h2".into()));
        assert!(pass.kernel.peers.contains(&vtep(2)), "h2b still claims 192.168.0.2");
        // b was on h2, whose record is gone: nowhere to send to any more.
        assert_eq!(
            pass.kernel.take_calls(),
            [Call::RemoveEndpoint(EndpointKey { vni: 100, ip: B.octets() })]
        );

        delete(&mut pass, ObjectRef::Host("h2b".into()));
        assert_eq!(pass.kernel.peers, [vtep(3)].into());
        // h3 goes too; its endpoint c loses its entry (no VTEP to send to).
        delete(&mut pass, ObjectRef::Host("h3".into()));
        assert!(pass.kernel.peers.is_empty());
        assert!(!pass.kernel.entries().iter().any(|(_, ip, _)| *ip == C));
    }

    #[test]
    fn a_moved_peer_vtep_is_replaced() {
        let mut pass = Pass::new();
        pass.snapshot(three_hosts(), true);
        put(&mut pass, Object::Host(host("h3", Ipv4Addr::new(192, 168, 1, 3))));
        assert_eq!(pass.kernel.peers, [vtep(2), Ipv4Addr::new(192, 168, 1, 3)].into());
        let c = pass.kernel.endpoints[&EndpointKey { vni: 100, ip: C.octets() }];
        assert_eq!(Ipv4Addr::from(c.vtep), Ipv4Addr::new(192, 168, 1, 3));
    }

    #[test]
    fn adoption_keeps_what_is_desired_and_removes_only_orphans() {
        // A previous agent's datapath: the state below, plus leftovers nothing desires.
        let mut before = Pass::new();
        before.snapshot(three_hosts(), true);
        let before_entries = before.kernel.entries();
        let mut kernel = Kernel { calls: Vec::new(), ..before.kernel };
        let orphan_entry = EndpointKey { vni: 100, ip: [10, 0, 1, 99] };
        kernel
            .endpoints
            .insert(orphan_entry, MapEndpoint { mac: [2; 6], flags: 0, ifindex: 0, vtep: [192, 168, 0, 9] });
        kernel.networks.insert(300, kernel.networks[&100]);
        kernel.peers.insert(vtep(9));
        kernel.ifaces.insert(7, kernel.ifaces.values().next().copied().unwrap());

        // A new agent whose local endpoint a is adopted with the same interface.
        let mut pass = Pass::over(kernel);
        pass.locals = before.locals;
        pass.snapshot(three_hosts(), true);
        let mut calls = pass.kernel.take_calls();
        calls.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            calls,
            [
                // A found VTEP is nobody's until a host claims it: claiming writes it again
                // (the same entry; PEERS is a set).
                Call::PutPeer(vtep(2)),
                Call::PutPeer(vtep(3)),
                Call::RemoveEndpoint(orphan_entry),
                Call::RemoveIface(7),
                Call::RemoveNetwork(300),
                Call::RemovePeer(vtep(9)),
            ]
        );
        // What the previous agent made for the desired state is all still there.
        assert_eq!(pass.kernel.entries(), before_entries);
        assert_eq!(pass.kernel.networks.keys().copied().collect::<Vec<_>>(), [100]);
        assert_eq!(pass.kernel.peers, [vtep(2), vtep(3)].into());
    }

    #[test]
    fn adoption_waits_for_a_full_pass() {
        let mut kernel = Kernel::default();
        let orphan = EndpointKey { vni: 100, ip: [10, 0, 1, 99] };
        kernel
            .endpoints
            .insert(orphan, MapEndpoint { mac: [2; 6], flags: 0, ifindex: 0, vtep: [192, 168, 0, 9] });
        let mut pass = Pass::over(kernel);
        // A partial pass cannot know that nothing desires the entry.
        pass.snapshot(three_hosts(), false);
        assert!(pass.kernel.endpoints.contains_key(&orphan));
        pass.run(Dirty { full: true, ..Dirty::default() });
        assert!(!pass.kernel.endpoints.contains_key(&orphan));
    }

    #[test]
    fn an_address_reused_by_a_new_endpoint_keeps_its_entry() {
        let mut pass = Pass::new();
        let mut s = three_hosts();
        pass.snapshot(s.clone(), true);

        // c (on h3) is replaced by "a-new" on h2 with the same address, in one batch; the
        // newcomer is visited first (ids in order) and takes the entry over.
        s.endpoints.remove("c");
        add_endpoint(&mut s, "a-new", "n1", "cn", "h2", C);
        pass.snapshot(s, false);
        let entry = pass.kernel.endpoints[&EndpointKey { vni: 100, ip: C.octets() }];
        assert_eq!(Ipv4Addr::from(entry.vtep), vtep(2));
        assert!(pass.mirror.has_entry("a-new") && !pass.mirror.has_entry("c"));
    }

    /// The names in the kernel's NAMES, as (VNI, key bytes up to the final zero, addresses).
    fn names(k: &Kernel) -> Vec<(u32, String, Vec<Ipv4Addr>)> {
        k.names
            .iter()
            .map(|(key, v)| {
                let end = key.name.iter().position(|b| *b == 0).unwrap();
                let text = String::from_utf8_lossy(&key.name[..end]).replace(|c: char| c.is_control(), ".");
                (key.vni, text, v.addrs[..v.count as usize].iter().map(|a| Ipv4Addr::from(*a)).collect())
            })
            .collect()
    }

    #[test]
    fn names_follow_the_endpoints_of_joined_networks() {
        let mut pass = Pass::new();
        let mut s = three_hosts();
        s.endpoints.get_mut("b").unwrap().aliases = vec!["api".into()];
        s.endpoints.get_mut("c").unwrap().services = vec!["api".into()];
        // n2 has no endpoint on this host: none of its names are carried.
        add_network(&mut s, "n2", 200, 2);
        add_endpoint(&mut s, "d", "n2", "cd", "h2", Ipv4Addr::new(10, 0, 2, 2));
        pass.snapshot(s, true);
        let got = names(&pass.kernel);
        assert!(got.iter().all(|(vni, _, _)| *vni == 100), "{got:?}");
        let find = |n: &str| got.iter().find(|(_, name, _)| name == n).map(|(_, _, a)| a.clone());
        assert_eq!(find(".ca"), Some(vec![A]));
        assert_eq!(find(".cb.n1"), Some(vec![B]));
        assert_eq!(find(".api"), Some(vec![B, C]), "a shared name has every address");
        assert_eq!(find(".api.n1"), Some(vec![B, C]));
        assert_eq!(got.len(), 8, "ca, cb, cc, api, each plain and qualified; {got:?}");
        assert_eq!(pass.mirror.name_entries(), 8);

        // The same state again: nothing to write.
        pass.kernel.name_calls.clear();
        pass.snapshot(pass_state(&pass), true);
        assert_eq!(pass.kernel.name_calls, []);

        // c goes (container rm): its names go, and its share of api; nothing else is written.
        delete(&mut pass, ObjectRef::Endpoint("c".into()));
        let calls = std::mem::take(&mut pass.kernel.name_calls);
        assert_eq!(calls.len(), 4, "remove cc and cc.n1, rewrite api and api.n1: {calls:?}");
        let got = names(&pass.kernel);
        assert_eq!(got.len(), 6);
        assert!(!got.iter().any(|(_, n, _)| n.starts_with(".cc")));
        assert!(got.iter().filter(|(_, n, _)| n.starts_with(".api")).all(|(_, _, a)| *a == [B]));

        // The host leaves n1 (its last local endpoint goes): every name of n1 goes with it.
        delete(&mut pass, ObjectRef::Endpoint("a".into()));
        assert_eq!(names(&pass.kernel), []);
    }

    /// The desired state a pass holds now, as a snapshot (for running it again unchanged).
    fn pass_state(pass: &Pass) -> crate::model::State {
        let mut s = three_hosts();
        s.endpoints.get_mut("b").unwrap().aliases = vec!["api".into()];
        s.endpoints.get_mut("c").unwrap().services = vec!["api".into()];
        add_network(&mut s, "n2", 200, 2);
        add_endpoint(&mut s, "d", "n2", "cd", "h2", Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(s.endpoints.len(), pass.desired.endpoint_count());
        s
    }

    #[test]
    fn names_move_with_an_endpoint_and_a_renamed_network() {
        let mut pass = Pass::new();
        pass.snapshot(three_hosts(), true);
        // b gets an alias: only b's new names are written.
        let mut b = crate::model::Endpoint::new("b", "n1", "cb", "h2", B);
        b.aliases = vec!["db".into()];
        pass.kernel.name_calls.clear();
        put(&mut pass, Object::Endpoint(b));
        assert_eq!(pass.kernel.name_calls.len(), 2, "db and db.n1");
        // The network is renamed: the qualified names follow.
        let mut n = network("n1", 100, 1);
        n.name = "front".into();
        put(&mut pass, Object::Network(n));
        let got = names(&pass.kernel);
        assert!(got.iter().any(|(_, n, _)| n == ".db.front"), "{got:?}");
        assert!(!got.iter().any(|(_, n, _)| n.rsplit('.').next() == Some("n1")), "{got:?}");
    }

    #[test]
    fn names_a_previous_agent_left_go_after_a_full_pass() {
        let mut before = Pass::new();
        before.snapshot(three_hosts(), true);
        let mut kernel = Kernel { calls: Vec::new(), name_calls: Vec::new(), ..before.kernel };
        let stale = |vni| overlay_common::dns::name_key(vni, "gone").unwrap();
        let value = kernel.names.values().next().copied().unwrap();
        kernel.names.insert(stale(100), value);
        kernel.names.insert(stale(300), value);
        let kept = kernel.names.len() - 2;
        let mut pass = Pass::over(kernel);
        pass.locals = before.locals;
        pass.snapshot(three_hosts(), false);
        pass.run(Dirty { full: true, ..Dirty::default() });
        let mut calls = pass.kernel.name_calls.clone();
        calls.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(calls, [NameCall::Remove(stale(100)), NameCall::Remove(stale(300))]);
        assert_eq!(pass.kernel.names.len(), kept);
    }

    #[test]
    fn an_entry_taken_over_is_not_removed_with_its_former_owner() {
        let mut kernel = Kernel::default();
        let mut mirror = Mirror::default();
        let key = EndpointKey { vni: 100, ip: C.octets() };
        let value = |h: u8| MapEndpoint { mac: [2; 6], flags: 0, ifindex: 0, vtep: vtep(h).octets() };
        let (old, new): (Id, Id) = ("old".into(), "new".into());
        mirror.put_entry(&mut kernel, &old, key, value(3)).unwrap();
        mirror.put_entry(&mut kernel, &new, key, value(2)).unwrap();
        mirror.remove_entry(&mut kernel, &old).unwrap();
        assert_eq!(kernel.endpoints.get(&key), Some(&value(2)));
        mirror.remove_entry(&mut kernel, &new).unwrap();
        assert!(kernel.endpoints.is_empty());
        assert_eq!(mirror.endpoint_entries(), 0);
    }
}
