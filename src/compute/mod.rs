//! The pure engine: fleet model in, desired Istio objects per member out.
//!
//! `Engine::recompute` takes the identities the model marked dirty, widens them to everything
//! whose output can depend on them (clients and destinations), recomputes those identities and
//! swaps their outputs in the desired state, returning the object keys that changed per member.
//! `Engine::plan_member` plans a member against what it holds, whole or by those keys. `render`
//! calls them once on a fleet read from files; `run` after every burst of watch events. No
//! clients, clocks, randomness or I/O anywhere below this module.
//!
//! Where each step lives: `identity` resolves an identity, `objects` builds its objects,
//! `desired` keeps every identity's output and the per-member index, `plan` compares with what a
//! member holds, `digest` and `output` are the data in between.

mod desired;
pub mod digest;
pub mod explain;
pub mod identity;
pub mod objects;
mod output;
mod owners;
pub mod plan;
pub mod policy;
pub mod status;
pub mod vip;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::ingest::InputObject;
use crate::meta::Kind;
use crate::model::{ClusterHealth, ClusterIdx, Fleet, ObjectRef, Reach};
use crate::settings::{self, Settings};

pub use desired::{Changed, Clients, DesiredState, IdentityOutput, MemberChange};
pub use output::{
    Desired, DesiredObject, DesiredSpec, Diagnostic, ManagedLabels, Notice, ObjectKey, Placed, PolicyInForce,
    PolicyReport, PolicyState, Severity,
};
use owners::Owners;
use vip::VipTable;

/// Per-cluster facts derived once per recompute (not per identity).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterFacts {
    /// The cluster's id, shared by every object desired in it.
    pub id: Arc<str>,
    /// A stale member keeps its last known objects in the model and its desired state here;
    /// nothing is written to it or pruned from it until it is synced again (`plan::is_plannable`).
    pub health: ClusterHealth,
    pub region: Option<String>,
    pub gateway_address: Option<String>,
    pub gateway_port: u16,
    /// Its endpoints are withheld where another member serves the host (`ClusterOverrides::drain`).
    pub drained: bool,
}

/// The names of several sorted runs, sorted, each once. (The stable sort finds the runs and
/// merges them.)
fn sorted_union<const N: usize>(runs: [Vec<&str>; N]) -> Vec<&str> {
    let mut all = runs.concat();
    all.sort();
    all.dedup();
    all
}

/// Adds to `dirty` the identities a change touches without naming them: those writing hosts that
/// someone else's ServiceEntry began or stopped holding, and the case-twins of those touched
/// (identities that differ only in case share hosts: one's change can move them to the other).
fn touch_indirectly(dirty: &mut crate::model::Dirty, fleet: &Fleet, desired: &DesiredState) {
    if !dirty.hosts.is_empty() {
        for (id, out) in desired.identities() {
            if out.hosts.iter().any(|h| dirty.hosts.contains(h)) {
                dirty.identities.entry(id.to_string()).or_insert(Reach::Itself);
            }
        }
    }
    let twins: Vec<(String, Reach)> = dirty
        .identities
        .iter()
        .flat_map(|(id, reach)| fleet.case_twins(id).filter(move |t| t != id).map(move |t| (t.to_string(), *reach)))
        .collect();
    for (twin, reach) in twins {
        let have = dirty.identities.entry(twin).or_insert(reach);
        *have = (*have).max(reach);
    }
}

/// The identities whose output a change to `dirty` can reach. The model says how far each change
/// can reach. Destinations are written where we run. Clients that name us list our hosts in their
/// Sidecars and Dependency statuses (a `*` client has no Sidecar, and its status lists only what
/// it names), so they are recomputed when our hosts move, which resolving us again tells. (A
/// `*` client's workloads moving sets `all` in the model; naming a `*` client as a destination,
/// or editing its Dependency, only touches the identities involved.)
fn widen(
    fleet: &Fleet,
    settings: &Settings,
    desired: &DesiredState,
    dirty: BTreeMap<String, Reach>,
) -> BTreeSet<String> {
    let probe = identity::Running::new(fleet, Default::default());
    let mut set = BTreeSet::new();
    for (id, reach) in dirty {
        if reach >= Reach::Clients {
            let now = identity::resolve(fleet, settings, &probe, &id);
            let before = desired.identity(&id).map_or(&[][..], |o| &o.hosts[..]);
            if !now.written_hosts().eq(before.iter().map(String::as_str)) {
                set.extend(fleet.named_clients_of(&id).map(str::to_string));
            }
        }
        if reach >= Reach::Neighbours {
            set.extend(fleet.destinations_of(&id).map(str::to_string));
        }
        set.insert(id);
    }
    set
}

