//! The key-list document (SPEC §2) built from the database and kept in memory until the
//! generation moves. Two schemas are served (see `Schema`); their key arrays are the same bytes,
//! shared.
//!
//! The key array is kept as chunks of serialized keys in id order. A chunk starts at every key
//! whose id hashes to one of 2^-`CHUNK_BITS` of the values (about 1,024 keys, 140 KiB), so the
//! layout depends only on the set of keys served, never on the order changes came in: a
//! document built incrementally and one built whole have the same chunks, bytes and ETag.
//!
//! - A full build reads every listed key in one snapshot, writes the chunks and checks the
//!   whole document with the filter's own parser (`keygate_core::keylist::read`).
//! - An incremental build (every build after the first) reads, in one snapshot, the owners and
//!   plans and only the key rows stamped with a generation at least the one served
//!   (`keys.doc_gen`, set by triggers on every insert and every update of a served column) and
//!   the ids of rows deleted since (`key_tombstones`), rewrites only the chunks those keys fall
//!   in, and checks the new head and the changed keys with the filter's parser; what the
//!   parser checks across keys is held by the database and by this module: ids are the
//!   primary key, hashes are unique lowercase hex (`UNIQUE`), and every plan a served key
//!   names is checked against the plans at each build (a count per plan is kept).
//!
//! The ETag is `"` + hex SHA-256 over the SHA-256 digests of the head, of each chunk and of the
//! tail `]}` + `"`: a chunk's digest is computed once when the chunk is written, so a change
//! costs hashing a few chunks, not the whole document.

use crate::store::{Kind, Store};
use crate::util;
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;
/// Document schemas a gateway may name in `x-keygate-schema`.
///
/// - `1`: SPEC §2 without owners' `rate_limits` (what the filter of keygate 0.1 enforces);
/// - `2`: all of SPEC §2 (owners' `rate_limits` included). The default without the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    V1 = 1,
    V2 = 2,
}

/// The newest schema this service writes.
pub const LATEST: Schema = Schema::V2;

impl Schema {
    /// The schema to serve for an `x-keygate-schema` value: the highest schema this service
    /// writes among the comma-separated numbers listed, or the highest at most the largest one
    /// listed. None when the value names no usable number.
    pub fn negotiate(header: &str) -> Option<Schema> {
        let mut best: Option<u64> = None;
        for part in header.split(',') {
            let n: u64 = part.trim().parse().ok()?;
            best = Some(best.map_or(n, |b| b.max(n)));
        }
        match best? {
            0 => None,
            1 => Some(Schema::V1),
            _ => Some(Schema::V2),
        }
    }
}

/// One served document: its bytes in parts (the key chunks shared between schemas and with the
/// builder's cache), its strong ETag (see the module documentation) and length in bytes.
#[derive(Debug, Clone)]
pub struct Doc {
    pub parts: Vec<Bytes>,
    pub etag: String,
    pub len: usize,
}

/// What follows the last key.
const TAIL: &[u8] = b"]}";

impl Doc {
    /// The document `head` + the chunks joined by `,` + `]}`.
    fn new(head: Bytes, chunks: &[Arc<Chunk>]) -> Doc {
        let mut parts = Vec::with_capacity(chunks.len() * 2 + 2);
        let mut h = Sha256::new();
        h.update(Sha256::digest(&head));
        let mut len = head.len();
        parts.push(head);
        for (i, c) in chunks.iter().enumerate() {
            if i > 0 {
                parts.push(Bytes::from_static(b","));
                len += 1;
            }
            h.update(c.digest);
            len += c.bytes.len();
            parts.push(c.bytes.clone());
        }
        h.update(Sha256::digest(TAIL));
        parts.push(Bytes::from_static(TAIL));
        len += TAIL.len();
        Doc {
            etag: format!("\"{}\"", util::hex(&h.finalize())),
            parts,
            len,
        }
    }

    /// The whole document in one buffer (tests, export).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for p in &self.parts {
            v.extend_from_slice(p);
        }
        v
    }
}

