//! What a `Flotilla` resource becomes: every object the operator applies
//! for it, as JSON in the shape the API server takes, without I/O. The
//! reconciler applies them; `flotilla operator render` prints them.

use flotilla_core::crd::{Flotilla, RouterMode};
use serde_json::{json, Value};

use crate::FIELD_MANAGER;

/// The port everything serves `/metrics`, `/healthz` and `/readyz` on.
pub const HTTP_PORT: u16 = 8080;
pub const AMQP_PORT: u16 = 5672;
pub const AMQPS_PORT: u16 = 5671;
pub const INTER_ROUTER_PORT: u16 = 55672;
pub const BROKER_PORT: u16 = 5673;
pub const MQTT_PORT: u16 = 1883;
pub const MQTTS_PORT: u16 = 8883;
/// Tells one broker's pod from the others'.
pub const BROKER_LABEL: &str = "flotilla.dev/broker";
/// Seconds a pod has to stop, unless the spec says otherwise.
pub const DEFAULT_GRACE: i64 = 60;

/// Where the pods find their secrets.
const MESH_DIR: &str = "/etc/flotilla/mesh";
const TLS_DIR: &str = "/etc/flotilla/tls";
const JWKS_DIR: &str = "/etc/flotilla/jwks";
const DATA_DIR: &str = "/var/lib/flotilla";

/// One object to apply, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub object: Value,
    /// Created once and then left alone (generated secrets: applying them
    /// again would replace the keys every pod uses).
    pub create_only: bool,
}

