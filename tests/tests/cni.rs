//! The CNI plugin driven as a runtime drives it: the real `overlay-cni` binary started in a
//! host's namespace with CNI_* variables and a netconf on stdin, against real agents
//! (`--cni-socket`) and a real etcd, on two simulated hosts. Pods are namespaces the test makes
//! (`ip netns add`, as containerd and podman do under /run/netns). One test runs the cases in
//! order on one cluster; each case leaves the store as it found it, which the next one checks.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use overlay_agent::{cni::types::SUPPORTED_VERSIONS, model::MacAddr};
use overlay_tests::{
    cluster::Cluster,
    cni::{self, Call, Outcome},
    in_net, in_ns, ip,
    peer::{ask, serve},
    sh, skip_unless_privileged, subnet_route, try_sh, wait_for,
};
use serde_json::{Value, json};

const NET: &str = "pods";
const SUBNET: &str = "10.0.30.0/24";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 30, 1);

struct Env {
    cluster: Cluster,
}

impl Env {
    fn start() -> Option<Self> {
        let cluster = Cluster::start_with("cni", 2, 30, |run, host| {
            vec!["--cni-socket".to_owned(), cni::socket(run, host).to_string_lossy().into_owned()]
        })?;
        for h in ["h1", "h2"] {
            let sock = cni::socket(&cluster.topo.run, h);
            assert!(
                wait_for(Duration::from_secs(20), || sock.exists().then_some(())).is_some(),
                "agent {h} never made its CNI socket {}",
                sock.display()
            );
        }
        Some(Self { cluster })
    }

    fn host_ns(&self, host: &str) -> &str {
        &self.cluster.topo.host(host).ns
    }

    /// A pod's namespace, made as a runtime makes it: `/run/netns/<run>-<name>` (the run's
    /// cleanup removes it).
    fn pod_ns(&self, name: &str) -> String {
        let ns = self.cluster.topo.run.ns(name);
        ip(&["netns", "add", &ns]).unwrap_or_else(|e| panic!("{e:#}"));
        format!("/run/netns/{ns}")
    }

    /// The netconf of `version` for `host`'s agent, with `more` fields merged in.
    fn conf(&self, host: &str, version: &str, more: &Value) -> Value {
        let mut conf = cni::netconf(version, NET, &cni::socket(&self.cluster.topo.run, host));
        if let (Some(c), Some(m)) = (conf.as_object_mut(), more.as_object()) {
            c.extend(m.clone());
        }
        conf
    }

    fn invoke(&self, host: &str, call: &Call<'_>, conf: &Value) -> Outcome {
        cni::invoke(self.host_ns(host), call, conf)
    }

    /// An ADD that must succeed: its result.
    fn add(&self, host: &str, id: &str, netns: &str, args: &str) -> Value {
        let call = Call { command: "ADD", container_id: id, netns, ifname: "eth0", args };
        let out = self.invoke(host, &call, &self.conf(host, "1.0.0", &json!({})));
        assert!(out.ok, "ADD {id} on {host}: {}", out.stdout);
        out.json
    }

    /// A DEL that must succeed and print nothing.
    fn del(&self, host: &str, id: &str, netns: &str, prev: Option<&Value>) {
        let call = Call { command: "DEL", container_id: id, netns, ifname: "eth0", args: "" };
        let more = prev.map_or_else(|| json!({}), |p| json!({"prevResult": p}));
        let out = self.invoke(host, &call, &self.conf(host, "1.0.0", &more));
        assert!(out.ok && out.stdout.trim().is_empty(), "DEL {id} on {host}: {}", out.stdout);
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.cluster.keys(prefix)
    }

    /// The container, endpoint, attachment and address keys: what an ADD writes.
    fn state(&self) -> Vec<String> {
        ["containers/", "endpoints/", "attachments/", "ipam/"].iter().flat_map(|p| self.keys(p)).collect()
    }

