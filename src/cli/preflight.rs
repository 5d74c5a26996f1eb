//! `flotilla preflight`: whether every member's credentials allow what flotilla does there.

use std::process::ExitCode;

use clap::Args;

use super::{EngineArgs, HubArgs, ReportFormat, fail, on_hub, print_stdout};

#[derive(Debug, Args)]
pub struct PreflightArgs {
    #[arg(long, value_enum, default_value = "text", env = "FLOTILLA_FORMAT")]
    pub format: ReportFormat,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Exit 0: every member passes; 1: one does not, or the hub could not be read.
pub(super) fn preflight(args: PreflightArgs) -> ExitCode {
    let settings = match args.engine.settings() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let checked =
        on_hub(&args.hub, &settings, async |hub, opts| crate::preflight::preflight(&hub, &opts, &settings).await);
    let checks = match checked {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let text = match args.format {
        ReportFormat::Text => crate::preflight::to_text(&checks, &settings.sync_namespace),
        ReportFormat::Json => serde_json::to_string_pretty(&checks).expect("serialising JSON") + "\n",
    };
    if let Err(e) = print_stdout(&text) {
        return fail(&e);
    }
    if checks.is_empty() {
        return fail("no member is registered in the hub");
    }
    if checks.iter().all(|c| c.passed()) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
