//! Peers that name themselves: `overlay-probe peer PORT NAME` answers each TCP connection and
//! UDP datagram on PORT with "NAME <client address>", and `overlay-probe ask` asks one. What a
//! test learns from an answer is which container a published port led to, and whether the
//! container saw the client's own address (not a NAT's).

use std::process::{Output, Stdio};

use crate::{Proc, binary, in_ns, try_sh};

/// `overlay-probe ARGS` in `ns`, given 20 seconds.
pub fn probe(ns: &str, args: &[&str]) -> Output {
    let probe = binary("overlay-probe");
    let mut cmd = in_ns(ns, &["timeout", "20", probe.to_str().expect("path")]);
    try_sh(cmd.args(args))
}

/// `overlay-probe ask TO tcp|udp` from `ns`: the answer line, or None.
pub fn ask(ns: &str, to: &str, proto: &str) -> Option<String> {
    let out = probe(ns, &["ask", to, proto]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Starts `overlay-probe ARGS` in `ns` in the background (`peer PORT NAME` for a peer).
pub fn serve(ns: &str, name: &str, args: &[&str]) -> Proc {
    let probe = binary("overlay-probe");
    let mut cmd = in_ns(ns, &[probe.to_str().expect("path")]);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::null());
    Proc::spawn(name, &mut cmd)
}
