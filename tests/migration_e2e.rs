//! The switch from Admiral on real API servers: a fleet holding Admiral's objects and address
//! store, flotilla beside it in shadow mode (it writes nothing and shows its plan), then flotilla
//! taking over in place while a sampler reads every object every 100 ms; and `preflight` on
//! Admiral's own member credentials.
//!
//! Admiral's objects here are written by the test as Admiral writes them (its names, annotation,
//! labels and content shapes, docs/admiral-compat.md); the procedure on the real Admiral is
//! docs/migrating-from-admiral.md.

mod testenv;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flotilla::istio::{DestinationRule, ServiceEntry};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use testenv::builders::{apply, namespace};
use testenv::controller::{FLOTILLA_NAMESPACE, Flotilla, eventually};
use testenv::fleet::*;

const GREETING_SE: &str = "stage.greeting.global-se";
const GREETING_DR: &str = "stage.greeting.global-default-dr";
const RETIRED_SE: &str = "stage.retired.global-se";
const ADMIRAL_VIP: &str = "240.0.10.1";
const ADOPT: [&str; 4] = ["--adopt-from", "admiral", "--import-vips-from", "admiral-sync/se-address-configmap"];

/// A ServiceEntry as Admiral writes it for greeting: its address, one endpoint per member (the
/// local Service in west, west's gateway elsewhere), its annotation and label.
fn admirals_service_entry(name: &str, host: &str, endpoint: &str) -> ServiceEntry {
    serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {
            "name": name, "namespace": SYNC, "labels": {"env": "stage"},
            "annotations": {"app.kubernetes.io/created-by": "admiral", "identity": "greeting"},
        },
        "spec": {
            // `exportTo` is a field flotilla does not set here: the takeover has to replace it away.
            "hosts": [host], "addresses": [ADMIRAL_VIP], "location": "MESH_INTERNAL", "resolution": "DNS", "exportTo": ["*"],
            "ports": [{"number": 80, "protocol": "http", "name": "http"}],
            "endpoints": [{"address": endpoint, "ports": {"http": 80}, "locality": "us-west-2"}],
        },
    }))
    .unwrap()
}

fn admirals_destination_rule() -> DestinationRule {
    serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": GREETING_DR, "namespace": SYNC, "annotations": {"app.kubernetes.io/created-by": "admiral"}},
        "spec": {"host": "stage.greeting.global", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}},
    }))
    .unwrap()
}

/// Admiral's address store, in the sync namespace of the cluster Admiral runs in (the hub).
fn admirals_store() -> ConfigMap {
    let store = format!(
        "entry-addresses:\n  {GREETING_SE}: {ADMIRAL_VIP}\n  {RETIRED_SE}: 240.0.10.2\naddresses:\n- {ADMIRAL_VIP}\n- 240.0.10.2\n"
    );
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "se-address-configmap", "namespace": SYNC},
        "data": {"serviceEntryAddressStore": store},
    }))
    .unwrap()
}

/// What a sampler saw of Admiral's (then flotilla's) objects through the cutover.
#[derive(Debug, Default)]
struct Samples {
    rounds: usize,
    /// Reads that found an object missing, by member and name.
    gaps: BTreeMap<String, usize>,
    /// ServiceEntries seen with another address than Admiral's.
    vip_changes: usize,
}

