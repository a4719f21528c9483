//! The REST API under `/api/v1` (DESIGN.md "Control plane"): address
//! spaces, and per space its addresses and users, in the Kubernetes
//! resource shape, with `resourceVersion` optimistic concurrency; and the
//! watch stream routers and brokers follow.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use flotilla_core::auth::ScramCredentials;
use flotilla_core::resources::{
    Address, AddressSpace, MessagingUser, ValidationError, API_VERSION,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::{Change, Expect, Store, StoreError};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// The admin token every API call must present.
    pub token: Arc<String>,
    /// What routers and brokers last reported, and commands for them.
    pub live: Arc<std::sync::Mutex<Live>>,
    /// Brokers known to be in the registry.
    pub registered: crate::brokers::Registered,
    /// The address list's rows, kept from the store's changes.
    pub index: crate::index::Index,
    /// The last 15 minutes and the last day, sampled from the reports.
    pub history: Arc<std::sync::Mutex<crate::history::History>>,
    /// The OIDC provider whose tokens the API takes too.
    pub oidc: Option<Arc<crate::access::Provider>>,
}

impl AppState {
    /// # Errors
    /// The store cannot be read (to index its addresses).
    pub fn new(store: Store, token: String) -> Result<Self, StoreError> {
        let index = crate::index::Index::start(&store)?;
        Ok(AppState {
            store,
            token: Arc::new(token),
            live: Arc::default(),
            registered: Default::default(),
            index,
            history: Arc::default(),
            oidc: None,
        })
    }
}

/// Live state: each component's last report (kept while fresh) and the
/// commands waiting for it.
#[derive(Default)]
pub struct Live {
    reports: std::collections::HashMap<String, (std::time::Instant, Value)>,
    pub(crate) commands: std::collections::HashMap<String, Vec<Value>>,
    /// Requests waiting for brokers' answers to their commands, by id.
    pub(crate) answers:
        std::collections::HashMap<u64, tokio::sync::mpsc::UnboundedSender<(String, Value)>>,
    last_answer: u64,
}

/// A report older than this is from a component that went away.
pub(crate) const FRESH: Duration = Duration::from_secs(5);

impl Live {
    /// When `id` (`router/ID`, `broker/ID`) last reported.
    pub(crate) fn last_report(&self, id: &str) -> Option<std::time::Instant> {
        self.reports.get(id).map(|(at, _)| *at)
    }

    /// The brokers that report (within [`FRESH`]); 503 if none does.
    pub(crate) fn brokers(&self) -> ApiResult<Vec<String>> {
        let brokers: Vec<String> = self.fresh("broker").map(|(k, _)| k.clone()).collect();
        if brokers.is_empty() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "no broker reports to this console",
            ));
        }
        Ok(brokers)
    }

    /// A fresh id for a command that waits for answers.
    pub(crate) fn next_answer(&mut self) -> u64 {
        self.last_answer += 1;
        self.last_answer
    }

    /// Every component's last report, however old: id, when, report.
    pub(crate) fn all(&self) -> impl Iterator<Item = (&String, std::time::Instant, &Value)> {
        self.reports.iter().map(|(id, (at, v))| (id, *at, v))
    }

    pub(crate) fn fresh(&self, component: &str) -> impl Iterator<Item = (&String, &Value)> {
        let component = component.to_string();
        self.reports
            .iter()
            .filter(move |(_, (at, v))| {
                at.elapsed() < FRESH && v["component"] == component.as_str()
            })
            .map(|(id, (_, v))| (id, v))
    }
}

/// An API error: a status code and a Kubernetes-style `Status` body.
#[derive(Debug)]
pub struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    /// The HTTP status it answers with.
    pub fn code(&self) -> StatusCode {
        self.code
    }

    pub(crate) fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
    }

    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let (code, reason) = match &e {
            StoreError::Exists(_) => (StatusCode::CONFLICT, "AlreadyExists"),
            StoreError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            StoreError::Conflict { .. } => (StatusCode::CONFLICT, "Conflict"),
            StoreError::Gone(_) => (StatusCode::GONE, "Expired"),
            StoreError::Db(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
        };
        ApiError::new(code, reason, e.to_string())
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "apiVersion": "v1",
            "kind": "Status",
            "status": "Failure",
            "reason": self.reason,
            "message": self.message,
            "code": self.code.as_u16(),
        });
        (self.code, Json(body)).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// A JSON request body; what does not parse is a `Status` error too.
pub(crate) struct Body(pub(crate) Value);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // JSON whatever the Content-Type says (`curl -d` sends a form type).
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), "BadRequest", e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::bad(format!("the body is not JSON: {e}")))
    }
}

/// Query parameters; what does not parse is a `Status` error too.
struct Params<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for Params<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Params(v)),
            Err(e) => Err(ApiError::bad(e.body_text())),
        }
    }
}

/// The three kinds and where they live in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    AddressSpace,
    Address,
    MessagingUser,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AddressSpace => "AddressSpace",
            Kind::Address => "Address",
            Kind::MessagingUser => "MessagingUser",
        }
    }

    /// The store key of `name` (in `space`, for addresses and users).
    pub(crate) fn key(self, space: &str, name: &str) -> String {
        match self {
            Kind::AddressSpace => format!("AddressSpace/{name}"),
            _ => format!("{}/{space}/{name}", self.name()),
        }
    }

    pub(crate) fn prefix(self, space: &str) -> String {
        match self {
            Kind::AddressSpace => "AddressSpace/".to_string(),
            _ => format!("{}/{space}/", self.name()),
        }
    }
}

/// The API's OpenAPI document (served at `/openapi.json`).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Flotilla console API",
        description = "Address spaces, addresses and users; the watch stream; live state."
    ),
    paths(
        list_spaces,
        create_space,
        get_space,
        put_space,
        delete_space,
        list_addresses,
        create_address,
        get_address,
        put_address,
        delete_address,
        list_users,
        create_user,
        get_user,
        put_user,
        delete_user,
        watch,
        report,
        connections,
        wills,
        close_connection,
        metrics,
        purge,
        links,
        crate::messages::browse,
        crate::messages::retry,
        crate::messages::delete,
        crate::messages::purge,
        crate::messages::answers,
        crate::brokers::list,
        crate::brokers::get_one,
        crate::brokers::retire
    ),
    components(schemas(AddressSpace, Address, MessagingUser))
)]
pub struct ApiDoc;

