//! overlay-cni: the overlay's CNI plugin (CNI spec 1.0/1.1). A runtime (containerd's CRI,
//! CRI-O, podman, cnitool) runs it with CNI_* variables and the network configuration on
//! stdin; it answers VERSION itself and hands every other command to the host's agent
//! (`overlay-agent run --cni-socket`), which holds the store and makes the interfaces, then
//! prints the agent's answer: a result, nothing, or a CNI error with a non-zero exit.
//!
//! The agent's socket is the netconf's `agentSocket`, by default [`DEFAULT_SOCKET`]. An agent
//! that does not answer is CNI error 11 ("try again later"; for STATUS, 50 "not available").
//! docs/cni.md has the rest.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    process::ExitCode,
    time::Duration,
};

use serde_json::{Value, json};

/// Where the agent answers unless the netconf says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/overlay-ebpf/cni.sock";
/// The versions this plugin speaks; the agent's list (`overlay_agent::cni::types`) is the same,
/// which the CNI suite checks.
const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Longer than the agent's own wait for an interface (30 s), so its error arrives first.
const TIMEOUT: Duration = Duration::from_mins(1);

/// CNI's error codes used here (spec: "Error").
const DECODE: u32 = 6;
const INVALID_ENVIRONMENT: u32 = 4;
const TRY_AGAIN_LATER: u32 = 11;
const NOT_AVAILABLE: u32 = 50;

fn main() -> ExitCode {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let mut stdin = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut stdin) {
        return print(Err(error("", DECODE, format!("reading the network configuration from stdin: {e}"))));
    }
    let command = var("CNI_COMMAND");
    let env = [
        ("command", command.clone()),
        ("container_id", var("CNI_CONTAINERID")),
        ("netns", var("CNI_NETNS")),
        ("ifname", var("CNI_IFNAME")),
        ("args", var("CNI_ARGS")),
    ];
    print(run(&command, &stdin, &env))
}

/// What the plugin prints for one invocation: a result (None: nothing) or a CNI error.
fn run(command: &str, stdin: &str, env: &[(&str, String)]) -> Result<Option<Value>, Value> {
    let config: Option<Value> = serde_json::from_str(stdin).ok();
    let version = config
        .as_ref()
        .and_then(|c| c.get("cniVersion"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if command == "VERSION" {
        let version = if version.is_empty() { "1.1.0" } else { &version };
        return Ok(Some(json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})));
    }
    if command.is_empty() {
        return Err(error(&version, INVALID_ENVIRONMENT, "CNI_COMMAND is not set".into()));
    }
    let config = match serde_json::from_str::<Value>(stdin) {
        Ok(c) if c.is_object() => c,
        Ok(_) => {
            return Err(error(
                &version,
                DECODE,
                "the network configuration on stdin is not a JSON object".into(),
            ));
        }
        Err(e) => {
            return Err(error(
                &version,
                DECODE,
                format!("the network configuration on stdin does not parse: {e}"),
            ));
        }
    };
    let socket = config.get("agentSocket").and_then(Value::as_str).unwrap_or(DEFAULT_SOCKET).to_owned();
    let mut request: serde_json::Map<String, Value> =
        env.iter().map(|(k, v)| ((*k).to_owned(), Value::String(v.clone()))).collect();
    request.insert("config".into(), config);
    match call(&socket, &Value::Object(request).to_string()) {
        Ok((200, body)) if body.trim().is_empty() => Ok(None),
        Ok((200, body)) => serde_json::from_str(&body)
            .map(Some)
            .map_err(|e| error(&version, DECODE, format!("the agent's answer does not parse: {e}"))),
        Ok((_, body)) => Err(serde_json::from_str(&body)
            .unwrap_or_else(|_| error(&version, TRY_AGAIN_LATER, format!("the agent answered: {body}")))),
        Err(e) => {
            let code = if command == "STATUS" { NOT_AVAILABLE } else { TRY_AGAIN_LATER };
            Err(error(
                &version,
                code,
                format!(
                    "the overlay agent does not answer at {socket} ({e}): is overlay-agent running on this host with --cni-socket {socket}?"
                ),
            ))
        }
    }
}

/// One `POST /cni` on the agent's socket: the HTTP status and the body.
fn call(socket: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "POST /cni HTTP/1.1\r\nHost: overlay-agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    parse_response(&String::from_utf8_lossy(&answer))
}

/// The status and body of an HTTP/1.1 response with a Content-Length (what the agent sends).
fn parse_response(text: &str) -> std::io::Result<(u16, String)> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
    });
    let body = length.and_then(|n| body.get(..n)).unwrap_or(body);
    Ok((status, body.to_owned()))
}

fn error(version: &str, code: u32, msg: String) -> Value {
    let version = if SUPPORTED_VERSIONS.contains(&version) { version } else { "1.1.0" };
    json!({"cniVersion": version, "code": code, "msg": msg})
}

/// Prints the answer and says how to exit: CNI wants errors on stdout too.
fn print(answer: Result<Option<Value>, Value>) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let (value, code) = match answer {
        Ok(None) => return ExitCode::SUCCESS,
        Ok(Some(v)) => (v, ExitCode::SUCCESS),
        Err(e) => (e, ExitCode::FAILURE),
    };
    let _ = writeln!(out, "{value}");
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Vec<(&'static str, String)> {
        vec![("command", command.to_owned())]
    }

    #[test]
    fn version_is_answered_without_the_agent() {
        let out = run("VERSION", r#"{"cniVersion":"1.0.0"}"#, &env("VERSION")).unwrap().unwrap();
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(out["supportedVersions"], json!(SUPPORTED_VERSIONS));
        // Some runtimes send nothing for VERSION.
        assert_eq!(run("VERSION", "", &env("VERSION")).unwrap().unwrap()["cniVersion"], "1.1.0");
    }

    #[test]
    fn an_absent_agent_is_try_again_later() {
        let conf = r#"{"cniVersion":"1.0.0","name":"n","agentSocket":"/nonexistent/cni.sock"}"#;
        let e = run("ADD", conf, &env("ADD")).unwrap_err();
        assert_eq!(e["code"], 11);
        assert_eq!(e["cniVersion"], "1.0.0");
        assert!(e["msg"].as_str().unwrap().contains("/nonexistent/cni.sock"), "{e}");
        let conf11 = r#"{"cniVersion":"1.1.0","name":"n","agentSocket":"/nonexistent/cni.sock"}"#;
        assert_eq!(run("STATUS", conf11, &env("STATUS")).unwrap_err()["code"], 50);
    }

    #[test]
    fn bad_input_is_refused_before_calling_anyone() {
        assert_eq!(run("ADD", "{", &env("ADD")).unwrap_err()["code"], 6);
        assert_eq!(run("ADD", "[1]", &env("ADD")).unwrap_err()["code"], 6);
        assert_eq!(run("", "{}", &env("")).unwrap_err()["code"], 4);
    }

    #[test]
    fn responses_parse() {
        let r = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r).unwrap(), (400, "{}".to_owned()));
        let empty = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(parse_response(empty).unwrap(), (200, String::new()));
        assert!(parse_response("garbage").is_err());
    }
}
