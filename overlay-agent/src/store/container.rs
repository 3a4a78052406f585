//! Containers (sandboxes): a name unique across all hosts, the host it lives on, and (for
//! containers made by another runtime) its namespace. A container and its endpoints live under
//! its host's lease, so they vanish with a host that stops renewing it.

use std::{net::Ipv4Addr, path::PathBuf};

use etcd_client::{Compare, CompareOp, DeleteOptions, TxnOp};

use super::{
    Result, Store, StoreError, check_name,
    endpoint::{self, put_leased},
    etcd::{Range, Retry, absent, decode, decode_or_skip, encode, range_unchanged_since, unchanged},
    network::{decode_networks, resolve},
    now_rfc3339,
    ports::{self, PortRequest},
    service::Names,
};
use crate::model::{Container, Endpoint};

#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub host: String,
    /// A namespace made by another runtime; when absent the host's agent makes one.
    pub netns: Option<PathBuf>,
    /// A network to connect it to at once (in the same transaction), and the address to ask for.
    pub network: Option<String>,
    pub ip: Option<Ipv4Addr>,
    /// Its names on that network beyond its own (`--alias`, `--publish-service`).
    pub names: Names,
    /// Ports to publish on its host (`-p`), forwarded to its address on `network`.
    pub ports: Vec<PortRequest>,
}

#[derive(Clone, Debug)]
pub struct CreatedContainer {
    pub container: Container,
    pub endpoint: Option<Endpoint>,
    /// The revision that created it: its key's create revision, which the host's status names
    /// so that a status left by an earlier container of the same name is never taken for it.
    pub revision: i64,
}

/// Refuses published ports that cannot work, before anything is read: without a network, port
/// 0, the same host port twice.
fn check_ports(spec: &ContainerSpec) -> Result<Vec<PortRequest>> {
    let requests = spec.ports.clone();
    if let Some(first) = spec.ports.first()
        && spec.network.is_none()
    {
        return Err(StoreError::Invalid {
            what: "--publish",
            value: first.shown(),
            reason: "needs --network (the port leads to the container's address on it)".into(),
        });
    }
    ports::check("--publish", &requests)?;
    Ok(requests)
}

