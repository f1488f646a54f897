//! The key-list document (SPEC §2) built from the database: read in one snapshot (with the
//! generation it belongs to), written as JSON, checked with the filter's own parser, and kept
//! until the generation moves. Two schemas are served (see `Schema`); their key arrays are the
//! same bytes, shared.

use crate::store::{Kind, Store};
use crate::util;
use bytes::Bytes;
use futures_util::TryStreamExt;
use sha2::{Digest, Sha256};
use sqlx::Row;
use std::borrow::Cow;
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

/// One served document: its bytes in parts (the key array shared between schemas), its strong
/// ETag (`"` + hex SHA-256 of the bytes + `"`) and length in bytes.
#[derive(Debug, Clone)]
pub struct Doc {
    pub parts: Vec<Bytes>,
    pub etag: String,
    pub len: usize,
}

impl Doc {
    fn new(parts: Vec<Bytes>) -> Doc {
        let mut h = Sha256::new();
        let mut len = 0;
        for p in &parts {
            h.update(p);
            len += p.len();
        }
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

/// Reads one snapshot and writes the documents. Errors are database errors or a document the
/// filter's parser rejects (which validation should make impossible).
pub async fn build(store: &Store, content: Content) -> Result<Built, String> {
    let started = Instant::now();
    let db = |e: sqlx::Error| format!("database: {e}");
    let mut tx = store.pool.begin().await.map_err(db)?;
    if store.kind == Kind::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    let meta = sqlx::query("SELECT generation, changed_at FROM meta WHERE id = 1")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    let generation: i64 = meta.try_get(0).map_err(db)?;
    let changed_at: i64 = meta.try_get(1).map_err(db)?;

    let mut head1 = Vec::new();
    let mut head2 = Vec::new();
    for h in [&mut head1, &mut head2] {
        h.extend_from_slice(b"{\"version\":");
        put_str(h, &format!("{}#{generation}", util::rfc3339(changed_at)));
        h.extend_from_slice(b",\"owners\":{");
    }
    let owners = sqlx::query("SELECT id, status, rate_limits FROM owners ORDER BY id")
        .fetch_all(&mut *tx)
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
    plans.extend_from_slice(b"},\"plans\":{");
    let rows = sqlx::query("SELECT id, rate_limits FROM plans ORDER BY id")
        .fetch_all(&mut *tx)
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
    }
    plans.extend_from_slice(b"},\"keys\":[");
    head1.extend_from_slice(&plans);
    head2.extend_from_slice(&plans);

    let filter = match content {
        Content::Served => "listed = 1",
        Content::Export => "status <> 'deleted'",
    };
    let sql = format!(
        "SELECT id, hash, owner, status, expires_at, allowed_ips, sites, scopes, plan, rate_limits, \
         name, description, created_at, updated_at, last_used_at FROM keys WHERE {filter} ORDER BY id"
    );
    let mut keys = Vec::new();
    let mut count = 0usize;
    {
        let mut rows = sqlx::query(&sql).fetch(&mut *tx);
        while let Some(r) = rows.try_next().await.map_err(db)? {
            if count > 0 {
                keys.push(b',');
            }
            count += 1;
            write_key(&mut keys, &r, content == Content::Export).map_err(db)?;
        }
    }
    tx.commit().await.map_err(db)?;

    let keys = Bytes::from(keys);
    let tail = Bytes::from_static(b"]}");
    let v1 = Doc::new(vec![Bytes::from(head1), keys.clone(), tail.clone()]);
    let v2 = Doc::new(vec![Bytes::from(head2), keys, tail]);
    // The filter's own parser: the service never publishes what a gateway would reject.
    // Schema 2 is checked; schema 1 is the same bytes less owners' `rate_limits`, which cannot
    // make a valid document invalid.
    keygate_core::keylist::read(&mut Parts(&v2.parts), v2.len)
        .map_err(|e| format!("the built document does not validate: {e}"))?;
    Ok(Built {
        generation,
        v1,
        v2,
        keys: count,
        seconds: started.elapsed().as_secs_f64(),
    })
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
