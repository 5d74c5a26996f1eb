//! Cluster registry (SPEC §2): registration Secrets in the hub → members with a checked
//! kubeconfig each. Deciding who owns a cluster id, whether a kubeconfig is safe, and which
//! members to start, rebuild or drop is pure; only `member_client` touches the network stack.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::meta::{
    ANNOTATION_DRAIN, ANNOTATION_GATEWAY_ADDRESS, ANNOTATION_GATEWAY_PORT, ANNOTATION_PAUSED, ANNOTATION_REGION,
    ANNOTATION_RELEASE_PRUNES, ANNOTATION_TRUST_DOMAIN, first_line, is_dns_label, without_values,
};
use crate::model::{ClusterId, ClusterOverrides};

use super::writer::WarningEvent;

/// Why a member's kubeconfig gives no client. Never contains credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KubeconfigError {
    #[error("unparsable kubeconfig: {0}")]
    Unparsable(String),
    #[error("kubeconfig has no current-context")]
    NoCurrentContext,
    #[error("current-context {0:?} is not defined")]
    UndefinedContext(String),
    #[error("kubeconfig refused: {}", .0.join("; "))]
    Refused(Vec<String>),
    #[error("kubeconfig: {0}")]
    Config(String),
    #[error("client: {0}")]
    Client(String),
}

/// What a new set of claims asks of the members: which to drop, which to (re)start with a new
/// kubeconfig, and which keep their client but take new overrides (or a new Secret name).
#[derive(Debug, Default, PartialEq)]
pub struct RegistryPlan {
    pub remove: Vec<ClusterId>,
    pub start: Vec<(ClusterId, Registration)>,
    pub update: Vec<(ClusterId, Registration)>,
}

/// Compares the members' current registrations with the claims of the Secrets now.
pub fn plan_registry(
    current: &BTreeMap<ClusterId, Registration>,
    claims: BTreeMap<ClusterId, Registration>,
) -> RegistryPlan {
    let mut plan = RegistryPlan {
        remove: current.keys().filter(|id| !claims.contains_key(*id)).cloned().collect(),
        ..Default::default()
    };
    for (id, registration) in claims {
        match current.get(&id) {
            Some(have) if have.kubeconfig == registration.kubeconfig => {
                if *have != registration {
                    plan.update.push((id, registration));
                }
            }
            // New, or a rotated kubeconfig: a new client.
            _ => plan.start.push((id, registration)),
        }
    }
    plan
}

/// One cluster as a registration Secret declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Name of the Secret that holds it.
    pub secret: String,
    pub kubeconfig: String,
    pub overrides: ClusterOverrides,
    pub brakes: Brakes,
    /// When its token expires (`flotilla.io/token-expires`, seconds since the epoch), if said.
    pub token_expires: Option<i64>,
}

/// What the operator asks of a member through its registration Secret's annotations (every
/// member of that Secret).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Brakes {
    /// `flotilla.io/paused: "true"`: nothing is written to it; it is still watched.
    pub paused: bool,
    /// `flotilla.io/release-prunes`: the ids of prune holds to let go (comma-separated).
    pub release_prunes: Vec<String>,
}

impl Brakes {
    /// The brakes a Secret asks for, and a problem with them. A `flotilla.io/paused` value that is
    /// neither true nor false pauses (someone meant to stop the member) and is reported.
    fn of(secret: &Secret) -> (Brakes, Option<String>) {
        let annotation = |key: &str| secret.metadata.annotations.as_ref().and_then(|a| a.get(key));
        let (paused, problem) = switch(secret, ANNOTATION_PAUSED, "paused");
        let brakes = Brakes {
            paused,
            release_prunes: annotation(ANNOTATION_RELEASE_PRUNES)
                .map(|v| v.split(',').map(str::trim).filter(|id| !id.is_empty()).map(str::to_string).collect())
                .unwrap_or_default(),
        };
        (brakes, problem)
    }
}

/// When the token of a Secret expires, from `flotilla.io/token-expires` (RFC 3339, as
/// `register-cluster` writes it); an unreadable value is a problem, reported, and no expiry.
fn token_expiry(secret: &Secret) -> (Option<i64>, Option<String>) {
    let annotations = secret.metadata.annotations.as_ref();
    let Some(value) = annotations.and_then(|a| a.get(crate::register::ANNOTATION_TOKEN_EXPIRES)) else {
        return (None, None);
    };
    match value.trim().parse::<k8s_openapi::jiff::Timestamp>() {
        Ok(at) => (Some(at.as_second()), None),
        Err(_) => (
            None,
            Some(format!(
                "annotation {}={value:?} is not an RFC 3339 time; its expiry is not watched",
                crate::register::ANNOTATION_TOKEN_EXPIRES
            )),
        ),
    }
}

