//! Addresses held before their endpoint exists. Docker's IPAM driver API asks for a container's
//! address (`RequestAddress`) before the endpoint has an id, and engines on several hosts ask at
//! once: the address key is written right then, held by "reserved@<host>" under the host's
//! records lease (so a dead host's reservations go with its other records), and given back by
//! `release_reservation`. Being an ordinary address key, a reservation is never handed to anyone
//! else, by a connect or another reservation.

use std::net::Ipv4Addr;

use etcd_client::TxnOp;

use super::{
    Result, Store, StoreError,
    endpoint::{AddressHolder, choose_address, put_leased},
    etcd::{Range, Retry, absent, decode, encode, unchanged},
};
use crate::model::Network;

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
