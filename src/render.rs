//! `flotilla render`: the controller's pipeline with the watches replaced by files and the writer
//! replaced by a printer. Same model, same engine, same planner: if `render` and `run` could
//! disagree, the design would have a leak.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::marker::PhantomData;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::compute::plan::plan_cluster;
use crate::compute::vip::{self, VipTable};
use crate::compute::{Desired, Engine, PolicyState, Severity};
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
    /// One line each, errors first, then warnings, then notes.
    pub diagnostics: Vec<String>,
    pub errors: usize,
}

/// The engine after one full compute of a loaded fleet: what `render` prints from. The hub's
/// VIP store (the ConfigMap `vip_store` and its further shards in `_hub/`, as `run` keeps them)
/// gives the addresses already allocated, so `render` writes the addresses `run` writes; hosts it
/// does not hold get addresses as `run` would allocate them.
pub fn engine(loaded: &LoadedFleet, settings: &Settings, vip_store: &str) -> Engine {
    let store = stored_vips(loaded, vip_store);
    let imported = vip::Imported::new(imported_vips(loaded, settings).unwrap_or_default());
    let mut engine = Engine::new(settings.clone(), VipTable::from_existing(store).with_imported(imported));
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

/// The addresses the VIP store `vip_store` (its every shard in `_hub/`) holds.
fn stored_vips(loaded: &LoadedFleet, vip_store: &str) -> BTreeMap<String, Ipv4Addr> {
    let shards = loaded.hub_config_maps.iter().filter_map(|(name, cm)| Some((vip::shard_index(vip_store, name)?, cm)));
    vip::parse_shards(shards.map(|(i, cm)| (i, cm.data.as_ref())))
}

/// The addresses of Admiral's store that `--import-vips-from` names, as `_hub/` holds it (the
/// ConfigMap of that name; its namespace, when the file gives one, must match).
pub fn imported_vips(loaded: &LoadedFleet, settings: &Settings) -> Result<BTreeMap<String, Ipv4Addr>, String> {
    let Some((namespace, name)) = &settings.import_vips_from else { return Ok(BTreeMap::new()) };
    let flag = format!("--import-vips-from {namespace}/{name}");
    let cm =
        loaded.hub_config_maps.get(name).filter(|cm| cm.metadata.namespace.as_deref().is_none_or(|ns| ns == namespace));
    let cm = cm.ok_or_else(|| format!("{flag}: no ConfigMap {name} in {}/", crate::fleet_dir::HUB_DIR))?;
    vip::parse_admiral_store(cm.data.as_ref()).map_err(|e| format!("{flag}: {e}"))
}

/// Runs the engine over a loaded fleet (see `engine`).
pub fn render(loaded: LoadedFleet, settings: &Settings, vip_store: &str) -> Rendered {
    let engine = engine(&loaded, settings, vip_store);
    let mut rendered = Rendered::default();
    let mut errors: Vec<String> = loaded.problems.iter().map(|p| format!("error: {p}")).collect();
    let mut warnings = Vec::new();
    if let Err(e) = imported_vips(&loaded, settings) {
        errors.push(format!("error: {e}"));
    }
    for line in engine.vips.imported().disagreements(&stored_vips(&loaded, vip_store)) {
        warnings.push(format!("warning: {line}"));
    }
    for (id, why) in &loaded.unreachable {
        errors.push(format!(
            "error: cluster {id}: unreachable when the snapshot was taken ({why}): its workloads are unknown here, so its endpoints and config differ from what run keeps"
        ));
    }
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

    let mut notes = Vec::new();
    let no_objects = BTreeMap::new();
    for id in loaded.clusters.keys() {
        let mut desired = engine.desired.cluster(id);
        let plan = plan_cluster(&desired, loaded.observed.get(id).unwrap_or(&no_objects), settings.owner());
        for key in &plan.conflicts {
            warnings.push(format!("warning: cluster {id}: {key}: exists and is not managed by flotilla; left alone"));
        }
        let adopted = plan.adopted();
        if !adopted.is_empty() {
            notes.push(format!(
                "note: cluster {id}: {} object(s) created by Admiral are taken over in place (--adopt-from=admiral)",
                adopted.len()
            ));
        }
        for key in &plan.admiral_leftovers {
            warnings.push(format!(
                "warning: cluster {id}: {key}: created by Admiral, and flotilla writes nothing under its name; left in place"
            ));
        }
        desired.retain(|o| !plan.conflicts.contains(&o.key));
        rendered.clusters.insert(id.clone(), desired);
    }
    rendered.errors = errors.len();
    rendered.diagnostics = errors.into_iter().chain(warnings).chain(notes).collect();
    rendered
}

/// `# cluster: <id>` then the cluster's objects as YAML documents, for every member.
pub fn to_yaml(rendered: &Rendered) -> String {
    let printed = PrintedOnce::yaml(rendered);
    per_cluster(rendered, |id, objects| printed.cluster(id, objects)).concat()
}

/// `f` for every member, on every core, in member order.
fn per_cluster<R: Send>(rendered: &Rendered, f: impl Fn(&str, &[Arc<Desired>]) -> R + Sync) -> Vec<R> {
    let clusters: Vec<_> = rendered.clusters.iter().collect();
    crate::parallel::map_each(crate::parallel::cores(), &clusters, |(id, objects)| f(id, objects))
}

/// Every distinct object's YAML document, printed once. Members share objects (a remote
/// ServiceEntry is one object for every member without a local endpoint: at 100 × 5,000, 28,000
/// distinct objects are placed 200,000 times), and printing was most of `render`'s time.
/// Keyed by the object's address, which stays the object's while `rendered` (borrowed for as
/// long as this lives) holds it.
struct PrintedOnce<'a> {
    texts: FxHashMap<usize, String>,
    _rendered: PhantomData<&'a Rendered>,
}