impl Desired {
    pub fn kind(&self) -> &str {
        self.object["kind"].as_str().unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// The names of one Flotilla's objects.
#[derive(Debug, Clone)]
pub struct Names {
    pub instance: String,
    pub namespace: String,
}

impl Names {
    pub fn of(f: &Flotilla) -> Names {
        Names {
            instance: f.metadata.name.clone().unwrap_or_default(),
            namespace: f
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
        }
    }

    pub fn name(&self, part: &str) -> String {
        format!("{}-{part}", self.instance)
    }

    /// `NAME.NAMESPACE.svc` of one of this Flotilla's services.
    pub fn svc(&self, part: &str) -> String {
        format!("{}-{part}.{}.svc", self.instance, self.namespace)
    }

    pub fn router_svc(&self) -> String {
        self.name("router")
    }

    pub fn mesh_svc(&self) -> String {
        self.name("router-mesh")
    }

    pub fn broker(&self, i: i32) -> String {
        self.name(&format!("broker-{i}"))
    }

    /// Labels that select one component's pods.
    pub fn selector(&self, component: &str) -> Value {
        json!({
            "app.kubernetes.io/name": "flotilla",
            "app.kubernetes.io/instance": self.instance,
            "app.kubernetes.io/component": component,
        })
    }

    /// Labels of every object.
    pub fn labels(&self, component: &str) -> Value {
        let mut l = self.selector(component);
        l["app.kubernetes.io/managed-by"] = FIELD_MANAGER.into();
        l["app.kubernetes.io/part-of"] = "flotilla".into();
        l
    }
}

/// Renders every object for `f`, whose pods run `image`. `secrets` are
/// the generated Secrets' contents (made once; see [`crate::secrets`]).
pub fn render(f: &Flotilla, image: &str, secrets: &crate::secrets::Generated) -> Vec<Desired> {
    let n = Names::of(f);
    let spec = &f.spec;
    let image = spec.image.clone().unwrap_or_else(|| image.to_string());
    let grace = spec
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_GRACE);
    let owner = owner_reference(f);
    let mut out = Vec::new();
    let mut push = |mut object: Value, create_only: bool| {
        object["metadata"]["namespace"] = n.namespace.clone().into();
        object["metadata"]["ownerReferences"] = json!([owner.clone()]);
        out.push(Desired {
            object,
            create_only,
        });
    };
    let mut settings = shared_settings(&n, spec.console.enabled);
    if spec.jwks_secret.is_some() {
        settings["FLOTILLA_JWKS_DIR"] = JWKS_DIR.into();
    }
    let ctx = Pods {
        n: &n,
        image: &image,
        grace,
        config_hash: crate::reconcile::hash(&settings),
        tls_secret: spec
            .tls
            .secret_name
            .clone()
            .unwrap_or_else(|| n.name("tls")),
        jwks_secret: spec.jwks_secret.clone(),
    };

    // The pods' own account: no API access (the console's store is its
    // volume until `--store kubernetes`).
    push(
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": n.instance, "labels": n.labels("flotilla")},
            "automountServiceAccountToken": false,
        }),
        false,
    );
    for s in crate::secrets::objects(&n, secrets, spec.tls.secret_name.is_none()) {
        push(s, true);
    }
    push(
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": n.name("config"), "labels": n.labels("flotilla")},
            "data": settings,
        }),
        false,
    );

    // Routers.
    let edge = spec.routers.mode == RouterMode::Edge;
    let mut router_args = vec![
        "router".to_string(),
        "--amqp".into(),
        format!("0.0.0.0:{AMQP_PORT}"),
        "--amqps".into(),
        format!("0.0.0.0:{AMQPS_PORT}"),
        "--router-id".into(),
        "$(POD_NAME)".into(),
        "--redirect".into(),
        format!("{}:{AMQP_PORT}", n.svc("router")),
        "--drain-timeout".into(),
        (grace - 5).max(1).to_string(),
    ];
    if edge {
        router_args.extend(["--mode".into(), "edge".into()]);
        for u in &spec.routers.uplinks {
            router_args.extend(["--peer".into(), u.clone()]);
        }
    } else {
        router_args.extend([
            "--inter-router".into(),
            format!("0.0.0.0:{INTER_ROUTER_PORT}"),
            "--peer".into(),
            format!(
                "{}.{}.svc.cluster.local:{INTER_ROUTER_PORT}",
                n.mesh_svc(),
                n.namespace
            ),
        ]);
    }
    let mut ports = vec![
        port("amqp", AMQP_PORT),
        port("amqps", AMQPS_PORT),
        port("http", HTTP_PORT),
    ];
    if !edge {
        ports.push(port("inter-router", INTER_ROUTER_PORT));
    }
    let router_pod = ctx.pod(
        "router",
        router_args,
        ports,
        spec.routers.resources.as_ref(),
        Vec::new(),
    );
    let mut sts = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": n.router_svc(), "labels": n.labels("router")},
        "spec": {
            "serviceName": n.mesh_svc(),
            // Routers start and stop independently; rolling updates still
            // go one at a time, each router draining first.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": n.selector("router")},
            "template": router_pod,
        },
    });
    // With an autoscaler, the count is the autoscaler's.
    if spec.routers.autoscaling.is_none() {
        sts["spec"]["replicas"] = spec.routers.replicas.into();
    }
    push(sts, false);
    push(
        service(
            &n,
            n.router_svc(),
            "router",
            vec![svc_port("amqp", AMQP_PORT), svc_port("amqps", AMQPS_PORT)],
        ),
        false,
    );
    if !edge {
        let mut mesh = service(
            &n,
            n.mesh_svc(),
            "router",
            vec![svc_port("inter-router", INTER_ROUTER_PORT)],
        );
        mesh["spec"]["clusterIP"] = "None".into();
        // Routers find each other before they are ready: a router is
        // ready once it joined the mesh.
        mesh["spec"]["publishNotReadyAddresses"] = true.into();
        push(mesh, false);
    }
    push(
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": n.router_svc(), "labels": n.labels("router")},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": n.selector("router")}},
        }),
        false,
    );
    if let Some(a) = &spec.routers.autoscaling {
        let mut metrics = vec![json!({
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization",
                "averageUtilization": a.target_cpu_utilization.unwrap_or(70)}},
        })];
        if let Some(c) = a.connections_per_router {
            metrics.push(json!({
                "type": "Pods",
                "pods": {
                    "metric": {"name": "flotilla_router_client_connections"},
                    "target": {"type": "AverageValue", "averageValue": c.to_string()},
                },
            }));
        }
        push(
            json!({
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": n.router_svc(), "labels": n.labels("router")},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": n.router_svc()},
                    "minReplicas": a.min_replicas,
                    "maxReplicas": a.max_replicas,
                    "metrics": metrics,
                    // Up fast; down one router a minute, each draining.
                    "behavior": {
                        "scaleDown": {
                            "stabilizationWindowSeconds": 300,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                        },
                    },
                },
            }),
            false,
        );
    }
    // Edge routers elsewhere reach the inter-router port through a
    // Service of its own, from the networks the spec names.
    let mut uplinks = Vec::new();
    if let (Some(e), false) = (&spec.routers.expose_inter_router, edge) {
        let kind = match e.kind {
            flotilla_core::crd::ExposeType::LoadBalancer => "LoadBalancer",
            flotilla_core::crd::ExposeType::NodePort => "NodePort",
        };
        let mut svc = service(
            &n,
            n.name("router-uplink"),
            "router",
            vec![svc_port("inter-router", INTER_ROUTER_PORT)],
        );
        svc["spec"]["type"] = kind.into();
        if kind == "LoadBalancer" && !e.source_ranges.is_empty() {
            svc["spec"]["loadBalancerSourceRanges"] = json!(e.source_ranges);
        }
        push(svc, false);
        let from: Vec<Value> = e
            .source_ranges
            .iter()
            .map(|cidr| json!({"ipBlock": {"cidr": cidr}}))
            .collect();
        let mut rule = json!({"ports": [{"protocol": "TCP", "port": INTER_ROUTER_PORT}]});
        if !from.is_empty() {
            rule["from"] = from.into();
        }
        uplinks.push(rule);
    }
    let mut ingress = vec![
        // The inter-router port: this Flotilla's routers.
        json!({
            "from": [{"podSelector": {"matchLabels": n.selector("router")}}],
            "ports": [{"protocol": "TCP", "port": INTER_ROUTER_PORT}],
        }),
        // Clients, components and Prometheus.
        json!({
            "ports": [
                {"protocol": "TCP", "port": AMQP_PORT},
                {"protocol": "TCP", "port": AMQPS_PORT},
                {"protocol": "TCP", "port": HTTP_PORT},
            ],
        }),
    ];
    ingress.extend(uplinks);
    push(
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": n.mesh_svc(), "labels": n.labels("router")},
            "spec": {
                "podSelector": {"matchLabels": n.selector("router")},
                "policyTypes": ["Ingress"],
                "ingress": ingress,
            },
        }),
        false,
    );
    // Brokers: one StatefulSet of one each, so broker-i keeps its id, its
    // journal and the queues placed on it.
    if spec.brokers.replicas > 0 {
        let mut brokers = service(
            &n,
            n.name("broker"),
            "broker",
            vec![svc_port("amqp", BROKER_PORT), svc_port("http", HTTP_PORT)],
        );
        brokers["spec"]["clusterIP"] = "None".into();
        push(brokers, false);
    }
    for i in 0..spec.brokers.replicas {
        let name = n.broker(i);
        let args = vec![
            "broker".into(),
            "--amqp".into(),
            format!("0.0.0.0:{BROKER_PORT}"),
            "--container-id".into(),
            name.clone(),
            "--data-dir".into(),
            format!("{DATA_DIR}/broker"),
        ];
        let pod = ctx.pod(
            "broker",
            args,
            vec![port("amqp", BROKER_PORT), port("http", HTTP_PORT)],
            spec.brokers.resources.as_ref(),
            vec![json!({"name": "data", "mountPath": DATA_DIR})],
        );
        push(
            json!({
                "apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {"name": name, "labels": n.labels("broker")},
                "spec": {
                    "replicas": 1,
                    "serviceName": n.name("broker"),
                    "selector": {"matchLabels": with(n.selector("broker"), BROKER_LABEL, &name)},
                    "template": with_label(pod, BROKER_LABEL, &name),
                    "volumeClaimTemplates": [claim("data", &spec.brokers.storage, n.labels("broker"))],
                    // The journal outlives the broker: a broker scaled away
                    // and back finds its messages (see ARCHITECTURE.md).
                    "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
                },
            }),
            false,
        );
    }

    // MQTT gateways.
    if spec.mqtt_gateway.replicas > 0 {
        let args = vec![
            "mqtt-gateway".into(),
            "--mqtt".into(),
            format!("0.0.0.0:{MQTT_PORT}"),
            "--mqtts".into(),
            format!("0.0.0.0:{MQTTS_PORT}"),
            "--gateway-id".into(),
            "$(POD_NAME)".into(),
        ];
        let pod = ctx.pod(
            "mqtt-gateway",
            args,
            vec![
                port("mqtt", MQTT_PORT),
                port("mqtts", MQTTS_PORT),
                port("http", HTTP_PORT),
            ],
            spec.mqtt_gateway.resources.as_ref(),
            Vec::new(),
        );
        push(
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": n.name("mqtt-gateway"), "labels": n.labels("mqtt-gateway")},
                "spec": {
                    "replicas": spec.mqtt_gateway.replicas,
                    "selector": {"matchLabels": n.selector("mqtt-gateway")},
                    "template": pod,
                },
            }),
            false,
        );
        push(
            service(
                &n,
                n.name("mqtt"),
                "mqtt-gateway",
                vec![svc_port("mqtt", MQTT_PORT), svc_port("mqtts", MQTTS_PORT)],
            ),
            false,
        );
        if spec.mqtt_gateway.replicas > 1 {
            push(
                json!({
                    "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                    "metadata": {"name": n.name("mqtt-gateway"), "labels": n.labels("mqtt-gateway")},
                    "spec": {"minAvailable": 1, "selector": {"matchLabels": n.selector("mqtt-gateway")}},
                }),
                false,
            );
        }
    }

    // The last-will service: one, with its wills on a volume.
    if spec.lwt.enabled {
        let args = vec![
            "lwt".into(),
            "--lwt-id".into(),
            n.name("lwt"),
            "--data-dir".into(),
            format!("{DATA_DIR}/lwt"),
        ];
        let pod = ctx.pod(
            "lwt",
            args,
            vec![port("http", HTTP_PORT)],
            spec.lwt.resources.as_ref(),
            vec![json!({"name": "data", "mountPath": DATA_DIR})],
        );
        push(
            json!({
                "apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {"name": n.name("lwt"), "labels": n.labels("lwt")},
                "spec": {
                    "replicas": 1,
                    "serviceName": n.name("lwt"),
                    "selector": {"matchLabels": n.selector("lwt")},
                    "template": pod,
                    "volumeClaimTemplates": [claim("data", &spec.lwt.storage, n.labels("lwt"))],
                    "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
                },
            }),
            false,
        );
    }

    // The console: its store is this namespace's custom resources (and
    // broker ConfigMaps), through an account that may use only those.
    if spec.console.enabled {
        let args = vec![
            "console".into(),
            "--store".into(),
            "kubernetes".into(),
            "--namespace".into(),
            n.namespace.clone(),
        ];
        let mut pod = ctx.pod(
            "console",
            args,
            vec![port("http", HTTP_PORT)],
            spec.console.resources.as_ref(),
            Vec::new(),
        );
        pod["spec"]["serviceAccountName"] = n.name("console").into();
        pod["spec"]["automountServiceAccountToken"] = true.into();
        push(
            json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": n.name("console"), "labels": n.labels("console")},
            }),
            false,
        );
        push(
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": n.name("console"), "labels": n.labels("console")},
                "rules": [
                    {"apiGroups": ["flotilla.dev"], "resources": ["addressspaces", "addresses", "messagingusers"],
                     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                    {"apiGroups": ["flotilla.dev"], "resources": ["addressspaces/status", "addresses/status", "messagingusers/status"],
                     "verbs": ["get", "update", "patch"]},
                    {"apiGroups": [""], "resources": ["configmaps"],
                     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                ],
            }),
            false,
        );
        push(
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": n.name("console"), "labels": n.labels("console")},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n.name("console")},
                "subjects": [{"kind": "ServiceAccount", "name": n.name("console"), "namespace": n.namespace}],
            }),
            false,
        );
        push(
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": n.name("console"), "labels": n.labels("console")},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": n.selector("console")},
                    "template": pod,
                },
            }),
            false,
        );
        push(
            service(
                &n,
                n.name("console"),
                "console",
                vec![svc_port("http", HTTP_PORT)],
            ),
            false,
        );
    }
    out
}

