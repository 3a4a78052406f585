//! The CNI commands, answered by the agent for `overlay-cni` (docs/cni.md):
//!
//! - **ADD** checks everything it can before writing (the environment, the version, the
//!   network, the namespace, the port mappings), then writes the container (at its first
//!   interface, with the runtime's `portMappings` as its published ports, each refused naming
//!   its holder if another container has it) and the endpoint in one transaction
//!   (`Store::cni_attach`) and waits for this
//!   agent's loop to make the interface in the runtime's namespace, named CNI_IFNAME, with the
//!   address, MTU and default route, exactly as for `container create --netns`. If the loop
//!   reports an error or does not answer, ADD undoes its writes (the loop then removes whatever
//!   it made) and answers the error: a failed ADD leaves nothing. ADD of an attachment that
//!   exists (the same container id and interface) answers the same result.
//! - **DEL** deletes the endpoint of (container id, interface), if there is one, and the
//!   container with its last endpoint; it needs neither CNI_NETNS nor prevResult, and a DEL
//!   of something unknown succeeds.
//! - **CHECK** checks the endpoint is in the store, reported up by the agent, and that the
//!   interface in the namespace has its name and MAC and is up.
//! - **STATUS** (1.1) answers whether ADD can work now: the store answers and the network
//!   exists.
//! - **GC** (1.1) removes this host's CNI endpoints of the network that the runtime's
//!   `cni.dev/valid-attachments` does not name.

use std::{path::Path, time::Duration};

use tokio::time::Instant;
use tracing::{info, warn};

use super::types::{
    CniError, CniResult, Code, NetConf, Request, SUPPORTED_VERSIONS, at_least, parse_args, supported,
};
use crate::{
    model::{Endpoint, Network, Proto},
    netlink::Netlink,
    sandbox::Forbidden,
    store::{
        Store, StoreError, check_name,
        cni::{CniAttach, endpoint_id},
        ports::{self, PortRequest},
    },
};

/// How long ADD waits for the agent's loop to make the interface, and DEL to remove it.
const WAIT: Duration = Duration::from_secs(30);

/// What the commands share.
pub struct Cni {
    pub store: Store,
    /// This agent's host.
    pub host: String,
    /// The namespaces a container must never be given (the host's own).
    pub forbidden: Forbidden,
}

/// A command's answer: a result to print (None: print nothing) or a CNI error.
pub type Answer = Result<Option<serde_json::Value>, CniError>;

impl Cni {
    /// Answers one invocation. The error carries the netconf's version.
    pub async fn handle(&self, req: &Request) -> Answer {
        let version = req.config.get("cniVersion").and_then(serde_json::Value::as_str).unwrap_or_default();
        let answer = self.dispatch(req).await;
        answer.map_err(|mut e| {
            e.cni_version = if supported(version) { version.to_owned() } else { "1.1.0".to_owned() };
            warn!(command = %req.command, container = %req.container_id, code = e.code, error = %e.msg, "CNI call refused");
            e
        })
    }

