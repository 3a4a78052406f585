//! A real etcd for tests: one single-member server per `Etcd`, on free ports, with its data in
//! a temporary directory. It can be stopped and started again on the same ports and data (to
//! test what survives an outage), and is killed, its directory removed, when dropped.
//!
//! Tests that need one begin with `let Some(etcd) = Etcd::start_or_skip() else { return };`:
//! without an etcd binary they say "skipping: ..." and pass without testing anything.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Where and how to run it.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Address to listen on (client and peer).
    pub ip: Ipv4Addr,
    /// Run inside this named network namespace (`ip netns exec`); needs root. Ports are then
    /// 2379/2380 unless given, since nothing else listens in a namespace of the test's own.
    pub netns: Option<String>,
    pub client_port: Option<u16>,
    pub peer_port: Option<u16>,
    /// How long to wait for it to become healthy.
    pub ready_timeout: Duration,
    /// Serve clients over TLS (https:// URLs).
    pub tls: Option<EtcdTls>,
}

/// PEM files for a TLS etcd.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA whose client certificates etcd accepts (and requires).
    pub client_ca: Option<PathBuf>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            ip: Ipv4Addr::LOCALHOST,
            netns: None,
            client_port: None,
            peer_port: None,
            ready_timeout: Duration::from_secs(20),
            tls: None,
        }
    }
}

pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    opts: EtcdOptions,
    client: SocketAddr,
    peer: SocketAddr,
    /// Plain-HTTP /health, whatever the client URLs speak.
    metrics: SocketAddr,
}

impl Etcd {
    /// The etcd binary: $OVERLAY_ETCD_BIN, else `etcd` on the PATH.
    pub fn binary() -> Option<PathBuf> {
        if let Some(bin) = std::env::var_os("OVERLAY_ETCD_BIN") {
            return Some(PathBuf::from(bin)).filter(|p| p.exists());
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|dir| dir.join("etcd")).find(|p| p.is_file())
    }

    /// Starts one on 127.0.0.1, or says why the calling test is skipped and returns None.
    pub fn start_or_skip() -> Option<Self> {
        if Self::binary().is_none() {
            crate::skip("no etcd binary (install etcd-server, or set OVERLAY_ETCD_BIN)");
            return None;
        }
        Some(Self::start().unwrap_or_else(|e| panic!("starting etcd: {e}")))
    }

    pub fn start() -> std::io::Result<Self> {
        Self::start_with(EtcdOptions::default())
    }

    /// `start_with`, for a run: if the run is interrupted (SIGINT/SIGTERM, with
    /// `cleanup_on_signal` installed), the etcd's data directory is removed with the run's
    /// namespaces, which a guard that is never dropped could not do.
    pub fn start_for(run: &crate::Run, opts: EtcdOptions) -> std::io::Result<Self> {
        let etcd = Self::start_with(opts)?;
        run.remove_on_signal(etcd.dir.path());
        Ok(etcd)
    }

    pub fn start_with(opts: EtcdOptions) -> std::io::Result<Self> {
        let (client_port, peer_port, metrics_port) = match &opts.netns {
            Some(_) => (opts.client_port.unwrap_or(2379), opts.peer_port.unwrap_or(2380), 2381),
            None => (
                opts.client_port.map_or_else(|| free_port(opts.ip), Ok)?,
                opts.peer_port.map_or_else(|| free_port(opts.ip), Ok)?,
                free_port(opts.ip)?,
            ),
        };
        // Memory-backed when possible: etcd fsyncs every write, which dominates a test's time
        // on a disk.
        let shm = Path::new("/dev/shm");
        let builder = tempfile::Builder::new().prefix("overlay-etcd-").clone();
        let dir = if shm.is_dir() {
            builder.tempdir_in(shm).or_else(|_| builder.tempdir())?
        } else {
            builder.tempdir()?
        };
        let mut etcd = Self {
            child: None,
            dir,
            client: SocketAddr::from((opts.ip, client_port)),
            peer: SocketAddr::from((opts.ip, peer_port)),
            metrics: SocketAddr::from((opts.ip, metrics_port)),
            opts,
        };
        etcd.launch()?;
        Ok(etcd)
    }

