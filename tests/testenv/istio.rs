//! Istio's own tools as judges of what flotilla writes: `istioctl validate` and `analyze`, our
//! `flotilla-analyze` (every Istio analyzer over files, Kubernetes kinds included), istiod
//! (`pilot-discovery`) run out of cluster against a test member, and `flotilla-xds`, a fake
//! sidecar that prints what istiod sends it. All come from `scripts/istio-install`; a test that
//! needs them and cannot find them fails with that command.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use flotilla::ingest::InputObject;
use serde_json::{Value, json};

use super::net::Host;
use super::{PATIENCE, TestCluster, scratch_dir, spawn, wait_for_listener};

const INSTALL_HINT: &str = "build them with: scripts/istio-install (or set FLOTILLA_ISTIO_ASSETS)";

pub fn assets() -> PathBuf {
    let dir = std::env::var_os("FLOTILLA_ISTIO_ASSETS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/flotilla/istio/current")
    });
    for tool in ["istioctl", "pilot-discovery", "flotilla-analyze", "flotilla-xds"] {
        assert!(
            dir.join(tool).exists(),
            "Istio tools incomplete: {} is missing; {INSTALL_HINT}",
            dir.join(tool).display()
        );
    }
    dir
}

/// `istioctl validate -f FILE`: Istio's own validation of every object (istiod's webhook code).
pub fn validate(file: &Path) -> Result<(), String> {
    let out =
        Command::new(assets().join("istioctl")).arg("validate").arg("-f").arg(file).output().expect("running istioctl");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// One message of an Istio analyzer.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Finding {
    pub code: String,
    pub level: String,
    pub resource: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}: {}", self.level, self.code, self.resource, self.message)
    }
}

/// Every Istio analyzer over `files` together (`flotilla-analyze`).
pub fn analyze(files: &[&Path]) -> Vec<Finding> {
    let out = Command::new(assets().join("flotilla-analyze")).args(files).output().expect("running flotilla-analyze");
    assert!(out.status.success(), "flotilla-analyze failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("flotilla-analyze printed {l:?}: {e}")))
        .collect()
}

/// What a member runs, as the analyzers need to see it beside flotilla's objects: its
/// Deployments, Services and Nodes, a Pod per Deployment (with its sidecar, as injection would
/// give it), and every Namespace they and flotilla's objects use, with injection on.
pub fn member_inputs(objects: &[&InputObject], extra_namespaces: &[&str]) -> String {
    let mut docs: Vec<Value> = Vec::new();
    let mut namespaces: BTreeSet<String> = extra_namespaces.iter().map(|s| s.to_string()).collect();
    namespaces.insert("istio-system".into());
    // A workload's Pod, with the sidecar injection would give it.
    let pod = |meta: &kube::api::ObjectMeta, template: Option<&kube::api::ObjectMeta>| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("{}-0", meta.name.as_deref().unwrap_or_default()),
                "namespace": meta.namespace,
                "labels": template.and_then(|t| t.labels.clone()),
                "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"},
            },
            "spec": {"containers": [
                {"name": "app", "image": "example.com/app:1"},
                {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.30.3"},
            ]},
        })
    };
    for obj in objects {
        if let Some(ns) = &obj.meta().namespace {
            namespaces.insert(ns.clone());
        }
        match obj {
            InputObject::Deployment(d) => {
                docs.push(serde_json::to_value(d).unwrap());
                docs.push(pod(&d.metadata, d.spec.as_ref().and_then(|s| s.template.metadata.as_ref())));
            }
            InputObject::Rollout(r) => {
                docs.push(pod(&r.metadata, r.spec.template.as_ref().and_then(|t| t.metadata.as_ref())))
            }
            // A Job's Pod while it runs; a CronJob's while one of its Jobs does (between runs, a
            // live `istioctl analyze` finds no workload for the client's Sidecar, rightly).
            InputObject::Job(j) => {
                docs.push(pod(&j.metadata, j.spec.as_ref().and_then(|s| s.template.metadata.as_ref())))
            }
            InputObject::CronJob(c) => {
                let template = c.spec.as_ref().and_then(|s| s.job_template.spec.as_ref());
                docs.push(pod(&c.metadata, template.and_then(|s| s.template.metadata.as_ref())))
            }
            InputObject::Service(s) => docs.push(serde_json::to_value(s).unwrap()),
            InputObject::Node(n) => docs.push(serde_json::to_value(n).unwrap()),
            _ => {}
        }
    }
    for ns in namespaces {
        docs.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"istio-injection": "enabled"}}}));
    }
    docs.iter().map(|d| format!("---\n{}", flotilla::yaml::to_yaml(d))).collect()
}

/// istiod, out of cluster, against one test member: read-only (no CA, no webhooks, no address
/// allocation, no gateway controllers), every listener on an address of its own.
pub struct Istiod {
    pub host: Host,
    dir: PathBuf,
    child: Option<Child>,
}

pub const ISTIOD_HTTP: u16 = 8080;
pub const ISTIOD_GRPC: u16 = 15010;
pub const ISTIOD_MONITORING: u16 = 15014;

