//! Quiet faults on real API servers: a member behind a firewall that drops everything, a member
//! whose API server is frozen, a member registered at an address that never answers, an object
//! of ours deleted by hand, and a leader cut off from the hub while its standby is not. Each may
//! cost its own member its writes, never anybody else's, and never gives two writers.

mod testenv;

use std::time::{Duration, Instant};

use flotilla::istio::DestinationRule;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use testenv::TestCluster;
use testenv::builders::apply;
use testenv::controller::{FLOTILLA_NAMESPACE, Flotilla, eventually};
use testenv::fleet::*;
use testenv::net::Host;
use testenv::proxy::Proxy;

/// Where the proxies of a member listen: its own address, another port (its certificate names
/// the address, so a client through the proxy still verifies it).
const PROXY_PORT: u16 = 16443;
const DR: &str = "stage.greeting.global-default-dr";

fn weights(west: i32, east: i32) -> serde_json::Value {
    json!([{"dnsPrefix": "default", "lbType": "FAILOVER",
            "target": [{"region": "us-west-2", "weight": west}, {"region": "us-east-2", "weight": east}]}])
}

async fn west_weight(member: &kube::Client) -> Option<i64> {
    let dr: DestinationRule = get_dr(member, DR).await?;
    distribute(&dr)[0]["to"]["us-west-2"].as_i64()
}

async fn state_of(flotilla: &Flotilla, id: &str) -> String {
    flotilla.json("/debug/clusters").await["clusters"][id]["state"].as_str().unwrap_or_default().to_string()
}

fn through(member: &TestCluster, proxy: &Proxy) -> String {
    member.admin_kubeconfig().replace(&member.server_url(), &proxy.url())
}

