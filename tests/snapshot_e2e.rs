//! `flotilla snapshot` of a live fleet: rendered, it gives exactly what `run` wrote there (the
//! VIPs included, even for hosts whose preferred addresses collided); two snapshots of an
//! unchanged fleet are byte-identical; no credential is in it; a member that cannot be reached is
//! marked, not dropped.

mod testenv;

use std::collections::BTreeMap;
use std::path::Path;

use flotilla::istio::ServiceEntry;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::json;
use testenv::builders::apply;
use testenv::controller::{FLOTILLA_NAMESPACE, Flotilla, eventually};
use testenv::fleet::*;
use testenv::oracle;

/// Every file below `dir`, by relative path.
fn files(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.insert(rel, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_of_a_live_fleet_renders_to_exactly_what_run_wrote() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, mut members, hub_client, clients) = start_fleet(&["snap-a", "snap-b", "snap-c"]).await;
    let (a, b, c) = (&clients[0], &clients[1], &clients[2]);
    prepare_member(a, "us-west-2", "10.0.3.1").await;
    prepare_member(b, "us-east-2", "10.0.3.2").await;
    prepare_member(c, "eu-north-1", "10.0.3.3").await;
    let flotilla = Flotilla::start(&hub, "snap", &[]);
    let kubeconfigs: Vec<(&str, String)> = members.iter().map(|m| (m.name.as_str(), m.admin_kubeconfig())).collect();
    apply(&hub_client, &secret("members", "istio/multiCluster", &kubeconfigs)).await;

    deploy(a, "greeting", "greeting").await;
    deploy(b, "caller", "caller").await;
    apply(b, &dependency("caller", "caller-deps", "caller", &["greeting"])).await;
    let weights = json!([{"dnsPrefix": "default", "lbType": "FAILOVER", "target": [{"region": "us-west-2", "weight": 70}, {"region": "us-east-2", "weight": 30}]}]);
    apply(a, &gtp("greeting", "greeting-gtp", "greeting", weights)).await;
    // Two hosts whose preferred VIPs collide (240.0.67.233): svc42 arrives first and keeps it,
    // which allocating in identity order (svc299 < svc42) would not give.
    deploy(a, "svc42", "svc42").await;
    eventually("svc42's ServiceEntry", WAIT, &flotilla, || get_se(a, "stage.svc42.global-se")).await;
    deploy(a, "svc299", "svc299").await;
    apply(&hub_client, &dependency(FLOTILLA_NAMESPACE, "caller-hub-deps", "caller", &["svc42", "svc299"])).await;
    // A user's ServiceEntry with a name flotilla wants: left alone by run, left out by render.
    let users: ServiceEntry = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "stage.mine.global-se", "namespace": SYNC},
        "spec": {"hosts": ["mine.example.com"], "location": "MESH_EXTERNAL", "resolution": "DNS", "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]},
    }))
    .unwrap();
    apply(b, &users).await;
    deploy(b, "mine", "mine").await;
    // A CronJob is a client only: b gets svc299's hosts for it, and its namespace a Sidecar.
    apply(b, &testenv::builders::namespace("nightly")).await;
    apply(b, &cron_job("nightly", "nightly", "nightly")).await;
    apply(&hub_client, &dependency(FLOTILLA_NAMESPACE, "nightly-deps", "nightly", &["svc299"])).await;
    eventually("the CronJob's Sidecar", WAIT, &flotilla, || async {
        let sidecars: Api<flotilla::istio::Sidecar> = Api::namespaced(b.clone(), "nightly");
        sidecars.get_opt("nightly-egress").await.ok().flatten()
    })
    .await;
    converged(&flotilla).await;
    let svc42 = get_se(a, "stage.svc42.global-se").await.unwrap();
    assert_eq!(svc42.spec.addresses, ["240.0.67.233"], "the first of the colliding hosts keeps the preferred VIP");

    // A member that cannot be reached any more is marked in the snapshot.
    members[2].stop_apiserver();
    let dir = oracle::fresh_dir("snapshot");
    let reachable = [("snap-a", a), ("snap-b", b)];
    let (rendered, found) =
        oracle::converge_to_render(&hub.admin_kubeconfig(), FLOTILLA_NAMESPACE, &reachable, SYNC, &dir, WAIT).await;
    assert!(found.is_empty(), "render of the snapshot differs from what run wrote:\n{}", found.join("\n"));
    let stderr = oracle::snapshot(&hub.admin_kubeconfig(), FLOTILLA_NAMESPACE, &dir);
    assert!(stderr.contains("cluster snap-c: unreachable"), "{stderr}");
    let fleet_yaml = std::fs::read_to_string(dir.join("fleet.yaml")).unwrap();
    assert!(fleet_yaml.contains("snap-c:\n    unreachable:"), "{fleet_yaml}");

    let taken = files(&dir);
    for (file, text) in &taken {
        assert!(
            !text.contains("flotilla-test-admin") && !text.contains("kind: Secret"),
            "{file} holds a credential:\n{text}"
        );
        assert!(!text.contains("managedFields") && !text.contains("resourceVersion"), "{file} holds noise:\n{text}");
    }
    assert!(
        taken.contains_key("_hub/flotilla-vips.yaml")
            && taken.contains_key("_hub/dependencies.yaml")
            && taken.get("snap-b/cronjobs.yaml").is_some_and(|t| t.contains("identity: nightly")),
        "{:?}",
        taken.keys()
    );
    let again = oracle::fresh_dir("snapshot-again");
    oracle::snapshot(&hub.admin_kubeconfig(), FLOTILLA_NAMESPACE, &again);
    let second = files(&again);
    let differing: Vec<String> = taken
        .keys()
        .chain(second.keys())
        .filter(|f| taken.get(*f) != second.get(*f))
        .map(|f| {
            format!(
                "{f}:\n--- first\n{}\n--- second\n{}",
                taken.get(f).map_or("<none>", |s| s),
                second.get(f).map_or("<none>", |s| s)
            )
        })
        .collect();
    assert!(differing.is_empty(), "two snapshots of an unchanged fleet differ:\n{}", differing.join("\n"));

    assert!(
        rendered
            .diagnostics
            .iter()
            .any(|d| d.contains("stage.mine.global-se") && d.contains("not managed by flotilla"))
    );

    // Without the hub's VIP store, render would allocate the colliding hosts the other way round:
    // the comparison above is what proves render reads it.
    std::fs::remove_file(dir.join("_hub/flotilla-vips.yaml")).unwrap();
    let without_store = oracle::differences(&oracle::render(&dir), &reachable, SYNC).await;
    assert!(without_store.iter().any(|d| d.contains("stage.svc42.global-se")), "{without_store:?}");

    let secrets: Api<Secret> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    assert!(secrets.get_opt("members").await.unwrap().is_some());
    for d in [dir, again] {
        std::fs::remove_dir_all(&d).unwrap();
    }
}
