//! overlay-agent: the privileged per-host service that makes the overlay real on its host.
//!
//! `overlay-agent run` is the long-running service (one per host, DaemonSet style);
//! `overlay-agent stats` prints a host's datapath counters from its pinned maps, agent or not.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use overlay_agent::{
    agent, cni,
    datapath::{PinDir, XdpPreference, counters, maps, pins},
    docker,
    model::Host,
    netlink::{Netlink, netns},
    sandbox,
    source::{Lifetimes, etcd::AgentEtcd, file::FileSource},
    store::EtcdArgs,
};

#[derive(Parser)]
#[command(
    name = "overlay-agent",
    version,
    about = "The overlay's per-host agent: keeps this host's eBPF VXLAN datapath in step with etcd"
)]
struct Cli {
    /// How to write logs: text for people, json (one object a line) for log collectors.
    #[arg(long, env = "OVERLAY_LOG_FORMAT", default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: the long-running service, one per host.
    Run(Box<Run>),
    /// Print a host's datapath counters (packets and bytes per direction, drops per reason).
    Stats {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stream a host's dropped packets live (reason, interface, VNI, 5-tuple), and with --flows
    /// the first packet of every flow it forwards. The programs write events only while a
    /// monitor listens; one monitor per host at a time.
    Monitor(Box<MonitorArgs>),
    /// Remove a host's pinned datapath: its containers stop forwarding (for decommissioning a
    /// host whose agent is stopped).
    Reset {
        #[command(flatten)]
        target: Target,
    },
    /// (internal) Hold a sandbox namespace open: the long-running process of a container.
    #[command(hide = true)]
    Hold { netns: PathBuf },
}

#[derive(clap::Args)]
struct MonitorArgs {
    #[command(flatten)]
    target: Target,
    /// Also show the first packet of each flow the host forwards (tx_local, tx_encap, to_host,
    /// rx_deliver), not only drops.
    #[arg(long)]
    flows: bool,
    /// Only drops for this reason (the names `stats` prints; repeat for more).
    #[arg(long = "reason")]
    reasons: Vec<String>,
    /// Only events of this network (a name, looked up in the store, or a VNI; repeat for more).
    #[arg(long = "network")]
    networks: Vec<String>,
    /// Only events to or from this container, or sent from its interface (looked up in the
    /// store when the monitor starts; repeat for more).
    #[arg(long = "container")]
    containers: Vec<String>,
    /// One JSON object a line instead of text.
    #[arg(long)]
    json: bool,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long)]
    duration: Option<humantime::Duration>,
    /// Names from a JSON state file instead of etcd (as `run --state-file`).
    #[arg(long, env = "OVERLAY_STATE_FILE")]
    state_file: Option<PathBuf>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The host's network namespace (a path, or a name under /run/netns), where the interface
    /// names are; as `run --netns`.
    #[arg(long, env = "OVERLAY_NETNS")]
    netns: Option<String>,
}

/// Which host's pins to read.
#[derive(clap::Args)]
struct Target {
    /// The host's name, as given to `overlay-agent run --host` (its pins are under
    /// /sys/fs/bpf/overlay/<host>).
    #[arg(long, env = "OVERLAY_HOST")]
    host: Option<String>,
    /// The host's pin directory, where `run --pin-dir` put it (instead of --host).
    #[arg(long, env = "OVERLAY_PIN_DIR")]
    pin_dir: Option<PathBuf>,
}

impl Target {
    fn pins(&self) -> anyhow::Result<PinDir> {
        match (&self.pin_dir, &self.host) {
            (Some(dir), _) => Ok(PinDir::new(dir)),
            (None, Some(host)) => Ok(PinDir::new(pins::default_dir(host))),
            (None, None) => anyhow::bail!("say which host: --host NAME or --pin-dir DIR"),
        }
    }
}

