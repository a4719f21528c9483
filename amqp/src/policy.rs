//! Policy at fixed points: which SASL mechanisms a peer is offered, who a
//! set of credentials is, which address space a connection lands in (Open),
//! and whether a link may attach to an address (Attach).
//!
//! # Which address space
//!
//! A client names its space by SASL-init's `hostname`, else the Open
//! frame's `hostname`, else by logging in as `user@space`, else it is in
//! `default` (DESIGN.md "Connecting"). A hostname counts only when it is
//! the name of a space (clients send the server's DNS name there by
//! default). Names that disagree — a SASL hostname and an Open hostname
//! naming two spaces, or `user@a` on a connection that names `b` — refuse
//! the connection: credentials of one space never open another.
//!
//! PLAIN is checked against the space the connection names; when only the
//! Open frame names it (python-qpid-proton's `virtual_host` sets no SASL
//! hostname), the transport answers SASL and checks the password once the
//! Open frame is read ([`Verdict::AwaitOpen`]). SCRAM-SHA-256 must pick the
//! user's keys before Open: SASL hostname, else `user@space`, else the one
//! space that has such a user, else `default`; an Open hostname naming
//! another space is then refused.
//!
//! # Tokens
//!
//! A space with `spec.authentication.oidc` also takes tokens (JWTs) from
//! its OIDC provider: SASL OAUTHBEARER or XOAUTH2, or PLAIN with the token
//! as the password. The space is named as for PLAIN; when nothing names
//! it, the token's tenant claim does (the one space that trusts tokens
//! and is named by it). The token is checked against that space's
//! settings (`oidc::verify`), and its claims map to the space's rules.
//! Its connection ends when it expires (the owner's timer,
//! [`Principal::expires_at`]) or when its `jti` is revoked ([`Policy::recheck`]).
//!
//! A space with `requireTls` (or a router with `--require-tls`) refuses
//! clients that did not come over TLS, and refuses a PLAIN login over
//! plain TCP before its password is looked at.
//!
//! # Components
//!
//! Routers, brokers, gateways and the last-will service prove the mesh
//! credential: SCRAM-SHA-256 as `ID@$mesh` with the mesh secret, or a
//! certificate signed by the mesh CA. Such a peer is a
//! [`PeerKind::Component`], never a tenant; a tenant's credentials never
//! make one.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use crate::transport::{Authenticator, Hostnames, Identity, PeerKind, TlsState, Verdict};
use flotilla_core::auth::{authorized, MeshSecret, ScramCredentials};
use flotilla_core::config::{allow_all_shared, Anonymous, Space, Tenancy, DEFAULT_SPACE};
use flotilla_core::oidc::{self, KeyCache, OidcSpec, Refused, Verified};
use flotilla_core::resources::{AuthorizationRule, Operation};

/// The tenancy a router or broker serves (replaceable while running) and
/// how components prove themselves.
#[derive(Debug, Clone)]
pub struct Policy {
    tenancy: Arc<RwLock<Arc<Tenancy>>>,
    /// The mesh secret: components log in with it as `ID@$mesh`.
    mesh: Option<MeshSecret>,
    /// A client certificate the listener's CA verified proves a component.
    cert_components: bool,
    /// Every space requires TLS (`--require-tls`).
    require_tls: bool,
    /// The signing keys of the issuers spaces trust.
    keys: Arc<KeyCache>,
    /// Some space of the tenancy takes tokens (found when the tenancy is
    /// set, not for every connection).
    tokens: Arc<std::sync::atomic::AtomicBool>,
}

