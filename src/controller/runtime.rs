//! The runtime: wiring from inputs to writes. It owns the engine (the model and the desired
//! state) and what is known of every member; watches and writers report to it over one channel.
//! Inputs are handled one at a time, and a burst of them is grouped into one pass (`debounce`):
//!
//! health → compute (on a blocking thread) → publish → VIPs to the hub → statuses → a plan per
//! member → the writers.
//!
//! The decisions live in small synchronous parts (`health`, `observed`, `dispatch`, `vips`,
//! `registry::plan_registry`, `plan::plan_member`); what remains here is the wiring between them
//! and the clients.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, Resource};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::debounce::{Debounce, Driven, drive};
use super::dispatch::WriterSlot;
use super::health::{MemberHealth, State};
use super::metrics::Metrics;
use super::observed::{Observed, StatusKey};
use super::registry::{
    Registration, RegistrationProblem, check_kubeconfig, member_client, plan_registry, resolve_claims,
};
use super::server::{ClusterView, Published, Shared, View};
use super::vips::{Adoption, VipStore};
use super::watch::{VipStoreEvent, spawn_hub_watches, spawn_member_watches};
use super::writer::{SecretEvent, StatusWrite, VipStoreWrite, WriteJob, run_writer};
use super::{Change, Input, MEMBER_KINDS, Options, Watched, WriteReport};
use crate::compute::plan::{ObservedObject, plan_member};
use crate::compute::status::{policy_status, same_status};
use crate::compute::vip::VipTable;
use crate::compute::{DesiredObject, Engine, ObjectKey, Recomputed};
use crate::crd::PolicyStatus;
use crate::ingest::InputObject;
use crate::meta::{HUB, Kind, MANAGER};
use crate::model::{ClusterHealth, ClusterId, NsName, ObjectRef};

/// How often health and retries are looked at when nothing happens.
const TICK: Duration = Duration::from_secs(1);

/// What a pass runs on its blocking thread: `Engine::recompute`, or a slower stand-in in tests.
pub type Compute = Arc<dyn Fn(&mut Engine) -> Recomputed + Send + Sync>;

/// A registered member: its watches, its health, and the Secret it came from.
struct Member {
    registration: Registration,
    health: MemberHealth,
    /// Watches stop when this is dropped.
    _watches: Option<JoinSet<()>>,
    namespace_ready: bool,
    conflicts: Vec<ObjectKey>,
    /// Whether the last plan made for it was empty: with nothing dirty and nothing in flight,
    /// the member holds exactly what is desired.
    last_plan_empty: bool,
}

/// A writer task (one per member, plus the hub's) and its slot.
struct Writer {
    slot: WriterSlot,
    jobs: UnboundedSender<WriteJob>,
}

pub struct Runtime {
    opts: Options,
    shared: Arc<Shared>,
    tx: UnboundedSender<Input>,
    limit: Arc<Semaphore>,
    /// Home between passes; a pass takes it to its blocking thread and brings it back.
    engine: Option<Box<Engine>>,
    compute: Compute,
    next_epoch: u64,
    members: BTreeMap<ClusterId, Member>,
    writers: BTreeMap<ClusterId, Writer>,
    secrets: Vec<Secret>,
    secrets_listed: bool,
    problems: Vec<RegistrationProblem>,
    reported: BTreeSet<RegistrationProblem>,
    events: Vec<SecretEvent>,
    observed: Observed,
    pending_status: BTreeMap<ClusterId, BTreeMap<StatusKey, PolicyStatus>>,
    statuses_dirty: bool,
    vips: VipStore,
    leader: bool,
    dirty_clusters: BTreeSet<ClusterId>,
    /// When the oldest input the next pass reflects arrived, and per member the oldest change
    /// not yet written: the change-to-write latency.
    batch_started: Option<Instant>,
    change_since: BTreeMap<ClusterId, Instant>,
}

