//! The path between containers and the agent's resolver, in the host's namespace
//! (docs/names.md, "The agent's resolver").
//!
//! Containers ask their network's gateway address. The from-container program answers what the
//! `NAMES` map holds and hands the rest up the host's stack, which delivers it to the resolver's
//! sockets because each served gateway is a local address here: a `/32` on the loopback device,
//! labelled [`LABEL`] so the agent knows its own, as anycast service addresses are kept. (Not a
//! device of our own: a dummy needs a driver some kernels leave out, and a bridge or a veth kept
//! only to hold addresses would be one more interface on the host that forwards nothing.) The
//! resolver's answers must go back down the container's own veth, and nowhere else: the rule
//! `from <gateway> lookup` [`TABLE`] sends everything from a gateway address to a table of our
//! own, which holds one `/32` route per local endpoint through its veth (with a permanent
//! neighbour entry, since the program answers ARP for containers and never lets one answer ARP
//! itself) and an `unreachable` default, so an answer with no container to go to fails here
//! instead of leaving by the host's default route. The same rule makes the reverse path
//! filter's check of a query (`rp_filter`, strict on many hosts) find the veth it came in by.
//!
//! Nothing here matches traffic that is not ours: the rule only selects packets from the
//! gateways, which are addresses of the overlay's own networks.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use futures::TryStreamExt as _;
use rtnetlink::{
    IpVersion, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        neighbour::NeighbourState,
        route::{RouteAttribute, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute},
    },
};

use super::{Error, Netlink, nl};

/// The device that holds the served gateway addresses, and the label that marks them ours.
const DEVICE: &str = "lo";
pub const LABEL: &str = "lo:ovdns";
/// The routing table of the resolver's answers, and the priority of the rules that select it.
pub const TABLE: u32 = 4789;
const RULE_PRIORITY: u32 = 4789;

/// Where answers to one local endpoint go: its address, its host-side veth, its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// What this agent set up, so a pass only touches what changed.
pub struct ResolverPath {
    nl: Netlink,
    device: Option<u32>,
    gateways: BTreeSet<Ipv4Addr>,
    /// Gateways found with only their address or only their rule: finished if wanted,
    /// removed if not.
    halves: BTreeSet<Ipv4Addr>,
    routes: BTreeMap<Ipv4Addr, Route>,
    /// Whether the table's `unreachable default` is there: while any gateway is served.
    has_default: bool,
}

impl ResolverPath {
    pub fn new(nl: Netlink) -> Self {
        Self {
            nl,
            device: None,
            gateways: BTreeSet::new(),
            halves: BTreeSet::new(),
            routes: BTreeMap::new(),
            has_default: false,
        }
    }

    /// The gateways the resolver is reachable on now.
    pub fn served(&self) -> &BTreeSet<Ipv4Addr> {
        &self.gateways
    }

