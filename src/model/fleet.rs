//! `Fleet`: every member's records and the policies, with the indexes that make one identity
//! cheap to recompute, and the bookkeeping of what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::known::{Field, Known, KnownIdentities};
use super::{
    Allowance, Cluster, ClusterHealth, ClusterId, ClusterIdx, ClusterNames, ClusterOverrides, DependencyEntry, Dirty,
    NsName, ObjectRef, Policy, Reach, Record, ServiceInfo, Standing, Workload, WorkloadKey, WorkloadKind,
};
use crate::crd::{ClientConnectionConfigSpec, GlobalTrafficPolicySpec, OutlierDetectionSpec};
use crate::meta::{ANNOTATION_IDENTITIES, GATEWAY_NAMESPACE, HUB, Kind};
use crate::settings::Tenancy;

/// The whole fleet: members, policies, and the indexes that make per-identity recompute cheap.
#[derive(Clone, Debug)]
pub struct Fleet {
    identity_label: String,
    /// The members, by number (a removed member leaves a hole that its number fills again if it
    /// comes back), and the numbers of those present, by id.
    members: Vec<Option<Cluster>>,
    present: BTreeMap<ClusterId, ClusterIdx>,
    /// The number of every member id ever seen (shared with the desired state, which names
    /// members by number).
    names: Arc<ClusterNames>,
    pub gtps: BTreeMap<ObjectRef, Policy<GlobalTrafficPolicySpec>>,
    pub outlier_detections: BTreeMap<ObjectRef, Policy<OutlierDetectionSpec>>,
    pub connection_configs: BTreeMap<ObjectRef, Policy<ClientConnectionConfigSpec>>,
    pub dependencies: BTreeMap<ObjectRef, DependencyEntry>,
    /// Every identity's workloads, policies and Dependencies, one entry each.
    known: KnownIdentities,
    /// Lower-cased identity → the identities with workloads that lower-case to it. Hosts and
    /// object names are lower-cased, so identities that differ only in case would collide.
    by_folded: BTreeMap<String, BTreeSet<String>>,
    /// sources with a `*` destination.
    wildcard_sources: BTreeSet<String>,
    /// `--tenancy`, and the hub namespaces whose Dependencies the platform owns.
    tenancy: Tenancy,
    dependency_namespaces: BTreeSet<String>,
    /// Lower-cased identity → how many member namespaces name it in `flotilla.io/identities`: an
    /// identity someone owns, whose claims from elsewhere are decoys.
    named: BTreeMap<String, usize>,
    dirty: Dirty,
}

impl Fleet {
    pub fn new(identity_label: &str, tenancy: Tenancy, dependency_namespaces: &[String]) -> Self {
        Fleet {
            identity_label: identity_label.to_string(),
            tenancy,
            dependency_namespaces: dependency_namespaces.iter().cloned().collect(),
            named: BTreeMap::new(),
            members: Vec::new(),
            present: BTreeMap::new(),
            names: Arc::default(),
            gtps: BTreeMap::new(),
            outlier_detections: BTreeMap::new(),
            connection_configs: BTreeMap::new(),
            dependencies: BTreeMap::new(),
            known: KnownIdentities::default(),
            by_folded: BTreeMap::new(),
            wildcard_sources: BTreeSet::new(),
            dirty: Dirty { all: true, facts: true, identities: BTreeMap::new(), hosts: BTreeSet::new() },
        }
    }

    pub fn identity_label(&self) -> &str {
        &self.identity_label
    }

    /// Every member id ever seen, with its number.
    pub fn cluster_names(&self) -> &Arc<ClusterNames> {
        &self.names
    }

    /// The member with this number, if it is in the fleet now.
    pub fn cluster_at(&self, idx: ClusterIdx) -> Option<&Cluster> {
        self.members.get(idx.index()).and_then(Option::as_ref)
    }

    pub fn cluster(&self, id: &str) -> Option<&Cluster> {
        self.cluster_at(*self.present.get(id)?)
    }

