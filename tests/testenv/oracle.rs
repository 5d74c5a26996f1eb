//! The oracle: what flotilla owns in the members must be exactly what `render` says for a
//! snapshot of the same fleet. Objects are compared by content (the digest of the typed spec and
//! of flotilla's labels, as the planner compares them), and a mismatch is shown in full.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla::compute::plan::ObservedObject;
use flotilla::compute::{DesiredObject, ObjectKey};
use flotilla::istio::{DestinationRule, ServiceEntry, Sidecar, VirtualService};
use flotilla::meta::is_managed;
use flotilla::render::Rendered;
use flotilla::settings::Settings;
use kube::api::ListParams;
use kube::{Api, Client};

/// Runs `flotilla snapshot` against the hub whose admin kubeconfig is `hub_kubeconfig`, into
/// `out`; returns its stderr. Panics with that stderr when it fails.
pub fn snapshot(hub_kubeconfig: &str, namespace: &str, out: &Path) -> String {
    let kubeconfig = out.with_extension("kubeconfig");
    std::fs::write(&kubeconfig, hub_kubeconfig).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["snapshot", "--namespace", namespace, "--kubeconfig"])
        .arg(&kubeconfig)
        .arg(out)
        .output()
        .expect("running flotilla snapshot");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "flotilla snapshot failed:\n{stderr}");
    stderr
}

/// `render` of a fleet directory with the default settings, as the library does it.
pub fn render(dir: &Path) -> Rendered {
    let loaded = flotilla::fleet_dir::load(dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    flotilla::render::render(loaded, &Settings::default(), "flotilla-vips")
}

/// Every object flotilla owns in a member: its ServiceEntries and DestinationRules in the sync
/// namespace and its Sidecars anywhere.
pub async fn owned(client: &Client, sync_namespace: &str) -> BTreeMap<ObjectKey, DesiredObject> {
    let mut out = BTreeMap::new();
    let lp = ListParams::default();
    let ses = Api::<ServiceEntry>::namespaced(client.clone(), sync_namespace).list(&lp).await.unwrap();
    out.extend(
        ses.items.into_iter().map(DesiredObject::ServiceEntry).filter(|o| is_managed(o.meta())).map(|o| (o.key(), o)),
    );
    let drs = Api::<DestinationRule>::namespaced(client.clone(), sync_namespace).list(&lp).await.unwrap();
    out.extend(
        drs.items
            .into_iter()
            .map(DesiredObject::DestinationRule)
            .filter(|o| is_managed(o.meta()))
            .map(|o| (o.key(), o)),
    );
    let sidecars = Api::<Sidecar>::all(client.clone()).list(&lp).await.unwrap();
    out.extend(
        sidecars.items.into_iter().map(DesiredObject::Sidecar).filter(|o| is_managed(o.meta())).map(|o| (o.key(), o)),
    );
    let aliases = Api::<VirtualService>::namespaced(client.clone(), sync_namespace).list(&lp).await.unwrap();
    out.extend(
        aliases.into_iter().map(DesiredObject::VirtualService).filter(|o| is_managed(o.meta())).map(|o| (o.key(), o)),
    );
    out
}

/// Compares what each member holds with what `rendered` says it should hold. Returns one
/// readable entry per difference (empty when they agree).
pub async fn differences(rendered: &Rendered, members: &[(&str, &Client)], sync_namespace: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (member, client) in members {
        let want: BTreeMap<ObjectKey, DesiredObject> =
            rendered.clusters.get(*member).into_iter().flatten().map(|o| (o.key.clone(), o.object())).collect();
        let have = owned(client, sync_namespace).await;
        for (key, object) in &want {
            match have.get(key) {
                None => found.push(format!("member {member}: {key} is missing; render says:\n{}", show(object))),
                Some(h) if ObservedObject::new(h).digest != ObservedObject::new(object).digest => found.push(format!(
                    "member {member}: {key} differs.\nrender says:\n{}\nthe member holds:\n{}",
                    show(object),
                    show(h)
                )),
                Some(_) => {}
            }
        }
        for (key, object) in &have {
            if !want.contains_key(key) {
                found.push(format!("member {member}: {key} is held but render does not want it:\n{}", show(object)));
            }
        }
    }
    found
}

fn show(object: &DesiredObject) -> String {
    flotilla::yaml::to_yaml(object)
}

/// A directory for a snapshot, removed first.
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Snapshots the fleet into `dir` and compares until what the members hold equals render of
/// the snapshot, or `patience` runs out: the fleet's inputs may still be on their way to
/// flotilla when a test stops changing them, so equality is what it converges to, not what it
/// shows at once. Returns the last render and the differences left (empty: equal).
pub async fn converge_to_render(
    hub_kubeconfig: &str,
    namespace: &str,
    members: &[(&str, &Client)],
    sync_namespace: &str,
    dir: &Path,
    patience: std::time::Duration,
) -> (Rendered, Vec<String>) {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        snapshot(hub_kubeconfig, namespace, dir);
        let rendered = render(dir);
        let found = differences(&rendered, members, sync_namespace).await;
        if found.is_empty() || tokio::time::Instant::now() >= deadline {
            return (rendered, found);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
