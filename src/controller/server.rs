//! HTTP: health, metrics and the debug views of SPEC §7. Reads the snapshot the runtime
//! published after its last pass; never waits for a pass, never calls an API server.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use super::metrics::Metrics;
use crate::compute::DesiredState;
use crate::compute::explain::identity_view;

/// What the runtime shares with the server.
pub struct Shared {
    /// Replaced whole after every pass; the lock is held only to swap or clone the `Arc`.
    published: RwLock<Arc<Published>>,
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
}

/// The state after a pass, as the debug views show it.
#[derive(Debug, Default)]
pub struct Published {
    pub view: View,
    pub desired: DesiredState,
}

impl Shared {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Shared { published: RwLock::default(), ready: AtomicBool::new(false), metrics }
    }

    pub fn publish(&self, published: Published) {
        *self.published.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(published);
    }

    pub fn published(&self) -> Arc<Published> {
        self.published.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    pub ready: bool,
    pub leader: bool,
    /// This replica leads, every synced member holds exactly what is desired (its last plan was
    /// empty, nothing is pending or in flight), and every status and VIP is written.
    pub converged: bool,
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
    /// Synced, and holds exactly what is desired.
    pub converged: bool,
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
    axum::Json(&s.published().view).into_response()
}

async fn desired(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let published = s.published();
    if !published.view.clusters.contains_key(&id) {
        return (StatusCode::NOT_FOUND, format!("no member {id:?}\n")).into_response();
    }
    let objects: Vec<_> = published.desired.cluster(&id).collect();
    axum::Json(serde_json::json!({ "cluster": id, "objects": objects })).into_response()
}

/// Hosts, source and target clusters, the winning policies and why, and diagnostics.
async fn identity(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match identity_view(&s.published().desired, &id) {
        Some(view) => axum::Json(view).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no identity {id:?}\n")).into_response(),
    }
}
