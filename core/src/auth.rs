//! Credentials and authorization.
//!
//! Passwords are never kept: a user's password becomes SCRAM-SHA-256 salted
//! keys (RFC 5802, RFC 7677) at load time. PLAIN is checked against the same
//! keys, and the SCRAM exchange is implemented here for both ends (the
//! router's SASL server and the `flotilla` tools' SASL client). Usernames are
//! taken as given (no SASLprep): use ASCII usernames and passwords.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::pattern;
use crate::resources::{AuthorizationRule, Operation};

type HmacSha256 = Hmac<Sha256>;

/// PBKDF2 iterations for newly derived keys (RFC 7677 recommends at least 4096).
pub const SCRAM_ITERATIONS: u32 = 4096;

/// A user's SCRAM-SHA-256 keys: enough to verify a password or a SCRAM proof,
/// not enough to recover the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredentials {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramCredentials {
    /// The keys in their stored form.
    pub fn to_keys(&self) -> crate::resources::ScramKeys {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD;
        crate::resources::ScramKeys {
            salt: b.encode(&self.salt),
            iterations: self.iterations,
            stored_key: b.encode(self.stored_key),
            server_key: b.encode(self.server_key),
        }
    }

    /// Keys from their stored form; `None` if they do not decode.
    pub fn from_keys(k: &crate::resources::ScramKeys) -> Option<Self> {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD;
        Some(ScramCredentials {
            salt: b.decode(&k.salt).ok()?,
            iterations: k.iterations,
            stored_key: b.decode(&k.stored_key).ok()?.try_into().ok()?,
            server_key: b.decode(&k.server_key).ok()?.try_into().ok()?,
        })
    }
}

impl std::fmt::Debug for ScramCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramCredentials(<redacted>)")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail.
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut out);
    out
}

/// Equal, in time that does not tell where the first difference is.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ScramCredentials {
    /// Derives keys for `password` with a fresh random salt.
    pub fn derive(password: &str) -> Self {
        let mut salt = vec![0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::derive_with(password, salt, SCRAM_ITERATIONS)
    }

    pub fn derive_with(password: &str, salt: Vec<u8>, iterations: u32) -> Self {
        let sp = salted_password(password, &salt, iterations);
        let client_key = hmac(&sp, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&sp, b"Server Key");
        ScramCredentials {
            salt,
            iterations,
            stored_key,
            server_key,
        }
    }

    /// Keys for a username that does not exist, for a SCRAM exchange that
    /// must fail without telling so: a salt that looks random but stays
    /// the same for that name (two probes see the same, as for a real
    /// user), the usual iteration count, and keys no proof matches. No
    /// PBKDF2 runs: it costs what a real user's lookup costs.
    pub fn decoy(username: &str) -> Self {
        static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(|| {
            let mut k = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut k);
            k
        });
        let mac = hmac(key, username.as_bytes());
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut stored_key);
        rand::thread_rng().fill_bytes(&mut server_key);
        ScramCredentials {
            salt: mac[..16].to_vec(),
            iterations: SCRAM_ITERATIONS,
            stored_key,
            server_key,
        }
    }

    /// Checks a plain-text password (SASL PLAIN) against the stored keys.
    pub fn verify_password(&self, password: &str) -> bool {
        let sp = salted_password(password, &self.salt, self.iterations);
        let client_key = hmac(&sp, b"Client Key");
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        ct_eq(&stored, &self.stored_key)
    }
}

/// Why a SCRAM exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("nonce mismatch")]
    Nonce,
    #[error("authentication failed")]
    Failed,
}

fn attr(msg: &str, key: char) -> Option<&str> {
    msg.split(',').find_map(|p| {
        let mut c = p.chars();
        (c.next() == Some(key) && c.next() == Some('=')).then(|| &p[2..])
    })
}

fn random_nonce() -> String {
    let mut n = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut n);
    B64.encode(n)
}

/// Server side of SCRAM-SHA-256, one exchange.
pub struct ScramServer {
    client_first_bare: String,
    server_first: String,
    nonce: String,
    creds: ScramCredentials,
}

