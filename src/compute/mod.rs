//! The pure engine: fleet model in, desired Istio objects per member out.
//!
//! `Engine::recompute` takes the identities the model marked dirty, widens them to everything
//! whose output can depend on them (clients and destinations), recomputes those identities and
//! swaps their outputs in the desired state, returning the object keys that changed per cluster.
//! `render` calls it once on a fleet read from files; `run` calls it after every burst of watch
//! events. No clients, clocks, randomness or I/O anywhere below this module.

pub mod digest;
pub mod explain;
pub mod identity;
pub mod objects;
pub mod plan;
pub mod policy;
pub mod status;
pub mod vip;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, btree_map};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, mpsc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::ingest::InputObject;
use crate::istio::{DestinationRule, ServiceEntry, Sidecar};
use crate::meta::Kind;
use crate::model::{ClusterHealth, ClusterId, Fleet, ObjectRef, Policy, Reach};
use crate::settings::{self, Settings};

use digest::Digest;
use vip::VipTable;

/// Identifies one written object inside one cluster. The name is shared (`Arc<str>`): one
/// object's key is held by every cluster it is desired in and by every plan that names it.
///
/// Keys order by (kind, namespace, name). The desired and observed maps are searched by key
/// hundreds of thousands of times per full compute, and reading names that live elsewhere in
/// memory is what such a search waits on; so a key carries the first 16 bytes of its name, and
/// namespaces are interned, which settles most comparisons without reading either string.
#[derive(Clone, Debug)]
pub struct ObjectKey {
    pub kind: Kind,
    /// Interned: one copy per namespace for the life of the process. A counted reference here
    /// would be one counter that every thread updates for every key it copies.
    pub namespace: &'static str,
    pub name: Arc<str>,
    /// The name's first 16 bytes, big-endian and zero-padded: ordering these orders the names
    /// the same way (object names hold no NUL), up to a tie that the full names settle.
    name_head: [u64; 2],
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        let mut head = [0u8; 16];
        let n = name.len().min(16);
        head[..n].copy_from_slice(&name.as_bytes()[..n]);
        let name_head = [
            u64::from_be_bytes(head[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(head[8..].try_into().expect("8 bytes")),
        ];
        ObjectKey { kind, namespace: interned_namespace(namespace), name: name.into(), name_head }
    }
}

/// The one copy of `namespace`. Namespaces that hold our kinds are few (the sync namespace and
/// those with Sidecars, at most 63 bytes each), so keeping every one ever seen costs little, and
/// lets comparing two keys' namespaces be mostly a pointer comparison.
fn interned_namespace(namespace: &str) -> &'static str {
    thread_local! {
        // Most objects go to the sync namespace: the last one answers without taking the lock.
        static LAST: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
    }
    let last = LAST.get();
    if last == namespace {
        return last;
    }
    static NAMESPACES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut seen = NAMESPACES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let interned = match seen.get(namespace) {
        Some(interned) => interned,
        None => {
            let interned: &'static str = Box::leak(namespace.into());
            seen.insert(interned);
            interned
        }
    };
    LAST.set(interned);
    interned
}

fn cmp_shared(a: &Arc<str>, b: &Arc<str>) -> std::cmp::Ordering {
    if Arc::ptr_eq(a, b) { std::cmp::Ordering::Equal } else { a.cmp(b) }
}

fn cmp_interned(a: &'static str, b: &'static str) -> std::cmp::Ordering {
    if std::ptr::eq(a, b) { std::cmp::Ordering::Equal } else { a.cmp(b) }
}

impl Ord for ObjectKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.kind
            .cmp(&other.kind)
            .then_with(|| cmp_interned(self.namespace, other.namespace))
            .then_with(|| self.name_head.cmp(&other.name_head))
            .then_with(|| cmp_shared(&self.name, &other.name))
    }
}

impl PartialOrd for ObjectKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for ObjectKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for ObjectKey {}

