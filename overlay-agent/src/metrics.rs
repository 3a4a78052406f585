//! `GET /metrics`: what the agent and its datapath did, for a Prometheus server to scrape
//! (OpenMetrics text, encoded by the Prometheus project's own Rust client, `prometheus-client`).
//!
//! Figures that only the agent's loop sees as they happen (reconcile passes and how long each
//! took) are kept in [`Passes`], inside the shared `Health`. Everything else is read when the
//! scrape comes: the datapath's counters from the host's pinned STATS map (summed over CPUs, as
//! `overlay-agent stats` prints them), and the agent's state from `Health`. So a registry is
//! built per scrape; the persistent metrics are registered into it by handle.

use std::time::Duration;

use overlay_common::stats;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use std::sync::atomic::AtomicU64;

use crate::{
    datapath::{PinDir, maps},
    health::Health,
};

/// The media type of the answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

/// Reconcile passes and their durations, observed by the agent's loop.
#[derive(Clone, Debug)]
pub struct Passes {
    pub count: Counter,
    pub seconds: Histogram,
}

impl Default for Passes {
    fn default() -> Self {
        // 1 ms to about 16 s: a pass of one change is milliseconds, a full pass of a large
        // state seconds.
        Self { count: Counter::default(), seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)) }
    }
}

impl Passes {
    pub fn observe(&self, took: Duration) {
        self.count.inc();
        self.seconds.observe(took.as_secs_f64());
    }
}

