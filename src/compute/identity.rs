//! Resolving one identity: where it runs and behind which Service and port, which policies win,
//! which hosts it has and which clusters need them. Everything the object builders read comes
//! from here, and so does every diagnostic about the identity.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::argo::LABEL_POD_TEMPLATE_HASH;
use crate::crd::{ClientConnectionConfigSpec, GlobalTrafficPolicySpec, OutlierDetectionSpec, TrafficPolicy};
use crate::meta::{ANNOTATION_IDENTITIES, Kind, is_dns_subdomain};
use crate::model::{
    Cluster, ClusterIdx, Fleet, ObjectRef, Policy, RolloutPlan, ServiceInfo, ServicePortInfo, Standing, Workload,
};
use crate::settings::{ExposePorts, Settings, Tenancy};

use super::policy::rank;
use super::{Diagnostic, PolicyReport, PolicyState};

/// One port a host exposes, and the Service port behind it in a source cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExposedPort {
    /// The number clients use (`--global-port`, or the Service port with `--expose-ports=all`).
    pub number: u32,
    pub name: String,
    /// Istio protocol name (`HTTP`, `GRPC`, …).
    pub protocol: &'static str,
    /// The Service's own port (not its targetPort): what a local endpoint listens on.
    pub service_port: u32,
}

/// A Service behind one host in a source cluster: where one local endpoint points.
#[derive(Clone, Debug)]
pub struct Local<'a> {
    pub service: &'a ServiceInfo,
    /// The workload it serves (its service account is the endpoint's SPIFFE identity).
    pub workload: &'a Workload,
    pub ports: Vec<ExposedPort>,
    /// A canary Rollout's share of the traffic (from its VirtualService); None: unweighted.
    pub weight: Option<u32>,
}

/// Where a host of an identity+env is served in one cluster: one local endpoint per Service
/// (usually one; a Deployment beside a Rollout, or a weighted canary, give more).
#[derive(Clone, Debug)]
pub struct Source<'a> {
    pub cluster: &'a Cluster,
    pub locals: Vec<Local<'a>>,
}

impl Source<'_> {
    /// The ports this source exposes: its first Service's.
    pub fn ports(&self) -> &[ExposedPort] {
        &self.locals[0].ports
    }
}

/// Which of an identity+env's hosts: the default one, or a Rollout's canary or preview host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    Default,
    Canary,
    Preview,
}

/// One host of an identity+env and the policy entry that configures it, if any.
#[derive(Clone, Debug)]
pub struct HostPlan<'a> {
    pub host: String,
    /// The variant's own host (a DestinationRule named `<host>-default-dr`), not a GTP prefix's.
    pub is_default: bool,
    pub policy: Option<&'a TrafficPolicy>,
}

/// The hosts of one variant and where they are served: the same sources for all of them.
#[derive(Clone, Debug)]
pub struct HostGroup<'a> {
    pub variant: Variant,
    /// One source per cluster, by cluster id.
    pub sources: BTreeMap<&'a str, Source<'a>>,
    pub hosts: Vec<HostPlan<'a>>,
}

/// An identity+env, resolved.
#[derive(Clone, Debug)]
pub struct EnvPlan<'a> {
    pub env: &'a str,
    /// The default host's group, and a Rollout's canary and preview hosts' when it has them.
    pub groups: BTreeMap<Variant, HostGroup<'a>>,
    pub gtp: Option<&'a Policy<GlobalTrafficPolicySpec>>,
    pub outlier: Option<&'a Policy<OutlierDetectionSpec>>,
    pub connection: Option<&'a Policy<ClientConnectionConfigSpec>>,
    /// Namespaces of this identity+env's workloads per cluster (for `exportTo`).
    pub namespaces: BTreeMap<&'a str, BTreeSet<&'a str>>,
}

impl<'a> EnvPlan<'a> {
    fn new(env: &'a str) -> Self {
        EnvPlan {
            env,
            groups: BTreeMap::new(),
            gtp: None,
            outlier: None,
            connection: None,
            namespaces: BTreeMap::new(),
        }
    }

    /// Groups with at least one source: what is written.
    pub fn served(&self) -> impl Iterator<Item = &HostGroup<'_>> {
        self.groups.values().filter(|g| !g.sources.is_empty())
    }
}

