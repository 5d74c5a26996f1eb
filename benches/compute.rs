//! Scale figures for the pure engine, printed (never asserted): load, full compute, incremental
//! recompute after one change (GTP, Deployment scale-out to a new cluster, Dependency), plan with
//! nothing to do, and memory.
//!
//! Run: `cargo bench --bench compute` (sizes `FLOTILLA_BENCH_SIZES=10x500,100x5000,500x20000`,
//! clusters x identities, D=5). Sizes run smallest first in one process, so each size's memory
//! figure is its own: RSS after compute minus RSS before loading.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla::compute::plan::{ObservedObject, Scope};
use flotilla::compute::vip::VipTable;
use flotilla::compute::{Engine, ObjectKey};
use flotilla::ingest::InputObject;
use flotilla::model::ClusterHealth;
use flotilla::settings::Settings;
use flotilla::synth::{SynthSpec, cluster_name, identity_name, write_fleet_dir};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

unsafe extern "C" {
    /// mimalloc (flotilla's allocator): frees what it keeps for reuse, so that RSS shows what
    /// is live.
    fn mi_collect(force: bool);
}

/// (current RSS, peak RSS) of this process in KiB, after the allocator gave back what it could.
fn rss_kib() -> (u64, u64) {
    // SAFETY: mi_collect takes no pointers; any thread may call it at any time.
    unsafe { mi_collect(true) };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time of this process (all threads): steadier than wall-clock time on shared cores.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The 99th percentile (nearest rank): with fewer than 100 samples, the slowest.
fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99).div_ceil(100).max(1) - 1]
}

/// Median and p99 of one kind of change.
struct Spread(Duration, Duration);

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2?} (p99 {:.2?})", self.0, self.1)
    }
}

/// Times `rounds` recomputes, each after `change(round)` fed one object to the model.
fn incremental(engine: &mut Engine, rounds: usize, mut change: impl FnMut(&mut Engine, usize)) -> (Spread, usize) {
    let mut samples = Vec::new();
    let mut touched = 0;
    for round in 0..rounds {
        change(engine, round);
        let t = Instant::now();
        let r = engine.recompute();
        samples.push(t.elapsed());
        touched = touched.max(r.identities);
    }
    (Spread(median(samples.clone()), p99(samples)), touched)
}

