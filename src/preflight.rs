//! `flotilla preflight`: before a switch (from Admiral, or to new credentials), whether every
//! registered member's credentials allow everything flotilla does there, asked of the member's
//! own API server (a SelfSubjectAccessReview per verb and resource), and whether the sync
//! namespace exists. Admiral's remote ServiceAccount, for one, may not `patch`, write Sidecars or
//! read Dependencies: reused as it is, it would leave members failing writes.

use std::fmt::Write as _;

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::PostParams;
use kube::{Api, Client};
use serde::Serialize;

use crate::controller::deadline;
use crate::controller::registry::{check_kubeconfig, member_client, resolve_claims};
use crate::settings::{Settings, SidecarMode};
use crate::snapshot::SnapshotOptions;

/// One permission flotilla needs in a member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subresource: Option<&'static str>,
    /// None: in every namespace (or cluster-scoped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// What flotilla does with it.
    pub why: &'static str,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if let Some(sub) = self.subresource {
            write!(f, "/{sub}")?;
        }
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in {ns}"),
            None => write!(f, " (all namespaces)"),
        }
    }
}

/// Everything flotilla asks of a member's API server with `settings` (what the member chart
/// grants).
pub fn permissions(settings: &Settings) -> Vec<Permission> {
    let mut all = Vec::new();
    let mut add = |verbs: &[&'static str], group, resource, subresource, namespace: Option<&str>, why| {
        for verb in verbs {
            all.push(Permission { verb, group, resource, subresource, namespace: namespace.map(str::to_string), why });
        }
    };
    let watch = &["list", "watch"][..];
    add(watch, "apps", "deployments", None, None, "workloads");
    add(watch, "argoproj.io", "rollouts", None, None, "workloads (Argo Rollouts)");
    add(watch, "batch", "jobs", None, None, "clients that only call others (Jobs)");
    add(watch, "batch", "cronjobs", None, None, "clients that only call others (CronJobs)");
    add(watch, "", "services", None, None, "workloads' ports and the gateway's address");
    add(watch, "", "nodes", None, None, "the member's region");
    add(watch, "", "namespaces", None, None, "namespaces opted out, and the identities each may run");
    add(watch, "networking.istio.io", "virtualservices", None, None, "canary weights of Rollouts");
    add(watch, "networking.istio.io", "sidecars", None, None, "Sidecars of others that select a client");
    for policy in ["globaltrafficpolicies", "dependencies", "outlierdetections", "clientconnectionconfigs"] {
        add(watch, "admiral.io", policy, None, None, "policies");
        add(&["patch"], "admiral.io", policy, Some("status"), None, "policies' status");
    }
    let events = &["create", "patch"][..];
    add(events, "events.k8s.io", "events", None, None, "Warning Events on workloads whose identity claim is refused");
    let sync = Some(settings.sync_namespace.as_str());
    // A server-side apply that creates an object is authorised as `create`.
    let write = &["list", "watch", "create", "patch", "update", "delete"][..];
    add(write, "networking.istio.io", "serviceentries", None, sync, "ServiceEntries (server-side apply, prune)");
    add(write, "networking.istio.io", "destinationrules", None, sync, "DestinationRules (server-side apply, prune)");
    add(
        write,
        "networking.istio.io",
        "virtualservices",
        None,
        sync,
        "alias VirtualServices (server-side apply, prune)",
    );
    if settings.sidecar_mode == SidecarMode::Generate {
        add(
            &["create", "patch", "update", "delete"],
            "networking.istio.io",
            "sidecars",
            None,
            None,
            "clients' Sidecars",
        );
    }
    all
}

/// What preflight found in one member.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberCheck {
    pub cluster: String,
    /// Permissions asked and granted.
    pub granted: usize,
    pub missing: Vec<Permission>,
    /// The sync namespace exists (flotilla would otherwise have to create it).
    pub sync_namespace: Option<bool>,
    /// The member could not be asked: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MemberCheck {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.missing.is_empty() && self.sync_namespace == Some(true)
    }
}

