//! Step 1: identity headers sent by the client.

use super::fixtures::*;

#[test]
fn step1_forged_identity_headers_are_replaced_on_allowed_requests() {
    let mut g = Gate::with_key(json!({}), json!({}));
    let r = get("/v1/x")
        .key(KEY)
        .h("x-api-key-id", "admin")
        .h("x-api-key-owner", "org-root");
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert_eq!(up(&h, "x-api-key-id"), vec![KEY_ID]);
    assert_eq!(up(&h, "x-api-key-owner"), vec![OWNER]);
}

#[test]
fn step1_forged_identity_headers_are_removed_on_exempt_requests() {
    let mut g = Gate::with_key(json!({"exempt": [{"path_prefix": "/public"}]}), json!({}));
    let r = get("/public/doc")
        .h("x-api-key-id", "admin")
        .h("x-api-key-owner", "org-root");
    let o = g.run(&r);
    assert_exempt(&o);
    let h = upstream(&r, &o);
    assert!(up(&h, "x-api-key-id").is_empty());
    assert!(up(&h, "x-api-key-owner").is_empty());
}

#[test]
fn step1_forged_identity_headers_are_removed_on_fail_open() {
    let mut g = Gate::empty(json!({"key_list": {"fail_open": true}}));
    let r = get("/v1/x")
        .key(KEY)
        .h("x-api-key-id", "admin")
        .h("x-api-key-owner", "org-root");
    let o = g.run(&r);
    assert_eq!(o.kind, Kind::FailOpen);
    assert!(o.reply.is_none());
    let h = upstream(&r, &o);
    assert!(up(&h, "x-api-key-id").is_empty());
    assert!(up(&h, "x-api-key-owner").is_empty());
}

#[test]
fn step1_configured_identity_header_names_are_scrubbed_and_set() {
    let cfg =
        json!({"upstream": {"key_id_header": "X-Consumer-Id", "owner_header": "x-consumer-org"}});
    let mut g = Gate::with_key(cfg, json!({}));
    let r = get("/v1/x")
        .key(KEY)
        .h("x-consumer-id", "forged")
        .h("x-consumer-org", "forged");
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert_eq!(up(&h, "x-consumer-id"), vec![KEY_ID]);
    assert_eq!(up(&h, "x-consumer-org"), vec![OWNER]);
    assert!(up(&h, "x-api-key-id").is_empty());
    assert!(up(&h, "x-api-key-owner").is_empty());
}

#[test]
fn step1_null_turns_an_identity_header_off() {
    let cfg = json!({"upstream": {"key_id_header": null}});
    let mut g = Gate::with_key(cfg, json!({}));
    let r = get("/v1/x").key(KEY);
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert!(up(&h, "x-api-key-id").is_empty());
    assert_eq!(up(&h, "x-api-key-owner"), vec![OWNER]);

    let cfg = json!({"upstream": {"key_id_header": null, "owner_header": null}});
    let mut g = Gate::with_key(cfg, json!({}));
    let o = g.run(&r);
    assert_allowed(&o);
    assert!(o.set_headers.is_empty(), "{o:?}");
}
