//! overlay-demo: the main job, `cargo xtask demo`.
//!
//! Starts a real etcd and three simulated hosts (network namespaces on an underlay bridge),
//! each with its agent; creates two networks with the CLI; starts containers on different
//! hosts; shows them reaching each other across hosts and not across networks; prints
//! `network inspect` and the datapath counters; and removes everything it made, also when
//! interrupted.
//!
//! `overlay-demo --docker` (`cargo xtask demo --docker`) does the same with Docker instead of
//! the CLI: a real dockerd per host, the agents as its network and IPAM plugin (docker.rs).

mod docker;

use std::{
    net::Ipv4Addr,
    process::{Command, ExitCode},
    time::Instant,
};

use overlay_tests::{binary, cleanup_on_signal, cluster::Cluster, in_ns, skip_unless_privileged, try_sh};

fn main() -> ExitCode {
    if skip_unless_privileged() {
        eprintln!("overlay-demo needs root: run `sudo cargo xtask demo`");
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    // Ctrl-C or SIGTERM: remove everything the run made before leaving.
    if let Err(e) = cleanup_on_signal() {
        eprintln!("cannot install the signal handler: {e}");
        return ExitCode::FAILURE;
    }
    if std::env::args().nth(1).as_deref() == Some("--docker") {
        return docker::demo(started);
    }
    step("Starting etcd and three hosts (h1, h2, h3: namespaces on an underlay bridge), one agent each");
    let Some(c) = Cluster::start("demo", 3, 10) else {
        eprintln!("etcd is missing: run ./setup");
        return ExitCode::FAILURE;
    };
    show(&c, &["host", "ls"]);

    step("Creating two networks");
    show(&c, &["network", "create", "--subnet", "10.0.9.0/24", "frontend"]);
    show(
        &c,
        &["network", "create", "--subnet", "10.0.10.0/24", "--aux-address", "router=10.0.10.2", "backend"],
    );
    show(&c, &["network", "ls"]);

    step(
        "Starting containers: web on h1 and api on h2 (frontend), db on h3 (backend); api also joins backend",
    );
    show(&c, &["container", "create", "--host", "h1", "--network", "frontend", "web"]);
    show(&c, &["container", "create", "--host", "h2", "--network", "frontend", "api"]);
    show(&c, &["container", "create", "--host", "h3", "--network", "backend", "db"]);
    show(&c, &["network", "connect", "backend", "api"]);
    show(&c, &["container", "ls"]);

    let web = c.address("frontend", "web");
    let api = c.address("frontend", "api");
    let api_back = c.address("backend", "api");
    let db = c.address("backend", "db");
    step("Who reaches whom (ping from inside each container)");
    let checks = [
        ("web", "h1", "api", api, true, "same network, across hosts"),
        ("api", "h2", "web", web, true, "same network, across hosts"),
        ("api", "h2", "db", db, true, "api's second interface, on backend"),
        ("db", "h3", "api", api_back, true, "same network, across hosts"),
        ("web", "h1", "db", db, false, "different networks: isolated"),
        ("db", "h3", "web", web, false, "different networks: isolated"),
    ];
    let mut ok = true;
    for (from, host, to, ip, expect, why) in checks {
        let reached = ping(&c, host, from, ip);
        let verdict = if reached == expect { "as expected" } else { "UNEXPECTED" };
        ok &= reached == expect;
        println!(
            "  {from:>3} -> {to:<3} ({ip:<11}) {:<13} {verdict:<11} {why}",
            if reached { "reached" } else { "not reached" }
        );
    }

    step("Names: containers ask their gateway, answered in the datapath or by the agent's resolver");
    let names = [
        (
            "h1",
            "web",
            &["ping", "-c", "1", "-W", "2", "api"][..],
            true,
            "web pings api by name, across hosts",
        ),
        ("h2", "api", &["getent", "hosts", "db"], true, "api is on backend too: db resolves"),
        ("h3", "db", &["getent", "hosts", "web"], false, "web is not on db's network: no name"),
    ];
    for (host, name, cmd, expect, why) in names {
        let mut args = vec!["container", "exec", name, "--"];
        args.extend(cmd);
        println!("$ overlay {}", args.join(" "));
        let out = c.cli_on(host, &args);
        for line in String::from_utf8_lossy(&out.stdout).lines().take(2) {
            println!("  {line}");
        }
        let resolved = out.status.success();
        ok &= resolved == expect;
        let verdict = if resolved == expect { "as expected" } else { "UNEXPECTED" };
        println!("  -> {} {verdict}: {why}", if resolved { "resolved" } else { "not resolved" });
    }

    step("overlay network inspect frontend");
    show(&c, &["network", "inspect", "frontend"]);

    step("Datapath counters (overlay-agent stats, read from each host's pinned maps)");
    for h in &c.topo.hosts {
        println!("  -- {} --", h.name);
        let out = try_sh(Command::new(binary("overlay-agent")).args(["stats", "--pin-dir"]).arg(&h.pin_dir));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("  {line}");
        }
    }
    println!("\n  While a host runs, bpftool shows the same maps with named fields, e.g.:");
    println!("    bpftool map dump pinned {}/ENDPOINTS", c.topo.host("h1").pin_dir.display());

    step("Cleaning up: agents, etcd, namespaces, pins");
    drop(c);
    println!("  done in {:.1} s", started.elapsed().as_secs_f64());
    if ok {
        println!("\nEvery container reached its networks and nothing else.");
        ExitCode::SUCCESS
    } else {
        println!("\nSome reachability did not match what the networks say (see UNEXPECTED above).");
        ExitCode::FAILURE
    }
}

pub(crate) fn step(what: &str) {
    println!("\n==> {what}");
}

/// Runs `overlay <args>` on h1, printing the command and its output; stops the demo if it fails.
fn show(c: &Cluster, args: &[&str]) {
    println!("$ overlay {}", args.join(" "));
    let out = c.cli(args);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        panic!("overlay {} failed", args.join(" "));
    }
}

/// Whether container `name` on `host` gets an answer from `ip` (a few tries: a host learns of
/// a new container one watch event after it is made).
fn ping(c: &Cluster, host: &str, name: &str, ip: Ipv4Addr) -> bool {
    let ns = c.container_ns(host, name);
    (0..3).any(|_| try_sh(&mut in_ns(&ns, &["ping", "-c", "1", "-W", "1", &ip.to_string()])).status.success())
}
