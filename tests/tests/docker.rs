//! Docker drives the overlay: real dockerd engines (Debian's docker.io), one per simulated host,
//! each with the host's agent serving the remote driver API in its plugin directory, and one
//! etcd. The engines are started once for the whole suite (one test running the cases in
//! order) and stopped, with everything they made, at its end, pass or fail.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use overlay_tests::{
    binary,
    cluster::Cluster,
    docker::{self, DRIVER, Dockerd, IMAGE},
    in_ns,
    peer::ask,
    sh, skip, skip_unless_privileged, try_sh, wait_for,
};

/// The hosts, their agents and engines; the engines are dropped (stopped) before the rest.
struct Env {
    engines: Vec<Dockerd>,
    cluster: Cluster,
}

/// `docker run` flags that give a busybox container the project's traffic probe
/// (`/probe serve|tcp|udp ...`, tests/src/bin/overlay-probe.rs), with the host's libraries it
/// links to, read-only.
fn probe_mounts() -> Vec<String> {
    let probe = binary("overlay-probe");
    vec![
        "-v".into(),
        format!("{}:/probe:ro", probe.display()),
        "-v".into(),
        "/usr/lib:/lib:ro".into(),
        "-v".into(),
        "/usr/lib64:/lib64:ro".into(),
    ]
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

    fn engine_mut(&mut self, host: &str) -> &mut Dockerd {
        self.engines.iter_mut().find(|d| d.host == host).unwrap_or_else(|| panic!("no dockerd on {host}"))
    }

    /// `docker run -d --network <network> <more> IMAGE <cmd>` on `host`, with the probe
    /// mounted: the container's id.
    fn run(&self, host: &str, network: &str, more: &[&str], cmd: &[&str]) -> String {
        let mounts = probe_mounts();
        let mut args = vec!["run", "-d", "--network", network];
        args.extend(mounts.iter().map(String::as_str));
        args.extend(more);
        args.push(IMAGE);
        args.extend(cmd);
        let id = self.docker(host, &args).trim().to_owned();
        let state = self.docker(host, &["inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", &id]);
        let logs = try_sh(self.engine(host).docker().args(["logs", &id]));
        assert!(
            state.starts_with("running"),
            "{args:?} on {host}: {state}{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
        id
    }

    /// The address Docker shows for `container` on `network`.
    fn ip(&self, host: &str, container: &str, network: &str) -> Ipv4Addr {
        let f = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
        let out = self.docker(host, &["inspect", "-f", &f, container]);
        out.trim().parse().unwrap_or_else(|e| panic!("{container}'s address on {network}: {out:?}: {e}"))
    }

    /// Whether `container` on `host` gets an answer from `ip` (`probe tcp|udp`, or ping).
    fn reaches(&self, host: &str, container: &str, how: &str, ip: Ipv4Addr) -> bool {
        let out = match how {
            "icmp" => try_sh(self.engine(host).docker().args([
                "exec",
                container,
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                &ip.to_string(),
            ])),
            _ => try_sh(self.engine(host).docker().args([
                "exec",
                container,
                "/probe",
                how,
                &format!("{ip}:7"),
            ])),
        };
        out.status.success()
    }

    /// The host side of each endpoint interface in `host`'s namespace (`ov<id>`), and any
    /// container side still waiting there (`ovt<id>`).
    fn veths(&self, host: &str) -> Vec<String> {
        let out = sh(&mut in_ns(&self.cluster.topo.host(host).ns, &["ip", "-o", "link", "show"]));
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with("ov"))
            .collect()
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
    keys(env, "ipam/")
}

/// The keys under `/overlay/v1/<prefix>` with their values, from etcd.
fn keys(env: &Env, prefix: &str) -> Vec<(String, String)> {
    let out = sh(&mut in_ns(
        &env.cluster.topo.underlay,
        &["etcdctl", "--endpoints", &env.cluster.url, "get", "--prefix", &format!("/overlay/v1/{prefix}")],
    ));
    let lines: Vec<&str> = out.lines().collect();
    lines.chunks(2).map(|kv| (kv[0].to_owned(), kv.get(1).copied().unwrap_or("").to_owned())).collect()
}

/// `POST /<call>` (e.g. `IpamDriver.RequestAddress`) with `body` on `host`'s plugin socket,
/// as dockerd sends it: the HTTP status and the JSON answer.
fn plugin_call(env: &Env, host: &str, call: &str, body: &str) -> (String, serde_json::Value) {
    let sock = docker::plugin_socket(&env.cluster.topo.run, host);
    let out =
        try_sh(Command::new("curl").args(["-s", "-w", "\n%{http_code}", "--unix-socket"]).arg(&sock).args([
            "-d",
            body,
            &format!("http://plugin/{call}"),
        ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap_or_else(|| panic!("curl: {text}"));
    (code.to_owned(), serde_json::from_str(json).unwrap_or_else(|e| panic!("{call} {body}: {json}: {e}")))
}

/// `POST /IpamDriver.<call>` on `host`'s plugin socket.
fn ipam_call(env: &Env, host: &str, call: &str, body: &str) -> (String, serde_json::Value) {
    plugin_call(env, host, &format!("IpamDriver.{call}"), body)
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
    containers_reach_each_other_across_hosts(&env);
    docker_and_cli_containers_meet(&env);
    published_ports_lead_to_the_container(&env);
    networks_are_isolated_and_connect_at_runtime(&env);
    bad_endpoints_are_refused(&env);
    sixteen_at_once_get_sixteen_addresses(&env);
    rm_f_leaves_nothing_behind(&env);
    let env = the_agent_restarts_under_running_containers(env);
    let env = dockerd_restarts(env);

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
    let before = env.overlay_networks();
    for body in ["{", r#"{"NetworkID": 7}"#, r#"{"NetworkID": "x", "IPv4Data": [{"Pool": "10.0.10.0/24"}]}"#]
    {
        let (code, json) = plugin_call(env, "h1", "NetworkDriver.CreateNetwork", body);
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
}

/// The issue's example, across hosts: a container on h1 serves, containers on h2 reach it over
/// TCP, UDP and ICMP. Its interface is the one the overlay made: the address from etcd, the MAC
/// derived from it, the MTU the uplink leaves for VXLAN, the default route via the gateway. Both
/// hosts' maps hold it, as for a container made with the CLI.
fn containers_reach_each_other_across_hosts(env: &Env) {
    env.run("h1", "ipnet", &["--name", "web"], &["/probe", "serve", "7"]);
    let web = env.ip("h1", "web", "ipnet");
    assert_eq!(web, Ipv4Addr::new(10, 0, 20, 128), "the lowest free address of the range");
    let link = env.docker("h1", &["exec", "web", "ip", "-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1450 "), "uplink 1500 - 50: {link}");
    assert!(link.contains("link/ether 02:42:0a:00:14:80 "), "MAC from the address: {link}");
    let route = env.docker("h1", &["exec", "web", "ip", "route"]);
    assert!(route.contains("default via 10.0.20.1 dev eth0"), "{route}");
    let held = address_keys(env);
    assert!(
        held.iter()
            .any(|(k, v)| k.ends_with("/10.0.20.128") && v.contains("docker-") && !v.contains("reserved@")),
        "the address is the endpoint's now: {held:?}"
    );
    assert!(env.cluster.maps_hold("h1", web));

    env.run("h2", "ipnet", &["--name", "client"], &["sleep", "600"]);
    // h2 takes part in the network once it has an endpoint there.
    assert!(wait_for(Duration::from_secs(5), || env.cluster.maps_hold("h2", web).then_some(())).is_some());
    for how in ["tcp", "udp", "icmp"] {
        assert!(env.reaches("h2", "client", how, web), "h2's client reaches web on h1 over {how}");
    }
    let client = env.ip("h2", "client", "ipnet");
    assert!(env.reaches("h1", "web", "icmp", client), "and back");
    // `--ip` and `--mac-address` are honoured, and the peer's maps carry that MAC.
    env.run(
        "h2",
        "ipnet",
        &["--name", "fixed", "--ip", "10.0.20.200", "--mac-address", "02:42:aa:bb:cc:dd"],
        &["sleep", "600"],
    );
    let fixed = Ipv4Addr::new(10, 0, 20, 200);
    assert_eq!(env.ip("h2", "fixed", "ipnet"), fixed);
    let link = env.docker("h2", &["exec", "fixed", "ip", "-o", "link", "show", "eth0"]);
    assert!(link.contains("link/ether 02:42:aa:bb:cc:dd "), "{link}");
    assert!(env.reaches("h1", "web", "icmp", fixed), "web reaches the fixed address");
    let mac = env.cluster.map_entry("h1", fixed).map(|e| e["mac"].clone());
    assert_eq!(mac, Some(serde_json::json!([2, 0x42, 0xaa, 0xbb, 0xcc, 0xdd])), "h1's map entry");
    // The overlay shows Docker's containers, as `docker-<sandbox id>`.
    let net = env.cluster.inspect("docker-10.0.20.0-24");
    let sandbox = env.docker("h1", &["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", "web"]);
    let name = format!("docker-{}", sandbox.trim().rsplit('/').next().unwrap_or(""));
    let entry = net["Containers"].as_object().and_then(|c| c.values().find(|c| c["Name"] == name.as_str()));
    assert!(entry.is_some_and(|e| e["IPv4Address"] == "10.0.20.128/24"), "{name} in {net}");
    // Docker's own name service still answers for its containers on the same engine.
    env.run("h1", "ipnet", &["--name", "neighbour"], &["sleep", "600"]);
    let resolved = env.docker("h1", &["exec", "neighbour", "nslookup", "web"]);
    assert!(resolved.contains("10.0.20.128"), "Docker's embedded DNS: {resolved}");
}

/// A container made by the project's CLI and one started by Docker, on the same network, reach
/// each other.
fn docker_and_cli_containers_meet(env: &Env) {
    env.cluster.ok(&["container", "create", "--host", "h2", "--network", "docker-10.0.20.0-24", "cli1"]);
    let cli1 = env.cluster.address("docker-10.0.20.0-24", "cli1");
    let web = env.ip("h1", "web", "ipnet");
    assert!(env.cluster.comes_to_reach("h2", "cli1", web), "the CLI's container reaches Docker's");
    assert!(env.reaches("h1", "web", "icmp", cli1), "Docker's container reaches the CLI's");
    env.cluster.ok(&["container", "rm", "cli1"]);
}

/// `docker run -p`: the port map becomes the container's published ports, in etcd under h1 and
/// in h1's NAT; another host reaches the container through h1's address (and the container sees
/// the client's own address); a range takes its first free port and `-p 81` one of dockerd's
/// default range; a second container asking for a held port is refused naming the holder, and
/// `docker rm` frees every port.
fn published_ports_lead_to_the_container(env: &Env) {
    let h2 = env.cluster.topo.host("h2").ns.clone();
    let ports = |env: &Env| -> Vec<String> {
        let mut keys: Vec<String> = env
            .cluster
            .keys("ports/h1/")
            .iter()
            .map(|k| k.rsplit("ports/").next().unwrap_or(k).to_owned())
            .collect();
        keys.sort();
        keys
    };
    assert!(ports(env).is_empty(), "ports published before: {:?}", ports(env));
    env.run(
        "h1",
        "ipnet",
        &["--name", "pub", "-p", "18090:80", "-p", "18091-18095:80/udp", "-p", "81"],
        &["sh", "-c", "/probe peer 80 pub & /probe peer 81 pub-any & wait"],
    );
    let held = ports(env);
    assert_eq!(held.len(), 3, "{held:?}");
    assert!(
        held.contains(&"h1/tcp/18090".to_owned()) && held.contains(&"h1/udp/18091".to_owned()),
        "{held:?}"
    );
    let any: u16 = held
        .iter()
        .find_map(|k| k.strip_prefix("h1/tcp/").filter(|p| *p != "18090").and_then(|p| p.parse().ok()))
        .unwrap_or_else(|| panic!("no port for -p 81: {held:?}"));
    assert!((49153..=60999).contains(&any), "-p 81 took {any}");
    let reached = |to: &str, proto: &str| wait_for(Duration::from_secs(10), || ask(&h2, to, proto));
    assert_eq!(reached("198.18.0.1:18090", "tcp").as_deref(), Some("pub 198.18.0.2"));
    assert_eq!(reached("198.18.0.1:18091", "udp").as_deref(), Some("pub 198.18.0.2"));
    assert_eq!(reached(&format!("198.18.0.1:{any}"), "tcp").as_deref(), Some("pub-any 198.18.0.2"));

    // The same host port again: refused, naming the container that holds it; nothing written.
    let sandbox = env.docker("h1", &["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", "pub"]);
    let holder = format!("docker-{}", sandbox.trim().rsplit('/').next().unwrap_or(""));
    let mounts = probe_mounts();
    let mut args = vec!["run", "-d", "--name", "pub2", "--network", "ipnet", "-p", "18090:80"];
    args.extend(mounts.iter().map(String::as_str));
    args.extend([IMAGE, "sleep", "600"]);
    let err = env.docker_refused("h1", &args);
    assert!(err.contains("18090") && err.contains(&holder), "{err}");
    assert_eq!(ports(env), held, "a refused -p changed the published ports");
    env.docker("h1", &["rm", "-f", "pub2"]);

    // rm frees them all; the port leads nowhere.
    env.docker("h1", &["rm", "-f", "pub"]);
    assert!(
        wait_for(Duration::from_secs(10), || ports(env).is_empty().then_some(())).is_some(),
        "{:?}",
        ports(env)
    );
    assert_eq!(ask(&h2, "198.18.0.1:18090", "tcp"), None, "a removed container's port still leads somewhere");
}

/// Two Docker networks are isolated; `docker network connect` gives a running container an
/// `eth1` on the other network at once, `disconnect` takes it away.
fn networks_are_isolated_and_connect_at_runtime(env: &Env) {
    for h in ["h1", "h2"] {
        env.docker(
            h,
            &[
                "network",
                "create",
                "-d",
                DRIVER,
                "--ipam-driver",
                DRIVER,
                "--subnet",
                "10.0.21.0/24",
                "apart",
            ],
        );
    }
    env.run("h2", "apart", &["--name", "lone"], &["sleep", "600"]);
    let web = env.ip("h1", "web", "ipnet");
    assert!(!env.reaches("h2", "lone", "icmp", web), "another network's container is out of reach");
    env.docker("h2", &["network", "connect", "ipnet", "lone"]);
    let eth1 = env.docker("h2", &["exec", "lone", "ip", "-4", "-o", "addr", "show", "eth1"]);
    let lone = env.ip("h2", "lone", "ipnet");
    assert!(eth1.contains(&format!("inet {lone}/24")), "{eth1}");
    assert!(env.reaches("h2", "lone", "icmp", web), "connected, it reaches web");
    env.docker("h2", &["network", "disconnect", "ipnet", "lone"]);
    let links = env.docker("h2", &["exec", "lone", "ip", "-o", "link"]);
    assert!(!links.contains("eth1"), "{links}");
    assert!(!env.reaches("h2", "lone", "icmp", web), "disconnected, it does not");
    assert!(!address_keys(env).iter().any(|(k, _)| k.ends_with(&format!("/{lone}"))), "its address is free");
    env.docker("h2", &["rm", "-f", "lone"]);
}

/// What the plugin refuses, with Docker's error naming why, leaving nothing behind: a network
/// whose addresses come from Docker's own IPAM (they could collide across hosts), SCTP ports
/// published, unknown driver options, and endpoint calls that do not parse or name nothing.
fn bad_endpoints_are_refused(env: &Env) {
    env.docker("h1", &["network", "create", "-d", DRIVER, "--subnet", "10.0.22.0/24", "own-ipam"]);
    env.run("h1", "apart", &["--name", "opt"], &["sleep", "600"]);
    let before = (address_keys(env), keys(env, "endpoints/"), keys(env, "containers/"), env.veths("h1"));
    let err = env.docker_refused("h1", &["run", "--rm", "--network", "own-ipam", IMAGE, "true"]);
    assert!(err.contains("was not given by this plugin's IPAM driver"), "{err}");
    let err =
        env.docker_refused("h1", &["run", "--rm", "--network", "ipnet", "-p", "8080:80/sctp", IMAGE, "true"]);
    assert!(err.contains("IP protocol 132 is not supported"), "{err}");
    let err = env.docker_refused("h1", &["network", "connect", "--driver-opt", "colour=red", "ipnet", "opt"]);
    assert!(err.contains("unknown endpoint option \"colour\""), "{err}");
    let id = "a".repeat(64);
    for (call, body) in [
        ("CreateEndpoint", "{".to_owned()),
        (
            "CreateEndpoint",
            format!(
                r#"{{"NetworkID": "x", "EndpointID": "{id}", "Interface": {{"Address": "10.0.20.5/24"}}}}"#
            ),
        ),
        ("CreateEndpoint", r#"{"NetworkID": "x", "EndpointID": "../../x"}"#.to_owned()),
        (
            "Join",
            format!(
                r#"{{"NetworkID": "x", "EndpointID": "{id}", "SandboxKey": "/var/run/docker/netns/abc"}}"#
            ),
        ),
        ("Join", format!(r#"{{"NetworkID": "x", "EndpointID": "{id}", "SandboxKey": 7}}"#)),
        ("Leave", r#"{"EndpointID": 1}"#.to_owned()),
    ] {
        let (code, json) = plugin_call(env, "h1", &format!("NetworkDriver.{call}"), &body);
        assert!(code == "400" || code == "500", "{call} {body}: HTTP {code}");
        assert!(json["Err"].as_str().is_some_and(|e| !e.is_empty()), "{call} {body}: {json}");
    }
    let after = (address_keys(env), keys(env, "endpoints/"), keys(env, "containers/"), env.veths("h1"));
    assert_eq!(after, before, "a refused container leaves nothing behind");
    env.docker("h1", &["rm", "-f", "opt"]);
    env.docker("h1", &["network", "rm", "own-ipam"]);
}

/// 16 `docker run` at once, 8 on each host, on one network: 16 distinct addresses, each held by
/// its endpoint in etcd.
fn sixteen_at_once_get_sixteen_addresses(env: &Env) {
    let ids: Vec<(String, String)> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..16)
            .map(|i| {
                let host = if i % 2 == 0 { "h1" } else { "h2" };
                s.spawn(move || {
                    let name = format!("many{i}");
                    (host.to_owned(), env.run(host, "ipnet", &["--name", &name], &["sleep", "600"]))
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().expect("docker run")).collect()
    });
    let mut ips: Vec<Ipv4Addr> = ids.iter().map(|(host, id)| env.ip(host, id, "ipnet")).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 16, "{ips:?}");
    let held = address_keys(env);
    for ip in &ips {
        let holder = held.iter().find(|(k, _)| k.ends_with(&format!("/{ip}")));
        assert!(holder.is_some_and(|(_, v)| v.contains("docker-")), "{ip}: {holder:?}");
    }
}

/// `docker rm -f` of every container leaves no interface, map entry, address, endpoint,
/// container or status key behind.
fn rm_f_leaves_nothing_behind(env: &Env) {
    let mut gone = Vec::new();
    for h in ["h1", "h2"] {
        let ids = env.docker(h, &["ps", "-q", "--filter", "network=ipnet"]);
        for id in ids.split_whitespace() {
            gone.push(env.ip(h, id, "ipnet"));
        }
        let all = env.docker(h, &["ps", "-aq"]);
        let all: Vec<&str> = all.split_whitespace().collect();
        let mut args = vec!["rm", "-f"];
        args.extend(all);
        env.docker(h, &args);
    }
    assert!(gone.len() >= 18, "{gone:?}");
    for h in ["h1", "h2"] {
        assert_eq!(env.veths(h), Vec::<String>::new(), "{h}'s interfaces");
        for ip in &gone {
            let entry = wait_for(Duration::from_secs(10), || (!env.cluster.maps_hold(h, *ip)).then_some(()));
            assert!(entry.is_some(), "{h}'s maps still hold {ip}");
        }
    }
    for prefix in
        ["ipam/", "endpoints/", "containers/", "attachments/", "status/endpoints/", "status/containers/"]
    {
        assert_eq!(keys(env, prefix), Vec::<(String, String)>::new(), "{prefix}");
    }
}

/// The agent of h1 is killed and started again while Docker's containers run: the plugin's
/// socket comes back, a container on h2 pinging one on h1 all along loses nothing, nothing is
/// made twice, and Docker can start containers again.
fn the_agent_restarts_under_running_containers(mut env: Env) -> Env {
    env.run("h1", "ipnet", &["--name", "steady"], &["sleep", "600"]);
    let steady = env.ip("h1", "steady", "ipnet");
    env.run("h2", "ipnet", &["--name", "pinger"], &["ping", "-i", "0.05", &steady.to_string()]);
    let before = (keys(&env, "endpoints/"), keys(&env, "containers/"), env.veths("h1"));
    std::thread::sleep(Duration::from_secs(1));
    env.cluster.kill_agent("h1");
    std::thread::sleep(Duration::from_secs(2));
    env.cluster.start_agent("h1");
    assert!(env.cluster.wait_registered("h1"));
    let sock = docker::plugin_socket(&env.cluster.topo.run, "h1");
    assert!(
        wait_for(Duration::from_secs(20), || sock.exists().then_some(())).is_some(),
        "the socket is back"
    );
    std::thread::sleep(Duration::from_secs(2));
    let after = (keys(&env, "endpoints/"), keys(&env, "containers/"), env.veths("h1"));
    assert_eq!(after, before, "nothing made twice");
    env.docker("h2", &["kill", "-s", "INT", "pinger"]);
    let log = wait_for(Duration::from_secs(10), || {
        let out = try_sh(env.engine("h2").docker().args(["logs", "pinger"]));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("packets transmitted").then_some(text)
    })
    .expect("ping's summary");
    let summary = log.lines().find(|l| l.contains("packets transmitted")).unwrap_or_default();
    let numbers: Vec<u64> = summary.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(numbers.len() >= 2 && numbers[0] > 50 && numbers[0] == numbers[1], "lost pings: {summary}");
    let out = env.docker(
        "h1",
        &["run", "--rm", "--network", "ipnet", IMAGE, "ping", "-c", "1", "-W", "2", &steady.to_string()],
    );
    assert!(out.contains("1 packets received"), "{out}");
    env.docker("h1", &["rm", "-f", "steady"]);
    env.docker("h2", &["rm", "-f", "pinger"]);
    env
}

/// h2's dockerd is restarted while a container with `--restart always` runs on it: the
/// container comes back on the overlay, reachable from h1, with one endpoint, and the stopped
/// one's interface and keys are gone.
fn dockerd_restarts(mut env: Env) -> Env {
    env.run("h2", "ipnet", &["--name", "keeper", "--restart", "always"], &["/probe", "serve", "7"]);
    env.run("h1", "ipnet", &["--name", "caller"], &["sleep", "600"]);
    let keeper = env.ip("h2", "keeper", "ipnet");
    assert!(env.reaches("h1", "caller", "tcp", keeper));
    env.engine_mut("h2").restart().unwrap_or_else(|e| panic!("{e:#}"));
    let back = wait_for(Duration::from_secs(30), || {
        let state = env.engine("h2").ok(&["inspect", "-f", "{{.State.Running}}", "keeper"]).ok()?;
        (state.trim() == "true").then_some(())
    });
    assert!(back.is_some(), "keeper restarted");
    let keeper = env.ip("h2", "keeper", "ipnet");
    assert!(
        wait_for(Duration::from_secs(10), || env.reaches("h1", "caller", "tcp", keeper).then_some(()))
            .is_some(),
        "caller on h1 reaches keeper again"
    );
    let eps: Vec<_> =
        keys(&env, "endpoints/").into_iter().filter(|(_, v)| v.contains("\"host\":\"h2\"")).collect();
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(env.veths("h2").len(), 1, "{:?}", env.veths("h2"));
    env
}