/// Builds the API's router over `state`.
pub fn routes(state: AppState) -> Router {
    let api = Router::new()
        .route("/addressspaces", get(list_spaces).post(create_space))
        .route(
            "/addressspaces/{space}",
            get(get_space).put(put_space).delete(delete_space),
        )
        .route(
            "/addressspaces/{space}/addresses",
            get(list_addresses).post(create_address),
        )
        .route(
            "/addressspaces/{space}/addresses/{name}",
            get(get_address).put(put_address).delete(delete_address),
        )
        .route(
            "/addressspaces/{space}/users",
            get(list_users).post(create_user),
        )
        .route(
            "/addressspaces/{space}/users/{name}",
            get(get_user).put(put_user).delete(delete_user),
        )
        .route("/watch", get(watch))
        .route("/auth", get(crate::access::auth_info))
        .route("/whoami", get(crate::access::whoami))
        .route("/brokers", get(crate::brokers::list))
        .route(
            "/brokers/{id}",
            get(crate::brokers::get_one).delete(crate::brokers::retire),
        )
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "this path does not take that method",
            )
        })
        .route("/reports", axum::routing::post(report))
        .route("/addressspaces/{space}/connections", get(connections))
        .route("/addressspaces/{space}/wills", get(wills))
        .route(
            "/addressspaces/{space}/connections/{router}/{id}/close",
            axum::routing::post(close_connection),
        )
        .route("/addressspaces/{space}/metrics", get(metrics))
        .route("/addressspaces/{space}/usage", get(crate::views::usage))
        .route(
            "/addressspaces/{space}/addresses/{name}/history",
            get(crate::views::address_history),
        )
        .route("/overview", get(crate::views::overview))
        .route("/mesh", get(crate::views::mesh))
        .route("/components/{kind}/{name}", get(crate::views::component))
        .route("/addressspaces/{space}/links", get(links))
        .route(
            "/addressspaces/{space}/addresses/{name}/purge",
            axum::routing::post(purge),
        )
        .route(
            "/addressspaces/{space}/queues/{address}/messages",
            get(crate::messages::browse),
        )
        .route(
            "/addressspaces/{space}/queues/{address}/messages/{id}",
            axum::routing::delete(crate::messages::delete),
        )
        .route(
            "/addressspaces/{space}/queues/{address}/retry",
            axum::routing::post(crate::messages::retry),
        )
        .route(
            "/addressspaces/{space}/queues/{address}/purge",
            axum::routing::post(crate::messages::purge),
        )
        .route("/answers", axum::routing::post(crate::messages::answers))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::access::require_token,
        ))
        .with_state(state.clone());
    let prometheus = Router::new()
        .route("/metrics", get(prometheus))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::access::require_token,
        ))
        .with_state(state.clone());
    Router::new()
        .nest("/api/v1", api)
        .merge(prometheus)
        .route(
            "/",
            get(|| async { ui("text/html; charset=utf-8", include_str!("ui/index.html")) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { ui("text/javascript; charset=utf-8", include_str!("ui/app.js")) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { ui("text/css; charset=utf-8", include_str!("ui/style.css")) }),
        )
        .route(
            "/openapi.json",
            get(|| async { Json(<ApiDoc as utoipa::OpenApi>::openapi()) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such path") })
}

/// A file of the web console (built into the binary; no build step).
fn ui(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
            )
        })?
        .map_err(ApiError::from)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    #[serde(rename = "continue")]
    cont: Option<String>,
    /// Only objects whose name or address contains this.
    filter: Option<String>,
    /// Addresses: the column to order by (`name`, `address`, `type`,
    /// `broker`, `phase`, `created`, or live: `senders`, `receivers`,
    /// `delivered`, `rate`, `stored`); default `name`.
    sort: Option<String>,
    /// `asc` (default) or `desc`.
    order: Option<String>,
}

/// What API clients see of a stored object: no SCRAM keys.
fn shown(mut v: Value) -> Value {
    if let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("scramSha256");
        spec.remove("password");
    }
    v
}

