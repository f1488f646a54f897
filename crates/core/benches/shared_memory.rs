//! Shared-data memory under load: 1,000,000 requests spread over 100,000 keys and 100,000
//! client addresses (a quarter of them with unknown keys, feeding the failed-attempt table),
//! through the real decision code on an in-memory store with Envoy's semantics. Prints the
//! number of shared entries and their bytes before and after: they must not grow with traffic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

mod common;

use keygate_core::config;
use keygate_core::counters;
use keygate_core::decision::{self, ListState, Request};
use keygate_core::keylist;
use keygate_core::publish::{self, Publisher};
use keygate_core::shared::MemoryStore;
use std::net::{IpAddr, Ipv4Addr};

fn main() {
    const KEYS: usize = 100_000;
    const IPS: u32 = 100_000;
    const REQUESTS: usize = 1_000_000;
    let cfg = config::parse(
        br#"{"key_list":{"cluster":"keyservice","path":"/v1/keys"},
             "rate_limit":{"default":[{"limit":5,"window_s":1},{"limit":100,"window_s":60}]},
             "invalid_key_limit":{"limit":20,"window_s":60}}"#,
    )
    .expect("bench config");
    let mut list = keylist::parse(common::key_list_json(KEYS).as_bytes()).expect("bench key list");
    let store = MemoryStore::default();
    counters::ensure_counter_slots(&store);
    let t0 = 1_800_000_000u64;
    Publisher::default().publish(&store, &mut list, None, &cfg.key_list.source_id(), t0);
    let (entries0, bytes0) = (store.len(), store.bytes());
    let mut state = ListState::from_meta(
        publish::read_meta(&store).as_ref(),
        &cfg.key_list.source_id(),
    );
    let keys: Vec<String> = (0..KEYS).map(common::key).collect();
    let started = std::time::Instant::now();
    let mut allowed = 0usize;
    for i in 0..REQUESTS {
        let key = if i % 4 == 3 {
            format!("kg_unknown_{i}")
        } else {
            keys[(i * 7919) % KEYS].clone()
        };
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i as u32 * 104_729) % IPS));
        let headers: Vec<(String, Vec<u8>)> = vec![
            (":method".into(), b"GET".to_vec()),
            (":path".into(), b"/v1/things".to_vec()),
            ("x-api-key".into(), key.into_bytes()),
        ];
        let now = t0 + (i / 10_000) as u64; // 100 s of traffic
        let o = decision::decide(
            &cfg,
            &mut state,
            &store,
            &Request {
                headers: &decision::header_refs(&headers),
                source: &move || Some(ip),
            },
            now,
        );
        allowed += matches!(o.kind, decision::Kind::Allowed) as usize;
    }
    let elapsed = started.elapsed();
    println!(
        "shared data after publishing {KEYS} keys: {entries0} entries, {:.1} MiB",
        bytes0 as f64 / 1048576.0
    );
    println!(
        "after {REQUESTS} requests over {KEYS} keys and {IPS} client IPs: {} entries, {:.1} MiB ({allowed} allowed, {:.2} µs/request natively)",
        store.len(),
        store.bytes() as f64 / 1048576.0,
        elapsed.as_secs_f64() * 1e6 / REQUESTS as f64
    );
    assert_eq!(
        store.len(),
        entries0,
        "shared data entries grew with traffic"
    );
}
