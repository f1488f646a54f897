//! Compact binary form of resolved keys, grouped into hash buckets.
//!
//! The key list lives once per Envoy instance in proxy-wasm shared data, not parsed in every VM:
//! keys are spread over 2^bits buckets by the leading bits of their SHA-256, and a request reads
//! exactly one bucket (one host call) and scans its few records without decoding the others.
//!
//! Bucket: `BUCKET_LIVE`, the dictionary slot (u8) and tag (u64 LE) its records refer to, then
//! records sorted by hash. Record: varint length of the rest, hash (32), flags (u8), expiry
//! (zigzag varint, when flagged), id (varint length + bytes), owner, then the allowed IPs, sites,
//! scopes, limits and the owner's limits when flagged. Those last six are fields: `varint(n << 1)` and n bytes
//! inline, or `varint(i << 1 | 1)` for entry i of the list's dictionary (repeated values are
//! stored once there). Sites and scopes are varint-prefixed strings back to back; limits are
//! varint pairs (limit, window_s).

use crate::config::Limit;
use crate::dictionary::{self, Dictionary};
use crate::ipset::IpSet;
use crate::shared::SharedStore;
use crate::varint;
use std::rc::Rc;

/// First byte of a bucket value: a live bucket of records.
pub const BUCKET_LIVE: u8 = 1;
/// First byte of a bucket value: this layout was replaced; re-read the meta record.
pub const BUCKET_MOVED: u8 = 2;
/// `BUCKET_LIVE`, dictionary slot, dictionary tag.
pub const BUCKET_HEADER: usize = 10;

const FLAG_ACTIVE: u8 = 1;
const FLAG_OWNER_VALID: u8 = 2;
const FLAG_EXPIRES: u8 = 4;
const FLAG_LIMITS: u8 = 8;
const FLAG_IPS: u8 = 16;
const FLAG_SITES: u8 = 32;
const FLAG_SCOPES: u8 = 64;
const FLAG_OWNER_LIMITS: u8 = 128;

/// Buckets for `n` keys: about 16 records each, from 2^4 to 2^20 buckets.
/// The fewest and the most bucket bits a layout has (`bucket_bits`).
pub const MIN_BUCKET_BITS: u8 = 4;
pub const MAX_BUCKET_BITS: u8 = 20;

pub fn bucket_bits(n: usize) -> u8 {
    let want = n.div_ceil(16).max(1);
    (usize::BITS - (want - 1).leading_zeros()).clamp(MIN_BUCKET_BITS as u32, MAX_BUCKET_BITS as u32)
        as u8
}

pub fn bucket_index(hash: &[u8; 32], bits: u8) -> u32 {
    let lead = u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]);
    if bits == 0 {
        0
    } else {
        lead >> (32 - bits.min(32) as u32)
    }
}

/// The header of a live bucket whose records refer to dictionary `(slot, tag)`.
pub fn bucket_header(out: &mut Vec<u8>, slot: u8, tag: u64) {
    out.push(BUCKET_LIVE);
    out.push(slot);
    out.extend_from_slice(&tag.to_le_bytes());
}

/// The dictionary `(slot, tag)` a live bucket's records refer to (tag 0: none).
pub fn bucket_dictionary(bucket: &[u8]) -> Option<(u8, u64)> {
    match bucket.get(..BUCKET_HEADER)? {
        [BUCKET_LIVE, slot, tag @ ..] => Some((*slot, u64::from_le_bytes(tag.try_into().ok()?))),
        _ => None,
    }
}