    /// The endpoint veths (`ov...`) in `host`'s namespace.
    fn veths(&self, host: &str) -> Vec<String> {
        let out = sh(&mut in_ns(self.host_ns(host), &["ip", "-o", "link", "show"]));
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with("ov"))
            .collect()
    }
}

/// `ip -j <args>` inside the namespace at `netns` (a path).
fn ip_json(netns: &str, args: &[&str]) -> Value {
    let out = sh(in_net(netns, &["ip", "-j"]).args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j {args:?} in {netns}: {out}: {e}"))
}

/// One ping from the namespace at `netns` to `to`.
fn pings(netns: &str, to: Ipv4Addr) -> bool {
    try_sh(&mut in_net(netns, &["ping", "-c", "1", "-W", "1", &to.to_string()])).status.success()
}

fn comes_to_ping(netns: &str, to: Ipv4Addr) -> bool {
    wait_for(Duration::from_secs(10), || pings(netns, to).then_some(())).is_some()
}

/// The address of a result's first IP, without the prefix length.
fn address(result: &Value) -> Ipv4Addr {
    let cidr = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no ips: {result}"));
    cidr.split('/').next().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("address {cidr}"))
}

#[test]
fn cni_suite() {
    if skip_unless_privileged() {
        return;
    }
    let Some(env) = Env::start() else { return };
    env.cluster.ok(&["network", "create", "--subnet", SUBNET, NET]);
    let empty = env.state();

    version_and_status(&env);
    add_makes_a_pod_that_reaches_across_hosts(&env);
    assert_eq!(env.state(), empty, "the cross-host case left keys behind");
    add_again_answers_the_same(&env);
    del_is_idempotent(&env);
    assert_eq!(env.state(), empty, "the DEL case left keys behind");
    add_beside_another_route_to_the_subnet(&env);
    assert_eq!(env.state(), empty, "the second-route case left keys behind");
    errors_are_cni_errors(&env);
    assert_eq!(env.state(), empty, "a refused call wrote keys");
    port_mappings_publish_the_pods_ports(&env);
    assert_eq!(env.state(), empty, "the port mappings case left keys behind");
    assert!(env.keys("ports/").is_empty(), "a DEL left a published port: {:?}", env.keys("ports/"));
    a_failed_add_leaves_nothing(&env);
    gc_removes_what_the_runtime_no_longer_has(&env);
    assert_eq!(env.state(), empty, "the GC case left keys behind");
    libcni_adds_checks_and_deletes(&env);
    assert_eq!(env.state(), empty, "the libcni case left keys behind");
    the_agent_not_running_is_try_again_later(env);
}

/// VERSION names the versions the agent speaks; STATUS (1.1) says whether ADD can work.
fn version_and_status(env: &Env) {
    let call = Call { command: "VERSION", ..Default::default() };
    let out = env.invoke("h1", &call, &json!({"cniVersion": "1.0.0"}));
    assert!(out.ok, "VERSION: {}", out.stdout);
    assert_eq!(out.json, json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}));

    let status = Call { command: "STATUS", ..Default::default() };
    let out = env.invoke("h1", &status, &env.conf("h1", "1.1.0", &json!({})));
    assert!(out.ok && out.stdout.is_empty(), "STATUS: {}", out.stdout);
    let out = env.invoke("h1", &status, &env.conf("h1", "1.1.0", &json!({"name": "nowhere"})));
    assert!(!out.ok, "STATUS of a missing network passed");
    assert_eq!(out.code(), 50, "{}", out.stdout);
    assert!(out.msg().contains("\"nowhere\""), "{}", out.msg());
}