#[derive(clap::Args)]
struct Run {
    /// This host's name, unique among hosts.
    #[arg(long, env = "OVERLAY_HOST")]
    host: String,
    /// The underlay interface VXLAN leaves and arrives on (e.g. eth0).
    #[arg(long, env = "OVERLAY_UPLINK")]
    uplink: String,
    /// This host's VTEP: the uplink's IPv4 address on the underlay, which other hosts send to.
    #[arg(long, env = "OVERLAY_VTEP")]
    vtep: Ipv4Addr,
    /// Where to pin maps and attachments [default: /sys/fs/bpf/overlay/<host>].
    #[arg(long, env = "OVERLAY_PIN_DIR")]
    pin_dir: Option<PathBuf>,
    /// Where the agent records the interfaces and namespaces it made, so that a restarted agent
    /// adopts them [default: /run/overlay/<host>].
    #[arg(long, env = "OVERLAY_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Prefix of the sandbox namespaces the agent creates (/run/netns/<prefix><container>).
    #[arg(long, env = "OVERLAY_NETNS_PREFIX", default_value = "ovl-")]
    netns_prefix: String,
    /// Whether to attach XDP to the uplink, and in which mode.
    #[arg(long, env = "OVERLAY_XDP_MODE", value_enum, default_value = "auto")]
    xdp_mode: XdpPreference,
    /// Log every dropped packet with its reason (a log line per drop: for debugging, not for
    /// busy hosts). Drop counters are kept either way: `overlay-agent stats`.
    #[arg(long, env = "OVERLAY_DEBUG_DROPS")]
    debug_drops: bool,
    /// Desired state from a JSON file (networks, endpoints, containers, hosts) instead of etcd.
    #[arg(long, env = "OVERLAY_STATE_FILE")]
    state_file: Option<PathBuf>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Seconds this host stays alive in the store without the agent renewing its liveness lease:
    /// how long other hosts keep sending to a host whose agent went quiet (crashed, cut off from
    /// etcd, restarting). Nothing is deleted when it runs out: the host's endpoints leave the
    /// other hosts' maps and come back when the agent registers again.
    #[arg(long, env = "OVERLAY_LEASE_TTL", default_value_t = 30)]
    lease_ttl: u64,
    /// Seconds a host's containers and endpoints stay in the store after its agent was last
    /// heard from; after that they are garbage-collected (their addresses go back to the pools).
    /// `overlay host rm` removes a dead host's records at once.
    #[arg(long, env = "OVERLAY_GC_GRACE", default_value_t = 86_400)]
    gc_grace: u64,
    /// The largest share (0 to 1) of this host's containers that one re-read of the store (the
    /// agent's start, a store found replaced or rolled back, a compaction) may remove; a
    /// larger removal is held, logged and shown in /readyz until an operator sends
    /// POST /brake/release to the health address. 1 turns the brake off.
    #[arg(long, env = "OVERLAY_BRAKE_SHARE", default_value_t = 0.5)]
    brake_share: f64,
    /// Where to serve GET /healthz, /readyz and /metrics: localhost unless told otherwise, so
    /// that nothing is exposed by default; an address of the host (or 0.0.0.0) for probes and
    /// a Prometheus server elsewhere; `off` for no listener. With --netns, the address is
    /// inside that namespace.
    #[arg(long, env = "OVERLAY_HEALTH_ADDR", default_value = "127.0.0.1:9700", value_parser = parse_listen)]
    health_addr: Listen,
    /// Seconds between full reconciles, which repair what changed behind the agent's back and
    /// nothing announced (a map entry removed by hand) even when etcd says nothing changed. A
    /// veth deleted by hand is made again at once (the kernel says so), a pin removed by hand
    /// within a second.
    #[arg(long, env = "OVERLAY_RESYNC_SECS", default_value_t = 60)]
    resync_secs: u64,
    /// Run inside this network namespace (a path, or a name under /run/netns), as if it were the
    /// host: how the tests and the demo simulate several hosts on one machine.
    #[arg(long, env = "OVERLAY_NETNS")]
    netns: Option<String>,
    /// Serve Docker's remote network driver API on a unix socket at this path, for the Docker
    /// engine on this host: in its plugin directory, named after the driver
    /// (/run/docker/plugins/overlay-ebpf.sock is `docker network create -d overlay-ebpf`).
    /// Needs etcd. Off by default.
    #[arg(long, env = "OVERLAY_DOCKER_PLUGIN")]
    docker_plugin: Option<PathBuf>,
    /// An upstream resolver for names outside the overlay (IP, or IP:PORT; repeat for more,
    /// asked in order). Default: the nameservers of --resolv-conf.
    #[arg(long = "dns-upstream", env = "OVERLAY_DNS_UPSTREAM", value_delimiter = ',', value_parser = parse_upstream)]
    dns_upstreams: Vec<std::net::SocketAddr>,
    /// The resolv.conf whose nameservers are the upstream resolvers when no --dns-upstream is
    /// given (read again when it changes).
    #[arg(long, env = "OVERLAY_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Answer the CNI plugin (`overlay-cni`) on a unix socket at this path; the plugin finds it
    /// through its netconf's `agentSocket` (default /run/overlay-ebpf/cni.sock). Needs etcd.
    /// Off by default.
    #[arg(long, env = "OVERLAY_CNI_SOCKET")]
    cni_socket: Option<PathBuf>,
}

