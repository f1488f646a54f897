//! Compact binary form of resolved keys, grouped into hash buckets.
//!
//! The key list lives once per Envoy instance in proxy-wasm shared data, not parsed in every VM:
//! keys are spread over 2^bits buckets by the leading bits of their SHA-256, and a request reads
//! exactly one bucket (one host call) and scans its few records without decoding the others.
//! Record fields are read straight from the bytes, so a lookup allocates nothing but the copy.

use crate::config::Limit;
use crate::ipset::IpSet;
use crate::keylist::KeyEntry;

/// First byte of a bucket value: a live bucket of records.
pub const BUCKET_LIVE: u8 = 1;
/// First byte of a bucket value: this layout was replaced; re-read the meta record.
pub const BUCKET_MOVED: u8 = 2;

const FLAG_ACTIVE: u8 = 1;
const FLAG_OWNER_VALID: u8 = 2;
const FLAG_EXPIRES: u8 = 4;
const FLAG_LIMITS: u8 = 8;

/// Buckets for `n` keys: about 16 records each, from 2^4 to 2^20 buckets.
pub fn bucket_bits(n: usize) -> u8 {
    let want = n.div_ceil(16).max(1);
    (usize::BITS - (want - 1).leading_zeros()).clamp(4, 20) as u8
}

pub fn bucket_index(hash: &[u8; 32], bits: u8) -> u32 {
    let lead = u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]);
    if bits == 0 {
        0
    } else {
        lead >> (32 - bits.min(32) as u32)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len]);
}

fn put_strs(out: &mut Vec<u8>, items: &[String]) {
    let n = items.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    for s in &items[..n] {
        put_str(out, s);
    }
}

/// Appends one record: u32 length, then hash, flags, expiry, id, owner, IPs, sites, scopes, limits.
pub fn encode_entry(e: &KeyEntry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&e.hash);
    let mut flags = 0;
    if e.active {
        flags |= FLAG_ACTIVE;
    }
    if e.owner_valid {
        flags |= FLAG_OWNER_VALID;
    }
    if e.expires_at.is_some() {
        flags |= FLAG_EXPIRES;
    }
    if e.limits.is_some() {
        flags |= FLAG_LIMITS;
    }
    out.push(flags);
    out.extend_from_slice(&e.expires_at.unwrap_or(i64::MAX).to_le_bytes());
    put_str(out, &e.id);
    put_str(out, &e.owner);
    e.allowed_ips.encode(out);
    put_strs(out, &e.sites);
    put_strs(out, &e.scopes);
    let limits = e.limits.as_deref().unwrap_or(&[]);
    let n = limits.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    for l in &limits[..n] {
        out.extend_from_slice(&(l.limit as u32).to_le_bytes());
        out.extend_from_slice(&l.window_s.to_le_bytes());
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Encodes a bucket from entries already sorted by hash.
pub fn encode_bucket<'a>(entries: impl IntoIterator<Item = &'a KeyEntry>) -> Vec<u8> {
    let entries = entries.into_iter();
    // A typical record is under 128 bytes: size once instead of growing record by record.
    let mut out = Vec::with_capacity(1 + entries.size_hint().0 * 128);
    out.push(BUCKET_LIVE);
    for e in entries {
        encode_entry(e, &mut out);
    }
    out
}

/// What a bucket says about one hash.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<'a> {
    Key(Record<'a>),
    Absent,
    /// The bucket belongs to a replaced layout (or is unreadable): re-read the meta record.
    Moved,
}

/// Finds the record of `hash` in a bucket value.
pub fn find<'a>(bucket: &'a [u8], hash: &[u8; 32]) -> Found<'a> {
    match bucket.first() {
        Some(&BUCKET_LIVE) => {}
        _ => return Found::Moved,
    }
    let mut rest = &bucket[1..];
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(body) = rest.get(4..4 + len) else {
            return Found::Moved;
        };
        match body.get(..32) {
            Some(h) if h == hash => {
                return match Record::parse(body) {
                    Some(r) => Found::Key(r),
                    None => Found::Moved,
                }
            }
            Some(h) if h > hash.as_slice() => return Found::Absent,
            Some(_) => {}
            None => return Found::Moved,
        }
        rest = &rest[4 + len..];
    }
    Found::Absent
}

/// A record read in place from a bucket.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub active: bool,
    pub owner_valid: bool,
    pub expires_at: Option<i64>,
    pub id: &'a str,
    pub owner: &'a str,
    allowed_ips: &'a [u8],
    sites: &'a [u8],
    scopes: &'a [u8],
    limits: &'a [u8],
    has_limits: bool,
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(u16::from_le_bytes([b[0], b[1]]) as usize)
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.u16()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
    /// A u16-counted list of u16-prefixed strings, returned whole for lazy iteration.
    fn strs(&mut self) -> Option<&'a [u8]> {
        let all = self.0;
        let n = self.u16()?;
        for _ in 0..n {
            self.str()?;
        }
        all.get(..all.len() - self.0.len())
    }
}

impl<'a> Record<'a> {
    fn parse(body: &'a [u8]) -> Option<Record<'a>> {
        let mut c = Cursor(body);
        c.take(32)?;
        let flags = c.take(1)?[0];
        let exp = c.take(8)?;
        let expires = i64::from_le_bytes(exp.try_into().ok()?);
        let id = c.str()?;
        let owner = c.str()?;
        let ips_len = IpSet::encoded_len(c.0)?;
        let allowed_ips = c.take(ips_len)?;
        let sites = c.strs()?;
        let scopes = c.strs()?;
        let n = c.u16()?;
        let limits = c.take(n * 12)?;
        Some(Record {
            active: flags & FLAG_ACTIVE != 0,
            owner_valid: flags & FLAG_OWNER_VALID != 0,
            expires_at: (flags & FLAG_EXPIRES != 0).then_some(expires),
            id,
            owner,
            allowed_ips,
            sites,
            scopes,
            limits,
            has_limits: flags & FLAG_LIMITS != 0,
        })
    }

    pub fn ip_allowed(&self, ip: Option<std::net::IpAddr>) -> bool {
        if IpSet::is_empty_encoded(self.allowed_ips) {
            return true;
        }
        ip.is_some_and(|ip| IpSet::contains_encoded(self.allowed_ips, ip))
    }

    pub fn sites(&self) -> StrIter<'a> {
        StrIter::new(self.sites)
    }

