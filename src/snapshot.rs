//! `flotilla snapshot`: the live fleet's inputs, written as a fleet directory that `render`,
//! `diff` and `explain` read. It connects as `run` does (the registration Secrets in the hub,
//! the same kubeconfig checks) and writes, per member, only what the engine reads
//! (`ingest::reduce`), sorted, so that two snapshots of an unchanged fleet are byte-identical.
//! Members that cannot be reached are marked in `fleet.yaml`, never silently left out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Secret, Service};
use kube::api::ListParams;
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::argo::{Rollout, VirtualService};
use crate::compute::DesiredObject;
use crate::controller::registry::{KubeconfigTrust, Registration, check_kubeconfig, member_client, resolve_claims};
use crate::crd::{ClientConnectionConfig, Dependency, GlobalTrafficPolicy, OutlierDetection};
use crate::fleet_dir::{FLEET_FILE, HUB_DIR};
use crate::ingest::{InputObject, reduce};
use crate::istio::{DestinationRule, ServiceEntry, Sidecar};
use crate::meta::{first_line, is_ours};
use crate::settings::{Keys, LabelTerm};

/// How long listing one member may take before it is reported unreachable.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct SnapshotOptions {
    /// flotilla's namespace in the hub (the VIP store).
    pub namespace: String,
    pub secret_namespace: String,
    pub secret_selectors: Vec<LabelTerm>,
    pub kubeconfig_trust: KubeconfigTrust,
    pub sync_namespace: String,
    pub keys: crate::settings::Keys,
    pub vip_configmap: String,
    /// This installation (`--instance`): another installation's objects are someone else's.
    pub instance: String,
    /// `--adopt-from=admiral`: Admiral's objects count as flotilla's (they are taken over).
    pub adopt_admiral: bool,
    /// `--import-vips-from`: Admiral's address store, copied into `_hub/`.
    pub import_vips_from: Option<(String, String)>,
}

/// What a snapshot found: the members written, and those that could not be read, with why.
#[derive(Debug, Default)]
pub struct SnapshotReport {
    pub members: Vec<String>,
    pub unreachable: BTreeMap<String, String>,
    pub problems: Vec<String>,
}

