//! Golden tests: every directory under tests/fixtures/ is a whole fleet (`fleet/`), optional extra
//! flags (`args`), and what `flotilla render` must print for it: `expected.yaml` (stdout) and
//! `expected.stderr` (diagnostics). Each case's README.md says what it demonstrates.
//!
//! After a deliberate change of output, regenerate with `UPDATE_GOLDEN=1 cargo test --test golden`
//! and review the diff like code.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    cases.sort();
    assert!(!cases.is_empty(), "no fixtures under {}", root.display());
    cases
}

/// Runs `flotilla render fleet <args>` inside the case directory.
fn render(case: &Path, extra: &[&str]) -> (String, String, i32) {
    let args = std::fs::read_to_string(case.join("args")).unwrap_or_default();
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .current_dir(case)
        .arg("render")
        .arg("fleet")
        .args(args.split_whitespace())
        .args(extra)
        .output()
        .expect("running flotilla");
    (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap(), out.status.code().unwrap_or(-1))
}

fn check(case: &Path, file: &str, actual: &str, failures: &mut Vec<String>) {
    let path = case.join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} is missing; run with UPDATE_GOLDEN=1", path.display()));
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        failures.push(format!(
            "{}: differs from line {}:\n  expected: {:?}\n  actual:   {:?}",
            path.display(),
            line + 1,
            expected.lines().nth(line).unwrap_or("<end>"),
            actual.lines().nth(line).unwrap_or("<end>")
        ));
    }
}

#[test]
fn every_fixture_renders_as_expected() {
    let mut failures = Vec::new();
    for case in fixtures() {
        let (stdout, stderr, code) = render(&case, &[]);
        assert_eq!(code, 0, "{}: exit code {code}, stderr:\n{stderr}", case.display());
        check(&case, "expected.yaml", &stdout, &mut failures);
        check(&case, "expected.stderr", &stderr, &mut failures);
    }
    assert!(failures.is_empty(), "golden mismatches:\n{}", failures.join("\n"));
}

#[test]
fn rendering_twice_is_byte_identical_in_both_formats() {
    for case in fixtures() {
        for format in ["yaml", "json"] {
            let first = render(&case, &["--format", format]);
            let second = render(&case, &["--format", format]);
            assert_eq!(first, second, "{} --format {format}", case.display());
        }
    }
}

#[test]
fn json_holds_the_same_objects_as_yaml() {
    for case in fixtures() {
        let (yaml, _, _) = render(&case, &[]);
        let (json, _, _) = render(&case, &["--format", "json"]);
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        let clusters = json["clusters"].as_object().unwrap();
        // Line by line: `# cluster: <id>` starts a member, `---` starts a document.
        let mut from_yaml: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
        let (mut current, mut doc) = (String::new(), String::new());
        fn flush(into: &mut Vec<serde_json::Value>, doc: &mut String) {
            if !doc.trim().is_empty() {
                into.push(serde_saphyr::from_str(doc).unwrap());
            }
            doc.clear();
        }
        for line in yaml.lines() {
            if let Some(id) = line.strip_prefix("# cluster: ") {
                if !current.is_empty() {
                    flush(from_yaml.get_mut(&current).unwrap(), &mut doc);
                }
                current = id.to_string();
                from_yaml.entry(current.clone()).or_default();
            } else if line == "---" {
                flush(from_yaml.get_mut(&current).unwrap(), &mut doc);
            } else {
                doc.push_str(line);
                doc.push('\n');
            }
        }
        if !current.is_empty() {
            flush(from_yaml.get_mut(&current).unwrap(), &mut doc);
        }
        assert_eq!(clusters.len(), from_yaml.len(), "{}", case.display());
        for (id, objects) in clusters {
            assert_eq!(objects.as_array().unwrap(), &from_yaml[id], "{} cluster {id}", case.display());
        }
    }
}

#[test]
fn out_dir_writes_one_file_per_cluster() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dependency-scoping");
    let dir = std::env::temp_dir().join(format!("flotilla-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (stdout, _, code) = render(&case, &["--out-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(stdout.is_empty(), "with --out-dir nothing goes to stdout");
    let mut files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["a.yaml", "b.yaml", "c.yaml"]);
    let (all, _, _) = render(&case, &[]);
    let joined: String = files.iter().map(|f| std::fs::read_to_string(dir.join(f)).unwrap()).collect();
    assert_eq!(joined, all, "the per-cluster files concatenate to the stdout output");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn strict_mode_fails_on_errors_and_a_missing_fleet_is_exit_1() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/broken-input");
    let (_, stderr, code) = render(&case, &["--strict"]);
    assert_eq!(code, 2, "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla")).args(["render", "/nonexistent/fleet"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(stderr.contains("/nonexistent/fleet"), "{stderr}");
}

/// Undrained, the drain case renders exactly what its fleet renders without a drain: a drain
/// changes only what it must, and undraining restores the very same objects.
#[test]
fn undraining_restores_exactly_the_previous_objects() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let scratch = std::env::temp_dir().join(format!("flotilla-undrain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let copy = |from: &Path, to: &Path| {
        let status = Command::new("cp").arg("-r").arg(from).arg(to).status().expect("cp");
        assert!(status.success());
    };
    std::fs::create_dir_all(&scratch).unwrap();
    copy(&root.join("drain/fleet"), &scratch.join("fleet"));
    std::fs::write(scratch.join("fleet/fleet.yaml"), "clusters:\n  b: {drain: false}\n").unwrap();
    let (undrained, stderr, code) = render(&scratch, &[]);
    assert_eq!(code, 0, "{stderr}");
    let before = std::fs::read_to_string(root.join("failover-prefixes/expected.yaml")).unwrap();
    assert!(undrained == before, "undrained output differs from failover-prefixes/expected.yaml");
    let drained = std::fs::read_to_string(root.join("drain/expected.yaml")).unwrap();
    assert_ne!(drained, before, "the drain changes something");
    std::fs::remove_dir_all(&scratch).unwrap();
}
