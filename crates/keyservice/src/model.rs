//! Request bodies, validated whole before anything is written, with the same rules the filter
//! applies to the key-list document (SPEC §2), so the service can never publish a document a
//! gateway rejects. Every error names the member as a JSON path (`rate_limits[0].limit`).

use crate::error::ApiError;
use crate::util;
use keygate_core::config::Limit;
use keygate_core::ipset::IpSet;
use keygate_core::keylist::valid_name;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// Default key prefix (SPEC §7).
pub const DEFAULT_PREFIX: &str = "kg_";
/// Default random bytes per key.
pub const DEFAULT_BYTES: u64 = 24;
/// Random bytes per key accepted: 128 to 2048 bits.
pub const MIN_BYTES: u64 = 16;
pub const MAX_BYTES: u64 = 256;
/// Longest prefix accepted, in bytes.
pub const MAX_PREFIX: usize = 64;
/// Longest `name`, in characters.
pub const MAX_NAME: usize = 256;
/// Longest `description`, in characters.
pub const MAX_DESCRIPTION: usize = 4096;
/// Most entries in `scopes`, `sites` or `allowed_ips`.
pub const MAX_LIST: usize = 1000;
/// Most entries in `rate_limits`.
pub const MAX_LIMITS: usize = 100;
/// Latest instant RFC 3339 can write (9999-12-31T23:59:59Z), in Unix seconds.
pub const MAX_UNIX: i64 = 253_402_300_799;
/// Longest rotation overlap: ten years, in seconds.
pub const MAX_OVERLAP_S: i64 = 10 * 366 * 86_400;

/// One fixed-window limit: at most `limit` requests per `window_s` seconds (SPEC §2).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u64,
    pub window_s: u64,
}

/// A JSON value read strictly: an object that names a member twice is an error (SPEC §2's rule
/// for the document, applied to request bodies too).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Strict(Value::Array(out)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!(
                    "member {k:?} appears twice"
                )));
            }
            out.insert(k, v);
        }
        Ok(Strict(Value::Object(out)))
    }
}

