//! Ingest: Kubernetes objects, as they arrive from a watch or a file, distilled into the model's
//! records, and policies judged (valid, or invalid with the reason). Pure; the model keeps what
//! comes out of here and nothing else of the objects.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, PodTemplateSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::argo::{Rollout, VirtualService};
use crate::crd::{
    ClientConnectionConfig, ClientConnectionConfigSpec, Dependency, GlobalTrafficPolicy, GlobalTrafficPolicySpec,
    LbType, OutlierDetection,
};
use crate::istio::{ServiceEntry, Sidecar};
use crate::meta::{
    ANNOTATION_IDENTITIES, ANNOTATION_INCLUDE_INBOUND_PORTS, DEFAULT_ENV, Kind, LABEL_PRIORITY, LABEL_REGION,
    LABEL_REGION_LEGACY, annotation, has_ignore, is_dns_label, is_managed, label,
};
use crate::model::{
    Allowance, DependencyEntry, ForeignSidecar, ObjectRef, Policy, Record, RolloutPlan, ServiceInfo, ServicePortInfo,
    VsRoute, Workload, WorkloadKind,
};
use crate::settings::Keys;

/// One object of a kind the engine reads.
#[derive(Clone, Debug)]
pub enum InputObject {
    Deployment(Box<Deployment>),
    Rollout(Box<Rollout>),
    /// Jobs and CronJobs: clients only (they call others, nothing calls them).
    Job(Box<Job>),
    CronJob(Box<CronJob>),
    /// VirtualServices: a canary Rollout reads its weights from the one it names.
    VirtualService(Box<VirtualService>),
    Service(Box<Service>),
    Node(Box<Node>),
    Namespace(Box<Namespace>),
    Sidecar(Box<Sidecar>),
    /// ServiceEntries in the sync namespace: someone else's hold hosts flotilla then leaves alone.
    ServiceEntry(Box<ServiceEntry>),
    GlobalTrafficPolicy(Box<GlobalTrafficPolicy>),
    OutlierDetection(Box<OutlierDetection>),
    ClientConnectionConfig(Box<ClientConnectionConfig>),
    Dependency(Box<Dependency>),
}

/// `$body` with `$o` bound to the object inside any variant.
macro_rules! each_input {
    ($obj:expr, $o:ident => $body:expr) => {
        match $obj {
            InputObject::Deployment($o) => $body,
            InputObject::Rollout($o) => $body,
            InputObject::Job($o) => $body,
            InputObject::CronJob($o) => $body,
            InputObject::VirtualService($o) => $body,
            InputObject::Service($o) => $body,
            InputObject::Node($o) => $body,
            InputObject::Namespace($o) => $body,
            InputObject::Sidecar($o) => $body,
            InputObject::ServiceEntry($o) => $body,
            InputObject::GlobalTrafficPolicy($o) => $body,
            InputObject::OutlierDetection($o) => $body,
            InputObject::ClientConnectionConfig($o) => $body,
            InputObject::Dependency($o) => $body,
        }
    };
}

