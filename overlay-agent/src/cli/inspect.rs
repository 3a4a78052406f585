//! `network inspect`'s and `container inspect`'s JSON, shaped like `docker network inspect`'s
//! and `docker inspect`'s so that tools and people used to Docker read them as they would
//! Docker's.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    model::{Container, Endpoint, Host, Network, State},
    store::{PortsStatus, network::OPTION_VNI},
};

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkInspect {
    pub name: String,
    pub id: String,
    pub created: String,
    pub scope: &'static str,
    pub driver: String,
    #[serde(rename = "EnableIPv6")]
    pub enable_ipv6: bool,
    #[serde(rename = "IPAM")]
    pub ipam: Ipam,
    pub internal: bool,
    /// Every container may be connected to any network: they are all attachable in Docker's sense.
    pub attachable: bool,
    pub ingress: bool,
    pub config_from: ConfigFrom,
    pub config_only: bool,
    /// By endpoint id (there are no container ids here).
    pub containers: BTreeMap<String, ContainerEntry>,
    pub options: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// The hosts with endpoints on the network, as Docker's overlay networks list their peers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<Peer>,
}

/// `container inspect`: a container with Docker's `NetworkSettings.Networks`, by network name.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerInspect {
    pub name: String,
    pub host: String,
    pub created: String,
    pub network_settings: NetworkSettings,
    /// Published ports its host leaves out, and the host's server that holds each (not
    /// Docker's: its `-p` fails where a server listens; here the container runs, and this says
    /// why the port does not answer).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports_withheld: Vec<PortWithheld>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortWithheld {
    pub port: String,
    pub server: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkSettings {
    /// The namespace of a container from another runtime (`--netns`, Docker's sandbox); empty
    /// for one the agent made (its path is the host's: `container exec` finds it).
    pub sandbox_key: String,
    pub networks: BTreeMap<String, EndpointSettings>,
    /// Published ports, as Docker shows them: "80/tcp" -> [{HostIp, HostPort}].
    pub ports: BTreeMap<String, Vec<PortBinding>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortBinding {
    pub host_ip: String,
    pub host_port: String,
}

/// One network of a container, as Docker shows it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointSettings {
    pub aliases: Vec<String>,
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub gateway: String,
    #[serde(rename = "IPAddress")]
    pub ip_address: String,
    #[serde(rename = "IPPrefixLen")]
    pub ip_prefix_len: u8,
    pub mac_address: String,
    /// The services it is a backend of (not Docker's: its names that are services).
    pub services: Vec<String>,
    /// Every name it answers to on the network: its own, its aliases, its services.
    #[serde(rename = "DNSNames")]
    pub dns_names: Vec<String>,
}

