//! The plumbing of this host's endpoints: container sandboxes, and each endpoint's veth pair
//! with the from-container program attached, created, removed, or adopted from a previous agent.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
};

use overlay_common::{ESP_OVERHEAD, VXLAN_OVERHEAD, maps::Iface};
use tracing::{info, warn};

use super::{Outcome, mirror::Mirror, plan::Here};
use crate::{
    datapath::Datapath,
    desired::{Desired, Ep, Id},
    model::{Container, Network},
    netlink::{Netlink, netns, veth},
    sandbox::Sandboxes,
    source::Report,
};

/// A local endpoint whose interface exists.
#[derive(Clone, Debug)]
pub struct Local {
    pub(super) ifindex: u32,
    pub(super) host_name: String,
    pub(super) ifname: String,
    pub(super) netns: PathBuf,
    pub(super) network_id: Id,
    /// The container it belongs to.
    pub(super) container: String,
}

/// What the agent made on this host: sandboxes, and the interfaces of local endpoints.
pub struct Locals {
    host: Netlink,
    sandboxes: Sandboxes,
    by_id: HashMap<Id, Local>,
    /// Containers and endpoints reported failed: their status (with the error) is taken back
    /// once they are made, or removed once they are no longer desired. An endpoint whose
    /// interface vanished is here too: its "ready" status is out, and must be taken back if it
    /// is removed before it is made again (a CNI pod's namespace deleted before its DEL).
    failed_containers: BTreeSet<String>,
    failed_endpoints: BTreeSet<Id>,
}

impl Locals {
    pub fn new(host: Netlink, sandboxes: Sandboxes) -> Self {
        Self {
            host,
            sandboxes,
            by_id: HashMap::new(),
            failed_containers: BTreeSet::new(),
            failed_endpoints: BTreeSet::new(),
        }
    }

    /// Local endpoints whose interface exists, by id.
    pub fn by_id(&self) -> &HashMap<Id, Local> {
        &self.by_id
    }

    /// Containers set up here (their sandbox made, or their foreign namespace used), with
    /// their namespace.
    pub fn sandboxes(&self) -> BTreeMap<String, PathBuf> {
        self.sandboxes.netns_by_name()
    }

    /// Makes the sandboxes of the desired containers among `containers`.
    pub fn ensure_sandboxes(&mut self, desired: &Desired, containers: &BTreeSet<String>, out: &mut Outcome) {
        for c in containers {
            if let Some(container) = desired.container(c) {
                match self.sandboxes.ensure(container, desired.hosts()) {
                    Ok(status) => {
                        self.failed_containers.remove(c);
                        out.status.push(status);
                    }
                    Err(e) => {
                        let error = format!("{e:#}");
                        warn!(container = %c, error, "cannot create the sandbox");
                        // Said to the store, so the CLI waiting on it prints why; the retry
                        // replaces it with the sandbox once a passing fault clears.
                        self.failed_containers.insert(c.clone());
                        out.status.push(Report::ContainerFailed {
                            name: c.clone(),
                            revision: container.revision,
                            netns: container.netns.clone().unwrap_or_else(|| self.sandboxes.path(c)),
                            error,
                        });
                        out.retry.containers.insert(c.clone());
                    }
                }
            }
        }
    }

    /// Removes the sandboxes of the containers among `containers` that are no longer desired
    /// (once their endpoints are gone).
    pub fn remove_sandboxes(&mut self, desired: &Desired, containers: &BTreeSet<String>, out: &mut Outcome) {
        for c in containers {
            if desired.container(c).is_none() && !self.sandboxes.has(c) && self.failed_containers.remove(c) {
                // Never made: only its failure report is left to take back.
                out.status.push(Report::ContainerGone { name: c.clone() });
                continue;
            }
            if desired.container(c).is_none() && self.sandboxes.has(c) {
                // A foreign namespace stays, so its container is gone only once none of its
                // endpoint interfaces is left in it (removing a namespace of ours takes them
                // with it). Interfaces of another container still desired in the same namespace
                // are not its own.
                if self.sandboxes.is_foreign(c) {
                    let netns = self.sandboxes.path_of(c);
                    let of_another = |id: &Id| {
                        desired
                            .endpoint(id)
                            .and_then(|e| e.container.as_deref())
                            .is_some_and(|owner| owner != c && desired.container(owner).is_some())
                    };
                    if self.by_id.iter().any(|(id, l)| Some(&l.netns) == netns.as_ref() && !of_another(id)) {
                        out.retry.containers.insert(c.clone());
                        continue;
                    }
                }
                match self.sandboxes.remove(c) {
                    Ok(()) => out.status.push(Report::ContainerGone { name: c.clone() }),
                    Err(e) => {
                        warn!(container = %c, error = format!("{e:#}"), "cannot remove the sandbox");
                        out.retry.containers.insert(c.clone());
                    }
                }
            }
        }
    }

