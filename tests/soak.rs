//! Faults and churn at once, then the oracle: a hub with two flotilla replicas (leader election)
//! and three members, a seeded random schedule of workload, Service, policy, registration,
//! outage, leader-kill and user-object changes, and at the end, once the fleet is quiet:
//!
//! * what flotilla owns in every member equals exactly what `render` says for a snapshot of the
//!   fleet (content, not just names);
//! * no user-owned object was modified (resourceVersions unchanged);
//! * no host's VIP ever changed (sampled all through the run, in every member);
//! * every policy's status agrees with render's verdict on it;
//! * no replica sent a write while the other led (from both replicas' logs).
//!
//! Besides churn, the faults: member API servers stopped, frozen (SIGSTOP) and black-holed (a
//! proxy that drops everything), the leader killed or cut off from the hub, flotilla's objects
//! deleted by hand, a VIP store entry corrupted, a member registered at a silent address.
//!
//! Then healthy members beside sick ones: GTP changes timed with every member healthy and with one
//! black-holed and one just registered at a silent address (printed; asserted: none waits for the
//! sick). Then a burst: 1,000 Deployment changes in one member within about a second, with the
//! passes, writes, flotilla's peak RSS and change-to-write latency printed.
//!
//! `FLOTILLA_SOAK_SECONDS` (default 60) bounds the schedule; `FLOTILLA_SOAK_SEED` replays one.
//! Any mismatch fails the test and prints the object, the member and the seed.

mod testenv;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::crd::{ClientConnectionConfig, GlobalTrafficPolicy, OutlierDetection};
use flotilla::istio::{ServiceEntry, Sidecar};
use flotilla::meta::Kind;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use testenv::builders::{apply, deployment, namespace, service};
use testenv::controller::{FLOTILLA_NAMESPACE, Flotilla};
use testenv::fleet::*;
use testenv::net::Host;
use testenv::proxy::Proxy;
use testenv::{TEST_MANAGER, TestCluster, oracle};

/// Where the proxies listen: on the address of what they stand in front of, another port.
const PROXY_PORT: u16 = 16443;

const MEMBERS: [&str; 3] = ["soak-0", "soak-1", "soak-2"];
const IDENTITIES: [&str; 6] = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
const ENVS: [&str; 2] = ["stage", "prod"];

/// xorshift64*: the schedule is a function of the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// What the schedule did, for the report.
#[derive(Default, Debug)]
struct Tally {
    events: usize,
    faults: BTreeMap<&'static str, usize>,
}

impl Tally {
    fn fault(&mut self, what: &'static str) {
        *self.faults.entry(what).or_default() += 1;
    }
}

/// The fleet under test and what the test knows of it.
struct Soak {
    seed: u64,
    rng: Rng,
    hub: TestCluster,
    hub_client: Client,
    members: Vec<TestCluster>,
    clients: Vec<Client>,
    replicas: Vec<Flotilla>,
    /// Members whose API server is down.
    down: BTreeSet<usize>,
    /// Members whose API server is frozen (SIGSTOP).
    frozen: BTreeSet<usize>,
    /// flotilla reaches every member through its proxy, and each replica the hub through its own.
    member_proxies: Vec<Proxy>,
    hub_proxies: Vec<Proxy>,
    black_holed: BTreeSet<usize>,
    /// The replica cut off from the hub, if any.
    cut_off: Option<usize>,
    /// A registered member whose address accepts connections and never answers.
    silent: (Host, Proxy),
    silent_registered: bool,
    /// Members whose registration Secret is missing or holds a broken kubeconfig.
    unregistered: BTreeSet<usize>,
    /// User-owned objects: (member, kind, namespace, name) → resourceVersion when created.
    users: BTreeMap<(usize, Kind, String, String), String>,
    /// Policies whose last edit may have been invalid: (member, kind, namespace, name) → the same
    /// edit made valid, applied when the fleet settles (see `settle`).
    invalid: BTreeMap<(usize, Kind, String, String), Repair>,
    tally: Tally,
}

/// The valid form of a policy whose last edit was invalid.
enum Repair {
    Gtp(Box<GlobalTrafficPolicy>),
    Ccc(Box<ClientConnectionConfig>),
}

