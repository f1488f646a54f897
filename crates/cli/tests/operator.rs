//! The operator subcommands added with clap: `new` ids, expiries and metadata, `hash` from a
//! file, every error of `check-keys`, `check-config` on Envoy and Istio files with warnings,
//! `diff`, completions, exit statuses, and `serve`'s JSON log and graceful shutdown.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use serde_json::{json, Value};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{sha, Dir, BIN};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn new_generates_the_id_and_writes_metadata_and_expiry() {
    let d = Dir::new();
    let list = d.path("keys.json");
    let out = run(&[
        "new",
        "--list",
        &list,
        "--owner",
        "org-7",
        "--name",
        "CI bot",
        "--description",
        "deploys",
        "--expires",
        "90d",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", err(&out));
    let v = json_of(&out);
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("key_") && id.len() == 20, "{id}");
    assert!(id[4..].bytes().all(|b| b.is_ascii_hexdigit()));
    let key = v["key"].as_str().unwrap();
    assert_eq!(v["hash"], sha(key));
    assert_eq!(v["owner"], "org-7");
    let expiry = keygate_core::time::parse_rfc3339(v["expiry"].as_str().unwrap()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((expiry - (now + 90 * 86_400)).abs() < 60, "{expiry}");

    let text = fs::read_to_string(&list).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let k = &doc["keys"][0];
    assert_eq!(k["name"], "CI bot");
    assert_eq!(k["description"], "deploys");
    assert_eq!(k["expires_at"], v["expiry"]);
    // Stable pretty form: 2-space indent, final newline, members in order.
    assert!(
        text.ends_with("}\n") && text.contains("\n  \"keys\": [\n"),
        "{text}"
    );
    let pos = |s: &str| text.find(s).unwrap();
    assert!(pos("\"id\"") < pos("\"hash\"") && pos("\"owner\"") < pos("\"name\""));

    // A date.
    let out = run(&[
        "new",
        "--list",
        &list,
        "--owner",
        "o",
        "--expires",
        "2030-01-01",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", err(&out));
    let doc: Value = serde_json::from_slice(&fs::read(&list).unwrap()).unwrap();
    assert_eq!(doc["keys"][1]["expires_at"], "2030-01-01T00:00:00Z");
    // Usage errors are exit 2 and short, with a suggestion.
    let out = run(&["new", "--list", &list, "--owner", "o", "--scopes", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(err(&out).contains("--scope"), "{}", err(&out));
}

#[test]
fn hash_reads_keys_from_a_file() {
    let d = Dir::new();
    let f = d.write("keys.txt", "a\r\nb\n");
    let out = run(&["hash", "--key-file", &f]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n{}\n", sha("a"), sha("b"))
    );
    let out = run(&["hash", "--key-file", &f, "--json"]);
    assert_eq!(
        json_of(&out),
        json!({"ok": true, "hashes": [sha("a"), sha("b")]})
    );
    let out = run(&["hash", "--key-file", &d.path("missing")]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn check_keys_reports_every_error_and_a_summary() {
    let d = Dir::new();
    let h = sha("k1");
    let bad = d.write(
        "bad.json",
        &json!({"plans": {"free": {}}, "keys": [
            {"id": "a", "hash": "abc", "owner": "o"},
            {"id": "b", "hash": h, "owner": "o", "plan": "gold"},
            {"id": "a", "hash": h.to_uppercase(), "owner": "o"},
            {"id": "c", "hash": sha("k3"), "owner": "o", "allowed_ips": ["1.2.3.4/33"], "expires_at": "soon"}
        ]})
        .to_string(),
    );
    let out = run(&["check-keys", &bad, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json_of(&out);
    assert_eq!(v["ok"], false);
    let paths: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    for p in [
        "keys[0].hash",
        "keys[1].plan",
        "keys[2].id",
        "keys[2].hash",
        "keys[3].allowed_ips[0]",
        "keys[3].expires_at",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    assert!(v["summary"].is_object());
    let out = run(&["check-keys", &bad]);
    assert!(err(&out).contains("6 errors"), "{}", err(&out));

    // A valid list: the summary, judged at --at, with the configuration's default limits.
    let at = 1_800_000_000i64;
    let good = d.write(
        "good.json",
        &json!({"owners": {"o": {}, "gone": {"status": "disabled"}},
                "plans": {"free": {"rate_limits": []}},
                "keys": [
            {"id": "1", "hash": sha("1"), "owner": "o"},
            {"id": "2", "hash": sha("2"), "owner": "o", "status": "disabled"},
            {"id": "3", "hash": sha("3"), "owner": "o", "status": "revoked"},
            {"id": "4", "hash": sha("4"), "owner": "o", "expires_at": at - 1},
            {"id": "5", "hash": sha("5"), "owner": "o", "expires_at": at + 3600},
            {"id": "6", "hash": sha("6"), "owner": "gone"},
            {"id": "7", "hash": sha("7"), "owner": "o", "plan": "free"}
        ]})
        .to_string(),
    );
    let cfg = d.write(
        "cfg.json",
        r#"{"key_list":{"cluster":"k","path":"/"},"rate_limit":{"default":[{"limit":1,"window_s":1}]}}"#,
    );
    let out = run(&[
        "check-keys",
        &good,
        "--json",
        "--at",
        &at.to_string(),
        "--config",
        &cfg,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", err(&out));
    let v = json_of(&out);
    assert_eq!(v["ok"], true);
    assert_eq!(v["errors"], json!([]));
    let s = &v["summary"];
    assert_eq!(
        (
            s["keys"].as_u64(),
            s["active"].as_u64(),
            s["disabled"].as_u64(),
            s["revoked"].as_u64()
        ),
        (Some(7), Some(5), Some(1), Some(1))
    );
    assert_eq!(s["expired"], 1);
    assert_eq!(s["expiring_7d"], 1);
    assert_eq!(s["owner_unusable"], 1);
    assert_eq!(s["without_limits"], 1, "only the plan with an empty list");
    let warned: Vec<&str> = v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["path"].as_str().unwrap())
        .collect();
    assert_eq!(warned, vec!["keys[4].expires_at", "keys[5].owner"]);
    let out = run(&[
        "check-keys",
        &good,
        "--at",
        &at.to_string(),
        "--deny-warnings",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let out = run(&["check-keys", &d.path("nope.json")]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn check_config_reads_envoy_and_istio_files() {
    let root = repo();
    let envoy = root.join("envoy/examples/minds/envoy.yaml");
    let out = run(&["check-config", envoy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", err(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    let istio = root.join("envoy/istio/wasmplugin.yaml");
    let out = run(&["check-config", istio.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", err(&out));
    let v = json_of(&out);
    assert_eq!(v["ok"], true);
    assert_eq!(v["summary"]["sources"], json!(["spec.pluginConfig"]));

    // A bad value inside a WasmPlugin names the field.
    let d = Dir::new();
    let text = fs::read_to_string(&istio)
        .unwrap()
        .replace("refresh_s: 30", "refresh_s: 0");
    let bad = d.write("wp.yaml", &text);
    let out = run(&["check-config", &bad, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json_of(&out);
    assert_eq!(v["errors"][0]["path"], "key_list.refresh_s");
    assert_eq!(v["errors"][0]["source"], "spec.pluginConfig");
    let out = run(&[
        "check-config",
        d.write("svc.yaml", "kind: Service\n").as_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err(&out).contains("no keygate configuration"),
        "{}",
        err(&out)
    );
}

#[test]
fn check_config_warns_about_hazards() {
    let d = Dir::new();
    let cfg = d.write(
        "cfg.json",
        &json!({
            "key_list": {"cluster": "k", "path": "/", "refresh_s": 30, "max_stale_s": 20},
            "credentials": [{"header": "x-api-key"}, {"header": "X-Api-Key"}],
            "exempt": [{"method": "GET"}],
            "routes": [{"path_prefix": "/a"}, {"path_exact": "/a/b", "scope": "s"}],
            "errors": {"forbidden": {"body": "{retry_after} {retry}"}}
        })
        .to_string(),
    );
    let out = run(&["check-config", &cfg]);
    assert_eq!(out.status.code(), Some(0), "warnings are not errors");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    let out = run(&["check-config", &cfg, "--json"]);
    let v = json_of(&out);
    let paths: Vec<&str> = v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        vec![
            "key_list.max_stale_s",
            "errors.forbidden.body",
            "routes[1]",
            "exempt[0]",
            "credentials[1]"
        ]
    );
    let out = run(&["check-config", &cfg, "--deny-warnings"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn diff_lists_added_removed_and_changed_keys() {
    let d = Dir::new();
    let old = d.write(
        "old.json",
        &json!({"plans": {"free": {"rate_limits": [{"limit": 1, "window_s": 60}]}}, "keys": [
            {"id": "a", "hash": sha("a"), "owner": "o"},
            {"id": "b", "hash": sha("b"), "owner": "o", "scopes": ["x"]},
            {"id": "c", "hash": sha("c"), "owner": "o"}
        ]})
        .to_string(),
    );
    let new = d.write(
        "new.json",
        &json!({"plans": {"free": {"rate_limits": [{"limit": 2, "window_s": 60}]}}, "keys": [
            {"id": "b", "hash": sha("b"), "owner": "o", "scopes": ["x", "y"], "status": "revoked",
             "expires_at": "2030-01-01T00:00:00Z", "plan": "free"},
            {"id": "c", "hash": sha("c").to_uppercase(), "owner": "o"},
            {"id": "d", "hash": sha("d"), "owner": "o"}
        ]})
        .to_string(),
    );
    let out = run(&["diff", &old, &new, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", err(&out));
    let v = json_of(&out);
    assert_eq!(v["added"][0]["id"], "d");
    assert_eq!(v["removed"][0]["id"], "a");
    assert_eq!(
        v["changed"].as_array().unwrap().len(),
        1,
        "the hash's case is no change"
    );
    let fields: Vec<&str> = v["changed"][0]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, vec!["status", "expires_at", "plan", "scopes"]);
    assert_eq!(v["plans"]["changed"][0]["name"], "free");
    let out = run(&["diff", &old, &new]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("+ d ")
            && text.contains("- a ")
            && text.contains("~ b: status active -> revoked"),
        "{text}"
    );
    assert!(text.ends_with("1 added, 1 removed, 1 changed\n"), "{text}");
    assert_eq!(
        run(&["diff", &old, &new, "--exit-code"]).status.code(),
        Some(1)
    );
    assert_eq!(
        run(&["diff", &old, &old, "--exit-code"]).status.code(),
        Some(0)
    );
    let bad = d.write("bad.json", r#"{"keys":[{"id":"x"}]}"#);
    assert_eq!(run(&["diff", &old, &bad]).status.code(), Some(1));
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("check-keys") && text.contains("keygate"),
            "{shell}"
        );
    }
    assert_eq!(run(&["completions", "tcsh"]).status.code(), Some(2));
    // Usage errors suggest the right spelling.
    let out = run(&["chek-keys", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(err(&out).contains("check-keys"), "{}", err(&out));
}

#[test]
fn serve_logs_json_and_stops_gracefully_on_sigterm() {
    let d = Dir::new();
    let file = d.write("keys.json", r#"{"version":"v1","keys":[]}"#);
    let mut child = Command::new(BIN)
        .args([
            "serve",
            &file,
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let first: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        first["msg"].as_str().unwrap().split(' ').next(),
        Some("listening")
    );
    assert!(first["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    line.clear();
    err.read_line(&mut line).unwrap();
    let loaded: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(loaded["keys"], 0);
    assert_eq!(loaded["version"], "v1");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("SIGTERM: shutting down"), "{rest}");
}