/// An identity, resolved: its envs, the clusters of its clients, and what was found wrong.
#[derive(Clone, Debug, Default)]
pub struct ResolvedIdentity<'a> {
    pub envs: BTreeMap<&'a str, EnvPlan<'a>>,
    /// Its federated workloads, in (cluster, namespace, name) order (its Sidecars select them):
    /// those that serve and those that only call (Jobs, CronJobs).
    pub federated: Vec<(&'a Cluster, &'a Workload)>,
    /// Members where identities that depend on this one run, ascending.
    pub client_clusters: Vec<ClusterIdx>,
    pub diagnostics: Vec<Diagnostic>,
    pub reports: Vec<PolicyReport>,
    /// Its written hosts, gathered once: every client's Sidecar and Dependency status lists them.
    written: Vec<String>,
}

impl ResolvedIdentity<'_> {
    /// Every host that is written somewhere (a group with at least one source), in order.
    pub fn written_hosts(&self) -> impl Iterator<Item = &str> {
        self.written.iter().map(String::as_str)
    }

    fn served_hosts(&self) -> impl Iterator<Item = &str> {
        self.envs.values().flat_map(|e| e.served()).flat_map(|g| g.hosts.iter().map(|h| h.host.as_str()))
    }
}

/// Every identity one recompute pass needs, resolved once before any object is built: those
/// being recomputed, and the destinations whose hosts their Sidecars list. The fleet does not
/// change during a pass, and the view is only read while objects are built (on every core).
pub struct PassView<'a> {
    pub running: Running<'a>,
    /// In the order given, found by name through `index`.
    resolved: Vec<ResolvedIdentity<'a>>,
    index: FxHashMap<&'a str, usize>,
}

impl<'a> PassView<'a> {
    pub fn new(running: Running<'a>, names: &[&'a str], resolved: Vec<ResolvedIdentity<'a>>) -> Self {
        let index = names.iter().enumerate().map(|(i, name)| (*name, i)).collect();
        PassView { running, resolved, index }
    }

    pub fn get(&self, identity: &str) -> Option<&ResolvedIdentity<'a>> {
        self.index.get(identity).map(|i| &self.resolved[*i])
    }

    /// What was resolved, to be freed.
    pub fn into_resolved(self) -> Vec<ResolvedIdentity<'a>> {
        self.resolved
    }

    /// The hosts `identity` writes somewhere (none if it was not resolved in this pass).
    pub fn written_hosts(&self, identity: &str) -> &[String] {
        self.get(identity).map_or(&[], |r| &r.written)
    }
}

/// Where identities run (members with a federated workload of theirs, ascending), gathered once
/// per pass: every destination asks it of each of its clients, and every client of itself.
pub struct Running<'a> {
    fleet: &'a Fleet,
    by_identity: FxHashMap<&'a str, Vec<ClusterIdx>>,
    /// Where the `*` clients run: clients of every identity.
    wildcard_clients: Vec<ClusterIdx>,
    /// The `*` clients by name, for every identity's list of clients.
    pub wildcard_names: Arc<BTreeSet<String>>,
}

impl<'a> Running<'a> {
    /// `by_identity` holds `fleet.clusters_running` of (at least) the pass's identities and
    /// their named clients; others are looked up in the fleet.
    pub fn new(fleet: &'a Fleet, by_identity: FxHashMap<&'a str, Vec<ClusterIdx>>) -> Self {
        let wildcard_names = Arc::new(fleet.wildcard_sources().map(str::to_string).collect());
        let mut running = Running { fleet, by_identity, wildcard_clients: Vec::new(), wildcard_names };
        let wildcard = union(fleet.wildcard_sources().map(|c| running.of(c).into_owned()));
        running.wildcard_clients = wildcard;
        running
    }

    pub fn of(&self, identity: &str) -> std::borrow::Cow<'_, [ClusterIdx]> {
        match self.by_identity.get(identity) {
            Some(clusters) => std::borrow::Cow::Borrowed(clusters),
            None => std::borrow::Cow::Owned(self.fleet.clusters_running(identity)),
        }
    }
}

