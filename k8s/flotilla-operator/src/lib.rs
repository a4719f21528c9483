//! flotilla-operator: runs Flotilla on Kubernetes. It watches `Flotilla`
//! resources and makes each one's routers, brokers, MQTT gateways,
//! last-will service and console, with their services, secrets,
//! disruption budgets, network policy and autoscaler; it reports in the
//! resource's status what is ready and what is wrong.
//!
//! # Layout
//!
//! - [`render`]: a Flotilla into the objects to apply (no I/O).
//! - [`secrets`]: the generated mesh secret, admin token, CA and
//!   certificate.
//! - [`reconcile`]: applying them (server-side apply, field manager
//!   `flotilla-operator`), pruning what is no longer wanted, the status,
//!   and the finalizer that lets routers drain before the rest goes.

#![forbid(unsafe_code)]

pub mod reconcile;
pub mod render;
pub mod secrets;

use std::sync::Arc;

use futures_util::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use flotilla_core::crd::Flotilla;

/// The field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "flotilla-operator";
/// The finalizer on Flotilla resources: routers drain before the rest is
/// deleted.
pub const FINALIZER: &str = "flotilla.dev/drain";

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificates: {0}")]
    Certs(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    /// The image components run unless a Flotilla names its own.
    pub image: String,
    /// Each object as the operator's last apply left it
    /// (`NAMESPACE/KIND/NAME` → generation or resource version): one that
    /// moved since was changed by someone else, and is applied again.
    applied: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl Context {
    pub fn new(client: Client, image: String) -> Context {
        Context {
            client,
            image,
            applied: Default::default(),
        }
    }

    pub(crate) fn left(&self, key: &str) -> Option<String> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Forgets the marks of objects of `namespace` that `gone` picks.
    pub(crate) fn forget(&self, namespace: &str, gone: impl Fn(&str) -> bool) {
        let prefix = format!("{namespace}/");
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !(k.starts_with(&prefix) && gone(&k[prefix.len()..])));
    }

    pub(crate) fn record(&self, key: String, mark: String) {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, mark);
    }
}

/// A client for the cluster the operator runs in (or the kubeconfig's).
///
/// # Errors
/// No in-cluster service account and no kubeconfig.
pub async fn connect() -> Result<Client, kube::Error> {
    Client::try_default().await
}

/// The API server's version (`v1.33.1`): proves it answers.
///
/// # Errors
/// It does not.
pub async fn api_version(client: &Client) -> Result<String, kube::Error> {
    Ok(client.apiserver_version().await?.git_version)
}

/// Runs the controller until `shutdown`.
pub async fn run(client: Client, image: String, shutdown: CancellationToken) {
    let ctx = Arc::new(Context::new(client.clone(), image));
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=flotilla-operator");
    let controller = Controller::new(
        Api::<Flotilla>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<k8s_openapi::api::apps::v1::StatefulSet>::all(client.clone()),
        owned.clone(),
    )
    .owns(
        Api::<k8s_openapi::api::apps::v1::Deployment>::all(client.clone()),
        owned,
    )
    .graceful_shutdown_on(async move { shutdown.cancelled().await })
    .run(reconcile::reconcile, error_policy, ctx)
    .for_each(|r| async move {
        match r {
            Ok((o, _)) => {
                tracing::debug!(flotilla = %o.name, namespace = ?o.namespace, "reconciled")
            }
            Err(e) => warn!(error = %e, "reconcile failed"),
        }
    });
    info!("operator running");
    controller.await;
    info!("operator stopped");
}

fn error_policy(_f: Arc<Flotilla>, e: &Error, _ctx: Arc<Context>) -> Action {
    warn!(error = %e, "reconcile failed; again in 15 s");
    Action::requeue(std::time::Duration::from_secs(15))
}
