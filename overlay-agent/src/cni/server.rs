//! The agent's side of `overlay-cni`: one call, `POST /cni` with the invocation (the CNI_*
//! variables and the netconf, `types::Request`), on a unix socket (`--cni-socket`), served by
//! axum beside the agent's loop as the Docker plugin is. The answer is the JSON the plugin
//! prints: 200 with a result (or an empty body), or 400 with a CNI error.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use tracing::{info, warn};

use super::{
    commands::Cni,
    types::{CniError, Code, Request},
};
use crate::{
    sandbox::Forbidden,
    store::{Store, StoreConfig},
};

/// The routes the plugin calls.
pub fn router(cni: Arc<Cni>) -> Router {
    Router::new().route("/cni", post(call)).with_state(cni)
}

/// Serves the plugin on a unix socket at `path` until the task is dropped: connects to the store
/// first (trying again every second), then binds the socket, replacing one an earlier agent
/// left. Until then the plugin finds no socket and answers "try again later" (code 11).
pub async fn serve(path: PathBuf, config: StoreConfig, host: String) -> anyhow::Result<()> {
    let store = loop {
        match Store::connect(&config).await {
            Ok(store) => break store,
            Err(e) => {
                warn!(error = %e, "CNI: cannot reach the store yet; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    };
    let listener = crate::docker::server::bind(&path)?;
    info!(socket = %path.display(), "serving the CNI plugin");
    let cni = Arc::new(Cni { store, host, forbidden: Forbidden::of_this_host() });
    axum::serve(listener, router(cni)).await.context("CNI server")
}

async fn call(State(cni): State<Arc<Cni>>, body: Bytes) -> Response {
    let req: Request = match serde_json::from_slice(&body) {
        Ok(req) => req,
        Err(e) => {
            let mut err = CniError::new(Code::Decode, format!("the plugin's request does not parse: {e}"));
            err.cni_version = "1.1.0".into();
            return json(StatusCode::BAD_REQUEST, &err);
        }
    };
    match cni.handle(&req).await {
        Ok(Some(result)) => json(StatusCode::OK, &result),
        Ok(None) => (StatusCode::OK, "").into_response(),
        Err(e) => json(StatusCode::BAD_REQUEST, &e),
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned());
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
