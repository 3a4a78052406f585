//! `NetworkDriver.CreateNetwork` and `DeleteNetwork`: a Docker network is an overlay network in
//! etcd, found by its subnet.
//!
//! Each engine gives its network an id of its own and tells the driver nothing else that names
//! it (not even the name typed after `docker network create`); what the same command gives every
//! engine is the subnet and the `-o` options. So the agent looks for the overlay network with
//! the same subnet: it joins it when the settings agree, refuses naming every difference when
//! they do not, and creates it (through `Store::create_network`, with all of its checks) when
//! there is none. The engine's network id is recorded, per host, in the agent's state directory
//! (`docker-networks.json`): the endpoint calls name only that id.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use ipnet::Ipv4Net;
use tracing::info;

use super::{
    ipam::Ranges,
    types::{CreateNetwork, DeleteNetwork, IpamData},
};
use crate::{
    model::Network,
    store::{NetworkSpec, Store, StoreError, ipam},
};

/// Where Docker puts the `-o key=value` pairs of `docker network create`.
pub const GENERIC: &str = "com.docker.network.generic";
const ENABLE_IPV6: &str = "com.docker.network.enable_ipv6";
/// `docker network create --internal`.
const INTERNAL: &str = "com.docker.network.internal";
/// The `-o` options understood: the store's (mtu, vni, under their short or Docker's names) and
/// `name`, the overlay network's name when this create makes it.
const OPT_NAME: &str = "name";
const OPT_MTU: [&str; 2] = ["mtu", crate::store::network::OPTION_MTU];
const OPT_VNI: [&str; 2] = ["vni", crate::store::network::OPTION_VNI];
/// `docker network create --opt encrypted`: the key's presence, whatever its value, as Docker's
/// overlay driver takes it.
const OPT_ENCRYPTED: &str = crate::store::network::OPTION_ENCRYPTED;

/// What one engine's CreateNetwork asks for, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The engine's id of the network.
    pub docker_id: String,
    /// `-o name=...`: the overlay network's name if this create makes it.
    pub name: Option<String>,
    pub subnet: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    /// `--ip-range`, known only when this plugin is also the network's IPAM driver (Docker
    /// gives it to RequestPool, not to CreateNetwork).
    pub ip_range: Option<Ipv4Net>,
    pub aux: BTreeMap<String, Ipv4Addr>,
    pub vni: Option<u32>,
    pub mtu: Option<u32>,
    /// `--internal`: no way out, no published ports.
    pub internal: bool,
    /// `--opt encrypted` (docs/encryption.md).
    pub encrypted: bool,
}

impl Wanted {
    /// The overlay network's name when this create makes it: `-o name=`, else one made of the
    /// subnet (`docker-10.0.9.0-24`), the same on every host.
    pub fn overlay_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("docker-{}-{}", self.subnet.network(), self.subnet.prefix_len()))
    }

    /// The store's `network create` arguments for it.
    pub fn spec(&self) -> NetworkSpec {
        let mut options = Vec::new();
        if let Some(vni) = self.vni {
            options.push(format!("vni={vni}"));
        }
        if let Some(mtu) = self.mtu {
            options.push(format!("mtu={mtu}"));
        }
        if self.encrypted {
            options.push(OPT_ENCRYPTED.to_owned());
        }
        NetworkSpec {
            name: self.overlay_name(),
            driver: None,
            subnet: Some(self.subnet.to_string()),
            gateway: self.gateway.map(|g| g.to_string()),
            ip_range: self.ip_range.map(|r| r.to_string()),
            aux_addresses: self.aux.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            options,
            labels: Vec::new(),
            internal: self.internal,
        }
    }

    /// Why an existing overlay network with the same subnet is not this one (every difference),
    /// or Ok when this create joins it.
    pub fn agrees_with(&self, n: &Network) -> Result<(), String> {
        let mut diff = Vec::new();
        if let Some(g) = self.gateway.filter(|g| *g != n.gateway) {
            diff.push(format!("gateway {} (not {g})", n.gateway));
        }
        if let Some(r) = self.ip_range.filter(|r| Some(*r) != n.ip_range) {
            diff.push(match n.ip_range {
                Some(has) => format!("ip-range {has} (not {r})"),
                None => format!("no ip-range (not {r})"),
            });
        }
        if let Some(vni) = self.vni.filter(|v| *v != n.vni) {
            diff.push(format!("VNI {} (not {vni})", n.vni));
        }
        if let Some(mtu) = self.mtu.filter(|m| Some(*m) != n.mtu) {
            diff.push(match n.mtu {
                Some(has) => format!("MTU {has} (not {mtu})"),
                None => format!("no MTU option (not {mtu})"),
            });
        }
        if !self.aux.is_empty() && self.aux != n.aux_addresses {
            diff.push(format!("auxiliary addresses {:?} (not {:?})", n.aux_addresses, self.aux));
        }
        if self.internal != n.internal {
            diff.push(if n.internal { "--internal".to_owned() } else { "no --internal".to_owned() });
        }
        // Joining a plaintext network from an engine that asked for encryption would quietly
        // send in the clear. Left out, it is taken from the network as the rest is: an engine
        // that did not ask joins an encrypted network, which only gives it more.
        if self.encrypted && !n.encrypted {
            diff.push("not encrypted (not --opt encrypted)".to_owned());
        }
        if let Some(name) = self.name.as_ref().filter(|name| **name != n.name) {
            diff.push(format!("name {:?} (not {name:?})", n.name));
        }
        if diff.is_empty() {
            return Ok(());
        }
        Err(format!(
            "overlay network {:?} has subnet {} with other settings: {}; create this one with the same settings to join it, or use another subnet",
            n.name,
            n.subnet,
            diff.join(", ")
        ))
    }
}

