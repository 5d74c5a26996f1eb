//! The fleet model: what flotilla knows about every member, as plain data and indexes.
//!
//! Records (`Record`: a workload, a Service, a judged policy, …) come from `ingest`, which
//! distils Kubernetes objects into them; the model stores them per member, indexes them by
//! identity so that one change can be recomputed without looking at the rest of the fleet, and
//! records what each change touched and how far it reaches (`dirty`). No clients, clocks or I/O,
//! and nothing of `compute`.

mod dirty;
mod fleet;
mod known;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::crd::{ClientConnectionConfigSpec, GlobalTrafficPolicySpec, OutlierDetectionSpec};
use crate::meta::GATEWAY_NAMESPACE;
use crate::settings::Tenancy;

pub use dirty::{Dirty, Reach};
pub use fleet::{DisallowedClaim, Fleet};

pub type ClusterId = String;

/// A member's number: given when its id is first seen and never given to another id, so that
/// the desired state can name the members an object goes to with a few bytes each, and compute
/// can find a member's facts by indexing instead of comparing names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterIdx(pub u32);

impl ClusterIdx {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Every member id ever seen and its number. Ids are few (one per member) and a removed member
/// keeps its number for when it comes back, so nothing is ever forgotten.
#[derive(Clone, Debug, Default)]
pub struct ClusterNames {
    numbers: std::collections::HashMap<std::sync::Arc<str>, ClusterIdx>,
    names: Vec<std::sync::Arc<str>>,
}

impl ClusterNames {
    pub fn number(&self, id: &str) -> Option<ClusterIdx> {
        self.numbers.get(id).copied()
    }

    pub fn name(&self, idx: ClusterIdx) -> &std::sync::Arc<str> {
        &self.names[idx.index()]
    }

    /// How many numbers were given: every number is below it.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub(super) fn number_or_insert(&mut self, id: &str) -> ClusterIdx {
        if let Some(idx) = self.number(id) {
            return idx;
        }
        let idx = ClusterIdx(u32::try_from(self.names.len()).expect("fewer than 2^32 member ids"));
        let name: std::sync::Arc<str> = id.into();
        self.names.push(name.clone());
        self.numbers.insert(name, idx);
        idx
    }
}
/// (namespace, name) of a namespaced object inside one cluster.
pub type NsName = (String, String);
/// (namespace, name, kind) of a workload: a Deployment and a Rollout may share a name (during a
/// migration from one to the other they usually do), and so may a Job.
pub type WorkloadKey = (String, String, WorkloadKind);

/// What kind of object a workload is. Deployments and Rollouts serve their identity's hosts;
/// Jobs and CronJobs only call others (Admiral's client discovery): where they run, their
/// Dependencies' destinations are written, as for any client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadKind {
    Deployment,
    Rollout,
    Job,
    CronJob,
}

impl WorkloadKind {
    /// Whether its pods serve the identity's hosts (else they are only clients).
    pub fn serves(self) -> bool {
        matches!(self, WorkloadKind::Deployment | WorkloadKind::Rollout)
    }
}

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

/// A member's health, as the runtime finds it from its watches (`render`'s members are all
/// synced). An input of compute: whatever the health, a member's last known workloads stay
/// (fail static); only a synced member is written to and pruned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClusterHealth {
    /// Registered; not every kind has been listed yet, so what it holds is not known.
    Connecting,
    #[default]
    Synced,
    /// Its watches have failed for too long, or its kubeconfig was refused.
    Stale,
}

/// Per-member settings from the registration Secret's annotations or `fleet.yaml`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterOverrides {
    pub region: Option<String>,
    pub gateway_address: Option<String>,
    pub gateway_port: Option<u16>,
    /// The SPIFFE trust domain of its workloads' certificates, where it is not `--trust-domain`.
    pub trust_domain: Option<String>,
    /// Drained: its endpoints are withheld wherever another member serves the same host (its own
    /// clients included); its objects stay.
    pub drain: bool,
}

