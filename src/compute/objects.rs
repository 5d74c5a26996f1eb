//! Builds the ServiceEntries, DestinationRules and Sidecars of one identity, per target cluster,
//! from the resolved identity. This is where "contextual" config happens: the same host gets a
//! local endpoint in its own cluster, gateway endpoints elsewhere, and a failover origin that
//! depends on the region of the cluster it is written to.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{ConnectionPool, HttpSettings, LbType, OutlierConfig, h2_upgrade_policy_name};
use crate::istio::{
    ClientTls, Destination, DestinationRuleSpec, Distribute, EgressListener, HttpRoute, LoadBalancer,
    LocalityLbSetting, OutlierDetection, PortSelector, RouteDestination, ServiceEntrySpec, ServicePort, SidecarSpec,
    TrafficPolicy, VirtualServiceSpec, WorkloadEntry, WorkloadSelector,
};
use crate::meta::{GATEWAY_NAMESPACE, Kind, LABEL_TLS_MODE, is_dns_subdomain, managed_labels};
use crate::model::{Cluster, ClusterId, ClusterIdx, Fleet, ForeignSidecar, Workload};
use crate::settings::{ExportTo, SanForm, Settings, SidecarMode, Tenancy, VipMode};

use super::identity::{EnvPlan, ExposedPort, HostGroup, HostPlan, PassView, ResolvedIdentity, Source, union};
use super::vip::{VipExhausted, VipTable};
use super::{
    Clients, Desired, DesiredSpec, Diagnostic, Facts, IdentityOutput, ManagedLabels, Notice, Placed, PolicyInForce,
    PolicyReport, PolicyState,
};

