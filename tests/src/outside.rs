//! "The outside" of the egress tests and benchmark: a namespace that stands for the world
//! beyond the hosts, reachable from them only through a router on the underlay.
//!
//! The underlay namespace routes (it already holds the switch and etcd's address,
//! 198.18.0.254): a veth from it to the outside namespace carries 198.19.0.0/24, the hosts get
//! a default route through 198.18.0.254, and nothing routes the overlay's subnets: the outside
//! reaches containers only through a host's address (published ports), and sees only hosts'
//! addresses.

use std::net::Ipv4Addr;

use crate::{in_ns, ip_in, sh_result};

/// The router's address on the underlay (shared with etcd's, on the switch's bridge).
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// The router's address toward the outside, and the outside's own.
pub const ROUTER_OUT: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);

/// Makes namespace `outside` behind `underlay` (which must already hold `ROUTER` on `br0`),
/// with `mtu` on the link between them, and points each of `hosts` (namespaces) at the router.
pub fn build(underlay: &str, outside: &str, mtu: u32, hosts: &[&str]) -> anyhow::Result<()> {
    crate::ip(&["netns", "add", outside])?;
    ip_in(outside, &["link", "set", "lo", "up"])?;
    ip_in(underlay, &["link", "add", "vout", "type", "veth", "peer", "name", "eth0", "netns", outside])?;
    let mtu = mtu.to_string();
    ip_in(underlay, &["link", "set", "vout", "mtu", &mtu, "up"])?;
    ip_in(underlay, &["addr", "add", &format!("{ROUTER_OUT}/24"), "dev", "vout"])?;
    ip_in(outside, &["link", "set", "eth0", "mtu", &mtu, "up"])?;
    ip_in(outside, &["addr", "add", &format!("{OUTSIDE}/24"), "dev", "eth0"])?;
    ip_in(outside, &["route", "add", "default", "via", &ROUTER_OUT.to_string()])?;
    sh_result(&mut in_ns(underlay, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]))?;
    for ns in hosts {
        ip_in(ns, &["route", "replace", "default", "via", &ROUTER.to_string()])?;
    }
    Ok(())
}