/// The members in any of `sets`, ascending, without duplicates.
pub fn union(sets: impl IntoIterator<Item = impl IntoIterator<Item = ClusterIdx>>) -> Vec<ClusterIdx> {
    let mut all: Vec<ClusterIdx> = sets.into_iter().flatten().collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Resolves `identity` against the fleet. Pure.
pub fn resolve<'a>(
    fleet: &'a Fleet,
    settings: &Settings,
    running: &Running<'a>,
    identity: &str,
) -> ResolvedIdentity<'a> {
    let mut out = ResolvedIdentity::default();
    // Federated workloads, grouped by env; (cluster, namespace) pairs decide policy scope.
    let mut locations: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    // Claims its namespaces may not make, reported whatever else becomes of the identity.
    for (cluster, w) in fleet.workloads_of(identity) {
        if let Some(claim) = fleet.disallowed(cluster, w).filter(|c| c.is_reported()) {
            out.diagnostics.push(Diagnostic::warning(Some(&cluster.id), w.describe(), claim.note()));
        }
    }
    if let Some(owner) = case_owner(fleet, identity, &mut out.diagnostics) {
        // Its hosts and objects would be the owner's: it is not written at all.
        out.diagnostics.push(Diagnostic::error(
            None,
            format!("identity {identity}"),
            format!(
                "differs from identity {owner:?} only in case, and host and object names are lower-case; {owner:?} owns them (a Namespace allows it and not {identity:?}, or it is first in byte order), so nothing is written for {identity:?}"
            ),
        ));
        select_policies(fleet, identity, &locations, &mut out);
        return out;
    }
    for (cluster, w) in fleet.workloads_of(identity) {
        if matches!(w.rollout, Some(RolloutPlan::None)) && !w.opted_out {
            out.diagnostics.push(Diagnostic::warning(
                Some(&cluster.id),
                w.describe(),
                "has no strategy (blueGreen or canary): not federated".into(),
            ));
        }
    }
    out.federated = fleet.workloads_of(identity).filter(|(cluster, w)| cluster.is_federated(w)).collect();
    // Who speaks for a member where the identity runs in more than one namespace: a namespace
    // that names it, before one that allows any, before one that is not allowed (`open`); then
    // the oldest workload; then names. Never the name alone: a new namespace called "aaa" must
    // not take over an identity that already runs.
    let mut candidates: Vec<_> = out.federated.iter().filter(|(_, w)| w.kind.serves()).copied().collect();
    candidates.sort_by_cached_key(|(cluster, w)| {
        let standing = cluster.standing(&w.namespace, identity);
        (cluster.idx, standing, w.created.is_none(), w.created, w.namespace.clone(), w.name.clone())
    });
    // Per (env, variant, member): the workload whose namespace speaks there, and the kinds that
    // do. A Deployment and a Rollout of that namespace (at most one of each: a migration from one
    // to the other) both speak; nothing of another namespace does.
    let mut speakers: BTreeMap<(&str, Variant, &str), (&Workload, BTreeSet<bool>)> = BTreeMap::new();
    for &(cluster, w) in &candidates {
        let picked = services_of(cluster, w);
        // Opting out on the (first) Service takes the workload out of federation entirely.
        if picked.first().is_some_and(|(_, s, _)| s.opted_out) {
            continue;
        }
        let env = out.envs.entry(&w.env).or_insert_with(|| EnvPlan::new(&w.env));
        env.namespaces.entry(&cluster.id).or_default().insert(&w.namespace);
        locations.insert((w.env.as_str(), cluster.id.as_str(), w.namespace.as_str()));
        let (is_rollout, member) = (w.rollout.is_some(), cluster.id.as_str());
        if picked.is_empty() {
            let spoken = speakers.get(&(w.env.as_str(), Variant::Default, member));
            if !spoken.is_some_and(|(_, kinds)| kinds.contains(&is_rollout)) {
                out.diagnostics.push(Diagnostic::warning(
                    Some(&cluster.id),
                    w.describe(),
                    format!("identity {identity:?} has no Service selecting its pods; it contributes no endpoint"),
                ));
            }
            continue;
        }
        let mut silenced_by = None;
        // The slots this workload speaks in (one workload may give a slot several endpoints: a
        // weighted canary's stable and canary Services), taken once it is done.
        let mut speaking = Vec::new();
        for (variant, svc, weight) in picked {
            let slot = (w.env.as_str(), variant, member);
            match speakers.get(&slot) {
                Some((speaker, _)) if speaker.namespace != w.namespace => {
                    silenced_by = Some(*speaker);
                    continue;
                }
                // The first workload of its kind (in rank order) speaks for the namespace.
                Some((_, kinds)) if kinds.contains(&is_rollout) => continue,
                _ => {}
            }
            for problem in &svc.problems {
                out.diagnostics.push(Diagnostic::warning(
                    Some(&cluster.id),
                    format!("Service {}/{}", svc.namespace, svc.name),
                    problem.clone(),
                ));
            }
            let Some(ports) = exposed_ports(settings, w, svc) else {
                out.diagnostics.push(Diagnostic::warning(
                    Some(&cluster.id),
                    format!("Service {}/{}", svc.namespace, svc.name),
                    "has no ports; it contributes no endpoint".into(),
                ));
                continue;
            };
            let group = env.groups.entry(variant).or_insert_with(|| HostGroup {
                variant,
                sources: BTreeMap::new(),
                hosts: Vec::new(),
            });
            let source = group.sources.entry(&cluster.id).or_insert_with(|| Source { cluster, locals: Vec::new() });
            source.locals.push(Local { service: svc, ports, weight, workload: w });
            speaking.push(slot);
        }
        let spoke = !speaking.is_empty();
        for slot in speaking {
            speakers.entry(slot).or_insert_with(|| (w, BTreeSet::new())).1.insert(is_rollout);
        }
        if let Some(speaker) = silenced_by.filter(|_| !spoke) {
            out.diagnostics.push(silent_namespace(identity, cluster, w, speaker));
        }
    }

    let mut clients: Vec<ClusterIdx> = running.wildcard_clients.clone();
    for client in fleet.named_clients_of(identity) {
        clients.extend_from_slice(&running.of(client));
    }
    clients.sort_unstable();
    clients.dedup();
    out.client_clusters = clients;

    select_policies(fleet, identity, &locations, &mut out);

    for env in out.envs.values_mut() {
        let (env_name, gtp) = (env.env, env.gtp);
        for group in env.groups.values_mut() {
            group.hosts = hosts_of(settings, identity, env_name, gtp, group.variant, &mut out.diagnostics);
        }
    }
    drop_second_hosts(identity, &mut out);
    out.written = out.served_hosts().map(str::to_string).collect();
    out
}

