//! The fleet model: what flotilla knows about every member, as plain owned data.
//!
//! Kubernetes objects (from watches in `run`, from files in `render`) are distilled here into the
//! few fields the engine reads, and indexed by identity so that one change can be recomputed
//! without looking at the rest of the fleet. Every mutation records which identities it touched
//! and how far the change reaches (`take_dirty`, `Reach`); that is what the engine recomputes. No
//! clients, clocks or I/O.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::crd::{
    ClientConnectionConfig, ClientConnectionConfigSpec, Dependency, GlobalTrafficPolicy, GlobalTrafficPolicySpec,
    OutlierDetection, OutlierDetectionSpec,
};
use crate::istio::Sidecar;

/// The pseudo cluster id under which Dependencies kept in a hub that is not a member are stored.
/// Not a DNS label, so it can never collide with a member's id.
pub const HUB: &str = "_hub";

pub const ANNOTATION_ENV: &str = "admiral.io/env";
pub const LABEL_IGNORE: &str = "admiral.io/ignore";
pub const ANNOTATION_INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
pub const LABEL_REGION_LEGACY: &str = "failure-domain.beta.kubernetes.io/region";
pub const GATEWAY_NAMESPACE: &str = "istio-system";
pub const DEFAULT_ENV: &str = "default";

pub type ClusterId = String;
/// (namespace, name) of a namespaced object inside one cluster.
pub type NsName = (String, String);

/// A namespaced object somewhere in the fleet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub cluster: ClusterId,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}

/// A member's health as the registry sees it. The engine keeps a stale member's last known
/// workloads (fail static); only the writer treats it differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClusterHealth {
    #[default]
    Synced,
    Stale,
}

/// Per-member settings from the registration Secret's annotations or `fleet.yaml`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterOverrides {
    pub region: Option<String>,
    pub gateway_address: Option<String>,
    pub gateway_port: Option<u16>,
}

/// A Deployment, reduced to what federation needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub identity: Option<String>,
    /// Whether the identity is a pod-template label (a Sidecar can select it) or an annotation.
    pub identity_from_label: bool,
    pub env: String,
    /// `admiral.io/ignore` on the workload or its pod template.
    pub opted_out: bool,
    pub pod_labels: BTreeMap<String, String>,
    /// First integer of `traffic.sidecar.istio.io/includeInboundPorts`.
    pub inbound_port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePortInfo {
    pub name: Option<String>,
    pub port: i32,
    pub target_port: Option<IntOrString>,
    pub app_protocol: Option<String>,
}

/// A Service, reduced to what federation needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePortInfo>,
    pub opted_out: bool,
    pub created: Option<Timestamp>,
    /// `status.loadBalancer.ingress[0]` (ip, else hostname), else `spec.externalIPs[0]`.
    pub external_address: Option<String>,
}

/// A policy object with what was derived from its metadata, and its last valid spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy<S> {
    pub at: ObjectRef,
    pub identity: Option<String>,
    pub env: String,
    /// The integer `priority` label (GTPs only; absent = 0).
    pub priority: i64,
    pub created: Option<Timestamp>,
    pub generation: Option<i64>,
    /// The newest spec that passed validation. Kept when a later edit is invalid, so that a
    /// typo never tears down working config.
    pub effective: Option<S>,
    /// Why the newest spec was rejected, if it was.
    pub invalid: Option<String>,
    /// Problems that do not invalidate the policy (e.g. an unparsable priority label).
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DependencyEntry {
    pub at: ObjectRef,
    pub source: String,
    pub destinations: BTreeSet<String>,
    /// `*` among the destinations: every identity.
    pub wildcard: bool,
    pub generation: Option<i64>,
    pub invalid: Option<String>,
}

/// Everything known about one member cluster.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub id: ClusterId,
    pub overrides: ClusterOverrides,
    pub health: ClusterHealth,
    /// Node name → its region label, if any.
    pub nodes: BTreeMap<String, Option<String>>,
    pub opted_out_namespaces: BTreeSet<String>,
    pub workloads: BTreeMap<NsName, Workload>,
    pub services: BTreeMap<NsName, ServiceInfo>,
    /// Sidecars flotilla does not manage: their workload selector (None = the whole namespace).
    pub foreign_sidecars: BTreeMap<NsName, Option<BTreeMap<String, String>>>,
}

