//! End to end over the eBPF datapath, with the agents reading a state file: three hosts on an
//! underlay bridge, two networks with different VNIs, containers on every host.
//!
//! The hosts run the three uplink modes at once (h1 `auto`, which on a veth uplink is TC only;
//! h2 native XDP; h3 generic XDP), so every cross-host pair exercises two receive paths.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read},
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use overlay_tests::{
    Proc,
    agent::Source,
    frames::{self, IPPROTO_UDP, Ipv4, Tunnel, ethernet, udp},
    in_ns, mac_of, pcap,
    scenario::{self, Scenario, network},
    set_overlay_mtu, sh, skip_unless_privileged, to_hex,
    topology::{Host, Topology},
    try_sh, wait_for,
};

const PROBE: &str = env!("CARGO_BIN_EXE_overlay-probe");
const PORT: u16 = 7000;

/// (container, host, network, address)
const PLACEMENT: &[(&str, &str, &str, [u8; 4])] = &[
    ("b1", "h1", "blue", [10, 10, 0, 11]),
    ("b2", "h1", "blue", [10, 10, 0, 12]),
    ("b3", "h2", "blue", [10, 10, 0, 13]),
    ("b4", "h3", "blue", [10, 10, 0, 14]),
    ("r1", "h1", "red", [10, 20, 0, 21]),
    ("r2", "h2", "red", [10, 20, 0, 22]),
    ("r3", "h3", "red", [10, 20, 0, 23]),
];
const BLUE_VNI: u32 = 4097;
const RED_VNI: u32 = 4098;

fn build(tag: &str) -> (Topology, Scenario, std::path::PathBuf) {
    let mut topo = Topology::new(tag, 3);
    let mut s = Scenario::new(
        &topo,
        &[network("blue", BLUE_VNI, "10.10.0.0/24"), network("red", RED_VNI, "10.20.0.0/24")],
    );
    for (c, h, n, ip) in PLACEMENT {
        s.attach(c, h, n, Ipv4Addr::from(*ip));
    }
    let state = topo.run.path("state.json");
    s.write(&state);
    for (host, mode) in [("h1", "auto"), ("h2", "native"), ("h3", "generic")] {
        topo.start_agent(host, Source::File(&state), &["--xdp-mode", mode]);
    }
    (topo, s, state)
}

/// The namespace of a placed container.
fn ns_of(topo: &Topology, container: &str) -> String {
    let (_, host, _, _) = PLACEMENT.iter().find(|p| p.0 == container).expect("placed");
    topo.host(host).container_ns(container)
}

fn ip_of(container: &str) -> Ipv4Addr {
    Ipv4Addr::from(PLACEMENT.iter().find(|p| p.0 == container).expect("placed").3)
}

/// Waits until the agents finished setting up: every container has its address, and every
/// host's endpoint map holds every endpoint. An agent addresses its containers before it fills
/// the maps (local entries need the veths), so a container can send before its host knows the
/// others: its first ARP would go unanswered (and be counted as a drop).
fn wait_ready(topo: &Topology) {
    for (c, _, _, ip) in PLACEMENT {
        let ns = ns_of(topo, c);
        let ip = Ipv4Addr::from(*ip).to_string();
        let ok = wait_for(Duration::from_secs(20), || {
            let out = try_sh(&mut in_ns(&ns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]));
            String::from_utf8_lossy(&out.stdout).contains(&ip).then_some(())
        });
        assert!(ok.is_some(), "container {c} never got {ip}");
    }
    for h in &topo.hosts {
        let ok = wait_for(Duration::from_secs(20), || {
            (h.map("ENDPOINTS").as_array().map_or(0, Vec::len) == PLACEMENT.len()).then_some(())
        });
        assert!(ok.is_some(), "{}: the endpoint map never held all {} endpoints", h.name, PLACEMENT.len());
    }
}

fn start_servers(topo: &mut Topology) {
    for (c, _, _, _) in PLACEMENT {
        let ns = ns_of(topo, c);
        let server = Proc::spawn(
            &format!("echo server in {c}"),
            in_ns(&ns, &[PROBE, "serve", &PORT.to_string()]).stdout(Stdio::null()),
        );
        topo.run.procs.push(server);
    }
    // Servers listening before anyone probes (probing from the container itself).
    for (c, _, _, ip) in PLACEMENT {
        let ns = ns_of(topo, c);
        let to = format!("{}:{PORT}", Ipv4Addr::from(*ip));
        let up = wait_for(Duration::from_secs(5), || {
            try_sh(&mut in_ns(&ns, &[PROBE, "tcp", &to])).status.success().then_some(())
        });
        assert!(up.is_some(), "echo server in {c} did not come up");
    }
}

/// Runs many probes at once; returns (description, succeeded) for each.
fn probe_all(topo: &Topology, pairs: &[(&str, &str)]) -> Vec<(String, bool)> {
    let mut running: Vec<(String, Child)> = Vec::new();
    for (from, to) in pairs {
        let ns = ns_of(topo, from);
        let dst = ip_of(to);
        let addr = format!("{dst}:{PORT}");
        for (what, mut cmd) in [
            ("tcp", in_ns(&ns, &[PROBE, "tcp", &addr])),
            ("udp", in_ns(&ns, &[PROBE, "udp", &addr])),
            ("icmp", in_ns(&ns, &["ping", "-c", "1", "-W", "1", &dst.to_string()])),
        ] {
            let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("probe");
            running.push((format!("{what} {from} -> {to}"), child));
        }
    }
    running.into_iter().map(|(what, mut child)| (what, child.wait().expect("wait").success())).collect()
}

