//! etcd as the agent uses it: connect (retrying for as long as it takes), register this host
//! under a lease kept alive for the agent's life (`lease`), then follow the desired state with
//! `EtcdSource`: a `follow::Follower` that sends it, beside a `publish::Publisher` that writes
//! the agent's reports back. All of it runs inside the source task, after the datapath is up, so
//! an agent started while etcd is down still takes over and keeps forwarding what it finds.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{Report, Source, follow::Follower, lease::HostRegistration, publish::Publisher};
use crate::{
    backoff::Backoff,
    model::{Host, Update},
    store::{Store, StoreConfig},
};

pub struct AgentEtcd {
    pub config: StoreConfig,
    pub host: Host,
    pub lease_ttl: Duration,
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
        // Held for as long as the source runs: dropping it would stop renewing the lease.
        let registration = HostRegistration::spawn(store.clone(), self.host.clone(), self.lease_ttl);
        let source = EtcdSource::registered(store, &self.host.name, &registration);
        // Boxed: the follow loop's future is large (tens of KiB) and would sit on the stack.
        let result = Box::pin(source.run(updates, status)).await;
        drop(registration);
        result
    }
}

/// The agent's desired state followed in etcd, and its reports published there.
pub struct EtcdSource {
    store: Store,
    host: String,
    lease: watch::Receiver<i64>,
}

impl EtcdSource {
    /// `host` is the agent's host, named in the reports it publishes; `lease` the lease they are
    /// published under (0: none), as a `HostRegistration` follows it.
    pub fn new(store: Store, host: impl Into<String>, lease: watch::Receiver<i64>) -> Self {
        Self { store, host: host.into(), lease }
    }

    /// A source whose reports live under the registration's lease.
    pub fn registered(store: Store, host: impl Into<String>, registration: &HostRegistration) -> Self {
        Self::new(store, host, registration.leases())
    }
}

impl Source for EtcdSource {
    async fn run(self, updates: mpsc::Sender<Update>, status: mpsc::Receiver<Report>) -> anyhow::Result<()> {
        let (live_tx, live_rx) = mpsc::unbounded_channel();
        let publisher = Publisher::new(self.store.clone(), self.host.clone(), self.lease);
        let publishing = AbortOnDrop(tokio::spawn(publisher.run(status, live_rx)));
        let agent = updates.clone();
        let follower = Follower { store: self.store, host: self.host.clone(), updates, live: live_tx };
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
