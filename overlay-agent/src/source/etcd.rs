//! etcd as the agent uses it: connect (retrying for as long as it takes), register this host
//! under a lease kept alive for the agent's life, then follow the desired state with
//! `store::EtcdSource`. All of it runs inside the source task, after the datapath is up, so an
//! agent started while etcd is down still takes over and keeps forwarding what it finds.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Report, Source};
use crate::{
    model::{Host, Update},
    store::{EtcdSource, HostRegistration, Store, StoreConfig},
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
        let mut backoff = BACKOFF_MIN;
        let store = loop {
            match Store::connect(&self.config).await {
                Ok(store) => break store,
                Err(e) => {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach etcd; the datapath keeps forwarding");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        };
        info!(endpoints = store.etcd_endpoints(), "connected to etcd");
        // Held for as long as the source runs: dropping it would stop renewing the lease.
        let registration = HostRegistration::spawn(store.clone(), self.host.clone(), self.lease_ttl);
        let source = EtcdSource::registered(store, &self.host.name, &registration);
        let result = source.run(updates, status).await;
        drop(registration);
        result
    }
}
