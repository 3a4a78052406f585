//! What `overlay-cni` sends the agent (the runtime's CNI_* variables and its netconf, as given),
//! the netconf fields the agent reads, and the CNI result and error it answers (CNI spec 1.1,
//! "Result" and "Error"). Netconf fields not named here are ignored, as the spec asks.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::model::{Endpoint, Network};

/// The CNI versions whose netconf and result the agent speaks. 0.3.x and 0.4.0 results differ
/// from 1.x only in `ips[].version`; CHECK exists from 0.4.0, STATUS and GC from 1.1.0.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// One plugin invocation, as the plugin forwards it: the environment the runtime set and the
/// netconf the runtime wrote on stdin, untouched.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Request {
    /// CNI_COMMAND: ADD, DEL, CHECK, STATUS, GC (VERSION is answered by the plugin itself).
    pub command: String,
    /// CNI_CONTAINERID.
    #[serde(default)]
    pub container_id: String,
    /// CNI_NETNS (empty on a DEL after the namespace is gone).
    #[serde(default)]
    pub netns: String,
    /// CNI_IFNAME.
    #[serde(default)]
    pub ifname: String,
    /// CNI_ARGS: `K=V;K=V`.
    #[serde(default)]
    pub args: String,
    /// The netconf, as a JSON value (parsed here, so a bad one is answered in CNI's shape).
    pub config: serde_json::Value,
}

/// The netconf fields the agent reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// The network's name in the runtime; also the overlay network's unless `network` says.
    #[serde(default)]
    pub name: String,
    /// The overlay network (name or id); it must exist (`overlay network create`).
    #[serde(default)]
    pub network: Option<String>,
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: RuntimeConfig,
    /// GC (1.1): the attachments the runtime still has; every other is removed.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<serde_json::Value>,
}

impl NetConf {
    /// The overlay network the netconf names.
    pub fn network(&self) -> &str {
        self.network.as_deref().unwrap_or(&self.name)
    }
}

/// `runtimeConfig`: what the runtime fills in for the capabilities the netconf declares.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RuntimeConfig {
    #[serde(rename = "portMappings", default)]
    pub port_mappings: Vec<PortMapping>,
}

/// One `portMappings` entry. Runtimes spell the keys differently: podman (and the CNI
/// convention) `hostPort`, containerd's CRI `HostPort` (../shared/runtimes/cni-transcript.txt);
/// both are read.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort", alias = "HostPort", default)]
    pub host_port: u16,
    #[serde(rename = "containerPort", alias = "ContainerPort", default)]
    pub container_port: u16,
    #[serde(rename = "protocol", alias = "Protocol", default)]
    pub protocol: String,
    #[serde(rename = "hostIP", alias = "HostIP", alias = "hostIp", default)]
    pub host_ip: String,
}

/// A GC entry: an attachment the runtime still has.
#[derive(Clone, Debug, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// CNI's error codes (spec: "Error"); 100 and up are the plugin's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidNetworkConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot take ADDs now.
    NotAvailable = 50,
}

/// A CNI error: what the plugin prints on stdout, exiting non-zero.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self { cni_version: String::new(), code: code as u32, msg: msg.into(), details: String::new() }
    }

    pub fn code(&self) -> u32 {
        self.code
    }
}

/// The result of an ADD (spec: "Success"), for a `cni_version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<Ip>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The namespace the interface is in (the container's).
    pub sandbox: String,
    /// 1.1 only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ip {
    /// Before 1.0: "4".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    /// CIDR: the address with the network's prefix length.
    pub address: String,
    pub gateway: Ipv4Addr,
    /// Index into `interfaces`.
    pub interface: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    pub dst: &'static str,
    pub gw: Ipv4Addr,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Dns {
    /// The network's gateway, where the overlay answers names (docs/names.md).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<Ipv4Addr>,
}

/// Whether `version` is one of ours.
pub fn supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// Whether `version` is at least `major.minor`.
pub fn at_least(version: &str, major: u32, minor: u32) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

