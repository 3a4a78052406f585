//! Packet-level tests: the real programs, loaded into the kernel, run on frames built byte by
//! byte here (BPF_PROG_TEST_RUN), with their output and their counters checked exactly.
//!
//! What is checked is what VXLAN (RFC 7348) requires and what the programs promise: the
//! encapsulated frame is byte for byte a VXLAN frame around the original one; decapsulation
//! gives back the inner frame exactly; ARP replies are correct; every malformed or unauthorised
//! frame is dropped and counted under its own reason and no other; frames that are not VXLAN
//! for this host pass untouched.
//!
//! Each test loads its own copy of the object with its own pinned maps, in its own network
//! namespace: test_run resolves `__sk_buff.ifindex` in the calling thread's namespace, and the
//! from-container program finds the sending endpoint by that ifindex. The namespace holds one
//! veth per endpoint (its host side) and one for the uplink. Redirect helpers only record the
//! target in test_run (nothing is sent), so a delivered frame shows as TC_ACT_REDIRECT.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::Command,
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType, TestRun, TestRunAttrs, TestRunOptions, Xdp};
use overlay_agent::{
    datapath::{
        Loaded, PROG_FROM_CONTAINER, PROG_UPLINK_TC, PROG_UPLINK_XDP, PinDir, maps::read_stats, program,
    },
    monitor::{Control, Record, Session, monotonic_ns},
    netlink::netns::NetnsGuard,
};
use overlay_common::{
    dns::{NAME_ADDRS, NameAddrs, name_key},
    maps::{
        Config, ENDPOINT_LOCAL, Endpoint, EndpointKey, Iface, NETWORK_EGRESS, NETWORK_ENCRYPTED,
        NETWORK_RESOLVER, Network, Peer, PeerKey, XDP_META_MAGIC,
    },
    monitor::{MONITOR_DROPS, MONITOR_FLOWS, MonitorCtl},
    stats::{self, *},
    wire::{
        ARP_OP_REPLY, ARP_OP_REQUEST, ETH_P_ARP, ETH_P_IP, EthHdr, INNER_ETH_OFF, INNER_IP_OFF, IPV4_DF,
        IPV4_MF, Ipv4Hdr, OUTER_IP_OFF, OUTER_UDP_OFF, UdpHdr, VXLAN_OFF, VxlanHdr,
    },
};
use overlay_tests::{
    Run,
    frames::*,
    in_ns, sh, skip_unless_privileged,
    testrun::{self, Ctx, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TcOut, XDP_DROP, XDP_PASS, XdpMd, XdpOut},
    wait_for,
};

// ---------------------------------------------------------------------------------------------
// The host under test: addresses, networks and endpoints.
// ---------------------------------------------------------------------------------------------

/// This host's VTEP, and the uplink's MAC (the outer source of every encapsulated frame).
const VTEP: Ip = [198, 18, 0, 1];
const UPLINK_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0xff, 0x01];
/// Known peers: PEER2 hosts R (blue) and Q (red), PEER3 hosts S (blue).
const PEER2: Ip = [198, 18, 0, 2];
const PEER3: Ip = [198, 18, 0, 3];
const PEER2_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0xff, 0x02];
/// An underlay address that is not a peer.
const STRANGER: Ip = [198, 18, 0, 99];

/// VNIs with three different bytes, so a byte-order mistake cannot go unnoticed.
const BLUE: u32 = 0x0a_0b_0c;
const RED: u32 = 0x01_02_03;
const BLUE_GATEWAY: Ip = [10, 1, 0, 254];
const BLUE_GATEWAY_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x01, 0xfe];

#[derive(Clone, Copy, Debug)]
struct Ep {
    ip: Ip,
    mac: Mac,
}

/// Local endpoints: A and B on blue, X on red.
const A: Ep = Ep { ip: [10, 1, 0, 1], mac: [0x02, 0x00, 0x00, 0x00, 0x01, 0x01] };
const B: Ep = Ep { ip: [10, 1, 0, 2], mac: [0x02, 0x00, 0x00, 0x00, 0x01, 0x02] };
const X: Ep = Ep { ip: [10, 2, 0, 1], mac: [0x02, 0x00, 0x00, 0x00, 0x02, 0x01] };
/// Remote endpoints: R (blue, PEER2), S (blue, PEER3), Q (red, PEER2). Q's address looks like
/// a blue one on purpose: only the VNI says it is not.
const R: Ep = Ep { ip: [10, 1, 0, 3], mac: [0x02, 0x00, 0x00, 0x00, 0x01, 0x03] };
const S: Ep = Ep { ip: [10, 1, 0, 4], mac: [0x02, 0x00, 0x00, 0x00, 0x01, 0x04] };
const Q: Ep = Ep { ip: [10, 1, 0, 9], mac: [0x02, 0x00, 0x00, 0x00, 0x02, 0x09] };
/// An address no endpoint has.
const NOBODY: Ip = [10, 1, 0, 77];

/// Interfaces in the test namespace: the host-side veths of A, B and X, the uplink, and one
/// that no endpoint is registered on.
const IFACE_NAMES: [&str; 5] = ["veth-a", "veth-b", "veth-x", "uplink", "stray"];

/// Counters that changed, by name: (packets, bytes).
type Counts = BTreeMap<&'static str, (u64, u64)>;

/// The counts a test expects: one packet of `bytes` bytes under each code.
fn one_each(codes: &[(u32, usize)]) -> Counts {
    codes.iter().map(|&(code, bytes)| (stats::name(code).expect("known code"), (1, bytes as u64))).collect()
}

struct Host {
    dp: Loaded,
    /// ifindex of each of IFACE_NAMES.
    ifindex: BTreeMap<&'static str, u32>,
    /// The test namespace, which this thread is in.
    ns: String,
    /// Dropped after the programs and maps are closed, before the namespace is removed.
    _netns: NetnsGuard,
    run: Run,
}

impl Host {
    /// A configured host with the endpoints, networks and peers above.
    fn new(tag: &str) -> Self {
        let mut h = Self::unconfigured(tag);
        let cfg = Config {
            vtep: VTEP,
            uplink_ifindex: h.ifindex["uplink"],
            uplink_mac: UPLINK_MAC,
            _pad: [0; 2],
            flags: 0,
            uplink_mtu: 1500,
        };
        h.dp.maps.config.set(0, cfg, 0).expect("CONFIG");
        h
    }

    /// The same host before the agent wrote its configuration (CONFIG all zero).
    fn unconfigured(tag: &str) -> Self {
        let run = Run::new(tag);
        let ns = run.ns("pkt");
        sh(Command::new("ip").args(["netns", "add", &ns]));
        let netns =
            NetnsGuard::enter_path(&Path::new("/run/netns").join(&ns)).expect("entering the test netns");
        // Created from inside: the `ip` child inherits this thread's namespace.
        let mut ifindex = BTreeMap::new();
        for name in IFACE_NAMES {
            // veth pairs (this kernel has no dummy devices); the `-p` ends stand for the containers'
            // and the underlay's ends in the tests that send real frames.
            let peer = format!("{name}-p");
            sh(Command::new("ip").args(["link", "add", name, "type", "veth", "peer", "name", &peer]));
            let idx = if_index(name);
            assert!(idx > 1, "{name} is not in the test namespace");
            ifindex.insert(name, idx);
        }

        let mut dp = Loaded::load(&PinDir::new(run.pin_root().join("h"))).expect("loading the datapath");
        let m = &mut dp.maps;
        for (vni, net) in [
            (BLUE, Network { gateway: BLUE_GATEWAY, gateway_mac: BLUE_GATEWAY_MAC, flags: 0, prefix_len: 0 }),
            // Red has no gateway.
            (RED, Network { gateway: [0; 4], gateway_mac: [0; 6], flags: 0, prefix_len: 0 }),
        ] {
            m.networks.insert(vni, net, 0).expect("NETWORKS");
        }
        for peer in [PEER2, PEER3] {
            m.peers.insert(PeerKey { vtep: peer }, Peer::default(), 0).expect("PEERS");
        }
        for (vni, ep, dev) in [(BLUE, A, "veth-a"), (BLUE, B, "veth-b"), (RED, X, "veth-x")] {
            let local = Endpoint { mac: ep.mac, flags: ENDPOINT_LOCAL, ifindex: ifindex[dev], vtep: [0; 4] };
            m.endpoints.insert(EndpointKey { vni, ip: ep.ip }, local, 0).expect("ENDPOINTS");
            m.ifaces
                .insert(ifindex[dev], Iface { vni, ip: ep.ip, mac: ep.mac, _pad: [0; 2] }, 0)
                .expect("IFACES");
        }
        for (vni, ep, vtep) in [(BLUE, R, PEER2), (BLUE, S, PEER3), (RED, Q, PEER2)] {
            let remote = Endpoint { mac: ep.mac, flags: 0, ifindex: 0, vtep };
            m.endpoints.insert(EndpointKey { vni, ip: ep.ip }, remote, 0).expect("ENDPOINTS");
        }
        Self { dp, ifindex, ns, _netns: netns, run }
    }

    /// For the tests that send real frames: no IPv6 in the namespace (its router solicitations
    /// and reports would reach the programs and be counted), and `links` up.
    fn bring_up(&self, links: &[&str]) {
        sh(&mut in_ns(&self.ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]));
        for link in links {
            sh(Command::new("ip").args(["link", "set", link, "up"]));
        }
    }

    /// Attaches a TC program at the ingress of `dev`, as the agent does (the link lives as long
    /// as the loaded object).
    fn attach_tc(&mut self, name: &str, dev: &str) {
        let prog: &mut SchedClassifier = program(&mut self.dp.ebpf, name).expect("program");
        prog.attach(dev, TcAttachType::Ingress).unwrap_or_else(|e| panic!("attaching {name} to {dev}: {e}"));
    }

    fn stats(&self) -> Vec<overlay_common::maps::Counter> {
        read_stats(&self.dp.maps.stats).expect("reading STATS")
    }

    /// Runs `f` and returns what it returned with the counters that changed meanwhile.
    fn counting<T>(&self, f: impl FnOnce(&Self) -> T) -> (T, Counts) {
        let before = self.stats();
        let out = f(self);
        let after = self.stats();
        let mut changed = Counts::new();
        for (code, (b, a)) in before.iter().zip(&after).enumerate() {
            if a.packets != b.packets || a.bytes != b.bytes {
                let name = stats::name(code as u32).unwrap_or("unnamed code");
                changed.insert(name, (a.packets - b.packets, a.bytes - b.bytes));
            }
        }
        (out, changed)
    }

    fn run_tc(&self, name: &str, ifindex: u32, frame: &[u8]) -> TcOut {
        self.run_tc_gso(name, ifindex, frame, 0)
    }

    /// `run_tc` on a frame that claims to be a GSO packet of `gso_size`-byte segments.
    fn run_tc_gso(&self, name: &str, ifindex: u32, frame: &[u8], gso_size: u32) -> TcOut {
        let prog: &SchedClassifier =
            self.dp.ebpf.program(name).expect("program").try_into().expect("a TC program");
        testrun::tc(prog, ifindex, frame, gso_size).unwrap_or_else(|errno| {
            panic!("test_run of {name} refused a {}-byte frame: errno {errno}", frame.len())
        })
    }

    /// The from-container program, on the host-side veth `dev`.
    #[expect(clippy::wrong_self_convention, reason = "named after the program it runs, not a conversion")]
    fn from_container(&self, dev: &str, frame: &[u8]) -> TcOut {
        self.run_tc(PROG_FROM_CONTAINER, self.ifindex[dev], frame)
    }

    /// The uplink TC program on its own (no XDP before it, so no metadata).
    fn uplink_tc(&self, frame: &[u8]) -> TcOut {
        self.run_tc(PROG_UPLINK_TC, self.ifindex["uplink"], frame)
    }

    fn uplink_xdp(&self, frame: &[u8]) -> XdpOut {
        let prog: &Xdp = self.dp.ebpf.program(PROG_UPLINK_XDP).expect("program").try_into().expect("XDP");
        testrun::xdp(prog, frame).unwrap_or_else(|errno| {
            panic!("test_run of uplink_xdp refused a {}-byte frame: errno {errno}", frame.len())
        })
    }

    /// Runs the XDP program in test_run's "live frames" mode, as if `frame` arrived on the
    /// uplink: frames it passes are turned into skbs (metadata included) and received on the
    /// uplink, where its TC ingress program sees them. The kernel returns neither data nor
    /// verdict in this mode; the counters and the receivers tell what happened.
    fn uplink_xdp_live(&self, frame: &[u8]) {
        let prog: &Xdp = self.dp.ebpf.program(PROG_UPLINK_XDP).expect("program").try_into().expect("XDP");
        let ctx_in = XdpMd {
            data: 0,
            data_end: frame.len() as u32,
            ingress_ifindex: self.ifindex["uplink"],
            ..Default::default()
        };
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(ctx_in.as_bytes()),
            attrs: TestRunAttrs::new().xdp_live_frames(1),
            ..Default::default()
        })
        .unwrap_or_else(|e| {
            panic!("live BPF_PROG_TEST_RUN of uplink_xdp on a {}-byte frame: {e}", frame.len())
        });
    }
}

