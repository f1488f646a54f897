//! The client address every IP rule is checked against (SPEC §3 step 2).
//!
//! Only the proxies in front of Envoy are trusted to append to `X-Forwarded-For`, so with N
//! trusted hops the Nth entry from the right is the last one a trusted proxy wrote; anything to
//! its left may be client-forged. Whatever cannot be read falls back to the connection's source
//! address, never to an entry further left.

use std::net::{IpAddr, SocketAddr};

use crate::ipset::canonical;

/// Reads an address as a literal IP, `ip:port`, `[v6]:port` or `[v6]`.
fn parse_addr(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
}

/// Parses Envoy's `source.address` property (`1.2.3.4:5678`, `[2001:db8::1]:443`, or a bare
/// IP), canonicalised so an IPv4 client on a dual-stack listener counts as IPv4. None for
/// anything else, such as a Unix socket path.
pub fn parse_source_address(s: &str) -> Option<IpAddr> {
    parse_addr(s).map(canonical)
}

/// The connection's peer from Envoy's `source.address`, or None when Envoy did not take it from
/// the socket. Unless the HTTP connection manager sets `use_remote_address`, Envoy replaces
/// `source.address` with the rightmost `X-Forwarded-For` entry — which any client can write —
/// and such an address carries port 0, which no real TCP peer has. Trusting it would let a
/// client choose its own IP, so it counts as unknown (and matches no allow list).
pub fn connection_address(source_property: &str) -> Option<IpAddr> {
    match source_property.parse::<SocketAddr>() {
        Ok(sa) if sa.port() == 0 => None,
        _ => parse_source_address(source_property),
    }
}

