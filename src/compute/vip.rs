//! Stable virtual IPs for hosts: one address per host, the same in every member, never reused
//! while the host has it.
//!
//! The allocator is pure: it takes the existing allocations (persisted in the hub by `run`) and
//! returns the addresses of new hosts. A host's first choice is derived from a hash of its name,
//! so the same host gets the same address in every `render` of any fleet unless two hosts collide;
//! collisions probe linearly. Existing allocations are never moved.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

use crate::meta::fnv1a;
use crate::settings::Ipv4Cidr;

/// Hosts one ConfigMap of the VIP store holds at most: about 320 KiB with hosts of 46 characters
/// (the 100,000-host test), under a third of the 1 MiB an object may hold.
pub const SHARD_ENTRIES: usize = 5_000;

/// The name of shard `index` of the VIP store `base`: `base` itself for the first (the store of
/// the releases before shards), then `base-1`, `base-2`, ….
pub fn shard_name(base: &str, index: usize) -> String {
    if index == 0 { base.to_string() } else { format!("{base}-{index}") }
}

/// Which shard of the VIP store `base` the ConfigMap `name` is, if it is one.
pub fn shard_index(base: &str, name: &str) -> Option<usize> {
    if name == base {
        return Some(0);
    }
    let digits = name.strip_prefix(base)?.strip_prefix('-')?;
    let canonical = !digits.is_empty() && !digits.starts_with('0') && digits.bytes().all(|b| b.is_ascii_digit());
    canonical.then(|| digits.parse().ok()).flatten()
}

/// The address of one entry of the store (`240.0.0.7`, or `240.0.0.7 unused-since=<time>`
/// for a host no object carries any more); None when it is not an address (a hand edit).
pub fn parse_entry(value: &str) -> Option<Ipv4Addr> {
    value.split_whitespace().next()?.parse().ok()
}

/// Since when an entry's host has been unused, if the entry says so.
pub fn unused_since(value: &str) -> Option<Timestamp> {
    value.split_whitespace().find_map(|w| w.strip_prefix(UNUSED_SINCE)?.parse().ok())
}

const UNUSED_SINCE: &str = "unused-since=";

fn entry(ip: Ipv4Addr, unused: Option<Timestamp>) -> String {
    match unused {
        None => ip.to_string(),
        Some(since) => format!("{ip} {UNUSED_SINCE}{}", since.strftime("%Y-%m-%dT%H:%M:%SZ")),
    }
}

/// A change to an entry of the store other than a new allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// No object carries the host any more, since then.
    Unused(Timestamp),
    /// Carried again: the mark goes.
    InUse,
    /// Unused for longer than the grace period: the entry goes, and its address is free.
    Release,
}

/// Host → address, as one ConfigMap of the VIP store holds them (one data key per host);
/// entries that are not IPv4 addresses are skipped.
pub fn parse_store(data: Option<&BTreeMap<String, String>>) -> BTreeMap<String, Ipv4Addr> {
    data.into_iter().flatten().filter_map(|(host, ip)| Some((host.clone(), parse_entry(ip)?))).collect()
}

/// Host → address over every shard: a host held by two shards (a hand edit) keeps the address
/// of the lower one.
pub fn parse_shards<'a>(
    shards: impl IntoIterator<Item = (usize, Option<&'a BTreeMap<String, String>>)>,
) -> BTreeMap<String, Ipv4Addr> {
    let sorted: BTreeMap<usize, Option<&BTreeMap<String, String>>> = shards.into_iter().collect();
    let mut all = BTreeMap::new();
    for data in sorted.into_values() {
        for (host, ip) in parse_store(data) {
            all.entry(host).or_insert(ip);
        }
    }
    all
}

/// Host → since when it is unused, over every shard (entries that say so).
pub fn parse_unused<'a>(
    shards: impl IntoIterator<Item = Option<&'a BTreeMap<String, String>>>,
) -> BTreeMap<String, Timestamp> {
    let entries = shards.into_iter().flatten().flatten();
    entries.filter_map(|(host, value)| Some((host.clone(), unused_since(value)?))).collect()
}

/// New allocations placed in a sharded store.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The shards to write, with their whole new data.
    pub writes: BTreeMap<usize, BTreeMap<String, String>>,
    /// Host → address over every shard once they are written.
    pub stored: BTreeMap<String, Ipv4Addr>,
}

