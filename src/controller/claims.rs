//! Claims on identities that namespaces may not make: how many each member has (a gauge), and a
//! Warning Event on each workload whose claim is reported (refused under `--tenancy=owned`, a
//! decoy under `open`), once while the claim lasts; the same for the engine's notices about
//! others' objects (a user's Sidecar that keeps a client from its Dependencies' hosts). Pure
//! bookkeeping; the writers publish.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ObjectReference;

use super::writer::WarningEvent;
use crate::compute::Notice;
use crate::model::{ClusterHealth, ClusterId, DisallowedClaim, Fleet, WorkloadKind};

/// (member, what is announced): one claim (`Deployment ns/name identity`) or one notice (its
/// object, reason and note: a notice that changes is announced again).
type ClaimKey = (ClusterId, String);

#[derive(Debug, Default)]
pub struct ClaimEvents {
    /// Reported claims an Event was queued for, while they last.
    announced: BTreeSet<ClaimKey>,
    /// Events not handed to a writer yet, dropped if their claim ends first.
    queued: BTreeMap<ClaimKey, WarningEvent>,
}

/// Events one write job publishes at most (after its objects): a switch to `--tenancy=owned`
/// with thousands of refused claims must not hold back a member's writes.
pub const EVENTS_PER_JOB: usize = 50;

impl ClaimEvents {
    /// Takes the fleet's claims as they are now. With `announce` (the leader) queues an Event for
    /// each reported claim not announced yet, in synced members only: while a member is listed,
    /// a workload seen before its Namespace would look refused. A claim that ended is forgotten
    /// (announced again if it comes back) and its unpublished Event dropped. Returns every
    /// member's count of disallowed claims.
    pub fn update<'a>(
        &mut self,
        fleet: &Fleet,
        notices: impl IntoIterator<Item = &'a Notice>,
        announce: bool,
    ) -> BTreeMap<ClusterId, usize> {
        let mut counts: BTreeMap<ClusterId, usize> = fleet.clusters().map(|c| (c.id.clone(), 0)).collect();
        let synced = |id: &str| fleet.cluster(id).is_some_and(|c| c.health == ClusterHealth::Synced);
        let mut reported = BTreeSet::new();
        for claim in fleet.disallowed_claims() {
            *counts.entry(claim.cluster.id.clone()).or_default() += 1;
            if !claim.is_reported() {
                continue;
            }
            let key = key_of(&claim);
            if announce && synced(&key.0) && self.announced.insert(key.clone()) {
                self.queued.insert(key.clone(), event_of(&claim));
            }
            reported.insert(key);
        }
        for notice in notices {
            let key = (
                notice.cluster.clone(),
                format!(
                    "{} {}/{} {:?} {}: {}",
                    notice.kind, notice.namespace, notice.name, notice.uid, notice.reason, notice.note
                ),
            );
            if announce && synced(&key.0) && self.announced.insert(key.clone()) {
                self.queued.insert(key.clone(), notice_event(notice));
            }
            reported.insert(key);
        }
        // What a member not synced holds is not known: its claims are neither new nor ended.
        self.announced.retain(|k| reported.contains(k) || (!synced(&k.0) && fleet.cluster(&k.0).is_some()));
        self.queued.retain(|k, _| reported.contains(k));
        counts
    }

    /// Up to `EVENTS_PER_JOB` Events to publish in `cluster`.
    pub fn take(&mut self, cluster: &str) -> Vec<WarningEvent> {
        let keys: Vec<ClaimKey> = self.queued.keys().filter(|k| k.0 == cluster).take(EVENTS_PER_JOB).cloned().collect();
        keys.iter().filter_map(|k| self.queued.remove(k)).collect()
    }

    /// A member that left: nothing of it is announced or kept.
    pub fn forget(&mut self, cluster: &str) {
        self.announced.retain(|k| k.0 != cluster);
        self.queued.retain(|k, _| k.0 != cluster);
    }

    /// Members with Events to publish.
    pub fn clusters(&self) -> BTreeSet<ClusterId> {
        self.queued.keys().map(|k| k.0.clone()).collect()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }
}

fn key_of(claim: &DisallowedClaim<'_>) -> ClaimKey {
    let w = claim.workload;
    (claim.cluster.id.clone(), format!("{} {}", w.describe(), claim.identity))
}

fn notice_event(notice: &Notice) -> WarningEvent {
    WarningEvent {
        object: ObjectReference {
            api_version: Some(notice.api_version.into()),
            kind: Some(notice.kind.into()),
            namespace: Some(notice.namespace.clone()),
            name: Some(notice.name.clone()),
            uid: notice.uid.clone(),
            ..Default::default()
        },
        reason: notice.reason.into(),
        note: notice.note.clone(),
        action: "Federate",
    }
}

