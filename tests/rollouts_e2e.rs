//! Argo Rollouts on real API servers: a blue-green Rollout gives both hosts in its cluster and a
//! client's; swapping active and preview moves the endpoints without deleting the hosts; editing
//! a canary's VirtualService moves its endpoint weights; deleting the Rollout removes exactly its
//! objects; a member without the Rollout CRD keeps syncing Deployments, and picks Rollouts up
//! once the CRD is installed, without a restart.

mod testenv;

use flotilla::argo::{Rollout, VirtualService};
use flotilla::istio::ServiceEntry;
use kube::api::DeleteParams;
use kube::{Api, Client};
use serde_json::json;
use testenv::TestCluster;
use testenv::builders::{apply, namespace};
use testenv::controller::{Flotilla, eventually};
use testenv::fleet::*;

fn blue_green(ns: &str, identity: &str, active: &str, preview: &str) -> Rollout {
    rollout(ns, identity, json!({"blueGreen": {"activeService": active, "previewService": preview}}))
}

fn canary(ns: &str, identity: &str) -> Rollout {
    rollout(
        ns,
        identity,
        json!({"canary": {
            "stableService": format!("{identity}-stable"), "canaryService": format!("{identity}-canary"),
            "trafficRouting": {"istio": {"virtualService": {"name": format!("{identity}-vs"), "routes": ["primary"]}}},
        }}),
    )
}

fn rollout(ns: &str, identity: &str, strategy: serde_json::Value) -> Rollout {
    serde_json::from_value(json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": identity, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": identity}},
            "template": {
                "metadata": {"labels": {"app": identity, "identity": identity}, "annotations": {"admiral.io/env": "stage"}},
                "spec": {"containers": [{"name": "app", "image": format!("example.com/{identity}:1")}]},
            },
            "strategy": strategy,
        },
    }))
    .unwrap()
}

/// A Service selecting the Rollout's pods, pinned to a ReplicaSet as Argo pins it.
fn rollout_service(ns: &str, name: &str, app: &str) -> k8s_openapi::api::core::v1::Service {
    let mut s = testenv::builders::service(ns, name, "http", 80, 8080);
    s.spec.as_mut().unwrap().selector = Some(
        [("app".to_string(), app.to_string()), ("rollouts-pod-template-hash".to_string(), "5f7d8b9c6".to_string())]
            .into(),
    );
    s
}

fn virtual_service(ns: &str, name: &str, stable: (&str, i32), canary: (&str, i32)) -> VirtualService {
    serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"hosts": [format!("{name}.example.com")], "http": [{"name": "primary", "route": [
            {"destination": {"host": stable.0}, "weight": stable.1},
            {"destination": {"host": canary.0}, "weight": canary.1},
        ]}]},
    }))
    .unwrap()
}

/// (address, weight) of each endpoint.
fn endpoints_of(se: &ServiceEntry) -> Vec<(String, Option<u32>)> {
    se.spec.endpoints.iter().map(|e| (e.address.clone(), e.weight)).collect()
}

async fn se_where(client: &Client, name: &str, want: Vec<(&str, Option<u32>)>) -> Option<ServiceEntry> {
    let se = get_se(client, name).await?;
    let have = endpoints_of(&se);
    (have.iter().map(|(a, w)| (a.as_str(), *w)).collect::<Vec<_>>() == want).then_some(se)
}

