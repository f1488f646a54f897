//! `keygate test`: one request decided offline, for every decision class, with the rule that
//! decided it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Output, Stdio};

mod common;

use common::{sha, Dir, BIN};
/// 2027-01-16T00:00:10Z: ten seconds into every aligned window.
const AT: &str = "1800057610";
const KEY: &str = "ak_live_0001";
const OTHER_OWNER_KEY: &str = "ak_live_0002";
const REVOKED_KEY: &str = "ak_live_0003";
const EXPIRING_KEY: &str = "ak_live_0004";
const PINNED_KEY: &str = "ak_live_0005";

fn config() -> Value {
    json!({
        "key_list": {"cluster": "ks", "path": "/v1/keys", "max_stale_s": 120},
        "credentials": [{"header": "x-api-key"}, {"query": "api_key"}],
        "key_prefixes": ["ak_"],
        "exempt": [{"preflight": true}, {"path_prefix": "/swagger"}],
        "ip_deny": ["10.6.6.0/24"],
        "site": {"path_segment": 2},
        "routes": [
            {"path_prefix": "/public/v1/contacts", "methods": ["POST"], "scope": "contacts:write"},
            {"path_prefix": "/public/v1/contacts", "scope": "contacts:read"}
        ],
        "rate_limit": {"default": [{"limit": 60, "window_s": 60}]},
        "invalid_key_limit": {"limit": 3, "window_s": 60},
        "whoami": {"path": "/me"}
    })
}

fn keys() -> Value {
    json!({
        "version": "t#1",
        "owners": {"org-1": {}, "org-2": {"status": "disabled"}},
        "plans": {"small": {"rate_limits": [{"limit": 2, "window_s": 60}, {"limit": 100, "window_s": 3600}]}},
        "keys": [
            {"id": "key_1", "hash": sha(KEY), "owner": "org-1", "scopes": ["contacts:read"], "plan": "small"},
            {"id": "key_2", "hash": sha(OTHER_OWNER_KEY), "owner": "org-2"},
            {"id": "key_3", "hash": sha(REVOKED_KEY), "owner": "org-1", "status": "revoked"},
            {"id": "key_4", "hash": sha(EXPIRING_KEY), "owner": "org-1", "expires_at": "2027-01-16T00:00:00Z"},
            {"id": "key_5", "hash": sha(PINNED_KEY), "owner": "org-1", "allowed_ips": ["203.0.113.0/24"], "sites": ["v1"]}
        ]
    })
}

struct Case {
    dir: Dir,
    config: String,
    keys: String,
}

impl Case {
    fn new(cfg: Value, list: Value) -> Case {
        let dir = Dir::new();
        let config = dir.write("keygate.json", &cfg.to_string());
        let keys = dir.write("keys.json", &list.to_string());
        Case { dir, config, keys }
    }

    fn standard() -> Case {
        Case::new(config(), keys())
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all = vec![
            "test",
            "--config",
            &self.config,
            "--keys",
            &self.keys,
            "--at",
            AT,
        ];
        all.extend_from_slice(args);
        Command::new(BIN).args(&all).output().unwrap()
    }

    /// Runs with --json and returns the decision.
    fn decide(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn header<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p[0] == name)
        .and_then(|p| p[1].as_str())
}

