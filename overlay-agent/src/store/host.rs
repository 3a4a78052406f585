//! Hosts: each agent registers its host under an etcd lease (the agent keeps it alive:
//! source/lease.rs). Its containers and endpoints are written under the same lease, so a host
//! that stops renewing (crashed, cut off) loses them all at once when the lease runs out.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, LeaseTimeToLiveOptions, PutOptions, TxnOp};

use super::{
    Result, Store, StoreError,
    etcd::{Retry, decode_or_skip, encode, unchanged},
};
use crate::model::Host;

/// Writes the host key under a live lease: its current one if that is still alive, else a new
/// one. Returns the lease.
pub(crate) async fn register_once(store: &Store, host: &Host, ttl: Duration) -> Result<i64> {
    const OP: &str = "host register";
    let key = store.keys.host(&host.name);
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let mut retry = Retry::new(OP);
    loop {
        let (kv, _) = store.get(OP, &key).await?;
        let current = kv.as_ref().map_or(0, etcd_client::KeyValue::lease);
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
                    // Another writer won, or the lease ran out between the check and the write.
                    Ok(None) | Err(StoreError::Etcd { .. }) => {}
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

impl Store {
    /// Every registered host, by name, with the lease it is registered under.
    pub async fn hosts(&self) -> Result<Vec<Host>> {
        Ok(self
            .list("host ls", &self.keys.hosts())
            .await?
            .iter()
            .filter_map(|kv| Some(Host { lease: kv.lease(), ..decode_or_skip(kv)? }))
            .collect())
    }

    /// Seconds left on a lease (None: expired or unknown).
    pub async fn lease_ttl(&self, lease: i64) -> Result<Option<i64>> {
        let mut client = self.client.lease_client();
        let ttl = self.call("lease time-to-live", client.time_to_live(lease, None)).await?.ttl();
        Ok((ttl > 0).then_some(ttl))
    }
}
