//! One reconcile of one Flotilla: its finalizer, every object it wants
//! (applied only when changed, so running it again changes nothing),
//! pruning what it no longer wants, and its status.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::crd::{Flotilla, FlotillaStatus, ReadyCount};
use flotilla_core::resources::Condition;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use sha2::Digest;
use tracing::info;

use crate::render::{self, Desired, Names};
use crate::{Context, Error, FIELD_MANAGER, FINALIZER};

/// The annotation holding a hash of what the operator last applied: an
/// object whose hash matches is not applied again.
pub const APPLIED: &str = "flotilla.dev/applied";

/// How long a volume claim may be Pending before the status says so.
const PENDING_FOR_MS: u64 = 30_000;

/// Kinds the operator makes and may delete again (never volumes, nor the
/// generated secrets: they hold data and keys).
const PRUNED: &[&str] = &[
    "ConfigMap",
    "StatefulSet",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
];

/// The API resource of a kind the operator applies.
pub fn api_resource(kind: &str) -> Option<ApiResource> {
    let (group, version, plural) = match kind {
        "StatefulSet" => ("apps", "v1", "statefulsets"),
        "Deployment" => ("apps", "v1", "deployments"),
        "Service" => ("", "v1", "services"),
        "Secret" => ("", "v1", "secrets"),
        "ServiceAccount" => ("", "v1", "serviceaccounts"),
        "PersistentVolumeClaim" => ("", "v1", "persistentvolumeclaims"),
        "ConfigMap" => ("", "v1", "configmaps"),
        "HorizontalPodAutoscaler" => ("autoscaling", "v2", "horizontalpodautoscalers"),
        "PodDisruptionBudget" => ("policy", "v1", "poddisruptionbudgets"),
        "NetworkPolicy" => ("networking.k8s.io", "v1", "networkpolicies"),
        "Role" => ("rbac.authorization.k8s.io", "v1", "roles"),
        "RoleBinding" => ("rbac.authorization.k8s.io", "v1", "rolebindings"),
        _ => return None,
    };
    Some(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind),
        plural,
    ))
}

/// A short hash of `v`'s JSON.
pub(crate) fn hash(v: &Value) -> String {
    let digest = sha2::Sha256::digest(serde_json::to_vec(v).unwrap_or_default());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Reconciles one Flotilla.
///
/// # Errors
/// The API server refused or could not be reached; retried.
pub async fn reconcile(f: Arc<Flotilla>, ctx: Arc<Context>) -> Result<Action, Error> {
    let n = Names::of(&f);
    let flotillas: Api<Flotilla> = Api::namespaced(ctx.client.clone(), &n.namespace);
    if f.metadata.deletion_timestamp.is_some() {
        return finalize(&f, &n, &ctx, &flotillas).await;
    }
    if !f.finalizers().iter().any(|x| x == FINALIZER) {
        let mut list = f.finalizers().to_vec();
        list.push(FINALIZER.to_string());
        set_finalizers(&flotillas, &n.instance, list).await?;
    }
    if let Some(first) = other_flotilla(&f, &flotillas).await? {
        // The console's store is the namespace's resources: two Flotillas
        // would share (and fight over) every tenant.
        let mut ready = Condition::ready(
            false,
            "OnePerNamespace",
            format!(
                "Flotilla {first} already runs in namespace {}; put this one in another namespace",
                n.namespace
            ),
        );
        ready.observed_generation = f.metadata.generation;
        let status = FlotillaStatus {
            observed_generation: f.metadata.generation,
            conditions: vec![ready],
            ..Default::default()
        };
        if f.status.as_ref().map(|s| &s.conditions) != Some(&status.conditions) {
            set_status(&flotillas, &n.instance, &status).await?;
        }
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let generated = secrets_for(&n, &ctx).await?;
    let desired = render::render(&f, &ctx.image, &generated);
    let mut applied = 0;
    for d in &desired {
        if apply(&ctx, &n.namespace, d).await? {
            applied += 1;
        }
    }
    let pruned = prune(&ctx, &n, &desired).await?;
    if applied + pruned > 0 {
        info!(flotilla = %n.instance, namespace = %n.namespace, applied, pruned, "objects changed");
    }
    let status = status(&f, &n, &ctx).await?;
    let ready = status
        .conditions
        .iter()
        .any(|c| c.kind == "Ready" && c.status == "True");
    if f.status.as_ref() != Some(&status) {
        set_status(&flotillas, &n.instance, &status).await?;
    }
    // Pods come and go without touching what the operator owns: look
    // again soon while something is not ready.
    Ok(Action::requeue(if ready {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(10)
    }))
}

/// Replaces the Flotilla's finalizers (merge patch of the list).
async fn set_finalizers(api: &Api<Flotilla>, name: &str, list: Vec<String>) -> Result<(), Error> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": list}})),
    )
    .await?;
    Ok(())
}

/// Writes the Flotilla's status (status subresource, merge patch).
async fn set_status(api: &Api<Flotilla>, name: &str, status: &FlotillaStatus) -> Result<(), Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await?;
    Ok(())
}

