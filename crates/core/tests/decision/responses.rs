//! §4 responses.

use super::fixtures::*;

#[test]
fn responses_default_bodies_for_every_class() {
    let cfg = json!({
        "ip_deny": ["198.51.100.0/24"],
        "routes": [{"path_prefix": "/admin", "scope": "admin"}]
    });
    let d = doc(
        json!({}),
        vec![
            the_key(json!({"rate_limits": [{"limit": 0, "window_s": 60}]})),
            key_entry("k_ok", "ak_ok", json!({})),
            key_entry("k_rev", "ak_rev", json!({"status": "revoked"})),
        ],
    );
    let mut g = Gate::with_doc(cfg.clone(), d);
    assert_refused(&g.run(&get("/x")), "missing_key");
    assert_refused(&g.run(&get("/x").key("ak_unknown")), "invalid_key");
    assert_refused(&g.run(&get("/x").key("ak_rev")), "expired_key");
    assert_refused(&g.run(&get("/admin").key("ak_ok")), "forbidden");
    assert_refused(
        &g.run(&get("/x").key("ak_ok").from("198.51.100.3")),
        "ip_denied",
    );
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert_eq!(body(&o), rate_limited_body(50));
    let mut g = Gate::empty(cfg);
    assert_refused(&g.run(&get("/x").key("ak_ok")), "unavailable");
}

