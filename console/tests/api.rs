//! The console's REST API through `tower::ServiceExt::oneshot` on
//! [`routes`] (no sockets): CRUD of address spaces, addresses and users,
//! validation errors, optimistic concurrency, the admin token, paging,
//! deleting a space with what it owns, and the watch stream (from the
//! start, resumed from a resource version, and live).
//!
//! Each test has its own redb store in its own temporary directory.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use flotilla_console::api::{routes, AppState};
use flotilla_console::store::Store;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

const TOKEN: &str = "test-admin-token";
/// The bound on every wait for the watch stream.
const WAIT: Duration = Duration::from_secs(10);

/// A store in a fresh temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "flotilla-console-api-{}-{n}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The API over a fresh store.
struct Api {
    app: axum::Router,
    dir: TempDir,
}

fn api(tag: &str) -> Api {
    let dir = TempDir::new(tag);
    let app = app_in(&dir);
    Api { app, dir }
}

fn app_in(dir: &TempDir) -> axum::Router {
    let store = Store::open(&dir.0.join("store.redb")).expect("open the store");
    routes(AppState::new(store, TOKEN.to_string()).expect("index the store"))
}

fn request(method: Method, uri: &str, token: Option<&str>, body: Option<&Value>) -> Request<Body> {
    let mut r = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        r = r.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            r = r.header(header::CONTENT_TYPE, "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    r.body(body).expect("a valid request")
}

impl Api {
    /// One call with the admin token: the status and the JSON body.
    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(Some(TOKEN), method, uri, body).await
    }

    async fn call_as(
        &self,
        token: Option<&str>,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let res = self
            .app
            .clone()
            .oneshot(request(method, uri, token, body.as_ref()))
            .await
            .expect("the router is infallible");
        let status = res.status();
        let bytes = res
            .into_body()
            .collect()
            .await
            .expect("read the body")
            .to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{uri}: the body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, v)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Method::GET, uri, None).await
    }

    async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, uri, Some(body)).await
    }

    async fn put(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, uri, Some(body)).await
    }

    async fn delete(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, uri, None).await
    }

    /// POST that must succeed with 201; returns the stored object.
    async fn create(&self, uri: &str, body: Value) -> Value {
        let (s, v) = self.post(uri, body).await;
        assert_eq!(s, StatusCode::CREATED, "POST {uri}: {v}");
        v
    }

    async fn create_space(&self, name: &str) -> Value {
        self.create("/api/v1/addressspaces", json!({"metadata": {"name": name}}))
            .await
    }

    async fn create_address(&self, space: &str, name: &str, address: &str, kind: &str) -> Value {
        self.create(
            &format!("/api/v1/addressspaces/{space}/addresses"),
            json!({"metadata": {"name": name}, "spec": {"address": address, "type": kind}}),
        )
        .await
    }

    async fn create_user(&self, space: &str, name: &str, password: &str) -> Value {
        self.create(
            &format!("/api/v1/addressspaces/{space}/users"),
            user_body(name, password),
        )
        .await
    }

    /// `GET /api/v1/watch[?resourceVersion=rv]`, which must answer 200.
    async fn watch(&self, rv: Option<&str>) -> Watch {
        let uri = match rv {
            Some(rv) => format!("/api/v1/watch?resourceVersion={rv}"),
            None => "/api/v1/watch".to_string(),
        };
        let res = self
            .app
            .clone()
            .oneshot(request(Method::GET, &uri, Some(TOKEN), None))
            .await
            .expect("the router is infallible");
        assert_eq!(res.status(), StatusCode::OK, "GET {uri}");
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/x-ndjson",
            "the watch is NDJSON"
        );
        Watch {
            body: res.into_body(),
            buf: Vec::new(),
        }
    }
}

fn user_body(name: &str, password: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "username": name,
            "password": password,
            "authorization": [{"addresses": ["orders", "events/#"], "operations": ["send", "recv"]}],
        },
    })
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("no metadata.resourceVersion in {v}"))
        .parse()
        .expect("a numeric resourceVersion")
}

/// Asserts an error in the Kubernetes `Status` shape.
fn assert_status(got: &(StatusCode, Value), code: StatusCode, reason: &str) {
    let (s, v) = got;
    assert_eq!(*s, code, "{v}");
    assert_eq!(v["kind"], "Status", "{v}");
    assert_eq!(v["status"], "Failure", "{v}");
    assert_eq!(v["reason"], reason, "{v}");
    assert_eq!(v["code"], code.as_u16(), "{v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a message for people: {v}"
    );
}

fn assert_ready(v: &Value) {
    assert_eq!(v["status"]["phase"], "Active", "{v}");
    let c = &v["status"]["conditions"][0];
    assert_eq!(c["type"], "Ready", "{v}");
    assert_eq!(c["status"], "True", "{v}");
    assert!(c["reason"].is_string() && c["message"].is_string(), "{v}");
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {list}"))
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Whether `v` (any depth) has a key `key`.
fn has_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Object(m) => m.contains_key(key) || m.values().any(|x| has_key(x, key)),
        Value::Array(a) => a.iter().any(|x| has_key(x, key)),
        _ => false,
    }
}

/// The watch stream's body, read a line at a time.
struct Watch {
    body: Body,
    buf: Vec<u8>,
}

impl Watch {
    /// The next line that is not a `BOOKMARK`, bounded by [`WAIT`].
    async fn next(&mut self) -> Value {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=nl).collect();
                    let v: Value = serde_json::from_slice(&line)
                        .unwrap_or_else(|e| panic!("a watch line is not JSON ({e}): {line:?}"));
                    if v["type"] != "BOOKMARK" {
                        return v;
                    }
                    continue;
                }
                let frame = self
                    .body
                    .frame()
                    .await
                    .expect("the watch ended")
                    .expect("read the watch");
                if let Ok(data) = frame.into_data() {
                    self.buf.extend_from_slice(&data);
                }
            }
        })
        .await
        .expect("timed out waiting for a watch line")
    }

    /// The next `n` lines as (type, kind, name).
    async fn next_n(&mut self, n: usize) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let v = self.next().await;
            out.push(summary(&v));
        }
        out
    }
}

fn summary(v: &Value) -> (String, String, String) {
    let s = |x: &Value| x.as_str().unwrap_or("").to_string();
    (
        s(&v["type"]),
        s(&v["object"]["kind"]),
        s(&v["object"]["metadata"]["name"]),
    )
}

fn ev(t: &str, kind: &str, name: &str) -> (String, String, String) {
    (t.to_string(), kind.to_string(), name.to_string())
}

// ---------------------------------------------------------------------------
// CRUD
// ---------------------------------------------------------------------------

