//! Standard output of the CLI. A reader that goes away early (`overlay container ls | head -1`)
//! ends the output, not the command: `println!` would panic on the closed pipe (Rust ignores
//! SIGPIPE, so the write fails with EPIPE), and restoring SIGPIPE's default instead would let
//! the signal kill the CLI in the middle of an etcd transaction or of a multi-target `rm`.

use std::{
    fmt::Display,
    io::{self, Write as _},
    sync::atomic::{AtomicBool, Ordering},
};

/// Set once standard output's reader is gone; later output is dropped without trying.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Prints `line` and a newline. A closed pipe is not an error: whoever read the output has
/// all they wanted, and the command carries on (its effect on the store does not depend on
/// being watched). Other write errors (a full disk behind a redirect) are returned.
pub fn say(line: impl Display) -> io::Result<()> {
    if CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        other => other,
    }
}
