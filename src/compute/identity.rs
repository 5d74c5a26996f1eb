//! Resolving one identity: where it runs and behind which Service and port, which policies win,
//! which hosts it has and which clusters need them. Everything the object builders read comes
//! from here, and so does every diagnostic about the identity.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::crd::{ClientConnectionConfigSpec, GlobalTrafficPolicySpec, OutlierDetectionSpec, TrafficPolicy};
use crate::meta::{Kind, is_dns_subdomain};
use crate::model::{Cluster, ClusterId, Fleet, ObjectRef, Policy, ServiceInfo, ServicePortInfo, Workload};
use crate::settings::{ExposePorts, Settings};

use super::policy::rank;
use super::{Diagnostic, PolicyReport, PolicyState};

/// One port a host exposes, and the Service port behind it in a source cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExposedPort {
    /// The number clients use (`--global-port`, or the Service port with `--expose-ports=all`).
    pub number: u32,
    pub name: String,
    /// Istio protocol name (`HTTP`, `GRPC`, …).
    pub protocol: String,
    /// The Service's own port (not its targetPort): what a local endpoint listens on.
    pub service_port: u32,
}

/// Where an identity+env runs in one cluster, and how to reach it there.
#[derive(Clone, Debug)]
pub struct Source<'a> {
    pub cluster: &'a Cluster,
    pub workload: &'a Workload,
    pub service: &'a ServiceInfo,
    pub ports: Vec<ExposedPort>,
}

/// One host of an identity+env and the policy entry that configures it, if any.
#[derive(Clone, Debug)]
pub struct HostPlan<'a> {
    pub host: String,
    pub is_default: bool,
    pub policy: Option<&'a TrafficPolicy>,
}

/// An identity+env, resolved.
#[derive(Clone, Debug)]
pub struct EnvPlan<'a> {
    pub env: String,
    /// One source per cluster, in cluster order.
    pub sources: BTreeMap<ClusterId, Source<'a>>,
    pub gtp: Option<&'a Policy<GlobalTrafficPolicySpec>>,
    pub outlier: Option<&'a Policy<OutlierDetectionSpec>>,
    pub connection: Option<&'a Policy<ClientConnectionConfigSpec>>,
    pub hosts: Vec<HostPlan<'a>>,
    /// Namespaces of this identity+env's workloads per cluster (for `exportTo`).
    pub namespaces: BTreeMap<ClusterId, BTreeSet<String>>,
}

/// An identity, resolved: its envs, the clusters of its clients, and what was found wrong.
#[derive(Clone, Debug, Default)]
pub struct ResolvedIdentity<'a> {
    pub envs: BTreeMap<String, EnvPlan<'a>>,
    /// Its federated workloads, in (cluster, namespace, name) order (its Sidecars select them).
    pub federated: Vec<(&'a Cluster, &'a Workload)>,
    /// Clusters where identities that depend on this one run.
    pub client_clusters: BTreeSet<&'a str>,
    pub diagnostics: Vec<Diagnostic>,
    pub reports: Vec<PolicyReport>,
}

impl ResolvedIdentity<'_> {
    /// Every host that is written somewhere (an env with at least one source).
    pub fn written_hosts(&self) -> impl Iterator<Item = &str> {
        self.envs.values().filter(|e| !e.sources.is_empty()).flat_map(|e| e.hosts.iter().map(|h| h.host.as_str()))
    }
}

/// Every identity one recompute pass needs, resolved once before any object is built: those
/// being recomputed, and the destinations whose hosts their Sidecars list. The fleet does not
/// change during a pass, and the view is only read while objects are built (on every core).
pub struct PassView<'a> {
    pub running: Running<'a>,
    resolved: HashMap<&'a str, ResolvedIdentity<'a>>,
}

impl<'a> PassView<'a> {
    pub fn new(running: Running<'a>, resolved: HashMap<&'a str, ResolvedIdentity<'a>>) -> Self {
        PassView { running, resolved }
    }

    pub fn get(&self, identity: &str) -> Option<&ResolvedIdentity<'a>> {
        self.resolved.get(identity)
    }

    /// The hosts `identity` writes somewhere (none if it was not resolved in this pass).
    pub fn written_hosts(&self, identity: &str) -> impl Iterator<Item = &str> {
        self.resolved.get(identity).into_iter().flat_map(ResolvedIdentity::written_hosts)
    }
}

