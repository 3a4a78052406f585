//! Where a host's BPF objects are pinned.
//!
//! Everything of one host lives under one directory on bpffs, so several agents can share a
//! kernel (as the test hosts do) without touching each other's objects, and so that a restarted
//! agent finds the maps and attachments its predecessor left:
//!
//! ```text
//! <pin dir>/ENDPOINTS, IFACES, PEERS, NETWORKS, CONFIG, STATS   the maps
//! <pin dir>/links/uplink_xdp, links/uplink_tc                   uplink attachments
//! <pin dir>/links/ep_<ifindex>                                  one per endpoint veth
//! ```

use std::{
    io,
    path::{Path, PathBuf},
};

/// The default pin directory of a host.
pub fn default_dir(host: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/overlay").join(host)
}

#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

const UPLINK_XDP: &str = "uplink_xdp";
const UPLINK_TC: &str = "uplink_tc";
const ENDPOINT_PREFIX: &str = "ep_";

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directories, checking that they are on a BPF filesystem.
    pub fn create(&self) -> io::Result<()> {
        std::fs::create_dir_all(self.links())?;
        let stat = nix::sys::statfs::statfs(&self.root).map_err(io::Error::from)?;
        if stat.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
            return Err(io::Error::other(format!(
                "{} is not on a BPF filesystem (mount -t bpf bpf /sys/fs/bpf)",
                self.root.display()
            )));
        }
        Ok(())
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn uplink_xdp(&self) -> PathBuf {
        self.links().join(UPLINK_XDP)
    }

    pub fn uplink_tc(&self) -> PathBuf {
        self.links().join(UPLINK_TC)
    }

    pub fn endpoint_link(&self, ifindex: u32) -> PathBuf {
        self.links().join(format!("{ENDPOINT_PREFIX}{ifindex}"))
    }

    /// The interface of the endpoint attachment pinned at `pin` (None: not one).
    pub fn endpoint_ifindex(&self, pin: &Path) -> Option<u32> {
        if pin.parent()? != self.links() {
            return None;
        }
        pin.file_name()?.to_str()?.strip_prefix(ENDPOINT_PREFIX)?.parse().ok()
    }

    /// The ifindexes of every pinned endpoint attachment.
    pub fn endpoint_links(&self) -> io::Result<Vec<u32>> {
        let mut out = Vec::new();
        let dir = match std::fs::read_dir(self.links()) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in dir {
            let name = entry?.file_name();
            if let Some(ifindex) =
                name.to_str().and_then(|n| n.strip_prefix(ENDPOINT_PREFIX)).and_then(|n| n.parse().ok())
            {
                out.push(ifindex);
            }
        }
        Ok(out)
    }

    /// Removes every pinned object of this host: its maps and attachments go away with the
    /// last reference, and with them the datapath. Used by `overlay-agent reset` and tests.
    pub fn remove_all(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
