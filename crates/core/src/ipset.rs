//! Sets of CIDR blocks (global `ip_allow`/`ip_deny`, per-key `allowed_ips`).
//!
//! A set is built once per configuration or key list and queried on every request, so it is
//! stored as sorted, merged, inclusive address ranges and queried by binary search: O(log n)
//! with 10,000 entries, and the same layout serialises into a key record in shared memory where
//! [`IpSet::contains_encoded`] searches the bytes in place without decoding or allocating.
//!
//! IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is IPv4 everywhere: addresses are canonicalised before a
//! lookup, and mapped entries (`::ffff:10.0.0.0/104`) are stored as IPv4 ranges. A wider IPv6
//! block such as `::/0` therefore does not cover IPv4 clients; list `0.0.0.0/0` for those.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) turned into IPv4, so that a
/// dual-stack listener's view of an IPv4 client matches IPv4 rules. Deliberately not
/// `Ipv6Addr::to_ipv4`, which would also turn `::1` into `0.0.0.1`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// Sorted, non-overlapping, non-adjacent inclusive address ranges per family.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IpSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

/// One parsed entry, already routed to its family.
enum Range {
    V4(u32, u32),
    V6(u128, u128),
}

/// Parses `addr` or `addr/len` strictly with std's address parser (which, unlike a lenient
/// one, rejects `010.0.0.1` and surrounding whitespace); host bits are masked off.
fn parse_entry(entry: &str) -> Option<Range> {
    let (addr, len) = match entry.split_once('/') {
        Some((addr, len)) => {
            // Plain decimal only: `u8::from_str` alone would also take `+8`.
            if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (addr, Some(len.parse::<u8>().ok()?))
        }
        None => (entry, None),
    };
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => v4_range(a, len.unwrap_or(32)),
        IpAddr::V6(a) => {
            let len = len.unwrap_or(128);
            if len > 128 {
                return None;
            }
            // A block inside ::ffff:0:0/96 is an IPv4 block in disguise.
            match (a.to_ipv4_mapped(), len.checked_sub(96)) {
                (Some(v4), Some(len4)) => v4_range(v4, len4),
                _ => {
                    let net = Ipv6Net::new(a, len).ok()?;
                    Some(Range::V6(
                        u128::from(net.network()),
                        u128::from(net.broadcast()),
                    ))
                }
            }
        }
    }
}

fn v4_range(a: Ipv4Addr, len: u8) -> Option<Range> {
    let net = Ipv4Net::new(a, len).ok()?;
    Some(Range::V4(
        u32::from(net.network()),
        u32::from(net.broadcast()),
    ))
}

/// Sorts and merges overlapping or adjacent ranges, so each address falls in at most one range
/// and a binary search on the start finds it.
fn merge<T: Copy + Ord + MaxAddr>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        if let Some(last) = out.last_mut() {
            // Adjacent when lo == last.1 + 1; no successor exists past the family's maximum.
            if last.1 == T::MAX_ADDR || lo <= last.1.succ() {
                if hi > last.1 {
                    last.1 = hi;
                }
                continue;
            }
        }
        out.push((lo, hi));
    }
    out
}

/// Address arithmetic shared by both families for [`merge`].
trait MaxAddr {
    const MAX_ADDR: Self;
    /// `self + 1`; only called below `MAX_ADDR`.
    fn succ(self) -> Self;
}

impl MaxAddr for u32 {
    const MAX_ADDR: Self = u32::MAX;
    fn succ(self) -> Self {
        self.saturating_add(1)
    }
}

impl MaxAddr for u128 {
    const MAX_ADDR: Self = u128::MAX;
    fn succ(self) -> Self {
        self.saturating_add(1)
    }
}

/// Binary search in sorted, disjoint ranges: the last range starting at or before `x`.
fn ranges_contain<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    let idx = ranges.partition_point(|r| r.0 <= x);
    idx.checked_sub(1)
        .and_then(|i| ranges.get(i))
        .is_some_and(|r| x <= r.1)
}