    /// Creates or removes one endpoint's interface. Ok(true) when it was (re)made.
    pub async fn sync(
        &mut self,
        here: &Here,
        desired: &Desired,
        id: &Id,
        dp: &mut Datapath,
        mirror: &mut Mirror,
        out: &mut Outcome,
    ) -> anyhow::Result<bool> {
        let want = here.local_here(desired, id);
        let have = self.by_id.get(id).cloned();
        match (want, have) {
            (Some((_, _, c)), Some(have)) if have.netns == here.netns_of(c) => Ok(false),
            (Some((e, n, c)), have) => {
                if let Some(have) = have {
                    self.remove(id, &have, dp, mirror).await?;
                }
                self.create(here, e, n, c, dp, mirror).await?;
                self.failed_endpoints.remove(id);
                self.refresh_name_files(desired, &c.name);
                Ok(true)
            }
            (None, Some(have)) => {
                self.remove(id, &have, dp, mirror).await?;
                self.failed_endpoints.remove(id);
                out.status.push(Report::EndpointGone { id: id.to_string() });
                self.refresh_name_files(desired, &have.container);
                Ok(false)
            }
            (None, None) => {
                if self.failed_endpoints.remove(id) {
                    // Never made: only its failure report is left to take back.
                    out.status.push(Report::EndpointGone { id: id.to_string() });
                }
                Ok(false)
            }
        }
    }

    /// Rewrites the name files of a sandbox the agent made (resolv.conf, hosts) for the
    /// networks its interfaces are on now. A failure is logged: names are not worth failing
    /// the endpoint for.
    fn refresh_name_files(&self, desired: &Desired, container: &str) {
        let mut networks: Vec<(&str, std::net::Ipv4Addr, std::net::Ipv4Addr)> = desired
            .endpoints_of_container(container)
            .filter_map(|id| {
                let e = desired.endpoint(id)?;
                let l = self.by_id.get(id)?;
                let n = desired.network(&e.network_id)?;
                Some((l.ifname.as_str(), n.gateway, e.ipv4))
            })
            .collect();
        // In interface order, so the first nameserver is eth0's network's.
        networks.sort_by_key(|(ifname, _, _)| (ifname.len(), *ifname));
        let pairs: Vec<_> = networks.into_iter().map(|(_, gw, ip)| (gw, ip)).collect();
        if let Err(e) = self.sandboxes.write_name_files(container, &pairs) {
            warn!(container, error = format!("{e:#}"), "cannot write the container's resolv.conf and hosts");
        }
    }

    /// Reports that the endpoint's interface cannot be made, when the fault is the endpoint's
    /// own: while its container has no sandbox, the container's failure says why.
    pub fn endpoint_failed(
        &mut self,
        here: &Here,
        desired: &Desired,
        id: &Id,
        error: String,
        out: &mut Outcome,
    ) {
        let Some((_, _, c)) = here.local_here(desired, id) else { return };
        if !self.sandboxes.has(&c.name) {
            return;
        }
        self.failed_endpoints.insert(id.clone());
        out.status.push(Report::EndpointFailed { id: id.to_string(), container: c.name.clone(), error });
    }

