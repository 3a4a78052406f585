//! Docker drives the overlay: real dockerd engines (Debian's docker.io), one per simulated host,
//! each with the host's agent serving the remote driver API in its plugin directory, and one
//! etcd. The engines are started once for the whole suite (one test running the cases in
//! order) and stopped, with everything they made, at its end, pass or fail.

use std::{process::Command, time::Duration};

use overlay_tests::{
    cluster::Cluster,
    docker::{self, DRIVER, Dockerd, IMAGE},
    skip, skip_unless_privileged, try_sh, wait_for,
};

/// The hosts, their agents and engines; the engines are dropped (stopped) before the rest.
struct Env {
    engines: Vec<Dockerd>,
    cluster: Cluster,
}

impl Env {
    fn start(hosts: usize) -> Option<Self> {
        let cluster = Cluster::start_with("dk", hosts, 30, |run, host| {
            vec![
                "--docker-plugin".to_owned(),
                docker::plugin_socket(run, host).to_string_lossy().into_owned(),
            ]
        })?;
        let topo = &cluster.topo;
        let rootfs = docker::busybox_rootfs(&topo.run).unwrap_or_else(|e| panic!("busybox rootfs: {e:#}"));
        let engines = topo
            .hosts
            .iter()
            .map(|h| {
                let d = Dockerd::start(&topo.run, &h.name, &h.ns).unwrap_or_else(|e| panic!("{e:#}"));
                d.import_busybox(&rootfs)
                    .unwrap_or_else(|e| panic!("importing busybox on {}: {e:#}", h.name));
                d
            })
            .collect();
        Some(Self { engines, cluster })
    }

    fn engine(&self, host: &str) -> &Dockerd {
        self.engines.iter().find(|d| d.host == host).unwrap_or_else(|| panic!("no dockerd on {host}"))
    }