/// Another Flotilla of the namespace that came first (older, or as old
/// and first by name), if any.
async fn other_flotilla(f: &Flotilla, flotillas: &Api<Flotilla>) -> Result<Option<String>, Error> {
    let me = (f.metadata.creation_timestamp.clone(), f.name_any());
    let first = flotillas
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .map(|o| (o.metadata.creation_timestamp.clone(), o.name_any()))
        .filter(|o| o.1 != me.1)
        .filter(|o| (o.0.as_ref().map(|t| t.0), &o.1) < (me.0.as_ref().map(|t| t.0), &me.1))
        .min_by(|a, b| (a.0.as_ref().map(|t| t.0), &a.1).cmp(&(b.0.as_ref().map(|t| t.0), &b.1)));
    Ok(first.map(|o| o.1))
}

/// The generated secrets: made only when one of them is missing (the ones
/// that exist are not applied again, see [`Desired::create_only`]).
async fn secrets_for(n: &Names, ctx: &Context) -> Result<crate::secrets::Generated, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &n.namespace);
    let mut missing = false;
    for part in ["mesh", "admin", "ca", "tls"] {
        if api.get_opt(&n.name(part)).await?.is_none() {
            missing = true;
        }
    }
    if missing {
        Ok(crate::secrets::generate(n)?)
    } else {
        // Nothing is created from it.
        Ok(crate::secrets::Generated {
            mesh_secret: String::new(),
            admin_token: String::new(),
            ca_cert: String::new(),
            ca_key: String::new(),
            cert: String::new(),
            key: String::new(),
        })
    }
}

/// Applies `d` (server-side apply, field manager `flotilla-operator`)
/// unless it is already as wanted. True if it applied.
async fn apply(ctx: &Context, ns: &str, d: &Desired) -> Result<bool, Error> {
    let kind = d.kind();
    let ar = api_resource(kind).ok_or_else(|| Error::Invalid(format!("unknown kind {kind}")))?;
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
    let mut object = d.object.clone();
    let h = hash(&object);
    object["metadata"]["annotations"][APPLIED] = h.clone().into();
    let key = format!("{ns}/{kind}/{}", d.name());
    match api.get_opt(d.name()).await? {
        Some(_) if d.create_only => return Ok(false),
        // As the operator left it: its hash, and no change since (by
        // anyone else: a hand edit is put back).
        Some(o) if o.annotations().get(APPLIED) == Some(&h) && ctx.left(&key) == Some(mark(&o)) => {
            return Ok(false)
        }
        _ => {}
    }
    let o = api
        .patch(
            d.name(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
    ctx.record(key, mark(&o));
    Ok(true)
}

/// What changes when anyone changes an object's spec: its generation
/// where it has one (a status update does not move it), else its
/// resource version.
fn mark(o: &DynamicObject) -> String {
    match o.metadata.generation {
        Some(g) => format!("g{g}"),
        None => format!(
            "r{}",
            o.metadata.resource_version.clone().unwrap_or_default()
        ),
    }
}

/// Deletes what this Flotilla made and no longer wants: a broker scaled
/// away (its volume stays, for a broker that comes back), an autoscaler
/// turned off, a part disabled. Returns how many.
async fn prune(ctx: &Context, n: &Names, desired: &[Desired]) -> Result<usize, Error> {
    let wanted: BTreeSet<(String, String)> = desired
        .iter()
        .map(|d| (d.kind().to_string(), d.name().to_string()))
        .collect();
    let selector = format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/managed-by={FIELD_MANAGER}",
        n.instance
    );
    let mut pruned = 0;
    for kind in PRUNED {
        let ar = api_resource(kind).expect("pruned kinds are known");
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &n.namespace, &ar);
        for o in api.list(&ListParams::default().labels(&selector)).await? {
            let name = o.name_any();
            if !wanted.contains(&(kind.to_string(), name.clone())) {
                info!(flotilla = %n.instance, kind, name = %name, "deleting what is no longer wanted");
                api.delete(&name, &DeleteParams::default()).await?;
                ctx.forget(&n.namespace, |k| k == format!("{kind}/{name}"));
                pruned += 1;
            }
        }
    }
    Ok(pruned)
}

