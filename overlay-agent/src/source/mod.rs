//! Where the desired state comes from.
//!
//! A source runs as its own task. It sends a full snapshot first and then every change, in
//! order, into a channel the agent reads; it may send a new snapshot whenever it lost track (a
//! file rewritten, an etcd watch that fell behind a compaction), and the agent then reconciles
//! only what differs. While the source cannot reach its backing store it simply sends nothing,
//! and the datapath keeps forwarding with what it has. In the other direction the agent reports
//! what it made real, which the etcd source publishes for the CLI to wait on.
//!
//! - `file`: a JSON state file, re-read when it changes.
//! - `etcd`: the store, as the agent uses it: `follow` (snapshot and watch), `publish` (the
//!   agent's reports as status keys) and `lease` (the host's registration, kept alive). These
//!   use `store` for keys, transactions and value layouts; `store` never uses them.

pub mod etcd;
pub mod file;
mod follow;
mod history;
pub mod lease;
mod publish;

use std::{future::Future, path::PathBuf};

use tokio::sync::mpsc;

use crate::{model::Update, store::WithheldPort};

pub use self::{
    etcd::EtcdSource,
    lease::{HostRegistration, Lifetimes, Registered},
};

/// What the agent made real on its host (or took down): its report to the store, which publishes
/// it for the CLI to wait on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// A local endpoint's interface exists and the datapath forwards for it.
    EndpointReady {
        id: String,
        container: String,
        ifname: String,
    },
    /// A local endpoint's interface cannot be made (the agent keeps trying).
    EndpointFailed {
        id: String,
        container: String,
        error: String,
    },
    EndpointGone {
        id: String,
    },
    /// A container's sandbox exists.
    ContainerReady {
        name: String,
        /// Which container of that name (`model::Container::revision`): the one the agent made.
        revision: i64,
        netns: PathBuf,
        pid: Option<u32>,
    },
    /// A container's sandbox cannot be made (a refused `--netns`, a kernel error); the agent
    /// keeps trying, and reports it ready if it succeeds.
    ContainerFailed {
        name: String,
        revision: i64,
        netns: PathBuf,
        error: String,
    },
    ContainerGone {
        name: String,
    },
    /// Ports published for a local container that the host leaves out (a server of the host
    /// listens on them); empty when it publishes them all (the status goes).
    PortsWithheld {
        container: String,
        withheld: Vec<WithheldPort>,
    },
}

pub trait Source: Send + 'static {
    /// Runs until the agent stops or the source fails for good.
    fn run(
        self,
        updates: mpsc::Sender<Update>,
        status: mpsc::Receiver<Report>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Gives the source the agent's health record, for what only it knows (registration, store
    /// resets).
    fn attach_health(&mut self, _health: crate::health::Shared) {}
}
