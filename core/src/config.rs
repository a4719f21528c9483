//! `--config FILE`: resources in the REST/CRD shape, several YAML documents,
//! applied at start like `kubectl apply -f`, and the validated view of them
//! every component serves from ([`Tenancy`]).
//!
//! A tenancy's maps are persistent (`imbl`): a copy shares them, and a
//! change to one address or user copies only the path to it. So a
//! component following the console applies each change in O(log n) and
//! hands its connections a new snapshot without copying the rest
//! (`watch::follow`), at 100,000 addresses as at 10.

use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::auth::ScramCredentials;
use crate::pattern;
use crate::resources::{
    Address, AddressPolicy, AddressSpace, AddressType, AuthorizationRule, MessagingUser, Operation,
    Undeclared, ValidationError,
};

/// The name of the zero-config address space.
pub const DEFAULT_SPACE: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("document {doc}: {msg}")]
    Parse { doc: usize, msg: String },
    #[error("document {doc} ({kind} {name:?}): {source}")]
    Invalid {
        doc: usize,
        kind: String,
        name: String,
        source: ValidationError,
    },
}

/// Who may connect without credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    Deny,
    /// Only clients connecting from a loopback address (zero-config default).
    Loopback,
    Allow,
}

/// A messaging user as the servers need it: keys and rules, no password.
#[derive(Debug, Clone)]
pub struct User {
    pub credentials: ScramCredentials,
    /// Shared by every connection of the user.
    pub rules: std::sync::Arc<[AuthorizationRule]>,
}

/// A persistent map: a clone shares it; a change copies one path.
pub type Map<K, V> = imbl::HashMap<K, V>;

/// One address space (tenant) as the servers need it.
#[derive(Debug, Clone)]
pub struct Space {
    pub name: String,
    pub anonymous: Anonymous,
    pub undeclared: Undeclared,
    /// Clients must come over TLS (`spec.requireTls`).
    pub require_tls: bool,
    exact: Map<String, AddressType>,
    patterns: Arc<Vec<(String, AddressType)>>,
    /// `subscription` addresses → their topic (ordered, so a follower
    /// finds what changed by a diff that skips what two versions share).
    pub subscriptions: imbl::OrdMap<String, String>,
    /// Declared addresses (or patterns) pinned to a broker.
    pub placements: Map<String, String>,
    /// What the space may use.
    pub quotas: crate::resources::Quotas,
    pub users: Map<String, User>,
    /// The policy of its broker-held addresses that set none of their
    /// own: its `addressDefaults` over its plan's.
    pub address_defaults: Arc<AddressPolicy>,
    /// Declared addresses' own policies, over `address_defaults`.
    policies: Map<String, Arc<AddressPolicy>>,
    /// The OIDC provider whose tokens its clients may present.
    pub oidc: Option<Arc<crate::oidc::OidcSpec>>,
}

impl Space {
    fn new(name: &str, anonymous: Anonymous, undeclared: Undeclared) -> Self {
        Space {
            name: name.to_string(),
            anonymous,
            undeclared,
            require_tls: false,
            exact: Map::new(),
            patterns: Arc::default(),
            subscriptions: imbl::OrdMap::new(),
            placements: Map::new(),
            quotas: Default::default(),
            users: Map::new(),
            address_defaults: Arc::default(),
            policies: Map::new(),
            oidc: None,
        }
    }

    /// A space with `s`'s settings and nothing declared in it yet.
    ///
    /// # Errors
    /// `s` is invalid.
    pub fn from_resource(s: &AddressSpace) -> Result<Space, ValidationError> {
        s.validate()?;
        let anonymous = if s.spec.authentication.anonymous {
            Anonymous::Allow
        } else {
            Anonymous::Deny
        };
        let mut space = Space::new(&s.metadata.name, anonymous, s.spec.undeclared_addresses);
        space.require_tls = s.spec.require_tls;
        space.oidc = s.spec.authentication.oidc.clone().map(Arc::new);
        let plan = crate::resources::plan_address_defaults(s.spec.plan.as_deref());
        space.address_defaults = Arc::new(
            s.spec
                .address_defaults
                .as_ref()
                .map_or(plan.clone(), |d| d.or(&plan)),
        );
        space.quotas = s.quotas()?;
        Ok(space)
    }

    /// The zero-config `default` space (no AddressSpace resource names it).
    pub fn zero_config_default() -> Space {
        Space::new(DEFAULT_SPACE, Anonymous::Loopback, Undeclared::Anycast)
    }