/// Latencies observed by the agent's loop.
#[derive(Clone, Debug)]
pub struct Latencies {
    /// From a watch event's arrival to the end of the pass that applied it.
    pub watch_lag: Histogram,
    /// From a new local endpoint's arrival to its ready report.
    pub endpoint_ready: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        // 1 ms to about 16 s, as the passes.
        Self {
            watch_lag: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            endpoint_ready: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

/// The metrics text for one scrape. A datapath whose pins cannot be read (the agent has not
/// loaded it yet) leaves its families empty rather than failing the scrape.
pub fn render(health: &Health, pins: &PinDir) -> String {
    let mut registry = Registry::with_prefix("overlay");
    gauge(&mut registry, "ready", "1 once the first full reconcile is done", i64::from(health.ready));
    gauge(
        &mut registry,
        "registered",
        "1 while the host is registered in the store (both leases held)",
        i64::from(health.registered),
    );
    gauge(
        &mut registry,
        "brake_engaged",
        "1 while the safety brake holds a change back",
        i64::from(health.brake.is_some()),
    );
    gauge(
        &mut registry,
        "endpoint_map_entries",
        "Entries in the endpoint map (local and remote)",
        count(health.map_endpoints),
    );
    gauge(
        &mut registry,
        "pending_retries",
        "Keys that failed and wait for a retry",
        count(health.pending_retries),
    );
    gauge(
        &mut registry,
        "failures",
        "Containers and endpoints the agent cannot make now",
        count(health.failures.len()),
    );
    gauge(
        &mut registry,
        "last_reconcile_timestamp_seconds",
        "Unix time of the last reconcile pass",
        i64::try_from(health.last_reconcile).unwrap_or(i64::MAX),
    );
    let resets: Counter = Counter::default();
    resets.inc_by(health.store_resets);
    registry.register(
        "store_resets",
        "Full re-reads of a store that could not be followed change by change",
        resets,
    );
    registry.register("reconcile_passes", "Reconcile passes", health.reconcile.count.clone());
    registry.register_with_unit(
        "reconcile_duration",
        "How long each reconcile pass took",
        prometheus_client::registry::Unit::Seconds,
        health.reconcile.seconds.clone(),
    );
    registry.register(
        "resolver_queries",
        "Queries to the agent's resolver, by how they ended (the datapath's own answers are dns_answer)",
        health.dns.clone(),
    );
    control_plane(&mut registry, health);
    process(&mut registry);
    datapath(&mut registry, pins);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

/// The control plane beyond the reconcile passes: the desired state's size, the etcd watch,
/// the host's leases, readiness check by check, attachments repaired.
fn control_plane(registry: &mut Registry, health: &Health) {
    let objects = Family::<Labels, Gauge>::default();
    for (kind, n) in &health.objects {
        objects.get_or_create(&vec![("kind".to_owned(), (*kind).to_owned())]).set(count(*n));
    }
    registry.register(
        "objects",
        "Objects of the desired state by kind (containers: this host's), as of the last pass",
        objects,
    );
    if let Some(etcd) = &health.etcd {
        gauge(registry, "etcd_connected", "1 while the etcd watch is established", i64::from(etcd.connected));
        counter(
            registry,
            "etcd_reconnects",
            "Times the etcd watch was established again after it was lost",
            etcd.reconnects,
        );
        counter(
            registry,
            "lease_renewals_failed",
            "Renewals of the host's leases that failed (etcd unreachable, or a lease found gone)",
            health.lease_renewals_failed.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    registry.register_with_unit(
        "etcd_watch_lag",
        "From an etcd watch event's arrival to the end of the reconcile pass that applied it",
        Unit::Seconds,
        health.latencies.watch_lag.clone(),
    );
    registry.register_with_unit(
        "endpoint_ready_latency",
        "From a new local endpoint's arrival at the agent to its ready report",
        Unit::Seconds,
        health.latencies.endpoint_ready.clone(),
    );
    let checks = Family::<Labels, Gauge>::default();
    for c in health.checks(crate::health::now()) {
        checks.get_or_create(&vec![("check".to_owned(), c.name.to_owned())]).set(i64::from(c.ok));
    }
    registry.register("ready_check", "1 while the readiness check passes (the checks of /readyz)", checks);
    counter(
        registry,
        "datapath_reattached",
        "Attachments the agent made again after they were detached by hand",
        health.datapath.reattached,
    );
}

/// The process's figures (process.rs), named as the other Prometheus clients name them, under
/// the agent's prefix. None when /proc cannot be read.
fn process(registry: &mut Registry) {
    let Ok(f) = crate::process::read() else { return };
    let cpu: Counter<f64, AtomicU64> = Counter::default();
    cpu.inc_by(f.cpu_seconds);
    registry.register_with_unit("process_cpu", "User and system CPU time of the agent", Unit::Seconds, cpu);
    gauge_unit(
        registry,
        "process_resident_memory",
        "Resident memory of the agent",
        Unit::Bytes,
        f.resident_bytes,
    );
    gauge(registry, "process_open_fds", "Open file descriptors of the agent", count(f.open_fds as usize));
    let start: Gauge<f64, AtomicU64> = Gauge::default();
    start.set(f.start_time_seconds);
    registry.register_with_unit("process_start_time", "Unix time the agent started", Unit::Seconds, start);
}

fn gauge_unit(registry: &mut Registry, name: &str, help: &str, unit: Unit, value: u64) {
    let g: Gauge = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register_with_unit(name, help, unit, g);
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The datapath's counters: forwarded packets and bytes per event, dropped ones per reason (the
/// names `overlay-agent stats` prints).
fn datapath(registry: &mut Registry, pins: &PinDir) {
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let drops = Family::<Labels, Counter>::default();
    let drop_bytes = Family::<Labels, Counter>::default();
    if let Some(totals) = maps::open_stats(pins).ok().and_then(|m| maps::read_stats(&m).ok()) {
        for (code, c) in totals.iter().enumerate() {
            let code = code as u32;
            let Some(name) = stats::name(code) else { continue };
            if stats::is_drop(code) {
                let labels = vec![("reason".to_owned(), name.to_string())];
                drops.get_or_create(&labels).inc_by(c.packets);
                drop_bytes.get_or_create(&labels).inc_by(c.bytes);
            } else {
                let labels = vec![("event".to_owned(), name.to_string())];
                packets.get_or_create(&labels).inc_by(c.packets);
                bytes.get_or_create(&labels).inc_by(c.bytes);
            }
        }
    }
    registry.register("datapath_packets", "Packets the programs forwarded or answered, by event", packets);
    registry.register_with_unit(
        "datapath",
        "Bytes the programs forwarded or answered, by event",
        prometheus_client::registry::Unit::Bytes,
        bytes,
    );
    registry.register("datapath_drops", "Packets the programs dropped, by reason", drops);
    registry.register_with_unit(
        "datapath_dropped",
        "Bytes the programs dropped, by reason",
        prometheus_client::registry::Unit::Bytes,
        drop_bytes,
    );
}
