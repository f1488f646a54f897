//! Property tests for the request matchers: path normalisation, IP sets and client-IP selection
//! run on untrusted input, so they must agree with simple reference models and never panic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use keygate_core::ipset::{canonical, IpSet};
use keygate_core::{client_ip, path, time};
use proptest::prelude::*;

/// Paths built from the pieces that exercise normalisation (separators, dots, escapes of both
/// kinds, stray `%`), plus arbitrary text.
fn path_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_string()),
        Just("\\".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%".to_string()),
        Just("%2e".to_string()),
        Just("%2E".to_string()),
        Just("%2f".to_string()),
        Just("%5C".to_string()),
        Just("%25".to_string()),
        Just("%3f".to_string()),
        Just("%41".to_string()),
        "[0-9a-fA-F]{1,2}",
        "[a-z]{1,4}",
        "%[0-9a-fA-F%]{0,2}",
        any::<char>().prop_map(String::from),
    ];
    prop_oneof![
        prop::collection::vec(piece, 0..16).prop_map(|v| v.concat()),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn normalize_is_idempotent_and_rooted(p in path_like()) {
        let once = path::normalize(&p);
        prop_assert!(once.starts_with('/'));
        prop_assert_eq!(path::normalize(&once), once.clone());
        // No segment of the result is a dot segment, and no `//` survives.
        prop_assert!(!once.contains("//"));
        prop_assert!(!once.contains('\\'));
        prop_assert!(once.split('/').all(|s| s != "." && s != ".."));
    }

    #[test]
    fn segments_and_prefixes_never_panic(p in path_like(), q in path_like(), n in any::<usize>()) {
        let np = path::normalize(&p);
        let nq = path::normalize(&q);
        let _ = path::segment(&np, n);
        // A path always matches itself as a prefix, and `/` matches everything.
        prop_assert!(path::prefix_matches(&np, &np));
        prop_assert!(path::prefix_matches("/", &nq));
        let _ = path::prefix_matches(&np, &nq);
    }

    #[test]
    fn query_helpers_never_panic(raw in any::<String>(), name in "[a-z_+%0-9]{0,6}") {
        let (_, q) = path::split_query(&raw);
        let _ = path::query_param(q.unwrap_or(""), &name);
        let stripped = path::remove_query_param(&raw, &name);
        // Whatever query_param could find is gone after removal.
        let (_, q2) = path::split_query(&stripped);
        prop_assert_eq!(path::query_param(q2.unwrap_or(""), &name), None);
        let _ = path::percent_decode(raw.as_bytes());
    }
}

/// A random network, biased so that v4, mapped-v6 and plain v6 entries all occur and addresses
/// cluster enough for queries to hit.
fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u16>(), 8u8..=32).prop_map(|(a, len)| {
            IpNet::new(
                IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | (u32::from(a) << 8))),
                len,
            )
            .unwrap()
            .trunc()
        }),
        (any::<u32>(), 0u8..=32).prop_map(|(a, len)| IpNet::new(
            IpAddr::V4(Ipv4Addr::from(a)),
            len
        )
        .unwrap()
        .trunc()),
        (any::<u16>(), 104u8..=128).prop_map(|(a, len)| {
            let v4 = Ipv4Addr::from(0x0A00_0000 | (u32::from(a) << 8));
            IpNet::new(IpAddr::V6(v4.to_ipv6_mapped()), len)
                .unwrap()
                .trunc()
        }),
        (any::<u16>(), 16u8..=128).prop_map(|(a, len)| {
            let v6 = Ipv6Addr::new(0x2001, 0xdb8, a, 0, 0, 0, 0, 1);
            IpNet::new(IpAddr::V6(v6), len).unwrap().trunc()
        }),
        (any::<u128>(), 0u8..=128).prop_map(|(a, len)| IpNet::new(
            IpAddr::V6(Ipv6Addr::from(a)),
            len
        )
        .unwrap()
        .trunc()),
    ]
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u16>()
            .prop_map(|a| IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | (u32::from(a) << 8) | 1))),
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u16>().prop_map(|a| {
            IpAddr::V6(Ipv4Addr::from(0x0A00_0000 | (u32::from(a) << 8)).to_ipv6_mapped())
        }),
        any::<u16>().prop_map(|a| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, a, 0, 0, 0, 0, 1))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ]
}

