//! The agent's main loop: open the datapath, wait for the desired state, reconcile, then follow
//! every change until told to stop. Stopping leaves the datapath as it is: pinned programs and
//! maps keep forwarding until the next agent takes them over.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::Instant,
};
use tracing::{error, info, warn};

use crate::{
    backoff::Backoff,
    datapath::{self, Datapath, PinDir, Uplink, XdpPreference},
    desired::{Desired, Dirty},
    model::Update,
    netlink::Netlink,
    reconcile::Reconciler,
    resolver::{Resolver, upstream::Upstreams},
    sandbox::Sandboxes,
    source::{Report, Source},
};

#[derive(Clone, Debug)]
pub struct Config {
    pub host: String,
    pub uplink: String,
    pub vtep: Ipv4Addr,
    pub pins: PinDir,
    pub state_dir: PathBuf,
    pub netns_prefix: String,
    pub xdp: XdpPreference,
    pub debug_drops: bool,
    /// How often to look at everything again (repairs drift nobody reported).
    pub resync: Duration,
    /// Where to serve `GET /healthz`, if anywhere.
    pub health: Option<std::net::SocketAddr>,
    /// The largest share (0..=1) of this host's containers one re-read of the store may remove
    /// without an operator's go-ahead (brake.rs); 1: no brake.
    pub brake_share: f64,
    /// Upstream resolvers for names outside the overlay; empty: those of `resolv_conf`.
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    pub resolv_conf: PathBuf,
}

/// Most updates applied before reconciling, so a burst becomes one pass.
const BATCH: usize = 4096;
/// First delay before retrying what failed; doubles up to RETRY_MAX.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long to gather link events after the first, so a burst of them becomes one pass.
const LINK_DEBOUNCE: Duration = Duration::from_millis(150);
/// How often to look for pins removed by hand (between the full passes, which look too).
const PIN_CHECK: Duration = Duration::from_secs(1);

/// Reads the uplink's ifindex, MAC and MTU.
pub async fn uplink(nl: &Netlink, name: &str) -> anyhow::Result<Uplink> {
    let link = nl.require_link(name).await.with_context(|| format!("uplink {name}"))?;
    Ok(Uplink { name: link.name, ifindex: link.index, mac: link.mac, mtu: link.mtu, kind: link.kind })
}

