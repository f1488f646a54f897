//! Values that many keys share (owners, scope sets, site sets, limit sets), stored once per list
//! instead of in every record. Records name an entry by index; the dictionary itself is one
//! shared-data value that each VM reads once when it changes and keeps in memory.
//!
//! A dictionary is named by its tag (a digest of its bytes; 0 for none), which every bucket
//! header carries with the slot it is in: two slots alternate, so the one a reader may still
//! need is never the one being overwritten, and a reader checks the tag of what it read.

use crate::ratelimit::{fnv1a, Fnv};
use crate::shared::{key, SharedStore};
use crate::varint;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The default bound: past it, new values stay inline, so a list of unique values is not copied
/// into every VM.
pub const MAX_BYTES: usize = 1 << 20;
/// Values shorter than this are not worth an entry (a reference takes a byte or more).
const MIN_VALUE: usize = 2;

/// The tag of a dictionary's bytes: never 0 unless there are none.
pub fn tag(bytes: &[u8]) -> u64 {
    if bytes.is_empty() {
        0
    } else {
        fnv1a(bytes).max(1)
    }
}

/// Collects entries while a list is compiled; deterministic, so an unchanged list gives the same
/// dictionary and the same buckets.
pub struct Builder {
    index: HashMap<Vec<u8>, u32, Fnv>,
    bytes: Vec<u8>,
    limit: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::with_limit(MAX_BYTES)
    }
}

impl Builder {
    pub fn with_limit(limit: usize) -> Builder {
        Builder {
            index: HashMap::default(),
            bytes: Vec::new(),
            limit,
        }
    }

    /// The entry holding `value`, added if there is room (first seen, first numbered).
    pub fn intern(&mut self, value: &[u8]) -> Option<u32> {
        if value.len() < MIN_VALUE {
            return None;
        }
        if let Some(i) = self.index.get(value) {
            return Some(*i);
        }
        if self.bytes.len() + value.len() + 5 > self.limit {
            return None;
        }
        let i = u32::try_from(self.index.len()).ok()?;
        varint::put(&mut self.bytes, value.len() as u64);
        self.bytes.extend_from_slice(value);
        self.index.insert(value.to_vec(), i);
        Some(i)
    }

    /// The entries, back to back (varint length + bytes).
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// A decoded dictionary: entry i is `bytes[ranges[i]]`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dictionary {
    tag: u64,
    bytes: Vec<u8>,
    ranges: Vec<(u32, u32)>,
}

impl Dictionary {
    /// Indexes the entries of `Builder::finish`; None when malformed.
    pub fn decode(bytes: &[u8]) -> Option<Dictionary> {
        let mut ranges = Vec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            let (len, used) = varint(bytes.get(at..)?)?;
            let start = at + used;
            let end = start.checked_add(usize::try_from(len).ok()?)?;
            if end > bytes.len() {
                return None;
            }
            ranges.push((u32::try_from(start).ok()?, u32::try_from(end).ok()?));
            at = end;
        }
        Some(Dictionary {
            tag: tag(bytes),
            bytes: bytes.to_vec(),
            ranges,
        })
    }

    pub fn entry(&self, i: usize) -> Option<&[u8]> {
        let (s, e) = *self.ranges.get(i)?;
        self.bytes.get(s as usize..e as usize)
    }

    pub fn tag(&self) -> u64 {
        self.tag
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        v |= ((byte & 0x7f) as u64) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The shared-data value of a dictionary: its tag, then its entries.
pub fn shared_value(entries: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + entries.len());
    v.extend_from_slice(&tag(entries).to_le_bytes());
    v.extend_from_slice(entries);
    v
}

thread_local! {
    /// This VM's copy of the dictionary last used (a VM is single-threaded).
    static CACHE: RefCell<Rc<Dictionary>> = RefCell::new(Rc::new(Dictionary::default()));
    static EMPTY: Rc<Dictionary> = Rc::new(Dictionary::default());
}

/// Dictionary `tag` from shared-data `slot` (as a live bucket names them): this VM's copy,
/// read from shared data only when the tag changes. None when it cannot be read (replaced twice
/// meanwhile: the bucket that named it is stale).
pub fn load(store: &dyn SharedStore, slot: u8, want: u64) -> Option<Rc<Dictionary>> {
    if want == 0 {
        return Some(EMPTY.with(Rc::clone));
    }
    let cached = CACHE.with(|c| c.borrow().clone());
    if cached.tag == want {
        return Some(cached);
    }
    let (value, _) = store.get(&key::dictionary(slot));
    let value = value?;
    let stored = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    let dict = Dictionary::decode(value.get(8..)?)?;
    if stored != want || dict.tag != want {
        return None;
    }
    let dict = Rc::new(dict);
    CACHE.with(|c| *c.borrow_mut() = dict.clone());
    Some(dict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemoryStore;

    #[test]
    fn interning_is_bounded_and_stable() {
        let mut b = Builder::with_limit(20);
        assert_eq!(b.intern(b"x"), None, "too short to share");
        assert_eq!(b.intern(b"org-1"), Some(0));
        assert_eq!(b.intern(b"org-2"), Some(1));
        assert_eq!(b.intern(b"org-1"), Some(0));
        assert_eq!(b.intern(b"org-3-too-long"), None, "over the bound");
        let d = Dictionary::decode(&b.finish()).unwrap();
        assert_eq!(
            (d.entry(0), d.entry(1), d.entry(2)),
            (Some(&b"org-1"[..]), Some(&b"org-2"[..]), None)
        );
        assert!(Dictionary::decode(&[5, 1]).is_none());
        assert!(Dictionary::decode(&[0xff; 12]).is_none());
    }

    #[test]
    fn a_dictionary_is_found_by_slot_and_tag() {
        let store = MemoryStore::default();
        let mut b = Builder::default();
        b.intern(b"scopes");
        let entries = b.finish();
        let t = tag(&entries);
        store
            .set(&key::dictionary(1), &shared_value(&entries), None)
            .unwrap();
        let d = load(&store, 1, t).unwrap();
        assert_eq!(d.entry(0), Some(&b"scopes"[..]));
        // The slot now holds another dictionary: the old tag is not served from it.
        assert!(load(&store, 1, t ^ 2).is_none());
        assert!(load(&store, 0, 0).unwrap().is_empty());
    }
}
