//! flotilla beside Admiral, on two identical fleets of real API servers (a hub and 3 members
//! each): what each writes for the same inputs, object by object, and how fast.
//!
//! Nothing of Admiral's is in this repository. Give the comparison a binary built from Admiral's
//! public source and that source's directory (for its CRDs):
//!
//! ```sh
//! FLOTILLA_ADMIRAL_BIN=/path/to/admiral FLOTILLA_ADMIRAL_SRC=/path/to/admiral-source \
//!   cargo bench --bench admiral
//! ```
//!
//! `FLOTILLA_BENCH_IDENTITIES` (300) sizes the synthetic fleet; `FLOTILLA_ADMIRAL_EXTRA_ARGS`
//! adds flags to Admiral's. The report is printed and
//! written to `$CARGO_TARGET_DIR/admiral-compare/`. Figures are printed, never asserted.
//!
//! `FLOTILLA_ADMIRAL_SWITCH=1` runs the switch of docs/migrating-from-admiral.md instead, on one
//! fleet (`FLOTILLA_BENCH_IDENTITIES`, here 20 by default): Admiral settles; flotilla in shadow
//! mode reports its plan; Admiral stops; flotilla takes over with `--adopt-from=admiral` and
//! `--import-vips-from`, while a sampler lists every member's ServiceEntries and
//! DestinationRules every 100 ms; then the rollback (flotilla stopped, Admiral started), sampled
//! the same way. Gaps and changed addresses are counted and printed.
//!
//! Admiral listens on 0.0.0.0:8080 and :6900 (fixed in its code), so flotilla uses other ports
//! here. The controllers run one after the other, each alone on the machine.

#[path = "../tests/testenv/mod.rs"]
mod testenv;

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client};
use serde_json::{Value, json};
use testenv::TestCluster;
use testenv::controller::Flotilla;

const MEMBERS: [&str; 3] = ["m0", "m1", "m2"];
const REGIONS: [&str; 3] = ["us-west-2", "us-east-2", "eu-north-1"];
const SYNC: &str = "admiral-sync";
/// Where both controllers read Dependencies in the hub (Admiral reads only one namespace).
const DEPENDENCIES: &str = "admiral";
/// A fleet is converged when what the controller owns has not changed for this long (longer
/// than Admiral's --sync_period, so its periodic pass is inside the window).
const QUIET: Duration = Duration::from_secs(25);
const CHANGES: usize = 30;
const FIELD_MANAGER: &str = "compare-admiral";
/// Admiral's resync period here: its manifests use 20 s (base) and 10 s (demo); the shorter keeps
/// its warm-up from dominating start-up.
const ADMIRAL_SYNC_PERIOD: &str = "10s";

fn env_path(var: &str, what: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: give the path of {what} (built outside this repository; see docs/admiral-compat.md)")
    });
    assert!(path.exists(), "{var}={} does not exist", path.display());
    path
}

// ---------------------------------------------------------------------------------------------
// Inputs: the same documents for both fleets.

/// Where a document goes: the hub, or member `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Place {
    Hub,
    Member(usize),
}

fn resource(kind: &str) -> (ApiResource, bool) {
    let (group, version, plural, namespaced) = match kind {
        "Namespace" => ("", "v1", "namespaces", false),
        "Node" => ("", "v1", "nodes", false),
        "Service" => ("", "v1", "services", true),
        "Secret" => ("", "v1", "secrets", true),
        "Deployment" => ("apps", "v1", "deployments", true),
        "GlobalTrafficPolicy" => ("admiral.io", "v1alpha1", "globaltrafficpolicies", true),
        "OutlierDetection" => ("admiral.io", "v1alpha1", "outlierdetections", true),
        "ClientConnectionConfig" => ("admiral.io", "v1alpha1", "clientconnectionconfigs", true),
        "Dependency" => ("admiral.io", "v1alpha1", "dependencies", true),
        "ServiceEntry" => ("networking.istio.io", "v1", "serviceentries", true),
        "DestinationRule" => ("networking.istio.io", "v1", "destinationrules", true),
        "Sidecar" => ("networking.istio.io", "v1", "sidecars", true),
        "VirtualService" => ("networking.istio.io", "v1", "virtualservices", true),
        "EnvoyFilter" => ("networking.istio.io", "v1alpha3", "envoyfilters", true),
        other => panic!("no resource for kind {other}"),
    };
    (ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural), namespaced)
}

fn api(client: &Client, kind: &str, namespace: Option<&str>) -> Api<DynamicObject> {
    let (ar, namespaced) = resource(kind);
    match namespace {
        Some(ns) if namespaced => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    }
}

/// Server-side apply of any document; a Service's `status` is applied to its subresource too.
async fn apply_doc(client: &Client, doc: &Value) {
    let kind = doc["kind"].as_str().unwrap();
    let name = doc["metadata"]["name"].as_str().unwrap();
    let api = api(client, kind, doc["metadata"]["namespace"].as_str());
    let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &pp, &Patch::Apply(&obj)).await.unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
    if kind == "Service" && !doc["status"].is_null() {
        let status = json!({"apiVersion": "v1", "kind": "Service", "status": doc["status"]});
        api.patch_status(name, &pp, &Patch::Apply(&status)).await.unwrap();
    }
}

fn doc(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap()
}

