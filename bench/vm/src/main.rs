//! `keygate-bench-vm CONFIG LIST N`: N decisions of `make bench`'s D request (an allowed key on
//! `GET /v1/svc9/items/42` from 127.0.0.1) against the configuration and key list in the two
//! files, with the in-memory shared store standing in for the host's. Prints one line of
//! `name value` pairs: wall µs per decision, and per SHA-256 of the key alone (the `sha2` crate,
//! as in the decision), the share of the decision no code of keygate's can shrink.

use keygate_core::bucket_cache::BucketCache;
use keygate_core::decision::{self, ListState, Request};
use keygate_core::publish::{self, Publisher};
use keygate_core::shared::MemoryStore;
use keygate_core::{config, counters, keylist};
use sha2::Digest;
use std::hint::black_box;
use std::time::Instant;

const KEY: &str = "kg_3f5e847c2d9e13ec30f57de85c191d109af7208c";
const NOW_S: u64 = 1_800_000_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(cfg_path), Some(list_path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: keygate-bench-vm CONFIG LIST [N]");
        std::process::exit(2);
    };
    if cfg_path == "load" {
        load(list_path);
        return;
    }
    let n: u32 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| fail(&format!("{p}: {e}")));
    let cfg = config::parse(&read(cfg_path)).unwrap_or_else(|e| fail(&e.to_string()));
    let mut list = keylist::parse(&read(list_path)).unwrap_or_else(|e| fail(&e.to_string()));
    let store = MemoryStore::default();
    counters::ensure_counter_slots(&store);
    let source = cfg.key_list.source_id();
    if Publisher::default()
        .publish(&store, &mut list, None, &source, NOW_S)
        .is_none()
    {
        fail("the list was not published");
    }
    let mut state = ListState::from_meta(publish::read_meta(&store).as_ref(), &source);
    let mut cache = BucketCache::default();
    // What Envoy hands a filter for `wrk -H 'x-api-key: …' http://127.0.0.1:PORT/v1/svc9/items/42`.
    let headers: Vec<(String, Vec<u8>)> = [
        (":authority", "127.0.0.1:10000"),
        (":path", "/v1/svc9/items/42"),
        (":method", "GET"),
        (":scheme", "http"),
        ("x-api-key", KEY),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "6b1f1c1e-4c8e-4b1e-9d1e-1c1e4c8e4b1e"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
    .collect();

    // proxy-wasm's V8 compiles every function with TurboFan at once (no Liftoff; bench/vm.py
    // runs Node with `--no-liftoff` to match). With Liftoff on, V8 optimizes a function only
    // once it has been called often enough and never a loop while it runs, so each measured
    // body is a function of its own, called per iteration after n/4 calls of warm-up: a run
    // without the flag reads the same.
    for i in 0..n / 4 {
        black_box(decide_once(
            &cfg, &mut state, &mut cache, &store, &headers, i,
        ));
    }
    let mut allowed = 0u32;
    let t = Instant::now();
    for i in 0..n {
        allowed += u32::from(decide_once(
            &cfg, &mut state, &mut cache, &store, &headers, i,
        ));
    }
    let decide = per_call(t, n);
    if allowed != n {
        fail(&format!("only {allowed} of {n} requests were allowed"));
    }

    let sha = time_calls(n, || sha2::Sha256::digest(black_box(KEY.as_bytes())).into());
    println!("decide_us {decide:.3} sha256_us {sha:.3}");
}

/// `keygate-bench-vm load LIST`: wall seconds to parse the key list and to publish it into the
/// in-memory store (the host's shared data in Envoy), as `parse_s P publish_s Q keys N`.
fn load(list_path: &str) {
    let body = std::fs::read(list_path).unwrap_or_else(|e| fail(&format!("{list_path}: {e}")));
    let t = Instant::now();
    let mut list = keylist::parse(&body).unwrap_or_else(|e| fail(&e.to_string()));
    let parse_s = t.elapsed().as_secs_f64();
    let keys = list.len();
    let store = MemoryStore::default();
    let t = Instant::now();
    if Publisher::default()
        .publish(&store, &mut list, None, "bench", NOW_S)
        .is_none()
    {
        fail("the list was not published");
    }
    let publish_s = t.elapsed().as_secs_f64();
    println!("parse_s {parse_s:.3} publish_s {publish_s:.3} keys {keys}");
}

/// One decision of the D request at `NOW_S` + i/50,000 seconds; true when it was allowed.
#[inline(never)]
fn decide_once(
    cfg: &config::Config,
    state: &mut ListState,
    cache: &mut BucketCache,
    store: &MemoryStore,
    headers: &[(String, Vec<u8>)],
    i: u32,
) -> bool {
    let refs = decision::header_refs(headers);
    let req = Request {
        headers: &refs,
        source: &|| Some([127, 0, 0, 1].into()),
    };
    let now = NOW_S + u64::from(i / 50_000);
    let o = decision::decide_cached(cfg, state, cache, store, black_box(&req), now);
    o.reply.is_none()
}

/// Wall µs per call of `f` over n calls, after n/4 calls of warm-up (see `main`).
fn time_calls(n: u32, f: impl Fn() -> [u8; 32]) -> f64 {
    #[inline(never)]
    fn once(f: &dyn Fn() -> [u8; 32]) -> u8 {
        f()[0]
    }
    let mut x = 0u8;
    for _ in 0..n / 4 {
        x ^= once(&f);
    }
    let t = Instant::now();
    for _ in 0..n {
        x ^= once(&f);
    }
    black_box(x);
    per_call(t, n)
}

fn per_call(t: Instant, n: u32) -> f64 {
    t.elapsed().as_secs_f64() * 1e6 / f64::from(n.max(1))
}

fn fail(msg: &str) -> ! {
    eprintln!("keygate-bench-vm: {msg}");
    std::process::exit(1);
}
