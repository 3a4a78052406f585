//! Closing the gap between the desired state and what exists on this host.
//!
//! The reconciler owns everything the agent makes: container sandboxes, endpoint veths, and the
//! contents of the datapath maps (of which it keeps a mirror, so it only writes what changes).
//! Each pass works on what is dirty; a full pass (at startup, and periodically) looks at
//! everything and also removes whatever nothing desires any more, which is how an agent that
//! restarts picks up the datapath its predecessor left without disturbing it.
//!
//! A host only carries the networks it takes part in (those with an endpoint on it), as
//! libnetwork's overlay does: their remote endpoints, their VNIs. Every other host is a peer.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
};

use overlay_common::{
    VXLAN_OVERHEAD,
    maps::{ENDPOINT_LOCAL, Endpoint as MapEndpoint, EndpointKey, Iface, Network as MapNetwork},
};
use tracing::{info, warn};

use crate::{
    datapath::Datapath,
    desired::{Desired, Dirty, Ep, Id},
    model::{Container, Network},
    netlink::{Netlink, netns, veth},
    sandbox::Sandboxes,
    source::Report,
};

/// A local endpoint whose interface exists.
#[derive(Clone, Debug)]
struct Local {
    ifindex: u32,
    host_name: String,
    ifname: String,
    netns: PathBuf,
    network_id: Id,
}

/// What a pass did that others need to know, and what it could not do yet.
#[derive(Debug, Default)]
pub struct Outcome {
    pub status: Vec<Report>,
    /// Keys that failed and should be retried.
    pub retry: Dirty,
}

pub struct Reconciler {
    me: String,
    dp: Datapath,
    host: Netlink,
    sandboxes: Sandboxes,
    local: HashMap<Id, Local>,
    /// Networks with a local endpoint: id -> VNI.
    joined: HashMap<String, u32>,
    // Mirrors of the maps: exactly what the kernel holds (at startup: what it held).
    endpoints: HashMap<EndpointKey, MapEndpoint>,
    key_owner: HashMap<EndpointKey, Id>,
    endpoint_key: HashMap<Id, EndpointKey>,
    ifaces: HashMap<u32, Iface>,
    peers: HashMap<String, Ipv4Addr>,
    peer_set: HashMap<Ipv4Addr, MapPeerState>,
    networks: HashMap<u32, MapNetwork>,
}

/// Peers present in the kernel map, and whether a host still claims them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MapPeerState {
    Claimed,
    Orphan,
}

impl Reconciler {
    /// Starts from what the kernel maps hold now (left by a previous agent, or empty).
    pub fn new(me: &str, dp: Datapath, host: Netlink, sandboxes: Sandboxes) -> anyhow::Result<Self> {
        let endpoints = dp.maps.endpoints.iter().collect::<Result<HashMap<_, _>, _>>()?;
        let ifaces = dp.maps.ifaces.iter().collect::<Result<HashMap<_, _>, _>>()?;
        let peer_set = dp
            .maps
            .peers
            .keys()
            .map(|k| k.map(|k| (Ipv4Addr::from(k.vtep), MapPeerState::Orphan)))
            .collect::<Result<HashMap<_, _>, _>>()?;
        let networks = dp.maps.networks.iter().collect::<Result<HashMap<_, _>, _>>()?;
        info!(
            endpoints = endpoints.len(),
            ifaces = ifaces.len(),
            peers = peer_set.len(),
            networks = networks.len(),
            "found existing datapath state"
        );
        Ok(Self {
            me: me.to_owned(),
            dp,
            host,
            sandboxes,
            local: HashMap::new(),
            joined: HashMap::new(),
            endpoints,
            key_owner: HashMap::new(),
            endpoint_key: HashMap::new(),
            ifaces,
            peers: HashMap::new(),
            peer_set,
            networks,
        })
    }

    /// Number of entries in the endpoint map (local and remote).
    pub fn endpoint_entries(&self) -> usize {
        self.endpoints.len()
    }

