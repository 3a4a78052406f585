//! The three topologies, built side by side from one plan so that hosts, containers and the
//! underlay are identical and only the way containers reach each other differs:
//!
//! ```text
//!  underlay namespace:  br0 ── p1 ═══ eth0 (198.18.0.1/24) host h1 ── container a 10.10.0.2
//!                           └─ p2 ═══ eth0 (198.18.0.2/24) host h2 ── container b 10.10.0.3
//! ```
//!
//! The underlay is the test suite's (`overlay_tests::underlay`, the same switch the privileged
//! tests' hosts stand on), without queues on the switch ports; what differs below is built here.
//!
//! * no overlay (the floor): container /32 routes across the hosts via the underlay addresses,
//!   the host side of each container veth answers ARP (proxy ARP, gateway address on it),
//!   containers at MTU 1500. No encapsulation at all.
//! * kernel VXLAN, the way Docker's overlay driver does it: per host a bridge br0 holding the
//!   gateway address, a vxlan device (`learning proxy l2miss l3miss`, VNI 4097, port 4789, MTU
//!   1450) and the container veths; static FDB entries (remote MAC → remote VTEP) and permanent
//!   neighbor entries on the vxlan device, which answers ARP from them. Containers at MTU 1450.
//! * this project's eBPF datapath: one overlay-agent per host, which creates the container
//!   namespaces and veths itself. The data-plane rounds run it on the file source (a state file
//!   the harness writes); the control-plane stage builds it a second time on etcd
//!   (`EbpfSource::Etcd` in `BuildOptions`), with etcd on the underlay bridge at 198.18.0.254 as the test suite's
//!   `Cluster` runs it, and the network and containers created through the store.
//!
//! Each topology has its own namespaces (`<run>-<tag>-u`, `<run>-<tag>-h1`, ...), so all three
//! exist at once and the rounds can alternate between them without rebuilding anything.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_agent::model::{MacAddr, State};
use overlay_tests::{
    Proc, Run,
    agent::{AgentCommand, Source},
    in_ns, ip, ip_in, sh_result,
    underlay::{self, Member},
};
use serde::{Deserialize, Serialize};

use crate::{
    agent::{Agent, AgentArgs},
    state::{self, FilePublisher, Publisher},
    store::{EtcdPublisher, Request, StoreClient, start_etcd},
    sys::{read_line_timeout, sysctl_in, worker_in},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    NoOverlay,
    KernelVxlan,
    Ebpf,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::NoOverlay, Kind::KernelVxlan, Kind::Ebpf];

    pub fn key(self) -> &'static str {
        match self {
            Kind::NoOverlay => "no-overlay",
            Kind::KernelVxlan => "kernel-vxlan",
            Kind::Ebpf => "ebpf",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Kind::NoOverlay => "no overlay (routed)",
            Kind::KernelVxlan => "kernel VXLAN (Docker-style)",
            Kind::Ebpf => "eBPF overlay (this project)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Kind::NoOverlay => "r",
            Kind::KernelVxlan => "v",
            Kind::Ebpf => "e",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::NoOverlay => {
                "containers routed across the hosts with no encapsulation: /32 routes via the \
                 underlay addresses, proxy ARP and the gateway address on the host side of each \
                 veth, MTU 1500"
            }
            Kind::KernelVxlan => {
                "Docker's overlay driver rebuilt by hand: per host a bridge br0 with the gateway \
                 address, a kernel vxlan device (VNI 4097, port 4789, learning proxy l2miss l3miss, \
                 MTU 1450) and the container veths; static FDB entries and permanent neighbor \
                 entries; containers at MTU 1450"
            }
            Kind::Ebpf => {
                "overlay-agent per host (file source): VXLAN encap at TC on each container veth, \
                 decap at the uplink, ARP from maps; containers at uplink MTU - 50"
            }
        }
    }
}

/// The plan every topology follows.
pub struct HostSpec {
    pub name: &'static str,
    pub vtep: Ipv4Addr,
}

pub struct ContainerSpec {
    pub name: &'static str,
    /// Index into HOSTS.
    pub host: usize,
    pub ip: Ipv4Addr,
}

