//! The agent's HTTP endpoint (axum, as the Docker plugin's and the CNI server's), for the probes
//! of whatever supervises the agent and for Prometheus:
//! - `GET /healthz`, liveness: 200 while the process serves, with a JSON body saying what the
//!   agent holds and its one check (`serving`);
//! - `GET /readyz`, readiness: 200 only while every check passes (the first full reconcile
//!   done, the last pass left nothing to retry, every pin in place, every attachment on its
//!   interface, the etcd watch up or down for less than the grace, the host registered, the
//!   safety brake holding nothing), 503 otherwise; the body names each check and which failed;
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
    /// Why the last reconcile pass did not do everything (None: it did).
    pub last_pass_error: Option<String>,
    /// What the agent's look at its pins and attachments (every second) found.
    pub datapath: DatapathCheck,
    /// The desired state comes from a file: there is no store to watch or register in.
    pub state_file: bool,
    /// The etcd watch (None: not started, or no etcd).
    pub etcd: Option<EtcdLink>,
    /// Renewals of the host's leases that failed, counted by the registration's task.
    #[serde(skip)]
    pub lease_renewals_failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Latencies the agent's loop observes, for `/metrics`.
    #[serde(skip)]
    pub latencies: metrics::Latencies,
    /// When the oldest watch event not yet taken by the agent's loop arrived (set by the
    /// follower, taken by the loop when it takes the batch).
    #[serde(skip)]
    pub watch_arrival: Option<std::time::Instant>,
    /// The desired state's objects by kind (networks, endpoints, containers, hosts), as of the
    /// last pass.
    pub objects: std::collections::BTreeMap<&'static str, usize>,
}

/// What the agent's last look at its pinned objects found.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct DatapathCheck {
    /// Pins gone that could not be made again.
    pub missing_pins: Vec<String>,
    /// Attachments detached from their interface (by hand: `bpftool link detach`).
    pub detached: Vec<String>,
    /// Attachments made again after they were detached, since the agent started.
    pub reattached: u64,
}

/// The etcd watch as the agent's follower sees it.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct EtcdLink {
    /// The watch is established.
    pub connected: bool,
    /// Unix time `connected` last changed.
    pub since: u64,
    /// Times the watch was established again after it was lost.
    pub reconnects: u64,
    /// Why it was last lost.
    pub error: Option<String>,
    /// Seconds the watch may be down before the host is not ready: the lease TTL, after which
    /// the other hosts stop sending to this one anyway.
    pub grace_secs: u64,
}

/// One readiness check: its name, whether it passes, and what it found.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>) -> Check {
    Check { name, ok, detail: detail.into() }
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
    /// Why the agent is not ready (empty: ready): the details of the failed checks.
    pub fn not_ready(&self) -> Vec<String> {
        self.checks(now()).into_iter().filter(|c| !c.ok).map(|c| c.detail).collect()
    }

    /// Every readiness check, at unix time `now`.
    pub fn checks(&self, now: u64) -> Vec<Check> {
        let list = |pins: &[String]| pins.join(", ");
        let mut checks = vec![
            if self.ready {
                check("reconciled", true, "the first full reconcile is done")
            } else {
                check("reconciled", false, "the first full reconcile is not done")
            },
            match &self.last_pass_error {
                None => check("last_reconcile", true, "the last reconcile pass did everything"),
                Some(why) => check("last_reconcile", false, format!("the last reconcile pass left {why}")),
            },
            if self.datapath.missing_pins.is_empty() {
                check("maps_pinned", true, "every pin is in place")
            } else {
                check("maps_pinned", false, format!("pins missing: {}", list(&self.datapath.missing_pins)))
            },
            if self.datapath.detached.is_empty() {
                check("programs_attached", true, "every attachment holds its interface")
            } else {
                check(
                    "programs_attached",
                    false,
                    format!("detached from their interface: {}", list(&self.datapath.detached)),
                )
            },
        ];
        checks.push(match (&self.etcd, self.state_file) {
            (_, true) => check("etcd_watch", true, "no etcd: the desired state is a file"),
            (None, false) => check("etcd_watch", true, "not started"),
            (Some(e), false) if e.connected => check("etcd_watch", true, "watching"),
            (Some(e), false) => {
                let down = now.saturating_sub(e.since);
                let error = e.error.as_deref().unwrap_or("not connected yet");
                let detail =
                    format!("the etcd watch is down for {down} s (grace {} s): {error}", e.grace_secs);
                check("etcd_watch", down < e.grace_secs, detail)
            }
        });
        checks.push(if self.state_file {
            check("registered", true, "no store to register in")
        } else if self.registered {
            check("registered", true, self.registration.clone())
        } else if self.registration.is_empty() {
            check("registered", false, "not registered")
        } else {
            check("registered", false, self.registration.clone())
        });
        checks.push(match &self.brake {
            None => check("brake", true, "the safety brake holds nothing"),
            Some(b) => check(
                "brake",
                false,
                format!(
                    "the safety brake holds a change that would remove {} of {} containers",
                    b.would_remove, b.of
                ),
            ),
        });
        checks
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
            // A port a server of the host holds is the server's, as Docker's -p fails there:
            // the container runs, so the agent is not failing (the status and log say why).
            Report::PortsWithheld { .. } => {}
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

/// Liveness: answering at all is the check. The body is the agent's health record, with the
/// check named the way /readyz names its own.
async fn healthz(State(e): State<Endpoint>) -> Response {
    let h = e.snapshot();
    let mut body = serde_json::to_value(&h).unwrap_or_default();
    body["checks"] = serde_json::json!([check("serving", true, "the agent answers")]);
    body["failed"] = serde_json::json!([]);
    json(StatusCode::OK, &body)
}

async fn readyz(State(e): State<Endpoint>) -> Response {
    let h = e.snapshot();
    let checks = h.checks(now());
    let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    let reasons: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.detail.as_str()).collect();
    let ready = failed.is_empty();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(
        status,
        &serde_json::json!({ "ready": ready, "checks": checks, "failed": failed, "reasons": reasons, "health": h }),
    )
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
    fn the_etcd_watch_may_be_down_for_its_grace_and_attachments_never() {
        let link = super::EtcdLink {
            connected: false,
            since: 1000,
            reconnects: 0,
            error: Some("connection refused".into()),
            grace_secs: 30,
        };
        let h = Health { ready: true, registered: true, etcd: Some(link), ..Health::default() };
        let failed = |h: &Health, now| {
            h.checks(now).into_iter().filter(|c| !c.ok).map(|c| (c.name, c.detail)).collect::<Vec<_>>()
        };
        assert_eq!(failed(&h, 1029), []);
        assert_eq!(
            failed(&h, 1030),
            [("etcd_watch", "the etcd watch is down for 30 s (grace 30 s): connection refused".to_owned())]
        );
        let mut h = Health { ready: true, registered: true, ..Health::default() };
        h.datapath.detached = vec!["/sys/fs/bpf/overlay/h1/links/ep_7".into()];
        h.last_pass_error = Some("1 keys to retry".into());
        let names: Vec<_> = failed(&h, 0).into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["last_reconcile", "programs_attached"]);
        // A state file has no store: nothing to watch or register in.
        let h = Health { ready: true, state_file: true, ..Health::default() };
        assert_eq!(failed(&h, 0), []);
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
