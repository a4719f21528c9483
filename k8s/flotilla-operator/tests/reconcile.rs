//! Reconcile tests against a fake API server: kube's `Client` over a
//! `tower_test` mock, answered by an in-memory store that speaks the API's
//! paths, server-side apply, merge patches, label selectors and the status
//! subresource. Every request is recorded, so a test can say what the
//! operator did, and what it did not do.

use std::sync::{Arc, Mutex};

use fake_apiserver::Store;
use flotilla_core::crd::{Autoscaling, Flotilla, FlotillaSpec};
use flotilla_operator::{reconcile::reconcile, Context, FINALIZER};
use http::Method;
use serde_json::{json, Value};

const NS: &str = "messaging";

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
    let (store, client) = fake_apiserver::client();
    let ctx = Arc::new(Context::new(client, "flotilla:test".into()));
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
    // What the parts share comes from the ConfigMap; a change to it rolls them.
    let pod = &router["spec"]["template"];
    assert_eq!(
        pod["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"],
        "flo-config"
    );
    assert!(pod["metadata"]["annotations"]["flotilla.dev/config-hash"].is_string());
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
        core("serviceaccounts", "flo-console"),
        core("configmaps", "flo-config"),
        format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/flo-console"),
        format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings/flo-console"),
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

#[tokio::test]
async fn a_second_flotilla_in_a_namespace_is_refused_with_a_reason() {
    let (store, ctx) = fake();
    put_flotilla(&store, prod());
    reconcile(current(&store), ctx.clone()).await.unwrap();
    let second = format!("/apis/flotilla.dev/v1/namespaces/{NS}/flotillas/zeta");
    store.lock().unwrap().objects.insert(
        second.clone(),
        json!({"apiVersion": "flotilla.dev/v1", "kind": "Flotilla",
               "metadata": {"name": "zeta", "namespace": NS, "uid": "zeta-uid", "generation": 1},
               "spec": {}}),
    );
    let z: Flotilla =
        serde_json::from_value(store.lock().unwrap().get(&second).cloned().unwrap()).unwrap();
    reconcile(Arc::new(z), ctx).await.unwrap();
    let s = store.lock().unwrap();
    let ready = &s.get(&second).unwrap()["status"]["conditions"][0];
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("OnePerNamespace"))
    );
    assert!(ready["message"]
        .as_str()
        .unwrap()
        .contains("Flotilla flo already runs"));
    assert!(
        s.get(&apps("statefulsets", "zeta-router")).is_none(),
        "the second made nothing"
    );
}

#[tokio::test]
async fn the_inter_router_port_can_be_opened_to_edge_sites() {
    let (store, ctx) = fake();
    let mut spec = prod();
    spec.routers.expose_inter_router = Some(flotilla_core::crd::ExposeSpec {
        kind: flotilla_core::crd::ExposeType::LoadBalancer,
        source_ranges: vec!["203.0.113.0/24".into()],
    });
    put_flotilla(&store, spec);
    reconcile(current(&store), ctx).await.unwrap();
    let s = store.lock().unwrap();
    let svc = s
        .get(&core("services", "flo-router-uplink"))
        .expect("the uplink service");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(
        svc["spec"]["loadBalancerSourceRanges"],
        json!(["203.0.113.0/24"])
    );
    let np = s
        .get(&format!(
            "/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/flo-router-mesh"
        ))
        .unwrap();
    let rules = np["spec"]["ingress"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["from"][0]["ipBlock"]["cidr"] == "203.0.113.0/24"
                && r["ports"][0]["port"] == 55672),
        "{np}"
    );
}

#[tokio::test]
async fn a_hand_edit_of_what_the_operator_owns_is_put_back() {
    let (store, ctx) = fake();
    put_flotilla(&store, prod());
    reconcile(current(&store), ctx.clone()).await.unwrap();
    let path = apps("statefulsets", "flo-router");
    {
        // kubectl edit: another image, a new resource version.
        let mut s = store.lock().unwrap();
        let o = s.objects.get_mut(&path).unwrap();
        o["spec"]["template"]["spec"]["containers"][0]["image"] = "someone/else:1".into();
        o["metadata"]["resourceVersion"] = "999999".into();
    }
    reconcile(current(&store), ctx).await.unwrap();
    let s = store.lock().unwrap();
    assert_eq!(
        s.get(&path).unwrap()["spec"]["template"]["spec"]["containers"][0]["image"],
        "flotilla:test"
    );
}
