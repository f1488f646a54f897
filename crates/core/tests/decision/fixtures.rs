//! Shared fixtures of the decision tests: configurations, key lists, requests, assertions.

pub use keygate_core::config::Config;
pub use keygate_core::counters;
pub use keygate_core::decision::{decide, Kind, ListState, Outcome};
pub use keygate_core::publish::{self, Publisher};
pub use keygate_core::response::Class;
pub use keygate_core::shared::MemoryStore;
pub use serde_json::{json, Value};
pub use sha2::{Digest, Sha256};
pub use std::net::IpAddr;

/// A day boundary (2027-01-16T00:00:00Z), so every window that divides a day starts here.
pub const T0: u64 = 1_800_057_600;
/// "Now" for most tests: ten seconds into every aligned window.
pub const NOW: u64 = T0 + 10;

pub const KEY: &str = "ak_live_0001";
pub const KEY_ID: &str = "key_1";
pub const OWNER: &str = "org-1";

pub fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (a, b) => *a = b,
    }
}

/// A configuration: the two required fields plus `extra` merged over them.
pub fn config(extra: Value) -> Config {
    let mut v = json!({"key_list": {"cluster": "keyservice", "path": "/v1/keys"}});
    merge(&mut v, extra);
    keygate_core::config::parse(v.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("config {v} rejected: {e}"))
}

pub fn sha256_hex(s: &[u8]) -> String {
    Sha256::digest(s)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A key entry for `secret`, owned by `OWNER`, with `extra` fields merged in.
pub fn key_entry(id: &str, secret: &str, extra: Value) -> Value {
    let mut v = json!({"id": id, "hash": sha256_hex(secret.as_bytes()), "owner": OWNER});
    merge(&mut v, extra);
    v
}

/// The standard key (`KEY`, id `KEY_ID`) with `extra` fields.
pub fn the_key(extra: Value) -> Value {
    key_entry(KEY_ID, KEY, extra)
}

/// A key-list document: `top` (owners, plans, ...) plus `keys`.
pub fn doc(top: Value, keys: Vec<Value>) -> Value {
    let mut v = json!({"version": "test#1", "keys": keys});
    merge(&mut v, top);
    v
}

pub struct Gate {
    pub cfg: Config,
    pub store: MemoryStore,
    pub list: ListState,
}

impl Gate {
    /// No key list published yet.
    pub fn empty(cfg: Value) -> Gate {
        let cfg = config(cfg);
        let store = MemoryStore::default();
        counters::ensure_counter_slots(&store);
        let list = ListState::from_meta(
            publish::read_meta(&store).as_ref(),
            &cfg.key_list.source_id(),
        );
        Gate { cfg, store, list }
    }

    /// `document` published, fetched at `fetched_at_s`.
    pub fn fetched_at_s(cfg: Value, document: Value, fetched_at_s: u64) -> Gate {
        let mut g = Gate::empty(cfg);
        let mut list = keygate_core::keylist::parse(document.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("key list {document} rejected: {e}"));
        Publisher::default().publish(
            &g.store,
            &mut list,
            Some("\"etag-1\"".into()),
            &g.cfg.key_list.source_id(),
            fetched_at_s,
        );
        g.reload();
        assert!(g.list.loaded, "published list is not live");
        g
    }

    pub fn with_doc(cfg: Value, document: Value) -> Gate {
        Gate::fetched_at_s(cfg, document, NOW)
    }

    pub fn with_keys(cfg: Value, keys: Vec<Value>) -> Gate {
        Gate::with_doc(cfg, doc(json!({}), keys))
    }

    /// The standard key only.
    pub fn with_key(cfg: Value, extra: Value) -> Gate {
        Gate::with_keys(cfg, vec![the_key(extra)])
    }

    pub fn reload(&mut self) {
        self.list = ListState::from_meta(
            publish::read_meta(&self.store).as_ref(),
            &self.cfg.key_list.source_id(),
        );
    }

    pub fn run(&mut self, r: &Req) -> Outcome {
        self.run_at(r, NOW)
    }

    pub fn run_at(&mut self, r: &Req, now: u64) -> Outcome {
        let source = r.source;
        let headers = keygate_core::decision::header_refs(&r.headers);
        let req = keygate_core::decision::Request {
            headers: &headers,
            source: &move || source,
        };
        decide(&self.cfg, &mut self.list, &self.store, &req, now)
    }
}

#[derive(Clone, Debug)]
pub struct Req {
    pub headers: Vec<(String, Vec<u8>)>,
    pub source: Option<IpAddr>,
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("bad ip {s}"))
}

