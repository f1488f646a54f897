//! Micro-benchmarks of the pure logic: the per-request pieces and the load-time parsers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

mod common;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use keygate_core::config::{self, Limit};
use keygate_core::counters;
use keygate_core::decision::{self, ListState, Request};
use keygate_core::ipset::IpSet;
use keygate_core::publish::{self, Publisher};
use keygate_core::record;
use keygate_core::shared::{self, MemoryStore, SharedStore};
use keygate_core::{keylist, path, ratelimit};
use sha2::{Digest, Sha256};
use std::net::IpAddr;

fn per_request(c: &mut Criterion) {
    let mut list = keylist::parse(common::key_list_json(1000).as_bytes()).unwrap();
    let store = MemoryStore::default();
    let meta = Publisher::default()
        .publish(&store, &mut list, None, "s", 1)
        .expect("published");
    let probe: [u8; 32] = Sha256::digest(common::key(500).as_bytes()).into();
    let bucket = store
        .get(&shared::key::bucket(
            meta.bits,
            record::bucket_index(&probe, meta.bits),
        ))
        .0
        .unwrap();
    let dict = record::dictionary_for(&store, &bucket).unwrap();
    c.bench_function("bucket lookup (1k keys)", |b| {
        b.iter(|| {
            black_box(matches!(
                record::find(&bucket, black_box(&probe), &dict),
                record::Found::Key(_)
            ))
        })
    });

    let set = IpSet::parse(&common::cidrs(10_000)).unwrap();
    let ip: IpAddr = "10.20.30.40".parse().unwrap();
    c.bench_function("CIDR match (10k entries)", |b| {
        b.iter(|| set.contains(black_box(ip)))
    });
    let mut encoded = Vec::new();
    IpSet::parse(&common::cidrs(1000))
        .unwrap()
        .encode(&mut encoded);
    c.bench_function("CIDR match in a key record (1k entries)", |b| {
        b.iter(|| IpSet::contains_encoded(black_box(&encoded), black_box(ip)))
    });

    let routes: Vec<String> = (0..500)
        .map(|i| {
            format!(
                r#"{{"path_prefix":"/api/v{}/r{i}","methods":["POST"],"scope":"s{i}"}}"#,
                i % 5
            )
        })
        .collect();
    let cfg = config::parse(
        format!(
            r#"{{"key_list":{{"cluster":"k","path":"/"}},"routes":[{}]}}"#,
            routes.join(",")
        )
        .as_bytes(),
    )
    .unwrap();
    c.bench_function("route match (500 rules)", |b| {
        b.iter(|| {
            cfg.routes
                .find(black_box("POST"), black_box("/api/v4/r499/items/7"))
        })
    });

    c.bench_function("path normalisation", |b| {
        b.iter(|| path::normalize(black_box("/swagger/%2e%2e//api/./v1/contacts/..\\x/42")))
    });

    let limits = [
        Limit {
            limit: 20,
            window_s: 1,
        },
        Limit {
            limit: 50_000,
            window_s: 86_400,
        },
    ];
    let (slot, _) = ratelimit::count_in_slot(&[], 7, &limits, 1_800_000_000);
    c.bench_function("window arithmetic (2 limits)", |b| {
        b.iter(|| ratelimit::count_in_slot(black_box(&slot), 7, &limits, black_box(1_800_000_001)))
    });

    let cfg = config::parse(common::realistic_config().as_bytes()).unwrap();
    let store = MemoryStore::default();
    counters::ensure_counter_slots(&store);
    Publisher::default().publish(
        &store,
        &mut list,
        None,
        &cfg.key_list.source_id(),
        1_800_000_000,
    );
    let mut state = ListState::from_meta(
        publish::read_meta(&store).as_ref(),
        &cfg.key_list.source_id(),
    );
    let headers: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), b"GET".to_vec()),
        (":path".into(), b"/api/v1/r3/items?x=1".to_vec()),
        (":authority".into(), b"api.example".to_vec()),
        (
            "authorization".into(),
            format!("Bearer {}", common::key(500)).into_bytes(),
        ),
    ];
    let header_refs = decision::header_refs(&headers);
    let req = Request {
        headers: &header_refs,
        source: &|| Some([127, 0, 0, 2].into()),
    };
    c.bench_function("whole decision (realistic config, in-memory store)", |b| {
        b.iter(|| decision::decide(&cfg, &mut state, &store, black_box(&req), 1_800_000_000))
    });
}

fn load_time(c: &mut Criterion) {
    let cfg = common::realistic_config();
    c.bench_function("config parse (realistic)", |b| {
        b.iter(|| config::parse(black_box(cfg.as_bytes())).unwrap())
    });
    let doc = common::key_list_json(10_000);
    let mut g = c.benchmark_group("key list");
    g.sample_size(10);
    g.bench_function("parse 10k keys", |b| {
        b.iter(|| keylist::parse(black_box(doc.as_bytes())).unwrap())
    });
    let mut list = keylist::parse(doc.as_bytes()).unwrap();
    g.bench_function("publish 10k keys (in-memory store)", |b| {
        b.iter(|| Publisher::default().publish(&MemoryStore::default(), &mut list, None, "s", 1))
    });
    g.finish();
}

criterion_group!(benches, per_request, load_time);
criterion_main!(benches);