/// The facts of every member in the fleet, by member number.
#[derive(Clone, Debug, Default)]
pub struct Facts(Vec<Option<ClusterFacts>>);

impl Facts {
    fn of(fleet: &Fleet, settings: &Settings) -> Facts {
        let mut facts = vec![None; fleet.cluster_names().len()];
        for c in fleet.clusters() {
            facts[c.idx.index()] = Some(ClusterFacts {
                id: Arc::from(c.id.as_str()),
                health: c.health,
                region: c.region(),
                gateway_address: c.gateway_address(&settings.gateway_selectors),
                gateway_port: c.gateway_port(settings.gateway_port),
                drained: c.overrides.drain,
            });
        }
        Facts(facts)
    }

    pub fn get(&self, idx: ClusterIdx) -> Option<&ClusterFacts> {
        self.0.get(idx.index()).and_then(Option::as_ref)
    }
}

/// The result of one recompute.
#[derive(Clone, Debug, Default)]
pub struct Recomputed {
    /// How many identities were recomputed.
    pub identities: usize,
    /// Object keys whose desired content changed (added, modified or removed), per cluster.
    pub changed: Changed,
    /// VIPs allocated by this recompute: persist them before writing.
    pub new_vips: BTreeMap<String, Ipv4Addr>,
}

/// The fleet model, the settings and the desired state they produce.
pub struct Engine {
    pub settings: Settings,
    pub fleet: Fleet,
    pub vips: VipTable,
    pub desired: DesiredState,
    /// Which identities produce each object key (see `Owners`).
    owners: Owners,
    /// Threads that resolve and build identities (all cores by default). The output does not
    /// depend on it.
    pub threads: usize,
    facts: Facts,
    /// The hosts each identity's objects carry now (those with a VIP): what keeps an address
    /// from being released.
    hosts: BTreeMap<String, Vec<String>>,
}

impl Engine {
    pub fn new(settings: Settings, vips: VipTable) -> Self {
        let fleet = Fleet::new(&settings.keys.identity, settings.tenancy, &settings.dependency_namespaces);
        let threads = crate::parallel::cores();
        Engine {
            settings,
            fleet,
            vips,
            desired: DesiredState::default(),
            owners: Owners::default(),
            threads,
            facts: Facts::default(),
            hosts: BTreeMap::new(),
        }
    }

    /// Every host some object carries now.
    pub fn live_hosts(&self) -> BTreeSet<&str> {
        self.hosts.values().flatten().map(String::as_str).collect()
    }

    /// The VIP table to change, with the hosts objects carry now (which keep their addresses).
    pub fn vips_and_live_hosts(&mut self) -> (&mut VipTable, BTreeSet<&str>) {
        (&mut self.vips, self.hosts.values().flatten().map(String::as_str).collect())
    }

    /// Replaces the VIP table (e.g. with the allocations persisted in the hub, when they disagree
    /// with this replica's) and recomputes everything on the next pass.
    pub fn reset_vips(&mut self, vips: VipTable) {
        self.vips = vips.with_imported(self.vips.imported().clone());
        self.fleet.mark_all_dirty();
    }

    /// The facts of member `id` as of the last recompute.
    pub fn facts(&self, id: &str) -> Option<&ClusterFacts> {
        self.facts.get(self.fleet.cluster_names().number(id)?)
    }

    /// The object with `key` desired in member `cluster`, if any.
    pub fn desired_object(&self, cluster: &str, key: &ObjectKey) -> Option<&Arc<Desired>> {
        self.desired.object(&self.owners, cluster, key)
    }

    /// Plans `scope` of member `cluster`, in `health`, against what it holds (`observed`).
    pub fn plan_member(
        &self,
        cluster: &str,
        health: ClusterHealth,
        scope: &plan::Scope,
        observed: &BTreeMap<ObjectKey, plan::ObservedObject>,
    ) -> plan::ClusterPlan {
        if !plan::is_plannable(health) {
            return plan::ClusterPlan::default();
        }
        match scope {
            plan::Scope::Whole => plan::plan_cluster(&self.desired.cluster(cluster), observed, self.settings.owner()),
            plan::Scope::Keys(keys) => {
                plan::plan_keys(keys, |k| self.desired_object(cluster, k), observed, self.settings.owner())
            }
        }
    }

