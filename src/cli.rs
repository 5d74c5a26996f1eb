//! Command line: flags (each also settable by environment variable), turned into validated
//! `Settings`, and the subcommands of SPEC §8.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::controller::tls::CertSource;
use crate::render::Format;
use crate::settings::{ExportTo, ExposePorts, Ipv4Cidr, LabelTerm, Settings, SidecarMode, VipMode};

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
    /// Print the CustomResourceDefinitions flotilla serves (the content of crds/).
    Crds,
    /// Write a deterministic synthetic fleet directory, for scale runs of `render`.
    Synth(SynthArgs),
    /// Print version and build information.
    Version,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// A directory with one sub-directory of manifests per member (named by cluster id), an
    /// optional `_hub/` and an optional `fleet.yaml` with per-cluster overrides.
    pub fleet_dir: PathBuf,
    #[arg(long, value_enum, default_value = "yaml", env = "FLOTILLA_FORMAT")]
    pub format: Format,
    /// Write one file per cluster into this directory instead of printing to stdout.
    #[arg(long, env = "FLOTILLA_OUT_DIR")]
    pub out_dir: Option<PathBuf>,
    /// Exit with code 2 when any error is reported (a broken file, an invalid policy).
    #[arg(long, env = "FLOTILLA_STRICT")]
    pub strict: bool,
    /// Name of the VIP store ConfigMap in `_hub/` (as `run --vip-configmap` keeps it in the hub):
    /// the addresses already allocated.
    #[arg(long, default_value = "flotilla-vips", env = "FLOTILLA_VIP_CONFIGMAP")]
    pub vip_configmap: String,
    #[command(flatten)]
    pub engine: EngineArgs,
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

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The fleet directory to write (created; an earlier snapshot there is replaced).
    pub out_dir: PathBuf,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// BEFORE and AFTER fleet directories; with --live, only AFTER.
    #[arg(required = true, num_args = 1..=2)]
    pub fleet_dirs: Vec<PathBuf>,
    /// Compare with what flotilla owns in the live members now (through the hub) instead of a
    /// BEFORE directory.
    #[arg(long)]
    pub live: bool,
    #[arg(long, value_enum, default_value = "text", env = "FLOTILLA_FORMAT")]
    pub format: ReportFormat,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A host flotilla writes, e.g. stage.greeting.global.
    pub host: String,
    /// The fleet directory (or --live).
    pub fleet_dir: Option<PathBuf>,
    /// Explain from a snapshot of the live fleet, taken now through the hub.
    #[arg(long)]
    pub live: bool,
    /// Only this member.
    #[arg(long)]
    pub cluster: Option<String>,
    #[arg(long, value_enum, default_value = "text", env = "FLOTILLA_FORMAT")]
    pub format: ReportFormat,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    /// A member whose watches fail this long is stale (kept as last seen, never pruned for it).
    #[arg(long, default_value = "60s", value_parser = parse_duration, env = "FLOTILLA_STALE_AFTER")]
    pub stale_after: Duration,
    /// Quiet time that groups a burst of events into one recompute and one write per object; a
    /// steady stream of events still gets a pass every --debounce-max.
    #[arg(long, default_value = "50ms", value_parser = parse_duration, env = "FLOTILLA_DEBOUNCE")]
    pub debounce: Duration,
    /// The longest a change waits for its pass while events keep arriving.
    #[arg(long, default_value = "1s", value_parser = parse_duration, env = "FLOTILLA_DEBOUNCE_MAX")]
    pub debounce_max: Duration,
    /// Plain HTTP address of the probes /livez and /readyz (and, with --http-auth=none, of
    /// /metrics and /debug too).
    #[arg(long, default_value = "0.0.0.0:8080", env = "FLOTILLA_HTTP_ADDR")]
    pub http_addr: SocketAddr,
    /// HTTPS address of /metrics and /debug.
    #[arg(long, default_value = "0.0.0.0:8443", env = "FLOTILLA_SECURE_ADDR")]
    pub secure_addr: SocketAddr,
    /// Who may read /metrics and /debug: `kubernetes` (a bearer token the hub's TokenReview
    /// accepts, whose user a SubjectAccessReview allows to `get` the path), or `none` (plain
    /// HTTP on --http-addr to anyone: for local runs only).
    #[arg(long, value_enum, default_value = "kubernetes", env = "FLOTILLA_HTTP_AUTH")]
    pub http_auth: HttpAuth,
    /// PEM certificate (chain) to serve on --secure-addr, re-read when it changes; without it a
    /// self-signed one is made at start.
    #[arg(long, requires = "tls_key_file", env = "FLOTILLA_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of --tls-cert-file.
    #[arg(long, requires = "tls_cert_file", env = "FLOTILLA_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Names (DNS or IP) of the self-signed certificate; repeatable.
    #[arg(long = "tls-san", value_delimiter = ',', default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()], env = "FLOTILLA_TLS_SAN")]
    pub tls_sans: Vec<String>,
    /// How long an authorisation decision is reused (a removed role stops working within it).
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "FLOTILLA_AUTH_CACHE_TTL")]
    pub auth_cache_ttl: Duration,
    /// Audiences a reader's bearer token must have been issued for, comma-separated (default:
    /// the hub API server's own, so a token minted for another service is refused).
    #[arg(long = "auth-audience", value_delimiter = ',', env = "FLOTILLA_AUTH_AUDIENCES")]
    pub auth_audiences: Vec<String>,
    /// Elect a leader through a Lease in --namespace; only the leader writes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "FLOTILLA_LEADER_ELECT")]
    pub leader_elect: bool,
    #[arg(long, default_value = "flotilla", env = "FLOTILLA_LEASE_NAME")]
    pub lease_name: String,
    /// A leader that stops renewing loses the lease after this long.
    #[arg(long, default_value = "15s", value_parser = parse_duration, env = "FLOTILLA_LEASE_DURATION")]
    pub lease_duration: Duration,
    /// How long before expiry the leader renews.
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "FLOTILLA_LEASE_GRACE")]
    pub lease_grace: Duration,
    /// This replica's name in the Lease (default: $POD_NAME, else the host name).
    #[arg(long, env = "FLOTILLA_REPLICA_NAME")]
    pub replica_name: Option<String>,
    /// Write requests in flight across all members.
    #[arg(long, default_value_t = 16, env = "FLOTILLA_MAX_CONCURRENT_WRITES")]
    pub max_concurrent_writes: usize,
    /// How long a host's VIP stays reserved after the last object carrying it is gone (clients
    /// may still resolve it); then the address is released for other hosts.
    #[arg(long, default_value = "168h", value_parser = parse_duration, env = "FLOTILLA_VIP_RELEASE_AFTER")]
    pub vip_release_after: Duration,
    /// Hosts per ConfigMap of the VIP store (the tests make it small to have many shards).
    #[arg(long, default_value_t = crate::compute::vip::SHARD_ENTRIES, hide = true)]
    pub vip_shard_entries: usize,
    #[arg(long, value_enum, default_value = "plain", env = "FLOTILLA_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// tracing filter, e.g. `info` or `flotilla=debug,kube=info`.
    #[arg(long, default_value = "info", env = "FLOTILLA_LOG_LEVEL")]
    pub log_level: String,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HttpAuth {
    Kubernetes,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
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

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Kubeconfig with a context for the member (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "FLOTILLA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The member's context (default: the current context).
    #[arg(long, env = "FLOTILLA_CONTEXT")]
    pub context: Option<String>,
    /// The member's cluster id (default: the context's name); a DNS-1123 label.
    #[arg(long)]
    pub name: Option<String>,
    /// ServiceAccount in the member whose token flotilla uses (the member chart's).
    #[arg(long, default_value = "flotilla-member")]
    pub service_account: String,
    #[arg(long, default_value = "flotilla-system")]
    pub service_account_namespace: String,
    /// Lifetime of the token; re-run before it ends (flotilla picks up the new Secret live).
    #[arg(long, default_value = "8760h", value_parser = parse_token_duration)]
    pub token_duration: Duration,
    /// Namespace of the Secret in the hub (flotilla's).
    #[arg(long, default_value = "flotilla")]
    pub secret_namespace: String,
    /// API server URL as the hub reaches it, when it differs from the kubeconfig's.
    #[arg(long)]
    pub server: Option<String>,
    /// Annotations on the Secret overriding discovery: the member's region, gateway address, gateway port.
    #[arg(long)]
    pub region: Option<String>,
    #[arg(long)]
    pub gateway_address: Option<String>,
    #[arg(long)]
    pub gateway_port: Option<u16>,
}

/// A token lifetime: `8760h`, `90m`, …, at most ten years (the API server caps it anyway).
fn parse_token_duration(s: &str) -> Result<Duration, String> {
    const MAX_HOURS: u64 = 10 * 366 * 24;
    match s.trim().strip_suffix('h') {
        Some(hours) => match hours.parse::<u64>() {
            Ok(h) if h <= MAX_HOURS => Ok(Duration::from_secs(h * 3600)),
            Ok(_) => Err(format!("{s:?} is longer than ten years")),
            Err(_) => Err(format!("{s:?} is not a duration (e.g. 24h, 90m)")),
        },
        None => parse_duration(s),
    }
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Directory to write (one sub-directory per cluster).
    pub out_dir: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub clusters: usize,
    #[arg(long, default_value_t = 3)]
    pub regions: usize,
    #[arg(long, default_value_t = 500)]
    pub identities: usize,
    /// Destinations per client identity.
    #[arg(long, default_value_t = 5)]
    pub dependencies: usize,
    /// One identity in N depends on "*" (0: none).
    #[arg(long, default_value_t = 1000)]
    pub wildcard_every: usize,
    /// One identity in N has a GlobalTrafficPolicy (0: none).
    #[arg(long, default_value_t = 10)]
    pub gtp_every: usize,
    /// One identity in N runs as an Argo Rollout, blue-green or a routed canary by turns (0: none).
    #[arg(long, default_value_t = 10)]
    pub rollout_every: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
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
        if self.identity_label.trim().is_empty() {
            return Err("--identity-label must not be empty".into());
        }
        if self.gateway_selectors.is_empty() {
            return Err("--gateway-selector needs at least one key=value".into());
        }
        if !is_dns_label(&self.instance) {
            return Err(format!("--instance {:?} is not a DNS label (it is a label value)", self.instance));
        }
        Ok(Settings {
            sync_namespace: self.sync_namespace.clone(),
            identity_label: self.identity_label.clone(),
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
        Command::Run(args) => run(args),
        Command::Snapshot(args) => snapshot(args),
        Command::Diff(args) => diff(args),
        Command::Explain(args) => explain(args),
        Command::RegisterCluster(args) => register(args),
        Command::Render(args) => render(args),
        Command::Synth(a) => {
            if a.clusters == 0 || a.regions == 0 {
                return fail("--clusters and --regions must be at least 1");
            }
            let spec = crate::synth::SynthSpec {
                clusters: a.clusters,
                regions: a.regions,
                identities: a.identities,
                dependencies: a.dependencies,
                wildcard_every: a.wildcard_every,
                gtp_every: a.gtp_every,
                rollout_every: a.rollout_every,
                seed: a.seed,
            };
            match crate::synth::write_fleet_dir(&spec, &a.out_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{}: {e}", a.out_dir.display())),
            }
        }
    }
}

fn register(a: RegisterArgs) -> ExitCode {
    let opts = crate::register::RegisterOptions {
        kubeconfig: a.kubeconfig,
        context: a.context,
        name: a.name,
        service_account: a.service_account,
        service_account_namespace: a.service_account_namespace,
        token_duration: a.token_duration,
        secret_namespace: a.secret_namespace,
        server: a.server,
        region: a.region,
        gateway_address: a.gateway_address,
        gateway_port: a.gateway_port,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&format!("starting the async runtime: {e}")),
    };
    match runtime.block_on(crate::register::registration_secret(&opts)) {
        Ok((yaml, expires)) => {
            eprintln!("flotilla: the token expires at {expires}; run register-cluster again before then");
            match print_stdout(&yaml) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Err(e) => fail(&format!("{e:#}")),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let settings = match args.engine.settings() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if args.lease_grace >= args.lease_duration {
        return fail("--lease-grace must be shorter than --lease-duration");
    }
    if args.debounce > args.debounce_max {
        return fail("--debounce must not be longer than --debounce-max");
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => return fail(&format!("--log-level {:?}: {e}", args.log_level)),
    };
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Plain => logs.with_ansi(false).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&format!("starting the async runtime: {e}")),
    };
    match runtime.block_on(run_controller(args, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "flotilla run failed");
            fail(&format!("{e:#}"))
        }
    }
}