/// The username in a client-first message, before the server looks it up.
pub fn scram_client_first_username(client_first: &[u8]) -> Result<String, ScramError> {
    let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
    let (gs2, bare) = split_gs2(msg)?;
    let _ = gs2;
    let user = attr(bare, 'n').ok_or(ScramError::Malformed)?;
    Ok(user.replace("=2C", ",").replace("=3D", "="))
}

fn split_gs2(msg: &str) -> Result<(&str, &str), ScramError> {
    // gs2-header = cbind-flag "," [authzid] ","
    let mut it = msg.splitn(3, ',');
    let flag = it.next().ok_or(ScramError::Malformed)?;
    let _authz = it.next().ok_or(ScramError::Malformed)?;
    let bare = it.next().ok_or(ScramError::Malformed)?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed),
    }
    Ok((&msg[..msg.len() - bare.len()], bare))
}

impl ScramServer {
    /// Starts an exchange from the client-first message and the user's keys
    /// (for an unknown user pass keys derived from a random password, so the
    /// exchange fails only at the proof and reveals nothing).
    pub fn start(
        client_first: &[u8],
        creds: ScramCredentials,
    ) -> Result<(Self, Vec<u8>), ScramError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
        let (_gs2, bare) = split_gs2(msg)?;
        let cnonce = attr(bare, 'r').ok_or(ScramError::Malformed)?;
        let nonce = format!("{cnonce}{}", random_nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&creds.salt),
            creds.iterations
        );
        let out = server_first.clone().into_bytes();
        Ok((
            ScramServer {
                client_first_bare: bare.to_string(),
                server_first,
                nonce,
                creds,
            },
            out,
        ))
    }

    /// Checks the client-final message; returns the server-final message.
    pub fn finish(self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let proof_at = msg.rfind(",p=").ok_or(ScramError::Malformed)?;
        let without_proof = &msg[..proof_at];
        let proof = B64
            .decode(&msg[proof_at + 3..])
            .map_err(|_| ScramError::Malformed)?;
        if attr(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_sig = hmac(&self.creds.stored_key, auth_message.as_bytes());
        if proof.len() != 32 {
            return Err(ScramError::Failed);
        }
        let client_key: Vec<u8> = proof.iter().zip(client_sig).map(|(p, s)| p ^ s).collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        if !ct_eq(&stored, &self.creds.stored_key) {
            return Err(ScramError::Failed);
        }
        let server_sig = hmac(&self.creds.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_sig)).into_bytes())
    }
}

/// Client side of SCRAM-SHA-256, one exchange.
pub struct ScramClient {
    password: String,
    client_first_bare: String,
    cnonce: String,
    server_signature: Option<[u8; 32]>,
}

impl ScramClient {
    /// Returns the client and its client-first message.
    pub fn new(username: &str, password: &str) -> (Self, Vec<u8>) {
        let cnonce = random_nonce();
        let user = username.replace('=', "=3D").replace(',', "=2C");
        let bare = format!("n={user},r={cnonce}");
        let first = format!("n,,{bare}").into_bytes();
        (
            ScramClient {
                password: password.to_string(),
                client_first_bare: bare,
                cnonce,
                server_signature: None,
            },
            first,
        )
    }

    /// Answers the server-first message with the client-final message.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let sf = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed)?;
        let nonce = attr(sf, 'r').ok_or(ScramError::Malformed)?;
        if !nonce.starts_with(&self.cnonce) {
            return Err(ScramError::Nonce);
        }
        let salt = B64
            .decode(attr(sf, 's').ok_or(ScramError::Malformed)?)
            .map_err(|_| ScramError::Malformed)?;
        let iterations: u32 = attr(sf, 'i')
            .and_then(|i| i.parse().ok())
            .ok_or(ScramError::Malformed)?;
        if iterations == 0 || iterations > 1_000_000 {
            return Err(ScramError::Malformed);
        }
        let sp = salted_password(&self.password, &salt, iterations);
        let client_key = hmac(&sp, b"Client Key");
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{},{}", self.client_first_bare, sf, without_proof);
        let client_sig = hmac(&stored, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(client_sig)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(&sp, b"Server Key");
        self.server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final message (proves the server knew the keys).
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let sf = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed)?;
        let v = B64
            .decode(attr(sf, 'v').ok_or(ScramError::Failed)?)
            .map_err(|_| ScramError::Malformed)?;
        match self.server_signature {
            Some(sig) if ct_eq(&sig, &v) => Ok(()),
            _ => Err(ScramError::Failed),
        }
    }
}