impl Cluster {
    /// The most common node region (ties: the smallest name), unless overridden.
    pub fn region(&self) -> Option<String> {
        if let Some(r) = &self.overrides.region {
            return Some(r.clone());
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for region in self.nodes.values().flatten() {
            *counts.entry(region).or_default() += 1;
        }
        // max_by_key returns the last maximum; iterate in reverse so ties go to the smallest name.
        counts.iter().rev().max_by_key(|(_, n)| **n).map(|(r, _)| r.to_string())
    }

    /// The address other members use to reach this one, and how it was found.
    pub fn gateway_address(&self, selectors: &[crate::settings::LabelTerm]) -> Option<String> {
        if let Some(a) = &self.overrides.gateway_address {
            return Some(a.clone());
        }
        for term in selectors {
            let found = self.services_in(GATEWAY_NAMESPACE).find(|s| s.labels.get(&term.key) == Some(&term.value));
            if let Some(svc) = found {
                return svc.external_address.clone();
            }
        }
        None
    }

    pub fn gateway_port(&self, default: u16) -> u16 {
        self.overrides.gateway_port.unwrap_or(default)
    }

    pub fn services_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a ServiceInfo> + 'a {
        self.services
            .range((namespace.to_string(), String::new())..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .map(|(_, s)| s)
    }

    pub fn workloads_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .range((namespace.to_string(), String::new())..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .map(|(_, w)| w)
    }

    /// Whether a workload takes part in federation: not opted out itself, nor its namespace.
    pub fn is_federated(&self, w: &Workload) -> bool {
        w.identity.is_some() && !w.opted_out && !self.opted_out_namespaces.contains(&w.namespace)
    }
}

/// How far a change to an identity reaches: which other identities' outputs read what changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    /// Only its own outputs: a policy that cannot change its hosts (OutlierDetection,
    /// ClientConnectionConfig), a user's Sidecar next to its workloads, or a Dependency (of
    /// which it is the source, or a destination that was added or dropped).
    Itself,
    /// Also its named clients, whose Sidecars and Dependency statuses list its hosts, if its
    /// hosts changed: a GTP, whose `dnsPrefix` entries are hosts.
    Clients,
    /// Also its destinations, which are written where it runs, and its clients if its hosts
    /// changed: its workloads or their Services.
    Neighbours,
}

/// Which identities need recomputing, and how far each change reaches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub all: bool,
    pub identities: BTreeMap<String, Reach>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.all && self.identities.is_empty()
    }
    fn touch(&mut self, identity: Option<&str>, reach: Reach) {
        let Some(id) = identity else { return };
        if self.all {
            return;
        }
        match self.identities.get_mut(id) {
            Some(have) => *have = (*have).max(reach),
            None => {
                self.identities.insert(id.to_string(), reach);
            }
        }
    }
}

/// One object of a kind the engine reads, as it arrives from a watch or a file.
#[derive(Clone, Debug)]
pub enum InputObject {
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    Node(Box<Node>),
    Namespace(Box<Namespace>),
    Sidecar(Box<Sidecar>),
    GlobalTrafficPolicy(Box<GlobalTrafficPolicy>),
    OutlierDetection(Box<OutlierDetection>),
    ClientConnectionConfig(Box<ClientConnectionConfig>),
    Dependency(Box<Dependency>),
}

/// Identifies a deleted object: kind plus namespace/name (namespace empty for cluster scope).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InputKind {
    Deployment,
    Service,
    Node,
    Namespace,
    Sidecar,
    GlobalTrafficPolicy,
    OutlierDetection,
    ClientConnectionConfig,
    Dependency,
}

impl InputObject {
    pub fn kind(&self) -> InputKind {
        match self {
            InputObject::Deployment(_) => InputKind::Deployment,
            InputObject::Service(_) => InputKind::Service,
            InputObject::Node(_) => InputKind::Node,
            InputObject::Namespace(_) => InputKind::Namespace,
            InputObject::Sidecar(_) => InputKind::Sidecar,
            InputObject::GlobalTrafficPolicy(_) => InputKind::GlobalTrafficPolicy,
            InputObject::OutlierDetection(_) => InputKind::OutlierDetection,
            InputObject::ClientConnectionConfig(_) => InputKind::ClientConnectionConfig,
            InputObject::Dependency(_) => InputKind::Dependency,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            InputObject::Deployment(o) => &o.metadata,
            InputObject::Service(o) => &o.metadata,
            InputObject::Node(o) => &o.metadata,
            InputObject::Namespace(o) => &o.metadata,
            InputObject::Sidecar(o) => &o.metadata,
            InputObject::GlobalTrafficPolicy(o) => &o.metadata,
            InputObject::OutlierDetection(o) => &o.metadata,
            InputObject::ClientConnectionConfig(o) => &o.metadata,
            InputObject::Dependency(o) => &o.metadata,
        }
    }
}

