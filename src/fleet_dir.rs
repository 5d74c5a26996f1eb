//! Reads a fleet from disk for `flotilla render`: one sub-directory per member (its name is the
//! cluster id), an optional `_hub/` for a hub that is not a member, an optional `fleet.yaml` with
//! per-cluster overrides.
//!
//! A broken file or object is reported (naming the file, document and object) and skipped; only
//! what makes the whole fleet unreadable is an `Err`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::de::value::{MapAccessDeserializer, StrDeserializer, StringDeserializer};
use serde::de::{DeserializeSeed, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

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
    pub trust_domain: Option<String>,
    /// Drained (`flotilla.io/drain` on its registration Secret): its endpoints are withheld
    /// wherever another member serves the host.
    #[serde(default)]
    pub drain: bool,
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
                trust_domain: o.and_then(|o| o.trust_domain.clone()).filter(|td| {
                    let valid = crate::meta::is_trust_domain(td);
                    if !valid {
                        steps.push(Step::Problem(format!(
                            "{FLEET_FILE}: cluster {name}: trustDomain {td:?} is not a SPIFFE trust domain; --trust-domain is used"
                        )));
                    }
                    valid
                }),
                drain: o.is_some_and(|o| o.drain),
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
    // Most files take the direct way. Any surprise in a file (a document whose first keys are not
    // `apiVersion` and `kind`, a kind not read here, a field of the wrong type, broken YAML)
    // sends the whole file the general way, which reads, judges and reports it.
    if let Ok(docs) = crate::yaml::parse_documents_as::<Direct>(&text) {
        for (i, Direct { kind, parsed }) in docs.into_iter().enumerate() {
            accept(parsed, path, i + 1, &kind, cluster, fleet);
        }
        return;
    }
    load_text(path, &text, cluster, fleet);
}

/// The general way for a whole file.
fn load_text(path: &Path, text: &str, cluster: &str, fleet: &mut LoadedFleet) {
    let docs = match crate::yaml::parse_documents(text) {
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

/// The general way: a document as a dynamic value first, then its kind.
fn load_document(path: &Path, index: usize, doc: serde_json::Value, cluster: &str, fleet: &mut LoadedFleet) {
    let api_version = doc.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let kind = doc.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    if api_version.is_empty() || kind.is_empty() {
        fleet.problems.push(format!("{}: document {index} has no apiVersion/kind; skipped", path.display()));
        return;
    }
    if kind == "List" || kind.ends_with("List") && doc.get("items").is_some() {
        for item in doc.get("items").and_then(|v| v.as_array()).cloned().unwrap_or_default() {
            load_document(path, index, item, cluster, fleet);
        }
        return;
    }
    // A member's ConfigMaps are not read (only the hub's may hold the VIP store).
    if kind == "ConfigMap" && cluster != HUB {
        return;
    }
    let name = doc.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or(NO_NAME).to_string();
    match parse_kind(&api_version, &kind, doc) {
        None => {} // kinds flotilla does not read are ignored
        Some(Err(e)) => fleet.problems.push(format!("{}: {e}; skipped", place(path, index, &kind, &name))),
        Some(Ok(parsed)) => accept(parsed, path, index, &kind, cluster, fleet),
    }
}

const NO_NAME: &str = "<no name>";

/// How a problem names the object it is about.
fn place(path: &Path, index: usize, kind: &str, name: &str) -> String {
    format!("{} (document {index}, {kind} {name})", path.display())
}

/// One manifest document, read into the kind it declares.
enum Parsed {
    Input(InputObject),
    /// An object of a kind flotilla writes: what a member already holds.
    Written(Box<DesiredObject>),
    ConfigMap(Box<ConfigMap>),
}

/// Reads a document of `kind` from `de`, which is a dynamic value (the general way) or the YAML
/// stream itself (the direct way); `None` for kinds a fleet directory does not read.
fn parse_kind<'de, D: Deserializer<'de>>(api_version: &str, kind: &str, de: D) -> Option<Result<Parsed, D::Error>> {
    fn input<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        de: D,
        variant: fn(Box<T>) -> InputObject,
    ) -> Result<Parsed, D::Error> {
        T::deserialize(de).map(|o| Parsed::Input(variant(Box::new(o))))
    }
    fn written<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        de: D,
        variant: fn(T) -> DesiredObject,
    ) -> Result<Parsed, D::Error> {
        T::deserialize(de).map(|o| Parsed::Written(Box::new(variant(o))))
    }
    let group = api_version.split_once('/').map(|(g, _)| g).unwrap_or("");
    let core = api_version == "v1";
    Some(match (group, kind) {
        ("apps", "Deployment") => input(de, InputObject::Deployment),
        ("argoproj.io", "Rollout") => input(de, InputObject::Rollout),
        ("batch", "Job") => input(de, InputObject::Job),
        ("batch", "CronJob") => input(de, InputObject::CronJob),
        // Written (ours, or in the way of ours), and someone else's an input too (below).
        ("networking.istio.io", "VirtualService") => written(de, DesiredObject::VirtualService),
        ("", "Service") if core => input(de, InputObject::Service),
        ("", "Node") if core => input(de, InputObject::Node),
        ("", "Namespace") if core => input(de, InputObject::Namespace),
        ("", "ConfigMap") if core => ConfigMap::deserialize(de).map(|cm| Parsed::ConfigMap(Box::new(cm))),
        ("admiral.io", "GlobalTrafficPolicy") => input(de, InputObject::GlobalTrafficPolicy),
        ("admiral.io", "OutlierDetection") => input(de, InputObject::OutlierDetection),
        ("admiral.io", "ClientConnectionConfig") => input(de, InputObject::ClientConnectionConfig),
        ("admiral.io", "Dependency") => input(de, InputObject::Dependency),
        ("networking.istio.io", "ServiceEntry") => written(de, DesiredObject::ServiceEntry),
        ("networking.istio.io", "DestinationRule") => written(de, DesiredObject::DestinationRule),
        ("networking.istio.io", "Sidecar") => written(de, DesiredObject::Sidecar),
        _ => return None,
    })
}

