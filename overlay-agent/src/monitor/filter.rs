//! Which events the monitor prints: by drop reason, network and container. Names are resolved
//! once, when the monitor starts: networks to VNIs and containers to their addresses through
//! the desired state, and containers to their host-side veths through the pinned `IFACES`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use overlay_common::{maps::Iface, stats::DropReason};

use super::Record;
use crate::model::State;

/// A container filter: its (VNI, address) pairs, and its host-side veths' ifindexes.
pub type ContainerMatch = (BTreeSet<(u32, Ipv4Addr)>, BTreeSet<u32>);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only drops, for these reasons.
    pub reasons: Option<BTreeSet<&'static str>>,
    /// Only events of these networks.
    pub vnis: Option<BTreeSet<u32>>,
    /// Only events to or from these containers' addresses (VNI, address), or on their veths.
    pub containers: Option<ContainerMatch>,
}

impl Filter {
    /// The filter the options ask for. `state` is needed only for names (a network given as a
    /// number is its VNI); `ifaces` are the pinned `IFACES` entries.
    pub fn build(
        reasons: &[String],
        networks: &[String],
        containers: &[String],
        state: Option<&State>,
        ifaces: &BTreeMap<u32, Iface>,
    ) -> anyhow::Result<Self> {
        let mut filter = Self::default();
        if !reasons.is_empty() {
            let mut set = BTreeSet::new();
            for r in reasons {
                let reason = DropReason::ALL.iter().find(|d| d.name() == r).ok_or_else(|| {
                    let names: Vec<_> = DropReason::ALL.iter().map(|d| d.name()).collect();
                    anyhow::anyhow!("no drop reason {r:?}; the reasons are: {}", names.join(", "))
                })?;
                set.insert(reason.name());
            }
            filter.reasons = Some(set);
        }
        let need = |what: &str| {
            state.ok_or_else(|| {
                anyhow::anyhow!("{what} by name needs the store (--etcd-endpoints or --state-file)")
            })
        };
        if !networks.is_empty() {
            let mut set = BTreeSet::new();
            for n in networks {
                if let Ok(vni) = n.parse::<u32>() {
                    set.insert(vni);
                    continue;
                }
                let net = need("--network")?
                    .network_by_name(n)
                    .ok_or_else(|| anyhow::anyhow!("no network {n:?} in the store"))?;
                set.insert(net.vni);
            }
            filter.vnis = Some(set);
        }
        if !containers.is_empty() {
            let state = need("--container")?;
            let mut addrs = BTreeSet::new();
            for c in containers {
                anyhow::ensure!(state.containers.contains_key(c), "no container {c:?} in the store");
                for ep in state.endpoints.values().filter(|e| &e.container == c) {
                    if let Some(net) = state.networks.get(&ep.network_id) {
                        addrs.insert((net.vni, ep.ipv4));
                    }
                }
            }
            let veths = ifaces
                .iter()
                .filter(|(_, i)| addrs.contains(&(i.vni, Ipv4Addr::from(i.ip))))
                .map(|(ifindex, _)| *ifindex)
                .collect();
            filter.containers = Some((addrs, veths));
        }
        Ok(filter)
    }

