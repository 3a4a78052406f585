//! The traffic programs that run inside the container namespaces (the harness starts itself with
//! a hidden subcommand under `ip netns exec`). Each prints its result as one JSON line on stdout;
//! the long-running ones print `ready` first, once their socket is bound.
//!
//! Every loop is bounded in time: nothing here keeps sending after its deadline.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{icmp, sys::mono_ns};

fn ready() {
    println!("ready");
    let _ = std::io::stdout().flush();
}

fn emit<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Echo server for the request/response tests: TCP (one thread per connection) and UDP on the
/// same port number. Exits after `lifetime`, in case the harness that owns it is gone.
pub fn serve(port: u16, lifetime: Duration) -> anyhow::Result<()> {
    let tcp = TcpListener::bind(("0.0.0.0", port)).context("binding the TCP echo port")?;
    let udp = UdpSocket::bind(("0.0.0.0", port)).context("binding the UDP echo port")?;
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            std::thread::spawn(move || echo_tcp(stream));
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        }
    });
    ready();
    std::thread::sleep(lifetime);
    Ok(())
}

fn echo_tcp(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// What a request/response client measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct RrResult {
    /// Round-trip time of each measured request, nanoseconds, in order.
    pub rtt_ns: Vec<u64>,
    /// UDP requests that got no answer within the timeout (TCP cannot lose one).
    pub lost: u64,
}

/// Request/response client: `count` requests of `size` bytes, one at a time, each timed with the
/// monotonic clock from just before the send to just after the whole answer is read. The first
/// `warmup` requests are not recorded (ARP, TCP slow start, caches).
pub fn rr(
    proto: &str,
    to: SocketAddr,
    size: usize,
    count: usize,
    warmup: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let size = size.max(8);
    let mut rtt_ns = Vec::with_capacity(count);
    let mut lost = 0;
    let mut msg = vec![0u8; size];
    let mut answer = vec![0u8; size.max(2048)];
    match proto {
        "tcp" => {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .with_context(|| format!("connecting to {to}"))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            for i in 0..warmup + count {
                msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let t = Instant::now();
                s.write_all(&msg)?;
                s.read_exact(&mut answer[..size]).context("reading the echo")?;
                let dt = t.elapsed();
                if i >= warmup {
                    rtt_ns.push(dt.as_nanos() as u64);
                }
            }
        }
        "udp" => {
            let s = UdpSocket::bind(("0.0.0.0", 0))?;
            s.connect(to)?;
            s.set_read_timeout(Some(timeout))?;
            for i in 0..warmup + count {
                let seq = i as u64;
                msg[..8].copy_from_slice(&seq.to_le_bytes());
                let t = Instant::now();
                s.send(&msg)?;
                // Skip late answers to earlier requests; a timeout is a lost request.
                let answered = loop {
                    match s.recv(&mut answer) {
                        Ok(n) if n >= 8 && answer[..8] == seq.to_le_bytes() => break true,
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            break false;
                        }
                        Err(e) => return Err(e).context("receiving the echo"),
                    }
                };
                let dt = t.elapsed();
                if i >= warmup {
                    if answered {
                        rtt_ns.push(dt.as_nanos() as u64);
                    } else {
                        lost += 1;
                    }
                }
            }
        }
        other => bail!("unknown protocol {other}"),
    }
    emit(&RrResult { rtt_ns, lost })
}

/// What the UDP sink counted.
#[derive(Debug, Serialize, Deserialize)]
pub struct SinkResult {
    /// Datagrams received inside the measured window.
    pub packets: u64,
    /// Length of the measured window, seconds.
    pub secs: f64,
    /// Datagrams received in all, warm-up included.
    pub total_packets: u64,
}

/// UDP sink: waits for the first datagram, lets `warmup` pass, then counts what arrives during
/// `secs`; then drains what is still coming until the sender stops (so the CPU cost can be set
/// against every packet received).
pub fn udp_sink(port: u16, secs: f64, warmup: Duration, first_timeout: Duration) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", port)).context("binding the sink port")?;
    // A deep receive queue, so short stalls of the reader do not turn into drops (as root,
    // SO_RCVBUFFORCE passes net.core.rmem_max).
    let size: libc::c_int = 16 << 20;
    // SAFETY: setsockopt with a pointer to a c_int we own.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    ready();
    let mut rx = Batch::new(64, 2048);
    let started = Instant::now();
    let mut total = 0u64;
    // Wait for the sender.
    while total == 0 {
        total += rx.recv(&sock)?;
        if total == 0 && started.elapsed() > first_timeout {
            return emit(&SinkResult { packets: 0, secs: 0.0, total_packets: 0 });
        }
    }
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        total += rx.recv(&sock)?;
    }
    let t0 = Instant::now();
    let window = Duration::from_secs_f64(secs);
    let mut packets = 0u64;
    while t0.elapsed() < window {
        packets += rx.recv(&sock)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    total += packets;
    // The rest, until 200 ms pass without a packet (bounded: the sender stops by itself).
    let mut quiet = 0;
    while quiet < 4 && t0.elapsed() < window + Duration::from_secs(30) {
        match rx.recv(&sock)? {
            0 => quiet += 1,
            n => {
                total += n;
                quiet = 0;
            }
        }
    }
    emit(&SinkResult { packets, secs, total_packets: total })
}

