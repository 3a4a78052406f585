//! Egress end to end (docs/egress.md): real etcd, an agent per host, and an "outside"
//! namespace behind a router on the underlay (`outside.rs`). Containers reach it through their
//! host, masqueraded; `--internal` networks do not; published ports lead from a host's address
//! to the right container; and the hosts keep nothing of ours once the containers are gone.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    time::Duration,
};

use overlay_tests::{
    cluster::Cluster,
    in_ns, ip_in,
    outside::{self, OUTSIDE},
    peer::{ask, probe, serve},
    sh, skip_unless_privileged, subnet_route, try_sh, wait_for,
};

/// The MTU of the link between the router and the outside: less than the containers' 1500 (the
/// uplink's, for the way out), so what they send at full size needs path MTU discovery through
/// the host's NAT.
const OUTSIDE_MTU: u32 = 1400;

/// The packet count of the rule of the agent's nftables table in `ns` whose comment starts
/// with `comment`; None when the table (or the rule) is not there.
fn nft_counter(ns: &str, comment: &str) -> Option<u64> {
    let out = try_sh(&mut in_ns(ns, &["nft", "-j", "list", "table", "ip", "overlay"]));
    if !out.status.success() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft JSON");
    json["nftables"].as_array()?.iter().find_map(|o| {
        let rule = o.get("rule")?;
        rule["comment"].as_str()?.starts_with(comment).then_some(())?;
        rule["expr"].as_array()?.iter().find_map(|e| e.get("counter")?["packets"].as_u64())
    })
}

fn table_exists(ns: &str) -> bool {
    try_sh(&mut in_ns(ns, &["nft", "list", "table", "ip", "overlay"])).status.success()
}

/// The rules of `ns` that select the egress table, and the routes in it.
fn egress_rules(ns: &str) -> usize {
    sh(&mut in_ns(ns, &["ip", "rule", "show"])).lines().filter(|l| l.contains("lookup 4790")).count()
}

fn egress_routes(ns: &str) -> String {
    sh(&mut in_ns(ns, &["ip", "route", "show", "table", "4790"]))
}

/// Conntrack entries of `ns` that name `ip`.
fn conntrack_of(ns: &str, ip: Ipv4Addr) -> Vec<String> {
    let out = try_sh(&mut in_ns(ns, &["conntrack", "-L"]));
    let needle = format!("={ip} ");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&needle)).map(str::to_owned).collect()
}

