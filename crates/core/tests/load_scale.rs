//! Load cost of a 1,000,000-key list natively: parse and publish into `MemoryStore`, with the
//! process's peak memory. Ignored by default (about a second in release, a 160 MB document):
//! `cargo test --release --test load_scale -- --ignored --nocapture`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use keygate_core::keylist;
use keygate_core::publish::Publisher;
use keygate_core::shared::MemoryStore;
use sha2::{Digest, Sha256};
use std::fmt::Write;
use std::time::Instant;

/// The shape of bench/run.py `make_document`: 1,000 active owners, one plan with two windows,
/// two scopes per key.
fn document(n: usize) -> Vec<u8> {
    let mut s = String::with_capacity(n * 170);
    s.push_str(r#"{"version":"bench-a","owners":{"#);
    for o in 0..1000 {
        if o > 0 {
            s.push(',');
        }
        write!(s, r#""org-{o:04}":{{"status":"active"}}"#).unwrap();
    }
    s.push_str(r#"},"plans":{"bench":{"rate_limits":[{"limit":1000000000,"window_s":1},{"limit":1000000000,"window_s":86400}]}},"keys":["#);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        let h = Sha256::digest(format!("a/{i}").as_bytes());
        write!(s, r#"{{"id":"a-{i:07}","hash":""#).unwrap();
        for b in h {
            write!(s, "{b:02x}").unwrap();
        }
        write!(
            s,
            r#"","owner":"org-{:04}","plan":"bench","scopes":["svc{}:read","svc{}:*"]}}"#,
            i % 1000,
            i % 10,
            (i / 10) % 10
        )
        .unwrap();
    }
    s.push_str("]}");
    s.into_bytes()
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[test]
#[ignore]
fn one_million_keys() {
    // KEYGATE_SCALE_KEYS: another count (a smaller list under callgrind, say).
    let n = std::env::var("KEYGATE_SCALE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let doc = document(n);
    let before = status_kb("VmHWM:");
    let rss_doc = status_kb("VmRSS:");
    let store = MemoryStore::default();
    let t = Instant::now();
    // As the filter does: the records spilled to the store between parse and publish.
    let spill = keylist::staging::Spill {
        store: &store,
        nonce: 1,
        chunk: keylist::staging::CHUNK_BYTES,
    };
    let mut list = keylist::read_spilling(
        &mut keygate_core::scan::Slice {
            data: &doc,
            chunk: keygate_core::scan::CHUNK,
        },
        doc.len(),
        keylist::Rules::default(),
        Some(spill),
    )
    .unwrap();
    let parsed = t.elapsed();
    let meta = Publisher::default()
        .publish(&store, &mut list, None, "s", 1)
        .unwrap();
    let total = t.elapsed();
    let peak = status_kb("VmHWM:");
    drop(list);
    println!(
        "{n} keys, {:.0} MB JSON: parse {:.2} s, parse+publish {:.2} s; peak RSS {} MiB (document alone {} MiB, {} MiB over it); shared data {:.1} MiB in {} entries",
        doc.len() as f64 / 1e6,
        parsed.as_secs_f64(),
        total.as_secs_f64(),
        peak / 1024,
        rss_doc.max(before) / 1024,
        peak.saturating_sub(rss_doc.max(before)) / 1024,
        store.bytes() as f64 / 1048576.0,
        store.len()
    );
    assert_eq!(meta.keys, n as u64);
}
