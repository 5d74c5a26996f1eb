//! Prometheus metrics (SPEC §7), with typed label sets and a registry of our own (no globals).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterState {
    pub cluster: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterKind {
    pub cluster: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Write {
    pub cluster: String,
    pub verb: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterAction {
    pub cluster: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabel {
    pub secret: String,
}

pub struct Metrics {
    registry: Registry,
    /// 1 for the state a member is in, 0 for the others.
    pub cluster_state: Family<ClusterState, Gauge>,
    pub objects_desired: Family<ClusterKind, Gauge>,
    pub objects_applied: Family<ClusterKind, Counter>,
    pub objects_pruned: Family<ClusterKind, Counter>,
    pub conflicts: Family<ClusterKind, Gauge>,
    pub api_writes: Family<Write, Counter>,
    pub api_write_errors: Family<Write, Counter>,
    pub registration_errors: Family<SecretLabel, Gauge>,
    pub compute_duration: Histogram,
    pub change_to_write: Histogram,
    pub identities_recomputed: Counter,
    pub passes: Counter,
    pub leader: Gauge,
    pub dry_run_planned: Family<ClusterAction, Gauge>,
    pub disallowed_claims: Family<ClusterLabel, Gauge>,
    pub member_paused: Family<ClusterLabel, Gauge>,
    pub member_drained: Family<ClusterLabel, Gauge>,
    pub prunes_held: Family<ClusterLabel, Gauge>,
    pub token_expiry: Family<ClusterLabel, Gauge>,
    pub last_successful_write: Family<ClusterLabel, Gauge>,
    pub watch_restarts: Family<ClusterKind, Counter>,
    pub vip_store_entries: Family<ConfigMapLabel, Gauge>,
    pub vip_store_bytes: Family<ConfigMapLabel, Gauge>,
    pub input_queue_depth: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigMapLabel {
    pub configmap: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("flotilla"),
            cluster_state: Family::default(),
            objects_desired: Family::default(),
            objects_applied: Family::default(),
            objects_pruned: Family::default(),
            conflicts: Family::default(),
            api_writes: Family::default(),
            api_write_errors: Family::default(),
            registration_errors: Family::default(),
            // 100 µs … ~3.3 s
            compute_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            // 5 ms … ~164 s
            change_to_write: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            identities_recomputed: Counter::default(),
            passes: Counter::default(),
            leader: Gauge::default(),
            dry_run_planned: Family::default(),
            disallowed_claims: Family::default(),
            member_paused: Family::default(),
            member_drained: Family::default(),
            prunes_held: Family::default(),
            token_expiry: Family::default(),
            last_successful_write: Family::default(),
            watch_restarts: Family::default(),
            vip_store_entries: Family::default(),
            vip_store_bytes: Family::default(),
            input_queue_depth: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "cluster_state",
            "Member state (connecting, synced, stale, failed): 1 for the current one",
            m.cluster_state.clone(),
        );
        r.register("objects_desired", "Objects flotilla wants in a member, by kind", m.objects_desired.clone());
        r.register("objects_applied", "Objects server-side applied, by member and kind", m.objects_applied.clone());
        r.register("objects_pruned", "Managed objects deleted as no longer desired", m.objects_pruned.clone());
        r.register("conflicts", "Objects flotilla wants but someone else's object holds the name", m.conflicts.clone());
        r.register(
            "api_writes",
            "Write requests sent to API servers (apply, delete, status, create, update)",
            m.api_writes.clone(),
        );
        r.register("api_write_errors", "Write requests that failed", m.api_write_errors.clone());
        r.register(
            "registration_errors",
            "Problems with a registration Secret (refused kubeconfig, claimed id)",
            m.registration_errors.clone(),
        );
        r.register(
            "compute_duration_seconds",
            "Time of one recompute of the desired state",
            m.compute_duration.clone(),
        );
        r.register(
            "change_to_write_seconds",
            "From receiving an input change to the write that reflects it",
            m.change_to_write.clone(),
        );
        r.register("identities_recomputed", "Identities recomputed", m.identities_recomputed.clone());
        r.register("passes", "Passes of the runtime: recompute, plan, dispatch", m.passes.clone());
        r.register("leader", "1 while this replica holds the lease and writes", m.leader.clone());
        r.register(
            "dry_run_planned",
            "With --dry-run: the objects flotilla would create, update, adopt or prune in a member now, and the conflicts and Admiral leftovers it finds",
            m.dry_run_planned.clone(),
        );
        r.register(
            "disallowed_claims",
            "Workloads claiming an identity their namespace may not run (flotilla.io/identities): refused with --tenancy=owned, served with open",
            m.disallowed_claims.clone(),
        );
        r.register(
            "member_paused",
            "1 while a member is paused (flotilla.io/paused): nothing is written to it",
            m.member_paused.clone(),
        );
        r.register(
            "member_drained",
            "1 while a member is drained (flotilla.io/drain): its endpoints are withheld wherever another member serves",
            m.member_drained.clone(),
        );
        r.register(
            "prunes_held",
            "Prunes the blast-radius guard holds in a member, waiting for the cause to be fixed or the hold released",
            m.prunes_held.clone(),
        );
        r.register(
            "token_expiry_timestamp_seconds",
            "When the token in a member's registration expires (its flotilla.io/token-expires annotation, written by register-cluster), in seconds since the epoch",
            m.token_expiry.clone(),
        );
        r.register(
            "last_successful_write_timestamp_seconds",
            "When a write job to a member last finished without an error, in seconds since the epoch",
            m.last_successful_write.clone(),
        );
        r.register(
            "watch_restarts",
            "Failures of a member's watches, by kind; each is retried from a fresh list after a backoff",
            m.watch_restarts.clone(),
        );
        r.register("vip_store_entries", "Hosts in each ConfigMap of the VIP store", m.vip_store_entries.clone());
        r.register(
            "vip_store_bytes",
            "Size of the data of each ConfigMap of the VIP store (the API server refuses one past 1 MiB)",
            m.vip_store_bytes.clone(),
        );
        r.register(
            "input_queue_depth",
            "Inputs (watch events, write results) waiting for the runtime when a pass starts",
            m.input_queue_depth.clone(),
        );
        m
    }
}

impl Metrics {
    pub fn write(&self, cluster: &str, verb: &str, kind: &str, ok: bool) {
        let labels = Write { cluster: cluster.to_string(), verb: verb.to_string(), kind: kind.to_string() };
        self.api_writes.get_or_create(&labels).inc();
        // Created with the first write, so that a rate of errors is 0 rather than absent.
        let errors = self.api_write_errors.get_or_create(&labels);
        if !ok {
            errors.inc();
        }
    }

    /// Counts what a write job applied and pruned in `cluster`.
    pub fn written(&self, cluster: &str, report: &super::WriteReport) {
        for o in &report.applied {
            let labels = ClusterKind { cluster: cluster.to_string(), kind: o.key.kind.to_string() };
            self.objects_applied.get_or_create(&labels).inc();
        }
        for k in &report.pruned {
            let labels = ClusterKind { cluster: cluster.to_string(), kind: k.kind.to_string() };
            self.objects_pruned.get_or_create(&labels).inc();
        }
    }

    /// What a member should hold (per kind of `Kind::OUTPUTS`), and the conflicts found there.
    pub fn set_member_objects(
        &self,
        cluster: &str,
        desired: [usize; crate::meta::Kind::OUTPUTS.len()],
        conflicts: &[crate::compute::ObjectKey],
    ) {
        for (kind, n) in crate::meta::Kind::OUTPUTS.into_iter().zip(desired) {
            let labels = ClusterKind { cluster: cluster.to_string(), kind: kind.to_string() };
            self.objects_desired.get_or_create(&labels).set(n as i64);
            let c = conflicts.iter().filter(|k| k.kind == kind).count();
            self.conflicts.get_or_create(&labels).set(c as i64);
            // Counters shown from the start, at 0, rather than absent until the first write.
            self.objects_applied.get_or_create(&labels).inc_by(0);
            self.objects_pruned.get_or_create(&labels).inc_by(0);
        }
    }

    pub fn set_cluster_state(&self, cluster: &str, state: &str) {
        for s in super::health::State::NAMES {
            let labels = ClusterState { cluster: cluster.to_string(), state: s.to_string() };
            self.cluster_state.get_or_create(&labels).set(i64::from(s == state));
        }
    }

    /// A member starts: its watches' restart counters are shown at 0 from now on.
    pub fn member_started(&self, cluster: &str, kinds: &[crate::meta::Kind]) {
        for kind in kinds {
            let labels = ClusterKind { cluster: cluster.to_string(), kind: kind.to_string() };
            self.watch_restarts.get_or_create(&labels).inc_by(0);
        }
    }

    pub fn watch_restarted(&self, cluster: &str, kind: crate::meta::Kind) {
        self.watch_restarts.get_or_create(&ClusterKind { cluster: cluster.to_string(), kind: kind.to_string() }).inc();
    }

    /// The time a member's token expires, from its registration; none: the series goes.
    pub fn set_token_expiry(&self, cluster: &str, expires: Option<i64>) {
        let labels = ClusterLabel { cluster: cluster.to_string() };
        match expires {
            Some(at) => {
                self.token_expiry.get_or_create(&labels).set(at);
            }
            None => {
                self.token_expiry.remove(&labels);
            }
        }
    }

    /// Each ConfigMap of the VIP store: its hosts, and the size of its data.
    pub fn set_vip_store(&self, shards: &[super::watch::ShardSize]) {
        self.vip_store_entries.clear();
        self.vip_store_bytes.clear();
        for shard in shards {
            let labels = ConfigMapLabel { configmap: shard.name.clone() };
            self.vip_store_entries.get_or_create(&labels).set(shard.entries as i64);
            self.vip_store_bytes.get_or_create(&labels).set(shard.bytes as i64);
        }
    }

    pub fn forget_cluster(&self, cluster: &str) {
        for family in [
            &self.disallowed_claims,
            &self.member_paused,
            &self.member_drained,
            &self.prunes_held,
            &self.token_expiry,
            &self.last_successful_write,
        ] {
            family.remove(&ClusterLabel { cluster: cluster.to_string() });
        }
        for kind in super::MEMBER_KINDS {
            self.watch_restarts.remove(&ClusterKind { cluster: cluster.to_string(), kind: kind.to_string() });
        }
        for kind in crate::meta::Kind::OUTPUTS {
            let labels = ClusterKind { cluster: cluster.to_string(), kind: kind.to_string() };
            for family in [&self.objects_desired, &self.conflicts] {
                family.remove(&labels);
            }
            for family in [&self.objects_applied, &self.objects_pruned] {
                family.remove(&labels);
            }
        }
        for s in super::health::State::NAMES {
            self.cluster_state.remove(&ClusterState { cluster: cluster.to_string(), state: s.to_string() });
        }
        for (action, _) in crate::compute::plan::PlanSummary::default().counts() {
            self.dry_run_planned.remove(&ClusterAction { cluster: cluster.to_string(), action: action.to_string() });
        }
    }

    /// What a dry run would do in `cluster` now.
    pub fn set_dry_run_plan(&self, cluster: &str, plan: &crate::compute::plan::PlanSummary) {
        for (action, n) in plan.counts() {
            let labels = ClusterAction { cluster: cluster.to_string(), action: action.to_string() };
            self.dry_run_planned.get_or_create(&labels).set(n as i64);
        }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