/// Where `new` allocations go in the store whose shards hold `shards` (index → data): an entry of
/// the host that is not an address is repaired where it is; a host the store already gives an
/// address keeps it (the store wins; the caller adopts it); any other goes to the lowest shard with
/// room (a shard that does not exist has room), so entries never move between shards. `edits`
/// change entries where they are (an entry that is not an address is left to its repair).
pub fn place(
    shards: &BTreeMap<usize, BTreeMap<String, String>>,
    new: &BTreeMap<String, Ipv4Addr>,
    edits: &BTreeMap<String, Edit>,
    shard_entries: usize,
) -> Placement {
    let mut writes: BTreeMap<usize, BTreeMap<String, String>> = BTreeMap::new();
    let stored = parse_shards(shards.iter().map(|(i, data)| (*i, Some(data))));
    let holder = |host: &str| shards.iter().find(|(_, data)| data.contains_key(host)).map(|(i, _)| *i);
    let mut fill = 0;
    for (host, ip) in new {
        if stored.contains_key(host) {
            continue;
        }
        let index = match holder(host) {
            Some(index) => index,
            None => loop {
                let len = writes.get(&fill).or(shards.get(&fill)).map_or(0, BTreeMap::len);
                if len < shard_entries.max(1) {
                    break fill;
                }
                fill += 1;
            },
        };
        let data = writes.entry(index).or_insert_with(|| shards.get(&index).cloned().unwrap_or_default());
        data.insert(host.clone(), ip.to_string());
    }
    for (host, edit) in edits {
        let (Some(index), Some(ip)) = (holder(host), stored.get(host)) else { continue };
        let value = match edit {
            Edit::Unused(since) => Some(entry(*ip, Some(*since))),
            Edit::InUse => Some(entry(*ip, None)),
            Edit::Release => None,
        };
        let current = shards[&index].get(host);
        if current.is_none_or(|c| parse_entry(c) != Some(*ip)) || current == value.as_ref() {
            continue;
        }
        let data = writes.entry(index).or_insert_with(|| shards[&index].clone());
        match value {
            Some(value) => data.insert(host.clone(), value),
            None => data.remove(host),
        };
    }
    let stored = parse_shards(
        shards
            .iter()
            .map(|(i, data)| (*i, Some(writes.get(i).unwrap_or(data))))
            .chain(writes.iter().filter(|(i, _)| !shards.contains_key(i)).map(|(i, data)| (*i, Some(data)))),
    );
    Placement { writes, stored }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipTable {
    by_host: BTreeMap<String, Ipv4Addr>,
    used: BTreeSet<Ipv4Addr>,
    /// Allocated since the last `take_new`: what `run` must persist before writing.
    new: BTreeMap<String, Ipv4Addr>,
    /// Addresses imported from Admiral's store (`--import-vips-from`): a host without an address
    /// takes its own from here, and no other host is ever given one of them.
    imported: Arc<Imported>,
}

/// Host → address as another controller's store gave them, and those addresses.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    by_host: BTreeMap<String, Ipv4Addr>,
    addresses: BTreeSet<Ipv4Addr>,
}

impl Imported {
    pub fn new(by_host: BTreeMap<String, Ipv4Addr>) -> Arc<Imported> {
        let addresses = by_host.values().copied().collect();
        Arc::new(Imported { by_host, addresses })
    }

    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    /// The hosts that cannot keep Admiral's address because flotilla's store (which wins) holds
    /// the host under another address, or the address under another host; one line each.
    pub fn disagreements(&self, store: &BTreeMap<String, Ipv4Addr>) -> Vec<String> {
        let holder: BTreeMap<Ipv4Addr, &String> = store.iter().map(|(h, ip)| (*ip, h)).collect();
        let mut out = Vec::new();
        for (host, ip) in &self.by_host {
            match (store.get(host), holder.get(ip)) {
                (Some(stored), _) if stored != ip => out.push(format!(
                    "host {host}: Admiral's address {ip} differs from {stored} in flotilla's store, which wins: clients that resolved {ip} lose it"
                )),
                (None, Some(other)) => out.push(format!(
                    "host {host}: Admiral's address {ip} is held by {other} in flotilla's store: {host} gets another address"
                )),
                _ => {}
            }
        }
        out
    }
}

