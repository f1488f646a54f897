//! Hostile and odd input from the field (issue 12), one kind per section, each as a kind rather
//! than the one example that was reported: SPEC §2 JSON rules (duplicate members, trailing data,
//! unknown members, byte-order mark) for the key list — through the whole-document entry and the
//! chunked streaming reader, whatever the chunk size — and for the plugin configuration.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use keygate_core::{config, keylist, scan};

const H1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const H2: &str = "60303AE22B998861BCE3B28F33EEC1BE758A213C86C93C076DBE9F558C11C752";

/// The answer of the streaming reader for every chunk size worth trying, checked to be the
/// answer of the whole-document parser.
fn list(doc: &str) -> Result<usize, String> {
    let whole = keylist::parse(doc.as_bytes())
        .map(|l| l.len())
        .map_err(|e| e.to_string());
    for chunk in [1, 2, 3, 5, 7, 64, 4096] {
        let streamed = keylist::read(
            &mut scan::Slice {
                data: doc.as_bytes(),
                chunk,
            },
            doc.len(),
        )
        .map(|l| l.len())
        .map_err(|e| e.to_string());
        assert_eq!(streamed, whole, "chunk {chunk}: {doc}");
    }
    whole
}

fn rejected(doc: &str, needles: &[&str]) {
    let e = list(doc).expect_err(doc);
    for n in needles {
        assert!(e.contains(n), "error {e:?} for {doc} lacks {n:?}");
    }
}

