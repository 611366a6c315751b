//! TLS for both sides of the filter: the server certificate our listener
//! offers with STARTTLS, and the client settings toward the next hop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::settings::RelayTls;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("TLS private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("TLS CA file {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Config(String),
}

/// The acceptor for STARTTLS, from PEM files (certificate chain, then key).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let cert_err = |message: String| TlsError::Cert { path: cert.to_owned(), message };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no certificate found (expected PEM `BEGIN CERTIFICATE`)".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Key { path: key.to_owned(), message: e.to_string() })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Key { path: key.to_owned(), message: format!("does not match the certificate: {e}") })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The connector toward the next hop, or `None` for `tls = "none"`.
pub fn connector(mode: RelayTls, ca_file: Option<&Path>) -> Result<Option<TlsConnector>, TlsError> {
    // mail-send builds its configs on the process-wide provider.
    let _ = provider();
    let builder = || {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))
    };
    let config = match (mode, ca_file) {
        (RelayTls::None, _) => return Ok(None),
        // `may` and `encrypt` protect against passive listening only, as in Postfix.
        (RelayTls::May | RelayTls::Encrypt, _) => {
            return mail_send::smtp::tls::build_tls_connector(true).map(Some).map_err(TlsError::Config)
        }
        (RelayTls::Verify, None) => {
            return mail_send::smtp::tls::build_tls_connector(false).map(Some).map_err(TlsError::Config)
        }
        (RelayTls::Verify, Some(path)) => {
            let ca_err = |message: String| TlsError::Ca { path: path.to_owned(), message };
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))? {
                roots.add(cert.map_err(|e| ca_err(e.to_string()))?).map_err(|e| ca_err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ca_err("no certificate found".into()));
            }
            builder()?.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

/// One crypto provider, named explicitly: the process-wide default would
/// panic if a dependency ever compiled in a second one.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let err = acceptor(&missing, &missing).err().unwrap().to_string();
        assert!(err.contains("nope.pem") && err.contains("certificate"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        let err = acceptor(&empty, &empty).err().unwrap().to_string();
        assert!(err.contains("empty.pem") && err.contains("no certificate"), "{err}");
        assert!(connector(RelayTls::None, None).unwrap().is_none());
        assert!(connector(RelayTls::May, None).unwrap().is_some());
        let err = connector(RelayTls::Verify, Some(&empty)).err().unwrap().to_string();
        assert!(err.contains("empty.pem"), "{err}");
    }
}