/// The data key of Admiral's address store (`se-address-configmap`).
pub const ADMIRAL_STORE_KEY: &str = "serviceEntryAddressStore";

/// Host → address from Admiral's address store: the YAML under `serviceEntryAddressStore`,
/// `entry-addresses: {<host>-se: <ip>}` (Admiral names each host's ServiceEntry `<host>-se`).
/// Entries that are not a ServiceEntry name and an IPv4 address are skipped; a store without
/// the key is empty (Admiral creates it so).
pub fn parse_admiral_store(data: Option<&BTreeMap<String, String>>) -> Result<BTreeMap<String, Ipv4Addr>, String> {
    #[derive(serde::Deserialize)]
    struct Store {
        #[serde(default, rename = "entry-addresses")]
        entry_addresses: Option<BTreeMap<String, String>>,
    }
    let Some(text) = data.and_then(|d| d.get(ADMIRAL_STORE_KEY)) else { return Ok(BTreeMap::new()) };
    let store: Option<Store> = serde_saphyr::from_str(text)
        .map_err(|e| format!("{ADMIRAL_STORE_KEY}: {}", crate::meta::without_values(&e.to_string())))?;
    let entries = store.and_then(|s| s.entry_addresses).unwrap_or_default();
    Ok(entries
        .into_iter()
        .filter_map(|(se, ip)| Some((se.strip_suffix("-se")?.to_ascii_lowercase(), ip.trim().parse().ok()?)))
        .collect())
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

    /// This table, giving hosts without an address the imported one (see `imported`).
    pub fn with_imported(mut self, imported: Arc<Imported>) -> Self {
        self.imported = imported;
        self
    }

    pub fn imported(&self) -> &Arc<Imported> {
        &self.imported
    }

    /// Frees the host's address (released from the store after its grace period).
    pub fn release(&mut self, host: &str) {
        if let Some(ip) = self.by_host.remove(host) {
            self.used.remove(&ip);
            self.new.remove(host);
        }
    }

    pub fn all(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.by_host
    }

    /// The host's address, allocating one from `cidr` if it has none yet.
    pub fn get_or_allocate(&mut self, host: &str, cidr: Ipv4Cidr) -> Result<Ipv4Addr, VipExhausted> {
        if let Some(ip) = self.by_host.get(host) {
            return Ok(*ip);
        }
        let imported = self.imported.by_host.get(host).copied();
        if let Some(ip) = imported.filter(|ip| self.used.insert(*ip)) {
            self.by_host.insert(host.to_string(), ip);
            self.new.insert(host.to_string(), ip);
            return Ok(ip);
        }
        // Skip the network address and the last (broadcast-like) address of the block.
        let usable = cidr.size() - 2;
        let start = fnv1a(host.as_bytes()) % usable;
        for step in 0..usable {
            let ip = cidr.nth(1 + (start + step) % usable);
            if !self.imported.addresses.contains(&ip) && self.used.insert(ip) {
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

    fn data(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries.iter().map(|(h, ip)| (h.to_string(), ip.to_string())).collect()
    }

    #[test]
    fn shard_names_round_trip_and_nothing_else_is_a_shard() {
        for i in [0, 1, 2, 10, 123] {
            assert_eq!(shard_index("flotilla-vips", &shard_name("flotilla-vips", i)), Some(i));
        }
        for other in
            ["flotilla-vips-0", "flotilla-vips-01", "flotilla-vips-", "flotilla-vips-x", "flotilla-vipsy", "other"]
        {
            assert_eq!(shard_index("flotilla-vips", other), None, "{other}");
        }
    }

    #[test]
    fn allocations_fill_the_lowest_shard_with_room_and_never_move() {
        let ip = |i: u8| Ipv4Addr::new(240, 0, 0, i);
        let shards: BTreeMap<usize, BTreeMap<String, String>> =
            [(0, data(&[("a", "240.0.0.1"), ("b", "not an address")])), (2, data(&[("c", "240.0.0.3")]))].into();
        let new: BTreeMap<String, Ipv4Addr> =
            [("a", ip(9)), ("b", ip(2)), ("d", ip(4)), ("e", ip(5)), ("f", ip(6))].map(|(h, ip)| (h.into(), ip)).into();
        let placed = place(&shards, &new, &BTreeMap::new(), 2);
        // a keeps the store's address; b is repaired in shard 0; d fills the missing shard 1,
        // e the rest of it; f finds shard 2 with room.
        assert_eq!(placed.writes[&0], data(&[("a", "240.0.0.1"), ("b", "240.0.0.2")]));
        assert_eq!(placed.writes[&1], data(&[("d", "240.0.0.4"), ("e", "240.0.0.5")]));
        assert_eq!(placed.writes[&2], data(&[("c", "240.0.0.3"), ("f", "240.0.0.6")]));
        let stored: Vec<(&str, Ipv4Addr)> = placed.stored.iter().map(|(h, ip)| (h.as_str(), *ip)).collect();
        assert_eq!(stored, [("a", ip(1)), ("b", ip(2)), ("c", ip(3)), ("d", ip(4)), ("e", ip(5)), ("f", ip(6))]);
        // Full shards: a new shard past the last.
        let placed = place(&placed.writes, &[("g".to_string(), ip(7))].into(), &BTreeMap::new(), 2);
        assert_eq!(placed.writes.keys().copied().collect::<Vec<_>>(), [3]);
        // Nothing new: nothing to write.
        assert_eq!(place(&shards, &[("a".to_string(), ip(1))].into(), &BTreeMap::new(), 2).writes, BTreeMap::new());
    }

    #[test]
    fn edits_mark_unmark_and_release_entries_where_they_are() {
        let since: Timestamp = "2026-12-07T11:00:00Z".parse().unwrap();
        let shards: BTreeMap<usize, BTreeMap<String, String>> = [
            (0, data(&[("a", "240.0.0.1"), ("b", "240.0.0.2 unused-since=2026-12-01T00:00:00Z"), ("x", "junk")])),
            (1, data(&[("c", "240.0.0.3 unused-since=2026-11-01T00:00:00Z"), ("d", "240.0.0.4")])),
        ]
        .into();
        let edits: BTreeMap<String, Edit> = [
            ("a", Edit::Unused(since)),
            ("b", Edit::InUse),
            ("c", Edit::Release),
            ("d", Edit::InUse),
            ("x", Edit::Release),
            ("nowhere", Edit::Release),
        ]
        .map(|(h, e)| (h.to_string(), e))
        .into();
        let placed = place(&shards, &BTreeMap::new(), &edits, 2);
        assert_eq!(
            placed.writes[&0],
            data(&[("a", "240.0.0.1 unused-since=2026-12-07T11:00:00Z"), ("b", "240.0.0.2"), ("x", "junk")])
        );
        assert_eq!(placed.writes[&1], data(&[("d", "240.0.0.4")]), "c released; d was in use already");
        assert!(!placed.stored.contains_key("c") && placed.stored.contains_key("a"));
        assert_eq!(unused_since(&placed.writes[&0]["a"]), Some(since));
        assert_eq!(parse_entry(&placed.writes[&0]["a"]), Some(Ipv4Addr::new(240, 0, 0, 1)));
        // What is already so is not written again.
        let placed = place(&placed.writes, &BTreeMap::new(), &edits, 2);
        assert!(placed.writes.is_empty(), "{:?}", placed.writes);
    }

    #[test]
    fn a_host_in_two_shards_keeps_the_lower_ones_address() {
        let (zero, one) = (data(&[("a", "240.0.0.1")]), data(&[("a", "240.0.0.2"), ("b", "240.0.0.3")]));
        let all = parse_shards([(1, Some(&one)), (0, Some(&zero))]);
        assert_eq!(all["a"], Ipv4Addr::new(240, 0, 0, 1));
        assert_eq!(all.len(), 2);
    }

    /// The store at 100,000 hosts with names as long as real ones (`stage.` + a 30-character
    /// identity + `.global`): every ConfigMap far below the 1 MiB an object may hold.
    #[test]
    fn a_store_of_100_000_hosts_stays_far_below_the_configmap_limit() {
        let mut table = VipTable::default();
        let hosts: Vec<String> =
            (0..100_000).map(|i| format!("stage.payments-ledger-reconciler-{i:06}.global")).collect();
        for host in &hosts {
            table.get_or_allocate(host, cidr("240.0.0.0/12")).unwrap();
        }
        let placed = place(&BTreeMap::new(), &table.take_new(), &BTreeMap::new(), SHARD_ENTRIES);
        let sizes: Vec<usize> = placed
            .writes
            .iter()
            .map(|(i, data)| {
                let cm = k8s_openapi::api::core::v1::ConfigMap {
                    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                        name: Some(shard_name("flotilla-vips", *i)),
                        ..Default::default()
                    },
                    data: Some(data.clone()),
                    ..Default::default()
                };
                serde_json::to_vec(&cm).unwrap().len()
            })
            .collect();
        println!(
            "100,000 hosts: {} shards, largest {} bytes, all {} bytes",
            sizes.len(),
            sizes.iter().max().unwrap(),
            sizes.iter().sum::<usize>()
        );
        assert_eq!(placed.stored.len(), 100_000);
        assert_eq!(sizes.len(), 20);
        assert!(sizes.iter().all(|s| *s < 1024 * 1024 / 3), "{sizes:?}");
    }

    #[test]
    fn existing_allocations_are_kept_and_duplicates_dropped() {
        let ip = Ipv4Addr::new(240, 0, 0, 9);
        let t = VipTable::from_existing([("b".to_string(), ip), ("a".to_string(), ip)]);
        assert_eq!(t.get("a"), Some(ip));
        assert_eq!(t.get("b"), None);
    }

    #[test]
    fn admirals_addresses_are_kept_and_never_given_to_another_host() {
        let store = "entry-addresses:\n  stage.greeting.global-se: 240.0.10.1\n  Stage.Payments.global-se: 240.0.10.2\n  not-a-service-entry: 240.0.10.3\n  stage.broken.global-se: nonsense\naddresses:\n- 240.0.10.1\n";
        let data = BTreeMap::from([(ADMIRAL_STORE_KEY.to_string(), store.to_string())]);
        let imported = parse_admiral_store(Some(&data)).unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            imported,
            BTreeMap::from([
                ("stage.greeting.global".to_string(), ip("240.0.10.1")),
                ("stage.payments.global".to_string(), ip("240.0.10.2")),
            ])
        );
        assert_eq!(parse_admiral_store(None).unwrap(), BTreeMap::new(), "Admiral creates its store empty");
        let broken = BTreeMap::from([(ADMIRAL_STORE_KEY.to_string(), "entry-addresses: [\"secret-ish\"".to_string())]);
        let e = parse_admiral_store(Some(&broken)).unwrap_err();
        assert!(e.starts_with(ADMIRAL_STORE_KEY) && !e.contains("secret-ish"), "{e}");

        // A host whose hashed address is one of Admiral's must go elsewhere; Admiral's hosts
        // keep theirs whatever the order; a host the store already holds keeps the store's.
        let block = cidr("240.0.10.0/30"); // two usable addresses: .1 and .2
        let mut table = VipTable::from_existing([("stage.stored.global".to_string(), ip("240.0.10.2"))])
            .with_imported(Imported::new(imported.clone()));
        assert!(table.get_or_allocate("stage.newcomer.global", block).is_err(), "Admiral's .1 is reserved, .2 stored");
        assert_eq!(table.get_or_allocate("stage.greeting.global", block).unwrap(), ip("240.0.10.1"));
        assert_ne!(
            table.get_or_allocate("stage.payments.global", cidr("240.0.0.0/16")).unwrap(),
            ip("240.0.10.2"),
            "its address is taken by a stored host: the store wins"
        );
        let new = table.take_new();
        assert_eq!(
            new.get("stage.greeting.global"),
            Some(&ip("240.0.10.1")),
            "an imported address is persisted like any"
        );
        let replaced = VipTable::default().with_imported(table.imported().clone());
        assert_eq!(replaced.imported().len(), 2);
        let store = BTreeMap::from([
            ("stage.greeting.global".to_string(), ip("240.0.10.9")),
            ("stage.stored.global".to_string(), ip("240.0.10.2")),
        ]);
        let said = table.imported().disagreements(&store);
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said[0].starts_with("host stage.greeting.global: Admiral's address 240.0.10.1 differs from 240.0.10.9")
        );
        assert!(
            said[1]
                .starts_with("host stage.payments.global: Admiral's address 240.0.10.2 is held by stage.stored.global")
        );
    }
}