    fn cluster_mut(&mut self, id: &str) -> Option<&mut Cluster> {
        let idx = *self.present.get(id)?;
        self.members[idx.index()].as_mut()
    }

    /// The members, in id order.
    pub fn clusters(&self) -> impl Iterator<Item = &Cluster> {
        self.present.values().filter_map(|idx| self.cluster_at(*idx))
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
        if !self.present.contains_key(id) {
            self.dirty.all = true;
            let idx = match self.names.number(id) {
                Some(idx) => idx,
                None => Arc::make_mut(&mut self.names).number_or_insert(id),
            };
            if self.members.len() <= idx.index() {
                self.members.resize_with(idx.index() + 1, || None);
            }
            self.members[idx.index()] = Some(Cluster::new(id, idx, self.tenancy));
            self.present.insert(id.to_string(), idx);
        }
        let cluster = self.cluster_mut(id).expect("just made present");
        if cluster.overrides != overrides {
            cluster.overrides = overrides;
            self.dirty.all = true;
        }
    }

    /// Removes a member and everything learned from it.
    pub fn remove_cluster(&mut self, id: &str) {
        let Some(idx) = self.present.remove(id) else {
            return;
        };
        let cluster = self.members[idx.index()].take().expect("a present member");
        for allowance in cluster.allowances.values() {
            self.count_named(allowance, false);
        }
        for w in cluster.workloads.values() {
            self.unindex_workload(idx, w);
        }
        let in_cluster = |r: &&ObjectRef| r.cluster == id;
        let gtps: Vec<ObjectRef> = self.gtps.keys().filter(in_cluster).cloned().collect();
        let ods: Vec<ObjectRef> = self.outlier_detections.keys().filter(in_cluster).cloned().collect();
        let cccs: Vec<ObjectRef> = self.connection_configs.keys().filter(in_cluster).cloned().collect();
        let deps: Vec<ObjectRef> = self.dependencies.keys().filter(in_cluster).cloned().collect();
        for (kind, refs) in [
            (Kind::GlobalTrafficPolicy, gtps),
            (Kind::OutlierDetection, ods),
            (Kind::ClientConnectionConfig, cccs),
            (Kind::Dependency, deps),
        ] {
            for r in refs {
                self.delete(id, kind, &r.namespace, &r.name);
            }
        }
        self.dirty.all = true;
    }

    /// Marks a member stale or synced. A stale member keeps its last known state (fail static),
    /// so no identity's objects change; the per-member facts (what is written where, and the
    /// clusters' diagnostics) do.
    pub fn set_health(&mut self, id: &str, health: ClusterHealth) {
        if let Some(c) = self.cluster_mut(id)
            && c.health != health
        {
            c.health = health;
            self.dirty.facts = true;
        }
    }

    /// Identities that have workloads anywhere, are named by a policy, or are Dependency sources.
    /// Sorted, each once.
    pub fn identities(&self) -> Vec<&str> {
        self.known.iter().filter(|(_, k)| k.is_identity()).map(|(name, _)| name).collect()
    }

    /// Whether anything is known of `identity` (see `identities`).
    pub fn knows(&self, identity: &str) -> bool {
        self.known.get(identity).is_some_and(Known::is_identity)
    }

    /// The sets of `identity`'s entry: empty when nothing is known of it.
    fn known_in<'a, T: 'a>(
        &'a self,
        identity: &str,
        set: fn(&Known) -> &BTreeSet<T>,
    ) -> impl Iterator<Item = &'a T> + use<'a, T> {
        self.known.get(identity).map(set).into_iter().flatten()
    }

