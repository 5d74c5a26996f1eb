//! The runtime: wiring from inputs to writes. It owns the model; watches and writers report to
//! it over one channel. A burst of events is debounced into one pass:
//! health → recompute → persist new VIPs → status → plan per member → hand plans to writers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLockWriteGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, Resource};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::registry::{Registration, RegistrationProblem, check_kubeconfig, member_client, resolve_claims};
use super::server::{ClusterView, Shared};
use super::watch::{VipStoreEvent, spawn_hub_watches, spawn_member_watches};
use super::writer::{StatusWrite, WriteJob, persist_vips, run_writer, warn_on_secret};
use super::{Change, Input, Options, WatchKind, Watched, WriteReport};
use crate::compute::plan::{ObservedObject, plan_cluster};
use crate::compute::status::{policy_status, same_status};
use crate::compute::vip::VipTable;
use crate::compute::{Engine, Kind, MANAGER, ObjectKey, PolicyKind};
use crate::crd::PolicyStatus;
use crate::model::{ClusterHealth, ClusterId, HUB, InputKind, InputObject, NsName, ObjectRef};

/// How often health and retries are looked at when nothing happens.
const TICK: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const MIN_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Synced,
    Stale,
    Failed(String),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Synced => "synced",
            State::Stale => "stale",
            State::Failed(_) => "failed",
        }
    }
}

/// A registered member: its watches, its health and the secret it came from.
struct Member {
    registration: Registration,
    state: State,
    /// Watches stop when this is dropped.
    _watches: Option<JoinSet<()>>,
    started: Instant,
    ever_synced: bool,
    unlisted: BTreeSet<WatchKind>,
    failing: BTreeMap<WatchKind, (Instant, String)>,
    namespace_ready: bool,
    conflicts: Vec<ObjectKey>,
}

/// A writer task and its bookkeeping (members, plus the hub for policy statuses there).
struct Writer {
    epoch: u64,
    jobs: UnboundedSender<WriteJob>,
    in_flight: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<String>,
}

type StatusKey = (PolicyKind, ObjectRef);