/// Takes a snapshot of the fleet `hub` registers into `out` (created; replaced if it holds an
/// earlier snapshot, refused if it holds anything else).
pub async fn snapshot(hub: &Client, opts: &SnapshotOptions, out: &Path) -> anyhow::Result<SnapshotReport> {
    prepare_out_dir(out)?;
    let secrets = registration_secrets(hub, opts).await?;
    let (claims, problems) = resolve_claims(&secrets);
    let mut report =
        SnapshotReport { problems: problems.iter().map(|p| p.to_string()).collect(), ..Default::default() };

    let progress = crate::progress::Progress::stderr("snapshot");
    progress.say(format_args!("reading {} members", claims.len()));
    let members = join_all(claims.iter().map(|(id, reg)| async {
        let read = read_member(id, reg, opts).await;
        progress.tick(claims.len(), "members read");
        read
    }))
    .await;
    progress.finish();
    let mut fleet_file =
        String::from("# Taken by `flotilla snapshot`: per-member overrides from the registration Secrets.\n");
    fleet_file.push_str(if claims.is_empty() { "clusters: {}\n" } else { "clusters:\n" });
    for ((id, registration), result) in claims.iter().zip(members) {
        let o = &registration.overrides;
        let _ = writeln!(
            fleet_file,
            "  {id}:{}",
            if registration.overrides == Default::default() && result.is_ok() { " {}" } else { "" }
        );
        for (key, value) in [
            ("region", o.region.clone()),
            ("gatewayAddress", o.gateway_address.clone()),
            ("gatewayPort", o.gateway_port.map(|p| p.to_string())),
            ("trustDomain", o.trust_domain.clone()),
        ] {
            if let Some(v) = value {
                let _ = writeln!(fleet_file, "    {key}: {}", serde_json::to_string(&v)?);
            }
        }
        if o.drain {
            let _ = writeln!(fleet_file, "    drain: true");
        }
        let dir = out.join(id);
        std::fs::create_dir_all(&dir)?;
        match result {
            Ok(files) => {
                for (name, text) in files {
                    std::fs::write(dir.join(name), text)?;
                }
                report.members.push(id.clone());
            }
            Err(why) => {
                let _ = writeln!(fleet_file, "    unreachable: {}", serde_json::to_string(&why)?);
                report.unreachable.insert(id.clone(), why);
            }
        }
    }
    std::fs::write(out.join(FLEET_FILE), fleet_file)?;

    let hub_dir = out.join(HUB_DIR);
    std::fs::create_dir_all(&hub_dir)?;
    let deps = list::<Dependency>(Api::all(hub.clone())).await?;
    let deps: Vec<InputObject> = deps.into_iter().map(|d| InputObject::Dependency(Box::new(d))).collect();
    write_if_any(&hub_dir, "dependencies.yaml", &reduced(&deps, &opts.keys))?;
    let configmaps: Api<ConfigMap> = Api::namespaced(hub.clone(), &opts.namespace);
    let shards = list(configmaps).await?.into_iter().filter(|cm| {
        cm.metadata.name.as_deref().and_then(|n| crate::compute::vip::shard_index(&opts.vip_configmap, n)).is_some()
    });
    let imported = match &opts.import_vips_from {
        Some((namespace, name)) => {
            let api: Api<ConfigMap> = Api::namespaced(hub.clone(), namespace);
            let found = tokio::time::timeout(crate::controller::deadline::REQUEST, api.get_opt(name)).await.map_err(
                |_| anyhow::anyhow!("--import-vips-from {namespace}/{name}: no answer from the hub in time"),
            )??;
            Some(found.ok_or_else(|| {
                anyhow::anyhow!("--import-vips-from {namespace}/{name}: no such ConfigMap in the hub")
            })?)
        }
        None => None,
    };
    for store in shards.chain(imported) {
        let name = store.metadata.name.clone().unwrap_or_default();
        let kept = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: store.metadata.name.clone(),
                namespace: store.metadata.namespace.clone(),
                ..Default::default()
            },
            data: store.data.clone(),
            ..Default::default()
        };
        std::fs::write(hub_dir.join(format!("{name}.yaml")), document(&kept))?;
    }
    Ok(report)
}

/// The objects flotilla owns in each reachable member, as they are now.
pub type Owned = BTreeMap<String, BTreeMap<crate::compute::ObjectKey, DesiredObject>>;

/// What flotilla owns now in every member `hub` registers (its ServiceEntries, DestinationRules
/// and alias VirtualServices in the sync namespace, its Sidecars anywhere; with `adopt_admiral`
/// also Admiral's there, which it would take over, but not Admiral's VirtualServices: it writes
/// its aliases, not its copies of users' VirtualServices); unreachable members are left out (`snapshot`
/// reports them).
pub async fn owned(hub: &Client, opts: &SnapshotOptions) -> anyhow::Result<Owned> {
    let secrets = registration_secrets(hub, opts).await?;
    let (claims, _) = resolve_claims(&secrets);
    let mut out = Owned::new();
    for (id, reg) in claims {
        let Ok(kubeconfig) = check_kubeconfig(&reg.kubeconfig, opts.kubeconfig_trust) else { continue };
        let Ok(client) = member_client(kubeconfig).await else { continue };
        let managed = format!("{}={}", crate::meta::LABEL_MANAGED_BY, crate::meta::MANAGER);
        // Admiral's objects carry no label to select them by.
        let lp = if opts.adopt_admiral { ListParams::default() } else { ListParams::default().labels(&managed) };
        let owns = |m: &kube::api::ObjectMeta| {
            is_ours(m, &opts.instance) || (opts.adopt_admiral && crate::meta::is_admirals_alone(m))
        };
        let listed = async {
            let mut objects = Vec::new();
            let ses = Api::<ServiceEntry>::namespaced(client.clone(), &opts.sync_namespace).list(&lp).await?;
            objects.extend(ses.items.into_iter().map(DesiredObject::ServiceEntry));
            let drs = Api::<DestinationRule>::namespaced(client.clone(), &opts.sync_namespace).list(&lp).await?;
            objects.extend(drs.items.into_iter().map(DesiredObject::DestinationRule));
            let sidecars = Api::<Sidecar>::all(client.clone()).list(&lp).await?;
            objects.extend(sidecars.items.into_iter().map(DesiredObject::Sidecar));
            // Managed ones only: Admiral's VirtualServices are mostly copies of users' ones.
            let managed_only = ListParams::default().labels(&managed);
            let aliases = Api::<VirtualService>::namespaced(client.clone(), &opts.sync_namespace);
            objects.extend(aliases.list(&managed_only).await?.items.into_iter().map(DesiredObject::VirtualService));
            Ok::<_, kube::Error>(objects)
        };
        if let Ok(Ok(objects)) = tokio::time::timeout(MEMBER_TIMEOUT, listed).await {
            out.insert(id, objects.into_iter().filter(|o| owns(o.meta())).map(|o| (o.key(), o)).collect());
        }
    }
    Ok(out)
}