/// The ifindex of `name` in this thread's namespace, 0 if there is none.
fn if_index(name: &str) -> u32 {
    let cname = CString::new(name).expect("interface name");
    // SAFETY: a valid C string; the lookup goes through a socket of this thread's namespace.
    unsafe { libc::if_nametoindex(cname.as_ptr()) }
}

/// linux/if_packet.h
const PACKET_HOST: u8 = 0;
const PACKET_OUTGOING: u8 = 4;

/// An AF_PACKET socket on one interface of the namespace it was opened in: sends frames into
/// the interface as a container's stack would, and receives every frame the interface sees.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn open(dev: &str) -> Self {
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(all)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = if_index(dev) as i32;
        assert!(sll.sll_ifindex > 0, "{dev} is not in this namespace");
        // SAFETY: a valid sockaddr_ll of the stated length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast::<libc::sockaddr>(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "binding to {dev}: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: a valid timeval of the stated length.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast::<libc::c_void>(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        Self(fd)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: sending from a valid buffer on a bound socket.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    }

    /// The next frame that arrived (not one this side sent) with its packet type, or None after
    /// the timeout.
    fn recv(&self) -> Option<(Vec<u8>, u8)> {
        loop {
            let mut buf = vec![0u8; 4096];
            // SAFETY: as in open.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: valid buffers of the stated lengths.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut sll).cast::<libc::sockaddr>(),
                    &raw mut len,
                )
            };
            if n < 0 {
                return None;
            }
            if sll.sll_pkttype != PACKET_OUTGOING {
                buf.truncate(n as usize);
                return Some((buf, sll.sll_pkttype));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frames.
// ---------------------------------------------------------------------------------------------

/// An Ethernet frame carrying an IPv4 packet from `src` to `dst` with `l4` as payload.
fn ip_frame(src: Ep, dst: Ep, ip: Ipv4, l4: &[u8]) -> Vec<u8> {
    ethernet(dst.mac, src.mac, ETH_P_IP, &ip.packet(l4))
}

fn udp_frame(src: Ep, dst: Ep, dport: u16, len: usize) -> Vec<u8> {
    ip_frame(
        src,
        dst,
        Ipv4::new(src.ip, dst.ip, IPPROTO_UDP),
        &udp(src.ip, dst.ip, 40000, dport, &payload(len)),
    )
}

fn tcp_frame(src: Ep, dst: Ep, len: usize) -> Vec<u8> {
    ip_frame(src, dst, Ipv4::new(src.ip, dst.ip, IPPROTO_TCP), &tcp(src.ip, dst.ip, 43210, 80, &payload(len)))
}

/// An ARP frame from a container (Ethernet source `eth_src`).
fn arp_frame(eth_src: Mac, op: u16, sha: Mac, spa: Ip, tpa: Ip) -> Vec<u8> {
    ethernet(BROADCAST, eth_src, ETH_P_ARP, &arp(op, sha, spa, [0; 6], tpa))
}

/// The tunnel PEER2 uses to send to this host on `vni`.
fn from_peer2(vni: u32) -> Tunnel {
    Tunnel { src_mac: PEER2_MAC, dst_mac: UPLINK_MAC, src_vtep: PEER2, dst_vtep: VTEP, src_port: 51234, vni }
}

/// A valid VXLAN frame: R (blue, behind PEER2) sends UDP to A (blue, local).
fn valid_vxlan() -> Vec<u8> {
    vxlan(&from_peer2(BLUE), &udp_frame(R, A, 7000, 64))
}

/// What VXLAN requires `from_container` to send for `inner` from a container on network `vni`
/// to an endpoint behind `remote_vtep` (RFC 7348 section 5, with this datapath's choices for
/// what the RFC leaves open: DF, TTL 64, the inner TOS copied, a zero UDP checksum). The IPv4
/// identification and the UDP source port are the sender's to choose; they are taken from
/// `actual` (the source port is checked separately).
fn expected_encap(inner: &[u8], vni: u32, remote_vtep: Ip, actual: &[u8]) -> Vec<u8> {
    let actual_ip: Ipv4Hdr = read(actual, OUTER_IP_OFF);
    let actual_udp: UdpHdr = read(actual, OUTER_UDP_OFF);
    let inner_tos = inner[EthHdr::LEN + 1];
    let outer_ip = Ipv4 {
        src: VTEP,
        dst: remote_vtep,
        protocol: IPPROTO_UDP,
        tos: inner_tos,
        id: u16::from_be_bytes(actual_ip.id),
        frag_off: IPV4_DF,
        ttl: 64,
    };
    let udp_len = UdpHdr::LEN + VxlanHdr::LEN + inner.len();
    let mut f = Vec::new();
    // Destination MAC zero: bpf_redirect_neigh fills in the next hop's when the frame leaves.
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&UPLINK_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(bytes_of(&outer_ip.header(udp_len)));
    f.extend_from_slice(&actual_udp.src);
    f.extend_from_slice(&[0x12, 0xb5]); // 4789
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    let v = vni.to_be_bytes();
    f.extend_from_slice(&[0x08, 0, 0, 0, v[1], v[2], v[3], 0]);
    f.extend_from_slice(inner);
    f
}

/// Runs `inner` from A through `from_container` and checks that it went out as exactly the
/// VXLAN frame for the endpoint behind `remote_vtep`, counted as encapsulated. Returns the UDP
/// source port.
fn check_encap(h: &Host, inner: &[u8], remote_vtep: Ip) -> u16 {
    let (out, counts) = h.counting(|h| h.from_container("veth-a", inner));
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "verdict for {} bytes", inner.len());
    assert_eq!(out.frame.len(), inner.len() + 50, "VXLAN adds 50 bytes");
    let expected = expected_encap(inner, BLUE, remote_vtep, &out.frame);
    assert_eq!(out.frame, expected, "encapsulation of a {}-byte frame", inner.len());
    // The checksum the program wrote, checked on its own (expected_encap computed its own).
    assert!(ipv4_checksum_ok(&out.frame[OUTER_IP_OFF..OUTER_UDP_OFF]), "outer IPv4 checksum");
    let sport = u16::from_be_bytes([out.frame[OUTER_UDP_OFF], out.frame[OUTER_UDP_OFF + 1]]);
    assert!((49152..=65535).contains(&sport), "UDP source port {sport} outside 49152-65535");
    assert_eq!(counts, one_each(&[(TX_ENCAP, inner.len() + 50)]));
    sport
}

// ---------------------------------------------------------------------------------------------
// Encapsulation.
// ---------------------------------------------------------------------------------------------

#[test]
fn encap_udp_is_exactly_vxlan() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkenu");
    // From the smallest datagram to the largest that fits a 1500-byte uplink once encapsulated
    // (IPv4 packet of 1450 bytes), with DSCP and ECN bits that must reach the outer header.
    for (len, tos) in [(0, 0x00), (1, 0x00), (18, 0xb8), (512, 0x02), (1000, 0x03), (1422, 0x28)] {
        let inner = ip_frame(
            A,
            R,
            Ipv4::new(A.ip, R.ip, IPPROTO_UDP).tos(tos),
            &udp(A.ip, R.ip, 5000, 53, &payload(len)),
        );
        check_encap(&h, &inner, PEER2);
    }
}

#[test]
fn encap_tcp_is_exactly_vxlan() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkent");
    for len in [0, 100, 1410] {
        check_encap(&h, &tcp_frame(A, R, len), PEER2);
    }
    // Another peer's endpoint goes to that peer's VTEP.
    check_encap(&h, &tcp_frame(A, S, 10), PEER3);
    // ICMP is carried the same way.
    let ping = ip_frame(A, R, Ipv4::new(A.ip, R.ip, IPPROTO_ICMP), &icmp_echo(7, 1, &payload(56)));
    check_encap(&h, &ping, PEER2);
}

#[test]
fn encap_source_port_follows_the_flow() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkport");
    // One flow, packets of different sizes: one source port, so the underlay keeps the flow's
    // packets on one path and in order.
    let ports: BTreeSet<u16> =
        [0, 10, 700, 1400].iter().map(|&len| check_encap(&h, &tcp_frame(A, R, len), PEER2)).collect();
    assert_eq!(ports.len(), 1, "one flow used several source ports: {ports:?}");
    // Different flows spread over the range (RFC 7348: a hash of the inner headers). Sixteen
    // flows all hashing to one port would take a broken hash.
    let spread: BTreeSet<u16> = (0..16)
        .map(|i| {
            let inner =
                ip_frame(A, R, Ipv4::new(A.ip, R.ip, IPPROTO_UDP), &udp(A.ip, R.ip, 30000 + i, 53, b"x"));
            check_encap(&h, &inner, PEER2)
        })
        .collect();
    assert!(spread.len() > 1, "sixteen flows, one source port: {spread:?}");
}

#[test]
fn encap_drops_what_would_not_fit_the_uplink() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkmtu");
    // A 1450-byte IPv4 packet makes a 1500-byte outer packet: the uplink's MTU exactly.
    let fits = udp_frame(A, R, 53, 1450 - 28);
    check_encap(&h, &fits, PEER2);
    // One byte more would be dropped by the uplink without a trace; the program counts it, and
    // as it says Don't Fragment, answers it with ICMP fragmentation needed, MTU 1450, sent back
    // out of the veth it came from.
    let too_big = udp_frame(A, R, 53, 1451 - 28);
    let (out, counts) = h.counting(|h| h.from_container("veth-a", &too_big));
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    overlay_tests::wellformed::frag_needed(&out.frame, &too_big, R.mac, 1450)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.frame.len(), 14 + 20 + 8 + 40, "the IPv4 header and 20 bytes quoted");
    assert_eq!(
        counts,
        one_each(&[(DropReason::TooBig.code(), too_big.len()), (stats::FRAG_NEEDED, out.frame.len())])
    );
    // From R's MAC even when the container addressed the frame elsewhere (here: broadcast).
    let mut misaddressed = too_big.clone();
    misaddressed[..6].copy_from_slice(&[0xff; 6]);
    let out = h.from_container("veth-a", &misaddressed);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    overlay_tests::wellformed::frag_needed(&out.frame, &misaddressed, R.mac, 1450)
        .unwrap_or_else(|e| panic!("{e}"));
    // Without DF (a socket with IP_PMTUDISC_OMIT) nobody is told, and neither is the sender of
    // an ICMP error (RFC 1122) or of a packet with IPv4 options: dropped and counted, no more.
    let no_df = ip_frame(
        A,
        R,
        Ipv4 { frag_off: 0, ..Ipv4::new(A.ip, R.ip, IPPROTO_UDP) },
        &udp(A.ip, R.ip, 40000, 53, &payload(1451 - 28)),
    );
    let mut unreachable = vec![3, 1, 0, 0, 0, 0, 0, 0];
    unreachable.resize(1451 - 20, 0);
    let icmp_error = ip_frame(A, R, Ipv4::new(A.ip, R.ip, IPPROTO_ICMP), &unreachable);
    // Four no-operation options after the header.
    let mut options = [&too_big[..34], &[1, 1, 1, 1], &too_big[34..]].concat();
    edit::<Ipv4Hdr>(&mut options, 14, |ip| {
        ip.vihl = 0x46;
        ip.tot_len = (u16::from_be_bytes(ip.tot_len) + 4).to_be_bytes();
    });
    reseal_ipv4(&mut options, 14);
    for (what, frame) in [("no DF", &no_df), ("an ICMP error", &icmp_error), ("IPv4 options", &options)] {
        let (out, counts) = h.counting(|h| h.from_container("veth-a", frame));
        assert_eq!(out.verdict, TC_ACT_SHOT, "{what}");
        assert_eq!(counts, one_each(&[(DropReason::TooBig.code(), frame.len())]), "{what}");
    }
    // A GSO packet is judged by its segments: segment size plus the inner IPv4 and TCP headers
    // each one repeats (20 + 20 here) plus VXLAN's 50 must fit the uplink's 1500.
    let tcp = tcp_frame(A, R, 1400);
    let gso = |gso_size: u32| {
        h.counting(|h| h.run_tc_gso(PROG_FROM_CONTAINER, h.ifindex["veth-a"], &tcp, gso_size))
    };
    // 1410-byte segments fit: past the size check. (The kernel then refuses to grow this GSO
    // packet, which has no GSO type, something only BPF_PROG_TEST_RUN can make; real GSO
    // traffic is encapsulated in the datapath suite's 1 GiB transfers.)
    let (_, counts) = gso(1410);
    assert!(!counts.contains_key(DropReason::TooBig.name()), "1410-byte segments fit: {counts:?}");
    // 1411-byte segments do not fit: dropped and answered like one packet that does not (a TCP
    // stack whose route to the overlay says more than it carries learns the MTU from it).
    let (out, counts) = gso(1411);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "1411-byte segments do not fit");
    overlay_tests::wellformed::frag_needed(&out.frame, &tcp, R.mac, 1450).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        counts,
        one_each(&[(DropReason::TooBig.code(), tcp.len()), (stats::FRAG_NEEDED, out.frame.len())])
    );
}