    /// Adds what Address `a` declares (its type, policy, topic, broker).
    ///
    /// # Errors
    /// `a` is invalid.
    pub fn add_address(&mut self, a: &Address) -> Result<(), ValidationError> {
        a.validate()?;
        self.declare(&a.spec.address, a.spec.kind);
        if let Some(p) = &a.spec.policy {
            let p = Arc::new(p.or(&self.address_defaults));
            self.policies.insert(a.spec.address.clone(), p);
        }
        if let Some(t) = &a.spec.topic {
            self.subscriptions.insert(a.spec.address.clone(), t.clone());
        }
        let placed = a.status.as_ref().and_then(|s| s.broker.as_ref());
        if let Some(b) = a.spec.broker.as_ref().or(placed) {
            self.placements.insert(a.spec.address.clone(), b.clone());
        }
        Ok(())
    }

    /// Takes back what Address `a` declared.
    pub fn remove_address(&mut self, a: &Address) {
        let address = &a.spec.address;
        if pattern::is_pattern(address) {
            if self.patterns.iter().any(|(p, _)| p == address) {
                Arc::make_mut(&mut self.patterns).retain(|(p, _)| p != address);
            }
        } else {
            self.exact.remove(address);
        }
        self.policies.remove(address);
        self.subscriptions.remove(address);
        self.placements.remove(address);
    }

    /// Adds MessagingUser `u` (its keys and rules).
    ///
    /// # Errors
    /// `u` is invalid or its keys do not decode.
    pub fn add_user(&mut self, u: &MessagingUser) -> Result<(), ValidationError> {
        u.validate()?;
        let credentials = match (&u.spec.password, &u.spec.scram_sha256) {
            (Some(p), _) => ScramCredentials::derive(p),
            (None, Some(k)) => ScramCredentials::from_keys(k).ok_or_else(|| {
                ValidationError::Invalid("spec.scramSha256 does not decode".into())
            })?,
            (None, None) => {
                return Err(ValidationError::Invalid("spec.password is required".into()))
            }
        };
        self.users.insert(
            u.spec.username.clone(),
            User {
                credentials,
                rules: u.spec.authorization.clone().into(),
            },
        );
        Ok(())
    }

    /// Takes MessagingUser `u` out.
    pub fn remove_user(&mut self, u: &MessagingUser) {
        self.users.remove(&u.spec.username);
    }

    /// The policy of broker-held `address` (or of the declared address or
    /// pattern it falls under).
    pub fn policy(&self, address: &str) -> Arc<AddressPolicy> {
        self.declared_as(address)
            .and_then(|(_, d)| self.policies.get(d))
            .unwrap_or(&self.address_defaults)
            .clone()
    }

    /// The type of `address` in this space: a declared address, else the first
    /// declared pattern it matches, else what the space does with undeclared ones.
    pub fn lookup(&self, address: &str) -> Option<AddressType> {
        self.declaration(address).map(|(t, _)| t)
    }

    /// Like [`Space::lookup`], with the declaration that decided: the
    /// address itself, or the pattern it matched (brokers place a topic
    /// and everything under it together).
    pub fn declaration<'a>(&'a self, address: &'a str) -> Option<(AddressType, &'a str)> {
        if let Some(d) = self.declared_as(address) {
            return Some(d);
        }
        match self.undeclared {
            Undeclared::Anycast => Some((AddressType::Anycast, address)),
            Undeclared::Reject => None,
        }
    }

    /// The declared address or pattern `address` falls under, if any.
    pub fn declared_as<'a>(&'a self, address: &'a str) -> Option<(AddressType, &'a str)> {
        if let Some(t) = self.exact.get(address) {
            return Some((*t, address));
        }
        self.patterns
            .iter()
            .find(|(p, _)| pattern::matches(p, address))
            .map(|(p, t)| (*t, p.as_str()))
    }

    /// Declares an address.
    pub fn declare(&mut self, address: &str, kind: AddressType) {
        if pattern::is_pattern(address) {
            let patterns = Arc::make_mut(&mut self.patterns);
            patterns.retain(|(p, _)| p != address);
            patterns.push((address.to_string(), kind));
        } else {
            self.exact.insert(address.to_string(), kind);
        }
    }

    /// True when a declared topic (or topic pattern) has addresses that
    /// `filter` matches: an MQTT subscription to `#` takes them.
    pub fn topics_overlapping(&self, filter: &str) -> bool {
        self.exact
            .iter()
            .any(|(a, t)| *t == AddressType::Topic && crate::pattern::matches(filter, a))
            || self
                .patterns
                .iter()
                .any(|(p, t)| *t == AddressType::Topic && crate::pattern::overlaps(filter, p))
    }

    /// Number of declared addresses and patterns.
    pub fn declared(&self) -> usize {
        self.exact.len() + self.patterns.len()
    }
}