/// The whole fleet: members, policies, and the indexes that make per-identity recompute cheap.
#[derive(Clone, Debug)]
pub struct Fleet {
    identity_label: String,
    pub clusters: BTreeMap<ClusterId, Cluster>,
    pub gtps: BTreeMap<ObjectRef, Policy<GlobalTrafficPolicySpec>>,
    pub outlier_detections: BTreeMap<ObjectRef, Policy<OutlierDetectionSpec>>,
    pub connection_configs: BTreeMap<ObjectRef, Policy<ClientConnectionConfigSpec>>,
    pub dependencies: BTreeMap<ObjectRef, DependencyEntry>,
    /// identity → where its workloads are (cluster, namespace, name).
    by_identity: BTreeMap<String, BTreeSet<(ClusterId, NsName)>>,
    /// identity → the GTPs / ODs / CCCs that name it.
    gtps_by_identity: BTreeMap<String, BTreeSet<ObjectRef>>,
    ods_by_identity: BTreeMap<String, BTreeSet<ObjectRef>>,
    cccs_by_identity: BTreeMap<String, BTreeSet<ObjectRef>>,
    /// source identity → its Dependencies.
    deps_by_source: BTreeMap<String, BTreeSet<ObjectRef>>,
    /// destination identity → sources that name it explicitly.
    clients_by_destination: BTreeMap<String, BTreeSet<String>>,
    /// sources with a `*` destination.
    wildcard_sources: BTreeSet<String>,
    /// source → the destinations it currently contributes to `clients_by_destination`.
    named_by_source: BTreeMap<String, BTreeSet<String>>,
    dirty: Dirty,
}

impl Fleet {
    pub fn new(identity_label: &str) -> Self {
        Fleet {
            identity_label: identity_label.to_string(),
            clusters: BTreeMap::new(),
            gtps: BTreeMap::new(),
            outlier_detections: BTreeMap::new(),
            connection_configs: BTreeMap::new(),
            dependencies: BTreeMap::new(),
            by_identity: BTreeMap::new(),
            gtps_by_identity: BTreeMap::new(),
            ods_by_identity: BTreeMap::new(),
            cccs_by_identity: BTreeMap::new(),
            deps_by_source: BTreeMap::new(),
            clients_by_destination: BTreeMap::new(),
            wildcard_sources: BTreeSet::new(),
            named_by_source: BTreeMap::new(),
            dirty: Dirty { all: true, identities: BTreeMap::new() },
        }
    }

    pub fn identity_label(&self) -> &str {
        &self.identity_label
    }

    /// The identities touched since the last call; everything on the first call.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// Makes the next recompute a full one.
    pub fn mark_all_dirty(&mut self) {
        self.dirty.all = true;
    }

    /// Adds a member (or updates its overrides). A new or changed member can change endpoints,
    /// localities and targets of many identities, so everything is recomputed.
    pub fn upsert_cluster(&mut self, id: &str, overrides: ClusterOverrides) {
        let cluster = self.clusters.entry(id.to_string()).or_insert_with(|| {
            self.dirty.all = true;
            Cluster { id: id.to_string(), ..Default::default() }
        });
        if cluster.overrides != overrides {
            cluster.overrides = overrides;
            self.dirty.all = true;
        }
    }

