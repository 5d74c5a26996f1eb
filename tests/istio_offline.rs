//! Istio's own code judges what `render` writes, offline: `istioctl validate` on every object and
//! every Istio analyzer over each member's whole output together with the member's inputs
//! (Deployments with their Pods, Services, Namespaces, Nodes), for the example fleet, every golden
//! fixture and a synthetic fleet. And the analyzers this relies on are shown to fire on broken
//! objects, so the check can fail.

mod testenv;

use std::path::{Path, PathBuf};

use flotilla::fleet_dir::LoadedFleet;
use flotilla::ingest::InputObject;
use testenv::istio::{Finding, analyze, member_inputs, validate};

/// Findings that are about the test's own inputs and only informational (a user's Service port
/// named outside Istio's convention), not about anything flotilla writes.
fn about_flotilla(f: &Finding) -> bool {
    ["ServiceEntry ", "DestinationRule ", "Sidecar "].iter().any(|k| f.resource.starts_with(k)) || f.level != "Info"
}

/// Renders `fleet` and judges every member: the findings that count, as lines.
fn judge(name: &str, fleet: &Path, args: &[&str], scratch: &Path) -> (usize, Vec<String>) {
    let mut argv = vec!["flotilla", "render", "fleet"];
    argv.extend(args);
    let cli = <flotilla::cli::Cli as clap::Parser>::parse_from(argv);
    let flotilla::cli::Command::Render(render_args) = cli.command else { unreachable!() };
    let settings = render_args.engine.settings().unwrap();
    let loaded: LoadedFleet = flotilla::fleet_dir::load(fleet).unwrap();
    let inputs: Vec<(String, InputObject)> = loaded.objects.clone();
    let rendered = flotilla::render::render(loaded, &settings, "flotilla-vips");
    let mut objects = 0;
    let mut problems = Vec::new();
    for (cluster, written) in &rendered.clusters {
        let out = scratch.join(format!("{name}-{cluster}.yaml"));
        let text: String = written.iter().map(|o| format!("---\n{}", flotilla::yaml::to_yaml(&o.object()))).collect();
        std::fs::write(&out, text).unwrap();
        objects += written.len();
        if !written.is_empty()
            && let Err(e) = validate(&out)
        {
            problems.push(format!("{name} member {cluster}: istioctl validate: {e}"));
        }
        let mine: Vec<&InputObject> = inputs.iter().filter(|(c, _)| c == cluster).map(|(_, o)| o).collect();
        let input = scratch.join(format!("{name}-{cluster}-inputs.yaml"));
        std::fs::write(&input, member_inputs(&mine, &[&settings.sync_namespace])).unwrap();
        for f in analyze(&[&out, &input]).into_iter().filter(about_flotilla) {
            problems.push(format!("{name} member {cluster}: {f}"));
        }
    }
    (objects, problems)
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-istio-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn istio_finds_nothing_wrong_with_rendered_fleets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = scratch("fleets");
    let mut cases: Vec<(String, PathBuf, String)> =
        vec![("example".into(), root.join("examples/fleet"), String::new())];
    let mut fixtures: Vec<PathBuf> =
        std::fs::read_dir(root.join("tests/fixtures")).unwrap().map(|e| e.unwrap().path()).collect();
    fixtures.sort();
    for f in fixtures {
        let args = std::fs::read_to_string(f.join("args")).unwrap_or_default();
        cases.push((f.file_name().unwrap().to_string_lossy().to_string(), f.join("fleet"), args));
    }
    let synth = scratch.join("synth");
    let spec = flotilla::synth::SynthSpec { clusters: 5, identities: 200, ..Default::default() };
    flotilla::synth::write_fleet_dir(&spec, &synth).unwrap();
    cases.push(("synth-5x200".into(), synth, String::new()));

    let mut total = 0;
    let mut problems = Vec::new();
    for (name, fleet, args) in &cases {
        let args: Vec<&str> = args.split_whitespace().collect();
        let (objects, found) = judge(name, fleet, &args, &scratch);
        total += objects;
        problems.extend(found);
    }
    println!("{total} objects of {} fleets validated and analysed", cases.len());
    assert!(total > 1000, "a meaningful number of objects ({total})");
    assert!(problems.is_empty(), "Istio finds fault with what flotilla writes:\n{}", problems.join("\n"));
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// The analyzers the test above relies on do fire: a DestinationRule for a host nothing declares,
/// a Sidecar selecting no workload, a Sidecar egress host without its namespace.
#[test]
fn the_analyzers_relied_on_catch_broken_objects() {
    let scratch = scratch("broken");
    let broken = scratch.join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: nowhere-dr, namespace: admiral-sync}\nspec:\n  host: stage.nowhere.global\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: nobody-egress, namespace: sample}\nspec:\n  workloadSelector: {labels: {identity: nobody}}\n  egress: [{hosts: [\"./*\"]}]\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: sloppy, namespace: other}\nspec:\n  egress: [{hosts: [\"stage.greeting.global\"]}]\n",
    )
    .unwrap();
    let inputs = scratch.join("inputs.yaml");
    std::fs::write(&inputs, member_inputs(&[], &["sample", "other", "admiral-sync"])).unwrap();
    let codes: Vec<String> =
        analyze(&[&broken, &inputs]).iter().map(|f| format!("{} {}", f.code, f.resource)).collect();
    for expected in [
        "IST0174 DestinationRule admiral-sync/nowhere-dr",
        "IST0101 Sidecar sample/nobody-egress",
        "IST0106 Sidecar other/sloppy",
    ] {
        assert!(codes.iter().any(|c| c == expected), "{expected} not reported: {codes:?}");
    }
    assert!(validate(&broken).is_err(), "istioctl validate accepts an egress host without a namespace");
    std::fs::remove_dir_all(&scratch).unwrap();
}
