//! Scenarios run against SQLite and PostgreSQL alike: `db` is a `--database` value.

use super::*;
use serde_json::json;

/// The document parses with the filter's own parser; its ETag is a strong one made of a
/// SHA-256 (over the digests of the document's chunks: the unit tests of `document` check that
/// it is the same for a document built whole and one built change by change).
pub fn check_document(etag: &str, bytes: &[u8]) -> Value {
    keygate_core::keylist::parse(bytes)
        .unwrap_or_else(|e| panic!("the filter rejects the document: {e}"));
    let hex = etag
        .strip_prefix('"')
        .and_then(|e| e.strip_suffix('"'))
        .unwrap_or_else(|| panic!("not a strong ETag: {etag}"));
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{etag}"
    );
    serde_json::from_slice(bytes).unwrap()
}

fn doc_key<'a>(doc: &'a Value, id: &str) -> Option<&'a Value> {
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
}

pub fn lifecycle(db: &str) {
    let s = Server::start(db);
    let h = s.get("/healthz");
    assert_eq!(h.status, 200, "{}", h.body);

    // The seed APIs' key shapes.
    let (rec, key) =
        s.create(json!({"owner": "org-7", "prefix": "minds_", "encoding": "hex", "name": "ci"}));
    assert!(key.starts_with("minds_") && key.len() == 6 + 48, "{key}");
    assert!(key[6..].bytes().all(|b| b.is_ascii_hexdigit()));
    let (_, k2) = s.create(json!({"owner": "abc123", "prefix": "mn-abc123-"}));
    assert!(
        k2.starts_with("mn-abc123-") && k2[10..].bytes().all(|b| b.is_ascii_alphanumeric()),
        "{k2}"
    );
    let (_, k3) = s.create(json!({"owner": "o", "prefix": "ak_", "bytes": 32}));
    assert!(k3.starts_with("ak_"));
    let (_, k4) = s.create(json!({"owner": "o", "prefix": "mindo_", "bytes": 16}));
    assert!(k4.starts_with("mindo_"));
    let (_, k5) = s.create(json!({"owner": "o"}));
    assert!(k5.starts_with("kg_"));

    // The record: every member of SPEC §7, never the key nor its hash.
    let id = rec["id"].as_str().unwrap().to_string();
    for m in [
        "id",
        "owner",
        "name",
        "description",
        "prefix",
        "encoding",
        "bytes",
        "status",
        "scopes",
        "sites",
        "allowed_ips",
        "plan",
        "rate_limits",
        "expires_at",
        "created_at",
        "updated_at",
        "last_used_at",
    ] {
        assert!(rec.get(m).is_some(), "record lacks {m}: {rec}");
    }
    assert_eq!(rec["status"], "active");
    assert_eq!(rec["last_used_at"], Value::Null);
    assert_eq!(rec["bytes"], 24);
    let got = s.get(&format!("/v1/admin/keys/{id}"));
    assert_eq!(got.status, 200);
    let got = got.json();
    assert!(got.get("key").is_none() && got.get("hash").is_none());
    assert!(!got.to_string().contains(&sha256_hex(&key)));
    let mut want = rec.clone();
    want.as_object_mut().unwrap().remove("key");
    assert_eq!(got, want);

    // Lookup by key.
    let l = s.send("POST", "/v1/admin/keys/lookup", &json!({"key": key}));
    assert_eq!(l.status, 200, "{}", l.body);
    assert_eq!(l.json()["id"], id.as_str());
    s.send(
        "POST",
        "/v1/admin/keys/lookup",
        &json!({"key": "minds_nope"}),
    )
    .error(404, "not_found");

    // The document: hashes only, parsed by the filter, strong ETag, 304.
    s.wait_document(Duration::from_secs(1), |d| {
        d["keys"].as_array().unwrap().len() == 5
    });
    let (etag, bytes) = s.document();
    let doc = check_document(&etag, &bytes);
    let k = doc_key(&doc, &id).unwrap();
    assert_eq!(k["hash"], sha256_hex(&key));
    assert_eq!(k["owner"], "org-7");
    assert!(k.get("name").is_none(), "metadata in the document: {k}");
    assert!(!String::from_utf8_lossy(&bytes).contains(&key));
    assert_eq!(doc["owners"]["org-7"]["status"], "active");
    for inm in [
        etag.clone(),
        format!("\"x\", {etag}"),
        "*".into(),
        format!("W/{etag}"),
    ] {
        let r = s.raw("GET", "/v1/keys", None, None, &[("if-none-match", &inm)]);
        assert_eq!(r.status, 304, "{inm}");
        assert_eq!(r.header("etag").as_deref(), Some(etag.as_str()));
        assert!(r.bytes.is_empty());
    }
    let r = s.raw(
        "GET",
        "/v1/keys",
        None,
        None,
        &[("if-none-match", "\"other\"")],
    );
    assert_eq!(r.status, 200);

    // A name-only change leaves the document alone; a status change changes it at once.
    let p = s.send(
        "PATCH",
        &format!("/v1/admin/keys/{id}"),
        &json!({"name": "renamed", "description": "d"}),
    );
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.json()["name"], "renamed");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.document().0, etag);
    let p = s.send(
        "PATCH",
        &format!("/v1/admin/keys/{id}"),
        &json!({"status": "disabled"}),
    );
    assert_eq!(p.json()["status"], "disabled");
    let (etag2, doc2) = s.wait_document(Duration::from_secs(1), |d| {
        doc_key(d, &id).unwrap()["status"] == "disabled"
    });
    assert_ne!(etag2, etag);
    let (e, b) = s.document();
    check_document(&e, &b);
    let p = s.send(
        "PATCH",
        &format!("/v1/admin/keys/{id}"),
        &json!({"status": "active"}),
    );
    assert_eq!(p.json()["status"], "active");
    drop(doc2);

    // Settings, and null clearing them.
    s.send(
        "PUT",
        "/v1/admin/plans/free",
        &json!({"rate_limits": [{"limit": 10, "window_s": 60}]}),
    );
    let p = s.send("PATCH", &format!("/v1/admin/keys/{id}"), &json!({
        "scopes": ["contacts:*"], "sites": ["123"], "allowed_ips": ["203.0.113.0/24", "2001:db8::1"],
        "plan": "free", "rate_limits": [{"limit": 60, "window_s": 60}]}));
    assert_eq!(p.status, 200, "{}", p.body);
    let (_, d) = s.wait_document(Duration::from_secs(1), |d| {
        doc_key(d, &id).unwrap().get("plan").is_some()
    });
    let k = doc_key(&d, &id).unwrap();
    assert_eq!(k["scopes"], json!(["contacts:*"]));
    assert_eq!(k["allowed_ips"], json!(["203.0.113.0/24", "2001:db8::1"]));
    assert_eq!(k["rate_limits"], json!([{"limit": 60, "window_s": 60}]));
    let p = s.send(
        "PATCH",
        &format!("/v1/admin/keys/{id}"),
        &json!({"scopes": null, "plan": null, "rate_limits": [], "name": null}),
    );
    let v = p.json();
    assert_eq!(v["scopes"], json!([]));
    assert_eq!(v["plan"], Value::Null);
    assert_eq!(v["name"], Value::Null);
    assert_eq!(v["rate_limits"], json!([]));
    s.wait_document(Duration::from_secs(1), |d| {
        doc_key(d, &id).unwrap()["rate_limits"] == json!([])
    });
    let (e, b) = s.document();
    let d = check_document(&e, &b);
    assert!(doc_key(&d, &id).unwrap().get("plan").is_none());

    // Not changeable after creation.
    for (m, v) in [
        ("expires_at", json!("2030-01-01T00:00:00Z")),
        ("key", json!("x")),
        ("owner", json!("o2")),
    ] {
        let r = s.send("PATCH", &format!("/v1/admin/keys/{id}"), &json!({m: v}));
        assert_eq!(r.error(400, "invalid_request").as_deref(), Some(m));
    }

    // Revoked is final.
    let r = s.send(
        "PATCH",
        &format!("/v1/admin/keys/{id}"),
        &json!({"status": "revoked"}),
    );
    assert_eq!(r.status, 200);
    s.send(
        "PATCH",
        &format!("/v1/admin/keys/{id}"),
        &json!({"status": "active"}),
    )
    .error(409, "conflict");
    s.send(
        "PATCH",
        &format!("/v1/admin/keys/{id}"),
        &json!({"status": "disabled"}),
    )
    .error(409, "conflict");
    s.send("POST", &format!("/v1/admin/keys/{id}/rotate"), &json!({}))
        .error(409, "conflict");
    let (_, d) = s.wait_document(Duration::from_secs(1), |d| {
        doc_key(d, &id).unwrap()["status"] == "revoked"
    });
    drop(d);

    // Delete: 204, gone from the admin API and the document.
    let (r5, _) = s.create(json!({"owner": "o"}));
    let id5 = r5["id"].as_str().unwrap().to_string();
    s.wait_document(Duration::from_secs(1), |d| doc_key(d, &id5).is_some());
    let r = s.raw(
        "DELETE",
        &format!("/v1/admin/keys/{id5}"),
        Some(ADMIN),
        None,
        &[],
    );
    assert_eq!(r.status, 204, "{}", r.body);
    s.get(&format!("/v1/admin/keys/{id5}"))
        .error(404, "not_found");
    s.raw(
        "DELETE",
        &format!("/v1/admin/keys/{id5}"),
        Some(ADMIN),
        None,
        &[],
    )
    .error(404, "not_found");
    s.wait_document(Duration::from_secs(1), |d| doc_key(d, &id5).is_none());

    // Audit: who (a token identity, never the token), what, when.
    let a = s.get("/v1/admin/audit?limit=1000").json();
    let entries = a["entries"].as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["action"] == "key.delete" && e["object"] == format!("key:{id5}")));
    assert!(entries.iter().any(|e| e["action"] == "key.revoke"));
    assert!(entries
        .iter()
        .all(|e| e["actor"].as_str().unwrap().starts_with("admin:")));
    assert!(!a.to_string().contains(ADMIN));
    assert!(!a.to_string().contains(&key));

    // Metrics.
    let m = s.raw("GET", "/metrics", None, None, &[]);
    assert_eq!(m.status, 200);
    assert!(
        m.body
            .contains("keygate_keyservice_document_rebuilds_total"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("route=\"/v1/admin/keys/{id}\",method=\"PATCH\",status=\"409\""),
        "{}",
        m.body
    );
    assert!(
        m.body.contains("keygate_keyservice_document_keys 5"),
        "{}",
        m.body
    );
    s.stop();
}

