//! The key-list document (SPEC §2): read in chunks, validated whole, and compiled as it streams
//! by into the compact records of `record` (owner validity and plan limits folded in, so a
//! request needs exactly one record). Neither the document nor a parsed form of its keys is ever
//! held whole: each key goes from its JSON slice straight into one arena of records.

mod fast;
mod raw;
pub mod staging;

use crate::config::{json_error, validate_limits, Limit};
use crate::dictionary;
use crate::ipset::IpSet;
use crate::json::DocError;
use crate::ratelimit::Fnv;
use crate::record::{self, Entry};
use crate::scan::{self, Body, Position, Sink};
use crate::shared::SharedStore;
use crate::time;
use raw::{RawExpiry, RawHead, RawKey};
use serde::de::IgnoredAny;
use serde::Deserialize;
use staging::{Records, Spill};
use std::collections::{HashMap, HashSet};

/// A validated list, compiled: its records (in `staging`'s streams, perhaps spilled to shared
/// data) and their hash order.
#[derive(Debug, Default)]
pub struct KeyList {
    pub version: Option<String>,
    records: Records,
    /// One per key in hash order: `(first 4 bytes of the hash) << 32 | its document index`.
    order: Vec<u64>,
    /// Per document index: where its record is (`staging`).
    locs: Vec<u32>,
    /// The entries of the list's dictionary (`dictionary::Builder::finish`).
    dictionary: Vec<u8>,
}

impl KeyList {
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn dictionary(&self) -> &[u8] {
        &self.dictionary
    }

    /// Hands `f` each `(first 4 bytes of the hash, the record with its length)` in hash order,
    /// taking the records back one stream at a time (`store`: where they were spilled, if they
    /// were). False when spilled records could not be read back (a staged entry was overwritten
    /// by another parse): then `f` has not seen every record, and the list is spent.
    pub fn drain_sorted(
        &mut self,
        store: Option<&dyn SharedStore>,
        f: &mut dyn FnMut(u32, &[u8]),
    ) -> bool {
        let (records, order, locs) = (&mut self.records, &self.order, &self.locs);
        let mut at = 0;
        while let Some(first) = order.get(at) {
            let s = staging::stream_of((first >> 56) as u8);
            // One stream at a time (the last one is dropped before the next is taken back).
            let Some(bytes) = records.stream(store, s) else {
                return false;
            };
            while let Some(e) = order.get(at) {
                if staging::stream_of((e >> 56) as u8) != s {
                    break;
                }
                at += 1;
                let record = locs
                    .get((*e as u32) as usize)
                    .and_then(|loc| bytes.get(staging::offset_of(*loc)..))
                    .and_then(|rest| {
                        let (_, tail) = record::split_record(rest)?;
                        rest.get(..rest.len() - tail.len())
                    });
                match record {
                    Some(r) => f((e >> 32) as u32, r),
                    None => return false,
                }
            }
        }
        true
    }

    /// The records (without their length) in document order, as far as they are held in this
    /// VM: all of them unless the parse spilled some (`read_spilling`).
    pub fn records(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.locs.iter().filter_map(|l| self.records.in_memory(*l))
    }

    /// Empties the entries its records were spilled to (a list that will not be published).
    pub fn discard(&mut self, store: &dyn SharedStore) {
        self.records.discard(Some(store));
    }

    /// Chunks of records spilled to shared data and not taken back.
    pub fn spilled_chunks(&self) -> usize {
        self.records.spilled_chunks()
    }
}

/// Every member a key object of the document may have (SPEC §2, metadata included); any other
/// member rejects the document.
pub const KEY_MEMBERS: &[&str] = &[
    "id",
    "hash",
    "owner",
    "status",
    "expires_at",
    "allowed_ips",
    "sites",
    "scopes",
    "plan",
    "rate_limits",
    "meta",
    "name",
    "description",
    "created_at",
    "updated_at",
    "last_used_at",
];

