//! Command line: flags (each also settable by environment variable), turned into validated
//! `Settings`, and the subcommands of SPEC §8.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

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
pub enum Command {
    /// Run the controller (not built yet: see the controller issue).
    Run(EngineArgs),
    /// Print, offline, the exact objects `run` would write per cluster, from manifests on disk.
    Render(RenderArgs),
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
    #[command(flatten)]
    pub engine: EngineArgs,
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
}

impl EngineArgs {
    /// Validates the flags into settings; the message names the flag.
    pub fn settings(&self) -> Result<Settings, String> {
        use crate::compute::policy::{is_dns_label, is_dns_subdomain};
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
        Command::Run(args) => match args.settings() {
            Err(e) => fail(&e),
            Ok(_) => fail("`flotilla run` is not built yet; use `flotilla render FLEET_DIR` to see what it will write"),
        },
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
                seed: a.seed,
            };
            match crate::synth::write_fleet_dir(&spec, &a.out_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{}: {e}", a.out_dir.display())),
            }
        }
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
    let rendered = crate::render::render(loaded, &settings);
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
