//! Tokens from an OIDC provider (JWTs): what a space trusts ([`OidcSpec`],
//! an AddressSpace's `spec.authentication.oidc`), the issuer's signing
//! keys (a JWKS, fetched or given inline),
//! and the check of one token for one space: its signature by one of
//! those keys with an algorithm the space allows, its times, issuer,
//! audience and tenant, and the rules its claims map to.
//!
//! Only asymmetric algorithms are accepted (RS256, ES256, EdDSA): `none`
//! never, and HMAC never, so a token "signed" with the issuer's *public*
//! key as an HMAC secret (the classic confusion) is refused before any
//! key is looked at. The algorithm is taken from the key, not only the
//! token's header: a key published for ES256 never checks an RS256
//! signature.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use tracing::{info, warn};

use crate::resources::{AuthorizationRule, Operation};

/// The issuer a space trusts, and how its tokens' claims map to rules.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(
    Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OidcSpec {
    /// The issuer (`iss`), e.g. `https://keycloak.example/realms/kitt`.
    pub issuer: String,
    /// The audience a token must name (`aud`).
    pub audience: String,
    /// The claim that names the address space; default `tenant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_claim: Option<String>,
    /// Where the keys are; default: the issuer's discovery document's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The issuer's keys as a JWKS document (JSON text; the API takes the
    /// object too), for sites that cannot reach the issuer: nothing is
    /// fetched then.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "jwks_text"
    )]
    pub jwks: Option<String>,
    /// A JWKS file in the components' JWKS directory (`--jwks-dir`; on
    /// Kubernetes, the Secret the Flotilla resource's `jwksSecret` names,
    /// mounted there), read again as `keyCacheSeconds` say and for an
    /// unknown key id, so a changed file or Secret rotates the keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// Claim values mapped to rules, in the shape of a MessagingUser's.
    #[serde(default)]
    pub authorization: Vec<ClaimRule>,
    /// How long fetched keys are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_cache_seconds: Option<u64>,
    /// The clock skew allowed on `exp` and `nbf`; default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew_seconds: Option<u64>,
    /// A claim the login's username (before any `@space`) must equal,
    /// e.g. `preferred_username`; unset: the username is not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_claim: Option<String>,
    /// Token ids (`jti`) no longer accepted; connections using them are
    /// closed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_token_ids: Vec<String>,
}

/// A JWKS given as text, or as the JSON object itself (kept as its text).
fn jwks_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::Deserialize;
    Ok(match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(v @ Value::Object(_)) => Some(v.to_string()),
        Some(_) => {
            return Err(serde::de::Error::custom(
                "jwks: a JWKS document, as an object or its JSON text",
            ))
        }
    })
}

impl OidcSpec {
    /// The clock skew allowed, seconds.
    pub fn skew(&self) -> u64 {
        self.clock_skew_seconds.unwrap_or(LEEWAY)
    }

    /// Whether the space's settings can be used: an http(s) issuer, an
    /// audience, a JWKS that parses, rules that name a claim.
    ///
    /// # Errors
    /// What is wrong, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let url = |field: &str, u: &str| {
            if u.starts_with("https://") || u.starts_with("http://") {
                u.parse::<hyper::Uri>()
                    .map(|_| ())
                    .map_err(|e| format!("{field} {u:?}: {e}"))
            } else {
                Err(format!("{field} {u:?} must be an http:// or https:// URL"))
            }
        };
        url("issuer", &self.issuer)?;
        if let Some(u) = &self.jwks_uri {
            url("jwksUri", u)?;
        }
        if self.audience.is_empty() {
            return Err("audience must not be empty".into());
        }
        if self.jwks.is_some() && self.jwks_file.is_some() {
            return Err("jwks and jwksFile: give the keys one way".into());
        }
        if let Some(f) = &self.jwks_file {
            // A name in the operator's directory, never a path.
            let ok = !f.is_empty()
                && f.len() <= 253
                && !f.starts_with('.')
                && f.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(format!(
                    "jwksFile {f:?} must be a file name (letters, digits, '.', '_', '-'; not starting with '.')"
                ));
            }
        }
        if let Some(j) = &self.jwks {
            let keys = Keys::from_jwks(j.as_bytes()).map_err(|e| format!("jwks: {e}"))?;
            if keys.is_empty() {
                return Err("jwks: no key with a kid for RS256, ES256 or EdDSA".into());
            }
        }
        for (field, c) in [
            ("tenantClaim", &self.tenant_claim),
            ("usernameClaim", &self.username_claim),
        ] {
            if c.as_deref() == Some("") {
                return Err(format!("{field} must not be empty"));
            }
        }
        for r in &self.authorization {
            if r.claim.is_empty() || r.value.is_empty() {
                return Err("authorization: a rule needs a claim and a value".into());
            }
        }
        if self.clock_skew_seconds.is_some_and(|s| s > MAX_SKEW) {
            return Err(format!("clockSkewSeconds must be at most {MAX_SKEW}"));
        }
        if self.key_cache_seconds == Some(0) {
            return Err("keyCacheSeconds must be at least 1".into());
        }
        Ok(())
    }

    /// Where its keys come from, naming the cache entry: the issuer and
    /// its JWKS URI (two spaces trusting one issuer the same way share
    /// its keys; fetched another way, they do not).
    fn source(&self) -> String {
        format!(
            "{}\n{}\n{}",
            self.issuer,
            self.jwks_uri.as_deref().unwrap_or(""),
            self.jwks_file.as_deref().unwrap_or("")
        )
    }
}

