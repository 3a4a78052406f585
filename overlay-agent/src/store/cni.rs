//! The endpoints a CNI runtime asks for (`overlay-cni`, served by the agent: `cni/`). A CNI
//! attachment is named by the runtime's container id and interface name; its endpoint's id is
//! derived from them ([`endpoint_id`]), so ADD, CHECK and DEL find it with nothing kept
//! anywhere else, and a DEL about an earlier sandbox of the same pod never touches the new one.
//!
//! ADD (`cni_attach`) writes, in one transaction, the container at its first endpoint (with the
//! runtime's namespace, made by the runtime and only entered by the agent, as for
//! `container create --netns`), the endpoint with the interface name the runtime wants, its
//! attachment and its address key. DEL (`cni_detach`) deletes the endpoint, its attachment and
//! address, and the container with its last endpoint.

use std::path::PathBuf;

use etcd_client::{Compare, CompareOp, TxnOp};
use sha2::{Digest as _, Sha256};

use super::{
    Result, Store, StoreError, check_name,
    endpoint::{NetworkRead, NewEndpoint, plan, put_leased},
    etcd::{Range, Retry, absent, decode, decode_or_skip, encode, unchanged},
    network::{decode_networks, resolve},
    now_rfc3339,
    ports::{self, PortRequest},
    service::Names,
};
use crate::model::{Container, Endpoint, Network};

/// What a CNI ADD asks for.
#[derive(Clone, Debug)]
pub struct CniAttach {
    /// The overlay network (the netconf's `network`, or its `name`).
    pub network: String,
    pub host: String,
    /// The container's name in the overlay (the pod's, or one derived from the container id).
    pub container: String,
    /// The runtime's namespace (CNI_NETNS).
    pub netns: PathBuf,
    /// [`endpoint_id`] of the runtime's container id and interface name.
    pub endpoint_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// The runtime's `portMappings`: host ports published to the pod's address on this network.
    pub ports: Vec<PortRequest>,
}

/// The id of the endpoint of CNI attachment (`container_id`, `ifname`) on network `network_id`:
/// 64 hex digits, like every endpoint id, the same on every call.
pub fn endpoint_id(network_id: &str, container_id: &str, ifname: &str) -> String {
    use std::fmt::Write as _;
    let mut h = Sha256::new();
    for part in ["overlay-cni", network_id, container_id, ifname] {
        h.update(part.as_bytes());
        // A separator no part can hold, so ("ab", "c") and ("a", "bc") differ.
        h.update([0]);
    }
    h.finalize().iter().fold(String::with_capacity(64), |mut id, b| {
        let _ = write!(id, "{b:02x}");
        id
    })
}

