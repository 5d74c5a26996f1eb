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

    /// Whether `prunes` at once in a member holding `managed` objects are held.
    pub fn holds(&self, prunes: usize, managed: usize) -> bool {
        self.threshold != 0 && prunes > self.allowed(managed)
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
    /// Prunes the operator released, until done or the window passes: they go without counting.
    granted: BTreeMap<ObjectKey, Instant>,
    /// The number of this member's last hold id: ids are `<member>-<n>`, n the wall-clock second
    /// the hold began (or one more than the last), so that an id left in an annotation never
    /// matches a later hold, even one made by another process or replica.
    last: u64,
}

#[derive(Debug)]
pub struct PruneGuard {
    limits: Limits,
    members: BTreeMap<ClusterId, MemberGuard>,
}

impl PruneGuard {
    pub fn new(limits: Limits) -> Self {
        PruneGuard { limits, members: BTreeMap::new() }
    }

    /// A held member is planned whole: its held set is then every prune it still wants.
    pub fn is_holding(&self, cluster: &str) -> bool {
        self.members.get(cluster).is_some_and(|m| m.hold.is_some())
    }

    pub fn hold(&self, cluster: &str) -> Option<&Hold> {
        self.members.get(cluster).and_then(|m| m.hold.as_ref())
    }

    /// Checks a plan about to be written into `cluster`, which holds `managed` objects of ours;
    /// `whole` when it is a plan of the whole member, `released` the hold ids the operator let go,
    /// `wall` the Unix time in seconds. Held prunes are taken out of the plan; everything else
    /// stays.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &mut self,
        cluster: &str,
        plan: &mut ClusterPlan,
        managed: usize,
        whole: bool,
        released: &[String],
        now: Instant,
        wall: u64,
    ) -> Verdict {
        if self.limits.threshold == 0 {
            return Verdict::Pass;
        }
        let allowed = self.limits.allowed(managed);
        let window = self.limits.window;
        let m = self.members.entry(cluster.to_string()).or_default();
        m.recent.retain(|(at, _)| now.duration_since(*at) < window);
        m.granted.retain(|_, at| now.duration_since(*at) < window);
        let recent: usize = m.recent.iter().map(|(_, n)| n).sum();
        // Released prunes go without counting; the others are judged.
        let counted = plan.prune.iter().filter(|o| !m.granted.contains_key(&o.key)).count();
        let granted = &m.granted;
        let take_counted = |plan: &mut ClusterPlan| -> Vec<ObjectKey> {
            let (keep, held): (Vec<_>, Vec<_>) =
                std::mem::take(&mut plan.prune).into_iter().partition(|o| granted.contains_key(&o.key));
            plan.prune = keep;
            held.into_iter().map(|o| o.key).collect()
        };
        if let Some(hold) = &mut m.hold {
            // Only a whole plan knows every prune the member wants: what was released is that.
            if whole && released.contains(&hold.id) {
                let id = hold.id.clone();
                for o in &plan.prune {
                    m.granted.insert(o.key.clone(), now);
                }
                m.hold = None;
                return Verdict::Released(id);
            }
            if whole && (counted == 0 || recent + counted <= allowed) {
                let id = hold.id.clone();
                m.hold = None;
                return Verdict::Cleared(id);
            }
            let held = take_counted(plan);
            if !whole {
                let mut all = std::mem::take(&mut hold.held);
                all.extend(held);
                all.sort();
                all.dedup();
                hold.held = all;
                return Verdict::Holding;
            }
            // More than the operator was told of: a new id, announced again, so that a release
            // lets go of no more than what was read.
            let grew = held.len() > hold.held.len();
            hold.held = held;
            if !grew {
                return Verdict::Holding;
            }
            m.last = wall.max(m.last + 1);
            hold.id = format!("{cluster}-{}", m.last);
            return Verdict::Held;
        }
        if counted == 0 || recent + counted <= allowed {
            return Verdict::Pass;
        }
        m.last = wall.max(m.last + 1);
        while released.contains(&format!("{cluster}-{}", m.last)) {
            m.last += 1;
        }
        let id = format!("{cluster}-{}", m.last);
        let held = take_counted(plan);
        m.hold = Some(Hold { id, held, allowed });
        Verdict::Held
    }

    /// Prunes a writer did in `cluster`: released ones are not counted again.
    pub fn pruned(&mut self, cluster: &str, keys: &[ObjectKey], now: Instant) {
        if self.limits.threshold == 0 || keys.is_empty() {
            return;
        }
        let m = self.members.entry(cluster.to_string()).or_default();
        let counted = keys.iter().filter(|k| m.granted.remove(*k).is_none()).count();
        if counted > 0 {
            m.recent.push_back((now, counted));
        }
    }

    /// Members holding prunes whose window moved since they were last checked: planned whole
    /// again, a hold that only the window made ends by itself.
    pub fn window_moved(&mut self, now: Instant) -> Vec<ClusterId> {
        let window = self.limits.window;
        let mut moved = Vec::new();
        for (id, m) in self.members.iter_mut().filter(|(_, m)| m.hold.is_some()) {
            let before = m.recent.len();
            m.recent.retain(|(at, _)| now.duration_since(*at) < window);
            if m.recent.len() < before {
                moved.push(id.clone());
            }
        }
        moved
    }

    pub fn forget(&mut self, cluster: &str) {
        self.members.remove(cluster);
    }

    /// A replica that no longer leads forgets its holds: the next leader judges afresh.
    pub fn forget_all(&mut self) {
        self.members.clear();
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
        plan_pruning_from(0, n)
    }

    /// A plan pruning `n` ServiceEntries, numbered from `first`.
    fn plan_pruning_from(first: usize, n: usize) -> ClusterPlan {
        let prune = (first..first + n)
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

    fn keys(n: usize) -> Vec<ObjectKey> {
        plan_pruning(n).prune.into_iter().map(|o| o.key).collect()
    }

    fn new_guard() -> PruneGuard {
        PruneGuard::new(Limits { threshold: 10, share: 0.25, window: Duration::from_secs(600) })
    }

    #[test]
    fn a_mass_prune_is_held_and_the_rest_of_the_plan_goes() {
        let (mut guard, now) = (new_guard(), Instant::now());
        // 10 of 100: at the limit, not over it.
        assert_eq!(guard.check("a", &mut plan_pruning(10), 100, false, &[], now, 1000), Verdict::Pass);
        // 30 of 100 is over 10 and over a quarter of 100.
        let mut plan = plan_pruning(30);
        assert_eq!(guard.check("a", &mut plan, 100, false, &[], now, 1000), Verdict::Held);
        assert!(plan.prune.is_empty());
        let hold = guard.hold("a").unwrap().clone();
        assert_eq!((hold.id.as_str(), hold.held.len(), hold.allowed), ("a-1000", 30, 25));
        // More arrive: held too, once each.
        assert_eq!(guard.check("a", &mut plan_pruning(35), 100, false, &[], now, 1000), Verdict::Holding);
        assert_eq!(guard.hold("a").unwrap().held.len(), 35);
        // A big member may lose more at once: 30 of 1000 is under a quarter.
        assert_eq!(guard.check("b", &mut plan_pruning(30), 1000, false, &[], now, 1000), Verdict::Pass);
    }

    #[test]
    fn small_prunes_that_add_up_within_the_window_trip_it_too() {
        let (mut guard, now) = (new_guard(), Instant::now());
        // A limit of 10 (20 objects): 4 and 4 go, the next 4 would make 12.
        for i in 0..2 {
            let at = now + Duration::from_secs(i);
            assert_eq!(guard.check("a", &mut plan_pruning(4), 20, false, &[], at, 1000), Verdict::Pass);
            guard.pruned("a", &keys(4), at);
        }
        assert_eq!(
            guard.check("a", &mut plan_pruning(4), 20, false, &[], now + Duration::from_secs(2), 1000),
            Verdict::Held
        );
        // Out of the window, the past no longer counts.
        let mut fresh = new_guard();
        fresh.pruned("a", &keys(9), now);
        let later = now + Duration::from_secs(601);
        assert_eq!(fresh.check("a", &mut plan_pruning(4), 20, false, &[], later, 1000), Verdict::Pass);
    }

    #[test]
    fn a_hold_ends_by_its_id_or_when_the_cause_is_fixed_never_by_a_stale_id() {
        let (mut guard, now) = (new_guard(), Instant::now());
        guard.check("a", &mut plan_pruning(40), 100, false, &[], now, 1000);
        let stale = ["a-999".to_string()];
        assert_eq!(guard.check("a", &mut plan_pruning(40), 100, true, &stale, now, 1000), Verdict::Holding);
        // Released: exactly what a whole plan wants goes, and is not counted again once done.
        let released = ["a-1000".to_string()];
        let mut plan = plan_pruning(40);
        assert_eq!(guard.check("a", &mut plan, 100, true, &released, now, 1000), Verdict::Released("a-1000".into()));
        assert_eq!(plan.prune.len(), 40, "released: they go");
        guard.pruned("a", &keys(40), now);
        assert_eq!(guard.check("a", &mut plan_pruning_from(100, 3), 100, false, &[], now, 1000), Verdict::Pass);
        // A new hold has a new id, even within the same second, and the annotation left on the
        // Secret does not release it.
        let mut plan = plan_pruning_from(200, 40);
        assert_eq!(guard.check("a", &mut plan, 100, false, &released, now, 1000), Verdict::Held);
        assert_eq!(guard.hold("a").unwrap().id, "a-1001");
        let mut plan = plan_pruning_from(200, 40);
        assert_eq!(guard.check("a", &mut plan, 100, true, &released, now, 1000), Verdict::Holding);
        // It grows past what was announced: a new id, announced again.
        let mut plan = plan_pruning_from(200, 60);
        assert_eq!(guard.check("a", &mut plan, 100, true, &[], now, 1000), Verdict::Held);
        assert_eq!(guard.hold("a").unwrap().id, "a-1002");
        // The cause is fixed: a whole plan prunes 3.
        let mut plan = plan_pruning_from(200, 3);
        assert_eq!(guard.check("a", &mut plan, 100, true, &[], now, 1000), Verdict::Cleared("a-1002".into()));
        assert_eq!(plan.prune.len(), 3);
        // Off: nothing held, nothing kept.
        let mut off = PruneGuard::new(Limits { threshold: 0, share: 0.0, window: Duration::ZERO });
        assert_eq!(off.check("a", &mut plan_pruning(1000), 1000, true, &[], now, 1000), Verdict::Pass);
        off.pruned("a", &keys(1000), now);
        assert!(off.members.is_empty());
    }

    #[test]
    fn a_hold_the_window_made_is_planned_again_when_the_window_moves() {
        let (mut guard, now) = (new_guard(), Instant::now());
        guard.pruned("a", &keys(9), now);
        assert_eq!(guard.check("a", &mut plan_pruning_from(50, 4), 20, false, &[], now, 1000), Verdict::Held);
        assert!(guard.window_moved(now + Duration::from_secs(1)).is_empty());
        let later = now + Duration::from_secs(601);
        assert_eq!(guard.window_moved(later), ["a".to_string()]);
        let mut plan = plan_pruning_from(50, 4);
        assert_eq!(guard.check("a", &mut plan, 20, true, &[], later, 1000), Verdict::Cleared("a-1000".into()));
    }
}
