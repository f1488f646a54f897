//! Fixtures shared by the benchmarks: key lists and configurations of a given size.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code
#![allow(dead_code)]

use sha2::{Digest, Sha256};

pub fn key(i: usize) -> String {
    format!("kg_bench_{i:08}")
}

pub fn hash_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A key-list document of `n` keys, each with its own 60/min limit.
pub fn key_list_json(n: usize) -> String {
    let mut s = String::from(
        r#"{"version":"bench","plans":{"free":{"rate_limits":[{"limit":60,"window_s":60}]}},"keys":["#,
    );
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"id":"key_{i}","hash":"{}","owner":"org-{}","plan":"free","scopes":["contacts:*"]}}"#,
            hash_hex(&key(i)),
            i % 1000
        ));
    }
    s.push_str("]}");
    s
}

/// `n` distinct /24 networks.
pub fn cidrs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "{}.{}.{}.0/24",
                10 + (i >> 16) % 200,
                (i >> 8) & 255,
                i & 255
            )
        })
        .collect()
}

/// The realistic configuration of `make bench` D: two credential sources, 100 CIDRs, 20 routes.
pub fn realistic_config() -> String {
    let mut allow: Vec<String> = cidrs(99);
    allow.push("127.0.0.0/8".into());
    let routes: Vec<String> = (0..20)
        .map(|i| {
            format!(r#"{{"path_prefix":"/api/v1/r{i}","methods":["POST"],"scope":"r{i}:write"}}"#)
        })
        .collect();
    format!(
        r#"{{"key_list":{{"cluster":"keyservice","path":"/v1/keys"}},
            "credentials":[{{"header":"x-api-key"}},{{"header":"authorization","scheme":"Bearer"}}],
            "ip_allow":{},
            "routes":[{}],
            "rate_limit":{{"default":[{{"limit":1000000,"window_s":60}}]}}}}"#,
        serde_json::to_string(&allow).unwrap(),
        routes.join(",")
    )
}