impl HubArgs {
    /// A client of the hub, and flotilla's namespace there.
    async fn connect(&self) -> anyhow::Result<(kube::Client, String)> {
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

async fn run_controller(args: RunArgs, settings: crate::settings::Settings) -> anyhow::Result<()> {
    let (hub, namespace) = args.hub.connect().await?;
    let replica = args
        .replica_name
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("flotilla-{}", std::process::id()));
    let opts = crate::controller::Options {
        settings,
        secret_namespace: args.hub.secret_namespace(&namespace),
        namespace,
        secret_selectors: args.hub.cluster_secret_selectors.clone(),
        kubeconfig_trust: args.hub.kubeconfig_trust(),
        stale_after: args.stale_after,
        debounce: args.debounce,
        debounce_max: args.debounce_max,
        http_addr: args.http_addr,
        secure: (args.http_auth == HttpAuth::Kubernetes).then(|| crate::controller::SecureOptions {
            addr: args.secure_addr,
            certificate: match (&args.tls_cert_file, &args.tls_key_file) {
                (Some(cert), Some(key)) => CertSource::Files { cert: cert.clone(), key: key.clone() },
                _ => CertSource::SelfSigned { names: args.tls_sans.clone() },
            },
            auth_cache_ttl: args.auth_cache_ttl,
            auth_audiences: args.auth_audiences.clone(),
        }),
        leader_election: args.leader_elect.then(|| crate::controller::LeaseOptions {
            name: args.lease_name.clone(),
            identity: replica,
            duration_seconds: args.lease_duration.as_secs().max(1),
            grace_seconds: args.lease_grace.as_secs().max(1),
        }),
        vip_configmap: args.hub.vip_configmap.clone(),
        vip_shard_entries: args.vip_shard_entries.max(1),
        vip_release_after: args.vip_release_after,
        max_concurrent_writes: args.max_concurrent_writes,
    };
    tracing::info!(namespace = %opts.namespace, secrets = %opts.secret_namespace, leader_election = opts.leader_election.is_some(), "starting");
    crate::controller::runtime::run(hub, opts, shutdown_signal()).await
}

impl HubArgs {
    fn snapshot_options(&self, namespace: String, settings: &Settings) -> crate::snapshot::SnapshotOptions {
        crate::snapshot::SnapshotOptions {
            secret_namespace: self.secret_namespace(&namespace),
            namespace,
            secret_selectors: self.cluster_secret_selectors.clone(),
            kubeconfig_trust: self.kubeconfig_trust(),
            sync_namespace: settings.sync_namespace.clone(),
            identity_label: settings.identity_label.clone(),
            vip_configmap: self.vip_configmap.clone(),
            instance: settings.instance.clone(),
        }
    }

