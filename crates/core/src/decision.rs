//! The ordered decisions of SPEC §3 for one request. Pure: the request's headers and source
//! address in, an `Outcome` out (a local reply, or the edits to make before going upstream).
//! Shared state is reached only through `SharedStore`.

use crate::bucket_cache::BucketCache;
use crate::client_ip;
use crate::config::{Config, ExemptRule, FailureMode, KeyListSource, Limit, SiteSource};
use crate::counters;
use crate::credential::{self, Location};
use crate::path;
use crate::publish;
use crate::ratelimit::{self, Counted};
use crate::record::{self, Found, Located, Record};
use crate::response::{render_template, Class, RateContext};
use crate::rls;
use crate::shared::{self, SharedStore};
use sha2::{Digest, Sha256};
use std::cell::OnceCell;
use std::net::IpAddr;
use std::rc::Rc;

/// Keys longer than this are refused before hashing.
pub const MAX_KEY_BYTES: usize = 1024;

/// The worker's view of the published key list, refreshed from the meta record on ticks and
/// whenever a bucket says its layout moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListState {
    pub loaded: bool,
    /// The publish this view is of (see `publish::Meta`).
    pub generation: u64,
    pub bits: u8,
    pub fetched_at_s: u64,
}

impl ListState {
    pub fn from_meta(meta: Option<&publish::Meta>, source: &str) -> ListState {
        match meta {
            Some(m) if m.generation > 0 && m.source == source => ListState {
                loaded: true,
                generation: m.generation,
                bits: m.bits,
                fetched_at_s: m.fetched_at_s,
            },
            _ => ListState::default(),
        }
    }
}

/// What happened to a request, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Allowed,
    Exempt,
    FailOpen,
    Whoami,
    Refused(Class),
    /// Shadow mode (`shadow`): the first refusal of a shadowed check, decided but not
    /// enforced; the request went on (upstream with identity when the key was valid, without
    /// it otherwise; keygate's own `whoami` answer when that is where it went).
    Shadow(Class),
}

impl Kind {
    /// Every decision's name, as the access log, `keygate test` and the docs write it:
    /// `allowed`, `exempt`, `fail_open`, `whoami`, a SPEC §4 class, or `shadow:<class>`.
    pub const NAMES: [&'static str; 18] = [
        "allowed",
        "exempt",
        "fail_open",
        "whoami",
        "missing_key",
        "invalid_key",
        "expired_key",
        "forbidden",
        "ip_denied",
        "rate_limited",
        "unavailable",
        "shadow:missing_key",
        "shadow:invalid_key",
        "shadow:expired_key",
        "shadow:forbidden",
        "shadow:ip_denied",
        "shadow:rate_limited",
        "shadow:unavailable",
    ];

    /// This decision's name (one of [`Kind::NAMES`]).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Allowed => "allowed",
            Kind::Exempt => "exempt",
            Kind::FailOpen => "fail_open",
            Kind::Whoami => "whoami",
            Kind::Refused(c) => c.name(),
            Kind::Shadow(c) => match c {
                Class::MissingKey => "shadow:missing_key",
                Class::InvalidKey => "shadow:invalid_key",
                Class::ExpiredKey => "shadow:expired_key",
                Class::Forbidden => "shadow:forbidden",
                Class::IpDenied => "shadow:ip_denied",
                Class::RateLimited => "shadow:rate_limited",
                Class::Unavailable => "shadow:unavailable",
            },
        }
    }
}

/// A response keygate sends itself instead of going upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub kind: Kind,
    /// The key's id once it is known (logs name keys by id only).
    pub key_id: Option<String>,
    pub reply: Option<Reply>,
    /// Request headers to remove before going upstream.
    pub remove_headers: Vec<String>,
    /// Request headers to set (replacing any value) before going upstream.
    pub set_headers: Vec<(String, String)>,
    /// A new `:path` (the credential's query parameter taken out).
    pub new_path: Option<String>,
    /// Headers to set on the upstream's response, replacing any of the same name (SPEC §4).
    pub response_headers: Vec<(String, String)>,
    /// Global mode only: this outcome (what the request gets if no limit is exceeded) waits
    /// for the Rate Limit Service; the filter sends `GlobalCheck::request` and hands the answer
    /// to `settle`. Always `None` in local mode.
    pub global: Option<Box<GlobalCheck>>,
}