/// A token whose claim `claim` holds `value` may do `operations` on
/// `addresses` (patterns).
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimRule {
    pub claim: String,
    pub value: String,
    pub addresses: Vec<String>,
    pub operations: Vec<Operation>,
}

/// The clock skew allowed on `exp` and `nbf`, seconds.
pub const LEEWAY: u64 = 30;
/// The most clock skew a space may allow, seconds.
pub const MAX_SKEW: u64 = 300;

/// The algorithms a token may be signed with.
const ALLOWED: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// An issuer's signing keys, by key id, with the algorithm each is for.
#[derive(Clone, Default)]
pub struct Keys {
    keys: HashMap<String, (Algorithm, DecodingKey)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keys {
    /// The keys of a JWKS document (RFC 7517): those with a key id and
    /// an algorithm we accept; the others are left out.
    ///
    /// # Errors
    /// The document is not a JWKS.
    pub fn from_jwks(json: &[u8]) -> Result<Keys, String> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let listed = doc["keys"]
            .as_array()
            .ok_or("not a JWKS document: no \"keys\" array")?;
        let mut keys = HashMap::new();
        // Key by key: one of a kind we do not know (ES512, X25519, ...)
        // leaves the others usable.
        for jwk in listed
            .iter()
            .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            // Only signature keys: not `use: enc`, and `verify` among
            // `key_ops` where those are given.
            let for_signing = !matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))
            ) && jwk
                .common
                .key_operations
                .as_ref()
                .is_none_or(|ops| ops.contains(&KeyOperations::Verify));
            if !for_signing {
                continue;
            }
            let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                // Symmetric keys (`oct`) are never published signing keys.
                (AlgorithmParameters::OctetKey(_), _) => continue,
                (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(_), None) => Algorithm::ES256,
                (AlgorithmParameters::OctetKeyPair(_), None) => Algorithm::EdDSA,
                (_, Some(a)) => match format!("{a:?}").as_str() {
                    "RS256" => Algorithm::RS256,
                    "ES256" => Algorithm::ES256,
                    "EdDSA" => Algorithm::EdDSA,
                    _ => continue,
                },
            };
            if let Ok(k) = DecodingKey::from_jwk(&jwk) {
                keys.insert(kid, (alg, k));
            }
        }
        Ok(Keys { keys })
    }

    /// Whether key `kid` is known.
    pub fn has(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// How long fetched keys are kept when a space does not say.
pub const KEY_CACHE: Duration = Duration::from_secs(300);
/// An issuer's keys are fetched again for an unknown `kid` at most this
/// often (a client naming ever new key ids cannot make us hammer it).
pub const REFETCH_AT_MOST: Duration = Duration::from_secs(10);
/// A key fetch (discovery and JWKS together) gives up after this long,
/// well inside a login's handshake time (5 s).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest discovery or JWKS document read.
pub const MAX_DOCUMENT: usize = 1 << 20;

/// Issuers' keys as last fetched: from `jwksUri`, else from the issuer's
/// discovery document (`ISSUER/.well-known/openid-configuration`), kept
/// for `keyCacheSeconds` and fetched again early when a token names a key
/// id they lack (key rotation), at most every [`REFETCH_AT_MOST`]. A
/// space's inline `jwks` is parsed once per text and never fetched.
///
/// Each source has its own lock: a slow issuer holds up only the logins
/// that need it.
#[derive(Default)]
pub struct KeyCache {
    issuers: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    inline: std::sync::Mutex<HashMap<String, Arc<Keys>>>,
    /// Where spaces' `jwksFile`s are (`--jwks-dir`).
    dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyCache")
    }
}

struct Fetched {
    keys: Arc<Keys>,
    at: Instant,
}

/// One source's keys, and when fetching them last failed.
#[derive(Default)]
struct Slot {
    kept: Option<Fetched>,
    failed: Option<Instant>,
}

/// One source's keys, and when fetching them last failed.
/// settings change; old entries are dropped past this).
const MAX_SOURCES: usize = 1024;

impl KeyCache {
    /// Checks `token` (as [`verify`] does, for `space`) with the keys of
    /// `spec`'s issuer, fetched or read as needed, at the current time.
    ///
    /// # Errors
    /// Why it is refused.
    pub async fn check(
        &self,
        token: &str,
        space: Option<&str>,
        spec: &OidcSpec,
    ) -> Result<Verified, Refused> {
        let (kid, _) = header(token)?;
        let keys = self.keys(spec, &kid).await.map_err(Refused::Untrusted)?;
        verify(token, space, spec, &keys, crate::time::now_secs())
    }

    /// A cache that reads spaces' `jwksFile`s from `dir`.
    pub fn with_dir(dir: Option<std::path::PathBuf>) -> Self {
        KeyCache {
            dir,
            ..Default::default()
        }
    }

