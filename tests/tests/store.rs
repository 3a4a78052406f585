//! The store against a real etcd (one per test, on free ports, data in a temporary directory):
//! network and container operations, every refusal (and that a refusal writes nothing), IPAM
//! under concurrency, leases, the etcd source's snapshot/watch/resume/re-list, and the CLI.
//! Needs the etcd binary but not root; without etcd every test says "skipping: ..." and returns.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use overlay_agent::{
    model::{Container, Host, Object, ObjectRef, State, Update},
    source::{EtcdSource, HostRegistration, Lifetimes, Report, Source as _},
    store::{ContainerSpec, NetworkSpec, Store, StoreConfig, StoreError},
};
use overlay_tests::etcd::{Etcd, EtcdOptions, EtcdTls};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::AbortHandle,
    time::{Instant, timeout},
};

type Dump = BTreeMap<String, (String, i64)>;

async fn store(url: &str) -> Store {
    Store::connect(&StoreConfig::new([url])).await.expect("connect")
}

fn host(name: &str, last: u8) -> Host {
    Host { uplink_mtu: Some(1500), ..Host::new(name, Ipv4Addr::new(198, 18, 0, last)) }
}

async fn register(store: &Store, name: &str, last: u8, ttl: Duration) -> HostRegistration {
    HostRegistration::register(
        store.clone(),
        host(name, last),
        Lifetimes { ttl, grace: Duration::from_hours(1) },
    )
    .await
    .expect("register")
}

fn net(name: &str, subnet: &str) -> NetworkSpec {
    NetworkSpec { name: name.into(), subnet: Some(subnet.into()), ..Default::default() }
}

fn ctr(name: &str, host: &str, network: Option<&str>) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        host: host.into(),
        network: network.map(Into::into),
        ..Default::default()
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Asserts a refusal with exactly `message`, and that etcd holds exactly what it held before.
async fn refused<T: Debug>(store: &Store, before: &Dump, result: Result<T, StoreError>, message: &str) {
    let err = result.expect_err(&format!("expected the refusal {message:?}"));
    assert_eq!(err.to_string(), message);
    assert_eq!(&store.dump().await.unwrap(), before, "the refusal {message:?} changed etcd");
}

async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
    timeout(Duration::from_secs(20), rx.recv()).await.expect("an update in time").expect("source running")
}

async fn quiet(rx: &mut mpsc::Receiver<Update>, for_: Duration) {
    if let Ok(Some(u)) = timeout(for_, rx.recv()).await {
        panic!("unexpected update {u:?}");
    }
}

fn put_network(u: &Update) -> &str {
    match u {
        Update::Put(Object::Network(n)) => &n.name,
        other => panic!("expected Put(Network), got {other:?}"),
    }
}

