//! Networks: create (name, VNI and subnet unique, all in one transaction), look up, remove
//! (only when no endpoint is left).

use std::{collections::BTreeMap, net::Ipv4Addr};

use etcd_client::{DeleteOptions, KeyValue, TxnOp};

use super::{
    Result, Store, StoreError, check_name,
    etcd::{Range, Retry, absent, decode, decode_or_skip, encode, range_unchanged_since, unchanged},
    ipam::{self, Addressing},
    new_id, now_rfc3339,
};
use crate::model::{DRIVER_OVERLAY, Endpoint, Host, Network, VNI_MAX, VNI_MIN};

/// Where automatic VNIs start, as in Docker's overlay driver; lower ones are left for people
/// who pick their own with `-o vni=N`.
pub const AUTO_VNI_START: u32 = 4096;

/// The option names `-o` accepts: a short name, and Docker's.
const OPT_MTU: [&str; 2] = ["mtu", OPTION_MTU];
const OPT_VNI: [&str; 2] = ["vni", OPTION_VNI];
pub const OPTION_MTU: &str = "com.docker.network.driver.mtu";
/// `-o encrypted`, under the name Docker's overlay driver gives it (`--opt encrypted`), with an
/// empty value as Docker stores it.
pub const OPTION_ENCRYPTED: &str = "encrypted";
pub const OPTION_VNI: &str = "com.docker.network.driver.overlay.vxlanid_list";

/// `network create`'s arguments, as the user typed them: the store parses and checks them, so
/// every caller gets the same refusals.
#[derive(Clone, Debug, Default)]
pub struct NetworkSpec {
    pub name: String,
    /// Only "overlay" (the default) is accepted.
    pub driver: Option<String>,
    /// CIDR; when absent the first free /24 of 10.0.0.0/8.
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    pub ip_range: Option<String>,
    /// `name=ip`
    pub aux_addresses: Vec<String>,
    /// `key=value`: mtu, vni; or `encrypted` (bare, or `=true`).
    pub options: Vec<String>,
    /// `key=value` (or `key`, for an empty value).
    pub labels: Vec<String>,
    /// No way out through the hosts, no published ports (`--internal`).
    pub internal: bool,
}

/// Splits `key=value` pairs; a bare `key` has an empty value when `bare_ok`.
fn pairs(what: &'static str, items: &[String], bare_ok: bool) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in items {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None if bare_ok => (item.trim(), ""),
            None => {
                return Err(StoreError::Invalid {
                    what,
                    value: item.clone(),
                    reason: "expected key=value".into(),
                });
            }
        };
        if k.is_empty() {
            return Err(StoreError::Invalid { what, value: item.clone(), reason: "empty key".into() });
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(StoreError::Invalid {
                what,
                value: item.clone(),
                reason: format!("{k} given twice"),
            });
        }
    }
    Ok(out)
}

/// The parts of a spec that can be checked without the store.
struct Parsed {
    subnet: Option<ipnet::Ipv4Net>,
    gateway: Option<Ipv4Addr>,
    ip_range: Option<ipnet::Ipv4Net>,
    aux: BTreeMap<String, Ipv4Addr>,
    mtu: Option<u32>,
    vni: Option<u32>,
    encrypted: bool,
    options: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
}

