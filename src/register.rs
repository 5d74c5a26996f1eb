//! `flotilla register-cluster`: the registration Secret for a member, like
//! `istioctl create-remote-secret`. It asks the member for a bound, expiring token of the
//! ServiceAccount the member chart created, and wraps it in a kubeconfig that holds only inline
//! data (no files, no exec plugin), so flotilla accepts it as is.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::json;

use crate::meta::is_dns_label;
use crate::meta::{ANNOTATION_GATEWAY_ADDRESS, ANNOTATION_GATEWAY_PORT, ANNOTATION_REGION, ANNOTATION_TRUST_DOMAIN};

/// Records when the token in the Secret expires, so that rotation can be scheduled.
pub const ANNOTATION_TOKEN_EXPIRES: &str = "flotilla.io/token-expires";

#[derive(Clone, Debug)]
pub struct RegisterOptions {
    /// The member's kubeconfig (default: $KUBECONFIG, then ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// The cluster id (default: the context's name).
    pub name: Option<String>,
    pub service_account: String,
    pub service_account_namespace: String,
    pub token_duration: Duration,
    pub secret_namespace: String,
    /// The API server URL the hub should use, when it differs from the kubeconfig's.
    pub server: Option<String>,
    pub region: Option<String>,
    pub gateway_address: Option<String>,
    pub gateway_port: Option<u16>,
    pub trust_domain: Option<String>,
}

/// A registration Secret as YAML, and the token's expiry (RFC 3339) for the caller to report.
pub async fn registration_secret(opts: &RegisterOptions) -> anyhow::Result<(String, String)> {
    let kc = match &opts.kubeconfig {
        Some(path) => Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?,
        None => Kubeconfig::read().context("reading the kubeconfig ($KUBECONFIG or ~/.kube/config)")?,
    };
    let context_name = opts
        .context
        .clone()
        .or_else(|| kc.current_context.clone())
        .ok_or_else(|| anyhow!("no --context given and the kubeconfig has no current-context"))?;
    let context = kc
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.clone())
        .ok_or_else(|| anyhow!("context {context_name:?} is not in the kubeconfig"))?;
    let cluster =
        kc.clusters.iter().find(|c| c.name == context.cluster).and_then(|c| c.cluster.clone()).ok_or_else(|| {
            anyhow!("cluster {:?} of context {context_name:?} is not in the kubeconfig", context.cluster)
        })?;
    let id = opts.name.clone().unwrap_or_else(|| context_name.clone());
    if !is_dns_label(&id) {
        bail!("cluster id {id:?} is not a DNS-1123 label; choose one with --name");
    }
    let server = opts
        .server
        .clone()
        .or(cluster.server.clone())
        .ok_or_else(|| anyhow!("cluster {:?} has no server; pass --server", context.cluster))?;
    // The hub cannot read our files: inline the CA.
    let ca_data = match (&cluster.certificate_authority_data, &cluster.certificate_authority) {
        (Some(data), _) => Some(data.clone()),
        (None, Some(path)) => {
            use base64::Engine as _;
            let pem = std::fs::read(path).with_context(|| format!("certificate-authority {path}"))?;
            Some(base64::engine::general_purpose::STANDARD.encode(pem))
        }
        (None, None) => None,
    };

    let options = KubeConfigOptions { context: Some(context_name.clone()), ..Default::default() };
    let config = kube::Config::from_custom_kubeconfig(kc, &options).await.context("member kubeconfig")?;
    let client = Client::try_from(config).context("member client")?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client, &opts.service_account_namespace);
    let account = format!("{}/{}", opts.service_account_namespace, opts.service_account);
    match accounts.get_opt(&opts.service_account).await {
        Ok(Some(_)) => {}
        Ok(None) => bail!(
            "ServiceAccount {account} does not exist in context {context_name:?}: install charts/flotilla-member there first"
        ),
        Err(e) => return Err(anyhow!("reading ServiceAccount {account}: {e}")),
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(i64::try_from(opts.token_duration.as_secs()).unwrap_or(i64::MAX)),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let issued = accounts
        .create_token_request(&opts.service_account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("requesting a token for {account}"))?;
    let status = issued.status.ok_or_else(|| anyhow!("the API server returned no token for {account}"))?;
    let expires = status.expiration_timestamp.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();

    let mut cluster_entry = json!({ "server": server });
    if let Some(ca) = ca_data {
        cluster_entry["certificate-authority-data"] = json!(ca);
    }
    if cluster.insecure_skip_tls_verify == Some(true) {
        eprintln!(
            "warning: context {:?} sets insecure-skip-tls-verify; `flotilla run` refuses such a member unless it is started with --allow-insecure-skip-tls-verify",
            opts.context.as_deref().unwrap_or("(current)")
        );
        cluster_entry["insecure-skip-tls-verify"] = json!(true);
    }
    if let Some(name) = &cluster.tls_server_name {
        cluster_entry["tls-server-name"] = json!(name);
    }
    let user = format!("flotilla-{id}");
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": id, "cluster": cluster_entry }],
        "users": [{ "name": user, "user": { "token": status.token } }],
        "contexts": [{ "name": id, "context": { "cluster": id, "user": user } }],
        "current-context": id,
    });
    let mut annotations = serde_json::Map::new();
    annotations.insert(ANNOTATION_TOKEN_EXPIRES.into(), json!(expires));
    if let Some(r) = &opts.region {
        annotations.insert(ANNOTATION_REGION.into(), json!(r));
    }
    if let Some(a) = &opts.gateway_address {
        annotations.insert(ANNOTATION_GATEWAY_ADDRESS.into(), json!(a));
    }
    if let Some(p) = opts.gateway_port {
        annotations.insert(ANNOTATION_GATEWAY_PORT.into(), json!(p.to_string()));
    }
    if let Some(td) = &opts.trust_domain {
        annotations.insert(ANNOTATION_TRUST_DOMAIN.into(), json!(td));
    }
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": format!("flotilla-remote-{id}"),
            "namespace": opts.secret_namespace,
            "labels": { "istio/multiCluster": "true" },
            "annotations": annotations,
        },
        "type": "Opaque",
        "stringData": { id.clone(): crate::yaml::to_yaml(&kubeconfig) },
    });
    Ok((crate::yaml::to_yaml(&secret), expires))
}