    /// The keys of `spec`'s issuer, fresh enough to hold `kid` if the
    /// issuer publishes it.
    ///
    /// # Errors
    /// The keys could not be fetched (and none are kept).
    pub async fn keys(&self, spec: &OidcSpec, kid: &str) -> Result<Arc<Keys>, String> {
        if let Some(text) = &spec.jwks {
            let mut inline = self.inline.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = inline.get(text) {
                return Ok(k.clone());
            }
            let keys = Arc::new(Keys::from_jwks(text.as_bytes())?);
            if inline.len() >= MAX_SOURCES {
                inline.clear();
            }
            inline.insert(text.clone(), keys.clone());
            return Ok(keys);
        }
        let ttl = spec
            .key_cache_seconds
            .map_or(KEY_CACHE, Duration::from_secs);
        let slot = {
            let mut issuers = self.issuers.lock().unwrap_or_else(|p| p.into_inner());
            let source = spec.source();
            if issuers.len() >= MAX_SOURCES && !issuers.contains_key(&source) {
                issuers.clear();
            }
            issuers.entry(source).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(f) = slot.kept.as_ref() {
            let fresh = f.at.elapsed() < ttl;
            if fresh && (f.keys.has(kid) || f.at.elapsed() < REFETCH_AT_MOST) {
                return Ok(f.keys.clone());
            }
        }
        // With no keys, a fetch that just failed is not tried again at
        // once: strangers' logins cannot make us call the issuer each.
        if slot.kept.is_none() && slot.failed.is_some_and(|t| t.elapsed() < REFETCH_AT_MOST) {
            return Err("the issuer's keys could not be fetched (tried again shortly)".into());
        }
        // Bounded well inside a login's handshake time.
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, fetch_keys(spec, self.dir.as_deref()))
            .await
            .unwrap_or_else(|_| Err(format!("no keys within {FETCH_TIMEOUT:?}")));
        match fetched {
            Ok(keys) => {
                let keys = Arc::new(keys);
                slot.kept = Some(Fetched {
                    keys: keys.clone(),
                    at: Instant::now(),
                });
                slot.failed = None;
                Ok(keys)
            }
            // The issuer is away: what we had still serves (its tokens
            // still expire on their own).
            Err(e) => {
                slot.failed = Some(Instant::now());
                match slot.kept.as_mut() {
                    Some(f) => {
                        warn!(issuer = %spec.issuer, error = %e, "fetching the issuer's keys failed; keeping the last ones");
                        f.at = Instant::now();
                        Ok(f.keys.clone())
                    }
                    None => {
                        warn!(issuer = %spec.issuer, error = %e, "fetching the issuer's keys failed");
                        Err(e)
                    }
                }
            }
        }
    }
}

async fn fetch_keys(spec: &OidcSpec, dir: Option<&std::path::Path>) -> Result<Keys, String> {
    if let Some(name) = &spec.jwks_file {
        let dir =
            dir.ok_or_else(|| format!("jwksFile {name:?}: this component has no --jwks-dir"))?;
        let path = dir.join(name);
        let file = path.clone();
        let read = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut text = Vec::new();
            std::fs::File::open(&file)?
                .take(MAX_DOCUMENT as u64 + 1)
                .read_to_end(&mut text)?;
            Ok::<_, std::io::Error>(text)
        });
        let text = read
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() > MAX_DOCUMENT {
            return Err(format!(
                "{}: larger than {MAX_DOCUMENT} bytes",
                path.display()
            ));
        }
        let keys = Keys::from_jwks(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        info!(issuer = %spec.issuer, file = %path.display(), keys = keys.len(), "issuer's signing keys read");
        return Ok(keys);
    }
    let uri = match &spec.jwks_uri {
        Some(u) => u.clone(),
        None => {
            let url = format!(
                "{}/.well-known/openid-configuration",
                spec.issuer.trim_end_matches('/')
            );
            let doc: Value = serde_json::from_slice(&get(&url).await?)
                .map_err(|e| format!("{url}: not a discovery document: {e}"))?;
            doc["jwks_uri"]
                .as_str()
                .ok_or_else(|| format!("{url}: no jwks_uri"))?
                .to_string()
        }
    };
    let keys = Keys::from_jwks(&get(&uri).await?).map_err(|e| format!("{uri}: {e}"))?;
    info!(issuer = %spec.issuer, jwks = %uri, keys = keys.len(), "issuer's signing keys fetched");
    Ok(keys)
}

/// `GET url` (http or https, the system's trusted CAs), at most
/// [`MAX_DOCUMENT`] bytes within [`FETCH_TIMEOUT`].
///
/// # Errors
/// It failed, or did not answer 200.
pub async fn get(url: &str) -> Result<Vec<u8>, String> {
    tokio::time::timeout(FETCH_TIMEOUT, get_now(url))
        .await
        .map_err(|_| format!("{url}: no answer within {FETCH_TIMEOUT:?}"))?
}