/// The health listener's address, or none (`off`).
#[derive(Clone, Copy, Debug)]
struct Listen(Option<std::net::SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse().map(|a| Listen(Some(a))).map_err(|_| format!("{s:?} is not IP:PORT or `off`"))
}

/// `192.0.2.53` or `192.0.2.53:5353` (or `[2001:db8::53]:53`).
fn parse_upstream(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse::<std::net::SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| std::net::SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{s:?} is not an IP address or IP:PORT"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(run) => {
            let run = *run;
            // Before any thread exists: every thread the runtime starts inherits the namespace.
            if let Some(ns) = &run.netns {
                let path = if ns.contains('/') { PathBuf::from(ns) } else { netns::named(ns) };
                let file = netns::open(&path)?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering {}", path.display()))?;
            }
            let cfg = agent::Config {
                pins: PinDir::new(run.pin_dir.clone().unwrap_or_else(|| pins::default_dir(&run.host))),
                state_dir: run
                    .state_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/run/overlay").join(&run.host)),
                host: run.host,
                uplink: run.uplink,
                vtep: run.vtep,
                netns_prefix: run.netns_prefix,
                xdp: run.xdp_mode,
                debug_drops: run.debug_drops,
                resync: Duration::from_secs(run.resync_secs.max(1)),
                health: run.health_addr.0,
                brake_share: run.brake_share.clamp(0.0, 1.0),
                dns_upstreams: run.dns_upstreams.clone(),
                resolv_conf: run.resolv_conf.clone(),
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                if let Some(path) = run.state_file {
                    anyhow::ensure!(
                        run.docker_plugin.is_none(),
                        "--docker-plugin needs etcd: Docker's networks and addresses live there, not in --state-file"
                    );
                    anyhow::ensure!(
                        run.cni_socket.is_none(),
                        "--cni-socket needs etcd: the runtimes' containers and addresses live there, not in --state-file"
                    );
                    agent::run(cfg, FileSource::new(path)).await
                } else {
                    // The host record says what the other hosts need: the VTEP, and the
                    // uplink MTU for inspection.
                    let uplink = agent::uplink(&Netlink::current()?, &cfg.uplink).await?;
                    let host = Host {
                        uplink_mtu: Some(uplink.mtu),
                        agent: Some(overlay_agent::identity::load(&cfg.state_dir)?),
                        ..Host::new(cfg.host.clone(), cfg.vtep)
                    };
                    if let Some(socket) = run.docker_plugin.clone() {
                        let (config, state_dir) = (run.etcd.config(), cfg.state_dir.clone());
                        let me = cfg.host.clone();
                        // Beside the agent's loop, in the same process: the plugin writes the
                        // store, and the loop makes what it wrote real, as for the CLI.
                        tokio::spawn(async move {
                            if let Err(e) = docker::serve(socket, config, me, state_dir).await {
                                tracing::error!(error = format!("{e:#}"), "the Docker plugin stopped");
                            }
                        });
                    }
                    if let Some(socket) = run.cni_socket.clone() {
                        let (config, me) = (run.etcd.config(), cfg.host.clone());
                        // In the agent's process, as the Docker plugin: ADD writes the store and
                        // waits for the loop to make the interface.
                        tokio::spawn(async move {
                            if let Err(e) = cni::serve(socket, config, me).await {
                                tracing::error!(error = format!("{e:#}"), "the CNI server stopped");
                            }
                        });
                    }
                    let source = AgentEtcd {
                        config: run.etcd.config(),
                        host,
                        life: Lifetimes {
                            ttl: Duration::from_secs(run.lease_ttl.max(1)),
                            grace: Duration::from_secs(run.gc_grace.max(run.lease_ttl).max(1)),
                        },
                        state_dir: cfg.state_dir.clone(),
                        health: None,
                    };
                    agent::run(cfg, source).await
                }
            })
        }
        Command::Stats { target, json } => {
            let pins = target.pins()?;
            let stats = maps::open_stats(&pins).with_context(|| {
                format!("opening the counters pinned under {} (is the agent running with this --pin-dir or --host?)", pins.root().display())
            })?;
            let totals = maps::read_stats(&stats)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&counters::json(&totals))?);
            } else {
                print!("{}", counters::table(&totals));
            }
            Ok(())
        }
        Command::Monitor(args) => monitor(&args),
        Command::Reset { target } => {
            let pins = target.pins()?;
            pins.remove_all().with_context(|| format!("removing {}", pins.root().display()))?;
            // The resolver's addresses, rules and table: the containers that used them stop
            // forwarding with the pins.
            // The egress routes and the nftables table too: containers lose their way out.
            tokio::runtime::Runtime::new()?.block_on(async {
                let nl = Netlink::current()?;
                overlay_agent::netlink::resolver_path::remove_all(&nl)
                    .await
                    .context("removing the resolver's path")?;
                overlay_agent::egress::remove_all(&nl).await
            })
        }
        Command::Hold { netns } => sandbox::hold(&netns),
    }
}

