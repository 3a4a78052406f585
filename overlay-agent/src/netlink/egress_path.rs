//! The routes between the host's stack and the containers that have a way out through it
//! (docs/egress.md).
//!
//! The from-container program hands a container's packets for the outside up the host's stack
//! (`NETWORK_EGRESS`), which forwards them and masquerades them (`egress::nft`). What comes
//! back, once conntrack has turned the destination back into the container's address, and what
//! a published port forwards, must find the container: [`TABLE`] holds one `/32` route per such
//! container through its veth (and a permanent neighbour entry: the program answers ARP for
//! containers and never lets one answer ARP itself), and the rule `lookup` [`TABLE`] at
//! [`RULE_PRIORITY`] consults it before the main table. The table has no default, so a lookup
//! for any other address falls through to the host's own rules: nothing here matches traffic
//! that is not to one of these containers. The same route makes the reverse path filter
//! (strict on many hosts) accept what the container sends on its veth.
//!
//! Forwarding is turned on per device, not for the whole host: on each such veth (the
//! containers' packets come in there) and on the devices of the host's default routes (the
//! replies come in there), as `net.ipv4.conf.<dev>.forwarding`.
//!
//! Containers of `--internal` networks get none of this: no route here, so nothing from outside
//! reaches them through the host, and the program drops what they send out (`no_egress`).

use std::{collections::BTreeMap, net::Ipv4Addr};

use futures::TryStreamExt as _;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        neighbour::NeighbourState,
        route::{RouteAttribute, RouteScope},
        rule::RuleAction,
    },
};

use super::{
    Error, Netlink, nl,
    resolver_path::{Route, flush_table, rules_of},
};

/// The interface group of the host side of every veth with a way out: what the NAT table's
/// rules match (`iifgroup`, `oifgroup`), so they match no packet that is not a container's.
pub const GROUP: u32 = 4789;

/// The routing table of the way back to containers with egress, and the priority of its rule
/// (just after the resolver's, 4789).
pub const TABLE: u32 = 4790;
pub const RULE_PRIORITY: u32 = 4790;

/// What this agent set up, so a pass only touches what changed.
pub struct EgressPath {
    nl: Netlink,
    routes: BTreeMap<Ipv4Addr, Route>,
    /// Whether the rule is there (while any route is) and what was read back, if anything.
    has_rule: Option<bool>,
}

impl EgressPath {
    pub fn new(nl: Netlink) -> Self {
        Self { nl, routes: BTreeMap::new(), has_rule: None }
    }

