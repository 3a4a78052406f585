//! What a monitor event says, read from the bytes the programs copied (overlay_common::monitor):
//! the frame's 5-tuple, and for VXLAN its VNI, outer addresses and the inner 5-tuple.

use std::{fmt::Write as _, net::Ipv4Addr};

use overlay_common::{
    VXLAN_PORT,
    monitor::{EVENT_DROP, EVENT_FLOW, HOOK_FROM_CONTAINER, HOOK_UPLINK_TC, HOOK_UPLINK_XDP, MonitorEvent},
    stats,
};
use serde::Serialize;

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;

/// One event, as the monitor prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    /// `drop` or `flow`.
    pub event: &'static str,
    /// A drop's reason (the names `overlay-agent stats` prints), or how a flow was forwarded
    /// (`tx_local`, `tx_encap`, `to_host`, `rx_deliver`).
    pub reason: &'static str,
    /// The program that wrote it: `from_container`, `uplink_xdp` or `uplink_tc`.
    pub hook: &'static str,
    pub ifindex: u32,
    /// The interface's name in the monitor's namespace (filled in by the monitor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// `tcp`, `udp`, `icmp`, `arp`, an IP protocol number, or the ethertype (`0x86dd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    /// VXLAN's outer source and destination (the VTEPs), for a frame still encapsulated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_src: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_dst: Option<Ipv4Addr>,
    /// The frame's length in bytes.
    pub len: u32,
    /// CLOCK_MONOTONIC nanoseconds when the program wrote it.
    #[serde(skip)]
    pub ts_ns: u64,
}

impl Record {
    /// Reads an event as the ring buffer holds it; None if it is not one (too short).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<MonitorEvent>() {
            return None;
        }
        // SAFETY: long enough (checked above); MonitorEvent is plain bytes, read unaligned.
        let ev: MonitorEvent = unsafe { bytes.as_ptr().cast::<MonitorEvent>().read_unaligned() };
        Some(Self::from_event(&ev))
    }

    pub fn from_event(ev: &MonitorEvent) -> Self {
        let event = match ev.kind {
            EVENT_DROP => "drop",
            EVENT_FLOW => "flow",
            _ => "unknown",
        };
        let hook = match ev.hook {
            HOOK_FROM_CONTAINER => "from_container",
            HOOK_UPLINK_XDP => "uplink_xdp",
            HOOK_UPLINK_TC => "uplink_tc",
            _ => "unknown",
        };
        let mut rec = Self {
            event,
            reason: stats::name(ev.code).unwrap_or("unknown"),
            hook,
            ifindex: ev.ifindex,
            interface: None,
            vni: (ev.vni != 0).then_some(ev.vni),
            proto: None,
            src: None,
            dst: None,
            sport: None,
            dport: None,
            outer_src: None,
            outer_dst: None,
            len: ev.len,
            ts_ns: ev.ts_ns,
        };
        let cap = (ev.cap_len as usize).min(ev.head.len());
        rec.read_frame(&ev.head[..cap], ev.hook != HOOK_FROM_CONTAINER);
        rec
    }

    /// Fills the addresses from a frame that starts with its Ethernet header. On the uplink,
    /// VXLAN is looked into: the inner frame's addresses are the ones that say whose it is.
    fn read_frame(&mut self, f: &[u8], uplink: bool) {
        let Some(ethertype) = be16(f, 12) else { return };
        match ethertype {
            ETH_P_IP => {}
            ETH_P_ARP => {
                // Sender and target protocol addresses of an Ethernet/IPv4 ARP packet.
                self.proto = Some("arp".into());
                self.src = ip4(f, ETH_LEN + 14);
                self.dst = ip4(f, ETH_LEN + 24);
                return;
            }
            other => {
                self.proto = Some(format!("{other:#06x}"));
                return;
            }
        }
        let Some(l4) = self.read_ipv4(f, ETH_LEN) else { return };
        if uplink && self.proto.as_deref() == Some("udp") && self.dport == Some(VXLAN_PORT) {
            let vxlan = l4 + 8;
            let Some(vni) = f.get(vxlan + 4..vxlan + 7) else { return };
            let vni = u32::from_be_bytes([0, vni[0], vni[1], vni[2]]);
            let inner = &f[(vxlan + 8).min(f.len())..];
            let mut inner_rec = Self { vni: Some(vni), ..self.clone() };
            (inner_rec.outer_src, inner_rec.outer_dst) = (self.src, self.dst);
            (inner_rec.proto, inner_rec.src, inner_rec.dst, inner_rec.sport, inner_rec.dport) =
                (None, None, None, None, None);
            inner_rec.read_frame(inner, false);
            *self = inner_rec;
        }
    }

    /// Reads the IPv4 header at `at` (and the ports after it); the offset of the transport
    /// header, if the frame is long enough to say where it is.
    fn read_ipv4(&mut self, f: &[u8], at: usize) -> Option<usize> {
        let vihl = *f.get(at)?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        let proto = *f.get(at + 9)?;
        self.proto = Some(match proto {
            1 => "icmp".into(),
            6 => "tcp".into(),
            17 => "udp".into(),
            n => n.to_string(),
        });
        self.src = ip4(f, at + 12);
        self.dst = ip4(f, at + 16);
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        let frag = be16(f, at + 6)? & 0x1fff;
        let l4 = at + ihl;
        if frag == 0 && (proto == 6 || proto == 17) {
            self.sport = be16(f, l4);
            self.dport = be16(f, l4 + 2);
        }
        Some(l4)
    }

    /// A line for people.
    pub fn line(&self, wall: &str) -> String {
        let mut out = format!("{wall} {:<4} {:<18} {:<14}", self.event, self.reason, self.hook);
        let _ = match &self.interface {
            Some(name) => write!(out, " {name}({})", self.ifindex),
            None => write!(out, " if{}", self.ifindex),
        };
        if let Some(vni) = self.vni {
            let _ = write!(out, " vni {vni}");
        }
        if let Some(proto) = &self.proto {
            let _ = write!(out, " {proto}");
        }
        let end = |ip: Option<Ipv4Addr>, port: Option<u16>| match (ip, port) {
            (Some(ip), Some(port)) => format!("{ip}:{port}"),
            (Some(ip), None) => ip.to_string(),
            (None, _) => "?".into(),
        };
        if self.src.is_some() || self.dst.is_some() {
            let _ = write!(out, " {} -> {}", end(self.src, self.sport), end(self.dst, self.dport));
        }
        if let (Some(s), Some(d)) = (self.outer_src, self.outer_dst) {
            let _ = write!(out, " (vxlan {s} -> {d})");
        }
        let _ = write!(out, " len {}", self.len);
        out
    }
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(f.get(at..at + 2)?.try_into().ok()?))
}