    /// Removes a member and everything learned from it.
    pub fn remove_cluster(&mut self, id: &str) {
        let Some(cluster) = self.clusters.remove(id) else {
            return;
        };
        for w in cluster.workloads.values() {
            self.unindex_workload(id, w);
        }
        let in_cluster = |r: &&ObjectRef| r.cluster == id;
        let gtps: Vec<ObjectRef> = self.gtps.keys().filter(in_cluster).cloned().collect();
        let ods: Vec<ObjectRef> = self.outlier_detections.keys().filter(in_cluster).cloned().collect();
        let cccs: Vec<ObjectRef> = self.connection_configs.keys().filter(in_cluster).cloned().collect();
        let deps: Vec<ObjectRef> = self.dependencies.keys().filter(in_cluster).cloned().collect();
        for (kind, refs) in [
            (InputKind::GlobalTrafficPolicy, gtps),
            (InputKind::OutlierDetection, ods),
            (InputKind::ClientConnectionConfig, cccs),
            (InputKind::Dependency, deps),
        ] {
            for r in refs {
                self.delete(id, kind, &r.namespace, &r.name);
            }
        }
        self.dirty.all = true;
    }

    /// Marks a member stale or synced. Stale members keep their last known state (fail static),
    /// so nothing needs recomputing; the health is reported and gates the writer.
    pub fn set_health(&mut self, id: &str, health: ClusterHealth) {
        if let Some(c) = self.clusters.get_mut(id) {
            c.health = health;
        }
    }

