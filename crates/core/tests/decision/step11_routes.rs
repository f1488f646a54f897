//! Step 11: routes and scopes.

use super::fixtures::*;

fn routes_cfg() -> Value {
    json!({"routes": [
        {"path_prefix": "/public/v1/contacts", "methods": ["POST"], "scope": "contacts:write"},
        {"path_prefix": "/public/v1/contacts", "scope": "contacts:read"},
        {"path_exact": "/public/v1/deals", "scope": "deals:read"},
        {"path_prefix": "/public/v1/open"},
        {"path_prefix": "/public", "scope": "admin"}
    ]})
}

fn scoped(scopes: Value) -> Gate {
    Gate::with_key(routes_cfg(), json!({"scopes": scopes}))
}

#[test]
fn step11_exact_scope() {
    let mut g = scoped(json!(["contacts:read"]));
    assert_allowed(&g.run(&get("/public/v1/contacts").key(KEY)));
    assert_allowed(&g.run(&get("/public/v1/contacts/42").key(KEY)));
    assert_allowed(&g.run(&req("DELETE", "/public/v1/contacts/42").key(KEY)));
    let o = g.run(&req("POST", "/public/v1/contacts").key(KEY));
    assert_refused(&o, "forbidden");
    assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
    let mut g = scoped(json!(["contacts:write"]));
    assert_allowed(&g.run(&req("POST", "/public/v1/contacts").key(KEY)));
    assert_refused(&g.run(&get("/public/v1/contacts").key(KEY)), "forbidden");
}

#[test]
fn step11_wildcard_scopes() {
    let mut g = scoped(json!(["contacts:*"]));
    assert_allowed(&g.run(&req("POST", "/public/v1/contacts").key(KEY)));
    assert_allowed(&g.run(&get("/public/v1/contacts").key(KEY)));
    assert_refused(&g.run(&get("/public/v1/deals").key(KEY)), "forbidden");
    assert_refused(&g.run(&get("/public/other").key(KEY)), "forbidden");
    let mut g = scoped(json!(["deals:*"]));
    assert_refused(&g.run(&get("/public/v1/contacts").key(KEY)), "forbidden");
    assert_allowed(&g.run(&get("/public/v1/deals").key(KEY)));
    let mut g = scoped(json!(["*"]));
    for (m, p) in [
        ("POST", "/public/v1/contacts"),
        ("GET", "/public/v1/deals"),
        ("GET", "/public/zzz"),
    ] {
        assert_allowed(&g.run(&req(m, p).key(KEY)));
    }
}

#[test]
fn step11_no_scopes_means_only_unscoped_routes() {
    let mut g = scoped(json!([]));
    assert_refused(&g.run(&get("/public/v1/contacts").key(KEY)), "forbidden");
    // No matching rule: any valid key.
    assert_allowed(&g.run(&get("/private/x").key(KEY)));
    assert_allowed(&g.run(&get("/publicx").key(KEY)));
    // A rule without scope, matched first: any valid key.
    assert_allowed(&g.run(&get("/public/v1/open/a").key(KEY)));
    assert_allowed(&g.run(&req("PUT", "/public/v1/open").key(KEY)));
    // path_exact: /public/v1/deals/1 falls through to the "/public" rule.
    let mut g = scoped(json!(["deals:read"]));
    assert_allowed(&g.run(&get("/public/v1/deals").key(KEY)));
    assert_refused(&g.run(&get("/public/v1/deals/1").key(KEY)), "forbidden");
}

#[test]
fn step11_first_matching_rule_wins() {
    let cfg = json!({"routes": [
        {"path_prefix": "/a/b", "scope": "narrow"},
        {"path_prefix": "/a", "scope": "wide"}
    ]});
    let mut g = Gate::with_key(cfg.clone(), json!({"scopes": ["wide"]}));
    assert_refused(&g.run(&get("/a/b/c").key(KEY)), "forbidden");
    assert_allowed(&g.run(&get("/a/c").key(KEY)));
    let mut g = Gate::with_key(cfg, json!({"scopes": ["narrow"]}));
    assert_allowed(&g.run(&get("/a/b/c").key(KEY)));
    assert_refused(&g.run(&get("/a/c").key(KEY)), "forbidden");
}

#[test]
fn step11_routes_use_the_normalised_path() {
    let mut g = scoped(json!(["contacts:read"]));
    for p in [
        "/public/v1/x/../contacts",
        "/public/v1/%2e%2e/v1/contacts",
        "/public//v1/contacts",
        "/public%2Fv1%2Fcontacts",
        "/public\\v1\\contacts",
        "/public/v1/./contacts?x=1",
    ] {
        assert_refused(&g.run(&req("POST", p).key(KEY)), "forbidden");
        assert_allowed(&g.run(&get(p).key(KEY)));
    }
    // Leaving an unscoped prefix through `..` lands under a scoped rule.
    assert_refused(
        &g.run(&get("/public/v1/open/../deals").key(KEY)),
        "forbidden",
    );
    assert_refused(
        &g.run(&get("/public/v1/open/%2e%2e/%2e%2e/x").key(KEY)),
        "forbidden",
    );
    assert_refused(
        &g.run(&req("POST", "/public/v1/open/../contacts").key(KEY)),
        "forbidden",
    );
    assert_allowed(&g.run(&get("/public/v1/open/../contacts").key(KEY)));
}
