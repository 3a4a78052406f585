//! What the agent knows of the store it follows: which etcd cluster, and the last revision it
//! applied. A store that is not the one the agent followed (a new cluster id), or that is behind
//! what the agent applied (restored from an older backup, or restarted empty), makes everything
//! the agent holds suspect: the follower reads everything again, loudly, and the agent's safety
//! brake decides whether the difference may be applied. Kept in the state directory, so an
//! agent restarted against such a store notices too.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// 0: not known yet.
    pub cluster_id: u64,
    /// The last revision applied.
    pub revision: i64,
}

/// Why the store cannot be the one the agent followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reset {
    NewCluster {
        was: u64,
        now: u64,
    },
    Backwards {
        applied: i64,
        now: i64,
    },
    /// The event the agent applied at `revision` is not in the store's history.
    Rewritten {
        revision: i64,
        key: String,
    },
}

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NewCluster { was, now } => {
                write!(f, "etcd is another cluster (id {now:x}, was {was:x}): replaced or restored")
            }
            Self::Backwards { applied, now } => write!(
                f,
                "etcd's revision went backwards (now {now}, this agent applied {applied}): restored from an older backup, or restarted empty"
            ),
            Self::Rewritten { revision, key } => write!(
                f,
                "etcd's history went backwards: revision {revision} no longer holds the change to {key} this agent applied (restored from an older backup)"
            ),
        }
    }
}

impl Seen {
    /// Judges an answer from etcd (its header's cluster id and revision) against what was seen.
    /// Every answer comes from a store at least as new as anything the agent applied (the
    /// agent's reads are linearizable and its watch sends nothing beyond its member's
    /// revision), so a lower revision means the history itself is gone.
    pub fn judge(&self, cluster_id: u64, revision: i64) -> Option<Reset> {
        if self.cluster_id != 0 && cluster_id != 0 && cluster_id != self.cluster_id {
            return Some(Reset::NewCluster { was: self.cluster_id, now: cluster_id });
        }
        (revision > 0 && revision < self.revision)
            .then_some(Reset::Backwards { applied: self.revision, now: revision })
    }
}

/// The file in the state directory.
pub struct SeenFile {
    path: Option<PathBuf>,
    written: Seen,
    at: Option<std::time::Instant>,
}

/// At most one write per this long while the revision moves (a busy store moves it constantly;
/// a record a second old still tells a rolled-back store apart).
const EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl SeenFile {
    /// `dir`: the agent's state directory (None: keep nothing, for tests).
    pub fn open(dir: Option<&Path>) -> (Self, Seen) {
        let path = dir.map(|d| d.join("store.json"));
        let seen = path
            .as_ref()
            .and_then(|p| fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        (Self { path, written: seen, at: None }, seen)
    }

    /// Records `seen` (written only when it changed).
    pub fn save(&mut self, seen: Seen) {
        let recent = self.at.is_some_and(|at| at.elapsed() < EVERY);
        if seen == self.written
            || (recent && seen.cluster_id == self.written.cluster_id && seen.revision != 0)
        {
            return;
        }
        let Some(path) = &self.path else { return };
        let tmp = path.with_extension("json.tmp");
        let result = fs::write(&tmp, serde_json::to_vec(&seen).expect("serializes"))
            .and_then(|()| fs::rename(&tmp, path));
        match result {
            Ok(()) => {
                self.written = seen;
                self.at = Some(std::time::Instant::now());
            }
            Err(e) => warn!(path = %path.display(), error = %e, "cannot record the store's identity"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_cluster_or_an_older_revision_is_a_reset() {
        let seen = Seen { cluster_id: 7, revision: 100 };
        assert_eq!(seen.judge(7, 100), None);
        assert_eq!(seen.judge(7, 250), None);
        assert_eq!(seen.judge(8, 250), Some(Reset::NewCluster { was: 7, now: 8 }));
        assert_eq!(seen.judge(7, 99), Some(Reset::Backwards { applied: 100, now: 99 }));
        // Nothing known yet: nothing to compare.
        assert_eq!(Seen::default().judge(8, 1), None);
    }

    #[test]
    fn kept_across_restarts() {
        let dir = std::env::temp_dir().join(format!("overlay-seen-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (mut file, seen) = SeenFile::open(Some(&dir));
        assert_eq!(seen, Seen::default());
        file.save(Seen { cluster_id: 3, revision: 42 });
        assert_eq!(SeenFile::open(Some(&dir)).1, Seen { cluster_id: 3, revision: 42 });
        fs::remove_dir_all(&dir).unwrap();
    }
}
