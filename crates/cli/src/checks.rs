//! `keygate check-config` and `keygate check-keys`: the filter's own validation, every error
//! that can be found (not only the first), warnings about hazards, and a summary.

use crate::exit::{read_input, Failure};
use crate::json::Json;
use crate::newkey::unix_now;
use crate::source;
use crate::{print_json, say, Output};
use clap::Args;
use keygate_core::config::Config;
use serde_json::json;
use std::collections::HashMap;

/// Placeholders an `errors.<class>.body` template may use.
const ERROR_PLACEHOLDERS: &[&str] = &["retry_after", "limit", "remaining", "reset"];
/// Placeholders the `whoami.body` template may use.
const WHOAMI_PLACEHOLDERS: &[&str] = &[
    "retry_after",
    "limit",
    "remaining",
    "reset",
    "owner",
    "key_id",
];
/// "Expiring soon" in the key-list summary, in seconds.
const SOON_S: i64 = 7 * 86_400;
/// At most this many errors are listed for one key list.
const MAX_ERRORS: usize = 1000;

/// The long help of the subcommand.
pub const CHECK_CONFIG_LONG_ABOUT: &str = "\
Validate a plugin configuration exactly as the filter does; print \"ok\", or the error naming
the bad field by its JSON path. FILE may be the configuration as plain JSON, an Envoy bootstrap
(YAML or JSON) whose keygate wasm filter carries it in `configuration` (a StringValue), or an
Istio WasmPlugin manifest (`spec.pluginConfig`, among other YAML documents); every keygate
configuration in the file is checked. FILE - reads stdin.

Warnings (on stderr; in --json under \"warnings\") name hazards the filter accepts:
max_stale_s shorter than refresh_s + timeout_ms, unknown template placeholders, a route shadowed
by an earlier one, an exempt rule covering every path, the same credential source twice.";

#[derive(Args, Debug)]
pub struct CheckConfigArgs {
    /// The configuration file (`-`: stdin).
    #[arg(value_name = "FILE")]
    pub file: String,
    /// Exit 1 when there are warnings, too.
    #[arg(long)]
    pub deny_warnings: bool,
    #[command(flatten)]
    pub output: Output,
}

/// The long help of the subcommand.
pub const CHECK_KEYS_LONG_ABOUT: &str = "\
Validate a key-list document exactly as the filter does and report every error found (each
key is checked on its own, then ids and hashes across keys), each naming the bad field by its
JSON path (keys[3].hash). A valid list prints \"ok: N keys (version V)\" and a summary: active,
disabled, revoked, expired, expiring within 7 days, unusable because of their owner, and
without limits. FILE - reads stdin.";

#[derive(Args, Debug)]
pub struct CheckKeysArgs {
    /// The key-list file (`-`: stdin).
    #[arg(value_name = "FILE")]
    pub file: String,
    /// The plugin configuration, so that keys without own or plan limits are counted against
    /// its rate_limit.default (JSON, Envoy bootstrap or WasmPlugin).
    #[arg(long, value_name = "FILE")]
    pub config: Option<String>,
    /// The time to judge expiry at (RFC 3339, a date or Unix seconds; default now).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Exit 1 when there are warnings, too.
    #[arg(long)]
    pub deny_warnings: bool,
    #[command(flatten)]
    pub output: Output,
}

/// One error or warning: the JSON path it is about (empty when none) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

impl Issue {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A configuration or key-list error of the core, path and message as it gives them.
    pub fn from_doc(e: &keygate_core::json::DocError) -> Issue {
        Issue::new(e.path.clone(), e.message.clone())
    }

    /// Splits a core message `path: message` (a JSON path has no spaces).
    pub fn from_core(text: &str) -> Issue {
        if let Some((path, rest)) = text.split_once(": ") {
            let is_path = !path.is_empty()
                && path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.[]-:$@/".contains(&b));
            if is_path {
                return Issue::new(path, rest);
            }
        }
        Issue::new("", text)
    }

