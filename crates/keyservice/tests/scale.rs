//! Rough scale figures (ignored by default): `cargo test --release --test scale -- --ignored --nocapture`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
#[ignore]
fn sqlite_document_rebuild_time() {
    let n: usize = std::env::var("KEYGATE_SCALE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let (_d, db) = sqlite();
    let s = Server::start(&db);
    let keys: Vec<_> = (0..n)
        .map(|i| json!({"id": format!("key_{i:08}"), "hash": sha256_hex(&format!("k{i}")), "owner": format!("o{}", i % 100), "scopes": ["a:*"]}))
        .collect();
    let t = Instant::now();
    let r = s.send("POST", "/v1/admin/import", &json!({"keys": keys}));
    assert_eq!(r.status, 200, "{}", r.body);
    eprintln!("import of {n} keys: {:?}", t.elapsed());
    s.wait_document(Duration::from_secs(120), |d| {
        d["keys"].as_array().unwrap().len() == n
    });
    let t = Instant::now();
    s.send(
        "PATCH",
        "/v1/admin/keys/key_00000001",
        &json!({"status": "disabled"}),
    );
    s.wait_document(Duration::from_secs(120), |d| {
        d["keys"][1]["status"] == "disabled"
    });
    eprintln!(
        "one change to served document ({n} keys): {:?}",
        t.elapsed()
    );
    let (etag, bytes) = s.document();
    let t = Instant::now();
    for _ in 0..100 {
        assert_eq!(
            s.raw("GET", "/v1/keys", None, None, &[("if-none-match", &etag)])
                .status,
            304
        );
    }
    eprintln!(
        "document {} bytes; 304: {:?} each",
        bytes.len(),
        t.elapsed() / 100
    );
    let m = s.raw("GET", "/metrics", None, None, &[]).body;
    eprintln!(
        "{}",
        m.lines()
            .filter(|l| l.starts_with("keygate_keyservice_document_build"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    s.stop();
}
