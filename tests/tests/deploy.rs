//! The Kubernetes deployment (`deploy/`): the manifest parses (PyYAML, a YAML parser that is not
//! ours) and has what the agent needs on a node, and every setting it gives the agent is one the
//! built agent takes. No cluster runs here; the runtime side is proved by the CRI suite.

use std::{path::Path, process::Command};

use overlay_tests::{binary, sh};
use serde_json::Value;

const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/overlay-ebpf.yaml");
const DOCKERFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/Dockerfile");

/// The manifest's documents, as JSON.
fn documents() -> Vec<Value> {
    let out = sh(Command::new("python3").args([
        "-c",
        "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        MANIFEST,
    ]));
    serde_json::from_str::<Vec<Value>>(&out).expect("the manifest as JSON")
}

fn find<'a>(items: &'a Value, name: &str) -> &'a Value {
    items
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no {name:?} in {items}"))
}

/// The host path of the volume a container mounts at `mount_path`, and the mount.
fn host_path<'a>(pod: &'a Value, container: &'a Value, mount_path: &str) -> (&'a str, &'a Value) {
    let mount = container["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == mount_path))
        .unwrap_or_else(|| panic!("{} mounts nothing at {mount_path}", container["name"]));
    let volume = find(&pod["volumes"], mount["name"].as_str().expect("volume name"));
    (volume["hostPath"]["path"].as_str().unwrap_or_default(), mount)
}

/// The value of env var `name` of `container` (None: given some other way, or not at all).
fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    &find(&container["env"], name)["value"]
}

#[test]
fn the_daemonset_has_what_a_node_needs() {
    let docs = documents();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "DaemonSet"]);
    let (config, ds) = (&docs[0], &docs[1]);
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "the agent works in the node's namespace");
    assert!(
        pod["tolerations"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["operator"] == "Exists" && t.get("key").is_none())),
        "a toleration of every taint, so it runs on every node: {}",
        pod["tolerations"]
    );
    assert!(pod["terminationGracePeriodSeconds"].as_u64().is_some_and(|s| s > 0));
    let agent = find(&pod["containers"], "agent");
    assert_eq!(agent["securityContext"]["privileged"], true);

    // The mounts: bpffs shared both ways (pins outlive the container), the runtimes' pod
    // namespaces as they appear, the socket directory.
    let (bpffs, m) = host_path(pod, agent, "/sys/fs/bpf");
    assert_eq!((bpffs, &m["mountPropagation"]), ("/sys/fs/bpf", &Value::from("Bidirectional")));
    let (netns, m) = host_path(pod, agent, "/run/netns");
    assert_eq!((netns, &m["mountPropagation"]), ("/run/netns", &Value::from("HostToContainer")));
    let socket = env(agent, "OVERLAY_CNI_SOCKET").as_str().expect("OVERLAY_CNI_SOCKET");
    let socket_dir = Path::new(socket).parent().and_then(Path::to_str).expect("socket dir");
    assert_eq!(host_path(pod, agent, socket_dir).0, socket_dir, "the plugin must see the socket");
    let state = env(agent, "OVERLAY_STATE_DIR").as_str().expect("OVERLAY_STATE_DIR");
    assert!(state.starts_with(socket_dir), "the state dir {state} is on the node");

    // The init container installs the binary and the conflist into the node's CNI dirs.
    let init = find(&pod["initContainers"], "install-cni");
    assert_eq!(host_path(pod, init, "/host/opt/cni/bin").0, "/opt/cni/bin");
    assert_eq!(host_path(pod, init, "/host/etc/cni/net.d").0, "/etc/cni/net.d");
    let script = init["command"].as_array().and_then(|c| c.last()).and_then(Value::as_str).expect("command");
    assert!(
        script.contains("/usr/local/bin/overlay-cni") && script.contains("/host/opt/cni/bin/overlay-cni")
    );
    assert!(
        script.contains("/etc/overlay-ebpf/50-overlay-ebpf.conflist")
            && script.contains("/host/etc/cni/net.d/")
    );
    assert_eq!(find(&pod["volumes"], "config")["configMap"]["name"], config["metadata"]["name"]);
    let conflist: Value =
        serde_json::from_str(config["data"]["50-overlay-ebpf.conflist"].as_str().expect("conflist"))
            .expect("JSON");
    assert_eq!(conflist["plugins"][0]["type"], "overlay-cni");
    assert_eq!(conflist["plugins"][0]["agentSocket"], socket, "the plugin and the agent meet");

    // etcd: endpoints from the ConfigMap, TLS from a Secret mounted where the env says.
    let endpoints = &find(&agent["env"], "OVERLAY_ETCD_ENDPOINTS")["valueFrom"]["configMapKeyRef"];
    assert!(config["data"][endpoints["key"].as_str().expect("key")].is_string());
    for var in ["OVERLAY_ETCD_CACERT", "OVERLAY_ETCD_CERT", "OVERLAY_ETCD_KEY"] {
        let file = env(agent, var).as_str().unwrap_or_else(|| panic!("{var}"));
        let dir = Path::new(file).parent().and_then(Path::to_str).expect("dir");
        let mount = agent["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["mountPath"] == dir))
            .expect("mount");
        assert!(
            find(&pod["volumes"], mount["name"].as_str().expect("name"))["secret"]["secretName"].is_string(),
            "{var}"
        );
    }
    // Who and where: the node's name and address, from the downward API.
    let from = |var: &str| find(&agent["env"], var)["valueFrom"]["fieldRef"]["fieldPath"].clone();
    assert_eq!(from("OVERLAY_HOST"), "spec.nodeName");
    assert_eq!(from("OVERLAY_VTEP"), "status.hostIP");

    // Probes on the agent's health address.
    let health = env(agent, "OVERLAY_HEALTH_ADDR").as_str().expect("OVERLAY_HEALTH_ADDR");
    let port: u64 = health.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(agent[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(agent[probe]["httpGet"]["port"], port, "{probe}");
    }

    // Every OVERLAY_* setting is one the agent takes (its `run --help` names the variable).
    let help = sh(Command::new(binary("overlay-agent")).args(["run", "--help"]));
    for var in agent["env"].as_array().expect("env").iter().filter_map(|e| e["name"].as_str()) {
        if var.starts_with("OVERLAY_") {
            assert!(help.contains(&format!("[env: {var}=")), "overlay-agent run does not take {var}");
        }
    }
    // The image runs what the manifest names.
    let dockerfile = std::fs::read_to_string(DOCKERFILE).expect("Dockerfile");
    assert!(dockerfile.contains("-p overlay-agent -p overlay-cni"), "the image builds both binaries");
    let copy = dockerfile.lines().find(|l| l.starts_with("COPY --from=build")).expect("COPY");
    assert!(
        copy.contains("overlay-cni") && copy.contains("overlay-agent") && copy.ends_with("/usr/local/bin/")
    );
    for c in [agent, init] {
        assert_eq!(c["image"], agent["image"], "one image for both containers");
    }
}