/// The dictionary a live bucket's records refer to (see `dictionary::load`); None for a moved
/// or malformed bucket, or a dictionary replaced twice meanwhile.
pub fn dictionary_for(store: &dyn SharedStore, bucket: &[u8]) -> Option<Rc<Dictionary>> {
    let (slot, tag) = bucket_dictionary(bucket)?;
    dictionary::load(store, slot, tag)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// One key, resolved, borrowed from wherever it was parsed.
pub struct Entry<'a, S> {
    pub hash: [u8; 32],
    pub id: &'a str,
    pub owner: &'a str,
    /// `status` is `active` (or absent).
    pub active: bool,
    /// The owner is active in `owners` (or `owners` is absent).
    pub owner_valid: bool,
    /// Unix seconds; the key is expired when now ≥ this.
    pub expires_at: Option<i64>,
    pub allowed_ips: &'a IpSet,
    pub sites: &'a [S],
    pub scopes: &'a [S],
    /// The key's own limits, else its plan's; `None` falls back to the configured default.
    pub limits: Option<&'a [Limit]>,
    /// The owner's limits (SPEC §2), shared by all of its keys; `None` or empty: none.
    pub owner_limits: Option<&'a [Limit]>,
}

/// Appends a field: a dictionary reference when the value is (or can be made) an entry.
fn put_field(out: &mut Vec<u8>, value: &[u8], dict: &mut dictionary::Builder) {
    match dict.intern(value) {
        Some(i) => varint::put(out, (i as u64) << 1 | 1),
        None => {
            varint::put(out, (value.len() as u64) << 1);
            out.extend_from_slice(value);
        }
    }
}

fn put_strs<S: AsRef<str>>(out: &mut Vec<u8>, items: &[S]) {
    for s in items {
        varint::put(out, s.as_ref().len() as u64);
        out.extend_from_slice(s.as_ref().as_bytes());
    }
}

/// Buffers reused from one record to the next.
#[derive(Default)]
pub struct Scratch {
    body: Vec<u8>,
    value: Vec<u8>,
}

/// Appends one record (see the module note).
pub fn encode<S: AsRef<str>>(
    e: &Entry<'_, S>,
    dict: &mut dictionary::Builder,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) {
    let mut flags = 0;
    for (on, flag) in [
        (e.active, FLAG_ACTIVE),
        (e.owner_valid, FLAG_OWNER_VALID),
        (e.expires_at.is_some(), FLAG_EXPIRES),
        (e.limits.is_some(), FLAG_LIMITS),
        (!e.allowed_ips.is_empty(), FLAG_IPS),
        (!e.sites.is_empty(), FLAG_SITES),
        (!e.scopes.is_empty(), FLAG_SCOPES),
        (
            e.owner_limits.is_some_and(|l| !l.is_empty()),
            FLAG_OWNER_LIMITS,
        ),
    ] {
        if on {
            flags |= flag;
        }
    }
    let Scratch { body, value } = scratch;
    body.clear();
    body.extend_from_slice(&e.hash);
    body.push(flags);
    if let Some(t) = e.expires_at {
        varint::put(body, zigzag(t));
    }
    varint::put(body, e.id.len() as u64);
    body.extend_from_slice(e.id.as_bytes());
    put_field(body, e.owner.as_bytes(), dict);
    if flags & FLAG_IPS != 0 {
        value.clear();
        e.allowed_ips.encode(value);
        put_field(body, value, dict);
    }
    for (flag, items) in [(FLAG_SITES, e.sites), (FLAG_SCOPES, e.scopes)] {
        if flags & flag != 0 {
            value.clear();
            put_strs(value, items);
            put_field(body, value, dict);
        }
    }
    let owner_limits = e.owner_limits.filter(|_| flags & FLAG_OWNER_LIMITS != 0);
    for limits in [e.limits, owner_limits].into_iter().flatten() {
        value.clear();
        for l in limits {
            varint::put(value, l.limit);
            varint::put(value, l.window_s);
        }
        put_field(body, value, dict);
    }
    varint::put(out, body.len() as u64);
    out.extend_from_slice(body);
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.varint()?).ok()
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }
    /// An inline value or a dictionary entry.
    fn field(&mut self, dict: &'a Dictionary) -> Option<&'a [u8]> {
        let v = self.varint()?;
        if v & 1 == 1 {
            dict.entry(usize::try_from(v >> 1).ok()?)
        } else {
            self.take(usize::try_from(v >> 1).ok()?)
        }
    }
}