/// Checks a CreateNetwork body: a full network id, one IPv4 pool, no IPv6, known options.
pub fn parse_create(req: &CreateNetwork) -> Result<Wanted, String> {
    if req.network_id.len() != 64 || !req.network_id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("NetworkID {:?} is not 64 hex digits", req.network_id));
    }
    if !req.ipv6_data.is_empty()
        || req.options.get(ENABLE_IPV6).and_then(serde_json::Value::as_bool) == Some(true)
    {
        return Err("IPv6 is not supported: the overlay carries IPv4 only (leave out --ipv6)".into());
    }
    let pool = match req.ipv4_data.as_slice() {
        [one] => one,
        [] => return Err("no IPv4 pool: give the network a subnet (--subnet)".into()),
        _ => return Err("more than one IPv4 subnet: an overlay network has exactly one".into()),
    };
    let IpamData { pool: subnet, gateway, aux_addresses, .. } = pool;
    let subnet = ipam::parse_cidr("subnet", subnet).map_err(|e| e.to_string())?;
    let gateway = (!gateway.is_empty()).then(|| without_prefix("gateway", gateway)).transpose()?;
    let aux = aux_addresses
        .iter()
        .map(|(name, ip)| Ok((name.clone(), without_prefix("auxiliary address", ip)?)))
        .collect::<Result<BTreeMap<_, _>, String>>()?;
    let mut w = Wanted {
        docker_id: req.network_id.clone(),
        name: None,
        subnet,
        gateway,
        ip_range: None,
        aux,
        vni: None,
        mtu: None,
        internal: req.options.get(INTERNAL).and_then(serde_json::Value::as_bool) == Some(true),
        encrypted: false,
    };
    let generic = match req.options.get(GENERIC) {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(m)) => m.clone(),
        Some(other) => return Err(format!("option {GENERIC} is {other}, not an object")),
    };
    for (key, value) in &generic {
        let value = value.as_str().ok_or_else(|| format!("option {key}: {value} is not a string"))?;
        let number = |lo: u32, hi: u32| {
            value
                .parse::<u32>()
                .ok()
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| format!("option {key}={value}: expected a number from {lo} to {hi}"))
        };
        if key == OPT_NAME {
            crate::store::check_name("network name", value).map_err(|e| e.to_string())?;
            w.name = Some(value.to_owned());
        } else if OPT_VNI.contains(&key.as_str()) {
            w.vni = Some(number(crate::model::VNI_MIN, crate::model::VNI_MAX)?);
        } else if OPT_MTU.contains(&key.as_str()) {
            w.mtu = Some(number(68, 65535)?);
        } else if key == OPT_ENCRYPTED {
            w.encrypted = true;
        } else {
            return Err(format!("unknown option {key:?} (known: name, mtu, vni, encrypted)"));
        }
    }
    Ok(w)
}

/// "10.0.9.1/24" (or "10.0.9.1") as an address.
fn without_prefix(what: &'static str, value: &str) -> Result<Ipv4Addr, String> {
    let ip = value.split_once('/').map_or(value, |(ip, _)| ip);
    ipam::parse_addr(what, ip).map_err(|e| e.to_string())
}

/// This host's engine's network ids and the overlay networks they are, kept in a file of the
/// agent's state directory so a restarted agent still knows them.
pub struct DockerNetworks {
    path: PathBuf,
    by_docker_id: Mutex<BTreeMap<String, String>>,
}

