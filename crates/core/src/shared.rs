//! The store layer: state shared by every VM of one Envoy instance lives in proxy-wasm shared
//! data, reached through the small [`SharedStore`] trait so the same code runs against the host
//! and, natively, against [`MemoryStore`]. This module knows nothing of what is stored; it owns
//! the one compare-and-swap contract ([`update`]) and the name of every shared-data key ([`key`]).
//!
//! Writes always carry the CAS value that was read, or none for a key that does not exist yet:
//! Envoy treats CAS 0 as "unconditional" and ngx_wasm_module as "only if absent", and this rule
//! is correct for both.

/// Why a write to shared data did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum SetError {
    /// Someone wrote the key since it was read: read again and retry.
    CasMismatch,
    /// The host refused the write (bad argument, out of memory): retrying will not help.
    Failed,
}

/// proxy-wasm shared data: `get_shared_data` / `set_shared_data` of ABI 0.2.1.
pub trait SharedStore {
    /// The value and its CAS token, or `(None, _)` when the key does not exist.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `value` if the key's CAS is still `cas` (`None`: the key is new, see the module note).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
}

/// How many times a CAS update is retried before it gives up.
pub const CAS_ATTEMPTS: usize = 64;

/// What an [`update`] step decided after seeing the current value.
pub enum Step<T> {
    /// Write this value (if nobody wrote meanwhile), then return the result.
    Write(Vec<u8>, T),
    /// Write nothing and return the result at once.
    Keep(T),
}

/// The one read-modify-write of shared data: reads `key`, lets `f` decide from the current
/// value (`None` when absent) and writes its answer with the CAS just read, retrying from the
/// read on a CAS conflict. `f` may run several times and must depend on nothing but its
/// argument. `None` when the host refused the write or the CAS never went through in
/// [`CAS_ATTEMPTS`] tries.
pub fn update<T>(
    store: &dyn SharedStore,
    key: &str,
    mut f: impl FnMut(Option<&[u8]>) -> Step<T>,
) -> Option<T> {
    for _ in 0..CAS_ATTEMPTS {
        let (value, cas) = store.get(key);
        let (next, out) = match f(value.as_deref()) {
            Step::Keep(out) => return Some(out),
            Step::Write(next, out) => (next, out),
        };
        let cas = if value.is_some() { cas } else { None };
        match store.set(key, &next, cas) {
            Ok(()) => return Some(out),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return None,
        }
    }
    None
}

/// Writes `value` whatever is there (through [`update`], so it is never lost to a racing
/// writer's stale CAS). False when the write did not happen.
pub fn overwrite(store: &dyn SharedStore, key: &str, value: &[u8]) -> bool {
    update(store, key, |_| Step::Write(value.to_vec(), ())).is_some()
}

/// Every shared-data key keygate uses; all start with `keygate:`.
pub mod key {
    /// JSON `publish::Meta`: which bucket layout is live, when the list was last fetched.
    pub const META: &str = "keygate:meta";
    /// `<token>:<until, Unix ms>`: which root context fetches the key list (one per instance).
    pub const LEASE: &str = "keygate:lease";
    /// Decimal counter handing out root-context tokens.
    pub const TOKEN_SEQ: &str = "keygate:seq";
    /// Present once the counter tables were created.
    pub const SLOTS_READY: &str = "keygate:slots";

    /// Bucket `index` of the layout with `2^bits` buckets (`record`).
    pub fn bucket(bits: u8, index: u32) -> String {
        format!("keygate:b:{bits}:{index}")
    }

    /// `c0,c1,…,c31`: the most chunks each staging stream ever spilled (so `stage` entries
    /// `(s, 0..c_s)` exist), for the count of entries.
    pub const STAGE_COUNTS: &str = "keygate:stage";

    /// Chunk `k` of staging stream `stream` (`keylist`): a list's records between its parse and
    /// its publish, emptied once published.
    pub fn stage(stream: u8, k: u32) -> String {
        format!("keygate:st:{stream}:{k}")
    }

    /// Dictionary slot 0 or 1 (`dictionary`); the two alternate.
    pub fn dictionary(slot: u8) -> String {
        format!("keygate:dict:{}", slot & 1)
    }

    /// Slot `slot` of the per-key rate-limit counter table (`counters`).
    pub fn rate_limit_slot(slot: u64) -> String {
        rate_limit_slot_in(slot, &mut [0; 32]).to_string()
    }

