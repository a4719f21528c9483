//! Policy at fixed points: which SASL mechanisms a peer is offered, who a
//! set of credentials is, which address space a connection lands in (Open),
//! and whether a link may attach to an address (Attach).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use crate::transport::{Authenticator, Identity};
use flotilla_core::auth::{authorized, ScramCredentials};
use flotilla_core::config::{allow_all, Anonymous, Tenancy, DEFAULT_SPACE};
use flotilla_core::resources::{AuthorizationRule, Operation};

/// The tenancy the router serves, replaceable while running.
#[derive(Debug, Clone)]
pub struct Policy {
    tenancy: Arc<RwLock<Arc<Tenancy>>>,
}

/// Who a connection is, once its Open is accepted.
#[derive(Debug, Clone)]
pub struct Principal {
    pub space: String,
    pub user: Option<String>,
    pub rules: Vec<AuthorizationRule>,
}

impl Principal {
    pub fn may(&self, op: Operation, address: &str) -> bool {
        authorized(&self.rules, op, address)
    }
}

fn anonymous_allowed(a: Anonymous, peer: SocketAddr) -> bool {
    match a {
        Anonymous::Allow => true,
        Anonymous::Loopback => peer.ip().is_loopback(),
        Anonymous::Deny => false,
    }
}

/// Splits `user@space`.
fn split_user(user: &str) -> (&str, Option<&str>) {
    match user.rsplit_once('@') {
        Some((u, s)) if !u.is_empty() && !s.is_empty() => (u, Some(s)),
        _ => (user, None),
    }
}

impl Policy {
    pub fn new(t: Tenancy) -> Self {
        Policy {
            tenancy: Arc::new(RwLock::new(Arc::new(t))),
        }
    }

    /// Serves `t` from now on (new connections and attaches; existing ones
    /// are checked again by their owners).
    pub fn replace(&self, t: Tenancy) {
        *self.tenancy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
    }

    pub fn tenancy(&self) -> Arc<Tenancy> {
        self.tenancy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The space credentials belong to: `user@space`, else the SASL
    /// hostname when it names a space, else `default`.
    fn credential_space(
        &self,
        t: &Tenancy,
        user: &str,
        hostname: Option<&str>,
    ) -> (String, String) {
        let (name, space) = split_user(user);
        let space = space
            .map(str::to_string)
            .or_else(|| {
                hostname
                    .filter(|h| t.spaces.contains_key(*h))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| DEFAULT_SPACE.to_string());
        (name.to_string(), space)
    }

    /// Checks a principal again after the tenancy changed: its space and
    /// user still exist (and anonymous clients are still admitted); its
    /// rules as they are now.
    ///
    /// # Errors
    /// Why the connection may not go on.
    pub fn recheck(&self, p: &Principal, peer: SocketAddr) -> Result<Principal, String> {
        let t = self.tenancy();
        let s = t
            .spaces
            .get(&p.space)
            .ok_or_else(|| format!("address space {:?} was deleted", p.space))?;
        let rules = match &p.user {
            Some(u) => s
                .users
                .get(u)
                .ok_or_else(|| format!("user {u:?} was deleted"))?
                .rules
                .clone(),
            None if anonymous_allowed(s.anonymous, peer) => allow_all(),
            None => {
                return Err(format!(
                    "address space {:?} no longer allows anonymous connections",
                    p.space
                ))
            }
        };
        Ok(Principal {
            space: p.space.clone(),
            user: p.user.clone(),
            rules,
        })
    }

    /// Decides the connection's principal at Open: `hostname` selects the
    /// space when it names one; an authenticated user must belong to it.
    ///
    /// # Errors
    /// A description for `amqp:unauthorized-access`.
    pub fn on_open(
        &self,
        identity: &Identity,
        hostname: Option<&str>,
        peer: SocketAddr,
    ) -> Result<Principal, String> {
        let t = self.tenancy();
        let named = hostname.filter(|h| t.spaces.contains_key(*h));
        match &identity.user {
            Some(user) => {
                let space = identity
                    .space
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SPACE.to_string());
                if let Some(h) = named {
                    if h != space {
                        return Err(format!(
                            "user {user:?} belongs to address space {space:?}, not {h:?}"
                        ));
                    }
                }
                let s = t
                    .spaces
                    .get(&space)
                    .ok_or_else(|| format!("address space {space:?} does not exist"))?;
                let u = s
                    .users
                    .get(user)
                    .ok_or_else(|| format!("user {user:?} no longer exists"))?;
                Ok(Principal {
                    space,
                    user: Some(user.clone()),
                    rules: u.rules.clone(),
                })
            }
            None => {
                let space = named.unwrap_or(DEFAULT_SPACE).to_string();
                let s = t
                    .spaces
                    .get(&space)
                    .ok_or_else(|| format!("address space {space:?} does not exist"))?;
                if !anonymous_allowed(s.anonymous, peer) {
                    return Err(format!(
                        "address space {space:?} does not allow anonymous connections from {}",
                        peer.ip()
                    ));
                }
                Ok(Principal {
                    space,
                    user: None,
                    rules: allow_all(),
                })
            }
        }
    }
}

impl Authenticator for Policy {
    fn mechanisms(&self, peer: SocketAddr) -> Vec<&'static str> {
        let mut m = vec!["SCRAM-SHA-256", "PLAIN"];
        if self.allow_no_sasl(peer) {
            m.push("ANONYMOUS");
        }
        m
    }

    fn allow_no_sasl(&self, peer: SocketAddr) -> bool {
        self.tenancy()
            .spaces
            .values()
            .any(|s| anonymous_allowed(s.anonymous, peer))
    }

    fn anonymous(&self, hostname: Option<&str>, peer: SocketAddr) -> Option<Identity> {
        let _ = hostname;
        self.allow_no_sasl(peer).then_some(Identity {
            user: None,
            space: None,
            mechanism: "ANONYMOUS",
        })
    }

    async fn plain(&self, user: &str, password: &str, hostname: Option<&str>) -> Option<Identity> {
        let t = self.tenancy();
        let (name, space) = self.credential_space(&t, user, hostname);
        let creds = t.spaces.get(&space)?.users.get(&name)?.credentials.clone();
        // PBKDF2 costs milliseconds: keep it off the async workers.
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || creds.verify_password(&password))
            .await
            .unwrap_or(false);
        ok.then_some(Identity {
            user: Some(name),
            space: Some(space),
            mechanism: "PLAIN",
        })
    }

    async fn scram(
        &self,
        user: &str,
        hostname: Option<&str>,
    ) -> Option<(ScramCredentials, Identity)> {
        let t = self.tenancy();
        let (name, space) = self.credential_space(&t, user, hostname);
        let creds = t.spaces.get(&space)?.users.get(&name)?.credentials.clone();
        Some((
            creds,
            Identity {
                user: Some(name),
                space: Some(space),
                mechanism: "SCRAM-SHA-256",
            },
        ))
    }
}
