//! Status of a policy (SPEC §7), computed from its report. Pure: the clock and the per-cluster
//! write errors come in as arguments, so "nothing changed → nothing written" is a comparison.

use std::collections::BTreeMap;

use super::{PolicyReport, PolicyState};
use crate::crd::{ClusterResult, Condition, PolicyStatus};
use crate::model::ClusterId;

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_CONFLICT: &str = "Conflict";
pub const CONDITION_INVALID: &str = "Invalid";

/// The status a policy should carry. `previous` keeps each condition's transition time when its
/// status did not change; `errors` holds the last write error of each member.
pub fn policy_status(
    report: &PolicyReport,
    errors: &BTreeMap<ClusterId, String>,
    previous: Option<&PolicyStatus>,
    now: &str,
) -> PolicyStatus {
    let generation = report.generation;
    let (state, described) = report.state.describe();
    let (ready_reason, ready_message) = match &report.state {
        PolicyState::Ready => ("Applied", report.message.clone()),
        _ => (state, described),
    };
    let ready = matches!(report.state, PolicyState::Ready);
    let conflict = match &report.state {
        PolicyState::Conflict(winner) => (true, "Overridden", format!("{winner} takes precedence")),
        _ => (false, "NoConflict", String::new()),
    };
    let invalid = match &report.state {
        PolicyState::Invalid(reason) => (true, "ValidationFailed", reason.clone()),
        _ => (false, "Valid", String::new()),
    };
    let condition = |type_: &str, on: bool, reason: &str, message: String| {
        let status = if on { "True" } else { "False" }.to_string();
        let before = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == type_));
        let since = match before {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Some(now.to_string()),
        };
        Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: since,
        }
    };
    let conditions = vec![
        condition(CONDITION_READY, ready, ready_reason, ready_message),
        condition(CONDITION_CONFLICT, conflict.0, conflict.1, conflict.2),
        condition(CONDITION_INVALID, invalid.0, invalid.1, invalid.2),
    ];
    let clusters: Vec<ClusterResult> = report
        .clusters
        .iter()
        .map(|(cluster, hosts)| ClusterResult {
            cluster: cluster.clone(),
            hosts: hosts.iter().cloned().collect(),
            last_error: errors.get(cluster).cloned(),
        })
        .collect();
    let synced = clusters.iter().filter(|c| c.last_error.is_none()).count();
    PolicyStatus {
        observed_generation: generation,
        conditions,
        clusters,
        state: Some(state.to_string()),
        clusters_synced: Some(i32::try_from(synced).unwrap_or(i32::MAX)),
    }
}

/// Equal apart from transition times: the test for "this status needs writing".
pub fn same_status(a: &PolicyStatus, b: &PolicyStatus) -> bool {
    let strip = |s: &PolicyStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = None;
        }
        s
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Kind;
    use crate::model::ObjectRef;

    fn report(state: PolicyState) -> PolicyReport {
        let at = ObjectRef { cluster: "west".into(), namespace: "app".into(), name: "gtp".into() };
        let mut clusters = BTreeMap::new();
        clusters.insert("east".to_string(), std::sync::Arc::new(["stage.a.global".to_string()].into()));
        clusters.insert("west".to_string(), std::sync::Arc::new(["stage.a.global".to_string()].into()));
        PolicyReport {
            kind: Kind::GlobalTrafficPolicy,
            at,
            generation: Some(3),
            state,
            clusters,
            message: String::new(),
            sidecar: None,
        }
    }

    #[test]
    fn conflict_names_the_winner_and_keeps_transition_times() {
        let winner = ObjectRef { cluster: "east".into(), namespace: "app".into(), name: "older".into() };
        let errors = [("east".to_string(), "apply failed".to_string())].into();
        let first = policy_status(&report(PolicyState::Conflict(winner)), &errors, None, "t1");
        let ready = first.conditions.iter().find(|c| c.type_ == CONDITION_READY).unwrap();
        assert_eq!(ready.status, "False");
        let conflict = first.conditions.iter().find(|c| c.type_ == CONDITION_CONFLICT).unwrap();
        assert_eq!(conflict.status, "True");
        assert!(conflict.message.contains("east/app/older"), "{}", conflict.message);
        assert_eq!(first.clusters_synced, Some(1));
        assert_eq!(first.clusters[0].last_error.as_deref(), Some("apply failed"));

        let ok = policy_status(&report(PolicyState::Ready), &BTreeMap::new(), Some(&first), "t2");
        let times: Vec<_> = ok.conditions.iter().map(|c| c.last_transition_time.as_deref().unwrap()).collect();
        assert_eq!(times, ["t2", "t2", "t1"], "Ready and Conflict flipped, Invalid did not");
        assert!(!same_status(&ok, &first));
        let again = policy_status(&report(PolicyState::Ready), &BTreeMap::new(), Some(&ok), "t3");
        assert!(same_status(&again, &ok));
        assert_eq!(again, ok, "an unchanged status keeps its times");
    }

    #[test]
    fn invalid_carries_the_reason() {
        let s = policy_status(&report(PolicyState::Invalid("weights sum to 90".into())), &BTreeMap::new(), None, "t");
        let invalid = s.conditions.iter().find(|c| c.type_ == CONDITION_INVALID).unwrap();
        assert_eq!((invalid.status.as_str(), invalid.message.as_str()), ("True", "weights sum to 90"));
        assert_eq!(s.state.as_deref(), Some("Invalid"));
        assert_eq!(s.observed_generation, Some(3));
    }
}
