//! The address model's objects, shaped like Kubernetes resources so that one
//! JSON/YAML body is the REST body, the `--config` document and the CRD
//! (DESIGN.md "Address model").

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `apiVersion` every Flotilla resource carries.
pub const API_VERSION: &str = "flotilla.dev/v1";

/// Why a resource was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("metadata.name {0:?} is not a DNS label (lower-case letters, digits and '-', 1 to 63 characters)")]
    BadName(String),
    #[error("apiVersion {0:?} is not {API_VERSION:?}")]
    BadApiVersion(String),
    #[error("{0}")]
    Invalid(String),
}

/// `metadata` of every resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The five address types (DESIGN.md table).
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AddressType {
    Anycast,
    Multicast,
    Queue,
    Topic,
    Subscription,
}

impl AddressType {
    /// Address types routers deliver directly (no broker).
    pub fn is_direct(self) -> bool {
        matches!(self, AddressType::Anycast | AddressType::Multicast)
    }
}

/// What a space does with an address nobody declared.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Undeclared {
    /// Refuse the attach with `amqp:not-found` (spaces created by API or config).
    #[default]
    Reject,
    /// Treat it as anycast, as a bare Qpid Dispatch Router does.
    Anycast,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthenticationSpec {
    /// Whether SASL ANONYMOUS (or no SASL at all) is accepted.
    #[serde(default)]
    pub anonymous: bool,
    /// The OIDC provider whose tokens (JWTs) the space's clients may
    /// present instead of a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<crate::oidc::OidcSpec>,
}

/// What an address space may use (DESIGN.md "Plans"); unset: no limit.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quotas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
}

/// The plans an address space may name, and what each allows.
pub const PLANS: &[(&str, Quotas)] = &[
    (
        "small",
        Quotas {
            addresses: Some(100),
            connections: Some(100),
            links: Some(1_000),
            message_size: Some(1 << 20),
            stored_bytes: Some(100 << 20),
        },
    ),
    (
        "standard",
        Quotas {
            addresses: Some(1_000),
            connections: Some(1_000),
            links: Some(10_000),
            message_size: Some(16 << 20),
            stored_bytes: Some(1 << 30),
        },
    ),
    (
        "large",
        Quotas {
            addresses: Some(10_000),
            connections: Some(10_000),
            links: Some(100_000),
            message_size: Some(64 << 20),
            stored_bytes: Some(10 << 30),
        },
    ),
];

/// What happens when a broker-held address holds as much as its policy
/// allows.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum Overflow {
    /// New messages are refused (`amqp:resource-limit-exceeded`).
    #[default]
    Reject,
    /// The oldest waiting message is dropped to make room.
    DropOldest,
}

/// What a broker does with the messages of a queue, topic or
/// subscription address (ActiveMQ Artemis's address settings). Unset
/// fields fall back to the space's `addressDefaults`, then to its plan's,
/// then to the broker's flags (`--max-deliveries`, `--dead-letter-queue`,
/// `--expiry-queue`).
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressPolicy {
    /// Where a message goes after `maxDeliveries` failed deliveries (an
    /// address of the same space).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_address: Option<String>,
    /// Where expired messages go (unset: they are dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_address: Option<String>,
    /// Deliveries (released with delivery-failed, modified, or abandoned
    /// by a consumer that went away) before a message is dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1)))]
    pub max_deliveries: Option<u32>,
    /// The time to live, in milliseconds, of a message that has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1)))]
    pub default_ttl_ms: Option<u64>,
    /// Messages it may hold (waiting and out with consumers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1)))]
    pub max_depth: Option<u64>,
    /// Bytes of messages it may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1)))]
    pub max_bytes: Option<u64>,
    /// What happens at `maxDepth` or `maxBytes` (default: reject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflow: Option<Overflow>,
}

impl AddressPolicy {
    /// This policy, with `base` filling what it leaves unset.
    pub fn or(&self, base: &AddressPolicy) -> AddressPolicy {
        AddressPolicy {
            dead_letter_address: self
                .dead_letter_address
                .clone()
                .or_else(|| base.dead_letter_address.clone()),
            expiry_address: self
                .expiry_address
                .clone()
                .or_else(|| base.expiry_address.clone()),
            max_deliveries: self.max_deliveries.or(base.max_deliveries),
            default_ttl_ms: self.default_ttl_ms.or(base.default_ttl_ms),
            max_depth: self.max_depth.or(base.max_depth),
            max_bytes: self.max_bytes.or(base.max_bytes),
            overflow: self.overflow.or(base.overflow),
        }
    }

