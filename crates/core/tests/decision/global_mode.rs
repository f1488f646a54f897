//! Step 12 in global mode (extension `rate_limit.global`): the limits go to a Rate Limit
//! Service as descriptors, and its answer decides exactly as local counts would; failures follow
//! `failure_mode`. The service here is a model: fixed-window counters per descriptor entries,
//! honouring the descriptor's limit override, answering with the standard protobuf bytes.

use super::fixtures::*;
use keygate_core::config::FailureMode;
use keygate_core::decision::{settle, GlobalAnswer, GlobalCheck, GlobalFailure, GlobalResult};
use keygate_core::rls::{Descriptor, Subject};
use std::collections::HashMap;

fn global_cfg(mode: &str) -> Value {
    json!({"rate_limit": {"global": {"cluster": "rls", "domain": "api", "failure_mode": mode}}})
}

/// A minimal protobuf writer for the model service's replies.
fn field(out: &mut Vec<u8>, n: u64, bytes: Option<&[u8]>, v: u64) {
    let put = |out: &mut Vec<u8>, mut v: u64| {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    };
    match bytes {
        Some(b) => {
            put(out, n << 3 | 2);
            put(out, b.len() as u64);
            out.extend_from_slice(b);
        }
        None => {
            put(out, n << 3);
            put(out, v);
        }
    }
}

/// Fixed windows per (subject, id, window), like envoyproxy/ratelimit over Redis.
#[derive(Default)]
struct ModelRls {
    counts: HashMap<(bool, String, u64, u64), u64>,
    calls: usize,
}

impl ModelRls {
    fn answer(&mut self, descriptors: &[Descriptor], now_s: u64) -> Vec<u8> {
        self.calls += 1;
        let mut statuses = Vec::new();
        let mut any_over = false;
        for d in descriptors {
            let w = d.limit.window_s;
            let start = now_s - now_s % w;
            let c = self
                .counts
                .entry((d.subject == Subject::Key, d.id.to_string(), w, start))
                .or_default();
            *c += 1;
            let over = *c > d.limit.limit;
            any_over |= over;
            let unit = match w {
                1 => 1,
                60 => 2,
                3600 => 3,
                _ => 4,
            };
            let mut limit = Vec::new();
            field(&mut limit, 1, None, d.limit.limit);
            field(&mut limit, 2, None, unit);
            let mut dur = Vec::new();
            field(&mut dur, 1, None, start + w - now_s);
            let mut s = Vec::new();
            field(&mut s, 1, None, if over { 2 } else { 1 });
            field(&mut s, 2, Some(&limit), 0);
            field(&mut s, 3, None, d.limit.limit.saturating_sub(*c));
            field(&mut s, 4, Some(&dur), 0);
            statuses.push(s);
        }
        let mut out = Vec::new();
        field(&mut out, 1, None, if any_over { 2 } else { 1 });
        for s in &statuses {
            field(&mut out, 2, Some(s), 0);
        }
        out
    }
}

impl Gate {
    /// One request through `decide` and, when it waits for the service, `settle` with `answer`.
    fn run_global(
        &mut self,
        r: &Req,
        now: u64,
        answer: impl FnOnce(&GlobalCheck) -> Option<Vec<u8>>,
        failure: GlobalAnswer<'static>,
    ) -> (Outcome, Option<GlobalResult>) {
        let o = self.run_at(r, now);
        let Some(check) = o.global.clone() else {
            return (o, None);
        };
        let bytes = answer(&check);
        let a = match &bytes {
            Some(b) => GlobalAnswer::Reply(b),
            None => failure,
        };
        let (o, result) = settle(
            &self.cfg,
            &self.store,
            o,
            a,
            now * 1000 + 250,
            now * 1000 + 400,
        );
        assert!(o.global.is_none());
        (o, Some(result))
    }
}

fn doc_two_keys() -> Value {
    doc(
        json!({}),
        vec![
            the_key(
                json!({"rate_limits": [{"limit": 3, "window_s": 60}, {"limit": 100, "window_s": 86400}]}),
            ),
            key_entry("key_free", "ak_free", json!({"rate_limits": []})),
        ],
    )
}

