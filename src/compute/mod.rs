//! The pure engine: fleet model in, desired Istio objects per member out.
//!
//! `Engine::recompute` takes the identities the model marked dirty, widens them to everything
//! whose output can depend on them (clients and destinations), recomputes those identities and
//! swaps their outputs in the desired state, returning the object keys that changed per cluster.
//! `render` calls it once on a fleet read from files; `run` calls it after every burst of watch
//! events. No clients, clocks, randomness or I/O anywhere below this module.

pub mod digest;
pub mod identity;
pub mod objects;
pub mod plan;
pub mod policy;
pub mod status;
pub mod vip;

use std::collections::{BTreeMap, BTreeSet, HashSet, btree_map};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, mpsc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::istio::{DestinationRule, ServiceEntry, Sidecar};
use crate::model::{ClusterId, Fleet, ObjectRef, Policy};
use crate::settings::{self, Settings};

use digest::Digest;
use vip::VipTable;

/// The value of `app.kubernetes.io/managed-by` on everything flotilla writes, and its SSA field
/// manager.
pub const MANAGER: &str = "flotilla";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_IDENTITY: &str = "flotilla.io/identity";
pub const LABEL_ENV: &str = "flotilla.io/env";

/// The kinds flotilla writes, in output order (apiVersion is the same for all three).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    DestinationRule,
    ServiceEntry,
    Sidecar,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identifies one written object inside one cluster. The names are shared (`Arc<str>`): one
/// object's key is held by every cluster it is desired in and by every plan that names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        ObjectKey { kind, namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// One object flotilla wants to exist in one cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
// Desired objects are shared behind `Arc`, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum DesiredObject {
    DestinationRule(DestinationRule),
    ServiceEntry(ServiceEntry),
    Sidecar(Sidecar),
}

impl DesiredObject {
    pub fn kind(&self) -> Kind {
        match self {
            DesiredObject::DestinationRule(_) => Kind::DestinationRule,
            DesiredObject::ServiceEntry(_) => Kind::ServiceEntry,
            DesiredObject::Sidecar(_) => Kind::Sidecar,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            DesiredObject::DestinationRule(o) => &o.metadata,
            DesiredObject::ServiceEntry(o) => &o.metadata,
            DesiredObject::Sidecar(o) => &o.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let m = self.meta();
        ObjectKey::new(self.kind(), m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default())
    }

    /// The spec as JSON: what the planner compares with what a cluster holds.
    pub fn spec_json(&self) -> serde_json::Value {
        let spec = match self {
            DesiredObject::DestinationRule(o) => serde_json::to_value(&o.spec),
            DesiredObject::ServiceEntry(o) => serde_json::to_value(&o.spec),
            DesiredObject::Sidecar(o) => serde_json::to_value(&o.spec),
        };
        spec.expect("serialising a spec to JSON")
    }
}

/// A desired object with what is derived from it once, when it is built: its key and its
/// content digest (what the planner compares). Shared behind `Arc` by every cluster that wants it.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub key: ObjectKey,
    pub digest: Digest,
    pub object: DesiredObject,
}

