//! The decisions of SPEC §3 and the responses of §4, driven natively through
//! `keygate::decision::decide`. Every expectation here comes from the SPEC text.

use keygate::config::Config;
use keygate::decision::{decide, Kind, ListState, Outcome};
use keygate::response::Class;
use keygate::shared::{self, MemoryStore, Publisher};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::net::IpAddr;

/// A day boundary (2027-01-16T00:00:00Z), so every window that divides a day starts here.
const T0: u64 = 1_800_057_600;
/// "Now" for most tests: ten seconds into every aligned window.
const NOW: u64 = T0 + 10;

const KEY: &str = "ak_live_0001";
const KEY_ID: &str = "key_1";
const OWNER: &str = "org-1";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn merge(base: &mut Value, extra: Value) {
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
fn config(extra: Value) -> Config {
    let mut v = json!({"key_list": {"cluster": "keyservice", "path": "/v1/keys"}});
    merge(&mut v, extra);
    keygate::config::parse(v.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("config {v} rejected: {e}"))
}

fn sha256_hex(s: &[u8]) -> String {
    Sha256::digest(s)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A key entry for `secret`, owned by `OWNER`, with `extra` fields merged in.
fn key_entry(id: &str, secret: &str, extra: Value) -> Value {
    let mut v = json!({"id": id, "hash": sha256_hex(secret.as_bytes()), "owner": OWNER});
    merge(&mut v, extra);
    v
}

/// The standard key (`KEY`, id `KEY_ID`) with `extra` fields.
fn the_key(extra: Value) -> Value {
    key_entry(KEY_ID, KEY, extra)
}

/// A key-list document: `top` (owners, plans, ...) plus `keys`.
fn doc(top: Value, keys: Vec<Value>) -> Value {
    let mut v = json!({"version": "test#1", "keys": keys});
    merge(&mut v, top);
    v
}

struct Gate {
    cfg: Config,
    store: MemoryStore,
    list: ListState,
}

impl Gate {
    /// No key list published yet.
    fn empty(cfg: Value) -> Gate {
        let cfg = config(cfg);
        let store = MemoryStore::default();
        shared::ensure_counter_slots(&store);
        let list = ListState::from_meta(
            shared::read_meta(&store).as_ref(),
            &cfg.key_list.source_id(),
        );
        Gate { cfg, store, list }
    }

    /// `document` published, fetched at `fetched_at`.
    fn fetched_at(cfg: Value, document: Value, fetched_at: u64) -> Gate {
        let mut g = Gate::empty(cfg);
        let list = keygate::keylist::parse(document.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("key list {document} rejected: {e}"));
        Publisher::default().publish(
            &g.store,
            &list,
            Some("\"etag-1\"".into()),
            &g.cfg.key_list.source_id(),
            fetched_at,
        );
        g.reload();
        assert!(g.list.loaded, "published list is not live");
        g
    }

    fn with_doc(cfg: Value, document: Value) -> Gate {
        Gate::fetched_at(cfg, document, NOW)
    }

    fn with_keys(cfg: Value, keys: Vec<Value>) -> Gate {
        Gate::with_doc(cfg, doc(json!({}), keys))
    }

    /// The standard key only.
    fn with_key(cfg: Value, extra: Value) -> Gate {
        Gate::with_keys(cfg, vec![the_key(extra)])
    }

    fn reload(&mut self) {
        self.list = ListState::from_meta(
            shared::read_meta(&self.store).as_ref(),
            &self.cfg.key_list.source_id(),
        );
    }

    fn run(&mut self, r: &Req) -> Outcome {
        self.run_at(r, NOW)
    }

    fn run_at(&mut self, r: &Req, now: u64) -> Outcome {
        let source = r.source;
        let headers = keygate::decision::header_refs(&r.headers);
        let req = keygate::decision::Request {
            headers: &headers,
            source: &move || source,
        };
        decide(&self.cfg, &mut self.list, &self.store, &req, now)
    }
}

#[derive(Clone, Debug)]
struct Req {
    headers: Vec<(String, Vec<u8>)>,
    source: Option<IpAddr>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("bad ip {s}"))
}

fn req(method: &str, path: &str) -> Req {
    Req {
        headers: vec![
            (":method".into(), method.as_bytes().to_vec()),
            (":path".into(), path.as_bytes().to_vec()),
            (":authority".into(), b"api.example.com".to_vec()),
        ],
        source: Some(ip("192.0.2.10")),
    }
}

fn get(path: &str) -> Req {
    req("GET", path)
}

impl Req {
    fn h(mut self, name: &str, value: impl AsRef<[u8]>) -> Req {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    fn key(self, k: &str) -> Req {
        self.h("x-api-key", k)
    }

    fn from(mut self, addr: &str) -> Req {
        self.source = Some(ip(addr));
        self
    }

    fn no_source(mut self) -> Req {
        self.source = None;
        self
    }
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A header of the local reply.
fn reply_hdr<'a>(o: &'a Outcome, name: &str) -> Option<&'a str> {
    find(&o.reply.as_ref().expect("no reply").headers, name)
}

/// A header added to the upstream's response.
fn resp_hdr<'a>(o: &'a Outcome, name: &str) -> Option<&'a str> {
    find(&o.response_headers, name)
}

fn body(o: &Outcome) -> &str {
    &o.reply.as_ref().expect("no reply").body
}

fn status(o: &Outcome) -> u32 {
    o.reply.as_ref().expect("no reply").status
}

/// The request as it goes upstream: `remove_headers` taken out, `set_headers` replacing any
/// value, `new_path` as `:path`.
fn upstream(r: &Req, o: &Outcome) -> Vec<(String, Vec<u8>)> {
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
fn up<'a>(h: &'a [(String, Vec<u8>)], name: &str) -> Vec<&'a str> {
    h.iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
        .collect()
}

fn up1(h: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    let v = up(h, name);
    assert!(
        v.len() <= 1,
        "{name} sent upstream {} times: {v:?}",
        v.len()
    );
    v.first().map(|s| s.to_string())
}

fn class(name: &str) -> Class {
    Class::from_name(name).unwrap_or_else(|| panic!("unknown class {name}"))
}