/// Splits the record at the start of `bytes`: `(record, rest)`, the record without its length.
pub fn split_record(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut c = Cursor(bytes);
    let body = c.bytes()?;
    Some((body, c.0))
}

/// A record's hash and id, without the dictionary (for the checks of a whole list).
pub fn hash_and_id(body: &[u8]) -> Option<(&[u8; 32], &str)> {
    let mut c = Cursor(body);
    let hash = c.take(32)?.try_into().ok()?;
    let flags = *c.take(1)?.first()?;
    if flags & FLAG_EXPIRES != 0 {
        c.varint()?;
    }
    let id = std::str::from_utf8(c.bytes()?).ok()?;
    Some((hash, id))
}

/// Where a hash stands in a bucket, without decoding its record.
#[derive(Debug, PartialEq, Eq)]
pub enum Located<'a> {
    /// The record's bytes (without their length), for `Record::decode`.
    Record(&'a [u8]),
    Absent,
    /// The bucket belongs to a replaced layout (or is unreadable): re-read the meta record.
    Moved,
}

/// Finds the record of `hash` in a bucket value.
pub fn locate<'a>(bucket: &'a [u8], hash: &[u8; 32]) -> Located<'a> {
    if bucket_dictionary(bucket).is_none() {
        return Located::Moved;
    }
    let Some(mut rest) = bucket.get(BUCKET_HEADER..) else {
        return Located::Moved;
    };
    while !rest.is_empty() {
        let Some((body, tail)) = split_record(rest) else {
            return Located::Moved;
        };
        match body.get(..32) {
            Some(h) if h == hash => return Located::Record(body),
            Some(h) if h > hash.as_slice() => return Located::Absent,
            Some(_) => {}
            None => return Located::Moved,
        }
        rest = tail;
    }
    Located::Absent
}

/// What a bucket says about one hash.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<'a> {
    Key(Record<'a>),
    Absent,
    /// The bucket belongs to a replaced layout, or it or its dictionary is unreadable.
    Moved,
}

/// Finds and decodes the record of `hash`; `dict` is the bucket's (`dictionary::for_bucket`).
pub fn find<'a>(bucket: &'a [u8], hash: &[u8; 32], dict: &'a Dictionary) -> Found<'a> {
    match locate(bucket, hash) {
        Located::Record(body) => match Record::decode(body, dict) {
            Some(r) => Found::Key(r),
            None => Found::Moved,
        },
        Located::Absent => Found::Absent,
        Located::Moved => Found::Moved,
    }
}

/// A record read in place from a bucket (and its dictionary).
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub hash: &'a [u8; 32],
    pub active: bool,
    pub owner_valid: bool,
    pub expires_at: Option<i64>,
    pub id: &'a str,
    pub owner: &'a str,
    allowed_ips: Option<&'a [u8]>,
    sites: &'a [u8],
    scopes: &'a [u8],
    limits: Option<&'a [u8]>,
    owner_limits: Option<&'a [u8]>,
}

/// Reads varint pairs `(limit, window_s)` back to back (stops at malformed bytes).
fn read_limits(bytes: &[u8]) -> Vec<Limit> {
    let mut c = Cursor(bytes);
    let mut out = Vec::new();
    while !c.0.is_empty() {
        match (c.varint(), c.varint()) {
            (Some(limit), Some(window_s)) => out.push(Limit { limit, window_s }),
            _ => break,
        }
    }
    out
}