fn seed() -> u64 {
    match std::env::var("FLOTILLA_SOAK_SEED") {
        Ok(s) => s.parse().expect("FLOTILLA_SOAK_SEED is a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1,
    }
}

fn soak_seconds() -> u64 {
    std::env::var("FLOTILLA_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
}

/// A member's registration, through its proxy.
fn member_secret(member: &TestCluster, proxy: &Proxy, kubeconfig: String) -> Secret {
    let kubeconfig = kubeconfig.replace(&member.server_url(), &proxy.url());
    secret(&format!("member-{}", member.name), "istio/multiCluster", &[(member.name.as_str(), kubeconfig)])
}

/// A namespace per identity, the same in every member.
fn ns_of(identity: &str) -> String {
    format!("ns-{identity}")
}

impl Soak {
    async fn start(seed: u64) -> Soak {
        let (hub, members, hub_client, clients) = start_fleet(&MEMBERS).await;
        for (i, c) in clients.iter().enumerate() {
            prepare_member(c, ["us-west-2", "us-east-2", "eu-north-1"][i], &format!("10.9.0.{}", i + 1)).await;
            for id in IDENTITIES {
                apply(c, &namespace(&ns_of(id))).await;
            }
        }
        let mut member_proxies = Vec::new();
        for m in &members {
            let proxy = Proxy::start(m.host.addr(PROXY_PORT), Some(m.api_addr())).await;
            apply(&hub_client, &member_secret(m, &proxy, m.admin_kubeconfig())).await;
            member_proxies.push(proxy);
        }
        let mut hub_proxies = Vec::new();
        let mut replicas = Vec::new();
        for (i, name) in ["soak-a", "soak-b"].into_iter().enumerate() {
            let proxy = Proxy::start(hub.host.addr(PROXY_PORT + i as u16), Some(hub.api_addr())).await;
            let kubeconfig = hub.admin_kubeconfig().replace(&hub.server_url(), &proxy.url());
            replicas.push(Flotilla::start_with_kubeconfig(&kubeconfig, name, &[]));
            hub_proxies.push(proxy);
        }
        let silent_host = Host::claim(&[PROXY_PORT]);
        let silent_proxy = Proxy::start(silent_host.addr(PROXY_PORT), None).await;
        Soak {
            seed,
            rng: Rng(seed),
            hub,
            hub_client,
            members,
            clients,
            replicas,
            down: BTreeSet::new(),
            frozen: BTreeSet::new(),
            member_proxies,
            hub_proxies,
            black_holed: BTreeSet::new(),
            cut_off: None,
            silent: (silent_host, silent_proxy),
            silent_registered: false,
            unregistered: BTreeSet::new(),
            users: BTreeMap::new(),
            invalid: BTreeMap::new(),
            tally: Tally::default(),
        }
    }

    /// A member the test itself can write to (not down, not frozen).
    fn up_member(&mut self) -> Option<usize> {
        let up: Vec<usize> =
            (0..MEMBERS.len()).filter(|i| !self.down.contains(i) && !self.frozen.contains(i)).collect();
        (!up.is_empty()).then(|| *self.rng.pick(&up))
    }

    /// One step of the schedule.
    async fn step(&mut self) {
        self.tally.events += 1;
        let roll = self.rng.below(100);
        let Some(m) = self.up_member() else {
            if let Some(&f) = self.frozen.iter().next() {
                self.members[f].thaw();
                self.frozen.remove(&f);
                return;
            }
            return self.restart_member(*self.down.iter().next().unwrap()).await;
        };
        let client = self.clients[m].clone();
        let id = *self.rng.pick(&IDENTITIES);
        let ns = ns_of(id);
        match roll {
            0..=19 => {
                // Create or change a workload: scale, relabel its env, or move its identity.
                let env = *self.rng.pick(&ENVS);
                let identity = if self.rng.chance(15) { *self.rng.pick(&IDENTITIES) } else { id };
                let mut d = deployment(&ns, id, identity, env);
                d.spec.as_mut().unwrap().replicas = Some(self.rng.below(4) as i32);
                try_apply(&client, &d).await;
                try_apply(&client, &service(&ns, id, "http", 80, 8080)).await;
            }
            20..=26 => {
                let _ = Api::<Deployment>::namespaced(client, &ns).delete(id, &DeleteParams::default()).await;
            }
            27..=33 => {
                // A Service whose selector or port moves.
                let port_name = ["http", "grpc", "tcp-data"][self.rng.below(3)];
                let mut s = service(&ns, id, port_name, *self.rng.pick(&[80, 8080, 9090]), 8080);
                if self.rng.chance(30) {
                    s.spec.as_mut().unwrap().selector = Some([("app".to_string(), "nobody".to_string())].into());
                }
                try_apply(&client, &s).await;
            }
            34..=45 => self.gtp(m, id).await,
            46..=55 => self.dependency(m, id).await,
            56..=62 => self.outlier_or_connection(m, id).await,
            63..=67 => self.user_object(m, id).await,
            68..=75 => self.registration(m).await,
            76..=80 => {
                self.tally.fault("member API server stopped");
                self.members[m].stop_apiserver();
                self.down.insert(m);
            }
            81..=84 => {
                if let Some(&d) = self.down.iter().next() {
                    self.restart_member(d).await;
                }
            }
            85..=87 => self.kill_leader().await,
            88..=89 => self.black_hole(m),
            90..=91 => self.freeze(m),
            92 => self.cut_leader_off().await,
            93..=94 => self.delete_ours(m).await,
            95 => self.corrupt_vip().await,
            96 => self.silent_member().await,
            _ => {} // a quiet moment
        }
    }

    /// The proxy in front of a member starts dropping everything; or one black hole ends.
    fn black_hole(&mut self, m: usize) {
        if let Some(&b) = self.black_holed.iter().next()
            && self.rng.chance(50)
        {
            self.member_proxies[b].black_hole(false);
            self.black_holed.remove(&b);
            return;
        }
        self.tally.fault("member black-holed");
        self.member_proxies[m].black_hole(true);
        self.black_holed.insert(m);
    }

    /// A member's API server freezes (its connections stay open, nothing answers); or thaws.
    fn freeze(&mut self, m: usize) {
        if let Some(&f) = self.frozen.iter().next() {
            self.members[f].thaw();
            self.frozen.remove(&f);
            return;
        }
        self.tally.fault("member API server frozen");
        self.members[m].freeze();
        self.frozen.insert(m);
    }

    /// The leader loses the hub (its members it still reaches); or gets it back.
    async fn cut_leader_off(&mut self) {
        if let Some(r) = self.cut_off.take() {
            self.hub_proxies[r].black_hole(false);
            return;
        }
        for (i, r) in self.replicas.iter().enumerate() {
            if r.is_running() && r.metric("flotilla_leader").await == 1.0 {
                self.tally.fault("leader cut off from the hub");
                self.hub_proxies[i].black_hole(true);
                self.cut_off = Some(i);
                return;
            }
        }
    }

    /// Someone deletes one of flotilla's objects: it must come back.
    async fn delete_ours(&mut self, m: usize) {
        let client = self.clients[m].clone();
        if self.rng.chance(50) {
            self.delete_one_of_ours(Api::<ServiceEntry>::namespaced(client, SYNC)).await;
        } else {
            self.delete_one_of_ours(Api::<flotilla::istio::DestinationRule>::namespaced(client, SYNC)).await;
        }
    }

    async fn delete_one_of_ours<K>(&mut self, api: Api<K>)
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let Ok(list) = api.list(&ListParams::default().labels("app.kubernetes.io/managed-by=flotilla")).await else {
            return;
        };
        if list.items.is_empty() {
            return;
        }
        let Some(name) = self.rng.pick(&list.items).meta().name.clone() else { return };
        self.tally.fault("one of flotilla's objects deleted by hand");
        let _ = api.delete(&name, &DeleteParams::default()).await;
    }

    /// A hand edit of the VIP store leaves an entry that is not an address.
    async fn corrupt_vip(&mut self) {
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.hub_client.clone(), FLOTILLA_NAMESPACE);
        let Ok(Some(cm)) = api.get_opt("flotilla-vips").await else { return };
        let hosts: Vec<String> = cm.data.unwrap_or_default().into_keys().collect();
        if hosts.is_empty() {
            return;
        }
        let host = self.rng.pick(&hosts).clone();
        self.tally.fault("VIP store entry corrupted");
        let patch = json!({"data": {host: "not-an-address"}});
        let _ = api.patch("flotilla-vips", &PatchParams::default(), &Patch::Merge(&patch)).await;
    }

    /// A member registered at an address that accepts connections and never answers; or removed.
    async fn silent_member(&mut self) {
        let secrets: Api<Secret> = Api::namespaced(self.hub_client.clone(), FLOTILLA_NAMESPACE);
        if self.silent_registered {
            let _ = secrets.delete("silent", &DeleteParams::default()).await;
            self.silent_registered = false;
            return;
        }
        self.tally.fault("member registered at a silent address");
        let kubeconfig =
            self.members[0].admin_kubeconfig().replace(&self.members[0].server_url(), &self.silent.1.url());
        apply(&self.hub_client, &secret("silent", "istio/multiCluster", &[("silent-1", kubeconfig)])).await;
        self.silent_registered = true;
    }

    async fn restart_member(&mut self, m: usize) {
        self.members[m].start_apiserver().await;
        self.down.remove(&m);
    }

    async fn gtp(&mut self, m: usize, id: &str) {
        let client = self.clients[m].clone();
        let ns = ns_of(id);
        let name = *self.rng.pick(&["gtp-1", "gtp-2"]);
        let key = (m, Kind::GlobalTrafficPolicy, ns.clone(), name.to_string());
        let api: Api<GlobalTrafficPolicy> = Api::namespaced(client.clone(), &ns);
        if self.rng.chance(20) {
            if api.delete(name, &DeleteParams::default()).await.is_ok() {
                self.invalid.remove(&key);
            }
            return;
        }
        let west = [0, 20, 50, 80, 100][self.rng.below(5)];
        let mut policies = vec![
            json!({"dnsPrefix": "default", "lbType": "FAILOVER", "target": [{"region": "us-west-2", "weight": west}, {"region": "us-east-2", "weight": 100 - west}]}),
        ];
        if self.rng.chance(40) {
            policies.push(json!({"dnsPrefix": "west", "lbType": "TOPOLOGY"}));
        }
        let mut g = gtp(&ns, name, id, json!(policies));
        g.metadata.annotations = Some([("admiral.io/env".to_string(), self.rng.pick(&ENVS).to_string())].into());
        // Two GTPs for one identity+env conflict; a priority sometimes decides.
        if self.rng.chance(30) {
            g.metadata.labels.as_mut().unwrap().insert("priority".into(), self.rng.below(3).to_string());
        }
        if self.rng.chance(15) {
            // Valid for the schema, invalid for flotilla: the previous valid spec stays.
            self.tally.fault("invalid policy edit");
            let valid = g.clone();
            policies.push(json!({"dnsPrefix": "Not_A_Label", "lbType": "TOPOLOGY"}));
            g.spec = gtp(&ns, name, id, json!(policies)).spec;
            // Tracked whether or not the edit lands: it may have landed before the reply was lost.
            self.invalid.insert(key, Repair::Gtp(Box::new(valid)));
            try_apply(&client, &g).await;
        } else if try_apply(&client, &g).await {
            self.invalid.remove(&key);
        }
    }

    async fn dependency(&mut self, m: usize, id: &str) {
        let mut destinations: Vec<&str> = IDENTITIES.iter().copied().filter(|_| self.rng.chance(30)).collect();
        if self.rng.chance(5) {
            destinations = vec!["*"];
        }
        let in_hub = self.rng.chance(30);
        let (client, ns) = if in_hub {
            (self.hub_client.clone(), FLOTILLA_NAMESPACE.to_string())
        } else {
            (self.clients[m].clone(), ns_of(id))
        };
        let name = format!("{id}-deps");
        if self.rng.chance(20) || destinations.is_empty() {
            let _ =
                Api::<flotilla::crd::Dependency>::namespaced(client, &ns).delete(&name, &DeleteParams::default()).await;
            return;
        }
        try_apply(&client, &dependency(&ns, &name, id, &destinations)).await;
    }

    async fn outlier_or_connection(&mut self, m: usize, id: &str) {
        let client = &self.clients[m];
        let ns = ns_of(id);
        let env = *self.rng.pick(&ENVS);
        let meta = json!({"name": format!("{id}-tuning"), "namespace": ns, "labels": {"identity": id}, "annotations": {"admiral.io/env": env}});
        if self.rng.chance(50) {
            let api: Api<OutlierDetection> = Api::namespaced(client.clone(), &ns);
            if self.rng.chance(20) {
                let _ = api.delete(&format!("{id}-tuning"), &DeleteParams::default()).await;
                return;
            }
            let od: OutlierDetection = serde_json::from_value(json!({
                "apiVersion": "admiral.io/v1alpha1", "kind": "OutlierDetection", "metadata": meta,
                "spec": {"outlier_config": {"base_ejection_time": 30 * (1 + self.rng.below(5)), "consecutive_gateway_errors": 1 + self.rng.below(20), "interval": 10}},
            }))
            .unwrap();
            try_apply(client, &od).await;
        } else {
            let name = format!("{id}-tuning");
            let key = (m, Kind::ClientConnectionConfig, ns.clone(), name.clone());
            let api: Api<ClientConnectionConfig> = Api::namespaced(client.clone(), &ns);
            if self.rng.chance(20) {
                if api.delete(&name, &DeleteParams::default()).await.is_ok() {
                    self.invalid.remove(&key);
                }
                return;
            }
            let invalid = self.rng.chance(15);
            let requests = 1 + self.rng.below(200);
            let policy = if invalid { "SOMETIMES" } else { *self.rng.pick(&["DEFAULT", "UPGRADE"]) };
            let ccc = |policy: &str| -> ClientConnectionConfig {
                serde_json::from_value(json!({
                    "apiVersion": "admiral.io/v1alpha1", "kind": "ClientConnectionConfig", "metadata": meta,
                    "spec": {"connectionPool": {"http": {"maxRequestsPerConnection": requests, "h2UpgradePolicy": policy}}},
                }))
                .unwrap()
            };
            if invalid {
                // Valid for the schema, invalid for flotilla, as the GTP's invalid edit.
                self.tally.fault("invalid connection config edit");
                self.invalid.insert(key, Repair::Ccc(Box::new(ccc("DEFAULT"))));
                try_apply(client, &ccc(policy)).await;
            } else if try_apply(client, &ccc(policy)).await {
                self.invalid.remove(&key);
            }
        }
    }

    /// A user's object with a name flotilla would use: it must never be touched.
    async fn user_object(&mut self, m: usize, id: &str) {
        let env = *self.rng.pick(&ENVS);
        let client = &self.clients[m];
        let (kind, ns, name) = if self.rng.chance(60) {
            let name = format!("{env}.{id}.global-se");
            let se: ServiceEntry = serde_json::from_value(json!({
                "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": name, "namespace": SYNC},
                "spec": {"hosts": [format!("{id}.example.com")], "location": "MESH_EXTERNAL", "resolution": "DNS", "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]},
            }))
            .unwrap();
            if !try_apply(client, &se).await {
                return;
            }
            (Kind::ServiceEntry, SYNC.to_string(), name)
        } else {
            let name = format!("{id}-egress");
            let sidecar: Sidecar = serde_json::from_value(json!({
                "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
                "metadata": {"name": name, "namespace": ns_of(id)},
                "spec": {"egress": [{"hosts": ["./*", "istio-system/*"]}]},
            }))
            .unwrap();
            if !try_apply(client, &sidecar).await {
                return;
            }
            (Kind::Sidecar, ns_of(id), name)
        };
        let key = (m, kind, ns.clone(), name.clone());
        match resource_version(client, kind, &ns, &name).await {
            // The name was flotilla's already: the user wrote into one of its objects, which
            // flotilla puts back (it carries flotilla's label), so it is not the user's.
            Some((_, true)) => self.tally.fault("user wrote into one of flotilla's objects"),
            Some((rv, false)) => {
                self.users.entry(key).or_insert(rv);
            }
            None => {}
        }
    }

    /// Rotate a member's credentials, remove its Secret, or break its kubeconfig; or restore it.
    async fn registration(&mut self, m: usize) {
        let secrets: Api<Secret> = Api::namespaced(self.hub_client.clone(), FLOTILLA_NAMESPACE);
        let member = &self.members[m];
        let proxy = &self.member_proxies[m];
        match self.rng.below(4) {
            0 => {
                self.tally.fault("credentials rotated");
                let kubeconfig = if self.rng.chance(50) {
                    member.kubeconfig_for("rotated", "flotilla-test-rotated")
                } else {
                    member.admin_kubeconfig()
                };
                apply(&self.hub_client, &member_secret(member, proxy, kubeconfig)).await;
                self.unregistered.remove(&m);
            }
            1 => {
                self.tally.fault("registration Secret removed");
                let _ = secrets.delete(&format!("member-{}", member.name), &DeleteParams::default()).await;
                self.unregistered.insert(m);
            }
            2 => {
                self.tally.fault("broken kubeconfig");
                let broken = "apiVersion: v1\nclusters: [: broken".to_string();
                apply(&self.hub_client, &member_secret(member, proxy, broken)).await;
                self.unregistered.insert(m);
            }
            _ => {
                apply(&self.hub_client, &member_secret(member, proxy, member.admin_kubeconfig())).await;
                self.unregistered.remove(&m);
            }
        }
    }

    /// SIGKILL the replica that leads (no lease release); the other takes over; it comes back.
    async fn kill_leader(&mut self) {
        for r in &mut self.replicas {
            if r.is_running() && r.metric("flotilla_leader").await == 1.0 {
                self.tally.fault("leader killed");
                r.kill();
                return;
            }
        }
        for r in &mut self.replicas {
            if !r.is_running() {
                r.restart();
            }
        }
    }

    /// Everything back: members up and registered, both replicas running; then wait until the
    /// leader has converged with every member synced.
    async fn settle(&mut self) -> usize {
        for m in std::mem::take(&mut self.frozen) {
            self.members[m].thaw();
        }
        for m in self.down.clone() {
            self.restart_member(m).await;
        }
        for proxy in self.member_proxies.iter().chain(&self.hub_proxies) {
            proxy.black_hole(false);
        }
        self.black_holed.clear();
        self.cut_off = None;
        if std::mem::take(&mut self.silent_registered) {
            let secrets: Api<Secret> = Api::namespaced(self.hub_client.clone(), FLOTILLA_NAMESPACE);
            let _ = secrets.delete("silent", &DeleteParams::default()).await;
        }
        for m in 0..MEMBERS.len() {
            let secret = member_secret(&self.members[m], &self.member_proxies[m], self.members[m].admin_kubeconfig());
            apply(&self.hub_client, &secret).await;
        }
        self.unregistered.clear();
        // The previous valid spec an invalid edit leaves in force lives in the leader's memory
        // (docs/decisions.md), which render, reading a snapshot, cannot know: the end state has
        // no invalid policies, so the two must agree. The churn above still exercised them.
        for ((m, ..), valid) in std::mem::take(&mut self.invalid) {
            match valid {
                Repair::Gtp(g) => drop(apply(&self.clients[m], &*g).await),
                Repair::Ccc(c) => drop(apply(&self.clients[m], &*c).await),
            }
        }
        for r in &mut self.replicas {
            if !r.is_running() {
                r.restart();
            }
        }
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            for (i, r) in self.replicas.iter().enumerate() {
                let (code, body) = r.get("/debug/clusters").await;
                let Ok(view) = serde_json::from_str::<serde_json::Value>(&body) else { continue };
                let synced = MEMBERS.iter().all(|id| view["clusters"][id]["state"] == "synced");
                if code == 200 && view["leader"] == true && view["converged"] == true && synced {
                    return i;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let mut views = String::new();
                for r in &self.replicas {
                    views.push_str(&format!(
                        "replica {}: {}\nlog:\n{}\n",
                        r.name,
                        r.get("/debug/clusters").await.1,
                        r.log_tail()
                    ));
                }
                panic!("seed {}: the fleet did not settle:\n{views}", self.seed);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Applies, tolerating a refusal (a member going down, an object the API server rejects).
async fn try_apply<K>(client: &Client, obj: &K) -> bool
where
    K: kube::Resource<DynamicType = ()> + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let resource = kube::api::ApiResource::erase::<K>(&());
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), obj.meta().namespace.as_deref().unwrap_or("default"), &resource);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(obj)).await.is_ok()
}