/// What every pod of one Flotilla shares.
struct Pods<'a> {
    n: &'a Names,
    image: &'a str,
    grace: i64,
    tls_secret: String,
    /// The Secret of JWKS files address spaces may name.
    jwks_secret: Option<String>,
    /// Of the ConfigMap's data.
    config_hash: String,
}

/// The settings every part shares, as the `FLOTILLA_*` variables of their
/// flags: the operations listener, the mesh secret and TLS files, the
/// router the components join, the console they follow, JSON logs.
fn shared_settings(n: &Names, console: bool) -> Value {
    let mut env = json!({
        "FLOTILLA_HTTP": format!("0.0.0.0:{HTTP_PORT}"),
        "FLOTILLA_MESH_SECRET_FILE": format!("{MESH_DIR}/mesh-secret"),
        "FLOTILLA_TLS_CERT": format!("{TLS_DIR}/tls.crt"),
        "FLOTILLA_TLS_KEY": format!("{TLS_DIR}/tls.key"),
        "FLOTILLA_ROUTER": format!("{}:{AMQP_PORT}", n.svc("router")),
        "FLOTILLA_LOG_JSON": "true",
    });
    if console {
        env["FLOTILLA_CONSOLE"] = format!("http://{}:{HTTP_PORT}", n.svc("console")).into();
    }
    env
}