/// Reads every sampled object of every member every 100 ms until `stop`.
fn sample(members: Vec<(String, Client)>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Samples> {
    tokio::spawn(async move {
        let mut seen = Samples::default();
        while !stop.load(Ordering::Relaxed) {
            let started = tokio::time::Instant::now();
            for (id, client) in &members {
                let se = get_se(client, GREETING_SE).await;
                let dr = get_dr(client, GREETING_DR).await;
                if let Some(se) = &se
                    && se.spec.addresses != [ADMIRAL_VIP]
                {
                    seen.vip_changes += 1;
                }
                for (name, present) in [(GREETING_SE, se.is_some()), (GREETING_DR, dr.is_some())] {
                    if !present {
                        *seen.gaps.entry(format!("{id}/{name}")).or_default() += 1;
                    }
                }
            }
            seen.rounds += 1;
            tokio::time::sleep_until(started + Duration::from_millis(100)).await;
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admiral_fleet_is_shadowed_then_taken_over_in_place_with_its_addresses() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["west", "east"]).await;
    let (west, east) = (&clients[0], &clients[1]);
    greeting_and_caller(west, east).await;
    let registered = secret(
        "admiral-members",
        "admiral/sync",
        &[("west", members[0].admin_kubeconfig()), ("east", members[1].admin_kubeconfig())],
    );
    apply(&hub_client, &registered).await;

    // What Admiral left: greeting's objects in both members, a host that no longer runs, and
    // its address store in the hub.
    for (client, endpoint) in [(west, "greeting.greeting.svc.cluster.local"), (east, "10.0.0.1")] {
        apply(client, &namespace(SYNC)).await;
        apply(client, &admirals_service_entry(GREETING_SE, "stage.greeting.global", endpoint)).await;
        apply(client, &admirals_destination_rule()).await;
    }
    apply(east, &admirals_service_entry(RETIRED_SE, "stage.retired.global", "10.0.0.1")).await;
    apply(&hub_client, &namespace(SYNC)).await;
    apply(&hub_client, &admirals_store()).await;
    let versions = |client: &Client| {
        let client = client.clone();
        async move {
            let se = get_se(&client, GREETING_SE).await.unwrap();
            let dr = get_dr(&client, GREETING_DR).await.unwrap();
            (
                se.metadata.uid.unwrap(),
                se.metadata.resource_version,
                dr.metadata.uid.unwrap(),
                dr.metadata.resource_version,
            )
        }
    };
    let before = [versions(west).await, versions(east).await];
    let retired_before = get_se(east, RETIRED_SE).await.unwrap().metadata.resource_version;

    // Shadow mode beside Admiral: it plans, and writes nothing at all.
    let mut args = vec!["--dry-run"];
    args.extend(ADOPT);
    let shadow = Flotilla::start(&hub, "shadow", &args);
    shadow.wait_ready(WAIT).await;
    let plan = eventually("east's plan", WAIT, &shadow, || async {
        let (code, body) = shadow.get("/debug/clusters/east/plan").await;
        (code == 200).then(|| serde_json::from_str::<serde_json::Value>(&body).unwrap())
    })
    .await;
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    assert_eq!(
        names(&plan["plan"]["adopt"]),
        [format!("DestinationRule {SYNC}/{GREETING_DR}"), format!("ServiceEntry {SYNC}/{GREETING_SE}")],
        "{plan}"
    );
    assert_eq!(names(&plan["plan"]["admiralLeftovers"]), [format!("ServiceEntry {SYNC}/{RETIRED_SE}")]);
    assert!(names(&plan["plan"]["conflicts"]).is_empty() && names(&plan["plan"]["prune"]).is_empty(), "{plan}");
    assert!(names(&plan["plan"]["create"]).contains(&"Sidecar caller/caller-egress".to_string()), "{plan}");
    assert_eq!(shadow.metric_with("flotilla_dry_run_planned", "cluster=\"east\",action=\"adopt\"").await, 2.0);
    // The same, as a table on a terminal.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["status", "--url", &format!("http://{}", shadow.http_addr())])
        .output()
        .unwrap();
    let table = String::from_utf8(status.stdout).unwrap();
    assert!(status.status.success(), "{table}{}", String::from_utf8_lossy(&status.stderr));
    assert!(table.starts_with("flotilla: ready, not leading, not converged (dry run: writes nothing)"), "{table}");
    let mut plans = table.lines().skip_while(|l| !l.starts_with("PLAN"));
    let row = plans.find(|l| l.starts_with("east ")).unwrap_or_else(|| panic!("{table}"));
    let figures: Vec<&str> = row.split_whitespace().collect();
    let planned = names(&plan["plan"]["create"]).len().to_string();
    // create, update, adopt, prune, conflicts, Admiral's left in place
    assert_eq!(figures, ["east", planned.as_str(), "0", "2", "0", "0", "1"], "{table}");
    let view = shadow.json("/debug/clusters").await;
    assert_eq!((view["dryRun"].clone(), view["leader"].clone()), (json!(true), json!(false)), "{view}");
    assert_eq!(shadow.metric("flotilla_api_writes_total").await, 0.0, "{}", shadow.log_tail());
    let store: Api<ConfigMap> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    assert!(store.get_opt("flotilla-vips").await.unwrap().is_none(), "a dry run stores no address");
    let leases: Api<Lease> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    assert!(leases.list(&ListParams::default()).await.unwrap().items.is_empty(), "a dry run takes no lease");
    let events: Api<Event> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    assert!(events.list(&ListParams::default()).await.unwrap().items.is_empty(), "a dry run publishes no Event");
    assert_eq!([versions(west).await, versions(east).await], before, "Admiral's objects are untouched");
    drop(shadow);

    // Admiral stops (it is not running here); flotilla takes over while every object is read
    // every 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(vec![("west".into(), west.clone()), ("east".into(), east.clone())], stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let flotilla = Flotilla::start(&hub, "takeover", &ADOPT);
    flotilla.wait_ready(WAIT).await;
    for client in [west, east] {
        eventually("greeting's objects carry flotilla's label", WAIT, &flotilla, || async {
            let se = get_se(client, GREETING_SE).await?;
            let dr = get_dr(client, GREETING_DR).await?;
            let ours = |m: &kube::api::ObjectMeta| flotilla::meta::is_managed(m);
            (ours(&se.metadata) && ours(&dr.metadata)).then_some(())
        })
        .await;
    }
    let adopted_in = started.elapsed();
    converged(&flotilla).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    let adopts = flotilla.metric_with("flotilla_api_writes_total", "verb=\"adopt\"").await;
    // (A sum of no samples is -0.)
    let deletes = flotilla.metric_with("flotilla_api_writes_total", "verb=\"delete\"").await.abs();
    println!(
        "cutover: 2 members, 4 adopted objects, {} sample rounds of 100 ms, gaps {:?}, VIPs changed {}, adopt writes {adopts}, deletes {deletes}, adopted everything {:.1} s after start",
        samples.rounds,
        samples.gaps,
        samples.vip_changes,
        adopted_in.as_secs_f64()
    );
    assert!(samples.rounds >= 10, "{samples:?}");
    assert!(samples.gaps.is_empty(), "an object was missing during the cutover: {samples:?}");
    assert_eq!(samples.vip_changes, 0, "{samples:?}");
    assert_eq!((adopts, deletes), (4.0, 0.0), "one apply per adopted object, no delete\n{}", flotilla.log_tail());

    // The same objects (never deleted and created again), now flotilla's, with Admiral's address.
    let after = [versions(west).await, versions(east).await];
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((&b.0, &b.2), (&a.0, &a.2), "same uid: taken over in place");
        assert_ne!((&b.1, &b.3), (&a.1, &a.3), "written once");
    }
    let se = get_se(east, GREETING_SE).await.unwrap();
    assert_eq!(se.spec.addresses, [ADMIRAL_VIP]);
    assert_eq!(endpoints(&se), ["10.0.0.1"]);
    assert!(se.spec.export_to.is_empty(), "Admiral's field is gone: the object is flotilla's content");
    let mark = |m: &kube::api::ObjectMeta| flotilla::meta::is_admirals(m);
    assert!(mark(&se.metadata), "Admiral's annotation stays for a rollback, also through a replace");
    assert!(mark(&get_dr(east, GREETING_DR).await.unwrap().metadata));
    let managers: Vec<_> = se.metadata.managed_fields.iter().flatten().map(|m| m.manager.clone().unwrap()).collect();
    assert!(managers.contains(&"flotilla".to_string()), "{managers:?}");
    let stored = store.get("flotilla-vips").await.unwrap().data.unwrap();
    assert_eq!(stored.get("stage.greeting.global").map(String::as_str), Some(ADMIRAL_VIP), "{stored:?}");
    // Admiral's object for a host flotilla does not write: listed, untouched.
    assert_eq!(get_se(east, RETIRED_SE).await.unwrap().metadata.resource_version, retired_before);
    let view = flotilla.json("/debug/clusters").await;
    assert_eq!(view["clusters"]["east"]["admiralLeftovers"], json!([format!("ServiceEntry {SYNC}/{RETIRED_SE}")]));
    // A restart adopts nothing again and writes nothing.
    let mut flotilla = flotilla;
    flotilla.terminate();
    flotilla.restart();
    flotilla.wait_ready(WAIT).await;
    converged(&flotilla).await;
    assert_eq!(flotilla.metric("flotilla_api_writes_total").await, 0.0, "{}", flotilla.log_tail());

    // An Admiral that was not stopped rewrites an object as its own (an update of the whole
    // object, as Admiral writes): flotilla does not take it over again, and says why.
    let drs: Api<DestinationRule> = Api::namespaced(east.clone(), SYNC);
    let mut rewritten = admirals_destination_rule();
    rewritten.metadata.resource_version = drs.get(GREETING_DR).await.unwrap().metadata.resource_version;
    drs.replace(GREETING_DR, &PostParams::default(), &rewritten).await.unwrap();
    let key = format!("DestinationRule {SYNC}/{GREETING_DR}");
    eventually("the rewritten object reported as a conflict", WAIT, &flotilla, || async {
        let view = flotilla.json("/debug/clusters").await;
        view["clusters"]["east"]["conflicts"].as_array()?.iter().any(|c| c == &json!(key)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dr = get_dr(east, GREETING_DR).await.unwrap();
    assert!(!flotilla::meta::is_managed(&dr.metadata), "not taken over a second time: {:?}", dr.metadata);
    assert!(flotilla.logs().iter().any(|l| l.contains("Admiral still runs")), "{}", flotilla.log_tail());
}

/// Admiral's remote RBAC (install/admiralremote: read, create/update/delete in the sync
/// namespace, update of Sidecars): what flotilla lacks with it, named before the switch.
#[tokio::test(flavor = "multi_thread")]
async fn preflight_names_what_admirals_member_credentials_lack() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["west"]).await;
    let west = &clients[0];
    apply(west, &namespace(SYNC)).await;
    install_admirals_remote_rbac(west).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(west.clone(), SYNC);
    let request = k8s_openapi::api::authentication::v1::TokenRequest::default();
    let token = accounts.create_token_request("admiral", &PostParams::default(), &request).await.unwrap();
    let token = token.status.unwrap().token;
    let secrets: Api<Secret> = Api::namespaced(hub_client.clone(), FLOTILLA_NAMESPACE);
    let registered = secret("admiral-west", "admiral/sync", &[("west", members[0].kubeconfig_for("admiral", &token))]);
    secrets.create(&PostParams::default(), &registered).await.unwrap();

    let (code, stdout, stderr) = preflight(&hub);
    assert_eq!(code, 1, "{stdout}{stderr}");
    for missing in [
        "patch serviceentries.networking.istio.io in admiral-sync",
        "patch destinationrules.networking.istio.io in admiral-sync",
        "patch virtualservices.networking.istio.io in admiral-sync",
        "patch sidecars.networking.istio.io (all namespaces)",
        "create sidecars.networking.istio.io (all namespaces)",
        "list dependencies.admiral.io (all namespaces)",
        "patch globaltrafficpolicies/status.admiral.io (all namespaces)",
    ] {
        assert!(stdout.contains(missing), "{missing:?} not reported:\n{stdout}");
    }
    assert!(stdout.contains("west     FAIL    16 of 54 permissions missing"), "{stdout}");
    assert!(!stdout.contains("list deployments.apps"), "granted by Admiral's role: {stdout}");
    assert!(!stdout.contains(&token) && !stderr.contains(&token), "no credential in the output");

    // The same member with the admin's credentials: everything granted.
    let admin = secret("admiral-west", "admiral/sync", &[("west", members[0].admin_kubeconfig())]);
    apply(&hub_client, &admin).await;
    let (code, stdout, _) = preflight(&hub);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("west     ok      "), "{stdout}");
}

/// `flotilla preflight` against `hub`: (exit code, stdout, stderr).
fn preflight(hub: &testenv::TestCluster) -> (i32, String, String) {
    let dir = testenv::scratch_dir("preflight");
    let kubeconfig = dir.join("hub.kubeconfig");
    std::fs::write(&kubeconfig, hub.admin_kubeconfig()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["preflight", "--kubeconfig", kubeconfig.to_str().unwrap(), "--namespace", FLOTILLA_NAMESPACE])
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

/// The member side of Admiral's install (install/admiralremote/base/remote.yaml), in short.
async fn install_admirals_remote_rbac(client: &Client) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    fn typed<K: serde::de::DeserializeOwned>(v: serde_json::Value) -> K {
        serde_json::from_value(v).unwrap()
    }
    let rbac = "rbac.authorization.k8s.io/v1";
    let subjects = json!([{"kind": "ServiceAccount", "name": "admiral", "namespace": SYNC}]);
    let binding = |kind: &str, name: &str, role_kind: &str, namespace: Option<&str>| {
        json!({"apiVersion": rbac, "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name}, "subjects": subjects})
    };
    let account =
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "admiral", "namespace": SYNC}});
    apply::<ServiceAccount>(client, &typed(account)).await;
    let read = json!({"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": "admiral-sync-read"}, "rules": [
        {"apiGroups": ["", "apps"], "resources": ["pods", "services", "nodes", "deployments", "namespaces"], "verbs": ["get", "watch", "list"]},
        {"apiGroups": ["networking.istio.io"], "resources": ["virtualservices", "destinationrules", "serviceentries", "envoyfilters", "gateways", "sidecars"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["admiral.io"], "resources": ["globaltrafficpolicies", "routingpolicies", "trafficconfigs", "outlierdetections"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["argoproj.io"], "resources": ["rollouts"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": ["get", "watch", "list"]},
    ]});
    apply::<ClusterRole>(client, &typed(read)).await;
    apply::<ClusterRoleBinding>(
        client,
        &typed(binding("ClusterRoleBinding", "admiral-sync-read", "ClusterRole", None)),
    )
    .await;
    let sidecars = json!({"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": "admiral-sidecar-write"}, "rules": [
        {"apiGroups": ["networking.istio.io"], "resources": ["sidecars"], "verbs": ["get", "list", "update"]},
    ]});
    apply::<ClusterRole>(client, &typed(sidecars)).await;
    let bound = binding("ClusterRoleBinding", "admiral-sidecar-write", "ClusterRole", None);
    apply::<ClusterRoleBinding>(client, &typed(bound)).await;
    let write = json!({"apiVersion": rbac, "kind": "Role", "metadata": {"name": "admiral-sync-write", "namespace": SYNC}, "rules": [
        {"apiGroups": ["networking.istio.io"], "resources": ["virtualservices", "destinationrules", "serviceentries", "gateways"], "verbs": ["create", "update", "delete"]},
    ]});
    apply::<Role>(client, &typed(write)).await;
    apply::<RoleBinding>(client, &typed(binding("RoleBinding", "admiral-sync-write", "Role", Some(SYNC)))).await;
}