#[test]
fn responses_override_every_field() {
    let cfg = json!({"errors": {"missing_key": {
        "status": 400,
        "body": "no key here",
        "content_type": "text/plain; charset=utf-8",
        "headers": {"WWW-Authenticate": "ApiKey realm=\"api\"", "x-doc": "https://example.com/auth"}
    }}});
    let mut g = Gate::with_key(cfg, json!({}));
    let o = g.run(&get("/x"));
    assert_class(&o, "missing_key");
    assert_eq!(status(&o), 400);
    assert_eq!(body(&o), "no key here");
    assert_eq!(
        reply_hdr(&o, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        reply_hdr(&o, "www-authenticate"),
        Some("ApiKey realm=\"api\"")
    );
    assert_eq!(reply_hdr(&o, "x-doc"), Some("https://example.com/auth"));
    // Other classes keep their defaults.
    assert_refused(&g.run(&get("/x").key("ak_nope")), "invalid_key");
}

#[test]
fn responses_partial_overrides_keep_the_other_defaults() {
    let cfg = json!({"errors": {
        "invalid_key": {"status": 403},
        "forbidden": {"body": "{\"message\":\"nope\"}"},
        "expired_key": {"content_type": "application/problem+json"}
    }, "routes": [{"path_prefix": "/admin", "scope": "admin"}]});
    let mut g = Gate::with_keys(
        cfg,
        vec![
            the_key(json!({})),
            key_entry("k_rev", "ak_rev", json!({"status": "revoked"})),
        ],
    );
    let o = g.run(&get("/x").key("ak_nope"));
    assert_class(&o, "invalid_key");
    assert_eq!(status(&o), 403);
    assert_eq!(body(&o), default_of("invalid_key").1);
    assert_eq!(reply_hdr(&o, "content-type"), Some("application/json"));
    let o = g.run(&get("/admin").key(KEY));
    assert_class(&o, "forbidden");
    assert_eq!(status(&o), 403);
    assert_eq!(body(&o), "{\"message\":\"nope\"}");
    assert_eq!(reply_hdr(&o, "content-type"), Some("application/json"));
    let o = g.run(&get("/x").key("ak_rev"));
    assert_class(&o, "expired_key");
    assert_eq!(status(&o), 401);
    assert_eq!(body(&o), default_of("expired_key").1);
    assert_eq!(
        reply_hdr(&o, "content-type"),
        Some("application/problem+json")
    );
}

#[test]
fn responses_rate_limited_template_substitutes_the_rate_context() {
    let cfg = json!({"errors": {"rate_limited": {
        "status": 503,
        "body": "retry={retry_after} limit={limit} remaining={remaining} reset={reset} {other}",
        "content_type": "text/plain",
        "headers": {"x-why": "slow down"}
    }}});
    let mut g = Gate::with_key(cfg, json!({"rate_limits": [{"limit": 2, "window_s": 60}]}));
    assert_allowed(&g.run(&get("/x").key(KEY)));
    assert_allowed(&g.run(&get("/x").key(KEY)));
    let o = g.run(&get("/x").key(KEY));
    assert_class(&o, "rate_limited");
    assert_eq!(status(&o), 503);
    assert_eq!(
        body(&o),
        format!("retry=50 limit=2 remaining=0 reset={} {{other}}", T0 + 60)
    );
    assert_eq!(reply_hdr(&o, "content-type"), Some("text/plain"));
    assert_eq!(reply_hdr(&o, "x-why"), Some("slow down"));
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(
        reply_x_ratelimit(&o),
        (Some("2"), Some("0"), Some(ts(T0 + 60).as_str()))
    );
}

#[test]
fn responses_template_is_zero_without_rate_context() {
    let tpl = "{retry_after}/{limit}/{remaining}/{reset}";
    let cfg = json!({
        "errors": {
            "missing_key": {"body": tpl},
            "invalid_key": {"body": tpl},
            "expired_key": {"body": tpl},
            "forbidden": {"body": tpl},
            "ip_denied": {"body": tpl},
            "unavailable": {"body": tpl}
        },
        "ip_deny": ["198.51.100.0/24"],
        "site": {"header": "x-site"},
        "rate_limit": {"default": [{"limit": 5, "window_s": 60}]}
    });
    let mut g = Gate::with_keys(
        cfg.clone(),
        vec![
            the_key(json!({"sites": ["a"]})),
            key_entry("k_rev", "ak_rev", json!({"status": "revoked"})),
        ],
    );
    let outcomes = [
        (g.run(&get("/x")), "missing_key"),
        (g.run(&get("/x").key("ak_nope")), "invalid_key"),
        (g.run(&get("/x").key("ak_rev")), "expired_key"),
        (g.run(&get("/x").key(KEY).h("x-site", "b")), "forbidden"),
        (g.run(&get("/x").key(KEY).from("198.51.100.1")), "ip_denied"),
        (Gate::empty(cfg).run(&get("/x").key(KEY)), "unavailable"),
    ];
    for (o, name) in outcomes {
        assert_class(&o, name);
        assert_eq!(body(&o), "0/0/0/0", "{name}");
        assert_eq!(status(&o), default_of(name).0, "{name}");
        assert!(no_rate_headers(&o.reply.as_ref().unwrap().headers), "{o:?}");
    }
}

#[test]
fn responses_invalid_key_limit_uses_the_rate_limited_override() {
    let cfg = merge_v(
        ikl(1),
        json!({"errors": {"rate_limited": {"body": "wait {retry_after}", "headers": {"x-a": "b"}}}}),
    );
    let mut g = Gate::with_key(cfg, json!({}));
    assert_class(&g.run(&get("/x").key("ak_bad")), "invalid_key");
    let o = g.run(&get("/x").key(KEY));
    assert_class(&o, "rate_limited");
    assert_eq!(status(&o), 429);
    assert_eq!(body(&o), "wait 50");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(reply_hdr(&o, "x-a"), Some("b"));
}

#[test]
fn responses_spec_example_configuration_end_to_end() {
    let cfg = json!({
        "key_list": {"authority": "keys.internal", "headers": {"authorization": "Bearer service-token"}},
        "credentials": [
            {"header": "x-api-key"},
            {"header": "authorization", "scheme": "Bearer"},
            {"query": "api_key"}
        ],
        "key_prefixes": ["ak_"],
        "exempt": [{"preflight": true}, {"path_prefix": "/swagger"}, {"method": "GET", "path_exact": "/healthz"}],
        "client_ip": {"xff_trusted_hops": 0},
        "ip_allow": ["10.0.0.0/8", "2001:db8::/32"],
        "ip_deny": ["10.6.6.0/24"],
        "site": {"path_segment": 2},
        "routes": [
            {"path_prefix": "/public/v1/contacts", "methods": ["POST"], "scope": "contacts:write"},
            {"path_prefix": "/public/v1/contacts", "scope": "contacts:read"}
        ],
        "rate_limit": {"default": [{"limit": 60, "window_s": 60}], "headers": "x-ratelimit"},
        "invalid_key_limit": {"limit": 20, "window_s": 60},
        "upstream": {"strip_credential": true, "key_id_header": "x-api-key-id", "owner_header": "x-api-key-owner"},
        "errors": {
            "missing_key": {"status": 401, "body": "{\"error\":{\"code\":\"unauthorized\",\"message\":\"Invalid or missing API key\"}}"},
            "rate_limited": {"status": 429, "body": "{\"error\":{\"code\":\"rate_limit_exceeded\",\"retry_after\":{retry_after}}}"}
        }
    });
    let d = doc(
        json!({"owners": {"org-1": {"status": "active"}}}),
        vec![the_key(
            json!({"sites": ["v1"], "scopes": ["contacts:*"], "rate_limits": [{"limit": 2, "window_s": 60}]}),
        )],
    );
    let mut g = Gate::with_doc(cfg, d);
    let o = g.run(&get("/public/v1/contacts").from("10.1.1.1"));
    assert_class(&o, "missing_key");
    assert_eq!(status(&o), 401);
    assert_eq!(
        body(&o),
        r#"{"error":{"code":"unauthorized","message":"Invalid or missing API key"}}"#
    );
    let r = req("POST", &format!("/public/v1/contacts?api_key={KEY}&page=1")).from("10.1.1.1");
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert_eq!(
        up1(&h, ":path").as_deref(),
        Some("/public/v1/contacts?page=1")
    );
    assert_eq!(up1(&h, "x-api-key-id").as_deref(), Some(KEY_ID));
    assert_eq!(
        x_ratelimit(&o),
        (Some("2"), Some("1"), Some(ts(T0 + 60).as_str()))
    );
    assert_allowed(&g.run(&get("/public/v1/contacts").key(KEY).from("10.1.1.1")));
    let o = g.run(&get("/public/v1/contacts").key(KEY).from("10.1.1.1"));
    assert_class(&o, "rate_limited");
    assert_eq!(
        body(&o),
        r#"{"error":{"code":"rate_limit_exceeded","retry_after":50}}"#
    );
    assert_exempt(&g.run(&get("/healthz").from("10.1.1.1")));
    assert_refused(&g.run(&get("/healthz").from("10.6.6.6")), "ip_denied");
}
