//! Publishing a validated key list to every VM of the instance: its dictionary and buckets in
//! shared data, then the [`Meta`] record that makes them live (SPEC §5: the list lives once per
//! instance, and the last good list stays until a new one is published whole).

use crate::dictionary;
use crate::keylist::KeyList;
use crate::ratelimit;
use crate::record::{self, BUCKET_MOVED};
use crate::shared::{key, overwrite, SharedStore};
use serde::{Deserialize, Serialize};

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
    #[serde(rename = "fetched_at")]
    pub fetched_at_s: u64,
    /// Unix seconds the live list was published.
    #[serde(rename = "loaded_at")]
    pub loaded_at_s: u64,
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
    let (value, _) = store.get(key::META);
    serde_json::from_slice(&value?).ok()
}

fn write_meta(store: &dyn SharedStore, meta: &Meta) {
    if let Ok(bytes) = serde_json::to_vec(meta) {
        overwrite(store, key::META, &bytes);
    }
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
    /// reading it. Buckets are built one at a time in one buffer, from the list's hash order
    /// (its records taken back one staging stream at a time when the parse spilled them). None
    /// when spilled records could not be read back (another parse overwrote them: only when two
    /// contexts publish at once, which the lease prevents); the meta record is then not written.
    pub fn publish(
        &mut self,
        store: &dyn SharedStore,
        list: &mut KeyList,
        etag: Option<String>,
        source: &str,
        now_s: u64,
    ) -> Option<Meta> {
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
            overwrite(store, &key::dictionary(slot), &value);
            slot
        };
        // Only our own last publish tells which buckets still hold what we wrote.
        let known = self.generation == previous.generation && self.bits == bits;
        let mut out = Buckets {
            store,
            bits,
            slot,
            tag,
            known: known.then_some(&self.digests[..]),
            digests: Vec::with_capacity(1 << bits),
            bucket: Vec::new(),
            next: 0,
        };
        out.start();
        let shift = 32 - bits as u32;
        let complete = list.drain_sorted(Some(store), &mut |lead, r| {
            out.reach(lead >> shift);
            out.bucket.extend_from_slice(r);
        });
        if !complete {
            return None;
        }
        out.reach(1 << bits);
        let digests = out.digests;
        let meta = Meta {
            generation: previous.generation + 1,
            bits,
            keys: list.len() as u64,
            version: list.version.clone(),
            etag,
            fetched_at_s: now_s,
            loaded_at_s: now_s,
            source: source.to_string(),
            dict_slot: slot,
            dict_tag: tag,
        };
        write_meta(store, &meta);
        if previous.generation > 0 && previous.bits != bits {
            for i in 0..1u32 << previous.bits {
                overwrite(store, &key::bucket(previous.bits, i), &[BUCKET_MOVED]);
            }
        }
        self.generation = meta.generation;
        self.bits = bits;
        self.digests = digests;
        Some(meta)
    }
}

/// Buckets being written in index order.
struct Buckets<'a> {
    store: &'a dyn SharedStore,
    bits: u8,
    slot: u8,
    tag: u64,
    /// The digests of what this publisher last wrote in this layout, if it still stands.
    known: Option<&'a [u64]>,
    digests: Vec<u64>,
    /// Bucket `next`, being filled.
    bucket: Vec<u8>,
    next: u32,
}

impl Buckets<'_> {
    fn start(&mut self) {
        self.bucket.clear();
        record::bucket_header(&mut self.bucket, self.slot, self.tag);
    }

    /// Writes the buckets before `index` (the one being filled and any empty ones).
    fn reach(&mut self, index: u32) {
        while self.next < index && self.next < 1 << self.bits {
            let i = self.next;
            let d = ratelimit::fnv1a(&self.bucket);
            self.digests.push(d);
            if self.known.and_then(|k| k.get(i as usize)) != Some(&d) {
                overwrite(self.store, &key::bucket(self.bits, i), &self.bucket);
            }
            self.next += 1;
            self.start();
        }
    }
}

/// Records a successful fetch that kept the list (304): only freshness changes.
pub fn touch(store: &dyn SharedStore, now_s: u64) {
    if let Some(mut meta) = read_meta(store) {
        meta.fetched_at_s = now_s;
        write_meta(store, &meta);
    }
}