/// Parses a request body that must be one JSON object (a leading byte-order mark is ignored).
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let de = &mut serde_json::Deserializer::from_slice(body);
    let parsed = Strict::deserialize(&mut *de).and_then(|v| de.end().map(|_| v));
    match parsed {
        Ok(Strict(Value::Object(m))) => Ok(m),
        Ok(_) => Err(ApiError::bad_body("the request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_body(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Rejects members other than `allowed`; members in `fixed` get "cannot change after creation".
pub fn check_members(
    m: &Map<String, Value>,
    prefix: &str,
    allowed: &[&str],
    fixed: &[&str],
) -> Result<(), ApiError> {
    for k in m.keys() {
        if allowed.contains(&k.as_str()) {
            continue;
        }
        let field = format!("{prefix}{k}");
        if fixed.contains(&k.as_str()) {
            return Err(ApiError::bad(
                field,
                format!("{k} cannot change after creation"),
            ));
        }
        return Err(ApiError::bad(field, format!("unknown member {k:?}")));
    }
    Ok(())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An id or owner: 1–256 visible ASCII characters (SPEC §2).
pub fn name(v: &Value, field: &str) -> Result<String, ApiError> {
    let Value::String(s) = v else {
        return Err(ApiError::bad(
            field,
            format!("expected a string, found {}", type_name(v)),
        ));
    };
    if !valid_name(s) {
        return Err(ApiError::bad(
            field,
            format!("{s:?} is not 1-256 visible ASCII characters"),
        ));
    }
    Ok(s.clone())
}

/// Free text for people (`name`, `description`): `null` or a string of at most `max`
/// characters without control characters (newline and tab allowed in `description`).
pub fn text(
    v: &Value,
    field: &str,
    max: usize,
    multiline: bool,
) -> Result<Option<String>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => {
            if s.chars().count() > max {
                return Err(ApiError::bad(
                    field,
                    format!("longer than {max} characters"),
                ));
            }
            if s.chars()
                .any(|c| c.is_control() && !(multiline && (c == '\n' || c == '\t')))
            {
                return Err(ApiError::bad(field, "contains a control character"));
            }
            Ok(Some(s.clone()))
        }
        other => Err(ApiError::bad(
            field,
            format!("expected a string or null, found {}", type_name(other)),
        )),
    }
}

/// A list of names (`scopes`, `sites`); `null` is the empty list when `nullable`.
pub fn names(v: &Value, field: &str, nullable: bool) -> Result<Vec<String>, ApiError> {
    let items = match v {
        Value::Null if nullable => return Ok(Vec::new()),
        Value::Array(a) => a,
        other => {
            return Err(ApiError::bad(
                field,
                format!("expected an array of strings, found {}", type_name(other)),
            ))
        }
    };
    if items.len() > MAX_LIST {
        return Err(ApiError::bad(
            field,
            format!("more than {MAX_LIST} entries"),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, s)| name(s, &format!("{field}[{i}]")))
        .collect()
}

/// `allowed_ips`: addresses or CIDRs, checked with the filter's own parser.
pub fn ips(v: &Value, field: &str, nullable: bool) -> Result<Vec<String>, ApiError> {
    let items = match v {
        Value::Null if nullable => return Ok(Vec::new()),
        Value::Array(a) => a,
        other => {
            return Err(ApiError::bad(
                field,
                format!("expected an array of strings, found {}", type_name(other)),
            ))
        }
    };
    if items.len() > MAX_LIST {
        return Err(ApiError::bad(
            field,
            format!("more than {MAX_LIST} entries"),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let Value::String(s) = item else {
            return Err(ApiError::bad(
                f,
                format!("expected a string, found {}", type_name(item)),
            ));
        };
        if IpSet::parse(&[s.as_str()]).is_err() {
            return Err(ApiError::bad(
                f,
                format!("{s:?} is not an IP address or CIDR"),
            ));
        }
        out.push(s.clone());
    }
    Ok(out)
}

fn integer(v: &Value, field: &str) -> Result<u64, ApiError> {
    v.as_u64().ok_or_else(|| {
        ApiError::bad(
            field,
            format!("expected a non-negative integer, found {}", describe(v)),
        )
    })
}

fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        other => type_name(other).to_string(),
    }
}

/// `rate_limits`: an array of `{"limit": N, "window_s": S}` with the filter's bounds.
pub fn limits(v: &Value, field: &str) -> Result<Vec<RateLimit>, ApiError> {
    let Value::Array(items) = v else {
        return Err(ApiError::bad(
            field,
            format!(
                "expected an array of limits or null, found {}",
                type_name(v)
            ),
        ));
    };
    if items.len() > MAX_LIMITS {
        return Err(ApiError::bad(
            field,
            format!("more than {MAX_LIMITS} limits"),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let Value::Object(m) = item else {
            return Err(ApiError::bad(
                f,
                format!("expected an object, found {}", type_name(item)),
            ));
        };
        check_members(m, &format!("{f}."), &["limit", "window_s"], &[])?;
        let limit = integer(
            m.get("limit").unwrap_or(&Value::Null),
            &format!("{f}.limit"),
        )?;
        let window_s = integer(
            m.get("window_s").unwrap_or(&Value::Null),
            &format!("{f}.window_s"),
        )?;
        if let Err(e) = (Limit { limit, window_s }).validate() {
            let sub = if e.path.is_empty() { "limit" } else { &e.path };
            return Err(ApiError::bad(format!("{f}.{sub}"), e.message));
        }
        out.push(RateLimit { limit, window_s });
    }
    Ok(out)
}

/// `rate_limits` that may be `null` (inherit).
pub fn opt_limits(v: &Value, field: &str) -> Result<Option<Vec<RateLimit>>, ApiError> {
    match v {
        Value::Null => Ok(None),
        other => limits(other, field).map(Some),
    }
}

/// A time: RFC 3339 (as the filter reads it) or integer Unix seconds, in years 0000–9999.
pub fn time(v: &Value, field: &str) -> Result<i64, ApiError> {
    let t = match v {
        Value::String(s) => keygate_core::time::parse_rfc3339(s)
            .ok_or_else(|| ApiError::bad(field, format!("{s:?} is not an RFC 3339 date-time")))?,
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| ApiError::bad(field, format!("{n} is not integer Unix seconds")))?,
        other => {
            return Err(ApiError::bad(
                field,
                format!("expected an RFC 3339 date-time, found {}", type_name(other)),
            ))
        }
    };
    if !(0..=MAX_UNIX).contains(&t) {
        return Err(ApiError::bad(field, "outside years 1970-9999"));
    }
    Ok(t)
}

/// A future expiry (creation and rotation).
pub fn future_time(v: &Value, field: &str, now: i64) -> Result<i64, ApiError> {
    let t = time(v, field)?;
    if t <= now {
        return Err(ApiError::bad(field, "is not in the future"));
    }
    Ok(t)
}

/// Settings a key carries besides its identity (SPEC §7: what PATCH may change, status aside).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    pub name: Option<String>,
    pub description: Option<String>,
    pub scopes: Vec<String>,
    pub sites: Vec<String>,
    pub allowed_ips: Vec<String>,
    pub plan: Option<String>,
    pub rate_limits: Option<Vec<RateLimit>>,
}

/// Key encodings (SPEC §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Base62,
    Hex,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Base62 => "base62",
            Encoding::Hex => "hex",
        }
    }

    pub fn parse(s: &str) -> Option<Encoding> {
        match s {
            "base62" => Some(Encoding::Base62),
            "hex" => Some(Encoding::Hex),
            _ => None,
        }
    }
}