    /// True when it bounds how much the address holds.
    pub fn bounded(&self) -> bool {
        self.max_depth.is_some() || self.max_bytes.is_some()
    }

    /// The policy is usable: its addresses are addresses, its numbers
    /// positive.
    ///
    /// # Errors
    /// What is wrong, naming the field.
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (field, a) in [
            ("deadLetterAddress", &self.dead_letter_address),
            ("expiryAddress", &self.expiry_address),
        ] {
            if let Some(a) = a {
                validate_address(a)
                    .map_err(|e| ValidationError::Invalid(format!("{field}: {e}")))?;
                if a.starts_with('$') || crate::pattern::is_pattern(a) {
                    return Err(ValidationError::Invalid(format!(
                        "{field} {a:?} must be a plain address (no '$' prefix, no wildcards)"
                    )));
                }
            }
        }
        for (field, n) in [
            ("maxDeliveries", self.max_deliveries.map(u64::from)),
            ("defaultTtlMs", self.default_ttl_ms),
            ("maxDepth", self.max_depth),
            ("maxBytes", self.max_bytes),
        ] {
            if n == Some(0) {
                return Err(ValidationError::Invalid(format!(
                    "{field} must be at least 1"
                )));
            }
        }
        Ok(())
    }
}

/// The address defaults each plan gives its spaces (by plan name): how
/// much one queue or subscription may hold.
pub fn plan_address_defaults(plan: Option<&str>) -> AddressPolicy {
    let depth = match plan {
        Some("small") => Some(100_000),
        Some("standard") => Some(1_000_000),
        Some("large") => Some(10_000_000),
        _ => None,
    };
    AddressPolicy {
        max_depth: depth,
        ..Default::default()
    }
}

impl Quotas {
    /// The plan's quotas, with `over` taking precedence field by field.
    ///
    /// # Errors
    /// The plan is not one of [`PLANS`].
    pub fn of(plan: Option<&str>, over: Option<&Quotas>) -> Result<Quotas, ValidationError> {
        let base = match plan {
            None => Quotas::default(),
            Some(p) => PLANS
                .iter()
                .find(|(n, _)| *n == p)
                .map(|(_, q)| *q)
                .ok_or_else(|| {
                    let names: Vec<&str> = PLANS.iter().map(|(n, _)| *n).collect();
                    ValidationError::Invalid(format!(
                        "no plan {p:?}; the plans are {}",
                        names.join(", ")
                    ))
                })?,
        };
        let o = over.copied().unwrap_or_default();
        Ok(Quotas {
            addresses: o.addresses.or(base.addresses),
            connections: o.connections.or(base.connections),
            links: o.links.or(base.links),
            message_size: o.message_size.or(base.message_size),
            stored_bytes: o.stored_bytes.or(base.stored_bytes),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "flotilla.dev",
        version = "v1",
        kind = "AddressSpace",
        doc = "A tenant: its plan, quotas and authentication. Clients name it as the AMQP Open hostname or the MQTT user's space.",
        root = "AddressSpaceResource",
        namespaced,
        status = "Status",
        shortname = "as",
        category = "flotilla",
        printcolumn = r#"{"name":"Plan","type":"string","jsonPath":".spec.plan"}"#,
        printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressSpaceSpec {
    /// One of [`PLANS`]; unset: no limits but `quotas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "kube",
        schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))
    )]
    pub plan: Option<String>,
    /// Limits of this space's own, over its plan's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Quotas>,
    #[serde(default)]
    pub authentication: AuthenticationSpec,
    #[serde(default)]
    pub undeclared_addresses: Undeclared,
    /// Clients of this space must connect over TLS: others are refused,
    /// and a PLAIN login over plain TCP before its password is checked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_tls: bool,
    /// The policy of every queue, topic and subscription address of the
    /// space, over its plan's; each address may override it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_defaults: Option<AddressPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, kube::KubeSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "flotilla.dev",
        version = "v1",
        kind = "Address",
        doc = "An address clients send to and receive from, in one address space, of one of five types.",
        root = "AddressResource",
        namespaced,
        status = "Status",
        shortname = "addr",
        category = "flotilla",
        printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.address"}"#,
        printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
        printcolumn = r#"{"name":"Space","type":"string","jsonPath":".spec.addressSpace"}"#,
        printcolumn = r#"{"name":"Broker","type":"string","jsonPath":".status.broker","priority":1}"#,
        printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[cfg_attr(
    feature = "kube",
    x_kube(
        validation = kube::core::Rule::new("self.type == 'subscription' ? has(self.topic) : !has(self.topic)")
            .message("spec.topic names the topic of a subscription address; only subscription addresses have one"),
        validation = kube::core::Rule::new("!has(self.broker) || self.type in ['queue', 'topic', 'subscription']")
            .message("spec.broker is only for queue, topic and subscription addresses"),
        validation = kube::core::Rule::new("!has(self.policy) || self.type in ['queue', 'topic', 'subscription']")
            .message("spec.policy is only for queue, topic and subscription addresses"),
        validation = kube::core::Rule::new("self.type in ['multicast', 'topic'] || !self.address.matches('(^|[/.])[+*#]([/.]|$)')")
            .message("only multicast and topic addresses may be patterns (+, *, #)")
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressSpec {
    /// The space; in a `--config` file it defaults to `default`.
    #[serde(default = "default_space")]
    pub address_space: String,
    /// The string clients use; may contain `/` and `.`; may be a pattern for
    /// multicast and topic.
    #[cfg_attr(
        feature = "kube",
        schemars(
            length(min = 1, max = 1024),
            regex(pattern = r"^[^$\x00-\x20\x7f][^\x00-\x20\x7f]*$")
        )
    )]
    pub address: String,
    #[serde(rename = "type")]
    pub kind: AddressType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// `subscription` addresses: the topic address it subscribes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Queues and topics: the broker (its container id) that holds it;
    /// unset: routers place it among the brokers they know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// Queues, topics and subscriptions: dead-lettering, expiry, default
    /// TTL and limits, over the space's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<AddressPolicy>,
}

/// What an authorization rule allows.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Send,
    Recv,
    View,
    Manage,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    pub addresses: Vec<String>,
    pub operations: Vec<Operation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "flotilla.dev",
        version = "v1",
        kind = "MessagingUser",
        doc = "A user of one address space, with what it may do on which addresses.",
        root = "MessagingUserResource",
        namespaced,
        status = "Status",
        shortname = "mu",
        category = "flotilla",
        printcolumn = r#"{"name":"Username","type":"string","jsonPath":".spec.username"}"#,
        printcolumn = r#"{"name":"Space","type":"string","jsonPath":".spec.addressSpace"}"#,
        printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessagingUserSpec {
    #[serde(default = "default_space")]
    pub address_space: String,
    #[cfg_attr(
        feature = "kube",
        schemars(length(min = 1, max = 255), regex(pattern = r"^[^@]+$"))
    )]
    pub username: String,
    /// Write-only: accepted on input, turned into SCRAM keys, never echoed.
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    #[serde(default)]
    pub authorization: Vec<AuthorizationRule>,
    /// The password's SCRAM-SHA-256 keys, as the control plane stores them
    /// and sends them to routers and brokers (never shown to API clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scram_sha256: Option<ScramKeys>,
}