/// Says on a workload that another namespace of its member speaks for its identity there, and
/// why: the speaker ranks first (see `resolve`).
fn silent_namespace(identity: &str, cluster: &Cluster, w: &Workload, speaker: &Workload) -> Diagnostic {
    let (mine, theirs) = (cluster.standing(&w.namespace, identity), cluster.standing(&speaker.namespace, identity));
    let why = if theirs < mine {
        match theirs {
            Standing::Named => "its flotilla.io/identities names the identity",
            _ => "its flotilla.io/identities allows any identity",
        }
    } else if speaker.created.is_some() && (w.created.is_none() || speaker.created < w.created) {
        "its workload is older"
    } else {
        "its namespace and name come first"
    };
    Diagnostic::warning(
        Some(&cluster.id),
        w.describe(),
        format!(
            "identity {identity:?} also runs in namespace {:?} of this cluster, which speaks for it here ({why}); this workload serves no endpoint",
            speaker.namespace
        ),
    )
}

/// Hosts are lower-case, so envs that differ only in case give the same host, and so does a GTP
/// prefix "canary" beside a Rollout's canary host: the first written keeps it, the others are
/// dropped and reported.
fn drop_second_hosts(identity: &str, out: &mut ResolvedIdentity<'_>) {
    let mut sorted: Vec<&str> = out.served_hosts().collect();
    sorted.sort_unstable();
    if sorted.windows(2).all(|pair| pair[0] != pair[1]) {
        return; // the usual case: nothing to drop
    }
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let diagnostics = &mut out.diagnostics;
    for env in out.envs.values_mut() {
        for group in env.groups.values_mut().filter(|g| !g.sources.is_empty()) {
            group.hosts.retain(|h| {
                let first = seen.insert(h.host.clone());
                if !first {
                    diagnostics.push(Diagnostic::error(
                        None,
                        format!("identity {identity}"),
                        format!("env {:?} gives host {:?} a second time; only the first is written", env.env, h.host),
                    ));
                }
                first
            });
        }
    }
}

