//! The desired state of the whole fleet: every identity's objects, each object once with the
//! members it is desired in, and per member which identities place objects there.
//!
//! A member's objects are gathered when they are asked for (a whole plan, `render`, `/debug`),
//! never kept per member: at 1,000 members, maps of every member's objects were most of the
//! memory and most of the time of a full recompute, while an identity's objects are a handful
//! whatever the fleet's size.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::digest::Digest;
use super::output::KeyHead;
use super::owners::{Moved, Owners};
use super::{Desired, Diagnostic, Notice, ObjectKey, Placed, PolicyInForce, PolicyReport};
use crate::meta::Kind;
use crate::model::{ClusterId, ClusterIdx, ClusterNames};

/// What one identity contributes: objects with their members, diagnostics, policy reports.
#[derive(Clone, Debug, Default)]
pub struct IdentityOutput {
    /// Its objects, sorted by key (stable: in build order within a key). Objects with the same
    /// key (a ServiceEntry local to one member, and the one every other member gets) go to
    /// members that do not overlap.
    pub objects: Vec<Placed>,
    /// (member, index in `objects`) for every member an object goes to, sorted: what gathering
    /// one member's objects reads, one search per identity.
    pub(super) by_member: Vec<(ClusterIdx, u32)>,
    pub diagnostics: Vec<Diagnostic>,
    pub reports: Vec<PolicyReport>,
    /// The hosts it writes, in resolve order: what its clients list. A later change to the
    /// identity recomputes its clients only if these move.
    pub hosts: Vec<String>,
    /// Members where a federated workload of it serves, and the identities that depend on it:
    /// what `/debug/identities` and `explain` show besides the objects.
    pub sources: BTreeSet<String>,
    pub clients: Clients,
    /// Events to put on others' objects (a user's Sidecar that keeps clients from their hosts).
    pub notices: Vec<Notice>,
    /// The GlobalTrafficPolicy in force per env, by env.
    pub gtps: Vec<PolicyInForce>,
}

/// The identities that depend on one: those naming it, and the `*` clients (the same for every
/// identity in a pass, so shared).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clients {
    pub named: Vec<String>,
    pub wildcard: Arc<BTreeSet<String>>,
}

impl Clients {
    /// Every client, in order.
    pub fn all(&self) -> BTreeSet<String> {
        self.named.iter().chain(self.wildcard.iter()).cloned().collect()
    }
}

impl IdentityOutput {
    fn is_empty(&self) -> bool {
        self.objects.is_empty()
            && self.diagnostics.is_empty()
            && self.reports.is_empty()
            && self.notices.is_empty()
            && self.gtps.is_empty()
            && self.hosts.is_empty()
            && self.sources.is_empty()
            && self.clients.named.is_empty()
            && self.clients.wildcard.is_empty()
    }

    /// Its objects with this key, as a slice of `objects`.
    fn with_key(&self, key: &ObjectKey) -> &[Placed] {
        let start = self.objects.partition_point(|p| p.desired.key < *key);
        let len = self.objects[start..].partition_point(|p| p.desired.key == *key);
        &self.objects[start..start + len]
    }

    /// Its object in member `cluster` with this key, if it has one.
    fn object_in(&self, cluster: ClusterIdx, key: &ObjectKey) -> Option<&Arc<Desired>> {
        self.with_key(key).iter().find(|p| p.clusters.binary_search(&cluster).is_ok()).map(|p| &p.desired)
    }

    /// Its objects in member `cluster`.
    fn objects_in(&self, cluster: ClusterIdx) -> impl Iterator<Item = &Arc<Desired>> {
        let start = self.by_member.partition_point(|(c, _)| *c < cluster);
        self.by_member[start..]
            .iter()
            .take_while(move |(c, _)| *c == cluster)
            .map(|(_, i)| &self.objects[*i as usize].desired)
    }