    async fn create(
        &mut self,
        here: &Here,
        e: &Ep,
        n: &Network,
        c: &Container,
        dp: &mut Datapath,
        mirror: &mut Mirror,
    ) -> anyhow::Result<()> {
        let netns = here.netns_of(c);
        // Only into a namespace the container's sandbox was made or checked for: a refused
        // `--netns` (the host's own, say) exists, but must never get an interface.
        if !self.sandboxes.has(&c.name) {
            anyhow::bail!("container {}'s sandbox is not set up", c.name);
        }
        // A handed-over interface waits in the host's namespace for the runtime to move it.
        if !c.handover && !netns::exists(&netns) {
            anyhow::bail!("the namespace of container {} ({}) does not exist", c.name, netns.display());
        }
        let mtu = endpoint_mtu(dp.uplink.mtu, n.mtu, n.encrypted);
        if let Some(requested) = n.mtu.filter(|&m| m > mtu) {
            // `network create` refuses this for the hosts registered then; a host that came
            // later with a smaller uplink ends up here, and inspect still shows `requested`.
            warn!(
                network = %n.name,
                container = %c.name,
                requested,
                used = mtu,
                uplink_mtu = dp.uplink.mtu,
                "the network's MTU is more than this host's uplink carries with VXLAN; clamped"
            );
        }
        if n.encrypted {
            // Said where the endpoint is made, so the operator sees it next to the container.
            warn!(
                network = %n.name,
                container = %c.name,
                "the network is encrypted and this kernel has no cipher path (no ESP/AEAD, \
                 docs/encryption.md): its traffic to other hosts is dropped (no_cipher), \
                 never sent in the clear"
            );
        }
        // A network with a way out: the interface gets the uplink's MTU for that traffic, which
        // leaves unencapsulated, and the route to the subnet keeps overlay traffic at `mtu`. A
        // runtime that moves the interface in itself (Docker) makes the routes, so its interface
        // stays at `mtu`: Docker's remote API has no route MTU.
        let device_mtu = if n.has_egress() && !c.handover { dp.uplink.mtu } else { mtu };
        let spec = veth::Spec {
            endpoint_id: &e.id,
            netns: &netns,
            mac: e.mac.0,
            ip: e.ipv4,
            prefix_len: n.subnet.prefix_len(),
            gateway: Some(n.gateway),
            mtu: device_mtu,
            overlay_mtu: mtu,
            ifname: e.ifname.as_deref(),
        };
        let created = if c.handover {
            veth::create_handover(&self.host, &e.id, e.mac.0, mtu).await?
        } else {
            veth::create(&self.host, &spec).await?
        };
        let ifindex = created.host.index;
        let local = Local {
            ifindex,
            host_name: created.host.name.clone(),
            ifname: created.ifname.clone(),
            netns,
            network_id: e.network_id.clone(),
            container: c.name.clone(),
        };
        // Record it first: if attaching fails, the retry removes and remakes it.
        self.by_id.insert(e.id.clone(), local);
        dp.attach_endpoint(&created.host.name, ifindex)?;
        mirror.put_iface(
            dp,
            ifindex,
            Iface { vni: n.vni, ip: e.ipv4.octets(), mac: e.mac.0, _pad: [0; 2] },
        )?;
        info!(endpoint = %e.id, container = %c.name, ip = %e.ipv4, ifname = %created.ifname, veth = %created.host.name, mtu, device_mtu, "endpoint up");
        Ok(())
    }

    async fn remove(
        &mut self,
        id: &str,
        have: &Local,
        dp: &mut Datapath,
        mirror: &mut Mirror,
    ) -> anyhow::Result<()> {
        // Stop forwarding to it first, then take the interface away.
        self.forget(id, have, dp, mirror)?;
        self.host.delete_link(have.ifindex).await?;
        info!(endpoint = %id, veth = %have.host_name, "endpoint down");
        Ok(())
    }

    /// Removes everything the datapath knows of a local endpoint (not its interface).
    fn forget(
        &mut self,
        id: &str,
        have: &Local,
        dp: &mut Datapath,
        mirror: &mut Mirror,
    ) -> anyhow::Result<()> {
        mirror.remove_entry(dp, id)?;
        mirror.remove_iface(dp, have.ifindex)?;
        dp.detach_endpoint(have.ifindex)?;
        self.by_id.remove(id);
        Ok(())
    }

    /// Forgets those of `ids` whose interface is gone (a link event said so), so that the pass
    /// makes them again. A full pass finds them in `adopt` instead, from the list of links.
    pub async fn forget_vanished(
        &mut self,
        ids: &BTreeSet<Id>,
        dp: &mut Datapath,
        mirror: &mut Mirror,
        out: &mut Outcome,
    ) {
        for id in ids {
            let Some(l) = self.by_id.get(id).cloned() else { continue };
            match self.host.link_by_index(l.ifindex).await {
                // The index may have gone to another interface since.
                Ok(Some(link)) if link.name == l.host_name => continue,
                Ok(_) => {}
                Err(e) => {
                    warn!(endpoint = %id, error = %e, "cannot look up the endpoint interface");
                    out.retry.endpoints.insert(id.clone());
                    continue;
                }
            }
            warn!(endpoint = %id, veth = %l.host_name, "endpoint interface vanished; recreating it");
            self.failed_endpoints.insert(id.clone());
            if let Err(e) = self.forget(id, &l, dp, mirror) {
                warn!(endpoint = %id, error = %e, "cannot clear the vanished endpoint");
                out.retry.endpoints.insert(id.clone());
            }
        }
    }

