//! The plugin's HTTP server: Docker's remote driver calls (all `POST /<Api>.<Method>` with a JSON
//! body) on a unix socket in the engine's plugin directory, served by axum. Every failure is
//! answered as `{"Err": "..."}`, which dockerd shows to the user; a body that does not parse is
//! refused before anything is looked at or changed.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::post,
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixListener;
use tracing::{info, warn};

use super::{
    endpoint::{self, Created},
    ipam::{self, Ranges},
    network::{self, DockerNetworks},
    types::{
        Activate, AddressSpaces, CONTENT_TYPE, Capabilities, CreateEndpoint, CreateNetwork, DeleteNetwork,
        Empty, EndpointRef, ErrorBody, IpamCapabilities, Join, OperInfo, ProgramExternalConnectivity,
        ReleaseAddress, ReleasePool, RequestAddress, RequestPool,
    },
};
use crate::store::{Store, StoreConfig};

/// What the handlers share.
pub struct Plugin {
    pub store: Store,
    /// This agent's host: the holder of the addresses its engine reserves.
    pub host: String,
    pub networks: DockerNetworks,
    pub ranges: Ranges,
    /// Endpoints created and not yet joined.
    pub created: Created,
}

/// The routes Docker calls.
pub fn router(plugin: Arc<Plugin>) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/NetworkDriver.GetCapabilities", post(capabilities))
        .route("/NetworkDriver.CreateNetwork", post(create_network))
        .route("/NetworkDriver.DeleteNetwork", post(delete_network))
        .route("/NetworkDriver.CreateEndpoint", post(create_endpoint))
        .route("/NetworkDriver.Join", post(join))
        .route("/NetworkDriver.Leave", post(leave))
        .route("/NetworkDriver.DeleteEndpoint", post(delete_endpoint))
        .route("/NetworkDriver.EndpointOperInfo", post(oper_info))
        .route("/NetworkDriver.ProgramExternalConnectivity", post(program_external))
        .route("/NetworkDriver.RevokeExternalConnectivity", post(revoke_external))
        // Sent only to drivers of global scope; answered all the same.
        .route("/NetworkDriver.DiscoverNew", post(discover))
        .route("/NetworkDriver.DiscoverDelete", post(discover))
        .route("/IpamDriver.GetCapabilities", post(ipam_capabilities))
        .route("/IpamDriver.GetDefaultAddressSpaces", post(address_spaces))
        .route("/IpamDriver.RequestPool", post(request_pool))
        .route("/IpamDriver.ReleasePool", post(release_pool))
        .route("/IpamDriver.RequestAddress", post(request_address))
        .route("/IpamDriver.ReleaseAddress", post(release_address))
        .fallback(unknown)
        .with_state(plugin)
}

