//! `cargo xtask`: build, test and benchmark the overlay.
//!
//! - `build`: the agent and CLI (the agent embeds the eBPF object its build script compiles).
//! - `test`: unit tests and the privileged suites (namespaces, BPF programs, etcd). Run as
//!   root; without root the privileged tests say "skipping: ..." and pass, so say it loudly.
//! - `demo`: the main job (three simulated hosts, etcd, two networks, the CLI).
//! - `bench`: the latency/throughput harness (three topologies, one run).

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the agent (with its eBPF object) and the CLI.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests and the privileged end-to-end suites.
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The main job: etcd, three simulated hosts with an agent each, two networks, containers
    /// reaching each other across hosts and not across networks; cleans up after itself.
    Demo,
    /// Run the benchmark harness (arguments go to overlay-bench; try --help).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "overlay-agent", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Build { release } => {
            let dir = build(release)?;
            println!("built {}", dir.join("overlay-agent").display());
            Ok(())
        }
        Cmd::Test { args } => {
            let bins = build(false)?;
            if !is_root() {
                eprintln!(
                    "xtask: NOT ROOT: the privileged tests (namespaces, BPF, end to end) will print \
                     'skipping: ...' and not run. Run `sudo -E cargo xtask test` to run them."
                );
            }
            let mut cmd = cargo();
            cmd.args(["test", "--no-fail-fast"]).env("OVERLAY_BIN_DIR", &bins);
            if !args.is_empty() {
                cmd.arg("--").args(&args);
            }
            status(&mut cmd)
        }
        Cmd::Demo => {
            let bins = build(false)?;
            status(cargo().args([
                "build",
                "--quiet",
                "--package",
                "overlay-tests",
                "--bin",
                "overlay-demo",
            ]))?;
            status(Command::new(bins.join("overlay-demo")).env("OVERLAY_BIN_DIR", &bins))
        }
        Cmd::Bench { args } => {
            let bins = build(true)?;
            let mut cmd = cargo();
            cmd.args(["run", "--release", "--package", "overlay-bench", "--"])
                .args(&args)
                .env("OVERLAY_BIN_DIR", &bins);
            status(&mut cmd)
        }
    }
}
