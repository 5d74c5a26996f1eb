//! The shared vocabulary: the names flotilla writes and reads on objects, the kinds it knows, and
//! the small checks every layer needs. The leaf of the crate: it uses nothing else of ours.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The value of `app.kubernetes.io/managed-by` on everything flotilla writes, and its
/// server-side-apply field manager.
pub const MANAGER: &str = "flotilla";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_IDENTITY: &str = "flotilla.io/identity";
pub const LABEL_ENV: &str = "flotilla.io/env";
/// Which installation of flotilla wrote an object (`--instance`): two installations that share a
/// member never update or prune each other's objects.
pub const LABEL_INSTANCE: &str = "flotilla.io/instance";
/// The instance of an installation that does not name one.
pub const DEFAULT_INSTANCE: &str = "flotilla";

/// Admiral's names, read on workloads, Services, Namespaces and policies.
pub const ANNOTATION_ENV: &str = "admiral.io/env";
pub const LABEL_IGNORE: &str = "admiral.io/ignore";
pub const ANNOTATION_INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const LABEL_PRIORITY: &str = "priority";
/// What Admiral writes on every object it creates: the objects `--adopt-from=admiral` takes over.
pub const ANNOTATION_CREATED_BY: &str = "app.kubernetes.io/created-by";
pub const ADMIRAL: &str = "admiral";
pub const DEFAULT_ENV: &str = "default";

pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
pub const LABEL_REGION_LEGACY: &str = "failure-domain.beta.kubernetes.io/region";
/// Where the gateway Services live, and a namespace every Sidecar lets through.
pub const GATEWAY_NAMESPACE: &str = "istio-system";
/// Istio's endpoint label that turns on mTLS towards a remote gateway.
pub const LABEL_TLS_MODE: &str = "security.istio.io/tlsMode";

/// Annotations of a registration Secret that override discovery for its clusters.
pub const ANNOTATION_REGION: &str = "flotilla.io/region";
pub const ANNOTATION_GATEWAY_ADDRESS: &str = "flotilla.io/gateway-address";
pub const ANNOTATION_GATEWAY_PORT: &str = "flotilla.io/gateway-port";
/// On a registration Secret: stop writing to its members (`"true"`); they are still watched.
pub const ANNOTATION_PAUSED: &str = "flotilla.io/paused";
/// On a registration Secret: `"true"` moves traffic away from the member's endpoints, in every
/// member, wherever another member serves the same host (docs/operations.md, "Brakes").
pub const ANNOTATION_DRAIN: &str = "flotilla.io/drain";
/// On a registration Secret: the ids of prune holds (the blast-radius guard) to let go.
pub const ANNOTATION_RELEASE_PRUNES: &str = "flotilla.io/release-prunes";
/// The SPIFFE trust domain of a member's workload certificates, where it is not `--trust-domain`.
pub const ANNOTATION_TRUST_DOMAIN: &str = "flotilla.io/trust-domain";
/// On a member's Namespace: the identities its workloads may serve (comma-separated, `*` any).
/// Set by platform teams; with `--tenancy=owned` nothing else may speak for an identity.
pub const ANNOTATION_IDENTITIES: &str = "flotilla.io/identities";

/// A SPIFFE trust domain: lower-case letters, digits, '.', '-' and '_' (the SPIFFE ID spec).
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
}

/// The pseudo cluster id under which Dependencies kept in a hub that is not a member are stored.
/// Not a DNS label, so it can never collide with a member's id.
pub const HUB: &str = "_hub";

/// Every kind flotilla reads or writes. Declared in alphabetical order: the order of written
/// objects (all of one apiVersion) is the order of their kinds' names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Kind {
    ClientConnectionConfig,
    CronJob,
    Dependency,
    Deployment,
    DestinationRule,
    GlobalTrafficPolicy,
    Job,
    Namespace,
    Node,
    OutlierDetection,
    Rollout,
    Service,
    ServiceEntry,
    Sidecar,
    VirtualService,
}

impl Kind {
    /// The kinds flotilla writes into members.
    pub const OUTPUTS: [Kind; 4] = [Kind::DestinationRule, Kind::ServiceEntry, Kind::Sidecar, Kind::VirtualService];
    /// The policy kinds, which carry a status flotilla writes.
    pub const POLICIES: [Kind; 4] =
        [Kind::ClientConnectionConfig, Kind::Dependency, Kind::GlobalTrafficPolicy, Kind::OutlierDetection];

    pub fn is_output(self) -> bool {
        Self::OUTPUTS.contains(&self)
    }

    pub fn is_policy(self) -> bool {
        Self::POLICIES.contains(&self)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

pub fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.labels.as_ref().and_then(|l| l.get(key))
}

pub fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.annotations.as_ref().and_then(|a| a.get(key))
}

