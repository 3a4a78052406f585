//! The store: the desired state (and what hosts report of it) kept in etcd, shared by every
//! agent and every CLI. docs/store.md describes the key layout and how each invariant is held.
//!
//! - `keys`: the key layout.
//! - `config`: how to reach etcd (endpoints, TLS, prefix), also as clap arguments.
//! - `etcd`: the thin layer over the etcd client: reads at one revision, guarded transactions.
//! - `ipam`: the pure address arithmetic (pools, reserved addresses, CIDR checks).
//! - `network`, `endpoint`, `container`, `host`: the operations on each kind of object; every
//!   write is one transaction whose compares re-check what the write was decided on.
//! - `load`: the whole desired state, read at one revision.
//! - `status`: what agents report (the values of the status keys) and the CLI's waits on it.
//!
//! The agent's side of etcd (following the state, publishing its reports, keeping its host's
//! lease) is in `source`, which uses this module; nothing here knows of it.

/// The endpoints a CNI runtime asks for, named by its container id and interface name.
pub mod cni;
pub mod config;
pub mod container;
pub mod endpoint;
pub(crate) mod etcd;
pub mod host;
pub mod ipam;
pub mod keys;
pub(crate) mod load;
pub mod network;
/// Published ports: one container at a time holds a host's port.
pub mod ports;
/// Addresses held before their endpoint exists (Docker's IPAM driver API asks first).
pub mod reservation;
pub mod service;
pub mod status;

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

pub use config::{EtcdArgs, StoreConfig};
pub use container::{ContainerSpec, CreatedContainer};
/// The client crate, for callers (tests, tools) that need raw etcd operations.
pub use etcd_client;
pub use keys::Keys;
pub use network::NetworkSpec;
pub use reservation::ReservedJoin;
pub use status::{ContainerStatus, EndpointStatus, PortsStatus, WithheldPort};

use self::ipam::IpamError;

