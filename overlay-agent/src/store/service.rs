//! Names on a network beyond container names: aliases and services.
//!
//! - An **alias** (`container create --alias`, `network connect --alias`) is one more name of an
//!   endpoint, on its network only. Several endpoints may share an alias (or an alias may equal
//!   another container's name): the name then resolves to all their addresses, as Docker's
//!   network aliases do.
//! - A **service** (`service publish NAME.NETWORK`) is a name of a network whose addresses are
//!   those of the endpoints attached to it as backends (`service attach CONTAINER NAME.NETWORK`,
//!   or `container create --publish-service NAME.NETWORK`, which publishes it if needed). A
//!   service name is a single DNS label, and must not be a name already answered on the network
//!   (a container's or an alias): publishing one that is, or an alias equal to a service, is
//!   refused naming who holds it. Unpublishing a service that still has backends is refused,
//!   naming them (detach them first): a name in use never vanishes by surprise.
//!
//! Services live at `services/<network id>/<name>` without a lease, like networks; an
//! endpoint's aliases and services are in the endpoint itself, which is all the agents read.

use etcd_client::{Compare, KeyValue, TxnOp};
use serde::Serialize;

use super::{
    Keys, Result, Store, StoreError, check_name,
    endpoint::put_leased,
    etcd::{Range, Retry, absent, decode, decode_or_skip, encode, range_unchanged_since, unchanged},
    network::{decode_networks, resolve},
    now_rfc3339,
};
use crate::model::{Endpoint, Network, Service};

/// The names a new endpoint gets beyond its container's.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub aliases: Vec<String>,
    /// Services to attach it to.
    pub services: Vec<String>,
    /// Publish those of `services` that are not published yet (`--publish-service`).
    pub publish: bool,
}

/// Checks an alias: a container name's characters, in DNS labels of at most 63 bytes.
pub fn check_alias(what: &'static str, name: &str) -> Result<()> {
    check_name(what, name)?;
    if name.split('.').any(|label| label.is_empty() || label.len() > 63) {
        return Err(StoreError::Invalid {
            what,
            value: name.to_owned(),
            reason: "each dot-separated label must have 1 to 63 characters".into(),
        });
    }
    Ok(())
}

/// Checks a service name: a single DNS label.
pub fn check_service_name(name: &str) -> Result<()> {
    check_alias("service name", name)?;
    if name.contains('.') {
        return Err(StoreError::Invalid {
            what: "service name",
            value: name.to_owned(),
            reason: "must be a single label (no '.'): SERVICE.NETWORK splits at the first dot".into(),
        });
    }
    Ok(())
}

/// `NAME.NETWORK`, split at the first dot.
pub fn parse_service_ref(text: &str) -> Result<(String, String)> {
    let (name, network) = text
        .split_once('.')
        .filter(|(n, net)| !n.is_empty() && !net.is_empty())
        .ok_or_else(|| StoreError::Invalid {
            what: "service",
            value: text.to_owned(),
            reason: "expected SERVICE.NETWORK".into(),
        })?;
    check_service_name(name)?;
    Ok((name.to_owned(), network.to_owned()))
}

