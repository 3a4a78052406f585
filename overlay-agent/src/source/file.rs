//! A desired state kept in a JSON file (the `model::State` layout), for running hosts without a
//! store. The file is re-read whenever it changes; a file that does not parse is reported and
//! ignored, so a half-written edit never tears anything down. Only a hash of the last content is
//! kept (not a second copy of the state: at 100k endpoints that is tens of megabytes).

use std::{
    hash::{Hash as _, Hasher as _},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Report, Source};
use crate::model::{State, Update};

pub struct FileSource {
    path: PathBuf,
    poll: Duration,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), poll: Duration::from_millis(200) }
    }

    /// The state in the file, and a hash of the file's bytes.
    fn read(&self) -> anyhow::Result<(State, u64)> {
        let bytes = std::fs::read(&self.path).with_context(|| format!("reading {}", self.path.display()))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut hasher);
        let state =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", self.path.display()))?;
        Ok((state, hasher.finish()))
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }
}

impl Source for FileSource {
    async fn run(
        self,
        updates: mpsc::Sender<Update>,
        mut status: mpsc::Receiver<Report>,
    ) -> anyhow::Result<()> {
        // The first snapshot must succeed: an agent that starts from a broken file has nothing
        // to reconcile against.
        let (state, mut last) = self.read()?;
        let mut seen = self.stamp();
        updates.send(Update::Snapshot(state)).await?;
        let mut tick = tokio::time::interval(self.poll);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                report = status.recv() => {
                    match report {
                        Some(report) => debug!(?report, "status"),
                        None => return Ok(()),
                    }
                    continue;
                }
            }
            let now = self.stamp();
            if now == seen {
                continue;
            }
            seen = now;
            match self.read() {
                Ok((_, hash)) if hash == last => {}
                Ok((state, hash)) => {
                    last = hash;
                    updates.send(Update::Snapshot(state)).await?;
                }
                Err(e) => warn!(error = format!("{e:#}"), "keeping the previous desired state"),
            }
        }
    }

    fn attach_health(&mut self, health: crate::health::Shared) {
        if let Ok(mut h) = health.lock() {
            h.state_file = true;
        }
    }
}
