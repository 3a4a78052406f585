//! A whole overlay for the end-to-end tests of the control plane: simulated hosts, a real etcd
//! in the underlay namespace (reachable from every host at 198.18.0.254), an agent per host
//! following etcd, and the `overlay` CLI run from a host's namespace the way a person on that
//! host would run it.

use std::{collections::BTreeMap, net::Ipv4Addr, process::Output, time::Duration};

use crate::{
    Run,
    agent::Source,
    binary,
    etcd::{Etcd, EtcdOptions},
    in_ns, ip_in,
    topology::Topology,
    try_sh,
    underlay::PREFIX_LEN,
    wait_for,
};

/// The etcd address on the underlay bridge.
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// Starts etcd in the namespace `underlay` (built by `underlay::build`) at `ETCD_IP`, which it
/// adds to the bridge: every host reaches it across the switch. For a `Cluster`, and for the
/// benchmark's topologies on etcd.
pub fn start_etcd(run: &Run, underlay: &str) -> anyhow::Result<Etcd> {
    ip_in(underlay, &["addr", "add", &format!("{ETCD_IP}/{PREFIX_LEN}"), "dev", "br0"])?;
    let opts = EtcdOptions { ip: ETCD_IP, netns: Some(underlay.to_owned()), ..Default::default() };
    Ok(Etcd::start_for(run, opts)?)
}
pub use crate::topology::UPSTREAM_DNS;

/// Where each agent serves /healthz (inside its host's namespace).
pub const HEALTH_ADDR: &str = "127.0.0.1:9700";

pub struct Cluster {
    /// Dropped first: agents, then everything named after the run (etcd runs in its namespace).
    pub topo: Topology,
    pub etcd: Etcd,
    pub url: String,
    pub lease_ttl: u64,
    /// More `run` flags for the agent of each host (by name), on every (re)start.
    pub agent_args: BTreeMap<String, Vec<String>>,
}

impl Cluster {
    /// Builds `hosts` hosts and etcd, and starts every agent. None (after saying why) when
    /// there is no etcd binary.
    pub fn start(tag: &str, hosts: usize, lease_ttl: u64) -> Option<Self> {
        Self::start_with(tag, hosts, lease_ttl, |_, _| Vec::new())
    }

    /// `start`, giving the agent of each host the `run` flags `agent_args(run, host)` returns
    /// (paths under the run's directory, say), on every (re)start.
    pub fn start_with(
        tag: &str,
        hosts: usize,
        lease_ttl: u64,
        agent_args: impl Fn(&Run, &str) -> Vec<String>,
    ) -> Option<Self> {
        if Etcd::binary().is_none() {
            crate::skip("no etcd binary (install etcd-server, or run ./setup)");
            return None;
        }
        let topo = Topology::new(tag, hosts);
        let etcd = start_etcd(&topo.run, &topo.underlay).unwrap_or_else(|e| panic!("starting etcd: {e:#}"));
        let url = etcd.url();
        let names: Vec<String> = topo.hosts.iter().map(|h| h.name.clone()).collect();
        let agent_args = names.iter().map(|h| (h.clone(), agent_args(&topo.run, h))).collect();
        let mut cluster = Self { topo, etcd, url, lease_ttl, agent_args };
        for host in &names {
            cluster.start_agent(host);
        }
        for host in &names {
            assert!(cluster.wait_registered(host), "agent {host} never registered its host");
        }
        Some(cluster)
    }

    /// (Re)starts the agent of `host`, following etcd.
    pub fn start_agent(&mut self, host: &str) {
        let ttl = self.lease_ttl.to_string();
        let url = self.url.clone();
        let mut args = vec!["--lease-ttl", &ttl, "--resync-secs", "5", "--health-addr", HEALTH_ADDR];
        let extra = self.agent_args.get(host).cloned().unwrap_or_default();
        args.extend(extra.iter().map(String::as_str));
        self.topo.start_agent(host, Source::Etcd(&url), &args);
    }

    /// Kills the agent of `host` with SIGKILL, as a crash would.
    pub fn kill_agent(&mut self, host: &str) {
        if let Some(agent) = self.topo.host_mut(host).agent.as_mut() {
            agent.kill();
        }
    }

    /// `overlay <args>` run on `host`.
    pub fn cli_on(&self, host: &str, args: &[&str]) -> Output {
        let overlay = binary("overlay");
        let mut cmd = in_ns(
            &self.topo.host(host).ns,
            &[overlay.to_str().expect("path"), "--etcd-endpoints", &self.url],
        );
        try_sh(cmd.args(args))
    }

