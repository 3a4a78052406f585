//! An overlay-agent the harness runs: the tests' command line (`overlay_tests::agent`) with JSON
//! logs on stderr, which a thread copies to a log file and turns into timestamped events (so
//! "full reconcile done" is seen the moment the agent writes it, not when a poll of the file
//! gets there), and the periodic resync off.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::Stdio,
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    Proc,
    agent::{AgentCommand, LogFormat},
};

use crate::sys::mono_ns;

/// One line of the agent's log.
#[derive(Clone, Debug)]
pub struct LogEvent {
    /// CLOCK_MONOTONIC when the harness read the line.
    pub mono_ns: u64,
    pub message: String,
    /// The structured fields (took_ms, map_endpoints, ...).
    pub fields: serde_json::Value,
}

/// How to run one agent.
pub struct AgentArgs<'a> {
    pub binary: &'a Path,
    /// Its host, directories and source: the command line the tests' agents get too.
    pub agent: AgentCommand<'a>,
    pub xdp_mode: &'a str,
    pub log: PathBuf,
}

pub struct Agent {
    pub host: String,
    pub log: PathBuf,
    proc: Proc,
    events: Receiver<LogEvent>,
}

impl Agent {
    pub fn spawn(a: AgentArgs<'_>) -> anyhow::Result<Self> {
        // JSON logs: the reader below turns each line into an event.
        let mut cmd = a.agent.command(a.binary, LogFormat::Json);
        cmd.args(["--xdp-mode", a.xdp_mode])
            // The harness drives reconciles itself; a periodic full pass in the middle of a
            // measurement would only add noise.
            .args(["--resync-secs", "3600"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let host = a.agent.host;
        let mut proc = Proc::try_spawn(&format!("overlay-agent {host}"), &mut cmd)?;
        let stderr = proc.take_stderr().context("agent stderr")?;
        let mut file =
            std::fs::File::create(&a.log).with_context(|| format!("creating {}", a.log.display()))?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let at = mono_ns();
                let _ = writeln!(file, "{line}");
                if let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_str(&line) {
                    let mut fields = obj.remove("fields").unwrap_or_default();
                    let message = fields
                        .as_object_mut()
                        .and_then(|f| f.remove("message"))
                        .and_then(|m| m.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    if tx.send(LogEvent { mono_ns: at, message, fields }).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Self { host: host.to_owned(), log: a.log, proc, events })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The next log event with `message`, waiting up to `timeout`. Fails with the end of the log
    /// if the agent exits first.
    pub fn wait_for(&mut self, message: &str, timeout: Duration) -> anyhow::Result<LogEvent> {
        self.wait_for_unless(message, &[], timeout)
    }

    /// `wait_for`, failing at once on an event whose message is in `fatal` (an agent that
    /// retries something that will not get better, e.g. reading its state from etcd).
    pub fn wait_for_unless(
        &mut self,
        message: &str,
        fatal: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<LogEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(ev) if ev.message == message => return Ok(ev),
                Ok(ev) if fatal.contains(&ev.message.as_str()) => {
                    bail!("agent {}: {} ({})", self.host, ev.message, ev.fields)
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("agent {} exited before \"{message}\":\n{}", self.host, self.log_tail())
                }
                Err(RecvTimeoutError::Timeout) => {
                    if !self.proc.is_running() {
                        // Let the reader finish what the agent wrote before it exited.
                        std::thread::sleep(Duration::from_millis(100));
                        bail!("agent {} exited before \"{message}\":\n{}", self.host, self.log_tail())
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "agent {}: no \"{message}\" within {timeout:?}:\n{}",
                            self.host,
                            self.log_tail()
                        )
                    }
                }
            }
        }
    }

    /// The last lines of the agent's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM (the agent stops, leaving the pinned datapath in place).
    pub fn stop(&mut self) {
        self.proc.terminate(Duration::from_secs(5));
    }
}
