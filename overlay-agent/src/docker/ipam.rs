//! Docker's remote IPAM driver API (`--ipam-driver overlay-ebpf`): pools and addresses come
//! from the overlay's etcd IPAM, so no address is handed out twice across hosts.
//!
//! Docker asks for the pool and the gateway before CreateNetwork, and for a container's address
//! before CreateEndpoint (docs/docker.md has the order). A pool is the network's subnet, with
//! the `--ip-range` after a `|` in its id; the range reaches CreateNetwork through `Ranges` (it
//! is not in CreateNetwork's body). The gateway and auxiliary addresses are the overlay
//! network's once it exists, and are echoed while it does not; a container's address is
//! reserved in etcd for this host (`Store::reserve_address`), `--ip` honoured.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Mutex};

use ipnet::Ipv4Net;

use super::types::{AddressAnswer, PoolAnswer, ReleaseAddress, RequestAddress, RequestPool};
use crate::{
    model::Network,
    store::{Store, ipam},
};

/// The address space this driver offers (Docker shows it; it names nothing else).
pub const ADDRESS_SPACE: &str = "overlay";
/// RequestAddress's option saying the address asked for is the network's gateway.
const REQUEST_TYPE: &str = "RequestAddressType";
const GATEWAY_TYPE: &str = "com.docker.network.gateway";

/// The `--ip-range` of each subnet whose pool was requested, for CreateNetwork.
#[derive(Default)]
pub struct Ranges(Mutex<BTreeMap<Ipv4Net, Ipv4Net>>);

impl Ranges {
    pub fn get(&self, subnet: Ipv4Net) -> Option<Ipv4Net> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&subnet).copied()
    }

    fn set(&self, subnet: Ipv4Net, range: Option<Ipv4Net>) {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match range {
            Some(r) => drop(map.insert(subnet, r)),
            None => drop(map.remove(&subnet)),
        }
    }
}

/// A pool's id: the subnet, and the range after `|`.
pub fn pool_id(subnet: Ipv4Net, range: Option<Ipv4Net>) -> String {
    range.map_or_else(|| subnet.to_string(), |r| format!("{subnet}|{r}"))
}

/// The subnet (and range) of a pool id.
pub fn parse_pool_id(id: &str) -> Result<(Ipv4Net, Option<Ipv4Net>), String> {
    let (subnet, range) = id.split_once('|').map_or((id, None), |(s, r)| (s, Some(r)));
    let subnet = ipam::parse_cidr("pool", subnet).map_err(|e| format!("PoolID {id:?}: {e}"))?;
    let range =
        range.map(|r| ipam::parse_cidr("pool", r)).transpose().map_err(|e| format!("PoolID {id:?}: {e}"))?;
    Ok((subnet, range))
}

/// RequestPool: the subnet given with `--subnet` (required: every host's engine must use the
/// same one), and `--ip-range` inside it.
pub fn request_pool(ranges: &Ranges, req: &RequestPool) -> Result<PoolAnswer, String> {
    if req.v6 {
        return Err("IPv6 is not supported: the overlay carries IPv4 only (leave out --ipv6)".into());
    }
    if req.pool.is_empty() {
        return Err("no --subnet: give the network one, the same on every host".into());
    }
    if let Some(key) = req.options.keys().next() {
        return Err(format!("unknown IPAM option {key:?} (none is understood)"));
    }
    let subnet = ipam::parse_cidr("subnet", &req.pool).map_err(|e| e.to_string())?;
    let range = (!req.sub_pool.is_empty())
        .then(|| ipam::parse_cidr("ip-range", &req.sub_pool))
        .transpose()
        .map_err(|e| e.to_string())?;
    if let Some(r) = range.filter(|r| !subnet.contains(r)) {
        return Err(format!("ip-range {r} is not inside subnet {subnet}"));
    }
    ranges.set(subnet, range);
    Ok(PoolAnswer { pool_id: pool_id(subnet, range), pool: subnet.to_string(), data: BTreeMap::new() })
}

/// What a RequestAddress asks for, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct AddressRequest {
    pub subnet: Ipv4Net,
    pub address: Option<Ipv4Addr>,
    pub gateway: bool,
}

pub fn parse_request_address(req: &RequestAddress) -> Result<AddressRequest, String> {
    let (subnet, _) = parse_pool_id(&req.pool_id)?;
    let address = (!req.address.is_empty())
        .then(|| ipam::parse_addr("address", &req.address))
        .transpose()
        .map_err(|e| e.to_string())?;
    let gateway = req.options.get(REQUEST_TYPE).is_some_and(|t| t == GATEWAY_TYPE);
    Ok(AddressRequest { subnet, address, gateway })
}

/// The overlay network with this subnet, if it exists.
async fn network_of(store: &Store, subnet: Ipv4Net) -> Result<Option<Network>, String> {
    Ok(store.networks().await.map_err(|e| e.to_string())?.into_iter().find(|n| n.subnet == subnet))
}

fn with_len(ip: Ipv4Addr, subnet: Ipv4Net) -> AddressAnswer {
    AddressAnswer { address: format!("{ip}/{}", subnet.prefix_len()), data: BTreeMap::new() }
}

