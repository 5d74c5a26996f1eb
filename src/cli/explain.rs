//! `flotilla explain`: why a host's objects exist where they do.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{EngineArgs, HubArgs, ReportFormat, fail, print_stdout, rendered};

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

pub(super) fn explain(args: ExplainArgs) -> ExitCode {
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
            Err(e) => return fail(&e),
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