/// Who a client connection is, once its Open is accepted.
#[derive(Debug, Clone)]
pub struct Principal {
    pub space: String,
    pub user: Option<String>,
    /// Shared with the tenancy (cloning a principal copies no rules).
    pub rules: std::sync::Arc<[AuthorizationRule]>,
    /// The token it logged in with (`user` is then its subject).
    pub token: Option<Arc<Verified>>,
    /// When that token stops being valid (its `exp` and the space's clock
    /// skew): the connection is closed then.
    pub expires_at: Option<std::time::Instant>,
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

/// What a token login's user name ends with (its subject before it).
pub const TOKEN_USER: &str = "@oidc";

/// True when some space of `t` takes tokens.
fn takes_tokens(t: &Tenancy) -> bool {
    t.spaces.values().any(|s| s.oidc.is_some())
}

/// The one space that takes tokens and that `token`'s tenant claim names.
fn token_space(t: &Tenancy, token: &str) -> Option<String> {
    let claims = oidc::unverified_claims(token)?;
    let mut named = t.spaces.values().filter(|s| {
        s.oidc.as_ref().is_some_and(|o| {
            oidc::claim_holds(
                &claims,
                o.tenant_claim.as_deref().unwrap_or("tenant"),
                &s.name,
            )
        })
    });
    match (named.next(), named.next()) {
        (Some(s), None) => Some(s.name.clone()),
        _ => None,
    }
}

/// Whether a token checked at login still holds in space `s` as it is now:
/// not expired, the space still trusting its issuer and audience, its id
/// not revoked. Its rules as the space maps its claims now.
fn still_valid(s: &Space, token: &Verified) -> Result<Vec<AuthorizationRule>, String> {
    let spec = s
        .oidc
        .as_ref()
        .ok_or_else(|| format!("address space {:?} no longer accepts tokens", s.name))?;
    let refused = |why: Refused| {
        oidc::audit_closed(&s.name, &token.subject, &why);
        Err(why.to_string())
    };
    if flotilla_core::time::now_secs() >= token.expires.saturating_add(spec.skew()) {
        return refused(Refused::Expired);
    }
    if !oidc::issued_by(&token.claims, spec) {
        return refused(Refused::WrongIssuer);
    }
    if !oidc::for_audience(&token.claims, spec) {
        return refused(Refused::WrongAudience);
    }
    if token
        .id
        .as_ref()
        .is_some_and(|j| spec.revoked_token_ids.contains(j))
    {
        return refused(Refused::Revoked);
    }
    Ok(oidc::rules(spec, &token.claims))
}

/// Whether a token user that a router or gateway names, with the claims
/// its space reads (`claims`, JSON), may do `op` on `address` in space
/// `s` as it is now: the space still takes tokens, the token's id is not
/// revoked, and its claims map to a rule that allows it. For a
/// component that acts for the user later (a will, a durable
/// subscription's reattach).
pub fn token_claims_may(s: &Space, claims: Option<&str>, op: Operation, address: &str) -> bool {
    let (Some(spec), Some(claims)) = (&s.oidc, claims) else {
        return false;
    };
    let Ok(claims) = serde_json::from_str::<serde_json::Value>(claims) else {
        return false;
    };
    let revoked = claims["jti"]
        .as_str()
        .is_some_and(|j| spec.revoked_token_ids.iter().any(|r| r == j));
    !revoked && authorized(&oidc::rules(spec, &claims), op, address)
}

/// True for a user name a token login made (`SUBJECT@oidc`).
pub fn is_token_user(user: &str) -> bool {
    user.ends_with(TOKEN_USER)
}

/// The instant a token that expires at `exp` (Unix seconds) stops being
/// valid with `skew` seconds of clock skew.
fn deadline(exp: u64, skew: u64) -> std::time::Instant {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let end = UNIX_EPOCH + Duration::from_secs(exp.saturating_add(skew).min(1 << 40));
    let left = end
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    std::time::Instant::now() + left.min(Duration::from_secs(10 * 365 * 86_400))
}

/// Splits `user@space`.
fn split_user(user: &str) -> (&str, Option<&str>) {
    match user.rsplit_once('@') {
        Some((u, s)) if !u.is_empty() && !s.is_empty() => (u, Some(s)),
        _ => (user, None),
    }
}

/// Password checks (PBKDF2) allowed to run at once.
fn password_checks() -> &'static tokio::sync::Semaphore {
    static CHECKS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    CHECKS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cores)
    })
}

/// Keys no password matches, checked for logins of unknown users.
fn unknown_user_keys() -> &'static ScramCredentials {
    static KEYS: std::sync::OnceLock<ScramCredentials> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        use std::time::{SystemTime, UNIX_EPOCH};
        let n = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        ScramCredentials::derive(&format!("unknown-user-{n:x}-{:p}", &n))
    })
}

/// `hostname` if it is the name of a space.
fn naming<'a>(t: &Tenancy, hostname: Option<&'a str>) -> Option<&'a str> {
    hostname.filter(|h| t.spaces.contains_key(*h))
}

impl Policy {
    pub fn new(t: Tenancy) -> Self {
        let tokens = Arc::new(std::sync::atomic::AtomicBool::new(takes_tokens(&t)));
        Policy {
            tenancy: Arc::new(RwLock::new(Arc::new(t))),
            mesh: None,
            cert_components: false,
            require_tls: false,
            keys: Arc::default(),
            tokens,
        }
    }

    /// Components may log in with the mesh secret.
    #[must_use]
    pub fn with_mesh_secret(mut self, secret: Option<MeshSecret>) -> Self {
        self.mesh = secret;
        self
    }

    /// A client certificate the listener's CA verified proves a component.
    #[must_use]
    pub fn with_cert_components(mut self, on: bool) -> Self {
        self.cert_components = on;
        self
    }