/// An object's resourceVersion, and whether it carries flotilla's label.
async fn resource_version(client: &Client, kind: Kind, ns: &str, name: &str) -> Option<(String, bool)> {
    let meta = match kind {
        Kind::ServiceEntry => Api::<ServiceEntry>::namespaced(client.clone(), ns).get_opt(name).await.ok()??.metadata,
        Kind::Sidecar => Api::<Sidecar>::namespaced(client.clone(), ns).get_opt(name).await.ok()??.metadata,
        other => panic!("no user objects of kind {other}"),
    };
    Some((meta.resource_version.clone()?, flotilla::meta::is_managed(&meta)))
}

/// Samples every member's ServiceEntries and records each host's address; an address that moves
/// is a failure, reported with the seed.
fn track_vips(
    clients: Vec<Client>,
    seen: Arc<Mutex<BTreeMap<String, String>>>,
    moved: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for (m, client) in clients.iter().enumerate() {
                let api: Api<ServiceEntry> = Api::namespaced(client.clone(), SYNC);
                let Ok(list) = tokio::time::timeout(Duration::from_secs(2), api.list(&ListParams::default())).await
                else {
                    continue;
                };
                let Ok(list) = list else { continue };
                for se in list.items.iter().filter(|se| flotilla::meta::is_managed(&se.metadata)) {
                    let (Some(host), Some(ip)) = (se.spec.hosts.first(), se.spec.addresses.first()) else { continue };
                    // Only flotilla's own form of its objects (`<host>-se`): someone writing into
                    // one shows other hosts for a moment, until flotilla puts its own back.
                    if se.metadata.name.as_deref() != Some(format!("{host}-se").as_str()) {
                        continue;
                    }
                    let mut seen = seen.lock().unwrap();
                    match seen.get(host) {
                        Some(before) if before != ip => moved
                            .lock()
                            .unwrap()
                            .push(format!("member {}: host {host} moved from {before} to {ip}", MEMBERS[m])),
                        Some(_) => {}
                        None => {
                            seen.insert(host.clone(), ip.clone());
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// Every write request a replica sent (its debug line `write request`) came while no other
/// replica led: the leaders, in the order they announced it (`leadership changed leader=true`),
/// each own the time until the next one's announcement. A replica loses the right to write at
/// its renew deadline, at least `--lease-grace` before another may take the lease, so a write
/// in another's time is a second writer, not a question of log timing.
fn two_writers(replicas: &[Flotilla]) -> Vec<String> {
    // (wall time, replica, what): the log's RFC 3339 UTC timestamps sort as text.
    let mut timeline: Vec<(String, usize, bool)> = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        for log in r.logs() {
            for line in log.lines() {
                let Some(stamp) = line.split_whitespace().next() else { continue };
                if line.contains("leadership changed") && line.contains("leader=true") {
                    timeline.push((stamp.to_string(), i, true));
                } else if line.contains("write request") {
                    timeline.push((stamp.to_string(), i, false));
                }
            }
        }
    }
    timeline.sort();
    let mut leader = None;
    let mut found = Vec::new();
    for (stamp, replica, took) in timeline {
        if took {
            leader = Some(replica);
        } else if leader.is_some_and(|l| l != replica) {
            found.push(format!(
                "replica {} sent a write at {stamp} while replica {} led",
                replicas[replica].name,
                replicas[leader.unwrap()].name
            ));
        }
    }
    found.truncate(20);
    found
}

/// The status flotilla wrote on every policy in the snapshot agrees with render's verdict.
async fn status_mismatches(soak: &Soak, dir: &std::path::Path) -> Vec<String> {
    let loaded = flotilla::fleet_dir::load(dir).unwrap();
    let engine = flotilla::render::engine(&loaded, &flotilla::settings::Settings::default(), "flotilla-vips");
    let mut found = Vec::new();
    for report in engine.desired.reports() {
        let client = match report.at.cluster.as_str() {
            flotilla::meta::HUB => &soak.hub_client,
            member => &soak.clients[MEMBERS.iter().position(|m| *m == member).expect("a member")],
        };
        let (ns, name) = (&report.at.namespace, &report.at.name);
        let status = match report.kind {
            Kind::GlobalTrafficPolicy => Api::<GlobalTrafficPolicy>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .ok()
                .map(|o| (o.status, o.metadata.generation)),
            Kind::OutlierDetection => Api::<OutlierDetection>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .ok()
                .map(|o| (o.status, o.metadata.generation)),
            Kind::ClientConnectionConfig => Api::<ClientConnectionConfig>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .ok()
                .map(|o| (o.status, o.metadata.generation)),
            Kind::Dependency => Api::<flotilla::crd::Dependency>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .ok()
                .map(|o| (o.status, o.metadata.generation)),
            _ => None,
        };
        let (want, _) = report.state.describe();
        match status {
            Some((Some(s), generation)) if s.state.as_deref() == Some(want) && s.observed_generation == generation => {}
            other => found.push(format!(
                "{} {}: render says {want}, the object carries {:?}",
                report.kind,
                report.at,
                other.map(|(s, _)| s.and_then(|s| s.state))
            )),
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn churn_and_faults_leave_exactly_what_render_says() {
    let seed = seed();
    let seconds = soak_seconds();
    println!("soak: seed {seed} (replay with FLOTILLA_SOAK_SEED={seed}), {seconds} s");
    let _serial = ONE_FLEET_AT_A_TIME.lock().await;
    let mut soak = Soak::start(seed).await;
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let moved = Arc::new(Mutex::new(Vec::new()));
    let tracker = track_vips(soak.clients.clone(), seen.clone(), moved.clone());

    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        soak.step().await;
        tokio::time::sleep(Duration::from_millis(soak.rng.below(150) as u64)).await;
    }
    let leader = soak.settle().await;
    tracker.abort();

    let dir = oracle::fresh_dir("soak");
    let members: Vec<(&str, &Client)> = MEMBERS.iter().copied().zip(soak.clients.iter()).collect();
    let hub_kubeconfig = soak.hub.admin_kubeconfig();
    let (_, mut failures) =
        oracle::converge_to_render(&hub_kubeconfig, FLOTILLA_NAMESPACE, &members, SYNC, &dir, WAIT).await;
    failures.extend(moved.lock().unwrap().iter().cloned());
    for ((m, kind, ns, name), rv) in &soak.users {
        let now = resource_version(&soak.clients[*m], *kind, ns, name).await.map(|(rv, _)| rv);
        if now.as_ref() != Some(rv) {
            failures.push(format!(
                "member {}: the user's {kind} {ns}/{name} was touched: resourceVersion {rv} → {now:?}",
                MEMBERS[*m]
            ));
        }
    }
    // Statuses follow the objects: give them the same patience.
    let deadline = tokio::time::Instant::now() + WAIT;
    let statuses = loop {
        let found = status_mismatches(&soak, &dir).await;
        if found.is_empty() || tokio::time::Instant::now() >= deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    failures.extend(statuses);
    failures.extend(two_writers(&soak.replicas));
    let writes = soak.replicas[leader].metric("flotilla_api_writes_total").await;
    let rss: Vec<u64> = soak.replicas.iter().map(|r| r.peak_rss_kib() / 1024).collect();
    println!(
        "soak: seed {seed}: {} events, faults {:?}, {} hosts tracked, leader's writes {writes}, peak RSS of the replicas {rss:?} MiB, mismatches {}",
        soak.tally.events,
        soak.tally.faults,
        seen.lock().unwrap().len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: the fleet is not what render says (replay with FLOTILLA_SOAK_SEED={seed}):\n{}",
        failures.join("\n")
    );
    std::fs::remove_dir_all(&dir).unwrap();

    sick_neighbours(&mut soak, leader).await;
    let leader = converged_leader(&soak).await;
    burst(&soak, leader).await;
}

/// GTP changes timed until their DestinationRule carries them in both target members, each
/// change flipping the weights (polled every 10 ms).
async fn timed_changes(soak: &Soak, leader: usize, count: usize, first_west: i32) -> Vec<Duration> {
    let flotilla = &soak.replicas[leader];
    let mut took = Vec::new();
    for i in 0..count {
        let west = if (i as i32 + first_west).rem_euclid(2) == 0 { 30 } else { 70 };
        let policies = json!([{"dnsPrefix": "default", "lbType": "FAILOVER",
            "target": [{"region": "us-west-2", "weight": west}, {"region": "us-east-2", "weight": 100 - west}]}]);
        let started = Instant::now();
        apply(&soak.clients[0], &gtp("ns-lat", "lat-gtp", "lat", policies)).await;
        loop {
            let mut done = true;
            for client in &soak.clients[..2] {
                let dr = get_dr(client, "stage.lat.global-default-dr").await;
                done &= dr.is_some_and(|dr| distribute(&dr)[0]["to"]["us-west-2"] == west);
            }
            if done {
                break;
            }
            assert!(
                started.elapsed() < WAIT,
                "seed {}: change {i} not written:
{}",
                soak.seed,
                flotilla.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        took.push(started.elapsed());
    }
    took.sort();
    took
}

/// While members are sick, healthy ones are written as fast as when none is: ten GTP changes of
/// an identity in soak-0 with a client in soak-1, timed with every member healthy, then with
/// soak-2 black-holed and a member registered at a silent address (just registered: never
/// listed). Both medians are printed; what is asserted is causal: every change lands before
/// the sick members could have turned stale (`--stale-after` 8 s), so none waited for them.
async fn sick_neighbours(soak: &mut Soak, leader: usize) {
    const CHANGES: usize = 10;
    deploy(&soak.clients[0], "ns-lat", "lat").await;
    deploy(&soak.clients[1], "ns-lat", "lat-client").await;
    apply(&soak.clients[1], &dependency("ns-lat", "lat-deps", "lat-client", &["lat"])).await;
    let healthy = timed_changes(soak, leader, CHANGES, 0).await;

    soak.member_proxies[2].black_hole(true);
    soak.silent_member().await;
    let sick = timed_changes(soak, leader, CHANGES, 1).await;
    let view = soak.replicas[leader].json("/debug/clusters").await;
    soak.member_proxies[2].black_hole(false);
    soak.silent_member().await;

    let median = |d: &[Duration]| d[d.len() / 2];
    println!(
        "soak: change→write for healthy members, median (max) of {CHANGES}: {:.0?} ({:.0?}) with every member healthy, {:.0?} ({:.0?}) with one black-holed and one silent (×{:.2}); the sick then: {} / {}",
        median(&healthy),
        healthy[CHANGES - 1],
        median(&sick),
        sick[CHANGES - 1],
        median(&sick).as_secs_f64() / median(&healthy).as_secs_f64(),
        view["clusters"]["soak-2"]["state"],
        view["clusters"]["silent-1"]["state"],
    );
    assert!(
        sick[CHANGES - 1] < Duration::from_secs(8),
        "seed {}: a change for healthy members took {:?} while others were sick: held back by them",
        soak.seed,
        sick[CHANGES - 1]
    );
}

/// 1,000 Deployment changes in one member reach flotilla within a second: 100 workloads, each
/// switched 10 times between the two ports of its Service (which moves its ServiceEntry's
/// port). An API server on two cores takes longer than a second to accept a thousand writes, so
/// both replicas are paused (SIGSTOP) while they are made and resumed together: the changes then
/// arrive at once. Written per pass, not per event: each ServiceEntry at most once per pass, and
/// far fewer writes than changes; the figures are printed.
async fn burst(soak: &Soak, leader: usize) {
    const WORKLOADS: usize = 100;
    const ROUNDS: usize = 10;
    let flotilla = &soak.replicas[leader];
    let client = &soak.clients[0];
    let ns = "burst";
    apply(client, &namespace(ns)).await;
    let workload = |i: usize, port: i32| {
        let name = format!("burst-{i:03}");
        let mut d = deployment(ns, &name, &name, "stage");
        let template = d.spec.as_mut().unwrap().template.metadata.as_mut().unwrap();
        template
            .annotations
            .as_mut()
            .unwrap()
            .insert("traffic.sidecar.istio.io/includeInboundPorts".into(), port.to_string());
        d
    };
    for i in 0..WORKLOADS {
        let name = format!("burst-{i:03}");
        let mut s = service(ns, &name, "http", 80, 8080);
        s.spec.as_mut().unwrap().ports.as_mut().unwrap().push(k8s_openapi::api::core::v1::ServicePort {
            name: Some("grpc".into()),
            port: 9090,
            target_port: Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9090)),
            ..Default::default()
        });
        try_apply(client, &s).await;
        try_apply(client, &workload(i, 8080)).await;
    }
    let written = || async {
        let ses = Api::<ServiceEntry>::namespaced(client.clone(), SYNC).list(&ListParams::default()).await.unwrap();
        ses.items
            .iter()
            .filter(|s| s.spec.hosts[0].starts_with("stage.burst-"))
            .map(|s| s.spec.ports[0].name.clone())
            .collect::<Vec<_>>()
    };
    testenv::controller::eventually("the burst's workloads written", WAIT, flotilla, || async {
        (written().await.len() == WORKLOADS).then_some(())
    })
    .await;
    converge(flotilla).await;

    // The lease may change hands while both are paused: count over both replicas.
    let applies_before = total(soak, "flotilla_api_writes_total", "verb=\"apply\"").await;
    let passes_before = total(soak, "flotilla_passes_total", "").await;
    let latency_before = histograms(soak).await;
    for r in &soak.replicas {
        r.pause();
    }
    let started = Instant::now();
    let changes: Vec<(usize, usize)> = (0..ROUNDS).flat_map(|round| (0..WORKLOADS).map(move |i| (i, round))).collect();
    futures::stream::iter(changes)
        .for_each_concurrent(64, |(i, round)| async move {
            // Odd rounds the gRPC port, even rounds HTTP; the last round (9) leaves gRPC.
            try_apply(client, &workload(i, if round % 2 == 1 { 9090 } else { 8080 })).await;
        })
        .await;
    let sent = started.elapsed();
    for r in &soak.replicas {
        r.resume();
    }
    // Waited for by hand, so that a timeout says which objects lag and what both replicas think.
    let deadline = Instant::now() + WAIT;
    while !written().await.iter().all(|p| p == "grpc") {
        if Instant::now() >= deadline {
            let lagging = written().await.iter().filter(|p| *p != "grpc").count();
            let mut views = String::new();
            for r in &soak.replicas {
                let view = r.get("/debug/clusters").await.1;
                views.push_str(&format!("replica {}: {view}\nlog:\n{}\n", r.name, r.log_tail()));
            }
            panic!("seed {}: {lagging} ServiceEntries not on their last port after {WAIT:?}:\n{views}", soak.seed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = converged_leader(soak).await;
    let flotilla = &soak.replicas[leader];
    let applies = total(soak, "flotilla_api_writes_total", "verb=\"apply\"").await - applies_before;
    let passes = total(soak, "flotilla_passes_total", "").await - passes_before;
    let latency = histograms(soak).await;
    let (p50, p99) = quantiles(&latency_before, &latency);
    println!(
        "burst: {} Deployment changes sent in {sent:.1?}; {passes} passes, {applies} applies ({WORKLOADS} ServiceEntries changed {ROUNDS} times each), peak RSS {} MiB, change→write p50 ≤ {p50} s, p99 ≤ {p99} s",
        WORKLOADS * ROUNDS,
        flotilla.peak_rss_kib() / 1024
    );
    assert!(
        applies <= (WORKLOADS as f64) * passes,
        "seed {}: {applies} applies in {passes} passes: more than one per object and pass",
        soak.seed
    );
    assert!(
        applies < (WORKLOADS * ROUNDS) as f64 / 2.0,
        "seed {}: {applies} applies for {} changes: written per event, not per pass",
        soak.seed,
        WORKLOADS * ROUNDS
    );
}

async fn total(soak: &Soak, name: &str, labels: &str) -> f64 {
    let mut sum = 0.0;
    for r in &soak.replicas {
        sum += r.metric_with(name, labels).await;
    }
    sum
}

/// The change-to-write histograms of both replicas, added.
async fn histograms(soak: &Soak) -> Vec<(f64, f64)> {
    let mut sum: Vec<(f64, f64)> = Vec::new();
    for r in &soak.replicas {
        for (le, n) in histogram(r, "flotilla_change_to_write_seconds").await {
            match sum.iter_mut().find(|(l, _)| *l == le) {
                Some(entry) => entry.1 += n,
                None => sum.push((le, n)),
            }
        }
    }
    sum
}

/// The replica that leads once the fleet has converged.
async fn converged_leader(soak: &Soak) -> usize {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for (i, r) in soak.replicas.iter().enumerate() {
            let view: serde_json::Value = serde_json::from_str(&r.get("/debug/clusters").await.1).unwrap_or_default();
            if view["leader"] == true && view["converged"] == true {
                return i;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "seed {}: no replica converged after the burst", soak.seed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn converge(flotilla: &Flotilla) {
    testenv::controller::eventually("the burst written", WAIT, flotilla, || async {
        (flotilla.json("/debug/clusters").await["converged"] == true).then_some(())
    })
    .await;
}

/// A histogram's cumulative bucket counts by upper bound.
async fn histogram(flotilla: &Flotilla, name: &str) -> Vec<(f64, f64)> {
    let (_, body) = flotilla.get("/metrics").await;
    let prefix = format!("{name}_bucket{{le=\"");
    body.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// Upper bounds of the buckets holding the 50th and 99th percentile of what was observed between
/// two readings of a histogram.
fn quantiles(before: &[(f64, f64)], after: &[(f64, f64)]) -> (f64, f64) {
    let counts: Vec<(f64, f64)> =
        after.iter().map(|(le, n)| (*le, n - before.iter().find(|(b, _)| b == le).map_or(0.0, |(_, m)| *m))).collect();
    let total = counts.last().map_or(0.0, |(_, n)| *n);
    let at = |q: f64| counts.iter().find(|(_, n)| *n >= q * total).map_or(f64::NAN, |(le, _)| *le);
    (at(0.5), at(0.99))
}

use futures::StreamExt;
