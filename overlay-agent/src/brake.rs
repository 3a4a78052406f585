//! The safety brake: a change of the desired state that would remove more than a share of the
//! containers this host runs is not applied until an operator says so (or the store changes
//! again so that it no longer would). Such a change almost never is what anyone asked for: it
//! is what a store restarted empty, restored from an old backup or pointed at the wrong prefix
//! looks like, and applying it would destroy every workload on the host. It judges the whole
//! state read after the store was found in doubt (a new cluster id, a revision behind what the
//! agent applied, no registration of this host, a compaction past what the watch needed:
//! source/follow.rs, source/etcd.rs), and anything that arrives while it is engaged.
//! Containers deleted one by one (`overlay container rm`), even while the agent was down, never
//! trip it: the store that says so is the one the agent followed.

use std::{
    fs,
    path::{Path, PathBuf},
};

use tracing::{error, info, warn};

use crate::{
    desired::{Desired, Dirty},
    health,
};

/// The brake as the agent's main loop uses it: what it holds back, and what it already judged.
pub struct SafetyBrake {
    share: f64,
    state_dir: PathBuf,
    /// What is held back while engaged.
    held: Option<Dirty>,
    /// The operator released what was held: apply the next pass unjudged.
    go_ahead: bool,
    /// Store resets (`Health::store_resets`) already accounted for: a whole state read after a
    /// new one is judged.
    trusted: u64,
}

impl SafetyBrake {
    /// An agent restarted while the brake held something judges what it reads first, as its
    /// predecessor would have (the reset is counted in `health`).
    pub fn new(share: f64, state_dir: &Path, health: &health::Shared) -> Self {
        if remembered(state_dir)
            && let Ok(mut h) = health.lock()
        {
            h.store_resets += 1;
            h.last_store_reset =
                Some("the safety brake was holding a change when the agent last stopped".into());
        }
        Self { share, state_dir: state_dir.to_owned(), held: None, go_ahead: false, trusted: 0 }
    }

    /// The operator's go-ahead: what was held, to apply whole (None: nothing was held).
    pub fn release(&mut self) -> Option<Dirty> {
        let mut held = self.held.take()?;
        self.go_ahead = true;
        held.full = true;
        Some(held)
    }

    /// Judges a pass about to run: returns what to apply, or None when the brake holds it
    /// (engaged now or still). `running` lists the containers this host runs (asked only when
    /// there is something to judge).
    pub fn gate(
        &mut self,
        mut dirty: Dirty,
        desired: &Desired,
        running: impl FnOnce() -> Vec<String>,
        health: &health::Shared,
    ) -> Option<Dirty> {
        // A whole state read after the store was found reset (or anything while engaged) is
        // judged. Otherwise a state read again (a restart, a compaction) is trusted: containers
        // removed meanwhile were removed by someone.
        let resets = health.lock().map_or(0, |h| h.store_resets);
        if ((dirty.full && resets > self.trusted) || self.held.is_some()) && !self.go_ahead {
            if let Some(brake) = judge(&running(), desired, self.share, health::now()) {
                if self.held.is_none() {
                    remember(&self.state_dir, &brake);
                    error!(
                        would_remove = brake.would_remove,
                        of = brake.of,
                        containers = ?brake.containers,
                        share = self.share,
                        "safety brake: the desired state just read would remove more than the allowed share of this host's containers; nothing is applied (the datapath keeps forwarding as it is) until the store holds them again or an operator sends POST /brake/release"
                    );
                }
                if let Ok(mut h) = health.lock() {
                    let since = h.brake.as_ref().map_or(brake.since, |b| b.since);
                    h.brake = Some(health::Brake { since, ..brake });
                }
                self.held.get_or_insert_with(Dirty::default).merge(dirty);
                return None;
            }
            if let Some(held) = self.held.take() {
                info!(
                    "safety brake released: the desired state no longer removes too many of this host's containers"
                );
                dirty.merge(held);
                dirty.full = true;
            }
        }
        if std::mem::take(&mut self.go_ahead) {
            info!("applying what the safety brake held, as the operator asked");
        }
        self.trusted = resets;
        if let Ok(mut h) = health.lock()
            && h.brake.take().is_some()
        {
            forget(&self.state_dir);
        }
        Some(dirty)
    }
}

/// The file in the state directory that says the brake is engaged: an agent restarted while it
/// holds something must hold it too, not apply what its predecessor refused.
const FILE: &str = "brake.json";

/// Records that the brake holds `brake`.
fn remember(state_dir: &Path, brake: &health::Brake) {
    let path = state_dir.join(FILE);
    if let Err(e) = fs::write(&path, serde_json::to_vec(brake).expect("serializes")) {
        warn!(path = %path.display(), error = %e, "cannot record the safety brake; a restarted agent would not know it");
    }
}

/// Records that the brake holds nothing any more.
fn forget(state_dir: &Path) {
    let _ = fs::remove_file(state_dir.join(FILE));
}

/// Whether the brake was engaged when the agent stopped.
fn remembered(state_dir: &Path) -> bool {
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
                    handover: false,
                    ports: Vec::new(),
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
