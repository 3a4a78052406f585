//! A desired state kept in a JSON file (the `model::State` layout), for running hosts without a
//! store. The file is re-read whenever it changes; a file that does not parse is reported and
//! ignored, so a half-written edit never tears anything down.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Source, Status};
use crate::model::{State, Update};

pub struct FileSource {
    path: PathBuf,
    poll: Duration,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), poll: Duration::from_millis(200) }
    }

    fn read(&self) -> anyhow::Result<State> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", self.path.display()))
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
        mut status: mpsc::Receiver<Status>,
    ) -> anyhow::Result<()> {
        // The first snapshot must succeed: an agent that starts from a broken file has nothing
        // to reconcile against.
        let state = self.read()?;
        let mut seen = self.stamp();
        let mut last = state.clone();
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
                Ok(state) if state == last => {}
                Ok(state) => {
                    last = state.clone();
                    updates.send(Update::Snapshot(state)).await?;
                }
                Err(e) => warn!(error = format!("{e:#}"), "keeping the previous desired state"),
            }
        }
    }
}