/// The SPEC §4 table.
fn default_of(name: &str) -> (u32, &'static str) {
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
fn assert_refused(o: &Outcome, name: &str) {
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
fn assert_class(o: &Outcome, name: &str) {
    assert_eq!(o.kind, Kind::Refused(class(name)), "outcome: {o:?}");
    assert!(o.reply.is_some());
}

#[track_caller]
fn assert_allowed(o: &Outcome) {
    assert_eq!(o.kind, Kind::Allowed, "outcome: {o:?}");
    assert!(o.reply.is_none(), "allowed with a reply: {o:?}");
}

#[track_caller]
fn assert_exempt(o: &Outcome) {
    assert_eq!(o.kind, Kind::Exempt, "outcome: {o:?}");
    assert!(o.reply.is_none(), "exempt with a reply: {o:?}");
    assert!(o.set_headers.is_empty(), "exempt with identity: {o:?}");
    assert!(
        o.response_headers.is_empty(),
        "exempt with rate-limit headers: {o:?}"
    );
}

/// The default rate_limited body with `retry_after` substituted.
fn rate_limited_body(retry_after: u64) -> String {
    format!(
        r#"{{"error":{{"code":"rate_limited","message":"Rate limit exceeded","retry_after":{retry_after}}}}}"#
    )
}

fn x_ratelimit(o: &Outcome) -> (Option<&str>, Option<&str>, Option<&str>) {
    (
        resp_hdr(o, "x-ratelimit-limit"),
        resp_hdr(o, "x-ratelimit-remaining"),
        resp_hdr(o, "x-ratelimit-reset"),
    )
}

fn reply_x_ratelimit(o: &Outcome) -> (Option<&str>, Option<&str>, Option<&str>) {
    (
        reply_hdr(o, "x-ratelimit-limit"),
        reply_hdr(o, "x-ratelimit-remaining"),
        reply_hdr(o, "x-ratelimit-reset"),
    )
}

fn no_rate_headers(headers: &[(String, String)]) -> bool {
    !headers.iter().any(|(k, _)| {
        let k = k.to_ascii_lowercase();
        k.starts_with("x-ratelimit") || k == "ratelimit" || k == "ratelimit-policy"
    })
}

fn ts(t: u64) -> String {
    t.to_string()
}

// ---------------------------------------------------------------------------------------------
// Step 1: identity headers sent by the client
// ---------------------------------------------------------------------------------------------

#[test]
fn step1_forged_identity_headers_are_replaced_on_allowed_requests() {
    let mut g = Gate::with_key(json!({}), json!({}));
    let r = get("/v1/x")
        .key(KEY)
        .h("x-api-key-id", "admin")
        .h("x-api-key-owner", "org-root");
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert_eq!(up(&h, "x-api-key-id"), vec![KEY_ID]);
    assert_eq!(up(&h, "x-api-key-owner"), vec![OWNER]);
}

#[test]
fn step1_forged_identity_headers_are_removed_on_exempt_requests() {
    let mut g = Gate::with_key(json!({"exempt": [{"path_prefix": "/public"}]}), json!({}));
    let r = get("/public/doc")
        .h("x-api-key-id", "admin")
        .h("x-api-key-owner", "org-root");
    let o = g.run(&r);
    assert_exempt(&o);
    let h = upstream(&r, &o);
    assert!(up(&h, "x-api-key-id").is_empty());
    assert!(up(&h, "x-api-key-owner").is_empty());
}

#[test]
fn step1_forged_identity_headers_are_removed_on_fail_open() {
    let mut g = Gate::empty(json!({"key_list": {"fail_open": true}}));
    let r = get("/v1/x")
        .key(KEY)
        .h("x-api-key-id", "admin")
        .h("x-api-key-owner", "org-root");
    let o = g.run(&r);
    assert_eq!(o.kind, Kind::FailOpen);
    assert!(o.reply.is_none());
    let h = upstream(&r, &o);
    assert!(up(&h, "x-api-key-id").is_empty());
    assert!(up(&h, "x-api-key-owner").is_empty());
}

#[test]
fn step1_configured_identity_header_names_are_scrubbed_and_set() {
    let cfg =
        json!({"upstream": {"key_id_header": "X-Consumer-Id", "owner_header": "x-consumer-org"}});
    let mut g = Gate::with_key(cfg, json!({}));
    let r = get("/v1/x")
        .key(KEY)
        .h("x-consumer-id", "forged")
        .h("x-consumer-org", "forged");
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert_eq!(up(&h, "x-consumer-id"), vec![KEY_ID]);
    assert_eq!(up(&h, "x-consumer-org"), vec![OWNER]);
    assert!(up(&h, "x-api-key-id").is_empty());
    assert!(up(&h, "x-api-key-owner").is_empty());
}

#[test]
fn step1_null_turns_an_identity_header_off() {
    let cfg = json!({"upstream": {"key_id_header": null}});
    let mut g = Gate::with_key(cfg, json!({}));
    let r = get("/v1/x").key(KEY);
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert!(up(&h, "x-api-key-id").is_empty());
    assert_eq!(up(&h, "x-api-key-owner"), vec![OWNER]);

    let cfg = json!({"upstream": {"key_id_header": null, "owner_header": null}});
    let mut g = Gate::with_key(cfg, json!({}));
    let o = g.run(&r);
    assert_allowed(&o);
    assert!(o.set_headers.is_empty(), "{o:?}");
}

// ---------------------------------------------------------------------------------------------
// Step 2: client IP and the global lists
// ---------------------------------------------------------------------------------------------

fn allow10() -> Value {
    json!({"ip_allow": ["10.0.0.0/8", "2001:db8::/32"], "ip_deny": ["10.6.6.0/24"]})
}

#[test]
fn step2_source_address_is_used_without_trusted_hops() {
    let mut g = Gate::with_key(allow10(), json!({}));
    assert_allowed(&g.run(&get("/x").key(KEY).from("10.1.2.3")));
    // XFF is ignored when no hop is trusted.
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "10.1.2.3");
    assert_refused(&g.run(&r), "ip_denied");
    let r = get("/x")
        .key(KEY)
        .from("10.1.2.3")
        .h("x-forwarded-for", "192.0.2.1");
    assert_allowed(&g.run(&r));
}

#[test]
fn step2_ip_allow_and_ip_deny() {
    let mut g = Gate::with_key(allow10(), json!({}));
    assert_refused(&g.run(&get("/x").key(KEY).from("11.0.0.1")), "ip_denied");
    assert_refused(&g.run(&get("/x").key(KEY).from("10.6.6.9")), "ip_denied");
    assert_allowed(&g.run(&get("/x").key(KEY).from("10.6.7.9")));
    assert_allowed(&g.run(&get("/x").key(KEY).from("2001:db8:1::5")));
    assert_refused(&g.run(&get("/x").key(KEY).from("2001:db9::5")), "ip_denied");
    // No address at all matches no allow list.
    assert_refused(&g.run(&get("/x").key(KEY).no_source()), "ip_denied");
}

#[test]
fn step2_ip_deny_alone_blocks_only_listed_addresses() {
    let mut g = Gate::with_key(
        json!({"ip_deny": ["198.51.100.0/24", "2001:db8::bad"]}),
        json!({}),
    );
    assert_refused(
        &g.run(&get("/x").key(KEY).from("198.51.100.7")),
        "ip_denied",
    );
    assert_refused(
        &g.run(&get("/x").key(KEY).from("2001:db8::bad")),
        "ip_denied",
    );
    assert_allowed(&g.run(&get("/x").key(KEY).from("198.51.101.7")));
    assert_allowed(&g.run(&get("/x").key(KEY).from("2001:db8::bae")));
}

#[test]
fn step2_ipv4_mapped_ipv6_counts_as_ipv4() {
    let mut g = Gate::with_key(allow10(), json!({}));
    assert_allowed(&g.run(&get("/x").key(KEY).from("::ffff:10.1.2.3")));
    assert_refused(
        &g.run(&get("/x").key(KEY).from("::ffff:10.6.6.6")),
        "ip_denied",
    );
    assert_refused(
        &g.run(&get("/x").key(KEY).from("::ffff:11.1.2.3")),
        "ip_denied",
    );
    // Through XFF too.
    let mut g = Gate::with_key(
        merge_v(allow10(), json!({"client_ip": {"xff_trusted_hops": 1}})),
        json!({}),
    );
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "::ffff:10.6.6.6");
    assert_refused(&g.run(&r), "ip_denied");
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "::ffff:10.1.1.1");
    assert_allowed(&g.run(&r));
}

fn merge_v(mut a: Value, b: Value) -> Value {
    merge(&mut a, b);
    a
}

fn hops(n: u32) -> Value {
    merge_v(allow10(), json!({"client_ip": {"xff_trusted_hops": n}}))
}

#[test]
fn step2_xff_one_trusted_hop_takes_the_rightmost_entry() {
    let mut g = Gate::with_key(hops(1), json!({}));
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "192.0.2.50, 10.0.0.5");
    assert_allowed(&g.run(&r));
    let r = get("/x")
        .key(KEY)
        .from("10.0.0.1")
        .h("x-forwarded-for", "10.0.0.5, 192.0.2.50");
    assert_refused(&g.run(&r), "ip_denied");
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "2001:db8::7");
    assert_allowed(&g.run(&r));
}

#[test]
fn step2_xff_nth_from_the_right() {
    let mut g = Gate::with_key(hops(2), json!({}));
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "192.0.2.99,10.0.0.5, 192.0.2.50");
    assert_allowed(&g.run(&r));
    let r = get("/x")
        .key(KEY)
        .from("10.0.0.1")
        .h("x-forwarded-for", "10.0.0.7, 192.0.2.99, 10.0.0.5");
    assert_refused(&g.run(&r), "ip_denied");
    let mut g = Gate::with_key(hops(3), json!({}));
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "10.0.0.7, 192.0.2.99, 192.0.2.98");
    assert_allowed(&g.run(&r));
}

#[test]
fn step2_xff_fallbacks_to_the_source_address() {
    let mut g = Gate::with_key(hops(2), json!({}));
    // Fewer entries than trusted hops.
    let r = get("/x")
        .key(KEY)
        .from("10.0.0.1")
        .h("x-forwarded-for", "192.0.2.50");
    assert_allowed(&g.run(&r));
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "10.0.0.5");
    assert_refused(&g.run(&r), "ip_denied");
    // No header at all.
    assert_allowed(&g.run(&get("/x").key(KEY).from("10.0.0.1")));
    assert_refused(&g.run(&get("/x").key(KEY).from("192.0.2.1")), "ip_denied");
    // The chosen entry is not an IP.
    let r = get("/x")
        .key(KEY)
        .from("10.0.0.1")
        .h("x-forwarded-for", "unknown, 192.0.2.50");
    assert_allowed(&g.run(&r));
    let r = get("/x")
        .key(KEY)
        .from("192.0.2.1")
        .h("x-forwarded-for", "garbage, 10.0.0.5");
    assert_refused(&g.run(&r), "ip_denied");
}

#[test]
fn step2_global_lists_apply_to_exempt_requests() {
    let cfg = merge_v(
        allow10(),
        json!({"exempt": [{"method": "GET", "path_exact": "/healthz"}]}),
    );
    let mut g = Gate::with_key(cfg, json!({}));
    assert_refused(&g.run(&get("/healthz").from("192.0.2.1")), "ip_denied");
    assert_refused(&g.run(&get("/healthz").from("10.6.6.1")), "ip_denied");
    assert_exempt(&g.run(&get("/healthz").from("10.1.1.1")));
}

#[test]
fn step2_comes_before_unavailable_and_missing_key() {
    let mut g = Gate::empty(allow10());
    assert_refused(&g.run(&get("/x").from("192.0.2.1")), "ip_denied");
    assert_refused(&g.run(&get("/x").from("10.1.1.1")), "unavailable");
    let mut g = Gate::with_key(allow10(), json!({}));
    assert_refused(&g.run(&get("/x").from("192.0.2.1")), "ip_denied");
    assert_refused(&g.run(&get("/x").from("10.1.1.1")), "missing_key");
}

// ---------------------------------------------------------------------------------------------
// Step 3: exempt requests
// ---------------------------------------------------------------------------------------------

fn exempt_cfg() -> Value {
    json!({"exempt": [
        {"preflight": true},
        {"path_prefix": "/swagger"},
        {"method": "GET", "path_exact": "/healthz"}
    ]})
}

#[test]
fn step3_preflight_needs_options_origin_and_request_method() {
    let mut g = Gate::with_key(exempt_cfg(), json!({}));
    let pre = req("OPTIONS", "/v1/contacts")
        .h("origin", "https://app.example.com")
        .h("access-control-request-method", "POST");
    assert_exempt(&g.run(&pre));
    let no_acrm = req("OPTIONS", "/v1/contacts").h("origin", "https://app.example.com");
    assert_refused(&g.run(&no_acrm), "missing_key");
    let no_origin = req("OPTIONS", "/v1/contacts").h("access-control-request-method", "POST");
    assert_refused(&g.run(&no_origin), "missing_key");
    let not_options = get("/v1/contacts")
        .h("origin", "https://app.example.com")
        .h("access-control-request-method", "POST");
    assert_refused(&g.run(&not_options), "missing_key");
    assert_refused(&g.run(&req("OPTIONS", "/v1/contacts")), "missing_key");
}

#[test]
fn step3_method_and_path_exact_must_both_match() {
    let mut g = Gate::with_key(exempt_cfg(), json!({}));
    assert_exempt(&g.run(&get("/healthz")));
    assert_exempt(&g.run(&get("/healthz?verbose=1")));
    assert_refused(&g.run(&req("POST", "/healthz")), "missing_key");
    assert_refused(&g.run(&get("/healthz/deep")), "missing_key");
    assert_refused(&g.run(&get("/healthzz")), "missing_key");
    assert_refused(&g.run(&get("/")), "missing_key");
}

