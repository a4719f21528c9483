//! The kinds that exist only on Kubernetes (feature `kube`): `Flotilla`,
//! one installation that the operator runs, and `AddressSpacePlan`, the
//! plans and quotas an address space may name. The address model's own
//! kinds (`AddressSpace`, `Address`, `MessagingUser`) are the resources of
//! [`crate::resources`], derived as custom resources there.
//!
//! `flotilla crdgen` writes every CRD from these types into `k8s/crds/`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::resources::{Condition, Quotas};

/// One Flotilla installation in a namespace: routers, brokers, MQTT
/// gateways, the last-will service and the console, and how they scale.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "flotilla.dev",
    version = "v1",
    kind = "Flotilla",
    doc = "One Flotilla installation: routers, brokers, MQTT gateways, the last-will service and the console, run by the operator.",
    namespaced,
    status = "FlotillaStatus",
    shortname = "flo",
    category = "flotilla",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Routers","type":"string","jsonPath":".status.routers.ready"}"#,
    printcolumn = r#"{"name":"Brokers","type":"string","jsonPath":".status.brokers.ready"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlotillaSpec {
    /// The image every component runs; unset: the operator's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub routers: RouterSpec,
    #[serde(default)]
    pub brokers: BrokerSpec,
    #[serde(default)]
    pub mqtt_gateway: GatewaySpec,
    #[serde(default)]
    pub lwt: SingletonSpec,
    #[serde(default)]
    pub console: ConsoleSpec,
    #[serde(default)]
    pub tls: TlsSpec,
    /// A Secret of JWKS files (one key per file) that address spaces name
    /// with `oidc.jwksFile`: issuers' keys for sites that cannot fetch
    /// them. Mounted into routers, brokers and gateways; a changed Secret
    /// reaches them within their spaces' `keyCacheSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_secret: Option<String>,
    /// Seconds a pod has to stop; a router spends all but five of them
    /// draining (lame duck). Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3600))]
    pub termination_grace_period_seconds: Option<i64>,
}

/// Interior routers join the mesh; edge routers keep one uplink to a
/// central mesh.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouterMode {
    #[default]
    Interior,
    Edge,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterSpec {
    /// Routers to run (with autoscaling: where the autoscaler starts).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    #[serde(default)]
    pub mode: RouterMode,
    /// Edge mode: the central mesh's inter-router addresses (HOST:PORT).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplinks: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Interior mode: also a Service of this type on the inter-router
    /// port, for edge routers in other clusters (they prove themselves
    /// with the mesh secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose_inter_router: Option<ExposeSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

/// How the inter-router port is reached from outside the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExposeSpec {
    #[serde(rename = "type")]
    pub kind: ExposeType,
    /// Networks (CIDR) that may connect; empty: any (the mesh secret
    /// still decides who joins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ExposeType {
    LoadBalancer,
    NodePort,
}

impl Default for RouterSpec {
    fn default() -> Self {
        RouterSpec {
            replicas: 1,
            mode: RouterMode::Interior,
            uplinks: Vec::new(),
            autoscaling: None,
            expose_inter_router: None,
            resources: None,
        }
    }
}

/// A HorizontalPodAutoscaler on the routers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minReplicas <= self.maxReplicas",
    "message": "minReplicas must not be above maxReplicas"
}]))]
pub struct Autoscaling {
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// Average CPU use, in percent of the routers' CPU requests. Default 70.
    #[serde(
        default,
        rename = "targetCPUUtilization",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: Option<i32>,
    /// Also scale on client connections per router (a pods metric,
    /// `flotilla_router_client_connections`, from a Prometheus adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub connections_per_router: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokerSpec {
    /// Brokers, each a StatefulSet of one with its own volume, so a queue
    /// placed on broker-N stays with broker-N's journal.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 64))]
    pub replicas: i32,
    #[serde(default = "StorageSpec::broker")]
    pub storage: StorageSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

impl Default for BrokerSpec {
    fn default() -> Self {
        BrokerSpec {
            replicas: 1,
            storage: StorageSpec::broker(),
            resources: None,
        }
    }
}

/// A persistent volume claim's size and class.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageSpec {
    /// A Kubernetes quantity, e.g. `10Gi`.
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
    /// Unset: the cluster's default storage class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl StorageSpec {
    fn broker() -> StorageSpec {
        StorageSpec {
            size: "10Gi".into(),
            storage_class_name: None,
        }
    }

    fn small() -> StorageSpec {
        StorageSpec {
            size: "1Gi".into(),
            storage_class_name: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// MQTT gateway replicas (0: none); a session moves between them.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        GatewaySpec {
            replicas: 1,
            resources: None,
        }
    }
}

/// A part that runs once and keeps data on its own volume (the last-will
/// service).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SingletonSpec {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "StorageSpec::small")]
    pub storage: StorageSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

impl Default for SingletonSpec {
    fn default() -> Self {
        SingletonSpec {
            enabled: true,
            storage: StorageSpec::small(),
            resources: None,
        }
    }
}

/// The console: its store is the namespace's custom resources.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsoleSpec {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

impl Default for ConsoleSpec {
    fn default() -> Self {
        ConsoleSpec {
            enabled: true,
            resources: None,
        }
    }
}

/// TLS for clients and between the parts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSpec {
    /// A Secret with `tls.crt`, `tls.key` and `ca.crt` (the CA that signed
    /// it, which is also the mesh CA); unset: the operator makes a CA and
    /// certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// What the operator saw when it last reconciled.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlotillaStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub routers: ReadyCount,
    #[serde(default)]
    pub brokers: ReadyCount,
    #[serde(default)]
    pub gateways: ReadyCount,
}

/// Pods wanted and ready, and `ready` as people read it (`2/3`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadyCount {
    pub desired: i32,
    pub available: i32,
    #[serde(default)]
    pub ready: String,
}

/// A plan address spaces may name (`spec.plan`): what a space on it may
/// use. The plans built into the console (`small`, `standard`, `large`)
/// are in `k8s/base/plans.yaml` in this shape.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "flotilla.dev",
    version = "v1",
    kind = "AddressSpacePlan",
    doc = "A plan address spaces may name, and the quotas a space on it gets.",
    shortname = "asp",
    category = "flotilla",
    printcolumn = r#"{"name":"Addresses","type":"integer","jsonPath":".spec.quotas.addresses"}"#,
    printcolumn = r#"{"name":"Connections","type":"integer","jsonPath":".spec.quotas.connections"}"#,
    printcolumn = r#"{"name":"Links","type":"integer","jsonPath":".spec.quotas.links"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressSpacePlanSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub quotas: Quotas,
}

fn one() -> i32 {
    1
}

fn yes() -> bool {
    true
}

/// Every CRD Flotilla defines, by file name (as `k8s/crds/` holds them).
pub fn all() -> Vec<(
    &'static str,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
)> {
    use kube::CustomResourceExt;
    vec![
        (
            "addressspace.yaml",
            crate::resources::AddressSpaceResource::crd(),
        ),
        ("address.yaml", crate::resources::AddressResource::crd()),
        (
            "messaginguser.yaml",
            crate::resources::MessagingUserResource::crd(),
        ),
        ("addressspaceplan.yaml", AddressSpacePlan::crd()),
        ("flotilla.yaml", Flotilla::crd()),
    ]
}