/// Everything one identity contributes to the desired state of the fleet. Reads only: VIPs were
/// allocated and identities resolved for the whole pass beforehand, so identities can be built on
/// any core.
pub fn compute_identity(
    fleet: &Fleet,
    settings: &Settings,
    facts: &Facts,
    pass: &PassView<'_>,
    identity: &str,
    vips: &VipTable,
) -> IdentityOutput {
    let Some(resolved) = pass.get(identity) else {
        return IdentityOutput::default();
    };
    let mut out = IdentityOutput {
        diagnostics: resolved.diagnostics.clone(),
        reports: resolved.reports.clone(),
        hosts: resolved.written_hosts().map(str::to_string).collect(),
        sources: resolved.federated.iter().filter(|(_, w)| w.kind.serves()).map(|(c, _)| c.id.clone()).collect(),
        clients: Clients {
            named: fleet.named_clients_of(identity).map(str::to_string).collect(),
            wildcard: pass.running.wildcard_names.clone(),
        },
        ..Default::default()
    };

    // Aliases of its hosts under other suffixes (Admiral's additional endpoints), where a workload
    // of its own or of a client asks for them.
    let aliased = !settings.alias_suffixes.is_empty() && wants_aliases(fleet, settings, identity);
    for env in resolved.envs.values() {
        if let Some(gtp) = env.gtp.filter(|p| p.effective.is_some()) {
            out.gtps.push(PolicyInForce {
                env: env.env.to_string(),
                at: gtp.at.clone(),
                generation: gtp.generation,
                spec: gtp.effective.clone().expect("filtered on"),
            });
        }
        if env.served().next().is_none() {
            out.diagnostics.push(Diagnostic::warning(
                None,
                format!("identity {identity}"),
                format!("env {:?} has no endpoint in any cluster; its hosts are not written", env.env),
            ));
            continue;
        }
        // Where the winning policies took effect, for their status (only if there are any).
        let winners = [
            env.gtp.map(|p| (Kind::GlobalTrafficPolicy, &p.at)),
            env.outlier.map(|p| (Kind::OutlierDetection, &p.at)),
            env.connection.map(|p| (Kind::ClientConnectionConfig, &p.at)),
        ];
        let record_written = winners.iter().any(Option::is_some);
        let mut written: BTreeMap<ClusterId, BTreeSet<String>> = BTreeMap::new();
        let labels = Arc::new(managed_labels(identity, env.env, &settings.instance));
        for group in env.served() {
            check_port_agreement(identity, env.env, group, &mut out.diagnostics);
            let sources = group.sources.values().map(|s| s.cluster.idx);
            let targets = union([sources.collect(), resolved.client_clusters.clone()]);
            for host in &group.hosts {
                let vip = match settings.vip_mode {
                    VipMode::None => None,
                    // Allocated for every written host before the pass built anything; missing only
                    // when the range is exhausted.
                    VipMode::Allocate => match vips.get(&host.host) {
                        Some(ip) => Some(ip.to_string()),
                        None => {
                            let e = VipExhausted { cidr: settings.vip_cidr.to_string(), host: host.host.clone() };
                            out.diagnostics.push(Diagnostic::error(
                                None,
                                format!("identity {identity}"),
                                e.to_string(),
                            ));
                            continue;
                        }
                    },
                };
                // Targets differ only by where they stand: which source they are (if any), their
                // region, and (with --export-to=dependents) their exportTo. Targets standing in the
                // same place share one object (its index in `out.objects`). Places are few, so
                // they are searched in a list.
                let mut entries: Vec<(EntryView, Option<BuiltEntry>)> = Vec::new();
                // The alias VirtualService, by exportTo (its only part that differs by target).
                let mut aliases: Vec<(Vec<String>, Option<usize>)> = Vec::new();
                let mut rules: Vec<(RuleView, usize)> = Vec::new();
                // Only a FAILOVER rule depends on the target's region (it distributes from there).
                let failover = host.policy.is_some_and(|p| matches!(p.lb_type(), Ok(LbType::Failover)));
                for &target in &targets {
                    let Some(target_facts) = facts.get(target) else {
                        continue;
                    };
                    // Someone else's ServiceEntry holds the host here: nothing of ours for it, not even
                    // a DestinationRule (it would apply our traffic policy to their service).
                    if let Some((ns, name)) =
                        fleet.cluster_at(target).and_then(|c| c.foreign_holder_of(&settings.sync_namespace, &host.host))
                    {
                        out.diagnostics.push(Diagnostic::warning(
                            Some(&*target_facts.id),
                            format!("host {}", host.host),
                            format!("ServiceEntry {ns}/{name} is not managed by flotilla and holds this host (or its name); nothing is written for the host in this cluster"),
                        ));
                        continue;
                    }
                    let local = group.sources.values().any(|s| s.cluster.idx == target).then_some(target);
                    let export_to = export_to(fleet, settings, resolved, env, identity, &target_facts.id[..]);
                    let view = (local, export_to);
                    let built = match entries.iter().find(|(v, _)| *v == view) {
                        Some((_, built)) => built.clone(),
                        None => {
                            let (endpoints, withheld) = endpoints_for(group, target, facts);
                            let ejection = Ejection::of(&endpoints);
                            let built = (!endpoints.is_empty()).then(|| {
                                let se = service_entry(
                                    settings,
                                    identity,
                                    group,
                                    host,
                                    vip.clone(),
                                    endpoints,
                                    view.1.clone(),
                                    &labels,
                                );
                                (place(&mut out.objects, se), ejection, Arc::new(withheld))
                            });
                            entries.push((view.clone(), built.clone()));
                            built
                        }
                    };
                    let Some((entry, ejection, withheld)) = built else {
                        continue;
                    };
                    if aliased {
                        let alias = match aliases.iter().find(|(e, _)| *e == view.1) {
                            Some((_, alias)) => *alias,
                            None => {
                                let vs =
                                    alias_service(settings, group, host, view.1.clone(), &labels, &mut out.diagnostics);
                                let alias = vs.map(|vs| place(&mut out.objects, vs));
                                aliases.push((view.1.clone(), alias));
                                alias
                            }
                        };
                        if let Some(alias) = alias {
                            out.objects[alias].clusters.push(target);
                        }
                    }
                    let region = target_facts.region.as_deref();
                    if failover && region.is_none() {
                        out.diagnostics.push(Diagnostic::warning(
                            Some(&*target_facts.id),
                            format!("host {}", host.host),
                            "FAILOVER needs the region of this cluster, which has none; its traffic is distributed from \"*\""
                                .into(),
                        ));
                    }
                    let view = (region.filter(|_| failover), ejection, view.1, withheld);
                    let rule = match rules.iter().find(|(v, _)| *v == view) {
                        Some((_, rule)) => *rule,
                        None => {
                            let (region, ejection, export_to, withheld) = view.clone();
                            let dr =
                                destination_rule(settings, env, host, region, &withheld, ejection, export_to, &labels);
                            let rule = place(&mut out.objects, dr);
                            rules.push((view, rule));
                            rule
                        }
                    };
                    out.objects[entry].clusters.push(target);
                    out.objects[rule].clusters.push(target);
                    if record_written {
                        written.entry(target_facts.id.to_string()).or_default().insert(host.host.clone());
                    }
                }
            }
        }
        if record_written {
            // Members that got the same hosts share one set.
            let mut shared: Vec<Arc<BTreeSet<String>>> = Vec::new();
            let written: BTreeMap<ClusterId, Arc<BTreeSet<String>>> = written
                .into_iter()
                .map(|(c, hosts)| match shared.iter().find(|s| ***s == hosts) {
                    Some(same) => (c, same.clone()),
                    None => {
                        shared.push(Arc::new(hosts));
                        (c, shared[shared.len() - 1].clone())
                    }
                })
                .collect();
            // A drain in force is said in the winning policies' status.
            let drained: BTreeSet<&str> = env
                .served()
                .flat_map(|g| g.sources.values())
                .filter(|s| facts.get(s.cluster.idx).is_some_and(|f| f.drained))
                .map(|s| s.cluster.id.as_str())
                .collect();
            for report in out.reports.iter_mut() {
                if winners.iter().flatten().any(|(k, at)| *k == report.kind && **at == report.at) {
                    report.clusters = written.clone();
                    if !drained.is_empty() {
                        let members: Vec<&str> = drained.iter().copied().collect();
                        report.message = format!(
                            "drain in force: {} (flotilla.io/drain); traffic goes to the other members wherever one serves the host",
                            members.join(", ")
                        );
                    }
                }
            }
        }
    }

    sidecars_and_dependency_reports(fleet, settings, facts, pass, resolved, identity, &mut out);
    // Keys in order, each object's members in order: what the desired state reads them by. The
    // diagnostics in order too: how they were met follows member numbers, which differ between
    // runs.
    out.diagnostics.sort();
    out.diagnostics.dedup();
    for placed in &mut out.objects {
        placed.clusters.sort_unstable();
        placed.clusters.dedup();
    }
    out.objects.retain(|p| !p.clusters.is_empty());
    out.objects.sort_by(|a, b| a.desired.key.cmp(&b.desired.key));
    out
}

