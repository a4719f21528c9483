//! Reconcile tests against a fake API server: kube's `Client` over a
//! `tower_test` mock, answered by an in-memory store that speaks the API's
//! paths, server-side apply, merge patches, label selectors and the status
//! subresource. Every request is recorded, so a test can say what the
//! operator did, and what it did not do.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use flotilla_core::crd::{Autoscaling, Flotilla, FlotillaSpec};
use flotilla_operator::{reconcile::reconcile, Context, FINALIZER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{json, Value};

const NS: &str = "messaging";

/// The API server's objects, by path, and the requests it saw.
#[derive(Default)]
struct Store {
    objects: BTreeMap<String, Value>,
    log: Vec<(Method, String)>,
    next_uid: u64,
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
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
                .replace('+', " ")
                .replace("%28", "(")
                .replace("%29", ")")
                .replace("%20", " ")
        })
    })
}

impl Store {
    fn handle(&mut self, method: Method, uri: &http::Uri, body: &[u8]) -> (StatusCode, Value) {
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
                        (StatusCode::OK, o.clone())
                    }
                    Some(o) => {
                        merge(o, &patch);
                        (StatusCode::OK, o.clone())
                    }
                    None if apply => {
                        self.next_uid += 1;
                        let mut new = patch.clone();
                        new["metadata"]["uid"] = format!("uid-{}", self.next_uid).into();
                        self.objects.insert(path, new.clone());
                        (StatusCode::CREATED, new)
                    }
                    None => status(StatusCode::NOT_FOUND, "NotFound", "no such object"),
                }
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

    fn get(&self, path: &str) -> Option<&Value> {
        self.objects.get(path)
    }

    /// Requests that changed something.
    fn writes(&self) -> Vec<String> {
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

fn core(kind: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/{kind}/{name}")
}

fn apps(kind: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/{kind}/{name}")
}

fn flotilla_path() -> String {
    format!("/apis/flotilla.dev/v1/namespaces/{NS}/flotillas/flo")
}

/// A fake API server and the operator's context on it.
fn fake() -> (Arc<Mutex<Store>>, Arc<Context>) {
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
            let (code, v) = s.lock().unwrap().handle(parts.method, &parts.uri, &bytes);
            let resp = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&v).unwrap()))
                .unwrap();
            send.send_response(resp);
        }
    });
    let client = kube::Client::new(svc, "default");
    let ctx = Arc::new(Context {
        client,
        image: "flotilla:test".into(),
    });
    (store, ctx)
}

/// Stores `spec` as the Flotilla `flo` and returns it as the API has it.
fn put_flotilla(store: &Mutex<Store>, spec: FlotillaSpec) {
    let mut s = store.lock().unwrap();
    let before = s.get(&flotilla_path()).cloned();
    let generation = before
        .as_ref()
        .and_then(|b| b["metadata"]["generation"].as_i64())
        .unwrap_or(0)
        + 1;
    let mut f = json!({
        "apiVersion": "flotilla.dev/v1", "kind": "Flotilla",
        "metadata": {"name": "flo", "namespace": NS, "uid": "flo-uid", "generation": generation},
        "spec": spec,
    });
    if let Some(b) = before {
        f["metadata"]["finalizers"] = b["metadata"]["finalizers"].clone();
        f["status"] = b["status"].clone();
    }
    s.objects.insert(flotilla_path(), f);
}

fn current(store: &Mutex<Store>) -> Arc<Flotilla> {
    let v = store
        .lock()
        .unwrap()
        .get(&flotilla_path())
        .cloned()
        .unwrap();
    Arc::new(serde_json::from_value(v).unwrap())
}

fn prod() -> FlotillaSpec {
    let mut spec = FlotillaSpec::default();
    spec.routers.replicas = 3;
    spec.routers.autoscaling = Some(Autoscaling {
        min_replicas: 3,
        max_replicas: 10,
        target_cpu_utilization: Some(70),
        connections_per_router: None,
    });
    spec.brokers.replicas = 2;
    spec.mqtt_gateway.replicas = 2;
    spec
}