impl Outcome {
    /// The request's headers after this outcome's edits, for writing them back in one call:
    /// removed and replaced names dropped, new values and the new `:path` added.
    pub fn edited_headers<'a>(
        &'a self,
        headers: &'a [(&'a str, &'a [u8])],
    ) -> Vec<(&'a str, &'a [u8])> {
        let replaced = |name: &str| {
            self.remove_headers.iter().any(|h| h == name)
                || self.set_headers.iter().any(|(h, _)| h == name)
                || (name == ":path" && self.new_path.is_some())
        };
        let mut out: Vec<(&str, &[u8])> = headers
            .iter()
            .filter(|(k, _)| !replaced(k))
            .copied()
            .collect();
        if let Some(path) = &self.new_path {
            out.push((":path", path.as_bytes()));
        }
        for (k, v) in &self.set_headers {
            out.push((k.as_str(), v.as_bytes()));
        }
        out
    }

    fn new(kind: Kind) -> Outcome {
        Outcome {
            kind,
            key_id: None,
            reply: None,
            remove_headers: Vec::new(),
            set_headers: Vec::new(),
            new_path: None,
            response_headers: Vec::new(),
            global: None,
        }
    }
}

/// Borrowed `(name, value)` pairs of owned headers, for a `Request`.
pub fn header_refs(headers: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect()
}

/// The request as the host hands it over: all headers (pseudo-headers included, names
/// lowercase, values as raw bytes) and the connection's source address, asked for only when a
/// rule needs the client IP (in a filter it is a host call that returns data, one of the dear ones).
pub struct Request<'a> {
    /// Borrowed from wherever the host's copy lives (in the filter: one buffer, parsed in place).
    pub headers: &'a [(&'a str, &'a [u8])],
    pub source: &'a dyn Fn() -> Option<IpAddr>,
}

impl<'a> Request<'a> {
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    }

    fn header_str(&self, name: &str) -> &'a str {
        self.header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("")
    }

    /// Every value of a header joined with commas, as HTTP allows for list headers (XFF).
    fn joined(&self, name: &str) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for (_, v) in self.headers.iter().filter(|(k, _)| *k == name) {
            match &mut out {
                None => out = Some(v.to_vec()),
                Some(o) => {
                    o.push(b',');
                    o.extend_from_slice(v);
                }
            }
        }
        out
    }
}

/// Builds the local reply of a refusal class.
pub fn refusal(
    cfg: &Config,
    class: Class,
    rate: Option<(RateContext, Vec<(String, String)>)>,
) -> Reply {
    let r = cfg.response(class);
    let (ctx, rate_headers) = rate.unwrap_or_default();
    let mut headers = vec![("content-type".to_string(), r.content_type.clone())];
    headers.extend(r.headers.iter().cloned());
    headers.extend(rate_headers);
    Reply {
        status: r.status,
        headers,
        body: r.render_body(&ctx),
    }
}

fn refused(cfg: &Config, class: Class) -> Outcome {
    let mut o = Outcome::new(Kind::Refused(class));
    o.reply = Some(refusal(cfg, class, None));
    o
}

/// Notes a refusal of `class` when its check is shadowed (the first one counts): true when the
/// request goes on, false when it must be refused.
fn shadow(cfg: &Config, shadowed: &mut Option<Class>, class: Class) -> bool {
    if !cfg.shadow.covers(class) {
        return false;
    }
    shadowed.get_or_insert(class);
    true
}

/// An outcome that lets the request on, marked as a shadowed refusal when there was one.
fn passed(mut o: Outcome, shadowed: Option<Class>) -> Outcome {
    if let Some(c) = shadowed {
        o.kind = Kind::Shadow(c);
    }
    o
}

/// A shadowed refusal of the key checks: upstream without identity (like `fail_open`).
fn keyless(cfg: &Config, req: &Request, found: Option<&Location>, class: Class) -> Outcome {
    let mut o = Outcome::new(Kind::Shadow(class));
    upstream_edits(cfg, &mut o, req, found);
    o
}

fn exempt_matches(rule: &ExemptRule, method: &str, norm_path: &str, req: &Request) -> bool {
    if rule.preflight
        && !(method == "OPTIONS"
            && req.header("origin").is_some()
            && req.header("access-control-request-method").is_some())
    {
        return false;
    }
    if rule.method.as_deref().is_some_and(|m| m != method) {
        return false;
    }
    rule.path.as_ref().is_none_or(|p| p.matches(norm_path))
}

/// A scope held by a key covers the one a route needs: equal, `*`, or `prefix:*`.
pub fn scope_covers(held: &str, needed: &str) -> bool {
    if held == "*" || held == needed {
        return true;
    }
    match held.strip_suffix('*') {
        Some(prefix) if prefix.ends_with(':') => needed.starts_with(prefix),
        _ => false,
    }
}