/// Whether an identity's hosts get aliases: `*` among `--additional-endpoint-label`, or a
/// federated workload of its own or of one of its clients carrying one of those labels (as
/// Admiral's `doGenerateAdditionalEndpoints` decides).
fn wants_aliases(fleet: &Fleet, settings: &Settings, identity: &str) -> bool {
    let asks = |id: &str| fleet.workloads_of(id).any(|(c, w)| w.wants_aliases && c.is_federated(w));
    settings.keys.alias_labels.iter().any(|k| k == "*")
        || asks(identity)
        || fleet.clients_of(identity).into_iter().any(asks)
}

/// The alias VirtualService of `host`: the same name under every `--additional-endpoint-suffix`,
/// routed to the host on its first port, named after its first alias (as Admiral names it).
fn alias_service(
    settings: &Settings,
    group: &HostGroup<'_>,
    host: &HostPlan<'_>,
    export_to: Vec<String>,
    labels: &ManagedLabels,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Desired> {
    let hosts = alias_hosts(settings, &host.host);
    let name = format!("{}-vs", hosts.first()?);
    if !is_dns_subdomain(&name) {
        diagnostics.push(Diagnostic::error(
            None,
            format!("host {}", host.host),
            format!("alias VirtualService name {name:?} is not a valid object name; not written"),
        ));
        return None;
    }
    let first = host_ports(group).first()?;
    if !matches!(first.protocol, "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB") {
        diagnostics.push(Diagnostic::warning(
            None,
            format!("host {}", host.host),
            format!("its first port speaks {}, which an HTTP route of an alias VirtualService cannot carry; no alias is written", first.protocol),
        ));
        return None;
    }
    let port = Some(PortSelector { number: first.number });
    let route = RouteDestination { destination: Destination { host: host.host.clone(), port }, weight: None };
    let spec = VirtualServiceSpec { hosts, http: vec![HttpRoute { name: None, route: vec![route] }], export_to };
    Some(Desired::new(&settings.sync_namespace, &name, labels.clone(), DesiredSpec::VirtualService(spec)))
}

/// `host` under every `--additional-endpoint-suffix` in place of `--hostname-suffix`.
fn alias_hosts(settings: &Settings, host: &str) -> Vec<String> {
    let Some(stem) = host.strip_suffix(settings.hostname_suffix.as_str()).and_then(|s| s.strip_suffix('.')) else {
        return Vec::new();
    };
    settings.alias_suffixes.iter().map(|suffix| format!("{stem}.{suffix}")).collect()
}

/// Adds an object with no members yet; returns its index.
fn place(objects: &mut Vec<Placed>, object: Desired) -> usize {
    objects.push(Placed { desired: Arc::new(object), clusters: Vec::new() });
    objects.len() - 1
}

/// Where a target stands for a ServiceEntry: the source it is (if any) and its exportTo.
type EntryView = (Option<ClusterIdx>, Vec<String>);

/// A ServiceEntry built for one place: its index in the output, how far its endpoints may be
/// ejected, and what a drain withheld from them.
type BuiltEntry = (usize, Ejection, Arc<Withheld>);

/// Where a target stands for a DestinationRule: its region (for FAILOVER only), how far its
/// endpoints may be ejected, its exportTo, and what a drain withheld from its endpoints.
type RuleView<'a> = (Option<&'a str>, Ejection, Vec<String>, Arc<Withheld>);

/// What a drain took out of one target's endpoints of a host: the regions only drained members
/// serve it from there, and the regions of the endpoints it kept. Empty when nothing was taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Withheld {
    regions: BTreeSet<String>,
    kept: BTreeSet<String>,
}

/// How much of a host's endpoints outlier detection may eject in one cluster, as Admiral decides
/// it: a lone endpoint that is the local Service or a gateway IP is never ejected (no outlier
/// detection: there is nowhere else to go); a lone gateway known by name, up to a third (its
/// name resolves to several addresses); several endpoints, all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Ejection {
    Never,
    Third,
    All,
}

impl Ejection {
    fn of(endpoints: &[WorkloadEntry]) -> Ejection {
        match endpoints {
            [one]
                if one.address.ends_with(".svc.cluster.local") || one.address.parse::<std::net::Ipv4Addr>().is_ok() =>
            {
                Ejection::Never
            }
            [_] => Ejection::Third,
            _ => Ejection::All,
        }
    }
}

/// The ports of a host: those of its first source cluster (by id). Every endpoint maps these
/// names, whatever its own Service calls them.
fn host_ports<'a>(group: &'a HostGroup<'_>) -> &'a [ExposedPort] {
    group.sources.values().next().expect("a group with sources").ports()
}

