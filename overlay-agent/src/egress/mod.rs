//! Containers reaching the world, and the world reaching published ports (docs/egress.md).
//!
//! The datapath decides: a container's packet to an address outside its network goes up the
//! host's stack where the network has `NETWORK_EGRESS` (overlay-ebpf's from_container). This
//! module makes the host's side real for the containers of this host:
//! - the way back to each container with egress: a route per container in the agent's own
//!   routing table, forwarding on its veth and on the devices replies come in by
//!   (`netlink::egress_path`);
//! - the agent's nftables table (`nft`): masquerading, published ports, the forwarding filter;
//! - forgetting a container's conntrack entries when it goes (`conntrack`).
//!
//! A network's containers may send out (the mirror sets `NETWORK_EGRESS`) only once all of
//! this is in place for them.

pub mod conntrack;
pub mod listeners;
pub mod nft;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use tracing::{info, warn};

use self::{
    listeners::Listener,
    nft::{Published, Ruleset},
};
use crate::{
    netlink::{
        Netlink,
        egress_path::{self, EgressPath},
        resolver_path::Route,
    },
    store::WithheldPort,
};

/// A local endpoint whose network has a way out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub route: Route,
    pub network_id: String,
    pub subnet: ipnet::Ipv4Net,
}

/// What this host's egress should be: its endpoints with a way out (by address), and the
/// published ports.
#[derive(Clone, Debug, Default)]
pub struct Want {
    pub exits: BTreeMap<Ipv4Addr, Exit>,
    pub published: BTreeSet<Published>,
    /// This host's address (its VTEP): what a container calling a port published here is
    /// seen as (`nft::Ruleset::host`).
    pub host: Option<Ipv4Addr>,
}

pub struct Egress {
    nl: Netlink,
    path: EgressPath,
    /// The device VXLAN leaves by (forwarding goes on there too).
    uplink: String,
    /// The ruleset the table holds, as this agent last wrote it (None: not known).
    applied: Option<Ruleset>,
    /// Whether forwarding was turned on for the uplink and the default routes' devices.
    forwarding: bool,
    /// The addresses that had a way out after the last pass: those that lose it get their
    /// conntrack entries removed. None before the first pass, which sweeps instead.
    known: Option<BTreeSet<Ipv4Addr>>,
    /// Published ports left out because a server of the host holds them (`listeners`), and
    /// the server, as last warned about.
    refused: BTreeMap<Published, Listener>,
}

impl Egress {
    pub fn new(nl: Netlink, uplink: &str) -> Self {
        Self {
            path: EgressPath::new(nl.clone()),
            nl,
            uplink: uplink.to_owned(),
            applied: None,
            forwarding: false,
            known: None,
            refused: BTreeMap::new(),
        }
    }

    /// Brings routes, forwarding, the table and conntrack to `want`. Returns the networks whose
    /// containers may send out now, and whether something failed (to be retried).
    pub async fn sync(&mut self, want: &Want, full: bool) -> (BTreeSet<String>, bool) {
        self.sync_with(want, full, &[]).await
    }

