//! Who this agent is, and the rule of one agent per host on a machine.
//!
//! The agent's id is random and kept in its state directory, so an agent restarted there is the
//! same agent (it takes its host's registration back at once), while a second agent for the same
//! host anywhere else has another id and is refused by the store (store/host.rs). On one machine
//! the state directory is also locked (`flock`): a second agent with the same directory would
//! take over the first one's pinned programs and sandboxes, so it stops before touching anything.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read as _, Seek as _, Write as _},
    os::fd::AsRawFd as _,
    path::Path,
};

use anyhow::{Context as _, bail};

use crate::model::AgentIdentity;

/// This agent's identity: its id (created on first use), the machine, its pid and its network
/// namespace.
pub fn load(state_dir: &Path) -> anyhow::Result<AgentIdentity> {
    fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let path = state_dir.join("agent-id");
    let id = match fs::read_to_string(&path) {
        Ok(id) if id.trim().len() == 32 && id.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
            id.trim().to_owned()
        }
        _ => {
            // 128 random bits are plenty to tell agents apart.
            let id = crate::store::new_id()[..32].to_owned();
            fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
            id
        }
    };
    Ok(AgentIdentity {
        id,
        machine: crate::sandbox::machine().unwrap_or_default(),
        pid: std::process::id(),
        netns: crate::netlink::netns::current_identity().ok(),
    })
}

/// Locks the state directory for this agent's life; refuses, naming the holder, if another
/// agent has it.
pub fn lock(state_dir: &Path, host: &str) -> anyhow::Result<File> {
    fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let path = state_dir.join("agent.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; the lock lives as long as the file.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        bail!(
            "another agent for host {host:?} is running (pid {}, holding {}): one agent per host",
            holder.trim(),
            path.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}
