//! Planning: the difference between what a cluster should hold and what it holds.
//!
//! Only this installation's objects (flotilla's managed-by label, and its `--instance` or none)
//! are ever updated or pruned; an object of someone else's (another installation's included)
//! with the name flotilla wants is a conflict, reported and left alone. The one exception is
//! asked for: with `--adopt-from=admiral`, an object Admiral created under a name flotilla writes
//! is taken over in place (one apply over the version seen, never a delete); Admiral's objects
//! flotilla does not write are listed, never touched.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::digest::Digest;
use super::{Desired, DesiredObject, ObjectKey};
use crate::model::ClusterHealth;

/// What the planner needs of an object of a kind flotilla writes, as found in a cluster: its key,
/// whether it is ours, and the digest of our typed form of it (so fields set by other field
/// managers are invisible to the comparison). The object itself is not kept: a member's
/// observed state costs a few dozen bytes per object.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedObject {
    pub key: ObjectKey,
    /// Carries `app.kubernetes.io/managed-by: flotilla`.
    pub managed: bool,
    /// Its `flotilla.io/instance` label: which installation wrote it (None: from before instances).
    pub instance: Option<String>,
    /// Carries Admiral's `app.kubernetes.io/created-by: admiral` (kept on the objects flotilla
    /// took over, so that Admiral, started again, finds them as its own).
    pub admiral: bool,
    /// Admiral's and nobody else's (`meta::is_admirals_alone`): what adoption may take over.
    pub admirals_alone: bool,
    pub digest: Digest,
    /// The version seen: a write of ours is conditional on it, so an object that changed hands
    /// meanwhile is never written over.
    pub resource_version: Option<String>,
}

impl ObservedObject {
    pub fn new(object: &DesiredObject) -> Self {
        ObservedObject {
            key: object.key(),
            managed: crate::meta::is_managed(object.meta()),
            instance: crate::meta::label(object.meta(), crate::meta::LABEL_INSTANCE).cloned(),
            admiral: crate::meta::is_admirals(object.meta()),
            admirals_alone: crate::meta::is_admirals_alone(object.meta()),
            digest: Digest::of(object),
            resource_version: object.meta().resource_version.clone(),
        }
    }

    /// Whether this installation (`instance`) may update or prune it (`meta::is_ours`).
    pub fn ours(&self, instance: &str) -> bool {
        self.managed && self.instance.as_deref().is_none_or(|i| i == instance)
    }
}

/// Whose objects a plan may write over: this installation's, and, when asked, Admiral's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner<'a> {
    pub instance: &'a str,
    /// `--adopt-from=admiral`: take over Admiral's objects under the names flotilla writes.
    pub adopt_admiral: bool,
}

impl<'a> From<&'a str> for Owner<'a> {
    /// This installation alone, adopting nothing.
    fn from(instance: &'a str) -> Self {
        Owner { instance, adopt_admiral: false }
    }
}

/// One object to write, and the version of our object it replaces: None when there is none, and
/// it must be created (if someone else's appears meanwhile, it is left alone).
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub desired: Arc<Desired>,
    pub replaces: Option<String>,
    /// `replaces` is Admiral's object, taken over by this write.
    pub adopts: bool,
    /// The object carries Admiral's annotation (taken over now or before): a replace keeps it.
    pub admirals_mark: bool,
}

impl std::ops::Deref for Planned {
    type Target = Desired;
    fn deref(&self) -> &Desired {
        &self.desired
    }
}

/// What to do in one cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterPlan {
    /// Missing or different: create these, or server-side apply them over the version seen.
    pub apply: Vec<Planned>,
    /// Managed by flotilla and no longer desired: delete these (the version seen).
    pub prune: Vec<ObservedObject>,
    /// Wanted, but an object not managed by flotilla has the name: left alone, reported.
    pub conflicts: Vec<ObjectKey>,
    /// Admiral's objects under names flotilla does not write: listed for the operator, never
    /// touched.
    pub admiral_leftovers: Vec<ObjectKey>,
}

impl ClusterPlan {
    pub fn is_empty(&self) -> bool {
        self.apply.is_empty() && self.prune.is_empty()
    }

    /// The objects of `apply` that Admiral created and this plan takes over.
    pub fn adopted(&self) -> Vec<ObjectKey> {
        self.apply.iter().filter(|p| p.adopts).map(|p| p.key.clone()).collect()
    }
}

/// A plan as a dry run shows it: the objects per action, by `Kind namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanSummary {
    pub create: Vec<String>,
    pub update: Vec<String>,
    /// Admiral's objects, taken over in place by an apply.
    pub adopt: Vec<String>,
    pub prune: Vec<String>,
    pub conflicts: Vec<String>,
    pub admiral_leftovers: Vec<String>,
}

impl PlanSummary {
    pub fn of(plan: &ClusterPlan) -> Self {
        let names = |keys: &mut dyn Iterator<Item = &ObjectKey>| keys.map(ToString::to_string).collect();
        let applied = |pick: fn(&Planned) -> bool| {
            let mut keys = plan.apply.iter().filter(move |p| pick(p)).map(|p| &p.key);
            names(&mut keys)
        };
        PlanSummary {
            create: applied(|p| p.replaces.is_none()),
            update: applied(|p| p.replaces.is_some() && !p.adopts),
            adopt: applied(|p| p.adopts),
            prune: names(&mut plan.prune.iter().map(|o| &o.key)),
            conflicts: names(&mut plan.conflicts.iter()),
            admiral_leftovers: names(&mut plan.admiral_leftovers.iter()),
        }
    }