/// The documents of one generation.
#[derive(Debug)]
pub struct Built {
    pub generation: i64,
    pub v1: Doc,
    pub v2: Doc,
    pub keys: usize,
    /// Wall time of the build, in seconds.
    pub seconds: f64,
    /// Whether every key was read (false: only the keys changed since the previous build).
    pub full: bool,
}

impl Built {
    pub fn doc(&self, s: Schema) -> &Doc {
        match s {
            Schema::V1 => &self.v1,
            Schema::V2 => &self.v2,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Writing a str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Feeds the parts to the filter's streaming parser without joining them.
struct Parts<'a>(&'a [Bytes]);

impl keygate_core::scan::Body for Parts<'_> {
    fn read(&mut self, offset: usize, max: usize) -> Cow<'_, [u8]> {
        let mut at = offset;
        for p in self.0 {
            if at < p.len() {
                let end = at.saturating_add(max).min(p.len());
                return Cow::Borrowed(p.get(at..end).unwrap_or_default());
            }
            at -= p.len();
        }
        Cow::Borrowed(&[])
    }
}

/// What to put in: `/v1/keys` serves listed keys without metadata; export writes every key
/// that is not deleted, with metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    Served,
    Export,
}

/// A key starts a chunk when the top `CHUNK_BITS` bits of the hash of its id are zero.
#[cfg(not(test))]
const CHUNK_BITS: u32 = 10;
/// Small chunks in unit tests: many chunk boundaries among a few hundred keys.
#[cfg(test)]
const CHUNK_BITS: u32 = 3;

/// Whether the key `id` starts a chunk: FNV-1a 64 with a final mix (stable across builds,
/// versions and machines, since replicas must agree).
fn starts_chunk(id: &str) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h >> (64 - CHUNK_BITS) == 0
}

/// Serialized keys in id order, joined by `,`.
#[derive(Debug)]
struct Chunk {
    /// The id of its first key.
    first: String,
    bytes: Bytes,
    /// Where each key's JSON ends in `bytes` (the next starts one byte later, after the `,`).
    ends: Vec<u32>,
    digest: [u8; 32],
}

impl Chunk {
    /// Each key's JSON (shares `bytes`).
    fn keys(&self) -> impl Iterator<Item = Bytes> + '_ {
        let mut start = 0usize;
        self.ends.iter().filter_map(move |e| {
            let end = *e as usize;
            let k = (start <= end && end <= self.bytes.len()).then(|| self.bytes.slice(start..end));
            start = end + 1;
            k
        })
    }
}

/// The id of a key from its JSON (`{"id":"…",…`).
fn id_of(key: &[u8]) -> Option<String> {
    let rest = key.strip_prefix(b"{\"id\":")?;
    let mut de = serde_json::Deserializer::from_slice(rest);
    String::deserialize(&mut de).ok()
}

/// The plan a key's JSON names.
fn plan_of(key: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct PlanOf {
        plan: Option<String>,
    }
    serde_json::from_slice::<PlanOf>(key).ok()?.plan
}

/// Writes keys, in id order, into chunks.
#[derive(Default)]
struct Writer {
    chunks: Vec<Arc<Chunk>>,
    first: String,
    buf: Vec<u8>,
    ends: Vec<u32>,
}

impl Writer {
    /// The buffer to write the JSON of key `id` into (then `end`).
    fn begin(&mut self, id: &str) -> &mut Vec<u8> {
        if starts_chunk(id) && !self.ends.is_empty() {
            self.finish();
        }
        if self.ends.is_empty() {
            id.clone_into(&mut self.first);
        } else {
            self.buf.push(b',');
        }
        &mut self.buf
    }

    fn end(&mut self) -> Result<(), String> {
        let end = u32::try_from(self.buf.len()).map_err(|_| "a chunk over 4 GiB".to_string())?;
        self.ends.push(end);
        Ok(())
    }

    fn push(&mut self, id: &str, key: &[u8]) -> Result<(), String> {
        self.begin(id).extend_from_slice(key);
        self.end()
    }