#[tokio::test]
async fn address_space_crud() {
    let api = api("spaces");
    let created = api
        .create(
            "/api/v1/addressspaces",
            json!({
                "apiVersion": "flotilla.dev/v1",
                "kind": "AddressSpace",
                "metadata": {"name": "tenant-a", "labels": {"team": "blue"}},
                "spec": {"authentication": {"anonymous": false}},
                // The server owns status: what a client sends is replaced.
                "status": {"phase": "Bogus"},
            }),
        )
        .await;
    assert_eq!(created["kind"], "AddressSpace");
    assert_eq!(created["apiVersion"], "flotilla.dev/v1");
    assert_eq!(created["metadata"]["name"], "tenant-a");
    assert_eq!(created["metadata"]["labels"]["team"], "blue");
    assert!(created["metadata"]["creationTimestamp"].is_string());
    assert_ready(&created);
    let rv1 = rv_of(&created);

    let (s, got) = api.get("/api/v1/addressspaces/tenant-a").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got, created, "GET returns what POST stored");

    let (s, list) = api.get("/api/v1/addressspaces").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["kind"], "AddressSpaceList");
    assert_eq!(names(&list), ["tenant-a"]);
    assert!(rv_of(&list) >= rv1);

    // Replace at the version read: 200, a newer version, same creation time.
    let mut body = got.clone();
    body["spec"]["authentication"]["anonymous"] = json!(true);
    let (s, replaced) = api.put("/api/v1/addressspaces/tenant-a", body).await;
    assert_eq!(s, StatusCode::OK, "{replaced}");
    assert!(rv_of(&replaced) > rv1);
    assert_eq!(replaced["spec"]["authentication"]["anonymous"], true);
    assert_eq!(
        replaced["metadata"]["creationTimestamp"],
        created["metadata"]["creationTimestamp"]
    );
    assert_ready(&replaced);

    // PUT of a new name creates it (201); the name may come from the path.
    let (s, v) = api
        .put("/api/v1/addressspaces/tenant-b", json!({"spec": {}}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["metadata"]["name"], "tenant-b");
    // And without any spec.
    let (s, v) = api.put("/api/v1/addressspaces/tenant-c", json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    let (s, list) = api.get("/api/v1/addressspaces").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(names(&list), ["tenant-a", "tenant-b", "tenant-c"]);

    let (s, gone) = api.delete("/api/v1/addressspaces/tenant-a").await;
    assert_eq!(s, StatusCode::OK, "{gone}");
    assert_eq!(gone["metadata"]["name"], "tenant-a");
    assert_status(
        &api.get("/api/v1/addressspaces/tenant-a").await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
    assert_status(
        &api.delete("/api/v1/addressspaces/tenant-a").await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
    let (_, list) = api.get("/api/v1/addressspaces").await;
    assert_eq!(names(&list), ["tenant-b", "tenant-c"]);
}

#[tokio::test]
async fn address_crud() {
    let api = api("addresses");
    api.create_space("tenant-a").await;
    let base = "/api/v1/addressspaces/tenant-a/addresses";
    for (name, address, kind) in [
        ("orders", "orders", "queue"),
        ("prices", "prices/#", "multicast"),
        ("events", "events/*", "topic"),
        ("audit", "audit", "subscription"),
        ("rpc", "svc.rpc", "anycast"),
    ] {
        let mut body =
            json!({"metadata": {"name": name}, "spec": {"address": address, "type": kind}});
        if kind == "subscription" {
            body["spec"]["topic"] = json!("events/*");
        }
        let v = api.create(base, body).await;
        assert_eq!(v["kind"], "Address");
        assert_eq!(
            v["spec"]["addressSpace"], "tenant-a",
            "filled from the path"
        );
        assert_eq!(v["spec"]["address"], address);
        assert_eq!(v["spec"]["type"], kind);
        assert_ready(&v);
    }
    let (s, list) = api.get(base).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert_eq!(list["kind"], "AddressList");
    assert_eq!(names(&list), ["audit", "events", "orders", "prices", "rpc"]);

    let (s, got) = api.get(&format!("{base}/orders")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["spec"]["type"], "queue");

    // Replace: change the type at the version read.
    let mut body = got.clone();
    body["spec"]["type"] = json!("anycast");
    let (s, v) = api.put(&format!("{base}/orders"), body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["spec"]["type"], "anycast");
    assert!(rv_of(&v) > rv_of(&got));

    // Addresses of one space are not another's.
    api.create_space("tenant-b").await;
    let (s, list) = api.get("/api/v1/addressspaces/tenant-b/addresses").await;
    assert_eq!(s, StatusCode::OK);
    assert!(names(&list).is_empty(), "{list}");
    assert_status(
        &api.get("/api/v1/addressspaces/tenant-b/addresses/orders")
            .await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );

    let (s, _) = api.delete(&format!("{base}/orders")).await;
    assert_eq!(s, StatusCode::OK);
    assert_status(
        &api.get(&format!("{base}/orders")).await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
    let (_, list) = api.get(base).await;
    assert_eq!(names(&list), ["audit", "events", "prices", "rpc"]);
}

#[tokio::test]
async fn the_default_space_takes_addresses_without_being_created() {
    let api = api("default");
    let v = api
        .create_address("default", "orders", "orders", "queue")
        .await;
    assert_eq!(v["spec"]["addressSpace"], "default");
    let (s, list) = api.get("/api/v1/addressspaces/default/addresses").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(names(&list), ["orders"]);
    // It is implicit: not listed as an AddressSpace object.
    let (_, spaces) = api.get("/api/v1/addressspaces").await;
    assert!(names(&spaces).is_empty(), "{spaces}");
}

#[tokio::test]
async fn user_crud_and_the_password_is_never_returned() {
    let api = api("users");
    api.create_space("tenant-a").await;
    let base = "/api/v1/addressspaces/tenant-a/users";
    let created = api.create_user("tenant-a", "alice", "wonderland").await;
    assert_eq!(created["kind"], "MessagingUser");
    assert_eq!(created["spec"]["username"], "alice");
    assert_eq!(created["spec"]["addressSpace"], "tenant-a");
    assert_eq!(
        created["spec"]["authorization"][0]["operations"],
        json!(["send", "recv"])
    );
    assert_ready(&created);

    let (s, got) = api.get(&format!("{base}/alice")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, list) = api.get(base).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["kind"], "MessagingUserList");
    assert_eq!(names(&list), ["alice"]);

    // Replace without a password: the rules change, the keys stay.
    let mut body = got.clone();
    body["spec"]["authorization"] = json!([{"addresses": ["orders"], "operations": ["recv"]}]);
    let (s, replaced) = api.put(&format!("{base}/alice"), body).await;
    assert_eq!(s, StatusCode::OK, "{replaced}");
    assert_eq!(
        replaced["spec"]["authorization"][0]["operations"],
        json!(["recv"])
    );
    // Replace with a new password.
    let mut body = replaced.clone();
    body["spec"]["password"] = json!("looking-glass");
    let (s, repassworded) = api.put(&format!("{base}/alice"), body).await;
    assert_eq!(s, StatusCode::OK, "{repassworded}");

    for (what, v) in [
        ("POST", &created),
        ("GET", &got),
        ("list", &list),
        ("PUT", &replaced),
        ("PUT with a password", &repassworded),
    ] {
        let text = v.to_string();
        assert!(!has_key(v, "password"), "{what} shows the password: {v}");
        assert!(!has_key(v, "scramSha256"), "{what} shows the keys: {v}");
        assert!(
            !text.contains("wonderland") && !text.contains("looking-glass"),
            "{what}: {v}"
        );
    }

    // The watch carries the keys (routers need them), never the password;
    // a replacement without a password kept them, one with a password
    // changed them.
    let mut w = api.watch(None).await;
    let line = w.next().await; // the space
    assert_eq!(line["object"]["kind"], "AddressSpace", "{line}");
    let line = w.next().await;
    assert_eq!(line["object"]["kind"], "MessagingUser", "{line}");
    let current = line["object"]["spec"]["scramSha256"].clone();

    // From just before the user: created, replaced (keys kept), replaced
    // with a new password (new keys).
    let mut w = api.watch(Some(&(rv_of(&created) - 1).to_string())).await;
    let mut keys = Vec::new();
    for want in ["ADDED", "MODIFIED", "MODIFIED"] {
        let line = w.next().await;
        assert_eq!(summary(&line), ev(want, "MessagingUser", "alice"));
        assert!(!has_key(&line, "password"), "{line}");
        let text = line.to_string();
        assert!(!text.contains("wonderland") && !text.contains("looking-glass"));
        let k = line["object"]["spec"]["scramSha256"].clone();
        for f in ["salt", "storedKey", "serverKey"] {
            assert!(k[f].as_str().is_some_and(|s| !s.is_empty()), "{f}: {line}");
        }
        assert!(
            k["iterations"].as_u64().is_some_and(|i| i >= 4096),
            "{line}"
        );
        keys.push(k);
    }
    assert_eq!(
        keys[0], keys[1],
        "a replacement without a password keeps the keys"
    );
    assert_ne!(keys[1], keys[2], "a new password makes new keys");
    assert_eq!(keys[2], current);

    let (s, _) = api.delete(&format!("{base}/alice")).await;
    assert_eq!(s, StatusCode::OK);
    assert_status(
        &api.get(&format!("{base}/alice")).await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
}

#[tokio::test]
async fn the_store_survives_a_restart() {
    let api = api("restart");
    api.create_space("tenant-a").await;
    api.create_address("tenant-a", "orders", "orders", "queue")
        .await;
    let Api { app, dir } = api;
    drop(app);
    let api = Api {
        app: app_in(&dir),
        dir,
    };
    let (s, v) = api
        .get("/api/v1/addressspaces/tenant-a/addresses/orders")
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["spec"]["address"], "orders");
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn invalid_bodies_are_refused_with_clear_errors() {
    let api = api("validation");
    api.create_space("tenant-a").await;
    let spaces = "/api/v1/addressspaces";
    let addresses = "/api/v1/addressspaces/tenant-a/addresses";
    let users = "/api/v1/addressspaces/tenant-a/users";
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;

    // Names must be DNS labels.
    let long = "x".repeat(64);
    for bad in ["Tenant", "under_score", "-dash", "dash-", "", long.as_str()] {
        let got = api.post(spaces, json!({"metadata": {"name": bad}})).await;
        if bad.is_empty() {
            assert!(got.0.is_client_error(), "empty name: {}", got.1);
            continue;
        }
        assert_status(&got, unprocessable, "Invalid");
        assert!(
            got.1["message"].as_str().unwrap_or("").contains("DNS"),
            "{bad:?}: {}",
            got.1
        );
    }
    assert_status(
        &api.post(
            addresses,
            json!({"metadata": {"name": "Orders"}, "spec": {"address": "orders", "type": "queue"}}),
        )
        .await,
        unprocessable,
        "Invalid",
    );
    // No name at all.
    assert_status(
        &api.post(spaces, json!({"spec": {}})).await,
        unprocessable,
        "Invalid",
    );

    // Unknown fields, anywhere.
    for body in [
        json!({"metadata": {"name": "x"}, "spec": {"adress": "x", "type": "queue"}}),
        json!({"metadata": {"name": "x", "nmae": "y"}, "spec": {"address": "x", "type": "queue"}}),
        json!({"metadata": {"name": "x"}, "spec": {"address": "x", "type": "queue"}, "extra": 1}),
    ] {
        let got = api.post(addresses, body.clone()).await;
        assert_status(&got, unprocessable, "Invalid");
        assert!(
            got.1["message"]
                .as_str()
                .unwrap_or("")
                .contains("unknown field"),
            "{body}: {}",
            got.1
        );
    }
    assert_status(
        &api.post(
            spaces,
            json!({"metadata": {"name": "t"}, "spec": {"plna": "small"}}),
        )
        .await,
        unprocessable,
        "Invalid",
    );

    // Bad values.
    for (body, says) in [
        (
            json!({"metadata": {"name": "p"}, "spec": {"address": "prices/#", "type": "anycast"}}),
            "pattern",
        ),
        (
            json!({"metadata": {"name": "p"}, "spec": {"address": "prices/*", "type": "queue"}}),
            "pattern",
        ),
        (
            json!({"metadata": {"name": "s"}, "spec": {"address": "audit", "type": "subscription"}}),
            "topic",
        ),
        (
            json!({"metadata": {"name": "q"}, "spec": {"address": "q", "type": "queue", "topic": "t"}}),
            "topic",
        ),
        (
            json!({"metadata": {"name": "q"}, "spec": {"address": "has space", "type": "queue"}}),
            "address",
        ),
        (
            json!({"metadata": {"name": "q"}, "spec": {"address": "q", "type": "fifo"}}),
            "fifo",
        ),
        (
            json!({"metadata": {"name": "q"}, "spec": {"type": "queue"}}),
            "address",
        ),
        (
            json!({"apiVersion": "v2", "metadata": {"name": "q"}, "spec": {"address": "q", "type": "queue"}}),
            "apiVersion",
        ),
        (json!({"metadata": {"name": "q"}}), "spec"),
    ] {
        let got = api.post(addresses, body.clone()).await;
        assert_status(&got, unprocessable, "Invalid");
        assert!(
            got.1["message"].as_str().unwrap_or("").contains(says),
            "{body}: expected the message to mention {says:?}: {}",
            got.1
        );
    }

    // Users: a password to create; usernames without '@'; keys are ours.
    let mut body = user_body("bob", "x");
    body["spec"].as_object_mut().unwrap().remove("password");
    let got = api.post(users, body.clone()).await;
    assert_status(&got, unprocessable, "Invalid");
    assert!(
        got.1["message"].as_str().unwrap().contains("password"),
        "{}",
        got.1
    );
    // PUT creating a user needs one too.
    assert_status(
        &api.put(&format!("{users}/bob"), body).await,
        unprocessable,
        "Invalid",
    );
    assert_status(
        &api.post(users, user_body("bob", "")).await,
        unprocessable,
        "Invalid",
    );
    let mut body = user_body("bob", "x");
    body["spec"]["username"] = json!("bob@tenant-b");
    assert_status(&api.post(users, body).await, unprocessable, "Invalid");
    let mut body = user_body("bob", "x");
    body["spec"]["scramSha256"] =
        json!({"salt": "AA==", "iterations": 1, "storedKey": "AA==", "serverKey": "AA=="});
    assert_status(&api.post(users, body).await, unprocessable, "Invalid");
    let mut body = user_body("bob", "x");
    body["spec"]["authorization"] = json!([{"addresses": ["a"], "operations": ["delete"]}]);
    assert_status(&api.post(users, body).await, unprocessable, "Invalid");

    // The path and the body disagree: 400.
    let bad_request = StatusCode::BAD_REQUEST;
    assert_status(
        &api.put(
            &format!("{addresses}/orders"),
            json!({"metadata": {"name": "other"}, "spec": {"address": "orders", "type": "queue"}}),
        )
        .await,
        bad_request,
        "BadRequest",
    );
    assert_status(
        &api.put(
            "/api/v1/addressspaces/tenant-a",
            json!({"metadata": {"name": "tenant-b"}}),
        )
        .await,
        bad_request,
        "BadRequest",
    );
    assert_status(
        &api.post(
            addresses,
            json!({"metadata": {"name": "orders"}, "spec": {"addressSpace": "tenant-b", "address": "orders", "type": "queue"}}),
        )
        .await,
        bad_request,
        "BadRequest",
    );
    assert_status(
        &api.post(
            addresses,
            json!({"kind": "MessagingUser", "metadata": {"name": "orders"}, "spec": {"address": "orders", "type": "queue"}}),
        )
        .await,
        bad_request,
        "BadRequest",
    );
    assert_status(
        &api.post(addresses, json!(["not", "an", "object"])).await,
        bad_request,
        "BadRequest",
    );
    assert_status(
        &api.put(
            &format!("{addresses}/orders"),
            json!({"metadata": {"resourceVersion": "seven"}, "spec": {"address": "orders", "type": "queue"}}),
        )
        .await,
        bad_request,
        "BadRequest",
    );
    assert_status(
        &api.put(
            &format!("{addresses}/orders"),
            json!({"metadata": {"resourceVersion": 7}, "spec": {"address": "orders", "type": "queue"}}),
        )
        .await,
        bad_request,
        "BadRequest",
    );

    // Nothing refused was stored, and nothing was written to the log.
    let (_, list) = api.get(addresses).await;
    assert!(names(&list).is_empty(), "{list}");
    let (_, list) = api.get(users).await;
    assert!(names(&list).is_empty(), "{list}");
    let (_, list) = api.get(spaces).await;
    assert_eq!(names(&list), ["tenant-a"]);
    assert_eq!(rv_of(&list), 1, "only the space was ever written");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_client_error() {
    let api = api("notjson");
    let post = |content_type: Option<&'static str>, body: &'static str| {
        let app = api.app.clone();
        async move {
            let mut r = Request::builder()
                .method(Method::POST)
                .uri("/api/v1/addressspaces")
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
            if let Some(t) = content_type {
                r = r.header(header::CONTENT_TYPE, t);
            }
            let req = r.body(Body::from(body)).unwrap();
            app.oneshot(req).await.unwrap().status()
        }
    };
    let status = post(Some("application/json"), "{not json").await;
    assert!(status.is_client_error(), "{status}");
    // JSON is read whatever the Content-Type says (`curl -d` sends a form
    // type), and what is not JSON is still refused.
    assert_eq!(
        post(None, r#"{"metadata":{"name":"a"}}"#).await,
        StatusCode::CREATED,
        "JSON without a content type"
    );
    assert_eq!(
        post(Some("application/x-www-form-urlencoded"), "name=b").await,
        StatusCode::BAD_REQUEST,
        "a form body"
    );
}

// ---------------------------------------------------------------------------
// Conflicts
// ---------------------------------------------------------------------------

#[tokio::test]
async fn conflicts_create_twice_and_stale_resource_versions() {
    let api = api("conflicts");
    api.create_space("tenant-a").await;
    let got = api
        .post(
            "/api/v1/addressspaces",
            json!({"metadata": {"name": "tenant-a"}}),
        )
        .await;
    assert_status(&got, StatusCode::CONFLICT, "AlreadyExists");
    assert!(
        got.1["message"].as_str().unwrap().contains("tenant-a"),
        "{}",
        got.1
    );

    let base = "/api/v1/addressspaces/tenant-a/addresses";
    let v1 = api
        .create_address("tenant-a", "orders", "orders", "queue")
        .await;
    assert_status(
        &api.post(
            base,
            json!({"metadata": {"name": "orders"}, "spec": {"address": "orders", "type": "anycast"}}),
        )
        .await,
        StatusCode::CONFLICT,
        "AlreadyExists",
    );
    api.create_user("tenant-a", "alice", "wonderland").await;
    assert_status(
        &api.post(
            "/api/v1/addressspaces/tenant-a/users",
            user_body("alice", "other"),
        )
        .await,
        StatusCode::CONFLICT,
        "AlreadyExists",
    );

    // Two writers read v1; the first wins, the second is told to read again.
    let mut first = v1.clone();
    first["spec"]["type"] = json!("anycast");
    let (s, v2) = api.put(&format!("{base}/orders"), first).await;
    assert_eq!(s, StatusCode::OK, "{v2}");
    let mut second = v1.clone();
    second["spec"]["type"] = json!("multicast");
    let got = api.put(&format!("{base}/orders"), second.clone()).await;
    assert_status(&got, StatusCode::CONFLICT, "Conflict");
    let (_, now) = api.get(&format!("{base}/orders")).await;
    assert_eq!(
        now["spec"]["type"], "anycast",
        "the stale write changed nothing"
    );
    assert_eq!(rv_of(&now), rv_of(&v2));
    // At the current version it goes through.
    second["metadata"]["resourceVersion"] = now["metadata"]["resourceVersion"].clone();
    let (s, v3) = api.put(&format!("{base}/orders"), second).await;
    assert_eq!(s, StatusCode::OK, "{v3}");
    assert_eq!(v3["spec"]["type"], "multicast");

    // Stale versions on a space and a user too.
    let (_, space) = api.get("/api/v1/addressspaces/tenant-a").await;
    let mut body = space.clone();
    body["metadata"]["resourceVersion"] = json!("1");
    assert_eq!(rv_of(&space), 1, "the space was the first write");
    assert_eq!(
        api.put("/api/v1/addressspaces/tenant-a", body).await.0,
        StatusCode::OK
    );
    let mut body = space.clone();
    body["metadata"]["resourceVersion"] = json!("1");
    assert_status(
        &api.put("/api/v1/addressspaces/tenant-a", body).await,
        StatusCode::CONFLICT,
        "Conflict",
    );
    let (_, alice) = api.get("/api/v1/addressspaces/tenant-a/users/alice").await;
    let (s, _) = api
        .put("/api/v1/addressspaces/tenant-a/users/alice", alice.clone())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_status(
        &api.put("/api/v1/addressspaces/tenant-a/users/alice", alice)
            .await,
        StatusCode::CONFLICT,
        "Conflict",
    );

    // A version given for an object that does not exist: not created.
    let got = api
        .put(
            &format!("{base}/nothing"),
            json!({"metadata": {"resourceVersion": "3"}, "spec": {"address": "nothing", "type": "queue"}}),
        )
        .await;
    assert!(
        got.0 == StatusCode::NOT_FOUND || got.0 == StatusCode::CONFLICT,
        "{got:?}"
    );
    assert_status(
        &api.get(&format!("{base}/nothing")).await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
}

// ---------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_api_call_needs_the_admin_token() {
    let api = api("auth");
    api.create_space("tenant-a").await;
    let calls: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/api/v1/addressspaces", None),
        (
            Method::POST,
            "/api/v1/addressspaces",
            Some(json!({"metadata": {"name": "evil"}})),
        ),
        (Method::GET, "/api/v1/addressspaces/tenant-a", None),
        (
            Method::PUT,
            "/api/v1/addressspaces/tenant-a",
            Some(json!({"spec": {"authentication": {"anonymous": true}}})),
        ),
        (Method::DELETE, "/api/v1/addressspaces/tenant-a", None),
        (
            Method::GET,
            "/api/v1/addressspaces/tenant-a/addresses",
            None,
        ),
        (
            Method::POST,
            "/api/v1/addressspaces/tenant-a/users",
            Some(user_body("mallory", "x")),
        ),
        (
            Method::GET,
            "/api/v1/addressspaces/tenant-a/users/alice",
            None,
        ),
        (Method::GET, "/api/v1/watch", None),
        (Method::GET, "/api/v1/watch?resourceVersion=1", None),
        (Method::GET, "/api/v1/overview", None),
        (Method::GET, "/api/v1/mesh", None),
        (Method::GET, "/api/v1/components/router/r1", None),
        (Method::GET, "/api/v1/addressspaces/tenant-a/usage", None),
        (
            Method::GET,
            "/api/v1/addressspaces/tenant-a/metrics?addresses=a",
            None,
        ),
        (
            Method::GET,
            "/api/v1/addressspaces/tenant-a/addresses?sort=rate&order=desc",
            None,
        ),
        (
            Method::GET,
            "/api/v1/addressspaces/tenant-a/addresses/a/history",
            None,
        ),
    ];
    for (method, uri, body) in calls {
        for token in [
            None,
            Some("wrong-token"),
            Some(""),
            Some(&TOKEN[..TOKEN.len() - 1]),
        ] {
            let got = api.call_as(token, method.clone(), uri, body.clone()).await;
            assert_status(&got, StatusCode::UNAUTHORIZED, "Unauthorized");
            assert!(
                !got.1.to_string().contains(TOKEN),
                "the error gives the token away: {}",
                got.1
            );
        }
    }
    // Not a bearer token.
    let res = api
        .app
        .clone()
        .oneshot(
            Request::builder()
                .uri("/api/v1/addressspaces")
                .header(header::AUTHORIZATION, format!("Basic {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    // Nothing the refused calls asked for happened.
    let (s, list) = api.get("/api/v1/addressspaces").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(names(&list), ["tenant-a"]);
    let (_, space) = api.get("/api/v1/addressspaces/tenant-a").await;
    assert_eq!(rv_of(&space), 1);

    // Health checks need no token.
    for uri in ["/healthz", "/readyz"] {
        let res = api
            .app
            .clone()
            .oneshot(request(Method::GET, uri, None, None))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{uri}");
    }
}

// ---------------------------------------------------------------------------
// Lists, paging, 404s, cascade
// ---------------------------------------------------------------------------

#[tokio::test]
async fn lists_page_with_limit_and_continue() {
    let api = api("paging");
    api.create_space("tenant-a").await;
    // A neighbouring space whose keys sort right after: never in the pages.
    api.create_space("tenant-a2").await;
    api.create_address("tenant-a2", "zz", "zz", "queue").await;
    let want: Vec<String> = (0..25).map(|i| format!("a{i:02}")).collect();
    for n in &want {
        api.create_address("tenant-a", n, n, "anycast").await;
    }
    let mut seen = Vec::new();
    let mut cont: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let uri = match &cont {
            Some(c) => format!("/api/v1/addressspaces/tenant-a/addresses?limit=10&continue={c}"),
            None => "/api/v1/addressspaces/tenant-a/addresses?limit=10".to_string(),
        };
        let (s, page) = api.get(&uri).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let got = names(&page);
        pages.push(got.len());
        seen.extend(got);
        match page["metadata"]["continue"].as_str() {
            Some(c) => cont = Some(c.to_string()),
            None => break,
        }
        assert!(pages.len() < 10, "paging does not end");
    }
    assert_eq!(pages, [10, 10, 5]);
    assert_eq!(seen, want, "every address once, in order");

    // An exact multiple: the last full page says there is no more.
    let (_, page) = api
        .get("/api/v1/addressspaces/tenant-a/addresses?limit=25")
        .await;
    assert_eq!(names(&page).len(), 25);
    assert!(page["metadata"].get("continue").is_none(), "{page}");
    // No limit: everything.
    let (_, page) = api.get("/api/v1/addressspaces/tenant-a/addresses").await;
    assert_eq!(names(&page), want);
    // Spaces page too.
    let (_, page) = api.get("/api/v1/addressspaces?limit=1").await;
    assert_eq!(names(&page), ["tenant-a"]);
    let c = page["metadata"]["continue"].as_str().expect("more spaces");
    let (_, page) = api
        .get(&format!("/api/v1/addressspaces?limit=1&continue={c}"))
        .await;
    assert_eq!(names(&page), ["tenant-a2"]);
    assert!(page["metadata"].get("continue").is_none(), "{page}");
}

#[tokio::test]
async fn address_lists_sort_by_any_column_filter_and_count() {
    let api = api("sorting");
    api.create_space("tenant-a").await;
    for (n, kind) in [
        ("a1", "queue"),
        ("a2", "anycast"),
        ("b1", "queue"),
        ("b2", "multicast"),
    ] {
        api.create_address("tenant-a", n, &format!("x-{n}"), kind)
            .await;
    }
    let page = |q: &'static str| {
        let api = &api;
        async move {
            let (s, v) = api
                .get(&format!("/api/v1/addressspaces/tenant-a/addresses?{q}"))
                .await;
            assert_eq!(s, StatusCode::OK, "{q}: {v}");
            v
        }
    };
    // By type, descending, two at a time: by position, and the total.
    let v = page("sort=type&order=desc&limit=2").await;
    assert_eq!(names(&v), ["a1", "b1"]);
    assert_eq!(v["metadata"]["total"], 4);
    let c = v["metadata"]["continue"]
        .as_str()
        .expect("more")
        .to_string();
    let (_, v) = api
        .get(&format!(
            "/api/v1/addressspaces/tenant-a/addresses?sort=type&order=desc&limit=2&continue={c}"
        ))
        .await;
    assert_eq!(names(&v), ["b2", "a2"]);
    assert!(v["metadata"].get("continue").is_none(), "{v}");
    // A filter on name or address, with its own total.
    let v = page("filter=b&sort=address").await;
    assert_eq!(
        (names(&v), v["metadata"]["total"].clone()),
        (vec!["b1".to_string(), "b2".into()], json!(2))
    );
    // A live column with no reports: all zero, by name.
    let v = page("sort=rate&order=desc").await;
    assert_eq!(v["metadata"]["total"], 4);
    // Nonsense is a 400 that says what is allowed.
    let (s, v) = api
        .get("/api/v1/addressspaces/tenant-a/addresses?sort=colour")
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("rate")),
        "{v}"
    );
    let (s, _) = api
        .get("/api/v1/addressspaces/tenant-a/addresses?order=up")
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = api
        .get("/api/v1/addressspaces/tenant-a/users?sort=name")
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A deleted address leaves the list (and its kept orderings).
    let (s, _) = api
        .delete("/api/v1/addressspaces/tenant-a/addresses/b1")
        .await;
    assert_eq!(s, StatusCode::OK);
    let v = page("sort=type&order=desc").await;
    assert_eq!(names(&v), ["a1", "b2", "a2"]);
}

#[tokio::test]
async fn overview_map_usage_and_live_numbers_come_from_the_reports() {
    let api = api("views");
    let mut plan = json!({"metadata": {"name": "tenant-a"}, "spec": {"plan": "small"}});
    plan["spec"]["authentication"] = json!({"anonymous": true});
    let (s, v) = api.post("/api/v1/addressspaces", plan).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    api.create_address("tenant-a", "orders", "orders", "queue")
        .await;
    let router = |id: &str, rid: &str, peers: Value| {
        json!({
            "component": "router", "id": id, "routerId": rid, "edge": false, "peers": peers,
            "containers": ["b1"], "gateways": [], "spaceLinks": {"tenant-a": 3},
            "connections": [{"id": 7, "space": "tenant-a", "addr": "127.0.0.1:1", "container": "c", "links": 3}],
            "addresses": [{"space": "tenant-a", "address": "alerts", "senders": 1, "receivers": 2, "delivered": 10, "rate": 5}],
            "links": [{"space": "tenant-a", "address": "orders", "connection": 7, "dir": "in", "routed": true}],
        })
    };
    for r in [
        router("r1", "r1", json!(["r2"])),
        router("r2", "r2", json!(["r1"])),
    ] {
        let (s, v) = api.post("/api/v1/reports", r).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, _) = api
        .post("/api/v1/reports", json!({"component": "broker", "id": "b1", "queues": [
            {"space": "tenant-a", "address": "orders", "depth": 4, "bytes": 400, "consumers": 1, "acknowledged": 2, "inRate": 3, "outRate": 1}
        ]}))
        .await;
    assert_eq!(s, StatusCode::OK);
    // The map: two routers linked, the broker on both.
    let (s, m) = api.get("/api/v1/mesh").await;
    assert_eq!(s, StatusCode::OK, "{m}");
    let ids: Vec<&str> = m["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 3, "{m}");
    assert!(
        m["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "up"),
        "{m}"
    );
    let edges: Vec<(String, String)> = m["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["from"].as_str().unwrap().into(),
                e["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        edges.contains(&("router/r1".into(), "router/r2".into())),
        "{m}"
    );
    assert!(
        edges.contains(&("router/r1".into(), "broker/b1".into())),
        "{m}"
    );
    // A node's page.
    let (s, c) = api.get("/api/v1/components/router/r1").await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["connections"][0]["id"], 7);
    assert_eq!(c["addresses"][0]["address"], "alerts");
    let (s, _) = api.get("/api/v1/components/router/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The overview's totals.
    let (s, o) = api.get("/api/v1/overview").await;
    assert_eq!(s, StatusCode::OK, "{o}");
    assert_eq!(o["totals"]["addresses"], 1);
    assert_eq!(o["totals"]["connections"], 2, "one on each router");
    // Each router: one sender to a router-held address, one routed to a broker.
    assert_eq!(o["totals"]["senders"], 4);
    // The space's plan, quotas and use.
    let (s, u) = api.get("/api/v1/addressspaces/tenant-a/usage").await;
    assert_eq!(s, StatusCode::OK, "{u}");
    assert_eq!(u["plan"], "small");
    assert_eq!(u["quotas"]["addresses"], json!({"used": 1, "limit": 100}));
    assert_eq!(u["quotas"]["connections"]["used"], 2);
    assert_eq!(u["quotas"]["links"]["used"], 6);
    assert_eq!(u["quotas"]["storedBytes"]["used"], 400);
    // Live numbers for some addresses only.
    let (s, v) = api
        .get("/api/v1/addressspaces/tenant-a/metrics?addresses=orders")
        .await;
    assert_eq!(s, StatusCode::OK);
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(
        (items[0]["stored"].clone(), items[0]["storedRate"].clone()),
        (json!(4), json!(3))
    );
    assert_eq!(
        items[0]["senders"], 2,
        "routed senders, one per router: {v}"
    );
    // Sorted by a live column.
    api.create_address("tenant-a", "alerts", "alerts", "anycast")
        .await;
    let (_, v) = api
        .get("/api/v1/addressspaces/tenant-a/addresses?sort=stored&order=desc")
        .await;
    assert_eq!(names(&v), ["orders", "alerts"]);
    // An address with no history yet says so.
    let (s, h) = api
        .get("/api/v1/addressspaces/tenant-a/addresses/orders/history")
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["kept"], false);
}

#[tokio::test]
async fn missing_spaces_and_objects_are_404() {
    let api = api("notfound");
    let nf = StatusCode::NOT_FOUND;
    for uri in [
        "/api/v1/addressspaces/nope",
        "/api/v1/addressspaces/nope/addresses",
        "/api/v1/addressspaces/nope/addresses/orders",
        "/api/v1/addressspaces/nope/users",
        "/api/v1/addressspaces/nope/users/alice",
        "/api/v1/no-such-collection",
        "/no/such/path",
    ] {
        assert_status(&api.get(uri).await, nf, "NotFound");
    }
    for uri in [
        "/api/v1/addressspaces/nope",
        "/api/v1/addressspaces/nope/addresses/orders",
        "/api/v1/addressspaces/nope/users/alice",
    ] {
        assert_status(&api.delete(uri).await, nf, "NotFound");
    }
    // Nothing is created in a space that does not exist.
    let got = api
        .post(
            "/api/v1/addressspaces/nope/addresses",
            json!({"metadata": {"name": "orders"}, "spec": {"address": "orders", "type": "queue"}}),
        )
        .await;
    assert_status(&got, nf, "NotFound");
    assert!(
        got.1["message"].as_str().unwrap().contains("nope"),
        "{}",
        got.1
    );
    assert_status(
        &api.put(
            "/api/v1/addressspaces/nope/addresses/orders",
            json!({"spec": {"address": "orders", "type": "queue"}}),
        )
        .await,
        nf,
        "NotFound",
    );
    assert_status(
        &api.post("/api/v1/addressspaces/nope/users", user_body("alice", "x"))
            .await,
        nf,
        "NotFound",
    );
    // In a space that exists, a missing object.
    api.create_space("tenant-a").await;
    for uri in [
        "/api/v1/addressspaces/tenant-a/addresses/orders",
        "/api/v1/addressspaces/tenant-a/users/alice",
    ] {
        let got = api.get(uri).await;
        assert_status(&got, nf, "NotFound");
        assert_status(&api.delete(uri).await, nf, "NotFound");
    }
}

#[tokio::test]
async fn deleting_a_space_deletes_its_addresses_and_users() {
    let api = api("cascade");
    api.create_space("tenant-a").await;
    api.create_space("tenant-b").await;
    api.create_address("tenant-a", "orders", "orders", "queue")
        .await;
    api.create_address("tenant-a", "prices", "prices/#", "multicast")
        .await;
    api.create_user("tenant-a", "alice", "wonderland").await;
    api.create_address("tenant-b", "orders", "orders", "queue")
        .await;
    api.create_user("tenant-b", "bob", "builder").await;
    let (_, before) = api.get("/api/v1/addressspaces").await;
    let rv = rv_of(&before);

    let (s, gone) = api.delete("/api/v1/addressspaces/tenant-a").await;
    assert_eq!(s, StatusCode::OK, "{gone}");
    assert_eq!(gone["metadata"]["name"], "tenant-a");
    for uri in [
        "/api/v1/addressspaces/tenant-a/addresses/orders",
        "/api/v1/addressspaces/tenant-a/addresses/prices",
        "/api/v1/addressspaces/tenant-a/users/alice",
        "/api/v1/addressspaces/tenant-a/addresses",
    ] {
        assert_status(&api.get(uri).await, StatusCode::NOT_FOUND, "NotFound");
    }
    // The other space keeps its own.
    let (_, list) = api.get("/api/v1/addressspaces/tenant-b/addresses").await;
    assert_eq!(names(&list), ["orders"]);
    let (_, list) = api.get("/api/v1/addressspaces/tenant-b/users").await;
    assert_eq!(names(&list), ["bob"]);

    // Watchers see what the space owned go first, then the space.
    let mut w = api.watch(Some(&rv.to_string())).await;
    let mut got = w.next_n(4).await;
    assert_eq!(
        got.pop(),
        Some(ev("DELETED", "AddressSpace", "tenant-a")),
        "the space goes last"
    );
    got.sort();
    assert_eq!(
        got,
        [
            ev("DELETED", "Address", "orders"),
            ev("DELETED", "Address", "prices"),
            ev("DELETED", "MessagingUser", "alice"),
        ]
    );

    // Made again, the space starts empty.
    api.create_space("tenant-a").await;
    let (s, list) = api.get("/api/v1/addressspaces/tenant-a/addresses").await;
    assert_eq!(s, StatusCode::OK);
    assert!(names(&list).is_empty(), "{list}");
    let (_, list) = api.get("/api/v1/addressspaces/tenant-a/users").await;
    assert!(names(&list).is_empty(), "{list}");
    // The watch goes on live.
    assert_eq!(w.next_n(1).await, [ev("ADDED", "AddressSpace", "tenant-a")]);
}

// ---------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------

#[tokio::test]
async fn watch_from_the_start_lists_everything_then_follows() {
    let api = api("watch-all");
    api.create_space("tenant-a").await;
    api.create_address("tenant-a", "orders", "orders", "queue")
        .await;
    api.create_user("tenant-a", "alice", "wonderland").await;
    api.create_address("default", "jobs", "jobs", "anycast")
        .await;
    let mut want = vec![
        ev("ADDED", "Address", "jobs"),
        ev("ADDED", "Address", "orders"),
        ev("ADDED", "AddressSpace", "tenant-a"),
        ev("ADDED", "MessagingUser", "alice"),
    ];

    // Without a version and with 0: every object as ADDED, then changes
    // as they happen, each once.
    for (rv, live) in [(None, "live-none"), (Some("0"), "live-zero")] {
        let (_, list) = api.get("/api/v1/addressspaces").await;
        let now = rv_of(&list);
        let mut w = api.watch(rv).await;
        let mut first = Vec::new();
        for _ in 0..want.len() {
            let line = w.next().await;
            assert!(rv_of(&line["object"]) <= now, "{line}");
            first.push(summary(&line));
        }
        first.sort();
        want.sort();
        assert_eq!(first, want, "watch from {rv:?}");
        api.create_address("tenant-a", live, live, "anycast").await;
        let line = w.next().await;
        assert_eq!(summary(&line), ev("ADDED", "Address", live));
        assert!(rv_of(&line["object"]) > now);
        want.push(ev("ADDED", "Address", live));
    }

    let mut w = api.watch(None).await;
    w.next_n(want.len()).await;
    let (_, orders) = api
        .get("/api/v1/addressspaces/tenant-a/addresses/orders")
        .await;
    let mut body = orders.clone();
    body["spec"]["type"] = json!("anycast");
    api.put("/api/v1/addressspaces/tenant-a/addresses/orders", body)
        .await;
    api.delete("/api/v1/addressspaces/tenant-a/addresses/orders")
        .await;
    let m = w.next().await;
    assert_eq!(summary(&m), ev("MODIFIED", "Address", "orders"));
    assert_eq!(m["object"]["spec"]["type"], "anycast");
    let d = w.next().await;
    assert_eq!(summary(&d), ev("DELETED", "Address", "orders"));
    assert!(rv_of(&d["object"]) > rv_of(&m["object"]));
}

#[tokio::test]
async fn watch_resumes_after_a_resource_version() {
    let api = api("watch-resume");
    api.create_space("tenant-a").await; // 1
    api.create_address("tenant-a", "a1", "a1", "queue").await; // 2
    let a2 = api.create_address("tenant-a", "a2", "a2", "queue").await; // 3
    let mark = rv_of(&a2);
    api.create_address("tenant-a", "a3", "a3", "queue").await; // 4
    let mut body = a2.clone();
    body["spec"]["type"] = json!("anycast");
    api.put("/api/v1/addressspaces/tenant-a/addresses/a2", body)
        .await; // 5
    api.delete("/api/v1/addressspaces/tenant-a/addresses/a1")
        .await; // 6
    api.create_user("tenant-a", "alice", "wonderland").await; // 7

    let mut w = api.watch(Some(&mark.to_string())).await;
    let mut versions = Vec::new();
    let mut got = Vec::new();
    for _ in 0..4 {
        let line = w.next().await;
        versions.push(rv_of(&line["object"]));
        got.push(summary(&line));
    }
    assert_eq!(
        got,
        [
            ev("ADDED", "Address", "a3"),
            ev("MODIFIED", "Address", "a2"),
            ev("DELETED", "Address", "a1"),
            ev("ADDED", "MessagingUser", "alice"),
        ],
        "only the changes after {mark}, in order"
    );
    assert_eq!(versions, [4, 5, 6, 7]);
    // Nothing else was queued before the next live change.
    api.create_address("tenant-a", "a4", "a4", "queue").await;
    assert_eq!(w.next_n(1).await, [ev("ADDED", "Address", "a4")]);

    // Resuming at the newest version replays nothing: the next line is
    // the next change.
    let mut w = api.watch(Some("8")).await;
    api.create_address("tenant-a", "a5", "a5", "queue").await;
    let line = w.next().await;
    assert_eq!(summary(&line), ev("ADDED", "Address", "a5"));
    assert_eq!(rv_of(&line["object"]), 9);

    // A version that is not a number is refused.
    assert_status(
        &api.get("/api/v1/watch?resourceVersion=yesterday").await,
        StatusCode::BAD_REQUEST,
        "BadRequest",
    );
    // 410 Gone needs more than 200,000 changes to trim the log: not
    // exercised here (store::changes_since returns Gone; the API maps it).
}

/// `/metrics` (Prometheus text) needs the token, counts what the store
/// holds, and shows what components report; `/openapi.json` describes the
/// API.
#[tokio::test]
async fn metrics_and_openapi() {
    let api = api("metrics");
    api.create_space("m").await;
    api.create(
        "/api/v1/addressspaces/m/addresses",
        json!({"metadata": {"name": "q"}, "spec": {"address": "q", "type": "queue"}}),
    )
    .await;
    let (s, _) = api
        .call(
            Method::POST,
            "/api/v1/reports",
            Some(json!({"component": "broker", "id": "b1", "queues": [
                {"space": "m", "address": "q", "depth": 7, "acknowledged": 2}
            ]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let text = |token: Option<&str>| {
        let app = api.app.clone();
        let token = token.map(str::to_string);
        async move {
            let res = app
                .oneshot(request(Method::GET, "/metrics", token.as_deref(), None))
                .await
                .expect("infallible");
            let status = res.status();
            let b = res.into_body().collect().await.expect("body").to_bytes();
            (status, String::from_utf8_lossy(&b).into_owned())
        }
    };
    let (s, _) = text(None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, body) = text(Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        body.contains("flotilla_objects{kind=\"Address\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("flotilla_queue_depth{broker=\"b1\",space=\"m\",queue=\"q\"} 7"),
        "{body}"
    );
    let (s, doc) = api.call_as(None, Method::GET, "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        doc["paths"]["/api/v1/addressspaces/{space}/addresses"]["post"].is_object(),
        "{doc}"
    );
    assert!(doc["components"]["schemas"]["Address"].is_object());
}

/// A broker's report, as brokers post it every second.
fn broker_report(id: &str) -> Value {
    json!({"component": "broker", "id": id, "queues": []})
}

#[tokio::test]
async fn brokers_register_by_reporting_hold_their_queues_and_move_only_when_retired() {
    let api = api("brokers");
    // A queue made before any broker exists waits unplaced.
    let early = api
        .create_address("default", "early", "early", "queue")
        .await;
    assert!(early["status"].get("broker").is_none(), "{early}");
    let (s, _) = api.post("/api/v1/reports", broker_report("b1")).await;
    assert_eq!(s, StatusCode::OK);
    let (_, list) = api.get("/api/v1/brokers").await;
    assert_eq!(names(&list), ["b1"]);
    assert_eq!(list["items"][0]["status"]["phase"], "Ready");
    // Registering placed the waiting queue; new ones are placed at once.
    let (_, early) = api
        .get("/api/v1/addressspaces/default/addresses/early")
        .await;
    assert_eq!(early["status"]["broker"], "b1", "{early}");
    let jobs = api.create_address("default", "jobs", "jobs", "queue").await;
    assert_eq!(jobs["status"]["broker"], "b1");
    // Direct addresses are never placed; a pinned one stays pinned.
    let any = api.create_address("default", "any", "any", "anycast").await;
    assert!(any["status"].get("broker").is_none());
    // A second broker joining takes nothing already placed, and a
    // rewritten address keeps its broker.
    api.post("/api/v1/reports", broker_report("b2")).await;
    let (s, jobs) = api
        .put(
            "/api/v1/addressspaces/default/addresses/jobs",
            json!({"metadata": {"name": "jobs"}, "spec": {"address": "jobs", "type": "queue"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{jobs}");
    assert_eq!(jobs["status"]["broker"], "b1");
    // A reporting broker is not retired.
    let got = api.delete("/api/v1/brokers/b1").await;
    assert_status(&got, StatusCode::CONFLICT, "Conflict");
    let got = api.delete("/api/v1/brokers/nobody").await;
    assert_status(&got, StatusCode::NOT_FOUND, "NotFound");
    // The watch carries the registry to routers.
    let mut w = api.watch(None).await;
    let mut brokers = Vec::new();
    for _ in 0..5 {
        let l = w.next().await;
        if l["object"]["kind"] == "Broker" {
            brokers.push(
                l["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
    }
    brokers.sort();
    assert_eq!(brokers, ["b1", "b2"]);
}
