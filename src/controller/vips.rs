//! The VIP store's bookkeeping: what the hub's ConfigMap holds, which addresses this replica
//! allocated that it does not hold yet, and whether a write of them is under way. Member writes
//! wait until every address they carry is in the store, so that no host is ever written with an
//! address that a restart could change.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::compute::vip::VipTable;

#[derive(Debug, Default)]
pub struct VipStore {
    /// None until the store has been listed once.
    store: Option<BTreeMap<String, Ipv4Addr>>,
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

    /// The store's contents, as a watch or a write returned them.
    pub fn adopt(&mut self, store: BTreeMap<String, Ipv4Addr>, table: &mut VipTable) -> Adoption {
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

    /// Whether `job` would give a write now.
    pub fn job_pending(&self) -> bool {
        !self.persisting && (!self.unpersisted.is_empty() || !self.repairs.is_empty()) && self.store.is_some()
    }

    /// The addresses to persist now, unless a write is under way or there are none.
    pub fn job(&mut self) -> Option<BTreeMap<String, Ipv4Addr>> {
        if !self.job_pending() {
            return None;
        }
        self.persisting = true;
        let mut job = self.unpersisted.clone();
        job.extend(self.repairs.iter().map(|(h, ip)| (h.clone(), *ip)));
        Some(job)
    }

    /// The write ended: with the store as written, or failed (tried again on the next pass).
    pub fn persisted(&mut self, store: Option<BTreeMap<String, Ipv4Addr>>, table: &mut VipTable) -> Option<Adoption> {
        self.persisting = false;
        if let Some(written) = &store {
            self.repairs.retain(|h, ip| written.get(h) != Some(ip));
        }
        store.map(|s| self.adopt(s, table))
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

    #[test]
    fn writes_wait_for_new_addresses_to_be_stored() {
        let mut vips = VipStore::default();
        let mut table = VipTable::default();
        assert!(!vips.settled(), "not listed yet");
        assert_eq!(vips.adopt(BTreeMap::new(), &mut table), Adoption::Agrees);
        assert!(vips.settled());
        vips.allocated([("a.global".to_string(), ip(1))].into());
        assert!(!vips.settled());
        let job = vips.job().expect("a write of the new address");
        assert_eq!(job.len(), 1);
        assert_eq!(vips.job(), None, "one write at a time");
        assert_eq!(vips.persisted(None, &mut table), None, "failed: tried again");
        assert!(vips.job().is_some());
        vips.persisted(Some(job), &mut table);
        assert!(vips.settled());
    }

    #[test]
    fn an_unreadable_entry_is_written_back_with_its_address_and_holds_back_no_member() {
        let mut vips = VipStore::default();
        let mut table = VipTable::default();
        vips.adopt([("a.global".to_string(), ip(1)), ("b.global".to_string(), ip(2))].into(), &mut table);
        // b's entry becomes garbage: the store as parsed lacks it.
        vips.adopt([("a.global".to_string(), ip(1))].into(), &mut table);
        let repaired = vips.unreadable(&["b.global".to_string(), "unknown.global".to_string()], &table);
        assert_eq!(repaired, [("b.global".to_string(), ip(2))], "the address members already carry");
        assert!(vips.settled(), "member writes do not wait for a repair");
        let job = vips.job().expect("the repair is written");
        assert_eq!(job.get("b.global"), Some(&ip(2)));
        vips.persisted(Some(job), &mut table);
        assert!(vips.job().is_none(), "repaired");
        assert_eq!(table.get("b.global"), Some(ip(2)), "the address did not move");
    }

    #[test]
    fn a_store_that_disagrees_replaces_the_table() {
        let mut vips = VipStore::default();
        let mut table = VipTable::default();
        assert!(table.adopt("a.global", ip(1)));
        let theirs: BTreeMap<String, Ipv4Addr> = [("a.global".to_string(), ip(2))].into();
        match vips.adopt(theirs, &mut table) {
            Adoption::Replace(t) => assert_eq!(t.get("a.global"), Some(ip(2))),
            other => panic!("expected the store to win, got {other:?}"),
        }
    }

    #[test]
    fn a_new_leader_persists_what_it_allocated_while_following() {
        let mut vips = VipStore::default();
        let mut table = VipTable::default();
        vips.adopt([("a.global".to_string(), ip(1))].into(), &mut table);
        assert!(table.adopt("b.global", ip(2)));
        vips.became_leader(&table);
        assert_eq!(vips.job(), Some([("b.global".to_string(), ip(2))].into()));
    }
}
