//! Reads a fleet from disk for `flotilla render`: one sub-directory per member (its name is the
//! cluster id), an optional `_hub/` for a hub that is not a member, an optional `fleet.yaml` with
//! per-cluster overrides.
//!
//! A broken file or object is reported (naming the file, document and object) and skipped; only
//! what makes the whole fleet unreadable is an `Err`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use k8s_openapi::api::core::v1::ConfigMap;

use crate::compute::plan::ObservedObject;
use crate::compute::{DesiredObject, ObjectKey};
use crate::ingest::InputObject;
use crate::meta::{HUB, first_line, is_dns_label};
use crate::model::{ClusterId, ClusterOverrides};

pub const FLEET_FILE: &str = "fleet.yaml";
pub const HUB_DIR: &str = "_hub";

#[derive(Debug, thiserror::Error)]
pub enum FleetDirError {
    #[error("fleet directory {0}: {1}")]
    Unreadable(PathBuf, std::io::Error),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path}: {message}")]
    FleetFile { path: PathBuf, message: String },
}

/// `fleet.yaml`: optional per-cluster overrides.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterOverridesFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterOverridesFile {
    pub region: Option<String>,
    pub gateway_address: Option<String>,
    pub gateway_port: Option<u16>,
    /// Set by `flotilla snapshot` for a member it could not read: why. Its inputs are unknown.
    pub unreachable: Option<String>,
}

/// Everything read from a fleet directory.
#[derive(Debug, Default)]
pub struct LoadedFleet {
    /// Member ids with their overrides, in id order.
    pub clusters: BTreeMap<ClusterId, ClusterOverrides>,
    /// Input objects per cluster (`_hub` for the hub), in file order.
    pub objects: Vec<(ClusterId, InputObject)>,
    /// Objects of the kinds flotilla writes that are already in a member (conflict detection).
    pub observed: BTreeMap<ClusterId, BTreeMap<ObjectKey, ObservedObject>>,
    /// Members a snapshot could not read, with why (`unreachable` in `fleet.yaml`).
    pub unreachable: BTreeMap<ClusterId, String>,
    /// ConfigMaps kept in `_hub/` by name: one of them may be the VIP store.
    pub hub_config_maps: BTreeMap<String, ConfigMap>,
    /// Problems with single files or objects; each line names the file.
    pub problems: Vec<String>,
}

pub fn load(dir: &Path) -> Result<LoadedFleet, FleetDirError> {
    let meta = fs::metadata(dir).map_err(|e| FleetDirError::Unreadable(dir.to_path_buf(), e))?;
    if !meta.is_dir() {
        return Err(FleetDirError::NotADirectory(dir.to_path_buf()));
    }
    let mut fleet = LoadedFleet::default();
    let fleet_file = read_fleet_file(&dir.join(FLEET_FILE))?;

    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| FleetDirError::Unreadable(dir.to_path_buf(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    // What the walk finds, in path order: files to read, and problems with directories.
    let mut steps: Vec<Step> = Vec::new();
    for sub in entries {
        let name = sub.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let cluster = if name == HUB_DIR {
            HUB.to_string()
        } else if name.starts_with('.') {
            continue;
        } else if !is_dns_label(&name) {
            steps.push(Step::Problem(format!(
                "{}: directory name {name:?} is not a valid cluster id (a DNS label); skipped",
                sub.display()
            )));
            continue;
        } else {
            let o = fleet_file.clusters.get(&name);
            let overrides = ClusterOverrides {
                region: o.and_then(|o| o.region.clone()),
                gateway_address: o.and_then(|o| o.gateway_address.clone()),
                gateway_port: o.and_then(|o| o.gateway_port),
            };
            fleet.clusters.insert(name.clone(), overrides);
            if let Some(why) = o.and_then(|o| o.unreachable.clone()) {
                fleet.unreachable.insert(name.clone(), why);
            }
            name
        };
        let mut problems = Vec::new();
        let files = manifest_files(&sub, &mut problems);
        steps.extend(problems.into_iter().map(Step::Problem));
        steps.extend(files.into_iter().map(|f| Step::File(f, cluster.clone())));
    }
    // Parsing is most of the time and files are independent: each is read into a part of its own
    // on every core, and the parts are merged in path order, as one thread would have read them.
    let parts = crate::parallel::map_each(crate::parallel::cores(), &steps, |step| {
        let mut part = LoadedFleet::default();
        match step {
            Step::File(file, cluster) => load_file(file, cluster, &mut part),
            Step::Problem(p) => part.problems.push(p.clone()),
        }
        part
    });
    for part in parts {
        fleet.objects.extend(part.objects);
        for (cluster, observed) in part.observed {
            fleet.observed.entry(cluster).or_default().extend(observed);
        }
        fleet.hub_config_maps.extend(part.hub_config_maps);
        fleet.problems.extend(part.problems);
    }
    for id in fleet_file.clusters.keys() {
        if !fleet.clusters.contains_key(id) {
            fleet.problems.push(format!(
                "{}: cluster {id:?} has no directory; its overrides are unused",
                dir.join(FLEET_FILE).display()
            ));
        }
    }
    Ok(fleet)
}

enum Step {
    File(PathBuf, ClusterId),
    Problem(String),
}

fn read_fleet_file(path: &Path) -> Result<FleetFile, FleetDirError> {
    match fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FleetFile::default()),
        Err(e) => Err(FleetDirError::FleetFile { path: path.to_path_buf(), message: e.to_string() }),
        Ok(text) if text.trim().is_empty() => Ok(FleetFile::default()),
        Ok(text) => serde_saphyr::from_str(&text)
            .map_err(|e| FleetDirError::FleetFile { path: path.to_path_buf(), message: first_line(&e.to_string()) }),
    }
}

