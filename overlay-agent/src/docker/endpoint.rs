//! Docker's endpoint calls: CreateEndpoint, Join, Leave, DeleteEndpoint (and the calls around
//! them that have nothing to do here). A Docker endpoint is an overlay endpoint with Docker's
//! endpoint id, on the address this host's IPAM calls reserved for it.
//!
//! - **CreateEndpoint** checks what Docker asks for (the network is one this plugin made, the
//!   address is this host's reservation, no IPv6, a port map that can be published) and chooses
//!   the MAC (the one derived from the address, as for every overlay endpoint, or
//!   `--mac-address`). Nothing is written yet: Docker names the container's sandbox only at Join.
//! - **Join** writes the endpoint (and, at the sandbox's first endpoint, its container,
//!   `docker-<sandbox id>`), the address passing from the reservation to it
//!   (`Store::join_reserved`); the agent's loop then makes the veth pair in the host's
//!   namespace, as for the CLI, and Join answers once the agent reports it up; the port map
//!   (`-p`) goes on the container as its published ports, in the same transaction, each host
//!   port refused naming its holder if another container has it (`store::ports`), a range or
//!   `-p 80` taking the first free port (of dockerd's default range for the latter). Docker moves the
//!   container side (`ovt<id>`) into the sandbox, names it `ethN` and gives it the address and
//!   the gateway.
//! - **Leave** takes the endpoint back out of the store (the address is the reservation again,
//!   the container goes with its last endpoint) and answers once the interface is gone;
//!   **DeleteEndpoint** does the same if Leave did not happen, and forgets what CreateEndpoint
//!   chose. Both answer success for an endpoint they do not know: dockerd repeats them when it
//!   cleans up after a crash.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, sync::Mutex, time::Duration};

use tokio::time::Instant;
use tracing::info;

use super::{
    network::DockerNetworks,
    types::{
        CreateEndpoint, CreateEndpointAnswer, EndpointRef, InterfaceAnswer, InterfaceName, Join, JoinAnswer,
        ProgramExternalConnectivity,
    },
};
use crate::{
    model::{MacAddr, Network, Proto},
    netlink::veth,
    store::{
        ReservedJoin, Store, ipam,
        ports::{self, ANY_HOST_PORT, PortRequest},
        reservation,
    },
};

/// How long Join waits for the agent to make the interface, and Leave for it to remove it.
const WAIT: Duration = Duration::from_secs(30);
/// Options Docker itself puts in CreateEndpoint's body (the rest are `--driver-opt`s).
const PORT_MAP: &str = "com.docker.network.portmap";
const DOCKER_OPTIONS: [&str; 3] =
    [PORT_MAP, "com.docker.network.endpoint.exposedports", "com.docker.network.endpoint.macaddress"];

/// What CreateEndpoint chose for an endpoint, until its Join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    pub network_id: String,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    /// Docker's port map (`-p`), published at Join.
    pub ports: Vec<PortRequest>,
}

/// The endpoints created and not yet joined or deleted, by Docker's endpoint id. Kept in memory
/// only: an agent restarted between the two calls answers Join with an error, and Docker then
/// deletes the endpoint and releases its address.
#[derive(Default)]
pub struct Created(Mutex<BTreeMap<String, Chosen>>);

impl Created {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Chosen>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Docker's endpoint ids are 64 hex digits; the overlay uses them as they are (in keys, and the
/// first 12 in interface names).
fn check_endpoint_id(id: &str) -> Result<(), String> {
    if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!("EndpointID {id:?} is not 64 hex digits"))
    }
}

/// The overlay network of one of this engine's networks.
async fn overlay_network(
    store: &Store,
    networks: &DockerNetworks,
    docker_id: &str,
) -> Result<Network, String> {
    let id = networks.get(docker_id).ok_or_else(|| {
        format!(
            "network {docker_id:?} was not created through this plugin on this host (is it another host's?)"
        )
    })?;
    store.network(&id).await.map_err(|e| e.to_string())
}

