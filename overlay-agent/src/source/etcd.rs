//! etcd as the agent uses it: connect (retrying for as long as it takes), register this host
//! under a lease kept alive for the agent's life (`lease`), then follow the desired state with
//! `EtcdSource`: a `follow::Follower` that sends it, beside a `publish::Publisher` that writes
//! the agent's reports back. All of it runs inside the source task, after the datapath is up, so
//! an agent started while etcd is down still takes over and keeps forwarding what it finds.

use std::{path::PathBuf, time::Duration};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    Report, Source,
    follow::Follower,
    history::SeenFile,
    lease::{HostRegistration, Lifetimes, Registered},
    publish::Publisher,
};
use crate::{
    backoff::Backoff,
    model::{Host, Update},
    store::{Store, StoreConfig},
};

pub struct AgentEtcd {
    pub config: StoreConfig,
    /// With `agent` set: who serves it.
    pub host: Host,
    pub life: Lifetimes,
    /// Where the store's identity is kept across restarts.
    pub state_dir: PathBuf,
    pub health: Option<crate::health::Shared>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Source for AgentEtcd {
    async fn run(self, updates: mpsc::Sender<Update>, status: mpsc::Receiver<Report>) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let store = loop {
            match Store::connect(&self.config).await {
                Ok(store) => break store,
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach etcd; the datapath keeps forwarding");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        info!(endpoints = store.etcd_endpoints(), "connected to etcd");
        // Nothing is followed before the host is registered: an agent refused for a host
        // another agent holds must not make that host's containers here. Held for as long as
        // the source runs: dropping it would stop renewing the leases.
        let registration = HostRegistration::register(store.clone(), self.host.clone(), self.life).await?;
        if let (Some(health), Registered::Yes(leases)) = (&self.health, &*registration.state().borrow()) {
            // Before the first snapshot, so the safety brake judges it with this in mind.
            doubt_if_fresh(health, leases);
        }
        if let Some(health) = &self.health {
            tokio::spawn(mirror_registration(registration.state(), health.clone()));
            if let Ok(mut h) = health.lock() {
                h.lease_renewals_failed = registration.renewals_failed();
            }
        }
        let mut source = EtcdSource::registered(store, &self.host.name, &registration);
        source.state_dir = Some(self.state_dir);
        source.health = self.health;
        // Boxed: the follow loop's future is large (tens of KiB) and would sit on the stack.
        let result = Box::pin(source.run(updates, status)).await;
        drop(registration);
        result
    }

    fn attach_health(&mut self, health: crate::health::Shared) {
        if let Ok(mut h) = health.lock() {
            // Down from the start until the first watch is up; readiness allows it the lease's
            // TTL, as it does a watch lost later.
            h.etcd = Some(crate::health::EtcdLink {
                since: crate::health::now(),
                grace_secs: self.life.ttl.as_secs(),
                ..Default::default()
            });
        }
        self.health = Some(health);
    }
}

/// A host registered afresh while it may run containers: the store did not hold its
/// registration (emptied, restored from before the host existed, garbage-collected), so what it
/// says about this host's containers is in doubt until an operator or the safety brake's judge
/// says otherwise.
fn doubt_if_fresh(health: &crate::health::Shared, leases: &crate::store::host::Leases) {
    if leases.fresh
        && let Ok(mut h) = health.lock()
    {
        h.store_resets += 1;
        h.last_store_reset = Some("the store held no registration of this host: its records are new".into());
    }
}

/// Keeps health's view of the registration current.
async fn mirror_registration(mut state: watch::Receiver<Registered>, health: crate::health::Shared) {
    let mut first = true;
    loop {
        let now = state.borrow_and_update().clone();
        if let Registered::Yes(leases) = &now
            && !std::mem::take(&mut first)
        {
            doubt_if_fresh(&health, leases);
        }
        if let Ok(mut h) = health.lock() {
            h.registered = matches!(now, Registered::Yes(_));
            h.registration = match now {
                Registered::Yes(l) => {
                    format!("registered (records lease {:x}, liveness lease {:x})", l.records, l.alive)
                }
                Registered::No(why) => format!("not registered: {why}"),
            };
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// The agent's desired state followed in etcd, and its reports published there.
pub struct EtcdSource {
    store: Store,
    host: String,
    lease: watch::Receiver<i64>,
    beats: Option<watch::Receiver<Option<(u64, i64)>>>,
    recheck: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// Where the store's identity is kept (None: nowhere).
    pub state_dir: Option<PathBuf>,
    pub health: Option<crate::health::Shared>,
}

impl EtcdSource {
    /// `host` is the agent's host, named in the reports it publishes; `lease` the lease they are
    /// published under (0: none), as a `HostRegistration` follows it.
    pub fn new(store: Store, host: impl Into<String>, lease: watch::Receiver<i64>) -> Self {
        Self { store, host: host.into(), lease, beats: None, recheck: None, state_dir: None, health: None }
    }

    /// A source whose reports live under the registration's lease.
    pub fn registered(store: Store, host: impl Into<String>, registration: &HostRegistration) -> Self {
        Self {
            beats: Some(registration.headers()),
            recheck: Some(registration.recheck()),
            ..Self::new(store, host, registration.leases())
        }
    }
}

impl Source for EtcdSource {
    async fn run(self, updates: mpsc::Sender<Update>, status: mpsc::Receiver<Report>) -> anyhow::Result<()> {
        let (live_tx, live_rx) = mpsc::unbounded_channel();
        let publisher = Publisher::new(self.store.clone(), self.host.clone(), self.lease);
        let publishing = AbortOnDrop(tokio::spawn(publisher.run(status, live_rx)));
        let agent = updates.clone();
        let (seen, before) = SeenFile::open(self.state_dir.as_deref());
        let follower = Follower {
            store: self.store,
            host: self.host.clone(),
            updates,
            live: live_tx,
            beats: self.beats,
            seen,
            before,
            health: self.health,
            last_event: None,
            recheck: self.recheck,
        };
        // The agent may stop reading while nothing is sent (etcd down, or a quiet store).
        tokio::select! {
            () = follower.run() => {}
            () = agent.closed() => {}
        }
        drop(publishing);
        Ok(())
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
