//! The blast-radius guard: a member's prunes are held when more would go at once than an
//! operator would ever mean (a deleted namespace of Dependencies, a wrong selector, a Secret
//! edit). Everything else is still written; the held prunes wait for the cause to be fixed (a
//! whole plan of the member prunes no more than the limit again) or for the operator to release
//! them by the hold's id. Pure decisions: the runtime plans, reports and writes.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::compute::ObjectKey;
use crate::compute::plan::ClusterPlan;
use crate::model::ClusterId;

/// When prunes are held (`--prune-hold-threshold`, `--prune-hold-share`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// More prunes than this (within `window`) may hold; 0 turns the guard off.
    pub threshold: usize,
    /// ... and more than this share of the member's managed objects.
    pub share: f64,
    /// Prunes already done within this window count towards the limit: a deletion that arrives
    /// in many small passes (a namespace's objects go one by one) trips it too.
    pub window: Duration,
}

impl Limits {
    /// How many prunes a member holding `managed` objects may see within the window.
    pub fn allowed(&self, managed: usize) -> usize {
        self.threshold.max((self.share * managed as f64) as usize)
    }
}

/// Prunes held in one member.
#[derive(Clone, Debug, PartialEq)]
pub struct Hold {
    /// What the operator writes into the registration Secret's `flotilla.io/release-prunes`.
    pub id: String,
    /// The prunes held now (a whole plan's, once the member has been planned whole).
    pub held: Vec<ObjectKey>,
    /// The limit it went over.
    pub allowed: usize,
}

/// What a check of one plan found, for the runtime to report.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Nothing held.
    Pass,
    /// A new hold: announce it.
    Held,
    /// Still held.
    Holding,
    /// The operator released it: its prunes go now.
    Released(String),
    /// A whole plan prunes no more than the limit again: the hold ends, the rest goes.
    Cleared(String),
}

#[derive(Debug, Default)]
struct MemberGuard {
    /// When prunes were done, and how many.
    recent: VecDeque<(Instant, usize)>,
    hold: Option<Hold>,
}

#[derive(Debug)]
pub struct PruneGuard {
    limits: Limits,
    members: BTreeMap<ClusterId, MemberGuard>,
    /// Holds made by this process, for ids that are never given twice.
    next: u64,
}

impl PruneGuard {
    pub fn new(limits: Limits) -> Self {
        PruneGuard { limits, members: BTreeMap::new(), next: 1 }
    }

    /// A held member is planned whole: its held set is then every prune it still wants.
    pub fn is_holding(&self, cluster: &str) -> bool {
        self.members.get(cluster).is_some_and(|m| m.hold.is_some())
    }

    pub fn hold(&self, cluster: &str) -> Option<&Hold> {
        self.members.get(cluster).and_then(|m| m.hold.as_ref())
    }

    /// Checks a plan about to be written into `cluster`, which holds `managed` objects of ours;
    /// `whole` when it is a plan of the whole member, `released` the hold ids the operator let go.
    /// Held prunes are taken out of the plan; everything else stays.
    pub fn check(
        &mut self,
        cluster: &str,
        plan: &mut ClusterPlan,
        managed: usize,
        whole: bool,
        released: &[String],
        now: Instant,
    ) -> Verdict {
        if self.limits.threshold == 0 {
            return Verdict::Pass;
        }
        let allowed = self.limits.allowed(managed);
        let window = self.limits.window;
        let m = self.members.entry(cluster.to_string()).or_default();
        m.recent.retain(|(at, _)| now.duration_since(*at) < window);
        let recent: usize = m.recent.iter().map(|(_, n)| n).sum();
        if let Some(hold) = &mut m.hold {
            if released.contains(&hold.id) {
                let id = hold.id.clone();
                m.hold = None;
                m.recent.clear();
                return Verdict::Released(id);
            }
            if whole && recent + plan.prune.len() <= allowed {
                let id = hold.id.clone();
                m.hold = None;
                return Verdict::Cleared(id);
            }
            let pruned = std::mem::take(&mut plan.prune);
            if whole {
                hold.held = pruned.into_iter().map(|o| o.key).collect();
            } else {
                hold.held.extend(pruned.into_iter().map(|o| o.key));
                hold.held.sort();
                hold.held.dedup();
            }
            return Verdict::Holding;
        }
        if plan.prune.is_empty() || recent + plan.prune.len() <= allowed {
            return Verdict::Pass;
        }
        let id = format!("{cluster}-{}", self.next);
        self.next += 1;
        let held = std::mem::take(&mut plan.prune).into_iter().map(|o| o.key).collect();
        m.hold = Some(Hold { id, held, allowed });
        Verdict::Held
    }

