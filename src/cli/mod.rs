//! Command line: flags (each also settable by environment variable), turned into validated
//! `Settings`, and the subcommands of SPEC §8. Each command has its own file, its arguments and
//! its handler together; what several share (how to reach the hub, the engine's flags, output
//! helpers) is here.

mod diff;
mod explain;
mod preflight;
mod register;
mod render;
mod run;
mod snapshot;
mod status;
mod synth;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::settings::{
    AdoptFrom, ExportTo, ExposePorts, Ipv4Cidr, LabelTerm, SanForm, Settings, SidecarMode, Tenancy, VipMode,
};

pub use diff::DiffArgs;
pub use explain::ExplainArgs;
pub use preflight::PreflightArgs;
pub use register::RegisterArgs;
pub use render::RenderArgs;
pub use run::{HttpAuth, LogFormat, RunArgs};
pub use snapshot::SnapshotArgs;
pub use status::StatusArgs;
pub use synth::SynthArgs;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Federates Istio service meshes across Kubernetes clusters (Admiral-compatible)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the controller: watch the fleet, write each member's Istio config, report status.
    Run(RunArgs),
    /// Print the registration Secret for a member (like `istioctl create-remote-secret`): a
    /// kubeconfig with a bound, expiring token of the member chart's ServiceAccount.
    RegisterCluster(RegisterArgs),
    /// Print, offline, the exact objects `run` would write per cluster, from manifests on disk.
    Render(RenderArgs),
    /// Write the live fleet's inputs (what the engine reads, nothing else) as a fleet directory
    /// for render, diff and explain; members that cannot be read are marked, not dropped.
    Snapshot(SnapshotArgs),
    /// What a change of the fleet's inputs does to every member: the objects created, changed
    /// and pruned, and the policies whose verdict changes. Exit 0: no change, 3: changes, 1: error.
    Diff(DiffArgs),
    /// Why a host's objects exist where they do: where its identity runs, which Dependency
    /// brought it to each member, which policies won and over which.
    Explain(ExplainArgs),
    /// Check, for every registered member, that its credentials allow everything flotilla does
    /// there and that the sync namespace exists; print what is missing. Exit 0: all pass.
    Preflight(PreflightArgs),
    /// A running flotilla's view of the fleet as tables, from its debug API: each member's state,
    /// and with --dry-run what it would create, update, adopt and prune.
    Status(StatusArgs),
    /// Print the CustomResourceDefinitions flotilla serves (the content of crds/).
    Crds,
    /// Write a deterministic synthetic fleet directory, for scale runs of `render`.
    Synth(SynthArgs),
    /// Print version and build information.
    Version,
}

/// How to reach the hub and find the members, shared by `run` and `snapshot`.
#[derive(Debug, Args)]
pub struct HubArgs {
    /// Kubeconfig of the hub (default: in-cluster config, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "FLOTILLA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Context of --kubeconfig to use (default: its current context).
    #[arg(long, env = "FLOTILLA_CONTEXT")]
    pub context: Option<String>,
    /// flotilla's own namespace in the hub: lease, VIP store, default Secret namespace
    /// (default: the pod's namespace, else the kubeconfig context's).
    #[arg(long, env = "FLOTILLA_NAMESPACE")]
    pub namespace: Option<String>,
    /// Namespace of the registration Secrets (default: --namespace).
    #[arg(long, env = "FLOTILLA_SECRET_NAMESPACE")]
    pub secret_namespace: Option<String>,
    /// Label (key=value) that marks a registration Secret; repeatable, any of them matches.
    #[arg(long = "cluster-secret-selector", env = "FLOTILLA_CLUSTER_SECRET_SELECTOR", value_delimiter = ',', default_values_t = [
        LabelTerm { key: "admiral/sync".into(), value: "true".into() },
        LabelTerm { key: "istio/multiCluster".into(), value: "true".into() },
    ])]
    pub cluster_secret_selectors: Vec<LabelTerm>,
    /// Accept kubeconfigs with exec/auth-provider plugins or local file references.
    #[arg(long, env = "FLOTILLA_ALLOW_KUBECONFIG_EXEC")]
    pub allow_kubeconfig_exec: bool,
    /// Accept kubeconfigs that set insecure-skip-tls-verify (the member's certificate is then
    /// not checked).
    #[arg(long, env = "FLOTILLA_ALLOW_INSECURE_SKIP_TLS_VERIFY")]
    pub allow_insecure_skip_tls_verify: bool,
    /// Accept kubeconfigs whose server is http:// (the member's token then travels in clear).
    #[arg(long, env = "FLOTILLA_ALLOW_INSECURE_HTTP")]
    pub allow_insecure_http: bool,
    /// ConfigMap in --namespace that stores the VIP of every host.
    #[arg(long, default_value = "flotilla-vips", env = "FLOTILLA_VIP_CONFIGMAP")]
    pub vip_configmap: String,
}