    /// Identities that have workloads anywhere, are named by a policy, or are Dependency sources.
    pub fn identities(&self) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self.by_identity.keys().cloned().collect();
        all.extend(self.gtps_by_identity.keys().cloned());
        all.extend(self.ods_by_identity.keys().cloned());
        all.extend(self.cccs_by_identity.keys().cloned());
        all.extend(self.deps_by_source.keys().cloned());
        all
    }

    /// The workloads of one identity, in (cluster, namespace, name) order.
    pub fn workloads_of<'a>(&'a self, identity: &str) -> impl Iterator<Item = (&'a Cluster, &'a Workload)> + 'a {
        self.by_identity.get(identity).into_iter().flatten().filter_map(move |(c, key)| {
            let cluster = self.clusters.get(c)?;
            let w = cluster.workloads.get(key)?;
            Some((cluster, w))
        })
    }

    /// Members where a federated workload of `identity` runs (any env).
    pub fn clusters_running(&self, identity: &str) -> BTreeSet<&str> {
        self.workloads_of(identity).filter(|(c, w)| c.is_federated(w)).map(|(c, _)| c.id.as_str()).collect()
    }

    pub fn gtps_of(&self, identity: &str) -> impl Iterator<Item = &Policy<GlobalTrafficPolicySpec>> {
        self.gtps_by_identity.get(identity).into_iter().flatten().filter_map(|r| self.gtps.get(r))
    }
    pub fn outlier_detections_of(&self, identity: &str) -> impl Iterator<Item = &Policy<OutlierDetectionSpec>> {
        self.ods_by_identity.get(identity).into_iter().flatten().filter_map(|r| self.outlier_detections.get(r))
    }
    pub fn connection_configs_of(&self, identity: &str) -> impl Iterator<Item = &Policy<ClientConnectionConfigSpec>> {
        self.cccs_by_identity.get(identity).into_iter().flatten().filter_map(|r| self.connection_configs.get(r))
    }
    pub fn dependencies_of(&self, source: &str) -> impl Iterator<Item = &DependencyEntry> {
        self.deps_by_source.get(source).into_iter().flatten().filter_map(|r| self.dependencies.get(r))
    }

    /// Identities that depend on `destination`: those naming it, and those with `*`.
    pub fn clients_of(&self, destination: &str) -> BTreeSet<&str> {
        let mut out: BTreeSet<&str> = self.wildcard_sources.iter().map(String::as_str).collect();
        if let Some(named) = self.clients_by_destination.get(destination) {
            out.extend(named.iter().map(String::as_str));
        }
        out
    }

    /// Sources that name `destination` explicitly (not through `*`).
    pub fn named_clients_of(&self, destination: &str) -> impl Iterator<Item = &str> {
        self.clients_by_destination.get(destination).into_iter().flatten().map(String::as_str)
    }

    /// Sources with a `*` destination: clients of every identity.
    pub fn wildcard_sources(&self) -> impl Iterator<Item = &str> {
        self.wildcard_sources.iter().map(String::as_str)
    }

    /// Destinations that `source` names explicitly (not through `*`) in its valid Dependencies,
    /// in order.
    pub fn destinations_of(&self, source: &str) -> impl Iterator<Item = &str> {
        self.named_by_source.get(source).into_iter().flatten().map(String::as_str)
    }

    pub fn has_wildcard(&self, source: &str) -> bool {
        self.wildcard_sources.contains(source)
    }

    /// Adds or replaces one object seen in cluster `cluster` (or `HUB`).
    pub fn upsert(&mut self, cluster: &str, obj: InputObject) {
        let meta = obj.meta();
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        if cluster != HUB && !self.clusters.contains_key(cluster) {
            self.upsert_cluster(cluster, ClusterOverrides::default());
        }
        match obj {
            InputObject::Deployment(d) => {
                let w = distill_workload(&d, &self.identity_label);
                self.set_workload(cluster, (namespace, name), Some(w));
            }
            InputObject::Service(s) => self.set_service(cluster, (namespace, name), Some(distill_service(&s))),
            InputObject::Node(n) => self.set_node(cluster, name, Some(node_region(&n))),
            InputObject::Namespace(n) => self.set_namespace_opt_out(cluster, &name, has_ignore(&n.metadata)),
            InputObject::Sidecar(s) => {
                if is_managed(&s.metadata) {
                    return;
                }
                let selector = s.spec.workload_selector.as_ref().map(|ws| ws.labels.clone());
                if let Some(c) = self.clusters.get_mut(cluster) {
                    c.foreign_sidecars.insert((namespace, name), selector);
                }
                self.touch_namespace(cluster, &meta_ns(&s.metadata), Reach::Itself);
            }
            InputObject::GlobalTrafficPolicy(g) => {
                let at = ObjectRef { cluster: cluster.to_string(), namespace, name };
                let mut policy = policy_header(at, &g.metadata, Some(&g.spec.selector), &self.identity_label);
                policy.priority = match g.metadata.labels.as_ref().and_then(|l| l.get("priority")) {
                    None => 0,
                    Some(p) => p.trim().parse().unwrap_or_else(|_| {
                        policy.warnings.push(format!("label priority={p:?} is not an integer; using 0"));
                        0
                    }),
                };
                let valid = crate::compute::policy::validate_gtp(&g.spec, &policy.env);
                let (policies, index) = (&mut self.gtps, &mut self.gtps_by_identity);
                store_policy(policies, index, &mut self.dirty, Reach::Clients, policy, &g.spec, valid);
            }
            InputObject::OutlierDetection(o) => {
                let at = ObjectRef { cluster: cluster.to_string(), namespace, name };
                let policy = policy_header(at, &o.metadata, Some(&o.spec.selector), &self.identity_label);
                let (policies, index) = (&mut self.outlier_detections, &mut self.ods_by_identity);
                store_policy(policies, index, &mut self.dirty, Reach::Itself, policy, &o.spec, Ok(()));
            }
            InputObject::ClientConnectionConfig(o) => {
                let at = ObjectRef { cluster: cluster.to_string(), namespace, name };
                let policy = policy_header(at, &o.metadata, Some(&o.spec.selector), &self.identity_label);
                let valid = crate::compute::policy::validate_connection_config(&o.spec);
                let (policies, index) = (&mut self.connection_configs, &mut self.cccs_by_identity);
                store_policy(policies, index, &mut self.dirty, Reach::Itself, policy, &o.spec, valid);
            }
            InputObject::Dependency(d) => {
                let at = ObjectRef { cluster: cluster.to_string(), namespace, name };
                let source = d.spec.source.trim().to_string();
                let mut destinations: BTreeSet<String> =
                    d.spec.destinations.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
                let wildcard = destinations.remove("*");
                let invalid = if source.is_empty() { Some("spec.source is empty".to_string()) } else { None };
                let entry = DependencyEntry {
                    at: at.clone(),
                    source,
                    destinations,
                    wildcard,
                    generation: d.metadata.generation,
                    invalid,
                };
                self.set_dependency(at, Some(entry));
            }
        }
    }

    /// Removes one object; unknown objects are ignored.
    pub fn delete(&mut self, cluster: &str, kind: InputKind, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let at = ObjectRef { cluster: cluster.to_string(), namespace: namespace.to_string(), name: name.to_string() };
        match kind {
            InputKind::Deployment => self.set_workload(cluster, key, None),
            InputKind::Service => self.set_service(cluster, key, None),
            InputKind::Node => self.set_node(cluster, name.to_string(), None),
            InputKind::Namespace => self.set_namespace_opt_out(cluster, name, false),
            InputKind::Sidecar => {
                if let Some(c) = self.clusters.get_mut(cluster)
                    && c.foreign_sidecars.remove(&key).is_some()
                {
                    self.touch_namespace(cluster, namespace, Reach::Itself);
                }
            }
            InputKind::GlobalTrafficPolicy => {
                if let Some(old) = self.gtps.remove(&at) {
                    reindex_policy(
                        &mut self.gtps_by_identity,
                        &mut self.dirty,
                        Reach::Clients,
                        &at,
                        old.identity,
                        None,
                    );
                }
            }
            InputKind::OutlierDetection => {
                if let Some(old) = self.outlier_detections.remove(&at) {
                    reindex_policy(&mut self.ods_by_identity, &mut self.dirty, Reach::Itself, &at, old.identity, None);
                }
            }
            InputKind::ClientConnectionConfig => {
                if let Some(old) = self.connection_configs.remove(&at) {
                    reindex_policy(&mut self.cccs_by_identity, &mut self.dirty, Reach::Itself, &at, old.identity, None);
                }
            }
            InputKind::Dependency => self.set_dependency(at, None),
        }
    }

    fn set_workload(&mut self, cluster: &str, key: NsName, new: Option<Workload>) {
        let Some(c) = self.clusters.get_mut(cluster) else {
            return;
        };
        let old = match &new {
            Some(w) => c.workloads.insert(key, w.clone()),
            None => c.workloads.remove(&key),
        };
        if old == new {
            return;
        }
        // Where a `*` client runs decides where every identity is written.
        let wildcard_client = [&old, &new]
            .iter()
            .any(|w| w.as_ref().and_then(|w| w.identity.as_ref()).is_some_and(|id| self.wildcard_sources.contains(id)));
        if wildcard_client {
            self.dirty.all = true;
        }
        if let Some(o) = &old {
            self.unindex_workload(cluster, o);
        }
        if let Some(n) = &new {
            if let Some(id) = &n.identity {
                let key = (n.namespace.clone(), n.name.clone());
                self.by_identity.entry(id.clone()).or_default().insert((cluster.to_string(), key));
            }
            self.dirty.touch(n.identity.as_deref(), Reach::Neighbours);
        }
    }

    fn unindex_workload(&mut self, cluster: &str, w: &Workload) {
        if let Some(id) = &w.identity
            && let Some(set) = self.by_identity.get_mut(id)
        {
            set.remove(&(cluster.to_string(), (w.namespace.clone(), w.name.clone())));
            if set.is_empty() {
                self.by_identity.remove(id);
            }
        }
        self.dirty.touch(w.identity.as_deref(), Reach::Neighbours);
    }

    fn set_service(&mut self, cluster: &str, key: NsName, new: Option<ServiceInfo>) {
        let Some(c) = self.clusters.get_mut(cluster) else {
            return;
        };
        let gateway_namespace = key.0 == GATEWAY_NAMESPACE;
        let old = match &new {
            Some(s) => c.services.insert(key.clone(), s.clone()),
            None => c.services.remove(&key),
        };
        if old == new {
            return;
        }
        // A gateway Service moves the address every other member uses to reach this one.
        if gateway_namespace {
            self.dirty.all = true;
        }
        self.touch_namespace(cluster, &key.0, Reach::Neighbours);
    }

    fn set_node(&mut self, cluster: &str, name: String, region: Option<Option<String>>) {
        let Some(c) = self.clusters.get_mut(cluster) else {
            return;
        };
        let before = c.region();
        match region {
            Some(r) => c.nodes.insert(name, r),
            None => c.nodes.remove(&name),
        };
        if c.region() != before {
            self.dirty.all = true;
        }
    }

    fn set_namespace_opt_out(&mut self, cluster: &str, namespace: &str, opted_out: bool) {
        let Some(c) = self.clusters.get_mut(cluster) else {
            return;
        };
        let changed = if opted_out {
            c.opted_out_namespaces.insert(namespace.to_string())
        } else {
            c.opted_out_namespaces.remove(namespace)
        };
        if changed {
            self.touch_namespace(cluster, namespace, Reach::Neighbours);
        }
    }

    /// Marks every identity with a workload in `cluster`/`namespace`.
    fn touch_namespace(&mut self, cluster: &str, namespace: &str, reach: Reach) {
        let Some(c) = self.clusters.get(cluster) else {
            return;
        };
        for w in c.workloads_in(namespace) {
            self.dirty.touch(w.identity.as_deref(), reach);
        }
    }

    fn set_dependency(&mut self, at: ObjectRef, new: Option<DependencyEntry>) {
        let old = match &new {
            Some(d) => self.dependencies.insert(at.clone(), d.clone()),
            None => self.dependencies.remove(&at),
        };
        if old == new {
            return;
        }
        let mut sources = BTreeSet::new();
        for d in old.iter().chain(new.iter()) {
            // Its Sidecars and this Dependency's status.
            self.dirty.touch(Some(&d.source), Reach::Itself);
            // A wildcard client changes the targets of every identity.
            if d.wildcard {
                self.dirty.all = true;
            }
            sources.insert(d.source.clone());
        }
        if let Some(o) = &old
            && let Some(set) = self.deps_by_source.get_mut(&o.source)
        {
            set.remove(&at);
            if set.is_empty() {
                self.deps_by_source.remove(&o.source);
            }
        }
        if let Some(n) = &new {
            self.deps_by_source.entry(n.source.clone()).or_default().insert(at);
        }
        for source in sources {
            self.reindex_source(&source);
        }
    }

    /// Rebuilds the reverse dependency index entries of one source from its Dependencies, and
    /// marks the destinations it began or stopped naming: they are written to other clusters now.
    /// A destination it names in another Dependency too keeps its clients, and is not marked.
    fn reindex_source(&mut self, source: &str) {
        let before = self.named_by_source.remove(source).unwrap_or_default();
        for dest in &before {
            if let Some(set) = self.clients_by_destination.get_mut(dest) {
                set.remove(source);
                if set.is_empty() {
                    self.clients_by_destination.remove(dest);
                }
            }
        }
        self.wildcard_sources.remove(source);
        let mut named = BTreeSet::new();
        let mut wildcard = false;
        for d in self.dependencies_of(source).filter(|d| d.invalid.is_none()) {
            wildcard |= d.wildcard;
            named.extend(d.destinations.iter().cloned());
        }
        if wildcard {
            self.wildcard_sources.insert(source.to_string());
        }
        for dest in &named {
            self.clients_by_destination.entry(dest.clone()).or_default().insert(source.to_string());
        }
        for dest in before.symmetric_difference(&named) {
            self.dirty.touch(Some(dest), Reach::Itself);
        }
        if !named.is_empty() {
            self.named_by_source.insert(source.to_string(), named);
        }
    }
}

