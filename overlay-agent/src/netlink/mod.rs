//! Kernel plumbing over rtnetlink: links, addresses and routes, in the host's namespace or in a
//! container's. A `Netlink` handle is bound to the namespace its socket was opened in, so every
//! request it makes lands there, whatever thread the agent runs it from.

pub mod egress_path;
pub mod ethtool;
pub mod events;
pub mod netns;
pub mod resolver_path;
pub mod veth;

use std::{net::Ipv4Addr, path::Path};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        link::{LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
        route::{RouteAttribute, RouteMetric, RouteScope},
    },
};

use self::netns::NetnsGuard;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no interface {0}")]
    NoSuchLink(String),
}

impl Error {
    /// The errno of a failed netlink request, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Netlink { source: rtnetlink::Error::NetlinkError(m), .. } => m.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

pub(crate) fn nl(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let context = context.into();
    move |source| Error::Netlink { context, source }
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// XDP attachment of a link, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    None,
    Native,
    Generic,
    Other,
}

/// What the agent needs to know about an interface.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub kind: Option<String>,
    pub alias: Option<String>,
    pub up: bool,
    pub xdp: XdpMode,
}

impl Link {
    fn from_message(msg: LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: [0; 6],
            mtu: 0,
            kind: None,
            alias: None,
            up: msg.header.flags.contains(rtnetlink::packet_route::link::LinkFlags::Up),
            xdp: XdpMode::None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Address(a) if a.len() == 6 => link.mac.copy_from_slice(&a),
                LinkAttribute::Mtu(m) => link.mtu = m,
                LinkAttribute::IfAlias(a) => link.alias = Some(a),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.to_string());
                        }
                    }
                }
                LinkAttribute::Xdp(xdp) => {
                    for x in xdp {
                        if let LinkXdp::Attached(a) = x {
                            link.xdp = match a {
                                XdpAttached::None => XdpMode::None,
                                XdpAttached::Driver => XdpMode::Native,
                                XdpAttached::SocketBuffer => XdpMode::Generic,
                                _ => XdpMode::Other,
                            };
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// A netlink handle bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A handle on the namespace the calling thread is in.
    pub fn current() -> Result<Self, Error> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(io("opening netlink"))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// A handle on the namespace at `path`: the socket is opened by a thread that enters the
    /// namespace for just that, so the agent's own threads never leave the host's namespace.
    pub async fn in_namespace(path: &Path) -> Result<Self, Error> {
        let target = path.to_owned();
        let context = format!("opening netlink in {}", path.display());
        let (conn, handle) = tokio::task::spawn_blocking(move || {
            let _guard = NetnsGuard::enter_path(&target)?;
            let (conn, handle, _) = rtnetlink::new_connection()?;
            Ok::<_, std::io::Error>((conn, handle))
        })
        .await
        .map_err(|e| Error::Io { context: context.clone(), source: std::io::Error::other(e) })?
        .map_err(io(context))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>, Error> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(msg) => Ok(msg.map(Link::from_message)),
            Err(e) => {
                let err = Error::Netlink { context: format!("looking up {name}"), source: e };
                if err.errno() == Some(libc::ENODEV) { Ok(None) } else { Err(err) }
            }
        }
    }

    /// The interface with this index, if there is one.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, Error> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(msg) => Ok(msg.map(Link::from_message)),
            Err(e) => {
                let err = Error::Netlink { context: format!("looking up interface {index}"), source: e };
                if err.errno() == Some(libc::ENODEV) { Ok(None) } else { Err(err) }
            }
        }
    }

    pub async fn require_link(&self, name: &str) -> Result<Link, Error> {
        self.link(name).await?.ok_or_else(|| Error::NoSuchLink(name.into()))
    }

    pub async fn links(&self) -> Result<Vec<Link>, Error> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(Link::from_message)
            .try_collect()
            .await
            .map_err(nl("listing links"))
    }

    pub async fn set_link(&self, msg: LinkMessage, what: &str) -> Result<(), Error> {
        self.handle.link().set(msg).execute().await.map_err(nl(what))
    }

    pub async fn set_up(&self, index: u32, what: &str) -> Result<(), Error> {
        self.set_link(LinkUnspec::new_with_index(index).up().build(), what).await
    }

    pub async fn delete_link(&self, index: u32) -> Result<(), Error> {
        match self.handle.link().del(index).execute().await.map_err(nl(format!("deleting link {index}"))) {
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
            other => other,
        }
    }

    /// Adds `ip/prefix` on `index`, with the route to its subnet at `route_mtu` instead of the
    /// kernel's own prefix route, which cannot carry an MTU: the address goes in without one
    /// (IFA_F_NOPREFIXROUTE) and the route is added as the kernel would add it (scope link,
    /// source `ip`), plus the MTU. The link must be up, or the kernel refuses the route.
    pub async fn add_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
        route_mtu: u32,
    ) -> Result<(), Error> {
        let mut add = self.handle.address().add(index, ip.into(), prefix);
        add.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
        match add.execute().await.map_err(nl(format!("adding {ip}/{prefix}"))) {
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            other => other?,
        }
        let subnet = Ipv4Net::new(ip, prefix).map_err(|e| Error::Io {
            context: format!("the subnet of {ip}/{prefix}"),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(subnet.network(), prefix)
            .output_interface(index)
            .scope(RouteScope::Link)
            .pref_source(ip)
            .build();
        route.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(route_mtu)]));
        let what = format!("adding the route to {}/{prefix} (mtu {route_mtu})", subnet.network());
        match self.append_route(route).await.map_err(nl(what)) {
            // This very route (device, source, MTU): an endpoint set up again.
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Adds `route` as the kernel adds an address's own prefix route: beside any route to the
    /// same prefix already there (`NLM_F_APPEND`), as in a namespace where another runtime's
    /// interface routes the same subnet. `ip route add` (and rtnetlink's `add`) ask for
    /// `NLM_F_EXCL` instead and fail there; only a route identical to this one is EEXIST.
    async fn append_route(
        &self,
        route: rtnetlink::packet_route::route::RouteMessage,
    ) -> Result<(), rtnetlink::Error> {
        use futures::StreamExt as _;
        use rtnetlink::{
            packet_core::{
                NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
            },
            packet_route::RouteNetlinkMessage,
        };
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewRoute(route));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        let mut responses = self.handle.clone().request(req)?;
        while let Some(message) = responses.next().await {
            // An error message without a code is the kernel's acknowledgement.
            if let NetlinkPayload::Error(e) = message.payload
                && e.code.is_some()
            {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
        Ok(())
    }

    /// Adds a default route via `gateway` on `index`, unless the namespace already has one.
    pub async fn add_default_route(&self, gateway: Ipv4Addr, index: u32) -> Result<(), Error> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).output_interface(index).build();
        match self
            .handle
            .route()
            .add(route)
            .execute()
            .await
            .map_err(nl(format!("adding default route via {gateway}")))
        {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }
}