/// `*.yaml`, `*.yml` and `*.json` below `dir`, recursively, sorted by path.
fn manifest_files(dir: &Path, problems: &mut Vec<String>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) => {
                problems.push(format!("{}: {e}", d.display()));
                continue;
            }
        };
        for entry in rd.filter_map(Result::ok) {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn load_file(path: &Path, cluster: &str, fleet: &mut LoadedFleet) {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            fleet.problems.push(format!("{}: {e}", path.display()));
            return;
        }
    };
    let docs = match crate::yaml::parse_documents(&text) {
        Ok(d) => d,
        Err(e) => {
            fleet.problems.push(format!("{}: not valid YAML: {}", path.display(), first_line(&e)));
            return;
        }
    };
    for (i, doc) in docs.into_iter().enumerate() {
        load_document(path, i + 1, doc, cluster, fleet);
    }
}

fn load_document(path: &Path, index: usize, doc: serde_json::Value, cluster: &str, fleet: &mut LoadedFleet) {
    let api_version = doc.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let kind = doc.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let name = doc.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or("<no name>").to_string();
    let place = format!("{} (document {index}, {kind} {name})", path.display());
    if api_version.is_empty() || kind.is_empty() {
        fleet.problems.push(format!("{}: document {index} has no apiVersion/kind; skipped", path.display()));
        return;
    }
    let group = api_version.split_once('/').map(|(g, _)| g).unwrap_or("");

    if kind == "List" || kind.ends_with("List") && doc.get("items").is_some() {
        for item in doc.get("items").and_then(|v| v.as_array()).cloned().unwrap_or_default() {
            load_document(path, index, item, cluster, fleet);
        }
        return;
    }

    fn typed<T: DeserializeOwned>(doc: serde_json::Value, place: &str, problems: &mut Vec<String>) -> Option<T> {
        match serde_json::from_value::<T>(doc) {
            Ok(v) => Some(v),
            Err(e) => {
                problems.push(format!("{place}: {e}; skipped"));
                None
            }
        }
    }
    // The hub's ConfigMaps (one may be the VIP store); a member's are not read.
    if api_version == "v1" && kind == "ConfigMap" {
        if cluster == HUB
            && let Some(cm) = typed::<ConfigMap>(doc, &place, &mut fleet.problems)
        {
            fleet.hub_config_maps.insert(cm.metadata.name.clone().unwrap_or_default(), cm);
        }
        return;
    }
    let problems = &mut fleet.problems;
    let input = match (group, kind.as_str()) {
        ("apps", "Deployment") => typed(doc, &place, problems).map(|o| InputObject::Deployment(Box::new(o))),
        ("argoproj.io", "Rollout") => typed(doc, &place, problems).map(|o| InputObject::Rollout(Box::new(o))),
        ("networking.istio.io", "VirtualService") => {
            typed(doc, &place, problems).map(|o| InputObject::VirtualService(Box::new(o)))
        }
        ("", "Service") if api_version == "v1" => {
            typed(doc, &place, problems).map(|o| InputObject::Service(Box::new(o)))
        }
        ("", "Node") if api_version == "v1" => typed(doc, &place, problems).map(|o| InputObject::Node(Box::new(o))),
        ("", "Namespace") if api_version == "v1" => {
            typed(doc, &place, problems).map(|o| InputObject::Namespace(Box::new(o)))
        }
        ("admiral.io", "GlobalTrafficPolicy") => {
            typed(doc, &place, problems).map(|o| InputObject::GlobalTrafficPolicy(Box::new(o)))
        }
        ("admiral.io", "OutlierDetection") => {
            typed(doc, &place, problems).map(|o| InputObject::OutlierDetection(Box::new(o)))
        }
        ("admiral.io", "ClientConnectionConfig") => {
            typed(doc, &place, problems).map(|o| InputObject::ClientConnectionConfig(Box::new(o)))
        }
        ("admiral.io", "Dependency") => typed(doc, &place, problems).map(|o| InputObject::Dependency(Box::new(o))),
        ("networking.istio.io", "ServiceEntry" | "DestinationRule" | "Sidecar") => {
            let observed = match kind.as_str() {
                "ServiceEntry" => typed(doc.clone(), &place, problems).map(DesiredObject::ServiceEntry),
                "DestinationRule" => typed(doc.clone(), &place, problems).map(DesiredObject::DestinationRule),
                _ => typed(doc.clone(), &place, problems).map(DesiredObject::Sidecar),
            };
            let Some(mut object) = observed else { return };
            default_namespace(&mut object);
            let observed = ObservedObject::new(&object);
            // A Sidecar or ServiceEntry someone else manages is also an input: it can block ours.
            let foreign = match (object, observed.managed) {
                (DesiredObject::Sidecar(s), false) => Some(InputObject::Sidecar(Box::new(s))),
                (DesiredObject::ServiceEntry(se), false) => Some(InputObject::ServiceEntry(Box::new(se))),
                _ => None,
            };
            if cluster != HUB {
                fleet.observed.entry(cluster.to_string()).or_default().insert(observed.key.clone(), observed);
            }
            foreign
        }
        _ => None, // kinds flotilla does not read are ignored
    };
    let Some(mut input) = input else { return };
    if cluster == HUB && !matches!(input, InputObject::Dependency(_)) {
        fleet.problems.push(format!(
            "{place}: only Dependencies (and the VIP store ConfigMap) are read from {HUB_DIR}/; ignored"
        ));
        return;
    }
    set_default_namespace(&mut input);
    fleet.objects.push((cluster.to_string(), input));
}

/// Namespaced objects without a namespace land in `default`, as `kubectl apply` would put them.
fn set_default_namespace(input: &mut InputObject) {
    if matches!(input, InputObject::Node(_) | InputObject::Namespace(_)) {
        return;
    }
    let meta = input.meta_mut();
    if meta.namespace.as_deref().unwrap_or("").is_empty() {
        meta.namespace = Some("default".into());
    }
}

fn default_namespace(object: &mut DesiredObject) {
    let meta = match object {
        DesiredObject::DestinationRule(o) => &mut o.metadata,
        DesiredObject::ServiceEntry(o) => &mut o.metadata,
        DesiredObject::Sidecar(o) => &mut o.metadata,
    };
    if meta.namespace.as_deref().unwrap_or("").is_empty() {
        meta.namespace = Some("default".into());
    }
}