pub struct Runtime {
    opts: Options,
    hub: Client,
    shared: Arc<Shared>,
    tx: UnboundedSender<Input>,
    limit: Arc<Semaphore>,
    recorder: Recorder,
    next_epoch: u64,
    members: BTreeMap<ClusterId, Member>,
    writers: BTreeMap<ClusterId, Writer>,
    secrets: Vec<Secret>,
    secrets_listed: bool,
    problems: Vec<RegistrationProblem>,
    reported: BTreeSet<RegistrationProblem>,
    /// Keys last seen per (cluster, kind): a relist deletes the ones that disappeared.
    known: BTreeMap<(ClusterId, WatchKind), BTreeSet<NsName>>,
    observed: BTreeMap<ClusterId, BTreeMap<ObjectKey, ObservedObject>>,
    observed_status: BTreeMap<StatusKey, Option<PolicyStatus>>,
    pending_status: BTreeMap<ClusterId, BTreeMap<StatusKey, PolicyStatus>>,
    statuses_dirty: bool,
    vip_store: Option<BTreeMap<String, Ipv4Addr>>,
    unpersisted: BTreeMap<String, Ipv4Addr>,
    leader: bool,
    dirty_clusters: BTreeSet<ClusterId>,
    batch_started: Option<Instant>,
    change_since: BTreeMap<ClusterId, Instant>,
    deadline: Option<Instant>,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(hub: Client, opts: Options, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::new(opts.settings.clone(), VipTable::default());
    let shared = Arc::new(Shared::new(engine, metrics.clone()));
    let listener = tokio::net::TcpListener::bind(opts.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("--http-addr {}: {e}", opts.http_addr))?;
    tracing::info!(addr = %opts.http_addr, "serving /livez, /readyz, /metrics and /debug");
    let server = tokio::spawn(super::server::serve(listener, shared.clone()));

    let (tx, rx) = unbounded_channel();
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

    let mut runtime = Runtime::new(hub, opts, shared, tx);
    runtime.main_loop(rx, shutdown).await;
    tracing::info!("shutting down");
    // Release the lease so that another replica takes over without waiting for it to expire.
    stop_lease.notify_one();
    if let Some(task) = lease {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    server.abort();
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

impl Runtime {
    fn new(hub: Client, opts: Options, shared: Arc<Shared>, tx: UnboundedSender<Input>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: opts.leader_election.as_ref().map(|l| l.identity.clone()),
        };
        let recorder = Recorder::new(hub.clone(), reporter);
        let limit = Arc::new(Semaphore::new(opts.max_concurrent_writes.max(1)));
        let mut rt = Runtime {
            opts,
            hub: hub.clone(),
            shared,
            tx,
            limit,
            recorder,
            next_epoch: 1,
            members: BTreeMap::new(),
            writers: BTreeMap::new(),
            secrets: Vec::new(),
            secrets_listed: false,
            problems: Vec::new(),
            reported: BTreeSet::new(),
            known: BTreeMap::new(),
            observed: BTreeMap::new(),
            observed_status: BTreeMap::new(),
            pending_status: BTreeMap::new(),
            statuses_dirty: true,
            vip_store: None,
            unpersisted: BTreeMap::new(),
            leader: false,
            dirty_clusters: BTreeSet::new(),
            batch_started: None,
            change_since: BTreeMap::new(),
            deadline: None,
        };
        // Statuses of policies kept in the hub are written with the hub's client.
        rt.start_writer(HUB, 0, hub);
        rt
    }

    fn engine(&self) -> RwLockWriteGuard<'_, Engine> {
        self.shared.engine.write().unwrap_or_else(|e| e.into_inner())
    }

    async fn main_loop(&mut self, mut rx: UnboundedReceiver<Input>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let wake = self.deadline.unwrap_or_else(|| Instant::now() + TICK);
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                input = rx.recv() => {
                    let Some(input) = input else { return };
                    self.handle(input).await;
                    if self.deadline.is_none() {
                        self.deadline = Some(Instant::now() + self.opts.debounce);
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    self.deadline = None;
                    self.pass().await;
                }
            }
        }
    }