#[test]
fn step3_path_prefix_matches_whole_segments() {
    let mut g = Gate::with_key(exempt_cfg(), json!({}));
    for p in [
        "/swagger",
        "/swagger/",
        "/swagger/ui",
        "/swagger/ui/index.html",
        "/swagger?x=1",
    ] {
        assert_exempt(&g.run(&get(p)));
        assert_exempt(&g.run(&req("POST", p)));
    }
    for p in ["/swaggerx", "/swagger-ui", "/api/swagger", "/"] {
        assert_refused(&g.run(&get(p)), "missing_key");
    }
}

#[test]
fn step3_path_normalisation_cannot_smuggle_past_or_into_exempt() {
    let mut g = Gate::with_key(exempt_cfg(), json!({}));
    for p in [
        "/swagger/../admin",
        "/swagger/%2e%2e/admin",
        "/swagger/%2E%2E/admin",
        "/swagger%2F..%2Fadmin",
        "/swagger%2f%2e%2e%2fadmin",
        "/swagger\\..\\admin",
        "/swagger%5C..%5Cadmin",
        "/swagger/./../admin",
        "/swagger/ui/../../admin",
        "/healthz/..",
    ] {
        assert_refused(&g.run(&get(p)), "missing_key");
    }
    for p in [
        "//swagger",
        "/./swagger/ui",
        "/admin/../swagger",
        "/api/%2e%2e/swagger/ui",
        "/api%2F..%2Fswagger",
        "\\swagger\\ui",
        "/swagger//ui",
        "//healthz",
        "/x/../healthz",
        "/../swagger",
    ] {
        assert_exempt(&g.run(&get(p)));
    }
}

#[test]
fn step3_exempt_skips_list_check_identity_and_rate_limits() {
    let cfg = merge_v(
        exempt_cfg(),
        json!({"rate_limit": {"default": [{"limit": 60, "window_s": 60}]}}),
    );
    // No list loaded: still exempt.
    let mut g = Gate::empty(cfg.clone());
    assert_exempt(&g.run(&get("/swagger/ui")));
    // With a key of limit 1: exempt requests do not count.
    let mut g = Gate::with_key(cfg, json!({"rate_limits": [{"limit": 1, "window_s": 60}]}));
    for _ in 0..3 {
        assert_exempt(&g.run(&get("/swagger/ui").key(KEY)));
        assert_exempt(&g.run(&get("/swagger/ui").key("ak_unknown")));
    }
    let o = g.run(&get("/v1/x").key(KEY));
    assert_allowed(&o);
    assert_eq!(
        x_ratelimit(&o),
        (Some("1"), Some("0"), Some(ts(T0 + 60).as_str()))
    );
}

