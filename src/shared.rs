//! State shared by every VM of one Envoy instance, kept in proxy-wasm shared data behind a small
//! trait so the same code runs against the host and, natively, against an in-memory map.
//!
//! Layout (all names start with `keygate:`):
//! - `meta`: JSON `Meta` — which bucket layout is live, when the list was last fetched.
//! - `b:<bits>:<index>`: the key buckets of `record`.
//! - `rl:<slot>` and `ip:<slot>`: the fixed counter tables of `ratelimit`, made before traffic.
//! - `lease`: which root context fetches the key list (one per instance, not per worker).
//!
//! Writes always carry the CAS value that was read, or none for a key that does not exist yet:
//! Envoy treats CAS 0 as "unconditional" and ngx_wasm_module as "only if absent", and this rule
//! is correct for both.

use crate::config::Limit;
use crate::keylist::KeyList;
use crate::ratelimit::{self, Counted, IP_SLOTS, KEY_SLOTS};
use crate::record::{self, BUCKET_MOVED};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

#[derive(Debug, PartialEq, Eq)]
pub enum SetError {
    CasMismatch,
    Failed,
}

pub trait SharedStore {
    /// The value and its CAS token, or `(None, _)` when the key does not exist.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
}

pub const META: &str = "keygate:meta";
pub const LEASE: &str = "keygate:lease";
const SLOTS_READY: &str = "keygate:slots";
/// How many times a CAS update is retried before the request gives up on it.
const CAS_ATTEMPTS: usize = 64;

pub fn bucket_key(bits: u8, index: u32) -> String {
    format!("keygate:b:{bits}:{index}")
}

fn key_slot(id: &str) -> (u64, String) {
    let tag = ratelimit::fnv1a(id.as_bytes());
    (tag, format!("keygate:rl:{}", tag % KEY_SLOTS as u64))
}

fn ip_slot(ip: Option<IpAddr>) -> String {
    let slot = match ip {
        Some(IpAddr::V4(a)) => ratelimit::fnv1a(&a.octets()),
        Some(IpAddr::V6(a)) => ratelimit::fnv1a(&a.octets()),
        None => 0,
    } % IP_SLOTS as u64;
    format!("keygate:ip:{slot}")
}

/// What is live: the bucket layout and the freshness of the list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Bumped by every publish; 0 means nothing published yet.
    pub generation: u64,
    pub bits: u8,
    pub keys: u64,
    pub version: Option<String>,
    pub etag: Option<String>,
    /// Unix seconds of the last successful fetch (a 304 counts).
    pub fetched_at: u64,
    /// Unix seconds the live list was published.
    pub loaded_at: u64,
    /// The key-list source this list came from (cluster and path), so a reconfigured filter
    /// does not serve a list fetched for another source.
    pub source: String,
}

pub fn read_meta(store: &dyn SharedStore) -> Option<Meta> {
    let (value, _) = store.get(META);
    serde_json::from_slice(&value?).ok()
}

fn write_meta(store: &dyn SharedStore, meta: &Meta) {
    if let Ok(bytes) = serde_json::to_vec(meta) {
        overwrite(store, META, &bytes);
    }
}

/// Writes `value` whatever is there, with the CAS just read (see the module note).
fn overwrite(store: &dyn SharedStore, key: &str, value: &[u8]) -> bool {
    for _ in 0..CAS_ATTEMPTS {
        let (old, cas) = store.get(key);
        let cas = if old.is_some() { cas } else { None };
        match store.set(key, value, cas) {
            Ok(()) => return true,
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return false,
        }
    }
    false
}

/// Creates the counter tables once per instance, before they can be contended: a CAS write to
/// a missing key creates it unconditionally, so two first increments racing could lose one.
pub fn ensure_counter_slots(store: &dyn SharedStore) {
    if store.get(SLOTS_READY).0.is_some() {
        return;
    }
    let names = (0..KEY_SLOTS)
        .map(|i| format!("keygate:rl:{i}"))
        .chain((0..IP_SLOTS).map(|i| format!("keygate:ip:{i}")));
    for name in names {
        if store.get(&name).0.is_none() {
            let _ = store.set(&name, &[], None);
        }
    }
    let _ = store.set(SLOTS_READY, b"1", None);
}

/// The leader's memory of what it last published, so an unchanged bucket is not rewritten.
#[derive(Default)]
pub struct Publisher {
    generation: u64,
    bits: u8,
    digests: Vec<u64>,
}

