//! `overlay-demo --docker`: the overlay driven by Docker. Two simulated hosts, each with its
//! agent serving Docker's remote network and IPAM driver API (`--docker-plugin`) and a real
//! dockerd (Debian's docker.io) of its own; the same `docker network create` on both makes one
//! overlay network, and containers started with `docker run` on different hosts reach each
//! other. Every command is printed with its real output.

use std::{process::ExitCode, time::Instant};

use overlay_tests::{
    cluster::Cluster,
    docker::{self, DRIVER, Dockerd, IMAGE},
    try_sh,
};

use crate::step;

pub fn demo(started: Instant) -> ExitCode {
    if let Some(why) = docker::missing() {
        eprintln!("overlay-demo --docker: {why}");
        return ExitCode::FAILURE;
    }
    step("Starting etcd and two hosts (h1, h2), each with its agent as Docker's plugin and a dockerd");
    let Some(c) = Cluster::start_with("dkdemo", 2, 10, |run, host| {
        vec!["--docker-plugin".to_owned(), docker::plugin_socket(run, host).to_string_lossy().into_owned()]
    }) else {
        eprintln!("etcd is missing: run ./setup");
        return ExitCode::FAILURE;
    };
    let rootfs = docker::busybox_rootfs(&c.topo.run).unwrap_or_else(|e| panic!("busybox rootfs: {e:#}"));
    let engines: Vec<Dockerd> = c
        .topo
        .hosts
        .iter()
        .map(|h| {
            let d = Dockerd::start(&c.topo.run, &h.name, &h.ns).unwrap_or_else(|e| panic!("{e:#}"));
            d.import_busybox(&rootfs).unwrap_or_else(|e| panic!("importing busybox on {}: {e:#}", h.name));
            d
        })
        .collect();
    let (h1, h2) = (&engines[0], &engines[1]);
    println!("  each agent: overlay-agent run ... --docker-plugin /run/docker/plugins/{DRIVER}.sock");
    println!("  the image: `docker import` of busybox-static, as {IMAGE}");

    step("The same network created on both hosts' Docker");
    let create =
        ["network", "create", "-d", DRIVER, "--ipam-driver", DRIVER, "--subnet", "10.0.9.0/24", "my-net"];
    show(h1, &create);
    show(h2, &create);
    println!("$ overlay network ls");
    print!("{}", c.ok(&["network", "ls"]));

    step("web on h1 (busybox httpd), then a container on h2 fetching from it across hosts");
    show(
        h1,
        &[
            "run",
            "-d",
            "--name",
            "web",
            "--net",
            "my-net",
            IMAGE,
            "sh",
            "-c",
            "mkdir -p /www && echo hello from web on h1 > /www/index.html && httpd -f -h /www",
        ],
    );
    let f = "{{(index .NetworkSettings.Networks \"my-net\").IPAddress}}";
    let web = show(h1, &["inspect", "-f", f, "web"]).trim().to_owned();
    show(h1, &["exec", "web", "ip", "addr", "show", "eth0"]);
    let fetched = show(h2, &["run", "--rm", "--net", "my-net", IMAGE, "wget", "-qO-", &web]);
    show(h2, &["run", "--rm", "--net", "my-net", IMAGE, "ping", "-c", "2", &web]);

    step("The overlay's view: Docker's containers are overlay containers (docker-<sandbox id>)");
    println!("$ overlay container ls");
    print!("{}", c.ok(&["container", "ls"]));

    step("docker rm -f web: its interface, address and keys go");
    show(h1, &["rm", "-f", "web"]);
    println!("$ overlay container ls");
    print!("{}", c.ok(&["container", "ls"]));

    step("Cleaning up: containers, dockerd, agents, etcd, namespaces, pins");
    drop(engines);
    drop(c);
    println!("  done in {:.1} s", started.elapsed().as_secs_f64());
    if fetched.contains("hello from web on h1") {
        println!("\nA container on h2 fetched a page from a container on h1, both started with docker run.");
        ExitCode::SUCCESS
    } else {
        println!("\nThe fetch across hosts did not return web's page (see above).");
        ExitCode::FAILURE
    }
}

/// Runs `docker <args>` against `d`, printing the command and its output; stops the demo if it
/// fails.
fn show(d: &Dockerd, args: &[&str]) -> String {
    let shown: Vec<String> =
        args.iter().map(|a| if a.contains(' ') { format!("'{a}'") } else { (*a).to_owned() }).collect();
    println!("{}$ docker {}", d.host, shown.join(" "));
    let out = try_sh(d.docker().args(args));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        panic!("docker {} failed on {}", args.join(" "), d.host);
    }
    stdout
}
