//! What changed since the last recompute, and how far each change reaches.

use std::collections::BTreeMap;

/// How far a change to an identity reaches: which other identities' outputs read what changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    /// Only its own outputs: a policy that cannot change its hosts (OutlierDetection,
    /// ClientConnectionConfig), a user's Sidecar next to its workloads, or a Dependency (of
    /// which it is the source, or a destination that was added or dropped).
    Itself,
    /// Also its named clients, whose Sidecars and Dependency statuses list its hosts, if its
    /// hosts changed: a GTP, whose `dnsPrefix` entries are hosts.
    Clients,
    /// Also its destinations, which are written where it runs, and its clients if its hosts
    /// changed: its workloads or their Services.
    Neighbours,
}

/// Which identities need recomputing, and how far each change reaches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Everything: a member came or went, or moved its region or gateway.
    pub all: bool,
    /// Only the per-member facts (a member's health): no identity's objects depend on them.
    pub facts: bool,
    pub identities: BTreeMap<String, Reach>,
    /// Hosts someone else's ServiceEntry began or stopped holding: the identities that write
    /// them are recomputed (compute knows which those are).
    pub hosts: std::collections::BTreeSet<String>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.all && !self.facts && self.identities.is_empty() && self.hosts.is_empty()
    }
    pub(super) fn touch(&mut self, identity: Option<&str>, reach: Reach) {
        let Some(id) = identity else { return };
        if self.all {
            return;
        }
        match self.identities.get_mut(id) {
            Some(have) => *have = (*have).max(reach),
            None => {
                self.identities.insert(id.to_string(), reach);
            }
        }
    }
}
