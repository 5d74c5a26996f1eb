//! Policy rules: what makes a policy valid, and which of several competing policies wins.

use std::cmp::Reverse;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{ClientConnectionConfigSpec, GlobalTrafficPolicySpec, TrafficPolicy};
use crate::model::Policy;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbType {
    Topology,
    Failover,
}

/// `TOPOLOGY`/`FAILOVER` in any case, or Admiral's 0/1; absent means TOPOLOGY (Admiral's 0).
pub fn lb_type(p: &TrafficPolicy) -> Result<LbType, String> {
    match &p.lb_type {
        None => Ok(LbType::Topology),
        Some(IntOrString::Int(0)) => Ok(LbType::Topology),
        Some(IntOrString::Int(1)) => Ok(LbType::Failover),
        Some(IntOrString::String(s)) if s.eq_ignore_ascii_case("TOPOLOGY") || s == "0" => Ok(LbType::Topology),
        Some(IntOrString::String(s)) if s.eq_ignore_ascii_case("FAILOVER") || s == "1" => Ok(LbType::Failover),
        Some(IntOrString::Int(i)) => Err(format!("unknown lbType {i} (use TOPOLOGY, FAILOVER, 0 or 1)")),
        Some(IntOrString::String(s)) => Err(format!("unknown lbType {s:?} (use TOPOLOGY, FAILOVER, 0 or 1)")),
    }
}

/// The prefix a policy entry adds, or None when it configures the default host
/// (`dnsPrefix` empty, `default`, or equal to the env).
pub fn host_prefix<'a>(p: &'a TrafficPolicy, env: &str) -> Option<&'a str> {
    let prefix = p.dns_prefix.as_deref().map(str::trim).unwrap_or("");
    if prefix.is_empty() || prefix.eq_ignore_ascii_case("default") || prefix.eq_ignore_ascii_case(env) {
        None
    } else {
        Some(prefix)
    }
}

/// Checks the rules that the CRD schema cannot express (or that objects written before the
/// schema existed may break). The first broken rule is the reason.
pub fn validate_gtp(spec: &GlobalTrafficPolicySpec, env: &str) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in spec.policy.iter().enumerate() {
        let at = format!("spec.policy[{i}]");
        let lb = lb_type(p).map_err(|e| format!("{at}: {e}"))?;
        let prefix = host_prefix(p, env).map(str::to_ascii_lowercase);
        if let Some(pre) = &prefix
            && !is_dns_label(pre)
        {
            return Err(format!("{at}: dnsPrefix {pre:?} is not a DNS label (a-z, 0-9, '-', at most 63)"));
        }
        if !seen.insert(prefix.clone()) {
            let shown = prefix.unwrap_or_else(|| "default".into());
            return Err(format!(
                "{at}: dnsPrefix {shown:?} appears twice (\"\", \"default\" and the env all mean the default host)"
            ));
        }
        let targets = p.target.as_deref().unwrap_or_default();
        let mut sum = 0i64;
        let mut regions = std::collections::BTreeSet::new();
        for (j, t) in targets.iter().enumerate() {
            if !regions.insert(t.region.trim()) {
                return Err(format!("{at}.target[{j}]: region {:?} appears twice", t.region.trim()));
            }
            let w = t.weight.unwrap_or(0);
            if !(0..=100).contains(&w) {
                return Err(format!("{at}.target[{j}]: weight {w} is outside 0..100"));
            }
            if t.region.trim().is_empty() {
                return Err(format!("{at}.target[{j}]: region is empty"));
            }
            sum += i64::from(w);
        }
        if sum != 0 && sum != 100 {
            return Err(format!("{at}: target weights sum to {sum}, not 100"));
        }
        if lb == LbType::Failover && sum == 0 {
            return Err(format!("{at}: FAILOVER needs targets whose weights sum to 100"));
        }
    }
    Ok(())
}

pub fn validate_connection_config(spec: &ClientConnectionConfigSpec) -> Result<(), String> {
    let h2 = spec.connection_pool.as_ref().and_then(|c| c.http.as_ref()).and_then(|h| h.h2_upgrade_policy.as_ref());
    match h2 {
        None => Ok(()),
        Some(v) => h2_upgrade_policy_name(v).map(|_| ()),
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

/// Orders competing policies best first: highest priority (when it counts), newest, then name,
/// namespace and cluster so that the order is total and never depends on input order.
pub fn rank<S>(candidates: &mut [&Policy<S>], use_priority: bool) {
    candidates.sort_by(|a, b| {
        let pa = if use_priority { a.priority } else { 0 };
        let pb = if use_priority { b.priority } else { 0 };
        Reverse(pa)
            .cmp(&Reverse(pb))
            .then_with(|| Reverse(a.created).cmp(&Reverse(b.created)))
            .then_with(|| a.at.name.cmp(&b.at.name))
            .then_with(|| a.at.namespace.cmp(&b.at.namespace))
            .then_with(|| a.at.cluster.cmp(&b.at.cluster))
    });
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