/// A Deployment, an Argo Rollout, a Job or a CronJob, reduced to what federation needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
    pub identity: Option<String>,
    /// Whether the identity is a pod-template label (a Sidecar can select it) or an annotation.
    pub identity_from_label: bool,
    pub env: String,
    /// `admiral.io/ignore` on the workload or its pod template.
    pub opted_out: bool,
    pub pod_labels: BTreeMap<String, String>,
    /// First port number in `traffic.sidecar.istio.io/includeInboundPorts`.
    pub inbound_port: Option<u16>,
    /// None for a Deployment; for a Rollout, how it picks its Services.
    pub rollout: Option<RolloutPlan>,
    /// The pod template's `serviceAccountName` (None: `default`): its SPIFFE identity.
    pub service_account: Option<String>,
    /// When it was created: of two allowed namespaces running one identity, the older speaks.
    pub created: Option<Timestamp>,
    /// Its uid: an Event about it is found with it (`kubectl describe`).
    pub uid: Option<String>,
    /// A label of its own (not its pods') that `--additional-endpoint-label` names: its hosts,
    /// and its destinations', get aliases.
    pub wants_aliases: bool,
}

impl Workload {
    pub fn key(&self) -> WorkloadKey {
        (self.namespace.clone(), self.name.clone(), self.kind)
    }

    /// What the workload is, for messages: `Deployment ns/name`, `Job ns/name`, ….
    pub fn describe(&self) -> String {
        format!("{:?} {}/{}", self.kind, self.namespace, self.name)
    }

    /// The service account its pods run as.
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or("default")
    }
}

/// What a Namespace's `flotilla.io/identities` annotation lets it run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowance {
    /// `*`: any identity.
    Any,
    /// These identities (an empty list: none).
    Only(BTreeSet<String>),
}

impl Allowance {
    /// Comma-separated identities, blanks ignored; `*` among them allows any.
    pub fn parse(value: &str) -> Allowance {
        let names: BTreeSet<String> =
            value.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect();
        if names.contains("*") { Allowance::Any } else { Allowance::Only(names) }
    }
}

/// How a namespace of a member stands towards an identity one of its workloads claims. Ordered:
/// where two namespaces of one member run an identity, the one that names it speaks before one
/// that allows any, before one that is not allowed at all (`--tenancy=open` only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// Its `flotilla.io/identities` names the identity.
    Named,
    /// Its `flotilla.io/identities` is `*`.
    Any,
    /// It has no `flotilla.io/identities`, or one that does not name the identity.
    NotAllowed,
}

/// How a Rollout picks the Services behind its hosts (Argo's strategies, as Admiral reads them).
#[derive(Clone, Debug, PartialEq)]
pub enum RolloutPlan {
    /// The active Service serves the default host; the preview Service, if there is one, the
    /// host `preview.<default host>`.
    BlueGreen { active: Option<String>, preview: Option<String> },
    /// Istio traffic routing with both Services: the default host has a local endpoint per
    /// Service of weight > 0 (weights from the named VirtualService's route), and the host
    /// `canary.<default host>` the canary Service.
    WeightedCanary { stable: String, canary: String, virtual_service: Option<(String, Vec<String>)> },
    /// A canary without Istio traffic routing: one host, on the root Service (else the stable).
    Canary { stable: Option<String> },
    /// No strategy: not federated.
    None,
}

/// A Sidecar flotilla does not manage: where one applies to a client's workloads, flotilla writes
/// none of its own there, and its egress decides what they reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignSidecar {
    /// Its workload selector (None: the whole namespace).
    pub selector: Option<BTreeMap<String, String>>,
    /// The hosts of all its egress listeners (`<namespace>/<dns name>`); None: it has no egress
    /// listener, so Istio's default (everything) applies.
    pub egress_hosts: Option<Vec<String>>,
    /// Its uid: an Event about it is found with it.
    pub uid: Option<String>,
}

impl ForeignSidecar {
    /// Whether its workloads, in `namespace`, may reach `host` exported from `sync_namespace`:
    /// an egress host `<ns>/<name>` whose namespace is `*`, the sync namespace, or `.` (when the
    /// Sidecar is in it), and whose name is `*`, the host, or a `*.` wildcard above it.
    pub fn egress_allows(&self, namespace: &str, sync_namespace: &str, host: &str) -> bool {
        let Some(hosts) = &self.egress_hosts else { return true };
        hosts.iter().any(|entry| {
            let Some((ns, name)) = entry.split_once('/') else { return false };
            let ns_ok = ns == "*" || ns == sync_namespace || (ns == "." && namespace == sync_namespace);
            let name_ok = name == "*"
                || name.eq_ignore_ascii_case(host)
                || name.strip_prefix('*').is_some_and(|suffix| {
                    suffix.starts_with('.')
                        && host.len() > suffix.len()
                        && host.to_ascii_lowercase().ends_with(&suffix.to_ascii_lowercase())
                });
            ns_ok && name_ok
        })
    }
}

