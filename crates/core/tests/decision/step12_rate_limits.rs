//! Step 12: rate limits.

use super::fixtures::*;

#[test]
fn step12_key_limit_counts_exactly_with_headers() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 3, "window_s": 60}]}),
    );
    let reset = ts(T0 + 60);
    for remaining in ["2", "1", "0"] {
        let o = g.run(&get("/x").key(KEY));
        assert_allowed(&o);
        assert_eq!(
            x_ratelimit(&o),
            (Some("3"), Some(remaining), Some(reset.as_str()))
        );
        // On the upstream's response, not on the request.
        assert!(o
            .set_headers
            .iter()
            .all(|(k, _)| !k.to_ascii_lowercase().contains("ratelimit")));
    }
    for _ in 0..3 {
        let o = g.run(&get("/x").key(KEY));
        assert_refused(&o, "rate_limited");
        assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
        assert_eq!(
            reply_x_ratelimit(&o),
            (Some("3"), Some("0"), Some(reset.as_str()))
        );
        assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
        assert_eq!(body(&o), rate_limited_body(50));
    }
}

#[test]
fn step12_fixed_windows_are_aligned_to_the_epoch() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 2, "window_s": 60}]}),
    );
    assert_allowed(&g.run_at(&get("/x").key(KEY), T0 + 50));
    assert_allowed(&g.run_at(&get("/x").key(KEY), T0 + 59));
    let o = g.run_at(&get("/x").key(KEY), T0 + 59);
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("1"));
    // A new window at the multiple of 60, not 60 s after the first request.
    let o = g.run_at(&get("/x").key(KEY), T0 + 60);
    assert_allowed(&o);
    assert_eq!(
        x_ratelimit(&o),
        (Some("2"), Some("1"), Some(ts(T0 + 120).as_str()))
    );

    // A window that does not divide a day.
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 5, "window_s": 7}]}),
    );
    let now = T0 + 10;
    let end = now - now % 7 + 7;
    let o = g.run_at(&get("/x").key(KEY), now);
    assert_allowed(&o);
    assert_eq!(
        x_ratelimit(&o),
        (Some("5"), Some("4"), Some(ts(end).as_str()))
    );
}

#[test]
fn step12_limit_zero_refuses_everything() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 0, "window_s": 60}]}),
    );
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(reply_x_ratelimit(&o).1, Some("0"));
}

fn limits_doc(default: Option<Value>) -> (Value, Value) {
    let mut cfg = json!({});
    if let Some(d) = default {
        cfg = json!({"rate_limit": {"default": d}});
    }
    let d = doc(
        json!({"plans": {
            "free": {"rate_limits": [{"limit": 10, "window_s": 60}]},
            "open": {"rate_limits": []},
            "bare": {}
        }}),
        vec![
            key_entry(
                "k_own",
                "ak_own",
                json!({"plan": "free", "rate_limits": [{"limit": 4, "window_s": 60}]}),
            ),
            key_entry("k_plan", "ak_plan", json!({"plan": "free"})),
            key_entry("k_open", "ak_open", json!({"plan": "open"})),
            key_entry("k_bare", "ak_bare", json!({"plan": "bare"})),
            key_entry("k_none", "ak_none", json!({})),
            key_entry(
                "k_empty",
                "ak_empty",
                json!({"plan": "free", "rate_limits": []}),
            ),
        ],
    );
    (cfg, d)
}

#[test]
fn step12_effective_limits_key_then_plan_then_default() {
    let (cfg, d) = limits_doc(Some(json!([{"limit": 7, "window_s": 60}])));
    let mut g = Gate::with_doc(cfg, d);
    let limit_of = |g: &mut Gate, k: &str| {
        let o = g.run(&get("/x").key(k));
        assert_allowed(&o);
        resp_hdr(&o, "x-ratelimit-limit").map(str::to_string)
    };
    assert_eq!(limit_of(&mut g, "ak_own").as_deref(), Some("4"));
    assert_eq!(limit_of(&mut g, "ak_plan").as_deref(), Some("10"));
    assert_eq!(limit_of(&mut g, "ak_bare").as_deref(), Some("7"));
    assert_eq!(limit_of(&mut g, "ak_none").as_deref(), Some("7"));
    // Explicit empty lists: no limits, no headers.
    assert_eq!(limit_of(&mut g, "ak_open"), None);
    assert_eq!(limit_of(&mut g, "ak_empty"), None);
    for _ in 0..20 {
        let o = g.run(&get("/x").key("ak_open"));
        assert_allowed(&o);
        assert!(no_rate_headers(&o.response_headers), "{o:?}");
        assert_allowed(&g.run(&get("/x").key("ak_empty")));
    }
    // The key's own limit is the one enforced.
    for _ in 0..3 {
        assert_allowed(&g.run(&get("/x").key("ak_own")));
    }
    assert_refused(&g.run(&get("/x").key("ak_own")), "rate_limited");
    // The default counts per key.
    for _ in 0..6 {
        assert_allowed(&g.run(&get("/x").key("ak_none")));
    }
    assert_refused(&g.run(&get("/x").key("ak_none")), "rate_limited");
    assert_allowed(&g.run(&get("/x").key("ak_bare")));
}

