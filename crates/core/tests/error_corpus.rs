//! Every document of a corpus (bad in many ways, cut at every byte, fields in other orders)
//! gets exactly the answer the whole-document parser gave before the list was streamed:
//! `tests/data/keylist_answers.txt` was written by that parser.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::fmt::Write;

const H1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const H2: &str = "60303AE22B998861BCE3B28F33EEC1BE758A213C86C93C076DBE9F558C11C752";
const H3: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

fn corpus() -> Vec<String> {
    let plans = r#""plans":{"free":{"rate_limits":[{"limit":10,"window_s":60}]},"open":{"rate_limits":[]}}"#;
    let owners = r#""owners":{"o":{},"p":{"status":"disabled"}}"#;
    let good = [
        format!(
            r#"{{"id":"a","hash":"{H1}","owner":"o","plan":"free","scopes":["x:*"],"sites":["1"]}}"#
        ),
        format!(
            r#"{{"id":"b","hash":"{H2}","owner":"p","status":"revoked","expires_at":"2026-12-31T00:00:00Z","allowed_ips":["10.0.0.0/8"]}}"#
        ),
        format!(
            r#"{{"id":"c","hash":"{H3}","owner":"q","rate_limits":[{{"limit":1,"window_s":1}}],"plan":"open"}}"#
        ),
    ];
    let bad_keys = [
        r#"{"id":"a","owner":"o"}"#.to_string(),
        format!(r#"{{"id":"a","hash":"{H3}"}}"#),
        format!(r#"{{"id":"a","hash":"{H3}","owner":"o"}}"#),
        format!(r#"{{"id":"z","hash":"{}","owner":"o"}}"#, H1.to_uppercase()),
        format!(r#"{{"id":"a","hash":"{}","owner":"o"}}"#, H1.to_uppercase()),
        r#"{"id":"z","hash":"abc","owner":"o"}"#.to_string(),
        r#"{"id":"a","hash":"abc","owner":"o"}"#.to_string(),
        format!(r#"{{"id":"a b","hash":"{H3}","owner":"o"}}"#),
        format!(r#"{{"id":"","hash":"{H3}","owner":"o"}}"#),
        format!(r#"{{"id":"z","hash":"{H3}","owner":"o\u00e9"}}"#),
        format!(r#"{{"id":"z","hash":"{H1}","owner":"o\u00e9"}}"#),
        format!(r#"{{"id":"a","hash":"{H1}","owner":"o\u00e9"}}"#),
        format!(r#"{{"id":"z","hash":"{H3}","owner":"o","allowed_ips":["1.2.3.4/33"]}}"#),
        format!(r#"{{"id":"z","hash":"{H3}","owner":"o","plan":"gold"}}"#),
        format!(r#"{{"id":"z","hash":"{H3}","owner":"o","expires_at":"tomorrow"}}"#),
        format!(
            r#"{{"id":"z","hash":"{H3}","owner":"o","rate_limits":[{{"limit":1,"window_s":0}}]}}"#
        ),
        format!(r#"{{"id":"z","hash":"{H3}","owner":"o","sites":[1]}}"#),
        format!(r#"{{"id":"z","hash":"{H3}","owner":"o","status":7}}"#),
        format!(r#"{{"id":"z","hash":"{H3}","owner":"o"}} x"#),
        format!(r#"{{"id":"z","hash":"{H3}","owner":"o",}}"#),
        "17".to_string(),
        "[]".to_string(),
        "nul".to_string(),
    ];
    let mut out = vec![
        "".to_string(),
        "{".to_string(),
        "[]".to_string(),
        r#"{"version":"x"}"#.to_string(),
        r#"{"keys":5}"#.to_string(),
        r#"{"keys":[],"keys":[]}"#.to_string(),
        r#"{"keys":[1,]}"#.to_string(),
        r#"{"keys":[,]}"#.to_string(),
        r#"{"keys":[]} x"#.to_string(),
        r#"{"version":5,"keys":[}"#.to_string(),
        r#"{"plans":{"p":{"rate_limits":[{"limit":1}]}},"keys":[]}"#.to_string(),
        r#"{"plans":{"p":{"rate_limits":[{"limit":1,"window_s":0}]}},"keys":[]}"#.to_string(),
        r#"{"keys":[{"id":"a"},"#.to_string(),
        format!("{{\"keys\":[\n  {{\"id\":\"a\",\n \"hash\":\"{H1}\",\n \"owner\":5}}]}}"),
        format!("{{\"k\\u0065ys\":[{}]}}", good[0]),
    ];
    let g = good.join(",");
    for head_first in [true, false] {
        for bad in &bad_keys {
            for at in [0, 1, 3] {
                let mut keys: Vec<&str> = good.iter().map(String::as_str).collect();
                keys.insert(at, bad);
                let keys = format!(r#""keys":[{}]"#, keys.join(",\n"));
                out.push(if head_first {
                    format!(r#"{{"version":"v1",{owners},{plans},{keys}}}"#)
                } else {
                    format!(r#"{{{keys},"version":"v1",{owners},{plans}}}"#)
                });
            }
        }
        let whole = if head_first {
            format!(r#"{{"version":"v1",{owners},{plans},"keys":[{g}]}}"#)
        } else {
            format!(r#"{{"keys":[{g}],{plans},"version":"v1",{owners}}}"#)
        };
        for cut in 0..whole.len() {
            out.push(whole[..cut].to_string());
        }
        out.push(whole.replace(':', "  :  ").replace(',', " ,\n\t"));
        out.push(whole);
    }
    // SPEC §2 JSON rules (issue 12): appended, so that the entries above keep their numbers.
    let k = |extra: &str| format!(r#"{{"id":"a","hash":"{H1}","owner":"o"{extra}}}"#);
    out.extend([
        format!("{{\"keys\":[{}]}} x", k("")),
        format!("{{\"keys\":[{}]}}\n\t \n", k("")),
        format!("{{\"keys\":[{}]}}{{}}", k("")),
        format!("\u{feff}{{\"keys\":[{}]}}", k("")),
        format!("\u{feff}\u{feff}{{\"keys\":[{}]}}", k("")),
        format!(r#"{{"owners":{{"o":{{"status":"disabled"}},"o":{{}}}},"keys":[{}]}}"#, k("")),
        format!(r#"{{"keys":[{}],"owners":{{"o":{{}},"o":{{"status":"disabled"}}}}}}"#, k("")),
        format!(r#"{{"plans":{{"p":{{}},"p":{{"rate_limits":[]}}}},"keys":[{}]}}"#, k("")),
        format!(r#"{{"owners":{{"o":{{"status":"active","status":"disabled"}}}},"keys":[{}]}}"#, k("")),
        format!(r#"{{"version":"a","version":"b","keys":[{}]}}"#, k("")),
        format!(r#"{{"keys":[{}]}}"#, k(r#","id":"b""#)),
        format!(r#"{{"keys":[{}]}}"#, k(r#","scopes":[],"scopes":["*"]"#)),
        format!(r#"{{"keys":[{}]}}"#, k(r#","rate_limits":[{"limit":1,"window_s":1,"limit":2}]"#)),
        format!(r#"{{"keys":[{}]}}"#, k(r#","meta":{"a":{"b":1,"b":2}}"#)),
        format!(r#"{{"keys":[{}]}}"#, k(r#","name":"x","name":"y""#)),
        format!(r#"{{"meta":{{"x":[{{"y":1,"y":1}}]}},"keys":[{}]}}"#, k("")),
        format!(r#"{{"keys":[{}]}}"#, k(r#","alowed_ips":["10.0.0.0/8"]"#)),
        format!(r#"{{"keys":[{}],"extra":1}}"#, k("")),
        format!(r#"{{"owners":{{"o":{{"limits":[]}}}},"keys":[{}]}}"#, k("")),
        format!(r#"{{"plans":{{"p":{{"rate_limit":[]}}}},"keys":[{}]}}"#, k("")),
        format!(r#"{{"keys":[{}]}}"#, k(r#","rate_limits":[{"limit":1,"window_s":1,"burst":2}]"#)),
        format!(
            r#"{{"meta":{{"by":"ops"}},"owners":{{"o":{{"rate_limits":[{{"limit":5,"window_s":60}}]}}}},"keys":[{}]}}"#,
            k(r#","meta":null,"name":"n","description":{"x":[1]},"created_at":"2026-01-01T00:00:00Z","updated_at":1,"last_used_at":null"#)
        ),
        format!(r#"{{"owners":{{"o":{{"rate_limits":[{{"limit":5,"window_s":0}}]}}}},"keys":[{}]}}"#, k("")),
    ]);
    out
}

fn answers() -> String {
    let mut s = String::new();
    for (n, doc) in corpus().iter().enumerate() {
        match keygate_core::keylist::parse(doc.as_bytes()) {
            Ok(l) => writeln!(s, "{n}: ok {} keys, version {:?}", l.len(), l.version),
            Err(e) => writeln!(s, "{n}: {e}"),
        }
        .unwrap();
    }
    s
}

#[test]
fn answers_are_the_whole_document_parsers() {
    let got = answers();
    if let Ok(path) = std::env::var("KEYGATE_WRITE_ANSWERS") {
        std::fs::write(path, &got).unwrap();
        return;
    }
    let want = include_str!("data/keylist_answers.txt");
    let diffs: Vec<String> = got
        .lines()
        .zip(want.lines())
        .filter(|(g, w)| g != w)
        .map(|(g, w)| format!("got  {g}\nwant {w}"))
        .collect();
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs[..diffs.len().min(20)].join("\n")
    );
    assert_eq!(got.lines().count(), want.lines().count());
}