    pub async fn reconcile(&mut self, desired: &Desired, mut dirty: Dirty) -> Outcome {
        let mut out = Outcome::default();
        if dirty.full {
            self.adopt(desired, &mut out).await;
            dirty
                .networks
                .extend(desired.networks().map(|n| n.id.clone()).chain(self.joined.keys().cloned()));
            dirty.endpoints.extend(
                desired
                    .endpoint_ids()
                    .cloned()
                    .chain(self.endpoint_key.keys().cloned())
                    .chain(self.local.keys().cloned()),
            );
            dirty
                .containers
                .extend(desired.containers().map(|c| c.name.clone()).chain(self.sandboxes.names()));
            dirty.hosts.extend(desired.hosts().map(|h| h.name.clone()).chain(self.peers.keys().cloned()));
        }

        // Which local endpoints may have to be created or removed.
        let mut local_set: BTreeSet<Id> = dirty.endpoints.clone();
        for c in &dirty.containers {
            local_set.extend(desired.endpoints_of_container(c).cloned());
            local_set.extend(
                self.local
                    .iter()
                    .filter(|(_, l)| l.netns == self.netns_of_name(desired, c))
                    .map(|(id, _)| id.clone()),
            );
        }
        for n in &dirty.networks {
            local_set.extend(desired.endpoints_of_network(n).cloned());
            local_set
                .extend(self.local.iter().filter(|(_, l)| *l.network_id == **n).map(|(id, _)| id.clone()));
        }

        // Sandboxes first: endpoints need their namespace.
        for c in &dirty.containers {
            if let Some(container) = desired.container(c) {
                let container = container.clone();
                match self.sandboxes.ensure(&container) {
                    Ok(status) => out.status.push(status),
                    Err(e) => {
                        warn!(container = %c, error = format!("{e:#}"), "cannot create the sandbox");
                        out.retry.containers.insert(c.clone());
                    }
                }
            }
        }

        // Networks whose participation may change with these endpoints (before any is removed).
        let mut networks: BTreeSet<String> = dirty.networks.clone();
        for id in &local_set {
            // A full pass visits every endpoint, so allocate only for networks not seen yet.
            for network_id in
                [desired.endpoint(id).map(|e| &e.network_id), self.local.get(id).map(|l| &l.network_id)]
                    .into_iter()
                    .flatten()
            {
                if !networks.contains(&**network_id) {
                    networks.insert(network_id.to_string());
                }
            }
        }

        let mut ready = Vec::new();
        for id in &local_set {
            match self.sync_local(desired, id, &mut out).await {
                Ok(true) => ready.push(id.clone()),
                Ok(false) => {}
                Err(e) => {
                    warn!(endpoint = %id, error = format!("{e:#}"), "cannot set up the endpoint");
                    out.retry.endpoints.insert(id.clone());
                }
            }
        }

        // Sandboxes of containers that are gone, now that their endpoints are.
        for c in &dirty.containers {
            if desired.container(c).is_none() && self.sandboxes.has(c) {
                match self.sandboxes.remove(c) {
                    Ok(()) => out.status.push(Report::ContainerGone { name: c.clone() }),
                    Err(e) => {
                        warn!(container = %c, error = format!("{e:#}"), "cannot remove the sandbox");
                        out.retry.containers.insert(c.clone());
                    }
                }
            }
        }

        let mut entry_set: BTreeSet<Id> = dirty.endpoints.clone();
        entry_set.extend(local_set.iter().cloned());
        for n in &networks {
            let vni = self.joined_vni(desired, n);
            if vni != self.joined.get(n).copied() {
                entry_set.extend(desired.endpoints_of_network(n).cloned());
                entry_set.extend(
                    self.endpoint_key
                        .keys()
                        .filter(|id| desired.endpoint(id).is_none_or(|e| *e.network_id == **n))
                        .cloned(),
                );
            }
            if let Err(e) = self.sync_network(desired, n, vni) {
                warn!(network = %n, error = format!("{e:#}"), "cannot update the network map");
                out.retry.networks.insert(n.clone());
            }
        }
        for h in &dirty.hosts {
            entry_set.extend(desired.endpoints_of_host(h).cloned());
        }

        for id in &entry_set {
            if let Err(e) = self.sync_entry(desired, id) {
                warn!(endpoint = %id, error = format!("{e:#}"), "cannot update the endpoint map");
                out.retry.endpoints.insert(id.clone());
            }
        }
        for h in &dirty.hosts {
            if let Err(e) = self.sync_peer(desired, h) {
                warn!(host = %h, error = format!("{e:#}"), "cannot update the peer map");
                out.retry.hosts.insert(h.clone());
            }
        }

        if dirty.full {
            if let Err(e) = self.remove_orphans() {
                warn!(error = format!("{e:#}"), "cannot remove stale map entries");
                out.retry.full = true;
            }
            // After a restart the store may have lost what this host reported: say it again.
            ready.extend(self.local.keys().cloned());
        }
        ready.sort();
        ready.dedup();
        for id in ready {
            if let (Some(l), Some(container)) =
                (self.local.get(&id), desired.endpoint(&id).and_then(|e| e.container.as_ref()))
                && self.endpoint_key.contains_key(&id)
            {
                out.status.push(Report::EndpointReady {
                    id: id.to_string(),
                    container: container.to_string(),
                    ifname: l.ifname.clone(),
                });
            }
        }
        out
    }

