//! Step 9: key allowed_ips.

use super::fixtures::*;

#[test]
fn step9_key_allowed_ips() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"allowed_ips": ["203.0.113.0/24", "2001:db8::1"]}),
    );
    assert_allowed(&g.run(&get("/x").key(KEY).from("203.0.113.9")));
    assert_allowed(&g.run(&get("/x").key(KEY).from("2001:db8::1")));
    assert_allowed(&g.run(&get("/x").key(KEY).from("::ffff:203.0.113.200")));
    let o = g.run(&get("/x").key(KEY).from("198.51.100.1"));
    assert_refused(&o, "ip_denied");
    assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
    assert_refused(&g.run(&get("/x").key(KEY).from("2001:db8::2")), "ip_denied");
    assert_refused(&g.run(&get("/x").key(KEY).no_source()), "ip_denied");
}

#[test]
fn step9_key_allowed_ips_use_the_client_ip() {
    let cfg = json!({"client_ip": {"xff_trusted_hops": 1}});
    let mut g = Gate::with_key(cfg, json!({"allowed_ips": ["203.0.113.0/24"]}));
    let r = get("/x")
        .key(KEY)
        .from("10.0.0.1")
        .h("x-forwarded-for", "198.51.100.1, 203.0.113.9");
    assert_allowed(&g.run(&r));
    let r = get("/x")
        .key(KEY)
        .from("203.0.113.9")
        .h("x-forwarded-for", "203.0.113.9, 198.51.100.1");
    assert_refused(&g.run(&r), "ip_denied");
}

#[test]
fn step9_empty_allowed_ips_allows_everyone() {
    let mut g = Gate::with_key(json!({}), json!({"allowed_ips": []}));
    assert_allowed(&g.run(&get("/x").key(KEY).from("198.51.100.1")));
    assert_allowed(&g.run(&get("/x").key(KEY).no_source()));
}