    /// Brings the served gateways to `want` and the answer routes to `routes`. `full` reads back
    /// what the kernel holds (after a restart, or if someone removed it by hand) instead of
    /// trusting what this agent last did. Returns what failed; what succeeded stays done.
    pub async fn sync(
        &mut self,
        want: &BTreeSet<Ipv4Addr>,
        routes: &BTreeMap<Ipv4Addr, Route>,
        full: bool,
    ) -> Vec<Error> {
        let mut errors = Vec::new();
        if want.is_empty() && !full && self.device.is_none() {
            return errors;
        }
        if full || self.device.is_none() {
            match self.read_back().await {
                Ok(()) => {}
                Err(e) => {
                    errors.push(e);
                    return errors;
                }
            }
        }
        let Some(index) = self.device else { return errors };
        for gw in std::mem::take(&mut self.halves) {
            if !want.contains(&gw)
                && let Err(e) = self.remove_gateway(index, gw).await
            {
                self.halves.insert(gw);
                errors.push(e);
            }
        }
        for gw in want.difference(&self.gateways.clone()) {
            match self.add_gateway(index, *gw).await {
                Ok(()) => {
                    self.gateways.insert(*gw);
                }
                Err(e) => errors.push(e),
            }
        }
        for gw in self.gateways.clone().difference(want) {
            match self.remove_gateway(index, *gw).await {
                Ok(()) => {
                    self.gateways.remove(gw);
                }
                Err(e) => errors.push(e),
            }
        }
        // The table's default is there while a gateway is: a host without containers keeps
        // nothing of the resolver's (a full pass also removes a predecessor's leftover).
        let want_default = !self.gateways.is_empty();
        if full || want_default != self.has_default {
            match self.set_default(want_default).await {
                Ok(()) => self.has_default = want_default,
                Err(e) => errors.push(e),
            }
        }
        // Routes go with their veth when it is deleted; one that moved to another veth (made
        // again) is replaced.
        self.routes.retain(|ip, _| routes.contains_key(ip));
        for (ip, route) in routes {
            if self.routes.get(ip) == Some(route) {
                continue;
            }
            match self.put_route(*ip, *route).await {
                Ok(()) => {
                    self.routes.insert(*ip, *route);
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Learns which gateways and rules exist. Routes are put again on the next sync (replacing is harmless).
    async fn read_back(&mut self) -> Result<(), Error> {
        let index = self.nl.require_link(DEVICE).await?.index;
        let addresses = device_addresses(&self.nl, index).await?;
        let ruled = rule_sources(&self.nl).await?;
        // A gateway counts as served only with both its address and its rule.
        self.gateways = addresses.intersection(&ruled).copied().collect();
        self.halves = addresses.symmetric_difference(&ruled).copied().collect();
        self.device = Some(index);
        self.routes.clear();
        Ok(())
    }

    /// Puts (or removes) the table's `unreachable default`.
    async fn set_default(&self, present: bool) -> Result<(), Error> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().table_id(TABLE).kind(RouteType::Unreachable).build();
        let routes = self.nl.handle().route();
        if present {
            routes
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("adding the unreachable default of table {TABLE}")))
        } else {
            match routes
                .del(msg)
                .execute()
                .await
                .map_err(nl(format!("removing the default of table {TABLE}")))
            {
                Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
                other => other,
            }
        }
    }

    async fn add_gateway(&self, index: u32, gw: Ipv4Addr) -> Result<(), Error> {
        let mut add = self.nl.handle().address().add(index, gw.into(), 32);
        add.message_mut().attributes.push(AddressAttribute::Label(LABEL.to_owned()));
        match add.execute().await.map_err(nl(format!("adding {gw}/32 to {DEVICE}"))) {
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            other => other?,
        }
        let add = self
            .nl
            .handle()
            .rule()
            .add()
            .v4()
            .source_prefix(gw, 32)
            // Spelled out: a rule without an action makes the kernel fail every lookup it
            // matches (EINVAL).
            .action(RuleAction::ToTable)
            .table_id(TABLE)
            .priority(RULE_PRIORITY)
            .execute()
            .await;
        match add.map_err(nl(format!("adding the rule from {gw} lookup {TABLE}"))) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    async fn remove_gateway(&self, index: u32, gw: Ipv4Addr) -> Result<(), Error> {
        remove_rules(&self.nl, Some(gw)).await?;
        let mut found = self.nl.handle().address().get().set_link_index_filter(index).execute();
        while let Some(msg) = found.try_next().await.map_err(nl(format!("listing {DEVICE}'s addresses")))? {
            if address_of(&msg) == Some(gw) && is_ours(&msg) {
                match self
                    .nl
                    .handle()
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(nl(format!("removing {gw}")))
                {
                    Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => {}
                    other => other?,
                }
            }
        }
        Ok(())
    }

    async fn put_route(&self, ip: Ipv4Addr, route: Route) -> Result<(), Error> {
        self.nl
            .handle()
            .neighbours()
            .add(route.ifindex, IpAddr::V4(ip))
            .link_local_address(&route.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding the neighbour {ip}")))?;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(route.ifindex)
            .scope(RouteScope::Link)
            .table_id(TABLE)
            .build();
        self.nl
            .handle()
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding the route to {ip} in table {TABLE}")))
    }
}

/// Removes everything of the resolver's path from the host's namespace: the gateway addresses,
/// the rules, the table. For `overlay-agent reset`.
pub async fn remove_all(host: &Netlink) -> Result<(), Error> {
    remove_rules(host, None).await?;
    let lo = host.require_link(DEVICE).await?.index;
    let addresses: Vec<_> = host
        .handle()
        .address()
        .get()
        .set_link_index_filter(lo)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing {DEVICE}'s addresses")))?;
    for msg in addresses.into_iter().filter(is_ours) {
        match host.handle().address().del(msg).execute().await.map_err(nl("removing a resolver address")) {
            Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => {}
            other => other?,
        }
    }
    flush_table(host, TABLE).await
}

/// Removes every route of routing table `table` (the resolver's, egress_path's).
pub(super) async fn flush_table(host: &Netlink, table: u32) -> Result<(), Error> {
    let mut routes =
        host.handle().route().get(RouteMessageBuilder::<Ipv4Addr>::new().table_id(table).build()).execute();
    let mut ours = Vec::new();
    while let Some(msg) = routes.try_next().await.map_err(nl("listing routes"))? {
        if table_of(&msg) == table {
            ours.push(msg);
        }
    }
    for msg in ours {
        match host
            .handle()
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(nl(format!("removing a route of table {table}")))
        {
            Err(e) if e.errno() == Some(libc::ESRCH) => {}
            other => other?,
        }
    }
    Ok(())
}

fn table_of(msg: &rtnetlink::packet_route::route::RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or_else(|| u32::from(msg.header.table))
}

fn address_of(msg: &rtnetlink::packet_route::address::AddressMessage) -> Option<Ipv4Addr> {
    msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    })
}

/// Whether an address carries our label (the gateways; the loopback's own addresses do not).
fn is_ours(msg: &rtnetlink::packet_route::address::AddressMessage) -> bool {
    msg.attributes.iter().any(|a| matches!(a, AddressAttribute::Label(l) if l == LABEL))
}

async fn device_addresses(host: &Netlink, index: u32) -> Result<BTreeSet<Ipv4Addr>, Error> {
    host.handle()
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_filter_map(|msg| async move { Ok(if is_ours(&msg) { address_of(&msg) } else { None }) })
        .try_collect()
        .await
        .map_err(nl(format!("listing {DEVICE}'s addresses")))
}

/// The rules that select routing table `table` (the resolver's, egress_path's).
pub(super) async fn rules_of(
    host: &Netlink,
    table: u32,
) -> Result<Vec<rtnetlink::packet_route::rule::RuleMessage>, Error> {
    let rules: Vec<_> =
        host.handle().rule().get(IpVersion::V4).execute().try_collect().await.map_err(nl("listing rules"))?;
    Ok(rules
        .into_iter()
        .filter(|r| {
            r.attributes.iter().any(|a| matches!(a, RuleAttribute::Table(t) if *t == table))
                || u32::from(r.header.table) == table
        })
        .collect())
}

/// The rules selecting our table, by the source they match.
async fn our_rules(
    host: &Netlink,
) -> Result<Vec<(Option<Ipv4Addr>, rtnetlink::packet_route::rule::RuleMessage)>, Error> {
    Ok(rules_of(host, TABLE)
        .await?
        .into_iter()
        .map(|r| {
            let source = r.attributes.iter().find_map(|a| match a {
                RuleAttribute::Source(IpAddr::V4(ip)) => Some(ip.to_owned()),
                _ => None,
            });
            (source, r)
        })
        .collect())
}

async fn rule_sources(host: &Netlink) -> Result<BTreeSet<Ipv4Addr>, Error> {
    Ok(our_rules(host).await?.into_iter().filter_map(|(source, _)| source).collect())
}

/// Removes the rules selecting our table: those from `gw`, or all of them.
async fn remove_rules(host: &Netlink, gw: Option<Ipv4Addr>) -> Result<(), Error> {
    for (source, msg) in our_rules(host).await? {
        if gw.is_none() || source == gw {
            match host.handle().rule().del(msg).execute().await.map_err(nl("removing a rule")) {
                Err(e) if e.errno() == Some(libc::ENOENT) => {}
                other => other?,
            }
        }
    }
    Ok(())
}