    /// `overlay <args>` on h1.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_on("h1", args)
    }

    /// `overlay <args>` on h1, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "overlay {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `overlay <args>` on h1, which must fail; returns its stderr.
    pub fn refused(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "overlay {} should have failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Waits until `overlay host ls` lists `host` as alive.
    pub fn wait_registered(&self, host: &str) -> bool {
        wait_for(Duration::from_secs(20), || (self.host_state(host)? == "alive").then_some(())).is_some()
    }

    /// The STATE column of `overlay host ls` for `host` (None: not listed).
    pub fn host_state(&self, host: &str) -> Option<String> {
        let out = self.cli(&["host", "ls"]);
        let header_and_rows = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = header_and_rows.lines();
        let at = lines.next()?.find("STATE")?;
        let row = lines.find(|l| l.split_whitespace().next() == Some(host))?;
        let rest = row.get(at..)?;
        // Up to the AGENT column, which follows after three spaces.
        Some(rest.split("   ").next().unwrap_or("").trim().to_owned())
    }

    /// One ping from the container `name` on `host` to `ip`.
    pub fn reaches(&self, host: &str, name: &str, ip: Ipv4Addr) -> bool {
        let ns = self.container_ns(host, name);
        try_sh(&mut in_ns(&ns, &["ping", "-c", "1", "-W", "1", &ip.to_string()])).status.success()
    }

    /// Waits (a little) until the container reaches `ip`: right after a change on another
    /// host, that host's maps may lag by a watch event.
    pub fn comes_to_reach(&self, host: &str, name: &str, ip: Ipv4Addr) -> bool {
        wait_for(Duration::from_secs(10), || self.reaches(host, name, ip).then_some(())).is_some()
    }

    /// `method path` on the health address of `host`'s agent: the status code and the JSON
    /// body (None: nothing answered).
    pub fn health(&self, host: &str, method: &str, path: &str) -> Option<(u16, serde_json::Value)> {
        let url = format!("http://{HEALTH_ADDR}{path}");
        let out = try_sh(&mut in_ns(
            &self.topo.host(host).ns,
            &["curl", "-s", "-m", "5", "-X", method, "-w", "\n%{http_code}", &url],
        ));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        Some((code.trim().parse().ok()?, serde_json::from_str(body).ok()?))
    }

    /// `GET /metrics` on `host`'s agent: the OpenMetrics text (empty if nothing answered).
    pub fn metrics(&self, host: &str) -> String {
        let url = format!("http://{HEALTH_ADDR}/metrics");
        let out = try_sh(&mut in_ns(&self.topo.host(host).ns, &["curl", "-s", "-m", "5", &url]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The keys under `/overlay/v1/<prefix>`, from etcd (etcdctl in the underlay namespace).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = crate::sh(&mut in_ns(
            &self.topo.underlay,
            &[
                "etcdctl",
                "--endpoints",
                &self.url,
                "get",
                "--prefix",
                "--keys-only",
                &format!("/overlay/v1/{prefix}"),
            ],
        ));
        out.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
    }

    /// The namespace the agent of `host` made for container `name`.
    pub fn container_ns(&self, host: &str, name: &str) -> String {
        self.topo.host(host).container_ns(name)
    }

    /// `overlay network inspect <name>` as JSON (the first element of the array).
    pub fn inspect(&self, network: &str) -> serde_json::Value {
        let out = self.ok(&["network", "inspect", network]);
        let all: serde_json::Value = serde_json::from_str(&out).expect("inspect JSON");
        all[0].clone()
    }

    /// The IPv4 address (without prefix) of `container` on `network`, from inspect.
    pub fn address(&self, network: &str, container: &str) -> Ipv4Addr {
        let net = self.inspect(network);
        let entry = net["Containers"]
            .as_object()
            .expect("Containers")
            .values()
            .find(|c| c["Name"] == container)
            .unwrap_or_else(|| panic!("{container} not on {network}: {net}"));
        let cidr = entry["IPv4Address"].as_str().expect("IPv4Address");
        cidr.split('/').next().expect("address").parse().expect("IPv4")
    }

    /// The entries of a pinned map of `host` as bpftool decodes them with the map's BTF:
    /// `[{"key": {...}, "value": {...}}, ...]` with named fields.
    pub fn map(&self, host: &str, map: &str) -> serde_json::Value {
        self.topo.host(host).map(map)
    }

    /// The value of the entry of `host`'s `map` whose key field `field` is `addr`, if any.
    fn entry(&self, host: &str, map: &str, field: &str, addr: Ipv4Addr) -> Option<serde_json::Value> {
        // bpftool prints a [u8; 4] address as an array of numbers.
        let want: Vec<serde_json::Value> = addr.octets().iter().map(|o| serde_json::json!(o)).collect();
        self.map(host, map)
            .as_array()
            .expect("array")
            .iter()
            .find(|e| e["key"][field].as_array() == Some(&want))
            .map(|e| e["value"].clone())
    }

    /// The value `host`'s endpoint map holds for `ip` (on any network), if any.
    pub fn map_entry(&self, host: &str, ip: Ipv4Addr) -> Option<serde_json::Value> {
        self.entry(host, "ENDPOINTS", "ip", ip)
    }

    /// Whether `host`'s endpoint map holds `ip` (on any network).
    pub fn maps_hold(&self, host: &str, ip: Ipv4Addr) -> bool {
        self.map_entry(host, ip).is_some()
    }

    /// Whether `host`'s peer map holds `vtep`.
    pub fn peers_hold(&self, host: &str, vtep: Ipv4Addr) -> bool {
        self.entry(host, "PEERS", "vtep", vtep).is_some()
    }
}
