//! A registered member as the runtime knows it, and the decisions about it that need no client:
//! what its next write job holds, whether it is converged, and how `/debug/clusters` shows it.
//! Time comes in as an argument.

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::dispatch::WriterSlot;
use super::health::{MemberHealth, State};
use super::registry::Registration;
use super::server::ClusterView;
use super::writer::WriteJob;
use crate::compute::plan::{ClusterPlan, Scope};
use crate::compute::{ClusterFacts, ObjectKey};
use crate::meta::Kind;

/// What a plan found that the last ones had not: worth a log line each.
#[derive(Debug, Default)]
pub struct Noticed {
    pub conflicts: Vec<ObjectKey>,
    pub admiral_leftovers: Vec<ObjectKey>,
    /// Objects taken over from Admiral that a running Admiral rewrote as its own.
    pub taken_back: Vec<ObjectKey>,
}

/// Updates `known` (kept sorted) with what a plan of `scope` `found`; returns what is new.
fn merge_found(known: &mut Vec<ObjectKey>, found: &[ObjectKey], scope: &Scope) -> Vec<ObjectKey> {
    let new = found.iter().filter(|k| !known.contains(k)).cloned().collect();
    match scope {
        Scope::Whole => *known = found.to_vec(),
        Scope::Keys(keys) => {
            known.retain(|k| !keys.contains(k));
            known.extend(found.iter().cloned());
            known.sort();
        }
    }
    new
}

pub struct Member {
    pub registration: Registration,
    pub health: MemberHealth,
    /// Watches stop when this is dropped; None when its client could not be built.
    _watches: Option<JoinSet<()>>,
    /// The sync namespace is known to exist there.
    pub namespace_ready: bool,
    /// Objects desired there whose names someone else's objects hold, as of the last plan.
    pub conflicts: Vec<ObjectKey>,
    /// Admiral's objects there under names flotilla does not write (with `--adopt-from=admiral`).
    pub admiral_leftovers: Vec<ObjectKey>,
    /// Objects flotilla took over from Admiral here: one that turns Admiral's again was rewritten
    /// by a running Admiral, and is not taken over again (the two would take turns forever).
    taken_over: std::collections::BTreeSet<ObjectKey>,
    /// Whether the last plan made for it was empty: with nothing dirty and nothing in flight,
    /// the member holds exactly what is desired.
    last_plan_empty: bool,
}

impl Member {
    pub fn new(registration: Registration, health: MemberHealth, watches: Option<JoinSet<()>>) -> Self {
        Member {
            registration,
            health,
            _watches: watches,
            namespace_ready: false,
            conflicts: Vec::new(),
            admiral_leftovers: Vec::new(),
            taken_over: Default::default(),
            last_plan_empty: false,
        }
    }

    /// Takes a plan of `scope` of the member: the write job that carries it out (with the sync
    /// namespace made first if it must be), and the conflicts and Admiral leftovers that are new
    /// since the last plan (logged once, not at every pass).
    pub fn plan(&mut self, mut plan: ClusterPlan, scope: &Scope, sync_namespace: &str) -> (WriteJob, Noticed) {
        // Taken over once already, and Admiral's again: a running Admiral rewrote it.
        let taken_back: Vec<ObjectKey> = plan.adopted().into_iter().filter(|k| self.taken_over.contains(k)).collect();
        if !taken_back.is_empty() {
            plan.apply.retain(|p| !(p.adopts && taken_back.contains(&p.key)));
            plan.conflicts.extend(taken_back.iter().cloned());
            plan.conflicts.sort();
        }
        let new_conflicts = merge_found(&mut self.conflicts, &plan.conflicts, scope);
        let (taken_back, conflicts) = new_conflicts.into_iter().partition(|k| taken_back.contains(k));
        let noticed = Noticed {
            conflicts,
            admiral_leftovers: merge_found(&mut self.admiral_leftovers, &plan.admiral_leftovers, scope),
            taken_back,
        };
        self.last_plan_empty = plan.is_empty();
        let mut job = WriteJob { plan, ..Default::default() };
        // Sidecars live in the workloads' namespaces; everything else in the sync namespace.
        let wants_sync_ns = job.plan.apply.iter().any(|o| o.key.kind != Kind::Sidecar);
        if wants_sync_ns && !self.namespace_ready {
            job.ensure_namespace = Some(sync_namespace.to_string());
        }
        (job, noticed)
    }

    /// Objects seen as flotilla's and still carrying Admiral's mark: taken over from Admiral, by
    /// this process or an earlier one.
    /// Its registration is gone: its watches stop (their client's credentials were withdrawn),
    /// and it is shown leaving with `message` until it is removed.
    pub fn leave(&mut self, message: String) {
        self._watches = None;
        self.health.leaving(message);
    }

