//! Who may read /metrics and /debug, and which member credentials flotilla accepts, against real
//! API servers: the hub authenticates bearer tokens (TokenReview) and authorises the path
//! (SubjectAccessReview), so plain RBAC on non-resource URLs grants the views.

mod testenv;

use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use testenv::builders::apply;
use testenv::controller::{Flotilla, eventually};
use testenv::fleet::*;

/// The user of the harness's token `flotilla-test-nobody`: authenticated, no roles.
const NOBODY: (&str, &str) = ("flotilla-test-nobody", "nobody");
const CACHE_TTL: Duration = Duration::from_secs(5);

/// The chart's reader roles (tests/chart.rs checks the chart renders the same rules).
fn reader_role(name: &str, urls: &[&str]) -> ClusterRole {
    serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [{"nonResourceURLs": urls, "verbs": ["get"]}],
    }))
    .unwrap()
}

fn binding(role: &str, user: &str) -> ClusterRoleBinding {
    serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": format!("{role}-{user}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .unwrap()
}

/// What the hub itself answers now: may `user` get `path`?
async fn hub_allows(hub: &Client, user: &str, path: &str) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            non_resource_attributes: Some(NonResourceAttributes { path: Some(path.into()), verb: Some("get".into()) }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answered = Api::<SubjectAccessReview>::all(hub.clone()).create(&PostParams::default(), &review).await.unwrap();
    answered.status.is_some_and(|s| s.allowed)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_debug_need_a_token_the_hub_authorises_and_probes_stay_open() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, _members, hub_client, _clients) = start_fleet(&[]).await;
    // A mounted certificate, rotated below.
    let dir = testenv::scratch_dir("serving-cert");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let write_cert = |name: &str| {
        let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        made.cert.der().to_vec()
    };
    let first = write_cert("first.flotilla.test");
    let ttl = format!("{}s", CACHE_TTL.as_secs());
    let (cert_arg, key_arg) = (cert.to_string_lossy().to_string(), key.to_string_lossy().to_string());
    let flotilla = Flotilla::start(
        &hub,
        "secure",
        &[
            "--http-auth",
            "kubernetes",
            "--auth-cache-ttl",
            &ttl,
            "--tls-cert-file",
            &cert_arg,
            "--tls-key-file",
            &key_arg,
        ],
    );

    // Probes: plain and open; the views are not on the plain port.
    assert_eq!(flotilla.get("/livez").await.0, 200);
    flotilla.wait_ready(WAIT).await;
    assert_eq!(flotilla.get("/metrics").await.0, 404, "the plain port serves probes only");
    assert_eq!(flotilla.get("/debug/clusters").await.0, 404, "the plain port serves probes only");

    // HTTPS with the mounted certificate.
    let (code, body, chain) = flotilla.https_get("/metrics", None).await;
    assert_eq!((code, chain[0].to_vec()), (401, first.clone()), "no token: {body}");
    let (code, body, _) = flotilla.https_get("/metrics", Some("not-a-token")).await;
    assert_eq!(code, 401, "a token the hub does not know: {body}");
    let (code, body, _) = flotilla.https_get("/metrics", Some(NOBODY.0)).await;
    assert_eq!(code, 403, "a valid token without the role: {body}");
    assert!(body.contains("\"nobody\" may not get /metrics"), "{body}");

    // The reader roles, bound to nobody.
    apply(&hub_client, &reader_role("flotilla-metrics-reader", &["/metrics"])).await;
    // As the chart grants it: the debug views and Admiral's read API beside them.
    let debug_urls = ["/debug", "/debug/*", "/clusters", "/cluster/*", "/identity/*"];
    apply(&hub_client, &reader_role("flotilla-debug-reader", &debug_urls)).await;
    apply(&hub_client, &binding("flotilla-metrics-reader", NOBODY.1)).await;
    let body = eventually("nobody may read /metrics once bound", WAIT, &flotilla, || async {
        let (code, body, _) = flotilla.https_get("/metrics", Some(NOBODY.0)).await;
        (code == 200).then_some(body)
    })
    .await;
    assert!(body.contains("flotilla_passes_total"), "{body}");
    for path in ["/debug/clusters", "/clusters", "/identity/x/serviceentries"] {
        let (code, _, _) = flotilla.https_get(path, Some(NOBODY.0)).await;
        assert_eq!(code, 403, "the metrics role does not grant {path}");
    }
    let (code, _, _) = flotilla.https_get("/clusters", None).await;
    assert_eq!(code, 401, "Admiral's read API needs a token");
    apply(&hub_client, &binding("flotilla-debug-reader", NOBODY.1)).await;
    eventually("nobody may read /debug/clusters/… once bound", WAIT, &flotilla, || async {
        let (code, _, _) = flotilla.https_get("/debug/clusters/none/desired", Some(NOBODY.0)).await;
        (code == 404).then_some(())
    })
    .await;
    // A path not asked before: its denial above is cached for the cache's TTL.
    let (code, body, _) = flotilla.https_get("/identity/y/serviceentries", Some(NOBODY.0)).await;
    assert_eq!((code, body.as_str()), (200, "[]"), "Admiral's read API with the debug role");

    // Removing the role: denied once the hub says so and the cached decision has expired.
    let (code, _, _) = flotilla.https_get("/metrics", Some(NOBODY.0)).await;
    assert_eq!(code, 200);
    let cached_at = tokio::time::Instant::now();
    let bindings: Api<ClusterRoleBinding> = Api::all(hub_client.clone());
    bindings.delete("flotilla-metrics-reader-nobody", &DeleteParams::default()).await.unwrap();
    eventually("the hub denies nobody /metrics", WAIT, &flotilla, || async {
        (!hub_allows(&hub_client, NOBODY.1, "/metrics").await).then_some(())
    })
    .await;
    let hub_denies = tokio::time::Instant::now();
    let (code, _, _) = flotilla.https_get("/metrics", Some(NOBODY.0)).await;
    assert!(code == 200 || cached_at.elapsed() >= CACHE_TTL, "within its TTL the decision is reused: {code}");
    // Any decision cached before the hub denied expires by hub_denies + TTL.
    tokio::time::sleep_until(hub_denies + CACHE_TTL + Duration::from_millis(100)).await;
    let (code, _, _) = flotilla.https_get("/metrics", Some(NOBODY.0)).await;
    assert_eq!(code, 403, "a removed role works no longer than the cache's TTL");
    let (code, _, _) = flotilla.https_get("/debug/clusters", Some(NOBODY.0)).await;
    assert_eq!(code, 200, "the other role still holds");

    // A rotated certificate is served without a restart.
    std::thread::sleep(Duration::from_millis(1100));
    let second = write_cert("second.flotilla.test");
    let (_, _, chain) = flotilla.https_get("/livez", None).await;
    assert_eq!(chain[0].to_vec(), second, "the rotated certificate is served");
    assert_ne!(first, second);
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_and_mismatched_member_credentials_are_reported_while_the_rest_syncs() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["good-1", "other-1"]).await;
    prepare_member(&clients[0], "us-west-2", "10.0.0.1").await;
    let flotilla = Flotilla::start(&hub, "credentials", &[]);

    let good = members[0].admin_kubeconfig();
    // other-1 reached with good-1's CA: its certificate does not match.
    let ca = |m: &testenv::TestCluster| base64::engine::general_purpose::STANDARD.encode(&m.ca_pem);
    let mismatched = members[1].admin_kubeconfig().replace(&ca(&members[1]), &ca(&members[0]));
    assert_ne!(mismatched, members[1].admin_kubeconfig());
    let insecure = members[1]
        .admin_kubeconfig()
        .replace(&format!("certificate-authority-data: {}", ca(&members[1])), "insecure-skip-tls-verify: true");
    assert!(insecure.contains("insecure-skip-tls-verify"));
    apply(
        &hub_client,
        &secret(
            "members",
            "istio/multiCluster",
            &[("good-1", good), ("wrong-ca-1", mismatched), ("insecure-1", insecure)],
        ),
    )
    .await;

    let view = eventually("good-1 synced, the others reported", WAIT, &flotilla, || async {
        let view = flotilla.json("/debug/clusters").await;
        let reported = |id: &str| view["clusters"][id]["lastError"].is_string();
        (view["clusters"]["good-1"]["state"] == "synced" && reported("wrong-ca-1") && reported("insecure-1"))
            .then_some(view)
    })
    .await;
    assert_eq!(view["clusters"]["insecure-1"]["state"], "failed", "{view}");
    let insecure_error = view["clusters"]["insecure-1"]["lastError"].as_str().unwrap();
    assert!(insecure_error.contains("sets insecure-skip-tls-verify"), "{insecure_error}");
    assert_ne!(view["clusters"]["wrong-ca-1"]["state"], "synced", "{view}");
    let mismatch_error = view["clusters"]["wrong-ca-1"]["lastError"].as_str().unwrap().to_lowercase();
    assert!(mismatch_error.contains("certificate"), "the error names the certificate: {mismatch_error}");

    // The rest of the fleet keeps syncing: good-1 gets a workload's objects.
    deploy(&clients[0], "greeting", "greeting").await;
    eventually("greeting's SE in good-1", WAIT, &flotilla, || get_se(&clients[0], "stage.greeting.global-se")).await;

    // The flag lets the insecure one in.
    drop(flotilla);
    let flotilla = Flotilla::start(&hub, "credentials-allowed", &["--allow-insecure-skip-tls-verify"]);
    eventually("insecure-1 synced when allowed", WAIT, &flotilla, || async {
        (flotilla.json("/debug/clusters").await["clusters"]["insecure-1"]["state"] == "synced").then_some(())
    })
    .await;
}