impl InputObject {
    pub fn kind(&self) -> Kind {
        match self {
            InputObject::Deployment(_) => Kind::Deployment,
            InputObject::Rollout(_) => Kind::Rollout,
            InputObject::Job(_) => Kind::Job,
            InputObject::CronJob(_) => Kind::CronJob,
            InputObject::VirtualService(_) => Kind::VirtualService,
            InputObject::Service(_) => Kind::Service,
            InputObject::Node(_) => Kind::Node,
            InputObject::Namespace(_) => Kind::Namespace,
            InputObject::Sidecar(_) => Kind::Sidecar,
            InputObject::ServiceEntry(_) => Kind::ServiceEntry,
            InputObject::GlobalTrafficPolicy(_) => Kind::GlobalTrafficPolicy,
            InputObject::OutlierDetection(_) => Kind::OutlierDetection,
            InputObject::ClientConnectionConfig(_) => Kind::ClientConnectionConfig,
            InputObject::Dependency(_) => Kind::Dependency,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        each_input!(self, o => &o.metadata)
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        each_input!(self, o => &mut o.metadata)
    }

    /// (namespace, name); the namespace is empty for cluster-scoped kinds.
    pub fn key(&self) -> (String, String) {
        let m = self.meta();
        (m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
    }
}

/// What the model keeps of `obj`, seen in `cluster`; None for what it ignores (a Sidecar
/// flotilla manages is its own output, not an input).
pub fn distill(obj: &InputObject, cluster: &str, keys: &Keys) -> Option<Record> {
    let (namespace, name) = obj.key();
    let at = || ObjectRef { cluster: cluster.to_string(), namespace: namespace.clone(), name: name.clone() };
    Some(match obj {
        InputObject::Deployment(d) => Record::Workload(distill_workload(d, keys)),
        InputObject::Rollout(r) => Record::Workload(distill_rollout(r, keys)),
        InputObject::Job(j) if is_cron_jobs(j) => return None,
        InputObject::Job(j) => {
            let template = j.spec.as_ref().map(|s| &s.template);
            Record::Workload(workload(WorkloadKind::Job, &j.metadata, template, keys, None))
        }
        InputObject::CronJob(c) => {
            let template = c.spec.as_ref().and_then(|s| s.job_template.spec.as_ref()).map(|s| &s.template);
            Record::Workload(workload(WorkloadKind::CronJob, &c.metadata, template, keys, None))
        }
        // An alias VirtualService flotilla wrote is its output, not an input.
        InputObject::VirtualService(vs) if is_managed(&vs.metadata) => return None,
        InputObject::VirtualService(vs) => Record::VirtualService { routes: vs_routes(vs) },
        InputObject::Service(s) => Record::Service(distill_service(s)),
        InputObject::Node(n) => Record::Node(node_region(n)),
        InputObject::Namespace(n) => Record::Namespace {
            opted_out: has_ignore(&n.metadata),
            allows: annotation(&n.metadata, ANNOTATION_IDENTITIES).map(|a| Allowance::parse(a)),
        },
        InputObject::Sidecar(s) if is_managed(&s.metadata) => return None,
        InputObject::Sidecar(s) => Record::ForeignSidecar(ForeignSidecar {
            selector: s.spec.workload_selector.as_ref().map(|ws| ws.labels.clone()),
            egress_hosts: (!s.spec.egress.is_empty())
                .then(|| s.spec.egress.iter().flat_map(|l| l.hosts.iter().cloned()).collect()),
            uid: s.metadata.uid.clone(),
        }),
        InputObject::ServiceEntry(se) if is_managed(&se.metadata) => return None,
        InputObject::ServiceEntry(se) => Record::ForeignServiceEntry { hosts: se.spec.hosts.clone() },
        InputObject::GlobalTrafficPolicy(g) => {
            let mut policy = policy_header(at(), &g.metadata, Some(&g.spec.selector), keys);
            policy.priority = match label(&g.metadata, LABEL_PRIORITY) {
                None => 0,
                Some(p) => p.trim().parse().unwrap_or_else(|_| {
                    policy.warnings.push(format!("label {LABEL_PRIORITY}={p:?} is not an integer; using 0"));
                    0
                }),
            };
            let verdict = validate_gtp(&g.spec, &policy.env);
            Record::GlobalTrafficPolicy(judged(policy, &g.spec, verdict))
        }
        InputObject::OutlierDetection(o) => {
            let policy = policy_header(at(), &o.metadata, Some(&o.spec.selector), keys);
            Record::OutlierDetection(judged(policy, &o.spec, Ok(())))
        }
        InputObject::ClientConnectionConfig(o) => {
            let policy = policy_header(at(), &o.metadata, Some(&o.spec.selector), keys);
            let verdict = validate_connection_config(&o.spec);
            Record::ClientConnectionConfig(judged(policy, &o.spec, verdict))
        }
        InputObject::Dependency(d) => Record::Dependency(distill_dependency(at(), d)),
    })
}

/// A Job a CronJob made: its CronJob already stands for it (read whole, it is a client from
/// before its first run), and each run's Job would come and go.
fn is_cron_jobs(j: &Job) -> bool {
    j.metadata.owner_references.iter().flatten().any(|o| o.kind == "CronJob" && o.api_version.starts_with("batch/"))
}

/// The policy with its spec in force when valid, or the reason it is not.
fn judged<S: Clone>(mut policy: Policy<S>, spec: &S, verdict: Result<(), String>) -> Policy<S> {
    match verdict {
        Ok(()) => policy.effective = Some(spec.clone()),
        Err(reason) => policy.invalid = Some(reason),
    }
    policy
}

/// Env from annotation `<env key>` (`admiral.io/env`), label `<env key>`, label `env`, then
/// `fallback`.
fn env_of(meta: &ObjectMeta, env_key: &str, fallback: Option<&String>) -> String {
    annotation(meta, env_key)
        .or_else(|| label(meta, env_key))
        .or_else(|| label(meta, "env"))
        .or(fallback)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_ENV)
        .to_string()
}

/// A port number as Kubernetes allows it (1..=65535); anything else is treated as absent.
fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p > 0)
}