/// `POST /v1/admin/keys`.
#[derive(Clone, Debug)]
pub struct CreateKey {
    /// Extension: an id chosen by the caller (default `key_` + 16 random hex digits).
    pub id: Option<String>,
    pub owner: String,
    pub prefix: String,
    pub encoding: Encoding,
    pub bytes: u64,
    pub settings: Settings,
    pub expires_at: Option<i64>,
}

const SETTING_MEMBERS: &[&str] = &[
    "name",
    "description",
    "scopes",
    "sites",
    "allowed_ips",
    "plan",
    "rate_limits",
];

fn settings_member(s: &mut Settings, k: &str, v: &Value) -> Result<(), ApiError> {
    match k {
        "name" => s.name = text(v, k, MAX_NAME, false)?,
        "description" => s.description = text(v, k, MAX_DESCRIPTION, true)?,
        "scopes" => s.scopes = names(v, k, true)?,
        "sites" => s.sites = names(v, k, true)?,
        "allowed_ips" => s.allowed_ips = ips(v, k, true)?,
        "plan" => {
            s.plan = match v {
                Value::Null => None,
                other => Some(name(other, k)?),
            }
        }
        "rate_limits" => s.rate_limits = opt_limits(v, k)?,
        _ => {}
    }
    Ok(())
}

/// Validates a create body.
pub fn create_key(m: &Map<String, Value>, now: i64) -> Result<CreateKey, ApiError> {
    let mut allowed = vec!["id", "owner", "prefix", "encoding", "bytes", "expires_at"];
    allowed.extend_from_slice(SETTING_MEMBERS);
    check_members(m, "", &allowed, &[])?;
    let owner = match m.get("owner") {
        None => return Err(ApiError::bad("owner", "owner is required")),
        Some(v) => name(v, "owner")?,
    };
    let id = match m.get("id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(name(v, "id")?),
    };
    let prefix = match m.get("prefix") {
        None | Some(Value::Null) => DEFAULT_PREFIX.to_string(),
        Some(v) => prefix(v)?,
    };
    let encoding = match m.get("encoding") {
        None | Some(Value::Null) => Encoding::Base62,
        Some(Value::String(s)) => Encoding::parse(s).ok_or_else(|| {
            ApiError::bad("encoding", format!("{s:?} is not \"base62\" or \"hex\""))
        })?,
        Some(other) => {
            return Err(ApiError::bad(
                "encoding",
                format!("expected \"base62\" or \"hex\", found {}", type_name(other)),
            ))
        }
    };
    let bytes = match m.get("bytes") {
        None | Some(Value::Null) => DEFAULT_BYTES,
        Some(v) => {
            let n = integer(v, "bytes")?;
            if !(MIN_BYTES..=MAX_BYTES).contains(&n) {
                return Err(ApiError::bad(
                    "bytes",
                    format!("{n} is outside {MIN_BYTES}..={MAX_BYTES}"),
                ));
            }
            n
        }
    };
    let expires_at = match m.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(v) => Some(future_time(v, "expires_at", now)?),
    };
    let mut settings = Settings::default();
    for (k, v) in m {
        settings_member(&mut settings, k, v)?;
    }
    Ok(CreateKey {
        id,
        owner,
        prefix,
        encoding,
        bytes,
        settings,
        expires_at,
    })
}

