//! The status publisher: the agent's reports, written to the store as status keys under the
//! host's lease (so a dead host's reports vanish with it), and removed when the agent took the
//! thing down. A thing the agent cannot make gets a status too, carrying the error, so the CLI
//! stops waiting and prints it. The CLI waits on these keys (`store::status`).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use etcd_client::{KeyValue, TxnOp};
use serde::Deserialize;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::warn;

use super::Report;
use crate::{
    backoff::Backoff,
    store::{
        ContainerStatus, EndpointStatus, PortsStatus, Result, Store,
        endpoint::put_leased,
        etcd::{key_str, unchanged},
        status::parse,
    },
};

/// Publishes an agent's reports. It never blocks the agent: reports are recorded as the value
/// each status key should have, and written (again) until etcd has taken them; a lease change
/// (the host registered again) rewrites them all under the new lease.
pub(crate) struct Publisher {
    store: Store,
    host: String,
    lease: watch::Receiver<i64>,
    /// What each status key should hold: Some(value), or None for "not ours to keep".
    wanted: BTreeMap<String, Option<Vec<u8>>>,
    /// Keys whose wanted value etcd does not have yet.
    dirty: BTreeSet<String>,
    /// Objects present in the last snapshot; our status keys about anything else are removed.
    prune: Option<Live>,
}

/// What a snapshot held, for pruning reports about things that are gone.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub endpoints: BTreeSet<String>,
    pub containers: BTreeSet<String>,
}

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl Publisher {
    pub fn new(store: Store, host: String, lease: watch::Receiver<i64>) -> Self {
        Self { store, host, lease, wanted: BTreeMap::new(), dirty: BTreeSet::new(), prune: None }
    }

    pub async fn run(
        mut self,
        mut reports: mpsc::Receiver<Report>,
        mut snapshots: mpsc::UnboundedReceiver<Live>,
    ) {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        let mut retry_at: Option<Instant> = None;
        let mut lease_open = true;
        loop {
            tokio::select! {
                report = reports.recv() => {
                    let Some(report) = report else { return };
                    self.note(report);
                    while let Ok(report) = reports.try_recv() {
                        self.note(report);
                    }
                }
                live = snapshots.recv() => match live {
                    Some(live) => self.prune = Some(live),
                    None => return,
                },
                changed = self.lease.changed(), if lease_open => {
                    if changed.is_err() {
                        lease_open = false;
                        continue;
                    }
                    let keys: Vec<String> =
                        self.wanted.iter().filter(|(_, v)| v.is_some()).map(|(k, _)| k.clone()).collect();
                    self.dirty.extend(keys);
                }
                () = sleep_until(retry_at) => {}
            }
            if self.flush().await {
                backoff.reset();
                retry_at = None;
            } else {
                retry_at = Some(Instant::now() + backoff.next_delay());
            }
        }
    }

    fn note(&mut self, report: Report) {
        let k = self.store.keys();
        let (key, value) = match report {
            Report::EndpointReady { id, container, ifname } => {
                let status = EndpointStatus { host: self.host.clone(), container, ifname, error: None };
                (k.endpoint_status(&id), Some(serde_json::to_vec(&status).expect("serializes")))
            }
            Report::EndpointFailed { id, container, error } => {
                let status = EndpointStatus {
                    host: self.host.clone(),
                    container,
                    ifname: String::new(),
                    error: Some(error),
                };
                (k.endpoint_status(&id), Some(serde_json::to_vec(&status).expect("serializes")))
            }
            Report::EndpointGone { id } => (k.endpoint_status(&id), None),
            Report::ContainerReady { name, revision, netns, pid } => {
                let status = ContainerStatus {
                    host: self.host.clone(),
                    netns,
                    pid,
                    container_revision: revision,
                    error: None,
                };
                (k.container_status(&name), Some(serde_json::to_vec(&status).expect("serializes")))
            }
            Report::ContainerFailed { name, revision, netns, error } => {
                let status = ContainerStatus {
                    host: self.host.clone(),
                    netns,
                    pid: None,
                    container_revision: revision,
                    error: Some(error),
                };
                (k.container_status(&name), Some(serde_json::to_vec(&status).expect("serializes")))
            }
            Report::ContainerGone { name } => (k.container_status(&name), None),
            Report::PortsWithheld { container, withheld } => {
                let value = (!withheld.is_empty()).then(|| {
                    let status = PortsStatus { host: self.host.clone(), withheld };
                    serde_json::to_vec(&status).expect("serializes")
                });
                (k.port_status(&container), value)
            }
        };
        self.wanted.insert(key.clone(), value);
        self.dirty.insert(key);
    }

    /// Writes what is dirty; returns false if something must be tried again.
    async fn flush(&mut self) -> bool {
        let mut ok = true;
        let lease = *self.lease.borrow();
        for key in std::mem::take(&mut self.dirty) {
            let result = match self.wanted.get(&key).cloned().flatten() {
                Some(value) => self.put(&key, value, lease).await,
                None => self.remove_if_ours(&key).await,
            };
            match result {
                Ok(()) => {
                    if self.wanted.get(&key).is_some_and(Option::is_none) {
                        self.wanted.remove(&key);
                    }
                }
                Err(e) => {
                    warn!(key, error = %e, "cannot publish status; will retry");
                    self.dirty.insert(key);
                    ok = false;
                }
            }
        }
        if let Some(live) = self.prune.take()
            && let Err(e) = self.prune(&live).await
        {
            warn!(error = %e, "cannot remove stale status; will retry");
            self.prune = Some(live);
            ok = false;
        }
        ok
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
        self.store.commit("publish status", vec![], vec![put_leased(key.to_owned(), value, lease)]).await?;
        Ok(())
    }

    /// Deletes a status key if this host wrote it: a container of the same name may already
    /// live on another host, whose report must stay.
    async fn remove_if_ours(&self, key: &str) -> Result<()> {
        let (kv, _) = self.store.get("remove status", key).await?;
        let Some(kv) = kv else { return Ok(()) };
        if reporter(&kv).as_deref() != Some(self.host.as_str()) {
            return Ok(());
        }
        self.store
            .commit("remove status", vec![unchanged(key, Some(&kv))], vec![TxnOp::delete(key, None)])
            .await?;
        Ok(())
    }

    async fn prune(&self, live: &Live) -> Result<()> {
        let k = self.store.keys();
        for (prefix, names) in [
            (k.endpoint_statuses(), &live.endpoints),
            (k.container_statuses(), &live.containers),
            (k.port_statuses(), &live.containers),
        ] {
            for kv in self.store.list("prune status", &prefix).await? {
                let key = key_str(&kv);
                let Some(name) = key.strip_prefix(&prefix) else { continue };
                let ours = reporter(&kv).as_deref() == Some(self.host.as_str());
                if !ours || names.contains(name) || self.wanted.get(&key).is_some_and(Option::is_some) {
                    continue;
                }
                self.store
                    .commit(
                        "prune status",
                        vec![unchanged(&key, Some(&kv))],
                        vec![TxnOp::delete(key.as_str(), None)],
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The host named in a status value.
fn reporter(kv: &KeyValue) -> Option<String> {
    #[derive(Deserialize)]
    struct Any {
        host: String,
    }
    parse::<Any>(kv).map(|a| a.host)
}
