//! Config errors name the key and its line; `check` exits non-zero.

use std::process::Command;

use datapunk_lb::config::Config;

use crate::support::temp_path;

const GOOD: &str = r#"drain_timeout = "30s"
[[listener]]
name = "web"
listen = "127.0.0.1:8080"
[[listener.route]]
path_prefix = "/"
service = "api"
[service.api]
strategy = "p2c"
[[service.api.instance]]
id = "api-1"
address = "127.0.0.1"
port = 9001
"#;

fn errors(src: &str) -> String {
    Config::parse(src).unwrap_err().to_string()
}

#[test]
fn good_config_parses_with_defaults() {
    let c = Config::parse(GOOD).unwrap();
    let api = &c.services["api"];
    assert_eq!(api.retries, 2);
    assert_eq!(api.max_connections, 10_000);
    assert_eq!(api.request_timeout, std::time::Duration::from_secs(30));
    assert_eq!(api.balancing.strategy.as_str(), "p2c");
    assert_eq!(c.listeners[0].routes[0].service, "api");
}

#[test]
fn each_error_names_its_key_and_line() {
    let cases: &[(&str, &str, &str)] = &[
        // (replace, with, expected key + line)
        (
            "strategy = \"p2c\"",
            "strategy = \"p2c\"\ncolour = \"red\"",
            "line 10",
        ),
        ("port = 9001", "port = 0", "service.api.instance[0].port"),
        ("port = 9001", "port = 70000", "must be in 1..=65535"),
        (
            "drain_timeout = \"30s\"",
            "drain_timeout = \"30 parsecs\"",
            "line 1: drain_timeout",
        ),
        (
            "service = \"api\"",
            "service = \"nope\"",
            "line 7: listener[0].route[0].service",
        ),
        (
            "strategy = \"p2c\"",
            "strategy = \"fastest\"",
            "line 9: service.api.strategy",
        ),
        ("strategy = \"p2c\"", "strategy = 5", "line 9"),
        (
            "listen = \"127.0.0.1:8080\"",
            "listen = \"localhost\"",
            "line 4: listener[0].listen",
        ),
    ];
    for (from, to, want) in cases {
        let src = GOOD.replace(from, to);
        let e = errors(&src);
        assert!(e.contains(want), "{to:?}: error {e:?} lacks {want:?}");
    }
    // Unknown key: named, with its line.
    let e = errors(&GOOD.replace("strategy = \"p2c\"", "strategy = \"p2c\"\ncolour = \"red\""));
    assert!(e.contains("colour"), "{e}");
    // Duplicate instance id, on the second one's line.
    let dup = format!(
        "{GOOD}[[service.api.instance]]\nid = \"api-1\"\naddress = \"127.0.0.2\"\nport = 9002\n"
    );
    let e = errors(&dup);
    assert!(
        e.contains("line 15: service.api.instance[1].id: duplicate instance id"),
        "{e}"
    );
    // Several problems are all reported.
    let many = GOOD
        .replace("port = 9001", "port = 0")
        .replace("strategy = \"p2c\"", "strategy = \"x\"");
    assert_eq!(Config::parse(&many).unwrap_err().0.len(), 2);
}

#[test]
fn check_command_prints_the_plan_or_the_reasons() {
    let good = temp_path("good.toml");
    std::fs::write(&good, GOOD).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_datapunk-lb"))
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("listener web on 127.0.0.1:8080") && stdout.contains("instance api-1"),
        "{stdout}"
    );

    let bad = temp_path("bad.toml");
    std::fs::write(&bad, GOOD.replace("port = 9001", "port = 0")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_datapunk-lb"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 13: service.api.instance[0].port"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(good);
    let _ = std::fs::remove_file(bad);
}
