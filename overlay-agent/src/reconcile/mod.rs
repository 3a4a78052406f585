//! Closing the gap between the desired state and what exists on this host.
//!
//! The reconciler owns everything the agent makes: container sandboxes, endpoint veths, and the
//! contents of the datapath maps (of which it keeps a mirror, so it only writes what changes).
//! Each pass works on what is dirty; a full pass (at startup, and periodically) looks at
//! everything and also removes whatever nothing desires any more, which is how an agent that
//! restarts picks up the datapath its predecessor left without disturbing it. An endpoint is
//! also dirty when the kernel says its veth was deleted (`netlink::events`): the pass finds the
//! interface gone and makes it again, without waiting for the next full pass.
//!
//! A host only carries the networks it takes part in (those with an endpoint on it), as
//! libnetwork's overlay does: their remote endpoints, their VNIs. Every other host is a peer.
//!
//! A pass runs in three steps, one file each:
//! - `plan`: what changed, what is desired and what exists -> what to look at (no I/O);
//! - `local`: sandboxes and endpoint interfaces (netlink, attachments), and adopting the ones a
//!   previous agent left;
//! - `mirror`: the maps, written through [`MapWriter`](crate::datapath::MapWriter) where they
//!   differ from what is desired.

mod local;
mod mirror;
mod names;
mod plan;
#[cfg(test)]
mod testing;

use tracing::{info, warn};

pub use self::local::endpoint_mtu;
use self::{
    local::Locals,
    mirror::{Found, Mirror},
    plan::{Existing, Here, Plan},
};
use crate::{
    datapath::Datapath,
    desired::{Desired, Dirty},
    netlink::Netlink,
    sandbox::Sandboxes,
    source::Report,
};

/// What a pass did that others need to know, and what it could not do yet.
#[derive(Debug, Default)]
pub struct Outcome {
    pub status: Vec<Report>,
    /// Keys that failed and should be retried.
    pub retry: Dirty,
}

pub struct Reconciler {
    here: Here,
    dp: Datapath,
    locals: Locals,
    mirror: Mirror,
}

impl Reconciler {
    /// Starts from what the kernel maps hold now (left by a previous agent, or empty).
    pub fn new(me: &str, dp: Datapath, host: Netlink, sandboxes: Sandboxes) -> anyhow::Result<Self> {
        let found = Found::read(&dp.maps)?;
        info!(
            endpoints = found.endpoints.len(),
            ifaces = found.ifaces.len(),
            peers = found.peers.len(),
            networks = found.networks.len(),
            "found existing datapath state"
        );
        let here = Here { me: me.to_owned(), sandbox_prefix: sandboxes.prefix().to_owned() };
        Ok(Self { here, dp, locals: Locals::new(host, sandboxes), mirror: Mirror::new(found) })
    }

    /// The containers this host runs (their sandboxes, made here or recorded as foreign).
    pub fn containers(&self) -> Vec<String> {
        self.locals.sandboxes().into_keys().collect()
    }

    /// Number of entries in the endpoint map (local and remote).
    pub fn endpoint_entries(&self) -> usize {
        self.mirror.endpoint_entries()
    }

    pub async fn reconcile(&mut self, desired: &Desired, dirty: Dirty) -> Outcome {
        let mut out = Outcome::default();
        if dirty.full {
            self.locals.adopt(&self.here, desired, &mut self.dp, &mut self.mirror, &mut out).await;
            self.dp.repin();
        } else {
            self.locals.forget_vanished(&dirty.endpoints, &mut self.dp, &mut self.mirror, &mut out).await;
        }
        let existing = Existing {
            locals: self.locals.by_id(),
            sandboxes: self.locals.sandboxes(),
            mirror: &self.mirror,
        };
        let plan = Plan::new(&self.here, desired, dirty, &existing);

        // Sandboxes first: endpoints need their namespace.
        self.locals.ensure_sandboxes(desired, &plan.containers, &mut out);
        let mut ready = Vec::new();
        for id in &plan.locals {
            match self.locals.sync(&self.here, desired, id, &mut self.dp, &mut self.mirror, &mut out).await {
                Ok(true) => ready.push(id.clone()),
                Ok(false) => {}
                Err(e) => {
                    let error = format!("{e:#}");
                    warn!(endpoint = %id, error, "cannot set up the endpoint");
                    self.locals.endpoint_failed(&self.here, desired, id, error, &mut out);
                    out.retry.endpoints.insert(id.clone());
                }
            }
        }
        // Sandboxes of containers that are gone, now that their endpoints are.
        self.locals.remove_sandboxes(desired, &plan.containers, &mut out);

        self.mirror.apply(&mut self.dp, &self.here, desired, &plan, self.locals.by_id(), &mut out);

        if plan.full {
            // After a restart the store may have lost what this host reported: say it again.
            ready.extend(self.locals.by_id().keys().cloned());
        }
        ready.sort();
        ready.dedup();
        for id in ready {
            if let (Some(l), Some(container)) =
                (self.locals.by_id().get(&id), desired.endpoint(&id).and_then(|e| e.container.as_ref()))
                && self.mirror.has_entry(&id)
            {
                out.status.push(Report::EndpointReady {
                    id: id.to_string(),
                    container: container.to_string(),
                    ifname: l.ifname.clone(),
                });
            }
        }
        out
    }
}
