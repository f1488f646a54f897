//! The key-list fetch loop (`keygate_core::loader`) driven natively, with a fake clock and the
//! in-memory store: lease election and takeover, tokens, backoff, in-flight timeout, response
//! classification, and the last good list staying in force (SPEC §2, §5).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use keygate_core::config::KeyListSource;
use keygate_core::loader::{Answer, Fetch, FetchRequest, Loader, Report, LEASE_MS};
use keygate_core::publish::{self, Meta};
use keygate_core::shared::{key, MemoryStore, SetError, SharedStore};
use std::cell::{Cell, RefCell};

/// Unix ms at the start of every test.
const T: u64 = 1_800_000_000_000;
const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn source(refresh_s: u64) -> KeyListSource {
    KeyListSource {
        cluster: "keyservice".into(),
        path: "/v1/keys".into(),
        authority: "keys.internal".into(),
        headers: vec![("authorization".into(), "Bearer reader".into())],
        refresh_s,
        timeout_ms: 2_000,
        max_bytes: 4_096,
        fail_open: false,
        max_stale_s: 0,
    }
}

fn loader(store: &dyn SharedStore, refresh_s: u64) -> Loader {
    let mut l = Loader::default();
    l.configure(store, &source(refresh_s), 0);
    l
}

fn doc(ids: &[&str]) -> String {
    let keys: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let hash = format!("{}{:02x}", &HASH[..62], i);
            format!(r#"{{"id":"{id}","hash":"{hash}","owner":"org"}}"#)
        })
        .collect();
    format!(
        r#"{{"version":"v{}","keys":[{}]}}"#,
        ids.len(),
        keys.join(",")
    )
}

fn header<'a>(r: &'a FetchRequest, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Answers the fetch `call_id` with `status`, `etag` and `body`.
fn answer(
    l: &mut Loader,
    store: &MemoryStore,
    call_id: u32,
    status: &str,
    etag: Option<&str>,
    body: &str,
    now_ms: u64,
) -> Report {
    let bytes = body.as_bytes().to_vec();
    let mut read = |offset: usize, max: usize| {
        let end = (offset + max).min(bytes.len());
        bytes.get(offset..end).unwrap_or_default().to_vec()
    };
    l.on_response(
        store,
        call_id,
        Answer::Response {
            status: status.into(),
            etag: etag.map(str::to_string),
            body_size: body.len(),
        },
        &mut read,
        now_ms,
    )
}

/// Ticks until a fetch is asked for, dispatches it as `call_id`; the request.
fn fetch_at(l: &mut Loader, store: &MemoryStore, call_id: u32, now_ms: u64) -> FetchRequest {
    let (req, _) = l.tick(store, now_ms);
    let req = req.unwrap_or_else(|| panic!("no fetch asked for at +{} ms", now_ms - T));
    assert_eq!(l.dispatched(Ok(call_id), now_ms), Report::default());
    req
}

fn meta(store: &MemoryStore) -> Meta {
    publish::read_meta(store).expect("a published list")
}

#[test]
fn tokens_are_unique_and_one_loader_leads() {
    let store = MemoryStore::default();
    let mut loaders: Vec<Loader> = (0..4).map(|_| loader(&store, 30)).collect();
    let tokens: Vec<u64> = loaders.iter().map(|l| l.token() >> 24).collect();
    assert_eq!(tokens, [1, 2, 3, 4]);
    let asked: Vec<bool> = loaders
        .iter_mut()
        .map(|l| l.tick(&store, T).0.is_some())
        .collect();
    assert_eq!(asked, [true, false, false, false]);
    assert!(loaders[0].is_leader());
    // Reconfiguring keeps the token.
    let token = loaders[2].token();
    loaders[2].configure(&store, &source(30), 77);
    assert_eq!(loaders[2].token(), token);
}