fn pairs(filter: impl Fn(&str, &str) -> bool) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    for (a, _, na, _) in PLACEMENT {
        for (b, _, nb, _) in PLACEMENT {
            if a != b && filter(na, nb) {
                out.push((*a, *b));
            }
        }
    }
    out
}

/// UDP from container `src` to container `dst` (port 7000, `payload`), as an Ethernet frame
/// with the inner IPv4 TOS `tos`.
fn container_udp(topo: &Topology, src: &str, dst: &str, tos: u8, payload: &[u8]) -> Vec<u8> {
    let (s, d) = (ip_of(src).octets(), ip_of(dst).octets());
    ethernet(
        mac_of(&ns_of(topo, dst), "eth0"),
        mac_of(&ns_of(topo, src), "eth0"),
        0x0800,
        &Ipv4::new(s, d, IPPROTO_UDP).tos(tos).packet(&udp(s, d, 40000, PORT, payload)),
    )
}

/// `inner` in VXLAN on `vni` as host `from` sends it to host `to` (their uplinks' MACs and
/// VTEPs), with the outer TOS `outer_tos`.
fn vxlan_between(topo: &Topology, from: &str, to: &str, vni: u32, outer_tos: u8, inner: &[u8]) -> Vec<u8> {
    let (f, t) = (topo.host(from), topo.host(to));
    let tunnel = Tunnel {
        src_mac: mac_of(&f.ns, "eth0"),
        dst_mac: mac_of(&t.ns, "eth0"),
        src_vtep: f.vtep.octets(),
        dst_vtep: t.vtep.octets(),
        src_port: 51234,
        vni,
    };
    let mut frame = frames::vxlan(&tunnel, inner);
    frame[15] = outer_tos;
    frames::reseal_ipv4(&mut frame, 14);
    frame
}

/// `frame` with an 802.1Q/802.1ad tag (`tpid`, `tci`) after its MAC addresses.
fn tag(frame: &[u8], tpid: u16, tci: u16) -> Vec<u8> {
    [&frame[..12], &tpid.to_be_bytes(), &tci.to_be_bytes(), &frame[12..]].concat()
}

/// Tags a container or a host may put on: VLAN 100 with priority 7, VLAN 0 with priority 7
/// (priority-tagged, which the stack takes for untagged), and an 802.1ad (QinQ) outer tag.
const TAGS: [(u16, u16); 3] = [(0x8100, (7 << 13) | 0x064), (0x8100, 7 << 13), (0x88a8, 0x064)];