/// Every address space a component serves.
#[derive(Debug, Clone)]
pub struct Tenancy {
    pub spaces: Map<String, Space>,
    /// The brokers the console has registered (and not retired), over
    /// which routers place queues and topics; `None` without a console.
    pub brokers: Option<std::collections::BTreeSet<String>>,
}

impl Default for Tenancy {
    fn default() -> Self {
        Self::zero_config()
    }
}

impl Tenancy {
    /// One space, `default`: anonymous clients on loopback, and any address
    /// nobody declared behaves as anycast (DESIGN.md "Zero-config behaviour").
    pub fn zero_config() -> Self {
        let mut spaces = Map::new();
        spaces.insert(DEFAULT_SPACE.to_string(), Space::zero_config_default());
        Tenancy {
            spaces,
            brokers: None,
        }
    }

    /// Reads and validates a config file.
    ///
    /// # Errors
    /// The file cannot be read, a document does not parse, or a resource is
    /// invalid or names a space that does not exist.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Builds the tenancy from YAML text (one or more documents). The
    /// zero-config `default` space stays unless a document declares an
    /// AddressSpace named `default`, whose spec then applies.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let mut spaces = Vec::new();
        let mut addresses = Vec::new();
        let mut users = Vec::new();
        for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let doc = i + 1;
            let value = serde_yaml::Value::deserialize_from(de, doc)?;
            if value.is_null() {
                continue;
            }
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .ok_or_else(|| ConfigError::Parse {
                    doc,
                    msg: "missing `kind`".into(),
                })?
                .to_string();
            match kind.as_str() {
                "AddressSpace" => spaces.push((doc, typed(value, doc)?)),
                "Address" => addresses.push((doc, typed(value, doc)?)),
                "MessagingUser" => users.push((doc, typed(value, doc)?)),
                other => {
                    return Err(ConfigError::Parse {
                        doc,
                        msg: format!(
                        "unknown kind {other:?} (expected AddressSpace, Address or MessagingUser)"
                    ),
                    })
                }
            }
        }
        Self::from_resources(spaces, addresses, users)
    }

    /// Builds the tenancy from resources (each with the number of the
    /// document it came from, for errors), as a config file or the control
    /// plane gives them. The zero-config `default` space stays unless an
    /// AddressSpace named `default` is given, whose spec then applies.
    ///
    /// # Errors
    /// A resource is invalid or names a space that does not exist.
    pub fn from_resources(
        spaces: Vec<(usize, AddressSpace)>,
        addresses: Vec<(usize, Address)>,
        users: Vec<(usize, MessagingUser)>,
    ) -> Result<Self, ConfigError> {
        let mut t = Self::zero_config();
        for (doc, s) in spaces {
            let space = Space::from_resource(&s)
                .map_err(|e| invalid(doc, "AddressSpace", &s.metadata.name, e))?;
            t.spaces.insert(s.metadata.name.clone(), space);
        }
        for (doc, a) in addresses {
            let name = &a.metadata.name;
            let space = t
                .spaces
                .get_mut(&a.spec.address_space)
                .ok_or_else(|| no_space(doc, "Address", name, &a.spec.address_space))?;
            space
                .add_address(&a)
                .map_err(|e| invalid(doc, "Address", name, e))?;
        }
        for (doc, u) in users {
            let name = &u.metadata.name;
            let space = t
                .spaces
                .get_mut(&u.spec.address_space)
                .ok_or_else(|| no_space(doc, "MessagingUser", name, &u.spec.address_space))?;
            space
                .add_user(&u)
                .map_err(|e| invalid(doc, "MessagingUser", name, e))?;
        }
        Ok(t)
    }
}

