//! HTTP: health, metrics, the debug views of SPEC §7 and Admiral's read API (`admiral_api`). Reads the snapshot the runtime
//! published after its last pass; never waits for a pass. The probes are plain and open; the
//! views are served over HTTPS to callers the hub's API authorises (`auth`), or, with
//! `--http-auth=none`, beside the probes to anyone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::task::JoinHandle;

use super::Options;
use super::auth::{Authorizer, Decision};
use super::metrics::Metrics;
use super::tls::TlsListener;
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
    /// With --dry-run: what flotilla would do in each member now.
    pub plans: BTreeMap<String, Arc<crate::compute::plan::PlanSummary>>,
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
    /// Started with --dry-run: computes and shows, writes nothing.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
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
    /// Admiral's objects under names flotilla does not write (with --adopt-from=admiral).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub admiral_leftovers: Vec<String>,
    /// Workloads claiming an identity their namespace may not run (refused with
    /// `--tenancy=owned`).
    pub disallowed_claims: usize,
    /// Nothing is written to it (`flotilla.io/paused` on its registration Secret).
    pub paused: bool,
    /// Its endpoints are withheld wherever another member serves (`flotilla.io/drain`).
    pub drained: bool,
    /// Prunes the blast-radius guard holds there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_prunes: Option<HeldPrunes>,
    /// Kinds whose first list has not completed.
    pub unlisted: Vec<String>,
    /// Synced, and holds exactly what is desired.
    pub converged: bool,
}

/// A hold of the blast-radius guard, as /debug shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldPrunes {
    /// What `flotilla.io/release-prunes` on the registration Secret must say to let them go.
    pub id: String,
    pub count: usize,
    /// The most prunes allowed within the window there.
    pub allowed: usize,
    /// The first few, by kind, namespace and name.
    pub first: Vec<String>,
}

fn probes() -> Router<Arc<Shared>> {
    Router::new().route("/livez", get(|| async { "ok\n" })).route("/readyz", get(readyz))
}

fn views() -> Router<Arc<Shared>> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/debug/clusters", get(clusters))
        .route("/debug/clusters/{id}/desired", get(desired))
        .route("/debug/clusters/{id}/plan", get(plan))
        .route("/debug/identities/{id}", get(identity))
        .merge(super::admiral_api::routes())
}

/// Binds the plain listener for the probes, and the HTTPS one for the views unless
/// authentication is off (then the plain one serves everything, and the log says so at every
/// start).
pub async fn start(hub: &kube::Client, opts: &Options, shared: &Arc<Shared>) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let plain = tokio::net::TcpListener::bind(opts.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("--http-addr {}: {e}", opts.http_addr))?;
    let Some(secure) = &opts.secure else {
        tracing::warn!(addr = %opts.http_addr, "AUTHENTICATION IS OFF (--http-auth=none): /metrics and /debug, which show the whole fleet's topology, are served over plain HTTP to anyone who can reach this address");
        return Ok(vec![tokio::spawn(serve_plain(plain, shared.clone(), true))]);
    };
    let tcp = tokio::net::TcpListener::bind(secure.addr)
        .await
        .map_err(|e| anyhow::anyhow!("--secure-addr {}: {e}", secure.addr))?;
    let tls = TlsListener::new(tcp, secure.certificate.clone())?;
    let authorizer = Arc::new(Authorizer::new(hub.clone(), secure.auth_cache_ttl, secure.auth_audiences.clone()));
    tracing::info!(probes = %opts.http_addr, secure = %secure.addr, "serving /livez and /readyz over HTTP; /metrics and /debug over HTTPS to callers the hub authorises");
    Ok(vec![
        tokio::spawn(serve_plain(plain, shared.clone(), false)),
        tokio::spawn(serve_secure(tls, shared.clone(), authorizer)),
    ])
}

/// The plain listener: the probes, and with `open_views` (no authentication) everything else.
pub async fn serve_plain(listener: tokio::net::TcpListener, shared: Arc<Shared>, open_views: bool) {
    let app = if open_views { probes().merge(views()) } else { probes() };
    if let Err(e) = axum::serve(listener, app.with_state(shared)).await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

/// The HTTPS listener: metrics and debug views, each request authorised first.
pub async fn serve_secure(listener: TlsListener, shared: Arc<Shared>, authorizer: Arc<Authorizer>) {
    let app = views().layer(axum::middleware::from_fn_with_state(authorizer, authorize)).with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "HTTPS server stopped");
    }
}

/// 401 without a token the hub accepts, 403 when its user may not `get` the path, 503 when the
/// hub cannot be asked (never a guess).
async fn authorize(State(authorizer): State<Arc<Authorizer>>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let path = request.uri().path().to_string();
    match authorizer.check(token, &path).await {
        Ok(Decision::Allowed) => next.run(request).await,
        Ok(Decision::Unauthenticated) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token the hub accepts is required\n",
        )
            .into_response(),
        Ok(Decision::Forbidden(user)) => {
            tracing::debug!(user = %user, path = %path, "request forbidden");
            (StatusCode::FORBIDDEN, format!("{user:?} may not get {path}\n")).into_response()
        }
        Err(e @ super::auth::AuthError::Throttled) => {
            tracing::debug!(error = %e, path = %path, "request not authorised: too many reviews");
            (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "1")], "too many new tokens; try again\n")
                .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, path = %path, "could not authorise a request");
            (StatusCode::SERVICE_UNAVAILABLE, "the hub could not be asked who may read this\n").into_response()
        }
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
    let desired = published.desired.cluster(&id);
    // Serialised as the whole objects they stand for.
    let objects: Vec<&crate::compute::Desired> = desired.iter().map(|d| &**d).collect();
    axum::Json(serde_json::json!({ "cluster": id, "objects": objects })).into_response()
}

/// With --dry-run, what flotilla would do in the member now.
async fn plan(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let published = s.published();
    if !published.view.clusters.contains_key(&id) {
        return (StatusCode::NOT_FOUND, format!("no member {id:?}\n")).into_response();
    }
    if !published.view.dry_run {
        return (StatusCode::NOT_FOUND, "plans are shown with --dry-run only (this replica writes them)\n")
            .into_response();
    }
    match published.plans.get(&id) {
        Some(plan) => axum::Json(serde_json::json!({ "cluster": id, "plan": &**plan })).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("member {id:?} is not planned yet (not listed, or not answering)\n"),
        )
            .into_response(),
    }
}

/// Hosts, source and target clusters, the winning policies and why, and diagnostics.
async fn identity(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match identity_view(&s.published().desired, &id) {
        Some(view) => axum::Json(view).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no identity {id:?}\n")).into_response(),
    }
}
