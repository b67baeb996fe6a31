//! The listener's forwarding and access log keys: defaults, parsing, and
//! bad values reported at their key and line.

use super::tests::BASE;
use super::*;

/// `BASE` with `extra` lines right after `listen` of the listener (line 4 on).
fn with(extra: &str) -> Result<Config, ConfigErrors> {
    Config::parse(&BASE.replace(
        "listen = \"127.0.0.1:8080\"\n",
        &format!("listen = \"127.0.0.1:8080\"\n{extra}"),
    ))
}

fn listener(extra: &str) -> (ListenerConfig, AccessLogPath) {
    match with(extra) {
        Ok(c) => (c.listeners[0].clone(), c.access_log_path),
        Err(e) => panic!("rejected: {e}"),
    }
}

fn error_of(extra: &str) -> String {
    match with(extra) {
        Ok(_) => panic!("accepted: {extra}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn by_default_nobody_is_trusted_and_nothing_is_logged() {
    let (l, path) = listener("");
    assert!(l.trusted_proxies.is_empty());
    assert!(!l.forwarded_header);
    assert!(!l.access_log);
    assert_eq!(path, AccessLogPath::Stdout);
}

#[test]
fn the_keys_are_parsed() {
    let (l, _) = listener(
        "trusted_proxies = [\"10.0.0.0/8\", \" ::1 \"]\nforwarded_header = true\naccess_log = true\n",
    );
    let got: Vec<String> = l.trusted_proxies.iter().map(Cidr::to_string).collect();
    assert_eq!(got, ["10.0.0.0/8", "::1/128"]);
    assert!(l.forwarded_header && l.access_log);
    let c = Config::parse(&format!("access_log_path = \"/var/log/lb.log\"\n{BASE}")).unwrap();
    assert_eq!(
        c.access_log_path,
        AccessLogPath::File("/var/log/lb.log".into())
    );
    let summary = Config::parse(&BASE.replace(
        "listen = \"127.0.0.1:8080\"\n",
        "listen = \"127.0.0.1:8080\"\ntrusted_proxies = [\"10.0.0.0/8\"]\naccess_log = true\n",
    ))
    .unwrap()
    .summary();
    assert!(
        summary.contains("trusted_proxies [10.0.0.0/8], forwarded_header false, access_log stdout"),
        "{summary}"
    );
}

#[test]
fn a_bad_cidr_is_reported_at_its_key_and_line() {
    let e = error_of("trusted_proxies = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/33\",\n]\n");
    assert!(
        e.contains("line 6: listener[0].trusted_proxies[1]: \"10.0.0.0/33\": prefix length"),
        "{e}"
    );
    let e = error_of("trusted_proxies = [\"10.1.0.0/8\"]\n");
    assert!(
        e.contains("line 4: listener[0].trusted_proxies[0]") && e.contains("10.0.0.0/8"),
        "{e}"
    );
    let e = error_of("trusted_proxies = [\"proxy.internal\"]\n");
    assert!(e.contains("is not an IP address"), "{e}");
}

#[test]
fn an_empty_access_log_path_is_refused() {
    let e = Config::parse(&format!("access_log_path = \"\"\n{BASE}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 1: access_log_path"), "{e}");
}

#[test]
fn a_tcp_listener_refuses_the_http_keys() {
    let src = "[[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:5433\"\nprotocol = \"tcp\"\nservice = \"api\"\naccess_log = true\ntrusted_proxies = [\"10.0.0.0/8\"]\n[service.api]\n";
    let e = Config::parse(src).unwrap_err().to_string();
    assert!(
        e.contains("line 6: listener[0].access_log: only an http listener"),
        "{e}"
    );
    assert!(
        e.contains("line 7: listener[0].trusted_proxies: only an http listener"),
        "{e}"
    );
}
