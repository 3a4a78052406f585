//! The key layout under the store's prefix (see docs/store.md). Every key the store reads or
//! writes is spelled here, so the layout can be read in one place and changed in one place.

use std::net::Ipv4Addr;

use crate::model::ObjectRef;

/// The default prefix; `v1` is the layout's version, so a future layout can live beside it.
pub const DEFAULT_PREFIX: &str = "/overlay/v1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix holds, as far as the desired state is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A model object.
    Object(ObjectRef),
    /// Bookkeeping (names, VNIs, addresses, attachments) or status: not part of the model.
    Other,
}

impl Keys {
    /// `prefix` is normalised to have no trailing slash (so `/overlay/v1/` and `/overlay/v1`
    /// name the same layout).
    pub fn new(prefix: &str) -> Self {
        let trimmed = prefix.trim_end_matches('/');
        Self { prefix: if trimmed.is_empty() { String::new() } else { trimmed.to_owned() } }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Everything the store owns: the prefix followed by a slash.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn networks(&self) -> String {
        format!("{}/networks/", self.prefix)
    }

    pub fn network(&self, id: &str) -> String {
        format!("{}{id}", self.networks())
    }

    pub fn network_name(&self, name: &str) -> String {
        format!("{}/network-names/{name}", self.prefix)
    }

    pub fn vni(&self, vni: u32) -> String {
        format!("{}/vnis/{vni}", self.prefix)
    }

    /// All endpoints of one network: empty exactly when the network may be removed.
    pub fn network_endpoints(&self, network_id: &str) -> String {
        format!("{}/endpoints/{network_id}/", self.prefix)
    }

    pub fn all_endpoints(&self) -> String {
        format!("{}/endpoints/", self.prefix)
    }

    pub fn endpoint(&self, network_id: &str, id: &str) -> String {
        format!("{}{id}", self.network_endpoints(network_id))
    }

    /// The addresses in use in one network.
    pub fn addresses(&self, network_id: &str) -> String {
        format!("{}/ipam/{network_id}/", self.prefix)
    }

    pub fn address(&self, network_id: &str, ip: Ipv4Addr) -> String {
        format!("{}{ip}", self.addresses(network_id))
    }

    pub fn containers(&self) -> String {
        format!("{}/containers/", self.prefix)
    }

    pub fn container(&self, name: &str) -> String {
        format!("{}{name}", self.containers())
    }

    /// The networks one container is attached to (one key per network, holding the endpoint id).
    pub fn attachments(&self, container: &str) -> String {
        format!("{}/attachments/{container}/", self.prefix)
    }

    pub fn attachment(&self, container: &str, network_id: &str) -> String {
        format!("{}{network_id}", self.attachments(container))
    }

    /// The ports published on one host (`-p`): one key per protocol and port, holding the
    /// container's name, so that two containers cannot publish the same port on a host.
    pub fn ports(&self, host: &str) -> String {
        format!("{}/ports/{host}/", self.prefix)
    }

    pub fn port(&self, host: &str, proto: &str, port: u16) -> String {
        format!("{}{proto}/{port}", self.ports(host))
    }

    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.prefix)
    }

    /// A host's registration: not leased to its liveness, so it outlives a lapse (see
    /// `alive`); it lives under the host's records lease, with its containers and endpoints.
    pub fn host(&self, name: &str) -> String {
        format!("{}{name}", self.hosts())
    }

    /// Hosts that are alive: each key lives under its host's short liveness lease. What the
    /// agents follow: a host's endpoints are in the maps while its key is here.
    pub fn alive(&self) -> String {
        format!("{}/alive/", self.prefix)
    }

    pub fn alive_host(&self, name: &str) -> String {
        format!("{}{name}", self.alive())
    }

    pub fn endpoint_statuses(&self) -> String {
        format!("{}/status/endpoints/", self.prefix)
    }

    pub fn endpoint_status(&self, id: &str) -> String {
        format!("{}{id}", self.endpoint_statuses())
    }

    pub fn container_statuses(&self) -> String {
        format!("{}/status/containers/", self.prefix)
    }

    pub fn container_status(&self, name: &str) -> String {
        format!("{}{name}", self.container_statuses())
    }

    /// Published ports of containers that their host leaves out (`store::status::PortsStatus`).
    pub fn port_statuses(&self) -> String {
        format!("{}/status/ports/", self.prefix)
    }

    pub fn port_status(&self, name: &str) -> String {
        format!("{}{name}", self.port_statuses())
    }

    /// `<prefix>/services/`: every network's services.
    pub fn all_services(&self) -> String {
        format!("{}/services/", self.prefix)
    }

    /// `<prefix>/services/<network id>/`: a network's services (`service publish`).
    pub fn services(&self, network_id: &str) -> String {
        format!("{}{network_id}/", self.all_services())
    }

    pub fn service(&self, network_id: &str, name: &str) -> String {
        format!("{}{name}", self.services(network_id))
    }

    /// Which model object a key holds, if any.
    pub fn parse(&self, key: &str) -> Kind {
        let Some(rest) = key.strip_prefix(&self.prefix).and_then(|k| k.strip_prefix('/')) else {
            return Kind::Other;
        };
        let mut parts = rest.split('/');
        let kind = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("networks"), Some(id), None, None) if !id.is_empty() => ObjectRef::Network(id.to_owned()),
            (Some("endpoints"), Some(net), Some(id), None) if !net.is_empty() && !id.is_empty() => {
                ObjectRef::Endpoint(id.to_owned())
            }
            (Some("containers"), Some(name), None, None) if !name.is_empty() => {
                ObjectRef::Container(name.to_owned())
            }
            // The agents' model holds the hosts that are alive; registrations are bookkeeping.
            (Some("alive"), Some(name), None, None) if !name.is_empty() => ObjectRef::Host(name.to_owned()),
            _ => return Kind::Other,
        };
        Kind::Object(kind)
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = Keys::new("/overlay/v1/");
        assert_eq!(k.network("abc"), "/overlay/v1/networks/abc");
        assert_eq!(k.parse(&k.network("abc")), Kind::Object(ObjectRef::Network("abc".into())));
        assert_eq!(k.parse(&k.endpoint("n", "e")), Kind::Object(ObjectRef::Endpoint("e".into())));
        assert_eq!(k.parse(&k.container("c1")), Kind::Object(ObjectRef::Container("c1".into())));
        assert_eq!(k.parse(&k.alive_host("h1")), Kind::Object(ObjectRef::Host("h1".into())));
        for other in [
            k.network_name("blue"),
            k.vni(4096),
            k.address("n", Ipv4Addr::new(10, 0, 0, 2)),
            k.attachment("c1", "n"),
            k.endpoint_status("e"),
            k.container_status("c1"),
            k.port_status("c1"),
            k.host("h1"),
            "/overlay/v10/networks/x".to_owned(),
            "/other/networks/x".to_owned(),
        ] {
            assert_eq!(k.parse(&other), Kind::Other, "{other}");
        }
    }
}
