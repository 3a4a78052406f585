//! Names answered in the datapath, end to end: real etcd, an agent per host filling NAMES from
//! the desired state, and a real DNS client (busybox's nslookup) in a container asking its
//! network's gateway, where the from-container program answers (docs/names.md).

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Output, Stdio},
    time::Duration,
};

use overlay_tests::{
    Proc, binary,
    cluster::{Cluster, UPSTREAM_DNS},
    in_ns, ip_in, skip_unless_privileged, try_sh, wait_for,
};

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

/// `overlay-probe dns-query` from container `container` on `host`: "rcode=.. tc=.. aa=.. <answers>",
/// or None when no answer came.
fn dig(
    c: &Cluster,
    host: &str,
    container: &str,
    server: &str,
    name: &str,
    qtype: &str,
    tcp: bool,
) -> Option<String> {
    let ns = c.container_ns(host, container);
    let probe = binary("overlay-probe");
    let mut args = vec![probe.to_str().expect("path"), "dns-query", server, name, qtype];
    if tcp {
        args.push("tcp");
    }
    let out = try_sh(&mut in_ns(&ns, &args));
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether the upstream logs `line` within 2 s (lines of earlier queries may come first).
fn upstream_saw(asked: &std::sync::mpsc::Receiver<String>, line: &str) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match asked.recv_timeout(left) {
            Ok(l) if l == line => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// The resolver's count of queries that ended as `outcome`, from the agent's /metrics.
fn resolver_count(c: &Cluster, host: &str, outcome: &str) -> u64 {
    let needle = format!("overlay_resolver_queries_total{{outcome=\"{outcome}\"}} ");
    c.metrics(host)
        .lines()
        .find_map(|l| l.strip_prefix(&needle).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn the_agents_resolver_answers_what_the_maps_cannot_and_relays_the_rest_upstream() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut c) = Cluster::start("resolver", 2, 10) else { return };
    // The upstream: a DNS server beyond the hosts, on the underlay (where every agent's
    // resolv.conf points).
    ip_in(&c.topo.underlay, &["addr", "add", &format!("{UPSTREAM_DNS}/24"), "dev", "br0"])
        .expect("upstream address");
    let mut upstream = Proc::spawn(
        "upstream DNS",
        in_ns(
            &c.topo.underlay,
            &[binary("overlay-probe").to_str().unwrap(), "dns-serve", &format!("{UPSTREAM_DNS}:53")],
        )
        .stdout(Stdio::piped()),
    );
    let mut upstream_log = BufReader::new(upstream.take_stdout().expect("stdout"));
    let mut line = String::new();
    upstream_log.read_line(&mut line).expect("upstream output");
    assert_eq!(line.trim(), "listening");
    // Everything the upstream is asked, from here on.
    let (asked_tx, asked) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in upstream_log.lines().map_while(Result::ok) {
            let _ = asked_tx.send(line);
        }
    });

    c.ok(&["network", "create", "--subnet", "10.63.0.0/24", "front"]);
    c.ok(&["network", "create", "--subnet", "10.64.0.0/24", "back"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "front", "web"]);
    c.ok(&["container", "create", "--host", "h2", "--network", "front", "client"]);
    c.ok(&["network", "connect", "back", "client"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "back", "db"]);
    // Ten endpoints share the alias api: more addresses than a NAMES entry holds (8), so the
    // datapath leaves api to the resolver.
    for i in 0..10 {
        c.ok(&[
            "container",
            "create",
            "--host",
            if i % 2 == 0 { "h1" } else { "h2" },
            "--network",
            "front",
            "--alias",
            "api",
            &format!("api{i}"),
        ]);
    }
    let front_gw = c.inspect("front")["IPAM"]["Config"][0]["Gateway"].as_str().expect("gateway").to_owned();
    let back_gw = c.inspect("back")["IPAM"]["Config"][0]["Gateway"].as_str().expect("gateway").to_owned();
    let web = c.address("front", "web");
    let db = c.address("back", "db");
    let mut apis: Vec<String> = (0..10).map(|i| c.address("front", &format!("api{i}")).to_string()).collect();
    apis.sort();

    // A name outside the overlay: relayed to the upstream, its answer relayed back.
    let got = wait_for(Duration::from_secs(10), || {
        dig(&c, "h2", "client", &front_gw, "outside.test", "A", false).filter(|a| a.contains("198.18.99.1"))
    });
    assert_eq!(got.as_deref(), Some("rcode=0 tc=0 aa=0 198.18.99.1"), "outside.test through the resolver");
    assert!(upstream_saw(&asked, "udp outside.test. A"), "the upstream was not asked");
    let h2 = c.topo.host("h2");
    assert!(h2.counter("to_resolver") >= 1, "the query went up through the datapath's hand-off");

    // Truncation passes through as the upstream made it, and the TCP retry is relayed over TCP.
    assert_eq!(
        dig(&c, "h2", "client", &front_gw, "big.outside.test", "A", false).as_deref(),
        Some("rcode=0 tc=1 aa=0")
    );
    let whole =
        dig(&c, "h2", "client", &front_gw, "big.outside.test", "A", true).expect("an answer over TCP");
    assert_eq!(whole.split(' ').count() - 3, 60, "{whole}");
    // glibc does the same on its own: TC, then TCP.
    let ns = c.container_ns("h2", "client");
    let out = try_sh(&mut in_ns(&ns, &["getent", "ahostsv4", "big.outside.test"]));
    let distinct: std::collections::BTreeSet<&str> = std::str::from_utf8(&out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        distinct.len(),
        60,
        "getent through truncation and TCP: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Debian's dig, the same questions: over UDP, over TCP, and the reverse.
    let dig_cmd = |args: &[&str]| {
        let mut cmd = vec!["dig", "+short", "+tries=1", "+time=3"];
        let at = format!("@{front_gw}");
        cmd.push(&at);
        cmd.extend(args);
        let out = try_sh(&mut in_ns(&ns, &cmd));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(dig_cmd(&["outside.test"]), "198.18.99.1", "dig outside.test");
    assert_eq!(dig_cmd(&["+tcp", "big.outside.test"]).lines().count(), 60, "dig +tcp big.outside.test");
    assert_eq!(dig_cmd(&["-x", &web.to_string()]), "web.front.", "dig -x web");

    // What the map cannot hold: api's ten addresses, authoritative, from the resolver.
    let got = dig(&c, "h2", "client", &front_gw, "api", "A", false).expect("api");
    assert_eq!(got, format!("rcode=0 tc=0 aa=1 {}", apis.join(" ")));
    assert_eq!(dig(&c, "h1", "web", &front_gw, "api.front", "A", true).expect("api over TCP"), got);
    // The reverse: web's name by its address; an unused address of the subnet is NXDOMAIN
    // without a question upstream.
    let o = web.octets();
    let ptr = format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0]);
    assert_eq!(
        dig(&c, "h2", "client", &front_gw, &ptr, "PTR", false).as_deref(),
        Some("rcode=0 tc=0 aa=1 web.front.")
    );
    assert_eq!(
        dig(&c, "h2", "client", &front_gw, "250.0.63.10.in-addr.arpa", "PTR", false).as_deref(),
        Some("rcode=3 tc=0 aa=1")
    );
    // client is on front and back: it resolves db (back) whichever gateway it asks; web (front
    // only) does not, and its question goes upstream, which says NXDOMAIN.
    for gw in [&front_gw, &back_gw] {
        let got = dig(&c, "h2", "client", gw, "db", "A", true).expect("db");
        assert_eq!(got, format!("rcode=0 tc=0 aa=1 {db}"), "db through {gw}");
    }
    assert_eq!(dig(&c, "h1", "web", &front_gw, "db", "A", false).as_deref(), Some("rcode=3 tc=0 aa=0"));
    assert!(upstream_saw(&asked, "udp db. A"), "web's db went upstream");
    // A container cannot use another network's gateway as a way out: db (back) asking front's
    // gateway gets nothing.
    assert_eq!(dig(&c, "h1", "db", &front_gw, "outside.test", "A", false), None);

    // Malformed over TCP (the datapath only looks at UDP): a header that promises a question
    // it does not carry is answered FORMERR with its ID; an opcode it does not do, NOTIMP.
    let formerr_before = resolver_count(&c, "h2", "formerr");
    let probe = binary("overlay-probe");
    let raw = |hex: &str| {
        let out = try_sh(&mut in_ns(&ns, &[probe.to_str().unwrap(), "dns-raw", &front_gw, hex, "tcp"]));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(raw("abcd01000001000000000000"), "abcd81810000000000000000", "FORMERR");
    let notimp = raw("abcd21000000000000000000");
    // ID, QR set with opcode NOTIFY (4), RCODE NOTIMP (4).
    assert!(
        notimp.starts_with("abcd") && notimp.get(4..5) == Some("a") && notimp.get(7..8) == Some("4"),
        "NOTIMP: {notimp}"
    );
    assert_eq!(resolver_count(&c, "h2", "formerr"), formerr_before + 1);
    assert!(resolver_count(&c, "h2", "forwarded") >= 3);

    // The agent restarts: the path and sockets are taken up again, answers go on.
    c.kill_agent("h2");
    c.start_agent("h2");
    let again = wait_for(Duration::from_secs(10), || dig(&c, "h2", "client", &front_gw, "api", "A", true));
    assert_eq!(again.as_deref(), Some(got.as_str()), "after the agent's restart");
    let rules = try_sh(&mut in_ns(&c.topo.host("h2").ns, &["ip", "rule", "show", "table", "4789"]));
    assert_eq!(
        String::from_utf8_lossy(&rules.stdout).lines().count(),
        2,
        "one rule per gateway, not doubled"
    );

    // The gateways are h2's own addresses, on lo under the resolver's label.
    let h2_ns = c.topo.host("h2").ns.clone();
    let ours = || {
        let out =
            try_sh(&mut in_ns(&h2_ns, &["ip", "-4", "-o", "addr", "show", "dev", "lo", "label", "lo:ovdns"]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = ours();
    assert!(
        [&front_gw, &back_gw].iter().all(|gw| listed.contains(&format!("inet {gw}/32"))),
        "h2's resolver addresses: {listed}"
    );
    // The containers of h2 go: their gateways leave lo, and the rules and routes go with them.
    for name in ["client", "api1", "api3", "api5", "api7", "api9"] {
        c.ok(&["container", "rm", name]);
    }
    let clean = wait_for(Duration::from_secs(10), || {
        let rules = try_sh(&mut in_ns(&h2_ns, &["ip", "rule", "show", "table", "4789"]));
        let routes = try_sh(&mut in_ns(&h2_ns, &["ip", "route", "show", "table", "4789"]));
        (ours().is_empty() && rules.stdout.is_empty() && routes.stdout.is_empty()).then_some(())
    });
    assert!(
        clean.is_some(),
        "h2 keeps resolver addresses, rules or routes (the table's default too) with no container left"
    );
    upstream.kill();
}
