//! The host's registration, kept for the agent's life: its records lease (the host's
//! containers and endpoints, renewed so they never expire while the agent lives) and its
//! liveness lease (whether other hosts send to it), both renewed on one beat. A lapsed lease is
//! replaced by a new registration at once, and the host's reports follow it (the publisher
//! rewrites them under the new liveness lease). See store/host.rs for the two keys.

use std::time::Duration;

use etcd_client::ResponseHeader;
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    backoff::Backoff,
    model::Host,
    store::{
        Result, Store, StoreError, check_name,
        host::{Leases, register_once},
    },
};

/// How long a host's leases live without the agent renewing them.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    /// The liveness lease: how long other hosts keep sending to a host whose agent went quiet.
    pub ttl: Duration,
    /// The records lease: how long a host's containers and endpoints outlive its agent.
    pub grace: Duration,
}

/// Where the registration stands, for health and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registered {
    /// Not yet, or lapsed and being renewed.
    No(String),
    Yes(Leases),
}

/// A host kept registered by a background task. Dropping it stops renewing the leases, which
/// then run out unless a new registration of the same host (a restarted agent) takes them over.
pub struct HostRegistration {
    lease: watch::Receiver<i64>,
    state: watch::Receiver<Registered>,
    headers: watch::Receiver<Option<(u64, i64)>>,
    recheck: Arc<Notify>,
    renewals_failed: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Low: a host that lost its liveness lease is out of every other host's maps until it is back.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl HostRegistration {
    /// Registers `host` now, retrying while etcd cannot be reached or races it, and keeps it
    /// registered. Fails at once if another agent holds the host (`StoreError::HostHeld`).
    pub async fn register(store: Store, host: Host, life: Lifetimes) -> Result<Self> {
        check_name("host name", &host.name)?;
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            match register_once(&store, &host, life.ttl, life.grace).await {
                Ok(leases) => {
                    log_registered(&host, leases, false);
                    return Ok(Self::start(store, host, life, leases));
                }
                Err(e @ (StoreError::HostHeld { .. } | StoreError::Invalid { .. })) => return Err(e),
                Err(e) => {
                    warn!(host = %host.name, error = %e, "cannot register the host; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    fn start(store: Store, host: Host, life: Lifetimes, leases: Leases) -> Self {
        let (lease_tx, lease) = watch::channel(leases.alive);
        let (state_tx, state) = watch::channel(Registered::Yes(leases));
        let (headers_tx, headers) = watch::channel(None);
        let recheck = Arc::new(Notify::new());
        let renewals_failed = Arc::new(AtomicU64::new(0));
        let channels = Channels {
            lease: lease_tx,
            state: state_tx,
            headers: headers_tx,
            recheck: recheck.clone(),
            renewals_failed: renewals_failed.clone(),
        };
        let task = tokio::spawn(maintain(store, host, life, leases, channels));
        Self { lease, state, headers, recheck, renewals_failed, task }
    }

    /// How many renewals of the host's leases failed so far, counted as they fail (for
    /// `/metrics`).
    pub fn renewals_failed(&self) -> Arc<AtomicU64> {
        self.renewals_failed.clone()
    }

    /// The liveness lease the host's reports are written under.
    pub fn lease(&self) -> i64 {
        *self.lease.borrow()
    }

    /// The liveness lease, followed: it changes when the host had to register again.
    pub fn leases(&self) -> watch::Receiver<i64> {
        self.lease.clone()
    }

    /// Notified when the leases should be checked at once, not at the next beat: the source
    /// found the store reset, so they are likely gone.
    pub fn recheck(&self) -> Arc<Notify> {
        self.recheck.clone()
    }

    /// Whether the host is registered now.
    pub fn state(&self) -> watch::Receiver<Registered> {
        self.state.clone()
    }

    /// The (cluster id, revision) of etcd's latest answer to a keep-alive: a beat that lets the
    /// source notice a store that was replaced or rolled back even when nothing changes.
    pub fn headers(&self) -> watch::Receiver<Option<(u64, i64)>> {
        self.headers.clone()
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Channels {
    lease: watch::Sender<i64>,
    state: watch::Sender<Registered>,
    headers: watch::Sender<Option<(u64, i64)>>,
    recheck: Arc<Notify>,
    /// Renewals that did not renew (an error, or a lease found gone).
    renewals_failed: Arc<AtomicU64>,
}

fn log_registered(host: &Host, leases: Leases, again: bool) {
    let (records, alive) = (format!("{:x}", leases.records), format!("{:x}", leases.alive));
    if again {
        warn!(host = %host.name, records, alive, "host registered again: its endpoints are back in every other host's maps");
    } else {
        info!(host = %host.name, records, alive, "host registered");
    }
}

/// How a round of keep-alives ended.
enum KeepAlive {
    /// A lease is gone (ran out while etcd or this host was away, or etcd lost it): register
    /// again.
    Lapsed(&'static str),
}

/// Renews both leases every third of the liveness TTL (every 5 s at most, so a lease has most of
/// its TTL left when etcd pauses) until one is found gone or etcd fails.
async fn keep_alive(store: &Store, leases: Leases, ttl: Duration, ch: &Channels) -> Result<KeepAlive> {
    let headers = &ch.headers;
    let mut client = store.client().lease_client();
    let (mut alive_keeper, mut alive_stream) =
        store.call("lease keep-alive", client.keep_alive(leases.alive)).await?;
    let (mut records_keeper, mut records_stream) =
        store.call("lease keep-alive", client.keep_alive(leases.records)).await?;
    let every = (ttl / 3).clamp(Duration::from_millis(300), Duration::from_secs(5));
    loop {
        for (which, keeper, stream) in [
            ("liveness", &mut alive_keeper, &mut alive_stream),
            ("records", &mut records_keeper, &mut records_stream),
        ] {
            store.call("lease keep-alive", keeper.keep_alive()).await?;
            match store.call("lease keep-alive", stream.message()).await? {
                Some(resp) => {
                    if let Some(h) = resp.header() {
                        headers.send_replace(Some(identity(h)));
                    }
                    if resp.ttl() <= 0 {
                        return Ok(KeepAlive::Lapsed(which));
                    }
                }
                None => {
                    return Err(StoreError::Unreachable {
                        op: "lease keep-alive: stream closed".into(),
                        endpoints: store.etcd_endpoints().to_owned(),
                        after: Duration::ZERO,
                    });
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = ch.recheck.notified() => {}
        }
    }
}

fn identity(h: &ResponseHeader) -> (u64, i64) {
    (h.cluster_id(), h.revision())
}

async fn maintain(store: Store, host: Host, life: Lifetimes, first: Leases, ch: Channels) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut leases = Some(first);
    loop {
        let Some(current) = leases else {
            match register_once(&store, &host, life.ttl, life.grace).await {
                Ok(l) => {
                    log_registered(&host, l, true);
                    leases = Some(l);
                    // The old value stays until a new lease exists: a report written meanwhile
                    // under no lease at all would outlive the host.
                    ch.lease.send_replace(l.alive);
                    ch.state.send_replace(Registered::Yes(l));
                    backoff.reset();
                }
                Err(e @ StoreError::HostHeld { .. }) => {
                    // Someone took the host while this agent was away from etcd. Keep the
                    // datapath, keep trying: the other agent may be the mistake.
                    error!(host = %host.name, error = %e, "cannot register the host again");
                    ch.state.send_replace(Registered::No(e.to_string()));
                    backoff.wait().await;
                }
                Err(e) => {
                    warn!(host = %host.name, error = %e, "cannot register the host; retrying");
                    backoff.wait().await;
                }
            }
            continue;
        };
        let stopped = keep_alive(&store, current, life.ttl, &ch).await;
        // It returns only when a renewal did not renew.
        ch.renewals_failed.fetch_add(1, Ordering::Relaxed);
        match stopped {
            Ok(KeepAlive::Lapsed(which)) => {
                let why = format!("its {which} lease ran out or etcd lost it");
                warn!(host = %host.name, records = format!("{:x}", current.records), alive = format!("{:x}", current.alive), "the host is not registered: {why}; registering again");
                ch.state.send_replace(Registered::No(why));
                leases = None;
            }
            // Some etcd versions answer a renewal of a lease they do not have with an error.
            Err(e) if e.to_string().contains("lease not found") => {
                warn!(host = %host.name, error = %e, "the host is not registered: etcd does not know its lease; registering again");
                ch.state.send_replace(Registered::No("etcd does not know its lease".into()));
                leases = None;
            }
            Err(e) => {
                warn!(host = %host.name, error = %e, "cannot renew the host's leases; retrying");
                backoff.wait().await;
            }
        }
    }
}
