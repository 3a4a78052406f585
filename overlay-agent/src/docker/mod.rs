//! The agent as Docker's network plugin (`overlay-agent run --docker-plugin PATH`): libnetwork's
//! remote driver API on a unix socket in the engine's plugin directory, answered from the store.
//! docs/docker.md says what each call does.

/// CreateEndpoint/Join/Leave/DeleteEndpoint: a Docker endpoint is an overlay endpoint on an
/// address the IPAM calls reserved.
pub mod endpoint;
/// The IPAM driver API: pools and addresses from the overlay's etcd IPAM.
pub mod ipam;
/// CreateNetwork/DeleteNetwork: a Docker network is the overlay network with its subnet.
pub mod network;
/// The HTTP server on the unix socket: routes, bodies, `{"Err"}` answers.
pub mod server;
/// The JSON bodies, with Docker's field names.
pub mod types;

pub use server::{Plugin, serve};