/// An on/off annotation of a Secret: absent is off; a value that is neither true nor false is
/// on (someone meant to use the brake) and reported, saying what it did (`on`).
fn switch(secret: &Secret, key: &str, on: &str) -> (bool, Option<String>) {
    let value = secret.metadata.annotations.as_ref().and_then(|a| a.get(key));
    match value.map(|v| v.trim().to_ascii_lowercase()) {
        None => (false, None),
        Some(v) if ["true", "yes", "1"].contains(&v.as_str()) => (true, None),
        Some(v) if ["false", "no", "0", ""].contains(&v.as_str()) => (false, None),
        Some(v) => (true, Some(format!("annotation {key}={v:?} is neither true nor false; {on}"))),
    }
}

/// A problem with one Secret (or one cluster in it), reported on that Secret.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RegistrationProblem {
    pub secret: String,
    pub cluster: Option<String>,
    pub message: String,
}

impl std::fmt::Display for RegistrationProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cluster {
            Some(c) => write!(f, "secret {}: cluster {c}: {}", self.secret, self.message),
            None => write!(f, "secret {}: {}", self.secret, self.message),
        }
    }
}

/// The registration problems known now, and which of them have been announced as a Warning
/// Event on their Secret. An Event is sent once per problem while it lasts; one that goes away
/// and comes back is announced again.
#[derive(Debug, Default)]
pub struct Problems {
    current: Vec<RegistrationProblem>,
    announced: BTreeSet<RegistrationProblem>,
}

impl Problems {
    /// Replaces the current problems; returns those that were not current before (to log).
    pub fn replace(&mut self, mut problems: Vec<RegistrationProblem>) -> Vec<RegistrationProblem> {
        problems.sort();
        problems.dedup();
        let new = problems.iter().filter(|p| !self.current.contains(p)).cloned().collect();
        self.announced.retain(|p| problems.contains(p));
        self.current = problems;
        new
    }

    pub fn current(&self) -> &[RegistrationProblem] {
        &self.current
    }

    /// Events for the current problems not yet announced, each on the Secret it names. A
    /// problem whose Secret is no longer listed counts as announced: there is nothing to put it on.
    pub fn unannounced(&mut self, secrets: &[Secret]) -> Vec<WarningEvent> {
        let mut events = Vec::new();
        for p in &self.current {
            if !self.announced.insert(p.clone()) {
                continue;
            }
            let Some(secret) = secrets.iter().find(|s| s.metadata.name.as_deref() == Some(p.secret.as_str())) else {
                continue;
            };
            let note = match &p.cluster {
                Some(c) => format!("cluster {c}: {}", p.message),
                None => p.message.clone(),
            };
            events.push(WarningEvent {
                object: secret.object_ref(&()),
                reason: "ClusterRegistrationFailed".into(),
                note,
                action: "Register",
            });
        }
        events
    }
}