/// Runs an `EtcdSource` the way the agent does; returns its updates and its status channel.
fn source(
    store: &Store,
    host: &str,
    reg: Option<&HostRegistration>,
) -> (mpsc::Receiver<Update>, mpsc::Sender<Report>) {
    let (tx, rx) = mpsc::channel(1024);
    let (stx, srx) = mpsc::channel(1024);
    let lease =
        reg.map_or_else(|| tokio::sync::watch::channel(0).1, overlay_agent::source::HostRegistration::leases);
    tokio::spawn(EtcdSource::new(store.clone(), host, lease).run(tx, srx));
    (rx, stx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_create_inspect_remove() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    let blue = s
        .create_network(&NetworkSpec {
            aux_addresses: vec!["printer=10.0.9.5".into()],
            labels: vec!["team=red".into(), "flag".into()],
            options: vec!["mtu=1400".into()],
            ip_range: Some("10.0.9.128/25".into()),
            ..net("blue", "10.0.9.0/24")
        })
        .await
        .unwrap();
    assert_eq!(blue.id.len(), 64);
    assert!(blue.id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(blue.driver, "overlay");
    assert_eq!(blue.vni, 4096);
    assert_eq!(blue.gateway, ip("10.0.9.1"));
    assert_eq!(blue.ip_range, Some("10.0.9.128/25".parse().unwrap()));
    assert_eq!(blue.aux_addresses["printer"], ip("10.0.9.5"));
    assert_eq!(blue.mtu, Some(1400));
    assert_eq!(blue.options["com.docker.network.driver.mtu"], "1400");
    assert_eq!(blue.labels["team"], "red");
    assert_eq!(blue.labels["flag"], "");
    assert!(blue.created.starts_with("20") && blue.created.ends_with('Z'), "RFC 3339: {}", blue.created);

    // No subnet: the first free /24 of 10.0.0.0/8; the next VNI; a VNI of one's own.
    let red = s.create_network(&NetworkSpec { name: "red".into(), ..Default::default() }).await.unwrap();
    assert_eq!(red.subnet, "10.0.0.0/24".parse().unwrap());
    assert_eq!(red.gateway, ip("10.0.0.1"));
    assert_eq!(red.vni, 4097);
    let green = s
        .create_network(&NetworkSpec { options: vec!["vni=42".into()], ..net("green", "192.168.7.0/24") })
        .await
        .unwrap();
    assert_eq!(green.vni, 42);

    assert_eq!(s.network("blue").await.unwrap(), blue);
    assert_eq!(s.network(&blue.id).await.unwrap(), blue);
    assert_eq!(s.network(&blue.id[..12]).await.unwrap(), blue, "a unique id prefix finds it");
    let names: Vec<_> = s.networks().await.unwrap().into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["blue", "green", "red"]);

    let dump = s.dump().await.unwrap();
    assert_eq!(dump["/overlay/v1/network-names/blue"].0, blue.id);
    assert_eq!(dump["/overlay/v1/vnis/4096"].0, blue.id);

    assert_eq!(s.remove_network("blue").await.unwrap().id, blue.id);
    assert!(matches!(s.network("blue").await, Err(StoreError::NetworkNotFound(_))));
    // Its name and VNI are free again.
    let again = s.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    assert_eq!(again.vni, 4096);
    for n in ["blue", "red", "green"] {
        s.remove_network(n).await.unwrap();
    }
    assert_eq!(s.dump().await.unwrap(), Dump::new(), "nothing is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_and_write_nothing() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    let _h1 = register(&s, "h1", 1, Duration::from_secs(30)).await;
    s.create_network(&NetworkSpec {
        aux_addresses: vec!["printer=10.0.9.5".into()],
        ..net("blue", "10.0.9.0/24")
    })
    .await
    .unwrap();
    s.create_network(&net("tiny", "10.0.20.0/30")).await.unwrap();
    s.create_container(&ctr("c1", "h1", Some("blue"))).await.unwrap();
    s.create_container(&ctr("c2", "h1", None)).await.unwrap();
    assert_eq!(s.network_connect("tiny", "c1", None).await.unwrap().ipv4, ip("10.0.20.2"));
    let before = s.dump().await.unwrap();

    let create = |spec: NetworkSpec| {
        let s = s.clone();
        async move { s.create_network(&spec).await }
    };
    refused(
        &s,
        &before,
        create(net("x", "10.0.300.0/24")).await,
        "invalid subnet \"10.0.300.0/24\": expected an IPv4 CIDR such as 10.0.9.0/24",
    )
    .await;
    refused(
        &s,
        &before,
        create(net("x", "10.1.0.0")).await,
        "invalid subnet \"10.1.0.0\": expected an IPv4 CIDR such as 10.0.9.0/24",
    )
    .await;
    refused(
        &s,
        &before,
        create(net("x", "10.1.0.1/24")).await,
        "invalid subnet 10.1.0.1/24: it has host bits set (did you mean 10.1.0.0/24?)",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec { gateway: Some("10.2.1.1".into()), ..net("x", "10.2.0.0/24") }).await,
        "gateway 10.2.1.1 is outside subnet 10.2.0.0/24",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec { ip_range: Some("10.2.1.0/25".into()), ..net("x", "10.2.0.0/24") }).await,
        "ip-range 10.2.1.0/25 is outside subnet 10.2.0.0/24",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec { ip_range: Some("10.2.0.0/33".into()), ..net("x", "10.2.0.0/24") }).await,
        "invalid ip-range \"10.2.0.0/33\": expected an IPv4 CIDR such as 10.0.9.0/24",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec { aux_addresses: vec!["printer=10.3.0.5".into()], ..net("x", "10.2.0.0/24") })
            .await,
        "auxiliary address printer=10.3.0.5 is outside subnet 10.2.0.0/24",
    )
    .await;
    refused(
        &s,
        &before,
        create(net("x", "10.0.0.0/16")).await,
        "subnet 10.0.0.0/16 overlaps network \"blue\" (10.0.9.0/24)",
    )
    .await;
    refused(
        &s,
        &before,
        create(net("x", "10.0.9.64/26")).await,
        "subnet 10.0.9.64/26 overlaps network \"blue\" (10.0.9.0/24)",
    )
    .await;
    refused(
        &s,
        &before,
        create(net("blue", "10.9.0.0/24")).await,
        "network with name \"blue\" already exists",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec { options: vec!["vni=4096".into()], ..net("x", "10.9.0.0/24") }).await,
        "VNI 4096 is already used by network \"blue\"",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec { options: vec!["vni=16777215".into()], ..net("x", "10.9.0.0/24") }).await,
        "invalid option \"vni=16777215\": expected a number from 1 to 16777214",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec { options: vec!["mtu=abc".into()], ..net("x", "10.9.0.0/24") }).await,
        "invalid option \"mtu=abc\": expected a number from 68 to 65535",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec { options: vec!["secure=1".into()], ..net("x", "10.9.0.0/24") }).await,
        "invalid option \"secure\": unknown (known: mtu, vni, encrypted)",
    )
    .await;
    // `encrypted` takes no value; one that might mean "no" is refused rather than guessed.
    refused(
        &s,
        &before,
        create(NetworkSpec { options: vec!["encrypted=1".into()], ..net("x", "10.9.0.0/24") }).await,
        "invalid option \"encrypted=1\": encrypted takes no value (or true)",
    )
    .await;
    // Subnets whose addresses the kernel gives a meaning of their own, and a range left empty.
    for (subnet, message) in [
        (
            "0.0.0.0/8",
            "subnet 0.0.0.0/8 cannot be used: it overlaps 0.0.0.0/8, \"this network\" (RFC 1122), valid only as a source while a host has no address",
        ),
        (
            "127.0.0.0/16",
            "subnet 127.0.0.0/16 cannot be used: it overlaps 127.0.0.0/8, loopback (RFC 1122), whose packets never leave a host",
        ),
        (
            "169.254.1.0/24",
            "subnet 169.254.1.0/24 cannot be used: it overlaps 169.254.0.0/16, link-local (RFC 3927), which hosts assign themselves and routers never forward",
        ),
        (
            "224.0.0.0/24",
            "subnet 224.0.0.0/24 cannot be used: it overlaps 224.0.0.0/4, multicast (RFC 5771), which no interface may hold as its own address",
        ),
        (
            "240.0.0.0/4",
            "subnet 240.0.0.0/4 cannot be used: it overlaps 240.0.0.0/4, reserved (RFC 1112), with the limited broadcast 255.255.255.255; hosts drop it",
        ),
        (
            "255.255.255.255/32",
            "subnet 255.255.255.255/32 cannot be used: it overlaps 240.0.0.0/4, reserved (RFC 1112), with the limited broadcast 255.255.255.255; hosts drop it",
        ),
    ] {
        refused(&s, &before, create(net("x", subnet)).await, message).await;
    }
    refused(
        &s,
        &before,
        create(NetworkSpec {
            ip_range: Some("10.2.0.0/31".into()),
            aux_addresses: vec![],
            ..net("x", "10.2.0.0/24")
        })
        .await,
        "ip-range 10.2.0.0/31 has no usable address: each of its addresses is the network or broadcast address of subnet 10.2.0.0/24, its gateway or an auxiliary address",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec {
            ip_range: Some("10.2.0.8/31".into()),
            aux_addresses: vec!["a=10.2.0.8".into(), "b=10.2.0.9".into()],
            ..net("x", "10.2.0.0/24")
        })
        .await,
        "ip-range 10.2.0.8/31 has no usable address: each of its addresses is the network or broadcast address of subnet 10.2.0.0/24, its gateway or an auxiliary address",
    )
    .await;
    // A name that is (or could be) an id would make `network rm`/`inspect` ambiguous.
    let blue_id = s.network("blue").await.unwrap().id;
    refused(
        &s,
        &before,
        create(net(&blue_id, "10.9.0.0/24")).await,
        &format!("invalid network name {blue_id:?}: 64 hex digits are a network id, not a name"),
    )
    .await;
    let id_like = "AbCdEf0123456789".repeat(4);
    refused(
        &s,
        &before,
        create(net(&id_like, "10.9.0.0/24")).await,
        &format!("invalid network name {id_like:?}: 64 hex digits are a network id, not a name"),
    )
    .await;
    // h1's uplink (MTU 1500) carries at most 1450 inside VXLAN.
    refused(
        &s,
        &before,
        create(NetworkSpec { options: vec!["mtu=1451".into()], ..net("x", "10.9.0.0/24") }).await,
        "MTU 1451 is more than host \"h1\" can carry: its uplink's MTU 1500 leaves 1450 once VXLAN adds its 50 bytes",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec { driver: Some("bridge".into()), ..net("x", "10.9.0.0/24") }).await,
        "driver \"bridge\" is not supported (only \"overlay\")",
    )
    .await;
    refused(
        &s,
        &before,
        create(NetworkSpec {
            gateway: Some("10.0.0.1".into()),
            ..NetworkSpec { name: "x".into(), ..Default::default() }
        })
        .await,
        "invalid gateway \"10.0.0.1\": needs --subnet",
    )
    .await;
    refused(
        &s,
        &before,
        create(net("a/b", "10.9.0.0/24")).await,
        "invalid network name \"a/b\": only letters, digits, '_', '.' and '-' are allowed",
    )
    .await;

    refused(&s, &before, s.network_connect("nope", "c1", None).await, "network \"nope\" not found").await;
    refused(&s, &before, s.network_connect("blue", "ghost", None).await, "container \"ghost\" not found")
        .await;
    refused(
        &s,
        &before,
        s.network_connect("blue", "c1", None).await,
        "container \"c1\" is already connected to network \"blue\"",
    )
    .await;
    refused(
        &s,
        &before,
        s.network_connect("blue", "c2", Some(ip("10.0.9.2"))).await,
        "address 10.0.9.2 is already in use in network \"blue\" (by container \"c1\")",
    )
    .await;
    refused(
        &s,
        &before,
        s.network_connect("blue", "c2", Some(ip("10.0.9.1"))).await,
        "network \"blue\": address 10.0.9.1 is reserved: it is the gateway",
    )
    .await;
    refused(
        &s,
        &before,
        s.network_connect("blue", "c2", Some(ip("10.0.9.5"))).await,
        "network \"blue\": address 10.0.9.5 is reserved: it is the auxiliary address \"printer\"",
    )
    .await;
    refused(
        &s,
        &before,
        s.network_connect("blue", "c2", Some(ip("10.0.9.255"))).await,
        "network \"blue\": address 10.0.9.255 is reserved: it is the broadcast address",
    )
    .await;
    refused(
        &s,
        &before,
        s.network_connect("blue", "c2", Some(ip("10.0.10.9"))).await,
        "network \"blue\": address 10.0.10.9 is outside subnet 10.0.9.0/24",
    )
    .await;
    refused(
        &s,
        &before,
        s.network_connect("tiny", "c2", None).await,
        "network \"tiny\": no free address left in 10.0.20.0/30 (all 1 in use)",
    )
    .await;
    refused(
        &s,
        &before,
        s.network_disconnect("blue", "c2").await,
        "container \"c2\" is not connected to network \"blue\"",
    )
    .await;
    refused(&s, &before, s.network_disconnect("blue", "ghost").await, "container \"ghost\" not found").await;
    refused(&s, &before, s.remove_network("blue").await, "network \"blue\" has active endpoints (c1)").await;
    refused(&s, &before, s.remove_network("nope").await, "network \"nope\" not found").await;

    refused(
        &s,
        &before,
        s.create_container(&ctr("c9", "h9", None)).await,
        "host \"h9\" is not registered (no agent has ever registered it, or it was removed)",
    )
    .await;
    refused(
        &s,
        &before,
        s.create_container(&ctr("c1", "h1", None)).await,
        "container \"c1\" already exists (on host \"h1\")",
    )
    .await;
    // Container and endpoint are one transaction: a refused endpoint leaves no container.
    refused(
        &s,
        &before,
        s.create_container(&ctr("c9", "h1", Some("nope"))).await,
        "network \"nope\" not found",
    )
    .await;
    refused(
        &s,
        &before,
        s.create_container(&ctr("c9", "h1", Some("tiny"))).await,
        "network \"tiny\": no free address left in 10.0.20.0/30 (all 1 in use)",
    )
    .await;
    refused(
        &s,
        &before,
        s.create_container(&ContainerSpec { ip: Some(ip("10.0.9.1")), ..ctr("c9", "h1", Some("blue")) })
            .await,
        "network \"blue\": address 10.0.9.1 is reserved: it is the gateway",
    )
    .await;
    refused(
        &s,
        &before,
        s.create_container(&ctr("bad name", "h1", None)).await,
        "invalid container name \"bad name\": only letters, digits, '_', '.' and '-' are allowed",
    )
    .await;
    refused(&s, &before, s.remove_container("ghost").await, "container \"ghost\" not found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_allocations_from_separate_clients_are_distinct() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    let _h1 = register(&s, "h1", 1, Duration::from_secs(30)).await;
    let network = s.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    for i in 0..16 {
        s.create_container(&ctr(&format!("c{i}"), "h1", None)).await.unwrap();
    }
    // Sixteen clients, each its own connection, released at once.
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(store(&etcd.url()).await);
    }
    let start = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                client.network_connect("blue", &format!("c{i}"), None).await
            })
        })
        .collect();
    let mut got = BTreeSet::new();
    for t in tasks {
        let ep = t.await.unwrap().expect("every allocation succeeds");
        assert!(network.subnet.contains(&ep.ipv4));
        got.insert(ep.ipv4);
    }
    let want: BTreeSet<Ipv4Addr> = (2..18).map(|i| Ipv4Addr::new(10, 0, 9, i)).collect();
    assert_eq!(got, want, "16 distinct addresses, the 16 lowest free ones");
    let eps = s.network_endpoints(&network.id).await.unwrap();
    assert_eq!(eps.len(), 16);
    let dump = s.dump().await.unwrap();
    assert_eq!(
        dump.keys().filter(|k| k.starts_with(&format!("/overlay/v1/ipam/{}/", network.id))).count(),
        16
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_addresses_return_to_the_pool() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    let _h1 = register(&s, "h1", 1, Duration::from_secs(30)).await;
    s.create_network(&NetworkSpec { ip_range: Some("10.0.9.8/29".into()), ..net("blue", "10.0.9.0/24") })
        .await
        .unwrap();
    for name in ["a", "b", "c", "d", "e"] {
        s.create_container(&ctr(name, "h1", None)).await.unwrap();
    }
    let a = s.network_connect("blue", "a", None).await.unwrap();
    let b = s.network_connect("blue", "b", None).await.unwrap();
    let c = s.network_connect("blue", "c", None).await.unwrap();
    assert_eq!(
        [a.ipv4, b.ipv4, c.ipv4],
        [ip("10.0.9.8"), ip("10.0.9.9"), ip("10.0.9.10")],
        "from the ip-range"
    );
    assert_eq!(a.mac.to_string(), "02:42:0a:00:09:08");
    // An address outside the range but inside the subnet may be asked for.
    let d = s.network_connect("blue", "d", Some(ip("10.0.9.100"))).await.unwrap();
    assert_eq!(d.ipv4, ip("10.0.9.100"));

    let gone = s.network_disconnect("blue", "b").await.unwrap();
    assert_eq!(gone.id, b.id);
    assert_eq!(s.network_connect("blue", "e", None).await.unwrap().ipv4, ip("10.0.9.9"), "b's address again");
    // Removing a container frees all its addresses.
    let (_, eps) = s.remove_container("c").await.unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(
        s.network_connect("blue", "b", None).await.unwrap().ipv4,
        ip("10.0.9.10"),
        "c's address again"
    );
    assert!(s.container("c").await.is_err());
    let dump = s.dump().await.unwrap();
    assert!(!dump.keys().any(|k| k.contains("/attachments/c/")), "c's attachments went with it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_is_refused_until_an_address_is_freed() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    let _h1 = register(&s, "h1", 1, Duration::from_secs(30)).await;
    // A /29 holds 6 host addresses; the gateway and one auxiliary address leave 4.
    s.create_network(&NetworkSpec {
        aux_addresses: vec!["r=10.0.9.6".into()],
        ..net("small", "10.0.9.0/29")
    })
    .await
    .unwrap();
    let mut ips = Vec::new();
    for i in 0..4 {
        let c = s.create_container(&ctr(&format!("c{i}"), "h1", Some("small"))).await.unwrap();
        ips.push(c.endpoint.unwrap().ipv4);
    }
    assert_eq!(ips, ["10.0.9.2", "10.0.9.3", "10.0.9.4", "10.0.9.5"].map(ip));
    let before = s.dump().await.unwrap();
    refused(
        &s,
        &before,
        s.create_container(&ctr("c4", "h1", Some("small"))).await,
        "network \"small\": no free address left in 10.0.9.0/29 (all 4 in use)",
    )
    .await;
    s.remove_container("c2").await.unwrap();
    let c = s.create_container(&ctr("c4", "h1", Some("small"))).await.unwrap();
    assert_eq!(c.endpoint.unwrap().ipv4, ip("10.0.9.4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_sends_a_snapshot_then_changes_in_order_and_publishes_status() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    let reg = register(&s, "h1", 1, Duration::from_secs(30)).await;
    let blue = s.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    let c1 = s.create_container(&ctr("c1", "h1", Some("blue"))).await.unwrap();

    let (mut rx, status) = source(&s, "h1", Some(&reg));
    let Update::Snapshot(snap) = next(&mut rx).await else { panic!("a snapshot first") };
    assert_eq!(snap.networks[&blue.id], blue);
    assert_eq!(snap.containers["c1"], c1.container);
    let ep1 = c1.endpoint.clone().unwrap();
    assert_eq!(snap.endpoints[&ep1.id], ep1);
    assert_eq!(snap.hosts["h1"].lease, reg.lease(), "the host carries its lease");
    assert_eq!(snap.hosts["h1"].vtep, ip("198.18.0.1"));

    let red = s.create_network(&net("red", "10.0.10.0/24")).await.unwrap();
    assert_eq!(next(&mut rx).await, Update::Put(Object::Network(red.clone())));
    let ep = s.network_connect("red", "c1", None).await.unwrap();
    assert_eq!(next(&mut rx).await, Update::Put(Object::Endpoint(ep.clone())));
    s.network_disconnect("red", "c1").await.unwrap();
    assert_eq!(next(&mut rx).await, Update::Delete(ObjectRef::Endpoint(ep.id.clone())));
    let c2 = s.create_container(&ctr("c2", "h1", Some("red"))).await.unwrap();
    let ep2 = c2.endpoint.clone().unwrap();
    assert_eq!(next(&mut rx).await, Update::Put(Object::Container(c2.container.clone())));
    assert_eq!(next(&mut rx).await, Update::Put(Object::Endpoint(ep2.clone())));
    s.remove_container("c2").await.unwrap();
    assert_eq!(next(&mut rx).await, Update::Delete(ObjectRef::Container("c2".into())));
    assert_eq!(next(&mut rx).await, Update::Delete(ObjectRef::Endpoint(ep2.id.clone())));
    s.remove_network("red").await.unwrap();
    assert_eq!(next(&mut rx).await, Update::Delete(ObjectRef::Network(red.id.clone())));
    quiet(&mut rx, Duration::from_millis(300)).await;

    // Reports become leased status keys the CLI waits on.
    let deadline = Instant::now() + Duration::from_secs(10);
    status
        .send(Report::ContainerReady {
            name: "c1".into(),
            revision: c1.revision,
            netns: "/run/netns/ovl-c1".into(),
            pid: Some(42),
        })
        .await
        .unwrap();
    let ready = s.wait_container_ready("c1", "h1", c1.revision, deadline).await.unwrap();
    assert_eq!(ready.netns, PathBuf::from("/run/netns/ovl-c1"));
    assert_eq!(ready.pid, Some(42));
    assert_eq!(ready.host, "h1");
    status
        .send(Report::EndpointReady { id: ep1.id.clone(), container: "c1".into(), ifname: "eth0".into() })
        .await
        .unwrap();
    let ready = s.wait_endpoint_ready(&ep1, "blue", deadline).await.unwrap();
    assert_eq!(ready.ifname, "eth0");
    let dump = s.dump().await.unwrap();
    assert_eq!(
        dump[&s.keys().endpoint_status(&ep1.id)].1,
        reg.lease(),
        "status lives under the host's lease"
    );
    assert_eq!(dump[&s.keys().container_status("c1")].1, reg.lease());
    status.send(Report::EndpointGone { id: ep1.id.clone() }).await.unwrap();
    s.wait_gone(&s.keys().endpoint_status(&ep1.id), "endpoint status gone", deadline).await.unwrap();

    // A status about an earlier container of the same name is not taken for a new one.
    let err = s
        .wait_container_ready("c1", "h1", c1.revision + 1000, Instant::now() + Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::WaitTimeout { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("timed out after 500ms waiting for host \"h1\" to make container \"c1\"'s sandbox"),
        "{err}"
    );
}

/// A TCP proxy in front of etcd that can be cut (every connection dropped, new ones refused)
/// and restored: etcd becomes unreachable for one client while others can still write.
struct Proxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (o, c) = (open.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Self { addr, open, conns }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_resumes_after_etcd_restarts() {
    let Some(mut etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    s.create_network(&net("a", "10.0.1.0/24")).await.unwrap();
    let (mut rx, _status) = source(&s, "h1", None);
    let Update::Snapshot(snap) = next(&mut rx).await else { panic!("a snapshot first") };
    assert_eq!(snap.networks.len(), 1);
    s.create_network(&net("b", "10.0.2.0/24")).await.unwrap();
    assert_eq!(put_network(&next(&mut rx).await), "b");

    etcd.stop();
    // Unreachable: the source sends nothing (the agent keeps what it has).
    quiet(&mut rx, Duration::from_secs(1)).await;
    let etcd = tokio::task::spawn_blocking(move || {
        etcd.restart().expect("etcd restarts");
        etcd
    })
    .await
    .unwrap();
    // Changes made after the restart arrive as changes, not as a new snapshot.
    s.create_network(&net("c", "10.0.3.0/24")).await.unwrap();
    assert_eq!(put_network(&next(&mut rx).await), "c");
    s.create_network(&net("d", "10.0.4.0/24")).await.unwrap();
    assert_eq!(put_network(&next(&mut rx).await), "d");
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_catches_up_after_a_cut_and_relists_after_compaction() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let direct = store(&etcd.url()).await;
    let proxy = Proxy::start(etcd.client_addr()).await;
    let via_proxy = store(&proxy.url()).await;
    direct.create_network(&net("a", "10.0.1.0/24")).await.unwrap();
    // With a health record, to see the re-list after the compaction counted for the brake.
    let health = overlay_agent::health::Shared::default();
    let (tx, mut rx) = mpsc::channel(1024);
    let (_status, srx) = mpsc::channel(1024);
    let mut src = EtcdSource::new(via_proxy.clone(), "h1", tokio::sync::watch::channel(0).1);
    src.health = Some(health.clone());
    tokio::spawn(src.run(tx, srx));
    assert!(matches!(next(&mut rx).await, Update::Snapshot(_)));

    // Cut off while others write: what was written arrives, in order, once the link is back.
    proxy.cut();
    let b = direct.create_network(&net("b", "10.0.2.0/24")).await.unwrap();
    direct.remove_network("a").await.unwrap();
    quiet(&mut rx, Duration::from_millis(800)).await;
    proxy.restore();
    assert_eq!(put_network(&next(&mut rx).await), "b");
    assert!(matches!(next(&mut rx).await, Update::Delete(ObjectRef::Network(_))));
    assert_eq!(health.lock().unwrap().store_resets, 0, "a resumed watch is no re-list");

    // Cut off while the revisions it would resume from are compacted away: a new snapshot.
    proxy.cut();
    direct.create_network(&net("c", "10.0.3.0/24")).await.unwrap();
    direct.create_network(&net("d", "10.0.4.0/24")).await.unwrap();
    let rev = direct.revision().await.unwrap();
    direct.client().compact(rev, None).await.unwrap();
    quiet(&mut rx, Duration::from_millis(500)).await;
    proxy.restore();
    let Update::Snapshot(snap) = next(&mut rx).await else { panic!("a new snapshot after compaction") };
    assert_eq!(health.lock().unwrap().store_resets, 1, "the re-list is one the brake judges");
    let names: BTreeSet<_> = snap.networks.values().map(|n| n.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["b", "c", "d"]));
    assert!(snap.networks.contains_key(&b.id));
    // And it follows on from there.
    direct.create_network(&net("e", "10.0.5.0/24")).await.unwrap();
    assert_eq!(put_network(&next(&mut rx).await), "e");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_host_leaves_the_maps_but_keeps_its_records_until_host_rm() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    let ttl = Duration::from_secs(2);
    let h1 = register(&s, "h1", 1, ttl).await;
    let _h2 = register(&s, "h2", 2, Duration::from_mins(1)).await;
    let h3 = register(&s, "h3", 3, ttl).await;
    s.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    let a1 = s.create_container(&ctr("a1", "h1", Some("blue"))).await.unwrap().endpoint.unwrap();
    let a2 = s.create_container(&ctr("a2", "h2", Some("blue"))).await.unwrap().endpoint.unwrap();
    let a3 = s.create_container(&ctr("a3", "h3", Some("blue"))).await.unwrap().endpoint.unwrap();
    assert_eq!([a1.ipv4, a2.ipv4, a3.ipv4], ["10.0.9.2", "10.0.9.3", "10.0.9.4"].map(ip));
    let records_h1 = s.hosts().await.unwrap().into_iter().find(|e| e.host.name == "h1").unwrap().host.lease;
    let (mut rx, _status) = source(&s, "h2", None);
    assert!(matches!(next(&mut rx).await, Update::Snapshot(_)));

    // h1's agent dies. h3's restarts at once and takes its liveness lease over.
    let h3_lease = h3.lease();
    drop(h1);
    drop(h3);
    let h3 = register(&s, "h3", 3, ttl).await;
    assert_eq!(h3.lease(), h3_lease, "a quick restart keeps the host's liveness lease");

    // Within the TTL and a second, h1 is no longer alive: that is the only deletion.
    let lapsed = Instant::now();
    loop {
        let left = (lapsed + ttl + Duration::from_millis(1500)).saturating_duration_since(Instant::now());
        match timeout(left, rx.recv()).await.expect("h1 leaves within TTL + 1.5 s").unwrap() {
            Update::Delete(ObjectRef::Host(h)) if h == "h1" => break,
            Update::Put(Object::Host(h)) if h.name == "h3" => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    quiet(&mut rx, Duration::from_millis(500)).await;
    let (state, _) = s.load().await.unwrap();
    let alive: BTreeSet<_> = state.hosts.keys().map(String::as_str).collect();
    assert_eq!(alive, BTreeSet::from(["h2", "h3"]));
    let ctrs: BTreeSet<_> = state.containers.keys().map(String::as_str).collect();
    assert_eq!(ctrs, BTreeSet::from(["a1", "a2", "a3"]), "a lapse deletes nothing");
    assert!(state.endpoints.contains_key(&a1.id));
    let entries = s.hosts().await.unwrap();
    let h1_entry = entries.iter().find(|e| e.host.name == "h1").expect("h1 still registered");
    assert!(h1_entry.alive.is_none());
    // a1 still holds its address.
    s.create_container(&ctr("b2", "h2", None)).await.unwrap();
    assert_eq!(s.network_connect("blue", "b2", None).await.unwrap().ipv4, ip("10.0.9.5"));

    // h1 comes back: alive again, under the same records lease; its endpoint never left.
    let h1 = register(&s, "h1", 1, ttl).await;
    loop {
        match next(&mut rx).await {
            Update::Put(Object::Host(h)) if h.name == "h1" => break,
            // b2 and its endpoint, just made.
            Update::Put(Object::Container(_) | Object::Endpoint(_)) => {}
            other => panic!("expected h1 back, got {other:?}"),
        }
    }
    let entry = s.hosts().await.unwrap().into_iter().find(|e| e.host.name == "h1").unwrap();
    assert_eq!(entry.host.lease, records_h1);
    assert!(s.container("a1").await.is_ok());

    // host rm is refused while the host is alive, and changes nothing.
    let before = s.dump().await.unwrap();
    refused(
        &s,
        &before,
        s.remove_host("h1").await,
        "host \"h1\" is alive (served by an agent with VTEP 198.18.0.1); stop its agent and wait for its liveness lease to run out before removing it",
    )
    .await;
    refused(
        &s,
        &before,
        s.remove_host("h9").await,
        "host \"h9\" is not registered (no agent has ever registered it, or it was removed)",
    )
    .await;
    // Once it is gone, host rm removes it and everything it owned, in one go.
    drop(h1);
    match next(&mut rx).await {
        Update::Delete(ObjectRef::Host(h)) if h == "h1" => {}
        other => panic!("expected h1 to go, got {other:?}"),
    }
    assert_eq!(s.remove_host("h1").await.unwrap(), 1);
    let mut deleted = BTreeSet::new();
    while deleted.len() < 2 {
        match next(&mut rx).await {
            Update::Delete(what) => drop(deleted.insert(what)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        deleted,
        BTreeSet::from([ObjectRef::Container("a1".into()), ObjectRef::Endpoint(a1.id.clone())])
    );
    let dump = s.dump().await.unwrap();
    assert!(
        !dump.keys().any(|k| k.contains("/h1") || k.contains("/attachments/a1/") || k.ends_with("/10.0.9.2")),
        "{dump:#?}"
    );
    // a1's address is free again.
    s.create_container(&ctr("b3", "h2", None)).await.unwrap();
    assert_eq!(s.network_connect("blue", "b3", None).await.unwrap().ipv4, ip("10.0.9.2"));

    // h3's liveness lease is revoked behind its back: it registers again under a new one, and
    // its container is untouched.
    let mut leases = h3.leases();
    s.client().lease_revoke(h3_lease).await.unwrap();
    timeout(Duration::from_secs(10), leases.wait_for(|l| *l != h3_lease))
        .await
        .expect("re-registered")
        .unwrap();
    let entries = s.hosts().await.unwrap();
    let h3_now = entries.iter().find(|e| e.host.name == "h3").expect("h3 registered");
    assert_eq!(h3_now.alive.as_ref().map(|a| a.lease), Some(h3.lease()));
    assert!(s.container("a3").await.is_ok(), "a lapse of liveness deletes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_gone_for_longer_than_its_grace_is_garbage_collected() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    let life = Lifetimes { ttl: Duration::from_secs(1), grace: Duration::from_secs(3) };
    let h1 = HostRegistration::register(s.clone(), host("h1", 1), life).await.unwrap();
    let _h2 = register(&s, "h2", 2, Duration::from_mins(1)).await;
    s.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    let a1 = s.create_container(&ctr("a1", "h1", Some("blue"))).await.unwrap().endpoint.unwrap();
    let (mut rx, _status) = source(&s, "h2", None);
    assert!(matches!(next(&mut rx).await, Update::Snapshot(_)));

    drop(h1);
    let gone = Instant::now();
    // First its liveness, then, once the grace is over, everything it owned.
    match next(&mut rx).await {
        Update::Delete(ObjectRef::Host(h)) if h == "h1" => {}
        other => panic!("expected h1 to go, got {other:?}"),
    }
    let mut deleted = BTreeSet::new();
    while deleted.len() < 2 {
        match next(&mut rx).await {
            Update::Delete(what) => drop(deleted.insert(what)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        gone.elapsed() >= Duration::from_secs(2),
        "collected after {:?}, before the grace",
        gone.elapsed()
    );
    assert_eq!(
        deleted,
        BTreeSet::from([ObjectRef::Container("a1".into()), ObjectRef::Endpoint(a1.id.clone())])
    );
    let dump = s.dump().await.unwrap();
    assert!(
        // By the keys' structure: a random id may well contain "a1".
        !dump.keys().any(|k| k.contains("/h1")
            || k.ends_with("/containers/a1")
            || k.contains("/attachments/a1/")
            || k.contains(a1.id.as_str())
            || k.ends_with("/10.0.9.2")),
        "{dump:#?}"
    );
    assert!(s.hosts().await.unwrap().iter().all(|e| e.host.name != "h1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_stores_apart() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let a = Store::connect(&StoreConfig::new([etcd.url()]).with_prefix("/team-a/v1")).await.unwrap();
    let b = Store::connect(&StoreConfig::new([etcd.url()]).with_prefix("/team-b/v1/")).await.unwrap();
    a.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    b.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    assert_eq!(a.networks().await.unwrap().len(), 1);
    assert!(a.dump().await.unwrap().keys().all(|k| k.starts_with("/team-a/v1/")));
    assert!(b.dump().await.unwrap().keys().all(|k| k.starts_with("/team-b/v1/")));
}

/// Plays the part of the agent of `host`: follows an `EtcdSource` and reports every container
/// and endpoint of its host ready at once (containers in `netns`), and gone when deleted.
fn fake_agent(store: &Store, host: &str, reg: &HostRegistration, netns: PathBuf) {
    let (tx, mut rx) = mpsc::channel(1024);
    let (stx, srx) = mpsc::channel(1024);
    tokio::spawn(EtcdSource::registered(store.clone(), host, reg).run(tx, srx));
    let host = host.to_owned();
    tokio::spawn(async move {
        let mut state = State::default();
        while let Some(update) = rx.recv().await {
            let mut reports = Vec::new();
            let container_ready = |c: &Container| Report::ContainerReady {
                name: c.name.clone(),
                revision: c.revision,
                netns: netns.clone(),
                pid: None,
            };
            match &update {
                Update::Snapshot(s) => {
                    reports.extend(s.containers.values().filter(|c| c.host == host).map(container_ready));
                    reports.extend(s.endpoints.values().filter(|e| e.host == host).map(|e| {
                        Report::EndpointReady {
                            id: e.id.clone(),
                            container: e.container.clone(),
                            ifname: "eth0".into(),
                        }
                    }));
                    state = s.clone();
                }
                Update::Put(Object::Container(c)) if c.host == host => reports.push(container_ready(c)),
                Update::Put(Object::Endpoint(e)) if e.host == host => reports.push(Report::EndpointReady {
                    id: e.id.clone(),
                    container: e.container.clone(),
                    ifname: "eth0".into(),
                }),
                Update::Delete(ObjectRef::Endpoint(id))
                    if state.endpoints.get(id).is_some_and(|e| e.host == host) =>
                {
                    reports.push(Report::EndpointGone { id: id.clone() });
                }
                Update::Delete(ObjectRef::Container(name))
                    if state.containers.get(name).is_some_and(|c| c.host == host) =>
                {
                    reports.push(Report::ContainerGone { name: name.clone() });
                }
                _ => {}
            }
            match update {
                Update::Put(o) => state.put(o),
                Update::Delete(r) => state.delete(&r),
                Update::Snapshot(_) => {}
            }
            for r in reports {
                let _ = stx.send(r).await;
            }
        }
    });
}

/// The `overlay` binary, if built (`cargo build -p overlay-agent --bin overlay`).
fn overlay_cli() -> Option<PathBuf> {
    let candidates = std::env::var_os("OVERLAY_BIN_DIR").map_or_else(
        || ["debug", "release"].map(|p| overlay_tests::target_dir().join(p).join("overlay")).to_vec(),
        |d| vec![PathBuf::from(d).join("overlay")],
    );
    candidates.into_iter().find(|p| p.exists())
}

struct Cli {
    bin: PathBuf,
    url: String,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Cli {
    async fn run(&self, args: &[&str]) -> Out {
        let out = tokio::process::Command::new(&self.bin)
            .args(["--etcd-endpoints", &self.url])
            .args(args)
            .env_remove("OVERLAY_ETCD_ENDPOINTS")
            .output()
            .await
            .expect("runs overlay");
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(out.ok, "overlay {args:?} failed: {}{}", out.stdout, out.stderr);
        out.stdout
    }

    async fn fails(&self, args: &[&str], message: &str) {
        let out = self.run(args).await;
        assert!(!out.ok, "overlay {args:?} should fail");
        assert!(out.stderr.contains(message), "overlay {args:?}: stderr {:?} lacks {message:?}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_writes_waits_and_refuses() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let Some(bin) = overlay_cli() else {
        overlay_tests::skip("the overlay binary is not built (cargo xtask test builds it)");
        return;
    };
    let s = store(&etcd.url()).await;
    let h1 = register(&s, "h1", 1, Duration::from_secs(30)).await;
    let _h2 = register(&s, "h2", 2, Duration::from_secs(30)).await;
    // The test's own namespace stands in for a container's.
    let netns = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
    fake_agent(&s, "h1", &h1, netns);
    let cli = Cli { bin, url: etcd.url() };

    let id = cli
        .ok(&[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.0.9.0/24",
            "--aux-address",
            "printer=10.0.9.5",
            "--label",
            "team=a",
            "-o",
            "mtu=1400",
            "blue",
        ])
        .await;
    assert_eq!(id.trim().len(), 64, "{id}");
    let before = s.dump().await.unwrap();
    cli.fails(
        &["network", "create", "--subnet", "10.0.0.0/16", "red"],
        "subnet 10.0.0.0/16 overlaps network \"blue\" (10.0.9.0/24)",
    )
    .await;
    cli.fails(
        &["network", "create", "--subnet", "10.1.0.0/16", "--gateway", "10.2.0.1", "red"],
        "gateway 10.2.0.1 is outside subnet 10.1.0.0/16",
    )
    .await;
    cli.fails(
        &["network", "create", "--subnet", "10.1.0.0/16", "blue"],
        "network with name \"blue\" already exists",
    )
    .await;
    cli.fails(&["network", "inspect", "nope"], "network \"nope\" not found").await;
    assert_eq!(s.dump().await.unwrap(), before, "refusals wrote nothing");
    assert!(cli.ok(&["network", "ls"]).await.contains("blue"));

    assert_eq!(
        cli.ok(&["container", "create", "--host", "h1", "--network", "blue", "c1"]).await.trim(),
        "c1"
    );
    cli.ok(&["container", "create", "--host", "h1", "c2"]).await;
    cli.ok(&["network", "connect", "--ip", "10.0.9.77", "blue", "c2"]).await;
    cli.fails(
        &["network", "connect", "blue", "c2"],
        "container \"c2\" is already connected to network \"blue\"",
    )
    .await;
    cli.fails(&["network", "connect", "blue", "ghost"], "container \"ghost\" not found").await;
    cli.fails(&["network", "rm", "blue"], "network \"blue\" has active endpoints (c1, c2)").await;

    let inspect: serde_json::Value =
        serde_json::from_str(&cli.ok(&["network", "inspect", "blue"]).await).unwrap();
    let n = &inspect[0];
    assert_eq!(n["Name"], "blue");
    assert_eq!(n["Id"], id.trim());
    assert_eq!(n["Driver"], "overlay");
    assert_eq!(n["Scope"], "global");
    assert_eq!(n["EnableIPv6"], false);
    assert_eq!(n["IPAM"]["Driver"], "default");
    assert_eq!(n["IPAM"]["Config"][0]["Subnet"], "10.0.9.0/24");
    assert_eq!(n["IPAM"]["Config"][0]["Gateway"], "10.0.9.1");
    assert_eq!(n["IPAM"]["Config"][0]["AuxiliaryAddresses"]["printer"], "10.0.9.5");
    assert_eq!(n["Options"]["com.docker.network.driver.overlay.vxlanid_list"], "4096");
    assert_eq!(n["Options"]["com.docker.network.driver.mtu"], "1400");
    assert_eq!(n["Labels"]["team"], "a");
    let containers: BTreeMap<String, (String, String)> = n["Containers"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| {
            (
                c["Name"].as_str().unwrap().to_owned(),
                (c["IPv4Address"].as_str().unwrap().to_owned(), c["MacAddress"].as_str().unwrap().to_owned()),
            )
        })
        .collect();
    assert_eq!(containers["c1"], ("10.0.9.2/24".to_owned(), "02:42:0a:00:09:02".to_owned()));
    assert_eq!(containers["c2"].0, "10.0.9.77/24");

    // No agent on h2: the CLI waits, then says what it waited for.
    cli.fails(
        &["--timeout", "1s", "container", "create", "--host", "h2", "c3"],
        "timed out after 1s waiting for host \"h2\" to make container \"c3\"'s sandbox",
    )
    .await;
    cli.fails(&["container", "create", "--host", "h9", "c4"], "host \"h9\" is not registered").await;
    let ls = cli.ok(&["container", "ls"]).await;
    assert!(
        ls.lines().any(|l| l.starts_with("c1 ") && l.contains("blue=10.0.9.2") && l.ends_with("ready")),
        "{ls}"
    );
    assert!(ls.lines().any(|l| l.starts_with("c3 ") && l.ends_with("pending")), "{ls}");
    let hosts = cli.ok(&["host", "ls"]).await;
    assert!(hosts.contains("h1") && hosts.contains("198.18.0.2"), "{hosts}");

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let out = cli.ok(&["container", "exec", "c1", "--", "sh", "-c", "echo inside"]).await;
        assert_eq!(out.trim(), "inside");
    } else {
        eprintln!("not root: container exec not tested");
    }

    cli.ok(&["network", "disconnect", "blue", "c2"]).await;
    cli.fails(
        &["network", "disconnect", "blue", "c2"],
        "container \"c2\" is not connected to network \"blue\"",
    )
    .await;
    let rm = cli.ok(&["container", "rm", "c1", "c2", "c3"]).await;
    assert_eq!(rm.lines().collect::<Vec<_>>(), ["c1", "c2", "c3"]);
    cli.fails(&["container", "rm", "c1"], "container \"c1\" not found").await;
    assert_eq!(cli.ok(&["network", "rm", "blue"]).await.trim(), "blue");
    let left: Vec<String> = s.dump().await.unwrap().into_keys().collect();
    assert!(
        left.iter().all(|k| k.starts_with("/overlay/v1/hosts/") || k.starts_with("/overlay/v1/alive/")),
        "{left:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_output_into_a_closed_pipe_ends_quietly() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let Some(bin) = overlay_cli() else {
        overlay_tests::skip("the overlay binary is not built (cargo xtask test builds it)");
        return;
    };
    let s = store(&etcd.url()).await;
    let _h1 = register(&s, "h1", 1, Duration::from_secs(30)).await;
    s.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    s.create_container(&ctr("c1", "h1", Some("blue"))).await.unwrap();
    for args in [
        &["container", "ls"][..],
        &["network", "ls"],
        &["network", "ls", "-q"],
        &["network", "inspect", "blue"],
        &["host", "ls"],
    ] {
        let mut child = std::process::Command::new(&bin)
            .args(["--etcd-endpoints", &etcd.url()])
            .args(args)
            .env_remove("OVERLAY_ETCD_ENDPOINTS")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("runs overlay");
        // The reader goes away before the CLI (which first asks etcd) writes anything, as
        // `| head -0` would; every write of the CLI then meets a closed pipe.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("overlay ends");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "overlay {args:?} into a closed pipe: {stderr}");
        assert!(out.status.success(), "overlay {args:?} into a closed pipe: {:?} {stderr}", out.status);
        assert_eq!(stderr, "", "overlay {args:?} into a closed pipe says nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_value_is_skipped_with_a_warning_naming_its_key() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let Some(bin) = overlay_cli() else {
        overlay_tests::skip("the overlay binary is not built (cargo xtask test builds it)");
        return;
    };
    let s = store(&etcd.url()).await;
    let _h1 = register(&s, "h1", 1, Duration::from_secs(30)).await;
    let blue = s.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    s.create_network(&net("red", "10.0.10.0/24")).await.unwrap();
    s.create_container(&ctr("c1", "h1", Some("blue"))).await.unwrap();
    // Values no code of the project writes: by hand, cut short, or from another layout.
    let k = s.keys().clone();
    let bad_network = k.network(&"f".repeat(64));
    let bad_endpoint = k.endpoint(&blue.id, &"e".repeat(64));
    let bad_container = k.container("broken");
    let bad_host = k.host("hx");
    let bad_alive = k.alive_host("hy");
    let mut raw = s.client();
    for (key, value) in [
        (&bad_network, "not json"),
        (&bad_endpoint, "{\"id\": 7}"),
        (&bad_container, "{\"name\": \"broken\""),
        (&bad_host, "[]"),
        (&bad_alive, "{"),
    ] {
        raw.put(key.as_str(), value, None).await.unwrap();
    }
    let cli = Cli { bin, url: etcd.url() };
    let warns = |out: &Out, key: &str| {
        out.stderr.lines().any(|l| l.contains("ignoring a value that does not parse") && l.contains(key))
    };

    let out = cli.run(&["network", "ls"]).await;
    assert!(out.ok, "{}", out.stderr);
    let names: Vec<_> = out.stdout.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert_eq!(names, ["blue", "red"], "{}", out.stdout);
    assert!(warns(&out, &bad_network), "network ls names {bad_network}: {}", out.stderr);

    let out = cli.run(&["container", "ls"]).await;
    assert!(out.ok, "{}", out.stderr);
    let names: Vec<_> = out.stdout.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names, ["c1"], "{}", out.stdout);
    assert!(out.stdout.contains("blue=10.0.9.2"), "{}", out.stdout);
    for key in [&bad_container, &bad_endpoint] {
        assert!(warns(&out, key), "container ls names {key}: {}", out.stderr);
    }

    let out = cli.run(&["host", "ls"]).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("h1") && !out.stdout.contains("hx"), "{}", out.stdout);
    assert!(warns(&out, &bad_host), "host ls names {bad_host}: {}", out.stderr);

    let out = cli.run(&["network", "inspect", "blue", "red"]).await;
    assert!(out.ok, "{}", out.stderr);
    let inspect: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(inspect[0]["Name"], "blue");
    assert_eq!(inspect[1]["Name"], "red");
    assert_eq!(inspect[0]["Containers"].as_object().unwrap().len(), 1, "c1's endpoint only");
    assert!(warns(&out, &bad_endpoint), "inspect names {bad_endpoint}: {}", out.stderr);

    // The other operations that look a network up among all of them are not blocked either.
    cli.ok(&["--timeout", "0", "container", "create", "--host", "h1", "--network", "red", "c2"]).await;

    // The agent's side: the snapshot holds every good object and none of the bad ones, and a
    // bad value arriving through the watch is skipped while the good ones after it arrive.
    let (state, _) = s.load().await.unwrap();
    let mut networks: Vec<_> = state.networks.values().map(|n| n.name.as_str()).collect();
    networks.sort_unstable();
    assert_eq!(networks, ["blue", "red"]);
    assert_eq!(state.containers.keys().collect::<Vec<_>>(), ["c1", "c2"]);
    assert_eq!(state.endpoints.len(), 2);
    assert_eq!(state.hosts.keys().collect::<Vec<_>>(), ["h1"]);
    let (mut rx, _status) = source(&s, "h1", None);
    let Update::Snapshot(snap) = next(&mut rx).await else { panic!("a snapshot first") };
    assert_eq!(snap.networks.len(), 2);
    assert_eq!(snap.containers.keys().collect::<Vec<_>>(), ["c1", "c2"]);
    raw.put(bad_container.as_str(), "{}", None).await.unwrap();
    s.create_container(&ctr("c3", "h1", None)).await.unwrap();
    match next(&mut rx).await {
        Update::Put(Object::Container(c)) => assert_eq!(c.name, "c3"),
        other => panic!("expected Put(Container c3), got {other:?}"),
    }

    // Network create alone must see every subnet to rule out an overlap: it names the key.
    let err = s.create_network(&net("green", "10.0.11.0/24")).await.unwrap_err();
    assert!(err.to_string().starts_with(&format!("{bad_network}: the stored value does not parse")), "{err}");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_pki(dir: &std::path::Path) -> bool {
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "[srv]\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n\
         [cli]\nextendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ca = [
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
    ];
    let ca_ext = [
        "-subj",
        "/CN=test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ];
    if !openssl(&[&ca[..], &ca_ext[..]].concat()) {
        return false;
    }
    for (name, section) in [("srv", "srv"), ("cli", "cli")] {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        let ok = openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]) && openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-extensions",
            section,
        ]);
        if !ok {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    if Etcd::binary().is_none() && overlay_tests::skip("no etcd binary (install etcd-server)") {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    let dir = pki.path();
    if !make_pki(dir) && overlay_tests::skip("cannot make certificates (is openssl installed?)") {
        return;
    }
    let tls =
        EtcdTls { cert: dir.join("srv.pem"), key: dir.join("srv.key"), client_ca: Some(dir.join("ca.pem")) };
    let etcd = Etcd::start_with(EtcdOptions { tls: Some(tls), ..Default::default() }).expect("etcd with TLS");
    assert!(etcd.url().starts_with("https://"));
    let cfg = StoreConfig {
        cacert: Some(dir.join("ca.pem")),
        cert: Some(dir.join("cli.pem")),
        key: Some(dir.join("cli.key")),
        ..StoreConfig::new([etcd.url()])
    };
    let s = Store::connect(&cfg).await.unwrap();
    s.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    assert_eq!(s.networks().await.unwrap().len(), 1);
    // etcd requires a client certificate.
    let anonymous = StoreConfig { cert: None, key: None, ..cfg.clone() };
    let s = Store::connect(&anonymous).await.unwrap();
    assert!(s.networks().await.is_err());
    // TLS files with a plain-HTTP endpoint are a mistake, said so.
    let plain = StoreConfig { endpoints: vec![etcd.url().replace("https", "http")], ..cfg };
    let err = Store::connect(&plain).await.err().expect("refused");
    assert!(err.to_string().contains("use https://"), "{err}");
}

/// A state far larger than one gRPC response (4 MiB by default) still loads: the agent's
/// snapshot is read in pages at one revision. 20,000 endpoints are about 6 MB of values.
#[tokio::test]
async fn a_state_larger_than_one_response_loads_whole() {
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    let network = s.create_network(&net("big", "10.128.0.0/9")).await.expect("network");
    // Written straight to the keys, in transactions of 128 puts (etcd's limit per transaction):
    // creating 20,000 containers one by one through the store would only slow the test down.
    const N: u32 = 20_000;
    let mut kv = s.client().kv_client();
    let mut ops = Vec::new();
    for i in 0..N {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 2)) + i);
        let id = format!("{i:064x}");
        let e = overlay_agent::model::Endpoint {
            id: id.clone(),
            network_id: network.id.clone(),
            container: format!("container-{i}"),
            ipv4: ip,
            mac: overlay_agent::model::MacAddr::from_ip(ip),
            host: "somewhere".into(),
            aliases: Vec::new(),
            services: Vec::new(),
            ifname: None,
        };
        ops.push(overlay_agent::store::etcd_client::TxnOp::put(
            s.keys().endpoint(&network.id, &id),
            serde_json::to_vec(&e).unwrap(),
            None,
        ));
        if ops.len() == 128 || i == N - 1 {
            kv.txn(overlay_agent::store::etcd_client::Txn::new().and_then(std::mem::take(&mut ops)))
                .await
                .expect("txn");
        }
    }

    let (state, _) = s.load().await.expect("load");
    assert_eq!(state.endpoints.len(), N as usize);
    // The agent's source delivers the same, as its first snapshot.
    let (updates, mut rx) = mpsc::channel(16);
    let (_status_tx, status_rx) = mpsc::channel(16);
    let source = EtcdSource::new(s.clone(), "h1", tokio::sync::watch::channel(0).1);
    let task = tokio::spawn(source.run(updates, status_rx));
    match next(&mut rx).await {
        Update::Snapshot(state) => assert_eq!(state.endpoints.len(), N as usize),
        other => panic!("expected a snapshot, got {other:?}"),
    }
    task.abort();
}

/// Aliases and services: names kept in the endpoints, services published on a network with
/// backends; every conflict refused naming the holder, with etcd unchanged; a service with
/// backends cannot be unpublished; the network's services go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_and_services() {
    use overlay_agent::store::service::Names;
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let s = store(&etcd.url()).await;
    let _h1 = register(&s, "h1", 1, Duration::from_secs(30)).await;
    s.create_network(&net("blue", "10.0.9.0/24")).await.unwrap();
    s.create_network(&net("red", "10.0.10.0/24")).await.unwrap();
    let names = |aliases: &[&str], services: &[&str], publish: bool| Names {
        aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
        services: services.iter().map(|a| (*a).to_owned()).collect(),
        publish,
    };

    // An alias at creation, and one shared by a second container.
    let web = s
        .create_container(&ContainerSpec {
            names: names(&["www", "www"], &[], false),
            ..ctr("web", "h1", Some("blue"))
        })
        .await
        .unwrap();
    assert_eq!(web.endpoint.as_ref().unwrap().aliases, ["www"], "each alias once");
    s.create_container(&ctr("web2", "h1", None)).await.unwrap();
    let web2 = s.network_connect_named("blue", "web2", None, &names(&["www"], &[], false)).await.unwrap();
    assert_eq!(web2.aliases, ["www"]);

    // Services: publish, then a container created with --publish-service (already published:
    // it attaches), and one that publishes a new one on the way.
    s.publish_service("blue", "api").await.unwrap();
    let before = s.dump().await.unwrap();
    refused(
        &s,
        &before,
        s.publish_service("blue", "api").await,
        "service \"api\" is already published on network \"blue\"",
    )
    .await;
    refused(
        &s,
        &before,
        s.publish_service("blue", "WWW").await,
        "name \"WWW\" on network \"blue\" is taken by an alias of container \"web\", an alias of container \"web2\"",
    )
    .await;
    refused(
        &s,
        &before,
        s.publish_service("blue", "web").await,
        "name \"web\" on network \"blue\" is taken by container \"web\"",
    )
    .await;
    refused(&s, &before, s.publish_service("nope", "x").await, "network \"nope\" not found").await;
    refused(&s, &before, s.publish_service("blue", "a.b").await, "invalid service name \"a.b\": must be a single label (no '.'): SERVICE.NETWORK splits at the first dot").await;
    // An alias that is a service's name, a service that is not published, a bad alias.
    refused(
        &s,
        &before,
        s.create_container(&ContainerSpec {
            names: names(&["api"], &[], false),
            ..ctr("x", "h1", Some("blue"))
        })
        .await,
        "name \"api\" on network \"blue\" is taken by service \"api\"",
    )
    .await;
    refused(
        &s,
        &before,
        s.create_container(&ContainerSpec {
            names: names(&[], &["db"], false),
            ..ctr("x", "h1", Some("blue"))
        })
        .await,
        "service \"db\" is not published on network \"blue\" (overlay service publish db.blue)",
    )
    .await;
    refused(
        &s,
        &before,
        s.create_container(&ContainerSpec {
            names: names(&["-x"], &[], false),
            ..ctr("x", "h1", Some("blue"))
        })
        .await,
        "invalid alias \"-x\": must start with a letter or digit",
    )
    .await;
    refused(
        &s,
        &before,
        s.create_container(&ContainerSpec { names: names(&["a"], &[], false), ..ctr("x", "h1", None) }).await,
        "invalid --alias \"a\": needs --network",
    )
    .await;

    let api1 = s
        .create_container(&ContainerSpec {
            names: names(&[], &["api"], true),
            ..ctr("api1", "h1", Some("blue"))
        })
        .await
        .unwrap();
    assert_eq!(api1.endpoint.unwrap().services, ["api"]);
    let db1 = s
        .create_container(&ContainerSpec {
            names: names(&[], &["db"], true),
            ..ctr("db1", "h1", Some("red"))
        })
        .await
        .unwrap();
    assert_eq!(db1.endpoint.unwrap().services, ["db"]);
    // attach / detach; attaching twice changes nothing; not connected, not published.
    s.service_backend("web", "api.blue", true).await.unwrap();
    assert_eq!(s.service_backend("web", "api.blue", true).await.unwrap().services, ["api"]);
    let before = s.dump().await.unwrap();
    refused(
        &s,
        &before,
        s.service_backend("web", "db.red", true).await,
        "container \"web\" is not connected to network \"red\"",
    )
    .await;
    refused(
        &s,
        &before,
        s.service_backend("web", "nope.blue", true).await,
        "service \"nope\" is not published on network \"blue\" (overlay service publish nope.blue)",
    )
    .await;
    refused(
        &s,
        &before,
        s.service_backend("web", "api", true).await,
        "invalid service \"api\": expected SERVICE.NETWORK",
    )
    .await;

    let all = s.services().await.unwrap();
    let summary: Vec<(String, String, Vec<String>)> = all
        .iter()
        .map(|i| {
            (
                i.service.name.clone(),
                i.network.clone(),
                i.backends.iter().map(|e| e.container.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("api".into(), "blue".into(), vec!["api1".to_owned(), "web".to_owned()]),
            ("db".into(), "red".into(), vec!["db1".to_owned()]),
        ]
    );

    // Unpublishing with backends is refused naming them; detached, it goes.
    let before = s.dump().await.unwrap();
    refused(
        &s,
        &before,
        s.unpublish_service("blue", "api").await,
        "service \"api\" on network \"blue\" has backends (api1, web): detach them first (overlay service detach CONTAINER api.blue)",
    )
    .await;
    s.service_backend("web", "api.blue", false).await.unwrap();
    s.service_backend("api1", "api.blue", false).await.unwrap();
    s.unpublish_service("blue", "api").await.unwrap();
    assert!(s.services().await.unwrap().iter().all(|i| i.service.name != "api"));

    // A network's services go with it.
    s.remove_container("db1").await.unwrap();
    s.remove_network("red").await.unwrap();
    assert!(s.dump().await.unwrap().keys().all(|k| !k.contains("/services/")), "red's service db is gone");
}