    /// Spaces' `jwksFile`s are read from `dir` (`--jwks-dir`).
    #[must_use]
    pub fn with_jwks_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.keys = Arc::new(KeyCache::with_dir(dir));
        self
    }

    /// Every space requires TLS.
    #[must_use]
    pub fn with_require_tls(mut self, on: bool) -> Self {
        self.require_tls = on;
        self
    }

    /// Serves `t` from now on (new connections and attaches; existing ones
    /// are checked again by their owners).
    pub fn replace(&self, t: Tenancy) {
        let tokens = takes_tokens(&t);
        *self.tenancy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
        self.tokens
            .store(tokens, std::sync::atomic::Ordering::Release);
    }

    pub fn tenancy(&self) -> Arc<Tenancy> {
        self.tenancy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why a client of `space` may not use a connection without TLS.
    fn tls_refusal(&self, space: &Space, tls: bool) -> Option<String> {
        (!tls && (self.require_tls || space.require_tls))
            .then(|| format!("address space {:?} requires TLS", space.name))
    }

    /// Checks a principal again after the tenancy changed: its space and
    /// user still exist (and anonymous clients are still admitted); its
    /// rules as they are now.
    ///
    /// # Errors
    /// Why the connection may not go on.
    pub fn recheck(&self, p: &Principal, peer: SocketAddr, tls: bool) -> Result<Principal, String> {
        let t = self.tenancy();
        let s = t
            .spaces
            .get(&p.space)
            .ok_or_else(|| format!("address space {:?} was deleted", p.space))?;
        if let Some(why) = self.tls_refusal(s, tls) {
            return Err(why);
        }
        if let Some(token) = &p.token {
            return Ok(Principal {
                rules: still_valid(s, token)?.into(),
                ..p.clone()
            });
        }
        let rules = match &p.user {
            Some(u) => s
                .users
                .get(u)
                .ok_or_else(|| format!("user {u:?} was deleted"))?
                .rules
                .clone(),
            None if anonymous_allowed(s.anonymous, peer) => allow_all_shared(),
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
            token: None,
            expires_at: None,
        })
    }

    /// Decides a client connection's principal at Open, from what its login
    /// proved and the Open frame's `hostname`.
    ///
    /// # Errors
    /// A description for `amqp:unauthorized-access`.
    pub fn on_open(
        &self,
        identity: &Identity,
        hostname: Option<&str>,
        peer: SocketAddr,
    ) -> Result<Principal, String> {
        if identity.kind == PeerKind::Component {
            return Err("a component's connection has no address space".into());
        }
        let t = self.tenancy();
        let named = naming(&t, hostname);
        let space = match (&identity.space, named) {
            (Some(s), Some(h)) if s != h => {
                return Err(format!(
                    "the login names address space {s:?} but Open names {h:?}"
                ))
            }
            (Some(s), _) => s.clone(),
            (None, Some(h)) => h.to_string(),
            (None, None) => DEFAULT_SPACE.to_string(),
        };
        let s = t
            .spaces
            .get(&space)
            .ok_or_else(|| format!("address space {space:?} does not exist"))?;
        if let Some(why) = self.tls_refusal(s, identity.tls) {
            return Err(why);
        }
        if let Some(token) = &identity.token {
            if identity.space.as_deref() != Some(space.as_str()) {
                return Err(format!(
                    "the token was not checked for address space {space:?}"
                ));
            }
            // Open may come long after SASL: the token must still hold,
            // as the space is now.
            let rules = still_valid(s, token)?;
            let skew = s.oidc.as_ref().map_or(0, |o| o.skew());
            return Ok(Principal {
                space,
                user: identity.user.clone(),
                rules: rules.into(),
                expires_at: Some(deadline(token.expires, skew)),
                token: Some(token.clone()),
            });
        }
        match &identity.user {
            Some(user) => {
                if identity.space.as_deref() != Some(space.as_str()) {
                    // Credentials are checked in the space they belong to.
                    return Err(format!(
                        "user {user:?} was not authenticated in address space {space:?}"
                    ));
                }
                let u = s
                    .users
                    .get(user)
                    .ok_or_else(|| format!("user {user:?} no longer exists"))?;
                Ok(Principal {
                    space,
                    user: Some(user.clone()),
                    rules: u.rules.clone(),
                    token: None,
                    expires_at: None,
                })
            }
            None => {
                if !anonymous_allowed(s.anonymous, peer) {
                    return Err(format!(
                        "address space {space:?} does not allow anonymous connections from {}",
                        peer.ip()
                    ));
                }
                Ok(Principal {
                    space,
                    user: None,
                    rules: allow_all_shared(),
                    token: None,
                    expires_at: None,
                })
            }
        }
    }

    /// True when some space takes tokens.
    fn any_tokens(&self) -> bool {
        self.tokens.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The space a login is for: the SASL hostname's, else the Open
    /// hostname's, else the username's `@space`, else (for a token) the
    /// one space that takes tokens and that its tenant claim names.
    /// `Ok(None)`: only the Open frame can tell, and it is not read yet.
    fn space_of(
        t: &Tenancy,
        names: Hostnames<'_>,
        at: Option<&str>,
        token: Option<&str>,
    ) -> Result<Option<String>, String> {
        let space = match (naming(t, names.sasl), names.open) {
            (Some(s), _) => s.to_string(),
            (None, None) if at.is_none() => return Ok(None),
            (None, open) => match naming(t, open.flatten()).or(at) {
                Some(s) => s.to_string(),
                None => match token.and_then(|tk| token_space(t, tk)) {
                    Some(s) => s,
                    None if token.is_some() => {
                        return Err(
                            "no address space named, and none that takes tokens is its tenant"
                                .into(),
                        )
                    }
                    None => DEFAULT_SPACE.to_string(),
                },
            },
        };
        if let Some(a) = at.filter(|a| *a != space) {
            return Err(format!(
                "the login names address space {a:?} but the connection names {space:?}"
            ));
        }
        Ok(Some(space))
    }

    /// Checks `token` for `space` (with `spec`, its settings), and the
    /// login's username against the space's `usernameClaim`.
    async fn verify_token(
        &self,
        space: &str,
        spec: &OidcSpec,
        name: &str,
        token: &str,
    ) -> Result<Verified, Refused> {
        // (Longer than MAX_TOKEN never gets here: `token` refuses it
        // first, and `plain` takes only what `looks_like_jwt`.)
        let mut v = self.keys.check(token, Some(space), spec).await?;
        if let Some(claim) = spec.username_claim.as_ref().filter(|_| !name.is_empty()) {
            if !oidc::claim_holds(&v.claims, claim, name) {
                return Err(Refused::Username);
            }
        }
        // A connection keeps only the claims its space reads.
        let claims = oidc::kept_claims(spec, std::mem::take(Arc::make_mut(&mut v.claims)));
        v.claims = Arc::new(claims);
        Ok(v)
    }

    /// A token login in `space`, audited.
    async fn token_login(
        &self,
        space: &str,
        spec: &OidcSpec,
        name: &str,
        token: &str,
        mechanism: &'static str,
    ) -> Verdict {
        let outcome = self.verify_token(space, spec, name, token).await;
        oidc::audit(mechanism, space, &spec.issuer, token, &outcome);
        match outcome {
            Ok(v) => Verdict::Accept(Identity {
                // Never a MessagingUser's name (those have no '@'): what is
                // looked up or compared by user name never takes a token's
                // subject for a user.
                user: Some(format!("{}{}", v.subject, TOKEN_USER)),
                space: Some(space.to_string()),
                token: Some(Arc::new(v)),
                ..Identity::anonymous()
            }),
            Err(why) => Verdict::Refuse(why.to_string()),
        }
    }

    /// True when some space admits anonymous clients from `peer`.
    fn any_anonymous(&self, peer: SocketAddr) -> bool {
        self.tenancy()
            .spaces
            .values()
            .any(|s| anonymous_allowed(s.anonymous, peer))
    }
}