/// The reference model: a mapped-v6 network of prefix ≥ 96 is the IPv4 network it embeds; the
/// address is canonicalised; then a linear scan with ipnet.
fn naive_contains(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| {
        let n = match n {
            IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
                Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap(),
                None => *n,
            },
            _ => *n,
        };
        n.contains(&ip)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn ipset_agrees_with_linear_scan(
        nets in prop::collection::vec(net(), 0..40),
        probes in prop::collection::vec(addr(), 1..40),
    ) {
        let entries: Vec<String> = nets.iter().map(ToString::to_string).collect();
        let set = IpSet::parse(&entries).unwrap();
        let mut bytes = Vec::new();
        set.encode(&mut bytes);
        prop_assert_eq!(IpSet::encoded_len(&bytes), Some(bytes.len()));
        prop_assert_eq!(IpSet::is_empty_encoded(&bytes), set.is_empty());
        prop_assert!(set.len_ranges() <= nets.len());
        // Probe the edges of every network too, where off-by-one errors live.
        let mut all: Vec<IpAddr> = probes;
        for n in &nets {
            all.push(n.network());
            all.push(n.broadcast());
            match n.broadcast() {
                IpAddr::V4(b) => all.push(IpAddr::V4(Ipv4Addr::from(u32::from(b).wrapping_add(1)))),
                IpAddr::V6(b) => all.push(IpAddr::V6(Ipv6Addr::from(u128::from(b).wrapping_add(1)))),
            }
        }
        for ip in all {
            let want = naive_contains(&nets, ip);
            prop_assert_eq!(set.contains(ip), want, "{} in {:?}", ip, entries);
            prop_assert_eq!(IpSet::contains_encoded(&bytes, ip), want, "{} encoded", ip);
        }
    }

    #[test]
    fn encoded_queries_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), ip in addr()) {
        let _ = IpSet::contains_encoded(&bytes, ip);
        let _ = IpSet::is_empty_encoded(&bytes);
        if let Some(len) = IpSet::encoded_len(&bytes) {
            prop_assert!(len <= bytes.len());
        }
    }

    #[test]
    fn ipset_parse_never_panics(entries in prop::collection::vec("[0-9a-fA-F:./ \\[\\]%]{0,24}", 0..8)) {
        if let Err(e) = IpSet::parse(&entries) {
            let e = e.to_string();
            prop_assert!(e.starts_with('[') && e.contains("]: invalid CIDR \""));
        }
    }

    #[test]
    fn client_ip_never_panics(
        xff in prop::collection::vec(any::<u8>(), 0..64),
        hops in prop_oneof![0u32..5, any::<u32>()],
        src in prop::option::of(addr()),
    ) {
        let got = client_ip::client_ip(src, Some(&xff), hops);
        if hops == 0 {
            prop_assert_eq!(got, src.map(canonical));
        }
        if let Some(ip) = got {
            prop_assert_eq!(ip, canonical(ip));
        }
        let _ = client_ip::parse_source_address(&String::from_utf8_lossy(&xff));
    }

    #[test]
    fn client_ip_picks_nth_from_right(
        entries in prop::collection::vec(addr(), 1..6),
        hops in 1u32..8,
        src in addr(),
    ) {
        let xff = entries.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        let want = entries
            .len()
            .checked_sub(hops as usize)
            .map_or(src, |i| entries[i]);
        prop_assert_eq!(
            client_ip::client_ip(Some(src), Some(xff.as_bytes()), hops),
            Some(canonical(want))
        );
    }

    #[test]
    fn time_round_trips(t in -62_167_219_200i64..=253_402_300_799) {
        prop_assert_eq!(time::parse_rfc3339(&time::format_rfc3339(t)), Some(t));
    }

    #[test]
    fn time_parse_never_panics(s in any::<String>(), t in any::<i64>()) {
        let _ = time::parse_rfc3339(&s);
        prop_assert_eq!(time::format_rfc3339(t).len(), 20);
    }
}