/// What is ready, and what is wrong, from the workloads, their volumes
/// and their pods.
async fn status(f: &Flotilla, n: &Names, ctx: &Context) -> Result<FlotillaStatus, Error> {
    let ns = &n.namespace;
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let spec = &f.spec;
    let ready_of_sts = |s: Option<StatefulSet>| {
        s.and_then(|s| s.status)
            .map(|st| (st.replicas, st.ready_replicas.unwrap_or(0)))
    };
    let (router_now, router_ready) =
        ready_of_sts(sts.get_opt(&n.router_svc()).await?).unwrap_or((0, 0));
    let router_desired = if spec.routers.autoscaling.is_some() {
        router_now.max(
            spec.routers
                .autoscaling
                .as_ref()
                .map_or(1, |a| a.min_replicas),
        )
    } else {
        spec.routers.replicas
    };
    let mut broker_ready = 0;
    for i in 0..spec.brokers.replicas {
        if let Some((_, r)) = ready_of_sts(sts.get_opt(&n.broker(i)).await?) {
            broker_ready += r.min(1);
        }
    }
    let gateway_ready = if spec.mqtt_gateway.replicas > 0 {
        deps.get_opt(&n.name("mqtt-gateway"))
            .await?
            .and_then(|d| d.status)
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    } else {
        0
    };
    let count = |desired: i32, available: i32| ReadyCount {
        desired,
        available,
        ready: format!("{available}/{desired}"),
    };
    let mut problems = Vec::new();
    let selector = format!("app.kubernetes.io/instance={}", n.instance);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    for p in pvcs.list(&ListParams::default().labels(&selector)).await? {
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        // A claim is Pending for a moment while its volume is made; a
        // problem when it stays so.
        let age = p.metadata.creation_timestamp.as_ref().map_or(0, |t| {
            let made = u64::try_from(t.0.as_millisecond()).unwrap_or(0);
            flotilla_core::time::now_ms().saturating_sub(made)
        });
        if phase != "Bound" && age > PENDING_FOR_MS {
            let component = p
                .labels()
                .get("app.kubernetes.io/component")
                .cloned()
                .unwrap_or_default();
            problems.push((
                "VolumePending",
                format!(
                    "{component} PVC {} {}: no volume bound (check its storage class and the cluster's provisioner)",
                    p.name_any(),
                    if phase.is_empty() { "Pending" } else { &phase }
                ),
            ));
        }
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for p in pods.list(&ListParams::default().labels(&selector)).await? {
        let name = p.name_any();
        let Some(st) = &p.status else { continue };
        for c in st.container_statuses.iter().flatten() {
            if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
                let reason = w.reason.clone().unwrap_or_default();
                if reason != "ContainerCreating" && reason != "PodInitializing" {
                    problems.push((
                        "PodFailing",
                        format!(
                            "pod {name}: {reason}{}",
                            w.message
                                .as_ref()
                                .map(|m| format!(": {m}"))
                                .unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        for c in st.conditions.iter().flatten() {
            if c.type_ == "PodScheduled" && c.status == "False" {
                problems.push((
                    "Unschedulable",
                    format!(
                        "pod {name} cannot be scheduled: {}",
                        c.message.clone().unwrap_or_default()
                    ),
                ));
            }
        }
    }
    let all_ready = router_ready >= router_desired
        && broker_ready >= spec.brokers.replicas
        && gateway_ready >= spec.mqtt_gateway.replicas;
    let (ok, reason, message) = match problems.first() {
        Some((reason, _)) => (
            false,
            *reason,
            problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        None if all_ready => (true, "AllReady", "every part is ready".to_string()),
        None => (
            false,
            "Progressing",
            format!(
                "waiting for routers {router_ready}/{router_desired}, brokers {broker_ready}/{}, MQTT gateways {gateway_ready}/{}",
                spec.brokers.replicas, spec.mqtt_gateway.replicas
            ),
        ),
    };
    let mut ready = Condition::ready(ok, reason, message);
    ready.observed_generation = f.metadata.generation;
    // The transition time moves only when the status does.
    let before = f
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.kind == "Ready"));
    ready.last_transition_time = match before {
        Some(b) if b.status == ready.status => b.last_transition_time.clone(),
        _ => Some(flotilla_core::time::now_rfc3339()),
    };
    Ok(FlotillaStatus {
        observed_generation: f.metadata.generation,
        conditions: vec![ready],
        routers: count(router_desired, router_ready),
        brokers: count(spec.brokers.replicas, broker_ready),
        gateways: count(spec.mqtt_gateway.replicas, gateway_ready),
    })
}

/// Deleting a Flotilla: routers and gateways go first, and each drains
/// (lame duck) while the brokers still serve; once their pods are gone
/// the finalizer goes, and garbage collection deletes the rest (volumes
/// stay).
async fn finalize(
    f: &Flotilla,
    n: &Names,
    ctx: &Context,
    flotillas: &Api<Flotilla>,
) -> Result<Action, Error> {
    if !f.finalizers().iter().any(|x| x == FINALIZER) {
        return Ok(Action::await_change());
    }
    let ns = &n.namespace;
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    if sts.get_opt(&n.router_svc()).await?.is_some() {
        sts.delete(&n.router_svc(), &DeleteParams::default())
            .await?;
    }
    if deps.get_opt(&n.name("mqtt-gateway")).await?.is_some() {
        deps.delete(&n.name("mqtt-gateway"), &DeleteParams::default())
            .await?;
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let draining = pods
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component in (router,mqtt-gateway)",
            n.instance
        )))
        .await?
        .items
        .len();
    if draining > 0 {
        info!(flotilla = %n.instance, pods = draining, "deleting: waiting for routers and gateways to drain");
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let rest: Vec<String> = f
        .finalizers()
        .iter()
        .filter(|x| *x != FINALIZER)
        .cloned()
        .collect();
    set_finalizers(flotillas, &n.instance, rest).await?;
    // What garbage collection deletes now, the operator forgets.
    ctx.forget(ns, |_| true);
    info!(flotilla = %n.instance, "routers and gateways drained; the rest goes with the Flotilla");
    Ok(Action::await_change())
}
