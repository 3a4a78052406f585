//! `EtcdSource`: the agent's desired state, followed in etcd.
//!
//! It reads every network, endpoint, container and host at one revision and sends that as a
//! snapshot, then watches the prefix from the next revision, so no change falls between the two,
//! and turns each event into a Put or Delete. When the connection breaks it waits (sending
//! nothing: the datapath keeps what it has) and watches again from the last revision it
//! delivered; only if etcd compacted that revision away does it read everything again and send
//! a new snapshot. The agent's reports are published by a `status::Publisher` beside it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{EventType, KeyValue, WatchOptions};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    Result, Store, StoreError,
    etcd::key_str,
    host::HostRegistration,
    keys::Kind,
    status::{Live, Publisher},
};
use crate::{
    model::{Container, Endpoint, Host, Network, Object, ObjectRef, State, Update},
    source::{Report, Source},
};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

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
        let revisions = Arc::new(Mutex::new(HashMap::new()));
        let (live_tx, live_rx) = mpsc::unbounded_channel();
        let publisher = Publisher::new(self.store.clone(), self.host.clone(), self.lease, revisions.clone());
        let publishing = AbortOnDrop(tokio::spawn(publisher.run(status, live_rx)));
        let agent = updates.clone();
        let follower =
            Follower { store: self.store, host: self.host.clone(), updates, revisions, live: live_tx };
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

/// Why following the watch stopped.
enum Stop {
    /// The agent stopped reading updates.
    AgentGone,
    /// The revision to resume from was compacted: read everything again.
    Compacted(i64),
    Failed(StoreError),
}

struct Follower {
    store: Store,
    /// This agent's host: only its containers are reported on, so only theirs are tracked.
    host: String,
    updates: mpsc::Sender<Update>,
    /// Container name -> create revision of its key, for the publisher (this host's only).
    revisions: Arc<Mutex<HashMap<String, i64>>>,
    live: mpsc::UnboundedSender<Live>,
}

