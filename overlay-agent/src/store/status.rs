//! What hosts report, and the CLI's waits on it: an agent publishes a key per endpoint and
//! container it made real, under its host's lease (the publisher is in source/publish.rs), and
//! removes the key when it took the thing down. The CLI watches these keys to wait until a
//! change is real. A thing the agent cannot make gets its key too, with the agent's `error`:
//! the CLI stops waiting at once and prints it, instead of timing out on a host that said why.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use etcd_client::{EventType, KeyValue, WatchOptions};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::time::Instant;
use tracing::debug;

use super::{Result, Store, StoreError, etcd::key_str};
use crate::model::{Container, Endpoint};

/// `<prefix>/status/endpoints/<endpoint id>`: the endpoint's interface exists on its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub host: String,
    pub container: String,
    /// The interface inside the container (empty while it cannot be made).
    #[serde(default)]
    pub ifname: String,
    /// Why the host cannot make the interface (it keeps trying): the endpoint is not up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `<prefix>/status/containers/<name>`: the container's sandbox exists on its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub host: String,
    /// The network namespace, for `container exec`.
    pub netns: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The create revision of the container key this status is about (0: unknown). A container
    /// removed and created again under the same name has a new one, so a status left by the old
    /// one is never taken for the new.
    #[serde(default)]
    pub container_revision: i64,
    /// Why the host cannot make the sandbox (it keeps trying): the container is not running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `<prefix>/status/ports/<name>`: ports published for the container that its host leaves out,
/// because a server of the host listens on them (a rule would take the port from the server:
/// egress/listeners.rs). The store cannot know a host's sockets, so `container create` succeeds
/// and this says why a port does not answer; absent when the host publishes every port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortsStatus {
    pub host: String,
    pub withheld: Vec<WithheldPort>,
}

/// A published port its host leaves out, and the host's server that holds it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WithheldPort {
    /// As published: `8080:80/tcp`.
    pub port: String,
    /// The server's socket: `0.0.0.0:8080/tcp`.
    pub server: String,
}

/// What a status of container `name` answers a wait for the container created at `revision`
/// (0: whichever): None while it is about another container of that name, else the sandbox, or
/// the host's error.
pub(crate) fn container_answer(
    name: &str,
    status: ContainerStatus,
    revision: i64,
) -> Option<Result<ContainerStatus>> {
    if status.container_revision != revision && revision != 0 {
        return None;
    }
    Some(match status.error {
        Some(error) => {
            Err(StoreError::HostCannot { host: status.host, what: format!("make container {name:?}"), error })
        }
        None => Ok(status),
    })
}

/// What a status of endpoint `ep` answers a wait for its interface: the interface, or the
/// host's error.
fn endpoint_answer(ep: &Endpoint, network: &str, status: EndpointStatus) -> Result<EndpointStatus> {
    match status.error {
        Some(error) => Err(StoreError::HostCannot {
            host: status.host,
            what: format!("attach container {:?} to network {network:?}", ep.container),
            error,
        }),
        None => Ok(status),
    }
}

/// Reads a status value, if it parses; a value that does not is treated as no status.
pub(crate) fn parse<T: DeserializeOwned>(kv: &KeyValue) -> Option<T> {
    serde_json::from_slice(kv.value()).ok()
}

impl Store {
    /// Every status: endpoints by id, containers by name.
    pub async fn statuses(
        &self,
    ) -> Result<(BTreeMap<String, EndpointStatus>, BTreeMap<String, ContainerStatus>)> {
        Ok((
            self.statuses_under(&self.keys.endpoint_statuses()).await?,
            self.statuses_under(&self.keys.container_statuses()).await?,
        ))
    }

    /// The statuses under `prefix` that parse, by the rest of their key (an id or a name).
    async fn statuses_under<T: DeserializeOwned>(&self, prefix: &str) -> Result<BTreeMap<String, T>> {
        Ok(self
            .list("status", prefix)
            .await?
            .iter()
            .filter_map(|kv| Some((key_str(kv).strip_prefix(prefix)?.to_owned(), parse(kv)?)))
            .collect())
    }

    /// Every container's ports its host leaves out, by container name.
    pub async fn port_statuses(&self) -> Result<BTreeMap<String, PortsStatus>> {
        self.statuses_under(&self.keys.port_statuses()).await
    }

