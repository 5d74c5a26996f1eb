//! `flotilla synth`: a deterministic synthetic fleet directory, for scale runs.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::fail;

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

pub(super) fn synth(a: SynthArgs) -> ExitCode {
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