/// A pod on each host (Kubernetes arguments on h1, podman's on h2) gets eth0 with the address,
/// MTU and default route the result says; they reach each other across hosts, and a CLI
/// container reaches them.
fn add_makes_a_pod_that_reaches_across_hosts(env: &Env) {
    let a_ns = env.pod_ns("pa");
    let b_ns = env.pod_ns("pb");
    // What containerd sends (../shared/runtimes/cni-transcript.txt), with fields the plugin
    // does not know: they are ignored.
    let k8s = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=aaa;K8S_POD_UID=u1";
    let more = json!({
        "capabilities": {"portMappings": true, "aliases": true},
        "runtimeConfig": {"portMappings": [], "io.kubernetes.cri.pod-annotations": {"x": "y"}},
        "ipam": {"type": "host-local"},
        "somethingNew": {"nested": [1, 2]},
    });
    let call = Call { command: "ADD", container_id: "ctr-a", netns: &a_ns, ifname: "eth0", args: k8s };
    let out = env.invoke("h1", &call, &env.conf("h1", "1.0.0", &more));
    assert!(out.ok, "ADD: {}", out.stdout);
    let a = out.json;
    let a_ip = address(&a);
    assert_eq!(
        a,
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": MacAddr::from_ip(a_ip).to_string(), "sandbox": a_ns}],
            "ips": [{"address": format!("{a_ip}/24"), "gateway": GATEWAY.to_string(), "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": GATEWAY.to_string()}],
            "dns": {"nameservers": [GATEWAY.to_string()]},
        })
    );
    // What the result says is what the pod has.
    let link = &ip_json(&a_ns, &["addr", "show", "eth0"])[0];
    assert_eq!(link["address"], MacAddr::from_ip(a_ip).to_string());
    // The interface has the uplink's MTU, for traffic out through the host; the route to the
    // overlay's subnet has what VXLAN leaves of it.
    assert_eq!(link["mtu"], 1500, "the uplink's MTU");
    assert_eq!(subnet_route(&a_ns, "eth0").2, Some(1450), "uplink 1500 minus VXLAN");
    assert_eq!(link["addr_info"][0]["local"], a_ip.to_string());
    assert_eq!(link["addr_info"][0]["prefixlen"], 24);
    let routes = ip_json(&a_ns, &["route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], GATEWAY.to_string(), "{routes}");
    // The pod is a container of the overlay, named after its pod and namespace.
    assert_eq!(env.cluster.address(NET, "web.default"), a_ip);

    // podman's arguments: the container's name, no namespace; a 1.1 result has the MTU.
    let call = Call {
        command: "ADD",
        container_id: "ctr-b",
        netns: &b_ns,
        ifname: "eth0",
        args: "IgnoreUnknown=1;K8S_POD_NAME=charming_davinci",
    };
    let out = env.invoke("h2", &call, &env.conf("h2", "1.1.0", &json!({})));
    assert!(out.ok, "ADD on h2: {}", out.stdout);
    let b = out.json;
    let b_ip = address(&b);
    assert_eq!(b["interfaces"][0]["mtu"], 1500, "{b}");
    assert_eq!(env.cluster.address(NET, "charming_davinci"), b_ip);
    assert_ne!(a_ip, b_ip);

    assert!(comes_to_ping(&a_ns, b_ip), "pod on h1 does not reach the pod on h2");
    assert!(comes_to_ping(&b_ns, a_ip), "pod on h2 does not reach the pod on h1");

    // A CLI container on h2 and the pods.
    env.cluster.ok(&["container", "create", "--host", "h2", "--network", NET, "cli"]);
    let cli_ip = env.cluster.address(NET, "cli");
    assert!(comes_to_ping(&a_ns, cli_ip), "pod on h1 does not reach the CLI container on h2");
    assert!(env.cluster.comes_to_reach("h2", "cli", a_ip), "the CLI container does not reach the pod");
    env.cluster.ok(&["container", "rm", "cli"]);

    env.del("h1", "ctr-a", &a_ns, Some(&a));
    env.del("h2", "ctr-b", &b_ns, Some(&b));
    // The interface went with the endpoint; the pod's namespace is the runtime's and stays.
    let links = ip_json(&a_ns, &["link", "show"]);
    assert_eq!(links.as_array().map(Vec::len), Some(1), "only lo is left: {links}");
    assert!(env.veths("h1").is_empty() && env.veths("h2").is_empty());
    assert!(!env.cluster.maps_hold("h2", a_ip), "h2 still holds the deleted pod");
}

/// ADD of an attachment that exists answers the same result and makes nothing twice; ADD of
/// another sandbox of the same pod while the first exists is refused, naming why.
fn add_again_answers_the_same(env: &Env) {
    let ns = env.pod_ns("again");
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=twice";
    let first = env.add("h1", "ctr-again", &ns, args);
    let state = env.state();
    let second = env.add("h1", "ctr-again", &ns, args);
    assert_eq!(first, second, "a repeated ADD answered differently");
    assert_eq!(env.state(), state, "a repeated ADD wrote something");
    assert_eq!(env.veths("h1").len(), 1, "a repeated ADD made a second interface");

    let other = env.pod_ns("again2");
    let call = Call { command: "ADD", container_id: "ctr-again-2", netns: &other, ifname: "eth0", args };
    let out = env.invoke("h1", &call, &env.conf("h1", "1.0.0", &json!({})));
    assert!(!out.ok, "a second sandbox of the pod was added: {}", out.stdout);
    assert_eq!(out.code(), 11, "{}", out.stdout);
    assert!(
        out.msg().contains("\"twice.default\"") && out.msg().contains("another sandbox"),
        "{}",
        out.msg()
    );
    assert_eq!(env.state(), state, "the refused ADD wrote something");

    // CHECK (which neither podman nor containerd sends): the attachment as ADD made it.
    let check = Call { command: "CHECK", container_id: "ctr-again", netns: &ns, ifname: "eth0", args };
    let out = env.invoke("h1", &check, &env.conf("h1", "1.0.0", &json!({"prevResult": first})));
    assert!(out.ok && out.stdout.is_empty(), "CHECK: {}", out.stdout);
    let mut wrong = first.clone();
    wrong["ips"][0]["address"] = json!("10.0.30.250/24");
    let out = env.invoke("h1", &check, &env.conf("h1", "1.0.0", &json!({"prevResult": wrong})));
    assert!(!out.ok && out.msg().contains(&format!("{}/24", address(&first))), "{}", out.stdout);
    let unknown = Call { container_id: "ctr-never", ..check.clone() };
    let out = env.invoke("h1", &unknown, &env.conf("h1", "1.0.0", &json!({})));
    assert_eq!(out.code(), 3, "CHECK of an unknown container: {}", out.stdout);
    // The interface taken down behind the runtime's back: CHECK says so.
    sh(&mut in_net(&ns, &["ip", "link", "set", "eth0", "down"]));
    let out = env.invoke("h1", &check, &env.conf("h1", "1.0.0", &json!({})));
    assert!(!out.ok && out.msg().contains("is down"), "CHECK of a downed interface: {}", out.stdout);
    let old = Call { container_id: "ctr-again", ..check };
    let out = env.invoke("h1", &old, &env.conf("h1", "0.3.1", &json!({})));
    assert_eq!(out.code(), 1, "CHECK at 0.3.1: {}", out.stdout);

    env.del("h1", "ctr-again", &ns, None);
}

/// A pod whose namespace already routes the network's subnet by another interface (another
/// plugin's, in a chain): ADD puts the overlay's route beside it, as the kernel adds an
/// address's own prefix route, instead of failing on the existing one.
fn add_beside_another_route_to_the_subnet(env: &Env) {
    let ns = env.pod_ns("beside");
    sh(&mut in_net(&ns, &["ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1"]));
    sh(&mut in_net(&ns, &["ip", "addr", "add", "10.0.30.250/24", "dev", "other0"]));
    sh(&mut in_net(&ns, &["ip", "link", "set", "other0", "up"]));
    sh(&mut in_net(&ns, &["ip", "link", "set", "other1", "up"]));
    assert_eq!(subnet_route(&ns, "other0").0, SUBNET, "the other interface's route");
    let result = env.add("h1", "ctr-beside", &ns, "");
    let (prefix, src, mtu) = subnet_route(&ns, "eth0");
    assert_eq!((prefix.as_str(), mtu), (SUBNET, Some(1450)));
    assert_eq!(src, address(&result).to_string());
    assert_eq!(subnet_route(&ns, "other0").0, SUBNET, "the other interface's route is still there");
    env.del("h1", "ctr-beside", &ns, Some(&result));
}

/// DEL twice, with and without prevResult, with an empty CNI_NETNS after the namespace is gone,
/// and of an id never added: each succeeds and prints nothing.
fn del_is_idempotent(env: &Env) {
    let ns = env.pod_ns("del");
    let result = env.add("h1", "ctr-del", &ns, "");
    // No pod arguments: the container is named after the id.
    assert_eq!(env.cluster.address(NET, "cni-ctr-del"), address(&result));
    env.del("h1", "ctr-del", &ns, Some(&result));
    env.del("h1", "ctr-del", &ns, Some(&result));
    env.del("h1", "ctr-del", &ns, None);
    env.del("h1", "ctr-del", "", None);
    env.del("h2", "never-added", "", None);

    // containerd's order: the namespace goes first, then a DEL without it.
    let gone = env.pod_ns("del-gone");
    env.add("h1", "ctr-gone", &gone, "");
    ip(&["netns", "del", gone.trim_start_matches("/run/netns/")]).unwrap_or_else(|e| panic!("{e:#}"));
    env.del("h1", "ctr-gone", "", None);
    env.del("h1", "ctr-gone", "", None);
    assert!(
        wait_for(Duration::from_secs(10), || env.veths("h1").is_empty().then_some(())).is_some(),
        "interfaces left: {:?}",
        env.veths("h1")
    );
}

/// Every refusal is CNI error JSON with the spec's code and a message that names the problem,
/// and writes nothing.
fn errors_are_cni_errors(env: &Env) {
    let ns = env.pod_ns("err");
    let host_own = format!("/run/netns/{}", env.host_ns("h1"));
    let add = Call { command: "ADD", container_id: "ctr-err", netns: &ns, ifname: "eth0", args: "" };
    let cases: Vec<(&str, Call<'_>, Value, u64, &str)> = vec![
        ("unknown network", add.clone(), env.conf("h1", "1.0.0", &json!({"name": "nowhere"})), 7, "\"nowhere\""),
        ("no network named", add.clone(), env.conf("h1", "1.0.0", &json!({"name": ""})), 7, "names no network"),
        ("unknown version", add.clone(), env.conf("h1", "9.9.9", &json!({})), 1, "9.9.9"),
        (
            "no container id",
            Call { container_id: "", ..add.clone() },
            env.conf("h1", "1.0.0", &json!({})),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "bad ifname",
            Call { ifname: "a/b", ..add.clone() },
            env.conf("h1", "1.0.0", &json!({})),
            4,
            "CNI_IFNAME",
        ),
        ("no netns", Call { netns: "", ..add.clone() }, env.conf("h1", "1.0.0", &json!({})), 4, "CNI_NETNS"),
        (
            "the host's own namespace",
            Call { netns: &host_own, ..add.clone() },
            env.conf("h1", "1.0.0", &json!({})),
            4,
            "this host's own network namespace",
        ),
        (
            "an SCTP port mapping",
            add.clone(),
            env.conf(
                "h1",
                "1.0.0",
                &json!({"runtimeConfig": {"portMappings": [{"containerPort": 80, "hostPort": 18081, "protocol": "sctp"}]}}),
            ),
            2,
            "\"sctp\" is not published",
        ),
        (
            "a port mapping to port 0",
            add.clone(),
            env.conf(
                "h1",
                "1.0.0",
                &json!({"runtimeConfig": {"portMappings": [{"HostPort": 0, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}]}}),
            ),
            7,
            "hostPort 0 -> containerPort 80/tcp",
        ),
        (
            "an unknown command",
            Call { command: "FROB", ..add.clone() },
            env.conf("h1", "1.0.0", &json!({})),
            4,
            "FROB",
        ),
        ("GC before 1.1", Call { command: "GC", ..add.clone() }, env.conf("h1", "1.0.0", &json!({})), 1, "GC"),
    ];
    for (what, call, conf, code, needle) in cases {
        let out = env.invoke("h1", &call, &conf);
        assert!(!out.ok, "{what}: accepted: {}", out.stdout);
        assert_eq!(out.code(), code, "{what}: {}", out.stdout);
        assert!(out.msg().contains(needle), "{what}: {:?} does not name {needle:?}", out.msg());
        assert!(out.json["cniVersion"].is_string(), "{what}: no cniVersion: {}", out.stdout);
    }
    // Not JSON at all: refused by the plugin before the agent is asked.
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo '{{not json' | CNI_COMMAND=ADD CNI_CONTAINERID=x CNI_NETNS={ns} CNI_IFNAME=eth0 {}",
        overlay_tests::binary("overlay-cni").display()
    ));
    let out = try_sh(&mut cmd);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(!out.status.success() && json["code"] == 6, "bad JSON: {json}");
    assert!(env.veths("h1").is_empty(), "a refused ADD made an interface");
}

