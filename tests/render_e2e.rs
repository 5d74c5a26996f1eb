//! What `flotilla render` prints is accepted by real API servers with Istio's CRDs (their
//! structural schemas and CEL rules are Istio's validation), and reads back unchanged, so the
//! planner never sees a difference that is not there.

mod testenv;

use std::collections::BTreeSet;
use std::path::Path;

use flotilla::compute::DesiredObject;
use flotilla::compute::plan::{ObservedObject, plan_cluster};
use flotilla::istio::{DestinationRule, ServiceEntry, Sidecar, VirtualService};
use flotilla::meta::DEFAULT_INSTANCE;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use testenv::builders::{apply, namespace};
use testenv::start_clusters;

async fn apply_and_read_back(client: &Client, obj: &DesiredObject) -> DesiredObject {
    let key = obj.key();
    let pp = PatchParams::apply(flotilla::meta::MANAGER);
    let rejected = |e: kube::Error| -> ! { panic!("{key} rejected: {e}") };
    match obj {
        DesiredObject::ServiceEntry(o) => {
            let api: Api<ServiceEntry> = Api::namespaced(client.clone(), key.namespace);
            api.patch(&key.name, &pp, &Patch::Apply(o)).await.unwrap_or_else(|e| rejected(e));
            DesiredObject::ServiceEntry(api.get(&key.name).await.unwrap())
        }
        DesiredObject::DestinationRule(o) => {
            let api: Api<DestinationRule> = Api::namespaced(client.clone(), key.namespace);
            api.patch(&key.name, &pp, &Patch::Apply(o)).await.unwrap_or_else(|e| rejected(e));
            DesiredObject::DestinationRule(api.get(&key.name).await.unwrap())
        }
        DesiredObject::Sidecar(o) => {
            let api: Api<Sidecar> = Api::namespaced(client.clone(), key.namespace);
            api.patch(&key.name, &pp, &Patch::Apply(o)).await.unwrap_or_else(|e| rejected(e));
            DesiredObject::Sidecar(api.get(&key.name).await.unwrap())
        }
        DesiredObject::VirtualService(o) => {
            let api: Api<VirtualService> = Api::namespaced(client.clone(), key.namespace);
            api.patch(&key.name, &pp, &Patch::Apply(o)).await.unwrap_or_else(|e| rejected(e));
            DesiredObject::VirtualService(api.get(&key.name).await.unwrap())
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rendered_fleets_are_accepted_by_istio_crds_and_read_back_unchanged() {
    let clusters = start_clusters(&["m0", "m1", "m2"]).await;
    let clients: Vec<Client> = futures::future::join_all(clusters.iter().map(|c| c.client())).await;

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut fleets = vec![root.join("examples/fleet")];
    let mut fixtures: Vec<_> =
        std::fs::read_dir(root.join("tests/fixtures")).unwrap().map(|e| e.unwrap().path().join("fleet")).collect();
    fixtures.sort();
    fleets.extend(fixtures);

    let mut applied = 0;
    for fleet in &fleets {
        let args = std::fs::read_to_string(fleet.parent().unwrap().join("args")).unwrap_or_default();
        let mut argv = vec!["flotilla", "render", "fleet"];
        argv.extend(args.split_whitespace());
        let cli = <flotilla::cli::Cli as clap::Parser>::parse_from(argv);
        let flotilla::cli::Command::Render(render_args) = cli.command else { unreachable!() };
        let settings = render_args.engine.settings().unwrap();
        let rendered = flotilla::render::render(flotilla::fleet_dir::load(fleet).unwrap(), &settings, "flotilla-vips");
        assert!(rendered.clusters.len() <= clients.len(), "{}: more members than test clusters", fleet.display());

        // Members in id order map onto the test clusters.
        for ((id, objects), client) in rendered.clusters.iter().zip(&clients) {
            let namespaces: BTreeSet<String> = objects.iter().map(|o| o.key.namespace.to_string()).collect();
            for ns in &namespaces {
                apply(client, &namespace(ns)).await;
            }
            let mut read_back = std::collections::BTreeMap::new();
            for obj in objects {
                let stored = apply_and_read_back(client, &obj.object()).await;
                read_back.insert(obj.key.clone(), ObservedObject::new(&stored));
                applied += 1;
            }
            let plan = plan_cluster(objects, &read_back, DEFAULT_INSTANCE);
            assert!(
                plan.apply.is_empty(),
                "{} member {id}: stored objects differ from what was applied: {:?}",
                fleet.display(),
                plan.apply.iter().map(|o| o.key.to_string()).collect::<Vec<_>>()
            );
        }
    }
    println!("{applied} rendered objects from {} fleets accepted and read back unchanged", fleets.len());
    assert!(applied > 50, "the fleets render a meaningful number of objects ({applied})");
}

/// A synthetic fleet is valid Kubernetes: every object `flotilla synth` writes is accepted by a
/// real API server (server-side dry run), Deployments with their containers included.
#[tokio::test(flavor = "multi_thread")]
async fn synthetic_fleets_are_valid_kubernetes() {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let cluster = testenv::TestCluster::start("synth").await;
    let client = cluster.client().await;
    let spec = flotilla::synth::SynthSpec { clusters: 2, identities: 40, ..Default::default() };
    let dir = std::env::temp_dir().join(format!("flotilla-synth-valid-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    flotilla::synth::write_fleet_dir(&spec, &dir).unwrap();
    let member = dir.join(flotilla::synth::cluster_name(0));
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&member).unwrap() {
        docs.extend(flotilla::yaml::parse_documents(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap());
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let namespaces: BTreeSet<String> = docs
        .iter()
        .filter_map(|d| d.pointer("/metadata/namespace").and_then(|n| n.as_str()).map(str::to_string))
        .collect();
    for ns in &namespaces {
        apply(&client, &namespace(ns)).await;
    }
    let pp = PatchParams::apply("flotilla-testenv").dry_run();
    let mut kinds = BTreeSet::new();
    for doc in &docs {
        let object: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
        let types = object.types.clone().expect("apiVersion and kind");
        let (group, version) = types.api_version.split_once('/').unwrap_or(("", &types.api_version));
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
        let name = object.metadata.name.clone().unwrap();
        let api: Api<DynamicObject> = match &object.metadata.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        api.patch(&name, &pp, &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("synthetic {} {name} rejected: {e}", types.kind));
        kinds.insert(types.kind);
    }
    assert!(kinds.contains("Deployment") && kinds.contains("Service"), "{kinds:?}");
    println!("{} synthetic objects of kinds {kinds:?} accepted", docs.len());
}