#[test]
fn step3_exempt_requests_do_not_pass_the_key_upstream() {
    // SPEC §5: keys never appear upstream unless strip_credential is false.
    let mut g = Gate::with_key(exempt_cfg(), json!({}));
    let r = get("/swagger/ui").key(KEY);
    let o = g.run(&r);
    assert_exempt(&o);
    assert!(up(&upstream(&r, &o), "x-api-key").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Step 4: no list, or a stale one
// ---------------------------------------------------------------------------------------------

#[test]
fn step4_unavailable_before_any_list() {
    let mut g = Gate::empty(json!({}));
    assert_refused(&g.run(&get("/x").key(KEY)), "unavailable");
    assert_refused(&g.run(&get("/x")), "unavailable");
}

#[test]
fn step4_fail_open_passes_without_identity() {
    let cfg = json!({"key_list": {"fail_open": true}, "rate_limit": {"default": [{"limit": 1, "window_s": 60}]}});
    let mut g = Gate::empty(cfg);
    for _ in 0..3 {
        let r = get("/x").key(KEY);
        let o = g.run(&r);
        assert_eq!(o.kind, Kind::FailOpen, "{o:?}");
        assert!(o.reply.is_none());
        assert!(o.set_headers.is_empty(), "{o:?}");
        assert!(o.response_headers.is_empty(), "{o:?}");
        let o = g.run(&get("/x"));
        assert_eq!(o.kind, Kind::FailOpen, "{o:?}");
    }
}

#[test]
fn step4_stale_list_with_max_stale_s() {
    let cfg = json!({"key_list": {"max_stale_s": 60}});
    let d = doc(json!({}), vec![the_key(json!({}))]);
    let mut g = Gate::fetched_at(cfg.clone(), d.clone(), NOW - 60);
    assert_allowed(&g.run(&get("/x").key(KEY)));
    assert_refused(&g.run_at(&get("/x").key(KEY), NOW + 1), "unavailable");
    let mut g = Gate::fetched_at(cfg, d.clone(), NOW - 61);
    assert_refused(&g.run(&get("/x").key(KEY)), "unavailable");
    // A 304 refreshes freshness.
    shared::touch(&g.store, NOW - 5);
    g.reload();
    assert_allowed(&g.run(&get("/x").key(KEY)));
    // 0 means no limit.
    let mut g = Gate::fetched_at(json!({}), d, NOW - 10_000_000);
    assert_allowed(&g.run(&get("/x").key(KEY)));
}

#[test]
fn step4_stale_list_with_fail_open_passes() {
    let cfg = json!({"key_list": {"max_stale_s": 30, "fail_open": true}});
    let d = doc(json!({}), vec![the_key(json!({}))]);
    let mut g = Gate::fetched_at(cfg, d, NOW - 31);
    let r = get("/x").key("ak_whatever").h("x-api-key-id", "forged");
    let o = g.run(&r);
    assert_eq!(o.kind, Kind::FailOpen, "{o:?}");
    assert!(o.reply.is_none());
    assert!(up(&upstream(&r, &o), "x-api-key-id").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Step 5: the credential
// ---------------------------------------------------------------------------------------------

#[test]
fn step5_missing_key() {
    let mut g = Gate::with_key(json!({}), json!({}));
    assert_refused(&g.run(&get("/x")), "missing_key");
    assert_refused(&g.run(&get("/x").h("x-api-key", "")), "missing_key");
    assert_refused(
        &g.run(&get("/x").h("authorization", "Bearer ")),
        "missing_key",
    );
    assert_refused(
        &g.run(&get("/x").h("authorization", "Basic dXNlcjpwdw==")),
        "missing_key",
    );
    assert_refused(&g.run(&get(&format!("/x?api_key={KEY}"))), "missing_key");
}

#[test]
fn step5_default_sources_x_api_key_then_bearer() {
    let mut g = Gate::with_key(json!({}), json!({}));
    assert_allowed(&g.run(&get("/x").key(KEY)));
    assert_allowed(&g.run(&get("/x").h("authorization", format!("Bearer {KEY}"))));
    // The first source present wins, even when a later one holds a good key.
    let r = get("/x")
        .key("ak_wrong")
        .h("authorization", format!("Bearer {KEY}"));
    assert_refused(&g.run(&r), "invalid_key");
    let r = get("/x").key(KEY).h("authorization", "Bearer ak_wrong");
    assert_allowed(&g.run(&r));
}

#[test]
fn step5_bearer_scheme_is_case_insensitive_and_required() {
    let mut g = Gate::with_key(json!({}), json!({}));
    for v in [
        format!("Bearer {KEY}"),
        format!("bearer {KEY}"),
        format!("BEARER {KEY}"),
        format!("bEaReR {KEY}"),
    ] {
        assert_allowed(&g.run(&get("/x").h("authorization", v)));
    }
    for v in [
        KEY.to_string(),
        format!("Bearer{KEY}"),
        format!("Token {KEY}"),
        format!("Bearerx {KEY}"),
    ] {
        assert_refused(&g.run(&get("/x").h("authorization", v)), "missing_key");
    }
}

#[test]
fn step5_empty_source_counts_as_absent_and_the_next_one_is_used() {
    let mut g = Gate::with_key(json!({}), json!({}));
    let r = get("/x")
        .h("x-api-key", "")
        .h("authorization", format!("Bearer {KEY}"));
    assert_allowed(&g.run(&r));
    let cfg = json!({"credentials": [{"query": "api_key"}, {"header": "x-api-key"}]});
    let mut g = Gate::with_key(cfg, json!({}));
    assert_allowed(&g.run(&get("/x?api_key=").key(KEY)));
}

#[test]
fn step5_configured_order_is_respected() {
    let cfg = json!({"credentials": [{"query": "api_key"}, {"header": "x-token", "scheme": "Token"}, {"header": "x-api-key"}]});
    let mut g = Gate::with_key(cfg, json!({}));
    assert_refused(&g.run(&get("/x?api_key=ak_wrong").key(KEY)), "invalid_key");
    assert_allowed(&g.run(&get(&format!("/x?api_key={KEY}")).key("ak_wrong")));
    assert_allowed(
        &g.run(
            &get("/x")
                .h("x-token", format!("token {KEY}"))
                .key("ak_wrong"),
        ),
    );
    assert_allowed(&g.run(&get("/x").h("x-token", KEY).key(KEY)));
    // Authorization is not a source in this configuration.
    assert_refused(
        &g.run(&get("/x").h("authorization", format!("Bearer {KEY}"))),
        "missing_key",
    );
}

#[test]
fn step5_query_value_is_percent_decoded() {
    let secret = "ak_a b/c%d&e=f";
    let cfg = json!({"credentials": [{"query": "api_key"}]});
    let mut g = Gate::with_keys(cfg, vec![key_entry("key_q", secret, json!({}))]);
    let r = get("/v1/items?page=2&api_key=ak_a%20b%2Fc%25d%26e%3Df");
    let o = g.run(&r);
    assert_allowed(&o);
    assert_eq!(o.key_id.as_deref(), Some("key_q"));
    // The parameter name must match exactly.
    assert_refused(
        &g.run(&get("/v1/items?xapi_key=ak_1&api_keyx=ak_1")),
        "missing_key",
    );
}

#[test]
fn step5_query_credential_is_stripped_from_the_path() {
    let cfg = json!({"credentials": [{"query": "api_key"}]});
    let mut g = Gate::with_key(cfg, json!({}));
    let r = get(&format!("/v1/Some%20Thing?a=1&api_key={KEY}&q=x%26y"));
    let o = g.run(&r);
    assert_allowed(&o);
    assert_eq!(
        up1(&upstream(&r, &o), ":path").as_deref(),
        Some("/v1/Some%20Thing?a=1&q=x%26y")
    );
    let r = get(&format!("/v1/items?api_key={KEY}"));
    let o = g.run(&r);
    assert_allowed(&o);
    let p = up1(&upstream(&r, &o), ":path").unwrap();
    assert!(p == "/v1/items" || p == "/v1/items?", "path upstream: {p}");
    let r = get(&format!("/v1/items?api_key={KEY}&b=2"));
    let o = g.run(&r);
    assert_eq!(
        up1(&upstream(&r, &o), ":path").as_deref(),
        Some("/v1/items?b=2")
    );
}

#[test]
fn step5_query_source_ignores_the_query_when_matching_paths() {
    let cfg = json!({
        "credentials": [{"query": "api_key"}],
        "routes": [{"path_exact": "/v1/admin", "scope": "admin"}]
    });
    let mut g = Gate::with_key(cfg, json!({"scopes": ["read"]}));
    assert_refused(
        &g.run(&get(&format!("/v1/admin?api_key={KEY}"))),
        "forbidden",
    );
}

// ---------------------------------------------------------------------------------------------
// Step 6: invalid_key_limit
// ---------------------------------------------------------------------------------------------

fn ikl(limit: u64) -> Value {
    json!({"invalid_key_limit": {"limit": limit, "window_s": 60}})
}

#[test]
fn step6_blocks_a_client_after_limit_failures_before_any_lookup() {
    let mut g = Gate::with_key(ikl(3), json!({}));
    let a = "198.51.100.1";
    for i in 0..3 {
        assert_refused(
            &g.run(&get("/x").key(&format!("ak_bad{i}")).from(a)),
            "invalid_key",
        );
    }
    // Even the good key is refused now, before lookup.
    let o = g.run(&get("/x").key(KEY).from(a));
    assert_refused(&o, "rate_limited");
    assert_eq!(o.key_id, None);
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(body(&o), rate_limited_body(50));
    assert!(no_rate_headers(&o.reply.as_ref().unwrap().headers), "{o:?}");
    let o = g.run(&get("/x").key("ak_bad9").from(a));
    assert_refused(&o, "rate_limited");
    // Later in the window.
    let o = g.run_at(&get("/x").key(KEY).from(a), T0 + 59);
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("1"));
    // Missing key is decided first.
    assert_refused(&g.run(&get("/x").from(a)), "missing_key");
    // Another client is unaffected.
    assert_allowed(&g.run(&get("/x").key(KEY).from("198.51.100.2")));
    // The next window starts over.
    assert_allowed(&g.run_at(&get("/x").key(KEY).from(a), T0 + 60));
}

#[test]
fn step6_no_key_rate_limit_headers_even_with_both_styles() {
    let cfg = merge_v(
        ikl(1),
        json!({"rate_limit": {"default": [{"limit": 100, "window_s": 60}], "headers": "both"}}),
    );
    let mut g = Gate::with_key(cfg, json!({}));
    assert_refused(&g.run(&get("/x").key("ak_bad")), "invalid_key");
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert!(reply_hdr(&o, "retry-after").is_some());
    assert!(no_rate_headers(&o.reply.as_ref().unwrap().headers), "{o:?}");
}

#[test]
fn step6_counts_only_step7_failures() {
    let d = doc(
        json!({"owners": {"org-1": {"status": "active"}, "org-off": {"status": "disabled"}}}),
        vec![
            the_key(json!({"rate_limits": [{"limit": 1, "window_s": 60}], "scopes": ["a"]})),
            key_entry("key_exp", "ak_expired", json!({"expires_at": 1})),
            key_entry("key_rev", "ak_revoked", json!({"status": "revoked"})),
            key_entry("key_own", "ak_owner", json!({"owner": "org-off"})),
            key_entry(
                "key_ip",
                "ak_ip",
                json!({"allowed_ips": ["203.0.113.0/24"]}),
            ),
        ],
    );
    let cfg = merge_v(
        ikl(2),
        json!({"routes": [{"path_prefix": "/admin", "scope": "admin"}]}),
    );
    let mut g = Gate::with_doc(cfg, d);
    let a = "198.51.100.1";
    for _ in 0..4 {
        assert_refused(&g.run(&get("/x").from(a)), "missing_key");
        assert_refused(&g.run(&get("/x").key("ak_expired").from(a)), "expired_key");
        assert_refused(&g.run(&get("/x").key("ak_revoked").from(a)), "expired_key");
        assert_refused(&g.run(&get("/x").key("ak_owner").from(a)), "invalid_key");
        assert_refused(&g.run(&get("/x").key("ak_ip").from(a)), "ip_denied");
        assert_refused(&g.run(&get("/admin").key(KEY).from(a)), "forbidden");
    }
    assert_allowed(&g.run(&get("/x").key(KEY).from(a)));
    for _ in 0..3 {
        assert_refused(&g.run(&get("/x").key(KEY).from(a)), "rate_limited");
    }
    // Still two step-7 failures to go.
    assert_refused(&g.run(&get("/x").key("ak_nope").from(a)), "invalid_key");
    assert_refused(&g.run(&get("/x").key("ak_nope").from(a)), "invalid_key");
    assert_refused(&g.run(&get("/x").key("ak_nope").from(a)), "rate_limited");
}

#[test]
fn step6_too_long_and_wrong_prefix_keys_count() {
    let cfg = merge_v(ikl(2), json!({"key_prefixes": ["ak_"]}));
    let mut g = Gate::with_key(cfg, json!({}));
    let long = format!("ak_{}", "x".repeat(1100));
    assert_refused(&g.run(&get("/x").key(&long)), "invalid_key");
    assert_refused(&g.run(&get("/x").key("sk_other")), "invalid_key");
    assert_refused(&g.run(&get("/x").key(KEY)), "rate_limited");
}

#[test]
fn step6_is_per_client_ip_from_xff() {
    let cfg = merge_v(ikl(1), json!({"client_ip": {"xff_trusted_hops": 1}}));
    let mut g = Gate::with_key(cfg, json!({}));
    let r = |client: &str, k: &str| {
        get("/x")
            .key(k)
            .from("10.0.0.1")
            .h("x-forwarded-for", client)
    };
    assert_refused(&g.run(&r("198.51.100.1", "ak_bad")), "invalid_key");
    assert_refused(&g.run(&r("198.51.100.1", KEY)), "rate_limited");
    assert_allowed(&g.run(&r("203.0.113.77", KEY)));
    // IPv4-mapped IPv6 is the same client.
    assert_refused(&g.run(&r("::ffff:198.51.100.1", KEY)), "rate_limited");
}

// ---------------------------------------------------------------------------------------------
// Step 7: format and lookup
// ---------------------------------------------------------------------------------------------

#[test]
fn step7_unknown_key_is_invalid() {
    let mut g = Gate::with_key(json!({}), json!({}));
    assert_refused(&g.run(&get("/x").key("ak_live_0002")), "invalid_key");
    assert_refused(&g.run(&get("/x").key(&KEY.to_uppercase())), "invalid_key");
    assert_refused(&g.run(&get("/x").key(&format!("{KEY}x"))), "invalid_key");
}

#[test]
fn step7_uppercase_hash_in_the_list_matches() {
    let k =
        json!({"id": "key_u", "hash": sha256_hex(KEY.as_bytes()).to_uppercase(), "owner": OWNER});
    let mut g = Gate::with_keys(json!({}), vec![k]);
    let o = g.run(&get("/x").key(KEY));
    assert_allowed(&o);
    assert_eq!(o.key_id.as_deref(), Some("key_u"));
}

#[test]
fn step7_key_length_bound_is_1024_bytes() {
    let k1024 = "k".repeat(1024);
    let k1025 = "k".repeat(1025);
    let mut g = Gate::with_keys(
        json!({}),
        vec![
            key_entry("key_1024", &k1024, json!({})),
            key_entry("key_1025", &k1025, json!({})),
        ],
    );
    let o = g.run(&get("/x").key(&k1024));
    assert_allowed(&o);
    assert_eq!(o.key_id.as_deref(), Some("key_1024"));
    assert_refused(&g.run(&get("/x").key(&k1025)), "invalid_key");
}

#[test]
fn step7_key_prefixes() {
    let cfg = json!({"key_prefixes": ["ak_", "sk_"]});
    let mut g = Gate::with_keys(
        cfg,
        vec![
            key_entry("key_ak", "ak_one", json!({})),
            key_entry("key_sk", "sk_two", json!({})),
            key_entry("key_xx", "xx_three", json!({})),
        ],
    );
    assert_allowed(&g.run(&get("/x").key("ak_one")));
    assert_allowed(&g.run(&get("/x").key("sk_two")));
    assert_refused(&g.run(&get("/x").key("xx_three")), "invalid_key");
    // Without prefixes any key in the list is fine.
    let mut g = Gate::with_keys(json!({}), vec![key_entry("key_xx", "xx_three", json!({}))]);
    assert_allowed(&g.run(&get("/x").key("xx_three")));
}

// ---------------------------------------------------------------------------------------------
// Step 8: status, expiry, owner
// ---------------------------------------------------------------------------------------------

#[test]
fn step8_status() {
    let mut g = Gate::with_keys(
        json!({}),
        vec![
            key_entry("k_active", "ak_active", json!({"status": "active"})),
            key_entry("k_default", "ak_default", json!({})),
            key_entry("k_disabled", "ak_disabled", json!({"status": "disabled"})),
            key_entry("k_revoked", "ak_revoked", json!({"status": "revoked"})),
            key_entry("k_deleted", "ak_deleted", json!({"status": "deleted"})),
            key_entry("k_other", "ak_other", json!({"status": "suspended"})),
            key_entry("k_upper", "ak_upper", json!({"status": "ACTIVE"})),
        ],
    );
    assert_allowed(&g.run(&get("/x").key("ak_active")));
    assert_allowed(&g.run(&get("/x").key("ak_default")));
    for k in [
        "ak_disabled",
        "ak_revoked",
        "ak_deleted",
        "ak_other",
        "ak_upper",
    ] {
        assert_refused(&g.run(&get("/x").key(k)), "expired_key");
    }
}

#[test]
fn step8_expires_at_unix_seconds() {
    let mut g = Gate::with_keys(
        json!({}),
        vec![
            key_entry("k_now", "ak_now", json!({"expires_at": NOW})),
            key_entry("k_past", "ak_past", json!({"expires_at": NOW - 1})),
            key_entry("k_future", "ak_future", json!({"expires_at": NOW + 1})),
        ],
    );
    assert_refused(&g.run(&get("/x").key("ak_now")), "expired_key");
    assert_refused(&g.run(&get("/x").key("ak_past")), "expired_key");
    assert_allowed(&g.run(&get("/x").key("ak_future")));
    assert_refused(
        &g.run_at(&get("/x").key("ak_future"), NOW + 1),
        "expired_key",
    );
}

#[test]
fn step8_expires_at_rfc3339() {
    // NOW is 2027-01-16T00:00:10Z.
    let mut g = Gate::with_keys(
        json!({}),
        vec![
            key_entry(
                "k_now",
                "ak_now",
                json!({"expires_at": "2027-01-16T00:00:10Z"}),
            ),
            key_entry(
                "k_offset",
                "ak_offset",
                json!({"expires_at": "2027-01-16T01:00:10+01:00"}),
            ),
            key_entry(
                "k_next",
                "ak_next",
                json!({"expires_at": "2027-01-16T00:00:11Z"}),
            ),
            key_entry(
                "k_neg",
                "ak_neg",
                json!({"expires_at": "2027-01-15T19:00:11-05:00"}),
            ),
            key_entry(
                "k_old",
                "ak_old",
                json!({"expires_at": "2026-12-31T00:00:00Z"}),
            ),
            key_entry(
                "k_far",
                "ak_far",
                json!({"expires_at": "2099-12-31T23:59:59Z"}),
            ),
        ],
    );
    assert_refused(&g.run(&get("/x").key("ak_now")), "expired_key");
    assert_refused(&g.run(&get("/x").key("ak_offset")), "expired_key");
    assert_refused(&g.run(&get("/x").key("ak_old")), "expired_key");
    assert_allowed(&g.run(&get("/x").key("ak_next")));
    assert_allowed(&g.run(&get("/x").key("ak_neg")));
    assert_allowed(&g.run(&get("/x").key("ak_far")));
}

#[test]
fn step8_owners() {
    let top = json!({"owners": {"org-1": {"status": "active"}, "org-2": {}, "org-off": {"status": "disabled"}}});
    let mut g = Gate::with_doc(
        json!({}),
        doc(
            top,
            vec![
                key_entry("k1", "ak_1", json!({})),
                key_entry("k2", "ak_2", json!({"owner": "org-2"})),
                key_entry("k3", "ak_3", json!({"owner": "org-off"})),
                key_entry("k4", "ak_4", json!({"owner": "org-ghost"})),
                key_entry(
                    "k5",
                    "ak_5",
                    json!({"owner": "org-off", "status": "revoked"}),
                ),
            ],
        ),
    );
    assert_allowed(&g.run(&get("/x").key("ak_1")));
    assert_allowed(&g.run(&get("/x").key("ak_2")));
    assert_refused(&g.run(&get("/x").key("ak_3")), "invalid_key");
    assert_refused(&g.run(&get("/x").key("ak_4")), "invalid_key");
    // "Not active, or expired" comes first.
    assert_refused(&g.run(&get("/x").key("ak_5")), "expired_key");
    // Without `owners`, any owner is valid.
    let mut g = Gate::with_keys(
        json!({}),
        vec![key_entry("k4", "ak_4", json!({"owner": "org-ghost"}))],
    );
    assert_allowed(&g.run(&get("/x").key("ak_4")));
}

#[test]
fn step8_comes_before_key_ip_sites_and_scopes() {
    let cfg = json!({"site": {"path_segment": 1}, "routes": [{"path_prefix": "/", "scope": "x"}]});
    let mut g = Gate::with_key(
        cfg,
        json!({"status": "disabled", "allowed_ips": ["203.0.113.0/24"], "sites": ["zzz"], "scopes": []}),
    );
    assert_refused(&g.run(&get("/a").key(KEY)), "expired_key");
}

// ---------------------------------------------------------------------------------------------
// Step 9: key allowed_ips
// ---------------------------------------------------------------------------------------------

#[test]
fn step9_key_allowed_ips() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"allowed_ips": ["203.0.113.0/24", "2001:db8::1"]}),
    );
    assert_allowed(&g.run(&get("/x").key(KEY).from("203.0.113.9")));
    assert_allowed(&g.run(&get("/x").key(KEY).from("2001:db8::1")));
    assert_allowed(&g.run(&get("/x").key(KEY).from("::ffff:203.0.113.200")));
    let o = g.run(&get("/x").key(KEY).from("198.51.100.1"));
    assert_refused(&o, "ip_denied");
    assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
    assert_refused(&g.run(&get("/x").key(KEY).from("2001:db8::2")), "ip_denied");
    assert_refused(&g.run(&get("/x").key(KEY).no_source()), "ip_denied");
}