    fn text(&self) -> String {
        if self.path.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.path, self.message)
        }
    }

    fn to_json(&self) -> serde_json::Value {
        json!({"path": self.path, "message": self.message})
    }
}

fn issues_json(v: &[Issue]) -> Vec<serde_json::Value> {
    v.iter().map(Issue::to_json).collect()
}

// ---------------------------------------------------------------------------------------------
// check-config
// ---------------------------------------------------------------------------------------------

pub fn check_config(a: &CheckConfigArgs) -> Result<(), Failure> {
    let file = &a.file;
    let found = source::read(file)?;
    let mut errors: Vec<(String, Issue)> = Vec::new();
    let mut warnings: Vec<(String, Issue)> = Vec::new();
    for f in &found {
        match keygate_core::config::parse(&f.json) {
            Err(e) => errors.push((f.location.clone(), Issue::from_doc(&e))),
            Ok(cfg) => {
                for w in config_warnings(&cfg, f.value.as_ref()) {
                    warnings.push((f.location.clone(), w));
                }
            }
        }
    }
    let ok = errors.is_empty() && (warnings.is_empty() || !a.deny_warnings);
    let label = |loc: &str| {
        if loc.is_empty() {
            format!("{file}: ")
        } else {
            format!("{file}: {loc}: ")
        }
    };
    if a.output.json {
        let tag = |v: &[(String, Issue)]| -> Vec<serde_json::Value> {
            v.iter()
                .map(|(loc, i)| json!({"path": i.path, "message": i.message, "source": loc}))
                .collect()
        };
        print_json(&json!({
            "ok": ok,
            "errors": tag(&errors),
            "warnings": tag(&warnings),
            "summary": {
                "configurations": found.len(),
                "sources": found.iter().map(|f| f.location.clone()).collect::<Vec<_>>(),
                "errors": errors.len(),
                "warnings": warnings.len(),
            }
        }))?;
    } else {
        for (loc, w) in &warnings {
            eprintln!("keygate: warning: {}{}", label(loc), w.text());
        }
        for (loc, e) in &errors {
            eprintln!("keygate: {}{}", label(loc), e.text());
        }
        if !ok && errors.is_empty() {
            eprintln!(
                "keygate: {file}: {} warning{} denied (--deny-warnings)",
                warnings.len(),
                if warnings.len() == 1 { "" } else { "s" }
            );
        } else if errors.is_empty() {
            if found.len() == 1 {
                say("ok\n")?;
            } else {
                say(&format!("ok: {} configurations\n", found.len()))?;
            }
        }
    }
    if ok {
        Ok(())
    } else {
        Err(Failure::Reported)
    }
}

/// The placeholders `{name}` of a template (a name is lowercase letters, digits and `_`).
fn placeholders(template: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = rest.get(open + 1..).unwrap_or("");
        let len = after
            .bytes()
            .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
            .count();
        if len > 0 && after.as_bytes().get(len) == Some(&b'}') {
            out.push(after.get(..len).unwrap_or(""));
        }
        rest = after;
    }
    out
}

/// A route or exempt rule as the operator wrote it, normalised like the filter does.
#[derive(Debug)]
struct RawRule {
    prefix: Option<String>,
    exact: Option<String>,
    methods: Vec<String>,
}

fn raw_rule(v: &Json) -> RawRule {
    let norm = |k: &str| {
        v.get(k)
            .and_then(Json::as_str)
            .map(keygate_core::path::normalize)
    };
    let mut methods: Vec<String> = match v.get("methods") {
        Some(Json::Array(m)) => m
            .iter()
            .filter_map(Json::as_str)
            .map(str::to_ascii_uppercase)
            .collect(),
        _ => Vec::new(),
    };
    if let Some(m) = v.get("method").and_then(Json::as_str) {
        methods.push(m.to_ascii_uppercase());
    }
    RawRule {
        prefix: norm("path_prefix"),
        exact: norm("path_exact"),
        methods,
    }
}

