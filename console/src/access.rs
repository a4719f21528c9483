//! Who may call the API: the admin token (everything, the break-glass
//! credential), or a token from the console's OIDC provider whose roles
//! claim grants `admin`, `editor:SPACE` or `viewer:SPACE`.
//!
//! An editor reads and changes what is inside its spaces (addresses,
//! users, connections, queues), not the space itself (its plan, quotas and
//! whom it trusts are the administrator's). A viewer reads inside its
//! spaces. Neither sees other spaces, nor what spans them (the overview,
//! the mesh, brokers, the watch, metrics).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use flotilla_core::oidc::{self, KeyCache, OidcSpec, Refused};
use serde_json::{json, Value};

use crate::api::{ApiError, AppState};

/// The console's OIDC provider (`--oidc-issuer` and friends).
#[derive(Debug, Clone)]
pub struct ConsoleOidc {
    pub issuer: String,
    pub audience: String,
    /// The claim holding the console roles; default `roles`.
    pub roles_claim: String,
    /// The web console's client id (authorization-code flow with PKCE).
    pub client_id: String,
    /// Else the issuer's discovery document names it.
    pub jwks_uri: Option<String>,
}

/// What the console knows of its provider, and the provider's keys.
#[derive(Debug)]
pub struct Provider {
    pub config: ConsoleOidc,
    spec: OidcSpec,
    keys: KeyCache,
    /// The discovery document, once fetched; or when fetching it last
    /// failed (anyone may ask `/auth`: a failure is not retried for
    /// `oidc::REFETCH_AT_MOST`).
    endpoints: tokio::sync::Mutex<Option<Result<Value, (std::time::Instant, String)>>>,
    /// Tokens already checked (by their SHA-256), with their caller and
    /// expiry: the web console calls the API every second, and a token is
    /// checked and logged once.
    checked: std::sync::Mutex<std::collections::HashMap<[u8; 32], (Arc<Caller>, u64)>>,
}

/// How many checked tokens are remembered at most.
const CHECKED: usize = 10_000;

impl Provider {
    pub fn new(config: ConsoleOidc) -> Self {
        let spec = OidcSpec {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            jwks_uri: config.jwks_uri.clone(),
            ..Default::default()
        };
        Provider {
            config,
            spec,
            keys: KeyCache::default(),
            endpoints: Default::default(),
            checked: Default::default(),
        }
    }

    /// The caller a token proves, or why not (logged and counted as the
    /// clients' token logins are).
    async fn caller(&self, token: &str) -> Result<Arc<Caller>, Refused> {
        use sha2::Digest;
        let hash: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = flotilla_core::time::now_secs();
        {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            match checked.get(&hash) {
                Some((c, exp)) if now <= exp.saturating_add(oidc::LEEWAY) => return Ok(c.clone()),
                Some(_) => {
                    checked.remove(&hash);
                }
                None => {}
            }
        }
        let outcome = self.keys.check(token, None, &self.spec).await;
        oidc::audit("HTTP", "", &self.config.issuer, token, &outcome);
        let v = outcome?;
        let caller = Arc::new(Caller::from_roles(
            v.subject.clone(),
            oidc::claim_strings(&v.claims, &self.config.roles_claim),
        ));
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if checked.len() >= CHECKED {
            checked.retain(|_, (_, exp)| now <= exp.saturating_add(oidc::LEEWAY));
            if checked.len() >= CHECKED {
                checked.clear();
            }
        }
        checked.insert(hash, (caller.clone(), v.expires));
        Ok(caller)
    }
}

/// Who is calling, and what it may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
    pub admin: bool,
    pub editor: BTreeSet<String>,
    pub viewer: BTreeSet<String>,
}

impl Caller {
    fn admin(subject: &str) -> Self {
        Caller {
            subject: subject.to_string(),
            admin: true,
            editor: BTreeSet::new(),
            viewer: BTreeSet::new(),
        }
    }

    /// The caller with roles `roles` (`admin`, `editor:SPACE`,
    /// `viewer:SPACE`; others mean nothing here).
    pub fn from_roles(subject: String, roles: Vec<String>) -> Self {
        let mut c = Caller {
            subject,
            admin: false,
            editor: BTreeSet::new(),
            viewer: BTreeSet::new(),
        };
        for r in roles {
            match r.split_once(':') {
                _ if r == "admin" => c.admin = true,
                Some(("editor", s)) if !s.is_empty() => {
                    c.editor.insert(s.to_string());
                }
                Some(("viewer", s)) if !s.is_empty() => {
                    c.viewer.insert(s.to_string());
                }
                _ => {}
            }
        }
        c
    }

    /// Whether it may see space `s`.
    pub fn sees(&self, s: &str) -> bool {
        self.admin || self.editor.contains(s) || self.viewer.contains(s)
    }

    /// Why it may not make this call (a path under `/api/v1`, or
    /// `/metrics`), if it may not.
    pub fn refusal(&self, method: &Method, path: &str) -> Option<String> {
        if self.admin {
            return None;
        }
        let reads = matches!(*method, Method::GET | Method::HEAD);
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match parts.as_slice() {
            ["whoami"] => None,
            ["addressspaces"] if reads => None,
            ["addressspaces"] => Some("only an administrator creates address spaces".into()),
            ["addressspaces", space, rest @ ..] => {
                if !self.sees(space) {
                    Some(format!("no role in address space {space:?}"))
                } else if reads {
                    None
                } else if rest.is_empty() {
                    Some("only an administrator changes an address space itself".into())
                } else if self.editor.contains(*space) {
                    None
                } else {
                    Some(format!(
                        "a viewer of address space {space:?} changes nothing"
                    ))
                }
            }
            _ => Some("only an administrator sees what spans address spaces".into()),
        }
    }
}