/// The overlay container of a Docker sandbox: `docker-<sandbox id>`, the sandbox id being the
/// last part of SandboxKey (`/var/run/docker/netns/<12 hex digits>`, what `docker inspect`
/// shows as SandboxKey and the start of SandboxID).
pub fn container_name(sandbox_key: &str) -> Result<String, String> {
    let id = sandbox_key.rsplit('/').next().unwrap_or_default();
    if !sandbox_key.starts_with('/') || id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!("SandboxKey {sandbox_key:?} is not a namespace path ending in a sandbox id"));
    }
    Ok(format!("docker-{id}"))
}

/// CreateEndpoint: checks, and chooses the MAC.
pub async fn create(
    store: &Store,
    networks: &DockerNetworks,
    host: &str,
    created: &Created,
    req: &CreateEndpoint,
) -> Result<CreateEndpointAnswer, String> {
    check_endpoint_id(&req.endpoint_id)?;
    if !req.interface.address_ipv6.is_empty() {
        return Err("IPv6 is not supported: the overlay carries IPv4 only".into());
    }
    for key in req.options.keys() {
        if !DOCKER_OPTIONS.contains(&key.as_str()) {
            return Err(format!("unknown endpoint option {key:?} (--driver-opt: none is understood)"));
        }
    }
    let ports = port_map(req.options.get(PORT_MAP))?;
    let network = overlay_network(store, networks, &req.network_id).await?;
    // Checked again at Join, in the transaction; here so that nothing is set up first.
    ports::check_network("port map", &network, &ports).map_err(|e| e.to_string())?;
    let address = req.interface.address.as_str();
    if address.is_empty() {
        return Err(
            "no IPv4 address for the endpoint: create the network with --ipam-driver and --subnet".into()
        );
    }
    let ip = ipam::parse_addr("address", address.split_once('/').map_or(address, |(ip, _)| ip))
        .map_err(|e| e.to_string())?;
    if !network.subnet.contains(&ip) {
        return Err(format!("address {ip} is not in network {:?}'s subnet {}", network.name, network.subnet));
    }
    let given =
        (!req.interface.mac_address.is_empty()).then(|| parse_mac(&req.interface.mac_address)).transpose()?;
    let mac = given.unwrap_or_else(|| MacAddr::from_ip(ip));
    // The reservation is checked again, in the transaction, at Join; checked here too so that a
    // network on Docker's own IPAM fails at once, before the container is set up.
    let held = store.address_holder(&network.id, ip).await.map_err(|e| e.to_string())?;
    if held.as_deref() != Some(reservation::holder(host).as_str()) {
        return Err(format!(
            "address {ip} was not given by this plugin's IPAM driver on host {host:?} ({}): create the Docker network with this plugin as its --ipam-driver",
            held.map_or_else(|| "nothing holds it".to_owned(), |h| format!("held by {h:?}")),
        ));
    }
    created.lock().insert(req.endpoint_id.clone(), Chosen { network_id: network.id.clone(), ip, mac, ports });
    info!(endpoint = %req.endpoint_id, network = %network.name, %ip, %mac, "Docker endpoint created");
    Ok(CreateEndpointAnswer {
        interface: InterfaceAnswer { mac_address: given.is_none().then(|| mac.to_string()) },
    })
}

/// One binding of Docker's port map (libnetwork's `types.PortBinding`).
#[derive(Debug, serde::Deserialize)]
struct Binding {
    #[serde(rename = "Proto")]
    proto: u8,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "HostIP", default)]
    host_ip: Option<String>,
    #[serde(rename = "HostPort", default)]
    host_port: u16,
    #[serde(rename = "HostPortEnd", default)]
    host_port_end: u16,
}