    pub fn taken_over<'a>(&mut self, keys: impl IntoIterator<Item = &'a ObjectKey>) {
        self.taken_over.extend(keys.into_iter().cloned());
    }

    /// The error the policies' statuses name for this member, if any.
    pub fn status_error(&self) -> Option<String> {
        match self.health.state() {
            State::Failed(e) | State::Leaving(e) => Some(e.clone()),
            State::Stale => Some("member is stale: its API server cannot be watched".to_string()),
            _ => None,
        }
    }

    /// Synced, and holding exactly what is desired: its last plan was empty, nothing changed
    /// since, and its writer is idle and healthy.
    pub fn converged(&self, dirty: bool, writer: Option<&WriterSlot>, now: Instant) -> bool {
        *self.health.state() == State::Synced
            && self.last_plan_empty
            && !dirty
            && writer.is_some_and(|w| w.ready(now) && w.last_error().is_none())
    }

    /// Whether the fleet's convergence waits for this member: stale and failed members are not
    /// written to, so they are not waited for.
    pub fn waited_for(&self) -> bool {
        !matches!(self.health.state(), State::Stale | State::Failed(_) | State::Leaving(_))
    }

    /// How `/debug/clusters` shows the member.
    pub fn view(
        &self,
        facts: Option<&ClusterFacts>,
        desired_objects: usize,
        writer: Option<&WriterSlot>,
        converged: bool,
    ) -> ClusterView {
        let last_error = match self.health.state() {
            State::Failed(e) | State::Leaving(e) => Some(e.clone()),
            _ => self
                .health
                .watch_error()
                .map(str::to_string)
                .or_else(|| writer.and_then(|w| w.last_error().map(str::to_string))),
        };
        ClusterView {
            state: self.health.state().name().to_string(),
            secret: self.registration.secret.clone(),
            region: facts.and_then(|f| f.region.clone()),
            gateway: facts.and_then(|f| f.gateway_address.clone().map(|a| format!("{a}:{}", f.gateway_port))),
            last_error,
            desired_objects,
            conflicts: self.conflicts.iter().map(|k| k.to_string()).collect(),
            admiral_leftovers: self.admiral_leftovers.iter().map(|k| k.to_string()).collect(),
            disallowed_claims: 0,
            paused: self.registration.brakes.paused,
            drained: self.registration.overrides.drain,
            held_prunes: None,
            unlisted: self.health.unlisted().map(|k| k.to_string()).collect(),
            converged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::plan::{ObservedObject, plan_cluster};
    use crate::compute::{Desired, DesiredObject};
    use crate::istio::{ServiceEntry, Sidecar};
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    fn registration() -> Registration {
        Registration {
            secret: "flotilla/east".into(),
            kubeconfig: String::new(),
            overrides: Default::default(),
            brakes: Default::default(),
            token_expires: None,
        }
    }

    fn synced(now: Instant) -> Member {
        let mut health = MemberHealth::connecting(now, [Kind::Service], false);
        health.listed(Kind::Service);
        health.update(now, Duration::from_secs(60));
        assert_eq!(*health.state(), State::Synced);
        Member::new(registration(), health, None)
    }

    /// The whole plan of a member that holds `observed` and should hold `objects`.
    fn plan(objects: Vec<DesiredObject>, observed: &BTreeMap<ObjectKey, ObservedObject>) -> ClusterPlan {
        let mut desired: Vec<Arc<Desired>> = objects.into_iter().map(|o| Arc::new(Desired::from_object(o))).collect();
        desired.sort_by(|a, b| a.key.cmp(&b.key));
        plan_cluster(&desired, observed, crate::meta::DEFAULT_INSTANCE)
    }

    fn sidecar(ns: &str) -> DesiredObject {
        let mut s = Sidecar::default();
        s.metadata.name = Some("default".into());
        s.metadata.namespace = Some(ns.into());
        DesiredObject::Sidecar(s)
    }

    fn service_entry(name: &str) -> DesiredObject {
        let mut se = ServiceEntry::default();
        se.metadata.name = Some(name.into());
        se.metadata.namespace = Some("admiral-sync".into());
        DesiredObject::ServiceEntry(se)
    }

    #[test]
    fn an_object_admiral_takes_back_is_not_taken_over_again() {
        use crate::compute::plan::Owner;
        let now = Instant::now();
        let mut m = synced(now);
        let mut admirals = ServiceEntry::default();
        admirals.metadata.name = Some("a".into());
        admirals.metadata.namespace = Some("admiral-sync".into());
        let mark = (crate::meta::ANNOTATION_CREATED_BY.to_string(), crate::meta::ADMIRAL.to_string());
        admirals.metadata.annotations = Some([mark].into());
        let seen = ObservedObject::new(&DesiredObject::ServiceEntry(admirals));
        let key = seen.key.clone();
        let observed: BTreeMap<_, _> = [(key.clone(), seen)].into();
        let desired = vec![Arc::new(Desired::from_object(service_entry("a")))];
        let adopting = Owner { instance: crate::meta::DEFAULT_INSTANCE, adopt_admiral: true };
        let plan = || plan_cluster(&desired, &observed, adopting);

        let (job, noticed) = m.plan(plan(), &Scope::Whole, "admiral-sync");
        assert_eq!(job.plan.adopted(), std::slice::from_ref(&key), "taken over the first time");
        assert!(noticed.taken_back.is_empty() && noticed.conflicts.is_empty());
        m.taken_over([&key]);
        // Admiral, still running, rewrote it as its own: not taken over again, reported once.
        let (job, noticed) = m.plan(plan(), &Scope::Whole, "admiral-sync");
        assert!(job.plan.is_empty() && job.plan.adopted().is_empty(), "{:?}", job.plan);
        assert_eq!(noticed.taken_back, std::slice::from_ref(&key));
        assert!(noticed.conflicts.is_empty(), "named once, as taken back");
        assert_eq!(m.conflicts, std::slice::from_ref(&key));
        let (_, noticed) = m.plan(plan(), &Scope::Whole, "admiral-sync");
        assert!(noticed.taken_back.is_empty(), "not news again");
    }

    #[test]
    fn the_sync_namespace_is_made_only_for_objects_that_live_there() {
        let now = Instant::now();
        let mut m = synced(now);
        let observed = BTreeMap::new();
        let (job, _) = m.plan(plan(vec![sidecar("app")], &observed), &Scope::Whole, "admiral-sync");
        assert_eq!(job.ensure_namespace, None, "a Sidecar lives in its workload's namespace");
        let (job, _) = m.plan(plan(vec![service_entry("a")], &observed), &Scope::Whole, "admiral-sync");
        assert_eq!(job.ensure_namespace.as_deref(), Some("admiral-sync"));
        m.namespace_ready = true;
        let (job, _) = m.plan(plan(vec![service_entry("a")], &observed), &Scope::Whole, "admiral-sync");
        assert_eq!(job.ensure_namespace, None, "known to exist");
    }

    #[test]
    fn a_conflict_is_news_once_and_convergence_needs_an_empty_plan() {
        let now = Instant::now();
        let mut m = synced(now);
        let want = || vec![service_entry("a")];
        let mut theirs = ServiceEntry::default();
        theirs.metadata.name = Some("a".into());
        theirs.metadata.namespace = Some("admiral-sync".into());
        let mut taken = ObservedObject::new(&DesiredObject::ServiceEntry(theirs));
        taken.managed = false;
        let key = taken.key.clone();
        let observed: BTreeMap<_, _> = [(taken.key.clone(), taken)].into();
        let slot = WriterSlot::new(1);

        let (job, new) = m.plan(plan(want(), &observed), &Scope::Whole, "admiral-sync");
        assert!(job.plan.is_empty(), "someone else's object is left alone");
        assert_eq!(new.conflicts.len(), 1);
        let (_, new) = m.plan(plan(want(), &observed), &Scope::Whole, "admiral-sync");
        assert!(new.conflicts.is_empty(), "the same conflict is not news again");
        assert_eq!(m.conflicts.len(), 1);
        assert!(m.converged(false, Some(&slot), now), "nothing left to write");
        assert!(!m.converged(true, Some(&slot), now), "something changed since the plan");
        let other = Scope::Keys([ObjectKey::new(Kind::ServiceEntry, "admiral-sync", "b")].into());
        m.plan(ClusterPlan::default(), &other, "admiral-sync");
        assert_eq!(m.conflicts, std::slice::from_ref(&key), "a plan of other keys keeps the conflict");
        m.plan(ClusterPlan::default(), &Scope::Keys([key].into()), "admiral-sync");
        assert!(m.conflicts.is_empty(), "a plan of its key that finds none clears it");

        let (job, _) = m.plan(plan(want(), &BTreeMap::new()), &Scope::Whole, "admiral-sync");
        assert_eq!(job.plan.apply.len(), 1);
        assert!(!m.converged(false, Some(&slot), now), "a write is due");
        let mut busy = WriterSlot::new(1);
        busy.sent();
        m.plan(plan(want(), &observed), &Scope::Whole, "admiral-sync");
        assert!(!m.converged(false, Some(&busy), now), "a job in flight");
    }

    #[test]
    fn a_failed_member_is_not_waited_for_and_names_its_error() {
        let now = Instant::now();
        let m = Member::new(registration(), MemberHealth::failed(now, "no route".into(), false), None);
        assert!(!m.waited_for());
        assert_eq!(m.status_error().as_deref(), Some("no route"));
        let view = m.view(None, 0, None, false);
        assert_eq!((view.state.as_str(), view.last_error.as_deref()), ("failed", Some("no route")));
        let m = synced(now);
        assert!(m.waited_for());
        assert_eq!(m.status_error(), None);
    }
}
