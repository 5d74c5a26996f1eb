//! Which members must be planned again, and how much of each: the keys whose desired or held
//! object changed since the member's last plan, or the whole member (a relist, a member back in
//! sync, leadership gained, a write that failed). A plan of a few keys costs a few lookups,
//! however many objects the member holds.

use std::collections::BTreeMap;

use crate::compute::ObjectKey;
use crate::compute::plan::Scope;
use crate::model::ClusterId;

#[derive(Debug, Default)]
pub struct Pending(BTreeMap<ClusterId, Scope>);

impl Pending {
    pub fn whole(&mut self, cluster: &str) {
        self.add(cluster, Scope::Whole);
    }

    pub fn key(&mut self, cluster: &str, key: ObjectKey) {
        self.add(cluster, Scope::Keys([key].into()));
    }

    pub fn add(&mut self, cluster: &str, scope: Scope) {
        match self.0.get_mut(cluster) {
            Some(have) => have.add(scope),
            None => {
                self.0.insert(cluster.to_string(), scope);
            }
        }
    }

    /// What must be planned of `cluster`, which is then no longer pending.
    pub fn take(&mut self, cluster: &str) -> Option<Scope> {
        self.0.remove(cluster)
    }

    pub fn contains(&self, cluster: &str) -> bool {
        self.0.contains_key(cluster)
    }

    pub fn clusters(&self) -> impl Iterator<Item = &ClusterId> {
        self.0.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Kind;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(Kind::ServiceEntry, "admiral-sync", name)
    }

    #[test]
    fn keys_gather_until_taken_and_whole_covers_them() {
        let mut p = Pending::default();
        p.key("a", key("x"));
        p.key("a", key("y"));
        p.key("b", key("x"));
        assert_eq!(p.take("a"), Some(Scope::Keys([key("x"), key("y")].into())));
        assert!(!p.contains("a"), "taken");
        p.whole("b");
        p.key("b", key("z"));
        assert_eq!(p.take("b"), Some(Scope::Whole), "a whole plan covers every key");
        assert_eq!(p.take("c"), None);
    }
}
