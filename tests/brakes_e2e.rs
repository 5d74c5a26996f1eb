//! The operator's brakes on real API servers: the blast-radius guard holds a mass prune (a
//! Dependency of many destinations deleted) while everything else is still written, reports it, and lets
//! it go when the hold's id is written on the registration Secret; a paused member is written
//! nothing until it is resumed, then is reconciled whole; a drained member's endpoints leave
//! every member, as `render` of a snapshot says, and undraining restores the very same objects.

mod testenv;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use testenv::builders::apply;
use testenv::controller::{FLOTILLA_NAMESPACE, Flotilla, eventually};
use testenv::fleet::*;
use testenv::oracle;

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

#[tokio::test(flavor = "multi_thread")]
async fn a_drained_member_leaves_traffic_and_undraining_restores_the_very_same_objects() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["west", "east"]).await;
    let (west, east) = (&clients[0], &clients[1]);
    greeting_and_caller(west, east).await;
    // greeting is served in both members; its GTP sends 70/30 west/east.
    deploy(east, "greeting", "greeting").await;
    let policy = json!([{"dnsPrefix": "default", "lbType": "FAILOVER",
        "target": [{"region": "us-west-2", "weight": 70}, {"region": "us-east-2", "weight": 30}]}]);
    apply(west, &gtp("greeting", "greeting-gtp", "greeting", policy)).await;
    for m in &members {
        apply(&hub_client, &m.registration_secret(FLOTILLA_NAMESPACE)).await;
    }
    let flotilla = Flotilla::start(&hub, "drain", &["--removal-grace", "1h"]);
    flotilla.wait_ready(WAIT).await;
    converged(&flotilla).await;
    let pairs = [("west", west), ("east", east)];
    let before = [oracle::owned(west, SYNC).await, oracle::owned(east, SYNC).await];
    let se = get_se(west, "stage.greeting.global-se").await.unwrap();
    assert_eq!(endpoints(&se).len(), 2, "{se:?}");

    // Drained: east's gateway leaves west's ServiceEntry, east's own clients go to west's
    // gateway, and the distribution no longer names us-east-2.
    annotate(&hub_client, "east", "flotilla.io/drain", Some("true")).await;
    eventually("east's endpoints withheld everywhere", WAIT, &flotilla, || async {
        let in_west = endpoints(&get_se(west, "stage.greeting.global-se").await?);
        let in_east = endpoints(&get_se(east, "stage.greeting.global-se").await?);
        (in_west == ["greeting.greeting.svc.cluster.local"] && in_east == ["10.0.0.1"]).then_some(())
    })
    .await;
    converged(&flotilla).await;
    let dr = get_dr(east, "stage.greeting.global-default-dr").await.unwrap();
    assert_eq!(distribute(&dr)[0]["to"], json!({"us-west-2": 100}), "{dr:?}");
    assert_eq!(flotilla.json("/debug/clusters").await["clusters"]["east"]["drained"], true);
    assert_eq!(flotilla.metric_with("flotilla_member_drained", "cluster=\"east\"").await, 1.0);
    // `flotilla status`: the table says so, and --watch -o json gives one document per line.
    let url = format!("http://{}", flotilla.http_addr());
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla")).args(["status", "--url", &url]).output();
    let table = String::from_utf8(status.unwrap().stdout).unwrap();
    let east_row = table.lines().find(|l| l.starts_with("east ")).unwrap_or_else(|| panic!("{table}"));
    assert!(east_row.contains(" synced,drained "), "{table}");
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["status", "--url", &url, "-o", "json", "--watch", "--interval", "100ms"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<String> = {
        use std::io::BufRead;
        let out = std::io::BufReader::new(watch.stdout.take().unwrap());
        out.lines().take(2).map(Result::unwrap).collect()
    };
    watch.kill().unwrap();
    watch.wait().unwrap();
    for line in &lines {
        let read: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(read["fleet"]["clusters"]["east"]["drained"], true, "{line}");
    }
    let gtps: Api<flotilla::crd::GlobalTrafficPolicy> = Api::namespaced(west.clone(), "greeting");
    eventually("the GTP's status says the drain is in force", WAIT, &flotilla, || async {
        let status = gtps.get("greeting-gtp").await.unwrap().status?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "True" && ready.message.contains("drain in force: east")).then_some(())
    })
    .await;
    // The oracle: a snapshot keeps the drain, and render of it is what the members hold.
    let dir = oracle::fresh_dir("drain");
    let (_, found) =
        oracle::converge_to_render(&hub.admin_kubeconfig(), FLOTILLA_NAMESPACE, &pairs, SYNC, &dir, WAIT).await;
    assert!(found.is_empty(), "drained, render of the snapshot differs:\n{}", found.join("\n"));
    let fleet_yaml = std::fs::read_to_string(dir.join("fleet.yaml")).unwrap();
    assert!(fleet_yaml.contains("    drain: true"), "{fleet_yaml}");

    // Undrained: exactly the objects from before, and render agrees again.
    annotate(&hub_client, "east", "flotilla.io/drain", None).await;
    eventually("east's endpoints back", WAIT, &flotilla, || async {
        (endpoints(&get_se(west, "stage.greeting.global-se").await?).len() == 2).then_some(())
    })
    .await;
    converged(&flotilla).await;
    let after = [oracle::owned(west, SYNC).await, oracle::owned(east, SYNC).await];
    for (member, (b, a)) in ["west", "east"].iter().zip(before.iter().zip(&after)) {
        let digests =
            |objects: &std::collections::BTreeMap<flotilla::compute::ObjectKey, flotilla::compute::DesiredObject>| {
                objects
                    .iter()
                    .map(|(k, o)| (k.clone(), flotilla::compute::plan::ObservedObject::new(o).digest))
                    .collect::<Vec<_>>()
            };
        assert_eq!(digests(a), digests(b), "{member}: undrained objects differ from those before the drain");
    }
    let (_, found) =
        oracle::converge_to_render(&hub.admin_kubeconfig(), FLOTILLA_NAMESPACE, &pairs, SYNC, &dir, WAIT).await;
    assert!(found.is_empty(), "undrained, render of the snapshot differs:\n{}", found.join("\n"));

    // east's registration deleted by mistake: east is leaving, and west keeps its endpoint.
    let secrets: Api<Secret> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    let registration = secrets.get("flotilla-remote-east").await.unwrap();
    secrets.delete("flotilla-remote-east", &DeleteParams::default()).await.unwrap();
    eventually("east leaving", WAIT, &flotilla, || async {
        let view = flotilla.json("/debug/clusters").await;
        (view["clusters"]["east"]["state"] == "leaving").then_some(())
    })
    .await;
    let events: Api<Event> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    eventually("a MemberLeaving Event", WAIT, &flotilla, || async {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        list.into_iter().find(|e| e.reason.as_deref() == Some("MemberLeaving"))
    })
    .await;
    converged(&flotilla).await;
    assert_eq!(oracle::owned(west, SYNC).await.len(), before[0].len());
    assert_eq!(endpoints(&get_se(west, "stage.greeting.global-se").await.unwrap()).len(), 2, "east still served");
    // Put back: east is started again, and nothing moved.
    let mut again = registration.clone();
    again.metadata = kube::api::ObjectMeta {
        name: registration.metadata.name.clone(),
        namespace: registration.metadata.namespace.clone(),
        labels: registration.metadata.labels.clone(),
        ..Default::default()
    };
    apply(&hub_client, &again).await;
    eventually("east synced again", WAIT, &flotilla, || async {
        (flotilla.json("/debug/clusters").await["clusters"]["east"]["state"] == "synced").then_some(())
    })
    .await;
    converged(&flotilla).await;
    let after = [oracle::owned(west, SYNC).await, oracle::owned(east, SYNC).await];
    assert_eq!(after.iter().map(|o| o.len()).collect::<Vec<_>>(), before.iter().map(|o| o.len()).collect::<Vec<_>>());
    drop(flotilla);
    drop((hub, members));
}
