//! Istio's own code judges what `run` writes, live: `istioctl analyze` against each member of a
//! converged fleet, and istiod (`pilot-discovery`, out of cluster) against one member. istiod
//! must load every object flotilla wrote with no rejection or conflict, and a fake sidecar
//! (`flotilla-xds`) of a client workload must receive exactly the clusters its Dependencies name,
//! with the GTP's locality weights and mTLS (SNI `outbound_.80_._.<host>`, and the serving
//! workloads' SPIFFE ids as the only names accepted) towards the remote gateway. A GTP change is timed from the edit to the xDS push that carries it.

mod testenv;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla::istio::{DestinationRule, ServiceEntry, Sidecar};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use testenv::builders::apply;
use testenv::controller::{Flotilla, eventually};
use testenv::fleet::*;
use testenv::istio::{Istiod, assets};

/// A Pod of `name` in `ns`, as the Deployment's template would give it, with an address.
async fn pod(client: &Client, ns: &str, name: &str, identity: &str, ip: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{name}-0"), "namespace": ns, "labels": {"app": name, "identity": identity},
                     "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"}},
        "spec": {"nodeName": "node-1", "containers": [
            {"name": "app", "image": "example.com/app:1"},
            {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.30.3"},
        ]},
    }))
    .unwrap();
    apply(client, &pod).await;
    let status = json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"}});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(&format!("{name}-0"), &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// `istioctl analyze -A` against a member: the messages of level Error or Warning.
fn analyze_live(kubeconfig: &str, scratch: &std::path::Path) -> Vec<Value> {
    let path = scratch.join("member.kubeconfig");
    std::fs::write(&path, kubeconfig).unwrap();
    let out = Command::new(assets().join("istioctl"))
        .args(["analyze", "--all-namespaces", "--output", "json", "--kubeconfig"])
        .arg(&path)
        .output()
        .expect("running istioctl analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let messages: Vec<Value> = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("istioctl analyze printed no JSON ({e}): {text}\n{}", String::from_utf8_lossy(&out.stderr))
    });
    messages.into_iter().filter(|m| m["level"] != "Info").collect()
}

/// The cluster of `host` in an xDS dump.
fn cluster<'a>(dump: &'a Value, host: &str) -> Option<&'a Value> {
    let name = format!("outbound|80||{host}");
    dump["clusters"].as_array()?.iter().find(|c| c["name"] == name.as_str())
}

/// Locality region → summed load-balancing weight.
fn weights(cluster: &Value) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for l in cluster["localities"].as_array().into_iter().flatten() {
        let region = l["locality"]["region"].as_str().unwrap_or_default().to_string();
        *out.entry(region).or_default() += l["weight"].as_u64().unwrap_or(0);
    }
    out
}

