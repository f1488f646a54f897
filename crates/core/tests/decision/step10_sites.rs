//! Step 10: sites.

use super::fixtures::*;

#[test]
fn step10_site_from_path_segment() {
    let cfg = json!({"site": {"path_segment": 2}});
    let mut g = Gate::with_keys(
        cfg,
        vec![
            the_key(json!({"sites": ["123", "777"]})),
            key_entry("k_any", "ak_any", json!({})),
        ],
    );
    for p in [
        "/v1/123/contacts",
        "/v1/777",
        "/v1/123?x=1",
        "/v1//123/x",
        "/v1/x/../123/y",
        "/v1/./123",
    ] {
        assert_allowed(&g.run(&get(p).key(KEY)));
    }
    for p in [
        "/v1/456/contacts",
        "/v1",
        "/",
        "/123/v1",
        "/v1/1234",
        "/v1/12",
    ] {
        assert_refused(&g.run(&get(p).key(KEY)), "forbidden");
    }
    // A key without sites may go anywhere.
    assert_allowed(&g.run(&get("/v1/456").key("ak_any")));
    assert_allowed(&g.run(&get("/").key("ak_any")));
}

#[test]
fn step10_site_from_header() {
    let cfg = json!({"site": {"header": "X-Site-Id"}});
    let mut g = Gate::with_key(cfg, json!({"sites": ["123"]}));
    assert_allowed(&g.run(&get("/x").key(KEY).h("x-site-id", "123")));
    assert_refused(
        &g.run(&get("/x").key(KEY).h("x-site-id", "456")),
        "forbidden",
    );
    assert_refused(&g.run(&get("/x").key(KEY)), "forbidden");
    assert_refused(&g.run(&get("/123").key(KEY)), "forbidden");
}

#[test]
fn step10_key_with_sites_and_no_site_source_is_forbidden() {
    let mut g = Gate::with_key(json!({}), json!({"sites": ["123"]}));
    assert_refused(&g.run(&get("/123/x").key(KEY)), "forbidden");
}