#[test]
fn containers_reach_their_network_and_nothing_else() {
    if skip_unless_privileged() {
        return;
    }
    let (mut topo, _scenario, _state) = build("dp");
    wait_ready(&topo);

    // Each host runs the uplink mode it was asked for.
    for (host, expect) in [("h1", None), ("h2", Some("xdp ")), ("h3", Some("xdpgeneric"))] {
        let out = sh(&mut in_ns(&topo.host(host).ns, &["ip", "link", "show", "dev", "eth0"]));
        match expect {
            Some(mode) => assert!(out.contains(mode), "{host}: expected {mode:?} on eth0: {out}"),
            None => assert!(!out.contains("xdp"), "{host}: auto on a veth uplink must not attach XDP: {out}"),
        }
    }

    // The hosts' own traffic crosses the uplinks the programs sit on; this also resolves the
    // underlay neighbours before the capture starts.
    for a in &topo.hosts {
        for b in &topo.hosts {
            if a.name != b.name {
                sh(&mut in_ns(&a.ns, &["ping", "-c", "1", "-W", "2", &b.vtep.to_string()]));
            }
        }
    }

    start_servers(&mut topo);
    let capture_file = topo.run.path("underlay.pcap");
    let mut capture = pcap::capture(&topo.underlay, "br0", &capture_file, &[]);
    let before: Vec<u64> = topo.hosts.iter().map(|h| h.counter("drop/no_endpoint")).collect();

    // Same network: everything reaches everything, across hosts and on one host.
    let same = probe_all(&topo, &pairs(|a, b| a == b));
    let failed: Vec<_> = same.iter().filter(|(_, ok)| !ok).map(|(w, _)| w.as_str()).collect();
    assert!(failed.is_empty(), "same-network probes failed: {failed:#?}");
    assert_eq!(same.len(), 3 * (4 * 3 + 3 * 2), "probes run");

    // Different networks: nothing crosses.
    let cross = probe_all(&topo, &pairs(|a, b| a != b));
    let leaked: Vec<_> = cross.iter().filter(|(_, ok)| *ok).map(|(w, _)| w.as_str()).collect();
    assert!(leaked.is_empty(), "traffic crossed networks: {leaked:#?}");
    let after: Vec<u64> = topo.hosts.iter().map(|h| h.counter("drop/no_endpoint")).collect();
    for (i, h) in topo.hosts.iter().enumerate() {
        assert!(after[i] > before[i], "{}: cross-network attempts were not dropped as no_endpoint", h.name);
    }

    // A container that tags its frames (802.1Q VLAN 100 or VLAN 0, priority 7, or 802.1ad; its
    // own addresses, sent on a packet socket as any container with CAP_NET_RAW can): the kernel
    // takes the tag out into the skb before TC; nothing of it may leave the host, and it is
    // counted.
    let tagger_ns = ns_of(&topo, "b1");
    let untagged = container_udp(&topo, "b1", "b3", 0, b"tagged");
    let h1 = topo.host("h1");
    let tagged_before = h1.counter("drop/vlan_tagged");
    for (tpid, tci) in TAGS {
        sh(&mut in_ns(&tagger_ns, &[PROBE, "frame", "eth0", &to_hex(&tag(&untagged, tpid, tci))]));
    }
    let counted = wait_for(Duration::from_secs(2), || {
        (h1.counter("drop/vlan_tagged") >= tagged_before + TAGS.len() as u64).then_some(())
    });
    assert!(counted.is_some(), "tagged frames not counted vlan_tagged");

    std::thread::sleep(Duration::from_millis(300));
    // SIGTERM lets tcpdump flush and close the file.
    capture.terminate(Duration::from_secs(5));
    let frames = pcap::read(&std::fs::read(&capture_file).expect("capture"));
    let mut vnis = BTreeSet::new();
    let mut vxlan = 0;
    for f in &frames {
        assert!(f.ether_type() != 0x8100 && f.ether_type() != 0x88a8, "a VLAN tag on the underlay");
        assert!(
            !(f.ether_type() == 0x0806 && f.is_broadcast()),
            "ARP broadcast on the underlay: {:02x?}",
            &f.data[..42.min(f.data.len())]
        );
        if let Some((vni, inner)) = f.vxlan() {
            vxlan += 1;
            vnis.insert(vni);
            let inner_type = u16::from_be_bytes([inner[12], inner[13]]);
            assert_eq!(inner_type, 0x0800, "non-IPv4 inside VXLAN (an ARP would mean flooding)");
            // The inner source address says which network the frame belongs to.
            let src = Ipv4Addr::new(inner[26], inner[27], inner[28], inner[29]);
            let want = if src.octets()[1] == 10 { BLUE_VNI } else { RED_VNI };
            assert_eq!(vni, want, "frame from {src} carried VNI {vni}");
        }
    }
    assert!(vxlan > 50, "only {vxlan} VXLAN frames captured");
    assert_eq!(vnis, BTreeSet::from([BLUE_VNI, RED_VNI]));

    // (After the capture, which must show no tag: this test's own frames carry one.)
    // The other way: valid VXLAN from a peer (for a container there, from one on the peer) that
    // arrives tagged, on each uplink mode: the tag must not ride into the container (h1, TC
    // only), and VLAN 0 must not pass for untagged UDP to the VXLAN port, which the stack would
    // answer with an ICMP error (h2 native XDP, h3 generic XDP, which leave tagged frames to TC).
    for (from, to, src, dst) in [("h2", "h1", "b3", "b1"), ("h3", "h2", "b4", "b3"), ("h1", "h3", "b1", "b4")]
    {
        let vxlan =
            vxlan_between(&topo, from, to, BLUE_VNI, 0, &container_udp(&topo, src, dst, 0, b"tagged"));
        let receiver = topo.host(to);
        let before = receiver.counter("drop/vlan_tagged");
        for (tpid, tci) in TAGS {
            sh(&mut in_ns(&topo.host(from).ns, &[PROBE, "frame", "eth0", &to_hex(&tag(&vxlan, tpid, tci))]));
        }
        let counted = wait_for(Duration::from_secs(2), || {
            (receiver.counter("drop/vlan_tagged") >= before + TAGS.len() as u64).then_some(())
        });
        assert!(counted.is_some(), "tagged VXLAN from {from} was not dropped as vlan_tagged on {to}");
    }

    // No kernel VXLAN device and no bridge on any host: the datapath is the programs.
    for h in &topo.hosts {
        let out = sh(&mut in_ns(&h.ns, &["ip", "-d", "-o", "link", "show"]));
        for kind in ["vxlan", "bridge"] {
            assert!(
                !out.lines().any(|l| l.contains(&format!(" {kind} "))),
                "{}: found a {kind} device:\n{out}",
                h.name
            );
        }
    }

    // The hosts' own TCP works with the programs attached (ping above proved ICMP).
    let server = Proc::spawn(
        "host server",
        in_ns(&topo.host("h2").ns, &[PROBE, "serve", "7100"]).stdout(Stdio::null()),
    );
    topo.run.procs.push(server);
    let to = format!("{}:7100", topo.host("h2").vtep);
    let host_tcp = wait_for(Duration::from_secs(5), || {
        try_sh(&mut in_ns(&topo.host("h1").ns, &[PROBE, "tcp", &to])).status.success().then_some(())
    });
    assert!(host_tcp.is_some(), "host-to-host TCP failed with the programs attached");
}