fn prefix(v: &Value) -> Result<String, ApiError> {
    let Value::String(s) = v else {
        return Err(ApiError::bad(
            "prefix",
            format!("expected a string, found {}", type_name(v)),
        ));
    };
    if s.len() > MAX_PREFIX
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(ApiError::bad(
            "prefix",
            format!("{s:?} must be at most {MAX_PREFIX} letters, digits, '_', '-' or '.'"),
        ));
    }
    Ok(s.clone())
}

/// `PATCH /v1/admin/keys/{id}`: each member absent (`None`) or its new value.
#[derive(Clone, Debug, Default)]
pub struct PatchKey {
    pub name: Option<Option<String>>,
    pub description: Option<Option<String>>,
    pub scopes: Option<Vec<String>>,
    pub sites: Option<Vec<String>>,
    pub allowed_ips: Option<Vec<String>>,
    pub plan: Option<Option<String>>,
    pub rate_limits: Option<Option<Vec<RateLimit>>>,
    pub status: Option<String>,
}

/// Statuses PATCH may set.
pub const SETTABLE_STATUSES: &[&str] = &["active", "disabled", "revoked"];

/// Validates a PATCH body.
pub fn patch_key(m: &Map<String, Value>) -> Result<PatchKey, ApiError> {
    let mut allowed = SETTING_MEMBERS.to_vec();
    allowed.push("status");
    check_members(
        m,
        "",
        &allowed,
        &[
            "expires_at",
            "key",
            "hash",
            "id",
            "owner",
            "prefix",
            "encoding",
            "bytes",
            "created_at",
            "updated_at",
            "last_used_at",
        ],
    )?;
    let mut p = PatchKey::default();
    for (k, v) in m {
        let k = k.as_str();
        match k {
            "name" => p.name = Some(text(v, k, MAX_NAME, false)?),
            "description" => p.description = Some(text(v, k, MAX_DESCRIPTION, true)?),
            "scopes" => p.scopes = Some(names(v, k, true)?),
            "sites" => p.sites = Some(names(v, k, true)?),
            "allowed_ips" => p.allowed_ips = Some(ips(v, k, true)?),
            "plan" => {
                p.plan = Some(match v {
                    Value::Null => None,
                    other => Some(name(other, k)?),
                })
            }
            "rate_limits" => p.rate_limits = Some(opt_limits(v, k)?),
            "status" => {
                let Value::String(s) = v else {
                    return Err(ApiError::bad(
                        "status",
                        format!(
                            "expected one of active, disabled, revoked, found {}",
                            type_name(v)
                        ),
                    ));
                };
                if !SETTABLE_STATUSES.contains(&s.as_str()) {
                    return Err(ApiError::bad(
                        "status",
                        format!(
                            "{s:?} is not one of active, disabled, revoked (DELETE deletes a key)"
                        ),
                    ));
                }
                p.status = Some(s.clone());
            }
            _ => {}
        }
    }
    Ok(p)
}

/// `POST /v1/admin/keys/{id}/rotate`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rotate {
    /// Seconds the old key stays valid from now.
    pub overlap_s: i64,
    /// The new key's expiry (Unix seconds); none: it does not expire.
    pub expires_at: Option<i64>,
}

