//! The desired state of the whole fleet, by identity and by cluster, and how one recompute's
//! identity outputs are swapped into it (on every core, each owning a share of the clusters).

use std::collections::{BTreeMap, BTreeSet, HashSet, btree_map};
use std::sync::Arc;

use crate::model::ClusterId;

use super::*;

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
    pub(super) by_identity: BTreeMap<String, Arc<IdentityOutput>>,
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
    pub(super) fn prepare(&self, identity: &str, mut output: IdentityOutput) -> Swap {
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
    pub(super) fn swap(&mut self, identities: &[&str], swaps: Vec<Swap>, threads: usize, changed: &mut Changed) {
        let threads = if swaps.len() < SWAP_PARALLEL_MIN { 1 } else { threads.max(1) };
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
pub(super) struct Swap {
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

/// Below this many identities, a swap stays on the calling thread: spawning costs more.
const SWAP_PARALLEL_MIN: usize = 64;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::Sidecar;
    use crate::meta::Kind;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use proptest::prelude::*;

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

    }
}