    /// The client URL, for --etcd-endpoints.
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// etcd's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Kills it (as a crash would); its data stays for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports with the same data, and waits until it is healthy.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.launch()
    }

    /// SIGSTOP: etcd holds every connection open and answers nothing, as a member stuck in a
    /// long GC pause, a frozen VM or a full disk would.
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after `pause`.
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&mut self, sig: libc::c_int) {
        let pid = self.child.as_ref().map(Child::id).expect("etcd running");
        // SAFETY: signalling our own child (`ip netns exec` execs etcd: the pid is etcd's).
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0, "signalling etcd");
    }

    /// Restarts it with an empty data directory on the same ports: a member whose disk was lost,
    /// or a store "restored" from nothing.
    pub fn restart_empty(&mut self) -> std::io::Result<()> {
        self.stop();
        std::fs::remove_dir_all(self.data_dir())?;
        self.launch()
    }

    /// A copy of its data as of now (stopping and restarting it around the copy): a backup.
    pub fn backup(&mut self) -> std::io::Result<tempfile::TempDir> {
        self.stop();
        let to = tempfile::Builder::new().prefix("overlay-etcd-backup-").tempdir_in(self.dir.path())?;
        copy_dir(&self.data_dir(), &to.path().join("data"))?;
        self.launch()?;
        Ok(to)
    }

    /// Restarts it on `backup`'s data: a store restored from an older backup, whose revision is
    /// behind what its clients saw.
    pub fn restore(&mut self, backup: &Path) -> std::io::Result<()> {
        self.stop();
        std::fs::remove_dir_all(self.data_dir())?;
        copy_dir(&backup.join("data"), &self.data_dir())?;
        self.launch()
    }

    fn launch(&mut self) -> std::io::Result<()> {
        let bin = Self::binary().ok_or_else(|| std::io::Error::other("no etcd binary"))?;
        let log =
            std::fs::File::options().create(true).append(true).open(self.dir.path().join("etcd.log"))?;
        let name = "overlay-test";
        let client = self.url();
        let peer = format!("http://{}", self.peer);
        let mut cmd = match &self.opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(["--name", name])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{name}={peer}"), "--initial-cluster-state", "new"])
            // Short raft timers: a single member elects itself in tens of milliseconds instead of
            // a second, and the shortest lease etcd grants drops to one second.
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(["--listen-metrics-urls", &format!("http://{}", self.metrics)])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        if let Some(tls) = &self.opts.tls {
            cmd.arg("--cert-file").arg(&tls.cert).arg("--key-file").arg(&tls.key);
            if let Some(ca) = &tls.client_ca {
                cmd.arg("--trusted-ca-file").arg(ca).arg("--client-cert-auth");
            }
        }
        self.child = Some(cmd.spawn()?);
        let deadline = Instant::now() + self.opts.ready_timeout;
        loop {
            if self.healthy() {
                return Ok(());
            }
            if !self.is_running() {
                return Err(std::io::Error::other(format!("etcd exited during startup:\n{}", self.log())));
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(std::io::Error::other(format!("etcd not healthy in time:\n{}", self.log())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /health` answers `"health":"true"` once the member has a leader.
    fn healthy(&self) -> bool {
        let addr = self.metrics;
        let probe = move || -> std::io::Result<bool> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            write!(s, "GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body.contains("\"health\":\"true\""))
        };
        match &self.opts.netns {
            None => probe().unwrap_or(false),
            Some(ns) => {
                // Probed from a thread that entered the namespace; the test's threads stay put.
                let path = Path::new("/run/netns").join(ns);
                std::thread::spawn(move || {
                    let Ok(f) = std::fs::File::open(&path) else { return false };
                    // SAFETY: setns on this short-lived thread only.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return false;
                    }
                    probe().unwrap_or(false)
                })
                .join()
                .unwrap_or(false)
            }
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("----- etcd {} (last {} log lines) -----", self.url(), tail.len());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        self.stop();
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("cp -a {} {}", from.display(), to.display())))
    }
}

/// A port nothing listens on now (the kernel's choice); etcd binds it a moment later.
fn free_port(ip: Ipv4Addr) -> std::io::Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}