    /// Closes the current chunk (copied out at its exact size; the buffer is reused).
    fn finish(&mut self) {
        if self.ends.is_empty() {
            return;
        }
        let bytes = Bytes::copy_from_slice(&self.buf);
        self.buf.clear();
        self.chunks.push(Arc::new(Chunk {
            first: std::mem::take(&mut self.first),
            digest: Sha256::digest(&bytes).into(),
            bytes,
            ends: {
                let mut ends = std::mem::take(&mut self.ends);
                ends.shrink_to_fit();
                ends
            },
        }));
    }

    fn done(mut self) -> Vec<Arc<Chunk>> {
        self.finish();
        self.chunks
    }
}

/// What the builder keeps between builds: the served key chunks and what validating a change
/// needs. Its chunks are the same memory as the served document's.
#[derive(Debug, Default)]
pub struct Cache {
    generation: i64,
    chunks: Vec<Arc<Chunk>>,
    keys: usize,
    /// Served keys per plan they name.
    plans: HashMap<String, u64>,
}

/// Changed keys: their JSON, or None when they left the document.
type Changes = BTreeMap<String, Option<Vec<u8>>>;

/// Above this many changed rows (and a quarter of the keys) a full build is cheaper.
const MAX_CHANGES: i64 = 50_000;

type Tx = sqlx::Transaction<'static, sqlx::Any>;

fn db(e: sqlx::Error) -> String {
    format!("database: {e}")
}

/// Opens one read snapshot; returns it with `(generation, changed_at, tombstones_from)`.
async fn snapshot(store: &Store) -> Result<(Tx, i64, i64, i64), String> {
    let mut tx = store.pool.begin().await.map_err(db)?;
    if store.kind == Kind::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    let meta = sqlx::query("SELECT generation, changed_at, tombstones_from FROM meta WHERE id = 1")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    let generation: i64 = meta.try_get(0).map_err(db)?;
    let changed_at: i64 = meta.try_get(1).map_err(db)?;
    let tombstones_from: i64 = meta.try_get(2).map_err(db)?;
    Ok((tx, generation, changed_at, tombstones_from))
}

/// Everything before the first key, for schemas 1 and 2, and the plans' ids.
async fn head(
    tx: &mut Tx,
    generation: i64,
    changed_at: i64,
) -> Result<(Vec<u8>, Vec<u8>, HashSet<String>), String> {
    let mut head1 = Vec::new();
    let mut head2 = Vec::new();
    for h in [&mut head1, &mut head2] {
        h.extend_from_slice(b"{\"version\":");
        put_str(h, &format!("{}#{generation}", util::rfc3339(changed_at)));
        h.extend_from_slice(b",\"owners\":{");
    }
    let owners = sqlx::query("SELECT id, status, rate_limits FROM owners ORDER BY id")
        .fetch_all(&mut **tx)
        .await
        .map_err(db)?;
    for (i, r) in owners.iter().enumerate() {
        let id: String = r.try_get(0).map_err(db)?;
        let status: String = r.try_get(1).map_err(db)?;
        let limits: Option<String> = r.try_get(2).map_err(db)?;
        for (h, with_limits) in [(&mut head1, false), (&mut head2, true)] {
            if i > 0 {
                h.push(b',');
            }
            put_str(h, &id);
            h.extend_from_slice(b":{\"status\":");
            put_str(h, &status);
            if let (true, Some(l)) = (with_limits, &limits) {
                h.extend_from_slice(b",\"rate_limits\":");
                h.extend_from_slice(l.as_bytes());
            }
            h.push(b'}');
        }
    }
    let mut plans = Vec::new();
    let mut ids = HashSet::new();
    plans.extend_from_slice(b"},\"plans\":{");
    let rows = sqlx::query("SELECT id, rate_limits FROM plans ORDER BY id")
        .fetch_all(&mut **tx)
        .await
        .map_err(db)?;
    for (i, r) in rows.iter().enumerate() {
        let id: String = r.try_get(0).map_err(db)?;
        let limits: Option<String> = r.try_get(1).map_err(db)?;
        if i > 0 {
            plans.push(b',');
        }
        put_str(&mut plans, &id);
        plans.push(b':');
        match limits {
            Some(l) => {
                plans.extend_from_slice(b"{\"rate_limits\":");
                plans.extend_from_slice(l.as_bytes());
                plans.push(b'}');
            }
            None => plans.extend_from_slice(b"{}"),
        }
        ids.insert(id);
    }
    plans.extend_from_slice(b"},\"keys\":[");
    head1.extend_from_slice(&plans);
    head2.extend_from_slice(&plans);
    Ok((head1, head2, ids))
}