impl Desired {
    pub fn new(object: DesiredObject) -> Self {
        Desired { key: object.key(), digest: Digest::of(&object), object }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// Something wrong or noteworthy about the input, naming the object it is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    pub severity: Severity,
    pub cluster: Option<String>,
    pub object: String,
    pub message: String,
}

impl Diagnostic {
    pub fn warning(cluster: Option<&str>, object: String, message: String) -> Self {
        Diagnostic { severity: Severity::Warning, cluster: cluster.map(str::to_string), object, message }
    }
    pub fn error(cluster: Option<&str>, object: String, message: String) -> Self {
        Diagnostic { severity: Severity::Error, cluster: cluster.map(str::to_string), object, message }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match &self.cluster {
            Some(c) => write!(f, "{sev}: cluster {c}: {}: {}", self.object, self.message),
            None => write!(f, "{sev}: {}: {}", self.object, self.message),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    ClientConnectionConfig,
    Dependency,
    GlobalTrafficPolicy,
    OutlierDetection,
}

/// What happened to one policy: the basis of its status conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyState {
    /// In force.
    Ready,
    /// Lost to another policy for the same identity+env (the winner).
    Conflict(ObjectRef),
    /// Rejected, with the reason; a previous valid spec may still be in force.
    Invalid(String),
    /// Valid, but matches no workload.
    NotApplied(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyReport {
    pub kind: PolicyKind,
    pub at: ObjectRef,
    pub generation: Option<i64>,
    pub state: PolicyState,
    /// Per target cluster, the hosts written there because of this policy.
    pub clusters: BTreeMap<ClusterId, BTreeSet<String>>,
    pub message: String,
}

impl PolicyReport {
    pub fn new<S>(kind: PolicyKind, p: &Policy<S>, state: PolicyState) -> Self {
        PolicyReport {
            kind,
            at: p.at.clone(),
            generation: p.generation,
            state,
            clusters: BTreeMap::new(),
            message: String::new(),
        }
    }
}

/// Per-cluster facts derived once per recompute (not per identity).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterFacts {
    /// The cluster's id, shared by every object desired in it.
    pub id: Arc<str>,
    pub region: Option<String>,
    pub gateway_address: Option<String>,
    pub gateway_port: u16,
}

/// What one identity contributes: objects per cluster, diagnostics, policy reports.
#[derive(Clone, Debug, Default)]
pub struct IdentityOutput {
    /// (cluster, object) pairs; the cluster ids are shared with the pass's cluster facts.
    pub objects: Vec<(Arc<str>, Arc<Desired>)>,
    pub diagnostics: Vec<Diagnostic>,
    pub reports: Vec<PolicyReport>,
}

/// The desired state of the whole fleet, by identity and by cluster.
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    by_identity: BTreeMap<String, IdentityOutput>,
    by_cluster: BTreeMap<ClusterId, BTreeMap<ObjectKey, Arc<Desired>>>,
}

impl DesiredState {
    /// The objects desired in one cluster, sorted by key.
    pub fn cluster(&self, id: &str) -> impl Iterator<Item = &DesiredObject> {
        self.by_cluster.get(id).into_iter().flat_map(|m| m.values().map(|o| &o.object))
    }

    pub fn cluster_map(&self, id: &str) -> Option<&BTreeMap<ObjectKey, Arc<Desired>>> {
        self.by_cluster.get(id)
    }

    pub fn object_count(&self) -> usize {
        self.by_cluster.values().map(BTreeMap::len).sum()
    }

    pub fn identity(&self, id: &str) -> Option<&IdentityOutput> {
        self.by_identity.get(id)
    }

    pub fn diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.by_identity.values().flat_map(|o| o.diagnostics.iter())
    }

    pub fn reports(&self) -> impl Iterator<Item = &PolicyReport> {
        self.by_identity.values().flat_map(|o| o.reports.iter())
    }

    /// Replaces one identity's output; records the (cluster, key) pairs whose object changed.
    fn replace(&mut self, identity: &str, output: IdentityOutput, changed: &mut Changed) {
        let old = self.by_identity.remove(identity).unwrap_or_default();
        for (cluster, obj) in &output.objects {
            let slot = match self.by_cluster.get_mut(&**cluster) {
                Some(slot) => slot,
                None => self.by_cluster.entry(cluster.to_string()).or_default(),
            };
            match slot.entry(obj.key.clone()) {
                btree_map::Entry::Vacant(e) => {
                    e.insert(obj.clone());
                }
                btree_map::Entry::Occupied(mut e) => {
                    let have = e.get();
                    if Arc::ptr_eq(have, obj) || have.digest == obj.digest {
                        continue;
                    }
                    e.insert(obj.clone());
                }
            }
            mark_changed(changed, cluster, &obj.key);
        }
        if !old.objects.is_empty() {
            // Objects the identity no longer produces leave the clusters that held them.
            let kept: HashSet<(&str, &ObjectKey)> = output.objects.iter().map(|(c, o)| (&**c, &o.key)).collect();
            for (cluster, obj) in &old.objects {
                if kept.contains(&(&**cluster, &obj.key)) {
                    continue;
                }
                if let Some(slot) = self.by_cluster.get_mut(&**cluster) {
                    slot.remove(&obj.key);
                    if slot.is_empty() {
                        self.by_cluster.remove(&**cluster);
                    }
                }
                mark_changed(changed, cluster, &obj.key);
            }
        }
        if !output.objects.is_empty() || !output.diagnostics.is_empty() || !output.reports.is_empty() {
            self.by_identity.insert(identity.to_string(), output);
        }
    }
}

/// Object keys whose desired content changed (added, modified or removed), per cluster, in the
/// order the recompute met them. A list, not a set: recording a change costs no search.
pub type Changed = BTreeMap<ClusterId, Vec<ObjectKey>>;

fn mark_changed(changed: &mut Changed, cluster: &str, key: &ObjectKey) {
    let keys = match changed.get_mut(cluster) {
        Some(keys) => keys,
        None => changed.entry(cluster.to_string()).or_default(),
    };
    keys.push(key.clone());
}

/// The result of one recompute.
#[derive(Clone, Debug, Default)]
pub struct Recomputed {
    /// How many identities were recomputed.
    pub identities: usize,
    /// Object keys whose desired content changed (added, modified or removed), per cluster.
    pub changed: Changed,
    /// VIPs allocated by this recompute: persist them before writing.
    pub new_vips: BTreeMap<String, Ipv4Addr>,
}

/// The fleet model, the settings and the desired state they produce.
pub struct Engine {
    pub settings: Settings,
    pub fleet: Fleet,
    pub vips: VipTable,
    pub desired: DesiredState,
    /// Threads that resolve and build identities (all cores by default). The output does not
    /// depend on it.
    pub threads: usize,
    facts: BTreeMap<ClusterId, ClusterFacts>,
}

impl Engine {
    pub fn new(settings: Settings, vips: VipTable) -> Self {
        let fleet = Fleet::new(&settings.identity_label);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Engine { settings, fleet, vips, desired: DesiredState::default(), threads, facts: BTreeMap::new() }
    }

