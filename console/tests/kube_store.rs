//! The console's store on Kubernetes (`--store kubernetes`), against a
//! fake API server: what the REST API writes becomes the namespace's
//! custom resources with the API server's resourceVersion, what anyone
//! applies there reaches the console's watch stream, and a user's
//! password applied with kubectl is replaced by its SCRAM keys.

use std::sync::Arc;

use flotilla_console::kube_store::{Kind, KubeStore};
use flotilla_console::store::{Expect, Store, StoreError};
use kube::api::DynamicObject;
use kube::runtime::watcher::Event;
use serde_json::{json, Value};

const NS: &str = "messaging";

fn cr_path(plural: &str, name: &str) -> String {
    format!("/apis/flotilla.dev/v1/namespaces/{NS}/{plural}/{name}")
}

fn dynamic(v: &Value) -> DynamicObject {
    serde_json::from_value(v.clone()).unwrap()
}

fn space(name: &str) -> Value {
    json!({
        "apiVersion": "flotilla.dev/v1", "kind": "AddressSpace",
        "metadata": {"name": name},
        "spec": {"plan": "standard"},
        "status": {"phase": "Active", "conditions": [{"type": "Ready", "status": "True", "reason": "Accepted"}]},
    })
}

/// The store on the fake API server; blocking calls run where blocking
/// is allowed, as the console's handlers run them.
async fn store() -> (
    Arc<std::sync::Mutex<fake_apiserver::Store>>,
    Arc<KubeStore>,
    Store,
) {
    let (api, client) = fake_apiserver::client();
    let k = KubeStore::new(client, NS.into());
    (api, k.clone(), Store::kubernetes(k))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_writes_become_custom_resources_with_the_api_servers_versions() {
    let (api, _k, s) = store().await;
    let s2 = s.clone();
    let put = blocking(move || s2.put("AddressSpace/tenant-a", space("tenant-a"), Expect::Absent))
        .await
        .unwrap();
    let cr = api
        .lock()
        .unwrap()
        .get(&cr_path("addressspaces", "tenant-a"))
        .cloned()
        .expect("the CR");
    assert_eq!(cr["spec"]["plan"], "standard");
    assert_eq!(cr["metadata"]["namespace"], NS);
    // The status went to the status subresource, and the answer carries
    // the API server's resourceVersion.
    assert_eq!(cr["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(
        put["metadata"]["resourceVersion"],
        cr["metadata"]["resourceVersion"]
    );
    assert_eq!(put["metadata"]["name"], "tenant-a");
    // Read your write.
    assert_eq!(
        s.get("AddressSpace/tenant-a").unwrap().unwrap()["spec"]["plan"],
        "standard"
    );

    // Addresses are named SPACE.NAME in the namespace.
    let addr = json!({
        "apiVersion": "flotilla.dev/v1", "kind": "Address",
        "metadata": {"name": "orders"},
        "spec": {"addressSpace": "tenant-a", "address": "orders", "type": "queue"},
    });
    let s2 = s.clone();
    blocking(move || s2.put("Address/tenant-a/orders", addr, Expect::Absent))
        .await
        .unwrap();
    assert!(api
        .lock()
        .unwrap()
        .get(&cr_path("addresses", "tenant-a.orders"))
        .is_some());
    assert_eq!(
        s.get("Address/tenant-a/orders").unwrap().unwrap()["metadata"]["name"],
        "orders"
    );

    // Creating again: exists. A stale version: conflict.
    let s2 = s.clone();
    let again =
        blocking(move || s2.put("AddressSpace/tenant-a", space("tenant-a"), Expect::Absent)).await;
    assert!(matches!(again, Err(StoreError::Exists(_))), "{again:?}");
    let s2 = s.clone();
    let stale = blocking(move || {
        s2.put(
            "AddressSpace/tenant-a",
            space("tenant-a"),
            Expect::Any(Some(1)),
        )
    })
    .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    let rv: u64 = put["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let s2 = s.clone();
    let mut changed = space("tenant-a");
    changed["spec"]["plan"] = "large".into();
    blocking(move || s2.put("AddressSpace/tenant-a", changed, Expect::Any(Some(rv))))
        .await
        .unwrap();
    assert_eq!(
        api.lock()
            .unwrap()
            .get(&cr_path("addressspaces", "tenant-a"))
            .unwrap()["spec"]["plan"],
        "large"
    );

    // Deleting a space takes its addresses with it.
    let s2 = s.clone();
    blocking(move || {
        s2.delete(&[
            "AddressSpace/tenant-a".into(),
            "Address/tenant-a/orders".into(),
        ])
    })
    .await
    .unwrap();
    let a = api.lock().unwrap();
    assert!(a.get(&cr_path("addressspaces", "tenant-a")).is_none());
    assert!(a.get(&cr_path("addresses", "tenant-a.orders")).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_watches_see_is_streamed_in_one_order_and_resumable() {
    let (_api, k, s) = store().await;
    let mut live = s.subscribe();
    let applied = |name: &str, rv: &str, plan: &str| {
        dynamic(&json!({
            "apiVersion": "flotilla.dev/v1", "kind": "AddressSpace",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": rv, "uid": "u"},
            "spec": {"plan": plan},
        }))
    };
    for kind in [
        Kind::AddressSpace,
        Kind::Address,
        Kind::MessagingUser,
        Kind::Broker,
    ] {
        k.apply_event(kind, Event::Init);
        k.apply_event(kind, Event::InitDone);
    }
    let (start, _) = s.list("", None, usize::MAX).unwrap();
    k.apply_event(
        Kind::AddressSpace,
        Event::Apply(applied("a", "10", "small")),
    );
    // A user applied with kubectl, in the Address watch: its key is
    // SPACE/NAME even when its name has no space prefix.
    k.apply_event(
        Kind::Address,
        Event::Apply(dynamic(&json!({
            "apiVersion": "flotilla.dev/v1", "kind": "Address",
            "metadata": {"name": "a.q1", "namespace": NS, "resourceVersion": "11"},
            "spec": {"addressSpace": "a", "address": "q1", "type": "queue"},
        }))),
    );
    // The same version again (a watch restarted) is not a change.
    k.apply_event(
        Kind::AddressSpace,
        Event::Apply(applied("a", "10", "small")),
    );
    k.apply_event(
        Kind::AddressSpace,
        Event::Apply(applied("a", "12", "large")),
    );
    k.apply_event(
        Kind::AddressSpace,
        Event::Delete(applied("a", "13", "large")),
    );
    let mut got = Vec::new();
    for _ in 0..4 {
        let c = live.recv().await.unwrap();
        got.push((
            c.kind,
            c.object["kind"].as_str().unwrap().to_string(),
            c.object["metadata"]["name"].as_str().unwrap().to_string(),
            c.rv,
        ));
    }
    assert_eq!(
        got.iter()
            .map(|(k, kind, n, _)| (*k, kind.as_str(), n.as_str()))
            .collect::<Vec<_>>(),
        [
            ("ADDED", "AddressSpace", "a"),
            ("ADDED", "Address", "q1"),
            ("MODIFIED", "AddressSpace", "a"),
            ("DELETED", "AddressSpace", "a"),
        ]
    );
    // Positions rise one by one from where the list stood.
    assert_eq!(
        got.iter().map(|g| g.3).collect::<Vec<_>>(),
        (start + 1..=start + 4).collect::<Vec<_>>()
    );
    assert!(s.get("Address/a/q1").unwrap().is_some());
    assert!(s.get("AddressSpace/a").unwrap().is_none());
    // Resuming from a position replays what came after it; a position
    // from another run is Gone (the follower lists again).
    let (now, after) = s.changes_since(start + 2).unwrap();
    assert_eq!(now, start + 4);
    assert_eq!(after.len(), 2);
    assert!(matches!(s.changes_since(5), Err(StoreError::Gone(5))));

    // A watch that lists again drops what is gone.
    k.apply_event(Kind::Address, Event::Init);
    k.apply_event(Kind::Address, Event::InitDone);
    let c = live.recv().await.unwrap();
    assert_eq!(
        (c.kind, c.object["metadata"]["name"].as_str()),
        ("DELETED", Some("q1"))
    );
    assert!(s.get("Address/a/q1").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_applied_with_kubectl_is_replaced_by_scram_keys() {
    let (api, k, s) = store().await;
    let user = json!({
        "apiVersion": "flotilla.dev/v1", "kind": "MessagingUser",
        "metadata": {"name": "a.app", "namespace": NS},
        "spec": {"addressSpace": "a", "username": "app", "password": "s3cret",
                 "authorization": [{"addresses": ["#"], "operations": ["send"]}]},
    });
    // As kubectl would make it.
    let created = api
        .lock()
        .unwrap()
        .handle(
            http::Method::POST,
            &format!("/apis/flotilla.dev/v1/namespaces/{NS}/messagingusers")
                .parse()
                .unwrap(),
            &serde_json::to_vec(&user).unwrap(),
        )
        .1;
    let mut live = s.subscribe();
    k.apply_event(Kind::MessagingUser, Event::Apply(dynamic(&created)));
    // The plain password never reaches the store, and the resource is
    // written again with SCRAM keys instead.
    let path = cr_path("messagingusers", "a.app");
    let mut hashed = None;
    for _ in 0..200 {
        let o = api.lock().unwrap().get(&path).cloned().unwrap();
        if o["spec"]["scramSha256"].is_object() {
            hashed = Some(o);
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let hashed = hashed.expect("the user was written with SCRAM keys");
    assert!(hashed["spec"]["password"].is_null(), "{hashed}");
    assert!(s.get("MessagingUser/a/app").unwrap().is_none());
    assert!(
        live.try_recv().is_err(),
        "a user with a plain password was streamed"
    );
    k.apply_event(Kind::MessagingUser, Event::Apply(dynamic(&hashed)));
    let c = live.recv().await.unwrap();
    assert_eq!(c.object["spec"]["username"], "app");
    assert!(c.object["spec"]["password"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_are_kept_in_config_maps() {
    let (api, k, s) = store().await;
    let broker = json!({"apiVersion": "flotilla.dev/v1", "kind": "Broker", "metadata": {"name": "flo-broker-0"}, "spec": {}});
    let s2 = s.clone();
    blocking(move || s2.put("Broker/flo-broker-0", broker, Expect::Absent))
        .await
        .unwrap();
    let cm = api
        .lock()
        .unwrap()
        .get(&format!(
            "/api/v1/namespaces/{NS}/configmaps/broker.flo-broker-0"
        ))
        .cloned()
        .expect("the ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["flotilla.dev/kind"], "Broker");
    let mut live = s.subscribe();
    k.apply_event(Kind::Broker, Event::Apply(dynamic(&cm)));
    let c = live.recv().await.unwrap();
    assert_eq!(
        (
            c.object["kind"].as_str(),
            c.object["metadata"]["name"].as_str()
        ),
        (Some("Broker"), Some("flo-broker-0"))
    );
    assert_eq!(s.list("Broker/", None, 10).unwrap().1.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_kubectl_applies_gets_a_status() {
    let (api, k, s) = store().await;
    let post = |plural: &str, body: Value| {
        api.lock()
            .unwrap()
            .handle(
                http::Method::POST,
                &format!("/apis/flotilla.dev/v1/namespaces/{NS}/{plural}")
                    .parse()
                    .unwrap(),
                &serde_json::to_vec(&body).unwrap(),
            )
            .1
    };
    let orphan = post(
        "addresses",
        json!({"apiVersion": "flotilla.dev/v1", "kind": "Address",
               "metadata": {"name": "nowhere.q", "namespace": NS},
               "spec": {"addressSpace": "nowhere", "address": "q", "type": "queue"}}),
    );
    k.apply_event(Kind::Address, Event::Apply(dynamic(&orphan)));
    let bad_plan = post(
        "addressspaces",
        json!({"apiVersion": "flotilla.dev/v1", "kind": "AddressSpace",
               "metadata": {"name": "odd", "namespace": NS}, "spec": {"plan": "gigantic"}}),
    );
    k.apply_event(Kind::AddressSpace, Event::Apply(dynamic(&bad_plan)));
    let ready = |path: String| {
        let a = api.lock().unwrap();
        a.get(&path)
            .and_then(|o| o["status"]["conditions"][0].as_object().cloned())
    };
    let mut answered = (None, None);
    for _ in 0..200 {
        answered = (
            ready(cr_path("addresses", "nowhere.q")),
            ready(cr_path("addressspaces", "odd")),
        );
        if answered.0.is_some() && answered.1.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (addr, space) = answered;
    let (addr, space) = (
        addr.expect("the address's status"),
        space.expect("the space's status"),
    );
    assert_eq!(
        (addr["status"].as_str(), addr["reason"].as_str()),
        (Some("False"), Some("NoSuchSpace"))
    );
    assert_eq!(
        (space["status"].as_str(), space["reason"].as_str()),
        (Some("False"), Some("NoSuchPlan"))
    );
    assert_eq!(addr["observedGeneration"], 1);
    // Answered once: the status speaks of the generation now.
    let answered_addr = api
        .lock()
        .unwrap()
        .get(&cr_path("addresses", "nowhere.q"))
        .cloned()
        .unwrap();
    let writes = api.lock().unwrap().writes().len();
    // (Whether to answer is decided in apply_event itself.)
    k.apply_event(Kind::Address, Event::Apply(dynamic(&answered_addr)));
    tokio::task::yield_now().await;
    assert_eq!(api.lock().unwrap().writes().len(), writes);
    let _ = s;
}