/// The realm of mesh logins: a router or component proves it holds the
/// mesh secret with SCRAM-SHA-256 as `ID@$mesh`. No address space can be
/// named `$mesh` (space names are DNS labels) and no MessagingUser's name
/// holds an `@`, so a tenant's login can never be taken for a mesh login.
pub const MESH_REALM: &str = "$mesh";

/// The shortest mesh secret accepted.
pub const MESH_SECRET_MIN: usize = 16;

/// Why a mesh secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MeshSecretError {
    #[error("--mesh-secret-file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("--mesh-secret-file {path}: the secret must be at least {MESH_SECRET_MIN} characters (e.g. `openssl rand -hex 32 > {path}`)")]
    TooShort { path: String },
}

/// The mesh credential (`--mesh-secret-file`): a secret every router and
/// component (broker, gateway, last-will service) of one installation
/// shares, as a mounted Kubernetes Secret gives it. It is only ever used
/// through SCRAM-SHA-256, so it never crosses the wire, and both ends prove
/// they know it. The secret itself is never logged (`Debug` redacts it).
#[derive(Clone)]
pub struct MeshSecret {
    secret: String,
    keys: ScramCredentials,
}

impl std::fmt::Debug for MeshSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshSecret(<redacted>)")
    }
}

impl MeshSecret {
    /// A secret from its text (surrounding white space is not part of it).
    ///
    /// # Errors
    /// The secret is shorter than [`MESH_SECRET_MIN`].
    pub fn new(secret: &str, path: &str) -> Result<Self, MeshSecretError> {
        let secret = secret.trim();
        if secret.chars().count() < MESH_SECRET_MIN {
            return Err(MeshSecretError::TooShort {
                path: path.to_string(),
            });
        }
        Ok(MeshSecret {
            secret: secret.to_string(),
            keys: ScramCredentials::derive(secret),
        })
    }

    /// Reads the secret from `path`.
    ///
    /// # Errors
    /// The file cannot be read or the secret is too short.
    pub fn load(path: &std::path::Path) -> Result<Self, MeshSecretError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| MeshSecretError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::new(&text, &shown)
    }

    /// Reads the secret from `path`, first writing a new random one there
    /// (readable only by its owner) if the file does not exist: what
    /// `flotilla up` does in its data directory.
    ///
    /// # Errors
    /// The file cannot be read or written.
    pub fn load_or_create(path: &std::path::Path) -> Result<Self, MeshSecretError> {
        if !path.exists() {
            let mut b = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut b);
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            write_private(path, &hex).map_err(|source| MeshSecretError::Read {
                path: path.display().to_string(),
                source,
            })?;
        }
        Self::load(path)
    }

    /// The SCRAM username a router or component with id `id` logs in as.
    pub fn username(id: &str) -> String {
        format!("{id}@{MESH_REALM}")
    }

    /// The id in a mesh login (`ID@$mesh`), or `None` for any other login.
    pub fn login_id(user: &str) -> Option<&str> {
        user.strip_suffix(MESH_REALM)?
            .strip_suffix('@')
            .filter(|id| !id.is_empty())
    }

    /// The secret, for the connecting end's SCRAM exchange.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The secret's SCRAM keys, for the accepting end (derived once).
    pub fn keys(&self) -> &ScramCredentials {
        &self.keys
    }
}

