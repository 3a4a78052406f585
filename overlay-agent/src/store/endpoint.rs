//! Endpoints: a container's attachment to a network, with its address. Connecting takes an
//! address and writes the endpoint, the attachment and the address key in one transaction,
//! all under the lease of the container's host.

use std::{collections::BTreeSet, net::Ipv4Addr};

use etcd_client::{Compare, KeyValue, PutOptions, TxnOp};
use serde::{Deserialize, Serialize};

use super::{
    Keys, Result, Store, StoreError,
    etcd::{Range, Retry, absent, decode, encode, range_unchanged_since, unchanged},
    ipam::Pool,
    network::{decode_networks, resolve},
    new_id,
    service::{Names, plan_names},
};
use crate::model::{Container, Endpoint, Network};

/// The value of an address key: who holds the address.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddressHolder {
    pub endpoint: String,
    pub container: String,
}

pub(crate) fn put_leased(key: String, value: impl Into<Vec<u8>>, lease: i64) -> TxnOp {
    TxnOp::put(key, value, (lease != 0).then(|| PutOptions::new().with_lease(lease)))
}

impl Store {
    /// Removes endpoint `endpoint_id` of network `network_id` and its attachment in one guarded
    /// transaction, for the runtimes that undo what they made (Docker's Leave, CNI's DEL):
    /// `address` says what becomes of its address key (given the endpoint and its key-value),
    /// and the container goes too when this was its last endpoint and `remove_container` says
    /// so of the container's key-value. None when there is no such endpoint (an undo repeated,
    /// or one for something never made).
    pub(super) async fn detach_endpoint(
        &self,
        op: &'static str,
        network_id: &str,
        endpoint_id: &str,
        address: impl Fn(&Endpoint, &KeyValue) -> TxnOp,
        remove_container: impl Fn(&KeyValue) -> bool,
    ) -> Result<Option<Endpoint>> {
        let k = &self.keys;
        let endpoint_key = k.endpoint(network_id, endpoint_id);
        let mut retry = Retry::new(op);
        loop {
            let view = self.view(op, &[Range::Key(endpoint_key.clone())]).await?;
            let Some(ep_kv) = view.key(0) else { return Ok(None) };
            let ep: Endpoint = decode(ep_kv)?;
            let attachments = k.attachments(&ep.container);
            let more = self
                .view(op, &[Range::Key(k.container(&ep.container)), Range::Prefix(attachments.clone())])
                .await?;
            let attachment = k.attachment(&ep.container, network_id);
            let compares = vec![
                unchanged(&endpoint_key, Some(ep_kv)),
                unchanged(&k.container(&ep.container), more.key(0)),
                range_unchanged_since(&attachments, more.rev),
            ];
            let mut ops = vec![
                TxnOp::delete(endpoint_key.as_str(), None),
                TxnOp::delete(attachment.as_str(), None),
                address(&ep, ep_kv),
            ];
            let others = more.prefix(1).iter().filter(|kv| kv.key() != attachment.as_bytes()).count();
            if let Some(kv) = more.key(0).filter(|kv| others == 0 && remove_container(kv)) {
                ops.push(TxnOp::delete(k.container(&ep.container), None));
                if let Some(c) = super::etcd::decode_or_skip::<crate::model::Container>(kv) {
                    ops.extend(super::ports::deletes(k, &c));
                }
            }
            if self.commit(op, compares, ops).await?.is_some() {
                return Ok(Some(ep));
            }
            retry.again().await?;
        }
    }
}

/// The address a new holder of an address on `network` gets: `requested` if it is in the pool
/// and free, else the lowest free one. `addresses` are the network's address keys, as read.
pub(crate) fn choose_address(
    keys: &Keys,
    network: &Network,
    requested: Option<Ipv4Addr>,
    addresses: &[KeyValue],
) -> Result<Ipv4Addr> {
    let prefix = keys.addresses(&network.id);
    let mut used = BTreeSet::new();
    for kv in addresses {
        let key = String::from_utf8_lossy(kv.key());
        if let Some(ip) = key.strip_prefix(&prefix).and_then(|s| s.parse::<Ipv4Addr>().ok()) {
            used.insert(ip);
        }
    }
    let pool = Pool::new(network);
    let address_error = |error| StoreError::Address { network: network.name.clone(), error };
    match requested {
        Some(ip) => {
            pool.check_request(ip).map_err(address_error)?;
            if used.contains(&ip) {
                let holder = addresses
                    .iter()
                    .find(|kv| kv.key() == keys.address(&network.id, ip).as_bytes())
                    .and_then(|kv| decode::<AddressHolder>(kv).ok())
                    .map_or_else(|| "?".to_owned(), |h| h.container);
                return Err(StoreError::AddressInUse {
                    ip,
                    network: network.name.clone(),
                    container: holder,
                });
            }
            Ok(ip)
        }
        None => pool.first_free(&used).map_err(address_error),
    }
}