    /// The workloads of one identity, in (member number, namespace, name) order.
    pub fn workloads_of<'a>(&'a self, identity: &str) -> impl Iterator<Item = (&'a Cluster, &'a Workload)> + 'a {
        self.known_in(identity, |k| &k.workloads).filter_map(move |(c, key)| {
            let cluster = self.cluster_at(*c)?;
            let w = cluster.workloads.get(key)?;
            Some((cluster, w))
        })
    }

    /// The identities with workloads whose names equal `identity` but for case (itself included
    /// if it has workloads), in byte order: the first owns the hosts they would share.
    pub fn case_twins(&self, identity: &str) -> impl Iterator<Item = &str> {
        self.by_folded.get(&identity.to_ascii_lowercase()).into_iter().flatten().map(String::as_str)
    }

    /// Members where a federated workload of `identity` runs (any env), ascending by number.
    pub fn clusters_running(&self, identity: &str) -> Vec<ClusterIdx> {
        let mut running: Vec<ClusterIdx> =
            self.workloads_of(identity).filter(|(c, w)| c.is_federated(w)).map(|(c, _)| c.idx).collect();
        running.sort_unstable();
        running.dedup();
        running
    }

    pub fn gtps_of(&self, identity: &str) -> impl Iterator<Item = &Policy<GlobalTrafficPolicySpec>> {
        self.known_in(identity, |k| &k.gtps).filter_map(|r| self.gtps.get(r))
    }
    pub fn outlier_detections_of(&self, identity: &str) -> impl Iterator<Item = &Policy<OutlierDetectionSpec>> {
        self.known_in(identity, |k| &k.outlier_detections).filter_map(|r| self.outlier_detections.get(r))
    }
    pub fn connection_configs_of(&self, identity: &str) -> impl Iterator<Item = &Policy<ClientConnectionConfigSpec>> {
        self.known_in(identity, |k| &k.connection_configs).filter_map(|r| self.connection_configs.get(r))
    }
    pub fn dependencies_of(&self, source: &str) -> impl Iterator<Item = &DependencyEntry> {
        self.known_in(source, |k| &k.dependencies).filter_map(|r| self.dependencies.get(r))
    }

    /// Identities that depend on `destination`: those naming it, and those with `*`.
    pub fn clients_of(&self, destination: &str) -> BTreeSet<&str> {
        let mut out: BTreeSet<&str> = self.wildcard_sources.iter().map(String::as_str).collect();
        out.extend(self.named_clients_of(destination));
        out
    }

    /// Sources that name `destination` explicitly (not through `*`).
    pub fn named_clients_of(&self, destination: &str) -> impl Iterator<Item = &str> {
        self.known_in(destination, |k| &k.named_by).map(String::as_str)
    }

    /// Every destination some valid Dependency names explicitly, sorted.
    pub fn named_destinations(&self) -> impl Iterator<Item = &str> {
        self.known.iter().filter(|(_, k)| !k.named_by.is_empty()).map(|(name, _)| name)
    }

    /// Every source whose valid Dependencies name destinations explicitly, sorted.
    pub fn named_sources(&self) -> impl Iterator<Item = &str> {
        self.known.iter().filter(|(_, k)| !k.destinations.is_empty()).map(|(name, _)| name)
    }

    /// Sources with a `*` destination: clients of every identity.
    pub fn wildcard_sources(&self) -> impl Iterator<Item = &str> {
        self.wildcard_sources.iter().map(String::as_str)
    }

    /// Destinations that `source` names explicitly (not through `*`) in its valid Dependencies,
    /// in order.
    pub fn destinations_of(&self, source: &str) -> impl Iterator<Item = &str> {
        self.known_in(source, |k| &k.destinations).map(String::as_str)
    }

    pub fn has_wildcard(&self, source: &str) -> bool {
        self.wildcard_sources.contains(source)
    }

    /// Adds or replaces the record of one object seen in cluster `cluster` (or `HUB`).
    pub fn upsert(&mut self, cluster: &str, namespace: &str, name: &str, record: Record) {
        if cluster != HUB && !self.present.contains_key(cluster) {
            self.upsert_cluster(cluster, ClusterOverrides::default());
        }
        let key = || (namespace.to_string(), name.to_string());
        match record {
            Record::Workload(w) => self.set_workload(cluster, w.key(), Some(w)),
            Record::VirtualService { routes } => {
                if let Some(c) = self.cluster_mut(cluster) {
                    c.virtual_services.insert(key(), routes);
                }
                // Only the weights of the canary Rollouts next to it can change.
                self.touch_namespace(cluster, namespace, Reach::Itself);
            }
            Record::Service(s) => self.set_service(cluster, key(), Some(s)),
            Record::Node(region) => self.set_node(cluster, name.to_string(), Some(region)),
            Record::Namespace { opted_out, allows } => {
                self.set_namespace_opt_out(cluster, name, opted_out);
                self.set_allowance(cluster, name, allows);
            }
            Record::ForeignSidecar(sidecar) => {
                if let Some(c) = self.cluster_mut(cluster) {
                    c.foreign_sidecars.insert(key(), sidecar);
                }
                self.touch_namespace(cluster, namespace, Reach::Itself);
            }
            Record::ForeignServiceEntry { hosts } => {
                if let Some(c) = self.cluster_mut(cluster) {
                    let old = c.foreign_service_entries.insert(key(), hosts.clone());
                    self.dirty.hosts.extend(held_hosts(name, old.iter().flatten().chain(&hosts)));
                }
            }
            Record::GlobalTrafficPolicy(p) => {
                let moved = store_policy(&mut self.gtps, p);
                self.reindex_policy(|k| &mut k.gtps, Reach::Clients, moved);
            }
            Record::OutlierDetection(p) => {
                let moved = store_policy(&mut self.outlier_detections, p);
                self.reindex_policy(|k| &mut k.outlier_detections, Reach::Itself, moved);
            }
            Record::ClientConnectionConfig(p) => {
                let moved = store_policy(&mut self.connection_configs, p);
                self.reindex_policy(|k| &mut k.connection_configs, Reach::Itself, moved);
            }
            Record::Dependency(d) => self.set_dependency(d.at.clone(), Some(d)),
        }
    }

    /// Removes one object; unknown objects are ignored.
    pub fn delete(&mut self, cluster: &str, kind: Kind, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let at = ObjectRef { cluster: cluster.to_string(), namespace: namespace.to_string(), name: name.to_string() };
        match kind {
            Kind::Deployment => {
                self.set_workload(cluster, (namespace.into(), name.into(), WorkloadKind::Deployment), None)
            }
            Kind::Rollout => self.set_workload(cluster, (namespace.into(), name.into(), WorkloadKind::Rollout), None),
            Kind::Job => self.set_workload(cluster, (namespace.into(), name.into(), WorkloadKind::Job), None),
            Kind::CronJob => self.set_workload(cluster, (namespace.into(), name.into(), WorkloadKind::CronJob), None),
            Kind::VirtualService => {
                if let Some(c) = self.cluster_mut(cluster)
                    && c.virtual_services.remove(&key).is_some()
                {
                    self.touch_namespace(cluster, namespace, Reach::Itself);
                }
            }
            Kind::Service => self.set_service(cluster, key, None),
            Kind::Node => self.set_node(cluster, name.to_string(), None),
            Kind::Namespace => {
                self.set_namespace_opt_out(cluster, name, false);
                self.set_allowance(cluster, name, None);
            }
            Kind::Sidecar => {
                if let Some(c) = self.cluster_mut(cluster)
                    && c.foreign_sidecars.remove(&key).is_some()
                {
                    self.touch_namespace(cluster, namespace, Reach::Itself);
                }
            }
            Kind::GlobalTrafficPolicy => {
                if let Some(old) = self.gtps.remove(&at) {
                    self.reindex_policy(
                        |k| &mut k.gtps,
                        Reach::Clients,
                        PolicyMove { at, old: old.identity, new: None },
                    );
                }
            }
            Kind::OutlierDetection => {
                if let Some(old) = self.outlier_detections.remove(&at) {
                    self.reindex_policy(
                        |k| &mut k.outlier_detections,
                        Reach::Itself,
                        PolicyMove { at, old: old.identity, new: None },
                    );
                }
            }
            Kind::ClientConnectionConfig => {
                if let Some(old) = self.connection_configs.remove(&at) {
                    self.reindex_policy(
                        |k| &mut k.connection_configs,
                        Reach::Itself,
                        PolicyMove { at, old: old.identity, new: None },
                    );
                }
            }
            Kind::Dependency => self.set_dependency(at, None),
            Kind::ServiceEntry => {
                if let Some(c) = self.cluster_mut(cluster)
                    && let Some(old) = c.foreign_service_entries.remove(&key)
                {
                    self.dirty.hosts.extend(held_hosts(name, &old));
                }
            }
            // Not an input: nothing of it is kept.
            Kind::DestinationRule => {}
        }
    }

    fn set_workload(&mut self, cluster: &str, key: WorkloadKey, new: Option<Workload>) {
        let Some(c) = self.cluster_mut(cluster) else {
            return;
        };
        let idx = c.idx;
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
            self.unindex_workload(idx, o);
        }
        if let Some(n) = &new {
            if let Some(id) = &n.identity
                && self.known.insert(id, |k| &mut k.workloads, (idx, n.key()))
            {
                self.by_folded.entry(id.to_ascii_lowercase()).or_default().insert(id.clone());
            }
            self.dirty.touch(n.identity.as_deref(), Reach::Neighbours);
        }
    }

    fn unindex_workload(&mut self, cluster: ClusterIdx, w: &Workload) {
        if let Some(id) = &w.identity
            && self.known.remove(id, |k| &mut k.workloads, &(cluster, w.key()))
        {
            let folded = id.to_ascii_lowercase();
            if let Some(twins) = self.by_folded.get_mut(&folded) {
                twins.remove(id);
                if twins.is_empty() {
                    self.by_folded.remove(&folded);
                }
            }
        }
        self.dirty.touch(w.identity.as_deref(), Reach::Neighbours);
    }

    fn set_service(&mut self, cluster: &str, key: NsName, new: Option<ServiceInfo>) {
        let Some(c) = self.cluster_mut(cluster) else {
            return;
        };
        let gateway_namespace = key.0 == GATEWAY_NAMESPACE;
        let old = c.set_service(key.clone(), new.clone());
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
        let Some(c) = self.cluster_mut(cluster) else {
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
        let Some(c) = self.cluster_mut(cluster) else {
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

    /// Records what a Namespace's `flotilla.io/identities` allows. Who may speak for an identity
    /// decides its endpoints, its policies and its Dependencies' validity anywhere in the fleet,
    /// and such edits are rare: everything is recomputed.
    fn set_allowance(&mut self, cluster: &str, namespace: &str, allows: Option<Allowance>) {
        let Some(c) = self.cluster_mut(cluster) else {
            return;
        };
        let old = match &allows {
            Some(a) => c.allowances.insert(namespace.to_string(), a.clone()),
            None => c.allowances.remove(namespace),
        };
        if old == allows {
            return;
        }
        if let Some(o) = &old {
            self.count_named(o, false);
        }
        if let Some(n) = &allows {
            self.count_named(n, true);
        }
        // The Dependencies kept in this namespace may speak for their sources now, or no longer.
        if self.tenancy == Tenancy::Owned {
            let from =
                ObjectRef { cluster: cluster.to_string(), namespace: namespace.to_string(), name: String::new() };
            let sources: BTreeSet<String> = self
                .dependencies
                .range(from..)
                .take_while(|(at, _)| at.cluster == cluster && at.namespace == namespace)
                .map(|(_, d)| d.source.clone())
                .collect();
            for source in sources {
                self.reindex_source(&source);
            }
        }
        self.dirty.all = true;
    }

    fn count_named(&mut self, allowance: &Allowance, add: bool) {
        let Allowance::Only(names) = allowance else {
            return;
        };
        for name in names {
            // Case-folded: a claim on `Payments` takes the hosts of an owned `payments`.
            let name = name.to_ascii_lowercase();
            let count = self.named.entry(name.clone()).or_default();
            if add {
                *count += 1;
            } else {
                *count -= 1;
                if *count == 0 {
                    self.named.remove(&name);
                }
            }
        }
    }

    /// Whether some member namespace names `identity` (or an identity that differs from it only
    /// in case, whose hosts it would take) in its `flotilla.io/identities`: a claim on it from a
    /// namespace that may not run it is a decoy, reported in either tenancy.
    pub fn is_named_anywhere(&self, identity: &str) -> bool {
        self.named.contains_key(&identity.to_ascii_lowercase())
    }

    /// Every workload whose namespace may not run the identity it claims, in (member, namespace,
    /// name) order: refused under `--tenancy=owned`, served under `open`.
    pub fn disallowed_claims(&self) -> impl Iterator<Item = DisallowedClaim<'_>> {
        self.clusters()
            .flat_map(move |cluster| cluster.workloads.values().filter_map(move |w| self.disallowed(cluster, w)))
    }

    /// `w`'s claim, when its namespace may not run the identity it claims.
    pub fn disallowed<'a>(&'a self, cluster: &'a Cluster, w: &'a Workload) -> Option<DisallowedClaim<'a>> {
        let identity = w.identity.as_deref()?;
        let disallowed = cluster.claims(w) && cluster.standing(&w.namespace, identity) == Standing::NotAllowed;
        disallowed.then(|| DisallowedClaim {
            cluster,
            workload: w,
            identity,
            refused: cluster.is_refused(w),
            decoy: self.is_named_anywhere(identity),
        })
    }

    pub fn tenancy(&self) -> Tenancy {
        self.tenancy
    }

    /// Why a Dependency may not speak for its source: it lives in a member namespace that may
    /// not run it, or in a hub namespace that is not one of `--dependency-namespace`. None when
    /// it may (or the tenancy is open).
    pub fn dependency_refusal(&self, d: &DependencyEntry) -> Option<String> {
        if self.tenancy == Tenancy::Open {
            return None;
        }
        self.dependency_disallowed(d)
    }

    /// What `dependency_refusal` would say under `--tenancy=owned`.
    pub fn dependency_disallowed(&self, d: &DependencyEntry) -> Option<String> {
        let (at, source) = (&d.at, &d.source);
        if at.cluster == HUB {
            if self.dependency_namespaces.contains(&at.namespace) {
                return None;
            }
            return Some(format!(
                "hub namespace {:?} is not a platform namespace for Dependencies (--dependency-namespace); only Dependencies there, or in a member namespace allowed to run {source:?}, may speak for it",
                at.namespace
            ));
        }
        let allowed =
            self.cluster(&at.cluster).is_some_and(|c| c.standing(&at.namespace, source) != Standing::NotAllowed);
        (!allowed).then(|| {
            format!(
                "namespace {:?} of cluster {:?} may not run identity {source:?} (Namespace annotation {ANNOTATION_IDENTITIES}), so it may not declare that identity's dependencies",
                at.namespace, at.cluster
            )
        })
    }

    /// Marks every identity with a workload in `cluster`/`namespace`.
    fn touch_namespace(&mut self, cluster: &str, namespace: &str, reach: Reach) {
        let Some(&idx) = self.present.get(cluster) else {
            return;
        };
        let Some(c) = self.members[idx.index()].as_ref() else {
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
        if let Some(o) = &old {
            self.known.remove(&o.source, |k| &mut k.dependencies, &at);
        }
        if let Some(n) = &new {
            self.known.insert(&n.source, |k| &mut k.dependencies, at);
        }
        for source in sources {
            self.reindex_source(&source);
        }
    }

    /// Moves a policy from the identity it named to the one it names, in `field` (one of each
    /// entry's policy sets), and marks both as far as the policy reaches.
    fn reindex_policy(&mut self, field: Field<ObjectRef>, reach: Reach, moved: PolicyMove) {
        let PolicyMove { at, old, new } = moved;
        if let Some(o) = &old {
            self.known.remove(o, field, &at);
            self.dirty.touch(Some(o), reach);
        }
        if let Some(n) = &new {
            self.known.insert(n, field, at);
            self.dirty.touch(Some(n), reach);
        }
    }

    /// Rebuilds the reverse dependency index entries of one source from its Dependencies, and
    /// marks the destinations it began or stopped naming: they are written to other clusters now.
    /// A destination it names in another Dependency too keeps its clients, and is not marked.
    fn reindex_source(&mut self, source: &str) {
        self.wildcard_sources.remove(source);
        let mut named = BTreeSet::new();
        let mut wildcard = false;
        let accepted =
            self.dependencies_of(source).filter(|d| d.invalid.is_none() && self.dependency_refusal(d).is_none());
        for d in accepted {
            wildcard |= d.wildcard;
            named.extend(d.destinations.iter().cloned());
        }
        if wildcard {
            self.wildcard_sources.insert(source.to_string());
        }
        let before = self.known.replace(source, |k| &mut k.destinations, named.clone());
        for dest in before.difference(&named) {
            self.known.remove(dest, |k| &mut k.named_by, &source.to_string());
        }
        for dest in named.difference(&before) {
            self.known.insert(dest, |k| &mut k.named_by, source.to_string());
        }
        for dest in before.symmetric_difference(&named) {
            self.dirty.touch(Some(dest), Reach::Itself);
        }
    }
}