    /// Brings the table to `routes` (address -> veth) and the rule to "there while any route
    /// is". `full` reads the rule back (after a restart, or if someone removed it) and puts
    /// every route again. Returns what failed; what succeeded stays done.
    pub async fn sync(&mut self, routes: &BTreeMap<Ipv4Addr, Route>, full: bool) -> Vec<Error> {
        let mut errors = Vec::new();
        if full || self.has_rule.is_none() {
            match has_rule(&self.nl).await {
                Ok(present) => self.has_rule = Some(present),
                Err(e) => {
                    errors.push(e);
                    return errors;
                }
            }
            self.routes.clear();
        }
        // Routes go with their veth when it is deleted; those of a veth still there are
        // removed here (a container disconnected, its network made internal).
        let gone: Vec<Ipv4Addr> = self.routes.keys().filter(|ip| !routes.contains_key(ip)).copied().collect();
        for ip in gone {
            match self.remove_route(ip).await {
                Ok(()) => {
                    self.routes.remove(&ip);
                }
                Err(e) => errors.push(e),
            }
        }
        if full && routes.is_empty() {
            // A predecessor's leftovers, which the map above never knew.
            if let Err(e) = flush_table(&self.nl, TABLE).await {
                errors.push(e);
            }
        }
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
        let want_rule = !routes.is_empty();
        if self.has_rule != Some(want_rule) {
            let result = if want_rule { add_rule(&self.nl).await } else { remove_rule(&self.nl).await };
            match result {
                Ok(()) => self.has_rule = Some(want_rule),
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Whether every route asked for is in place (with the rule): the networks of those
    /// containers may then send out.
    pub fn ready(&self, ip: Ipv4Addr) -> bool {
        self.has_rule == Some(true) && self.routes.contains_key(&ip)
    }

    async fn put_route(&self, ip: Ipv4Addr, route: Route) -> Result<(), Error> {
        veth_conf(&self.nl, route.ifindex).await?;
        self.nl
            .set_link(
                rtnetlink::LinkUnspec::new_with_index(route.ifindex)
                    .append_extra_attribute(rtnetlink::packet_route::link::LinkAttribute::Group(GROUP))
                    .build(),
                "putting the veth in the egress group",
            )
            .await?;
        self.nl
            .handle()
            .neighbours()
            .add(route.ifindex, ip.into())
            .link_local_address(&route.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding the neighbour {ip}")))?;
        self.nl
            .handle()
            .route()
            .add(route_msg(ip, Some(route.ifindex)))
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding the route to {ip} in table {TABLE}")))
    }

    async fn remove_route(&self, ip: Ipv4Addr) -> Result<(), Error> {
        match self
            .nl
            .handle()
            .route()
            .del(route_msg(ip, None))
            .execute()
            .await
            .map_err(nl(format!("removing the route to {ip} from table {TABLE}")))
        {
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }
}

fn route_msg(ip: Ipv4Addr, ifindex: Option<u32>) -> rtnetlink::packet_route::route::RouteMessage {
    let b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .scope(RouteScope::Link)
        .table_id(TABLE);
    match ifindex {
        Some(i) => b.output_interface(i).build(),
        None => b.build(),
    }
}

async fn has_rule(host: &Netlink) -> Result<bool, Error> {
    Ok(!rules_of(host, TABLE).await?.is_empty())
}

async fn add_rule(host: &Netlink) -> Result<(), Error> {
    let add = host
        .handle()
        .rule()
        .add()
        .v4()
        // Spelled out: a rule without an action makes the kernel fail every lookup it matches.
        .action(RuleAction::ToTable)
        .table_id(TABLE)
        .priority(RULE_PRIORITY)
        .execute()
        .await;
    match add.map_err(nl(format!("adding the rule lookup {TABLE}"))) {
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

async fn remove_rule(host: &Netlink) -> Result<(), Error> {
    for msg in rules_of(host, TABLE).await? {
        match host.handle().rule().del(msg).execute().await.map_err(nl("removing a rule")) {
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Removes the rule and the table. For `overlay-agent reset`.
pub async fn remove_all(host: &Netlink) -> Result<(), Error> {
    remove_rule(host).await?;
    flush_table(host, TABLE).await
}

/// What the host side of a container's veth with a way out needs (by index), in the agent's
/// namespace: forwarding (below), and `route_localnet`, for the host's own processes calling a
/// port published on 127.0.0.1: translated in `output`, such a call leaves by this veth still
/// from 127.0.0.1 (postrouting makes it the host's) and its answer comes back in by it to
/// 127.0.0.1, both of which the kernel refuses as martian on a device without it. The
/// container cannot use it to reach the host's loopback: the datapath drops what it sends to
/// 127.0.0.0/8, and whatever it sends from an address not its own.
async fn veth_conf(host: &Netlink, ifindex: u32) -> Result<(), Error> {
    let name = host
        .link_by_index(ifindex)
        .await?
        .ok_or_else(|| Error::NoSuchLink(format!("with index {ifindex}")))?
        .name;
    forwarding_on(&name)?;
    conf_on(&name, "route_localnet")
}

/// Turns IPv4 forwarding on for device `name`: `net.ipv4.conf.<name>.forwarding`, which is what
/// lets the kernel forward what comes in on it (the input device decides).
pub fn forwarding_on(name: &str) -> Result<(), Error> {
    conf_on(name, "forwarding")
}

/// Sets `net.ipv4.conf.<name>.<key>` to 1.
fn conf_on(name: &str, key: &str) -> Result<(), Error> {
    let path = format!("/proc/sys/net/ipv4/conf/{name}/{key}");
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => return Ok(()),
        _ => {}
    }
    std::fs::write(&path, "1")
        .map_err(|source| Error::Io { context: format!("turning {key} on for {name} ({path})"), source })
}

/// The devices of the main table's default routes: where replies to masqueraded packets come
/// in, so where forwarding must be on.
pub async fn default_route_devices(host: &Netlink) -> Result<Vec<String>, Error> {
    let mut routes = host.handle().route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    let mut indexes = Vec::new();
    while let Some(msg) = routes.try_next().await.map_err(nl("listing routes"))? {
        if msg.header.destination_prefix_length != 0 || u32::from(msg.header.table) != 254 {
            continue;
        }
        for a in &msg.attributes {
            if let RouteAttribute::Oif(i) = a {
                indexes.push(*i);
            }
        }
    }
    let mut names = Vec::new();
    for i in indexes {
        if let Some(link) = host.link_by_index(i).await? {
            names.push(link.name);
        }
    }
    Ok(names)
}