/// `portMappings` as podman and containerd pass them: the pod's port on its host's address, from
/// another host, with the client's own address seen; a second pod asking for the same host port
/// is refused naming the first and writes nothing; DEL frees the port for the next pod.
fn port_mappings_publish_the_pods_ports(env: &Env) {
    let h2 = env.host_ns("h2").to_owned();
    let mapping = |spelling: &str| match spelling {
        "podman" => json!({"runtimeConfig": {"portMappings": [
            {"containerPort": 80, "hostPort": 18081, "protocol": "tcp"},
            {"containerPort": 53, "hostPort": 18053, "protocol": "udp"}]}}),
        _ => json!({"runtimeConfig": {"portMappings": [
            {"HostPort": 18081, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}]}}),
    };
    let add_with = |id: &str, netns: &str, spelling: &str| {
        let call = Call { command: "ADD", container_id: id, netns, ifname: "eth0", args: "" };
        env.invoke("h1", &call, &env.conf("h1", "1.0.0", &mapping(spelling)))
    };
    let web = env.pod_ns("web");
    let first = add_with("ctr-web", &web, "podman");
    assert!(first.ok, "ADD with port mappings: {}", first.stdout);
    let _tcp = serve(&ns_name(&web), "web peer", &["peer", "80", "web"]);
    let _udp = serve(&ns_name(&web), "web peer udp", &["peer", "53", "web"]);
    let reached = |to: &str, proto: &str| wait_for(Duration::from_secs(10), || ask(&h2, to, proto));
    assert_eq!(reached("198.18.0.1:18081", "tcp").as_deref(), Some("web 198.18.0.2"));
    assert_eq!(reached("198.18.0.1:18053", "udp").as_deref(), Some("web 198.18.0.2"));
    assert_eq!(ask(&h2, "198.18.0.2:18081", "tcp"), None, "the port is published on h1 only");

    // Another pod, containerd's spelling, the same host port: refused naming the holder.
    let before = env.state();
    let other = env.pod_ns("other");
    let out = add_with("ctr-other", &other, "containerd");
    assert!(!out.ok, "a second pod got port 18081: {}", out.stdout);
    assert!(out.msg().contains("18081") && out.msg().contains("\"cni-ctr-web\""), "{}", out.msg());
    assert_eq!(env.state(), before, "a refused ADD wrote keys");

    // DEL frees it: the next pod gets it and the port leads there.
    env.del("h1", "ctr-web", &web, Some(&first.json));
    let out = add_with("ctr-other", &other, "containerd");
    assert!(out.ok, "the port was not freed by DEL: {}", out.stdout);
    let _other = serve(&ns_name(&other), "other peer", &["peer", "80", "other"]);
    assert_eq!(reached("198.18.0.1:18081", "tcp").as_deref(), Some("other 198.18.0.2"));
    env.del("h1", "ctr-other", &other, Some(&out.json));
}

