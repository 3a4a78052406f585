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
//!
//! A `--netns` path is checked before it is used ([`Forbidden`]): it must be a network namespace,
//! and not one of a host's own (the agent's, another registered host's on this machine, or the
//! machine's initial one), where the container's interface would plug the overlay into the
//! host itself.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{
    model::{Container, Host},
    netlink::netns,
    source::Report,
};

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
    /// The namespaces of this machine a `--netns` container is never given (the host's own and
    /// the initial one); other hosts' are added from the desired state at each check.
    forbidden: Forbidden,
    machine: Option<String>,
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
        Ok(Self {
            prefix: prefix.to_owned(),
            state_file,
            records,
            forbidden: Forbidden::of_this_host(),
            machine: machine(),
        })
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

    /// Makes sure the container's namespace exists, with its holder running; a `--netns` one is
    /// checked first against this host's own namespaces and those of `hosts`.
    pub fn ensure<'a>(
        &mut self,
        c: &Container,
        hosts: impl Iterator<Item = &'a Host>,
    ) -> anyhow::Result<Report> {
        let wanted = c.netns.clone().unwrap_or_else(|| self.path(&c.name));
        if self.records.get(&c.name).is_some_and(|r| r.netns != wanted || r.foreign != c.netns.is_some()) {
            // A container of the same name set up differently before (removed and created
            // again while the agent was away): take the old one down first.
            self.remove(&c.name)?;
        }
        if let Some(path) = &c.netns {
            // A namespace from another runtime: use it, never create or remove it. One whose
            // runtime moves the interfaces in itself (Docker) is never entered by the agent, so
            // there is nothing to check: the runtime puts its container's interface where it
            // put the container.
            if !c.handover {
                let mut forbidden = self.forbidden.clone();
                forbidden.add_hosts(hosts, self.machine.as_deref());
                forbidden.check(path).map_err(anyhow::Error::msg)?;
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
        let _ = std::fs::remove_dir_all(Path::new(NETNS_ETC).join(ns));
        self.records.remove(name);
        self.save()
    }

    /// Writes the name files of a sandbox the agent made: `/etc/netns/<namespace>/resolv.conf`
    /// naming the resolver of each of its networks (the network's gateway, where the
    /// datapath answers names: docs/names.md), and `hosts` with its own name at each of its
    /// addresses. `ip netns exec` and `overlay container exec` put them over `/etc/` for the
    /// commands they run. A container of another runtime (`--netns`, Docker) has files of its
    /// runtime's: nothing is written for it. `networks` are (gateway, the container's address)
    /// per network, in the order its interfaces were made.
    pub fn write_name_files(&self, name: &str, networks: &[(Ipv4Addr, Ipv4Addr)]) -> anyhow::Result<()> {
        let Some(record) = self.records.get(name).filter(|r| !r.foreign) else { return Ok(()) };
        let Some(ns) = record.netns.file_name().and_then(|n| n.to_str()) else { return Ok(()) };
        let dir = Path::new(NETNS_ETC).join(ns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (resolv, hosts) = name_files(name, networks);
        for (file, text) in [("resolv.conf", resolv), ("hosts", hosts)] {
            let path = dir.join(file);
            let tmp = dir.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    fn save(&self) -> anyhow::Result<()> {
        let tmp = self.state_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.records)?)?;
        std::fs::rename(&tmp, &self.state_file)?;
        Ok(())
    }
}

/// Network namespaces a container must never be given with `--netns`, by identity
/// ([`netns::identity`]), each with whose it is.
#[derive(Clone, Debug, Default)]
pub struct Forbidden {
    entries: Vec<(String, String)>,
}

impl Forbidden {
    /// The current thread's namespace (for an agent: its host's own) and the machine's initial
    /// one. One that cannot be read is left out, with a warning: the other checks still hold.
    pub fn of_this_host() -> Self {
        let mut forbidden = Self::default();
        match netns::current_identity() {
            Ok(id) => forbidden.add(id, "this host's own network namespace (the agent's)"),
            Err(e) => tracing::warn!(error = %e, "cannot identify the agent's network namespace"),
        }
        forbidden.add_initial();
        forbidden
    }

    /// Adds the machine's initial namespace (as far as it can be identified: see
    /// [`netns::initial_identities`]).
    pub fn add_initial(&mut self) {
        for id in netns::initial_identities() {
            self.add(id, "the machine's initial network namespace (the host's own)");
        }
    }

    pub fn add(&mut self, identity: impl Into<String>, whose: impl Into<String>) {
        self.entries.push((identity.into(), whose.into()));
    }

    /// Adds the namespace of each host whose agent runs on `machine` (and says which namespace
    /// it runs in). Identities are only unique on one machine, so other machines' are ignored.
    pub fn add_hosts<'a>(&mut self, hosts: impl Iterator<Item = &'a Host>, machine: Option<&str>) {
        for h in hosts {
            if let Some(agent) = &h.agent
                && Some(agent.machine.as_str()) == machine
                && let Some(id) = &agent.netns
            {
                self.add(id.clone(), format!("host {:?}'s own network namespace", h.name));
            }
        }
    }

    /// Whose namespace `identity` is, if a container must not be given it.
    pub fn whose(&self, identity: &str) -> Option<&str> {
        self.entries.iter().find(|(id, _)| id == identity).map(|(_, whose)| whose.as_str())
    }

    /// Checks that `path` is a network namespace a container may be given; says why not.
    pub fn check(&self, path: &Path) -> Result<(), String> {
        let id = netns::identity(path).map_err(|e| e.to_string())?;
        match self.whose(&id) {
            Some(whose) => Err(format!(
                "{} is {whose}: a container needs a network namespace of its own",
                path.display()
            )),
            None => Ok(()),
        }
    }
}

/// This machine's hostname, as agents record it in their host's `AgentIdentity::machine`.
pub fn machine() -> Option<String> {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok())
}