    async fn dispatch(&self, req: &Request) -> Answer {
        let conf: NetConf = serde_json::from_value(req.config.clone()).map_err(|e| {
            CniError::new(Code::Decode, format!("the network configuration does not parse: {e}"))
        })?;
        if !supported(&conf.cni_version) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "cniVersion {:?} is not supported (supported: {})",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if conf.network().is_empty() {
            return Err(CniError::new(
                Code::InvalidNetworkConfig,
                "the network configuration names no network: set \"name\" (or \"network\") to an overlay network",
            ));
        }
        match req.command.as_str() {
            "ADD" => self.add(req, &conf).await.map(Some),
            "DEL" => self.del(req, &conf).await.map(|()| None),
            "CHECK" => {
                needs(&conf.cni_version, 0, 4, "CHECK")?;
                self.check(req, &conf).await.map(|()| None)
            }
            "STATUS" => {
                needs(&conf.cni_version, 1, 1, "STATUS")?;
                self.status(&conf).await.map(|()| None)
            }
            "GC" => {
                needs(&conf.cni_version, 1, 1, "GC")?;
                self.gc(&conf).await.map(|()| None)
            }
            other => Err(CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
            )),
        }
    }

    async fn add(&self, req: &Request, conf: &NetConf) -> Result<serde_json::Value, CniError> {
        required("CNI_CONTAINERID", &req.container_id)?;
        check_ifname(&req.ifname)?;
        let netns = check_netns(&req.netns, &self.forbidden)?;
        let ports = port_requests(conf)?;
        let container = container_name(&req.container_id, &req.args)?;
        let network = self.network(conf).await?;
        let Some(network) = network else {
            return Err(CniError::new(
                Code::InvalidNetworkConfig,
                format!(
                    "overlay network {:?} (named by the network configuration) does not exist: create it first (overlay network create {})",
                    conf.network(),
                    conf.network()
                ),
            ));
        };
        let attach = CniAttach {
            network: network.id.clone(),
            host: self.host.clone(),
            container,
            netns: netns.to_owned(),
            endpoint_id: endpoint_id(&network.id, &req.container_id, &req.ifname),
            ifname: req.ifname.clone(),
            ports,
        };
        let (network, ep, new) = self.store.cni_attach(&attach).await.map_err(store_error)?;
        if !new && ep.ifname.as_deref() != Some(req.ifname.as_str()) {
            return Err(CniError::new(
                Code::InvalidNetworkConfig,
                format!("container {} is attached already, with another interface", req.container_id),
            ));
        }
        if let Err(e) = self.store.wait_endpoint_ready(&ep, &network.name, Instant::now() + WAIT).await {
            if new {
                // Leave nothing behind: the loop takes down whatever it made once the keys go.
                self.undo(&network, &ep).await;
            }
            return Err(store_error(e));
        }
        let mtu = interface_mtu(netns, &req.ifname).await;
        info!(container = %ep.container, id = %req.container_id, network = %network.name, ip = %ep.ipv4, ifname = %req.ifname, new, "CNI ADD");
        let result = CniResult::of(&conf.cni_version, &network, &ep, &req.netns, mtu);
        Ok(serde_json::to_value(result).unwrap_or_default())
    }

    /// Takes a failed ADD's endpoint back out and waits (a while) for its interface to go.
    async fn undo(&self, network: &Network, ep: &Endpoint) {
        match self.store.cni_detach(&network.id, &ep.id).await {
            Ok(Some(ep)) => {
                let _ = self.store.wait_endpoint_detached(&ep, &network.name, Instant::now() + WAIT).await;
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, endpoint = %ep.id, "could not undo a failed CNI ADD"),
        }
    }

    async fn del(&self, req: &Request, conf: &NetConf) -> Result<(), CniError> {
        required("CNI_CONTAINERID", &req.container_id)?;
        required("CNI_IFNAME", &req.ifname)?;
        // A network that is gone has no endpoints left (network rm refuses one that has).
        let Some(network) = self.network(conf).await? else { return Ok(()) };
        let id = endpoint_id(&network.id, &req.container_id, &req.ifname);
        let Some(ep) = self.store.cni_detach(&network.id, &id).await.map_err(store_error)? else {
            return Ok(());
        };
        self.store
            .wait_endpoint_detached(&ep, &network.name, Instant::now() + WAIT)
            .await
            .map_err(store_error)?;
        info!(container = %ep.container, id = %req.container_id, network = %network.name, ip = %ep.ipv4, "CNI DEL");
        Ok(())
    }

    async fn check(&self, req: &Request, conf: &NetConf) -> Result<(), CniError> {
        required("CNI_CONTAINERID", &req.container_id)?;
        check_ifname(&req.ifname)?;
        let netns = check_netns(&req.netns, &self.forbidden)?;
        let Some(network) = self.network(conf).await? else {
            return Err(CniError::new(
                Code::InvalidNetworkConfig,
                format!("overlay network {:?} does not exist", conf.network()),
            ));
        };
        let id = endpoint_id(&network.id, &req.container_id, &req.ifname);
        let ep = self.store.cni_endpoint(&network.id, &id).await.map_err(store_error)?.ok_or_else(|| {
            CniError::new(
                Code::UnknownContainer,
                format!(
                    "container {} has no interface {} on overlay network {:?}",
                    req.container_id, req.ifname, network.name
                ),
            )
        })?;
        if let Some(prev) = &conf.prev_result {
            let want = format!("{}/{}", ep.ipv4, network.subnet.prefix_len());
            let has =
                prev["ips"].as_array().is_some_and(|ips| ips.iter().any(|ip| ip["address"] == want.as_str()));
            if !has {
                return Err(CniError::new(
                    Code::InvalidNetworkConfig,
                    format!("prevResult does not hold the interface's address {want}"),
                ));
            }
        }
        self.store
            .wait_endpoint_ready(&ep, &network.name, Instant::now() + Duration::from_secs(5))
            .await
            .map_err(store_error)?;
        let link = async { Netlink::in_namespace(netns).await?.link(&req.ifname).await }
            .await
            .map_err(|e| CniError::new(Code::Io, format!("reading {} in {}: {e}", req.ifname, req.netns)))?;
        match link {
            None => Err(CniError::new(Code::Io, format!("{} has no interface {}", req.netns, req.ifname))),
            Some(l) if l.mac != ep.mac.0 => Err(CniError::new(
                Code::Io,
                format!(
                    "interface {} in {} has MAC {} instead of {}",
                    req.ifname,
                    req.netns,
                    crate::model::MacAddr(l.mac),
                    ep.mac
                ),
            )),
            Some(l) if !l.up => {
                Err(CniError::new(Code::Io, format!("interface {} in {} is down", req.ifname, req.netns)))
            }
            Some(_) => Ok(()),
        }
    }

    async fn status(&self, conf: &NetConf) -> Result<(), CniError> {
        match self.network(conf).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(CniError::new(
                Code::NotAvailable,
                format!(
                    "overlay network {:?} does not exist (overlay network create {})",
                    conf.network(),
                    conf.network()
                ),
            )),
            Err(e) => Err(CniError::new(Code::NotAvailable, e.msg)),
        }
    }

    async fn gc(&self, conf: &NetConf) -> Result<(), CniError> {
        let Some(network) = self.network(conf).await? else { return Ok(()) };
        let valid: Vec<String> = conf
            .valid_attachments
            .iter()
            .flatten()
            .map(|a| endpoint_id(&network.id, &a.container_id, &a.ifname))
            .collect();
        let ours = self.store.cni_endpoints(&network.id, &self.host).await.map_err(store_error)?;
        for ep in ours.into_iter().filter(|e| !valid.contains(&e.id)) {
            if let Some(ep) = self.store.cni_detach(&network.id, &ep.id).await.map_err(store_error)? {
                info!(container = %ep.container, network = %network.name, ip = %ep.ipv4, "CNI GC removed an attachment the runtime no longer has");
            }
        }
        Ok(())
    }

    /// The overlay network the netconf names, None if there is no such network.
    async fn network(&self, conf: &NetConf) -> Result<Option<Network>, CniError> {
        match self.store.network(conf.network()).await {
            Ok(n) => Ok(Some(n)),
            Err(StoreError::NetworkNotFound(_)) => Ok(None),
            Err(e) => Err(store_error(e)),
        }
    }
}