/// A workload claiming an identity its namespace may not run.
#[derive(Clone, Copy, Debug)]
pub struct DisallowedClaim<'a> {
    pub cluster: &'a Cluster,
    pub workload: &'a Workload,
    pub identity: &'a str,
    /// Refused (`--tenancy=owned`); else served.
    pub refused: bool,
    /// Some namespace names the identity: this claim takes someone else's.
    pub decoy: bool,
}

impl DisallowedClaim<'_> {
    /// Whether it is reported (a diagnostic, an Event): every refused claim, and the decoys
    /// `open` serves.
    pub fn is_reported(&self) -> bool {
        self.refused || self.decoy
    }

    /// What is said of it, the same in `render`, `/debug` and the Event.
    pub fn note(&self) -> String {
        let (ns, identity) = (&self.workload.namespace, self.identity);
        let why = if self.decoy {
            format!(
                "namespace {ns:?} may not run identity {identity:?}: other namespaces own it (Namespace annotation {ANNOTATION_IDENTITIES})"
            )
        } else {
            format!(
                "namespace {ns:?} may not run identity {identity:?} (no Namespace annotation {ANNOTATION_IDENTITIES} of it names the identity or '*')"
            )
        };
        if self.refused {
            format!("{why}; refused: it serves no host, endpoint or policy anywhere")
        } else {
            format!("{why}; still served because --tenancy=open, refused under --tenancy=owned")
        }
    }
}

/// The hosts a foreign ServiceEntry named `name` holding `hosts` keeps from flotilla.
fn held_hosts<'a>(name: &str, hosts: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut held: Vec<String> = hosts.into_iter().cloned().collect();
    held.extend(name.strip_suffix("-se").map(str::to_string));
    held
}

/// A policy and the identities it named and now names (None: none, or the policy is gone).
struct PolicyMove {
    at: ObjectRef,
    old: Option<String>,
    new: Option<String>,
}

/// Stores a judged policy. An invalid spec does not replace the last valid one, which stays in
/// force; the reason is kept for the policy's status. Returns how it moved between identities.
fn store_policy<S: Clone>(policies: &mut BTreeMap<ObjectRef, Policy<S>>, mut policy: Policy<S>) -> PolicyMove {
    let at = policy.at.clone();
    if policy.effective.is_none() {
        policy.effective = policies.get(&at).and_then(|p| p.effective.clone());
    }
    let identity = policy.identity.clone();
    let old = policies.insert(at.clone(), policy);
    PolicyMove { at, old: old.and_then(|p| p.identity), new: identity }
}