/// The plain listener for the probes, and the HTTPS one for the views unless authentication is
/// off (then the plain one serves everything, and the log says so at every start).
async fn spawn_servers(
    hub: &Client,
    opts: &Options,
    shared: &Arc<Shared>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let plain = tokio::net::TcpListener::bind(opts.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("--http-addr {}: {e}", opts.http_addr))?;
    let Some(secure) = &opts.secure else {
        tracing::warn!(addr = %opts.http_addr, "AUTHENTICATION IS OFF (--http-auth=none): /metrics and /debug, which show the whole fleet's topology, are served over plain HTTP to anyone who can reach this address");
        return Ok(vec![tokio::spawn(super::server::serve_plain(plain, shared.clone(), true))]);
    };
    let tcp = tokio::net::TcpListener::bind(secure.addr)
        .await
        .map_err(|e| anyhow::anyhow!("--secure-addr {}: {e}", secure.addr))?;
    let tls = super::tls::TlsListener::new(tcp, secure.certificate.clone())?;
    let authorizer = Arc::new(super::auth::Authorizer::new(hub.clone(), secure.auth_cache_ttl));
    tracing::info!(probes = %opts.http_addr, secure = %secure.addr, "serving /livez and /readyz over HTTP; /metrics and /debug over HTTPS to callers the hub authorises");
    Ok(vec![
        tokio::spawn(super::server::serve_plain(plain, shared.clone(), false)),
        tokio::spawn(super::server::serve_secure(tls, shared.clone(), authorizer)),
    ])
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(hub: Client, opts: Options, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(Shared::new(metrics.clone()));
    let servers = spawn_servers(&hub, &opts, &shared).await?;

    let (tx, mut rx) = unbounded_channel();
    let _hub_watches = spawn_hub_watches(
        hub.clone(),
        &opts.secret_namespace,
        &opts.secret_selectors,
        &opts.namespace,
        &opts.vip_configmap,
        tx.clone(),
    );
    let stop_lease = Arc::new(Notify::new());
    let lease = match &opts.leader_election {
        None => {
            let _ = tx.send(Input::Leader(true));
            None
        }
        Some(lease) => Some(spawn_lease(hub.clone(), &opts.namespace, lease, tx.clone(), stop_lease.clone()).await?),
    };

    let mut debounce = Debounce::new(opts.debounce, opts.debounce_max);
    let mut runtime = Runtime::new(hub, opts, shared, tx);
    drive(&mut runtime, &mut rx, &mut debounce, TICK, shutdown).await;
    tracing::info!("shutting down");
    // Release the lease so that another replica takes over without waiting for it to expire.
    stop_lease.notify_one();
    if let Some(task) = lease {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    for server in servers {
        server.abort();
    }
    Ok(())
}

async fn spawn_lease(
    hub: Client,
    namespace: &str,
    lease: &super::LeaseOptions,
    tx: UnboundedSender<Input>,
    stop: Arc<Notify>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(hub, &lease.name)
        .with_namespace(namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration_seconds)
        .with_grace(lease.grace_seconds)
        .with_field_manager(MANAGER)
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("lease {namespace}/{}: {e}", lease.name))?;
    let (mut leader, manager_task) = manager.watch().await;
    Ok(tokio::spawn(async move {
        let _ = tx.send(Input::Leader(*leader.borrow()));
        loop {
            tokio::select! {
                changed = leader.changed() => {
                    if changed.is_err() || tx.send(Input::Leader(*leader.borrow())).is_err() {
                        break;
                    }
                }
                _ = stop.notified() => break,
            }
        }
        // Dropping the receiver makes the manager release the lease and end.
        drop(leader);
        let _ = manager_task.await;
    }))
}

impl Driven for Runtime {
    type Input = Input;

    async fn handle(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Secrets(secrets) => {
                self.secrets = secrets;
                self.secrets_listed = true;
                self.reconcile_registry(now).await;
            }
            Input::SecretsFailed(e) => tracing::warn!(error = %e, "watching registration Secrets"),
            Input::Hub(change) => {
                self.batch_started.get_or_insert(now);
                self.apply_change(HUB, change, now);
            }
            Input::VipStore(VipStoreEvent::Contents(store)) => {
                let first = !self.vips.loaded();
                self.adopt_vips(Some(store), false);
                if first {
                    tracing::info!("VIP store loaded");
                }
            }
            Input::VipStore(VipStoreEvent::Failed(e)) => tracing::warn!(error = %e, "watching the VIP store"),
            Input::Member { cluster, epoch, change } => {
                if self.writers.get(&cluster).is_none_or(|w| w.slot.epoch != epoch) {
                    return; // from a client that was replaced or removed
                }
                self.batch_started.get_or_insert(now);
                self.apply_change(&cluster, change, now);
            }
            Input::WriteDone { cluster, epoch, report } => self.write_done(&cluster, epoch, report, now),
            Input::Leader(leader) => {
                if leader != self.leader {
                    tracing::info!(leader, "leadership changed");
                }
                self.leader = leader;
                self.shared.metrics.leader.set(i64::from(leader));
                if leader {
                    // Everything this replica computed while following may be unwritten.
                    self.dirty_clusters.extend(self.members.keys().cloned());
                    self.statuses_dirty = true;
                    let engine = self.engine.as_ref().expect("the engine is home between passes");
                    self.vips.became_leader(&engine.vips);
                    self.queue_events();
                }
            }
        }
    }

    async fn pass(&mut self) {
        let now = Instant::now();
        self.shared.metrics.passes.inc();
        self.update_health(now);
        let ready = self.ready();
        self.shared.ready.store(ready, Ordering::Relaxed);
        // Compute only once the VIP store is known, so no host gets an address it cannot keep.
        if self.vips.loaded() {
            self.recompute(now).await;
        }
        if ready && self.leader {
            if self.vips.settled() && self.statuses_dirty {
                self.statuses_dirty = false;
                self.queue_statuses();
            }
            self.dispatch(now);
        }
        self.publish();
    }
}