impl NetworkSpec {
    fn parse(&self) -> Result<Parsed> {
        check_name("network name", &self.name)?;
        // `network rm`/`inspect` take a name or an id; a name shaped like an id could be
        // another network's id, and which one a command then hits would depend on sort order.
        if is_full_id(&self.name) {
            return Err(StoreError::Invalid {
                what: "network name",
                value: self.name.clone(),
                reason: format!("{ID_LEN} hex digits are a network id, not a name"),
            });
        }
        if let Some(driver) = &self.driver
            && driver != DRIVER_OVERLAY
        {
            return Err(StoreError::UnsupportedDriver { driver: driver.clone() });
        }
        let subnet = self.subnet.as_deref().map(|s| ipam::parse_cidr("subnet", s)).transpose()?;
        let ip_range = self.ip_range.as_deref().map(|s| ipam::parse_cidr("ip-range", s)).transpose()?;
        let gateway = self.gateway.as_deref().map(|s| ipam::parse_addr("gateway", s)).transpose()?;
        let aux = pairs("auxiliary address", &self.aux_addresses, false)?
            .into_iter()
            .map(|(name, ip)| Ok((name, ipam::parse_addr("auxiliary address", &ip)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        if subnet.is_none() {
            // Without a subnet these would be checked against a default one the user never saw.
            let needs_subnet = [("gateway", self.gateway.clone()), ("ip-range", self.ip_range.clone())]
                .into_iter()
                .chain(self.aux_addresses.first().map(|a| ("auxiliary address", Some(a.clone()))));
            for (what, value) in needs_subnet {
                if let Some(value) = value {
                    return Err(StoreError::Invalid { what, value, reason: "needs --subnet".into() });
                }
            }
        }
        // Bare keys are allowed for `encrypted`, as Docker's `--opt encrypted`; mtu and vni then
        // fail their number check with their own message.
        let given = pairs("option", &self.options, true)?;
        let mut mtu = None;
        let mut vni = None;
        let mut encrypted = false;
        // Stored under Docker's names, whichever the user typed, so inspect shows what Docker's would.
        let mut options = BTreeMap::new();
        for (key, value) in &given {
            let number = |lo: u32, hi: u32| {
                value.parse::<u32>().ok().filter(|n| (lo..=hi).contains(n)).ok_or_else(|| {
                    StoreError::Invalid {
                        what: "option",
                        value: format!("{key}={value}"),
                        reason: format!("expected a number from {lo} to {hi}"),
                    }
                })
            };
            if OPT_MTU.contains(&key.as_str()) {
                let n = number(68, 65535)?;
                mtu = Some(n);
                options.insert(OPT_MTU[1].to_owned(), n.to_string());
            } else if OPT_VNI.contains(&key.as_str()) {
                let n = number(VNI_MIN, VNI_MAX)?;
                vni = Some(n);
                options.insert(OPT_VNI[1].to_owned(), n.to_string());
            } else if key == OPTION_ENCRYPTED {
                // Docker takes the key's presence for yes; a value that says otherwise is more
                // likely a mistake than a wish for plaintext, so only "" and "true" are taken.
                if !(value.is_empty() || value == "true") {
                    return Err(StoreError::Invalid {
                        what: "option",
                        value: format!("{key}={value}"),
                        reason: "encrypted takes no value (or true)".into(),
                    });
                }
                encrypted = true;
                options.insert(OPTION_ENCRYPTED.to_owned(), String::new());
            } else {
                return Err(StoreError::Invalid {
                    what: "option",
                    value: key.clone(),
                    reason: "unknown (known: mtu, vni, encrypted)".into(),
                });
            }
        }
        let labels = pairs("label", &self.labels, true)?;
        Ok(Parsed { subnet, gateway, ip_range, aux, mtu, vni, encrypted, options, labels })
    }
}

/// How many hex digits an id has (`store::new_id`).
const ID_LEN: usize = 64;

/// Whether `s` has the shape of an id.
fn is_full_id(s: &str) -> bool {
    s.len() == ID_LEN && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Finds a network by name, full id or unique id prefix (as `docker network` does).
pub(crate) fn resolve<'a>(
    networks: &'a [(Network, KeyValue)],
    query: &str,
) -> Result<&'a (Network, KeyValue)> {
    if let Some(n) = networks.iter().find(|(n, _)| n.name == query || n.id == query) {
        return Ok(n);
    }
    if !query.is_empty() && query.chars().all(|c| c.is_ascii_hexdigit()) {
        let matches: Vec<_> = networks.iter().filter(|(n, _)| n.id.starts_with(query)).collect();
        match matches.as_slice() {
            [one] => return Ok(one),
            [] => {}
            many => {
                let names: Vec<_> = many.iter().map(|(n, _)| format!("{:?}", n.name)).collect();
                return Err(StoreError::AmbiguousNetwork {
                    query: query.to_owned(),
                    matches: names.join(", "),
                });
            }
        }
    }
    Err(StoreError::NetworkNotFound(query.to_owned()))
}

/// Bytes the tunnel adds to a container's packet on the underlay: VXLAN's, and ESP's on an
/// encrypted network.
pub fn tunnel_overhead(encrypted: bool) -> u32 {
    overlay_common::VXLAN_OVERHEAD + if encrypted { overlay_common::ESP_OVERHEAD } else { 0 }
}

/// The registered host whose uplink cannot carry frames of `mtu` once the tunnel's `overhead`
/// is added (the one with the smallest limit, so the message names the tightest bound), and
/// that limit.
fn mtu_too_large(hosts: &[Host], mtu: u32, overhead: u32) -> Option<(&Host, u32, u32)> {
    hosts
        .iter()
        .filter_map(|h| {
            let uplink = h.uplink_mtu?;
            Some((h, uplink, uplink.saturating_sub(overhead)))
        })
        .filter(|(_, _, limit)| mtu > *limit)
        .min_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.name.cmp(&b.0.name)))
}

