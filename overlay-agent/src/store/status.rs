//! What hosts report: an agent publishes a key per endpoint and container it made real, under
//! its host's lease (so a dead host's reports vanish with it), and removes the key when it took
//! the thing down. The CLI watches these keys to wait until a change is real.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{EventType, KeyValue, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{debug, warn};

use super::{
    Result, Store, StoreError,
    endpoint::put_leased,
    etcd::{key_str, unchanged},
};
use crate::{model::Endpoint, source::Report};

/// `<prefix>/status/endpoints/<endpoint id>`: the endpoint's interface exists on its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub host: String,
    pub container: String,
    /// The interface inside the container.
    pub ifname: String,
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
}

/// Reads a status value, if it parses; a value that does not is treated as no status.
fn parse<T: DeserializeOwned>(kv: &KeyValue) -> Option<T> {
    serde_json::from_slice(kv.value()).ok()
}

/// The host named in a status value.
fn reporter(kv: &KeyValue) -> Option<String> {
    #[derive(Deserialize)]
    struct Any {
        host: String,
    }
    parse::<Any>(kv).map(|a| a.host)
}

impl Store {
    pub async fn endpoint_status(&self, id: &str) -> Result<Option<EndpointStatus>> {
        let (kv, _) = self.get("endpoint status", &self.keys.endpoint_status(id)).await?;
        Ok(kv.as_ref().and_then(parse))
    }

    pub async fn container_status(&self, name: &str) -> Result<Option<ContainerStatus>> {
        let (kv, _) = self.get("container status", &self.keys.container_status(name)).await?;
        Ok(kv.as_ref().and_then(parse))
    }

    /// Every status: endpoints by id, containers by name.
    pub async fn statuses(
        &self,
    ) -> Result<(BTreeMap<String, EndpointStatus>, BTreeMap<String, ContainerStatus>)> {
        let eps = self.list("status", &self.keys.endpoint_statuses()).await?;
        let ctrs = self.list("status", &self.keys.container_statuses()).await?;
        let ep_prefix = self.keys.endpoint_statuses();
        let ctr_prefix = self.keys.container_statuses();
        let by_key = |kvs: Vec<KeyValue>, prefix: &str| {
            kvs.iter()
                .filter_map(|kv| Some((key_str(kv).strip_prefix(prefix)?.to_owned(), kv.clone())))
                .collect::<Vec<_>>()
        };
        Ok((
            by_key(eps, &ep_prefix).into_iter().filter_map(|(k, kv)| Some((k, parse(&kv)?))).collect(),
            by_key(ctrs, &ctr_prefix).into_iter().filter_map(|(k, kv)| Some((k, parse(&kv)?))).collect(),
        ))
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
    /// status must name `revision`, the container's create revision).
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
        self.wait_for(&key, &what, deadline, |kv| {
            let status: ContainerStatus = parse(kv?)?;
            (status.container_revision == revision || revision == 0).then_some(status)
        })
        .await
    }

    /// Waits for the endpoint's host to report its interface.
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
        self.wait_for(&key, &what, deadline, |kv| parse(kv?)).await
    }

    /// Waits until a status key is gone: the host took the thing down (or the host is gone).
    pub async fn wait_gone(&self, key: &str, what: &str, deadline: Instant) -> Result<()> {
        self.wait_for(key, what, deadline, |kv| kv.is_none().then_some(())).await
    }
}

/// Durations in error messages, to the tenth of a second.
fn round(d: Duration) -> Duration {
    Duration::from_millis((d.as_millis() as u64).div_ceil(100) * 100)
}

/// Publishes an agent's reports. It never blocks the agent: reports are recorded as the value
/// each status key should have, and written (again) until etcd has taken them; a lease change
/// (the host registered again) rewrites them all under the new lease.
pub(crate) struct Publisher {
    store: Store,
    host: String,
    lease: watch::Receiver<i64>,
    /// Container name -> create revision of its key, as the source last saw it.
    revisions: Arc<Mutex<HashMap<String, i64>>>,
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
    pub fn new(
        store: Store,
        host: String,
        lease: watch::Receiver<i64>,
        revisions: Arc<Mutex<HashMap<String, i64>>>,
    ) -> Self {
        Self { store, host, lease, revisions, wanted: BTreeMap::new(), dirty: BTreeSet::new(), prune: None }
    }

    pub async fn run(
        mut self,
        mut reports: mpsc::Receiver<Report>,
        mut snapshots: mpsc::UnboundedReceiver<Live>,
    ) {
        let mut delay = RETRY_MIN;
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
                _ = sleep_until(retry_at) => {}
            }
            if self.flush().await {
                delay = RETRY_MIN;
                retry_at = None;
            } else {
                retry_at = Some(Instant::now() + delay);
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }

    fn note(&mut self, report: Report) {
        let k = self.store.keys();
        let (key, value) = match report {
            Report::EndpointReady { id, container, ifname } => {
                let status = EndpointStatus { host: self.host.clone(), container, ifname };
                (k.endpoint_status(&id), Some(serde_json::to_vec(&status).expect("serializes")))
            }
            Report::EndpointGone { id } => (k.endpoint_status(&id), None),
            Report::ContainerReady { name, netns, pid } => {
                let container_revision =
                    self.revisions.lock().expect("not poisoned").get(&name).copied().unwrap_or(0);
                let status = ContainerStatus { host: self.host.clone(), netns, pid, container_revision };
                (k.container_status(&name), Some(serde_json::to_vec(&status).expect("serializes")))
            }
            Report::ContainerGone { name } => (k.container_status(&name), None),
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
        for (prefix, names) in
            [(k.endpoint_statuses(), &live.endpoints), (k.container_statuses(), &live.containers)]
        {
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