#[test]
fn step12_no_limits_anywhere_means_no_headers() {
    let (cfg, d) = limits_doc(None);
    let mut g = Gate::with_doc(cfg, d);
    for _ in 0..50 {
        let o = g.run(&get("/x").key("ak_none"));
        assert_allowed(&o);
        assert!(o.response_headers.is_empty(), "{o:?}");
    }
}

#[test]
fn step12_least_remaining_is_reported() {
    // The short window is the tighter one.
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 100, "window_s": 3600}, {"limit": 5, "window_s": 1}]}),
    );
    let o = g.run(&get("/x").key(KEY));
    assert_eq!(
        x_ratelimit(&o),
        (Some("5"), Some("4"), Some(ts(NOW + 1).as_str()))
    );
    // The long window is the tighter one.
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 100, "window_s": 1}, {"limit": 3, "window_s": 3600}]}),
    );
    let o = g.run(&get("/x").key(KEY));
    assert_eq!(
        x_ratelimit(&o),
        (Some("3"), Some("2"), Some(ts(T0 + 3600).as_str()))
    );
    let o = g.run_at(&get("/x").key(KEY), NOW + 5);
    assert_eq!(
        x_ratelimit(&o),
        (Some("3"), Some("1"), Some(ts(T0 + 3600).as_str()))
    );
}

#[test]
fn step12_ties_go_to_the_shortest_window() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 10, "window_s": 86400}, {"limit": 10, "window_s": 3600}, {"limit": 10, "window_s": 60}]}),
    );
    let o = g.run(&get("/x").key(KEY));
    assert_eq!(
        x_ratelimit(&o),
        (Some("10"), Some("9"), Some(ts(T0 + 60).as_str()))
    );
}

#[test]
fn step12_retry_after_covers_every_exceeded_window() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 1, "window_s": 60}, {"limit": 1, "window_s": 3600}]}),
    );
    assert_allowed(&g.run(&get("/x").key(KEY)));
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("3590"));
    assert_eq!(body(&o), rate_limited_body(3590));
    // Only the short window exceeded: only it counts.
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 1, "window_s": 60}, {"limit": 100, "window_s": 3600}]}),
    );
    assert_allowed(&g.run(&get("/x").key(KEY)));
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(
        reply_x_ratelimit(&o),
        (Some("1"), Some("0"), Some(ts(T0 + 60).as_str()))
    );
}

#[test]
fn step12_refused_requests_still_count_in_every_window() {
    // "every limit of the key counts the request in its fixed window".
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 1, "window_s": 1}, {"limit": 3, "window_s": 3600}]}),
    );
    assert_allowed(&g.run_at(&get("/x").key(KEY), NOW)); // 1 / 1
    assert_refused(&g.run_at(&get("/x").key(KEY), NOW), "rate_limited"); // 2 / 2
    assert_allowed(&g.run_at(&get("/x").key(KEY), NOW + 1)); // 1 / 3
    let o = g.run_at(&get("/x").key(KEY), NOW + 2); // 1 / 4
    assert_refused(&o, "rate_limited");
    assert_eq!(
        reply_hdr(&o, "retry-after"),
        Some(ts(T0 + 3600 - NOW - 2).as_str())
    );
}

#[test]
fn step12_remaining_never_below_zero() {
    let cfg = json!({"rate_limit": {"headers": "both"}});
    let mut g = Gate::with_key(cfg, json!({"rate_limits": [{"limit": 1, "window_s": 60}]}));
    assert_allowed(&g.run(&get("/x").key(KEY)));
    for _ in 0..5 {
        let o = g.run(&get("/x").key(KEY));
        assert_refused(&o, "rate_limited");
        assert_eq!(reply_hdr(&o, "x-ratelimit-remaining"), Some("0"));
        assert_eq!(reply_hdr(&o, "ratelimit"), Some("\"default\";r=0;t=50"));
    }
}

#[test]
fn step12_counts_are_per_key() {
    let lim = json!({"rate_limits": [{"limit": 1, "window_s": 60}]});
    let mut g = Gate::with_keys(
        json!({}),
        vec![
            key_entry("k_a", "ak_a", lim.clone()),
            key_entry("k_b", "ak_b", lim),
        ],
    );
    assert_allowed(&g.run(&get("/x").key("ak_a")));
    assert_refused(&g.run(&get("/x").key("ak_a")), "rate_limited");
    assert_allowed(&g.run(&get("/x").key("ak_b")));
}

#[test]
fn step12_refusals_before_counting_do_not_consume_the_limit() {
    let cfg = json!({"site": {"path_segment": 1}, "routes": [{"path_prefix": "/s1/admin", "scope": "admin"}]});
    let mut g = Gate::with_key(
        cfg,
        json!({"sites": ["s1"], "scopes": ["read"], "allowed_ips": ["192.0.2.0/24"], "rate_limits": [{"limit": 1, "window_s": 60}]}),
    );
    for _ in 0..3 {
        assert_refused(&g.run(&get("/s2/x").key(KEY)), "forbidden");
        assert_refused(&g.run(&get("/s1/admin").key(KEY)), "forbidden");
        assert_refused(
            &g.run(&get("/s1/x").key(KEY).from("198.51.100.1")),
            "ip_denied",
        );
    }
    let o = g.run(&get("/s1/x").key(KEY));
    assert_allowed(&o);
    assert_eq!(x_ratelimit(&o).1, Some("0"));
}