impl Authenticator for Policy {
    fn mechanisms(&self, peer: SocketAddr, tls: TlsState) -> Vec<&'static str> {
        let mut m = vec!["SCRAM-SHA-256", "PLAIN"];
        if self.cert_components && tls.client_cert {
            m.insert(0, "EXTERNAL");
        }
        if self.any_tokens() {
            m.extend(["OAUTHBEARER", "XOAUTH2"]);
        }
        if self.any_anonymous(peer) {
            m.push("ANONYMOUS");
        }
        m
    }

    fn without_credentials(
        &self,
        hostname: Option<&str>,
        peer: SocketAddr,
        tls: TlsState,
    ) -> Option<Identity> {
        if self.cert_components && tls.client_cert {
            return Some(Identity::component(None, "EXTERNAL"));
        }
        let t = self.tenancy();
        match naming(&t, hostname) {
            Some(space) => {
                let s = &t.spaces[space];
                anonymous_allowed(s.anonymous, peer).then(|| Identity {
                    space: Some(space.to_string()),
                    ..Identity::anonymous()
                })
            }
            // Open may still name the space: decided there.
            None => self.any_anonymous(peer).then(Identity::anonymous),
        }
    }

    async fn plain(
        &self,
        user: &str,
        password: &str,
        names: Hostnames<'_>,
        tls: TlsState,
    ) -> Verdict {
        if MeshSecret::login_id(user).is_some() {
            return Verdict::Refuse("the mesh secret is only accepted with SCRAM-SHA-256".into());
        }
        let t = self.tenancy();
        let (name, at) = split_user(user);
        let jwt = oidc::looks_like_jwt(password) && self.any_tokens();
        // Open may name the space: check the password then.
        let space = match Self::space_of(&t, names, at, jwt.then_some(password)) {
            Ok(Some(s)) => s,
            Ok(None) => return Verdict::AwaitOpen,
            Err(why) => return Verdict::Refuse(why),
        };
        let space = space.as_str();
        let Some(s) = t.spaces.get(space) else {
            return Verdict::Refuse(format!("no address space {space:?}"));
        };
        if let Some(why) = self.tls_refusal(s, tls.tls) {
            return Verdict::Refuse(why);
        }
        if let (true, Some(spec)) = (jwt, &s.oidc) {
            return self.token_login(space, spec, name, password, "PLAIN").await;
        }
        let user = s.users.get(name).map(|u| u.credentials.clone());
        // An unknown user costs as much as a wrong password, so timing does
        // not tell which usernames exist.
        let known = user.is_some();
        let creds = user.unwrap_or_else(|| unknown_user_keys().clone());
        // PBKDF2 costs milliseconds: keep it off the async workers, and run
        // no more at once than there are cores, so a flood of logins queues
        // instead of taking the CPU from everyone's messages.
        let password = password.to_string();
        let Ok(_turn) = password_checks().acquire().await else {
            return Verdict::Refuse("shutting down".into());
        };
        let ok = tokio::task::spawn_blocking(move || creds.verify_password(&password))
            .await
            .unwrap_or(false);
        if !known {
            return Verdict::Refuse(format!("no user {name:?} in address space {space:?}"));
        }
        if !ok {
            return Verdict::Refuse("wrong password".into());
        }
        Verdict::Accept(Identity {
            user: Some(name.to_string()),
            space: Some(space.to_string()),
            ..Identity::anonymous()
        })
    }

    /// A bearer-token login (OAUTHBEARER, XOAUTH2, MQTT 5's AUTH).
    async fn token(
        &self,
        user: Option<&str>,
        token: &str,
        names: Hostnames<'_>,
        tls: TlsState,
        mechanism: &'static str,
    ) -> Verdict {
        if token.len() > oidc::MAX_TOKEN {
            return Verdict::Refuse("the token is longer than 16 KiB".into());
        }
        let t = self.tenancy();
        let (name, at) = user.map_or(("", None), split_user);
        let space = match Self::space_of(&t, names, at, Some(token)) {
            Ok(Some(s)) => s,
            Ok(None) => return Verdict::AwaitOpen,
            Err(why) => return Verdict::Refuse(why),
        };
        let Some(s) = t.spaces.get(&space) else {
            return Verdict::Refuse(format!("no address space {space:?}"));
        };
        if let Some(why) = self.tls_refusal(s, tls.tls) {
            return Verdict::Refuse(why);
        }
        let Some(spec) = &s.oidc else {
            return Verdict::Refuse(format!("address space {space:?} accepts no tokens"));
        };
        self.token_login(&space, spec, name, token, mechanism).await
    }

    async fn scram(
        &self,
        user: &str,
        hostname: Option<&str>,
        tls: TlsState,
    ) -> Result<Option<(ScramCredentials, Identity)>, String> {
        if let Some(id) = MeshSecret::login_id(user) {
            let Some(mesh) = &self.mesh else {
                return Ok(None);
            };
            if self.require_tls && !tls.tls {
                return Err("this listener requires TLS".into());
            }
            return Ok(Some((
                mesh.keys().clone(),
                Identity::component(Some(id), "SCRAM-SHA-256"),
            )));
        }
        let t = self.tenancy();
        let (name, at) = split_user(user);
        let space = match (naming(&t, hostname), at) {
            (Some(s), Some(a)) if s != a => {
                return Err(format!(
                    "the login names address space {a:?} but SASL names {s:?}"
                ))
            }
            (Some(s), _) | (None, Some(s)) => s.to_string(),
            (None, None) => {
                // The keys must be chosen before Open: the space that has
                // such a user, if only one has (Open must then agree).
                let mut with = t
                    .spaces
                    .values()
                    .filter(|s| s.users.contains_key(name))
                    .map(|s| s.name.as_str());
                match (with.next(), with.next()) {
                    (Some(only), None) => only.to_string(),
                    _ => DEFAULT_SPACE.to_string(),
                }
            }
        };
        let Some(s) = t.spaces.get(&space) else {
            return Ok(None);
        };
        if let Some(why) = self.tls_refusal(s, tls.tls) {
            return Err(why);
        }
        let Some(u) = s.users.get(name) else {
            return Ok(None);
        };
        Ok(Some((
            u.credentials.clone(),
            Identity {
                user: Some(name.to_string()),
                space: Some(space),
                ..Identity::anonymous()
            },
        )))
    }
}

