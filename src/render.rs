//! `flotilla render`: the controller's pipeline with the watches replaced by files and the writer
//! replaced by a printer. Same model, same engine, same planner: if `render` and `run` could
//! disagree, the design would have a leak.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use crate::compute::plan::plan_cluster;
use crate::compute::vip::{self, VipTable};
use crate::compute::{Desired, DesiredObject, Engine, PolicyState, Severity};
use crate::fleet_dir::LoadedFleet;
use crate::model::ClusterId;
use crate::settings::Settings;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Yaml,
    Json,
}

/// The objects `run` would write, per member, and what was found wrong on the way.
#[derive(Debug, Default)]
pub struct Rendered {
    pub clusters: BTreeMap<ClusterId, Vec<Arc<Desired>>>,
    /// One line each, errors first, then warnings.
    pub diagnostics: Vec<String>,
    pub errors: usize,
}

/// The engine after one full compute of a loaded fleet: what `render` prints from. The hub's
/// VIP store (the ConfigMap `vip_store` in `_hub/`, as `run` keeps it) gives the addresses already
/// allocated, so `render` writes the addresses `run` writes; hosts it does not hold get addresses
/// as `run` would allocate them.
pub fn engine(loaded: &LoadedFleet, settings: &Settings, vip_store: &str) -> Engine {
    let store = loaded.hub_config_maps.get(vip_store).map(|cm| vip::parse_store(cm.data.as_ref()));
    let mut engine = Engine::new(settings.clone(), VipTable::from_existing(store.unwrap_or_default()));
    for (id, overrides) in &loaded.clusters {
        engine.fleet.upsert_cluster(id, overrides.clone());
    }
    // A member a snapshot could not read is as stale as run would find it.
    for id in loaded.unreachable.keys() {
        engine.fleet.set_health(id, crate::model::ClusterHealth::Stale);
    }
    for (cluster, obj) in &loaded.objects {
        engine.ingest(cluster, obj);
    }
    engine.recompute();
    engine
}

/// Runs the engine over a loaded fleet (see `engine`).
pub fn render(loaded: LoadedFleet, settings: &Settings, vip_store: &str) -> Rendered {
    let engine = engine(&loaded, settings, vip_store);
    let mut rendered = Rendered::default();
    let mut errors: Vec<String> = loaded.problems.iter().map(|p| format!("error: {p}")).collect();
    for (id, why) in &loaded.unreachable {
        errors.push(format!(
            "error: cluster {id}: unreachable when the snapshot was taken ({why}): its workloads are unknown here, so its endpoints and config differ from what run keeps"
        ));
    }
    let mut warnings = Vec::new();
    for d in engine.all_diagnostics() {
        match d.severity {
            Severity::Error => errors.push(d.to_string()),
            Severity::Warning => warnings.push(d.to_string()),
        }
    }
    for r in engine.desired.reports() {
        let what = format!("{} {}/{}", r.kind, r.at.namespace, r.at.name);
        let at = &r.at.cluster;
        let (_, message) = r.state.describe();
        match &r.state {
            PolicyState::Ready if !r.message.is_empty() => {
                warnings.push(format!("warning: cluster {at}: {what}: {}", r.message))
            }
            PolicyState::Ready => {}
            PolicyState::Invalid(_) => errors.push(format!("error: cluster {at}: {what}: invalid: {message}")),
            PolicyState::Conflict(_) | PolicyState::NotApplied(_) => {
                warnings.push(format!("warning: cluster {at}: {what}: {message}"))
            }
        }
    }

    let no_objects = BTreeMap::new();
    for id in loaded.clusters.keys() {
        let mut desired = engine.desired.cluster(id);
        let plan = plan_cluster(&desired, loaded.observed.get(id).unwrap_or(&no_objects));
        for key in &plan.conflicts {
            warnings.push(format!("warning: cluster {id}: {key}: exists and is not managed by flotilla; left alone"));
        }
        desired.retain(|o| !plan.conflicts.contains(&o.key));
        rendered.clusters.insert(id.clone(), desired);
    }
    rendered.errors = errors.len();
    rendered.diagnostics = errors.into_iter().chain(warnings).collect();
    rendered
}

/// `# cluster: <id>` then the cluster's objects as YAML documents, for every member.
pub fn to_yaml(rendered: &Rendered) -> String {
    per_cluster(rendered, cluster_yaml).concat()
}

/// `f` for every member, on every core (printing is most of `render`'s time), in member order.
fn per_cluster<R: Send>(rendered: &Rendered, f: impl Fn(&str, &[Arc<Desired>]) -> R + Sync) -> Vec<R> {
    let clusters: Vec<_> = rendered.clusters.iter().collect();
    crate::parallel::map_each(crate::parallel::cores(), &clusters, |(id, objects)| f(id, objects))
}

fn cluster_yaml(id: &str, objects: &[Arc<Desired>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# cluster: {id}");
    for o in objects {
        out.push_str("---\n");
        crate::yaml::push_yaml(&mut out, &o.object);
    }
    out
}

/// `{"clusters": {"<id>": [objects]}}`, pretty-printed.
pub fn to_json(rendered: &Rendered) -> String {
    let clusters: BTreeMap<&str, Vec<&DesiredObject>> =
        rendered.clusters.iter().map(|(id, objs)| (id.as_str(), objs.iter().map(|o| &o.object).collect())).collect();
    let mut s = serde_json::to_string_pretty(&serde_json::json!({ "clusters": clusters })).expect("serialising JSON");
    s.push('\n');
    s
}

/// One file per member in `dir`: `<id>.yaml` or `<id>.json` (a JSON array of objects).
pub fn write_out_dir(rendered: &Rendered, dir: &Path, format: Format) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let written = per_cluster(rendered, |id, objects| {
        let (file, body) = match format {
            Format::Yaml => (format!("{id}.yaml"), cluster_yaml(id, objects)),
            Format::Json => {
                let list: Vec<&DesiredObject> = objects.iter().map(|o| &o.object).collect();
                (format!("{id}.json"), serde_json::to_string_pretty(&list).expect("serialising JSON") + "\n")
            }
        };
        std::fs::write(dir.join(file), body)
    });
    written.into_iter().collect()
}