#[test]
fn allowed_says_route_scope_and_limits_and_lists_the_upstream_edits() {
    let c = Case::standard();
    let d = c.decide(&[
        "--path",
        "/public/v1/contacts",
        "-H",
        &format!("x-api-key: {KEY}"),
    ]);
    assert_eq!(d["class"], "allowed");
    assert_eq!(d["status"], Value::Null);
    assert_eq!(d["key_id"], "key_1");
    assert_eq!(header(&d, "x-api-key-id"), Some("key_1"));
    assert_eq!(header(&d, "x-api-key-owner"), Some("org-1"));
    assert_eq!(d["removed_headers"], json!(["x-api-key"]));
    assert_eq!(d["rule"]["check"], "allowed");
    assert_eq!(d["rule"]["route"]["index"], 1);
    assert_eq!(d["rule"]["route"]["scope"], "contacts:read");
    assert_eq!(d["rule"]["limits_from"], "plan \"small\"");
    assert_eq!(d["rule"]["limits"][0]["count"], 1);
    assert_eq!(d["rule"]["limits"][0]["limit"], 2);
    let rh = d["response_headers"].as_array().unwrap();
    assert!(
        rh.contains(&json!(["x-ratelimit-remaining", "1"])),
        "{rh:?}"
    );

    // A key in the query is taken out of the path sent upstream.
    let d = c.decide(&["--path", &format!("/public/v1/contacts?a=1&api_key={KEY}")]);
    assert_eq!(d["class"], "allowed");
    assert_eq!(header(&d, ":path"), Some("/public/v1/contacts?a=1"));
}