impl IpSet {
    /// Parses CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`; host bits are masked off) and bare
    /// addresses (`203.0.113.7`, `2001:db8::1`). Entries are taken exactly as written: padding
    /// whitespace is an error rather than silently trimmed. The error names the first bad entry
    /// with path `[<index>]` and message `invalid CIDR "<entry>"` (the entry `Debug`-escaped, which changes nothing
    /// for printable text but keeps control characters out of log lines); callers prefix the
    /// field name.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<IpSet, crate::json::DocError> {
        if entries.is_empty() {
            // Most keys have no IP list; a million of them should not cost a million merges.
            return Ok(IpSet::default());
        }
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let entry = entry.as_ref();
            match parse_entry(entry) {
                Some(Range::V4(lo, hi)) => v4.push((lo, hi)),
                Some(Range::V6(lo, hi)) => v6.push((lo, hi)),
                None => {
                    return Err(crate::json::DocError::new(
                        format!("[{i}]"),
                        format!("invalid CIDR {entry:?}"),
                    ))
                }
            }
        }
        Ok(IpSet {
            v4: merge(v4),
            v6: merge(v6),
        })
    }

    /// Whether `ip` (canonicalised first) lies in the set. O(log n).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(a) => ranges_contain(&self.v4, u32::from(a)),
            IpAddr::V6(a) => ranges_contain(&self.v6, u128::from(a)),
        }
    }

    /// True when no entry was given (an empty allow list means "no restriction" to callers).
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Number of merged ranges over both families (after merging, not the entry count).
    pub fn len_ranges(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// The merged IPv4 ranges, inclusive, sorted.
    pub fn v4_ranges(&self) -> &[(u32, u32)] {
        &self.v4
    }

    /// The merged IPv6 ranges, inclusive, sorted.
    pub fn v6_ranges(&self) -> &[(u128, u128)] {
        &self.v6
    }

    /// Appends the self-delimiting encoding: little-endian `u32` count of IPv4 ranges, each
    /// range as two `u32`, then `u32` count of IPv6 ranges, each as two `u128`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        // More than u32::MAX ranges cannot come from a document that fits in memory; cap anyway
        // so the count always matches what follows.
        let n4 = u32::try_from(self.v4.len()).unwrap_or(u32::MAX);
        let n6 = u32::try_from(self.v6.len()).unwrap_or(u32::MAX);
        out.reserve(8 + self.v4.len() * V4_RANGE + self.v6.len() * V6_RANGE);
        out.extend_from_slice(&n4.to_le_bytes());
        for (lo, hi) in self.v4.iter().take(n4 as usize) {
            out.extend_from_slice(&lo.to_le_bytes());
            out.extend_from_slice(&hi.to_le_bytes());
        }
        out.extend_from_slice(&n6.to_le_bytes());
        for (lo, hi) in self.v6.iter().take(n6 as usize) {
            out.extend_from_slice(&lo.to_le_bytes());
            out.extend_from_slice(&hi.to_le_bytes());
        }
    }

    /// Length of the encoding at the start of `bytes`, or None when it is truncated (or its
    /// counts overflow `usize`, as they may on wasm32 with corrupt data).
    pub fn encoded_len(bytes: &[u8]) -> Option<usize> {
        Encoded::read(bytes).map(|e| e.len)
    }

    /// [`IpSet::contains`] run directly on an encoding, without decoding or allocating; false
    /// when the bytes are malformed.
    pub fn contains_encoded(bytes: &[u8], ip: IpAddr) -> bool {
        let Some(e) = Encoded::read(bytes) else {
            return false;
        };
        match canonical(ip) {
            IpAddr::V4(a) => e.contains_v4(bytes, u32::from(a)),
            IpAddr::V6(a) => e.contains_v6(bytes, u128::from(a)),
        }
    }

    /// [`IpSet::is_empty`] on an encoding. Malformed bytes count as non-empty, so that an
    /// allow list that cannot be read refuses (its `contains_encoded` is false) instead of
    /// allowing everyone.
    pub fn is_empty_encoded(bytes: &[u8]) -> bool {
        Encoded::read(bytes).is_some_and(|e| e.n4 == 0 && e.n6 == 0)
    }
}

const V4_RANGE: usize = 8;
const V6_RANGE: usize = 32;

