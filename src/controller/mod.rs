//! `flotilla run`: the live controller (the I/O around the pure engine).
//!
//! ```text
//! hub Secrets ─► registry ─► per-member watches ─┐
//! hub Dependencies, VIP store, lease ────────────┼─► runtime: model → engine → plan ─► writers
//!                                                 └─ /debug, /metrics read the runtime's state
//! ```
//!
//! Every watch and every writer sends its news to the runtime over one channel; the runtime is
//! the only owner of the model, so there is no locking of business state and one event is
//! handled at a time. The writers (one per member) are the only code that writes.

pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod watch;
pub mod writer;

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;

use crate::compute::plan::ObservedObject;
use crate::compute::{Kind, ObjectKey};
use crate::model::{InputKind, InputObject, NsName};
use crate::settings::{LabelTerm, Settings};
use writer::StatusWrite;

/// A member's state, as reported in metrics and `/debug/clusters`.
pub const STATES: [&str; 4] = ["connecting", "synced", "stale", "failed"];

/// What `run` needs beyond the engine's settings.
#[derive(Clone, Debug)]
pub struct Options {
    pub settings: Settings,
    /// flotilla's own namespace in the hub (lease, VIP store).
    pub namespace: String,
    pub secret_namespace: String,
    pub secret_selectors: Vec<LabelTerm>,
    pub allow_kubeconfig_exec: bool,
    pub stale_after: Duration,
    pub debounce: Duration,
    pub http_addr: SocketAddr,
    pub leader_election: Option<LeaseOptions>,
    pub vip_configmap: String,
    pub max_concurrent_writes: usize,
}

#[derive(Clone, Debug)]
pub struct LeaseOptions {
    pub name: String,
    pub identity: String,
    pub duration_seconds: u64,
    pub grace_seconds: u64,
}

/// The kinds watched in every member: the model's inputs, and the two kinds only flotilla writes
/// (Sidecars are both: an input, for users' Sidecars, and an output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WatchKind {
    Input(InputKind),
    ServiceEntry,
    DestinationRule,
}

impl WatchKind {
    pub const MEMBER: [WatchKind; 11] = [
        WatchKind::Input(InputKind::Deployment),
        WatchKind::Input(InputKind::Service),
        WatchKind::Input(InputKind::Node),
        WatchKind::Input(InputKind::Namespace),
        WatchKind::Input(InputKind::Sidecar),
        WatchKind::Input(InputKind::GlobalTrafficPolicy),
        WatchKind::Input(InputKind::OutlierDetection),
        WatchKind::Input(InputKind::ClientConnectionConfig),
        WatchKind::Input(InputKind::Dependency),
        WatchKind::ServiceEntry,
        WatchKind::DestinationRule,
    ];

    pub fn input(self) -> Option<InputKind> {
        match self {
            WatchKind::Input(k) => Some(k),
            _ => None,
        }
    }

    /// The planner's kind for what flotilla writes.
    pub fn output(self) -> Option<Kind> {
        match self {
            WatchKind::ServiceEntry => Some(Kind::ServiceEntry),
            WatchKind::DestinationRule => Some(Kind::DestinationRule),
            WatchKind::Input(InputKind::Sidecar) => Some(Kind::Sidecar),
            WatchKind::Input(_) => None,
        }
    }
}

/// One watched object.
#[derive(Clone, Debug)]
pub enum Watched {
    Input(Box<InputObject>),
    Output(Box<ObservedObject>),
}

/// What a watch saw.
#[derive(Clone, Debug)]
pub enum Change {
    Applied(Watched),
    Deleted(WatchKind, NsName),
    /// A complete (re)list: anything known before and not in it was deleted meanwhile.
    Relisted(WatchKind, Vec<Watched>),
    Failed(WatchKind, String),
}

/// Everything the runtime reacts to.
#[derive(Debug)]
pub enum Input {
    /// The complete current set of registration Secrets.
    Secrets(Vec<Secret>),
    SecretsFailed(String),
    /// A change to the Dependencies kept in the hub.
    Hub(Change),
    VipStore(watch::VipStoreEvent),
    Member {
        cluster: String,
        epoch: u64,
        change: Change,
    },
    WriteDone {
        cluster: String,
        epoch: u64,
        report: WriteReport,
    },
    Leader(bool),
}

/// The outcome of one write job.
#[derive(Debug, Default)]
pub struct WriteReport {
    /// As the API server returned them.
    pub applied: Vec<ObservedObject>,
    pub pruned: Vec<ObjectKey>,
    pub statuses: Vec<StatusWrite>,
    pub namespace_ready: bool,
    pub errors: Vec<String>,
}
