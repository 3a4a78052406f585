//! An endpoint's interface: a veth pair whose host side carries the from-container program and
//! whose other side is the container's `ethN`.
//!
//! The container side is created directly inside the container's namespace (never in the host's,
//! where it could collide with a host interface or be seen half-configured), then renamed,
//! addressed and brought up there. The host side is marked with the endpoint's id in its alias
//! as the very last step, so a veth without the mark is one whose setup was cut short.

use std::{net::Ipv4Addr, os::fd::AsRawFd, path::Path};

use rtnetlink::{
    LinkMessageBuilder, LinkUnspec, LinkVeth,
    packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute},
};

use super::{Error, Link, Netlink, io, netns, nl};

/// Host-side veth names start with this; the rest is a prefix of the endpoint id.
pub const HOST_PREFIX: &str = "ov";
/// The alias of a finished endpoint veth: `overlay:<endpoint id>/<container ifname>`.
const ALIAS_PREFIX: &str = "overlay:";

/// The host-side veth name of an endpoint (at most 15 bytes, as the kernel requires).
pub fn host_name(endpoint_id: &str) -> String {
    let short: String = endpoint_id.chars().take(12).collect();
    format!("{HOST_PREFIX}{short}")
}

/// The endpoint id a finished host-side veth belongs to.
pub fn endpoint_of(link: &Link) -> Option<&str> {
    if link.kind.as_deref() != Some("veth") || !link.name.starts_with(HOST_PREFIX) {
        return None;
    }
    let mark = link.alias.as_deref()?.strip_prefix(ALIAS_PREFIX)?;
    Some(mark.split_once('/').map_or(mark, |(id, _)| id))
}

/// The name of the container side of a finished endpoint veth.
pub fn container_ifname(link: &Link) -> Option<String> {
    let mark = link.alias.as_deref()?.strip_prefix(ALIAS_PREFIX)?;
    mark.split_once('/').map(|(_, ifname)| ifname.to_owned())
}

/// Whether a host link is one of ours at all (finished or not).
pub fn is_endpoint_veth(link: &Link) -> bool {
    link.kind.as_deref() == Some("veth")
        && link.name.starts_with(HOST_PREFIX)
        && link.name.len() == HOST_PREFIX.len() + 12
}

/// How an endpoint's interface should look.
#[derive(Clone, Debug)]
pub struct Spec<'a> {
    pub endpoint_id: &'a str,
    pub netns: &'a Path,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// Default route for the container, if it has none yet.
    pub gateway: Option<Ipv4Addr>,
    /// The interface's MTU: the uplink's where the container has a way out through its host
    /// (that traffic is not encapsulated), the overlay's where it has none.
    pub mtu: u32,
    /// The MTU of the route to the network's subnet: what the overlay carries once VXLAN's
    /// header is added. Sockets size their packets by the route, so overlay traffic fits the
    /// tunnel while traffic out through the host uses the interface's larger MTU, as a Docker
    /// container's does through docker_gwbridge.
    pub overlay_mtu: u32,
    /// The container side's name (a CNI runtime's `CNI_IFNAME`); the lowest free `ethN` when
    /// absent. A name the container already has is an error, as CNI wants.
    pub ifname: Option<&'a str>,
}

/// What was created.
#[derive(Clone, Debug)]
pub struct Created {
    pub host: Link,
    /// Name of the interface inside the container.
    pub ifname: String,
}

/// The name of an endpoint's container side while it is in the host's namespace: during
/// [`create`], and for a container whose runtime moves it in itself ([`create_handover`]).
pub fn handover_name(endpoint_id: &str) -> String {
    let short: String = endpoint_id.chars().take(12).collect();
    format!("ovt{short}")
}

/// Creates an endpoint's veth pair for a runtime that moves the container side into its
/// container itself (Docker: Join answers the interface's name, and Docker moves it into the
/// sandbox, renames it `ethN` and gives it its address and routes). Both sides are made in the
/// host's namespace; the container side, named [`handover_name`], gets the endpoint's MAC and
/// MTU and is left down. The host side is marked last, as in [`create`]. On failure nothing is
/// left behind.
pub async fn create_handover(
    host: &Netlink,
    endpoint_id: &str,
    mac: [u8; 6],
    mtu: u32,
) -> Result<Created, Error> {
    let name = host_name(endpoint_id);
    let peer_name = handover_name(endpoint_id);
    // Leftovers of an interrupted setup: either side alone takes the other with it.
    for stale in [&name, &peer_name] {
        if let Some(link) = host.link(stale).await? {
            host.delete_link(link.index).await?;
        }
    }
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer_name.clone())
        .mtu(mtu)
        .address(mac.to_vec())
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(name.clone())
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.handle().link().add(msg).execute().await.map_err(nl(format!("creating veth {name}")))?;
    let finish = async {
        let link = host.require_link(&name).await?;
        netns::sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1").map_err(io("disabling IPv6"))?;
        mark_up(host, &link, endpoint_id, &peer_name).await?;
        Ok(Created { host: host.require_link(&name).await?, ifname: peer_name.clone() })
    };
    undo_on_error(host, &name, finish.await).await
}