/// Where identities run (members with a federated workload of theirs), gathered once per pass:
/// every destination asks it of each of its clients, and every client of itself.
pub struct Running<'a> {
    fleet: &'a Fleet,
    by_identity: HashMap<&'a str, BTreeSet<&'a str>>,
    /// Where the `*` clients run: clients of every identity.
    wildcard_clients: BTreeSet<&'a str>,
}

impl<'a> Running<'a> {
    /// `by_identity` holds `fleet.clusters_running` of (at least) the pass's identities and
    /// their named clients; others are looked up in the fleet.
    pub fn new(fleet: &'a Fleet, by_identity: HashMap<&'a str, BTreeSet<&'a str>>) -> Self {
        let mut running = Running { fleet, by_identity, wildcard_clients: BTreeSet::new() };
        let wildcard: BTreeSet<&'a str> = fleet.wildcard_sources().flat_map(|c| running.of(c)).collect();
        running.wildcard_clients = wildcard;
        running
    }

    pub fn of(&self, identity: &str) -> BTreeSet<&'a str> {
        match self.by_identity.get(identity) {
            Some(clusters) => clusters.clone(),
            None => self.fleet.clusters_running(identity),
        }
    }
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
    if let Some(owner) = case_owner(fleet, identity, &mut out.diagnostics) {
        // Its hosts and objects would be the owner's: it is not written at all.
        out.diagnostics.push(Diagnostic::error(
            None,
            format!("identity {identity}"),
            format!(
                "differs from identity {owner:?} only in case, and host and object names are lower-case; {owner:?} (first in byte order) owns them, so nothing is written for {identity:?}"
            ),
        ));
        select_policies(fleet, identity, &locations, &mut out);
        return out;
    }
    out.federated = fleet.workloads_of(identity).filter(|(cluster, w)| cluster.is_federated(w)).collect();
    for &(cluster, w) in &out.federated {
        let service = find_service(cluster, w);
        // Opting out on the Service takes the workload out of federation entirely.
        if service.is_some_and(|s| s.opted_out) {
            continue;
        }
        let env = out.envs.entry(w.env.clone()).or_insert_with(|| EnvPlan {
            env: w.env.clone(),
            sources: BTreeMap::new(),
            gtp: None,
            outlier: None,
            connection: None,
            hosts: Vec::new(),
            namespaces: BTreeMap::new(),
        });
        env.namespaces.entry(cluster.id.clone()).or_default().insert(w.namespace.clone());
        locations.insert((w.env.as_str(), cluster.id.as_str(), w.namespace.as_str()));
        if env.sources.contains_key(&cluster.id) {
            continue; // the first workload (by namespace, name) with a Service speaks for the cluster
        }
        for problem in service.iter().flat_map(|s| &s.problems) {
            let svc = service.expect("iterating its problems");
            out.diagnostics.push(Diagnostic::warning(
                Some(&cluster.id),
                format!("Service {}/{}", svc.namespace, svc.name),
                problem.clone(),
            ));
        }
        let Some(svc) = service else {
            out.diagnostics.push(Diagnostic::warning(
                Some(&cluster.id),
                format!("Deployment {}/{}", w.namespace, w.name),
                format!("identity {identity:?} has no Service selecting its pods; it contributes no endpoint"),
            ));
            continue;
        };
        match exposed_ports(settings, w, svc) {
            None => out.diagnostics.push(Diagnostic::warning(
                Some(&cluster.id),
                format!("Service {}/{}", svc.namespace, svc.name),
                "has no ports; it contributes no endpoint".into(),
            )),
            Some(ports) => {
                env.sources.insert(cluster.id.clone(), Source { cluster, workload: w, service: svc, ports });
            }
        }
    }

    out.client_clusters = running.wildcard_clients.clone();
    for client in fleet.named_clients_of(identity) {
        match running.by_identity.get(client) {
            Some(clusters) => out.client_clusters.extend(clusters.iter().copied()),
            None => out.client_clusters.extend(fleet.clusters_running(client)),
        }
    }

    select_policies(fleet, identity, &locations, &mut out);

    for env in out.envs.values_mut() {
        env.hosts = hosts_of(settings, identity, env, &mut out.diagnostics);
    }
    out
}