    fn index_members(&mut self) {
        let pairs = self.objects.iter().enumerate().flat_map(|(i, p)| p.clusters.iter().map(move |c| (*c, i as u32)));
        self.by_member = pairs.collect();
        self.by_member.sort_unstable();
    }
}

/// The desired state of the whole fleet, by identity, with an index by member.
///
/// Cloning it is cheap (a reference per identity and per member), so `run` publishes a copy after
/// every pass for its HTTP handlers; a later pass copies a member's index only when it changes one
/// that a published copy still holds.
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    /// Identity → its number: where its output is in `slots`, and its bit in member sets.
    numbers: BTreeMap<Arc<str>, u32>,
    /// By number; a number is reused once its identity is gone.
    slots: Vec<Option<Slot>>,
    free_numbers: Vec<u32>,
    /// Per member number.
    members: Vec<Arc<MemberIndex>>,
    /// (identity number, key) of objects that are not written because another identity, first
    /// in byte order, produces the key too (see `Owners`). Nearly always empty.
    shadowed: Arc<BTreeSet<(u32, ObjectKey)>>,
    cluster_names: Arc<ClusterNames>,
}

#[derive(Clone, Debug)]
struct Slot {
    identity: Arc<str>,
    output: Arc<IdentityOutput>,
}

/// One member in the desired state: which identities place objects there, and how many objects
/// of each kind are desired there.
#[derive(Clone, Debug, Default)]
struct MemberIndex {
    /// Bit n is set when identity number n places an object here.
    identities: Vec<u64>,
    /// Per kind of `Kind::OUTPUTS`.
    counts: [usize; Kind::OUTPUTS.len()],
}

impl MemberIndex {
    fn set(&mut self, number: u32, on: bool) {
        let (word, bit) = ((number / 64) as usize, number % 64);
        if self.identities.len() <= word {
            if !on {
                return;
            }
            self.identities.resize(word + 1, 0);
        }
        if on {
            self.identities[word] |= 1 << bit;
        } else {
            self.identities[word] &= !(1 << bit);
        }
    }

    fn numbers(&self) -> impl Iterator<Item = u32> + '_ {
        self.identities.iter().enumerate().flat_map(|(word, bits)| {
            let mut bits = *bits;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                Some(word as u32 * 64 + bit)
            })
        })
    }
}

/// Where a kind's count is kept in `MemberIndex::counts`.
fn slot(kind: Kind) -> usize {
    Kind::OUTPUTS.iter().position(|k| *k == kind).expect("only output kinds are desired")
}

impl DesiredState {
    /// The objects desired in one member, sorted by key.
    pub fn cluster(&self, id: &str) -> Vec<Arc<Desired>> {
        let Some(idx) = self.cluster_names.number(id) else {
            return Vec::new();
        };
        let Some(member) = self.members.get(idx.index()) else {
            return Vec::new();
        };
        // Sorted by what each key starts with, copied out, so that sorting seldom reads the
        // objects themselves (scattered in memory: reading them is what sorting would wait on).
        let mut found: Vec<(KeyHead, &Arc<Desired>)> = Vec::new();
        for number in member.numbers() {
            let slot = self.slots[number as usize].as_ref().expect("a set bit names an identity");
            for desired in slot.output.objects_in(idx) {
                if !self.is_shadowed(number, &desired.key) {
                    found.push((desired.key.head(), desired));
                }
            }
        }
        found.sort_unstable_by(|(ha, a), (hb, b)| ha.cmp(hb).then_with(|| a.key.cmp(&b.key)));
        found.into_iter().map(|(_, d)| d.clone()).collect()
    }

    /// Whether identity `number`'s objects under `key` are not written, because another identity
    /// (first in byte order) produces the key too.
    fn is_shadowed(&self, number: u32, key: &ObjectKey) -> bool {
        !self.shadowed.is_empty() && self.shadowed.contains(&(number, key.clone()))
    }

