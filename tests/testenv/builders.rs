//! Builders for the objects bare API servers lack (no controllers run there): namespaces, nodes
//! with regions, Services (including the istio-system gateway, whose load-balancer status the
//! test sets itself) and Deployments carrying an identity.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, PodSpec, PodTemplateSpec, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::TEST_MANAGER;

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

pub fn namespace(name: &str) -> Namespace {
    Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() }
}

pub fn node(name: &str, region: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: labels(&[("topology.kubernetes.io/region", region)]),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A ClusterIP Service selecting `app: <name>`, with one port.
pub fn service(namespace: &str, name: &str, port_name: &str, port: i32, target_port: i32) -> Service {
    Service {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() },
        spec: Some(ServiceSpec {
            selector: labels(&[("app", name)]),
            ports: Some(vec![ServicePort {
                name: Some(port_name.into()),
                port,
                target_port: Some(IntOrString::Int(target_port)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The east-west gateway Service; its address is set with `set_load_balancer_ip`.
pub fn gateway_service() -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("istio-eastwestgateway".into()),
            namespace: Some("istio-system".into()),
            labels: labels(&[("istio", "eastwestgateway")]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            selector: labels(&[("istio", "eastwestgateway")]),
            ports: Some(vec![ServicePort {
                name: Some("tls".into()),
                port: 15443,
                target_port: Some(IntOrString::Int(15443)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Deployment whose pods carry `app: <name>`, `identity: <identity>` and env `env`.
pub fn deployment(namespace: &str, name: &str, identity: &str, env: &str) -> Deployment {
    let pod_labels = labels(&[("app", name), ("identity", identity)]);
    Deployment {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() },
        spec: Some(DeploymentSpec {
            selector: LabelSelector { match_labels: labels(&[("app", name)]), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: pod_labels,
                    annotations: labels(&[("admiral.io/env", env)]),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: name.into(),
                        image: Some(format!("registry.example.com/{name}:1")),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Server-side applies `obj` with the harness's field manager (namespaced or cluster-scoped).
pub async fn apply<K>(client: &Client, obj: &K) -> K
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match obj.meta().namespace.as_deref() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let name = obj.meta().name.clone().unwrap_or_default();
    let applied = api
        .patch(&name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(obj))
        .await
        .unwrap_or_else(|e| panic!("applying {} {name}: {e}", K::kind(&())));
    serde_json::from_value(serde_json::to_value(applied).unwrap()).unwrap()
}

/// Sets `status.loadBalancer.ingress[0].ip` of a Service, as a cloud controller would.
pub async fn set_load_balancer_ip(client: &Client, namespace: &str, name: &str, ip: &str) {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let status = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("setting the load-balancer status of {namespace}/{name}: {e}"));
}