/// Identities whose names differ only in case would write the same (lower-case) hosts and
/// objects: the first in byte order owns them. Returns the owner when it is another identity;
/// when `identity` is the owner of twins, says so in a diagnostic.
fn case_owner<'a>(fleet: &'a Fleet, identity: &str, diagnostics: &mut Vec<Diagnostic>) -> Option<&'a str> {
    let mut twins = fleet.case_twins(identity);
    let owner = twins.next()?;
    if owner != identity {
        return Some(owner);
    }
    let others: Vec<String> = twins.map(|t| format!("{t:?}")).collect();
    if !others.is_empty() {
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

    fn pick<'a, S>(
        kind: Kind,
        policies: Vec<&'a Policy<S>>,
        use_priority: bool,
        applies: &dyn Fn(&ObjectRef, &str) -> bool,
        reports: &mut Vec<PolicyReport>,
    ) -> BTreeMap<String, &'a Policy<S>> {
        let mut by_env: BTreeMap<String, Vec<&'a Policy<S>>> = BTreeMap::new();
        for p in policies {
            let state = if !applies(&p.at, &p.env) {
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
                None => by_env.entry(p.env.clone()).or_default().push(p),
            }
        }
        let mut winners = BTreeMap::new();
        for (env, mut candidates) in by_env {
            rank(&mut candidates, use_priority);
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

    let gtps = pick(Kind::GlobalTrafficPolicy, fleet.gtps_of(identity).collect(), true, &applies, &mut out.reports);
    let ods = pick(
        Kind::OutlierDetection,
        fleet.outlier_detections_of(identity).collect(),
        false,
        &applies,
        &mut out.reports,
    );
    let cccs = pick(
        Kind::ClientConnectionConfig,
        fleet.connection_configs_of(identity).collect(),
        false,
        &applies,
        &mut out.reports,
    );
    for (env, plan) in out.envs.iter_mut() {
        plan.gtp = gtps.get(env).copied();
        plan.outlier = ods.get(env).copied();
        plan.connection = cccs.get(env).copied();
    }
    for (policy, warnings) in fleet
        .gtps_of(identity)
        .map(|p| (&p.at, &p.warnings))
        .chain(fleet.outlier_detections_of(identity).map(|p| (&p.at, &p.warnings)))
        .chain(fleet.connection_configs_of(identity).map(|p| (&p.at, &p.warnings)))
    {
        for w in warnings {
            out.diagnostics.push(Diagnostic::warning(
                Some(&policy.cluster),
                format!("policy {}/{}", policy.namespace, policy.name),
                w.clone(),
            ));
        }
    }
}

/// The default host, then one host per prefixed policy entry of the winning GTP.
fn hosts_of<'a>(
    settings: &Settings,
    identity: &str,
    env: &EnvPlan<'a>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<HostPlan<'a>> {
    let default_host = format!("{}.{}.{}", env.env, identity, settings.hostname_suffix).to_ascii_lowercase();
    let entries: &'a [TrafficPolicy] =
        env.gtp.and_then(|g| g.effective.as_ref()).map(|s| s.policy.as_slice()).unwrap_or(&[]);
    let mut hosts = vec![HostPlan {
        host: default_host.clone(),
        is_default: true,
        policy: entries.iter().find(|p| p.host_prefix(&env.env).is_none()),
    }];
    for p in entries {
        if let Some(prefix) = p.host_prefix(&env.env) {
            hosts.push(HostPlan {
                host: format!("{}.{default_host}", prefix.to_ascii_lowercase()),
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

/// The oldest Service in the workload's namespace whose non-empty selector matches its pods.
pub fn find_service<'a>(cluster: &'a Cluster, w: &'a Workload) -> Option<&'a ServiceInfo> {
    cluster
        .services_in(&w.namespace)
        .filter(|s| !s.selector.is_empty() && s.selector.iter().all(|(k, v)| w.pod_labels.get(k) == Some(v)))
        .min_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)))
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
pub fn protocol_of(p: &ServicePortInfo) -> String {
    let known = |s: &str| PROTOCOLS.iter().find(|k| k.eq_ignore_ascii_case(s)).map(|k| k.to_string());
    let from_app = p.app_protocol.as_deref().and_then(|a| match a {
        "kubernetes.io/h2c" => Some("HTTP2".to_string()),
        "kubernetes.io/ws" => Some("HTTP".to_string()),
        "kubernetes.io/wss" => Some("HTTPS".to_string()),
        other => known(other),
    });
    from_app
        .or_else(|| {
            let name = p.name.as_deref()?;
            // "grpc-web" is a protocol of its own, not "grpc" with a suffix.
            if name.len() >= 8 && name[..8].eq_ignore_ascii_case("grpc-web") {
                return Some("GRPC-WEB".to_string());
            }
            known(name.split('-').next()?)
        })
        .unwrap_or_else(|| "HTTP".to_string())
}