/// One endpoint per source cluster, as seen from `target`: in its own cluster, the local
/// Services (one per Service behind the host there, weighted for a canary); elsewhere the
/// source's gateway (sources without a gateway are unreachable from outside). A drained source's
/// endpoints are left out, unless no other source has one: a drain moves traffic, it never
/// leaves a host with nowhere to go.
fn endpoints_for(group: &HostGroup<'_>, target: ClusterIdx, facts: &Facts) -> (Vec<WorkloadEntry>, Withheld) {
    let all = endpoints_from(group, group.sources.values(), target, facts);
    let drained = |s: &&Source<'_>| facts.get(s.cluster.idx).is_some_and(|f| f.drained);
    if !group.sources.values().any(|s| drained(&s)) {
        return (all, Withheld::default());
    }
    let kept = endpoints_from(group, group.sources.values().filter(|s| !drained(s)), target, facts);
    if kept.is_empty() {
        return (all, Withheld::default());
    }
    let regions = |endpoints: &[WorkloadEntry]| endpoints.iter().filter_map(|e| e.locality.clone()).collect();
    let (all_regions, kept_regions): (BTreeSet<String>, BTreeSet<String>) = (regions(&all), regions(&kept));
    let withheld = Withheld { regions: all_regions.difference(&kept_regions).cloned().collect(), kept: kept_regions };
    (kept, withheld)
}

fn endpoints_from<'s, 'a: 's>(
    group: &HostGroup<'a>,
    sources: impl Iterator<Item = &'s Source<'a>>,
    target: ClusterIdx,
    facts: &Facts,
) -> Vec<WorkloadEntry> {
    let ports = host_ports(group);
    let mut endpoints = Vec::new();
    for source in sources {
        let Some(source_facts) = facts.get(source.cluster.idx) else {
            continue;
        };
        if source.cluster.idx == target {
            for local in &source.locals {
                // The host's port N is this Service's port N (all ports), or its mesh port (primary).
                let local_port = |p: &ExposedPort| match local.ports.as_slice() {
                    [only] if ports.len() == 1 => Some(only.service_port),
                    own => own.iter().find(|o| o.number == p.number).map(|o| o.service_port),
                };
                endpoints.push(WorkloadEntry {
                    address: format!("{}.{}.svc.cluster.local", local.service.name, local.service.namespace),
                    ports: ports.iter().filter_map(|p| Some((p.name.clone(), local_port(p)?))).collect(),
                    locality: source_facts.region.clone(),
                    labels: BTreeMap::new(),
                    weight: local.weight,
                });
            }
        } else if let Some(gateway) = &source_facts.gateway_address {
            endpoints.push(WorkloadEntry {
                address: gateway.clone(),
                ports: ports.iter().map(|p| (p.name.clone(), u32::from(source_facts.gateway_port))).collect(),
                locality: source_facts.region.clone(),
                labels: BTreeMap::from([(LABEL_TLS_MODE.into(), "istio".into())]),
                weight: None,
            });
        }
    }
    endpoints
}

/// Sources whose ports disagree with the host's (taken from the first source) are reported.
fn check_port_agreement(identity: &str, env: &str, group: &HostGroup<'_>, diagnostics: &mut Vec<Diagnostic>) {
    let ports = host_ports(group);
    let (first_id, _) = group.sources.iter().next().expect("a group with sources");
    for (id, source) in group.sources.iter().skip(1) {
        let theirs = source.ports();
        let same = theirs.len() == ports.len()
            && theirs.iter().zip(ports).all(|(a, b)| a.number == b.number && a.protocol == b.protocol);
        if !same {
            let show = |ps: &[ExposedPort]| {
                ps.iter().map(|p| format!("{}/{}", p.number, p.protocol)).collect::<Vec<_>>().join(",")
            };
            let svc = source.locals[0].service;
            diagnostics.push(Diagnostic::warning(
                Some(id),
                format!("Service {}/{}", svc.namespace, svc.name),
                format!(
                    "identity {identity:?} env {env:?} exposes {} here but {} in cluster {first_id}; the host uses {first_id}'s ports",
                    show(theirs),
                    show(ports)
                ),
            ));
        }
    }
}

/// `exportTo` for `--export-to=dependents`: istio-system, the identity's own namespaces and its
/// clients' namespaces in the target cluster.
fn export_to(
    fleet: &Fleet,
    settings: &Settings,
    resolved: &ResolvedIdentity<'_>,
    env: &EnvPlan<'_>,
    identity: &str,
    target: &str,
) -> Vec<String> {
    if settings.export_to == ExportTo::All {
        return Vec::new();
    }
    // As Admiral: in a cluster where the identity runs, the gateway's namespace and its own;
    // everywhere, its clients' namespaces; past `MAX_EXPORT_NAMESPACES`, everyone.
    let mut namespaces: BTreeSet<String> = BTreeSet::new();
    if let Some(own) = env.namespaces.get(target) {
        namespaces.insert(GATEWAY_NAMESPACE.to_string());
        namespaces.extend(own.iter().map(|ns| ns.to_string()));
    }
    if !resolved.client_clusters.is_empty() {
        for client in fleet.clients_of(identity) {
            for (cluster, w) in fleet.workloads_of(client) {
                if cluster.id == target && cluster.is_federated(w) {
                    namespaces.insert(w.namespace.clone());
                }
            }
        }
    }
    if namespaces.len() > MAX_EXPORT_NAMESPACES {
        return vec!["*".to_string()];
    }
    namespaces.into_iter().collect()
}

