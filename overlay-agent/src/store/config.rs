//! How to reach the store: etcd endpoints, TLS files and the key prefix, as a plain struct and
//! as clap arguments (with their environment variables) that the CLI and the agent share.

use std::{path::PathBuf, time::Duration};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use super::{StoreError, keys::DEFAULT_PREFIX};

#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Client URLs (http://host:port, or https:// with TLS).
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Most time one request may take before the store reports etcd unreachable.
    pub request_timeout: Duration,
}

impl StoreConfig {
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            cacert: None,
            cert: None,
            key: None,
            request_timeout: Duration::from_secs(5),
        }
    }

    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    pub(super) fn connect_options(&self) -> Result<ConnectOptions, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            // HTTP/2 pings notice a silently dead connection (a partition, a hung server) that no
            // TCP error would report, so a watch is re-established instead of waiting forever.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if self.cacert.is_none() && self.cert.is_none() && self.key.is_none() {
            return Ok(options);
        }
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|error| StoreError::Tls { path: path.display().to_string(), error })
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &self.cacert {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?)),
            (None, None) => {}
            _ => {
                return Err(StoreError::Config(
                    "--etcd-cert and --etcd-key go together: give both or neither".into(),
                ));
            }
        }
        if let Some(plain) = self.endpoints.iter().find(|e| e.starts_with("http://")) {
            return Err(StoreError::Config(format!(
                "TLS files are given but endpoint {plain} is http://; use https://"
            )));
        }
        options = options.with_tls(tls);
        Ok(options)
    }
}

/// The store's command-line arguments, for `#[command(flatten)]`.
#[derive(Clone, Debug, clap::Args)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated.
    #[arg(
        long = "etcd-endpoints",
        env = "OVERLAY_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        global = true,
        help_heading = "Store"
    )]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long, env = "OVERLAY_ETCD_CACERT", global = true, help_heading = "Store")]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM), for etcd's client-certificate authentication.
    #[arg(long, env = "OVERLAY_ETCD_CERT", global = true, help_heading = "Store")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "OVERLAY_ETCD_KEY", global = true, help_heading = "Store")]
    pub etcd_key: Option<PathBuf>,
    /// Key prefix the overlay's state lives under.
    #[arg(long, env = "OVERLAY_PREFIX", default_value = DEFAULT_PREFIX, global = true, help_heading = "Store")]
    pub prefix: String,
}

impl EtcdArgs {
    pub fn config(&self) -> StoreConfig {
        StoreConfig {
            cacert: self.etcd_cacert.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            ..StoreConfig::new(self.etcd_endpoints.iter().map(|e| e.trim().to_owned()))
                .with_prefix(&self.prefix)
        }
    }
}