pub async fn run(cfg: Config, mut source: impl Source) -> anyhow::Result<()> {
    // Before anything is touched: a second agent here would take over the first one's datapath.
    let _lock = crate::identity::lock(&cfg.state_dir, &cfg.host)?;
    let nl = Netlink::current()?;
    let uplink = uplink(&nl, &cfg.uplink).await?;
    let mut dp = Datapath::open(&datapath::Options {
        pins: cfg.pins.clone(),
        uplink: uplink.clone(),
        vtep: cfg.vtep,
        xdp: cfg.xdp,
        debug_drops: cfg.debug_drops,
    })?;
    if dp.xdp {
        if let Ok(Some(link)) = nl.link(&uplink.name).await {
            info!(uplink = %uplink.name, mode = ?link.xdp, "XDP attached");
        }
        // Decapsulated frames are merged by the uplink's GRO before TC delivers them.
        match crate::netlink::ethtool::enable_gro(&uplink.name) {
            Ok(true) => {
                info!(uplink = %uplink.name, "turned GRO on: XDP passes decapsulated frames up for GRO to merge");
            }
            Ok(false) => {}
            Err(e) => {
                warn!(uplink = %uplink.name, error = %e, "cannot turn GRO on; decapsulated TCP will not be merged");
            }
        }
    }
    spawn_bpf_logger(&mut dp);
    // Opened here, in the agent's namespace, where the host sides of the veths are.
    let mut link_events = crate::netlink::events::subscribe(LINK_DEBOUNCE)?;
    let health = crate::health::Shared::default();
    {
        let mut h = health.lock().expect("health");
        h.host.clone_from(&cfg.host);
        h.xdp = dp.xdp;
        h.uplink.clone_from(&uplink.name);
    }
    // Every second: pins removed by hand are made again, and what is still wrong goes into
    // health (readiness says so until the next look finds it mended) and, for attachments
    // detached by hand, to the loop, which attaches them again.
    let (detached_tx, mut detached) = mpsc::unbounded_channel::<Vec<PathBuf>>();
    let pin_health = health.clone();
    let pins = cfg.pins.clone();
    dp.keep_pins(PIN_CHECK, move |mut found| {
        // A veth deleted detaches its attachment too: that is a container going (link events
        // make the pass forget it), not a program detached by hand, and nothing to attach
        // again. Nor is an index reused by an interface that is not an endpoint's veth.
        found.detached.retain(|pin| {
            pins.endpoint_ifindex(pin).is_none_or(|ifindex| {
                nix::net::if_::if_indextoname(ifindex)
                    .is_ok_and(|name| name.to_string_lossy().starts_with(crate::netlink::veth::HOST_PREFIX))
            })
        });
        let show = |pins: &[PathBuf]| pins.iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
        if let Ok(mut h) = pin_health.lock() {
            h.datapath.missing_pins = show(&found.missing);
            h.datapath.detached = show(&found.detached);
        }
        if !found.detached.is_empty() {
            let _ = detached_tx.send(found.detached);
        }
    });
    let (release_tx, mut release) = mpsc::unbounded_channel();
    if let Some(addr) = cfg.health {
        crate::health::serve(addr, health.clone(), release_tx, cfg.pins.clone()).await?;
    }
    source.attach_health(health.clone());
    let sandboxes = Sandboxes::open(&cfg.state_dir, &cfg.netns_prefix)?;
    let counts = health.lock().expect("health").dns.clone();
    let resolver = Resolver::new(Upstreams::new(cfg.dns_upstreams.clone(), cfg.resolv_conf.clone()), counts);
    let mut rec = Reconciler::new(&cfg.host, dp, nl, &cfg.uplink, sandboxes, resolver)?;

    let (update_tx, mut updates) = mpsc::channel::<Update>(BATCH);
    let (status_tx, status_rx) = mpsc::channel::<Report>(BATCH);
    let mut source_task = tokio::spawn(source.run(update_tx, status_rx));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let mut desired = Desired::new(&cfg.host);
    // Nothing is reconciled before the first snapshot: an agent that cannot reach its store
    // at startup keeps the datapath it found instead of tearing it down.
    let mut started = false;
    let mut retry = Dirty::default();
    let mut retry_backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    let mut retry_at: Option<Instant> = None;
    let mut resync = tokio::time::interval(cfg.resync);
    resync.tick().await;
    let mut brake = crate::brake::SafetyBrake::new(cfg.brake_share, &cfg.state_dir, &health);
    // For /metrics: when local endpoints arrived, until they are ready; when the watch's
    // events of the batch being applied arrived.
    let mut arriving = Arriving::default();
    let mut watch_arrived: Option<std::time::Instant> = None;

    loop {
        let mut dirty = Dirty::default();
        tokio::select! {
            update = updates.recv() => {
                let Some(update) = update else {
                    // The source ended: surface its error.
                    return match (&mut source_task).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.context("desired-state source failed")),
                        Err(e) => Err(anyhow::anyhow!("desired-state source panicked: {e}")),
                    };
                };
                let mut snapshot = matches!(update, Update::Snapshot(_));
                arriving.note(&update, &desired, &cfg.host);
                desired.apply(update, &mut dirty);
                while dirty.len() < BATCH {
                    match updates.try_recv() {
                        Ok(update) => {
                            snapshot |= matches!(update, Update::Snapshot(_));
                            arriving.note(&update, &desired, &cfg.host);
                            desired.apply(update, &mut dirty);
                        }
                        Err(_) => break,
                    }
                }
                // The watch's events taken in this batch: their lag is measured once applied.
                watch_arrived = health.lock().ok().and_then(|mut h| h.watch_arrival.take());
                dirty.full |= snapshot;
                if !started {
                    if !snapshot {
                        warn!("updates before the first snapshot; waiting for it");
                        continue;
                    }
                    started = true;
                    dirty.full = true;
                    info!(
                        networks = desired.networks().count(),
                        endpoints = desired.endpoint_count(),
                        hosts = desired.hosts().count(),
                        "desired state loaded"
                    );
                }
            }
            () = sleep_until(retry_at) => {
                dirty = std::mem::take(&mut retry);
                retry_at = None;
            }
            _ = resync.tick(), if started => dirty.full = true,
            Some(pins) = detached.recv() => {
                for pin in pins {
                    match rec.reattach(&pin) {
                        // Mended already, for an earlier report of the same detach.
                        Ok(false) => {}
                        Ok(true) => {
                            warn!(pin = %pin.display(), "attachment detached behind the agent's back; attached again");
                            if let Ok(mut h) = health.lock() {
                                h.datapath.reattached += 1;
                            }
                        }
                        Err(e) => error!(pin = %pin.display(), error = %e, "cannot attach again what was detached"),
                    }
                }
                continue;
            }
            Some(()) = release.recv() => {
                if let Some(held) = brake.release() {
                    dirty = held;
                }
            }
            Some(gone) = link_events.recv(), if started => {
                dirty.full = gone.lost;
                desired.mark_vanished(gone.endpoints, &mut dirty);
            }
            _ = sigterm.recv() => { info!("SIGTERM: stopping, the datapath keeps forwarding"); return Ok(()) }
            _ = sigint.recv() => { info!("SIGINT: stopping, the datapath keeps forwarding"); return Ok(()) }
        }
        if dirty.is_empty() {
            continue;
        }
        let Some(dirty) = brake.gate(dirty, &desired, || rec.containers(), &health) else { continue };
        let started_at = Instant::now();
        let full = dirty.full;
        let outcome = rec.reconcile(&desired, dirty).await;
        if full {
            // A snapshot of a big state is parsed, converted and dropped: give the memory that
            // held it back to the system rather than keep it as the agent's high-water mark.
            // (Before the log line, which is what watchers take as "loaded".)
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
            info!(
                took_ms = started_at.elapsed().as_millis() as u64,
                map_endpoints = rec.endpoint_entries(),
                "full reconcile done"
            );
        }
        if let Ok(mut h) = health.lock() {
            h.ready |= full && outcome.retry.is_empty();
            h.map_endpoints = rec.endpoint_entries();
            h.last_reconcile = crate::health::now();
            h.reconcile.observe(started_at.elapsed());
            h.pending_retries = outcome.retry.len() + retry.len();
            h.objects = [
                ("networks", desired.networks().count()),
                ("endpoints", desired.endpoint_count()),
                ("containers", desired.containers().count()),
                ("hosts", desired.hosts().count()),
            ]
            .into();
            h.last_pass_error = (!outcome.retry.is_empty())
                .then(|| format!("{} keys to retry (failures names the containers)", outcome.retry.len()));
            outcome.status.iter().for_each(|r| h.note(r));
            if let Some(at) = watch_arrived.take() {
                h.latencies.watch_lag.observe(at.elapsed().as_secs_f64());
            }
            for took in arriving.settled(&outcome.status) {
                h.latencies.endpoint_ready.observe(took.as_secs_f64());
            }
        }
        for status in outcome.status {
            if status_tx.send(status).await.is_err() {
                error!("the source stopped taking status reports");
                break;
            }
        }
        if outcome.retry.is_empty() {
            retry_backoff.reset();
        } else {
            retry.merge(outcome.retry);
            retry_at = Some(Instant::now() + retry_backoff.next_delay());
        }
    }
}