#[test]
fn the_key_comes_from_a_file_or_stdin_into_the_first_credential_source() {
    let c = Case::standard();
    let key_file = c.dir.write("key.txt", &format!("{KEY}\n"));
    let d = c.decide(&["--path", "/x", "--key-file", &key_file]);
    assert_eq!(d["class"], "allowed");
    assert_eq!(d["removed_headers"], json!(["x-api-key"]));

    let mut child = Command::new(BIN)
        .args(["test", "--config", &c.config, "--keys", &c.keys, "--at", AT])
        .args(["--path", "/x", "--key-file", "-", "--expect", "allowed"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{KEY}\r\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("decision: allowed"), "{text}");
    assert!(!text.contains(KEY), "the key is never printed");
}

#[test]
fn exempt_names_the_rule() {
    let c = Case::standard();
    let d = c.decide(&["--path", "/swagger/ui"]);
    assert_eq!(d["class"], "exempt");
    assert_eq!(d["rule"]["index"], 1);
    assert_eq!(d["rule"]["exempt"], json!({"path_prefix": "/swagger"}));
    let d = c.decide(&[
        "--method",
        "OPTIONS",
        "--path",
        "/public/v1/contacts",
        "-H",
        "origin: https://x",
        "-H",
        "access-control-request-method: POST",
    ]);
    assert_eq!(d["class"], "exempt");
    assert_eq!(d["rule"]["index"], 0);
}

#[test]
fn whoami_is_answered_by_keygate() {
    let c = Case::standard();
    let d = c.decide(&["--path", "/me", "-H", &format!("x-api-key: {KEY}")]);
    assert_eq!(d["class"], "whoami");
    assert_eq!(d["status"], 200);
    let body: Value = serde_json::from_str(d["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"id": "org-1", "key_id": "key_1"}));
}

#[test]
fn missing_key_lists_the_sources() {
    let c = Case::standard();
    let d = c.decide(&["--path", "/x"]);
    assert_eq!(d["class"], "missing_key");
    assert_eq!(d["status"], 401);
    assert_eq!(
        d["rule"]["sources"],
        json!(["header x-api-key", "query parameter api_key"])
    );
    assert_eq!(header(&d, "content-type"), Some("application/json"));
    let body: Value = serde_json::from_str(d["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "missing_key");
}

#[test]
fn invalid_key_says_why() {
    let c = Case::standard();
    let d = c.decide(&["--path", "/x", "-H", "x-api-key: ak_unknown"]);
    assert_eq!(d["class"], "invalid_key");
    assert_eq!(d["rule"]["reason"], "not_in_list");
    let d = c.decide(&["--path", "/x", "-H", "x-api-key: zz_unknown"]);
    assert_eq!(d["rule"]["reason"], "prefix");
    let d = c.decide(&[
        "--path",
        "/x",
        "-H",
        &format!("x-api-key: {OTHER_OWNER_KEY}"),
    ]);
    assert_eq!(d["class"], "invalid_key");
    assert_eq!(d["rule"]["check"], "owner");
    assert_eq!(d["rule"]["owner"], "org-2");
}

#[test]
fn expired_key_names_status_or_expiry() {
    let c = Case::standard();
    let d = c.decide(&["--path", "/x", "-H", &format!("x-api-key: {REVOKED_KEY}")]);
    assert_eq!(d["class"], "expired_key");
    assert_eq!(d["rule"]["check"], "status");
    assert_eq!(d["rule"]["status"], "revoked");
    let d = c.decide(&["--path", "/x", "-H", &format!("x-api-key: {EXPIRING_KEY}")]);
    assert_eq!(d["class"], "expired_key");
    assert_eq!(d["rule"]["check"], "expires_at");
    assert_eq!(d["rule"]["expires_at"], "2027-01-16T00:00:00Z");
    // The same key a second before its expiry.
    let d = c.decide(&[
        "--path",
        "/x",
        "-H",
        &format!("x-api-key: {EXPIRING_KEY}"),
        "--at",
        "2027-01-15T23:59:59Z",
    ]);
    assert_eq!(d["class"], "allowed");
}

#[test]
fn forbidden_names_the_route_and_scope_or_the_site() {
    let c = Case::standard();
    let d = c.decide(&[
        "--method",
        "POST",
        "--path",
        "/public/v1/contacts",
        "-H",
        &format!("x-api-key: {KEY}"),
    ]);
    assert_eq!(d["class"], "forbidden");
    assert_eq!(d["status"], 403);
    assert_eq!(d["rule"]["check"], "scope");
    assert_eq!(d["rule"]["route"]["index"], 0);
    assert_eq!(d["rule"]["scope"], "contacts:write");
    assert_eq!(d["rule"]["key_scopes"], json!(["contacts:read"]));

    let d = c.decide(&[
        "--path",
        "/public/v2/x",
        "--ip",
        "203.0.113.9",
        "-H",
        &format!("x-api-key: {PINNED_KEY}"),
    ]);
    assert_eq!(d["class"], "forbidden");
    assert_eq!(d["rule"]["check"], "sites");
    assert_eq!(d["rule"]["site"], "v2");
}

#[test]
fn ip_denied_names_the_list_entry_or_its_absence() {
    let c = Case::standard();
    let d = c.decide(&[
        "--path",
        "/x",
        "--ip",
        "10.6.6.7",
        "-H",
        &format!("x-api-key: {KEY}"),
    ]);
    assert_eq!(d["class"], "ip_denied");
    assert_eq!(d["rule"]["check"], "ip_deny");
    assert_eq!(d["rule"]["entry"], "10.6.6.0/24");
    // Exempt requests too.
    assert_eq!(
        c.decide(&["--path", "/swagger", "--ip", "10.6.6.7"])["class"],
        "ip_denied"
    );

    let d = c.decide(&[
        "--path",
        "/public/v1/x",
        "--ip",
        "198.51.100.1",
        "-H",
        &format!("x-api-key: {PINNED_KEY}"),
    ]);
    assert_eq!(d["class"], "ip_denied");
    assert_eq!(d["rule"]["check"], "allowed_ips");
    assert_eq!(d["rule"]["entries"], json!(["203.0.113.0/24"]));

    let mut cfg = config();
    cfg["ip_allow"] = json!(["192.0.2.0/24"]);
    let c = Case::new(cfg, keys());
    let d = c.decide(&["--path", "/x", "--ip", "198.51.100.1"]);
    assert_eq!(d["class"], "ip_denied");
    assert_eq!(d["rule"]["check"], "ip_allow");
    assert_eq!(d["rule"]["entry"], Value::Null);
}

#[test]
fn rate_limited_names_the_limit_and_its_count() {
    let c = Case::standard();
    let k = format!("x-api-key: {KEY}");
    // The plan allows 2 a minute: with 1 counted the request is the 2nd, allowed.
    let d = c.decide(&["--path", "/x", "-H", &k, "--count", "1m=1"]);
    assert_eq!(d["class"], "allowed");
    assert_eq!(d["rule"]["limits"][0]["count"], 2);
    let d = c.decide(&["--path", "/x", "-H", &k, "--count", "1m=2"]);
    assert_eq!(d["class"], "rate_limited");
    assert_eq!(d["status"], 429);
    assert_eq!(d["rule"]["check"], "rate_limits");
    assert_eq!(
        d["rule"]["limits"][0],
        json!({"of": "key", "limit": 2, "window_s": 60, "count": 3,
        "remaining": 0, "reset": 1_800_057_660u64, "exceeded": true})
    );
    assert_eq!(d["rule"]["limits"][1]["count"], 1);
    assert_eq!(header(&d, "retry-after"), Some("50"));
    // N alone presets every window of the key.
    let d = c.decide(&["--path", "/x", "-H", &k, "--count", "100"]);
    assert_eq!(d["rule"]["limits"][1]["count"], 101);

    // Failed attempts from the client.
    let d = c.decide(&[
        "--path",
        "/x",
        "--ip",
        "192.0.2.1",
        "-H",
        "x-api-key: ak_x",
        "--count",
        "failures=3",
    ]);
    assert_eq!(d["class"], "rate_limited");
    assert_eq!(d["rule"]["check"], "invalid_key_limit");
    assert_eq!(d["rule"]["failures"], 3);
    let d = c.decide(&[
        "--path",
        "/x",
        "--ip",
        "192.0.2.1",
        "-H",
        "x-api-key: ak_x",
        "--count",
        "failures=2",
    ]);
    assert_eq!(d["class"], "invalid_key");
}

#[test]
fn owner_limits_are_counted_preset_and_named() {
    let mut list = keys();
    list["owners"]["org-1"] = json!({"rate_limits": [{"limit": 3, "window_s": 60}]});
    let key = "ak_live_0006";
    list["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "key_6", "hash": sha(key), "owner": "org-1"}));
    let c = Case::new(config(), list);
    // key_6 has no limits of its own (nor a default): only its owner's hold it.
    let k = format!("x-api-key: {key}");
    let d = c.decide(&["--path", "/x", "-H", &k, "--count", "owner:1m=2"]);
    assert_eq!(d["class"], "allowed", "{d}");
    let owner = d["rule"]["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["of"] == "owner")
        .cloned()
        .unwrap();
    assert_eq!(
        (owner["limit"].as_u64(), owner["count"].as_u64()),
        (Some(3), Some(3))
    );
    let remaining = d["response_headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0].as_str().unwrap().ends_with("remaining"))
        .map(|h| h[1].clone());
    assert_eq!(remaining, Some(json!("0")), "{d}");
    // One more counted against the owner (by any of its keys): refused, and the rule says whose.
    let d = c.decide(&["--path", "/x", "-H", &k, "--count", "owner:3"]);
    assert_eq!(d["class"], "rate_limited", "{d}");
    assert_eq!(d["rule"]["owner"], "org-1");
    let text = d["rule"]["text"].as_str().unwrap();
    assert!(
        text.contains("its owner \"org-1\" is over a limit"),
        "{text}"
    );
    assert!(text.contains("owner 3/60s counted 4 (exceeded)"), "{text}");
    // The key's own presets leave the owner's counter alone.
    let d = c.decide(&["--path", "/x", "-H", &k, "--count", "1m=2"]);
    assert_eq!(d["class"], "allowed", "{d}");
}

#[test]
fn shadowed_refusals_are_named_shadow_class() {
    let mut cfg = config();
    cfg["shadow"] = json!({"rate_limits": true});
    let c = Case::new(cfg, keys());
    let k = format!("x-api-key: {KEY}");
    let d = c.decide(&["--path", "/x", "-H", &k, "--count", "1m=2"]);
    assert_eq!(d["class"], "shadow:rate_limited", "{d}");
    assert_eq!(d["shadow"], "rate_limited");
    // It goes upstream like an allowed request: no status of keygate's own.
    assert_eq!(d["status"], Value::Null);
    for (want, code) in [
        ("shadow:rate_limited", 0),
        ("shadow", 0),
        ("rate_limited", 1),
        ("shadow:forbidden", 1),
    ] {
        let out = c.run(&[
            "--path", "/x", "-H", &k, "--count", "1m=2", "--expect", want,
        ]);
        assert_eq!(out.status.code(), Some(code), "--expect {want}");
    }
    let out = c.run(&["--path", "/x", "-H", &k, "--expect", "shadow"]);
    assert_eq!(out.status.code(), Some(1), "allowed is not shadow");
}

#[test]
fn unavailable_and_fail_open() {
    let c = Case::standard();
    let k = format!("x-api-key: {KEY}");
    let d = c.decide(&["--path", "/x", "-H", &k, "--list-age", "121"]);
    assert_eq!(d["class"], "unavailable");
    assert_eq!(d["status"], 503);
    assert_eq!(d["rule"]["check"], "key_list");
    assert_eq!(d["rule"]["loaded"], true);
    assert_eq!(
        c.decide(&["--path", "/x", "-H", &k, "--list-age", "120"])["class"],
        "allowed"
    );

    // Without a key list.
    let out = Command::new(BIN)
        .args(["test", "--config", &c.config, "--path", "/x", "--json"])
        .output()
        .unwrap();
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["class"], "unavailable");
    assert_eq!(d["rule"]["loaded"], false);

    let mut cfg = config();
    cfg["key_list"]["fail_open"] = json!(true);
    let c = Case::new(cfg, keys());
    let d = c.decide(&["--path", "/x", "-H", &k, "--list-age", "1000"]);
    assert_eq!(d["class"], "fail_open");
    assert_eq!(d["rule"]["fail_open"], true);
}

#[test]
fn expect_exit_codes_and_bad_input() {
    let c = Case::standard();
    let k = format!("x-api-key: {KEY}");
    let ok = c.run(&["--path", "/x", "-H", &k, "--expect", "allowed"]);
    assert_eq!(ok.status.code(), Some(0));
    let other = c.run(&["--path", "/x", "--expect", "allowed"]);
    assert_eq!(other.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&other.stderr)
        .contains("expected allowed, the decision is missing_key"));
    assert!(String::from_utf8_lossy(&other.stdout).starts_with("decision: missing_key (401)"));
    // Not a class: usage.
    assert_eq!(c.run(&["--expect", "allowd"]).status.code(), Some(2));
    assert_eq!(c.run(&["--count", "x=1"]).status.code(), Some(2));
    // Unreadable and invalid inputs.
    let out = Command::new(BIN)
        .args(["test", "--config", "/nonexistent/keygate.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let bad = c
        .dir
        .write("bad.json", r#"{"key_list":{"cluster":"k","path":"v1"}}"#);
    let out = Command::new(BIN)
        .args(["test", "--config", &bad])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key_list.path"));
}

#[test]
fn the_configuration_may_come_from_an_envoy_bootstrap() {
    let c = Case::standard();
    let cfg = config().to_string().replace('\'', "''");
    let yaml = format!(
        r#"static_resources:
  listeners:
  - filter_chains:
    - filters:
      - typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                root_id: keygate
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{cfg}'
"#
    );
    let envoy = c.dir.write("envoy.yaml", &yaml);
    let out = Command::new(BIN)
        .args(["test", "--config", &envoy, "--keys", &c.keys, "--at", AT])
        .args([
            "--path",
            "/x",
            "-H",
            &format!("x-api-key: {KEY}"),
            "--expect",
            "allowed",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