impl Runtime {
    pub fn new(hub: Client, opts: Options, shared: Arc<Shared>, tx: UnboundedSender<Input>) -> Self {
        let engine = Engine::new(opts.settings.clone(), VipTable::default());
        let limit = Arc::new(Semaphore::new(opts.max_concurrent_writes.max(1)));
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: opts.leader_election.as_ref().map(|l| l.identity.clone()),
        };
        let recorder = Recorder::new(hub.clone(), reporter);
        let mut rt = Runtime {
            opts,
            shared,
            tx,
            limit,
            engine: Some(Box::new(engine)),
            compute: Arc::new(Engine::recompute),
            next_epoch: 1,
            members: BTreeMap::new(),
            writers: BTreeMap::new(),
            secrets: Vec::new(),
            secrets_listed: false,
            problems: Vec::new(),
            reported: BTreeSet::new(),
            events: Vec::new(),
            observed: Observed::default(),
            pending_status: BTreeMap::new(),
            statuses_dirty: true,
            vips: VipStore::default(),
            leader: false,
            dirty_clusters: BTreeSet::new(),
            batch_started: None,
            change_since: BTreeMap::new(),
        };
        // The hub's writer: statuses of policies kept there, the VIP store, Events.
        rt.start_writer(HUB, 0, hub, Some(recorder));
        rt
    }

    /// Replaces what a pass runs on its blocking thread.
    #[cfg(test)]
    fn set_compute(&mut self, compute: Compute) {
        self.compute = compute;
    }

    fn engine(&mut self) -> &mut Engine {
        self.engine.as_mut().expect("the engine is home between passes")
    }

    fn apply_change(&mut self, cluster: &str, change: Change, now: Instant) {
        let health = self.members.get_mut(cluster).map(|m| &mut m.health);
        match change {
            Change::Applied(w) => {
                if let Some(h) = health {
                    h.seen(w.kind());
                }
                self.apply_watched(cluster, w);
            }
            Change::Deleted(kind, key) => {
                if let Some(h) = health {
                    h.seen(kind);
                }
                self.delete_watched(cluster, kind, &key);
            }
            Change::Relisted(kind, objects) => {
                if let Some(h) = health {
                    h.listed(kind);
                }
                let listed: BTreeSet<NsName> = objects.iter().map(Watched::key).collect();
                for gone in self.observed.relisted(cluster, kind, &listed) {
                    self.delete_watched(cluster, kind, &gone);
                }
                if kind.is_output() {
                    self.dirty_clusters.insert(cluster.to_string());
                }
                for w in objects {
                    self.apply_watched(cluster, w);
                }
            }
            Change::Failed(e) => {
                tracing::debug!(error = %e, "watch failed");
                if let Some(h) = health {
                    h.watch_failed(e.kind, now, e.message);
                }
            }
        }
    }

    fn apply_watched(&mut self, cluster: &str, w: Watched) {
        let kind = w.kind();
        let key = w.key();
        self.observed.seen(cluster, kind, key.clone());
        match w {
            Watched::Output(o) => self.observe(cluster, *o),
            Watched::Input(obj) => {
                if let Some(status) = policy_status_of(&obj) {
                    let at = ObjectRef { cluster: cluster.to_string(), namespace: key.0, name: key.1 };
                    self.observed.set_status((kind, at), status);
                    self.statuses_dirty = true;
                }
                // Kinds that are inputs and outputs at once.
                match obj.as_ref() {
                    InputObject::Sidecar(s) => {
                        self.observe(cluster, ObservedObject::new(&DesiredObject::Sidecar((**s).clone())))
                    }
                    InputObject::ServiceEntry(se) => {
                        self.observe(cluster, ObservedObject::new(&DesiredObject::ServiceEntry((**se).clone())))
                    }
                    _ => {}
                }
                self.engine().ingest(cluster, &obj);
            }
        }
    }

    fn delete_watched(&mut self, cluster: &str, kind: Kind, key: &NsName) {
        self.observed.gone(cluster, kind, key);
        if kind.is_output() {
            self.dirty_clusters.insert(cluster.to_string());
        }
        self.engine().fleet.delete(cluster, kind, &key.0, &key.1);
    }

    fn observe(&mut self, cluster: &str, o: ObservedObject) {
        self.observed.observe_output(cluster, o);
        self.dirty_clusters.insert(cluster.to_string());
    }

    /// The VIP store's contents (from its watch, or as a write left it): a disagreement with
    /// this replica's allocations makes the store win, and everything is recomputed.
    fn adopt_vips(&mut self, store: Option<std::collections::BTreeMap<String, std::net::Ipv4Addr>>, written: bool) {
        let engine = self.engine.as_mut().expect("the engine is home between passes");
        let adoption = match (store, written) {
            (Some(store), false) => Some(self.vips.adopt(store, &mut engine.vips)),
            (store, true) => self.vips.persisted(store, &mut engine.vips),
            (None, false) => None,
        };
        if let Some(Adoption::Replace(table)) = adoption {
            tracing::warn!("VIP store disagrees with this replica's allocations; adopting the store's");
            engine.reset_vips(table);
        }
    }

    /// Applies the current set of registration Secrets: starts, rebuilds and removes members.
    async fn reconcile_registry(&mut self, now: Instant) {
        let (claims, mut problems) = resolve_claims(&self.secrets);
        let current = self.members.iter().map(|(id, m)| (id.clone(), m.registration.clone())).collect();
        let plan = plan_registry(&current, claims);
        for id in plan.remove {
            tracing::info!(cluster = %id, "member removed (its Secret or key is gone)");
            self.remove_member(&id);
        }
        for (id, registration) in plan.update {
            self.engine().fleet.upsert_cluster(&id, registration.overrides.clone());
            if let Some(m) = self.members.get_mut(&id) {
                m.registration = registration;
            }
        }
        for (id, registration) in plan.start {
            if let Err(message) = self.start_member(&id, registration, now).await {
                let secret = self.members.get(&id).map(|m| m.registration.secret.clone()).unwrap_or_default();
                problems.push(RegistrationProblem { secret, cluster: Some(id.clone()), message });
            }
        }
        problems.sort();
        for p in &problems {
            if !self.problems.contains(p) {
                tracing::warn!(problem = %p, "cluster registration");
            }
        }
        self.shared.metrics.registration_errors.clear();
        for p in &problems {
            let labels = super::metrics::SecretLabel { secret: p.secret.clone() };
            self.shared.metrics.registration_errors.get_or_create(&labels).inc();
        }
        self.problems = problems;
        self.queue_events();
    }

    fn remove_member(&mut self, id: &str) {
        self.members.remove(id);
        self.writers.remove(id);
        self.observed.forget_cluster(id);
        self.pending_status.remove(id);
        self.dirty_clusters.remove(id);
        self.change_since.remove(id);
        self.shared.metrics.forget_cluster(id);
        self.engine().fleet.remove_cluster(id);
        self.statuses_dirty = true;
    }

    /// Builds a member's client and starts its watches and writer. A refused kubeconfig leaves the
    /// member `failed`; what was known about it stays in the model (fail static).
    async fn start_member(&mut self, id: &str, registration: Registration, now: Instant) -> Result<(), String> {
        let previous = self.members.remove(id);
        let ever_synced = previous.as_ref().is_some_and(|m| m.health.ever_synced());
        self.writers.remove(id);
        let client = match check_kubeconfig(&registration.kubeconfig, self.opts.kubeconfig_trust) {
            Ok(kc) => member_client(kc).await,
            Err(e) => Err(e),
        };
        let (health, watches, result) = match client {
            Err(e) => (MemberHealth::failed(now, e.to_string(), ever_synced), None, Err(e.to_string())),
            Ok(client) => {
                let epoch = self.next_epoch;
                self.next_epoch += 1;
                tracing::info!(cluster = id, secret = %registration.secret, rotated = previous.is_some(), "member registered");
                self.engine().fleet.upsert_cluster(id, registration.overrides.clone());
                let sync_ns = &self.opts.settings.sync_namespace;
                let watches = spawn_member_watches(client.clone(), id.to_string(), epoch, sync_ns, self.tx.clone());
                self.start_writer(id, epoch, client, None);
                (MemberHealth::connecting(now, MEMBER_KINDS, ever_synced), Some(watches), Ok(()))
            }
        };
        self.shared.metrics.set_cluster_state(id, health.state().name());
        self.engine().fleet.set_health(id, health.state().cluster_health());
        let member = Member {
            registration,
            health,
            _watches: watches,
            namespace_ready: false,
            conflicts: Vec::new(),
            last_plan_empty: false,
        };
        self.members.insert(id.to_string(), member);
        result
    }

    fn start_writer(&mut self, id: &str, epoch: u64, client: Client, recorder: Option<Recorder>) {
        let (jobs, rx) = unbounded_channel();
        let task = run_writer(
            id.to_string(),
            epoch,
            client,
            recorder,
            rx,
            self.tx.clone(),
            self.limit.clone(),
            self.shared.metrics.clone(),
        );
        tokio::spawn(task);
        self.writers.insert(id.to_string(), Writer { slot: WriterSlot::new(epoch), jobs });
    }

    /// Warning Events on Secrets for problems not reported before (leader only: one voice); the
    /// hub's writer publishes them.
    fn queue_events(&mut self) {
        if !self.leader {
            return;
        }
        let new: Vec<RegistrationProblem> =
            self.problems.iter().filter(|p| !self.reported.contains(*p)).cloned().collect();
        for p in new {
            if let Some(secret) = self.secrets.iter().find(|s| s.metadata.name.as_deref() == Some(p.secret.as_str())) {
                let note = match &p.cluster {
                    Some(c) => format!("cluster {c}: {}", p.message),
                    None => p.message.clone(),
                };
                let reason = "ClusterRegistrationFailed".to_string();
                self.events.push(SecretEvent { secret: secret.object_ref(&()), reason, note });
            }
            self.reported.insert(p);
        }
    }

    fn write_done(&mut self, cluster: &str, epoch: u64, report: WriteReport, now: Instant) {
        let Some(writer) = self.writers.get_mut(cluster).filter(|w| w.slot.epoch == epoch) else {
            return;
        };
        let error = (!report.errors.is_empty())
            .then(|| report.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "));
        if let Some(first) = report.errors.first() {
            tracing::warn!(cluster, errors = report.errors.len(), first = %first, "writes failed; retrying with backoff");
        }
        if writer.slot.done(error, now) {
            self.statuses_dirty = true;
        }
        let metrics = &self.shared.metrics;
        for o in report.applied {
            let labels = super::metrics::ClusterKind { cluster: cluster.to_string(), kind: o.key.kind.to_string() };
            metrics.objects_applied.get_or_create(&labels).inc();
            self.observed.observe_output(cluster, o);
        }
        for k in report.pruned {
            let labels = super::metrics::ClusterKind { cluster: cluster.to_string(), kind: k.kind.to_string() };
            metrics.objects_pruned.get_or_create(&labels).inc();
            self.observed.remove_output(cluster, &k);
        }
        for s in report.statuses {
            let at = ObjectRef { cluster: cluster.to_string(), namespace: s.namespace, name: s.name };
            self.observed.set_status((s.kind, at), Some(s.status));
        }
        if report.namespace_ready
            && let Some(m) = self.members.get_mut(cluster)
        {
            m.namespace_ready = true;
        }
        if cluster == HUB {
            self.adopt_vips(report.vip_store, true);
        }
        // Whatever changed while this job ran is planned now.
        self.dirty_clusters.insert(cluster.to_string());
    }

    /// Member health from its watches; a member back in sync is planned whole.
    fn update_health(&mut self, now: Instant) {
        let mut changes = Vec::new();
        for (id, m) in &mut self.members {
            if let Some(state) = m.health.update(now, self.opts.stale_after) {
                tracing::info!(cluster = %id, to = state.name(), "member state");
                changes.push((id.clone(), state.clone()));
            }
        }
        for (id, state) in changes {
            self.shared.metrics.set_cluster_state(&id, state.name());
            self.engine().fleet.set_health(&id, state.cluster_health());
            if state == State::Synced {
                self.dirty_clusters.insert(id);
            }
            self.statuses_dirty = true;
        }
    }

    /// Ready once the Secrets and the VIP store are listed and no member is still connecting.
    fn ready(&self) -> bool {
        self.secrets_listed
            && self.vips.loaded()
            && self.members.values().all(|m| *m.health.state() != State::Connecting)
    }

    /// Recomputes what changed, on a blocking thread: the loop waits for it, but the rest of the
    /// process (HTTP, watches, writers) does not.
    async fn recompute(&mut self, now: Instant) {
        let mut engine = self.engine.take().expect("the engine is home between passes");
        let compute = self.compute.clone();
        let started = std::time::Instant::now();
        let task = tokio::task::spawn_blocking(move || {
            let recomputed = compute(&mut engine);
            (engine, recomputed)
        });
        let (engine, recomputed) = task.await.expect("the compute thread panicked");
        self.engine = Some(engine);
        if recomputed.identities > 0 {
            let metrics = &self.shared.metrics;
            metrics.compute_duration.observe(started.elapsed().as_secs_f64());
            metrics.identities_recomputed.inc_by(recomputed.identities as u64);
            self.statuses_dirty = true;
        }
        let since = self.batch_started.take().unwrap_or(now);
        for cluster in recomputed.changed.keys() {
            self.dirty_clusters.insert(cluster.clone());
            let entry = self.change_since.entry(cluster.clone()).or_insert(since);
            *entry = (*entry).min(since);
        }
        self.vips.allocated(recomputed.new_vips);
    }

    /// Compares every policy's wanted status with what it carries; queues the differences.
    fn queue_statuses(&mut self) {
        let errors: BTreeMap<ClusterId, String> = self
            .writers
            .iter()
            .filter_map(|(id, w)| w.slot.last_error().map(|e| (id.clone(), e.to_string())))
            .chain(self.members.iter().filter_map(|(id, m)| match m.health.state() {
                State::Failed(e) => Some((id.clone(), e.clone())),
                State::Stale => Some((id.clone(), "member is stale: its API server cannot be watched".to_string())),
                _ => None,
            }))
            .collect();
        let stamp = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let engine = self.engine.as_ref().expect("the engine is home between passes");
        let mut queued = 0;
        for report in engine.desired.reports() {
            let key = (report.kind, report.at.clone());
            let Some(observed) = self.observed.status(&key) else {
                continue; // not (or no longer) watched: nothing to write to
            };
            let wanted = policy_status(report, &errors, observed.as_ref(), &stamp);
            if observed.as_ref().is_some_and(|o| same_status(o, &wanted)) {
                if let Some(p) = self.pending_status.get_mut(&report.at.cluster) {
                    p.remove(&key);
                }
                continue;
            }
            self.pending_status.entry(report.at.cluster.clone()).or_default().insert(key, wanted);
            queued += 1;
        }
        if queued > 0 {
            tracing::debug!(queued, "policy statuses to write");
        }
    }

    /// Hands each writer whose cluster's desired or observed state moved a job, unless it is busy
    /// or backing off. Member writes wait until every VIP they carry is in the store.
    fn dispatch(&mut self, now: Instant) {
        let settled = self.vips.settled();
        let hub_work = self.vips.job_pending() || !self.events.is_empty();
        let candidates: BTreeSet<ClusterId> = self
            .dirty_clusters
            .iter()
            .cloned()
            .chain(self.pending_status.keys().cloned())
            .chain(hub_work.then(|| HUB.to_string()))
            .collect();
        let engine = self.engine.as_ref().expect("the engine is home between passes");
        let empty = BTreeMap::new();
        for cluster in candidates {
            let Some(writer) = self.writers.get_mut(&cluster) else {
                self.dirty_clusters.remove(&cluster);
                continue;
            };
            if !writer.slot.ready(now) {
                continue;
            }
            let mut job = WriteJob::default();
            if cluster == HUB {
                job.persist_vips = self.vips.job().map(|new| VipStoreWrite {
                    namespace: self.opts.namespace.clone(),
                    name: self.opts.vip_configmap.clone(),
                    new,
                });
                job.events = std::mem::take(&mut self.events);
            } else if !settled {
                continue;
            }
            let health = match self.members.get(&cluster) {
                Some(m) => m.health.state().cluster_health(),
                None => ClusterHealth::Synced, // the hub, for its policies' statuses
            };
            if cluster != HUB && self.dirty_clusters.remove(&cluster) {
                let desired = engine.desired.cluster_map(&cluster).unwrap_or(&empty);
                let observed = self.observed.outputs(&cluster).unwrap_or(&BTreeMap::new()).clone();
                job.plan = plan_member(health, desired, &observed);
                let m = self.members.get_mut(&cluster).expect("a writer of a member has a member");
                if job.plan.conflicts != m.conflicts {
                    for key in job.plan.conflicts.iter().filter(|k| !m.conflicts.contains(k)) {
                        tracing::warn!(cluster = %cluster, object = %key, "exists and is not managed by flotilla; left alone");
                    }
                    m.conflicts = job.plan.conflicts.clone();
                }
                m.last_plan_empty = job.plan.is_empty();
                let wants_sync_ns = job.plan.apply.iter().any(|o| o.key.kind != Kind::Sidecar);
                if wants_sync_ns && !m.namespace_ready {
                    job.ensure_namespace = Some(self.opts.settings.sync_namespace.clone());
                }
            }
            // Statuses go only to a member that can be written; a status written since it was
            // queued (by the job that just finished) is dropped.
            if health == ClusterHealth::Synced {
                for ((kind, at), status) in self.pending_status.remove(&cluster).unwrap_or_default() {
                    let current = self.observed.status(&(kind, at.clone())).cloned().flatten();
                    if current.is_some_and(|c| same_status(&c, &status)) {
                        continue;
                    }
                    job.statuses.push(StatusWrite { kind, namespace: at.namespace, name: at.name, status });
                }
            }
            if job.plan.is_empty() && job.statuses.is_empty() && job.persist_vips.is_none() && job.events.is_empty() {
                continue;
            }
            job.since = self.change_since.remove(&cluster);
            let first: Vec<String> = job.plan.apply.iter().take(3).map(|o| o.key.to_string()).collect();
            tracing::debug!(cluster = %cluster, apply = job.plan.apply.len(), prune = job.plan.prune.len(), statuses = job.statuses.len(), first = ?first, "writing");
            if writer.jobs.send(job).is_ok() {
                writer.slot.sent();
            }
        }
    }

    /// Publishes what /debug and /metrics show: the desired state and every member's view.
    fn publish(&self) {
        let engine = self.engine.as_ref().expect("the engine is home between passes");
        let metrics = &self.shared.metrics;
        let mut clusters = BTreeMap::new();
        let mut converged = self.leader && self.ready() && self.vips.settled() && !self.statuses_dirty;
        converged &= self.pending_status.is_empty() && self.events.is_empty();
        for (id, m) in &self.members {
            let facts = engine.facts().get(id);
            let writer = self.writers.get(id);
            let last_error = match m.health.state() {
                State::Failed(e) => Some(e.clone()),
                _ => m
                    .health
                    .watch_error()
                    .map(str::to_string)
                    .or_else(|| writer.and_then(|w| w.slot.last_error().map(str::to_string))),
            };
            let desired = engine.desired.cluster_map(id);
            for kind in Kind::OUTPUTS {
                let n = desired.map(|d| d.keys().filter(|k| k.kind == kind).count()).unwrap_or(0);
                let labels = super::metrics::ClusterKind { cluster: id.clone(), kind: kind.to_string() };
                metrics.objects_desired.get_or_create(&labels).set(n as i64);
                let c = m.conflicts.iter().filter(|k| k.kind == kind).count();
                metrics.conflicts.get_or_create(&labels).set(c as i64);
            }
            let synced = *m.health.state() == State::Synced;
            let member_converged = synced
                && m.last_plan_empty
                && !self.dirty_clusters.contains(id)
                && writer.is_some_and(|w| w.slot.ready(Instant::now()) && w.slot.last_error().is_none());
            // Stale and failed members are not waited for: nothing is written to them.
            converged &= member_converged || matches!(m.health.state(), State::Stale | State::Failed(_));
            clusters.insert(
                id.clone(),
                ClusterView {
                    state: m.health.state().name().to_string(),
                    secret: m.registration.secret.clone(),
                    region: facts.and_then(|f| f.region.clone()),
                    gateway: facts.and_then(|f| f.gateway_address.clone().map(|a| format!("{a}:{}", f.gateway_port))),
                    last_error,
                    desired_objects: desired.map(|d| d.len()).unwrap_or(0),
                    conflicts: m.conflicts.iter().map(|k| k.to_string()).collect(),
                    unlisted: m.health.unlisted().map(|k| k.to_string()).collect(),
                    converged: member_converged,
                },
            );
        }
        let hub_idle = self.writers.get(HUB).is_none_or(|w| w.slot.ready(Instant::now()));
        let view = View {
            ready: self.ready(),
            leader: self.leader,
            converged: converged && hub_idle,
            clusters,
            registration_problems: self.problems.iter().map(|p| p.to_string()).collect(),
        };
        self.shared.publish(Published { view, desired: engine.desired.clone() });
    }
}