/// What a new endpoint's transaction read of its network.
pub(crate) struct NetworkRead<'a> {
    /// The network's address keys.
    pub addresses: &'a [KeyValue],
    /// The container's attachment key for the network, if any.
    pub attachment: Option<&'a KeyValue>,
    /// The network's services.
    pub services: &'a [KeyValue],
    /// The network's endpoints (read only when the endpoint publishes a service).
    pub endpoints: &'a [KeyValue],
    /// The revision of the read.
    pub rev: i64,
}

impl Store {
    /// Reads what [`plan`] needs of network `network_id` for a new endpoint of `container`.
    pub(crate) async fn read_for_endpoint(
        &self,
        op: &'static str,
        network_id: &str,
        container: &str,
        names: &Names,
    ) -> Result<super::etcd::View> {
        let k = &self.keys;
        let mut ranges = vec![
            Range::Prefix(k.addresses(network_id)),
            Range::Key(k.attachment(container, network_id)),
            Range::Prefix(k.services(network_id)),
        ];
        if names.publish && !names.services.is_empty() {
            ranges.push(Range::Prefix(k.network_endpoints(network_id)));
        }
        self.view(op, &ranges).await
    }
}

impl<'a> NetworkRead<'a> {
    pub(crate) fn of(view: &'a super::etcd::View) -> Self {
        Self {
            addresses: view.prefix(0),
            attachment: view.key(1),
            services: view.prefix(2),
            // Read only when the endpoint publishes a service (`read_for_endpoint`).
            endpoints: view.prefix_if_read(3),
            rev: view.rev,
        }
    }
}

/// What is asked of a new endpoint.
pub(crate) struct NewEndpoint<'a> {
    /// Its id; a random one when absent (a CNI endpoint's is derived from the runtime's
    /// container id, so that every call about it finds it).
    pub id: Option<String>,
    /// The address asked for (`--ip`); the lowest free one when absent.
    pub ip: Option<Ipv4Addr>,
    /// Its names beyond the container's own.
    pub names: &'a Names,
    /// The name its interface must have in the container (CNI_IFNAME).
    pub ifname: Option<String>,
}

impl<'a> NewEndpoint<'a> {
    /// A new endpoint of the CLI's: a random id, the lowest free `ethN`.
    pub(crate) fn cli(ip: Option<Ipv4Addr>, names: &'a Names) -> Self {
        Self { id: None, ip, names, ifname: None }
    }
}

/// Decides a new endpoint of `container` on `network`: its address (the one asked for, or the
/// lowest free one), its names, and the compares and writes that make it, from what was read.
pub(crate) fn plan(
    keys: &Keys,
    network: &Network,
    container: &Container,
    lease: i64,
    new: &NewEndpoint<'_>,
    read: &NetworkRead<'_>,
) -> Result<(Endpoint, Vec<Compare>, Vec<TxnOp>)> {
    let (requested, names) = (new.ip, new.names);
    if read.attachment.is_some() {
        return Err(StoreError::AlreadyConnected {
            container: container.name.clone(),
            network: network.name.clone(),
        });
    }
    let ip = choose_address(keys, network, requested, read.addresses)?;
    let (name_compares, name_ops) =
        plan_names(keys, network, names, read.services, read.endpoints, read.rev)?;
    let id = new.id.clone().unwrap_or_else(new_id);
    let mut endpoint = Endpoint::new(&id, &network.id, &container.name, &container.host, ip);
    endpoint.ifname.clone_from(&new.ifname);
    endpoint.aliases = dedup(&names.aliases);
    endpoint.services = dedup(&names.services);
    let holder = AddressHolder { endpoint: endpoint.id.clone(), container: container.name.clone() };
    // Only the chosen address is guarded: clients taking different addresses do not conflict,
    // and two taking the same one cannot both succeed.
    let mut compares =
        vec![absent(&keys.address(&network.id, ip)), absent(&keys.attachment(&container.name, &network.id))];
    compares.extend(name_compares);
    let mut ops = vec![
        put_leased(keys.endpoint(&network.id, &endpoint.id), encode(&endpoint), lease),
        put_leased(keys.attachment(&container.name, &network.id), endpoint.id.as_str(), lease),
        put_leased(keys.address(&network.id, ip), encode(&holder), lease),
    ];
    ops.extend(name_ops);
    Ok((endpoint, compares, ops))
}

