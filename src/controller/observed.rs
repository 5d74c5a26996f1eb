//! What is known of each member as it is now: which objects of each watched kind exist (so a
//! relist can tell what was deleted meanwhile), the objects flotilla writes as the member holds
//! them (what plans compare with), and every policy's status as it reads now.
//!
//! It never goes back in time: what a watch reports about an object while a write job is under
//! way in its member is at least as new as what the job will report about it, so the job's word
//! on that object is dropped when it ends (an object deleted by someone during the job stays
//! deleted here, and is written again).

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
    /// Members with a write job under way, and the outputs a watch reported on since it was
    /// sent (None: a relist, every output).
    in_flight: BTreeMap<ClusterId, Option<BTreeSet<ObjectKey>>>,
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
            let key = ObjectKey::new(kind, &key.0, &key.1);
            self.touched(cluster, &key);
            self.remove_output(cluster, &key);
        }
        if kind.is_policy() {
            let at = ObjectRef { cluster: cluster.to_string(), namespace: key.0.clone(), name: key.1.clone() };
            self.statuses.remove(&(kind, at));
        }
    }

    /// A complete list of `kind` in `cluster` arrived (its objects, page by page, before this):
    /// returns what was known and is not in it (deleted while the watch was down), which the
    /// caller deletes with `gone`. Of an output kind, only what the list holds is believed
    /// (an object a job reported and the list lacks was deleted since).
    pub fn relisted(&mut self, cluster: &str, kind: Kind, listed: &BTreeSet<NsName>) -> Vec<NsName> {
        let before = self.known.get(&(cluster.to_string(), kind));
        let vanished = before.map(|b| b.difference(listed).cloned().collect()).unwrap_or_default();
        if kind.is_output() {
            if let Some(touched) = self.in_flight.get_mut(cluster) {
                *touched = None;
            }
            if let Some(outputs) = self.outputs.get_mut(cluster) {
                outputs
                    .retain(|k, _| k.kind != kind || listed.contains(&(k.namespace.to_string(), k.name.to_string())));
            }
        }
        vanished
    }

    /// A watch reported one of the objects flotilla writes, as it is now.
    pub fn watched_output(&mut self, cluster: &str, object: ObservedObject) {
        self.touched(cluster, &object.key);
        self.observe_output(cluster, object);
    }

    fn touched(&mut self, cluster: &str, key: &ObjectKey) {
        if let Some(Some(keys)) = self.in_flight.get_mut(cluster) {
            keys.insert(key.clone());
        }
    }

    /// A write job was sent to `cluster` (one at a time per member).
    pub fn job_sent(&mut self, cluster: &str) {
        self.in_flight.insert(cluster.to_string(), Some(BTreeSet::new()));
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
    /// Objects a watch reported on while the job ran keep the watch's word.
    pub fn written(&mut self, cluster: &str, report: &mut super::WriteReport) {
        let touched = self.in_flight.remove(cluster);
        let newer = |key: &ObjectKey| match &touched {
            None => false,
            Some(None) => true,
            Some(Some(keys)) => keys.contains(key),
        };
        for o in report.applied.drain(..) {
            if !newer(&o.key) {
                self.observe_output(cluster, o);
            }
        }
        for k in &report.pruned {
            if !newer(k) {
                self.remove_output(cluster, k);
            }
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
        self.in_flight.remove(cluster);
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
        // Reported by a job, never seen by the watch.
        o.observe_output("m", sidecar("e"));
        o.seen("m", Kind::Deployment, key("d"));
        let listed: BTreeSet<NsName> = [key("b")].into();
        assert_eq!(o.relisted("m", Kind::Sidecar, &listed), [key("a"), key("c")]);
        let outputs: Vec<&str> = o.outputs("m").unwrap().keys().map(|k| &*k.name).collect();
        assert_eq!(outputs, ["b"], "the list is the truth: what it lacks is gone, what a job said included");
        let nothing: BTreeSet<NsName> = BTreeSet::new();
        assert_eq!(o.relisted("m", Kind::Deployment, &nothing), [key("d")], "kinds are separate");
        assert!(o.relisted("other", Kind::Sidecar, &nothing).is_empty(), "members are separate");
    }

    #[test]
    fn what_a_watch_said_during_a_job_beats_the_jobs_report() {
        let mut o = Observed::default();
        o.job_sent("m");
        // Written by the job, then deleted by someone before the job reported.
        o.watched_output("m", sidecar("a"));
        o.gone("m", Kind::Sidecar, &key("a"));
        let mut report = super::super::WriteReport { applied: vec![sidecar("a"), sidecar("b")], ..Default::default() };
        o.written("m", &mut report);
        let held: Vec<_> = o.outputs("m").unwrap().keys().map(|k| k.name.to_string()).collect();
        assert_eq!(held, ["b"], "a stays deleted (and is written again); b is as the job left it");
        // No job under way: a report is taken as it is.
        let mut report = super::super::WriteReport { applied: vec![sidecar("a")], ..Default::default() };
        o.written("m", &mut report);
        assert!(o.outputs("m").unwrap().contains_key(&sidecar("a").key));
        // A relist during a job: the list is the truth for everything.
        o.job_sent("m");
        o.relisted("m", Kind::Sidecar, &BTreeSet::new());
        let mut report = super::super::WriteReport { pruned: vec![sidecar("b").key], ..Default::default() };
        o.observe_output("m", sidecar("b"));
        o.written("m", &mut report);
        assert!(o.outputs("m").unwrap().contains_key(&sidecar("b").key), "the prune's word is dropped");
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