trait FromDoc: Sized {
    fn deserialize_from(de: serde_yaml::Deserializer<'_>, doc: usize) -> Result<Self, ConfigError>;
}

impl FromDoc for serde_yaml::Value {
    fn deserialize_from(de: serde_yaml::Deserializer<'_>, doc: usize) -> Result<Self, ConfigError> {
        serde::Deserialize::deserialize(de).map_err(|e| ConfigError::Parse {
            doc,
            msg: e.to_string(),
        })
    }
}

fn typed<T: DeserializeOwned>(v: serde_yaml::Value, doc: usize) -> Result<T, ConfigError> {
    serde_yaml::from_value(v).map_err(|e| ConfigError::Parse {
        doc,
        msg: e.to_string(),
    })
}

fn invalid(doc: usize, kind: &str, name: &str, source: ValidationError) -> ConfigError {
    ConfigError::Invalid {
        doc,
        kind: kind.to_string(),
        name: name.to_string(),
        source,
    }
}

fn no_space(doc: usize, kind: &str, name: &str, space: &str) -> ConfigError {
    invalid(
        doc,
        kind,
        name,
        ValidationError::Invalid(format!("address space {space:?} is not declared")),
    )
}

/// Everything allowed: what an anonymous client of a space that admits
/// anonymous clients may do.
/// [`allow_all`], one copy shared by every connection that needs it.
pub fn allow_all_shared() -> std::sync::Arc<[AuthorizationRule]> {
    static ALL: std::sync::LazyLock<std::sync::Arc<[AuthorizationRule]>> =
        std::sync::LazyLock::new(|| allow_all().into());
    ALL.clone()
}

pub fn allow_all() -> Vec<AuthorizationRule> {
    vec![AuthorizationRule {
        addresses: vec!["#".into()],
        operations: vec![
            Operation::Send,
            Operation::Recv,
            Operation::View,
            Operation::Manage,
        ],
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-a}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: prices}
spec: {address: prices, type: multicast}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: orders}
spec: {addressSpace: tenant-a, address: orders, type: anycast}
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: alice}
spec:
  addressSpace: tenant-a
  username: alice
  password: wonderland
  authorization: [{addresses: ["orders"], operations: [send, recv]}]
"#;

    #[test]
    fn loads_documents() {
        let t = Tenancy::from_yaml(CONFIG).unwrap();
        let d = &t.spaces["default"];
        assert_eq!(d.lookup("prices"), Some(AddressType::Multicast));
        assert_eq!(d.lookup("anything"), Some(AddressType::Anycast));
        let a = &t.spaces["tenant-a"];
        assert_eq!(a.lookup("orders"), Some(AddressType::Anycast));
        assert_eq!(a.lookup("prices"), None);
        assert_eq!(a.anonymous, Anonymous::Deny);
        assert!(a.users["alice"].credentials.verify_password("wonderland"));
    }

    #[test]
    fn an_address_policy_is_its_own_over_its_spaces_over_its_plans() {
        let t = Tenancy::from_yaml(
            r#"
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: shop}
spec: {plan: small, addressDefaults: {maxDeliveries: 3, deadLetterAddress: dead}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: orders}
spec: {addressSpace: shop, address: orders, type: queue, policy: {maxDeliveries: 7, overflow: dropOldest}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: feed}
spec: {addressSpace: shop, address: "feed/#", type: topic}
"#,
        )
        .unwrap();
        let shop = &t.spaces["shop"];
        let orders = shop.policy("orders");
        assert_eq!(orders.max_deliveries, Some(7));
        assert_eq!(orders.dead_letter_address.as_deref(), Some("dead"));
        assert_eq!(orders.max_depth, Some(100_000), "the small plan's");
        assert_eq!(
            orders.overflow,
            Some(crate::resources::Overflow::DropOldest)
        );
        let feed = shop.policy("feed/eu");
        assert_eq!(feed.max_deliveries, Some(3));
        assert_eq!(shop.policy("undeclared").max_depth, Some(100_000));
        assert_eq!(t.spaces["default"].policy("x").max_depth, None);

        for (policy, why) in [
            ("{maxDepth: 0}", "maxDepth must be at least 1"),
            ("{deadLetterAddress: 'a/#'}", "plain address"),
            ("{expiryAddress: '$x'}", "plain address"),
            ("{maxDeliveries: 1, nonsense: 2}", "unknown field"),
        ] {
            let e = Tenancy::from_yaml(&format!(
                "apiVersion: flotilla.dev/v1\nkind: Address\nmetadata: {{name: q}}\nspec: {{address: q, type: queue, policy: {policy}}}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(why), "{policy}: {e}");
        }
        let e = Tenancy::from_yaml(
            "apiVersion: flotilla.dev/v1\nkind: Address\nmetadata: {name: q}\nspec: {address: q, type: anycast, policy: {maxDepth: 1}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("only for queue, topic and subscription"), "{e}");
    }

    #[test]
    fn clear_errors() {
        let e = Tenancy::from_yaml("kind: Bogus\n").unwrap_err().to_string();
        assert!(e.contains("unknown kind"), "{e}");
        let e = Tenancy::from_yaml(
            "apiVersion: flotilla.dev/v1\nkind: Address\nmetadata: {name: x}\nspec: {addressSpace: nope, address: x, type: anycast}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not declared"), "{e}");
        let e = Tenancy::from_yaml(
            "apiVersion: flotilla.dev/v1\nkind: Address\nmetadata: {name: x}\nspec: {address: x, type: anycast, colour: red}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