fn needs(version: &str, major: u32, minor: u32, command: &str) -> Result<(), CniError> {
    if at_least(version, major, minor) {
        Ok(())
    } else {
        Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "{command} needs cniVersion {major}.{minor}.0 or later (the configuration says {version})"
            ),
        ))
    }
}

fn required(var: &str, value: &str) -> Result<(), CniError> {
    if value.is_empty() {
        Err(CniError::new(Code::InvalidEnvironment, format!("{var} is not set")))
    } else {
        Ok(())
    }
}

/// CNI_IFNAME: a name the kernel takes (at most 15 bytes, no '/', ':' or whitespace, not "."
/// or "..").
fn check_ifname(ifname: &str) -> Result<(), CniError> {
    required("CNI_IFNAME", ifname)?;
    if ifname.len() > 15
        || ifname == "."
        || ifname == ".."
        || ifname.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(CniError::new(
            Code::InvalidEnvironment,
            format!(
                "CNI_IFNAME {ifname:?} is not an interface name (at most 15 bytes, no '/', ':' or spaces)"
            ),
        ));
    }
    Ok(())
}

/// CNI_NETNS: a network namespace that is not the host's own.
fn check_netns<'a>(netns: &'a str, forbidden: &Forbidden) -> Result<&'a Path, CniError> {
    required("CNI_NETNS", netns)?;
    let path = Path::new(netns);
    forbidden.check(path).map_err(|e| CniError::new(Code::InvalidEnvironment, format!("CNI_NETNS {e}")))?;
    Ok(path)
}