async fn get_now(url: &str) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .to_string();
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{url}: not an http or https URL")),
    };
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
    if tls {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("{url}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        exchange(stream, &authority, &path, url).await
    } else {
        exchange(tcp, &authority, &path, url).await
    }
}

async fn exchange<S>(stream: S, authority: &str, path: &str, url: &str) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if res.status() != hyper::StatusCode::OK {
        return Err(format!("{url}: answered {}", res.status()));
    }
    let body = http_body_util::Limited::new(res.into_body(), MAX_DOCUMENT)
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

/// A token that passed: who it is for, until when, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub subject: String,
    /// Unix seconds.
    pub expires: u64,
    /// The token's id (`jti`), for revocation.
    pub id: Option<String>,
    /// The rules its claims map to through the space's `authorization`.
    pub rules: Vec<AuthorizationRule>,
    /// All its claims (the rules are mapped again when the space's
    /// settings change).
    pub claims: Arc<Value>,
}

/// Why a token was refused (for the log and the client; never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not a JWT, or its header does not decode.
    Malformed(String),
    /// `alg` is not RS256, ES256 or EdDSA (`none` and HS* among them).
    Algorithm(String),
    /// No key with its `kid` (after the keys were fetched again).
    UnknownKey(String),
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    /// Its tenant claim does not name the space.
    WrongTenant,
    /// A claim is missing or of the wrong type.
    Claims(String),
    /// Its `jti` is in the space's `revokedTokenIds`.
    Revoked,
    /// The login's username is not its `usernameClaim`.
    Username,
    /// The space trusts no issuer, or its keys could not be had.
    Untrusted(String),
}

impl Refused {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::Malformed(_) => "malformed",
            Refused::Algorithm(_) => "algorithm",
            Refused::UnknownKey(_) => "unknown_key",
            Refused::BadSignature => "bad_signature",
            Refused::Expired => "expired",
            Refused::NotYetValid => "not_yet_valid",
            Refused::WrongIssuer => "wrong_issuer",
            Refused::WrongAudience => "wrong_audience",
            Refused::WrongTenant => "wrong_tenant",
            Refused::Claims(_) => "claims",
            Refused::Revoked => "revoked",
            Refused::Username => "username",
            Refused::Untrusted(_) => "untrusted",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Malformed(why) => write!(f, "malformed token: {why}"),
            Refused::Algorithm(a) => {
                write!(f, "algorithm {a} is not accepted (RS256, ES256, EdDSA)")
            }
            Refused::UnknownKey(kid) => write!(f, "no signing key {kid:?} from the issuer"),
            Refused::BadSignature => write!(f, "bad signature"),
            Refused::Expired => write!(f, "token expired"),
            Refused::NotYetValid => write!(f, "not yet valid"),
            Refused::WrongIssuer => write!(f, "wrong issuer"),
            Refused::WrongAudience => write!(f, "wrong audience"),
            Refused::WrongTenant => write!(f, "its tenant claim does not name this address space"),
            Refused::Claims(why) => write!(f, "claims: {why}"),
            Refused::Revoked => write!(f, "token revoked"),
            Refused::Username => write!(f, "the username is not the token's"),
            // The detail (URLs, what the issuer answered) is logged where
            // the fetch failed, not told to clients.
            Refused::Untrusted(_) => write!(f, "the issuer's signing keys are not available"),
        }
    }
}

/// Token decisions of this process so far: accepted, and refused by
/// reason (the order of [`Refused::label`]'s labels).
static DECISIONS: [std::sync::atomic::AtomicU64; 14] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 14];
const REASONS: [&str; 13] = [
    "malformed",
    "algorithm",
    "unknown_key",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "wrong_tenant",
    "claims",
    "revoked",
    "username",
    "untrusted",
];

/// Logs one authentication decision on a token (issuer, subject, tenant,
/// mechanism, outcome, reason; never the token) and counts it.
pub fn audit(
    mechanism: &str,
    space: &str,
    issuer: &str,
    token: &str,
    outcome: &Result<Verified, Refused>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    match outcome {
        Ok(v) => {
            DECISIONS[0].fetch_add(1, Relaxed);
            info!(target: "flotilla::auth", %issuer, subject = ?v.subject, tenant = %space, mechanism, outcome = "accepted", jti = ?v.id.as_deref().unwrap_or(""), "token accepted");
        }
        Err(why) => {
            let i = REASONS.iter().position(|r| *r == why.label()).unwrap_or(0);
            DECISIONS[i + 1].fetch_add(1, Relaxed);
            // The subject as the token claims it (unchecked, for the log).
            let claimed = (token.len() <= MAX_TOKEN)
                .then(|| unverified_claims(token))
                .flatten()
                .and_then(|c| {
                    c["sub"]
                        .as_str()
                        .map(|s| s.chars().take(128).collect::<String>())
                })
                .unwrap_or_default();
            // Debug formatting: what a stranger wrote is escaped, so no
            // line of the log is theirs.
            info!(target: "flotilla::auth", %issuer, subject = ?claimed, tenant = %space, mechanism, outcome = "refused", reason = ?why.to_string(), "token refused");
        }
    }
}

