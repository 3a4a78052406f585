//! Addresses held before their endpoint exists. Docker's IPAM driver API asks for a container's
//! address (`RequestAddress`) before the endpoint has an id, and engines on several hosts ask at
//! once: the address key is written right then, held by "reserved@<host>" under the host's
//! records lease (so a dead host's reservations go with its other records), and given back by
//! `release_reservation`. Being an ordinary address key, a reservation is never handed to anyone
//! else, by a connect or another reservation.
//!
//! Docker's Join turns a reservation into an endpoint (`join_reserved`): in one transaction the
//! address passes from the reservation to the endpoint, and the endpoint, its attachment and (at
//! its first endpoint) the container are written, the container as one whose runtime moves the
//! interfaces in itself (`Container::handover`), with Docker's port map as its published ports
//! (`store::ports`). Leave undoes it (`leave_reserved`): the address
//! goes back to the reservation, which Docker releases after DeleteEndpoint, and the container
//! goes with its last endpoint.

use std::{net::Ipv4Addr, path::PathBuf};

use etcd_client::{Compare, CompareOp, TxnOp};

use super::{
    Result, Store, StoreError, check_name,
    endpoint::{AddressHolder, choose_address, put_leased},
    etcd::{Range, Retry, absent, decode, encode, unchanged},
    now_rfc3339,
    ports::{self, PortRequest},
};
use crate::model::{Container, Endpoint, MacAddr, Network};

/// A runtime's endpoint on a reserved address (Docker's CreateEndpoint and Join).
#[derive(Clone, Debug)]
pub struct ReservedJoin {
    pub network_id: String,
    /// The runtime's endpoint id (Docker's: 64 hex digits), the overlay endpoint's id.
    pub endpoint_id: String,
    pub host: String,
    /// The container the endpoint belongs to, made at its first endpoint.
    pub container: String,
    /// The runtime's namespace of the container, never opened by the agent.
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    /// Docker's port map for the endpoint: published on the host, to `ip`.
    pub ports: Vec<PortRequest>,
}

/// The holder of an address that `host` reserved.
pub fn holder(host: &str) -> String {
    format!("reserved@{host}")
}

impl Store {
    /// Reserves an address of network `network_id` for `host`: `requested` if it is in the
    /// pool and free, else the lowest free one.
    pub async fn reserve_address(
        &self,
        network_id: &str,
        host: &str,
        requested: Option<Ipv4Addr>,
    ) -> Result<(Network, Ipv4Addr)> {
        const OP: &str = "address reserve";
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let view = self
                .view(
                    OP,
                    &[
                        Range::Key(k.network(network_id)),
                        Range::Key(k.host(host)),
                        Range::Prefix(k.addresses(network_id)),
                    ],
                )
                .await?;
            let net_kv = view.key(0).ok_or_else(|| StoreError::NetworkNotFound(network_id.to_owned()))?;
            let network: Network = decode(net_kv)?;
            let host_kv = view.key(1).ok_or_else(|| StoreError::HostNotRegistered(host.to_owned()))?;
            let ip = choose_address(k, &network, requested, view.prefix(2))?;
            let value = AddressHolder { endpoint: String::new(), container: holder(host) };
            // The address still free, the network still there, the host's records lease (the
            // one its key is under) still the one written with.
            let compares = vec![
                absent(&k.address(network_id, ip)),
                unchanged(&k.network(network_id), Some(net_kv)),
                unchanged(&k.host(host), Some(host_kv)),
            ];
            let ops = vec![put_leased(k.address(network_id, ip), encode(&value), host_kv.lease())];
            if self.commit(OP, compares, ops).await?.is_some() {
                return Ok((network, ip));
            }
            retry.again().await?;
        }
    }

    /// Gives back an address `host` reserved; true if there was such a reservation (an address
    /// held by anything else is left alone).
    pub async fn release_reservation(&self, network_id: &str, host: &str, ip: Ipv4Addr) -> Result<bool> {
        const OP: &str = "address release";
        let key = self.keys.address(network_id, ip);
        let mut retry = Retry::new(OP);
        loop {
            let view = self.view(OP, &[Range::Key(key.clone())]).await?;
            let Some(kv) = view.key(0) else { return Ok(false) };
            let held: AddressHolder = decode(kv)?;
            if !held.endpoint.is_empty() || held.container != holder(host) {
                return Ok(false);
            }
            if self
                .commit(OP, vec![unchanged(&key, Some(kv))], vec![TxnOp::delete(key.as_str(), None)])
                .await?
                .is_some()
            {
                return Ok(true);
            }
            retry.again().await?;
        }
    }
}