/// Passes `result` on; on an error, first removes the pair whose host side is `name` (the
/// other side goes with it), so a setup cut short leaves nothing behind.
async fn undo_on_error(host: &Netlink, name: &str, result: Result<Created, Error>) -> Result<Created, Error> {
    if result.is_err()
        && let Ok(Some(link)) = host.link(name).await
    {
        let _ = host.delete_link(link.index).await;
    }
    result
}

/// Brings the host side up and marks it as the finished interface of `endpoint_id`, whose
/// container side is `ifname`.
async fn mark_up(host: &Netlink, link: &Link, endpoint_id: &str, ifname: &str) -> Result<(), Error> {
    host.set_link(
        LinkUnspec::new_with_index(link.index)
            .up()
            .append_extra_attribute(LinkAttribute::IfAlias(format!("{ALIAS_PREFIX}{endpoint_id}/{ifname}")))
            .build(),
        "bringing up the host side",
    )
    .await
}

/// Creates and configures an endpoint's veth pair. On failure nothing is left behind.
pub async fn create(host: &Netlink, spec: &Spec<'_>) -> Result<Created, Error> {
    let name = host_name(spec.endpoint_id);
    // A leftover of an interrupted setup has our name but not our mark: start again.
    if let Some(stale) = host.link(&name).await? {
        host.delete_link(stale.index).await?;
    }
    let ns = netns::open(spec.netns).map_err(io("opening container namespace"))?;
    // Temporary name of the container side until it gets its ethN (15 bytes at most).
    let tmp = handover_name(spec.endpoint_id);
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(tmp.clone())
        .mtu(spec.mtu)
        .address(spec.mac.to_vec())
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(name.clone())
        .mtu(spec.mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.handle().link().add(msg).execute().await.map_err(nl(format!("creating veth {name}")))?;

    undo_on_error(host, &name, configure(host, spec, &name, &tmp).await).await
}

async fn configure(host: &Netlink, spec: &Spec<'_>, name: &str, tmp: &str) -> Result<Created, Error> {
    let container = Netlink::in_namespace(spec.netns).await?;
    let peer = container.require_link(tmp).await?;
    let ifname = match spec.ifname {
        Some(name) => {
            if container.link(name).await?.is_some() {
                return Err(Error::Io {
                    context: format!("naming the container interface {name}"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the container already has an interface of that name",
                    ),
                });
            }
            name.to_owned()
        }
        None => free_ifname(&container).await?,
    };
    container
        .set_link(
            LinkUnspec::new_with_index(peer.index).name(ifname.clone()).build(),
            "renaming container interface",
        )
        .await?;
    // No IPv6 on the overlay: the datapath carries IPv4 and would only count router
    // solicitations and MLD reports as drops.
    in_namespace(spec.netns, &format!("net/ipv6/conf/{ifname}/disable_ipv6"), "1").await?;
    container.set_up(peer.index, "bringing up the container interface").await?;
    container.add_address(peer.index, spec.ip, spec.prefix_len, spec.overlay_mtu).await?;
    if let Some(lo) = container.link("lo").await? {
        container.set_up(lo.index, "bringing up lo").await?;
    }
    if let Some(gateway) = spec.gateway {
        container.add_default_route(gateway, peer.index).await?;
    }

    let link = host.require_link(name).await?;
    netns::sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1").map_err(io("disabling IPv6"))?;
    mark_up(host, &link, spec.endpoint_id, &ifname).await?;
    let host_link = host.require_link(name).await?;
    Ok(Created { host: host_link, ifname })
}

/// The lowest `ethN` not taken in the container.
async fn free_ifname(container: &Netlink) -> Result<String, Error> {
    let names: Vec<String> = container.links().await?.into_iter().map(|l| l.name).collect();
    // Among names.len() + 1 candidates one is always free.
    Ok((0..=names.len())
        .map(|n| format!("eth{n}"))
        .find(|candidate| !names.contains(candidate))
        .expect("one of len + 1 names is free"))
}

/// Writes a sysctl inside the namespace at `netns`, from a thread that visits it.
async fn in_namespace(netns: &Path, key: &str, value: &str) -> Result<(), Error> {
    let (path, key, value) = (netns.to_owned(), key.to_owned(), value.to_owned());
    let context = format!("sysctl {key}");
    tokio::task::spawn_blocking(move || {
        let _guard = netns::NetnsGuard::enter_path(&path)?;
        netns::sysctl(&key, &value)
    })
    .await
    .map_err(|e| Error::Io { context: context.clone(), source: std::io::Error::other(e) })?
    .map_err(io(context))
}
