//! `keygate test`: decide one request offline with the filter's own decision code
//! (`keygate_core::decision::decide` over an in-memory shared store holding the published key
//! list), then say which rule decided. The explanation is recomputed here, after the decision,
//! from the same core matchers and the store, so the per-request path carries no extra work.

use crate::exit::{read_input, Failure};
use crate::json::Json;
use crate::newkey::{parse_duration_s, parse_instant, unix_now};
use crate::{print_json, say, sha256_hex, source, Output};
use clap::builder::PossibleValuesParser;
use clap::Args;
use keygate_core::config::{Config, CredentialSource, Limit, SiteSource};
use keygate_core::counters;
use keygate_core::credential::{self, Location};
use keygate_core::decision::{self, Kind, ListState, Outcome};
use keygate_core::publish::{self, Publisher};
use keygate_core::record::{self, Found};
use keygate_core::response::Class;
use keygate_core::shared::{self, MemoryStore, SharedStore};
use keygate_core::{client_ip, ipset::IpSet, path};
use serde_json::{json, Value};

/// The member `k` of a JSON object, or null.
fn at<'a>(v: &'a Value, k: &str) -> &'a Value {
    v.get(k).unwrap_or(&Value::Null)
}
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Every value `--expect` takes: the decisions' names ([`Kind::NAMES`]: the SPEC §4 classes,
/// the decisions that are not refusals and `shadow:<class>`), and `shadow` for any shadowed one.
pub fn classes() -> Vec<&'static str> {
    let mut all = Kind::NAMES.to_vec();
    all.push("shadow");
    all
}
/// Largest preset count `--count` accepts.
const MAX_PRESET: u64 = 10_000_000;

pub const AFTER_HELP: &str = "\
The decision class is one of: allowed, exempt, whoami, fail_open (the request goes upstream),
a refusal: missing_key, invalid_key, expired_key, forbidden, ip_denied, rate_limited,
unavailable, or shadow:<refusal> when shadow mode let that refusal through (--expect shadow
matches any of those). `rule` names what decided: the IP list entry (or that none matched), the exempt
rule, the key list's state, the credential sources, the failed-attempt count, the key's status
or expiry, its owner, its IP list, the site, the route and scope, the limits and their counts.
--json prints {class, status, headers, body, rule, …}: status, headers and body of the local
reply for a refusal or whoami; for a request that goes upstream, status and body are null and
headers are the request headers set upstream ([name, value]; removed ones in
removed_headers, rate-limit headers added to the upstream's response in response_headers).

Exit status:
  0  a decision was made (and, with --expect, it is that class)
  1  --expect named another class; or the configuration, key list or an option value is invalid
  2  bad usage
  3  could not read the configuration, key list or key file";

/// The long help of the subcommand.
pub const TEST_LONG_ABOUT: &str = "\
Decide one request offline against a configuration and a key list, with the filter's own
decision code, and print the class, status, body and headers, and which rule decided.

The key list is published into an in-memory store as the filter does; counters start empty
(--count presets them). The key can be given in a header (-H 'x-api-key: …', visible in shell
history and `ps`) or read from --key-file (one line; `-`: stdin), which puts it where the
configuration's first credential source looks (header, with its scheme, or query parameter).";

#[derive(Args, Debug)]
pub struct TestArgs {
    /// The plugin configuration: JSON, an Envoy bootstrap (YAML/JSON) or an Istio WasmPlugin.
    #[arg(long, value_name = "FILE")]
    pub config: String,
    /// The key list; without it, no list is loaded (the filter answers unavailable, or lets the
    /// request through with key_list.fail_open).
    #[arg(long, value_name = "FILE")]
    pub keys: Option<String>,
    /// The request method.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// The request path, with its query string.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// The connection's source address (without it, the request has none).
    #[arg(long, value_name = "ADDR")]
    pub ip: Option<IpAddr>,
    /// A request header 'name: value' (repeatable; pseudo-headers such as ':authority: x' too).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Read the key from FILE (its first line; `-`: stdin) and send it in the first credential
    /// source of the configuration.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<String>,
    /// When the request is decided: RFC 3339, a date or Unix seconds (default now).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Preset a counter before deciding (repeatable): WINDOW=N, the key's counter of that
    /// window (60, 60s, 1m, 1h, 1d) already holds N requests in the current window; N alone,
    /// every counter of the key; owner:WINDOW=N and owner:N, the same for the key's owner
    /// (its rate_limits, shared by all of its keys); failures=N, failed attempts from the
    /// client IP (invalid_key_limit).
    #[arg(long = "count", value_name = "SPEC")]
    pub counts: Vec<String>,
    /// Seconds since the key list was last fetched (for key_list.max_stale_s).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub list_age: u64,
    /// Exit 1 unless the decision is this class.
    #[arg(long, value_name = "CLASS", value_parser = PossibleValuesParser::new(classes()))]
    pub expect: Option<String>,
    #[command(flatten)]
    pub output: Output,
}

/// `--count` presets of one counter set (the key's, or its owner's).
#[derive(Debug, Default, Clone)]
struct Preset {
    /// Window (seconds) → count.
    windows: BTreeMap<u64, u64>,
    /// Every window of the set.
    all: Option<u64>,
}

impl Preset {
    fn is_empty(&self) -> bool {
        self.all.is_none() && self.windows.is_empty()
    }

    /// Window (seconds) → count to preset, given the windows of the limits in force.
    fn targets(&self, limits: &[Limit]) -> BTreeMap<u64, u64> {
        let mut targets = self.windows.clone();
        if let Some(n) = self.all {
            for l in limits {
                targets.entry(l.window_s).or_insert(n);
            }
        }
        targets
    }
}

/// Every `--count` preset.
#[derive(Debug, Default)]
struct Presets {
    key: Preset,
    owner: Preset,
    failures: Option<u64>,
}

fn parse_counts(specs: &[String]) -> Result<Presets, Failure> {
    let mut p = Presets::default();
    for s in specs {
        let bad = || {
            Failure::Usage(format!(
                "--count: {s:?} is not WINDOW=N (e.g. 60s=59, 1h=999), N, owner:WINDOW=N, owner:N or failures=N (N at most {MAX_PRESET})"
            ))
        };
        let n = |v: &str| {
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= MAX_PRESET)
                .ok_or_else(bad)
        };
        let (owner, spec) = match s.strip_prefix("owner:") {
            Some(rest) => (true, rest),
            None => (false, s.as_str()),
        };
        match spec.split_once('=') {
            Some(("failures", v)) if !owner => p.failures = Some(n(v)?),
            split => {
                let set = if owner { &mut p.owner } else { &mut p.key };
                match split {
                    None => set.all = Some(n(spec)?),
                    Some((w, v)) => {
                        let w = parse_duration_s(w).filter(|w| *w > 0).ok_or_else(bad)?;
                        set.windows.insert(w as u64, n(v)?);
                    }
                }
            }
        }
    }
    Ok(p)
}

