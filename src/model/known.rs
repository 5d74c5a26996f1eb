//! What the fleet knows of each identity, in one entry per identity: where its workloads are,
//! the policies that name it, its Dependencies, and which identities its Dependencies name or
//! are named by. Kept in one place, they cannot drift apart as seven maps by name had to be
//! kept in step; an entry goes when its last set empties.

use std::collections::{BTreeMap, BTreeSet};

use super::{ClusterIdx, ObjectRef, WorkloadKey};

#[derive(Clone, Debug, Default)]
pub struct Known {
    /// Where its workloads are.
    pub workloads: BTreeSet<(ClusterIdx, WorkloadKey)>,
    /// The GlobalTrafficPolicies, OutlierDetections and ClientConnectionConfigs that name it.
    pub gtps: BTreeSet<ObjectRef>,
    pub outlier_detections: BTreeSet<ObjectRef>,
    pub connection_configs: BTreeSet<ObjectRef>,
    /// Its own Dependencies (it is their source).
    pub dependencies: BTreeSet<ObjectRef>,
    /// The destinations its valid Dependencies name explicitly (not through `*`).
    pub destinations: BTreeSet<String>,
    /// The sources whose valid Dependencies name it explicitly.
    pub named_by: BTreeSet<String>,
}

/// Picks one of an entry's sets, to change through `KnownIdentities` (which drops entries left
/// empty): `|k| &mut k.gtps`.
pub type Field<T> = fn(&mut Known) -> &mut BTreeSet<T>;

impl Known {
    /// Whether there is anything to compute for it: workloads, a policy that names it, or
    /// Dependencies of its own. Being named by another identity's Dependency is not enough.
    pub fn is_identity(&self) -> bool {
        !(self.workloads.is_empty()
            && self.gtps.is_empty()
            && self.outlier_detections.is_empty()
            && self.connection_configs.is_empty()
            && self.dependencies.is_empty())
    }

    fn is_empty(&self) -> bool {
        !self.is_identity() && self.destinations.is_empty() && self.named_by.is_empty()
    }
}

/// Every identity the fleet knows anything of, by name; an entry goes when its last set empties.
#[derive(Clone, Debug, Default)]
pub struct KnownIdentities(BTreeMap<String, Known>);

impl KnownIdentities {
    pub fn get(&self, identity: &str) -> Option<&Known> {
        self.0.get(identity)
    }

    /// In name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Known)> {
        self.0.iter().map(|(name, known)| (name.as_str(), known))
    }

    /// Adds `value` to one of `identity`'s sets; returns whether that set was empty before.
    pub fn insert<T: Ord>(&mut self, identity: &str, field: Field<T>, value: T) -> bool {
        let known = match self.0.get_mut(identity) {
            Some(known) => known,
            None => self.0.entry(identity.to_string()).or_default(),
        };
        let values = field(known);
        let was_empty = values.is_empty();
        values.insert(value);
        was_empty
    }

    /// Removes `value` from one of `identity`'s sets; returns whether that emptied the set.
    pub fn remove<T: Ord>(&mut self, identity: &str, field: Field<T>, value: &T) -> bool {
        let Some(known) = self.0.get_mut(identity) else {
            return false;
        };
        let values = field(known);
        let emptied = values.remove(value) && values.is_empty();
        if known.is_empty() {
            self.0.remove(identity);
        }
        emptied
    }

    /// Replaces one of `identity`'s sets whole; returns what it held.
    pub fn replace<T: Ord>(&mut self, identity: &str, field: Field<T>, values: BTreeSet<T>) -> BTreeSet<T> {
        if values.is_empty() && !self.0.contains_key(identity) {
            return BTreeSet::new();
        }
        let known = self.0.entry(identity.to_string()).or_default();
        let before = std::mem::replace(field(known), values);
        if known.is_empty() {
            self.0.remove(identity);
        }
        before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(name: &str) -> ObjectRef {
        ObjectRef { cluster: "c".into(), namespace: "ns".into(), name: name.into() }
    }

    #[test]
    fn an_entry_lives_while_any_of_its_sets_holds_something() {
        let mut known = KnownIdentities::default();
        assert!(known.insert("a", |k| &mut k.gtps, at("g1")));
        assert!(!known.insert("a", |k| &mut k.gtps, at("g2")));
        assert!(known.insert("a", |k| &mut k.named_by, "b".to_string()));
        assert!(!known.remove("a", |k| &mut k.gtps, &at("g1")));
        assert!(known.remove("a", |k| &mut k.gtps, &at("g2")));
        // Named by b only: known, but nothing to compute.
        assert!(known.get("a").is_some_and(|k| !k.is_identity()));
        assert!(known.remove("a", |k| &mut k.named_by, &"b".to_string()));
        assert!(known.get("a").is_none());
        assert!(!known.remove("a", |k| &mut k.named_by, &"b".to_string()));

        let before = known.replace("s", |k| &mut k.destinations, BTreeSet::from(["d".to_string()]));
        assert!(before.is_empty());
        let before = known.replace("s", |k| &mut k.destinations, BTreeSet::new());
        assert_eq!(before, BTreeSet::from(["d".to_string()]));
        assert_eq!(known.iter().count(), 0);
    }
}
