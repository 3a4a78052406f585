//! The simulated underlay every test topology and every benchmark topology stands on: an
//! "underlay" namespace holding a bridge `br0` (the switch), and per simulated host a network
//! namespace whose `eth0` is a veth into that bridge, with an address in 198.18.0.0/15 (the
//! range reserved for benchmarking, so it never collides with a real network). What stands on
//! it (agents, baselines, etcd on the bridge) is the caller's.

use std::net::Ipv4Addr;

use crate::{in_ns, ip, ip_in, sh_result};

/// The prefix length of the hosts' addresses: all on one subnet, one hop apart.
pub const PREFIX_LEN: u8 = 24;
/// The MTU of both ends of every host's link: Ethernet's, set explicitly so that the overlay's
/// MTU arithmetic (uplink less 50 bytes of VXLAN) starts from a known figure.
pub const MTU: u32 = 1500;

/// One simulated host to put on the underlay.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    /// Its network namespace (created by `build`).
    pub ns: &'a str,
    /// Its `eth0` address (with `PREFIX_LEN`).
    pub addr: Ipv4Addr,
}

/// How the switch's ports behave.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Packets each bridge port may queue toward its host (txqueuelen and a pfifo of that
    /// limit). A switch port has a buffer: with one, a burst toward a host whose veth runs
    /// native XDP (which receives through a 256-slot ring) backs up instead of being dropped.
    /// None leaves the veth's default (no qdisc), as the benchmark measures it.
    pub port_queue: Option<u32>,
}

/// Creates namespace `underlay` with bridge `br0`, and each member's namespace with its `eth0`
/// joined to the bridge through port `p<i>` (1-based, in `hosts` order) and addressed. An error
/// names the `ip` or `tc` command that failed; what was made stays for the caller's cleanup
/// (everything is named after its `Run`).
pub fn build(underlay: &str, hosts: &[Member<'_>], opts: Options) -> anyhow::Result<()> {
    ip(&["netns", "add", underlay])?;
    // Traffic to the namespace's own addresses (etcd talking to itself) goes through lo.
    ip_in(underlay, &["link", "set", "lo", "up"])?;
    ip_in(underlay, &["link", "add", "br0", "type", "bridge"])?;
    ip_in(underlay, &["link", "set", "br0", "up"])?;
    for (i, host) in hosts.iter().enumerate() {
        // Made inside the underlay namespace, so the port's name needs to be unique only there.
        attach(underlay, &format!("p{}", i + 1), host, opts)?;
    }
    Ok(())
}

/// Makes `host`'s namespace and joins its `eth0` to the bridge of `underlay` (built by `build`)
/// through `port`, a name not yet used there: a host added after the others (the benchmark's
/// Docker-design host beside a `Cluster`'s).
pub fn attach(underlay: &str, port: &str, host: &Member<'_>, opts: Options) -> anyhow::Result<()> {
    let mtu = MTU.to_string();
    ip(&["netns", "add", host.ns])?;
    ip_in(underlay, &["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.ns])?;
    ip_in(underlay, &["link", "set", port, "mtu", &mtu, "master", "br0", "up"])?;
    if let Some(queue) = opts.port_queue {
        let queue = queue.to_string();
        ip_in(underlay, &["link", "set", port, "txqueuelen", &queue])?;
        sh_result(&mut in_ns(
            underlay,
            &["tc", "qdisc", "replace", "dev", port, "root", "pfifo", "limit", &queue],
        ))?;
    }
    ip_in(host.ns, &["link", "set", "lo", "up"])?;
    ip_in(host.ns, &["link", "set", "eth0", "mtu", &mtu, "up"])?;
    ip_in(host.ns, &["addr", "add", &format!("{}/{PREFIX_LEN}", host.addr), "dev", "eth0"])?;
    Ok(())
}
