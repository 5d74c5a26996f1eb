//! Who may speak for an identity, on real API servers (`--tenancy=owned`): a decoy Deployment
//! and Service claiming greeting's identity from a namespace that may not run it, with a GTP of
//! the highest priority, gets nothing anywhere, and a Warning Event, a metric and a /debug line
//! say why; the platform team's allowance on its Namespace gives it an endpoint (and its SPIFFE
//! id on the ServiceEntry); taken away, exactly that goes again, at the same address.

mod testenv;

use flotilla::crd::GlobalTrafficPolicy;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::json;
use testenv::builders::{apply, deployment, service};
use testenv::controller::{Flotilla, eventually};
use testenv::fleet::*;

const GREETING_SE: &str = "stage.greeting.global-se";

/// A Namespace whose `flotilla.io/identities` is `identities` (None: no annotation).
fn owned_namespace(name: &str, identities: Option<&str>) -> Namespace {
    let annotations = identities.map(|i| json!({"flotilla.io/identities": i})).unwrap_or(json!({}));
    serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": annotations}}),
    )
    .unwrap()
}

/// (endpoint addresses, subjectAltNames, address, resourceVersion) of greeting's ServiceEntry.
async fn greeting_entry(client: &Client) -> (Vec<String>, Vec<String>, Vec<String>, Option<String>) {
    let se = get_se(client, GREETING_SE).await.expect("greeting's ServiceEntry");
    (endpoints(&se), se.spec.subject_alt_names.clone(), se.spec.addresses.clone(), se.metadata.resource_version)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_decoy_gets_nothing_until_its_namespace_is_allowed_and_loses_it_again() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["west", "east"]).await;
    let (west, east) = (&clients[0], &clients[1]);
    greeting_and_caller(west, east).await;
    // greeting belongs to namespace greeting of west, caller to caller of east.
    apply(west, &owned_namespace("greeting", Some("greeting"))).await;
    apply(east, &owned_namespace("caller", Some("caller"))).await;
    for m in &members {
        apply(&hub_client, &m.registration_secret(testenv::controller::FLOTILLA_NAMESPACE)).await;
    }
    let flotilla = Flotilla::start(&hub, "owned", &["--tenancy", "owned"]);
    flotilla.wait_ready(WAIT).await;
    converged(&flotilla).await;
    let (addresses, names, vip, version) = greeting_entry(east).await;
    assert_eq!(addresses, ["10.0.0.1"], "greeting through west's gateway");
    assert_eq!(names, ["spiffe://cluster.local/ns/greeting/sa/default"]);

    // The decoy: greeting's identity, a Service, and a GTP that would win, from namespace aaa.
    apply(east, &owned_namespace("aaa", None)).await;
    apply(east, &deployment("aaa", "greeting", "greeting", "stage")).await;
    apply(east, &service("aaa", "greeting", "http", 80, 8080)).await;
    let mut decoy_gtp = gtp("aaa", "take-over", "greeting", json!([{"lbType": 0, "dns": "stage.greeting.global"}]));
    decoy_gtp.metadata.labels.get_or_insert_default().insert("priority".into(), "1000".into());
    apply(east, &decoy_gtp).await;
    let events: Api<Event> = Api::namespaced(east.clone(), "aaa");
    let event = eventually("a Warning Event on the decoy", WAIT, &flotilla, || async {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        list.into_iter().find(|e| e.reason.as_deref() == Some("IdentityClaimRefused"))
    })
    .await;
    let regarding = event.regarding.clone().unwrap();
    assert_eq!((regarding.kind.as_deref(), regarding.name.as_deref()), (Some("Deployment"), Some("greeting")));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let note = event.note.clone().unwrap_or_default();
    assert!(note.contains("namespace \"aaa\" may not run identity \"greeting\""), "{note}");
    assert_eq!(flotilla.metric_with("flotilla_disallowed_claims", "cluster=\"east\"").await, 1.0);
    let clusters = flotilla.json("/debug/clusters").await;
    assert_eq!(clusters["clusters"]["east"]["disallowedClaims"], 1, "{clusters}");
    let gtps: Api<GlobalTrafficPolicy> = Api::namespaced(east.clone(), "aaa");
    let invalid = eventually("the decoy's GTP Invalid", WAIT, &flotilla, || async {
        let status = gtps.get("take-over").await.unwrap().status?;
        status.conditions.into_iter().find(|c| c.type_ == "Invalid" && c.status == "True")
    })
    .await;
    assert!(invalid.message.contains("may not run identity \"greeting\""), "{}", invalid.message);
    let debug = flotilla.json("/debug/identities/greeting").await.to_string();
    assert!(debug.contains("Deployment aaa/greeting") && debug.contains("refused"), "{debug}");
    converged(&flotilla).await;
    assert_eq!(greeting_entry(east).await, (addresses.clone(), names.clone(), vip.clone(), version), "untouched");
    let dr = get_dr(east, "stage.greeting.global-default-dr").await.unwrap();
    assert!(distribute(&dr).is_null(), "the decoy's GTP configures nothing: {:?}", dr.spec);

    // The platform team allows namespace aaa to run greeting: its endpoint and name appear.
    apply(east, &owned_namespace("aaa", Some("greeting"))).await;
    let (allowed, allowed_names, allowed_vip, _) = eventually("the local endpoint", WAIT, &flotilla, || async {
        let entry = greeting_entry(east).await;
        (entry.0.len() == 2).then_some(entry)
    })
    .await;
    assert!(allowed.contains(&"greeting.aaa.svc.cluster.local".to_string()), "{allowed:?}");
    assert_eq!(
        allowed_names,
        ["spiffe://cluster.local/ns/aaa/sa/default", "spiffe://cluster.local/ns/greeting/sa/default"]
    );
    assert_eq!(allowed_vip, vip, "the address stays");
    eventually("no disallowed claim", WAIT, &flotilla, || async {
        (flotilla.metric_with("flotilla_disallowed_claims", "cluster=\"east\"").await == 0.0).then_some(())
    })
    .await;

    // Taken away again: exactly that goes.
    apply(east, &owned_namespace("aaa", Some("someone-else"))).await;
    let after = eventually("the decoy's endpoint gone", WAIT, &flotilla, || async {
        let entry = greeting_entry(east).await;
        (entry.0 == addresses).then_some(entry)
    })
    .await;
    assert_eq!((after.1, after.2), (names, vip));
    converged(&flotilla).await;
    drop(flotilla);
    drop((hub, members));
}
