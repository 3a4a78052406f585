//! The CNI plugin run as a runtime runs it: `overlay-cni` started in a host's namespace with
//! the CNI_* variables and the network configuration on stdin, its stdout read back as JSON.
//! For the CNI suite (tests/tests/cni.rs), and the runtimes' suites that compare with it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{Run, Starting, binary};

/// The agent's CNI socket for `host` in this run.
pub fn socket(run: &Run, host: &str) -> PathBuf {
    run.path(&format!("cni-{host}.sock"))
}

/// A network configuration as a runtime writes it for one plugin (the conflist's entry with the
/// list's `name` and `cniVersion` put in): `name` is the overlay network.
pub fn netconf(version: &str, network: &str, socket: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": network,
        "type": "overlay-cni",
        "agentSocket": socket,
    })
}

/// What one invocation of the plugin gave.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub stdout: String,
    /// stdout as JSON (Null when empty or not JSON).
    pub json: Value,
}

impl Outcome {
    /// The CNI error code of a failed invocation (0 when it succeeded or printed none).
    pub fn code(&self) -> u64 {
        self.json["code"].as_u64().unwrap_or(0)
    }

    pub fn msg(&self) -> &str {
        self.json["msg"].as_str().unwrap_or_default()
    }
}

/// One invocation's environment.
#[derive(Clone, Debug, Default)]
pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub args: &'a str,
}

/// Runs `overlay-cni` in namespace `host_ns` (where a runtime on that host runs it) with the
/// call's variables and `conf` on stdin.
pub fn invoke(host_ns: &str, call: &Call<'_>, conf: &Value) -> Outcome {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", host_ns])
        .arg(binary("overlay-cni"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_ARGS", call.args)
        .env("CNI_PATH", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = {
        let _running = Starting::enter();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting overlay-cni: {e}"));
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(conf.to_string().as_bytes()).expect("writing the netconf");
        drop(stdin);
        child.wait_with_output().expect("overlay-cni")
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    Outcome { ok: out.status.success(), stdout, json }
}

/// The source of `libcni-run` (tests/libcni): a client on libcni, with cnitool's command line.
const LIBCNI_RUN_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/libcni");
/// Where Debian's golang-github-appc-cni-dev puts libcni's source.
pub const GOCODE: &str = "/usr/share/gocode";

/// Why `libcni-run` cannot be built here, if it cannot.
pub fn libcni_missing() -> Option<String> {
    let libcni = Path::new(GOCODE).join("src/github.com/containernetworking/cni/libcni");
    if sh_ok(Command::new("go").arg("version")).is_none() {
        Some("no go (install golang-go, or run ./setup)".into())
    } else if !libcni.is_dir() {
        Some(format!("no {} (install golang-github-appc-cni-dev, or run ./setup)", libcni.display()))
    } else {
        None
    }
}

fn sh_ok(cmd: &mut Command) -> Option<()> {
    cmd.output().ok().filter(|o| o.status.success()).map(drop)
}

/// Builds `libcni-run` into the run's directory, offline (GOPATH mode on Debian's sources, the
/// build cache in the run's directory too): its path.
pub fn build_libcni_run(run: &Run) -> anyhow::Result<PathBuf> {
    let out = run.path("libcni-run");
    crate::sh_result(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(LIBCNI_RUN_SRC)
            .env("GO111MODULE", "off")
            .env("GOPATH", GOCODE)
            .env("GOCACHE", run.path("go-cache"))
            .env("GOFLAGS", "")
            .env("GOPROXY", "off"),
    )?;
    Ok(out)
}
