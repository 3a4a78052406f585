//! Hosts: each agent registers its host under an etcd lease and keeps the lease alive. Its
//! containers and endpoints are written under the same lease, so a host that stops renewing
//! (crashed, cut off) loses them all at once when the lease runs out, and every other agent
//! sees them go.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, LeaseTimeToLiveOptions, PutOptions, TxnOp};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::{
    Result, Store, StoreError, check_name,
    etcd::{Retry, decode, encode, unchanged},
};
use crate::model::Host;

/// A host kept registered by a background task. Dropping it stops renewing the lease, which
/// then runs out after its TTL unless a new registration of the same host (a restarted agent)
/// takes it over first; `revoke` ends it at once.
pub struct HostRegistration {
    lease: watch::Receiver<i64>,
    task: JoinHandle<()>,
    store: Store,
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
        let task = tokio::spawn(maintain(store.clone(), host, ttl, lease, tx));
        Self { lease: rx, task, store }
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

    /// Waits for the first registration.
    pub async fn registered(&self) -> i64 {
        let mut rx = self.lease.clone();
        match rx.wait_for(|l| *l != 0).await {
            Ok(l) => *l,
            // The task ended (only by abort); report what there is.
            Err(_) => *self.lease.borrow(),
        }
    }

    /// Deregisters: revokes the lease, which removes the host and everything on it now.
    pub async fn revoke(self) -> Result<()> {
        self.task.abort();
        let lease = *self.lease.borrow();
        if lease != 0 {
            let mut client = self.store.client.lease_client();
            self.store.call("lease revoke", client.revoke(lease)).await?;
        }
        Ok(())
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes the host key under a live lease: its current one if that is still alive, else a new
/// one. Returns the lease.
async fn register_once(store: &Store, host: &Host, ttl: Duration) -> Result<i64> {
    const OP: &str = "host register";
    let key = store.keys.host(&host.name);
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let mut retry = Retry::new(OP);
    loop {
        let (kv, _) = store.get(OP, &key).await?;
        let current = kv.as_ref().map_or(0, |kv| kv.lease());
        if current != 0 {
            let mut leases = store.client.lease_client();
            let alive = store
                .call("lease time-to-live", leases.time_to_live(current, None::<LeaseTimeToLiveOptions>))
                .await?
                .ttl()
                > 0;
            if alive {
                let value = Host { lease: current, ..host.clone() };
                let put =
                    TxnOp::put(key.as_str(), encode(&value), Some(PutOptions::new().with_lease(current)));
                let guard = Compare::lease(key.as_str(), CompareOp::Equal, current);
                match store.commit(OP, vec![guard], vec![put]).await {
                    Ok(Some(_)) => return Ok(current),
                    Ok(None) => {}
                    // The lease ran out between the check and the write.
                    Err(StoreError::Etcd { .. }) => {}
                    Err(e) => return Err(e),
                }
                retry.again().await?;
                continue;
            }
        }
        let mut leases = store.client.lease_client();
        let lease = store.call("lease grant", leases.grant(ttl_secs, None)).await?.id();
        let value = Host { lease, ..host.clone() };
        let put = TxnOp::put(key.as_str(), encode(&value), Some(PutOptions::new().with_lease(lease)));
        if store.commit(OP, vec![unchanged(&key, kv.as_ref())], vec![put]).await?.is_some() {
            return Ok(lease);
        }
        let _ = store.call("lease revoke", leases.revoke(lease)).await;
        retry.again().await?;
    }
}

/// How a round of keep-alives ended.
enum KeepAlive {
    /// The lease is gone: register again.
    Expired,
}

/// Renews `lease` every third of the TTL until it is found expired or etcd fails.
async fn keep_alive(store: &Store, lease: i64, ttl: Duration) -> Result<KeepAlive> {
    let mut client = store.client.lease_client();
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
                    endpoints: store.endpoints.clone(),
                    after: Duration::ZERO,
                });
            }
        }
        tokio::time::sleep(every).await;
    }
}

async fn maintain(store: Store, host: Host, ttl: Duration, mut lease: i64, tx: watch::Sender<i64>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if lease == 0 {
            match register_once(&store, &host, ttl).await {
                Ok(l) => {
                    info!(host = %host.name, lease = format!("{l:x}"), "host registered");
                    lease = l;
                    // Keeps the old value until a new lease exists: status written meanwhile
                    // under no lease at all would outlive the host.
                    tx.send_replace(l);
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    warn!(host = %host.name, error = %e, "cannot register the host; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
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
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

impl Store {
    /// Every registered host, by name, with the lease it is registered under.
    pub async fn hosts(&self) -> Result<Vec<Host>> {
        self.list("host ls", &self.keys.hosts())
            .await?
            .iter()
            .map(|kv| Ok(Host { lease: kv.lease(), ..decode(kv)? }))
            .collect()
    }

    /// Seconds left on a lease (None: expired or unknown).
    pub async fn lease_ttl(&self, lease: i64) -> Result<Option<i64>> {
        let mut client = self.client.lease_client();
        let ttl = self.call("lease time-to-live", client.time_to_live(lease, None)).await?.ttl();
        Ok((ttl > 0).then_some(ttl))
    }
}
