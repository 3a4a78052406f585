//! A ping running for the length of a fault: `ping -i 0.01` (100 a second) from a namespace,
//! stopped with SIGINT, whose summary says how many answers were lost. The tests of control-plane
//! faults assert that running containers lose nothing while the control plane is away.

use std::{
    net::Ipv4Addr,
    process::{Child, Stdio},
};

use crate::in_ns;

pub struct Ping {
    child: Option<Child>,
    what: String,
}

/// What a ping saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    pub sent: u64,
    pub received: u64,
}

impl Loss {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

impl Ping {
    /// Starts pinging `to` from namespace `ns` every 10 ms (each answer awaited up to 1 s).
    pub fn start(ns: &str, to: Ipv4Addr) -> Self {
        let child = in_ns(ns, &["ping", "-q", "-i", "0.01", "-W", "1", &to.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ping");
        Self { child: Some(child), what: format!("{ns} -> {to}") }
    }

    /// Stops it (SIGINT, as ^C) and reads its summary.
    pub fn stop(mut self) -> Loss {
        let child = self.child.take().expect("running");
        // SAFETY: signalling our own child (`ip netns exec` execs ping: the pid is ping's).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let out = child.wait_with_output().expect("ping");
        let text = String::from_utf8_lossy(&out.stdout);
        parse(&text).unwrap_or_else(|| panic!("no summary from ping {}: {text}", self.what))
    }
}

impl Drop for Ping {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// "1500 packets transmitted, 1498 received, ..." -> (1500, 1498).
fn parse(summary: &str) -> Option<Loss> {
    let line = summary.lines().find(|l| l.contains("packets transmitted"))?;
    let mut numbers = line.split(',').map(|part| part.split_whitespace().next().and_then(|n| n.parse().ok()));
    Some(Loss { sent: numbers.next()??, received: numbers.next()?? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_parses() {
        let s = "--- 10.0.0.3 ping statistics ---\n2000 packets transmitted, 1990 received, 0.5% packet loss, time 20012ms\n";
        assert_eq!(parse(s), Some(Loss { sent: 2000, received: 1990 }));
        assert_eq!(parse(s).unwrap().lost(), 10);
        assert_eq!(parse("nothing"), None);
    }
}