fn ready_condition(store: &Mutex<Store>) -> Value {
    let s = store.lock().unwrap();
    s.get(&flotilla_path()).unwrap()["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn creates_what_a_flotilla_needs_by_server_side_apply_with_owner_references() {
    let (store, ctx) = fake();
    put_flotilla(&store, prod());
    reconcile(current(&store), ctx).await.unwrap();
    let s = store.lock().unwrap();
    let router = s
        .get(&apps("statefulsets", "flo-router"))
        .expect("router StatefulSet");
    // The autoscaler owns the router count.
    assert!(router["spec"]["replicas"].is_null(), "{router}");
    assert_eq!(router["spec"]["serviceName"], "flo-router-mesh");
    for path in [
        core("services", "flo-router"),
        core("services", "flo-router-mesh"),
        core("services", "flo-mqtt"),
        core("services", "flo-console"),
        core("secrets", "flo-mesh"),
        core("secrets", "flo-admin"),
        core("secrets", "flo-tls"),
        core("secrets", "flo-ca"),
        core("serviceaccounts", "flo"),
        core("persistentvolumeclaims", "flo-console-data"),
        apps("statefulsets", "flo-broker-0"),
        apps("statefulsets", "flo-broker-1"),
        apps("statefulsets", "flo-lwt"),
        apps("deployments", "flo-mqtt-gateway"),
        apps("deployments", "flo-console"),
        format!("/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/flo-router"),
        format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/flo-router"),
        format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/flo-mqtt-gateway"),
        format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/flo-router-mesh"),
    ] {
        let o = s
            .get(&path)
            .unwrap_or_else(|| panic!("{path} was not made"));
        assert_eq!(
            o["metadata"]["ownerReferences"][0]["uid"], "flo-uid",
            "{path}"
        );
        assert_eq!(
            o["metadata"]["ownerReferences"][0]["controller"], true,
            "{path}"
        );
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "flotilla-operator"
        );
    }
    // Every object went by server-side apply as flotilla-operator.
    for w in s.writes().iter().filter(|w| !w.contains("/flotillas/")) {
        assert!(
            w.starts_with("PATCH ")
                && w.contains("fieldManager=flotilla-operator")
                && w.contains("force=true"),
            "{w}"
        );
    }
    let f = s.get(&flotilla_path()).unwrap();
    assert_eq!(f["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(f["status"]["observedGeneration"], 1);
    assert_eq!(f["status"]["routers"]["ready"], "0/3");
    drop(s);
    let ready = ready_condition(&store);
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "Progressing");
}

#[tokio::test]
async fn reconciling_again_changes_nothing() {
    let (store, ctx) = fake();
    put_flotilla(&store, prod());
    reconcile(current(&store), ctx.clone()).await.unwrap();
    let before = store.lock().unwrap().log.len();
    reconcile(current(&store), ctx).await.unwrap();
    let s = store.lock().unwrap();
    let again: Vec<String> = s.log[before..]
        .iter()
        .filter(|(m, _)| *m != Method::GET)
        .map(|(m, u)| format!("{m} {u}"))
        .collect();
    assert!(again.is_empty(), "a second reconcile wrote: {again:?}");
}

#[tokio::test]
async fn scaling_follows_the_spec_and_a_broker_scaled_away_keeps_its_volume() {
    let (store, ctx) = fake();
    put_flotilla(&store, prod());
    reconcile(current(&store), ctx.clone()).await.unwrap();
    // broker-1's volume, as its StatefulSet made it.
    let pvc = core("persistentvolumeclaims", "data-flo-broker-1-0");
    store.lock().unwrap().objects.insert(
        pvc.clone(),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data-flo-broker-1-0", "namespace": NS,
                            "labels": {"app.kubernetes.io/instance": "flo", "app.kubernetes.io/component": "broker"}},
               "status": {"phase": "Bound"}}),
    );
    let mut spec = prod();
    spec.brokers.replicas = 1;
    spec.routers.autoscaling = None;
    spec.routers.replicas = 5;
    spec.mqtt_gateway.replicas = 0;
    put_flotilla(&store, spec);
    reconcile(current(&store), ctx).await.unwrap();
    let s = store.lock().unwrap();
    assert!(s.get(&apps("statefulsets", "flo-broker-1")).is_none());
    assert!(s.get(&apps("statefulsets", "flo-broker-0")).is_some());
    assert!(
        s.get(&pvc).is_some(),
        "the journal's volume stays for broker-1's return"
    );
    assert_eq!(
        s.get(&apps("statefulsets", "flo-router")).unwrap()["spec"]["replicas"],
        5
    );
    assert!(s
        .get(&format!(
            "/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/flo-router"
        ))
        .is_none());
    assert!(s.get(&apps("deployments", "flo-mqtt-gateway")).is_none());
    assert!(s.get(&core("services", "flo-mqtt")).is_none());
    assert!(s.get(&core("secrets", "flo-mesh")).is_some());
    assert!(!s
        .writes()
        .iter()
        .any(|w| w.contains("persistentvolumeclaims/data-")));
}

