//! Closing the gap between the desired state and what exists on this host.
//!
//! The reconciler owns everything the agent makes: container sandboxes, endpoint veths, and the
//! contents of the datapath maps (of which it keeps a mirror, so it only writes what changes).
//! Each pass works on what is dirty; a full pass (at startup, and periodically) looks at
//! everything and also removes whatever nothing desires any more, which is how an agent that
//! restarts picks up the datapath its predecessor left without disturbing it. An endpoint is
//! also dirty when the kernel says its veth was deleted (`netlink::events`): the pass finds the
//! interface gone and makes it again, without waiting for the next full pass.
//!
//! A host only carries the networks it takes part in (those with an endpoint on it), as
//! libnetwork's overlay does: their remote endpoints, their VNIs. Every other host is a peer.
//!
//! A pass runs in four steps:
//! - `plan`: what changed, what is desired and what exists -> what to look at (no I/O);
//! - `local`: sandboxes and endpoint interfaces (netlink, attachments), and adopting the ones a
//!   previous agent left;
//! - the resolver's path and zone (`serve_names` below, over `netlink::resolver_path` and
//!   `resolver`): the gateways it answers on, the routes its answers take, the names it knows;
//! - egress (`egress_step` below, over `crate::egress`): the way out through the host for the
//!   networks that have one, and published ports;
//! - `mirror`: the maps, written through [`MapWriter`](crate::datapath::MapWriter) where they
//!   differ from what is desired.

mod local;
mod mirror;
mod names;
mod plan;
#[cfg(test)]
pub(crate) mod testing;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use tracing::{info, warn};

pub use self::local::endpoint_mtu;
use self::{
    local::Locals,
    mirror::{Found, Mirror},
    plan::{Existing, Here, Plan},
};
use crate::{
    datapath::Datapath,
    desired::{Desired, Dirty},
    egress::{self, Egress, Exit, nft::Published},
    netlink::{
        Netlink,
        resolver_path::{ResolverPath, Route},
    },
    resolver::{Resolver, zone::Zone},
    sandbox::Sandboxes,
    source::Report,
    store::WithheldPort,
};

/// What a pass did that others need to know, and what it could not do yet.
#[derive(Debug, Default)]
pub struct Outcome {
    pub status: Vec<Report>,
    /// Keys that failed and should be retried.
    pub retry: Dirty,
}

pub struct Reconciler {
    here: Here,
    dp: Datapath,
    locals: Locals,
    mirror: Mirror,
    path: ResolverPath,
    resolver: Resolver,
    egress: Egress,
    /// Whether the containers' withheld ports were reported since the agent started.
    withheld_reported: bool,
}

impl Reconciler {
    /// Starts from what the kernel maps hold now (left by a previous agent, or empty).
    pub fn new(
        me: &str,
        dp: Datapath,
        host: Netlink,
        uplink: &str,
        sandboxes: Sandboxes,
        resolver: Resolver,
    ) -> anyhow::Result<Self> {
        let found = Found::read(&dp.maps)?;
        info!(
            endpoints = found.endpoints.len(),
            ifaces = found.ifaces.len(),
            peers = found.peers.len(),
            networks = found.networks.len(),
            "found existing datapath state"
        );
        let here = Here { me: me.to_owned(), sandbox_prefix: sandboxes.prefix().to_owned() };
        Ok(Self {
            here,
            dp,
            path: ResolverPath::new(host.clone()),
            egress: Egress::new(host.clone(), uplink),
            locals: Locals::new(host, sandboxes),
            mirror: Mirror::new(found),
            resolver,
            withheld_reported: false,
        })
    }

    /// The containers this host runs (their sandboxes, made here or recorded as foreign).
    pub fn containers(&self) -> Vec<String> {
        self.locals.sandboxes().into_keys().collect()
    }

    /// Attaches again what was detached by hand (datapath::Datapath::reattach).
    pub fn reattach(&mut self, pin: &std::path::Path) -> Result<bool, crate::datapath::Error> {
        self.dp.reattach(pin)
    }

    /// Number of entries in the endpoint map (local and remote).
    pub fn endpoint_entries(&self) -> usize {
        self.mirror.endpoint_entries()
    }