/// Makes `dir` (and its parents) if need be and lets only its owner in:
/// data directories hold SCRAM keys, message bodies and secrets.
///
/// # Errors
/// The directory cannot be made or its mode set.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes `text` to a new file at `path` that only its owner may read.
///
/// # Errors
/// The file cannot be written.
pub fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    use std::io::Write as _;
    opts.open(path)?.write_all(text.as_bytes())
}

/// True when one of `rules` allows `op` on `address`.
pub fn authorized(rules: &[AuthorizationRule], op: Operation, address: &str) -> bool {
    rules.iter().any(|r| {
        // A pattern address (a topic subscription) needs a rule that covers
        // everything it matches.
        r.operations.contains(&op) && r.addresses.iter().any(|p| pattern::covers(p, address))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_against_keys() {
        let c = ScramCredentials::derive_with("secret", b"salt".to_vec(), 64);
        assert!(c.verify_password("secret"));
        assert!(!c.verify_password("Secret"));
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn scram_round_trip() {
        let creds = ScramCredentials::derive_with("pencil", b"0123456789abcdef".to_vec(), 4096);
        let (mut client, first) = ScramClient::new("user", "pencil");
        assert_eq!(scram_client_first_username(&first).unwrap(), "user");
        let (server, server_first) = ScramServer::start(&first, creds.clone()).unwrap();
        let client_final = client.respond(&server_first).unwrap();
        let server_final = server.finish(&client_final).unwrap();
        client.verify(&server_final).unwrap();

        let (mut bad, first) = ScramClient::new("user", "wrong");
        let (server, server_first) = ScramServer::start(&first, creds).unwrap();
        let client_final = bad.respond(&server_first).unwrap();
        assert_eq!(server.finish(&client_final), Err(ScramError::Failed));
    }

    #[test]
    fn rfc7677_vector() {
        // RFC 7677 §3: user "user", password "pencil".
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let creds = ScramCredentials::derive_with("pencil", salt, 4096);
        let client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let without_proof = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let server = ScramServer {
            client_first_bare: client_first_bare.into(),
            server_first: server_first.into(),
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
            creds,
        };
        let fin = format!("{without_proof},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
        let out = server.finish(fin.as_bytes()).unwrap();
        assert_eq!(out, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn decoys_look_like_users_and_admit_no_one() {
        let a = ScramCredentials::decoy("ghost");
        let b = ScramCredentials::decoy("ghost");
        assert_eq!(a.salt, b.salt, "the same name, the same salt");
        assert_eq!(a.salt.len(), 16);
        assert_ne!(a.salt, ScramCredentials::decoy("other").salt);
        assert_eq!(a.iterations, SCRAM_ITERATIONS);
        let (mut client, first) = ScramClient::new("ghost", "anything");
        let (server, server_first) = ScramServer::start(&first, a).unwrap();
        let fin = client.respond(&server_first).unwrap();
        assert_eq!(server.finish(&fin), Err(ScramError::Failed));
    }

    #[test]
    fn mesh_logins() {
        assert_eq!(MeshSecret::login_id("router-1@$mesh"), Some("router-1"));
        assert_eq!(MeshSecret::login_id("a@b@$mesh"), Some("a@b"));
        assert_eq!(MeshSecret::login_id("@$mesh"), None);
        assert_eq!(MeshSecret::login_id("alice@tenant-a"), None);
        assert_eq!(MeshSecret::login_id("$mesh"), None);
        assert!(MeshSecret::new("short", "f").is_err());
        let m = MeshSecret::new("  0123456789abcdef\n", "f").unwrap();
        assert_eq!(m.secret(), "0123456789abcdef");
        assert!(m.keys().verify_password("0123456789abcdef"));
        assert!(!format!("{m:?}").contains("0123"));
    }

    #[test]
    fn rules() {
        let rules = vec![AuthorizationRule {
            addresses: vec!["orders/#".into()],
            operations: vec![Operation::Send],
        }];
        assert!(authorized(&rules, Operation::Send, "orders/eu"));
        assert!(!authorized(&rules, Operation::Recv, "orders/eu"));
        assert!(!authorized(&rules, Operation::Send, "prices"));
    }
}