/// Validates a rotate body (an empty body is `{}`).
pub fn rotate(m: &Map<String, Value>, now: i64) -> Result<Rotate, ApiError> {
    check_members(m, "", &["overlap_s", "expires_at"], &[])?;
    let overlap_s = match m.get("overlap_s") {
        None | Some(Value::Null) => 0,
        Some(v) => {
            let n = integer(v, "overlap_s")?;
            i64::try_from(n)
                .ok()
                .filter(|n| *n <= MAX_OVERLAP_S)
                .ok_or_else(|| {
                    ApiError::bad("overlap_s", format!("{n} is larger than {MAX_OVERLAP_S}"))
                })?
        }
    };
    let expires_at = match m.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(v) => Some(future_time(v, "expires_at", now)?),
    };
    Ok(Rotate {
        overlap_s,
        expires_at,
    })
}

/// An owner (SPEC §2): `status` (`active` default, or `disabled`) and shared `rate_limits`.
#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    pub status: String,
    pub rate_limits: Option<Vec<RateLimit>>,
}

/// Owner statuses accepted.
pub const OWNER_STATUSES: &[&str] = &["active", "disabled"];

/// Validates an owner object; `prefix` is prepended to field paths.
pub fn owner(m: &Map<String, Value>, prefix: &str) -> Result<Owner, ApiError> {
    check_members(m, prefix, &["status", "rate_limits"], &[])?;
    let status = match m.get("status") {
        None | Some(Value::Null) => "active".to_string(),
        Some(Value::String(s)) if OWNER_STATUSES.contains(&s.as_str()) => s.clone(),
        Some(v) => {
            return Err(ApiError::bad(
                format!("{prefix}status"),
                format!(
                    "expected \"active\" or \"disabled\", found {}",
                    describe_value(v)
                ),
            ))
        }
    };
    let rate_limits = match m.get("rate_limits") {
        None => None,
        Some(v) => opt_limits(v, &format!("{prefix}rate_limits"))?,
    };
    Ok(Owner {
        status,
        rate_limits,
    })
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => describe(other),
    }
}

/// Validates a plan object (SPEC §2): `rate_limits`, absent or `null` for none.
pub fn plan(m: &Map<String, Value>, prefix: &str) -> Result<Option<Vec<RateLimit>>, ApiError> {
    check_members(m, prefix, &["rate_limits"], &[])?;
    match m.get("rate_limits") {
        None => Ok(None),
        Some(v) => opt_limits(v, &format!("{prefix}rate_limits")),
    }
}