fn event_of(claim: &DisallowedClaim<'_>) -> WarningEvent {
    let w = claim.workload;
    let (api_version, kind) = match w.kind {
        WorkloadKind::Deployment => ("apps/v1", "Deployment"),
        WorkloadKind::Rollout => ("argoproj.io/v1alpha1", "Rollout"),
        WorkloadKind::Job => ("batch/v1", "Job"),
        WorkloadKind::CronJob => ("batch/v1", "CronJob"),
    };
    WarningEvent {
        object: ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            namespace: Some(w.namespace.clone()),
            name: Some(w.name.clone()),
            uid: w.uid.clone(),
            ..Default::default()
        },
        reason: if claim.refused { "IdentityClaimRefused" } else { "IdentityClaimDisallowed" }.into(),
        note: claim.note(),
        action: "Federate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Allowance, Record, Workload};
    use crate::settings::Tenancy;

    fn workload(namespace: &str, name: &str, identity: &str) -> Record {
        Record::Workload(Workload {
            kind: WorkloadKind::Deployment,
            namespace: namespace.into(),
            name: name.into(),
            identity: Some(identity.into()),
            identity_from_label: true,
            env: "default".into(),
            opted_out: false,
            pod_labels: Default::default(),
            inbound_port: None,
            rollout: None,
            service_account: None,
            created: None,
            uid: Some(format!("uid-{name}")),
            wants_aliases: false,
        })
    }

    fn allows(names: &str) -> Record {
        Record::Namespace { opted_out: false, allows: Some(Allowance::parse(names)) }
    }

    /// Payments owned by namespace `payments` of member a; a decoy in `aaa` of member b, and an
    /// unowned `shop` in `shop` of member a.
    fn fleet(tenancy: Tenancy) -> Fleet {
        let mut fleet = Fleet::new("identity", tenancy, &[]);
        fleet.upsert("a", "", "payments", allows("payments"));
        fleet.upsert("a", "payments", "api", workload("payments", "api", "payments"));
        fleet.upsert("a", "shop", "web", workload("shop", "web", "shop"));
        fleet.upsert("b", "aaa", "api", workload("aaa", "api", "payments"));
        fleet
    }

    #[test]
    fn counts_every_disallowed_claim_and_announces_the_reported_once() {
        for (tenancy, reported) in [(Tenancy::Owned, 2), (Tenancy::Open, 1)] {
            let mut events = ClaimEvents::default();
            let fleet = fleet(tenancy);
            let counts = events.update(&fleet, [], true);
            assert_eq!(counts, BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 1)]), "{tenancy:?}");
            let queued: Vec<WarningEvent> = ["a", "b"].iter().flat_map(|c| events.take(c)).collect();
            assert_eq!(queued.len(), reported, "{tenancy:?}: {queued:?}");
            let decoy = queued.iter().find(|e| e.object.namespace.as_deref() == Some("aaa")).expect("the decoy");
            assert!(decoy.note.contains("other namespaces own it"), "{}", decoy.note);
            let refused = tenancy == Tenancy::Owned;
            assert_eq!(decoy.reason == "IdentityClaimRefused", refused);
            // Announced once while it lasts.
            events.update(&fleet, [], true);
            assert!(events.is_empty());
        }
    }

    #[test]
    fn a_claim_that_ends_and_comes_back_is_announced_again_and_only_the_leader_announces() {
        let mut events = ClaimEvents::default();
        let mut fleet = fleet(Tenancy::Owned);
        events.update(&fleet, [], false);
        assert!(events.is_empty(), "a follower announces nothing");
        events.update(&fleet, [], true);
        assert_eq!(events.take("b").len(), 1);
        fleet.upsert("b", "", "aaa", allows("payments"));
        assert_eq!(events.update(&fleet, [], true)["b"], 0);
        fleet.upsert("b", "", "aaa", allows("other"));
        events.update(&fleet, [], true);
        assert_eq!(events.take("b").len(), 1, "announced again");
    }

    #[test]
    fn a_notice_is_announced_once_while_it_lasts_and_again_when_it_changes() {
        let mut events = ClaimEvents::default();
        let fleet = fleet(Tenancy::Open);
        let notice = |note: &str| Notice {
            cluster: "a".into(),
            api_version: "networking.istio.io/v1",
            kind: "Sidecar",
            namespace: "web".into(),
            name: "default".into(),
            uid: Some("uid-default".into()),
            reason: "EgressMissesDependencies",
            note: note.into(),
        };
        let first = [notice("needs admiral-sync/stage.greeting.global")];
        events.update(&fleet, &first, true);
        let queued = events.take("a");
        let sidecar = queued.iter().find(|e| e.object.kind.as_deref() == Some("Sidecar")).expect("the notice");
        assert_eq!(
            (sidecar.reason.as_str(), sidecar.object.uid.as_deref()),
            ("EgressMissesDependencies", Some("uid-default"))
        );
        events.update(&fleet, &first, true);
        assert!(events.take("a").iter().all(|e| e.object.kind.as_deref() != Some("Sidecar")), "announced once");
        events.update(&fleet, &[notice("needs admiral-sync/stage.payments.global")], true);
        assert_eq!(events.take("a").len(), 1, "a changed notice is announced again");
        events.update(&fleet, [], true);
        events.update(&fleet, &first, true);
        assert_eq!(events.take("a").len(), 1, "one that ended and came back, again");
    }

    #[test]
    fn members_still_listing_announce_nothing_and_an_ended_claims_event_is_dropped() {
        let mut events = ClaimEvents::default();
        let mut fleet = fleet(Tenancy::Owned);
        fleet.set_health("b", ClusterHealth::Connecting);
        events.update(&fleet, [], true);
        assert!(events.take("b").is_empty(), "b is still being listed");
        assert_eq!(events.take("a").len(), 1, "shop, refused: {events:?}");
        fleet.set_health("b", ClusterHealth::Synced);
        events.update(&fleet, [], true);
        assert_eq!(events.clusters(), BTreeSet::from(["b".to_string()]));
        // The claim ends before its Event is published: the Event goes too.
        fleet.upsert("b", "", "aaa", allows("payments"));
        events.update(&fleet, [], true);
        assert!(events.is_empty(), "{events:?}");
        fleet.upsert("b", "", "aaa", allows("other"));
        events.update(&fleet, [], true);
        events.forget("b");
        assert!(events.is_empty());
    }
}