pub fn auth(db: &str) {
    let s = Server::start_with(
        db,
        Options {
            readers: true,
            ..Options::default()
        },
    );
    s.raw("GET", "/v1/admin/keys", None, None, &[])
        .error(401, "unauthorized");
    s.raw("GET", "/v1/admin/keys", Some("nope"), None, &[])
        .error(403, "forbidden");
    s.raw("GET", "/v1/admin/keys", Some(READER), None, &[])
        .error(403, "forbidden");
    s.raw("POST", "/v1/admin/keys", None, Some("{}"), &[])
        .error(401, "unauthorized");
    assert_eq!(
        s.raw("GET", "/v1/admin/keys", Some(ADMIN2), None, &[])
            .status,
        200
    );
    s.raw("GET", "/v1/keys", None, None, &[])
        .error(401, "unauthorized");
    s.raw("GET", "/v1/keys", Some("nope"), None, &[])
        .error(403, "forbidden");
    assert_eq!(
        s.raw("GET", "/v1/keys", Some(READER), None, &[]).status,
        200
    );
    s.raw("POST", "/v1/usage", None, Some(r#"{"reports":[]}"#), &[])
        .error(401, "unauthorized");
    assert_eq!(
        s.raw(
            "POST",
            "/v1/usage",
            Some(READER),
            Some(r#"{"reports":[]}"#),
            &[]
        )
        .status,
        200
    );
    s.raw("GET", "/v1/nothing", None, None, &[])
        .error(404, "not_found");
    s.raw("PUT", "/v1/keys", Some(READER), None, &[])
        .error(405, "method_not_allowed");
    s.stop();
    // Without reader tokens the document is open.
    let s = Server::start(db);
    assert_eq!(s.raw("GET", "/v1/keys", None, None, &[]).status, 200);
    s.stop();
}

/// Everything an admin can read back, to compare before and after a refused request.
fn snapshot(s: &Server) -> (Value, Value, Value, String, Value) {
    let keys = s.get("/v1/admin/keys?limit=1000").json();
    let owners = s.get("/v1/admin/owners").json();
    let plans = s.get("/v1/admin/plans").json();
    let (etag, _) = s.document();
    let audit = s.get("/v1/admin/audit?limit=1000").json();
    (keys, owners, plans, etag, audit)
}

pub fn bad_input(db: &str) {
    let s = Server::start(db);
    s.send(
        "PUT",
        "/v1/admin/plans/free",
        &json!({"rate_limits": [{"limit": 1, "window_s": 1}]}),
    );
    let (rec, _) = s.create(json!({"owner": "o", "plan": "free"}));
    let id = rec["id"].as_str().unwrap().to_string();
    s.wait_document(Duration::from_secs(1), |d| doc_key(d, &id).is_some());
    let before = snapshot(&s);
    let key_path = format!("/v1/admin/keys/{id}");
    let rotate_path = format!("{key_path}/rotate");
    let cases: Vec<(&str, &str, String, Option<&str>)> = vec![
        ("POST", "/v1/admin/keys", r#"{}"#.into(), Some("owner")),
        ("POST", "/v1/admin/keys", r#"{"owner":"has space"}"#.into(), Some("owner")),
        ("POST", "/v1/admin/keys", format!(r#"{{"owner":"{}"}}"#, "x".repeat(257)), Some("owner")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","alowed_ips":[]}"#.into(), Some("alowed_ips")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","allowed_ips":["10.0.0.300"]}"#.into(), Some("allowed_ips[0]")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","allowed_ips":["10.0.0.0/8","::/129"]}"#.into(), Some("allowed_ips[1]")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","rate_limits":[{"limit":1,"window_s":1},{"limit":"5","window_s":1}]}"#.into(), Some("rate_limits[1].limit")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","rate_limits":[{"limit":1}]}"#.into(), Some("rate_limits[0].window_s")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","rate_limits":[{"limit":1,"window_s":999999999999}]}"#.into(), Some("rate_limits[0].window_s")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","rate_limits":[{"limit":99999999999,"window_s":1}]}"#.into(), Some("rate_limits[0].limit")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","plan":"gold"}"#.into(), Some("plan")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","expires_at":"2026-13-01T00:00:00Z"}"#.into(), Some("expires_at")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","encoding":"base64"}"#.into(), Some("encoding")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","bytes":4}"#.into(), Some("bytes")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","bytes":1.5}"#.into(), Some("bytes")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","prefix":"a\"b"}"#.into(), Some("prefix")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","scopes":"a"}"#.into(), Some("scopes")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","sites":[1]}"#.into(), Some("sites[0]")),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","name":5}"#.into(), Some("name")),
        ("POST", "/v1/admin/keys", r#"[]"#.into(), None),
        ("POST", "/v1/admin/keys", r#"{"owner":"o""#.into(), None),
        ("POST", "/v1/admin/keys", r#"{"owner":"o","owner":"p"}"#.into(), None),
        ("POST", "/v1/admin/keys", "".into(), None),
        ("PATCH", &key_path, r#"{"expires_at":null}"#.into(), Some("expires_at")),
        ("PATCH", &key_path, r#"{"status":"deleted"}"#.into(), Some("status")),
        ("PATCH", &key_path, r#"{"status":null}"#.into(), Some("status")),
        ("PATCH", &key_path, r#"{"plan":"gold"}"#.into(), Some("plan")),
        ("PATCH", &key_path, r#"{"name":"ok","rate_limits":[{"limit":1,"window_s":0}]}"#.into(), Some("rate_limits[0].window_s")),
        ("PATCH", &key_path, r#"{"scopes":["ok"],"allowed_ips":["nope"]}"#.into(), Some("allowed_ips[0]")),
        ("PATCH", &key_path, r#""name""#.into(), None),
        ("POST", &rotate_path, r#"{"overlap_s":-1}"#.into(), Some("overlap_s")),
        ("POST", &rotate_path, r#"{"expires_at":"2000-01-01T00:00:00Z"}"#.into(), Some("expires_at")),
        ("POST", &rotate_path, r#"{"extra":1}"#.into(), Some("extra")),
        ("PUT", "/v1/admin/owners/o", r#"{"status":"gone"}"#.into(), Some("status")),
        ("PUT", "/v1/admin/owners/o", r#"{"rate_limits":[{"limit":1,"window_s":1,"burst":2}]}"#.into(), Some("rate_limits[0].burst")),
        ("PUT", "/v1/admin/owners/o%20x", r#"{}"#.into(), Some("id")),
        ("PUT", "/v1/admin/plans/free", r#"{"rate_limits":[{"limit":1,"window_s":0}]}"#.into(), Some("rate_limits[0].window_s")),
        ("PUT", "/v1/admin/plans/free", r#"{"limits":[]}"#.into(), Some("limits")),
        ("POST", "/v1/admin/keys/lookup", r#"{"key":""}"#.into(), Some("key")),
        ("POST", "/v1/admin/keys/lookup", r#"{"key":"k","x":1}"#.into(), Some("x")),
        ("GET", "/v1/admin/keys?limit=0", String::new(), Some("limit")),
        ("GET", "/v1/admin/keys?limit=1001", String::new(), Some("limit")),
        ("GET", "/v1/admin/keys?limit=ten", String::new(), Some("limit")),
        ("GET", "/v1/admin/keys?cursor=zz", String::new(), Some("cursor")),
        ("GET", "/v1/admin/keys?status=gone", String::new(), Some("status")),
        ("GET", "/v1/admin/keys?colour=red", String::new(), Some("colour")),
        ("POST", "/v1/usage", r#"{"reports":[{"id":"x","allowed":-1}]}"#.into(), Some("reports[0].allowed")),
        ("POST", "/v1/usage", r#"{"reports":[{"id":"x","refused":{"sneezed":1}}]}"#.into(), Some("reports[0].refused.sneezed")),
        ("POST", "/v1/admin/import", r#"{"keys":[{"id":"a","hash":"00","owner":"o"}]}"#.into(), Some("keys[0].hash")),
        ("POST", "/v1/admin/import", r#"{"keys":[{"id":"a","hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","owner":"o","alowed_ips":[]}]}"#.into(), Some("keys[0].alowed_ips")),
    ];
    for (method, path, body, field) in &cases {
        let body = (method != &"GET").then_some(body.as_str());
        let r = s.raw(method, path, Some(ADMIN), body, &[]);
        let got = r.error(400, "invalid_request");
        assert_eq!(
            got.as_deref(),
            *field,
            "{method} {path} {body:?}: {}",
            r.body
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = snapshot(&s);
    assert_eq!(before.0, after.0, "keys changed");
    assert_eq!(before.1, after.1, "owners changed");
    assert_eq!(before.2, after.2, "plans changed");
    assert_eq!(before.3, after.3, "document changed");
    assert_eq!(before.4, after.4, "audit changed");
    s.stop();
}

pub fn owners_plans(db: &str) {
    let s = Server::start(db);
    let r = s.send(
        "PUT",
        "/v1/admin/owners/org-7",
        &json!({"status": "active", "rate_limits": [{"limit": 100, "window_s": 60}]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = s.send(
        "PUT",
        "/v1/admin/owners/org-7",
        &json!({"status": "disabled"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let g = s.get("/v1/admin/owners/org-7").json();
    assert_eq!(g["status"], "disabled");
    assert_eq!(g["rate_limits"], Value::Null);
    s.get("/v1/admin/owners/nobody").error(404, "not_found");
    assert_eq!(
        s.send(
            "PUT",
            "/v1/admin/plans/pro",
            &json!({"rate_limits": [{"limit": 20, "window_s": 1}]})
        )
        .status,
        201
    );
    assert_eq!(
        s.send("PUT", "/v1/admin/plans/open", &json!({"rate_limits": []}))
            .status,
        201
    );
    assert_eq!(
        s.send("PUT", "/v1/admin/plans/bare", &json!({})).status,
        201
    );
    assert_eq!(
        s.get("/v1/admin/plans/pro").json()["rate_limits"],
        json!([{"limit": 20, "window_s": 1}])
    );
    let (rec, _) = s.create(json!({"owner": "org-7", "plan": "pro"}));
    let id = rec["id"].as_str().unwrap();
    s.raw("DELETE", "/v1/admin/owners/org-7", Some(ADMIN), None, &[])
        .error(409, "conflict");
    s.raw("DELETE", "/v1/admin/plans/pro", Some(ADMIN), None, &[])
        .error(409, "conflict");
    s.wait_document(Duration::from_secs(1), |d| doc_key(d, id).is_some());
    let (e, b) = s.document();
    let d = check_document(&e, &b);
    assert_eq!(d["owners"]["org-7"]["status"], "disabled");
    assert_eq!(
        d["plans"]["pro"]["rate_limits"],
        json!([{"limit": 20, "window_s": 1}])
    );
    assert_eq!(d["plans"]["open"]["rate_limits"], json!([]));
    assert_eq!(d["plans"]["bare"], json!({}));
    // Owner limits: in schema 2 (default), not in schema 1.
    s.send(
        "PUT",
        "/v1/admin/owners/org-7",
        &json!({"rate_limits": [{"limit": 5, "window_s": 1}]}),
    );
    let (e2, _) = s.wait_document(Duration::from_secs(1), |d| {
        d["owners"]["org-7"].get("rate_limits").is_some()
    });
    let v1 = s.raw("GET", "/v1/keys", None, None, &[("x-keygate-schema", "1")]);
    assert_eq!(v1.status, 200);
    assert_eq!(v1.header("x-keygate-schema").as_deref(), Some("1"));
    let d1 = check_document(&v1.header("etag").unwrap(), &v1.bytes);
    assert!(d1["owners"]["org-7"].get("rate_limits").is_none(), "{d1}");
    assert_eq!(d1["owners"]["org-7"]["status"], "active");
    assert_ne!(v1.header("etag").unwrap(), e2);
    let v2 = s.raw(
        "GET",
        "/v1/keys",
        None,
        None,
        &[("x-keygate-schema", "1, 2")],
    );
    assert_eq!(v2.header("etag").unwrap(), e2);
    let v1b = s.raw(
        "GET",
        "/v1/keys",
        None,
        None,
        &[
            ("x-keygate-schema", "1"),
            ("if-none-match", &v1.header("etag").unwrap()),
        ],
    );
    assert_eq!(v1b.status, 304);
    s.raw(
        "GET",
        "/v1/keys",
        None,
        None,
        &[("x-keygate-schema", "one")],
    )
    .error(400, "invalid_request");
    // Delete once nothing refers.
    assert_eq!(
        s.raw(
            "DELETE",
            &format!("/v1/admin/keys/{id}"),
            Some(ADMIN),
            None,
            &[]
        )
        .status,
        204
    );
    assert_eq!(
        s.raw("DELETE", "/v1/admin/owners/org-7", Some(ADMIN), None, &[])
            .status,
        204
    );
    assert_eq!(
        s.raw("DELETE", "/v1/admin/plans/pro", Some(ADMIN), None, &[])
            .status,
        204
    );
    s.raw("DELETE", "/v1/admin/plans/pro", Some(ADMIN), None, &[])
        .error(404, "not_found");
    s.wait_document(Duration::from_secs(1), |d| d["plans"].get("pro").is_none());
    let (e, b) = s.document();
    let d = check_document(&e, &b);
    assert!(d["owners"].get("org-7").is_none());
    assert!(d["plans"].get("pro").is_none());
    s.stop();
}

pub fn rotate(db: &str) {
    let s = Server::start(db);
    let (old, old_key) = s.create(
        json!({"owner": "o", "prefix": "ak_", "encoding": "hex", "bytes": 20,
        "scopes": ["a:*"], "name": "n", "expires_at": "2099-01-01T00:00:00Z"}),
    );
    let id = old["id"].as_str().unwrap();
    let r = s.send(
        "POST",
        &format!("/v1/admin/keys/{id}/rotate"),
        &json!({"overlap_s": 3600}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let new = r.json();
    let new_key = new["key"].as_str().unwrap();
    assert!(new_key.starts_with("ak_") && new_key.len() == 3 + 40);
    assert_ne!(new_key, old_key);
    assert_ne!(new["id"], old["id"]);
    assert_eq!(new["owner"], "o");
    assert_eq!(new["scopes"], json!(["a:*"]));
    assert_eq!(new["encoding"], "hex");
    assert_eq!(new["expires_at"], Value::Null);
    let old_now = s.get(&format!("/v1/admin/keys/{id}")).json();
    let exp = keygate_core::time::parse_rfc3339(old_now["expires_at"].as_str().unwrap()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (exp - (now + 3600)).abs() <= 5,
        "old key expires at {exp}, now {now}"
    );
    // The earlier expiry wins: a second rotation without overlap ends the old key now.
    let r = s.send(
        "POST",
        &format!("/v1/admin/keys/{id}/rotate"),
        &json!({"expires_at": "2098-01-01T00:00:00Z"}),
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["expires_at"], "2098-01-01T00:00:00Z");
    let old_now = s.get(&format!("/v1/admin/keys/{id}")).json();
    let exp2 = keygate_core::time::parse_rfc3339(old_now["expires_at"].as_str().unwrap()).unwrap();
    assert!(exp2 <= now + 5, "{exp2}");
    // Empty body is {}.
    let nid = new["id"].as_str().unwrap();
    let r = s.raw(
        "POST",
        &format!("/v1/admin/keys/{nid}/rotate"),
        Some(ADMIN),
        None,
        &[],
    );
    assert_eq!(r.status, 201, "{}", r.body);
    s.raw("POST", "/v1/admin/keys/nope/rotate", Some(ADMIN), None, &[])
        .error(404, "not_found");
    s.wait_document(Duration::from_secs(1), |d| {
        d["keys"].as_array().unwrap().len() == 4
    });
    let (e, b) = s.document();
    check_document(&e, &b);
    s.stop();
}

pub fn listing(db: &str) {
    let s = Server::start(db);
    s.send("PUT", "/v1/admin/plans/p", &json!({}));
    let mut ids = Vec::new();
    for i in 0..7 {
        let owner = if i % 2 == 0 { "even" } else { "odd" };
        let body = if i < 3 {
            json!({"owner": owner, "plan": "p"})
        } else {
            json!({"owner": owner})
        };
        ids.push(s.create(body).0["id"].as_str().unwrap().to_string());
    }
    s.send(
        "PATCH",
        &format!("/v1/admin/keys/{}", ids[0]),
        &json!({"status": "disabled"}),
    );
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/admin/keys?limit=3".to_string(),
            Some(c) => format!("/v1/admin/keys?limit=3&cursor={c}"),
        };
        let v = s.get(&path).json();
        let page = v["keys"].as_array().unwrap();
        assert!(page.len() <= 3);
        seen.extend(page.iter().map(|k| k["id"].as_str().unwrap().to_string()));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);
    let count = |q: &str| {
        s.get(&format!("/v1/admin/keys?{q}")).json()["keys"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(count("owner=even"), 4);
    assert_eq!(count("owner=odd&plan=p"), 1);
    assert_eq!(count("status=disabled"), 1);
    assert_eq!(count("status=active&owner=even"), 3);
    assert_eq!(count("limit=1000"), 7);
    assert_eq!(s.get("/v1/admin/keys").json()["next_cursor"], Value::Null);
    s.stop();
}

pub fn usage(db: &str) {
    let s = Server::start(db);
    let (rec, _) = s.create(json!({"owner": "o"}));
    let id = rec["id"].as_str().unwrap();
    let (etag, _) = s.wait_document(Duration::from_secs(1), |d| doc_key(d, id).is_some());
    let body = json!({"instance": "envoy-1", "reports": [
        {"id": id, "allowed": 3, "refused": {"rate_limited": 1}, "last_used_at": "2026-01-02T03:04:05Z"},
        {"id": "ghost", "allowed": 1}
    ]});
    let r = s.raw("POST", "/v1/usage", None, Some(&body.to_string()), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"accepted": 1, "unknown": 1}));
    let body2 = json!({"reports": [{"id": id, "allowed": 2, "refused": {"rate_limited": 4, "ip_denied": 1},
        "last_used_at": "2025-01-01T00:00:00Z"}]});
    assert_eq!(
        s.raw("POST", "/v1/usage", None, Some(&body2.to_string()), &[])
            .status,
        200
    );
    let rec = s.get(&format!("/v1/admin/keys/{id}")).json();
    assert_eq!(rec["last_used_at"], "2026-01-02T03:04:05Z");
    let u = s.get(&format!("/v1/admin/keys/{id}/usage")).json();
    assert_eq!(u["last_used_at"], "2026-01-02T03:04:05Z");
    let days = u["days"].as_array().unwrap();
    assert_eq!(days.len(), 1, "{u}");
    assert_eq!(days[0]["allowed"], 5);
    assert_eq!(
        days[0]["refused"],
        json!({"ip_denied": 1, "rate_limited": 5})
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.document().0, etag, "usage changed the document");
    s.get("/v1/admin/keys/ghost/usage").error(404, "not_found");
    s.stop();
}

pub fn import_export(db: &str) {
    let s = Server::start(db);
    let h1 = sha256_hex("ak_imported_one");
    let h2 = sha256_hex("ak_imported_two");
    let doc = json!({
        "version": "v7",
        "owners": {"org-7": {"status": "active", "rate_limits": [{"limit": 9, "window_s": 9}]}, "org-8": {"status": "disabled"}},
        "plans": {"free": {"rate_limits": [{"limit": 10, "window_s": 60}]}},
        "keys": [
            {"id": "key_01", "hash": h1.to_uppercase(), "owner": "org-7", "status": "active", "expires_at": 4102444800u64,
             "allowed_ips": ["203.0.113.0/24"], "sites": ["123"], "scopes": ["contacts:*"], "plan": "free",
             "name": "imported", "meta": {"anything": [1, 2]}, "last_used_at": "2026-01-01T00:00:00Z"},
            {"id": "key_02", "hash": h2, "owner": "org-9", "rate_limits": []},
            {"id": "key_03", "hash": sha256_hex("gone"), "owner": "org-7", "status": "deleted"}
        ]
    });
    let r = s.send("POST", "/v1/admin/import", &doc);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["keys"],
        json!({"created": 2, "updated": 0, "skipped": 1})
    );
    // The imported keys work without re-issuing: lookup by key.
    s.wait_document(Duration::from_secs(1), |d| doc_key(d, "key_01").is_some());
    let l = s.send(
        "POST",
        "/v1/admin/keys/lookup",
        &json!({"key": "ak_imported_one"}),
    );
    assert_eq!(l.status, 200, "{}", l.body);
    let rec = l.json();
    assert_eq!(rec["id"], "key_01");
    assert_eq!(rec["name"], "imported");
    assert_eq!(rec["expires_at"], "2100-01-01T00:00:00Z");
    assert_eq!(rec["last_used_at"], "2026-01-01T00:00:00Z");
    assert_eq!(rec["prefix"], Value::Null);
    // org-9 was missing from owners: its key stays invalid (owner disabled).
    assert_eq!(s.get("/v1/admin/owners/org-9").json()["status"], "disabled");
    let (e, b) = s.document();
    let d = check_document(&e, &b);
    assert_eq!(d["keys"].as_array().unwrap().len(), 2);
    assert_eq!(doc_key(&d, "key_01").unwrap()["hash"], h1);
    // Re-import is idempotent.
    let r = s.send("POST", "/v1/admin/import", &doc);
    assert_eq!(
        r.json()["keys"],
        json!({"created": 0, "updated": 2, "skipped": 1})
    );
    // A different key under an existing id is refused, nothing changed.
    let clash = json!({"keys": [{"id": "key_02", "hash": sha256_hex("other"), "owner": "o"},
                                {"id": "key_04", "hash": sha256_hex("four"), "owner": "o"}]});
    s.send("POST", "/v1/admin/import", &clash)
        .error(409, "conflict");
    s.get("/v1/admin/keys/key_04").error(404, "not_found");
    // Export: a §2 document with metadata, importable elsewhere.
    let x = s.get("/v1/admin/export");
    assert_eq!(x.status, 200);
    keygate_core::keylist::parse(&x.bytes).unwrap();
    let xv = x.json();
    assert_eq!(doc_key(&xv, "key_01").unwrap()["name"], "imported");
    assert_eq!(
        xv["owners"]["org-7"]["rate_limits"],
        json!([{"limit": 9, "window_s": 9}])
    );
    s.stop();
    let (_d2, db2) = sqlite();
    let s2 = Server::start(&db2);
    let r = s2.raw("POST", "/v1/admin/import", Some(ADMIN), Some(&x.body), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let l = s2.send(
        "POST",
        "/v1/admin/keys/lookup",
        &json!({"key": "ak_imported_two"}),
    );
    assert_eq!(l.json()["id"], "key_02");
    s2.stop();
}

/// A service that purges revoked and rotated-out keys after 1 s, checking every second.
fn purging(db: &str) -> Server {
    Server::start_with(
        db,
        Options {
            retention_s: 1,
            purge_interval_s: 1,
            ..Options::default()
        },
    )
}

pub fn retention(db: &str) {
    retention_with(db, || {});
}

/// `retention`, with `started` called once the service serves its first document (the
/// PostgreSQL test holds the builder back there).
pub fn retention_with(db: &str, started: impl FnOnce()) {
    let s = purging(db);
    started();
    let (a, _) = s.create(json!({"owner": "o"}));
    let (b, _) = s.create(json!({"owner": "o"}));
    let (c, _) = s.create(json!({"owner": "o"}));
    let (a, b, c) = (
        a["id"].as_str().unwrap(),
        b["id"].as_str().unwrap(),
        c["id"].as_str().unwrap(),
    );
    for (id, status) in [(a, "revoked"), (b, "disabled")] {
        let r = s.send(
            "PATCH",
            &format!("/v1/admin/keys/{id}"),
            &json!({"status": status}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = s.send(
        "POST",
        &format!("/v1/admin/keys/{c}/rotate"),
        &json!({"overlap_s": 0}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let new = r.json()["id"].as_str().unwrap().to_string();
    // First the document with every change above (documents follow the generation, so every
    // later one has them too): a document served before the keys were created also lacks a
    // and c, and waiting only for their absence could return it (under load, with the builder
    // behind, that is what happened: the disabled key "missing" was never in it yet).
    s.wait_document(Duration::from_secs(6), |d| doc_key(d, &new).is_some());
    // Revoked and expired keys leave after the retention period; disabled ones stay.
    let (e, d) = s.wait_document(Duration::from_secs(6), |d| {
        doc_key(d, a).is_none() && doc_key(d, c).is_none()
    });
    assert!(doc_key(&d, b).is_some(), "disabled key {b} missing: {d}");
    assert_eq!(d["keys"].as_array().unwrap().len(), 2);
    let (_, bytes) = s.document();
    check_document(&e, &bytes);
    // The records stay readable.
    assert_eq!(
        s.get(&format!("/v1/admin/keys/{a}")).json()["status"],
        "revoked"
    );
    s.stop();
}

pub fn concurrent(db: &str, servers: &[&Server]) {
    let threads = 8;
    let per = 15;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let s = servers[t % servers.len()];
            scope.spawn(move || {
                for i in 0..per {
                    let (rec, _) =
                        s.create(json!({"owner": format!("t{t}"), "name": format!("{t}-{i}")}));
                    let id = rec["id"].as_str().unwrap();
                    let r = s.send(
                        "PATCH",
                        &format!("/v1/admin/keys/{id}"),
                        &json!({"scopes": [format!("s{i}")]}),
                    );
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            });
        }
    });
    let _ = db;
    let s = servers[0];
    let all = s.get("/v1/admin/keys?limit=1000").json();
    let keys = all["keys"].as_array().unwrap();
    assert_eq!(keys.len(), threads * per);
    for k in keys {
        let name = k["name"].as_str().unwrap();
        let i: usize = name.split('-').nth(1).unwrap().parse().unwrap();
        assert_eq!(k["scopes"], json!([format!("s{i}")]), "{k}");
    }
    for srv in servers {
        // Every change is in the document within 1 s.
        let (e, _) = srv.wait_document(Duration::from_secs(1), |d| {
            let keys = d["keys"].as_array().unwrap();
            keys.len() == threads * per
                && keys
                    .iter()
                    .all(|k| k["scopes"].as_array().map(|a| a.len()) == Some(1))
        });
        let (e2, bytes) = srv.document();
        assert_eq!(e, e2);
        check_document(&e2, &bytes);
    }
}

/// The document a service built change by change (creates, updates, disables, rotates,
/// deletes, owner and plan changes, an import, retention purges) is byte for byte, ETag
/// included, the one a service started afterwards builds whole.
pub fn incremental_matches_full(db: &str) {
    let s = purging(db);
    let ok = |r: Resp, status: u16| assert_eq!(r.status, status, "{}", r.body);
    ok(
        s.send(
            "PUT",
            "/v1/admin/plans/gold",
            &json!({"rate_limits": [{"limit": 5, "window_s": 1}]}),
        ),
        201,
    );
    let mut ids = Vec::new();
    for i in 0..40 {
        let (rec, _) = s.create(json!({"owner": format!("o{}", i % 4), "scopes": ["a:*"]}));
        ids.push(rec["id"].as_str().unwrap().to_string());
    }
    for (i, id) in ids.iter().enumerate() {
        let path = format!("/v1/admin/keys/{id}");
        match i % 8 {
            0 => ok(s.send("PATCH", &path, &json!({"status": "disabled"})), 200),
            1 => ok(s.send("PATCH", &path, &json!({"status": "revoked"})), 200),
            2 => ok(
                s.send("POST", &format!("{path}/rotate"), &json!({"overlap_s": 0})),
                201,
            ),
            3 => ok(s.send("DELETE", &path, &json!({})), 204),
            4 => ok(
                s.send("PATCH", &path, &json!({"plan": "gold", "sites": ["1"]})),
                200,
            ),
            5 => ok(
                s.send("PATCH", &path, &json!({"allowed_ips": ["10.0.0.0/8"]})),
                200,
            ),
            _ => {}
        }
    }
    ok(
        s.send(
            "PUT",
            "/v1/admin/owners/o1",
            &json!({"status": "disabled", "rate_limits": [{"limit": 9, "window_s": 60}]}),
        ),
        200,
    );
    ok(
        s.send("PUT", "/v1/admin/plans/spare", &json!({"rate_limits": []})),
        201,
    );
    ok(s.send("DELETE", "/v1/admin/plans/spare", &json!({})), 204);
    let keys: Vec<Value> = (0..5)
        .map(|i| json!({"id": format!("imp{i}"), "hash": sha256_hex(&format!("imp{i}")), "owner": "o2"}))
        .collect();
    ok(
        s.send("POST", "/v1/admin/import", &json!({"keys": keys})),
        200,
    );
    // The retention purge (1 s) takes the revoked and rotated-out keys out, and drops the
    // deleted rows.
    s.wait_document(Duration::from_secs(6), |d| {
        doc_key(d, "imp4").is_some()
            && doc_key(d, &ids[1]).is_none()
            && doc_key(d, &ids[2]).is_none()
    });
    std::thread::sleep(Duration::from_millis(1500));
    // Once both serve the same generation, they serve the same bytes.
    let fresh = Server::start(db);
    let generation = |s: &Server| s.get("/healthz").json()["generation"].as_i64().unwrap();
    let t = std::time::Instant::now();
    loop {
        let (ga, gb) = (generation(&s), generation(&fresh));
        if ga == gb {
            let (ea, ba) = s.document();
            let (eb, bb) = fresh.document();
            if generation(&s) == ga && generation(&fresh) == gb {
                assert!(ba == bb, "incremental and full builds differ");
                assert_eq!(ea, eb);
                check_document(&ea, &ba);
                break;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "generations {ga} and {gb}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    fresh.stop();
    s.stop();
}
