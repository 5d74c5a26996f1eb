//! Memory of a relist, printed (never asserted): one member holding 20,000 Deployments
//! (FLOTILLA_BENCH_DEPLOYMENTS) of a realistic size (labels, ten environment variables,
//! resources, probes), 1 in 1,000 of them in the mesh. `flotilla run` as a child process.
//!
//! * first list: peak RSS from start until the member is synced, and RSS then;
//! * relist: the member's kube-apiserver is restarted, so every watch lists again from scratch;
//!   the peak is reset first (/proc/<pid>/clear_refs), so it is the relist's own.
//!
//! Run: `cargo bench --bench relist` (needs scripts/testenv-install). FLOTILLA_BIN runs another
//! build of flotilla with the same steps (e.g. one of an earlier commit), for a comparison.

// The test environment's harness (it allows its own dead code).
#[path = "../tests/testenv/mod.rs"]
mod testenv;

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use testenv::builders::{apply, gateway_service, namespace, node, set_load_balancer_ip};
use testenv::controller::{FLOTILLA_NAMESPACE, Flotilla};
use testenv::{peak_rss_of, rss_of, start_clusters};

const NAMESPACES: usize = 20;
const MEMBER: &str = "m-0";

fn deployment(namespace: &str, i: usize, in_mesh: bool) -> Deployment {
    let name = format!("app-{i:05}");
    let mut pod_labels = json!({"app": &name, "team": namespace, "version": "v1"});
    if in_mesh {
        pod_labels["identity"] = json!(&name);
    }
    let env: Vec<serde_json::Value> =
        (0..10).map(|e| json!({"name": format!("SETTING_{e}"), "value": format!("value-{e}-of-{name}")})).collect();
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": &name, "namespace": namespace,
            "labels": {"app": &name, "team": namespace},
            "annotations": {"deployment.kubernetes.io/revision": "3", "owner": format!("{namespace}@example.com")}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": &name}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {"admiral.io/env": "stage"}},
                "spec": {"containers": [{
                    "name": &name,
                    "image": format!("registry.example.com/{namespace}/{name}:1.2.3"),
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "env": env,
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
                    "livenessProbe": {"httpGet": {"path": "/live", "port": 8080}, "periodSeconds": 10},
                }]},
            },
        },
    }))
    .unwrap()
}

async fn state(flotilla: &Flotilla) -> String {
    flotilla.json("/debug/clusters").await["clusters"][MEMBER]["state"].as_str().unwrap_or("").to_string()
}

async fn wait_for_state(flotilla: &Flotilla, want: &str, within: Duration) {
    let t = Instant::now();
    while state(flotilla).await != want {
        assert!(t.elapsed() < within, "{MEMBER} not {want} within {within:?}:\n{}", flotilla.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let count: usize = std::env::var("FLOTILLA_BENCH_DEPLOYMENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let mut clusters = start_clusters(&["hub", MEMBER]).await;
    let (hub, member) = clusters.split_at_mut(1);
    let (hub, member) = (&hub[0], &mut member[0]);
    let hub_client = hub.client().await;
    apply(&hub_client, &namespace(FLOTILLA_NAMESPACE)).await;
    let client: Client = member.client().await;
    apply(&client, &node("node-1", "us-west-2")).await;
    apply(&client, &namespace("istio-system")).await;
    apply(&client, &gateway_service()).await;
    set_load_balancer_ip(&client, "istio-system", "istio-eastwestgateway", "10.1.0.1").await;

    let t = Instant::now();
    for n in 0..NAMESPACES {
        apply(&client, &namespace(&format!("team-{n:02}"))).await;
    }
    futures::stream::iter(0..count)
        .for_each_concurrent(32, |i| {
            let client = client.clone();
            async move {
                let ns = format!("team-{:02}", i % NAMESPACES);
                let api: Api<Deployment> = Api::namespaced(client, &ns);
                api.create(&PostParams::default(), &deployment(&ns, i, i % 1000 == 0)).await.unwrap();
            }
        })
        .await;
    let one = serde_json::to_vec(&deployment("team-00", 1, false)).unwrap().len();
    println!("relist: {count} Deployments ({one} bytes each as sent) created in {:.1?}", t.elapsed());

    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "members", "namespace": FLOTILLA_NAMESPACE, "labels": {"istio/multiCluster": "true"}},
        "stringData": {MEMBER: member.admin_kubeconfig()},
    }))
    .unwrap();
    apply(&hub_client, &secret).await;

    let t = Instant::now();
    let flotilla = Flotilla::start(hub, "bench", &["--log-level", "warn", "--stale-after", "2s"]);
    let pid = flotilla.pid().expect("running");
    wait_for_state(&flotilla, "synced", Duration::from_secs(600)).await;
    println!(
        "relist: first list: synced in {:.1?}, peak RSS {} MiB, RSS then {} MiB",
        t.elapsed(),
        peak_rss_of(pid) / 1024,
        rss_of(pid) / 1024
    );

    // Let the writes settle, then reset the peak: what follows is the relist's own.
    tokio::time::sleep(Duration::from_secs(5)).await;
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("resetting VmHWM needs Linux ≥ 4.0");
    let before = rss_of(pid);
    member.stop_apiserver();
    wait_for_state(&flotilla, "stale", Duration::from_secs(60)).await;
    let t = Instant::now();
    member.start_apiserver().await;
    wait_for_state(&flotilla, "synced", Duration::from_secs(600)).await;
    println!(
        "relist: relisted and synced in {:.1?}, RSS before {} MiB, peak during {} MiB, RSS then {} MiB",
        t.elapsed(),
        before / 1024,
        peak_rss_of(pid) / 1024,
        rss_of(pid) / 1024
    );
}