fn rate_context(counted: &Counted, now_s: u64) -> RateContext {
    let t = counted.tightest();
    RateContext {
        retry_after: if counted.allowed() {
            0
        } else {
            counted.retry_after(now_s)
        },
        limit: t.map_or(0, |s| s.limit),
        remaining: t.map_or(0, |s| s.remaining()),
        reset: t.map_or(0, |s| s.reset),
    }
}

/// Escapes a value for a JSON string when the template is JSON (ids may hold `"` or `\`).
fn template_value(v: &str, json: bool) -> String {
    if !json {
        return v.to_string();
    }
    let quoted = serde_json::to_string(v).unwrap_or_default();
    quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or("")
        .to_string()
}

/// The key's record from its bucket (this worker's copy when it has one of the live
/// generation); a `moved` bucket means the layout changed under us, so the list state is
/// re-read once.
fn lookup(
    store: &dyn SharedStore,
    list: &mut ListState,
    cache: &mut BucketCache,
    source: &KeyListSource,
    hash: &[u8; 32],
) -> Option<Rc<[u8]>> {
    for _ in 0..2 {
        let index = record::bucket_index(hash, list.bits);
        let (bucket, cached) = match cache.get(list.generation, list.bits, index) {
            Some(value) => (value, true),
            None => {
                let value: Rc<[u8]> = store
                    .get(&shared::key::bucket(list.bits, index))
                    .0
                    .unwrap_or_default()
                    .into();
                (value, false)
            }
        };
        match record::locate(&bucket, hash) {
            Located::Moved => {
                *list =
                    ListState::from_meta(publish::read_meta(store).as_ref(), &source.source_id());
                if !list.loaded {
                    return None;
                }
            }
            _ => {
                if !cached {
                    cache.put(list.generation, list.bits, index, Rc::clone(&bucket));
                }
                return Some(bucket);
            }
        }
    }
    None
}

/// Strips the credential and client-sent identity headers for a request going upstream.
fn upstream_edits(cfg: &Config, o: &mut Outcome, req: &Request, found: Option<&Location>) {
    for h in [&cfg.key_id_header, &cfg.owner_header]
        .into_iter()
        .flatten()
    {
        if req.header(h).is_some() && !o.set_headers.iter().any(|(k, _)| k == h) {
            o.remove_headers.push(h.clone());
        }
    }
    if !cfg.strip_credential {
        return;
    }
    match found {
        Some(Location::Header(h)) => o.remove_headers.push(h.clone()),
        Some(Location::Query(q)) => {
            o.new_path = Some(path::remove_query_param(req.header_str(":path"), q))
        }
        None => {}
    }
}

/// Decides a request with no bucket cache: every key lookup reads shared data.
pub fn decide(
    cfg: &Config,
    list: &mut ListState,
    store: &dyn SharedStore,
    req: &Request,
    now_s: u64,
) -> Outcome {
    decide_cached(cfg, list, &mut BucketCache::default(), store, req, now_s)
}