    /// The id of member number `idx`.
    pub fn cluster_name(&self, idx: ClusterIdx) -> &str {
        self.cluster_names.name(idx)
    }

    /// How many objects are desired in one member, per kind of `Kind::OUTPUTS`.
    pub fn counts(&self, id: &str) -> [usize; Kind::OUTPUTS.len()] {
        let member = self.cluster_names.number(id).and_then(|idx| self.members.get(idx.index()));
        member.map_or([0; Kind::OUTPUTS.len()], |m| m.counts)
    }

    pub fn object_count(&self) -> usize {
        self.members.iter().flat_map(|m| m.counts).sum()
    }

    /// Every identity with an output, in order.
    pub fn identities(&self) -> impl Iterator<Item = (&str, &IdentityOutput)> {
        self.numbers.iter().map(|(id, n)| (&**id, &*self.slot(*n).output))
    }

    pub fn identity(&self, id: &str) -> Option<&IdentityOutput> {
        self.output(id).map(|o| &**o)
    }

    fn output(&self, id: &str) -> Option<&Arc<IdentityOutput>> {
        self.numbers.get(id).map(|n| &self.slot(*n).output)
    }

    fn slot(&self, number: u32) -> &Slot {
        self.slots[number as usize].as_ref().expect("a numbered identity has a slot")
    }