/// The inter-router listener's authenticator: only routers that prove the
/// mesh credential. With a mesh secret, SCRAM-SHA-256 as `ID@$mesh` is
/// required; with a mesh CA, the TLS layer already required a certificate
/// it signed (both, when both are configured). With neither — allowed only
/// on a loopback listener — peers from loopback are taken on trust.
#[derive(Debug, Clone)]
pub struct MeshAuth {
    pub secret: Option<MeshSecret>,
    /// The listener requires client certificates from the mesh CA.
    pub ca: bool,
}

impl MeshAuth {
    fn unauthenticated(&self) -> bool {
        self.secret.is_none() && !self.ca
    }
}

impl Authenticator for MeshAuth {
    fn mechanisms(&self, peer: SocketAddr, tls: TlsState) -> Vec<&'static str> {
        if self.secret.is_some() {
            vec!["SCRAM-SHA-256"]
        } else if self.ca && tls.client_cert {
            vec!["EXTERNAL", "ANONYMOUS"]
        } else if self.unauthenticated() && peer.ip().is_loopback() {
            vec!["ANONYMOUS"]
        } else {
            Vec::new()
        }
    }

    fn without_credentials(
        &self,
        _: Option<&str>,
        peer: SocketAddr,
        tls: TlsState,
    ) -> Option<Identity> {
        let ok = self.secret.is_none()
            && ((self.ca && tls.client_cert)
                || (self.unauthenticated() && peer.ip().is_loopback()));
        ok.then(|| Identity::component(None, "EXTERNAL"))
    }

    async fn plain(&self, _: &str, _: &str, _: Hostnames<'_>, _: TlsState) -> Verdict {
        Verdict::Refuse("routers authenticate with SCRAM-SHA-256 or a certificate".into())
    }

    async fn scram(
        &self,
        user: &str,
        _: Option<&str>,
        tls: TlsState,
    ) -> Result<Option<(ScramCredentials, Identity)>, String> {
        let (Some(secret), Some(id)) = (&self.secret, MeshSecret::login_id(user)) else {
            return Ok(None);
        };
        if self.ca && !tls.client_cert {
            return Err("no certificate from the mesh CA".into());
        }
        Ok(Some((
            secret.keys().clone(),
            Identity::component(Some(id), "SCRAM-SHA-256"),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r##"
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-a}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-b}
spec: {authentication: {anonymous: true}, requireTls: true}
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: app}
spec: {addressSpace: tenant-a, username: app, password: secret-a, authorization: [{addresses: ["#"], operations: [send]}]}
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: app}
spec: {addressSpace: tenant-b, username: app, password: secret-b}
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: solo}
spec: {addressSpace: tenant-a, username: solo, password: solo-pw}
"##;

    fn policy() -> Policy {
        Policy::new(Tenancy::from_yaml(CONFIG).unwrap())
    }

    const PLAIN_TCP: TlsState = TlsState {
        tls: false,
        client_cert: false,
    };
    const TLS: TlsState = TlsState {
        tls: true,
        client_cert: false,
    };

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    async fn plain(
        p: &Policy,
        user: &str,
        pw: &str,
        sasl: Option<&str>,
        open: Option<Option<&str>>,
        tls: TlsState,
    ) -> Verdict {
        p.plain(user, pw, Hostnames { sasl, open }, tls).await
    }

    fn accepted(v: Verdict) -> Identity {
        match v {
            Verdict::Accept(i) => i,
            other => panic!("expected Accept, got {other:?}"),
        }
    }

    fn refused(v: Verdict) -> String {
        match v {
            Verdict::Refuse(why) => why,
            other => panic!("expected Refuse, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn plain_space_by_each_name() {
        let p = policy();
        // SASL hostname.
        let i = accepted(plain(&p, "app", "secret-a", Some("tenant-a"), None, PLAIN_TCP).await);
        assert_eq!(i.space.as_deref(), Some("tenant-a"));
        assert!(p.on_open(&i, Some("tenant-a"), peer()).is_ok());
        assert!(p.on_open(&i, Some("localhost"), peer()).is_ok());
        assert!(
            p.on_open(&i, Some("default"), peer()).is_err(),
            "Open names another space"
        );
        // Open hostname only: decided once Open is read.
        assert!(matches!(
            plain(&p, "app", "secret-a", None, None, PLAIN_TCP).await,
            Verdict::AwaitOpen
        ));
        assert!(matches!(
            plain(&p, "app", "secret-a", Some("localhost"), None, PLAIN_TCP).await,
            Verdict::AwaitOpen
        ));
        let i = accepted(
            plain(
                &p,
                "app",
                "secret-a",
                None,
                Some(Some("tenant-a")),
                PLAIN_TCP,
            )
            .await,
        );
        assert_eq!(i.space.as_deref(), Some("tenant-a"));
        // user@space.
        let i = accepted(plain(&p, "app@tenant-a", "secret-a", None, None, PLAIN_TCP).await);
        assert_eq!(i.space.as_deref(), Some("tenant-a"));
        // Nothing names a space: default, where there is no `app`.
        refused(plain(&p, "app", "secret-a", None, Some(None), PLAIN_TCP).await);
    }

    #[tokio::test]
    async fn plain_never_crosses_spaces() {
        let p = policy();
        // A's password in B, however B is named.
        refused(plain(&p, "app", "secret-a", Some("tenant-b"), None, TLS).await);
        refused(plain(&p, "app", "secret-a", None, Some(Some("tenant-b")), TLS).await);
        refused(plain(&p, "app@tenant-a", "secret-a", Some("tenant-b"), None, TLS).await);
        refused(
            plain(
                &p,
                "app@tenant-a",
                "secret-a",
                None,
                Some(Some("tenant-b")),
                TLS,
            )
            .await,
        );
        // A login for A on a connection whose Open names B.
        let i = accepted(plain(&p, "app@tenant-a", "secret-a", None, None, TLS).await);
        assert!(p.on_open(&i, Some("tenant-b"), peer()).is_err());
        // A mesh login is never a PLAIN one.
        refused(plain(&p, "x@$mesh", "whatever", None, None, TLS).await);
    }

    #[tokio::test]
    async fn require_tls_refuses_before_the_password() {
        let p = policy();
        let why = refused(plain(&p, "app", "secret-b", Some("tenant-b"), None, PLAIN_TCP).await);
        assert!(why.contains("requires TLS"), "{why}");
        // Even a wrong password gets the TLS answer: it was never checked.
        let why = refused(plain(&p, "app", "nope", Some("tenant-b"), None, PLAIN_TCP).await);
        assert!(why.contains("requires TLS"), "{why}");
        let i = accepted(plain(&p, "app", "secret-b", Some("tenant-b"), None, TLS).await);
        let mut i = i;
        i.tls = true;
        assert!(p.on_open(&i, None, peer()).is_ok());
        // Anonymous clients of a TLS-only space.
        let mut anon = p.without_credentials(None, peer(), PLAIN_TCP).unwrap();
        assert!(p.on_open(&anon, Some("tenant-b"), peer()).is_err());
        anon.tls = true;
        assert!(p.on_open(&anon, Some("tenant-b"), peer()).is_ok());
        // Router-wide.
        let p = policy().with_require_tls(true);
        refused(plain(&p, "app", "secret-a", Some("tenant-a"), None, PLAIN_TCP).await);
        assert!(p.scram("app", Some("tenant-a"), PLAIN_TCP).await.is_err());
    }

    #[tokio::test]
    async fn scram_picks_keys_before_open() {
        let p = policy();
        let (_, i) = p
            .scram("app", Some("tenant-a"), TLS)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(i.space.as_deref(), Some("tenant-a"));
        let (_, i) = p.scram("app@tenant-a", None, TLS).await.unwrap().unwrap();
        assert_eq!(i.space.as_deref(), Some("tenant-a"));
        assert!(p
            .scram("app@tenant-a", Some("tenant-b"), TLS)
            .await
            .is_err());
        // `solo` exists in one space only.
        let (_, i) = p.scram("solo", None, TLS).await.unwrap().unwrap();
        assert_eq!(i.space.as_deref(), Some("tenant-a"));
        assert!(p.on_open(&i, Some("tenant-b"), peer()).is_err());
        // `app` is in two: nothing names one, so default, which has none.
        assert!(p.scram("app", None, TLS).await.unwrap().is_none());
        // Mesh logins need a mesh secret.
        assert!(p.scram("r1@$mesh", None, TLS).await.unwrap().is_none());
        let p = policy().with_mesh_secret(Some(MeshSecret::new("0123456789abcdef", "f").unwrap()));
        let (k, i) = p.scram("r1@$mesh", None, TLS).await.unwrap().unwrap();
        assert!(k.verify_password("0123456789abcdef"));
        assert!(i.is_component());
        assert!(
            p.on_open(&i, None, peer()).is_err(),
            "a component is no tenant"
        );
    }

    #[tokio::test]
    async fn anonymous_by_sasl_or_open_hostname() {
        let p = policy();
        let i = p
            .without_credentials(Some("tenant-b"), peer(), TLS)
            .unwrap();
        assert_eq!(i.space.as_deref(), Some("tenant-b"));
        // tenant-a admits no anonymous clients, however it is named.
        assert!(p
            .without_credentials(Some("tenant-a"), peer(), TLS)
            .is_none());
        let i = p.without_credentials(None, peer(), TLS).unwrap();
        assert!(p.on_open(&i, Some("tenant-a"), peer()).is_err());
        assert_eq!(p.on_open(&i, None, peer()).unwrap().space, "default");
        // SASL and Open disagree.
        let mut i = p
            .without_credentials(Some("tenant-b"), peer(), TLS)
            .unwrap();
        i.tls = true;
        assert!(p.on_open(&i, Some("default"), peer()).is_err());
        assert!(p.on_open(&i, Some("tenant-b"), peer()).is_ok());
    }

    #[tokio::test]
    async fn mesh_listener_takes_only_routers() {
        let loopback = peer();
        let remote: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let open = MeshAuth {
            secret: None,
            ca: false,
        };
        assert!(open
            .without_credentials(None, loopback, PLAIN_TCP)
            .is_some());
        assert!(open.without_credentials(None, remote, PLAIN_TCP).is_none());
        let secret = MeshSecret::new("0123456789abcdef", "f").unwrap();
        let m = MeshAuth {
            secret: Some(secret),
            ca: false,
        };
        assert!(m.without_credentials(None, loopback, PLAIN_TCP).is_none());
        assert_eq!(m.mechanisms(loopback, PLAIN_TCP), vec!["SCRAM-SHA-256"]);
        assert!(m.scram("alice", None, PLAIN_TCP).await.unwrap().is_none());
        assert!(m
            .scram("r2@$mesh", None, PLAIN_TCP)
            .await
            .unwrap()
            .is_some());
        let ca = MeshAuth {
            secret: None,
            ca: true,
        };
        assert!(ca.without_credentials(None, loopback, TLS).is_none());
        let cert = TlsState {
            tls: true,
            client_cert: true,
        };
        assert!(ca.without_credentials(None, remote, cert).is_some());
    }

    /// A space `oidc-a` taking tokens signed by a fresh Ed25519 key (inline
    /// JWKS), with a writer rule; the key signs tokens with `claims`.
    fn token_policy() -> (Policy, impl Fn(serde_json::Value) -> String) {
        use base64::Engine;
        use ring::signature::{Ed25519KeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key());
        let jwks = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"k1","alg":"EdDSA","x":"{x}"}}]}}"#
        );
        let yaml = format!(
            r##"{CONFIG}
---
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {{name: oidc-a}}
spec:
  authentication:
    oidc:
      issuer: https://idp.example
      audience: flotilla
      jwks: '{jwks}'
      usernameClaim: preferred_username
      revokedTokenIds: [gone]
      authorization: [{{claim: roles, value: writer, addresses: ["orders/#"], operations: [send]}}]
"##
        );
        let key = jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref());
        let sign = move |claims: serde_json::Value| {
            let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
            h.kid = Some("k1".into());
            jsonwebtoken::encode(&h, &claims, &key).unwrap()
        };
        (Policy::new(Tenancy::from_yaml(&yaml).unwrap()), sign)
    }

    fn claims(tenant: &str, jti: &str) -> serde_json::Value {
        serde_json::json!({
            "iss": "https://idp.example", "aud": "flotilla", "sub": "dev-1",
            "preferred_username": "dev-1", "tenant": tenant, "jti": jti,
            "exp": flotilla_core::time::now_secs() + 600, "roles": ["writer"], "junk": vec!["x"; 64],
        })
    }

    #[tokio::test]
    async fn a_token_as_the_password_logs_in_with_its_rules() {
        let (p, sign) = token_policy();
        let t = sign(claims("oidc-a", "t1"));
        // Named by SASL, by @space, and by nothing but the tenant claim.
        for (user, sasl) in [("dev-1", Some("oidc-a")), ("dev-1@oidc-a", None)] {
            let i = accepted(plain(&p, user, &t, sasl, None, PLAIN_TCP).await);
            assert_eq!(i.space.as_deref(), Some("oidc-a"));
        }
        let i = accepted(plain(&p, "dev-1", &t, None, Some(None), PLAIN_TCP).await);
        // Never a MessagingUser's name: those have no '@'.
        assert_eq!(i.user.as_deref(), Some("dev-1@oidc"));
        // It keeps the claims its space reads, not the rest.
        let kept = &i.token.as_ref().unwrap().claims;
        assert!(kept.get("roles").is_some() && kept.get("junk").is_none());
        let pr = p.on_open(&i, None, peer()).unwrap();
        assert!(pr.may(Operation::Send, "orders/1"));
        assert!(!pr.may(Operation::Recv, "orders/1"));
        assert!(pr.expires_at.is_some());
        // Open may be the only name: the check waits for it.
        assert!(matches!(
            plain(&p, "dev-1", &t, None, None, PLAIN_TCP).await,
            Verdict::AwaitOpen
        ));
        // OAUTHBEARER's and XOAUTH2's path.
        let names = Hostnames {
            sasl: Some("oidc-a"),
            open: None,
        };
        let v = p.token(None, &t, names, PLAIN_TCP, "OAUTHBEARER").await;
        assert!(matches!(v, Verdict::Accept(_)));
    }

    #[tokio::test]
    async fn tokens_for_another_space_or_user_or_revoked_are_refused() {
        let (p, sign) = token_policy();
        let refused = |v: Verdict| match v {
            Verdict::Refuse(why) => why,
            v => panic!("accepted: {v:?}"),
        };
        // A token for tenant-b's name used on oidc-a.
        let b = sign(claims("tenant-b", "t2"));
        let why = refused(plain(&p, "dev-1", &b, Some("oidc-a"), None, PLAIN_TCP).await);
        assert!(why.contains("tenant"), "{why}");
        // tenant-b takes no tokens: its users' passwords only.
        let why = refused(plain(&p, "app", &b, Some("tenant-b"), None, TLS).await);
        assert!(why.contains("wrong password"), "{why}");
        // The username must be the token's.
        let a = sign(claims("oidc-a", "t3"));
        let why = refused(plain(&p, "someone", &a, Some("oidc-a"), None, PLAIN_TCP).await);
        assert!(why.contains("username"), "{why}");
        // A revoked token id.
        let gone = sign(claims("oidc-a", "gone"));
        let why = refused(plain(&p, "dev-1", &gone, Some("oidc-a"), None, PLAIN_TCP).await);
        assert!(why.contains("revoked"), "{why}");
        // Revoked while connected: the recheck ends it.
        let i = accepted(plain(&p, "dev-1", &a, Some("oidc-a"), None, PLAIN_TCP).await);
        let pr = p.on_open(&i, None, peer()).unwrap();
        let mut t = (*p.tenancy()).clone();
        let s = t.spaces.get_mut("oidc-a").unwrap();
        let mut spec = (**s.oidc.as_ref().unwrap()).clone();
        spec.revoked_token_ids.push("t3".into());
        s.oidc = Some(Arc::new(spec));
        p.replace(t);
        let why = p.recheck(&pr, peer(), false).unwrap_err();
        assert!(why.contains("revoked"), "{why}");
        // Revoked between SASL and a late Open: Open is refused.
        let why = p.on_open(&i, None, peer()).unwrap_err();
        assert!(why.contains("revoked"), "{why}");
    }

    #[tokio::test]
    async fn a_token_that_expired_before_open_is_refused_there() {
        let (p, sign) = token_policy();
        let t = sign(claims("oidc-a", "t4"));
        let mut i = accepted(plain(&p, "dev-1", &t, Some("oidc-a"), None, PLAIN_TCP).await);
        assert!(p.on_open(&i, None, peer()).is_ok());
        // The same login, its token past exp + skew when Open comes.
        let mut v = (**i.token.as_ref().unwrap()).clone();
        v.expires = flotilla_core::time::now_secs() - 31;
        i.token = Some(Arc::new(v));
        let why = p.on_open(&i, None, peer()).unwrap_err();
        assert!(why.contains("expired"), "{why}");
    }
}
