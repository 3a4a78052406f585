//! Following the desired state in etcd, for the agent.
//!
//! It reads every network, endpoint, container and host at one revision and sends that as a
//! snapshot, then watches the prefix from the next revision, so no change falls between the two,
//! and turns each event into a Put or Delete. When the connection breaks it waits (sending
//! nothing: the datapath keeps what it has) and watches again from the last revision it
//! delivered; only if etcd compacted that revision away does it read everything again and send
//! a new snapshot.
//!
//! It also checks every answer's cluster id and revision against what it applied
//! (`history`): a store replaced, restored from an older backup or restarted empty is read
//! again from scratch, with a loud log line, instead of being watched from a revision it never
//! had.

use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchOptions};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{
    history::{Reset, Seen, SeenFile},
    publish::Live,
};
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
    /// The store is not the one followed so far: read everything again.
    Reset(Reset),
    Failed(StoreError),
}

pub(super) struct Follower {
    pub(super) store: Store,
    /// This agent's host: its snapshots leave other hosts' containers out.
    pub(super) host: String,
    pub(super) updates: mpsc::Sender<Update>,
    pub(super) live: mpsc::UnboundedSender<Live>,
    /// Answers to the host's lease keep-alives: (cluster id, revision), a beat from the store
    /// even when nothing changes in it.
    pub(super) beats: Option<watch::Receiver<Option<(u64, i64)>>>,
    pub(super) seen: SeenFile,
    /// What was seen when the agent last ran (from the state directory).
    pub(super) before: Seen,
    pub(super) health: Option<crate::health::Shared>,
    /// The last event delivered: a watch resumed after it must find it in the store's history.
    pub(super) last_event: Option<LastEvent>,
    /// Tells the host's registration to check its leases now (after a reset, they are likely
    /// gone).
    pub(super) recheck: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// An event as the store's history must still hold it.
#[derive(Clone, Debug)]
pub(super) struct LastEvent {
    key: Vec<u8>,
    revision: i64,
    deleted: bool,
}

impl Follower {
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        // The revision everything up to which has been delivered; None: a snapshot is due.
        let mut delivered: Option<i64> = None;
        // The cluster id, once an answer has told it.
        let mut cluster = self.before.cluster_id;
        let mut first = true;
        loop {
            let from = match delivered {
                Some(rev) => rev,
                None => match self.snapshot(first, &mut cluster).await {
                    Ok(Some(rev)) => {
                        first = false;
                        rev
                    }
                    Ok(None) => return,
                    Err(e) => {
                        self.watching(Some(e.to_string()));
                        warn!(error = %e, "cannot read the desired state from etcd; retrying");
                        backoff.wait().await;
                        continue;
                    }
                },
            };
            delivered = Some(from);
            let mut progressed = false;
            match self.follow(from, &mut delivered, &mut cluster, &mut progressed).await {
                Stop::AgentGone => return,
                Stop::Reset(reset) => {
                    self.reset_seen(&reset);
                    cluster = 0;
                    delivered = None;
                }
                Stop::Compacted(at) => {
                    warn!(
                        resume = from + 1,
                        compacted = at,
                        "etcd compacted the revisions the watch needed; reading everything again (the safety brake judges it)"
                    );
                    // Whatever changed in the revisions it missed arrives as one difference: the
                    // brake judges it like a reset's.
                    self.doubt(format!(
                        "etcd compacted revisions up to {at}, past the {} this agent needed",
                        from + 1
                    ));
                    delivered = None;
                }
                Stop::Failed(e) => {
                    self.watching(Some(e.to_string()));
                    if progressed {
                        backoff.reset();
                    }
                    warn!(error = %e, resume = delivered.unwrap_or(from) + 1, "lost the etcd watch; resuming");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Reads and sends a snapshot; returns its revision (None: the agent is gone). The first
    /// one is judged against what the agent applied when it last ran, before it is sent.
    async fn snapshot(&mut self, first: bool, cluster: &mut u64) -> Result<Option<i64>> {
        let (state, rev) = load(&self.store, Some(&self.host)).await?;
        self.last_event = None;
        if first && let Some(reset) = self.before.judge(0, rev) {
            // An agent restarted against a store that lost what it applied.
            self.reset_seen(&reset);
            *cluster = 0;
        }
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

    /// A store that is not the one followed: said loudly, counted in health.
    fn reset_seen(&mut self, reset: &Reset) {
        error!(%reset, "the store is not the one this agent followed; reading everything again (the safety brake holds a difference that would remove many of this host's containers)");
        self.doubt(reset.to_string());
        self.seen.save(Seen::default());
        if let Some(recheck) = &self.recheck {
            recheck.notify_one();
        }
    }

    /// Counts a state read that the agent could not follow change by change: the safety brake
    /// judges the next one.
    fn doubt(&self, why: String) {
        if let Some(h) = &self.health
            && let Ok(mut h) = h.lock()
        {
            h.store_resets += 1;
            h.last_store_reset = Some(why);
        }
    }

    /// Keeps health's view of the watch current: up (`error` None) or lost, and since when.
    fn watching(&self, error: Option<String>) {
        let Some(h) = &self.health else { return };
        let Ok(mut h) = h.lock() else { return };
        let Some(link) = h.etcd.as_mut() else { return };
        let connected = error.is_none();
        if connected != link.connected {
            // Established again after it was up once (error already set by the loss).
            if connected && link.error.is_some() {
                link.reconnects += 1;
            }
            link.connected = connected;
            link.since = crate::health::now();
        }
        if error.is_some() {
            link.error = error;
        }
    }

    /// Whether the store's history still holds the last event delivered (None: cannot tell).
    /// A store restored from an older backup can have caught up to (or passed) the revision
    /// the agent applied by the time the watch resumes, with other writes: its revision alone
    /// does not show it, the event at that revision does.
    async fn history_holds(&self, last: &LastEvent) -> Option<Result<(), Reset>> {
        let mut kv = self.store.client().kv_client();
        let options = etcd_client::GetOptions::new().with_revision(last.revision);
        match self.store.call("check history", kv.get(last.key.clone(), Some(options))).await {
            Ok(resp) => {
                let found = resp.kvs().first().map(KeyValue::mod_revision);
                let holds = if last.deleted { found.is_none() } else { found == Some(last.revision) };
                Some(if holds {
                    Ok(())
                } else {
                    Err(Reset::Rewritten {
                        revision: last.revision,
                        key: String::from_utf8_lossy(&last.key).into_owned(),
                    })
                })
            }
            Err(e) if e.to_string().contains("future revision") => {
                let now = self.store.revision().await.ok()?;
                Some(Err(Reset::Backwards { applied: last.revision, now }))
            }
            // Compacted (the watch says so itself), or unreachable (the watch fails too).
            Err(_) => None,
        }
    }

    /// Checks one answer of the store against what was applied; learns the cluster id.
    fn check(
        &mut self,
        header: Option<&etcd_client::ResponseHeader>,
        delivered: Option<i64>,
        cluster: &mut u64,
    ) -> Option<Reset> {
        let h = header?;
        let seen = Seen { cluster_id: *cluster, revision: delivered.unwrap_or(0) };
        if let Some(reset) = seen.judge(h.cluster_id(), h.revision()) {
            return Some(reset);
        }
        if *cluster == 0 && h.cluster_id() != 0 {
            *cluster = h.cluster_id();
        }
        self.seen.save(Seen { cluster_id: *cluster, revision: delivered.unwrap_or(0) });
        None
    }

    async fn follow(
        &mut self,
        from: i64,
        delivered: &mut Option<i64>,
        cluster: &mut u64,
        progressed: &mut bool,
    ) -> Stop {
        let store = self.store.clone();
        let store = &store;
        let mut client = store.client().watch_client();
        let options = WatchOptions::new().with_prefix().with_start_revision(from + 1).with_progress_notify();
        let mut stream = match store.call("watch", client.watch(store.keys().root(), Some(options))).await {
            Ok(s) => s,
            Err(e) => return Stop::Failed(e),
        };
        let mut beats = self.beats.clone();
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                Some((id, rev)) = next_beat(beats.as_mut()) => {
                    let seen = Seen { cluster_id: *cluster, revision: delivered.unwrap_or(0) };
                    if let Some(reset) = seen.judge(id, rev)
                        && self.confirm(&reset).await
                    {
                        return Stop::Reset(reset);
                    }
                    continue;
                }
            };
            let resp = match message {
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
            if resp.created() {
                self.watching(None);
            }
            if resp.created()
                && let Some(last) = self.last_event.clone()
                && let Some(Err(reset)) = self.history_holds(&last).await
            {
                return Stop::Reset(reset);
            }
            if let Some(reset) = self.check(resp.header(), *delivered, cluster)
                && self.confirm(&reset).await
            {
                return Stop::Reset(reset);
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
            // Stamped before the events go to the agent, whose loop takes the stamp with them.
            if let Some(h) = &self.health
                && let Ok(mut h) = h.lock()
            {
                h.watch_arrival.get_or_insert_with(std::time::Instant::now);
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                if let Some(update) = self.translate(event.event_type(), kv)
                    && self.updates.send(update).await.is_err()
                {
                    return Stop::AgentGone;
                }
                *delivered = Some(kv.mod_revision());
                self.last_event = Some(LastEvent {
                    key: kv.key().to_vec(),
                    revision: kv.mod_revision(),
                    deleted: event.event_type() == EventType::Delete,
                });
            }
        }
    }

    /// A revision behind what was applied is confirmed by a linearizable read before anything
    /// is read again: a keep-alive answer taken before the follower delivered newer events, or
    /// an answer from a member that lags, is not a store that went back.
    async fn confirm(&self, reset: &Reset) -> bool {
        match reset {
            Reset::NewCluster { .. } | Reset::Rewritten { .. } => true,
            Reset::Backwards { applied, .. } => self.store.revision().await.is_ok_and(|now| now < *applied),
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

/// The next keep-alive answer, if there is a beat to follow.
async fn next_beat(beats: Option<&mut watch::Receiver<Option<(u64, i64)>>>) -> Option<(u64, i64)> {
    let Some(rx) = beats else { return std::future::pending().await };
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Some(beat) = *rx.borrow_and_update() {
            return Some(beat);
        }
    }
}
