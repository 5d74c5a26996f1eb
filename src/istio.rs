//! The Istio `networking.istio.io/v1` objects flotilla writes, with only the fields it sets.
//!
//! Every optional field is skipped when empty, so that server-side apply claims exactly the fields
//! flotilla owns and nothing else. Checked against Istio's own CRD schemas by the end-to-end tests.

use std::borrow::Cow;
use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

use crate::crd::ConnectionPool;

pub const API_VERSION: &str = "networking.istio.io/v1";

/// A string that is one of a few fixed words (`DNS`, `MESH_INTERNAL`, `ISTIO_MUTUAL`, a protocol
/// name, the TLS-mode label): a constant, not an allocation, in every object flotilla builds
/// (a full compute builds tens of thousands); owned only when read from a cluster.
pub type Word = Cow<'static, str>;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "ServiceEntry",
    namespaced,
    schema = "disabled",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    // Required fields still default on input: objects read back from clusters (or a user's own)
    // may lack them, and must parse so that they can be compared or reported as conflicts.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub location: Word,
    #[serde(default)]
    pub resolution: Word,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// The SPIFFE ids a client accepts on the endpoints' certificates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
// Proto3 JSON leaves out zero values, so every field may be missing.
#[serde(default)]
pub struct ServicePort {
    pub number: u32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: Word,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
// Proto3 JSON leaves out zero values, so every field may be missing.
#[serde(default)]
pub struct WorkloadEntry {
    pub address: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<Word, Word>,
    /// A canary's share, among the local endpoints of one cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "DestinationRule",
    namespaced,
    schema = "disabled",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
    /// Istio's `ConnectionPoolSettings`; `h2UpgradePolicy` is always written as a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
// Proto3 JSON leaves out zero values, so every field may be missing.
#[serde(default)]
pub struct ClientTls {
    pub mode: Word,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
// Proto3 JSON leaves out zero values, so every field may be missing.
#[serde(default)]
pub struct LoadBalancer {
    pub simple: Word,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb_setting: Option<LocalityLbSetting>,
    /// A duration, e.g. `45s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_duration_secs: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct LocalityLbSetting {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distribute: Vec<Distribute>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
// Proto3 JSON leaves out zero values, so every field may be missing.
#[serde(default)]
pub struct Distribute {
    pub from: String,
    pub to: BTreeMap<String, u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
// Proto3 JSON leaves out zero values, so every field may be missing.
#[serde(default)]
pub struct OutlierDetection {
    pub consecutive_gateway_errors: u32,
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: u32,
    pub interval: String,
    pub base_ejection_time: String,
    pub max_ejection_percent: u32,
}

/// A VirtualService: read for a canary Rollout's weights (its HTTP routes), written as the alias
/// of a host under another suffix (`--additional-endpoint-suffix`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "VirtualService",
    namespaced,
    schema = "disabled",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct HttpRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteDestination>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RouteDestination {
    #[serde(default)]
    pub destination: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Destination {
    #[serde(default)]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PortSelector {
    #[serde(default)]
    pub number: u32,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "Sidecar",
    namespaced,
    schema = "disabled",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressListener>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EgressListener {
    #[serde(default)]
    pub hosts: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Istio's own tools write proto3 JSON, which leaves out zero values: such an object must
    /// decode, or one DestinationRule would stop the watch of its whole kind in a member.
    #[test]
    fn objects_without_their_zero_fields_decode() {
        let dr: DestinationRule = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "a", "namespace": "admiral-sync"},
            "spec": {"host": "a.global", "trafficPolicy": {
                "outlierDetection": {"consecutive5xxErrors": 3, "interval": "10s"},
                "loadBalancer": {"localityLbSetting": {"distribute": [{"from": "us-west-2/*"}]}},
                "tls": {}
            }}
        }))
        .expect("a DestinationRule without its zero fields");
        let policy = dr.spec.traffic_policy.expect("a traffic policy");
        let od = policy.outlier_detection.expect("outlier detection");
        assert_eq!((od.consecutive_gateway_errors, od.consecutive_5xx_errors), (0, 3));
        assert_eq!(policy.load_balancer.expect("a load balancer").simple, "");
        let se: ServiceEntry = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "a", "namespace": "admiral-sync"},
            "spec": {"hosts": ["a.global"], "ports": [{"name": "http"}], "endpoints": [{"locality": "x"}]}
        }))
        .expect("a ServiceEntry without its zero fields");
        assert_eq!(se.spec.ports[0].number, 0);
    }
}
