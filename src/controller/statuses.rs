//! Policy statuses waiting to be written, per cluster: what each policy should carry, compared
//! with what it carries now. Synchronous; the stamp of the time comes in as an argument.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::observed::{Observed, StatusKey};
use super::writer::StatusWrite;
use crate::compute::PolicyReport;
use crate::compute::status::{policy_status, same_status};
use crate::crd::PolicyStatus;
use crate::model::ClusterId;

/// What went wrong in each member, for the statuses of the policies written there.
#[derive(Debug, Default)]
pub struct ClusterErrors {
    /// The member as a whole: stale, refused, its sync namespace, a failed job.
    pub member: BTreeMap<ClusterId, String>,
    /// Objects whose last write failed there, by name.
    pub objects: BTreeMap<ClusterId, BTreeMap<String, String>>,
}

/// The most errors one policy's status names for a member, and the longest each may be: a status
/// stays small however much fails.
const ERRORS_SHOWN: usize = 3;
const ERROR_CHARS: usize = 300;

impl ClusterErrors {
    /// Per member a report writes to, the error its status names there: the member's own, else
    /// those of the report's own objects (a ServiceEntry or DestinationRule of one of its hosts,
    /// a Dependency's Sidecar), never another policy's.
    fn for_report(&self, report: &PolicyReport) -> BTreeMap<ClusterId, String> {
        let mut out = BTreeMap::new();
        for (cluster, hosts) in &report.clusters {
            if let Some(e) = self.member.get(cluster) {
                out.insert(cluster.clone(), bounded(e));
                continue;
            }
            let Some(failing) = self.objects.get(cluster) else { continue };
            let own = |name: &str| {
                report.sidecar.as_deref() == Some(name)
                    || ["-se", "-default-dr", "-dr"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix).is_some_and(|h| hosts.contains(h)))
            };
            let mine: Vec<&String> = failing.iter().filter(|(name, _)| own(name)).map(|(_, e)| e).collect();
            let Some(first) = mine.first() else { continue };
            let mut text = bounded(first);
            for e in mine.iter().skip(1).take(ERRORS_SHOWN - 1) {
                let _ = write!(text, "; {}", bounded(e));
            }
            if mine.len() > ERRORS_SHOWN {
                let _ = write!(text, " (and {} more)", mine.len() - ERRORS_SHOWN);
            }
            out.insert(cluster.clone(), text);
        }
        out
    }
}

fn bounded(error: &str) -> String {
    match error.char_indices().nth(ERROR_CHARS) {
        Some((at, _)) => format!("{}…", &error[..at]),
        None => error.to_string(),
    }
}

#[derive(Debug, Default)]
pub struct PendingStatuses {
    by_cluster: BTreeMap<ClusterId, BTreeMap<StatusKey, PolicyStatus>>,
}