#[test]
fn global_a_limited_key_waits_for_the_service_an_unlimited_one_does_not() {
    let mut g = Gate::with_doc(global_cfg("local"), doc_two_keys());
    let o = g.run(&get("/x").key(KEY));
    assert_eq!(
        o.kind,
        Kind::Allowed,
        "what it gets if no limit is exceeded"
    );
    let check = o.global.as_deref().expect("waits for the service");
    assert_eq!(check.key_id, KEY_ID);
    assert_eq!(check.owner, OWNER);
    assert_eq!(check.key_limits.len(), 2);
    assert!(check.owner_limits.is_empty());
    assert!(
        o.response_headers.is_empty(),
        "headers come from the answer"
    );
    // Nothing was counted locally.
    let mut local = Gate::with_doc(json!({}), doc_two_keys());
    assert_eq!(
        x_ratelimit(&local.run(&get("/x").key(KEY))).1,
        Some("2"),
        "a fresh local store"
    );
    let o = g.run(&get("/x").key("ak_free"));
    assert!(o.global.is_none());
    assert_allowed(&o);
}

#[test]
fn global_answers_give_exactly_the_local_headers_429_and_retry_after() {
    let mut local = Gate::with_doc(json!({}), doc_two_keys());
    let mut global = Gate::with_doc(global_cfg("deny"), doc_two_keys());
    let mut rls = ModelRls::default();
    for i in 0..6 {
        let now = NOW + i * 7;
        let want = local.run_at(&get("/x").key(KEY), now);
        let (got, result) = global.run_global(
            &get("/x").key(KEY),
            now,
            |c| Some(rls.answer(&c.descriptors(), now)),
            GlobalAnswer::Unavailable,
        );
        assert_eq!(result, Some(GlobalResult::Answered));
        assert_eq!(got, want, "request {i}");
    }
    assert_eq!(rls.calls, 6);
    // Retry-After of the last refusal: until the minute ends.
    let (o, _) = global.run_global(
        &get("/x").key(KEY),
        T0 + 59,
        |c| Some(rls.answer(&c.descriptors(), T0 + 59)),
        GlobalAnswer::Unavailable,
    );
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("1"));
    assert_eq!(body(&o), rate_limited_body(1));
}

#[test]
fn global_the_identity_endpoint_carries_the_answers_headers() {
    let cfg = merge_v(global_cfg("local"), json!({"whoami": {"path": "/me"}}));
    let mut g = Gate::with_doc(cfg, doc_two_keys());
    let mut rls = ModelRls::default();
    let (o, _) = g.run_global(
        &get("/me").key(KEY),
        NOW,
        |c| Some(rls.answer(&c.descriptors(), NOW)),
        GlobalAnswer::Unavailable,
    );
    assert_eq!(o.kind, Kind::Whoami);
    assert_eq!(status(&o), 200);
    assert_eq!(
        reply_x_ratelimit(&o),
        (Some("3"), Some("2"), Some(ts(T0 + 60).as_str()))
    );
}

#[test]
fn global_failure_local_counts_exactly_in_this_instance() {
    let mut g = Gate::with_doc(global_cfg("local"), doc_two_keys());
    for (answer, why) in [
        (GlobalAnswer::Timeout, GlobalFailure::Timeout),
        (GlobalAnswer::Unavailable, GlobalFailure::Unavailable),
        (GlobalAnswer::Reply(b"\xff\xff"), GlobalFailure::BadReply),
    ] {
        let (o, result) = g.run_global(&get("/x").key(KEY), NOW, |_| None, answer);
        assert_eq!(result, Some(GlobalResult::Failed(why, FailureMode::Local)));
        assert_allowed(&o);
        assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
    }
    let (o, _) = g.run_global(&get("/x").key(KEY), NOW, |_| None, GlobalAnswer::Timeout);
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_x_ratelimit(&o).0, Some("3"));
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
}