#[tokio::test]
async fn a_volume_that_does_not_bind_and_a_failing_pod_are_named_in_the_status() {
    let (store, ctx) = fake();
    put_flotilla(&store, prod());
    {
        let mut s = store.lock().unwrap();
        s.objects.insert(
            core("persistentvolumeclaims", "data-flo-broker-1-0"),
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": "data-flo-broker-1-0", "namespace": NS,
                                "creationTimestamp": "2026-01-01T00:00:00Z",
                                "labels": {"app.kubernetes.io/instance": "flo", "app.kubernetes.io/component": "broker"}},
                   "status": {"phase": "Pending"}}),
        );
        s.objects.insert(
            core("pods", "flo-router-0"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "flo-router-0", "namespace": NS,
                                "labels": {"app.kubernetes.io/instance": "flo", "app.kubernetes.io/component": "router"}},
                   "status": {"containerStatuses": [{
                       "name": "router", "image": "flotilla:test", "imageID": "", "ready": false, "restartCount": 0,
                       "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"flotilla:test\""}}}]}}),
        );
    }
    reconcile(current(&store), ctx).await.unwrap();
    let ready = ready_condition(&store);
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "VolumePending");
    let message = ready["message"].as_str().unwrap();
    assert!(
        message.contains("broker PVC data-flo-broker-1-0 Pending"),
        "{message}"
    );
    assert!(
        message.contains("pod flo-router-0: ImagePullBackOff"),
        "{message}"
    );
}

#[tokio::test]
async fn ready_when_every_part_is() {
    let (store, ctx) = fake();
    let mut spec = FlotillaSpec::default();
    spec.routers.replicas = 2;
    put_flotilla(&store, spec);
    reconcile(current(&store), ctx.clone()).await.unwrap();
    {
        let mut s = store.lock().unwrap();
        for (path, n) in [
            (apps("statefulsets", "flo-router"), 2),
            (apps("statefulsets", "flo-broker-0"), 1),
        ] {
            s.objects.get_mut(&path).unwrap()["status"] =
                json!({"replicas": n, "readyReplicas": n});
        }
        s.objects
            .get_mut(&apps("deployments", "flo-mqtt-gateway"))
            .unwrap()["status"] = json!({"replicas": 1, "readyReplicas": 1});
    }
    reconcile(current(&store), ctx).await.unwrap();
    let ready = ready_condition(&store);
    assert_eq!(ready["status"], "True", "{ready}");
    assert_eq!(ready["reason"], "AllReady");
}

#[tokio::test]
async fn deleting_lets_routers_and_gateways_drain_before_the_finalizer_goes() {
    let (store, ctx) = fake();
    put_flotilla(&store, prod());
    reconcile(current(&store), ctx.clone()).await.unwrap();
    {
        let mut s = store.lock().unwrap();
        s.objects.get_mut(&flotilla_path()).unwrap()["metadata"]["deletionTimestamp"] =
            "2026-12-06T12:00:00Z".into();
        s.objects.insert(
            core("pods", "flo-router-0"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "flo-router-0", "namespace": NS,
                                "labels": {"app.kubernetes.io/instance": "flo", "app.kubernetes.io/component": "router"}}}),
        );
    }
    reconcile(current(&store), ctx.clone()).await.unwrap();
    {
        let s = store.lock().unwrap();
        assert!(s.get(&apps("statefulsets", "flo-router")).is_none());
        assert!(s.get(&apps("deployments", "flo-mqtt-gateway")).is_none());
        // Brokers serve until the routers are gone.
        assert!(s.get(&apps("statefulsets", "flo-broker-0")).is_some());
        assert_eq!(
            s.get(&flotilla_path()).unwrap()["metadata"]["finalizers"],
            json!([FINALIZER])
        );
    }
    store
        .lock()
        .unwrap()
        .objects
        .remove(&core("pods", "flo-router-0"));
    reconcile(current(&store), ctx).await.unwrap();
    let s = store.lock().unwrap();
    assert_eq!(
        s.get(&flotilla_path()).unwrap()["metadata"]["finalizers"],
        json!([])
    );
}