#[cfg(test)]
#[test]
fn a_sidecars_egress_allows_the_hosts_its_entries_match() {
    let sidecar = |hosts: Option<&[&str]>| ForeignSidecar {
        selector: None,
        egress_hosts: hosts.map(|h| h.iter().map(|s| s.to_string()).collect()),
        uid: None,
    };
    let host = "stage.greeting.global";
    let allows =
        |hosts: Option<&[&str]>, namespace: &str| sidecar(hosts).egress_allows(namespace, "admiral-sync", host);
    assert!(allows(None, "web"), "no egress listener: Istio's default, everything");
    for yes in ["*/*", "admiral-sync/*", "*/stage.greeting.global", "admiral-sync/*.global", "*/*.greeting.global"] {
        assert!(allows(Some(&["./*", yes]), "web"), "{yes}");
    }
    assert!(allows(Some(&["./*"]), "admiral-sync"), "`.` is the Sidecar's own namespace");
    for no in [
        "./*",
        "istio-system/*",
        "other/stage.greeting.global",
        "admiral-sync/*.local",
        "~/*",
        "*.global",
        "*/greeting.global",
    ] {
        assert!(!allows(Some(&[no]), "web"), "{no}");
    }
    assert!(!allows(Some(&[]), "web"), "an egress listener with no hosts reaches nothing");
}