/// Admiral's `--exportto_max_namespaces` default: a longer list is replaced by `*`.
const MAX_EXPORT_NAMESPACES: usize = 35;

#[allow(clippy::too_many_arguments)]
fn service_entry(
    settings: &Settings,
    identity: &str,
    group: &HostGroup<'_>,
    host: &HostPlan<'_>,
    vip: Option<String>,
    endpoints: Vec<WorkloadEntry>,
    export_to: Vec<String>,
    labels: &ManagedLabels,
) -> Desired {
    // The first source cluster (by id) defines the ports; they are the same everywhere for a
    // well-formed identity.
    let ports = host_ports(group)
        .iter()
        .map(|p| ServicePort { number: p.number, name: p.name.clone(), protocol: p.protocol.into() })
        .collect();
    let name = format!("{}-se", host.host);
    let spec = ServiceEntrySpec {
        hosts: vec![host.host.clone()],
        addresses: vip.into_iter().collect(),
        ports,
        location: "MESH_INTERNAL".into(),
        resolution: "DNS".into(),
        endpoints,
        export_to,
        subject_alt_names: subject_alt_names(settings, identity, group),
    };
    Desired::new(&settings.sync_namespace, &name, labels.clone(), DesiredSpec::ServiceEntry(spec))
}

/// The names a client's sidecar accepts on the certificates of a host's endpoints: those of
/// every workload that serves it, in each member's trust domain (so a workload that answers in
/// their place, say behind a stolen address, is refused), or Admiral's one name per identity.
/// The same in every member, whichever endpoints it sees: the object is shared.
fn subject_alt_names(settings: &Settings, identity: &str, group: &HostGroup<'_>) -> Vec<String> {
    match settings.san_form {
        SanForm::Off => Vec::new(),
        SanForm::Identity => vec![format!("spiffe://{}/{identity}", settings.san_prefix)],
        SanForm::Workload => {
            let names: BTreeSet<String> = group
                .sources
                .values()
                .flat_map(|source| {
                    let domain = source.cluster.overrides.trust_domain.as_deref().unwrap_or(&settings.trust_domain);
                    source.locals.iter().map(move |local| {
                        let w = local.workload;
                        format!("spiffe://{domain}/ns/{}/sa/{}", w.namespace, w.service_account())
                    })
                })
                .collect();
            names.into_iter().collect()
        }
    }
}

/// A FAILOVER distribution without the regions a drain withheld, its weights scaled back to 100
/// (largest remainders first, then by region). None (distribute nothing) when none of the regions
/// left holds an endpoint the target keeps: Istio would drop every endpoint it does not name.
fn without_drained(to: BTreeMap<String, u32>, withheld: &Withheld) -> Option<BTreeMap<String, u32>> {
    if !to.keys().any(|r| withheld.regions.contains(r)) {
        return Some(to);
    }
    let kept: BTreeMap<String, u32> = to.into_iter().filter(|(r, _)| !withheld.regions.contains(r)).collect();
    let total: u32 = kept.values().sum();
    if total == 0 || !kept.keys().any(|r| withheld.kept.contains(r)) {
        return None;
    }
    let mut scaled: BTreeMap<String, u32> = kept.iter().map(|(r, w)| (r.clone(), w * 100 / total)).collect();
    let mut remainders: Vec<(u32, &String)> = kept.iter().map(|(r, w)| (w * 100 % total, r)).collect();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let short = 100 - scaled.values().sum::<u32>();
    for (_, region) in remainders.into_iter().take(short as usize) {
        *scaled.get_mut(region).expect("a kept region") += 1;
    }
    Some(scaled)
}

/// The DestinationRule of `host` as a member in `region` sees it (the region matters only to
/// FAILOVER, which distributes from there; without one, from "*").
#[allow(clippy::too_many_arguments)]
fn destination_rule(
    settings: &Settings,
    env: &EnvPlan<'_>,
    host: &HostPlan<'_>,
    region: Option<&str>,
    withheld: &Withheld,
    ejection: Ejection,
    export_to: Vec<String>,
    labels: &ManagedLabels,
) -> Desired {
    let name = if host.is_default { format!("{}-default-dr", host.host) } else { format!("{}-dr", host.host) };
    let locality_lb_setting = host.policy.and_then(|p| match p.lb_type().ok()? {
        LbType::Topology => Some(LocalityLbSetting { distribute: Vec::new(), enabled: Some(true) }),
        LbType::Failover => {
            let from = region.map(|r| format!("{r}/*")).unwrap_or_else(|| "*".into());
            let to: BTreeMap<String, u32> = p
                .target
                .iter()
                .flatten()
                .filter(|t| t.weight.unwrap_or(0) > 0)
                .map(|t| (t.region.trim().to_string(), t.weight.unwrap_or(0) as u32))
                .collect();
            // Istio drops the endpoints of localities a distribution does not name: a drained
            // region must leave it, or the traffic would go nowhere.
            let to = without_drained(to, withheld)?;
            Some(LocalityLbSetting { distribute: vec![Distribute { from, to }], enabled: None })
        }
    });
    let outlier_detection = (ejection != Ejection::Never).then(|| {
        let gtp_outlier = host.policy.and_then(|p| p.outlier_detection.as_ref());
        let od_outlier = env.outlier.and_then(|o| o.effective.as_ref()).and_then(|s| s.outlier_config.as_ref());
        let max_ejection_percent = if ejection == Ejection::Third { 33 } else { 100 };
        OutlierDetection { max_ejection_percent, ..outlier_detection(gtp_outlier, od_outlier) }
    });
    let connection_pool = env
        .connection
        .and_then(|c| c.effective.as_ref())
        .and_then(|s| s.connection_pool.clone())
        .map(normalise_connection_pool)
        .unwrap_or_else(|| ConnectionPool {
            tcp: None,
            http: Some(HttpSettings { max_requests_per_connection: Some(100), ..Default::default() }),
        });
    let spec = DestinationRuleSpec {
        host: host.host.clone(),
        traffic_policy: Some(TrafficPolicy {
            tls: Some(ClientTls { mode: "ISTIO_MUTUAL".into() }),
            connection_pool: Some(connection_pool),
            load_balancer: Some(LoadBalancer {
                simple: "LEAST_REQUEST".into(),
                locality_lb_setting,
                warmup_duration_secs: (settings.warmup_seconds > 0).then(|| format!("{}s", settings.warmup_seconds)),
            }),
            outlier_detection,
        }),
        export_to,
    };
    Desired::new(&settings.sync_namespace, &name, labels.clone(), DesiredSpec::DestinationRule(spec))
}