/// 1–256 visible ASCII characters: always a valid header value and log token.
pub fn valid_name(s: &str) -> bool {
    (1..=256).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// A key's `hash` (SPEC §2: 64 hex digits, either case) as its 32 bytes; `None` when it is not
/// one. Read once per key at load time, a million times for a 1M-key list: one table lookup
/// per digit, no branch per character class.
pub fn parse_hash(s: &str) -> Option<[u8; 32]> {
    /// Each byte's value as a hex digit, or 0xff. Built at compile time, where an index out of
    /// range fails the build (so the lint against indexing, which guards run time, is lifted).
    #[allow(clippy::indexing_slicing)]
    const HEX: [u8; 256] = {
        let mut t = [0xffu8; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            t[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        // (a u8 always indexes 256 entries: the fallback is never taken, nor compiled in)
        let digit = |c: &u8| HEX.get(usize::from(*c)).copied().unwrap_or(0xff);
        let (hi, lo) = (digit(hi), digit(lo));
        bad |= hi | lo;
        *byte = hi << 4 | (lo & 0x0f);
    }
    (bad & 0xf0 == 0).then_some(out)
}

/// Parses and validates a key-list document in memory (the CLI, tests). Any error rejects the
/// whole document (SPEC §2); the error names the offending field by JSON path (and never
/// contains a key, which the list cannot hold).
pub fn parse(body: &[u8]) -> Result<KeyList, DocError> {
    read(
        &mut scan::Slice {
            data: body,
            chunk: scan::CHUNK,
        },
        body.len(),
    )
}

/// What the plugin configuration demands of a document beyond SPEC §2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// Global mode (`rate_limit.global`): every window of a key, plan or owner limit must be
    /// one the Rate Limit Service protocol has (1, 60, 3600 or 86400 s); another rejects the
    /// document, naming the limit.
    pub unit_windows: bool,
}

/// [`parse`] under the configuration's [`Rules`].
pub fn parse_with(body: &[u8], rules: Rules) -> Result<KeyList, DocError> {
    read_with(
        &mut scan::Slice {
            data: body,
            chunk: scan::CHUNK,
        },
        body.len(),
        rules,
    )
}

/// Validates limits as SPEC §2 does, and their windows under `rules`.
fn check_limits(field: &str, limits: &[Limit], rules: Rules) -> Result<(), DocError> {
    validate_limits(field, limits)?;
    if rules.unit_windows {
        for (i, l) in limits.iter().enumerate() {
            if crate::rls::unit_of(l.window_s).is_none() {
                return Err(DocError::new(
                    format!("{field}[{i}].window_s"),
                    crate::rls::window_error(l.window_s),
                ));
            }
        }
    }
    Ok(())
}

/// What keys resolve against: the plans' limits, the active owners and the owners' limits.
struct Context {
    plans: HashMap<String, Option<Vec<Limit>>, Fnv>,
    owners: Option<HashSet<String, Fnv>>,
    /// Owners with limits of their own (SPEC §2), counted across all of their keys in step 12.
    owner_limits: HashMap<String, Vec<Limit>, Fnv>,
    rules: Rules,
}

fn context(head: &RawHead, rules: Rules) -> Result<Context, DocError> {
    let mut plans = HashMap::default();
    for (name, plan) in &head.plans {
        if let Some(l) = &plan.rate_limits {
            check_limits(&format!("plans.{name}.rate_limits"), l, rules)?;
        }
        plans.insert(name.to_string(), plan.rate_limits.clone());
    }
    let mut owner_limits = HashMap::default();
    for (name, owner) in head.owners.iter().flatten() {
        if let Some(l) = &owner.rate_limits {
            check_limits(&format!("owners.{name}.rate_limits"), l, rules)?;
            if !l.is_empty() {
                owner_limits.insert(name.to_string(), l.clone());
            }
        }
    }
    let owners = head.owners.as_ref().map(|o| {
        o.iter()
            .filter(|(_, v)| v.status.as_deref().is_none_or(|s| s == "active"))
            .map(|(k, _)| k.to_string())
            .collect()
    });
    Ok(Context {
        plans,
        owners,
        owner_limits,
        rules,
    })
}

/// The head parsed (one JSON value and nothing after it but whitespace, SPEC §2), or its error
/// and where serde stopped (line, 1-based column).
fn parse_head(head: &[u8]) -> Result<RawHead, (DocError, (usize, usize))> {
    let de = &mut serde_json::Deserializer::from_slice(head);
    let parsed = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let at = (e.inner().line(), e.inner().column());
        (json_error(e), at)
    })?;
    de.end().map_err(|e| {
        let at = (e.line(), e.column());
        (DocError::whole(format!("invalid JSON: {e}")), at)
    })?;
    Ok(parsed)
}

/// `text` (a serde message ending in its position) with the position replaced.
fn relocate(text: &str, from: (usize, usize), to: (usize, usize)) -> String {
    let suffix = format!(" at line {} column {}", from.0, from.1);
    match text.strip_suffix(&suffix) {
        Some(what) if from.0 > 0 => format!("{what} at line {} column {}", to.0, to.1),
        _ => text.to_string(),
    }
}

/// Reads, validates and compiles a document of `size` bytes (a hint for reserving memory).
///
/// One pass when `owners` and `plans` come before `keys` (the usual order): keys are compiled
/// against them as they stream by. Otherwise a second pass reads the keys again.
pub fn read(body: &mut dyn Body, size: usize) -> Result<KeyList, DocError> {
    read_with(body, size, Rules::default())
}

/// [`read`] under the configuration's [`Rules`].
pub fn read_with(body: &mut dyn Body, size: usize, rules: Rules) -> Result<KeyList, DocError> {
    read_spilling(body, size, rules, None)
}

/// [`read_with`], spilling the records to shared data as they are compiled (`staging`): the VM
/// then never holds more than a few chunks of them. Whatever the outcome, nothing spilled stays
/// but what the returned list still needs (taken back by [`KeyList::drain_sorted`]).
pub fn read_spilling(
    body: &mut dyn Body,
    size: usize,
    rules: Rules,
    spill: Option<Spill<'_>>,
) -> Result<KeyList, DocError> {
    let mut first = Compiler::new(None, size, rules, spill);
    let result = read_into(body, &mut first, size, rules, spill);
    first.release();
    result
}

