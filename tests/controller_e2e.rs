//! `flotilla run` against real API servers: a hub plus members, each its own etcd and
//! kube-apiserver, with flotilla as a child process reading Secrets from the hub.

mod testenv;

use flotilla::crd::{Dependency, GlobalTrafficPolicy};
use flotilla::istio::{ServiceEntry, Sidecar};
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use serde_json::json;
use testenv::builders::apply;
use testenv::controller::{FLOTILLA_NAMESPACE, Flotilla, eventually};
use testenv::fleet::*;

#[tokio::test(flavor = "multi_thread")]
async fn federates_a_fleet_registered_through_secrets() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["west-1", "east-1", "north-1"]).await;
    let (west, east, north) = (&clients[0], &clients[1], &clients[2]);
    prepare_member(west, "us-west-2", "10.0.0.1").await;
    prepare_member(east, "us-east-2", "10.0.0.2").await;
    prepare_member(north, "eu-north-1", "10.0.0.3").await;

    // A host's address outlives its last object by 2 s here (a week by default).
    let flotilla = Flotilla::start(&hub, "replica-a", &["--vip-release-after", "2s"]);
    let secrets: Api<Secret> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    // Admiral's format with two clusters, Istio's with one, and one that must be refused.
    let admiral = secret(
        "admiral-members",
        "admiral/sync",
        &[("west-1", members[0].admin_kubeconfig()), ("east-1", members[1].admin_kubeconfig())],
    );
    apply(&hub_client, &admiral).await;
    apply(&hub_client, &secret("remote-north", "istio/multiCluster", &[("north-1", members[2].admin_kubeconfig())]))
        .await;
    let exec = members[2].admin_kubeconfig().replace(
        "    token: flotilla-test-admin-north-1",
        "    exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/sh, args: [-c, 'echo pwned']}",
    );
    apply(&hub_client, &secret("broken", "istio/multiCluster", &[("bad-1", exec)])).await;
    flotilla.wait_ready(WAIT).await;

    let view = eventually("three synced members", WAIT, &flotilla, || async {
        let view = flotilla.json("/debug/clusters").await;
        let synced = ["west-1", "east-1", "north-1"].iter().all(|id| view["clusters"][id]["state"] == "synced");
        synced.then_some(view)
    })
    .await;
    assert_eq!(view["clusters"]["west-1"]["region"], "us-west-2", "{view}");
    assert_eq!(view["clusters"]["bad-1"]["state"], "failed", "{view}");
    let bad_error = view["clusters"]["bad-1"]["lastError"].as_str().unwrap();
    assert!(bad_error.contains("exec plugin"), "{bad_error}");
    assert!(!view.to_string().contains("flotilla-test-admin"), "credentials leaked into /debug: {view}");
    let events: Api<Event> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    eventually("a Warning Event on the refused Secret", WAIT, &flotilla, || async {
        let list = events.list(&ListParams::default()).await.unwrap();
        list.items.iter().any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")).then_some(())
    })
    .await;

    // A workload in west-1 and its client in east-1 (Dependency kept next to the client).
    deploy(west, "greeting", "greeting").await;
    deploy(east, "caller", "caller").await;
    apply(east, &dependency("caller", "caller-deps", "caller", &["greeting"])).await;
    let se_name = "stage.greeting.global-se";
    let west_se = eventually("greeting's SE in west-1", WAIT, &flotilla, || get_se(west, se_name)).await;
    assert_eq!(endpoints(&west_se), ["greeting.greeting.svc.cluster.local"], "local endpoint in its own cluster");
    let east_se = eventually("greeting's SE in east-1", WAIT, &flotilla, || get_se(east, se_name)).await;
    assert_eq!(endpoints(&east_se), ["10.0.0.1"], "west-1's gateway from east-1");
    assert_eq!(east_se.spec.addresses, west_se.spec.addresses, "one VIP in every member");
    assert!(get_dr(west, "stage.greeting.global-default-dr").await.is_some());
    assert!(get_dr(east, "stage.greeting.global-default-dr").await.is_some());
    let sidecars: Api<Sidecar> = Api::namespaced(east.clone(), "caller");
    eventually("caller's Sidecar in east-1", WAIT, &flotilla, || async {
        sidecars.get_opt("caller-egress").await.unwrap()
    })
    .await;
    assert!(get_se(north, se_name).await.is_none(), "no client in north-1, nothing written there");

    // A FAILOVER GTP with an extra prefixed host: every target member follows, no resync.
    let gtps: Api<GlobalTrafficPolicy> = Api::namespaced(west.clone(), "greeting");
    let weights = |west: i32, east: i32| {
        json!([
            {"dnsPrefix": "default", "lbType": "FAILOVER", "target": [{"region": "us-west-2", "weight": west}, {"region": "us-east-2", "weight": east}]},
            {"dnsPrefix": "west", "lbType": "FAILOVER", "target": [{"region": "us-west-2", "weight": 100}]},
        ])
    };
    apply(west, &gtp("greeting", "greeting-gtp", "greeting", weights(80, 20))).await;
    for (member, name) in [(west, "west-1"), (east, "east-1")] {
        eventually(&format!("FAILOVER 80/20 in {name}"), WAIT, &flotilla, || async {
            let dr = get_dr(member, "stage.greeting.global-default-dr").await?;
            (distribute(&dr)[0]["to"]["us-west-2"] == 80).then_some(())
        })
        .await;
        eventually(&format!("the prefixed host in {name}"), WAIT, &flotilla, || {
            get_dr(member, "west.stage.greeting.global-dr")
        })
        .await;
    }
    apply(west, &gtp("greeting", "greeting-gtp", "greeting", weights(30, 70))).await;
    for (member, name) in [(west, "west-1"), (east, "east-1")] {
        eventually(&format!("weights 30/70 in {name}"), WAIT, &flotilla, || async {
            let dr = get_dr(member, "stage.greeting.global-default-dr").await?;
            (distribute(&dr)[0]["to"]["us-east-2"] == 70).then_some(())
        })
        .await;
    }
    let ready = eventually("the GTP's Ready condition", WAIT, &flotilla, || async {
        let g = gtps.get("greeting-gtp").await.unwrap();
        let status = g.status?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
        (ready.status == "True" && status.observed_generation == g.metadata.generation).then_some(status)
    })
    .await;
    let clusters: Vec<&str> = ready.clusters.iter().map(|c| c.cluster.as_str()).collect();
    assert_eq!(clusters, ["east-1", "west-1"], "{ready:?}");

    // Dropping the prefix removes exactly its objects.
    apply(
        west,
        &gtp(
            "greeting",
            "greeting-gtp",
            "greeting",
            json!([{"dnsPrefix": "default", "lbType": "FAILOVER", "target": [{"region": "us-west-2", "weight": 30}, {"region": "us-east-2", "weight": 70}]}]),
        ),
    )
    .await;
    for (member, name) in [(west, "west-1"), (east, "east-1")] {
        eventually(&format!("prefixed host pruned in {name}"), WAIT, &flotilla, || async {
            let gone = get_dr(member, "west.stage.greeting.global-dr").await.is_none()
                && get_se(member, "west.stage.greeting.global-se").await.is_none();
            gone.then_some(())
        })
        .await;
        assert!(get_se(member, se_name).await.is_some(), "the default host stays in {name}");
    }
    // The dropped host's address is marked unused, then released once the grace period is
    // over; the default host keeps its address.
    let store = || async {
        let api = Api::<ConfigMap>::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
        api.get("flotilla-vips").await.unwrap().data.unwrap_or_default()
    };
    let address = get_se(west, se_name).await.unwrap().spec.addresses[0].clone();
    eventually("the dropped host's address released", WAIT, &flotilla, || async {
        let data = store().await;
        (!data.contains_key("west.stage.greeting.global")).then_some(())
    })
    .await;
    assert_eq!(store().await["stage.greeting.global"], address, "a live host's address never moves");

    // A second GTP for the same identity+env that takes precedence: the first says to whom it lost.
    // (A higher priority label decides it: creation times have one-second resolution.)
    let mut second =
        gtp("greeting", "greeting-gtp-2", "greeting", json!([{"dnsPrefix": "default", "lbType": "TOPOLOGY"}]));
    second.metadata.labels.as_mut().unwrap().insert("priority".into(), "10".into());
    apply(west, &second).await;
    let conflict = eventually("Conflict on the older GTP", WAIT, &flotilla, || async {
        let status = gtps.get("greeting-gtp").await.unwrap().status?;
        status.conditions.into_iter().find(|c| c.type_ == "Conflict" && c.status == "True")
    })
    .await;
    assert!(conflict.message.contains("west-1/greeting/greeting-gtp-2"), "{conflict:?}");
    // An invalid one (a prefix that is not a DNS label) is Invalid, with the reason.
    let caller_gtps: Api<GlobalTrafficPolicy> = Api::namespaced(east.clone(), "caller");
    apply(east, &gtp("caller", "caller-gtp", "caller", json!([{"dnsPrefix": "Not_A_Label", "lbType": "TOPOLOGY"}])))
        .await;
    let invalid = eventually("Invalid on a bad GTP", WAIT, &flotilla, || async {
        let status = caller_gtps.get("caller-gtp").await.unwrap().status?;
        status.conditions.into_iter().find(|c| c.type_ == "Invalid" && c.status == "True")
    })
    .await;
    assert!(invalid.message.contains("not_a_label") && invalid.message.contains("DNS label"), "{invalid:?}");

    // Someone else's ServiceEntry with the name flotilla would give a host is left alone and
    // reported, and nothing else is written for that host there (no DestinationRule either).
    let users_se: ServiceEntry = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "stage.mine.global-se", "namespace": SYNC},
        "spec": {"hosts": ["mine.example.com"], "location": "MESH_EXTERNAL", "resolution": "DNS", "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]},
    }))
    .unwrap();
    let before = apply(east, &users_se).await;
    deploy(east, "mine", "mine").await;
    eventually("the held host reported in /debug/identities/mine", WAIT, &flotilla, || async {
        let (code, body) = flotilla.get("/debug/identities/mine").await;
        (code == 200 && body.contains("stage.mine.global-se is not managed by flotilla")).then_some(())
    })
    .await;
    assert!(get_dr(east, "stage.mine.global-default-dr").await.is_none(), "no traffic policy of ours on their host");
    let after = get_se(east, "stage.mine.global-se").await.unwrap();
    assert_eq!(after.spec, before.spec, "the user's object is untouched");
    assert_eq!(after.metadata.labels, before.metadata.labels);

    // Someone writes into one of our objects: an extra port, which a server-side apply of ours
    // cannot take back (the list is keyed by name). flotilla puts its own content back.
    let intruder = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": se_name, "namespace": SYNC},
        "spec": {"ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]},
    });
    let api: Api<ServiceEntry> = Api::namespaced(west.clone(), SYNC);
    let pp = kube::api::PatchParams::apply("someone-else").force();
    api.patch(se_name, &pp, &kube::api::Patch::Apply(&intruder)).await.unwrap();
    eventually("flotilla's own ports back on its ServiceEntry", WAIT, &flotilla, || async {
        let se = get_se(west, se_name).await?;
        let names: Vec<&str> = se.spec.ports.iter().map(|p| p.name.as_str()).collect();
        (names == ["http"]).then_some(())
    })
    .await;

    // The Service's port is renamed: the ServiceEntry's port follows, without the old one, in
    // both members. east-1's copy was only ever written by flotilla's server-side applies (the
    // create included): one field manager, one operation, so the apply alone dropped the port.
    apply(west, &testenv::builders::service("greeting", "greeting", "grpc", 80, 8080)).await;
    for (member, name) in [(west, "west-1"), (east, "east-1")] {
        eventually(
            &format!("the renamed port alone on greeting's ServiceEntry in {name}"),
            WAIT,
            &flotilla,
            || async {
                let se = get_se(member, se_name).await?;
                let names: Vec<&str> = se.spec.ports.iter().map(|p| p.name.as_str()).collect();
                (names == ["grpc"]).then_some(())
            },
        )
        .await;
    }
    let managers: Vec<(String, String)> = get_se(east, se_name)
        .await
        .unwrap()
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|m| (m.manager.unwrap_or_default(), m.operation.unwrap_or_default()))
        .collect();
    assert_eq!(managers, [("flotilla".to_string(), "Apply".to_string())], "created and changed by apply only");
    apply(west, &testenv::builders::service("greeting", "greeting", "http", 80, 8080)).await;

    // A second source of greeting in north-1: east-1 reaches both gateways.
    deploy(north, "greeting", "greeting").await;
    eventually("two endpoints in east-1", WAIT, &flotilla, || async {
        let se = get_se(east, se_name).await?;
        // One endpoint per source cluster, in cluster order: north-1, then west-1.
        (endpoints(&se) == ["10.0.0.3", "10.0.0.1"]).then_some(())
    })
    .await;

    // Rotating north-1's credentials keeps it synced and written.
    let rotated = members[2].kubeconfig_for("rotated", "flotilla-test-rotated");
    apply(&hub_client, &secret("remote-north", "istio/multiCluster", &[("north-1", rotated)])).await;
    deploy(north, "watcher", "watcher").await;
    apply(north, &dependency("watcher", "watcher-deps", "watcher", &["caller"])).await;
    eventually("caller's SE written into north-1 with the rotated token", WAIT, &flotilla, || {
        get_se(north, "stage.caller.global-se")
    })
    .await;
    assert_eq!(flotilla.json("/debug/clusters").await["clusters"]["north-1"]["state"], "synced");

    // Deleting north-1's Secret removes it: its endpoint leaves east-1's config.
    secrets.delete("remote-north", &DeleteParams::default()).await.unwrap();
    eventually("north-1's endpoint gone from east-1", WAIT, &flotilla, || async {
        let se = get_se(east, se_name).await?;
        (endpoints(&se) == ["10.0.0.1"]).then_some(())
    })
    .await;
    assert!(flotilla.json("/debug/clusters").await["clusters"].get("north-1").is_none());

    // Deleting the Dependency removes what it caused in the client's cluster only.
    Api::<Dependency>::namespaced(east.clone(), "caller")
        .delete("caller-deps", &DeleteParams::default())
        .await
        .unwrap();
    eventually("greeting's objects and caller's Sidecar pruned from east-1", WAIT, &flotilla, || async {
        let gone = get_se(east, se_name).await.is_none()
            && get_dr(east, "stage.greeting.global-default-dr").await.is_none()
            && sidecars.get_opt("caller-egress").await.unwrap().is_none();
        gone.then_some(())
    })
    .await;
    assert!(get_se(west, se_name).await.is_some(), "west-1 still runs greeting");

    // A CronJob is a client: its Dependency brings greeting's hosts back to east-1. Its team's
    // Sidecar selects it and does not list them: flotilla writes no Sidecar over it, and says so
    // on the Sidecar (an Event) and on the Dependency, until the team adds the host.
    apply(east, &testenv::builders::namespace("batch")).await;
    let user_sidecar = |hosts: &[&str]| -> Sidecar {
        serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
            "metadata": {"name": "nightly", "namespace": "batch"},
            "spec": {
                "workloadSelector": {"labels": {"identity": "nightly"}},
                "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
                "egress": [{"hosts": hosts}],
            },
        }))
        .unwrap()
    };
    apply(east, &user_sidecar(&["./*", "istio-system/*"])).await;
    apply(east, &cron_job("batch", "nightly", "nightly")).await;
    apply(east, &dependency("batch", "nightly-deps", "nightly", &["greeting"])).await;
    eventually("greeting's SE in east-1 for the CronJob", WAIT, &flotilla, || get_se(east, se_name)).await;
    let batch_events: Api<Event> = Api::namespaced(east.clone(), "batch");
    let event = eventually("a Warning Event on the team's Sidecar", WAIT, &flotilla, || async {
        let list = batch_events.list(&ListParams::default()).await.unwrap().items;
        list.into_iter().find(|e| e.reason.as_deref() == Some("EgressMissesDependencies"))
    })
    .await;
    let regarding = event.regarding.clone().unwrap();
    assert_eq!((regarding.kind.as_deref(), regarding.name.as_deref()), (Some("Sidecar"), Some("nightly")));
    assert!(event.note.unwrap_or_default().contains("admiral-sync/stage.greeting.global"));
    let batch_deps: Api<Dependency> = Api::namespaced(east.clone(), "batch");
    let ready_message = || async {
        let status = batch_deps.get("nightly-deps").await.ok()?.status?;
        Some(status.conditions.iter().find(|c| c.type_ == "Ready")?.message.clone())
    };
    eventually("the Dependency names the Sidecar", WAIT, &flotilla, || async {
        ready_message().await.filter(|m| m.contains("Sidecar batch/nightly in cluster east-1"))
    })
    .await;
    let batch_sidecars: Api<Sidecar> = Api::namespaced(east.clone(), "batch");
    assert!(batch_sidecars.get_opt("nightly-egress").await.unwrap().is_none(), "none of ours over theirs");
    apply(east, &user_sidecar(&["./*", "istio-system/*", "admiral-sync/stage.greeting.global"])).await;
    eventually("the Dependency's message clear once the team lists the host", WAIT, &flotilla, || async {
        ready_message().await.filter(|m| !m.contains("Sidecar"))
    })
    .await;
    converged(&flotilla).await;
    assert!(batch_sidecars.get_opt("nightly-egress").await.unwrap().is_none(), "still none of ours");

    // The debug views answer for an identity and a member.
    let identity = flotilla.json("/debug/identities/greeting").await;
    assert_eq!(identity["sourceClusters"], json!(["west-1"]), "{identity}");
    let desired = flotilla.json("/debug/clusters/west-1/desired").await;
    assert!(desired["objects"].as_array().unwrap().iter().any(|o| o["metadata"]["name"] == se_name), "{desired}");
    assert_eq!(flotilla.get("/debug/clusters/nowhere/desired").await.0, 404);

    // Admiral's read API, with its paths and shapes.
    assert_eq!(flotilla.json("/clusters").await, json!(["east-1", "west-1"]), "bad-1 failed: not listed");
    let entries = flotilla.json("/identity/greeting/serviceentries").await;
    let greeting = entries.as_array().unwrap().iter().find(|e| e["Cname"] == "stage.greeting.global");
    assert_eq!(greeting.map(|e| &e["Clusters"]), Some(&json!(["east-1", "west-1"])), "{entries}");
    let in_west = flotilla.json("/cluster/west-1/serviceentries").await;
    let names: Vec<&str> = in_west.as_array().unwrap().iter().filter_map(|o| o["metadata"]["name"].as_str()).collect();
    assert!(names.contains(&se_name) && in_west[0]["kind"] == "ServiceEntry", "{in_west}");
    assert_eq!(flotilla.get("/cluster/nowhere/serviceentries").await.0, 404);
    let policy = flotilla.json("/identity/greeting/globaltrafficpolicy?env=stage").await;
    assert_eq!(
        (&policy["kind"], &policy["metadata"]["namespace"]),
        (&json!("GlobalTrafficPolicy"), &json!("greeting"))
    );
    assert!(policy["spec"]["policy"].is_array(), "{policy}");
    let (code, body) = flotilla.get("/identity/greeting/globaltrafficpolicy?env=prod").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("\"error\"") && body.contains("env: prod"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_member_stays_in_the_fleet_is_reconciled_and_a_restart_writes_nothing() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, mut members, hub_client, clients) = start_fleet(&["a-1", "b-1"]).await;
    let (a, b) = (&clients[0], &clients[1]);
    prepare_member(a, "us-west-2", "10.0.1.1").await;
    prepare_member(b, "us-east-2", "10.0.1.2").await;
    // Two hosts per ConfigMap of the VIP store: the store spreads over shards, and the restart
    // below must read every one of them back (or it would allocate again, and write).
    let mut flotilla = Flotilla::start(&hub, "replica-b", &["--vip-shard-entries", "2"]);
    let kubeconfigs = [("a-1", members[0].admin_kubeconfig()), ("b-1", members[1].admin_kubeconfig())];
    apply(&hub_client, &secret("members", "istio/multiCluster", &kubeconfigs)).await;
    deploy(a, "greeting", "greeting").await;
    deploy(b, "caller", "caller").await;
    apply(b, &dependency("caller", "caller-deps", "caller", &["greeting"])).await;
    let se_name = "stage.greeting.global-se";
    eventually("greeting's SE in b-1", WAIT, &flotilla, || get_se(b, se_name)).await;

    members[0].stop_apiserver();
    eventually("a-1 marked stale", WAIT, &flotilla, || async {
        let view = flotilla.json("/debug/clusters").await;
        (view["clusters"]["a-1"]["state"] == "stale").then_some(())
    })
    .await;
    // The rest of the fleet keeps converging: a new workload in b-1 that a-1's greeting calls.
    deploy(b, "api", "api").await;
    apply(b, &dependency("caller", "greeting-deps", "greeting", &["api"])).await;
    eventually("api's SE in b-1 while a-1 is down", WAIT, &flotilla, || get_se(b, "stage.api.global-se")).await;
    let se = get_se(b, se_name).await.expect("a stale member's hosts stay");
    assert_eq!(endpoints(&se), ["10.0.1.1"], "a-1's last known endpoint stays (fail static)");

    // Back: what changed for a-1 meanwhile is written.
    members[0].start_apiserver().await;
    let sidecars: Api<Sidecar> = Api::namespaced(a.clone(), "greeting");
    eventually("a-1 reconciled", WAIT, &flotilla, || async {
        let done = get_se(a, "stage.api.global-se").await.is_some()
            && sidecars.get_opt("greeting-egress").await.unwrap().is_some();
        done.then_some(())
    })
    .await;

    // A restart with nothing changed writes nothing: not an object, not a status, not a VIP.
    // "Converged" means: it leads, every member was planned against a complete list and its last
    // plan was empty, and no status or VIP is left to write. A build that rewrote anything on
    // restart would have written it by then.
    converged(&flotilla).await;
    let configmaps = Api::<ConfigMap>::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    let shards: BTreeMap<String, usize> = configmaps
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|cm| cm.metadata.name.as_deref().is_some_and(|n| n.starts_with("flotilla-vips")))
        .map(|cm| (cm.metadata.name.unwrap(), cm.data.unwrap_or_default().len()))
        .collect();
    let names: Vec<&str> = shards.keys().map(String::as_str).collect();
    assert_eq!(names, ["flotilla-vips", "flotilla-vips-1"], "three hosts, two per shard: {shards:?}");
    assert_eq!(shards.values().sum::<usize>(), 3, "{shards:?}");
    flotilla.terminate();
    flotilla.restart();
    flotilla.wait_ready(WAIT).await;
    converged(&flotilla).await;
    let writes = flotilla.metric("flotilla_api_writes_total").await;
    assert_eq!(writes, 0.0, "writes after a restart with no change:\n{}", flotilla.log_tail());
    let view = flotilla.json("/debug/clusters").await;
    assert_eq!(view["clusters"]["a-1"]["desiredObjects"].as_u64(), Some(5), "{view}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_replica_takes_over_when_the_leader_dies() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["solo-1"]).await;
    let solo = &clients[0];
    prepare_member(solo, "us-west-2", "10.0.2.1").await;
    apply(&hub_client, &secret("members", "admiral/sync", &[("solo-1", members[0].admin_kubeconfig())])).await;
    deploy(solo, "greeting", "greeting").await;

    let mut first = Flotilla::start(&hub, "replica-1", &[]);
    eventually("replica-1 leads", WAIT, &first, || async {
        (first.metric("flotilla_leader").await == 1.0).then_some(())
    })
    .await;
    let second = Flotilla::start(&hub, "replica-2", &[]);
    second.wait_ready(WAIT).await;
    eventually("greeting's SE written", WAIT, &first, || get_se(solo, "stage.greeting.global-se")).await;
    // The standby watches and serves, but does not write.
    let view = second.json("/debug/clusters").await;
    assert_eq!(view["clusters"]["solo-1"]["state"], "synced", "{view}");
    assert_eq!(view["leader"], false);
    assert_eq!(second.metric("flotilla_api_writes_total").await, 0.0);

    first.kill();
    let gtps =
        json!([{"dnsPrefix": "default", "lbType": "FAILOVER", "target": [{"region": "us-west-2", "weight": 100}]}]);
    apply(solo, &gtp("greeting", "greeting-gtp", "greeting", gtps)).await;
    eventually("the change applied by the new leader", WAIT, &second, || async {
        let dr = get_dr(solo, "stage.greeting.global-default-dr").await?;
        (distribute(&dr)[0]["to"]["us-west-2"] == 100).then_some(())
    })
    .await;
    assert_eq!(second.metric("flotilla_leader").await, 1.0);
}

