//! Shadow mode (`shadow`, an extension): a shadowed check's refusal is decided and reported as
//! `Kind::Shadow(class)`, and the request goes on as if the check had passed.

use crate::fixtures::*;

fn shadow_all() -> Value {
    json!({"shadow": true})
}

#[test]
fn config_accepts_a_boolean_or_an_object_of_booleans() {
    let c = config(json!({"shadow": {"ip": true, "rate_limits": true}}));
    assert!(c.shadow.ip && c.shadow.rate_limits && !c.shadow.scopes && !c.shadow.keys);
    let c = config(shadow_all());
    assert!(c.shadow.ip && c.shadow.rate_limits && c.shadow.scopes && c.shadow.keys);
    assert!(!config(json!({})).shadow.any());
    for bad in [
        r#"{"shadow":{"ip":1}}"#,
        r#"{"shadow":{"ips":true}}"#,
        r#"{"shadow":"yes"}"#,
        r#"{"shadow":{"ip":true,"ip":false}}"#,
    ] {
        let doc = format!(r#"{{"key_list":{{"cluster":"k","path":"/"}},{}"#, &bad[1..]);
        let e = keygate_core::config::parse(doc.as_bytes()).unwrap_err();
        assert!(e.to_string().starts_with("shadow"), "{bad}: {e}");
    }
}

#[test]
fn global_ip_lists_shadowed_go_on_with_identity() {
    let mut g = Gate::with_key(
        json!({"ip_allow": ["10.0.0.0/8"], "shadow": {"ip": true}}),
        json!({}),
    );
    let o = g.run(&get("/v1/x").key(KEY));
    assert_eq!(o.kind, Kind::Shadow(Class::IpDenied), "{o:?}");
    assert!(o.reply.is_none());
    assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
    assert!(o
        .set_headers
        .iter()
        .any(|(k, v)| k == "x-api-key-id" && v == KEY_ID));
    assert!(o.remove_headers.iter().any(|h| h == "x-api-key"));
    // The other checks still refuse.
    let o = g.run(&get("/v1/x").key("ak_nope"));
    assert_eq!(o.kind, Kind::Refused(Class::InvalidKey));
    let o = g.run(&get("/v1/x"));
    assert_eq!(o.kind, Kind::Refused(Class::MissingKey));
}

#[test]
fn key_ip_list_shadowed() {
    let mut g = Gate::with_key(
        json!({"shadow": {"ip": true}}),
        json!({"allowed_ips": ["10.0.0.0/8"]}),
    );
    let o = g.run(&get("/v1/x").key(KEY));
    assert_eq!(o.kind, Kind::Shadow(Class::IpDenied), "{o:?}");
    assert!(o.set_headers.iter().any(|(k, _)| k == "x-api-key-id"));
}

#[test]
fn scopes_and_sites_shadowed() {
    let cfg = json!({
        "routes": [{"path_prefix": "/v1/admin", "scope": "admin"}],
        "site": {"path_segment": 2},
        "shadow": {"scopes": true}
    });
    let mut g = Gate::with_key(cfg.clone(), json!({"scopes": ["read"]}));
    let o = g.run(&get("/v1/admin").key(KEY));
    assert_eq!(o.kind, Kind::Shadow(Class::Forbidden), "{o:?}");
    assert!(o.reply.is_none());
    let o = g.run(&get("/v1/other").key(KEY));
    assert_eq!(o.kind, Kind::Allowed);
    let mut g = Gate::with_key(cfg, json!({"sites": ["mine"]}));
    let o = g.run(&get("/v1/theirs").key(KEY));
    assert_eq!(o.kind, Kind::Shadow(Class::Forbidden), "{o:?}");
    // Not shadowed: IP lists still refuse.
    let mut g = Gate::with_key(
        json!({"ip_deny": ["192.0.2.0/24"], "shadow": {"scopes": true}}),
        json!({}),
    );
    assert_eq!(
        g.run(&get("/v1/x").key(KEY)).kind,
        Kind::Refused(Class::IpDenied)
    );
}

#[test]
fn rate_limits_shadowed_keep_counting_and_send_headers() {
    let mut g = Gate::with_key(
        json!({"shadow": {"rate_limits": true}}),
        json!({"rate_limits": [{"limit": 2, "window_s": 60}]}),
    );
    for _ in 0..2 {
        assert_eq!(g.run(&get("/v1/x").key(KEY)).kind, Kind::Allowed);
    }
    let o = g.run(&get("/v1/x").key(KEY));
    assert_eq!(o.kind, Kind::Shadow(Class::RateLimited), "{o:?}");
    assert!(o.reply.is_none());
    assert_eq!(
        find(&o.response_headers, "x-ratelimit-remaining"),
        Some("0")
    );
    assert_eq!(find(&o.response_headers, "retry-after"), None);
    assert!(o.set_headers.iter().any(|(k, _)| k == "x-api-key-id"));
}

#[test]
fn invalid_key_limit_shadowed_lets_a_valid_key_through() {
    let mut g = Gate::with_key(
        json!({"invalid_key_limit": {"limit": 1, "window_s": 60}, "shadow": {"rate_limits": true}}),
        json!({}),
    );
    assert_eq!(
        g.run(&get("/v1/x").key("ak_bad")).kind,
        Kind::Refused(Class::InvalidKey)
    );
    let o = g.run(&get("/v1/x").key(KEY));
    assert_eq!(o.kind, Kind::Shadow(Class::RateLimited), "{o:?}");
    assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
    // Keys are not shadowed: a bad key is still refused after the guard.
    assert_eq!(
        g.run(&get("/v1/x").key("ak_bad")).kind,
        Kind::Refused(Class::InvalidKey)
    );
}

#[test]
fn global_shadow_lets_key_refusals_through_without_identity() {
    let mut g = Gate::with_keys(
        shadow_all(),
        vec![
            the_key(json!({})),
            key_entry("key_2", "ak_old", json!({"status": "revoked"})),
        ],
    );
    let spoofed = |r: Req| r.h("x-api-key-id", "spoofed");
    for (r, class) in [
        (get("/v1/x"), Class::MissingKey),
        (get("/v1/x").key("ak_nope"), Class::InvalidKey),
        (get("/v1/x").key("ak_old"), Class::ExpiredKey),
    ] {
        let o = g.run(&spoofed(r));
        assert_eq!(o.kind, Kind::Shadow(class), "{o:?}");
        assert!(o.reply.is_none());
        assert!(o.set_headers.is_empty(), "no identity: {o:?}");
        assert!(o.remove_headers.iter().any(|h| h == "x-api-key-id"));
    }
    assert_eq!(g.run(&get("/v1/x").key(KEY)).kind, Kind::Allowed);
}

#[test]
fn global_shadow_without_a_list_and_the_first_refusal_counts() {
    let mut g = Gate::empty(json!({"shadow": true, "ip_allow": ["10.0.0.0/8"]}));
    let o = g.run(&get("/v1/x").key(KEY));
    assert_eq!(o.kind, Kind::Shadow(Class::IpDenied), "{o:?}");
    let mut g = Gate::empty(shadow_all());
    let o = g.run(&get("/v1/x").key(KEY));
    assert_eq!(o.kind, Kind::Shadow(Class::Unavailable), "{o:?}");
    assert!(o.reply.is_none() && o.set_headers.is_empty());
    // fail_open still decides its own pass.
    let mut g = Gate::empty(json!({"shadow": true, "key_list": {"fail_open": true}}));
    assert_eq!(g.run(&get("/v1/x").key(KEY)).kind, Kind::FailOpen);
}

#[test]
fn exempt_requests_after_a_shadowed_ip_refusal_are_shadow() {
    let mut g = Gate::with_key(
        json!({"ip_deny": ["192.0.2.0/24"], "exempt": [{"path_prefix": "/health"}], "shadow": {"ip": true}}),
        json!({}),
    );
    let o = g.run(&get("/health"));
    assert_eq!(o.kind, Kind::Shadow(Class::IpDenied));
    assert!(o.set_headers.is_empty());
}

#[test]
fn owner_limits_shadowed_keep_counting_and_let_every_key_through() {
    let doc = doc(
        json!({"owners": {OWNER: {"rate_limits": [{"limit": 3, "window_s": 60}]}}}),
        vec![
            key_entry("k_a", "ak_a", json!({})),
            key_entry("k_b", "ak_b", json!({})),
        ],
    );
    let mut g = Gate::with_doc(json!({"shadow": {"rate_limits": true}}), doc);
    let kinds: Vec<Kind> = (0..6)
        .map(|i| g.run(&get("/v1/x").key(["ak_a", "ak_b"][i % 2])).kind)
        .collect();
    assert_eq!(&kinds[..3], &[Kind::Allowed; 3]);
    assert_eq!(&kinds[3..], &[Kind::Shadow(Class::RateLimited); 3]);
    // The owner's counter kept counting: the headers say so, without Retry-After.
    let o = g.run(&get("/v1/x").key("ak_a"));
    assert_eq!(o.kind, Kind::Shadow(Class::RateLimited));
    assert_eq!(x_ratelimit(&o).1, Some("0"));
    assert_eq!(find(&o.response_headers, "retry-after"), None);
    // Without shadow the same document refuses the fourth request.
    let doc = doc_with_owner_limit(3);
    let mut g = Gate::with_doc(json!({}), doc);
    let refused = (0..4)
        .filter(|_| g.run(&get("/v1/x").key(KEY)).kind != Kind::Allowed)
        .count();
    assert_eq!(refused, 1);
}

#[test]
fn an_earlier_shadowed_check_is_the_one_reported_when_limits_refuse_too() {
    let doc = doc_with_owner_limit(1);
    let mut g = Gate::with_doc(json!({"shadow": true, "ip_allow": ["10.0.0.0/8"]}), doc);
    assert_eq!(
        g.run(&get("/v1/x").key(KEY)).kind,
        Kind::Shadow(Class::IpDenied)
    );
    // Over the owner's limit as well: still reported as the first shadowed refusal.
    let o = g.run(&get("/v1/x").key(KEY));
    assert_eq!(o.kind, Kind::Shadow(Class::IpDenied));
    assert_eq!(x_ratelimit(&o).1, Some("0"));
}

fn doc_with_owner_limit(limit: u64) -> Value {
    doc(
        json!({"owners": {OWNER: {"rate_limits": [{"limit": limit, "window_s": 60}]}}}),
        vec![the_key(json!({}))],
    )
}
