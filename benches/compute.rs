//! Scale figures for the pure engine, printed (never asserted): load, full compute, incremental
//! recompute after one change, and plan with nothing to do. Run: `cargo bench --bench compute`
//! (FLOTILLA_BENCH_SIZES=10x500,100x5000 to choose sizes).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla::compute::plan::{ObservedObject, plan_cluster};
use flotilla::compute::vip::VipTable;
use flotilla::compute::{Engine, ObjectKey};
use flotilla::settings::Settings;
use flotilla::synth::{SynthSpec, cluster_name, write_fleet_dir};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let sizes = std::env::var("FLOTILLA_BENCH_SIZES").unwrap_or_else(|_| "10x500,100x5000".into());
    for size in sizes.split(',') {
        let (c, i) = size.split_once('x').expect("sizes look like 100x5000");
        let spec = SynthSpec { clusters: c.parse().unwrap(), identities: i.parse().unwrap(), ..SynthSpec::default() };
        let dir = std::env::temp_dir().join(format!("flotilla-bench-{size}"));
        let _ = std::fs::remove_dir_all(&dir);
        write_fleet_dir(&spec, &dir).unwrap();

        let t = Instant::now();
        let loaded = flotilla::fleet_dir::load(&dir).unwrap();
        let load = t.elapsed();
        let mut engine = Engine::new(Settings::default(), VipTable::default());
        for (id, o) in &loaded.clusters {
            engine.fleet.upsert_cluster(id, o.clone());
        }
        let t = Instant::now();
        for (cluster, obj) in loaded.objects.iter().cloned() {
            engine.fleet.upsert(&cluster, obj);
        }
        let ingest = t.elapsed();
        let t = Instant::now();
        engine.recompute();
        let full = t.elapsed();
        let objects = engine.desired.object_count();

        // Incremental: the same GTP-bearing identity changes its Dependency back and forth.
        let mut incremental = Vec::new();
        let mut touched = 0;
        for round in 0..20 {
            let first = flotilla::synth::identity_name(0);
            let dep = loaded
                .objects
                .iter()
                .find(|(_, o)| matches!(o, flotilla::model::InputObject::Dependency(d) if d.spec.source == first))
                .cloned()
                .unwrap();
            let (cluster, flotilla::model::InputObject::Dependency(mut d)) = dep else { unreachable!() };
            if round % 2 == 0 {
                d.spec.destinations.push(flotilla::synth::identity_name(spec.identities - 1));
            }
            engine.fleet.upsert(&cluster, flotilla::model::InputObject::Dependency(d));
            let t = Instant::now();
            let r = engine.recompute();
            incremental.push(t.elapsed());
            touched = touched.max(r.identities);
        }

        // Plan against an observed state equal to the desired one.
        let observed: Vec<BTreeMap<ObjectKey, ObservedObject>> = (0..spec.clusters)
            .map(|c| {
                engine
                    .desired
                    .cluster_map(&cluster_name(c))
                    .into_iter()
                    .flatten()
                    .map(|(k, o)| (k.clone(), ObservedObject::new(o.as_ref().clone())))
                    .collect()
            })
            .collect();
        let t = Instant::now();
        let mut writes = 0;
        for (c, observed) in observed.iter().enumerate() {
            let desired = engine.desired.cluster_map(&cluster_name(c)).cloned().unwrap_or_default();
            let plan = plan_cluster(&desired, observed);
            writes += plan.apply.len() + plan.prune.len();
        }
        let plan = t.elapsed();

        println!(
            "{size}: {objects} desired objects | load {load:.2?} | ingest {ingest:.2?} | full compute {full:.2?} | incremental (dependency change, {touched} identities) median {:.2?} | plan, nothing changed {plan:.2?}, {writes} writes",
            median(incremental)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