/// Counts a live connection closed for its token (expired or revoked).
pub fn audit_closed(space: &str, subject: &str, why: &Refused) {
    info!(target: "flotilla::auth", subject = ?subject, tenant = %space, outcome = "closed", reason = %why, "connection closed for its token");
}

/// `(outcome, reason, count)` of every decision so far.
pub fn decisions() -> Vec<(&'static str, &'static str, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = vec![("accepted", "", DECISIONS[0].load(Relaxed))];
    for (i, r) in REASONS.iter().enumerate() {
        out.push(("refused", r, DECISIONS[i + 1].load(Relaxed)));
    }
    out
}

/// The key id and algorithm a token names in its header, unchecked.
///
/// # Errors
/// The token is not a JWT with a header we accept.
pub fn header(token: &str) -> Result<(String, Algorithm), Refused> {
    // `alg: none` and unknown algorithms do not parse as a header here.
    let raw = token.split('.').next().unwrap_or("");
    let alg = base64_json(raw)
        .and_then(|v| {
            v["alg"]
                .as_str()
                .map(|a| a.chars().take(32).collect::<String>())
        })
        .ok_or_else(|| Refused::Malformed("no header with an alg".into()))?;
    let h = jsonwebtoken::decode_header(token).map_err(|_| Refused::Algorithm(alg.clone()))?;
    if !ALLOWED.contains(&h.alg) {
        return Err(Refused::Algorithm(alg));
    }
    let kid = h
        .kid
        .ok_or_else(|| Refused::Malformed("no kid in its header".into()))?;
    Ok((kid, h.alg))
}

fn base64_json(part: &str) -> Option<Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Checks `token` for address space `space` (`None`: a token for no
/// space, the console's) with `spec` and the issuer's `keys`, at unix time
/// `now`.
///
/// # Errors
/// Why it is refused.
pub fn verify(
    token: &str,
    space: Option<&str>,
    spec: &OidcSpec,
    keys: &Keys,
    now: u64,
) -> Result<Verified, Refused> {
    let (kid, alg) = header(token)?;
    let Some((key_alg, key)) = keys.keys.get(&kid) else {
        return Err(Refused::UnknownKey(kid));
    };
    if *key_alg != alg {
        return Err(Refused::Algorithm(format!(
            "{alg:?} with a key for {key_alg:?}"
        )));
    }
    let mut v = Validation::new(alg);
    // Times are checked below, against `now`, with our leeway.
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<Value>(token, key, &v).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::InvalidSignature => Refused::BadSignature,
            ErrorKind::InvalidAlgorithm => Refused::Algorithm(format!("{alg:?}")),
            other => Refused::Malformed(format!("{other:?}")),
        }
    })?;
    let c = data.claims;
    let exp = c["exp"]
        .as_u64()
        .ok_or_else(|| Refused::Claims("no exp".into()))?;
    // Valid until exp + skew, exclusive (what a connection's deadline
    // is, so a token closed for expiry never opens another).
    if now >= exp.saturating_add(spec.skew()) {
        return Err(Refused::Expired);
    }
    if let Some(nbf) = c["nbf"].as_u64() {
        if now.saturating_add(spec.skew()) < nbf {
            return Err(Refused::NotYetValid);
        }
    }
    if !issued_by(&c, spec) {
        return Err(Refused::WrongIssuer);
    }
    if !for_audience(&c, spec) {
        return Err(Refused::WrongAudience);
    }
    let claim = spec.tenant_claim.as_deref().unwrap_or("tenant");
    if let Some(space) = space {
        if claim_values(&c, claim).iter().all(|t| *t != space) {
            return Err(Refused::WrongTenant);
        }
    }
    let subject = c["sub"]
        .as_str()
        .ok_or_else(|| Refused::Claims("no sub".into()))?
        .to_string();
    if subject.is_empty() || subject.len() > 255 || subject.chars().any(char::is_control) {
        return Err(Refused::Claims(
            "sub must be 1 to 255 bytes without control characters".into(),
        ));
    }
    if c["jti"]
        .as_str()
        .is_some_and(|j| spec.revoked_token_ids.iter().any(|r| r == j))
    {
        return Err(Refused::Revoked);
    }
    if let Some(claim) = &spec.username_claim {
        if claim_values(&c, claim).is_empty() {
            return Err(Refused::Claims(format!("no {claim}")));
        }
    }
    Ok(Verified {
        subject,
        expires: exp,
        id: c["jti"].as_str().map(String::from),
        rules: rules(spec, &c),
        claims: Arc::new(c),
    })
}

/// What a connection keeps of a token's claims: those its space's rules
/// and checks read, not all a token of 16 KiB may hold.
pub fn kept_claims(spec: &OidcSpec, mut c: Value) -> Value {
    let Some(all) = c.as_object_mut() else {
        return Value::Null;
    };
    let root = |claim: &str| claim.split('.').next().map(String::from);
    let named: Vec<String> = spec
        .authorization
        .iter()
        .map(|r| r.claim.as_str())
        .chain(spec.username_claim.as_deref())
        .chain([spec.tenant_claim.as_deref().unwrap_or("tenant")])
        .flat_map(|c| [Some(c.to_string()), root(c)])
        .flatten()
        .collect();
    let wanted =
        |k: &str| ["iss", "aud", "sub", "jti", "exp"].contains(&k) || named.iter().any(|n| n == k);
    all.retain(|k, _| wanted(k));
    c
}

