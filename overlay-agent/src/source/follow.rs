//! Following the desired state in etcd, for the agent.
//!
//! It reads every network, endpoint, container and host at one revision and sends that as a
//! snapshot, then watches the prefix from the next revision, so no change falls between the two,
//! and turns each event into a Put or Delete. When the connection breaks it waits (sending
//! nothing: the datapath keeps what it has) and watches again from the last revision it
//! delivered; only if etcd compacted that revision away does it read everything again and send
//! a new snapshot.

use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchOptions};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::publish::Live;
use crate::{
    backoff::Backoff,
    model::Update,
    store::{
        Result, Store, StoreError,
        etcd::key_str,
        keys::Kind,
        load::{decode_object, load},
    },
};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why following the watch stopped.
enum Stop {
    /// The agent stopped reading updates.
    AgentGone,
    /// The revision to resume from was compacted: read everything again.
    Compacted(i64),
    Failed(StoreError),
}

pub(super) struct Follower {
    pub(super) store: Store,
    /// This agent's host: its snapshots leave other hosts' containers out.
    pub(super) host: String,
    pub(super) updates: mpsc::Sender<Update>,
    pub(super) live: mpsc::UnboundedSender<Live>,
}

impl Follower {
    pub(super) async fn run(self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
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
                        backoff.wait().await;
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
                        backoff.reset();
                    }
                    warn!(error = %e, resume = delivered.unwrap_or(from) + 1, "lost the etcd watch; resuming");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Reads and sends a snapshot; returns its revision (None: the agent is gone).
    async fn snapshot(&self) -> Result<Option<i64>> {
        let (state, rev) = load(&self.store, Some(&self.host)).await?;
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
        if self.updates.send(Update::Snapshot(state)).await.is_err() {
            return Ok(None);
        }
        let _ = self.live.send(live);
        Ok(Some(rev))
    }

    async fn follow(&self, from: i64, delivered: &mut Option<i64>, progressed: &mut bool) -> Stop {
        let store = &self.store;
        let mut client = store.client().watch_client();
        let options = WatchOptions::new().with_prefix().with_start_revision(from + 1).with_progress_notify();
        let mut stream = match store.call("watch", client.watch(store.keys().root(), Some(options))).await {
            Ok(s) => s,
            Err(e) => return Stop::Failed(e),
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return Stop::Failed(StoreError::Unreachable {
                        op: "watch: stream closed".into(),
                        endpoints: store.etcd_endpoints().to_owned(),
                        after: Duration::ZERO,
                    });
                }
                Err(error) => {
                    return Stop::Failed(StoreError::Etcd {
                        op: "watch".into(),
                        endpoints: store.etcd_endpoints().to_owned(),
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
                    endpoints: store.etcd_endpoints().to_owned(),
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
        let Kind::Object(what) = self.store.keys().parse(&key) else { return None };
        match kind {
            EventType::Delete => Some(Update::Delete(what)),
            EventType::Put => {
                let object = match decode_object(&what, kv) {
                    Ok(o) => o,
                    Err(e) => {
                        // A value no agent can use: keep what it had rather than guess.
                        warn!(key, error = %e, "ignoring a value that does not parse");
                        return None;
                    }
                };
                Some(Update::Put(object))
            }
        }
    }
}