pub const HOSTS: [HostSpec; 2] = [
    HostSpec { name: "h1", vtep: Ipv4Addr::new(198, 18, 0, 1) },
    HostSpec { name: "h2", vtep: Ipv4Addr::new(198, 18, 0, 2) },
];
/// The client is the first container, the server the second: always across the two hosts.
pub const CONTAINERS: [ContainerSpec; 2] = [
    ContainerSpec { name: "a", host: 0, ip: Ipv4Addr::new(10, 10, 0, 2) },
    ContainerSpec { name: "b", host: 1, ip: Ipv4Addr::new(10, 10, 0, 3) },
];
pub const NETWORK_ID: &str = "be4c000000000000000000000000000000000000000000000000000000000001";
/// The network's name in etcd (the store gives it an id of its own).
pub const NETWORK_NAME: &str = "bench";
pub const VNI: u32 = 4097;
pub const SUBNET: &str = "10.10.0.0/24";
pub const PREFIX_LEN: u8 = 24;
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
pub const UNDERLAY_MTU: u32 = underlay::MTU;
/// Docker's overlay MTU: 1500 less the 50 bytes of VXLAN over IPv4.
pub const VXLAN_MTU: u32 = 1450;

/// Ports of the traffic programs inside the server container.
pub const ECHO_PORT: u16 = 7000;
pub const SINK_PORT: u16 = 7001;
pub const IPERF_PORT: u16 = 5201;

/// Options for building.
pub struct BuildOptions<'a> {
    pub agent_binary: &'a Path,
    pub xdp_mode: &'a str,
    pub self_exe: &'a Path,
    /// Where the eBPF topology's agents read the desired state.
    pub ebpf_source: EbpfSource,
    /// The namespaces' tag instead of the kind's, for a second topology of the same kind
    /// beside the first (the monitor stage's baseline).
    pub tag: Option<&'static str>,
}

/// The eBPF agents' desired-state source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EbpfSource {
    /// A state file the harness writes, which the agents poll.
    File,
    /// An etcd the harness runs on the underlay bridge, which the agents watch.
    Etcd,
}

impl EbpfSource {
    /// The figures' label.
    pub fn key(self) -> &'static str {
        match self {
            EbpfSource::File => "file",
            EbpfSource::Etcd => "etcd",
        }
    }
}

pub struct Topology {
    pub kind: Kind,
    /// The namespaces' tag: `<run>-<tag>-h1`, `<run>-<tag>-h1-a`, ...
    pub tag: &'static str,
    /// Host namespaces, in HOSTS order.
    pub hosts: Vec<String>,
    /// Container namespaces, in CONTAINERS order.
    pub containers: Vec<String>,
    /// The eBPF topology's agents, in HOSTS order.
    pub agents: Vec<Agent>,
    /// Where the eBPF topology's desired state is published (the state file, or etcd and a
    /// client of it). Dropped after the agents have stopped.
    pub publisher: Option<Box<dyn Publisher>>,
    servers: Vec<Proc>,
}

impl Topology {
    pub fn client_ns(&self) -> &str {
        &self.containers[0]
    }

    pub fn server_ns(&self) -> &str {
        &self.containers[1]
    }

