//! Hosts: registration, liveness and decommissioning.
//!
//! A host has two keys under two leases, because whether it is alive and what it owns are
//! different questions:
//! - `hosts/<name>`, its registration, lives under the host's *records lease*, with its
//!   containers, endpoints, attachments and addresses. The agent renews it; its TTL is the
//!   garbage-collection grace (`--gc-grace`, a day by default), so a host's records survive any
//!   control-plane blip and vanish on their own only after the host has been gone that long.
//! - `alive/<name>` lives under its *liveness lease* (`--lease-ttl`, seconds). Agents follow
//!   these keys: while it is there, the host's endpoints are in every other host's maps.
//!
//! Both name the agent that serves the host (`AgentIdentity`), so a second agent for the same
//! host is refused while the first is alive. `remove_host` (`overlay host rm`) decommissions a
//! host that is not alive.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};

use super::{
    Result, Store, StoreError,
    etcd::{Range, Retry, decode_or_skip, encode, unchanged},
};
use crate::model::Host;

/// The leases a registered host holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leases {
    /// The records lease: `hosts/<name>` and everything the host owns.
    pub records: i64,
    /// The liveness lease: `alive/<name>` and the host's status reports.
    pub alive: i64,
    /// The records lease was granted by this registration: the store held no registration of
    /// the host (its first, or the store lost it: emptied, restored, garbage-collected).
    pub fresh: bool,
}

/// A registered host as the CLI lists it.
#[derive(Clone, Debug)]
pub struct HostEntry {
    /// The registration (`lease`: the records lease).
    pub host: Host,
    /// The liveness key, if the host is alive (`lease`: the liveness lease).
    pub alive: Option<Host>,
}