/// Which Secret owns each cluster id. A cluster id claimed by two Secrets stays with the older
/// one (creation time, then name); both Secrets get the problem reported.
pub fn resolve_claims(secrets: &[Secret]) -> (BTreeMap<String, Registration>, Vec<RegistrationProblem>) {
    let mut sorted: Vec<&Secret> = secrets.iter().collect();
    sorted.sort_by(|a, b| {
        let key = |s: &Secret| (s.metadata.creation_timestamp.as_ref().map(|t| t.0), s.metadata.name.clone());
        key(a).cmp(&key(b))
    });
    let mut members: BTreeMap<String, Registration> = BTreeMap::new();
    let mut problems = Vec::new();
    for secret in sorted {
        let name = secret.metadata.name.clone().unwrap_or_default();
        // A bad override is reported and left out; the members stay (dropping them would take
        // their endpoints out of every other member).
        let (overrides, bad) = overrides_of(secret);
        for message in bad {
            problems.push(RegistrationProblem { secret: name.clone(), cluster: None, message });
        }
        let data = secret.data.clone().unwrap_or_default();
        let mut entries: Vec<(String, Vec<u8>)> = data.into_iter().map(|(k, v)| (k, v.0)).collect();
        if let Some(strings) = &secret.string_data {
            entries.extend(strings.iter().map(|(k, v)| (k.clone(), v.clone().into_bytes())));
        }
        if entries.is_empty() {
            problems.push(RegistrationProblem { secret: name.clone(), cluster: None, message: "has no data".into() });
        }
        for (cluster, bytes) in entries {
            let problem =
                |message: String| RegistrationProblem { secret: name.clone(), cluster: Some(cluster.clone()), message };
            if !is_dns_label(&cluster) {
                problems.push(problem("the data key is not a valid cluster id (a DNS-1123 label)".into()));
                continue;
            }
            let Ok(kubeconfig) = String::from_utf8(bytes) else {
                problems.push(problem("the kubeconfig is not UTF-8".into()));
                continue;
            };
            if let Some(owner) = members.get(&cluster) {
                problems
                    .push(problem(format!("cluster id already registered by secret {}; ignored here", owner.secret)));
                problems.push(RegistrationProblem {
                    secret: owner.secret.clone(),
                    cluster: Some(cluster.clone()),
                    message: format!("cluster id also claimed by secret {name}; kept here (older)"),
                });
                continue;
            }
            let (brakes, problem) = Brakes::of(secret);
            let (token_expires, expiry_problem) = token_expiry(secret);
            if let Some(message) = expiry_problem {
                problems.push(RegistrationProblem { secret: name.clone(), cluster: Some(cluster.clone()), message });
            }
            if let Some(message) = problem {
                problems.push(RegistrationProblem { secret: name.clone(), cluster: Some(cluster.clone()), message });
            }
            members.insert(
                cluster,
                Registration { secret: name.clone(), kubeconfig, overrides: overrides.clone(), brakes, token_expires },
            );
        }
    }
    problems.sort();
    (members, problems)
}

/// The overrides a Secret's annotations give its members, and the problems with them: a value
/// that cannot be read is left out (discovery or the flag's default applies) and reported.
fn overrides_of(secret: &Secret) -> (ClusterOverrides, Vec<String>) {
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let mut problems = Vec::new();
    let gateway_port = annotations.get(ANNOTATION_GATEWAY_PORT).and_then(|p| {
        let port = p.trim().parse::<u16>().ok();
        if port.is_none() {
            problems.push(format!("annotation {ANNOTATION_GATEWAY_PORT}={p:?} is not a port; discovery applies"));
        }
        port
    });
    // The names its workloads' certificates carry are unknown: clients would refuse them, so its
    // endpoints are withheld (drained) until the annotation is fixed.
    let mut unknown_names = false;
    let trust_domain = annotations.get(ANNOTATION_TRUST_DOMAIN).and_then(|td| {
        let valid = crate::meta::is_trust_domain(td);
        if !valid {
            unknown_names = true;
            problems.push(format!(
                "annotation {ANNOTATION_TRUST_DOMAIN}={td:?} is not a SPIFFE trust domain; its members are drained until it is fixed"
            ));
        }
        valid.then(|| td.clone())
    });
    let (drain, drain_problem) = switch(secret, ANNOTATION_DRAIN, "drained");
    problems.extend(drain_problem);
    let drain = drain || unknown_names;
    let overrides = ClusterOverrides {
        region: annotations.get(ANNOTATION_REGION).cloned(),
        gateway_address: annotations.get(ANNOTATION_GATEWAY_ADDRESS).cloned(),
        gateway_port,
        trust_domain,
        drain,
    };
    (overrides, problems)
}

/// What a registration's kubeconfig may hold beyond a server, its CA and a token or client key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KubeconfigTrust {
    /// `exec` and `auth-provider` plugins, and references to local files.
    pub allow_exec: bool,
    /// `insecure-skip-tls-verify: true`: anyone on the path to that member could read its
    /// token and feed flotilla a false view of it.
    pub allow_insecure_skip_tls_verify: bool,
    /// An `http://` server: the member's token would travel in clear.
    pub allow_insecure_http: bool,
}