/// Identities whose names differ only in case would write the same (lower-case) hosts and
/// objects: one owns them. A twin a Namespace allows (named or `*`) before one no Namespace
/// allows, then the first in byte order; a twin whose every claim is refused owns nothing (a decoy
/// `Payments` must not silence `payments`). Returns the owner when it is another identity; when
/// `identity` is the owner of twins, says so in a diagnostic.
fn case_owner<'a>(fleet: &'a Fleet, identity: &str, diagnostics: &mut Vec<Diagnostic>) -> Option<&'a str> {
    let accepted = |twin: &str| fleet.workloads_of(twin).any(|(c, w)| !c.is_refused(w));
    let allowed = |twin: &str| {
        fleet.workloads_of(twin).any(|(c, w)| c.claims(w) && c.standing(&w.namespace, twin) != Standing::NotAllowed)
    };
    let mut twins: Vec<&str> = fleet.case_twins(identity).filter(|t| accepted(t)).collect();
    // Stable: byte order among equals.
    twins.sort_by_key(|t| !allowed(t));
    let (owner, others) = twins.split_first()?;
    if *owner != identity {
        return Some(owner);
    }
    if !others.is_empty() {
        let others: Vec<String> = others.iter().map(|t| format!("{t:?}")).collect();
        diagnostics.push(Diagnostic::warning(
            None,
            format!("identity {identity}"),
            format!(
                "identities {} differ from it only in case and would write the same hosts; they are not written",
                others.join(", ")
            ),
        ));
    }
    None
}