// ---- owner limits (SPEC §2: an owner's `rate_limits`, shared by all of its keys) ----

fn owner_doc(owner_limits: Value) -> Value {
    doc(
        json!({"owners": {OWNER: {"rate_limits": owner_limits}, "org-2": {}},
               "plans": {"big": {"rate_limits": [{"limit": 1000, "window_s": 60}]}}}),
        vec![
            key_entry(
                "k_a",
                "ak_a",
                json!({"rate_limits": [{"limit": 100, "window_s": 60}]}),
            ),
            key_entry("k_b", "ak_b", json!({"plan": "big"})),
            key_entry("k_c", "ak_c", json!({})),
            key_entry("k_none", "ak_none", json!({"rate_limits": []})),
            key_entry("k_other", "ak_other", json!({"owner": "org-2"})),
        ],
    )
}

#[test]
fn step12_owner_limits_are_shared_by_all_of_its_keys() {
    let mut g = Gate::with_doc(json!({}), owner_doc(json!([{"limit": 5, "window_s": 60}])));
    let keys = ["ak_a", "ak_b", "ak_c", "ak_none"];
    let mut allowed = 0;
    for i in 0..12 {
        let o = g.run(&get("/x").key(keys[i % keys.len()]));
        if o.kind == Kind::Allowed {
            allowed += 1;
            // The owner's limit has the least remaining: it is the one described.
            assert_eq!(x_ratelimit(&o).0, Some("5"));
            assert_eq!(x_ratelimit(&o).1, Some((5 - allowed).to_string().as_str()));
        } else {
            assert_refused(&o, "rate_limited");
            assert_eq!(
                reply_x_ratelimit(&o),
                (Some("5"), Some("0"), Some(ts(T0 + 60).as_str()))
            );
            assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
        }
    }
    assert_eq!(
        allowed, 5,
        "an owner with four keys gets its allowance once"
    );
    // Another owner's keys are not held by it, and without limits of their own have no headers.
    let o = g.run(&get("/x").key("ak_other"));
    assert_allowed(&o);
    assert!(no_rate_headers(&o.response_headers));
    // The next window opens again.
    assert_allowed(&g.run_at(&get("/x").key("ak_a"), T0 + 60));
}

#[test]
fn step12_a_key_is_held_by_the_tighter_of_its_own_and_its_owners_limits() {
    let mut g = Gate::with_doc(
        json!({}),
        owner_doc(json!([{"limit": 50, "window_s": 60}, {"limit": 1000, "window_s": 86400}])),
    );
    // k_a's own limit (100/min) vs the owner's 50/min: the owner's has less remaining.
    let o = g.run(&get("/x").key("ak_a"));
    assert_eq!(
        x_ratelimit(&o),
        (Some("50"), Some("49"), Some(ts(T0 + 60).as_str()))
    );
    // A key with a tight limit of its own: its own is described, the owner's still counts.
    let mut g = Gate::with_doc(
        json!({}),
        doc(
            json!({"owners": {OWNER: {"rate_limits": [{"limit": 3, "window_s": 60}]}}}),
            vec![
                key_entry(
                    "k_tight",
                    "ak_tight",
                    json!({"rate_limits": [{"limit": 1, "window_s": 1}]}),
                ),
                key_entry("k_loose", "ak_loose", json!({})),
            ],
        ),
    );
    let o = g.run(&get("/x").key("ak_tight"));
    assert_eq!(
        x_ratelimit(&o).0,
        Some("1"),
        "0 left of 1/s beats 2 left of 3/min"
    );
    assert_eq!(x_ratelimit(&o).1, Some("0"));
    let o = g.run(&get("/x").key("ak_tight"));
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("1"));
    // Both refused requests counted against the owner too: one more for the other key.
    assert_allowed(&g.run(&get("/x").key("ak_loose")));
    let o = g.run(&get("/x").key("ak_loose"));
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_x_ratelimit(&o).0, Some("3"));
}

#[test]
fn step12_an_empty_or_absent_owner_limit_list_counts_nothing() {
    for limits in [json!([]), Value::Null] {
        let mut top = json!({"owners": {OWNER: {}}});
        if !limits.is_null() {
            top = json!({"owners": {OWNER: {"rate_limits": limits}}});
        }
        let mut g = Gate::with_doc(
            json!({}),
            doc(
                top,
                vec![key_entry("k_none", "ak_none", json!({"rate_limits": []}))],
            ),
        );
        for _ in 0..20 {
            let o = g.run(&get("/x").key("ak_none"));
            assert_allowed(&o);
            assert!(no_rate_headers(&o.response_headers));
        }
    }
}