fn ip4(f: &[u8], at: usize) -> Option<Ipv4Addr> {
    let b: [u8; 4] = f.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

#[cfg(test)]
mod tests {
    use overlay_common::{monitor::HEAD_LEN, stats::DropReason};

    use super::*;

    fn event(kind: u8, hook: u8, code: u32, vni: u32, frame: &[u8]) -> MonitorEvent {
        let mut head = [0u8; HEAD_LEN];
        let n = frame.len().min(HEAD_LEN);
        head[..n].copy_from_slice(&frame[..n]);
        MonitorEvent {
            ts_ns: 1,
            kind,
            hook,
            _pad: 0,
            code,
            ifindex: 7,
            vni,
            len: frame.len() as u32,
            cap_len: n as u32,
            head,
        }
    }

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x02; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], ports: (u16, u16)) -> Vec<u8> {
        let mut f = vec![0x45, 0, 0, 48, 0, 0, 0x40, 0, 64, proto, 0, 0];
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&ports.0.to_be_bytes());
        f.extend_from_slice(&ports.1.to_be_bytes());
        f.extend_from_slice(&[0; 4]);
        f
    }

    #[test]
    fn container_drop_has_its_five_tuple() {
        let mut f = eth(ETH_P_IP);
        f.extend(ipv4(6, [10, 0, 0, 2], [10, 0, 0, 9], (4242, 80)));
        let r = Record::from_event(&event(
            EVENT_DROP,
            HOOK_FROM_CONTAINER,
            DropReason::NoEndpoint.code(),
            100,
            &f,
        ));
        assert_eq!((r.event, r.reason, r.hook), ("drop", "no_endpoint", "from_container"));
        assert_eq!(r.vni, Some(100));
        assert_eq!(r.proto.as_deref(), Some("tcp"));
        assert_eq!((r.src, r.dst), (Some(Ipv4Addr::new(10, 0, 0, 2)), Some(Ipv4Addr::new(10, 0, 0, 9))));
        assert_eq!((r.sport, r.dport), (Some(4242), Some(80)));
        assert_eq!(r.outer_src, None);
    }

    #[test]
    fn vxlan_drop_shows_inner_and_outer() {
        let mut f = eth(ETH_P_IP);
        f.extend(ipv4(17, [198, 18, 0, 1], [198, 18, 0, 2], (50000, VXLAN_PORT)));
        // The UDP header's other half is in ipv4()'s padding; VXLAN: I flag, VNI 0x01_02_ff.
        f.extend_from_slice(&[0x08, 0, 0, 0, 0x01, 0x02, 0xff, 0]);
        f.extend(eth(ETH_P_IP));
        f.extend(ipv4(17, [10, 0, 0, 2], [10, 0, 0, 3], (5353, 53)));
        let r = Record::from_event(&event(EVENT_DROP, HOOK_UPLINK_XDP, DropReason::UnknownVni.code(), 0, &f));
        assert_eq!(r.vni, Some(0x01_02_ff));
        assert_eq!(
            (r.outer_src, r.outer_dst),
            (Some(Ipv4Addr::new(198, 18, 0, 1)), Some(Ipv4Addr::new(198, 18, 0, 2)))
        );
        assert_eq!((r.src, r.sport, r.dport), (Some(Ipv4Addr::new(10, 0, 0, 2)), Some(5353), Some(53)));
        assert_eq!(r.proto.as_deref(), Some("udp"));
    }

    #[test]
    fn short_and_foreign_frames_say_what_they_can() {
        let r = Record::from_event(&event(
            EVENT_DROP,
            HOOK_FROM_CONTAINER,
            DropReason::Malformed.code(),
            0,
            &[1, 2],
        ));
        assert_eq!((r.proto, r.src, r.vni), (None, None, None));
        let r = Record::from_event(&event(EVENT_DROP, HOOK_FROM_CONTAINER, 18, 5, &eth(0x86dd)));
        assert_eq!(r.proto.as_deref(), Some("0x86dd"));
        assert_eq!(r.reason, "unsupported_ethertype");
        let mut f = eth(ETH_P_IP);
        f.extend(ipv4(1, [10, 0, 0, 2], [10, 0, 0, 3], (0, 0)));
        let r = Record::from_event(&event(EVENT_FLOW, HOOK_UPLINK_TC, stats::RX_DELIVER, 9, &f));
        assert_eq!(
            (r.event, r.reason, r.proto.as_deref(), r.sport),
            ("flow", "rx_deliver", Some("icmp"), None)
        );
    }
}