const KEY_COLUMNS: &str = "id, hash, owner, status, expires_at, allowed_ips, sites, scopes, plan, \
     rate_limits, name, description, created_at, updated_at, last_used_at, listed";

/// Reads one snapshot and writes the documents whole. Errors are database errors or a
/// document the filter's parser rejects (which validation should make impossible).
pub async fn build(store: &Store, content: Content) -> Result<Built, String> {
    full(store, content).await.map(|(b, _)| b)
}

/// A full build, and (for `Served`) the cache incremental builds start from.
async fn full(store: &Store, content: Content) -> Result<(Built, Cache), String> {
    let started = Instant::now();
    let (mut tx, generation, changed_at, _) = snapshot(store).await?;
    let (head1, head2, _) = head(&mut tx, generation, changed_at).await?;
    let filter = match content {
        Content::Served => "listed = 1",
        Content::Export => "status <> 'deleted'",
    };
    let sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE {filter} ORDER BY id");
    let mut w = Writer::default();
    let mut plans: HashMap<String, u64> = HashMap::new();
    let mut count = 0usize;
    {
        let mut rows = sqlx::query(&sql).fetch(&mut *tx);
        while let Some(r) = rows.try_next().await.map_err(db)? {
            let id: String = r.try_get(0).map_err(db)?;
            write_key(w.begin(&id), &r, content == Content::Export).map_err(db)?;
            w.end()?;
            count += 1;
            let plan: Option<String> = r.try_get(8).map_err(db)?;
            if let Some(p) = plan {
                *plans.entry(p).or_insert(0) += 1;
            }
        }
    }
    tx.commit().await.map_err(db)?;
    let chunks = w.done();
    let v1 = Doc::new(Bytes::from(head1), &chunks);
    let v2 = Doc::new(Bytes::from(head2), &chunks);
    // The filter's own parser: the service never publishes what a gateway would reject.
    // Schema 2 is checked; schema 1 is the same bytes less owners' `rate_limits`, which cannot
    // make a valid document invalid.
    keygate_core::keylist::read(&mut Parts(&v2.parts), v2.len)
        .map_err(|e| format!("the built document does not validate: {e}"))?;
    let cache = Cache {
        generation,
        chunks,
        keys: count,
        plans,
    };
    let built = Built {
        generation,
        v1,
        v2,
        keys: count,
        seconds: started.elapsed().as_secs_f64(),
        full: true,
    };
    Ok((built, cache))
}

/// Builds the served documents: incrementally from `cache` when there is one (see the module
/// documentation), else (or when the changes are too many, or the deletions seen are no
/// longer recorded) whole. `cache` is replaced only by a good build.
pub async fn update(store: &Store, cache: &mut Option<Cache>) -> Result<Built, String> {
    if let Some(c) = cache.as_ref() {
        match incremental(store, c).await {
            Ok(Some((built, next))) => {
                *cache = Some(next);
                return Ok(built);
            }
            Ok(None) => {}
            Err(e) => eprintln!(
                "keygate keyservice: warning: incremental build failed ({e}); building whole"
            ),
        }
    }
    let (built, next) = full(store, Content::Served).await?;
    *cache = Some(next);
    Ok(built)
}