/// Stores a policy under its identity. A spec that fails validation does not replace the last
/// valid one, which stays in force; the reason is kept for the policy's status.
fn store_policy<S: Clone>(
    policies: &mut BTreeMap<ObjectRef, Policy<S>>,
    index: &mut BTreeMap<String, BTreeSet<ObjectRef>>,
    dirty: &mut Dirty,
    reach: Reach,
    mut policy: Policy<S>,
    spec: &S,
    validation: Result<(), String>,
) {
    let at = policy.at.clone();
    match validation {
        Ok(()) => policy.effective = Some(spec.clone()),
        Err(reason) => {
            policy.effective = policies.get(&at).and_then(|p| p.effective.clone());
            policy.invalid = Some(reason);
        }
    }
    let identity = policy.identity.clone();
    let old = policies.insert(at.clone(), policy);
    reindex_policy(index, dirty, reach, &at, old.and_then(|p| p.identity), identity);
}

fn reindex_policy(
    index: &mut BTreeMap<String, BTreeSet<ObjectRef>>,
    dirty: &mut Dirty,
    reach: Reach,
    at: &ObjectRef,
    old: Option<String>,
    new: Option<String>,
) {
    if let Some(o) = &old {
        if let Some(set) = index.get_mut(o) {
            set.remove(at);
            if set.is_empty() {
                index.remove(o);
            }
        }
        dirty.touch(Some(o), reach);
    }
    if let Some(n) = &new {
        index.entry(n.clone()).or_default().insert(at.clone());
        dirty.touch(Some(n), reach);
    }
}