#[test]
fn unconfigured_host_does_not_encapsulate() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::unconfigured("pkncfg");
    let frame = udp_frame(A, R, 53, 20);
    let (out, counts) = h.counting(|h| h.from_container("veth-a", &frame));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(counts, one_each(&[(DropReason::NoConfig.code(), frame.len())]));
    // Delivery on the host needs no tunnel configuration.
    let local = udp_frame(A, B, 53, 20);
    let (out, counts) = h.counting(|h| h.from_container("veth-a", &local));
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(counts, one_each(&[(TX_LOCAL, local.len())]));
}

// ---------------------------------------------------------------------------------------------
// Decapsulation.
// ---------------------------------------------------------------------------------------------

/// Inner frames of several kinds and sizes that R may send to A.
fn inner_frames() -> Vec<Vec<u8>> {
    vec![
        udp_frame(R, A, 7000, 0),
        udp_frame(R, A, 7000, 64),
        udp_frame(R, A, 7000, 1422),
        tcp_frame(R, A, 0),
        tcp_frame(R, A, 1410),
        ip_frame(R, A, Ipv4::new(R.ip, A.ip, IPPROTO_ICMP).tos(0xb8), &icmp_echo(9, 3, &payload(56))),
    ]
}

/// The metadata the XDP program leaves for TC: XdpMeta { magic, ifindex } in host byte order.
fn xdp_meta(ifindex: u32) -> Vec<u8> {
    [XDP_META_MAGIC.to_ne_bytes(), ifindex.to_ne_bytes()].concat()
}

#[test]
fn xdp_decap_restores_the_inner_frame() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkxdec");
    for inner in inner_frames() {
        let frame = vxlan(&from_peer2(BLUE), &inner);
        let (out, counts) = h.counting(|h| h.uplink_xdp(&frame));
        assert_eq!(out.verdict, XDP_PASS, "a valid frame passes on to TC");
        assert_eq!(out.frame, inner, "decapsulated frame");
        assert_eq!(out.meta, xdp_meta(h.ifindex["veth-a"]), "metadata for TC: A's veth");
        assert_eq!(counts, one_each(&[(RX_DECAP, inner.len())]));
    }
}

#[test]
fn tc_decap_restores_the_inner_frame() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pktdec");
    for inner in inner_frames() {
        let frame = vxlan(&from_peer2(BLUE), &inner);
        let (out, counts) = h.counting(|h| h.uplink_tc(&frame));
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "delivered into the container");
        assert_eq!(out.frame, inner, "decapsulated frame");
        assert_eq!(counts, one_each(&[(RX_DECAP, inner.len()), (RX_DELIVER, inner.len())]));
    }
}

#[test]
fn decap_accepts_any_udp_checksum_source_port_and_inner_padding() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkrsv");
    let inner = udp_frame(R, A, 7000, 100);
    // A non-zero UDP checksum, correctly computed over the whole datagram: receivers MAY verify
    // it, and must then accept it.
    let mut checksummed = vxlan(&from_peer2(BLUE), &inner);
    let udp_part = checksummed[OUTER_UDP_OFF..].to_vec();
    let summed = udp(PEER2, VTEP, 51234, 4789, &udp_part[UdpHdr::LEN..]);
    assert_eq!(summed.len(), udp_part.len());
    checksummed[OUTER_UDP_OFF..].copy_from_slice(&summed);
    assert_ne!(read::<UdpHdr>(&checksummed, OUTER_UDP_OFF).check, [0, 0]);
    // Any source port: it is the sender's flow hash.
    let mut low_port = vxlan(&from_peer2(BLUE), &inner);
    edit::<UdpHdr>(&mut low_port, OUTER_UDP_OFF, |u| u.src = 1024u16.to_be_bytes());

    // A small inner frame padded to Ethernet's 60-byte minimum by its sender: the padding
    // follows the IPv4 packet, which the receiving kernel trims.
    let mut padded_inner = udp_frame(R, A, 7000, 0);
    assert!(padded_inner.len() < 60);
    padded_inner.resize(60, 0);
    let padded = vxlan(&from_peer2(BLUE), &padded_inner);
    for (what, frame, inner) in [
        ("UDP checksum", checksummed, inner.clone()),
        ("source port", low_port, inner.clone()),
        ("inner Ethernet padding", padded, padded_inner),
    ] {
        let (out, counts) = h.counting(|h| h.uplink_xdp(&frame));
        assert_eq!((out.verdict, &out.frame), (XDP_PASS, &inner), "XDP, {what}");
        assert_eq!(out.meta, xdp_meta(h.ifindex["veth-a"]), "XDP, {what}");
        assert_eq!(counts, one_each(&[(RX_DECAP, inner.len())]), "XDP, {what}");
        let (out, counts) = h.counting(|h| h.uplink_tc(&frame));
        assert_eq!((out.verdict, &out.frame), (TC_ACT_REDIRECT, &inner), "TC, {what}");
        assert_eq!(counts, one_each(&[(RX_DECAP, inner.len()), (RX_DELIVER, inner.len())]), "TC, {what}");
    }
}

/// `frame` with its IPv4 header at `off` given ECN codepoint `ecn` (and a right checksum).
fn with_ecn(frame: &[u8], off: usize, ecn: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    edit::<Ipv4Hdr>(&mut f, off, |ip| ip.tos = (ip.tos & !0b11) | ecn);
    reseal_ipv4(&mut f, off);
    f
}

#[test]
fn congestion_marked_on_the_underlay_reaches_the_container_per_rfc6040() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkecn");
    let (not_ect, ect1, ect0, ce) = (0b00, 0b01, 0b10, 0b11);
    let inner = udp_frame(R, A, 7000, 100);
    // (inner, outer) -> what the container gets: CE on an ECN-capable packet when the outer says
    // CE (the checksum updated), unchanged otherwise.
    for (inner_ecn, outer_ecn, delivered_ecn) in [
        (ect0, ce, ce),
        (ect1, ce, ce),
        (ce, ce, ce),
        (ect0, ect0, ect0),
        (ect0, not_ect, ect0),
        (not_ect, ect0, not_ect),
    ] {
        let what = format!("inner {inner_ecn:02b}, outer {outer_ecn:02b}");
        let sent = with_ecn(&inner, EthHdr::LEN, inner_ecn);
        let frame = with_ecn(&vxlan(&from_peer2(BLUE), &sent), OUTER_IP_OFF, outer_ecn);
        let expected = with_ecn(&inner, EthHdr::LEN, delivered_ecn);
        let (out, counts) = h.counting(|h| h.uplink_xdp(&frame));
        assert_eq!((out.verdict, &out.frame), (XDP_PASS, &expected), "XDP, {what}");
        assert_eq!(counts, one_each(&[(RX_DECAP, inner.len())]), "XDP, {what}");
        let (out, counts) = h.counting(|h| h.uplink_tc(&frame));
        assert_eq!((out.verdict, &out.frame), (TC_ACT_REDIRECT, &expected), "TC, {what}");
        assert_eq!(counts, one_each(&[(RX_DECAP, inner.len()), (RX_DELIVER, inner.len())]), "TC, {what}");
    }
    // Congestion around a packet whose sender cannot be told: dropped, and counted as such.
    let frame = with_ecn(&vxlan(&from_peer2(BLUE), &inner), OUTER_IP_OFF, ce);
    check_uplink_drop(&h, "outer CE, inner Not-ECT", &frame, DropReason::CongestedNotEct);
}

// ---------------------------------------------------------------------------------------------
// Uplink drops: every one through XDP and through the TC fallback, which apply the same rules.
// ---------------------------------------------------------------------------------------------

/// Checks that `frame` is dropped on the uplink for `reason`, by XDP and by TC, and that
/// nothing else is counted.
fn check_uplink_drop(h: &Host, what: &str, frame: &[u8], reason: DropReason) {
    let (out, counts) = h.counting(|h| h.uplink_xdp(frame));
    assert_eq!(out.verdict, XDP_DROP, "XDP verdict: {what}");
    assert_eq!(counts, one_each(&[(reason.code(), frame.len())]), "XDP counters: {what}");
    let (out, counts) = h.counting(|h| h.uplink_tc(frame));
    assert_eq!(out.verdict, TC_ACT_SHOT, "TC verdict: {what}");
    assert_eq!(counts, one_each(&[(reason.code(), frame.len())]), "TC counters: {what}");
}

#[test]
fn uplink_drops_vxlan_from_unknown_peers() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkpeer");
    // Everything else about them is right, including an inner source that exists (behind PEER2).
    for (what, src_vtep) in [("source VTEP not a peer", STRANGER), ("source is this host's own VTEP", VTEP)] {
        let t = Tunnel { src_vtep, ..from_peer2(BLUE) };
        check_uplink_drop(&h, what, &vxlan(&t, &udp_frame(R, A, 7000, 64)), DropReason::UnknownPeer);
    }
}

#[test]
fn uplink_drops_unknown_vni() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkvni");
    let frame = vxlan(&from_peer2(0x00_99_99), &udp_frame(R, A, 7000, 64));
    check_uplink_drop(&h, "VNI of no network here", &frame, DropReason::UnknownVni);
}

// ---------------------------------------------------------------------------------------------
// Encrypted networks (docs/encryption.md): never in the clear on the underlay, either way.
// ---------------------------------------------------------------------------------------------

/// Marks blue encrypted, as the agent does for a network created `-o encrypted`.
fn encrypt_blue(h: &mut Host) {
    let net = Network {
        gateway: BLUE_GATEWAY,
        gateway_mac: BLUE_GATEWAY_MAC,
        flags: NETWORK_ENCRYPTED,
        prefix_len: 0,
    };
    h.dp.maps.networks.insert(BLUE, net, 0).expect("NETWORKS");
}

#[test]
fn plaintext_vxlan_claiming_an_encrypted_vni_is_dropped_and_counted() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkencrx");
    encrypt_blue(&mut h);
    // Everything about it is right, the way a rogue host on the underlay would forge it: a
    // known peer's source address, an inner source that peer owns, a local destination.
    for inner in inner_frames() {
        let frame = vxlan(&from_peer2(BLUE), &inner);
        check_uplink_drop(&h, "plaintext for encrypted blue", &frame, DropReason::PlaintextEncrypted);
    }
    // Red, beside it, is plaintext and still takes VXLAN as before.
    let frame = vxlan(&from_peer2(RED), &udp_frame(Q, X, 7000, 64));
    let (out, counts) = h.counting(|h| h.uplink_tc(&frame));
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "red is delivered");
    let inner_len = frame.len() - 50;
    assert_eq!(counts, one_each(&[(RX_DECAP, inner_len), (RX_DELIVER, inner_len)]));
}

#[test]
fn an_encrypted_network_sends_nothing_in_the_clear_and_delivers_on_its_host() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkenctx");
    encrypt_blue(&mut h);
    // To another host: no cipher on this kernel, so dropped here, never encapsulated in the clear.
    for to in [R, S] {
        let frame = udp_frame(A, to, 7000, 64);
        let (out, counts) = h.counting(|h| h.from_container("veth-a", &frame));
        assert_eq!(out.verdict, TC_ACT_SHOT, "to {:?}", to.ip);
        assert_eq!(counts, one_each(&[(DropReason::NoCipher.code(), frame.len())]));
    }
    // On this host nothing crosses the underlay: delivered as on any network.
    let frame = udp_frame(A, B, 7000, 64);
    let (out, counts) = h.counting(|h| h.from_container("veth-a", &frame));
    assert_eq!((out.verdict, counts), (TC_ACT_REDIRECT, one_each(&[(TX_LOCAL, frame.len())])));
    // A plaintext network keeps today's path: red's X to Q behind PEER2 is VXLAN.
    let frame = udp_frame(X, Q, 7000, 64);
    let (out, counts) = h.counting(|h| h.from_container("veth-x", &frame));
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(counts, one_each(&[(TX_ENCAP, frame.len() + 50)]));
}

#[test]
fn uplink_drops_inner_destinations_that_are_not_local() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pknl");
    let cases = [
        ("destination is a remote endpoint", vxlan(&from_peer2(BLUE), &udp_frame(R, S, 7000, 64))),
        (
            "destination unknown",
            vxlan(&from_peer2(BLUE), &udp_frame(R, Ep { ip: NOBODY, mac: A.mac }, 7000, 64)),
        ),
        // Isolation on receive: A's address, but on red, where A does not exist.
        ("destination on another network", vxlan(&from_peer2(RED), &udp_frame(Q, A, 7000, 64))),
    ];
    for (what, frame) in cases {
        check_uplink_drop(&h, what, &frame, DropReason::NotLocal);
    }
}

