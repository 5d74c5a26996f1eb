//! `flotilla run`: the controller.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::{EngineArgs, HubArgs, fail, parse_duration};
use crate::controller::tls::CertSource;

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
    #[command(flatten)]
    pub guard: super::GuardArgs,
    /// How long a member whose registration (Secret or key) is removed keeps its endpoints in
    /// the other members, shown `leaving`, before it is forgotten: a registration deleted by
    /// mistake can be put back without a blip. 0: at once.
    #[arg(long, default_value = "10m", value_parser = parse_duration, env = "FLOTILLA_REMOVAL_GRACE")]
    pub removal_grace: Duration,
    /// How long a host's VIP stays reserved after the last object carrying it is gone (clients
    /// may still resolve it); then the address is released for other hosts.
    #[arg(long, default_value = "168h", value_parser = parse_duration, env = "FLOTILLA_VIP_RELEASE_AFTER")]
    pub vip_release_after: Duration,
    /// Hosts per ConfigMap of the VIP store (the tests make it small to have many shards).
    #[arg(long, default_value_t = crate::compute::vip::SHARD_ENTRIES, hide = true)]
    pub vip_shard_entries: usize,
    /// Shadow mode: watch and compute as usual, write nothing at all (no objects, addresses,
    /// statuses or Events; no lease), and show per member what would be done against what is
    /// live: /debug/clusters/<id>/plan and the flotilla_dry_run_planned metric.
    #[arg(long, env = "FLOTILLA_DRY_RUN")]
    pub dry_run: bool,
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

pub(super) fn run(args: RunArgs) -> ExitCode {
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

async fn run_controller(args: RunArgs, settings: crate::settings::Settings) -> anyhow::Result<()> {
    let (hub, namespace) = args.hub.connect().await?;
    let imported_vips = match &settings.import_vips_from {
        Some((ns, name)) => {
            let imported = import_vips(&hub, ns, name).await?;
            tracing::info!(store = %format!("{ns}/{name}"), hosts = imported.len(), "addresses imported from Admiral's store");
            imported
        }
        None => Default::default(),
    };
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
        leader_election: (args.leader_elect && !args.dry_run).then(|| crate::controller::LeaseOptions {
            name: args.lease_name.clone(),
            identity: replica,
            duration_seconds: args.lease_duration.as_secs().max(1),
            grace_seconds: args.lease_grace.as_secs().max(1),
        }),
        vip_configmap: args.hub.vip_configmap.clone(),
        vip_shard_entries: args.vip_shard_entries.max(1),
        vip_release_after: args.vip_release_after,
        max_concurrent_writes: args.max_concurrent_writes,
        prune_guard: args.guard.limits(),
        dry_run: args.dry_run,
        removal_grace: args.removal_grace,
        imported_vips,
    };
    tracing::info!(namespace = %opts.namespace, secrets = %opts.secret_namespace, leader_election = opts.leader_election.is_some(), "starting");
    crate::controller::runtime::run(hub, opts, shutdown_signal()).await
}

/// The addresses of Admiral's store `namespace/name` in the hub. Read once, at start: Admiral is
/// stopped before flotilla takes over, so the store no longer changes. Not finding it stops the
/// start-up: going on would give its hosts new addresses.
async fn import_vips(
    hub: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, std::net::Ipv4Addr>> {
    use anyhow::Context;
    let flag = format!("--import-vips-from {namespace}/{name}");
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(hub.clone(), namespace);
    let read = tokio::time::timeout(crate::controller::deadline::REQUEST, api.get_opt(name)).await;
    let found =
        read.map_err(|_| anyhow::anyhow!("{flag}: no answer from the hub in time"))?.with_context(|| flag.clone())?;
    let store = found.ok_or_else(|| anyhow::anyhow!("{flag}: no such ConfigMap in the hub"))?;
    crate::compute::vip::parse_admiral_store(store.data.as_ref()).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
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
