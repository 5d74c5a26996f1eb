//! HTTPS for `/metrics` and `/debug`: a certificate mounted from files (re-read when the files
//! change, so a rotated certificate is served without a restart), or a self-signed one made at
//! start; and a listener that completes TLS handshakes off the accept loop, so one slow client
//! never holds up another.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// PEM files (e.g. a mounted Secret): re-read whenever either changes.
    Files { cert: PathBuf, key: PathBuf },
    /// Made at start, for these names.
    SelfSigned { names: Vec<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("self-signed certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The modification times of the certificate and key files last read.
type Stamps = (SystemTime, SystemTime);

/// The certificate to serve, reloaded from its files when they change.
#[derive(Debug)]
struct Certificate {
    source: CertSource,
    current: Mutex<(Option<Stamps>, Arc<CertifiedKey>)>,
}

impl Certificate {
    fn new(source: CertSource) -> Result<Certificate, TlsError> {
        let (stamp, key) = match &source {
            CertSource::Files { cert, key } => (Some(stamps(cert, key)?), Arc::new(load(cert, key)?)),
            CertSource::SelfSigned { names } => (None, Arc::new(self_signed(names)?)),
        };
        Ok(Certificate { source, current: Mutex::new((stamp, key)) })
    }

    /// The current certificate; re-read first if its files changed (a failed read keeps the
    /// certificate served so far, and is logged).
    fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let CertSource::Files { cert, key } = &self.source
            && let Ok(now) = stamps(cert, key)
            && current.0 != Some(now)
        {
            match load(cert, key) {
                Ok(loaded) => {
                    tracing::info!(cert = %cert.display(), "serving certificate reloaded");
                    *current = (Some(now), Arc::new(loaded));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "serving certificate changed but could not be read; keeping the previous one")
                }
            }
        }
        current.1.clone()
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn stamps(cert: &PathBuf, key: &PathBuf) -> Result<Stamps, TlsError> {
    let stamp = |p: &PathBuf| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .map_err(|e| TlsError::Load { path: p.clone(), message: e.to_string() })
    };
    Ok((stamp(cert)?, stamp(key)?))
}

fn load(cert: &PathBuf, key: &PathBuf) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Load { path: cert.clone(), message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Load { path: cert.clone(), message: "no certificate in the file".into() });
    }
    let der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Load { path: key.clone(), message: e.to_string() })?;
    certified(certs, der).map_err(|message| TlsError::Load { path: key.clone(), message })
}

fn certified(certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<CertifiedKey, String> {
    let signing = provider().key_provider.load_private_key(key).map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(certs, signing))
}

fn self_signed(names: &[String]) -> Result<CertifiedKey, TlsError> {
    let made = rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| TlsError::Generate(e.to_string()))?;
    let key =
        PrivateKeyDer::try_from(made.signing_key.serialize_der()).map_err(|e| TlsError::Generate(e.to_string()))?;
    certified(vec![made.cert.der().clone()], key).map_err(TlsError::Generate)
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP listener that hands out connections once their TLS handshake is done; handshakes run
/// on their own tasks.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, source: CertSource) -> Result<TlsListener, TlsError> {
        let certificate = Arc::new(Certificate::new(source)?);
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(certificate);
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let local = tcp.local_addr().map_err(|e| TlsError::Config(e.to_string()))?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::debug!(error = %e, "accepting an HTTPS connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mounted_certificate_is_reloaded_when_its_files_change() {
        let dir = std::env::temp_dir().join(format!("flotilla-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let write = |name: &str| {
            let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
            std::fs::write(&cert, made.cert.pem()).unwrap();
            std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
            made.cert.der().clone()
        };
        let first = write("first.example");
        let served = Certificate::new(CertSource::Files { cert: cert.clone(), key: key.clone() }).unwrap();
        assert_eq!(served.current().cert[0], first);
        // File times have a coarse grain on some file systems: make the change visible.
        std::thread::sleep(Duration::from_millis(1100));
        let second = write("second.example");
        assert_eq!(served.current().cert[0], second, "the rotated certificate is served");
        std::fs::write(&key, "garbage").unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(&cert, "garbage").unwrap();
        assert_eq!(served.current().cert[0], second, "an unreadable rotation keeps the previous certificate");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