    /// Takes over endpoint interfaces that exist already, and removes the ones nothing wants.
    pub async fn adopt(
        &mut self,
        here: &Here,
        desired: &Desired,
        dp: &mut Datapath,
        mirror: &mut Mirror,
        out: &mut Outcome,
    ) {
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
            .by_id
            .iter()
            .filter(|(_, l)| !present.contains(&l.ifindex))
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        for (id, l) in vanished {
            warn!(endpoint = %id, veth = %l.host_name, "endpoint interface vanished; recreating it");
            self.failed_endpoints.insert(id.clone());
            if let Err(e) = self.forget(&id, &l, dp, mirror) {
                warn!(endpoint = %id, error = %e, "cannot clear the vanished endpoint");
                out.retry.full = true;
            }
        }
        for link in links.iter().filter(|l| veth::is_endpoint_veth(l)) {
            let owner = veth::endpoint_of(link);
            let known = owner.is_some_and(|id| self.by_id.get(id).is_some_and(|l| l.ifindex == link.index));
            if known {
                continue;
            }
            let adopt = owner.and_then(|id| {
                let (e, _, c) = here.local_here(desired, id)?;
                Some((e.id.clone(), e.network_id.clone(), here.netns_of(c), c.name.clone()))
            });
            if let Some((id, network_id, netns, container)) = adopt {
                let ifname = veth::container_ifname(link).unwrap_or_default();
                self.by_id.insert(
                    id.clone(),
                    Local {
                        ifindex: link.index,
                        host_name: link.name.clone(),
                        ifname,
                        netns,
                        network_id,
                        container,
                    },
                );
                if let Err(e) = dp.attach_endpoint(&link.name, link.index) {
                    warn!(veth = %link.name, error = %e, "cannot re-attach to an existing endpoint");
                    out.retry.endpoints.insert(id);
                }
            } else {
                info!(veth = %link.name, "removing an interface nothing wants");
                let _ = dp.detach_endpoint(link.index);
                if let Err(e) = self.host.delete_link(link.index).await {
                    warn!(veth = %link.name, error = %e, "cannot remove");
                    out.retry.full = true;
                }
            }
        }
        // Attachments whose interface is gone.
        let live: BTreeSet<u32> = self.by_id.values().map(|l| l.ifindex).collect();
        match dp.pins.endpoint_links() {
            Ok(pinned) => {
                for ifindex in pinned.into_iter().filter(|i| !live.contains(i)) {
                    let _ = dp.detach_endpoint(ifindex);
                }
            }
            Err(e) => warn!(error = %e, "cannot list pinned attachments"),
        }
    }
}

/// A container's MTU: what fits the uplink once VXLAN's 50 bytes are added (and ESP's on an
/// encrypted network), or less if the network asks for less.
pub fn endpoint_mtu(uplink_mtu: u32, network_mtu: Option<u32>, encrypted: bool) -> u32 {
    let esp = if encrypted { ESP_OVERHEAD } else { 0 };
    let fits = uplink_mtu.saturating_sub(VXLAN_OVERHEAD + esp);
    network_mtu.map_or(fits, |m| m.min(fits))
}

#[cfg(test)]
mod tests {
    use super::endpoint_mtu;

    #[test]
    fn mtu_leaves_room_for_vxlan() {
        assert_eq!(endpoint_mtu(1500, None, false), 1450);
        assert_eq!(endpoint_mtu(9000, None, false), 8950);
        assert_eq!(endpoint_mtu(1500, Some(1400), false), 1400);
        // A network cannot ask for more than the uplink carries.
        assert_eq!(endpoint_mtu(1500, Some(9000), false), 1450);
    }

    #[test]
    fn an_encrypted_network_leaves_room_for_esp_as_well() {
        // 1500 - 50 (VXLAN) - 57 (ESP tunnel mode with AES-GCM, its largest padding).
        assert_eq!(endpoint_mtu(1500, None, true), 1393);
        assert_eq!(endpoint_mtu(1500, Some(1400), true), 1393);
        assert_eq!(endpoint_mtu(1500, Some(1300), true), 1300);
    }
}
