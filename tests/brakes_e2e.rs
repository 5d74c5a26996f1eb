//! The operator's brakes on real API servers: the blast-radius guard holds a mass prune (a
//! Dependency of many destinations deleted) while everything else is still written, reports it, and lets
//! it go when the hold's id is written on the registration Secret; a paused member is written
//! nothing until it is resumed, then is reconciled whole.

mod testenv;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use testenv::builders::apply;
use testenv::controller::{FLOTILLA_NAMESPACE, Flotilla, eventually};
use testenv::fleet::*;

const DESTINATIONS: usize = 8;

/// ServiceEntries flotilla wrote into a member, by name.
async fn service_entries(client: &Client) -> Vec<String> {
    let api: Api<flotilla::istio::ServiceEntry> = Api::namespaced(client.clone(), SYNC);
    let mut names: Vec<String> =
        api.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|o| o.metadata.name).collect();
    names.sort();
    names
}

/// Sets (or with None removes) an annotation of the member's registration Secret.
async fn annotate(hub: &Client, member: &str, key: &str, value: Option<&str>) {
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), FLOTILLA_NAMESPACE);
    let patch = json!({"metadata": {"annotations": {key: value}}});
    secrets.patch(&format!("flotilla-remote-{member}"), &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mass_prune_is_held_until_released_and_a_paused_member_waits() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["west", "east"]).await;
    let (west, east) = (&clients[0], &clients[1]);
    greeting_and_caller(west, east).await;
    // Eight more destinations of caller, named by one Dependency (deleting it is one change: a
    // namespace of Dependencies deleted needs a namespace controller, which this fleet lacks).
    let names: Vec<String> = (0..DESTINATIONS).map(|i| format!("dest-{i}")).collect();
    for name in &names {
        deploy(west, name, name).await;
    }
    let destinations: Vec<&str> = names.iter().map(String::as_str).collect();
    apply(east, &dependency("caller", "caller-many", "caller", &destinations)).await;
    for m in &members {
        apply(&hub_client, &m.registration_secret(FLOTILLA_NAMESPACE)).await;
    }
    let args = ["--prune-hold-threshold", "5", "--prune-hold-share", "0.1"];
    let flotilla = Flotilla::start(&hub, "brakes", &args);
    flotilla.wait_ready(WAIT).await;
    converged(&flotilla).await;
    let before = service_entries(east).await;
    // caller's own host, greeting's and the eight.
    assert_eq!(before.len(), DESTINATIONS + 2, "{before:?}");
    let settled = ["stage.caller.global-se", "stage.greeting.global-se"];

    // The Dependency goes: 16 prunes in east (8 ServiceEntries, 8 DestinationRules), more than 5
    // and more than a tenth of what flotilla holds there.
    let deps: Api<flotilla::crd::Dependency> = Api::namespaced(east.clone(), "caller");
    deps.delete("caller-many", &DeleteParams::default()).await.unwrap();
    let hold = eventually("the prunes held", WAIT, &flotilla, || async {
        let view = flotilla.json("/debug/clusters").await;
        let hold = view["clusters"]["east"]["heldPrunes"].clone();
        (hold["count"] == 2 * DESTINATIONS).then_some(hold)
    })
    .await;
    let id = hold["id"].as_str().unwrap().to_string();
    assert_eq!(flotilla.metric_with("flotilla_prunes_held", "cluster=\"east\"").await, (2 * DESTINATIONS) as f64);
    // Everything else is written: caller's Sidecar no longer lets the eight hosts through.
    eventually("caller's Sidecar narrowed", WAIT, &flotilla, || async {
        let sidecars: Api<flotilla::istio::Sidecar> = Api::namespaced(east.clone(), "caller");
        let sidecar = sidecars.get_opt("caller-egress").await.unwrap()?;
        let hosts = serde_json::to_string(&sidecar.spec).unwrap();
        (!hosts.contains("dest-0")).then_some(())
    })
    .await;
    assert_eq!(service_entries(east).await, before, "the ServiceEntries are still there");
    let events: Api<Event> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    let event = eventually("a PrunesHeld Event on east's Secret", WAIT, &flotilla, || async {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        list.into_iter().find(|e| e.reason.as_deref() == Some("PrunesHeld"))
    })
    .await;
    assert_eq!(event.regarding.unwrap().name.as_deref(), Some("flotilla-remote-east"));
    assert!(event.note.unwrap().contains(&format!("flotilla.io/release-prunes={id}")));
    assert_eq!(flotilla.json("/debug/clusters").await["converged"], false, "a hold is not convergence");

    // The hold's id lets them go.
    annotate(&hub_client, "east", "flotilla.io/release-prunes", Some(&id)).await;
    converged(&flotilla).await;
    assert_eq!(service_entries(east).await, settled);
    assert_eq!(flotilla.metric_with("flotilla_prunes_held", "cluster=\"east\"").await, 0.0);
    // The released prunes do not count against the next ones: a small prune goes at once.
    deps.delete("caller-deps", &DeleteParams::default()).await.unwrap();
    eventually("greeting's ServiceEntry pruned", WAIT, &flotilla, || async {
        (service_entries(east).await == ["stage.caller.global-se"]).then_some(())
    })
    .await;
    converged(&flotilla).await;
    let settled = ["stage.caller.global-se"];

    // Paused: a new destination is computed for east but not written there.
    annotate(&hub_client, "east", "flotilla.io/paused", Some("true")).await;
    eventually("east paused", WAIT, &flotilla, || async {
        (flotilla.json("/debug/clusters").await["clusters"]["east"]["paused"] == true).then_some(())
    })
    .await;
    apply(east, &dependency("caller", "caller-dest-0", "caller", &["dest-0"])).await;
    eventually("dest-0 desired in east", WAIT, &flotilla, || async {
        let desired = flotilla.get("/debug/clusters/east/desired").await.1;
        desired.contains("stage.dest-0.global-se").then_some(())
    })
    .await;
    converged(&flotilla).await;
    assert_eq!(flotilla.metric_with("flotilla_member_paused", "cluster=\"east\"").await, 1.0);
    assert_eq!(flotilla.json("/debug/clusters").await["clusters"]["east"]["converged"], false);
    assert_eq!(service_entries(east).await, settled, "nothing written while paused");
    assert!(deps.get("caller-dest-0").await.unwrap().status.is_none(), "not even a status");
    // Resumed: reconciled.
    annotate(&hub_client, "east", "flotilla.io/paused", None).await;
    eventually("dest-0 written after the pause", WAIT, &flotilla, || async {
        (service_entries(east).await.len() == settled.len() + 1).then_some(())
    })
    .await;
    converged(&flotilla).await;
    drop(flotilla);
    drop((hub, members));
}
