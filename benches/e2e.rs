//! End-to-end figures on the test environment, printed (never asserted): a hub and 3 real member
//! API servers (FLOTILLA_BENCH_MEMBERS), 300 identities (FLOTILLA_BENCH_IDENTITIES),
//! `flotilla run` (release build) as a child process.
//!
//! * start → converged: from spawning flotilla until every member holds exactly the objects
//!   flotilla wants there;
//! * GTP change → written: 50 weight changes, each timed until the DestinationRule carries the new
//!   weights in every target member (watched, not polled); p50 / p99;
//! * restart with no change: write requests the new process issues;
//! * a member down and back: from its API server answering again until the fleet has converged.
//!
//! Run: `cargo bench --bench e2e` (needs scripts/testenv-install). Every member is a whole etcd +
//! kube-apiserver (about 400 MiB together): 20 members fit in 24 GiB.

// The test environment's harness (it allows its own dead code).
#[path = "../tests/testenv/mod.rs"]
mod testenv;

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::crd::{Dependency, GlobalTrafficPolicy};
use flotilla::istio::DestinationRule;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use testenv::builders::{apply, deployment, gateway_service, namespace, node, service, set_load_balancer_ip};
use testenv::controller::{FLOTILLA_NAMESPACE, Flotilla};
use testenv::start_clusters;

const REGIONS: [&str; 3] = ["us-west-2", "us-east-2", "eu-north-1"];
const GTP_IDENTITY: &str = "id-0000";
const CHANGES: usize = 50;

fn identity(i: usize) -> String {
    format!("id-{i:04}")
}

fn gtp(west: i32) -> GlobalTrafficPolicy {
    serde_json::from_value(json!({
        "apiVersion": "admiral.io/v1alpha1", "kind": "GlobalTrafficPolicy",
        "metadata": {"name": "bench-gtp", "namespace": GTP_IDENTITY, "labels": {"identity": GTP_IDENTITY, "env": "stage"}},
        "spec": {"policy": [{"dnsPrefix": "default", "lbType": "FAILOVER",
            "target": [{"region": REGIONS[0], "weight": west}, {"region": REGIONS[1], "weight": 100 - west}]}]},
    }))
    .unwrap()
}

/// Objects labelled as ours in a member, of the three kinds flotilla writes.
async fn managed_count(client: &Client) -> usize {
    let lp = ListParams::default().labels("app.kubernetes.io/managed-by=flotilla");
    let se = Api::<flotilla::istio::ServiceEntry>::all(client.clone()).list(&lp).await.unwrap().items.len();
    let dr = Api::<DestinationRule>::all(client.clone()).list(&lp).await.unwrap().items.len();
    let sc = Api::<flotilla::istio::Sidecar>::all(client.clone()).list(&lp).await.unwrap().items.len();
    se + dr + sc
}