/// True when `claims`' `iss` is `spec`'s issuer (a trailing `/` in the
/// setting aside).
pub fn issued_by(claims: &Value, spec: &OidcSpec) -> bool {
    let iss = claims["iss"].as_str();
    iss == Some(spec.issuer.trim_end_matches('/')) || iss == Some(spec.issuer.as_str())
}

/// True when `claims`' `aud` (a string or an array) names `spec`'s
/// audience.
pub fn for_audience(claims: &Value, spec: &OidcSpec) -> bool {
    match &claims["aud"] {
        Value::String(a) => *a == spec.audience,
        Value::Array(a) => a.iter().any(|x| x.as_str() == Some(spec.audience.as_str())),
        _ => false,
    }
}

/// The rules `claims` map to through `spec`'s `authorization`.
pub fn rules(spec: &OidcSpec, claims: &Value) -> Vec<AuthorizationRule> {
    spec.authorization
        .iter()
        .filter(|r| claim_values(claims, &r.claim).contains(&r.value.as_str()))
        .map(|r| AuthorizationRule {
            addresses: r.addresses.clone(),
            operations: r.operations.clone(),
        })
        .collect()
}

/// True when `token` has the shape of a JWT (three base64url parts, a
/// header naming an `alg`): a password that is one is checked as a token.
pub fn looks_like_jwt(token: &str) -> bool {
    token.len() < MAX_TOKEN
        && token.split('.').count() == 3
        && base64_json(token.split('.').next().unwrap_or("")).is_some_and(|h| h["alg"].is_string())
}

/// The longest token taken (bytes).
pub const MAX_TOKEN: usize = 16 * 1024;

/// A token's claims, unchecked: only to find which space it names, before
/// the space's settings check it.
pub fn unverified_claims(token: &str) -> Option<Value> {
    base64_json(token.split('.').nth(1)?)
}

/// The strings `claims`' `name` holds.
pub fn claim_strings(claims: &Value, name: &str) -> Vec<String> {
    claim_values(claims, name)
        .into_iter()
        .map(String::from)
        .collect()
}

/// True when `claims`' `name` holds `value`.
pub fn claim_holds(claims: &Value, name: &str, value: &str) -> bool {
    claim_values(claims, name).contains(&value)
}