    /// A snapshot of the live fleet in a temporary directory, and what flotilla owns there now.
    fn live(&self, settings: &Settings) -> anyhow::Result<(tempdir::TempDir, crate::snapshot::Owned)> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let (hub, namespace) = self.connect().await?;
            let opts = self.snapshot_options(namespace, settings);
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
    let loaded = crate::fleet_dir::load(dir).map_err(|e| e.to_string())?;
    let engine = crate::render::engine(&loaded, settings, vip_store);
    Ok((engine, crate::render::render(loaded, settings, vip_store)))
}

fn diff(args: DiffArgs) -> ExitCode {
    let settings = match args.engine.settings() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let store = args.hub.vip_configmap.clone();
    let side = |dir: &std::path::Path| -> Result<crate::diff::Side, String> {
        let (engine, rendered) = rendered(dir, &settings, &store)?;
        Ok(crate::diff::Side::rendered(&engine, &rendered))
    };
    let sides = match (args.live, args.fleet_dirs.as_slice()) {
        (false, [before, after]) => side(before).and_then(|b| Ok((b, side(after)?))),
        (true, [after]) => match args.hub.live(&settings) {
            Err(e) => Err(format!("{e:#}")),
            Ok((snapshot, owned)) => side(snapshot.path()).and_then(|mut now| {
                // The objects as they are in the members, and the policies' verdicts as of now.
                now.objects = owned;
                Ok((now, side(after)?))
            }),
        },
        (false, _) => Err("diff needs BEFORE and AFTER fleet directories (or --live and AFTER)".into()),
        (true, _) => Err("with --live, diff takes only the AFTER fleet directory".into()),
    };
    let (before, after) = match sides {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let d = crate::diff::diff(&before, &after);
    let text = match args.format {
        ReportFormat::Text => crate::diff::to_text(&d),
        ReportFormat::Json => serde_json::to_string_pretty(&d).expect("serialising JSON") + "\n",
    };
    if let Err(e) = print_stdout(&text) {
        return fail(&e);
    }
    if d.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(3) }
}

fn explain(args: ExplainArgs) -> ExitCode {
    let settings = match args.engine.settings() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let live;
    let dir = match (&args.fleet_dir, args.live) {
        (Some(dir), false) => dir.as_path(),
        (None, true) => match args.hub.live(&settings) {
            Ok((snapshot, _)) => {
                live = snapshot;
                live.path()
            }
            Err(e) => return fail(&format!("{e:#}")),
        },
        _ => return fail("explain needs a fleet directory, or --live"),
    };
    let (engine, _) = match rendered(dir, &settings, &args.hub.vip_configmap) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let Some(explained) = crate::compute::explain::explain_host(&engine, &args.host, args.cluster.as_deref()) else {
        return fail(&format!("no identity writes host {:?}", args.host));
    };
    let text = match args.format {
        ReportFormat::Text => crate::compute::explain::to_text(&explained),
        ReportFormat::Json => serde_json::to_string_pretty(&explained).expect("serialising JSON") + "\n",
    };
    match print_stdout(&text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn snapshot(args: SnapshotArgs) -> ExitCode {
    let settings = match args.engine.settings() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&format!("starting the async runtime: {e}")),
    };
    let taken = runtime.block_on(async {
        let (hub, namespace) = args.hub.connect().await?;
        let opts = args.hub.snapshot_options(namespace, &settings);
        crate::snapshot::snapshot(&hub, &opts, &args.out_dir).await
    });
    match taken {
        Ok(report) => {
            for p in &report.problems {
                eprintln!("warning: {p}");
            }
            for (id, why) in &report.unreachable {
                eprintln!("error: cluster {id}: unreachable, marked in fleet.yaml: {why}");
            }
            eprintln!(
                "flotilla: snapshot of {} member(s) in {}{}",
                report.members.len(),
                args.out_dir.display(),
                if report.unreachable.is_empty() {
                    String::new()
                } else {
                    format!(", {} unreachable", report.unreachable.len())
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{e:#}")),
    }
}

/// SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn render(args: RenderArgs) -> ExitCode {
    let settings = match args.engine.settings() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let loaded = match crate::fleet_dir::load(&args.fleet_dir) {
        Ok(l) => l,
        Err(e) => return fail(&e.to_string()),
    };
    let rendered = crate::render::render(loaded, &settings, &args.vip_configmap);
    for line in &rendered.diagnostics {
        eprintln!("{line}");
    }
    let written = match &args.out_dir {
        Some(dir) => crate::render::write_out_dir(&rendered, dir, args.format)
            .map_err(|e| format!("--out-dir {}: {e}", dir.display())),
        None => {
            let text = match args.format {
                Format::Yaml => crate::render::to_yaml(&rendered),
                Format::Json => crate::render::to_json(&rendered),
            };
            print_stdout(&text)
        }
    };
    if let Err(e) = written {
        return fail(&e);
    }
    if args.strict && rendered.errors > 0 {
        eprintln!("flotilla: {} error(s) reported (--strict)", rendered.errors);
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
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