/// Defaults, then the GTP entry's non-zero fields, then the OutlierDetection's non-zero fields.
fn outlier_detection(gtp: Option<&OutlierConfig>, od: Option<&OutlierConfig>) -> OutlierDetection {
    let mut consecutive_gateway_errors: i64 = 50;
    let mut interval: i64 = 60;
    let mut base_ejection_time: i64 = 300;
    for cfg in [gtp, od].into_iter().flatten() {
        if let Some(v) = cfg.consecutive_gateway_errors.filter(|v| *v > 0) {
            consecutive_gateway_errors = v;
        }
        if let Some(v) = cfg.interval.filter(|v| *v > 0) {
            interval = v;
        }
        if let Some(v) = cfg.base_ejection_time.filter(|v| *v > 0) {
            base_ejection_time = v;
        }
    }
    OutlierDetection {
        consecutive_gateway_errors: consecutive_gateway_errors.min(i64::from(u32::MAX)) as u32,
        consecutive_5xx_errors: 0,
        interval: format!("{interval}s"),
        base_ejection_time: format!("{base_ejection_time}s"),
        max_ejection_percent: 100,
    }
}

/// Istio wants `h2UpgradePolicy` by name; Admiral accepted integers.
fn normalise_connection_pool(mut pool: ConnectionPool) -> ConnectionPool {
    if let Some(http) = pool.http.as_mut()
        && let Some(v) = &http.h2_upgrade_policy
    {
        http.h2_upgrade_policy = h2_upgrade_policy_name(v).ok().map(|n| IntOrString::String(n.into()));
    }
    pool
}