impl Pods<'_> {
    /// A pod template for `component`: the image with `args`, the mesh
    /// secret and TLS files, the admin token, `--http`, probes, and a
    /// locked-down security context.
    fn pod(
        &self,
        component: &str,
        args: Vec<String>,
        ports: Vec<Value>,
        resources: Option<&k8s_openapi::api::core::v1::ResourceRequirements>,
        mut mounts: Vec<Value>,
    ) -> Value {
        let n = self.n;
        mounts.extend([
            json!({"name": "mesh", "mountPath": MESH_DIR, "readOnly": true}),
            json!({"name": "tls", "mountPath": TLS_DIR, "readOnly": true}),
        ]);
        let mut volumes = vec![
            json!({"name": "mesh", "secret": {"secretName": n.name("mesh"), "defaultMode": 0o400}}),
            json!({"name": "tls", "secret": {"secretName": self.tls_secret, "defaultMode": 0o400}}),
        ];
        if let Some(jwks) = &self.jwks_secret {
            // Public keys: readable, and updated in place when the Secret
            // changes (a directory mount, not subPath).
            mounts.push(json!({"name": "jwks", "mountPath": JWKS_DIR, "readOnly": true}));
            volumes.push(
                json!({"name": "jwks", "secret": {"secretName": jwks, "defaultMode": 0o444}}),
            );
        }
        let mut container = json!({
            "name": component,
            "image": self.image,
            "args": args,
            "ports": ports,
            // What every part shares (`X-config`); a component takes the
            // variables of its own flags.
            "envFrom": [{"configMapRef": {"name": n.name("config")}}],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "FLOTILLA_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": n.name("admin"), "key": "token"}}},
            ],
            "volumeMounts": mounts,
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 2, "failureThreshold": 2},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "runAsNonRoot": true,
                "capabilities": {"drop": ["ALL"]},
            },
        });
        if let Some(r) = resources {
            container["resources"] = serde_json::to_value(r).unwrap_or(Value::Null);
        }
        json!({
            "metadata": {
                "labels": n.labels(component),
                // A changed ConfigMap rolls the pods that read it.
                "annotations": {"flotilla.dev/config-hash": self.config_hash},
            },
            "spec": {
                "serviceAccountName": n.instance,
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": self.grace,
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": 65532,
                    "runAsGroup": 65532,
                    "fsGroup": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [container],
                "volumes": volumes,
            },
        })
    }
}

