//! A fake Kubernetes API server for tests: kube's `Client` over a
//! `tower_test` mock, answered by an in-memory store that speaks the API's
//! paths, create (POST), replace (PUT, with resourceVersion checks),
//! server-side apply and merge patches, label selectors, the status
//! subresource and delete. Every write gets the next resource version, as
//! etcd's revision. Every request is recorded, so a test can say what was
//! done, and what was not. No watches: tests feed watch events themselves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{json, Value};

/// The API server's objects, by path, and the requests it saw.
#[derive(Default)]
pub struct Store {
    pub objects: BTreeMap<String, Value>,
    pub log: Vec<(Method, String)>,
    next_uid: u64,
    revision: u64,
}

fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
               "message": message, "code": code.as_u16()}),
    )
}

/// RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// Whether `labels` satisfy a selector such as `a=b,c in (x,y)`.
fn selects(selector: &str, labels: &Value) -> bool {
    let mut rest = selector;
    while !rest.is_empty() {
        // A term ends at a comma outside parentheses.
        let mut depth = 0;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let term = rest[..end].trim();
        rest = rest.get(end + 1..).unwrap_or("");
        if let Some((k, set)) = term.split_once(" in ") {
            let set: Vec<&str> = set
                .trim_matches(|c| c == '(' || c == ')')
                .split(',')
                .map(str::trim)
                .collect();
            if !labels[k.trim()].as_str().is_some_and(|v| set.contains(&v)) {
                return false;
            }
        } else if let Some((k, v)) = term.split_once('=') {
            if labels[k] != v {
                return false;
            }
        }
    }
    true
}

fn query(uri: &http::Uri, key: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

impl Store {
    pub fn handle(&mut self, method: Method, uri: &http::Uri, body: &[u8]) -> (StatusCode, Value) {
        let path = uri.path().to_string();
        self.log.push((method.clone(), uri.to_string()));
        let (path, sub) = match path.strip_suffix("/status") {
            Some(p) if p.matches('/').count() >= 6 => (p.to_string(), true),
            _ => (path, false),
        };
        match method {
            Method::GET => {
                if let Some(o) = self.objects.get(&path) {
                    return (StatusCode::OK, o.clone());
                }
                // A collection: its direct children, as the selector says.
                let prefix = format!("{path}/");
                let selector = query(uri, "labelSelector").unwrap_or_default();
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .filter(|(_, o)| selects(&selector, &o["metadata"]["labels"]))
                    .map(|(_, o)| o.clone())
                    .collect();
                if items.is_empty() && !is_collection(&path) {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{path} not found"),
                    );
                }
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            Method::PATCH => {
                let patch: Value = serde_json::from_slice(body).expect("patch is JSON");
                let apply = query(uri, "fieldManager").is_some()
                    && query(uri, "force").as_deref() == Some("true");
                match self.objects.get_mut(&path) {
                    Some(o) if sub => {
                        merge(o, &json!({"status": patch["status"].clone()}));
                        self.revision += 1;
                        o["metadata"]["resourceVersion"] = self.revision.to_string().into();
                        (StatusCode::OK, o.clone())
                    }
                    Some(o) if apply => {
                        let keep = o["metadata"].clone();
                        let mut new = patch.clone();
                        for k in [
                            "uid",
                            "resourceVersion",
                            "creationTimestamp",
                            "finalizers",
                            "deletionTimestamp",
                        ] {
                            if !keep[k].is_null() {
                                new["metadata"][k] = keep[k].clone();
                            }
                        }
                        if !o["status"].is_null() {
                            new["status"] = o["status"].clone();
                        }
                        *o = new;
                        self.revision += 1;
                        o["metadata"]["resourceVersion"] = self.revision.to_string().into();
                        (StatusCode::OK, o.clone())
                    }
                    Some(o) => {
                        merge(o, &patch);
                        self.revision += 1;
                        o["metadata"]["resourceVersion"] = self.revision.to_string().into();
                        (StatusCode::OK, o.clone())
                    }
                    None if apply => {
                        self.next_uid += 1;
                        let mut new = patch.clone();
                        new["metadata"]["uid"] = format!("uid-{}", self.next_uid).into();
                        self.stamp(&mut new);
                        self.objects.insert(path, new.clone());
                        (StatusCode::CREATED, new)
                    }
                    None => status(StatusCode::NOT_FOUND, "NotFound", "no such object"),
                }
            }
            Method::POST => {
                let mut new: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let Some(name) = new["metadata"]["name"].as_str().map(str::to_string) else {
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name is required",
                    );
                };
                let path = format!("{path}/{name}");
                if self.objects.contains_key(&path) {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("{name} already exists"),
                    );
                }
                self.next_uid += 1;
                new["metadata"]["uid"] = format!("uid-{}", self.next_uid).into();
                new["metadata"]["creationTimestamp"] = "2026-12-06T12:00:00Z".into();
                new["metadata"]["generation"] = 1.into();
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
                self.stamp(&mut new);
                self.objects.insert(path, new.clone());
                (StatusCode::CREATED, new)
            }
            Method::PUT => {
                let mut new: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let Some(old) = self.objects.get(&path).cloned() else {
                    return status(StatusCode::NOT_FOUND, "NotFound", "no such object");
                };
                let given = new["metadata"]["resourceVersion"].clone();
                if !given.is_null() && given != old["metadata"]["resourceVersion"] {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        "the object has been modified",
                    );
                }
                for k in ["uid", "creationTimestamp", "generation"] {
                    new["metadata"][k] = old["metadata"][k].clone();
                }
                // A new spec is a new generation.
                if new["spec"] != old["spec"] {
                    let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                    new["metadata"]["generation"] = g.into();
                }
                // The status is the status subresource's.
                new["status"] = old["status"].clone();
                if new["status"].is_null() {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
                self.stamp(&mut new);
                self.objects.insert(path, new.clone());
                (StatusCode::OK, new)
            }
            Method::DELETE => match self.objects.remove(&path) {
                Some(o) => (StatusCode::OK, o),
                None => status(StatusCode::NOT_FOUND, "NotFound", "no such object"),
            },
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not in the fake",
            ),
        }
    }

    /// The next resource version, on `o`.
    fn stamp(&mut self, o: &mut Value) {
        self.revision += 1;
        o["metadata"]["resourceVersion"] = self.revision.to_string().into();
    }

    pub fn get(&self, path: &str) -> Option<&Value> {
        self.objects.get(path)
    }

    /// Requests that changed something.
    pub fn writes(&self) -> Vec<String> {
        self.log
            .iter()
            .filter(|(m, _)| *m != Method::GET)
            .map(|(m, u)| format!("{m} {u}"))
            .collect()
    }
}

fn is_collection(path: &str) -> bool {
    // /api/v1/namespaces/NS/KIND or /apis/G/V/namespaces/NS/KIND
    let segs = path.trim_start_matches('/').split('/').count();
    (path.starts_with("/api/") && segs == 5) || (path.starts_with("/apis/") && segs == 6)
}

/// A client whose requests `store` answers.
pub fn client() -> (Arc<Mutex<Store>>, kube::Client) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let store = Arc::new(Mutex::new(Store::default()));
    let s = store.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let (code, v) = s.lock().unwrap_or_else(|p| p.into_inner()).handle(
                parts.method,
                &parts.uri,
                &bytes,
            );
            let resp = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&v).unwrap_or_default()))
                .expect("a response");
            send.send_response(resp);
        }
    });
    (store, kube::Client::new(svc, "default"))
}