/// What every member needs whichever fleet it is in: a region (both labels), the east-west gateway (found by
/// Admiral through `app`, by flotilla through `istio`), the sync namespace.
fn member_basics(i: usize) -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{i}"),
            // Admiral reads only the deprecated region label; flotilla prefers the current one.
            "labels": {"topology.kubernetes.io/region": REGIONS[i], "topology.kubernetes.io/zone": format!("{}a", REGIONS[i]),
                "failure-domain.beta.kubernetes.io/region": REGIONS[i]}}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYNC}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "istio-eastwestgateway", "namespace": "istio-system",
                "labels": {"app": "istio-eastwestgateway", "istio": "eastwestgateway"}},
            "spec": {"type": "LoadBalancer", "selector": {"istio": "eastwestgateway"}, "ports": [{"name": "tls", "port": 15443, "targetPort": 15443}]},
            "status": {"loadBalancer": {"ingress": [{"ip": format!("10.1.0.{}", i + 1)}]}}}),
    ]
}

/// The example fleet (examples/fleet): members in name order become m0, m1, m2; the hub's
/// Dependencies move to the namespace Admiral reads.
fn example_fleet() -> Vec<(Place, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fleet");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    let mut out = Vec::new();
    let mut member = 0;
    for dir in dirs {
        let place = if dir.ends_with("_hub") { Place::Hub } else { Place::Member(member) };
        if place != Place::Hub {
            member += 1;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for part in text.split("\n---") {
                let mut d = doc(part);
                if d.is_null() {
                    continue;
                }
                // Nodes and the gateway come from member_basics, the same in both fleets.
                if d["kind"] == "Node" || d["metadata"]["name"] == "istio-eastwestgateway" {
                    continue;
                }
                // Admiral's CRD takes lbType as a number only (flotilla takes the names too).
                if d["kind"] == "GlobalTrafficPolicy" {
                    for p in d["spec"]["policy"].as_array_mut().into_iter().flatten() {
                        if let Some(name) = p["lbType"].as_str() {
                            p["lbType"] = json!(if name.eq_ignore_ascii_case("failover") { 1 } else { 0 });
                        }
                    }
                }
                if d["kind"] == "Dependency" && place == Place::Hub {
                    d["metadata"]["namespace"] = json!(DEPENDENCIES);
                }
                out.push((place, d));
            }
        }
    }
    assert_eq!(member, 3, "the example fleet has three members");
    out
}

fn identity(i: usize) -> String {
    format!("id-{i:04}")
}

fn workload(ns: &str, id: &str) -> [Value; 3] {
    [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": id, "namespace": ns},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": id}},
                "template": {"metadata": {"labels": {"app": id, "identity": id},
                        "annotations": {"admiral.io/env": "stage", "sidecar.istio.io/inject": "true"}},
                    "spec": {"containers": [{"name": "app", "image": "example.com/app:1", "ports": [{"containerPort": 8080}]}]}}}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": id, "namespace": ns},
            "spec": {"selector": {"app": id}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    ]
}

/// Members where identity `i` runs: `i % 3`, and every fifth also the next one.
fn homes(i: usize) -> Vec<usize> {
    if i.is_multiple_of(5) { vec![i % 3, (i + 1) % 3] } else { vec![i % 3] }
}

fn gtp(i: usize, west: i64) -> Value {
    let id = identity(i);
    let failover = |prefix: &str, w: i64| json!({"dnsPrefix": prefix, "lbType": 1, "target": [{"region": REGIONS[0], "weight": w}, {"region": REGIONS[1], "weight": 100 - w}]});
    // Alternately FAILOVER and TOPOLOGY on the default host, every other one with a second host.
    let mut policy = vec![if i.is_multiple_of(20) {
        failover("default", west)
    } else {
        json!({"dnsPrefix": "default", "lbType": 0})
    }];
    if i % 20 == 10 || i == 0 {
        policy.push(failover("west", 100));
    }
    json!({"apiVersion": "admiral.io/v1alpha1", "kind": "GlobalTrafficPolicy",
        "metadata": {"name": format!("{id}-gtp"), "namespace": id, "labels": {"identity": id}, "annotations": {"admiral.io/env": "stage"}},
        "spec": {"policy": policy}})
}