#[test]
fn containers_reach_the_outside_through_their_host_and_published_ports_lead_to_them() {
    if skip_unless_privileged() {
        return;
    }
    let Some(mut c) = Cluster::start("egress", 2, 10) else { return };
    let out_ns = c.topo.run.ns("out");
    let (h1, h2) = (c.topo.host("h1").ns.clone(), c.topo.host("h2").ns.clone());
    outside::build(&c.topo.underlay, &out_ns, OUTSIDE_MTU, &[&h1, &h2]).expect("building the outside");
    let out_at = |port: u16| format!("{OUTSIDE}:{port}");

    c.ok(&["network", "create", "--subnet", "10.71.0.0/24", "pub"]);
    c.ok(&["network", "create", "--subnet", "10.72.0.0/24", "--internal", "int"]);
    c.ok(&["network", "create", "--subnet", "10.73.0.0/24", "pub2"]);
    assert_eq!(c.inspect("pub")["Internal"], false);
    assert_eq!(c.inspect("int")["Internal"], true);
    c.ok(&[
        "container",
        "create",
        "--host",
        "h1",
        "--network",
        "pub",
        "-p",
        "8080:80",
        "-p",
        "53:53/udp",
        "-p",
        "53:53",
        "-p",
        "127.0.0.1:8090:80",
        "a1",
    ]);
    c.ok(&["container", "create", "--host", "h2", "--network", "pub", "-p", "8080:80", "a2"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "int", "i1"]);
    c.ok(&["container", "create", "--host", "h1", "--network", "pub2", "d1"]);
    let (a1, a2, i1, d1) =
        (c.address("pub", "a1"), c.address("pub", "a2"), c.address("int", "i1"), c.address("pub2", "d1"));
    let prefixes: Vec<(String, String)> =
        c.topo.hosts.iter().map(|h| (h.name.clone(), h.netns_prefix.clone())).collect();
    let ns = |host: &str, name: &str| {
        let prefix = &prefixes.iter().find(|(h, _)| h == host).expect("host").1;
        format!("{prefix}{name}")
    };

    // A port is one container's per host, and an internal network publishes none: refused,
    // naming the holder, and nothing written.
    let err = c.refused(&["container", "create", "--host", "h1", "--network", "pub", "-p", "8080:81", "a3"]);
    assert!(err.contains(r#"port 8080/tcp is already published on host "h1" by container "a1""#), "{err}");
    let err = c.refused(&["container", "create", "--host", "h1", "--network", "int", "-p", "9090:80", "i2"]);
    assert!(err.contains("--internal"), "{err}");
    let inspect: serde_json::Value =
        serde_json::from_str(&c.ok(&["container", "inspect", "a1"])).expect("JSON");
    assert_eq!(inspect[0]["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"], "8080", "{inspect}");
    assert_eq!(inspect[0]["NetworkSettings"]["Ports"]["53/udp"][0]["HostPort"], "53", "{inspect}");
    let ls = c.ok(&["container", "ls"]);
    assert!(!ls.contains("a3") && !ls.contains("i2"), "{ls}");

    // Out: TCP and UDP, from both hosts; the outside sees each host's address.
    let _outside_peer = serve(&out_ns, "outside peer", &["peer", "7000", "outside"]);
    let got = wait_for(Duration::from_secs(10), || ask(&ns("h1", "a1"), &out_at(7000), "tcp"));
    assert_eq!(got.as_deref(), Some("outside 198.18.0.1"), "a1 on h1 does not reach the outside");
    assert_eq!(ask(&ns("h1", "a1"), &out_at(7000), "udp").as_deref(), Some("outside 198.18.0.1"));
    let got = wait_for(Duration::from_secs(10), || ask(&ns("h2", "a2"), &out_at(7000), "tcp"));
    assert_eq!(got.as_deref(), Some("outside 198.18.0.2"), "a2 on h2 does not reach the outside");
    assert!(c.topo.host("h1").counter("to_host") >= 2, "{}", c.topo.host("h1").counters());

    // An internal network has no way out, and the drop is counted.
    let before = c.topo.host("h1").counter("drop/no_egress");
    assert_eq!(ask(&ns("h1", "i1"), &out_at(7000), "tcp"), None, "i1 on an internal network got out");
    assert!(c.topo.host("h1").counter("drop/no_egress") > before, "{}", c.topo.host("h1").counters());

    // 100 MiB down from the outside, intact.
    let mut giver = serve(&out_ns, "outside give", &["give", "7001", "104857600"]);
    let mut lines = BufReader::new(giver.take_stdout().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("listening"));
    let fetched = probe(&ns("h1", "a1"), &["fetch", &out_at(7001)]);
    assert!(fetched.status.success(), "fetch: {}", String::from_utf8_lossy(&fetched.stderr));
    let given = lines.next().and_then(Result::ok).expect("give's digest");
    assert_eq!(String::from_utf8_lossy(&fetched.stdout).trim(), given);
    assert!(given.starts_with("104857600 "), "{given}");

    // The way out is not encapsulated: the container sends at the uplink's 1500 toward it (a
    // 1500-byte packet with DF reaches the router and its answer comes back), while its route
    // to the overlay's subnet stays at what VXLAN leaves (1450).
    let full = try_sh(&mut in_ns(
        &ns("h1", "a1"),
        &["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1472", &outside::ROUTER.to_string()],
    ));
    assert!(
        full.status.success(),
        "a 1500-byte packet did not go out: {}",
        String::from_utf8_lossy(&full.stderr)
    );
    assert_eq!(subnet_route(&ns("h1", "a1"), "eth0").2, Some(1450), "a1's route to its overlay subnet");

    // Path MTU: a full-size packet with DF set meets the router's smaller link; its
    // "fragmentation needed" comes back through the host's NAT to the container.
    let ping = try_sh(&mut in_ns(
        &ns("h1", "a1"),
        &["ping", "-c", "2", "-W", "1", "-M", "do", "-s", "1422", &OUTSIDE.to_string()],
    ));
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(
        text.contains(&format!("mtu = {OUTSIDE_MTU}")) || text.contains(&format!("mtu={OUTSIDE_MTU}")),
        "{text}"
    );
    let route = sh(&mut in_ns(&ns("h1", "a1"), &["ip", "route", "get", &OUTSIDE.to_string()]));
    assert!(
        route.contains(&format!("mtu {OUTSIDE_MTU}")),
        "the container did not learn the path MTU: {route}"
    );

    // Published ports, from the outside: each host's port leads to its own container, which
    // sees the client's own address; UDP too; a port not published on h2 leads nowhere.
    let _a1_peer = serve(&ns("h1", "a1"), "a1 peer", &["peer", "80", "a1"]);
    let _a1_dns = serve(&ns("h1", "a1"), "a1 peer udp", &["peer", "53", "a1"]);
    let _a2_peer = serve(&ns("h2", "a2"), "a2 peer", &["peer", "80", "a2"]);
    let _d1_peer = serve(&ns("h1", "d1"), "d1 peer", &["peer", "80", "d1"]);
    let reached = |to: &str, proto: &str| wait_for(Duration::from_secs(5), || ask(&out_ns, to, proto));
    assert_eq!(reached("198.18.0.1:8080", "tcp").as_deref(), Some("a1 198.19.0.2"));
    assert_eq!(reached("198.18.0.2:8080", "tcp").as_deref(), Some("a2 198.19.0.2"));
    assert_eq!(reached("198.18.0.1:53", "udp").as_deref(), Some("a1 198.19.0.2"));
    assert_eq!(ask(&out_ns, "198.18.0.2:53", "udp"), None, "53/udp is published on h1 only");
    // A port published on every address of h1 is not published on the gateways, which are h1's
    // addresses too: h1's containers still reach the resolver there, over TCP and for what the
    // datapath hands up (a reverse lookup).
    let dig = |args: &[&str]| {
        let mut cmd = vec!["dig", "+short", "+tries=1", "+time=3", "@10.71.0.1"];
        cmd.extend(args);
        String::from_utf8_lossy(&try_sh(&mut in_ns(&ns("h1", "a1"), &cmd)).stdout).trim().to_owned()
    };
    assert_eq!(dig(&["+tcp", "a2"]), a2.to_string(), "the resolver over TCP, with 53/tcp published");
    assert_eq!(dig(&["-x", &a2.to_string()]), "a2.pub.", "the resolver over UDP, with 53/udp published");
    // And from the hosts' own processes, on their address.
    assert_eq!(ask(&h2, "198.18.0.1:8080", "tcp").as_deref(), Some("a1 198.18.0.2"));
    // And on loopback, as Docker's proxy serves them there: 8080 (every address) and 8090
    // (published on 127.0.0.1 alone) from h1's own processes, which call as h1; 8090 from
    // nowhere else.
    assert_eq!(ask(&h1, "127.0.0.1:8080", "tcp").as_deref(), Some("a1 198.18.0.1"));
    assert_eq!(ask(&h1, "127.0.0.1:8090", "tcp").as_deref(), Some("a1 198.18.0.1"));
    assert!(nft_counter(&h1, "the host calling a port published here on loopback").unwrap_or(0) >= 2);
    assert_eq!(ask(&out_ns, "198.18.0.1:8090", "tcp"), None, "8090 is published on 127.0.0.1 only");
    assert_eq!(ask(&h2, "198.18.0.1:8090", "tcp"), None, "8090 is published on 127.0.0.1 only");
    // Nor does a neighbour on the underlay reach it by addressing h1's loopback: h2 rewrites
    // what it sends to h1:8090 into 127.0.0.1:8090 on its way out (and the answer, if any, back
    // on its way in), so its packets reach h1 addressed to 127.0.0.1, which h1 must drop as
    // martians instead of translating them to a1.
    let spoof = "table netdev spoof {
           chain out { type filter hook egress device \"eth0\" priority 0;
             ip daddr 198.18.0.1 tcp dport 8090 counter ip daddr set 127.0.0.1; }
           chain in { type filter hook ingress device \"eth0\" priority 0;
             ip saddr 127.0.0.1 tcp sport 8090 counter ip saddr set 198.18.0.1; }
         }";
    let file = std::env::temp_dir().join(format!("{h2}-spoof.nft"));
    std::fs::write(&file, spoof).expect("writing the spoofing table");
    let loaded = try_sh(&mut in_ns(&h2, &["nft", "-f", file.to_str().expect("path")]));
    let _ = std::fs::remove_file(&file);
    assert!(loaded.status.success(), "nft: {}", String::from_utf8_lossy(&loaded.stderr));
    let reached_by_spoof = ask(&h2, "198.18.0.1:8090", "tcp");
    let sent = sh(&mut in_ns(&h2, &["nft", "list", "chain", "netdev", "spoof", "out"]));
    sh(&mut in_ns(&h2, &["nft", "delete", "table", "netdev", "spoof"]));
    assert!(
        sent.contains("counter packets") && !sent.contains("counter packets 0 "),
        "nothing spoofed: {sent}"
    );
    assert_eq!(reached_by_spoof, None, "a neighbour reached a port published on 127.0.0.1 only");
    // And from containers (hairpin): on another host (leaving as h2), on h1 itself, on another
    // network of h1, the container behind the port calling its own: each call is answered by
    // the port it called, and a caller on h1 is seen as h1.
    assert_eq!(ask(&ns("h2", "a2"), "198.18.0.1:8080", "tcp").as_deref(), Some("a1 198.18.0.2"));
    assert_eq!(ask(&ns("h1", "d1"), "198.18.0.1:8080", "tcp").as_deref(), Some("a1 198.18.0.1"));
    assert_eq!(ask(&ns("h1", "a1"), "198.18.0.1:8080", "tcp").as_deref(), Some("a1 198.18.0.1"));
    assert_eq!(ask(&ns("h1", "a1"), "198.18.0.1:53", "udp").as_deref(), Some("a1 198.18.0.1"));
    assert!(nft_counter(&h1, "containers calling a port").unwrap_or(0) >= 3, "hairpin rule unused");

    // Docker's other -p forms: a host range takes its first free port (8080 is a2's on h2).
    let err = c.refused(&[
        "container",
        "create",
        "--host",
        "h2",
        "--network",
        "pub",
        "-p",
        "8000-8001:80-82",
        "a6",
    ]);
    assert!(err.contains("not ranges of one length"), "{err}");
    c.ok(&["container", "create", "--host", "h2", "--network", "pub", "-p", "8080-8082:80", "a6"]);
    let inspect: serde_json::Value =
        serde_json::from_str(&c.ok(&["container", "inspect", "a6"])).expect("JSON");
    assert_eq!(inspect[0]["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"], "8081", "{inspect}");
    let _a6_peer = serve(&ns("h2", "a6"), "a6 peer", &["peer", "80", "a6"]);
    assert_eq!(reached("198.18.0.2:8081", "tcp").as_deref(), Some("a6 198.19.0.2"));
    c.ok(&["container", "rm", "a6"]);

    // A port a server of the host listens on stays the server's (Docker's -p fails there): not
    // published, and the agent says why; the container's other port is published.
    let h1_server = serve(&h1, "h1 server", &["peer", "9999", "h1"]);
    assert_eq!(reached("198.18.0.1:9999", "tcp").as_deref(), Some("h1 198.19.0.2"));
    c.ok(&[
        "container",
        "create",
        "--host",
        "h1",
        "--network",
        "pub",
        "-p",
        "9999:80",
        "-p",
        "9998:80",
        "a5",
    ]);
    let _a5_peer = serve(&ns("h1", "a5"), "a5 peer", &["peer", "80", "a5"]);
    assert_eq!(reached("198.18.0.1:9998", "tcp").as_deref(), Some("a5 198.19.0.2"));
    assert_eq!(
        ask(&out_ns, "198.18.0.1:9999", "tcp").as_deref(),
        Some("h1 198.19.0.2"),
        "a5 took h1's server's port"
    );
    let log = std::fs::read_to_string(&c.topo.host("h1").log).unwrap_or_default();
    assert!(
        log.lines().any(|l| l.contains("not publishing the port") && l.contains("a5") && l.contains("9999")),
        "the agent did not say why 9999 was not published"
    );
    // `container inspect` says so too, naming the server; once the server lets go of the
    // port, a pass publishes it, and the status goes.
    let withheld = || {
        let inspect: serde_json::Value =
            serde_json::from_str(&c.ok(&["container", "inspect", "a5"])).expect("JSON");
        inspect[0]["PortsWithheld"].clone()
    };
    let shown = wait_for(Duration::from_secs(10), || Some(withheld()).filter(|w| !w.is_null()));
    let shown = shown.expect("container inspect does not show a5's withheld port");
    assert_eq!(shown.as_array().map(Vec::len), Some(1), "{shown}");
    assert_eq!(shown[0]["Port"], "9999:80/tcp", "{shown}");
    assert!(shown[0]["Server"].as_str().is_some_and(|s| s.ends_with(":9999/tcp")), "{shown}");
    drop(h1_server);
    assert_eq!(
        wait_for(Duration::from_secs(20), || ask(&out_ns, "198.18.0.1:9999", "tcp")).as_deref(),
        Some("a5 198.19.0.2"),
        "9999 was not published once h1's server went"
    );
    assert!(
        wait_for(Duration::from_secs(10), || withheld().is_null().then_some(())).is_some(),
        "a5's withheld-port status stayed after its port was published"
    );

    // Nothing else reaches a container through its host: not the outside routing to the
    // container's address, not a container of another network on the same host.
    ip_in(&c.topo.underlay, &["route", "add", "10.71.0.0/24", "via", "198.18.0.1"]).expect("route");
    ip_in(&c.topo.underlay, &["route", "add", "10.73.0.0/24", "via", "198.18.0.1"]).expect("route");
    ip_in(&out_ns, &["route", "add", "10.71.0.0/16", "via", &outside::ROUTER_OUT.to_string()])
        .expect("route");
    assert_eq!(ask(&out_ns, &format!("{a1}:80"), "tcp"), None, "the outside reached a1 by its own address");
    // Another network's address is the overlay's: the datapath drops it before the host's
    // stack (whose table would drop it too) ever sees it.
    let before = c.topo.host("h1").counter("drop/no_endpoint");
    assert_eq!(
        ask(&ns("h1", "a1"), &format!("{d1}:80"), "tcp"),
        None,
        "a1 reached d1 (another network) through h1"
    );
    assert!(
        c.topo.host("h1").counter("drop/no_endpoint") > before,
        "a1 -> d1 was not dropped in the datapath"
    );
    assert_eq!(nft_counter(&h1, "networks meet"), Some(0), "a1 -> d1 reached the host's stack");
    let dropped = nft_counter(&h1, "nothing else reaches").unwrap_or(0);
    assert!(dropped > 0, "the direct access was not dropped by the table");
    // The agent's periodic full pass leaves an intact table alone, counters and all; a rule
    // someone deleted is back after the next one.
    let h1_log = c.topo.host("h1").log.clone();
    let full_passes =
        || std::fs::read_to_string(&h1_log).unwrap_or_default().matches("full reconcile done").count();
    let next_pass = |what: &str| {
        let n = full_passes();
        assert!(wait_for(Duration::from_secs(20), || (full_passes() > n).then_some(())).is_some(), "{what}");
    };
    next_pass("h1 never made a full pass");
    assert_eq!(nft_counter(&h1, "nothing else reaches"), Some(dropped), "a full pass zeroed the counters");
    let listing: serde_json::Value = serde_json::from_str(&sh(&mut in_ns(
        &h1,
        &["nft", "-j", "-a", "list", "chain", "ip", "overlay", "forward"],
    )))
    .expect("nft JSON");
    let handle = listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("rule"))
        .find(|r| r["comment"].as_str().is_some_and(|c| c.starts_with("nothing else reaches")))
        .and_then(|r| r["handle"].as_u64())
        .expect("the rule's handle");
    sh(&mut in_ns(
        &h1,
        &["nft", "delete", "rule", "ip", "overlay", "forward", "handle", &handle.to_string()],
    ));
    assert_eq!(nft_counter(&h1, "nothing else reaches"), None);
    next_pass("h1 never made a full pass");
    assert_eq!(nft_counter(&h1, "nothing else reaches"), Some(0), "the deleted rule was not put back");
    // Nor a container of an internal network, which has no route through its host at all.
    ip_in(&c.topo.underlay, &["route", "add", "10.72.0.0/24", "via", "198.18.0.1"]).expect("route");
    assert_eq!(ask(&out_ns, &format!("{i1}:80"), "tcp"), None);

    // The host's own traffic is not ours: its connections out are not masqueraded by us.
    let masq = nft_counter(&h1, "containers going out").expect("masquerade rule");
    assert_eq!(ask(&h1, &out_at(7000), "tcp").as_deref(), Some("outside 198.18.0.1"));
    assert_eq!(
        nft_counter(&h1, "containers going out"),
        Some(masq),
        "the host's own connection hit our rule"
    );

    // A restarted agent adopts what is there: one rule, the same table, still working.
    let rules_before = sh(&mut in_ns(&h1, &["nft", "list", "table", "ip", "overlay"])).lines().count();
    let log = c.topo.host("h1").log.clone();
    let passes = || std::fs::read_to_string(&log).unwrap_or_default().matches("full reconcile done").count();
    let before = passes();
    c.kill_agent("h1");
    c.start_agent("h1");
    assert!(
        wait_for(Duration::from_secs(20), || (passes() > before).then_some(())).is_some(),
        "h1 never reconciled"
    );
    assert_eq!(egress_rules(&h1), 1, "{}", sh(&mut in_ns(&h1, &["ip", "rule", "show"])));
    assert_eq!(sh(&mut in_ns(&h1, &["nft", "list", "table", "ip", "overlay"])).lines().count(), rules_before);
    assert_eq!(ask(&ns("h1", "a1"), &out_at(7000), "tcp").as_deref(), Some("outside 198.18.0.1"));
    assert_eq!(reached("198.18.0.1:8080", "tcp").as_deref(), Some("a1 198.19.0.2"));

    // A container that goes takes its route and its connections with it; the last one takes
    // the table and the rule.
    assert!(!conntrack_of(&h1, a1).is_empty(), "no conntrack entry of a1 to begin with");
    c.ok(&["container", "rm", "a1"]);
    let clean = wait_for(Duration::from_secs(10), || {
        (!egress_routes(&h1).contains(&a1.to_string()) && conntrack_of(&h1, a1).is_empty()).then_some(())
    });
    assert!(clean.is_some(), "a1 left {:?} / {:?}", egress_routes(&h1), conntrack_of(&h1, a1));
    assert_eq!(ask(&out_ns, "198.18.0.1:8080", "tcp"), None, "h1's port 8080 still leads somewhere");
    // The port is free again.
    c.ok(&["container", "create", "--host", "h1", "--network", "pub", "-p", "8080:80", "a4"]);
    c.ok(&["container", "rm", "a4", "a5", "i1", "d1"]);
    let gone = wait_for(Duration::from_secs(10), || {
        (!table_exists(&h1) && egress_rules(&h1) == 0 && egress_routes(&h1).trim().is_empty()).then_some(())
    });
    assert!(gone.is_some(), "h1 kept {:?} {} {}", egress_routes(&h1), egress_rules(&h1), table_exists(&h1));
    assert!(table_exists(&h2), "h2 still has a2");
    assert!(egress_routes(&h2).contains(&a2.to_string()), "{}", egress_routes(&h2));
}