/// Local endpoints new to the agent, by id, with when their update arrived: how long each took
/// to be reported ready is the endpoint create-to-ready latency as the agent sees it.
#[derive(Default)]
struct Arriving {
    since: std::collections::HashMap<String, std::time::Instant>,
}

impl Arriving {
    /// Notes an update before it is applied to `desired`: an endpoint of this host's that
    /// `desired` does not have yet starts its clock; one deleted stops it.
    fn note(&mut self, update: &Update, desired: &Desired, me: &str) {
        match update {
            Update::Put(crate::model::Object::Endpoint(e))
                if e.host == me && desired.endpoint(&e.id).is_none() =>
            {
                self.since.entry(e.id.clone()).or_insert_with(std::time::Instant::now);
            }
            Update::Delete(crate::model::ObjectRef::Endpoint(id)) => drop(self.since.remove(id)),
            // A snapshot's endpoints were created before the agent looked.
            Update::Snapshot(_) => self.since.clear(),
            _ => {}
        }
    }

    /// How long each endpoint the reports say is ready (or gone) took, for those noted.
    fn settled(&mut self, reports: &[Report]) -> Vec<Duration> {
        let mut took = Vec::new();
        for r in reports {
            match r {
                Report::EndpointReady { id, .. } => took.extend(self.since.remove(id).map(|t| t.elapsed())),
                Report::EndpointGone { id } => drop(self.since.remove(id)),
                _ => {}
            }
        }
        took
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Forwards the programs' aya-log records (rare events, and drops when drop logging is on)
/// into the agent's log.
fn spawn_bpf_logger(dp: &mut Datapath) {
    let logger = match aya_log::EbpfLogger::init_with_logger(&mut dp.ebpf, DatapathLog) {
        Ok(logger) => logger,
        Err(e) => {
            warn!(error = %e, "eBPF log forwarding unavailable");
            return;
        }
    };
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd and keeps it open for as long as the
        // AsyncFd owns the logger.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let Ok(mut fd) = registered else { return };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Puts the programs' records into the agent's log under target `datapath`, with drop reasons
/// named (the programs can only log the code).
struct DatapathLog;

impl log::Log for DatapathLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = name_reason(&record.args().to_string());
        match record.level() {
            log::Level::Error => tracing::error!(target: "datapath", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "datapath", "{msg}"),
            log::Level::Info => tracing::info!(target: "datapath", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "datapath", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "datapath", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// "drop reason=25 len=98" -> "drop reason=unknown_vni len=98".
fn name_reason(msg: &str) -> String {
    let Some(at) = msg.find("reason=") else { return msg.to_owned() };
    let start = at + "reason=".len();
    let end = msg[start..].find(|c: char| !c.is_ascii_digit()).map_or(msg.len(), |i| start + i);
    // Only drop reasons: the programs log nothing else with a reason=.
    let reason = msg[start..end].parse().ok().and_then(overlay_common::stats::DropReason::from_code);
    match reason.map(overlay_common::stats::DropReason::name) {
        Some(name) => format!("{}{name}{}", &msg[..start], &msg[end..]),
        None => msg.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::name_reason;

    #[test]
    fn drop_reasons_are_named() {
        assert_eq!(name_reason("drop reason=25 len=98"), "drop reason=unknown_vni len=98");
        assert_eq!(name_reason("drop reason=20"), "drop reason=no_endpoint");
        // Codes without a name, and other messages, pass through.
        assert_eq!(name_reason("drop reason=63 len=1"), "drop reason=63 len=1");
        assert_eq!(name_reason("something else"), "something else");
    }
}
