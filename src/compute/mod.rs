//! The pure engine: fleet model in, desired Istio objects per member out.
//!
//! `Engine::recompute` takes the identities the model marked dirty, widens them to everything
//! whose output can depend on them (clients and destinations), recomputes those identities and
//! swaps their outputs in the desired state, returning the object keys that changed per cluster.
//! `render` calls it once on a fleet read from files; `run` calls it after every burst of watch
//! events. No clients, clocks, randomness or I/O anywhere below this module.

pub mod identity;
pub mod objects;
pub mod plan;
pub mod policy;
pub mod status;
pub mod vip;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::istio::{DestinationRule, ServiceEntry, Sidecar};
use crate::model::{ClusterId, Fleet, ObjectRef, Policy};
use crate::settings::Settings;

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

/// Identifies one written object inside one cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
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
        ObjectKey {
            kind: self.kind(),
            namespace: m.namespace.clone().unwrap_or_default(),
            name: m.name.clone().unwrap_or_default(),
        }
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
    pub region: Option<String>,
    pub gateway_address: Option<String>,
    pub gateway_port: u16,
}

/// What one identity contributes: objects per cluster, diagnostics, policy reports.
#[derive(Clone, Debug, Default)]
pub struct IdentityOutput {
    pub objects: Vec<(ClusterId, Arc<DesiredObject>)>,
    pub diagnostics: Vec<Diagnostic>,
    pub reports: Vec<PolicyReport>,
}

/// The desired state of the whole fleet, by identity and by cluster.
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    by_identity: BTreeMap<String, IdentityOutput>,
    by_cluster: BTreeMap<ClusterId, BTreeMap<ObjectKey, Arc<DesiredObject>>>,
}

impl DesiredState {
    /// The objects desired in one cluster, sorted by key.
    pub fn cluster(&self, id: &str) -> impl Iterator<Item = &DesiredObject> {
        self.by_cluster.get(id).into_iter().flat_map(|m| m.values().map(|o| o.as_ref()))
    }

    pub fn cluster_map(&self, id: &str) -> Option<&BTreeMap<ObjectKey, Arc<DesiredObject>>> {
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
    fn replace(
        &mut self,
        identity: &str,
        output: IdentityOutput,
        changed: &mut BTreeMap<ClusterId, BTreeSet<ObjectKey>>,
    ) {
        let old = self.by_identity.remove(identity).unwrap_or_default();
        let mut new_keys: BTreeSet<(&str, ObjectKey)> = BTreeSet::new();
        for (cluster, obj) in &output.objects {
            let key = obj.key();
            new_keys.insert((cluster.as_str(), key.clone()));
            let slot = self.by_cluster.entry(cluster.clone()).or_default();
            if slot.get(&key).map(|o| o.as_ref()) != Some(obj.as_ref()) {
                slot.insert(key.clone(), obj.clone());
                changed.entry(cluster.clone()).or_default().insert(key);
            }
        }
        for (cluster, obj) in &old.objects {
            let key = obj.key();
            if !new_keys.contains(&(cluster.as_str(), key.clone())) {
                if let Some(slot) = self.by_cluster.get_mut(cluster) {
                    slot.remove(&key);
                    if slot.is_empty() {
                        self.by_cluster.remove(cluster);
                    }
                }
                changed.entry(cluster.clone()).or_default().insert(key);
            }
        }
        if !output.objects.is_empty() || !output.diagnostics.is_empty() || !output.reports.is_empty() {
            self.by_identity.insert(identity.to_string(), output);
        }
    }
}

/// The result of one recompute.
#[derive(Clone, Debug, Default)]
pub struct Recomputed {
    /// How many identities were recomputed.
    pub identities: usize,
    /// Object keys whose desired content changed (added, modified or removed), per cluster.
    pub changed: BTreeMap<ClusterId, BTreeSet<ObjectKey>>,
    /// VIPs allocated by this recompute: persist them before writing.
    pub new_vips: BTreeMap<String, Ipv4Addr>,
}

/// The fleet model, the settings and the desired state they produce.
pub struct Engine {
    pub settings: Settings,
    pub fleet: Fleet,
    pub vips: VipTable,
    pub desired: DesiredState,
    facts: BTreeMap<ClusterId, ClusterFacts>,
}

impl Engine {
    pub fn new(settings: Settings, vips: VipTable) -> Self {
        let fleet = Fleet::new(&settings.identity_label);
        Engine { settings, fleet, vips, desired: DesiredState::default(), facts: BTreeMap::new() }
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
            // Clients list our hosts in their Sidecars; destinations are written where we run.
            let mut set = dirty.identities.clone();
            for id in &dirty.identities {
                set.extend(self.fleet.clients_of(id).into_iter().map(str::to_string));
                set.extend(self.fleet.destinations_of(id).into_iter().map(str::to_string));
            }
            set
        };
        let mut cache = identity::PassCache::default();
        for id in &identities {
            let output =
                objects::compute_identity(&self.fleet, &self.settings, &self.facts, id, &mut self.vips, &mut cache);
            self.desired.replace(id, output, &mut result.changed);
        }
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

fn cluster_facts(fleet: &Fleet, settings: &Settings) -> BTreeMap<ClusterId, ClusterFacts> {
    fleet
        .clusters
        .iter()
        .map(|(id, c)| {
            let facts = ClusterFacts {
                region: c.region(),
                gateway_address: c.gateway_address(&settings.gateway_selectors),
                gateway_port: c.gateway_port(settings.gateway_port),
            };
            (id.clone(), facts)
        })
        .collect()
}