/// An incremental build from `c`; None when a full build is needed.
async fn incremental(store: &Store, c: &Cache) -> Result<Option<(Built, Cache)>, String> {
    let started = Instant::now();
    let (mut tx, generation, changed_at, tombstones_from) = snapshot(store).await?;
    if c.generation < tombstones_from {
        return Ok(None);
    }
    if store.kind == Kind::Postgres {
        // The queries below read a few rows through the doc_gen and generation indexes; with
        // a generic plan (prepared statements) or before the table is analyzed, the planner
        // estimates a third of the table for `>= $1` and scans all of it (100 ms at 1M keys).
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    let changed: i64 = sqlx::query("SELECT COUNT(*) FROM keys WHERE doc_gen >= $1")
        .bind(c.generation)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?
        .try_get(0)
        .map_err(db)?;
    let quarter = i64::try_from(c.keys / 4).unwrap_or(i64::MAX);
    if changed > MAX_CHANGES.max(quarter) {
        return Ok(None);
    }
    let (head1, head2, plan_ids) = head(&mut tx, generation, changed_at).await?;
    let mut changes = Changes::new();
    let gone = sqlx::query("SELECT id FROM key_tombstones WHERE generation >= $1")
        .bind(c.generation)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
    for r in gone {
        changes.insert(r.try_get(0).map_err(db)?, None);
    }
    {
        let sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE doc_gen >= $1");
        let mut rows = sqlx::query(&sql).bind(c.generation).fetch(&mut *tx);
        while let Some(r) = rows.try_next().await.map_err(db)? {
            let id: String = r.try_get(0).map_err(db)?;
            let listed: i64 = r.try_get(15).map_err(db)?;
            let key = if listed == 1 {
                let mut out = Vec::new();
                write_key(&mut out, &r, false).map_err(db)?;
                Some(out)
            } else {
                None
            };
            changes.insert(id, key);
        }
    }
    tx.commit().await.map_err(db)?;

    // The new head and every changed key, checked with the filter's parser.
    let mut check = head2.clone();
    for (n, key) in changes.values().flatten().enumerate() {
        if n > 0 {
            check.push(b',');
        }
        check.extend_from_slice(key);
    }
    check.extend_from_slice(TAIL);
    keygate_core::keylist::parse(&check)
        .map_err(|e| format!("the built document does not validate: {e}"))?;
    drop(check);

    let mut plans = c.plans.clone();
    let mut keys = c.keys;
    let chunks = apply(&c.chunks, &changes, &mut plans, &mut keys)?;
    plans.retain(|_, n| *n > 0);
    if let Some(p) = plans.keys().find(|p| !plan_ids.contains(*p)) {
        return Err(format!(
            "the built document does not validate: a key names the unknown plan {p:?}"
        ));
    }
    let v1 = Doc::new(Bytes::from(head1), &chunks);
    let v2 = Doc::new(Bytes::from(head2), &chunks);
    let built = Built {
        generation,
        v1,
        v2,
        keys,
        seconds: started.elapsed().as_secs_f64(),
        full: false,
    };
    let cache = Cache {
        generation,
        chunks,
        keys,
        plans,
    };
    Ok(Some((built, cache)))
}

fn count_plan(plans: &mut HashMap<String, u64>, key: &[u8], add: bool) {
    if let Some(p) = plan_of(key) {
        let n = plans.entry(p).or_insert(0);
        *n = if add {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        };
    }
}

/// The chunks after `changes`: only the chunks a changed key falls in, and the one before each
/// (a key leaving that started a chunk joins the rest of its chunk to the previous one), are
/// rewritten; the others are shared.
fn apply(
    chunks: &[Arc<Chunk>],
    changes: &Changes,
    plans: &mut HashMap<String, u64>,
    keys: &mut usize,
) -> Result<Vec<Arc<Chunk>>, String> {
    // Runs of chunk indexes to rewrite, [lo, hi), sorted and disjoint.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for id in changes.keys() {
        let at = chunks
            .partition_point(|c| c.first.as_str() <= id.as_str())
            .saturating_sub(1);
        let (lo, hi) = (at.saturating_sub(1), (at + 1).min(chunks.len()));
        match runs.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => runs.push((lo, hi)),
        }
    }
    let mut out: Vec<Arc<Chunk>> = Vec::with_capacity(chunks.len() + runs.len());
    let mut next = 0usize;
    for (lo, hi) in runs {
        out.extend(chunks.get(next..lo).unwrap_or_default().iter().cloned());
        next = hi;
        let from = match lo {
            0 => Bound::Unbounded,
            _ => chunks
                .get(lo)
                .map_or(Bound::Unbounded, |c| Bound::Included(c.first.clone())),
        };
        let to = chunks
            .get(hi)
            .map_or(Bound::Unbounded, |c| Bound::Excluded(c.first.clone()));
        if let (Bound::Included(a), Bound::Excluded(b)) = (&from, &to) {
            if a >= b {
                return Err("cached chunks out of order".into());
            }
        }
        let mut changed = changes.range((from, to)).peekable();
        let mut w = Writer::default();
        for chunk in chunks.get(lo..hi).unwrap_or_default() {
            for key in chunk.keys() {
                let id = id_of(&key).ok_or("a cached key without an id")?;
                // Changed keys before this one are new.
                while let Some((cid, ck)) = changed.next_if(|(cid, _)| cid.as_str() < id.as_str()) {
                    if let Some(k) = ck {
                        w.push(cid, k)?;
                        count_plan(plans, k, true);
                        *keys += 1;
                    }
                }
                match changed.next_if(|(cid, _)| cid.as_str() == id.as_str()) {
                    Some((_, ck)) => {
                        count_plan(plans, &key, false);
                        match ck {
                            Some(k) => {
                                w.push(&id, k)?;
                                count_plan(plans, k, true);
                            }
                            None => *keys = keys.saturating_sub(1),
                        }
                    }
                    None => w.push(&id, &key)?,
                }
            }
        }
        for (cid, ck) in changed {
            if let Some(k) = ck {
                w.push(cid, k)?;
                count_plan(plans, k, true);
                *keys += 1;
            }
        }
        out.extend(w.done());
    }
    out.extend(chunks.get(next..).unwrap_or_default().iter().cloned());
    Ok(out)
}

