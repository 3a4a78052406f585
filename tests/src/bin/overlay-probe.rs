//! overlay-probe: traffic for the end-to-end tests, with answers a test can assert on.
//!
//! Runs inside a container namespace (`ip netns exec <ns> overlay-probe ...`):
//! - `serve PORT`: TCP echo (every connection) and UDP echo on PORT, forever.
//! - `tcp IP:PORT` / `udp IP:PORT`: one request, exit 0 iff the echo came back in time.
//! - `sink PORT`: print "listening" once the port is bound, accept one TCP connection, read to
//!   EOF, print "<bytes> <sha256>". A sender waits for the first line instead of guessing.
//! - `send IP:PORT BYTES`: send BYTES of deterministic data, print "<bytes> <sha256>".
//! - `session IP:PORT SECONDS`: one TCP connection, a numbered echo every 10 ms for SECONDS;
//!   prints "<round trips> <longest gap ms>", exit 1 if the connection broke.
//! - `frame IFACE HEX`: send one raw Ethernet frame (given in hex) out of IFACE on a packet
//!   socket, as a process with CAP_NET_RAW in a container can: for frames no socket API makes.
//! - `tos PORT SECONDS`: print "listening" once UDP PORT is bound, then for every datagram
//!   received within SECONDS one line "<TOS byte in hex> <payload>" (the TOS as the receiving
//!   stack saw it, IP_RECVTOS): what a container's application gets, ECN marks included.
//! - `give PORT BYTES`: print "listening" once bound, accept one TCP connection, send BYTES of
//!   the same data as `send`, print "<bytes> <sha256>"; `fetch IP:PORT`: connect, read to EOF,
//!   print "<bytes> <sha256>" (a download, for a client that cannot be connected to).
//! - `peer PORT LABEL`: answer every TCP connection and UDP datagram on PORT with
//!   "LABEL <the peer's address>" (who is there, and whom it sees); `ask IP:PORT tcp|udp`:
//!   print that answer.
//! - `datagram IP:PORT BYTES want|probe|omit`: `udp` with a BYTES-long datagram, sent by a
//!   socket whose IP_MTU_DISCOVER is IP_PMTUDISC_WANT (the default: sized by the route,
//!   fragmented where larger), IP_PMTUDISC_PROBE (DF, sized by the interface only, as tracepath
//!   and QUIC stacks probing the path send) or IP_PMTUDISC_OMIT (no DF, sized by the interface,
//!   as DNS servers send); exit 0 iff the same bytes came back, 1 with the socket's error
//!   (an ICMP error the kernel took for it) or with none.
//! - `dns-serve`, `dns-query`, `dns-raw`: an upstream DNS server and a DNS client; `dns-bench`,
//!   `dns-wait`: the name benchmark's clients (probe/dns.rs).

#[path = "../probe/dns.rs"]
mod dns;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

const TIMEOUT: Duration = Duration::from_millis(1500);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", port] => serve(port.parse().expect("port")),
        ["tcp", to] => tcp(to.parse().expect("address")),
        ["udp", to] => udp(to.parse().expect("address")),
        ["datagram", to, bytes, mode] => {
            datagram(to.parse().expect("address"), bytes.parse().expect("bytes"), mode)
        }
        ["sink", port] => sink(port.parse().expect("port")),
        ["send", to, bytes] => send(to.parse().expect("address"), bytes.parse().expect("bytes")),
        ["session", to, secs] => session(to.parse().expect("address"), secs.parse().expect("seconds")),
        ["frame", iface, hex] => frame(iface, hex),
        ["give", port, bytes] => give(port.parse().expect("port"), bytes.parse().expect("bytes")),
        ["fetch", from] => fetch(from.parse().expect("address")),
        ["peer", port, label] => peer(port.parse().expect("port"), label),
        ["ask", to, "tcp"] => ask(to.parse().expect("address"), false),
        ["ask", to, "udp"] => ask(to.parse().expect("address"), true),
        ["tos", port, secs] => tos(port.parse().expect("port"), secs.parse().expect("seconds")),
        ["dns-serve", addr] => dns::serve(addr.parse().expect("IP:PORT")),
        ["dns-query", server, name, qtype] => dns::query(server, name, qtype, false),
        ["dns-query", server, name, qtype, "tcp"] => dns::query(server, name, qtype, true),
        ["dns-raw", server, hex] => dns::raw(server, hex, false),
        ["dns-raw", server, hex, "tcp"] => dns::raw(server, hex, true),
        ["dns-bench", server, name, count, window] => {
            dns::bench(server, name, count.parse().expect("count"), window.parse().expect("window"))
        }
        ["dns-wait", server, name, ms] => dns::wait(server, name, ms.parse().expect("milliseconds")),
        _ => Err(
            "usage: overlay-probe serve|tcp|udp|sink|send|session|frame|tos|dns-serve|dns-query|dns-raw ..."
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("overlay-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result = std::result::Result<(), String>;

fn serve(port: u16) -> Result {
    let udp = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    let tcp = TcpListener::bind(("0.0.0.0", port)).map_err(|e| e.to_string())?;
    for conn in tcp.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut writer = conn;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if writer.write_all(line.as_bytes()).is_err() {
                    break;
                }
                line.clear();
            }
        });
    }
    Ok(())
}