pub fn req(method: &str, path: &str) -> Req {
    Req {
        headers: vec![
            (":method".into(), method.as_bytes().to_vec()),
            (":path".into(), path.as_bytes().to_vec()),
            (":authority".into(), b"api.example.com".to_vec()),
        ],
        source: Some(ip("192.0.2.10")),
    }
}

pub fn get(path: &str) -> Req {
    req("GET", path)
}

impl Req {
    pub fn h(mut self, name: &str, value: impl AsRef<[u8]>) -> Req {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    pub fn key(self, k: &str) -> Req {
        self.h("x-api-key", k)
    }

    pub fn from(mut self, addr: &str) -> Req {
        self.source = Some(ip(addr));
        self
    }

    pub fn no_source(mut self) -> Req {
        self.source = None;
        self
    }
}

pub fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A header of the local reply.
pub fn reply_hdr<'a>(o: &'a Outcome, name: &str) -> Option<&'a str> {
    find(&o.reply.as_ref().expect("no reply").headers, name)
}

/// A header added to the upstream's response.
pub fn resp_hdr<'a>(o: &'a Outcome, name: &str) -> Option<&'a str> {
    find(&o.response_headers, name)
}

pub fn body(o: &Outcome) -> &str {
    &o.reply.as_ref().expect("no reply").body
}

pub fn status(o: &Outcome) -> u32 {
    o.reply.as_ref().expect("no reply").status
}

/// The request as it goes upstream: `remove_headers` taken out, `set_headers` replacing any
/// value, `new_path` as `:path`.
pub fn upstream(r: &Req, o: &Outcome) -> Vec<(String, Vec<u8>)> {
    assert!(o.reply.is_none(), "request did not go upstream: {o:?}");
    let mut h: Vec<(String, Vec<u8>)> = r
        .headers
        .iter()
        .filter(|(k, _)| !o.remove_headers.iter().any(|x| x.eq_ignore_ascii_case(k)))
        .cloned()
        .collect();
    for (k, v) in &o.set_headers {
        h.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
        h.push((k.to_ascii_lowercase(), v.as_bytes().to_vec()));
    }
    if let Some(p) = &o.new_path {
        h.retain(|(n, _)| n != ":path");
        h.push((":path".into(), p.as_bytes().to_vec()));
    }
    h
}

/// Every value of `name` in the upstream request.
pub fn up<'a>(h: &'a [(String, Vec<u8>)], name: &str) -> Vec<&'a str> {
    h.iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
        .collect()
}

pub fn up1(h: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    let v = up(h, name);
    assert!(
        v.len() <= 1,
        "{name} sent upstream {} times: {v:?}",
        v.len()
    );
    v.first().map(|s| s.to_string())
}

pub fn class(name: &str) -> Class {
    Class::from_name(name).unwrap_or_else(|| panic!("unknown class {name}"))
}

