//! The one place that writes to Kubernetes: server-side apply and prune of the objects a plan
//! names, policy status, the sync namespace, and, in the hub, the VIP store and Events on
//! registration Secrets.
//!
//! Each member has its own writer task, and the hub one more, so a slow or failing cluster never
//! delays another, and no write (with its retries) ever runs inside the runtime's loop; a
//! semaphore shared by all of them bounds the requests in flight across the fleet.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use super::deadline;
use super::lease::Fence;
use super::metrics::Metrics;
use super::{Input, WriteReport};
use crate::compute::plan::{ClusterPlan, ObservedObject, Planned};
use crate::compute::{DesiredObject, ObjectKey, vip};
use crate::crd::{ClientConnectionConfig, Dependency, GlobalTrafficPolicy, OutlierDetection, PolicyStatus};
use crate::istio::{DestinationRule, ServiceEntry, Sidecar, VirtualService};
use crate::meta::{HUB, Kind, LABEL_MANAGED_BY, MANAGER};

/// A write that failed, naming the object and the cluster.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("apply {key} in cluster {cluster}: {message}")]
    Apply { cluster: String, key: ObjectKey, message: String },
    #[error("delete {key} in cluster {cluster}: {message}")]
    Delete { cluster: String, key: ObjectKey, message: String },
    #[error("status of {kind} {namespace}/{name} in cluster {cluster}: {message}")]
    Status { cluster: String, kind: Kind, namespace: String, name: String, message: String },
    #[error("namespace {namespace} in cluster {cluster}: {message}")]
    Namespace { cluster: String, namespace: String, message: String },
    #[error("VIP store {namespace}/{name} in the hub: {message}")]
    VipStore { namespace: String, name: String, message: String },
    #[error("writes to cluster {cluster} stopped: this replica no longer leads")]
    NotLeading { cluster: String },
}

