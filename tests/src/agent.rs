//! The command line of an agent on a simulated host (`overlay-agent run` with the host's name,
//! uplink, VTEP, namespace, pin and state directories, sandbox prefix and desired-state source):
//! one builder for the tests' `Topology` and the benchmark's agents, so both run the agent the
//! same way. Where its output goes, and any further `run` flags, are the caller's.

use std::{net::Ipv4Addr, path::Path, process::Command};

/// Where an agent reads its desired state from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// A state file, which the agent polls.
    File(&'a Path),
    /// etcd at this URL, which the agent watches.
    Etcd(&'a str),
}

/// An agent of one simulated host.
pub struct AgentCommand<'a> {
    pub host: &'a str,
    pub uplink: &'a str,
    pub vtep: Ipv4Addr,
    /// The host's network namespace, by name (the agent enters it).
    pub netns: &'a str,
    pub pin_dir: &'a Path,
    pub state_dir: &'a Path,
    /// The agent names its container namespaces `<prefix><container>`.
    pub netns_prefix: &'a str,
    pub source: &'a Source<'a>,
}

/// How the agent writes its log: chosen by whoever reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Text lines, for people (the tests' log files).
    Text,
    /// One JSON object a line, for a reader that parses them (the benchmark's timed events).
    Json,
}

impl AgentCommand<'_> {
    /// `<binary> [--log-format json] run ...`, logging at info (without the netlink library's
    /// chatter); append more `run` flags to it. Its stdio is left to the caller.
    pub fn command(&self, binary: &Path, logs: LogFormat) -> Command {
        let mut cmd = Command::new(binary);
        if logs == LogFormat::Json {
            cmd.args(["--log-format", "json"]);
        }
        cmd.arg("run")
            .args(["--host", self.host, "--uplink", self.uplink, "--vtep", &self.vtep.to_string()])
            .args(["--netns", self.netns])
            .arg("--pin-dir")
            .arg(self.pin_dir)
            .arg("--state-dir")
            .arg(self.state_dir)
            .args(["--netns-prefix", self.netns_prefix])
            .env("OVERLAY_LOG", "info,netlink_packet_route=error");
        match self.source {
            Source::File(path) => cmd.arg("--state-file").arg(path),
            Source::Etcd(url) => cmd.args(["--etcd-endpoints", url]),
        };
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    fn agent<'a>(source: &'a Source<'a>) -> AgentCommand<'a> {
        AgentCommand {
            host: "h1",
            uplink: "eth0",
            vtep: Ipv4Addr::new(198, 18, 0, 1),
            netns: "r1-h1",
            pin_dir: Path::new("/sys/fs/bpf/r1/h1"),
            state_dir: Path::new("/tmp/r1/state-h1"),
            netns_prefix: "r1-h1-",
            source,
        }
    }

    #[test]
    fn text_logs_on_a_state_file() {
        let source = Source::File(Path::new("/tmp/r1/state.json"));
        let cmd = agent(&source).command(Path::new("/bin/overlay-agent"), LogFormat::Text);
        assert_eq!(cmd.get_program(), "/bin/overlay-agent");
        assert_eq!(
            args(&cmd),
            [
                "run",
                "--host",
                "h1",
                "--uplink",
                "eth0",
                "--vtep",
                "198.18.0.1",
                "--netns",
                "r1-h1",
                "--pin-dir",
                "/sys/fs/bpf/r1/h1",
                "--state-dir",
                "/tmp/r1/state-h1",
                "--netns-prefix",
                "r1-h1-",
                "--state-file",
                "/tmp/r1/state.json",
            ]
        );
        let env: Vec<_> = cmd.get_envs().collect();
        assert_eq!(
            env,
            [(
                std::ffi::OsStr::new("OVERLAY_LOG"),
                Some(std::ffi::OsStr::new("info,netlink_packet_route=error"))
            )]
        );
    }

    #[test]
    fn json_logs_on_etcd() {
        let source = Source::Etcd("http://198.18.0.254:2379");
        let args = args(&agent(&source).command(Path::new("overlay-agent"), LogFormat::Json));
        // The log format is the binary's option, so it comes before the subcommand.
        assert_eq!(args[..3], ["--log-format", "json", "run"]);
        assert_eq!(args[args.len() - 2..], ["--etcd-endpoints", "http://198.18.0.254:2379"]);
        assert!(!args.iter().any(|a| a == "--state-file"));
    }
}