/// Admiral's additional endpoints: an alias VirtualService per host wherever the host is written,
/// pruned with it; someone else's under an alias's name is left alone and reported.
#[tokio::test(flavor = "multi_thread")]
async fn aliases_under_another_suffix_follow_their_hosts() {
    use flotilla::istio::VirtualService;
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["west", "east"]).await;
    let (west, east) = (&clients[0], &clients[1]);
    greeting_and_caller(west, east).await;
    let theirs: VirtualService = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "stage.caller.intuit-vs", "namespace": SYNC},
        "spec": {"hosts": ["stage.caller.intuit"], "http": [{"route": [{"destination": {"host": "stage.caller.global"}}]}]},
    }))
    .unwrap();
    apply(east, &testenv::builders::namespace(SYNC)).await;
    apply(east, &theirs).await;
    for m in &members {
        apply(&hub_client, &m.registration_secret(FLOTILLA_NAMESPACE)).await;
    }
    let args = ["--additional-endpoint-suffix", "intuit", "--additional-endpoint-label", "*"];
    let flotilla = Flotilla::start(&hub, "aliases", &args);
    let aliases = |c: &kube::Client| Api::<VirtualService>::namespaced(c.clone(), SYNC);
    for (member, name) in [(west, "west"), (east, "east")] {
        let vs = eventually(&format!("greeting's alias in {name}"), WAIT, &flotilla, || async {
            aliases(member).get_opt("stage.greeting.intuit-vs").await.unwrap()
        })
        .await;
        assert_eq!(vs.spec.hosts, ["stage.greeting.intuit"]);
        let destination = &vs.spec.http[0].route[0].destination;
        assert_eq!(
            (destination.host.as_str(), destination.port.as_ref().map(|p| p.number)),
            ("stage.greeting.global", Some(80))
        );
    }
    eventually("the user's VirtualService reported as a conflict", WAIT, &flotilla, || async {
        let view = flotilla.json("/debug/clusters").await;
        view["clusters"]["east"]["conflicts"].to_string().contains("stage.caller.intuit-vs").then_some(())
    })
    .await;
    let still = aliases(east).get("stage.caller.intuit-vs").await.unwrap();
    assert_eq!((still.metadata.labels, still.spec), (theirs.metadata.labels, theirs.spec), "left alone");

    // Without a client in east, greeting's alias leaves it with its ServiceEntry.
    Api::<Dependency>::namespaced(east.clone(), "caller")
        .delete("caller-deps", &DeleteParams::default())
        .await
        .unwrap();
    eventually("greeting's alias pruned from east", WAIT, &flotilla, || async {
        aliases(east).get_opt("stage.greeting.intuit-vs").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(aliases(west).get_opt("stage.greeting.intuit-vs").await.unwrap().is_some(), "west still serves greeting");
    drop(flotilla);
    drop((hub, members));
}
