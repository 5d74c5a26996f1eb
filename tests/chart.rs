//! The Helm charts: lint and template over every values file in `ci/`, the security and RBAC
//! properties a platform team checks, the rendered manifests accepted by a real API server, and a
//! fleet run only with the charts' RBAC, onboarded through `flotilla register-cluster`.

mod testenv;

use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla::crd::GlobalTrafficPolicy;
use flotilla::istio::{DestinationRule, ServiceEntry, Sidecar};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client};
use serde_json::{Value, json};
use testenv::builders::{apply, deployment, gateway_service, namespace, node, service, set_load_balancer_ip};
use testenv::controller::{Flotilla, eventually};
use testenv::{TEST_MANAGER, TestCluster, start_clusters};

/// What the chart's debug-reader role grants: the debug views and Admiral's read API.
const DEBUG_READER_URLS: [&str; 5] = ["/debug", "/debug/*", "/clusters", "/cluster/*", "/identity/*"];
const HELM_HINT: &str = "install it with: scripts/helm-install (or set FLOTILLA_HELM)";
const PROMTOOL_HINT: &str = "build it with: scripts/promtool-install (or set FLOTILLA_PROMTOOL)";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn helm_binary() -> PathBuf {
    let path = std::env::var_os("FLOTILLA_HELM").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/flotilla/tools/helm-v4.1.4/helm")
    });
    assert!(path.exists(), "helm not found at {}; {HELM_HINT}", path.display());
    path
}

fn promtool_binary() -> PathBuf {
    let path = std::env::var_os("FLOTILLA_PROMTOOL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/flotilla/tools/promtool-v0.316.0/promtool")
    });
    assert!(path.exists(), "promtool not found at {}; {PROMTOOL_HINT}", path.display());
    path
}

/// Runs promtool in `dir`; panics with its output unless it succeeds.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(promtool_binary()).args(args).current_dir(dir).output().expect("running promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {}:\n{text}", args.join(" "));
    text
}

/// The chart's PrometheusRule (release namespace `flotilla`) as a Prometheus rules file.
fn rendered_alerts(set: &[&str]) -> Value {
    let mut set = set.to_vec();
    set.push("metrics.prometheusRule.enabled=true");
    let docs = template("flotilla", "charts/flotilla", "flotilla", "charts/flotilla/values.yaml", &set);
    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1, "one PrometheusRule");
    rules[0]["spec"].clone()
}

/// The chart's Grafana dashboard, from its ConfigMap.
fn rendered_dashboard() -> (Value, Value) {
    let set = ["metrics.dashboard.enabled=true", "metrics.dashboard.folder=Mesh"];
    let docs = template("flotilla", "charts/flotilla", "flotilla", "charts/flotilla/values.yaml", &set);
    let maps: Vec<&Value> =
        of_kind(&docs, "ConfigMap").into_iter().filter(|c| c["metadata"]["name"] == "flotilla-dashboard").collect();
    assert_eq!(maps.len(), 1, "one dashboard ConfigMap");
    let dashboard = serde_json::from_str(maps[0]["data"]["flotilla.json"].as_str().unwrap()).expect("dashboard JSON");
    (maps[0].clone(), dashboard)
}

/// Every PromQL query of the dashboard (panels and variables), with Grafana's variables given
/// values Prometheus accepts.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("every target has an expr").to_string());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        // label_values(<selector>, <label>) is Grafana's; its selector is PromQL.
        if let Some(q) = variable["query"]["query"].as_str()
            && let Some(inner) = q.strip_prefix("label_values(").and_then(|q| q.rsplit_once(',')).map(|(s, _)| s)
        {
            queries.push(inner.to_string());
        }
    }
    queries
        .into_iter()
        .map(|q| q.replace("$__rate_interval", "5m").replace("$namespace", "flotilla").replace("$cluster", ".*"))
        .collect()
}