/// Names in the order given, each once.
fn dedup(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    out
}

impl Store {
    /// Connects a container to a network (`--ip` asks for a specific address). The endpoint
    /// lives under the lease of the container's host.
    pub async fn network_connect(
        &self,
        network: &str,
        container: &str,
        ip: Option<Ipv4Addr>,
    ) -> Result<Endpoint> {
        self.network_connect_named(network, container, ip, &Names::default()).await
    }

    /// `network_connect` with names beyond the container's own (aliases, services).
    pub async fn network_connect_named(
        &self,
        network: &str,
        container: &str,
        ip: Option<Ipv4Addr>,
        names: &Names,
    ) -> Result<Endpoint> {
        const OP: &str = "network connect";
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let view =
                self.view(OP, &[Range::Prefix(k.networks()), Range::Key(k.container(container))]).await?;
            let networks = decode_networks(view.prefix(0));
            let (net, net_kv) = resolve(&networks, network)?;
            let ctr_kv = view.key(1).ok_or_else(|| StoreError::ContainerNotFound(container.to_owned()))?;
            let ctr: Container = decode(ctr_kv)?;
            let more = self.read_for_endpoint(OP, &net.id, container, names).await?;
            let (endpoint, mut compares, ops) =
                plan(k, net, &ctr, ctr_kv.lease(), &NewEndpoint::cli(ip, names), &NetworkRead::of(&more))?;
            // The network not removed, the container neither (and so its host's lease alive).
            compares.push(unchanged(&k.network(&net.id), Some(net_kv)));
            compares.push(unchanged(&k.container(container), Some(ctr_kv)));
            if self.commit(OP, compares, ops).await?.is_some() {
                return Ok(endpoint);
            }
            retry.again().await?;
        }
    }

    /// Disconnects a container from a network; its address returns to the pool.
    pub async fn network_disconnect(&self, network: &str, container: &str) -> Result<Endpoint> {
        const OP: &str = "network disconnect";
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let view =
                self.view(OP, &[Range::Prefix(k.networks()), Range::Key(k.container(container))]).await?;
            let networks = decode_networks(view.prefix(0));
            let (net, _) = resolve(&networks, network)?;
            if view.key(1).is_none() {
                return Err(StoreError::ContainerNotFound(container.to_owned()));
            }
            let attachment = k.attachment(container, &net.id);
            let att = self.view(OP, &[Range::Key(attachment.clone())]).await?;
            let Some(att_kv) = att.key(0) else {
                return Err(StoreError::NotConnected {
                    container: container.to_owned(),
                    network: net.name.clone(),
                });
            };
            let endpoint_id = String::from_utf8_lossy(att_kv.value()).into_owned();
            let ep_key = k.endpoint(&net.id, &endpoint_id);
            let ep_view = self.view(OP, &[Range::Key(ep_key.clone())]).await?;
            let mut compares = vec![unchanged(&attachment, Some(att_kv))];
            let mut ops = vec![TxnOp::delete(attachment.as_str(), None)];
            let endpoint = match ep_view.key(0) {
                Some(ep_kv) => {
                    let endpoint: Endpoint = decode(ep_kv)?;
                    // The endpoint as read, so the address deleted is still this endpoint's.
                    compares.push(unchanged(&ep_key, Some(ep_kv)));
                    ops.push(TxnOp::delete(ep_key.as_str(), None));
                    ops.push(TxnOp::delete(k.address(&net.id, endpoint.ipv4), None));
                    endpoint
                }
                None => {
                    return Err(StoreError::NotConnected {
                        container: container.to_owned(),
                        network: net.name.clone(),
                    });
                }
            };
            if self.commit(OP, compares, ops).await?.is_some() {
                return Ok(endpoint);
            }
            retry.again().await?;
        }
    }
}