fn read_into(
    body: &mut dyn Body,
    first: &mut Compiler<'_>,
    size: usize,
    rules: Rules,
    spill: Option<Spill<'_>>,
) -> Result<KeyList, DocError> {
    let outline = scan::scan(body, true, first);
    let head = parse_head(&outline.head);
    // Errors in document order, as one parse of the whole document would report them.
    if let Err((e, (line, column))) = &head {
        let before_keys = outline
            .keys_at
            .is_none_or(|k| *line < k.line || (*line == k.line && *column <= k.column));
        if before_keys || first.syntax.is_none() {
            let at = outline.document_position(*line, *column);
            return Err(DocError {
                path: e.path.clone(),
                message: relocate(&e.message, (*line, *column), at),
            });
        }
    }
    if let Some(e) = first.syntax.take() {
        return Err(e);
    }
    let head = head.map_err(|(e, _)| e)?;
    let ctx = context(&head, rules)?;
    let version = head.version;
    let late = outline
        .names_after_keys
        .iter()
        .any(|n| n == "owners" || n == "plans");
    if first.ctx.is_none() || late {
        first.release();
        let mut second = Compiler::new(Some(ctx), size, rules, spill);
        scan::scan(body, false, &mut second);
        let result = match second.syntax.take() {
            Some(e) => Err(e),
            None => second.finish(version),
        };
        second.release();
        return result;
    }
    first.finish(version)
}

/// The first error of one key, and what the whole-list checks need to order it among theirs.
struct Failure {
    index: usize,
    /// Where in the checks of a key it failed: 0 types, 1 id, (2 duplicate id), 3 hash,
    /// (4 duplicate hash), 5 the rest.
    stage: u8,
    message: DocError,
    id: Option<String>,
    hash: Option<[u8; 32]>,
}

/// Validates and compiles keys one at a time.
struct Compiler<'s> {
    ctx: Option<Context>,
    records: Records,
    spill: Option<Spill<'s>>,
    /// See `KeyList::order` (sorted at the end).
    order: Vec<u64>,
    /// See `KeyList::locs`.
    locs: Vec<u32>,
    /// One record at a time, before it goes to its stream.
    record: Vec<u8>,
    /// One per key: `(upper half of the id's FNV-1a) << 32 | its document index`.
    ids: Vec<u64>,
    dict: dictionary::Builder,
    scratch: record::Scratch,
    count: usize,
    /// The first syntax error in an element: it outranks every other error.
    syntax: Option<DocError>,
    failed: Option<Failure>,
    rules: Rules,
}

impl Sink for Compiler<'_> {
    fn keys_start(&mut self, head: &[u8]) {
        if self.ctx.is_some() {
            return;
        }
        // Speculate that nothing after `keys` changes how keys resolve (checked at the end).
        let mut doc = head.to_vec();
        doc.extend_from_slice(b"]}");
        if let Ok(h) = parse_head(&doc) {
            self.ctx = context(&h, self.rules).ok();
        }
    }

    fn element(&mut self, with_end: &[u8], at: Position) {
        if self.syntax.is_some() {
            return;
        }
        let i = self.count;
        self.count += 1;
        let bytes = with_end.split_last().map_or(with_end, |(_, init)| init);
        if self.failed.is_some() || self.ctx.is_none() {
            // Only a syntax error can still come first.
            self.syntax = syntax_error(with_end, at);
            return;
        }
        if let Some(k) = fast::parse(bytes) {
            if let Err(f) = self.add(i, k) {
                self.failed = Some(f);
            }
            return;
        }
        let mut track = serde_path_to_error::Track::new();
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw = RawKey::deserialize(serde_path_to_error::Deserializer::new(&mut *de, &mut track))
            .and_then(|k| de.end().map(|_| k));
        match raw {
            Ok(k) => {
                if let Err(f) = self.add(i, k) {
                    self.failed = Some(f);
                }
            }
            Err(e) if e.is_syntax() || e.is_eof() => {
                self.syntax = syntax_error(with_end, at).or_else(|| {
                    Some(DocError::whole(format!(
                        "invalid JSON: {}",
                        reposition(&e, at)
                    )))
                });
            }
            Err(e) => {
                let path = track.path().to_string();
                let path = match path.as_str() {
                    "." => format!("keys[{i}]"),
                    p => format!("keys[{i}].{p}"),
                };
                self.failed = Some(Failure {
                    index: i,
                    stage: 0,
                    message: DocError::new(path, reposition(&e, at)),
                    id: None,
                    hash: None,
                });
            }
        }
    }

    fn syntax_error(&mut self, message: String) {
        self.syntax.get_or_insert(DocError::whole(message));
    }

    /// The common shape read in the scan's own pass (`fast::parse_in_place`): what `element`
    /// does when `fast::parse` accepts, without reading the element's bytes a second time.
    fn element_in_place(&mut self, rest: &str) -> Option<scan::Taken> {
        if self.syntax.is_some() || self.failed.is_some() || self.ctx.is_none() {
            return None;
        }
        let (k, taken) = fast::parse_in_place(rest)?;
        let i = self.count;
        self.count += 1;
        if let Err(f) = self.add(i, k) {
            self.failed = Some(f);
        }
        Some(taken)
    }
}