/// The blast-radius guard's limits: `run` holds prunes past them, `diff` shows what it would hold.
#[derive(Debug, Args)]
pub struct GuardArgs {
    /// Blast-radius guard: a member's prunes are held when more than this many would go within
    /// `--prune-hold-window` and more than `--prune-hold-share` of its managed objects; the rest
    /// is written. Released by the hold's id (annotation `flotilla.io/release-prunes` on the
    /// registration Secret) or when the cause is fixed. 0 turns it off.
    #[arg(long, default_value_t = 100, env = "FLOTILLA_PRUNE_HOLD_THRESHOLD")]
    pub prune_hold_threshold: usize,
    #[arg(long, default_value_t = 0.25, value_parser = parse_share, env = "FLOTILLA_PRUNE_HOLD_SHARE")]
    pub prune_hold_share: f64,
    #[arg(long, default_value = "10m", value_parser = parse_duration, env = "FLOTILLA_PRUNE_HOLD_WINDOW")]
    pub prune_hold_window: Duration,
}

impl GuardArgs {
    pub fn limits(&self) -> crate::controller::guard::Limits {
        crate::controller::guard::Limits {
            threshold: self.prune_hold_threshold,
            share: self.prune_hold_share,
            window: self.prune_hold_window,
        }
    }
}

/// A share between 0 and 1.
fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share between 0 and 1 (e.g. 0.25)")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
}

/// The longest duration any flag takes: beyond it, a typo (`--debounce 5000000`) rather than an
/// intention, and deadlines computed from it could overflow the clock.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// `500ms`, `15s`, `2m`, `1h`, or plain seconds; at most a week.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 15s, 2m)"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    match Duration::try_from_secs_f64(seconds) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(format!("{s:?} is longer than the longest allowed ({}h)", MAX_DURATION.as_secs() / 3600)),
    }
}

