//! The runtime: wiring from inputs to writes. It owns the engine (the model and the desired
//! state) and what is known of every member; watches and writers report to it over one channel.
//! Inputs are handled one at a time, and a burst of them is grouped into one pass (`debounce`):
//!
//! health → compute (on a blocking thread) → publish → VIPs to the hub → statuses → a plan per
//! member → the writers.
//!
//! The decisions live in small synchronous parts (`health`, `observed`, `pending`, `dispatch`,
//! `vips`, `registry::plan_registry`, `plan::is_plannable`); what remains here is the wiring
//! between them and the clients.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::debounce::{Debounce, Driven, drive};
use super::dispatch::{Retries, WriterSlot};
use super::health::{MemberHealth, State};
use super::lease::{Fence, FenceSender};
use super::member::Member;
use super::metrics::Metrics;
use super::observed::Observed;
use super::pending::Pending;
use super::registry::{
    Problems, Registration, RegistrationProblem, check_kubeconfig, member_client, plan_registry, resolve_claims,
};
use super::server::{Published, Shared, View};
use super::statuses::{ClusterErrors, PendingStatuses};
use super::vips::{Adoption, VipStore};
use super::watch::{Feed, VipStoreEvent, spawn_hub_watches, spawn_member_watches};
use super::writer::{VipStoreWrite, WarningEvent, WriteError, WriteJob, run_writer};
use super::{Change, Input, MEMBER_KINDS, Options, Watched, WriteReport};
use crate::compute::plan::{ClusterPlan, ObservedObject, Scope};
use crate::compute::vip::VipTable;
use crate::compute::{DesiredObject, Engine, MemberChange, ObjectKey, Recomputed};
use crate::crd::PolicyStatus;
use crate::ingest::InputObject;
use crate::meta::{ANNOTATION_RELEASE_PRUNES, HUB, Kind, MANAGER};
use crate::model::{ClusterHealth, ClusterId, NsName, ObjectRef};

/// How often health and retries are looked at when nothing happens.
const TICK: Duration = Duration::from_secs(1);

/// How often the leader looks for VIP store entries to mark unused, unmark or release.
const VIP_LIFECYCLE_EVERY: Duration = Duration::from_secs(10);

/// What a pass runs on its blocking thread: `Engine::recompute`, or a slower stand-in in tests.
pub type Compute = Arc<dyn Fn(&mut Engine) -> Recomputed + Send + Sync>;

/// A writer task (one per member, plus the hub's) and its slot.
struct Writer {
    slot: WriterSlot,
    jobs: UnboundedSender<WriteJob>,
}