#[test]
fn global_failure_allow_passes_without_headers_and_deny_answers_unavailable() {
    let mut g = Gate::with_doc(global_cfg("allow"), doc_two_keys());
    for _ in 0..5 {
        let (o, result) = g.run_global(&get("/x").key(KEY), NOW, |_| None, GlobalAnswer::Timeout);
        assert_eq!(
            result,
            Some(GlobalResult::Failed(
                GlobalFailure::Timeout,
                FailureMode::Allow
            ))
        );
        assert_allowed(&o);
        assert!(no_rate_headers(&o.response_headers));
        assert!(up1(&upstream(&get("/x").key(KEY), &o), "x-api-key-id").is_some());
    }
    let mut g = Gate::with_doc(global_cfg("deny"), doc_two_keys());
    let (o, result) = g.run_global(
        &get("/x").key(KEY),
        NOW,
        |_| None,
        GlobalAnswer::Unavailable,
    );
    assert_eq!(
        result,
        Some(GlobalResult::Failed(
            GlobalFailure::Unavailable,
            FailureMode::Deny
        ))
    );
    assert_refused(&o, "unavailable");
    assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
}

#[test]
fn global_a_reply_for_other_descriptors_is_a_bad_reply() {
    let mut g = Gate::with_doc(global_cfg("deny"), doc_two_keys());
    let mut rls = ModelRls::default();
    let (o, result) = g.run_global(
        &get("/x").key(KEY),
        NOW,
        // One status for two descriptors.
        |c| Some(rls.answer(&c.descriptors()[..1], NOW)),
        GlobalAnswer::Unavailable,
    );
    assert_eq!(
        result,
        Some(GlobalResult::Failed(
            GlobalFailure::BadReply,
            FailureMode::Deny
        ))
    );
    assert_refused(&o, "unavailable");
}

#[test]
fn global_configuration_fields_and_errors() {
    let c = config(json!({"rate_limit": {"global": {"cluster": "rls"}}}));
    let g = c.global.unwrap();
    assert_eq!(
        (
            g.cluster.as_str(),
            g.domain.as_str(),
            g.timeout_ms,
            g.failure_mode
        ),
        ("rls", "keygate", 100, FailureMode::Local)
    );
    assert!(config(json!({})).global.is_none());
    let err = |extra: Value| {
        let mut v = json!({"key_list": {"cluster": "k", "path": "/"}});
        merge(&mut v, extra);
        keygate_core::config::parse(v.to_string().as_bytes())
            .unwrap_err()
            .to_string()
    };
    for (extra, needles) in [
        (
            json!({"rate_limit": {"default": [{"limit": 5, "window_s": 60}, {"limit": 5, "window_s": 7}],
                                   "global": {"cluster": "rls"}}}),
            &[
                "rate_limit.default[1].window_s",
                "7 is not one of 1, 60, 3600, 86400",
            ][..],
        ),
        (
            json!({"rate_limit": {"global": {"cluster": "rls", "failure_mode": "open"}}}),
            &["rate_limit.global.failure_mode", "open"][..],
        ),
        (
            json!({"rate_limit": {"global": {"cluster": ""}}}),
            &["rate_limit.global.cluster"][..],
        ),
        (
            json!({"rate_limit": {"global": {"cluster": "rls", "timeout_ms": 0}}}),
            &["rate_limit.global.timeout_ms", "0"][..],
        ),
        (
            json!({"rate_limit": {"global": {"cluster": "rls", "domain": ""}}}),
            &["rate_limit.global.domain"][..],
        ),
        (
            json!({"rate_limit": {"global": {"cluster": "rls", "clustr": "x"}}}),
            &["clustr"][..],
        ),
        (
            json!({"rate_limit": {"global": {"domain": "x"}}}),
            &["cluster"][..],
        ),
    ] {
        let e = err(extra.clone());
        for n in needles {
            assert!(e.contains(n), "error {e:?} for {extra} lacks {n:?}");
        }
    }
    // Without global mode any window is fine.
    config(json!({"rate_limit": {"default": [{"limit": 5, "window_s": 7}]}}));
}

