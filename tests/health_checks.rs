//! The Argo CD health check shipped with the chart (charts/flotilla/health/policy.lua), run by a
//! real Lua interpreter on the statuses flotilla writes, and the same statuses judged by Flux's
//! kstatus rules (Ready and observedGeneration).

use std::collections::BTreeMap;

use flotilla::compute::status::policy_status;
use flotilla::compute::{PolicyReport, PolicyState};
use flotilla::crd::PolicyStatus;
use flotilla::meta::Kind;
use flotilla::model::ObjectRef;
use mlua::LuaSerdeExt;
use serde_json::{Value, json};

fn report(state: PolicyState, generation: i64) -> PolicyReport {
    let at = ObjectRef { cluster: "west".into(), namespace: "app".into(), name: "gtp".into() };
    PolicyReport {
        kind: Kind::GlobalTrafficPolicy,
        at,
        generation: Some(generation),
        state,
        clusters: BTreeMap::new(),
        message: String::new(),
        sidecar: None,
    }
}

/// A GTP at `generation` carrying `status`, as Argo CD hands it to a health check.
fn object(generation: i64, status: Option<&PolicyStatus>) -> Value {
    let mut obj = json!({
        "apiVersion": "admiral.io/v1alpha1", "kind": "GlobalTrafficPolicy",
        "metadata": {"name": "gtp", "namespace": "app", "generation": generation},
        "spec": {"policy": []},
    });
    if let Some(status) = status {
        obj["status"] = serde_json::to_value(status).unwrap();
    }
    obj
}

/// Runs the health check on `obj`: (status, message).
fn health(obj: &Value) -> (String, String) {
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/charts/flotilla/health/policy.lua")).unwrap();
    let lua = mlua::Lua::new();
    let value = lua.to_value(obj).unwrap();
    lua.globals().set("obj", value).unwrap();
    let hs: mlua::Table = lua.load(&script).eval().unwrap_or_else(|e| panic!("the health check fails on {obj}: {e}"));
    (hs.get("status").unwrap(), hs.get::<Option<String>>("message").unwrap().unwrap_or_default())
}

/// Flux's kstatus verdict for a custom resource: Current once the controller has seen the
/// generation and says Ready; InProgress while it has not; Failed when Stalled.
fn kstatus(obj: &Value) -> &'static str {
    let status = &obj["status"];
    if status.is_null() || status["observedGeneration"] != obj["metadata"]["generation"] {
        return "InProgress";
    }
    let condition = |t: &str| {
        status["conditions"].as_array().and_then(|cs| cs.iter().find(|c| c["type"] == t)).map(|c| c["status"].clone())
    };
    if condition("Stalled") == Some(json!("True")) {
        return "Failed";
    }
    if condition("Reconciling") == Some(json!("True")) {
        return "InProgress";
    }
    match condition("Ready") {
        Some(s) if s == json!("True") => "Current",
        _ => "InProgress",
    }
}

#[test]
fn argo_cd_and_flux_read_flotillas_statuses() {
    let winner = ObjectRef { cluster: "west".into(), namespace: "app".into(), name: "newer".into() };
    let cases = [
        (PolicyState::Ready, 3, "Healthy", "Current"),
        (PolicyState::Conflict(winner), 3, "Degraded", "InProgress"),
        (PolicyState::Invalid("target weights sum to 90, not 100".into()), 3, "Degraded", "InProgress"),
        (PolicyState::NotApplied("no workload of identity \"x\"".into()), 3, "Degraded", "InProgress"),
    ];
    for (state, generation, argo, flux) in cases {
        let what = format!("{state:?}");
        let status = policy_status(&report(state, generation), &BTreeMap::new(), None, "2026-12-02T00:00:00Z");
        let obj = object(generation, Some(&status));
        let (hs, message) = health(&obj);
        assert_eq!(hs, argo, "{what}: {message}");
        assert!(!message.is_empty(), "{what}: a message for people");
        assert_eq!(kstatus(&obj), flux, "{what}");
        // A newer generation than flotilla has seen is still progressing, for both.
        let ahead = object(generation + 1, Some(&status));
        assert_eq!(health(&ahead).0, "Progressing", "{what}");
        assert_eq!(kstatus(&ahead), "InProgress", "{what}");
    }
    assert_eq!(health(&object(1, None)).0, "Progressing", "no status yet");
    let (hs, message) = health(&object(
        3,
        Some(&policy_status(&report(PolicyState::Invalid("bad prefix".into()), 3), &BTreeMap::new(), None, "t")),
    ));
    assert_eq!((hs.as_str(), message.as_str()), ("Degraded", "Invalid: bad prefix"));
}
