//! The VIP store's bookkeeping: what the hub's ConfigMaps hold, which addresses this replica
//! allocated that it does not hold yet, and whether a write of them is under way. Member writes
//! wait until every address they carry is in the store, so that no host is ever written with an
//! address that a restart could change.
//!
//! An address outlives its host by a grace period: a stored host that no object carries is
//! marked unused (with the time), and released once unused for `--vip-release-after`; carried
//! again before that, it loses the mark and keeps its address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::compute::vip::{Edit, VipTable};

#[derive(Debug, Default)]
pub struct VipStore {
    /// None until the store has been listed once.
    store: Option<BTreeMap<String, Ipv4Addr>>,
    /// Stored hosts marked unused, and since when.
    unused: BTreeMap<String, Timestamp>,
    /// Marks, unmarks and releases to write; and those a write under way carries.
    edits: BTreeMap<String, Edit>,
    sending: BTreeMap<String, Edit>,
    unpersisted: BTreeMap<String, Ipv4Addr>,
    /// Hosts whose entry in the store is not an address, with the address this replica holds
    /// for them: written back with the next job, but no member write waits for them (members
    /// already carry those addresses).
    repairs: BTreeMap<String, Ipv4Addr>,
    persisting: bool,
}

/// What adopting the store's contents means for the engine's table.
#[derive(Debug, PartialEq)]
pub enum Adoption {
    /// The table agrees (it has been extended with the store's allocations).
    Agrees,
    /// Another replica persisted different addresses: the store wins, the table is replaced,
    /// and everything is recomputed.
    Replace(VipTable),
}

impl VipStore {
    pub fn loaded(&self) -> bool {
        self.store.is_some()
    }

    /// The store's contents, as a watch or a write returned them. A host that left the store was
    /// released (its address is freed here too), unless an object still carries it: then it is
    /// written back with the address it has, as a repair that holds back no member (a hand edit,
    /// or an entry that is no longer an address; addresses of live hosts never move).
    pub fn adopt(
        &mut self,
        store: BTreeMap<String, Ipv4Addr>,
        table: &mut VipTable,
        live: &BTreeSet<&str>,
    ) -> Adoption {
        for (host, ip) in self.store.iter().flatten().filter(|(h, _)| !store.contains_key(*h)) {
            if live.contains(host.as_str()) {
                self.repairs.insert(host.clone(), *ip);
            } else {
                table.release(host);
                self.unused.remove(host);
            }
        }
        let agrees = store.iter().all(|(host, ip)| table.adopt(host, *ip));
        self.unpersisted.retain(|host, _| !store.contains_key(host));
        let adoption =
            if agrees { Adoption::Agrees } else { Adoption::Replace(VipTable::from_existing(store.clone())) };
        self.store = Some(store);
        adoption
    }

    /// Addresses a recompute allocated.
    pub fn allocated(&mut self, new: BTreeMap<String, Ipv4Addr>) {
        let store = self.store.as_ref();
        self.unpersisted.extend(new.into_iter().filter(|(h, _)| store.is_none_or(|s| !s.contains_key(h))));
    }

    /// On becoming the leader: what this replica computed while following may not be stored.
    pub fn became_leader(&mut self, table: &VipTable) {
        let store = self.store.clone().unwrap_or_default();
        self.unpersisted =
            table.all().iter().filter(|(h, _)| !store.contains_key(*h)).map(|(h, ip)| (h.clone(), *ip)).collect();
    }

    /// Entries of the store that are not addresses: those of hosts this replica knows are
    /// written back with their address (which never moves); the others wait for their host's
    /// next allocation, which overwrites them. Returns the hosts to be repaired now.
    pub fn unreadable(&mut self, hosts: &[String], table: &VipTable) -> Vec<(String, Ipv4Addr)> {
        let known: Vec<(String, Ipv4Addr)> = hosts.iter().filter_map(|h| Some((h.clone(), table.get(h)?))).collect();
        self.repairs.extend(known.iter().cloned());
        known
    }

    /// The unused marks the store holds (from its watch).
    pub fn set_unused(&mut self, unused: BTreeMap<String, Timestamp>) {
        self.unused = unused;
    }