pub fn distill_workload(d: &Deployment, keys: &Keys) -> Workload {
    workload(WorkloadKind::Deployment, &d.metadata, d.spec.as_ref().map(|s| &s.template), keys, None)
}

/// A Rollout is a workload like a Deployment (identity, env and opt-outs from its pod template),
/// plus how its strategy picks Services.
pub fn distill_rollout(r: &Rollout, keys: &Keys) -> Workload {
    workload(WorkloadKind::Rollout, &r.metadata, r.spec.template.as_ref(), keys, Some(rollout_plan(r)))
}

fn rollout_plan(r: &Rollout) -> RolloutPlan {
    let strategy = r.spec.strategy.as_ref();
    let named = |s: &Option<String>| s.as_ref().map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
    if let Some(bg) = strategy.and_then(|s| s.blue_green.as_ref()) {
        return RolloutPlan::BlueGreen { active: named(&bg.active_service), preview: named(&bg.preview_service) };
    }
    let Some(canary) = strategy.and_then(|s| s.canary.as_ref()) else {
        return RolloutPlan::None;
    };
    let istio = canary.traffic_routing.as_ref().and_then(|t| t.istio.as_ref());
    match (istio, named(&canary.stable_service), named(&canary.canary_service)) {
        (Some(istio), Some(stable), Some(canary_service)) => {
            let vs = istio.virtual_service.as_ref().or(istio.virtual_services.first());
            RolloutPlan::WeightedCanary {
                stable,
                canary: canary_service,
                virtual_service: vs.map(|v| (v.name.clone(), v.routes.clone())),
            }
        }
        (_, stable, _) => RolloutPlan::Canary { stable },
    }
}

fn vs_routes(vs: &VirtualService) -> Vec<VsRoute> {
    vs.spec
        .http
        .iter()
        .map(|r| VsRoute {
            name: r.name.clone(),
            destinations: r.route.iter().map(|d| (d.destination.host.clone(), d.weight.unwrap_or(0))).collect(),
        })
        .collect()
}

fn workload(
    kind: WorkloadKind,
    meta: &ObjectMeta,
    template: Option<&PodTemplateSpec>,
    keys: &Keys,
    rollout: Option<RolloutPlan>,
) -> Workload {
    let template_meta = template.and_then(|t| t.metadata.clone()).unwrap_or_default();
    let service_account = template
        .and_then(|t| t.spec.as_ref())
        .and_then(|s| s.service_account_name.as_deref())
        .map(str::trim)
        .filter(|sa| !sa.is_empty())
        .map(str::to_string);
    let (identity, identity_from_label) = match label(&template_meta, &keys.identity) {
        Some(v) if !v.trim().is_empty() => (Some(v.trim().to_string()), true),
        _ => match annotation(&template_meta, &keys.identity) {
            Some(v) if !v.trim().is_empty() => (Some(v.trim().to_string()), false),
            _ => (None, false),
        },
    };
    let inbound_port = annotation(&template_meta, ANNOTATION_INCLUDE_INBOUND_PORTS)
        .and_then(|v| v.split(',').find_map(|p| p.trim().parse::<i32>().ok().and_then(valid_port)));
    Workload {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        identity,
        identity_from_label,
        env: env_of(&template_meta, &keys.env, None),
        opted_out: has_ignore(meta) || has_ignore(&template_meta),
        pod_labels: template_meta.labels.clone().unwrap_or_default(),
        inbound_port,
        rollout,
        service_account,
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        uid: meta.uid.clone(),
        // As Admiral: a Deployment's or Rollout's own labels, not a Job's.
        wants_aliases: kind.serves() && keys.alias_labels.iter().any(|k| k == "*" || label(meta, k).is_some()),
    }
}