/// How many shared-data entries keygate has written in this instance (proxy-wasm can neither
/// list nor delete them, so this is what stays): the fixed keys, the counter tables, the
/// dictionary slots, every bucket layout ever published (a replaced layout stays, marked
/// moved; it is rewritten in place when a list of that size comes back) and the staging chunks
/// of the largest parse (emptied once published). Bounded: at most 2^(MAX_BUCKET_BITS + 1)
/// buckets whatever the history. About 25 reads, for a gauge per tick.
pub fn shared_entries(store: &dyn SharedStore) -> u64 {
    let present = |k: &str| u64::from(store.get(k).0.is_some());
    let fixed = [key::META, key::LEASE, key::TOKEN_SEQ, key::SLOTS_READY]
        .iter()
        .map(|k| present(k))
        .sum::<u64>();
    let staging = store.get(key::STAGE_COUNTS).0.map_or(0, |v| {
        1 + crate::keylist::staging::parse_counts(Some(&v))
            .iter()
            .map(|c| *c as u64)
            .sum::<u64>()
    });
    let slots = if store.get(key::SLOTS_READY).0.is_some() {
        u64::from(ratelimit::KEY_SLOTS) + u64::from(ratelimit::IP_SLOTS)
    } else {
        0
    };
    let dictionaries = present(&key::dictionary(0)) + present(&key::dictionary(1));
    // A layout is written whole the first time, so its bucket 0 tells it is there.
    let buckets = (record::MIN_BUCKET_BITS..=record::MAX_BUCKET_BITS)
        .filter(|bits| store.get(&key::bucket(*bits, 0)).0.is_some())
        .map(|bits| 1u64 << bits)
        .sum::<u64>();
    fixed + slots + dictionaries + buckets + staging
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keylist::{self, KeyList};
    use crate::record::{bucket_index, dictionary_for, find, Found};
    use crate::shared::MemoryStore;
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
            .get(&key::bucket(meta.bits, bucket_index(&h, meta.bits)))
            .0
            .unwrap_or_default();
        let Some(dict) = dictionary_for(store, &bucket) else {
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
        let mut small = list(0..10, &[], "a:*");
        let m1 = p
            .publish(&store, &mut small, Some("\"e1\"".into()), "ks/v1", 100)
            .unwrap();
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
        let writes_before = store.writes();
        let m2 = p
            .publish(&store, &mut list(0..10, &[3], "a:*"), None, "ks/v1", 110)
            .unwrap();
        assert_eq!(store.writes() - writes_before, 2, "one bucket and the meta");
        assert_eq!(active(&store, &m2, 3), Some(false));
        assert_eq!(m2.dict_slot, m1.dict_slot);

        // Grow: a new layout, and the old one answers `moved`.
        let m3 = p
            .publish(&store, &mut list(0..5000, &[], "a:*"), None, "ks/v1", 120)
            .unwrap();
        assert_ne!(m3.bits, m1.bits);
        assert_eq!(lookup(&store, &m1, 0), Seen::Moved);
        assert_eq!(active(&store, &m3, 4999), Some(true));
        // A key removed from the list is absent.
        let m4 = p
            .publish(&store, &mut list(1..5000, &[], "a:*"), None, "ks/v1", 130)
            .unwrap();
        assert_eq!(lookup(&store, &m4, 0), Seen::Absent);

        touch(&store, 999);
        assert_eq!(read_meta(&store).unwrap().fetched_at_s, 999);
    }

    #[test]
    fn shared_entries_counts_what_was_written_and_stays_bounded() {
        let store = MemoryStore::default();
        crate::counters::ensure_counter_slots(&store);
        let _ = store.set(key::LEASE, b"0:0", None);
        assert_eq!(shared_entries(&store), store.len() as u64);
        let mut p = Publisher::default();
        for (round, n) in [10u32, 5000, 10, 5000, 20].into_iter().enumerate() {
            let scope = if round % 2 == 0 { "a:*" } else { "b:*" };
            p.publish(&store, &mut list(0..n, &[], scope), None, "s", round as u64);
            assert_eq!(shared_entries(&store), store.len() as u64, "after {n} keys");
        }
        let after = store.len();
        // The same sizes again: nothing new.
        for n in [5000u32, 10] {
            p.publish(&store, &mut list(0..n, &[1], "b:*"), None, "s", 9);
        }
        assert_eq!(store.len(), after);
        assert_eq!(shared_entries(&store), after as u64);
    }

    #[test]
    fn a_new_dictionary_goes_to_the_other_slot() {
        let store = MemoryStore::default();
        let mut p = Publisher::default();
        let m1 = p
            .publish(&store, &mut list(0..100, &[], "a:*"), None, "s", 1)
            .unwrap();
        assert_ne!(m1.dict_tag, 0);
        let m2 = p
            .publish(&store, &mut list(0..100, &[], "b:*"), None, "s", 2)
            .unwrap();
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
        let m3 = p
            .publish(&store, &mut list(0..100, &[], "a:*"), None, "s", 3)
            .unwrap();
        assert_eq!(m3.dict_slot, m1.dict_slot);
        assert!(matches!(lookup(&store, &m3, 7), Seen::Key { scopes, .. } if scopes == ["a:*"]));
    }

    fn document(ids: std::ops::Range<u32>, extra: &str) -> String {
        let keys: Vec<String> = ids
            .map(|i| {
                let h: String = hash(i).iter().map(|b| format!("{b:02x}")).collect();
                format!(
                    r#"{{"id":"id{i}","hash":"{h}","owner":"org{}","scopes":["s{}"]}}"#,
                    i % 3,
                    i % 5
                )
            })
            .collect();
        format!(r#"{{"version":"1","keys":[{}{extra}]}}"#, keys.join(","))
    }

    fn spilled(doc: &str, store: &MemoryStore, chunk: usize) -> Result<KeyList, String> {
        let spill = keylist::staging::Spill {
            store,
            nonce: 7,
            chunk,
        };
        keylist::read_spilling(
            &mut crate::scan::Slice {
                data: doc.as_bytes(),
                chunk: 100,
            },
            doc.len(),
            keylist::Rules::default(),
            Some(spill),
        )
        .map_err(|e| e.to_string())
    }

    /// Every staged entry is empty (written once, emptied after use).
    fn staging_empty(store: &MemoryStore) -> bool {
        let counts = keylist::staging::parse_counts(store.get(key::STAGE_COUNTS).0.as_deref());
        counts.iter().enumerate().all(|(s, n)| {
            (0..*n as u32).all(|k| store.get(&key::stage(s as u8, k)).0 == Some(vec![]))
        })
    }

    #[test]
    fn spilled_records_publish_the_same_buckets() {
        let doc = document(0..3000, "");
        let plain = MemoryStore::default();
        let m = Publisher::default()
            .publish(
                &plain,
                &mut keylist::parse(doc.as_bytes()).unwrap(),
                None,
                "s",
                1,
            )
            .unwrap();
        let store = MemoryStore::default();
        let mut list = spilled(&doc, &store, 512).unwrap();
        assert!(list.spilled_chunks() > 100, "{}", list.spilled_chunks());
        // Only the streams' tails are still in this VM.
        assert!(
            list.records().count() < 3000 / 8,
            "{}",
            list.records().count()
        );
        let ms = Publisher::default()
            .publish(&store, &mut list, None, "s", 1)
            .unwrap();
        assert_eq!(
            (ms.bits, ms.keys, ms.dict_tag),
            (m.bits, m.keys, m.dict_tag)
        );
        for i in 0..1u32 << m.bits {
            assert_eq!(
                store.get(&key::bucket(m.bits, i)).0,
                plain.get(&key::bucket(m.bits, i)).0
            );
        }
        assert!(staging_empty(&store));
        assert_eq!(shared_entries(&store), store.len() as u64);
        // Spent: a spilled list is published once.
        assert!(Publisher::default()
            .publish(&store, &mut list, None, "s", 2)
            .is_none());
    }

    #[test]
    fn spilled_lists_fail_as_the_whole_document_does_and_leave_nothing_staged() {
        let dup = {
            let h: String = hash(5).iter().map(|b| format!("{b:02x}")).collect();
            format!(r#",{{"id":"other","hash":"{h}","owner":"o"}}"#)
        };
        for extra in [
            dup.as_str(),
            r#",{"id":"id7","hash":"00","owner":"o"}"#,
            r#",{"id":"id7","hash":"0000000000000000000000000000000000000000000000000000000000000000","owner":"o"}"#,
            r#",{"id":"x","hash":1}"#,
            r#",{"#,
        ] {
            let doc = document(0..2000, extra);
            let whole = keylist::parse(doc.as_bytes())
                .map(|l| l.len())
                .map_err(|e| e.to_string());
            let store = MemoryStore::default();
            let got = spilled(&doc, &store, 256).map(|l| l.len());
            assert_eq!(got, whole, "{extra}");
            assert!(got.is_err());
            assert!(store.get(key::STAGE_COUNTS).0.is_some(), "it spilled");
            assert!(staging_empty(&store), "{extra}");
        }
        // Owners after keys: two passes, the first one's chunks emptied too.
        let doc = document(0..2000, "");
        let doc = format!(r#"{}],"owners":{{"org1":{{}}}}}}"#, &doc[..doc.len() - 2]);
        let store = MemoryStore::default();
        let mut list = spilled(&doc, &store, 256).unwrap();
        Publisher::default()
            .publish(&store, &mut list, None, "s", 1)
            .unwrap();
        assert!(staging_empty(&store));
    }

    #[test]
    fn an_overwritten_staged_chunk_fails_the_publish() {
        let doc = document(0..2000, "");
        let store = MemoryStore::default();
        let mut list = spilled(&doc, &store, 256).unwrap();
        store
            .set(&key::stage(3, 0), b"another parse's", None)
            .unwrap();
        assert!(Publisher::default()
            .publish(&store, &mut list, None, "s", 1)
            .is_none());
        assert!(read_meta(&store).is_none(), "nothing made live");
    }

    #[test]
    fn a_new_leader_rewrites_everything() {
        let store = MemoryStore::default();
        Publisher::default().publish(&store, &mut list(0..10, &[], "a:*"), None, "s", 1);
        let m = Publisher::default()
            .publish(&store, &mut list(0..10, &[0], "a:*"), None, "s", 2)
            .unwrap();
        assert_eq!(active(&store, &m, 0), Some(false));
    }
}