async fn converged(flotilla: &Flotilla, clients: &[(String, Client)]) -> bool {
    if flotilla.get("/readyz").await.0 != 200 {
        return false;
    }
    let view = flotilla.json("/debug/clusters").await;
    for (id, client) in clients {
        let want = view["clusters"][id]["desiredObjects"].as_u64().unwrap_or(0) as usize;
        if want == 0 || managed_count(client).await != want {
            return false;
        }
    }
    true
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let knob = |var: &str, default: usize| std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let identities = knob("FLOTILLA_BENCH_IDENTITIES", 300);
    let n = knob("FLOTILLA_BENCH_MEMBERS", 3).max(2);
    let t = Instant::now();
    let names: Vec<String> = std::iter::once("hub".to_string()).chain((0..n).map(|i| format!("m-{i}"))).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // Started a few at a time: a burst of many API servers on two cores misses its deadlines.
    let mut clusters = Vec::new();
    for chunk in names.chunks(4) {
        clusters.extend(start_clusters(chunk).await);
    }
    let (hub, members) = clusters.split_at_mut(1);
    let hub = &hub[0];
    println!("e2e: {} API servers up in {:.1?}", n + 1, t.elapsed());
    let hub_client = hub.client().await;
    apply(&hub_client, &namespace(FLOTILLA_NAMESPACE)).await;
    let mut clients = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let c = m.client().await;
        apply(&c, &node("node-1", REGIONS[i % REGIONS.len()])).await;
        apply(&c, &namespace("istio-system")).await;
        apply(&c, &gateway_service()).await;
        set_load_balancer_ip(&c, "istio-system", "istio-eastwestgateway", &format!("10.1.0.{}", i + 1)).await;
        clients.push((m.name.clone(), c));
    }
    // Identity i runs in member i % n (and every fifth also in the next one); it calls the next
    // three identities.
    let t = Instant::now();
    for i in 0..identities {
        let id = identity(i);
        let homes: Vec<usize> = if i.is_multiple_of(5) { vec![i % n, (i + 1) % n] } else { vec![i % n] };
        for h in &homes {
            let c = &clients[*h].1;
            apply(c, &namespace(&id)).await;
            apply(c, &deployment(&id, &id, &id, "stage")).await;
            apply(c, &service(&id, &id, "http", 80, 8080)).await;
        }
        let destinations: Vec<String> = (1..=3).map(|d| identity((i + d) % identities)).collect();
        let dep: Dependency = serde_json::from_value(json!({
            "apiVersion": "admiral.io/v1alpha1", "kind": "Dependency",
            "metadata": {"name": format!("{id}-deps"), "namespace": &id},
            "spec": {"source": &id, "destinations": destinations},
        }))
        .unwrap();
        apply(&clients[homes[0]].1, &dep).await;
    }
    apply(&clients[0].1, &gtp(50)).await;
    println!("e2e: {identities} identities created in {:.1?}", t.elapsed());

    let kubeconfigs: serde_json::Map<String, serde_json::Value> =
        members.iter().map(|m| (m.name.clone(), json!(m.admin_kubeconfig()))).collect();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "members", "namespace": FLOTILLA_NAMESPACE, "labels": {"istio/multiCluster": "true"}},
        "stringData": kubeconfigs,
    }))
    .unwrap();
    apply(&hub_client, &secret).await;

    let t = Instant::now();
    let mut flotilla = Flotilla::start(hub, "bench", &["--log-level", "warn"]);
    while !converged(&flotilla, &clients).await {
        assert!(t.elapsed() < Duration::from_secs(300), "not converged in 5 min:\n{}", flotilla.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start_to_converged = t.elapsed();
    let total: usize = futures::future::join_all(clients.iter().map(|(_, c)| managed_count(c))).await.into_iter().sum();
    let writes = flotilla.metric("flotilla_api_writes_total").await;
    println!(
        "e2e: start → converged {start_to_converged:.2?} ({total} objects in {n} members, {} write requests, flotilla RSS {} MiB)",
        writes as u64,
        flotilla.rss_kib() / 1024
    );

    // Watch the GTP's DestinationRule in every member; record the weight each one shows.
    let dr_name = format!("stage.{GTP_IDENTITY}.global-default-dr");
    let seen: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let notify = Arc::new(tokio::sync::Notify::new());
    let mut targets = Vec::new();
    for (id, client) in &clients {
        let api: Api<DestinationRule> = Api::namespaced(client.clone(), "admiral-sync");
        if api.get_opt(&dr_name).await.unwrap().is_none() {
            continue;
        }
        targets.push(id.clone());
        let (seen, notify, id, dr_name) = (seen.clone(), notify.clone(), id.clone(), dr_name.clone());
        let config = watcher::Config::default().fields(&format!("metadata.name={dr_name}"));
        tokio::spawn(async move {
            let mut stream = watcher(api, config).applied_objects().boxed();
            while let Some(Ok(dr)) = stream.next().await {
                let spec = serde_json::to_value(&dr.spec).unwrap();
                let to = &spec["trafficPolicy"]["loadBalancer"]["localityLbSetting"]["distribute"][0]["to"][REGIONS[0]];
                seen.lock().unwrap().insert(id.clone(), to.as_i64().unwrap_or(-1));
                notify.notify_waiters();
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    let counters = support::CpuCounters::now();
    for round in 0..CHANGES {
        let west = if round.is_multiple_of(2) { 70 } else { 30 };
        let t = Instant::now();
        apply(&clients[0].1, &gtp(west)).await;
        loop {
            let wait = notify.notified();
            let done = targets.iter().all(|id| seen.lock().unwrap().get(id) == Some(&(west as i64)));
            if done {
                break;
            }
            if tokio::time::timeout(Duration::from_secs(10), wait).await.is_err() {
                panic!("change {round} not written in 10 s:\n{}", flotilla.log_tail());
            }
        }
        latencies.push(t.elapsed());
    }
    let steal = counters.steal_percent();
    let mut slowest: Vec<(usize, Duration)> = latencies.iter().copied().enumerate().collect();
    slowest.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    let slowest: Vec<String> = slowest.iter().take(3).map(|(round, d)| format!("#{round} {d:.0?}")).collect();
    latencies.sort();
    println!(
        "e2e: GTP change → DestinationRule written in all {} target members, {CHANGES} changes: p50 {:.0?}, p99 {:.0?}, max {:.0?}; slowest {}; CPU stolen {steal:.0}%",
        targets.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
        slowest.join(", ")
    );

    // Restart with nothing changed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    flotilla.terminate();
    let t = Instant::now();
    flotilla.restart();
    while !converged(&flotilla, &clients).await || flotilla.metric("flotilla_leader").await != 1.0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = t.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = flotilla.metric("flotilla_api_writes_total").await;
    println!("e2e: restart with no change: ready and leading after {ready:.2?}, {} write requests", writes as u64);

    // A member down long enough to go stale, a change meanwhile, then back.
    let (victim, victim_id) = (&mut members[1], clients[1].0.clone());
    victim.stop_apiserver();
    let stale = Instant::now();
    while flotilla.json("/debug/clusters").await["clusters"][&victim_id]["state"] != "stale" {
        assert!(stale.elapsed() < Duration::from_secs(120), "{victim_id} never went stale:\n{}", flotilla.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    apply(&clients[0].1, &gtp(55)).await;
    victim.start_apiserver().await;
    let t = Instant::now();
    while !converged(&flotilla, &clients).await {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "not converged after the member came back:\n{}",
            flotilla.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "e2e: member down and back: down {:.1?} (until stale, and a GTP change meanwhile); converged {:.2?} after its API server answered again",
        t.duration_since(stale),
        t.elapsed()
    );
    println!(
        "e2e: the restarted flotilla process, from its restart to here: {:.1} CPU seconds, peak RSS {} MiB",
        flotilla.cpu_seconds(),
        flotilla.peak_rss_kib() / 1024
    );
}