/// (kind, namespace/name) of every object flotilla wrote in a member.
async fn flotillas_objects(client: &Client) -> BTreeSet<(String, String)> {
    let lp = ListParams::default().labels("app.kubernetes.io/managed-by=flotilla");
    let name = |m: &kube::api::ObjectMeta| {
        format!("{}/{}", m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
    };
    let mut written = BTreeSet::new();
    for se in Api::<ServiceEntry>::all(client.clone()).list(&lp).await.unwrap().items {
        written.insert(("ServiceEntry".to_string(), name(&se.metadata)));
    }
    for dr in Api::<DestinationRule>::all(client.clone()).list(&lp).await.unwrap().items {
        written.insert(("DestinationRule".to_string(), name(&dr.metadata)));
    }
    for sc in Api::<Sidecar>::all(client.clone()).list(&lp).await.unwrap().items {
        written.insert(("Sidecar".to_string(), name(&sc.metadata)));
    }
    written
}

/// What the caller's Pod carries (the Deployment's template).
const CALLER_LABELS: &[(&str, &str)] = &[("app", "caller"), ("identity", "caller")];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread")]
async fn istio_loads_what_flotilla_writes_and_a_client_gets_exactly_its_dependencies() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["mesh-west", "mesh-east"]).await;
    let (west, east) = (&clients[0], &clients[1]);
    prepare_member(west, "us-west-2", "10.0.4.1").await;
    prepare_member(east, "us-east-2", "10.0.4.2").await;
    let flotilla = Flotilla::start(&hub, "istio", &[]);
    let kubeconfigs: Vec<(&str, String)> = members.iter().map(|m| (m.name.as_str(), m.admin_kubeconfig())).collect();
    apply(&hub_client, &secret("members", "istio/multiCluster", &kubeconfigs)).await;

    // greeting runs in both members; caller (in west) depends on it; other runs in west and
    // nothing depends on it.
    for (client, prefix) in [(west, "10.1"), (east, "10.2")] {
        deploy(client, "greeting", "greeting").await;
        pod(client, "greeting", "greeting", "greeting", &format!("{prefix}.0.4")).await;
    }
    deploy(west, "caller", "caller").await;
    pod(west, "caller", "caller", "caller", "10.1.0.5").await;
    deploy(west, "other", "other").await;
    pod(west, "other", "other", "other", "10.1.0.6").await;
    apply(west, &dependency("caller", "caller-deps", "caller", &["greeting"])).await;
    let gtp_of = |west_weight: i32| {
        gtp(
            "greeting",
            "greeting-gtp",
            "greeting",
            json!([{"dnsPrefix": "default", "lbType": "FAILOVER", "target": [{"region": "us-west-2", "weight": west_weight}, {"region": "us-east-2", "weight": 100 - west_weight}]}]),
        )
    };
    apply(west, &gtp_of(80)).await;
    eventually("the GTP's weights in west", WAIT, &flotilla, || async {
        let dr = get_dr(west, "stage.greeting.global-default-dr").await?;
        (distribute(&dr)[0]["to"]["us-west-2"] == 80).then_some(())
    })
    .await;
    eventually("caller's Sidecar in west", WAIT, &flotilla, || async {
        Api::<Sidecar>::namespaced(west.clone(), "caller").get_opt("caller-egress").await.unwrap()
    })
    .await;
    converged(&flotilla).await;

    // istioctl analyze against every member: nothing wrong with flotilla's objects. A user's
    // broken DestinationRule in east shows that the analysis sees the member's objects.
    let broken: DestinationRule = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "nowhere-dr", "namespace": "greeting"},
        "spec": {"host": "nowhere.example.com", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}},
    }))
    .unwrap();
    apply(east, &broken).await;
    let scratch = testenv::scratch_dir("istio-live");
    for (m, client) in members.iter().zip(&clients) {
        let found = analyze_live(&m.admin_kubeconfig(), &scratch);
        let written = flotillas_objects(client).await;
        let ours: Vec<&Value> =
            found.iter().filter(|f| written.iter().any(|(k, n)| f["origin"] == format!("{k} {n}").as_str())).collect();
        assert!(ours.is_empty(), "istioctl analyze in {}: {ours:#?}", m.name);
        if m.name == "mesh-east" {
            assert!(
                found.iter().any(|f| f.to_string().contains("nowhere-dr")),
                "the broken DestinationRule is not seen: {found:#?}"
            );
        }
        let _ = client;
    }

    // istiod against west: it loads every object flotilla wrote there, with no conflict.
    let istiod = Istiod::start(&members[0]).await;
    let written = flotillas_objects(west).await;
    assert!(written.len() >= 7, "{written:?}");
    let loaded = eventually("istiod loaded every object flotilla wrote", WAIT, &flotilla, || async {
        let loaded = istiod.configz().await;
        written.is_subset(&loaded).then_some(loaded)
    })
    .await;
    println!("istiod loaded {} configs, {} of them flotilla's", loaded.len(), written.len());

    // caller's sidecar receives greeting (its only Dependency), not other.
    let dump = istiod.xds("caller", "caller-0", "10.1.0.5", CALLER_LABELS, "us-west-2/zone-1");
    let names: Vec<&str> = dump["clusters"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    let greeting = cluster(&dump, "stage.greeting.global").unwrap_or_else(|| panic!("no greeting cluster: {names:?}"));
    assert!(
        cluster(&dump, "stage.other.global").is_none(),
        "the Sidecar lets through a host caller does not depend on: {names:?}"
    );
    assert!(cluster(&dump, "stage.caller.global").is_none(), "{names:?}");
    assert_eq!(
        weights(greeting),
        [("us-east-2".to_string(), 20), ("us-west-2".to_string(), 80)].into(),
        "{greeting:#}"
    );
    // mTLS with the SNI the remote gateway routes by, and the gateway endpoint marked for it.
    assert_eq!(greeting["tls"]["mode"], "ISTIO_MUTUAL", "{greeting:#}");
    assert_eq!(greeting["tls"]["sni"], "outbound_.80_._.stage.greeting.global", "{greeting:#}");
    // Pinned names: only greeting's own workloads' certificates are accepted (the ServiceEntry's
    // subjectAltNames, in the TLS validation context istiod gives caller's sidecar).
    assert_eq!(greeting["tls"]["sans"], json!(["spiffe://cluster.local/ns/greeting/sa/default"]), "{greeting:#}");
    let gateway = greeting["localities"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == "10.0.4.2:15443")
        .unwrap_or_else(|| panic!("east's gateway is not an endpoint: {greeting:#}"));
    assert_eq!(gateway["tls_mode"], "istio", "{greeting:#}");
    let conflicts = istiod.metrics("pilot_conflict").await;
    let duplicates = istiod.metrics("pilot_duplicate_envoy_clusters").await;
    assert!(conflicts.values().chain(duplicates.values()).all(|v| *v == 0.0), "{conflicts:?} {duplicates:?}");
    let rejects = istiod.metrics("pilot_total_xds_rejects").await;
    assert!(rejects.values().all(|v| *v == 0.0), "{rejects:?}");

    // A GTP change reaches caller's sidecar: timed from the edit to the push carrying it.
    let log = istiod.dir().join("watch.jsonl");
    let mut watch = istiod.watch("caller", "caller-0", "10.1.0.5", CALLER_LABELS, "us-west-2/zone-1", &log);
    let mut lines_seen = 0;
    let mut latencies = Vec::new();
    for (i, west_weight) in
        [30, 70, 40, 90, 20, 60, 10, 50, 35, 65, 25, 75, 45, 55, 15, 85, 5, 95, 80, 20].into_iter().enumerate()
    {
        let edited = Instant::now();
        apply(west, &gtp_of(west_weight)).await;
        let want =
            [("us-east-2".to_string(), (100 - west_weight) as u64), ("us-west-2".to_string(), west_weight as u64)]
                .into();
        let deadline = edited + WAIT;
        'push: loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            for line in text.lines().skip(lines_seen) {
                lines_seen += 1;
                let Ok(push) = serde_json::from_str::<Value>(line) else { continue };
                if cluster(&push, "stage.greeting.global").is_some_and(|c| weights(c) == want) {
                    latencies.push(edited.elapsed());
                    break 'push;
                }
            }
            assert!(
                Instant::now() < deadline,
                "change {i} ({west_weight}/{}) never reached caller's sidecar:\n{}",
                100 - west_weight,
                flotilla.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    latencies.sort();
    println!(
        "GTP edit → xDS push to a client, {} changes: p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