fn monitor(args: &MonitorArgs) -> anyhow::Result<()> {
    use overlay_agent::monitor::{self, Filter, Output};
    use overlay_common::monitor::{MONITOR_DROPS, MONITOR_FLOWS};
    let pins = args.target.pins()?;
    // The host's namespace first: its interfaces' names are there, and its way to etcd.
    if let Some(ns) = &args.netns {
        let path = if ns.contains('/') { PathBuf::from(ns) } else { netns::named(ns) };
        let file = netns::open(&path)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {}", path.display()))?;
    }
    // Names need the desired state; read once, before the monitor starts listening.
    let state = if args.networks.iter().any(|n| n.parse::<u32>().is_err()) || !args.containers.is_empty() {
        Some(if let Some(path) = &args.state_file {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?
        } else {
            tokio::runtime::Runtime::new()?.block_on(async {
                let store = overlay_agent::store::Store::connect(&args.etcd.config()).await?;
                anyhow::Ok(store.load().await?.0)
            })?
        })
    } else {
        None
    };
    let ifaces = if args.containers.is_empty() { Default::default() } else { maps::read_ifaces(&pins)? };
    let filter = Filter::build(&args.reasons, &args.networks, &args.containers, state.as_ref(), &ifaces)?;
    // With --reason only drops are shown: flows would be written for nothing.
    let flags = MONITOR_DROPS | if args.flows && args.reasons.is_empty() { MONITOR_FLOWS } else { 0 };
    let out = Output { json: args.json, count: args.count, duration: args.duration.map(Into::into) };
    monitor::run(&pins, flags, &filter, &out)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OVERLAY_LOG")
        // netlink-packet-route warns about every attribute newer kernels add; not our concern.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error"));
    // Colour only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