#[tokio::test(flavor = "multi_thread")]
async fn sick_members_hold_back_only_themselves_and_recover() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["west-1", "east-1", "north-1", "south-1"]).await;
    let (west, east, north, south) = (&clients[0], &clients[1], &clients[2], &clients[3]);
    for (client, region, gw) in [
        (west, "us-west-2", "10.0.0.1"),
        (east, "us-east-2", "10.0.0.2"),
        (north, "us-east-2", "10.0.0.3"),
        (south, "us-east-2", "10.0.0.4"),
    ] {
        prepare_member(client, region, gw).await;
    }
    deploy(west, "greeting", "greeting").await;
    for client in [east, north, south] {
        deploy(client, "caller", "caller").await;
        apply(client, &dependency("caller", "caller-deps", "caller", &["greeting"])).await;
    }
    apply(west, &gtp("greeting", "greeting-gtp", "greeting", weights(80, 20))).await;

    // south-1 is reached through a proxy that will drop everything.
    let south_proxy = Proxy::start(members[3].host.addr(PROXY_PORT), Some(members[3].api_addr())).await;
    // Long enough that no sick member is found stale before the healthy ones must have their
    // writes: a runtime that waited for the sick would show it as a missing write, not a slow one.
    let stale_after = Duration::from_secs(30);
    let flotilla = Flotilla::start(&hub, "replica-a", &["--stale-after", "30s"]);
    let registrations = [
        ("west-1", members[0].admin_kubeconfig()),
        ("east-1", members[1].admin_kubeconfig()),
        ("north-1", members[2].admin_kubeconfig()),
        ("south-1", through(&members[3], &south_proxy)),
    ];
    apply(&hub_client, &secret("members", "istio/multiCluster", &registrations)).await;
    flotilla.wait_ready(WAIT).await;
    for (member, name) in [(west, "west-1"), (east, "east-1"), (north, "north-1"), (south, "south-1")] {
        eventually(&format!("80/20 in {name}"), WAIT, &flotilla, || async {
            (west_weight(member).await? == 80).then_some(())
        })
        .await;
    }
    converged(&flotilla).await;
    let healthy = Instant::now();
    apply(west, &gtp("greeting", "greeting-gtp", "greeting", weights(70, 30))).await;
    for member in [west, east, north, south] {
        eventually("70/30 everywhere", WAIT, &flotilla, || async { (west_weight(member).await? == 70).then_some(()) })
            .await;
    }
    let healthy = healthy.elapsed();

    // Three sick members at once: one black-holed, one frozen, one registered at an address
    // that accepts connections and never answers.
    south_proxy.black_hole(true);
    members[2].freeze();
    let void_host = Host::claim(&[PROXY_PORT]);
    let void = Proxy::start(void_host.addr(PROXY_PORT), None).await;
    let void_kubeconfig = members[1].admin_kubeconfig().replace(&members[1].server_url(), &void.url());
    let sick_at = Instant::now();
    apply(&hub_client, &secret("void", "istio/multiCluster", &[("void-1", void_kubeconfig)])).await;
    eventually("void-1 registered", WAIT, &flotilla, || async {
        (state_of(&flotilla, "void-1").await == "connecting").then_some(())
    })
    .await;

    let changed = Instant::now();
    apply(west, &gtp("greeting", "greeting-gtp", "greeting", weights(30, 70))).await;
    for (member, name) in [(west, "west-1"), (east, "east-1")] {
        eventually(&format!("30/70 in healthy {name}"), WAIT, &flotilla, || async {
            (west_weight(member).await? == 30).then_some(())
        })
        .await;
    }
    let sick = changed.elapsed();
    let view = flotilla.json("/debug/clusters").await;
    println!(
        "GTP change -> healthy members: {:.2} s with every member healthy, {:.2} s with three sick \
         (states then: north-1 {}, south-1 {}, void-1 {})",
        healthy.as_secs_f64(),
        sick.as_secs_f64(),
        view["clusters"]["north-1"]["state"],
        view["clusters"]["south-1"]["state"],
        view["clusters"]["void-1"]["state"],
    );
    assert!(
        sick_at.elapsed() < stale_after,
        "the healthy members got the change {sick:?} after it was made, when the sick ones could \
         already be found stale: something waited for them (or the machine was too slow to tell)"
    );
    for id in ["north-1", "south-1", "void-1"] {
        assert_ne!(view["clusters"][id]["state"], "stale", "{id} found stale too early: {view}");
    }
    assert_eq!(flotilla.get("/readyz").await.0, 200, "a member registered later never makes the process unready");

    // The sick are found out: stale, named, not shown synced.
    for id in ["north-1", "south-1", "void-1"] {
        eventually(&format!("{id} stale"), stale_after + WAIT, &flotilla, || async {
            (state_of(&flotilla, id).await == "stale").then_some(())
        })
        .await;
    }
    let view = flotilla.json("/debug/clusters").await;
    let north_error = view["clusters"]["north-1"]["lastError"].as_str().unwrap_or_default();
    assert!(north_error.contains("does not answer"), "the frozen member's error says so: {view}");
    assert!(flotilla.metric_with("flotilla_cluster_state", "state=\"stale\"").await >= 3.0);

    // They recover, and catch up.
    members[2].thaw();
    south_proxy.black_hole(false);
    for (member, name) in [(north, "north-1"), (south, "south-1")] {
        eventually(&format!("{name} synced again"), WAIT, &flotilla, || async {
            (state_of(&flotilla, name).await == "synced").then_some(())
        })
        .await;
        eventually(&format!("30/70 in recovered {name}"), WAIT, &flotilla, || async {
            (west_weight(member).await? == 30).then_some(())
        })
        .await;
    }
    let secrets: Api<Secret> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    secrets.delete("void", &DeleteParams::default()).await.unwrap();
    converged(&flotilla).await;

    // An object of ours deleted by hand comes back.
    let drs: Api<DestinationRule> = Api::namespaced(east.clone(), SYNC);
    drs.delete(DR, &DeleteParams::default()).await.unwrap();
    eventually("the deleted DestinationRule recreated", WAIT, &flotilla, || async {
        (west_weight(east).await? == 30).then_some(())
    })
    .await;
    drop(void_host);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_cut_off_from_the_hub_stops_writing_before_the_standby_leads() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["west-1", "east-1"]).await;
    let (west, east) = (&clients[0], &clients[1]);
    greeting_and_caller(west, east).await;
    apply(west, &gtp("greeting", "greeting-gtp", "greeting", weights(80, 20))).await;
    apply(
        &hub_client,
        &secret(
            "members",
            "istio/multiCluster",
            &[("west-1", members[0].admin_kubeconfig()), ("east-1", members[1].admin_kubeconfig())],
        ),
    )
    .await;

    // Replica a reaches the hub through a proxy; b directly. Both reach the members.
    let hub_proxy = Proxy::start(hub.host.addr(PROXY_PORT), Some(hub.api_addr())).await;
    let a = Flotilla::start_with_kubeconfig(&through(&hub, &hub_proxy), "replica-a", &[]);
    eventually("a leads", WAIT, &a, || async { (a.metric("flotilla_leader").await == 1.0).then_some(()) }).await;
    let b = Flotilla::start(&hub, "replica-b", &[]);
    converged(&a).await;
    b.wait_ready(WAIT).await;
    assert_eq!(b.metric("flotilla_leader").await, 0.0, "one leader");

    // Cut a off from the hub. Its members still tell it about changes, which it would write if
    // nothing stopped it: a GTP edit every half second keeps giving it reasons.
    hub_proxy.black_hole(true);
    let cut = Instant::now();
    let mut weight = 20;
    let mut a_last_leading = None;
    let (b_leads, a_writes_at_b_start) = loop {
        weight = if weight == 20 { 21 } else { 20 };
        apply(west, &gtp("greeting", "greeting-gtp", "greeting", weights(100 - weight, weight))).await;
        let a_leads = a.metric("flotilla_leader").await == 1.0;
        let a_writes = a.metric("flotilla_api_writes_total").await;
        if a_leads {
            a_last_leading = Some(cut.elapsed());
        }
        if b.metric("flotilla_leader").await == 1.0 {
            break (cut.elapsed(), a_writes);
        }
        assert!(cut.elapsed() < WAIT, "b never took over:\n{}", b.log_tail());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("cut at 0 s; a last seen leading at {a_last_leading:?}; b leads at {b_leads:?}");
    assert!(a.metric("flotilla_leader").await == 0.0, "a still believes it leads:\n{}", a.log_tail());
    assert!(a_last_leading.is_none_or(|t| t < b_leads), "a and b led at once");

    // b writes what changes now; a writes nothing more.
    for w in [35, 45] {
        apply(west, &gtp("greeting", "greeting-gtp", "greeting", weights(100 - w, w))).await;
        eventually(&format!("b writes {w}"), WAIT, &b, || async {
            let dr = get_dr(east, DR).await?;
            (distribute(&dr)[0]["to"]["us-east-2"] == w).then_some(())
        })
        .await;
    }
    let a_writes = a.metric("flotilla_api_writes_total").await;
    assert_eq!(a_writes, a_writes_at_b_start, "a wrote after b began to lead:\n{}", a.log_tail());

    // a comes back as a standby, and stays one.
    hub_proxy.black_hole(false);
    eventually("a follows", WAIT, &a, || async { a.get("/readyz").await.0.eq(&200).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(a.metric("flotilla_leader").await + b.metric("flotilla_leader").await, 1.0, "one leader");
}