#[tokio::test(flavor = "multi_thread")]
async fn rollouts_are_federated_and_follow_their_strategy() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["ro-west", "ro-east"]).await;
    let plain = TestCluster::start_without_rollouts("ro-plain").await;
    let plain_client = plain.client().await;
    let (west, east) = (&clients[0], &clients[1]);
    prepare_member(west, "us-west-2", "10.0.5.1").await;
    prepare_member(east, "us-east-2", "10.0.5.2").await;
    prepare_member(&plain_client, "eu-north-1", "10.0.5.3").await;
    let flotilla = Flotilla::start(&hub, "rollouts", &[]);
    let mut kubeconfigs: Vec<(&str, String)> =
        members.iter().map(|m| (m.name.as_str(), m.admin_kubeconfig())).collect();
    kubeconfigs.push((plain.name.as_str(), plain.admin_kubeconfig()));
    apply(&hub_client, &secret("members", "istio/multiCluster", &kubeconfigs)).await;

    // A member without the Rollout CRD: synced, and its Deployments federated.
    deploy(&plain_client, "legacy", "legacy").await;
    eventually("legacy's ServiceEntry in the member without Rollouts", WAIT, &flotilla, || {
        get_se(&plain_client, "stage.legacy.global-se")
    })
    .await;

    // Blue-green greeting in west; its client caller in east.
    apply(west, &namespace("greeting")).await;
    for svc in ["greeting-blue", "greeting-green"] {
        apply(west, &rollout_service("greeting", svc, "greeting")).await;
    }
    apply(west, &blue_green("greeting", "greeting", "greeting-blue", "greeting-green")).await;
    deploy(east, "caller", "caller").await;
    apply(east, &dependency("caller", "caller-deps", "caller", &["greeting"])).await;
    let active = eventually("the default host on the active Service in west", WAIT, &flotilla, || {
        se_where(west, "stage.greeting.global-se", vec![("greeting-blue.greeting.svc.cluster.local", None)])
    })
    .await;
    eventually("the preview host on the preview Service in west", WAIT, &flotilla, || {
        se_where(west, "preview.stage.greeting.global-se", vec![("greeting-green.greeting.svc.cluster.local", None)])
    })
    .await;
    for host in ["stage.greeting.global-se", "preview.stage.greeting.global-se"] {
        eventually(&format!("{host} in the client's member"), WAIT, &flotilla, || {
            se_where(east, host, vec![("10.0.5.1", None)])
        })
        .await;
    }

    // Promotion: active and preview swap; the hosts stay (same objects), the endpoints move.
    apply(west, &blue_green("greeting", "greeting", "greeting-green", "greeting-blue")).await;
    let promoted = eventually("the default host on the new active Service", WAIT, &flotilla, || {
        se_where(west, "stage.greeting.global-se", vec![("greeting-green.greeting.svc.cluster.local", None)])
    })
    .await;
    assert_eq!(promoted.metadata.uid, active.metadata.uid, "the host's ServiceEntry was updated, not recreated");
    eventually("the preview host on the old active Service", WAIT, &flotilla, || {
        se_where(west, "preview.stage.greeting.global-se", vec![("greeting-blue.greeting.svc.cluster.local", None)])
    })
    .await;

    // A canary with Istio routing: weights from its VirtualService, and they follow it.
    apply(west, &namespace("payments")).await;
    for svc in ["payments-stable", "payments-canary"] {
        apply(west, &rollout_service("payments", svc, "payments")).await;
    }
    apply(west, &virtual_service("payments", "payments-vs", ("payments-stable", 90), ("payments-canary", 10))).await;
    apply(west, &canary("payments", "payments")).await;
    let weighted = |stable: u32, canary: u32| {
        vec![
            ("payments-stable.payments.svc.cluster.local", Some(stable)),
            ("payments-canary.payments.svc.cluster.local", Some(canary)),
        ]
    };
    eventually("weights 90/10 on payments' default host", WAIT, &flotilla, || {
        se_where(west, "stage.payments.global-se", weighted(90, 10))
    })
    .await;
    eventually("payments' canary host", WAIT, &flotilla, || {
        se_where(west, "canary.stage.payments.global-se", vec![("payments-canary.payments.svc.cluster.local", None)])
    })
    .await;
    apply(west, &virtual_service("payments", "payments-vs", ("payments-stable", 70), ("payments-canary", 30))).await;
    eventually("weights 70/30 after the VirtualService edit", WAIT, &flotilla, || {
        se_where(west, "stage.payments.global-se", weighted(70, 30))
    })
    .await;

    // Deleting the blue-green Rollout removes exactly its objects.
    Api::<Rollout>::namespaced(west.clone(), "greeting").delete("greeting", &DeleteParams::default()).await.unwrap();
    for client in [west, east] {
        eventually("greeting's hosts gone", WAIT, &flotilla, || async {
            let gone = get_se(client, "stage.greeting.global-se").await.is_none()
                && get_se(client, "preview.stage.greeting.global-se").await.is_none()
                && get_dr(client, "stage.greeting.global-default-dr").await.is_none()
                && get_dr(client, "preview.stage.greeting.global-default-dr").await.is_none();
            gone.then_some(())
        })
        .await;
    }
    assert!(get_se(west, "stage.payments.global-se").await.is_some(), "payments stays");

    // The Rollout CRD arrives in the member that had none: its Rollouts are picked up live.
    assert_eq!(flotilla.json("/debug/clusters").await["clusters"]["ro-plain"]["state"], "synced");
    plain.install_crds(true).await;
    apply(&plain_client, &namespace("late")).await;
    apply(&plain_client, &rollout_service("late", "late-active", "late")).await;
    apply(&plain_client, &rollout("late", "late", json!({"blueGreen": {"activeService": "late-active"}}))).await;
    eventually("a Rollout in the member whose CRD came late", WAIT, &flotilla, || {
        se_where(&plain_client, "stage.late.global-se", vec![("late-active.late.svc.cluster.local", None)])
    })
    .await;
}