fn main() {
    // As the flotilla binary runs.
    flotilla::without_huge_pages();
    let sizes = std::env::var("FLOTILLA_BENCH_SIZES").unwrap_or_else(|_| "10x500,100x5000,500x20000".into());
    println!(
        "size | desired objects (distinct) | load | ingest | full compute from empty, wall (CPU) | full recompute over itself, wall (CPU) | incremental, median (p99): GTP / scale-out / Dependency | plan, nothing changed | RSS model+desired, of which desired | bytes/object | CPU stolen"
    );
    for size in sizes.split(',') {
        let (c, i) = size.split_once('x').expect("sizes look like 100x5000");
        let spec = SynthSpec { clusters: c.parse().unwrap(), identities: i.parse().unwrap(), ..SynthSpec::default() };
        // Per process: two benches at once (two builds compared) must not share a fleet on disk.
        let dir = std::env::temp_dir().join(format!("flotilla-bench-{size}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_fleet_dir(&spec, &dir).unwrap();
        let (rss_before, _) = rss_kib();
        let counters = support::CpuCounters::now();

        let t = Instant::now();
        let loaded = flotilla::fleet_dir::load(&dir).unwrap();
        let load = t.elapsed();
        let _ = std::fs::remove_dir_all(&dir);
        let mut engine = Engine::new(Settings::default(), VipTable::default());
        for (id, o) in &loaded.clusters {
            engine.fleet.upsert_cluster(id, o.clone());
        }
        let t = Instant::now();
        for (cluster, obj) in &loaded.objects {
            engine.ingest(cluster, obj);
        }
        let ingest = t.elapsed();
        // The objects the incremental rounds change, taken before the input is dropped.
        let gtp = loaded
            .objects
            .iter()
            .find_map(|(c, o)| match o {
                InputObject::GlobalTrafficPolicy(g) => Some((c.clone(), g.clone())),
                _ => None,
            })
            .expect("the synthetic fleet has GTPs");
        let (home, deployment) = loaded
            .objects
            .iter()
            .find_map(|(c, o)| match o {
                InputObject::Deployment(d) => Some((c.clone(), d.clone())),
                _ => None,
            })
            .unwrap();
        let service = loaded
            .objects
            .iter()
            .find_map(|(c, o)| match o {
                InputObject::Service(s) if *c == home && s.metadata.namespace == deployment.metadata.namespace => {
                    Some(s.clone())
                }
                _ => None,
            })
            .unwrap();
        let elsewhere = (0..spec.clusters).map(cluster_name).find(|c| *c != home).unwrap();
        let ns = deployment.metadata.namespace.clone().unwrap();
        let first = identity_name(0);
        let dep = loaded
            .objects
            .iter()
            .find_map(|(c, o)| match o {
                InputObject::Dependency(d) if d.spec.source == first => Some((c.clone(), d.clone())),
                _ => None,
            })
            .unwrap();
        drop(loaded);

        // Cold: from an empty desired state, as at start-up. Warm: everything recomputed over the
        // desired state it already produced (a VIP table reset, a new cluster region).
        let rounds = if spec.identities > 10_000 { 1 } else { 3 };
        let repeat: usize = std::env::var("FLOTILLA_BENCH_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        let (mut cold, mut cold_cpu, mut warm, mut warm_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds * repeat {
            engine.clear_desired();
            let (t, cpu) = (Instant::now(), cpu_time());
            engine.recompute();
            cold.push(t.elapsed());
            cold_cpu.push(cpu_time() - cpu);
        }
        for _ in 0..rounds {
            engine.fleet.mark_all_dirty();
            let (t, cpu) = (Instant::now(), cpu_time());
            engine.recompute();
            warm.push(t.elapsed());
            warm_cpu.push(cpu_time() - cpu);
        }
        let (cold, cold_cpu, warm, warm_cpu) = (median(cold), median(cold_cpu), median(warm), median(warm_cpu));
        // Memory, measured apart from the timings (giving memory back to the system slows what
        // follows): the model alone, then with a desired state computed from empty.
        engine.clear_desired();
        let (rss_model, _) = rss_kib();
        engine.recompute();
        let (rss_after, peak) = rss_kib();
        let objects = engine.desired.object_count();
        // Distinct objects: members that stand in the same place share one.
        let built: usize = engine.desired.identities().map(|(_, o)| o.objects.len()).sum();
        // More rounds make the incremental recomputes dominate a profile of the bench.
        let changes: usize = std::env::var("FLOTILLA_BENCH_CHANGES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);

        // One GTP's weights flip back and forth.
        let (gtp_time, gtp_touched) = incremental(&mut engine, changes, |e, round| {
            let (cluster, mut g) = gtp.clone();
            if round % 2 == 0 {
                for p in &mut g.spec.policy {
                    p.outlier_detection =
                        Some(flotilla::crd::OutlierConfig { interval: Some(30), ..Default::default() });
                }
            }
            e.ingest(&cluster, &InputObject::GlobalTrafficPolicy(g));
        });
        // One Deployment scales out to a cluster it did not run in, then back.
        let (scale_time, scale_touched) = incremental(&mut engine, changes, |e, round| {
            if round % 2 == 0 {
                e.ingest(&elsewhere, &InputObject::Service(service.clone()));
                e.ingest(&elsewhere, &InputObject::Deployment(deployment.clone()));
            } else {
                let name = deployment.metadata.name.clone().unwrap();
                e.fleet.delete(&elsewhere, flotilla::meta::Kind::Deployment, &ns, &name);
            }
        });
        // One client's Dependency gains and loses a destination.
        let (dep_time, dep_touched) = incremental(&mut engine, changes, |e, round| {
            let (cluster, mut d) = dep.clone();
            if round % 2 == 0 {
                d.spec.destinations.push(identity_name(spec.identities - 1));
            }
            e.ingest(&cluster, &InputObject::Dependency(d));
        });

        // Plan every member whole against an observed state equal to the desired one: what a
        // replica that gains leadership does (gathering each member's objects included).
        let observed: Vec<BTreeMap<ObjectKey, ObservedObject>> = (0..spec.clusters)
            .map(|c| {
                let desired = engine.desired.cluster(&cluster_name(c));
                desired.iter().map(|o| (o.key.clone(), ObservedObject::new(&o.object()))).collect()
            })
            .collect();
        let t = Instant::now();
        let mut writes = 0;
        for (c, observed) in observed.iter().enumerate() {
            let plan = engine.plan_member(&cluster_name(c), ClusterHealth::Synced, &Scope::Whole, observed);
            writes += plan.apply.len() + plan.prune.len();
        }
        let plan = t.elapsed();
        drop(observed);
        let model_kib = rss_after.saturating_sub(rss_before);
        let desired_kib = rss_after.saturating_sub(rss_model);

        println!(
            "{size} | {objects} ({built}) | {load:.2?} | {ingest:.2?} | {cold:.2?} ({cold_cpu:.2?}) | {warm:.2?} ({warm_cpu:.2?}) | {gtp_time} ({gtp_touched} ids) / {scale_time} ({scale_touched} ids) / {dep_time} ({dep_touched} ids) | {plan:.2?}, {writes} writes | {} MiB, desired {} MiB (peak {} MiB) | {} | {:.0}%",
            model_kib / 1024,
            desired_kib / 1024,
            peak / 1024,
            model_kib * 1024 / objects.max(1) as u64,
            counters.steal_percent(),
        );
        drop(engine);
    }
}