    /// `docker <args>` on `host`, which must succeed: its stdout.
    fn docker(&self, host: &str, args: &[&str]) -> String {
        self.engine(host).ok(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `docker <args>` on `host`, which must fail: its stderr.
    fn docker_refused(&self, host: &str, args: &[&str]) -> String {
        let out = try_sh(self.engine(host).docker().args(args));
        assert!(!out.status.success(), "docker {args:?} on {host} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The overlay's networks, by name, as `overlay network ls` lists them.
    fn overlay_networks(&self) -> Vec<String> {
        let out = self.cluster.ok(&["network", "ls"]);
        out.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned)).collect()
    }
}

/// The overlay's address keys (`<prefix>/ipam/<network>/<ip>`) with their values, from etcd.
fn address_keys(env: &Env) -> Vec<(String, String)> {
    let out = overlay_tests::sh(&mut overlay_tests::in_ns(
        &env.cluster.topo.underlay,
        &["etcdctl", "--endpoints", &env.cluster.url, "get", "--prefix", "/overlay/v1/ipam/"],
    ));
    let lines: Vec<&str> = out.lines().collect();
    lines.chunks(2).map(|kv| (kv[0].to_owned(), kv.get(1).copied().unwrap_or("").to_owned())).collect()
}

/// `POST /IpamDriver.<call>` with `body` on `host`'s plugin socket: HTTP status and JSON.
fn ipam_call(env: &Env, host: &str, call: &str, body: &str) -> (String, serde_json::Value) {
    let sock = docker::plugin_socket(&env.cluster.topo.run, host);
    let out =
        try_sh(Command::new("curl").args(["-s", "-w", "\n%{http_code}", "--unix-socket"]).arg(&sock).args([
            "-d",
            body,
            &format!("http://plugin/IpamDriver.{call}"),
        ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap_or_else(|| panic!("curl: {text}"));
    (code.to_owned(), serde_json::from_str(json).unwrap_or_else(|e| panic!("{call}: {json}: {e}")))
}

/// The processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// What the machine's own Docker and containerd directories hold: the engines must leave them
/// as they are (theirs are on a tmpfs over /run in their mount namespaces).
fn machine_dirs() -> Vec<Option<Vec<std::ffi::OsString>>> {
    ["/run/docker", "/run/containerd"]
        .iter()
        .map(|d| std::fs::read_dir(d).ok().map(|e| e.flatten().map(|e| e.file_name()).collect()))
        .collect()
}

#[test]
fn docker_suite() {
    if skip_unless_privileged() {
        return;
    }
    if let Some(why) = docker::missing() {
        skip(&why);
        return;
    }
    let before = machine_dirs();
    let Some(env) = Env::start(2) else { return };
    let run_dir = env.cluster.topo.run.dir.path().to_owned();
    let cgroups: Vec<String> = env.engines.iter().map(|d| d.cgroup.clone()).collect();

    engines_are_the_hosts_own(&env);
    one_docker_network_across_hosts(&env);
    a_bad_body_changes_nothing(&env);
    addresses_come_from_etcd(&env);

    assert_eq!(machine_dirs(), before, "the machine's /run/docker or /run/containerd changed");
    drop(env);
    // Gone: the daemons, their containerd and shims, the containers' processes and cgroups,
    // the agents, the run's files.
    let left = wait_for(Duration::from_secs(10), || {
        processes_mentioning(&run_dir.to_string_lossy()).is_empty().then_some(())
    });
    assert!(left.is_some(), "processes left: {:#?}", processes_mentioning(&run_dir.to_string_lossy()));
    for cg in cgroups {
        let leftovers: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
            .expect("cgroups")
            .flatten()
            .map(|e| e.path().join(&cg))
            .filter(|p| p.exists())
            .collect();
        assert!(leftovers.is_empty(), "cgroups left: {leftovers:?}");
    }
    assert!(!run_dir.exists(), "the run's directory is left");
}

/// Each host's engine is its own: it answers as 20.10, runs containers, and has the host's
/// namespace as its network (a container on the host network sees eth0 with the host's
/// underlay address).
fn engines_are_the_hosts_own(env: &Env) {
    for h in ["h1", "h2"] {
        let version = env.docker(h, &["version", "--format", "{{.Server.Version}}"]);
        assert!(version.starts_with("20.10"), "{h}: server version {version}");
        env.docker(h, &["run", "--rm", "--network", "none", IMAGE, "true"]);
        let addr =
            env.docker(h, &["run", "--rm", "--network", "host", IMAGE, "ip", "-4", "addr", "show", "eth0"]);
        let vtep = env.cluster.topo.host(h).vtep.to_string();
        assert!(addr.contains(&format!("inet {vtep}/")), "{h}'s container on the host network: {addr}");
    }
    // A container left running, so the teardown has one to remove.
    env.docker("h1", &["run", "-d", "--network", "none", IMAGE, "sleep", "600"]);
    assert_eq!(env.engine("h1").container_pids().len(), 1, "the running container's process, by its cgroup");
}

/// `docker network create` of the same network on both hosts' engines is one overlay network
/// in etcd; the same subnet with other settings is refused, naming the difference; `docker
/// network rm` on one host leaves the other host's network alone.
fn one_docker_network_across_hosts(env: &Env) {
    let create = ["network", "create", "-d", DRIVER, "--subnet", "10.0.9.0/24", "-o", "mtu=1400", "net"];
    let h1_id = env.docker("h1", &create).trim().to_owned();
    assert_eq!(env.overlay_networks(), vec!["docker-10.0.9.0-24".to_owned()]);
    // The same subnet with other settings on h2's engine (which has no such network yet, so
    // Docker's own overlap check passes it on to the plugin) is refused, naming what differs.
    let err = env.docker_refused(
        "h2",
        &["network", "create", "-d", DRIVER, "--subnet", "10.0.9.0/24", "-o", "vni=4242", "other"],
    );
    assert!(err.contains("VNI 4096 (not 4242)"), "{err}");
    let err = env.docker_refused(
        "h2",
        &["network", "create", "-d", DRIVER, "--subnet", "10.0.11.0/24", "-o", "colour=red", "x"],
    );
    assert!(err.contains("unknown option \"colour\""), "{err}");
    assert_eq!(env.overlay_networks(), vec!["docker-10.0.9.0-24".to_owned()]);

    // The same command on h2 joins it: each engine has an id of its own for the network, and
    // the overlay has one network for both.
    let h2_id = env.docker("h2", &create).trim().to_owned();
    assert_ne!(h1_id, h2_id);
    for h in ["h1", "h2"] {
        let driver = env.docker(h, &["network", "inspect", "-f", "{{.Driver}} {{.Scope}}", "net"]);
        assert_eq!(driver.trim(), format!("{DRIVER} local"), "{h}");
    }
    assert_eq!(env.overlay_networks(), vec!["docker-10.0.9.0-24".to_owned()]);
    let net = env.cluster.inspect("docker-10.0.9.0-24");
    assert_eq!(net["IPAM"]["Config"][0]["Subnet"], "10.0.9.0/24", "{net}");
    assert_eq!(net["Options"]["com.docker.network.driver.mtu"], "1400", "{net}");

    // `docker network rm` on h1 leaves h2's network, and the overlay network, alone; created
    // again on h1, it joins the same overlay network again.
    env.docker("h1", &["network", "rm", "net"]);
    assert!(env.docker("h2", &["network", "ls", "--format", "{{.Name}}"]).lines().any(|n| n == "net"));
    assert_eq!(env.overlay_networks(), vec!["docker-10.0.9.0-24".to_owned()]);
    env.docker("h1", &create);
    assert_eq!(env.overlay_networks(), vec!["docker-10.0.9.0-24".to_owned()]);
}

/// A body that does not parse, sent straight to the plugin's socket, is answered with
/// `{"Err": ...}` and creates nothing.
fn a_bad_body_changes_nothing(env: &Env) {
    let sock = docker::plugin_socket(&env.cluster.topo.run, "h1");
    let before = env.overlay_networks();
    for body in ["{", r#"{"NetworkID": 7}"#, r#"{"NetworkID": "x", "IPv4Data": [{"Pool": "10.0.10.0/24"}]}"#]
    {
        let out = try_sh(
            Command::new("curl").args(["-s", "-w", "\n%{http_code}", "--unix-socket"]).arg(&sock).args([
                "-d",
                body,
                "http://plugin/NetworkDriver.CreateNetwork",
            ]),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, code) = text.rsplit_once('\n').unwrap_or_else(|| panic!("curl: {text}"));
        let json: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{body}: {json}: {e}"));
        assert!(code == "400" || code == "500", "{body}: HTTP {code}");
        assert!(json["Err"].as_str().is_some_and(|e| !e.is_empty()), "{body}: {json}");
    }
    assert_eq!(env.overlay_networks(), before);
}

/// `--ipam-driver overlay-ebpf`: the pool, range, gateway and auxiliary addresses are the
/// overlay network's on every host, and a container's address is reserved in etcd for the host
/// that asked (`--ip` honoured, no address twice across hosts), given back on release.
fn addresses_come_from_etcd(env: &Env) {
    let create = [
        "network",
        "create",
        "-d",
        DRIVER,
        "--ipam-driver",
        DRIVER,
        "--subnet",
        "10.0.20.0/24",
        "--ip-range",
        "10.0.20.128/25",
        "--aux-address",
        "router=10.0.20.5",
        "ipnet",
    ];
    env.docker("h1", &create);
    env.docker("h2", &create);
    assert!(env.overlay_networks().contains(&"docker-10.0.20.0-24".to_owned()));
    let net = env.cluster.inspect("docker-10.0.20.0-24");
    let config = &net["IPAM"]["Config"][0];
    assert_eq!(config["IPRange"], "10.0.20.128/25", "{net}");
    assert_eq!(config["Gateway"], "10.0.20.1", "{net}");
    assert_eq!(config["AuxiliaryAddresses"]["router"], "10.0.20.5", "{net}");
    for h in ["h1", "h2"] {
        let ipam = env.docker(h, &["network", "inspect", "-f", "{{.IPAM.Driver}}", "ipnet"]);
        assert_eq!(ipam.trim(), DRIVER, "{h}");
    }
    // The same subnet with another range is not the same network.
    let mut other = create;
    other[9] = "10.0.20.0/25";
    other[12] = "ipnet2";
    env.engine("h2").ok(&["network", "rm", "ipnet"]).unwrap_or_else(|e| panic!("{e:#}"));
    let err = env.docker_refused("h2", &other);
    assert!(err.contains("ip-range 10.0.20.128/25 (not 10.0.20.0/25)"), "{err}");
    env.docker("h2", &create);

    // Containers' addresses, asked for the way dockerd asks (RequestAddress before the endpoint
    // exists), from both hosts: the lowest free ones of the range, each held in etcd by its host.
    let ask = |host: &str, ip: &str| {
        ipam_call(
            env,
            host,
            "RequestAddress",
            &format!(r#"{{"PoolID": "10.0.20.0/24|10.0.20.128/25", "Address": "{ip}", "Options": {{}}}}"#),
        )
    };
    let (code, a) = ask("h1", "");
    assert_eq!(code, "200", "{a}");
    let (_, b) = ask("h2", "");
    assert_eq!(
        (a["Address"].as_str(), b["Address"].as_str()),
        (Some("10.0.20.128/24"), Some("10.0.20.129/24"))
    );
    let held: Vec<String> = address_keys(env)
        .into_iter()
        .map(|(k, v)| format!("{} {v}", k.rsplit('/').next().unwrap_or("")))
        .collect();
    assert!(held.iter().any(|h| h.starts_with("10.0.20.128 ") && h.contains("reserved@h1")), "{held:?}");
    assert!(held.iter().any(|h| h.starts_with("10.0.20.129 ") && h.contains("reserved@h2")), "{held:?}");
    // --ip: a free one is given, a held one refused naming its holder.
    let (_, c) = ask("h2", "10.0.20.200");
    assert_eq!(c["Address"], "10.0.20.200/24");
    let (code, taken) = ask("h2", "10.0.20.128");
    assert_eq!(code, "500");
    assert!(
        taken["Err"].as_str().unwrap_or("").contains("10.0.20.128 is already in use")
            && taken["Err"].to_string().contains("reserved@h1"),
        "{taken}"
    );
    // The gateway and auxiliary addresses are the network's, never reserved.
    let (_, gw) = ipam_call(
        env,
        "h2",
        "RequestAddress",
        r#"{"PoolID": "10.0.20.0/24|10.0.20.128/25", "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}"#,
    );
    assert_eq!(gw["Address"], "10.0.20.1/24");
    // Release: only the host that holds an address gives it back.
    let release = |host: &str, ip: &str| {
        ipam_call(
            env,
            host,
            "ReleaseAddress",
            &format!(r#"{{"PoolID": "10.0.20.0/24|10.0.20.128/25", "Address": "{ip}"}}"#),
        )
    };
    release("h2", "10.0.20.128");
    assert!(address_keys(env).iter().any(|(k, _)| k.ends_with("/10.0.20.128")));
    for (h, ip) in [("h1", "10.0.20.128"), ("h2", "10.0.20.129"), ("h2", "10.0.20.200")] {
        let (code, body) = release(h, ip);
        assert_eq!(code, "200", "{body}");
    }
    assert!(address_keys(env).is_empty(), "{:?}", address_keys(env));
    // `docker run` on it cannot start yet (the endpoint calls are not served), and the address
    // dockerd reserved for it is given back.
    let err = env.docker_refused("h1", &["run", "--rm", "--network", "ipnet", IMAGE, "true"]);
    assert!(err.contains("CreateEndpoint is not implemented"), "{err}");
    assert!(address_keys(env).is_empty(), "{:?}", address_keys(env));
}