fn key(extra: &str) -> String {
    format!(r#"{{"id":"a","hash":"{H1}","owner":"o"{extra}}}"#)
}

// ---- duplicate members, at any depth ----------------------------------------------------------

#[test]
fn a_member_named_twice_rejects_the_list_at_any_depth() {
    let k = key("");
    for (doc, needles) in [
        // The reported case, both orders: which copy would win no longer matters.
        (
            format!(
                r#"{{"owners":{{"org-d":{{"status":"disabled"}},"org-d":{{}}}},"keys":[{k}]}}"#
            ),
            &["owners", "duplicate field `org-d`"][..],
        ),
        (
            format!(
                r#"{{"owners":{{"org-d":{{}},"org-d":{{"status":"disabled"}}}},"keys":[{k}]}}"#
            ),
            &["owners", "duplicate field `org-d`"],
        ),
        // Spelt differently, equal once unescaped.
        (
            format!(r#"{{"owners":{{"o":{{}},"\u006f":{{}}}},"keys":[{k}]}}"#),
            &["owners", "duplicate field `o`"],
        ),
        (
            format!(r#"{{"plans":{{"p":{{}},"p":{{}}}},"keys":[{k}]}}"#),
            &["plans", "`p`"],
        ),
        (
            format!(
                r#"{{"owners":{{"o":{{"status":"active","status":"disabled"}}}},"keys":[{k}]}}"#
            ),
            &["owners.o", "`status`"],
        ),
        (
            format!(r#"{{"plans":{{"p":{{"rate_limits":[],"rate_limits":[]}}}},"keys":[{k}]}}"#),
            &["plans.p", "`rate_limits`"],
        ),
        (
            format!(r#"{{"version":"1","keys":[{k}],"version":"2"}}"#),
            &["`version`"],
        ),
        (format!(r#"{{"keys":[{k}],"keys":[]}}"#), &["`keys`"]),
        (
            format!(r#"{{"meta":{{"a":{{"b":[{{"c":1,"c":2}}]}}}},"keys":[{k}]}}"#),
            &["meta.a.b[0]", "`c`"],
        ),
        (
            format!(r#"{{"meta":1,"meta":2,"keys":[{k}]}}"#),
            &["`meta`"],
        ),
        (
            format!(r#"{{"keys":[{}]}}"#, key(r#","owner":"p""#)),
            &["keys[0]", "`owner`"],
        ),
        (
            format!(
                r#"{{"keys":[{}]}}"#,
                key(r#","status":"revoked","status":"active""#)
            ),
            &["keys[0]", "`status`"],
        ),
        (
            format!(
                r#"{{"keys":[{}]}}"#,
                key(r#","allowed_ips":["10.0.0.0/8"],"allowed_ips":[]"#)
            ),
            &["keys[0]", "`allowed_ips`"],
        ),
        (
            format!(
                r#"{{"keys":[{}]}}"#,
                key(r#","expires_at":1,"expires_at":2"#)
            ),
            &["keys[0]", "`expires_at`"],
        ),
        (
            format!(
                r#"{{"keys":[{}]}}"#,
                key(r#","rate_limits":[{"limit":1,"window_s":9,"window_s":1}]"#)
            ),
            &["keys[0].rate_limits[0]", "`window_s`"],
        ),
        (
            format!(r#"{{"keys":[{}]}}"#, key(r#","meta":{"x":1,"x":1}"#)),
            &["keys[0].meta", "`x`"],
        ),
        (
            format!(
                r#"{{"keys":[{}]}}"#,
                key(r#","created_at":"a","created_at":"b""#)
            ),
            &["keys[0]", "`created_at`"],
        ),
        (
            format!(
                r#"{{"keys":[{}]}}"#,
                key(r#","description":[{"a":{"b":1,"b":1}}]"#)
            ),
            &["keys[0].description[0].a", "`b`"],
        ),
    ] {
        rejected(&doc, needles);
    }
}

// ---- trailing data ----------------------------------------------------------------------------

#[test]
fn anything_but_whitespace_after_the_document_rejects_it() {
    let good = format!(r#"{{"keys":[{}]}}"#, key(""));
    assert_eq!(list(&good), Ok(1));
    assert_eq!(list(&format!("{good} \n\t\r\n")), Ok(1));
    assert_eq!(list(&format!(" \n{good}")), Ok(1));
    for tail in [
        " garbage", "x", "{}", "[]", "0", "\"s\"", "}", "]", ",", " null", "\0",
    ] {
        rejected(
            &format!("{good}{tail}"),
            &["invalid JSON", "trailing characters"],
        );
    }
    rejected(
        r#"{"keys":[]} garbage"#,
        &["trailing characters at line 1 column 13"],
    );
    rejected(
        &format!("{good}\n\n  x"),
        &["trailing characters at line 3 column 3"],
    );
}

#[test]
fn a_leading_byte_order_mark_is_ignored_once() {
    let good = format!(r#"{{"keys":[{}]}}"#, key(""));
    assert_eq!(list(&format!("\u{feff}{good}")), Ok(1));
    assert_eq!(list(&format!("\u{feff} \n{good}")), Ok(1));
    rejected(&format!("\u{feff}\u{feff}{good}"), &["invalid JSON"]);
    rejected(&format!(" \u{feff}{good}"), &["invalid JSON"]);
    rejected(&format!("{good}\u{feff}"), &["trailing characters"]);
    // A mark cut short is not one.
    rejected(&format!("\u{ef}{good}"), &["invalid JSON"]);
    let mut cut = b"\xEF\xBB".to_vec();
    cut.extend_from_slice(good.as_bytes());
    assert!(keylist::parse(&cut).is_err());
}

// ---- unknown members --------------------------------------------------------------------------

#[test]
fn only_documented_members_and_metadata_are_accepted() {
    // The reported case: a misspelt restriction must never load as an unrestricted key.
    rejected(
        &format!(r#"{{"keys":[{}]}}"#, key(r#","alowed_ips":["10.0.0.0/8"]"#)),
        &["keys[0].alowed_ips", "unknown field `alowed_ips`"],
    );
    for (doc, path) in [
        (
            format!(r#"{{"keys":[{}]}}"#, key(r#","scope":["a"]"#)),
            "keys[0].scope",
        ),
        (
            format!(r#"{{"keys":[{}]}}"#, key(r#","Status":"revoked""#)),
            "keys[0].Status",
        ),
        (
            format!(
                r#"{{"keys":[{}]}}"#,
                key(r#","expires":"2020-01-01T00:00:00Z""#)
            ),
            "keys[0].expires",
        ),
        (
            format!(
                r#"{{"keys":[{}, {}]}}"#,
                key(""),
                key(r#","site":"1""#)
                    .replace(H1, H2)
                    .replace("\"a\"", "\"b\"")
            ),
            "keys[1].site",
        ),
        (
            format!(
                r#"{{"keys":[{}]}}"#,
                key(r#","rate_limits":[{"limit":1,"window_s":1,"burst":5}]"#)
            ),
            "keys[0].rate_limits[0].burst",
        ),
        (format!(r#"{{"keys":[{}],"owner":{{}}}}"#, key("")), "owner"),
        (format!(r#"{{"Keys":[],"keys":[{}]}}"#, key("")), "Keys"),
        (
            format!(
                r#"{{"owners":{{"o":{{"state":"active"}}}},"keys":[{}]}}"#,
                key("")
            ),
            "owners.o.state",
        ),
        (
            format!(
                r#"{{"owners":{{"o":{{"meta":{{}}}}}},"keys":[{}]}}"#,
                key("")
            ),
            "owners.o.meta",
        ),
        (
            format!(
                r#"{{"plans":{{"p":{{"limits":[]}}}},"keys":[{}]}}"#,
                key("")
            ),
            "plans.p.limits",
        ),
        (
            format!(
                r#"{{"plans":{{"p":{{"rate_limits":[{{"limit":1,"window":1}}]}}}},"keys":[{}]}}"#,
                key("")
            ),
            "plans.p.rate_limits[0].window",
        ),
        (
            format!(
                r#"{{"owners":{{"o":{{"rate_limits":[{{"limit":1,"window_s":1,"x":0}}]}}}},"keys":[{}]}}"#,
                key("")
            ),
            "owners.o.rate_limits[0].x",
        ),
    ] {
        rejected(&doc, &[path, "unknown field"]);
    }
}

#[test]
fn metadata_members_are_accepted_with_any_value() {
    let doc = format!(
        r#"{{"meta":{{"generated_by":"ops","n":[1,{{"a":null}}]}},"version":"v","keys":[{},{}]}}"#,
        key(
            r#","meta":{"team":"x"},"name":"ci","description":"the CI key","created_at":"2026-01-01T00:00:00Z","updated_at":null,"last_used_at":1767225600"#
        ),
        key(r#","name":null,"description":{"any":["json"]},"meta":[]"#)
            .replace(H1, H2)
            .replace("\"a\"", "\"b\"")
    );
    assert_eq!(list(&doc), Ok(2));
}

#[test]
fn owners_may_carry_rate_limits_validated_like_a_keys() {
    let doc = |limits: &str| {
        format!(
            r#"{{"owners":{{"o":{{"status":"active","rate_limits":{limits}}}}},"keys":[{}]}}"#,
            key("")
        )
    };
    assert_eq!(list(&doc(r#"[{"limit":100,"window_s":60}]"#)), Ok(1));
    assert_eq!(list(&doc("[]")), Ok(1));
    assert_eq!(list(&doc("null")), Ok(1));
    rejected(
        &doc(r#"[{"limit":1,"window_s":0}]"#),
        &["owners.o.rate_limits[0].window_s", "out of range"],
    );
    rejected(
        &doc(r#"[{"limit":1}]"#),
        &["owners.o.rate_limits[0]", "missing field `window_s`"],
    );
    rejected(&doc(r#""many""#), &["owners.o.rate_limits", "invalid type"]);
}

// ---- typed errors -----------------------------------------------------------------------------

#[test]
fn errors_carry_the_path_and_the_message_apart() {
    let e =
        keylist::parse(format!(r#"{{"keys":[{},{}]}}"#, key(""), key("")).as_bytes()).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("keys[1].id", r#"duplicate id "a""#)
    );
    assert_eq!(e.to_string(), r#"keys[1].id: duplicate id "a""#);
    let e = keylist::parse(b"{").unwrap_err();
    assert_eq!(e.path, "");
    assert!(e.message.starts_with("invalid JSON: EOF"), "{e}");
    let e = config::parse(br#"{"key_list":{"cluster":"k","path":"/","refresh_s":0}}"#).unwrap_err();
    assert_eq!(e.path, "key_list.refresh_s");
    assert_eq!(e.message, "0 is out of range 1..=86400");
    let e =
        config::parse(br#"{"key_list":{"cluster":"k","path":"/"},"ip_allow":["x"]}"#).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("ip_allow[0]", r#"invalid CIDR "x""#)
    );
}

// ---- the plugin configuration follows the same rules ------------------------------------------

const CFG: &str = r#"{"key_list":{"cluster":"k","path":"/v1/keys"}}"#;

fn cfg_err(json: &str, needles: &[&str]) {
    let e = config::parse(json.as_bytes())
        .map(|_| ())
        .expect_err(json)
        .to_string();
    for n in needles {
        assert!(e.contains(n), "error {e:?} for {json} lacks {n:?}");
    }
}

#[test]
fn the_configuration_rejects_trailing_data_and_repeated_members() {
    assert!(config::parse(CFG.as_bytes()).is_ok());
    assert!(config::parse(format!("{CFG}\n  \t").as_bytes()).is_ok());
    assert!(config::parse(format!("\u{feff}{CFG}").as_bytes()).is_ok());
    for tail in [" x", "{}", ",", "]", "\"k\""] {
        cfg_err(
            &format!("{CFG}{tail}"),
            &["invalid JSON", "trailing characters"],
        );
    }
    cfg_err(&format!("\u{feff}\u{feff}{CFG}"), &["invalid JSON"]);
    let base = r#""key_list":{"cluster":"k","path":"/v1/keys"}"#;
    for (json, needles) in [
        (format!(r#"{{{base},{base}}}"#), &["duplicate field `key_list`"][..]),
        (
            r#"{"key_list":{"cluster":"a","cluster":"b","path":"/"}}"#.to_string(),
            &["key_list", "duplicate field `cluster`"],
        ),
        (
            r#"{"key_list":{"cluster":"k","path":"/","headers":{"authorization":"a","authorization":"b"}}}"#.to_string(),
            &["key_list.headers", "duplicate field `authorization`"],
        ),
        (
            format!(r#"{{{base},"errors":{{"missing_key":{{"status":401}},"missing_key":{{"status":200}}}}}}"#),
            &["errors", "duplicate field `missing_key`"],
        ),
        (
            format!(r#"{{{base},"errors":{{"missing_key":{{"headers":{{"x":"1","x":"2"}}}}}}}}"#),
            &["errors.missing_key.headers", "duplicate field `x`"],
        ),
        (
            format!(r#"{{{base},"credentials":[{{"header":"a","header":"b"}}]}}"#),
            &["credentials[0]", "duplicate field `header`"],
        ),
        (
            format!(r#"{{{base},"rate_limit":{{"default":[{{"limit":1,"limit":2,"window_s":1}}]}}}}"#),
            &["rate_limit.default[0]", "duplicate field `limit`"],
        ),
        (
            format!(r#"{{{base},"upstream":{{"key_id_header":null,"key_id_header":"x"}}}}"#),
            &["upstream", "duplicate field `key_id_header`"],
        ),
        (
            format!(r#"{{{base},"exempt":[{{"path_prefix":"/a","path_prefix":"/b"}}]}}"#),
            &["exempt[0]", "duplicate field `path_prefix`"],
        ),
        (format!(r#"{{{base},"meta":{{}}}}"#), &["unknown field `meta`"]),
        (format!(r#"{{{base},"exempts":[]}}"#), &["unknown field `exempts`"]),
        (
            format!(r#"{{{base},"routes":[{{"path_prefix":"/a","scopes":"x"}}]}}"#),
            &["routes[0]", "unknown field `scopes`"],
        ),
    ] {
        cfg_err(&json, needles);
    }
}

// ---- decisions: a small gate over the in-memory store -----------------------------------------

mod gate {
    use keygate_core::config::{self, Config};
    use keygate_core::counters;
    use keygate_core::decision::{decide, ListState, Outcome, Request};
    use keygate_core::publish::{self, Publisher};
    use keygate_core::shared::MemoryStore;
    use sha2::{Digest, Sha256};
    use std::net::IpAddr;

    pub const NOW: u64 = 1_800_057_610;

    pub fn hex(s: &str) -> String {
        Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub struct Gate {
        pub cfg: Config,
        store: MemoryStore,
        list: ListState,
    }

    impl Gate {
        /// `cfg_extra` is spliced into a configuration with the `keyservice` key list; `keys`
        /// are `(id, plaintext, extra JSON members)`.
        pub fn new(cfg_extra: &str, keys: &[(&str, &str, &str)]) -> Gate {
            let cfg = config::parse(
                format!(
                    r#"{{"key_list":{{"cluster":"keyservice","path":"/v1/keys"}}{cfg_extra}}}"#
                )
                .as_bytes(),
            )
            .unwrap();
            let keys: Vec<String> = keys
                .iter()
                .map(|(id, k, extra)| {
                    format!(r#"{{"id":"{id}","hash":"{}","owner":"o"{extra}}}"#, hex(k))
                })
                .collect();
            let mut list = keygate_core::keylist::parse(
                format!(r#"{{"keys":[{}]}}"#, keys.join(",")).as_bytes(),
            )
            .unwrap();
            let store = MemoryStore::default();
            counters::ensure_counter_slots(&store);
            Publisher::default().publish(&store, &mut list, None, &cfg.key_list.source_id(), NOW);
            let list = ListState::from_meta(
                publish::read_meta(&store).as_ref(),
                &cfg.key_list.source_id(),
            );
            Gate { cfg, store, list }
        }

        pub fn run(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Outcome {
            let mut h: Vec<(String, Vec<u8>)> = vec![
                (":method".into(), method.as_bytes().to_vec()),
                (":path".into(), path.as_bytes().to_vec()),
            ];
            h.extend(
                headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
            );
            let source = || Some(IpAddr::from([127, 0, 0, 1]));
            let refs = keygate_core::decision::header_refs(&h);
            let req = Request {
                headers: &refs,
                source: &source,
            };
            decide(&self.cfg, &mut self.list, &self.store, &req, NOW)
        }
    }
}

use gate::Gate;
use keygate_core::decision::Kind;
use keygate_core::response::Class;

fn header<'a>(o: &'a keygate_core::decision::Outcome, name: &str) -> Option<&'a str> {
    o.reply
        .as_ref()?
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

// ---- path parameters --------------------------------------------------------------------------

#[test]
fn path_parameters_cannot_move_a_request_under_an_exempt_prefix() {
    let mut g = Gate::new(
        r#","exempt":[{"path_prefix":"/public"}],"routes":[{"path_prefix":"/admin","scope":"admin"}],"site":{"path_segment":2}"#,
        &[
            ("user", "ak_user", r#","scopes":["read"]"#),
            ("adm", "ak_admin", r#","scopes":["admin"]"#),
        ],
    );
    for p in [
        "/public/..;/admin/users",
        "/public/..;x=1/admin/users",
        "/public/..;/..;/admin",
        "/public;a/..;b/admin;c/users",
        "/public/.;/..;/admin",
        "/public\\..;\\admin",
        "/public/%2e%2e;/admin",
        "/public/..;/admin?x=/public",
    ] {
        assert_eq!(
            g.run("GET", p, &[]).kind,
            Kind::Refused(Class::MissingKey),
            "{p}"
        );
        assert_eq!(
            g.run("GET", p, &[("x-api-key", "ak_user")]).kind,
            Kind::Refused(Class::Forbidden),
            "{p}"
        );
        assert_eq!(
            g.run("GET", p, &[("x-api-key", "ak_admin")]).kind,
            Kind::Allowed,
            "{p}"
        );
    }
    // Parameters on an exempt path do not stop it being exempt; `%3B` is no delimiter.
    assert_eq!(
        g.run("GET", "/public;jsessionid=1/doc", &[]).kind,
        Kind::Exempt
    );
    assert_eq!(
        g.run("GET", "/admin;x/users", &[("x-api-key", "ak_user")])
            .kind,
        Kind::Refused(Class::Forbidden)
    );
    assert_eq!(
        g.run("GET", "/public%3B/../admin", &[]).kind,
        Kind::Refused(Class::MissingKey)
    );
    assert_eq!(
        g.run("GET", "/public%3B/x", &[]).kind,
        Kind::Refused(Class::MissingKey)
    );
}

// ---- ambiguous credentials --------------------------------------------------------------------

#[test]
fn a_credential_given_more_than_once_is_an_invalid_key_whatever_the_order() {
    let mut g = Gate::new(
        r#","credentials":[{"header":"x-api-key"},{"header":"authorization","scheme":"Bearer"},{"query":"api_key"}]"#,
        &[("k1", "ak_good", ""), ("k2", "ak_other", "")],
    );
    let invalid = Kind::Refused(Class::InvalidKey);
    for headers in [
        &[("x-api-key", "ak_good"), ("x-api-key", "bogus")][..],
        &[("x-api-key", "bogus"), ("x-api-key", "ak_good")],
        &[("x-api-key", "ak_good"), ("x-api-key", "ak_good")],
        &[("x-api-key", "ak_good"), ("x-api-key", "ak_other")],
        &[("x-api-key", "ak_good"), ("x-api-key", "")],
        &[("x-api-key", "ak_good, bogus")],
        &[("x-api-key", "bogus,ak_good")],
        &[("x-api-key", "ak_good,")],
        &[
            ("authorization", "Bearer ak_good"),
            ("authorization", "Bearer bogus"),
        ],
        &[("authorization", "Bearer ak_good, Bearer bogus")],
        &[
            ("authorization", "Basic Zm9vOmJhcg=="),
            ("authorization", "Bearer ak_good"),
        ],
    ] {
        let o = g.run("GET", "/x", headers);
        assert_eq!(o.kind, invalid, "{headers:?}");
        assert!(o.key_id.is_none());
    }
    for q in [
        "api_key=ak_good&api_key=bogus",
        "api_key=bogus&api_key=ak_good",
        "api_key=ak_good&api%5Fkey=ak_good",
        "api_key=ak_good&api_key=",
    ] {
        assert_eq!(g.run("GET", &format!("/x?{q}"), &[]).kind, invalid, "{q}");
    }
    // Once: fine. The first source present is the one that counts.
    assert_eq!(
        g.run("GET", "/x", &[("x-api-key", "ak_good")]).kind,
        Kind::Allowed
    );
    assert_eq!(
        g.run("GET", "/x?api_key=a&api_key=b", &[("x-api-key", "ak_good")])
            .kind,
        Kind::Allowed
    );
    assert_eq!(
        g.run(
            "GET",
            "/x",
            &[("x-api-key", "ak_good"), ("authorization", "Bearer x")]
        )
        .kind,
        Kind::Allowed
    );
}

#[test]
fn ambiguous_credentials_count_against_the_invalid_key_limit() {
    let mut g = Gate::new(
        r#","invalid_key_limit":{"limit":3,"window_s":60}"#,
        &[("k1", "ak_good", "")],
    );
    let twice = [("x-api-key", "ak_good"), ("x-api-key", "ak_good")];
    for _ in 0..3 {
        assert_eq!(
            g.run("GET", "/x", &twice).kind,
            Kind::Refused(Class::InvalidKey)
        );
    }
    let o = g.run("GET", "/x", &twice);
    assert_eq!(o.kind, Kind::Refused(Class::RateLimited));
    assert!(header(&o, "retry-after").is_some());
    assert_eq!(
        g.run("GET", "/x", &[("x-api-key", "ak_good")]).kind,
        Kind::Refused(Class::RateLimited)
    );
}

// ---- `+` in a query credential ----------------------------------------------------------------

#[test]
fn a_query_credential_is_percent_decoded_only() {
    let mut g = Gate::new(
        r#","credentials":[{"query":"api_key"}]"#,
        &[
            ("plus", "ak_x+y", ""),
            ("space", "ak_x y", ""),
            ("pct", "ak_%41", ""),
        ],
    );
    let run = |g: &mut Gate, q: &str| {
        let o = g.run("GET", &format!("/x?{q}"), &[]);
        (o.kind, o.key_id)
    };
    assert_eq!(
        run(&mut g, "api_key=ak_x+y"),
        (Kind::Allowed, Some("plus".into()))
    );
    assert_eq!(
        run(&mut g, "api_key=ak_x%2By"),
        (Kind::Allowed, Some("plus".into()))
    );
    assert_eq!(
        run(&mut g, "api_key=ak_x%2by"),
        (Kind::Allowed, Some("plus".into()))
    );
    assert_eq!(
        run(&mut g, "api_key=ak_x%20y"),
        (Kind::Allowed, Some("space".into()))
    );
    assert_eq!(
        run(&mut g, "api_key=ak_%2541"),
        (Kind::Allowed, Some("pct".into()))
    );
    assert_eq!(
        run(&mut g, "api_key=ak_%41").0,
        Kind::Refused(Class::InvalidKey)
    );
    // The parameter is stripped before going upstream, `+` and all.
    let o = g.run("GET", "/x?a=1&api_key=ak_x+y&b=c+d", &[]);
    assert_eq!(o.new_path.as_deref(), Some("/x?a=1&b=c+d"));
}

// ---- WWW-Authenticate -------------------------------------------------------------------------

#[test]
fn unauthorized_answers_carry_a_challenge_from_the_sources() {
    let keys = [
        ("k1", "ak_good", ""),
        ("old", "ak_old", r#","status":"revoked""#),
    ];
    let mut g = Gate::new("", &keys);
    let missing = g.run("GET", "/x", &[]);
    assert_eq!(missing.kind, Kind::Refused(Class::MissingKey));
    assert_eq!(
        header(&missing, "www-authenticate"),
        Some(r#"ApiKey realm="keygate", header="x-api-key", Bearer realm="keygate""#)
    );
    let invalid = g.run("GET", "/x", &[("x-api-key", "nope")]);
    assert_eq!(
        header(&invalid, "www-authenticate"),
        Some(
            r#"ApiKey realm="keygate", header="x-api-key", Bearer realm="keygate", error="invalid_token""#
        )
    );
    let expired = g.run("GET", "/x", &[("authorization", "Bearer ak_old")]);
    assert_eq!(expired.kind, Kind::Refused(Class::ExpiredKey));
    assert_eq!(
        header(&expired, "www-authenticate"),
        header(&invalid, "www-authenticate")
    );
    // Not on other classes.
    let mut g = Gate::new(r#","ip_deny":["127.0.0.0/8"]"#, &keys);
    assert_eq!(header(&g.run("GET", "/x", &[]), "www-authenticate"), None);

    let mut g = Gate::new(
        r#","credentials":[{"query":"api_key"},{"header":"authorization","scheme":"Token"},{"header":"x-auth","scheme":"Key"}]"#,
        &keys,
    );
    assert_eq!(
        header(&g.run("GET", "/x", &[]), "www-authenticate"),
        Some(
            r#"ApiKey realm="keygate", query="api_key", Token realm="keygate", ApiKey realm="keygate", header="x-auth", scheme="Key""#
        )
    );
}

#[test]
fn an_override_replaces_the_challenge() {
    let keys = [("k1", "ak_good", "")];
    let mut g = Gate::new(
        r#","errors":{"missing_key":{"headers":{"WWW-Authenticate":"Custom realm=\"api\""}},"invalid_key":{"headers":{"www-authenticate":""}},"expired_key":{"status":403}}"#,
        &keys,
    );
    let o = g.run("GET", "/x", &[]);
    let all: Vec<_> = o
        .reply
        .as_ref()
        .unwrap()
        .headers
        .iter()
        .filter(|(k, _)| k == "www-authenticate")
        .collect();
    assert_eq!(all.len(), 1);
    assert_eq!(
        header(&o, "www-authenticate"),
        Some(r#"Custom realm="api""#)
    );
    assert_eq!(
        header(
            &g.run("GET", "/x", &[("x-api-key", "x")]),
            "www-authenticate"
        ),
        None
    );
    assert!(g
        .cfg
        .response(Class::ExpiredKey)
        .headers
        .iter()
        .any(|(k, _)| k == "www-authenticate"));
}
