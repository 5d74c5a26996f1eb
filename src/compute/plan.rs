//! Planning: the difference between what a cluster should hold and what it holds.
//!
//! Only objects carrying flotilla's managed-by label are ever updated or pruned; an object of
//! someone else's with the name flotilla wants is a conflict, reported and left alone.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use super::{DesiredObject, ObjectKey};

/// An object of a kind flotilla writes, as found in a cluster (parsed into our typed form, so
/// fields set by other field managers are invisible to the comparison).
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedObject {
    /// Carries `app.kubernetes.io/managed-by: flotilla`.
    pub managed: bool,
    pub object: DesiredObject,
}

impl ObservedObject {
    pub fn new(object: DesiredObject) -> Self {
        ObservedObject { managed: crate::model::is_managed(object.meta()), object }
    }
}

/// What to do in one cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterPlan {
    /// Missing or different: server-side apply these.
    pub apply: Vec<Arc<DesiredObject>>,
    /// Managed by flotilla and no longer desired: delete these.
    pub prune: Vec<ObjectKey>,
    /// Wanted, but an object not managed by flotilla has the name: left alone, reported.
    pub conflicts: Vec<ObjectKey>,
}

impl ClusterPlan {
    pub fn is_empty(&self) -> bool {
        self.apply.is_empty() && self.prune.is_empty()
    }
}

/// Plans a whole cluster: one merge of the two key-sorted maps, no lookups.
pub fn plan_cluster(
    desired: &BTreeMap<ObjectKey, Arc<DesiredObject>>,
    observed: &BTreeMap<ObjectKey, ObservedObject>,
) -> ClusterPlan {
    let mut plan = ClusterPlan::default();
    let mut want = desired.iter().peekable();
    let mut have = observed.iter().peekable();
    loop {
        let order = match (want.peek(), have.peek()) {
            (None, None) => break,
            (Some((w, _)), Some((h, _))) => w.cmp(h),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                let (key, w) = want.next().expect("peeked");
                decide(&mut plan, key, Some(w), None);
            }
            Ordering::Greater => {
                let (key, h) = have.next().expect("peeked");
                decide(&mut plan, key, None, Some(h));
            }
            Ordering::Equal => {
                let (key, w) = want.next().expect("peeked");
                let (_, h) = have.next().expect("peeked");
                decide(&mut plan, key, Some(w), Some(h));
            }
        }
    }
    plan
}

/// Plans only the given keys (those an incremental recompute reported as changed). Keys may
/// repeat; each is considered once.
pub fn plan_keys<'a>(
    desired: &BTreeMap<ObjectKey, Arc<DesiredObject>>,
    observed: &BTreeMap<ObjectKey, ObservedObject>,
    keys: impl IntoIterator<Item = &'a ObjectKey>,
) -> ClusterPlan {
    let mut plan = ClusterPlan::default();
    let mut sorted: Vec<&ObjectKey> = keys.into_iter().collect();
    sorted.sort();
    sorted.dedup();
    for key in sorted {
        decide(&mut plan, key, desired.get(key), observed.get(key));
    }
    plan
}

/// What one key needs: apply when missing or different, prune when ours and unwanted, and a
/// conflict when someone else's object holds the name.
fn decide(plan: &mut ClusterPlan, key: &ObjectKey, want: Option<&Arc<DesiredObject>>, have: Option<&ObservedObject>) {
    match (want, have) {
        (Some(want), None) => plan.apply.push(want.clone()),
        (Some(_), Some(have)) if !have.managed => plan.conflicts.push(key.clone()),
        (Some(want), Some(have)) => {
            if !up_to_date(want, &have.object) {
                plan.apply.push(want.clone());
            }
        }
        (None, Some(have)) if have.managed => plan.prune.push(key.clone()),
        (None, _) => {}
    }
}

/// Same spec, and every label we set is present with our value.
fn up_to_date(want: &DesiredObject, have: &DesiredObject) -> bool {
    let labels_ok = {
        let empty = BTreeMap::new();
        let want_labels = want.meta().labels.as_ref().unwrap_or(&empty);
        let have_labels = have.meta().labels.as_ref().unwrap_or(&empty);
        want_labels.iter().all(|(k, v)| have_labels.get(k) == Some(v))
    };
    let spec_ok = match (want, have) {
        (DesiredObject::ServiceEntry(a), DesiredObject::ServiceEntry(b)) => a.spec == b.spec,
        (DesiredObject::DestinationRule(a), DesiredObject::DestinationRule(b)) => a.spec == b.spec,
        (DesiredObject::Sidecar(a), DesiredObject::Sidecar(b)) => a.spec == b.spec,
        _ => false,
    };
    labels_ok && spec_ok
}