/// Files what one document holds where it belongs.
fn accept(parsed: Parsed, path: &Path, index: usize, kind: &str, cluster: &str, fleet: &mut LoadedFleet) {
    let mut input = match parsed {
        Parsed::ConfigMap(cm) => {
            if cluster == HUB {
                fleet.hub_config_maps.insert(cm.metadata.name.clone().unwrap_or_default(), *cm);
            }
            return;
        }
        Parsed::Written(object) => {
            let mut object = *object;
            default_namespace(&mut object);
            let observed = ObservedObject::new(&object);
            // A Sidecar, ServiceEntry or VirtualService someone else manages is also an input: it
            // can block ours (or, a VirtualService, give a canary its weights).
            let foreign = match (object, observed.managed) {
                (DesiredObject::Sidecar(s), false) => Some(InputObject::Sidecar(Box::new(s))),
                (DesiredObject::ServiceEntry(se), false) => Some(InputObject::ServiceEntry(Box::new(se))),
                (DesiredObject::VirtualService(vs), false) => Some(InputObject::VirtualService(Box::new(vs))),
                _ => None,
            };
            if cluster != HUB {
                fleet.observed.entry(cluster.to_string()).or_default().insert(observed.key.clone(), observed);
            }
            let Some(foreign) = foreign else { return };
            foreign
        }
        Parsed::Input(input) => input,
    };
    if cluster == HUB && !matches!(input, InputObject::Dependency(_)) {
        let name = input.meta().name.as_deref().unwrap_or(NO_NAME);
        fleet.problems.push(format!(
            "{}: only Dependencies (and the VIP store ConfigMap) are read from {HUB_DIR}/; ignored",
            place(path, index, kind, name)
        ));
        return;
    }
    set_default_namespace(&mut input);
    fleet.objects.push((cluster.to_string(), input));
}

/// A document read the direct way: straight from the YAML stream into its kind, with no dynamic
/// value in between (parsing is most of `render`'s reading). That needs the kind before the rest,
/// so it works when `apiVersion` and `kind` are the first two keys, as kubectl, `flotilla
/// snapshot` and `flotilla synth` write them; otherwise it gives up with an error, and the file
/// is read the general way.
struct Direct {
    kind: String,
    parsed: Parsed,
}

impl<'de> Deserialize<'de> for Direct {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_map(DirectVisitor)
    }
}

struct DirectVisitor;

impl<'de> Visitor<'de> for DirectVisitor {
    type Value = Direct;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Kubernetes object starting with apiVersion and kind")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Direct, A::Error> {
        let give_up = || A::Error::custom("not read the direct way");
        let (mut api_version, mut kind) = (None, None);
        while api_version.is_none() || kind.is_none() {
            let key = map.next_key::<String>()?.ok_or_else(give_up)?;
            let slot = match key.as_str() {
                "apiVersion" if api_version.is_none() => &mut api_version,
                "kind" if kind.is_none() => &mut kind,
                _ => return Err(give_up()),
            };
            *slot = Some(map.next_value::<String>()?);
        }
        let (api_version, kind) = (api_version.ok_or_else(give_up)?, kind.ok_or_else(give_up)?);
        // The rest of the map, with the two entries already taken put back in front.
        let rest = MapAccessDeserializer::new(Replay {
            head: vec![("apiVersion", api_version.clone()), ("kind", kind.clone())],
            value_next: false,
            rest: map,
        });
        let parsed = parse_kind(&api_version, &kind, rest).ok_or_else(give_up)??;
        Ok(Direct { kind, parsed })
    }
}

