//! The broker registry (DESIGN.md "Broker"): every broker that has
//! reported to this console, kept in the store as a `Broker` object, and
//! sent to routers on the watch stream. Routers place queues and topics
//! over the registered brokers (rendezvous hashing), so an address stays
//! with its broker while that broker is away — its attaches are refused
//! rather than moved, which would strand its messages — until the broker
//! is retired: through `DELETE /api/v1/brokers/{id}`, or after
//! `--retire-brokers-after` without a report. Its addresses then move to
//! the other brokers at once on every router. A retired broker that
//! reports again is registered again, as a new one.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{blocking, ApiError, ApiResult, AppState, FRESH};
use crate::store::{Expect, StoreError};

/// The store keys of brokers start with this.
pub const PREFIX: &str = "Broker/";

/// The brokers known to be registered (saves a store read per report).
#[derive(Debug, Default, Clone)]
pub struct Registered(Arc<Mutex<HashSet<String>>>);

impl Registered {
    fn contains(&self, id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }
    fn insert(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
    }
    fn remove(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
    fn snapshot(&self) -> std::collections::BTreeSet<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The brokers the store holds (at start).
    ///
    /// # Errors
    /// The store failed.
    pub fn load(&self, store: &crate::store::Store) -> Result<(), StoreError> {
        let (_, items) = store.list(PREFIX, None, usize::MAX)?;
        for (k, _) in items {
            self.insert(&k[PREFIX.len()..]);
        }
        Ok(())
    }
}

/// Queues and topics are placed on a broker (a subscription lives with
/// its topic).
fn placed_type(v: &Value) -> bool {
    matches!(v["spec"]["type"].as_str(), Some("queue" | "topic"))
}

/// Places a queue or topic being written, unless `spec.broker` pins it:
/// on the broker `old` (the object it replaces) was on while that broker
/// is registered, else by rendezvous hashing over the registered brokers.
pub(crate) fn place_address(state: &AppState, object: &mut Value, old: Option<&Value>) {
    if !placed_type(object) || object["spec"]["broker"].is_string() {
        return;
    }
    let registered = state.registered.snapshot();
    let kept = old
        .and_then(|o| o["status"]["broker"].as_str())
        .filter(|b| registered.contains(*b))
        .map(str::to_string);
    let space = object["spec"]["addressSpace"].as_str().unwrap_or("");
    let address = object["spec"]["address"].as_str().unwrap_or("");
    let broker = kept.or_else(|| flotilla_core::placement::place(space, address, &registered));
    if let Some(b) = broker {
        object["status"]["broker"] = Value::String(b);
    }
}

/// Places again every queue and topic that `moves` selects (by its
/// current `status.broker`), over the registered brokers; each change
/// reaches the routers on the watch stream.
async fn replace_where(state: &AppState, moves: impl Fn(Option<&str>) -> bool + Send + 'static) {
    let store = state.store.clone();
    let listed = blocking(move || {
        store.list_where("Address/", None, usize::MAX, |v| {
            placed_type(v)
                && !v["spec"]["broker"].is_string()
                && moves(v["status"]["broker"].as_str())
        })
    })
    .await;
    let Ok((_, items)) = listed else {
        return;
    };
    for (key, mut v) in items {
        let was = v["status"]["broker"].as_str().map(str::to_string);
        if let Some(s) = v["status"].as_object_mut() {
            s.remove("broker");
        }
        place_address(state, &mut v, None);
        let now = v["status"]["broker"].as_str().map(str::to_string);
        if now == was {
            continue;
        }
        let rv = v["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse::<u64>().ok());
        let (store, k) = (state.store.clone(), key.clone());
        // A concurrent change wins: it was placed as it was written.
        if blocking(move || store.put(&k, v, Expect::Any(rv)))
            .await
            .is_ok()
        {
            info!(address = %key, from = was.as_deref().unwrap_or("-"), to = now.as_deref().unwrap_or("-"), "address placed");
        }
    }
}

/// A broker id fit for the registry (a container id: no `/`, not empty).
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 253 && !id.contains('/') && !id.chars().any(char::is_control)
}

/// Registers broker `id` on its report, if it is not yet.
pub(crate) async fn on_report(state: &AppState, id: &str) {
    if state.registered.contains(id) || !valid_id(id) {
        return;
    }
    let object = json!({
        "apiVersion": flotilla_core::resources::API_VERSION,
        "kind": "Broker",
        "metadata": {"name": id},
        "spec": {},
    });
    let (store, key) = (state.store.clone(), format!("{PREFIX}{id}"));
    match blocking(move || store.put(&key, object, Expect::Absent)).await {
        Ok(_) => {
            info!(broker = id, "broker registered");
            state.registered.insert(id);
            // Queues and topics made while there was no broker.
            replace_where(state, |b| b.is_none()).await;
            return;
        }
        Err(e) if e.code() == StatusCode::CONFLICT => {}
        Err(e) => return warn!(broker = id, error = %e, "cannot register broker"),
    }
    state.registered.insert(id);
}

/// How long since broker `id` last reported (`None`: not since this
/// console started).
fn away(state: &AppState, id: &str) -> Option<Duration> {
    let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    live.last_report(&format!("broker/{id}"))
        .map(|at| at.elapsed())
}

/// A registry object with its live status.
fn with_status(state: &AppState, mut v: Value) -> Value {
    let id = v["metadata"]["name"].as_str().unwrap_or("").to_string();
    let status = match away(state, &id) {
        Some(d) if d < FRESH => json!({"phase": "Ready", "lastReportSecondsAgo": d.as_secs()}),
        Some(d) => json!({"phase": "Away", "lastReportSecondsAgo": d.as_secs()}),
        None => json!({"phase": "Away", "message": "no report since the console started"}),
    };
    v["status"] = status;
    v
}

/// `GET /api/v1/brokers`: the registered brokers and whether each reports.
#[utoipa::path(get, path = "/api/v1/brokers", responses((status = 200, description = "registered brokers with status.phase Ready or Away", body = Object), (status = 401, description = "no or wrong admin token")))]
pub(crate) async fn list(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let store = state.store.clone();
    let (rv, items) = blocking(move || store.list(PREFIX, None, usize::MAX)).await?;
    let items: Vec<Value> = items
        .into_iter()
        .map(|(_, v)| with_status(&state, v))
        .collect();
    Ok(Json(json!({
        "apiVersion": flotilla_core::resources::API_VERSION,
        "kind": "BrokerList",
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })))
}

/// `GET /api/v1/brokers/{id}`.
#[utoipa::path(get, path = "/api/v1/brokers/{id}", params(("id" = String, Path)), responses((status = 200, description = "the broker", body = Object), (status = 404, description = "not registered"), (status = 401, description = "no or wrong admin token")))]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let (store, key) = (state.store.clone(), format!("{PREFIX}{id}"));
    match blocking(move || store.get(&key)).await? {
        Some(v) => Ok(Json(with_status(&state, v))),
        None => Err(StoreError::NotFound(format!("broker {id:?}")).into()),
    }
}

