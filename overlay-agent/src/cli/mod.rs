//! `overlay`: the command line, shaped like `docker network`. It writes the desired state to the
//! store; the agent of the host concerned makes it real; the CLI waits (up to --timeout) until
//! that host reports it done, so a command that returns has taken effect.

pub mod inspect;
mod output;
mod service;

use std::{
    collections::BTreeMap,
    ffi::CString,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use tokio::time::Instant;

use self::output::say;
use crate::{
    sandbox::{self, Forbidden},
    store::{
        ContainerSpec, EtcdArgs, NetworkSpec, Store, StoreError,
        ports::{PortRequest, parse_publish},
        service::{Names, parse_service_ref},
    },
};

/// One `-p` as given: the ports it asks for (a container range asks for several).
#[derive(Clone, Debug)]
pub struct Publish(Vec<PortRequest>);

impl std::str::FromStr for Publish {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_publish(s).map(Self)
    }
}

#[derive(Parser)]
#[command(name = "overlay", version, about = "Multi-host overlay networks and their containers")]
pub struct Cli {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// How long to wait for hosts to make a change real (e.g. 30s, 2m; 0 = do not wait).
    #[arg(
        long,
        env = "OVERLAY_TIMEOUT",
        default_value = "30s",
        value_parser = parse_duration,
        global = true,
        help_heading = "Waiting"
    )]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Manage containers (network sandboxes on hosts).
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Hosts whose agents have registered with the store.
    #[command(subcommand)]
    Host(HostCommand),
    /// Services: names of a network that resolve to the containers attached to them.
    #[command(subcommand)]
    Service(service::ServiceCommand),
}

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Create a network.
    Create(NetworkCreate),
    /// List networks.
    #[command(visible_alias = "list")]
    Ls {
        /// Only print network ids.
        #[arg(short, long)]
        quiet: bool,
        /// Do not truncate ids.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Display detailed information on one or more networks.
    Inspect {
        /// Network names or ids (or unique id prefixes).
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove one or more networks.
    #[command(visible_alias = "remove")]
    Rm {
        /// Network names or ids (or unique id prefixes); a network with containers on it is
        /// refused.
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Connect a container to a network.
    Connect {
        /// IPv4 address to give it, inside the network's subnet [default: the lowest free one].
        #[arg(long)]
        ip: Option<String>,
        /// Another name the container answers to on this network (repeatable).
        #[arg(long)]
        alias: Vec<String>,
        /// The network's name or id.
        network: String,
        /// The container's name.
        container: String,
    },
    /// Disconnect a container from a network.
    Disconnect {
        /// The network's name or id.
        network: String,
        /// The container's name.
        container: String,
    },
}

#[derive(Args)]
pub struct NetworkCreate {
    /// Network driver; "overlay" is the only one.
    #[arg(short, long, default_value = "overlay")]
    driver: String,
    /// Subnet in CIDR format [default: the first free /24 of 10.0.0.0/8].
    #[arg(long)]
    subnet: Option<String>,
    /// Gateway of the subnet [default: its first address].
    #[arg(long)]
    gateway: Option<String>,
    /// Allocate container addresses from this sub-range.
    #[arg(long)]
    ip_range: Option<String>,
    /// Auxiliary address the network must never hand out (name=ip; repeatable).
    #[arg(long = "aux-address")]
    aux_address: Vec<String>,
    /// Driver option: mtu=N, vni=N, encrypted (repeatable).
    #[arg(short = 'o', long = "opt")]
    opt: Vec<String>,
    /// Label key=value (repeatable).
    #[arg(long)]
    label: Vec<String>,
    /// Restrict external access: its containers have no way out through their hosts and
    /// publish no ports, as Docker's internal networks.
    #[arg(long)]
    internal: bool,
    /// The network's name, unique among networks.
    name: String,
}

#[derive(Subcommand)]
pub enum ContainerCommand {
    /// Create a container on a host (optionally connected to a network).
    Create {
        /// The host to run it on (a registered host).
        #[arg(long)]
        host: String,
        /// Connect it to this network.
        #[arg(long)]
        network: Option<String>,
        /// IPv4 address to give it on --network [default: the lowest free one].
        #[arg(long)]
        ip: Option<String>,
        /// Another name it answers to on --network (repeatable).
        #[arg(long)]
        alias: Vec<String>,
        /// Attach it to service NAME on NETWORK, publishing the service if it is not yet
        /// (implies --network NETWORK).
        #[arg(long, value_name = "NAME.NETWORK")]
        publish_service: Option<String>,
        /// Publish a port on the host's addresses, as Docker's -p:
        /// [HOST_IP:][HOST_PORT[-END]:]CONTAINER_PORT[-END][/tcp|/udp]. No host port takes a free
        /// one of 49153-60999, a host range its first free port (repeatable; needs --network, one
        /// with a way out; at most 100 ports per container).
        #[arg(short = 'p', long = "publish", value_name = "[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTO]")]
        publish: Vec<Publish>,
        /// Use this existing network namespace (a path on that host, e.g. /run/netns/x) instead
        /// of having the agent make one. It must be a network namespace of its own: the host's
        /// (or another host's) namespace, or the machine's initial one, is refused.
        #[arg(long)]
        netns: Option<PathBuf>,
        /// The container's name, unique among containers.
        name: String,
    },
    /// Remove one or more containers (and disconnect them from every network).
    #[command(visible_alias = "remove")]
    Rm {
        /// Container names.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// List containers.
    #[command(visible_alias = "list")]
    Ls,
    /// Display detailed information on one or more containers (Docker's shape of
    /// NetworkSettings).
    Inspect {
        /// Container names.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Run a command inside a container's network namespace (on the container's host).
    Exec {
        /// The container's name.
        container: String,
        /// The command and its arguments (after `--` if they start with a dash).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum HostCommand {
    /// List registered hosts: name, VTEP, uplink MTU, whether each is alive (its agent renews
    /// its liveness lease) and, for a host that is not, when its records are garbage-collected.
    #[command(visible_alias = "list")]
    Ls,
    /// Decommission a host that is gone for good: remove its registration, its containers and
    /// their endpoints and addresses. Refused while the host is alive.
    #[command(visible_alias = "remove")]
    Rm {
        /// The host's name.
        name: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| e.to_string());
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30s, 500ms, 2m)"))
}

fn parse_ip(what: &'static str, s: &str) -> Result<Ipv4Addr, StoreError> {
    s.trim().parse().map_err(|_| StoreError::Invalid {
        what,
        value: s.to_owned(),
        reason: "expected an IPv4 address such as 10.0.9.2".into(),
    })
}

/// The entry point of the `overlay` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::new(e).context("starting the runtime")),
    };
    let outcome = runtime.block_on(run(cli));
    // Entering a namespace and exec'ing happen with no runtime (and so no other thread) left.
    drop(runtime);
    match outcome {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::FAILURE,
        Ok(Outcome::Exec { netns, command }) => fail(&exec_in(&netns, &command)),
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("Error: {e:#}");
    ExitCode::FAILURE
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OVERLAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// What is left to do once the store's part is done.
pub enum Outcome {
    Done,
    /// Some of several targets failed (each already reported).
    Failed,
    Exec {
        netns: PathBuf,
        command: Vec<String>,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let store = Store::connect(&cli.etcd.config()).await?;
    let ctx = Ctx { store, timeout: cli.timeout };
    match cli.command {
        Command::Network(cmd) => ctx.network(cmd).await,
        Command::Container(cmd) => ctx.container(cmd).await,
        Command::Host(HostCommand::Ls) => ctx.host_ls().await,
        Command::Service(cmd) => service::run(&ctx.store, cmd).await,
        Command::Host(HostCommand::Rm { name }) => {
            let containers = ctx.store.remove_host(&name).await?;
            say(format_args!("{name} (and its {containers} container(s))"))?;
            Ok(Outcome::Done)
        }
    }
}

struct Ctx {
    store: Store,
    timeout: Duration,
}

impl Ctx {
    fn deadline(&self) -> Option<Instant> {
        (!self.timeout.is_zero()).then(|| Instant::now() + self.timeout)
    }

    async fn network(&self, cmd: NetworkCommand) -> anyhow::Result<Outcome> {
        let store = &self.store;
        match cmd {
            NetworkCommand::Create(c) => {
                let spec = NetworkSpec {
                    name: c.name,
                    driver: Some(c.driver),
                    subnet: c.subnet,
                    gateway: c.gateway,
                    ip_range: c.ip_range,
                    aux_addresses: c.aux_address,
                    options: c.opt,
                    labels: c.label,
                    internal: c.internal,
                };
                let network = store.create_network(&spec).await?;
                say(&network.id)?;
            }
            NetworkCommand::Ls { quiet, no_trunc } => {
                let networks = store.networks().await?;
                let id = |id: &str| if no_trunc { id.to_owned() } else { id[..12.min(id.len())].to_owned() };
                if quiet {
                    for n in &networks {
                        say(id(&n.id))?;
                    }
                } else {
                    let rows = networks.iter().map(|n| {
                        vec![
                            id(&n.id),
                            n.name.clone(),
                            n.driver.clone(),
                            "global".into(),
                            n.subnet.to_string(),
                            n.vni.to_string(),
                        ]
                    });
                    print_table(&["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET", "VNI"], rows)?;
                }
            }
            NetworkCommand::Inspect { networks } => {
                let hosts: Vec<_> = store.hosts().await?.into_iter().map(|e| e.host).collect();
                let mut out = Vec::new();
                let mut failed = false;
                for query in &networks {
                    match store.network(query).await {
                        Ok(n) => {
                            let eps = store.network_endpoints(&n.id).await?;
                            out.push(inspect::NetworkInspect::new(&n, &eps, &hosts));
                        }
                        Err(e @ (StoreError::NetworkNotFound(_) | StoreError::AmbiguousNetwork { .. })) => {
                            eprintln!("Error: {e}");
                            failed = true;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                say(inspect::to_json(&out))?;
                return Ok(if failed { Outcome::Failed } else { Outcome::Done });
            }
            NetworkCommand::Rm { networks } => {
                let mut failed = false;
                for query in &networks {
                    match store.remove_network(query).await {
                        Ok(_) => say(query)?,
                        Err(e) => {
                            eprintln!("Error: {e}");
                            failed = true;
                        }
                    }
                }
                return Ok(if failed { Outcome::Failed } else { Outcome::Done });
            }
            NetworkCommand::Connect { ip, alias, network, container } => {
                let ip = ip.as_deref().map(|s| parse_ip("--ip", s)).transpose()?;
                let names = Names { aliases: alias, ..Names::default() };
                let ep = store.network_connect_named(&network, &container, ip, &names).await?;
                if let Some(deadline) = self.deadline() {
                    store.wait_endpoint_ready(&ep, &network, deadline).await.with_context(|| {
                        format!("container {container:?} is connected to network {network:?} in the store, but not yet on its host")
                    })?;
                }
            }
            NetworkCommand::Disconnect { network, container } => {
                let ep = store.network_disconnect(&network, &container).await?;
                if let Some(deadline) = self.deadline() {
                    store.wait_endpoint_detached(&ep, &network, deadline).await?;
                }
            }
        }
        Ok(Outcome::Done)
    }

    async fn container(&self, cmd: ContainerCommand) -> anyhow::Result<Outcome> {
        let store = &self.store;
        match cmd {
            ContainerCommand::Create { host, network, ip, alias, publish_service, publish, netns, name } => {
                let ip = ip.as_deref().map(|s| parse_ip("--ip", s)).transpose()?;
                let mut names = Names { aliases: alias, ..Names::default() };
                let mut network = network;
                if let Some(text) = &publish_service {
                    let (service, on) = parse_service_ref(text)?;
                    if network.as_ref().is_some_and(|n| *n != on) {
                        bail!(
                            "--publish-service {text} is on network {on:?}, not --network {:?}",
                            network.unwrap_or_default()
                        );
                    }
                    network = Some(on);
                    names.services.push(service);
                    names.publish = true;
                }
                if let Some(path) = &netns {
                    self.check_netns(&host, path).await?;
                }
                let spec = ContainerSpec {
                    name: name.clone(),
                    host: host.clone(),
                    netns,
                    network: network.clone(),
                    ip,
                    names,
                    ports: publish.into_iter().flat_map(|p| p.0).collect(),
                };
                let created = store.create_container(&spec).await?;
                if let Some(deadline) = self.deadline() {
                    let pending = || {
                        format!(
                            "container {name:?} is created in the store, but not yet running on host {host:?}"
                        )
                    };
                    let ready = async {
                        store.wait_container_ready(&name, &host, created.revision, deadline).await?;
                        if let (Some(ep), Some(network)) = (&created.endpoint, &network) {
                            store.wait_endpoint_ready(ep, network, deadline).await?;
                        }
                        Ok::<_, StoreError>(())
                    };
                    match ready.await {
                        Ok(()) => {}
                        // The host said why: the container stays desired (the agent keeps
                        // trying), for the operator to fix or remove.
                        Err(e @ StoreError::HostCannot { .. }) => {
                            return Err(anyhow::Error::new(e).context(format!(
                                "container {name:?} is created in the store, but its host cannot run it \
                                 (remove it with `overlay container rm {name}`)"
                            )));
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context(pending())),
                    }
                }
                say(&name)?;
            }
            ContainerCommand::Rm { containers } => {
                let mut failed = false;
                for name in &containers {
                    match self.container_rm(name).await {
                        Ok(()) => say(name)?,
                        Err(e) => {
                            eprintln!("Error: {e:#}");
                            failed = true;
                        }
                    }
                }
                return Ok(if failed { Outcome::Failed } else { Outcome::Done });
            }
            ContainerCommand::Ls => {
                let (state, _) = store.load().await?;
                let (_, statuses) = store.statuses().await?;
                let mut networks: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                for ep in state.endpoints.values() {
                    let net = state
                        .networks
                        .get(&ep.network_id)
                        .map_or(ep.network_id.as_str(), |n| n.name.as_str());
                    networks.entry(ep.container.as_str()).or_default().push(format!("{net}={}", ep.ipv4));
                }
                let rows = state.containers.values().map(|c| {
                    let mut nets = networks.remove(c.name.as_str()).unwrap_or_default();
                    nets.sort();
                    let status = match statuses.get(&c.name) {
                        Some(s)
                            if s.host == c.host
                                && s.container_revision == c.revision
                                && s.error.is_some() =>
                        {
                            "failed"
                        }
                        Some(s) if s.host == c.host => "ready",
                        _ => "pending",
                    };
                    vec![c.name.clone(), c.host.clone(), nets.join(","), status.to_owned()]
                });
                print_table(&["NAME", "HOST", "NETWORKS", "STATUS"], rows)?;
            }
            ContainerCommand::Inspect { containers } => {
                let (state, _) = store.load().await?;
                let withheld = store.port_statuses().await?;
                let mut out = Vec::new();
                let mut failed = false;
                for name in &containers {
                    if let Some(c) = state.containers.get(name) {
                        out.push(inspect::ContainerInspect::new(c, &state, withheld.get(name)));
                    } else {
                        eprintln!("Error: {}", StoreError::ContainerNotFound(name.clone()));
                        failed = true;
                    }
                }
                say(inspect::to_json(&out))?;
                return Ok(if failed { Outcome::Failed } else { Outcome::Done });
            }
            ContainerCommand::Exec { container, command } => {
                let (ctr, revision) = store.container_revision(&container).await?;
                let deadline = Instant::now() + self.timeout;
                let status = store
                    .wait_container_ready(&container, &ctr.host, revision, deadline)
                    .await
                    .with_context(|| format!("container {container:?} is not running"))?;
                if !status.netns.exists() {
                    bail!(
                        "container {container:?}'s namespace {} is not on this machine: run exec on its host {:?}",
                        status.netns.display(),
                        ctr.host
                    );
                }
                return Ok(Outcome::Exec { netns: status.netns, command });
            }
        }
        Ok(Outcome::Done)
    }

    /// Refuses a `--netns` that is plainly wrong before anything is written: a path that is not
    /// a network namespace, or the machine's initial one. Only when the host runs on this
    /// machine (or does not say where it runs), since the path is one on that host; its agent
    /// checks again, and also refuses its own namespace and other hosts'.
    async fn check_netns(&self, host: &str, path: &Path) -> anyhow::Result<()> {
        let hosts = self.store.hosts().await?;
        let elsewhere = hosts
            .iter()
            .find(|e| e.host.name == host)
            .and_then(|e| e.host.agent.as_ref())
            .is_some_and(|a| Some(&a.machine) != sandbox::machine().as_ref());
        if elsewhere {
            return Ok(());
        }
        let mut forbidden = Forbidden::default();
        forbidden.add_initial();
        forbidden.check(path).map_err(|reason| StoreError::Invalid {
            what: "--netns",
            value: path.display().to_string(),
            reason,
        })?;
        Ok(())
    }

    async fn container_rm(&self, name: &str) -> anyhow::Result<()> {
        let store = &self.store;
        let (ctr, endpoints) = store.remove_container(name).await?;
        let Some(deadline) = self.deadline() else { return Ok(()) };
        store.wait_container_removed(&ctr, &endpoints, deadline).await?;
        Ok(())
    }

    async fn host_ls(&self) -> anyhow::Result<Outcome> {
        let store = &self.store;
        let mut rows = Vec::new();
        for entry in store.hosts().await? {
            let h = &entry.host;
            let (state, agent) = if let Some(alive) = &entry.alive {
                let agent = alive.agent.as_ref();
                (
                    "alive".to_owned(),
                    agent.map_or_else(|| "-".into(), |a| format!("pid {} on {}", a.pid, a.machine)),
                )
            } else {
                // Not alive: its records go when the records lease runs out.
                let gc = if h.lease != 0 { store.lease_ttl(h.lease).await? } else { None };
                let when = gc.map_or_else(
                    || "-".into(),
                    |t| humantime::format_duration(Duration::from_secs(t.unsigned_abs())).to_string(),
                );
                (format!("down (records removed in {when})"), "-".into())
            };
            rows.push(vec![
                h.name.clone(),
                h.vtep.to_string(),
                h.uplink_mtu.map(|m| m.to_string()).unwrap_or_default(),
                state,
                agent,
            ]);
        }
        print_table(&["NAME", "VTEP", "UPLINK MTU", "STATE", "AGENT"], rows.into_iter())?;
        Ok(Outcome::Done)
    }
}

fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}   ");
            }
        }
        say(out.trim_end())
    };
    line(header.to_vec())?;
    for row in &rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

/// Puts a sandbox's own name files (`/etc/netns/<namespace>/resolv.conf`, `hosts`, which the
/// agent writes) over `/etc/` for the command, in a mount namespace of its own, as `ip netns
/// exec` does: the container resolves names through its networks' resolvers, not the host's.
/// A namespace without such files (another runtime's) is entered as it is.
fn bind_name_files(netns: &Path) -> anyhow::Result<()> {
    use nix::mount::{MsFlags, mount};
    let Some(name) = netns.file_name() else { return Ok(()) };
    let dir = Path::new(sandbox::NETNS_ETC).join(name);
    let files: Vec<PathBuf> =
        ["resolv.conf", "hosts"].iter().map(|f| dir.join(f)).filter(|p| p.exists()).collect();
    if files.is_empty() {
        return Ok(());
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("a mount namespace for the command")?;
    // Our binds must not propagate back into the host's mounts.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_SLAVE | MsFlags::MS_REC, None::<&str>)
        .context("making the mounts private")?;
    for file in files {
        let target = Path::new("/etc").join(file.file_name().unwrap_or_default());
        mount(Some(&file), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("binding {} over {}", file.display(), target.display()))?;
    }
    Ok(())
}

/// Enters `netns` and replaces this process with `command`; returns only on failure.
fn exec_in(netns: &Path, command: &[String]) -> anyhow::Error {
    let inner = || -> anyhow::Result<std::convert::Infallible> {
        let file = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {} (container exec needs root)", netns.display()))?;
        bind_name_files(netns)?;
        let args: Vec<CString> = command
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .context("a command argument contains a NUL byte")?;
        let program = args.first().context("no command given")?;
        nix::unistd::execvp(program, &args).with_context(|| format!("running {}", command[0]))
    };
    match inner() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}
