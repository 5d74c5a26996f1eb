//! Watches: every member's inputs and owned outputs, and the hub's registration Secrets, hub
//! Dependencies and VIP store. Each watch turns its stream into `Change`s for the runtime. A
//! relist is delivered in pages as it arrives (`RelistPage`), then its end with the keys it held
//! (`Relisted`), so the runtime can drop what disappeared meanwhile; a page is sent only with a
//! credit, of which the whole fleet has `RELIST_PAGES_IN_FLIGHT`, so a relist of many big
//! members at once never holds more than those pages in memory before the runtime takes them in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Secret, Service};
use kube::api::{ListParams, PartialObjectMeta};
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::deadline::{self, watcher_config};
use super::{Change, Input, Watched};
use crate::argo::{Rollout, VirtualService};
use crate::compute::plan::ObservedObject;
use crate::compute::{DesiredObject, vip};
use crate::crd::{ClientConnectionConfig, Dependency, GlobalTrafficPolicy, OutlierDetection};
use crate::ingest::InputObject;
use crate::istio::{DestinationRule, ServiceEntry, Sidecar};
use crate::meta::{HUB, Kind};
use crate::model::NsName;
use crate::settings::LabelTerm;

/// Objects per relist page (kube's watcher lists 500 at a time too).
pub const RELIST_PAGE: usize = 500;
/// Relist pages sent and not yet taken in by the runtime, across the fleet.
pub const RELIST_PAGES_IN_FLIGHT: usize = 8;

/// The runtime's channel, and the credits that bound relist pages in flight (shared by every
/// watch of the process).
#[derive(Clone, Debug)]
pub struct Feed {
    pub tx: UnboundedSender<Input>,
    credits: Arc<Semaphore>,
}

impl Feed {
    pub fn new(tx: UnboundedSender<Input>) -> Self {
        Feed { tx, credits: Arc::new(Semaphore::new(RELIST_PAGES_IN_FLIGHT)) }
    }
}

/// Leave to send one more relist page; it goes back when dropped (once the page is taken in).
#[derive(Debug)]
pub struct Credit {
    _permit: Option<OwnedSemaphorePermit>,
}

/// Where one watch's changes go: a member's (with the epoch of its client) or the hub's.
#[derive(Clone, Debug)]
struct Sink {
    feed: Feed,
    member: Option<(String, u64)>,
}

impl Sink {
    /// False when the runtime is gone.
    fn send(&self, change: Change) -> bool {
        let input = match &self.member {
            Some((cluster, epoch)) => Input::Member { cluster: cluster.clone(), epoch: *epoch, change },
            None => Input::Hub(change),
        };
        self.feed.tx.send(input).is_ok()
    }

    /// Sends a page of a relist once a credit is free.
    async fn send_page(&self, objects: Vec<Watched>) -> bool {
        let permit = self.feed.credits.clone().acquire_owned().await.ok();
        self.send(Change::RelistPage(objects, Credit { _permit: permit }))
    }
}

/// A watch that failed (it is retried with backoff), naming the kind and the cluster.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("watch of {kind} in cluster {cluster}: {message}")]
pub struct WatchError {
    pub cluster: String,
    pub kind: Kind,
    pub message: String,
}

