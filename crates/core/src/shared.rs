//! State shared by every VM of one Envoy instance, kept in proxy-wasm shared data behind a small
//! trait so the same code runs against the host and, natively, against an in-memory map.
//!
//! Layout (all names start with `keygate:`):
//! - `meta`: JSON `Meta` — which bucket layout is live, when the list was last fetched.
//! - `b:<bits>:<index>`: the key buckets of `record`.
//! - `dict:<0|1>`: the dictionary the buckets refer to (`dictionary`), in two alternating slots.
//! - `rl:<slot>` and `ip:<slot>`: the fixed counter tables of `ratelimit`, made before traffic.
//! - `lease`: which root context fetches the key list (one per instance, not per worker).
//!
//! Writes always carry the CAS value that was read, or none for a key that does not exist yet:
//! Envoy treats CAS 0 as "unconditional" and ngx_wasm_module as "only if absent", and this rule
//! is correct for both.

use crate::config::Limit;
use crate::dictionary;
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
    /// The dictionary of the live buckets: its slot and tag (0: none).
    #[serde(default)]
    pub dict_slot: u8,
    #[serde(default)]
    pub dict_tag: u64,
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
    /// Publishes a validated list: its dictionary and new buckets first, then the meta record
    /// that makes them live, then a `moved` mark over a replaced layout so no worker keeps
    /// reading it. Buckets are built one at a time in one buffer, from the list's hash order.
    pub fn publish(
        &mut self,
        store: &dyn SharedStore,
        list: &KeyList,
        etag: Option<String>,
        source: &str,
        now: u64,
    ) -> Meta {
        let previous = read_meta(store).unwrap_or_default();
        let bits = record::bucket_bits(list.len());
        let tag = dictionary::tag(list.dictionary());
        // A new dictionary goes to the other slot: the current one may still be read.
        let slot = if tag == 0 || (previous.generation > 0 && previous.dict_tag == tag) {
            previous.dict_slot
        } else {
            let slot = if previous.generation > 0 {
                previous.dict_slot ^ 1
            } else {
                0
            };
            let value = dictionary::shared_value(list.dictionary());
            overwrite(store, &dictionary::slot_key(slot), &value);
            slot
        };
        // Only our own last publish tells which buckets still hold what we wrote.
        let known = self.generation == previous.generation && self.bits == bits;
        let mut digests = Vec::with_capacity(1 << bits);
        let mut records = list.sorted().peekable();
        let mut bucket = Vec::new();
        for i in 0..1u32 << bits {
            bucket.clear();
            record::bucket_header(&mut bucket, slot, tag);
            while let Some((_, r)) =
                records.next_if(|(lead, _)| (*lead as u64) >> (32 - bits as u32) == i as u64)
            {
                bucket.extend_from_slice(r);
            }
            let d = ratelimit::fnv1a(&bucket);
            digests.push(d);
            if known && self.digests.get(i as usize) == Some(&d) {
                continue;
            }
            overwrite(store, &bucket_key(bits, i), &bucket);
        }
        let meta = Meta {
            generation: previous.generation + 1,
            bits,
            keys: list.len() as u64,
            version: list.version.clone(),
            etag,
            fetched_at: now,
            loaded_at: now,
            source: source.to_string(),
            dict_slot: slot,
            dict_tag: tag,
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
    use crate::keylist::{self, KeyList};
    use crate::record::{bucket_index, find, Found};
    use sha2::{Digest, Sha256};

    fn hash(i: u32) -> [u8; 32] {
        Sha256::digest(format!("key{i}").as_bytes()).into()
    }

    /// Keys `ids` (owner `org<i % 3>`, scopes `scope`), those in `revoked` not active.
    fn list(ids: std::ops::Range<u32>, revoked: &[u32], scope: &str) -> KeyList {
        let keys: Vec<String> = ids
            .map(|i| {
                let h: String = hash(i).iter().map(|b| format!("{b:02x}")).collect();
                let status = if revoked.contains(&i) { "revoked" } else { "active" };
                format!(
                    r#"{{"id":"id{i}","hash":"{h}","owner":"org{}","status":"{status}","scopes":["{scope}"]}}"#,
                    i % 3
                )
            })
            .collect();
        keylist::parse(format!(r#"{{"version":"1","keys":[{}]}}"#, keys.join(",")).as_bytes())
            .unwrap()
    }

    #[derive(Debug, PartialEq)]
    enum Seen {
        Key {
            id: String,
            active: bool,
            owner: String,
            scopes: Vec<String>,
        },
        Absent,
        Moved,
    }

    fn lookup(store: &MemoryStore, meta: &Meta, key: u32) -> Seen {
        let h = hash(key);
        let bucket = store
            .get(&bucket_key(meta.bits, bucket_index(&h, meta.bits)))
            .0
            .unwrap_or_default();
        let Some(dict) = dictionary::for_bucket(store, &bucket) else {
            return Seen::Moved;
        };
        match find(&bucket, &h, &dict) {
            Found::Key(r) => Seen::Key {
                id: r.id.to_string(),
                active: r.active,
                owner: r.owner.to_string(),
                scopes: r.scopes().map(str::to_string).collect(),
            },
            Found::Absent => Seen::Absent,
            Found::Moved => Seen::Moved,
        }
    }

    fn active(store: &MemoryStore, meta: &Meta, key: u32) -> Option<bool> {
        match lookup(store, meta, key) {
            Seen::Key { active, .. } => Some(active),
            _ => None,
        }
    }

    #[test]
    fn publish_replace_and_relayout() {
        let store = MemoryStore::default();
        let mut p = Publisher::default();
        let small = list(0..10, &[], "a:*");
        let m1 = p.publish(&store, &small, Some("\"e1\"".into()), "ks/v1", 100);
        assert_eq!((m1.generation, m1.keys), (1, 10));
        assert_eq!(read_meta(&store).unwrap(), m1);
        assert_eq!(
            lookup(&store, &m1, 3),
            Seen::Key {
                id: "id3".into(),
                active: true,
                owner: "org0".into(),
                scopes: vec!["a:*".into()]
            }
        );

        // Revoke one key: only its bucket changes (the dictionary is the same).
        let writes_before = store.next_cas.get();
        let m2 = p.publish(&store, &list(0..10, &[3], "a:*"), None, "ks/v1", 110);
        assert_eq!(
            store.next_cas.get() - writes_before,
            2,
            "one bucket and the meta"
        );
        assert_eq!(active(&store, &m2, 3), Some(false));
        assert_eq!(m2.dict_slot, m1.dict_slot);

        // Grow: a new layout, and the old one answers `moved`.
        let m3 = p.publish(&store, &list(0..5000, &[], "a:*"), None, "ks/v1", 120);
        assert_ne!(m3.bits, m1.bits);
        assert_eq!(lookup(&store, &m1, 0), Seen::Moved);
        assert_eq!(active(&store, &m3, 4999), Some(true));
        // A key removed from the list is absent.
        let m4 = p.publish(&store, &list(1..5000, &[], "a:*"), None, "ks/v1", 130);
        assert_eq!(lookup(&store, &m4, 0), Seen::Absent);

        touch(&store, 999);
        assert_eq!(read_meta(&store).unwrap().fetched_at, 999);
    }

    #[test]
    fn a_new_dictionary_goes_to_the_other_slot() {
        let store = MemoryStore::default();
        let mut p = Publisher::default();
        let m1 = p.publish(&store, &list(0..100, &[], "a:*"), None, "s", 1);
        assert_ne!(m1.dict_tag, 0);
        let m2 = p.publish(&store, &list(0..100, &[], "b:*"), None, "s", 2);
        assert_ne!(m2.dict_slot, m1.dict_slot);
        assert_ne!(m2.dict_tag, m1.dict_tag);
        for i in 0..100 {
            let Seen::Key { scopes, owner, .. } = lookup(&store, &m2, i) else {
                panic!("key {i}")
            };
            assert_eq!(
                (scopes, owner),
                (vec!["b:*".to_string()], format!("org{}", i % 3))
            );
        }
        // Back to the first dictionary: the slot flips again and the answers follow.
        let m3 = p.publish(&store, &list(0..100, &[], "a:*"), None, "s", 3);
        assert_eq!(m3.dict_slot, m1.dict_slot);
        assert!(matches!(lookup(&store, &m3, 7), Seen::Key { scopes, .. } if scopes == ["a:*"]));
    }

    #[test]
    fn a_new_leader_rewrites_everything() {
        let store = MemoryStore::default();
        Publisher::default().publish(&store, &list(0..10, &[], "a:*"), None, "s", 1);
        let m = Publisher::default().publish(&store, &list(0..10, &[0], "a:*"), None, "s", 2);
        assert_eq!(active(&store, &m, 0), Some(false));
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