/// Validated layout of an encoding: where each family's ranges start and how many there are.
struct Encoded {
    n4: usize,
    v4_at: usize,
    n6: usize,
    v6_at: usize,
    len: usize,
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

fn read_u128(bytes: &[u8], at: usize) -> Option<u128> {
    let b = bytes.get(at..at.checked_add(16)?)?;
    Some(u128::from_le_bytes(b.try_into().ok()?))
}

impl Encoded {
    fn read(bytes: &[u8]) -> Option<Encoded> {
        let n4 = usize::try_from(read_u32(bytes, 0)?).ok()?;
        let v4_at: usize = 4;
        let n6_at = v4_at.checked_add(n4.checked_mul(V4_RANGE)?)?;
        let n6 = usize::try_from(read_u32(bytes, n6_at)?).ok()?;
        let v6_at = n6_at.checked_add(4)?;
        let len = v6_at.checked_add(n6.checked_mul(V6_RANGE)?)?;
        if len > bytes.len() {
            return None;
        }
        Some(Encoded {
            n4,
            v4_at,
            n6,
            v6_at,
            len,
        })
    }

    fn contains_v4(&self, bytes: &[u8], x: u32) -> bool {
        let range = |i: usize| -> Option<(u32, u32)> {
            let at = self.v4_at + i * V4_RANGE;
            Some((read_u32(bytes, at)?, read_u32(bytes, at + 4)?))
        };
        search(self.n4, range, x)
    }

    fn contains_v6(&self, bytes: &[u8], x: u128) -> bool {
        let range = |i: usize| -> Option<(u128, u128)> {
            let at = self.v6_at + i * V6_RANGE;
            Some((read_u128(bytes, at)?, read_u128(bytes, at + 16)?))
        };
        search(self.n6, range, x)
    }
}

/// The binary search of [`ranges_contain`] over ranges fetched by index (offsets were bounded
/// by [`Encoded::read`], so indices below `n` cannot overflow); a failed read means false.
fn search<T: Copy + Ord>(n: usize, range: impl Fn(usize) -> Option<(T, T)>, x: T) -> bool {
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match range(mid) {
            Some((start, _)) if start <= x => lo = mid + 1,
            Some(_) => hi = mid,
            None => return false,
        }
    }
    match lo.checked_sub(1).map(&range) {
        Some(Some((_, end))) => x <= end,
        _ => false,
    }
}