/// Whether every request `later` matches is matched by `earlier` (so `later` never decides).
fn shadows(earlier: &RawRule, later: &RawRule) -> bool {
    let methods = earlier.methods.is_empty()
        || (!later.methods.is_empty() && later.methods.iter().all(|m| earlier.methods.contains(m)));
    if !methods {
        return false;
    }
    match (&earlier.prefix, &earlier.exact, &later.prefix, &later.exact) {
        (Some(p), None, Some(q), None) | (Some(p), None, None, Some(q)) => {
            keygate_core::path::prefix_matches(p, q)
        }
        (None, Some(p), None, Some(q)) => p == q,
        _ => false,
    }
}

fn array<'a>(v: Option<&'a Json>, key: &str) -> &'a [Json] {
    match v.and_then(|v| v.get(key)) {
        Some(Json::Array(a)) => a,
        _ => &[],
    }
}

/// Hazards in a valid configuration (`raw`: as written, when it is JSON).
pub fn config_warnings(cfg: &Config, raw: Option<&Json>) -> Vec<Issue> {
    let mut out = Vec::new();
    let kl = &cfg.key_list;
    let needed_s = kl.refresh_s + kl.timeout_ms.div_ceil(1000);
    if kl.max_stale_s > 0 && kl.max_stale_s < needed_s {
        out.push(Issue::new(
            "key_list.max_stale_s",
            format!(
                "{} s is shorter than refresh_s + timeout_ms ({} s + {} ms): the list goes stale between two refreshes and the filter then answers 503 (unavailable) most of the time; use at least {} s (better: a few refreshes)",
                kl.max_stale_s, kl.refresh_s, kl.timeout_ms, needed_s
            ),
        ));
    }
    if let Some(Json::Object(errors)) = raw.and_then(|r| r.get("errors")) {
        for (class, e) in errors {
            if let Some(body) = e.get("body").and_then(Json::as_str) {
                for p in placeholders(body) {
                    if !ERROR_PLACEHOLDERS.contains(&p) {
                        out.push(Issue::new(
                            format!("errors.{class}.body"),
                            format!("unknown placeholder {{{p}}} is sent as written (known: {{retry_after}}, {{limit}}, {{remaining}}, {{reset}})"),
                        ));
                    }
                }
            }
        }
    }
    if let Some(w) = &cfg.whoami {
        for p in placeholders(&w.body) {
            if !WHOAMI_PLACEHOLDERS.contains(&p) {
                out.push(Issue::new(
                    "whoami.body",
                    format!("unknown placeholder {{{p}}} is sent as written (known: {{owner}}, {{key_id}}, {{retry_after}}, {{limit}}, {{remaining}}, {{reset}})"),
                ));
            }
        }
    }
    let routes: Vec<RawRule> = array(raw, "routes").iter().map(raw_rule).collect();
    for (j, later) in routes.iter().enumerate() {
        if let Some(i) = (0..j).find(|i| routes.get(*i).is_some_and(|e| shadows(e, later))) {
            out.push(Issue::new(
                format!("routes[{j}]"),
                format!("shadowed by routes[{i}], which matches every request it matches: it never decides"),
            ));
        }
    }
    for (i, e) in array(raw, "exempt").iter().enumerate() {
        let r = raw_rule(e);
        let preflight = matches!(e.get("preflight"), Some(Json::Bool(true)));
        let every_path = r.exact.is_none() && r.prefix.as_deref().is_none_or(|p| p == "/");
        if every_path && !preflight {
            let methods = if r.methods.is_empty() {
                "every request".to_string()
            } else {
                format!("every {} request", r.methods.join("/"))
            };
            out.push(Issue::new(
                format!("exempt[{i}]"),
                format!("covers every path: {methods} skips the key check"),
            ));
        }
    }
    let mut seen: Vec<(String, usize)> = Vec::new();
    for (i, c) in array(raw, "credentials").iter().enumerate() {
        let id = match (
            c.get("header").and_then(Json::as_str),
            c.get("query").and_then(Json::as_str),
        ) {
            (Some(h), _) => format!(
                "header {} {}",
                h.to_ascii_lowercase(),
                c.get("scheme")
                    .and_then(Json::as_str)
                    .unwrap_or("")
                    .to_ascii_lowercase()
            ),
            (None, Some(q)) => format!("query {q}"),
            _ => continue,
        };
        match seen.iter().find(|(s, _)| *s == id) {
            Some((_, first)) => out.push(Issue::new(
                format!("credentials[{i}]"),
                format!("the same credential source as credentials[{first}]: it is never used"),
            )),
            None => seen.push((id, i)),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// check-keys
// ---------------------------------------------------------------------------------------------

/// Drops a trailing ` at line N column M` (positions in a rebuilt document mean nothing).
fn without_position(message: &str) -> String {
    if let Some(at) = message.rfind(" at line ") {
        let tail = message.get(at + 9..).unwrap_or("");
        let mut parts = tail.split(' ');
        let is_pos = matches!(
            (parts.next(), parts.next(), parts.next(), parts.next()),
            (Some(l), Some("column"), Some(c), None)
                if l.bytes().all(|b| b.is_ascii_digit()) && c.bytes().all(|b| b.is_ascii_digit())
        );
        if is_pos {
            return message.get(..at).unwrap_or(message).to_string();
        }
    }
    message.to_string()
}

fn doc_with(head: &[(String, Json)], keys: Vec<Json>) -> Json {
    let mut members: Vec<(String, Json)> = head.to_vec();
    members.push(("keys".into(), Json::Array(keys)));
    Json::Object(members)
}

fn core_error(doc: &Json) -> Option<String> {
    let bytes = serde_json::to_vec(doc).ok()?;
    keygate_core::keylist::parse(&bytes)
        .err()
        .map(|e| e.to_string())
}

/// Adds `issue` unless the same one (positions aside) is there already.
fn push_unique(out: &mut Vec<Issue>, issue: Issue) {
    let same = |i: &Issue| {
        i.path == issue.path && without_position(&i.message) == without_position(&issue.message)
    };
    if !out.iter().any(same) {
        out.push(issue);
    }
}

/// The errors of each member of one key checked alone (the required members replaced by valid
/// placeholders, except the one checked). Empty when the key is not an object.
fn per_member_errors(head: &[(String, Json)], key: &Json) -> Vec<String> {
    let Json::Object(members) = key else {
        return Vec::new();
    };
    let placeholders = [
        ("id", Json::str("keygate-check")),
        ("hash", Json::String("0".repeat(64))),
        ("owner", Json::str("keygate-check")),
    ];
    let mut out = Vec::new();
    // A missing required member shows only without placeholders.
    let required: Vec<(String, Json)> = members
        .iter()
        .filter(|(k, _)| placeholders.iter().any(|(p, _)| p == k))
        .cloned()
        .collect();
    if let Some(e) = core_error(&doc_with(head, vec![Json::Object(required)])) {
        out.push(e);
    }
    for (name, value) in members {
        let mut alone: Vec<(String, Json)> = placeholders
            .iter()
            .filter(|(p, _)| p != name)
            .map(|(p, v)| (p.to_string(), v.clone()))
            .collect();
        alone.push((name.clone(), value.clone()));
        if let Some(e) = core_error(&doc_with(head, vec![Json::Object(alone)])) {
            if !out.contains(&e) {
                out.push(e);
            }
        }
    }
    out
}

/// Every error of an invalid key list: the parser's own first error, then each key checked
/// on its own (against the document's owners and plans) and ids and hashes across keys.
pub fn every_keylist_error(data: &[u8], first: &keygate_core::json::DocError) -> Vec<Issue> {
    let mut out = vec![Issue::from_doc(first)];
    let Ok(Json::Object(members)) = serde_json::from_slice::<Json>(data) else {
        return out; // not JSON: nothing past the first error can be read
    };
    let Some(Json::Array(keys)) = members.iter().find(|(k, _)| k == "keys").map(|(_, v)| v) else {
        return out;
    };
    let full_head: Vec<(String, Json)> = members
        .iter()
        .filter(|(k, _)| k != "keys")
        .cloned()
        .collect();
    let pick = |names: &[&str]| -> Vec<(String, Json)> {
        full_head
            .iter()
            .filter(|(k, _)| names.contains(&k.as_str()))
            .cloned()
            .collect()
    };
    // The head the keys are checked against: the document's, else as much of it as is valid.
    let mut head = Vec::new();
    for candidate in [
        full_head.clone(),
        pick(&["plans", "owners"]),
        pick(&["plans"]),
    ] {
        match core_error(&doc_with(&candidate, vec![])) {
            None => {
                head = candidate;
                break;
            }
            Some(e) => {
                let issue = Issue::from_core(&without_position(&e));
                push_unique(&mut out, issue);
            }
        }
    }
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut hashes: HashMap<String, usize> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        if out.len() >= MAX_ERRORS {
            out.push(Issue::new("", format!("stopped after {MAX_ERRORS} errors")));
            break;
        }
        if let Some(e) = core_error(&doc_with(&head, vec![key.clone()])) {
            // The parser stops at a key's first error: check each member on its own too,
            // beside placeholders for the required ones.
            let mut found = per_member_errors(&head, key);
            if found.is_empty() {
                found.push(e);
            }
            for e in found {
                let e = without_position(&e);
                let e = match e.strip_prefix("keys[0]") {
                    Some(rest) => format!("keys[{i}]{rest}"),
                    None => e,
                };
                let issue = Issue::from_core(&e);
                push_unique(&mut out, issue);
            }
        }
        let id = key.get("id").and_then(Json::as_str);
        if let Some(id) = id {
            if ids.insert(id, i).is_some() {
                let issue = Issue::new(format!("keys[{i}].id"), format!("duplicate id {id:?}"));
                push_unique(&mut out, issue);
            }
        }
        if let Some(h) = key.get("hash").and_then(Json::as_str) {
            if h.len() == 64 && hashes.insert(h.to_ascii_lowercase(), i).is_some() {
                let issue = Issue::new(
                    format!("keys[{i}].hash"),
                    format!("duplicate hash (key {:?})", id.unwrap_or("")),
                );
                push_unique(&mut out, issue);
            }
        }
    }
    out
}

/// Counts of a key list's keys, judged at `now` (Unix seconds).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub keys: usize,
    pub active: usize,
    pub disabled: usize,
    pub revoked: usize,
    pub deleted: usize,
    /// Any other status (not active, as SPEC §2 says of an unknown status).
    pub other_status: usize,
    /// Active, but `expires_at` has passed.
    pub expired: usize,
    /// Active, and `expires_at` within 7 days.
    pub expiring_7d: usize,
    /// Active and unexpired, but refused because their owner is missing or not active.
    pub owner_unusable: usize,
    /// Without any limit: no own or plan limits and (with a configuration) no default.
    pub without_limits: usize,
}

/// A key's `expires_at` as Unix seconds.
pub fn expiry(key: &Json) -> Option<i64> {
    match key.get("expires_at")? {
        Json::Number(n) => n.as_i64(),
        Json::String(s) => keygate_core::time::parse_rfc3339(s),
        _ => None,
    }
}

/// The summary and its warnings. `default_limits`: `Some(n)` when a configuration says how
/// many default limits apply.
pub fn summarise(doc: &Json, now: i64, default_limits: Option<usize>) -> (Summary, Vec<Issue>) {
    let mut s = Summary::default();
    let mut warnings = Vec::new();
    let owners = match doc.get("owners") {
        Some(Json::Object(o)) => Some(o),
        _ => None,
    };
    let plan_limits = |plan: &str| -> Option<usize> {
        match doc.get("plans")?.get(plan)?.get("rate_limits")? {
            Json::Array(a) => Some(a.len()),
            _ => None,
        }
    };
    for (i, k) in array(Some(doc), "keys").iter().enumerate() {
        s.keys += 1;
        let id = k.get("id").and_then(Json::as_str).unwrap_or("");
        match k.get("status").and_then(Json::as_str).unwrap_or("active") {
            "active" => s.active += 1,
            "disabled" => s.disabled += 1,
            "revoked" => s.revoked += 1,
            "deleted" => s.deleted += 1,
            _ => s.other_status += 1,
        }
        let active = k.get("status").and_then(Json::as_str).unwrap_or("active") == "active";
        let exp = expiry(k);
        let expired = exp.is_some_and(|t| now >= t);
        if active && expired {
            s.expired += 1;
        }
        if active && !expired && exp.is_some_and(|t| t - now <= SOON_S) {
            s.expiring_7d += 1;
            warnings.push(Issue::new(
                format!("keys[{i}].expires_at"),
                format!(
                    "key {id:?} expires within 7 days, at {}",
                    keygate_core::time::format_rfc3339(exp.unwrap_or(now))
                ),
            ));
        }
        if let (Some(owners), true) = (owners, active && !expired) {
            let owner = k.get("owner").and_then(Json::as_str).unwrap_or("");
            let ok = owners
                .iter()
                .find(|(n, _)| n == owner)
                .is_some_and(|(_, o)| {
                    o.get("status")
                        .is_none_or(|st| st.as_str() == Some("active"))
                });
            if !ok {
                s.owner_unusable += 1;
                warnings.push(Issue::new(
                    format!("keys[{i}].owner"),
                    format!("key {id:?} is refused (invalid_key): its owner {owner:?} is missing from \"owners\" or not active"),
                ));
            }
        }
        let own = match k.get("rate_limits") {
            Some(Json::Array(a)) => Some(a.len()),
            _ => None,
        };
        let effective = own
            .or_else(|| k.get("plan").and_then(Json::as_str).and_then(plan_limits))
            .or(default_limits)
            .unwrap_or(0);
        if effective == 0 {
            s.without_limits += 1;
        }
    }
    (s, warnings)
}

impl Summary {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "keys": self.keys, "active": self.active, "disabled": self.disabled,
            "revoked": self.revoked, "deleted": self.deleted, "other_status": self.other_status,
            "expired": self.expired,
            "expiring_7d": self.expiring_7d, "owner_unusable": self.owner_unusable,
            "without_limits": self.without_limits,
        })
    }

    fn line(&self, exact_limits: bool) -> String {
        format!(
            "summary: {} active, {} disabled, {} revoked, {} deleted{}; {} expired, {} expiring within 7 days, {} unusable because of their owner, {} without limits{}",
            self.active, self.disabled, self.revoked, self.deleted,
            if self.other_status > 0 {
                format!(", {} with another status (not active)", self.other_status)
            } else {
                String::new()
            },
            self.expired,
            self.expiring_7d, self.owner_unusable, self.without_limits,
            if exact_limits { "" } else { " (of their own or their plan's; rate_limit.default may apply)" }
        )
    }
}