/// The client IP: `source` when `trusted_hops` is 0, else the `trusted_hops`th entry from the
/// right of the `X-Forwarded-For` value (1 is the rightmost). Entries are trimmed of spaces and
/// tabs; empty entries still count as positions. Besides a bare IP an entry may be `v4:port`,
/// `[v6]` or `[v6]:port`, forms some proxies write. With too few entries, an entry that is not
/// an address, no header, or a value that is not UTF-8, the answer is `source`. Canonicalised.
pub fn client_ip(source: Option<IpAddr>, xff: Option<&[u8]>, trusted_hops: u32) -> Option<IpAddr> {
    let source = source.map(canonical);
    let Some(nth) = usize::try_from(trusted_hops)
        .ok()
        .and_then(|h| h.checked_sub(1))
    else {
        return source;
    };
    let xff = xff.and_then(|v| std::str::from_utf8(v).ok());
    // With `use_remote_address`, Envoy appends the peer itself before filters run; hops count
    // the proxies in front of Envoy, so that entry is not one of them.
    let appended = |v: &str| {
        let last = v
            .rsplit(',')
            .next()
            .map(|e| e.trim_matches(|c| c == ' ' || c == '\t'));
        source.is_some() && last.and_then(parse_addr).map(canonical) == source
    };
    let skip = usize::from(xff.is_some_and(appended));
    xff.and_then(|v| v.rsplit(',').nth(nth + skip))
        .map(|entry| entry.trim_matches(|c| c == ' ' || c == '\t'))
        .and_then(parse_addr)
        .map(canonical)
        .or(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_envoy_took_from_xff_are_not_the_connection() {
        assert_eq!(connection_address("127.0.0.2:0"), None);
        assert_eq!(connection_address("[2001:db8::1]:0"), None);
        assert_eq!(
            connection_address("127.0.0.2:5555"),
            Some("127.0.0.2".parse().unwrap())
        );
        assert_eq!(
            connection_address("[::ffff:127.0.0.2]:5555"),
            Some("127.0.0.2".parse().unwrap())
        );
        assert_eq!(
            connection_address("127.0.0.9"),
            Some("127.0.0.9".parse().unwrap())
        );
    }

    #[test]
    fn the_peer_envoy_appended_is_not_a_hop() {
        let peer: Option<IpAddr> = Some("127.0.0.3".parse().unwrap());
        let xff = b"203.0.113.7, 10.0.0.1, 127.0.0.3";
        assert_eq!(
            client_ip(peer, Some(xff), 1),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            client_ip(peer, Some(xff), 2),
            Some("203.0.113.7".parse().unwrap())
        );
        assert_eq!(client_ip(peer, Some(xff), 3), peer);
        assert_eq!(client_ip(peer, Some(b"127.0.0.3"), 1), peer);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn source_address_forms() {
        assert_eq!(parse_source_address("1.2.3.4:5678"), Some(ip("1.2.3.4")));
        assert_eq!(
            parse_source_address("[2001:db8::1]:443"),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(parse_source_address("1.2.3.4"), Some(ip("1.2.3.4")));
        assert_eq!(parse_source_address("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(
            parse_source_address("[2001:db8::1]"),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(
            parse_source_address("[::ffff:10.0.0.1]:80"),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(
            parse_source_address("::ffff:10.0.0.1"),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(parse_source_address("::1"), Some(ip("::1")));
    }

    #[test]
    fn source_address_rejects_garbage() {
        for s in [
            "",
            "/var/run/envoy.sock",
            "1.2.3.4:",
            "1.2.3.4:99999",
            "[1.2.3.4]:80",
            "[2001:db8::1",
            "2001:db8::1]:80",
            " 1.2.3.4",
            "1.2.3.4 ",
            "envoy://internal",
        ] {
            assert_eq!(parse_source_address(s), None, "{s:?}");
        }
    }

    #[test]
    fn zero_hops_is_source() {
        let src = Some(ip("192.0.2.1"));
        assert_eq!(client_ip(src, Some(b"1.1.1.1"), 0), src);
        assert_eq!(client_ip(src, None, 0), src);
        assert_eq!(client_ip(None, Some(b"1.1.1.1"), 0), None);
        assert_eq!(
            client_ip(Some(ip("::ffff:192.0.2.1")), None, 0),
            Some(ip("192.0.2.1"))
        );
    }

    #[test]
    fn counts_from_the_right() {
        let src = Some(ip("192.0.2.1"));
        let xff = b"203.0.113.9, 10.0.0.1,\t172.16.0.1 ".as_slice();
        assert_eq!(client_ip(src, Some(xff), 1), Some(ip("172.16.0.1")));
        assert_eq!(client_ip(src, Some(xff), 2), Some(ip("10.0.0.1")));
        assert_eq!(client_ip(src, Some(xff), 3), Some(ip("203.0.113.9")));
        assert_eq!(client_ip(src, Some(xff), 4), src);
        assert_eq!(client_ip(src, Some(xff), u32::MAX), src);
        assert_eq!(client_ip(None, Some(xff), 1), Some(ip("172.16.0.1")));
    }

    #[test]
    fn ipv6_and_mapped_entries() {
        let src = Some(ip("192.0.2.1"));
        assert_eq!(
            client_ip(src, Some(b"2001:db8::7, ::ffff:198.51.100.2"), 1),
            Some(ip("198.51.100.2"))
        );
        assert_eq!(
            client_ip(src, Some(b"2001:db8::7, ::ffff:198.51.100.2"), 2),
            Some(ip("2001:db8::7"))
        );
        assert_eq!(
            client_ip(src, Some(b"[2001:db8::7]:4711"), 1),
            Some(ip("2001:db8::7"))
        );
        assert_eq!(
            client_ip(src, Some(b"[2001:db8::7]"), 1),
            Some(ip("2001:db8::7"))
        );
        assert_eq!(
            client_ip(src, Some(b"198.51.100.2:8080"), 1),
            Some(ip("198.51.100.2"))
        );
    }

    #[test]
    fn malformed_xff_falls_back_to_source() {
        let src = Some(ip("192.0.2.1"));
        let cases: [&[u8]; 11] = [
            b"",
            b",,,",
            b" , ",
            b"garbage",
            b"1.2.3.4,",
            b"unknown",
            b"1.2.3.4.5",
            b"\xff\xfe1.2.3.4",
            b"1.2.3.4, \xc3",
            b"1.2.3.4\x00",
            b"[1.2.3.4]",
        ];
        for xff in cases {
            assert_eq!(client_ip(src, Some(xff), 1), src, "{xff:?}");
            assert_eq!(client_ip(None, Some(xff), 1), None, "{xff:?}");
        }
        // Too few entries, or a bad one at the chosen position: source, never a forged entry.
        assert_eq!(client_ip(src, Some(b"6.6.6.6, junk"), 1), src);
        assert_eq!(client_ip(src, Some(b"6.6.6.6,,"), 2), src);
        assert_eq!(client_ip(src, None, 1), src);
    }
}