#[test]
fn step9_key_allowed_ips_use_the_client_ip() {
    let cfg = json!({"client_ip": {"xff_trusted_hops": 1}});
    let mut g = Gate::with_key(cfg, json!({"allowed_ips": ["203.0.113.0/24"]}));
    let r = get("/x")
        .key(KEY)
        .from("10.0.0.1")
        .h("x-forwarded-for", "198.51.100.1, 203.0.113.9");
    assert_allowed(&g.run(&r));
    let r = get("/x")
        .key(KEY)
        .from("203.0.113.9")
        .h("x-forwarded-for", "203.0.113.9, 198.51.100.1");
    assert_refused(&g.run(&r), "ip_denied");
}

#[test]
fn step9_empty_allowed_ips_allows_everyone() {
    let mut g = Gate::with_key(json!({}), json!({"allowed_ips": []}));
    assert_allowed(&g.run(&get("/x").key(KEY).from("198.51.100.1")));
    assert_allowed(&g.run(&get("/x").key(KEY).no_source()));
}

// ---------------------------------------------------------------------------------------------
// Step 10: sites
// ---------------------------------------------------------------------------------------------

#[test]
fn step10_site_from_path_segment() {
    let cfg = json!({"site": {"path_segment": 2}});
    let mut g = Gate::with_keys(
        cfg,
        vec![
            the_key(json!({"sites": ["123", "777"]})),
            key_entry("k_any", "ak_any", json!({})),
        ],
    );
    for p in [
        "/v1/123/contacts",
        "/v1/777",
        "/v1/123?x=1",
        "/v1//123/x",
        "/v1/x/../123/y",
        "/v1/./123",
    ] {
        assert_allowed(&g.run(&get(p).key(KEY)));
    }
    for p in [
        "/v1/456/contacts",
        "/v1",
        "/",
        "/123/v1",
        "/v1/1234",
        "/v1/12",
    ] {
        assert_refused(&g.run(&get(p).key(KEY)), "forbidden");
    }
    // A key without sites may go anywhere.
    assert_allowed(&g.run(&get("/v1/456").key("ak_any")));
    assert_allowed(&g.run(&get("/").key("ak_any")));
}

#[test]
fn step10_site_from_header() {
    let cfg = json!({"site": {"header": "X-Site-Id"}});
    let mut g = Gate::with_key(cfg, json!({"sites": ["123"]}));
    assert_allowed(&g.run(&get("/x").key(KEY).h("x-site-id", "123")));
    assert_refused(
        &g.run(&get("/x").key(KEY).h("x-site-id", "456")),
        "forbidden",
    );
    assert_refused(&g.run(&get("/x").key(KEY)), "forbidden");
    assert_refused(&g.run(&get("/123").key(KEY)), "forbidden");
}

#[test]
fn step10_key_with_sites_and_no_site_source_is_forbidden() {
    let mut g = Gate::with_key(json!({}), json!({"sites": ["123"]}));
    assert_refused(&g.run(&get("/123/x").key(KEY)), "forbidden");
}

// ---------------------------------------------------------------------------------------------
// Step 11: routes and scopes
// ---------------------------------------------------------------------------------------------

fn routes_cfg() -> Value {
    json!({"routes": [
        {"path_prefix": "/public/v1/contacts", "methods": ["POST"], "scope": "contacts:write"},
        {"path_prefix": "/public/v1/contacts", "scope": "contacts:read"},
        {"path_exact": "/public/v1/deals", "scope": "deals:read"},
        {"path_prefix": "/public/v1/open"},
        {"path_prefix": "/public", "scope": "admin"}
    ]})
}

fn scoped(scopes: Value) -> Gate {
    Gate::with_key(routes_cfg(), json!({"scopes": scopes}))
}

#[test]
fn step11_exact_scope() {
    let mut g = scoped(json!(["contacts:read"]));
    assert_allowed(&g.run(&get("/public/v1/contacts").key(KEY)));
    assert_allowed(&g.run(&get("/public/v1/contacts/42").key(KEY)));
    assert_allowed(&g.run(&req("DELETE", "/public/v1/contacts/42").key(KEY)));
    let o = g.run(&req("POST", "/public/v1/contacts").key(KEY));
    assert_refused(&o, "forbidden");
    assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
    let mut g = scoped(json!(["contacts:write"]));
    assert_allowed(&g.run(&req("POST", "/public/v1/contacts").key(KEY)));
    assert_refused(&g.run(&get("/public/v1/contacts").key(KEY)), "forbidden");
}

#[test]
fn step11_wildcard_scopes() {
    let mut g = scoped(json!(["contacts:*"]));
    assert_allowed(&g.run(&req("POST", "/public/v1/contacts").key(KEY)));
    assert_allowed(&g.run(&get("/public/v1/contacts").key(KEY)));
    assert_refused(&g.run(&get("/public/v1/deals").key(KEY)), "forbidden");
    assert_refused(&g.run(&get("/public/other").key(KEY)), "forbidden");
    let mut g = scoped(json!(["deals:*"]));
    assert_refused(&g.run(&get("/public/v1/contacts").key(KEY)), "forbidden");
    assert_allowed(&g.run(&get("/public/v1/deals").key(KEY)));
    let mut g = scoped(json!(["*"]));
    for (m, p) in [
        ("POST", "/public/v1/contacts"),
        ("GET", "/public/v1/deals"),
        ("GET", "/public/zzz"),
    ] {
        assert_allowed(&g.run(&req(m, p).key(KEY)));
    }
}