/// Whether an object carries flotilla's managed-by label (of any installation).
pub fn is_managed(meta: &ObjectMeta) -> bool {
    label(meta, LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGER)
}

/// Whether an object is this installation's: managed by flotilla and labelled with `instance`,
/// or with no instance at all (written before instances existed: adopted in place, and labelled
/// at its next write). The only objects an installation ever modifies or prunes.
pub fn is_ours(meta: &ObjectMeta, instance: &str) -> bool {
    is_managed(meta) && label(meta, LABEL_INSTANCE).is_none_or(|i| i == instance)
}

/// Whether Admiral created the object (`app.kubernetes.io/created-by: admiral`).
pub fn is_admirals(meta: &ObjectMeta) -> bool {
    annotation(meta, ANNOTATION_CREATED_BY).map(String::as_str) == Some(ADMIRAL)
}

/// Admiral's and nobody else's: created by Admiral, and no tool (flotilla, Helm, Argo CD, …)
/// claims it with `app.kubernetes.io/managed-by`. The objects `--adopt-from=admiral` takes over.
pub fn is_admirals_alone(meta: &ObjectMeta) -> bool {
    is_admirals(meta) && label(meta, LABEL_MANAGED_BY).is_none()
}

/// `admiral.io/ignore: "true"` as a label or an annotation.
pub fn has_ignore(meta: &ObjectMeta) -> bool {
    let truthy = |v: Option<&String>| v.is_some_and(|v| v.eq_ignore_ascii_case("true"));
    truthy(label(meta, LABEL_IGNORE)) || truthy(annotation(meta, LABEL_IGNORE))
}

/// The labels on every object flotilla writes.
pub fn managed_labels(identity: &str, env: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_IDENTITY.to_string(), identity.to_string()),
        (LABEL_ENV.to_string(), env.to_string()),
        (LABEL_INSTANCE.to_string(), instance.to_string()),
    ])
}

/// RFC 1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric, ≤ 63.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: dot-separated labels, ≤ 253 in all (the rule for object names).
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name of 1–63
/// alphanumerics, '-', '_' and '.', starting and ending alphanumeric.
pub fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let b = name.as_bytes();
    prefix.is_none_or(is_dns_subdomain)
        && !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// FNV-1a: a fixed, platform-independent hash (std's hasher is randomised per process), for
/// choices that must be the same in every process: a host's first VIP candidate.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The first non-empty line of an error message, without a leading `error: `: what a one-line
/// report about a broken input shows.
pub fn first_line(s: &str) -> String {
    let line = s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or(s.trim());
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// A parser's message with every quoted value blanked out: serde says `invalid type: string
/// "…", expected a boolean`, and the value in quotes may be a token typed into the wrong field.
/// What stays (the field, the line, what was expected) is enough to find the mistake.
pub fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None if matches!(c, '"' | '`' | '\'') => {
                out.push(c);
                open = Some(c);
            }
            None => out.push(c),
        }
    }
    if open.is_some() {
        out.push('…');
    }
    out
}

/// An error and its causes on one line, `outer: cause: root`, each said once: a TLS failure
/// shows as "… client error (Connect): invalid peer certificate: UnknownIssuer", not "connect".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_name_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("invalid peer certificate: UnknownIssuer"));
        assert_eq!(error_chain(&e), "client error (Connect): invalid peer certificate: UnknownIssuer");
        #[derive(Debug, thiserror::Error)]
        #[error("list failed: {0}")]
        struct Repeats(#[source] std::io::Error);
        assert_eq!(error_chain(&Repeats(std::io::Error::other("refused"))), "list failed: refused");
    }

    #[test]
    fn kinds_order_like_their_names() {
        let all = [
            Kind::ClientConnectionConfig,
            Kind::CronJob,
            Kind::Dependency,
            Kind::Deployment,
            Kind::DestinationRule,
            Kind::GlobalTrafficPolicy,
            Kind::Job,
            Kind::Namespace,
            Kind::Node,
            Kind::OutlierDetection,
            Kind::Rollout,
            Kind::Service,
            Kind::ServiceEntry,
            Kind::Sidecar,
            Kind::VirtualService,
        ];
        let mut by_name = all;
        by_name.sort_by_key(|k| k.to_string());
        assert_eq!(by_name, all);
    }

    #[test]
    fn dns_names_and_first_lines() {
        assert!(is_dns_label("a-1") && !is_dns_label("-a") && !is_dns_label("A") && !is_dns_label(""));
        assert!(is_dns_subdomain("stage.greeting.global") && !is_dns_subdomain("a..b"));
        assert_eq!(first_line("\n  error: bad thing\nmore"), "bad thing");
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    }
}