/// The synthetic fleet: `n` identities with Services, Dependencies in the hub (each calls the
/// next three), GTPs (FAILOVER, TOPOLOGY, a second dnsPrefix), OutlierDetections and
/// ClientConnectionConfigs; plus the Dependencies on the `CHANGES` identities created later.
fn synthetic_fleet(n: usize) -> Vec<(Place, Value)> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = identity(i);
        for h in homes(i) {
            out.extend(workload(&id, &id).map(|d| (Place::Member(h), d)));
        }
        let mut destinations: Vec<String> = (1..=3).map(|d| identity((i + d) % n)).collect();
        if i < CHANGES {
            destinations.push(format!("fresh-{i:02}"));
        }
        out.push((
            Place::Hub,
            json!({"apiVersion": "admiral.io/v1alpha1", "kind": "Dependency",
            "metadata": {"name": format!("{id}-deps"), "namespace": DEPENDENCIES},
            "spec": {"source": id, "identityLabel": "identity", "destinations": destinations}}),
        ));
        let home = Place::Member(homes(i)[0]);
        if i.is_multiple_of(10) {
            out.push((home, gtp(i, 50)));
        }
        if i.is_multiple_of(7) {
            out.push((home, json!({"apiVersion": "admiral.io/v1alpha1", "kind": "OutlierDetection",
                "metadata": {"name": format!("{id}-od"), "namespace": id, "labels": {"identity": id}, "annotations": {"admiral.io/env": "stage"}},
                "spec": {"selector": {"identity": id, "env": "stage"},
                    "outlier_config": {"base_ejection_time": 180, "consecutive_gateway_errors": 10, "interval": 28}}})));
        }
        if i.is_multiple_of(11) {
            out.push((home, json!({"apiVersion": "admiral.io/v1alpha1", "kind": "ClientConnectionConfig",
                "metadata": {"name": format!("{id}-ccc"), "namespace": id, "labels": {"identity": id}, "annotations": {"admiral.io/env": "stage"}},
                "spec": {"connectionPool": {"http": {"http2MaxRequests": 100, "maxRequestsPerConnection": 100, "idleTimeout": "1s"}}}})));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A fleet and the controller on it.

struct Fleet {
    label: &'static str,
    hub: TestCluster,
    members: Vec<TestCluster>,
    hub_client: Client,
    clients: Vec<Client>,
}

impl Fleet {
    async fn start(label: &'static str) -> Fleet {
        let names: Vec<String> =
            std::iter::once(format!("{label}-hub")).chain(MEMBERS.iter().map(|m| format!("{label}-{m}"))).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut clusters = testenv::start_clusters(&refs).await;
        let members = clusters.split_off(1);
        let hub = clusters.pop().unwrap();
        let hub_client = hub.client().await;
        let clients = futures::future::join_all(members.iter().map(|m| m.client())).await;
        Fleet { label, hub, members, hub_client, clients }
    }

    fn client(&self, place: Place) -> &Client {
        match place {
            Place::Hub => &self.hub_client,
            Place::Member(i) => &self.clients[i],
        }
    }

    async fn apply_all(&self, docs: &[(Place, Value)]) {
        // Namespaces first; then everything else, a member at a time in parallel.
        let mut namespaces: BTreeSet<(Place, String)> = BTreeSet::new();
        for (place, d) in docs {
            if let Some(ns) = d["metadata"]["namespace"].as_str() {
                namespaces.insert((*place, ns.to_string()));
            }
        }
        for (place, ns) in &namespaces {
            apply_doc(self.client(*place), &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .await;
        }
        let places: BTreeSet<Place> = docs.iter().map(|(p, _)| *p).collect();
        futures::future::join_all(places.iter().map(|place| async move {
            for (_, d) in docs.iter().filter(|(p, _)| p == place) {
                apply_doc(self.client(*place), d).await;
            }
        }))
        .await;
    }

    /// Each CRD of Admiral's source, replacing flotilla's of the same name (the fleet Admiral runs
    /// on has Admiral's own CRDs, as its install does). Sent as YAML: the API server's parser
    /// takes the multi-line quoted scalars of these files, which ours refuses.
    async fn install_admiral_crds(&self, source: &Path) {
        let files = [
            "install/admiral/base/crds.yaml",
            "install/admiralremote/base/crds.yaml",
            "admiral/crd/clientconnectionconfig.yaml",
        ];
        let mut crds = Vec::new();
        for f in files {
            let text =
                std::fs::read_to_string(source.join(f)).unwrap_or_else(|e| panic!("{}: {e}", source.join(f).display()));
            for part in text.split("\n---") {
                if !part.contains("kind: CustomResourceDefinition") {
                    continue;
                }
                // `metadata:` at the top level, then its `  name:`.
                let meta = part.find("\nmetadata:").unwrap_or_else(|| panic!("{f}: a CRD without metadata"));
                let name = part[meta..].lines().find_map(|l| l.strip_prefix("  name:")).unwrap().trim().to_string();
                crds.push((name, part.to_string()));
            }
        }
        for client in std::iter::once(&self.hub_client).chain(&self.clients) {
            for (name, yaml) in &crds {
                let url = format!(
                    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}?fieldManager={FIELD_MANAGER}&force=true"
                );
                let req = http::Request::patch(url)
                    .header("Content-Type", "application/apply-patch+yaml")
                    .body(yaml.clone().into_bytes())
                    .unwrap();
                client.request_text(req).await.unwrap_or_else(|e| panic!("applying Admiral's CRD {name}: {e}"));
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    /// What both controllers need, then `inputs` and the registration Secret.
    async fn prepare(&self, inputs: &[(Place, Value)]) {
        for i in 0..3 {
            for d in member_basics(i) {
                apply_doc(&self.clients[i], &d).await;
            }
        }
        for ns in ["admiral", SYNC, "flotilla"] {
            apply_doc(&self.hub_client, &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .await;
        }
        let t = Instant::now();
        self.apply_all(inputs).await;
        apply_doc(&self.hub_client, &self.registration("admiral")).await;
        println!("{} documents applied to fleet {} in {:.1?}", inputs.len(), self.label, t.elapsed());
    }

    /// The members' kubeconfigs, one data key per cluster id (Admiral's format).
    fn registration(&self, namespace: &str) -> Value {
        let data: serde_json::Map<String, Value> =
            MEMBERS.iter().zip(&self.members).map(|(id, m)| (id.to_string(), json!(m.admin_kubeconfig()))).collect();
        json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "members", "namespace": namespace, "labels": {"admiral/sync": "true"}},
            "stringData": data})
    }
}

enum Controller {
    Admiral { binary: PathBuf, args: Vec<String>, log_dir: PathBuf, child: Option<Child> },
    Flotilla(Box<Flotilla>),
}

impl Controller {
    fn admiral(binary: PathBuf, fleet: &Fleet) -> Controller {
        let log_dir = testenv::scratch_dir("admiral");
        let kubeconfig = log_dir.join("hub.kubeconfig");
        std::fs::write(&kubeconfig, fleet.hub.admin_kubeconfig()).unwrap();
        // Its install manifests' flags (install/admiral/base/deployments.yaml), with: a short
        // sync period; routing policies, dynamic config, Argo and client discovery off (not
        // compared, and the routing policy CRD in its repo does not load); client connection
        // configs on (compared).
        let args = [
            "--kube_config",
            kubeconfig.to_str().unwrap(),
            "--secret_namespace",
            "admiral",
            "--dependency_namespace",
            DEPENDENCIES,
            "--sync_namespace",
            SYNC,
            "--sync_period",
            ADMIRAL_SYNC_PERIOD,
            "--gateway_app",
            "istio-eastwestgateway",
            "--exportto_identity_list",
            "*",
            "--enable_sw_aware_ns_caches=true",
            "--enable_dependency_processing=true",
            "--enable_client_connection_config_processing=true",
            "--enable_routing_policy=false",
            "--enable_dynamic_config=false",
            "--argo_rollouts=false",
            "--enable_client_discovery=false",
            // Off by default in Admiral; on here because OutlierDetections are compared.
            "--enable_outlierdetection=true",
        ]
        .map(String::from)
        .to_vec();
        // More flags for a run, e.g. "--deployment_or_rollout_worker_concurrency=1".
        let mut args = args;
        args.extend(
            std::env::var("FLOTILLA_ADMIRAL_EXTRA_ARGS").unwrap_or_default().split_whitespace().map(String::from),
        );
        println!("admiral flags: {}", args[2..].join(" "));
        let mut c = Controller::Admiral { binary, args, log_dir, child: None };
        c.start();
        c
    }

    fn flotilla(fleet: &Fleet) -> Controller {
        Controller::Flotilla(Box::new(beside_admiral(fleet, "beside-admiral", &[])))
    }

    fn start(&mut self) {
        match self {
            Controller::Admiral { binary, args, log_dir, child } => {
                let mut cmd = Command::new(binary);
                cmd.args(args.iter());
                *child = Some(testenv::spawn(cmd, &log_dir.join(format!("admiral-{}.log", testenv::now_millis()))));
            }
            Controller::Flotilla(f) => f.restart(),
        }
    }

    fn stop(&mut self) {
        match self {
            Controller::Admiral { child, .. } => {
                if let Some(mut c) = child.take() {
                    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                    let _ = c.wait();
                }
            }
            Controller::Flotilla(f) => f.terminate(),
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Controller::Admiral { child, .. } => child.as_ref().unwrap().id(),
            Controller::Flotilla(f) => f.pid().unwrap(),
        }
    }

    /// (CPU seconds, peak RSS in MiB) of the running process so far.
    fn usage(&self) -> (f64, u64) {
        (testenv::cpu_seconds_of(self.pid()), testenv::peak_rss_of(self.pid()) / 1024)
    }
}

/// flotilla on Admiral's fleet: its Secrets, on ports Admiral does not hold, with `extra` flags.
fn beside_admiral(fleet: &Fleet, name: &str, extra: &[&str]) -> Flotilla {
    let mut args =
        vec!["--log-level", "warn", "--secret-namespace", "admiral", "--cluster-secret-selector", "admiral/sync=true"];
    args.extend(extra);
    Flotilla::start_on_ports(&fleet.hub.admin_kubeconfig(), name, &args, [18080, 18443])
}

// ---------------------------------------------------------------------------------------------
// What a controller wrote, normalised.

const OUTPUT_KINDS: [&str; 5] = ["ServiceEntry", "DestinationRule", "Sidecar", "VirtualService", "EnvoyFilter"];

fn is_ours(o: &DynamicObject, label: &str) -> bool {
    match label {
        "admiral" => o
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.get("app.kubernetes.io/created-by").is_some_and(|v| v == "admiral")),
        _ => o
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.get("app.kubernetes.io/managed-by").is_some_and(|v| v == "flotilla")),
    }
}