/// Starts one watch per kind in a member. Dropping the set stops them all.
pub fn spawn_member_watches(
    client: Client,
    cluster: String,
    epoch: u64,
    sync_namespace: &str,
    feed: Feed,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    let send = Sink { feed, member: Some((cluster.clone(), epoch)) };
    let all = watcher_config;
    // Every input kind is watched in all namespaces, and becomes the InputObject variant of its name.
    macro_rules! watch_input {
        ($($kind:ident: $ty:ty),* $(,)?) => {$(
            spawn(&mut set, &cluster, Api::<$ty>::all(client.clone()), all(), Kind::$kind, send.clone(), |o| {
                Watched::Input(Box::new(InputObject::$kind(Box::new(o))))
            });
        )*};
    }
    watch_input!(
        Deployment: Deployment,
        Job: Job,
        CronJob: CronJob,
        Service: Service,
        Sidecar: Sidecar,
        GlobalTrafficPolicy: GlobalTrafficPolicy,
        OutlierDetection: OutlierDetection,
        ClientConnectionConfig: ClientConnectionConfig,
        Dependency: Dependency,
    );
    // Of Nodes and Namespaces only labels and annotations are read: their metadata is watched,
    // not their status (a Node's changes every few seconds).
    spawn(
        &mut set,
        &cluster,
        Api::<PartialObjectMeta<Node>>::all(client.clone()),
        all(),
        Kind::Node,
        send.clone(),
        |o| Watched::Input(Box::new(InputObject::Node(Box::new(Node { metadata: o.metadata, ..Default::default() })))),
    );
    let namespaces = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
    spawn(&mut set, &cluster, namespaces, all(), Kind::Namespace, send.clone(), |o| {
        Watched::Input(Box::new(InputObject::Namespace(Box::new(Namespace {
            metadata: o.metadata,
            ..Default::default()
        }))))
    });
    // Everything in the sync namespace, not only what carries our label: an unlabelled object
    // with a name we want is a conflict we must see before writing.
    let ses = Api::<ServiceEntry>::namespaced(client.clone(), sync_namespace);
    // Both an output, and an input: someone else's holds hosts flotilla then leaves alone.
    spawn(&mut set, &cluster, ses, all(), Kind::ServiceEntry, send.clone(), |o| {
        Watched::Input(Box::new(InputObject::ServiceEntry(Box::new(o))))
    });
    // A canary Rollout reads its weights from a VirtualService (Istio's CRDs are in every member).
    spawn(
        &mut set,
        &cluster,
        Api::<VirtualService>::all(client.clone()),
        all(),
        Kind::VirtualService,
        send.clone(),
        |o| Watched::Input(Box::new(InputObject::VirtualService(Box::new(o)))),
    );
    spawn_optional(&mut set, &cluster, Api::<Rollout>::all(client.clone()), Kind::Rollout, send.clone(), |o| {
        Watched::Input(Box::new(InputObject::Rollout(Box::new(o))))
    });
    let drs = Api::<DestinationRule>::namespaced(client.clone(), sync_namespace);
    spawn(&mut set, &cluster, drs, all(), Kind::DestinationRule, send.clone(), |o| {
        Watched::Output(Box::new(ObservedObject::new(&DesiredObject::DestinationRule(o))))
    });
    set.spawn(probe(client, move |change| send.send(change)));
    set
}

/// Asks the member every `PROBE_EVERY` whether it answers (its version: cheap, allowed to every
/// authenticated user). Reports only news: the first answer, an answer after silence, and each
/// unanswered probe with the instant of the last answer, so a healthy member costs the runtime
/// nothing. Watches alone cannot tell a frozen API server from a quiet one.
async fn probe(client: Client, send: impl Fn(Change) -> bool) {
    let mut last_answer = tokio::time::Instant::now();
    let mut answering = false;
    loop {
        let asked = tokio::time::Instant::now();
        let error = match tokio::time::timeout(deadline::PROBE, client.apiserver_version()).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("does not answer: {}", crate::meta::error_chain(&e))),
            Err(_) => Some(format!("does not answer: no answer within {}s", deadline::PROBE.as_secs())),
        };
        let news = match error {
            None => {
                last_answer = asked;
                (!answering).then_some(Change::Answered)
            }
            Some(error) => Some(Change::Unanswered { since: last_answer, error }),
        };
        answering = news.as_ref().map_or(answering, |n| matches!(n, Change::Answered));
        if let Some(change) = news
            && !send(change)
        {
            return;
        }
        tokio::time::sleep_until(asked + deadline::PROBE_EVERY).await;
    }
}

