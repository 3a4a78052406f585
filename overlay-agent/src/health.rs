//! The agent's health endpoint: `GET /healthz` answers 200 once the first full reconcile is done
//! (503 before), with a JSON body saying what the agent holds. For liveness/readiness probes of
//! whatever supervises the agent.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tracing::{info, warn};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Health {
    pub host: String,
    /// The first full reconcile is done: the datapath matches the desired state.
    pub ready: bool,
    pub xdp: bool,
    pub uplink: String,
    /// Entries in the endpoint map (local and remote).
    pub map_endpoints: usize,
    /// Unix time of the last reconcile pass.
    pub last_reconcile: u64,
    /// Keys that failed and wait for a retry.
    pub pending_retries: usize,
}

pub type Shared = Arc<Mutex<Health>>;

pub fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Serves `GET /healthz` on `addr` until the runtime ends.
pub async fn serve(addr: SocketAddr, health: Shared) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "health endpoint listening");
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { continue };
            let health = health.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let Ok(n) = conn.read(&mut buf).await else { return };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let (code, body) = if path == "/healthz" {
                    let h = health.lock().map(|h| h.clone()).unwrap_or_default();
                    let code = if h.ready { "200 OK" } else { "503 Service Unavailable" };
                    (code, serde_json::to_string(&h).unwrap_or_default())
                } else {
                    ("404 Not Found", "{}".to_owned())
                };
                let response = format!(
                    "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = conn.write_all(response.as_bytes()).await {
                    warn!(error = %e, "health response");
                }
            });
        }
    });
    Ok(())
}