    /// Prunes a writer did in `cluster`.
    pub fn pruned(&mut self, cluster: &str, count: usize, now: Instant) {
        if count > 0 {
            self.members.entry(cluster.to_string()).or_default().recent.push_back((now, count));
        }
    }

    pub fn forget(&mut self, cluster: &str) {
        self.members.remove(cluster);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::compute::plan::ObservedObject;
    use crate::compute::{Desired, DesiredObject};
    use crate::istio::ServiceEntry;

    fn plan_pruning(n: usize) -> ClusterPlan {
        let prune = (0..n)
            .map(|i| {
                let mut se = ServiceEntry::default();
                se.metadata.name = Some(format!("h{i:04}-se"));
                se.metadata.namespace = Some("admiral-sync".into());
                let desired = Arc::new(Desired::from_object(DesiredObject::ServiceEntry(se)));
                ObservedObject::new(&desired.object())
            })
            .collect();
        ClusterPlan { prune, ..Default::default() }
    }

    fn new_guard() -> PruneGuard {
        PruneGuard::new(Limits { threshold: 10, share: 0.25, window: Duration::from_secs(600) })
    }

    #[test]
    fn a_mass_prune_is_held_and_the_rest_of_the_plan_goes() {
        let (mut guard, now) = (new_guard(), Instant::now());
        // 10 of 100: at the limit, not over it.
        assert_eq!(guard.check("a", &mut plan_pruning(10), 100, false, &[], now), Verdict::Pass);
        // 30 of 100 is over 10 and over a quarter of 100.
        let mut plan = plan_pruning(30);
        assert_eq!(guard.check("a", &mut plan, 100, false, &[], now), Verdict::Held);
        assert!(plan.prune.is_empty());
        let hold = guard.hold("a").unwrap().clone();
        assert_eq!((hold.id.as_str(), hold.held.len(), hold.allowed), ("a-1", 30, 25));
        // More arrive: held too, once each.
        assert_eq!(guard.check("a", &mut plan_pruning(35), 100, false, &[], now), Verdict::Holding);
        assert_eq!(guard.hold("a").unwrap().held.len(), 35);
        // A big member may lose more at once: 30 of 1000 is under a quarter.
        assert_eq!(guard.check("b", &mut plan_pruning(30), 1000, false, &[], now), Verdict::Pass);
    }

    #[test]
    fn small_prunes_that_add_up_within_the_window_trip_it_too() {
        let (mut guard, now) = (new_guard(), Instant::now());
        // A limit of 10 (20 objects): 4 and 4 go, the next 4 would make 12.
        for i in 0..2 {
            let at = now + Duration::from_secs(i);
            assert_eq!(guard.check("a", &mut plan_pruning(4), 20, false, &[], at), Verdict::Pass);
            guard.pruned("a", 4, at);
        }
        assert_eq!(guard.check("a", &mut plan_pruning(4), 20, false, &[], now + Duration::from_secs(2)), Verdict::Held);
        // Out of the window, the past no longer counts.
        let mut fresh = new_guard();
        fresh.pruned("a", 9, now);
        let later = now + Duration::from_secs(601);
        assert_eq!(fresh.check("a", &mut plan_pruning(4), 20, false, &[], later), Verdict::Pass);
    }

    #[test]
    fn a_hold_ends_by_its_id_or_when_the_cause_is_fixed_never_by_a_stale_id() {
        let (mut guard, now) = (new_guard(), Instant::now());
        guard.check("a", &mut plan_pruning(40), 100, false, &[], now);
        let mut plan = plan_pruning(40);
        assert_eq!(guard.check("a", &mut plan, 100, true, &["a-0".into()], now), Verdict::Holding, "another hold's id");
        let mut plan = plan_pruning(40);
        assert_eq!(guard.check("a", &mut plan, 100, true, &["a-1".into()], now), Verdict::Released("a-1".into()));
        assert_eq!(plan.prune.len(), 40, "released: they go");
        // A new hold has a new id: the old annotation does not release it.
        guard.check("a", &mut plan_pruning(40), 100, false, &[], now);
        assert_eq!(guard.check("a", &mut plan_pruning(40), 100, true, &["a-1".into()], now), Verdict::Holding);
        // The cause is fixed: a whole plan prunes 3.
        let mut plan = plan_pruning(3);
        assert_eq!(guard.check("a", &mut plan, 100, true, &[], now), Verdict::Cleared("a-2".into()));
        assert_eq!(plan.prune.len(), 3);
        // Off.
        let mut off = PruneGuard::new(Limits { threshold: 0, share: 0.0, window: Duration::ZERO });
        assert_eq!(off.check("a", &mut plan_pruning(1000), 1000, true, &[], now), Verdict::Pass);
    }
}