impl DockerNetworks {
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("docker-networks.json");
        let by_docker_id = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: does not parse: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        Ok(Self { path, by_docker_id: Mutex::new(by_docker_id) })
    }

    /// The overlay network id of the engine's network `docker_id`.
    pub fn get(&self, docker_id: &str) -> Option<String> {
        self.lock().get(docker_id).cloned()
    }

    /// Records (Some) or forgets (None) what the engine's network `docker_id` is, on disk first.
    fn set(&self, docker_id: &str, overlay_id: Option<&str>) -> Result<(), String> {
        let mut map = self.lock();
        let mut next = map.clone();
        match overlay_id {
            Some(id) => drop(next.insert(docker_id.to_owned(), id.to_owned())),
            None => drop(next.remove(docker_id)),
        }
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&tmp, serde_json::to_vec_pretty(&next).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| format!("recording Docker's networks in {}: {e}", self.path.display()))?;
        *map = next;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.by_docker_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// CreateNetwork: join the overlay network with this subnet, or make it.
pub async fn create(
    store: &Store,
    networks: &DockerNetworks,
    ranges: &Ranges,
    req: &CreateNetwork,
) -> Result<(), String> {
    let mut w = parse_create(req)?;
    w.ip_range = ranges.get(w.subnet);
    // Two attempts: another host's engine may create the same network between this read and
    // this create, which the store then refuses (same name or subnet): read again and join it.
    for attempt in 0..2 {
        let existing = store.networks().await.map_err(|e| e.to_string())?;
        if let Some(n) = existing.iter().find(|n| n.subnet == w.subnet) {
            w.agrees_with(n)?;
            networks.set(&w.docker_id, Some(&n.id))?;
            info!(docker_network = %w.docker_id, network = %n.name, "Docker network joins an overlay network");
            return Ok(());
        }
        match store.create_network(&w.spec()).await {
            Ok(n) => {
                networks.set(&w.docker_id, Some(&n.id))?;
                info!(docker_network = %w.docker_id, network = %n.name, vni = n.vni, "Docker network created an overlay network");
                return Ok(());
            }
            Err(StoreError::NetworkExists { .. } | StoreError::SubnetOverlap { .. }) if attempt == 0 => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("could not create or join an overlay network for subnet {}", w.subnet))
}

/// DeleteNetwork: the engine forgets its network. The overlay network stays in etcd: other
/// hosts' engines may still have it (`overlay network rm` removes it once no endpoint is left).
pub fn delete(networks: &DockerNetworks, req: &DeleteNetwork) -> Result<(), String> {
    if networks.get(&req.network_id).is_none() {
        // Docker deletes what it created; one this agent never recorded (its state directory
        // was wiped) has nothing to forget.
        return Ok(());
    }
    networks.set(&req.network_id, None)?;
    info!(docker_network = %req.network_id, "Docker network deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "c5a4fd8b2203649c66cd41f5f2fb18c2f500e706b384e822af33ccfd8ea2475e";

    fn body(json: &str) -> CreateNetwork {
        serde_json::from_str(json).expect("body parses")
    }

    /// dockerd 20.10's CreateNetwork for `-o vni=4242 -o mtu=1400 --subnet 10.0.9.0/24`
    /// (the shape recorded in the transcript).
    fn create(generic: &str) -> String {
        format!(
            r#"{{"IPv4Data": [{{"AddressSpace": "LocalDefault", "Gateway": "10.0.9.1/24", "Pool": "10.0.9.0/24"}}], "IPv6Data": [], "NetworkID": "{ID}", "Options": {{"com.docker.network.enable_ipv6": false, "com.docker.network.generic": {generic}}}}}"#
        )
    }

    #[test]
    fn dockers_body_maps_to_the_overlay_network() {
        let w = parse_create(&body(&create(r#"{"vni": "4242", "mtu": "1400"}"#))).unwrap();
        assert_eq!(w.docker_id, ID);
        assert_eq!(w.subnet, "10.0.9.0/24".parse().unwrap());
        assert_eq!(w.gateway, Some(Ipv4Addr::new(10, 0, 9, 1)));
        assert_eq!((w.vni, w.mtu), (Some(4242), Some(1400)));
        let spec = w.spec();
        assert_eq!(spec.name, "docker-10.0.9.0-24");
        assert_eq!(spec.subnet.as_deref(), Some("10.0.9.0/24"));
        assert_eq!(spec.gateway.as_deref(), Some("10.0.9.1"));
        assert_eq!(spec.options, vec!["vni=4242", "mtu=1400"]);
        // Docker's own option names, and a name for the overlay network.
        let w = parse_create(&body(&create(
            r#"{"com.docker.network.driver.overlay.vxlanid_list": "7", "name": "web"}"#,
        )))
        .unwrap();
        assert_eq!((w.vni, w.overlay_name().as_str()), (Some(7), "web"));
        // Auxiliary addresses come as ip/len.
        let aux = format!(
            r#"{{"IPv4Data": [{{"Pool": "10.0.9.0/24", "Gateway": "10.0.9.1/24", "AuxAddresses": {{"router": "10.0.9.5/24"}}}}], "NetworkID": "{ID}"}}"#
        );
        let w = parse_create(&body(&aux)).unwrap();
        assert_eq!(w.aux.get("router"), Some(&Ipv4Addr::new(10, 0, 9, 5)));
        assert_eq!(w.spec().aux_addresses, vec!["router=10.0.9.5"]);
    }

    #[test]
    fn bad_creates_are_refused_with_the_reason() {
        let cases = [
            (create(r#"{"colour": "blue"}"#), "unknown option \"colour\""),
            (create(r#"{"vni": "0"}"#), "option vni=0: expected a number from 1 to 16777214"),
            (create(r#"{"mtu": 1400}"#), "option mtu: 1400 is not a string"),
            (create(r#"{"name": "no/slash"}"#), "network name"),
            (create("{}").replace(ID, "abc"), "NetworkID \"abc\" is not 64 hex digits"),
            (create("{}").replace("10.0.9.0/24\"", "10.0.9.1/24\""), "subnet"),
            (create("{}").replace("\"IPv6Data\": []", r#""IPv6Data": [{"Pool": "fd00::/64"}]"#), "IPv6"),
            (format!(r#"{{"NetworkID": "{ID}", "IPv4Data": []}}"#), "--subnet"),
            (
                format!(
                    r#"{{"NetworkID": "{ID}", "IPv4Data": [{{"Pool": "10.0.9.0/24"}}, {{"Pool": "10.0.8.0/24"}}]}}"#
                ),
                "exactly one",
            ),
        ];
        for (json, want) in cases {
            let err = parse_create(&body(&json)).expect_err(&json);
            assert!(err.contains(want), "{json}: {err:?} does not say {want:?}");
        }
    }

    #[test]
    fn opt_encrypted_is_taken_as_docker_takes_it_and_must_agree() {
        // `docker network create -d overlay --opt encrypted`: the key, with an empty value.
        let w = parse_create(&body(&create(r#"{"encrypted": "", "vni": "4242"}"#))).unwrap();
        assert!(w.encrypted);
        assert_eq!(w.spec().options, vec!["vni=4242", "encrypted"]);
        assert!(!parse_create(&body(&create("{}"))).unwrap().encrypted);
        // Joining a plaintext network when encryption was asked for (or the other way) is refused.
        let err = w.agrees_with(&existing()).unwrap_err();
        assert!(err.contains("not encrypted"), "{err}");
        let mut secret = existing();
        secret.encrypted = true;
        assert_eq!(w.agrees_with(&secret), Ok(()));
        // Left out, it is taken from the network, as everything else is.
        let plain = parse_create(&body(&create("{}"))).unwrap();
        assert_eq!(plain.agrees_with(&secret), Ok(()));
    }

    fn existing() -> Network {
        let mut n = Network::new(
            ID,
            "docker-10.0.9.0-24",
            4242,
            "10.0.9.0/24".parse().unwrap(),
            Ipv4Addr::new(10, 0, 9, 1),
        );
        n.mtu = Some(1400);
        n
    }

    #[test]
    fn the_same_create_joins_and_a_different_one_names_every_difference() {
        let same = parse_create(&body(&create(r#"{"vni": "4242", "mtu": "1400"}"#))).unwrap();
        assert_eq!(same.agrees_with(&existing()), Ok(()));
        // What was left out is taken from the network (another host chose it).
        let fewer = parse_create(&body(&create("{}"))).unwrap();
        assert_eq!(fewer.agrees_with(&existing()), Ok(()));
        let other = parse_create(&body(
            &create(r#"{"vni": "4243", "mtu": "1300", "name": "web"}"#)
                .replace("10.0.9.1/24", "10.0.9.254/24"),
        ))
        .unwrap();
        let err = other.agrees_with(&existing()).unwrap_err();
        for want in [
            "gateway 10.0.9.1 (not 10.0.9.254)",
            "VNI 4242 (not 4243)",
            "MTU 1400 (not 1300)",
            "name \"docker-10.0.9.0-24\" (not \"web\")",
        ] {
            assert!(err.contains(want), "{err:?} does not say {want:?}");
        }
    }

    #[test]
    fn networks_are_remembered_across_restarts() {
        let dir = std::env::temp_dir().join(format!("overlay-docker-networks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let networks = DockerNetworks::load(&dir).unwrap();
        networks.set(ID, Some("overlay-id")).unwrap();
        assert_eq!(DockerNetworks::load(&dir).unwrap().get(ID).as_deref(), Some("overlay-id"));
        delete(&networks, &DeleteNetwork { network_id: ID.to_owned() }).unwrap();
        assert_eq!(DockerNetworks::load(&dir).unwrap().get(ID), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