    /// Starts again from nothing desired: the next recompute is a full one from empty, as at
    /// start-up.
    pub fn clear_desired(&mut self) {
        self.desired = DesiredState::default();
        self.owners = Owners::default();
        self.hosts.clear();
        self.fleet.mark_all_dirty();
    }

    /// Recomputes what the model marked dirty since the last call.
    pub fn recompute(&mut self) -> Recomputed {
        let mut dirty = self.fleet.take_dirty();
        let mut result = Recomputed::default();
        if dirty.is_empty() {
            return result;
        }
        if dirty.all || dirty.facts {
            self.facts = Facts::of(&self.fleet, &self.settings);
        }
        let Engine { settings, fleet, vips, desired, owners, threads, facts, hosts } = self;
        touch_indirectly(&mut dirty, fleet, desired);
        let (widened, gone) = if dirty.all {
            // Everything, and the identities the model no longer knows: their objects go.
            let gone = desired.identities().map(|(id, _)| id).filter(|id| !fleet.knows(id)).map(String::from);
            (BTreeSet::new(), gone.collect())
        } else {
            (widen(fleet, settings, desired, dirty.identities), BTreeSet::new())
        };
        let identities: Vec<&str> = if dirty.all {
            sorted_union([fleet.identities(), gone.iter().map(String::as_str).collect()])
        } else {
            widened.iter().map(String::as_str).collect()
        };

        // 1. Resolve, on every core: the identities recomputed and the destinations whose hosts
        //    their Sidecars list.
        //    Asked: those and every client that may list their hosts, whose clusters are looked up.
        let (wanted, asked) = if dirty.all {
            // Everything: the same names (or a few more) from the indexes' sorted keys. A lookup
            // per identity compares strings that each live in their own allocation: a tenth of
            // a full compute.
            let wanted = sorted_union([identities.clone(), fleet.named_destinations().collect()]);
            let asked =
                sorted_union([wanted.clone(), fleet.named_sources().collect(), fleet.wildcard_sources().collect()]);
            (wanted, asked)
        } else {
            let mut wanted: BTreeSet<&str> = identities.iter().copied().collect();
            for id in &identities {
                wanted.extend(fleet.destinations_of(id));
            }
            let mut asked = wanted.clone();
            for id in &wanted {
                asked.extend(fleet.named_clients_of(id));
            }
            asked.extend(fleet.wildcard_sources());
            (wanted.into_iter().collect(), asked.into_iter().collect())
        };
        let clusters = crate::parallel::map(*threads, &asked, |id| fleet.clusters_running(id));
        let running = identity::Running::new(fleet, asked.iter().copied().zip(clusters).collect());
        let resolved = crate::parallel::map(*threads, &wanted, |id| identity::resolve(fleet, settings, &running, id));
        let pass = identity::PassView::new(running, &wanted, resolved);

        // 2. Allocate VIPs on one thread, in identity order: when two hosts' preferred addresses
        //    collide, the order decides who probes further, and output must not depend on threads.
        if settings.vip_mode == settings::VipMode::Allocate {
            for id in &identities {
                for host in pass.written_hosts(id) {
                    // Exhaustion is reported by the identity's build, which finds no address.
                    let _ = vips.get_or_allocate(host, settings.vip_cidr);
                }
            }
        }
        if dirty.all {
            hosts.clear();
        }
        for id in &identities {
            match pass.written_hosts(id) {
                [] => hosts.remove(*id),
                written => hosts.insert(id.to_string(), written.to_vec()),
            };
        }

        // 3. Build objects on every core, comparing each identity's with what it produced before,
        //    and swap them in, in identity order, on this thread as they come.
        let olds = crate::parallel::map(*threads, &identities, |id| (*id, desired.current(id)));
        let mut swapping = desired.begin_swap(owners, fleet.cluster_names());
        crate::parallel::map_into(
            *threads,
            &olds,
            |(id, old)| {
                let output = objects::compute_identity(fleet, settings, facts, &pass, id, vips);
                DesiredState::prepare(old.as_deref(), output)
            },
            |i, swap| swapping.swap(identities[i], swap),
        );
        swapping.finish(&mut result.changed);
        // What was resolved and replaced is many small allocations: freed on every core.
        crate::parallel::drop_all(*threads, pass.into_resolved());
        crate::parallel::drop_all(*threads, olds);

        result.identities = identities.len();
        result.new_vips = self.vips.take_new();
        result
    }