/// The runtime's `portMappings` (the capability the netconf declares), as published ports:
/// hostPort on this host's addresses, to containerPort on the pod's address. Entries for an
/// IPv6 host address are left out, as the portmap plugin leaves out a family the pod has no
/// address of (the overlay carries IPv4); anything else that cannot be published is an error.
fn port_requests(conf: &NetConf) -> Result<Vec<PortRequest>, CniError> {
    let mut requests = Vec::new();
    for p in &conf.runtime_config.port_mappings {
        let bad = |why: &str| {
            CniError::new(
                Code::InvalidNetworkConfig,
                format!(
                    "runtimeConfig.portMappings entry hostPort {} -> containerPort {}/{}: {why}",
                    p.host_port, p.container_port, p.protocol
                ),
            )
        };
        let Some(host_ip) = ports::host_ip(&p.host_ip)
            .map_err(|_| bad(&format!("hostIP {:?} is not an address", p.host_ip)))?
        else {
            continue;
        };
        let proto = match p.protocol.to_ascii_lowercase().as_str() {
            "" | "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => {
                return Err(CniError::new(
                    Code::UnsupportedField,
                    format!(
                        "runtimeConfig.portMappings: protocol {other:?} is not published (tcp and udp are)"
                    ),
                ));
            }
        };
        if p.host_port == 0 || p.container_port == 0 {
            return Err(bad("ports are 1-65535"));
        }
        requests.push(PortRequest {
            proto,
            host_ip,
            host_ports: p.host_port..=p.host_port,
            container_port: p.container_port,
        });
    }
    Ok(requests)
}

/// The container's name in the overlay: `<pod>.<namespace>` for a Kubernetes pod (namespaces
/// hold no dots, so this is unique across namespaces), the pod name alone where the runtime
/// gives no namespace (podman gives its container's name), else `cni-<container id>`.
pub fn container_name(container_id: &str, args: &str) -> Result<String, CniError> {
    let args = parse_args(args);
    let name = match (args.get("K8S_POD_NAME").filter(|n| !n.is_empty()), args.get("K8S_POD_NAMESPACE")) {
        (Some(pod), Some(ns)) if !ns.is_empty() => format!("{pod}.{ns}"),
        (Some(pod), _) => (*pod).to_owned(),
        (None, _) => {
            let id: String = container_id
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' })
                .take(64)
                .collect();
            format!("cni-{id}")
        }
    };
    check_name("container name", &name).map_err(|e| {
        CniError::new(Code::InvalidEnvironment, format!("CNI_ARGS K8S_POD_NAME/K8S_POD_NAMESPACE: {e}"))
    })?;
    Ok(name)
}

/// The MTU of the interface made (for a 1.1 result), if it can be read.
async fn interface_mtu(netns: &Path, ifname: &str) -> Option<u32> {
    let nl = Netlink::in_namespace(netns).await.ok()?;
    nl.link(ifname).await.ok().flatten().map(|l| l.mtu)
}