fn policy_status_of(obj: &InputObject) -> Option<Option<PolicyStatus>> {
    match obj {
        InputObject::GlobalTrafficPolicy(p) => Some(p.status.clone()),
        InputObject::OutlierDetection(p) => Some(p.status.clone()),
        InputObject::ClientConnectionConfig(p) => Some(p.status.clone()),
        InputObject::Dependency(p) => Some(p.status.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    /// A hub client whose every request fails: the runtime under test never gets that far.
    fn unreachable_hub() -> Client {
        let service = tower::service_fn(|_request: http::Request<kube::client::Body>| async {
            let response = http::Response::builder().status(503).body(kube::client::Body::empty()).expect("a response");
            Ok::<_, std::convert::Infallible>(response)
        });
        Client::new(service, "flotilla")
    }

    fn options() -> Options {
        Options {
            settings: Settings::default(),
            namespace: "flotilla".into(),
            secret_namespace: "flotilla".into(),
            secret_selectors: Vec::new(),
            kubeconfig_trust: Default::default(),
            stale_after: Duration::from_secs(60),
            debounce: Duration::from_millis(50),
            debounce_max: Duration::from_secs(1),
            http_addr: "127.0.0.1:0".parse().expect("an address"),
            secure: None,
            leader_election: None,
            vip_configmap: "flotilla-vips".into(),
            max_concurrent_writes: 1,
        }
    }

    /// A pass whose compute cannot finish until the debug view has answered: if a handler
    /// waited for the pass, neither would ever finish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn debug_answers_while_a_pass_computes() {
        let shared = Arc::new(Shared::new(Arc::new(Metrics::default())));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a listener");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(super::super::server::serve_plain(listener, shared.clone(), true));

        let (tx, _rx) = unbounded_channel();
        let mut runtime = Runtime::new(unreachable_hub(), options(), shared, tx);
        let (answered_tx, answered_rx) = std::sync::mpsc::channel::<()>();
        let (computing_tx, computing_rx) = tokio::sync::oneshot::channel::<()>();
        let computing_tx = std::sync::Mutex::new(Some(computing_tx));
        let answered_rx = std::sync::Mutex::new(answered_rx);
        runtime.set_compute(Arc::new(move |engine: &mut Engine| {
            if let Some(tx) = computing_tx.lock().expect("not poisoned").take() {
                let _ = tx.send(());
            }
            let waited = answered_rx.lock().expect("not poisoned").recv_timeout(Duration::from_secs(60));
            assert!(waited.is_ok(), "the debug view did not answer while the pass computed");
            engine.recompute()
        }));
        runtime.handle(Input::VipStore(VipStoreEvent::Contents(BTreeMap::new()))).await;
        let pass = tokio::spawn(async move {
            runtime.pass().await;
            runtime
        });
        computing_rx.await.expect("the pass started computing");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connecting");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /debug/clusters HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("a request");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("a response");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        answered_tx.send(()).expect("the compute waits");
        let runtime = pass.await.expect("the pass ends");
        assert!(runtime.engine.is_some(), "the engine came home");
    }
}
