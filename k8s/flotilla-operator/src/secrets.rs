//! The secrets the operator makes for a Flotilla, once: the mesh secret
//! (routers and components authenticate to each other with it), the
//! console's admin token, and a CA with a certificate for the client
//! services (AMQPS, MQTTS). Once made they are never applied again, so
//! the keys the pods hold do not change under them.

use serde_json::{json, Value};

use crate::render::Names;

/// Generated secret material (never logged).
#[derive(Clone)]
pub struct Generated {
    pub mesh_secret: String,
    pub admin_token: String,
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Generated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Generated(<redacted>)")
    }
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The DNS names the client certificate is for: each client service by
/// its short, namespaced and cluster names.
pub fn dns_names(n: &Names) -> Vec<String> {
    let mut names = Vec::new();
    for part in ["router", "mqtt", "console", "broker"] {
        let short = n.name(part);
        names.push(short.clone());
        names.push(format!("{short}.{}", n.namespace));
        names.push(format!("{short}.{}.svc", n.namespace));
        names.push(format!("{short}.{}.svc.cluster.local", n.namespace));
    }
    // Each broker's pod, by its headless service name.
    names.push(format!("*.{}.{}.svc", n.name("broker"), n.namespace));
    names.push(format!(
        "*.{}.{}.svc.cluster.local",
        n.name("broker"),
        n.namespace
    ));
    names
}

/// Makes fresh secrets for the Flotilla `n`. The certificates keep
/// rcgen's validity (no expiry in practice); to rotate, delete the Secret
/// and the operator makes a new one.
///
/// # Errors
/// The certificates cannot be made.
pub fn generate(n: &Names) -> Result<Generated, rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, format!("{} Flotilla CA", n.instance));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(dns_names(n))?;
    leaf.distinguished_name
        .push(DnType::CommonName, n.name("router"));
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(Generated {
        mesh_secret: random_hex(32),
        admin_token: random_hex(32),
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The Secret objects (`tls`: also the CA and the certificate; without
/// it the spec names a Secret of its own).
pub fn objects(n: &Names, g: &Generated, tls: bool) -> Vec<Value> {
    let secret = |part: &str, data: Value| {
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": n.name(part), "labels": n.labels("flotilla")},
            "type": "Opaque",
            "stringData": data,
        })
    };
    let mut out = vec![
        secret("mesh", json!({"mesh-secret": g.mesh_secret})),
        secret("admin", json!({"token": g.admin_token})),
    ];
    if tls {
        out.push(secret(
            "ca",
            json!({"ca.crt": g.ca_cert, "ca.key": g.ca_key}),
        ));
        let mut t = secret(
            "tls",
            json!({"tls.crt": g.cert, "tls.key": g.key, "ca.crt": g.ca_cert}),
        );
        t["type"] = "kubernetes.io/tls".into();
        out.push(t);
    }
    out
}

impl Generated {
    /// What `flotilla operator render` shows for generated secrets.
    pub fn placeholders() -> Generated {
        let g = "<generated on first apply>".to_string();
        Generated {
            mesh_secret: g.clone(),
            admin_token: g.clone(),
            ca_cert: g.clone(),
            ca_key: g.clone(),
            cert: g.clone(),
            key: g,
        }
    }

    /// Fixed material for golden tests (never used to run anything).
    pub fn fixed() -> Generated {
        Generated {
            mesh_secret: "mesh-secret-for-tests".into(),
            admin_token: "admin-token-for-tests".into(),
            ca_cert: "CA CERT".into(),
            ca_key: "CA KEY".into(),
            cert: "CERT".into(),
            key: "KEY".into(),
        }
    }
}
