//! Step 4: no list, or a stale one.

use super::fixtures::*;

#[test]
fn step4_unavailable_before_any_list() {
    let mut g = Gate::empty(json!({}));
    assert_refused(&g.run(&get("/x").key(KEY)), "unavailable");
    assert_refused(&g.run(&get("/x")), "unavailable");
}

#[test]
fn step4_fail_open_passes_without_identity() {
    let cfg = json!({"key_list": {"fail_open": true}, "rate_limit": {"default": [{"limit": 1, "window_s": 60}]}});
    let mut g = Gate::empty(cfg);
    for _ in 0..3 {
        let r = get("/x").key(KEY);
        let o = g.run(&r);
        assert_eq!(o.kind, Kind::FailOpen, "{o:?}");
        assert!(o.reply.is_none());
        assert!(o.set_headers.is_empty(), "{o:?}");
        assert!(o.response_headers.is_empty(), "{o:?}");
        let o = g.run(&get("/x"));
        assert_eq!(o.kind, Kind::FailOpen, "{o:?}");
    }
}

#[test]
fn step4_stale_list_with_max_stale_s() {
    let cfg = json!({"key_list": {"max_stale_s": 60}});
    let d = doc(json!({}), vec![the_key(json!({}))]);
    let mut g = Gate::fetched_at_s(cfg.clone(), d.clone(), NOW - 60);
    assert_allowed(&g.run(&get("/x").key(KEY)));
    assert_refused(&g.run_at(&get("/x").key(KEY), NOW + 1), "unavailable");
    let mut g = Gate::fetched_at_s(cfg, d.clone(), NOW - 61);
    assert_refused(&g.run(&get("/x").key(KEY)), "unavailable");
    // A 304 refreshes freshness.
    publish::touch(&g.store, NOW - 5);
    g.reload();
    assert_allowed(&g.run(&get("/x").key(KEY)));
    // 0 means no limit.
    let mut g = Gate::fetched_at_s(json!({}), d, NOW - 10_000_000);
    assert_allowed(&g.run(&get("/x").key(KEY)));
}

#[test]
fn step4_stale_list_with_fail_open_passes() {
    let cfg = json!({"key_list": {"max_stale_s": 30, "fail_open": true}});
    let d = doc(json!({}), vec![the_key(json!({}))]);
    let mut g = Gate::fetched_at_s(cfg, d, NOW - 31);
    let r = get("/x").key("ak_whatever").h("x-api-key-id", "forged");
    let o = g.run(&r);
    assert_eq!(o.kind, Kind::FailOpen, "{o:?}");
    assert!(o.reply.is_none());
    assert!(up(&upstream(&r, &o), "x-api-key-id").is_empty());
}
