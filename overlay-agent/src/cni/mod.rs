//! The agent's side of the CNI plugin (`overlay-agent run --cni-socket PATH`): `overlay-cni`
//! forwards each invocation here, and the agent, which holds the store and makes the
//! interfaces, answers it. docs/cni.md says what each command does.

/// ADD, DEL, CHECK, STATUS, GC.
pub mod commands;
/// The HTTP server on the unix socket.
pub mod server;
/// The request, the netconf fields read, the result and the error.
pub mod types;

pub use server::serve;
