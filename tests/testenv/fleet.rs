//! A fleet for end-to-end tests: a hub and members, the objects bare API servers lack, and the
//! policies and Secrets tests write, in one place.

use std::time::Duration;

use flotilla::crd::{Dependency, GlobalTrafficPolicy};
use flotilla::istio::{DestinationRule, ServiceEntry};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use serde_json::json;

use super::builders::{apply, deployment, gateway_service, namespace, node, service, set_load_balancer_ip};
use super::controller::{FLOTILLA_NAMESPACE, Flotilla, eventually};
use super::{TestCluster, start_clusters};

pub const SYNC: &str = "admiral-sync";
pub const WAIT: Duration = super::PATIENCE;

/// Nodes with a region and an east-west gateway with an address, as a real member has.
pub async fn prepare_member(client: &Client, region: &str, gateway_ip: &str) {
    apply(client, &node("node-1", region)).await;
    apply(client, &namespace("istio-system")).await;
    apply(client, &gateway_service()).await;
    set_load_balancer_ip(client, "istio-system", "istio-eastwestgateway", gateway_ip).await;
}

/// A namespace with a Deployment and its Service for `identity` (env stage).
pub async fn deploy(client: &Client, ns: &str, identity: &str) {
    apply(client, &namespace(ns)).await;
    apply(client, &deployment(ns, identity, identity, "stage")).await;
    apply(client, &service(ns, identity, "http", 80, 8080)).await;
}

/// The usual two members: greeting served in west (us-west-2, gateway 10.0.0.1), its client
/// caller in east (us-east-2, gateway 10.0.0.2) with a Dependency on it kept next to it.
pub async fn greeting_and_caller(west: &Client, east: &Client) {
    prepare_member(west, "us-west-2", "10.0.0.1").await;
    prepare_member(east, "us-east-2", "10.0.0.2").await;
    deploy(west, "greeting", "greeting").await;
    deploy(east, "caller", "caller").await;
    apply(east, &dependency("caller", "caller-deps", "caller", &["greeting"])).await;
}

/// A CronJob whose pods carry `identity` (env stage): a client that only calls others.
pub fn cron_job(ns: &str, name: &str, identity: &str) -> k8s_openapi::api::batch::v1::CronJob {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {
            "metadata": {"labels": {"identity": identity}, "annotations": {"admiral.io/env": "stage"}},
            "spec": {"restartPolicy": "OnFailure", "containers": [{"name": name, "image": format!("example/{name}:1")}]},
        }}}},
    }))
    .unwrap()
}

pub fn dependency(ns: &str, name: &str, source: &str, destinations: &[&str]) -> Dependency {
    serde_json::from_value(json!({
        "apiVersion": "admiral.io/v1alpha1", "kind": "Dependency",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"source": source, "destinations": destinations},
    }))
    .unwrap()
}

pub fn gtp(ns: &str, name: &str, identity: &str, policies: serde_json::Value) -> GlobalTrafficPolicy {
    serde_json::from_value(json!({
        "apiVersion": "admiral.io/v1alpha1", "kind": "GlobalTrafficPolicy",
        "metadata": {"name": name, "namespace": ns, "labels": {"identity": identity, "env": "stage"}},
        "spec": {"policy": policies},
    }))
    .unwrap()
}

pub async fn get_se(client: &Client, name: &str) -> Option<ServiceEntry> {
    Api::<ServiceEntry>::namespaced(client.clone(), SYNC).get_opt(name).await.unwrap()
}

pub async fn get_dr(client: &Client, name: &str) -> Option<DestinationRule> {
    Api::<DestinationRule>::namespaced(client.clone(), SYNC).get_opt(name).await.unwrap()
}

pub fn endpoints(se: &ServiceEntry) -> Vec<String> {
    se.spec.endpoints.iter().map(|e| e.address.clone()).collect()
}

pub fn distribute(dr: &DestinationRule) -> serde_json::Value {
    let v = serde_json::to_value(&dr.spec).unwrap();
    v["trafficPolicy"]["loadBalancer"]["localityLbSetting"]["distribute"].clone()
}

/// A Secret in the hub holding one kubeconfig per cluster, labelled in one of both formats.
pub fn secret(name: &str, label: &str, clusters: &[(&str, String)]) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": FLOTILLA_NAMESPACE, "labels": {label: "true"}},
        "stringData": clusters.iter().map(|(c, k)| (c.to_string(), json!(k))).collect::<serde_json::Map<_, _>>(),
    }))
    .unwrap()
}

/// Waits until the replica leads and the fleet holds exactly what it wants (see `View::converged`).
pub async fn converged(flotilla: &Flotilla) {
    eventually("the fleet converged", WAIT, flotilla, || async {
        (flotilla.json("/debug/clusters").await["converged"] == true).then_some(())
    })
    .await;
}

/// One fleet at a time: three fleets of API servers starting at once on two cores time out.
pub static ONE_FLEET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn start_fleet(members: &[&str]) -> (TestCluster, Vec<TestCluster>, Client, Vec<Client>) {
    let mut names = vec!["hub"];
    names.extend(members);
    let mut clusters = start_clusters(&names).await;
    let members = clusters.split_off(1);
    let hub = clusters.pop().unwrap();
    let hub_client = hub.client().await;
    apply(&hub_client, &namespace(FLOTILLA_NAMESPACE)).await;
    let clients = futures::future::join_all(members.iter().map(|m| m.client())).await;
    (hub, members, hub_client, clients)
}
