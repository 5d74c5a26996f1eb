//! A deterministic synthetic fleet for scale runs: C clusters across R regions, I identities each
//! running in 1–3 clusters behind a Service, each a client of D destinations (a few with `*`),
//! GTPs on a fraction of them, Argo Rollouts (blue-green and routed canaries) for another. The same seed gives the same fleet, as objects (for benchmarks)
//! or as a fleet directory (`flotilla synth`, then `flotilla render`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// The shape of a synthetic fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthSpec {
    pub clusters: usize,
    pub regions: usize,
    pub identities: usize,
    /// Destinations per client.
    pub dependencies: usize,
    /// One identity in this many depends on `*` (0: none).
    pub wildcard_every: usize,
    /// One identity in this many has a GTP (0: none).
    pub gtp_every: usize,
    /// One identity in this many runs as an Argo Rollout, blue-green or a routed canary by turns
    /// (0: none).
    pub rollout_every: usize,
    pub seed: u64,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            clusters: 10,
            regions: 3,
            identities: 500,
            dependencies: 5,
            wildcard_every: 1000,
            gtp_every: 10,
            rollout_every: 10,
            seed: 1,
        }
    }
}

/// xorshift64*: small, fast, and the same everywhere.
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
}

pub fn cluster_name(i: usize) -> String {
    format!("c{i:03}")
}

pub fn identity_name(i: usize) -> String {
    format!("svc{i:05}")
}

/// The fleet as YAML documents per cluster directory (`_hub` holds nothing: Dependencies live
/// next to their clients, as in most fleets).
pub fn generate(spec: &SynthSpec) -> BTreeMap<String, String> {
    assert!(spec.clusters > 0 && spec.regions > 0, "a fleet needs clusters and regions");
    let mut rng = Rng(spec.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for c in 0..spec.clusters {
        let region = format!("region-{}", c % spec.regions);
        let doc = files.entry(cluster_name(c)).or_default();
        for n in 0..3 {
            let _ = write!(
                doc,
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-{n}\n  labels: {{topology.kubernetes.io/region: {region}}}\n"
            );
        }
        let _ = write!(
            doc,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: istio-eastwestgateway\n  namespace: istio-system\n  labels: {{istio: eastwestgateway}}\nspec:\n  selector: {{istio: eastwestgateway}}\n  ports: [{{name: tls, port: 15443}}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 10.{}.{}.1}}]\n",
            c / 256,
            c % 256
        );
    }
    // Where each identity runs: 1–3 distinct clusters.
    let mut placement: Vec<BTreeSet<usize>> = Vec::with_capacity(spec.identities);
    for _ in 0..spec.identities {
        let count = 1 + rng.below(3.min(spec.clusters));
        let mut set = BTreeSet::new();
        while set.len() < count {
            set.insert(rng.below(spec.clusters));
        }
        placement.push(set);
    }
    for (i, clusters) in placement.iter().enumerate() {
        let id = identity_name(i);
        let env = if i % 5 == 4 { "prod" } else { "stage" };
        let wildcard = spec.wildcard_every > 0 && i % spec.wildcard_every == spec.wildcard_every - 1;
        let mut destinations: BTreeSet<String> = BTreeSet::new();
        if wildcard {
            destinations.insert("*".into());
        } else if spec.identities > 1 {
            while destinations.len() < spec.dependencies.min(spec.identities - 1) {
                let d = rng.below(spec.identities);
                if d != i {
                    destinations.insert(identity_name(d));
                }
            }
        }
        let gtp = spec.gtp_every > 0 && i % spec.gtp_every == 0;
        // Some(true): a blue-green Rollout; Some(false): a routed canary; None: a Deployment.
        let rollout = (spec.rollout_every > 0 && i % spec.rollout_every == 1 % spec.rollout_every)
            .then_some((i / spec.rollout_every.max(1)).is_multiple_of(2));
        let first_cluster = *clusters.iter().next().expect("at least one cluster");
        for &c in clusters {
            let doc = files.get_mut(&cluster_name(c)).expect("cluster file");
            let pod = format!(
                "  selector: {{matchLabels: {{app: {id}}}}}\n  template:\n    metadata:\n      labels: {{app: {id}, identity: {id}}}\n      annotations: {{admiral.io/env: {env}}}\n    spec:\n      containers:\n      - {{name: app, image: example.com/{id}:1, ports: [{{containerPort: 8080}}]}}\n"
            );
            let service = |name: &str| {
                format!(
                    "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns-{id}}}\nspec:\n  selector: {{app: {id}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
                )
            };
            match rollout {
                None => {
                    let _ = write!(
                        doc,
                        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {id}, namespace: ns-{id}}}\nspec:\n{pod}"
                    );
                    doc.push_str(&service(&id));
                }
                Some(blue_green) => {
                    let (second, strategy) = if blue_green {
                        (
                            "preview",
                            format!(
                                "  strategy:\n    blueGreen: {{activeService: {id}, previewService: {id}-preview}}\n"
                            ),
                        )
                    } else {
                        (
                            "canary",
                            format!(
                                "  strategy:\n    canary:\n      stableService: {id}\n      canaryService: {id}-canary\n      trafficRouting:\n        istio:\n          virtualService: {{name: {id}-vs}}\n"
                            ),
                        )
                    };
                    let _ = write!(
                        doc,
                        "---\napiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: {{name: {id}, namespace: ns-{id}}}\nspec:\n{pod}{strategy}"
                    );
                    doc.push_str(&service(&id));
                    doc.push_str(&service(&format!("{id}-{second}")));
                    if !blue_green {
                        let _ = write!(
                            doc,
                            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {id}-vs, namespace: ns-{id}}}\nspec:\n  hosts: [{id}.ns-{id}.svc.cluster.local]\n  http:\n  - route:\n    - {{destination: {{host: {id}}}, weight: 90}}\n    - {{destination: {{host: {id}-canary}}, weight: 10}}\n"
                        );
                    }
                }
            }
            if c == first_cluster {
                let dests = destinations.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(", ");
                let _ = write!(
                    doc,
                    "---\napiVersion: admiral.io/v1alpha1\nkind: Dependency\nmetadata: {{name: {id}, namespace: ns-{id}}}\nspec: {{source: {id}, destinations: [{dests}]}}\n"
                );
                if gtp {
                    let west = 50 + rng.below(50);
                    let (r0, r1) = (c % spec.regions, (c + 1) % spec.regions);
                    let targets = if r0 == r1 {
                        format!("[{{region: region-{r0}, weight: 100}}]")
                    } else {
                        format!(
                            "[{{region: region-{r0}, weight: {west}}}, {{region: region-{r1}, weight: {}}}]",
                            100 - west
                        )
                    };
                    let _ = write!(
                        doc,
                        "---\napiVersion: admiral.io/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata:\n  name: {id}\n  namespace: ns-{id}\n  labels: {{identity: {id}}}\n  annotations: {{admiral.io/env: {env}}}\nspec:\n  policy:\n  - dnsPrefix: default\n    lbType: FAILOVER\n    target: {targets}\n"
                    );
                }
            }
        }
    }
    files
}

/// Writes the fleet as `<dir>/<cluster>/fleet.yaml`.
pub fn write_fleet_dir(spec: &SynthSpec, dir: &Path) -> std::io::Result<()> {
    let progress = crate::progress::Progress::stderr("synth");
    progress.say("generating");
    let clusters = generate(spec);
    for (cluster, text) in &clusters {
        progress.tick(clusters.len(), "members written");
        let sub = dir.join(cluster);
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join("objects.yaml"), text)?;
    }
    Ok(())
}