#[test]
fn the_first_fetch_is_complete_and_publishes() {
    let store = MemoryStore::default();
    let mut l = loader(&store, 30);
    let req = fetch_at(&mut l, &store, 7, T);
    assert_eq!(header(&req, ":method"), Some("GET"));
    assert_eq!(header(&req, ":path"), Some("/v1/keys"));
    assert_eq!(header(&req, ":authority"), Some("keys.internal"));
    assert_eq!(header(&req, "authorization"), Some("Bearer reader"));
    assert_eq!(
        header(&req, "x-keygate-schema"),
        Some(keygate_core::loader::KEY_LIST_SCHEMA)
    );
    assert_eq!(
        header(&req, "if-none-match"),
        None,
        "nothing loaded: no ETag yet"
    );
    assert_eq!(req.timeout_ms, 2_000);
    // Another call's answer is not this loader's business.
    assert!(!l.awaits(8));
    assert!(l.awaits(7));
    let r = answer(
        &mut l,
        &store,
        7,
        "200",
        Some("\"e1\""),
        &doc(&["a", "b"]),
        T + 50,
    );
    assert_eq!(r.outcome, Some(Fetch::Ok));
    let m = r.published.expect("published");
    assert_eq!((m.keys, m.etag.as_deref()), (2, Some("\"e1\"")));
    assert_eq!(meta(&store), m);
    assert!(!l.awaits(7));
    // Nothing more until refresh_s after the dispatch.
    assert!(l.tick(&store, T + 29_999).0.is_none());
    let next = fetch_at(&mut l, &store, 8, T + 30_000);
    assert_eq!(header(&next, "if-none-match"), Some("\"e1\""));
}

#[test]
fn not_modified_keeps_the_list_and_counts_as_fresh() {
    let store = MemoryStore::default();
    let mut l = loader(&store, 30);
    fetch_at(&mut l, &store, 1, T);
    answer(&mut l, &store, 1, "200", Some("\"e1\""), &doc(&["a"]), T);
    let before = meta(&store);
    fetch_at(&mut l, &store, 2, T + 30_000);
    let r = answer(&mut l, &store, 2, "304", None, "", T + 30_100);
    assert_eq!(
        r,
        Report {
            outcome: Some(Fetch::NotModified),
            ..Report::default()
        }
    );
    let after = meta(&store);
    assert_eq!(after.generation, before.generation, "not re-published");
    assert_eq!(after.fetched_at_s, (T + 30_100) / 1000);
}

#[test]
fn not_modified_without_an_etag_sent_is_a_failure() {
    let store = MemoryStore::default();
    let mut l = loader(&store, 30);
    fetch_at(&mut l, &store, 1, T);
    // The service never sent an ETag, so the loader sent no If-None-Match: a 304 is broken.
    let r = answer(&mut l, &store, 1, "304", None, "", T + 10);
    assert_eq!(r.outcome, Some(Fetch::Failed));
    assert!(r.reason.unwrap().contains("304"));
    assert!(
        publish::read_meta(&store).is_none(),
        "nothing is loaded or touched"
    );
    // And with a list loaded from a service that sends no ETag, the same.
    fetch_at(&mut l, &store, 2, T + 1_010);
    answer(&mut l, &store, 2, "200", None, &doc(&["a"]), T + 1_020);
    let loaded = meta(&store);
    let req = fetch_at(&mut l, &store, 3, T + 31_020);
    assert_eq!(header(&req, "if-none-match"), None);
    let r = answer(&mut l, &store, 3, "304", None, "", T + 31_030);
    assert_eq!(r.outcome, Some(Fetch::Failed));
    assert_eq!(
        meta(&store),
        loaded,
        "freshness not extended by a bogus 304"
    );
}

