//! `overlay-agent monitor`: a live stream of a host's drops (and of each forwarded flow's first
//! packet) from the ring buffer its programs write while a monitor listens
//! (overlay_common::monitor; the programs' side is overlay-ebpf/src/monitor.rs).
//!
//! - Listening: [`Session::open`] sets the control entry's flags, with an expiry
//!   [`MONITOR_LEASE_NS`] ahead that [`Session::renew`] pushes on every second; dropping the
//!   session (the end, Ctrl-C, SIGTERM, a closed stdout) clears them. A monitor killed with -9
//!   leaves the flags set, but the programs stop writing when the expiry passes.
//! - One monitor per host: a second one is refused while the first's expiry has not passed and
//!   its process lives (a refcount would let one monitor's flows setting change the other's
//!   stream, and both would read, and consume, the same ring buffer).
//! - New flows: the programs keep the flows a session has reported in an LRU hash, with the
//!   session's number; each session takes the next number, so every flow is new to it once.

pub mod event;
pub mod filter;

use std::{
    io::Write,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData, RingBuf};
use overlay_common::monitor::{MAP_MONITOR, MAP_MONITOR_CTL, MONITOR_LEASE_NS, MonitorCtl};

pub use self::{event::Record, filter::Filter};
use crate::datapath::PinDir;

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes the one timespec given; CLOCK_MONOTONIC cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The control entry of a host's programs.
pub struct Control {
    map: Array<MapData, MonitorCtl>,
}

impl Control {
    pub fn open(pins: &PinDir) -> anyhow::Result<Self> {
        let path = pins.map(MAP_MONITOR_CTL);
        let data = MapData::from_pin(&path).with_context(|| {
            format!("opening {} (is the agent of this host running, and of this version?)", path.display())
        })?;
        Ok(Self { map: Array::try_from(Map::Array(data))? })
    }

    pub fn get(&self) -> anyhow::Result<MonitorCtl> {
        Ok(self.map.get(&0, 0)?)
    }

    pub fn set(&mut self, ctl: MonitorCtl) -> anyhow::Result<()> {
        Ok(self.map.set(0, ctl, 0)?)
    }

    /// Whether a monitor listens now: flags set, expiry ahead, its process alive.
    pub fn holder(&self) -> anyhow::Result<Option<u32>> {
        let ctl = self.get()?;
        let alive =
            ctl.pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(ctl.pid as i32), None).is_ok();
        Ok((ctl.flags != 0 && ctl.expires_ns > monotonic_ns() && alive).then_some(ctl.pid))
    }
}

/// A listening monitor: the flags stay set while it lives.
pub struct Session {
    control: Control,
    ctl: MonitorCtl,
    pub ring: RingBuf<MapData>,
}

impl Session {
    /// Starts listening for `flags` (`MONITOR_*`) on the host whose pins are `pins`.
    pub fn open(pins: &PinDir, flags: u32) -> anyhow::Result<Self> {
        let mut control = Control::open(pins)?;
        if let Some(pid) = control.holder()? {
            anyhow::bail!(
                "another monitor (pid {pid}) listens on {}: one at a time per host",
                pins.root().display()
            );
        }
        let path = pins.map(MAP_MONITOR);
        let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut ring = RingBuf::try_from(Map::RingBuf(data))?;
        // What an earlier monitor left unread (one killed within its lease) is not this one's.
        while ring.next().is_some() {}
        let ctl = MonitorCtl {
            flags,
            session: control.get()?.session.wrapping_add(1),
            expires_ns: monotonic_ns() + MONITOR_LEASE_NS,
            pid: std::process::id(),
            _pad: 0,
        };
        control.set(ctl)?;
        Ok(Self { control, ctl, ring })
    }

    /// Pushes the expiry on; called every second.
    pub fn renew(&mut self) -> anyhow::Result<()> {
        self.ctl.expires_ns = monotonic_ns() + MONITOR_LEASE_NS;
        self.control.set(self.ctl)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let cleared = MonitorCtl { flags: 0, expires_ns: 0, pid: 0, ..self.ctl };
        if let Err(e) = self.control.set(cleared) {
            eprintln!("monitor: clearing the control entry: {e:#}");
        }
    }
}

/// Set by SIGINT, SIGTERM and SIGHUP: the loop ends and the session clears its flags.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// How the stream is printed and when it ends.
pub struct Output {
    pub json: bool,
    /// Stop after this many events printed.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// Listens until a signal, `count` events or `duration`, printing what passes `filter`.
pub fn run(pins: &PinDir, flags: u32, filter: &Filter, out: &Output) -> anyhow::Result<()> {
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        // No SA_RESTART: poll returns EINTR, and the loop sees STOP at once.
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    for sig in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM, nix::sys::signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { nix::sys::signal::sigaction(sig, &action) }?;
    }
    let mut session = Session::open(pins, flags)?;
    // Monotonic event times to wall-clock times.
    let wall_offset = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as i128
        - i128::from(monotonic_ns());
    eprintln!(
        "monitor: listening on {} for {} (Ctrl-C to stop)",
        pins.root().display(),
        if flags & overlay_common::monitor::MONITOR_FLOWS != 0 { "drops and new flows" } else { "drops" }
    );
    let started = Instant::now();
    let mut renewed = Instant::now();
    let mut names = std::collections::HashMap::<u32, Option<String>>::new();
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    let fd = session.ring.as_raw_fd();
    loop {
        // Stopping: what the programs wrote before the signal is still read and printed.
        let stopping = STOP.load(Ordering::Relaxed);
        if !stopping {
            let mut pfd = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
            // SAFETY: one valid pollfd; a signal ends the wait early (EINTR), seen next round.
            unsafe { libc::poll(pfd.as_mut_ptr(), 1, 200) };
        }
        let mut lock = stdout.lock();
        while let Some(item) = session.ring.next() {
            let Some(mut rec) = Record::from_bytes(&item) else { continue };
            drop(item);
            if !filter.passes(&rec) {
                continue;
            }
            rec.interface = names
                .entry(rec.ifindex)
                .or_insert_with(|| {
                    nix::net::if_::if_indextoname(rec.ifindex).ok().map(|n| n.to_string_lossy().into_owned())
                })
                .clone();
            let line = if out.json {
                let mut v = serde_json::to_value(&rec)?;
                v["time"] = wall(wall_offset + i128::from(rec.ts_ns)).into();
                serde_json::to_string(&v)?
            } else {
                rec.line(&wall(wall_offset + i128::from(rec.ts_ns)))
            };
            // A closed stdout (`| head`) ends the monitor, which clears its flags on the way.
            if writeln!(lock, "{line}").and_then(|()| lock.flush()).is_err() {
                return Ok(());
            }
            printed += 1;
            if out.count.is_some_and(|n| printed >= n) {
                return Ok(());
            }
        }
        drop(lock);
        if stopping {
            break;
        }
        if out.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if renewed.elapsed() >= Duration::from_secs(1) {
            session.renew()?;
            renewed = Instant::now();
        }
    }
    Ok(())
}

/// Unix nanoseconds as RFC 3339 with microseconds.
fn wall(ns: i128) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}
