//! §4 rate-limit header styles.

use super::fixtures::*;

fn style_gate(style: &str) -> Gate {
    Gate::with_key(
        json!({"rate_limit": {"headers": style}}),
        json!({"rate_limits": [{"limit": 60, "window_s": 60}]}),
    )
}

#[test]
fn headers_x_ratelimit_is_the_default() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 60, "window_s": 60}]}),
    );
    let o = g.run_at(&get("/x").key(KEY), T0 + 26);
    assert_eq!(
        x_ratelimit(&o),
        (Some("60"), Some("59"), Some(ts(T0 + 60).as_str()))
    );
    assert_eq!(resp_hdr(&o, "ratelimit"), None);
    assert_eq!(resp_hdr(&o, "ratelimit-policy"), None);
}

#[test]
fn headers_ietf() {
    let mut g = style_gate("ietf");
    for _ in 0..47 {
        g.run_at(&get("/x").key(KEY), T0 + 26);
    }
    let o = g.run_at(&get("/x").key(KEY), T0 + 26);
    assert_allowed(&o);
    assert_eq!(
        resp_hdr(&o, "ratelimit-policy"),
        Some("\"default\";q=60;w=60")
    );
    assert_eq!(resp_hdr(&o, "ratelimit"), Some("\"default\";r=12;t=34"));
    assert_eq!(x_ratelimit(&o), (None, None, None));
}

#[test]
fn headers_both() {
    let mut g = style_gate("both");
    let o = g.run_at(&get("/x").key(KEY), T0 + 26);
    assert_eq!(
        x_ratelimit(&o),
        (Some("60"), Some("59"), Some(ts(T0 + 60).as_str()))
    );
    assert_eq!(
        resp_hdr(&o, "ratelimit-policy"),
        Some("\"default\";q=60;w=60")
    );
    assert_eq!(resp_hdr(&o, "ratelimit"), Some("\"default\";r=59;t=34"));
}

#[test]
fn headers_none() {
    let mut g = Gate::with_key(
        json!({"rate_limit": {"headers": "none"}}),
        json!({"rate_limits": [{"limit": 1, "window_s": 60}]}),
    );
    let o = g.run(&get("/x").key(KEY));
    assert_allowed(&o);
    assert!(no_rate_headers(&o.response_headers), "{o:?}");
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert!(no_rate_headers(&o.reply.as_ref().unwrap().headers), "{o:?}");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
}

#[test]
fn headers_ietf_on_rate_limited() {
    let mut g = Gate::with_key(
        json!({"rate_limit": {"headers": "ietf"}}),
        json!({"rate_limits": [{"limit": 2, "window_s": 60}]}),
    );
    g.run(&get("/x").key(KEY));
    g.run(&get("/x").key(KEY));
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert_eq!(
        reply_hdr(&o, "ratelimit-policy"),
        Some("\"default\";q=2;w=60")
    );
    assert_eq!(reply_hdr(&o, "ratelimit"), Some("\"default\";r=0;t=50"));
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(reply_hdr(&o, "x-ratelimit-limit"), None);
}