#[test]
fn bad_answers_keep_the_last_good_list() {
    let store = MemoryStore::default();
    let mut l = loader(&store, 30);
    fetch_at(&mut l, &store, 1, T);
    answer(
        &mut l,
        &store,
        1,
        "200",
        Some("\"e1\""),
        &doc(&["a", "b"]),
        T,
    );
    let good = meta(&store);
    let mut now = T + 30_000;
    let cases: [(&str, String, Fetch, &str); 5] = [
        ("500", "oops".into(), Fetch::Failed, "status 500"),
        (
            "200",
            format!("{:5000}", ""),
            Fetch::Rejected,
            "over max_bytes 4096",
        ),
        (
            "200",
            "{\"keys\":[".into(),
            Fetch::Rejected,
            "document rejected",
        ),
        (
            "200",
            r#"{"keys":[{"id":"x"}]}"#.into(),
            Fetch::Rejected,
            "document rejected",
        ),
        ("200", doc(&["a", "a"]), Fetch::Rejected, "duplicate"),
    ];
    for (i, (status, body, want, why)) in cases.into_iter().enumerate() {
        let call = 10 + i as u32;
        // Backoff after each failure: at most refresh_s, so a minute always reaches the next.
        let mut asked = None;
        for _ in 0..600 {
            if let (Some(_), _) = l.tick(&store, now) {
                asked = Some(now);
                break;
            }
            now += 100;
        }
        assert!(asked.is_some(), "case {i}: no retry");
        assert_eq!(l.dispatched(Ok(call), now), Report::default());
        let r = answer(&mut l, &store, call, status, None, &body, now);
        assert_eq!(r.outcome, Some(want), "case {i}");
        assert!(
            r.reason.as_deref().unwrap().contains(why),
            "case {i}: {:?}",
            r.reason
        );
        assert!(r.published.is_none());
        assert_eq!(meta(&store), good, "case {i}: the last good list stays");
    }
    // No answer at all (connection failure or timeout reported by the host).
    let (req, _) = l.tick(&store, now + 60_000);
    assert!(req.is_some());
    l.dispatched(Ok(99), now + 60_000);
    let r = l.on_response(
        &store,
        99,
        Answer::None,
        &mut |_: usize, _: usize| Vec::new(),
        now + 60_001,
    );
    assert_eq!(r.outcome, Some(Fetch::Failed));
    assert_eq!(meta(&store), good);
}

#[test]
fn failures_back_off_1_2_4_up_to_refresh() {
    let store = MemoryStore::default();
    let mut l = loader(&store, 10);
    let mut now = T;
    let mut waits = Vec::new();
    let mut last = now;
    for _ in 0..6 {
        // Tick every 100 ms until a fetch is asked for.
        loop {
            let (req, _) = l.tick(&store, now);
            if req.is_some() {
                break;
            }
            now += 100;
        }
        waits.push(now - last);
        last = now;
        let r = l.dispatched(Err(()), now);
        assert_eq!(r.outcome, Some(Fetch::Failed));
    }
    assert_eq!(waits, [0, 1_000, 2_000, 4_000, 8_000, 10_000]);
    // A success resets the backoff: the next failure waits 1 s again.
    loop {
        if l.tick(&store, now).0.is_some() {
            break;
        }
        now += 100;
    }
    l.dispatched(Ok(1), now);
    answer(&mut l, &store, 1, "200", None, &doc(&["a"]), now);
    now += 10_000;
    assert!(l.tick(&store, now).0.is_some());
    l.dispatched(Ok(2), now);
    answer(&mut l, &store, 2, "503", None, "", now);
    assert!(l.tick(&store, now + 900).0.is_none());
    assert!(l.tick(&store, now + 1_000).0.is_some());
}

#[test]
fn a_fetch_the_host_never_answers_is_given_up() {
    let store = MemoryStore::default();
    let mut l = loader(&store, 30);
    fetch_at(&mut l, &store, 1, T);
    // timeout_ms 2000 + grace 1000: still waiting at +3 s.
    let (req, report) = l.tick(&store, T + 3_000);
    assert!(req.is_none());
    assert_eq!(report, Report::default());
    let (req, report) = l.tick(&store, T + 3_001);
    assert_eq!(report.outcome, Some(Fetch::Failed));
    assert!(req.is_none(), "the retry waits for its backoff");
    assert!(!l.awaits(1));
    assert!(l.tick(&store, T + 4_001).0.is_some());
    // A late answer to the abandoned call changes nothing.
    let r = answer(&mut l, &store, 1, "200", None, &doc(&["a"]), T + 4_002);
    assert_eq!(r, Report::default());
    assert!(publish::read_meta(&store).is_none());
}