    /// Decides, for every stored host, against the hosts objects carry now (`live`): a host no
    /// object carries is marked unused since `now`; one carried again loses its mark; one
    /// unused for `release_after` or longer is released. Only the leader calls it, and only once
    /// every member has been listed (so `live` is complete).
    pub fn lifecycle(&mut self, live: &BTreeSet<&str>, now: Timestamp, release_after: Duration) {
        let Some(store) = &self.store else { return };
        let release_after = i64::try_from(release_after.as_secs()).unwrap_or(i64::MAX);
        self.edits.clear();
        for host in store.keys() {
            let edit = match (live.contains(host.as_str()), self.unused.get(host)) {
                (true, Some(_)) => Edit::InUse,
                (false, None) => Edit::Unused(now),
                (false, Some(since)) if now.as_second() - since.as_second() >= release_after => Edit::Release,
                (true, None) | (false, Some(_)) => continue,
            };
            self.edits.insert(host.clone(), edit);
        }
    }

    /// Whether `job` would give a write now.
    pub fn job_pending(&self) -> bool {
        let work = !self.unpersisted.is_empty() || !self.repairs.is_empty() || !self.edits.is_empty();
        !self.persisting && work && self.store.is_some()
    }

    /// The addresses to persist and the entries to edit now, unless a write is under way or
    /// there is nothing to write.
    pub fn job(&mut self) -> Option<(BTreeMap<String, Ipv4Addr>, BTreeMap<String, Edit>)> {
        if !self.job_pending() {
            return None;
        }
        self.persisting = true;
        let mut job = self.unpersisted.clone();
        job.extend(self.repairs.iter().map(|(h, ip)| (h.clone(), *ip)));
        self.sending = std::mem::take(&mut self.edits);
        Some((job, self.sending.clone()))
    }

    /// The write ended: with the store as written, or failed (tried again on the next pass).
    pub fn persisted(
        &mut self,
        store: Option<BTreeMap<String, Ipv4Addr>>,
        table: &mut VipTable,
        live: &BTreeSet<&str>,
    ) -> Option<Adoption> {
        self.persisting = false;
        let sent = std::mem::take(&mut self.sending);
        match &store {
            Some(written) => {
                self.repairs.retain(|h, ip| written.get(h) != Some(ip));
                for (host, edit) in sent {
                    match edit {
                        Edit::Unused(since) => self.unused.insert(host, since),
                        Edit::InUse | Edit::Release => self.unused.remove(&host),
                    };
                }
            }
            // Failed: the edits are decided again by the next lifecycle, or sent again now.
            None => {
                for (host, edit) in sent {
                    self.edits.entry(host).or_insert(edit);
                }
            }
        }
        store.map(|s| self.adopt(s, table, live))
    }

    /// Whether every address allocated so far is in the store: member writes may go ahead.
    pub fn settled(&self) -> bool {
        self.store.is_some() && self.unpersisted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(240, 0, 0, last)
    }

