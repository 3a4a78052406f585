//! The agent's HTTP endpoint (axum), for the probes of whatever supervises the agent and for
//! Prometheus:
//! - `GET /healthz` answers 200 once the first full reconcile is done (503 before), with a JSON
//!   body saying what the agent holds;
//! - `GET /readyz` answers 200 only while the host is also registered in the store and the
//!   safety brake is not holding anything (503 with the reasons otherwise);
//! - `POST /brake/release` is the operator's explicit go-ahead for a change the safety brake
//!   holds (agent.rs);
//! - `GET /metrics`: Prometheus metrics (metrics.rs).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{datapath::PinDir, metrics, source::Report};

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
    /// Reconcile passes and their durations, for `/metrics`.
    #[serde(skip)]
    pub reconcile: metrics::Passes,
    /// The resolver's queries by outcome, for `/metrics`.
    #[serde(skip)]
    pub dns: crate::resolver::serve::Counts,
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

/// What the handlers share.
#[derive(Clone)]
struct Endpoint {
    health: Shared,
    release: tokio::sync::mpsc::UnboundedSender<()>,
    pins: PinDir,
}

impl Endpoint {
    fn snapshot(&self) -> Health {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn healthz(State(e): State<Endpoint>) -> Response {
    let h = e.snapshot();
    let status = if h.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(status, &serde_json::to_value(&h).unwrap_or_default())
}

async fn readyz(State(e): State<Endpoint>) -> Response {
    let h = e.snapshot();
    let why = h.not_ready();
    let status = if why.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(status, &serde_json::json!({ "ready": why.is_empty(), "reasons": why, "health": h }))
}

async fn brake_release(State(e): State<Endpoint>) -> Response {
    let h = e.snapshot();
    if h.brake.is_none() {
        return json(StatusCode::CONFLICT, &serde_json::json!({ "error": "the brake holds nothing" }));
    }
    warn!("the operator released the safety brake");
    let _ = e.release.send(());
    json(StatusCode::OK, &serde_json::json!({ "released": h.brake }))
}

async fn metrics_text(State(e): State<Endpoint>) -> Response {
    let h = e.snapshot();
    let pins = e.pins.clone();
    // Reading the pinned counters is a few syscalls per counter: off the async threads.
    let text = tokio::task::spawn_blocking(move || metrics::render(&h, &pins)).await.unwrap_or_default();
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

async fn not_found() -> Response {
    json(StatusCode::NOT_FOUND, &serde_json::json!({}))
}

/// Serves the endpoints on `addr` until the runtime ends; a brake release is sent on `release`;
/// `/metrics` reads the datapath's counters from the pins at `pins`.
pub async fn serve(
    addr: SocketAddr,
    health: Shared,
    release: tokio::sync::mpsc::UnboundedSender<()>,
    pins: PinDir,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "health and metrics endpoint listening");
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/brake/release", post(brake_release))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(Endpoint { health, release, pins });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "the health endpoint stopped");
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
