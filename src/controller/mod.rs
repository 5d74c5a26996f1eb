//! `flotilla run`: the live controller, the I/O around the pure engine.
//!
//! ```text
//! hub Secrets ─► registry ─► per-member watches ─┐
//! hub Dependencies, VIP store, lease ────────────┼─► runtime ─► compute (blocking thread)
//! writers: "job done" ───────────────────────────┘      │       plan per member
//!                                                       ├─► writers: one per member + the hub's
//!                                                       └─► published snapshot ─► /debug, /metrics
//! ```
//!
//! Every watch and every writer sends its news to the runtime over one channel; the runtime is
//! the only owner of the model and of what is known of each member, and one input is handled at
//! a time. Its decisions are small synchronous parts that take `now` and need no client
//! (`health`, `observed`, `dispatch`, `vips`, `debounce`); `runtime` wires them to the I/O. The
//! writers are the only code that writes.

pub mod admiral_api;
pub mod auth;
pub mod claims;
pub mod deadline;
pub mod debounce;
pub mod dispatch;
pub mod guard;
pub mod health;
pub mod lease;
pub mod member;
pub mod metrics;
pub mod observed;
pub mod pending;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod statuses;
pub mod tls;
pub mod vips;
pub mod watch;
pub mod writer;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;

use crate::compute::ObjectKey;
use crate::compute::plan::ObservedObject;
use crate::ingest::InputObject;
use crate::meta::Kind;
use crate::model::NsName;
use crate::settings::{LabelTerm, Settings};
use writer::StatusWrite;

/// What `run` needs beyond the engine's settings.
#[derive(Clone, Debug)]
pub struct Options {
    pub settings: Settings,
    /// flotilla's own namespace in the hub (lease, VIP store).
    pub namespace: String,
    pub secret_namespace: String,
    pub secret_selectors: Vec<LabelTerm>,
    pub kubeconfig_trust: registry::KubeconfigTrust,
    pub stale_after: Duration,
    pub debounce: Duration,
    pub debounce_max: Duration,
    /// The probes; and everything else when `secure` is None.
    pub http_addr: SocketAddr,
    /// HTTPS with authorisation for /metrics and /debug; None: no authentication at all.
    pub secure: Option<SecureOptions>,
    pub leader_election: Option<LeaseOptions>,
    /// The VIP store's first ConfigMap; more are named after it (`compute::vip::shard_name`).
    pub vip_configmap: String,
    pub vip_shard_entries: usize,
    /// How long an address outlives the last object that carries its host.
    pub vip_release_after: Duration,
    pub max_concurrent_writes: usize,
    /// When a member's prunes are held (the blast-radius guard).
    pub prune_guard: guard::Limits,
    /// Shadow mode: watch and compute as usual, write nothing at all, show the plans.
    pub dry_run: bool,
    /// How long a member whose registration is gone keeps its endpoints elsewhere.
    pub removal_grace: Duration,
    /// Addresses imported from Admiral's store (`--import-vips-from`), host → address.
    pub imported_vips: std::collections::BTreeMap<String, std::net::Ipv4Addr>,
}

#[derive(Clone, Debug)]
pub struct SecureOptions {
    pub addr: SocketAddr,
    pub certificate: tls::CertSource,
    /// How long an authorisation decision is reused.
    pub auth_cache_ttl: Duration,
    /// Audiences a bearer token must have been issued for (empty: the hub API server's own).
    pub auth_audiences: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct LeaseOptions {
    pub name: String,
    pub identity: String,
    pub duration_seconds: u64,
    pub grace_seconds: u64,
}

/// The kinds watched in every member: the model's inputs, and the kinds only flotilla writes
/// (Sidecars, ServiceEntries and VirtualServices are both: users' are inputs). Rollouts only
/// where their CRD is.
pub const MEMBER_KINDS: [Kind; 15] = [
    Kind::Deployment,
    Kind::Rollout,
    Kind::Job,
    Kind::CronJob,
    Kind::VirtualService,
    Kind::Service,
    Kind::Node,
    Kind::Namespace,
    Kind::Sidecar,
    Kind::GlobalTrafficPolicy,
    Kind::OutlierDetection,
    Kind::ClientConnectionConfig,
    Kind::Dependency,
    Kind::ServiceEntry,
    Kind::DestinationRule,
];

/// One watched object.
#[derive(Clone, Debug)]
pub enum Watched {
    Input(Box<InputObject>),
    Output(Box<ObservedObject>),
}

impl Watched {
    pub fn kind(&self) -> Kind {
        match self {
            Watched::Input(o) => o.kind(),
            Watched::Output(o) => o.key.kind,
        }
    }

    pub fn key(&self) -> NsName {
        match self {
            Watched::Input(o) => o.key(),
            Watched::Output(o) => (o.key.namespace.to_string(), o.key.name.to_string()),
        }
    }
}

/// What a watch saw.
#[derive(Debug)]
pub enum Change {
    Applied(Watched),
    Deleted(Kind, NsName),
    /// Objects of a (re)list under way, one page at a time; the credit, dropped once the page
    /// is taken in, lets the next page of any watch be sent (`watch::Feed`).
    RelistPage(Vec<Watched>, watch::Credit),
    /// A (re)list is complete, with the keys of everything it held: anything known before and
    /// not in it was deleted meanwhile.
    Relisted(Kind, BTreeSet<NsName>),
    Failed(watch::WatchError),
    /// The member's API server answers again (or for the first time).
    Answered,
    /// It has not answered since `since`: the probe's error.
    Unanswered {
        since: tokio::time::Instant,
        error: String,
    },
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
    /// The hub's VIP store after a persist job, as written.
    pub vip_store: Option<std::collections::BTreeMap<String, std::net::Ipv4Addr>>,
    pub errors: Vec<writer::WriteError>,
}
