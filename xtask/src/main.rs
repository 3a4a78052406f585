//! `cargo xtask`: build, test and benchmark the overlay.
//!
//! - `build`: the agent and CLI (the agent embeds the eBPF object its build script compiles).
//! - `test`: unit tests and the privileged suites (namespaces, BPF programs, etcd).
//!
//! Builds run as the caller; what needs root (the test binaries, the demo, the bench) runs as
//! root: directly when xtask is run as root, else through `sudo -E`. Without either, the
//! privileged tests say "skipping: ..." and pass, so xtask says so loudly.
//! - `demo`: the main job (three simulated hosts, etcd, two networks, the CLI).
//! - `lint`: rustfmt --check and clippy -D warnings on every crate, the eBPF one included.
//! - `bench`: the latency/throughput harness (three topologies, one run).
//! - `fuzz`: the fuzz suite alone, as long as asked (`--frames N` per program, `--seed S`).

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
    Demo {
        /// The same with Docker: a dockerd per host, the agents as its network and IPAM plugin.
        #[arg(long)]
        docker: bool,
    },
    /// Check formatting and lints: rustfmt --check and clippy with warnings denied, on every
    /// crate (the eBPF crate with nightly for the BPF target).
    Lint,
    /// Run the fuzz suite alone, longer than the test run does: N generated frames through each
    /// program (BPF_PROG_TEST_RUN), from seed S (default: from the clock; a failure prints the
    /// seed and the frame to run again).
    Fuzz {
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        #[arg(long)]
        seed: Option<u64>,
    },
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

/// The workspace `cargo xtask` was run in. `cargo run` says at run time which package it ran
/// (CARGO_MANIFEST_DIR in the environment): worktrees sharing one target directory share one
/// xtask binary, whose compile-time path would name whichever tree built it.
fn root() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.parent().expect("workspace root").to_path_buf()
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
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// How the privileged programs (tests, demo, bench) are run: directly when xtask runs as root;
/// otherwise through `sudo -E`, so the build stays the user's and only what needs root gets it
/// (as aya's template does). None when neither is possible.
fn elevation() -> Option<Vec<&'static str>> {
    if is_root() {
        Some(vec![])
    } else if Command::new("sudo").arg("--version").output().is_ok_and(|o| o.status.success()) {
        Some(vec!["sudo", "-E"])
    } else {
        None
    }
}

/// `program`, run as root (see `elevation`).
fn privileged(program: &Path) -> anyhow::Result<Command> {
    let Some(prefix) = elevation() else {
        bail!("{} needs root: run this as root, or install sudo", program.display());
    };
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.current_dir(root());
    Ok(cmd)
}

/// The host's target triple, for cargo's `CARGO_TARGET_<TRIPLE>_RUNNER`.
fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc").arg("-vV").output().context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host triple")
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "overlay-agent", "--package", "overlay-cni", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// `cargo test` with `cargo_args` (which tests), the agent built for the suites, as root where
/// possible (see `elevation`), `args` passed on to the test binaries.
fn test_command(cargo_args: &[&str], args: &[String]) -> anyhow::Result<Command> {
    let bins = build(false)?;
    let mut cmd = cargo();
    cmd.args(["test", "--no-fail-fast"]).args(cargo_args).env("OVERLAY_BIN_DIR", &bins);
    match elevation() {
        // Run as root, every test must run: a missing tool fails the test that needs
        // it instead of letting it skip.
        Some(prefix) => {
            cmd.env("OVERLAY_TESTS_REQUIRE_ALL", "1");
            if !prefix.is_empty() {
                let var = format!("CARGO_TARGET_{}_RUNNER", host_triple()?.to_uppercase().replace('-', "_"));
                cmd.env(var, prefix.join(" "));
            }
        }
        None => eprintln!(
            "xtask: NOT ROOT and no sudo: the privileged tests (namespaces, BPF, end to end) \
             will print 'skipping: ...' and not run. Run `cargo xtask test` as root to run them."
        ),
    }
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    Ok(cmd)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Build { release } => {
            let dir = build(release)?;
            println!("built {}", dir.join("overlay-agent").display());
            Ok(())
        }
        Cmd::Test { args } => status(&mut test_command(&[], &args)?),
        Cmd::Fuzz { frames, seed } => {
            let mut cmd =
                test_command(&["--package", "overlay-tests", "--test", "fuzz"], &["--nocapture".into()])?;
            cmd.env("OVERLAY_FUZZ_FRAMES", frames.to_string());
            if let Some(seed) = seed {
                cmd.env("OVERLAY_FUZZ_SEED", seed.to_string());
            }
            status(&mut cmd)
        }
        Cmd::Demo { docker } => {
            let bins = build(false)?;
            status(cargo().args([
                "build",
                "--quiet",
                "--package",
                "overlay-tests",
                "--bin",
                "overlay-demo",
            ]))?;
            let mut demo = privileged(&bins.join("overlay-demo"))?;
            if docker {
                demo.arg("--docker");
            }
            status(demo.env("OVERLAY_BIN_DIR", &bins))
        }
        Cmd::Lint => {
            status(cargo().args(["fmt", "--all", "--", "--check"]))?;
            // Every host crate (the workspace's default members), tests and benches included.
            status(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            // The eBPF crate only builds for the BPF target, with nightly's build-std, as
            // overlay-agent's build script builds it.
            // rustup's proxy picks nightly; the variables cargo set for xtask name stable's tools.
            status(
                Command::new("rustup")
                    .current_dir(root().join("overlay-ebpf"))
                    .env_remove("RUSTC")
                    .env_remove("RUSTUP_TOOLCHAIN")
                    .env_remove("CARGO")
                    .args([
                        "run",
                        "nightly",
                        "cargo",
                        "clippy",
                        "--target",
                        "bpfel-unknown-none",
                        "-Z",
                        "build-std=core",
                        "--release",
                        "--",
                        "-D",
                        "warnings",
                    ]),
            )
        }
        Cmd::Bench { args } => {
            let bins = build(true)?;
            // The names stage runs the tests' probe in the containers.
            status(cargo().args(["build", "--quiet", "--release", "--package", "overlay-bench"]))?;
            status(cargo().args([
                "build",
                "--quiet",
                "--release",
                "--package",
                "overlay-tests",
                "--bin",
                "overlay-probe",
            ]))?;
            status(privileged(&bins.join("overlay-bench"))?.args(&args).env("OVERLAY_BIN_DIR", &bins))
        }
    }
}