#[test]
fn uplink_drops_vxlan_without_the_i_flag() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkflag");
    for flags in [0x00, 0xf7] {
        let mut frame = valid_vxlan();
        edit::<VxlanHdr>(&mut frame, VXLAN_OFF, |v| v.flags = flags);
        check_uplink_drop(&h, &format!("VXLAN flags {flags:#04x}"), &frame, DropReason::BadFlags);
    }
}

/// A header change and what it is called.
type Mutation<T> = (&'static str, fn(&mut T));

#[test]
fn uplink_drops_vxlan_with_reserved_bits_as_linux_does() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkrsv");
    // RFC 7348 says to ignore them; Linux's vxlan drops them unless told of the extension (GBP,
    // GPE) that gives them a meaning, so a frame is never taken for what it is not.
    let cases: [Mutation<VxlanHdr>; 4] = [
        ("a reserved flag bit", |v| v.flags |= 0x80),
        ("the GPE/GBP bits", |v| v.flags = 0x0c),
        ("the reserved field after the flags", |v| v._reserved1 = [0, 0, 1]),
        ("the reserved byte after the VNI", |v| v._reserved2 = 0xdd),
    ];
    for (what, change) in cases {
        let mut frame = valid_vxlan();
        edit::<VxlanHdr>(&mut frame, VXLAN_OFF, change);
        check_uplink_drop(&h, what, &frame, DropReason::BadFlags);
    }
}

#[test]
fn uplink_drops_vxlan_with_outer_options_to_a_group_mac_or_a_malformed_inner_header() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkhard");
    check_uplink_drop(&h, "VXLAN with outer IPv4 options", &with_options(4789), DropReason::OuterOptions);
    for (what, mac) in [("broadcast", BROADCAST), ("multicast", [0x01, 0x00, 0x5e, 0, 0, 1])] {
        let mut frame = valid_vxlan();
        frame[..6].copy_from_slice(&mac);
        check_uplink_drop(&h, &format!("VXLAN to a {what} MAC"), &frame, DropReason::BadOuterMac);
    }
    let inner_ip = |f: &mut Vec<u8>, change: fn(&mut Ipv4Hdr)| {
        edit::<Ipv4Hdr>(f, INNER_IP_OFF, change);
        reseal_ipv4(f, INNER_IP_OFF);
    };
    let cases: [Mutation<Ipv4Hdr>; 3] = [
        ("inner header length 16", |ip| ip.vihl = 0x44),
        ("inner total length one too long", |ip| {
            ip.tot_len = (u16::from_be_bytes(ip.tot_len) + 1).to_be_bytes();
        }),
        ("inner total length one too short", |ip| {
            ip.tot_len = (u16::from_be_bytes(ip.tot_len) - 1).to_be_bytes();
        }),
    ];
    for (what, change) in cases {
        let mut frame = valid_vxlan();
        inner_ip(&mut frame, change);
        check_uplink_drop(&h, what, &frame, DropReason::InnerMalformed);
    }
}

/// IPv4 packets whose headers do not describe them, as a raw socket can send them: the
/// receiving container's kernel would discard each one where no overlay counter sees it.
/// (Found by the fuzz suite: from a container they were delivered or encapsulated as they
/// were, and cut-off transport headers were also decapsulated.)
fn malformed_inner(src: Ep, dst: Ep) -> Vec<(&'static str, Vec<u8>)> {
    let ip = |proto, l4: &[u8]| ip_frame(src, dst, Ipv4::new(src.ip, dst.ip, proto), l4);
    let udp_ok = udp(src.ip, dst.ip, 40000, 7000, &payload(30));
    let tcp_ok = tcp(src.ip, dst.ip, 40000, 80, &payload(30));
    let total = |delta: i32| {
        let mut f = ip(IPPROTO_UDP, &udp_ok);
        edit::<Ipv4Hdr>(&mut f, EthHdr::LEN, |h| {
            h.tot_len = ((i32::from(u16::from_be_bytes(h.tot_len)) + delta) as u16).to_be_bytes();
        });
        reseal_ipv4(&mut f, EthHdr::LEN);
        f
    };
    let mut udp_long = udp_ok.clone();
    udp_long[4..6].copy_from_slice(&(udp_ok.len() as u16 + 1).to_be_bytes());
    let mut udp_short = udp_ok.clone();
    udp_short[4..6].copy_from_slice(&7u16.to_be_bytes());
    let mut doff_long = tcp_ok.clone();
    doff_long[12] = 15 << 4;
    let mut doff_short = tcp_ok.clone();
    doff_short[12] = 4 << 4;
    vec![
        ("IPv4 total length one too long", total(1)),
        ("IPv4 total length one too short", total(-1)),
        ("UDP header cut short", ip(IPPROTO_UDP, &udp_ok[..6])),
        ("UDP length past the packet", ip(IPPROTO_UDP, &udp_long)),
        ("UDP length under its header", ip(IPPROTO_UDP, &udp_short)),
        ("TCP header cut short", ip(IPPROTO_TCP, &tcp_ok[..19])),
        ("TCP data offset past the segment", ip(IPPROTO_TCP, &doff_long)),
        ("TCP data offset under 5 words", ip(IPPROTO_TCP, &doff_short)),
        ("ICMP header cut short", ip(IPPROTO_ICMP, &icmp_echo(1, 1, b"")[..7])),
    ]
}

/// What must still go through: a later fragment (no transport header until reassembled) and
/// a first fragment cut inside its TCP header, IPv4 options, TCP options, and another protocol.
fn odd_but_whole(src: Ep, dst: Ep) -> Vec<(&'static str, Vec<u8>)> {
    let tcp_ok = tcp(src.ip, dst.ip, 40000, 80, &payload(30));
    let mut later = Ipv4::new(src.ip, dst.ip, IPPROTO_TCP);
    later.frag_off = 0x00b9;
    let mut first = Ipv4::new(src.ip, dst.ip, IPPROTO_TCP);
    first.frag_off = IPV4_MF;
    let mut options =
        ip_frame(src, dst, Ipv4::new(src.ip, dst.ip, IPPROTO_UDP), &udp(src.ip, dst.ip, 1, 2, b"o"));
    options.splice(EthHdr::LEN + 20..EthHdr::LEN + 20, [1u8, 1, 1, 0]);
    edit::<Ipv4Hdr>(&mut options, EthHdr::LEN, |h| {
        h.vihl = 0x46;
        h.tot_len = (u16::from_be_bytes(h.tot_len) + 4).to_be_bytes();
    });
    reseal_ipv4(&mut options, EthHdr::LEN);
    let mut tcp_options = tcp_ok.clone();
    tcp_options[12] = 8 << 4;
    vec![
        ("a later fragment", ip_frame(src, dst, later, &payload(8))),
        ("a first fragment inside the TCP header", ip_frame(src, dst, first, &tcp_ok[..8])),
        ("IPv4 options", options),
        ("TCP options", ip_frame(src, dst, Ipv4::new(src.ip, dst.ip, IPPROTO_TCP), &tcp_options)),
        ("GRE", ip_frame(src, dst, Ipv4::new(src.ip, dst.ip, 47), &payload(3))),
    ]
}

#[test]
fn packets_that_do_not_describe_themselves_are_dropped_both_ways() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkwhole");
    for (what, frame) in malformed_inner(A, B) {
        check_container_drop(
            &h,
            &format!("{what}, to B on this host"),
            "veth-a",
            &frame,
            DropReason::Malformed,
        );
    }
    for (what, frame) in malformed_inner(A, R) {
        check_container_drop(&h, &format!("{what}, to R on a peer"), "veth-a", &frame, DropReason::Malformed);
    }
    for (what, inner) in malformed_inner(R, A) {
        check_uplink_drop(&h, what, &vxlan(&from_peer2(BLUE), &inner), DropReason::InnerMalformed);
    }
    for (what, frame) in odd_but_whole(A, B) {
        let (out, counts) = h.counting(|h| h.from_container("veth-a", &frame));
        assert_eq!((out.verdict, &out.frame), (TC_ACT_REDIRECT, &frame), "{what}, to B");
        assert_eq!(counts, one_each(&[(TX_LOCAL, frame.len())]), "{what}, to B");
    }
    for (what, frame) in odd_but_whole(A, R) {
        let (out, counts) = h.counting(|h| h.from_container("veth-a", &frame));
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what}, to R");
        assert_eq!(counts, one_each(&[(TX_ENCAP, frame.len() + 50)]), "{what}, to R");
    }
    for (what, inner) in odd_but_whole(R, A) {
        let (out, counts) = h.counting(|h| h.uplink_tc(&vxlan(&from_peer2(BLUE), &inner)));
        assert_eq!((out.verdict, &out.frame), (TC_ACT_REDIRECT, &inner), "{what}, from R");
        assert_eq!(counts, one_each(&[(RX_DECAP, inner.len()), (RX_DELIVER, inner.len())]), "{what}, from R");
    }
}

#[test]
fn uplink_drops_truncated_frames() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pktrunc");
    // Each cut leaves length fields that agree with the frame, so it is the missing header, not
    // a lying length, that must get it dropped.
    let cuts = [
        ("inside the UDP header", OUTER_UDP_OFF + 4),
        ("inside the VXLAN header", VXLAN_OFF + 4),
        ("inside the inner Ethernet header", INNER_ETH_OFF + 10),
        ("inside the inner IPv4 header", INNER_IP_OFF + 10),
    ];
    for (what, len) in cuts {
        let mut frame = valid_vxlan();
        truncate_consistently(&mut frame, len);
        check_uplink_drop(&h, what, &frame, DropReason::Truncated);
    }
}

#[test]
fn uplink_drops_lengths_that_do_not_match_the_frame() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pklen");
    let ip_len = |frame: &mut Vec<u8>, delta: i32| {
        edit::<Ipv4Hdr>(frame, OUTER_IP_OFF, |ip| {
            ip.tot_len = ((i32::from(u16::from_be_bytes(ip.tot_len)) + delta) as u16).to_be_bytes();
        });
        reseal_ipv4(frame, OUTER_IP_OFF);
    };
    let udp_len = |frame: &mut Vec<u8>, delta: i32| {
        edit::<UdpHdr>(frame, OUTER_UDP_OFF, |u| {
            u.len = ((i32::from(u16::from_be_bytes(u.len)) + delta) as u16).to_be_bytes();
        });
    };
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for (what, delta) in [("IPv4 total length one too long", 1), ("IPv4 total length one too short", -1)] {
        let mut f = valid_vxlan();
        ip_len(&mut f, delta);
        cases.push((what, f));
    }
    for (what, delta) in [("UDP length one too long", 1), ("UDP length one too short", -1)] {
        let mut f = valid_vxlan();
        udp_len(&mut f, delta);
        cases.push((what, f));
    }
    // Bytes after the end the IPv4 header gives (a VXLAN frame is never short enough to need
    // Ethernet padding).
    let mut trailing = valid_vxlan();
    trailing.extend_from_slice(&[0; 4]);
    cases.push(("bytes after the IPv4 packet", trailing));
    for (what, frame) in cases {
        check_uplink_drop(&h, what, &frame, DropReason::BadLength);
    }
}

#[test]
fn uplink_drops_fragmented_vxlan() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkfrag");
    // A first fragment carries the UDP header, so it is recognisably VXLAN; VTEPs never
    // fragment (RFC 7348 section 4.3) and the receiver may discard fragments.
    let mut first = valid_vxlan();
    edit::<Ipv4Hdr>(&mut first, OUTER_IP_OFF, |ip| ip.frags = IPV4_MF.to_be_bytes());
    reseal_ipv4(&mut first, OUTER_IP_OFF);
    check_uplink_drop(&h, "first fragment (MF, offset 0)", &first, DropReason::Fragment);
}

#[test]
fn uplink_drops_bad_outer_checksum() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkcsum");
    let mut frame = valid_vxlan();
    frame[OUTER_IP_OFF + 10] ^= 0x01;
    assert!(!ipv4_checksum_ok(&frame[OUTER_IP_OFF..OUTER_UDP_OFF]));
    check_uplink_drop(&h, "outer IPv4 checksum off by one bit", &frame, DropReason::BadOuterIp);
}

#[test]
fn uplink_drops_inner_frames_that_are_not_ipv4() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkinner");
    let inner_arp = ethernet(BROADCAST, R.mac, ETH_P_ARP, &arp(ARP_OP_REQUEST, R.mac, R.ip, [0; 6], A.ip));
    let inner_v6 = ethernet(A.mac, R.mac, ETH_P_IPV6, &ipv6_udp(1, 2, b"v6"));
    // IPv4 ethertype, but the header says version 6.
    let mut not_v4 = udp_frame(R, A, 7000, 64);
    not_v4[EthHdr::LEN] = 0x65;
    // RFC 7348 section 6.1: a decapsulated frame with an inner VLAN tag SHOULD be discarded.
    let tagged = ethernet(
        A.mac,
        R.mac,
        0x8100,
        &[[0, 5, 0x08, 0x00].as_slice(), &udp_frame(R, A, 7000, 64)[14..]].concat(),
    );
    for (what, inner) in [
        ("ARP", inner_arp),
        ("IPv6", inner_v6),
        ("IPv4 ethertype, version 6", not_v4),
        ("802.1Q tagged", tagged),
    ] {
        check_uplink_drop(&h, what, &vxlan(&from_peer2(BLUE), &inner), DropReason::InnerNotIpv4);
    }
}