/// Decides a request (SPEC §3, in order), reading key buckets through this worker's `cache`.
pub fn decide_cached(
    cfg: &Config,
    list: &mut ListState,
    cache: &mut BucketCache,
    store: &dyn SharedStore,
    req: &Request,
    now_s: u64,
) -> Outcome {
    let method = req.header_str(":method");
    let (raw_path, query) = path::split_query(req.header_str(":path"));
    let norm_path = path::normalize_cow(raw_path);
    let credential = credential::find(&cfg.credentials, req.headers, query);

    // 2. Client IP and the global lists, before anything else (exempt requests included).
    let client = OnceCell::new();
    let ip = || {
        *client.get_or_init(|| {
            let xff = if cfg.xff_trusted_hops > 0 {
                req.joined("x-forwarded-for")
            } else {
                None
            };
            client_ip::client_ip((req.source)(), xff.as_deref(), cfg.xff_trusted_hops)
        })
    };
    let ip_ok = |set: &crate::ipset::IpSet| ip().is_some_and(|ip| set.contains(ip));
    let mut shadowed = None;
    if ((!cfg.ip_deny.is_empty() && ip_ok(&cfg.ip_deny))
        || (!cfg.ip_allow.is_empty() && !ip_ok(&cfg.ip_allow)))
        && !shadow(cfg, &mut shadowed, Class::IpDenied)
    {
        return refused(cfg, Class::IpDenied);
    }

    // 3. Exempt requests go upstream without identity.
    if cfg
        .exempt
        .iter()
        .any(|r| exempt_matches(r, method, &norm_path, req))
    {
        let mut o = Outcome::new(Kind::Exempt);
        upstream_edits(cfg, &mut o, req, credential.as_ref().map(|c| &c.location));
        return passed(o, shadowed);
    }

    // 4. A list must be loaded and fresh enough.
    let stale = |l: &ListState| {
        cfg.key_list.max_stale_s > 0
            && now_s.saturating_sub(l.fetched_at_s) > cfg.key_list.max_stale_s
    };
    if !list.loaded || stale(list) {
        // The worker's view is refreshed on ticks; before refusing, make sure it is current.
        *list = ListState::from_meta(
            publish::read_meta(store).as_ref(),
            &cfg.key_list.source_id(),
        );
    }
    if !list.loaded || stale(list) {
        let found = credential.as_ref().map(|c| &c.location);
        if cfg.key_list.fail_open {
            let mut o = Outcome::new(Kind::FailOpen);
            upstream_edits(cfg, &mut o, req, found);
            return passed(o, shadowed);
        }
        if shadow(cfg, &mut shadowed, Class::Unavailable) {
            return keyless(cfg, req, found, shadowed.unwrap_or(Class::Unavailable));
        }
        return refused(cfg, Class::Unavailable);
    }

    // 5. The credential.
    let Some(credential) = credential else {
        if shadow(cfg, &mut shadowed, Class::MissingKey) {
            return keyless(cfg, req, None, shadowed.unwrap_or(Class::MissingKey));
        }
        return refused(cfg, Class::MissingKey);
    };

    // 6. Too many failed attempts from this client: refuse before looking anything up.
    if let Some(limit) = &cfg.invalid_key_limit {
        if counters::ip_failures(store, ip(), limit, now_s) >= limit.limit
            && !shadow(cfg, &mut shadowed, Class::RateLimited)
        {
            let retry_after = ratelimit::failure_retry_after(limit, now_s);
            let ctx = RateContext {
                retry_after,
                limit: limit.limit,
                remaining: 0,
                reset: ratelimit::window_start(now_s, limit.window_s) + limit.window_s,
            };
            let mut o = Outcome::new(Kind::Refused(Class::RateLimited));
            o.reply = Some(refusal(
                cfg,
                Class::RateLimited,
                Some((ctx, vec![("retry-after".into(), retry_after.to_string())])),
            ));
            return o;
        }
    }

    // 7. Format, then the list. A credential given more than once (step 5) is never looked
    // up: it is an invalid key, counted like one.
    let key = &credential.key;
    let well_formed = !credential.ambiguous
        && key.len() <= MAX_KEY_BYTES
        && (cfg.key_prefixes.is_empty()
            || cfg
                .key_prefixes
                .iter()
                .any(|p| key.starts_with(p.as_bytes())));
    let bucket;
    let dict;
    let record = if well_formed {
        let (hash, memo) = match cache.hashes.get(key) {
            Some(hash) => (hash, true),
            None => (Sha256::digest(key).into(), false),
        };
        match lookup(store, list, cache, &cfg.key_list, &hash) {
            None if shadow(cfg, &mut shadowed, Class::Unavailable) => {
                let class = shadowed.unwrap_or(Class::Unavailable);
                return keyless(cfg, req, Some(&credential.location), class);
            }
            None => return refused(cfg, Class::Unavailable),
            Some(b) => {
                bucket = b;
                // This VM's copy of the bucket's dictionary (read only when it changed).
                dict = record::dictionary_for(store, &bucket);
                match dict.as_deref().map(|d| record::find(&bucket, &hash, d)) {
                    Some(Found::Key(r)) => {
                        // Only keys of the list are memoized: a flood of made-up keys does
                        // not push real ones out.
                        if !memo {
                            cache.hashes.put(key, hash);
                        }
                        Some(r)
                    }
                    _ => None,
                }
            }
        }
    } else {
        None
    };
    let Some(record) = record else {
        if let Some(limit) = &cfg.invalid_key_limit {
            counters::add_ip_failure(store, ip(), limit, now_s);
        }
        if shadow(cfg, &mut shadowed, Class::InvalidKey) {
            let class = shadowed.unwrap_or(Class::InvalidKey);
            return keyless(cfg, req, Some(&credential.location), class);
        }
        return refused(cfg, Class::InvalidKey);
    };
    decide_key(
        cfg,
        store,
        req,
        &record,
        &ip,
        &norm_path,
        method,
        &credential.location,
        now_s,
        shadowed,
    )
}