#[test]
fn step11_no_scopes_means_only_unscoped_routes() {
    let mut g = scoped(json!([]));
    assert_refused(&g.run(&get("/public/v1/contacts").key(KEY)), "forbidden");
    // No matching rule: any valid key.
    assert_allowed(&g.run(&get("/private/x").key(KEY)));
    assert_allowed(&g.run(&get("/publicx").key(KEY)));
    // A rule without scope, matched first: any valid key.
    assert_allowed(&g.run(&get("/public/v1/open/a").key(KEY)));
    assert_allowed(&g.run(&req("PUT", "/public/v1/open").key(KEY)));
    // path_exact: /public/v1/deals/1 falls through to the "/public" rule.
    let mut g = scoped(json!(["deals:read"]));
    assert_allowed(&g.run(&get("/public/v1/deals").key(KEY)));
    assert_refused(&g.run(&get("/public/v1/deals/1").key(KEY)), "forbidden");
}

#[test]
fn step11_first_matching_rule_wins() {
    let cfg = json!({"routes": [
        {"path_prefix": "/a/b", "scope": "narrow"},
        {"path_prefix": "/a", "scope": "wide"}
    ]});
    let mut g = Gate::with_key(cfg.clone(), json!({"scopes": ["wide"]}));
    assert_refused(&g.run(&get("/a/b/c").key(KEY)), "forbidden");
    assert_allowed(&g.run(&get("/a/c").key(KEY)));
    let mut g = Gate::with_key(cfg, json!({"scopes": ["narrow"]}));
    assert_allowed(&g.run(&get("/a/b/c").key(KEY)));
    assert_refused(&g.run(&get("/a/c").key(KEY)), "forbidden");
}

#[test]
fn step11_routes_use_the_normalised_path() {
    let mut g = scoped(json!(["contacts:read"]));
    for p in [
        "/public/v1/x/../contacts",
        "/public/v1/%2e%2e/v1/contacts",
        "/public//v1/contacts",
        "/public%2Fv1%2Fcontacts",
        "/public\\v1\\contacts",
        "/public/v1/./contacts?x=1",
    ] {
        assert_refused(&g.run(&req("POST", p).key(KEY)), "forbidden");
        assert_allowed(&g.run(&get(p).key(KEY)));
    }
    // Leaving an unscoped prefix through `..` lands under a scoped rule.
    assert_refused(
        &g.run(&get("/public/v1/open/../deals").key(KEY)),
        "forbidden",
    );
    assert_refused(
        &g.run(&get("/public/v1/open/%2e%2e/%2e%2e/x").key(KEY)),
        "forbidden",
    );
    assert_refused(
        &g.run(&req("POST", "/public/v1/open/../contacts").key(KEY)),
        "forbidden",
    );
    assert_allowed(&g.run(&get("/public/v1/open/../contacts").key(KEY)));
}

// ---------------------------------------------------------------------------------------------
// Step 12: rate limits
// ---------------------------------------------------------------------------------------------

#[test]
fn step12_key_limit_counts_exactly_with_headers() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 3, "window_s": 60}]}),
    );
    let reset = ts(T0 + 60);
    for remaining in ["2", "1", "0"] {
        let o = g.run(&get("/x").key(KEY));
        assert_allowed(&o);
        assert_eq!(
            x_ratelimit(&o),
            (Some("3"), Some(remaining), Some(reset.as_str()))
        );
        // On the upstream's response, not on the request.
        assert!(o
            .set_headers
            .iter()
            .all(|(k, _)| !k.to_ascii_lowercase().contains("ratelimit")));
    }
    for _ in 0..3 {
        let o = g.run(&get("/x").key(KEY));
        assert_refused(&o, "rate_limited");
        assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
        assert_eq!(
            reply_x_ratelimit(&o),
            (Some("3"), Some("0"), Some(reset.as_str()))
        );
        assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
        assert_eq!(body(&o), rate_limited_body(50));
    }
}

#[test]
fn step12_fixed_windows_are_aligned_to_the_epoch() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 2, "window_s": 60}]}),
    );
    assert_allowed(&g.run_at(&get("/x").key(KEY), T0 + 50));
    assert_allowed(&g.run_at(&get("/x").key(KEY), T0 + 59));
    let o = g.run_at(&get("/x").key(KEY), T0 + 59);
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("1"));
    // A new window at the multiple of 60, not 60 s after the first request.
    let o = g.run_at(&get("/x").key(KEY), T0 + 60);
    assert_allowed(&o);
    assert_eq!(
        x_ratelimit(&o),
        (Some("2"), Some("1"), Some(ts(T0 + 120).as_str()))
    );

    // A window that does not divide a day.
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 5, "window_s": 7}]}),
    );
    let now = T0 + 10;
    let end = now - now % 7 + 7;
    let o = g.run_at(&get("/x").key(KEY), now);
    assert_allowed(&o);
    assert_eq!(
        x_ratelimit(&o),
        (Some("5"), Some("4"), Some(ts(end).as_str()))
    );
}

#[test]
fn step12_limit_zero_refuses_everything() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 0, "window_s": 60}]}),
    );
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(reply_x_ratelimit(&o).1, Some("0"));
}

fn limits_doc(default: Option<Value>) -> (Value, Value) {
    let mut cfg = json!({});
    if let Some(d) = default {
        cfg = json!({"rate_limit": {"default": d}});
    }
    let d = doc(
        json!({"plans": {
            "free": {"rate_limits": [{"limit": 10, "window_s": 60}]},
            "open": {"rate_limits": []},
            "bare": {}
        }}),
        vec![
            key_entry(
                "k_own",
                "ak_own",
                json!({"plan": "free", "rate_limits": [{"limit": 4, "window_s": 60}]}),
            ),
            key_entry("k_plan", "ak_plan", json!({"plan": "free"})),
            key_entry("k_open", "ak_open", json!({"plan": "open"})),
            key_entry("k_bare", "ak_bare", json!({"plan": "bare"})),
            key_entry("k_none", "ak_none", json!({})),
            key_entry(
                "k_empty",
                "ak_empty",
                json!({"plan": "free", "rate_limits": []}),
            ),
        ],
    );
    (cfg, d)
}

#[test]
fn step12_effective_limits_key_then_plan_then_default() {
    let (cfg, d) = limits_doc(Some(json!([{"limit": 7, "window_s": 60}])));
    let mut g = Gate::with_doc(cfg, d);
    let limit_of = |g: &mut Gate, k: &str| {
        let o = g.run(&get("/x").key(k));
        assert_allowed(&o);
        resp_hdr(&o, "x-ratelimit-limit").map(str::to_string)
    };
    assert_eq!(limit_of(&mut g, "ak_own").as_deref(), Some("4"));
    assert_eq!(limit_of(&mut g, "ak_plan").as_deref(), Some("10"));
    assert_eq!(limit_of(&mut g, "ak_bare").as_deref(), Some("7"));
    assert_eq!(limit_of(&mut g, "ak_none").as_deref(), Some("7"));
    // Explicit empty lists: no limits, no headers.
    assert_eq!(limit_of(&mut g, "ak_open"), None);
    assert_eq!(limit_of(&mut g, "ak_empty"), None);
    for _ in 0..20 {
        let o = g.run(&get("/x").key("ak_open"));
        assert_allowed(&o);
        assert!(no_rate_headers(&o.response_headers), "{o:?}");
        assert_allowed(&g.run(&get("/x").key("ak_empty")));
    }
    // The key's own limit is the one enforced.
    for _ in 0..3 {
        assert_allowed(&g.run(&get("/x").key("ak_own")));
    }
    assert_refused(&g.run(&get("/x").key("ak_own")), "rate_limited");
    // The default counts per key.
    for _ in 0..6 {
        assert_allowed(&g.run(&get("/x").key("ak_none")));
    }
    assert_refused(&g.run(&get("/x").key("ak_none")), "rate_limited");
    assert_allowed(&g.run(&get("/x").key("ak_bare")));
}

#[test]
fn step12_no_limits_anywhere_means_no_headers() {
    let (cfg, d) = limits_doc(None);
    let mut g = Gate::with_doc(cfg, d);
    for _ in 0..50 {
        let o = g.run(&get("/x").key("ak_none"));
        assert_allowed(&o);
        assert!(o.response_headers.is_empty(), "{o:?}");
    }
}

#[test]
fn step12_least_remaining_is_reported() {
    // The short window is the tighter one.
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 100, "window_s": 3600}, {"limit": 5, "window_s": 1}]}),
    );
    let o = g.run(&get("/x").key(KEY));
    assert_eq!(
        x_ratelimit(&o),
        (Some("5"), Some("4"), Some(ts(NOW + 1).as_str()))
    );
    // The long window is the tighter one.
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 100, "window_s": 1}, {"limit": 3, "window_s": 3600}]}),
    );
    let o = g.run(&get("/x").key(KEY));
    assert_eq!(
        x_ratelimit(&o),
        (Some("3"), Some("2"), Some(ts(T0 + 3600).as_str()))
    );
    let o = g.run_at(&get("/x").key(KEY), NOW + 5);
    assert_eq!(
        x_ratelimit(&o),
        (Some("3"), Some("1"), Some(ts(T0 + 3600).as_str()))
    );
}

#[test]
fn step12_ties_go_to_the_shortest_window() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 10, "window_s": 86400}, {"limit": 10, "window_s": 3600}, {"limit": 10, "window_s": 60}]}),
    );
    let o = g.run(&get("/x").key(KEY));
    assert_eq!(
        x_ratelimit(&o),
        (Some("10"), Some("9"), Some(ts(T0 + 60).as_str()))
    );
}