/// `name: value` (a pseudo-header keeps its leading colon).
fn parse_header(h: &str) -> Result<(String, Vec<u8>), Failure> {
    let (name, value) = match h.strip_prefix(':') {
        Some(rest) => rest.split_once(':').map(|(n, v)| (format!(":{n}"), v)),
        None => h.split_once(':').map(|(n, v)| (n.to_string(), v)),
    }
    .ok_or_else(|| Failure::Usage(format!("-H: {h:?} is not 'name: value'")))?;
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty() || name == ":" {
        return Err(Failure::Usage(format!("-H: {h:?} has no header name")));
    }
    Ok((name, value.trim_start().as_bytes().to_vec()))
}

fn percent_encode(b: &[u8]) -> String {
    let mut out = String::new();
    for c in b {
        if c.is_ascii_alphanumeric() || b"-._~".contains(c) {
            out.push(*c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The request as the host would hand it over.
fn build_request(a: &TestArgs, cfg: &Config) -> Result<Vec<(String, Vec<u8>)>, Failure> {
    let mut path = a.path.clone();
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    for h in &a.headers {
        headers.push(parse_header(h)?);
    }
    if let Some(file) = &a.key_file {
        let key = crate::hash::read_keys(file)?
            .into_iter()
            .next()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Failure::Invalid(format!("{file}: no key on its first line")))?;
        match cfg.credentials.first() {
            Some(CredentialSource::Header { name, scheme }) => {
                let mut v = scheme
                    .as_ref()
                    .map(|s| format!("{s} ").into_bytes())
                    .unwrap_or_default();
                v.extend_from_slice(&key);
                headers.push((name.clone(), v));
            }
            Some(CredentialSource::Query { name }) => {
                let sep = if path.contains('?') { '&' } else { '?' };
                path = format!(
                    "{path}{sep}{}={}",
                    percent_encode(name.as_bytes()),
                    percent_encode(&key)
                );
            }
            None => {}
        }
    }
    let mut all = vec![
        (":method".to_string(), a.method.as_bytes().to_vec()),
        (":path".to_string(), path.into_bytes()),
    ];
    // A -H of a pseudo-header replaces the default.
    all.retain(|(k, _)| !headers.iter().any(|(h, _)| h == k));
    all.extend(headers);
    Ok(all)
}

/// The key's record as the filter reads it from the published buckets.
fn lookup<'a>(
    store: &MemoryStore,
    hash: &[u8; 32],
    buf: &'a mut Vec<u8>,
    dict: &'a mut Option<std::rc::Rc<keygate_core::dictionary::Dictionary>>,
) -> Option<keygate_core::record::Record<'a>> {
    let meta = publish::read_meta(store)?;
    *buf = store
        .get(&shared::key::bucket(
            meta.bits,
            record::bucket_index(hash, meta.bits),
        ))
        .0?;
    *dict = keygate_core::record::dictionary_for(store, buf);
    match record::find(buf, hash, dict.as_deref()?) {
        Found::Key(r) => Some(r),
        _ => None,
    }
}

/// What the explanation needs to know about the key presented.
struct KeyView {
    id: String,
    owner: String,
    active: bool,
    owner_valid: bool,
    expires_at: Option<i64>,
    sites: Vec<String>,
    scopes: Vec<String>,
    /// The key's own or plan limits (`None`: the configured default).
    limits: Option<Vec<Limit>>,
    /// Its owner's `rate_limits` (SPEC §2), counted across all of the owner's keys.
    owner_limits: Vec<Limit>,
    /// As written in the key list.
    raw: Option<Json>,
}

fn key_view(store: &MemoryStore, hash: &[u8; 32], doc: Option<&Json>) -> Option<KeyView> {
    let mut buf = Vec::new();
    let mut dict = None;
    let r = lookup(store, hash, &mut buf, &mut dict)?;
    let hex = sha256_hex_of_hash(hash);
    let raw = doc.and_then(|d| match d.get("keys") {
        Some(Json::Array(keys)) => keys
            .iter()
            .find(|k| {
                k.get("hash")
                    .and_then(Json::as_str)
                    .is_some_and(|h| h.eq_ignore_ascii_case(&hex))
            })
            .cloned(),
        _ => None,
    });
    Some(KeyView {
        id: r.id.to_string(),
        owner: r.owner.to_string(),
        active: r.active,
        owner_valid: r.owner_valid,
        expires_at: r.expires_at,
        sites: r.sites().map(str::to_string).collect(),
        scopes: r.scopes().map(str::to_string).collect(),
        limits: r.limits(),
        owner_limits: r.owner_limits().unwrap_or_default(),
        raw,
    })
}

fn sha256_hex_of_hash(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

fn effective_limits(cfg: &Config, k: &KeyView) -> (Vec<Limit>, String) {
    match &k.limits {
        Some(l) => {
            let own = k
                .raw
                .as_ref()
                .is_none_or(|r| r.get("rate_limits").is_some());
            let plan = k
                .raw
                .as_ref()
                .and_then(|r| r.get("plan"))
                .and_then(Json::as_str);
            let from = match (own, plan) {
                (false, Some(p)) => format!("plan {p:?}"),
                _ => "the key's rate_limits".to_string(),
            };
            (l.clone(), from)
        }
        None => (cfg.default_limits.clone(), "rate_limit.default".to_string()),
    }
}

/// Presets a set of counters (`count`: the key's or the owner's): window `w` ends up holding
/// `target(w)` requests. Counting a request writes only the windows it is given, so the windows
/// are counted from the largest target down, each phase including every window counted so far.
fn preset(targets: &BTreeMap<u64, u64>, count: impl Fn(&[Limit])) {
    let mut order: Vec<(u64, u64)> = targets.iter().map(|(w, n)| (*w, *n)).collect();
    order.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let mut limits: Vec<Limit> = Vec::new();
    for (i, (w, n)) in order.iter().enumerate() {
        limits.push(Limit {
            limit: u64::from(u32::MAX),
            window_s: *w,
        });
        let next = order.get(i + 1).map_or(0, |(_, n)| *n);
        for _ in next..*n {
            count(&limits);
        }
    }
}

/// The key's limits and, after them, its owner's, with their counts as the decision left them
/// (each entry: limit, window_s, count, remaining, reset, exceeded, and `of`: "key" or "owner").
fn limits_json(store: &MemoryStore, k: &KeyView, limits: &[Limit], now: u64) -> Vec<Value> {
    // Counting once more reads the stored counts (this store is thrown away afterwards).
    let key = (!limits.is_empty())
        .then(|| counters::count_key(store, &k.id, limits, now))
        .flatten();
    let owner = (!k.owner_limits.is_empty())
        .then(|| counters::count_owner(store, &k.owner, &k.owner_limits, now))
        .flatten();
    let of = |c: Option<keygate_core::ratelimit::Counted>, name: &'static str| {
        c.map(|c| c.states)
            .unwrap_or_default()
            .into_iter()
            .map(move |s| {
                let count = s.count.saturating_sub(1);
                json!({
                    "of": name, "limit": s.limit, "window_s": s.window_s, "count": count,
                    "remaining": s.limit.saturating_sub(count), "reset": s.reset,
                    "exceeded": count > s.limit,
                })
            })
    };
    of(key, "key").chain(of(owner, "owner")).collect()
}

fn limits_text(v: &[Value]) -> String {
    v.iter()
        .map(|l| {
            format!(
                "{}{}/{}s counted {}{}",
                if at(l, "of") == &json!("owner") {
                    "owner "
                } else {
                    ""
                },
                at(l, "limit"),
                at(l, "window_s"),
                at(l, "count"),
                if at(l, "exceeded") == &json!(true) {
                    " (exceeded)"
                } else {
                    ""
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn raw_at(raw: Option<&Json>, key: &str, i: usize) -> Value {
    match raw.and_then(|r| r.get(key)) {
        Some(Json::Array(a)) => a
            .get(i)
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

fn raw_strings(raw: Option<&Json>, key: &str) -> Vec<String> {
    match raw.and_then(|r| r.get(key)) {
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(Json::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

fn describe_sources(cfg: &Config) -> Vec<String> {
    cfg.credentials
        .iter()
        .map(|c| match c {
            CredentialSource::Header {
                name,
                scheme: Some(s),
            } => format!("header {name} (\"{s} <key>\")"),
            CredentialSource::Header { name, scheme: None } => format!("header {name}"),
            CredentialSource::Query { name } => format!("query parameter {name}"),
        })
        .collect()
}

/// Everything the explanation reads.
struct Scene<'a> {
    cfg: &'a Config,
    raw_cfg: Option<&'a Json>,
    store: &'a MemoryStore,
    headers: &'a [(String, Vec<u8>)],
    client: Option<IpAddr>,
    now: u64,
    list_loaded: bool,
    list_age: u64,
    key: Option<KeyView>,
    credential: Option<credential::Credential>,
}

impl Scene<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    fn header_str(&self, name: &str) -> &str {
        self.header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("")
    }

    fn ip_text(&self) -> String {
        self.client
            .map_or_else(|| "unknown".to_string(), |ip| ip.to_string())
    }

    /// The rule that decided, as JSON with a `text` for people.
    fn rule(&self, o: &Outcome) -> Value {
        let method = self.header_str(":method");
        let (raw_path, _) = path::split_query(self.header_str(":path"));
        let norm = path::normalize(raw_path);
        let ip = self.ip_text();
        match o.kind {
            // The refusal's own rule, marked as let through by `shadow`.
            Kind::Shadow(c) => {
                let mut rule = self.rule(&Outcome {
                    kind: Kind::Refused(c),
                    ..o.clone()
                });
                let text = format!(
                    "{} — shadow mode ({}) lets the request through",
                    at(&rule, "text").as_str().unwrap_or(""),
                    c.name()
                );
                if let Some(m) = rule.as_object_mut() {
                    m.insert("shadow".into(), json!(c.name()));
                    m.insert("text".into(), json!(text));
                }
                rule
            }
            Kind::Refused(Class::IpDenied) => self.ip_rule(o, &ip),
            Kind::Exempt => {
                let i = self.cfg.exempt.iter().position(|r| {
                    (!r.preflight
                        || (method == "OPTIONS"
                            && self.header("origin").is_some()
                            && self.header("access-control-request-method").is_some()))
                        && r.method.as_deref().is_none_or(|m| m == method)
                        && r.path.as_ref().is_none_or(|p| p.matches(&norm))
                });
                let rule = i.map_or(Value::Null, |i| raw_at(self.raw_cfg, "exempt", i));
                json!({"step": 3, "check": "exempt", "index": i, "exempt": rule,
                       "text": format!("exempt[{}] {} matches {method} {norm}: the request goes upstream without a key check",
                                       i.map_or("?".into(), |i| i.to_string()), rule)})
            }
            Kind::FailOpen | Kind::Refused(Class::Unavailable) if o.key_id.is_none() => {
                let kl = &self.cfg.key_list;
                let reason = if !self.list_loaded {
                    "no key list is loaded".to_string()
                } else {
                    format!(
                        "the key list was fetched {} s ago, more than key_list.max_stale_s ({} s)",
                        self.list_age, kl.max_stale_s
                    )
                };
                let then = if kl.fail_open {
                    "key_list.fail_open lets the request through without identity"
                } else {
                    "the filter answers unavailable"
                };
                json!({"step": 4, "check": "key_list", "loaded": self.list_loaded,
                       "list_age_s": self.list_age, "max_stale_s": kl.max_stale_s,
                       "fail_open": kl.fail_open, "text": format!("{reason}: {then}")})
            }
            Kind::Refused(Class::MissingKey) => {
                let sources = describe_sources(self.cfg);
                json!({"step": 5, "check": "credentials", "sources": sources,
                       "text": format!("no key in any credential source: {}", sources.join(", "))})
            }
            Kind::Refused(Class::RateLimited) if o.key_id.is_none() => {
                let limit = self.cfg.invalid_key_limit.unwrap_or(Limit {
                    limit: 0,
                    window_s: 1,
                });
                let failures = counters::ip_failures(self.store, self.client, &limit, self.now);
                json!({"step": 6, "check": "invalid_key_limit", "client_ip": ip,
                       "failures": failures, "limit": limit.limit, "window_s": limit.window_s,
                       "text": format!("{failures} failed attempts from {ip} in the current {} s window reached invalid_key_limit {}: refused before any lookup", limit.window_s, limit.limit)})
            }
            Kind::Refused(Class::InvalidKey) => self.invalid_rule(o),
            Kind::Refused(Class::ExpiredKey) => {
                let k = self.key.as_ref();
                let id = k.map_or("", |k| k.id.as_str());
                let status = k
                    .and_then(|k| k.raw.as_ref())
                    .and_then(|r| r.get("status"))
                    .and_then(Json::as_str)
                    .unwrap_or("active");
                match k {
                    Some(k) if !k.active => {
                        json!({"step": 8, "check": "status", "key_id": id, "status": status,
                        "text": format!("key {id:?} has status {status:?}, not active")})
                    }
                    _ => {
                        let at = k.and_then(|k| k.expires_at).unwrap_or(0);
                        json!({"step": 8, "check": "expires_at", "key_id": id,
                               "expires_at": keygate_core::time::format_rfc3339(at),
                               "text": format!("key {id:?} expired at {}", keygate_core::time::format_rfc3339(at))})
                    }
                }
            }
            Kind::Refused(Class::Forbidden) => self.forbidden_rule(&norm, method),
            Kind::Refused(Class::RateLimited) | Kind::Allowed | Kind::Whoami => {
                let Some(k) = &self.key else {
                    return json!({"check": "unknown", "text": "the key could not be read back"});
                };
                let (limits, from) = effective_limits(self.cfg, k);
                let counted = limits_json(self.store, k, &limits, self.now);
                let route = self.route(&norm, method);
                match o.kind {
                    Kind::Refused(_) => {
                        let owners = counted.iter().any(|l| {
                            at(l, "of") == &json!("owner") && at(l, "exceeded") == &json!(true)
                        });
                        let whose = if owners {
                            format!(
                                "its owner {:?} is over a limit (the owner's rate_limits)",
                                k.owner
                            )
                        } else {
                            format!("it is over a limit ({from})")
                        };
                        json!({"step": 12, "check": "rate_limits", "key_id": k.id, "owner": k.owner,
                            "limits_from": from, "limits": counted,
                            "text": format!("key {:?}: {whose}: {}", k.id, limits_text(&counted))})
                    }
                    Kind::Whoami => {
                        json!({"step": 13, "check": "whoami", "key_id": k.id, "owner": k.owner,
                        "path": self.cfg.whoami.as_ref().map(|w| w.path.clone()),
                        "limits_from": from, "limits": counted,
                        "text": format!("key {:?} (owner {:?}) is valid and the path is whoami's: keygate answers itself", k.id, k.owner)})
                    }
                    _ => {
                        let route_text = match &route {
                            Value::Null => "no route rule matches".to_string(),
                            r => format!(
                                "routes[{}] matches{}",
                                at(r, "index"),
                                at(r, "scope")
                                    .as_str()
                                    .map(|s| format!(" and the key holds scope {s:?}"))
                                    .unwrap_or_default()
                            ),
                        };
                        let limit_text = if counted.is_empty() {
                            "no rate limits".to_string()
                        } else {
                            format!("within its limits ({from}): {}", limits_text(&counted))
                        };
                        json!({"step": 13, "check": "allowed", "key_id": k.id, "owner": k.owner,
                               "route": route, "limits_from": from, "limits": counted,
                               "text": format!("key {:?} (owner {:?}) is valid; {route_text}; {limit_text}", k.id, k.owner)})
                    }
                }
            }
            Kind::FailOpen | Kind::Refused(Class::Unavailable) => {
                json!({"step": 7, "check": "key_list", "text": "the key's bucket could not be read"})
            }
        }
    }

    fn ip_rule(&self, o: &Outcome, ip: &str) -> Value {
        let cfg = self.cfg;
        let entry_in = |key: &str| -> Option<(usize, String)> {
            let client = self.client?;
            raw_strings(self.raw_cfg, key)
                .into_iter()
                .enumerate()
                .find(|(_, e)| IpSet::parse(&[e.as_str()]).is_ok_and(|s| s.contains(client)))
        };
        if o.key_id.is_none() {
            if !cfg.ip_deny.is_empty() && self.client.is_some_and(|c| cfg.ip_deny.contains(c)) {
                let (i, e) = entry_in("ip_deny").unwrap_or((0, String::new()));
                return json!({"step": 2, "check": "ip_deny", "client_ip": ip, "index": i, "entry": e,
                              "text": format!("client IP {ip} is in ip_deny[{i}] {e}")});
            }
            let n = raw_strings(self.raw_cfg, "ip_allow").len();
            return json!({"step": 2, "check": "ip_allow", "client_ip": ip, "entry": null,
                          "text": format!("client IP {ip} matches none of the {n} ip_allow entries")});
        }
        let k = self.key.as_ref();
        let entries = raw_strings(k.and_then(|k| k.raw.as_ref()), "allowed_ips");
        let id = k.map_or("", |k| k.id.as_str());
        json!({"step": 9, "check": "allowed_ips", "key_id": id, "client_ip": ip, "entries": entries,
               "text": format!("client IP {ip} is not in key {id:?}'s allowed_ips {entries:?}")})
    }

    fn invalid_rule(&self, o: &Outcome) -> Value {
        if let (Some(_), Some(k)) = (&o.key_id, self.key.as_ref().filter(|k| !k.owner_valid)) {
            return json!({"step": 8, "check": "owner", "key_id": k.id, "owner": k.owner,
                          "text": format!("key {:?}'s owner {:?} is missing from the list's owners or not active", k.id, k.owner)});
        }
        let Some(c) = &self.credential else {
            return json!({"step": 7, "check": "credential", "text": "the credential was refused"});
        };
        let (source, repeated) = match &c.location {
            Location::Header(h) => {
                let values: Vec<&[u8]> = self
                    .headers
                    .iter()
                    .filter(|(k, _)| k == h)
                    .map(|(_, v)| v.as_slice())
                    .collect();
                (
                    format!("header {h}"),
                    values.len() > 1 || values.iter().any(|v| v.contains(&b',')),
                )
            }
            Location::Query(q) => {
                let (_, query) = path::split_query(self.header_str(":path"));
                let n = query
                    .unwrap_or("")
                    .split('&')
                    .filter(|p| p.split('=').next() == Some(q.as_str()))
                    .count();
                (format!("query parameter {q}"), n > 1)
            }
        };
        let key = &c.key;
        let (reason, text) = if key.len() > decision::MAX_KEY_BYTES {
            (
                "too_long",
                format!(
                    "the key in {source} is {} bytes, over {}",
                    key.len(),
                    decision::MAX_KEY_BYTES
                ),
            )
        } else if !self.cfg.key_prefixes.is_empty()
            && !self
                .cfg
                .key_prefixes
                .iter()
                .any(|p| key.starts_with(p.as_bytes()))
        {
            (
                "prefix",
                format!(
                    "the key in {source} starts with none of key_prefixes {:?}",
                    self.cfg.key_prefixes
                ),
            )
        } else if self.key.is_none() {
            (
                "not_in_list",
                format!(
                    "no key in the list has the SHA-256 of the key in {source} ({})",
                    sha256_hex(key)
                ),
            )
        } else if repeated {
            (
                "ambiguous",
                format!("the credential is given more than once in {source}"),
            )
        } else {
            ("refused", format!("the key in {source} was refused"))
        };
        json!({"step": 7, "check": "credential", "reason": reason, "source": source,
               "counts_against": self.cfg.invalid_key_limit.is_some(), "text": text})
    }

    fn route(&self, norm: &str, method: &str) -> Value {
        let Some(r) = self.cfg.routes.find(method, norm) else {
            return Value::Null;
        };
        // Its index: the first rule as written that compiles to it.
        let index = match self.raw_cfg.and_then(|c| c.get("routes")) {
            Some(Json::Array(raw)) => raw.iter().position(|x| {
                let p = |k: &str| x.get(k).and_then(Json::as_str).map(path::normalize);
                let path_same = match &r.path {
                    keygate_core::config::PathMatch::Prefix(q) => {
                        p("path_prefix").as_ref() == Some(q)
                    }
                    keygate_core::config::PathMatch::Exact(q) => {
                        p("path_exact").as_ref() == Some(q)
                    }
                };
                let methods: Vec<String> = match x.get("methods") {
                    Some(Json::Array(m)) => m
                        .iter()
                        .filter_map(Json::as_str)
                        .map(str::to_ascii_uppercase)
                        .collect(),
                    _ => Vec::new(),
                };
                path_same
                    && methods == r.methods
                    && x.get("scope").and_then(Json::as_str) == r.scope.as_deref()
            }),
            _ => None,
        };
        json!({"index": index, "route": index.map_or(Value::Null, |i| raw_at(self.raw_cfg, "routes", i)),
               "scope": r.scope})
    }

    fn forbidden_rule(&self, norm: &str, method: &str) -> Value {
        let Some(k) = &self.key else {
            return json!({"check": "unknown", "text": "the key could not be read back"});
        };
        if !k.sites.is_empty() {
            let (site, from) = match &self.cfg.site {
                Some(SiteSource::PathSegment(n)) => (
                    path::segment(norm, *n).map(str::to_string),
                    format!("path segment {n}"),
                ),
                Some(SiteSource::Header(h)) => (self.header(h).map(text), format!("header {h}")),
                None => (None, "no site source configured".to_string()),
            };
            if !site.as_ref().is_some_and(|s| k.sites.contains(s)) {
                return json!({"step": 10, "check": "sites", "key_id": k.id, "site": site, "site_from": from,
                              "sites": k.sites,
                              "text": format!("the request's site ({from}: {}) is not one of key {:?}'s sites {:?}",
                                              site.as_deref().unwrap_or("none"), k.id, k.sites)});
            }
        }
        let route = self.route(norm, method);
        let scope = at(&route, "scope").as_str().unwrap_or("").to_string();
        json!({"step": 11, "check": "scope", "key_id": k.id, "route": route, "scope": scope,
               "key_scopes": k.scopes,
               "text": format!("routes[{}] {} needs scope {scope:?}; key {:?} holds {:?}",
                               at(&route, "index"), at(&route, "route"), k.id, k.scopes)})
    }
}

fn class_name(kind: Kind) -> &'static str {
    kind.name()
}

pub fn run(a: &TestArgs) -> Result<(), Failure> {
    let found = source::read_one(&a.config)?;
    let cfg = keygate_core::config::parse(&found.json).map_err(|e| {
        Failure::Invalid(if found.location.is_empty() {
            format!("{}: {e}", a.config)
        } else {
            format!("{}: {}: {e}", a.config, found.location)
        })
    })?;
    let now = match &a.at {
        None => unix_now(),
        Some(t) => parse_instant(t).ok_or_else(|| {
            Failure::Usage(format!(
                "--at: {t:?} is not RFC 3339, a date or Unix seconds"
            ))
        })?,
    };
    let now = u64::try_from(now)
        .map_err(|_| Failure::Usage("--at: the time is before 1970".to_string()))?;
    let presets = parse_counts(&a.counts)?;
    let store = MemoryStore::default();
    let source_id = cfg.key_list.source_id();
    let mut doc: Option<Json> = None;
    if let Some(keys) = &a.keys {
        let data = read_input(keys)?;
        let mut list = keygate_core::keylist::parse(&data)
            .map_err(|e| Failure::Invalid(format!("{keys}: {e}")))?;
        doc = serde_json::from_slice(&data).ok();
        Publisher::default().publish(
            &store,
            &mut list,
            None,
            &source_id,
            now.saturating_sub(a.list_age),
        );
    }
    let headers = build_request(a, &cfg)?;
    let (_, query) = path::split_query(
        headers
            .iter()
            .find(|(k, _)| k == ":path")
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .unwrap_or(""),
    );
    let credential = credential::find(&cfg.credentials, &decision::header_refs(&headers), query);
    let xff: Option<Vec<u8>> = {
        let parts: Vec<&[u8]> = headers
            .iter()
            .filter(|(k, _)| k == "x-forwarded-for")
            .map(|(_, v)| v.as_slice())
            .collect();
        (!parts.is_empty()).then(|| parts.join(&b","[..]))
    };
    let client = client_ip::client_ip(
        a.ip,
        if cfg.xff_trusted_hops > 0 {
            xff.as_deref()
        } else {
            None
        },
        cfg.xff_trusted_hops,
    );
    let key = credential.as_ref().and_then(|c| {
        use sha2::{Digest, Sha256};
        let hash: [u8; 32] = Sha256::digest(&c.key).into();
        key_view(&store, &hash, doc.as_ref())
    });

    // Presets.
    if let Some(n) = presets.failures {
        match &cfg.invalid_key_limit {
            Some(limit) => {
                for _ in 0..n {
                    counters::add_ip_failure(&store, client, limit, now);
                }
            }
            None => eprintln!("keygate test: note: --count failures={n} ignored: no invalid_key_limit is configured"),
        }
    }
    if !presets.key.is_empty() || !presets.owner.is_empty() {
        match &key {
            Some(k) => {
                let targets = presets.key.targets(&effective_limits(&cfg, k).0);
                preset(&targets, |l| {
                    counters::count_key(&store, &k.id, l, now);
                });
                let targets = presets.owner.targets(&k.owner_limits);
                preset(&targets, |l| {
                    counters::count_owner(&store, &k.owner, l, now);
                });
            }
            None => eprintln!("keygate test: note: the --count presets of the key and its owner are ignored: the request has no key of the list"),
        }
    }

    let mut list = ListState::from_meta(publish::read_meta(&store).as_ref(), &source_id);
    let source = a.ip;
    let header_refs = decision::header_refs(&headers);
    let req = decision::Request {
        headers: &header_refs,
        source: &move || source,
    };
    let outcome = decision::decide(&cfg, &mut list, &store, &req, now);

    let scene = Scene {
        cfg: &cfg,
        raw_cfg: found.value.as_ref(),
        store: &store,
        headers: &headers,
        client,
        now,
        list_loaded: a.keys.is_some(),
        list_age: a.list_age,
        key,
        credential,
    };
    let rule = scene.rule(&outcome);
    let class = class_name(outcome.kind);
    let pairs =
        |v: &[(String, String)]| -> Vec<Value> { v.iter().map(|(k, v)| json!([k, v])).collect() };
    let (status, headers_out, body) = match &outcome.reply {
        Some(r) => (json!(r.status), pairs(&r.headers), json!(r.body)),
        None => {
            let mut set = pairs(&outcome.set_headers);
            if let Some(p) = &outcome.new_path {
                set.insert(0, json!([":path", p]));
            }
            (Value::Null, set, Value::Null)
        }
    };
    let result = json!({
        "class": class,
        "status": status,
        "headers": headers_out,
        "body": body,
        "rule": rule,
        "key_id": outcome.key_id,
        "shadow": match outcome.kind {
            Kind::Shadow(c) => Some(c.name()),
            _ => None,
        },
        "removed_headers": outcome.remove_headers,
        "response_headers": pairs(&outcome.response_headers),
        "client_ip": client.map(|c| c.to_string()),
        "at": keygate_core::time::format_rfc3339(now as i64),
    });
    if a.output.json {
        print_json(&result)?;
    } else {
        let mut out = String::new();
        match &outcome.reply {
            Some(r) => out.push_str(&format!("decision: {class} ({})\n", r.status)),
            None => out.push_str(&format!("decision: {class} (the request goes upstream)\n")),
        }
        out.push_str(&format!(
            "rule: {}\n",
            at(&rule, "text").as_str().unwrap_or("")
        ));
        match &outcome.reply {
            Some(r) => {
                out.push_str(&format!("status: {}\nheaders:\n", r.status));
                for (k, v) in &r.headers {
                    out.push_str(&format!("  {k}: {v}\n"));
                }
                out.push_str(&format!("body: {}\n", r.body));
            }
            None => {
                out.push_str("upstream request:\n");
                if let Some(p) = &outcome.new_path {
                    out.push_str(&format!("  set :path: {p}\n"));
                }
                for (k, v) in &outcome.set_headers {
                    out.push_str(&format!("  set {k}: {v}\n"));
                }
                for k in &outcome.remove_headers {
                    out.push_str(&format!("  remove {k}\n"));
                }
                if !outcome.response_headers.is_empty() {
                    out.push_str("added to the upstream's response:\n");
                    for (k, v) in &outcome.response_headers {
                        out.push_str(&format!("  {k}: {v}\n"));
                    }
                }
            }
        }
        say(&out)?;
    }
    if let Some(want) = &a.expect {
        let shadowed = want == "shadow" && matches!(outcome.kind, Kind::Shadow(_));
        if want != class && !shadowed {
            eprintln!("keygate test: expected {want}, the decision is {class}");
            return Err(Failure::Reported);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let p = parse_counts(&[
            "59".into(),
            "1h=999".into(),
            "60=5".into(),
            "failures=3".into(),
            "owner:1m=7".into(),
            "owner:2".into(),
        ])
        .unwrap();
        assert_eq!(p.key.all, Some(59));
        assert_eq!(p.key.windows.get(&3600), Some(&999));
        assert_eq!(p.key.windows.get(&60), Some(&5));
        assert_eq!(p.failures, Some(3));
        assert_eq!(p.owner.windows.get(&60), Some(&7));
        assert_eq!(p.owner.all, Some(2));
        for bad in [
            "x",
            "0s=1",
            "1h=",
            "1h=-1",
            "99999999999",
            "owner:failures=1",
            "owner:",
        ] {
            assert!(parse_counts(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers() {
        assert_eq!(
            parse_header("X-Api-Key: abc").unwrap(),
            ("x-api-key".into(), b"abc".to_vec())
        );
        assert_eq!(
            parse_header(":authority: h:1").unwrap(),
            (":authority".into(), b"h:1".to_vec())
        );
        assert!(parse_header("nocolon").is_err());
    }

    #[test]
    fn presets_reach_every_target() {
        let store = MemoryStore::default();
        let targets: BTreeMap<u64, u64> = [(60, 5), (3600, 9), (86_400, 2)].into_iter().collect();
        preset(&targets, |l| {
            counters::count_key(&store, "k", l, 1_000_000);
        });
        let limits: Vec<Limit> = [60, 3600, 86_400]
            .iter()
            .map(|w| Limit {
                limit: 100,
                window_s: *w,
            })
            .collect();
        let c = counters::count_key(&store, "k", &limits, 1_000_000).unwrap();
        let counts: Vec<u64> = c.states.iter().map(|s| s.count).collect();
        assert_eq!(counts, vec![6, 10, 3]);
    }
}