/// `DELETE /api/v1/brokers/{id}`: retires a broker that is gone for good;
/// routers place its queues and topics on the other brokers. A broker
/// that still reports is not retired (409): stop it first.
#[utoipa::path(delete, path = "/api/v1/brokers/{id}", params(("id" = String, Path)), responses((status = 200, description = "retired", body = Object), (status = 404, description = "not registered"), (status = 409, description = "the broker is running"), (status = 401, description = "no or wrong admin token")))]
pub(crate) async fn retire(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    if away(&state, &id).is_some_and(|d| d < FRESH) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "broker {id:?} is running (it reported within {} s): stop it before retiring it",
                FRESH.as_secs()
            ),
        ));
    }
    let gone = remove(&state, &id).await?;
    info!(broker = %id, "broker retired through the API: its addresses move to the other brokers");
    Ok(Json(gone))
}

async fn remove(state: &AppState, id: &str) -> ApiResult<Value> {
    let (store, key) = (state.store.clone(), format!("{PREFIX}{id}"));
    let gone = blocking(move || store.delete(&[key]))
        .await
        .map_err(|e| match e.code() {
            StatusCode::NOT_FOUND => StoreError::NotFound(format!("broker {id:?}")).into(),
            _ => e,
        })?;
    state.registered.remove(id);
    let id = id.to_string();
    replace_where(state, move |b| b == Some(id.as_str())).await;
    Ok(gone)
}

/// Retires brokers that have not reported for `after` (counted from the
/// console's start for brokers silent since then).
pub async fn retire_away(state: AppState, after: Duration, shutdown: CancellationToken) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(after));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let store = state.store.clone();
        let Ok((_, items)) = blocking(move || store.list(PREFIX, None, usize::MAX)).await else {
            continue;
        };
        for (_, v) in items {
            let Some(id) = v["metadata"]["name"].as_str() else {
                continue;
            };
            let silent = away(&state, id).unwrap_or_else(|| started.elapsed());
            if silent > after && remove(&state, id).await.is_ok() {
                info!(broker = id, away_s = silent.as_secs(), "broker retired: no report for longer than --retire-brokers-after; its addresses move to the other brokers");
            }
        }
    }
}