/// Reads a JSON list stored as text (scopes, sites, allowed_ips).
pub fn list_from_text(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

/// Reads stored limits (`NULL` or JSON text).
pub fn limits_from_text(s: Option<&str>) -> Option<Vec<RateLimit>> {
    s.and_then(|s| serde_json::from_str(s).ok())
}

/// Writes limits for storage.
pub fn limits_to_text(l: &Option<Vec<RateLimit>>) -> Option<String> {
    l.as_ref()
        .map(|l| serde_json::to_string(l).unwrap_or_else(|_| "[]".into()))
}

/// Writes a list for storage.
pub fn list_to_text(l: &[String]) -> String {
    serde_json::to_string(l).unwrap_or_else(|_| "[]".into())
}

/// A key as stored (the hash never leaves the service except in the document).
#[derive(Clone, Debug)]
pub struct KeyRow {
    pub id: String,
    pub hash: String,
    pub owner: String,
    pub prefix: Option<String>,
    pub encoding: Option<String>,
    pub bytes: Option<i64>,
    pub status: String,
    pub settings: Settings,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_used_at: Option<i64>,
}

impl KeyRow {
    /// The key record of SPEC §7: never the key, never its hash. Times RFC 3339 UTC.
    pub fn record(&self) -> Value {
        let s = &self.settings;
        serde_json::json!({
            "id": self.id,
            "owner": self.owner,
            "name": s.name,
            "description": s.description,
            "prefix": self.prefix,
            "encoding": self.encoding,
            "bytes": self.bytes,
            "status": self.status,
            "scopes": s.scopes,
            "sites": s.sites,
            "allowed_ips": s.allowed_ips,
            "plan": s.plan,
            "rate_limits": s.rate_limits,
            "expires_at": self.expires_at.map(util::rfc3339),
            "created_at": util::rfc3339(self.created_at),
            "updated_at": util::rfc3339(self.updated_at),
            "last_used_at": self.last_used_at.map(util::rfc3339),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        parse_object(s.as_bytes()).unwrap()
    }

    fn field(e: ApiError) -> Option<String> {
        match e {
            ApiError::BadRequest { field, .. } => field,
            other => panic!("not a 400: {other:?}"),
        }
    }

    #[test]
    fn bodies_must_be_objects_without_duplicates() {
        assert!(parse_object(b"[1]").is_err());
        assert!(parse_object(b"{\"a\":1,\"a\":2}").is_err());
        assert!(parse_object(b"{\"a\":{\"b\":1,\"b\":1}}").is_err());
        assert!(parse_object(b"{} x").is_err());
        assert!(parse_object(b"\xEF\xBB\xBF{}").is_ok());
    }

    #[test]
    fn create_fields_are_named() {
        let cases = [
            (r#"{}"#, "owner"),
            (r#"{"owner":""}"#, "owner"),
            (r#"{"owner":"o","colour":1}"#, "colour"),
            (r#"{"owner":"o","bytes":8}"#, "bytes"),
            (r#"{"owner":"o","encoding":"b64"}"#, "encoding"),
            (r#"{"owner":"o","prefix":"a b"}"#, "prefix"),
            (
                r#"{"owner":"o","allowed_ips":["10.0.0.0/33"]}"#,
                "allowed_ips[0]",
            ),
            (
                r#"{"owner":"o","rate_limits":[{"limit":1,"window_s":0}]}"#,
                "rate_limits[0].window_s",
            ),
            (
                r#"{"owner":"o","rate_limits":[{"limit":-1,"window_s":1}]}"#,
                "rate_limits[0].limit",
            ),
            (
                r#"{"owner":"o","rate_limits":[{"limit":1,"window_s":1,"x":1}]}"#,
                "rate_limits[0].x",
            ),
            (r#"{"owner":"o","scopes":["a b"]}"#, "scopes[0]"),
            (r#"{"owner":"o","expires_at":"tomorrow"}"#, "expires_at"),
            (
                r#"{"owner":"o","expires_at":"2001-01-01T00:00:00Z"}"#,
                "expires_at",
            ),
        ];
        for (body, want) in cases {
            let e = create_key(&obj(body), 1_000_000_000).unwrap_err();
            assert_eq!(field(e).as_deref(), Some(want), "{body}");
        }
        let ok = create_key(&obj(r#"{"owner":"o","prefix":"mn-abc123-","encoding":"hex","bytes":16,"rate_limits":[]}"#), 0).unwrap();
        assert_eq!(ok.prefix, "mn-abc123-");
        assert_eq!(ok.encoding, Encoding::Hex);
        assert_eq!(ok.settings.rate_limits, Some(vec![]));
    }

    #[test]
    fn patch_rejects_fixed_members() {
        for m in ["expires_at", "key", "owner", "prefix"] {
            let e = patch_key(&obj(&format!(r#"{{"{m}":"x"}}"#))).unwrap_err();
            assert_eq!(field(e).as_deref(), Some(m));
        }
        assert_eq!(
            field(patch_key(&obj(r#"{"status":"deleted"}"#)).unwrap_err()).as_deref(),
            Some("status")
        );
        let p = patch_key(&obj(r#"{"name":null,"plan":null,"scopes":null}"#)).unwrap();
        assert_eq!(p.name, Some(None));
        assert_eq!(p.plan, Some(None));
        assert_eq!(p.scopes, Some(vec![]));
    }
}

/// A §2 document to import (`POST /v1/admin/import`), validated whole.
#[derive(Debug, Default)]
pub struct Import {
    /// Whether the document has `owners` (then an owner it does not name makes its keys invalid).
    pub has_owners: bool,
    pub owners: Vec<(String, Owner)>,
    pub plans: Vec<(String, Option<Vec<RateLimit>>)>,
    pub keys: Vec<ImportKey>,
    /// Keys with status `deleted`, not imported.
    pub skipped: u64,
}

/// One key of an imported document.
#[derive(Debug, Clone)]
pub struct ImportKey {
    pub id: String,
    /// Lowercase hex SHA-256.
    pub hash: String,
    pub owner: String,
    /// `active`, `disabled` or `revoked` (any other §2 status, not active, becomes `disabled`).
    pub status: String,
    pub settings: Settings,
    pub expires_at: Option<i64>,
    pub created_at: Option<i64>,
    pub updated_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

/// Validates a §2 document for import: first with the filter's own parser (what a gateway
/// would reject is rejected), then member by member for what the database keeps.
pub fn import(body: &[u8]) -> Result<Import, ApiError> {
    if let Err(e) = keygate_core::keylist::parse(body) {
        let field = (!e.path.is_empty()).then(|| e.path.clone());
        return Err(ApiError::BadRequest {
            field,
            message: format!("not a valid key-list document: {e}"),
        });
    }
    let m = parse_object(body)?;
    check_members(&m, "", &["version", "owners", "plans", "keys", "meta"], &[])?;
    let mut out = Import::default();
    if let Some(owners) = m.get("owners") {
        let Value::Object(owners) = owners else {
            return Err(ApiError::bad("owners", "expected an object"));
        };
        out.has_owners = true;
        for (id, o) in owners {
            let f = format!("owners.{id}");
            name(&Value::String(id.clone()), &f)?;
            let Value::Object(o) = o else {
                return Err(ApiError::bad(f, "expected an object"));
            };
            out.owners.push((id.clone(), owner(o, &format!("{f}."))?));
        }
    }
    if let Some(plans) = m.get("plans") {
        let Value::Object(plans) = plans else {
            return Err(ApiError::bad("plans", "expected an object"));
        };
        for (id, p) in plans {
            let f = format!("plans.{id}");
            name(&Value::String(id.clone()), &f)?;
            let Value::Object(p) = p else {
                return Err(ApiError::bad(f, "expected an object"));
            };
            out.plans.push((id.clone(), plan(p, &format!("{f}."))?));
        }
    }
    let Some(Value::Array(keys)) = m.get("keys") else {
        return Err(ApiError::bad("keys", "expected an array"));
    };
    for (i, k) in keys.iter().enumerate() {
        let f = |m: &str| format!("keys[{i}].{m}");
        let Value::Object(k) = k else {
            return Err(ApiError::bad(format!("keys[{i}]"), "expected an object"));
        };
        check_members(
            k,
            &format!("keys[{i}]."),
            keygate_core::keylist::KEY_MEMBERS,
            &[],
        )?;
        let get = |m: &str| k.get(m).unwrap_or(&Value::Null);
        let status = match get("status") {
            Value::Null => "active".to_string(),
            Value::String(s) if s == "deleted" => {
                out.skipped += 1;
                continue;
            }
            Value::String(s) if SETTABLE_STATUSES.contains(&s.as_str()) => s.clone(),
            _ => "disabled".to_string(),
        };
        let hash = match get("hash") {
            Value::String(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                h.to_ascii_lowercase()
            }
            _ => return Err(ApiError::bad(f("hash"), "not a 64-digit hex SHA-256")),
        };
        let opt_time = |m: &str| match get(m) {
            Value::Null => Ok(None),
            v => time(v, &f(m)).map(Some),
        };
        let mut settings = Settings {
            name: text(get("name"), &f("name"), MAX_NAME, false)?,
            description: text(get("description"), &f("description"), MAX_DESCRIPTION, true)?,
            scopes: names(get("scopes"), &f("scopes"), true)?,
            sites: names(get("sites"), &f("sites"), true)?,
            allowed_ips: ips(get("allowed_ips"), &f("allowed_ips"), true)?,
            plan: None,
            rate_limits: opt_limits(get("rate_limits"), &f("rate_limits"))?,
        };
        settings.plan = match get("plan") {
            Value::Null => None,
            v => Some(name(v, &f("plan"))?),
        };
        out.keys.push(ImportKey {
            id: name(get("id"), &f("id"))?,
            hash,
            owner: name(get("owner"), &f("owner"))?,
            status,
            settings,
            expires_at: opt_time("expires_at")?,
            created_at: opt_time("created_at")?,
            updated_at: opt_time("updated_at")?,
            last_used_at: opt_time("last_used_at")?,
        });
    }
    Ok(out)
}