/// Picks the winning GTP, OutlierDetection and ClientConnectionConfig per env and reports on
/// every policy that names the identity.
fn select_policies<'a>(
    fleet: &'a Fleet,
    identity: &str,
    locations: &BTreeSet<(&str, &str, &str)>,
    out: &mut ResolvedIdentity<'a>,
) {
    let applies = |p: &ObjectRef, env: &str| locations.contains(&(env, p.cluster.as_str(), p.namespace.as_str()));
    // A policy speaks for the identity only from a namespace that may run it (`owned`).
    let refused = |p: &ObjectRef| {
        let cluster = fleet.cluster(&p.cluster)?;
        (!cluster.may_speak(&p.namespace, identity)).then(|| {
            format!(
                "namespace {:?} of cluster {:?} may not run identity {identity:?} (Namespace annotation {ANNOTATION_IDENTITIES}), so its policies may not configure it",
                p.namespace, p.cluster
            )
        })
    };

    // Where several policies apply, one from a namespace that names the identity wins over one
    // from a `*` namespace, which wins over one from a namespace that may not run it (`open`):
    // a decoy's priority label does not outrank the owner's policy.
    let standing =
        |p: &ObjectRef| fleet.cluster(&p.cluster).map_or(Standing::NotAllowed, |c| c.standing(&p.namespace, identity));
    let judge = Judge { applies: &applies, refused: &refused, standing: &standing };

    struct Judge<'j> {
        applies: &'j dyn Fn(&ObjectRef, &str) -> bool,
        refused: &'j dyn Fn(&ObjectRef) -> Option<String>,
        standing: &'j dyn Fn(&ObjectRef) -> Standing,
    }

    fn pick<'a, S>(
        kind: Kind,
        policies: Vec<&'a Policy<S>>,
        use_priority: bool,
        judge: &Judge<'_>,
        reports: &mut Vec<PolicyReport>,
    ) -> BTreeMap<&'a str, &'a Policy<S>> {
        let Judge { applies, refused, standing } = judge;
        let mut by_env: BTreeMap<&'a str, Vec<&'a Policy<S>>> = BTreeMap::new();
        for p in policies {
            let state = if let Some(why) = refused(&p.at) {
                Some(PolicyState::Invalid(why))
            } else if !applies(&p.at, &p.env) {
                Some(PolicyState::NotApplied(format!(
                    "no workload of identity {:?} in env {:?} runs in namespace {:?} of cluster {:?}",
                    p.identity.as_deref().unwrap_or(""),
                    p.env,
                    p.at.namespace,
                    p.at.cluster
                )))
            } else if p.effective.is_none() {
                Some(PolicyState::Invalid(p.invalid.clone().unwrap_or_default()))
            } else {
                None
            };
            match state {
                Some(state) => reports.push(PolicyReport::new(kind, p, state)),
                None => by_env.entry(&p.env).or_default().push(p),
            }
        }
        let mut winners = BTreeMap::new();
        for (env, mut candidates) in by_env {
            rank(&mut candidates, use_priority);
            // Stable: the ranking stands among policies of equal standing.
            candidates.sort_by_key(|p| standing(&p.at));
            let winner = candidates[0];
            for (i, p) in candidates.iter().enumerate() {
                let state = if i == 0 {
                    match &p.invalid {
                        // Still applied: its last valid spec stays in force.
                        Some(reason) => {
                            PolicyState::Invalid(format!("{reason} (the previous valid spec stays in force)"))
                        }
                        None => PolicyState::Ready,
                    }
                } else {
                    PolicyState::Conflict(winner.at.clone())
                };
                reports.push(PolicyReport::new(kind, p, state));
            }
            winners.insert(env, winner);
        }
        winners
    }

    let gtps = pick(Kind::GlobalTrafficPolicy, fleet.gtps_of(identity).collect(), true, &judge, &mut out.reports);
    let ods =
        pick(Kind::OutlierDetection, fleet.outlier_detections_of(identity).collect(), false, &judge, &mut out.reports);
    let cccs = pick(
        Kind::ClientConnectionConfig,
        fleet.connection_configs_of(identity).collect(),
        false,
        &judge,
        &mut out.reports,
    );
    for (env, plan) in out.envs.iter_mut() {
        plan.gtp = gtps.get(env).copied();
        plan.outlier = ods.get(env).copied();
        plan.connection = cccs.get(env).copied();
    }
    // A decoy policy `open` still applies: from a namespace that may not run an identity that
    // other namespaces own.
    let decoy = |p: &ObjectRef| {
        fleet.tenancy() == Tenancy::Open
            && fleet.is_named_anywhere(identity)
            && fleet.cluster(&p.cluster).is_some_and(|c| c.standing(&p.namespace, identity) == Standing::NotAllowed)
    };
    for (policy, warnings) in fleet
        .gtps_of(identity)
        .map(|p| (&p.at, &p.warnings))
        .chain(fleet.outlier_detections_of(identity).map(|p| (&p.at, &p.warnings)))
        .chain(fleet.connection_configs_of(identity).map(|p| (&p.at, &p.warnings)))
    {
        let what = || format!("policy {}/{}", policy.namespace, policy.name);
        for w in warnings {
            out.diagnostics.push(Diagnostic::warning(Some(&policy.cluster), what(), w.clone()));
        }
        if decoy(policy) {
            out.diagnostics.push(Diagnostic::warning(
                Some(&policy.cluster),
                what(),
                format!(
                    "namespace {:?} may not run identity {identity:?}: other namespaces own it (Namespace annotation {ANNOTATION_IDENTITIES}); with --tenancy=open it applies unless a policy of a namespace allowed to run the identity does, Invalid under --tenancy=owned",
                    policy.namespace
                ),
            ));
        }
    }
}