impl<'a> Record<'a> {
    /// Decodes a record's bytes (as `locate` returns them) against its bucket's dictionary.
    pub fn decode(body: &'a [u8], dict: &'a Dictionary) -> Option<Record<'a>> {
        let mut c = Cursor(body);
        let hash = c.take(32)?.try_into().ok()?;
        let flags = *c.take(1)?.first()?;
        let expires_at = match flags & FLAG_EXPIRES {
            0 => None,
            _ => Some(unzigzag(c.varint()?)),
        };
        let id = std::str::from_utf8(c.bytes()?).ok()?;
        let owner = std::str::from_utf8(c.field(dict)?).ok()?;
        let mut optional = |flag: u8| -> Option<Option<&'a [u8]>> {
            if flags & flag == 0 {
                Some(None)
            } else {
                c.field(dict).map(Some)
            }
        };
        let allowed_ips = optional(FLAG_IPS)?;
        let sites = optional(FLAG_SITES)?.unwrap_or_default();
        let scopes = optional(FLAG_SCOPES)?.unwrap_or_default();
        let limits = optional(FLAG_LIMITS)?;
        let owner_limits = optional(FLAG_OWNER_LIMITS)?;
        Some(Record {
            hash,
            active: flags & FLAG_ACTIVE != 0,
            owner_valid: flags & FLAG_OWNER_VALID != 0,
            expires_at,
            id,
            owner,
            allowed_ips,
            sites,
            scopes,
            limits,
            owner_limits,
        })
    }

    /// Whether the key's own IP list admits the client; the client IP is asked for only when
    /// the key has a list (reading the source address is a host call).
    pub fn ip_allowed(&self, ip: impl FnOnce() -> Option<std::net::IpAddr>) -> bool {
        match self.allowed_ips {
            None => true,
            Some(set) if IpSet::is_empty_encoded(set) => true,
            Some(set) => ip().is_some_and(|ip| IpSet::contains_encoded(set, ip)),
        }
    }

    pub fn sites(&self) -> StrIter<'a> {
        StrIter(Cursor(self.sites))
    }

    pub fn scopes(&self) -> StrIter<'a> {
        StrIter(Cursor(self.scopes))
    }

    /// The key's own (or plan) limits; `None` means "use the configured default".
    pub fn limits(&self) -> Option<Vec<Limit>> {
        self.limits.map(read_limits)
    }

    /// The owner's limits, shared by all of its keys (SPEC §2); `None` when it has none (no
    /// allocation then: the common case costs nothing).
    pub fn owner_limits(&self) -> Option<Vec<Limit>> {
        self.owner_limits.map(read_limits)
    }
}

/// Iterates varint-prefixed strings in place (stops at malformed bytes).
pub struct StrIter<'a>(Cursor<'a>);

