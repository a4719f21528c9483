//! A queue's messages, for a person looking after a dead-letter queue:
//! browse the first messages (headers, properties, the start of the
//! body), move them back to where they came from (retry), delete one,
//! or purge it.
//!
//! The console holds no messages: each request becomes a command for
//! every broker that reports (carried by the answer to its next report,
//! within a second), and each broker answers it (`POST /api/v1/answers`).
//! The broker that holds the queue answers with what it found; the request
//! waits for every broker's answer, at most [`WAIT`].

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{require_space, ApiError, ApiResult, AppState, Body};

/// How long a request waits for the brokers' answers.
const WAIT: Duration = Duration::from_secs(5);
/// The most messages one browse shows.
const MAX_BROWSE: u64 = 1000;

/// Sends `command` (with a fresh id) to every broker that reports and
/// gathers their answers: `(broker, result)` for each that answered in
/// time.
async fn ask(state: &AppState, mut command: Value) -> ApiResult<Vec<(String, Value)>> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (id, brokers) = {
        let mut live = state.live.lock().unwrap_or_else(|p| p.into_inner());
        let brokers = live.brokers()?;
        let id = live.next_answer();
        command["id"] = json!(id);
        live.answers.insert(id, tx);
        for b in &brokers {
            live.commands
                .entry(b.clone())
                .or_default()
                .push(json!({ "inspect": command }));
        }
        (id, brokers)
    };
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < brokers.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(a)) => got.push(a),
            _ => break,
        }
    }
    state
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .answers
        .remove(&id);
    Ok(got)
}

/// The answers of the brokers that hold the queue; 404 if none does
/// (or none answered).
fn holders(address: &str, answers: Vec<(String, Value)>) -> ApiResult<Vec<(String, Value)>> {
    let found: Vec<_> = answers
        .into_iter()
        .filter(|(_, r)| r["found"] == true)
        .collect();
    if found.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no broker holds queue {address:?} (or none answered within {WAIT:?})"),
        ));
    }
    Ok(found)
}

#[derive(Debug, Deserialize)]
pub(crate) struct BrowseQuery {
    limit: Option<u64>,
}

/// `GET …/queues/{address}/messages?limit=N`: the first N messages (50 by
/// default) waiting in the queue, oldest first.
#[utoipa::path(get, path = "/api/v1/addressspaces/{space}/queues/{address}/messages", params(("space" = String, Path), ("address" = String, Path), ("limit" = Option<u64>, Query)), responses((status = 200, description = "the first messages: id, deliveryCount, size, header, properties, applicationProperties, annotations, body preview", body = Object), (status = 404, description = "no broker holds the queue"), (status = 503, description = "no broker reports"), (status = 401, description = "no or wrong admin token")))]
pub(crate) async fn browse(
    State(state): State<AppState>,
    Path((space, address)): Path<(String, String)>,
    Query(q): Query<BrowseQuery>,
) -> ApiResult<Json<Value>> {
    require_space(&state, &space).await?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_BROWSE {
        return Err(ApiError::bad(format!("limit is 1 to {MAX_BROWSE}")));
    }
    let answers = ask(
        &state,
        json!({"op": "browse", "space": space, "address": address, "limit": limit}),
    )
    .await?;
    let mut items = Vec::new();
    let mut depth = 0;
    for (broker, r) in holders(&address, answers)? {
        depth += r["depth"].as_u64().unwrap_or(0);
        for mut m in r["messages"].as_array().cloned().unwrap_or_default() {
            m["broker"] = json!(broker);
            items.push(m);
        }
    }
    items.truncate(limit as usize);
    Ok(Json(json!({
        "kind": "MessageList",
        "space": space,
        "address": address,
        "depth": depth,
        "items": items,
    })))
}

