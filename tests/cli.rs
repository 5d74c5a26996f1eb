//! The command line itself: `crds` matches the checked-in YAML, `version` and `run` say what
//! they should, bad flags name themselves.

use std::process::Command;

fn flotilla(args: &[&str]) -> (String, String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla")).args(args).output().expect("running flotilla");
    (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap(), out.status.code().unwrap_or(-1))
}

#[test]
fn crds_output_matches_the_checked_in_yaml() {
    let (stdout, _, code) = flotilla(&["crds"]);
    assert_eq!(code, 0);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/admiral.io.yaml");
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert!(
        stdout == checked_in,
        "crds/admiral.io.yaml is out of date: regenerate with `cargo run -- crds > crds/admiral.io.yaml`"
    );
    for kind in ["GlobalTrafficPolicy", "Dependency", "OutlierDetection", "ClientConnectionConfig"] {
        assert!(stdout.contains(&format!("kind: {kind}\n")), "{kind} missing");
    }
    assert_eq!(stdout.matches("subresources:\n").count(), 4, "every kind has a status subresource");
}

#[test]
fn version_and_run_refusing_bad_input() {
    let (stdout, _, code) = flotilla(&["version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with(&format!("flotilla {}\n", env!("CARGO_PKG_VERSION"))), "{stdout}");
    // A hub kubeconfig that does not parse: one line naming the file, exit 1, nothing served.
    let dir = std::env::temp_dir().join(format!("flotilla-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.kubeconfig");
    std::fs::write(&broken, "clusters: [: nope").unwrap();
    let (_, stderr, code) = flotilla(&["run", "--kubeconfig", broken.to_str().unwrap(), "--http-addr", "127.0.0.1:0"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--kubeconfig") && stderr.contains("broken.kubeconfig"), "{stderr}");
    let (_, stderr, code) = flotilla(&["run", "--lease-duration", "5s", "--lease-grace", "10s"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--lease-grace"), "{stderr}");
    let (_, stderr, code) = flotilla(&["run", "--stale-after", "5 fortnights"]);
    assert_eq!(code, 2, "clap's usage error");
    assert!(stderr.contains("--stale-after") && stderr.contains("unknown unit"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_flags_are_named() {
    let (_, stderr, code) = flotilla(&["render", "examples/fleet", "--vip-cidr", "240.0.0.1/16"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--vip-cidr") && stderr.contains("host bits"), "{stderr}");
    let (_, stderr, code) = flotilla(&["render", "examples/fleet", "--sync-namespace", "Not_A_Namespace"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--sync-namespace"), "{stderr}");
}

#[test]
fn the_example_fleet_renders_cleanly_and_flags_come_from_the_environment() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .current_dir(dir)
        .args(["render", "examples/fleet"])
        .env("FLOTILLA_SYNC_NAMESPACE", "from-env")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stderr.is_empty(), "the example has nothing to warn about: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("namespace: from-env"));
    for id in ["east-1", "west-1", "west-2"] {
        assert!(stdout.contains(&format!("# cluster: {id}\n")), "{id}");
    }
}

#[test]
fn synth_is_deterministic_and_renders_without_errors() {
    let base = std::env::temp_dir().join(format!("flotilla-synth-{}", std::process::id()));
    let write = |name: &str, seed: &str| {
        let dir = base.join(name);
        let (_, stderr, code) =
            flotilla(&["synth", dir.to_str().unwrap(), "--clusters", "4", "--identities", "60", "--seed", seed]);
        assert_eq!(code, 0, "{stderr}");
        dir
    };
    let read = |dir: &std::path::Path| -> Vec<(String, String)> {
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
            .iter()
            .map(|d| (d.display().to_string(), std::fs::read_to_string(d.join("objects.yaml")).unwrap()))
            .collect()
    };
    let (a, b, c) = (write("a", "7"), write("b", "7"), write("c", "8"));
    let strip = |v: Vec<(String, String)>| v.into_iter().map(|(_, t)| t).collect::<Vec<_>>();
    assert_eq!(strip(read(&a)), strip(read(&b)), "same seed, same fleet");
    assert_ne!(strip(read(&a)), strip(read(&c)), "another seed, another fleet");
    assert_eq!(read(&a).len(), 4);

    let (stdout, stderr, code) = flotilla(&["render", a.to_str().unwrap(), "--strict"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("error:"), "{stderr}");
    assert!(stdout.matches("kind: ServiceEntry").count() >= 60, "every identity is written somewhere");
    std::fs::remove_dir_all(&base).unwrap();
}

/// Values that used to overflow (a panic in `Duration`, hours wrapping) or wrap (a negative port
/// read as a huge one) are refused with a message naming the flag or the object.
#[test]
fn huge_durations_and_impossible_ports_are_errors_not_panics() {
    for (args, flag) in [
        (vec!["run", "--debounce", "1e300"], "--debounce"),
        (vec!["run", "--stale-after", "99999999999999999999999s"], "--stale-after"),
        (vec!["register-cluster", "--token-duration", "18446744073709551615h"], "--token-duration"),
    ] {
        let (_, stderr, code) = flotilla(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(flag) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let (_, stderr, code) = flotilla(&["run", "--debounce", "2s", "--debounce-max", "1s"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--debounce-max"), "{stderr}");

    let dir = std::env::temp_dir().join(format!("flotilla-ports-{}", std::process::id()));
    let member = dir.join("a");
    std::fs::create_dir_all(&member).unwrap();
    std::fs::write(
        member.join("all.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: greeting, namespace: sample}\nspec:\n  selector: {matchLabels: {app: greeting}}\n  template:\n    metadata: {labels: {app: greeting, identity: greeting}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: greeting, namespace: sample}\nspec:\n  selector: {app: greeting}\n  ports: [{name: http, port: -80}, {name: grpc, port: 9090}]\n",
    )
    .unwrap();
    let (stdout, stderr, code) = flotilla(&["render", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("Service sample/greeting: port -80 is not a port number"), "{stderr}");
    assert!(
        stdout.contains("greeting.sample.svc.cluster.local") && stdout.contains("grpc: 9090"),
        "the valid port is used:\n{stdout}"
    );
}

/// Progress goes to a terminal only: on one (a pseudo-terminal made by util-linux's `script`)
/// `render` says what it does and clears the line; through a pipe its stderr has none of it.
#[test]
fn render_shows_progress_on_a_terminal_only() {
    let fleet = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fleet");
    let (_, piped, code) = flotilla(&["render", fleet]);
    assert_eq!(code, 0, "{piped}");
    assert!(!piped.contains("render: ") && !piped.contains('\r'), "{piped:?}");

    let command = format!("{} render {fleet} >/dev/null", env!("CARGO_BIN_EXE_flotilla"));
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("`script` (util-linux, Debian's bsdutils) runs a command on a pseudo-terminal");
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{terminal}");
    assert!(terminal.contains("render: computing 3 members"), "{terminal:?}");
    assert!(terminal.contains("\r\x1b[K"), "the line is rewritten and cleared: {terminal:?}");
}
