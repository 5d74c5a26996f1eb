//! flotilla: federates Istio service meshes across Kubernetes clusters.
//!
//! The layers, each using only those above it (see docs/architecture.md):
//!
//! * `meta` — the vocabulary: label and annotation names, kinds, name checks;
//! * `parallel` — an ordered map on several threads (compute, parse, print);
//! * `crd`, `argo`, `istio` — the kinds read (`admiral.io`, Argo Rollouts) and written
//!   (`networking.istio.io`);
//! * `settings` — the validated flags that shape output;
//! * `model` — the fleet as plain records and indexes, and what changed;
//! * `ingest` — Kubernetes objects → the model's records, policies judged;
//! * `compute` — the pure engine: desired objects per member, statuses, plans;
//! * `fleet_dir`, `render` — `render`'s input files and printer;
//! * `snapshot`, `preflight` — reading the live fleet through the hub;
//! * `controller` — `run`'s I/O: registry, watches, the one writer, HTTP, and the runtime;
//! * `cli` — the command line, one file per command.

pub mod argo;
pub mod cli;
pub mod compute;
pub(crate) mod controller;
pub mod crd;
pub mod diff;
pub mod fleet_dir;
pub mod ingest;
pub mod istio;
pub mod meta;
pub mod model;
pub(crate) mod parallel;
pub mod preflight;
pub mod progress;
pub(crate) mod register;
pub mod render;
pub mod settings;
pub mod snapshot;
pub mod synth;
pub mod yaml;

/// Every binary built on the crate (flotilla, its tests and benchmarks) allocates with mimalloc:
/// compute is mostly building and freeing small objects on every core (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Asks the kernel not to back this process with transparent huge pages. mimalloc asks for them
/// (`MADV_HUGEPAGE`), and where the kernel honours that on a fault it zeroes, and may first
/// compact, 2 MiB at a time: `render` of the 100 × 5,000 fleet spent a third of its CPU there
/// (0.9–1.7 s of system time against 0.3–0.8 s without, its peak RSS 5 % higher), and a
/// controller would see the same stalls as latency. Harmless where it is refused. Inherited by
/// child processes (a kubeconfig's exec credential plugin), which lose nothing by it.
pub fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process's flag.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
