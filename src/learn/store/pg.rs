//! Connecting to PostgreSQL the way libpq does: `sslmode` (`disable`,
//! `prefer`, `require`, `verify-ca`, `verify-full`) and `sslrootcert` in the
//! URL, the password from a file rather than the TOML, TLS through rustls,
//! and a record of what the handshake negotiated for `check-config`.
//!
//! tokio-postgres parses only `disable`/`prefer`/`require` and knows no root
//! certificate, so both keys are taken out of the URL here and the TLS
//! policy is ours: `prefer` and `require` encrypt without checking who
//! answers (as in libpq; `require` with `sslrootcert` verifies the chain,
//! as libpq does), `verify-ca` checks the chain, `verify-full` the chain and
//! the host name. Several instances on several hosts carry mail features
//! and labels to the database: across a network, `verify-full` is the only
//! mode that stops an impostor.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// libpq's `sslmode`, less `allow` (plain first, TLS only if refused: no use here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode `{other}` is not supported: use disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the certificate authorities come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    /// `sslrootcert=/path/ca.pem`.
    File(PathBuf),
    /// `sslrootcert=system` (as in libpq 16): the bundled Mozilla roots.
    System,
}

/// A parsed PostgreSQL address: everything needed to (re)connect.
#[derive(Clone)]
pub struct Target {
    config: postgres::Config,
    mode: SslMode,
    roots: Option<Roots>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// What one connection negotiated, in words (`check-config` prints it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// `None`: no TLS (disabled, or `prefer` and the server had none).
    pub tls: Option<String>,
}

impl std::fmt::Display for Negotiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tls {
            Some(t) => f.write_str(t),
            None => f.write_str("no TLS (plain TCP or a Unix socket)"),
        }
    }
}

impl Target {
    /// Parses `postgres://user@host:port/db?sslmode=…&sslrootcert=…` and
    /// reads the password from `password_file` when given (it wins over one
    /// in the URL). Errors are plain words for the caller to wrap.
    pub fn parse(url: &str, password_file: Option<&Path>) -> Result<Target, String> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut rest = Vec::new();
        let mut mode = None;
        let mut roots = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)?;
            match k {
                "sslmode" => mode = Some(SslMode::parse(&v)?),
                "sslrootcert" if v == "system" => roots = Some(Roots::System),
                "sslrootcert" => roots = Some(Roots::File(PathBuf::from(v))),
                _ => rest.push(pair),
            }
        }
        let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
        let mut config: postgres::Config = url.parse().map_err(|e: postgres::Error| e.to_string())?;
        // libpq: `require` with a root certificate behaves as `verify-ca`.
        let mode = match (mode.unwrap_or(SslMode::Prefer), &roots) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (m, _) => m,
        };
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && roots.is_none() {
            return Err(format!(
                "sslmode={} needs sslrootcert=/path/to/ca.pem (or sslrootcert=system) in the URL",
                mode.as_str()
            ));
        }
        if let Some(path) = password_file {
            let p = std::fs::read_to_string(path).map_err(|e| format!("password_file {}: {e}", path.display()))?;
            let p = p.trim_end_matches(['\n', '\r']);
            if p.is_empty() {
                return Err(format!("password_file {}: empty", path.display()));
            }
            config.password(p);
        }
        config.ssl_mode(match mode {
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Prefer => postgres::config::SslMode::Prefer,
            _ => postgres::config::SslMode::Require,
        });
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(client_config(mode, roots.as_ref())?),
        };
        Ok(Target { config, mode, roots, tls })
    }

    pub fn config_mut(&mut self) -> &mut postgres::Config {
        &mut self.config
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Connects once; returns the client and what its handshake negotiated.
    pub fn connect(&self) -> Result<(postgres::Client, Negotiated), postgres::Error> {
        let Some(tls) = &self.tls else {
            return Ok((self.config.connect(postgres::NoTls)?, Negotiated::default()));
        };
        let seen = Arc::new(Mutex::new(None));
        let maker = MakeRustls { config: tls.clone(), mode: self.mode, seen: seen.clone() };
        let client = self.config.connect(maker)?;
        let tls = seen.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok((client, Negotiated { tls }))
    }

    /// The root certificates in words, for messages.
    pub fn roots(&self) -> String {
        match &self.roots {
            Some(Roots::File(p)) => p.display().to_string(),
            Some(Roots::System) => "the system's".into(),
            None => "none".into(),
        }
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| format!("bad percent escape in `{s}`"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8 once decoded"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls policy of one `sslmode`.
fn client_config(mode: SslMode, roots: Option<&Roots>) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let store = match roots {
        Some(Roots::File(path)) => {
            let bad = |e: String| format!("sslrootcert {}: {e}", path.display());
            let mut store = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
                store.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
            }
            if store.is_empty() {
                return Err(bad("no certificate in it".into()));
            }
            Some(store)
        }
        Some(Roots::System) => Some(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }),
        None => None,
    };
    let webpki = |store: rustls::RootCertStore| {
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .map_err(|e| e.to_string())
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, store) {
        (SslMode::VerifyFull, Some(store)) => webpki(store)?,
        (SslMode::VerifyCa, Some(store)) => Arc::new(Lenient { provider: provider(), chain: Some(webpki(store)?) }),
        _ => Arc::new(Lenient { provider: provider(), chain: None }),
    };
    let mut config = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
    // PostgreSQL 17's direct TLS negotiation asks for ALPN "postgresql"; the
    // classic SSLRequest path ignores it, so it is always safe to offer.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

/// The modes short of `verify-full`, whose certificate check is weaker
/// than rustls's own: `prefer`/`require` (no `chain`): encrypted, but anyone
/// may answer (libpq's meaning); `verify-ca`: the chain must lead to a
/// trusted root, the name may differ. Either way the handshake's signatures
/// are checked, so the session is bound to the certificate shown.
#[derive(Debug)]
struct Lenient {
    provider: Arc<rustls::crypto::CryptoProvider>,
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// tokio-postgres's hook: one TLS connector per host it tries.
struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
    mode: SslMode,
    /// Where the handshake leaves its description.
    seen: Arc<Mutex<Option<String>>>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = ConnectRustls;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<ConnectRustls> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("host `{domain}`: {e}")))?;
        Ok(ConnectRustls { config: self.config.clone(), name, mode: self.mode, seen: self.seen.clone() })
    }
}

