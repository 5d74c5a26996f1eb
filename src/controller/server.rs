//! HTTP: health, metrics and the debug views of SPEC §7. Reads shared state; never calls an
//! API server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use super::metrics::Metrics;
use crate::compute::Engine;

/// What the runtime publishes for the server.
pub struct Shared {
    pub engine: RwLock<Engine>,
    pub view: RwLock<View>,
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn new(engine: Engine, metrics: Arc<Metrics>) -> Self {
        Shared { engine: RwLock::new(engine), view: RwLock::default(), ready: AtomicBool::new(false), metrics }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    pub ready: bool,
    pub leader: bool,
    pub clusters: BTreeMap<String, ClusterView>,
    pub registration_problems: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub state: String,
    pub secret: String,
    pub region: Option<String>,
    pub gateway: Option<String>,
    pub last_error: Option<String>,
    pub desired_objects: usize,
    /// Objects we want whose name someone else's object holds.
    pub conflicts: Vec<String>,
    /// Kinds whose first list has not completed.
    pub unlisted: Vec<String>,
}

pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/clusters", get(clusters))
        .route("/debug/clusters/{id}/desired", get(desired))
        .route("/debug/identities/{id}", get(identity))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: members are still being listed (see /debug/clusters)\n")
            .into_response()
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let body = s.metrics.encode();
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

async fn clusters(State(s): State<Arc<Shared>>) -> Response {
    let view = s.view.read().unwrap_or_else(|e| e.into_inner()).clone();
    axum::Json(view).into_response()
}

async fn desired(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let engine = s.engine.read().unwrap_or_else(|e| e.into_inner());
    if !engine.fleet.clusters.contains_key(&id) {
        return (StatusCode::NOT_FOUND, format!("no member {id:?}\n")).into_response();
    }
    let objects: Vec<_> = engine.desired.cluster(&id).collect();
    axum::Json(serde_json::json!({ "cluster": id, "objects": objects })).into_response()
}

/// Hosts, source and target clusters, the winning policies and why, and diagnostics.
async fn identity(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let engine = s.engine.read().unwrap_or_else(|e| e.into_inner());
    let output = engine.desired.identity(&id);
    let sources: BTreeSet<&str> = engine.fleet.clusters_running(&id);
    if output.is_none() && sources.is_empty() {
        return (StatusCode::NOT_FOUND, format!("no identity {id:?}\n")).into_response();
    }
    let mut hosts: BTreeSet<String> = BTreeSet::new();
    let mut targets: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut policies = Vec::new();
    let mut diagnostics = Vec::new();
    if let Some(out) = output {
        for (cluster, obj) in &out.objects {
            if let crate::compute::DesiredObject::ServiceEntry(se) = &obj.object {
                hosts.extend(se.spec.hosts.iter().cloned());
            }
            targets.entry(cluster).or_default().push(obj.key.to_string());
        }
        for r in &out.reports {
            let state = match &r.state {
                crate::compute::PolicyState::Ready => "Ready".to_string(),
                crate::compute::PolicyState::Conflict(w) => format!("Conflict: {w} takes precedence"),
                crate::compute::PolicyState::Invalid(why) => format!("Invalid: {why}"),
                crate::compute::PolicyState::NotApplied(why) => format!("NotApplied: {why}"),
            };
            policies.push(serde_json::json!({
                "kind": format!("{:?}", r.kind),
                "object": r.at.to_string(),
                "state": state,
                "message": r.message,
                "clusters": r.clusters,
            }));
        }
        diagnostics = out.diagnostics.iter().map(|d| d.to_string()).collect();
    }
    let clients: BTreeSet<&str> = engine.fleet.clients_of(&id);
    axum::Json(serde_json::json!({
        "identity": id,
        "hosts": hosts,
        "sourceClusters": sources,
        "targetClusters": targets,
        "clients": clients,
        "policies": policies,
        "diagnostics": diagnostics,
    }))
    .into_response()
}