fn tcp(to: SocketAddr) -> Result {
    let mut conn = TcpStream::connect_timeout(&to, TIMEOUT).map_err(|e| format!("connect {to}: {e}"))?;
    conn.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    conn.write_all(b"hello over tcp\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).map_err(|e| format!("reading echo from {to}: {e}"))?;
    if line == "hello over tcp\n" { Ok(()) } else { Err(format!("bad echo from {to}: {line:?}")) }
}

fn udp(to: SocketAddr) -> Result {
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(300))).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = [0u8; 64];
    // UDP may lose the first datagram while neighbours resolve; retry until the deadline.
    while Instant::now() < deadline {
        sock.send_to(b"hello over udp", to).map_err(|e| e.to_string())?;
        if let Ok((n, from)) = sock.recv_from(&mut buf)
            && from == to
            && &buf[..n] == b"hello over udp"
        {
            return Ok(());
        }
    }
    Err(format!("no UDP echo from {to}"))
}

fn datagram(to: SocketAddr, bytes: usize, mode: &str) -> Result {
    use std::os::fd::AsRawFd;
    let discover = match mode {
        "want" => libc::IP_PMTUDISC_WANT,
        "probe" => libc::IP_PMTUDISC_PROBE,
        "omit" => libc::IP_PMTUDISC_OMIT,
        _ => return Err(format!("mode {mode:?}: want, probe or omit")),
    };
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    // SAFETY: setsockopt on a socket we own, with a c_int of the size passed.
    let set = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const discover).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(format!("IP_MTU_DISCOVER: {}", std::io::Error::last_os_error()));
    }
    // Connected, as an application that wants to hear of ICMP errors without IP_RECVERR.
    sock.connect(to).map_err(|e| format!("connect {to}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(300))).map_err(|e| e.to_string())?;
    let payload: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        sock.send(&payload).map_err(|e| format!("sending {bytes} bytes: {e}"))?;
        match sock.recv(&mut buf) {
            Ok(n) if buf[..n] == payload[..] => return Ok(()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            // An ICMP error the kernel took for this socket (EMSGSIZE for "fragmentation
            // needed"): what the application hears.
            Err(e) => return Err(format!("after sending {bytes} bytes: {e}")),
        }
    }
    Err(format!("no echo of {bytes} bytes from {to}"))
}

fn sink(port: u16) -> Result {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| e.to_string())?;
    println!("listening");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = conn.read(&mut buf).map_err(|e| format!("after {total} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
    println!("{total} {:x}", hash.finalize());
    Ok(())
}

/// Deterministic, incompressible data: xorshift64.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

fn send(to: SocketAddr, bytes: u64) -> Result {
    let mut conn = TcpStream::connect_timeout(&to, TIMEOUT).map_err(|e| format!("connect {to}: {e}"))?;
    let mut hash = Sha256::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut buf[..n], &mut state);
        conn.write_all(&buf[..n]).map_err(|e| format!("after {} bytes: {e}", bytes - left))?;
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    conn.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
    // Wait for the sink to close, so the bytes are known to have arrived.
    let _ = conn.read(&mut buf);
    println!("{bytes} {:x}", hash.finalize());
    Ok(())
}

fn give(port: u16, bytes: u64) -> Result {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| e.to_string())?;
    println!("listening");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
    let mut hash = Sha256::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut buf[..n], &mut state);
        conn.write_all(&buf[..n]).map_err(|e| format!("after {} bytes: {e}", bytes - left))?;
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    conn.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
    println!("{bytes} {:x}", hash.finalize());
    Ok(())
}

