//! A worker's copy of the key buckets it read recently, so a key seen again costs no shared-data
//! read. Only valid for one published generation: the first read under a newer one empties it,
//! so a republished list (a revoked key) is seen as soon as this worker's view of the list moves.
//! A bucket is shared with the request that reads it (`Rc`), never copied per request. Also
//! carries the worker's memo of keys' SHA-256 ([`HashCache`]).

use crate::hash_cache::HashCache;
use crate::ratelimit::Fnv;
use std::collections::HashMap;
use std::rc::Rc;

/// Enough for every bucket of a list of ~16k keys; a larger list keeps its hottest buckets
/// (about 2 MB at most) and reads the rest.
const CAPACITY: usize = 1024;

#[derive(Debug, Default)]
pub struct BucketCache {
    generation: u64,
    bits: u8,
    /// Bucket indexes are hash bits already: FNV is enough (and far cheaper than SipHash).
    buckets: HashMap<u32, Rc<[u8]>, Fnv>,
    /// SHA-256 of keys found in the list recently (kept across generations: a key's hash does
    /// not depend on the list).
    pub hashes: HashCache,
}

impl BucketCache {
    /// The cached value of bucket `index` of layout `bits` in `generation`.
    pub fn get(&mut self, generation: u64, bits: u8, index: u32) -> Option<Rc<[u8]>> {
        self.follow(generation, bits);
        self.buckets.get(&index).cloned()
    }

    pub fn put(&mut self, generation: u64, bits: u8, index: u32, value: Rc<[u8]>) {
        self.follow(generation, bits);
        if self.buckets.len() >= CAPACITY {
            // Dropping everything is as good as LRU for a working set that does not fit.
            self.buckets.clear();
        }
        self.buckets.insert(index, value);
    }

    /// Empties the cache when the live list is another generation or layout than its buckets'.
    fn follow(&mut self, generation: u64, bits: u8) {
        if generation != self.generation || bits != self.bits {
            self.buckets.clear();
            self.generation = generation;
            self.bits = bits;
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_generation_or_layout_empties_the_cache() {
        let mut c = BucketCache::default();
        c.put(1, 4, 3, vec![1, 2].into());
        assert_eq!(c.get(1, 4, 3).as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(c.get(1, 4, 2), None);
        assert_eq!(c.get(1, 5, 3), None, "another layout");
        assert!(c.is_empty());
        c.put(1, 5, 3, vec![9].into());
        assert_eq!(c.get(2, 5, 3), None, "another generation");
        assert!(c.is_empty());
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut c = BucketCache::default();
        for i in 0..(CAPACITY as u32 * 3) {
            c.put(1, 12, i, vec![0; 8].into());
            assert!(c.len() <= CAPACITY);
        }
    }
}