impl PendingStatuses {
    /// Compares every report's wanted status with the status its policy carries; queues the
    /// differences (replacing what was queued for the same policy) and drops queued statuses
    /// that became true meanwhile. `errors` are the clusters' current errors, which statuses name.
    /// Returns how many were queued.
    pub fn queue<'a>(
        &mut self,
        reports: impl IntoIterator<Item = &'a PolicyReport>,
        observed: &Observed,
        errors: &ClusterErrors,
        stamp: &str,
    ) -> usize {
        let mut queued = 0;
        for report in reports {
            let key = (report.kind, report.at.clone());
            let Some(carried) = observed.status(&key) else {
                continue; // not (or no longer) watched: nothing to write to
            };
            let wanted = policy_status(report, &errors.for_report(report), carried.as_ref(), stamp);
            if carried.as_ref().is_some_and(|c| same_status(c, &wanted)) {
                if let Some(pending) = self.by_cluster.get_mut(&report.at.cluster) {
                    pending.remove(&key);
                }
                continue;
            }
            self.by_cluster.entry(report.at.cluster.clone()).or_default().insert(key, wanted);
            queued += 1;
        }
        self.by_cluster.retain(|_, pending| !pending.is_empty());
        queued
    }

    /// Takes what is queued for `cluster`, less any status written since it was queued (by the
    /// job that just finished).
    pub fn take(&mut self, cluster: &str, observed: &Observed) -> Vec<StatusWrite> {
        let mut writes = Vec::new();
        for ((kind, at), status) in self.by_cluster.remove(cluster).unwrap_or_default() {
            let current = observed.status(&(kind, at.clone())).cloned().flatten();
            if current.is_some_and(|c| same_status(&c, &status)) {
                continue;
            }
            writes.push(StatusWrite { kind, namespace: at.namespace, name: at.name, status });
        }
        writes
    }

    pub fn clusters(&self) -> impl Iterator<Item = &ClusterId> {
        self.by_cluster.keys()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_cluster.is_empty()
    }

    /// Forgets a member that left the fleet.
    pub fn forget(&mut self, cluster: &str) {
        self.by_cluster.remove(cluster);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::PolicyState;
    use crate::meta::Kind;
    use crate::model::ObjectRef;

    fn report(name: &str) -> PolicyReport {
        PolicyReport {
            kind: Kind::GlobalTrafficPolicy,
            at: ObjectRef { cluster: "east".into(), namespace: "app".into(), name: name.into() },
            generation: Some(1),
            state: PolicyState::Ready,
            clusters: BTreeMap::new(),
            message: String::new(),
            sidecar: None,
        }
    }

    fn key(r: &PolicyReport) -> StatusKey {
        (r.kind, r.at.clone())
    }

    #[test]
    fn only_watched_policies_whose_status_differs_are_written() {
        let (watched, unwatched) = (report("watched"), report("unwatched"));
        let mut observed = Observed::default();
        observed.set_status(key(&watched), None);
        let mut pending = PendingStatuses::default();
        let errors = ClusterErrors::default();
        assert_eq!(pending.queue([&watched, &unwatched], &observed, &errors, "t1"), 1);
        assert_eq!(pending.clusters().collect::<Vec<_>>(), ["east"]);
        let writes = pending.take("east", &observed);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].name, "watched");
        assert!(pending.is_empty());

        // Written: the policy now carries it, and a later pass finds nothing to do.
        observed.set_status(key(&watched), Some(writes[0].status.clone()));
        assert_eq!(pending.queue([&watched], &observed, &errors, "t2"), 0);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_status_that_became_true_since_it_was_queued_is_dropped() {
        let r = report("gtp");
        let mut observed = Observed::default();
        observed.set_status(key(&r), None);
        let (mut taken, mut requeued) = (PendingStatuses::default(), PendingStatuses::default());
        taken.queue([&r], &observed, &ClusterErrors::default(), "t1");
        requeued.queue([&r], &observed, &ClusterErrors::default(), "t1");
        let wanted = PendingStatuses::default().tap_queue(&r, &observed);
        observed.set_status(key(&r), Some(wanted));
        assert!(taken.take("east", &observed).is_empty(), "the job that just finished wrote it");
        requeued.queue([&r], &observed, &ClusterErrors::default(), "t2");
        assert!(requeued.is_empty(), "nothing pending for a member once its statuses are true");
    }

    #[test]
    fn a_policy_names_only_its_own_objects_errors_and_few_of_them() {
        let mut r = report("gtp");
        r.clusters.insert("west".into(), std::sync::Arc::new(["stage.a.global".to_string()].into()));
        r.clusters.insert("north".into(), std::sync::Arc::new(["stage.a.global".to_string()].into()));
        let mut errors = ClusterErrors::default();
        let west = errors.objects.entry("west".into()).or_default();
        west.insert("stage.a.global-se".into(), "apply stage.a.global-se: invalid".into());
        west.insert("stage.other-team.global-se".into(), "apply stage.other-team.global-se: invalid".into());
        for i in 0..10 {
            west.insert(format!("stage.a.global-{i}-dr"), "x".repeat(1000));
        }
        errors.member.insert("north".into(), "member is stale".into());
        let named = errors.for_report(&r);
        assert_eq!(named["north"], "member is stale");
        let west = &named["west"];
        assert!(west.contains("stage.a.global-se"), "{west}");
        assert!(!west.contains("other-team"), "another team's object leaked: {west}");
        assert!(west.len() < 2 * ERROR_CHARS * ERRORS_SHOWN, "bounded: {} chars", west.len());
        let mut many = report("gtp");
        many.clusters
            .insert("west".into(), std::sync::Arc::new((0..10).map(|i| format!("stage.a.global-{i}")).collect()));
        let named = errors.for_report(&many);
        assert!(named["west"].ends_with("(and 7 more)"), "{}", named["west"]);
        assert!(named["west"].len() < 4 * ERROR_CHARS * ERRORS_SHOWN);
    }

    #[test]
    fn a_dependency_names_its_sidecar_s_errors_and_not_another_s() {
        let mut dep = report("caller-deps");
        dep.kind = Kind::Dependency;
        dep.sidecar = Some("caller-egress".into());
        dep.clusters.insert("east".into(), std::sync::Arc::new(["stage.greeting.global".to_string()].into()));
        let mut errors = ClusterErrors::default();
        let east = errors.objects.entry("east".into()).or_default();
        east.insert("caller-egress".into(), "apply caller/caller-egress: denied by a webhook".into());
        east.insert("other-egress".into(), "apply other/other-egress: denied".into());
        let named = errors.for_report(&dep);
        assert!(named["east"].contains("caller-egress: denied by a webhook"), "{named:?}");
        assert!(!named["east"].contains("other-egress"), "{named:?}");
        // A GTP of the same hosts does not name the Sidecar.
        let mut gtp = report("gtp");
        gtp.clusters = dep.clusters.clone();
        assert!(errors.for_report(&gtp).is_empty());
    }

    impl PendingStatuses {
        /// The status `queue` would write for `r` now.
        fn tap_queue(mut self, r: &PolicyReport, observed: &Observed) -> PolicyStatus {
            self.queue([r], observed, &ClusterErrors::default(), "t1");
            self.take(&r.at.cluster, observed).pop().expect("a status to write").status
        }
    }
}