impl Store {
    /// Creates a container on a registered host (and connects it to a network if asked).
    pub async fn create_container(&self, spec: &ContainerSpec) -> Result<CreatedContainer> {
        const OP: &str = "container create";
        check_name("container name", &spec.name)?;
        check_name("host name", &spec.host)?;
        if spec.network.is_none() && !(spec.names.aliases.is_empty() && spec.names.services.is_empty()) {
            return Err(StoreError::Invalid {
                what: "--alias",
                value: spec.names.aliases.join(","),
                reason: "needs --network".into(),
            });
        }
        if spec.ip.is_some() && spec.network.is_none() {
            return Err(StoreError::Invalid {
                what: "--ip",
                value: spec.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                reason: "needs --network".into(),
            });
        }
        let requests = check_ports(spec)?;
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let ranges = [
                Range::Key(k.container(&spec.name)),
                Range::Key(k.host(&spec.host)),
                Range::Prefix(k.networks()),
                ports::read(k, &spec.host),
            ];
            let view = self.view(OP, &ranges).await?;
            if let Some(kv) = view.key(0) {
                let existing: Container = decode(kv)?;
                return Err(StoreError::ContainerExists { name: spec.name.clone(), host: existing.host });
            }
            let host_kv = view.key(1).ok_or_else(|| StoreError::HostNotRegistered(spec.host.clone()))?;
            let lease = host_kv.lease();
            // A published port is the host's: one container at a time holds it, named in the
            // refusal. The keys live under the host's lease, as the container.
            let (published, port_compares, port_ops) =
                ports::claim(k, &spec.host, &spec.name, &requests, &ports::taken(view.prefix(3)), lease)?;
            let container = Container {
                name: spec.name.clone(),
                host: spec.host.clone(),
                netns: spec.netns.clone(),
                handover: false,
                ports: published,
                created: now_rfc3339(),
                revision: 0,
            };
            let mut compares = vec![
                absent(&k.container(&spec.name)),
                // Still registered under the same lease: the lease the writes below use is alive.
                if lease != 0 {
                    Compare::lease(k.host(&spec.host), CompareOp::Equal, lease)
                } else {
                    unchanged(&k.host(&spec.host), Some(host_kv))
                },
            ];
            compares.extend(port_compares);
            let mut ops = vec![put_leased(k.container(&spec.name), encode(&container), lease)];
            ops.extend(port_ops);
            let mut endpoint = None;
            if let Some(network) = &spec.network {
                let networks = decode_networks(view.prefix(2));
                let (net, net_kv) = resolve(&networks, network)?;
                ports::check_network("--publish", net, &requests)?;
                let more = self.read_for_endpoint(OP, &net.id, &spec.name, &spec.names).await?;
                let (ep, c, o) = endpoint::plan(
                    k,
                    net,
                    &container,
                    lease,
                    &endpoint::NewEndpoint::cli(spec.ip, &spec.names),
                    &endpoint::NetworkRead::of(&more),
                )?;
                compares.extend(c);
                compares.push(unchanged(&k.network(&net.id), Some(net_kv)));
                ops.extend(o);
                endpoint = Some(ep);
            }
            if let Some(revision) = self.commit(OP, compares, ops).await? {
                let container = Container { revision, ..container };
                return Ok(CreatedContainer { container, endpoint, revision });
            }
            retry.again().await?;
        }
    }

    /// Removes a container and every endpoint it has (their addresses return to the pools).
    pub async fn remove_container(&self, name: &str) -> Result<(Container, Vec<Endpoint>)> {
        const OP: &str = "container rm";
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let view =
                self.view(OP, &[Range::Key(k.container(name)), Range::Prefix(k.attachments(name))]).await?;
            let ctr_kv = view.key(0).ok_or_else(|| StoreError::ContainerNotFound(name.to_owned()))?;
            let container: Container = decode(ctr_kv)?;
            let attachments_prefix = k.attachments(name);
            let endpoint_keys: Vec<String> = view
                .prefix(1)
                .iter()
                .filter_map(|kv| {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let network_id = key.strip_prefix(&attachments_prefix)?.to_owned();
                    Some(k.endpoint(&network_id, &String::from_utf8_lossy(kv.value())))
                })
                .collect();
            let ranges: Vec<Range> = endpoint_keys.iter().cloned().map(Range::Key).collect();
            let eps = self.view(OP, &ranges).await?;
            // A connect racing this read adds an attachment after `view.rev`; a disconnect
            // changes an endpoint key read below.
            let mut compares = vec![
                unchanged(&k.container(name), Some(ctr_kv)),
                range_unchanged_since(&attachments_prefix, view.rev),
            ];
            let mut ops = vec![
                TxnOp::delete(k.container(name), None),
                TxnOp::delete(attachments_prefix.as_str(), Some(DeleteOptions::new().with_prefix())),
            ];
            ops.extend(ports::deletes(k, &container));
            let mut endpoints = Vec::new();
            for (i, key) in endpoint_keys.iter().enumerate() {
                let Some(kv) = eps.key(i) else { continue };
                let ep: Endpoint = decode(kv)?;
                compares.push(unchanged(key, Some(kv)));
                ops.push(TxnOp::delete(key.as_str(), None));
                ops.push(TxnOp::delete(k.address(&ep.network_id, ep.ipv4), None));
                endpoints.push(ep);
            }
            if self.commit(OP, compares, ops).await?.is_some() {
                return Ok((container, endpoints));
            }
            retry.again().await?;
        }
    }

    pub async fn container(&self, name: &str) -> Result<Container> {
        Ok(self.container_revision(name).await?.0)
    }

    /// A container and the create revision of its key (what its status must name).
    pub async fn container_revision(&self, name: &str) -> Result<(Container, i64)> {
        let (kv, _) = self.get("container inspect", &self.keys.container(name)).await?;
        let kv = kv.ok_or_else(|| StoreError::ContainerNotFound(name.to_owned()))?;
        let revision = kv.create_revision();
        Ok((Container { revision, ..decode(&kv)? }, revision))
    }

    /// Every container, by name.
    pub async fn containers(&self) -> Result<Vec<Container>> {
        Ok(self
            .list("container ls", &self.keys.containers())
            .await?
            .iter()
            .filter_map(|kv| Some(Container { revision: kv.create_revision(), ..decode_or_skip(kv)? }))
            .collect())
    }
}
