//! Proves the test environment is real: several API servers at once, Istio's and our CRD
//! validation, server-side apply conflicts, watches, and a member that goes away and comes back.

mod testenv;

use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use testenv::builders::{apply, namespace};
use testenv::{TestCluster, start_clusters};

fn dynamic_api(client: &Client, group: &str, version: &str, kind: &str, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    Api::namespaced_with(client.clone(), namespace, &resource)
}

fn config_map(name: &str, key: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some([(key.to_string(), value.to_string())].into()),
        ..Default::default()
    }
}

fn parse(yaml: &str) -> DynamicObject {
    serde_saphyr::from_str(yaml).expect("test YAML")
}

#[tokio::test(flavor = "multi_thread")]
async fn three_clusters_start_in_parallel_and_are_separate() {
    let started = Instant::now();
    let clusters = start_clusters(&["alpha", "beta", "gamma"]).await;
    let startup = started.elapsed();
    let rss_mib: Vec<u64> = clusters.iter().map(|c| c.rss_kib() / 1024).collect();
    println!("three members ready with CRDs in {startup:.1?}; RSS per member (etcd + apiserver): {rss_mib:?} MiB");

    let addresses: std::collections::BTreeSet<_> = clusters.iter().map(|c| c.host.ip).collect();
    assert_eq!(addresses.len(), 3, "each member has its own address");
    for c in &clusters {
        let version = c.client().await.apiserver_version().await.expect("server version");
        assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "36"), "{}: {version:?}", c.name);
    }
    // A namespace created in one member does not exist in another.
    let alpha = clusters[0].client().await;
    apply(&alpha, &namespace("only-in-alpha")).await;
    let beta: Api<Namespace> = Api::all(clusters[1].client().await);
    assert!(beta.get_opt("only-in-alpha").await.unwrap().is_none());
    let alpha_ns: Api<Namespace> = Api::all(alpha);
    assert!(alpha_ns.get_opt("only-in-alpha").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn crd_validation_is_istios_and_ours() {
    let cluster = TestCluster::start("validation").await;
    let client = cluster.client().await;
    apply(&client, &namespace("admiral-sync")).await;
    let pp = PostParams::default();

    // Istio's ServiceEntry schema: `resolution` must be one of its enum values.
    let se = dynamic_api(&client, "networking.istio.io", "v1", "ServiceEntry", "admiral-sync");
    let bad = parse(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad}\nspec: {hosts: [a.global], resolution: SOMETIMES, ports: [{number: 80, name: http, protocol: HTTP}]}",
    );
    let err = se.create(&pp, &bad).await.expect_err("an invalid ServiceEntry must be rejected");
    assert!(err.to_string().contains("resolution"), "{err}");
    // Istio's CEL rules: a ServiceEntry without hosts is invalid.
    let no_hosts = parse(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: no-hosts}\nspec: {resolution: DNS, ports: [{number: 80, name: http, protocol: HTTP}]}",
    );
    se.create(&pp, &no_hosts).await.expect_err("a ServiceEntry without hosts must be rejected");
    let good = parse(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: good}\nspec: {hosts: [a.global], resolution: DNS, location: MESH_INTERNAL, ports: [{number: 80, name: http, protocol: HTTP}], endpoints: [{address: 203.0.113.1, ports: {http: 15443}}]}",
    );
    se.create(&pp, &good).await.expect("a valid ServiceEntry is accepted");

    // Our GTP schema accepts Admiral's own samples (integer and string lbType) ...
    let gtp = dynamic_api(&client, "admiral.io", "v1alpha1", "GlobalTrafficPolicy", "admiral-sync");
    for (name, lb) in [("int-lb", "1"), ("string-lb", "FAILOVER"), ("lower-lb", "topology")] {
        let ok = parse(&format!(
            "apiVersion: admiral.io/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata: {{name: {name}, labels: {{identity: greeting}}}}\nspec: {{policy: [{{dnsPrefix: default, lbType: {lb}, target: [{{region: us-west-2, weight: 80}}, {{region: us-east-2, weight: 20}}], outlier_detection: {{base_ejection_time: 180, consecutive_gateway_errors: 10, interval: 60}}}}]}}"
        ));
        gtp.create(&pp, &ok).await.unwrap_or_else(|e| panic!("GTP with lbType {lb} must be accepted: {e}"));
    }
    // ... and rejects what SPEC §5 calls invalid where a schema can say it.
    let cases = [
        (
            "weights",
            "[{dnsPrefix: default, lbType: 1, target: [{region: a, weight: 50}, {region: b, weight: 40}]}]",
            "sum to 100",
        ),
        ("lbtype", "[{dnsPrefix: default, lbType: 7}]", "lbType"),
        ("lbname", "[{dnsPrefix: default, lbType: ROUNDROBIN}]", "lbType"),
        ("dupes", "[{dnsPrefix: west, lbType: 0}, {dnsPrefix: west, lbType: 0}]", "unique"),
        ("range", "[{dnsPrefix: default, lbType: 1, target: [{region: a, weight: 150}]}]", "weight"),
    ];
    for (name, policy, expected) in cases {
        let bad = parse(&format!(
            "apiVersion: admiral.io/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata: {{name: {name}}}\nspec: {{policy: {policy}}}"
        ));
        let err = gtp.create(&pp, &bad).await.expect_err(&format!("GTP {name} must be rejected"));
        assert!(err.to_string().contains(expected), "GTP {name}: expected {expected:?} in {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_conflicts_are_reported() {
    let cluster = TestCluster::start("ssa").await;
    let api: Api<ConfigMap> = Api::namespaced(cluster.client().await, "default");
    let cm = |value: &str| config_map("shared", "key", value);
    api.patch("shared", &PatchParams::apply("someone-else"), &Patch::Apply(cm("theirs"))).await.unwrap();
    let err = api
        .patch("shared", &PatchParams::apply("flotilla"), &Patch::Apply(cm("ours")))
        .await
        .expect_err("a second manager changing an owned field without force must conflict");
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 409, "{status:?}"),
        other => panic!("expected a 409 conflict, got {other}"),
    }
    assert_eq!(api.get("shared").await.unwrap().data.unwrap()["key"], "theirs");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_sees_an_update() {
    let cluster = TestCluster::start("watch").await;
    let api: Api<ConfigMap> = Api::namespaced(cluster.client().await, "default");
    let cm = |v: &str| config_map("watched", "v", v);
    let pp = PatchParams::apply("flotilla-testenv");
    api.patch("watched", &pp, &Patch::Apply(cm("1"))).await.unwrap();
    let mut stream =
        watcher(api.clone(), watcher::Config::default().fields("metadata.name=watched")).applied_objects().boxed();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.data.unwrap()["v"], "1");
    api.patch("watched", &pp, &Patch::Apply(cm("2"))).await.unwrap();
    let seen = tokio::time::timeout(testenv::PATIENCE, async {
        loop {
            let cm = stream.next().await.unwrap().unwrap();
            if cm.data.as_ref().unwrap()["v"] == "2" {
                return cm;
            }
        }
    })
    .await
    .expect("the update arrives through the watch");
    assert_eq!(seen.data.unwrap()["v"], "2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_member_refuses_connections_and_comes_back() {
    let mut cluster = TestCluster::start("outage").await;
    let client = cluster.client().await;
    apply(&client, &namespace("kept")).await;

    cluster.stop_apiserver();
    let refused = std::net::TcpStream::connect(cluster.api_addr());
    assert!(refused.is_err(), "a stopped member must refuse connections");
    let api: Api<Namespace> = Api::all(cluster.client().await);
    assert!(api.get("kept").await.is_err(), "requests fail while the member is down");

    let address = cluster.api_addr();
    let restarted = Instant::now();
    cluster.start_apiserver().await;
    assert_eq!(cluster.api_addr(), address, "a restarted member keeps its address");
    println!("member back in {:.1?}", restarted.elapsed());
    let api: Api<Namespace> = Api::all(cluster.client().await);
    assert!(api.get_opt("kept").await.unwrap().is_some(), "state survives the restart (etcd kept it)");
}

/// Address claims exclude each other while held, and a dropped claim frees its address.
#[test]
fn address_claims_never_overlap_and_are_released() {
    use std::os::fd::AsRawFd;
    use testenv::net::{HTTP_PORT, Host, claims_dir};
    let a = Host::claim(&[HTTP_PORT]);
    let b = Host::claim(&[HTTP_PORT]);
    assert_ne!(a.ip, b.ip);
    let path = claims_dir().join(a.ip.to_string());
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    let try_lock = || unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    assert!(!try_lock(), "a held claim cannot be taken");
    drop(a);
    assert!(try_lock(), "a dropped claim releases its address");
}
