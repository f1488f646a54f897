//! Step 5: the credential.

use super::fixtures::*;

#[test]
fn step5_missing_key() {
    let mut g = Gate::with_key(json!({}), json!({}));
    assert_refused(&g.run(&get("/x")), "missing_key");
    assert_refused(&g.run(&get("/x").h("x-api-key", "")), "missing_key");
    assert_refused(
        &g.run(&get("/x").h("authorization", "Bearer ")),
        "missing_key",
    );
    assert_refused(
        &g.run(&get("/x").h("authorization", "Basic dXNlcjpwdw==")),
        "missing_key",
    );
    assert_refused(&g.run(&get(&format!("/x?api_key={KEY}"))), "missing_key");
}

#[test]
fn step5_default_sources_x_api_key_then_bearer() {
    let mut g = Gate::with_key(json!({}), json!({}));
    assert_allowed(&g.run(&get("/x").key(KEY)));
    assert_allowed(&g.run(&get("/x").h("authorization", format!("Bearer {KEY}"))));
    // The first source present wins, even when a later one holds a good key.
    let r = get("/x")
        .key("ak_wrong")
        .h("authorization", format!("Bearer {KEY}"));
    assert_refused(&g.run(&r), "invalid_key");
    let r = get("/x").key(KEY).h("authorization", "Bearer ak_wrong");
    assert_allowed(&g.run(&r));
}

#[test]
fn step5_bearer_scheme_is_case_insensitive_and_required() {
    let mut g = Gate::with_key(json!({}), json!({}));
    for v in [
        format!("Bearer {KEY}"),
        format!("bearer {KEY}"),
        format!("BEARER {KEY}"),
        format!("bEaReR {KEY}"),
    ] {
        assert_allowed(&g.run(&get("/x").h("authorization", v)));
    }
    for v in [
        KEY.to_string(),
        format!("Bearer{KEY}"),
        format!("Token {KEY}"),
        format!("Bearerx {KEY}"),
    ] {
        assert_refused(&g.run(&get("/x").h("authorization", v)), "missing_key");
    }
}

#[test]
fn step5_empty_source_counts_as_absent_and_the_next_one_is_used() {
    let mut g = Gate::with_key(json!({}), json!({}));
    let r = get("/x")
        .h("x-api-key", "")
        .h("authorization", format!("Bearer {KEY}"));
    assert_allowed(&g.run(&r));
    let cfg = json!({"credentials": [{"query": "api_key"}, {"header": "x-api-key"}]});
    let mut g = Gate::with_key(cfg, json!({}));
    assert_allowed(&g.run(&get("/x?api_key=").key(KEY)));
}

#[test]
fn step5_configured_order_is_respected() {
    let cfg = json!({"credentials": [{"query": "api_key"}, {"header": "x-token", "scheme": "Token"}, {"header": "x-api-key"}]});
    let mut g = Gate::with_key(cfg, json!({}));
    assert_refused(&g.run(&get("/x?api_key=ak_wrong").key(KEY)), "invalid_key");
    assert_allowed(&g.run(&get(&format!("/x?api_key={KEY}")).key("ak_wrong")));
    assert_allowed(
        &g.run(
            &get("/x")
                .h("x-token", format!("token {KEY}"))
                .key("ak_wrong"),
        ),
    );
    assert_allowed(&g.run(&get("/x").h("x-token", KEY).key(KEY)));
    // Authorization is not a source in this configuration.
    assert_refused(
        &g.run(&get("/x").h("authorization", format!("Bearer {KEY}"))),
        "missing_key",
    );
}

#[test]
fn step5_query_value_is_percent_decoded() {
    let secret = "ak_a b/c%d&e=f";
    let cfg = json!({"credentials": [{"query": "api_key"}]});
    let mut g = Gate::with_keys(cfg, vec![key_entry("key_q", secret, json!({}))]);
    let r = get("/v1/items?page=2&api_key=ak_a%20b%2Fc%25d%26e%3Df");
    let o = g.run(&r);
    assert_allowed(&o);
    assert_eq!(o.key_id.as_deref(), Some("key_q"));
    // The parameter name must match exactly.
    assert_refused(
        &g.run(&get("/v1/items?xapi_key=ak_1&api_keyx=ak_1")),
        "missing_key",
    );
}

#[test]
fn step5_query_credential_is_stripped_from_the_path() {
    let cfg = json!({"credentials": [{"query": "api_key"}]});
    let mut g = Gate::with_key(cfg, json!({}));
    let r = get(&format!("/v1/Some%20Thing?a=1&api_key={KEY}&q=x%26y"));
    let o = g.run(&r);
    assert_allowed(&o);
    assert_eq!(
        up1(&upstream(&r, &o), ":path").as_deref(),
        Some("/v1/Some%20Thing?a=1&q=x%26y")
    );
    let r = get(&format!("/v1/items?api_key={KEY}"));
    let o = g.run(&r);
    assert_allowed(&o);
    let p = up1(&upstream(&r, &o), ":path").unwrap();
    assert!(p == "/v1/items" || p == "/v1/items?", "path upstream: {p}");
    let r = get(&format!("/v1/items?api_key={KEY}&b=2"));
    let o = g.run(&r);
    assert_eq!(
        up1(&upstream(&r, &o), ":path").as_deref(),
        Some("/v1/items?b=2")
    );
}

#[test]
fn step5_query_source_ignores_the_query_when_matching_paths() {
    let cfg = json!({
        "credentials": [{"query": "api_key"}],
        "routes": [{"path_exact": "/v1/admin", "scope": "admin"}]
    });
    let mut g = Gate::with_key(cfg, json!({"scopes": ["read"]}));
    assert_refused(
        &g.run(&get(&format!("/v1/admin?api_key={KEY}"))),
        "forbidden",
    );
}
