//! Simulated hosts for the privileged tests: namespaces on the shared underlay (`underlay.rs`:
//! `eth0` a veth into the switch's bridge, an address in 198.18.0.0/15). Each host runs its own
//! agent (`agent.rs` builds its command line) with its own pin directory, state directory and
//! sandbox prefix, so several agents share the kernel without touching each other's objects.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    Proc, Run,
    agent::{AgentCommand, LogFormat, Source},
    binary, sh,
    underlay::{self, Member, Options},
    wait_for,
};

pub struct Host {
    pub name: String,
    /// The host's network namespace.
    pub ns: String,
    pub vtep: Ipv4Addr,
    /// The interface the agent uses as uplink (eth0 unless a test changes it).
    pub uplink: String,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub netns_prefix: String,
    pub log: PathBuf,
    pub agent: Option<Proc>,
}

impl Host {
    /// The namespace of container `name` on this host (as the agent names its sandboxes).
    pub fn container_ns(&self, name: &str) -> String {
        format!("{}{name}", self.netns_prefix)
    }

    /// `overlay-agent stats --json` of this host, as (counter -> packets).
    pub fn counters(&self) -> serde_json::Value {
        let out = sh(Command::new(binary("overlay-agent"))
            .args(["stats", "--json", "--pin-dir"])
            .arg(&self.pin_dir));
        serde_json::from_str(&out).expect("stats JSON")
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.counters()[name]["packets"].as_u64().unwrap_or(0)
    }

    /// The entries of this host's pinned map `map` as bpftool decodes them with the map's BTF:
    /// `[{"key": {...}, "value": {...}}, ...]` with named fields.
    pub fn map(&self, map: &str) -> serde_json::Value {
        let out =
            sh(Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(self.pin_dir.join(map)));
        let raw: serde_json::Value = serde_json::from_str(&out).expect("bpftool JSON");
        // With -j, bpftool gives raw hex bytes in key/value and the BTF view in "formatted".
        let entries = raw
            .as_array()
            .expect("array")
            .iter()
            .map(|e| e.get("formatted").cloned().unwrap_or_else(|| e.clone()));
        serde_json::Value::Array(entries.collect())
    }
}

/// The upstream resolver every test agent relays to: an address in the underlay namespace,
/// where a test that needs one starts it (`overlay-probe dns-serve`).
pub const UPSTREAM_DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 253);

pub struct Topology {
    pub hosts: Vec<Host>,
    pub underlay: String,
    /// Dropped last: removes everything named after the run.
    pub run: Run,
}

impl Topology {
    /// Builds the underlay and `n` hosts (h1..hn at 198.18.0.1..n).
    pub fn new(tag: &str, n: usize) -> Self {
        let run = Run::new(tag);
        let underlay_ns = run.ns("ul");
        let names: Vec<String> = (1..=n).map(|i| format!("h{i}")).collect();
        let namespaces: Vec<String> = names.iter().map(|name| run.ns(name)).collect();
        let vteps: Vec<Ipv4Addr> = (1..=n).map(|i| Ipv4Addr::new(198, 18, 0, i as u8)).collect();
        let members: Vec<Member<'_>> =
            namespaces.iter().zip(&vteps).map(|(ns, &addr)| Member { ns, addr }).collect();
        // Queues on the switch ports: the tests send bursts toward hosts whose uplink runs
        // native XDP.
        underlay::build(&underlay_ns, &members, Options { port_queue: Some(1000) })
            .unwrap_or_else(|e| panic!("building the underlay: {e:#}"));
        let hosts = names
            .into_iter()
            .zip(namespaces)
            .zip(vteps)
            .map(|((name, ns), vtep)| Host {
                pin_dir: run.pin_root().join(&name),
                state_dir: run.path(&format!("state-{name}")),
                netns_prefix: format!("{}-{name}-", run.id),
                uplink: "eth0".into(),
                log: run.path(&format!("agent-{name}.log")),
                name,
                ns,
                vtep,
                agent: None,
            })
            .collect();
        Self { hosts, underlay: underlay_ns, run }
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    pub fn host_mut(&mut self, name: &str) -> &mut Host {
        self.hosts.iter_mut().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Starts (or restarts) the agent of `host`; `extra` are more `run` flags.
    pub fn start_agent(&mut self, host: &str, source: Source<'_>, extra: &[&str]) {
        // The agents' upstream resolvers, from a resolv.conf of the run's own (the path a
        // host's resolv.conf takes): no agent of a test ever relays to the machine's resolvers.
        let resolv_conf = self.run.path("resolv.conf");
        std::fs::write(&resolv_conf, format!("# the test's upstream\nnameserver {UPSTREAM_DNS}\n"))
            .expect("writing the agents' resolv.conf");
        let h = self.host_mut(host);
        if let Some(mut old) = h.agent.take() {
            old.kill();
        }
        let log = File::options().create(true).append(true).open(&h.log).expect("agent log");
        let agent = AgentCommand {
            host: &h.name,
            uplink: &h.uplink,
            vtep: h.vtep,
            netns: &h.ns,
            pin_dir: &h.pin_dir,
            state_dir: &h.state_dir,
            netns_prefix: &h.netns_prefix,
            source: &source,
        };
        let mut cmd = agent.command(&binary("overlay-agent"), LogFormat::Text);
        cmd.arg("--resolv-conf").arg(&resolv_conf);
        cmd.args(extra).stdout(Stdio::from(log.try_clone().expect("log"))).stderr(Stdio::from(log));
        h.agent = Some(Proc::spawn(&format!("agent {host}"), &mut cmd));
    }

    /// Waits until the agent of `host` logged `needle` (e.g. "full reconcile done").
    pub fn wait_log(&self, host: &str, needle: &str, timeout: Duration) -> bool {
        let h = self.host(host);
        wait_for(timeout, || std::fs::read_to_string(&h.log).ok().filter(|l| l.contains(needle)).map(|_| ()))
            .is_some()
    }

    /// Prints every agent's log (called when a test fails, so the failure can be understood).
    pub fn dump_logs(&self) {
        for h in &self.hosts {
            let log = std::fs::read_to_string(&h.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("----- agent {} (last {} lines) -----", h.name, tail.len());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for h in &mut self.hosts {
            if let Some(mut agent) = h.agent.take() {
                agent.kill();
            }
        }
        // `run` is dropped after this: namespaces (and the sandboxes' holders), pins, files.
    }
}