impl WriteError {
    /// The object this error is about, when it is about one object (retried alone).
    pub fn object(&self) -> Option<&ObjectKey> {
        match self {
            WriteError::Apply { key, .. } | WriteError::Delete { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Requests one writer keeps in flight within its member.
const PER_MEMBER_CONCURRENCY: usize = 4;

/// Everything to write into one cluster in one go.
#[derive(Debug, Default)]
pub struct WriteJob {
    pub plan: ClusterPlan,
    pub statuses: Vec<StatusWrite>,
    /// Create this namespace first if it does not exist (the sync namespace).
    pub ensure_namespace: Option<String>,
    /// When the oldest input change this job reflects was received (for the latency histogram).
    pub since: Option<Instant>,
    /// Hub only: new VIP allocations to add to the store.
    pub persist_vips: Option<VipStoreWrite>,
    /// Warning Events: on registration Secrets (the hub), on workloads whose claim on an
    /// identity is refused (members).
    pub events: Vec<WarningEvent>,
}

impl WriteJob {
    /// Nothing to write: no objects, statuses, VIPs or Events.
    pub fn is_empty(&self) -> bool {
        self.plan.is_empty() && self.statuses.is_empty() && self.persist_vips.is_none() && self.events.is_empty()
    }
}

#[derive(Clone, Debug)]
pub struct VipStoreWrite {
    pub namespace: String,
    /// The store's first ConfigMap (`compute::vip::shard_name`).
    pub name: String,
    pub shard_entries: usize,
    pub new: BTreeMap<String, Ipv4Addr>,
    /// Entries to mark unused, unmark or release.
    pub edits: BTreeMap<String, vip::Edit>,
}

/// A problem with an object, published as a Warning Event on it.
#[derive(Clone, Debug)]
pub struct WarningEvent {
    pub object: ObjectReference,
    pub reason: String,
    pub note: String,
    /// What flotilla was doing: `Register`, `Federate`.
    pub action: &'static str,
}

#[derive(Clone, Debug)]
pub struct StatusWrite {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub status: PolicyStatus,
}

/// Runs one cluster's writes, job after job, and reports each job's outcome to the runtime. The
/// hub's writer (cluster `HUB`) also keeps the VIP store; every writer publishes its cluster's
/// Events with `recorder`.
///
/// Every job runs under `fence`: when this replica may no longer write, the job is dropped where
/// it stands (requests under way are cancelled, none is started) and reported as not written.
#[allow(clippy::too_many_arguments)]
pub async fn run_writer(
    cluster: String,
    epoch: u64,
    client: Client,
    recorder: Option<Recorder>,
    mut jobs: UnboundedReceiver<WriteJob>,
    done: UnboundedSender<Input>,
    limit: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    mut fence: Fence,
) {
    while let Some(job) = jobs.recv().await {
        let work = run_job(&cluster, &client, recorder.as_ref(), job, &limit, &metrics);
        let report = tokio::select! {
            biased;
            _ = fence.lost() => {
                tracing::warn!(cluster, "leadership lost: the write job under way is cancelled");
                WriteReport { errors: vec![WriteError::NotLeading { cluster: cluster.clone() }], ..Default::default() }
            }
            report = work => report,
        };
        if done.send(Input::WriteDone { cluster: cluster.clone(), epoch, report }).is_err() {
            return;
        }
    }
}

async fn run_job(
    cluster: &str,
    client: &Client,
    recorder: Option<&Recorder>,
    mut job: WriteJob,
    limit: &Semaphore,
    metrics: &Metrics,
) -> WriteReport {
    let mut hub_report = WriteReport::default();
    if let Some(write) = job.persist_vips.take() {
        let _permit = limit.acquire().await;
        tracing::debug!(cluster, "write request");
        let persisted = within_deadline(persist_vips(client, &write, metrics)).await;
        match persisted.and_then(|r| r) {
            Ok(store) => hub_report.vip_store = Some(store),
            Err(message) => hub_report.errors.push(WriteError::VipStore {
                namespace: write.namespace.clone(),
                name: write.name.clone(),
                message,
            }),
        }
    }
    let events = std::mem::take(&mut job.events);
    let mut report = execute(cluster, client, job, limit, metrics).await;
    // Events after the objects: they tell, they do not hold back a write.
    if let Some(recorder) = recorder {
        for event in events {
            let _permit = limit.acquire().await;
            if within_deadline(publish_warning(cluster, recorder, event, metrics)).await.is_err() {
                tracing::warn!(cluster, "could not publish an Event: no answer in time");
            }
        }
    }
    report.vip_store = hub_report.vip_store;
    report.errors.extend(hub_report.errors);
    report
}

/// Runs one write (with its fallbacks) within `deadline::REQUEST`; the error says it timed out.
async fn within_deadline<T>(write: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(deadline::REQUEST, write).await.map_err(|_| unanswered())
}

fn unanswered() -> String {
    format!("no answer within {}s", deadline::REQUEST.as_secs())
}

enum Outcome {
    Applied(Box<ObservedObject>),
    Pruned(ObjectKey),
    Status(StatusWrite),
    Failed(WriteError),
}

async fn execute(cluster: &str, client: &Client, job: WriteJob, limit: &Semaphore, metrics: &Metrics) -> WriteReport {
    let mut report = WriteReport::default();
    if let Some(ns) = &job.ensure_namespace {
        let _permit = limit.acquire().await;
        tracing::debug!(cluster, "write request");
        match within_deadline(ensure_namespace(client, ns, cluster, metrics)).await.and_then(|r| r) {
            Ok(()) => report.namespace_ready = true,
            Err(message) => {
                // Without the namespace no ServiceEntry or DestinationRule can land; Sidecars,
                // prunes and statuses still can.
                report.errors.push(WriteError::Namespace {
                    cluster: cluster.to_string(),
                    namespace: ns.clone(),
                    message,
                });
            }
        }
    }
    let namespace_missing = job.ensure_namespace.is_some() && !report.namespace_ready;
    let mut ops = Vec::new();
    for obj in job.plan.apply {
        if namespace_missing && obj.key.kind != Kind::Sidecar {
            continue;
        }
        ops.push(Op::Apply(obj));
    }
    ops.extend(job.plan.prune.into_iter().map(Op::Prune));
    ops.extend(job.statuses.into_iter().map(Op::Status));

    let outcomes: Vec<Outcome> = stream::iter(ops)
        .map(|op| async move {
            let _permit = limit.acquire().await;
            let timed_out = op.failed(cluster, unanswered());
            let outcome = tokio::time::timeout(deadline::REQUEST, run_op(cluster, client, op, metrics)).await;
            outcome.unwrap_or(Outcome::Failed(timed_out))
        })
        .buffer_unordered(PER_MEMBER_CONCURRENCY)
        .collect()
        .await;
    let mut wrote = false;
    for outcome in outcomes {
        match outcome {
            Outcome::Applied(o) => {
                wrote = true;
                report.applied.push(*o);
            }
            Outcome::Pruned(k) => {
                wrote = true;
                report.pruned.push(k);
            }
            Outcome::Status(s) => report.statuses.push(s),
            Outcome::Failed(e) => report.errors.push(e),
        }
    }
    if wrote && let Some(since) = job.since {
        metrics.change_to_write.observe(since.elapsed().as_secs_f64());
    }
    report.errors.sort_by_key(|e| e.to_string());
    report
}

enum Op {
    Apply(Planned),
    Prune(ObservedObject),
    Status(StatusWrite),
}

impl Op {
    /// This operation failed with `message`, naming its object.
    fn failed(&self, cluster: &str, message: String) -> WriteError {
        let cluster = cluster.to_string();
        match self {
            Op::Apply(p) => WriteError::Apply { cluster, key: p.key.clone(), message },
            Op::Prune(seen) => WriteError::Delete { cluster, key: seen.key.clone(), message },
            Op::Status(s) => WriteError::Status {
                cluster,
                kind: s.kind,
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                message,
            },
        }
    }
}

async fn run_op(cluster: &str, client: &Client, op: Op, metrics: &Metrics) -> Outcome {
    // The soak reads these lines to show that no two replicas wrote at once.
    tracing::debug!(cluster, "write request");
    match op {
        Op::Apply(planned) => {
            let key = &planned.key;
            let result = match &planned.object() {
                DesiredObject::ServiceEntry(o) => apply(client, &planned, o, DesiredObject::ServiceEntry).await,
                DesiredObject::DestinationRule(o) => apply(client, &planned, o, DesiredObject::DestinationRule).await,
                DesiredObject::Sidecar(o) => apply(client, &planned, o, DesiredObject::Sidecar).await,
                DesiredObject::VirtualService(o) => apply(client, &planned, o, DesiredObject::VirtualService).await,
            };
            let op = if planned.adopts { "adopt" } else { "apply" };
            metrics.write(cluster, op, &key.kind.to_string(), result.is_ok());
            if planned.adopts && result.is_ok() {
                tracing::info!(cluster, object = %key, "taken over from Admiral in place");
            }
            let failed = |message: String| {
                Outcome::Failed(WriteError::Apply { cluster: cluster.into(), key: key.clone(), message })
            };
            match result {
                Ok(Applied::TakenMeanwhile) => {
                    failed("created by someone else since it was planned; left alone".into())
                }
                Ok(Applied::Written(o)) if o.digest == planned.digest => Outcome::Applied(Box::new(o)),
                // Still not what we want after a replace: reported, and retried with backoff.
                Ok(Applied::Written(_)) => {
                    failed("the API server keeps content flotilla did not write (after an apply and a replace)".into())
                }
                Err(kube::Error::Api(s)) if s.code == 409 && planned.replaces.is_none() => {
                    failed("created by someone else since it was planned; left alone".into())
                }
                Err(kube::Error::Api(s)) if s.code == 409 => failed("changed since it was seen; planned again".into()),
                Err(e) => failed(short(&e)),
            }
        }
        Op::Prune(seen) => {
            let key = seen.key.clone();
            let result = match key.kind {
                Kind::ServiceEntry => delete::<ServiceEntry>(client, &seen).await,
                Kind::DestinationRule => delete::<DestinationRule>(client, &seen).await,
                Kind::Sidecar => delete::<Sidecar>(client, &seen).await,
                Kind::VirtualService => delete::<VirtualService>(client, &seen).await,
                other => unreachable!("plans prune only the kinds flotilla writes, not {other}"),
            };
            metrics.write(cluster, "delete", &key.kind.to_string(), result.is_ok());
            match result {
                Ok(()) => Outcome::Pruned(key),
                Err(e) => Outcome::Failed(WriteError::Delete { cluster: cluster.into(), key, message: short(&e) }),
            }
        }
        Op::Status(s) => {
            let result = match s.kind {
                Kind::GlobalTrafficPolicy => patch_status::<GlobalTrafficPolicy>(client, &s).await,
                Kind::Dependency => patch_status::<Dependency>(client, &s).await,
                Kind::OutlierDetection => patch_status::<OutlierDetection>(client, &s).await,
                Kind::ClientConnectionConfig => patch_status::<ClientConnectionConfig>(client, &s).await,
                other => unreachable!("only policies carry a status flotilla writes, not {other}"),
            };
            metrics.write(cluster, "status", &s.kind.to_string(), result.is_ok());
            match result {
                Ok(()) => Outcome::Status(s),
                Err(e) => Outcome::Failed(WriteError::Status {
                    cluster: cluster.into(),
                    kind: s.kind,
                    namespace: s.namespace,
                    name: s.name,
                    message: short(&e),
                }),
            }
        }
    }
}

fn short(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// What an apply left in the member.
enum Applied {
    /// Our object, as the member now holds it.
    Written(ObservedObject),
    /// Someone else created an object with this name since the plan saw none: left as it was.
    TakenMeanwhile,
}

/// Writes `obj` only over what was planned, by server-side apply as field manager `flotilla`
/// (one write path: create, change and shrink alike, so dropping a field from our object
/// removes it). When the plan saw nothing, the apply is not forced: an object someone else
/// created meanwhile with other values conflicts (409) and is left alone; one with exactly our
/// values would merge, so when the answer shows another field manager, flotilla withdraws at once
/// (an empty apply takes back only the labels it alone set) and leaves it alone. When the plan saw
/// our object, the apply is forced, on condition that the object is still the version seen (a
/// 409 if it changed hands). When someone else has written into one of our objects, fields it
/// added that server-side apply cannot take back stay (an extra ServiceEntry port: the list is
/// keyed by name); then the object is replaced whole, once, from the version just written.
async fn apply<K>(
    client: &Client,
    planned: &Planned,
    obj: &K,
    wrap: impl Fn(K) -> DesiredObject,
) -> Result<Applied, kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let key = &planned.key;
    let api = Api::<K>::namespaced(client.clone(), key.namespace);
    let pp = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    let replace = |resource_version: Option<String>| {
        let mut whole = obj.clone();
        whole.meta_mut().resource_version = resource_version;
        // Admiral's mark stays on what flotilla took over from it: a rollback relies on it.
        if planned.admirals_mark {
            let mark = (crate::meta::ANNOTATION_CREATED_BY.to_string(), crate::meta::ADMIRAL.to_string());
            whole.meta_mut().annotations.get_or_insert_with(Default::default).extend([mark]);
        }
        let (api, pp) = (api.clone(), pp.clone());
        async move { api.replace(&key.name, &pp, &whole).await }
    };
    let written = match &planned.replaces {
        None => {
            let created = api.patch(&key.name, &PatchParams::apply(MANAGER), &Patch::Apply(obj)).await?;
            if has_other_manager(created.meta()) {
                let withdraw = serde_json::json!({
                    "apiVersion": K::api_version(&()),
                    "kind": K::kind(&()),
                    "metadata": { "name": &*key.name, "namespace": key.namespace },
                });
                api.patch(&key.name, &PatchParams::apply(MANAGER), &Patch::Apply(&withdraw)).await?;
                return Ok(Applied::TakenMeanwhile);
            }
            created
        }
        Some(seen) => {
            let mut conditional = obj.clone();
            conditional.meta_mut().resource_version = Some(seen.clone());
            // Force: these objects carry our label (or are Admiral's, being taken over), so every
            // field we set is ours to set.
            match api.patch(&key.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&conditional)).await {
                Ok(written) => written,
                // Merged with what another manager (or a create or replace of an earlier
                // version) still owns, the object would be invalid (two ports with one number):
                // replace it.
                Err(kube::Error::Api(s)) if s.code == 422 => {
                    let replaced = replace(Some(seen.clone())).await?;
                    return Ok(Applied::Written(ObservedObject::new(&wrap(replaced))));
                }
                Err(e) => return Err(e),
            }
        }
    };
    let observed = ObservedObject::new(&wrap(written.clone()));
    if observed.digest == planned.digest {
        return Ok(Applied::Written(observed));
    }
    let replaced = replace(written.meta().resource_version.clone()).await?;
    Ok(Applied::Written(ObservedObject::new(&wrap(replaced))))
}

/// Whether a field manager other than flotilla has a say in the object: one that flotilla's apply
/// has just created has none.
fn has_other_manager(meta: &ObjectMeta) -> bool {
    meta.managed_fields.iter().flatten().any(|m| m.manager.as_deref() != Some(MANAGER))
}

/// Deletes one of our objects, on condition that it is still the version seen (so an object
/// that changed hands meanwhile is never deleted).
async fn delete<K>(client: &Client, seen: &ObservedObject) -> Result<(), kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    let api = Api::<K>::namespaced(client.clone(), seen.key.namespace);
    let preconditions =
        seen.resource_version.clone().map(|rv| kube::api::Preconditions { resource_version: Some(rv), uid: None });
    let dp = DeleteParams { preconditions, ..Default::default() };
    match api.delete(&seen.key.name, &dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn patch_status<K>(client: &Client, s: &StatusWrite) -> Result<(), kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    let api = Api::<K>::namespaced(client.clone(), &s.namespace);
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": s.status,
    });
    match api.patch_status(&s.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await {
        Ok(_) => Ok(()),
        // The policy was deleted meanwhile: nothing to report on.
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates the namespace, labelled as ours, unless it exists (it may be the member chart's).
async fn ensure_namespace(client: &Client, name: &str, cluster: &str, metrics: &Metrics) -> Result<(), String> {
    let api = Api::<Namespace>::all(client.clone());
    match api.get_opt(name).await {
        Ok(Some(_)) => return Ok(()),
        Ok(None) => {}
        Err(e) => return Err(short(&e)),
    }
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some([(LABEL_MANAGED_BY.to_string(), MANAGER.to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let result = api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &ns).await;
    metrics.write(cluster, "create", "Namespace", result.is_ok());
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(short(&e)),
    }
}

/// Adds new host → address allocations to the hub's VIP store, a ConfigMap per
/// `shard_entries` hosts (`vip::place` says where each goes), with optimistic concurrency.
/// Returns the store's contents after the write. An allocation the store already holds with a
/// different address is not overwritten: the caller must adopt the store's view.
async fn persist_vips(
    client: &Client,
    write: &VipStoreWrite,
    metrics: &Metrics,
) -> Result<BTreeMap<String, Ipv4Addr>, String> {
    let (namespace, base) = (write.namespace.as_str(), write.name.as_str());
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let mut last_error = String::new();
    for _attempt in 0..5 {
        // The namespace is flotilla's own: few ConfigMaps; the shards are picked by name (the
        // first may predate flotilla's labels).
        let listed = api.list(&Default::default()).await.map_err(|e| short(&e))?;
        let shards: BTreeMap<usize, ConfigMap> = listed
            .items
            .into_iter()
            .filter_map(|cm| Some((vip::shard_index(base, cm.metadata.name.as_deref()?)?, cm)))
            .collect();
        let held: BTreeMap<usize, BTreeMap<String, String>> =
            shards.iter().map(|(i, cm)| (*i, cm.data.clone().unwrap_or_default())).collect();
        let placed = vip::place(&held, &write.new, &write.edits, write.shard_entries);
        for (host, ip) in &write.new {
            let unreadable =
                |data: &BTreeMap<String, String>| data.get(host).is_some_and(|v| vip::parse_entry(v).is_none());
            if held.values().any(unreadable) {
                // A hand edit gone wrong held no address a client could have resolved.
                tracing::warn!(host = %host, address = %ip, "VIP store entry is not an address; repairing it");
            }
        }
        let mut conflicted = false;
        for (index, data) in placed.writes {
            let name = vip::shard_name(base, index);
            let pp = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
            // replace() sends the resourceVersion read: a concurrent writer makes it fail with 409.
            let result = match shards.get(&index) {
                Some(current) => {
                    let mut cm = current.clone();
                    cm.data = Some(data);
                    api.replace(&name, &pp, &cm).await
                }
                None => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            namespace: Some(namespace.to_string()),
                            labels: Some([(LABEL_MANAGED_BY.to_string(), MANAGER.to_string())].into()),
                            ..Default::default()
                        },
                        data: Some(data),
                        ..Default::default()
                    };
                    api.create(&pp, &cm).await
                }
            };
            metrics.write(HUB, "update", "ConfigMap", result.is_ok());
            match result {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    last_error = format!("{name}: {}", s.message);
                    conflicted = true;
                    break;
                }
                Err(e) => return Err(format!("{name}: {}", short(&e))),
            }
        }
        if !conflicted {
            return Ok(placed.stored);
        }
    }
    Err(format!("still conflicting after 5 attempts: {last_error}"))
}

/// A Warning Event (a refused kubeconfig, a claimed cluster id, a refused claim on an identity).
/// Not being able to publish it is logged, not retried: the problem stays in /debug and the
/// metrics.
async fn publish_warning(cluster: &str, recorder: &Recorder, event: WarningEvent, metrics: &Metrics) {
    let published = Event {
        type_: EventType::Warning,
        reason: event.reason,
        note: Some(event.note),
        action: event.action.to_string(),
        secondary: None,
    };
    let result = recorder.publish(&published, &event.object).await;
    metrics.write(cluster, "create", "Event", result.is_ok());
    if let Err(e) = result {
        tracing::warn!(cluster, error = %short(&e), "could not publish an Event");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::compute::Desired;
    use crate::compute::plan::ClusterPlan;
    use crate::controller::lease::Fence;
    use crate::istio::Sidecar;

    /// A member whose API server accepts every request and never answers.
    fn silent_member() -> Client {
        let service = tower::service_fn(|_request: http::Request<kube::client::Body>| {
            std::future::pending::<Result<http::Response<kube::client::Body>, std::convert::Infallible>>()
        });
        Client::new(service, "default")
    }

    fn one_apply() -> WriteJob {
        let mut sidecar = Sidecar::default();
        sidecar.metadata.name = Some("caller-egress".into());
        sidecar.metadata.namespace = Some("caller".into());
        let desired = Arc::new(Desired::from_object(DesiredObject::Sidecar(sidecar)));
        WriteJob {
            plan: ClusterPlan {
                apply: vec![Planned { desired, replaces: None, adopts: false, admirals_mark: false }],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    async fn report(done: &mut tokio::sync::mpsc::UnboundedReceiver<Input>) -> WriteReport {
        match done.recv().await {
            Some(Input::WriteDone { report, .. }) => report,
            other => panic!("expected a report, got {other:?}"),
        }
    }

    /// Requests a member was asked: method, URI, body.
    type Asked = Arc<std::sync::Mutex<Vec<(String, String, serde_json::Value)>>>;

    /// A member that answers every request with `answer`, and records what it was asked.
    fn recording_member(answer: serde_json::Value) -> (Client, Asked) {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = asked.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let (record, answer) = (record.clone(), answer.clone());
            async move {
                let method = request.method().to_string();
                let uri = request.uri().to_string();
                let body = request.into_body().collect_bytes().await.expect("a body");
                let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                record.lock().unwrap().push((method, uri, body));
                let response = http::Response::new(kube::client::Body::from(answer.to_string().into_bytes()));
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        (Client::new(service, "default"), asked)
    }

    #[tokio::test]
    async fn an_object_created_meanwhile_with_our_values_is_given_back_untouched() {
        // The member already holds caller-egress, created by someone else with exactly our
        // values: the unforced apply merges instead of conflicting, and its answer shows the
        // other field manager.
        let theirs = serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
            "metadata": { "name": "caller-egress", "namespace": "caller", "resourceVersion": "7",
                "managedFields": [
                    { "manager": "kubectl-create", "operation": "Update" },
                    { "manager": MANAGER, "operation": "Apply" },
                ] },
            "spec": {},
        });
        let (client, asked) = recording_member(theirs);
        let (jobs, jobs_rx) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
        let (fence_tx, fence) = Fence::new();
        fence_tx.send_replace(Some(Instant::now() + Duration::from_secs(3600)));
        let limit = Arc::new(Semaphore::new(4));
        let metrics = Arc::new(Metrics::default());
        tokio::spawn(run_writer("m".into(), 1, client, None, jobs_rx, done_tx, limit, metrics, fence));
        jobs.send(one_apply()).unwrap();
        let report = report(&mut done).await;

        assert!(report.applied.is_empty());
        let error = report.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        assert!(error.contains("Sidecar caller/caller-egress") && error.contains("created by someone else"), "{error}");
        let asked = asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 2, "one create by apply, one withdrawal: {asked:?}");
        for (method, uri, _) in &asked {
            assert_eq!(method, "PATCH");
            assert!(uri.contains("fieldManager=flotilla") && !uri.contains("force=true"), "{uri}");
        }
        let withdrawal = &asked[1].2;
        assert!(withdrawal.get("spec").is_none(), "the withdrawal sets nothing: {withdrawal}");
        assert!(withdrawal["metadata"].get("labels").is_none(), "{withdrawal}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_member_costs_a_job_its_deadline_and_a_closed_fence_cancels_it() {
        let (jobs, jobs_rx) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
        let (fence_tx, fence) = Fence::new();
        fence_tx.send_replace(Some(Instant::now() + Duration::from_secs(3600)));
        let limit = Arc::new(Semaphore::new(1));
        let writer = run_writer(
            "m".into(),
            1,
            silent_member(),
            None,
            jobs_rx,
            done_tx,
            limit.clone(),
            Arc::new(Metrics::default()),
            fence,
        );
        tokio::spawn(writer);

        let started = Instant::now();
        jobs.send(one_apply()).unwrap();
        let first = report(&mut done).await;
        assert_eq!(started.elapsed(), deadline::REQUEST, "given up at its deadline, not later");
        assert_eq!(first.errors.len(), 1);
        let error = first.errors[0].to_string();
        assert!(error.contains("Sidecar caller/caller-egress") && error.contains("no answer within"), "{error}");
        assert_eq!(limit.available_permits(), 1, "the permit is back");

        // The lease runs out while the next job waits for an answer: it is cancelled then.
        fence_tx.send_replace(Some(Instant::now() + Duration::from_secs(2)));
        let started = Instant::now();
        jobs.send(one_apply()).unwrap();
        let second = report(&mut done).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert!(matches!(second.errors.as_slice(), [WriteError::NotLeading { .. }]), "{:?}", second.errors);
        assert!(second.applied.is_empty());
        assert_eq!(limit.available_permits(), 1, "the cancelled request gave its permit back");
    }
}