    /// The long-running iperf3 server (its CPU time counts in the CPU figures).
    pub fn iperf_server_pid(&self) -> u32 {
        self.servers.iter().find(|p| p.name == "iperf3 server").map_or(0, Proc::pid)
    }

    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((CONTAINERS[1].ip, port))
    }

    /// The namespace-name tag of the topology (`<run>-<tag>-h1`, ...).
    fn tag(kind: Kind, opts: &BuildOptions<'_>) -> &'static str {
        if let Some(tag) = opts.tag {
            return tag;
        }
        if kind == Kind::Ebpf && opts.ebpf_source == EbpfSource::Etcd { "k" } else { kind.tag() }
    }

    /// The namespace of container `name` on host `host` (the eBPF agents make theirs with the
    /// same name: `--netns-prefix <run>-<tag>-<host>-`).
    pub fn container_ns(run: &Run, tag: &str, host: &str, name: &str) -> String {
        run.ns(&format!("{tag}-{host}-{name}"))
    }

    pub fn build(run: &Run, kind: Kind, opts: &BuildOptions<'_>) -> anyhow::Result<Self> {
        let tag = Self::tag(kind, opts);
        let hosts: Vec<String> = HOSTS.iter().map(|h| run.ns(&format!("{tag}-{}", h.name))).collect();
        let containers: Vec<String> =
            CONTAINERS.iter().map(|c| Self::container_ns(run, tag, HOSTS[c.host].name, c.name)).collect();
        let mut topo =
            Self { kind, tag, hosts, containers, agents: Vec::new(), publisher: None, servers: Vec::new() };
        let underlay_ns = run.ns(&format!("{tag}-u"));
        let members: Vec<Member<'_>> =
            HOSTS.iter().zip(&topo.hosts).map(|(spec, ns)| Member { ns, addr: spec.vtep }).collect();
        underlay::build(&underlay_ns, &members, underlay::Options::default())?;
        match kind {
            Kind::NoOverlay => topo.build_routed()?,
            Kind::KernelVxlan => topo.build_kernel_vxlan()?,
            Kind::Ebpf if opts.ebpf_source == EbpfSource::Etcd => {
                topo.build_ebpf_on_etcd(run, &underlay_ns, opts)?;
            }
            Kind::Ebpf => topo.build_ebpf(run, opts)?,
        }
        topo.start_servers(opts.self_exe)?;
        topo.wait_reachable(opts.self_exe, Duration::from_secs(20))
            .with_context(|| format!("{}: the containers cannot reach each other", kind.key()))?;
        Ok(topo)
    }

    /// Container namespace with its veth (container side `eth0`, Docker's MAC for its address,
    /// default route via the gateway), as the agent makes them. Returns the host-side name.
    fn plain_container(&self, i: usize, mtu: u32) -> anyhow::Result<String> {
        let c = &CONTAINERS[i];
        let (host, ns) = (&self.hosts[c.host], &self.containers[i]);
        let veth = format!("ve-{}", c.name);
        ip(&["netns", "add", ns])?;
        ip_in(host, &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        let mac = MacAddr::from_ip(c.ip).to_string();
        let mtu = mtu.to_string();
        ip_in(ns, &["link", "set", "lo", "up"])?;
        ip_in(ns, &["link", "set", "eth0", "address", &mac, "mtu", &mtu, "up"])?;
        ip_in(ns, &["addr", "add", &format!("{}/{PREFIX_LEN}", c.ip), "dev", "eth0"])?;
        ip_in(ns, &["route", "add", "default", "via", &GATEWAY.to_string()])?;
        ip_in(host, &["link", "set", &veth, "mtu", &mtu])?;
        Ok(veth)
    }

    fn build_routed(&mut self) -> anyhow::Result<()> {
        for (i, c) in CONTAINERS.iter().enumerate() {
            let veth = self.plain_container(i, UNDERLAY_MTU)?;
            let host = &self.hosts[c.host];
            // The host answers ARP for everything it routes elsewhere (the remote container)
            // and owns the gateway address; no proxy delay, so the first ARP is not held back.
            sysctl_in(
                host,
                &[
                    "net.ipv4.ip_forward=1",
                    &format!("net.ipv4.conf.{veth}.proxy_arp=1"),
                    &format!("net.ipv4.neigh.{veth}.proxy_delay=0"),
                ],
            )?;
            ip_in(host, &["addr", "add", &format!("{GATEWAY}/32"), "dev", &veth])?;
            ip_in(host, &["link", "set", &veth, "up"])?;
            ip_in(host, &["route", "add", &format!("{}/32", c.ip), "dev", &veth])?;
            for other in CONTAINERS.iter().filter(|o| o.host != c.host) {
                let via = HOSTS[other.host].vtep.to_string();
                ip_in(host, &["route", "add", &format!("{}/32", other.ip), "via", &via, "dev", "eth0"])?;
            }
        }
        Ok(())
    }

    fn build_kernel_vxlan(&mut self) -> anyhow::Result<()> {
        let mtu = VXLAN_MTU.to_string();
        for (h, spec) in HOSTS.iter().enumerate() {
            let host = &self.hosts[h];
            ip_in(host, &["link", "add", "br0", "type", "bridge"])?;
            // Docker's flags (libnetwork drivers/overlay createVxlan): learning, proxy (the
            // device answers ARP from its neighbor table), l2miss/l3miss (misses go to the
            // daemon; with every entry installed up front there are none).
            ip_in(
                host,
                &[
                    "link",
                    "add",
                    "vxlan0",
                    "type",
                    "vxlan",
                    "id",
                    &VNI.to_string(),
                    "dstport",
                    "4789",
                    "local",
                    &spec.vtep.to_string(),
                    "learning",
                    "proxy",
                    "l2miss",
                    "l3miss",
                ],
            )?;
            ip_in(host, &["link", "set", "vxlan0", "mtu", &mtu, "master", "br0", "up"])?;
            ip_in(host, &["addr", "add", &format!("{GATEWAY}/{PREFIX_LEN}"), "dev", "br0"])?;
            ip_in(host, &["link", "set", "br0", "mtu", &mtu, "up"])?;
        }
        for (i, c) in CONTAINERS.iter().enumerate() {
            let veth = self.plain_container(i, VXLAN_MTU)?;
            ip_in(&self.hosts[c.host], &["link", "set", &veth, "master", "br0", "up"])?;
        }
        // What Docker's peerAdd installs for every remote endpoint.
        for (h, _) in HOSTS.iter().enumerate() {
            let host = &self.hosts[h];
            for other in CONTAINERS.iter().filter(|o| o.host != h) {
                let mac = MacAddr::from_ip(other.ip).to_string();
                let vtep = HOSTS[other.host].vtep.to_string();
                ip_in(
                    host,
                    &[
                        "neigh",
                        "add",
                        &other.ip.to_string(),
                        "lladdr",
                        &mac,
                        "dev",
                        "vxlan0",
                        "nud",
                        "permanent",
                    ],
                )?;
                sh_result(Command::new("bridge").args([
                    "-n",
                    host,
                    "fdb",
                    "append",
                    &mac,
                    "dev",
                    "vxlan0",
                    "dst",
                    &vtep,
                    "self",
                    "permanent",
                ]))?;
            }
        }
        Ok(())
    }

    fn build_ebpf(&mut self, run: &Run, opts: &BuildOptions<'_>) -> anyhow::Result<()> {
        let mut st = State::default();
        for h in &HOSTS {
            st.hosts.insert(h.name.to_owned(), state::host(h.name, h.vtep));
        }
        st.networks.insert(NETWORK_ID.to_owned(), state::network(NETWORK_ID, "bench", VNI, SUBNET, GATEWAY)?);
        for (i, c) in CONTAINERS.iter().enumerate() {
            let host = HOSTS[c.host].name;
            let id = state::object_id(i as u64);
            state::add_container(
                &mut st,
                state::container(c.name, host, None),
                state::endpoint(&id, NETWORK_ID, c.name, host, c.ip),
            );
        }
        let state_file = run.path(&format!("{}-state.json", self.tag));
        self.publisher = Some(Box::new(FilePublisher::new(state_file.clone(), st, NETWORK_ID)?));
        self.start_agents(run, &Source::File(&state_file), opts)
    }

    /// The eBPF topology on etcd: etcd on the underlay bridge, agents following it, and the
    /// network and both containers created through the store, from h2 (the agents then make
    /// the containers' namespaces and veths).
    fn build_ebpf_on_etcd(
        &mut self,
        run: &Run,
        underlay: &str,
        opts: &BuildOptions<'_>,
    ) -> anyhow::Result<()> {
        let etcd = start_etcd(run, underlay)?;
        let url = etcd.url();
        let client = StoreClient::spawn(&self.hosts[1], opts.self_exe, &url)?;
        let mut publisher = EtcdPublisher { client, network: NETWORK_NAME.to_owned(), etcd };
        self.start_agents(run, &Source::Etcd(&url), opts)?;
        let names: Vec<&str> = HOSTS.iter().map(|h| h.name).collect();
        publisher.client.wait_registered(&names, Duration::from_secs(20))?;
        publisher.client.write(&Request::Network {
            name: NETWORK_NAME.to_owned(),
            subnet: SUBNET.to_owned(),
            gateway: GATEWAY,
            vni: VNI,
        })?;
        for c in &CONTAINERS {
            publisher.client.write(&Request::Container {
                name: c.name.to_owned(),
                host: HOSTS[c.host].name.to_owned(),
                netns: None,
                network: NETWORK_NAME.to_owned(),
                ip: c.ip,
            })?;
        }
        self.publisher = Some(Box::new(publisher));
        // The servers start in the containers' namespaces: wait for the agents to make them.
        let deadline = Instant::now() + Duration::from_secs(20);
        for ns in &self.containers {
            while !Path::new("/run/netns").join(ns).exists() {
                if Instant::now() >= deadline {
                    bail!("the agents did not make namespace {ns} within 20 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// One agent per host, following `source`; waits for each one's first full reconcile.
    fn start_agents(
        &mut self,
        run: &Run,
        source: &Source<'_>,
        opts: &BuildOptions<'_>,
    ) -> anyhow::Result<()> {
        let tag = self.tag;
        for (h, spec) in HOSTS.iter().enumerate() {
            let pin_dir = run.pin_root().join(format!("{tag}-{}", spec.name));
            let state_dir = run.path(&format!("{tag}-{}-state", spec.name));
            // The agent makes /run/netns/<prefix><container>: the names `container_ns` gives.
            let netns_prefix = run.ns(&format!("{tag}-{}-", spec.name));
            let agent = Agent::spawn(AgentArgs {
                binary: opts.agent_binary,
                agent: AgentCommand {
                    host: spec.name,
                    uplink: "eth0",
                    vtep: spec.vtep,
                    netns: &self.hosts[h],
                    pin_dir: &pin_dir,
                    state_dir: &state_dir,
                    netns_prefix: &netns_prefix,
                    source,
                },
                xdp_mode: opts.xdp_mode,
                log: run.path(&format!("agent-{tag}-{}.log", spec.name)),
            })?;
            self.agents.push(agent);
        }
        for agent in &mut self.agents {
            agent.wait_for("full reconcile done", Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// The echo server and iperf3 server in the server container, for the whole run.
    fn start_servers(&mut self, self_exe: &Path) -> anyhow::Result<()> {
        let mut cmd = worker_in(self.server_ns(), self_exe);
        cmd.args(["serve", "--port", &ECHO_PORT.to_string()]).stdout(Stdio::piped());
        let mut serve = Proc::try_spawn("echo server", &mut cmd)?;
        let out = serve.take_stdout().context("echo server stdout")?;
        let (line, _) = read_line_timeout(out, Duration::from_secs(5)).context("echo server")?;
        if line != "ready" {
            bail!("echo server said {line:?}");
        }
        self.servers.push(serve);
        let mut cmd = in_ns(self.server_ns(), &["iperf3"]);
        cmd.args(["-s", "-p", &IPERF_PORT.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        self.servers.push(Proc::try_spawn("iperf3 server", &mut cmd)?);
        Ok(())
    }

    /// Waits until a UDP request/response across the hosts succeeds.
    fn wait_reachable(&self, self_exe: &Path, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let out = sh_result(worker_in(self.client_ns(), self_exe).args([
                "rr",
                "--proto",
                "udp",
                "--to",
                &self.server_addr(ECHO_PORT).to_string(),
                "--count",
                "3",
                "--warmup",
                "0",
                "--timeout-ms",
                "200",
            ]));
            match out.and_then(|o| Ok(serde_json::from_str::<crate::worker::RrResult>(o.trim())?)) {
                Ok(r) if r.lost == 0 => return Ok(()),
                Ok(r) => last = format!("{} of 3 requests lost", r.lost),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("no answer within {timeout:?}: {last}")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.kill();
        }
        for a in &mut self.agents {
            a.stop();
        }
        // Then the publisher (etcd, when there is one). The namespaces and pins go with the Run.
    }
}
