//! Admiral's read API (`admiral/pkg/apis/admiral/routes`), for the dashboards and scripts that
//! call it: the same paths and JSON shapes, read from the state the runtime published after its
//! last pass, behind the same authorisation as `/debug`. Lists are sorted (Admiral's follow Go's
//! map order), and an identity's ServiceEntries are those of that identity (Admiral returns every
//! host that contains the identity as a substring).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use serde_json::json;

use super::server::Shared;
use crate::compute::DesiredSpec;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/clusters", get(clusters))
        .route("/cluster/{id}/serviceentries", get(cluster_service_entries))
        .route("/identity/{id}/serviceentries", get(identity_service_entries))
        .route("/identity/{id}/globaltrafficpolicy", get(global_traffic_policy))
}

/// The members' ids (not those whose registration failed: Admiral lists the clusters it
/// watches); a JSON string when there are none, as Admiral answers.
async fn clusters(State(s): State<Arc<Shared>>) -> Response {
    let published = s.published();
    let ids: Vec<&String> =
        published.view.clusters.iter().filter(|(_, c)| c.state != "failed").map(|(id, _)| id).collect();
    if ids.is_empty() {
        return axum::Json("No cluster is monitored by flotilla").into_response();
    }
    axum::Json(ids).into_response()
}

/// Every ServiceEntry flotilla wants in the member, as whole objects (what it writes there; one
/// held by a conflict is listed though it is not written).
async fn cluster_service_entries(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let published = s.published();
    let id = id.trim().to_string();
    // As `/clusters`: a registration that failed is no cluster flotilla monitors.
    if published.view.clusters.get(&id).is_none_or(|c| c.state == "failed") {
        return (StatusCode::NOT_FOUND, format!("flotilla is not monitoring cluster {id}\n")).into_response();
    }
    let desired = published.desired.cluster(&id);
    let entries: Vec<&crate::compute::Desired> =
        desired.iter().map(|d| &**d).filter(|d| matches!(d.spec, DesiredSpec::ServiceEntry(_))).collect();
    if entries.is_empty() {
        return (StatusCode::OK, format!("no service entries configured for cluster - {id}")).into_response();
    }
    axum::Json(entries).into_response()
}

/// One host of an identity and the members its ServiceEntry is written to (Admiral's
/// `IdentityServiceEntry`).
#[derive(Serialize)]
struct IdentityServiceEntry {
    #[serde(rename = "Cname")]
    cname: String,
    #[serde(rename = "Clusters")]
    clusters: BTreeSet<String>,
}

async fn identity_service_entries(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let published = s.published();
    let mut by_host: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for placed in published.desired.identity(id.trim()).map_or(&[][..], |o| &o.objects[..]) {
        let DesiredSpec::ServiceEntry(se) = &placed.desired.spec else { continue };
        let Some(host) = se.hosts.first() else { continue };
        let clusters = placed.clusters.iter().map(|c| published.desired.cluster_name(*c).to_string());
        by_host.entry(host.clone()).or_default().extend(clusters);
    }
    let entries: Vec<IdentityServiceEntry> =
        by_host.into_iter().map(|(cname, clusters)| IdentityServiceEntry { cname, clusters }).collect();
    axum::Json(entries).into_response()
}

/// The GlobalTrafficPolicy in force for the identity in `?env=` (default `default`), as an
/// object; 404 with `{"error": …}` when there is none, as Admiral answers.
async fn global_traffic_policy(State(s): State<Arc<Shared>>, Path(id): Path<String>, uri: Uri) -> Response {
    let env = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("env="))
        .filter(|e| !e.is_empty())
        .unwrap_or("default");
    let published = s.published();
    let found = published.desired.identity(&id).and_then(|o| o.gtps.iter().find(|g| g.env == env));
    match found {
        Some(gtp) => axum::Json(json!({
            "apiVersion": "admiral.io/v1alpha1",
            "kind": "GlobalTrafficPolicy",
            "metadata": {
                "name": gtp.at.name,
                "namespace": gtp.at.namespace,
                "generation": gtp.generation,
                "annotations": {"flotilla.io/cluster": gtp.at.cluster},
            },
            "spec": gtp.spec,
        }))
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({
                "error": format!("globaltraffic policy with identity: {id} and env: {env} was not found")
            })),
        )
            .into_response(),
    }
}