/// Who on a network answers to `name` (case-insensitive, as DNS): the containers whose name or
/// alias it is, from the network's endpoints as read.
fn holders(endpoints: &[KeyValue], name: &str) -> Vec<String> {
    let mut found: Vec<String> = endpoints
        .iter()
        .filter_map(decode_or_skip::<Endpoint>)
        .filter_map(|e| {
            if e.container.eq_ignore_ascii_case(name) {
                Some(format!("container {:?}", e.container))
            } else if e.aliases.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                Some(format!("an alias of container {:?}", e.container))
            } else {
                None
            }
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The network's services as read, by name.
fn service_names(keys: &Keys, network_id: &str, services: &[KeyValue]) -> Vec<String> {
    let prefix = keys.services(network_id);
    services
        .iter()
        .filter_map(|kv| String::from_utf8_lossy(kv.key()).strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

/// What a new endpoint on `network` needs for `names`: the names checked against the network's
/// services and endpoints as read (`services`, `endpoints`, at revision `rev`), and the
/// compares and writes that keep them true (services published, aliases not services).
pub(crate) fn plan_names(
    keys: &Keys,
    network: &Network,
    names: &Names,
    services: &[KeyValue],
    endpoints: &[KeyValue],
    rev: i64,
) -> Result<(Vec<Compare>, Vec<TxnOp>)> {
    let published = service_names(keys, &network.id, services);
    let is_service = |name: &str| published.iter().any(|s| s.eq_ignore_ascii_case(name));
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    for alias in &names.aliases {
        check_alias("alias", alias)?;
        if is_service(alias) {
            return Err(StoreError::NameTaken {
                name: alias.clone(),
                network: network.name.clone(),
                holder: format!("service {alias:?}"),
            });
        }
        compares.push(absent(&keys.service(&network.id, alias)));
    }
    let mut publishing = false;
    for service in &names.services {
        check_service_name(service)?;
        let key = keys.service(&network.id, service);
        if let Some(kv) = services.iter().find(|kv| kv.key() == key.as_bytes()) {
            compares.push(unchanged(&key, Some(kv)));
            continue;
        }
        if !names.publish {
            return Err(StoreError::ServiceNotFound { name: service.clone(), network: network.name.clone() });
        }
        let taken = holders(endpoints, service);
        if !taken.is_empty() {
            return Err(StoreError::NameTaken {
                name: service.clone(),
                network: network.name.clone(),
                holder: taken.join(", "),
            });
        }
        compares.push(absent(&key));
        let value = Service { name: service.clone(), network_id: network.id.clone(), created: now_rfc3339() };
        ops.push(TxnOp::put(key, encode(&value), None));
        publishing = true;
    }
    if publishing {
        // No endpoint took the name meanwhile.
        compares.push(range_unchanged_since(&keys.network_endpoints(&network.id), rev));
    }
    Ok((compares, ops))
}

/// A service with its network's name and its backends, for `service ls` and `inspect`.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceInfo {
    pub service: Service,
    pub network: String,
    pub backends: Vec<Endpoint>,
}

impl Store {
    /// Publishes a service on a network: refused if the name is a service already, or a name a
    /// container of the network answers to.
    pub async fn publish_service(&self, network: &str, name: &str) -> Result<Service> {
        const OP: &str = "service publish";
        check_service_name(name)?;
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let view = self.view(OP, &[Range::Prefix(k.networks())]).await?;
            let networks = decode_networks(view.prefix(0));
            let (net, net_kv) = resolve(&networks, network)?;
            let key = k.service(&net.id, name);
            let more = self
                .view(OP, &[Range::Key(key.clone()), Range::Prefix(k.network_endpoints(&net.id))])
                .await?;
            if more.key(0).is_some() {
                return Err(StoreError::ServiceExists { name: name.to_owned(), network: net.name.clone() });
            }
            let taken = holders(more.prefix(1), name);
            if !taken.is_empty() {
                return Err(StoreError::NameTaken {
                    name: name.to_owned(),
                    network: net.name.clone(),
                    holder: taken.join(", "),
                });
            }
            let service =
                Service { name: name.to_owned(), network_id: net.id.clone(), created: now_rfc3339() };
            let compares = vec![
                unchanged(&k.network(&net.id), Some(net_kv)),
                absent(&key),
                range_unchanged_since(&k.network_endpoints(&net.id), more.rev),
            ];
            if self.commit(OP, compares, vec![TxnOp::put(key, encode(&service), None)]).await?.is_some() {
                return Ok(service);
            }
            retry.again().await?;
        }
    }

    /// Unpublishes a service; refused while endpoints are attached to it (naming them).
    pub async fn unpublish_service(&self, network: &str, name: &str) -> Result<Service> {
        const OP: &str = "service unpublish";
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let view = self.view(OP, &[Range::Prefix(k.networks())]).await?;
            let networks = decode_networks(view.prefix(0));
            let (net, _) = resolve(&networks, network)?;
            let key = k.service(&net.id, name);
            let more = self
                .view(OP, &[Range::Key(key.clone()), Range::Prefix(k.network_endpoints(&net.id))])
                .await?;
            let svc_kv = more.key(0).ok_or_else(|| StoreError::ServiceNotFound {
                name: name.to_owned(),
                network: net.name.clone(),
            })?;
            let service: Service = decode(svc_kv)?;
            let mut backends: Vec<String> = more
                .prefix(1)
                .iter()
                .filter_map(decode_or_skip::<Endpoint>)
                .filter(|e| e.services.iter().any(|s| s == name))
                .map(|e| e.container)
                .collect();
            if !backends.is_empty() {
                backends.sort();
                return Err(StoreError::ServiceInUse {
                    name: name.to_owned(),
                    network: net.name.clone(),
                    backends,
                });
            }
            let compares = vec![
                unchanged(&key, Some(svc_kv)),
                range_unchanged_since(&k.network_endpoints(&net.id), more.rev),
            ];
            if self.commit(OP, compares, vec![TxnOp::delete(key.as_str(), None)]).await?.is_some() {
                return Ok(service);
            }
            retry.again().await?;
        }
    }

    /// Attaches (`attach = true`) or detaches a container's endpoint on the service's network
    /// to or from the service.
    pub async fn service_backend(
        &self,
        container: &str,
        service_ref: &str,
        attach: bool,
    ) -> Result<Endpoint> {
        let op = if attach { "service attach" } else { "service detach" };
        let (name, network) = parse_service_ref(service_ref)?;
        let k = &self.keys;
        let mut retry = Retry::new(op);
        loop {
            let view = self.view(op, &[Range::Prefix(k.networks())]).await?;
            let networks = decode_networks(view.prefix(0));
            let (net, _) = resolve(&networks, &network)?;
            let key = k.service(&net.id, &name);
            let attachment = k.attachment(container, &net.id);
            let more = self.view(op, &[Range::Key(key.clone()), Range::Key(attachment.clone())]).await?;
            let svc_kv = more.key(0).ok_or_else(|| StoreError::ServiceNotFound {
                name: name.clone(),
                network: net.name.clone(),
            })?;
            let att_kv = more.key(1).ok_or_else(|| StoreError::NotConnected {
                container: container.to_owned(),
                network: net.name.clone(),
            })?;
            let ep_key = k.endpoint(&net.id, &String::from_utf8_lossy(att_kv.value()));
            let ep_view = self.view(op, &[Range::Key(ep_key.clone())]).await?;
            let ep_kv = ep_view.key(0).ok_or_else(|| StoreError::NotConnected {
                container: container.to_owned(),
                network: net.name.clone(),
            })?;
            let mut ep: Endpoint = decode(ep_kv)?;
            let has = ep.services.contains(&name);
            match (attach, has) {
                (true, true) | (false, false) => return Ok(ep),
                (true, false) => ep.services.push(name.clone()),
                (false, true) => ep.services.retain(|s| *s != name),
            }
            let compares = vec![unchanged(&key, Some(svc_kv)), unchanged(&ep_key, Some(ep_kv))];
            let ops = vec![put_leased(ep_key.clone(), encode(&ep), ep_kv.lease())];
            if self.commit(op, compares, ops).await?.is_some() {
                return Ok(ep);
            }
            retry.again().await?;
        }
    }

    /// Every service, with its network's name and its backends, by network and name.
    pub async fn services(&self) -> Result<Vec<ServiceInfo>> {
        let k = &self.keys;
        let view = self
            .view(
                "service ls",
                &[
                    Range::Prefix(k.all_services()),
                    Range::Prefix(k.networks()),
                    Range::Prefix(k.all_endpoints()),
                ],
            )
            .await?;
        let networks = decode_networks(view.prefix(1));
        let endpoints: Vec<Endpoint> = view.prefix(2).iter().filter_map(decode_or_skip).collect();
        let mut out: Vec<ServiceInfo> = view
            .prefix(0)
            .iter()
            .filter_map(decode_or_skip::<Service>)
            .map(|service| {
                let network = networks
                    .iter()
                    .find(|(n, _)| n.id == service.network_id)
                    .map_or_else(|| service.network_id.clone(), |(n, _)| n.name.clone());
                let mut backends: Vec<Endpoint> = endpoints
                    .iter()
                    .filter(|e| e.network_id == service.network_id && e.services.contains(&service.name))
                    .cloned()
                    .collect();
                backends.sort_by(|a, b| a.container.cmp(&b.container));
                ServiceInfo { service, network, backends }
            })
            .collect();
        out.sort_by(|a, b| (&a.network, &a.service.name).cmp(&(&b.network, &b.service.name)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_refs_split_at_the_first_dot() {
        assert_eq!(parse_service_ref("db.backend").unwrap(), ("db".into(), "backend".into()));
        assert_eq!(parse_service_ref("db.my.net").unwrap(), ("db".into(), "my.net".into()));
        for bad in ["db", ".net", "db.", "d b.net", &format!("{}.net", "a".repeat(64))] {
            assert!(parse_service_ref(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn aliases_are_dns_labels() {
        assert!(check_alias("alias", "db").is_ok());
        assert!(check_alias("alias", "db.internal").is_ok());
        assert!(check_alias("alias", &"a".repeat(63)).is_ok());
        for bad in ["", "-db", "a..b", &"a".repeat(64), "d b", "a/b"] {
            assert!(check_alias("alias", bad).is_err(), "{bad:?}");
        }
    }
}