/// Sidecars for `identity` as a client, and the status of the Dependencies it is the source of.
fn sidecars_and_dependency_reports(
    fleet: &Fleet,
    settings: &Settings,
    facts: &Facts,
    pass: &PassView<'_>,
    resolved: &ResolvedIdentity<'_>,
    identity: &str,
    out: &mut IdentityOutput,
) {
    let deps: Vec<_> = fleet.dependencies_of(identity).collect();
    if deps.is_empty() {
        return;
    }
    // Hosts of every explicitly named destination, and destinations nothing is known about.
    let hosts_by_destination: BTreeMap<&str, &[String]> =
        fleet.destinations_of(identity).map(|dest| (dest, pass.written_hosts(dest))).collect();
    let client_clusters = pass.running.of(identity);

    // This identity's Dependency reports: a user's Sidecar in the way adds to their message.
    let first_report = out.reports.len();
    for dep in &deps {
        let refusal = fleet.dependency_refusal(dep);
        let state = match (&dep.invalid, &refusal) {
            (Some(reason), _) | (None, Some(reason)) => PolicyState::Invalid(reason.clone()),
            (None, None) => PolicyState::Ready,
        };
        if fleet.tenancy() == Tenancy::Open
            && fleet.is_named_anywhere(identity)
            && let Some(why) = fleet.dependency_disallowed(dep)
        {
            out.diagnostics.push(Diagnostic::warning(
                Some(&dep.at.cluster),
                format!("Dependency {}/{}", dep.at.namespace, dep.at.name),
                format!("{why}; still applied because --tenancy=open, Invalid under --tenancy=owned"),
            ));
        }
        let mut report = PolicyReport {
            kind: Kind::Dependency,
            at: dep.at.clone(),
            generation: dep.generation,
            state,
            clusters: BTreeMap::new(),
            message: String::new(),
            sidecar: Some(format!("{}-egress", identity.to_ascii_lowercase())),
        };
        if dep.invalid.is_none() && refusal.is_none() {
            let hosts: Arc<BTreeSet<String>> = Arc::new(
                dep.destinations
                    .iter()
                    .flat_map(|d| hosts_by_destination.get(d.as_str()).copied().unwrap_or_default().iter().cloned())
                    .collect(),
            );
            for c in client_clusters.iter() {
                report.clusters.insert(fleet.cluster_names().name(*c).to_string(), hosts.clone());
            }
            let unknown: Vec<&str> = dep
                .destinations
                .iter()
                .filter(|d| hosts_by_destination.get(d.as_str()).is_none_or(|h| h.is_empty()))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                report.message = format!("no hosts yet for: {}", unknown.join(", "));
            }
            if client_clusters.is_empty() {
                report.message = format!("source {identity:?} runs in no cluster; {}", report.message)
                    .trim_end_matches("; ")
                    .to_string();
            }
        }
        out.reports.push(report);
    }

    if fleet.has_wildcard(identity) || hosts_by_destination.is_empty() {
        return;
    }
    // With `--sidecar-mode=off` none of ours is written, and users' Sidecars are still checked.
    let generate = settings.sidecar_mode == SidecarMode::Generate;
    let name = format!("{}-egress", identity.to_ascii_lowercase());
    if generate && !is_dns_subdomain(&name) {
        out.diagnostics.push(Diagnostic::error(
            None,
            format!("identity {identity}"),
            format!("Sidecar name {name:?} is not a valid object name; not written"),
        ));
        return;
    }
    let mut egress_hosts = vec!["./*".to_string(), format!("{GATEWAY_NAMESPACE}/*")];
    let dest_hosts: BTreeSet<&str> = hosts_by_destination.values().flat_map(|h| h.iter().map(String::as_str)).collect();
    egress_hosts.extend(dest_hosts.iter().map(|h| format!("{}/{h}", settings.sync_namespace)));
    // Their aliases too (with `--additional-endpoint-suffix`), whether or not a destination has
    // them now: listing a name nothing holds costs nothing, and a client's Sidecar then need not
    // follow who asks for aliases.
    let aliases = dest_hosts.iter().flat_map(|h| alias_hosts(settings, h));
    egress_hosts.extend(aliases.map(|alias| format!("{}/{alias}", settings.sync_namespace)));

    // Group the client's federated workloads by (cluster, namespace): one Sidecar per group.
    let mut groups: BTreeMap<(&str, &str), (&Cluster, Vec<&Workload>)> = BTreeMap::new();
    for &(cluster, w) in &resolved.federated {
        groups.entry((cluster.id.as_str(), w.namespace.as_str())).or_insert_with(|| (cluster, Vec::new())).1.push(w);
    }
    // Groups in the same namespace, selecting the same way, for the same env, get the same
    // Sidecar: it is built once and shared by their clusters.
    // (the Sidecar in the way, and the hosts it misses): each Dependency names those of its own.
    let mut blocked: Vec<(String, BTreeSet<&str>)> = Vec::new();
    let mut built: BTreeMap<(&str, bool, &str), usize> = BTreeMap::new();
    for ((cluster_id, namespace), (cluster, workloads)) in groups {
        let by_label = workloads.iter().all(|w| w.identity_from_label);
        if let Some((other, theirs)) = foreign_sidecar_in_the_way(cluster, namespace, generate && by_label, &workloads)
        {
            // Ours would not apply: theirs decides what the workloads reach. Said only when it
            // keeps them from a destination's host.
            let sync = settings.sync_namespace.as_str();
            let missing: BTreeSet<&str> =
                dest_hosts.iter().copied().filter(|h| !theirs.egress_allows(namespace, sync, h)).collect();
            if missing.is_empty() {
                continue;
            }
            let entries: Vec<String> = missing.iter().map(|h| format!("{sync}/{h}")).collect();
            let listed = entries.join(", ");
            out.diagnostics.push(Diagnostic::warning(
                Some(cluster_id),
                format!("Sidecar {namespace}/{other}"),
                format!("is not managed by flotilla, applies to identity {identity:?} and does not list {listed} in its egress: those workloads cannot reach them (Sidecar {namespace}/{name} is not written over it)"),
            ));
            blocked.push((format!("Sidecar {namespace}/{other} in cluster {cluster_id} (not flotilla's)"), missing));
            out.notices.push(Notice {
                cluster: cluster_id.to_string(),
                api_version: "networking.istio.io/v1",
                kind: "Sidecar",
                namespace: namespace.to_string(),
                name: other.to_string(),
                uid: theirs.uid.clone(),
                reason: "EgressMissesDependencies",
                note: event_note(identity, &entries),
            });
            continue;
        }
        if !generate || facts.get(cluster.idx).is_none() {
            continue;
        }
        let env = workloads[0].env.as_str();
        let sidecar = *built.entry((namespace, by_label, env)).or_insert_with(|| {
            let workload_selector = by_label.then(|| WorkloadSelector {
                labels: BTreeMap::from([(fleet.identity_label().to_string(), identity.to_string())]),
            });
            let spec = SidecarSpec { workload_selector, egress: vec![EgressListener { hosts: egress_hosts.clone() }] };
            let sidecar = Desired::new(
                namespace,
                &name,
                Arc::new(managed_labels(identity, env, &settings.instance)),
                DesiredSpec::Sidecar(spec),
            );
            place(&mut out.objects, sidecar)
        });
        out.objects[sidecar].clusters.push(cluster.idx);
    }
    // Each Ready Dependency names the Sidecars that miss hosts of its own destinations.
    for (report, dep) in out.reports[first_report..].iter_mut().zip(&deps) {
        if !matches!(report.state, PolicyState::Ready) {
            continue;
        }
        let own: BTreeSet<&str> = (dep.destinations.iter())
            .flat_map(|d| hosts_by_destination.get(d.as_str()).copied().unwrap_or_default())
            .map(String::as_str)
            .collect();
        for (sidecar, missing) in &blocked {
            let mine: Vec<String> =
                missing.intersection(&own).map(|h| format!("{}/{h}", settings.sync_namespace)).collect();
            if mine.is_empty() {
                continue;
            }
            let line = format!("{sidecar} does not list {}", mine.join(", "));
            report.message = if report.message.is_empty() { line } else { format!("{}; {line}", report.message) };
        }
    }
}