/// Lowercases protocols and sorts lists whose order carries no meaning. VIP values are kept:
/// each controller allocates its own, and the report shows every address that differs.
fn normalise(kind: &str, spec: &Value) -> Value {
    let mut s = spec.clone();
    if kind == "ServiceEntry" {
        for p in s.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
            if let Some(proto) = p["protocol"].as_str() {
                p["protocol"] = json!(proto.to_lowercase());
            }
        }
        if let Some(e) = s.get_mut("endpoints").and_then(Value::as_array_mut) {
            e.sort_by_key(|v| v.to_string());
        }
    }
    for key in ["exportTo", "hosts"] {
        if let Some(list) = s.get_mut(key).and_then(Value::as_array_mut) {
            list.sort_by_key(|v| v.to_string());
        }
    }
    s
}

type Dump = BTreeMap<(String, String, String, String), Value>;

/// Every object of `OUTPUT_KINDS` the controller owns in every member: (member, kind, namespace,
/// name) → normalised spec.
async fn dump(fleet: &Fleet, label: &str) -> Dump {
    let mut out = Dump::new();
    for (id, client) in MEMBERS.iter().zip(&fleet.clients) {
        for kind in OUTPUT_KINDS {
            let list = api(client, kind, None).list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
            for o in list.into_iter().filter(|o| is_ours(o, label)) {
                let key = (
                    id.to_string(),
                    kind.to_string(),
                    o.metadata.namespace.clone().unwrap_or_default(),
                    o.metadata.name.clone().unwrap_or_default(),
                );
                out.insert(key, normalise(kind, &o.data["spec"]));
            }
        }
    }
    out
}

/// Paths where two values differ, with list indices and object keys kept: `ports[0].protocol`.
fn differing_paths(a: &Value, b: &Value, path: &str, out: &mut Vec<(String, Value, Value)>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                differing_paths(x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), &p, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                differing_paths(u, v, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push((path.to_string(), a.clone(), b.clone())),
        _ => {}
    }
}

