//! Container sandboxes the agent makes itself: a named network namespace with a long-running
//! holder process in it, for people who have no other container runtime.
//!
//! What the agent set up is recorded in its state directory, so a restarted agent knows which
//! sandboxes are its own to keep or remove. A container given a namespace of another runtime
//! (`container create --netns`) is recorded too, as foreign: the agent never creates or removes
//! that namespace, but it must know the container was set up here, to take its endpoints out of
//! the namespace and report it gone when it is removed.
//! The holder runs in its own session, so it outlives the agent like a container outlives a
//! restarted daemon.

use std::{
    collections::BTreeMap,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{model::Container, netlink::netns, source::Report};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    netns: PathBuf,
    pid: Option<u32>,
    /// The namespace belongs to another runtime: never created, held or removed by the agent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    foreign: bool,
}

pub struct Sandboxes {
    prefix: String,
    state_file: PathBuf,
    records: BTreeMap<String, Record>,
}

impl Sandboxes {
    /// `prefix` scopes the namespace names (`/run/netns/<prefix><container>`); `state_dir` is
    /// where the agent keeps what it owns.
    pub fn open(state_dir: &Path, prefix: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        let state_file = state_dir.join("sandboxes.json");
        let records = match std::fs::read_to_string(&state_file) {
            Ok(text) => {
                serde_json::from_str(&text).with_context(|| format!("parsing {}", state_file.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_file.display())),
        };
        Ok(Self { prefix: prefix.to_owned(), state_file, records })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        path(&self.prefix, name)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn has(&self, name: &str) -> bool {
        self.records.contains_key(name)
    }

    /// The namespace of a container set up here, by name and netns path.
    pub fn netns_by_name(&self) -> BTreeMap<String, PathBuf> {
        self.records.iter().map(|(name, r)| (name.clone(), r.netns.clone())).collect()
    }

    /// The namespace of a container set up here.
    pub fn path_of(&self, name: &str) -> Option<PathBuf> {
        self.records.get(name).map(|r| r.netns.clone())
    }

    /// Whether the container's namespace belongs to another runtime (`--netns`).
    pub fn is_foreign(&self, name: &str) -> bool {
        self.records.get(name).is_some_and(|r| r.foreign)
    }

    /// Makes sure the container's namespace exists, with its holder running.
    pub fn ensure(&mut self, c: &Container) -> anyhow::Result<Report> {
        let wanted = c.netns.clone().unwrap_or_else(|| self.path(&c.name));
        if self.records.get(&c.name).is_some_and(|r| r.netns != wanted || r.foreign != c.netns.is_some()) {
            // A container of the same name set up differently before (removed and created
            // again while the agent was away): take the old one down first.
            self.remove(&c.name)?;
        }
        if let Some(path) = &c.netns {
            // A namespace from another runtime: use it, never create or remove it.
            if !netns::exists(path) {
                bail!("namespace {} of container {} does not exist", path.display(), c.name);
            }
            if !self.has(&c.name) {
                self.records.insert(c.name.clone(), Record { netns: path.clone(), pid: None, foreign: true });
                self.save()?;
            }
            return Ok(Report::ContainerReady {
                name: c.name.clone(),
                revision: c.revision,
                netns: path.clone(),
                pid: None,
            });
        }
        let path = self.path(&c.name);
        let name = path.file_name().and_then(|n| n.to_str()).context("namespace name")?.to_owned();
        let fresh = !netns::exists(&path);
        netns::create(&name).with_context(|| format!("creating namespace {}", path.display()))?;
        let mut record = self.records.get(&c.name).cloned().unwrap_or(Record {
            netns: path.clone(),
            pid: None,
            foreign: false,
        });
        if fresh || !record.pid.is_some_and(|pid| holds(pid, &path)) {
            record.pid = Some(spawn_holder(&path)?);
        }
        let pid = record.pid;
        self.records.insert(c.name.clone(), record);
        self.save()?;
        Ok(Report::ContainerReady { name: c.name.clone(), revision: c.revision, netns: path, pid })
    }

    /// Stops the holder and removes the namespace (and with it whatever interfaces remain); of a
    /// foreign namespace, only forgets it.
    pub fn remove(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(record) = self.records.get(name).cloned() else { return Ok(()) };
        if record.foreign {
            self.records.remove(name);
            return self.save();
        }
        if let Some(pid) = record.pid.filter(|pid| holds(*pid, &record.netns)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let ns = record.netns.file_name().and_then(|n| n.to_str()).context("namespace name")?;
        netns::delete(ns).with_context(|| format!("removing namespace {}", record.netns.display()))?;
        self.records.remove(name);
        self.save()
    }

    fn save(&self) -> anyhow::Result<()> {
        let tmp = self.state_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.records)?)?;
        std::fs::rename(&tmp, &self.state_file)?;
        Ok(())
    }
}

/// The namespace of container `name`'s sandbox, for an agent whose sandboxes are named with
/// `prefix`.
pub fn path(prefix: &str, name: &str) -> PathBuf {
    netns::named(&format!("{prefix}{name}"))
}

/// Whether process `pid` is alive inside the namespace at `netns`.
fn holds(pid: u32, netns: &Path) -> bool {
    let ours = std::fs::metadata(netns).map(|m| (m.dev(), m.ino()));
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| (m.dev(), m.ino()));
    matches!((ours, theirs), (Ok(a), Ok(b)) if a == b)
}

/// Starts `overlay-agent hold <netns>` in its own session.
fn spawn_holder(netns: &Path) -> anyhow::Result<u32> {
    let exe = std::env::current_exe().context("locating the agent binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("hold").arg(netns).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let child = cmd.spawn().context("starting the sandbox holder")?;
    let pid = child.id();
    // The holder is reaped by init once we let go of it (it is in its own session).
    std::mem::forget(child);
    // Wait until it is inside the namespace, so the record is true when we return.
    for _ in 0..200 {
        if holds(pid, netns) {
            return Ok(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    bail!("the sandbox holder did not enter {}", netns.display())
}

/// The holder process: enter the namespace and wait to be killed.
pub fn hold(netns: &Path) -> anyhow::Result<()> {
    let file = netns::open(netns)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
    loop {
        nix::unistd::pause();
    }
}
