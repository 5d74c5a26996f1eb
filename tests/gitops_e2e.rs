//! The GitOps preview recipe (examples/gitops/preview.sh, docs/gitops.md) against a live fleet:
//! a GTP weight change in a pull request's policies names exactly the DestinationRules and
//! members it changes; a new Dependency shows its ServiceEntry, DestinationRule and Sidecar in
//! the client's member only; unchanged policies exit 0, changes exit 3, errors exit 1. And
//! `flotilla explain --live` says why a host is where it is.

mod testenv;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use testenv::builders::apply;
use testenv::controller::{FLOTILLA_NAMESPACE, Flotilla, eventually};
use testenv::fleet::*;

fn write_yaml<T: serde::Serialize>(dir: &Path, file: &str, objects: &[T]) {
    std::fs::create_dir_all(dir).unwrap();
    let text: String = objects.iter().map(|o| format!("---\n{}", flotilla::yaml::to_yaml(o))).collect();
    std::fs::write(dir.join(file), text).unwrap();
}

/// Runs the recipe: (exit code, stdout, stderr).
fn preview(policies: &Path, out: &Path, hub_kubeconfig: &Path) -> (i32, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gitops/preview.sh");
    let run = Command::new(script)
        .arg(policies)
        .arg(out)
        .env("FLOTILLA", env!("CARGO_BIN_EXE_flotilla"))
        .env("HUB_KUBECONFIG", hub_kubeconfig)
        .env("FLOTILLA_NAMESPACE", FLOTILLA_NAMESPACE)
        .output()
        .expect("running preview.sh");
    (
        run.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&run.stdout).into(),
        String::from_utf8_lossy(&run.stderr).into(),
    )
}

fn diff_json(before: &Path, after: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["diff", "--format", "json"])
        .arg(before)
        .arg(after)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (member, verb, kind/name) of every object change in a JSON diff.
fn changes(d: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (member, cd) in d["clusters"].as_object().unwrap() {
        for verb in ["create", "change", "prune"] {
            for c in cd[verb].as_array().unwrap() {
                out.push((
                    member.clone(),
                    verb.to_string(),
                    format!("{} {}", c["kind"].as_str().unwrap(), c["name"].as_str().unwrap()),
                ));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_requests_policies_previewed_by_their_effect() {
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let (hub, members, hub_client, clients) = start_fleet(&["git-west", "git-east"]).await;
    let (west, east) = (&clients[0], &clients[1]);
    prepare_member(west, "us-west-2", "10.0.6.1").await;
    prepare_member(east, "us-east-2", "10.0.6.2").await;
    let flotilla = Flotilla::start(&hub, "gitops", &[]);
    let kubeconfigs: Vec<(&str, String)> = members.iter().map(|m| (m.name.as_str(), m.admin_kubeconfig())).collect();
    apply(&hub_client, &secret("members", "istio/multiCluster", &kubeconfigs)).await;
    deploy(west, "greeting", "greeting").await;
    deploy(west, "other", "other").await;
    deploy(east, "caller", "caller").await;
    let weights = |w: i32| json!([{"dnsPrefix": "default", "lbType": "FAILOVER", "target": [{"region": "us-west-2", "weight": w}, {"region": "us-east-2", "weight": 100 - w}]}]);
    let live_gtp = gtp("greeting", "greeting-gtp", "greeting", weights(80));
    let live_dep = dependency("caller", "caller-deps", "caller", &["greeting"]);
    apply(west, &live_gtp).await;
    apply(east, &live_dep).await;
    eventually("caller's Sidecar", WAIT, &flotilla, || async {
        kube::Api::<flotilla::istio::Sidecar>::namespaced(east.clone(), "caller")
            .get_opt("caller-egress")
            .await
            .unwrap()
    })
    .await;
    converged(&flotilla).await;

    let scratch = testenv::scratch_dir("gitops");
    let hub_kubeconfig = scratch.join("hub.kubeconfig");
    std::fs::write(&hub_kubeconfig, hub.admin_kubeconfig()).unwrap();
    let repo = |name: &str, gtp: &flotilla::crd::GlobalTrafficPolicy, deps: &[flotilla::crd::Dependency]| {
        let dir = scratch.join(name);
        write_yaml(&dir.join("git-west"), "policies.yaml", std::slice::from_ref(gtp));
        write_yaml(&dir.join("git-east"), "policies.yaml", deps);
        dir
    };

    // The repository as it is live: nothing would change.
    let same = repo("same", &live_gtp, std::slice::from_ref(&live_dep));
    let (code, stdout, stderr) = preview(&same, &scratch.join("run-same"), &hub_kubeconfig);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("No changes"), "{stdout}");

    // A weight change: exactly greeting's DestinationRule, in both members that hold it.
    let reweighted =
        repo("reweighted", &gtp("greeting", "greeting-gtp", "greeting", weights(30)), std::slice::from_ref(&live_dep));
    let run = scratch.join("run-weights");
    let (code, stdout, stderr) = preview(&reweighted, &run, &hub_kubeconfig);
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    assert!(stdout.contains("us-west-2: 30"), "{stdout}");
    let found = changes(&diff_json(&run.join("before"), &run.join("after")));
    let dr = "DestinationRule stage.greeting.global-default-dr".to_string();
    assert_eq!(
        found,
        [("git-east".into(), "change".into(), dr.clone()), ("git-west".into(), "change".into(), dr)],
        "{stdout}"
    );

    // A new Dependency: the destination's ServiceEntry and DestinationRule, and the client's
    // Sidecar, in the client's member only.
    let more = dependency("caller", "caller-deps", "caller", &["greeting", "other"]);
    let widened = repo("widened", &live_gtp, std::slice::from_ref(&more));
    let run = scratch.join("run-dependency");
    let (code, stdout, stderr) = preview(&widened, &run, &hub_kubeconfig);
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    let found = changes(&diff_json(&run.join("before"), &run.join("after")));
    assert_eq!(
        found,
        [
            ("git-east".to_string(), "create".to_string(), "DestinationRule stage.other.global-default-dr".to_string()),
            ("git-east".into(), "create".into(), "ServiceEntry stage.other.global-se".into()),
            ("git-east".into(), "change".into(), "Sidecar caller-egress".into()),
        ],
        "{stdout}"
    );

    // An error is exit 1.
    let (code, _, stderr) = preview(&scratch.join("no-such-repo"), &scratch.join("run-error"), &hub_kubeconfig);
    assert_eq!(code, 1, "{stderr}");

    // explain --live: the client brought greeting to east, through its Dependency.
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "explain",
            "stage.greeting.global",
            "--live",
            "--format",
            "json",
            "--namespace",
            FLOTILLA_NAMESPACE,
            "--kubeconfig",
        ])
        .arg(&hub_kubeconfig)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let explained: Value = serde_json::from_slice(&out.stdout).unwrap();
    let why = explained["clusters"]["git-east"].to_string();
    assert!(why.contains("caller") && why.contains("git-east/caller/caller-deps"), "{explained:#}");
    assert!(explained["clusters"]["git-west"].to_string().contains("source"), "{explained:#}");
    assert_eq!(explained["identity"]["policies"][0]["state"], "Ready", "{explained:#}");
    let _ = std::fs::remove_dir_all(&scratch);
}