/// The store: a connection to etcd and the key layout under one prefix. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: etcd_client::Client,
    keys: Keys,
    /// Most time one request may take; a request to an unreachable etcd otherwise waits for
    /// a connection forever.
    timeout: Duration,
    /// The endpoints, for error messages.
    endpoints: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // Causes are part of the message (and not a `source`), so that every printer shows them
    // once: the agent's log lines print only the message, the CLI prints the whole chain.
    #[error("etcd ({endpoints}): {op}: {}", describe(.error))]
    Etcd { op: String, endpoints: String, error: etcd_client::Error },
    #[error("etcd ({endpoints}): {op}: no answer within {after:?} (is etcd running and reachable?)")]
    Unreachable { op: String, endpoints: String, after: Duration },
    #[error("reading {path}: {error}")]
    Tls { path: String, error: std::io::Error },
    #[error("{0}")]
    Config(String),
    /// A task of the store's own failed (it panicked): a bug, not bad input.
    #[error("{op}: {error}")]
    Task { op: &'static str, error: String },
    #[error("{key}: the stored value does not parse: {error}")]
    Corrupt { key: String, error: serde_json::Error },
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid { what: &'static str, value: String, reason: String },
    /// Addressing refused while creating a network.
    #[error(transparent)]
    Addressing(#[from] IpamError),
    /// An address refused in an existing network.
    #[error("network {network:?}: {error}")]
    Address { network: String, error: IpamError },
    #[error("address {ip} is already in use in network {network:?} (by container {container:?})")]
    AddressInUse { ip: Ipv4Addr, network: String, container: String },
    #[error("driver {driver:?} is not supported (only \"overlay\")")]
    UnsupportedDriver { driver: String },
    #[error("network with name {name:?} already exists")]
    NetworkExists { name: String },
    #[error("subnet {subnet} overlaps network {network:?} ({other})")]
    SubnetOverlap { subnet: ipnet::Ipv4Net, network: String, other: ipnet::Ipv4Net },
    #[error(
        "MTU {mtu} is more than host {host:?} can carry: its uplink's MTU {uplink} leaves {limit} once {tunnel} adds its {overhead} bytes"
    )]
    MtuTooLarge { mtu: u32, host: String, uplink: u32, limit: u32, tunnel: &'static str, overhead: u32 },
    #[error("VNI {vni} is already used by network {network:?}")]
    VniTaken { vni: u32, network: String },
    #[error("no free VNI left")]
    VnisExhausted,
    #[error("no free subnet left in {pool}; give one with --subnet", pool = ipam::DEFAULT_POOL)]
    NoDefaultSubnet,
    #[error("network {0:?} not found")]
    NetworkNotFound(String),
    #[error("network {query:?} is ambiguous: it matches {matches}")]
    AmbiguousNetwork { query: String, matches: String },
    #[error("network {network:?} has active endpoints ({containers})", containers = .containers.join(", "))]
    NetworkInUse { network: String, containers: Vec<String> },
    #[error("container {0:?} not found")]
    ContainerNotFound(String),
    #[error("container {name:?} already exists (on host {host:?})")]
    ContainerExists { name: String, host: String },
    #[error("host {0:?} is not registered (no agent has ever registered it, or it was removed)")]
    HostNotRegistered(String),
    #[error("host {host:?} is served by {holder}, which is alive; {}", if *.vtep_change { "a live host's VTEP cannot change: stop that agent and let its liveness lease run out first" } else { "stop that agent first (one agent per host)" })]
    HostHeld { host: String, holder: String, vtep_change: bool },
    #[error(
        "host {host:?} is alive (served by {holder}); stop its agent and wait for its liveness lease to run out before removing it"
    )]
    HostAlive { host: String, holder: String },
    #[error("name {name:?} on network {network:?} is taken by {holder}")]
    NameTaken { name: String, network: String, holder: String },
    #[error(
        "service {name:?} is not published on network {network:?} (overlay service publish {name}.{network})"
    )]
    ServiceNotFound { name: String, network: String },
    #[error("service {name:?} is already published on network {network:?}")]
    ServiceExists { name: String, network: String },
    #[error("service {name:?} on network {network:?} has backends ({backends}): detach them first (overlay service detach CONTAINER {name}.{network})", backends = .backends.join(", "))]
    ServiceInUse { name: String, network: String, backends: Vec<String> },
    #[error("port {port}/{proto} is already published on host {host:?} by container {holder:?}")]
    PortTaken { port: u16, proto: &'static str, host: String, holder: String },
    #[error("container {container:?} is already connected to network {network:?}")]
    AlreadyConnected { container: String, network: String },
    #[error("container {container:?} is not connected to network {network:?}")]
    NotConnected { container: String, network: String },
    #[error("{op}: gave up after {attempts} attempts that each lost a race with a concurrent change")]
    Contended { op: &'static str, attempts: u32 },
    #[error("timed out after {after:?} waiting for {what}")]
    WaitTimeout { what: String, after: Duration },
    /// A host's agent reported that it cannot make something real (it keeps trying).
    #[error("host {host:?} cannot {what}: {error}")]
    HostCannot { host: String, what: String, error: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl Store {
    pub async fn connect(cfg: &StoreConfig) -> Result<Self> {
        let endpoints = cfg.endpoints.join(",");
        let options = cfg.connect_options()?;
        let client = etcd_client::Client::connect(&cfg.endpoints, Some(options)).await.map_err(|error| {
            StoreError::Etcd { op: "connect".into(), endpoints: endpoints.clone(), error }
        })?;
        Ok(Self { client, keys: Keys::new(&cfg.prefix), timeout: cfg.request_timeout, endpoints })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The etcd client, for operations the store does not wrap.
    pub fn client(&self) -> etcd_client::Client {
        self.client.clone()
    }

    pub fn etcd_endpoints(&self) -> &str {
        &self.endpoints
    }
}

/// An etcd client error in a line: gRPC's code and message and the innermost cause, without
/// the nested debug output of the client's own `Display`.
fn describe(error: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = error else { return error.to_string() };
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if status.message().contains("too many operations in txn request") {
        // The one change that must be atomic is larger than etcd's --max-txn-ops allows.
        text.push_str(
            " (the change is more writes than this etcd takes in one transaction: its --max-txn-ops)",
        );
    }
    let mut cause = std::error::Error::source(status);
    let mut innermost = None;
    while let Some(c) = cause {
        innermost = Some(c);
        cause = c.source();
    }
    if let Some(c) = innermost {
        let _ = write!(text, " ({c})");
    }
    text
}

/// Validates a name of a network, container or host: Docker's rule, which also keeps names
/// usable as one component of an etcd key and of a namespace path.
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    let invalid =
        |reason: &str| StoreError::Invalid { what, value: name.to_owned(), reason: reason.to_owned() };
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(invalid("must not be empty")),
        Some(c) if !c.is_ascii_alphanumeric() => return Err(invalid("must start with a letter or digit")),
        Some(_) => {}
    }
    if chars.any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(invalid("only letters, digits, '_', '.' and '-' are allowed"));
    }
    if name.len() > 128 {
        return Err(invalid("longer than 128 characters"));
    }
    Ok(())
}

/// A random 64-hex-digit id, like Docker's network and endpoint ids.
pub fn new_id() -> String {
    random_bytes::<32>().iter().fold(String::with_capacity(64), |mut id, b| {
        let _ = write!(id, "{b:02x}");
        id
    })
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    buf
}

/// Now, as RFC 3339 with nanoseconds in UTC (Docker's `Created`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dockers_rule() {
        for ok in ["blue", "my-net", "a.b_c-1", "0net"] {
            check_name("network name", ok).unwrap();
        }
        for bad in ["", "-x", "a/b", "a b", "é", ".hidden"] {
            assert!(check_name("network name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_64_hex_digits_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
