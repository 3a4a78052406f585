//! The host's lease, kept alive for the agent's life: the agent registers its host under an
//! etcd lease and renews it; its containers and endpoints are written under the same lease, so a
//! host that stops renewing (crashed, cut off) loses them all at once when the lease runs out,
//! and every other agent sees them go. A lease found gone is replaced by a new registration.

use std::time::Duration;

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    backoff::Backoff,
    model::Host,
    store::{Result, Store, StoreError, check_name, host::register_once},
};

/// A host kept registered by a background task. Dropping it stops renewing the lease, which
/// then runs out after its TTL unless a new registration of the same host (a restarted agent)
/// takes it over first.
pub struct HostRegistration {
    lease: watch::Receiver<i64>,
    task: JoinHandle<()>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl HostRegistration {
    /// Registers `host` now (failing if etcd cannot be reached) and keeps it registered. If the
    /// host's key is still there under a live lease (an agent restarted within the TTL), that
    /// lease is taken over, so the host's containers and endpoints survive the restart.
    pub async fn register(store: Store, host: Host, ttl: Duration) -> Result<Self> {
        check_name("host name", &host.name)?;
        let lease = register_once(&store, &host, ttl).await?;
        Ok(Self::start(store, host, ttl, lease))
    }

    /// Like `register`, but registers in the background, retrying for as long as etcd cannot be
    /// reached: for an agent that must start (and keep forwarding) without its store.
    pub fn spawn(store: Store, host: Host, ttl: Duration) -> Self {
        Self::start(store, host, ttl, 0)
    }

    fn start(store: Store, host: Host, ttl: Duration, lease: i64) -> Self {
        let (tx, rx) = watch::channel(lease);
        let task = tokio::spawn(maintain(store, host, ttl, lease, tx));
        Self { lease: rx, task }
    }

    /// The lease the host is registered under (0 until the first registration).
    pub fn lease(&self) -> i64 {
        *self.lease.borrow()
    }

    /// The lease, followed: it changes when the host had to register again after its lease
    /// ran out.
    pub fn leases(&self) -> watch::Receiver<i64> {
        self.lease.clone()
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a round of keep-alives ended.
enum KeepAlive {
    /// The lease is gone: register again.
    Expired,
}

/// Renews `lease` every third of the TTL until it is found expired or etcd fails.
async fn keep_alive(store: &Store, lease: i64, ttl: Duration) -> Result<KeepAlive> {
    let mut client = store.client().lease_client();
    let (mut keeper, mut stream) = store.call("lease keep-alive", client.keep_alive(lease)).await?;
    let every = (ttl / 3).max(Duration::from_millis(300));
    loop {
        store.call("lease keep-alive", keeper.keep_alive()).await?;
        match store.call("lease keep-alive", stream.message()).await? {
            Some(resp) if resp.ttl() > 0 => {}
            Some(_) => return Ok(KeepAlive::Expired),
            None => {
                return Err(StoreError::Unreachable {
                    op: "lease keep-alive: stream closed".into(),
                    endpoints: store.etcd_endpoints().to_owned(),
                    after: Duration::ZERO,
                });
            }
        }
        tokio::time::sleep(every).await;
    }
}

async fn maintain(store: Store, host: Host, ttl: Duration, mut lease: i64, tx: watch::Sender<i64>) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        if lease == 0 {
            match register_once(&store, &host, ttl).await {
                Ok(l) => {
                    info!(host = %host.name, lease = format!("{l:x}"), "host registered");
                    lease = l;
                    // Keeps the old value until a new lease exists: status written meanwhile
                    // under no lease at all would outlive the host.
                    tx.send_replace(l);
                    backoff.reset();
                }
                Err(e) => {
                    warn!(host = %host.name, error = %e, "cannot register the host; retrying");
                    backoff.wait().await;
                    continue;
                }
            }
        }
        match keep_alive(&store, lease, ttl).await {
            Ok(KeepAlive::Expired) => {
                warn!(host = %host.name, lease = format!("{lease:x}"), "the host's lease ran out (its containers and endpoints are gone); registering again");
                lease = 0;
            }
            Err(e) => {
                warn!(host = %host.name, error = %e, "cannot renew the host's lease; retrying");
                backoff.wait().await;
            }
        }
    }
}