#[test]
fn xdp_leaves_tagged_frames_to_tc() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkxvlan");
    // Valid VXLAN for this host under a tag: 802.1Q VLAN 0 with priority 7 (priority-tagged,
    // which the stack takes for untagged), VLAN 100, and 802.1ad. XDP leaves each to TC, which
    // sees it with the tag taken out and drops it (vlan_tagged: the datapath suite sends them
    // through real uplinks); taken for "not ours" here, a priority-tagged one would reach the
    // stack as UDP to a port no socket holds, and be answered with an ICMP error.
    let vxlan = valid_vxlan();
    for (tpid, tci) in [(0x8100u16, 0xe000u16), (0x8100, 0x0064), (0x88a8, 0x0064)] {
        let what = format!("tag {tpid:#06x} tci {tci:#06x}");
        let frame = [&vxlan[..12], &tpid.to_be_bytes(), &tci.to_be_bytes(), &vxlan[12..]].concat();
        let (out, counts) = h.counting(|h| h.uplink_xdp(&frame));
        assert_eq!((out.verdict, &out.frame), (XDP_PASS, &frame), "{what}");
        assert!(out.meta.is_empty(), "{what}: no metadata, so TC classifies it itself");
        assert_eq!(counts, Counts::new(), "{what}: TC counts it, once");
    }
}

#[test]
fn uplink_drops_inner_sources_the_peer_does_not_own() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkspoof");
    let cases = [
        // S lives behind PEER3: PEER2 cannot speak for it.
        ("source behind another peer", udp_frame(S, A, 7000, 64)),
        ("source unknown", udp_frame(Ep { ip: NOBODY, mac: R.mac }, A, 7000, 64)),
        // B lives on this host: nothing from outside may claim to be it.
        ("source is a local endpoint", udp_frame(B, A, 7000, 64)),
        // Q is PEER2's, but on red: it does not exist on blue.
        ("source from another network", udp_frame(Q, A, 7000, 64)),
        // R's address is PEER2's to use, but only with R's MAC.
        ("source address with another MAC", udp_frame(Ep { ip: R.ip, mac: S.mac }, A, 7000, 64)),
    ];
    for (what, inner) in cases {
        check_uplink_drop(&h, what, &vxlan(&from_peer2(BLUE), &inner), DropReason::InnerSpoofed);
    }
}

// ---------------------------------------------------------------------------------------------
// Uplink frames that are not VXLAN for this host.
// ---------------------------------------------------------------------------------------------

/// UDP from PEER2 to the VTEP's `port` with an outer IPv4 header carrying options (NOP, NOP,
/// NOP, end), around a VXLAN header and an inner frame.
fn with_options(port: u16) -> Vec<u8> {
    let inner = udp_frame(R, A, 7000, 64);
    let vx = [&[0x08, 0, 0, 0], &BLUE.to_be_bytes()[1..], &[0], &inner[..]].concat();
    let mut dgram = udp(PEER2, VTEP, 51234, port, &vx);
    dgram[6..8].copy_from_slice(&[0, 0]);
    let mut ip = bytes_of(&Ipv4::new(PEER2, VTEP, IPPROTO_UDP).header(0)).to_vec();
    ip[0] = 0x46;
    ip.extend_from_slice(&[0x01, 0x01, 0x01, 0x00]);
    let tot = (ip.len() + dgram.len()) as u16;
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    let mut f = ethernet(UPLINK_MAC, PEER2_MAC, ETH_P_IP, &[ip, dgram].concat());
    reseal_ipv4(&mut f, OUTER_IP_OFF);
    f
}

/// Frames the uplink receives that are none of the overlay's business.
fn not_ours() -> Vec<(&'static str, Vec<u8>)> {
    let host = |l4: &[u8], protocol| {
        ethernet(UPLINK_MAC, PEER2_MAC, ETH_P_IP, &Ipv4::new(PEER2, VTEP, protocol).packet(l4))
    };
    let mut later_fragment = valid_vxlan();
    edit::<Ipv4Hdr>(&mut later_fragment, OUTER_IP_OFF, |ip| ip.frags = 0x00b9u16.to_be_bytes());
    reseal_ipv4(&mut later_fragment, OUTER_IP_OFF);
    let mut to_other_mac = valid_vxlan();
    to_other_mac[..6].copy_from_slice(&[0x02, 0, 0, 0, 0x99, 0x99]);
    let mut to_other_ip = valid_vxlan();
    edit::<Ipv4Hdr>(&mut to_other_ip, OUTER_IP_OFF, |ip| ip.dst_addr = [198, 18, 0, 50]);
    reseal_ipv4(&mut to_other_ip, OUTER_IP_OFF);
    vec![
        ("UDP to another port of the VTEP", host(&udp(PEER2, VTEP, 51234, 53, b"query"), IPPROTO_UDP)),
        ("TCP to port 4789 of the VTEP", host(&tcp(PEER2, VTEP, 51234, 4789, b"hello"), IPPROTO_TCP)),
        ("ICMP to the VTEP", host(&icmp_echo(1, 1, b"ping"), IPPROTO_ICMP)),
        ("VXLAN to another address", to_other_ip),
        (
            "ARP for the VTEP",
            ethernet(BROADCAST, PEER2_MAC, ETH_P_ARP, &arp(ARP_OP_REQUEST, PEER2_MAC, PEER2, [0; 6], VTEP)),
        ),
        ("IPv6 UDP to 4789", ethernet(UPLINK_MAC, PEER2_MAC, ETH_P_IPV6, &ipv6_udp(51234, 4789, b"v6"))),
        ("a later fragment (no UDP header to judge)", later_fragment),
        ("UDP with IPv4 options to another port", with_options(53)),
        ("VXLAN to another host's MAC (the stack discards it)", to_other_mac),
    ]
}

#[test]
fn uplink_passes_what_is_not_vxlan_for_this_host_untouched() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkpass");
    for (what, frame) in not_ours() {
        let (out, counts) = h.counting(|h| h.uplink_xdp(&frame));
        assert_eq!(out.verdict, XDP_PASS, "XDP verdict: {what}");
        assert_eq!(out.frame, frame, "XDP output: {what}");
        // Metadata ifindex 0 tells TC the frame was looked at and is not ours.
        assert_eq!(out.meta, xdp_meta(0), "XDP metadata: {what}");
        assert_eq!(counts, one_each(&[(UPLINK_PASS, frame.len())]), "XDP counters: {what}");

        // TC alone (no XDP on the uplink, the default on veths) counts it the same way.
        let (out, counts) = h.counting(|h| h.uplink_tc(&frame));
        assert_eq!(out.verdict, TC_ACT_OK, "TC verdict: {what}");
        assert_eq!(out.frame, frame, "TC output: {what}");
        assert_eq!(counts, one_each(&[(UPLINK_PASS, frame.len())]), "TC counters: {what}");
    }
}

#[test]
fn unconfigured_uplink_passes_everything_untouched() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::unconfigured("pkupnc");
    // Until the agent configured the host, the uplink is just the host's interface: even a
    // frame that would be valid VXLAN is left alone.
    let mut frames = not_ours();
    frames.push(("valid VXLAN", valid_vxlan()));
    for (what, frame) in frames {
        let (out, counts) = h.counting(|h| h.uplink_xdp(&frame));
        assert_eq!((out.verdict, &out.frame, &out.meta[..]), (XDP_PASS, &frame, &[][..]), "XDP: {what}");
        assert_eq!(counts, Counts::new(), "XDP counters: {what}");
        let (out, counts) = h.counting(|h| h.uplink_tc(&frame));
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame), "TC: {what}");
        assert_eq!(counts, Counts::new(), "TC counters: {what}");
    }
}

// ---------------------------------------------------------------------------------------------
// The ARP responder.
// ---------------------------------------------------------------------------------------------

/// The reply RFC 826 calls for when `owner` (with `owner_mac`) answers `requester`.
fn arp_reply(requester: Ep, owner_ip: Ip, owner_mac: Mac) -> Vec<u8> {
    ethernet(
        requester.mac,
        owner_mac,
        ETH_P_ARP,
        &arp(ARP_OP_REPLY, owner_mac, owner_ip, requester.mac, requester.ip),
    )
}

#[test]
fn arp_requests_are_answered_for_every_address_on_the_network() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkarpok");
    let cases = [
        ("a remote endpoint", R.ip, R.mac),
        ("a local endpoint", B.ip, B.mac),
        ("the gateway", BLUE_GATEWAY, BLUE_GATEWAY_MAC),
    ];
    for (what, target, owner_mac) in cases {
        let request = arp_frame(A.mac, ARP_OP_REQUEST, A.mac, A.ip, target);
        let (out, counts) = h.counting(|h| h.from_container("veth-a", &request));
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "verdict: {what}");
        assert_eq!(out.frame, arp_reply(A, target, owner_mac), "reply: {what}");
        assert_eq!(counts, one_each(&[(ARP_REPLY, request.len())]), "counters: {what}");
    }
    // A request padded to the Ethernet minimum (60 bytes) is answered the same; the padding
    // stays where it was.
    let mut padded = arp_frame(A.mac, ARP_OP_REQUEST, A.mac, A.ip, R.ip);
    padded.resize(60, 0);
    let (out, counts) = h.counting(|h| h.from_container("veth-a", &padded));
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let mut expected = arp_reply(A, R.ip, R.mac);
    expected.resize(60, 0);
    assert_eq!(out.frame, expected);
    assert_eq!(counts, one_each(&[(ARP_REPLY, 60)]));
}

#[test]
fn arp_requests_that_cannot_be_answered_are_dropped() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkarpno");
    let mut not_ethernet = arp_frame(A.mac, ARP_OP_REQUEST, A.mac, A.ip, R.ip);
    not_ethernet[EthHdr::LEN + 1] = 6; // hardware type 6 (IEEE 802)
    let cases: Vec<(&str, &str, Vec<u8>, DropReason)> = vec![
        ("unknown address", "veth-a", arp_frame(A.mac, ARP_OP_REQUEST, A.mac, A.ip, NOBODY), DropReason::Arp),
        // An announcement (gratuitous ARP): nobody else to answer for it.
        (
            "its own address",
            "veth-a",
            arp_frame(A.mac, ARP_OP_REQUEST, A.mac, A.ip, A.ip),
            DropReason::ArpProbe,
        ),
        // RFC 5227 duplicate-address probes: sender address 0.0.0.0, for its own or any address.
        (
            "a probe for its own address",
            "veth-a",
            arp_frame(A.mac, ARP_OP_REQUEST, A.mac, [0; 4], A.ip),
            DropReason::ArpProbe,
        ),
        (
            "a probe for another address",
            "veth-a",
            arp_frame(A.mac, ARP_OP_REQUEST, A.mac, [0; 4], R.ip),
            DropReason::ArpProbe,
        ),
        // Isolation: Q's address exists only on red.
        (
            "an address of another network",
            "veth-a",
            arp_frame(A.mac, ARP_OP_REQUEST, A.mac, A.ip, Q.ip),
            DropReason::Arp,
        ),
        // Red has no gateway, and 0.0.0.0 is nobody's.
        (
            "0.0.0.0 on a network without gateway",
            "veth-x",
            arp_frame(X.mac, ARP_OP_REQUEST, X.mac, X.ip, [0; 4]),
            DropReason::Arp,
        ),
        (
            "a reply, not a request",
            "veth-a",
            arp_frame(A.mac, ARP_OP_REPLY, A.mac, A.ip, R.ip),
            DropReason::ArpNotRequest,
        ),
        // A reply claiming another container's address is a spoof, not an unanswerable request.
        (
            "a reply claiming B's address",
            "veth-a",
            arp_frame(A.mac, ARP_OP_REPLY, A.mac, B.ip, R.ip),
            DropReason::Spoofed,
        ),
        (
            "a probe in B's MAC",
            "veth-a",
            arp_frame(A.mac, ARP_OP_REQUEST, B.mac, [0; 4], A.ip),
            DropReason::Spoofed,
        ),
        ("not Ethernet/IPv4", "veth-a", not_ethernet, DropReason::Arp),
        (
            "spoofed sender MAC",
            "veth-a",
            arp_frame(A.mac, ARP_OP_REQUEST, B.mac, A.ip, R.ip),
            DropReason::Spoofed,
        ),
        (
            "spoofed sender IPv4",
            "veth-a",
            arp_frame(A.mac, ARP_OP_REQUEST, A.mac, B.ip, R.ip),
            DropReason::Spoofed,
        ),
        (
            "spoofed Ethernet source",
            "veth-a",
            arp_frame(B.mac, ARP_OP_REQUEST, B.mac, B.ip, R.ip),
            DropReason::Spoofed,
        ),
        (
            "truncated",
            "veth-a",
            arp_frame(A.mac, ARP_OP_REQUEST, A.mac, A.ip, R.ip)[..EthHdr::LEN + 20].to_vec(),
            DropReason::Malformed,
        ),
    ];
    for (what, dev, frame, reason) in cases {
        check_container_drop(&h, what, dev, &frame, reason);
    }
}