/// Docker's port map as published ports: `-p 8080:80` one host port, `-p 8080-8090:80` the
/// first free of a range, `-p 80` (host port 0) any of dockerd's default range. Bindings to an
/// IPv6 host address are left out (the overlay carries IPv4; dockerd sends `::` beside
/// `0.0.0.0` where the host has IPv6).
fn port_map(value: Option<&serde_json::Value>) -> Result<Vec<PortRequest>, String> {
    let Some(value) = value.filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let bindings: Vec<Binding> = serde_json::from_value(value.clone())
        .map_err(|e| format!("{PORT_MAP} is not a list of port bindings: {e}"))?;
    let mut requests = Vec::new();
    for b in bindings {
        let proto = match b.proto {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            other => {
                return Err(format!(
                    "publishing ports of IP protocol {other} is not supported (tcp and udp are)"
                ));
            }
        };
        let text = b.host_ip.as_deref().unwrap_or_default();
        let Some(host_ip) = ports::host_ip(text)
            .map_err(|_| format!("host address {text:?} of a published port is not an address"))?
        else {
            continue;
        };
        let host_ports = match (b.host_port, b.host_port_end) {
            (0, _) => ANY_HOST_PORT,
            (start, end) if end <= start => start..=start,
            (start, end) => start..=end,
        };
        if b.port == 0 {
            return Err("a published port's container port is 0".into());
        }
        requests.push(PortRequest { proto, host_ip, host_ports, container_port: b.port });
    }
    Ok(requests)
}

/// A MAC as Docker writes it: six hex pairs; a unicast one.
fn parse_mac(text: &str) -> Result<MacAddr, String> {
    let bad = || format!("MAC address {text:?} is not six hex pairs");
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *b = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(format!("MAC address {text} is not a unicast address"));
    }
    Ok(MacAddr(mac))
}

/// Join: writes the endpoint and waits for the agent to make its interface.
pub async fn join(
    store: &Store,
    networks: &DockerNetworks,
    host: &str,
    created: &Created,
    req: &Join,
) -> Result<JoinAnswer, String> {
    check_endpoint_id(&req.endpoint_id)?;
    let container = container_name(&req.sandbox_key)?;
    let network = overlay_network(store, networks, &req.network_id).await?;
    let chosen = created.lock().get(&req.endpoint_id).cloned().ok_or_else(|| {
        format!(
            "endpoint {} was not created through this agent (was the agent restarted since?)",
            req.endpoint_id
        )
    })?;
    if chosen.network_id != network.id {
        return Err(format!("endpoint {} was created on another network", req.endpoint_id));
    }
    let j = ReservedJoin {
        network_id: network.id.clone(),
        endpoint_id: req.endpoint_id.clone(),
        host: host.to_owned(),
        container,
        netns: PathBuf::from(&req.sandbox_key),
        ip: chosen.ip,
        mac: chosen.mac,
        ports: chosen.ports.clone(),
    };
    let ep = store.join_reserved(&j).await.map_err(|e| e.to_string())?;
    if let Err(e) = store.wait_endpoint_ready(&ep, &network.name, Instant::now() + WAIT).await {
        // Docker gives up on the container: leave nothing behind but the reservation, which
        // Docker releases.
        let _ = store.leave_reserved(&network.id, &ep.id).await;
        return Err(e.to_string());
    }
    info!(endpoint = %ep.id, container = %ep.container, network = %network.name, ip = %ep.ipv4, "Docker endpoint joined");
    Ok(JoinAnswer {
        interface_name: InterfaceName { src_name: veth::handover_name(&ep.id), dst_prefix: "eth" },
        gateway: network.gateway.to_string(),
        disable_gateway_service: false,
    })
}

/// Leave (and DeleteEndpoint): takes the endpoint out of the store and waits for its interface
/// to go. An endpoint the store does not have is left already.
pub async fn leave(store: &Store, networks: &DockerNetworks, req: &EndpointRef) -> Result<(), String> {
    check_endpoint_id(&req.endpoint_id)?;
    let Some(network_id) = networks.get(&req.network_id) else { return Ok(()) };
    let Some(ep) = store.leave_reserved(&network_id, &req.endpoint_id).await.map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    let name = store.network(&network_id).await.map_or_else(|_| network_id.clone(), |n| n.name);
    store.wait_endpoint_detached(&ep, &name, Instant::now() + WAIT).await.map_err(|e| e.to_string())?;
    info!(endpoint = %ep.id, container = %ep.container, network = %name, "Docker endpoint left");
    Ok(())
}