impl std::hash::Hash for ObjectKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.kind, self.namespace, &*self.name).hash(state);
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

impl PolicyState {
    /// The state's name (the status field `state`) and what to tell a user about it: the one
    /// wording shared by the status, `render`'s report and `/debug`.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            PolicyState::Ready => ("Ready", String::new()),
            PolicyState::Conflict(winner) => ("Conflict", format!("not applied: {winner} takes precedence")),
            PolicyState::Invalid(reason) => ("Invalid", reason.clone()),
            PolicyState::NotApplied(reason) => ("NotApplied", format!("not applied: {reason}")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyReport {
    pub kind: Kind,
    pub at: ObjectRef,
    pub generation: Option<i64>,
    pub state: PolicyState,
    /// Per target cluster, the hosts written there because of this policy.
    pub clusters: BTreeMap<ClusterId, BTreeSet<String>>,
    pub message: String,
}

impl PolicyReport {
    pub fn new<S>(kind: Kind, p: &Policy<S>, state: PolicyState) -> Self {
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
    /// A stale member keeps its last known objects in the model and its desired state here;
    /// nothing is written to it or pruned from it until it is synced again (`plan::plan_member`).
    pub health: ClusterHealth,
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
    /// The hosts it writes, in resolve order: what its clients list. A later change to the
    /// identity recomputes its clients only if these move.
    pub hosts: Vec<String>,
    /// Members where a federated workload of it runs, and the identities that depend on it:
    /// what `/debug/identities` and `explain` show besides the objects.
    pub sources: BTreeSet<String>,
    pub clients: BTreeSet<String>,
}

impl IdentityOutput {
    fn is_empty(&self) -> bool {
        self.objects.is_empty()
            && self.diagnostics.is_empty()
            && self.reports.is_empty()
            && self.hosts.is_empty()
            && self.sources.is_empty()
            && self.clients.is_empty()
    }
}

/// The desired state of the whole fleet, by identity and by cluster.
///
/// Cloning it is cheap (a reference per identity and per cluster), so `run` publishes a copy
/// after every pass for its HTTP handlers; a later pass copies a cluster's map only when it
/// changes one that a published copy still holds.
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    by_identity: BTreeMap<String, Arc<IdentityOutput>>,
    by_cluster: ClusterMaps,
}

impl DesiredState {
    /// The objects desired in one cluster, sorted by key.
    pub fn cluster(&self, id: &str) -> impl Iterator<Item = &DesiredObject> {
        self.by_cluster.get(id).into_iter().flat_map(|m| m.values().map(|o| &o.object))
    }

    pub fn cluster_map(&self, id: &str) -> Option<&BTreeMap<ObjectKey, Arc<Desired>>> {
        self.by_cluster.get(id).map(|m| &**m)
    }

    pub fn object_count(&self) -> usize {
        self.by_cluster.values().map(|m| m.len()).sum()
    }

    /// Every identity with an output, in order.
    pub fn identities(&self) -> impl Iterator<Item = (&str, &IdentityOutput)> {
        self.by_identity.iter().map(|(id, o)| (id.as_str(), &**o))
    }

    pub fn identity(&self, id: &str) -> Option<&IdentityOutput> {
        self.by_identity.get(id).map(|o| &**o)
    }

    pub fn diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.by_identity.values().flat_map(|o| o.diagnostics.iter())
    }

    pub fn reports(&self) -> impl Iterator<Item = &PolicyReport> {
        self.by_identity.values().flat_map(|o| o.reports.iter())
    }

    /// What replacing `identity`'s output with `output` changes. Reads only, so identities are
    /// prepared on every core.
    fn prepare(&self, identity: &str, mut output: IdentityOutput) -> Swap {
        let old = self.by_identity.get(identity).map_or(&[][..], |o| &o.objects[..]);
        let same = old.len() == output.objects.len()
            && old.iter().zip(&output.objects).all(|((c1, o1), (c2, o2))| {
                c1 == c2 && o1.key == o2.key && (Arc::ptr_eq(o1, o2) || o1.digest == o2.digest)
            });
        if same {
            // Keep the objects the clusters hold, and free the rebuilt ones here, on this core.
            output.objects = old.to_vec();
            return Swap { output, objects: ObjectsChange::Same };
        }
        let mut removed = Vec::new();
        if !old.is_empty() {
            // Objects the identity no longer produces leave the clusters that held them.
            let kept: HashSet<(&str, &ObjectKey)> = output.objects.iter().map(|(c, o)| (&**c, &o.key)).collect();
            removed = old
                .iter()
                .filter(|(c, o)| !kept.contains(&(&**c, &o.key)))
                .map(|(c, o)| (c.clone(), o.key.clone()))
                .collect();
        }
        Swap { output, objects: ObjectsChange::Changed { removed } }
    }

    /// Swaps in the prepared outputs of `identities`, and records the (cluster, key) pairs whose
    /// object changed, per cluster in identity order. The clusters are independent, so they are
    /// updated on `threads` threads, each owning a fixed share of them: the result is the same.
    fn swap(&mut self, identities: &[&str], swaps: Vec<Swap>, threads: usize, changed: &mut Changed) {
        let threads = if swaps.len() < PARALLEL_MIN { 1 } else { threads.max(1) };
        let mut shares: Vec<ClusterMaps> = (0..threads).map(|_| ClusterMaps::new()).collect();
        for (id, objects) in std::mem::take(&mut self.by_cluster) {
            shares[owner(&id, threads)].insert(id, objects);
        }
        let changes: Vec<Changed> = std::thread::scope(|scope| {
            let swaps = &swaps;
            let mut shares = shares.iter_mut().enumerate();
            let (_, first) = shares.next().expect("at least one share");
            let others: Vec<_> = shares
                .map(|(n, share)| scope.spawn(move || swap_clusters(share, swaps, |c| owner(c, threads) == n)))
                .collect();
            let mut changes = vec![swap_clusters(first, swaps, |c| owner(c, threads) == 0)];
            changes.extend(others.into_iter().map(|t| t.join().expect("a swap thread panicked")));
            changes
        });
        for mut share in shares {
            self.by_cluster.append(&mut share);
        }
        for (cluster, keys) in changes.into_iter().flatten() {
            changed.entry(cluster).or_default().extend(keys);
        }
        for (identity, Swap { output, .. }) in identities.iter().zip(swaps) {
            self.by_identity.remove(*identity);
            if !output.is_empty() {
                self.by_identity.insert(identity.to_string(), Arc::new(output));
            }
        }
    }
}

type ClusterMaps = BTreeMap<ClusterId, Arc<BTreeMap<ObjectKey, Arc<Desired>>>>;

/// One identity's new output, and what it changes in the clusters.
struct Swap {
    output: IdentityOutput,
    objects: ObjectsChange,
}

enum ObjectsChange {
    /// The same objects (clusters, keys and digests) as before, which the output now holds
    /// instead of the rebuilt ones: nothing changes in the clusters.
    Same,
    /// The output's objects are upserted, and these (cluster, key) pairs removed.
    Changed { removed: Vec<(Arc<str>, ObjectKey)> },
}

/// Which of `threads` shares a cluster belongs to: fixed by its name (FNV-1a), so that every
/// object of a cluster is swapped by the same thread, in identity order.
fn owner(cluster: &str, threads: usize) -> usize {
    (crate::meta::fnv1a(cluster.as_bytes()) % threads as u64) as usize
}

/// Applies `swaps`, in order, to the clusters of `share` that `mine` selects; returns the keys
/// that changed there.
fn swap_clusters(share: &mut ClusterMaps, swaps: &[Swap], mine: impl Fn(&str) -> bool) -> Changed {
    let mut changed = Changed::new();
    // Clusters that hold nothing yet (all of them at start-up) are filled at the end, in bulk:
    // sorting their objects once costs far less than searching a growing tree for each.
    let mut fresh: BTreeMap<&str, Vec<FreshOp>> = BTreeMap::new();
    let mut seq = 0;
    let mut run_changed = Vec::new();
    for swap in swaps {
        let ObjectsChange::Changed { removed } = &swap.objects else {
            continue;
        };
        // An identity's objects come in runs per cluster: find each run's maps once.
        for run in swap.output.objects.chunk_by(|(a, _), (b, _)| Arc::ptr_eq(a, b)) {
            let cluster = &run[0].0;
            if !mine(cluster) {
                continue;
            }
            let slot = match share.get_mut(&**cluster) {
                Some(slot) => Arc::make_mut(slot),
                None => {
                    let ops = fresh.entry(cluster).or_default();
                    for (_, obj) in run {
                        ops.push(FreshOp { key: obj.key.clone(), seq, object: Some(obj.clone()) });
                        seq += 1;
                    }
                    continue;
                }
            };
            for (_, obj) in run {
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
                run_changed.push(obj.key.clone());
            }
            if !run_changed.is_empty() {
                changed_in(&mut changed, cluster).append(&mut run_changed);
            }
        }
        for (cluster, key) in removed {
            if !mine(cluster) {
                continue;
            }
            if let Some(ops) = fresh.get_mut(&**cluster) {
                ops.push(FreshOp { key: key.clone(), seq, object: None });
                seq += 1;
                continue;
            }
            if let Some(slot) = share.get_mut(&**cluster) {
                Arc::make_mut(slot).remove(key);
                if slot.is_empty() {
                    share.remove(&**cluster);
                }
            }
            changed_in(&mut changed, cluster).push(key.clone());
        }
    }
    for (cluster, ops) in fresh {
        let (objects, keys) = replay_fresh(ops);
        if !objects.is_empty() {
            share.insert(cluster.to_string(), Arc::new(objects));
        }
        if !keys.is_empty() {
            changed_in(&mut changed, cluster).extend(keys);
        }
    }
    changed
}

/// One upsert (with an object) or removal (without) aimed at a cluster that held nothing when
/// the swap began, numbered in the order the swap met it.
struct FreshOp {
    key: ObjectKey,
    seq: usize,
    object: Option<Arc<Desired>>,
}

/// The map and the changed keys that applying `ops` one by one to an empty cluster would give,
/// computed by sorting: each key's ops are replayed in order, and the changed keys are put back
/// in the order they were met.
fn replay_fresh(mut ops: Vec<FreshOp>) -> (BTreeMap<ObjectKey, Arc<Desired>>, Vec<ObjectKey>) {
    // Stable: a key's ops keep their order.
    ops.sort_by(|a, b| a.key.cmp(&b.key));
    let mut objects = Vec::with_capacity(ops.len());
    let mut changed: Vec<(usize, ObjectKey)> = Vec::with_capacity(ops.len());
    let mut ops = ops.into_iter().peekable();
    while let Some(FreshOp { key, seq, object }) = ops.next() {
        let mut current = None;
        let mut next = Some((seq, object));
        while let Some((seq, object)) = next {
            let unchanged = match (&object, &current) {
                (Some(new), Some(have)) => Arc::ptr_eq(have, new) || have.digest == new.digest,
                _ => false,
            };
            if !unchanged {
                current = object;
                changed.push((seq, key.clone()));
            }
            next = ops.next_if(|op| op.key == key).map(|op| (op.seq, op.object));
        }
        if let Some(object) = current {
            objects.push((key, object));
        }
    }
    changed.sort_unstable_by_key(|(seq, _)| *seq);
    // Already sorted by key and without duplicates, which `from_iter` recognises in one pass.
    (objects.into_iter().collect(), changed.into_iter().map(|(_, key)| key).collect())
}

/// Object keys whose desired content changed (added, modified or removed), per cluster, in the
/// order the recompute met them. A list, not a set: recording a change costs no search.
pub type Changed = BTreeMap<ClusterId, Vec<ObjectKey>>;

fn changed_in<'a>(changed: &'a mut Changed, cluster: &str) -> &'a mut Vec<ObjectKey> {
    if changed.contains_key(cluster) {
        return changed.get_mut(cluster).expect("just checked");
    }
    changed.entry(cluster.to_string()).or_default()
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
        let mut dirty = self.fleet.take_dirty();
        let mut result = Recomputed::default();
        if dirty.is_empty() {
            return result;
        }
        if dirty.all || dirty.facts {
            self.facts = cluster_facts(&self.fleet, &self.settings);
        }
        // Hosts someone else's ServiceEntry began or stopped holding: whoever writes them.
        if !dirty.hosts.is_empty() {
            for (id, out) in &self.desired.by_identity {
                if out.hosts.iter().any(|h| dirty.hosts.contains(h)) {
                    dirty.identities.entry(id.clone()).or_insert(Reach::Itself);
                }
            }
        }
        // Identities that differ only in case share hosts: one's change can move them to the other.
        let twins: Vec<(String, Reach)> = dirty
            .identities
            .iter()
            .flat_map(|(id, reach)| {
                self.fleet.case_twins(id).filter(move |t| t != id).map(move |t| (t.to_string(), *reach))
            })
            .collect();
        for (twin, reach) in twins {
            let have = dirty.identities.entry(twin).or_insert(reach);
            *have = (*have).max(reach);
        }
        // A `*` client's workloads moving sets `all` in the model; naming a `*` client as a
        // destination, or editing its Dependency, only touches the identities involved.
        let identities: BTreeSet<String> = if dirty.all {
            let mut all = self.fleet.identities();
            all.extend(self.desired.by_identity.keys().cloned());
            all
        } else {
            // The model says how far each change can reach. Destinations are written where we
            // run. Clients that name us list our hosts in their Sidecars and Dependency statuses
            // (a `*` client has no Sidecar, and its status lists only what it names), so they are
            // recomputed when our hosts move, which resolving us again tells.
            let probe = identity::Running::new(&self.fleet, HashMap::new());
            let mut set = BTreeSet::new();
            for (id, reach) in dirty.identities {
                if reach >= Reach::Clients {
                    let now = identity::resolve(&self.fleet, &self.settings, &probe, &id);
                    let before = self.desired.by_identity.get(&id).map_or(&[][..], |o| &o.hosts[..]);
                    if !now.written_hosts().eq(before.iter().map(String::as_str)) {
                        set.extend(self.fleet.named_clients_of(&id).map(str::to_string));
                    }
                }
                if reach >= Reach::Neighbours {
                    set.extend(self.fleet.destinations_of(&id).map(str::to_string));
                }
                set.insert(id);
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

        // 3. Build objects on every core, comparing each identity's with what it produced before;
        //    then swap them in, each cluster's on one thread, in identity order.
        let swaps = parallel_map(*threads, &identities, |id| {
            desired.prepare(id, objects::compute_identity(fleet, settings, facts, &pass, id, vips))
        });
        desired.swap(&identities, swaps, *threads, &mut result.changed);
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
            if facts.health == ClusterHealth::Stale {
                out.push(Diagnostic::warning(
                    Some(id),
                    "cluster".into(),
                    "stale (its API server cannot be watched): its last known workloads are kept, and nothing is written to or pruned from it until it is back".into(),
                ));
            }
        }
        out
    }

    /// Reads one Kubernetes object into the model (see `ingest::distill`).
    pub fn ingest(&mut self, cluster: &str, obj: &InputObject) {
        let (namespace, name) = obj.key();
        match crate::ingest::distill(obj, cluster, &self.settings.identity_label) {
            Some(record) => self.fleet.upsert(cluster, &namespace, &name, record),
            // Ignored (a Sidecar of ours): whatever was kept under its name goes.
            None => self.fleet.delete(cluster, obj.kind(), &namespace, &name),
        }
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
                health: c.health,
                region: c.region(),
                gateway_address: c.gateway_address(&settings.gateway_selectors),
                gateway_port: c.gateway_port(settings.gateway_port),
            };
            (id.clone(), facts)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind(n: u8) -> Kind {
        [Kind::DestinationRule, Kind::ServiceEntry, Kind::Sidecar][usize::from(n % 3)]
    }

    /// A Sidecar named `name` whose content is one of three (variants 0 and 1 are equal).
    fn sidecar(name: &str, variant: u8) -> Arc<Desired> {
        use crate::istio::{EgressListener, SidecarSpec};
        let spec = SidecarSpec {
            workload_selector: None,
            egress: vec![EgressListener { hosts: vec![format!("ns/h{}", variant.max(1))] }],
        };
        let meta = ObjectMeta { name: Some(name.into()), namespace: Some("ns".into()), ..Default::default() };
        Arc::new(Desired::new(DesiredObject::Sidecar(Sidecar { metadata: meta, spec })))
    }

    proptest! {
        /// Filling an empty cluster in bulk gives the map and the changed keys (in order) that
        /// applying the same upserts and removals one by one gives.
        #[test]
        fn bulk_fill_equals_one_by_one(ops in proptest::collection::vec((0u8..4, proptest::option::of(0u8..3)), 0..40)) {
            let ops: Vec<(ObjectKey, Option<Arc<Desired>>)> = ops
                .iter()
                .map(|(k, v)| {
                    let name = format!("s{k}");
                    (ObjectKey::new(Kind::Sidecar, "ns", &name), v.map(|v| sidecar(&name, v)))
                })
                .collect();
            let mut map: BTreeMap<ObjectKey, Arc<Desired>> = BTreeMap::new();
            let mut changed = Vec::new();
            for (key, object) in &ops {
                match object {
                    Some(new) => {
                        if map.get(key).is_some_and(|have| Arc::ptr_eq(have, new) || have.digest == new.digest) {
                            continue;
                        }
                        map.insert(key.clone(), new.clone());
                    }
                    None => {
                        map.remove(key);
                    }
                }
                changed.push(key.clone());
            }
            let fresh = ops.into_iter().enumerate().map(|(seq, (key, object))| FreshOp { key, seq, object }).collect();
            let (bulk, bulk_changed) = replay_fresh(fresh);
            prop_assert_eq!(bulk, map);
            prop_assert_eq!(bulk_changed, changed);
        }

        /// The shortcuts in `ObjectKey`'s comparison (shared namespaces, the name's first 16
        /// bytes) order keys exactly as the (kind, namespace, name) strings do. Names share long
        /// prefixes on purpose, so that the 16 bytes often tie.
        #[test]
        fn object_keys_order_like_their_strings(
            a in (0u8..3, "[a-c]{0,3}", "(stage\\.svc0000|x)[0-9a-c.-]{0,6}"),
            b in (0u8..3, "[a-c]{0,3}", "(stage\\.svc0000|x)[0-9a-c.-]{0,6}"),
        ) {
            let ka = ObjectKey::new(kind(a.0), &a.1, &a.2);
            let kb = ObjectKey::new(kind(b.0), &b.1, &b.2);
            let strings = (kind(a.0), a.1.as_str(), a.2.as_str()).cmp(&(kind(b.0), b.1.as_str(), b.2.as_str()));
            prop_assert_eq!(ka.cmp(&kb), strings);
            prop_assert_eq!(ka == kb, strings.is_eq());
            prop_assert_eq!(ka.clone().cmp(&ka), std::cmp::Ordering::Equal);
        }
    }
}