impl Store {
    /// Makes the endpoint of a CNI ADD (and its container at its first endpoint). An endpoint
    /// that exists already (the same ADD again) is answered as it is, with `false`.
    pub async fn cni_attach(&self, a: &CniAttach) -> Result<(Network, Endpoint, bool)> {
        const OP: &str = "cni add";
        check_name("container name", &a.container)?;
        ports::check("portMappings", &a.ports)?;
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let view = self
                .view(
                    OP,
                    &[
                        Range::Prefix(k.networks()),
                        Range::Key(k.host(&a.host)),
                        Range::Key(k.container(&a.container)),
                        ports::read(k, &a.host),
                    ],
                )
                .await?;
            let networks = decode_networks(view.prefix(0));
            let (net, net_kv) = resolve(&networks, &a.network)?;
            ports::check_network("portMappings", net, &a.ports)?;
            let endpoint_key = k.endpoint(&net.id, &a.endpoint_id);
            let (existing, _) = self.get(OP, &endpoint_key).await?;
            if let Some(kv) = existing {
                let ep: Endpoint = decode(&kv)?;
                if ep.container == a.container && ep.host == a.host {
                    return Ok((net.clone(), ep, false));
                }
                return Err(StoreError::Invalid {
                    what: "CNI attachment",
                    value: a.endpoint_id.clone(),
                    reason: format!(
                        "exists already, for container {:?} on host {:?} (not {:?} on {:?})",
                        ep.container, ep.host, a.container, a.host
                    ),
                });
            }
            let host_kv = view.key(1).ok_or_else(|| StoreError::HostNotRegistered(a.host.clone()))?;
            let lease = host_kv.lease();
            let mut compares = vec![
                unchanged(&k.network(&net.id), Some(net_kv)),
                // Still registered under the same lease: the lease the writes below use is alive.
                Compare::lease(k.host(&a.host), CompareOp::Equal, lease),
                absent(&endpoint_key),
            ];
            let mut ops = Vec::new();
            let container = if let Some(kv) = view.key(2) {
                let c: Container = decode(kv)?;
                // Another interface of the same sandbox: the same container. Anything else of
                // that name (another sandbox of the pod, not yet deleted; a CLI container) is
                // not this one.
                if c.host != a.host || c.handover || c.netns.as_ref() != Some(&a.netns) {
                    return Err(StoreError::Invalid {
                        what: "container name",
                        value: a.container.clone(),
                        reason: format!(
                            "is taken by another sandbox (on host {:?}, namespace {}): a sandbox of the same pod that is not deleted yet, or a container made otherwise",
                            c.host,
                            c.netns
                                .as_ref()
                                .map_or_else(|| "the agent's own".to_owned(), |p| p.display().to_string())
                        ),
                    });
                }
                // The pod's ports were published with its first interface: the runtime passes
                // the same portMappings to each of its networks' plugins, and a port leads to one
                // address only.
                if !a.ports.is_empty() && !c.ports.is_empty() {
                    let same = a.ports.len() == c.ports.len()
                        && a.ports.iter().zip(&c.ports).all(|(r, p)| {
                            r.proto == p.proto
                                && r.host_ports.contains(&p.host_port)
                                && r.container_port == p.container_port
                        });
                    if !same {
                        return Err(StoreError::Invalid {
                            what: "portMappings",
                            value: a.container.clone(),
                            reason: "differ from those the pod's first interface published".into(),
                        });
                    }
                } else if !a.ports.is_empty() {
                    return Err(StoreError::Invalid {
                        what: "portMappings",
                        value: a.container.clone(),
                        reason: "are published with a pod's first interface, and this is not it".into(),
                    });
                }
                compares.push(unchanged(&k.container(&a.container), Some(kv)));
                c
            } else {
                let (published, c, o) =
                    ports::claim(k, &a.host, &a.container, &a.ports, &ports::taken(view.prefix(3)), lease)?;
                compares.extend(c);
                ops.extend(o);
                let c = Container {
                    name: a.container.clone(),
                    host: a.host.clone(),
                    netns: Some(a.netns.clone()),
                    handover: false,
                    ports: published,
                    created: now_rfc3339(),
                    revision: 0,
                };
                compares.push(absent(&k.container(&a.container)));
                ops.push(put_leased(k.container(&a.container), encode(&c), lease));
                c
            };
            let names = Names::default();
            let more = self.read_for_endpoint(OP, &net.id, &a.container, &names).await?;
            let new = NewEndpoint {
                id: Some(a.endpoint_id.clone()),
                ip: None,
                names: &names,
                ifname: Some(a.ifname.clone()),
            };
            let (endpoint, c, o) = plan(k, net, &container, lease, &new, &NetworkRead::of(&more))?;
            compares.extend(c);
            ops.extend(o);
            if self.commit(OP, compares, ops).await?.is_some() {
                return Ok((net.clone(), endpoint, true));
            }
            retry.again().await?;
        }
    }

    /// The endpoint of a CNI attachment, if it exists.
    pub async fn cni_endpoint(&self, network_id: &str, endpoint_id: &str) -> Result<Option<Endpoint>> {
        let (kv, _) = self.get("cni check", &self.keys.endpoint(network_id, endpoint_id)).await?;
        kv.map(|kv| decode(&kv)).transpose()
    }

    /// Undoes `cni_attach`: the endpoint, its attachment and its address go, and the container
    /// with its last endpoint. None when there is no such endpoint (a DEL repeated, or one for
    /// an ADD that never happened or failed).
    pub async fn cni_detach(&self, network_id: &str, endpoint_id: &str) -> Result<Option<Endpoint>> {
        let address = |ep: &Endpoint, _: &_| TxnOp::delete(self.keys.address(network_id, ep.ipv4), None);
        self.detach_endpoint("cni del", network_id, endpoint_id, address, |_| true).await
    }

    /// The CNI endpoints of network `network_id` on `host` (those with an interface name given
    /// by a runtime), for CNI's GC.
    pub async fn cni_endpoints(&self, network_id: &str, host: &str) -> Result<Vec<Endpoint>> {
        Ok(self
            .list("cni gc", &self.keys.network_endpoints(network_id))
            .await?
            .iter()
            .filter_map(decode_or_skip::<Endpoint>)
            .filter(|e| e.host == host && e.ifname.is_some())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::endpoint_id;

    #[test]
    fn endpoint_ids_are_stable_hex_and_tell_attachments_apart() {
        let a = endpoint_id("net", "abc", "eth0");
        assert_eq!(a, endpoint_id("net", "abc", "eth0"));
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, endpoint_id("net", "abc", "eth1"));
        assert_ne!(a, endpoint_id("net", "abd", "eth0"));
        assert_ne!(a, endpoint_id("other", "abc", "eth0"));
        assert_ne!(endpoint_id("n", "ab", "c"), endpoint_id("n", "a", "bc"));
    }
}
