//! Step 2: client IP and the global lists.

use super::fixtures::*;

fn allow10() -> Value {
    json!({"ip_allow": ["10.0.0.0/8", "2001:db8::/32"], "ip_deny": ["10.6.6.0/24"]})
}

#[test]
fn step2_source_address_is_used_without_trusted_hops() {
    let mut g = Gate::with_key(allow10(), json!({}));
    assert_allowed(&g.run(&get("/x").key(KEY).from("10.1.2.3")));
    // XFF is ignored when no hop is trusted.
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "10.1.2.3");
    assert_refused(&g.run(&r), "ip_denied");
    let r = get("/x")
        .key(KEY)
        .from("10.1.2.3")
        .h("x-forwarded-for", "192.0.2.1");
    assert_allowed(&g.run(&r));
}

#[test]
fn step2_ip_allow_and_ip_deny() {
    let mut g = Gate::with_key(allow10(), json!({}));
    assert_refused(&g.run(&get("/x").key(KEY).from("11.0.0.1")), "ip_denied");
    assert_refused(&g.run(&get("/x").key(KEY).from("10.6.6.9")), "ip_denied");
    assert_allowed(&g.run(&get("/x").key(KEY).from("10.6.7.9")));
    assert_allowed(&g.run(&get("/x").key(KEY).from("2001:db8:1::5")));
    assert_refused(&g.run(&get("/x").key(KEY).from("2001:db9::5")), "ip_denied");
    // No address at all matches no allow list.
    assert_refused(&g.run(&get("/x").key(KEY).no_source()), "ip_denied");
}

#[test]
fn step2_ip_deny_alone_blocks_only_listed_addresses() {
    let mut g = Gate::with_key(
        json!({"ip_deny": ["198.51.100.0/24", "2001:db8::bad"]}),
        json!({}),
    );
    assert_refused(
        &g.run(&get("/x").key(KEY).from("198.51.100.7")),
        "ip_denied",
    );
    assert_refused(
        &g.run(&get("/x").key(KEY).from("2001:db8::bad")),
        "ip_denied",
    );
    assert_allowed(&g.run(&get("/x").key(KEY).from("198.51.101.7")));
    assert_allowed(&g.run(&get("/x").key(KEY).from("2001:db8::bae")));
}

#[test]
fn step2_ipv4_mapped_ipv6_counts_as_ipv4() {
    let mut g = Gate::with_key(allow10(), json!({}));
    assert_allowed(&g.run(&get("/x").key(KEY).from("::ffff:10.1.2.3")));
    assert_refused(
        &g.run(&get("/x").key(KEY).from("::ffff:10.6.6.6")),
        "ip_denied",
    );
    assert_refused(
        &g.run(&get("/x").key(KEY).from("::ffff:11.1.2.3")),
        "ip_denied",
    );
    // Through XFF too.
    let mut g = Gate::with_key(
        merge_v(allow10(), json!({"client_ip": {"xff_trusted_hops": 1}})),
        json!({}),
    );
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "::ffff:10.6.6.6");
    assert_refused(&g.run(&r), "ip_denied");
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "::ffff:10.1.1.1");
    assert_allowed(&g.run(&r));
}

fn hops(n: u32) -> Value {
    merge_v(allow10(), json!({"client_ip": {"xff_trusted_hops": n}}))
}

#[test]
fn step2_xff_one_trusted_hop_takes_the_rightmost_entry() {
    let mut g = Gate::with_key(hops(1), json!({}));
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "192.0.2.50, 10.0.0.5");
    assert_allowed(&g.run(&r));
    let r = get("/x")
        .key(KEY)
        .from("10.0.0.1")
        .h("x-forwarded-for", "10.0.0.5, 192.0.2.50");
    assert_refused(&g.run(&r), "ip_denied");
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "2001:db8::7");
    assert_allowed(&g.run(&r));
}

#[test]
fn step2_xff_nth_from_the_right() {
    let mut g = Gate::with_key(hops(2), json!({}));
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "192.0.2.99,10.0.0.5, 192.0.2.50");
    assert_allowed(&g.run(&r));
    let r = get("/x")
        .key(KEY)
        .from("10.0.0.1")
        .h("x-forwarded-for", "10.0.0.7, 192.0.2.99, 10.0.0.5");
    assert_refused(&g.run(&r), "ip_denied");
    let mut g = Gate::with_key(hops(3), json!({}));
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "10.0.0.7, 192.0.2.99, 192.0.2.98");
    assert_allowed(&g.run(&r));
}

#[test]
fn step2_xff_fallbacks_to_the_source_address() {
    let mut g = Gate::with_key(hops(2), json!({}));
    // Fewer entries than trusted hops.
    let r = get("/x")
        .key(KEY)
        .from("10.0.0.1")
        .h("x-forwarded-for", "192.0.2.50");
    assert_allowed(&g.run(&r));
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "10.0.0.5");
    assert_refused(&g.run(&r), "ip_denied");
    // No header at all.
    assert_allowed(&g.run(&get("/x").key(KEY).from("10.0.0.1")));
    assert_refused(&g.run(&get("/x").key(KEY).from("192.0.2.1")), "ip_denied");
    // The chosen entry is not an IP.
    let r = get("/x")
        .key(KEY)
        .from("10.0.0.1")
        .h("x-forwarded-for", "unknown, 192.0.2.50");
    assert_allowed(&g.run(&r));
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "garbage, 10.0.0.5");
    assert_refused(&g.run(&r), "ip_denied");
}

#[test]
fn step2_global_lists_apply_to_exempt_requests() {
    let cfg = merge_v(
        allow10(),
        json!({"exempt": [{"method": "GET", "path_exact": "/healthz"}]}),
    );
    let mut g = Gate::with_key(cfg, json!({}));
    assert_refused(&g.run(&get("/healthz").from("192.0.2.1")), "ip_denied");
    assert_refused(&g.run(&get("/healthz").from("10.6.6.1")), "ip_denied");
    assert_exempt(&g.run(&get("/healthz").from("10.1.1.1")));
}

#[test]
fn step2_comes_before_unavailable_and_missing_key() {
    let mut g = Gate::empty(allow10());
    assert_refused(&g.run(&get("/x").from("192.0.2.1")), "ip_denied");
    assert_refused(&g.run(&get("/x").from("10.1.1.1")), "unavailable");
    let mut g = Gate::with_key(allow10(), json!({}));
    assert_refused(&g.run(&get("/x").from("192.0.2.1")), "ip_denied");
    assert_refused(&g.run(&get("/x").from("10.1.1.1")), "missing_key");
}