    /// Replaces the VIP table (e.g. with the allocations persisted in the hub, when they disagree
    /// with this replica's) and recomputes everything on the next pass.
    pub fn reset_vips(&mut self, vips: VipTable) {
        self.vips = vips;
        self.fleet.mark_all_dirty();
    }

    pub fn facts(&self) -> &BTreeMap<ClusterId, ClusterFacts> {
        &self.facts
    }

    /// Recomputes what the model marked dirty since the last call.
    pub fn recompute(&mut self) -> Recomputed {
        let dirty = self.fleet.take_dirty();
        let mut result = Recomputed::default();
        if dirty.is_empty() {
            return result;
        }
        // A `*` client's workloads moving sets `all` in the model; naming a `*` client as a
        // destination, or editing its Dependency, only touches the identities involved.
        let identities: BTreeSet<String> = if dirty.all {
            self.facts = cluster_facts(&self.fleet, &self.settings);
            let mut all = self.fleet.identities();
            all.extend(self.desired.by_identity.keys().cloned());
            all
        } else {
            // Clients that name us list our hosts in their Sidecars and Dependency statuses (a `*`
            // client has no Sidecar, and its status lists only what it names); destinations are
            // written where we run.
            let mut set = dirty.identities.clone();
            for id in &dirty.identities {
                set.extend(self.fleet.named_clients_of(id).map(str::to_string));
                set.extend(self.fleet.destinations_of(id).into_iter().map(str::to_string));
            }
            set
        };
        let identities: Vec<&str> = identities.iter().map(String::as_str).collect();
        let Engine { settings, fleet, vips, desired, threads, facts } = self;

        // 1. Resolve, on every core: the identities recomputed and the destinations whose hosts
        //    their Sidecars list.
        let mut wanted: BTreeSet<&str> = identities.iter().copied().collect();
        for id in &identities {
            wanted.extend(fleet.destinations_of(id));
        }
        let wanted: Vec<&str> = wanted.into_iter().collect();
        let mut asked: BTreeSet<&str> = wanted.iter().copied().collect();
        for id in &wanted {
            asked.extend(fleet.named_clients_of(id));
        }
        asked.extend(fleet.wildcard_sources());
        let asked: Vec<&str> = asked.into_iter().collect();
        let clusters = parallel_map(*threads, &asked, |id| fleet.clusters_running(id));
        let running = identity::Running::new(fleet, asked.iter().copied().zip(clusters).collect());
        let resolved = parallel_map(*threads, &wanted, |id| identity::resolve(fleet, settings, &running, id));
        let pass = identity::PassView::new(running, wanted.iter().copied().zip(resolved).collect());

        // 2. Allocate VIPs on one thread, in identity order: when two hosts' preferred addresses
        //    collide, the order decides who probes further, and output must not depend on threads.
        if settings.vip_mode == settings::VipMode::Allocate {
            for id in &identities {
                for host in pass.written_hosts(id) {
                    // Exhaustion is reported by the identity's build, which finds no address.
                    let _ = vips.get_or_allocate(host, settings.vip_cidr);
                }
            }
        }

        // 3. Build objects on every core, and swap each identity's into the desired state on this
        //    thread, in identity order, while the next ones are being built.
        let build = |id: &&str| objects::compute_identity(fleet, settings, facts, &pass, id, vips);
        for_each_ordered(*threads, &identities, build, |id, output| desired.replace(id, output, &mut result.changed));
        result.identities = identities.len();
        result.new_vips = self.vips.take_new();
        result
    }