/// The namespace name of a pod's `/run/netns/<name>` path.
fn ns_name(netns: &str) -> String {
    netns.trim_start_matches("/run/netns/").to_owned()
}

/// An ADD the agent cannot complete (the pod has an eth0 already) is answered with the
/// agent's error, and leaves no key, no interface on the host and nothing in the pod.
fn a_failed_add_leaves_nothing(env: &Env) {
    let ns = env.pod_ns("taken");
    // Its own eth0 (a veth pair inside the pod: this kernel has no dummy interfaces).
    sh(&mut in_net(&ns, &["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "mine"]));
    let links = || -> Vec<(String, String)> {
        ip_json(&ns, &["link", "show"])
            .as_array()
            .expect("links")
            .iter()
            .map(|l| {
                (
                    l["ifname"].as_str().unwrap_or("").to_owned(),
                    l["address"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let in_pod = links();
    let before = env.state();
    let call = Call { command: "ADD", container_id: "ctr-taken", netns: &ns, ifname: "eth0", args: "" };
    let out = env.invoke("h1", &call, &env.conf("h1", "1.0.0", &json!({})));
    assert!(!out.ok, "ADD into a pod with an eth0: {}", out.stdout);
    assert_eq!(out.code(), 5, "{}", out.stdout);
    assert!(out.msg().contains("eth0") && out.msg().contains("already has"), "{}", out.msg());
    assert_eq!(env.state(), before, "the failed ADD left keys");
    assert!(
        wait_for(Duration::from_secs(10), || env.veths("h1").is_empty().then_some(())).is_some(),
        "the failed ADD left interfaces: {:?}",
        env.veths("h1")
    );
    assert_eq!(links(), in_pod, "the pod's interfaces changed");
    assert_eq!(in_pod.len(), 3, "lo and the pod's own pair: {in_pod:?}");
    // The same ADD with another interface name works.
    let call = Call { ifname: "net1", ..call };
    let out = env.invoke("h1", &call, &env.conf("h1", "1.0.0", &json!({})));
    assert!(out.ok && out.json["interfaces"][0]["name"] == "net1", "ADD as net1: {}", out.stdout);
    let del = Call { command: "DEL", ..call };
    assert!(env.invoke("h1", &del, &env.conf("h1", "1.0.0", &json!({}))).ok);
}

/// GC (1.1) removes this host's attachments of the network that the runtime does not name, and
/// keeps those it names.
fn gc_removes_what_the_runtime_no_longer_has(env: &Env) {
    let keep_ns = env.pod_ns("keep");
    let lose_ns = env.pod_ns("lose");
    let keep = env.add("h1", "ctr-keep", &keep_ns, "K8S_POD_NAMESPACE=gc;K8S_POD_NAME=keep");
    env.add("h1", "ctr-lose", &lose_ns, "K8S_POD_NAMESPACE=gc;K8S_POD_NAME=lose");
    let gc = Call { command: "GC", ..Default::default() };
    let valid = json!({"cni.dev/valid-attachments": [{"containerID": "ctr-keep", "ifname": "eth0"}]});
    let out = env.invoke("h1", &gc, &env.conf("h1", "1.1.0", &valid));
    assert!(out.ok, "GC: {}", out.stdout);
    let names: Vec<String> =
        env.keys("containers/").iter().filter_map(|k| k.rsplit('/').next().map(str::to_owned)).collect();
    assert_eq!(names, ["keep.gc"], "GC kept the wrong containers");
    assert!(
        wait_for(Duration::from_secs(10), || (env.veths("h1").len() == 1).then_some(())).is_some(),
        "GC left the interface: {:?}",
        env.veths("h1")
    );
    assert!(env.cluster.maps_hold("h1", address(&keep)), "GC removed the attachment it was told to keep");
    env.del("h1", "ctr-keep", &keep_ns, None);
}

/// With the agent down, ADD and DEL are "try again later" (11) naming the socket; once it is
/// back, the ADD works.
fn the_agent_not_running_is_try_again_later(mut env: Env) {
    env.cluster.kill_agent("h1");
    let ns = env.pod_ns("later");
    let sock = cni::socket(&env.cluster.topo.run, "h1");
    for command in ["ADD", "DEL"] {
        let call = Call { command, container_id: "ctr-later", netns: &ns, ifname: "eth0", args: "" };
        let out = env.invoke("h1", &call, &env.conf("h1", "1.0.0", &json!({})));
        assert!(!out.ok, "{command} with the agent down: {}", out.stdout);
        assert_eq!(out.code(), 11, "{command}: {}", out.stdout);
        assert!(out.msg().contains(&sock.display().to_string()), "{command}: {}", out.msg());
    }
    let status = Call { command: "STATUS", ..Default::default() };
    assert_eq!(env.invoke("h1", &status, &env.conf("h1", "1.1.0", &json!({}))).code(), 50);
    env.cluster.start_agent("h1");
    let result = wait_for(Duration::from_secs(30), || {
        let call = Call { command: "ADD", container_id: "ctr-later", netns: &ns, ifname: "eth0", args: "" };
        let out = env.invoke("h1", &call, &env.conf("h1", "1.0.0", &json!({})));
        out.ok.then_some(out.json)
    })
    .expect("ADD never worked once the agent was back");
    assert_eq!(result["interfaces"][0]["sandbox"], ns.as_str());
    env.del("h1", "ctr-later", &ns, Some(&result));
}

/// libcni, the library containerd and CRI-O call CNI through, driven as cnitool drives it
/// (`libcni-run`, tests/libcni): it parses ADD's result as a 1.0 result, caches it, and hands it
/// to CHECK and DEL as prevResult; CHECK fails once the interface is down and passes once it is
/// up again; DEL twice succeeds.
fn libcni_adds_checks_and_deletes(env: &Env) {
    if let Some(why) = cni::libcni_missing() {
        assert!(!overlay_tests::skip(&why), "libcni is required");
        return;
    }
    let run = &env.cluster.topo.run;
    let tool = cni::build_libcni_run(run).unwrap_or_else(|e| panic!("building libcni-run: {e:#}"));
    let conf_dir = run.path("libcni-conf");
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": NET,
        "plugins": [{"type": "overlay-cni", "agentSocket": cni::socket(run, "h1")}],
    });
    std::fs::write(conf_dir.join("50-pods.conflist"), conflist.to_string()).expect("conflist");
    let plugins = overlay_tests::binary("overlay-cni").parent().expect("bin dir").to_owned();
    let ns = env.pod_ns("libcni");
    let libcni = |command: &str| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", env.host_ns("h1")])
            .arg(&tool)
            .args([command, NET, &ns])
            .env("CNI_CONF_DIR", &conf_dir)
            .env("CNI_PATH", &plugins)
            .env("CNI_CACHE_DIR", run.path("libcni-cache"))
            .env("CNI_CONTAINERID", "ctr-libcni")
            .env("CNI_ARGS", "K8S_POD_NAMESPACE=tools;K8S_POD_NAME=cnitool");
        try_sh(&mut cmd)
    };
    let out = libcni("add");
    assert!(out.status.success(), "libcni ADD: {}", String::from_utf8_lossy(&out.stderr));
    let result: Value = serde_json::from_slice(&out.stdout).expect("libcni's result");
    let ip = address(&result);
    assert_eq!(result["interfaces"][0]["sandbox"], ns.as_str(), "{result}");
    assert_eq!(env.cluster.address(NET, "cnitool.tools"), ip);
    let out = libcni("check");
    assert!(out.status.success(), "libcni CHECK: {}", String::from_utf8_lossy(&out.stderr));
    let set = |state: &str| sh(&mut in_net(&ns, &["ip", "link", "set", "eth0", state]));
    set("down");
    let out = libcni("check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is down"), "libcni CHECK of a downed eth0: {err}");
    set("up");
    assert!(libcni("check").status.success(), "libcni CHECK after eth0 is up again");
    for _ in 0..2 {
        let out = libcni("del");
        assert!(out.status.success(), "libcni DEL: {}", String::from_utf8_lossy(&out.stderr));
    }
}