/// One HTTP route of a VirtualService: its name and the (destination host, weight) pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct VsRoute {
    pub name: Option<String>,
    pub destinations: Vec<(String, i32)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePortInfo {
    pub name: Option<String>,
    pub port: u16,
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
    /// What was dropped while reading it (a port number Kubernetes would refuse).
    pub problems: Vec<String>,
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
#[derive(Clone, Debug)]
pub struct Cluster {
    pub id: ClusterId,
    pub idx: ClusterIdx,
    pub overrides: ClusterOverrides,
    pub health: ClusterHealth,
    /// Node name → its region label, if any.
    pub nodes: BTreeMap<String, Option<String>>,
    pub opted_out_namespaces: BTreeSet<String>,
    /// Namespaces with a `flotilla.io/identities` annotation, and what it allows.
    pub allowances: BTreeMap<String, Allowance>,
    /// Whether claims its namespaces may not make are refused (`--tenancy=owned`).
    pub tenancy: Tenancy,
    pub workloads: BTreeMap<WorkloadKey, Workload>,
    /// Namespace → name → Service: one namespace's Services are found without building a key.
    services: BTreeMap<String, BTreeMap<String, ServiceInfo>>,
    /// Sidecars flotilla does not manage.
    pub foreign_sidecars: BTreeMap<NsName, ForeignSidecar>,
    /// VirtualServices (a canary Rollout's weights): their HTTP routes.
    pub virtual_services: BTreeMap<NsName, Vec<VsRoute>>,
    /// ServiceEntries flotilla does not manage (in the sync namespace): the hosts they hold.
    pub foreign_service_entries: BTreeMap<NsName, Vec<String>>,
}

impl Cluster {
    fn new(id: &str, idx: ClusterIdx, tenancy: Tenancy) -> Self {
        Cluster {
            id: id.to_string(),
            idx,
            overrides: ClusterOverrides::default(),
            health: ClusterHealth::default(),
            nodes: BTreeMap::new(),
            opted_out_namespaces: BTreeSet::new(),
            allowances: BTreeMap::new(),
            tenancy,
            workloads: BTreeMap::new(),
            services: BTreeMap::new(),
            foreign_sidecars: BTreeMap::new(),
            virtual_services: BTreeMap::new(),
            foreign_service_entries: BTreeMap::new(),
        }
    }

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
        self.services.get(namespace).into_iter().flat_map(|by_name| by_name.values())
    }

    /// Stores (or, with None, removes) a Service; returns what was there.
    fn set_service(&mut self, (namespace, name): NsName, new: Option<ServiceInfo>) -> Option<ServiceInfo> {
        match new {
            Some(s) => self.services.entry(namespace).or_default().insert(name, s),
            None => {
                let by_name = self.services.get_mut(&namespace)?;
                let old = by_name.remove(&name);
                if by_name.is_empty() {
                    self.services.remove(&namespace);
                }
                old
            }
        }
    }

    pub fn workloads_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .range((namespace.to_string(), String::new(), WorkloadKind::Deployment)..)
            .take_while(move |((ns, _, _), _)| ns == namespace)
            .map(|(_, w)| w)
    }

    /// Someone else's ServiceEntry in the sync namespace that holds `host` here, or has the name
    /// flotilla would give the host's (`<host>-se`): flotilla then writes nothing for that host in
    /// this cluster. (`run` watches ServiceEntries in the sync namespace only.)
    pub fn foreign_holder_of(&self, sync_namespace: &str, host: &str) -> Option<&NsName> {
        self.foreign_service_entries
            .iter()
            .filter(|((ns, _), _)| ns == sync_namespace)
            .find(|((_, name), hosts)| hosts.iter().any(|h| h == host) || name.strip_suffix("-se") == Some(host))
            .map(|(key, _)| key)
    }

    /// Whether a workload takes part in federation: not opted out itself, nor its namespace,
    /// and (`--tenancy=owned`) its namespace may run its identity. A Rollout without a strategy
    /// is not federated (reported).
    pub fn is_federated(&self, w: &Workload) -> bool {
        self.claims(w) && !self.is_refused(w)
    }

    /// Whether a workload claims its identity: it has one, and neither it nor its namespace
    /// opted out, and (a Rollout) it has a strategy. Whether the claim is accepted is
    /// `is_refused`'s question.
    pub fn claims(&self, w: &Workload) -> bool {
        w.identity.is_some()
            && !w.opted_out
            && !self.opted_out_namespaces.contains(&w.namespace)
            && !matches!(w.rollout, Some(RolloutPlan::None))
    }

    /// How `namespace` stands towards `identity`.
    pub fn standing(&self, namespace: &str, identity: &str) -> Standing {
        match self.allowances.get(namespace) {
            Some(Allowance::Only(names)) if names.contains(identity) => Standing::Named,
            Some(Allowance::Any) => Standing::Any,
            _ => Standing::NotAllowed,
        }
    }

    /// Whether `namespace` may speak for `identity`: always with `--tenancy=open`.
    pub fn may_speak(&self, namespace: &str, identity: &str) -> bool {
        self.tenancy == Tenancy::Open || self.standing(namespace, identity) != Standing::NotAllowed
    }

    /// A workload whose namespace may not run the identity it claims (`--tenancy=owned`).
    pub fn is_refused(&self, w: &Workload) -> bool {
        w.identity.as_deref().is_some_and(|id| !self.may_speak(&w.namespace, id))
    }
}

/// One input object as the model keeps it (see `ingest::distill`).
#[derive(Clone, Debug, PartialEq)]
// Short-lived: each is built and stored at once, so the size of the largest costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Record {
    Workload(Workload),
    Service(ServiceInfo),
    /// A Node's region label, if it has one.
    Node(Option<String>),
    Namespace {
        opted_out: bool,
        /// Its `flotilla.io/identities` annotation, if it has one.
        allows: Option<Allowance>,
    },
    /// A Sidecar flotilla does not manage.
    ForeignSidecar(ForeignSidecar),
    /// A ServiceEntry flotilla does not manage: the hosts it holds.
    ForeignServiceEntry {
        hosts: Vec<String>,
    },
    /// A VirtualService: its HTTP routes (only the weights a canary Rollout reads).
    VirtualService {
        routes: Vec<VsRoute>,
    },
    GlobalTrafficPolicy(Policy<GlobalTrafficPolicySpec>),
    OutlierDetection(Policy<OutlierDetectionSpec>),
    ClientConnectionConfig(Policy<ClientConnectionConfigSpec>),
    Dependency(DependencyEntry),
}
