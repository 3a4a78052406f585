//! Forgetting a container's connections when it goes: the kernel's conntrack entries that name
//! its address, in either direction (what it sent out, masqueraded; what reached it through a
//! published port). Left alone they would live on for their timeouts (days, for an established
//! TCP connection), and a new container given the same address would inherit their NAT.
//!
//! Through ctnetlink with `netlink-packet-netfilter` (rust-netlink, the family of the
//! rtnetlink crate the agent already uses): a dump of the IPv4 table, then a delete of each
//! matching entry by its original tuple, as `conntrack -D -s ADDR` does.

use std::{collections::BTreeSet, io, net::IpAddr, net::Ipv4Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, Tuple},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// Deletes every conntrack entry whose original or reply tuple has one of `addresses` as source
/// or destination. Returns how many went. Blocking: run it off the async threads.
pub fn forget(addresses: &BTreeSet<Ipv4Addr>) -> io::Result<usize> {
    if addresses.is_empty() {
        return Ok(0);
    }
    forget_where(|ip| addresses.contains(&ip))
}

/// Deletes every conntrack entry that names an address for which `doomed` says so.
pub fn forget_where(doomed: impl Fn(Ipv4Addr) -> bool) -> io::Result<usize> {
    let addresses = doomed;
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut entries = Vec::new();
    for msg in exchange(&mut socket, ConntrackMessage::Get(Vec::new()), NLM_F_REQUEST | NLM_F_DUMP)? {
        // The kernel sends each entry of a dump as a "new" message.
        let (ConntrackMessage::New(attrs) | ConntrackMessage::Get(attrs)) = msg else { continue };
        let names = attrs.iter().any(|a| match a {
            ConntrackAttribute::CtaTupleOrig(t) | ConntrackAttribute::CtaTupleReply(t) => {
                tuple_addresses(t).any(&addresses)
            }
            _ => false,
        });
        if !names {
            continue;
        }
        // The original tuple names the entry (with its zone, if any, kept as it came).
        let key: Vec<ConntrackAttribute> = attrs
            .into_iter()
            .filter(|a| {
                matches!(a, ConntrackAttribute::CtaTupleOrig(_))
                    || matches!(a, ConntrackAttribute::Other(nla) if netlink_packet_core::Nla::kind(nla) == CTA_ZONE)
            })
            .collect();
        entries.push(key);
    }
    let mut gone = 0;
    for key in entries {
        match exchange(&mut socket, ConntrackMessage::Delete(key), NLM_F_REQUEST | NLM_F_ACK) {
            Ok(_) => gone += 1,
            // Gone meanwhile (timed out, or closed).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(gone)
}

/// `CTA_ZONE`: part of an entry's identity when not the default zone.
const CTA_ZONE: u16 = 18;

fn tuple_addresses(tuple: &[Tuple]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    tuple.iter().flat_map(|t| match t {
        Tuple::Ip(ips) => ips
            .iter()
            .filter_map(|ip| match ip {
                IPTuple::SourceAddress(IpAddr::V4(a)) | IPTuple::DestinationAddress(IpAddr::V4(a)) => {
                    Some(*a)
                }
                _ => None,
            })
            .collect::<Vec<_>>(),
        _ => Vec::new(),
    })
}

/// Sends one request and reads its answers until the dump is done or the ack comes; an error
/// answer becomes the error.
fn exchange(socket: &mut Socket, msg: ConntrackMessage, flags: u16) -> io::Result<Vec<ConntrackMessage>> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            msg,
        )),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut out = Vec::new();
    let mut rx = vec![0; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut rx[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let reply = NetlinkMessage::<NetfilterMessage>::deserialize(&rx[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("ctnetlink: {e}")))?;
            let len = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(out),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    };
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(m),
                    ..
                }) => {
                    out.push(m);
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
        if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
            return Ok(out);
        }
    }
}