/// Congestion the underlay marks, and frames too big for it, between real hosts: VXLAN from a
/// peer with an outer CE reaches the container as CE when the inner packet is ECN-capable and
/// is dropped and counted when it is not (RFC 6040), on a TC-only uplink (h1) and a native XDP
/// one (h2); a frame or GSO packet from a container that raised its MTU is counted too_big on
/// its host, answered with the overlay's MTU (TCP then completes), and nothing of it appears
/// on the underlay.
#[test]
fn congestion_marks_and_oversized_frames_end_to_end() {
    if skip_unless_privileged() {
        return;
    }
    let (mut topo, _scenario, _state) = build("ecn");
    wait_ready(&topo);
    let underlay_file = topo.run.path("underlay.pcap");
    let mut underlay = pcap::capture(&topo.underlay, "br0", &underlay_file, &[]);
    let (ect0, ce) = (0b10, 0b11);

    // (peer, receiving host, sender, receiver): h1 decapsulates in TC, h2 in XDP.
    for (from, to, src, dst) in [("h2", "h1", "b3", "b1"), ("h3", "h2", "b4", "b3")] {
        // What the container's application gets: a UDP socket reporting each datagram's TOS.
        let mut receiver_app = Proc::spawn(
            "tos receiver",
            in_ns(&ns_of(&topo, dst), &[PROBE, "tos", "7000", "3"]).stdout(Stdio::piped()),
        );
        let mut lines = BufReader::new(receiver_app.take_stdout().expect("stdout")).lines();
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("listening"), "the receiver in {dst}");
        let receiver = topo.host(to);
        let before = receiver.counter("drop/ce_not_ect");
        // DSCP AF41 with each ECN codepoint, so the DSCP must survive the marking too.
        let marked = container_udp(&topo, src, dst, 0x88 | ect0, b"ect0 under CE");
        let not_ect = container_udp(&topo, src, dst, 0x88, b"not-ect under CE");
        for inner in [&marked, &not_ect] {
            let frame = vxlan_between(&topo, from, to, BLUE_VNI, 0x88 | ce, inner);
            sh(&mut in_ns(&topo.host(from).ns, &[PROBE, "frame", "eth0", &to_hex(&frame)]));
        }
        let dropped =
            wait_for(Duration::from_secs(2), || (receiver.counter("drop/ce_not_ect") > before).then_some(()));
        assert!(dropped.is_some(), "{to}: outer CE around a Not-ECT packet was not counted ce_not_ect");
        // Everything the receiver got in its 3 seconds: the ECT(0) packet, marked CE, alone.
        let got: Vec<String> = lines.map_while(Result::ok).collect();
        assert_eq!(
            got,
            ["0x8b ect0 under CE"],
            "{dst} on {to}: expected AF41 with CE, and no Not-ECT packet"
        );
    }

    // The route to the overlay, not the interface (1500, for the way out), sizes b2's packets
    // to b3: a 1426-byte datagram (a 1454-byte IPv4 packet) is fragmented by b2's stack at 1450
    // and crosses, and b3's echo comes back the same way.
    let b2 = ns_of(&topo, "b2");
    let b3 = ns_of(&topo, "b3");
    let echo = Proc::spawn("echo server in b3", in_ns(&b3, &[PROBE, "serve", "7002"]).stdout(Stdio::null()));
    topo.run.procs.push(echo);
    let to = format!("{}:7002", ip_of("b3"));
    let crossed = wait_for(Duration::from_secs(5), || {
        try_sh(&mut in_ns(&b2, &[PROBE, "datagram", &to, "1426", "want"])).status.success().then_some(())
    });
    assert!(
        crossed.is_some(),
        "a datagram larger than the overlay's MTU, fragmented by the route's, did not cross"
    );
    // The same datagram from a socket that sizes its packets by the interface and sets DF
    // (IP_PMTUDISC_PROBE, as tracepath and QUIC stacks probing the path do): one 1454-byte
    // packet, too big for the overlay: dropped on h1 and counted.
    // h1 answers it with ICMP fragmentation needed (MTU 1450), which b2's kernel takes: the
    // application gets EMSGSIZE and the route to b3 learns 1450.
    let h1 = topo.host("h1");
    let (too_big, frag_needed) = (h1.counter("drop/too_big"), h1.counter("frag_needed"));
    let probed = try_sh(&mut in_ns(&b2, &[PROBE, "datagram", &to, "1426", "probe"]));
    let said = String::from_utf8_lossy(&probed.stderr);
    assert!(!probed.status.success(), "a 1454-byte packet with DF crossed an overlay that carries 1450");
    assert!(said.contains("Message too long"), "b2's socket did not hear of the MTU: {said}");
    assert!(
        h1.counter("drop/too_big") > too_big,
        "the DF datagram sized by the interface was not counted too_big"
    );
    assert!(h1.counter("frag_needed") > frag_needed, "h1 counted no fragmentation-needed answer");
    let learned = sh(&mut in_ns(&b2, &["ip", "route", "get", &ip_of("b3").to_string()]));
    assert!(learned.contains("mtu 1450"), "b2's route to b3: {learned}");
    // Without DF (IP_PMTUDISC_OMIT, as DNS servers send) there is nobody to tell: dropped and
    // counted, no answer.
    let (too_big, frag_needed) = (h1.counter("drop/too_big"), h1.counter("frag_needed"));
    let omitted = try_sh(&mut in_ns(&b2, &[PROBE, "datagram", &to, "1426", "omit"]));
    assert!(!omitted.status.success(), "a 1454-byte packet crossed an overlay that carries 1450");
    assert!(h1.counter("drop/too_big") > too_big, "the datagram without DF was not counted too_big");
    assert_eq!(h1.counter("frag_needed"), frag_needed, "a packet without DF was answered");

    // b2 (h1) raises the MTU of its route to the overlay past what the overlay carries (1450),
    // as a container that rewrites its own routes could.
    for ns in [&b2, &b3] {
        set_overlay_mtu(ns, "eth0", 1454);
    }
    let h1 = topo.host("h1");
    let before = h1.counter("drop/too_big");
    // A 1454-byte IPv4 packet (DF): 4 bytes too many once encapsulated. The first is dropped
    // and answered; b2's stack then knows the path's MTU and refuses the second itself.
    let pinged = try_sh(&mut in_ns(
        &b2,
        &["ping", "-c", "2", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1426", &ip_of("b3").to_string()],
    ));
    let said = String::from_utf8_lossy(&pinged.stdout) + String::from_utf8_lossy(&pinged.stderr);
    assert!(!pinged.status.success(), "a 1454-byte ping crossed an overlay that carries 1450");
    let pings = h1.counter("drop/too_big") - before;
    assert!(pings >= 1, "the oversized ping was not counted too_big");
    assert!(said.contains("mtu = 1450") || said.contains("mtu=1450"), "ping did not hear of the MTU: {said}");
    // TCP with both ends at 1454: segments of 1414 bytes, sent by b2's stack as GSO packets,
    // judged by the segments they become: dropped and answered, b2's TCP learns 1450 from the
    // answer and the transfer completes, intact. The MTU b2 learned from the ping is forgotten
    // first, or TCP would size its segments by it from the start.
    sh(&mut in_ns(&b2, &["ip", "route", "flush", "cache"]));
    let mut sink = Proc::spawn("sink in b3", in_ns(&b3, &[PROBE, "sink", "7001"]).stdout(Stdio::piped()));
    let mut sunk = BufReader::new(sink.take_stdout().expect("stdout")).lines();
    assert_eq!(sunk.next().and_then(Result::ok).as_deref(), Some("listening"), "the sink in b3");
    topo.run.procs.push(sink);
    let to = format!("{}:7001", ip_of("b3"));
    let too_big = |h: &Host| {
        let c = &h.counters()["drop/too_big"];
        (c["packets"].as_u64().unwrap_or(0), c["bytes"].as_u64().unwrap_or(0))
    };
    let h1 = topo.host("h1");
    let (before, frag_needed) = (too_big(h1), h1.counter("frag_needed"));
    let sent = try_sh(&mut in_ns(&b2, &["timeout", "10", PROBE, "send", &to, "1000000"]));
    assert!(
        sent.status.success(),
        "TCP stalled on segments too big for the overlay: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert_eq!(
        sunk.next().and_then(Result::ok),
        Some(String::from_utf8_lossy(&sent.stdout).trim().to_owned()),
        "b3 did not get the bytes b2 sent"
    );
    let after = too_big(h1);
    let (packets, bytes) = (after.0 - before.0, after.1 - before.1);
    assert!(packets > 0, "oversized TCP segments were not counted too_big");
    // A frame is at most 1468 bytes here (the veth's limit); more per drop on average means
    // GSO packets were judged by their segments and dropped whole, not left to the uplink.
    assert!(
        bytes > packets * 1468,
        "too_big counted {packets} frames of {bytes} bytes: no GSO packet among them"
    );
    assert!(h1.counter("frag_needed") > frag_needed, "the GSO packet was not answered");
    let learned = sh(&mut in_ns(&b2, &["ip", "route", "get", &ip_of("b3").to_string()]));
    assert!(learned.contains("mtu 1450"), "b2's TCP did not learn the MTU: {learned}");

    std::thread::sleep(Duration::from_millis(300));
    underlay.terminate(Duration::from_secs(5));
    let frames = pcap::read(&std::fs::read(&underlay_file).expect("capture"));
    // The crafted frames crossed with their marks (the capture saw the underlay).
    let marked =
        frames.iter().filter(|f| f.data.len() > 15 && f.vxlan().is_some() && f.data[15] & 3 == ce).count();
    assert!(marked >= 4, "{marked} CE-marked VXLAN frames on the underlay, 4 sent");
    // Nothing b2 sent made it: no VXLAN frame carries its address (its ARP is answered on h1,
    // the TCP handshake's small segments are the only exception).
    let b2_ip = ip_of("b2").octets();
    let big: Vec<usize> = frames
        .iter()
        .filter_map(|f| f.vxlan())
        .filter(|(_, inner)| inner.len() >= 34 && inner[26..30] == b2_ip && inner.len() > 14 + 1450)
        .map(|(_, inner)| inner.len())
        .collect();
    assert!(big.is_empty(), "frames from b2 larger than the overlay's MTU on the underlay: {big:?}");
}