#[test]
fn global_owner_limits_are_descriptors_too() {
    let d = doc(
        json!({"owners": {OWNER: {"rate_limits": [{"limit": 4, "window_s": 60}]}}}),
        vec![
            key_entry(
                "k_a",
                "ak_a",
                json!({"rate_limits": [{"limit": 100, "window_s": 60}]}),
            ),
            key_entry("k_b", "ak_b", json!({"rate_limits": []})),
        ],
    );
    let mut g = Gate::with_doc(global_cfg("deny"), d.clone());
    let mut local = Gate::with_doc(json!({}), d);
    let mut rls = ModelRls::default();
    for i in 0..6 {
        let k = ["ak_a", "ak_b"][i % 2];
        let want = local.run(&get("/x").key(k));
        let (got, _) = g.run_global(
            &get("/x").key(k),
            NOW,
            |c| {
                let ds = c.descriptors();
                assert_eq!(ds.last().unwrap().subject, Subject::Owner);
                assert_eq!(ds.last().unwrap().id, OWNER);
                Some(rls.answer(&ds, NOW))
            },
            GlobalAnswer::Unavailable,
        );
        assert_eq!(got, want, "request {i}");
    }
}

#[test]
fn global_a_document_window_the_protocol_cannot_express_is_rejected_naming_the_limit() {
    use keygate_core::keylist::{parse_with, Rules};
    let rules = Rules { unit_windows: true };
    let base = |top: Value, key: Value| doc(top, vec![the_key(key)]).to_string();
    for (text, path) in [
        (
            base(
                json!({}),
                json!({"rate_limits": [{"limit": 1, "window_s": 60}, {"limit": 1, "window_s": 30}]}),
            ),
            "keys[0].rate_limits[1].window_s",
        ),
        (
            base(
                json!({"plans": {"p": {"rate_limits": [{"limit": 1, "window_s": 7}]}}}),
                json!({"plan": "p"}),
            ),
            "plans.p.rate_limits[0].window_s",
        ),
        (
            base(
                json!({"owners": {OWNER: {"rate_limits": [{"limit": 1, "window_s": 120}]}}}),
                json!({}),
            ),
            "owners.org-1.rate_limits[0].window_s",
        ),
    ] {
        let e = parse_with(text.as_bytes(), rules).unwrap_err();
        assert_eq!(e.path, path, "{e}");
        assert!(
            e.to_string().contains("is not one of 1, 60, 3600, 86400"),
            "{e}"
        );
        // Local mode takes any window.
        keygate_core::keylist::parse(text.as_bytes()).unwrap();
    }
    let ok = base(
        json!({}),
        json!({"rate_limits": [{"limit": 1, "window_s": 3600}, {"limit": 1, "window_s": 86400}]}),
    );
    parse_with(ok.as_bytes(), rules).unwrap();
}

#[test]
fn global_shadowed_rate_limits_take_the_services_counts_and_let_the_request_on() {
    let cfg = merge_v(global_cfg("deny"), json!({"shadow": {"rate_limits": true}}));
    let mut g = Gate::with_doc(cfg, doc_two_keys());
    let mut rls = ModelRls::default();
    let mut kinds = Vec::new();
    for _ in 0..5 {
        let (o, result) = g.run_global(
            &get("/x").key(KEY),
            NOW,
            |c| Some(rls.answer(&c.descriptors(), NOW)),
            GlobalAnswer::Unavailable,
        );
        assert_eq!(result, Some(GlobalResult::Answered));
        assert!(o.reply.is_none(), "{o:?}");
        assert_eq!(resp_hdr(&o, "retry-after"), None);
        kinds.push(o.kind);
    }
    assert_eq!(&kinds[..3], &[Kind::Allowed; 3]);
    assert_eq!(&kinds[3..], &[Kind::Shadow(Class::RateLimited); 2]);
    // `deny` on a failed call is shadowed too: the request goes on, reported as unavailable.
    let (o, result) = g.run_global(&get("/x").key(KEY), NOW, |_| None, GlobalAnswer::Timeout);
    assert_eq!(
        result,
        Some(GlobalResult::Failed(
            GlobalFailure::Timeout,
            FailureMode::Deny
        ))
    );
    assert_eq!(o.kind, Kind::Shadow(Class::Unavailable));
    assert!(o.reply.is_none());
    assert!(up1(&upstream(&get("/x").key(KEY), &o), "x-api-key-id").is_some());
}