    fn hosts(names: &[&'static str]) -> BTreeSet<&'static str> {
        names.iter().copied().collect()
    }

    fn store(entries: &[(&str, u8)]) -> BTreeMap<String, Ipv4Addr> {
        entries.iter().map(|(h, last)| (h.to_string(), ip(*last))).collect()
    }

    #[test]
    fn writes_wait_for_new_addresses_to_be_stored() {
        let mut vips = VipStore::default();
        let mut table = VipTable::default();
        let live = hosts(&["a.global"]);
        assert!(!vips.settled(), "not listed yet");
        assert_eq!(vips.adopt(BTreeMap::new(), &mut table, &live), Adoption::Agrees);
        assert!(vips.settled());
        vips.allocated(store(&[("a.global", 1)]));
        assert!(!vips.settled());
        let (job, _) = vips.job().expect("a write of the new address");
        assert_eq!(job.len(), 1);
        assert_eq!(vips.job(), None, "one write at a time");
        assert_eq!(vips.persisted(None, &mut table, &live), None, "failed: tried again");
        assert!(vips.job().is_some());
        vips.persisted(Some(job), &mut table, &live);
        assert!(vips.settled());
    }

    #[test]
    fn an_unreadable_entry_is_written_back_with_its_address_and_holds_back_no_member() {
        let mut vips = VipStore::default();
        let mut table = VipTable::default();
        let live = hosts(&["a.global", "b.global"]);
        vips.adopt(store(&[("a.global", 1), ("b.global", 2)]), &mut table, &live);
        // b's entry becomes garbage: the store as parsed lacks it.
        vips.adopt(store(&[("a.global", 1)]), &mut table, &live);
        let repaired = vips.unreadable(&["b.global".to_string(), "unknown.global".to_string()], &table);
        assert_eq!(repaired, [("b.global".to_string(), ip(2))], "the address members already carry");
        assert!(vips.settled(), "member writes do not wait for a repair");
        let (job, _) = vips.job().expect("the repair is written");
        assert_eq!(job.get("b.global"), Some(&ip(2)));
        vips.persisted(Some(store(&[("a.global", 1), ("b.global", 2)])), &mut table, &live);
        assert!(vips.job().is_none(), "repaired");
        assert_eq!(table.get("b.global"), Some(ip(2)), "the address did not move");
    }

    #[test]
    fn a_store_that_disagrees_replaces_the_table() {
        let mut vips = VipStore::default();
        let mut table = VipTable::default();
        assert!(table.adopt("a.global", ip(1)));
        match vips.adopt(store(&[("a.global", 2)]), &mut table, &hosts(&["a.global"])) {
            Adoption::Replace(t) => assert_eq!(t.get("a.global"), Some(ip(2))),
            other => panic!("expected the store to win, got {other:?}"),
        }
    }

    #[test]
    fn a_new_leader_persists_what_it_allocated_while_following() {
        let mut vips = VipStore::default();
        let mut table = VipTable::default();
        vips.adopt(store(&[("a.global", 1)]), &mut table, &hosts(&["a.global"]));
        assert!(table.adopt("b.global", ip(2)));
        vips.became_leader(&table);
        assert_eq!(vips.job(), Some((store(&[("b.global", 2)]), BTreeMap::new())));
    }

    #[test]
    fn an_unused_host_keeps_its_address_for_the_grace_period_then_it_is_released() {
        let mut vips = VipStore::default();
        let mut table = VipTable::default();
        let grace = Duration::from_secs(3600);
        let t0: Timestamp = "2026-12-07T10:00:00Z".parse().unwrap();
        let at = |seconds: i64| Timestamp::from_second(t0.as_second() + seconds).unwrap();
        let both = hosts(&["a.global", "b.global"]);
        vips.adopt(store(&[("a.global", 1), ("b.global", 2)]), &mut table, &both);

        // b is no longer carried: marked unused, not released, and member writes do not wait.
        let only_a = hosts(&["a.global"]);
        vips.lifecycle(&only_a, t0, grace);
        assert!(vips.settled());
        let (new, edits) = vips.job().expect("the mark is written");
        assert!(new.is_empty());
        assert_eq!(edits, [("b.global".to_string(), Edit::Unused(t0))].into());
        vips.persisted(Some(store(&[("a.global", 1), ("b.global", 2)])), &mut table, &only_a);
        vips.lifecycle(&only_a, at(60), grace);
        assert_eq!(vips.job(), None, "already marked: nothing to write");
        assert_eq!(table.get("b.global"), Some(ip(2)), "reserved meanwhile");

        // Carried again within the grace period: the mark goes, the address stays.
        vips.lifecycle(&both, at(120), grace);
        assert_eq!(vips.job().unwrap().1, [("b.global".to_string(), Edit::InUse)].into());
        vips.persisted(Some(store(&[("a.global", 1), ("b.global", 2)])), &mut table, &both);

        // Gone again, for longer than the grace period: released, and its address freed.
        vips.lifecycle(&only_a, at(200), grace);
        let (_, edits) = vips.job().unwrap();
        vips.persisted(Some(store(&[("a.global", 1), ("b.global", 2)])), &mut table, &only_a);
        assert_eq!(edits["b.global"], Edit::Unused(at(200)));
        vips.lifecycle(&only_a, at(200 + 3599), grace);
        assert_eq!(vips.job(), None, "not yet");
        vips.lifecycle(&only_a, at(200 + 3600), grace);
        assert_eq!(vips.job().unwrap().1, [("b.global".to_string(), Edit::Release)].into());
        vips.persisted(Some(store(&[("a.global", 1)])), &mut table, &only_a);
        assert_eq!(table.get("b.global"), None, "released");
        assert_eq!(table.get("a.global"), Some(ip(1)), "a live host's address never moves");
        vips.lifecycle(&only_a, at(200 + 3700), grace);
        assert_eq!(vips.job(), None);
    }
}