/// SCRAM-SHA-256 keys (RFC 5802), base64: enough to check a password or a
/// proof, not to recover the password.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScramKeys {
    pub salt: String,
    pub iterations: u32,
    pub stored_key: String,
    pub server_key: String,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(<redacted>)")
    }
}

fn default_space() -> String {
    "default".to_string()
}

/// One condition of a resource's status, as Kubernetes writes them
/// (`type` `Ready`, `status` `True`/`False`/`Unknown`, a CamelCase
/// `reason` and a sentence for people).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A `Ready` condition: true, or false with why.
    pub fn ready(ok: bool, reason: &str, message: impl Into<String>) -> Condition {
        Condition {
            kind: "Ready".into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            ..Default::default()
        }
    }
}

/// Status every resource reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes (Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Queues and topics without `spec.broker`: the broker the console
    /// placed it on (it stays there until that broker is retired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
}

macro_rules! resource {
    ($name:ident, $spec:ty, $kind:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            pub api_version: String,
            pub kind: String,
            pub metadata: ObjectMeta,
            pub spec: $spec,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<Status>,
        }

        impl $name {
            /// The resource `kind` string.
            pub const KIND: &'static str = $kind;

            /// Checks the envelope shared by every resource.
            fn validate_envelope(&self) -> Result<(), ValidationError> {
                if self.api_version != API_VERSION {
                    return Err(ValidationError::BadApiVersion(self.api_version.clone()));
                }
                validate_dns_label(&self.metadata.name)
            }
        }
    };
}

resource!(AddressSpace, AddressSpaceSpec, "AddressSpace");
resource!(Address, AddressSpec, "Address");
resource!(MessagingUser, MessagingUserSpec, "MessagingUser");

