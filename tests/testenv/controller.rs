//! `flotilla run` as a child process against test clusters, with its HTTP endpoints read back.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::net::{HTTP_PORT, Host};
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
}

impl Flotilla {
    /// Starts `flotilla run` against `hub` with fast test timings plus `extra` flags.
    pub fn start(hub: &TestCluster, name: &str, extra: &[&str]) -> Flotilla {
        Self::start_with_kubeconfig(&hub.admin_kubeconfig(), name, extra)
    }

    pub fn start_with_kubeconfig(kubeconfig: &str, name: &str, extra: &[&str]) -> Flotilla {
        let dir = scratch_dir(&format!("flotilla-{name}"));
        let path = dir.join("hub.kubeconfig");
        std::fs::write(&path, kubeconfig).unwrap();
        let mut args: Vec<String> = [
            "run",
            "--namespace",
            FLOTILLA_NAMESPACE,
            "--stale-after",
            "8s",
            // Short enough that a standby takes over within a test's patience, long enough
            // that a leader whose renewal is slowed by a loaded API server keeps the lease.
            "--lease-duration",
            "10s",
            "--lease-grace",
            "6s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--log-level") {
            args.extend(["--log-level".to_string(), "info,flotilla=debug".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let host = Host::claim(&[HTTP_PORT]);
        let mut f = Flotilla { name: name.into(), host, dir, args, child: None, kubeconfig: path };
        f.restart();
        f
    }

    /// Starts the process again (same flags, same address).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "flotilla {} is running", self.name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        cmd.args(&self.args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--http-addr")
            .arg(self.http_addr().to_string())
            .arg("--replica-name")
            .arg(&self.name);
        let log = self.dir.join(format!("flotilla-{}.log", super::now_millis()));
        std::fs::write(self.dir.join("current-log"), log.to_string_lossy().as_bytes()).unwrap();
        self.child = Some(spawn(cmd, &log));
        wait_for_listener(self.http_addr(), PATIENCE, || self.log_tail());
    }

    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.host.addr(HTTP_PORT)
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

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The most memory the running process has held so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let Some(child) = &self.child else { return 0 };
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Resident memory of the flotilla process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.child.as_ref().map(|c| super::rss_of(c.id())).unwrap_or(0)
    }

    /// GET on the HTTP port: (status code, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(self.http_addr()).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response).to_string();
        let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
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