/// The syntax error of an element (followed by its `,` or `]`), worded and placed as a parse of
/// the whole document would report it.
fn syntax_error(with_end: &[u8], at: Position) -> Option<DocError> {
    let de = &mut serde_json::Deserializer::from_slice(with_end);
    let e = match IgnoredAny::deserialize(&mut *de) {
        Err(e) => e,
        Ok(_) => {
            let e = de.end().err()?;
            // The first byte after the value: the separator, or something else.
            let end = Position {
                line: e.line(),
                column: e.column(),
            };
            let last_line = with_end.iter().filter(|b| **b == b'\n').count() + 1;
            let last_column = with_end.len()
                - with_end
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |n| n + 1);
            if (end.line, end.column) == (last_line, last_column) {
                return None;
            }
            let text = relocate(
                &e.to_string(),
                (e.line(), e.column()),
                (e.line(), e.column()),
            );
            let text = text.replacen("trailing characters", "expected `,` or `]`", 1);
            return Some(DocError::whole(format!(
                "invalid JSON: {}",
                relocate(
                    &text,
                    (e.line(), e.column()),
                    place(e.line(), e.column(), at)
                )
            )));
        }
    };
    (e.is_syntax() || e.is_eof())
        .then(|| DocError::whole(format!("invalid JSON: {}", reposition(&e, at))))
}

/// An element's (line, column) in the document.
fn place(line: usize, column: usize, at: Position) -> (usize, usize) {
    if line == 1 {
        (at.line, at.column + column)
    } else {
        (at.line + line - 1, column)
    }
}

/// A serde error in an element, with the element's line and column turned into the document's.
fn reposition(e: &serde_json::Error, at: Position) -> String {
    let from = (e.line(), e.column());
    relocate(&e.to_string(), from, place(from.0, from.1, at))
}

fn id_tag(id: &str) -> u64 {
    crate::ratelimit::fnv1a(id.as_bytes()) >> 32
}

impl<'s> Compiler<'s> {
    fn new(ctx: Option<Context>, size: usize, rules: Rules, spill: Option<Spill<'s>>) -> Self {
        // Sized from the document (a key takes 90+ bytes of JSON and about a third of its
        // JSON as a record): no regrowth copies, and memory reserved but never written costs
        // no RSS.
        Compiler {
            ctx,
            records: Records::new(spill.as_ref(), size / 3 / staging::PARTS),
            spill,
            order: Vec::with_capacity(size / 90),
            locs: Vec::with_capacity(size / 90),
            record: Vec::new(),
            ids: Vec::with_capacity(size / 90),
            dict: dictionary::Builder::default(),
            scratch: record::Scratch::default(),
            count: 0,
            syntax: None,
            failed: None,
            rules,
        }
    }