#[test]
fn a_dead_leader_is_replaced_and_the_new_one_keeps_the_schedule() {
    let store = MemoryStore::default();
    let mut a = loader(&store, 30);
    let mut b = loader(&store, 30);
    fetch_at(&mut a, &store, 1, T);
    answer(
        &mut a,
        &store,
        1,
        "200",
        Some("\"e1\""),
        &doc(&["a"]),
        T + 100,
    );
    // While `a` renews, `b` never leads.
    for t in (T + 100..T + 20_000).step_by(100) {
        a.tick(&store, t);
        assert!(b.tick(&store, t).0.is_none());
        assert!(!b.is_leader());
    }
    // `a` dies at +20 s; its lease holds LEASE_MS more.
    let died = T + 19_900;
    assert!(b.tick(&store, died + LEASE_MS - 1).0.is_none());
    assert!(!b.is_leader());
    let (req, _) = b.tick(&store, died + LEASE_MS);
    assert!(b.is_leader());
    assert!(
        req.is_none(),
        "the list fetched at +0.1 s is not due before +30.1 s"
    );
    let mut t = died + LEASE_MS;
    while b.tick(&store, t).0.is_none() {
        t += 100;
    }
    assert_eq!(
        t / 1000,
        (T + 100) / 1000 + 30,
        "due refresh_s after the last fetch"
    );
    b.dispatched(Ok(5), t);
    let req_etag = answer(&mut b, &store, 5, "304", None, "", t + 10);
    assert_eq!(
        req_etag.outcome,
        Some(Fetch::NotModified),
        "b sent the ETag a published"
    );
    // `a` comes back: it no longer leads.
    assert!(a.tick(&store, t + 100).0.is_none());
    assert!(!a.is_leader());
}

#[test]
fn a_new_leader_with_nothing_loaded_fetches_at_once() {
    let store = MemoryStore::default();
    let mut a = loader(&store, 30);
    let mut b = loader(&store, 30);
    a.tick(&store, T);
    a.dispatched(Err(()), T);
    // `a` dies; `b` takes over after the lease and fetches at once: nothing is loaded.
    assert!(b.tick(&store, T + LEASE_MS).0.is_some());
}

#[test]
fn the_lease_is_held_across_a_long_publish() {
    let store = MemoryStore::default();
    let mut a = loader(&store, 30);
    let mut b = loader(&store, 30);
    fetch_at(&mut a, &store, 1, T);
    answer(&mut a, &store, 1, "200", None, &doc(&["a"]), T + 100);
    // Parsing blocked `a`'s thread for 60 s: `b` must not take over meanwhile.
    assert!(b.tick(&store, T + 60_000).0.is_none());
    assert!(!b.is_leader());
}

/// A store that lets another loader act between a loader's read of the lease and its write.
struct Racing<'a> {
    inner: &'a MemoryStore,
    rival: RefCell<Option<&'a mut Loader>>,
    now_ms: u64,
    raced: Cell<bool>,
}

impl SharedStore for Racing<'_> {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        if key == key::LEASE && !self.raced.get() {
            self.raced.set(true);
            if let Some(rival) = self.rival.borrow_mut().take() {
                // The rival reads, decides and writes the lease first.
                assert!(rival.tick(self.inner, self.now_ms).0.is_some());
            }
        }
        self.inner.set(key, value, cas)
    }
}

#[test]
fn two_would_be_leaders_racing_on_the_lease_elect_one() {
    let store = MemoryStore::default();
    let mut a = loader(&store, 30);
    let mut b = loader(&store, 30);
    let racing = Racing {
        inner: &store,
        rival: RefCell::new(Some(&mut b)),
        now_ms: T,
        raced: Cell::new(false),
    };
    // `a` read the lease free; `b` took it before `a` wrote: `a`'s CAS fails, it reads again
    // and sees `b` holding it.
    assert!(a.tick(&racing, T).0.is_none());
    assert!(racing.raced.get());
    assert!(!a.is_leader());
    let Racing { rival, .. } = racing;
    assert!(rival.into_inner().is_none(), "the rival acted");
    assert!(b.is_leader());
    assert!(a.tick(&store, T + 100).0.is_none());
}

#[test]
fn first_takers_racing_on_the_token_sequence_still_differ() {
    // Envoy cannot create a shared-data key atomically: two first takers both read "absent" and
    // both write 1. Their salts (the host's nanosecond clock) keep their tokens apart.
    let (s1, s2) = (MemoryStore::default(), MemoryStore::default());
    let mut a = Loader::default();
    let mut b = Loader::default();
    a.configure(&s1, &source(30), 1_000_001);
    b.configure(&s2, &source(30), 1_000_002);
    assert_eq!(a.token() >> 24, b.token() >> 24);
    assert_ne!(a.token(), b.token());
}