    /// Problems of whole clusters (no gateway, no region, stale), and object names two identities
    /// would write, sorted.
    pub fn cluster_diagnostics(&self) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for c in self.fleet.clusters() {
            let Some(facts) = self.facts.get(c.idx) else {
                continue;
            };
            let id = c.id.as_str();
            if facts.region.is_none() {
                out.push(Diagnostic::warning(
                    Some(id),
                    "cluster".into(),
                    "no region (no node carries topology.kubernetes.io/region and no override is set): its endpoints have no locality and FAILOVER policies cannot name it".into(),
                ));
            }
            if facts.gateway_address.is_none() {
                out.push(Diagnostic::warning(
                    Some(id),
                    "cluster".into(),
                    "no gateway address (no east-west or ingress gateway Service with an address in istio-system, and no override): its workloads are reachable only from inside it".into(),
                ));
            }
            if facts.health == ClusterHealth::Stale {
                out.push(Diagnostic::warning(
                    Some(id),
                    "cluster".into(),
                    "stale (its API server cannot be watched): its last known workloads are kept, and nothing is written to or pruned from it until it is back".into(),
                ));
            }
        }
        // A policy that names no identity applies to nothing; its warning names the key it was
        // read by (a fleet whose policies use another label needs `--policy-identity-label`).
        let fleet = &self.fleet;
        let mut unnamed: Vec<(Kind, &ObjectRef, &[String])> = Vec::new();
        let gtps = fleet.gtps.values().filter(|p| p.identity.is_none());
        unnamed.extend(gtps.map(|p| (Kind::GlobalTrafficPolicy, &p.at, &p.warnings[..])));
        let ods = fleet.outlier_detections.values().filter(|p| p.identity.is_none());
        unnamed.extend(ods.map(|p| (Kind::OutlierDetection, &p.at, &p.warnings[..])));
        let cccs = fleet.connection_configs.values().filter(|p| p.identity.is_none());
        unnamed.extend(cccs.map(|p| (Kind::ClientConnectionConfig, &p.at, &p.warnings[..])));
        for (kind, at, warnings) in unnamed {
            for w in warnings {
                let what = format!("{kind} {}/{}", at.namespace, at.name);
                out.push(Diagnostic::warning(Some(&at.cluster), what, w.clone()));
            }
        }
        for (key, identities) in self.owners.shared() {
            let names: Vec<String> =
                identities.iter().map(|n| format!("{:?}", self.desired.identity_numbered(*n))).collect();
            out.push(Diagnostic::error(
                None,
                key.to_string(),
                format!(
                    "identities {} would all write it (their hosts collide); only {} does",
                    names.join(", "),
                    names[0]
                ),
            ));
        }
        out.sort();
        out
    }

    /// Reads one Kubernetes object into the model (see `ingest::distill`).
    pub fn ingest(&mut self, cluster: &str, obj: &InputObject) {
        let (namespace, name) = obj.key();
        // An Admiral ServiceEntry named as flotilla names the ServiceEntry of the one host it
        // carries (`<host>-se`) holds no host from flotilla: it is the object flotilla takes over
        // once it wants it. Any other of Admiral's holds its hosts as someone else's does.
        let adopted = |o: &InputObject| match o {
            InputObject::ServiceEntry(se) => {
                let name = se.metadata.name.as_deref().unwrap_or_default();
                let own_name = matches!(&se.spec.hosts[..], [host] if name.strip_suffix("-se") == Some(host.as_str()));
                self.settings.owner().adopt_admiral && crate::meta::is_admirals_alone(&se.metadata) && own_name
            }
            _ => false,
        };
        let record = if adopted(obj) { None } else { crate::ingest::distill(obj, cluster, &self.settings.keys) };
        match record {
            Some(record) => self.fleet.upsert(cluster, &namespace, &name, record),
            // Ignored (a Sidecar of ours): whatever was kept under its name goes.
            None => self.fleet.delete(cluster, obj.kind(), &namespace, &name),
        }
    }

    /// Every diagnostic: clusters first, then identities, de-duplicated and sorted.
    pub fn all_diagnostics(&self) -> Vec<Diagnostic> {
        let mut all: BTreeSet<Diagnostic> = self.cluster_diagnostics().into_iter().collect();
        all.extend(self.desired.diagnostics().cloned());
        all.into_iter().collect()
    }
}