    /// Waits until `check` accepts the key's value (None: the key is absent), or `deadline`.
    /// Survives etcd restarts and compactions meanwhile: it reads again and watches again.
    pub async fn wait_for<T>(
        &self,
        key: &str,
        what: &str,
        deadline: Instant,
        mut check: impl FnMut(Option<&KeyValue>) -> Option<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let watch = async {
            loop {
                match self.wait_round(key, &mut check).await {
                    Ok(Some(v)) => return v,
                    Ok(None) => {}
                    Err(e) => debug!(error = %e, "waiting on {key}; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::time::timeout_at(deadline, watch)
            .await
            .map_err(|_| StoreError::WaitTimeout { what: what.to_owned(), after: round(deadline - started) })
    }

    /// One read-then-watch; Ok(None) when the watch ended without an answer.
    async fn wait_round<T>(
        &self,
        key: &str,
        check: &mut impl FnMut(Option<&KeyValue>) -> Option<T>,
    ) -> Result<Option<T>> {
        let (kv, rev) = self.get("wait", key).await?;
        if let Some(v) = check(kv.as_ref()) {
            return Ok(Some(v));
        }
        let mut client = self.client.watch_client();
        let options = WatchOptions::new().with_start_revision(rev + 1);
        let mut stream = self.call(format!("watch {key}"), client.watch(key, Some(options))).await?;
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return Ok(None),
                Err(error) => {
                    return Err(StoreError::Etcd {
                        op: format!("watch {key}"),
                        endpoints: self.endpoints.clone(),
                        error,
                    });
                }
            };
            if resp.canceled() {
                return Ok(None);
            }
            for event in resp.events() {
                let kv = match event.event_type() {
                    EventType::Put => event.kv(),
                    EventType::Delete => None,
                };
                if let Some(v) = check(kv) {
                    return Ok(Some(v));
                }
            }
        }
    }

    /// Waits for the container's host to report its sandbox (of this very container: the
    /// status must name `revision`, the container's create revision), or that it cannot make
    /// it (`StoreError::HostCannot`, with the host's error).
    pub async fn wait_container_ready(
        &self,
        name: &str,
        host: &str,
        revision: i64,
        deadline: Instant,
    ) -> Result<ContainerStatus> {
        let key = self.keys.container_status(name);
        let what = format!(
            "host {host:?} to make container {name:?}'s sandbox (status {key}); is the agent on {host:?} running?"
        );
        self.wait_for(&key, &what, deadline, |kv| container_answer(name, parse(kv?)?, revision)).await?
    }

    /// Waits for the endpoint's host to report its interface, or that it cannot make it.
    pub async fn wait_endpoint_ready(
        &self,
        ep: &Endpoint,
        network: &str,
        deadline: Instant,
    ) -> Result<EndpointStatus> {
        let key = self.keys.endpoint_status(&ep.id);
        let what = format!(
            "host {:?} to attach container {:?} to network {network:?} (status {key}); is the agent on {:?} running?",
            ep.host, ep.container, ep.host
        );
        self.wait_for(&key, &what, deadline, |kv| Some(endpoint_answer(ep, network, parse(kv?)?))).await?
    }

    /// Waits until a status key is gone: the host took the thing down (or the host is gone).
    pub async fn wait_gone(&self, key: &str, what: &str, deadline: Instant) -> Result<()> {
        self.wait_for(key, what, deadline, |kv| kv.is_none().then_some(())).await
    }

    /// Waits for the endpoint's host to take down its interface (`network disconnect`).
    pub async fn wait_endpoint_detached(
        &self,
        ep: &Endpoint,
        network: &str,
        deadline: Instant,
    ) -> Result<()> {
        let key = self.keys.endpoint_status(&ep.id);
        let what = format!(
            "host {:?} to detach container {:?} from network {network:?} (status {key})",
            ep.host, ep.container
        );
        self.wait_gone(&key, &what, deadline).await
    }

    /// Waits for the host of a removed container (`container rm`) to take down its endpoints
    /// and then its sandbox.
    pub async fn wait_container_removed(
        &self,
        ctr: &Container,
        endpoints: &[Endpoint],
        deadline: Instant,
    ) -> Result<()> {
        let name = &ctr.name;
        for ep in endpoints {
            let key = self.keys.endpoint_status(&ep.id);
            let what = format!(
                "host {:?} to remove container {name:?}'s endpoint {} (status {key})",
                ep.host, ep.ipv4
            );
            self.wait_gone(&key, &what, deadline).await?;
        }
        let key = self.keys.container_status(name);
        let what = format!("host {:?} to remove container {name:?}'s sandbox (status {key})", ctr.host);
        self.wait_for(&key, &what, deadline, |kv| {
            // A status from another host is a new container of the same name, not this one.
            let gone = kv.is_none_or(|kv| parse::<ContainerStatus>(kv).is_some_and(|s| s.host != ctr.host));
            gone.then_some(())
        })
        .await
    }
}

/// Durations in error messages, to the tenth of a second.
fn round(d: Duration) -> Duration {
    Duration::from_millis((d.as_millis() as u64).div_ceil(100) * 100)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{ContainerStatus, container_answer};
    use crate::store::StoreError;

    fn status(revision: i64, error: Option<&str>) -> ContainerStatus {
        ContainerStatus {
            host: "h1".into(),
            netns: PathBuf::from("/run/netns/x"),
            pid: None,
            container_revision: revision,
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn a_wait_ends_with_the_sandbox_or_the_hosts_error_for_its_own_container_only() {
        let ready = container_answer("c1", status(7, None), 7).expect("an answer");
        assert_eq!(ready.expect("ready").netns, PathBuf::from("/run/netns/x"));
        let failed = container_answer("c1", status(7, Some("EINVAL")), 7).expect("an answer");
        let e = failed.expect_err("the host's error");
        assert!(matches!(e, StoreError::HostCannot { .. }));
        assert_eq!(e.to_string(), r#"host "h1" cannot make container "c1": EINVAL"#);
        // A status (failed or not) left by an earlier container of the same name: keep waiting.
        assert!(container_answer("c1", status(5, Some("EINVAL")), 7).is_none());
        assert!(container_answer("c1", status(5, None), 7).is_none());
        // Revision unknown (0): any status answers.
        assert!(container_answer("c1", status(5, Some("EINVAL")), 0).is_some_and(|a| a.is_err()));
    }

    #[test]
    fn status_values_without_an_error_field_still_parse_and_ready_ones_write_none() {
        let old = r#"{"host":"h1","netns":"/run/netns/x","container_revision":3}"#;
        let parsed: ContainerStatus = serde_json::from_str(old).expect("parses");
        assert_eq!(parsed, status(3, None));
        let written = serde_json::to_string(&status(3, None)).expect("serializes");
        assert!(!written.contains("error"), "{written}");
        let old_ep = r#"{"host":"h1","container":"c1","ifname":"eth0"}"#;
        let ep: super::EndpointStatus = serde_json::from_str(old_ep).expect("parses");
        assert_eq!(ep.error, None);
    }
}