impl Istiod {
    pub async fn start(member: &TestCluster) -> Istiod {
        let host = Host::claim(&[ISTIOD_HTTP, ISTIOD_GRPC, 15012, ISTIOD_MONITORING, 15017, 9876]);
        let dir = scratch_dir(&format!("istiod-{}", member.name));
        std::fs::write(dir.join("kubeconfig"), member.admin_kubeconfig()).unwrap();
        std::fs::write(dir.join("mesh.yaml"), "ingressControllerMode: \"OFF\"\n").unwrap();
        let ip = host.ip;
        let mut cmd = Command::new(assets().join("pilot-discovery"));
        cmd.env_clear()
            .env("POD_NAMESPACE", "istio-system")
            .env("INJECT_ENABLED", "false")
            .env("INJECTION_WEBHOOK_CONFIG_NAME", "")
            .env("VALIDATION_WEBHOOK_CONFIG_NAME", "")
            .env("ENABLE_CA_SERVER", "false")
            .env("PILOT_CERT_PROVIDER", "none")
            .env("PILOT_ENABLE_IP_AUTOALLOCATE", "false")
            .env("PILOT_ENABLE_GATEWAY_API", "false")
            .arg("discovery")
            .arg("--kubeconfig")
            .arg(dir.join("kubeconfig"))
            .arg(format!("--httpAddr={ip}:{ISTIOD_HTTP}"))
            .arg(format!("--grpcAddr={ip}:{ISTIOD_GRPC}"))
            .arg(format!("--secureGRPCAddr={ip}:15012"))
            .arg(format!("--monitoringAddr={ip}:{ISTIOD_MONITORING}"))
            .arg(format!("--httpsAddr={ip}:15017"))
            .arg(format!("--ctrlz_address={ip}"))
            .arg("--ctrlz_port=9876")
            .arg("--meshConfig")
            .arg(dir.join("mesh.yaml"))
            .arg("--networksConfig=/nonexistent")
            .arg(format!("--clusterID={}", member.name));
        let child = spawn(cmd, &dir.join("istiod.log"));
        let istiod = Istiod { host, dir, child: Some(child) };
        wait_for_listener(istiod.host.addr(ISTIOD_HTTP), PATIENCE, || istiod.log_tail());
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while istiod.get(ISTIOD_HTTP, "/ready").await.0 != 200 {
            assert!(tokio::time::Instant::now() < deadline, "istiod not ready:\n{}", istiod.log_tail());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        istiod
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("istiod.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub async fn get(&self, port: u16, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(self.host.addr(port)).await else {
            return (0, String::new());
        };
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response).to_string();
        let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, dechunk(&body))
    }

    /// (kind, namespace/name) of every config object istiod loaded.
    pub async fn configz(&self) -> BTreeSet<(String, String)> {
        let (_, body) = self.get(ISTIOD_HTTP, "/debug/configz").await;
        let configs: Vec<Value> = serde_json::from_str(&body).unwrap_or_else(|e| panic!("configz: {e}: {body}"));
        configs
            .iter()
            .map(|c| {
                let kind = c["kind"].as_str().unwrap_or_default().to_string();
                let name = format!(
                    "{}/{}",
                    c["metadata"]["namespace"].as_str().unwrap_or_default(),
                    c["metadata"]["name"].as_str().unwrap_or_default()
                );
                (kind, name)
            })
            .collect()
    }

    /// Samples of istiod's metrics whose names start with `prefix`, summed by name.
    pub async fn metrics(&self, prefix: &str) -> BTreeMap<String, f64> {
        let (_, body) = self.get(ISTIOD_MONITORING, "/metrics").await;
        let mut out = BTreeMap::new();
        for line in body.lines().filter(|l| l.starts_with(prefix)) {
            let name = line.split(['{', ' ']).next().unwrap_or_default().to_string();
            let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            *out.entry(name).or_default() += value;
        }
        out
    }

    /// The flags that make `flotilla-xds` the Pod `namespace/pod` with address `ip` and labels,
    /// in `locality` (`region/zone`, as its node's labels would give it).
    fn proxy_args(&self, namespace: &str, pod: &str, ip: &str, labels: &[(&str, &str)], locality: &str) -> Vec<String> {
        let addr = self.host.addr(ISTIOD_GRPC).to_string();
        let mut args: Vec<String> = ["--addr", &addr, "--namespace", namespace, "--pod", pod, "--ip", ip]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (k, v) in labels {
            args.extend(["--label".to_string(), format!("{k}={v}")]);
        }
        args.extend(["--locality".to_string(), locality.to_string()]);
        args
    }

    /// `flotilla-xds` as the Pod `namespace/pod` with address `ip` and labels: one full sync.
    pub fn xds(&self, namespace: &str, pod: &str, ip: &str, labels: &[(&str, &str)], locality: &str) -> Value {
        let out = Command::new(assets().join("flotilla-xds"))
            .args(self.proxy_args(namespace, pod, ip, labels, locality))
            .args(["--timeout", "60s"])
            .output()
            .expect("running flotilla-xds");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "flotilla-xds failed: {stderr}\n{}", self.log_tail());
        serde_json::from_slice(&out.stdout).expect("flotilla-xds prints JSON")
    }

    /// `flotilla-xds --watch` as a child process, printing one JSON line per push.
    pub fn watch(
        &self,
        namespace: &str,
        pod: &str,
        ip: &str,
        labels: &[(&str, &str)],
        locality: &str,
        log: &Path,
    ) -> Child {
        let mut cmd = Command::new(assets().join("flotilla-xds"));
        cmd.args(self.proxy_args(namespace, pod, ip, labels, locality)).args(["--watch", "--timeout", "60s"]);
        spawn(cmd, log)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// istiod's debug endpoints answer with chunked encoding.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, tail)) = rest.split_once("\r\n") else { return body.to_string() };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { return body.to_string() };
        if n == 0 {
            return out;
        }
        if tail.len() < n {
            return body.to_string();
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
    }
}
