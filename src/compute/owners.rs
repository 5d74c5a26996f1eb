//! Which identity owns each object key. Keys come from hosts and identity names, so two
//! identities give the same key only when their hosts collide; the first in byte order then owns
//! it everywhere, and the other's objects under it are not written.

use std::collections::hash_map::Entry;

use rustc_hash::FxHashMap;

use super::ObjectKey;

/// Which identities (by number) produce each object key; the first in byte order owns it in every
/// member, and the others' objects under it are not written (`DesiredState::shadowed`). Two
/// identities give the same key only when their hosts collide (env `a.b` of identity `c` and env
/// `a` of identity `b.c`), which `Engine::all_diagnostics` reports. Kept beside the desired
/// state, not in it, so that publishing the desired state does not copy it.
#[derive(Clone, Debug, Default)]
pub struct Owners(FxHashMap<ObjectKey, Holders>);

/// The identities that produce a key, in byte order of their names; nearly always one, kept
/// without allocating.
#[derive(Clone, Debug)]
struct Holders {
    first: u32,
    rest: Vec<u32>,
}

impl Owners {
    pub fn first(&self, key: &ObjectKey) -> Option<u32> {
        self.0.get(key).map(|h| h.first)
    }

    /// Records whether identity `number` produces `key`; says who owned it before and after.
    pub(super) fn set<'a>(
        &mut self,
        key: &ObjectKey,
        number: u32,
        produces: bool,
        name_of: impl Fn(u32) -> &'a str,
    ) -> Moved {
        let entry = match self.0.entry(key.clone()) {
            Entry::Vacant(vacant) => {
                if produces {
                    vacant.insert(Holders { first: number, rest: Vec::new() });
                }
                let after = produces.then_some(number);
                return Moved { before: None, after, shadowed_before: Vec::new(), shadowed_after: Vec::new() };
            }
            Entry::Occupied(occupied) => occupied,
        };
        let holders = entry.get();
        if holders.first == number && holders.rest.is_empty() {
            // The usual case: it is the key's only producer, and stays so or stops.
            let after = produces.then_some(number);
            if !produces {
                entry.remove();
            }
            return Moved { before: Some(number), after, shadowed_before: Vec::new(), shadowed_after: Vec::new() };
        }
        let (before, shadowed_before) = (holders.first, holders.rest.clone());
        let mut all: Vec<u32> = std::iter::once(holders.first).chain(holders.rest.iter().copied()).collect();
        match (all.contains(&number), produces) {
            (false, true) => {
                all.push(number);
                all.sort_by(|a, b| name_of(*a).cmp(name_of(*b)));
            }
            (true, false) => all.retain(|n| *n != number),
            _ => {}
        }
        if all.is_empty() {
            entry.remove();
            return Moved { before: Some(before), after: None, shadowed_before, shadowed_after: Vec::new() };
        }
        let holders = Holders { first: all[0], rest: all.split_off(1) };
        let moved = Moved {
            before: Some(before),
            after: Some(holders.first),
            shadowed_before,
            shadowed_after: holders.rest.clone(),
        };
        *entry.into_mut() = holders;
        moved
    }

    /// Keys that more than one identity produces, with those identities' numbers in order.
    pub fn shared(&self) -> impl Iterator<Item = (&ObjectKey, Vec<u32>)> {
        let shared = self.0.iter().filter(|(_, h)| !h.rest.is_empty());
        shared.map(|(k, h)| (k, std::iter::once(h.first).chain(h.rest.iter().copied()).collect()))
    }
}

/// Who owned a key before and after one identity's change, and whose objects under it are
/// shadowed (not written) before and after.
pub(super) struct Moved {
    pub before: Option<u32>,
    pub after: Option<u32>,
    pub shadowed_before: Vec<u32>,
    pub shadowed_after: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Kind;

    #[test]
    fn the_first_in_byte_order_owns_a_key_and_hands_it_on() {
        let names = ["c", "b.c", "a"];
        let name_of = |n: u32| names[n as usize];
        let key = ObjectKey::new(Kind::ServiceEntry, "admiral-sync", "a.b.c.global-se");
        let mut owners = Owners::default();
        let m = owners.set(&key, 0, true, name_of);
        assert_eq!((m.before, m.after, m.shadowed_after), (None, Some(0), vec![]));
        let m = owners.set(&key, 1, true, name_of);
        assert_eq!((m.before, m.after, m.shadowed_after), (Some(0), Some(1), vec![0]), "b.c sorts before c");
        assert_eq!(owners.shared().count(), 1);
        let m = owners.set(&key, 1, true, name_of);
        assert_eq!((m.before, m.after), (Some(1), Some(1)), "producing it again changes nothing");
        let m = owners.set(&key, 1, false, name_of);
        assert_eq!((m.before, m.after, m.shadowed_before, m.shadowed_after), (Some(1), Some(0), vec![0], vec![]));
        let m = owners.set(&key, 0, false, name_of);
        assert_eq!((m.before, m.after), (Some(0), None));
        assert_eq!(owners.first(&key), None, "nobody holds it");
    }
}