#[test]
fn an_answer_arriving_after_the_lease_passed_on_is_not_published() {
    let store = MemoryStore::default();
    let mut a = loader(&store, 30);
    let mut b = loader(&store, 30);
    fetch_at(&mut a, &store, 1, T);
    // `a`'s thread stalls for a minute: `b` takes the lease and leads.
    assert!(b.tick(&store, T + 60_000).0.is_some());
    let r = answer(&mut a, &store, 1, "200", None, &doc(&["a"]), T + 60_001);
    assert_eq!(r.outcome, None);
    assert!(r.published.is_none());
    assert!(publish::read_meta(&store).is_none());
}

/// A big enough list to spill: `n` keys with distinct hashes.
fn big_doc(n: usize) -> String {
    let keys: Vec<String> = (0..n)
        .map(|i| {
            let hash = format!(
                "{:064x}",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
            );
            format!(r#"{{"id":"k{i}","hash":"{hash}","owner":"org"}}"#)
        })
        .collect();
    format!(r#"{{"version":"big","keys":[{}]}}"#, keys.join(","))
}

#[test]
fn deferred_publish_with_staged_records() {
    let store = MemoryStore::default();
    let mut l = Loader::default();
    let mut src = source(30);
    src.max_bytes = 64 << 20;
    l.configure(&store, &src, 0);
    l.set_deferred_publish(true);
    l.set_staging(true);
    fetch_at(&mut l, &store, 1, T);
    let body = big_doc(30_000);
    let r = answer(&mut l, &store, 1, "200", Some("\"big\""), &body, T + 10);
    assert_eq!(r, Report::default(), "parsed, not yet published");
    assert!(l.has_pending());
    assert!(publish::read_meta(&store).is_none());
    let counts = store.get(key::STAGE_COUNTS).0.expect("records were staged");
    let r = l.publish_pending(&store, T + 11);
    assert_eq!(r.outcome, Some(Fetch::Ok));
    assert_eq!(r.published.expect("published").keys, 30_000);
    assert!(!l.has_pending());
    assert_eq!(meta(&store).keys, 30_000);
    // Every staged chunk was emptied once published.
    let text = String::from_utf8(counts).unwrap();
    for (s, n) in text.split(',').enumerate() {
        for k in 0..n.parse::<u32>().unwrap() {
            assert_eq!(
                store.get(&key::stage(s as u8, k)).0,
                Some(vec![]),
                "chunk {s}:{k}"
            );
        }
    }
    assert_eq!(publish::shared_entries(&store), store.len() as u64);
    // A bad document is rejected at once and leaves nothing pending or staged.
    fetch_at(&mut l, &store, 2, T + 30_010);
    let bad = body.replace(r#""id":"k7","#, r#""id":"k8","#);
    let r = answer(&mut l, &store, 2, "200", Some("\"bad\""), &bad, T + 30_020);
    assert_eq!(r.outcome, Some(Fetch::Rejected));
    assert!(!l.has_pending());
    assert_eq!(meta(&store).keys, 30_000);
    assert_eq!(publish::shared_entries(&store), store.len() as u64);
}

#[test]
fn a_pending_list_is_dropped_when_the_lease_passed_on() {
    let store = MemoryStore::default();
    let mut a = loader(&store, 30);
    a.set_deferred_publish(true);
    let mut b = loader(&store, 30);
    fetch_at(&mut a, &store, 1, T);
    let r = answer(&mut a, &store, 1, "200", None, &doc(&["a"]), T + 1);
    assert_eq!(r, Report::default());
    // `a` stalls past its publish lease: `b` leads, and `a` drops what it parsed.
    assert!(b.tick(&store, T + 200_000).0.is_some());
    let r = a.publish_pending(&store, T + 200_001);
    assert!(r.published.is_none() && r.outcome.is_none());
    assert!(!a.has_pending());
    assert!(publish::read_meta(&store).is_none());
}
