//! The JSON bodies of Docker's remote network driver API (libnetwork's `remote/api`), as
//! dockerd 20.10 sends and expects them (../shared/runtimes/docker-plugin-transcript.txt).
//! Field names are Docker's; fields Docker may leave out default to empty.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The media type of every answer (pkg/plugins: `application/vnd.docker.plugins.v1.2+json`).
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// A field Docker sends as `null` when it has nothing (Go's nil map, as in the RequestAddress
/// of an `--aux-address`), read as empty.
fn null_as_empty<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

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
    #[serde(rename = "AuxAddresses", default, deserialize_with = "null_as_empty")]
    pub aux_addresses: BTreeMap<String, String>,
}

/// `/NetworkDriver.CreateNetwork`.
#[derive(Debug, Deserialize)]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Docker's generic options: `com.docker.network.generic` holds the `-o key=value` pairs,
    /// `com.docker.network.enable_ipv6` and `com.docker.network.internal` are booleans.
    #[serde(rename = "Options", default, deserialize_with = "null_as_empty")]
    pub options: BTreeMap<String, serde_json::Value>,
    #[serde(rename = "IPv4Data", default, deserialize_with = "null_as_empty")]
    pub ipv4_data: Vec<IpamData>,
    #[serde(rename = "IPv6Data", default, deserialize_with = "null_as_empty")]
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

/// `/IpamDriver.GetCapabilities`'s answer.
#[derive(Debug, Serialize)]
pub struct IpamCapabilities {
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    #[serde(rename = "RequiresRequestReplay")]
    pub requires_request_replay: bool,
}

/// `/IpamDriver.GetDefaultAddressSpaces`'s answer.
#[derive(Debug, Serialize)]
pub struct AddressSpaces {
    #[serde(rename = "LocalDefaultAddressSpace")]
    pub local: &'static str,
    #[serde(rename = "GlobalDefaultAddressSpace")]
    pub global: &'static str,
}

/// `/IpamDriver.RequestPool`: `--subnet` as Pool, `--ip-range` as SubPool, `--ipam-opt` as
/// Options.
#[derive(Debug, Deserialize)]
pub struct RequestPool {
    #[serde(rename = "AddressSpace", default)]
    pub address_space: String,
    #[serde(rename = "Pool", default)]
    pub pool: String,
    #[serde(rename = "SubPool", default)]
    pub sub_pool: String,
    #[serde(rename = "Options", default, deserialize_with = "null_as_empty")]
    pub options: BTreeMap<String, String>,
    #[serde(rename = "V6", default)]
    pub v6: bool,
}

/// RequestPool's answer.
#[derive(Debug, Serialize)]
pub struct PoolAnswer {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Pool")]
    pub pool: String,
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

/// `/IpamDriver.ReleasePool`.
#[derive(Debug, Deserialize)]
pub struct ReleasePool {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

/// `/IpamDriver.RequestAddress`: Address is `--ip`, `--gateway` or an `--aux-address` (or
/// empty); Options say which (`RequestAddressType: com.docker.network.gateway`) or carry the
/// container's MAC.
#[derive(Debug, Deserialize)]
pub struct RequestAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "Options", default, deserialize_with = "null_as_empty")]
    pub options: BTreeMap<String, String>,
}

/// RequestAddress's answer: the address with the pool's prefix length.
#[derive(Debug, Serialize)]
pub struct AddressAnswer {
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

/// `/IpamDriver.ReleaseAddress`.
#[derive(Debug, Deserialize)]
pub struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address")]
    pub address: String,
}

/// The interface Docker gives CreateEndpoint: the address its IPAM driver answered ("ip/len"),
/// and the MAC of `--mac-address` (empty without).
#[derive(Debug, Default, Deserialize)]
pub struct EndpointInterface {
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "AddressIPv6", default)]
    pub address_ipv6: String,
    #[serde(rename = "MacAddress", default)]
    pub mac_address: String,
}

/// `/NetworkDriver.CreateEndpoint`.
#[derive(Debug, Deserialize)]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "Interface", default, deserialize_with = "null_as_empty")]
    pub interface: EndpointInterface,
    /// `--driver-opt`s, and Docker's exposed ports and port map.
    #[serde(rename = "Options", default, deserialize_with = "null_as_empty")]
    pub options: BTreeMap<String, serde_json::Value>,
}

/// CreateEndpoint's answer: the MAC chosen, only when Docker gave none (dockerd refuses an
/// answer that sets one it gave).
#[derive(Debug, Serialize)]
pub struct CreateEndpointAnswer {
    #[serde(rename = "Interface")]
    pub interface: InterfaceAnswer,
}

#[derive(Debug, Serialize)]
pub struct InterfaceAnswer {
    #[serde(rename = "MacAddress", skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
}

/// The calls that name only an endpoint: DeleteEndpoint, Leave, EndpointOperInfo,
/// RevokeExternalConnectivity.
#[derive(Debug, Deserialize)]
pub struct EndpointRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

/// `/NetworkDriver.Join`: the endpoint goes into the sandbox at SandboxKey (a namespace path in
/// dockerd's view).
#[derive(Debug, Deserialize)]
pub struct Join {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "SandboxKey")]
    pub sandbox_key: String,
    #[serde(rename = "Options", default, deserialize_with = "null_as_empty")]
    pub options: BTreeMap<String, serde_json::Value>,
}

/// Join's answer: the interface Docker moves into the sandbox (renamed `<DstPrefix>N`), and the
/// default gateway Docker sets there.
#[derive(Debug, Serialize)]
pub struct JoinAnswer {
    #[serde(rename = "InterfaceName")]
    pub interface_name: InterfaceName,
    #[serde(rename = "Gateway")]
    pub gateway: String,
    #[serde(rename = "DisableGatewayService")]
    pub disable_gateway_service: bool,
}

#[derive(Debug, Serialize)]
pub struct InterfaceName {
    #[serde(rename = "SrcName")]
    pub src_name: String,
    #[serde(rename = "DstPrefix")]
    pub dst_prefix: &'static str,
}

/// `/NetworkDriver.ProgramExternalConnectivity`: the port map of `-p`.
#[derive(Debug, Deserialize)]
pub struct ProgramExternalConnectivity {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "Options", default, deserialize_with = "null_as_empty")]
    pub options: BTreeMap<String, serde_json::Value>,
}

/// EndpointOperInfo's answer: what `docker inspect` may show of the endpoint.
#[derive(Debug, Serialize)]
pub struct OperInfo {
    #[serde(rename = "Value")]
    pub value: BTreeMap<String, String>,
}