struct ConnectRustls {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    mode: SslMode,
    seen: Arc<Mutex<Option<String>>>,
}

impl<S> TlsConnect<S> for ConnectRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let shown = self.name.to_str().into_owned();
            let tls = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
            let (_, session) = tls.get_ref();
            let version = session.protocol_version().map_or("TLS".into(), |v| format!("{v:?}").replace('_', "."));
            let suite = session.negotiated_cipher_suite().map_or("?".into(), |s| format!("{:?}", s.suite()));
            let checked = match self.mode {
                SslMode::VerifyFull => format!("certificate verified for `{shown}`"),
                SslMode::VerifyCa => "certificate chain verified (name not checked: verify-ca)".into(),
                _ => format!("certificate NOT verified (sslmode={})", self.mode.as_str()),
            };
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{version}, {suite}, {checked}"));
            Ok(RustlsStream(tls))
        })
    }
}

/// The encrypted stream tokio-postgres reads and writes.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> postgres::tls::TlsStream for RustlsStream<S> {
    /// No channel binding: SCRAM still authenticates both ways by the
    /// password; `verify-full` is what ties the session to the server.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_keys_are_taken_from_the_url_and_checked() {
        let t = Target::parse("postgres://u@db.example/mt?sslmode=require&application_name=x", None).unwrap();
        assert_eq!(t.mode(), SslMode::Require);
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(Target::parse("postgres://u@h/db", None).unwrap().mode(), SslMode::Prefer);
        let e = Target::parse("postgres://u@h/db?sslmode=verify-full", None).err().unwrap();
        assert!(e.contains("sslrootcert"), "{e}");
        let e = Target::parse("postgres://u@h/db?sslmode=allow", None).err().unwrap();
        assert!(e.contains("`allow`") && e.contains("verify-full"), "{e}");
        let e =
            Target::parse("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch.pem", None).err().unwrap();
        assert!(e.contains("/no/such.pem"), "{e}");
        let t = Target::parse("postgres://u@h/db?sslmode=verify-full&sslrootcert=system", None).unwrap();
        assert_eq!((t.mode(), t.roots().as_str()), (SslMode::VerifyFull, "the system's"));
    }

    #[test]
    fn require_with_a_root_certificate_verifies_the_chain_as_libpq_does() {
        let t = Target::parse("postgres://u@h/db?sslmode=require&sslrootcert=system", None).unwrap();
        assert_eq!(t.mode(), SslMode::VerifyCa);
    }

    #[test]
    fn the_password_file_wins_and_is_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let t = Target::parse("postgres://u:old@h/db", Some(&f)).unwrap();
        assert_eq!(t.config.get_password(), Some(&b"s3cret"[..]));
        std::fs::write(&f, "\n").unwrap();
        assert!(Target::parse("postgres://u@h/db", Some(&f)).err().unwrap().contains("empty"));
        let e = Target::parse("postgres://u@h/db", Some(&dir.path().join("none"))).err().unwrap();
        assert!(e.contains("password_file") && e.contains("none"), "{e}");
    }
}