/// The flags that shape computed objects; shared by `run` and `render`.
#[derive(Debug, Args, Clone)]
pub struct EngineArgs {
    /// Namespace in every member where ServiceEntries and DestinationRules are written.
    #[arg(long, default_value = "admiral-sync", env = "FLOTILLA_SYNC_NAMESPACE")]
    pub sync_namespace: String,
    /// Pod-template label (or annotation) that carries a workload's identity.
    #[arg(long, default_value = "identity", env = "FLOTILLA_IDENTITY_LABEL")]
    pub identity_label: String,
    /// Label that carries a GlobalTrafficPolicy's, OutlierDetection's or ClientConnectionConfig's
    /// identity (Admiral's `--admiral_crd_identity_label`); default: `--identity-label`.
    #[arg(long, env = "FLOTILLA_POLICY_IDENTITY_LABEL")]
    pub policy_identity_label: Option<String>,
    /// Pod-template annotation (else label, then label `env`) that carries a workload's env, and
    /// a policy's (Admiral's `--env_key`).
    #[arg(long, default_value = crate::meta::ANNOTATION_ENV, env = "FLOTILLA_ENV_KEY")]
    pub env_key: String,
    /// Another suffix every host is also known by: an alias VirtualService `<env>.<identity>.<suffix>`
    /// routes to `<env>.<identity>.<--hostname-suffix>` where the host is written (Admiral's
    /// `--additional_endpoint_suffixes`). Repeatable.
    #[arg(long = "additional-endpoint-suffix", env = "FLOTILLA_ADDITIONAL_ENDPOINT_SUFFIX", value_delimiter = ',')]
    pub additional_endpoint_suffixes: Vec<String>,
    /// Label key of a Deployment or Rollout that asks for aliases of its hosts and of its
    /// destinations' hosts; `*`: every workload (Admiral's `--additional_endpoint_label_filters`).
    /// Repeatable.
    #[arg(long = "additional-endpoint-label", env = "FLOTILLA_ADDITIONAL_ENDPOINT_LABEL", value_delimiter = ',')]
    pub additional_endpoint_labels: Vec<String>,
    /// Last label of every generated host name: `<env>.<identity>.<suffix>`.
    #[arg(long, default_value = "global", env = "FLOTILLA_HOSTNAME_SUFFIX")]
    pub hostname_suffix: String,
    #[arg(long, value_enum, default_value = "primary", env = "FLOTILLA_EXPOSE_PORTS")]
    pub expose_ports: ExposePorts,
    /// Port number of the mesh port on generated hosts (with --expose-ports=primary).
    #[arg(long, default_value_t = 80, env = "FLOTILLA_GLOBAL_PORT")]
    pub global_port: u16,
    /// Port of the east-west gateway that remote endpoints go through.
    #[arg(long, default_value_t = 15443, env = "FLOTILLA_GATEWAY_PORT")]
    pub gateway_port: u16,
    /// Label (key=value) of the gateway Service in istio-system; repeatable, tried in order.
    #[arg(long = "gateway-selector", env = "FLOTILLA_GATEWAY_SELECTOR", value_delimiter = ',', default_values_t = [
        LabelTerm { key: "istio".into(), value: "eastwestgateway".into() },
        LabelTerm { key: "app".into(), value: "istio-ingressgateway".into() },
    ])]
    pub gateway_selectors: Vec<LabelTerm>,
    #[arg(long, value_enum, default_value = "allocate", env = "FLOTILLA_VIP_MODE")]
    pub vip_mode: VipMode,
    /// Block the stable per-host VIPs are allocated from.
    #[arg(long, default_value = "240.0.0.0/16", env = "FLOTILLA_VIP_CIDR")]
    pub vip_cidr: Ipv4Cidr,
    #[arg(long, value_enum, default_value = "all", env = "FLOTILLA_EXPORT_TO")]
    pub export_to: ExportTo,
    #[arg(long, value_enum, default_value = "generate", env = "FLOTILLA_SIDECAR_MODE")]
    pub sidecar_mode: SidecarMode,
    /// Slow start for new endpoints (`warmupDurationSecs` of every DestinationRule), as Admiral
    /// writes it; 0 leaves it out.
    #[arg(long, default_value = "45s", value_parser = parse_duration, env = "FLOTILLA_WARMUP_DURATION")]
    pub warmup_duration: Duration,
    /// This installation's name, in the `flotilla.io/instance` label of everything it writes;
    /// it updates and prunes only objects with its own instance (or none, from before instances).
    #[arg(long, default_value = crate::meta::DEFAULT_INSTANCE, env = "FLOTILLA_INSTANCE")]
    pub instance: String,
    /// Take over, in place, objects another controller created under the names flotilla writes
    /// (`admiral`: annotated `app.kubernetes.io/created-by: admiral`): one apply, no delete. Its
    /// objects flotilla does not write are listed, never touched.
    #[arg(long, value_enum, env = "FLOTILLA_ADOPT_FROM")]
    pub adopt_from: Option<AdoptFrom>,
    /// Admiral's address store in the hub, `<namespace>/<name>` (its `se-address-configmap`):
    /// a host flotilla has no address for yet takes Admiral's, so clients keep resolving it.
    /// `render` reads the ConfigMap of that name from the fleet directory's `_hub/`.
    #[arg(long, value_parser = parse_namespaced_name, env = "FLOTILLA_IMPORT_VIPS_FROM")]
    pub import_vips_from: Option<(String, String)>,
    /// Who may speak for an identity: `open` accepts every claim (Admiral's behaviour; decoys of
    /// identities a Namespace names are reported), `owned` only claims from namespaces whose
    /// `flotilla.io/identities` annotation allows the identity (docs/security.md).
    #[arg(long, value_enum, default_value = "open", env = "FLOTILLA_TENANCY")]
    pub tenancy: Tenancy,
    /// Hub namespace whose Dependencies the platform team owns: under `--tenancy=owned` they may
    /// name any source. Repeatable.
    #[arg(long = "dependency-namespace", env = "FLOTILLA_DEPENDENCY_NAMESPACE", value_delimiter = ',', default_values_t = ["admiral".to_string()])]
    pub dependency_namespaces: Vec<String>,
    /// What every ServiceEntry pins its endpoints' certificates to: `workload` (the SPIFFE ids
    /// of the workloads serving the host), `identity` (`spiffe://<--san-prefix>/<identity>`,
    /// Admiral's `--enable_san`), or `off`.
    #[arg(long, value_enum, default_value = "workload", env = "FLOTILLA_SUBJECT_ALT_NAMES")]
    pub subject_alt_names: SanForm,
    /// SPIFFE trust domain of the members' workload certificates (a member's registration may
    /// name its own: annotation `flotilla.io/trust-domain`).
    #[arg(long, default_value = "cluster.local", env = "FLOTILLA_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Admiral's `--san_prefix`, for `--subject-alt-names=identity`.
    #[arg(long, default_value = "", env = "FLOTILLA_SAN_PREFIX")]
    pub san_prefix: String,
}