/// The SPEC §4 table.
pub fn default_of(name: &str) -> (u32, &'static str) {
    match name {
        "missing_key" => (
            401,
            r#"{"error":{"code":"missing_key","message":"API key is required"}}"#,
        ),
        "invalid_key" => (
            401,
            r#"{"error":{"code":"invalid_key","message":"Invalid API key"}}"#,
        ),
        "expired_key" => (
            401,
            r#"{"error":{"code":"expired_key","message":"API key expired or revoked"}}"#,
        ),
        "forbidden" => (
            403,
            r#"{"error":{"code":"forbidden","message":"API key has no access to this resource"}}"#,
        ),
        "ip_denied" => (
            403,
            r#"{"error":{"code":"ip_denied","message":"Client IP address not allowed"}}"#,
        ),
        "unavailable" => (
            503,
            r#"{"error":{"code":"unavailable","message":"API key list not loaded"}}"#,
        ),
        other => panic!("no fixed default body for {other}"),
    }
}

/// Refused with `name`, answering with the SPEC's default status, body and content type.
#[track_caller]
pub fn assert_refused(o: &Outcome, name: &str) {
    assert_eq!(o.kind, Kind::Refused(class(name)), "outcome: {o:?}");
    let reply = o.reply.as_ref().expect("refusal without reply");
    if name == "rate_limited" {
        assert_eq!(reply.status, 429, "outcome: {o:?}");
    } else {
        let (st, b) = default_of(name);
        assert_eq!(reply.status, st, "outcome: {o:?}");
        assert_eq!(reply.body, b, "outcome: {o:?}");
    }
    assert_eq!(reply_hdr(o, "content-type"), Some("application/json"));
}

/// The class only (for configurations that override responses).
#[track_caller]
pub fn assert_class(o: &Outcome, name: &str) {
    assert_eq!(o.kind, Kind::Refused(class(name)), "outcome: {o:?}");
    assert!(o.reply.is_some());
}

#[track_caller]
pub fn assert_allowed(o: &Outcome) {
    assert_eq!(o.kind, Kind::Allowed, "outcome: {o:?}");
    assert!(o.reply.is_none(), "allowed with a reply: {o:?}");
}

#[track_caller]
pub fn assert_exempt(o: &Outcome) {
    assert_eq!(o.kind, Kind::Exempt, "outcome: {o:?}");
    assert!(o.reply.is_none(), "exempt with a reply: {o:?}");
    assert!(o.set_headers.is_empty(), "exempt with identity: {o:?}");
    assert!(
        o.response_headers.is_empty(),
        "exempt with rate-limit headers: {o:?}"
    );
}

/// The default rate_limited body with `retry_after` substituted.
pub fn rate_limited_body(retry_after: u64) -> String {
    format!(
        r#"{{"error":{{"code":"rate_limited","message":"Rate limit exceeded","retry_after":{retry_after}}}}}"#
    )
}

pub fn x_ratelimit(o: &Outcome) -> (Option<&str>, Option<&str>, Option<&str>) {
    (
        resp_hdr(o, "x-ratelimit-limit"),
        resp_hdr(o, "x-ratelimit-remaining"),
        resp_hdr(o, "x-ratelimit-reset"),
    )
}

pub fn reply_x_ratelimit(o: &Outcome) -> (Option<&str>, Option<&str>, Option<&str>) {
    (
        reply_hdr(o, "x-ratelimit-limit"),
        reply_hdr(o, "x-ratelimit-remaining"),
        reply_hdr(o, "x-ratelimit-reset"),
    )
}

pub fn no_rate_headers(headers: &[(String, String)]) -> bool {
    !headers.iter().any(|(k, _)| {
        let k = k.to_ascii_lowercase();
        k.starts_with("x-ratelimit") || k == "ratelimit" || k == "ratelimit-policy"
    })
}

pub fn ts(t: u64) -> String {
    t.to_string()
}

/// `a` with `b` merged over it.
pub fn merge_v(mut a: Value, b: Value) -> Value {
    merge(&mut a, b);
    a
}

/// `invalid_key_limit` of `limit` failures a minute.
pub fn ikl(limit: u64) -> Value {
    json!({"invalid_key_limit": {"limit": limit, "window_s": 60}})
}