impl CniResult {
    /// The result of endpoint `ep` of `network`, whose interface is `ifname` in `netns`.
    pub fn of(version: &str, network: &Network, ep: &Endpoint, netns: &str, mtu: Option<u32>) -> Self {
        let pre_1 = !at_least(version, 1, 0);
        let ifname = ep.ifname.clone().unwrap_or_default();
        Self {
            cni_version: version.to_owned(),
            interfaces: vec![Interface {
                name: ifname,
                mac: ep.mac.to_string(),
                sandbox: netns.to_owned(),
                mtu: mtu.filter(|_| at_least(version, 1, 1)),
            }],
            ips: vec![Ip {
                version: pre_1.then_some("4"),
                address: format!("{}/{}", ep.ipv4, network.subnet.prefix_len()),
                gateway: network.gateway,
                interface: 0,
            }],
            routes: vec![Route { dst: "0.0.0.0/0", gw: network.gateway }],
            dns: Dns { nameservers: vec![network.gateway] },
        }
    }
}

/// CNI_ARGS (`K=V;K=V`) as a map; an entry without `=` is ignored.
pub fn parse_args(args: &str) -> BTreeMap<&str, &str> {
    args.split(';').filter_map(|kv| kv.split_once('=')).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_of_port_mappings_are_read() {
        // podman's and containerd's, as recorded in ../shared/runtimes/cni-transcript.txt.
        let podman: RuntimeConfig = serde_json::from_str(
            r#"{"portMappings":[{"containerPort":80,"hostPort":18081,"protocol":"tcp"}]}"#,
        )
        .unwrap();
        let containerd: RuntimeConfig = serde_json::from_str(
            r#"{"io.kubernetes.cri.pod-annotations":{"a":"b"},"portMappings":[{"HostPort":18082,"ContainerPort":80,"Protocol":"tcp","HostIP":""}]}"#,
        )
        .unwrap();
        for (rc, host) in [(podman, 18081), (containerd, 18082)] {
            let p = &rc.port_mappings[0];
            assert_eq!((p.host_port, p.container_port, p.protocol.as_str()), (host, 80, "tcp"));
        }
    }

    #[test]
    fn unknown_netconf_fields_are_ignored() {
        let conf: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"web","type":"overlay-cni","future":{"x":1},"capabilities":{"portMappings":true},"ipam":{}}"#,
        )
        .unwrap();
        assert_eq!((conf.cni_version.as_str(), conf.network()), ("1.0.0", "web"));
    }

    #[test]
    fn versions() {
        assert!(supported("1.0.0") && supported("0.4.0") && supported("1.1.0"));
        assert!(!supported("2.0.0") && !supported("0.2.0") && !supported(""));
        assert!(at_least("1.1.0", 1, 1) && at_least("1.0.0", 0, 4) && !at_least("0.3.1", 0, 4));
    }

    #[test]
    fn args_parse() {
        let a = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1;junk");
        assert_eq!(a.get("K8S_POD_NAME"), Some(&"p1"));
        assert_eq!(a.get("K8S_POD_NAMESPACE"), Some(&"default"));
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn results_per_version() {
        let net = Network::new("n", "net", 4096, "10.0.9.0/24".parse().unwrap(), "10.0.9.1".parse().unwrap());
        let mut ep = Endpoint::new(&"a".repeat(64), "n", "web", "h1", "10.0.9.2".parse().unwrap());
        ep.ifname = Some("eth0".into());
        let r = serde_json::to_value(CniResult::of("1.0.0", &net, &ep, "/run/netns/x", Some(1450))).unwrap();
        assert_eq!(
            r,
            serde_json::json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "mac": "02:42:0a:00:09:02", "sandbox": "/run/netns/x"}],
                "ips": [{"address": "10.0.9.2/24", "gateway": "10.0.9.1", "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.9.1"}],
                "dns": {"nameservers": ["10.0.9.1"]},
            })
        );
        let old = serde_json::to_value(CniResult::of("0.4.0", &net, &ep, "/run/netns/x", None)).unwrap();
        assert_eq!(old["ips"][0]["version"], "4");
        let new =
            serde_json::to_value(CniResult::of("1.1.0", &net, &ep, "/run/netns/x", Some(1450))).unwrap();
        assert_eq!(new["interfaces"][0]["mtu"], 1450);
    }
}