    fn add(&mut self, i: usize, k: RawKey) -> Result<(), Failure> {
        let Some(ctx) = &self.ctx else {
            return Ok(());
        };
        let field = |sub: &str| format!("keys[{i}].{sub}");
        let fail = |stage, message, hash| Failure {
            index: i,
            stage,
            message,
            id: Some(k.id.to_string()),
            hash,
        };
        if !valid_name(&k.id) {
            return Err(fail(
                1,
                DocError::new(
                    field("id"),
                    format!("{:?} is not 1-256 visible ASCII characters", k.id),
                ),
                None,
            ));
        }
        // The bad value is not repeated: a malformed hash may be a key pasted in by mistake.
        let Some(hash) = parse_hash(&k.hash) else {
            return Err(fail(
                3,
                DocError::new(
                    field("hash"),
                    format!(
                        "not a 64-digit hex SHA-256 ({} characters)",
                        k.hash.chars().count()
                    ),
                ),
                None,
            ));
        };
        let rest = |message| fail(5, message, Some(hash));
        if !valid_name(&k.owner) {
            return Err(rest(DocError::new(
                field("owner"),
                format!("{:?} is not 1-256 visible ASCII characters", k.owner),
            )));
        }
        let expires_at = match &k.expires_at {
            None => None,
            Some(RawExpiry::Unix(t)) => Some(*t),
            Some(RawExpiry::Text(s)) => Some(time::parse_rfc3339(s).ok_or_else(|| {
                rest(DocError::new(
                    field("expires_at"),
                    format!("{s:?} is not RFC 3339 or Unix seconds"),
                ))
            })?),
        };
        let allowed_ips =
            IpSet::parse(&k.allowed_ips).map_err(|e| rest(e.under(&field("allowed_ips"))))?;
        let plan_limits = match &k.plan {
            None => None,
            Some(p) => match ctx.plans.get(p.as_ref()) {
                None => {
                    return Err(rest(DocError::new(
                        field("plan"),
                        format!("unknown plan {p:?}"),
                    )))
                }
                Some(l) => l.as_deref(),
            },
        };
        let limits = match &k.rate_limits {
            Some(l) => {
                check_limits(&field("rate_limits"), l, ctx.rules).map_err(rest)?;
                Some(&l[..])
            }
            None => plan_limits,
        };
        let Ok(index) = u32::try_from(i) else {
            return Err(rest(DocError::new(field("id"), "the list is too large")));
        };
        let entry = Entry {
            hash,
            id: &k.id,
            owner: &k.owner,
            active: k.status.as_deref().is_none_or(|s| s == "active"),
            owner_valid: ctx
                .owners
                .as_ref()
                .is_none_or(|o| o.contains(k.owner.as_ref())),
            expires_at,
            allowed_ips: &allowed_ips,
            sites: &k.sites,
            scopes: &k.scopes,
            limits,
            owner_limits: ctx.owner_limits.get(k.owner.as_ref()).map(|l| &l[..]),
        };
        self.record.clear();
        record::encode(&entry, &mut self.dict, &mut self.scratch, &mut self.record);
        let Some(loc) = self.records.push(
            self.spill.as_ref(),
            staging::stream_of(hash[0]),
            &self.record,
        ) else {
            return Err(rest(DocError::new(field("id"), "the list is too large")));
        };
        let lead = u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]) as u64;
        self.order.push(lead << 32 | index as u64);
        self.ids.push(id_tag(&k.id) << 32 | index as u64);
        self.locs.push(loc);
        Ok(())
    }

    /// The hash and id of key `index` (index in the low half of `entry`); only asked when
    /// 32-bit tags collide, so a spilled record is read back then.
    fn body_at(&self, entry: u64) -> ([u8; 32], String) {
        self.locs
            .get((entry as u32) as usize)
            .and_then(|loc| self.records.record(self.spill.map(|s| s.store), *loc))
            .and_then(|body| record::hash_and_id(&body).map(|(h, id)| (*h, id.to_string())))
            .unwrap_or(([0; 32], String::new()))
    }

    /// Empties what this compiler spilled and still holds (none once `finish` handed its
    /// records over), after noting how much it spilled.
    fn release(&mut self) {
        if let Some(sp) = self.spill {
            self.records.note_spilled(sp.store);
            self.records.discard(Some(sp.store));
        }
    }

    /// The document index of key `entry`.
    fn index_of(&self, entry: u64) -> usize {
        (entry as u32) as usize
    }

    /// The whole-list checks (unique ids and hashes), then the list in hash order.
    fn finish(&mut self, version: Option<String>) -> Result<KeyList, DocError> {
        if let Some(sp) = self.spill {
            self.records.note_spilled(sp.store);
        }
        // Candidates ordered as the checks of one key after another would meet them.
        let mut first: Option<(usize, u8, DocError)> = self
            .failed
            .as_ref()
            .map(|f| (f.index, f.stage, f.message.clone()));
        let mut offer = |index: usize, stage: u8, message: &dyn Fn() -> DocError| {
            if first
                .as_ref()
                .is_none_or(|(i, s, _)| (index, stage) < (*i, *s))
            {
                first = Some((index, stage, message()));
            }
        };
        let failed_id = self.failed.as_ref().and_then(|f| f.id.clone());
        let failed_at = self.failed.as_ref().map_or(usize::MAX, |f| f.index);

        // Duplicate ids: equal tags are adjacent once sorted; a tag match is checked exactly.
        let mut ids = std::mem::take(&mut self.ids);
        ids.sort_unstable();
        let mut dup_id: Option<u64> = None;
        for run in ids.chunk_by(|a, b| a >> 32 == b >> 32) {
            for (n, later) in run.iter().enumerate().skip(1) {
                let id = self.body_at(*later).1;
                if run.iter().take(n).any(|e| self.body_at(*e).1 == id) {
                    dup_id = Some(dup_id.map_or(*later, |d| d.min(*later)));
                    break;
                }
            }
        }
        if let Some(off) = dup_id {
            let (index, id) = (self.index_of(off), self.body_at(off).1);
            offer(index, 2, &|| {
                DocError::new(format!("keys[{index}].id"), format!("duplicate id {id:?}"))
            });
        }
        if let Some(id) = failed_id
            .as_deref()
            .filter(|_| self.failed.as_ref().is_some_and(|f| f.stage >= 3))
        {
            let tag = id_tag(id);
            let from = ids.partition_point(|e| e >> 32 < tag);
            if ids
                .iter()
                .skip(from)
                .take_while(|e| *e >> 32 == tag)
                .any(|e| self.body_at(*e).1 == id)
            {
                offer(failed_at, 2, &|| {
                    DocError::new(
                        format!("keys[{failed_at}].id"),
                        format!("duplicate id {id:?}"),
                    )
                });
            }
        }
        drop(ids);

        // Hash order; duplicate hashes are then adjacent.
        let mut order = std::mem::take(&mut self.order);
        order.sort_unstable();
        for run in order.chunk_by_mut(|a, b| a >> 32 == b >> 32) {
            if run.len() > 1 {
                run.sort_by(|a, b| self.body_at(*a).0.cmp(&self.body_at(*b).0).then(a.cmp(b)));
            }
        }
        let mut dup_hash: Option<u64> = None;
        for pair in order.windows(2) {
            let &[a, b] = pair else { continue };
            if a >> 32 == b >> 32 && self.body_at(a).0 == self.body_at(b).0 {
                dup_hash = Some(dup_hash.map_or(b, |d| d.min(b)));
            }
        }
        if let Some(off) = dup_hash {
            let (index, id) = (self.index_of(off), self.body_at(off).1);
            offer(index, 4, &|| {
                DocError::new(
                    format!("keys[{index}].hash"),
                    format!("duplicate hash (key {id:?})"),
                )
            });
        }
        if let Some(f) = self.failed.as_ref().filter(|f| f.stage == 5) {
            if let (Some(hash), Some(id)) = (f.hash, f.id.as_deref()) {
                let lead = u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]) as u64;
                let from = order.partition_point(|e| e >> 32 < lead);
                if order
                    .iter()
                    .skip(from)
                    .take_while(|e| *e >> 32 == lead)
                    .any(|e| self.body_at(*e).0 == hash)
                {
                    offer(failed_at, 4, &|| {
                        DocError::new(
                            format!("keys[{failed_at}].hash"),
                            format!("duplicate hash (key {id:?})"),
                        )
                    });
                }
            }
        }
        if let Some((_, _, message)) = first {
            return Err(message);
        }
        Ok(KeyList {
            version,
            records: std::mem::take(&mut self.records),
            order,
            locs: std::mem::take(&mut self.locs),
            dictionary: std::mem::take(&mut self.dict).finish(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dictionary::Dictionary;
    use crate::record::Record;

    #[test]
    fn parse_hash_reads_hex_of_either_case_and_nothing_else() {
        let reference = |s: &str| -> Option<[u8; 32]> {
            let mut out = [0u8; 32];
            for (i, o) in out.iter_mut().enumerate() {
                *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(out)
        };
        let base = "0123456789abcdefABCDEF00ff11ee22dd33cc44bb55aa6699887766554433fF";
        assert_eq!(parse_hash(base), reference(base));
        assert!(parse_hash(base).is_some());
        for at in [0, 1, 31, 62, 63] {
            for c in (0u8..=0x7f).map(char::from).chain(['é', 'ÿ', '\u{ff10}']) {
                let mut s: String = base.chars().take(at).collect();
                s.push(c);
                s.extend(base.chars().skip(at + 1));
                assert_eq!(parse_hash(&s), reference(&s), "{c:?} at {at}");
            }
        }
        for len in [0, 1, 63, 65, 128] {
            let s = "a".repeat(len);
            assert_eq!(parse_hash(&s), None, "length {len}");
        }
    }

    /// A key as decoded from its record, for assertions.
    #[derive(Debug)]
    struct Key {
        id: String,
        active: bool,
        owner_valid: bool,
        expires_at: Option<i64>,
        limits: Option<Vec<Limit>>,
    }

    fn keys(l: &KeyList) -> Vec<Key> {
        let d = Dictionary::decode(l.dictionary()).unwrap();
        l.records()
            .map(|b| {
                let r = Record::decode(b, &d).unwrap();
                Key {
                    id: r.id.to_string(),
                    active: r.active,
                    owner_valid: r.owner_valid,
                    expires_at: r.expires_at,
                    limits: r.limits(),
                }
            })
            .collect()
    }

    const H1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const H2: &str = "60303AE22B998861BCE3B28F33EEC1BE758A213C86C93C076DBE9F558C11C752";

    fn doc(keys: &str) -> String {
        format!(
            r#"{{"version":"v1","plans":{{"free":{{"rate_limits":[{{"limit":10,"window_s":60}}]}},"open":{{"rate_limits":[]}},"bare":{{}}}},"keys":[{keys}]}}"#
        )
    }

    #[test]
    fn spec_example_parses() {
        let json = r#"{
          "version": "2026-11-22T05:00:00Z#42",
          "owners": {"org-7": {"status": "active"}, "org-8": {"status": "disabled"}},
          "plans": {"free": {"rate_limits": [{"limit": 10, "window_s": 60}]},
                    "pro":  {"rate_limits": [{"limit": 20, "window_s": 1}, {"limit": 50000, "window_s": 86400}]}},
          "keys": [{
              "id": "key_01",
              "hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
              "owner": "org-7", "status": "active", "expires_at": "2026-12-31T00:00:00Z",
              "allowed_ips": ["203.0.113.0/24", "2001:db8::1"], "sites": ["123"],
              "scopes": ["contacts:*"], "plan": "free",
              "rate_limits": [{"limit": 60, "window_s": 60}]
          }]
        }"#;
        let l = parse(json.as_bytes()).unwrap();
        assert_eq!(l.version.as_deref(), Some("2026-11-22T05:00:00Z#42"));
        let d = Dictionary::decode(l.dictionary()).unwrap();
        let k = Record::decode(l.records().next().unwrap(), &d).unwrap();
        assert_eq!(k.id, "key_01");
        assert!(k.active && k.owner_valid);
        assert_eq!(k.expires_at, Some(1_798_675_200));
        assert_eq!(
            k.limits(),
            Some(vec![Limit {
                limit: 60,
                window_s: 60
            }])
        );
        assert!(k.ip_allowed(|| Some("203.0.113.9".parse().unwrap())));
        assert!(!k.ip_allowed(|| Some("203.0.114.9".parse().unwrap())));
        assert_eq!(k.hash[0], 0x9f);
    }

    #[test]
    fn limits_resolve_key_then_plan_then_default() {
        let l = parse(
            doc(&format!(
                r#"{{"id":"a","hash":"{H1}","owner":"o","plan":"free"}},
                   {{"id":"b","hash":"{H2}","owner":"o","plan":"open"}}"#
            ))
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            keys(&l)[0].limits,
            Some(vec![Limit {
                limit: 10,
                window_s: 60
            }])
        );
        assert_eq!(keys(&l)[1].limits, Some(vec![]));
        let l = parse(
            doc(&format!(
                r#"{{"id":"a","hash":"{H1}","owner":"o","plan":"bare"}}"#
            ))
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(keys(&l)[0].limits, None);
        let l = parse(
            doc(&format!(
                r#"{{"id":"a","hash":"{H1}","owner":"o","rate_limits":[]}}"#
            ))
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(keys(&l)[0].limits, Some(vec![]));
    }

    #[test]
    fn status_and_owners() {
        let json = format!(
            r#"{{"owners":{{"good":{{}},"bad":{{"status":"disabled"}}}},"keys":[
              {{"id":"a","hash":"{H1}","owner":"bad","status":"weird","expires_at":1700000000}},
              {{"id":"b","hash":"{H2}","owner":"ghost"}}]}}"#
        );
        let l = parse(json.as_bytes()).unwrap();
        assert!(!keys(&l)[0].active && !keys(&l)[0].owner_valid);
        assert_eq!(keys(&l)[0].expires_at, Some(1_700_000_000));
        assert!(keys(&l)[1].active && !keys(&l)[1].owner_valid);
        let l =
            parse(doc(&format!(r#"{{"id":"a","hash":"{H1}","owner":"x"}}"#)).as_bytes()).unwrap();
        assert!(keys(&l)[0].owner_valid);
    }

    #[test]
    fn every_bad_document_is_rejected_naming_the_field() {
        let cases: Vec<(String, &[&str])> = vec![
            ("{".into(), &["EOF"]),
            ("[]".into(), &["expected"]),
            (r#"{"version":"x"}"#.into(), &["keys"]),
            (doc(r#"{"id":"a","owner":"o"}"#), &["keys[0]", "hash"]),
            (
                doc(&format!(r#"{{"id":"a","hash":"{H1}"}}"#)),
                &["keys[0]", "owner"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o"}},{{"id":"a","hash":"{H2}","owner":"o"}}"#
                )),
                &["keys[1].id", "duplicate"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o"}},{{"id":"b","hash":"{}","owner":"o"}}"#,
                    H1.to_uppercase()
                )),
                &["keys[1].hash", "duplicate"],
            ),
            (
                doc(r#"{"id":"a","hash":"abc","owner":"o"}"#),
                &["keys[0].hash"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{}","owner":"o"}}"#,
                    "z".repeat(64)
                )),
                &["keys[0].hash"],
            ),
            (
                doc(&format!(r#"{{"id":"a b","hash":"{H1}","owner":"o"}}"#)),
                &["keys[0].id"],
            ),
            (
                doc(&format!(r#"{{"id":"","hash":"{H1}","owner":"o"}}"#)),
                &["keys[0].id"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"{}","hash":"{H1}","owner":"o"}}"#,
                    "i".repeat(257)
                )),
                &["keys[0].id"],
            ),
            (
                doc(&format!(r#"{{"id":"a","hash":"{H1}","owner":"o\u00e9"}}"#)),
                &["keys[0].owner"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o","allowed_ips":["1.2.3.4/33"]}}"#
                )),
                &["keys[0].allowed_ips[0]", "1.2.3.4/33"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o","plan":"gold"}}"#
                )),
                &["keys[0].plan", "gold"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o","plan":"gold","rate_limits":[]}}"#
                )),
                &["keys[0].plan", "gold"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o","expires_at":"tomorrow"}}"#
                )),
                &["keys[0].expires_at"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o","rate_limits":[{{"limit":1,"window_s":0}}]}}"#
                )),
                &["keys[0].rate_limits[0].window_s"],
            ),
            (
                r#"{"plans":{"p":{"rate_limits":[{"limit":1}]}},"keys":[]}"#.into(),
                &["plans", "window_s"],
            ),
        ];
        for (json, needles) in cases {
            let e = parse(json.as_bytes()).unwrap_err().to_string();
            for n in needles {
                assert!(e.contains(n), "error {e:?} for {json} lacks {n:?}");
            }
        }
    }

    #[test]
    fn field_order_does_not_matter_and_type_errors_name_the_key() {
        let json = format!(
            r#"{{"keys":[{{"id":"a","hash":"{H1}","owner":"o","plan":"p"}}],"owners":{{"o":{{}}}},"plans":{{"p":{{"rate_limits":[{{"limit":3,"window_s":9}}]}}}}}}"#
        );
        let l = parse(json.as_bytes()).unwrap();
        assert_eq!(
            keys(&l)[0].limits,
            Some(vec![Limit {
                limit: 3,
                window_s: 9
            }])
        );
        let e = parse(
            doc(&format!(
                r#"{{"id":"a","hash":"{H1}","owner":"o","sites":[1]}}"#
            ))
            .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.path, "keys[0].sites[0]", "{e}");
        let e = parse(br#"{"keys":[{"id":"a"},"#).unwrap_err().to_string();
        assert!(e.starts_with("invalid JSON"), "{e}");
    }

    #[test]
    fn escaped_strings_parse_too() {
        let l = parse(doc(&format!(r#"{{"id":"a\u0041","hash":"{H1}","owner":"o"}}"#)).as_bytes())
            .unwrap();
        assert_eq!(keys(&l)[0].id, "aA");
    }
}

#[cfg(test)]
mod chunked {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = r#"{"version":"v","owners":{"o":{}},"plans":{"p":{"rate_limits":[{"limit":1,"window_s":2}]}},"keys":[
      {"id":"a","hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","owner":"o","plan":"p","scopes":["x:*","y"]},
      {"id":"b\u0041","hash":"60303AE22B998861BCE3B28F33EEC1BE758A213C86C93C076DBE9F558C11C752","owner":"q","sites":["1"],"allowed_ips":["10.0.0.0/8"],"expires_at":5}]}"#;

    fn answer(doc: &[u8], chunk: usize) -> Result<(usize, Vec<Vec<u8>>), String> {
        read(&mut scan::Slice { data: doc, chunk }, doc.len())
            .map_err(|e| e.to_string())
            .map(|l| (l.len(), l.records().map(<[u8]>::to_vec).collect()))
    }

    #[test]
    fn chunk_sizes_do_not_change_the_answer() {
        let whole = answer(GOOD.as_bytes(), usize::MAX);
        assert_eq!(whole.as_ref().map(|(n, _)| *n), Ok(2));
        for chunk in [1, 7, 4096] {
            assert_eq!(answer(GOOD.as_bytes(), chunk), whole, "chunk {chunk}");
        }
    }

    /// Keys spread over lines, then one more: any error after them is placed by the lines
    /// counted inside keys read in place.
    const SPREAD: &str = "{\"owners\":{\"o\":{}},\"keys\":[ {\"id\":\"a\",\r\n \"hash\":\n\t\"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n,\"owner\":\"o\" }\n ,\n{ \"id\" : \"b\", \"hash\":\"60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752\",\"owner\":\"o\",\"scopes\":[\n\"x\"\n] } ,\n  {\"id\":\"c\",\"hash\":\"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\",\"owner\":\"o\",\"expires_at\":7}\n]\n}\n";

    /// Keys read in place (one chunk) and split first (one-byte chunks: no key is ever whole
    /// in a chunk) give the same answer and error text, whatever byte is changed.
    #[test]
    fn keys_read_in_place_answer_as_keys_split_first() {
        for doc in [GOOD, SPREAD] {
            let whole = answer(doc.as_bytes(), usize::MAX);
            assert_eq!(
                whole.as_ref().map(|(n, _)| *n).ok(),
                Some(2 + usize::from(doc == SPREAD))
            );
            assert_eq!(answer(doc.as_bytes(), 1), whole);
            for at in 0..doc.len() {
                for b in [
                    b'"', b',', b'}', b']', b'{', b'[', b'\\', b' ', b'\n', b'0', b'x', b':', 0xff,
                ] {
                    let mut m = doc.as_bytes().to_vec();
                    m[at] = b;
                    assert_eq!(
                        answer(&m, usize::MAX),
                        answer(&m, 1),
                        "{:?}",
                        String::from_utf8_lossy(&m)
                    );
                }
                let cut = &doc.as_bytes()[..at];
                assert_eq!(answer(cut, usize::MAX), answer(cut, 1));
            }
        }
    }

    proptest! {
        #[test]
        fn truncated_and_mangled_documents_never_panic(
            cut in 0..GOOD.len(),
            flip in 0..GOOD.len(),
            byte in any::<u8>(),
            chunk in 1usize..64,
        ) {
            let mut doc = GOOD.as_bytes()[..cut.max(flip + 1).min(GOOD.len())].to_vec();
            let at = flip.min(doc.len() - 1);
            doc[at] = byte;
            // Whatever the chunks, the same answer as in one piece (and no panic).
            prop_assert_eq!(answer(&doc, chunk), answer(&doc, usize::MAX));
            let truncated = &GOOD.as_bytes()[..cut];
            prop_assert_eq!(answer(truncated, chunk), answer(truncated, usize::MAX));
        }

        #[test]
        fn garbage_never_panics(doc in proptest::collection::vec(
            prop_oneof![Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b'"'), Just(b'\\'),
                        Just(b','), Just(b':'), Just(b' '), Just(b'\n'), Just(b'k'), any::<u8>()], 0..200),
            chunk in 1usize..16,
        ) {
            let mut with_keys = br#"{"keys":["#.to_vec();
            with_keys.extend_from_slice(&doc);
            prop_assert_eq!(answer(&with_keys, chunk), answer(&with_keys, usize::MAX));
            prop_assert_eq!(answer(&doc, chunk), answer(&doc, usize::MAX));
        }
    }
}