/// A map whose first entries were read already: yields them again, then the rest.
struct Replay<A> {
    /// The entries taken, in reverse: the next one is last.
    head: Vec<(&'static str, String)>,
    /// The key of `head`'s last entry was yielded; its value comes next.
    value_next: bool,
    rest: A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Replay<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        match self.head.last() {
            Some((key, _)) => {
                self.value_next = true;
                seed.deserialize(StrDeserializer::new(key)).map(Some)
            }
            None => self.rest.next_key_seed(seed),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        if self.value_next {
            self.value_next = false;
            let (_, value) = self.head.pop().expect("a key was yielded from head");
            return seed.deserialize(StringDeserializer::new(value));
        }
        self.rest.next_value_seed(seed)
    }
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
        DesiredObject::VirtualService(o) => &mut o.metadata,
    };
    if meta.namespace.as_deref().unwrap_or("").is_empty() {
        meta.namespace = Some("default".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_both_ways(text: &str, cluster: &str) -> (Option<String>, String) {
        let path = Path::new("f.yaml");
        let direct = crate::yaml::parse_documents_as::<Direct>(text).ok().map(|docs| {
            let mut fleet = LoadedFleet::default();
            for (i, Direct { kind, parsed }) in docs.into_iter().enumerate() {
                accept(parsed, path, i + 1, &kind, cluster, &mut fleet);
            }
            format!("{fleet:?}")
        });
        let mut general = LoadedFleet::default();
        load_text(path, text, cluster, &mut general);
        (direct, format!("{general:?}"))
    }

    /// Every file of the example fleet is read the direct way, into exactly what the general way
    /// reads from it.
    #[test]
    fn the_direct_way_reads_what_the_general_way_reads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fleet");
        let mut files = 0;
        for sub in fs::read_dir(&root).unwrap() {
            let sub = sub.unwrap().path();
            let name = sub.file_name().unwrap().to_str().unwrap();
            let cluster = if name == HUB_DIR { HUB.to_string() } else { name.to_string() };
            for file in manifest_files(&sub, &mut Vec::new()) {
                let text = fs::read_to_string(&file).unwrap();
                let (direct, general) = read_both_ways(&text, &cluster);
                assert_eq!(direct.as_ref(), Some(&general), "{}", file.display());
                files += 1;
            }
        }
        assert!(files >= 9, "the example fleet has its files ({files})");
    }

    /// A document whose kind comes late, a kind not read here, and a field of the wrong type each
    /// send the file the general way, which still reads everything else in it.
    #[test]
    fn a_surprise_in_a_file_sends_it_the_general_way() {
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\n";
        for odd in [
            "metadata: {name: b, namespace: ns}\napiVersion: v1\nkind: Service\n",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: b}\n",
            "apiVersion: v1\nkind: Service\nmetadata: {name: b, labels: [not, a, map]}\n",
            // Typed parsing would take the number for the string "1"; the general way refuses it.
            "apiVersion: v1\nkind: Service\nmetadata: {name: b, labels: {version: 1}}\n",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b}\n",
        ] {
            let text = format!("{service}---\n{odd}");
            let (direct, general) = read_both_ways(&text, "east");
            assert_eq!(direct, None, "{odd}");
            assert!(general.contains("name: Some(\"a\")"), "{odd}: {general}");
        }
        let (_, late) =
            read_both_ways(&format!("{service}---\nmetadata: {{name: b}}\napiVersion: v1\nkind: Service\n"), "east");
        assert!(late.contains("name: Some(\"b\")"), "{late}");
        let (_, wrong) = read_both_ways(
            &format!("{service}---\napiVersion: v1\nkind: Service\nmetadata: {{name: b, labels: [x]}}\n"),
            "east",
        );
        assert!(wrong.contains("document 2, Service b") && wrong.contains("skipped"), "{wrong}");
        let (_, number) = read_both_ways(
            &format!("{service}---\napiVersion: v1\nkind: Service\nmetadata: {{name: b, labels: {{version: 1}}}}\n"),
            "east",
        );
        assert!(number.contains("document 2, Service b") && number.contains("expected a string"), "{number}");
    }
}
