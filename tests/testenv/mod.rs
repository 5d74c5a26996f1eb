//! Real member clusters for end-to-end tests: one etcd and one kube-apiserver per member, each
//! member on a loopback address of its own (see `net`), with generated certificates, a service-account signing key, static-token
//! authentication and RBAC authorization; our CRDs and Istio's installed and established.
//!
//! The binaries come from `scripts/testenv-install` (built from the Go module proxy). A test that
//! needs them and cannot find them fails with the command that provides them: nothing skips.
//! Processes are killed when the `TestCluster` is dropped (also when a test panics), and, through
//! PR_SET_PDEATHSIG, when the test process dies without unwinding.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod builders;
pub mod controller;
pub mod fleet;
pub mod istio;
pub mod net;
pub mod oracle;
pub mod proxy;

use std::collections::BTreeMap;
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config};

/// Field manager the harness applies fixtures with (never `flotilla`).
pub const TEST_MANAGER: &str = "flotilla-testenv";
const INSTALL_HINT: &str = "build them with: scripts/testenv-install (or set FLOTILLA_TESTENV_ASSETS)";
/// How long a test waits for something that should happen soon (a write, a watch event, a
/// port). Only a failing test waits this long, so it is generous: on a loaded 2-core CI machine
/// the hypervisor can take more than half of the CPU, and every step slows down with it.
pub const PATIENCE: Duration = Duration::from_secs(60);
/// How long one kube-apiserver may take from spawn to `/readyz`, once it holds a start slot.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Start slots: how many kube-apiservers of this test process may boot at the same time.
///
/// Booting is the CPU-heavy part of a member's life (OpenAPI, RBAC bootstrap, CRD
/// establishment); a running member is nearly idle. The tests of one binary run in parallel
/// and each starts up to four members, so without a limit a 2-core machine boots a dozen at
/// once and etcd requests time out. One slot per core keeps every boot short; waiting for a
/// slot does not count against `READY_TIMEOUT`. `FLOTILLA_TESTENV_PARALLEL_BOOTS` overrides it.
fn boot_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let slots = std::env::var("FLOTILLA_TESTENV_PARALLEL_BOOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(cores);
        tokio::sync::Semaphore::new(slots.max(1))
    })
}

/// Where kube-apiserver, etcd and the Istio CRDs are.
#[derive(Clone, Debug)]
pub struct Assets {
    pub dir: PathBuf,
}

impl Assets {
    /// `$FLOTILLA_TESTENV_ASSETS`, else `~/.cache/flotilla/testenv/current`. Panics, naming the
    /// install command, when a binary is missing.
    pub fn locate() -> Assets {
        let dir = std::env::var_os("FLOTILLA_TESTENV_ASSETS").map(PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
            home.join(".cache/flotilla/testenv/current")
        });
        for file in ["kube-apiserver", "etcd", "istio-crds.yaml", "rollout-crd.yaml"] {
            let path = dir.join(file);
            assert!(path.exists(), "test environment incomplete: {} is missing; {INSTALL_HINT}", path.display());
        }
        Assets { dir }
    }

    pub fn istio_crds(&self) -> Vec<CustomResourceDefinition> {
        self.crds("istio-crds.yaml")
    }

    /// Argo Rollouts' Rollout CRD.
    pub fn rollout_crd(&self) -> Vec<CustomResourceDefinition> {
        self.crds("rollout-crd.yaml")
    }

    fn crds(&self, file: &str) -> Vec<CustomResourceDefinition> {
        let text = fs::read_to_string(self.dir.join(file)).unwrap_or_else(|e| panic!("reading {file}: {e}"));
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("parsing {file}: {e}"));
        docs.into_iter().filter(|d| !d.is_null()).map(|d| serde_json::from_value(d).expect("a CRD")).collect()
    }
}

/// One member cluster: its own etcd and kube-apiserver.
pub struct TestCluster {
    pub name: String,
    /// This member's own loopback address; its etcd and kube-apiserver listen on the fixed ports
    /// of `net` there, across restarts.
    pub host: net::Host,
    pub admin_token: String,
    pub ca_pem: String,
    dir: PathBuf,
    assets: Assets,
    etcd: Option<Child>,
    apiserver: Option<Child>,
}

/// Users the static token file knows, besides the admin: (token, user, groups).
pub const EXTRA_TOKENS: &[(&str, &str, &str)] =
    &[("flotilla-test-nobody", "nobody", ""), ("flotilla-test-rotated", "rotated", "system:masters")];

impl TestCluster {
    /// Starts etcd and kube-apiserver, waits for `/readyz`, installs the CRDs (flotilla's,
    /// Istio's and Argo's Rollout).
    pub async fn start(name: &str) -> TestCluster {
        Self::start_with(name, true).await
    }

    /// A member without Argo Rollouts' CRD, as many are.
    pub async fn start_without_rollouts(name: &str) -> TestCluster {
        Self::start_with(name, false).await
    }

