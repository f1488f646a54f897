//! Step 13: allowed.

use super::fixtures::*;

#[test]
fn step13_header_credential_is_stripped_and_identity_set() {
    let mut g = Gate::with_key(json!({}), json!({}));
    let r = get("/v1/x").key(KEY).h("x-other", "kept");
    let o = g.run(&r);
    assert_allowed(&o);
    assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
    let h = upstream(&r, &o);
    assert!(up(&h, "x-api-key").is_empty());
    assert_eq!(up1(&h, "x-other").as_deref(), Some("kept"));
    assert_eq!(up1(&h, ":path").as_deref(), Some("/v1/x"));
    assert_eq!(up1(&h, "x-api-key-id").as_deref(), Some(KEY_ID));
    assert_eq!(up1(&h, "x-api-key-owner").as_deref(), Some(OWNER));

    let r = get("/v1/x").h("authorization", format!("Bearer {KEY}"));
    let o = g.run(&r);
    assert_allowed(&o);
    assert!(up(&upstream(&r, &o), "authorization").is_empty());
}

#[test]
fn step13_only_the_credential_is_stripped() {
    let mut g = Gate::with_key(json!({}), json!({}));
    let r = get("/v1/x")
        .key(KEY)
        .h("authorization", "Basic dXNlcjpwdw==");
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert!(up(&h, "x-api-key").is_empty());
    assert_eq!(
        up1(&h, "authorization").as_deref(),
        Some("Basic dXNlcjpwdw==")
    );
}

#[test]
fn step13_strip_credential_false_keeps_it() {
    let cfg = json!({"upstream": {"strip_credential": false}, "credentials": [{"header": "x-api-key"}, {"query": "api_key"}]});
    let mut g = Gate::with_key(cfg, json!({}));
    let r = get("/v1/x").key(KEY);
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert_eq!(up1(&h, "x-api-key").as_deref(), Some(KEY));
    assert_eq!(up1(&h, "x-api-key-id").as_deref(), Some(KEY_ID));
    let path = format!("/v1/x?api_key={KEY}&b=1");
    let r = get(&path);
    let o = g.run(&r);
    assert_allowed(&o);
    assert_eq!(up1(&upstream(&r, &o), ":path"), Some(path));
}

#[test]
fn step13_allowed_carries_rate_headers_on_the_response() {
    let cfg = json!({"rate_limit": {"default": [{"limit": 60, "window_s": 60}]}});
    let mut g = Gate::with_key(cfg, json!({}));
    let o = g.run(&get("/v1/x").key(KEY));
    assert_allowed(&o);
    assert_eq!(
        x_ratelimit(&o),
        (Some("60"), Some("59"), Some(ts(T0 + 60).as_str()))
    );
}
