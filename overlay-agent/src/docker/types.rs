//! The JSON bodies of Docker's remote network driver API (libnetwork's `remote/api`), as
//! dockerd 20.10 sends and expects them (../shared/runtimes/docker-plugin-transcript.txt).
//! Field names are Docker's; fields Docker may leave out default to empty.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The media type of every answer (pkg/plugins: `application/vnd.docker.plugins.v1.2+json`).
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// `/Plugin.Activate`'s answer: which APIs this plugin serves.
#[derive(Debug, Serialize)]
pub struct Activate {
    #[serde(rename = "Implements")]
    pub implements: Vec<&'static str>,
}

/// `/NetworkDriver.GetCapabilities`'s answer.
#[derive(Debug, Serialize)]
pub struct Capabilities {
    /// "local": each engine keeps its own record of the network (no swarm or cluster store
    /// needed); the agent makes the networks of several engines one in etcd.
    #[serde(rename = "Scope")]
    pub scope: &'static str,
}

/// One address pool of a network (libnetwork's IPAMData).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct IpamData {
    #[serde(rename = "AddressSpace", default)]
    pub address_space: String,
    /// CIDR, e.g. "10.0.9.0/24".
    #[serde(rename = "Pool")]
    pub pool: String,
    /// The gateway with the pool's prefix length, e.g. "10.0.9.1/24".
    #[serde(rename = "Gateway", default)]
    pub gateway: String,
    /// `--aux-address name=ip`, each as "ip/len".
    #[serde(rename = "AuxAddresses", default)]
    pub aux_addresses: BTreeMap<String, String>,
}

/// `/NetworkDriver.CreateNetwork`.
#[derive(Debug, Deserialize)]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Docker's generic options: `com.docker.network.generic` holds the `-o key=value` pairs,
    /// `com.docker.network.enable_ipv6` and `com.docker.network.internal` are booleans.
    #[serde(rename = "Options", default)]
    pub options: BTreeMap<String, serde_json::Value>,
    #[serde(rename = "IPv4Data", default)]
    pub ipv4_data: Vec<IpamData>,
    #[serde(rename = "IPv6Data", default)]
    pub ipv6_data: Vec<IpamData>,
}

/// `/NetworkDriver.DeleteNetwork`.
#[derive(Debug, Deserialize)]
pub struct DeleteNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

/// Every failure, in the shape Docker reads: `{"Err": "..."}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    #[serde(rename = "Err")]
    pub err: String,
}

/// The answer to a call that returns nothing.
#[derive(Debug, Serialize)]
pub struct Empty {}
