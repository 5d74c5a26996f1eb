//! `flotilla register-cluster`: the registration Secret of a member.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::{fail, parse_duration, print_stdout};

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
    /// The member's SPIFFE trust domain, where it is not the hub's `--trust-domain`.
    #[arg(long, value_parser = parse_trust_domain)]
    pub trust_domain: Option<String>,
}

fn parse_trust_domain(s: &str) -> Result<String, String> {
    if crate::meta::is_trust_domain(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a SPIFFE trust domain (lower-case letters, digits, '.', '-', '_')"))
    }
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

pub(super) fn register(a: RegisterArgs) -> ExitCode {
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
        trust_domain: a.trust_domain,
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
