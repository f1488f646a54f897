//! Step 3: exempt requests.

use super::fixtures::*;

fn exempt_cfg() -> Value {
    json!({"exempt": [
        {"preflight": true},
        {"path_prefix": "/swagger"},
        {"method": "GET", "path_exact": "/healthz"}
    ]})
}

#[test]
fn step3_preflight_needs_options_origin_and_request_method() {
    let mut g = Gate::with_key(exempt_cfg(), json!({}));
    let pre = req("OPTIONS", "/v1/contacts")
        .h("origin", "https://app.example.com")
        .h("access-control-request-method", "POST");
    assert_exempt(&g.run(&pre));
    let no_acrm = req("OPTIONS", "/v1/contacts").h("origin", "https://app.example.com");
    assert_refused(&g.run(&no_acrm), "missing_key");
    let no_origin = req("OPTIONS", "/v1/contacts").h("access-control-request-method", "POST");
    assert_refused(&g.run(&no_origin), "missing_key");
    let not_options = get("/v1/contacts")
        .h("origin", "https://app.example.com")
        .h("access-control-request-method", "POST");
    assert_refused(&g.run(&not_options), "missing_key");
    assert_refused(&g.run(&req("OPTIONS", "/v1/contacts")), "missing_key");
}

#[test]
fn step3_method_and_path_exact_must_both_match() {
    let mut g = Gate::with_key(exempt_cfg(), json!({}));
    assert_exempt(&g.run(&get("/healthz")));
    assert_exempt(&g.run(&get("/healthz?verbose=1")));
    assert_refused(&g.run(&req("POST", "/healthz")), "missing_key");
    assert_refused(&g.run(&get("/healthz/deep")), "missing_key");
    assert_refused(&g.run(&get("/healthzz")), "missing_key");
    assert_refused(&g.run(&get("/")), "missing_key");
}

#[test]
fn step3_path_prefix_matches_whole_segments() {
    let mut g = Gate::with_key(exempt_cfg(), json!({}));
    for p in [
        "/swagger",
        "/swagger/",
        "/swagger/ui",
        "/swagger/ui/index.html",
        "/swagger?x=1",
    ] {
        assert_exempt(&g.run(&get(p)));
        assert_exempt(&g.run(&req("POST", p)));
    }
    for p in ["/swaggerx", "/swagger-ui", "/api/swagger", "/"] {
        assert_refused(&g.run(&get(p)), "missing_key");
    }
}

#[test]
fn step3_path_normalisation_cannot_smuggle_past_or_into_exempt() {
    let mut g = Gate::with_key(exempt_cfg(), json!({}));
    for p in [
        "/swagger/../admin",
        "/swagger/%2e%2e/admin",
        "/swagger/%2E%2E/admin",
        "/swagger%2F..%2Fadmin",
        "/swagger%2f%2e%2e%2fadmin",
        "/swagger\\..\\admin",
        "/swagger%5C..%5Cadmin",
        "/swagger/./../admin",
        "/swagger/ui/../../admin",
        "/healthz/..",
    ] {
        assert_refused(&g.run(&get(p)), "missing_key");
    }
    for p in [
        "//swagger",
        "/./swagger/ui",
        "/admin/../swagger",
        "/api/%2e%2e/swagger/ui",
        "/api%2F..%2Fswagger",
        "\\swagger\\ui",
        "/swagger//ui",
        "//healthz",
        "/x/../healthz",
        "/../swagger",
    ] {
        assert_exempt(&g.run(&get(p)));
    }
}

#[test]
fn step3_exempt_skips_list_check_identity_and_rate_limits() {
    let cfg = merge_v(
        exempt_cfg(),
        json!({"rate_limit": {"default": [{"limit": 60, "window_s": 60}]}}),
    );
    // No list loaded: still exempt.
    let mut g = Gate::empty(cfg.clone());
    assert_exempt(&g.run(&get("/swagger/ui")));
    // With a key of limit 1: exempt requests do not count.
    let mut g = Gate::with_key(cfg, json!({"rate_limits": [{"limit": 1, "window_s": 60}]}));
    for _ in 0..3 {
        assert_exempt(&g.run(&get("/swagger/ui").key(KEY)));
        assert_exempt(&g.run(&get("/swagger/ui").key("ak_unknown")));
    }
    let o = g.run(&get("/v1/x").key(KEY));
    assert_allowed(&o);
    assert_eq!(
        x_ratelimit(&o),
        (Some("1"), Some("0"), Some(ts(T0 + 60).as_str()))
    );
}

#[test]
fn step3_exempt_requests_do_not_pass_the_key_upstream() {
    // SPEC §5: keys never appear upstream unless strip_credential is false.
    let mut g = Gate::with_key(exempt_cfg(), json!({}));
    let r = get("/swagger/ui").key(KEY);
    let o = g.run(&r);
    assert_exempt(&o);
    assert!(up(&upstream(&r, &o), "x-api-key").is_empty());
}
