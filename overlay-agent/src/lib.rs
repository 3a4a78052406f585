//! The overlay agent: it makes one host's part of the desired state real.
//!
//! - `model`: the desired state (networks, endpoints, containers, hosts).
//! - `source`: where that state comes from (a file, or etcd).
//! - `datapath`: the eBPF programs and maps (load, pin, attach, write).
//! - `netlink`: namespaces, veths, addresses and routes.
//! - `reconcile`: the difference between desired and actual, and the steps that close it.

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod datapath;
pub mod desired;
pub mod health;
pub mod model;
pub mod netlink;
pub mod reconcile;
pub mod sandbox;
pub mod source;
pub mod store;