fn write_key(out: &mut Vec<u8>, r: &sqlx::any::AnyRow, metadata: bool) -> Result<(), sqlx::Error> {
    let id: String = r.try_get(0)?;
    let hash: String = r.try_get(1)?;
    let owner: String = r.try_get(2)?;
    let status: String = r.try_get(3)?;
    let expires_at: Option<i64> = r.try_get(4)?;
    out.extend_from_slice(b"{\"id\":");
    put_str(out, &id);
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\",\"owner\":");
    put_str(out, &owner);
    out.extend_from_slice(b",\"status\":");
    put_str(out, &status);
    if let Some(t) = expires_at {
        out.extend_from_slice(b",\"expires_at\":");
        put_str(out, &util::rfc3339(t));
    }
    // Lists are stored as the JSON serde_json wrote: spliced in as they are.
    for (i, name) in [(5, "allowed_ips"), (6, "sites"), (7, "scopes")] {
        let v: String = r.try_get(i)?;
        if v != "[]" {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(v.as_bytes());
        }
    }
    let plan: Option<String> = r.try_get(8)?;
    if let Some(p) = plan {
        out.extend_from_slice(b",\"plan\":");
        put_str(out, &p);
    }
    let limits: Option<String> = r.try_get(9)?;
    if let Some(l) = limits {
        out.extend_from_slice(b",\"rate_limits\":");
        out.extend_from_slice(l.as_bytes());
    }
    if metadata {
        for (i, name) in [(10, "name"), (11, "description")] {
            let v: Option<String> = r.try_get(i)?;
            if let Some(v) = v {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
                put_str(out, &v);
            }
        }
        for (i, name) in [(12, "created_at"), (13, "updated_at"), (14, "last_used_at")] {
            let v: Option<i64> = r.try_get(i)?;
            if let Some(v) = v {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
                put_str(out, &util::rfc3339(v));
            }
        }
    }
    out.push(b'}');
    Ok(())
}