/// A store error as a CNI error: what names a missing or refused thing is the configuration's,
/// what may pass (etcd unreachable, a race lost, the agent slow, the pod's earlier sandbox not
/// deleted yet) is "try again later".
fn store_error(e: StoreError) -> CniError {
    let code = match &e {
        StoreError::Etcd { .. }
        | StoreError::Unreachable { .. }
        | StoreError::Contended { .. }
        | StoreError::WaitTimeout { .. }
        | StoreError::HostNotRegistered(_)
        | StoreError::Invalid { what: "container name", .. } => Code::TryAgainLater,
        StoreError::HostCannot { .. } => Code::Io,
        _ => Code::InvalidNetworkConfig,
    };
    CniError::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::netns;

    #[test]
    fn pods_are_named_per_namespace() {
        let id = "6e17573a115ee3871200ddebbcd97ce1a8639e1371414a4e971e7ea55e8330ae";
        let k8s = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1;K8S_POD_INFRA_CONTAINER_ID=x";
        assert_eq!(container_name(id, k8s).unwrap(), "p1.default");
        assert_eq!(container_name(id, "K8S_POD_NAMESPACE=other;K8S_POD_NAME=p1").unwrap(), "p1.other");
        // podman: the container's name, no namespace.
        assert_eq!(
            container_name(id, "IgnoreUnknown=1;K8S_POD_NAME=charming_davinci").unwrap(),
            "charming_davinci"
        );
        assert_eq!(container_name(id, "").unwrap(), format!("cni-{id}"));
        assert_eq!(container_name("cnitool-5ec9/be", "").unwrap(), "cni-cnitool-5ec9-be");
        let bad = container_name(id, "K8S_POD_NAME=a b").unwrap_err();
        assert_eq!(bad.code, Code::InvalidEnvironment as u32);
        assert!(bad.msg.contains("K8S_POD_NAME"), "{}", bad.msg);
    }

    #[test]
    fn ifnames_are_checked() {
        for good in ["eth0", "net1", "a"] {
            assert!(check_ifname(good).is_ok());
        }
        for bad in ["", "a/b", "a b", "..", "sixteen-letters!", "a:b"] {
            let e = check_ifname(bad).unwrap_err();
            assert_eq!(e.code, Code::InvalidEnvironment as u32, "{bad:?}");
            assert!(e.msg.contains("CNI_IFNAME"), "{}", e.msg);
        }
    }

    #[test]
    fn port_mappings_are_read_as_each_runtime_spells_them() {
        let conf: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"n","runtimeConfig":{"portMappings":[
                {"HostPort":18082,"ContainerPort":80,"Protocol":"TCP","HostIP":""},
                {"hostPort":18083,"containerPort":53,"protocol":"udp","hostIP":"198.18.0.1"},
                {"hostPort":18084,"containerPort":80,"protocol":"tcp","hostIP":"::"}]}}"#,
        )
        .unwrap();
        let got = port_requests(&conf).unwrap();
        assert_eq!(got.len(), 2, "the IPv6 entry is left out: {got:?}");
        assert_eq!(
            (got[0].proto, got[0].host_ip, got[0].host_ports.clone(), got[0].container_port),
            (Proto::Tcp, None, 18082..=18082, 80)
        );
        assert_eq!((got[1].proto, got[1].host_ip), (Proto::Udp, Some("198.18.0.1".parse().unwrap())));
        for (entry, code) in [
            (r#"{"hostPort":1,"containerPort":2,"protocol":"sctp"}"#, Code::UnsupportedField),
            (r#"{"hostPort":0,"containerPort":80,"protocol":"tcp"}"#, Code::InvalidNetworkConfig),
            (
                r#"{"hostPort":80,"containerPort":80,"protocol":"tcp","hostIP":"nowhere"}"#,
                Code::InvalidNetworkConfig,
            ),
        ] {
            let conf: NetConf = serde_json::from_str(&format!(
                r#"{{"cniVersion":"1.0.0","name":"n","runtimeConfig":{{"portMappings":[{entry}]}}}}"#
            ))
            .unwrap();
            assert_eq!(port_requests(&conf).unwrap_err().code, code as u32, "{entry}");
        }
    }

    #[test]
    fn the_hosts_own_namespace_is_refused() {
        let mut f = Forbidden::default();
        f.add(netns::current_identity().unwrap(), "this host's own network namespace (the agent's)");
        let e = check_netns("/proc/self/ns/net", &f).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment as u32);
        assert!(e.msg.starts_with("CNI_NETNS /proc/self/ns/net is this host's own"), "{}", e.msg);
        assert!(check_netns("", &f).unwrap_err().msg.contains("CNI_NETNS is not set"));
    }

    #[test]
    fn store_errors_map_to_codes() {
        let c = |e| store_error(e).code;
        assert_eq!(c(StoreError::HostNotRegistered("h1".into())), 11);
        assert_eq!(c(StoreError::NetworkNotFound("n".into())), 7);
        assert_eq!(
            c(StoreError::HostCannot { host: "h".into(), what: "x".into(), error: "y".into() }),
            Code::Io as u32
        );
    }
}