/// A page of `kind` in `space`; `only`: the spaces a caller sees (for
/// the list of spaces).
async fn list(
    state: AppState,
    kind: Kind,
    space: String,
    q: ListQuery,
    only: Option<Arc<crate::access::Caller>>,
) -> ApiResult<Json<Value>> {
    if kind == Kind::Address {
        return list_addresses_page(state, space, q).await;
    }
    if q.sort.is_some() || q.order.is_some() {
        return Err(ApiError::bad("only address lists can be sorted"));
    }
    if kind != Kind::AddressSpace {
        require_space(&state, &space).await?;
    }
    let limit = q.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let prefix = kind.prefix(&space);
    let after = q.cont.map(|c| format!("{prefix}{c}"));
    let store = state.store.clone();
    let filter = q.filter.filter(|f| !f.is_empty());
    let (rv, items) = blocking(move || {
        store.list_where(&prefix, after.as_deref(), limit.saturating_add(1), |v| {
            let seen = only
                .as_ref()
                .is_none_or(|c| v["metadata"]["name"].as_str().is_some_and(|n| c.sees(n)));
            seen && filter.as_deref().is_none_or(|f| {
                [
                    &v["metadata"]["name"],
                    &v["spec"]["address"],
                    &v["spec"]["username"],
                ]
                .iter()
                .any(|s| s.as_str().is_some_and(|s| s.contains(f)))
            })
        })
    })
    .await?;
    let more = items.len() > limit;
    let items: Vec<(String, Value)> = items.into_iter().take(limit).collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if more {
        if let Some(last) = items.last() {
            metadata["continue"] = Value::String(
                last.1["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
    }
    Ok(Json(json!({
        "apiVersion": API_VERSION,
        "kind": format!("{}List", kind.name()),
        "metadata": metadata,
        "items": items.into_iter().map(|(_, v)| shown(v)).collect::<Vec<_>>(),
    })))
}

/// A page of a space's addresses from the index: filtered, ordered by
/// any column, then the page's objects read from the store.
async fn list_addresses_page(
    state: AppState,
    space: String,
    q: ListQuery,
) -> ApiResult<Json<Value>> {
    use crate::index::Column;
    require_space(&state, &space).await?;
    let by = match q.sort.as_deref() {
        None => Column::Name,
        Some(s) => Column::parse(s).ok_or_else(|| {
            ApiError::bad(format!(
                "cannot sort by {s:?}: name, address, type, broker, phase, created, senders, receivers, delivered, rate or stored"
            ))
        })?,
    };
    let descending = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => return Err(ApiError::bad(format!("order {o:?}: asc or desc"))),
    };
    let limit = q.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let store = state.store.clone();
    let rv = blocking(move || store.resource_version()).await?;
    state.index.caught_up(rv).await;
    let live = by.live().map(|field| live_numbers(&state, &space, field));
    let filter = q.filter.unwrap_or_default();
    let index = state.index.clone();
    let (sp, store) = (space.clone(), state.store.clone());
    let (page, items) = blocking(move || {
        index.refresh(&store)?;
        let ask = crate::index::Ask {
            filter: &filter,
            by,
            descending,
            live: live.as_ref(),
            cont: q.cont.as_deref(),
            limit,
        };
        let page = index.page(&sp, &ask);
        let keys: Vec<String> = page
            .names
            .iter()
            .map(|n| Kind::Address.key(&sp, n))
            .collect();
        let items = store.get_many(&keys)?;
        Ok((page, items))
    })
    .await?;
    let mut metadata = json!({"resourceVersion": rv.to_string(), "total": page.total});
    if let Some(next) = page.next {
        metadata["continue"] = Value::String(next);
    }
    Ok(Json(json!({
        "apiVersion": API_VERSION,
        "kind": "AddressList",
        "metadata": metadata,
        "items": items.into_iter().flatten().map(shown).collect::<Vec<_>>(),
    })))
}

async fn get_one(
    state: AppState,
    kind: Kind,
    space: String,
    name: String,
) -> ApiResult<Json<Value>> {
    let key = kind.key(&space, &name);
    let store = state.store.clone();
    let k = key.clone();
    match blocking(move || store.get(&k)).await? {
        Some(v) => Ok(Json(shown(v))),
        None => Err(StoreError::NotFound(describe(kind, &space, &name)).into()),
    }
}

fn describe(kind: Kind, space: &str, name: &str) -> String {
    match kind {
        Kind::AddressSpace => format!("address space {name:?}"),
        Kind::Address => format!("address {name:?} in address space {space:?}"),
        Kind::MessagingUser => format!("user {name:?} in address space {space:?}"),
    }
}

pub(crate) async fn require_space(state: &AppState, space: &str) -> ApiResult<()> {
    // The zero-config space (anonymous clients from loopback, undeclared
    // addresses anycast) exists until an AddressSpace replaces it.
    if space == flotilla_core::config::DEFAULT_SPACE {
        return Ok(());
    }
    let store = state.store.clone();
    let key = Kind::AddressSpace.key("", space);
    match blocking(move || store.get(&key)).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("address space {space:?} not found"),
        )),
    }
}

/// Parses and checks a body as `kind`, filling what the path says; returns
/// the object to store and the resource version it was read at, if given.
fn checked(
    kind: Kind,
    space: &str,
    name: Option<&str>,
    mut body: Value,
) -> ApiResult<(String, Value, Option<u64>)> {
    if !body.is_object() {
        return Err(ApiError::bad("the body must be a JSON object"));
    }
    if body.get("apiVersion").is_none() {
        body["apiVersion"] = Value::String(API_VERSION.into());
    }
    if body.get("kind").is_none() {
        body["kind"] = Value::String(kind.name().into());
    }
    if body["kind"] != kind.name() {
        return Err(ApiError::bad(format!(
            "kind must be {:?} here",
            kind.name()
        )));
    }
    if body.get("metadata").is_none() {
        body["metadata"] = json!({});
    }
    match (name, body["metadata"]["name"].as_str()) {
        (Some(n), Some(m)) if n != m => {
            return Err(ApiError::bad(format!(
                "metadata.name {m:?} differs from the name in the path {n:?}"
            )))
        }
        (Some(n), None) => body["metadata"]["name"] = Value::String(n.into()),
        (None, None) => return Err(ApiError::invalid("metadata.name is required")),
        _ => {}
    }
    let rv = match &body["metadata"]["resourceVersion"] {
        Value::Null => None,
        Value::String(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad("metadata.resourceVersion is not one this API gave"))?,
        ),
        _ => return Err(ApiError::bad("metadata.resourceVersion must be a string")),
    };
    if let Some(m) = body["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("creationTimestamp");
    }
    body.as_object_mut().map(|o| o.remove("status"));
    if kind != Kind::AddressSpace {
        if body.get("spec").is_none() {
            return Err(ApiError::invalid("spec is required"));
        }
        match body["spec"]["addressSpace"].as_str() {
            Some(s) if s != space => {
                return Err(ApiError::bad(format!(
                    "spec.addressSpace {s:?} differs from the space in the path {space:?}"
                )))
            }
            _ => body["spec"]["addressSpace"] = Value::String(space.into()),
        }
    } else if body.get("spec").is_none() {
        body["spec"] = json!({});
    }
    // The typed resource checks field names, types and values.
    let typed_err = |e: serde_json::Error| ApiError::invalid(format!("{}: {e}", kind.name()));
    let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
    match kind {
        Kind::AddressSpace => {
            let s: AddressSpace = serde_json::from_value(body.clone()).map_err(typed_err)?;
            s.validate()?;
        }
        Kind::Address => {
            let a: Address = serde_json::from_value(body.clone()).map_err(typed_err)?;
            a.validate()?;
        }
        Kind::MessagingUser => {
            if body["spec"].get("scramSha256").is_some() {
                return Err(ApiError::invalid(
                    "spec.scramSha256 is set by the console; send spec.password",
                ));
            }
            let u: MessagingUser = serde_json::from_value(body.clone()).map_err(typed_err)?;
            u.validate()?;
        }
    }
    body["status"] = json!({
        "phase": "Active",
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "Accepted",
            "message": "stored; routers and brokers that follow the console apply it",
        }],
    });
    Ok((name, body, rv))
}