fn port(name: &str, port: u16) -> Value {
    json!({"name": name, "containerPort": port, "protocol": "TCP"})
}

/// A Service `name` in front of `component`'s pods.
fn service(n: &Names, name: String, component: &str, ports: Vec<Value>) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": n.labels(component)},
        "spec": {"selector": n.selector(component), "ports": ports},
    })
}

fn svc_port(name: &str, port: u16) -> Value {
    json!({"name": name, "port": port, "targetPort": name, "protocol": "TCP"})
}

fn claim(name: &str, s: &flotilla_core::crd::StorageSpec, labels: Value) -> Value {
    let mut c = json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": s.size}},
        },
    });
    if let Some(class) = &s.storage_class_name {
        c["spec"]["storageClassName"] = class.clone().into();
    }
    c
}

fn with(mut v: Value, k: &str, val: &str) -> Value {
    v[k] = val.into();
    v
}

fn with_label(mut pod: Value, k: &str, val: &str) -> Value {
    pod["metadata"]["labels"][k] = val.into();
    pod
}

/// The owner reference every object carries: deleting the Flotilla
/// deletes them (garbage collection), and they trigger its reconcile.
pub fn owner_reference(f: &Flotilla) -> Value {
    json!({
        "apiVersion": "flotilla.dev/v1",
        "kind": "Flotilla",
        "name": f.metadata.name,
        "uid": f.metadata.uid,
        "controller": true,
        "blockOwnerDeletion": true,
    })
}