/// Every API call: the admin token, or an OIDC token whose roles allow
/// the call. The caller goes on in the request's extensions.
pub async fn require_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Response {
    // What the web console needs before it can sign in.
    if req.uri().path() == "/auth" {
        return next.run(req).await;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let unauthorized =
        |why: String| ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", why).into_response();
    let caller = match given {
        Some(t) if flotilla_core::auth::ct_eq(t.as_bytes(), state.token.as_bytes()) => {
            Arc::new(Caller::admin("admin"))
        }
        Some(t) => match &state.oidc {
            Some(p) if oidc::looks_like_jwt(t) => match p.caller(t).await {
                Ok(c) => c,
                Err(why) => return unauthorized(format!("token refused: {why}")),
            },
            _ => return unauthorized("the token is not the admin token".into()),
        },
        None => {
            return unauthorized(if state.oidc.is_some() {
                "send the admin token or a token from the OIDC provider: Authorization: Bearer TOKEN".into()
            } else {
                "send the admin token: Authorization: Bearer TOKEN".into()
            })
        }
    };
    if let Some(why) = caller.refusal(req.method(), req.uri().path()) {
        return ApiError::new(StatusCode::FORBIDDEN, "Forbidden", why).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// `GET /api/v1/auth`: how the web console signs in (no credentials
/// needed).
pub async fn auth_info(State(state): State<AppState>) -> Response {
    let Some(p) = &state.oidc else {
        return Json(json!({"oidc": null})).into_response();
    };
    let endpoints = {
        let mut kept = p.endpoints.lock().await;
        let stale = match kept.as_ref() {
            None => true,
            Some(Err((at, _))) => at.elapsed() >= oidc::REFETCH_AT_MOST,
            Some(Ok(_)) => false,
        };
        if stale {
            let url = format!(
                "{}/.well-known/openid-configuration",
                p.config.issuer.trim_end_matches('/')
            );
            let fetched = match oidc::get(&url).await {
                Ok(body) => {
                    serde_json::from_slice::<Value>(&body).map_err(|e| format!("{url}: {e}"))
                }
                Err(e) => Err(e),
            };
            *kept = Some(fetched.map_err(|e| (std::time::Instant::now(), e)));
        }
        match kept.as_ref() {
            Some(Ok(doc)) => Ok(doc.clone()),
            Some(Err((_, e))) => Err(e.clone()),
            None => Err("not fetched".to_string()),
        }
    };
    match endpoints {
        Ok(doc) => Json(json!({"oidc": {
            "issuer": p.config.issuer,
            "clientId": p.config.client_id,
            "authorizationEndpoint": doc["authorization_endpoint"],
            "tokenEndpoint": doc["token_endpoint"],
            "scope": "openid",
        }}))
        .into_response(),
        Err(e) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "IssuerUnreachable",
            format!("the OIDC provider's discovery document: {e}"),
        )
        .into_response(),
    }
}

/// `GET /api/v1/whoami`: the caller and its roles.
pub async fn whoami(Extension(c): Extension<Arc<Caller>>) -> Json<Value> {
    Json(json!({
        "subject": c.subject,
        "admin": c.admin,
        "editor": c.editor,
        "viewer": c.viewer,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_limit_calls_to_their_spaces() {
        let c = Caller::from_roles(
            "ann".into(),
            vec![
                "editor:a".into(),
                "viewer:b".into(),
                "viewer:".into(),
                "x".into(),
            ],
        );
        let ok = |m: Method, p: &str| c.refusal(&m, p).is_none();
        assert!(ok(Method::GET, "/addressspaces"));
        assert!(!ok(Method::POST, "/addressspaces"));
        assert!(ok(Method::GET, "/addressspaces/a/addresses"));
        assert!(ok(Method::POST, "/addressspaces/a/addresses"));
        assert!(ok(Method::DELETE, "/addressspaces/a/addresses/q"));
        assert!(!ok(Method::PUT, "/addressspaces/a"));
        assert!(!ok(Method::DELETE, "/addressspaces/a"));
        assert!(ok(Method::GET, "/addressspaces/b/addresses"));
        assert!(!ok(Method::POST, "/addressspaces/b/addresses"));
        assert!(!ok(Method::POST, "/addressspaces/b/queues/q/purge"));
        assert!(!ok(Method::GET, "/addressspaces/c"));
        assert!(!ok(Method::GET, "/addressspaces/c/addresses"));
        for p in [
            "/overview",
            "/mesh",
            "/brokers",
            "/watch",
            "/metrics",
            "/reports",
        ] {
            assert!(!ok(Method::GET, p), "{p}");
        }
        assert!(ok(Method::GET, "/whoami"));
        let admin = Caller::from_roles("root".into(), vec!["admin".into()]);
        assert!(admin.refusal(&Method::DELETE, "/addressspaces/z").is_none());
    }
}