/// Starts the hub's watches: registration Secrets (one watch per selector, merged), the
/// Dependencies kept in the hub, and the VIP store's ConfigMaps.
pub fn spawn_hub_watches(
    client: Client,
    secret_namespace: &str,
    selectors: &[LabelTerm],
    own_namespace: &str,
    vip_configmap: &str,
    feed: Feed,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    let tx = feed.tx.clone();
    let secrets = Api::<Secret>::namespaced(client.clone(), secret_namespace);
    set.spawn(watch_secrets(secrets, selectors.to_vec(), tx.clone()));

    let send = Sink { feed, member: None };
    spawn(&mut set, HUB, Api::<Dependency>::all(client.clone()), watcher_config(), Kind::Dependency, send, |o| {
        Watched::Input(Box::new(InputObject::Dependency(Box::new(o))))
    });

    // Every ConfigMap of flotilla's namespace, of which the VIP store's shards are kept.
    let configmaps = Api::<ConfigMap>::namespaced(client, own_namespace);
    let base = vip_configmap.to_string();
    set.spawn(async move {
        let shard = |cm: &ConfigMap| vip::shard_index(&base, cm.metadata.name.as_deref()?);
        let mut stream = watcher(configmaps, watcher_config()).backoff(backoff()).boxed();
        let mut shards: BTreeMap<usize, ConfigMap> = BTreeMap::new();
        // During a relist the shards are held until InitDone, so a shard is only ever found
        // absent after a complete list.
        let mut relisting: BTreeMap<usize, ConfigMap> = BTreeMap::new();
        let mut listed = false;
        while let Some(event) = stream.next().await {
            let changed: Vec<usize> = match event {
                Ok(watcher::Event::Apply(cm)) => {
                    let Some(i) = shard(&cm) else { continue };
                    shards.insert(i, cm);
                    vec![i]
                }
                Ok(watcher::Event::Delete(cm)) => {
                    let Some(i) = shard(&cm) else { continue };
                    shards.remove(&i);
                    Vec::new()
                }
                Ok(watcher::Event::Init) => {
                    relisting.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(cm)) => {
                    if let Some(i) = shard(&cm) {
                        relisting.insert(i, cm);
                    }
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    shards = std::mem::take(&mut relisting);
                    listed = true;
                    shards.keys().copied().collect()
                }
                Err(e) => {
                    if tx.send(Input::VipStore(VipStoreEvent::Failed(e.to_string()))).is_err() {
                        return;
                    }
                    continue;
                }
            };
            if !listed {
                continue;
            }
            let unreadable: Vec<String> =
                changed.iter().filter_map(|i| shards.get(i)).flat_map(unreadable_vips).collect();
            if !unreadable.is_empty() && tx.send(Input::VipStore(VipStoreEvent::Unreadable(unreadable))).is_err() {
                return;
            }
            let unused = vip::parse_unused(shards.values().map(|cm| cm.data.as_ref()));
            if tx.send(Input::VipStore(VipStoreEvent::Unused(unused))).is_err() {
                return;
            }
            let sizes = shards.values().map(ShardSize::of).collect();
            if tx.send(Input::VipStore(VipStoreEvent::Sizes(sizes))).is_err() {
                return;
            }
            let store = vip::parse_shards(shards.iter().map(|(i, cm)| (*i, cm.data.as_ref())));
            if tx.send(Input::VipStore(VipStoreEvent::Contents(store))).is_err() {
                return;
            }
        }
    });
    set
}

/// What the VIP store ConfigMap holds: host → address.
#[derive(Clone, Debug)]
pub enum VipStoreEvent {
    Contents(BTreeMap<String, Ipv4Addr>),
    /// Hosts whose entry is not an address (a hand edit gone wrong).
    Unreadable(Vec<String>),
    /// Hosts marked unused, and since when.
    Unused(BTreeMap<String, k8s_openapi::jiff::Timestamp>),
    /// How full each of its ConfigMaps is.
    Sizes(Vec<ShardSize>),
    Failed(String),
}

/// One ConfigMap of the VIP store: its entries, and the bytes of its data (keys and values,
/// what counts toward the API server's 1 MiB limit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSize {
    pub name: String,
    pub entries: usize,
    pub bytes: usize,
}

impl ShardSize {
    fn of(cm: &ConfigMap) -> ShardSize {
        let data = cm.data.iter().flatten();
        ShardSize {
            name: cm.metadata.name.clone().unwrap_or_default(),
            entries: cm.data.as_ref().map_or(0, BTreeMap::len),
            bytes: data.map(|(k, v)| k.len() + v.len()).sum(),
        }
    }
}

/// The hosts whose entry in a shard of the store is not an address.
pub fn unreadable_vips(cm: &ConfigMap) -> Vec<String> {
    let data = cm.data.iter().flatten();
    data.filter(|(_, v)| vip::parse_entry(v).is_none()).map(|(h, _)| h.clone()).collect()
}