fn address(o: &Arc<Desired>) -> usize {
    Arc::as_ptr(o) as usize
}

impl<'a> PrintedOnce<'a> {
    fn yaml(rendered: &'a Rendered) -> Self {
        let mut seen = FxHashSet::default();
        let distinct: Vec<&Arc<Desired>> =
            rendered.clusters.values().flatten().filter(|o| seen.insert(address(o))).collect();
        let texts = crate::parallel::map(crate::parallel::cores(), &distinct, |o| {
            let mut text = String::from("---\n");
            crate::yaml::push_yaml(&mut text, &***o);
            text
        });
        let texts = distinct.iter().map(|o| address(o)).zip(texts).collect();
        PrintedOnce { texts, _rendered: PhantomData }
    }

    fn cluster(&self, id: &str, objects: &[Arc<Desired>]) -> String {
        let texts: Vec<&str> = objects.iter().map(|o| self.texts[&address(o)].as_str()).collect();
        let mut out = String::with_capacity(id.len() + 12 + texts.iter().map(|t| t.len()).sum::<usize>());
        let _ = writeln!(out, "# cluster: {id}");
        texts.into_iter().for_each(|t| out.push_str(t));
        out
    }
}

/// `{"clusters": {"<id>": [objects]}}`, pretty-printed.
pub fn to_json(rendered: &Rendered) -> String {
    let clusters: BTreeMap<&str, Vec<&Desired>> =
        rendered.clusters.iter().map(|(id, objs)| (id.as_str(), objs.iter().map(|o| &**o).collect())).collect();
    let mut s = serde_json::to_string_pretty(&serde_json::json!({ "clusters": clusters })).expect("serialising JSON");
    s.push('\n');
    s
}

/// One file per member in `dir`: `<id>.yaml` or `<id>.json` (a JSON array of objects).
pub fn write_out_dir(rendered: &Rendered, dir: &Path, format: Format) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let printed = (format == Format::Yaml).then(|| PrintedOnce::yaml(rendered));
    let written = per_cluster(rendered, |id, objects| {
        let (file, body) = match &printed {
            Some(printed) => (format!("{id}.yaml"), printed.cluster(id, objects)),
            None => {
                let list: Vec<&Desired> = objects.iter().map(|o| &**o).collect();
                (format!("{id}.json"), serde_json::to_string_pretty(&list).expect("serialising JSON") + "\n")
            }
        };
        std::fs::write(dir.join(file), body)
    });
    written.into_iter().collect()
}
