//! Names answered in the datapath, end to end: real etcd, an agent per host filling NAMES from
//! the desired state, and a real DNS client (busybox's nslookup) in a container asking its
//! network's gateway, where the from-container program answers (docs/names.md).

use std::{net::Ipv4Addr, process::Output, time::Duration};

use overlay_tests::{cluster::Cluster, in_ns, skip_unless_privileged, try_sh, wait_for};

/// `busybox nslookup name server` from the container `name` on `host`. Bounded: a query nobody
/// answers makes nslookup retry for a while.
fn nslookup(c: &Cluster, host: &str, container: &str, name: &str, server: &str) -> Output {
    let ns = c.container_ns(host, container);
    try_sh(&mut in_ns(&ns, &["timeout", "4", "busybox", "nslookup", name, server]))
}

/// Whether the output of nslookup gives `addr` as an answer (busybox prints the server's own
/// address as "Address:\t<server>:53", answers as "Address: <ip>").
fn answers(out: &Output, addr: Ipv4Addr) -> bool {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().any(|l| l.trim() == format!("Address: {addr}"))
}

/// The NAMES entries of `host` for `name` (dotted) as bpftool prints them: (vni, addresses).
fn names_entry(c: &Cluster, host: &str, name: &str) -> Vec<(u64, Vec<Ipv4Addr>)> {
    let mut wire = Vec::new();
    for label in name.split('.') {
        wire.push(label.len() as u64);
        wire.extend(label.bytes().map(u64::from));
    }
    wire.resize(64, 0);
    c.map(host, "NAMES")
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| {
            e["key"]["name"].as_array().map(|a| a.iter().map(|b| b.as_u64().unwrap()).collect::<Vec<_>>())
                == Some(wire.clone())
        })
        .map(|e| {
            let count = e["value"]["count"].as_u64().expect("count") as usize;
            let addrs = e["value"]["addrs"].as_array().expect("addrs")[..count]
                .iter()
                .map(|a| {
                    let o: Vec<u8> =
                        a.as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
                    Ipv4Addr::new(o[0], o[1], o[2], o[3])
                })
                .collect();
            (e["key"]["vni"].as_u64().expect("vni"), addrs)
        })
        .collect()
}

#[test]
fn names_are_answered_in_the_datapath_across_hosts_per_network_and_go_with_the_container() {
    if skip_unless_privileged() {
        return;
    }
    let Some(c) = Cluster::start("names", 2, 10) else { return };
    c.ok(&["network", "create", "--subnet", "10.61.0.0/24", "front"]);
    c.ok(&["network", "create", "--subnet", "10.62.0.0/24", "back"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "front", "web"]);
    c.ok(&["container", "create", "--host", "h2", "--network", "front", "client"]);
    c.ok(&["container", "create", "--host", "h2", "--network", "back", "db"]);
    let web = c.address("front", "web");
    let front_gw = c.inspect("front")["IPAM"]["Config"][0]["Gateway"].as_str().expect("gateway").to_owned();
    let back_gw = c.inspect("back")["IPAM"]["Config"][0]["Gateway"].as_str().expect("gateway").to_owned();
    let front_vni = c.inspect("front")["Options"]["vni"].as_str().map(|v| v.parse::<u64>().unwrap());

    // From h2, another host than web's: web and web.front resolve to web's address, answered
    // by the program on client's veth.
    for name in ["web", "web.front", "WEB.Front"] {
        let got = wait_for(Duration::from_secs(10), || {
            let out = nslookup(&c, "h2", "client", name, &front_gw);
            answers(&out, web).then_some(out)
        });
        assert!(got.is_some(), "{name} does not resolve to {web} from client on h2");
    }
    // glibc's resolver (getent), through the resolv.conf the agent wrote for client's sandbox
    // (`ip netns exec` puts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf): the gateway.
    let ns = c.container_ns("h2", "client");
    let resolv =
        std::fs::read_to_string(format!("/etc/netns/{ns}/resolv.conf")).expect("client's resolv.conf");
    assert!(resolv.lines().any(|l| l == format!("nameserver {front_gw}")), "{resolv}");
    let hosts = std::fs::read_to_string(format!("/etc/netns/{ns}/hosts")).expect("client's hosts");
    assert!(hosts.lines().any(|l| l.ends_with("\tclient")), "{hosts}");
    let got = try_sh(&mut in_ns(&ns, &["getent", "ahostsv4", "web"]));
    let text = String::from_utf8_lossy(&got.stdout);
    assert!(text.lines().any(|l| l.starts_with(&format!("{web} "))), "getent ahostsv4 web: {text}");
    // `overlay container exec` puts the same files over /etc, as `ip netns exec` does.
    let exec = c.cli_on("h2", &["container", "exec", "client", "--", "getent", "ahostsv4", "web"]);
    let text = String::from_utf8_lossy(&exec.stdout);
    assert!(
        text.lines().any(|l| l.starts_with(&format!("{web} "))),
        "container exec getent: {text}{}",
        String::from_utf8_lossy(&exec.stderr)
    );
    // The entry is in h2's pinned map, as bpftool shows it.
    let entries = names_entry(&c, "h2", "web");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].1, [web]);
    if let Some(vni) = front_vni {
        assert_eq!(entries[0].0, vni);
    }
    assert_eq!(names_entry(&c, "h2", "web.front").len(), 1);

    // db is on another network: no answer for web, from its own gateway or front's.
    for server in [&back_gw, &front_gw] {
        let out = nslookup(&c, "h2", "db", "web", server);
        assert!(
            !answers(&out, web),
            "db resolved web through {server}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Its own name resolves from its own network.
    let db = c.address("back", "db");
    assert!(answers(&nslookup(&c, "h2", "db", "db", &back_gw), db));

    // web goes: within a few seconds its name is gone from h2's map and its answers stop.
    let web_ns = c.container_ns("h1", "web");
    c.ok(&["container", "rm", "web"]);
    assert!(!std::path::Path::new(&format!("/etc/netns/{web_ns}")).exists(), "web's name files are left");
    let gone = wait_for(Duration::from_secs(5), || names_entry(&c, "h2", "web").is_empty().then_some(()));
    assert!(gone.is_some(), "web still in h2's NAMES: {:?}", names_entry(&c, "h2", "web"));
    assert!(names_entry(&c, "h2", "web.front").is_empty());
    let out = nslookup(&c, "h2", "client", "web", &front_gw);
    assert!(!answers(&out, web), "web still resolves: {}", String::from_utf8_lossy(&out.stdout));
    // client's own name stays.
    let client = c.address("front", "client");
    assert!(answers(&nslookup(&c, "h2", "client", "client", &front_gw), client));
}