#[allow(clippy::too_many_arguments)]
fn decide_key(
    cfg: &Config,
    store: &dyn SharedStore,
    req: &Request,
    record: &Record,
    ip: &dyn Fn() -> Option<IpAddr>,
    norm_path: &str,
    method: &str,
    location: &Location,
    now_s: u64,
    mut shadowed: Option<Class>,
) -> Outcome {
    let with_id = |mut o: Outcome| {
        o.key_id = Some(record.id.to_string());
        o
    };
    // A refusal, unless its check is shadowed (then `None`: go on).
    let mut refuse = |class: Class, o: Outcome| {
        if shadow(cfg, &mut shadowed, class) {
            None
        } else {
            Some(with_id(o))
        }
    };

    // 8. Status, expiry, owner: a shadowed refusal goes upstream without identity.
    let invalid = if !record.active || record.expires_at.is_some_and(|t| now_s as i64 >= t) {
        Some(Class::ExpiredKey)
    } else if !record.owner_valid {
        Some(Class::InvalidKey)
    } else {
        None
    };
    if let Some(class) = invalid {
        if let Some(o) = refuse(class, refused(cfg, class)) {
            return o;
        }
        let class = shadowed.unwrap_or(class);
        return with_id(keyless(cfg, req, Some(location), class));
    }

    // 9. The key's own IP list.
    if !record.ip_allowed(ip) {
        if let Some(o) = refuse(Class::IpDenied, refused(cfg, Class::IpDenied)) {
            return o;
        }
    }

    // 10. Sites.
    if record.sites().next().is_some() {
        let site = match &cfg.site {
            Some(SiteSource::PathSegment(n)) => path::segment(norm_path, *n),
            Some(SiteSource::Header(h)) => req.header(h).and_then(|v| std::str::from_utf8(v).ok()),
            None => None,
        };
        if !site.is_some_and(|s| record.sites().any(|k| k == s)) {
            if let Some(o) = refuse(Class::Forbidden, refused(cfg, Class::Forbidden)) {
                return o;
            }
        }
    }

    // 11. Route scopes: the first matching rule decides.
    let rule = cfg.routes.find(method, norm_path);
    if let Some(needed) = rule.and_then(|r| r.scope.as_deref()) {
        if !record.scopes().any(|held| scope_covers(held, needed)) {
            if let Some(o) = refuse(Class::Forbidden, refused(cfg, Class::Forbidden)) {
                return o;
            }
        }
    }

    // 12. Rate limits: the key's effective limits and its owner's.
    let limits = record
        .limits()
        .unwrap_or_else(|| cfg.default_limits.clone());
    let owner_limits = record.owner_limits().unwrap_or_default();
    let allowed = || {
        passed(
            allowed_outcome(cfg, req, record, norm_path, method, location),
            shadowed,
        )
    };
    if limits.is_empty() && owner_limits.is_empty() {
        return with_id(allowed());
    }
    if cfg.global.is_some() {
        // Global mode: the filter asks the Rate Limit Service, then calls `settle`.
        let mut o = allowed();
        o.global = Some(Box::new(GlobalCheck {
            key_id: record.id.to_string(),
            owner: record.owner.to_string(),
            key_limits: limits,
            owner_limits,
        }));
        return with_id(o);
    }
    let counted = count_locally(
        store,
        record.id,
        &limits,
        record.owner,
        &owner_limits,
        now_s,
    );
    with_id(apply_counts(cfg, allowed, counted, now_s))
}

/// Counts a request against a key's limits and its owner's in this instance's shared data;
/// `None` when a shared counter could not be updated.
fn count_locally(
    store: &dyn SharedStore,
    key_id: &str,
    limits: &[Limit],
    owner: &str,
    owner_limits: &[Limit],
    now_s: u64,
) -> Option<Counted> {
    let mut counted = if limits.is_empty() {
        Counted { states: Vec::new() }
    } else {
        counters::count_key(store, key_id, limits, now_s)?
    };
    if !owner_limits.is_empty() {
        let owned = counters::count_owner(store, owner, owner_limits, now_s)?;
        counted.states.extend(owned.states);
    }
    Some(counted)
}