/// Serves Docker's calls on a unix socket at `path` until the task is dropped: connects to the
/// store first (trying again every second, so an agent started before etcd still comes up),
/// then binds the socket, replacing one an earlier agent left there. Docker finds the plugin
/// only once the socket exists, so no call arrives before the store can answer it.
pub async fn serve(
    path: PathBuf,
    config: StoreConfig,
    host: String,
    state_dir: PathBuf,
) -> anyhow::Result<()> {
    let networks = DockerNetworks::load(&state_dir)?;
    let store = loop {
        match Store::connect(&config).await {
            Ok(store) => break store,
            Err(e) => {
                warn!(error = %e, "Docker plugin: cannot reach the store yet; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    };
    let listener = bind(&path)?;
    info!(socket = %path.display(), "serving Docker's remote network driver API");
    let plugin =
        Arc::new(Plugin { store, host, networks, ranges: Ranges::default(), created: Created::default() });
    axum::serve(listener, router(plugin)).await.context("Docker plugin server")
}

/// Binds the socket (making its directory), replacing a stale socket of a previous agent.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the old socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))
}

/// Parses a request body, or says what is wrong with it (answered with 400 and `{"Err"}`).
fn decode<T: DeserializeOwned>(call: &str, body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| {
        warn!(call, error = %e, "bad request body from Docker");
        format!("{call}: bad request body: {e}")
    })
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned());
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

fn error(status: StatusCode, err: String) -> Response {
    json(status, &ErrorBody { err })
}

/// A handler's result as Docker reads it: 200 with the answer, or 500 with `{"Err"}`.
fn reply<T: Serialize>(call: &str, result: Result<T, String>) -> Response {
    match result {
        Ok(value) => json(StatusCode::OK, &value),
        Err(err) => {
            warn!(call, error = %err, "refused a Docker call");
            error(StatusCode::INTERNAL_SERVER_ERROR, err)
        }
    }
}

async fn activate() -> Response {
    json(StatusCode::OK, &Activate { implements: vec!["NetworkDriver", "IpamDriver"] })
}

async fn capabilities() -> Response {
    json(StatusCode::OK, &Capabilities { scope: "local" })
}

async fn create_network(State(p): State<Arc<Plugin>>, body: Bytes) -> Response {
    let req: CreateNetwork = match decode("CreateNetwork", &body) {
        Ok(req) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    reply("CreateNetwork", network::create(&p.store, &p.networks, &p.ranges, &req).await.map(|()| Empty {}))
}

async fn delete_network(State(p): State<Arc<Plugin>>, body: Bytes) -> Response {
    let req: DeleteNetwork = match decode("DeleteNetwork", &body) {
        Ok(req) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    reply("DeleteNetwork", network::delete(&p.networks, &req).map(|()| Empty {}))
}

async fn create_endpoint(State(p): State<Arc<Plugin>>, body: Bytes) -> Response {
    match decode::<CreateEndpoint>("CreateEndpoint", &body) {
        Ok(req) => {
            reply("CreateEndpoint", endpoint::create(&p.store, &p.networks, &p.host, &p.created, &req).await)
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn join(State(p): State<Arc<Plugin>>, body: Bytes) -> Response {
    match decode::<Join>("Join", &body) {
        Ok(req) => reply("Join", endpoint::join(&p.store, &p.networks, &p.host, &p.created, &req).await),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn leave(State(p): State<Arc<Plugin>>, body: Bytes) -> Response {
    match decode::<EndpointRef>("Leave", &body) {
        Ok(req) => reply("Leave", endpoint::leave(&p.store, &p.networks, &req).await.map(|()| Empty {})),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn delete_endpoint(State(p): State<Arc<Plugin>>, body: Bytes) -> Response {
    match decode::<EndpointRef>("DeleteEndpoint", &body) {
        Ok(req) => reply(
            "DeleteEndpoint",
            endpoint::delete(&p.store, &p.networks, &p.created, &req).await.map(|()| Empty {}),
        ),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn oper_info(body: Bytes) -> Response {
    // Nothing beyond what Docker knows already (address, MAC) to show.
    match decode::<EndpointRef>("EndpointOperInfo", &body) {
        Ok(_) => json(StatusCode::OK, &OperInfo { value: std::collections::BTreeMap::new() }),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn program_external(body: Bytes) -> Response {
    match decode::<ProgramExternalConnectivity>("ProgramExternalConnectivity", &body) {
        Ok(req) => reply("ProgramExternalConnectivity", endpoint::program_external(&req).map(|()| Empty {})),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn revoke_external(body: Bytes) -> Response {
    match decode::<EndpointRef>("RevokeExternalConnectivity", &body) {
        Ok(_) => json(StatusCode::OK, &Empty {}),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn discover() -> Response {
    json(StatusCode::OK, &Empty {})
}

async fn ipam_capabilities() -> Response {
    // No MAC needed: the overlay derives it from the address, as the CLI's endpoints do.
    json(StatusCode::OK, &IpamCapabilities { requires_mac_address: false, requires_request_replay: false })
}

async fn address_spaces() -> Response {
    json(StatusCode::OK, &AddressSpaces { local: ipam::ADDRESS_SPACE, global: ipam::ADDRESS_SPACE })
}

async fn request_pool(State(p): State<Arc<Plugin>>, body: Bytes) -> Response {
    match decode::<RequestPool>("RequestPool", &body) {
        Ok(req) => reply("RequestPool", ipam::request_pool(&p.ranges, &req)),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn release_pool(body: Bytes) -> Response {
    // Nothing is held per pool: the network's addresses live with the network in etcd.
    match decode::<ReleasePool>("ReleasePool", &body).and_then(|r| ipam::parse_pool_id(&r.pool_id)) {
        Ok(_) => json(StatusCode::OK, &Empty {}),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn request_address(State(p): State<Arc<Plugin>>, body: Bytes) -> Response {
    match decode::<RequestAddress>("RequestAddress", &body) {
        Ok(req) => reply("RequestAddress", ipam::request_address(&p.store, &p.host, &req).await),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn release_address(State(p): State<Arc<Plugin>>, body: Bytes) -> Response {
    match decode::<ReleaseAddress>("ReleaseAddress", &body) {
        Ok(req) => {
            reply("ReleaseAddress", ipam::release_address(&p.store, &p.host, &req).await.map(|()| Empty {}))
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn unknown(uri: Uri) -> Response {
    error(StatusCode::NOT_FOUND, format!("{} is not implemented by this plugin", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(resp: Response) -> (StatusCode, String, serde_json::Value) {
        let status = resp.status();
        let ctype = resp.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, ctype, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_bad_body_is_answered_with_err() {
        for bad in ["", "{", "[]", r#"{"IPv4Data": []}"#, r#"{"NetworkID": 7}"#] {
            // What the CreateNetwork handler answers, before it looks at anything.
            let e = decode::<CreateNetwork>("CreateNetwork", &Bytes::from(bad)).unwrap_err();
            let resp = error(StatusCode::BAD_REQUEST, e);
            let (status, ctype, json) = body_of(resp).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert_eq!(ctype, CONTENT_TYPE);
            let err = json["Err"].as_str().unwrap();
            assert!(err.starts_with("CreateNetwork: bad request body: "), "{bad:?}: {err}");
        }
        assert!(decode::<DeleteNetwork>("DeleteNetwork", &Bytes::from(r#"{"NetworkID": "x"}"#)).is_ok());
    }

    #[tokio::test]
    async fn activation_capabilities_and_unknown_calls() {
        let (status, _, json) = body_of(activate().await).await;
        assert_eq!(
            (status, json),
            (StatusCode::OK, serde_json::json!({"Implements": ["NetworkDriver", "IpamDriver"]}))
        );
        let (_, _, json) = body_of(capabilities().await).await;
        assert_eq!(json, serde_json::json!({"Scope": "local"}));
        let (status, _, json) = body_of(unknown("/NetworkDriver.DiscoverNew".parse().unwrap()).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json["Err"], "/NetworkDriver.DiscoverNew is not implemented by this plugin");
        let (status, _, json) = body_of(reply::<Empty>("CreateNetwork", Err("no".into()))).await;
        assert_eq!((status, json), (StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({"Err": "no"})));
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_nothing_else() {
        let dir = std::env::temp_dir().join(format!("overlay-docker-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sock = dir.join("plugins/overlay-ebpf.sock");
        drop(bind(&sock).unwrap());
        // The socket file outlives its listener, as after an agent crash.
        assert!(sock.exists());
        drop(bind(&sock).unwrap());
        let file = dir.join("plugins/not-a-socket.sock");
        std::fs::write(&file, "x").unwrap();
        assert!(bind(&file).unwrap_err().to_string().contains("is not a socket"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