    /// [`rate_limit_slot`] written into `buf`, for the per-request path: no allocation.
    pub fn rate_limit_slot_in(slot: u64, buf: &mut [u8; 32]) -> &str {
        use std::io::Write;
        let end = {
            let mut rest: &mut [u8] = buf.as_mut_slice();
            // 11 bytes of prefix and at most 20 digits: it always fits.
            let _ = write!(rest, "keygate:rl:{slot}");
            32 - rest.len()
        };
        buf.get(..end)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or_default()
    }

    /// Slot `slot` of the per-client-IP failed-attempt table (`counters`).
    pub fn ip_slot(slot: u64) -> String {
        format!("keygate:ip:{slot}")
    }
}

/// Envoy's shared-data semantics in memory, for native tests and the benchmarks.
#[derive(Default)]
pub struct MemoryStore {
    map: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
    next_cas: std::cell::Cell<u32>,
}

impl MemoryStore {
    /// Entries stored.
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of keys and values stored.
    pub fn bytes(&self) -> usize {
        self.map
            .borrow()
            .iter()
            .map(|(k, (v, _))| k.len() + v.len())
            .sum()
    }
    /// Writes done so far (every successful `set` bumps the CAS).
    pub fn writes(&self) -> u32 {
        self.next_cas.get()
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
    use std::cell::Cell;

    #[test]
    fn slot_names_written_in_place_are_the_formatted_ones() {
        let mut buf = [0u8; 32];
        for slot in (0..crate::ratelimit::KEY_SLOTS as u64).chain([u64::MAX, 10, 100, 99_999]) {
            let want = format!("keygate:rl:{slot}");
            assert_eq!(key::rate_limit_slot_in(slot, &mut buf), want);
            assert_eq!(key::rate_limit_slot(slot), want);
        }
    }

    #[test]
    fn cas_mismatch_is_reported() {
        let store = MemoryStore::default();
        store.set("a", b"1", None).unwrap();
        let (_, cas) = store.get("a");
        store.set("a", b"2", None).unwrap();
        assert_eq!(store.set("a", b"3", cas), Err(SetError::CasMismatch));
    }

    /// A store whose first `n` writes lose a race: another writer got there between the read
    /// and the write.
    struct Contended {
        inner: MemoryStore,
        lose: Cell<u32>,
    }

    impl SharedStore for Contended {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            if self.lose.get() > 0 {
                self.lose.set(self.lose.get() - 1);
                // The racing writer's increment lands first.
                let (v, _) = self.inner.get(key);
                let n = v.map_or(0, |v| v.first().copied().unwrap_or(0)) + 1;
                self.inner.set(key, &[n], None)?;
                return Err(SetError::CasMismatch);
            }
            self.inner.set(key, value, cas)
        }
    }

    fn increment(v: Option<&[u8]>) -> Step<u8> {
        let n = v.and_then(|v| v.first().copied()).unwrap_or(0) + 1;
        Step::Write(vec![n], n)
    }

    #[test]
    fn update_retries_from_a_fresh_read_and_loses_no_write() {
        let store = Contended {
            inner: MemoryStore::default(),
            lose: Cell::new(3),
        };
        // Three racing increments land first; ours is the fourth, computed from what they left.
        assert_eq!(update(&store, "n", increment), Some(4));
        assert_eq!(store.inner.get("n").0, Some(vec![4]));
    }

    #[test]
    fn update_gives_up_after_its_attempts() {
        let store = Contended {
            inner: MemoryStore::default(),
            lose: Cell::new(CAS_ATTEMPTS as u32),
        };
        assert_eq!(update(&store, "n", increment), None);
    }

    #[test]
    fn keep_writes_nothing() {
        let store = MemoryStore::default();
        assert_eq!(update(&store, "k", |v| Step::Keep(v.is_none())), Some(true));
        assert!(store.is_empty());
    }

    #[test]
    fn a_refused_write_is_not_retried() {
        struct Refusing(Cell<u32>);
        impl SharedStore for Refusing {
            fn get(&self, _: &str) -> (Option<Vec<u8>>, Option<u32>) {
                (None, None)
            }
            fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), SetError> {
                self.0.set(self.0.get() + 1);
                Err(SetError::Failed)
            }
        }
        let store = Refusing(Cell::new(0));
        assert_eq!(update(&store, "k", increment), None);
        assert_eq!(store.0.get(), 1);
    }
}