    /// (action, count) for every action, in a fixed order (the metric's label values).
    pub fn counts(&self) -> [(&'static str, usize); 6] {
        [
            ("create", self.create.len()),
            ("update", self.update.len()),
            ("adopt", self.adopt.len()),
            ("prune", self.prune.len()),
            ("conflict", self.conflicts.len()),
            ("admiral_leftover", self.admiral_leftovers.len()),
        ]
    }
}

/// Plans a whole cluster: one merge of the desired objects (sorted by key, as
/// `DesiredState::cluster` gives them) with the observed ones, no lookups.
/// Only `owner`'s objects are updated or pruned; another installation's are conflicts.
pub fn plan_cluster<'a>(
    desired: &[Arc<Desired>],
    observed: &BTreeMap<ObjectKey, ObservedObject>,
    owner: impl Into<Owner<'a>>,
) -> ClusterPlan {
    let owner = owner.into();
    let mut plan = ClusterPlan::default();
    let mut want = desired.iter().map(|d| (&d.key, d)).peekable();
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
                decide(&mut plan, key, Some(w), None, owner);
            }
            Ordering::Greater => {
                let (key, h) = have.next().expect("peeked");
                decide(&mut plan, key, None, Some(h), owner);
            }
            Ordering::Equal => {
                let (key, w) = want.next().expect("peeked");
                let (_, h) = have.next().expect("peeked");
                decide(&mut plan, key, Some(w), Some(h), owner);
            }
        }
    }
    plan
}

/// Plans only `keys` in a cluster: what changed since its last plan. `desired` gives the object
/// desired under a key, if any.
pub fn plan_keys<'a>(
    keys: impl IntoIterator<Item = &'a ObjectKey>,
    desired: impl Fn(&ObjectKey) -> Option<&'a Arc<Desired>>,
    observed: &BTreeMap<ObjectKey, ObservedObject>,
    owner: Owner<'_>,
) -> ClusterPlan {
    let mut plan = ClusterPlan::default();
    for key in keys {
        decide(&mut plan, key, desired(key), observed.get(key), owner);
    }
    plan
}

/// Whether a member in `health` gets a plan: one still connecting holds objects not yet seen,
/// and a stale one cannot be watched (fail static: nothing is written to it or pruned from it);
/// either is planned whole once it is synced.
pub fn is_plannable(health: ClusterHealth) -> bool {
    match health {
        ClusterHealth::Connecting | ClusterHealth::Stale => false,
        ClusterHealth::Synced => true,
    }
}

/// How much of a member a plan looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything desired and everything held: at start-up, after a relist, when the member is
    /// back in sync or leadership is gained.
    Whole,
    /// Only these keys: what changed (desired or held) since the member's last plan.
    Keys(BTreeSet<ObjectKey>),
}

impl Scope {
    /// Widens this scope by `other`.
    pub fn add(&mut self, other: Scope) {
        match (&mut *self, other) {
            (Scope::Whole, _) => {}
            (_, Scope::Whole) => *self = Scope::Whole,
            (Scope::Keys(mine), Scope::Keys(theirs)) => mine.extend(theirs),
        }
    }
}

/// What one key needs: apply when missing or different, prune when ours and unwanted, a
/// conflict when someone else's object holds the name, unless it is Admiral's and `owner`
/// adopts Admiral's: then one apply over the version seen takes it over.
fn decide(
    plan: &mut ClusterPlan,
    key: &ObjectKey,
    want: Option<&Arc<Desired>>,
    have: Option<&ObservedObject>,
    owner: Owner<'_>,
) {
    let instance = owner.instance;
    match (want, have) {
        (Some(want), None) => {
            plan.apply.push(Planned { desired: want.clone(), replaces: None, adopts: false, admirals_mark: false })
        }
        (Some(want), Some(have)) if owner.adopt_admiral && have.admirals_alone => {
            let replaces = have.resource_version.clone();
            plan.apply.push(Planned { desired: want.clone(), replaces, adopts: true, admirals_mark: true });
        }
        (Some(_), Some(have)) if !have.ours(instance) => plan.conflicts.push(key.clone()),
        (Some(want), Some(have)) => {
            if !up_to_date(want, have) {
                let replaces = have.resource_version.clone();
                plan.apply.push(Planned {
                    desired: want.clone(),
                    replaces,
                    adopts: false,
                    admirals_mark: have.admiral,
                });
            }
        }
        (None, Some(have)) if have.ours(instance) => plan.prune.push(have.clone()),
        // Admiral's VirtualServices flotilla does not write are not listed: besides its aliases,
        // they are its copies of users' VirtualServices, which users' routing relies on.
        (None, Some(have))
            if owner.adopt_admiral && have.admirals_alone && key.kind != crate::meta::Kind::VirtualService =>
        {
            plan.admiral_leftovers.push(key.clone())
        }
        (None, _) => {}
    }
}

/// Same spec and the same values of the labels we set: the digests cover exactly those.
fn up_to_date(want: &Desired, have: &ObservedObject) -> bool {
    want.digest == have.digest
}