/// The outcome once every limit counted the request: `rate_limited` when one is exceeded,
/// else `allowed()` with the rate-limit headers of the tightest limit (`None`: a shared counter
/// could not be updated, refused rather than over-admitted). With `shadow.rate_limits` a refusal
/// is only recorded: `allowed()` marked `Kind::Shadow` (its first shadowed class), with the
/// rate-limit headers but no `Retry-After`.
fn apply_counts(
    cfg: &Config,
    allowed: impl FnOnce() -> Outcome,
    counted: Option<Counted>,
    now_s: u64,
) -> Outcome {
    let Some(counted) = counted else {
        if cfg.shadow.rate_limits {
            return shadowed_rate_limit(allowed(), Vec::new());
        }
        let mut o = Outcome::new(Kind::Refused(Class::RateLimited));
        let ctx = RateContext {
            retry_after: 1,
            ..Default::default()
        };
        o.reply = Some(refusal(
            cfg,
            Class::RateLimited,
            Some((ctx, vec![("retry-after".into(), "1".into())])),
        ));
        return o;
    };
    let mut rate_headers: Vec<(String, String)> = match counted.tightest() {
        Some(t) => ratelimit::headers(cfg.header_style, t, now_s)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        None => Vec::new(),
    };
    if !counted.allowed() {
        if cfg.shadow.rate_limits {
            return shadowed_rate_limit(allowed(), rate_headers);
        }
        let ctx = rate_context(&counted, now_s);
        rate_headers.push(("retry-after".into(), ctx.retry_after.to_string()));
        let mut o = Outcome::new(Kind::Refused(Class::RateLimited));
        o.reply = Some(refusal(cfg, Class::RateLimited, Some((ctx, rate_headers))));
        return o;
    }
    with_rate_headers(allowed(), rate_headers)
}

/// `o` (a request let on) after a shadowed `rate_limited`: marked `Kind::Shadow` unless an
/// earlier check was shadowed already (the first one is reported).
fn shadowed_rate_limit(mut o: Outcome, rate_headers: Vec<(String, String)>) -> Outcome {
    if !matches!(o.kind, Kind::Shadow(_)) {
        o.kind = Kind::Shadow(Class::RateLimited);
    }
    with_rate_headers(o, rate_headers)
}

/// Adds the rate-limit headers to the response of a request let on.
fn with_rate_headers(mut o: Outcome, rate_headers: Vec<(String, String)>) -> Outcome {
    match &mut o.reply {
        // The identity endpoint answers with the headers itself.
        Some(reply) => reply.headers.extend(rate_headers),
        None => o.response_headers = rate_headers,
    }
    o
}

/// What a request that passed every step gets: the identity endpoint's answer, or the edits
/// for going upstream (without rate-limit headers: `apply_counts` adds them).
fn allowed_outcome(
    cfg: &Config,
    req: &Request,
    record: &Record,
    norm_path: &str,
    method: &str,
    location: &Location,
) -> Outcome {
    // Identity endpoint: keygate answers it itself.
    if let Some(w) = cfg
        .whoami
        .as_ref()
        .filter(|w| w.path == norm_path && w.methods.iter().any(|m| m == method))
    {
        let json = w.content_type.contains("json");
        let body = render_template(&w.body, &RateContext::default())
            .replace("{owner}", &template_value(record.owner, json))
            .replace("{key_id}", &template_value(record.id, json));
        let mut o = Outcome::new(Kind::Whoami);
        o.reply = Some(Reply {
            status: w.status,
            headers: vec![("content-type".to_string(), w.content_type.clone())],
            body,
        });
        return o;
    }

    // 13. Allowed.
    let mut o = Outcome::new(Kind::Allowed);
    if let Some(h) = &cfg.key_id_header {
        o.set_headers.push((h.clone(), record.id.to_string()));
    }
    if let Some(h) = &cfg.owner_header {
        o.set_headers.push((h.clone(), record.owner.to_string()));
    }
    upstream_edits(cfg, &mut o, req, Some(location));
    o
}

/// Step 12 in global mode, waiting for the Rate Limit Service: the limits of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalCheck {
    pub key_id: String,
    pub owner: String,
    /// The key's effective limits.
    pub key_limits: Vec<Limit>,
    /// Its owner's limits (SPEC §2), shared by all of the owner's keys.
    pub owner_limits: Vec<Limit>,
}

impl GlobalCheck {
    /// The descriptors of this request (see `rls::descriptors`).
    pub fn descriptors(&self) -> Vec<rls::Descriptor<'_>> {
        rls::descriptors(
            &self.key_id,
            &self.key_limits,
            &self.owner,
            &self.owner_limits,
        )
    }

    /// The serialised `RateLimitRequest` to send.
    pub fn request(&self, domain: &str) -> Vec<u8> {
        rls::encode_request(domain, &self.descriptors())
    }
}

/// How the Rate Limit Service answered, as the host reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalAnswer<'a> {
    /// gRPC status OK with this serialised `RateLimitResponse`.
    Reply(&'a [u8]),
    /// The call timed out (gRPC `DEADLINE_EXCEEDED`).
    Timeout,
    /// The call could not start, or ended with any other gRPC status.
    Unavailable,
}

/// How a global-mode request was settled, counted in `keygate_global_calls_total` and `keygate_global_fallbacks_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalResult {
    /// The service answered.
    Answered,
    /// It failed this way, and the failure mode did this.
    Failed(GlobalFailure, FailureMode),
}