impl AddressSpace {
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.validate_envelope()?;
        if let Some(p) = &self.spec.address_defaults {
            p.validate()
                .map_err(|e| ValidationError::Invalid(format!("spec.addressDefaults.{e}")))?;
        }
        if let Some(o) = &self.spec.authentication.oidc {
            o.validate()
                .map_err(|e| ValidationError::Invalid(format!("spec.authentication.oidc.{e}")))?;
            for r in &o.authorization {
                for a in &r.addresses {
                    validate_address(a)?;
                }
            }
        }
        self.quotas().map(|_| ())
    }

    /// What the space may use: its plan's quotas and its own.
    ///
    /// # Errors
    /// The plan does not exist.
    pub fn quotas(&self) -> Result<Quotas, ValidationError> {
        Quotas::of(self.spec.plan.as_deref(), self.spec.quotas.as_ref())
    }
}

impl Address {
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.validate_envelope()?;
        validate_address(&self.spec.address)?;
        if self.spec.address.starts_with('$') {
            return Err(ValidationError::Invalid(format!(
                "address {:?}: addresses starting with '$' are reserved for Flotilla ($stat, $dynamic/…)",
                self.spec.address
            )));
        }
        let pattern = crate::pattern::is_pattern(&self.spec.address);
        if pattern && !matches!(self.spec.kind, AddressType::Multicast | AddressType::Topic) {
            return Err(ValidationError::Invalid(format!(
                "address {:?} is a pattern; only multicast and topic addresses may be patterns",
                self.spec.address
            )));
        }
        match (&self.spec.topic, self.spec.kind) {
            (None, AddressType::Subscription) => {
                return Err(ValidationError::Invalid(format!(
                    "subscription address {:?} needs spec.topic, the topic it subscribes to",
                    self.spec.address
                )))
            }
            (Some(t), AddressType::Subscription) => validate_address(t)?,
            (Some(_), _) => {
                return Err(ValidationError::Invalid(
                    "spec.topic is only for subscription addresses".into(),
                ))
            }
            (None, _) => {}
        }
        if self.spec.broker.is_some() && self.spec.kind.is_direct() {
            return Err(ValidationError::Invalid(
                "spec.broker is only for queue, topic and subscription addresses".into(),
            ));
        }
        if let Some(p) = &self.spec.policy {
            if self.spec.kind.is_direct() {
                return Err(ValidationError::Invalid(
                    "spec.policy is only for queue, topic and subscription addresses".into(),
                ));
            }
            p.validate()
                .map_err(|e| ValidationError::Invalid(format!("spec.policy.{e}")))?;
        }
        Ok(())
    }
}

impl MessagingUser {
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.validate_envelope()?;
        if self.spec.username.is_empty() || self.spec.username.contains('@') {
            return Err(ValidationError::Invalid(format!(
                "username {:?} must be non-empty and must not contain '@'",
                self.spec.username
            )));
        }
        for rule in &self.spec.authorization {
            for a in &rule.addresses {
                validate_address(a)?;
            }
        }
        Ok(())
    }
}

/// A DNS label as Kubernetes names are (RFC 1123).
pub fn validate_dns_label(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadName(name.to_string()))
    }
}

fn validate_address(a: &str) -> Result<(), ValidationError> {
    if a.is_empty() || a.len() > 1024 || a.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ValidationError::Invalid(format!(
            "address {a:?} must be 1 to 1024 characters with no spaces or control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(validate_dns_label("prices-1").is_ok());
        assert!(validate_dns_label("Prices").is_err());
        assert!(validate_dns_label("-a").is_err());
        assert!(validate_dns_label("").is_err());
    }

    #[test]
    fn pattern_only_for_multicast() {
        let mut a = Address {
            api_version: API_VERSION.into(),
            kind: "Address".into(),
            metadata: ObjectMeta {
                name: "p".into(),
                ..Default::default()
            },
            spec: AddressSpec {
                address_space: "default".into(),
                address: "prices/#".into(),
                kind: AddressType::Anycast,
                plan: None,
                topic: None,
                broker: None,
                policy: None,
            },
            status: None,
        };
        assert!(a.validate().is_err());
        a.spec.kind = AddressType::Multicast;
        assert!(a.validate().is_ok());
        a.spec.kind = AddressType::Subscription;
        a.spec.address = "audit".into();
        assert!(a.validate().is_err(), "a subscription needs its topic");
        a.spec.topic = Some("prices/#".into());
        assert!(a.validate().is_ok());
        a.spec.kind = AddressType::Queue;
        assert!(a.validate().is_err(), "only subscriptions name a topic");
    }
}
