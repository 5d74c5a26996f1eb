//! `flotilla render`: a fleet directory in, the objects `run` would write out.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{EngineArgs, fail, print_stdout};
use crate::render::Format;

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

pub(super) fn render(args: RenderArgs) -> ExitCode {
    let settings = match args.engine.settings() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let progress = crate::progress::Progress::stderr("render");
    progress.say(format_args!("reading {}", args.fleet_dir.display()));
    let loaded = match crate::fleet_dir::load(&args.fleet_dir) {
        Ok(l) => l,
        Err(e) => return fail(&e.to_string()),
    };
    progress.say(format_args!("computing {} members, {} objects", loaded.clusters.len(), loaded.objects.len()));
    let rendered = crate::render::render(loaded, &settings, &args.vip_configmap);
    progress.say("writing");
    let written = write(&args, &rendered);
    progress.finish();
    for line in &rendered.diagnostics {
        eprintln!("{line}");
    }
    if let Err(e) = written {
        return fail(&e);
    }
    if args.strict && rendered.errors > 0 {
        eprintln!("flotilla: {} error(s) reported (--strict)", rendered.errors);
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

/// The rendered objects to --out-dir, or to stdout.
fn write(args: &RenderArgs, rendered: &crate::render::Rendered) -> Result<(), String> {
    match &args.out_dir {
        Some(dir) => crate::render::write_out_dir(rendered, dir, args.format)
            .map_err(|e| format!("--out-dir {}: {e}", dir.display())),
        None => {
            let text = match args.format {
                Format::Yaml => crate::render::to_yaml(rendered),
                Format::Json => crate::render::to_json(rendered),
            };
            print_stdout(&text)
        }
    }
}