    async fn start_with(name: &str, rollouts: bool) -> TestCluster {
        let assets = Assets::locate();
        let dir = scratch_dir(name);
        let host = net::Host::claim(&[net::ETCD_CLIENT_PORT, net::ETCD_PEER_PORT, net::APISERVER_PORT]);
        let ca = write_certificates(&dir, host.ip);
        let admin_token = format!("flotilla-test-admin-{name}");
        let mut tokens = format!("{admin_token},admin,admin,\"system:masters\"\n");
        for (token, user, groups) in EXTRA_TOKENS {
            tokens.push_str(&format!("{token},{user},{user},\"{groups}\"\n"));
        }
        fs::write(dir.join("tokens.csv"), tokens).unwrap();
        let mut cluster =
            TestCluster { name: name.into(), host, admin_token, ca_pem: ca, dir, assets, etcd: None, apiserver: None };
        // The slot covers etcd, the API server's boot and the CRDs being established.
        let slot = boot_slots().acquire().await.expect("the boot semaphore is never closed");
        cluster.start_etcd();
        cluster.boot_apiserver().await;
        cluster.install_crds(rollouts).await;
        drop(slot);
        cluster
    }

    /// Starts etcd on this member's address and waits until it accepts connections.
    fn start_etcd(&mut self) {
        let ip = self.host.ip;
        let (client, peer) = (net::ETCD_CLIENT_PORT, net::ETCD_PEER_PORT);
        let mut cmd = Command::new(self.assets.dir.join("etcd"));
        cmd.arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://{ip}:{client}"))
            .arg(format!("--advertise-client-urls=http://{ip}:{client}"))
            .arg(format!("--listen-peer-urls=http://{ip}:{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://{ip}:{peer}"))
            .arg(format!("--initial-cluster={}=http://{ip}:{peer}", self.name))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=error");
        let mut etcd = spawn(cmd, &self.dir.join("etcd.log"));
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(self.host.addr(client)).is_err() {
            if let Some(status) = etcd.try_wait().unwrap() {
                panic!("etcd of {} exited ({status}):\n{}", self.name, self.log_tail("etcd.log"));
            }
            if Instant::now() >= deadline {
                let _ = etcd.kill();
                panic!("etcd of {} not listening after {:?}:\n{}", self.name, PATIENCE, self.log_tail("etcd.log"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.etcd = Some(etcd);
    }

    /// Restarts kube-apiserver on the same address and port, with the same certificates and etcd.
    pub async fn start_apiserver(&mut self) {
        let _slot = boot_slots().acquire().await.expect("the boot semaphore is never closed");
        self.boot_apiserver().await;
    }

    /// Spawns kube-apiserver and waits for `/readyz`; the caller holds a boot slot.
    async fn boot_apiserver(&mut self) {
        assert!(self.apiserver.is_none(), "kube-apiserver of {} is already running", self.name);
        let ip = self.host.ip;
        let d = &self.dir;
        let mut cmd = Command::new(self.assets.dir.join("kube-apiserver"));
        cmd.arg(format!("--etcd-servers=http://{ip}:{}", net::ETCD_CLIENT_PORT))
            .arg(format!("--bind-address={ip}"))
            .arg(format!("--advertise-address={ip}"))
            .arg(format!("--secure-port={}", net::APISERVER_PORT))
            .arg(format!("--tls-cert-file={}", d.join("serving.crt").display()))
            .arg(format!("--tls-private-key-file={}", d.join("serving.key").display()))
            .arg(format!("--client-ca-file={}", d.join("ca.crt").display()))
            .arg(format!("--service-account-key-file={}", d.join("sa.pub").display()))
            .arg(format!("--service-account-signing-key-file={}", d.join("sa.key").display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--token-auth-file={}", d.join("tokens.csv").display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--enable-priority-and-fairness=false")
            // No controller runs here to mint service-account tokens: Pods (which the Istio
            // tests create for istiod and the analyzers) are admitted without them.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--profiling=false")
            .arg("--v=0");
        let log = format!("apiserver-{}.log", now_millis());
        self.apiserver = Some(spawn(cmd, &self.dir.join(&log)));
        let client = self.client().await;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                break;
            }
            if let Some(status) = self.apiserver.as_mut().unwrap().try_wait().unwrap() {
                panic!("kube-apiserver of {} exited ({status}):\n{}", self.name, self.log_tail(&log));
            }
            if Instant::now() >= deadline {
                // Which readiness checks still fail says more than the log does.
                let verbose = http::Request::get("/readyz?verbose").body(Vec::new()).unwrap();
                let checks = match client.request_text(verbose).await {
                    Ok(body) => body,
                    Err(e) => format!("GET /readyz?verbose: {e}"),
                };
                panic!(
                    "kube-apiserver of {} not ready in {}s.\nreadiness checks:\n{checks}\nlog tail:\n{}",
                    self.name,
                    READY_TIMEOUT.as_secs(),
                    self.log_tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills kube-apiserver (etcd keeps the data): the member now refuses connections.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP to kube-apiserver: it keeps its connections and answers nothing until `thaw`.
    pub fn freeze(&self) {
        if let Some(child) = &self.apiserver {
            unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
        }
    }

    pub fn thaw(&self) {
        if let Some(child) = &self.apiserver {
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        }
    }

    pub fn server_url(&self) -> String {
        format!("https://{}", self.api_addr())
    }

    /// Where kube-apiserver listens.
    pub fn api_addr(&self) -> SocketAddr {
        self.host.addr(net::APISERVER_PORT)
    }

    /// A kubeconfig for user `user` with bearer `token`, whose only context is the cluster name.
    pub fn kubeconfig_for(&self, user: &str, token: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {n}\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: {n}\n  context:\n    cluster: {n}\n    user: {user}\ncurrent-context: {n}\n",
            n = self.name,
            url = self.server_url(),
        )
    }

    pub fn admin_kubeconfig(&self) -> String {
        self.kubeconfig_for("admin", &self.admin_token)
    }

    /// A client with cluster-admin rights.
    pub async fn client(&self) -> Client {
        client_from_kubeconfig(&self.admin_kubeconfig()).await
    }

    /// The registration Secret for this member, in Istio's remote-secret format.
    pub fn registration_secret(&self, namespace: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(format!("flotilla-remote-{}", self.name)),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([("istio/multiCluster".to_string(), "true".to_string())])),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([(self.name.clone(), self.admin_kubeconfig())])),
            ..Default::default()
        }
    }

    /// Applies flotilla's CRDs and Istio's (and Argo's Rollout), and waits until all are Established.
    pub async fn install_crds(&self, rollouts: bool) {
        let client = self.client().await;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let mut crds = flotilla::crd::all_crds();
        crds.extend(self.assets.istio_crds());
        if rollouts {
            crds.extend(self.assets.rollout_crd());
        }
        let pp = PatchParams::apply(TEST_MANAGER).force();
        for crd in &crds {
            let name = crd.metadata.name.clone().unwrap();
            api.patch(&name, &pp, &Patch::Apply(crd)).await.unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        }
        for crd in &crds {
            let name = crd.metadata.name.clone().unwrap();
            let established = await_condition(api.clone(), &name, conditions::is_crd_established());
            tokio::time::timeout(PATIENCE, established)
                .await
                .unwrap_or_else(|_| panic!("CRD {name} not established in {}s", PATIENCE.as_secs()))
                .unwrap();
        }
    }

    pub fn log_tail(&self, file: &str) -> String {
        let text = fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Resident memory of this member's processes, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        [&self.etcd, &self.apiserver].iter().filter_map(|c| c.as_ref()).map(|c| rss_of(c.id())).sum()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Starts `n` members named `cluster-0` … in parallel.
pub async fn start_clusters(names: &[&str]) -> Vec<TestCluster> {
    futures::future::join_all(names.iter().map(|n| TestCluster::start(n))).await
}

pub async fn client_from_kubeconfig(kubeconfig: &str) -> Client {
    let kc = Kubeconfig::from_yaml(kubeconfig).expect("parsing a generated kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kubeconfig to config");
    Client::try_from(config).expect("building a client")
}

/// A new, empty per-cluster scratch directory; directories of dead test processes are removed.
pub fn scratch_dir(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join("flotilla-testenv");
    fs::create_dir_all(&root).unwrap();
    for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let dir = root.join(format!("{}-{name}-{}", std::process::id(), now_millis()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A CA, a serving certificate for the member's address signed by it, and a service-account key.
/// Returns the CA certificate (PEM).
fn write_certificates(dir: &Path, ip: std::net::Ipv4Addr) -> String {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "flotilla-testenv-ca");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate().unwrap();
    let mut serving = CertificateParams::new(vec![ip.to_string()]).unwrap();
    serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    let serving_cert = serving.signed_by(&serving_key, &issuer).unwrap();

    let sa_key = KeyPair::generate().unwrap();
    fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
    fs::write(dir.join("serving.crt"), serving_cert.pem()).unwrap();
    fs::write(dir.join("serving.key"), serving_key.serialize_pem()).unwrap();
    fs::write(dir.join("sa.key"), sa_key.serialize_pem()).unwrap();
    fs::write(dir.join("sa.pub"), sa_key.public_key_pem()).unwrap();
    ca_cert.pem()
}

/// Spawns a child that gets SIGKILL when the test process dies, logging to `log`.
pub fn spawn(mut cmd: Command, log: &Path) -> Child {
    let out = fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().unwrap_or_else(|e| panic!("starting {:?}: {e}; {INSTALL_HINT}", cmd.get_program()))
}

/// Waits until something accepts connections on `addr`.
pub fn wait_for_listener(addr: SocketAddr, timeout: Duration, log: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr} after {timeout:?}:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn now_millis() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

/// User + system CPU time a process has used so far, in seconds (/proc/<pid>/stat).
pub fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3: utime is 14, stime 15.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// The most memory a process has held (VmHWM), in KiB.
pub fn peak_rss_of(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn rss_of(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