/// `<namespace>/<name>`, both DNS names.
fn parse_namespaced_name(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if crate::meta::is_dns_label(ns) && crate::meta::is_dns_subdomain(name) => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("{s:?} is not <namespace>/<name>")),
    }
}

impl EngineArgs {
    /// Validates the flags into settings; the message names the flag.
    pub fn settings(&self) -> Result<Settings, String> {
        use crate::meta::{is_dns_label, is_dns_subdomain};
        if !is_dns_label(&self.sync_namespace) {
            return Err(format!("--sync-namespace {:?} is not a valid namespace name", self.sync_namespace));
        }
        if !is_dns_subdomain(&self.hostname_suffix) {
            return Err(format!("--hostname-suffix {:?} is not a DNS name", self.hostname_suffix));
        }
        let policy_identity = self.policy_identity_label.as_ref().unwrap_or(&self.identity_label);
        for (flag, key) in [
            ("--identity-label", &self.identity_label),
            ("--policy-identity-label", policy_identity),
            ("--env-key", &self.env_key),
        ] {
            if !crate::meta::is_label_key(key) {
                return Err(format!("{flag} {key:?} is not a label key ([prefix/]name)"));
            }
        }
        for suffix in &self.additional_endpoint_suffixes {
            if !is_dns_subdomain(suffix) || suffix.eq_ignore_ascii_case(&self.hostname_suffix) {
                return Err(format!(
                    "--additional-endpoint-suffix {suffix:?} is not a DNS name other than --hostname-suffix"
                ));
            }
        }
        if let Some(key) = self.additional_endpoint_labels.iter().find(|k| *k != "*" && !crate::meta::is_label_key(k)) {
            return Err(format!("--additional-endpoint-label {key:?} is not a label key (or *)"));
        }
        if self.gateway_selectors.is_empty() {
            return Err("--gateway-selector needs at least one key=value".into());
        }
        if !is_dns_label(&self.instance) {
            return Err(format!("--instance {:?} is not a DNS label (it is a label value)", self.instance));
        }
        if let Some(ns) = self.dependency_namespaces.iter().find(|ns| !is_dns_label(ns)) {
            return Err(format!("--dependency-namespace {ns:?} is not a valid namespace name"));
        }
        if !crate::meta::is_trust_domain(&self.trust_domain) {
            return Err(format!(
                "--trust-domain {:?} is not a SPIFFE trust domain (lower-case letters, digits, '.', '-', '_')",
                self.trust_domain
            ));
        }
        if self.subject_alt_names == SanForm::Identity && self.san_prefix.trim_matches('/').is_empty() {
            return Err("--subject-alt-names=identity needs --san-prefix (Admiral's --san_prefix)".into());
        }
        Ok(Settings {
            sync_namespace: self.sync_namespace.clone(),
            keys: crate::settings::Keys {
                identity: self.identity_label.clone(),
                policy_identity: policy_identity.clone(),
                env: self.env_key.clone(),
                alias_labels: self.additional_endpoint_labels.clone(),
            },
            alias_suffixes: self.additional_endpoint_suffixes.iter().map(|s| s.to_ascii_lowercase()).collect(),
            hostname_suffix: self.hostname_suffix.to_ascii_lowercase(),
            expose_ports: self.expose_ports,
            global_port: self.global_port,
            gateway_port: self.gateway_port,
            gateway_selectors: self.gateway_selectors.clone(),
            vip_mode: self.vip_mode,
            vip_cidr: self.vip_cidr,
            export_to: self.export_to,
            sidecar_mode: self.sidecar_mode,
            warmup_seconds: u32::try_from(self.warmup_duration.as_secs()).unwrap_or(u32::MAX),
            instance: self.instance.clone(),
            adopt_from: self.adopt_from,
            import_vips_from: self.import_vips_from.clone(),
            tenancy: self.tenancy,
            dependency_namespaces: self.dependency_namespaces.clone(),
            san_form: self.subject_alt_names,
            trust_domain: self.trust_domain.clone(),
            san_prefix: self.san_prefix.trim_matches('/').to_string(),
        })
    }
}

