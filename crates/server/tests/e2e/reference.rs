//! `docs/configuration.md` and `examples/*.toml` against the code: every
//! key the config structs accept is documented (and nothing documented is
//! gone), and every example passes the real binary's `check`.
//!
//! The key set comes from `datapunk_lb::config::keys::all()`, which walks
//! the serde structs of `config/file.rs`, so a field added there without a
//! row in the reference fails `every_config_key_is_in_the_reference`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::temp_path;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn reference() -> String {
    let path = repo().join("docs/configuration.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The first cell of every table row in the `## Keys` section.
fn documented_keys(doc: &str) -> BTreeSet<String> {
    let start = doc.find("\n## Keys").expect("a ## Keys section");
    let section = &doc[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |i| i + 1)];
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(k, _)| k.to_owned()))
        .collect()
}

/// `check --config path`: exit status and stdout + stderr.
fn check(path: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_datapunk-lb"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_config_key_is_in_the_reference() {
    let code: BTreeSet<String> = datapunk_lb::config::keys::all().into_iter().collect();
    assert!(code.len() > 40, "the walker found only {code:?}");
    let documented = documented_keys(&reference());
    let missing: Vec<_> = code.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "keys in config/file.rs without a row under `## Keys` in docs/configuration.md: {missing:#?}"
    );
    let stale: Vec<_> = documented.difference(&code).collect();
    assert!(
        stale.is_empty(),
        "rows in docs/configuration.md for keys the code no longer has: {stale:#?}"
    );
}

#[test]
fn every_example_passes_check() {
    let (mut checked, mut skipped) = (0, 0);
    let dir = repo().join("examples");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    for path in &paths {
        let text = std::fs::read_to_string(path).unwrap();
        if text.contains("kind = \"etcd\"") && !cfg!(feature = "etcd") {
            eprintln!(
                "skipping {}: built without the etcd feature",
                path.display()
            );
            skipped += 1;
            continue;
        }
        let (ok, out) = check(path);
        assert!(ok, "{}: check failed:\n{out}", path.display());
        assert!(out.contains("breaker: error_threshold"), "{out}");
        checked += 1;
    }
    assert!(
        checked + skipped >= 3,
        "expected the http, tcp and etcd examples: {paths:?}"
    );

    // The annotated example in the reference itself.
    let doc = reference();
    let start = doc.find("```toml\n").expect("a ```toml example") + "```toml\n".len();
    let end = start + doc[start..].find("```").expect("the example ends");
    let file = temp_path("reference-example.toml");
    std::fs::write(&file, &doc[start..end]).unwrap();
    let (ok, out) = check(&file);
    let _ = std::fs::remove_file(&file);
    assert!(ok, "the reference's example fails check:\n{out}");
}

/// `check` prints every service's knobs, defaults included.
#[test]
fn check_prints_the_effective_knobs() {
    let src = r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
[[listener.route]]
service = "api"
[service.api]
retry_budget_percent = 5
[service.api.breaker]
open_base = "3s"
[service.api.health_check]
interval = "2s"
expected_statuses = ["200", "204"]
"#;
    let file = temp_path("knobs.toml");
    std::fs::write(&file, src).unwrap();
    let (ok, out) = check(&file);
    let _ = std::fs::remove_file(&file);
    assert!(ok, "{out}");
    for want in [
        "retry_budget_percent 5, retry_budget_min_per_second 10",
        "breaker: error_threshold 3, recovery_threshold 2, open_base 3s, open_max 2m, open_jitter 0.2, failure_rate 0.5, failure_rate_window 10s, min_requests 20, half_open_probes 1",
        "health_check: kind http, path /health, host (instance address:port), expected_statuses 200,204, interval 2s, timeout 1s, backoff_max 16s",
        "min_healthy_percent 50, slow_start 10s, max_connections 10000, metrics_enabled true",
        "upgrade_idle_timeout 1h",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}