/// DeleteEndpoint: Leave if it did not happen, and forget the endpoint.
pub async fn delete(
    store: &Store,
    networks: &DockerNetworks,
    created: &Created,
    req: &EndpointRef,
) -> Result<(), String> {
    leave(store, networks, req).await?;
    created.lock().remove(&req.endpoint_id);
    Ok(())
}

/// ProgramExternalConnectivity: nothing left to program (the port map went on the container at
/// Join, and the agent publishes its ports), but the body is still checked.
pub fn program_external(req: &ProgramExternalConnectivity) -> Result<(), String> {
    check_endpoint_id(&req.endpoint_id)?;
    port_map(req.options.get(PORT_MAP))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_keys_name_containers() {
        assert_eq!(container_name("/var/run/docker/netns/96d83401a8b9").unwrap(), "docker-96d83401a8b9");
        for bad in ["", "/var/run/docker/netns/", "relative/abc", "/x/../..", "/x/a b"] {
            assert!(container_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn macs_parse_and_must_be_unicast() {
        assert_eq!(parse_mac("02:42:0a:37:00:0a").unwrap(), MacAddr([2, 0x42, 10, 0x37, 0, 10]));
        for bad in ["", "02:42:0a:37:00", "02:42:0a:37:00:0a:01", "02:42:0a:37:00:zz", "2:42:0a:37:00:0a"] {
            assert!(parse_mac(bad).unwrap_err().contains("six hex pairs"), "{bad:?}");
        }
        assert!(parse_mac("01:00:5e:00:00:01").unwrap_err().contains("unicast"));
        assert!(parse_mac("00:00:00:00:00:00").unwrap_err().contains("unicast"));
    }

    #[test]
    fn endpoint_ids_are_dockers() {
        assert!(check_endpoint_id(&"a".repeat(64)).is_ok());
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(65), "../../etc/passwd"] {
            assert!(check_endpoint_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn port_maps_become_published_ports() {
        let map = serde_json::json!([
            {"HostIP": "", "HostPort": 8080, "HostPortEnd": 8080, "IP": "", "Port": 80, "Proto": 6},
            {"HostIP": "::", "HostPort": 8080, "HostPortEnd": 8080, "IP": "", "Port": 80, "Proto": 6},
            {"HostIP": "198.18.0.1", "HostPort": 5300, "HostPortEnd": 5310, "IP": "", "Port": 53, "Proto": 17},
            {"HostIP": "0.0.0.0", "HostPort": 0, "HostPortEnd": 0, "IP": "", "Port": 443, "Proto": 6}
        ]);
        let got = port_map(Some(&map)).unwrap();
        assert_eq!(got.len(), 3, "the IPv6 binding is left out: {got:?}");
        assert_eq!(
            (got[0].proto, got[0].host_ip, got[0].host_ports.clone()),
            (Proto::Tcp, None, 8080..=8080)
        );
        assert_eq!(
            (got[1].proto, got[1].host_ip, got[1].host_ports.clone()),
            (Proto::Udp, Some("198.18.0.1".parse().unwrap()), 5300..=5310)
        );
        assert_eq!((got[2].host_ports.clone(), got[2].container_port), (ANY_HOST_PORT, 443));
        assert!(port_map(Some(&serde_json::json!([]))).unwrap().is_empty());
        assert!(port_map(None).unwrap().is_empty());
        for bad in [
            serde_json::json!([{"HostPort": 1, "Port": 2, "Proto": 132}]),
            serde_json::json!([{"HostPort": 1, "Port": 0, "Proto": 6}]),
            serde_json::json!([{"HostIP": "x", "HostPort": 1, "Port": 2, "Proto": 6}]),
            serde_json::json!({"HostPort": 1}),
        ] {
            assert!(port_map(Some(&bad)).is_err(), "{bad}");
        }
        let req: ProgramExternalConnectivity = serde_json::from_str(&format!(
            r#"{{"NetworkID": "n", "EndpointID": "{}", "Options": {{"com.docker.network.portmap": [{{"Port": 80, "Proto": 6, "HostPort": 8080}}]}}}}"#,
            "a".repeat(64)
        ))
        .unwrap();
        assert!(program_external(&req).is_ok());
    }
}