/// A new address must fit its space's quota (plan).
async fn check_address_quota(state: &AppState, space: &str, key: &str) -> ApiResult<()> {
    let store = state.store.clone();
    let (sk, prefix, key) = (
        Kind::AddressSpace.key("", space),
        Kind::Address.prefix(space),
        key.to_string(),
    );
    let (s, exists, count) = blocking(move || {
        Ok((
            store.get(&sk)?,
            store.get(&key)?.is_some(),
            store.count(&prefix)?,
        ))
    })
    .await?;
    let Some(s) = s else { return Ok(()) };
    let Ok(space_obj) = serde_json::from_value::<AddressSpace>(s) else {
        return Ok(());
    };
    let q = space_obj.quotas().unwrap_or_default();
    match q.addresses {
        Some(max) if !exists && count as u64 >= max => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "QuotaExceeded",
            format!(
                "address space {space:?} allows {max} addresses{}; it has {count}",
                space_obj
                    .spec
                    .plan
                    .as_deref()
                    .map(|p| format!(" (plan {p:?})"))
                    .unwrap_or_default()
            ),
        )),
        _ => Ok(()),
    }
}

/// Turns a user's password into SCRAM keys; keeps the old keys when a
/// replacement gives no password.
fn with_keys(mut body: Value, old: Option<&Value>) -> ApiResult<Value> {
    let keys = match body["spec"]["password"].as_str() {
        Some("") => return Err(ApiError::invalid("spec.password must not be empty")),
        Some(p) => serde_json::to_value(ScramCredentials::derive(p).to_keys())
            .map_err(|e| ApiError::invalid(e.to_string()))?,
        None => match old.map(|o| o["spec"]["scramSha256"].clone()) {
            Some(k) if !k.is_null() => k,
            _ => {
                return Err(ApiError::invalid(
                    "spec.password is required for a new user",
                ))
            }
        },
    };
    if let Some(spec) = body["spec"].as_object_mut() {
        spec.remove("password");
        spec.insert("scramSha256".into(), keys);
    }
    Ok(body)
}

async fn write(
    state: AppState,
    kind: Kind,
    space: String,
    name: Option<String>,
    body: Value,
    create: bool,
) -> ApiResult<Response> {
    let (existed, stored) = store_object(&state, kind, space, name, body, create).await?;
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(shown(stored))).into_response())
}

/// Applies one resource given in the Kubernetes shape (as in a config
/// file): created, or replaced if it exists.
///
/// # Errors
/// As the API would answer it.
pub async fn apply(state: &AppState, body: Value) -> Result<Value, ApiError> {
    let kind = match body["kind"].as_str() {
        Some("AddressSpace") => Kind::AddressSpace,
        Some("Address") => Kind::Address,
        Some("MessagingUser") => Kind::MessagingUser,
        other => return Err(ApiError::bad(format!("unknown kind {other:?}"))),
    };
    let space = match kind {
        Kind::AddressSpace => String::new(),
        _ => body["spec"]["addressSpace"]
            .as_str()
            .unwrap_or(flotilla_core::config::DEFAULT_SPACE)
            .to_string(),
    };
    Ok(store_object(state, kind, space, None, body, false).await?.1)
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// Validates and stores an object; says whether it replaced one.
async fn store_object(
    state: &AppState,
    kind: Kind,
    space: String,
    name: Option<String>,
    body: Value,
    create: bool,
) -> ApiResult<(bool, Value)> {
    if kind != Kind::AddressSpace {
        require_space(state, &space).await?;
    }
    let (name, mut object, rv) = checked(kind, &space, name.as_deref(), body)?;
    let key = kind.key(&space, &name);
    if kind == Kind::Address {
        check_address_quota(state, &space, &key).await?;
    }
    if kind == Kind::MessagingUser {
        // A username names one user in a space (it is what clients log in with).
        let username = object["spec"]["username"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let (store, prefix, me) = (
            state.store.clone(),
            Kind::MessagingUser.prefix(&space),
            name.clone(),
        );
        let (_, same) = blocking(move || {
            store.list_where(&prefix, None, 1, |u| {
                u["spec"]["username"] == username.as_str() && u["metadata"]["name"] != me.as_str()
            })
        })
        .await?;
        if let Some((_, other)) = same.first() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!(
                    "username {:?} is taken by user {:?} in address space {space:?}",
                    other["spec"]["username"].as_str().unwrap_or(""),
                    other["metadata"]["name"].as_str().unwrap_or("")
                ),
            ));
        }
    }
    if kind == Kind::MessagingUser {
        let store = state.store.clone();
        let k = key.clone();
        let old = if create {
            None
        } else {
            blocking(move || store.get(&k)).await?
        };
        let password = object["spec"]["password"].is_string();
        object = if password {
            // Deriving keys is deliberately slow: off the async threads.
            tokio::task::spawn_blocking(move || with_keys(object, None))
                .await
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                        e.to_string(),
                    )
                })??
        } else {
            with_keys(object, old.as_ref())?
        };
    }
    let expect = if create {
        Expect::Absent
    } else {
        Expect::Any(rv)
    };
    let store = state.store.clone();
    let k = key.clone();
    let old = if create {
        None
    } else {
        let store = state.store.clone();
        blocking(move || store.get(&k)).await?
    };
    let existed = old.is_some();
    if kind == Kind::Address {
        crate::brokers::place_address(state, &mut object, old.as_ref());
    }
    let stored = blocking(move || store.put(&key, object, expect))
        .await
        .map_err(|e| match e.code {
            StatusCode::CONFLICT if e.reason == "AlreadyExists" => ApiError::new(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} already exists", describe(kind, &space, &name)),
            ),
            StatusCode::NOT_FOUND => ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} not found", describe(kind, &space, &name)),
            ),
            _ => e,
        })?;
    Ok((existed, stored))
}