/// Who holds a host, for an error message.
pub fn describe_holder(h: &Host) -> String {
    match &h.agent {
        Some(a) => {
            format!("agent {} (pid {} on machine {:?}, VTEP {})", short(&a.id), a.pid, a.machine, h.vtep)
        }
        None => format!("an agent with VTEP {}", h.vtep),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Registers `host` (whose `agent` must be set): writes `hosts/<name>` and `alive/<name>`,
/// reusing the leases they live under if they are still there (an agent restarted, or a
/// liveness lapse), granting new ones if not. Refuses if another agent holds the host alive.
pub(crate) async fn register_once(
    store: &Store,
    host: &Host,
    ttl: Duration,
    grace: Duration,
) -> Result<Leases> {
    const OP: &str = "host register";
    let k = &store.keys;
    let (reg_key, alive_key) = (k.host(&host.name), k.alive_host(&host.name));
    let me = host.agent.as_ref().map(|a| a.id.as_str());
    let mut retry = Retry::new(OP);
    loop {
        let view = store.view(OP, &[Range::Key(reg_key.clone()), Range::Key(alive_key.clone())]).await?;
        let (reg, alive) = (view.key(0), view.key(1));
        // A key exists only while its lease does: etcd deletes them together.
        if let Some(kv) = alive
            && let Some(holder) = decode_or_skip::<Host>(kv)
            && holder.agent.as_ref().map(|a| a.id.as_str()) != me
        {
            return Err(StoreError::HostHeld {
                host: host.name.clone(),
                holder: describe_holder(&holder),
                vtep_change: holder.vtep != host.vtep,
            });
        }
        let mut granted = Vec::new();
        let (records, fresh) = match reg.map(etcd_client::KeyValue::lease) {
            Some(l) if l != 0 => (l, false),
            _ => {
                let l = grant(store, grace).await?;
                granted.push(l);
                (l, true)
            }
        };
        let live = match alive.map(etcd_client::KeyValue::lease) {
            Some(l) if l != 0 => l,
            _ => match grant(store, ttl).await {
                Ok(l) => {
                    granted.push(l);
                    l
                }
                Err(e) => {
                    revoke(store, &granted).await;
                    return Err(e);
                }
            },
        };
        let value = |lease| encode(&Host { lease, ..host.clone() });
        let ops = vec![
            TxnOp::put(reg_key.as_str(), value(records), Some(PutOptions::new().with_lease(records))),
            TxnOp::put(alive_key.as_str(), value(live), Some(PutOptions::new().with_lease(live))),
        ];
        let guards = vec![unchanged(&reg_key, reg), unchanged(&alive_key, alive)];
        match store.commit(OP, guards, ops).await {
            Ok(Some(_)) => return Ok(Leases { records, alive: live, fresh }),
            // Raced: another writer, or a lease ran out between the read and the write.
            Ok(None) | Err(StoreError::Etcd { .. }) => revoke(store, &granted).await,
            Err(e) => {
                revoke(store, &granted).await;
                return Err(e);
            }
        }
        retry.again().await?;
    }
}

async fn grant(store: &Store, ttl: Duration) -> Result<i64> {
    let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let mut leases = store.client.lease_client();
    Ok(store.call("lease grant", leases.grant(secs, None)).await?.id())
}

async fn revoke(store: &Store, leases: &[i64]) {
    for &l in leases {
        let mut client = store.client.lease_client();
        let _ = store.call("lease revoke", client.revoke(l)).await;
    }
}

impl Store {
    /// Every registered host, by name, with its liveness.
    pub async fn hosts(&self) -> Result<Vec<HostEntry>> {
        let k = &self.keys;
        let view = self.view("host ls", &[Range::Prefix(k.hosts()), Range::Prefix(k.alive())]).await?;
        let alive: std::collections::BTreeMap<String, Host> = view
            .prefix(1)
            .iter()
            .filter_map(|kv| Some(Host { lease: kv.lease(), ..decode_or_skip::<Host>(kv)? }))
            .map(|h| (h.name.clone(), h))
            .collect();
        Ok(view
            .prefix(0)
            .iter()
            .filter_map(|kv| Some(Host { lease: kv.lease(), ..decode_or_skip::<Host>(kv)? }))
            .map(|host| HostEntry { alive: alive.get(&host.name).cloned(), host })
            .collect())
    }

    /// Seconds left on a lease (None: expired or unknown).
    pub async fn lease_ttl(&self, lease: i64) -> Result<Option<i64>> {
        let mut client = self.client.lease_client();
        match self.call("lease time-to-live", client.time_to_live(lease, None)).await {
            Ok(resp) => Ok((resp.ttl() > 0).then_some(resp.ttl())),
            // etcd answers a lease it no longer has with an error, not a TTL of -1.
            Err(StoreError::Etcd { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Decommissions a host that is not alive: removes its registration, its containers, their
    /// endpoints, attachments and addresses (everything under its records lease), in two steps
    /// that cannot race its agent coming back. Returns how many containers went with it.
    pub async fn remove_host(&self, name: &str) -> Result<usize> {
        const OP: &str = "host rm";
        super::check_name("host name", name)?;
        let k = &self.keys;
        let mut retry = Retry::new(OP);
        loop {
            let view = self
                .view(
                    OP,
                    &[
                        Range::Key(k.host(name)),
                        Range::Key(k.alive_host(name)),
                        Range::Prefix(k.containers()),
                    ],
                )
                .await?;
            let reg = view.key(0).ok_or_else(|| StoreError::HostNotRegistered(name.to_owned()))?;
            if let Some(kv) = view.key(1) {
                let holder =
                    decode_or_skip::<Host>(kv).map_or_else(|| "an agent".to_owned(), |h| describe_holder(&h));
                return Err(StoreError::HostAlive { host: name.to_owned(), holder });
            }
            let records = reg.lease();
            let containers = view
                .prefix(2)
                .iter()
                .filter_map(decode_or_skip::<crate::model::Container>)
                .filter(|c| c.host == name)
                .count();
            // First the registration, guarded by "still not alive, still this registration":
            // an agent that registers after this gets a new records lease, so revoking the old
            // one below can only take what the host owned before.
            let guards = vec![
                Compare::version(k.alive_host(name), CompareOp::Equal, 0),
                unchanged(&k.host(name), Some(reg)),
            ];
            // Its published ports go now: they live under the records lease too, but a port is
            // the host's, and a host registered afresh must find it free.
            let ops = vec![
                TxnOp::delete(k.host(name), None),
                TxnOp::delete(k.ports(name), Some(etcd_client::DeleteOptions::new().with_prefix())),
            ];
            if self.commit(OP, guards, ops).await?.is_none() {
                retry.again().await?;
                continue;
            }
            if records != 0 {
                let mut client = self.client.lease_client();
                match self.call("lease revoke", client.revoke(records)).await {
                    // Already gone (the grace ran out meanwhile): so are its keys.
                    Ok(_) | Err(StoreError::Etcd { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(containers);
        }
    }
}