/// Why a call to the Rate Limit Service failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalFailure {
    Timeout,
    Unavailable,
    /// An answer that is not a well-formed `RateLimitResponse` for the descriptors sent.
    BadReply,
}

/// Finishes a request that `decide` left waiting for the Rate Limit Service (`pending.global`
/// set): the service's counts decide as local counts would; on failure `rate_limit.global.
/// failure_mode` applies (`local`: count in this instance's shared data). `sent_ms` and
/// `now_ms`: when the call went out and now, Unix milliseconds.
pub fn settle(
    cfg: &Config,
    store: &dyn SharedStore,
    mut pending: Outcome,
    answer: GlobalAnswer,
    sent_ms: u64,
    now_ms: u64,
) -> (Outcome, GlobalResult) {
    let now_s = now_ms / 1000;
    let Some(check) = pending.global.take() else {
        return (pending, GlobalResult::Answered);
    };
    let key_id = pending.key_id.take();
    let with_id = |mut o: Outcome| {
        o.key_id = key_id.clone();
        o
    };
    let failure = match answer {
        GlobalAnswer::Reply(bytes) => {
            match rls::decode_reply(bytes)
                .and_then(|r| rls::counted(&check.descriptors(), &r, sent_ms, now_ms))
            {
                Ok(counted) => {
                    let o = apply_counts(cfg, || pending, Some(counted), now_s);
                    return (with_id(o), GlobalResult::Answered);
                }
                Err(why) => {
                    log::warn!("keygate: bad reply from the rate limit service: {why}");
                    GlobalFailure::BadReply
                }
            }
        }
        GlobalAnswer::Timeout => GlobalFailure::Timeout,
        GlobalAnswer::Unavailable => GlobalFailure::Unavailable,
    };
    let mode = cfg
        .global
        .as_ref()
        .map_or(FailureMode::Local, |g| g.failure_mode);
    let o = match mode {
        FailureMode::Local => {
            let counted = count_locally(
                store,
                &check.key_id,
                &check.key_limits,
                &check.owner,
                &check.owner_limits,
                now_s,
            );
            apply_counts(cfg, || pending, counted, now_s)
        }
        FailureMode::Allow => pending,
        // Shadowed rate limits (or key checks, whose class `unavailable` is) let it on.
        FailureMode::Deny if cfg.shadow.rate_limits || cfg.shadow.covers(Class::Unavailable) => {
            let mut o = pending;
            if !matches!(o.kind, Kind::Shadow(_)) {
                o.kind = Kind::Shadow(Class::Unavailable);
            }
            o
        }
        FailureMode::Deny => refused(cfg, Class::Unavailable),
    };
    (with_id(o), GlobalResult::Failed(failure, mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edited_headers_apply_every_edit_once() {
        let mut o = Outcome::new(Kind::Allowed);
        o.remove_headers = vec!["x-api-key".into(), "x-api-key-owner".into()];
        o.set_headers = vec![("x-api-key-id".into(), "k1".into())];
        o.new_path = Some("/v1/things?a=1".into());
        let headers: Vec<(String, Vec<u8>)> = [
            (":method", "GET"),
            (":path", "/v1/things?a=1&api_key=secret"),
            ("x-api-key", "secret"),
            ("x-api-key-id", "spoofed"),
            ("x-api-key-id", "spoofed-again"),
            ("x-api-key-owner", "spoofed"),
            ("accept", "*/*"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        let refs = header_refs(&headers);
        let out: Vec<(&str, &str)> = o
            .edited_headers(&refs)
            .into_iter()
            .map(|(k, v)| (k, std::str::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(
            out,
            vec![
                (":method", "GET"),
                ("accept", "*/*"),
                (":path", "/v1/things?a=1"),
                ("x-api-key-id", "k1")
            ]
        );
    }

    fn whoami_setup() -> (Config, crate::shared::MemoryStore) {
        let cfg = crate::config::parse(
            br#"{"key_list":{"cluster":"k","path":"/"},
                 "whoami":{"path":"/api/v1/auth/me","body":"{\"id\":\"{owner}\"}"}}"#,
        )
        .unwrap();
        let hash: String = Sha256::digest(b"minds_abc")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut list = crate::keylist::parse(
            format!(r#"{{"keys":[{{"id":"k1","hash":"{hash}","owner":"550e\"8400"}}]}}"#)
                .as_bytes(),
        )
        .unwrap();
        let store = crate::shared::MemoryStore::default();
        crate::publish::Publisher::default().publish(
            &store,
            &mut list,
            None,
            &cfg.key_list.source_id(),
            100,
        );
        (cfg, store)
    }

    fn request(method: &str, path: &str, key: &str) -> Vec<(String, Vec<u8>)> {
        vec![
            (":method".into(), method.as_bytes().to_vec()),
            (":path".into(), path.as_bytes().to_vec()),
            ("authorization".into(), format!("Bearer {key}").into_bytes()),
        ]
    }

    #[test]
    fn whoami_answers_get_for_a_valid_key_only() {
        let (cfg, store) = whoami_setup();
        let mut list = ListState::from_meta(
            publish::read_meta(&store).as_ref(),
            &cfg.key_list.source_id(),
        );
        let run = |list: &mut ListState, m: &str, p: &str, k: &str| {
            let h = request(m, p, k);
            decide(
                &cfg,
                list,
                &store,
                &Request {
                    headers: &header_refs(&h),
                    source: &|| None,
                },
                100,
            )
        };
        let o = run(&mut list, "GET", "/api/v1/auth/me?x=1", "minds_abc");
        assert_eq!(o.kind, Kind::Whoami);
        let reply = o.reply.unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, r#"{"id":"550e\"8400"}"#)
        );
        assert_eq!(
            run(&mut list, "POST", "/api/v1/auth/me", "minds_abc").kind,
            Kind::Allowed
        );
        assert_eq!(
            run(&mut list, "GET", "/api/v1/auth/me/x", "minds_abc").kind,
            Kind::Allowed
        );
        assert_eq!(
            run(&mut list, "GET", "/api/v1/auth/me", "minds_nope").kind,
            Kind::Refused(Class::InvalidKey)
        );
    }

    #[test]
    fn the_bucket_cache_serves_one_generation_and_follows_the_view() {
        let (cfg, store) = whoami_setup();
        let source = cfg.key_list.source_id();
        let mut list = ListState::from_meta(publish::read_meta(&store).as_ref(), &source);
        let mut cache = BucketCache::default();
        let h = request("GET", "/x", "minds_abc");
        let hr = header_refs(&h);
        let req = Request {
            headers: &hr,
            source: &|| None,
        };
        let run = |list: &mut ListState, cache: &mut BucketCache| {
            decide_cached(&cfg, list, cache, &store, &req, 100).kind
        };
        assert_eq!(run(&mut list, &mut cache), Kind::Allowed);
        assert_eq!(cache.len(), 1, "the key's bucket is kept");

        // Revoke the key: same layout, so the bucket is rewritten in place.
        let hash: String = Sha256::digest(b"minds_abc")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut revoked = crate::keylist::parse(
            format!(r#"{{"keys":[{{"id":"k1","hash":"{hash}","owner":"o","status":"revoked"}}]}}"#)
                .as_bytes(),
        )
        .unwrap();
        crate::publish::Publisher::default().publish(&store, &mut revoked, None, &source, 101);
        // Until this worker's view moves to the new generation, its copy answers.
        assert_eq!(run(&mut list, &mut cache), Kind::Allowed);
        let mut fresh = ListState::from_meta(publish::read_meta(&store).as_ref(), &source);
        assert!(fresh.generation > list.generation);
        assert_eq!(
            run(&mut fresh, &mut cache),
            Kind::Refused(Class::ExpiredKey)
        );
        // Without a cache every lookup reads the store.
        assert_eq!(
            decide(&cfg, &mut list, &store, &req, 100).kind,
            Kind::Refused(Class::ExpiredKey)
        );
    }

    #[test]
    fn the_source_address_is_asked_for_only_when_a_rule_needs_it() {
        let (cfg, store) = whoami_setup();
        let asked = std::cell::Cell::new(0);
        let source = || {
            asked.set(asked.get() + 1);
            Some(IpAddr::from([127, 0, 0, 2]))
        };
        let h = request("GET", "/x", "minds_abc");
        let run = |cfg: &Config| {
            let mut list = ListState::from_meta(
                publish::read_meta(&store).as_ref(),
                &cfg.key_list.source_id(),
            );
            let hr = header_refs(&h);
            let req = Request {
                headers: &hr,
                source: &source,
            };
            decide(cfg, &mut list, &store, &req, 100).kind
        };
        assert_eq!(run(&cfg), Kind::Allowed);
        assert_eq!(asked.get(), 0, "no IP rule, no key IP list");

        let mut with_allow = cfg.clone();
        with_allow.ip_allow = crate::ipset::IpSet::parse(&["127.0.0.0/8"]).unwrap();
        with_allow.invalid_key_limit = Some(crate::config::Limit {
            limit: 5,
            window_s: 60,
        });
        assert_eq!(run(&with_allow), Kind::Allowed);
        assert_eq!(asked.get(), 1, "asked once, however many rules use it");
    }
}