async fn remove(
    state: AppState,
    kind: Kind,
    space: String,
    name: String,
) -> ApiResult<Json<Value>> {
    let mut keys = vec![kind.key(&space, &name)];
    if kind == Kind::AddressSpace {
        // A space takes its addresses and users with it.
        let store = state.store.clone();
        let (a, u) = (
            Kind::Address.prefix(&name),
            Kind::MessagingUser.prefix(&name),
        );
        let owned = blocking(move || {
            let (_, mut x) = store.list(&a, None, usize::MAX)?;
            let (_, y) = store.list(&u, None, usize::MAX)?;
            x.extend(y);
            Ok(x)
        })
        .await?;
        keys.extend(owned.into_iter().map(|(k, _)| k));
    }
    let store = state.store.clone();
    let gone = blocking(move || store.delete(&keys))
        .await
        .map_err(|e| match e.code {
            StatusCode::NOT_FOUND => ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} not found", describe(kind, &space, &name)),
            ),
            _ => e,
        })?;
    Ok(Json(shown(gone)))
}

#[utoipa::path(get, path = "/api/v1/addressspaces",  responses((status = 200, description = "the address spaces (`limit`, `continue`, `filter`)", body = Object), (status = 401, description = "no or wrong admin token")))]
async fn list_spaces(
    State(s): State<AppState>,
    caller: Option<Extension<Arc<crate::access::Caller>>>,
    Params(q): Params<ListQuery>,
) -> ApiResult<Json<Value>> {
    let only = caller.map(|Extension(c)| c).filter(|c| !c.admin);
    list(s, Kind::AddressSpace, String::new(), q, only).await
}
#[utoipa::path(post, path = "/api/v1/addressspaces", request_body = AddressSpace, responses((status = 201, body = AddressSpace), (status = 409, description = "exists"), (status = 422, description = "invalid"), (status = 401, description = "no or wrong admin token")))]
async fn create_space(State(s): State<AppState>, Body(b): Body) -> ApiResult<Response> {
    write(s, Kind::AddressSpace, String::new(), None, b, true).await
}
#[utoipa::path(get, path = "/api/v1/addressspaces/{space}", params(("space" = String, Path)), responses((status = 200, body = AddressSpace), (status = 404, description = "not found"), (status = 401, description = "no or wrong admin token")))]
async fn get_space(State(s): State<AppState>, Path(space): Path<String>) -> ApiResult<Json<Value>> {
    get_one(s, Kind::AddressSpace, String::new(), space).await
}
#[utoipa::path(put, path = "/api/v1/addressspaces/{space}", params(("space" = String, Path)), request_body = AddressSpace, responses((status = 200, body = AddressSpace), (status = 201, body = AddressSpace), (status = 409, description = "stale resourceVersion"), (status = 401, description = "no or wrong admin token")))]
async fn put_space(
    State(s): State<AppState>,
    Path(space): Path<String>,
    Body(b): Body,
) -> ApiResult<Response> {
    write(s, Kind::AddressSpace, String::new(), Some(space), b, false).await
}
#[utoipa::path(delete, path = "/api/v1/addressspaces/{space}", params(("space" = String, Path)), responses((status = 200, description = "deleted, with its addresses and users", body = AddressSpace), (status = 404, description = "not found"), (status = 401, description = "no or wrong admin token")))]
async fn delete_space(
    State(s): State<AppState>,
    Path(space): Path<String>,
) -> ApiResult<Json<Value>> {
    remove(s, Kind::AddressSpace, String::new(), space).await
}
#[utoipa::path(get, path = "/api/v1/addressspaces/{space}/addresses", params(("space" = String, Path)), responses((status = 200, description = "the addresses (`limit`, `continue`, `filter`)", body = Object), (status = 401, description = "no or wrong admin token")))]
async fn list_addresses(
    State(s): State<AppState>,
    Path(space): Path<String>,
    Params(q): Params<ListQuery>,
) -> ApiResult<Json<Value>> {
    list(s, Kind::Address, space, q, None).await
}
#[utoipa::path(post, path = "/api/v1/addressspaces/{space}/addresses", params(("space" = String, Path)), request_body = Address, responses((status = 201, body = Address), (status = 403, description = "quota exceeded"), (status = 409, description = "exists"), (status = 422, description = "invalid"), (status = 401, description = "no or wrong admin token")))]
async fn create_address(
    State(s): State<AppState>,
    Path(space): Path<String>,
    Body(b): Body,
) -> ApiResult<Response> {
    write(s, Kind::Address, space, None, b, true).await
}
#[utoipa::path(get, path = "/api/v1/addressspaces/{space}/addresses/{name}", params(("space" = String, Path), ("name" = String, Path)), responses((status = 200, body = Address), (status = 404, description = "not found"), (status = 401, description = "no or wrong admin token")))]
async fn get_address(
    State(s): State<AppState>,
    Path((space, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    get_one(s, Kind::Address, space, name).await
}
#[utoipa::path(put, path = "/api/v1/addressspaces/{space}/addresses/{name}", params(("space" = String, Path), ("name" = String, Path)), request_body = Address, responses((status = 200, body = Address), (status = 201, body = Address), (status = 409, description = "stale resourceVersion"), (status = 401, description = "no or wrong admin token")))]
async fn put_address(
    State(s): State<AppState>,
    Path((space, name)): Path<(String, String)>,
    Body(b): Body,
) -> ApiResult<Response> {
    write(s, Kind::Address, space, Some(name), b, false).await
}
#[utoipa::path(delete, path = "/api/v1/addressspaces/{space}/addresses/{name}", params(("space" = String, Path), ("name" = String, Path)), responses((status = 200, body = Address), (status = 404, description = "not found"), (status = 401, description = "no or wrong admin token")))]
async fn delete_address(
    State(s): State<AppState>,
    Path((space, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    remove(s, Kind::Address, space, name).await
}
#[utoipa::path(get, path = "/api/v1/addressspaces/{space}/users", params(("space" = String, Path)), responses((status = 200, description = "the users (`limit`, `continue`, `filter`)", body = Object), (status = 401, description = "no or wrong admin token")))]
async fn list_users(
    State(s): State<AppState>,
    Path(space): Path<String>,
    Params(q): Params<ListQuery>,
) -> ApiResult<Json<Value>> {
    list(s, Kind::MessagingUser, space, q, None).await
}
#[utoipa::path(post, path = "/api/v1/addressspaces/{space}/users", params(("space" = String, Path)), request_body = MessagingUser, responses((status = 201, description = "created; the password is never returned", body = MessagingUser), (status = 409, description = "exists"), (status = 422, description = "invalid"), (status = 401, description = "no or wrong admin token")))]
async fn create_user(
    State(s): State<AppState>,
    Path(space): Path<String>,
    Body(b): Body,
) -> ApiResult<Response> {
    write(s, Kind::MessagingUser, space, None, b, true).await
}
#[utoipa::path(get, path = "/api/v1/addressspaces/{space}/users/{name}", params(("space" = String, Path), ("name" = String, Path)), responses((status = 200, body = MessagingUser), (status = 404, description = "not found"), (status = 401, description = "no or wrong admin token")))]
async fn get_user(
    State(s): State<AppState>,
    Path((space, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    get_one(s, Kind::MessagingUser, space, name).await
}
#[utoipa::path(put, path = "/api/v1/addressspaces/{space}/users/{name}", params(("space" = String, Path), ("name" = String, Path)), request_body = MessagingUser, responses((status = 200, body = MessagingUser), (status = 201, body = MessagingUser), (status = 409, description = "stale resourceVersion"), (status = 401, description = "no or wrong admin token")))]
async fn put_user(
    State(s): State<AppState>,
    Path((space, name)): Path<(String, String)>,
    Body(b): Body,
) -> ApiResult<Response> {
    write(s, Kind::MessagingUser, space, Some(name), b, false).await
}
#[utoipa::path(delete, path = "/api/v1/addressspaces/{space}/users/{name}", params(("space" = String, Path), ("name" = String, Path)), responses((status = 200, body = MessagingUser), (status = 404, description = "not found"), (status = 401, description = "no or wrong admin token")))]
async fn delete_user(
    State(s): State<AppState>,
    Path((space, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    remove(s, Kind::MessagingUser, space, name).await
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatchQuery {
    resource_version: Option<String>,
}

/// How often an idle watch says it is alive (and where it is).
const BOOKMARK_EVERY: Duration = Duration::from_secs(10);

/// `GET /api/v1/watch`: NDJSON, one change a line. Without a
/// `resourceVersion` (or with `0`) it starts with every object as `ADDED`;
/// with one, it replays the changes after it (410 if the log no longer
/// reaches back). Then it follows changes as they happen; `BOOKMARK` lines
/// carry the current resource version while nothing changes.
#[utoipa::path(get, path = "/api/v1/watch", params(("resourceVersion" = Option<String>, Query, description = "resume after this version")), responses((status = 200, description = "NDJSON: one change a line (ADDED, MODIFIED, DELETED, BOOKMARK)", content_type = "application/x-ndjson"), (status = 410, description = "the version is too old: watch from 0"), (status = 401, description = "no or wrong admin token")))]
async fn watch(
    State(state): State<AppState>,
    Params(q): Params<WatchQuery>,
) -> ApiResult<Response> {
    let from = match q.resource_version.as_deref() {
        None | Some("") => 0,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| ApiError::bad("resourceVersion is not one this API gave"))?,
    };
    // Subscribe before reading history, so nothing falls in between.
    let mut live = state.store.subscribe();
    let store = state.store.clone();
    let (mut last, first): (u64, Vec<String>) = blocking(move || {
        if from == 0 {
            let (rv, objects) = store.list("", None, usize::MAX)?;
            let lines = objects
                .into_iter()
                .map(|(_, o)| {
                    Change {
                        rv,
                        kind: "ADDED",
                        object: o,
                    }
                    .to_line()
                })
                .collect();
            Ok((rv, lines))
        } else {
            let (rv, changes) = store.changes_since(from)?;
            Ok((rv.max(from), changes.iter().map(Change::to_line).collect()))
        }
    })
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(64);
    tokio::spawn(async move {
        for line in first {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let mut bookmark = tokio::time::interval(BOOKMARK_EVERY);
        bookmark.tick().await;
        loop {
            let line = tokio::select! {
                _ = tx.closed() => return,
                _ = bookmark.tick() => json!({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": last.to_string()}}}).to_string() + "\n",
                c = live.recv() => match c {
                    Ok(c) if c.rv <= last => continue,
                    Ok(c) => {
                        last = c.rv;
                        c.to_line()
                    }
                    // Too far behind: end, and the client resumes from
                    // the last version it saw.
                    Err(_) => return,
                },
            };
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::from_stream(stream))
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
            )
        })
}

/// `POST /api/v1/reports`: a router's or broker's live state; the answer
/// carries the commands waiting for it.
#[utoipa::path(post, path = "/api/v1/reports", request_body = Object, responses((status = 200, description = "commands for the reporting router or broker", body = Object), (status = 401, description = "no or wrong admin token")))]
async fn report(State(state): State<AppState>, Body(body): Body) -> ApiResult<Json<Value>> {
    let id = match (body["component"].as_str(), body["id"].as_str()) {
        (Some(c @ ("router" | "broker" | "gateway" | "lwt")), Some(id)) => format!("{c}/{id}"),
        _ => {
            return Err(ApiError::bad(
                "a report names its component (router, broker, gateway or lwt) and id",
            ))
        }
    };
    if let Some(broker) = id.strip_prefix("broker/") {
        crate::brokers::on_report(&state, broker).await;
    }
    let mut live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    live.reports
        .insert(id.clone(), (std::time::Instant::now(), body));
    let commands = live.commands.remove(&id).unwrap_or_default();
    Ok(Json(json!({ "commands": commands })))
}

/// `GET …/wills`: what the last-will service did in the space: wills
/// held, registered, cancelled, fired by cause, orphans dropped.
#[utoipa::path(get, path = "/api/v1/addressspaces/{space}/wills", params(("space" = String, Path)), responses((status = 200, description = "the space's wills, as the last-will service reports them", body = Object), (status = 401, description = "no or wrong admin token")))]
async fn wills(State(state): State<AppState>, Path(space): Path<String>) -> ApiResult<Json<Value>> {
    require_space(&state, &space).await?;
    let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    let mut services = Vec::new();
    for (id, r) in live.fresh("lwt") {
        let mut v = r["spaces"][space.as_str()].clone();
        if v.is_null() {
            v = json!({"held": 0, "registered": 0, "cancelled": 0,
                "fired": {"connectionLost": 0, "gatewayLost": 0, "asked": 0},
                "droppedOrphans": 0});
        }
        v["service"] = id.trim_start_matches("lwt/").into();
        services.push(v);
    }
    Ok(Json(json!({ "items": services })))
}

/// `GET …/connections`: the space's client connections on every router.
#[utoipa::path(get, path = "/api/v1/addressspaces/{space}/connections", params(("space" = String, Path)), responses((status = 200, description = "client connections on every router", body = Object), (status = 401, description = "no or wrong admin token")))]
async fn connections(
    State(state): State<AppState>,
    Path(space): Path<String>,
) -> ApiResult<Json<Value>> {
    require_space(&state, &space).await?;
    let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    let mut items = Vec::new();
    for (id, r) in live.fresh("router") {
        let router = id.trim_start_matches("router/");
        for c in r["connections"].as_array().into_iter().flatten() {
            if c["space"] == space.as_str() {
                let mut c = c.clone();
                c["router"] = router.into();
                c["protocol"] = "amqp".into();
                items.push(c);
            }
        }
    }
    // MQTT clients, on the gateways (`router` names the gateway, so one
    // close call serves both).
    for (id, r) in live.fresh("gateway") {
        let gateway = id.trim_start_matches("gateway/");
        for c in r["sessions"].as_array().into_iter().flatten() {
            if c["space"] == space.as_str() {
                let mut c = c.clone();
                c["router"] = gateway.into();
                c["gateway"] = gateway.into();
                c["container"] = c["clientId"].clone();
                items.push(c);
            }
        }
    }
    Ok(Json(json!({"kind": "ConnectionList", "items": items})))
}

/// `POST …/connections/{router}/{id}/close`: the router closes it at its
/// next report (within a second or so).
#[utoipa::path(post, path = "/api/v1/addressspaces/{space}/connections/{router}/{id}/close", params(("space" = String, Path), ("router" = String, Path), ("id" = u64, Path)), responses((status = 202, description = "the router closes it"), (status = 404, description = "no such connection"), (status = 401, description = "no or wrong admin token")))]
async fn close_connection(
    State(state): State<AppState>,
    Path((space, router, id)): Path<(String, String, u64)>,
) -> ApiResult<Response> {
    let mut live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    let holds = |component: &str, list: &str| {
        let key = format!("{component}/{router}");
        let known = live.fresh(component).any(|(k, r)| {
            *k == key
                && r[list].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["id"] == id && c["space"] == space.as_str())
                })
        });
        known.then_some(key)
    };
    let found = holds("router", "connections").or_else(|| holds("gateway", "sessions"));
    let Some(key) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no connection {id} on router {router:?} in address space {space:?}"),
        ));
    };
    live.commands
        .entry(key)
        .or_default()
        .push(json!({"closeConnection": id}));
    Ok((StatusCode::ACCEPTED, Json(json!({"status": "closing"}))).into_response())
}

/// `GET …/metrics`: per address, what routers and brokers report:
/// senders, receivers, messages delivered and per second, messages stored.
#[utoipa::path(get, path = "/api/v1/addressspaces/{space}/metrics", params(("space" = String, Path)), responses((status = 200, description = "per address: senders, receivers, delivered, rate, stored", body = Object), (status = 401, description = "no or wrong admin token")))]
async fn metrics(
    State(state): State<AppState>,
    Path(space): Path<String>,
    Params(q): Params<MetricsQuery>,
) -> ApiResult<Json<Value>> {
    require_space(&state, &space).await?;
    let mut by = space_metrics(&state, &space);
    if let Some(only) = q.addresses.as_deref() {
        // Just these (a page of the list): what the browser refreshes.
        let only: std::collections::HashSet<&str> = only.split(',').take(1000).collect();
        by.retain(|a, _| only.contains(a.as_str()));
    }
    Ok(Json(
        json!({"kind": "MetricsList", "items": by.into_values().collect::<Vec<_>>()}),
    ))
}

#[derive(Debug, Deserialize)]
struct MetricsQuery {
    /// Only these addresses (comma separated, at most 1,000).
    addresses: Option<String>,
}

/// Each address's `field` (a live column) in space `space`.
fn live_numbers(
    state: &AppState,
    space: &str,
    field: &str,
) -> std::collections::HashMap<String, f64> {
    space_metrics(state, space)
        .into_iter()
        .map(|(a, v)| (a, v[field].as_f64().unwrap_or(0.0)))
        .collect()
}

/// Per address of space `space`, what routers and brokers report.
fn space_metrics(state: &AppState, space: &str) -> std::collections::BTreeMap<String, Value> {
    let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    let mut by: std::collections::BTreeMap<String, Value> = std::collections::BTreeMap::new();
    let add = |v: &mut Value, k: &str, n: &Value| {
        let sum = v[k].as_u64().unwrap_or(0) + n.as_u64().unwrap_or(0);
        v[k] = sum.into();
    };
    for (_, r) in live.fresh("router") {
        for a in r["addresses"].as_array().into_iter().flatten() {
            if a["space"] != space {
                continue;
            }
            let name = a["address"].as_str().unwrap_or("").to_string();
            let v = by
                .entry(name.clone())
                .or_insert_with(|| json!({"address": name}));
            for k in ["senders", "receivers", "delivered", "rate"] {
                add(v, k, &a[k]);
            }
        }
        // Senders to brokers' addresses: their links are routed (the
        // receivers are counted by the brokers, as consumers).
        for l in r["links"].as_array().into_iter().flatten() {
            if l["routed"] == true && l["dir"] == "in" && l["space"] == space {
                let name = l["address"].as_str().unwrap_or("").to_string();
                let v = by
                    .entry(name.clone())
                    .or_insert_with(|| json!({"address": name}));
                add(v, "senders", &json!(1));
            }
        }
    }
    for (_, r) in live.fresh("broker") {
        for q in r["queues"].as_array().into_iter().flatten() {
            if q["space"] != space {
                continue;
            }
            let name = q["address"].as_str().unwrap_or("").to_string();
            let v = by
                .entry(name.clone())
                .or_insert_with(|| json!({"address": name}));
            add(v, "stored", &q["depth"]);
            // A broker's consumers are the address's receivers (their
            // links pass through the routers unnumbered), and what they
            // acknowledged is what was delivered.
            add(v, "receivers", &q["consumers"]);
            add(v, "delivered", &q["acknowledged"]);
            add(v, "rate", &q["outRate"]);
            add(v, "storedRate", &q["inRate"]);
        }
    }
    by
}

/// `POST …/addresses/{name}/purge`: every broker drops the messages the
/// address holds (at its next report).
#[utoipa::path(post, path = "/api/v1/addressspaces/{space}/addresses/{name}/purge", params(("space" = String, Path), ("name" = String, Path)), responses((status = 202, description = "the brokers purge it"), (status = 503, description = "no broker reports"), (status = 401, description = "no or wrong admin token")))]
async fn purge(
    State(state): State<AppState>,
    Path((space, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let store = state.store.clone();
    let key = Kind::Address.key(&space, &name);
    let Some(a) = blocking(move || store.get(&key)).await? else {
        return Err(StoreError::NotFound(describe(Kind::Address, &space, &name)).into());
    };
    let address = a["spec"]["address"].as_str().unwrap_or("").to_string();
    let mut live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    for b in live.brokers()? {
        live.commands
            .entry(b)
            .or_default()
            .push(json!({"purge": {"space": space, "address": address}}));
    }
    Ok((StatusCode::ACCEPTED, Json(json!({"status": "purging"}))).into_response())
}

/// `GET …/links`: the space's links to addresses the routers route
/// message by message (connection, direction, address, unsettled).
#[utoipa::path(get, path = "/api/v1/addressspaces/{space}/links", params(("space" = String, Path)), responses((status = 200, description = "links on every router", body = Object), (status = 401, description = "no or wrong admin token")))]
async fn links(State(state): State<AppState>, Path(space): Path<String>) -> ApiResult<Json<Value>> {
    require_space(&state, &space).await?;
    let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    let mut items = Vec::new();
    for (id, r) in live.fresh("router") {
        let router = id.trim_start_matches("router/");
        // Each link's client: its connection's container id.
        let containers: std::collections::HashMap<u64, &Value> = r["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["id"].as_u64()?, &c["container"])))
            .collect();
        for l in r["links"].as_array().into_iter().flatten() {
            if l["space"] == space.as_str() {
                let mut l = l.clone();
                l["router"] = router.into();
                if let Some(c) = l["connection"].as_u64().and_then(|c| containers.get(&c)) {
                    l["container"] = (*c).clone();
                }
                items.push(l);
            }
        }
    }
    Ok(Json(json!({"kind": "LinkList", "items": items})))
}

/// `GET /metrics`: Prometheus text format (admin token as bearer): what
/// every router, broker, gateway and last-will service last reported, as
/// each serves on its own `--http` (`flotilla_core::metrics`), and what the
/// store holds.
async fn prometheus(State(state): State<AppState>) -> ApiResult<Response> {
    use flotilla_core::metrics::{Exposition, Kind};
    let store = state.store.clone();
    let counts = blocking(move || {
        Ok((
            store.count("AddressSpace/")?,
            store.count("Address/")?,
            store.count("MessagingUser/")?,
        ))
    })
    .await?;
    let mut e = Exposition::default();
    for (kind, c) in [
        ("AddressSpace", counts.0),
        ("Address", counts.1),
        ("MessagingUser", counts.2),
    ] {
        e.sample(
            "flotilla_objects",
            Kind::Gauge,
            "Resources in the console's store.",
            &[("kind", kind)],
            c,
        );
    }
    let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    for component in ["router", "broker", "gateway", "lwt"] {
        for (key, r) in live.fresh(component) {
            let id = key.split_once('/').map_or(key.as_str(), |(_, id)| id);
            e.report(component, id, r);
        }
    }
    drop(live);
    // The overview's series, as the console last sampled them.
    let last = state
        .history
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .seconds
        .back()
        .copied()
        .unwrap_or_default();
    for (dir, v) in [("in", last.r#in), ("out", last.out)] {
        e.sample(
            "flotilla_messages_per_second",
            Kind::Gauge,
            "Messages taken from producers (in) and delivered (out) per second, over every router and broker (the overview's chart).",
            &[("direction", dir)],
            v,
        );
    }
    e.sample(
        "flotilla_messages_stored",
        Kind::Gauge,
        "Messages stored in every broker (the overview's chart).",
        &[],
        last.stored,
    );
    e.process();
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        e.render(),
    )
        .into_response())
}