    pub fn diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.identities().flat_map(|(_, o)| o.diagnostics.iter())
    }

    pub fn reports(&self) -> impl Iterator<Item = &PolicyReport> {
        self.identities().flat_map(|(_, o)| o.reports.iter())
    }

    pub fn notices(&self) -> impl Iterator<Item = &Notice> {
        self.identities().flat_map(|(_, o)| o.notices.iter())
    }

    /// The object with this key desired in member `cluster`, if any.
    pub(super) fn object(&self, owners: &Owners, cluster: &str, key: &ObjectKey) -> Option<&Arc<Desired>> {
        let idx = self.cluster_names.number(cluster)?;
        self.slot(owners.first(key)?).output.object_in(idx, key)
    }

    /// The identity with this number.
    pub(super) fn identity_numbered(&self, number: u32) -> &str {
        &self.slot(number).identity
    }

    /// The output of `identity` now, to compare a new one with (`prepare`) while the desired
    /// state is being changed.
    pub(super) fn current(&self, identity: &str) -> Option<Arc<IdentityOutput>> {
        self.output(identity).cloned()
    }

    /// Readies `output` to replace `old`, noting whether any object changes. Needs nothing else,
    /// so identities are prepared on every core.
    pub(super) fn prepare(old: Option<&IdentityOutput>, mut output: IdentityOutput) -> Swap {
        output.index_members();
        let old = old.map_or(&[][..], |o| &o.objects[..]);
        let same = old.len() == output.objects.len()
            && old.iter().zip(&output.objects).all(|(o, n)| {
                o.desired.key == n.desired.key && o.desired.digest == n.desired.digest && o.clusters == n.clusters
            });
        Swap { output, same }
    }

    /// Starts swapping in prepared outputs (`Swapping::swap`, then `finish`).
    pub(super) fn begin_swap<'a>(
        &'a mut self,
        owners: &'a mut Owners,
        cluster_names: &Arc<ClusterNames>,
    ) -> Swapping<'a> {
        let was_empty = self.object_count() == 0;
        self.cluster_names = cluster_names.clone();
        if self.members.len() < cluster_names.len() {
            self.members.resize_with(cluster_names.len(), Default::default);
        }
        Swapping { desired: self, owners, was_empty, keys_changed: BTreeMap::new() }
    }

    /// Gives `identity` a number, with an empty output for now.
    fn insert(&mut self, identity: &str) -> u32 {
        let name: Arc<str> = identity.into();
        let slot = Some(Slot { identity: name.clone(), output: Arc::default() });
        let number = match self.free_numbers.pop() {
            Some(n) => {
                self.slots[n as usize] = slot;
                n
            }
            None => {
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 identities")
            }
        };
        self.numbers.insert(name, number);
        number
    }

    fn slot_mut(&mut self, number: u32) -> &mut Slot {
        self.slots[number as usize].as_mut().expect("a numbered identity has a slot")
    }

    fn remove(&mut self, identity: &str, number: u32) {
        self.numbers.remove(identity);
        self.slots[number as usize] = None;
        self.free_numbers.push(number);
    }

    /// Walks the keys identity `number` had and has (both sorted), moving them between owners,
    /// counting what each member now holds, and noting the (member, key) pairs whose object
    /// changed (unless everything is new).
    fn update_owners(
        &mut self,
        owners: &mut Owners,
        number: u32,
        old: &[Placed],
        new: &[Placed],
        keys_changed: &mut BTreeMap<ClusterIdx, Vec<ObjectKey>>,
        was_empty: bool,
    ) {
        let DesiredState { slots, members, shadowed, .. } = self;
        let name_of =
            |n: u32| -> &str { &slots[n as usize].as_ref().expect("a numbered identity has a slot").identity };
        let (mut old, mut new) = (old, new);
        while let Some(key) = match (old.first(), new.first()) {
            (None, None) => None,
            (Some(o), None) => Some(&o.desired.key),
            (None, Some(n)) => Some(&n.desired.key),
            (Some(o), Some(n)) => Some(std::cmp::min(&o.desired.key, &n.desired.key)),
        } {
            let (had, has) = (take_key(&mut old, key), take_key(&mut new, key));
            let Moved { before, after, shadowed_before, shadowed_after } =
                owners.set(key, number, !has.is_empty(), name_of);
            if !shadowed_before.is_empty() || !shadowed_after.is_empty() {
                let shadowed = Arc::make_mut(shadowed);
                for n in shadowed_before {
                    shadowed.remove(&(n, key.clone()));
                }
                shadowed.extend(shadowed_after.into_iter().map(|n| (n, key.clone())));
            }
            if before != Some(number) && after != Some(number) {
                continue; // another identity's object stands there, before and after
            }
            // What stands under the key before and after: this identity's objects, or those of
            // the identity that owned it before or owns it now.
            let (before, after) = (standing(slots, number, before, had, key), standing(slots, number, after, has, key));
            let kind = slot(key.kind);
            for (placed, delta) in [(before, -1isize), (after, 1)] {
                for c in placed.iter().flat_map(|p| &p.clusters) {
                    let count = &mut Arc::make_mut(&mut members[c.index()]).counts[kind];
                    *count = count.checked_add_signed(delta).expect("counts match what was placed");
                }
            }
            if !was_empty {
                for c in differing(&at_members(before), &at_members(after)) {
                    keys_changed.entry(c).or_default().push(key.clone());
                }
            }
        }
    }
}

/// What stands under `key` when `owner` owns it: identity `number`'s objects `mine`, or those of
/// the identity that owns it.
fn standing<'a>(
    slots: &'a [Option<Slot>],
    number: u32,
    owner: Option<u32>,
    mine: &'a [Placed],
    key: &ObjectKey,
) -> &'a [Placed] {
    match owner {
        None => &[],
        Some(o) if o == number => mine,
        Some(o) => slots[o as usize].as_ref().map_or(&[], |s| s.output.with_key(key)),
    }
}

/// (member, digest) for every member the objects go to, sorted by member.
fn at_members(placed: &[Placed]) -> Vec<(ClusterIdx, Digest)> {
    let mut at: Vec<(ClusterIdx, Digest)> =
        placed.iter().flat_map(|p| p.clusters.iter().map(|c| (*c, p.desired.digest))).collect();
    at.sort_unstable_by_key(|(c, _)| *c);
    at
}