async fn watch_secrets(api: Api<Secret>, selectors: Vec<LabelTerm>, tx: UnboundedSender<Input>) {
    let streams = selectors.iter().enumerate().map(|(i, term)| {
        let config = watcher_config().labels(&format!("{}={}", term.key, term.value));
        watcher(api.clone(), config).backoff(backoff()).map(move |e| (i, e)).boxed()
    });
    let mut merged = stream::select_all(streams);
    let mut listed = vec![false; selectors.len()];
    let mut by_selector: Vec<BTreeMap<String, Secret>> = vec![BTreeMap::new(); selectors.len()];
    let mut relisting: Vec<BTreeMap<String, Secret>> = vec![BTreeMap::new(); selectors.len()];
    while let Some((i, event)) = merged.next().await {
        match event {
            Ok(watcher::Event::Apply(s)) => {
                by_selector[i].insert(s.name_any(), s);
            }
            Ok(watcher::Event::Delete(s)) => {
                by_selector[i].remove(&s.name_any());
            }
            Ok(watcher::Event::Init) => relisting[i].clear(),
            Ok(watcher::Event::InitApply(s)) => {
                relisting[i].insert(s.name_any(), s);
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                by_selector[i] = std::mem::take(&mut relisting[i]);
                listed[i] = true;
            }
            Err(e) => {
                if tx.send(Input::SecretsFailed(e.to_string())).is_err() {
                    return;
                }
                continue;
            }
        }
        if listed.iter().all(|l| *l) {
            let mut all: BTreeMap<String, Secret> = BTreeMap::new();
            for map in &by_selector {
                all.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            if tx.send(Input::Secrets(all.into_values().collect())).is_err() {
                return;
            }
        }
    }
}

/// Retry delays of a failing watch: doubling from 250 ms up to 5 s. kube's default grows to 30 s;
/// a member that comes back should be reconciled within seconds, and a retry against a member
/// that is down costs one refused connection.
#[derive(Clone, Copy, Debug)]
struct WatchBackoff {
    next: Duration,
}

const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(250);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

fn backoff() -> WatchBackoff {
    WatchBackoff { next: WATCH_BACKOFF_MIN }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(WATCH_BACKOFF_MAX);
        Some(now)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF_MIN;
    }
}

/// How one watcher ended.
enum Ended {
    /// The runtime is gone: stop.
    RuntimeGone,
    /// The API server says the kind does not exist (optional kinds only).
    Absent,
    /// It failed (reported); `listed` if it had completed a list first.
    Failed { listed: bool },
}

/// Watches `kind` for as long as the runtime lives: a failed watcher is reported and started
/// again from a fresh list after a backoff. Resuming the old watcher instead would be silent
/// when it works again (kube's watcher re-watches from its last resourceVersion without an
/// event), and a kind nobody changes would keep its member stale for ever.
async fn watch_forever<K>(
    cluster: &str,
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    send: &Sink,
    convert: &(impl Fn(K) -> Watched + Sync),
    until_absent: bool,
) -> bool
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut delays = backoff();
    loop {
        match watch_kind(cluster, api.clone(), config.clone(), kind, send, convert, until_absent).await {
            Ended::RuntimeGone => return false,
            Ended::Absent => return true,
            Ended::Failed { listed } => {
                if listed {
                    delays.reset();
                }
                tokio::time::sleep(delays.next().unwrap_or(WATCH_BACKOFF_MAX)).await;
            }
        }
    }
}

/// Runs one watch, buffering a relist until it is complete.
fn spawn<K>(
    set: &mut JoinSet<()>,
    cluster: &str,
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    send: Sink,
    convert: impl Fn(K) -> Watched + Send + Sync + 'static,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let cluster = cluster.to_string();
    set.spawn(async move {
        watch_forever(&cluster, api, config, kind, &send, &convert, false).await;
    });
}

/// How often a member without an optional kind's CRD (Argo Rollouts) is asked again.
const ABSENT_KIND_PROBE: Duration = Duration::from_secs(30);

/// Like `spawn`, for a kind whose CRD a member may not have (Argo's Rollout): while it is
/// missing, the kind counts as listed and empty (no error, no stale member), and the member is
/// asked again every 30 s, so a CRD installed later is picked up without a restart.
fn spawn_optional<K>(
    set: &mut JoinSet<()>,
    cluster: &str,
    api: Api<K>,
    kind: Kind,
    send: Sink,
    convert: impl Fn(K) -> Watched + Send + Sync + 'static,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let cluster = cluster.to_string();
    set.spawn(async move {
        let mut absent = false;
        loop {
            match api.list(&ListParams::default().limit(1)).await {
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    if !absent && !send.send(Change::Relisted(kind, BTreeSet::new())) {
                        return;
                    }
                    absent = true;
                    tokio::time::sleep(ABSENT_KIND_PROBE).await;
                    continue;
                }
                Err(e) => {
                    if !send.send(Change::Failed(WatchError {
                        cluster: cluster.clone(),
                        kind,
                        message: crate::meta::error_chain(&e),
                    })) {
                        return;
                    }
                    tokio::time::sleep(WATCH_BACKOFF_MAX).await;
                    continue;
                }
                Ok(_) => {}
            }
            // Returns when the kind went away (its CRD was deleted), or the runtime is gone.
            if !watch_forever(&cluster, api.clone(), watcher_config(), kind, &send, &convert, true).await {
                return;
            }
            if !send.send(Change::Relisted(kind, BTreeSet::new())) {
                return;
            }
            absent = true;
        }
    });
}