// ---------------------------------------------------------------------------------------------
// From the container: local delivery and what is refused.
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Names answered in the datapath (DNS to the gateway, port 53; overlay-ebpf/src/dns.rs).
// ---------------------------------------------------------------------------------------------

/// Blue's gateway as the endpoint a container's query is sent to.
const BLUE_RESOLVER: Ep = Ep { ip: BLUE_GATEWAY, mac: BLUE_GATEWAY_MAC };
const RED_GATEWAY: Ip = [10, 2, 0, 254];
const RED_RESOLVER: Ep = Ep { ip: RED_GATEWAY, mac: [0x02, 0x00, 0x00, 0x00, 0x02, 0xfe] };
/// The source port of the queries.
const CLIENT_PORT: u16 = 41000;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_MX: u16 = 15;
const CLASS_IN: u16 = 1;
/// The flags of a query with recursion desired, as every stub resolver sends it.
const QUERY_RD: u16 = 0x0100;

/// Puts `name` -> `ips` on network `vni` into NAMES.
fn put_name(h: &mut Host, vni: u32, name: &str, ips: &[Ip]) {
    let mut addrs = [[0; 4]; NAME_ADDRS];
    addrs[..ips.len()].copy_from_slice(ips);
    let value = NameAddrs { count: ips.len() as u32, addrs };
    h.dp.maps.names.insert(name_key(vni, name).expect("a valid name"), value, 0).expect("NAMES");
}

/// Names in the map: web (R) and api (R, S, B) on blue; web on red is Q.
fn add_names(h: &mut Host) {
    put_name(h, BLUE, "web", &[R.ip]);
    put_name(h, BLUE, "api", API);
    put_name(h, RED, "web", &[Q.ip]);
}
const API: &[Ip] = &[R.ip, S.ip, B.ip];

/// A question name in wire format, built label by label (not with the datapath's code).
fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A DNS message: header with these counts, then `body` (the question and whatever follows).
fn dns_message(id: u16, flags: u16, counts: [u16; 4], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        m.extend_from_slice(&c.to_be_bytes());
    }
    m.extend_from_slice(body);
    m
}

fn question(name: &[u8], qtype: u16) -> Vec<u8> {
    [name, &qtype.to_be_bytes(), &CLASS_IN.to_be_bytes()].concat()
}

/// An EDNS(0) OPT record (RFC 6891): root name, type 41, 4096-byte payload, no options.
const OPT: [u8; 11] = [0, 0, 41, 0x10, 0x00, 0, 0, 0, 0, 0, 0];

/// `from` sends the DNS message `msg` to `to`, port 53.
fn dns_frame(from: Ep, to: Ep, msg: &[u8]) -> Vec<u8> {
    ip_frame(from, to, Ipv4::new(from.ip, to.ip, IPPROTO_UDP), &udp(from.ip, to.ip, CLIENT_PORT, 53, msg))
}

/// A plain query of `name` for `qtype` from `from` to its gateway `to`.
fn dns_query(from: Ep, to: Ep, id: u16, name: &str, qtype: u16) -> Vec<u8> {
    dns_frame(from, to, &dns_message(id, QUERY_RD, [1, 0, 0, 0], &question(&wire_name(name), qtype)))
}

/// The answer RFC 1035 calls for, from the gateway `gw` to `client`: the query's ID, QR, AA, RD
/// and RA, the question as it was asked, an A record per address with a pointer to the question
/// (offset 12) and TTL 0; IPv4 ID 0, DF, TTL 64; UDP checksum over the whole datagram.
fn dns_answer(gw: Ep, client: Ep, id: u16, question: &[u8], addrs: &[Ip]) -> Vec<u8> {
    let mut body = question.to_vec();
    for addr in addrs {
        body.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
        body.extend_from_slice(addr);
    }
    let msg = dns_message(id, 0x8000 | 0x0400 | QUERY_RD | 0x0080, [1, addrs.len() as u16, 0, 0], &body);
    let ip = Ipv4 { id: 0, ..Ipv4::new(gw.ip, client.ip, IPPROTO_UDP) };
    ip_frame(gw, client, ip, &udp(gw.ip, client.ip, 53, CLIENT_PORT, &msg))
}

#[test]
fn dns_a_queries_are_answered_from_the_map_byte_for_byte() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkdnsa");
    add_names(&mut h);
    // Asked in mixed case (as resolvers using 0x20 randomisation do): found, and the question
    // echoed exactly as it was asked.
    for (what, asked) in [("lower case", "web"), ("mixed case", "WeB")] {
        let query = dns_query(A, BLUE_RESOLVER, 0x1234, asked, TYPE_A);
        let (out, counts) = h.counting(|h| h.from_container("veth-a", &query));
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what}");
        let expected = dns_answer(BLUE_RESOLVER, A, 0x1234, &question(&wire_name(asked), TYPE_A), &[R.ip]);
        assert_eq!(out.frame, expected, "{what}");
        assert_eq!(counts, one_each(&[(DNS_ANSWER, expected.len())]), "{what}");
    }
    // An odd-length name moves the records to odd offsets of the datagram: the checksum still
    // holds (the expected frame carries its own).
    put_name(&mut h, BLUE, "db.blue", &[S.ip]);
    assert_eq!(wire_name("db.blue").len() % 2, 1);
    let query = dns_query(A, BLUE_RESOLVER, 7, "db.blue", TYPE_A);
    let (out, counts) = h.counting(|h| h.from_container("veth-a", &query));
    let expected = dns_answer(BLUE_RESOLVER, A, 7, &question(&wire_name("db.blue"), TYPE_A), &[S.ip]);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_REDIRECT, &expected));
    assert_eq!(counts, one_each(&[(DNS_ANSWER, expected.len())]));
}

#[test]
fn dns_aaaa_for_a_known_name_is_noerror_without_answers_and_edns_is_dropped_from_the_answer() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkdnsaaaa");
    add_names(&mut h);
    let query = dns_query(A, BLUE_RESOLVER, 0xbeef, "web", TYPE_AAAA);
    let (out, counts) = h.counting(|h| h.from_container("veth-a", &query));
    let expected = dns_answer(BLUE_RESOLVER, A, 0xbeef, &question(&wire_name("web"), TYPE_AAAA), &[]);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_REDIRECT, &expected));
    assert_eq!(counts, one_each(&[(DNS_ANSWER, expected.len())]));

    // With an EDNS OPT record (what dig and systemd-resolved send): answered, the OPT left out
    // (ARCOUNT 0, the frame shorter than the query's by the records' balance).
    let asked = question(&wire_name("web"), TYPE_A);
    let query = dns_frame(
        A,
        BLUE_RESOLVER,
        &dns_message(0x4242, QUERY_RD, [1, 0, 0, 1], &[&asked[..], &OPT].concat()),
    );
    let (out, counts) = h.counting(|h| h.from_container("veth-a", &query));
    let expected = dns_answer(BLUE_RESOLVER, A, 0x4242, &asked, &[R.ip]);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_REDIRECT, &expected));
    assert_eq!(counts, one_each(&[(DNS_ANSWER, expected.len())]));
}

#[test]
fn dns_a_name_with_several_addresses_gets_all_of_them_in_rotating_order() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkdnsrot");
    add_names(&mut h);
    let all = API;
    let query = dns_query(A, BLUE_RESOLVER, 99, "api", TYPE_A);
    let asked = question(&wire_name("api"), TYPE_A);
    let rotations: Vec<Vec<u8>> = (0..all.len())
        .map(|k| {
            let rotated: Vec<Ip> = all.iter().cycle().skip(k).take(all.len()).copied().collect();
            dns_answer(BLUE_RESOLVER, A, 99, &asked, &rotated)
        })
        .collect();
    let mut starts = BTreeSet::new();
    for _ in 0..64 {
        let (out, counts) = h.counting(|h| h.from_container("veth-a", &query));
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let k = rotations
            .iter()
            .position(|r| *r == out.frame)
            .unwrap_or_else(|| panic!("not all three addresses in rotating order: {:02x?}", out.frame));
        assert_eq!(counts, one_each(&[(DNS_ANSWER, out.frame.len())]));
        starts.insert(k);
    }
    // 64 answers from random starts: missing one of 3 by chance is below 1e-11.
    assert_eq!(starts.len(), all.len(), "every address comes first sometimes");
}

#[test]
fn dns_queries_the_map_cannot_answer_go_on_unchanged() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkdnspass");
    add_names(&mut h);
    let long = ["a".repeat(40), "b".repeat(40)].join(".");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a name not in the map", dns_query(A, BLUE_RESOLVER, 1, "nobody", TYPE_A)),
        ("another type", dns_query(A, BLUE_RESOLVER, 1, "web", TYPE_MX)),
        ("a valid name longer than the map's", dns_query(A, BLUE_RESOLVER, 1, &long, TYPE_A)),
        (
            "another class (CHAOS)",
            dns_frame(
                A,
                BLUE_RESOLVER,
                &dns_message(1, 0, [1, 0, 0, 0], &[&wire_name("web")[..], &[0, 1, 0, 3]].concat()),
            ),
        ),
        (
            "another opcode (NOTIFY)",
            dns_frame(
                A,
                BLUE_RESOLVER,
                &dns_message(1, 4 << 11, [1, 0, 0, 0], &question(&wire_name("web"), TYPE_A)),
            ),
        ),
        (
            "two additional records (OPT and TSIG)",
            dns_frame(
                A,
                BLUE_RESOLVER,
                &dns_message(
                    1,
                    QUERY_RD,
                    [1, 0, 0, 2],
                    &[&question(&wire_name("web"), TYPE_A)[..], &OPT, &OPT].concat(),
                ),
            ),
        ),
        // Port 53 of another address than the gateway is ordinary traffic.
        ("to a container's port 53", dns_query(A, B, 1, "web", TYPE_A)),
    ];
    for (what, frame) in cases {
        let (out, counts) = h.counting(|h| h.from_container("veth-a", &frame));
        assert_eq!(out.frame, frame, "unchanged: {what}");
        if what == "to a container's port 53" {
            assert_eq!(
                (out.verdict, counts),
                (TC_ACT_REDIRECT, one_each(&[(TX_LOCAL, frame.len())])),
                "{what}"
            );
        } else {
            // No resolver serves the network on this host (its flag is off): the gateway is no
            // endpoint, and the host's stack would route the query on, not answer it.
            assert_eq!(out.verdict, TC_ACT_SHOT, "{what}");
            assert_eq!(counts, one_each(&[(DropReason::NoEndpoint.code(), frame.len())]), "{what}");
        }
    }
}

#[test]
fn dns_the_map_cannot_answer_goes_up_to_the_resolver_where_it_serves_the_network() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkdnsres");
    add_names(&mut h);
    let tcp_query = ip_frame(
        A,
        BLUE_RESOLVER,
        Ipv4::new(A.ip, BLUE_GATEWAY, IPPROTO_TCP),
        &tcp(A.ip, BLUE_GATEWAY, 43210, 53, &[0, 12]),
    );
    let unknown = dns_query(A, BLUE_RESOLVER, 1, "nobody", TYPE_A);
    // Without the flag: dropped, as anything for the gateway.
    for frame in [&unknown, &tcp_query] {
        let (out, counts) = h.counting(|h| h.from_container("veth-a", frame));
        assert_eq!(
            (out.verdict, counts),
            (TC_ACT_SHOT, one_each(&[(DropReason::NoEndpoint.code(), frame.len())]))
        );
    }
    let served = Network {
        gateway: BLUE_GATEWAY,
        gateway_mac: BLUE_GATEWAY_MAC,
        flags: NETWORK_RESOLVER,
        prefix_len: 0,
    };
    h.dp.maps.networks.insert(BLUE, served, 0).expect("NETWORKS");
    // With it: up the stack unchanged (TC_ACT_OK), counted, for UDP the map cannot answer and
    // for any DNS over TCP.
    for (what, frame) in [("UDP", &unknown), ("TCP", &tcp_query)] {
        let (out, counts) = h.counting(|h| h.from_container("veth-a", frame));
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, frame), "{what}");
        assert_eq!(counts, one_each(&[(TO_RESOLVER, frame.len())]), "{what}");
    }
    // What the map answers is still answered in the program.
    let known = dns_query(A, BLUE_RESOLVER, 2, "web", TYPE_A);
    let (out, counts) = h.counting(|h| h.from_container("veth-a", &known));
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), ["dns_answer"]);
    // Other traffic to the gateway is still no endpoint's: only port 53 goes up.
    let other = udp_frame(A, BLUE_RESOLVER, 54, 10);
    let (out, counts) = h.counting(|h| h.from_container("veth-a", &other));
    assert_eq!(
        (out.verdict, counts),
        (TC_ACT_SHOT, one_each(&[(DropReason::NoEndpoint.code(), other.len())]))
    );
}

