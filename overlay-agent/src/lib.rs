//! The overlay agent (`overlay-agent`) and the CLI (`overlay`), one module a concern; the arrows
//! between them run one way (docs/architecture.md has the map and two walks through it).

/// The agent's main loop: source -> desired state -> reconcile -> reports, retries, resync.
pub mod agent;
/// The one exponential backoff every retry loop uses.
pub mod backoff;
/// The safety brake: a change that would remove most of a host's containers waits for an operator.
pub mod brake;
/// The `overlay` command line, shaped like `docker network`; writes the store and waits.
pub mod cli;
/// The CNI plugin's agent side: `overlay-cni` forwards each invocation on a unix socket.
pub mod cni;
/// The kernel side: load, pin and attach the eBPF programs; typed maps; counters.
pub mod datapath;
/// The agent's view of the desired state: what this host needs, its indexes, the dirty keys.
pub mod desired;
/// Docker's remote network driver API on a unix socket, for the engine on this host.
pub mod docker;
/// Containers reaching the world and published ports: routes, nftables, conntrack.
pub mod egress;
/// `GET /healthz`, `GET /readyz`, `POST /brake/release`, `GET /metrics`.
pub mod health;
/// Who this agent is (its id, machine, netns) and the lock that keeps one agent per state dir.
pub mod identity;
/// Prometheus metrics: the datapath's counters and the agent's figures.
pub mod metrics;
/// The desired state's objects (networks, endpoints, containers, hosts) and their updates.
pub mod model;
/// `overlay-agent monitor`: a host's drops and new flows, live, from the programs' ring buffer.
pub mod monitor;
/// Kernel plumbing over rtnetlink: namespaces, veths, addresses, routes; GRO by ethtool ioctl.
pub mod netlink;
/// The agent process's CPU, memory, descriptors and start time, from /proc/self.
pub mod process;
/// One pass closing the gap between desired and actual: plan, local plumbing, map mirror.
pub mod reconcile;
/// The agent's DNS resolver: overlay names the datapath cannot answer, the rest relayed upstream.
pub mod resolver;
/// The network namespaces the agent makes for containers.
pub mod sandbox;
/// What the agent consumes and reports: follow etcd (or a file), publish reports, host lease.
pub mod source;
/// The state in etcd shared by CLI and agent: keys, transactions, IPAM, waits. Never imports
/// `source`.
pub mod store;