impl std::fmt::Display for IpSet {
    /// Lists the ranges as `lo-hi`, for log lines and debugging.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (lo, hi) in &self.v4 {
            let sep = if first { "" } else { ", " };
            first = false;
            write!(f, "{sep}{}-{}", Ipv4Addr::from(*lo), Ipv4Addr::from(*hi))?;
        }
        for (lo, hi) in &self.v6 {
            let sep = if first { "" } else { ", " };
            first = false;
            write!(f, "{sep}{}-{}", Ipv6Addr::from(*lo), Ipv6Addr::from(*hi))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn set(entries: &[&str]) -> IpSet {
        IpSet::parse(entries).unwrap()
    }

    fn encoded(s: &IpSet) -> Vec<u8> {
        let mut out = Vec::new();
        s.encode(&mut out);
        out
    }

    /// Asserts `contains` and `contains_encoded` both give `want`.
    fn check(s: &IpSet, addr: &str, want: bool) {
        assert_eq!(s.contains(ip(addr)), want, "contains {addr} in {s}");
        assert_eq!(
            IpSet::contains_encoded(&encoded(s), ip(addr)),
            want,
            "contains_encoded {addr} in {s}"
        );
    }

    #[test]
    fn canonical_maps_only_ipv4_mapped() {
        assert_eq!(canonical(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(canonical(ip("::ffff:a01:203")), ip("10.1.2.3"));
        assert_eq!(canonical(ip("::1")), ip("::1"));
        assert_eq!(canonical(ip("::10.1.2.3")), ip("::10.1.2.3"));
        assert_eq!(canonical(ip("64:ff9b::10.1.2.3")), ip("64:ff9b::10.1.2.3"));
        assert_eq!(canonical(ip("10.1.2.3")), ip("10.1.2.3"));
    }

    #[test]
    fn v4_cidrs_and_hosts() {
        let s = set(&["10.0.0.0/8", "203.0.113.7", "192.168.1.77/24"]);
        check(&s, "10.0.0.0", true);
        check(&s, "10.255.255.255", true);
        check(&s, "11.0.0.0", false);
        check(&s, "9.255.255.255", false);
        check(&s, "203.0.113.7", true);
        check(&s, "203.0.113.8", false);
        check(&s, "192.168.1.0", true);
        check(&s, "192.168.1.255", true);
        check(&s, "192.168.2.0", false);
        check(&s, "::ffff:10.9.9.9", true);
        check(&s, "::ffff:11.0.0.0", false);
        check(&s, "::a00:1", false);
        assert_eq!(s.v4_ranges().len(), 3);
    }

    #[test]
    fn v6_cidrs_and_hosts() {
        let s = set(&["2001:db8::/32", "2001:db9::1", "fe80::1234/10"]);
        check(&s, "2001:db8::", true);
        check(&s, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", true);
        check(&s, "2001:db9::", false);
        check(&s, "2001:db9::1", true);
        check(&s, "2001:db9::2", false);
        check(&s, "fe80::", true);
        check(&s, "febf::1", true);
        check(&s, "fec0::", false);
        check(&s, "10.0.0.1", false);
    }

    #[test]
    fn mapped_entries_are_ipv4() {
        let s = set(&["::ffff:10.0.0.0/104", "::ffff:192.0.2.1"]);
        assert_eq!(
            s.v4_ranges(),
            &[(0x0A00_0000, 0x0AFF_FFFF), (0xC000_0201, 0xC000_0201)]
        );
        assert!(s.v6_ranges().is_empty());
        check(&s, "10.1.2.3", true);
        check(&s, "::ffff:10.1.2.3", true);
        check(&s, "192.0.2.1", true);
        check(&s, "11.0.0.0", false);
        // The whole mapped block is every IPv4 address.
        let all = set(&["::ffff:0:0/96"]);
        check(&all, "1.2.3.4", true);
        check(&all, "::1", false);
    }

    #[test]
    fn wide_v6_blocks_do_not_cover_ipv4() {
        let s = set(&["::/0"]);
        check(&s, "2001:db8::1", true);
        check(&s, "::1", true);
        check(&s, "10.0.0.1", false);
        check(&s, "::ffff:10.0.0.1", false);
    }

    #[test]
    fn everything_and_edges() {
        let s = set(&["0.0.0.0/0", "::/0"]);
        check(&s, "0.0.0.0", true);
        check(&s, "255.255.255.255", true);
        check(&s, "::", true);
        check(&s, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true);
        assert_eq!(s.len_ranges(), 2);
        let edges = set(&[
            "255.255.255.255",
            "0.0.0.0/32",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
        ]);
        check(&edges, "255.255.255.255", true);
        check(&edges, "255.255.255.254", false);
        check(&edges, "0.0.0.0", true);
        check(&edges, "0.0.0.1", false);
        check(&edges, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true);
    }

    #[test]
    fn merges_overlapping_and_adjacent() {
        let s = set(&[
            "10.0.0.0/24",
            "10.0.1.0/24",
            "10.0.0.128/25",
            "10.0.3.0/24",
            "255.255.255.0/24",
            "255.255.255.255",
            "2001:db8::/33",
            "2001:db8:8000::/33",
        ]);
        assert_eq!(
            s.v4_ranges(),
            &[
                (0x0A00_0000, 0x0A00_01FF),
                (0x0A00_0300, 0x0A00_03FF),
                (0xFFFF_FF00, 0xFFFF_FFFF)
            ]
        );
        assert_eq!(s.v6_ranges().len(), 1);
        assert_eq!(s.len_ranges(), 4);
        check(&s, "10.0.1.255", true);
        check(&s, "10.0.2.0", false);
    }

    #[test]
    fn parse_errors() {
        let bad = [
            "10.0.0.300/8",
            "10.0.0.0/33",
            "2001:db8::/129",
            " 10.0.0.0/8",
            "10.0.0.0/8 ",
            "10.0.0.0/",
            "/8",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0.0/0008",
            "010.0.0.1",
            "10.0.0",
            "",
            "abc",
            "[2001:db8::1]",
            "fe80::1%eth0",
            "::ffff:10.0.0.0/129",
        ];
        for (i, entry) in bad.iter().enumerate() {
            let mut entries = vec!["192.0.2.0/24"; i + 1];
            entries.push(entry);
            assert_eq!(
                IpSet::parse(&entries).map_err(|e| e.to_string()),
                Err(format!("[{}]: invalid CIDR \"{}\"", i + 1, entry)),
                "{entry:?}"
            );
        }
        assert_eq!(
            IpSet::parse(&["10.0.0.300/8"]).unwrap_err().to_string(),
            "[0]: invalid CIDR \"10.0.0.300/8\""
        );
        // Control characters are escaped, not written raw into a log line.
        assert_eq!(
            IpSet::parse(&["1.2.3.4\n"]).unwrap_err().to_string(),
            "[0]: invalid CIDR \"1.2.3.4\\n\""
        );
    }

    #[test]
    fn parse_accepts_owned_strings_and_empty_lists() {
        let owned = vec![String::from("10.0.0.0/8")];
        assert!(IpSet::parse(&owned).unwrap().contains(ip("10.1.1.1")));
        let empty: [&str; 0] = [];
        let s = IpSet::parse(&empty).unwrap();
        assert!(s.is_empty());
        assert_eq!(s, IpSet::default());
        assert!(!s.contains(ip("10.0.0.1")));
        assert!(!s.contains(ip("::1")));
        assert!(!set(&["::1"]).is_empty());
        assert!(set(&["10.0.0.0/00"]).contains(ip("1.1.1.1")));
    }

    #[test]
    fn encoding_layout_and_len() {
        let s = set(&["10.0.0.0/8", "2001:db8::/32"]);
        let mut out = vec![0xAA];
        s.encode(&mut out);
        let bytes = &out[1..];
        assert_eq!(bytes.len(), 4 + 8 + 4 + 32);
        assert_eq!(&bytes[..4], &1u32.to_le_bytes());
        assert_eq!(&bytes[4..8], &0x0A00_0000u32.to_le_bytes());
        assert_eq!(IpSet::encoded_len(bytes), Some(48));
        // Self-delimiting: trailing data is not part of it.
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(b"trailing");
        assert_eq!(IpSet::encoded_len(&longer), Some(48));
        assert!(IpSet::contains_encoded(&longer, ip("10.2.3.4")));
        for cut in 0..bytes.len() {
            assert_eq!(IpSet::encoded_len(&bytes[..cut]), None, "cut {cut}");
            assert!(!IpSet::contains_encoded(&bytes[..cut], ip("10.2.3.4")));
            assert!(!IpSet::is_empty_encoded(&bytes[..cut]));
        }
    }

    #[test]
    fn empty_encoding() {
        let bytes = encoded(&IpSet::default());
        assert_eq!(bytes, [0u8; 8]);
        assert_eq!(IpSet::encoded_len(&bytes), Some(8));
        assert!(IpSet::is_empty_encoded(&bytes));
        assert!(!IpSet::contains_encoded(&bytes, ip("1.2.3.4")));
        assert!(!IpSet::is_empty_encoded(&encoded(&set(&["::1"]))));
        assert!(!IpSet::is_empty_encoded(&encoded(&set(&["1.1.1.1"]))));
    }

    #[test]
    fn malformed_encodings_do_not_panic() {
        let huge = [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];
        assert_eq!(IpSet::encoded_len(&huge), None);
        assert!(!IpSet::contains_encoded(&huge, ip("1.2.3.4")));
        assert!(!IpSet::is_empty_encoded(&huge));
        let huge6 = [0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
        assert_eq!(IpSet::encoded_len(&huge6), None);
        assert!(!IpSet::contains_encoded(&huge6, ip("::1")));
        assert_eq!(IpSet::encoded_len(&[]), None);
        // Unsorted garbage ranges: any answer, but no panic.
        let mut junk = 3u32.to_le_bytes().to_vec();
        junk.extend((0..24).map(|i| (i * 37) as u8));
        junk.extend_from_slice(&0u32.to_le_bytes());
        let _ = IpSet::contains_encoded(&junk, ip("1.2.3.4"));
    }

    #[test]
    fn many_entries_stay_correct() {
        let entries: Vec<String> = (0..10_000u32)
            .map(|i| format!("{}/32", Ipv4Addr::from(0x0A00_0000 + i * 2)))
            .collect();
        let s = IpSet::parse(&entries).unwrap();
        assert_eq!(s.len_ranges(), 10_000);
        let bytes = encoded(&s);
        for i in 0..20_000u32 {
            let a = IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i));
            assert_eq!(s.contains(a), i % 2 == 0);
            assert_eq!(IpSet::contains_encoded(&bytes, a), i % 2 == 0);
        }
    }

    #[test]
    fn display_lists_ranges() {
        let s = set(&["10.0.0.0/31", "::1"]);
        assert_eq!(s.to_string(), "10.0.0.0-10.0.0.1, ::1-::1");
        assert_eq!(IpSet::default().to_string(), "");
    }
}