/// Held by the 1 GiB transfers and by the test that times a connection across agent restarts:
/// on two cores, an echo loop starved by a parallel bulk transfer looks like a datapath pause.
static CPU_BOUND: Mutex<()> = Mutex::new(());

/// A 1 GiB transfer arrives intact across each receive path: GSO, checksums and MTU are right.
#[test]
fn a_gigabyte_arrives_intact_on_every_uplink_mode() {
    if skip_unless_privileged() {
        return;
    }
    let _alone = CPU_BOUND.lock().unwrap_or_else(PoisonError::into_inner);
    let (topo, _scenario, _state) = build("gb");
    wait_ready(&topo);
    const GIB: u64 = 1 << 30;
    // Into h1 (TC only), into h2 (native XDP), into h3 (generic XDP).
    for (from, to) in [("b3", "b1"), ("b4", "b3"), ("b1", "b4")] {
        let port = "7200";
        let mut sink =
            in_ns(&ns_of(&topo, to), &[PROBE, "sink", port]).stdout(Stdio::piped()).spawn().expect("sink");
        // The sink says when its port is bound: sending before that would be refused.
        let mut sink_out = BufReader::new(sink.stdout.take().expect("sink stdout"));
        let mut line = String::new();
        sink_out.read_line(&mut line).expect("sink output");
        assert_eq!(line.trim(), "listening", "{to}: the sink did not start");
        let addr = format!("{}:{port}", ip_of(to));
        let sent = sh(&mut in_ns(&ns_of(&topo, from), &[PROBE, "send", &addr, &GIB.to_string()]));
        let mut got = String::new();
        sink_out.read_to_string(&mut got).expect("sink output");
        assert!(sink.wait().expect("sink").success(), "{to}: the sink failed");
        assert_eq!(sent.trim(), got.trim(), "{from} -> {to}: sent (bytes sha256) != received");
        assert!(sent.starts_with(&format!("{GIB} ")), "{from} -> {to}: {sent}");
    }
    // The transfers crossed the overlay, and nothing was dropped on the way.
    for h in &topo.hosts {
        let c = h.counters();
        assert!(c["rx_decap"]["bytes"].as_u64().unwrap_or(0) > GIB, "{}: {c}", h.name);
        let drops: Vec<_> = c
            .as_object()
            .expect("object")
            .iter()
            .filter(|(k, v)| k.starts_with("drop/") && v["packets"].as_u64() > Some(0))
            .map(|(k, _)| k.clone())
            .collect();
        assert!(drops.is_empty(), "{}: drops during bulk transfer: {drops:?}", h.name);
    }
}