/// A Service's ports, without those whose numbers Kubernetes would not accept (a hand-written
/// manifest can hold anything), which are reported instead.
pub fn distill_service(s: &Service) -> ServiceInfo {
    let spec = s.spec.clone().unwrap_or_default();
    let lb_address = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.ip.clone().or_else(|| i.hostname.clone()));
    let external_address = lb_address.or_else(|| spec.external_ips.as_ref().and_then(|ips| ips.first().cloned()));
    let mut problems = Vec::new();
    let ports = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| match valid_port(p.port) {
            Some(port) => {
                Some(ServicePortInfo { name: p.name, port, target_port: p.target_port, app_protocol: p.app_protocol })
            }
            None => {
                problems.push(format!("port {} is not a port number (1-65535); ignored", p.port));
                None
            }
        })
        .collect();
    ServiceInfo {
        namespace: s.metadata.namespace.clone().unwrap_or_default(),
        name: s.metadata.name.clone().unwrap_or_default(),
        labels: s.metadata.labels.clone().unwrap_or_default(),
        selector: spec.selector.clone().unwrap_or_default(),
        ports,
        opted_out: has_ignore(&s.metadata),
        created: s.metadata.creation_timestamp.as_ref().map(|t| t.0),
        external_address,
        problems,
    }
}

fn node_region(n: &Node) -> Option<String> {
    label(&n.metadata, LABEL_REGION).or_else(|| label(&n.metadata, LABEL_REGION_LEGACY)).cloned()
}

fn distill_dependency(at: ObjectRef, d: &Dependency) -> DependencyEntry {
    let source = d.spec.source.trim().to_string();
    let mut destinations: BTreeSet<String> =
        d.spec.destinations.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let wildcard = destinations.remove("*");
    let invalid = if source.is_empty() { Some("spec.source is empty".to_string()) } else { None };
    DependencyEntry { at, source, destinations, wildcard, generation: d.metadata.generation, invalid }
}

/// Identity, env and bookkeeping common to the policy kinds (spec handled by the caller).
fn policy_header<S>(
    at: ObjectRef,
    meta: &ObjectMeta,
    selector: Option<&BTreeMap<String, String>>,
    keys: &Keys,
) -> Policy<S> {
    let identity_label = keys.policy_identity.as_str();
    let from_selector = |key: &str| selector.and_then(|s| s.get(key));
    let identity = label(meta, identity_label)
        .or_else(|| from_selector(identity_label))
        .or_else(|| from_selector("identity"))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let env = env_of(meta, &keys.env, from_selector("env").or_else(|| from_selector(&keys.env)));
    let mut warnings = Vec::new();
    if identity.is_none() {
        warnings.push(format!("no identity: set label {identity_label:?} or spec.selector.{identity_label}"));
    }
    Policy {
        at,
        identity,
        env,
        priority: 0,
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        generation: meta.generation,
        effective: None,
        invalid: None,
        warnings,
    }
}