/// Splits the objects with `key` off the front of `list` (sorted by key).
fn take_key<'a>(list: &mut &'a [Placed], key: &ObjectKey) -> &'a [Placed] {
    let len = list.partition_point(|p| p.desired.key == *key);
    let (mine, rest) = list.split_at(len);
    *list = rest;
    mine
}

/// The members where two (member, digest) lists, each sorted by member, differ.
fn differing(a: &[(ClusterIdx, Digest)], b: &[(ClusterIdx, Digest)]) -> Vec<ClusterIdx> {
    let mut out = Vec::new();
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some((c, _)), None) => {
                out.push(*c);
                a.next();
            }
            (None, Some((c, _))) => {
                out.push(*c);
                b.next();
            }
            (Some((ca, da)), Some((cb, db))) => {
                if ca < cb {
                    out.push(*ca);
                    a.next();
                } else if cb < ca {
                    out.push(*cb);
                    b.next();
                } else {
                    if da != db {
                        out.push(*ca);
                    }
                    a.next();
                    b.next();
                }
            }
        }
    }
}

/// One identity's new output, and whether its objects are the ones it had.
pub(super) struct Swap {
    output: IdentityOutput,
    same: bool,
}

/// Prepared outputs being swapped into the desired state, one identity at a time, keeping the
/// owners of object keys and the member index up to date.
pub(super) struct Swapping<'a> {
    desired: &'a mut DesiredState,
    owners: &'a mut Owners,
    /// Nothing was desired before (start-up): every member that gets objects changed whole.
    was_empty: bool,
    /// The keys whose object changed, per member (unless `was_empty`).
    keys_changed: BTreeMap<ClusterIdx, Vec<ObjectKey>>,
}

impl Swapping<'_> {
    /// Swaps in `identity`'s prepared output.
    pub(super) fn swap(&mut self, identity: &str, Swap { output, same }: Swap) {
        let desired = &mut *self.desired;
        let number = match desired.numbers.get(identity) {
            Some(number) => *number,
            None if output.is_empty() => return, // nothing before, nothing now
            None => desired.insert(identity),
        };
        let new = Arc::new(output);
        let old = std::mem::replace(&mut desired.slot_mut(number).output, new.clone());
        if !same {
            desired.update_owners(
                self.owners,
                number,
                &old.objects,
                &new.objects,
                &mut self.keys_changed,
                self.was_empty,
            );
            // The member sets: clear what the old output placed, set what the new one places.
            for (objects, on) in [(&old.objects, false), (&new.objects, true)] {
                for c in objects.iter().flat_map(|p| &p.clusters) {
                    Arc::make_mut(&mut desired.members[c.index()]).set(number, on);
                }
            }
        }
        if new.is_empty() {
            desired.remove(identity, number);
        }
    }

    /// Records what changed in each member: the keys whose object there was added, modified or
    /// removed, or `Whole` when nothing at all was desired before.
    pub(super) fn finish(self, changed: &mut Changed) {
        let names = &self.desired.cluster_names;
        if self.was_empty {
            for (idx, member) in self.desired.members.iter().enumerate() {
                if member.counts.iter().any(|n| *n > 0) {
                    changed.insert(names.name(ClusterIdx(idx as u32)).to_string(), MemberChange::Whole);
                }
            }
            return;
        }
        for (idx, keys) in self.keys_changed {
            match changed.entry(names.name(idx).to_string()).or_insert_with(|| MemberChange::Keys(Vec::new())) {
                MemberChange::Whole => {}
                MemberChange::Keys(have) => have.extend(keys),
            }
        }
    }
}

/// What a recompute changed in one member's desired objects.
#[derive(Clone, Debug, PartialEq)]
pub enum MemberChange {
    /// Nothing was desired anywhere before: everything is new (start-up).
    Whole,
    /// The keys whose object there was added, modified or removed, in the order met.
    Keys(Vec<ObjectKey>),
}

/// What changed, per member.
pub type Changed = BTreeMap<ClusterId, MemberChange>;
