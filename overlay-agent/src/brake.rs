//! The safety brake: a change of the desired state that would remove more than a share of the
//! containers this host runs is not applied until an operator says so (or the store changes
//! again so that it no longer would). Such a change almost never is what anyone asked for: it
//! is what a store restarted empty, restored from an old backup or pointed at the wrong prefix
//! looks like, and applying it would destroy every workload on the host. It judges the whole
//! state read after the store was found in doubt (a new cluster id, a revision behind what the
//! agent applied, no registration of this host, a compaction past what the watch needed:
//! source/follow.rs, source/etcd.rs), and anything that arrives while it is engaged. Containers deleted one by one (`overlay container rm`),
//! even while the agent was down, never trip it: the store that says so is the one the agent
//! followed.

use std::{fs, path::Path};

use tracing::warn;

use crate::{desired::Desired, health};

/// The file in the state directory that says the brake is engaged: an agent restarted while it
/// holds something must hold it too, not apply what its predecessor refused.
const FILE: &str = "brake.json";

/// Records that the brake holds `brake`.
pub fn remember(state_dir: &Path, brake: &health::Brake) {
    let path = state_dir.join(FILE);
    if let Err(e) = fs::write(&path, serde_json::to_vec(brake).expect("serializes")) {
        warn!(path = %path.display(), error = %e, "cannot record the safety brake; a restarted agent would not know it");
    }
}

/// Records that the brake holds nothing any more.
pub fn forget(state_dir: &Path) {
    let _ = fs::remove_file(state_dir.join(FILE));
}

/// Whether the brake was engaged when the agent stopped.
pub fn remembered(state_dir: &Path) -> bool {
    state_dir.join(FILE).exists()
}

/// Judges the desired state against the containers this host runs. `share` is the largest
/// fraction (0..=1) of them one change may remove; 1 turns the brake off.
pub fn judge(running: &[String], desired: &Desired, share: f64, since: u64) -> Option<health::Brake> {
    let doomed: Vec<&String> = running.iter().filter(|name| desired.container(name).is_none()).collect();
    #[allow(clippy::cast_precision_loss)] // Container counts are far below 2^52.
    let too_many = !doomed.is_empty() && doomed.len() as f64 > share * running.len() as f64;
    too_many.then(|| health::Brake {
        would_remove: doomed.len(),
        of: running.len(),
        containers: doomed.iter().take(10).map(|s| (*s).clone()).collect(),
        since,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Container, State, Update};

    fn desired(names: &[&str]) -> Desired {
        let mut d = Desired::new("h1");
        let mut s = State::default();
        for n in names {
            s.containers.insert(
                (*n).to_owned(),
                Container {
                    name: (*n).into(),
                    host: "h1".into(),
                    netns: None,
                    created: String::new(),
                    revision: 1,
                },
            );
        }
        d.apply(Update::Snapshot(s), &mut crate::desired::Dirty::default());
        d
    }

    fn running(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn an_empty_store_is_held() {
        let b = judge(&running(&["a", "b", "c"]), &desired(&[]), 0.5, 9).expect("engaged");
        assert_eq!((b.would_remove, b.of, b.since), (3, 3, 9));
        assert_eq!(b.containers, ["a", "b", "c"]);
    }

    #[test]
    fn a_small_share_passes_and_the_threshold_is_strict() {
        let four = running(&["a", "b", "c", "d"]);
        assert_eq!(judge(&four, &desired(&["a", "b", "c"]), 0.5, 0), None);
        // Exactly half is not more than half.
        assert_eq!(judge(&four, &desired(&["a", "b"]), 0.5, 0), None);
        assert!(judge(&four, &desired(&["a"]), 0.5, 0).is_some());
        // New containers are no reason to hold anything.
        assert_eq!(judge(&four, &desired(&["a", "b", "c", "d", "e"]), 0.5, 0), None);
    }

    #[test]
    fn remembered_across_restarts() {
        let dir = std::env::temp_dir().join(format!("overlay-brake-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(!remembered(&dir));
        remember(&dir, &health::Brake { would_remove: 1, of: 1, containers: vec!["a".into()], since: 2 });
        assert!(remembered(&dir));
        forget(&dir);
        assert!(!remembered(&dir));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn share_one_turns_it_off_and_nothing_running_holds_nothing() {
        assert_eq!(judge(&running(&["a"]), &desired(&[]), 1.0, 0), None);
        assert_eq!(judge(&[], &desired(&[]), 0.0, 0), None);
    }
}