/// Checks the rules that the CRD schema cannot express (or that objects written before the
/// schema existed may break). The first broken rule is the reason.
pub fn validate_gtp(spec: &GlobalTrafficPolicySpec, env: &str) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for (i, p) in spec.policy.iter().enumerate() {
        let at = format!("spec.policy[{i}]");
        let lb = p.lb_type().map_err(|e| format!("{at}: {e}"))?;
        let prefix = p.host_prefix(env).map(str::to_ascii_lowercase);
        if let Some(pre) = &prefix
            && !is_dns_label(pre)
        {
            return Err(format!("{at}: dnsPrefix {pre:?} is not a DNS label (a-z, 0-9, '-', at most 63)"));
        }
        if !seen.insert(prefix.clone()) {
            let shown = prefix.unwrap_or_else(|| "default".into());
            return Err(format!(
                "{at}: dnsPrefix {shown:?} appears twice (\"\", \"default\" and the env all mean the default host)"
            ));
        }
        let targets = p.target.as_deref().unwrap_or_default();
        let mut sum = 0i64;
        let mut regions = BTreeSet::new();
        for (j, t) in targets.iter().enumerate() {
            if !regions.insert(t.region.trim()) {
                return Err(format!("{at}.target[{j}]: region {:?} appears twice", t.region.trim()));
            }
            let w = t.weight.unwrap_or(0);
            if !(0..=100).contains(&w) {
                return Err(format!("{at}.target[{j}]: weight {w} is outside 0..100"));
            }
            if t.region.trim().is_empty() {
                return Err(format!("{at}.target[{j}]: region is empty"));
            }
            sum += i64::from(w);
        }
        if sum != 0 && sum != 100 {
            return Err(format!("{at}: target weights sum to {sum}, not 100"));
        }
        if lb == LbType::Failover && sum == 0 {
            return Err(format!("{at}: FAILOVER needs targets whose weights sum to 100"));
        }
    }
    Ok(())
}

pub fn validate_connection_config(spec: &ClientConnectionConfigSpec) -> Result<(), String> {
    match spec.connection_pool.as_ref().and_then(|c| c.http.as_ref()).and_then(|h| h.h2_upgrade_policy.as_ref()) {
        None => Ok(()),
        Some(v) => crate::crd::h2_upgrade_policy_name(v).map(|_| ()),
    }
}