/// Asks every member the hub registers; sorted by cluster id.
pub async fn preflight(hub: &Client, opts: &SnapshotOptions, settings: &Settings) -> anyhow::Result<Vec<MemberCheck>> {
    let secrets = crate::snapshot::registration_secrets(hub, opts).await?;
    let (claims, problems) = resolve_claims(&secrets);
    for p in problems {
        eprintln!("warning: {p}");
    }
    let wanted = permissions(settings);
    let checks = claims.iter().map(|(id, reg)| {
        let wanted = &wanted;
        async move {
            let mut check = MemberCheck { cluster: id.clone(), ..Default::default() };
            let client = match check_kubeconfig(&reg.kubeconfig, opts.kubeconfig_trust) {
                Ok(kc) => member_client(kc).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match client {
                Ok(client) => {
                    if let Err(e) = check_member(&client, wanted, &settings.sync_namespace, &mut check).await {
                        check.error = Some(e);
                    }
                }
                Err(e) => check.error = Some(e),
            }
            check
        }
    });
    let mut found: Vec<MemberCheck> = futures::future::join_all(checks).await;
    found.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    Ok(found)
}

/// Reviews in flight per member.
const REVIEWS_IN_FLIGHT: usize = 8;

async fn check_member(
    client: &Client,
    wanted: &[Permission],
    sync_namespace: &str,
    check: &mut MemberCheck,
) -> Result<(), String> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    // The first review that fails ends the member's check (the rest are dropped): a member that
    // does not answer costs one deadline, not one per permission.
    let answers: Vec<(Permission, bool)> = stream::iter(wanted.iter().cloned())
        .map(|p| {
            let reviews = reviews.clone();
            async move { within_deadline(allowed(&reviews, &p)).await.map(|allowed| (p, allowed)) }
        })
        .buffered(REVIEWS_IN_FLIGHT)
        .try_collect()
        .await?;
    for (permission, allowed) in answers {
        match allowed {
            true => check.granted += 1,
            false => check.missing.push(permission),
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let exists = within_deadline(async { namespaces.get_opt(sync_namespace).await.map_err(|e| e.to_string()) }).await;
    check.sync_namespace = Some(exists?.is_some());
    Ok(())
}

async fn within_deadline<T>(ask: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    let answer = tokio::time::timeout(deadline::REQUEST, ask).await;
    answer.unwrap_or_else(|_| Err(format!("no answer within {}s", deadline::REQUEST.as_secs())))
}

async fn allowed(reviews: &Api<SelfSubjectAccessReview>, p: &Permission) -> Result<bool, String> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(p.verb.to_string()),
                group: Some(p.group.to_string()),
                resource: Some(p.resource.to_string()),
                subresource: p.subresource.map(str::to_string),
                namespace: p.namespace.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = reviews.create(&PostParams::default(), &review).await.map_err(|e| crate::meta::error_chain(&e))?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// The report as text: one line per member, then what is missing, indented.
pub fn to_text(checks: &[MemberCheck], sync_namespace: &str) -> String {
    let mut out = String::new();
    let width = checks.iter().map(|c| c.cluster.len()).max().unwrap_or(0).max("CLUSTER".len());
    let _ = writeln!(out, "{:width$}  {:6}  DETAIL", "CLUSTER", "RESULT");
    for c in checks {
        let (result, detail) = match (&c.error, c.passed()) {
            (Some(e), _) => ("error", format!("not asked: {e}")),
            (None, true) => ("ok", format!("{} permissions granted, namespace {sync_namespace} present", c.granted)),
            (None, false) => {
                let mut parts = Vec::new();
                if !c.missing.is_empty() {
                    parts.push(format!("{} of {} permissions missing", c.missing.len(), c.granted + c.missing.len()));
                }
                if c.sync_namespace == Some(false) {
                    parts.push(format!("namespace {sync_namespace} missing (the member chart creates it)"));
                }
                ("FAIL", parts.join("; "))
            }
        };
        let _ = writeln!(out, "{:width$}  {result:6}  {detail}", c.cluster);
        for p in &c.missing {
            let _ = writeln!(out, "{:width$}    - {p}: {}", "", p.why);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_follow_the_settings_and_read_plainly() {
        let settings = Settings::default();
        let all = permissions(&settings);
        let shown: Vec<String> = all.iter().map(ToString::to_string).collect();
        assert!(shown.contains(&"patch serviceentries.networking.istio.io in admiral-sync".to_string()), "{shown:?}");
        assert!(shown.contains(&"patch globaltrafficpolicies/status.admiral.io (all namespaces)".to_string()));
        assert!(shown.contains(&"list services (all namespaces)".to_string()));
        assert!(shown.contains(&"delete sidecars.networking.istio.io (all namespaces)".to_string()));
        let off = Settings { sidecar_mode: SidecarMode::Off, ..Settings::default() };
        let without = permissions(&off);
        assert!(without.iter().all(|p| !(p.resource == "sidecars" && p.verb == "patch")));
        assert_eq!(all.len(), without.len() + 4);
    }

    #[test]
    fn the_report_names_what_is_missing_and_where() {
        let ok = MemberCheck { cluster: "m-1".into(), granted: 3, sync_namespace: Some(true), ..Default::default() };
        let missing = Permission {
            verb: "patch",
            group: "networking.istio.io",
            resource: "serviceentries",
            subresource: None,
            namespace: Some("admiral-sync".into()),
            why: "ServiceEntries",
        };
        let bad = MemberCheck {
            cluster: "m-2".into(),
            granted: 2,
            missing: vec![missing],
            sync_namespace: Some(false),
            error: None,
        };
        let down =
            MemberCheck { cluster: "m-3".into(), error: Some("connection refused".into()), ..Default::default() };
        let text = to_text(&[ok, bad, down], "admiral-sync");
        assert_eq!(
            text,
            "CLUSTER  RESULT  DETAIL\n\
             m-1      ok      3 permissions granted, namespace admiral-sync present\n\
             m-2      FAIL    1 of 3 permissions missing; namespace admiral-sync missing (the member chart creates it)\n\
             \x20          - patch serviceentries.networking.istio.io in admiral-sync: ServiceEntries\n\
             m-3      error   not asked: connection refused\n"
        );
    }
}