/// `ports[0].protocol` → `ports[].protocol`: differences grouped by where, not which element.
fn pattern(path: &str) -> String {
    let mut out = String::new();
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push_str("[]");
            }
            ']' => in_index = false,
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// The object comparison as Markdown: objects on one side only, grouped by kind and namespace
/// pattern; differing fields of objects on both, grouped by kind and field.
fn compare(title: &str, admiral: &Dump, flotilla: &Dump) -> String {
    let mut only: BTreeMap<(String, String, &str), Vec<String>> = BTreeMap::new();
    let mut fields: BTreeMap<(String, String), (usize, String, String, String)> = BTreeMap::new();
    let mut same = 0;
    let keys: BTreeSet<_> = admiral.keys().chain(flotilla.keys()).collect();
    for key in &keys {
        let (member, kind, ns, name) = key;
        match (admiral.get(*key), flotilla.get(*key)) {
            (Some(_), None) | (None, Some(_)) => {
                let side = if admiral.contains_key(*key) { "Admiral only" } else { "flotilla only" };
                let where_ = if ns == SYNC {
                    SYNC.to_string()
                } else if ns == "istio-system" {
                    ns.clone()
                } else {
                    "workload namespaces".into()
                };
                only.entry((kind.clone(), where_, side)).or_default().push(format!("{member}/{name}"));
            }
            (Some(a), Some(f)) => {
                let mut diffs = Vec::new();
                differing_paths(a, f, "", &mut diffs);
                if diffs.is_empty() {
                    same += 1;
                }
                for (path, av, fv) in diffs {
                    let e = fields.entry((kind.clone(), pattern(&path))).or_insert((
                        0,
                        String::new(),
                        String::new(),
                        String::new(),
                    ));
                    if e.0 == 0 {
                        (e.1, e.2, e.3) = (format!("{member}/{name}"), short(&av), short(&fv));
                    }
                    e.0 += 1;
                }
            }
            (None, None) => unreachable!(),
        }
    }
    let mut md = format!(
        "### {title}\n\n{} objects from Admiral, {} from flotilla; {} on both sides, {same} of them identical after normalising.\n\n",
        admiral.len(),
        flotilla.len(),
        keys.iter().filter(|k| admiral.contains_key(**k) && flotilla.contains_key(**k)).count()
    );
    md.push_str("| objects | kind | where | count | e.g. |\n|---|---|---|---|---|\n");
    for ((kind, where_, side), names) in &only {
        md.push_str(&format!("| {side} | {kind} | {where_} | {} | `{}` |\n", names.len(), names[0]));
    }
    md.push_str(
        "\n| kind | field | objects differing | e.g. object | Admiral | flotilla |\n|---|---|---|---|---|---|\n",
    );
    for ((kind, field), (n, example, a, f)) in &fields {
        md.push_str(&format!("| {kind} | `{field}` | {n} | `{example}` | `{a}` | `{f}` |\n"));
    }
    md
}

fn short(v: &Value) -> String {
    let s = v.to_string().replace('|', "\\|");
    if s.len() > 90 { format!("{}…", &s[..s.char_indices().nth(89).map(|(i, _)| i).unwrap_or(s.len())]) } else { s }
}

// ---------------------------------------------------------------------------------------------
// Timing.

/// A digest of what the controller owns in every member (names and resourceVersions).
async fn owned_digest(fleet: &Fleet, label: &str) -> (usize, u64) {
    let mut text = String::new();
    let mut n = 0;
    for client in &fleet.clients {
        for kind in OUTPUT_KINDS {
            for o in api(client, kind, None).list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
                if is_ours(&o, label) {
                    n += 1;
                    text.push_str(&format!(
                        "{kind}/{:?}/{:?}/{:?};",
                        o.metadata.namespace, o.metadata.name, o.metadata.resource_version
                    ));
                }
            }
        }
    }
    (n, flotilla::meta::fnv1a(text.as_bytes()))
}

/// Waits until nothing the controller owns has changed for `QUIET`; returns when the last change
/// was seen, measured from `since`, and the number of objects.
async fn settle(fleet: &Fleet, label: &str, since: Instant) -> (Duration, usize) {
    let mut last = owned_digest(fleet, label).await;
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = owned_digest(fleet, label).await;
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= QUIET && last.0 > 0 {
            return (last_change.duration_since(since), last.0);
        }
        assert!(since.elapsed() < Duration::from_secs(2700), "{label}: not settled in 45 min");
    }
}

/// Write requests (POST, PUT, PATCH, DELETE) the members' API servers served for Istio's kinds,
/// and for status subresources anywhere (from their own request counters).
async fn write_requests(fleet: &Fleet) -> (u64, u64) {
    let (mut istio, mut status) = (0.0, 0.0);
    for client in std::iter::once(&fleet.hub_client).chain(&fleet.clients) {
        let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
        let text = client.request_text(req).await.unwrap();
        for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
            let write = ["verb=\"POST\"", "verb=\"PUT\"", "verb=\"PATCH\"", "verb=\"DELETE\"", "verb=\"APPLY\""]
                .iter()
                .any(|v| line.contains(v));
            let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            if write && line.contains("group=\"networking.istio.io\"") {
                istio += value;
            } else if write && line.contains("subresource=\"status\"") && line.contains("group=\"admiral.io\"") {
                status += value;
            }
        }
    }
    (istio as u64, status as u64)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn dr_weight(client: &Client, host: &str) -> Option<i64> {
    let dr = api(client, "DestinationRule", Some(SYNC)).get_opt(&format!("{host}-default-dr")).await.ok()??;
    let distribute = &dr.data["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"]["distribute"];
    distribute.as_array()?.iter().find_map(|d| d["to"][REGIONS[0]].as_i64())
}