/// Whether an `If-None-Match` value matches `etag` (weak comparison, lists and `*`).
pub fn none_match(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model;
    use crate::store::Named2;
    use serde_json::{json, Value};

    fn obj(v: Value) -> serde_json::Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    /// Builds incrementally from `cache` and whole, and compares them byte for byte.
    async fn same(store: &Store, cache: &mut Option<Cache>, step: &str) -> Built {
        let inc = update(store, cache).await.unwrap();
        let whole = build(store, Content::Served).await.unwrap();
        assert_eq!(inc.generation, whole.generation, "{step}");
        assert_eq!(inc.keys, whole.keys, "{step}");
        for s in [Schema::V1, Schema::V2] {
            let (a, b) = (inc.doc(s), whole.doc(s));
            assert!(a.to_vec() == b.to_vec(), "{step}: bytes differ ({s:?})");
            assert_eq!(a.etag, b.etag, "{step}");
            assert_eq!(a.len, b.len, "{step}");
        }
        // The chunk layout depends only on the keys.
        let c = cache.as_ref().unwrap();
        let (_, fresh) = full(store, Content::Served).await.unwrap();
        let firsts = |c: &Cache| c.chunks.iter().map(|c| c.first.clone()).collect::<Vec<_>>();
        assert_eq!(firsts(c), firsts(&fresh), "{step}");
        assert_eq!(
            c.plans.iter().filter(|(_, n)| **n > 0).count(),
            fresh.plans.len(),
            "{step}"
        );
        inc
    }

    /// Incremental builds after creates, updates, disables, rotates, deletes, retention purges,
    /// owner and plan changes and imports are exactly the full build.
    #[tokio::test]
    async fn incremental_is_the_full_build() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite:{}", dir.path().join("k.db").display()))
            .await
            .unwrap();
        let mut cache = None;
        let first = update(&store, &mut cache).await.unwrap();
        assert!(first.full && first.keys == 0);
        store.put_plan("t", "free", Some(vec![])).await.unwrap();
        let mut keys: Vec<String> = (0..300)
            .map(|i| {
                format!(
                    "{{\"id\":\"k{i:04}\",\"hash\":\"{}\",\"owner\":\"o{}\",\"scopes\":[\"a:*\"]}}",
                    util::sha256_hex(format!("k{i}").as_bytes()),
                    i % 7
                )
            })
            .collect();
        let doc = format!("{{\"keys\":[{}]}}", keys.join(","));
        store
            .import("t", model::import(doc.as_bytes()).unwrap())
            .await
            .unwrap();
        let b = same(&store, &mut cache, "import").await;
        assert_eq!(b.keys, 300);
        assert!(
            !b.full,
            "an import of 300 keys into an empty list is still incremental"
        );
        keys = (0..300).map(|i| format!("k{i:04}")).collect();

        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for step in 0..160 {
            let pick = keys[rand(keys.len())].clone();
            let op = rand(12);
            let what = format!("step {step}: op {op} on {pick}");
            match op {
                0 => {
                    let c = model::create_key(
                        &obj(json!({"owner": format!("o{}", rand(9)), "scopes": ["x"]})),
                        util::now(),
                    )
                    .unwrap();
                    let (row, _) = store.create_key("t", c).await.unwrap();
                    keys.push(row.id);
                }
                1 => {
                    let p =
                        model::patch_key(&obj(json!({"scopes": [format!("s{step}")]}))).unwrap();
                    let _ = store.patch_key("t", &pick, p).await;
                }
                2 => {
                    let s = ["disabled", "active", "revoked"][rand(3)];
                    let p = model::patch_key(&obj(json!({"status": s}))).unwrap();
                    let _ = store.patch_key("t", &pick, p).await;
                }
                3 => {
                    let r =
                        model::rotate(&obj(json!({"overlap_s": rand(2)})), util::now()).unwrap();
                    if let Ok((row, _)) = store.rotate("t", &pick, r).await {
                        keys.push(row.id);
                    }
                }
                4 | 5 => {
                    let _ = store.delete_key("t", &pick).await;
                }
                6 => {
                    store.purge(0).await.unwrap();
                }
                7 => {
                    let status = ["active", "disabled"][rand(2)];
                    let o = model::owner(
                        &obj(json!({"status": status,
                            "rate_limits": [{"limit": 1 + rand(50), "window_s": 60}]})),
                        "",
                    )
                    .unwrap();
                    store
                        .put_owner("t", &format!("o{}", rand(9)), o)
                        .await
                        .unwrap();
                }
                8 => {
                    let name = format!("p{}", rand(3));
                    let l = model::plan(
                        &obj(json!({"rate_limits": [{"limit": 1 + rand(9), "window_s": 1}]})),
                        "",
                    )
                    .unwrap();
                    store.put_plan("t", &name, l).await.unwrap();
                    let p = model::patch_key(&obj(json!({"plan": name}))).unwrap();
                    let _ = store.patch_key("t", &pick, p).await;
                }
                9 => {
                    let p = model::patch_key(&obj(
                        json!({"plan": null, "allowed_ips": ["10.0.0.0/8"]}),
                    ))
                    .unwrap();
                    let _ = store.patch_key("t", &pick, p).await;
                    let _ = store
                        .delete_named("t", Named2::Plan, &format!("p{}", rand(3)))
                        .await;
                }
                10 => {
                    // An import that updates some keys and brings new ones.
                    let mut ks = Vec::new();
                    for j in 0..5 {
                        let id = format!("m{step:03}{j}");
                        ks.push(json!({"id": id, "hash": util::sha256_hex(id.as_bytes()), "owner": "o1", "plan": "free"}));
                        keys.push(id);
                    }
                    let doc =
                        json!({"plans": {"free": {"rate_limits": []}}, "keys": ks}).to_string();
                    store
                        .import("t", model::import(doc.as_bytes()).unwrap())
                        .await
                        .unwrap();
                }
                _ => {
                    // Several changes between two builds.
                    for _ in 0..5 {
                        let k = keys[rand(keys.len())].clone();
                        if rand(2) == 0 {
                            let _ = store.delete_key("t", &k).await;
                        } else {
                            let p = model::patch_key(&obj(json!({"sites": [format!("{step}")]})))
                                .unwrap();
                            let _ = store.patch_key("t", &k, p).await;
                        }
                    }
                    store.purge(0).await.unwrap();
                }
            }
            let b = same(&store, &mut cache, &what).await;
            assert!(!b.full, "{what}: built whole");
        }
        // Tombstones dropped past the generation served: the next build is whole, and the same.
        sqlx::query(
            "UPDATE meta SET tombstones_from = generation + 1, generation = generation + 1",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        let b = same(&store, &mut cache, "tombstones dropped").await;
        assert!(b.full);
        // Every key deleted and purged: the empty document.
        for k in &keys {
            let _ = store.delete_key("t", k).await;
        }
        store.purge(0).await.unwrap();
        let b = same(&store, &mut cache, "all deleted").await;
        assert_eq!(b.keys, 0);
        assert!(!b.full);
    }

    #[test]
    fn negotiation() {
        assert_eq!(Schema::negotiate("1"), Some(Schema::V1));
        assert_eq!(Schema::negotiate(" 2 "), Some(Schema::V2));
        assert_eq!(Schema::negotiate("1, 7"), Some(Schema::V2));
        assert_eq!(Schema::negotiate("0"), None);
        assert_eq!(Schema::negotiate("x"), None);
        assert_eq!(Schema::negotiate(""), None);
    }

    #[test]
    fn if_none_match() {
        assert!(none_match("\"a\"", "\"a\""));
        assert!(none_match("\"b\", W/\"a\"", "\"a\""));
        assert!(none_match("*", "\"a\""));
        assert!(!none_match("\"b\"", "\"a\""));
    }
}