fn meta_ns(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_default()
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.labels.as_ref().and_then(|l| l.get(key))
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.annotations.as_ref().and_then(|a| a.get(key))
}

/// `admiral.io/ignore: "true"` as a label or an annotation.
pub fn has_ignore(meta: &ObjectMeta) -> bool {
    let truthy = |v: Option<&String>| v.is_some_and(|v| v.eq_ignore_ascii_case("true"));
    truthy(label(meta, LABEL_IGNORE)) || truthy(annotation(meta, LABEL_IGNORE))
}

/// Whether an object carries flotilla's managed-by label.
pub fn is_managed(meta: &ObjectMeta) -> bool {
    label(meta, crate::compute::LABEL_MANAGED_BY).map(String::as_str) == Some(crate::compute::MANAGER)
}

/// Env from annotation `admiral.io/env`, label `admiral.io/env`, label `env`, then `fallback`.
fn env_of(meta: &ObjectMeta, fallback: Option<&String>) -> String {
    annotation(meta, ANNOTATION_ENV)
        .or_else(|| label(meta, ANNOTATION_ENV))
        .or_else(|| label(meta, "env"))
        .or(fallback)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_ENV)
        .to_string()
}

pub fn distill_workload(d: &Deployment, identity_label: &str) -> Workload {
    let template_meta = d.spec.as_ref().and_then(|s| s.template.metadata.clone()).unwrap_or_default();
    let (identity, identity_from_label) = match label(&template_meta, identity_label) {
        Some(v) if !v.trim().is_empty() => (Some(v.trim().to_string()), true),
        _ => match annotation(&template_meta, identity_label) {
            Some(v) if !v.trim().is_empty() => (Some(v.trim().to_string()), false),
            _ => (None, false),
        },
    };
    let inbound_port = annotation(&template_meta, ANNOTATION_INCLUDE_INBOUND_PORTS)
        .and_then(|v| v.split(',').find_map(|p| p.trim().parse::<i32>().ok()));
    Workload {
        namespace: meta_ns(&d.metadata),
        name: d.metadata.name.clone().unwrap_or_default(),
        identity,
        identity_from_label,
        env: env_of(&template_meta, None),
        opted_out: has_ignore(&d.metadata) || has_ignore(&template_meta),
        pod_labels: template_meta.labels.clone().unwrap_or_default(),
        inbound_port,
    }
}