/// A claim's values: a string, the strings of an array, or (a dotted
/// name, as Keycloak's `realm_access.roles`) those of a nested claim.
fn claim_values<'a>(claims: &'a Value, name: &str) -> Vec<&'a str> {
    let v = claims
        .get(name)
        .or_else(|| name.split('.').try_fold(claims, |v, k| v.get(k)));
    match v {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use ring::signature::{Ed25519KeyPair, KeyPair};

    const NOW: u64 = 1_800_000_000;

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// A fresh Ed25519 key: its signing key, and its JWKS with `kid`.
    fn ed25519(kid: &str) -> (EncodingKey, Vec<u8>) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "alg": "EdDSA",
            "x": b64(pair.public_key().as_ref()),
        }]});
        (
            EncodingKey::from_ed_der(pkcs8.as_ref()),
            serde_json::to_vec(&jwks).expect("json"),
        )
    }

    /// A fresh P-256 key, likewise.
    fn es256(kid: &str) -> (EncodingKey, Vec<u8>) {
        use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("key");
        let point = pair.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]});
        (
            EncodingKey::from_ec_der(pkcs8.as_ref()),
            serde_json::to_vec(&jwks).expect("json"),
        )
    }

    fn spec() -> OidcSpec {
        OidcSpec {
            issuer: "https://idp.example/realms/kitt".into(),
            audience: "flotilla".into(),
            tenant_claim: None,
            jwks_uri: None,
            authorization: vec![ClaimRule {
                claim: "realm_access.roles".into(),
                value: "writer".into(),
                addresses: vec!["orders/#".into()],
                operations: vec![Operation::Send],
            }],
            ..Default::default()
        }
    }

    fn claims() -> Value {
        serde_json::json!({
            "iss": "https://idp.example/realms/kitt", "aud": ["account", "flotilla"],
            "sub": "device-7", "tenant": "factory-a", "exp": NOW + 300, "nbf": NOW - 10,
            "jti": "t-1", "realm_access": {"roles": ["writer", "reader"]},
        })
    }

    fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, c: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        encode(&h, c, key).expect("sign")
    }

    #[test]
    fn a_good_token_passes_with_its_rules_for_eddsa_and_es256() {
        for (alg, (key, jwks)) in [
            (Algorithm::EdDSA, ed25519("k1")),
            (Algorithm::ES256, es256("k1")),
        ] {
            let keys = Keys::from_jwks(&jwks).expect("jwks");
            let v = verify(
                &sign(alg, "k1", &key, &claims()),
                Some("factory-a"),
                &spec(),
                &keys,
                NOW,
            )
            .expect("valid");
            assert_eq!(v.subject, "device-7");
            assert_eq!(v.id.as_deref(), Some("t-1"));
            assert_eq!(v.rules.len(), 1);
            assert_eq!(v.rules[0].addresses, ["orders/#"]);
        }
    }

    #[test]
    fn each_bad_token_is_refused_for_its_reason() {
        let (key, jwks) = ed25519("k1");
        let keys = Keys::from_jwks(&jwks).expect("jwks");
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = claims();
            f(&mut c);
            sign(Algorithm::EdDSA, "k1", &key, &c)
        };
        let check = |t: &str| verify(t, Some("factory-a"), &spec(), &keys, NOW);
        assert_eq!(
            check(&with(&|c| c["exp"] = (NOW - 100).into())),
            Err(Refused::Expired)
        );
        // Within the clock skew: still valid.
        assert!(check(&with(&|c| c["exp"] = (NOW - 10).into())).is_ok());
        assert_eq!(
            check(&with(&|c| c["nbf"] = (NOW + 100).into())),
            Err(Refused::NotYetValid)
        );
        assert_eq!(
            check(&with(&|c| c["iss"] = "https://evil.example".into())),
            Err(Refused::WrongIssuer)
        );
        assert_eq!(
            check(&with(&|c| c["aud"] = "other".into())),
            Err(Refused::WrongAudience)
        );
        assert_eq!(
            check(&with(&|c| c["tenant"] = "factory-b".into())),
            Err(Refused::WrongTenant)
        );
        // A tampered payload: the signature no longer holds.
        let good = with(&|_| {});
        let mut parts: Vec<String> = good.split('.').map(String::from).collect();
        let mut c = claims();
        c["tenant"] = "factory-a".into();
        c["realm_access"]["roles"] = serde_json::json!(["admin"]);
        parts[1] = b64(&serde_json::to_vec(&c).expect("json"));
        assert_eq!(check(&parts.join(".")), Err(Refused::BadSignature));
        // An unknown key id.
        assert_eq!(
            check(&sign(Algorithm::EdDSA, "k2", &key, &claims())),
            Err(Refused::UnknownKey("k2".into()))
        );
        // Signed by another key under the same kid.
        let (other, _) = ed25519("k1");
        assert_eq!(
            check(&sign(Algorithm::EdDSA, "k1", &other, &claims())),
            Err(Refused::BadSignature)
        );
        // `alg: none`.
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","kid":"k1","typ":"JWT"}"#),
            b64(&serde_json::to_vec(&claims()).expect("json"))
        );
        assert!(matches!(check(&none), Err(Refused::Algorithm(a)) if a == "none"));
        // HS256 with the issuer's public key as the secret.
        let public = serde_json::from_slice::<Value>(&jwks).expect("json")["keys"][0]["x"]
            .as_str()
            .expect("x")
            .to_string();
        let hs = sign(
            Algorithm::HS256,
            "k1",
            &EncodingKey::from_secret(public.as_bytes()),
            &claims(),
        );
        assert!(matches!(check(&hs), Err(Refused::Algorithm(a)) if a == "HS256"));
        // An ES256 header on a key published for EdDSA.
        let (ec, _) = es256("k1");
        assert!(matches!(
            check(&sign(Algorithm::ES256, "k1", &ec, &claims())),
            Err(Refused::Algorithm(_))
        ));
        assert!(matches!(check("not a token"), Err(Refused::Malformed(_))));
    }

    #[test]
    fn the_tenant_claim_and_rule_claims_are_configurable() {
        let (key, jwks) = ed25519("k1");
        let keys = Keys::from_jwks(&jwks).expect("jwks");
        let mut s = spec();
        s.tenant_claim = Some("org".into());
        let mut c = claims();
        c["org"] = serde_json::json!(["factory-a", "factory-c"]);
        c["realm_access"]["roles"] = serde_json::json!(["reader"]);
        let v = verify(
            &sign(Algorithm::EdDSA, "k1", &key, &c),
            Some("factory-c"),
            &s,
            &keys,
            NOW,
        )
        .expect("valid");
        assert!(v.rules.is_empty(), "no rule for a reader");
    }

    #[test]
    fn symmetric_and_unknown_keys_in_a_jwks_are_left_out() {
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        ]});
        let keys = Keys::from_jwks(&serde_json::to_vec(&jwks).expect("json")).expect("jwks");
        assert!(keys.is_empty());
        assert!(Keys::from_jwks(b"{}").is_err());
        // A kind of key we do not know beside one we do: the known one is
        // kept; an encryption key is not a signing key.
        let (_, good) = ed25519("k1");
        let mut set: Value = serde_json::from_slice(&good).expect("json");
        let known = set["keys"][0].clone();
        let mut enc = known.clone();
        enc["kid"] = "k2".into();
        enc["use"] = "enc".into();
        set["keys"] = serde_json::json!([
            {"kty": "EC", "crv": "P-521", "kid": "big", "alg": "ES512", "x": "AA", "y": "AA"},
            {"kty": "OKP", "crv": "X25519", "kid": "dh", "x": "AA"},
            known,
            enc,
        ]);
        let keys = Keys::from_jwks(&serde_json::to_vec(&set).expect("json")).expect("jwks");
        assert!(keys.has("k1") && !keys.has("k2") && keys.len() == 1);
    }

    /// A small HTTP server on 127.0.0.1 port 0: the issuer's discovery
    /// document and its JWKS (which the test can change), counting the
    /// JWKS requests.
    async fn issuer(
        jwks: Arc<std::sync::Mutex<Vec<u8>>>,
        fetches: Arc<std::sync::atomic::AtomicUsize>,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let me = base.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let body = if req.starts_with("GET /.well-known/openid-configuration ") {
                    serde_json::to_vec(
                        &serde_json::json!({"issuer": me, "jwks_uri": format!("{me}/keys")}),
                    )
                    .expect("json")
                } else if req.starts_with("GET /keys ") {
                    fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    jwks.lock().expect("jwks").clone()
                } else {
                    let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                    continue;
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            }
        });
        base
    }

    #[tokio::test]
    async fn keys_are_read_from_a_file_in_the_jwks_dir_and_again_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("flotilla-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (k1, jwks1) = ed25519("k1");
        let (k2, jwks2) = ed25519("k2");
        std::fs::write(dir.join("plant.json"), &jwks1).expect("write");
        let mut s = spec();
        s.jwks_file = Some("plant.json".into());
        assert!(s.validate().is_ok());
        let cache = KeyCache::with_dir(Some(dir.clone()));
        let keys = cache.keys(&s, "k1").await.expect("keys");
        let check = |keys: &Keys, t: &str| verify(t, Some("factory-a"), &s, keys, NOW);
        assert!(check(&keys, &sign(Algorithm::EdDSA, "k1", &k1, &claims())).is_ok());
        // The file changes (a Secret updated): after the refetch window
        // an unknown kid reads it again.
        std::fs::write(dir.join("plant.json"), &jwks2).expect("write");
        {
            let slot = cache.issuers.lock().expect("cache")[&s.source()].clone();
            let mut slot = slot.lock().await;
            let kept = slot.kept.as_mut().expect("kept");
            kept.at = kept.at.checked_sub(REFETCH_AT_MOST).expect("clock");
        }
        let keys = cache.keys(&s, "k2").await.expect("keys");
        assert!(check(&keys, &sign(Algorithm::EdDSA, "k2", &k2, &claims())).is_ok());
        // A component without --jwks-dir, a path, two ways at once.
        assert!(KeyCache::default().keys(&s, "k1").await.is_err());
        for bad in ["../etc/passwd", "a/b", ".hidden", ""] {
            s.jwks_file = Some(bad.into());
            assert!(s.validate().is_err(), "{bad}");
        }
        s.jwks_file = Some("plant.json".into());
        s.jwks = Some(String::from_utf8(jwks1).expect("utf8"));
        assert!(s.validate().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn keys_are_fetched_by_discovery_kept_and_fetched_again_for_a_new_kid() {
        let (k1, jwks1) = ed25519("k1");
        let (k2, jwks2) = ed25519("k2");
        let served = Arc::new(std::sync::Mutex::new(jwks1));
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let base = issuer(served.clone(), fetches.clone()).await;
        let mut s = spec();
        s.issuer = base.clone();
        let cache = KeyCache::default();
        let mut c = claims();
        c["iss"] = base.clone().into();
        let now = c["exp"].as_u64().expect("exp") - 300;
        let check = |keys: &Keys, t: &str| verify(t, Some("factory-a"), &s, keys, now);
        // First use: discovery, then the JWKS.
        let keys = cache.keys(&s, "k1").await.expect("keys");
        assert!(check(&keys, &sign(Algorithm::EdDSA, "k1", &k1, &c)).is_ok());
        // Kept: no second fetch for a known kid.
        let _ = cache.keys(&s, "k1").await.expect("keys");
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The issuer rotates its key. A token with the new kid, right
        // away: the refetch waits out REFETCH_AT_MOST...
        *served.lock().expect("jwks") = jwks2;
        let keys = cache.keys(&s, "k2").await.expect("keys");
        assert!(
            !keys.has("k2"),
            "not fetched again within {REFETCH_AT_MOST:?}"
        );
        // ...and after it, the new key is fetched and works; the old one
        // is gone.
        {
            let slot = cache.issuers.lock().expect("cache")[&s.source()].clone();
            let mut slot = slot.lock().await;
            let kept = slot.kept.as_mut().expect("kept");
            kept.at = kept
                .at
                .checked_sub(REFETCH_AT_MOST)
                .expect("a monotonic clock older than 10 s");
        }
        let keys = cache.keys(&s, "k2").await.expect("keys");
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(check(&keys, &sign(Algorithm::EdDSA, "k2", &k2, &c)).is_ok());
        assert_eq!(
            check(&keys, &sign(Algorithm::EdDSA, "k1", &k1, &c)),
            Err(Refused::UnknownKey("k1".into()))
        );
        // An issuer that is not there: an error, not a panic.
        let mut gone = spec();
        gone.issuer = "http://127.0.0.1:9".into();
        assert!(cache.keys(&gone, "k1").await.is_err());
        assert!(get("ftp://example").await.is_err());
    }
}