/// The namespace of container `name`'s sandbox, for an agent whose sandboxes are named with
/// `prefix`.
/// Where `ip netns exec` looks for a namespace's own `/etc` files (iproute2's NETNS_ETC_DIR).
pub const NETNS_ETC: &str = "/etc/netns";

/// The resolv.conf and hosts of container `name` with `networks` (gateway, its address): at
/// most three nameservers (glibc reads no more), each network's gateway once.
pub fn name_files(name: &str, networks: &[(Ipv4Addr, Ipv4Addr)]) -> (String, String) {
    use std::fmt::Write as _;
    let mut resolv =
        String::from("# Written by overlay-agent: the resolver of each network is its gateway.\n");
    let mut seen = Vec::new();
    for (gateway, _) in networks {
        if !seen.contains(gateway) && seen.len() < 3 {
            seen.push(*gateway);
            let _ = writeln!(resolv, "nameserver {gateway}");
        }
    }
    let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (_, ip) in networks {
        let _ = writeln!(hosts, "{ip}\t{name}");
    }
    (resolv, hosts)
}

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

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path};

    use super::name_files;

    #[test]
    fn resolv_conf_names_each_gateway_once_and_hosts_each_address() {
        let a = |s: &str| s.parse().unwrap();
        let (resolv, hosts) = name_files(
            "web",
            &[
                (a("10.0.9.1"), a("10.0.9.2")),
                (a("10.0.10.1"), a("10.0.10.7")),
                (a("10.0.9.1"), a("10.0.9.3")),
            ],
        );
        let servers: Vec<&str> = resolv.lines().filter(|l| l.starts_with("nameserver")).collect();
        assert_eq!(servers, ["nameserver 10.0.9.1", "nameserver 10.0.10.1"]);
        assert!(hosts.contains("10.0.9.2\tweb\n") && hosts.contains("10.0.10.7\tweb\n"), "{hosts}");
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n"));
        let many: Vec<_> = (1..=5).map(|i| (a(&format!("10.0.{i}.1")), a(&format!("10.0.{i}.2")))).collect();
        assert_eq!(name_files("x", &many).0.lines().filter(|l| l.starts_with("nameserver")).count(), 3);
    }

    use super::Forbidden;
    use crate::{
        model::{AgentIdentity, Host},
        netlink::netns,
    };

    fn host(name: &str, machine: &str, netns: Option<&str>) -> Host {
        let agent = AgentIdentity {
            id: format!("id-{name}"),
            machine: machine.into(),
            pid: 1,
            netns: netns.map(str::to_owned),
        };
        Host { agent: Some(agent), ..Host::new(name, Ipv4Addr::LOCALHOST) }
    }

    #[test]
    fn other_hosts_namespaces_on_this_machine_are_forbidden() {
        let mut f = Forbidden::default();
        f.add("4:100", "this host's own network namespace (the agent's)");
        let hosts = [
            host("h2", "m1", Some("4:200")),
            // Identities are per machine: the same numbers elsewhere are another namespace.
            host("h3", "m2", Some("4:300")),
            // An agent that does not say (an older one).
            host("h4", "m1", None),
            Host::new("h5", Ipv4Addr::LOCALHOST),
        ];
        f.add_hosts(hosts.iter(), Some("m1"));
        assert_eq!(f.whose("4:100"), Some("this host's own network namespace (the agent's)"));
        assert_eq!(f.whose("4:200"), Some(r#"host "h2"'s own network namespace"#));
        assert_eq!(f.whose("4:300"), None);
        assert_eq!(f.whose("4:999"), None);
    }

    #[test]
    fn the_current_namespace_is_refused_by_path() {
        let mut f = Forbidden::default();
        f.add(
            netns::current_identity().expect("identity"),
            "this host's own network namespace (the agent's)",
        );
        let e = f.check(Path::new("/proc/self/ns/net")).expect_err("refused");
        assert_eq!(
            e,
            "/proc/self/ns/net is this host's own network namespace (the agent's): a container needs a network namespace of its own"
        );
        assert!(f.check(Path::new("/proc/self/ns/mnt")).is_err());
        assert!(Forbidden::default().check(Path::new("/proc/self/ns/net")).is_ok());
    }
}