/// Parses a kubeconfig and refuses what would let a Secret run programs or read our files
/// (`exec` and `auth-provider` plugins, references to local files) or talk to a member without
/// checking its certificate, unless `trust` allows it. Messages never contain credentials.
pub fn check_kubeconfig(yaml: &str, trust: KubeconfigTrust) -> Result<Kubeconfig, KubeconfigError> {
    // The parser quotes what it could not read, which may be a credential in the wrong field.
    let kc = Kubeconfig::from_yaml(yaml)
        .map_err(|e| KubeconfigError::Unparsable(without_values(&first_line(&e.to_string()))))?;
    let context_name = kc.current_context.clone().ok_or(KubeconfigError::NoCurrentContext)?;
    let context = kc
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.clone())
        .ok_or(KubeconfigError::UndefinedContext(context_name))?;
    let mut refused = Vec::new();
    if !trust.allow_insecure_skip_tls_verify {
        for named in &kc.clusters {
            if named.cluster.as_ref().is_some_and(|c| c.insecure_skip_tls_verify == Some(true)) {
                refused.push(format!(
                    "cluster {:?} sets insecure-skip-tls-verify (give its certificate-authority-data, or pass --allow-insecure-skip-tls-verify)",
                    named.name
                ));
            }
        }
    }
    if !trust.allow_insecure_http {
        for named in &kc.clusters {
            let server = named.cluster.as_ref().and_then(|c| c.server.as_deref()).unwrap_or_default();
            if server.trim_start().to_ascii_lowercase().starts_with("http://") {
                refused.push(format!(
                    "cluster {:?} has an http:// server: its token would travel in clear (give an https:// server, or pass --allow-insecure-http)",
                    named.name
                ));
            }
        }
    }
    if trust.allow_exec {
        return if refused.is_empty() { Ok(kc) } else { Err(KubeconfigError::Refused(refused)) };
    }
    for named in &kc.auth_infos {
        let Some(auth) = &named.auth_info else { continue };
        let user = &named.name;
        if auth.exec.is_some() {
            refused.push(format!("user {user:?} uses an exec plugin (allow with --allow-kubeconfig-exec)"));
        }
        if auth.auth_provider.is_some() {
            refused.push(format!("user {user:?} uses an auth-provider plugin (allow with --allow-kubeconfig-exec)"));
        }
        for (field, set) in [
            ("tokenFile", auth.token_file.is_some()),
            ("client-certificate", auth.client_certificate.is_some()),
            ("client-key", auth.client_key.is_some()),
        ] {
            if set {
                refused.push(format!(
                    "user {user:?} refers to a local file ({field}; allow with --allow-kubeconfig-exec)"
                ));
            }
        }
    }
    for named in &kc.clusters {
        if named.cluster.as_ref().is_some_and(|c| c.certificate_authority.is_some()) {
            refused.push(format!(
                "cluster {:?} refers to a local file (certificate-authority; allow with --allow-kubeconfig-exec)",
                named.name
            ));
        }
    }
    if context.user.is_none() && kc.auth_infos.is_empty() {
        refused.push("no user credentials".to_string());
    }
    if refused.is_empty() { Ok(kc) } else { Err(KubeconfigError::Refused(refused)) }
}