    async fn handle(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Secrets(secrets) => {
                self.secrets = secrets;
                self.secrets_listed = true;
                self.reconcile_registry().await;
            }
            Input::SecretsFailed(e) => tracing::warn!(error = %e, "watching registration Secrets"),
            Input::Hub(change) => {
                self.batch_started.get_or_insert(now);
                self.apply_change(HUB, change, now);
            }
            Input::VipStore(VipStoreEvent::Contents(store, _)) => self.adopt_vip_store(store),
            Input::VipStore(VipStoreEvent::Failed(e)) => tracing::warn!(error = %e, "watching the VIP store"),
            Input::Member { cluster, epoch, change } => {
                if self.writers.get(&cluster).is_none_or(|w| w.epoch != epoch) {
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
                    let store = self.vip_store.clone().unwrap_or_default();
                    let table = self.engine().vips.all().clone();
                    self.unpersisted = table.into_iter().filter(|(h, _)| !store.contains_key(h)).collect();
                }
            }
        }
    }

    fn apply_change(&mut self, cluster: &str, change: Change, now: Instant) {
        let kind = match &change {
            Change::Applied(w) => watched_kind(w),
            Change::Deleted(k, _) | Change::Relisted(k, _) | Change::Failed(k, _) => Some(*k),
        };
        if let Some(m) = self.members.get_mut(cluster) {
            match (&change, kind) {
                (Change::Failed(k, e), _) => {
                    m.failing.entry(*k).or_insert((now, e.clone()));
                    tracing::debug!(cluster, kind = ?k, error = %e, "watch failed");
                }
                (Change::Relisted(k, _), _) => {
                    m.unlisted.remove(k);
                    m.failing.remove(k);
                }
                (_, Some(k)) => {
                    m.failing.remove(&k);
                }
                _ => {}
            }
        }
        match change {
            Change::Applied(w) => self.apply_watched(cluster, w),
            Change::Deleted(kind, key) => self.delete_watched(cluster, kind, &key),
            Change::Relisted(kind, objects) => {
                let listed: BTreeSet<NsName> = objects.iter().map(watched_key).collect();
                let before = self.known.get(&(cluster.to_string(), kind)).cloned().unwrap_or_default();
                for gone in before.difference(&listed) {
                    self.delete_watched(cluster, kind, gone);
                }
                if let Some(out) = kind.output() {
                    // The relist is the truth about what exists: forget what we assumed.
                    let observed = self.observed.entry(cluster.to_string()).or_default();
                    observed.retain(|k, _| k.kind != out);
                    self.dirty_clusters.insert(cluster.to_string());
                }
                for w in objects {
                    self.apply_watched(cluster, w);
                }
            }
            Change::Failed(..) => {}
        }
    }

    fn apply_watched(&mut self, cluster: &str, w: Watched) {
        let key = watched_key(&w);
        if let Some(kind) = watched_kind(&w) {
            self.known.entry((cluster.to_string(), kind)).or_default().insert(key.clone());
        }
        match w {
            Watched::Output(o) => self.observe(cluster, *o),
            Watched::Input(obj) => {
                if let Some((kind, status)) = policy_status_of(&obj) {
                    let at = ObjectRef { cluster: cluster.to_string(), namespace: key.0.clone(), name: key.1.clone() };
                    self.observed_status.insert((kind, at), status);
                    self.statuses_dirty = true;
                }
                if let InputObject::Sidecar(s) = obj.as_ref() {
                    self.observe(cluster, ObservedObject::new(&crate::compute::DesiredObject::Sidecar((**s).clone())));
                }
                self.engine().fleet.upsert(cluster, *obj);
            }
        }
    }

    fn delete_watched(&mut self, cluster: &str, kind: WatchKind, key: &NsName) {
        if let Some(set) = self.known.get_mut(&(cluster.to_string(), kind)) {
            set.remove(key);
        }
        if let Some(out) = kind.output() {
            let k = ObjectKey::new(out, &key.0, &key.1);
            if let Some(observed) = self.observed.get_mut(cluster) {
                observed.remove(&k);
            }
            self.dirty_clusters.insert(cluster.to_string());
        }
        if let Some(input) = kind.input() {
            if let Some(pk) = policy_kind(input) {
                let at = ObjectRef { cluster: cluster.to_string(), namespace: key.0.clone(), name: key.1.clone() };
                self.observed_status.remove(&(pk, at));
            }
            self.engine().fleet.delete(cluster, input, &key.0, &key.1);
        }
    }

    fn observe(&mut self, cluster: &str, o: ObservedObject) {
        self.observed.entry(cluster.to_string()).or_default().insert(o.key.clone(), o);
        self.dirty_clusters.insert(cluster.to_string());
    }

    fn adopt_vip_store(&mut self, store: BTreeMap<String, Ipv4Addr>) {
        let first = self.vip_store.is_none();
        let mut engine = self.engine();
        let agrees = store.iter().all(|(host, ip)| engine.vips.adopt(host, *ip));
        if !agrees {
            // Another replica persisted different addresses: the store wins.
            tracing::warn!("VIP store disagrees with this replica's allocations; adopting the store's");
            engine.reset_vips(VipTable::from_existing(store.clone()));
        }
        drop(engine);
        self.unpersisted.retain(|h, _| !store.contains_key(h));
        self.vip_store = Some(store);
        if first {
            tracing::info!("VIP store loaded");
        }
    }

    /// Applies the current set of registration Secrets: starts, rebuilds and removes members.
    async fn reconcile_registry(&mut self) {
        let (claims, problems) = resolve_claims(&self.secrets);
        let removed: Vec<ClusterId> = self.members.keys().filter(|id| !claims.contains_key(*id)).cloned().collect();
        for id in removed {
            tracing::info!(cluster = %id, "member removed (its Secret or key is gone)");
            self.members.remove(&id);
            self.writers.remove(&id);
            self.observed.remove(&id);
            self.known.retain(|(c, _), _| c != &id);
            self.pending_status.remove(&id);
            self.observed_status.retain(|(_, at), _| at.cluster != id);
            self.dirty_clusters.remove(&id);
            self.shared.metrics.forget_cluster(&id);
            self.engine().fleet.remove_cluster(&id);
            self.statuses_dirty = true;
        }
        let mut problems = problems;
        for (id, reg) in claims {
            let unchanged = self.members.get(&id).is_some_and(|m| m.registration.kubeconfig == reg.kubeconfig);
            if unchanged {
                let overrides_changed = self.members[&id].registration.overrides != reg.overrides;
                if overrides_changed {
                    self.engine().fleet.upsert_cluster(&id, reg.overrides.clone());
                }
                self.members.get_mut(&id).expect("checked above").registration = reg;
                continue;
            }
            if let Err(message) = self.start_member(&id, reg).await {
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
        self.report_problems().await;
    }

    /// Builds a member's client and starts its watches and writer. A refused kubeconfig leaves the
    /// member `failed`; what was known about it stays in the model (fail static).
    async fn start_member(&mut self, id: &str, reg: Registration) -> Result<(), String> {
        let previous = self.members.remove(id);
        let ever_synced = previous.as_ref().is_some_and(|m| m.ever_synced);
        self.writers.remove(id);
        let client = match check_kubeconfig(&reg.kubeconfig, self.opts.allow_kubeconfig_exec) {
            Ok(kc) => member_client(kc).await,
            Err(e) => Err(e),
        };
        let mut member = Member {
            registration: reg,
            state: State::Connecting,
            _watches: None,
            started: Instant::now(),
            ever_synced,
            unlisted: WatchKind::MEMBER.into_iter().collect(),
            failing: BTreeMap::new(),
            namespace_ready: false,
            conflicts: Vec::new(),
        };
        let result = match client {
            Err(message) => {
                member.state = State::Failed(message.clone());
                self.engine().fleet.set_health(id, ClusterHealth::Stale);
                Err(message)
            }
            Ok(client) => {
                let epoch = self.next_epoch;
                self.next_epoch += 1;
                tracing::info!(cluster = id, secret = %member.registration.secret, rotated = previous.is_some(), "member registered");
                self.engine().fleet.upsert_cluster(id, member.registration.overrides.clone());
                let sync_ns = self.opts.settings.sync_namespace.clone();
                member._watches =
                    Some(spawn_member_watches(client.clone(), id.to_string(), epoch, &sync_ns, self.tx.clone()));
                self.start_writer(id, epoch, client);
                Ok(())
            }
        };
        self.shared.metrics.set_cluster_state(id, member.state.name());
        self.members.insert(id.to_string(), member);
        result
    }

    fn start_writer(&mut self, id: &str, epoch: u64, client: Client) {
        let (jobs, rx) = unbounded_channel();
        tokio::spawn(run_writer(
            id.to_string(),
            epoch,
            client,
            rx,
            self.tx.clone(),
            self.limit.clone(),
            self.shared.metrics.clone(),
        ));
        let writer = Writer { epoch, jobs, in_flight: false, retry_at: None, backoff: MIN_BACKOFF, last_error: None };
        self.writers.insert(id.to_string(), writer);
    }

    /// Warning Events on Secrets for problems not reported before (leader only: one voice).
    async fn report_problems(&mut self) {
        if !self.leader {
            return;
        }
        let new: Vec<RegistrationProblem> =
            self.problems.iter().filter(|p| !self.reported.contains(*p)).cloned().collect();
        for p in new {
            if let Some(secret) = self.secrets.iter().find(|s| s.metadata.name.as_deref() == Some(p.secret.as_str())) {
                let reference = secret.object_ref(&());
                let note = match &p.cluster {
                    Some(c) => format!("cluster {c}: {}", p.message),
                    None => p.message.clone(),
                };
                warn_on_secret(&self.recorder, reference, "ClusterRegistrationFailed", note, &self.shared.metrics)
                    .await;
            }
            self.reported.insert(p);
        }
    }

    fn write_done(&mut self, cluster: &str, epoch: u64, report: WriteReport, now: Instant) {
        let Some(writer) = self.writers.get_mut(cluster).filter(|w| w.epoch == epoch) else {
            return;
        };
        writer.in_flight = false;
        let metrics = &self.shared.metrics;
        for o in report.applied {
            let labels = super::metrics::ClusterKind { cluster: cluster.to_string(), kind: o.key.kind.to_string() };
            metrics.objects_applied.get_or_create(&labels).inc();
            self.observed.entry(cluster.to_string()).or_default().insert(o.key.clone(), o);
        }
        for k in report.pruned {
            let labels = super::metrics::ClusterKind { cluster: cluster.to_string(), kind: k.kind.to_string() };
            metrics.objects_pruned.get_or_create(&labels).inc();
            if let Some(observed) = self.observed.get_mut(cluster) {
                observed.remove(&k);
            }
        }
        for s in report.statuses {
            let at = ObjectRef { cluster: cluster.to_string(), namespace: s.namespace, name: s.name };
            self.observed_status.insert((s.kind, at), Some(s.status));
        }
        if report.namespace_ready
            && let Some(m) = self.members.get_mut(cluster)
        {
            m.namespace_ready = true;
        }
        if report.errors.is_empty() {
            writer.backoff = MIN_BACKOFF;
            writer.retry_at = None;
            if writer.last_error.take().is_some() {
                self.statuses_dirty = true;
            }
        } else {
            let message = report.errors.join("; ");
            tracing::warn!(cluster, errors = report.errors.len(), first = %report.errors[0], retry_in = ?writer.backoff, "writes failed");
            writer.retry_at = Some(now + writer.backoff);
            writer.backoff = (writer.backoff * 2).min(MAX_BACKOFF);
            if writer.last_error.as_ref() != Some(&message) {
                self.statuses_dirty = true;
            }
            writer.last_error = Some(message);
        }
        // Whatever changed while this job ran is planned now.
        self.dirty_clusters.insert(cluster.to_string());
    }

    /// Member health from its watches: listed everything once, and no watch failing for longer
    /// than --stale-after.
    fn update_health(&mut self, now: Instant) {
        let stale_after = self.opts.stale_after;
        let mut changes = Vec::new();
        for (id, m) in &mut self.members {
            if matches!(m.state, State::Failed(_)) {
                continue;
            }
            if m.unlisted.is_empty() {
                m.ever_synced = true;
            }
            let failing_long = m.failing.values().any(|(since, _)| now.duration_since(*since) > stale_after);
            let state = if failing_long {
                State::Stale
            } else if m.unlisted.is_empty() || m.ever_synced {
                State::Synced
            } else if now.duration_since(m.started) > stale_after {
                State::Stale
            } else {
                State::Connecting
            };
            if state != m.state {
                tracing::info!(cluster = %id, from = m.state.name(), to = state.name(), "member state");
                changes.push((id.clone(), state.clone()));
                m.state = state;
            }
        }
        for (id, state) in changes {
            self.shared.metrics.set_cluster_state(&id, state.name());
            let health = if state == State::Synced { ClusterHealth::Synced } else { ClusterHealth::Stale };
            self.engine().fleet.set_health(&id, health);
            if state == State::Synced {
                // Back from stale (or new): reconcile it whole.
                self.dirty_clusters.insert(id);
            }
            self.statuses_dirty = true;
        }
    }

    /// Ready once the Secrets and the VIP store are listed and no member is still connecting.
    fn ready(&self) -> bool {
        self.secrets_listed && self.vip_store.is_some() && self.members.values().all(|m| m.state != State::Connecting)
    }

    async fn pass(&mut self) {
        let now = Instant::now();
        self.update_health(now);
        let ready = self.ready();
        self.shared.ready.store(ready, Ordering::Relaxed);

        // Recompute only after the VIP store is known, so no host gets an address it cannot keep.
        if self.vip_store.is_some() {
            let started = std::time::Instant::now();
            let recomputed = self.engine().recompute();
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
            self.unpersisted.extend(recomputed.new_vips);
        }

        if !(ready && self.leader) {
            self.publish_view();
            return;
        }
        if !self.unpersisted.is_empty() {
            let (ns, name) = (self.opts.namespace.clone(), self.opts.vip_configmap.clone());
            match persist_vips(&self.hub, &ns, &name, &self.unpersisted, &self.shared.metrics).await {
                Ok(store) => self.adopt_vip_store(store),
                Err(e) => {
                    // Writing objects with addresses the hub does not hold could change them
                    // later: wait, and try again on the next pass.
                    tracing::warn!(error = %e, "persisting new VIPs; writes wait");
                    self.publish_view();
                    return;
                }
            }
            if !self.unpersisted.is_empty() {
                self.publish_view();
                return;
            }
        }
        self.report_problems().await;
        if self.statuses_dirty {
            self.statuses_dirty = false;
            self.queue_statuses();
        }
        self.dispatch(now);
        self.publish_view();
    }

    /// Compares every policy's wanted status with what it carries; queues the differences.
    fn queue_statuses(&mut self) {
        let errors: BTreeMap<ClusterId, String> = self
            .writers
            .iter()
            .filter_map(|(id, w)| w.last_error.clone().map(|e| (id.clone(), e)))
            .chain(self.members.iter().filter_map(|(id, m)| match &m.state {
                State::Failed(e) => Some((id.clone(), e.clone())),
                State::Stale => Some((id.clone(), "member is stale: its API server cannot be watched".to_string())),
                _ => None,
            }))
            .collect();
        let stamp = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let engine = self.shared.engine.read().unwrap_or_else(|e| e.into_inner());
        let mut queued = 0;
        for report in engine.desired.reports() {
            let key = (report.kind, report.at.clone());
            let Some(observed) = self.observed_status.get(&key) else {
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

    /// Hands each member whose desired or observed state moved a plan, unless its writer is busy
    /// or backing off, or it is not synced (a stale member is never written, never pruned).
    fn dispatch(&mut self, now: Instant) {
        let candidates: BTreeSet<ClusterId> =
            self.dirty_clusters.iter().cloned().chain(self.pending_status.keys().cloned()).collect();
        let empty = BTreeMap::new();
        for cluster in candidates {
            let Some(writer) = self.writers.get_mut(&cluster) else {
                self.dirty_clusters.remove(&cluster);
                continue;
            };
            if writer.in_flight || writer.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            let member = self.members.get_mut(&cluster);
            if cluster != HUB && member.as_ref().is_none_or(|m| m.state != State::Synced) {
                continue;
            }
            let mut job = WriteJob::default();
            if self.dirty_clusters.remove(&cluster) && cluster != HUB {
                let engine = self.shared.engine.read().unwrap_or_else(|e| e.into_inner());
                let desired = engine.desired.cluster_map(&cluster).unwrap_or(&empty);
                let observed = self.observed.get(&cluster).unwrap_or(&BTreeMap::new()).clone();
                job.plan = plan_cluster(desired, &observed);
                drop(engine);
                let m = member.expect("checked above");
                if job.plan.conflicts != m.conflicts {
                    for key in job.plan.conflicts.iter().filter(|k| !m.conflicts.contains(k)) {
                        tracing::warn!(cluster = %cluster, object = %key, "exists and is not managed by flotilla; left alone");
                    }
                    m.conflicts = job.plan.conflicts.clone();
                }
                let wants_sync_ns = job.plan.apply.iter().any(|o| o.key.kind != Kind::Sidecar);
                if wants_sync_ns && !m.namespace_ready {
                    job.ensure_namespace = Some(self.opts.settings.sync_namespace.clone());
                }
            }
            // A status written since it was queued (e.g. by the job that just finished) is dropped.
            let pending = self.pending_status.remove(&cluster).unwrap_or_default();
            for ((kind, at), status) in pending {
                let current = self.observed_status.get(&(kind, at.clone())).cloned().flatten();
                if current.is_some_and(|c| same_status(&c, &status)) {
                    continue;
                }
                job.statuses.push(StatusWrite { kind, namespace: at.namespace, name: at.name, status });
            }
            if job.plan.is_empty() && job.statuses.is_empty() {
                continue;
            }
            job.since = self.change_since.remove(&cluster);
            tracing::debug!(cluster = %cluster, apply = job.plan.apply.len(), prune = job.plan.prune.len(), statuses = job.statuses.len(), "writing");
            if writer.jobs.send(job).is_ok() {
                writer.in_flight = true;
            }
        }
    }

    /// Refreshes what /debug and /metrics show.
    fn publish_view(&self) {
        let engine = self.shared.engine.read().unwrap_or_else(|e| e.into_inner());
        let metrics = &self.shared.metrics;
        let mut clusters = BTreeMap::new();
        for (id, m) in &self.members {
            let facts = engine.facts().get(id);
            let writer = self.writers.get(id);
            let watch_error = m.failing.values().next().map(|(_, e)| e.clone());
            let last_error = match &m.state {
                State::Failed(e) => Some(e.clone()),
                _ => watch_error.or_else(|| writer.and_then(|w| w.last_error.clone())),
            };
            let desired = engine.desired.cluster_map(id);
            for kind in [Kind::ServiceEntry, Kind::DestinationRule, Kind::Sidecar] {
                let n = desired.map(|d| d.keys().filter(|k| k.kind == kind).count()).unwrap_or(0);
                let labels = super::metrics::ClusterKind { cluster: id.clone(), kind: kind.to_string() };
                metrics.objects_desired.get_or_create(&labels).set(n as i64);
                let c = m.conflicts.iter().filter(|k| k.kind == kind).count();
                metrics.conflicts.get_or_create(&labels).set(c as i64);
            }
            clusters.insert(
                id.clone(),
                ClusterView {
                    state: m.state.name().to_string(),
                    secret: m.registration.secret.clone(),
                    region: facts.and_then(|f| f.region.clone()),
                    gateway: facts.and_then(|f| f.gateway_address.clone().map(|a| format!("{a}:{}", f.gateway_port))),
                    last_error,
                    desired_objects: desired.map(|d| d.len()).unwrap_or(0),
                    conflicts: m.conflicts.iter().map(|k| k.to_string()).collect(),
                    unlisted: m.unlisted.iter().map(|k| format!("{k:?}")).collect(),
                },
            );
        }
        drop(engine);
        let mut view = self.shared.view.write().unwrap_or_else(|e| e.into_inner());
        view.clusters = clusters;
        view.registration_problems = self.problems.iter().map(|p| p.to_string()).collect();
        view.leader = self.leader;
        view.ready = self.ready();
    }
}

fn watched_kind(w: &Watched) -> Option<WatchKind> {
    Some(match w {
        Watched::Output(o) => match o.key.kind {
            Kind::ServiceEntry => WatchKind::ServiceEntry,
            Kind::DestinationRule => WatchKind::DestinationRule,
            Kind::Sidecar => WatchKind::Input(InputKind::Sidecar),
        },
        Watched::Input(obj) => WatchKind::Input(obj.kind()),
    })
}

fn watched_key(w: &Watched) -> NsName {
    match w {
        Watched::Output(o) => (o.key.namespace.to_string(), o.key.name.to_string()),
        Watched::Input(obj) => {
            let meta = obj.meta();
            (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
        }
    }
}

fn policy_kind(kind: InputKind) -> Option<PolicyKind> {
    match kind {
        InputKind::GlobalTrafficPolicy => Some(PolicyKind::GlobalTrafficPolicy),
        InputKind::OutlierDetection => Some(PolicyKind::OutlierDetection),
        InputKind::ClientConnectionConfig => Some(PolicyKind::ClientConnectionConfig),
        InputKind::Dependency => Some(PolicyKind::Dependency),
        _ => None,
    }
}

fn policy_status_of(obj: &InputObject) -> Option<(PolicyKind, Option<PolicyStatus>)> {
    match obj {
        InputObject::GlobalTrafficPolicy(p) => Some((PolicyKind::GlobalTrafficPolicy, p.status.clone())),
        InputObject::OutlierDetection(p) => Some((PolicyKind::OutlierDetection, p.status.clone())),
        InputObject::ClientConnectionConfig(p) => Some((PolicyKind::ClientConnectionConfig, p.status.clone())),
        InputObject::Dependency(p) => Some((PolicyKind::Dependency, p.status.clone())),
        _ => None,
    }
}