/// Runs one parsed command line; returns the process exit code.
pub fn execute(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Crds => {
            print!("{}", crate::crd::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("flotilla {}", env!("CARGO_PKG_VERSION"));
            println!(
                "kubernetes api: v1.33+ (k8s-openapi v1_33), istio api: networking.istio.io/v1, admiral api: admiral.io/v1alpha1"
            );
            println!(
                "target: {}-{}, profile: {}",
                std::env::consts::ARCH,
                std::env::consts::OS,
                if cfg!(debug_assertions) { "debug" } else { "release" }
            );
            ExitCode::SUCCESS
        }
        Command::Run(args) => run::run(args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Diff(args) => diff::diff(args),
        Command::Explain(args) => explain::explain(args),
        Command::Preflight(args) => preflight::preflight(args),
        Command::Status(args) => status::status(args),
        Command::RegisterCluster(args) => register::register(args),
        Command::Render(args) => render::render(args),
        Command::Synth(args) => synth::synth(args),
    }
}

impl HubArgs {
    /// A client of the hub, and flotilla's namespace there.
    pub(crate) async fn connect(&self) -> anyhow::Result<(kube::Client, String)> {
        use anyhow::Context;
        let mut config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("--kubeconfig {}", path.display()))?;
                let opts = kube::config::KubeConfigOptions { context: self.context.clone(), ..Default::default() };
                kube::Config::from_custom_kubeconfig(kc, &opts).await.context("hub kubeconfig")?
            }
            None => kube::Config::infer().await.context("hub config (in-cluster or kubeconfig)")?,
        };
        let namespace = self
            .namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| config.default_namespace.clone());
        crate::controller::deadline::apply(&mut config);
        Ok((kube::Client::try_from(config).context("hub client")?, namespace))
    }

    fn kubeconfig_trust(&self) -> crate::controller::registry::KubeconfigTrust {
        crate::controller::registry::KubeconfigTrust {
            allow_exec: self.allow_kubeconfig_exec,
            allow_insecure_skip_tls_verify: self.allow_insecure_skip_tls_verify,
            allow_insecure_http: self.allow_insecure_http,
        }
    }

    fn secret_namespace(&self, namespace: &str) -> String {
        self.secret_namespace.clone().unwrap_or_else(|| namespace.to_string())
    }
}