impl ContainerInspect {
    /// `withheld`: the container's ports status, if any (`store::PortsStatus`); one written by
    /// another host than the container's is about an earlier container of that name.
    pub fn new(c: &Container, state: &State, withheld: Option<&PortsStatus>) -> Self {
        let mut networks = BTreeMap::new();
        for e in state.endpoints.values().filter(|e| e.container == c.name) {
            let Some(n) = state.networks.get(&e.network_id) else { continue };
            let mut dns_names = vec![c.name.clone()];
            dns_names.extend(e.aliases.iter().cloned());
            dns_names.extend(e.services.iter().cloned());
            networks.insert(
                n.name.clone(),
                EndpointSettings {
                    aliases: e.aliases.clone(),
                    network_id: n.id.clone(),
                    endpoint_id: e.id.clone(),
                    gateway: n.gateway.to_string(),
                    ip_address: e.ipv4.to_string(),
                    ip_prefix_len: n.subnet.prefix_len(),
                    mac_address: e.mac.to_string(),
                    services: e.services.clone(),
                    dns_names,
                },
            );
        }
        Self {
            name: c.name.clone(),
            host: c.host.clone(),
            created: c.created.clone(),
            network_settings: NetworkSettings {
                sandbox_key: c.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                networks,
                ports: c.ports.iter().fold(BTreeMap::new(), |mut ports, p| {
                    ports
                        .entry(format!("{}/{}", p.container_port, p.proto.as_str()))
                        .or_insert_with(Vec::new)
                        .push(PortBinding {
                            host_ip: p.host_ip.map_or_else(|| "0.0.0.0".to_owned(), |ip| ip.to_string()),
                            host_port: p.host_port.to_string(),
                        });
                    ports
                }),
            },
            ports_withheld: withheld
                .filter(|s| s.host == c.host)
                .map(|s| {
                    s.withheld
                        .iter()
                        .map(|w| PortWithheld { port: w.port.clone(), server: w.server.clone() })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Ipam {
    pub driver: &'static str,
    pub options: BTreeMap<String, String>,
    pub config: Vec<IpamConfig>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamConfig {
    pub subnet: String,
    #[serde(rename = "IPRange", skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<String>,
    pub gateway: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub auxiliary_addresses: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ConfigFrom {
    pub network: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerEntry {
    pub name: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub mac_address: String,
    #[serde(rename = "IPv4Address")]
    pub ipv4_address: String,
    #[serde(rename = "IPv6Address")]
    pub ipv6_address: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Peer {
    pub name: String,
    #[serde(rename = "IP")]
    pub ip: String,
}

impl NetworkInspect {
    pub fn new(n: &Network, endpoints: &[Endpoint], hosts: &[Host]) -> Self {
        let containers = endpoints
            .iter()
            .map(|e| {
                let entry = ContainerEntry {
                    name: e.container.clone(),
                    endpoint_id: e.id.clone(),
                    mac_address: e.mac.to_string(),
                    ipv4_address: format!("{}/{}", e.ipv4, n.subnet.prefix_len()),
                    ipv6_address: String::new(),
                };
                (e.id.clone(), entry)
            })
            .collect();
        let mut options = n.options.clone();
        options.insert(OPTION_VNI.to_owned(), n.vni.to_string());
        let mut peer_names: Vec<&str> = endpoints.iter().map(|e| e.host.as_str()).collect();
        peer_names.sort_unstable();
        peer_names.dedup();
        let peers = peer_names
            .into_iter()
            .map(|name| Peer {
                name: name.to_owned(),
                ip: hosts.iter().find(|h| h.name == name).map(|h| h.vtep.to_string()).unwrap_or_default(),
            })
            .collect();
        Self {
            name: n.name.clone(),
            id: n.id.clone(),
            created: n.created.clone(),
            scope: "global",
            driver: n.driver.clone(),
            enable_ipv6: false,
            ipam: Ipam {
                driver: "default",
                options: BTreeMap::new(),
                config: vec![IpamConfig {
                    subnet: n.subnet.to_string(),
                    ip_range: n.ip_range.map(|r| r.to_string()),
                    gateway: n.gateway.to_string(),
                    auxiliary_addresses: n
                        .aux_addresses
                        .iter()
                        .map(|(k, v)| (k.clone(), v.to_string()))
                        .collect(),
                }],
            },
            internal: n.internal,
            attachable: true,
            ingress: false,
            config_from: ConfigFrom { network: String::new() },
            config_only: false,
            containers,
            options,
            labels: n.labels.clone(),
            peers,
        }
    }
}

/// JSON indented by four spaces, as Docker prints it.
pub fn to_json<T: Serialize>(value: &T) -> String {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    value.serialize(&mut ser).expect("serializes");
    String::from_utf8(out).expect("JSON is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MacAddr;

    #[test]
    fn inspect_has_dockers_shape() {
        let n = Network {
            id: "a".repeat(64),
            name: "blue".into(),
            driver: "overlay".into(),
            vni: 4096,
            subnet: "10.0.9.0/24".parse().unwrap(),
            gateway: "10.0.9.1".parse().unwrap(),
            ip_range: None,
            aux_addresses: BTreeMap::new(),
            mtu: None,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
            created: "2024-01-01T00:00:00.000000000Z".into(),
            internal: false,
            encrypted: false,
        };
        let ip = "10.0.9.2".parse().unwrap();
        let e = Endpoint {
            id: "e".repeat(64),
            network_id: n.id.clone(),
            container: "web".into(),
            ipv4: ip,
            mac: MacAddr::from_ip(ip),
            host: "h1".into(),
            aliases: Vec::new(),
            services: Vec::new(),
            ifname: None,
        };
        let h = Host::new("h1", "198.18.0.1".parse().unwrap());
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&[NetworkInspect::new(&n, &[e], &[h])])).unwrap();
        let n0 = &v[0];
        assert_eq!(n0["Name"], "blue");
        assert_eq!(n0["Scope"], "global");
        assert_eq!(n0["IPAM"]["Config"][0]["Subnet"], "10.0.9.0/24");
        assert_eq!(n0["IPAM"]["Config"][0]["Gateway"], "10.0.9.1");
        assert!(n0["IPAM"]["Config"][0].get("IPRange").is_none());
        let c = &n0["Containers"]["e".repeat(64)];
        assert_eq!(c["Name"], "web");
        assert_eq!(c["IPv4Address"], "10.0.9.2/24");
        assert_eq!(c["MacAddress"], "02:42:0a:00:09:02");
        assert_eq!(n0["Options"]["com.docker.network.driver.overlay.vxlanid_list"], "4096");
        assert_eq!(n0["Peers"][0]["IP"], "198.18.0.1");
        let text = to_json(&[NetworkInspect::new(&n, &[], &[])]);
        assert!(text.starts_with("[\n    {\n        \"Name\": \"blue\",\n        \"Id\""), "{text}");
    }
}