    fn netns_of(&self, c: &Container) -> PathBuf {
        c.netns.clone().unwrap_or_else(|| self.sandboxes.path(&c.name))
    }

    fn netns_of_name(&self, desired: &Desired, name: &str) -> PathBuf {
        match desired.container(name) {
            Some(c) => self.netns_of(c),
            None => self.sandboxes.path(name),
        }
    }

    /// The endpoint with its network and container, if it should have an interface here.
    fn local_here<'a>(&self, desired: &'a Desired, id: &str) -> Option<(&'a Ep, &'a Network, &'a Container)> {
        let e = desired.endpoint(id).filter(|e| *e.host == *self.me)?;
        let n = desired.network(&e.network_id)?;
        let c = desired.container(e.container.as_deref()?)?;
        Some((e, n, c))
    }

    /// The VNI of a network this host takes part in, or None.
    fn joined_vni(&self, desired: &Desired, network_id: &str) -> Option<u32> {
        let n = desired.network(network_id)?;
        desired
            .endpoints_of_network(network_id)
            .any(|id| self.local_here(desired, id).is_some())
            .then_some(n.vni)
    }

    /// Creates or removes one endpoint's interface. Ok(true) when it was (re)made.
    async fn sync_local(&mut self, desired: &Desired, id: &Id, out: &mut Outcome) -> anyhow::Result<bool> {
        let want = self.local_here(desired, id);
        let have = self.local.get(id).cloned();
        match (want, have) {
            (Some((_, _, c)), Some(have)) if have.netns == self.netns_of(c) => Ok(false),
            (Some((e, n, c)), have) => {
                if let Some(have) = have {
                    self.remove_local(id, &have).await?;
                }
                let (e, n, c) = (e.clone(), n.clone(), c.clone());
                self.create_local(&e, &n, &c).await?;
                Ok(true)
            }
            (None, Some(have)) => {
                self.remove_local(id, &have).await?;
                out.status.push(Report::EndpointGone { id: id.to_string() });
                Ok(false)
            }
            (None, None) => Ok(false),
        }
    }

    async fn create_local(&mut self, e: &Ep, n: &Network, c: &Container) -> anyhow::Result<()> {
        let netns = self.netns_of(c);
        if !netns::exists(&netns) {
            anyhow::bail!("the namespace of container {} ({}) does not exist", c.name, netns.display());
        }
        let mtu = endpoint_mtu(self.dp.uplink.mtu, n.mtu);
        let spec = veth::Spec {
            endpoint_id: &e.id,
            netns: &netns,
            mac: e.mac.0,
            ip: e.ipv4,
            prefix_len: n.subnet.prefix_len(),
            gateway: Some(n.gateway),
            mtu,
        };
        let created = veth::create(&self.host, &spec).await?;
        let ifindex = created.host.index;
        let local = Local {
            ifindex,
            host_name: created.host.name.clone(),
            ifname: created.ifname.clone(),
            netns,
            network_id: e.network_id.clone(),
        };
        // Record it first: if attaching fails, the retry removes and remakes it.
        self.local.insert(e.id.clone(), local);
        self.dp.attach_endpoint(&created.host.name, ifindex)?;
        self.put_iface(ifindex, Iface { vni: n.vni, ip: e.ipv4.octets(), mac: e.mac.0, _pad: [0; 2] })?;
        info!(endpoint = %e.id, container = %c.name, ip = %e.ipv4, ifname = %created.ifname, veth = %created.host.name, mtu, "endpoint up");
        Ok(())
    }

    async fn remove_local(&mut self, id: &str, have: &Local) -> anyhow::Result<()> {
        // Stop forwarding to it first, then take the interface away.
        self.forget_local(id, have)?;
        self.host.delete_link(have.ifindex).await?;
        info!(endpoint = %id, veth = %have.host_name, "endpoint down");
        Ok(())
    }

    /// Removes everything the datapath knows of a local endpoint (not its interface).
    fn forget_local(&mut self, id: &str, have: &Local) -> anyhow::Result<()> {
        self.remove_entry(id)?;
        if self.ifaces.remove(&have.ifindex).is_some() {
            self.dp.remove_iface(have.ifindex)?;
        }
        self.dp.detach_endpoint(have.ifindex)?;
        self.local.remove(id);
        Ok(())
    }

    fn put_iface(&mut self, ifindex: u32, value: Iface) -> anyhow::Result<()> {
        if self.ifaces.get(&ifindex) != Some(&value) {
            self.dp.put_iface(ifindex, value)?;
            self.ifaces.insert(ifindex, value);
        }
        Ok(())
    }

    /// What the endpoint map should hold for endpoint `id`, if anything.
    fn wanted_entry(&self, desired: &Desired, id: &str) -> Option<(EndpointKey, MapEndpoint)> {
        let e = desired.endpoint(id)?;
        let vni = *self.joined.get(&*e.network_id)?;
        let key = EndpointKey { vni, ip: e.ipv4.octets() };
        if *e.host == *self.me {
            let l = self.local.get(id)?;
            Some((key, MapEndpoint { mac: e.mac.0, flags: ENDPOINT_LOCAL, ifindex: l.ifindex, vtep: [0; 4] }))
        } else {
            let h = desired.host(&e.host)?;
            Some((key, MapEndpoint { mac: e.mac.0, flags: 0, ifindex: 0, vtep: h.vtep.octets() }))
        }
    }

    fn sync_entry(&mut self, desired: &Desired, id: &Id) -> anyhow::Result<()> {
        match self.wanted_entry(desired, id) {
            Some((key, value)) => self.put_entry(id, key, value),
            None => self.remove_entry(id),
        }
    }

    fn put_entry(&mut self, id: &Id, key: EndpointKey, value: MapEndpoint) -> anyhow::Result<()> {
        if let Some(old) = self.endpoint_key.get(id).copied()
            && old != key
        {
            self.remove_entry(id)?;
        }
        if self.endpoints.get(&key) != Some(&value) {
            self.dp.put_endpoint(key, value)?;
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

    fn remove_entry(&mut self, id: &str) -> anyhow::Result<()> {
        let Some(key) = self.endpoint_key.remove(id) else { return Ok(()) };
        if self.key_owner.get(&key).is_some_and(|owner| **owner == *id) {
            self.key_owner.remove(&key);
            self.dp.remove_endpoint(&key)?;
            self.endpoints.remove(&key);
        }
        Ok(())
    }

    fn sync_network(&mut self, desired: &Desired, id: &str, vni: Option<u32>) -> anyhow::Result<()> {
        let old = self.joined.get(id).copied();
        if let Some(old) = old
            && Some(old) != vni
        {
            self.joined.remove(id);
            if self.networks.remove(&old).is_some() {
                self.dp.remove_network(old)?;
            }
        }
        if let (Some(vni), Some(n)) = (vni, desired.network(id)) {
            let value =
                MapNetwork { gateway: n.gateway.octets(), gateway_mac: n.gateway_mac().0, _pad: [0; 2] };
            if self.networks.get(&vni) != Some(&value) {
                self.dp.put_network(vni, value)?;
                self.networks.insert(vni, value);
            }
            self.joined.insert(id.to_owned(), vni);
        }
        Ok(())
    }

    fn sync_peer(&mut self, desired: &Desired, name: &str) -> anyhow::Result<()> {
        let want = desired.host(name).filter(|h| h.name != self.me).map(|h| h.vtep);
        let have = self.peers.get(name).copied();
        if want == have {
            if let Some(vtep) = want {
                self.peer_set.insert(vtep, MapPeerState::Claimed);
            }
            return Ok(());
        }
        if let Some(old) = have {
            self.peers.remove(name);
            // Another host could share the address (a host renamed): keep it while claimed.
            if !self.peers.values().any(|v| *v == old) {
                self.dp.remove_peer(old)?;
                self.peer_set.remove(&old);
            }
        }
        if let Some(vtep) = want {
            if self.peer_set.get(&vtep) != Some(&MapPeerState::Claimed) {
                self.dp.put_peer(vtep)?;
            }
            self.peer_set.insert(vtep, MapPeerState::Claimed);
            self.peers.insert(name.to_owned(), vtep);
        }
        Ok(())
    }

    /// Takes over endpoint interfaces that exist already, and removes the ones nothing wants.
    async fn adopt(&mut self, desired: &Desired, out: &mut Outcome) {
        let links = match self.host.links().await {
            Ok(links) => links,
            Err(e) => {
                warn!(error = %e, "cannot list interfaces");
                out.retry.full = true;
                return;
            }
        };
        // Interfaces that disappeared behind our back (a namespace deleted, a veth removed by
        // hand): forget them and their map entries, so this pass makes them again.
        let present: BTreeSet<u32> = links.iter().map(|l| l.index).collect();
        let vanished: Vec<(Id, Local)> = self
            .local
            .iter()
            .filter(|(_, l)| !present.contains(&l.ifindex))
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        for (id, l) in vanished {
            warn!(endpoint = %id, veth = %l.host_name, "endpoint interface vanished; recreating it");
            if let Err(e) = self.forget_local(&id, &l) {
                warn!(endpoint = %id, error = %e, "cannot clear the vanished endpoint");
                out.retry.full = true;
            }
        }
        for link in links.iter().filter(|l| veth::is_endpoint_veth(l)) {
            let owner = veth::endpoint_of(link);
            let known = owner.is_some_and(|id| self.local.get(id).is_some_and(|l| l.ifindex == link.index));
            if known {
                continue;
            }
            let adopt = owner.and_then(|id| {
                let (e, _, c) = self.local_here(desired, id)?;
                Some((e.id.clone(), e.network_id.clone(), self.netns_of(c)))
            });
            match adopt {
                Some((id, network_id, netns)) => {
                    let ifname = veth::container_ifname(link).unwrap_or_default();
                    self.local.insert(
                        id.clone(),
                        Local {
                            ifindex: link.index,
                            host_name: link.name.clone(),
                            ifname,
                            netns,
                            network_id,
                        },
                    );
                    if let Err(e) = self.dp.attach_endpoint(&link.name, link.index) {
                        warn!(veth = %link.name, error = %e, "cannot re-attach to an existing endpoint");
                        out.retry.endpoints.insert(id);
                    }
                }
                None => {
                    info!(veth = %link.name, "removing an interface nothing wants");
                    let _ = self.dp.detach_endpoint(link.index);
                    if let Err(e) = self.host.delete_link(link.index).await {
                        warn!(veth = %link.name, error = %e, "cannot remove");
                        out.retry.full = true;
                    }
                }
            }
        }
        // Attachments whose interface is gone.
        let live: BTreeSet<u32> = self.local.values().map(|l| l.ifindex).collect();
        match self.dp.pins.endpoint_links() {
            Ok(pinned) => {
                for ifindex in pinned.into_iter().filter(|i| !live.contains(i)) {
                    let _ = self.dp.detach_endpoint(ifindex);
                }
            }
            Err(e) => warn!(error = %e, "cannot list pinned attachments"),
        }
    }

    /// Removes map entries that no desired object explains (after a full pass).
    fn remove_orphans(&mut self) -> anyhow::Result<()> {
        let stale: Vec<EndpointKey> =
            self.endpoints.keys().filter(|k| !self.key_owner.contains_key(k)).copied().collect();
        for key in stale {
            self.dp.remove_endpoint(&key)?;
            self.endpoints.remove(&key);
        }
        let live: BTreeSet<u32> = self.local.values().map(|l| l.ifindex).collect();
        let stale: Vec<u32> = self.ifaces.keys().filter(|i| !live.contains(i)).copied().collect();
        for ifindex in stale {
            self.dp.remove_iface(ifindex)?;
            self.ifaces.remove(&ifindex);
        }
        let joined: BTreeSet<u32> = self.joined.values().copied().collect();
        let stale: Vec<u32> = self.networks.keys().filter(|v| !joined.contains(v)).copied().collect();
        for vni in stale {
            self.dp.remove_network(vni)?;
            self.networks.remove(&vni);
        }
        let stale: Vec<Ipv4Addr> =
            self.peer_set.iter().filter(|(_, s)| **s == MapPeerState::Orphan).map(|(v, _)| *v).collect();
        for vtep in stale {
            self.dp.remove_peer(vtep)?;
            self.peer_set.remove(&vtep);
        }
        Ok(())
    }
}

/// A container's MTU: what fits the uplink once VXLAN's 50 bytes are added, or less if the
/// network asks for less.
pub fn endpoint_mtu(uplink_mtu: u32, network_mtu: Option<u32>) -> u32 {
    let fits = uplink_mtu.saturating_sub(VXLAN_OVERHEAD);
    network_mtu.map_or(fits, |m| m.min(fits))
}

#[cfg(test)]
mod tests {
    use super::endpoint_mtu;

    #[test]
    fn mtu_leaves_room_for_vxlan() {
        assert_eq!(endpoint_mtu(1500, None), 1450);
        assert_eq!(endpoint_mtu(9000, None), 8950);
        assert_eq!(endpoint_mtu(1500, Some(1400)), 1400);
        // A network cannot ask for more than the uplink carries.
        assert_eq!(endpoint_mtu(1500, Some(9000)), 1450);
    }
}
