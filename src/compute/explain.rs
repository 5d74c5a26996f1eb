//! Why an identity's objects exist where they do: its hosts, where it runs, where its objects
//! are written, who depends on it, which policies won and why. One view, served by
//! `/debug/identities/{id}` and printed by `flotilla explain`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{DesiredSpec, DesiredState};

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
    for placed in &out.objects {
        if let DesiredSpec::ServiceEntry(se) = &placed.desired.spec {
            hosts.extend(se.hosts.iter().cloned());
        }
        for c in &placed.clusters {
            target_clusters
                .entry(desired.cluster_name(*c).to_string())
                .or_default()
                .push(placed.desired.key.to_string());
        }
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
                clusters: r.clusters.iter().map(|(c, hosts)| (c.clone(), (**hosts).clone())).collect(),
            }
        })
        .collect();
    Some(IdentityView {
        identity: identity.to_string(),
        hosts,
        source_clusters: out.sources.clone(),
        target_clusters,
        clients: out.clients.all(),
        policies,
        diagnostics: out.diagnostics.iter().map(|d| d.to_string()).collect(),
    })
}

/// Why one host is written where it is: the identity's view, and per member a reason a person
/// can check (a workload of the identity runs there; a client runs there, through which
/// Dependency).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostExplanation {
    pub host: String,
    pub identity: IdentityView,
    /// Members where the host's ServiceEntry is written, each with why.
    pub clusters: BTreeMap<String, Vec<String>>,
}

/// Explains `host` (optionally in one member only), or None when no identity writes it.
pub fn explain_host(engine: &super::Engine, host: &str, cluster: Option<&str>) -> Option<HostExplanation> {
    let host = host.to_ascii_lowercase();
    let (identity, _) = engine.desired.identities().find(|(_, out)| out.hosts.contains(&host))?;
    let view = identity_view(&engine.desired, identity)?;
    let fleet = &engine.fleet;
    let written: BTreeSet<String> = engine
        .desired
        .identity(identity)?
        .objects
        .iter()
        .filter(|p| matches!(&p.desired.spec, DesiredSpec::ServiceEntry(se) if se.hosts.contains(&host)))
        .flat_map(|p| p.clusters.iter().map(|c| engine.desired.cluster_name(*c).to_string()))
        .filter(|c| cluster.is_none_or(|want| c == want))
        .collect();
    let mut clusters = BTreeMap::new();
    for member in written {
        let mut why = Vec::new();
        // Its serving workloads here (`serving`), or any that call (a client's Jobs too).
        let runs = |id: &str, serving: bool| -> Vec<String> {
            fleet
                .workloads_of(id)
                .filter(|(c, w)| c.id == member && c.is_federated(w) && (w.kind.serves() || !serving))
                .map(|(_, w)| w.describe())
                .collect()
        };
        for w in runs(identity, true) {
            why.push(format!("source: {w} of {identity} runs here"));
        }
        for client in &view.clients {
            let places = runs(client, false);
            if places.is_empty() {
                continue;
            }
            let through: Vec<String> =
                fleet
                    .dependencies_of(client)
                    .filter(|d| d.invalid.is_none() && fleet.dependency_refusal(d).is_none())
                    .filter(|d| d.wildcard || d.destinations.contains(identity))
                    .map(|d| {
                        if d.wildcard {
                            format!("\"*\" in Dependency {}", d.at)
                        } else {
                            format!("Dependency {}", d.at)
                        }
                    })
                    .collect();
            why.push(format!(
                "client: {} of {client} runs here and depends on {identity} through {}",
                places.join(", "),
                through.join(" and ")
            ));
        }
        clusters.insert(member, why);
    }
    Some(HostExplanation { host, identity: view, clusters })
}

/// The explanation for people.
pub fn to_text(e: &HostExplanation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let v = &e.identity;
    let _ = writeln!(out, "host {} (identity {})", e.host, v.identity);
    let _ = writeln!(out, "  runs in: {}", list(&v.source_clusters));
    let _ = writeln!(out, "  clients: {}", list(&v.clients));
    for (member, why) in &e.clusters {
        let _ = writeln!(out, "  written in {member}:");
        for reason in why {
            let _ = writeln!(out, "    - {reason}");
        }
    }
    if !v.policies.is_empty() {
        let _ = writeln!(out, "  policies:");
        for p in &v.policies {
            let message = if p.message.is_empty() { String::new() } else { format!(" ({})", p.message) };
            let _ = writeln!(out, "    - {} {}: {}{message}", p.kind, p.object, p.state);
        }
    }
    for d in &v.diagnostics {
        let _ = writeln!(out, "  {d}");
    }
    out
}

fn list(items: &BTreeSet<String>) -> String {
    if items.is_empty() { "(none)".into() } else { items.iter().cloned().collect::<Vec<_>>().join(", ") }
}
