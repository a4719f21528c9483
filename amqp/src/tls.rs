//! rustls configuration from PEM files, for every listener and connector.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {msg}")]
    Pem { path: String, msg: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |msg: String| TlsError::Pem {
        path: path.display().to_string(),
        msg,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificates".into()));
    }
    Ok(certs)
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// Whether a listener asks its peers for certificates.
#[derive(Debug, Clone, Copy)]
pub enum ClientCerts<'a> {
    /// No client certificates.
    None,
    /// Peers may present a certificate signed by this CA (a component on a
    /// client port); one that presents another is refused.
    Optional(&'a Path),
    /// Peers must present a certificate signed by this CA (mutual TLS
    /// between routers).
    Required(&'a Path),
}

/// A server configuration from a certificate chain and key, asking for
/// client certificates as `client` says.
///
/// # Errors
/// Unreadable or invalid PEM files.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client: ClientCerts<'_>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (client_ca, optional) = match client {
        ClientCerts::None => (None, false),
        ClientCerts::Optional(ca) => (Some(ca), true),
        ClientCerts::Required(ca) => (Some(ca), false),
    };
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        path: key.display().to_string(),
        msg: e.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            );
            if optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|e| TlsError::Pem {
                path: ca.display().to_string(),
                msg: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(chain, key)?))
}

/// A client configuration trusting the CAs in `ca`.
///
/// # Errors
/// Unreadable or invalid PEM files.
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A client configuration trusting the CAs in `ca` and presenting the
/// certificate in `cert`/`key` (mutual TLS between routers).
///
/// # Errors
/// Unreadable or invalid PEM files.
pub fn client_config_with_cert(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        path: key.display().to_string(),
        msg: e.to_string(),
    })?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(cfg))
}