/// RequestAddress: the gateway, an auxiliary address, or a container's address (reserved).
pub async fn request_address(
    store: &Store,
    host: &str,
    req: &RequestAddress,
) -> Result<AddressAnswer, String> {
    let r = parse_request_address(req)?;
    let network = network_of(store, r.subnet).await?;
    match (network, r.gateway, r.address) {
        // The network's own gateway; one given with --gateway must be it.
        (Some(n), true, requested) => {
            if let Some(g) = requested.filter(|g| *g != n.gateway) {
                return Err(format!("overlay network {:?} has gateway {}, not {g}", n.name, n.gateway));
            }
            Ok(with_len(n.gateway, r.subnet))
        }
        // Before the network exists (its create is under way): what was given, or Docker's
        // default gateway. CreateNetwork then checks them.
        (None, true, requested) => {
            Ok(with_len(requested.unwrap_or_else(|| ipam::first_usable(r.subnet)), r.subnet))
        }
        (None, false, Some(aux)) => Ok(with_len(aux, r.subnet)),
        (None, false, None) => {
            Err(format!("no overlay network has subnet {}: create the network first", r.subnet))
        }
        (Some(n), false, Some(ip)) if n.aux_addresses.values().any(|a| *a == ip) => {
            Ok(with_len(ip, r.subnet))
        }
        (Some(n), false, requested) => {
            let (_, ip) = store.reserve_address(&n.id, host, requested).await.map_err(|e| e.to_string())?;
            Ok(with_len(ip, r.subnet))
        }
    }
}

/// ReleaseAddress: gives back a container address this host reserved (the gateway and the
/// auxiliary addresses stay with the network).
pub async fn release_address(store: &Store, host: &str, req: &ReleaseAddress) -> Result<(), String> {
    let (subnet, _) = parse_pool_id(&req.pool_id)?;
    let ip = ipam::parse_addr("address", req.address.split('/').next().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let Some(n) = network_of(store, subnet).await? else { return Ok(()) };
    store.release_reservation(&n.id, host, ip).await.map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(json: &str) -> RequestPool {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn pools_carry_the_subnet_and_range() {
        let ranges = Ranges::default();
        let a = request_pool(&ranges, &pool(r#"{"AddressSpace": "overlay", "Pool": "10.0.9.0/24", "SubPool": "10.0.9.128/25", "Options": {}, "V6": false}"#)).unwrap();
        assert_eq!((a.pool_id.as_str(), a.pool.as_str()), ("10.0.9.0/24|10.0.9.128/25", "10.0.9.0/24"));
        assert_eq!(ranges.get("10.0.9.0/24".parse().unwrap()), Some("10.0.9.128/25".parse().unwrap()));
        assert_eq!(
            parse_pool_id(&a.pool_id).unwrap(),
            ("10.0.9.0/24".parse().unwrap(), Some("10.0.9.128/25".parse().unwrap()))
        );
        // Asked again without a range, the range is forgotten.
        request_pool(&ranges, &pool(r#"{"Pool": "10.0.9.0/24"}"#)).unwrap();
        assert_eq!(ranges.get("10.0.9.0/24".parse().unwrap()), None);
    }

    #[test]
    fn bad_pools_are_refused_with_the_reason() {
        let ranges = Ranges::default();
        for (json, want) in [
            (r#"{"Pool": ""}"#, "no --subnet"),
            (r#"{"Pool": "10.0.9.0/24", "V6": true}"#, "IPv6"),
            (r#"{"Pool": "10.0.9.1/24"}"#, "subnet"),
            (r#"{"Pool": "10.0.9.0/24", "SubPool": "10.0.10.0/25"}"#, "not inside subnet"),
            (r#"{"Pool": "10.0.9.0/24", "Options": {"x": "1"}}"#, "unknown IPAM option \"x\""),
        ] {
            let err = request_pool(&ranges, &pool(json)).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
        assert_eq!(ranges.get("10.0.9.0/24".parse().unwrap()), None);
    }

    #[test]
    fn address_requests_say_what_they_ask_for() {
        let req: RequestAddress = serde_json::from_str(
            r#"{"Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}, "PoolID": "10.0.9.0/24"}"#,
        )
        .unwrap();
        assert_eq!(
            parse_request_address(&req).unwrap(),
            AddressRequest { subnet: "10.0.9.0/24".parse().unwrap(), address: None, gateway: true }
        );
        let req: RequestAddress = serde_json::from_str(
            r#"{"Address": "10.0.9.99", "Options": {"com.docker.network.endpoint.macaddress": "02:42:c0:db:73:ac"}, "PoolID": "10.0.9.0/24|10.0.9.0/25"}"#,
        )
        .unwrap();
        assert_eq!(
            parse_request_address(&req).unwrap(),
            AddressRequest {
                subnet: "10.0.9.0/24".parse().unwrap(),
                address: Some(Ipv4Addr::new(10, 0, 9, 99)),
                gateway: false
            }
        );
        let bad: RequestAddress =
            serde_json::from_str(r#"{"Address": "x", "PoolID": "10.0.9.0/24"}"#).unwrap();
        assert!(parse_request_address(&bad).unwrap_err().contains("address"));
        let bad: RequestAddress = serde_json::from_str(r#"{"PoolID": "fakepool"}"#).unwrap();
        assert!(parse_request_address(&bad).unwrap_err().contains("PoolID \"fakepool\""));
    }
}
