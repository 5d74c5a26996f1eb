//! The `admiral.io/v1alpha1` policy kinds that flotilla reads, as Rust types.
//!
//! Field names follow Admiral's own CRDs so that every object written for Admiral is accepted
//! unchanged (`lbType: 1` and `lbType: FAILOVER`, snake_case `outlier_detection`, the deprecated
//! `dns` and `identityLabel` fields). The CRD YAML generated from these types is what
//! `flotilla crds` prints and what `crds/` holds. Types only: the rules live in `compute`.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::CustomResourceExt;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "admiral.io";
pub const VERSION: &str = "v1alpha1";

/// Routes clients of one identity+env across regions (Admiral's GTP).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "admiral.io",
    version = "v1alpha1",
    kind = "GlobalTrafficPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "gtp",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct GlobalTrafficPolicySpec {
    /// One entry per host name: the default host (`dnsPrefix` empty, `default` or the env) or a
    /// prefixed one.
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, (has(q.dnsPrefix) ? q.dnsPrefix : '') == (has(p.dnsPrefix) ? p.dnsPrefix : '')))").message("dnsPrefix must be unique within a policy"))]
    pub policy: Vec<TrafficPolicy>,
    /// Admiral's selector: `identity` and `env` keys, used when the policy's own labels do not
    /// carry them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.target) || self.target.all(t, !has(t.weight) || t.weight == 0) || self.target.map(t, has(t.weight) ? t.weight : 0).sum() == 100").message("the non-zero target weights must sum to 100"))]
pub struct TrafficPolicy {
    /// Deprecated by Admiral in favour of `dnsPrefix`; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// `default` (or empty, or the env) configures the default host; any other value adds the
    /// host `<dnsPrefix>.<env>.<identity>.<suffix>`.
    #[serde(rename = "dnsPrefix", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub dns_prefix: Option<String>,
    /// `TOPOLOGY` or `FAILOVER`, or Admiral's integers `0` and `1`.
    #[serde(rename = "lbType", default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("type(self) == int ? self in [0, 1] : self in ['TOPOLOGY', 'FAILOVER', 'topology', 'failover', 'Topology', 'Failover']").message("lbType must be TOPOLOGY, FAILOVER, 0 or 1"))]
    pub lb_type: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub target: Option<Vec<TrafficGroup>>,
    #[serde(rename = "outlier_detection", default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierConfig>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct TrafficGroup {
    #[serde(default)]
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: Option<i32>,
}

/// Admiral's outlier settings, in seconds and counts; a field that is 0 or absent keeps the
/// default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct OutlierConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub base_ejection_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub consecutive_gateway_errors: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub interval: Option<i64>,
}

/// Declares which identities a client identity calls: their config is written where it runs.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "admiral.io",
    version = "v1alpha1",
    kind = "Dependency",
    namespaced,
    status = "PolicyStatus",
    shortname = "dep",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
pub struct DependencySpec {
    /// The client identity.
    #[schemars(length(min = 1))]
    pub source: String,
    /// Accepted for Admiral compatibility; flotilla uses `--identity-label`.
    #[serde(rename = "identityLabel", default, skip_serializing_if = "Option::is_none")]
    pub identity_label: Option<String>,
    /// Destination identities; `*` means every identity.
    #[serde(default)]
    pub destinations: Vec<String>,
}

/// Overrides the outlier detection of one identity+env.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "admiral.io",
    version = "v1alpha1",
    kind = "OutlierDetection",
    namespaced,
    status = "PolicyStatus",
    shortname = "od",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
pub struct OutlierDetectionSpec {
    #[serde(rename = "outlier_config", default, skip_serializing_if = "Option::is_none")]
    pub outlier_config: Option<OutlierConfig>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
}

/// Connection-pool settings of one identity+env, copied into its DestinationRules.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "admiral.io",
    version = "v1alpha1",
    kind = "ClientConnectionConfig",
    namespaced,
    status = "PolicyStatus",
    shortname = "ccc",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
pub struct ClientConnectionConfigSpec {
    #[serde(rename = "connectionPool", default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Accepted for Admiral compatibility; not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Tunnel>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
}

/// Istio's `ConnectionPoolSettings`, as Admiral accepts it (`h2UpgradePolicy` may be an integer).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ConnectionPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSettings>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct TcpKeepalive {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// `DEFAULT`, `DO_NOT_UPGRADE`, `UPGRADE`, or Admiral's integers 0, 1, 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_upgrade_policy: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_client_protocol: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<i32>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tunnel {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<i32>,
}

/// The status flotilla writes on every policy kind. `state` and `clustersSynced` keep the
/// fields Admiral's status had, so dashboards built on them still read something sensible.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Per target cluster: the hosts written there and the last error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters_synced: Option<i32>,
}

/// A `metav1.Condition`, with the timestamp as an RFC 3339 string.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterResult {
    pub cluster: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What a GTP entry's `lbType` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbType {
    Topology,
    Failover,
}

impl TrafficPolicy {
    /// `TOPOLOGY`/`FAILOVER` in any case, or Admiral's 0/1; absent means TOPOLOGY (Admiral's 0).
    pub fn lb_type(&self) -> Result<LbType, String> {
        match &self.lb_type {
            None | Some(IntOrString::Int(0)) => Ok(LbType::Topology),
            Some(IntOrString::Int(1)) => Ok(LbType::Failover),
            Some(IntOrString::String(s)) if s.eq_ignore_ascii_case("TOPOLOGY") || s == "0" => Ok(LbType::Topology),
            Some(IntOrString::String(s)) if s.eq_ignore_ascii_case("FAILOVER") || s == "1" => Ok(LbType::Failover),
            Some(IntOrString::Int(i)) => Err(format!("unknown lbType {i} (use TOPOLOGY, FAILOVER, 0 or 1)")),
            Some(IntOrString::String(s)) => Err(format!("unknown lbType {s:?} (use TOPOLOGY, FAILOVER, 0 or 1)")),
        }
    }

    /// The prefix this entry adds, or None when it configures the default host (`dnsPrefix`
    /// empty, `default`, or equal to the env).
    pub fn host_prefix(&self, env: &str) -> Option<&str> {
        let prefix = self.dns_prefix.as_deref().map(str::trim).unwrap_or("");
        if prefix.is_empty() || prefix.eq_ignore_ascii_case("default") || prefix.eq_ignore_ascii_case(env) {
            None
        } else {
            Some(prefix)
        }
    }
}

/// Istio's name for an `h2UpgradePolicy` given as a name or as Admiral's integer.
pub fn h2_upgrade_policy_name(v: &IntOrString) -> Result<&'static str, String> {
    const NAMES: [&str; 3] = ["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"];
    match v {
        IntOrString::Int(i) if (0..3).contains(i) => Ok(NAMES[*i as usize]),
        IntOrString::String(s) => NAMES.iter().find(|n| n.eq_ignore_ascii_case(s)).copied().ok_or_else(|| {
            format!("connectionPool.http.h2UpgradePolicy {s:?} is not one of DEFAULT, DO_NOT_UPGRADE, UPGRADE")
        }),
        IntOrString::Int(i) => Err(format!("connectionPool.http.h2UpgradePolicy {i} is not 0, 1 or 2")),
    }
}

/// The CRDs flotilla serves, in the order `flotilla crds` prints them.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![ClientConnectionConfig::crd(), Dependency::crd(), GlobalTrafficPolicy::crd(), OutlierDetection::crd()]
}

/// All CRDs as one multi-document YAML stream: the content of `crds/` and of `flotilla crds`.
pub fn crds_yaml() -> String {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&crate::yaml::to_yaml(&crd));
    }
    out
}