#[test]
fn dns_names_are_per_network() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkdnsnet");
    add_names(&mut h);
    let red = Network { gateway: RED_GATEWAY, gateway_mac: RED_RESOLVER.mac, flags: 0, prefix_len: 0 };
    h.dp.maps.networks.insert(RED, red, 0).expect("NETWORKS");
    // X on red asks for web: red's web (Q), never blue's (R).
    let query = dns_query(X, RED_RESOLVER, 5, "web", TYPE_A);
    let (out, _) = h.counting(|h| h.from_container("veth-x", &query));
    let expected = dns_answer(RED_RESOLVER, X, 5, &question(&wire_name("web"), TYPE_A), &[Q.ip]);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_REDIRECT, &expected));
    // api is blue's only: no answer from the map for X.
    let query = dns_query(X, RED_RESOLVER, 6, "api", TYPE_A);
    let (out, counts) = h.counting(|h| h.from_container("veth-x", &query));
    assert_eq!((out.verdict, &out.frame), (TC_ACT_SHOT, &query));
    assert_eq!(counts, one_each(&[(DropReason::NoEndpoint.code(), query.len())]));
    // Nor may X ask blue's gateway: it is not on X's network.
    let query = dns_query(X, BLUE_RESOLVER, 7, "api", TYPE_A);
    let (out, counts) = h.counting(|h| h.from_container("veth-x", &query));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(counts, one_each(&[(DropReason::NoEndpoint.code(), query.len())]));
}

#[test]
fn malformed_dns_queries_are_dropped_with_their_reason() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkdnsbad");
    add_names(&mut h);
    let web_a = question(&wire_name("web"), TYPE_A);
    let msg = |flags: u16, counts: [u16; 4], body: &[u8]| {
        dns_frame(A, BLUE_RESOLVER, &dns_message(9, flags, counts, body))
    };
    let too_long: Vec<u8> = [&[63u8][..], &[b'x'; 63]].concat().repeat(4).into_iter().chain([0]).collect();
    assert_eq!(too_long.len(), 257);
    // A UDP length that claims more than the frame carries.
    let mut overlong = dns_query(A, BLUE_RESOLVER, 9, "web", TYPE_A);
    edit::<UdpHdr>(&mut overlong, EthHdr::LEN + Ipv4Hdr::LEN, |u| u.len = (u.len() + 10).to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        ("a header cut short", dns_frame(A, BLUE_RESOLVER, &[0x12, 0x34, 0x01]), DropReason::DnsTruncated),
        ("a name cut short", msg(QUERY_RD, [1, 0, 0, 0], &wire_name("web")[..3]), DropReason::DnsTruncated),
        ("no type and class", msg(QUERY_RD, [1, 0, 0, 0], &wire_name("web")), DropReason::DnsTruncated),
        // Caught before the DNS hook: a UDP header that does not describe its datagram is a
        // malformed packet (ipv4.rs), whatever port it is for.
        ("a UDP length beyond the frame", overlong, DropReason::Malformed),
        ("a response", msg(0x8180, [1, 0, 0, 0], &web_a), DropReason::DnsNotQuery),
        (
            "two questions",
            msg(QUERY_RD, [2, 0, 0, 0], &[&web_a[..], &web_a].concat()),
            DropReason::DnsBadCounts,
        ),
        ("no question", msg(QUERY_RD, [0, 0, 0, 0], &[]), DropReason::DnsBadCounts),
        ("an answer in a query", msg(QUERY_RD, [1, 1, 0, 0], &web_a), DropReason::DnsBadCounts),
        ("an authority record in a query", msg(QUERY_RD, [1, 0, 1, 0], &web_a), DropReason::DnsBadCounts),
        (
            "a 64-byte label",
            msg(QUERY_RD, [1, 0, 0, 0], &[&[64u8][..], &[b'x'; 64], &[0, 0, 1, 0, 1]].concat()),
            DropReason::DnsBadLabel,
        ),
        (
            "a reserved label type (0x40)",
            msg(QUERY_RD, [1, 0, 0, 0], &[0x41, b'x', 0, 0, 1, 0, 1]),
            DropReason::DnsBadLabel,
        ),
        (
            "a 64-byte label after the map's length",
            msg(
                QUERY_RD,
                [1, 0, 0, 0],
                &[&[60u8][..], &[b'x'; 60], &[64], &[b'y'; 64], &[0, 0, 1, 0, 1]].concat(),
            ),
            DropReason::DnsBadLabel,
        ),
        (
            "a compression pointer",
            msg(QUERY_RD, [1, 0, 0, 0], &[3, b'w', b'e', b'b', 0xc0, 0x0c, 0, 1, 0, 1]),
            DropReason::DnsCompression,
        ),
        (
            "a pointer to itself (a loop)",
            msg(QUERY_RD, [1, 0, 0, 0], &[0xc0, 0x0c, 0, 1, 0, 1]),
            DropReason::DnsCompression,
        ),
        (
            "a name over 255 bytes",
            msg(QUERY_RD, [1, 0, 0, 0], &[&too_long[..], &[0, 1, 0, 1]].concat()),
            DropReason::DnsNameTooLong,
        ),
    ];
    for (what, frame, reason) in cases {
        check_container_drop(&h, what, "veth-a", &frame, reason);
    }
}

#[test]
fn local_delivery_leaves_the_frame_unchanged() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pklocal");
    for (dev, frame) in [
        ("veth-a", udp_frame(A, B, 53, 100)),
        ("veth-a", tcp_frame(A, B, 1400)),
        ("veth-b", udp_frame(B, A, 53, 0)),
    ] {
        let (out, counts) = h.counting(|h| h.from_container(dev, &frame));
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(out.frame, frame, "a frame delivered on the host is not modified");
        assert_eq!(counts, one_each(&[(TX_LOCAL, frame.len())]));
    }
}

/// Checks that `frame` sent on `dev` is dropped for `reason` and nothing else is counted.
fn check_container_drop(h: &Host, what: &str, dev: &str, frame: &[u8], reason: DropReason) {
    let (out, counts) = h.counting(|h| h.from_container(dev, frame));
    assert_eq!(out.verdict, TC_ACT_SHOT, "verdict: {what}");
    assert_eq!(counts, one_each(&[(reason.code(), frame.len())]), "counters: {what}");
}

#[test]
fn from_container_drops_spoofed_sources() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkcspoof");
    let mut wrong_mac = udp_frame(A, R, 53, 20);
    wrong_mac[6..12].copy_from_slice(&B.mac);
    check_container_drop(&h, "B's MAC from A's veth", "veth-a", &wrong_mac, DropReason::Spoofed);
    let wrong_ip = ip_frame(A, R, Ipv4::new(B.ip, R.ip, IPPROTO_UDP), &udp(B.ip, R.ip, 1, 53, b"x"));
    check_container_drop(&h, "B's IPv4 from A's veth", "veth-a", &wrong_ip, DropReason::Spoofed);
    // Local destinations get the same check.
    let wrong_ip_local =
        ip_frame(A, B, Ipv4::new(NOBODY, B.ip, IPPROTO_UDP), &udp(NOBODY, B.ip, 1, 53, b"x"));
    check_container_drop(
        &h,
        "made-up IPv4 to a local endpoint",
        "veth-a",
        &wrong_ip_local,
        DropReason::Spoofed,
    );
    // A DHCP client (discover from 0.0.0.0 to the broadcast address, UDP 68 -> 67) is no spoof:
    // it is counted as what it is. 0.0.0.0 to anyone else, or not over UDP, is a spoof.
    const BCAST: Ep = Ep { ip: [255; 4], mac: [0xff; 6] };
    let discover = ip_frame(
        A,
        BCAST,
        Ipv4::new([0; 4], [255; 4], IPPROTO_UDP),
        &udp([0; 4], [255; 4], 68, 67, &[0; 240]),
    );
    check_container_drop(&h, "a DHCP discover", "veth-a", &discover, DropReason::Dhcp);
    let zero_to_r = ip_frame(A, R, Ipv4::new([0; 4], R.ip, IPPROTO_UDP), &udp([0; 4], R.ip, 68, 67, b"x"));
    check_container_drop(&h, "0.0.0.0 to R", "veth-a", &zero_to_r, DropReason::Spoofed);
}

#[test]
fn networks_are_isolated() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkiso");
    // Q exists, but on red: from blue it is not there, whatever its address looks like.
    check_container_drop(&h, "blue to red's Q", "veth-a", &udp_frame(A, Q, 53, 20), DropReason::NoEndpoint);
    // Nor is a local endpoint of another network.
    check_container_drop(
        &h,
        "blue to red's X (local)",
        "veth-a",
        &udp_frame(A, X, 53, 20),
        DropReason::NoEndpoint,
    );
    check_container_drop(&h, "red to blue's R", "veth-x", &udp_frame(X, R, 53, 20), DropReason::NoEndpoint);
    check_container_drop(
        &h,
        "red to blue's A (local)",
        "veth-x",
        &udp_frame(X, A, 53, 20),
        DropReason::NoEndpoint,
    );
}

#[test]
fn from_container_drops_unknown_destinations() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkunk");
    let frame = udp_frame(A, Ep { ip: NOBODY, mac: BLUE_GATEWAY_MAC }, 53, 20);
    check_container_drop(&h, "no endpoint has the address", "veth-a", &frame, DropReason::NoEndpoint);
    // The gateway answers ARP but is not an endpoint: traffic to it has nowhere to go. (Its
    // port 53 is the resolver's: the dns_ tests.)
    let frame = udp_frame(A, Ep { ip: BLUE_GATEWAY, mac: BLUE_GATEWAY_MAC }, 80, 20);
    check_container_drop(&h, "the gateway's own address", "veth-a", &frame, DropReason::NoEndpoint);
}

#[test]
fn from_container_drops_unsupported_and_malformed_frames() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkmal");
    let v6 = ethernet(R.mac, A.mac, ETH_P_IPV6, &ipv6_udp(1, 2, b"v6"));
    check_container_drop(&h, "IPv6", "veth-a", &v6, DropReason::Unsupported);
    let vlan = ethernet(R.mac, A.mac, 0x8100, &[0, 5, 0x08, 0x00, 0x45, 0, 0, 20]);
    check_container_drop(&h, "802.1Q tagged", "veth-a", &vlan, DropReason::Unsupported);

    // test_run refuses IPv4 frames shorter than 14 + 20 bytes before the program runs (EINVAL);
    // truncated_ipv4_from_a_container_is_malformed sends one through a live veth instead.
    let full = udp_frame(A, R, 53, 20);
    let mut short_ihl = full.clone();
    short_ihl[EthHdr::LEN] = 0x44;
    check_container_drop(&h, "IHL 4 (16-byte header)", "veth-a", &short_ihl, DropReason::Malformed);
    let mut not_v4 = full.clone();
    not_v4[EthHdr::LEN] = 0x65;
    check_container_drop(&h, "IPv4 ethertype, version 6", "veth-a", &not_v4, DropReason::Malformed);
}

#[test]
fn frames_on_unregistered_veths_are_dropped() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkstray");
    // A veth the agent has not registered (being set up or torn down): nobody vouches for it,
    // even if it sends in A's name.
    check_container_drop(
        &h,
        "A's frame on a stray veth",
        "stray",
        &udp_frame(A, R, 53, 20),
        DropReason::UnknownIface,
    );
    let arp = arp_frame(A.mac, ARP_OP_REQUEST, A.mac, A.ip, R.ip);
    check_container_drop(&h, "A's ARP on a stray veth", "stray", &arp, DropReason::UnknownIface);
}

// ---------------------------------------------------------------------------------------------
// Real frames on attached programs, for what test_run cannot show.
// ---------------------------------------------------------------------------------------------

/// Waits until `code` has counted a packet (a frame sent on a veth is processed asynchronously,
/// in the receive softirq).
fn wait_counted(h: &Host, code: u32) {
    let seen = wait_for(Duration::from_secs(5), || (h.stats()[code as usize].packets > 0).then_some(()));
    assert!(seen.is_some(), "{} never counted", stats::name(code).unwrap_or("?"));
}