pub fn distill_service(s: &Service) -> ServiceInfo {
    let spec = s.spec.clone().unwrap_or_default();
    let lb_address = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.ip.clone().or_else(|| i.hostname.clone()));
    let external_address = lb_address.or_else(|| spec.external_ips.as_ref().and_then(|ips| ips.first().cloned()));
    ServiceInfo {
        namespace: meta_ns(&s.metadata),
        name: s.metadata.name.clone().unwrap_or_default(),
        labels: s.metadata.labels.clone().unwrap_or_default(),
        selector: spec.selector.clone().unwrap_or_default(),
        ports: spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| ServicePortInfo {
                name: p.name,
                port: p.port,
                target_port: p.target_port,
                app_protocol: p.app_protocol,
            })
            .collect(),
        opted_out: has_ignore(&s.metadata),
        created: s.metadata.creation_timestamp.as_ref().map(|t| t.0),
        external_address,
    }
}

fn node_region(n: &Node) -> Option<String> {
    label(&n.metadata, LABEL_REGION).or_else(|| label(&n.metadata, LABEL_REGION_LEGACY)).cloned()
}

/// Identity, env and bookkeeping common to the policy kinds (spec handled by the caller).
fn policy_header<S>(
    at: ObjectRef,
    meta: &ObjectMeta,
    selector: Option<&BTreeMap<String, String>>,
    identity_label: &str,
) -> Policy<S> {
    let from_selector = |key: &str| selector.and_then(|s| s.get(key));
    let identity = label(meta, identity_label)
        .or_else(|| from_selector(identity_label))
        .or_else(|| from_selector("identity"))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let env = env_of(meta, from_selector("env").or_else(|| from_selector(ANNOTATION_ENV)));
    let mut warnings = Vec::new();
    if identity.is_none() {
        warnings.push(format!("no identity: set label {identity_label:?} or spec.selector.{identity_label}"));
    }
    Policy {
        at,
        identity,
        env,
        priority: 0,
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        generation: meta.generation,
        effective: None,
        invalid: None,
        warnings,
    }
}
