//! flotilla-console: the control plane (DESIGN.md "Control plane"). A REST
//! API under `/api/v1` for address spaces, addresses and users in the
//! Kubernetes resource shape, kept in an embedded store in the data
//! directory, and a watch stream (`/api/v1/watch`, NDJSON) that routers
//! and brokers started with `--console URL` follow.
//!
//! Every API call needs the admin token (`Authorization: Bearer TOKEN`).
//! On first start the console makes one and writes it to
//! `DATA_DIR/admin-token` (readable only by its owner); the token itself is
//! never logged.
//!
//! # Layout
//!
//! - [`store`]: the resources and the change log (redb).
//! - [`api`]: the HTTP handlers and the watch stream.
//! - [`brokers`]: the broker registry routers place queues and topics over.

#![forbid(unsafe_code)]

pub mod access;
pub mod api;
pub mod brokers;
pub mod history;
pub mod index;
pub mod kube_store;
mod messages;
pub mod store;
mod views;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Everything the console needs to start.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The admin token (FLOTILLA_ADMIN_TOKEN); else the one in
    /// `DATA_DIR/admin-token`, made on first start.
    pub admin_token: Option<String>,
    /// Retire brokers that have not reported for this long.
    pub retire_brokers_after: Option<std::time::Duration>,
    /// Where address spaces, addresses, users and brokers are kept.
    pub store: StoreKind,
    /// An OIDC provider whose tokens the API takes (with console roles).
    pub oidc: Option<access::ConsoleOidc>,
}

/// The console's store (`--store`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreKind {
    /// redb in the data directory.
    #[default]
    Embedded,
    /// The custom resources (and broker ConfigMaps) of this namespace,
    /// through the Kubernetes API (in-cluster account or kubeconfig).
    Kubernetes { namespace: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("data directory {dir}: {source}")]
    DataDir { dir: String, source: std::io::Error },
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("--store kubernetes: {0}")]
    Kubernetes(String),
}

/// The admin token in `dir/admin-token`, made on first start.
///
/// # Errors
/// The file cannot be read or written.
pub fn admin_token(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    use rand::RngCore as _;
    let mut b = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut b);
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    flotilla_core::auth::write_private(&path, &token)?;
    info!(file = %path.display(), "made the admin token");
    Ok(token)
}

/// A console ready to serve.
pub struct Console {
    listener: tokio::net::TcpListener,
    pub local_addr: SocketAddr,
    app: axum::Router,
    state: api::AppState,
    /// Where the admin token is kept (`None`: it came from the environment).
    pub token_file: Option<PathBuf>,
    retire_brokers_after: Option<std::time::Duration>,
    /// Stops what follows the Kubernetes API when the console stops.
    stop: CancellationToken,
}

impl Console {
    /// Opens the store, makes the token if needed, binds.
    ///
    /// # Errors
    /// The data directory or store cannot be opened, or the port bound.
    pub async fn bind(cfg: ConsoleConfig) -> Result<Console, ConsoleError> {
        let dir_err = |source| ConsoleError::DataDir {
            dir: cfg.data_dir.display().to_string(),
            source,
        };
        let stop = CancellationToken::new();
        // On Kubernetes the token comes from a Secret and the store is the
        // API server: no data directory (the root file system may be
        // read-only).
        let on_kubernetes = matches!(cfg.store, StoreKind::Kubernetes { .. });
        if on_kubernetes && cfg.admin_token.is_none() {
            return Err(ConsoleError::Kubernetes(
                "give the admin token as FLOTILLA_ADMIN_TOKEN (from a Secret)".into(),
            ));
        }
        if !on_kubernetes {
            flotilla_core::auth::private_dir(&cfg.data_dir).map_err(dir_err)?;
        }
        let (token, token_file) = match &cfg.admin_token {
            Some(t) => (t.clone(), None),
            None => (
                admin_token(&cfg.data_dir).map_err(dir_err)?,
                Some(cfg.data_dir.join("admin-token")),
            ),
        };
        let store = match &cfg.store {
            StoreKind::Embedded => {
                let db = cfg.data_dir.join("store.redb");
                tokio::task::spawn_blocking(move || store::Store::open(&db))
                    .await
                    .map_err(|e| ConsoleError::Store(store::StoreError::Db(e.to_string())))??
            }
            StoreKind::Kubernetes { namespace } => {
                let client = kube::Client::try_default()
                    .await
                    .map_err(|e| ConsoleError::Kubernetes(e.to_string()))?;
                let k =
                    kube_store::KubeStore::start(client, namespace.clone(), stop.clone()).await?;
                store::Store::kubernetes(k)
            }
        };
        let mut state = api::AppState::new(store, token)?;
        state.oidc = cfg
            .oidc
            .clone()
            .map(|o| std::sync::Arc::new(access::Provider::new(o)));
        state.registered.load(&state.store)?;
        let app = api::routes(state.clone());
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ConsoleError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ConsoleError::Bind {
            addr: cfg.listen,
            source,
        })?;
        Ok(Console {
            listener,
            local_addr,
            app,
            state,
            token_file,
            retire_brokers_after: cfg.retire_brokers_after,
            stop,
        })
    }

    /// Applies the resources of a config file (YAML, one or more
    /// documents): each is created, or replaced if it exists. Returns how
    /// many.
    ///
    /// # Errors
    /// A document does not parse or a resource is refused.
    pub async fn apply_yaml(&self, text: &str) -> Result<usize, String> {
        use serde::Deserialize as _;
        let mut n = 0;
        for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let v = serde_json::Value::deserialize(de)
                .map_err(|e| format!("document {}: {e}", i + 1))?;
            if v.is_null() {
                continue;
            }
            api::apply(&self.state, v)
                .await
                .map_err(|e| format!("document {}: {e}", i + 1))?;
            n += 1;
        }
        Ok(n)
    }

    /// Serves until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) {
        info!(proto = "http", addr = %self.local_addr, "listening");
        tokio::spawn(history::keep(self.state.clone(), shutdown.clone()));
        if let Some(after) = self.retire_brokers_after {
            tokio::spawn(brokers::retire_away(
                self.state.clone(),
                after,
                shutdown.clone(),
            ));
        }
        let _ = axum::serve(self.listener, self.app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        self.stop.cancel();
        info!("stopped");
    }
}

/// Binds and serves: the entry point the `flotilla` binary calls.
///
/// # Errors
/// See [`Console::bind`].
pub async fn run(cfg: ConsoleConfig, shutdown: CancellationToken) -> Result<(), ConsoleError> {
    Console::bind(cfg).await?.serve(shutdown).await;
    Ok(())
}