#[test]
fn step12_retry_after_covers_every_exceeded_window() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 1, "window_s": 60}, {"limit": 1, "window_s": 3600}]}),
    );
    assert_allowed(&g.run(&get("/x").key(KEY)));
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("3590"));
    assert_eq!(body(&o), rate_limited_body(3590));
    // Only the short window exceeded: only it counts.
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 1, "window_s": 60}, {"limit": 100, "window_s": 3600}]}),
    );
    assert_allowed(&g.run(&get("/x").key(KEY)));
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(
        reply_x_ratelimit(&o),
        (Some("1"), Some("0"), Some(ts(T0 + 60).as_str()))
    );
}

#[test]
fn step12_refused_requests_still_count_in_every_window() {
    // "every limit of the key counts the request in its fixed window".
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 1, "window_s": 1}, {"limit": 3, "window_s": 3600}]}),
    );
    assert_allowed(&g.run_at(&get("/x").key(KEY), NOW)); // 1 / 1
    assert_refused(&g.run_at(&get("/x").key(KEY), NOW), "rate_limited"); // 2 / 2
    assert_allowed(&g.run_at(&get("/x").key(KEY), NOW + 1)); // 1 / 3
    let o = g.run_at(&get("/x").key(KEY), NOW + 2); // 1 / 4
    assert_refused(&o, "rate_limited");
    assert_eq!(
        reply_hdr(&o, "retry-after"),
        Some(ts(T0 + 3600 - NOW - 2).as_str())
    );
}

#[test]
fn step12_remaining_never_below_zero() {
    let cfg = json!({"rate_limit": {"headers": "both"}});
    let mut g = Gate::with_key(cfg, json!({"rate_limits": [{"limit": 1, "window_s": 60}]}));
    assert_allowed(&g.run(&get("/x").key(KEY)));
    for _ in 0..5 {
        let o = g.run(&get("/x").key(KEY));
        assert_refused(&o, "rate_limited");
        assert_eq!(reply_hdr(&o, "x-ratelimit-remaining"), Some("0"));
        assert_eq!(reply_hdr(&o, "ratelimit"), Some("\"default\";r=0;t=50"));
    }
}

#[test]
fn step12_counts_are_per_key() {
    let lim = json!({"rate_limits": [{"limit": 1, "window_s": 60}]});
    let mut g = Gate::with_keys(
        json!({}),
        vec![
            key_entry("k_a", "ak_a", lim.clone()),
            key_entry("k_b", "ak_b", lim),
        ],
    );
    assert_allowed(&g.run(&get("/x").key("ak_a")));
    assert_refused(&g.run(&get("/x").key("ak_a")), "rate_limited");
    assert_allowed(&g.run(&get("/x").key("ak_b")));
}

#[test]
fn step12_refusals_before_counting_do_not_consume_the_limit() {
    let cfg = json!({"site": {"path_segment": 1}, "routes": [{"path_prefix": "/s1/admin", "scope": "admin"}]});
    let mut g = Gate::with_key(
        cfg,
        json!({"sites": ["s1"], "scopes": ["read"], "allowed_ips": ["192.0.2.0/24"], "rate_limits": [{"limit": 1, "window_s": 60}]}),
    );
    for _ in 0..3 {
        assert_refused(&g.run(&get("/s2/x").key(KEY)), "forbidden");
        assert_refused(&g.run(&get("/s1/admin").key(KEY)), "forbidden");
        assert_refused(
            &g.run(&get("/s1/x").key(KEY).from("198.51.100.1")),
            "ip_denied",
        );
    }
    let o = g.run(&get("/s1/x").key(KEY));
    assert_allowed(&o);
    assert_eq!(x_ratelimit(&o).1, Some("0"));
}

// ---------------------------------------------------------------------------------------------
// §4 rate-limit header styles
// ---------------------------------------------------------------------------------------------

fn style_gate(style: &str) -> Gate {
    Gate::with_key(
        json!({"rate_limit": {"headers": style}}),
        json!({"rate_limits": [{"limit": 60, "window_s": 60}]}),
    )
}

#[test]
fn headers_x_ratelimit_is_the_default() {
    let mut g = Gate::with_key(
        json!({}),
        json!({"rate_limits": [{"limit": 60, "window_s": 60}]}),
    );
    let o = g.run_at(&get("/x").key(KEY), T0 + 26);
    assert_eq!(
        x_ratelimit(&o),
        (Some("60"), Some("59"), Some(ts(T0 + 60).as_str()))
    );
    assert_eq!(resp_hdr(&o, "ratelimit"), None);
    assert_eq!(resp_hdr(&o, "ratelimit-policy"), None);
}

#[test]
fn headers_ietf() {
    let mut g = style_gate("ietf");
    for _ in 0..47 {
        g.run_at(&get("/x").key(KEY), T0 + 26);
    }
    let o = g.run_at(&get("/x").key(KEY), T0 + 26);
    assert_allowed(&o);
    assert_eq!(
        resp_hdr(&o, "ratelimit-policy"),
        Some("\"default\";q=60;w=60")
    );
    assert_eq!(resp_hdr(&o, "ratelimit"), Some("\"default\";r=12;t=34"));
    assert_eq!(x_ratelimit(&o), (None, None, None));
}

#[test]
fn headers_both() {
    let mut g = style_gate("both");
    let o = g.run_at(&get("/x").key(KEY), T0 + 26);
    assert_eq!(
        x_ratelimit(&o),
        (Some("60"), Some("59"), Some(ts(T0 + 60).as_str()))
    );
    assert_eq!(
        resp_hdr(&o, "ratelimit-policy"),
        Some("\"default\";q=60;w=60")
    );
    assert_eq!(resp_hdr(&o, "ratelimit"), Some("\"default\";r=59;t=34"));
}

#[test]
fn headers_none() {
    let mut g = Gate::with_key(
        json!({"rate_limit": {"headers": "none"}}),
        json!({"rate_limits": [{"limit": 1, "window_s": 60}]}),
    );
    let o = g.run(&get("/x").key(KEY));
    assert_allowed(&o);
    assert!(no_rate_headers(&o.response_headers), "{o:?}");
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert!(no_rate_headers(&o.reply.as_ref().unwrap().headers), "{o:?}");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
}

#[test]
fn headers_ietf_on_rate_limited() {
    let mut g = Gate::with_key(
        json!({"rate_limit": {"headers": "ietf"}}),
        json!({"rate_limits": [{"limit": 2, "window_s": 60}]}),
    );
    g.run(&get("/x").key(KEY));
    g.run(&get("/x").key(KEY));
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert_eq!(
        reply_hdr(&o, "ratelimit-policy"),
        Some("\"default\";q=2;w=60")
    );
    assert_eq!(reply_hdr(&o, "ratelimit"), Some("\"default\";r=0;t=50"));
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(reply_hdr(&o, "x-ratelimit-limit"), None);
}

// ---------------------------------------------------------------------------------------------
// Step 13: allowed
// ---------------------------------------------------------------------------------------------

#[test]
fn step13_header_credential_is_stripped_and_identity_set() {
    let mut g = Gate::with_key(json!({}), json!({}));
    let r = get("/v1/x").key(KEY).h("x-other", "kept");
    let o = g.run(&r);
    assert_allowed(&o);
    assert_eq!(o.key_id.as_deref(), Some(KEY_ID));
    let h = upstream(&r, &o);
    assert!(up(&h, "x-api-key").is_empty());
    assert_eq!(up1(&h, "x-other").as_deref(), Some("kept"));
    assert_eq!(up1(&h, ":path").as_deref(), Some("/v1/x"));
    assert_eq!(up1(&h, "x-api-key-id").as_deref(), Some(KEY_ID));
    assert_eq!(up1(&h, "x-api-key-owner").as_deref(), Some(OWNER));

    let r = get("/v1/x").h("authorization", format!("Bearer {KEY}"));
    let o = g.run(&r);
    assert_allowed(&o);
    assert!(up(&upstream(&r, &o), "authorization").is_empty());
}

#[test]
fn step13_only_the_credential_is_stripped() {
    let mut g = Gate::with_key(json!({}), json!({}));
    let r = get("/v1/x")
        .key(KEY)
        .h("authorization", "Basic dXNlcjpwdw==");
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert!(up(&h, "x-api-key").is_empty());
    assert_eq!(
        up1(&h, "authorization").as_deref(),
        Some("Basic dXNlcjpwdw==")
    );
}

#[test]
fn step13_strip_credential_false_keeps_it() {
    let cfg = json!({"upstream": {"strip_credential": false}, "credentials": [{"header": "x-api-key"}, {"query": "api_key"}]});
    let mut g = Gate::with_key(cfg, json!({}));
    let r = get("/v1/x").key(KEY);
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert_eq!(up1(&h, "x-api-key").as_deref(), Some(KEY));
    assert_eq!(up1(&h, "x-api-key-id").as_deref(), Some(KEY_ID));
    let path = format!("/v1/x?api_key={KEY}&b=1");
    let r = get(&path);
    let o = g.run(&r);
    assert_allowed(&o);
    assert_eq!(up1(&upstream(&r, &o), ":path"), Some(path));
}

#[test]
fn step13_allowed_carries_rate_headers_on_the_response() {
    let cfg = json!({"rate_limit": {"default": [{"limit": 60, "window_s": 60}]}});
    let mut g = Gate::with_key(cfg, json!({}));
    let o = g.run(&get("/v1/x").key(KEY));
    assert_allowed(&o);
    assert_eq!(
        x_ratelimit(&o),
        (Some("60"), Some("59"), Some(ts(T0 + 60).as_str()))
    );
}

// ---------------------------------------------------------------------------------------------
// §4 responses
// ---------------------------------------------------------------------------------------------