fn fetch(from: SocketAddr) -> Result {
    let mut conn = TcpStream::connect_timeout(&from, TIMEOUT).map_err(|e| format!("connect {from}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = conn.read(&mut buf).map_err(|e| format!("after {total} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
    println!("{total} {:x}", hash.finalize());
    Ok(())
}

fn peer(port: u16, label: &str) -> Result {
    let udp = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| e.to_string())?;
    let tag = label.to_owned();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{tag} {}\n", from.ip()).as_bytes(), from);
        }
    });
    let tcp = TcpListener::bind(("0.0.0.0", port)).map_err(|e| e.to_string())?;
    for mut conn in tcp.incoming().flatten() {
        if let Ok(from) = conn.peer_addr() {
            let _ = conn.write_all(format!("{label} {}\n", from.ip()).as_bytes());
        }
    }
    Ok(())
}

fn ask(to: SocketAddr, udp: bool) -> Result {
    let answer = if udp {
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_millis(300))).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; 256];
        let mut got = None;
        while got.is_none() && Instant::now() < deadline {
            sock.send_to(b"?", to).map_err(|e| e.to_string())?;
            if let Ok((n, from)) = sock.recv_from(&mut buf)
                && from == to
            {
                got = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got.ok_or_else(|| format!("no UDP answer from {to}"))?
    } else {
        let conn = TcpStream::connect_timeout(&to, TIMEOUT).map_err(|e| format!("connect {to}: {e}"))?;
        conn.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).map_err(|e| format!("reading from {to}: {e}"))?;
        line
    };
    print!("{answer}");
    Ok(())
}

fn session(to: SocketAddr, secs: u64) -> Result {
    let conn = TcpStream::connect_timeout(&to, TIMEOUT).map_err(|e| format!("connect {to}: {e}"))?;
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    // Longer than any pause the test provokes: a stalled connection is reported, not hung.
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let mut writer = conn;
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut trips, mut gap, mut last) = (0u64, Duration::ZERO, Instant::now());
    let mut line = String::new();
    while Instant::now() < end {
        let msg = format!("{trips}\n");
        writer
            .write_all(msg.as_bytes())
            .map_err(|e| format!("connection broke after {trips} round trips: {e}"))?;
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("connection broke after {trips} round trips: {e}"))?;
        if n == 0 || line != msg {
            return Err(format!("connection broke after {trips} round trips (got {line:?})"));
        }
        trips += 1;
        gap = gap.max(last.elapsed());
        last = Instant::now();
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("{trips} {}", gap.as_millis());
    Ok(())
}

fn frame(iface: &str, hex: &str) -> Result {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16).map_err(|e| e.to_string()))
        .collect::<std::result::Result<_, _>>()?;
    let name = std::ffi::CString::new(iface).map_err(|e| e.to_string())?;
    // SAFETY: plain libc calls on a socket this function owns and closes; the address and the
    // frame are valid for the lengths given.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        if ifindex == 0 {
            return Err(format!("no interface {iface}"));
        }
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&bytes[..6]);
        let sent = libc::sendto(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if sent < 0 { Err(err.to_string()) } else { Ok(()) }
    }
}

fn tos(port: u16, secs: u64) -> Result {
    use std::os::fd::AsRawFd;
    let sock = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| e.to_string())?;
    let fd = sock.as_raw_fd();
    let on: libc::c_int = 1;
    // SAFETY: a valid option value of the stated length on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_RECVTOS,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        return Err(format!("IP_RECVTOS: {}", std::io::Error::last_os_error()));
    }
    println!("listening");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_secs(secs);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2048];
        let mut control = [0u64; 16];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: msghdr is plain data; all zero is a valid start, filled in below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: the buffers named in msg are valid for the lengths given.
        let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                continue;
            }
            return Err(err.to_string());
        }
        let mut tos = None;
        // SAFETY: walking the control messages the kernel wrote into `control`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TOS {
                    tos = Some(*libc::CMSG_DATA(c));
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        let tos = tos.ok_or("no IP_TOS control message")?;
        println!("{tos:#04x} {}", String::from_utf8_lossy(&buf[..n as usize]));
        std::io::stdout().flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}
