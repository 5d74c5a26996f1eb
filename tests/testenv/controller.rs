//! `flotilla run` as a child process against test clusters, with its HTTP endpoints read back.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::net::{HTTP_PORT, Host, SECURE_PORT};
use super::{PATIENCE, TestCluster, scratch_dir, spawn, wait_for_listener};

/// The namespace flotilla runs in, in the hub.
pub const FLOTILLA_NAMESPACE: &str = "flotilla";

pub struct Flotilla {
    pub name: String,
    /// This replica's own loopback address; it serves HTTP on `HTTP_PORT` there, across restarts.
    pub host: Host,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    kubeconfig: PathBuf,
    /// With authentication on: the bearer token `get` uses for /metrics and /debug (over HTTPS).
    reader_token: Option<String>,
    /// The plain and the HTTPS port on `host`.
    ports: [u16; 2],
}

impl Flotilla {
    /// Starts `flotilla run` against `hub` with fast test timings plus `extra` flags.
    pub fn start(hub: &TestCluster, name: &str, extra: &[&str]) -> Flotilla {
        Self::start_with_kubeconfig(&hub.admin_kubeconfig(), name, extra)
    }

    pub fn start_with_kubeconfig(kubeconfig: &str, name: &str, extra: &[&str]) -> Flotilla {
        Self::start_on_ports(kubeconfig, name, extra, [HTTP_PORT, SECURE_PORT])
    }

    /// On other ports than the usual: beside a program that holds them on every address.
    pub fn start_on_ports(kubeconfig: &str, name: &str, extra: &[&str], ports: [u16; 2]) -> Flotilla {
        let dir = scratch_dir(&format!("flotilla-{name}"));
        let path = dir.join("hub.kubeconfig");
        std::fs::write(&path, kubeconfig).unwrap();
        let mut args: Vec<String> = [
            "run",
            "--namespace",
            FLOTILLA_NAMESPACE,
            // Short enough that a standby takes over within a test's patience; the leader stops
            // writing 7 s after its last renewal began, when a loaded hub slows renewals.
            "--lease-duration",
            "10s",
            "--lease-grace",
            "3s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--stale-after") {
            args.extend(["--stale-after".to_string(), "8s".to_string()]);
        }
        // A deleted registration goes at once, as `render` of a snapshot (which has no Secret
        // for it) says; the grace period has its own tests.
        if !extra.contains(&"--removal-grace") {
            args.extend(["--removal-grace".to_string(), "0s".to_string()]);
        }
        // Tests read /metrics and /debug plainly unless they test the secure listener.
        if !extra.contains(&"--http-auth") {
            args.extend(["--http-auth".to_string(), "none".to_string()]);
        }
        if !extra.contains(&"--log-level") {
            args.extend(["--log-level".to_string(), "info,flotilla=debug".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let host = Host::claim(&ports);
        let mut f =
            Flotilla { name: name.into(), host, dir, args, child: None, kubeconfig: path, reader_token: None, ports };
        f.restart();
        f
    }

    /// Starts the process again (same flags, same address).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "flotilla {} is running", self.name);
        // FLOTILLA_BIN: another build to compare with (benches), e.g. one of an earlier commit.
        let binary = std::env::var("FLOTILLA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_flotilla").to_string());
        let mut cmd = Command::new(binary);
        cmd.args(&self.args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--http-addr")
            .arg(self.http_addr().to_string())
            .arg("--secure-addr")
            .arg(self.secure_addr().to_string())
            .arg("--replica-name")
            .arg(&self.name);
        let log = self.dir.join(format!("flotilla-{}.log", super::now_millis()));
        std::fs::write(self.dir.join("current-log"), log.to_string_lossy().as_bytes()).unwrap();
        self.child = Some(spawn(cmd, &log));
        wait_for_listener(self.http_addr(), PATIENCE, || self.log_tail());
    }

    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.host.addr(self.ports[0])
    }

    /// The HTTPS listener of /metrics and /debug (when started with `--http-auth kubernetes`).
    pub fn secure_addr(&self) -> std::net::SocketAddr {
        self.host.addr(self.ports[1])
    }

    /// GET over HTTPS with an optional bearer token: (status code, body, the certificate chain
    /// served). The server's certificate is not checked, as a scraper set up with
    /// `insecureSkipVerify` would not; tests compare the chain themselves.
    pub async fn https_get(&self, path: &str, token: Option<&str>) -> (u16, String, Vec<CertificateDer<'static>>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.secure_addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        let chain =
            stream.get_ref().1.peer_certificates().unwrap_or_default().iter().map(|c| c.clone().into_owned()).collect();
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        if let Err(e) = stream.read_to_end(&mut response).await {
            // A server may close without TLS's close_notify once the response is complete.
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "reading {path}: {e}");
        }
        let (code, body) = parse_response(&response);
        (code, body, chain)
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "flotilla {} exited with {status} after SIGTERM:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// SIGSTOP: the process holds still (no watch event is read, no lease renewed) until `resume`.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
        }
    }

    pub fn resume(&self) {
        if let Some(child) = &self.child {
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        }
    }

    /// SIGKILL: a crash, no lease release.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("current-log")).unwrap_or_default();
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Every log this replica has written, one per start, oldest first.
    pub fn logs(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.retain(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("flotilla-")));
        files.sort();
        files.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The most memory the running process has held so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.pid().map(super::peak_rss_of).unwrap_or(0)
    }

    /// CPU seconds the running process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.pid().map(super::cpu_seconds_of).unwrap_or(0.0)
    }

    /// Resident memory of the flotilla process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.child.as_ref().map(|c| super::rss_of(c.id())).unwrap_or(0)
    }

    /// Reads /metrics and /debug over HTTPS with this token from now on (`--http-auth kubernetes`).
    pub fn read_with_token(&mut self, token: &str) {
        self.reader_token = Some(token.to_string());
    }

    /// GET: (status code, body). Probes on the plain port; the views there too, or over HTTPS
    /// with the reader token when one is set.
    pub async fn get(&self, path: &str) -> (u16, String) {
        if let Some(token) = self.reader_token.as_deref().filter(|_| !matches!(path, "/livez" | "/readyz")) {
            let (code, body, _) = self.https_get(path, Some(token)).await;
            return (code, body);
        }
        let mut stream = tokio::net::TcpStream::connect(self.http_addr()).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        parse_response(&response)
    }

    pub async fn json(&self, path: &str) -> serde_json::Value {
        let (code, body) = self.get(path).await;
        assert_eq!(code, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// Sum of every sample of a metric (all label sets).
    pub async fn metric(&self, name: &str) -> f64 {
        self.metric_with(name, "").await
    }

    /// Sum of the samples of a metric whose labels contain `labels` (e.g. `verb="apply"`).
    pub async fn metric_with(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.get("/readyz").await.0 == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "flotilla {} not ready in {timeout:?}:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Flotilla {
    fn drop(&mut self) {
        self.kill();
    }
}

/// (status code, body) of a raw HTTP/1.1 response.
fn parse_response(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// Accepts any server certificate (signatures in the handshake are still checked).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Polls `check` until it returns Some, or fails after `timeout` with `what` and the log.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, flotilla: &Flotilla, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}\nflotilla log:\n{}",
            flotilla.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