#[test]
fn responses_default_bodies_for_every_class() {
    let cfg = json!({
        "ip_deny": ["198.51.100.0/24"],
        "routes": [{"path_prefix": "/admin", "scope": "admin"}]
    });
    let d = doc(
        json!({}),
        vec![
            the_key(json!({"rate_limits": [{"limit": 0, "window_s": 60}]})),
            key_entry("k_ok", "ak_ok", json!({})),
            key_entry("k_rev", "ak_rev", json!({"status": "revoked"})),
        ],
    );
    let mut g = Gate::with_doc(cfg.clone(), d);
    assert_refused(&g.run(&get("/x")), "missing_key");
    assert_refused(&g.run(&get("/x").key("ak_unknown")), "invalid_key");
    assert_refused(&g.run(&get("/x").key("ak_rev")), "expired_key");
    assert_refused(&g.run(&get("/admin").key("ak_ok")), "forbidden");
    assert_refused(
        &g.run(&get("/x").key("ak_ok").from("198.51.100.3")),
        "ip_denied",
    );
    let o = g.run(&get("/x").key(KEY));
    assert_refused(&o, "rate_limited");
    assert_eq!(body(&o), rate_limited_body(50));
    let mut g = Gate::empty(cfg);
    assert_refused(&g.run(&get("/x").key("ak_ok")), "unavailable");
}

#[test]
fn responses_override_every_field() {
    let cfg = json!({"errors": {"missing_key": {
        "status": 400,
        "body": "no key here",
        "content_type": "text/plain; charset=utf-8",
        "headers": {"WWW-Authenticate": "ApiKey realm=\"api\"", "x-doc": "https://example.com/auth"}
    }}});
    let mut g = Gate::with_key(cfg, json!({}));
    let o = g.run(&get("/x"));
    assert_class(&o, "missing_key");
    assert_eq!(status(&o), 400);
    assert_eq!(body(&o), "no key here");
    assert_eq!(
        reply_hdr(&o, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        reply_hdr(&o, "www-authenticate"),
        Some("ApiKey realm=\"api\"")
    );
    assert_eq!(reply_hdr(&o, "x-doc"), Some("https://example.com/auth"));
    // Other classes keep their defaults.
    assert_refused(&g.run(&get("/x").key("ak_nope")), "invalid_key");
}

#[test]
fn responses_partial_overrides_keep_the_other_defaults() {
    let cfg = json!({"errors": {
        "invalid_key": {"status": 403},
        "forbidden": {"body": "{\"message\":\"nope\"}"},
        "expired_key": {"content_type": "application/problem+json"}
    }, "routes": [{"path_prefix": "/admin", "scope": "admin"}]});
    let mut g = Gate::with_keys(
        cfg,
        vec![
            the_key(json!({})),
            key_entry("k_rev", "ak_rev", json!({"status": "revoked"})),
        ],
    );
    let o = g.run(&get("/x").key("ak_nope"));
    assert_class(&o, "invalid_key");
    assert_eq!(status(&o), 403);
    assert_eq!(body(&o), default_of("invalid_key").1);
    assert_eq!(reply_hdr(&o, "content-type"), Some("application/json"));
    let o = g.run(&get("/admin").key(KEY));
    assert_class(&o, "forbidden");
    assert_eq!(status(&o), 403);
    assert_eq!(body(&o), "{\"message\":\"nope\"}");
    assert_eq!(reply_hdr(&o, "content-type"), Some("application/json"));
    let o = g.run(&get("/x").key("ak_rev"));
    assert_class(&o, "expired_key");
    assert_eq!(status(&o), 401);
    assert_eq!(body(&o), default_of("expired_key").1);
    assert_eq!(
        reply_hdr(&o, "content-type"),
        Some("application/problem+json")
    );
}

#[test]
fn responses_rate_limited_template_substitutes_the_rate_context() {
    let cfg = json!({"errors": {"rate_limited": {
        "status": 503,
        "body": "retry={retry_after} limit={limit} remaining={remaining} reset={reset} {other}",
        "content_type": "text/plain",
        "headers": {"x-why": "slow down"}
    }}});
    let mut g = Gate::with_key(cfg, json!({"rate_limits": [{"limit": 2, "window_s": 60}]}));
    assert_allowed(&g.run(&get("/x").key(KEY)));
    assert_allowed(&g.run(&get("/x").key(KEY)));
    let o = g.run(&get("/x").key(KEY));
    assert_class(&o, "rate_limited");
    assert_eq!(status(&o), 503);
    assert_eq!(
        body(&o),
        format!("retry=50 limit=2 remaining=0 reset={} {{other}}", T0 + 60)
    );
    assert_eq!(reply_hdr(&o, "content-type"), Some("text/plain"));
    assert_eq!(reply_hdr(&o, "x-why"), Some("slow down"));
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(
        reply_x_ratelimit(&o),
        (Some("2"), Some("0"), Some(ts(T0 + 60).as_str()))
    );
}

#[test]
fn responses_template_is_zero_without_rate_context() {
    let tpl = "{retry_after}/{limit}/{remaining}/{reset}";
    let cfg = json!({
        "errors": {
            "missing_key": {"body": tpl},
            "invalid_key": {"body": tpl},
            "expired_key": {"body": tpl},
            "forbidden": {"body": tpl},
            "ip_denied": {"body": tpl},
            "unavailable": {"body": tpl}
        },
        "ip_deny": ["198.51.100.0/24"],
        "site": {"header": "x-site"},
        "rate_limit": {"default": [{"limit": 5, "window_s": 60}]}
    });
    let mut g = Gate::with_keys(
        cfg.clone(),
        vec![
            the_key(json!({"sites": ["a"]})),
            key_entry("k_rev", "ak_rev", json!({"status": "revoked"})),
        ],
    );
    let outcomes = [
        (g.run(&get("/x")), "missing_key"),
        (g.run(&get("/x").key("ak_nope")), "invalid_key"),
        (g.run(&get("/x").key("ak_rev")), "expired_key"),
        (g.run(&get("/x").key(KEY).h("x-site", "b")), "forbidden"),
        (g.run(&get("/x").key(KEY).from("198.51.100.1")), "ip_denied"),
        (Gate::empty(cfg).run(&get("/x").key(KEY)), "unavailable"),
    ];
    for (o, name) in outcomes {
        assert_class(&o, name);
        assert_eq!(body(&o), "0/0/0/0", "{name}");
        assert_eq!(status(&o), default_of(name).0, "{name}");
        assert!(no_rate_headers(&o.reply.as_ref().unwrap().headers), "{o:?}");
    }
}

#[test]
fn responses_invalid_key_limit_uses_the_rate_limited_override() {
    let cfg = merge_v(
        ikl(1),
        json!({"errors": {"rate_limited": {"body": "wait {retry_after}", "headers": {"x-a": "b"}}}}),
    );
    let mut g = Gate::with_key(cfg, json!({}));
    assert_class(&g.run(&get("/x").key("ak_bad")), "invalid_key");
    let o = g.run(&get("/x").key(KEY));
    assert_class(&o, "rate_limited");
    assert_eq!(status(&o), 429);
    assert_eq!(body(&o), "wait 50");
    assert_eq!(reply_hdr(&o, "retry-after"), Some("50"));
    assert_eq!(reply_hdr(&o, "x-a"), Some("b"));
}

#[test]
fn responses_spec_example_configuration_end_to_end() {
    let cfg = json!({
        "key_list": {"authority": "keys.internal", "headers": {"authorization": "Bearer service-token"}},
        "credentials": [
            {"header": "x-api-key"},
            {"header": "authorization", "scheme": "Bearer"},
            {"query": "api_key"}
        ],
        "key_prefixes": ["ak_"],
        "exempt": [{"preflight": true}, {"path_prefix": "/swagger"}, {"method": "GET", "path_exact": "/healthz"}],
        "client_ip": {"xff_trusted_hops": 0},
        "ip_allow": ["10.0.0.0/8", "2001:db8::/32"],
        "ip_deny": ["10.6.6.0/24"],
        "site": {"path_segment": 2},
        "routes": [
            {"path_prefix": "/public/v1/contacts", "methods": ["POST"], "scope": "contacts:write"},
            {"path_prefix": "/public/v1/contacts", "scope": "contacts:read"}
        ],
        "rate_limit": {"default": [{"limit": 60, "window_s": 60}], "headers": "x-ratelimit"},
        "invalid_key_limit": {"limit": 20, "window_s": 60},
        "upstream": {"strip_credential": true, "key_id_header": "x-api-key-id", "owner_header": "x-api-key-owner"},
        "errors": {
            "missing_key": {"status": 401, "body": "{\"error\":{\"code\":\"unauthorized\",\"message\":\"Invalid or missing API key\"}}"},
            "rate_limited": {"status": 429, "body": "{\"error\":{\"code\":\"rate_limit_exceeded\",\"retry_after\":{retry_after}}}"}
        }
    });
    let d = doc(
        json!({"owners": {"org-1": {"status": "active"}}}),
        vec![the_key(
            json!({"sites": ["v1"], "scopes": ["contacts:*"], "rate_limits": [{"limit": 2, "window_s": 60}]}),
        )],
    );
    let mut g = Gate::with_doc(cfg, d);
    let o = g.run(&get("/public/v1/contacts").from("10.1.1.1"));
    assert_class(&o, "missing_key");
    assert_eq!(status(&o), 401);
    assert_eq!(
        body(&o),
        r#"{"error":{"code":"unauthorized","message":"Invalid or missing API key"}}"#
    );
    let r = req("POST", &format!("/public/v1/contacts?api_key={KEY}&page=1")).from("10.1.1.1");
    let o = g.run(&r);
    assert_allowed(&o);
    let h = upstream(&r, &o);
    assert_eq!(
        up1(&h, ":path").as_deref(),
        Some("/public/v1/contacts?page=1")
    );
    assert_eq!(up1(&h, "x-api-key-id").as_deref(), Some(KEY_ID));
    assert_eq!(
        x_ratelimit(&o),
        (Some("2"), Some("1"), Some(ts(T0 + 60).as_str()))
    );
    assert_allowed(&g.run(&get("/public/v1/contacts").key(KEY).from("10.1.1.1")));
    let o = g.run(&get("/public/v1/contacts").key(KEY).from("10.1.1.1"));
    assert_class(&o, "rate_limited");
    assert_eq!(
        body(&o),
        r#"{"error":{"code":"rate_limit_exceeded","retry_after":50}}"#
    );
    assert_exempt(&g.run(&get("/healthz").from("10.1.1.1")));
    assert_refused(&g.run(&get("/healthz").from("10.6.6.6")), "ip_denied");
}