/// `obj` with only what the engine reads of it (and what names it), for a snapshot of a live
/// fleet: no status noise, no managed fields, no annotations the engine ignores, no credentials
/// (Secrets are never read at all). `distill` gives the same record for the reduced object as for
/// the whole one. None for what a snapshot leaves out: Namespaces that neither opt out nor name
/// identities (`flotilla.io/identities`), and
/// Sidecars flotilla manages (they are its output, not its input).
pub fn reduce(obj: &InputObject, keys: &Keys) -> Option<InputObject> {
    use k8s_openapi::api::apps::v1::DeploymentSpec;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, PodTemplateSpec, ServicePort, ServiceSpec, ServiceStatus,
    };
    let meta = obj.meta();
    let keep = |wanted: &[&str], map: &Option<BTreeMap<String, String>>| -> Option<BTreeMap<String, String>> {
        let kept: BTreeMap<String, String> = map
            .iter()
            .flatten()
            .filter(|(k, _)| wanted.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (!kept.is_empty()).then_some(kept)
    };
    // Name and namespace, the opt-out, and what else `also` names among labels and annotations.
    let header = |labels: Option<BTreeMap<String, String>>, annotations: &[&str]| ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        labels,
        annotations: keep(annotations, &meta.annotations),
        ..Default::default()
    };
    let ignore = [crate::meta::LABEL_IGNORE];
    // A workload's age decides which of two allowed namespaces speaks for its identity; of its
    // own labels, the opt-out and those that ask for aliases are read.
    let workload_labels: Vec<&str> =
        ignore.iter().copied().chain(keys.alias_labels.iter().map(String::as_str)).collect();
    let workload_header = || ObjectMeta {
        creation_timestamp: meta.creation_timestamp.clone(),
        uid: meta.uid.clone(),
        ..header(keep(&workload_labels, &meta.labels), &ignore)
    };
    // Of a pod template: its labels, the annotations read (identity, env, opt-out, inbound
    // port) and of its spec only the service account (the workload's SPIFFE identity).
    let read = [keys.identity.as_str(), keys.env.as_str(), crate::meta::LABEL_IGNORE, ANNOTATION_INCLUDE_INBOUND_PORTS];
    let pod_template =
        |t: &PodTemplateSpec| PodTemplateSpec {
            metadata: t.metadata.as_ref().map(|m| ObjectMeta {
                labels: m.labels.clone(),
                annotations: keep(&read, &m.annotations),
                ..Default::default()
            }),
            spec: t.spec.as_ref().and_then(|s| s.service_account_name.clone()).map(|name| {
                k8s_openapi::api::core::v1::PodSpec { service_account_name: Some(name), ..Default::default() }
            }),
        };
    Some(match obj {
        InputObject::Deployment(d) => {
            let spec = d.spec.as_ref();
            InputObject::Deployment(Box::new(Deployment {
                metadata: workload_header(),
                spec: Some(DeploymentSpec {
                    selector: spec.map(|s| s.selector.clone()).unwrap_or_default(),
                    template: spec.map(|s| pod_template(&s.template)).unwrap_or_default(),
                    ..Default::default()
                }),
                status: None,
            }))
        }
        InputObject::Rollout(r) => {
            let spec = crate::argo::RolloutSpec {
                selector: r.spec.selector.clone(),
                template: r.spec.template.as_ref().map(pod_template),
                strategy: r.spec.strategy.clone(),
            };
            InputObject::Rollout(Box::new(Rollout { metadata: workload_header(), spec }))
        }
        InputObject::Job(j) if is_cron_jobs(j) => return None,
        InputObject::Job(j) => InputObject::Job(Box::new(Job {
            metadata: workload_header(),
            spec: j.spec.as_ref().map(|s| JobSpec { template: pod_template(&s.template), ..Default::default() }),
            status: None,
        })),
        InputObject::CronJob(c) => InputObject::CronJob(Box::new(CronJob {
            metadata: workload_header(),
            spec: c.spec.as_ref().map(|s| CronJobSpec {
                schedule: s.schedule.clone(),
                job_template: JobTemplateSpec {
                    spec: s
                        .job_template
                        .spec
                        .as_ref()
                        .map(|j| JobSpec { template: pod_template(&j.template), ..Default::default() }),
                    ..Default::default()
                },
                ..Default::default()
            }),
            status: None,
        })),
        InputObject::VirtualService(vs) if is_managed(&vs.metadata) => return None,
        InputObject::VirtualService(vs) => InputObject::VirtualService(Box::new(VirtualService {
            // Admiral's mark: `--adopt-from=admiral` takes its aliases over.
            metadata: header(None, &[crate::meta::ANNOTATION_CREATED_BY]),
            spec: crate::argo::VirtualServiceSpec {
                http: vs
                    .spec
                    .http
                    .iter()
                    .map(|r| crate::argo::HttpRoute {
                        name: r.name.clone(),
                        route: r
                            .route
                            .iter()
                            .map(|d| crate::argo::RouteDestination {
                                destination: crate::argo::Destination { host: d.destination.host.clone(), port: None },
                                weight: d.weight,
                            })
                            .collect(),
                    })
                    .collect(),
                ..Default::default()
            },
        })),
        InputObject::Service(s) => {
            let spec = s.spec.clone().unwrap_or_default();
            // Labels pick the gateway Service; elsewhere only the opt-out counts.
            let labels = if meta.namespace.as_deref() == Some(crate::meta::GATEWAY_NAMESPACE) {
                meta.labels.clone()
            } else {
                keep(&ignore, &meta.labels)
            };
            let ingress = s
                .status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .and_then(|i| i.first())
                .map(|i| LoadBalancerIngress { ip: i.ip.clone(), hostname: i.hostname.clone(), ..Default::default() });
            let mut metadata = header(labels, &ignore);
            metadata.creation_timestamp = meta.creation_timestamp.clone();
            InputObject::Service(Box::new(Service {
                metadata,
                spec: Some(ServiceSpec {
                    selector: spec.selector,
                    external_ips: spec.external_ips.filter(|ips| !ips.is_empty()).map(|ips| ips[..1].to_vec()),
                    ports: spec.ports.map(|ports| {
                        ports
                            .into_iter()
                            .map(|p| ServicePort {
                                name: p.name,
                                port: p.port,
                                target_port: p.target_port,
                                app_protocol: p.app_protocol,
                                ..Default::default()
                            })
                            .collect()
                    }),
                    ..Default::default()
                }),
                status: ingress.map(|i| ServiceStatus {
                    load_balancer: Some(LoadBalancerStatus { ingress: Some(vec![i]) }),
                    ..Default::default()
                }),
            }))
        }
        InputObject::Node(n) => InputObject::Node(Box::new(Node {
            metadata: ObjectMeta {
                name: n.metadata.name.clone(),
                labels: keep(&[LABEL_REGION, LABEL_REGION_LEGACY], &n.metadata.labels),
                ..Default::default()
            },
            ..Default::default()
        })),
        InputObject::Namespace(n)
            if has_ignore(&n.metadata) || annotation(&n.metadata, ANNOTATION_IDENTITIES).is_some() =>
        {
            InputObject::Namespace(Box::new(Namespace {
                metadata: header(keep(&ignore, &meta.labels), &[crate::meta::LABEL_IGNORE, ANNOTATION_IDENTITIES]),
                ..Default::default()
            }))
        }
        InputObject::Namespace(_) => return None,
        InputObject::Sidecar(s) if is_managed(&s.metadata) => return None,
        InputObject::Sidecar(s) => {
            let spec = crate::istio::SidecarSpec {
                workload_selector: s.spec.workload_selector.clone(),
                egress: s.spec.egress.clone(),
            };
            let metadata = ObjectMeta { uid: meta.uid.clone(), ..header(None, &[]) };
            InputObject::Sidecar(Box::new(Sidecar { metadata, spec }))
        }
        InputObject::ServiceEntry(se) if is_managed(&se.metadata) => return None,
        InputObject::ServiceEntry(se) => {
            let spec = crate::istio::ServiceEntrySpec { hosts: se.spec.hosts.clone(), ..Default::default() };
            let metadata = header(None, &[crate::meta::ANNOTATION_CREATED_BY]);
            InputObject::ServiceEntry(Box::new(ServiceEntry { metadata, spec }))
        }
        InputObject::GlobalTrafficPolicy(p) => InputObject::GlobalTrafficPolicy(Box::new(GlobalTrafficPolicy {
            metadata: policy_meta(meta, &keys.env),
            spec: p.spec.clone(),
            status: None,
        })),
        InputObject::OutlierDetection(p) => InputObject::OutlierDetection(Box::new(OutlierDetection {
            metadata: policy_meta(meta, &keys.env),
            spec: p.spec.clone(),
            status: None,
        })),
        InputObject::ClientConnectionConfig(p) => {
            InputObject::ClientConnectionConfig(Box::new(ClientConnectionConfig {
                metadata: policy_meta(meta, &keys.env),
                spec: p.spec.clone(),
                status: None,
            }))
        }
        InputObject::Dependency(p) => InputObject::Dependency(Box::new(Dependency {
            metadata: policy_meta(meta, &keys.env),
            spec: p.spec.clone(),
            status: None,
        })),
    })
}

/// What the engine reads of a policy's metadata: identity, env and priority (labels and the env
/// annotation), when it was created (the newest wins), its generation (its status says which it
/// saw).
fn policy_meta(meta: &ObjectMeta, env_key: &str) -> ObjectMeta {
    let env = meta.annotations.iter().flatten().filter(|(k, _)| k.as_str() == env_key);
    let annotations: BTreeMap<String, String> = env.map(|(k, v)| (k.clone(), v.clone())).collect();
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        labels: meta.labels.clone().filter(|l| !l.is_empty()),
        annotations: (!annotations.is_empty()).then_some(annotations),
        creation_timestamp: meta.creation_timestamp.clone(),
        generation: meta.generation,
        ..Default::default()
    }
}
