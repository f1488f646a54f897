//! Step 6: invalid_key_limit.

use super::fixtures::*;

#[test]
fn step6_blocks_a_client_after_limit_failures_before_any_lookup() {
    let mut g = Gate::with_key(ikl(3), json!({}));
    let a = "198.51.100.1";
    for i in 0..3 {
        assert_refused(
            &g.run(&get("/x").key(&format!("ak_bad{i}")).from(a)),
            "invalid_key",
        );
    }
    // Even the good key is refused now, before lookup.
    let o = g.run(&get("/x").key(KEY).from(a));
    assert_refused(&o, "rate_limited");
    assert_eq!(o.key_id, None);
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(body(&o), rate_limited_body(50));
    assert!(no_rate_headers(&o.reply.as_ref().unwrap().headers), "{o:?}");
    let o = g.run(&get("/x").key("ak_bad9").from(a));
    assert_refused(&o, "rate_limited");
    // Later in the window.
    let o = g.run_at(&get("/x").key(KEY).from(a), T0 + 59);
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("1"));
    // Missing key is decided first.
    assert_refused(&g.run(&get("/x").from(a)), "missing_key");
    // Another client is unaffected.
    assert_allowed(&g.run(&get("/x").key(KEY).from("198.51.100.2")));
    // The next window starts over.
    assert_allowed(&g.run_at(&get("/x").key(KEY).from(a), T0 + 60));
}

#[test]
fn step6_no_key_rate_limit_headers_even_with_both_styles() {
    let cfg = merge_v(
        ikl(1),
        json!({"rate_limit": {"default": [{"limit": 100, "window_s": 60}], "headers": "both"}}),
    );
    let mut g = Gate::with_key(cfg, json!({}));
    assert_refused(&g.run(&get("/x").key("ak_bad")), "invalid_key");
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert!(reply_hdr(&o, "retry-after").is_some());
    assert!(no_rate_headers(&o.reply.as_ref().unwrap().headers), "{o:?}");
}

#[test]
fn step6_counts_only_step7_failures() {
    let d = doc(
        json!({"owners": {"org-1": {"status": "active"}, "org-off": {"status": "disabled"}}}),
        vec![
            the_key(json!({"rate_limits": [{"limit": 1, "window_s": 60}], "scopes": ["a"]})),
            key_entry("key_exp", "ak_expired", json!({"expires_at": 1})),
            key_entry("key_rev", "ak_revoked", json!({"status": "revoked"})),
            key_entry("key_own", "ak_owner", json!({"owner": "org-off"})),
            key_entry(
                "key_ip",
                "ak_ip",
                json!({"allowed_ips": ["203.0.113.0/24"]}),
            ),
        ],
    );
    let cfg = merge_v(
        ikl(2),
        json!({"routes": [{"path_prefix": "/admin", "scope": "admin"}]}),
    );
    let mut g = Gate::with_doc(cfg, d);
    let a = "198.51.100.1";
    for _ in 0..4 {
        assert_refused(&g.run(&get("/x").from(a)), "missing_key");
        assert_refused(&g.run(&get("/x").key("ak_expired").from(a)), "expired_key");
        assert_refused(&g.run(&get("/x").key("ak_revoked").from(a)), "expired_key");
        assert_refused(&g.run(&get("/x").key("ak_owner").from(a)), "invalid_key");
        assert_refused(&g.run(&get("/x").key("ak_ip").from(a)), "ip_denied");
        assert_refused(&g.run(&get("/admin").key(KEY).from(a)), "forbidden");
    }
    assert_allowed(&g.run(&get("/x").key(KEY).from(a)));
    for _ in 0..3 {
        assert_refused(&g.run(&get("/x").key(KEY).from(a)), "rate_limited");
    }
    // Still two step-7 failures to go.
    assert_refused(&g.run(&get("/x").key("ak_nope").from(a)), "invalid_key");
    assert_refused(&g.run(&get("/x").key("ak_nope").from(a)), "invalid_key");
    assert_refused(&g.run(&get("/x").key("ak_nope").from(a)), "rate_limited");
}

#[test]
fn step6_too_long_and_wrong_prefix_keys_count() {
    let cfg = merge_v(ikl(2), json!({"key_prefixes": ["ak_"]}));
    let mut g = Gate::with_key(cfg, json!({}));
    let long = format!("ak_{}", "x".repeat(1100));
    assert_refused(&g.run(&get("/x").key(&long)), "invalid_key");
    assert_refused(&g.run(&get("/x").key("sk_other")), "invalid_key");
    assert_refused(&g.run(&get("/x").key(KEY)), "rate_limited");
}

#[test]
fn step6_is_per_client_ip_from_xff() {
    let cfg = merge_v(ikl(1), json!({"client_ip": {"xff_trusted_hops": 1}}));
    let mut g = Gate::with_key(cfg, json!({}));
    let r = |client: &str, k: &str| {
        get("/x")
            .key(k)
            .from("10.0.0.1")
            .h("x-forwarded-for", client)
    };
    assert_refused(&g.run(&r("198.51.100.1", "ak_bad")), "invalid_key");
    assert_refused(&g.run(&r("198.51.100.1", KEY)), "rate_limited");
    assert_allowed(&g.run(&r("203.0.113.77", KEY)));
    // IPv4-mapped IPv6 is the same client.
    assert_refused(&g.run(&r("::ffff:198.51.100.1", KEY)), "rate_limited");
}