async fn se_exists(client: &Client, host: &str) -> bool {
    api(client, "ServiceEntry", Some(SYNC)).get_opt(&format!("{host}-se")).await.ok().flatten().is_some()
}

#[derive(Default)]
struct Figures {
    start_to_converged: Duration,
    objects: usize,
    gtp: Vec<Duration>,
    deployment: Vec<Duration>,
    cpu_seconds: f64,
    peak_mib: u64,
    writes: (u64, u64),
    restart_writes: (u64, u64),
    dump_example: Dump,
    dump_all: Dump,
}

async fn measure(
    fleet: &Fleet,
    label: &'static str,
    mut controller: impl FnMut() -> Controller,
    identities: usize,
) -> Figures {
    let mut f = Figures::default();
    let t = Instant::now();
    let before = write_requests(fleet).await;
    let mut c = controller();
    (f.start_to_converged, f.objects) = settle(fleet, label, t).await;
    println!("{label}: start → settled {:.1?} ({} objects)", f.start_to_converged, f.objects);
    f.dump_all = dump(fleet, label).await;

    // GTP weight changes on id-0000 (FAILOVER): until every member holding its DR shows them.
    let host = format!("stage.{}.global", identity(0));
    let mut targets = Vec::new();
    for (i, client) in fleet.clients.iter().enumerate() {
        if dr_weight(client, &host).await.is_some() {
            targets.push(i);
        }
    }
    for round in 0..CHANGES {
        let west = if round.is_multiple_of(2) { 70 } else { 30 };
        let t = Instant::now();
        apply_doc(&fleet.clients[homes(0)[0]], &gtp(0, west)).await;
        loop {
            let mut done = true;
            for i in &targets {
                done &= dr_weight(&fleet.clients[*i], &host).await == Some(west);
            }
            if done {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(600), "{label}: GTP change {round} not written in 10 min");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f.gtp.push(t.elapsed());
    }
    println!("{label}: {CHANGES} GTP changes written in {} members", targets.len());

    // New Deployments whose clients already declared them.
    for k in 0..CHANGES {
        let name = format!("fresh-{k:02}");
        let home = (k + 1) % 3;
        let mut members: BTreeSet<usize> = homes(k).into_iter().collect();
        members.insert(home);
        let t = Instant::now();
        for d in workload(&name, &name) {
            apply_doc(&fleet.clients[home], &d).await;
        }
        let host = format!("stage.{name}.global");
        loop {
            let mut done = true;
            for i in &members {
                done &= se_exists(&fleet.clients[*i], &host).await;
            }
            if done {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(600), "{label}: {name}'s ServiceEntry not written in 10 min");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f.deployment.push(t.elapsed());
    }
    println!("{label}: {CHANGES} new Deployments' ServiceEntries written");
    settle(fleet, label, Instant::now()).await;
    (f.cpu_seconds, f.peak_mib) = c.usage();
    let after = write_requests(fleet).await;
    f.writes = (after.0 - before.0, after.1 - before.1);

    // A restart with nothing changed: writes until it has settled again.
    c.stop();
    let before = write_requests(fleet).await;
    c.start();
    settle(fleet, label, Instant::now()).await;
    let after = write_requests(fleet).await;
    f.restart_writes = (after.0 - before.0, after.1 - before.1);
    f.dump_example = f
        .dump_all
        .iter()
        .filter(|(k, _)| !k.3.contains("id-") && !k.3.contains("fresh-"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    c.stop();
    let _ = identities;
    f
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let admiral_bin = env_path("FLOTILLA_ADMIRAL_BIN", "an Admiral binary");
    let admiral_src = env_path("FLOTILLA_ADMIRAL_SRC", "Admiral's source (for its CRDs)");
    let switching = std::env::var_os("FLOTILLA_ADMIRAL_SWITCH").is_some();
    let identities: usize = std::env::var("FLOTILLA_BENCH_IDENTITIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if switching { 20 } else { 300 });
    let version = Command::new(&admiral_bin).arg("--help").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(version, "{} does not run", admiral_bin.display());
    if switching {
        return switch::run(admiral_bin, &admiral_src, identities).await;
    }

    let t = Instant::now();
    let (a, f) = futures::future::join(Fleet::start("a"), Fleet::start("f")).await;
    println!("compare: 8 API servers up in {:.1?}", t.elapsed());
    a.install_admiral_crds(&admiral_src).await;
    let mut inputs = example_fleet();
    inputs.extend(synthetic_fleet(identities));
    for fleet in [&a, &f] {
        fleet.prepare(&inputs).await;
    }

    let counters = support::CpuCounters::now();
    let admiral = measure(&a, "admiral", || Controller::admiral(admiral_bin.clone(), &a), identities).await;
    let flotilla = measure(&f, "flotilla", || Controller::flotilla(&f), identities).await;
    let steal = counters.steal_percent();

    let mut report = format!(
        "## flotilla vs Admiral ({identities} identities + the example fleet, hub + 3 members each)\n\nAdmiral binary: `{}`; CPU stolen during the run: {steal:.0}%.\n\n",
        admiral_bin.display()
    );
    let row = |what: &str, a: String, f: String, ratio: String| format!("| {what} | {a} | {f} | {ratio} |\n");
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let ratio = |fl: f64, ad: f64| if ad > 0.0 { format!("{:.2}", fl / ad) } else { "–".into() };
    let sorted = |v: &Vec<Duration>| {
        let mut v = v.clone();
        v.sort();
        v
    };
    let (ag, fg, ad, fd) =
        (sorted(&admiral.gtp), sorted(&flotilla.gtp), sorted(&admiral.deployment), sorted(&flotilla.deployment));
    report.push_str("| measure | Admiral | flotilla | flotilla / Admiral |\n|---|---|---|---|\n");
    report.push_str(&row(
        "start → settled (last write)",
        secs(admiral.start_to_converged),
        secs(flotilla.start_to_converged),
        ratio(flotilla.start_to_converged.as_secs_f64(), admiral.start_to_converged.as_secs_f64()),
    ));
    report.push_str(&row(
        "objects owned in the members",
        admiral.objects.to_string(),
        flotilla.objects.to_string(),
        ratio(flotilla.objects as f64, admiral.objects as f64),
    ));
    for (what, a, f) in
        [("GTP change → DR in every member", &ag, &fg), ("new Deployment → SE in every client member", &ad, &fd)]
    {
        for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
            let (x, y) = (percentile(a, p), percentile(f, p));
            report.push_str(&row(
                &format!("{what}, {name} of {CHANGES}"),
                secs(x),
                secs(y),
                ratio(y.as_secs_f64(), x.as_secs_f64()),
            ));
        }
    }
    report.push_str(&row(
        "CPU seconds (start to the end of the changes)",
        format!("{:.1}", admiral.cpu_seconds),
        format!("{:.1}", flotilla.cpu_seconds),
        ratio(flotilla.cpu_seconds, admiral.cpu_seconds),
    ));
    report.push_str(&row(
        "peak RSS",
        format!("{} MiB", admiral.peak_mib),
        format!("{} MiB", flotilla.peak_mib),
        ratio(flotilla.peak_mib as f64, admiral.peak_mib as f64),
    ));
    report.push_str(&row(
        "Istio write requests (same span)",
        admiral.writes.0.to_string(),
        flotilla.writes.0.to_string(),
        ratio(flotilla.writes.0 as f64, admiral.writes.0 as f64),
    ));
    report.push_str(&row(
        "status write requests (same span)",
        admiral.writes.1.to_string(),
        flotilla.writes.1.to_string(),
        "–".into(),
    ));
    report.push_str(&row(
        "Istio writes of a restart with nothing changed",
        admiral.restart_writes.0.to_string(),
        flotilla.restart_writes.0.to_string(),
        "–".into(),
    ));
    report.push('\n');
    report.push_str(&compare("The example fleet", &admiral.dump_example, &flotilla.dump_example));
    report.push('\n');
    report.push_str(&compare(
        "Everything (example + synthetic, after the changes' first settle)",
        &admiral.dump_all,
        &flotilla.dump_all,
    ));
    println!("\n{report}");
    let out =
        PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())).join("admiral-compare");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("report.md"), &report).unwrap();
    for (name, d) in [("admiral.json", &admiral.dump_all), ("flotilla.json", &flotilla.dump_all)] {
        let as_list: Vec<Value> = d
            .iter()
            .map(|((m, k, ns, n), v)| json!({"member": m, "kind": k, "namespace": ns, "name": n, "spec": v}))
            .collect();
        std::fs::write(out.join(name), serde_json::to_string_pretty(&as_list).unwrap()).unwrap();
    }
    println!("compare: report in {}", out.display());
}

/// The switch from Admiral to flotilla, and back (see the module's documentation).
mod switch {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    const ADOPT: [&str; 4] = ["--adopt-from", "admiral", "--import-vips-from", "admiral-sync/se-address-configmap"];

    /// (member, kind, name) → (uid, addresses) of the ServiceEntries and DestinationRules in the
    /// sync namespaces.
    type Held = BTreeMap<(usize, &'static str, String), (String, Value)>;

    /// What the members hold now (only Admiral's objects, with `admirals_only`); a member that
    /// does not answer holds nothing.
    async fn held(clients: &[Client], admirals_only: bool) -> Held {
        let mut out = Held::new();
        for (i, client) in clients.iter().enumerate() {
            for kind in ["ServiceEntry", "DestinationRule"] {
                let Ok(listed) = api(client, kind, Some(SYNC)).list(&ListParams::default()).await else { continue };
                for o in listed.items.into_iter().filter(|o| !admirals_only || is_ours(o, "admiral")) {
                    let uid = o.metadata.uid.clone().unwrap_or_default();
                    let key = (i, kind, o.metadata.name.clone().unwrap_or_default());
                    out.insert(key, (uid, o.data["spec"]["addresses"].clone()));
                }
            }
        }
        out
    }

    /// What the sampler saw: rounds, and reads that missed an object of `expected` or found it
    /// with another address or uid.
    #[derive(Debug, Default)]
    struct Seen {
        rounds: usize,
        missing: BTreeMap<String, usize>,
        address_changed: BTreeSet<String>,
        recreated: BTreeSet<String>,
    }

    fn sample(fleet: &Fleet, expected: Held, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Seen> {
        let clients = fleet.clients.clone();
        tokio::spawn(async move {
            let mut seen = Seen::default();
            while !stop.load(Ordering::Relaxed) {
                let started = tokio::time::Instant::now();
                let now = held(&clients, false).await;
                for (key, (uid, addresses)) in &expected {
                    let name = format!("m{}/{}/{}", key.0, key.1, key.2);
                    match now.get(key) {
                        None => *seen.missing.entry(name).or_default() += 1,
                        Some((u, a)) => {
                            if u != uid {
                                seen.recreated.insert(name.clone());
                            }
                            if a != addresses {
                                seen.address_changed.insert(name);
                            }
                        }
                    }
                }
                seen.rounds += 1;
                tokio::time::sleep_until(started + Duration::from_millis(100)).await;
            }
            seen
        })
    }

    fn report(what: &str, seen: &Seen, expected: usize) {
        println!(
            "switch: {what}: {expected} objects sampled over {} rounds of 100 ms; reads that missed one: {} ({} objects); addresses changed: {}; objects deleted and created again: {}",
            seen.rounds,
            seen.missing.values().sum::<usize>(),
            seen.missing.len(),
            seen.address_changed.len(),
            seen.recreated.len(),
        );
        for (name, n) in seen.missing.iter().take(10) {
            println!("switch:   missing {n}×: {name}");
        }
        for name in seen.address_changed.iter().chain(&seen.recreated).take(10) {
            println!("switch:   changed: {name}");
        }
    }

    async fn writes_by_verb(flotilla: &Flotilla) -> BTreeMap<String, f64> {
        let (_, body) = flotilla.get("/metrics").await;
        let mut out = BTreeMap::new();
        for line in body.lines().filter(|l| l.starts_with("flotilla_api_writes_total{")) {
            let verb = line.split("verb=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
            let kind = line.split("kind=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
            let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            *out.entry(format!("{verb} {kind}")).or_default() += value;
        }
        out
    }

    pub async fn run(admiral_bin: PathBuf, admiral_src: &Path, identities: usize) {
        let fleet = Fleet::start("s").await;
        fleet.install_admiral_crds(admiral_src).await;
        fleet.prepare(&synthetic_fleet(identities)).await;

        // 1. Admiral runs the fleet.
        let t = Instant::now();
        let mut admiral = Controller::admiral(admiral_bin, &fleet);
        let (settled, objects) = settle(&fleet, "admiral", t).await;
        let before = held(&fleet.clients, true).await;
        let hosts: BTreeSet<&String> = before.keys().filter(|k| k.1 == "ServiceEntry").map(|k| &k.2).collect();
        println!(
            "switch: Admiral settled in {:.1?}: {objects} objects, {} ServiceEntries and DestinationRules in the sync namespaces ({} hosts)",
            settled,
            before.len(),
            hosts.len()
        );

        // 2. flotilla in shadow mode beside it.
        let mut args = vec!["--dry-run"];
        args.extend(ADOPT);
        let shadow = beside_admiral(&fleet, "shadow", &args);
        shadow.wait_ready(Duration::from_secs(300)).await;
        for id in MEMBERS {
            let t = Instant::now();
            let plan = loop {
                let (code, body) = shadow.get(&format!("/debug/clusters/{id}/plan")).await;
                if code == 200 {
                    break serde_json::from_str::<Value>(&body).unwrap();
                }
                assert!(t.elapsed() < Duration::from_secs(300), "no plan for {id}: {body}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let count = |action: &str| plan["plan"][action].as_array().map_or(0, Vec::len);
            println!(
                "switch: shadow plan for {id}: adopt {}, create {}, update {}, prune {}, conflicts {}, Admiral's left in place {}",
                count("adopt"),
                count("create"),
                count("update"),
                count("prune"),
                count("conflicts"),
                count("admiralLeftovers")
            );
            for key in ["conflicts", "create"] {
                let first: Vec<&str> =
                    plan["plan"][key].as_array().into_iter().flatten().filter_map(Value::as_str).take(5).collect();
                if !first.is_empty() {
                    println!("switch:   {key}, first: {first:?}");
                }
            }
        }
        let shadow_writes = shadow.metric("flotilla_api_writes_total").await.abs(); // (no samples: -0)
        println!("switch: write requests by the shadow: {shadow_writes}");
        drop(shadow);

        // 3. Admiral stops; 4. flotilla takes over, sampled.
        admiral.stop();
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample(&fleet, before.clone(), stop.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = Instant::now();
        let flotilla = beside_admiral(&fleet, "takeover", &ADOPT);
        flotilla.wait_ready(Duration::from_secs(300)).await;
        loop {
            let view = flotilla.json("/debug/clusters").await;
            if view["converged"] == true {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(600), "flotilla did not converge: {view}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let converged = t.elapsed();
        let now = held(&fleet.clients, false).await;
        let still_there = before.keys().filter(|k| now.contains_key(*k)).count();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        let seen = sampler.await.unwrap();
        println!("switch: flotilla converged {:.1?} after its start", converged);
        report("cutover", &seen, before.len());
        println!("switch: Admiral's objects still there after the cutover: {still_there} of {}", before.len());
        println!("switch: flotilla's write requests by verb and kind: {:?}", writes_by_verb(&flotilla).await);
        let view = flotilla.json("/debug/clusters").await;
        for id in MEMBERS {
            let left = view["clusters"][id]["admiralLeftovers"].as_array().map_or(0, Vec::len);
            println!("switch: {id}: Admiral's objects left in place: {left}");
        }

        // 5. The rollback: flotilla stops, Admiral starts again, sampled for three of its periods
        // after its warm-up.
        let after = held(&fleet.clients, false).await;
        let expected: Held =
            after.iter().filter(|(k, _)| before.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        drop(flotilla);
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample(&fleet, expected.clone(), stop.clone());
        admiral.start();
        tokio::time::sleep(Duration::from_secs(60)).await;
        stop.store(true, Ordering::Relaxed);
        let seen = sampler.await.unwrap();
        report("rollback (60 s of Admiral)", &seen, expected.len());
        admiral.stop();
    }
}