/// Buffers for recvmmsg(2): one syscall takes up to `n` datagrams.
struct Batch {
    bufs: Vec<Vec<u8>>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new(n: usize, size: usize) -> Self {
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; size]).collect();
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() })
            .collect();
        let msgs = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: an all-zero mmsghdr is a valid empty header.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        Self { bufs, iovs, msgs }
    }

    /// Datagrams received by one recvmmsg (0 on timeout).
    fn recv(&mut self, sock: &UdpSocket) -> anyhow::Result<u64> {
        debug_assert_eq!(self.bufs.len(), self.iovs.len());
        // SAFETY: msgs point into iovs and bufs, which live as long as self and are not moved.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                self.msgs.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e).context("recvmmsg"),
            };
        }
        Ok(n as u64)
    }
}

/// What the UDP sender sent.
#[derive(Debug, Serialize, Deserialize)]
pub struct FloodResult {
    pub sent: u64,
    pub secs: f64,
}

/// UDP sender: datagrams of `size` bytes to `to` for `secs`, as fast as it can (`pps` None, with
/// sendmmsg batches of 64) or paced to `pps` per second (batches every millisecond).
pub fn udp_flood(to: SocketAddr, size: usize, secs: f64, pps: Option<u64>) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
    sock.connect(to)?;
    let mut payload = vec![0x5au8; size];
    const BATCH: usize = 64;
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| {
            // SAFETY: an all-zero mmsghdr is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &raw mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut send = |n: usize| -> u64 {
        // SAFETY: every header points at `iov`, which points at `payload`; both outlive the call.
        let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, 0) };
        // ENOBUFS, or ECONNREFUSED once the sink has gone: keep going until the deadline.
        r.max(0) as u64
    };
    let t0 = Instant::now();
    let until = Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    match pps {
        None => {
            while t0.elapsed() < until {
                sent += send(BATCH);
            }
        }
        Some(rate) => {
            let tick = Duration::from_millis(1);
            let mut next = t0;
            while t0.elapsed() < until {
                let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
                while sent < due {
                    let n = ((due - sent) as usize).min(BATCH);
                    let k = send(n);
                    if k == 0 {
                        break;
                    }
                    sent += k;
                }
                next += tick;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
    emit(&FloodResult { sent, secs: t0.elapsed().as_secs_f64() })
}

/// When the first probe arrived.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProbeRxResult {
    /// CLOCK_MONOTONIC at arrival, ns; None when nothing came before the timeout.
    pub arrived_mono_ns: Option<u64>,
}

/// Waits for the first UDP datagram on `port` (bound to any address, so it receives as soon as
/// an interface with the endpoint's address appears in this namespace).
pub fn probe_rx(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", port)).context("binding the probe port")?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    ready();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if sock.recv(&mut buf).is_ok() {
            return emit(&ProbeRxResult { arrived_mono_ns: Some(mono_ns()) });
        }
    }
    emit(&ProbeRxResult { arrived_mono_ns: None })
}

/// Sends a small UDP datagram to `to` every `interval` until `timeout` (or until killed).
/// Unconnected, so ICMP errors from the time before the endpoint exists are not reported back.
pub fn probe_tx(to: SocketAddr, interval: Duration, timeout: Duration) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
    ready();
    let deadline = Instant::now() + timeout;
    let mut seq = 0u64;
    while Instant::now() < deadline {
        let _ = sock.send_to(&seq.to_le_bytes(), to);
        seq += 1;
        std::thread::sleep(interval);
    }
    Ok(())
}

/// Pings `to` every `interval` (ICMP echo on a raw socket) until the first reply, and says when
/// it came (as `ProbeRxResult`; None after `timeout`). For a namespace the harness has no process
/// in (a pod made by a runtime), where `probe_rx` cannot wait: its kernel answers the echo as
/// soon as the path to it works both ways.
pub fn ping_probe(to: Ipv4Addr, interval: Duration, timeout: Duration) -> anyhow::Result<()> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a raw ICMP socket");
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // Each wait for a reply lasts one interval, after which the next request goes.
    let tv =
        libc::timeval { tv_sec: 0, tv_usec: interval.as_micros().clamp(1, 999_999) as libc::suseconds_t };
    // SAFETY: setsockopt reads a timeval we own, of the size we pass.
    let set = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error()).context("setting SO_RCVTIMEO");
    }
    let dest = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(to).to_be() },
        sin_zero: [0; 8],
    };
    // Our pid tells our replies from another prober's (every raw ICMP socket sees all of them).
    let id = std::process::id() as u16;
    ready();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    let mut seq = 0u16;
    while Instant::now() < deadline {
        let request = icmp::echo_request(id, seq);
        seq = seq.wrapping_add(1);
        // SAFETY: sendto reads the request and the address we own, of the sizes we pass. A
        // failure (no route yet) is as good as a loss: the next request follows.
        unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&raw const dest).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        loop {
            // SAFETY: recv writes at most buf.len() bytes into the buffer we own.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { break };
            if icmp::is_echo_reply(&buf[..n], to, id) {
                return emit(&ProbeRxResult { arrived_mono_ns: Some(mono_ns()) });
            }
        }
    }
    emit(&ProbeRxResult { arrived_mono_ns: None })
}