impl Publisher {
    /// Publishes a validated list: new buckets first, then the meta record that makes them
    /// live, then a `moved` mark over a replaced layout so no worker keeps reading it.
    pub fn publish(
        &mut self,
        store: &dyn SharedStore,
        list: &KeyList,
        etag: Option<String>,
        source: &str,
        now: u64,
    ) -> Meta {
        let previous = read_meta(store).unwrap_or_default();
        let bits = record::bucket_bits(list.keys.len());
        let buckets = record::build_buckets(&list.keys, bits);
        // Only our own last publish tells which buckets still hold what we wrote.
        let known = self.generation == previous.generation && self.bits == bits;
        let mut digests = Vec::with_capacity(buckets.len());
        for (i, b) in buckets.iter().enumerate() {
            let d = ratelimit::fnv1a(b);
            digests.push(d);
            if known && self.digests.get(i) == Some(&d) {
                continue;
            }
            overwrite(store, &bucket_key(bits, i as u32), b);
        }
        let meta = Meta {
            generation: previous.generation + 1,
            bits,
            keys: list.keys.len() as u64,
            version: list.version.clone(),
            etag,
            fetched_at: now,
            loaded_at: now,
            source: source.to_string(),
        };
        write_meta(store, &meta);
        if previous.generation > 0 && previous.bits != bits {
            for i in 0..1u32 << previous.bits {
                overwrite(store, &bucket_key(previous.bits, i), &[BUCKET_MOVED]);
            }
        }
        self.generation = meta.generation;
        self.bits = bits;
        self.digests = digests;
        meta
    }
}

/// Records a successful fetch that kept the list (304): only freshness changes.
pub fn touch(store: &dyn SharedStore, now: u64) {
    if let Some(mut meta) = read_meta(store) {
        meta.fetched_at = now;
        write_meta(store, &meta);
    }
}

/// Counts a request of key `id` in the shared table, exactly: read, count, CAS write, retry on
/// conflict. `None` when the CAS never went through (the caller refuses rather than over-admit).
pub fn count_key(store: &dyn SharedStore, id: &str, limits: &[Limit], now: u64) -> Option<Counted> {
    let (tag, name) = key_slot(id);
    for _ in 0..CAS_ATTEMPTS {
        let (value, cas) = store.get(&name);
        let exists = value.is_some();
        let (next, counted) =
            ratelimit::count_in_slot(value.as_deref().unwrap_or(&[]), tag, limits, now);
        match store.set(&name, &next, if exists { cas } else { None }) {
            Ok(()) => return Some(counted),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return None,
        }
    }
    None
}

pub fn ip_failures(store: &dyn SharedStore, ip: Option<IpAddr>, limit: &Limit, now: u64) -> u64 {
    let (value, _) = store.get(&ip_slot(ip));
    ratelimit::failures_in_slot(value.as_deref().unwrap_or(&[]), limit, now)
}

pub fn add_ip_failure(store: &dyn SharedStore, ip: Option<IpAddr>, limit: &Limit, now: u64) {
    let name = ip_slot(ip);
    for _ in 0..CAS_ATTEMPTS {
        let (value, cas) = store.get(&name);
        let exists = value.is_some();
        let next = ratelimit::add_failure(value.as_deref().unwrap_or(&[]), limit, now);
        match store.set(&name, &next, if exists { cas } else { None }) {
            Err(SetError::CasMismatch) => continue,
            _ => return,
        }
    }
}

/// Envoy's shared-data semantics in memory, for native tests and the benchmarks.
#[derive(Default)]
pub struct MemoryStore {
    map: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
    next_cas: std::cell::Cell<u32>,
}