/// `POST …/queues/{address}/retry` (body `{"ids": [..]}`, or none for
/// all): moves dead-lettered or expired messages back to the address they
/// came from. Messages that do not say where they came from stay.
#[utoipa::path(post, path = "/api/v1/addressspaces/{space}/queues/{address}/retry", params(("space" = String, Path), ("address" = String, Path)), request_body = Object, responses((status = 200, description = "how many moved back, and how many stayed", body = Object), (status = 404, description = "no broker holds the queue"), (status = 503, description = "no broker reports"), (status = 401, description = "no or wrong admin token")))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    Path((space, address)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    require_space(&state, &space).await?;
    let mut command = json!({"op": "retry", "space": space, "address": address});
    if !body.iter().all(u8::is_ascii_whitespace) {
        let b: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("the body is not JSON: {e}")))?;
        match &b["ids"] {
            Value::Null => {}
            Value::Array(ids) if ids.iter().all(Value::is_u64) => {
                command["ids"] = b["ids"].clone();
            }
            _ => return Err(ApiError::bad("ids is a list of message ids (numbers)")),
        }
    }
    let answers = ask(&state, command).await?;
    let (mut moved, mut skipped) = (0, 0);
    for (_, r) in holders(&address, answers)? {
        moved += r["moved"].as_u64().unwrap_or(0);
        skipped += r["skipped"].as_u64().unwrap_or(0);
    }
    Ok(Json(json!({"moved": moved, "skipped": skipped})))
}

/// `DELETE …/queues/{address}/messages/{id}`: deletes one waiting message
/// (not one out with a consumer).
#[utoipa::path(delete, path = "/api/v1/addressspaces/{space}/queues/{address}/messages/{id}", params(("space" = String, Path), ("address" = String, Path), ("id" = u64, Path)), responses((status = 200, description = "deleted", body = Object), (status = 404, description = "no such queue, or no such message waiting in it"), (status = 503, description = "no broker reports"), (status = 401, description = "no or wrong admin token")))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Path((space, address, id)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    require_space(&state, &space).await?;
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad(format!("message id {id:?} is not a number")))?;
    let answers = ask(
        &state,
        json!({"op": "delete", "space": space, "address": address, "message": id}),
    )
    .await?;
    if holders(&address, answers)?
        .iter()
        .any(|(_, r)| r["deleted"] == true)
    {
        return Ok(Json(json!({"deleted": id})));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("no message {id} waits in queue {address:?} (it may be out with a consumer)"),
    ))
}

/// `POST …/queues/{address}/purge`: deletes every message waiting in
/// the queue (declared or not: a dead-letter queue often is not).
#[utoipa::path(post, path = "/api/v1/addressspaces/{space}/queues/{address}/purge", params(("space" = String, Path), ("address" = String, Path)), responses((status = 200, description = "how many were deleted", body = Object), (status = 404, description = "no broker holds the queue"), (status = 503, description = "no broker reports"), (status = 401, description = "no or wrong admin token")))]
pub(crate) async fn purge(
    State(state): State<AppState>,
    Path((space, address)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    require_space(&state, &space).await?;
    let answers = ask(
        &state,
        json!({"op": "purge", "space": space, "address": address}),
    )
    .await?;
    let purged: u64 = holders(&address, answers)?
        .iter()
        .map(|(_, r)| r["purged"].as_u64().unwrap_or(0))
        .sum();
    Ok(Json(json!({ "purged": purged })))
}

/// `POST /api/v1/answers`: a broker's answer to a command (`{"id",
/// "from", "result"}`).
#[utoipa::path(post, path = "/api/v1/answers", request_body = Object, responses((status = 200, description = "taken (or no longer waited for)", body = Object), (status = 400, description = "not an answer"), (status = 401, description = "no or wrong admin token")))]
pub(crate) async fn answers(
    State(state): State<AppState>,
    Body(body): Body,
) -> ApiResult<Json<Value>> {
    let (Some(id), Some(from)) = (body["id"].as_u64(), body["from"].as_str()) else {
        return Err(ApiError::bad("an answer has an id and who it is from"));
    };
    let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(tx) = live.answers.get(&id) {
        let _ = tx.send((from.to_string(), body["result"].clone()));
    }
    Ok(Json(json!({})))
}