/// An output directory that is missing, empty, or an earlier snapshot (it has `fleet.yaml`).
fn prepare_out_dir(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)?.next().is_none();
        if !empty && !out.join(FLEET_FILE).exists() {
            anyhow::bail!(
                "{} holds files and is not an earlier snapshot (no {FLEET_FILE}); not overwritten",
                out.display()
            );
        }
        std::fs::remove_dir_all(out)?;
    }
    std::fs::create_dir_all(out)?;
    Ok(())
}

/// The registration Secrets, as `run` selects them (any selector matches).
pub(crate) async fn registration_secrets(hub: &Client, opts: &SnapshotOptions) -> anyhow::Result<Vec<Secret>> {
    let api: Api<Secret> = Api::namespaced(hub.clone(), &opts.secret_namespace);
    let mut by_name = BTreeMap::new();
    for term in &opts.secret_selectors {
        let list = api.list(&ListParams::default().labels(&term.to_string())).await?;
        for s in list.items {
            by_name.insert(s.metadata.name.clone().unwrap_or_default(), s);
        }
    }
    Ok(by_name.into_values().collect())
}

/// Every file of one member: `<kind>.yaml`, documents sorted by namespace and name; or why the
/// member could not be read.
async fn read_member(id: &str, reg: &Registration, opts: &SnapshotOptions) -> Result<Vec<(String, String)>, String> {
    let kubeconfig = check_kubeconfig(&reg.kubeconfig, opts.kubeconfig_trust).map_err(|e| e.to_string())?;
    let client = member_client(kubeconfig).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(MEMBER_TIMEOUT, member_files(client, opts)).await {
        Ok(Ok(files)) => Ok(files),
        Ok(Err(e)) => Err(format!("cluster {id}: {}", first_line(&e.to_string()))),
        Err(_) => Err(format!("cluster {id}: not listed within {}s", MEMBER_TIMEOUT.as_secs())),
    }
}

