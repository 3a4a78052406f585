//! Link events from the kernel: which endpoint veths vanished from the agent's namespace, as
//! they vanish. A veth deleted by hand (or with the namespace of its container side) is then
//! made again within a pass, instead of at the next periodic resync.
//!
//! The subscription is a netlink socket bound to the multicast group RTNLGRP_LINK in the
//! namespace it is opened in: the agent's, where the host sides of the veths live. Deleting
//! either side of a veth deletes the pair, so the host side's RTM_DELLINK covers both.

use std::{collections::BTreeSet, time::Duration};

use futures::StreamExt as _;
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::RouteNetlinkMessage,
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Error, Link, io, veth};

/// The multicast group of link changes (RTNLGRP_LINK), as a bind mask.
const GROUP_LINK: u32 = 1 << (libc::RTNLGRP_LINK - 1);

/// What a burst of link events says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Vanished {
    /// Endpoints whose host-side veth was deleted.
    pub endpoints: BTreeSet<String>,
    /// The kernel dropped events (the socket's buffer overflowed): what vanished is unknown,
    /// so everything has to be looked at.
    pub lost: bool,
}

impl Vanished {
    fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && !self.lost
    }

    /// Takes in one message; false if it says nothing about endpoints.
    fn add(&mut self, payload: NetlinkPayload<RouteNetlinkMessage>) -> bool {
        match payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(msg)) => {
                // The kernel sends the whole link with its deletion, alias included: the alias
                // names the endpoint (the interface name holds only a prefix of its id).
                let link = Link::from_message(msg);
                let Some(id) = veth::endpoint_of(&link) else { return false };
                debug!(veth = %link.name, endpoint = id, "endpoint veth deleted");
                self.endpoints.insert(id.to_owned());
                true
            }
            NetlinkPayload::Overrun(_) => {
                self.lost = true;
                true
            }
            _ => false,
        }
    }
}

/// Subscribes to link events in the calling thread's namespace. Each burst of deletions of
/// endpoint veths (whatever arrives within `debounce` of the first) comes out of the channel
/// as one `Vanished`, so that a namespace taking several veths with it costs one pass.
pub fn subscribe(debounce: Duration) -> Result<mpsc::Receiver<Vanished>, Error> {
    let (mut conn, handle, mut messages) = rtnetlink::new_connection().map_err(io("opening netlink"))?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, GROUP_LINK))
        .map_err(io("subscribing to link events"))?;
    tokio::spawn(conn);
    // Small: a full channel only holds the task back, and each batch is merged into one pass.
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        // Keeps the connection open for as long as this task runs.
        let _handle = handle;
        loop {
            let mut batch = Vanished::default();
            // Wait for the first event that matters, then take in whatever follows shortly.
            loop {
                let Some((msg, _)) = messages.next().await else {
                    warn!("link events stopped; vanished veths are repaired by the periodic resync");
                    return;
                };
                if batch.add(msg.payload) {
                    break;
                }
            }
            let until = tokio::time::sleep(debounce);
            tokio::pin!(until);
            loop {
                tokio::select! {
                    msg = messages.next() => match msg {
                        Some((msg, _)) => { batch.add(msg.payload); }
                        None => break,
                    },
                    () = &mut until => break,
                }
            }
            if !batch.is_empty() && tx.send(batch).await.is_err() {
                // The agent is stopping.
                return;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};

    use super::*;

    fn link(name: &str, alias: Option<&str>) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]));
        if let Some(alias) = alias {
            msg.attributes.push(LinkAttribute::IfAlias(alias.to_owned()));
        }
        msg
    }

    #[test]
    fn deleted_endpoint_veths_are_named_by_their_alias() {
        let mut v = Vanished::default();
        let ours = link("ov0123456789ab", Some("overlay:0123456789abcdef/eth0"));
        assert!(v.add(NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(ours.clone()))));
        // A new or changed link, another interface, and a veth whose setup never finished
        // (no mark) say nothing.
        assert!(!v.add(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(ours))));
        let other = link("eth1", None);
        assert!(!v.add(NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(other))));
        let unfinished = link("ov0123456789ff", None);
        assert!(!v.add(NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(unfinished))));
        assert_eq!(v, Vanished { endpoints: ["0123456789abcdef".to_owned()].into(), lost: false });
    }

    #[test]
    fn an_overrun_means_events_were_lost() {
        let mut v = Vanished::default();
        assert!(v.add(NetlinkPayload::Overrun(Vec::new())));
        assert!(v.lost && !v.is_empty());
    }
}
