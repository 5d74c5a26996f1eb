//! What is known of each member as it is now: which objects of each watched kind exist (so a
//! relist can tell what was deleted meanwhile), the objects flotilla writes as the member holds
//! them (what plans compare with), and every policy's status as it reads now.

use std::collections::{BTreeMap, BTreeSet};

use crate::compute::ObjectKey;
use crate::compute::plan::ObservedObject;
use crate::crd::PolicyStatus;
use crate::meta::Kind;
use crate::model::{ClusterId, NsName, ObjectRef};

/// A policy's kind and where it is: the key of its status.
pub type StatusKey = (Kind, ObjectRef);

#[derive(Debug, Default)]
pub struct Observed {
    known: BTreeMap<(ClusterId, Kind), BTreeSet<NsName>>,
    outputs: BTreeMap<ClusterId, BTreeMap<ObjectKey, ObservedObject>>,
    statuses: BTreeMap<StatusKey, Option<PolicyStatus>>,
}

impl Observed {
    /// An object of `kind` exists in `cluster`.
    pub fn seen(&mut self, cluster: &str, kind: Kind, key: NsName) {
        self.known.entry((cluster.to_string(), kind)).or_default().insert(key);
    }

    /// An object of `kind` was deleted from `cluster`.
    pub fn gone(&mut self, cluster: &str, kind: Kind, key: &NsName) {
        if let Some(set) = self.known.get_mut(&(cluster.to_string(), kind)) {
            set.remove(key);
        }
        if kind.is_output() {
            self.remove_output(cluster, &ObjectKey::new(kind, &key.0, &key.1));
        }
        if kind.is_policy() {
            let at = ObjectRef { cluster: cluster.to_string(), namespace: key.0.clone(), name: key.1.clone() };
            self.statuses.remove(&(kind, at));
        }
    }

    /// A complete list of `kind` in `cluster` arrived: returns what was known and is not in it
    /// (deleted while the watch was down), which the caller deletes with `gone`. A list of an
    /// output kind replaces what was assumed about its objects.
    pub fn relisted(&mut self, cluster: &str, kind: Kind, listed: &BTreeSet<NsName>) -> Vec<NsName> {
        let before = self.known.get(&(cluster.to_string(), kind));
        let vanished = before.map(|b| b.difference(listed).cloned().collect()).unwrap_or_default();
        if kind.is_output()
            && let Some(outputs) = self.outputs.get_mut(cluster)
        {
            outputs.retain(|k, _| k.kind != kind);
        }
        vanished
    }

    pub fn observe_output(&mut self, cluster: &str, object: ObservedObject) {
        self.outputs.entry(cluster.to_string()).or_default().insert(object.key.clone(), object);
    }

    pub fn remove_output(&mut self, cluster: &str, key: &ObjectKey) {
        if let Some(outputs) = self.outputs.get_mut(cluster) {
            outputs.remove(key);
        }
    }

    /// What a finished write job left in `cluster`: the objects as the API server returned
    /// them, the ones pruned, and the statuses written.
    pub fn written(&mut self, cluster: &str, report: &mut super::WriteReport) {
        for o in report.applied.drain(..) {
            self.observe_output(cluster, o);
        }
        for k in &report.pruned {
            self.remove_output(cluster, k);
        }
        for s in report.statuses.drain(..) {
            let at = ObjectRef { cluster: cluster.to_string(), namespace: s.namespace, name: s.name };
            self.set_status((s.kind, at), Some(s.status));
        }
    }

    /// The objects of the kinds flotilla writes that `cluster` holds.
    pub fn outputs(&self, cluster: &str) -> Option<&BTreeMap<ObjectKey, ObservedObject>> {
        self.outputs.get(cluster)
    }

    pub fn set_status(&mut self, key: StatusKey, status: Option<PolicyStatus>) {
        self.statuses.insert(key, status);
    }

    /// The status a policy carries now: None if the policy is not watched (or gone), Some(None)
    /// if it has none yet.
    pub fn status(&self, key: &StatusKey) -> Option<&Option<PolicyStatus>> {
        self.statuses.get(key)
    }

    /// Forgets everything about a member that left the fleet.
    pub fn forget_cluster(&mut self, cluster: &str) {
        self.known.retain(|(c, _), _| c != cluster);
        self.outputs.remove(cluster);
        self.statuses.retain(|(_, at), _| at.cluster != cluster);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::DesiredObject;
    use crate::istio::Sidecar;

    fn key(name: &str) -> NsName {
        ("ns".into(), name.into())
    }

    fn sidecar(name: &str) -> ObservedObject {
        let mut s = Sidecar::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("ns".into());
        ObservedObject::new(&DesiredObject::Sidecar(s))
    }

    #[test]
    fn a_relist_names_what_vanished_and_replaces_assumed_outputs() {
        let mut o = Observed::default();
        for name in ["a", "b", "c"] {
            o.seen("m", Kind::Sidecar, key(name));
            o.observe_output("m", sidecar(name));
        }
        o.seen("m", Kind::Deployment, key("d"));
        let listed: BTreeSet<NsName> = [key("b")].into();
        assert_eq!(o.relisted("m", Kind::Sidecar, &listed), [key("a"), key("c")]);
        assert!(o.outputs("m").unwrap().is_empty(), "the list is the truth: re-observed one by one");
        let nothing: BTreeSet<NsName> = BTreeSet::new();
        assert_eq!(o.relisted("m", Kind::Deployment, &nothing), [key("d")], "kinds are separate");
        assert!(o.relisted("other", Kind::Sidecar, &nothing).is_empty(), "members are separate");
    }

    #[test]
    fn a_deleted_policy_loses_its_status_and_a_removed_member_everything() {
        let mut o = Observed::default();
        let at = ObjectRef { cluster: "m".into(), namespace: "ns".into(), name: "gtp".into() };
        o.seen("m", Kind::GlobalTrafficPolicy, key("gtp"));
        o.set_status((Kind::GlobalTrafficPolicy, at.clone()), None);
        assert_eq!(o.status(&(Kind::GlobalTrafficPolicy, at.clone())), Some(&None));
        o.gone("m", Kind::GlobalTrafficPolicy, &key("gtp"));
        assert_eq!(o.status(&(Kind::GlobalTrafficPolicy, at)), None);
        o.observe_output("m", sidecar("s"));
        o.forget_cluster("m");
        assert!(o.outputs("m").is_none());
    }
}