async fn member_files(client: Client, opts: &SnapshotOptions) -> Result<Vec<(String, String)>, kube::Error> {
    let keys = &opts.keys;
    let mut files = Vec::new();
    macro_rules! inputs {
        ($($file:literal: $kind:ident),* $(,)?) => {$(
            let objects: Vec<InputObject> =
                list::<$kind>(Api::all(client.clone())).await?.into_iter().map(|o| InputObject::$kind(Box::new(o))).collect();
            files.push(($file.to_string(), reduced(&objects, keys)));
        )*};
    }
    inputs!(
        "nodes.yaml": Node,
        "namespaces.yaml": Namespace,
        "deployments.yaml": Deployment,
        "jobs.yaml": Job,
        "cronjobs.yaml": CronJob,
        "services.yaml": Service,
        "sidecars.yaml": Sidecar,
        "globaltrafficpolicies.yaml": GlobalTrafficPolicy,
        "outlierdetections.yaml": OutlierDetection,
        "clientconnectionconfigs.yaml": ClientConnectionConfig,
        "dependencies.yaml": Dependency,
        "virtualservices.yaml": VirtualService,
    );
    // Rollouts where their CRD is installed (a member without it has none).
    match list::<Rollout>(Api::all(client.clone())).await {
        Ok(rollouts) => {
            let objects: Vec<InputObject> = rollouts.into_iter().map(|o| InputObject::Rollout(Box::new(o))).collect();
            files.push(("rollouts.yaml".to_string(), reduced(&objects, keys)));
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e),
    }
    // Someone else's ServiceEntries and DestinationRules in the sync namespace: names flotilla
    // must not write over (render reports them as conflicts, as run does).
    let mut foreign: Vec<DesiredObject> = Vec::new();
    for se in list::<ServiceEntry>(Api::namespaced(client.clone(), &opts.sync_namespace)).await? {
        if !is_ours(&se.metadata, &opts.instance) {
            let spec = crate::istio::ServiceEntrySpec { hosts: se.spec.hosts.clone(), ..Default::default() };
            foreign.push(DesiredObject::ServiceEntry(ServiceEntry { metadata: name_only(&se), spec }));
        }
    }
    for dr in list::<DestinationRule>(Api::namespaced(client.clone(), &opts.sync_namespace)).await? {
        if !is_ours(&dr.metadata, &opts.instance) {
            let spec = crate::istio::DestinationRuleSpec { host: dr.spec.host.clone(), ..Default::default() };
            foreign.push(DesiredObject::DestinationRule(DestinationRule { metadata: name_only(&dr), spec }));
        }
    }
    // Another installation's aliases (users' VirtualServices are in virtualservices.yaml).
    for vs in list::<VirtualService>(Api::namespaced(client.clone(), &opts.sync_namespace)).await? {
        if crate::meta::is_managed(&vs.metadata) && !is_ours(&vs.metadata, &opts.instance) {
            let spec = crate::istio::VirtualServiceSpec { hosts: vs.spec.hosts.clone(), ..Default::default() };
            foreign.push(DesiredObject::VirtualService(VirtualService { metadata: name_only(&vs), spec }));
        }
    }
    foreign.sort_by_key(|o| o.key());
    files.push(("foreign-outputs.yaml".to_string(), foreign.iter().map(document).collect()));
    files.retain(|(_, text)| !text.is_empty());
    Ok(files)
}

/// Name and namespace, and whether Admiral created it (what `--adopt-from=admiral` takes over).
fn name_only<K: Resource>(o: &K) -> kube::api::ObjectMeta {
    let admirals = crate::meta::is_admirals(o.meta());
    let created_by = [(crate::meta::ANNOTATION_CREATED_BY.to_string(), crate::meta::ADMIRAL.to_string())];
    kube::api::ObjectMeta {
        name: o.meta().name.clone(),
        namespace: o.meta().namespace.clone(),
        annotations: admirals.then(|| created_by.into_iter().collect()),
        ..Default::default()
    }
}

async fn list<K>(api: Api<K>) -> Result<Vec<K>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(api.list(&ListParams::default()).await?.items)
}

/// The reduced objects as YAML documents, sorted by (namespace, name).
fn reduced(objects: &[InputObject], keys: &Keys) -> String {
    let mut kept: Vec<InputObject> = objects.iter().filter_map(|o| reduce(o, keys)).collect();
    kept.sort_by_key(|o| o.key());
    kept.iter().map(input_document).collect()
}

fn input_document(obj: &InputObject) -> String {
    match obj {
        InputObject::Deployment(o) => document(&**o),
        InputObject::Rollout(o) => document(&**o),
        InputObject::Job(o) => document(&**o),
        InputObject::CronJob(o) => document(&**o),
        InputObject::VirtualService(o) => document(&**o),
        InputObject::Service(o) => document(&**o),
        InputObject::Node(o) => document(&**o),
        InputObject::Namespace(o) => document(&**o),
        InputObject::Sidecar(o) => document(&**o),
        InputObject::ServiceEntry(o) => document(&**o),
        InputObject::GlobalTrafficPolicy(o) => document(&**o),
        InputObject::OutlierDetection(o) => document(&**o),
        InputObject::ClientConnectionConfig(o) => document(&**o),
        InputObject::Dependency(o) => document(&**o),
    }
}

fn document<T: Serialize>(value: &T) -> String {
    format!("---\n{}", crate::yaml::to_yaml(value))
}

fn write_if_any(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    if text.is_empty() { Ok(()) } else { std::fs::write(dir.join(name), text) }
}