impl MemoryStore {
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> usize {
        self.map
            .borrow()
            .iter()
            .map(|(k, (v, _))| k.len() + v.len())
            .sum()
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.map.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        let mut map = self.map.borrow_mut();
        if let (Some(want), Some((_, have))) = (cas.filter(|c| *c != 0), map.get(key)) {
            if want != *have {
                return Err(SetError::CasMismatch);
            }
        }
        let next = self.next_cas.get().wrapping_add(1).max(1);
        self.next_cas.set(next);
        map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keylist::KeyEntry;
    use crate::record::{bucket_index, find, Found};

    fn entry(i: u32) -> KeyEntry {
        KeyEntry::sample(&format!("key{i}"), &format!("id{i}"))
    }

    fn lookup<'a>(
        store: &MemoryStore,
        meta: &Meta,
        e: &KeyEntry,
        buf: &'a mut Vec<u8>,
    ) -> Found<'a> {
        *buf = store
            .get(&bucket_key(meta.bits, bucket_index(&e.hash, meta.bits)))
            .0
            .unwrap_or_default();
        find(buf, &e.hash)
    }

    #[test]
    fn publish_replace_and_relayout() {
        let store = MemoryStore::default();
        let mut p = Publisher::default();
        let small = KeyList {
            version: Some("1".into()),
            keys: (0..10).map(entry).collect(),
        };
        let m1 = p.publish(&store, &small, Some("\"e1\"".into()), "ks/v1", 100);
        assert_eq!((m1.generation, m1.keys), (1, 10));
        assert_eq!(read_meta(&store).unwrap(), m1);
        let mut buf = Vec::new();
        assert!(
            matches!(lookup(&store, &m1, &small.keys[3], &mut buf), Found::Key(r) if r.id == "id3")
        );

        // Revoke one key: only its bucket changes.
        let mut revoked = small.clone();
        revoked.keys[3].active = false;
        let writes_before = store.next_cas.get();
        let m2 = p.publish(&store, &revoked, None, "ks/v1", 110);
        assert_eq!(
            store.next_cas.get() - writes_before,
            2,
            "one bucket and the meta"
        );
        assert!(
            matches!(lookup(&store, &m2, &small.keys[3], &mut buf), Found::Key(r) if !r.active)
        );

        // Grow: a new layout, and the old one answers `moved`.
        let big = KeyList {
            version: None,
            keys: (0..5000).map(entry).collect(),
        };
        let m3 = p.publish(&store, &big, None, "ks/v1", 120);
        assert_ne!(m3.bits, m1.bits);
        assert_eq!(lookup(&store, &m1, &big.keys[0], &mut buf), Found::Moved);
        assert!(matches!(
            lookup(&store, &m3, &big.keys[4999], &mut buf),
            Found::Key(_)
        ));
        // A key removed from the list is absent.
        let fewer = KeyList {
            version: None,
            keys: (1..5000).map(entry).collect(),
        };
        let m4 = p.publish(&store, &fewer, None, "ks/v1", 130);
        assert_eq!(lookup(&store, &m4, &big.keys[0], &mut buf), Found::Absent);

        touch(&store, 999);
        assert_eq!(read_meta(&store).unwrap().fetched_at, 999);
    }

    #[test]
    fn a_new_leader_rewrites_everything() {
        let store = MemoryStore::default();
        let list = KeyList {
            version: None,
            keys: (0..10).map(entry).collect(),
        };
        Publisher::default().publish(&store, &list, None, "s", 1);
        let mut changed = list.clone();
        changed.keys[0].active = false;
        let m = Publisher::default().publish(&store, &changed, None, "s", 2);
        let mut buf = Vec::new();
        assert!(matches!(lookup(&store, &m, &list.keys[0], &mut buf), Found::Key(r) if !r.active));
    }

    #[test]
    fn counters_and_failures_in_the_store() {
        let store = MemoryStore::default();
        ensure_counter_slots(&store);
        let n = store.len();
        assert_eq!(n, (KEY_SLOTS + IP_SLOTS + 1) as usize);
        ensure_counter_slots(&store);
        let lim = [Limit {
            limit: 2,
            window_s: 60,
        }];
        let allowed: Vec<bool> = (0..4)
            .map(|_| count_key(&store, "k1", &lim, 120).unwrap().allowed())
            .collect();
        assert_eq!(allowed, [true, true, false, false]);
        let ip: Option<IpAddr> = Some("127.0.0.2".parse().unwrap());
        add_ip_failure(&store, ip, &lim[0], 120);
        add_ip_failure(&store, ip, &lim[0], 121);
        assert_eq!(ip_failures(&store, ip, &lim[0], 122), 2);
        assert_eq!(
            ip_failures(&store, Some("127.0.0.3".parse().unwrap()), &lim[0], 122),
            0
        );
        // Thousands of distinct keys and addresses create no new shared entries.
        for i in 0..5000 {
            count_key(&store, &format!("key{i}"), &lim, 130);
            add_ip_failure(
                &store,
                Some(IpAddr::from([10, 0, (i / 256) as u8, i as u8])),
                &lim[0],
                130,
            );
        }
        assert_eq!(store.len(), n);
    }

    #[test]
    fn cas_mismatch_is_reported() {
        let store = MemoryStore::default();
        store.set("a", b"1", None).unwrap();
        let (_, cas) = store.get("a");
        store.set("a", b"2", None).unwrap();
        assert_eq!(store.set("a", b"3", cas), Err(SetError::CasMismatch));
    }
}
