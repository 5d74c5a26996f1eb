//! Stable virtual IPs for hosts: one address per host, the same in every member, never reused
//! while the host has it.
//!
//! The allocator is pure: it takes the existing allocations (persisted in the hub by `run`) and
//! returns the addresses of new hosts. A host's first choice is derived from a hash of its name,
//! so the same host gets the same address in every `render` of any fleet unless two hosts collide;
//! collisions probe linearly. Existing allocations are never moved.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::meta::fnv1a;
use crate::settings::Ipv4Cidr;

/// Host → address, as the VIP store ConfigMap in the hub holds them (one data key per host);
/// entries that are not IPv4 addresses are skipped.
pub fn parse_store(data: Option<&BTreeMap<String, String>>) -> BTreeMap<String, Ipv4Addr> {
    data.into_iter()
        .flatten()
        .filter_map(|(host, ip)| ip.trim().parse::<Ipv4Addr>().ok().map(|ip| (host.clone(), ip)))
        .collect()
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipTable {
    by_host: BTreeMap<String, Ipv4Addr>,
    used: BTreeSet<Ipv4Addr>,
    /// Allocated since the last `take_new`: what `run` must persist before writing.
    new: BTreeMap<String, Ipv4Addr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no free address left in {cidr} for host {host}")]
pub struct VipExhausted {
    pub cidr: String,
    pub host: String,
}

impl VipTable {
    /// A table holding existing allocations (e.g. loaded from the hub). Duplicated addresses
    /// keep the first host (in host order); the others are re-allocated on next use.
    pub fn from_existing(existing: impl IntoIterator<Item = (String, Ipv4Addr)>) -> Self {
        let mut t = VipTable::default();
        let sorted: BTreeMap<String, Ipv4Addr> = existing.into_iter().collect();
        for (host, ip) in sorted {
            if t.used.insert(ip) {
                t.by_host.insert(host, ip);
            }
        }
        t
    }

    /// Records an allocation made elsewhere (another replica, persisted in the hub). Returns false
    /// when it disagrees with this table: the host has another address, or the address is taken.
    pub fn adopt(&mut self, host: &str, ip: Ipv4Addr) -> bool {
        match self.by_host.get(host) {
            Some(have) => *have == ip,
            None if self.used.contains(&ip) => false,
            None => {
                self.used.insert(ip);
                self.by_host.insert(host.to_string(), ip);
                true
            }
        }
    }

    pub fn get(&self, host: &str) -> Option<Ipv4Addr> {
        self.by_host.get(host).copied()
    }

    pub fn all(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.by_host
    }

    /// The host's address, allocating one from `cidr` if it has none yet.
    pub fn get_or_allocate(&mut self, host: &str, cidr: Ipv4Cidr) -> Result<Ipv4Addr, VipExhausted> {
        if let Some(ip) = self.by_host.get(host) {
            return Ok(*ip);
        }
        // Skip the network address and the last (broadcast-like) address of the block.
        let usable = cidr.size() - 2;
        let start = fnv1a(host.as_bytes()) % usable;
        for step in 0..usable {
            let ip = cidr.nth(1 + (start + step) % usable);
            if self.used.insert(ip) {
                self.by_host.insert(host.to_string(), ip);
                self.new.insert(host.to_string(), ip);
                return Ok(ip);
            }
        }
        Err(VipExhausted { cidr: cidr.to_string(), host: host.to_string() })
    }

    /// Allocations made since the last call.
    pub fn take_new(&mut self) -> BTreeMap<String, Ipv4Addr> {
        std::mem::take(&mut self.new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn same_host_same_address_in_independent_tables() {
        let mut a = VipTable::default();
        let mut b = VipTable::default();
        b.get_or_allocate("other.host.global", cidr("240.0.0.0/16")).unwrap();
        let ia = a.get_or_allocate("stage.greeting.global", cidr("240.0.0.0/16")).unwrap();
        let ib = b.get_or_allocate("stage.greeting.global", cidr("240.0.0.0/16")).unwrap();
        assert_eq!(ia, ib);
    }

    #[test]
    fn collisions_probe_and_exhaustion_is_an_error() {
        // A /30 has two usable addresses.
        let mut t = VipTable::default();
        let a = t.get_or_allocate("a", cidr("10.0.0.0/30")).unwrap();
        let b = t.get_or_allocate("b", cidr("10.0.0.0/30")).unwrap();
        assert_ne!(a, b);
        for ip in [a, b] {
            assert!(ip == Ipv4Addr::new(10, 0, 0, 1) || ip == Ipv4Addr::new(10, 0, 0, 2), "{ip}");
        }
        let err = t.get_or_allocate("c", cidr("10.0.0.0/30")).unwrap_err();
        assert_eq!(err.host, "c");
        assert_eq!(t.take_new().len(), 2);
        assert!(t.take_new().is_empty());
    }

    #[test]
    fn existing_allocations_are_kept_and_duplicates_dropped() {
        let ip = Ipv4Addr::new(240, 0, 0, 9);
        let t = VipTable::from_existing([("b".to_string(), ip), ("a".to_string(), ip)]);
        assert_eq!(t.get("a"), Some(ip));
        assert_eq!(t.get("b"), None);
    }
}
