//! `flotilla snapshot`: the live fleet's inputs written as a fleet directory.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{EngineArgs, HubArgs, fail, on_hub};

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The fleet directory to write (created; an earlier snapshot there is replaced).
    pub out_dir: PathBuf,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub(super) fn snapshot(args: SnapshotArgs) -> ExitCode {
    let settings = match args.engine.settings() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let taken =
        on_hub(&args.hub, &settings, async |hub, opts| crate::snapshot::snapshot(&hub, &opts, &args.out_dir).await);
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
        Err(e) => fail(&e),
    }
}