pub struct Runtime {
    opts: Options,
    shared: Arc<Shared>,
    /// The runtime's own channel (with the relist credits its watches share).
    feed: Feed,
    limit: Arc<Semaphore>,
    /// Until when this replica may write; every writer's jobs run under it.
    fence: Fence,
    /// Home between passes; a pass takes it to its blocking thread and brings it back.
    engine: Option<Box<Engine>>,
    compute: Compute,
    next_epoch: u64,
    members: BTreeMap<ClusterId, Member>,
    writers: BTreeMap<ClusterId, Writer>,
    secrets: Vec<Secret>,
    secrets_listed: bool,
    problems: Problems,
    events: Vec<WarningEvent>,
    /// Events on workloads whose claim on an identity is refused or a decoy.
    claims: super::claims::ClaimEvents,
    /// Each member's disallowed claims, as last counted.
    claim_counts: BTreeMap<ClusterId, usize>,
    /// The blast-radius guard: prunes held per member.
    guard: super::guard::PruneGuard,
    /// Who publishes Events (this replica), for every writer's recorder.
    reporter: Reporter,
    observed: Observed,
    statuses: PendingStatuses,
    statuses_dirty: bool,
    vips: VipStore,
    leader: bool,
    /// The start-up sync is over: every member registered at start has been listed once (or
    /// found stale). Until then nothing is written (docs/decisions.md, "Members are independent").
    started: bool,
    /// What of each member must be planned again.
    pending: Pending,
    /// Objects whose write failed, retried alone.
    retries: Retries,
    /// When the oldest input the next pass reflects arrived, and per member the oldest change
    /// not yet written: the change-to-write latency.
    batch_started: Option<Instant>,
    change_since: BTreeMap<ClusterId, Instant>,
    /// When the leader next looks for VIP store entries to mark, unmark or release.
    next_vip_lifecycle: Option<Instant>,
    /// With --dry-run: each member's plan, as of its last change.
    dry_plans: BTreeMap<ClusterId, Arc<crate::compute::plan::PlanSummary>>,
    /// Members whose registration is gone, kept (not watched, not written) until then.
    leaving: BTreeMap<ClusterId, Instant>,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(hub: Client, opts: Options, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(Shared::new(metrics.clone()));
    let servers = super::server::start(&hub, &opts, &shared).await?;

    let (tx, mut rx) = unbounded_channel();
    let feed = Feed::new(tx.clone());
    let _hub_watches = spawn_hub_watches(
        hub.clone(),
        &opts.secret_namespace,
        &opts.secret_selectors,
        &opts.namespace,
        &opts.vip_configmap,
        feed.clone(),
    );
    let stop_lease = Arc::new(Notify::new());
    // Without election the fence stays open for the life of this function.
    let (_open, fence) = Fence::open();
    let (lease, fence) = match &opts.leader_election {
        // A dry run never leads: it takes no lease (whatever the options say), and its fence
        // never opens, so even a job that reached a writer would be dropped unwritten.
        _ if opts.dry_run => (None, Fence::new().1),
        None => {
            let _ = tx.send(Input::Leader(true));
            (None, fence)
        }
        Some(lease) => {
            let (fence_tx, fence): (FenceSender, Fence) = Fence::new();
            let task =
                super::lease::spawn(hub.clone(), &opts.namespace, lease, tx.clone(), fence_tx, stop_lease.clone());
            (Some(task.await?), fence)
        }
    };

    let mut debounce = Debounce::new(opts.debounce, opts.debounce_max);
    let mut runtime = Runtime::new(hub, opts, shared, feed, fence);
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
                if first {
                    let engine = self.engine.as_ref().expect("the engine is home between passes");
                    for line in engine.vips.imported().disagreements(&store) {
                        tracing::warn!("{line}");
                    }
                }
                self.adopt_vips(Some(store), false);
                if first {
                    tracing::info!("VIP store loaded");
                }
            }
            Input::VipStore(VipStoreEvent::Unreadable(hosts)) => {
                let engine = self.engine.as_ref().expect("the engine is home between passes");
                let repaired = self.vips.unreadable(&hosts, &engine.vips);
                for host in &hosts {
                    let address = repaired.iter().find(|(h, _)| h == host).map(|(_, ip)| ip.to_string());
                    tracing::warn!(host = %host, repair = ?address, "VIP store entry is not an address; it is written again with the host's address");
                }
            }
            Input::VipStore(VipStoreEvent::Unused(unused)) => self.vips.set_unused(unused),
            Input::VipStore(VipStoreEvent::Sizes(sizes)) => self.shared.metrics.set_vip_store(&sizes),
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
                if self.leader && !leader {
                    // The next leader judges prunes afresh; this replica shows no hold it cannot act on.
                    self.guard.forget_all();
                    self.shared.metrics.prunes_held.clear();
                    // Conflicts are found by planning, which only the leader does: a standby
                    // shows none rather than what it found when it last led.
                    for m in self.members.values_mut() {
                        m.conflicts.clear();
                    }
                }
                self.leader = leader;
                self.shared.metrics.leader.set(i64::from(leader));
                if leader {
                    // Everything this replica computed while following may be unwritten.
                    for id in self.members.keys() {
                        self.pending.whole(id);
                    }
                    self.statuses_dirty = true;
                    let engine = self.engine.as_ref().expect("the engine is home between passes");
                    self.vips.became_leader(&engine.vips);
                    self.queue_events();
                    self.update_claims();
                }
            }
        }
    }

    fn queued(&mut self, depth: usize) {
        self.shared.metrics.input_queue_depth.set(depth as i64);
    }

    async fn pass(&mut self) {
        let now = Instant::now();
        self.shared.metrics.passes.inc();
        self.update_health(now);
        self.forget_leaving(now);
        let ready = self.ready();
        self.started |= ready;
        self.shared.ready.store(ready, Ordering::Relaxed);
        // Compute only once the VIP store is known, so no host gets an address it cannot keep.
        if self.vips.loaded() {
            self.recompute(now).await;
        }
        for (cluster, key) in self.retries.due(now) {
            self.pending.key(&cluster, key);
        }
        for cluster in self.guard.window_moved(now) {
            self.pending.whole(&cluster);
        }
        if ready && self.leader && self.vips.settled() && self.next_vip_lifecycle.is_none_or(|at| now >= at) {
            // Every member has been listed, so the hosts objects carry now are all known.
            self.next_vip_lifecycle = Some(now + VIP_LIFECYCLE_EVERY);
            let engine = self.engine.as_ref().expect("the engine is home between passes");
            self.vips.lifecycle(&engine.live_hosts(), k8s_openapi::jiff::Timestamp::now(), self.opts.vip_release_after);
        }
        if ready && self.opts.dry_run {
            self.plan_dry();
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
    pub fn new(hub: Client, opts: Options, shared: Arc<Shared>, feed: Feed, fence: Fence) -> Self {
        let imported = crate::compute::vip::Imported::new(opts.imported_vips.clone());
        let engine = Engine::new(opts.settings.clone(), VipTable::default().with_imported(imported));
        let limit = Arc::new(Semaphore::new(opts.max_concurrent_writes.max(1)));
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: opts.leader_election.as_ref().map(|l| l.identity.clone()),
        };
        let recorder = Recorder::new(hub.clone(), reporter.clone());
        let guard = super::guard::PruneGuard::new(opts.prune_guard);
        let mut rt = Runtime {
            opts,
            shared,
            feed,
            limit,
            fence,
            engine: Some(Box::new(engine)),
            compute: Arc::new(Engine::recompute),
            next_epoch: 1,
            members: BTreeMap::new(),
            writers: BTreeMap::new(),
            secrets: Vec::new(),
            secrets_listed: false,
            problems: Problems::default(),
            events: Vec::new(),
            claims: Default::default(),
            claim_counts: BTreeMap::new(),
            guard,
            reporter,
            observed: Observed::default(),
            statuses: PendingStatuses::default(),
            statuses_dirty: true,
            vips: VipStore::default(),
            leader: false,
            started: false,
            pending: Pending::default(),
            retries: Retries::default(),
            batch_started: None,
            change_since: BTreeMap::new(),
            next_vip_lifecycle: None,
            dry_plans: BTreeMap::new(),
            leaving: BTreeMap::new(),
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
            // Taken in as it comes; the credit goes back when this arm ends.
            Change::RelistPage(objects, _credit) => {
                for w in objects {
                    self.apply_watched(cluster, w);
                }
            }
            Change::Relisted(kind, listed) => {
                if let Some(h) = health {
                    h.listed(kind);
                }
                for gone in self.observed.relisted(cluster, kind, &listed) {
                    self.delete_watched(cluster, kind, &gone);
                }
                if kind.is_output() {
                    self.pending.whole(cluster);
                }
            }
            Change::Failed(e) => {
                tracing::debug!(error = %e, "watch failed");
                if cluster != HUB {
                    self.shared.metrics.watch_restarted(cluster, e.kind);
                }
                if let Some(h) = health {
                    h.watch_failed(e.kind, now, e.message);
                }
            }
            Change::Answered => {
                if let Some(h) = health {
                    h.answered(now);
                }
            }
            Change::Unanswered { since, error } => {
                tracing::debug!(cluster, error = %error, "member did not answer");
                if let Some(h) = health {
                    h.answered(since);
                    h.unanswered(error);
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
                    // Only the sync namespace holds flotilla's (aliases); elsewhere they are inputs.
                    InputObject::VirtualService(vs)
                        if vs.metadata.namespace.as_deref() == Some(self.opts.settings.sync_namespace.as_str()) =>
                    {
                        self.observe(cluster, ObservedObject::new(&DesiredObject::VirtualService((**vs).clone())))
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
            self.pending.key(cluster, ObjectKey::new(kind, &key.0, &key.1));
        }
        self.engine().fleet.delete(cluster, kind, &key.0, &key.1);
    }

    /// A watch reported one of the objects flotilla writes.
    fn observe(&mut self, cluster: &str, o: ObservedObject) {
        // Ours and still marked as Admiral's: taken over from it (by this process or an earlier).
        if o.managed
            && o.admiral
            && let Some(m) = self.members.get_mut(cluster)
        {
            m.taken_over([&o.key]);
        }
        self.pending.key(cluster, o.key.clone());
        self.observed.watched_output(cluster, o);
    }

    /// The VIP store's contents (from its watch, or as a write left it): a disagreement with
    /// this replica's allocations makes the store win, and everything is recomputed.
    fn adopt_vips(&mut self, store: Option<std::collections::BTreeMap<String, std::net::Ipv4Addr>>, written: bool) {
        let engine = self.engine.as_mut().expect("the engine is home between passes");
        let (table, live) = engine.vips_and_live_hosts();
        let adoption = match (store, written) {
            (Some(store), false) => Some(self.vips.adopt(store, table, &live)),
            (store, true) => self.vips.persisted(store, table, &live),
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
        // A leaving member registered again is started afresh (its watches are gone).
        let current = self
            .members
            .iter()
            .filter(|(id, _)| !self.leaving.contains_key(*id))
            .map(|(id, m)| (id.clone(), m.registration.clone()))
            .collect();
        let plan = plan_registry(&current, claims);
        for id in plan.remove {
            self.registration_removed(&id, now);
        }
        for (id, registration) in plan.update {
            self.engine().fleet.upsert_cluster(&id, registration.overrides.clone());
            if let Some(m) = self.members.get_mut(&id) {
                let (before, after) = (&m.registration.brakes, &registration.brakes);
                if m.registration.overrides.drain != registration.overrides.drain {
                    let drained = registration.overrides.drain;
                    tracing::warn!(cluster = %id, drained, "member {}", if drained { "drained: its endpoints are withheld wherever another member serves" } else { "undrained: its endpoints are served again" });
                }
                if before.paused != after.paused {
                    tracing::warn!(cluster = %id, paused = after.paused, "member {}", if after.paused { "paused: nothing is written to it" } else { "resumed: reconciled whole" });
                }
                // Resumed, or a hold released: the member is planned whole.
                let moved = before != after;
                m.registration = registration;
                if moved {
                    self.pending.whole(&id);
                }
            }
        }
        for (id, registration) in plan.start {
            if let Err(message) = self.start_member(&id, registration, now).await {
                let secret = self.members.get(&id).map(|m| m.registration.secret.clone()).unwrap_or_default();
                problems.push(RegistrationProblem { secret, cluster: Some(id.clone()), message });
            }
        }
        for (id, m) in &self.members {
            let labels = super::metrics::ClusterLabel { cluster: id.clone() };
            self.shared.metrics.member_paused.get_or_create(&labels).set(i64::from(m.registration.brakes.paused));
            self.shared.metrics.set_token_expiry(id, m.registration.token_expires);
            let drained = i64::from(m.registration.overrides.drain);
            self.shared.metrics.member_drained.get_or_create(&labels).set(drained);
        }
        for p in self.problems.replace(problems) {
            tracing::warn!(problem = %p, "cluster registration");
        }
        self.shared.metrics.registration_errors.clear();
        for p in self.problems.current() {
            let labels = super::metrics::SecretLabel { secret: p.secret.clone() };
            self.shared.metrics.registration_errors.get_or_create(&labels).inc();
        }
        self.queue_events();
    }

    /// A member's registration is gone. One that has served something keeps its last known
    /// workloads in the model (so the other members keep its endpoints) for `--removal-grace`,
    /// shown `leaving` and reported; its watches and writer stop at once.
    fn registration_removed(&mut self, id: &str, now: Instant) {
        let grace = self.opts.removal_grace;
        let Some(m) = self.members.get_mut(id).filter(|m| m.health.ever_synced() && !grace.is_zero()) else {
            tracing::info!(cluster = %id, "member removed (its Secret or key is gone)");
            self.remove_member(id);
            return;
        };
        let wall = k8s_openapi::jiff::Timestamp::now() + grace;
        let until = wall.strftime("%Y-%m-%dT%H:%M:%SZ");
        let message = format!(
            "its registration is gone: not watched or written any more; its endpoints are kept in the other members until {until} (--removal-grace), then removed"
        );
        tracing::warn!(cluster = %id, until = %until, "member leaving: {message}");
        // Announced by the leader only (one voice), like every registration problem.
        let event = WarningEvent {
            object: k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Secret".into()),
                namespace: Some(self.opts.secret_namespace.clone()),
                name: Some(m.registration.secret.clone()),
                ..Default::default()
            },
            reason: "MemberLeaving".into(),
            note: format!("cluster {id}: {message}"),
            action: "Register",
        };
        if self.leader {
            self.events.push(event);
        }
        m.leave(message);
        let state = m.health.state().clone();
        self.leaving.insert(id.to_string(), now + grace);
        self.writers.remove(id);
        self.pending.take(id);
        self.retries.forget_cluster(id);
        self.guard.forget(id);
        self.statuses.forget(id);
        self.claims.forget(id);
        self.shared.metrics.set_cluster_state(id, state.name());
        self.engine().fleet.set_health(id, state.cluster_health());
        self.statuses_dirty = true;
    }

    /// Members whose grace period is over are forgotten: their endpoints leave the fleet now.
    fn forget_leaving(&mut self, now: Instant) {
        let over: Vec<ClusterId> =
            self.leaving.iter().filter(|(_, until)| now >= **until).map(|(id, _)| id.clone()).collect();
        for id in over {
            tracing::info!(cluster = %id, "member removed: its registration has been gone for --removal-grace");
            self.remove_member(&id);
        }
    }

    fn remove_member(&mut self, id: &str) {
        self.leaving.remove(id);
        self.members.remove(id);
        self.writers.remove(id);
        self.observed.forget_cluster(id);
        self.statuses.forget(id);
        self.pending.take(id);
        self.retries.forget_cluster(id);
        self.change_since.remove(id);
        self.dry_plans.remove(id);
        self.claims.forget(id);
        self.guard.forget(id);
        self.shared.metrics.forget_cluster(id);
        self.engine().fleet.remove_cluster(id);
        self.statuses_dirty = true;
    }

    /// Builds a member's client and starts its watches and writer. A refused kubeconfig leaves the
    /// member `failed`; what was known about it stays in the model (fail static).
    async fn start_member(&mut self, id: &str, registration: Registration, now: Instant) -> Result<(), String> {
        if self.leaving.remove(id).is_some() {
            tracing::info!(cluster = %id, "member registered again while leaving");
        }
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
                let watches = spawn_member_watches(client.clone(), id.to_string(), epoch, sync_ns, self.feed.clone());
                self.shared.metrics.member_started(id, &MEMBER_KINDS);
                let recorder = Recorder::new(client.clone(), self.reporter.clone());
                self.start_writer(id, epoch, client, Some(recorder));
                (MemberHealth::connecting(now, MEMBER_KINDS, ever_synced), Some(watches), Ok(()))
            }
        };
        self.shared.metrics.set_cluster_state(id, health.state().name());
        self.engine().fleet.set_health(id, health.state().cluster_health());
        self.members.insert(id.to_string(), Member::new(registration, health, watches));
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
            self.feed.tx.clone(),
            self.limit.clone(),
            self.shared.metrics.clone(),
            self.fence.clone(),
        );
        tokio::spawn(task);
        self.writers.insert(id.to_string(), Writer { slot: WriterSlot::new(epoch), jobs });
    }

    /// Warning Events on Secrets for problems not reported before (leader only: one voice); the
    /// hub's writer publishes them.
    fn queue_events(&mut self) {
        if self.leader {
            let events = self.problems.unannounced(&self.secrets);
            self.events.extend(events);
        }
    }

    fn write_done(&mut self, cluster: &str, epoch: u64, mut report: WriteReport, now: Instant) {
        let Some(writer) = self.writers.get_mut(cluster).filter(|w| w.slot.epoch == epoch) else {
            return;
        };
        if let Some(first) = report.errors.first() {
            tracing::warn!(cluster, errors = report.errors.len(), first = %first, "writes failed; retrying with backoff");
        }
        // An object that failed is retried alone; a failure of the job as a whole (the sync
        // namespace, statuses, the VIP store, leadership lost) backs off the member's writer.
        let (objects, whole): (Vec<_>, Vec<_>) = report.errors.iter().partition(|e| e.object().is_some());
        // A job cancelled because leadership was lost says nothing about the member: it is
        // planned again whole when this replica leads again, without an error or a backoff.
        let failures: Vec<_> = whole.iter().filter(|e| !matches!(e, WriteError::NotLeading { .. })).collect();
        let error = failures.first().map(|first| match failures.len() {
            1 => first.to_string(),
            n => format!("{first} (and {} more)", n - 1),
        });
        if writer.slot.done(error, now) {
            self.statuses_dirty = true;
        }
        for e in objects {
            let key = e.object().expect("partitioned on it").clone();
            self.retries.failed(cluster, key, e.to_string(), now);
            self.statuses_dirty = true;
        }
        self.shared.metrics.written(cluster, &report);
        if report.errors.is_empty() && cluster != HUB {
            let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let labels = super::metrics::ClusterLabel { cluster: cluster.to_string() };
            self.shared.metrics.last_successful_write.get_or_create(&labels).set(wall as i64);
        }
        self.guard.pruned(cluster, &report.pruned, now);
        // What the job wrote is planned again (finding it done is what convergence waits for);
        // after a failure of the whole job, the whole member, once its backoff is over.
        let written: std::collections::BTreeSet<ObjectKey> =
            report.applied.iter().map(|o| o.key.clone()).chain(report.pruned.iter().cloned()).collect();
        for key in &written {
            self.retries.succeeded(cluster, key);
        }
        if whole.is_empty() {
            self.pending.add(cluster, Scope::Keys(written));
        } else {
            self.pending.whole(cluster);
        }
        self.observed.written(cluster, &mut report);
        if report.namespace_ready
            && let Some(m) = self.members.get_mut(cluster)
        {
            m.namespace_ready = true;
        }
        if cluster == HUB {
            self.adopt_vips(report.vip_store, true);
        }
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
        let synced = changes.iter().any(|(_, state)| *state == State::Synced);
        for (id, state) in changes {
            self.shared.metrics.set_cluster_state(&id, state.name());
            self.engine().fleet.set_health(&id, state.cluster_health());
            if state == State::Synced {
                self.pending.whole(&id);
            }
            self.statuses_dirty = true;
        }
        // A member listed whole: its refused claims are known now.
        if synced {
            self.update_claims();
        }
    }

    /// Ready once the Secrets and the VIP store are listed and the start-up sync is over (no
    /// member registered at start is still connecting). A member registered later, or one that
    /// goes stale, never makes the process unready: it holds back only its own writes.
    fn ready(&self) -> bool {
        self.secrets_listed
            && self.vips.loaded()
            && (self.started || self.members.values().all(|m| *m.health.state() != State::Connecting))
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
        for (cluster, change) in recomputed.changed {
            let entry = self.change_since.entry(cluster.clone()).or_insert(since);
            *entry = (*entry).min(since);
            let scope = match change {
                MemberChange::Whole => Scope::Whole,
                MemberChange::Keys(keys) => Scope::Keys(keys.into_iter().collect()),
            };
            self.pending.add(&cluster, scope);
        }
        self.vips.allocated(recomputed.new_vips);
        if recomputed.identities > 0 {
            self.update_claims();
        }
    }

    /// Counts every member's disallowed claims, and (leader only: one voice) queues a Warning
    /// Event on each newly reported one.
    fn update_claims(&mut self) {
        let engine = self.engine.as_ref().expect("the engine is home between passes");
        self.claim_counts = self.claims.update(&engine.fleet, engine.desired.notices(), self.leader);
        for (cluster, n) in &self.claim_counts {
            let labels = super::metrics::ClusterLabel { cluster: cluster.clone() };
            self.shared.metrics.disallowed_claims.get_or_create(&labels).set(*n as i64);
        }
    }

    /// Queues the statuses that policies should carry and do not: each names its members' own
    /// errors and those of its own objects there.
    fn queue_statuses(&mut self) {
        let mut errors = ClusterErrors::default();
        for (id, w) in &self.writers {
            if let Some(e) = w.slot.last_error() {
                errors.member.insert(id.clone(), e.to_string());
            }
        }
        for (id, m) in &self.members {
            if let Some(e) = m.status_error() {
                errors.member.insert(id.clone(), e);
            }
            for (key, e) in self.retries.errors(id) {
                errors.objects.entry(id.clone()).or_default().insert(key.name.to_string(), e.to_string());
            }
        }
        let stamp = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let engine = self.engine.as_ref().expect("the engine is home between passes");
        let queued = self.statuses.queue(engine.desired.reports(), &self.observed, &errors, &stamp);
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
            .pending
            .clusters()
            .chain(self.statuses.clusters())
            .cloned()
            .chain(self.claims.clusters())
            .chain(hub_work.then(|| HUB.to_string()))
            .collect();
        let engine = self.engine.as_ref().expect("the engine is home between passes");
        // Plans first, all at once: a whole member is a merge of thousands of objects, and after
        // a leadership change every member is planned whole, so they are made on every core.
        let writable = |c: &ClusterId| self.writers.get(c).is_some_and(|w| w.slot.ready(now)) && settled;
        let mut to_plan: Vec<(ClusterId, ClusterHealth, Scope)> = Vec::new();
        for cluster in candidates.iter().filter(|c| writable(c)) {
            // A member that does not answer keeps what is pending for it until it does; a paused
            // one, until it is resumed.
            if let Some(m) = self.members.get(cluster).filter(|m| m.health.answering() && !m.registration.brakes.paused)
                && let Some(scope) = self.pending.take(cluster)
            {
                // A member whose prunes are held is planned whole: the hold is then every prune
                // it still wants, and ends when they are few again.
                let scope = if self.guard.is_holding(cluster) { Scope::Whole } else { scope };
                to_plan.push((cluster.clone(), m.health.state().cluster_health(), scope));
            }
        }
        let no_outputs = BTreeMap::new();
        let wholes = to_plan.iter().filter(|(_, _, scope)| *scope == Scope::Whole).count();
        let threads = if wholes > 1 { crate::parallel::cores() } else { 1 };
        let plans = crate::parallel::map_each(threads, &to_plan, |(cluster, health, scope)| {
            engine.plan_member(cluster, *health, scope, self.observed.outputs(cluster).unwrap_or(&no_outputs))
        });
        let mut plans: BTreeMap<ClusterId, (Scope, ClusterPlan)> =
            to_plan.into_iter().zip(plans).map(|((cluster, _, scope), plan)| (cluster, (scope, plan))).collect();
        for cluster in candidates {
            let Some(writer) = self.writers.get_mut(&cluster) else {
                self.pending.take(&cluster);
                continue;
            };
            if !writer.slot.ready(now) {
                continue;
            }
            // Paused: nothing is written, not even statuses or Events; it waits.
            if self.members.get(&cluster).is_some_and(|m| m.registration.brakes.paused) {
                continue;
            }
            let member = self.members.get_mut(&cluster);
            let mut job = match member {
                // The hub: its policies' statuses, the VIP store, Events.
                None => WriteJob {
                    persist_vips: self.vips.job().map(|(new, edits)| VipStoreWrite {
                        namespace: self.opts.namespace.clone(),
                        name: self.opts.vip_configmap.clone(),
                        shard_entries: self.opts.vip_shard_entries,
                        new,
                        edits,
                    }),
                    events: std::mem::take(&mut self.events),
                    ..Default::default()
                },
                // A member's writes wait until every VIP they carry is in the store, and until it
                // answers.
                Some(m) if !settled || !m.health.answering() => continue,
                Some(m) => match plans.remove(&cluster) {
                    Some((scope, mut plan)) => {
                        // Counted only when it can matter: a plan of a few keys stays a few lookups.
                        let managed = if plan.prune.is_empty() && !self.guard.is_holding(&cluster) {
                            0
                        } else {
                            self.observed.outputs(&cluster).map_or(0, |o| o.values().filter(|o| o.managed).count())
                        };
                        let released = &m.registration.brakes.release_prunes;
                        // Hold ids carry the wall clock: unique across restarts and replicas.
                        let wall = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        let whole = scope == Scope::Whole;
                        let verdict = self.guard.check(&cluster, &mut plan, managed, whole, released, now, wall);
                        if let Some(event) = guard_news(
                            &cluster,
                            &verdict,
                            self.guard.hold(&cluster),
                            &m.registration.secret,
                            &self.secrets,
                            self.opts.prune_guard.window,
                        ) {
                            self.events.push(event);
                        }
                        let held = self.guard.hold(&cluster).map_or(0, |h| h.held.len());
                        let labels = super::metrics::ClusterLabel { cluster: cluster.clone() };
                        self.shared.metrics.prunes_held.get_or_create(&labels).set(held as i64);
                        self.retries.planned(&cluster, &scope, &plan);
                        let (job, noticed) = m.plan(plan, &scope, &self.opts.settings.sync_namespace);
                        for key in noticed.conflicts {
                            tracing::warn!(cluster = %cluster, object = %key, "exists and is not managed by flotilla; left alone");
                        }
                        for key in noticed.admiral_leftovers {
                            tracing::info!(cluster = %cluster, object = %key, "created by Admiral, and flotilla writes nothing under its name; left in place");
                        }
                        for key in noticed.taken_back {
                            tracing::warn!(cluster = %cluster, object = %key, "taken over from Admiral, then rewritten as Admiral's: Admiral still runs; left alone until it stops (restart flotilla then)");
                        }
                        job
                    }
                    None => WriteJob::default(),
                },
            };
            // Statuses go only to a member that can be written.
            let writable = self.members.get(&cluster).is_none_or(|m| *m.health.state() == State::Synced);
            if writable {
                job.statuses = self.statuses.take(&cluster, &self.observed);
                job.events.extend(self.claims.take(&cluster));
            }
            if job.is_empty() {
                continue;
            }
            job.since = self.change_since.remove(&cluster);
            let first: Vec<String> = job.plan.apply.iter().take(3).map(|o| o.key.to_string()).collect();
            tracing::debug!(cluster = %cluster, apply = job.plan.apply.len(), prune = job.plan.prune.len(), statuses = job.statuses.len(), first = ?first, "writing");
            if writer.jobs.send(job).is_ok() {
                writer.slot.sent();
                self.observed.job_sent(&cluster);
            }
        }
    }

    /// Dry run: plans every member whose desired or held state moved, whole, against what it holds
    /// now, and keeps the plan to show (/debug/clusters/<id>/plan, metrics); writes nothing. A
    /// member that does not answer keeps its previous plan until it does.
    fn plan_dry(&mut self) {
        let engine = self.engine.as_ref().expect("the engine is home between passes");
        let moved: Vec<ClusterId> = self.pending.clusters().cloned().collect();
        let no_outputs = BTreeMap::new();
        for cluster in moved {
            let Some(m) = self.members.get(&cluster).filter(|m| m.health.answering()) else { continue };
            self.pending.take(&cluster);
            let health = m.health.state().cluster_health();
            let observed = self.observed.outputs(&cluster).unwrap_or(&no_outputs);
            let plan = engine.plan_member(&cluster, health, &Scope::Whole, observed);
            let summary = crate::compute::plan::PlanSummary::of(&plan);
            self.shared.metrics.set_dry_run_plan(&cluster, &summary);
            self.dry_plans.insert(cluster, Arc::new(summary));
        }
    }

    /// Publishes what /debug and /metrics show: the desired state and every member's view.
    fn publish(&self) {
        let engine = self.engine.as_ref().expect("the engine is home between passes");
        let now = Instant::now();
        let mut converged = self.leader && self.ready() && self.vips.settled() && !self.statuses_dirty;
        // What waits for a paused member (its statuses, its Events) waits for the operator; a
        // leaving one is written nothing more.
        let paused = |c: &ClusterId| {
            self.leaving.contains_key(c) || self.members.get(c).is_some_and(|m| m.registration.brakes.paused)
        };
        converged &=
            self.statuses.clusters().all(paused) && self.events.is_empty() && self.claims.clusters().iter().all(paused);
        let mut clusters = BTreeMap::new();
        for (id, m) in &self.members {
            let counts = engine.desired.counts(id);
            self.shared.metrics.set_member_objects(id, counts, &m.conflicts);
            let writer = self.writers.get(id).map(|w| &w.slot);
            let failing = self.retries.errors(id).next();
            let held = self.guard.is_holding(id);
            let member_converged = m.converged(self.pending.contains(id) || failing.is_some(), writer, now)
                && !held
                && !m.registration.brakes.paused;
            // A paused member is not waited for (the operator stopped it); held prunes are.
            converged &= member_converged || !m.waited_for() || (m.registration.brakes.paused && !held);
            let count = counts.iter().sum();
            let mut view = m.view(engine.facts(id), count, writer, member_converged);
            if view.last_error.is_none() {
                view.last_error = failing.map(|(_, e)| e.to_string());
            }
            view.disallowed_claims = self.claim_counts.get(id).copied().unwrap_or_default();
            view.held_prunes = self.guard.hold(id).map(|h| super::server::HeldPrunes {
                id: h.id.clone(),
                count: h.held.len(),
                allowed: h.allowed,
                first: h.held.iter().take(10).map(ToString::to_string).collect(),
            });

            clusters.insert(id.clone(), view);
        }
        let hub_idle = self.writers.get(HUB).is_none_or(|w| w.slot.ready(now));
        let view = View {
            ready: self.ready(),
            leader: self.leader,
            dry_run: self.opts.dry_run,
            converged: converged && hub_idle,
            clusters,
            registration_problems: self.problems.current().iter().map(|p| p.to_string()).collect(),
        };
        self.shared.publish(Published { view, desired: engine.desired.clone(), plans: self.dry_plans.clone() });
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

/// The Warning Event a guard verdict calls for (a new hold, on the member's registration Secret),
/// and the log line of every change.
fn guard_news(
    cluster: &str,
    verdict: &super::guard::Verdict,
    hold: Option<&super::guard::Hold>,
    secret_name: &str,
    secrets: &[k8s_openapi::api::core::v1::Secret],
    window: Duration,
) -> Option<WarningEvent> {
    use super::guard::Verdict;
    match verdict {
        Verdict::Held => {
            let hold = hold?;
            let note = format!(
                "cluster {cluster}: {} prunes held (hold {}): more than {} within {}s would go at once; everything else is written. Fix the cause, or let them go: annotate this Secret {ANNOTATION_RELEASE_PRUNES}={}",
                hold.held.len(),
                hold.id,
                hold.allowed,
                window.as_secs(),
                hold.id
            );
            tracing::warn!(cluster, hold = %hold.id, held = hold.held.len(), allowed = hold.allowed, "prunes held by the blast-radius guard");
            let secret = secrets.iter().find(|s| s.metadata.name.as_deref() == Some(secret_name))?;
            Some(WarningEvent {
                object: kube::Resource::object_ref(secret, &()),
                reason: "PrunesHeld".into(),
                note,
                action: "Prune",
            })
        }
        Verdict::Released(id) => {
            tracing::warn!(cluster, hold = %id, "held prunes released by the operator");
            None
        }
        Verdict::Cleared(id) => {
            tracing::info!(cluster, hold = %id, "held prunes no longer wanted: the hold ends");
            None
        }
        Verdict::Pass | Verdict::Holding => None,
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
            vip_shard_entries: crate::compute::vip::SHARD_ENTRIES,
            vip_release_after: Duration::from_secs(7 * 24 * 3600),
            max_concurrent_writes: 1,
            prune_guard: crate::controller::guard::Limits {
                threshold: 100,
                share: 0.25,
                window: Duration::from_secs(600),
            },
            dry_run: false,
            removal_grace: Duration::ZERO,
            imported_vips: BTreeMap::new(),
        }
    }

    /// A member as its watches (`listed`) and probe (`answering`) would leave it at `now`, with
    /// a writer whose client answers every request with 503 at once.
    fn add_member(runtime: &mut Runtime, id: &str, now: Instant, listed: bool, answering: bool) {
        let mut health = MemberHealth::connecting(now, [Kind::Service], false);
        if listed {
            health.listed(Kind::Service);
        }
        if !answering {
            health.unanswered("no answer within 5s".into());
        }
        health.update(now, runtime.opts.stale_after);
        let registration = Registration {
            secret: format!("flotilla/{id}"),
            kubeconfig: String::new(),
            overrides: Default::default(),
            brakes: Default::default(),
            token_expires: None,
        };
        runtime.engine().fleet.upsert_cluster(id, Default::default());
        runtime.engine().fleet.set_health(id, health.state().cluster_health());
        runtime.members.insert(id.to_string(), Member::new(registration, health, None));
        runtime.start_writer(id, 1, unreachable_hub(), None);
    }

    /// A registration removed: a member that synced is kept leaving (not watched or written,
    /// still served elsewhere) for --removal-grace, then forgotten; one that never synced goes.
    #[tokio::test(start_paused = true)]
    async fn a_removed_registration_keeps_the_member_leaving_for_the_grace_period() {
        let shared = Arc::new(Shared::new(Arc::new(Metrics::default())));
        let (tx, _rx) = unbounded_channel();
        let opts = Options { removal_grace: Duration::from_secs(600), ..options() };
        let mut runtime = Runtime::new(unreachable_hub(), opts, shared.clone(), Feed::new(tx), Fence::open().1);
        runtime.handle(Input::VipStore(VipStoreEvent::Contents(BTreeMap::new()))).await;
        runtime.handle(Input::Leader(true)).await;
        let t0 = Instant::now();
        add_member(&mut runtime, "synced", t0, true, true);
        add_member(&mut runtime, "never", t0, false, true);
        assert!(runtime.members["synced"].health.ever_synced());

        // Both Secrets are gone: the one that never synced goes at once, the other is leaving.
        runtime.handle(Input::Secrets(Vec::new())).await;
        assert!(!runtime.members.contains_key("never"));
        assert!(runtime.engine().fleet.cluster("never").is_none());
        let leaving = &runtime.members["synced"];
        assert_eq!(leaving.health.state().name(), "leaving");
        assert!(!runtime.writers.contains_key("synced"), "nothing is written to it any more");
        assert!(runtime.engine().fleet.cluster("synced").is_some(), "its workloads are still served elsewhere");
        assert_eq!(runtime.events.len(), 1, "{:?}", runtime.events);
        assert_eq!(runtime.events[0].reason, "MemberLeaving");
        assert!(runtime.events[0].note.contains("--removal-grace"), "{}", runtime.events[0].note);
        // The Secrets are read again (unchanged): still leaving, announced once.
        runtime.handle(Input::Secrets(Vec::new())).await;
        assert_eq!(runtime.events.len(), 1);
        runtime.pass().await;
        assert!(runtime.members.contains_key("synced"), "kept within the grace period");

        // The grace period ends: forgotten, its workloads leave the fleet.
        tokio::time::advance(Duration::from_secs(601)).await;
        runtime.pass().await;
        assert!(!runtime.members.contains_key("synced"));
        assert!(runtime.engine().fleet.cluster("synced").is_none());
        assert!(runtime.leaving.is_empty());
    }

    /// Dispatch decisions: at start-up nothing is written until every member has listed (or
    /// turned stale); after that a member that connects, or stops answering, holds back only
    /// itself.
    #[tokio::test(start_paused = true)]
    async fn a_sick_or_new_member_holds_back_only_itself_after_start_up() {
        let shared = Arc::new(Shared::new(Arc::new(Metrics::default())));
        let (tx, _rx) = unbounded_channel();
        let mut runtime = Runtime::new(unreachable_hub(), options(), shared.clone(), Feed::new(tx), Fence::open().1);
        runtime.handle(Input::VipStore(VipStoreEvent::Contents(BTreeMap::new()))).await;
        runtime.handle(Input::Secrets(Vec::new())).await;
        runtime.handle(Input::Leader(true)).await;
        let t0 = Instant::now();
        add_member(&mut runtime, "healthy", t0, true, true);
        add_member(&mut runtime, "slow", t0, false, true);
        runtime.pending.whole("healthy");
        runtime.pass().await;
        assert!(!shared.ready.load(Ordering::Relaxed), "start-up: a member is still connecting");
        assert!(runtime.pending.contains("healthy"), "nothing is written before the start-up sync");

        // The slow member never lists: stale after --stale-after, and the start-up sync is over.
        tokio::time::advance(runtime.opts.stale_after + Duration::from_secs(1)).await;
        runtime.pass().await;
        assert_eq!(runtime.members["slow"].health.state(), &State::Stale);
        assert!(shared.ready.load(Ordering::Relaxed));
        assert!(!runtime.pending.contains("healthy"), "planned and dispatched");

        // Later: a new member connecting, another that stops answering. Neither holds anyone.
        let now = Instant::now();
        add_member(&mut runtime, "new", now, false, true);
        add_member(&mut runtime, "silent", now, true, false);
        for id in ["healthy", "silent"] {
            runtime.pending.whole(id);
        }
        runtime.pass().await;
        assert!(shared.ready.load(Ordering::Relaxed), "a member registered later never makes the process unready");
        assert!(!runtime.pending.contains("healthy"), "the healthy member is written");
        assert!(runtime.pending.contains("silent"), "a member that does not answer keeps its work until it does");
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
        let mut runtime = Runtime::new(unreachable_hub(), options(), shared, Feed::new(tx), Fence::open().1);
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