/// Killing an agent (SIGKILL, as a crash) or stopping it (SIGTERM) and starting it again
/// interrupts no connection: the pinned programs and maps keep forwarding, and the new agent
/// takes them over in place.
#[test]
fn agent_restart_keeps_established_connections() {
    if skip_unless_privileged() {
        return;
    }
    let _alone = CPU_BOUND.lock().unwrap_or_else(PoisonError::into_inner);
    let (mut topo, _scenario, state) = build("rs");
    wait_ready(&topo);
    start_servers(&mut topo);
    // Two long-lived connections: across hosts (h1 -> h2) and on one host (h1).
    let mut sessions: Vec<(String, Child)> = [("b1", "b3"), ("b2", "b1")]
        .iter()
        .map(|(from, to)| {
            let addr = format!("{}:{PORT}", ip_of(to));
            let child = in_ns(&ns_of(&topo, from), &[PROBE, "session", &addr, "6"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("session");
            (format!("{from} -> {to}"), child)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    // Crash h1's agent; stop h2's as an operator would (SIGTERM: it must exit by itself, cleanly,
    // leaving the datapath forwarding). Leave both down a moment, start them again.
    topo.host_mut("h1").agent.as_mut().expect("agent").kill();
    let clean = topo.host_mut("h2").agent.as_mut().expect("agent").terminate(Duration::from_secs(5));
    assert!(clean, "h2's agent did not exit cleanly on SIGTERM");
    std::thread::sleep(Duration::from_secs(1));
    for (host, mode) in [("h1", "auto"), ("h2", "native")] {
        topo.start_agent(host, Source::File(&state), &["--xdp-mode", mode]);
    }
    for host in ["h1", "h2"] {
        let log = std::fs::read_to_string(&topo.host(host).log).unwrap_or_default();
        let starts = log.matches("datapath attached").count();
        assert!(
            topo.wait_log(host, "full reconcile done", Duration::from_secs(20)) && starts >= 1,
            "{host} did not come back"
        );
    }
    for (what, child) in sessions.drain(..) {
        let out = child.wait_with_output().expect("session");
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        let (trips, gap) = report.trim().split_once(' ').expect("report");
        let (trips, gap): (u64, u64) = (trips.parse().expect("n"), gap.parse().expect("ms"));
        assert!(trips > 300, "{what}: only {trips} round trips");
        // A 10 ms echo loop that kept going through the restart: no pause a person would notice.
        assert!(gap < 500, "{what}: traffic paused for {gap} ms during the restart");
    }
    // The restarted agents adopted what was there instead of recreating it.
    for host in ["h1", "h2"] {
        let log = std::fs::read_to_string(&topo.host(host).log).expect("log");
        let second_start = log.rfind("datapath attached").expect("second start");
        assert!(
            !log[second_start..].contains("endpoint up"),
            "{host}: the restarted agent recreated endpoints:\n{}",
            &log[second_start..]
        );
    }
}

/// Where the driver has no native XDP (a macvlan uplink), `auto` falls back to generic XDP and
/// says so, and traffic flows through it. Drop records reach the agent's log only on a host
/// whose operator switched drop logging on.
#[test]
fn xdp_falls_back_to_generic_and_drops_are_logged_only_when_asked() {
    if skip_unless_privileged() {
        return;
    }
    let mut topo = Topology::new("fb", 2);
    // h2's uplink: a macvlan on eth0 carrying the VTEP address.
    let h2 = topo.host("h2").ns.clone();
    let vtep = format!("{}/24", topo.host("h2").vtep);
    sh(&mut in_ns(&h2, &["ip", "addr", "del", &vtep, "dev", "eth0"]));
    sh(&mut in_ns(&h2, &["ip", "link", "add", "mv0", "link", "eth0", "type", "macvlan", "mode", "bridge"]));
    sh(&mut in_ns(&h2, &["ip", "addr", "add", &vtep, "dev", "mv0"]));
    sh(&mut in_ns(&h2, &["ip", "link", "set", "mv0", "up"]));
    topo.host_mut("h2").uplink = "mv0".into();

    let mut s = Scenario::new(
        &topo,
        &[network("blue", BLUE_VNI, "10.10.0.0/24"), network("red", RED_VNI, "10.20.0.0/24")],
    );
    s.attach("a", "h1", "blue", Ipv4Addr::new(10, 10, 0, 2))
        .attach("b", "h2", "blue", Ipv4Addr::new(10, 10, 0, 3))
        .attach("r", "h1", "red", Ipv4Addr::new(10, 20, 0, 2));
    let state = topo.run.path("state.json");
    s.write(&state);
    topo.start_agent("h1", Source::File(&state), &["--debug-drops"]);
    topo.start_agent("h2", Source::File(&state), &[]);
    for host in ["h1", "h2"] {
        assert!(
            topo.wait_log(host, "full reconcile done", Duration::from_secs(20)),
            "{host} never reconciled"
        );
    }
    assert!(
        std::fs::read_to_string(&topo.host("h2").log).unwrap().contains("falling back to generic (skb) mode"),
        "h2 did not say it fell back"
    );
    let link = sh(&mut in_ns(&h2, &["ip", "link", "show", "dev", "mv0"]));
    assert!(link.contains("xdpgeneric"), "mv0: {link}");

    // Traffic crosses the generic-XDP uplink both ways.
    let (a_ns, b_ns) = (topo.host("h1").container_ns("a"), topo.host("h2").container_ns("b"));
    let ping = |ns: &str, ip: &str| {
        wait_for(Duration::from_secs(10), || {
            try_sh(&mut in_ns(ns, &["ping", "-c", "1", "-W", "1", ip])).status.success().then_some(())
        })
        .is_some()
    };
    assert!(ping(&a_ns, "10.10.0.3"), "a -> b across the macvlan uplink");
    assert!(ping(&b_ns, "10.10.0.2"), "b -> a across the macvlan uplink");
    assert!(topo.host("h2").counter("rx_decap") > 0, "h2 decapsulated nothing");

    // Drops on both hosts: a -> r (h1) and b -> r (h2) cross networks.
    let before = topo.host("h2").counter("drop/no_endpoint");
    try_sh(&mut in_ns(&a_ns, &["ping", "-c", "2", "-W", "1", "10.20.0.2"]));
    try_sh(&mut in_ns(&b_ns, &["ping", "-c", "2", "-W", "1", "10.20.0.2"]));
    assert!(topo.host("h2").counter("drop/no_endpoint") > before, "h2 did not drop b -> r");
    assert!(
        topo.wait_log("h1", "drop reason=no_endpoint", Duration::from_secs(5)),
        "h1 runs with --debug-drops but logged no drop"
    );
    let h2_log = std::fs::read_to_string(&topo.host("h2").log).unwrap();
    assert!(!h2_log.contains("drop reason="), "h2 logged drops without --debug-drops:\n{h2_log}");

    // A fault of the host, not of the packet, is always logged: wipe h2's configuration (as a
    // mistaken `bpftool map update` would) and send across hosts from b.
    let config = topo.host("h2").pin_dir.join("CONFIG");
    let zeros: Vec<&str> = vec!["00"; 24];
    sh(Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&config)
        .args(["key", "hex", "00", "00", "00", "00", "value", "hex"])
        .args(&zeros));
    try_sh(&mut in_ns(&b_ns, &["ping", "-c", "1", "-W", "1", "10.10.0.2"]));
    assert!(
        topo.host("h2").counter("drop/no_config") > 0,
        "b -> a was not dropped for want of configuration"
    );
    assert!(
        topo.wait_log("h2", "drop reason=no_config", Duration::from_secs(5)),
        "h2 did not log the fault without --debug-drops"
    );
}

/// Two hosts whose agents repair nothing by themselves for ten minutes (`--resync-secs 600`):
/// container a on h1 and b on h2, both on blue. Returns the topology once a reaches b.
fn repair_topology(tag: &str) -> Topology {
    let mut topo = Topology::new(tag, 2);
    let mut s = Scenario::new(&topo, &[network("blue", BLUE_VNI, "10.10.0.0/24")]);
    s.attach("a", "h1", "blue", Ipv4Addr::new(10, 10, 0, 2)).attach(
        "b",
        "h2",
        "blue",
        Ipv4Addr::new(10, 10, 0, 3),
    );
    let state = topo.run.path("state.json");
    s.write(&state);
    for host in ["h1", "h2"] {
        topo.start_agent(host, Source::File(&state), &["--resync-secs", "600"]);
    }
    let a_ns = topo.host("h1").container_ns("a");
    let up = wait_for(Duration::from_secs(20), || ping_once(&a_ns, "10.10.0.3").then_some(()));
    if up.is_none() {
        topo.dump_logs();
        panic!("a never reached b");
    }
    topo
}

fn ping_once(ns: &str, ip: &str) -> bool {
    try_sh(&mut in_ns(ns, &["ping", "-c", "1", "-W", "1", ip])).status.success()
}

/// The host-side veth of container `c`'s endpoint on blue, and its ifindex if it exists.
fn endpoint_veth(host: &Host, c: &str) -> (String, Option<u32>) {
    let name = overlay_agent::netlink::veth::host_name(&scenario::id(&format!("endpoint {c} blue")));
    let out = try_sh(&mut in_ns(&host.ns, &["ip", "-j", "link", "show", "dev", &name]));
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let ifindex = links[0]["ifindex"].as_u64().map(|i| i as u32);
    (name, ifindex)
}

/// A veth deleted by hand comes back within a couple of seconds, though the agents only
/// resync every ten minutes and the desired state does not change: the agent hears the
/// deletion from the kernel. Traffic from the container flows through the new veth.
#[test]
fn a_veth_deleted_by_hand_comes_back_within_seconds() {
    if skip_unless_privileged() {
        return;
    }
    let topo = repair_topology("rv");
    let h1 = topo.host("h1");
    let a_ns = h1.container_ns("a");
    let (veth, old) = endpoint_veth(h1, "a");
    let old = old.expect("a's veth");

    sh(&mut in_ns(&h1.ns, &["ip", "link", "del", &veth]));
    let deleted = Instant::now();
    // The container side went with it.
    assert!(!try_sh(&mut in_ns(&a_ns, &["ip", "link", "show", "dev", "eth0"])).status.success());
    let back = loop {
        if ping_once(&a_ns, "10.10.0.3") {
            break deleted.elapsed();
        }
        if deleted.elapsed() > Duration::from_secs(3) {
            topo.dump_logs();
            panic!("a did not reach b again within 3 s of its veth being deleted");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("a reached b again {} ms after its veth was deleted", back.as_millis());

    // A new veth, and the maps name it instead of the old one.
    let (_, new) = endpoint_veth(h1, "a");
    let new = new.expect("a's veth was made again");
    assert_ne!(new, old, "the same interface?");
    let ifaces: BTreeSet<u64> =
        h1.map("IFACES").as_array().expect("IFACES").iter().filter_map(|e| e["key"].as_u64()).collect();
    assert!(
        ifaces.contains(&u64::from(new)) && !ifaces.contains(&u64::from(old)),
        "IFACES: {ifaces:?}, veth {old} -> {new}"
    );
    let entry = h1
        .map("ENDPOINTS")
        .as_array()
        .expect("ENDPOINTS")
        .iter()
        .find(|e| e["key"]["ip"] == serde_json::json!([10, 10, 0, 2]))
        .map(|e| e["value"]["ifindex"].clone());
    assert_eq!(entry, Some(serde_json::json!(new)), "a's ENDPOINTS entry");
    // The from-container program on the new veth is what carries a's traffic to b.
    let before = h1.counter("tx_encap");
    assert!(ping_once(&a_ns, "10.10.0.3"));
    assert!(h1.counter("tx_encap") > before, "nothing encapsulated from the new veth");
    assert!(
        std::fs::read_to_string(&h1.log)
            .unwrap_or_default()
            .contains("endpoint interface vanished; recreating it"),
        "h1 did not say what it repaired"
    );
}

/// Pins removed by hand (a map, the uplink's attachment, an endpoint's attachment) take
/// nothing away from the running datapath, since the agent holds every object, and come back
/// within seconds; `overlay-agent stats`, which opens the pins, works afterwards.
#[test]
fn pins_removed_by_hand_are_pinned_again() {
    if skip_unless_privileged() {
        return;
    }
    let topo = repair_topology("rp");
    let h1 = topo.host("h1");
    let a_ns = h1.container_ns("a");
    let (_, ifindex) = endpoint_veth(h1, "a");
    let links = h1.pin_dir.join("links");
    let pins = [
        h1.pin_dir.join("STATS"),
        links.join("uplink_tc"),
        links.join(format!("ep_{}", ifindex.expect("a's veth"))),
    ];
    for pin in &pins {
        std::fs::remove_file(pin).unwrap_or_else(|e| panic!("removing {}: {e}", pin.display()));
    }
    let removed = Instant::now();
    // Still attached, both ways: a's traffic leaves through its veth's program and b's
    // answers come in through the uplink's.
    assert!(ping_once(&a_ns, "10.10.0.3"), "a lost b when the pins were removed");

    let back =
        wait_for(Duration::from_secs(5), || pins.iter().all(|p| p.exists()).then(|| removed.elapsed()));
    let Some(back) = back else {
        topo.dump_logs();
        let missing: Vec<_> = pins.iter().filter(|p| !p.exists()).collect();
        panic!("not pinned again within 5 s: {missing:?}");
    };
    eprintln!("pinned again within {} ms", back.as_millis());
    for pin in &pins[1..] {
        sh(Command::new("bpftool").args(["link", "show", "pinned"]).arg(pin));
    }
    // The pinned counters are the live ones: stats sees a's traffic.
    let before = h1.counter("tx_encap");
    assert!(ping_once(&a_ns, "10.10.0.3"));
    assert!(h1.counter("tx_encap") > before, "stats does not see the running datapath's counters");
    let log = std::fs::read_to_string(&h1.log).unwrap_or_default();
    for pin in &pins {
        assert!(
            log.lines().any(|l| l.contains("pinned again") && l.contains(&*pin.to_string_lossy())),
            "h1 did not name {} in its log",
            pin.display()
        );
    }
}