/// A variant's own host, then (for the default and canary hosts) one host per prefixed policy
/// entry of the winning GTP.
fn hosts_of<'a>(
    settings: &Settings,
    identity: &str,
    env: &str,
    gtp: Option<&'a Policy<GlobalTrafficPolicySpec>>,
    variant: Variant,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<HostPlan<'a>> {
    let default_host = format!("{env}.{identity}.{}", settings.hostname_suffix).to_ascii_lowercase();
    let own = match variant {
        Variant::Default => default_host,
        Variant::Canary => format!("canary.{default_host}"),
        Variant::Preview => format!("preview.{default_host}"),
    };
    // A preview host takes no policy (as Admiral: its GTP expansion skips preview hosts).
    let entries: &'a [TrafficPolicy] = match variant {
        Variant::Preview => &[],
        _ => gtp.and_then(|g| g.effective.as_ref()).map(|s| s.policy.as_slice()).unwrap_or(&[]),
    };
    let mut hosts = vec![HostPlan {
        host: own.clone(),
        is_default: true,
        policy: entries.iter().find(|p| p.host_prefix(env).is_none()),
    }];
    for p in entries {
        if let Some(prefix) = p.host_prefix(env) {
            hosts.push(HostPlan {
                host: format!("{}.{own}", prefix.to_ascii_lowercase()),
                is_default: false,
                policy: Some(p),
            });
        }
    }
    hosts.retain(|h| {
        // The longest object name is "<host>-default-dr".
        let ok = is_dns_subdomain(&h.host) && h.host.len() + "-default-dr".len() <= 253;
        if !ok {
            diagnostics.push(Diagnostic::error(
                None,
                format!("identity {identity}"),
                format!(
                    "host {:?} does not give valid object names (RFC 1123, at most 253 characters); not written",
                    h.host
                ),
            ));
        }
        ok
    });
    hosts
}

/// The Services a workload is served by, per host variant, with weights: a Deployment's one
/// Service; a Rollout's as its strategy picks them (Admiral's rules).
fn services_of<'a>(cluster: &'a Cluster, w: &'a Workload) -> Vec<(Variant, &'a ServiceInfo, Option<u32>)> {
    let named = |name: &Option<String>| name.as_deref().and_then(|n| selecting(cluster, w).find(|s| s.name == n));
    let containing = |part: &str| selecting(cluster, w).filter(|s| s.name.contains(part)).min_by(oldest);
    let mut out = Vec::new();
    match &w.rollout {
        None => out.extend(find_service(cluster, w).map(|s| (Variant::Default, s, None))),
        Some(RolloutPlan::None) => {}
        Some(RolloutPlan::BlueGreen { active, preview }) => {
            let active = named(active).or_else(|| containing("active-service"));
            out.extend(active.map(|s| (Variant::Default, s, None)));
            if !out.is_empty() {
                out.extend(named(preview).map(|s| (Variant::Preview, s, None)));
            }
        }
        Some(RolloutPlan::Canary { stable }) => {
            let pick = containing("root-service").or_else(|| named(stable)).or_else(|| containing("stable-service"));
            out.extend(pick.or_else(|| find_service(cluster, w)).map(|s| (Variant::Default, s, None)));
        }
        Some(RolloutPlan::WeightedCanary { stable, canary, virtual_service }) => {
            let (Some(stable_svc), canary_svc) = (named(&Some(stable.clone())), named(&Some(canary.clone()))) else {
                return out;
            };
            match route_weights(cluster, w, virtual_service.as_ref(), stable, canary) {
                // Stable only: no VirtualService, or no route of it that names the Services.
                None => out.push((Variant::Default, stable_svc, None)),
                Some((to_stable, to_canary)) => {
                    if to_stable > 0 {
                        out.push((Variant::Default, stable_svc, Some(to_stable)));
                    }
                    if let Some(c) = canary_svc.filter(|_| to_canary > 0) {
                        out.push((Variant::Default, c, Some(to_canary)));
                    }
                }
            }
            out.extend(canary_svc.map(|s| (Variant::Canary, s, None)));
        }
    }
    out
}

/// The weights a canary's VirtualService route gives its stable and canary Services: the route
/// the Rollout names (its first), else the VirtualService's only HTTP route.
fn route_weights(
    cluster: &Cluster,
    w: &Workload,
    virtual_service: Option<&(String, Vec<String>)>,
    stable: &str,
    canary: &str,
) -> Option<(u32, u32)> {
    let (name, routes) = virtual_service?;
    let (namespace, name) = match name.split_once('/') {
        Some((ns, n)) => (ns.to_string(), n.to_string()),
        None => (w.namespace.clone(), name.clone()),
    };
    let http = cluster.virtual_services.get(&(namespace, name))?;
    let route = match routes.first() {
        Some(wanted) => http.iter().find(|r| r.name.as_deref() == Some(wanted.as_str()))?,
        None if http.len() == 1 => &http[0],
        None => return None,
    };
    // A destination names a Service by its short name or a longer form of it.
    let is = |host: &str, svc: &str| host == svc || host.strip_prefix(svc).is_some_and(|rest| rest.starts_with('.'));
    let weight_of = |svc: &str| -> Option<u32> {
        route.destinations.iter().find(|(h, _)| is(h, svc)).map(|(_, weight)| u32::try_from(*weight).unwrap_or(0))
    };
    let (s, c) = (weight_of(stable), weight_of(canary));
    if s.is_none() && c.is_none() {
        return None;
    }
    Some((s.unwrap_or(0), c.unwrap_or(0)))
}