/// An Event's note (the API server refuses one past 1024 bytes): the first entries to add, and
/// how many more the Dependency's status lists.
fn event_note(identity: &str, entries: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut note =
        format!("applies to {identity}, whose Dependencies need {}", entries[..entries.len().min(SHOWN)].join(", "));
    if entries.len() > SHOWN {
        note.push_str(&format!(" and {} more (see the Dependencies' status)", entries.len() - SHOWN));
    }
    note.push_str(": add them to its egress hosts");
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push('…');
    }
    note
}

/// The Sidecar of someone else's in `namespace` that applies to these workloads, where ours
/// would not take precedence over it: one whose selector matches them (Istio prefers it), else a
/// namespace-wide one unless ours selects by label (`ours_by_label`: ours then applies to them
/// instead, as it always has).
fn foreign_sidecar_in_the_way<'a>(
    cluster: &'a Cluster,
    namespace: &str,
    ours_by_label: bool,
    workloads: &[&Workload],
) -> Option<(&'a str, &'a ForeignSidecar)> {
    if cluster.foreign_sidecars.is_empty() {
        return None;
    }
    let in_namespace = || {
        (cluster.foreign_sidecars.range((namespace.to_string(), String::new())..))
            .take_while(|((ns, _), _)| ns == namespace)
            .map(|((_, n), theirs)| (n.as_str(), theirs))
    };
    let selects = |sel: &BTreeMap<String, String>| {
        workloads.iter().any(|w| !sel.is_empty() && sel.iter().all(|(k, v)| w.pod_labels.get(k) == Some(v)))
    };
    in_namespace()
        .find(|(_, theirs)| theirs.selector.as_ref().is_some_and(selects))
        .or_else(|| in_namespace().find(|(_, theirs)| theirs.selector.is_none() && !ours_by_label))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(r, w)| (r.to_string(), *w)).collect()
    }

    fn withheld(regions: &[&str], kept: &[&str]) -> Withheld {
        Withheld {
            regions: regions.iter().map(|r| r.to_string()).collect(),
            kept: kept.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn an_events_note_stays_under_the_api_servers_limit() {
        let entries: Vec<String> = (0..200).map(|i| format!("admiral-sync/stage.service-{i:03}.global")).collect();
        let note = event_note("webapp", &entries);
        assert!(note.len() <= 1024, "{}", note.len());
        assert!(note.contains("stage.service-004.global") && !note.contains("stage.service-005.global"), "{note}");
        assert!(note.contains("and 195 more"), "{note}");
        let long = vec![format!("admiral-sync/{}", "é".repeat(600))];
        assert!(event_note("webapp", &long).len() <= 1024);
    }

    #[test]
    fn a_drained_region_leaves_the_distribution_and_the_rest_sums_to_100() {
        let east = withheld(&["us-east-2"], &["us-west-2", "eu-west-1"]);
        let to = weights(&[("us-west-2", 80), ("us-east-2", 20)]);
        assert_eq!(without_drained(to, &east), Some(weights(&[("us-west-2", 100)])));
        // Three ways: 50/30/20 without 20 → 62.5/37.5, the tie of remainders goes by region.
        let to = weights(&[("eu-west-1", 50), ("us-east-2", 20), ("us-west-2", 30)]);
        assert_eq!(without_drained(to, &east), Some(weights(&[("eu-west-1", 63), ("us-west-2", 37)])));
        // Only the drained region: nothing to distribute to, the rule distributes nothing.
        assert_eq!(without_drained(weights(&[("us-east-2", 100)]), &east), None);
        // What is left names no region the target keeps an endpoint in (the member left has
        // another region, or none): distributing would drop every endpoint, so nothing is.
        let elsewhere = withheld(&["us-east-2"], &["ap-south-1"]);
        assert_eq!(without_drained(weights(&[("us-east-2", 50), ("eu-west-1", 50)]), &elsewhere), None);
        assert_eq!(
            without_drained(weights(&[("us-east-2", 50), ("eu-west-1", 50)]), &withheld(&["us-east-2"], &[])),
            None
        );
        // Nothing drained there: untouched, whatever its sum.
        let to = weights(&[("us-west-2", 70), ("eu-west-1", 20)]);
        assert_eq!(without_drained(to.clone(), &east), Some(to.clone()));
        assert_eq!(without_drained(to.clone(), &Withheld::default()), Some(to));
    }
}