pub fn check_keys(a: &CheckKeysArgs) -> Result<(), Failure> {
    let file = &a.file;
    let data = read_input(file)?;
    let now = match &a.at {
        None => unix_now(),
        Some(t) => crate::newkey::parse_instant(t).ok_or_else(|| {
            Failure::Usage(format!(
                "--at: {t:?} is not RFC 3339, a date or Unix seconds"
            ))
        })?,
    };
    let default_limits = match &a.config {
        None => None,
        Some(c) => {
            let f = source::read_one(c)?;
            let cfg = keygate_core::config::parse(&f.json)
                .map_err(|e| Failure::Invalid(format!("{c}: {e}")))?;
            Some(cfg.default_limits.len())
        }
    };
    let parsed = keygate_core::keylist::parse(&data);
    let errors = match &parsed {
        Ok(_) => Vec::new(),
        Err(e) => every_keylist_error(&data, e),
    };
    let doc: Option<Json> = serde_json::from_slice(&data).ok();
    let (summary, warnings) = match &doc {
        Some(d) => summarise(d, now, default_limits),
        None => (Summary::default(), Vec::new()),
    };
    let version = parsed.as_ref().ok().and_then(|l| l.version.clone());
    let ok = errors.is_empty() && (warnings.is_empty() || !a.deny_warnings);
    if a.output.json {
        let mut sj = summary.to_json();
        if let Some(m) = sj.as_object_mut() {
            m.insert("version".into(), json!(version));
            m.insert("errors".into(), json!(errors.len()));
            m.insert("warnings".into(), json!(warnings.len()));
        }
        print_json(&json!({
            "ok": ok,
            "errors": issues_json(&errors),
            "warnings": issues_json(&warnings),
            "summary": sj,
        }))?;
    } else {
        for w in &warnings {
            eprintln!("keygate: warning: {file}: {}", w.text());
        }
        for e in &errors {
            eprintln!("keygate: {file}: {}", e.text());
        }
        match &parsed {
            Ok(_) if !ok => eprintln!(
                "keygate: {file}: {} warning{} denied (--deny-warnings)",
                warnings.len(),
                if warnings.len() == 1 { "" } else { "s" }
            ),
            Ok(list) => say(&format!(
                "ok: {} keys (version {})\n{}\n",
                list.len(),
                list.version.as_deref().unwrap_or("none"),
                summary.line(default_limits.is_some())
            ))?,
            Err(_) => eprintln!(
                "keygate: {file}: {} error{} (the filter rejects the whole list)",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            ),
        }
    }
    if ok {
        Ok(())
    } else {
        Err(Failure::Reported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found() {
        assert_eq!(
            placeholders(r#"{"error":{"retry_after":{retry_after},"x":"{bogus}{ Not}"}}"#),
            vec!["retry_after", "bogus"]
        );
    }

    #[test]
    fn positions_are_dropped() {
        assert_eq!(without_position("x: bad at line 1 column 20"), "x: bad");
        assert_eq!(without_position("x: bad at line one"), "x: bad at line one");
    }

    #[test]
    fn core_messages_split_at_their_path() {
        assert_eq!(
            Issue::from_core("keys[3].hash: not a 64-digit hex SHA-256 (3 characters)"),
            Issue::new("keys[3].hash", "not a 64-digit hex SHA-256 (3 characters)")
        );
        assert_eq!(
            Issue::from_core("invalid JSON: EOF while parsing"),
            Issue::new("", "invalid JSON: EOF while parsing")
        );
    }

    #[test]
    fn shadowing() {
        let r = |p: Option<&str>, e: Option<&str>, m: &[&str]| RawRule {
            prefix: p.map(str::to_string),
            exact: e.map(str::to_string),
            methods: m.iter().map(|s| s.to_string()).collect(),
        };
        assert!(shadows(
            &r(Some("/a"), None, &[]),
            &r(Some("/a/b"), None, &["GET"])
        ));
        assert!(shadows(
            &r(Some("/a"), None, &[]),
            &r(None, Some("/a"), &[])
        ));
        assert!(!shadows(
            &r(Some("/a"), None, &["GET"]),
            &r(Some("/a/b"), None, &[])
        ));
        assert!(!shadows(
            &r(Some("/a/b"), None, &[]),
            &r(Some("/a"), None, &[])
        ));
        assert!(!shadows(
            &r(Some("/ab"), None, &[]),
            &r(Some("/abc"), None, &[])
        ));
        assert!(!shadows(
            &r(None, Some("/a"), &[]),
            &r(Some("/a"), None, &[])
        ));
    }
}