    pub fn scopes(&self) -> StrIter<'a> {
        StrIter::new(self.scopes)
    }

    /// The key's own (or plan) limits; `None` means "use the configured default".
    pub fn limits(&self) -> Option<Vec<Limit>> {
        self.has_limits.then(|| {
            self.limits
                .chunks_exact(12)
                .map(|c| Limit {
                    limit: u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64,
                    window_s: u64::from_le_bytes([
                        c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11],
                    ]),
                })
                .collect()
        })
    }
}

/// Iterates a u16-counted list of strings in place.
pub struct StrIter<'a> {
    cursor: Cursor<'a>,
    left: usize,
}

impl<'a> StrIter<'a> {
    fn new(raw: &'a [u8]) -> StrIter<'a> {
        let mut cursor = Cursor(raw);
        let left = cursor.u16().unwrap_or(0);
        StrIter { cursor, left }
    }
}

impl<'a> Iterator for StrIter<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.cursor.str()
    }
}

/// Builds every bucket of a layout: `(index, value)` for all 2^bits buckets, empty ones included
/// so that a lookup can tell "absent" from "not published".
pub fn build_buckets(keys: &[KeyEntry], bits: u8) -> Vec<Vec<u8>> {
    // Group by bucket first, then sort each small bucket: far cheaper than sorting every key.
    let mut members: Vec<Vec<&KeyEntry>> = (0..1usize << bits).map(|_| Vec::new()).collect();
    for e in keys {
        if let Some(m) = members.get_mut(bucket_index(&e.hash, bits) as usize) {
            m.push(e);
        }
    }
    members
        .into_iter()
        .map(|mut m| {
            m.sort_unstable_by_key(|e| e.hash);
            encode_bucket(m)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn entry(key: &str, id: &str) -> KeyEntry {
        KeyEntry::sample(key, id)
    }

    #[test]
    fn bits_grow_with_keys() {
        assert_eq!(bucket_bits(0), 4);
        assert_eq!(bucket_bits(1000), 6);
        assert_eq!(bucket_bits(1_000_000), 16);
        assert_eq!(bucket_bits(100_000_000), 20);
    }

    #[test]
    fn every_key_is_found_in_its_bucket_and_others_are_absent() {
        let mut keys: Vec<KeyEntry> = (0..500)
            .map(|i| entry(&format!("k{i}"), &format!("id{i}")))
            .collect();
        keys[7].active = false;
        keys[7].expires_at = Some(-5);
        keys[7].sites = vec!["123".into(), "456".into()];
        keys[7].scopes = vec!["contacts:*".into()];
        keys[7].limits = Some(vec![
            Limit {
                limit: 60,
                window_s: 60,
            },
            Limit {
                limit: 5,
                window_s: 1,
            },
        ]);
        keys[7].allowed_ips = IpSet::parse(&["10.0.0.0/8", "2001:db8::/32"]).unwrap();
        let bits = bucket_bits(keys.len());
        let buckets = build_buckets(&keys, bits);
        assert_eq!(buckets.len(), 1 << bits);
        for (i, k) in keys.iter().enumerate() {
            let b = &buckets[bucket_index(&k.hash, bits) as usize];
            let Found::Key(r) = find(b, &k.hash) else {
                panic!("key {i} not found")
            };
            assert_eq!(r.id, k.id);
            assert_eq!(r.owner, "org");
            assert_eq!(r.active, k.active);
            assert_eq!(r.expires_at, k.expires_at);
            assert_eq!(r.limits(), k.limits);
            assert_eq!(
                r.sites().collect::<Vec<_>>(),
                k.sites.iter().map(String::as_str).collect::<Vec<_>>()
            );
            assert_eq!(r.scopes().count(), k.scopes.len());
        }
        let Found::Key(r) = find(
            &buckets[bucket_index(&keys[7].hash, bits) as usize],
            &keys[7].hash,
        ) else {
            panic!()
        };
        assert!(r.ip_allowed(Some("10.1.2.3".parse().unwrap())));
        assert!(r.ip_allowed(Some("::ffff:10.1.2.3".parse().unwrap())));
        assert!(!r.ip_allowed(Some("11.1.2.3".parse().unwrap())));
        assert!(!r.ip_allowed(None));
        let other: [u8; 32] = Sha256::digest(b"nope").into();
        assert_eq!(
            find(&buckets[bucket_index(&other, bits) as usize], &other),
            Found::Absent
        );
    }

    #[test]
    fn moved_and_garbage_buckets_never_panic() {
        let h = [0u8; 32];
        assert_eq!(find(&[], &h), Found::Moved);
        assert_eq!(find(&[BUCKET_MOVED], &h), Found::Moved);
        assert_eq!(find(&[BUCKET_LIVE], &h), Found::Absent);
        assert_eq!(find(&[BUCKET_LIVE, 200, 0, 0, 0, 1], &h), Found::Moved);
        let mut b = vec![BUCKET_LIVE];
        encode_entry(&entry("x", "y"), &mut b);
        for cut in 0..b.len() {
            let _ = find(&b[..cut], &h);
        }
    }
}