impl Store {
    /// Makes the endpoint of a runtime's container on an address `host` reserved: the address
    /// passes from the reservation to the endpoint, and the container is made at its first
    /// endpoint (as one whose runtime moves the interfaces in). Joining again with the same
    /// endpoint answers the endpoint already made.
    pub async fn join_reserved(&self, j: &ReservedJoin) -> Result<Endpoint> {
        const OP: &str = "endpoint join";
        check_name("container name", &j.container)?;
        check_name("endpoint id", &j.endpoint_id)?;
        ports::check("port map", &j.ports)?;
        let k = &self.keys;
        let address = k.address(&j.network_id, j.ip);
        let endpoint_key = k.endpoint(&j.network_id, &j.endpoint_id);
        let attachment = k.attachment(&j.container, &j.network_id);
        let mut retry = Retry::new(OP);
        loop {
            let view = self
                .view(
                    OP,
                    &[
                        Range::Key(k.network(&j.network_id)),
                        Range::Key(k.host(&j.host)),
                        Range::Key(k.container(&j.container)),
                        Range::Key(address.clone()),
                        Range::Key(endpoint_key.clone()),
                        Range::Key(attachment.clone()),
                        ports::read(k, &j.host),
                    ],
                )
                .await?;
            let net_kv = view.key(0).ok_or_else(|| StoreError::NetworkNotFound(j.network_id.clone()))?;
            let network: Network = decode(net_kv)?;
            ports::check_network("port map", &network, &j.ports)?;
            let host_kv = view.key(1).ok_or_else(|| StoreError::HostNotRegistered(j.host.clone()))?;
            let lease = host_kv.lease();
            if let Some(kv) = view.key(4) {
                let existing: Endpoint = decode(kv)?;
                if existing.container == j.container && existing.ipv4 == j.ip && existing.host == j.host {
                    return Ok(existing);
                }
                return Err(StoreError::Invalid {
                    what: "endpoint",
                    value: j.endpoint_id.clone(),
                    reason: format!(
                        "exists already, for container {:?} with address {} on host {:?}",
                        existing.container, existing.ipv4, existing.host
                    ),
                });
            }
            // The address must be this host's reservation: one Docker's IPAM call made here.
            let reserved = view.key(3).and_then(|kv| decode::<AddressHolder>(kv).ok());
            match &reserved {
                Some(h) if h.endpoint.is_empty() && h.container == holder(&j.host) => {}
                other => {
                    return Err(StoreError::Invalid {
                        what: "address",
                        value: j.ip.to_string(),
                        reason: format!(
                            "is not reserved by host {:?} on network {:?} ({}): its address must come from this plugin's IPAM driver (--ipam-driver)",
                            j.host,
                            network.name,
                            other.as_ref().map_or_else(
                                || "it is not held at all".to_owned(),
                                |h| format!("it is held by {:?}", h.container)
                            ),
                        ),
                    });
                }
            }
            let mut compares = vec![
                unchanged(&k.network(&j.network_id), Some(net_kv)),
                // Still registered under the same lease: the lease the writes below use is alive.
                Compare::lease(k.host(&j.host), CompareOp::Equal, lease),
                unchanged(&address, view.key(3)),
                absent(&endpoint_key),
                absent(&attachment),
            ];
            let mut ops = Vec::new();
            // Docker gives its port map to one endpoint of a container (the first on a network
            // with a way out): the ports go on the container with it, held by the container.
            let (published, port_compares, port_ops) =
                ports::claim(k, &j.host, &j.container, &j.ports, &ports::taken(view.prefix(6)), lease)?;
            compares.extend(port_compares);
            ops.extend(port_ops);
            if let Some(kv) = view.key(2) {
                let c: Container = decode(kv)?;
                if c.host != j.host || !c.handover || c.netns.as_ref() != Some(&j.netns) {
                    return Err(StoreError::ContainerExists { name: j.container.clone(), host: c.host });
                }
                compares.push(unchanged(&k.container(&j.container), Some(kv)));
                if !published.is_empty() {
                    if !c.ports.is_empty() {
                        return Err(StoreError::Invalid {
                            what: "port map",
                            value: j.container.clone(),
                            reason: "the container publishes ports through another endpoint already".into(),
                        });
                    }
                    let c = Container { ports: published, ..c };
                    ops.push(put_leased(k.container(&j.container), encode(&c), lease));
                }
            } else {
                let c = Container {
                    name: j.container.clone(),
                    host: j.host.clone(),
                    netns: Some(j.netns.clone()),
                    handover: true,
                    ports: published,
                    created: now_rfc3339(),
                    revision: 0,
                };
                compares.push(absent(&k.container(&j.container)));
                ops.push(put_leased(k.container(&j.container), encode(&c), lease));
            }
            if view.key(5).is_some() {
                return Err(StoreError::AlreadyConnected {
                    container: j.container.clone(),
                    network: network.name.clone(),
                });
            }
            let endpoint = Endpoint {
                mac: j.mac,
                ..Endpoint::new(&j.endpoint_id, &j.network_id, &j.container, &j.host, j.ip)
            };
            let value = AddressHolder { endpoint: endpoint.id.clone(), container: j.container.clone() };
            ops.push(put_leased(endpoint_key.clone(), encode(&endpoint), lease));
            ops.push(put_leased(attachment.clone(), endpoint.id.as_str(), lease));
            ops.push(put_leased(address.clone(), encode(&value), lease));
            if self.commit(OP, compares, ops).await?.is_some() {
                return Ok(endpoint);
            }
            retry.again().await?;
        }
    }

    /// Undoes `join_reserved`: the endpoint and its attachment go, the address is the host's
    /// reservation again, and the container goes with its last endpoint. None when there is no
    /// such endpoint (a Leave repeated, or one for an endpoint never joined).
    pub async fn leave_reserved(&self, network_id: &str, endpoint_id: &str) -> Result<Option<Endpoint>> {
        let address = |ep: &Endpoint, ep_kv: &etcd_client::KeyValue| {
            let value = AddressHolder { endpoint: String::new(), container: holder(&ep.host) };
            put_leased(self.keys.address(network_id, ep.ipv4), encode(&value), ep_kv.lease())
        };
        // Only a container the runtime hands interfaces over to was made by the Join.
        let handover = |kv: &etcd_client::KeyValue| decode::<Container>(kv).ok().is_some_and(|c| c.handover);
        self.detach_endpoint("endpoint leave", network_id, endpoint_id, address, handover).await
    }
}

impl Store {
    /// Who holds an address of a network: the holder's name (a container, or `reserved@<host>`),
    /// or None when it is free.
    pub async fn address_holder(&self, network_id: &str, ip: Ipv4Addr) -> Result<Option<String>> {
        let (kv, _) = self.get("address holder", &self.keys.address(network_id, ip)).await?;
        kv.map(|kv| decode::<AddressHolder>(&kv).map(|h| h.container)).transpose()
    }
}
