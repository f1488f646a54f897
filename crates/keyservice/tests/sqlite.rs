//! The key service on a real SQLite file, through real HTTP on 127.0.0.1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

mod common;
use common::*;
use serde_json::json;

#[test]
fn lifecycle() {
    let (_d, db) = sqlite();
    scenarios::lifecycle(&db);
}

#[test]
fn auth() {
    let (_d, db) = sqlite();
    scenarios::auth(&db);
}

#[test]
fn bad_input_is_400_with_field_and_changes_nothing() {
    let (_d, db) = sqlite();
    scenarios::bad_input(&db);
}

#[test]
fn owners_plans_and_schemas() {
    let (_d, db) = sqlite();
    scenarios::owners_plans(&db);
}

#[test]
fn rotate() {
    let (_d, db) = sqlite();
    scenarios::rotate(&db);
}

#[test]
fn listing() {
    let (_d, db) = sqlite();
    scenarios::listing(&db);
}

#[test]
fn usage() {
    let (_d, db) = sqlite();
    scenarios::usage(&db);
}

#[test]
fn import_export() {
    let (_d, db) = sqlite();
    scenarios::import_export(&db);
}

#[test]
fn retention() {
    let (_d, db) = sqlite();
    scenarios::retention(&db);
}

#[test]
fn concurrent_creates_and_updates_lose_nothing() {
    let (_d, db) = sqlite();
    let s = Server::start(&db);
    scenarios::concurrent(&db, &[&s]);
}

#[test]
fn restart_keeps_keys_and_etag() {
    let (_d, db) = sqlite();
    let s = Server::start(&db);
    let (rec, key) = s.create(json!({"owner": "o"}));
    let id = rec["id"].as_str().unwrap().to_string();
    let (etag, _) = s.wait_document(std::time::Duration::from_secs(1), |d| {
        d["keys"][0]["id"] == id.as_str()
    });
    s.stop();
    let s = Server::start(&db);
    assert_eq!(s.document().0, etag);
    let l = s.send("POST", "/v1/admin/keys/lookup", &json!({"key": key}));
    assert_eq!(l.json()["id"], rec["id"]);
    s.stop();
}

#[test]
fn incremental_builds_match_a_full_build() {
    let (_d, db) = sqlite();
    scenarios::incremental_matches_full(&db);
}