fn oldest(a: &&ServiceInfo, b: &&ServiceInfo) -> std::cmp::Ordering {
    a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name))
}

/// Services in the workload's namespace whose non-empty selector matches its pods (Argo's
/// `rollouts-pod-template-hash` left out of the comparison).
fn selecting<'a>(cluster: &'a Cluster, w: &'a Workload) -> impl Iterator<Item = &'a ServiceInfo> + 'a {
    cluster.services_in(&w.namespace).filter(move |s| {
        !s.selector.is_empty()
            && s.selector
                .iter()
                .filter(|(k, _)| k.as_str() != LABEL_POD_TEMPLATE_HASH)
                .all(|(k, v)| w.pod_labels.get(k) == Some(v))
    })
}

/// The oldest Service in the workload's namespace whose non-empty selector matches its pods.
pub fn find_service<'a>(cluster: &'a Cluster, w: &'a Workload) -> Option<&'a ServiceInfo> {
    selecting(cluster, w).min_by(oldest)
}

/// The ports a host exposes for this source: the mesh port only, or every Service port.
fn exposed_ports(settings: &Settings, w: &Workload, svc: &ServiceInfo) -> Option<Vec<ExposedPort>> {
    let mesh = mesh_port(w, svc)?;
    Some(match settings.expose_ports {
        ExposePorts::Primary => {
            let protocol = protocol_of(mesh);
            vec![ExposedPort {
                number: u32::from(settings.global_port),
                name: protocol.to_ascii_lowercase(),
                protocol,
                service_port: u32::from(mesh.port),
            }]
        }
        ExposePorts::All => {
            let mut ports: Vec<ExposedPort> = svc
                .ports
                .iter()
                .map(|p| {
                    let protocol = protocol_of(p);
                    let name = p
                        .name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| format!("{}-{}", protocol.to_ascii_lowercase(), p.port));
                    ExposedPort { number: u32::from(p.port), name, protocol, service_port: u32::from(p.port) }
                })
                .collect();
            ports.sort_by_key(|p| p.number);
            ports.dedup_by_key(|p| p.number);
            ports
        }
    })
}

/// The Service port whose target port is the first `includeInboundPorts` port, else the first.
pub fn mesh_port<'a>(w: &Workload, svc: &'a ServiceInfo) -> Option<&'a ServicePortInfo> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let by_inbound = w.inbound_port.and_then(|inbound| {
        svc.ports.iter().find(|p| match &p.target_port {
            Some(IntOrString::Int(t)) => *t == i32::from(inbound),
            Some(IntOrString::String(_)) => false,
            None => p.port == inbound, // targetPort defaults to port
        })
    });
    by_inbound.or_else(|| svc.ports.first())
}

const PROTOCOLS: [&str; 10] = ["HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTPS", "TLS", "TCP", "MONGO", "REDIS", "MYSQL"];

/// `appProtocol`, else the port-name prefix before the first '-', else HTTP.
pub fn protocol_of(p: &ServicePortInfo) -> &'static str {
    let known = |s: &str| PROTOCOLS.iter().find(|k| k.eq_ignore_ascii_case(s)).copied();
    let from_app = p.app_protocol.as_deref().and_then(|a| match a {
        "kubernetes.io/h2c" => Some("HTTP2"),
        "kubernetes.io/ws" => Some("HTTP"),
        "kubernetes.io/wss" => Some("HTTPS"),
        other => known(other),
    });
    from_app
        .or_else(|| {
            let name = p.name.as_deref()?;
            // "grpc-web" is a protocol of its own, not "grpc" with a suffix.
            if name.len() >= 8 && name[..8].eq_ignore_ascii_case("grpc-web") {
                return Some("GRPC-WEB");
            }
            known(name.split('-').next()?)
        })
        .unwrap_or("HTTP")
}