#[test]
fn truncated_ipv4_from_a_container_is_malformed() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pktr4");
    // test_run refuses an IPv4 frame shorter than an IPv4 header, but a container can send one:
    // inject it into the container's end of A's veth, with from_container attached as the agent
    // attaches it.
    h.bring_up(&["veth-a", "veth-a-p"]);
    h.attach_tc(PROG_FROM_CONTAINER, "veth-a");
    let frame = udp_frame(A, R, 53, 20)[..EthHdr::LEN + 10].to_vec();
    let ((), counts) = h.counting(|h| {
        PacketSocket::open("veth-a-p").send(&frame);
        wait_counted(h, DropReason::Malformed.code());
    });
    assert_eq!(counts, one_each(&[(DropReason::Malformed.code(), frame.len())]));
}

#[test]
fn xdp_hands_decapsulated_frames_to_tc_which_delivers_them() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkhand");
    // A's container: its end of the veth in a namespace of its own, as the agent sets it up
    // (bpf_redirect_peer only delivers into another namespace).
    let ctr = h.run.ns("ctr-a");
    sh(Command::new("ip").args(["netns", "add", &ctr]));
    sh(&mut in_ns(
        &ctr,
        &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
    ));
    sh(Command::new("ip").args(["link", "set", "veth-a-p", "netns", &ctr]));
    sh(Command::new("ip").args(["-n", &ctr, "link", "set", "veth-a-p", "up"]));
    h.bring_up(&["veth-a", "uplink", "uplink-p"]);
    h.attach_tc(PROG_UPLINK_TC, "uplink");
    let container = {
        let _in_ctr =
            NetnsGuard::enter_path(&Path::new("/run/netns").join(&ctr)).expect("entering the container");
        PacketSocket::open("veth-a-p")
    };

    let inner = udp_frame(R, A, 7000, 300);
    let frame = vxlan(&from_peer2(BLUE), &inner);
    let ((), counts) = h.counting(|h| h.uplink_xdp_live(&frame));
    // XDP decapsulated it; TC found the endpoint in the metadata and delivered it without
    // classifying or decapsulating it a second time.
    assert_eq!(counts, one_each(&[(RX_DECAP, inner.len()), (RX_DELIVER, inner.len())]));
    let (got, pkt_type) = container.recv().expect("nothing arrived in the container");
    assert_eq!(got, inner, "the container receives the inner frame");
    // Addressed to the container's MAC, not the uplink's: without PACKET_HOST the container's
    // IP layer would discard it.
    assert_eq!(pkt_type, PACKET_HOST);

    // A frame that is not ours: XDP counts it passed, and TC, finding XDP's verdict in the
    // metadata, passes it without counting it a second time.
    let (what, other) = not_ours().into_iter().next().expect("a frame");
    let ((), counts) = h.counting(|h| h.uplink_xdp_live(&other));
    assert_eq!(counts, one_each(&[(UPLINK_PASS, other.len())]), "{what}");
}

#[test]
fn an_address_outside_the_overlay_goes_up_the_stack_where_the_network_has_a_way_out() {
    if skip_unless_privileged() {
        return;
    }
    let mut h = Host::new("pkegress");
    // Blue is 10.1.0.0/16 (its gateway 10.1.0.254); red's subnet is another network's.
    let blue =
        |flags| Network { gateway: BLUE_GATEWAY, gateway_mac: BLUE_GATEWAY_MAC, flags, prefix_len: 16 };
    h.dp.maps.networks.insert(BLUE, blue(0), 0).expect("NETWORKS");
    let red_net = aya::maps::lpm_trie::Key::new(16, [10, 2, 0, 0]);
    h.dp.maps.subnets.insert(&red_net, RED, 0).expect("SUBNETS");
    let world = Ep { ip: [93, 184, 216, 34], mac: BLUE_GATEWAY_MAC };
    let out = udp_frame(A, world, 443, 40);
    let drop = |h: &Host, frame: &[u8], reason: DropReason| {
        let (got, counts) = h.counting(|h| h.from_container("veth-a", frame));
        assert_eq!(
            (got.verdict, counts),
            (TC_ACT_SHOT, one_each(&[(reason.code(), frame.len())])),
            "{reason:?}"
        );
    };
    // No way out (internal, or not yet set up here): dropped and counted as such.
    drop(&h, &out, DropReason::NoEgress);
    h.dp.maps.networks.insert(BLUE, blue(NETWORK_EGRESS), 0).expect("NETWORKS");
    // With it: up the host's stack unchanged, counted.
    let (got, counts) = h.counting(|h| h.from_container("veth-a", &out));
    assert_eq!((got.verdict, &got.frame), (TC_ACT_OK, &out));
    assert_eq!(counts, one_each(&[(TO_HOST, out.len())]));
    // What stays on the overlay never leaves by the host: an unknown address of the network,
    // another network's address, broadcast, multicast, loopback.
    for ip in [[10, 1, 9, 9], [10, 2, 0, 7], [255, 255, 255, 255], [224, 0, 0, 251], [127, 0, 0, 1]] {
        drop(&h, &udp_frame(A, Ep { ip, mac: BLUE_GATEWAY_MAC }, 443, 40), DropReason::NoEndpoint);
    }
    // The overlay's own path is unchanged: a known endpoint is still delivered or encapsulated.
    let (got, _) = h.counting(|h| h.from_container("veth-a", &udp_frame(A, R, 443, 40)));
    assert_eq!(got.verdict, TC_ACT_REDIRECT);
}

// ---------------------------------------------------------------------------------------------
// The monitor's ring buffer (overlay-agent monitor).
// ---------------------------------------------------------------------------------------------

/// Every event the ring buffer holds now.
fn events(session: &mut Session) -> Vec<Record> {
    let mut out = Vec::new();
    while let Some(item) = session.ring.next() {
        out.push(Record::from_bytes(&item).expect("an event"));
    }
    out
}

/// A session on the test host's pins, listening for `flags`.
fn listen(h: &Host, flags: u32) -> Session {
    Session::open(&PinDir::new(h.run.pin_root().join("h")), flags).expect("starting a monitor session")
}

#[expect(clippy::unnecessary_wraps, reason = "compared with the events' optional addresses")]
fn ip(a: Ip) -> Option<std::net::Ipv4Addr> {
    Some(a.into())
}

#[test]
fn monitor_reports_each_drop_with_its_fields_while_it_listens() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkmon");
    let pins = PinDir::new(h.run.pin_root().join("h"));
    let to_nobody = udp_frame(A, Ep { ip: NOBODY, mac: B.mac }, 53, 40);
    let spoofed = udp_frame(Ep { ip: B.ip, mac: A.mac }, R, 7000, 40);
    let unknown_vni = vxlan(&from_peer2(0x00_99_99), &tcp_frame(R, A, 10));
    let unknown_peer = vxlan(&Tunnel { src_vtep: STRANGER, ..from_peer2(BLUE) }, &udp_frame(R, A, 7000, 64));

    // Nobody listens: the drop is counted and nothing is written.
    let mut session = listen(&h, MONITOR_DROPS);
    drop(session);
    assert_eq!(h.from_container("veth-a", &to_nobody).verdict, TC_ACT_SHOT);
    session = listen(&h, MONITOR_DROPS);
    assert_eq!(events(&mut session), Vec::new(), "events written while nobody listened");

    assert_eq!(h.from_container("veth-a", &to_nobody).verdict, TC_ACT_SHOT);
    assert_eq!(h.from_container("veth-a", &spoofed).verdict, TC_ACT_SHOT);
    assert_eq!(h.uplink_xdp(&unknown_vni).verdict, XDP_DROP);
    assert_eq!(h.uplink_tc(&unknown_peer).verdict, TC_ACT_SHOT);
    // A forwarded packet is no drop, and flows were not asked for.
    assert_eq!(h.from_container("veth-a", &udp_frame(A, B, 7000, 40)).verdict, TC_ACT_REDIRECT);
    let got = events(&mut session);
    assert_eq!(got.len(), 4, "{got:#?}");

    let e = &got[0];
    assert_eq!((e.event, e.reason, e.hook), ("drop", "no_endpoint", "from_container"));
    assert_eq!((e.ifindex, e.vni, e.len), (h.ifindex["veth-a"], Some(BLUE), to_nobody.len() as u32));
    assert_eq!((e.proto.as_deref(), e.src, e.dst), (Some("udp"), ip(A.ip), ip(NOBODY)));
    assert_eq!((e.sport, e.dport), (Some(40000), Some(53)));

    let e = &got[1];
    assert_eq!((e.reason, e.vni, e.src, e.dst), ("spoofed_source", Some(BLUE), ip(B.ip), ip(R.ip)));

    let e = &got[2];
    assert_eq!((e.reason, e.hook, e.vni), ("unknown_vni", "uplink_xdp", Some(0x00_99_99)));
    assert_eq!((e.outer_src, e.outer_dst), (ip(PEER2), ip(VTEP)));
    assert_eq!((e.proto.as_deref(), e.src, e.dst, e.dport), (Some("tcp"), ip(R.ip), ip(A.ip), Some(80)));
    assert_eq!(e.len, unknown_vni.len() as u32);

    let e = &got[3];
    assert_eq!(
        (e.reason, e.hook, e.ifindex, e.vni),
        ("unknown_peer", "uplink_tc", h.ifindex["uplink"], Some(BLUE))
    );
    assert_eq!((e.outer_src, e.src, e.dst), (ip(STRANGER), ip(R.ip), ip(A.ip)));

    // One monitor at a time.
    let second = Session::open(&pins, MONITOR_DROPS).err().expect("a second monitor was let in");
    assert!(second.to_string().contains("another monitor"), "{second:#}");

    // A monitor killed without clearing the flags: once its expiry passed, nothing is written.
    let mut control = Control::open(&pins).expect("MONITOR_CTL");
    let ctl = control.get().expect("reading MONITOR_CTL");
    assert_eq!(ctl.flags, MONITOR_DROPS);
    control.set(MonitorCtl { expires_ns: monotonic_ns() - 1, ..ctl }).expect("writing MONITOR_CTL");
    assert_eq!(h.from_container("veth-a", &to_nobody).verdict, TC_ACT_SHOT);
    assert_eq!(events(&mut session), Vec::new(), "events written after the monitor's expiry");
    assert_eq!(control.holder().expect("holder"), None, "an expired monitor still holds the host");

    // Ended: the flags are cleared.
    drop(session);
    assert_eq!(control.get().expect("reading MONITOR_CTL").flags, 0);
}

#[test]
fn monitor_reports_the_first_packet_of_each_flow_once_per_session() {
    if skip_unless_privileged() {
        return;
    }
    let h = Host::new("pkmonf");
    let local = udp_frame(A, B, 7000, 40);
    let remote = tcp_frame(A, R, 10);
    let mut session = listen(&h, MONITOR_DROPS | MONITOR_FLOWS);
    for _ in 0..3 {
        assert_eq!(h.from_container("veth-a", &local).verdict, TC_ACT_REDIRECT);
        assert_eq!(h.from_container("veth-a", &remote).verdict, TC_ACT_REDIRECT);
    }
    // Another flow: another source port.
    let other =
        ip_frame(A, B, Ipv4::new(A.ip, B.ip, IPPROTO_UDP), &udp(A.ip, B.ip, 40001, 7000, &payload(40)));
    assert_eq!(h.from_container("veth-a", &other).verdict, TC_ACT_REDIRECT);
    // Received from PEER2, delivered to A.
    assert_eq!(h.uplink_tc(&valid_vxlan()).verdict, TC_ACT_REDIRECT);
    let got = events(&mut session);
    let seen: Vec<_> =
        got.iter().map(|e| (e.event, e.reason, e.hook, e.vni, e.src, e.dst, e.sport, e.dport)).collect();
    assert_eq!(
        seen,
        vec![
            ("flow", "tx_local", "from_container", Some(BLUE), ip(A.ip), ip(B.ip), Some(40000), Some(7000)),
            ("flow", "tx_encap", "from_container", Some(BLUE), ip(A.ip), ip(R.ip), Some(43210), Some(80)),
            ("flow", "tx_local", "from_container", Some(BLUE), ip(A.ip), ip(B.ip), Some(40001), Some(7000)),
            // The decapsulated frame; its network from the veth it is delivered to.
            ("flow", "rx_deliver", "uplink_tc", Some(BLUE), ip(R.ip), ip(A.ip), Some(40000), Some(7000)),
        ],
        "{got:#?}"
    );
    // Seen in the last session, new to the next.
    drop(session);
    let mut session = listen(&h, MONITOR_DROPS | MONITOR_FLOWS);
    assert_eq!(h.from_container("veth-a", &local).verdict, TC_ACT_REDIRECT);
    assert_eq!(events(&mut session).len(), 1, "a flow of the last session was not new to this one");
    // Drops only: no flows.
    drop(session);
    let mut session = listen(&h, MONITOR_DROPS);
    assert_eq!(h.from_container("veth-a", &remote.clone()).verdict, TC_ACT_REDIRECT);
    assert_eq!(h.from_container("veth-a", &udp_frame(A, S, 9, 40)).verdict, TC_ACT_REDIRECT);
    assert_eq!(events(&mut session), Vec::new(), "flows written while only drops were asked for");
}