    /// Problems of whole clusters (no gateway, no region), sorted.
    pub fn cluster_diagnostics(&self) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for (id, facts) in &self.facts {
            if facts.region.is_none() {
                out.push(Diagnostic::warning(
                    Some(id),
                    "cluster".into(),
                    "no region (no node carries topology.kubernetes.io/region and no override is set): its endpoints have no locality and FAILOVER policies cannot name it".into(),
                ));
            }
            if facts.gateway_address.is_none() {
                out.push(Diagnostic::warning(
                    Some(id),
                    "cluster".into(),
                    "no gateway address (no east-west or ingress gateway Service with an address in istio-system, and no override): its workloads are reachable only from inside it".into(),
                ));
            }
        }
        out
    }

    /// Every diagnostic: clusters first, then identities, de-duplicated and sorted.
    pub fn all_diagnostics(&self) -> Vec<Diagnostic> {
        let mut all: BTreeSet<Diagnostic> = self.cluster_diagnostics().into_iter().collect();
        all.extend(self.desired.diagnostics().cloned());
        all.into_iter().collect()
    }
}

/// Below this many items, work stays on the calling thread: spawning costs more than it saves.
const PARALLEL_MIN: usize = 64;

/// Items a worker takes at a time: small enough that a few expensive items (a `*` client's
/// Sidecars) do not leave a core idle, big enough that handing out work costs nothing.
const BLOCK: usize = 16;

/// Calls `f` on every item on `threads` worker threads, and `sink` on the calling thread with each
/// result, in item order, as soon as it and all before it are done. The calling thread consumes
/// while the workers produce, so a sequential `sink` overlaps with the parallel `f`.
fn for_each_ordered<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
    mut sink: impl FnMut(&T, R),
) {
    if threads <= 1 || items.len() < PARALLEL_MIN {
        for item in items {
            sink(item, f(item));
        }
        return;
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        // Bounded, so that workers cannot run far ahead of the consumer and hold many results.
        let (tx, rx) = mpsc::sync_channel::<(usize, Vec<R>)>(threads * 4);
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, f) = (&next, &f);
            scope.spawn(move || {
                loop {
                    let start = next.fetch_add(BLOCK, AtomicOrdering::Relaxed);
                    if start >= items.len() {
                        return;
                    }
                    let end = (start + BLOCK).min(items.len());
                    if tx.send((start, items[start..end].iter().map(f).collect())).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut waiting: BTreeMap<usize, Vec<R>> = BTreeMap::new();
        let mut due = 0;
        for (start, results) in rx {
            waiting.insert(start, results);
            while let Some(results) = waiting.remove(&due) {
                for (item, r) in items[due..].iter().zip(results) {
                    due += 1;
                    sink(item, r);
                }
            }
        }
        assert_eq!(due, items.len(), "a compute worker panicked");
    });
}

/// `items.iter().map(f)` on `threads` threads, in order.
fn parallel_map<T: Sync, R: Send>(threads: usize, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let mut out = Vec::with_capacity(items.len());
    for_each_ordered(threads, items, f, |_, r| out.push(r));
    out
}

fn cluster_facts(fleet: &Fleet, settings: &Settings) -> BTreeMap<ClusterId, ClusterFacts> {
    fleet
        .clusters
        .iter()
        .map(|(id, c)| {
            let facts = ClusterFacts {
                id: Arc::from(id.as_str()),
                region: c.region(),
                gateway_address: c.gateway_address(&settings.gateway_selectors),
                gateway_port: c.gateway_port(settings.gateway_port),
            };
            (id.clone(), facts)
        })
        .collect()
}