    pub async fn reconcile(&mut self, desired: &Desired, dirty: Dirty) -> Outcome {
        let mut out = Outcome::default();
        if dirty.full {
            self.locals.adopt(&self.here, desired, &mut self.dp, &mut self.mirror, &mut out).await;
            self.dp.repin();
        } else {
            self.locals.forget_vanished(&dirty.endpoints, &mut self.dp, &mut self.mirror, &mut out).await;
        }
        let existing = Existing {
            locals: self.locals.by_id(),
            sandboxes: self.locals.sandboxes(),
            mirror: &self.mirror,
        };
        let plan = Plan::new(&self.here, desired, dirty, &existing);

        // Sandboxes first: endpoints need their namespace.
        self.locals.ensure_sandboxes(desired, &plan.containers, &mut out);
        let mut ready = Vec::new();
        for id in &plan.locals {
            match self.locals.sync(&self.here, desired, id, &mut self.dp, &mut self.mirror, &mut out).await {
                Ok(true) => ready.push(id.clone()),
                Ok(false) => {}
                Err(e) => {
                    let error = format!("{e:#}");
                    warn!(endpoint = %id, error, "cannot set up the endpoint");
                    self.locals.endpoint_failed(&self.here, desired, id, error, &mut out);
                    out.retry.endpoints.insert(id.clone());
                }
            }
        }
        // Sandboxes of containers that are gone, now that their endpoints are.
        self.locals.remove_sandboxes(desired, &plan.containers, &mut out);

        let served = self.serve_names(desired, &plan, &mut out).await;
        self.mirror.set_served(served);
        let exits = self.egress_step(desired, &plan, &mut out).await;
        self.mirror.set_egress(exits);
        self.mirror.apply(&mut self.dp, &self.here, desired, &plan, self.locals.by_id(), &mut out);

        if plan.full {
            // After a restart the store may have lost what this host reported: say it again.
            ready.extend(self.locals.by_id().keys().cloned());
        }
        ready.sort();
        ready.dedup();
        for id in ready {
            if let (Some(l), Some(container)) =
                (self.locals.by_id().get(&id), desired.endpoint(&id).and_then(|e| e.container.as_ref()))
                && self.mirror.has_entry(&id)
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

    /// Gives this host's containers whose networks have a way out their path through the host,
    /// and its published ports their rules. Returns the networks whose containers may now send
    /// out.
    async fn egress_step(&mut self, desired: &Desired, plan: &Plan, out: &mut Outcome) -> BTreeSet<String> {
        let mut want =
            egress::Want { host: desired.host(&self.here.me).map(|h| h.vtep), ..egress::Want::default() };
        // Per container, its endpoints with a way out, by network name: a published port leads
        // to the first (a container has one network, as a rule).
        let mut by_container: BTreeMap<&str, BTreeMap<&str, Ipv4Addr>> = BTreeMap::new();
        for (id, l) in self.locals.by_id() {
            let (Some(e), Some(n)) = (desired.endpoint(id), desired.network(&l.network_id)) else { continue };
            if !n.has_egress() {
                continue;
            }
            want.exits.insert(
                e.ipv4,
                Exit {
                    route: Route { ifindex: l.ifindex, mac: e.mac.0 },
                    network_id: n.id.clone(),
                    subnet: n.subnet,
                },
            );
            by_container.entry(l.container.as_str()).or_default().insert(n.name.as_str(), e.ipv4);
        }
        for (name, exits) in &by_container {
            let (Some(c), Some((_, target))) = (desired.container(name), exits.first_key_value()) else {
                continue;
            };
            for port in &c.ports {
                want.published.insert(Published { port: *port, target: *target, container: c.name.clone() });
            }
        }
        let subnets: Vec<ipnet::Ipv4Net> = desired.networks().map(|n| n.subnet).collect();
        let before = self.egress.withheld();
        let (ready, failed) = self.egress.sync_with(&want, plan.full, &subnets).await;
        if failed {
            out.retry.full = true;
        }
        self.report_withheld(&before, out);
        ready
    }

    /// Reports the containers whose withheld ports (published ports a server of the host
    /// holds) changed in this pass, so `container inspect` says why such a port does not
    /// answer. The first pass reports every container of the host: the store may still hold
    /// what an earlier agent said about a server that has gone since.
    fn report_withheld(&mut self, before: &BTreeMap<String, Vec<WithheldPort>>, out: &mut Outcome) {
        let now = self.egress.withheld();
        let first = !self.withheld_reported;
        let mut names: BTreeSet<String> = before.keys().chain(now.keys()).cloned().collect();
        if first {
            names.extend(self.containers());
        }
        for name in names {
            if first || before.get(&name) != now.get(&name) {
                let withheld = now.get(&name).cloned().unwrap_or_default();
                out.status.push(Report::PortsWithheld { container: name, withheld });
            }
        }
        self.withheld_reported = true;
    }

    /// Gives the resolver its path (a gateway address and rule per network with a local
    /// endpoint, a route per local endpoint), its sockets and its zone. Returns the gateways it
    /// serves, whose networks the datapath may hand queries up for.
    async fn serve_names(&mut self, desired: &Desired, plan: &Plan, out: &mut Outcome) -> BTreeSet<Ipv4Addr> {
        let mut gateways = BTreeSet::new();
        let mut routes = BTreeMap::new();
        for (id, l) in self.locals.by_id() {
            let (Some(e), Some(n)) = (desired.endpoint(id), desired.network(&l.network_id)) else { continue };
            if n.gateway.is_unspecified() {
                continue;
            }
            gateways.insert(n.gateway);
            routes.insert(e.ipv4, Route { ifindex: l.ifindex, mac: e.mac.0 });
        }
        for e in self.path.sync(&gateways, &routes, plan.full).await {
            warn!(error = format!("{e:#}"), "cannot set up the resolver's path");
            out.retry.full = true;
        }
        let served = self.path.served().clone();
        for (gateway, e) in self.resolver.listen(&served) {
            warn!(%gateway, error = %e, "the resolver cannot listen on the gateway's port 53");
            out.retry.full = true;
        }
        if plan.full || !plan.networks.is_empty() || !plan.entries.is_empty() || !plan.locals.is_empty() {
            self.resolver.set_zone(Zone::build(desired, &self.here.me));
        }
        served
    }
}
