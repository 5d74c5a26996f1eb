//! Why an identity's objects exist where they do: its hosts, where it runs, where its objects
//! are written, who depends on it, which policies won and why. One view, served by
//! `/debug/identities/{id}` and printed by `flotilla explain`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{DesiredObject, DesiredState};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityView {
    pub identity: String,
    pub hosts: BTreeSet<String>,
    /// Members where a workload of it runs.
    pub source_clusters: BTreeSet<String>,
    /// Members where its objects are written, with the objects.
    pub target_clusters: BTreeMap<String, Vec<String>>,
    /// Identities that depend on it (named, or through `*`).
    pub clients: BTreeSet<String>,
    pub policies: Vec<PolicyView>,
    pub diagnostics: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyView {
    pub kind: String,
    pub object: String,
    pub state: String,
    pub message: String,
    /// Per target cluster, the hosts written there because of it.
    pub clusters: BTreeMap<String, BTreeSet<String>>,
}

/// The view of `identity`, or None when nothing is known of it.
pub fn identity_view(desired: &DesiredState, identity: &str) -> Option<IdentityView> {
    let out = desired.identity(identity)?;
    let mut hosts = BTreeSet::new();
    let mut target_clusters: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (cluster, obj) in &out.objects {
        if let DesiredObject::ServiceEntry(se) = &obj.object {
            hosts.extend(se.spec.hosts.iter().cloned());
        }
        target_clusters.entry(cluster.to_string()).or_default().push(obj.key.to_string());
    }
    let policies = out
        .reports
        .iter()
        .map(|r| {
            let (state, why) = r.state.describe();
            let message = if why.is_empty() { r.message.clone() } else { why };
            PolicyView {
                kind: r.kind.to_string(),
                object: r.at.to_string(),
                state: state.to_string(),
                message,
                clusters: r.clusters.clone(),
            }
        })
        .collect();
    Some(IdentityView {
        identity: identity.to_string(),
        hosts,
        source_clusters: out.sources.clone(),
        target_clusters,
        clients: out.clients.clone(),
        policies,
        diagnostics: out.diagnostics.iter().map(|d| d.to_string()).collect(),
    })
}
