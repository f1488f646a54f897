//! `keygate keys …` against a real service (SQLite) through its admin API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

mod common;
use clap::Parser;
use common::*;
use keygate_keyservice::{run_keys, KeysCommand};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: KeysCommand,
}

fn keys(s: &Server, args: &[&str]) -> bool {
    let mut argv = vec!["keys"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--url", &s.url, "--token", ADMIN]);
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let code = run_keys(cli.cmd);
    format!("{code:?}") == format!("{:?}", ExitCode::SUCCESS)
}

fn only_key(s: &Server, q: &str) -> Value {
    let v = s.get(&format!("/v1/admin/keys?{q}")).json();
    let a = v["keys"].as_array().unwrap();
    assert_eq!(a.len(), 1, "{v}");
    a[0].clone()
}

#[test]
fn cli_lifecycle() {
    let (dir, db) = sqlite();
    let s = Server::start(&db);
    s.send(
        "PUT",
        "/v1/admin/plans/pro",
        &json!({"rate_limits": [{"limit": 5, "window_s": 1}]}),
    );
    assert!(keys(
        &s,
        &[
            "create",
            "--owner",
            "org-1",
            "--prefix",
            "minds_",
            "--encoding",
            "hex",
            "--name",
            "ci",
            "--scope",
            "a:*",
            "--allow-ip",
            "10.0.0.0/8",
            "--limit",
            "60/60",
            "--json"
        ]
    ));
    let k = only_key(&s, "owner=org-1");
    assert_eq!(k["prefix"], "minds_");
    assert_eq!(k["scopes"], json!(["a:*"]));
    assert_eq!(k["rate_limits"], json!([{"limit": 60, "window_s": 60}]));
    let id = k["id"].as_str().unwrap().to_string();
    assert!(keys(&s, &["list"]));
    assert!(keys(
        &s,
        &["list", "--json", "--owner", "org-1", "--limit", "5"]
    ));
    assert!(keys(&s, &["show", &id]));
    assert!(keys(
        &s,
        &[
            "update",
            &id,
            "--plan",
            "pro",
            "--no-limits",
            "--no-scopes",
            "--name",
            "renamed"
        ]
    ));
    let k = only_key(&s, "owner=org-1");
    assert_eq!(k["plan"], "pro");
    assert_eq!(k["rate_limits"], Value::Null);
    assert_eq!(k["scopes"], json!([]));
    assert_eq!(k["name"], "renamed");
    assert!(keys(&s, &["disable", &id]));
    assert_eq!(only_key(&s, "owner=org-1")["status"], "disabled");
    assert!(keys(&s, &["enable", &id]));
    assert_eq!(only_key(&s, "owner=org-1")["status"], "active");
    assert!(keys(&s, &["rotate", &id, "--overlap-s", "60"]));
    assert_eq!(
        s.get("/v1/admin/keys?owner=org-1").json()["keys"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(keys(&s, &["revoke", &id]));
    // The service's refusals are failures.
    assert!(!keys(&s, &["enable", &id]));
    assert!(!keys(&s, &["create", "--owner", "has space"]));
    assert!(!keys(&s, &["show", "nope"]));
    assert!(!keys(&s, &["update", &id]));
    assert!(keys(&s, &["delete", &id]));
    s.get(&format!("/v1/admin/keys/{id}"))
        .error(404, "not_found");
    // A wrong token fails.
    let cli = Cli::try_parse_from(["keys", "list", "--url", &s.url, "--token", "wrong"]).unwrap();
    assert_ne!(
        format!("{:?}", run_keys(cli.cmd)),
        format!("{:?}", ExitCode::SUCCESS)
    );

    // Export to a file, import it into a fresh service: same keys, same hashes.
    let file = dir.path().join("export.json");
    assert!(keys(&s, &["export", "-o", file.to_str().unwrap()]));
    let exported: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    keygate_core::keylist::parse(&std::fs::read(&file).unwrap()).unwrap();
    s.stop();
    let (_d2, db2) = sqlite();
    let s2 = Server::start(&db2);
    assert!(keys(&s2, &["import", file.to_str().unwrap()]));
    let (_, d) = s2.wait_document(Duration::from_secs(1), |d| {
        d["keys"].as_array().unwrap().len() == 1
    });
    assert_eq!(d["keys"][0]["hash"].as_str().unwrap().len(), 64);
    assert_eq!(exported["keys"].as_array().unwrap().len(), 1);
    assert_eq!(exported["keys"][0]["id"], d["keys"][0]["id"]);
    // A file that is not a key list is refused.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"keys":[{"id":"a"}]}"#).unwrap();
    assert!(!keys(&s2, &["import", bad.to_str().unwrap()]));
    s2.stop();
}
