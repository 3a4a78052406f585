//! The agent's resolver: DNS the datapath cannot answer from the `NAMES` map (docs/names.md,
//! "The agent's resolver").
//!
//! Queries reach it on each served gateway's port 53, UDP and TCP, through the path
//! `netlink::resolver_path` sets up. It answers the overlay's names itself (`zone`, `answer`)
//! and relays everything else, byte for byte, to the host's upstream resolvers (`upstream`), so
//! truncation, EDNS and TCP fallback behave as the upstreams make them.

pub mod answer;
pub mod serve;
pub mod upstream;
pub mod zone;

pub use self::serve::Resolver;