/// The metric names a query reads (all of flotilla's start with `flotilla_`).
fn metric_names(query: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = query;
    while let Some(at) = rest.find("flotilla_") {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// Runs helm; Ok(stdout) or Err(stderr).
fn helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm_binary()).args(args).current_dir(root()).output().expect("running helm");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// `helm template` of a chart with a values file, parsed into documents.
fn template(release: &str, chart: &str, namespace: &str, values: &str, set: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", release, chart, "--namespace", namespace, "-f", values];
    for s in set {
        args.extend(["--set", s]);
    }
    let text = helm(&args).unwrap_or_else(|e| panic!("helm template {chart} -f {values}: {e}"));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("parsing {values}: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn values_files(chart: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(root().join(chart).join("ci"))
        .unwrap()
        .map(|e| format!("{chart}/ci/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    files.sort();
    files
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn rules_granting<'a>(docs: &'a [Value], kind: &str, resource: &str) -> Vec<&'a Value> {
    of_kind(docs, kind)
        .into_iter()
        .filter(|r| r["rules"].as_array().unwrap().iter().any(|rule| rule["resources"].to_string().contains(resource)))
        .collect()
}

#[test]
fn the_hub_chart_lints_templates_and_is_locked_down() {
    let hub_crds = std::fs::read_to_string(root().join("charts/flotilla/crds/admiral.io.yaml")).unwrap();
    assert_eq!(hub_crds, flotilla::crd::crds_yaml(), "charts/flotilla/crds is out of date: copy crds/admiral.io.yaml");
    let files = values_files("charts/flotilla");
    assert_eq!(files.len(), 3, "default, HA and everything-enabled: {files:?}");
    for values in &files {
        helm(&["lint", "--strict", "charts/flotilla", "-f", values]).unwrap_or_else(|e| panic!("lint {values}: {e}"));
        let docs = template("flotilla", "charts/flotilla", "flotilla", values, &[]);
        let deployment = of_kind(&docs, "Deployment")[0];
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{values}");
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{values}");
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{values}");
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{values}");
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]), "{values}");
        assert!(c["resources"]["requests"]["memory"].is_string(), "{values}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        // Probes on the plain port; the views behind authentication on the HTTPS one.
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], "http");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http");
        let ports: Vec<&str> = c["ports"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(ports, ["http", "https"], "{values}");
        // The hub role reviews tokens and access, and may do nothing else with them.
        let hub_role = of_kind(&docs, "ClusterRole").into_iter().find(|r| r["metadata"]["name"] == "flotilla").unwrap();
        for (group, resource) in
            [("authentication.k8s.io", "tokenreviews"), ("authorization.k8s.io", "subjectaccessreviews")]
        {
            let rules = hub_role["rules"].as_array().unwrap();
            let rule =
                rules.iter().find(|r| r["resources"] == json!([resource])).unwrap_or_else(|| panic!("{resource}"));
            assert_eq!((&rule["apiGroups"], &rule["verbs"]), (&json!([group]), &json!(["create"])), "{values}");
        }
        // The reader roles tests/security_e2e.rs exercises, rule for rule.
        for (role, urls) in
            [("flotilla-metrics-reader", json!(["/metrics"])), ("flotilla-debug-reader", json!(DEBUG_READER_URLS))]
        {
            let found = of_kind(&docs, "ClusterRole").into_iter().find(|r| r["metadata"]["name"] == role);
            let rules = &found.unwrap_or_else(|| panic!("{values}: no {role}"))["rules"];
            assert_eq!(rules, &json!([{"nonResourceURLs": urls, "verbs": ["get"]}]), "{values}");
        }
        // Secrets: read-only, through a Role in one namespace, never a ClusterRole.
        assert!(rules_granting(&docs, "ClusterRole", "secrets").is_empty(), "{values}: a ClusterRole grants Secrets");
        let secret_roles = rules_granting(&docs, "Role", "secrets");
        assert_eq!(secret_roles.len(), 1, "{values}");
        let secret_rule =
            secret_roles[0]["rules"].as_array().unwrap().iter().find(|r| r["resources"] == json!(["secrets"]));
        assert_eq!(secret_rule.unwrap()["verbs"], json!(["get", "list", "watch"]), "{values}");
        // Admiral's address store, when imported: get of that one ConfigMap, in its namespace.
        let stores: Vec<&Value> = rules_granting(&docs, "Role", "configmaps")
            .into_iter()
            .filter(|r| r["metadata"]["namespace"] == "admiral-sync")
            .collect();
        if values.contains("everything") {
            let rule = &stores[0]["rules"][0];
            assert_eq!(stores.len(), 1, "{values}");
            assert_eq!(rule["resourceNames"], json!(["se-address-configmap"]), "{values}");
            assert_eq!(rule["verbs"], json!(["get"]), "{values}");
            assert!(c["args"].to_string().contains("--import-vips-from=admiral-sync/se-address-configmap"));
            assert!(c["args"].to_string().contains("--adopt-from=admiral"));
            for arg in [
                "--tenancy=open",
                "--dependency-namespace=platform-deps,flotilla",
                "--subject-alt-names=identity",
                "--san-prefix=mesh.example.com",
                "--trust-domain=prod.example.com",
                "--prune-hold-threshold=500",
                "--prune-hold-share=0.5",
                "--prune-hold-window=30m",
                "--policy-identity-label=asset",
                "--env-key=app.example.com/env",
                "--additional-endpoint-suffix=example.internal",
                "--additional-endpoint-label=*",
            ] {
                assert!(c["args"].to_string().contains(arg), "{values}: {arg} in {}", c["args"]);
            }
        } else {
            // A new install enforces ownership and pins workloads' names (docs/security.md).
            for arg in ["--tenancy=owned", "--subject-alt-names=workload", "--trust-domain=cluster.local"] {
                assert!(c["args"].to_string().contains(arg), "{values}: {arg} in {}", c["args"]);
            }
            assert!(stores.is_empty(), "{values}: no import, no grant");
        }
        // Nothing in the hub writes Istio objects or reads workloads.
        for role in of_kind(&docs, "ClusterRole") {
            let text = role["rules"].to_string();
            assert!(!text.contains("networking.istio.io") && !text.contains("deployments"), "{values}: {text}");
        }
        // Every flag the values set reaches the command line.
        let args: Vec<String> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
        for flag in [
            "--sync-namespace=",
            "--sidecar-mode=",
            "--vip-mode=",
            "--secret-namespace=",
            "--leader-elect=",
            "--instance=",
        ] {
            assert!(args.iter().any(|a| a.starts_with(flag)), "{values}: {flag} missing from {args:?}");
        }
        let cli =
            <flotilla::cli::Cli as clap::Parser>::try_parse_from(std::iter::once("flotilla".to_string()).chain(args));
        assert!(cli.is_ok(), "{values}: the chart's arguments do not parse: {}", cli.unwrap_err());
    }
    let ha = template("flotilla", "charts/flotilla", "flotilla", "charts/flotilla/ci/ha-values.yaml", &[]);
    assert_eq!(of_kind(&ha, "Deployment")[0]["spec"]["replicas"], 2);
    assert_eq!(of_kind(&ha, "PodDisruptionBudget").len(), 1);
    let all = template("flotilla", "charts/flotilla", "flotilla", "charts/flotilla/ci/everything-values.yaml", &[]);
    let monitor = of_kind(&all, "ServiceMonitor");
    assert_eq!(monitor.len(), 1);
    let endpoint = &monitor[0]["spec"]["endpoints"][0];
    assert_eq!((&endpoint["port"], &endpoint["scheme"]), (&json!("https"), &json!("https")), "{endpoint}");
    assert_eq!(endpoint["bearerTokenFile"], "/var/run/secrets/kubernetes.io/serviceaccount/token");
    assert_eq!(endpoint["tlsConfig"]["insecureSkipVerify"], true, "asked for explicitly");
    // Verified by default: a mounted certificate gives the CA and the server name...
    let verified = template(
        "flotilla",
        "charts/flotilla",
        "flotilla",
        "charts/flotilla/ci/everything-values.yaml",
        &["metrics.serviceMonitor.insecureSkipVerify=false", "http.tls.secretName=flotilla-tls"],
    );
    let tls = &of_kind(&verified, "ServiceMonitor")[0]["spec"]["endpoints"][0]["tlsConfig"];
    assert_eq!(tls["ca"]["secret"], json!({"name": "flotilla-tls", "key": "ca.crt"}), "{tls}");
    assert_eq!(tls["serverName"], "flotilla.flotilla.svc", "{tls}");
    assert!(tls.get("insecureSkipVerify").is_none(), "{tls}");
    // ...and a self-signed one that nothing can verify is refused, saying what to do.
    let args = ["template", "flotilla", "charts/flotilla", "--namespace", "flotilla", "-f"];
    let refused = helm(
        &[
            &args[..],
            &["charts/flotilla/ci/everything-values.yaml", "--set", "metrics.serviceMonitor.insecureSkipVerify=false"],
        ]
        .concat(),
    )
    .expect_err("an unverifiable ServiceMonitor is refused");
    assert!(refused.contains("http.tls.secretName") && refused.contains("insecureSkipVerify"), "{refused}");
    // A mounted certificate and authentication off.
    let mounted = template(
        "flotilla",
        "charts/flotilla",
        "flotilla",
        "charts/flotilla/ci/default-values.yaml",
        &["http.tls.secretName=flotilla-tls"],
    );
    let pod = &of_kind(&mounted, "Deployment")[0]["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], "flotilla-tls");
    let args = pod["containers"][0]["args"].to_string();
    assert!(args.contains("--tls-cert-file=/etc/flotilla/tls/tls.crt") && !args.contains("--tls-san"), "{args}");
    let open = template(
        "flotilla",
        "charts/flotilla",
        "flotilla",
        "charts/flotilla/ci/default-values.yaml",
        &["http.auth=none"],
    );
    let open_role = of_kind(&open, "ClusterRole")[0]["rules"].to_string();
    assert!(!open_role.contains("tokenreviews"), "no review rights without authentication: {open_role}");
    let args = of_kind(&open, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--http-auth=none") && !args.contains("--secure-addr"), "{args}");
    let secret_role = rules_granting(&all, "Role", "secrets")[0];
    assert_eq!(secret_role["metadata"]["namespace"], "flotilla-clusters");

    // Bad values are refused before anything is applied.
    let bad = helm(&["template", "f", "charts/flotilla", "--set", "flotilla.sidecarMode=sometimes"]).unwrap_err();
    assert!(bad.contains("sidecarMode"), "{bad}");
    let unsafe_ha =
        helm(&["template", "f", "charts/flotilla", "--set", "replicaCount=2", "--set", "leaderElection.enabled=false"]);
    assert!(unsafe_ha.unwrap_err().contains("leaderElection"));
}

/// A rule that lets the role create or change Sidecars.
fn writes_sidecars(role: &Value) -> bool {
    role["rules"].as_array().unwrap().iter().any(|r| {
        r["resources"].as_array().unwrap().iter().any(|x| x == "sidecars") && r["verbs"].to_string().contains("patch")
    })
}

#[test]
fn the_member_chart_grants_only_what_the_sidecar_mode_needs() {
    for values in values_files("charts/flotilla-member") {
        helm(&["lint", "--strict", "charts/flotilla-member", "-f", &values])
            .unwrap_or_else(|e| panic!("lint {values}: {e}"));
    }
    let default = template(
        "flotilla-member",
        "charts/flotilla-member",
        "flotilla-system",
        "charts/flotilla-member/ci/default-values.yaml",
        &[],
    );
    let sync_role = rules_granting(&default, "Role", "serviceentries");
    assert_eq!(sync_role.len(), 1);
    assert_eq!(sync_role[0]["metadata"]["namespace"], "admiral-sync");
    for role in of_kind(&default, "ClusterRole") {
        let text = role["rules"].to_string();
        assert!(
            !text.contains("serviceentries") && !text.contains("destinationrules"),
            "SE/DR writable outside the sync namespace: {text}"
        );
        assert!(!text.contains("secrets"), "{text}");
    }
    let sidecar_writers = of_kind(&default, "ClusterRole").into_iter().filter(|r| writes_sidecars(r)).count();
    assert_eq!(sidecar_writers, 1, "generate mode writes Sidecars");
    assert_eq!(of_kind(&default, "Namespace")[0]["metadata"]["name"], "admiral-sync");

    let off = template(
        "flotilla-member",
        "charts/flotilla-member",
        "flotilla-system",
        "charts/flotilla-member/ci/everything-values.yaml",
        &[],
    );
    for role in of_kind(&off, "ClusterRole").into_iter().chain(of_kind(&off, "Role")) {
        assert!(!writes_sidecars(role), "sidecarMode=off still writes Sidecars: {role}");
    }
    assert!(of_kind(&off, "Namespace").is_empty());
    assert_eq!(rules_granting(&off, "Role", "serviceentries")[0]["metadata"]["namespace"], "mesh-sync");
}

#[test]
fn the_alerts_pass_their_promtool_unit_tests() {
    let dir = testenv::scratch_dir("alerts");
    let rules = rendered_alerts(&[]);
    let names: Vec<&str> =
        rules["groups"][0]["rules"].as_array().unwrap().iter().filter_map(|r| r["alert"].as_str()).collect();
    assert_eq!(
        names,
        [
            "FlotillaMemberStale",
            "FlotillaRegistrationFailing",
            "FlotillaWriteErrors",
            "FlotillaConflicts",
            "FlotillaPrunesHeld",
            "FlotillaTokenExpiringSoon",
            "FlotillaChangeToWriteSlow",
            "FlotillaNoLeader",
            "FlotillaTwoLeaders",
        ]
    );
    std::fs::write(dir.join("rules.yaml"), serde_json::to_string_pretty(&rules).unwrap()).unwrap();
    std::fs::copy(root().join("tests/promtool/alerts.test.yaml"), dir.join("flotilla.test.yaml")).unwrap();
    let checked = promtool(&dir, &["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    let tested = promtool(&dir, &["test", "rules", "flotilla.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a case in the unit tests.
    let tests = std::fs::read_to_string(dir.join("flotilla.test.yaml")).unwrap();
    for name in &names {
        assert!(tests.contains(&format!("alertname: {name}\n")), "{name} has no promtool test");
    }
    // A dry run never leads: no alert about leaders.
    let dry = rendered_alerts(&["flotilla.dryRun=true"]);
    let alerts = dry["groups"][0]["rules"].to_string();
    assert!(!alerts.contains("Leader") && alerts.contains("FlotillaMemberStale"), "{alerts}");
}

#[test]
fn every_dashboard_query_parses_and_the_sidecar_finds_it() {
    let (configmap, dashboard) = rendered_dashboard();
    assert_eq!(configmap["metadata"]["labels"]["grafana_dashboard"], "1", "{configmap}");
    assert_eq!(configmap["metadata"]["annotations"]["grafana_folder"], "Mesh", "{configmap}");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{queries:?}");
    // promtool parses PromQL only inside rules: each query becomes a recording rule.
    let rules: Vec<Value> =
        queries.iter().enumerate().map(|(i, q)| json!({"record": format!("dashboard:query{i}"), "expr": q})).collect();
    let dir = testenv::scratch_dir("dashboard");
    let file = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(dir.join("queries.yaml"), serde_json::to_string_pretty(&file).unwrap()).unwrap();
    let checked = promtool(&dir, &["check", "rules", "queries.yaml"]);
    assert!(checked.contains(&format!("SUCCESS: {} rules found", queries.len())), "{checked}");
}

/// Server-side applies a rendered document of any kind (resolved through discovery).
async fn apply_doc(client: &Client, doc: &Value) {
    let (group, version) = match doc["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), doc["apiVersion"].as_str().unwrap().to_string()),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, doc["kind"].as_str().unwrap());
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await.unwrap_or_else(|e| panic!("{gvk:?}: {e}"));
    let name = doc["metadata"]["name"].as_str().unwrap();
    let api: Api<DynamicObject> = match (caps.scope, doc["metadata"]["namespace"].as_str()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        _ => Api::all_with(client.clone(), &resource),
    };
    api.patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(doc))
        .await
        .unwrap_or_else(|e| panic!("{} {name} rejected: {e}", gvk.kind));
}

async fn apply_docs(client: &Client, docs: &[Value]) -> usize {
    let mut applied = 0;
    for doc in docs {
        // No Prometheus operator in the test environment: its CRDs are absent.
        if doc["kind"] == "ServiceMonitor" || doc["kind"] == "PrometheusRule" {
            continue;
        }
        apply_doc(client, doc).await;
        applied += 1;
    }
    applied
}

#[tokio::test(flavor = "multi_thread")]
async fn rendered_charts_are_accepted_by_an_api_server() {
    let cluster = TestCluster::start("charts").await;
    let client = cluster.client().await;
    for ns in ["flotilla", "flotilla-clusters", "flotilla-system", "mesh-sync", "admiral-sync"] {
        apply(&client, &namespace(ns)).await;
    }
    let mut applied = 0;
    for values in values_files("charts/flotilla") {
        applied += apply_docs(&client, &template("flotilla", "charts/flotilla", "flotilla", &values, &[])).await;
    }
    for values in values_files("charts/flotilla-member") {
        let docs = template("flotilla-member", "charts/flotilla-member", "flotilla-system", &values, &[]);
        applied += apply_docs(&client, &docs).await;
    }
    assert!(applied >= 30, "only {applied} documents applied");
}

/// A bound token for a ServiceAccount, straight from the API server.
async fn token_for(client: &Client, namespace: &str, name: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(3600), bound_object_ref: None },
        ..Default::default()
    };
    api.create_token_request(name, &PostParams::default(), &request).await.unwrap().status.unwrap().token
}

fn register_cluster(member: &TestCluster, dir: &Path) -> Secret {
    let kubeconfig = dir.join(format!("{}.kubeconfig", member.name));
    std::fs::write(&kubeconfig, member.admin_kubeconfig()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["register-cluster", "--kubeconfig", kubeconfig.to_str().unwrap(), "--region", "ignored-by-nodes"])
        .args(["--service-account-namespace", "flotilla-system", "--secret-namespace", "flotilla"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "register-cluster failed: {stderr}");
    assert!(stderr.contains("expires at"), "{stderr}");
    serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).expect("register-cluster prints a Secret")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_onboarded_with_the_charts_and_register_cluster_runs_on_chart_rbac_only() {
    let clusters = start_clusters(&["hub", "m-1", "m-2"]).await;
    let (hub, members) = (&clusters[0], &clusters[1..]);
    let hub_admin = hub.client().await;
    apply(&hub_admin, &namespace("flotilla")).await;
    // Prometheus's ServiceAccount, bound to the metrics reader role through the chart's values.
    let prometheus = ["kind=ServiceAccount", "name=prometheus", "namespace=monitoring"]
        .map(|kv| format!("metrics.readerRoles.subjects[0].{kv}"));
    let set: Vec<&str> = prometheus.iter().map(String::as_str).collect();
    apply_docs(
        &hub_admin,
        &template("flotilla", "charts/flotilla", "flotilla", "charts/flotilla/ci/default-values.yaml", &set),
    )
    .await;
    apply(&hub_admin, &namespace("monitoring")).await;
    let account: ServiceAccount = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "prometheus", "namespace": "monitoring"},
    }))
    .unwrap();
    apply(&hub_admin, &account).await;

    let scratch = testenv::scratch_dir("register");
    let mut admins = Vec::new();
    for (member, (region, ip)) in members.iter().zip([("us-west-2", "10.0.3.1"), ("us-east-2", "10.0.3.2")]) {
        let admin = member.client().await;
        apply(&admin, &namespace("flotilla-system")).await;
        let docs = template(
            "flotilla-member",
            "charts/flotilla-member",
            "flotilla-system",
            "charts/flotilla-member/ci/default-values.yaml",
            &[],
        );
        apply_docs(&admin, &docs).await;
        apply(&admin, &node("node-1", region)).await;
        apply(&admin, &namespace("istio-system")).await;
        apply(&admin, &gateway_service()).await;
        set_load_balancer_ip(&admin, "istio-system", "istio-eastwestgateway", ip).await;
        let secret = register_cluster(member, &scratch);
        assert_eq!(secret.metadata.name.as_deref(), Some(format!("flotilla-remote-{}", member.name).as_str()));
        let kubeconfig = &secret.string_data.as_ref().unwrap()[&member.name];
        assert!(!kubeconfig.contains(&member.admin_token), "the admin's token must not be in the Secret");
        apply(&hub_admin, &secret).await;
        admins.push(admin);
    }

    // flotilla with nothing but the hub chart's ServiceAccount.
    let token = token_for(&hub_admin, "flotilla", "flotilla").await;
    let mut flotilla = Flotilla::start_with_kubeconfig(
        &hub.kubeconfig_for("flotilla-sa", &token),
        "chart-rbac",
        &["--http-auth", "kubernetes"],
    );
    flotilla.wait_ready(testenv::PATIENCE).await;
    // What the ServiceMonitor does: /metrics over HTTPS with Prometheus's token. The chart's hub
    // role lets flotilla review it; the reader role lets Prometheus in, and nothing more.
    let scraper = token_for(&hub_admin, "monitoring", "prometheus").await;
    let (code, body, _) = flotilla.https_get("/metrics", Some(&scraper)).await;
    assert_eq!(code, 200, "{body}\n{}", flotilla.log_tail());
    assert!(body.contains("flotilla_passes_total"), "{body}");
    // register-cluster's expiry annotation (a token of an hour, by the member's limit) is read.
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    for member in ["m-1", "m-2"] {
        let line = format!("flotilla_token_expiry_timestamp_seconds{{cluster=\"{member}\"}} ");
        let expiry: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line}in /metrics:\n{body}"))
            .parse()
            .unwrap();
        assert!(expiry > wall + 600.0 && expiry < wall + 400.0 * 86400.0, "{member}: {expiry} vs now {wall}\n{body}");
    }
    assert_eq!(
        flotilla.https_get("/debug/clusters", Some(&scraper)).await.0,
        403,
        "the metrics role grants /metrics only"
    );
    assert_eq!(flotilla.https_get("/metrics", Some(&token)).await.0, 403, "flotilla's own account is no reader");
    assert_eq!(flotilla.https_get("/metrics", None).await.0, 401);
    flotilla.read_with_token(&hub.admin_token);
    let (west, east) = (&admins[0], &admins[1]);
    for (client, ns) in [(west, "greeting"), (east, "caller")] {
        apply(client, &namespace(ns)).await;
        apply(client, &deployment(ns, ns, ns, "stage")).await;
        apply(client, &service(ns, ns, "http", 80, 8080)).await;
    }
    let dep: flotilla::crd::Dependency = serde_json::from_value(json!({
        "apiVersion": "admiral.io/v1alpha1", "kind": "Dependency",
        "metadata": {"name": "caller-deps", "namespace": "caller"},
        "spec": {"source": "caller", "destinations": ["greeting"]},
    }))
    .unwrap();
    apply(east, &dep).await;
    let gtp: GlobalTrafficPolicy = serde_json::from_value(json!({
        "apiVersion": "admiral.io/v1alpha1", "kind": "GlobalTrafficPolicy",
        "metadata": {"name": "greeting-gtp", "namespace": "greeting", "labels": {"identity": "greeting", "env": "stage"}},
        "spec": {"policy": [{"dnsPrefix": "default", "lbType": "FAILOVER", "target": [{"region": "us-west-2", "weight": 90}, {"region": "us-east-2", "weight": 10}]}]},
    }))
    .unwrap();
    apply(west, &gtp).await;

    let wait = testenv::PATIENCE;
    for (client, name) in [(west, "m-1"), (east, "m-2")] {
        let ses: Api<ServiceEntry> = Api::namespaced(client.clone(), "admiral-sync");
        let drs: Api<DestinationRule> = Api::namespaced(client.clone(), "admiral-sync");
        eventually(&format!("SE and DR in {name}"), wait, &flotilla, || async {
            let se = ses.get_opt("stage.greeting.global-se").await.unwrap()?;
            let dr = drs.get_opt("stage.greeting.global-default-dr").await.unwrap()?;
            let distribute =
                serde_json::to_value(&dr.spec).unwrap()["trafficPolicy"]["loadBalancer"]["localityLbSetting"].clone();
            (!distribute.is_null()).then_some(se)
        })
        .await;
    }
    let sidecars: Api<Sidecar> = Api::namespaced(east.clone(), "caller");
    eventually("caller's Sidecar", wait, &flotilla, || async { sidecars.get_opt("caller-egress").await.unwrap() })
        .await;
    let gtps: Api<GlobalTrafficPolicy> = Api::namespaced(west.clone(), "greeting");
    eventually("the GTP's status, written with the member chart's RBAC", wait, &flotilla, || async {
        let status = gtps.get("greeting-gtp").await.unwrap().status?;
        status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
    assert_eq!(flotilla.metric("flotilla_api_write_errors_total").await, 0.0, "{}", flotilla.log_tail());
    // Every metric the chart's dashboard reads is in a live scrape, as Prometheus gets it.
    let (_, body, _) = flotilla.https_get("/metrics", Some(&scraper)).await;
    let scraped: std::collections::BTreeSet<&str> =
        body.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let (_, dashboard) = rendered_dashboard();
    let read: std::collections::BTreeSet<String> =
        dashboard_queries(&dashboard).iter().flat_map(|q| metric_names(q)).collect();
    let missing: Vec<&String> = read.iter().filter(|name| !scraped.contains(name.as_str())).collect();
    assert!(missing.is_empty(), "the dashboard reads {missing:?}, which /metrics does not have:\n{body}");
    assert!(read.len() >= 15, "{read:?}");
    // So does every alert.
    let alerts = rendered_alerts(&[]);
    let alerted: std::collections::BTreeSet<String> = alerts["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| metric_names(r["expr"].as_str().unwrap()))
        .collect();
    // Registration errors exist only while a Secret is refused (none is, here).
    let missing: Vec<&String> = alerted
        .iter()
        .filter(|name| *name != "flotilla_registration_errors" && !scraped.contains(name.as_str()))
        .collect();
    assert!(missing.is_empty(), "the alerts read {missing:?}, which /metrics does not have:\n{body}");
    let view = flotilla.json("/debug/clusters").await;
    for id in ["m-1", "m-2"] {
        assert_eq!(view["clusters"][id]["state"], "synced", "{view}");
        assert!(view["clusters"][id]["lastError"].is_null(), "{view}");
    }

    // The member's credentials cannot write outside the sync namespace, nor read Secrets.
    let secrets: Api<Secret> = Api::namespaced(hub_admin.clone(), "flotilla");
    let registered = secrets.get("flotilla-remote-m-1").await.unwrap();
    let kubeconfig = String::from_utf8(registered.data.unwrap()["m-1"].0.clone()).unwrap();
    let as_flotilla = testenv::client_from_kubeconfig(&kubeconfig).await;
    let outside: ServiceEntry = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "sneaky-se", "namespace": "default", "labels": {"app.kubernetes.io/managed-by": "flotilla"}},
        "spec": {"hosts": ["sneaky.example.com"], "location": "MESH_EXTERNAL", "resolution": "DNS", "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]},
    }))
    .unwrap();
    let err = Api::<ServiceEntry>::namespaced(as_flotilla.clone(), "default")
        .patch("sneaky-se", &PatchParams::apply("flotilla"), &Patch::Apply(&outside))
        .await
        .unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{err}");
    let err = Api::<Secret>::namespaced(as_flotilla, "flotilla-system").list(&Default::default()).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{err}");
    // The hub's ServiceAccount reads Secrets only in its own namespace.
    let as_hub = testenv::client_from_kubeconfig(&hub.kubeconfig_for("flotilla-sa", &token)).await;
    let err = Api::<Secret>::namespaced(as_hub, "default").list(&Default::default()).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{err}");
}
