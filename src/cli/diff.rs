//! `flotilla diff`: what a change of the fleet's inputs does to every member.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{EngineArgs, HubArgs, ReportFormat, fail, print_stdout, rendered};

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
    /// The limits `run` holds prunes at: a member past them is marked (held, not pruned).
    #[command(flatten)]
    pub guard: super::GuardArgs,
}

pub(super) fn diff(args: DiffArgs) -> ExitCode {
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
            Err(e) => Err(e),
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
    let mut d = crate::diff::diff(&before, &after);
    crate::diff::mark_held(&mut d, &before, &args.guard.limits());
    let text = match args.format {
        ReportFormat::Text => crate::diff::to_text(&d),
        ReportFormat::Json => serde_json::to_string_pretty(&d).expect("serialising JSON") + "\n",
    };
    if let Err(e) = print_stdout(&text) {
        return fail(&e);
    }
    if d.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(3) }
}