impl HubArgs {
    fn snapshot_options(&self, namespace: String, settings: &Settings) -> crate::snapshot::SnapshotOptions {
        crate::snapshot::SnapshotOptions {
            secret_namespace: self.secret_namespace(&namespace),
            namespace,
            secret_selectors: self.cluster_secret_selectors.clone(),
            kubeconfig_trust: self.kubeconfig_trust(),
            sync_namespace: settings.sync_namespace.clone(),
            keys: settings.keys.clone(),
            vip_configmap: self.vip_configmap.clone(),
            instance: settings.instance.clone(),
            adopt_admiral: settings.owner().adopt_admiral,
            import_vips_from: settings.import_vips_from.clone(),
        }
    }

    /// A snapshot of the live fleet in a temporary directory, and what flotilla owns there now.
    fn live(&self, settings: &Settings) -> Result<(tempdir::TempDir, crate::snapshot::Owned), String> {
        on_hub(self, settings, async |hub, opts| {
            let dir = tempdir::TempDir::new()?;
            let report = crate::snapshot::snapshot(&hub, &opts, dir.path()).await?;
            for (id, why) in &report.unreachable {
                eprintln!("error: cluster {id}: unreachable: {why}");
            }
            let owned = crate::snapshot::owned(&hub, &opts).await?;
            Ok((dir, owned))
        })
    }
}

/// Runs `work` with a client of the hub and what `snapshot` needs to read the fleet through it, on
/// a one-thread runtime (the commands that read the live fleet once).
fn on_hub<T>(
    hub: &HubArgs,
    settings: &Settings,
    work: impl AsyncFnOnce(kube::Client, crate::snapshot::SnapshotOptions) -> anyhow::Result<T>,
) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    let done = runtime.block_on(async {
        let (client, namespace) = hub.connect().await?;
        work(client, hub.snapshot_options(namespace, settings)).await
    });
    done.map_err(|e| format!("{e:#}"))
}

/// A scratch directory removed when dropped.
mod tempdir {
    pub struct TempDir(std::path::PathBuf);
    impl TempDir {
        pub fn new() -> std::io::Result<TempDir> {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir().join(format!("flotilla-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            Ok(TempDir(dir))
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Loads and renders a fleet directory: the engine after its compute, and what it prints.
fn rendered(
    dir: &std::path::Path,
    settings: &Settings,
    vip_store: &str,
) -> Result<(crate::compute::Engine, crate::render::Rendered), String> {
    let progress = crate::progress::Progress::stderr("diff");
    progress.say(format_args!("reading {}", dir.display()));
    let loaded = crate::fleet_dir::load(dir).map_err(|e| e.to_string())?;
    progress.say(format_args!("computing {} members, {} objects", loaded.clusters.len(), loaded.objects.len()));
    let engine = crate::render::engine(&loaded, settings, vip_store);
    Ok((engine, crate::render::render(loaded, settings, vip_store)))
}

/// Writes to stdout, treating a closed pipe (`| head`) as success rather than a panic.
fn print_stdout(text: &str) -> Result<(), String> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("stdout: {e}")),
        _ => Ok(()),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("flotilla: {message}");
    ExitCode::FAILURE
}
