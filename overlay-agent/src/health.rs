//! The agent's health endpoint, for the probes of whatever supervises the agent, with a JSON body
//! saying what the agent holds:
//! - `GET /healthz` answers 200 once the first full reconcile is done (503 before);
//! - `GET /readyz` answers 200 only while the host is also registered in the store and the
//!   safety brake is not holding anything (503 with the reasons otherwise);
//! - `POST /brake/release` is the operator's explicit go-ahead for a change the safety brake
//!   holds (agent.rs).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tracing::{info, warn};

use crate::source::Report;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Health {
    pub host: String,
    /// The first full reconcile is done: the datapath matches the desired state.
    pub ready: bool,
    pub xdp: bool,
    pub uplink: String,
    /// Entries in the endpoint map (local and remote).
    pub map_endpoints: usize,
    /// Unix time of the last reconcile pass.
    pub last_reconcile: u64,
    /// Keys that failed and wait for a retry.
    pub pending_retries: usize,
    /// The host is registered in the store (both its leases held).
    pub registered: bool,
    /// Why it is, or is not.
    pub registration: String,
    /// Times the agent had to read the whole store again without being able to follow it change
    /// by change: the store was not the one followed (replaced, rolled back, emptied, holding
    /// no registration of this host) or had compacted what the watch needed. Each makes the
    /// safety brake judge the next state read.
    pub store_resets: u64,
    pub last_store_reset: Option<String>,
    /// What the safety brake holds back, if anything.
    pub brake: Option<Brake>,
    /// What the agent cannot make real now (also in the store's status keys), by container.
    pub failures: Vec<Failure>,
}

/// A change the safety brake did not apply: it would have removed `would_remove` of the `of`
/// containers this host runs.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Brake {
    pub would_remove: usize,
    pub of: usize,
    /// Some of their names.
    pub containers: Vec<String>,
    /// Unix time the brake engaged.
    pub since: u64,
}

/// A container, or one of its endpoints, that the agent cannot make (it keeps trying).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub container: String,
    /// The endpoint, when it is one of the container's endpoints that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub error: String,
}

impl Health {
    /// Why the agent is not ready (empty: ready).
    pub fn not_ready(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.ready {
            why.push("the first full reconcile is not done".to_owned());
        }
        if !self.registered {
            why.push(if self.registration.is_empty() {
                "not registered".to_owned()
            } else {
                self.registration.clone()
            });
        }
        if let Some(b) = &self.brake {
            why.push(format!(
                "the safety brake holds a change that would remove {} of {} containers",
                b.would_remove, b.of
            ));
        }
        why
    }

    /// Keeps `failures` in step with a report the agent sends to the store.
    pub fn note(&mut self, report: &Report) {
        match report {
            Report::ContainerFailed { name, error, .. } => {
                self.failures.retain(|f| !(f.container == *name && f.endpoint.is_none()));
                self.failures.push(Failure { container: name.clone(), endpoint: None, error: error.clone() });
            }
            Report::ContainerReady { name, .. } | Report::ContainerGone { name } => {
                self.failures.retain(|f| !(f.container == *name && f.endpoint.is_none()));
            }
            Report::EndpointFailed { id, container, error } => {
                self.failures.retain(|f| f.endpoint.as_ref() != Some(id));
                self.failures.push(Failure {
                    container: container.clone(),
                    endpoint: Some(id.clone()),
                    error: error.clone(),
                });
            }
            Report::EndpointReady { id, .. } | Report::EndpointGone { id } => {
                self.failures.retain(|f| f.endpoint.as_ref() != Some(id));
            }
        }
    }
}

pub type Shared = Arc<Mutex<Health>>;

pub fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Serves the endpoints on `addr` until the runtime ends; a brake release is sent on `release`.
pub async fn serve(
    addr: SocketAddr,
    health: Shared,
    release: tokio::sync::mpsc::UnboundedSender<()>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "health endpoint listening");
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { continue };
            let health = health.clone();
            let release = release.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let Ok(n) = conn.read(&mut buf).await else { return };
                let request = String::from_utf8_lossy(&buf[..n]);
                let mut words = request.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let h = health.lock().map(|h| h.clone()).unwrap_or_default();
                let unavailable = "503 Service Unavailable";
                let (code, body) = match (method, path) {
                    ("GET", "/healthz") => (
                        if h.ready { "200 OK" } else { unavailable },
                        serde_json::to_string(&h).unwrap_or_default(),
                    ),
                    ("GET", "/readyz") => {
                        let why = h.not_ready();
                        let body =
                            serde_json::json!({ "ready": why.is_empty(), "reasons": why, "health": h });
                        (if why.is_empty() { "200 OK" } else { unavailable }, body.to_string())
                    }
                    ("POST", "/brake/release") if h.brake.is_some() => {
                        warn!("the operator released the safety brake");
                        let _ = release.send(());
                        ("200 OK", serde_json::json!({ "released": h.brake }).to_string())
                    }
                    ("POST", "/brake/release") => {
                        ("409 Conflict", r#"{"error":"the brake holds nothing"}"#.to_owned())
                    }
                    _ => ("404 Not Found", "{}".to_owned()),
                };
                let response = format!(
                    "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = conn.write_all(response.as_bytes()).await {
                    warn!(error = %e, "health response");
                }
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{Failure, Health};
    use crate::source::Report;

    #[test]
    fn failures_come_with_failed_reports_and_go_with_ready_or_gone_ones() {
        let mut h = Health::default();
        let failed = |error: &str| Report::ContainerFailed {
            name: "c1".into(),
            revision: 3,
            netns: PathBuf::from("/run/netns/x"),
            error: error.into(),
        };
        h.note(&failed("EINVAL"));
        h.note(&failed("ENETUNREACH"));
        h.note(&Report::EndpointFailed { id: "e1".into(), container: "c2".into(), error: "EEXIST".into() });
        assert_eq!(
            h.failures,
            [
                Failure { container: "c1".into(), endpoint: None, error: "ENETUNREACH".into() },
                Failure { container: "c2".into(), endpoint: Some("e1".into()), error: "EEXIST".into() },
            ]
        );
        h.note(&Report::ContainerReady { name: "c1".into(), revision: 3, netns: PathBuf::new(), pid: None });
        h.note(&Report::EndpointGone { id: "e1".into() });
        assert!(h.failures.is_empty(), "{:?}", h.failures);
    }

    #[test]
    fn ready_only_when_reconciled_registered_and_unbraked() {
        let mut h = Health { ready: true, registered: true, ..Health::default() };
        assert!(h.not_ready().is_empty());
        h.registered = false;
        h.registration = "not registered: its liveness lease ran out or etcd lost it".into();
        assert_eq!(h.not_ready(), ["not registered: its liveness lease ran out or etcd lost it"]);
        h.registered = true;
        h.brake = Some(super::Brake { would_remove: 3, of: 3, containers: vec!["a".into()], since: 1 });
        assert_eq!(h.not_ready(), ["the safety brake holds a change that would remove 3 of 3 containers"]);
        h.ready = false;
        assert_eq!(h.not_ready().len(), 2);
    }
}