/// A client for a member. Every request has a deadline (`deadline`), so that a member that is
/// down or silent is found stale, not waited for.
pub async fn member_client(kc: Kubeconfig) -> Result<kube::Client, KubeconfigError> {
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| KubeconfigError::Config(first_line(&e.to_string())))?;
    super::deadline::apply(&mut config);
    kube::Client::try_from(config).map_err(|e| KubeconfigError::Client(first_line(&e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    const TOKEN_KUBECONFIG: &str = "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority-data: AAAA\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\nusers:\n- name: u\n  user: {token: secret-token-value}\n";

    fn secret(name: &str, created: i64, clusters: &[&str]) -> Secret {
        let data = clusters.iter().map(|c| (c.to_string(), ByteString(TOKEN_KUBECONFIG.as_bytes().to_vec()))).collect();
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(k8s_openapi::jiff::Timestamp::from_second(created).unwrap())),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        }
    }

    #[test]
    fn a_problem_is_announced_once_while_it_lasts() {
        let problem =
            |secret: &str| RegistrationProblem { secret: secret.into(), cluster: None, message: "has no data".into() };
        let secrets = [secret("a", 1, &[]), secret("b", 2, &[])];
        let mut problems = Problems::default();
        assert_eq!(problems.replace(vec![problem("b"), problem("a"), problem("a")]), [problem("a"), problem("b")]);
        let events = problems.unannounced(&secrets);
        let on: Vec<_> = events.iter().map(|e| e.object.name.clone().unwrap()).collect();
        assert_eq!(on, ["a", "b"]);
        assert!(events.iter().all(|e| e.note == "has no data" && e.reason == "ClusterRegistrationFailed"));
        // Still there: neither logged nor announced again.
        assert!(problems.replace(vec![problem("a"), problem("b")]).is_empty());
        assert!(problems.unannounced(&secrets).is_empty());
        // Gone and back: a new incident, announced again; b was never away.
        problems.replace(vec![problem("b")]);
        assert_eq!(problems.replace(vec![problem("a"), problem("b")]), [problem("a")]);
        let again: Vec<_> = problems.unannounced(&secrets).into_iter().map(|e| e.object.name.unwrap()).collect();
        assert_eq!(again, ["a"]);
        assert_eq!(problems.current(), [problem("a"), problem("b")]);
    }

    #[test]
    fn the_older_secret_keeps_a_claimed_cluster_id() {
        let (members, problems) =
            resolve_claims(&[secret("newer", 200, &["west", "east"]), secret("older", 100, &["west"])]);
        assert_eq!(members["west"].secret, "older");
        assert_eq!(members["east"].secret, "newer");
        let on: Vec<&str> = problems.iter().map(|p| p.secret.as_str()).collect();
        assert_eq!(on, ["newer", "older"], "reported on both: {problems:?}");
    }

    #[test]
    fn bad_ids_and_annotations_are_reported_not_fatal() {
        let mut bad = secret("bad", 1, &["Not_A_Label"]);
        let mut annotated = secret("ok", 2, &["east"]);
        annotated.metadata.annotations = Some([(ANNOTATION_GATEWAY_PORT.to_string(), "x".to_string())].into());
        bad.metadata.annotations = Some([(ANNOTATION_REGION.to_string(), "eu".to_string())].into());
        let mut foreign = secret("foreign", 4, &["south"]);
        foreign.metadata.annotations = Some([(ANNOTATION_TRUST_DOMAIN.to_string(), "Mesh.Example".to_string())].into());
        let mut trusted = secret("good", 3, &["north"]);
        trusted.metadata.annotations =
            Some([(ANNOTATION_TRUST_DOMAIN.to_string(), "north.example".to_string())].into());
        let mut drained = secret("drained", 5, &["west"]);
        drained.metadata.annotations = Some([(ANNOTATION_DRAIN.to_string(), "please".to_string())].into());
        let (members, problems) = resolve_claims(&[bad, annotated, trusted, foreign, drained]);
        // A bad annotation is left out and reported; its members stay.
        assert_eq!(members.keys().collect::<Vec<_>>(), ["east", "north", "south", "west"]);
        assert_eq!(members["north"].overrides.trust_domain.as_deref(), Some("north.example"));
        assert_eq!(members["south"].overrides.trust_domain, None);
        assert!(members["south"].overrides.drain, "an unknown trust domain drains");
        assert_eq!(members["east"].overrides.gateway_port, None);
        assert!(members["west"].overrides.drain, "a value neither true nor false drains");
        assert!(!members["north"].overrides.drain);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().any(|p| p.message.contains("is not a SPIFFE trust domain")), "{problems:?}");
        assert!(problems.iter().any(|p| p.message.contains("is not a port")), "{problems:?}");
        assert!(problems.iter().any(|p| p.message.contains("neither true nor false; drained")), "{problems:?}");
    }

    #[test]
    fn the_token_expiry_is_read_and_a_bad_one_reported_without_losing_the_member() {
        let expiry = |value: &str| {
            let mut s = secret("s", 1, &["east"]);
            let key = crate::register::ANNOTATION_TOKEN_EXPIRES.to_string();
            s.metadata.annotations = Some([(key, value.to_string())].into());
            resolve_claims(&[s])
        };
        let (members, problems) = expiry("2026-12-08T10:00:00Z");
        assert_eq!(members["east"].token_expires, Some(1_796_724_000));
        assert!(problems.is_empty(), "{problems:?}");
        let (members, problems) = expiry("next tuesday");
        assert_eq!(members["east"].token_expires, None, "still a member");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("is not an RFC 3339 time"), "{problems:?}");
        let (members, _) = resolve_claims(&[secret("s", 1, &["east"])]);
        assert_eq!(members["east"].token_expires, None);
    }

    #[test]
    fn unsafe_kubeconfigs_are_refused_without_leaking_credentials() {
        assert!(check_kubeconfig(TOKEN_KUBECONFIG, KubeconfigTrust::default()).is_ok());
        let exec = TOKEN_KUBECONFIG.replace(
            "user: {token: secret-token-value}",
            "user: {exec: {command: /bin/sh, apiVersion: client.authentication.k8s.io/v1}}",
        );
        let err = check_kubeconfig(&exec, KubeconfigTrust::default()).unwrap_err().to_string();
        assert!(err.contains("exec plugin"), "{err}");
        assert!(check_kubeconfig(&exec, KubeconfigTrust { allow_exec: true, ..Default::default() }).is_ok());
        let file = TOKEN_KUBECONFIG.replace("user: {token: secret-token-value}", "user: {tokenFile: /etc/passwd}");
        assert!(check_kubeconfig(&file, KubeconfigTrust::default()).unwrap_err().to_string().contains("tokenFile"));
        let insecure = TOKEN_KUBECONFIG.replace("certificate-authority-data: AAAA", "insecure-skip-tls-verify: true");
        let err = check_kubeconfig(&insecure, KubeconfigTrust::default()).unwrap_err().to_string();
        assert!(err.contains("cluster \"c\" sets insecure-skip-tls-verify"), "{err}");
        let err = check_kubeconfig(&insecure, KubeconfigTrust { allow_exec: true, ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("insecure-skip-tls-verify"), "allowing plugins does not allow this: {err}");
        let allowed = KubeconfigTrust { allow_insecure_skip_tls_verify: true, ..Default::default() };
        assert!(check_kubeconfig(&insecure, allowed).is_ok());
        let garbage =
            check_kubeconfig("users: [: secret-token-value", KubeconfigTrust::default()).unwrap_err().to_string();
        assert!(garbage.starts_with("unparsable kubeconfig"), "{garbage}");
        assert!(!garbage.contains("secret-token-value"), "{garbage}");
        // A token pasted into a field of another type: the parser would quote it.
        for wrong in [
            "certificate-authority-data: AAAA\n    insecure-skip-tls-verify: secret-token-value",
            "certificate-authority-data: [secret-token-value]",
        ] {
            let typed = TOKEN_KUBECONFIG.replace("certificate-authority-data: AAAA", wrong);
            let err = check_kubeconfig(&typed, KubeconfigTrust::default()).unwrap_err().to_string();
            assert!(err.starts_with("unparsable kubeconfig"), "{err}");
            assert!(!err.contains("secret-token"), "a credential in a parse error: {err}");
        }
        let plain = TOKEN_KUBECONFIG.replace("https://", "http://");
        let err = check_kubeconfig(&plain, KubeconfigTrust { allow_exec: true, ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("http:// server"), "{err}");
        assert!(check_kubeconfig(&plain, KubeconfigTrust { allow_insecure_http: true, ..Default::default() }).is_ok());
    }

    #[test]
    fn new_rotated_changed_and_removed_registrations() {
        let reg = |secret: &str, kubeconfig: &str, region: Option<&str>| Registration {
            brakes: Default::default(),
            token_expires: None,
            secret: secret.into(),
            kubeconfig: kubeconfig.into(),
            overrides: ClusterOverrides { region: region.map(str::to_string), ..Default::default() },
        };
        let current: BTreeMap<ClusterId, Registration> = [
            ("kept".to_string(), reg("s", "k1", None)),
            ("rotated".to_string(), reg("s", "k2", None)),
            ("moved".to_string(), reg("s", "k3", None)),
            ("gone".to_string(), reg("s", "k4", None)),
        ]
        .into();
        let claims: BTreeMap<ClusterId, Registration> = [
            ("kept".to_string(), reg("s", "k1", None)),
            ("rotated".to_string(), reg("s", "k2-new-token", None)),
            ("moved".to_string(), reg("s", "k3", Some("eu-west-1"))),
            ("new".to_string(), reg("t", "k5", None)),
        ]
        .into();
        let plan = plan_registry(&current, claims);
        assert_eq!(plan.remove, ["gone"]);
        let started: Vec<&str> = plan.start.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(started, ["new", "rotated"], "a new kubeconfig is a new client");
        let updated: Vec<&str> = plan.update.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(updated, ["moved"], "new overrides keep the client");
    }
}