impl Follower {
    async fn run(self) {
        let mut backoff = BACKOFF_MIN;
        // The revision everything up to which has been delivered; None: a snapshot is due.
        let mut delivered: Option<i64> = None;
        loop {
            let from = match delivered {
                Some(rev) => rev,
                None => match self.snapshot().await {
                    Ok(Some(rev)) => rev,
                    Ok(None) => return,
                    Err(e) => {
                        warn!(error = %e, "cannot read the desired state from etcd; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                },
            };
            delivered = Some(from);
            let mut progressed = false;
            match self.follow(from, &mut delivered, &mut progressed).await {
                Stop::AgentGone => return,
                Stop::Compacted(at) => {
                    warn!(
                        resume = from + 1,
                        compacted = at,
                        "etcd compacted the revisions the watch needed; reading everything again"
                    );
                    delivered = None;
                }
                Stop::Failed(e) => {
                    if progressed {
                        backoff = BACKOFF_MIN;
                    }
                    warn!(error = %e, resume = delivered.unwrap_or(from) + 1, "lost the etcd watch; resuming");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Reads and sends a snapshot; returns its revision (None: the agent is gone).
    async fn snapshot(&self) -> Result<Option<i64>> {
        let (state, rev, revisions) = load(&self.store, Some(&self.host)).await?;
        info!(
            revision = rev,
            networks = state.networks.len(),
            endpoints = state.endpoints.len(),
            containers = state.containers.len(),
            hosts = state.hosts.len(),
            "desired state read from etcd"
        );
        let live = Live {
            endpoints: state.endpoints.keys().cloned().collect(),
            containers: state.containers.keys().cloned().collect(),
        };
        *self.revisions.lock().expect("not poisoned") = revisions;
        if self.updates.send(Update::Snapshot(state)).await.is_err() {
            return Ok(None);
        }
        let _ = self.live.send(live);
        Ok(Some(rev))
    }

    async fn follow(&self, from: i64, delivered: &mut Option<i64>, progressed: &mut bool) -> Stop {
        let store = &self.store;
        let mut client = store.client.watch_client();
        let options = WatchOptions::new().with_prefix().with_start_revision(from + 1).with_progress_notify();
        let mut stream = match store.call("watch", client.watch(store.keys.root(), Some(options))).await {
            Ok(s) => s,
            Err(e) => return Stop::Failed(e),
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return Stop::Failed(StoreError::Unreachable {
                        op: "watch: stream closed".into(),
                        endpoints: store.endpoints.clone(),
                        after: Duration::ZERO,
                    });
                }
                Err(error) => {
                    return Stop::Failed(StoreError::Etcd {
                        op: "watch".into(),
                        endpoints: store.endpoints.clone(),
                        error,
                    });
                }
            };
            if resp.compact_revision() > 0 {
                return Stop::Compacted(resp.compact_revision());
            }
            if resp.canceled() {
                return Stop::Failed(StoreError::Unreachable {
                    op: format!("watch canceled: {}", resp.cancel_reason()),
                    endpoints: store.endpoints.clone(),
                    after: Duration::ZERO,
                });
            }
            *progressed = true;
            if resp.events().is_empty() {
                // A progress notification: everything up to its revision has been sent. (The
                // revision of the "created" answer promises nothing of the kind.)
                if !resp.created()
                    && let Some(h) = resp.header()
                {
                    *delivered = Some(delivered.unwrap_or(0).max(h.revision()));
                }
                continue;
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                if let Some(update) = self.translate(event.event_type(), kv)
                    && self.updates.send(update).await.is_err()
                {
                    return Stop::AgentGone;
                }
                *delivered = Some(kv.mod_revision());
            }
        }
    }

    fn translate(&self, kind: EventType, kv: &KeyValue) -> Option<Update> {
        let key = key_str(kv);
        let Kind::Object(what) = self.store.keys.parse(&key) else { return None };
        match kind {
            EventType::Delete => {
                if let ObjectRef::Container(name) = &what {
                    self.revisions.lock().expect("not poisoned").remove(name);
                }
                Some(Update::Delete(what))
            }
            EventType::Put => {
                let object = match decode_object(&what, kv) {
                    Ok(o) => o,
                    Err(e) => {
                        // A value no agent can use: keep what it had rather than guess.
                        warn!(key, error = %e, "ignoring a value that does not parse");
                        return None;
                    }
                };
                if let Object::Container(c) = &object
                    && c.host == self.host
                {
                    self.revisions.lock().expect("not poisoned").insert(c.name.clone(), kv.create_revision());
                }
                Some(Update::Put(object))
            }
        }
    }
}

fn decode_object(what: &ObjectRef, kv: &KeyValue) -> serde_json::Result<Object> {
    let v = kv.value();
    Ok(match what {
        ObjectRef::Network(_) => Object::Network(serde_json::from_slice::<Network>(v)?),
        ObjectRef::Endpoint(_) => Object::Endpoint(serde_json::from_slice::<Endpoint>(v)?),
        ObjectRef::Container(_) => Object::Container(serde_json::from_slice::<Container>(v)?),
        // The lease the key lives under is the truth; the value's copy may be stale.
        ObjectRef::Host(_) => Object::Host(Host { lease: kv.lease(), ..serde_json::from_slice::<Host>(v)? }),
    })
}

/// Reads the whole desired state at one revision, in pages (it can be hundreds of thousands of
/// keys, far beyond one gRPC response); also the create revision of each container key on
/// `host`. With a `host` (an agent's snapshot), other hosts' containers are left out: an agent
/// has no use for them, and at scale they are half of what there is to read.
///
/// The networks are read first, which fixes the revision; endpoints, containers and hosts are
/// then read at that revision in parallel, each decoded on its own task.
async fn load(store: &Store, host: Option<&str>) -> Result<(State, i64, HashMap<String, i64>)> {
    let k = &store.keys;
    let (networks, rev) = load_prefix(store.clone(), k.networks(), 0, None).await?;
    let host = host.map(str::to_owned);
    let spawn = |prefix: String| tokio::spawn(load_prefix(store.clone(), prefix, rev, host.clone()));
    let (endpoints, containers, hosts) =
        tokio::join!(spawn(k.all_endpoints()), spawn(k.containers()), spawn(k.hosts()));
    let mut state = State::default();
    let mut revisions = HashMap::new();
    for part in [Ok(Ok((networks, rev))), endpoints, containers, hosts] {
        let (objects, _) = part.map_err(|e| StoreError::Task { op: "load", error: e.to_string() })??;
        for (object, created) in objects {
            if let Object::Container(c) = &object {
                revisions.insert(c.name.clone(), created);
            }
            state.put(object);
        }
    }
    Ok((state, rev, revisions))
}

/// The objects under one prefix at `rev` (0: now), with each key's create revision; containers
/// on hosts other than `host` (if given) are skipped after reading just their host.
async fn load_prefix(
    store: Store,
    prefix: String,
    rev: i64,
    host: Option<String>,
) -> Result<(Vec<(Object, i64)>, i64)> {
    /// Just enough of a container to know whose it is.
    #[derive(serde::Deserialize)]
    struct Whose<'a> {
        #[serde(borrow)]
        host: std::borrow::Cow<'a, str>,
    }
    let k = &store.keys;
    let mut objects = Vec::new();
    let rev = store
        .read_prefix_paged("load", &prefix, rev, |kv| {
            let key = key_str(kv);
            let Kind::Object(what) = k.parse(&key) else { return };
            if let (ObjectRef::Container(_), Some(host)) = (&what, &host)
                && serde_json::from_slice::<Whose<'_>>(kv.value()).is_ok_and(|w| w.host != host.as_str())
            {
                return;
            }
            match decode_object(&what, kv) {
                Ok(object) => objects.push((object, kv.create_revision())),
                Err(e) => warn!(key, error = %e, "ignoring a value that does not parse"),
            }
        })
        .await?;
    Ok((objects, rev))
}

impl Store {
    /// The whole desired state at one revision, and that revision.
    pub async fn load(&self) -> Result<(State, i64)> {
        let (state, rev, _) = load(self, None).await?;
        Ok((state, rev))
    }
}