/// Decodes network keys, by name: refusals then name the same conflicting network every time.
/// A network whose value does not parse is skipped (with a warning naming its key): nothing
/// can be resolved to it, so the others stay usable.
pub(crate) fn decode_networks(kvs: &[KeyValue]) -> Vec<(Network, KeyValue)> {
    let mut networks: Vec<_> =
        kvs.iter().filter_map(|kv| Some((decode_or_skip::<Network>(kv)?, kv.clone()))).collect();
    networks.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    networks
}

impl Store {
    /// Creates a network. Its name, VNI and subnet are checked against every other network
    /// and the write is guarded so that no network created meanwhile can make it a duplicate.
    pub async fn create_network(&self, spec: &NetworkSpec) -> Result<Network> {
        const OP: &str = "network create";
        let p = spec.parse()?;
        // Addressing that does not depend on other networks is refused before reading anything.
        let given = p.subnet.map(|s| Addressing::new(s, p.gateway, p.ip_range, p.aux.clone())).transpose()?;
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let view = self.view(OP, &[Range::Prefix(k.networks()), Range::Prefix(k.hosts())]).await?;
            // An MTU some host's uplink cannot carry would be clamped there, silently for the
            // user, while inspect shows the requested value. The hosts are not guarded: one that
            // registers later with a smaller uplink clamps, and its agent says so.
            if let Some(mtu) = p.mtu {
                let hosts: Vec<Host> = view.prefix(1).iter().filter_map(decode_or_skip).collect();
                let overhead = tunnel_overhead(p.encrypted);
                if let Some((host, uplink, limit)) = mtu_too_large(&hosts, mtu, overhead) {
                    return Err(StoreError::MtuTooLarge {
                        mtu,
                        host: host.name.clone(),
                        uplink,
                        limit,
                        tunnel: if p.encrypted { "encrypted VXLAN (ESP)" } else { "VXLAN" },
                        overhead,
                    });
                }
            }
            // Ruling out an overlap needs every network's subnet: here a value that does not
            // parse is refused (naming its key) rather than skipped as listings skip it.
            for kv in view.prefix(0) {
                decode::<Network>(kv)?;
            }
            let existing = decode_networks(view.prefix(0));
            if existing.iter().any(|(n, _)| n.name == spec.name) {
                return Err(StoreError::NetworkExists { name: spec.name.clone() });
            }
            let addressing = if let Some(a) = &given {
                a.clone()
            } else {
                let taken: Vec<_> = existing.iter().map(|(n, _)| n.subnet).collect();
                let subnet = ipam::default_subnet(&taken).ok_or(StoreError::NoDefaultSubnet)?;
                Addressing::new(subnet, p.gateway, p.ip_range, p.aux.clone())?
            };
            if let Some((other, _)) =
                existing.iter().find(|(n, _)| ipam::overlaps(n.subnet, addressing.subnet))
            {
                return Err(StoreError::SubnetOverlap {
                    subnet: addressing.subnet,
                    network: other.name.clone(),
                    other: other.subnet,
                });
            }
            let vni = if let Some(vni) = p.vni {
                if let Some((other, _)) = existing.iter().find(|(n, _)| n.vni == vni) {
                    return Err(StoreError::VniTaken { vni, network: other.name.clone() });
                }
                vni
            } else {
                let used: std::collections::BTreeSet<u32> = existing.iter().map(|(n, _)| n.vni).collect();
                (AUTO_VNI_START..=VNI_MAX)
                    .chain(VNI_MIN..AUTO_VNI_START)
                    .find(|v| !used.contains(v))
                    .ok_or(StoreError::VnisExhausted)?
            };
            let network = Network {
                id: new_id(),
                name: spec.name.clone(),
                driver: DRIVER_OVERLAY.to_owned(),
                vni,
                subnet: addressing.subnet,
                gateway: addressing.gateway,
                ip_range: addressing.ip_range,
                aux_addresses: addressing.aux_addresses,
                mtu: p.mtu,
                options: p.options.clone(),
                labels: p.labels.clone(),
                created: now_rfc3339(),
                internal: spec.internal,
                encrypted: p.encrypted,
            };
            // Any network created (or changed) since the read could collide on name, VNI or
            // subnet; the name and VNI keys say the same thing once more, key by key.
            let compares = vec![
                range_unchanged_since(&k.networks(), view.rev),
                absent(&k.network_name(&network.name)),
                absent(&k.vni(vni)),
            ];
            let ops = vec![
                TxnOp::put(k.network(&network.id), encode(&network), None),
                TxnOp::put(k.network_name(&network.name), network.id.as_str(), None),
                TxnOp::put(k.vni(vni), network.id.as_str(), None),
            ];
            if self.commit(OP, compares, ops).await?.is_some() {
                return Ok(network);
            }
            retry.again().await?;
        }
    }

    /// Removes a network that has no endpoints left.
    pub async fn remove_network(&self, name_or_id: &str) -> Result<Network> {
        const OP: &str = "network rm";
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let view = self.view(OP, &[Range::Prefix(k.networks())]).await?;
            let networks = decode_networks(view.prefix(0));
            let (network, kv) = resolve(&networks, name_or_id)?;
            let eps = self.view(OP, &[Range::Prefix(k.network_endpoints(&network.id))]).await?;
            if !eps.prefix(0).is_empty() {
                let mut containers = eps
                    .prefix(0)
                    .iter()
                    .map(|kv| decode::<Endpoint>(kv).map(|e| e.container))
                    .collect::<Result<Vec<_>>>()?;
                containers.sort();
                return Err(StoreError::NetworkInUse { network: network.name.clone(), containers });
            }
            // A connect that raced this read created an endpoint key after `eps.rev`.
            let compares = vec![
                unchanged(&k.network(&network.id), Some(kv)),
                range_unchanged_since(&k.network_endpoints(&network.id), eps.rev),
            ];
            let ops = vec![
                TxnOp::delete(k.network(&network.id), None),
                TxnOp::delete(k.network_name(&network.name), None),
                TxnOp::delete(k.vni(network.vni), None),
                TxnOp::delete(k.addresses(&network.id), Some(DeleteOptions::new().with_prefix())),
                // Its services go with it (with no endpoints left, none has a backend).
                TxnOp::delete(k.services(&network.id), Some(DeleteOptions::new().with_prefix())),
            ];
            if self.commit(OP, compares, ops).await?.is_some() {
                return Ok(network.clone());
            }
            retry.again().await?;
        }
    }

    /// A network by name, id or unique id prefix.
    pub async fn network(&self, name_or_id: &str) -> Result<Network> {
        let kvs = self.list("network inspect", &self.keys.networks()).await?;
        let networks = decode_networks(&kvs);
        Ok(resolve(&networks, name_or_id)?.0.clone())
    }

    /// Every network, by name.
    pub async fn networks(&self) -> Result<Vec<Network>> {
        let kvs = self.list("network ls", &self.keys.networks()).await?;
        let mut networks: Vec<Network> = kvs.iter().filter_map(decode_or_skip).collect();
        networks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(networks)
    }

    /// The endpoints of one network, by container name.
    pub async fn network_endpoints(&self, network_id: &str) -> Result<Vec<Endpoint>> {
        let kvs = self.list("network endpoints", &self.keys.network_endpoints(network_id)).await?;
        let mut eps: Vec<Endpoint> = kvs.iter().filter_map(decode_or_skip).collect();
        eps.sort_by(|a, b| a.container.cmp(&b.container));
        Ok(eps)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{NetworkSpec, OPTION_ENCRYPTED, StoreError, mtu_too_large, tunnel_overhead};
    use crate::model::Host;

    fn with_options(options: &[&str]) -> NetworkSpec {
        NetworkSpec {
            name: "secret".into(),
            options: options.iter().map(|o| (*o).to_owned()).collect(),
            ..NetworkSpec::default()
        }
    }

    #[test]
    fn encrypted_is_a_bare_option_as_dockers_and_is_stored_under_its_name() {
        for given in ["encrypted", "encrypted=", "encrypted=true"] {
            let p = with_options(&[given, "mtu=1300"]).parse().unwrap();
            assert!(p.encrypted, "{given}");
            assert_eq!(p.options.get(OPTION_ENCRYPTED).map(String::as_str), Some(""), "{given}");
        }
        let plain = with_options(&["mtu=1300"]).parse().unwrap();
        assert!(!plain.encrypted && !plain.options.contains_key(OPTION_ENCRYPTED));
    }

    #[test]
    fn encrypted_with_a_value_that_is_not_yes_and_bare_numbers_are_refused() {
        for given in ["encrypted=false", "encrypted=0", "mtu", "vni"] {
            let err = with_options(&[given]).parse().err().unwrap_or_else(|| panic!("{given} accepted"));
            assert!(matches!(err, StoreError::Invalid { what: "option", .. }), "{given}: {err}");
        }
    }

    #[test]
    fn an_encrypted_network_leaves_room_for_esp_on_every_uplink() {
        let hosts = [host("a", Some(1500))];
        assert_eq!(tunnel_overhead(false), 50);
        assert_eq!(tunnel_overhead(true), 107);
        assert!(mtu_too_large(&hosts, 1393, tunnel_overhead(true)).is_none());
        let (_, _, limit) = mtu_too_large(&hosts, 1394, tunnel_overhead(true)).unwrap();
        assert_eq!(limit, 1393);
    }

    fn host(name: &str, uplink_mtu: Option<u32>) -> Host {
        Host { uplink_mtu, ..Host::new(name, Ipv4Addr::LOCALHOST) }
    }

    #[test]
    fn the_tightest_uplink_bounds_the_mtu() {
        let hosts = [host("a", Some(9000)), host("b", Some(1500)), host("c", None), host("d", Some(1500))];
        assert!(mtu_too_large(&hosts, 1450, 50).is_none(), "1500 - 50 fits");
        let (h, uplink, limit) = mtu_too_large(&hosts, 1451, 50).unwrap();
        assert_eq!((h.name.as_str(), uplink, limit), ("b", 1500, 1450));
        assert!(mtu_too_large(&[host("c", None)], 65535, 50).is_none(), "an unknown uplink bounds nothing");
        assert!(mtu_too_large(&[], 65535, 50).is_none());
    }
}
