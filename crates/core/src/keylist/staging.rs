//! Where a list's records wait between the parse and the publish.
//!
//! Records go to one of [`PARTS`] streams by the top 5 bits of their hash, so that the list's
//! hash order visits the streams one after another. Given a store to spill to
//! ([`Spill`]), a stream hands its bytes to shared data every `chunk` bytes (one entry per
//! chunk, [`key::stage`]) and keeps only the tail in the VM; the publish then takes the streams
//! back one at a time and empties their entries. So the fetching VM holds one chunk per stream
//! and one stream at a time instead of every record of the list: wasm memory never shrinks, and
//! whatever a VM once held stays resident for good. Without a store (the CLI, tests), everything
//! stays in memory.
//!
//! A record is found by its location: `stream << 27 | offset in the stream`.

use crate::ratelimit::fnv1a;
use crate::record;
use crate::shared::{key, overwrite, update, SharedStore, Step};
use std::borrow::Cow;
use std::cell::RefCell;

/// Streams; a record's is the top 5 bits of its hash.
pub const PARTS: usize = 32;
/// The default size of a spilled chunk, in bytes: the VM holds up to `PARTS` of them while it
/// parses, and one stream (1/`PARTS` of the records) while it publishes.
pub const CHUNK_BYTES: usize = 64 << 10;
const OFFSET_BITS: u32 = 27;
const OFFSET_MASK: u32 = (1 << OFFSET_BITS) - 1;
/// A staged entry starts with the nonce of the parse that wrote it.
const NONCE: usize = 8;

/// Where the records of one parse may be spilled.
#[derive(Clone, Copy)]
pub struct Spill<'s> {
    pub store: &'s dyn SharedStore,
    /// Different for every parse (it heads each staged entry, so an entry written by another
    /// parse is never taken for one of this parse's).
    pub nonce: u64,
    /// Bytes of records in a staged entry (at least; a chunk ends after a whole record).
    pub chunk: usize,
}

#[derive(Debug, Default)]
struct Stream {
    /// The bytes not spilled yet: the stream from `base` on.
    buf: Vec<u8>,
    base: usize,
    /// Where each spilled chunk starts in the stream; chunk k is `key::stage(stream, k)`.
    starts: Vec<usize>,
}

/// The records of one parse, by stream.
#[derive(Debug, Default)]
pub struct Records {
    streams: Vec<Stream>,
    nonce: u64,
    /// The last spilled chunk read back for a single record: `(stream, chunk, bytes)`.
    cache: RefCell<Option<(usize, usize, Vec<u8>)>>,
    /// Spilling stopped (the host refused a write): the rest stays in memory.
    refused: bool,
}

/// The offset of a location in its stream.
pub fn offset_of(loc: u32) -> usize {
    (loc & OFFSET_MASK) as usize
}

/// The stream of a hash's first byte.
pub fn stream_of(first: u8) -> usize {
    (first >> 3) as usize
}

impl Records {
    /// `reserve`: bytes to reserve in each stream that is not spilled.
    pub fn new(spill: Option<&Spill<'_>>, reserve: usize) -> Records {
        let cap = match spill {
            Some(s) => reserve.min(s.chunk.saturating_add(4096)),
            None => reserve,
        };
        Records {
            streams: (0..PARTS)
                .map(|_| Stream {
                    buf: Vec::with_capacity(cap),
                    ..Stream::default()
                })
                .collect(),
            nonce: spill.map_or(0, |s| s.nonce),
            cache: RefCell::new(None),
            refused: false,
        }
    }

    /// Appends a record (with its length) to stream `s`: its location, or None when the stream
    /// is over 128 MiB.
    pub fn push(&mut self, spill: Option<&Spill<'_>>, s: usize, rec: &[u8]) -> Option<u32> {
        let refused = self.refused;
        let stream = self.streams.get_mut(s)?;
        let offset = u32::try_from(stream.base + stream.buf.len()).ok()?;
        if offset > OFFSET_MASK || (offset as usize + rec.len()) > OFFSET_MASK as usize {
            return None;
        }
        stream.buf.extend_from_slice(rec);
        if let Some(sp) = spill.filter(|sp| !refused && stream.buf.len() >= sp.chunk) {
            let k = stream.starts.len();
            let mut value = Vec::with_capacity(NONCE + stream.buf.len());
            value.extend_from_slice(&self.nonce.to_le_bytes());
            value.extend_from_slice(&stream.buf);
            if overwrite(sp.store, &key::stage(s as u8, k as u32), &value) {
                stream.starts.push(stream.base);
                stream.base += stream.buf.len();
                stream.buf.clear();
            } else {
                self.refused = true;
            }
        }
        Some((s as u32) << OFFSET_BITS | offset)
    }

    /// A staged chunk's records and CAS, or None when it is gone or another parse's.
    fn staged(
        &self,
        store: &dyn SharedStore,
        s: usize,
        k: usize,
    ) -> Option<(Vec<u8>, Option<u32>)> {
        let (value, cas) = store.get(&key::stage(s as u8, k as u32));
        let mut value = value?;
        if value.get(..NONCE)? != self.nonce.to_le_bytes() {
            return None;
        }
        value.drain(..NONCE);
        Some((value, cas))
    }