impl<'a> Iterator for StrIter<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        if self.0 .0.is_empty() {
            return None;
        }
        match self.0.bytes().and_then(|b| std::str::from_utf8(b).ok()) {
            Some(s) => Some(s),
            None => {
                self.0 .0 = &[];
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn hash(key: &str) -> [u8; 32] {
        Sha256::digest(key.as_bytes()).into()
    }

    #[test]
    fn bits_grow_with_keys() {
        assert_eq!(bucket_bits(0), 4);
        assert_eq!(bucket_bits(1000), 6);
        assert_eq!(bucket_bits(1_000_000), 16);
        assert_eq!(bucket_bits(100_000_000), 20);
    }

    #[test]
    fn varints_and_zigzag_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            varint::put(&mut b, v);
            assert_eq!(Cursor(&b).varint(), Some(v));
        }
        for t in [0i64, -5, 1_798_675_200, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(t)), t);
        }
    }

    #[test]
    fn records_round_trip_inline_and_through_the_dictionary() {
        let ips = IpSet::parse(&["10.0.0.0/8", "2001:db8::/32"]).unwrap();
        let none = IpSet::default();
        let limits = [
            Limit {
                limit: 60,
                window_s: 60,
            },
            Limit {
                limit: 5,
                window_s: 1,
            },
        ];
        for max in [0, dictionary::MAX_BYTES] {
            let mut dict = dictionary::Builder::with_limit(max);
            let mut bucket = Vec::new();
            bucket_header(&mut bucket, 0, 0);
            let mut scratch = Scratch::default();
            let mut hashes: Vec<[u8; 32]> = (0..3).map(|i| hash(&format!("k{i}"))).collect();
            hashes.sort();
            for (i, h) in hashes.iter().enumerate() {
                let e = Entry {
                    hash: *h,
                    id: ["a", "b", "c"][i],
                    owner: "org-7",
                    active: i != 1,
                    owner_valid: true,
                    expires_at: (i == 1).then_some(-5),
                    allowed_ips: if i == 1 { &ips } else { &none },
                    sites: if i == 1 { &["123", "456"][..] } else { &[] },
                    scopes: &["contacts:*"],
                    limits: (i > 0).then_some(if i == 1 { &limits[..] } else { &[] }),
                    owner_limits: (i == 1).then_some(&limits[1..]),
                };
                encode(&e, &mut dict, &mut scratch, &mut bucket);
            }
            let d = Dictionary::decode(&dict.finish()).unwrap();
            let Found::Key(r) = find(&bucket, &hashes[1], &d) else {
                panic!("not found")
            };
            assert_eq!((r.id, r.owner, r.active), ("b", "org-7", false));
            assert_eq!(r.expires_at, Some(-5));
            assert_eq!(r.limits().as_deref(), Some(&limits[..]));
            assert_eq!(r.owner_limits().as_deref(), Some(&limits[1..]));
            assert_eq!(r.sites().collect::<Vec<_>>(), ["123", "456"]);
            assert_eq!(r.scopes().collect::<Vec<_>>(), ["contacts:*"]);
            assert!(r.ip_allowed(|| Some("10.1.2.3".parse().unwrap())));
            assert!(r.ip_allowed(|| Some("::ffff:10.1.2.3".parse().unwrap())));
            assert!(!r.ip_allowed(|| Some("11.1.2.3".parse().unwrap())));
            assert!(!r.ip_allowed(|| None));
            let Found::Key(r) = find(&bucket, &hashes[0], &d) else {
                panic!()
            };
            assert!(r.active && r.ip_allowed(|| None) && r.sites().next().is_none());
            assert_eq!(r.limits(), None);
            assert_eq!(r.owner_limits(), None);
            let Found::Key(r) = find(&bucket, &hashes[2], &d) else {
                panic!()
            };
            assert_eq!(r.limits(), Some(vec![]));
            assert_eq!(r.owner_limits(), None);
            assert_eq!(find(&bucket, &hash("nope"), &d), Found::Absent);
        }
    }

    #[test]
    fn moved_and_garbage_buckets_never_panic() {
        let h = [0u8; 32];
        let d = Dictionary::default();
        assert_eq!(find(&[], &h, &d), Found::Moved);
        assert_eq!(find(&[BUCKET_MOVED], &h, &d), Found::Moved);
        let mut live = Vec::new();
        bucket_header(&mut live, 0, 0);
        assert_eq!(find(&live, &h, &d), Found::Absent);
        let mut b = live.clone();
        b.extend_from_slice(&[200, 0, 0, 0, 1]);
        assert_eq!(find(&b, &h, &d), Found::Moved);
        let mut b = live.clone();
        let mut dict = dictionary::Builder::with_limit(dictionary::MAX_BYTES);
        let e = Entry {
            hash: h,
            id: "y",
            owner: "o",
            active: true,
            owner_valid: true,
            expires_at: Some(3),
            allowed_ips: &IpSet::default(),
            sites: &["s"],
            scopes: &["x:*"],
            limits: Some(&[]),
            owner_limits: Some(&[Limit {
                limit: 1,
                window_s: 1,
            }]),
        };
        encode(&e, &mut dict, &mut Scratch::default(), &mut b);
        for cut in 0..b.len() {
            let _ = find(&b[..cut], &h, &d);
            let mut flipped = b.clone();
            flipped[cut] ^= 0xff;
            let _ = find(&flipped, &h, &d).clone_record();
        }
    }

    impl Found<'_> {
        fn clone_record(&self) -> Option<(String, Option<Vec<Limit>>, Vec<String>)> {
            match self {
                Found::Key(r) => Some((
                    r.owner.to_string(),
                    r.limits(),
                    r.scopes().chain(r.sites()).map(str::to_string).collect(),
                )),
                _ => None,
            }
        }
    }
}