/// Runs one watcher, buffering a relist until it is complete, until it fails once. With
/// `until_absent`, ends as soon as the API server says the kind does not exist.
async fn watch_kind<K>(
    cluster: &str,
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    send: &Sink,
    convert: &(impl Fn(K) -> Watched + Sync),
    until_absent: bool,
) -> Ended
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher(api, config).boxed();
    let mut page = Vec::new();
    let mut listed_keys: BTreeSet<NsName> = BTreeSet::new();
    let mut listed = false;
    while let Some(event) = stream.next().await {
        let change = match event {
            Ok(watcher::Event::Apply(o)) => Change::Applied(convert(strip(o))),
            Ok(watcher::Event::Delete(o)) => Change::Deleted(kind, (o.namespace().unwrap_or_default(), o.name_any())),
            Ok(watcher::Event::Init) => {
                page.clear();
                listed_keys.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(o)) => {
                let object = convert(strip(o));
                listed_keys.insert(object.key());
                page.push(object);
                if page.len() < RELIST_PAGE {
                    continue;
                }
                if !send.send_page(std::mem::take(&mut page)).await {
                    return Ended::RuntimeGone;
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                if !page.is_empty() && !send.send_page(std::mem::take(&mut page)).await {
                    return Ended::RuntimeGone;
                }
                listed = true;
                Change::Relisted(kind, std::mem::take(&mut listed_keys))
            }
            Err(
                watcher::Error::InitialListFailed(kube::Error::Api(s))
                | watcher::Error::WatchStartFailed(kube::Error::Api(s)),
            ) if until_absent && s.code == 404 => {
                return Ended::Absent;
            }
            Err(e) => {
                let failed = Change::Failed(WatchError {
                    cluster: cluster.to_string(),
                    kind,
                    message: crate::meta::error_chain(&e),
                });
                return if send.send(failed) { Ended::Failed { listed } } else { Ended::RuntimeGone };
            }
        };
        if !send.send(change) {
            return Ended::RuntimeGone;
        }
    }
    // kube's watcher never ends; if it did, start again.
    Ended::Failed { listed }
}

/// managedFields are large and never read.
fn strip<K: Resource>(mut o: K) -> K {
    o.meta_mut().managed_fields = None;
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: usize) -> Vec<Watched> {
        let node = |i: usize| {
            let mut node = Node::default();
            node.metadata.name = Some(format!("node-{i}"));
            Watched::Input(Box::new(InputObject::Node(Box::new(node))))
        };
        (0..n).map(node).collect()
    }

    #[tokio::test]
    async fn relist_pages_in_flight_are_bounded_across_watches_until_the_runtime_takes_them_in() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let feed = Feed::new(tx);
        let sinks: Vec<Sink> =
            (0..2).map(|i| Sink { feed: feed.clone(), member: Some((format!("m{i}"), 1)) }).collect();
        // Two members relisting at once share the credits.
        for i in 0..RELIST_PAGES_IN_FLIGHT {
            assert!(sinks[i % 2].send_page(page(RELIST_PAGE)).await);
        }
        let mut next = Box::pin(sinks[0].send_page(page(1)));
        assert!(futures::poll!(next.as_mut()).is_pending(), "no credit left: the page waits");

        // The runtime takes one page in (and drops it): the waiting page goes.
        let first = rx.recv().await.expect("a page");
        assert!(
            matches!(&first, Input::Member { change: Change::RelistPage(objects, _), .. } if objects.len() == RELIST_PAGE)
        );
        assert!(futures::poll!(next.as_mut()).is_pending(), "held while the page is being taken in");
        drop(first);
        assert!(next.await);
        let mut sent = 0;
        while let Ok(input) = rx.try_recv() {
            assert!(matches!(input, Input::Member { change: Change::RelistPage(..), .. }));
            sent += 1;
        }
        assert_eq!(sent, RELIST_PAGES_IN_FLIGHT, "the rest, and the one that waited");
    }
}