    /// The record at `loc` (without its length); None when it cannot be read.
    pub fn record(&self, store: Option<&dyn SharedStore>, loc: u32) -> Option<Cow<'_, [u8]>> {
        let s = (loc >> OFFSET_BITS) as usize;
        let offset = (loc & OFFSET_MASK) as usize;
        let stream = self.streams.get(s)?;
        if offset >= stream.base {
            let (body, _) = record::split_record(stream.buf.get(offset - stream.base..)?)?;
            return Some(Cow::Borrowed(body));
        }
        let k = stream.starts.partition_point(|start| *start <= offset);
        let k = k.checked_sub(1)?;
        let start = *stream.starts.get(k)?;
        let mut cache = self.cache.borrow_mut();
        if !matches!(&*cache, Some((cs, ck, _)) if *cs == s && *ck == k) {
            *cache = Some((s, k, self.staged(store?, s, k)?.0));
        }
        let (_, _, bytes) = cache.as_ref()?;
        let (body, _) = record::split_record(bytes.get(offset - start..)?)?;
        Some(Cow::Owned(body.to_vec()))
    }

    /// Records held in this VM (all of them unless some were spilled), by location.
    pub fn in_memory(&self, loc: u32) -> Option<&[u8]> {
        let stream = self.streams.get((loc >> OFFSET_BITS) as usize)?;
        let offset = ((loc & OFFSET_MASK) as usize).checked_sub(stream.base)?;
        record::split_record(stream.buf.get(offset..)?).map(|(body, _)| body)
    }

    /// Stream `s` whole: borrowed when it is all in memory; else read back, its staged entries
    /// emptied and the stream spent (a spilled list is published once). None when a staged
    /// chunk is gone or was overwritten by another parse.
    pub fn stream(&mut self, store: Option<&dyn SharedStore>, s: usize) -> Option<Cow<'_, [u8]>> {
        if self.streams.get(s)?.starts.is_empty() {
            return Some(Cow::Borrowed(&self.streams.get(s)?.buf));
        }
        self.take(store, s).map(Cow::Owned)
    }

    fn take(&mut self, store: Option<&dyn SharedStore>, s: usize) -> Option<Vec<u8>> {
        let (starts, base, buf) = {
            let stream = self.streams.get_mut(s)?;
            (
                std::mem::take(&mut stream.starts),
                stream.base,
                std::mem::take(&mut stream.buf),
            )
        };
        if starts.is_empty() {
            return Some(buf);
        }
        let store = store?;
        let mut out = Vec::with_capacity(base + buf.len());
        let mut ok = true;
        for k in 0..starts.len() {
            let key = key::stage(s as u8, k as u32);
            match self.staged(store, s, k).filter(|_| ok) {
                Some((bytes, cas)) => {
                    out.extend_from_slice(&bytes);
                    drop(bytes);
                    // Emptied with the CAS just read (one read, not two); a lost race only
                    // leaves another parse's chunk there.
                    let _ = store.set(&key, &[], cas);
                }
                None => {
                    ok = false;
                    overwrite(store, &key, &[]);
                }
            }
        }
        *self.cache.borrow_mut() = None;
        out.extend_from_slice(&buf);
        (ok && out.len() == base + buf.len()).then_some(out)
    }

    /// Empties every staged entry still held (a parse that failed or was superseded); the
    /// records of those streams are gone.
    pub fn discard(&mut self, store: Option<&dyn SharedStore>) {
        for s in 0..PARTS {
            if self.streams.get(s).is_some_and(|st| !st.starts.is_empty()) {
                let _ = self.take(store, s);
            }
        }
    }

    /// Records in the store how many chunks each stream spilled (the most any parse spilled,
    /// for `publish::shared_entries`).
    pub fn note_spilled(&self, store: &dyn SharedStore) {
        let counts: Vec<usize> = self.streams.iter().map(|s| s.starts.len()).collect();
        if counts.iter().all(|c| *c == 0) {
            return;
        }
        update(store, key::STAGE_COUNTS, |current| {
            let mut most = parse_counts(current);
            let mut grew = false;
            for (m, c) in most.iter_mut().zip(&counts) {
                if *c > *m {
                    *m = *c;
                    grew = true;
                }
            }
            if grew {
                let text: Vec<String> = most.iter().map(usize::to_string).collect();
                Step::Write(text.join(",").into_bytes(), ())
            } else {
                Step::Keep(())
            }
        });
    }

    /// Chunks spilled and not taken back yet.
    pub fn spilled_chunks(&self) -> usize {
        self.streams.iter().map(|s| s.starts.len()).sum()
    }
}

/// The per-stream chunk counts of `key::STAGE_COUNTS` (`c0,c1,…`; missing ones are 0).
pub fn parse_counts(value: Option<&[u8]>) -> [usize; PARTS] {
    let mut out = [0; PARTS];
    let text = value
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("");
    for (o, n) in out.iter_mut().zip(text.split(',')) {
        *o = n.parse().unwrap_or(0);
    }
    out
}

/// A nonce for one parse from numbers that differ between parses (a loader's token, the time).
pub fn nonce(a: u64, b: u64) -> u64 {
    let mut bytes = [0u8; 16];
    for (o, i) in bytes
        .iter_mut()
        .zip(a.to_le_bytes().into_iter().chain(b.to_le_bytes()))
    {
        *o = i;
    }
    fnv1a(&bytes)
}