    /// `sync`, with the subnets of every network of the overlay: the first pass forgets the
    /// connections of any address in them that has no way out here now (containers removed
    /// while no agent ran), later passes those of the addresses that lost theirs.
    pub async fn sync_with(
        &mut self,
        want: &Want,
        full: bool,
        subnets: &[ipnet::Ipv4Net],
    ) -> (BTreeSet<String>, bool) {
        let mut failed = false;
        let routes: BTreeMap<Ipv4Addr, Route> = want.exits.iter().map(|(ip, e)| (*ip, e.route)).collect();
        for e in self.path.sync(&routes, full).await {
            warn!(error = format!("{e:#}"), "cannot set up the way back to containers with egress");
            failed = true;
        }
        if !routes.is_empty() && (full || !self.forwarding) {
            match self.forwarding_on().await {
                Ok(()) => self.forwarding = true,
                Err(e) => {
                    warn!(error = e, "cannot turn forwarding on for the replies' devices");
                    failed = true;
                }
            }
        }
        let published = self.not_the_hosts(&want.published, subnets);
        let rules =
            Ruleset { subnets: want.exits.values().map(|e| e.subnet).collect(), published, host: want.host };
        // A full pass writes the table again only if it is not as written (nft::intact): a
        // rewrite would zero the counters the rules keep.
        let rewrite = self.applied.as_ref() != Some(&rules) || (full && !nft::intact(&rules).await);
        let table_ok = if rewrite {
            match nft::apply(&rules).await {
                Ok(()) => {
                    if self.applied.as_ref().map(|a| &a.published) != Some(&rules.published) {
                        info!(published = rules.published.len(), "nftables table ip {} written", nft::TABLE);
                    }
                    self.applied = Some(rules);
                    true
                }
                Err(e) => {
                    warn!(
                        error = nft::describe(&e),
                        "cannot write the nftables table ip {} (is nft installed?)",
                        nft::TABLE
                    );
                    self.applied = None;
                    failed = true;
                    false
                }
            }
        } else {
            true
        };

        let now: BTreeSet<Ipv4Addr> = want.exits.keys().copied().collect();
        let sweep = match &self.known {
            None => {
                let (keep, subnets) = (now.clone(), subnets.to_vec());
                tokio::task::spawn_blocking(move || {
                    conntrack::forget_where(|ip| {
                        !keep.contains(&ip) && subnets.iter().any(|n| n.contains(&ip))
                    })
                })
                .await
            }
            Some(known) => {
                let lost: BTreeSet<Ipv4Addr> = known.difference(&now).copied().collect();
                tokio::task::spawn_blocking(move || conntrack::forget(&lost)).await
            }
        };
        match sweep {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(entries = n, "forgot the connections of containers that went"),
            Ok(Err(e)) => warn!(error = %e, "cannot remove the conntrack entries of containers that went"),
            Err(e) => warn!(error = %e, "conntrack cleanup task failed"),
        }
        self.known = Some(now);

        let mut ready: BTreeSet<String> = BTreeSet::new();
        let mut not_ready: BTreeSet<&str> = BTreeSet::new();
        for (ip, exit) in &want.exits {
            if table_ok && self.forwarding && self.path.ready(*ip) {
                ready.insert(exit.network_id.clone());
            } else {
                not_ready.insert(&exit.network_id);
            }
        }
        ready.retain(|id| !not_ready.contains(id.as_str()));
        (ready, failed)
    }

    /// `published` less the ports a server of the host holds (`listeners`): Docker's `-p` fails
    /// on those; a rule would take the port from the server. Each is warned about once, and
    /// published once the server lets go of it (each pass reads the sockets again, the
    /// periodic full pass at the latest).
    fn not_the_hosts(
        &mut self,
        published: &BTreeSet<Published>,
        subnets: &[ipnet::Ipv4Net],
    ) -> BTreeSet<Published> {
        if published.is_empty() {
            self.refused.clear();
            return BTreeSet::new();
        }
        let held = listeners::read();
        let ours = |ip: Ipv4Addr| subnets.iter().any(|n| n.contains(&ip));
        let (mut kept, mut refused) = (BTreeSet::new(), BTreeMap::new());
        for p in published {
            match listeners::conflict(&held, p.port.proto, p.port.host_ip, p.port.host_port, ours) {
                None => {
                    kept.insert(p.clone());
                }
                Some(l) => {
                    if !self.refused.contains_key(p) {
                        warn!(
                            container = p.container,
                            port = %p.port,
                            server = %l,
                            "not publishing the port: a server of this host listens on it"
                        );
                    }
                    refused.insert(p.clone(), l);
                }
            }
        }
        self.refused = refused;
        kept
    }

    /// The published ports the last pass left out (a server of the host holds them), by
    /// container: what the agent reports to the store (`store::PortsStatus`).
    pub fn withheld(&self) -> BTreeMap<String, Vec<WithheldPort>> {
        let mut by_container: BTreeMap<String, Vec<WithheldPort>> = BTreeMap::new();
        for (p, l) in &self.refused {
            by_container
                .entry(p.container.clone())
                .or_default()
                .push(WithheldPort { port: p.port.to_string(), server: l.to_string() });
        }
        by_container
    }

    /// Forwarding on the uplink and on the devices of the default routes: where the replies to
    /// what containers send out come in.
    async fn forwarding_on(&self) -> Result<(), String> {
        let mut devices = egress_path::default_route_devices(&self.nl).await.map_err(|e| format!("{e:#}"))?;
        devices.push(self.uplink.clone());
        devices.sort();
        devices.dedup();
        for d in devices {
            egress_path::forwarding_on(&d).map_err(|e| format!("{e:#}"))?;
        }
        Ok(())
    }
}

/// Removes the table, the routes and the rule. For `overlay-agent reset`.
pub async fn remove_all(nl: &Netlink) -> anyhow::Result<()> {
    use anyhow::Context as _;
    egress_path::remove_all(nl).await.context("removing the egress routes")?;
    nft::remove()
        .await
        .map_err(|e| anyhow::anyhow!(nft::describe(&e)))
        .with_context(|| format!("removing the nftables table ip {}", nft::TABLE))
}