    /// Whether the monitor prints `rec`.
    pub fn passes(&self, rec: &Record) -> bool {
        if let Some(reasons) = &self.reasons
            && !(rec.event == "drop" && reasons.contains(rec.reason))
        {
            return false;
        }
        if let Some(vnis) = &self.vnis
            && !rec.vni.is_some_and(|v| vnis.contains(&v))
        {
            return false;
        }
        if let Some((addrs, veths)) = &self.containers {
            let on_veth = rec.hook == "from_container" && veths.contains(&rec.ifindex);
            let addressed = addrs.iter().any(|(vni, ip)| {
                rec.vni.is_none_or(|v| v == *vni) && (rec.src == Some(*ip) || rec.dst == Some(*ip))
            });
            if !(on_veth || addressed) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Container, Endpoint, Network};

    fn rec(
        event: &'static str,
        reason: &'static str,
        vni: Option<u32>,
        src: [u8; 4],
        dst: [u8; 4],
    ) -> Record {
        Record {
            event,
            reason,
            hook: "from_container",
            ifindex: 40,
            interface: None,
            vni,
            proto: Some("udp".into()),
            src: Some(src.into()),
            dst: Some(dst.into()),
            sport: Some(1),
            dport: Some(2),
            outer_src: None,
            outer_dst: None,
            len: 60,
            ts_ns: 0,
        }
    }

    fn state() -> State {
        let mut s = State::default();
        let net = Network::new("n1", "blue", 100, "10.0.0.0/24".parse().unwrap(), Ipv4Addr::new(10, 0, 0, 1));
        s.networks.insert("n1".into(), net);
        let ep = Endpoint::new("e1", "n1", "web", "h1", Ipv4Addr::new(10, 0, 0, 5));
        s.endpoints.insert("e1".into(), ep);
        let c = Container {
            name: "web".into(),
            host: "h1".into(),
            netns: None,
            handover: false,
            ports: Vec::new(),
            created: String::new(),
            revision: 0,
        };
        s.containers.insert("web".into(), c);
        s
    }

    #[test]
    fn reasons_keep_only_those_drops() {
        let f = Filter::build(&["no_endpoint".into()], &[], &[], None, &BTreeMap::new()).unwrap();
        assert!(f.passes(&rec("drop", "no_endpoint", None, [1; 4], [2; 4])));
        assert!(!f.passes(&rec("drop", "spoofed_source", None, [1; 4], [2; 4])));
        assert!(!f.passes(&rec("flow", "tx_local", None, [1; 4], [2; 4])));
        let err = Filter::build(&["nope".into()], &[], &[], None, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("no_endpoint"), "{err}");
    }

    #[test]
    fn networks_by_name_or_number() {
        let s = state();
        let f = Filter::build(&[], &["blue".into()], &[], Some(&s), &BTreeMap::new()).unwrap();
        assert!(f.passes(&rec("drop", "no_endpoint", Some(100), [1; 4], [2; 4])));
        assert!(!f.passes(&rec("drop", "no_endpoint", Some(101), [1; 4], [2; 4])));
        assert!(!f.passes(&rec("drop", "no_endpoint", None, [1; 4], [2; 4])));
        let f = Filter::build(&[], &["101".into()], &[], None, &BTreeMap::new()).unwrap();
        assert!(f.passes(&rec("drop", "no_endpoint", Some(101), [1; 4], [2; 4])));
        assert!(Filter::build(&[], &["red".into()], &[], Some(&s), &BTreeMap::new()).is_err());
        assert!(Filter::build(&[], &["blue".into()], &[], None, &BTreeMap::new()).is_err());
    }

    #[test]
    fn containers_by_address_or_veth() {
        let s = state();
        let ifaces = BTreeMap::from([(40, Iface { vni: 100, ip: [10, 0, 0, 5], mac: [2; 6], _pad: [0; 2] })]);
        let f = Filter::build(&[], &[], &["web".into()], Some(&s), &ifaces).unwrap();
        assert!(f.passes(&rec("drop", "no_endpoint", Some(100), [10, 0, 0, 9], [10, 0, 0, 5])));
        // Spoofed: not its address, but its veth.
        assert!(f.passes(&rec("drop", "spoofed_source", Some(100), [10, 0, 0, 66], [10, 0, 0, 9])));
        let mut other = rec("drop", "no_endpoint", Some(100), [10, 0, 0, 9], [10, 0, 0, 8]);
        other.ifindex = 41;
        assert!(!f.passes(&other));
        // The same address on another network is another container's.
        let mut elsewhere = rec("drop", "no_endpoint", Some(200), [10, 0, 0, 5], [10, 0, 0, 8]);
        elsewhere.ifindex = 41;
        assert!(!f.passes(&elsewhere));
        assert!(Filter::build(&[], &[], &["db".into()], Some(&s), &ifaces).is_err());
    }
}
