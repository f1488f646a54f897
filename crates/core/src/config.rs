//! Plugin configuration (SPEC §1): parsed strictly, validated whole, compiled into the form the
//! per-request path uses. Every error names the field (as a JSON path) and the bad value.

use crate::ipset::IpSet;
use crate::json::{self, DocError};
use crate::path;
use crate::response::{Class, ErrorResponse, Responses};
use crate::routes::RouteTable;
pub use crate::routes::{PathMatch, Route};
use serde::Deserialize;
use std::collections::BTreeMap;

/// A fixed-window limit: at most `limit` requests per `window_s` seconds.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub limit: u64,
    pub window_s: u64,
}

/// Longest window accepted: ten years keeps every window end far inside u64/i64 arithmetic.
pub const MAX_WINDOW_S: u64 = 10 * 366 * 86_400;

impl Limit {
    /// The ranges of SPEC §1/§2 limits; the error's path is relative (`window_s`, `limit`).
    pub fn validate(&self) -> Result<(), DocError> {
        if self.window_s == 0 || self.window_s > MAX_WINDOW_S {
            return Err(DocError::new(
                "window_s",
                format!("{} is out of range 1..={MAX_WINDOW_S}", self.window_s),
            ));
        }
        if self.limit > u32::MAX as u64 {
            return Err(DocError::new(
                "limit",
                format!("{} is larger than {}", self.limit, u32::MAX),
            ));
        }
        Ok(())
    }
}

/// Validates a list of limits, naming the bad entry as `<field>[i].<sub>`.
pub fn validate_limits(field: &str, limits: &[Limit]) -> Result<(), DocError> {
    for (i, l) in limits.iter().enumerate() {
        l.validate()
            .map_err(|e| e.under(&format!("{field}[{i}]")))?;
    }
    Ok(())
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyListSource {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub headers: Vec<(String, String)>,
    pub refresh_s: u64,
    pub timeout_ms: u64,
    pub max_bytes: usize,
    pub fail_open: bool,
    pub max_stale_s: u64,
}

impl KeyListSource {
    /// Identifies where a published list came from (see `shared::Meta::source`).
    pub fn source_id(&self) -> String {
        format!("{}|{}|{}", self.cluster, self.authority, self.path)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// A request header (name lowercased); with `scheme`, only `<scheme> <key>` values count.
    Header {
        name: String,
        scheme: Option<String>,
    },
    /// A query parameter, percent-decoded.
    Query { name: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExemptRule {
    pub preflight: bool,
    pub method: Option<String>,
    pub path: Option<PathMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SiteSource {
    PathSegment(usize),
    Header(String),
}

/// Who makes the request-header edits of SPEC §3 steps 1 and 13 (`upstream.edits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edits {
    /// `"filter"` (the default, SPEC's behaviour on every host): keygate removes the credential
    /// and client-sent identity headers and sets the identity headers itself.
    Filter,
    /// `"envoy_route"` (opt-in, Envoy only): keygate records the key's id and owner in the
    /// stream's filter state (`wasm.keygate_key_id`, `wasm.keygate_owner`) and leaves the
    /// headers alone; the route removes the credential and identity headers
    /// (`request_headers_to_remove`) and adds the identity from the filter state
    /// (`request_headers_to_add` with `%FILTER_STATE(wasm.keygate_key_id:PLAIN)%`). A query
    /// credential is still taken out of `:path` by keygate. See envoy/README.md.
    EnvoyRoute,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderStyle {
    XRateLimit,
    Ietf,
    Both,
    None,
}

/// What global mode does when the Rate Limit Service fails (timeout, unavailable, bad reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    /// Count that request exactly in this instance's shared data, as without global mode.
    Local,
    /// Let the request pass uncounted (no rate-limit headers).
    Allow,
    /// Answer `unavailable`.
    Deny,
}

/// The global-mode extension (`rate_limit.global`): step 12 asks Envoy's Rate Limit Service
/// (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, see `rls`) instead of
/// counting in this instance's shared data, so that a fleet of Envoys shares each limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalRateLimit {
    /// The Envoy cluster of the service (HTTP/2).
    pub cluster: String,
    /// The descriptor domain sent with every request (default `"keygate"`).
    pub domain: String,
    /// How long the service may take, in milliseconds (default 100).
    pub timeout_ms: u64,
    pub failure_mode: FailureMode,
}

/// The identity endpoint extension: keygate answers `path` itself for a valid key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Whoami {
    pub path: String,
    /// Methods answered (default GET and HEAD); others go upstream like any allowed request.
    pub methods: Vec<String>,
    pub status: u32,
    pub body: String,
    pub content_type: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub key_list: KeyListSource,
    pub credentials: Vec<CredentialSource>,
    pub key_prefixes: Vec<String>,
    pub exempt: Vec<ExemptRule>,
    pub xff_trusted_hops: u32,
    pub ip_allow: IpSet,
    pub ip_deny: IpSet,
    pub site: Option<SiteSource>,
    pub routes: RouteTable,
    pub default_limits: Vec<Limit>,
    pub header_style: HeaderStyle,
    /// `rate_limit.global`: limits counted by a Rate Limit Service; `None` counts locally.
    pub global: Option<GlobalRateLimit>,
    pub invalid_key_limit: Option<Limit>,
    pub strip_credential: bool,
    pub key_id_header: Option<String>,
    pub owner_header: Option<String>,
    /// Who edits the request headers (`upstream.edits`).
    pub edits: Edits,
    /// How each class answers (SPEC §4 defaults with `errors` merged over them).
    pub responses: Responses,
    pub whoami: Option<Whoami>,
    /// Usage reporting to the key service (extension `usage`), off when absent.
    pub usage: Option<UsageSink>,
    /// The checks whose refusals are only counted and logged (`shadow`).
    pub shadow: Shadow,
    /// Whether each decision is recorded in the stream's filter state for Envoy's access log
    /// (`access_log`: `wasm.keygate_decision`, `wasm.keygate_decision_key_id`).
    pub access_log: bool,
}

/// Where and how often one root context per instance `POST`s per-key usage (extension `usage`;
/// the report format is `POST /v1/usage` of the key service).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageSink {
    /// Envoy cluster of the key service (default: `key_list.cluster`).
    pub cluster: String,
    /// Path of the report endpoint (default `/v1/usage`).
    pub path: String,
    /// `:authority` of the report (default: `key_list.authority` when the cluster is the same,
    /// else the cluster name).
    pub authority: String,
    /// Extra request headers (default: `key_list.headers` when the cluster is the same).
    pub headers: Vec<(String, String)>,
    /// Seconds between reports (default 10, 1..=3600).
    pub interval_s: u64,
    /// How long a report may take, in milliseconds (default 5000, 1..=600000).
    pub timeout_ms: u64,
    /// Most key ids one worker keeps between handovers, and one report carries (default 10000,
    /// 1..=1000000); use by further ids is dropped until the next handover.
    pub max_ids: usize,
}

/// Shadow mode (`shadow`, after Envoy RBAC's `shadow_rules` and the rate-limit service's
/// `shadow_mode`): the refusals of a shadowed check are decided, counted and logged, and the
/// request goes on as if the check had passed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shadow {
    /// `missing_key`, `invalid_key`, `expired_key` and `unavailable`: the request goes upstream
    /// without identity (like `fail_open`).
    pub keys: bool,
    /// `ip_denied`: the global `ip_allow`/`ip_deny` lists and a key's `allowed_ips`.
    pub ip: bool,
    /// `forbidden`: a key's `sites` and the `routes` scopes.
    pub scopes: bool,
    /// `rate_limited`: key and owner limits, and the `invalid_key_limit` guard.
    pub rate_limits: bool,
}

impl Shadow {
    /// Whether a refusal of `class` is shadowed.
    pub fn covers(&self, class: Class) -> bool {
        match class {
            Class::MissingKey | Class::InvalidKey | Class::ExpiredKey | Class::Unavailable => {
                self.keys
            }
            Class::IpDenied => self.ip,
            Class::Forbidden => self.scopes,
            Class::RateLimited => self.rate_limits,
        }
    }

    /// Whether any check is shadowed.
    pub fn any(&self) -> bool {
        self.keys || self.ip || self.scopes || self.rate_limits
    }
}

impl Config {
    pub fn response(&self, class: Class) -> &ErrorResponse {
        self.responses.get(class)
    }
}

// ---- raw, as written by the operator ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    key_list: RawKeyList,
    credentials: Option<Vec<RawCredential>>,
    #[serde(default)]
    key_prefixes: Vec<String>,
    #[serde(default)]
    exempt: Vec<RawExempt>,
    client_ip: Option<RawClientIp>,
    #[serde(default)]
    ip_allow: Vec<String>,
    #[serde(default)]
    ip_deny: Vec<String>,
    site: Option<RawSite>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    rate_limit: Option<RawRateLimit>,
    invalid_key_limit: Option<Limit>,
    upstream: Option<RawUpstream>,
    #[serde(default, deserialize_with = "json::unique_map")]
    errors: BTreeMap<String, RawError>,
    whoami: Option<RawWhoami>,
    usage: Option<RawUsage>,
    #[serde(default)]
    shadow: Shadow,
    #[serde(default)]
    access_log: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsage {
    cluster: Option<String>,
    #[serde(default = "default_usage_path")]
    path: String,
    authority: Option<String>,
    #[serde(default, deserialize_with = "json::unique_map_opt")]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default = "default_usage_interval_s")]
    interval_s: u64,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_usage_max_ids")]
    max_ids: u64,
}

fn default_usage_path() -> String {
    "/v1/usage".to_string()
}
fn default_usage_interval_s() -> u64 {
    10
}
fn default_usage_max_ids() -> u64 {
    10_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyList {
    cluster: String,
    path: String,
    authority: Option<String>,
    #[serde(default, deserialize_with = "json::unique_map")]
    headers: BTreeMap<String, String>,
    #[serde(default = "default_refresh_s")]
    refresh_s: u64,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_max_bytes")]
    max_bytes: u64,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    max_stale_s: u64,
}

fn default_refresh_s() -> u64 {
    30
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_max_bytes() -> u64 {
    32 * 1024 * 1024
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    header: Option<String>,
    scheme: Option<String>,
    query: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExempt {
    #[serde(default)]
    preflight: bool,
    method: Option<String>,
    path_prefix: Option<String>,
    path_exact: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientIp {
    #[serde(default)]
    xff_trusted_hops: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    path_segment: Option<usize>,
    header: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path_prefix: Option<String>,
    path_exact: Option<String>,
    methods: Option<Vec<String>>,
    scope: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    #[serde(default)]
    default: Vec<Limit>,
    #[serde(default = "default_header_style")]
    headers: String,
    global: Option<RawGlobal>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    cluster: String,
    #[serde(default = "default_global_domain")]
    domain: String,
    #[serde(default = "default_global_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_failure_mode")]
    failure_mode: String,
}

fn default_global_domain() -> String {
    "keygate".to_string()
}
fn default_global_timeout_ms() -> u64 {
    100
}
fn default_failure_mode() -> String {
    "local".to_string()
}

/// Checks `rate_limit.global`; with it, every default limit needs a window the protocol has.
fn global(raw: RawGlobal, default: &[Limit]) -> Result<GlobalRateLimit, String> {
    // The cluster goes out inside a serialised GrpcService: one-byte lengths keep it plain text.
    if raw.cluster.is_empty()
        || raw.cluster.len() > 120
        || !raw.cluster.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(format!(
            "rate_limit.global.cluster: {:?} is not 1-120 visible ASCII characters",
            raw.cluster
        ));
    }
    if raw.domain.is_empty() || raw.domain.len() > 256 {
        return Err(format!(
            "rate_limit.global.domain: {:?} is not 1-256 characters",
            raw.domain
        ));
    }
    if raw.timeout_ms == 0 || raw.timeout_ms > 60_000 {
        return Err(format!(
            "rate_limit.global.timeout_ms: {} is out of range 1..=60000",
            raw.timeout_ms
        ));
    }
    let failure_mode = match raw.failure_mode.as_str() {
        "local" => FailureMode::Local,
        "allow" => FailureMode::Allow,
        "deny" => FailureMode::Deny,
        other => {
            return Err(format!(
                "rate_limit.global.failure_mode: {other:?} is not one of \"local\", \"allow\", \"deny\""
            ))
        }
    };
    for (i, l) in default.iter().enumerate() {
        if crate::rls::unit_of(l.window_s).is_none() {
            return Err(format!(
                "rate_limit.default[{i}].window_s: {}",
                crate::rls::window_error(l.window_s)
            ));
        }
    }
    Ok(GlobalRateLimit {
        cluster: raw.cluster,
        domain: raw.domain,
        timeout_ms: raw.timeout_ms,
        failure_mode,
    })
}

fn default_header_style() -> String {
    "x-ratelimit".to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    #[serde(default = "default_true")]
    strip_credential: bool,
    #[serde(default = "absent", deserialize_with = "present")]
    key_id_header: Option<Option<String>>,
    #[serde(default = "absent", deserialize_with = "present")]
    owner_header: Option<Option<String>>,
    #[serde(default)]
    edits: Option<String>,
}

fn default_true() -> bool {
    true
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
fn absent() -> Option<Option<String>> {
    None
}
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawError {
    status: Option<u32>,
    body: Option<String>,
    content_type: Option<String>,
    #[serde(default, deserialize_with = "json::unique_map")]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWhoami {
    path: String,
    methods: Option<Vec<String>>,
    #[serde(default = "default_whoami_status")]
    status: u32,
    #[serde(default = "default_whoami_body")]
    body: String,
    content_type: Option<String>,
}

fn default_whoami_status() -> u32 {
    200
}
fn default_whoami_body() -> String {
    r#"{"id":"{owner}","key_id":"{key_id}"}"#.to_string()
}

/// A header name we may read or write: an HTTP token, stored lowercase.
fn header_name(field: &str, name: &str) -> Result<String, DocError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !ok {
        return Err(DocError::new(
            field,
            format!("invalid header name {name:?}"),
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// A header value we write: visible ASCII and spaces/tabs only, so the host never rejects it.
fn header_value(field: &str, value: &str) -> Result<String, DocError> {
    if value
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        Ok(value.to_string())
    } else {
        Err(DocError::new(
            field,
            format!("invalid header value {value:?}"),
        ))
    }
}

fn path_match(
    field: &str,
    prefix: Option<String>,
    exact: Option<String>,
) -> Result<Option<PathMatch>, DocError> {
    let check = |sub: &str, p: &str| -> Result<String, DocError> {
        if !p.starts_with('/') {
            return Err(DocError::new(
                format!("{field}.{sub}"),
                format!("{p:?} must start with '/'"),
            ));
        }
        Ok(path::normalize(p))
    };
    match (prefix, exact) {
        (Some(_), Some(_)) => Err(DocError::new(
            field,
            "path_prefix and path_exact are exclusive",
        )),
        (Some(p), None) => Ok(Some(PathMatch::Prefix(check("path_prefix", &p)?))),
        (None, Some(p)) => Ok(Some(PathMatch::Exact(check("path_exact", &p)?))),
        (None, None) => Ok(None),
    }
}

fn method(field: &str, m: &str) -> Result<String, DocError> {
    if m.is_empty()
        || !m
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
    {
        return Err(DocError::new(field, format!("invalid method {m:?}")));
    }
    Ok(m.to_ascii_uppercase())
}

/// `s` as an RFC 9110 quoted-string, with what a header value cannot hold (controls, non-ASCII)
/// percent-encoded.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out.push('"');
    out
}

/// Whether `s` is an RFC 9110 token (a valid auth-scheme).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The `WWW-Authenticate` value of a 401 class (SPEC §4, RFC 9110 §11.6.1): one challenge per
/// credential source, in order, comma-separated in one field.
///
/// - `authorization` with a scheme: that scheme (`Bearer realm="keygate"`); for Bearer, invalid
///   and expired keys add RFC 6750 §3.1 `error="invalid_token"` (a missing key adds no error).
/// - any other header, or `authorization` without a scheme: `ApiKey realm="keygate",
///   header="<name>"` (and `scheme="<scheme>"` when the value is `<scheme> <key>`).
/// - a query parameter: `ApiKey realm="keygate", query="<name>"`.
pub fn challenge(sources: &[CredentialSource], class: Class) -> String {
    let error = !matches!(class, Class::MissingKey);
    let mut out: Vec<String> = Vec::with_capacity(sources.len());
    for source in sources {
        let c = match source {
            CredentialSource::Header {
                name,
                scheme: Some(scheme),
            } if name == "authorization" && is_token(scheme) => {
                if scheme.eq_ignore_ascii_case("bearer") && error {
                    format!(r#"{scheme} realm="keygate", error="invalid_token""#)
                } else {
                    format!(r#"{scheme} realm="keygate""#)
                }
            }
            CredentialSource::Header { name, scheme } => {
                let mut c = format!(r#"ApiKey realm="keygate", header={}"#, quoted(name));
                if let Some(s) = scheme {
                    c.push_str(", scheme=");
                    c.push_str(&quoted(s));
                }
                c
            }
            CredentialSource::Query { name } => {
                format!(r#"ApiKey realm="keygate", query={}"#, quoted(name))
            }
        };
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out.join(", ")
}

/// A JSON error named by the path of the field it is about; a syntax error has no such field.
pub(crate) fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> DocError {
    let path = e.path().to_string();
    let inner = e.inner();
    if inner.is_syntax() || inner.is_eof() {
        DocError::whole(format!("invalid JSON: {inner}"))
    } else if path == "." {
        DocError::whole(inner.to_string())
    } else {
        DocError::new(path, inner.to_string())
    }
}

/// Parses and validates a plugin configuration document (SPEC §1). The JSON rules of SPEC §2
/// apply: a leading byte-order mark is ignored, anything but whitespace after the value, a
/// member named twice (at any depth) or an unknown member is an error naming the field.
pub fn parse(json: &[u8]) -> Result<Config, DocError> {
    let de = &mut serde_json::Deserializer::from_slice(json::strip_bom(json));
    let raw: RawConfig = serde_path_to_error::deserialize(&mut *de).map_err(json_error)?;
    de.end()
        .map_err(|e| DocError::whole(format!("invalid JSON: {e}")))?;
    compile(raw)
}

fn compile(raw: RawConfig) -> Result<Config, DocError> {
    let kl = raw.key_list;
    if kl.cluster.is_empty() {
        return Err(DocError::new("key_list.cluster", "must not be empty"));
    }
    if !kl.path.starts_with('/') {
        return Err(DocError::new(
            "key_list.path",
            format!("{:?} must start with '/'", kl.path),
        ));
    }
    if kl.refresh_s == 0 || kl.refresh_s > 86_400 {
        return Err(DocError::new(
            "key_list.refresh_s",
            format!("{} is out of range 1..=86400", kl.refresh_s),
        ));
    }
    if kl.timeout_ms == 0 || kl.timeout_ms > 600_000 {
        return Err(DocError::new(
            "key_list.timeout_ms",
            format!("{} is out of range 1..=600000", kl.timeout_ms),
        ));
    }
    if kl.max_bytes == 0 || kl.max_bytes > (1 << 32) {
        return Err(DocError::new(
            "key_list.max_bytes",
            format!("{} is out of range 1..=4294967296", kl.max_bytes),
        ));
    }
    let authority = kl.authority.unwrap_or_else(|| kl.cluster.clone());
    if authority.is_empty() {
        return Err(DocError::new("key_list.authority", "must not be empty"));
    }
    let mut headers = Vec::new();
    for (k, v) in kl.headers {
        let field = format!("key_list.headers.{k}");
        headers.push((header_name(&field, &k)?, header_value(&field, &v)?));
    }
    let key_list = KeyListSource {
        cluster: kl.cluster,
        path: kl.path,
        authority,
        headers,
        refresh_s: kl.refresh_s,
        timeout_ms: kl.timeout_ms,
        max_bytes: kl.max_bytes as usize,
        fail_open: kl.fail_open,
        max_stale_s: kl.max_stale_s,
    };

    let raw_credentials = raw.credentials.unwrap_or_else(|| {
        vec![
            RawCredential {
                header: Some("x-api-key".into()),
                scheme: None,
                query: None,
            },
            RawCredential {
                header: Some("authorization".into()),
                scheme: Some("Bearer".into()),
                query: None,
            },
        ]
    });
    if raw_credentials.is_empty() {
        return Err(DocError::new(
            "credentials",
            "must name at least one source",
        ));
    }
    let mut credentials = Vec::new();
    for (i, c) in raw_credentials.into_iter().enumerate() {
        let field = format!("credentials[{i}]");
        credentials.push(match (c.header, c.query, c.scheme) {
            (Some(h), None, scheme) => {
                let name = header_name(&format!("{field}.header"), &h)?;
                if let Some(s) = &scheme {
                    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(DocError::new(
                            format!("{field}.scheme"),
                            format!("invalid scheme {s:?}"),
                        ));
                    }
                }
                CredentialSource::Header { name, scheme }
            }
            (None, Some(q), None) => {
                if q.is_empty() {
                    return Err(DocError::new(format!("{field}.query"), "must not be empty"));
                }
                CredentialSource::Query { name: q }
            }
            (None, Some(_), Some(s)) => {
                return Err(DocError::new(
                    format!("{field}.scheme"),
                    format!("{s:?} applies only to a header source"),
                ))
            }
            _ => {
                return Err(DocError::new(
                    &*field,
                    "needs exactly one of header or query",
                ))
            }
        });
    }

    for (i, p) in raw.key_prefixes.iter().enumerate() {
        if p.is_empty() {
            return Err(DocError::new(
                format!("key_prefixes[{i}]"),
                "must not be empty",
            ));
        }
    }

    let mut exempt = Vec::new();
    for (i, e) in raw.exempt.into_iter().enumerate() {
        let field = format!("exempt[{i}]");
        let rule = ExemptRule {
            preflight: e.preflight,
            method: e
                .method
                .map(|m| method(&format!("{field}.method"), &m))
                .transpose()?,
            path: path_match(&field, e.path_prefix, e.path_exact)?,
        };
        if !rule.preflight && rule.method.is_none() && rule.path.is_none() {
            return Err(DocError::new(
                &*field,
                "an empty rule would exempt every request",
            ));
        }
        exempt.push(rule);
    }

    let xff_trusted_hops = raw.client_ip.map(|c| c.xff_trusted_hops).unwrap_or(0);
    if xff_trusted_hops > 64 {
        return Err(DocError::new(
            "client_ip.xff_trusted_hops",
            format!("{xff_trusted_hops} is out of range 0..=64"),
        ));
    }
    let ip_allow = IpSet::parse(&raw.ip_allow).map_err(|e| e.under("ip_allow"))?;
    let ip_deny = IpSet::parse(&raw.ip_deny).map_err(|e| e.under("ip_deny"))?;

    let site = match raw.site {
        None => None,
        Some(RawSite {
            path_segment: Some(n),
            header: None,
        }) => {
            if n == 0 {
                return Err(DocError::new(
                    "site.path_segment",
                    "0 is out of range (segments count from 1)",
                ));
            }
            Some(SiteSource::PathSegment(n))
        }
        Some(RawSite {
            path_segment: None,
            header: Some(h),
        }) => Some(SiteSource::Header(header_name("site.header", &h)?)),
        Some(_) => {
            return Err(DocError::new(
                "site",
                "needs exactly one of path_segment or header",
            ))
        }
    };

    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let field = format!("routes[{i}]");
        let path = path_match(&field, r.path_prefix, r.path_exact)?
            .ok_or_else(|| DocError::new(&*field, "needs path_prefix or path_exact"))?;
        let mut methods = Vec::new();
        for (j, m) in r.methods.unwrap_or_default().iter().enumerate() {
            methods.push(method(&format!("{field}.methods[{j}]"), m)?);
        }
        if let Some(s) = &r.scope {
            if s.is_empty() {
                return Err(DocError::new(format!("{field}.scope"), "must not be empty"));
            }
        }
        routes.push(Route {
            path,
            methods,
            scope: r.scope,
        });
    }

    let (default_limits, header_style, global) = match raw.rate_limit {
        None => (Vec::new(), HeaderStyle::XRateLimit, None),
        Some(rl) => {
            validate_limits("rate_limit.default", &rl.default)?;
            let style = match rl.headers.as_str() {
                "x-ratelimit" => HeaderStyle::XRateLimit,
                "ietf" => HeaderStyle::Ietf,
                "both" => HeaderStyle::Both,
                "none" => HeaderStyle::None,
                other => {
                    return Err(DocError::new(
                        "rate_limit.headers",
                        format!(
                            "{other:?} is not one of \"x-ratelimit\", \"ietf\", \"both\", \"none\""
                        ),
                    ))
                }
            };
            let global = rl
                .global
                .map(|g| global(g, &rl.default))
                .transpose()
                .map_err(DocError::whole)?;
            (rl.default, style, global)
        }
    };

    if let Some(l) = &raw.invalid_key_limit {
        l.validate().map_err(|e| e.under("invalid_key_limit"))?;
    }

    let edits = match raw.upstream.as_ref().and_then(|u| u.edits.as_deref()) {
        None | Some("filter") => Edits::Filter,
        Some("envoy_route") => Edits::EnvoyRoute,
        Some(other) => {
            return Err(DocError::new(
                "upstream.edits",
                format!("{other:?} is not one of \"filter\", \"envoy_route\""),
            ))
        }
    };
    let (strip_credential, key_id_header, owner_header) = match raw.upstream {
        None => (
            true,
            Some("x-api-key-id".to_string()),
            Some("x-api-key-owner".to_string()),
        ),
        Some(u) => {
            let resolve = |field: &str, v: Option<Option<String>>, default: &str| match v {
                None => Ok(Some(default.to_string())),
                Some(None) => Ok(None),
                Some(Some(name)) => header_name(field, &name).map(Some),
            };
            (
                u.strip_credential,
                resolve("upstream.key_id_header", u.key_id_header, "x-api-key-id")?,
                resolve("upstream.owner_header", u.owner_header, "x-api-key-owner")?,
            )
        }
    };
    for (field, h) in [
        ("upstream.key_id_header", &key_id_header),
        ("upstream.owner_header", &owner_header),
    ] {
        if let Some(h) = h {
            if h.starts_with(':') || h == "host" {
                return Err(DocError::new(
                    field,
                    format!("{h:?} cannot be an identity header"),
                ));
            }
        }
    }

    let mut responses = Responses::default();
    for (name, e) in raw.errors {
        let field = format!("errors.{name}");
        let class = Class::from_name(&name).ok_or_else(|| {
            DocError::new(&field, format!("unknown class {name:?} (expected one of missing_key, invalid_key, expired_key, forbidden, ip_denied, rate_limited, unavailable)"))
        })?;
        let r = responses.get_mut(class);
        if let Some(s) = e.status {
            if !(200..=599).contains(&s) {
                return Err(DocError::new(
                    format!("{field}.status"),
                    format!("{s} is out of range 200..=599"),
                ));
            }
            r.status = s;
        }
        if let Some(b) = e.body {
            r.body = b;
        }
        if let Some(ct) = e.content_type {
            r.content_type = header_value(&format!("{field}.content_type"), &ct)?;
        }
        for (k, v) in e.headers {
            let hf = format!("{field}.headers.{k}");
            r.headers
                .push((header_name(&hf, &k)?, header_value(&hf, &v)?));
        }
    }

    // SPEC §4: 401 answers carry a challenge (RFC 9110 §11.6.1), derived once here from the
    // credential sources, unless the class's override names `www-authenticate` itself (an
    // empty value there sends none).
    for class in [Class::MissingKey, Class::InvalidKey, Class::ExpiredKey] {
        let r = responses.get_mut(class);
        match r.headers.iter().position(|(k, _)| k == "www-authenticate") {
            Some(at) => {
                if r.headers.get(at).is_some_and(|(_, v)| v.is_empty()) {
                    r.headers.remove(at);
                }
            }
            None => r
                .headers
                .push(("www-authenticate".into(), challenge(&credentials, class))),
        }
    }

    let whoami = match raw.whoami {
        None => None,
        Some(w) => {
            if !w.path.starts_with('/') {
                return Err(DocError::new(
                    "whoami.path",
                    format!("{:?} must start with '/'", w.path),
                ));
            }
            if !(200..=599).contains(&w.status) {
                return Err(DocError::new(
                    "whoami.status",
                    format!("{} is out of range 200..=599", w.status),
                ));
            }
            let content_type = match w.content_type {
                Some(ct) => header_value("whoami.content_type", &ct)?,
                None => "application/json".to_string(),
            };
            let mut methods = Vec::new();
            for (j, m) in w
                .methods
                .unwrap_or_else(|| vec!["GET".into(), "HEAD".into()])
                .iter()
                .enumerate()
            {
                methods.push(method(&format!("whoami.methods[{j}]"), m)?);
            }
            Some(Whoami {
                path: path::normalize(&w.path),
                methods,
                status: w.status,
                body: w.body,
                content_type,
            })
        }
    };

    let usage = match raw.usage {
        None => None,
        Some(u) => Some(usage_sink(u, &key_list)?),
    };

    Ok(Config {
        key_list,
        credentials,
        key_prefixes: raw.key_prefixes,
        exempt,
        xff_trusted_hops,
        ip_allow,
        ip_deny,
        site,
        routes: RouteTable::new(routes),
        default_limits,
        header_style,
        global,
        invalid_key_limit: raw.invalid_key_limit,
        strip_credential,
        key_id_header,
        owner_header,
        edits,
        responses,
        whoami,
        usage,
        shadow: raw.shadow,
        access_log: raw.access_log,
    })
}

fn usage_sink(u: RawUsage, kl: &KeyListSource) -> Result<UsageSink, DocError> {
    let cluster = u.cluster.unwrap_or_else(|| kl.cluster.clone());
    if cluster.is_empty() {
        return Err(DocError::new("usage.cluster", "must not be empty"));
    }
    if !u.path.starts_with('/') {
        return Err(DocError::new(
            "usage.path",
            format!("{:?} must start with '/'", u.path),
        ));
    }
    if u.interval_s == 0 || u.interval_s > 3600 {
        return Err(DocError::new(
            "usage.interval_s",
            format!("{} is out of range 1..=3600", u.interval_s),
        ));
    }
    if u.timeout_ms == 0 || u.timeout_ms > 600_000 {
        return Err(DocError::new(
            "usage.timeout_ms",
            format!("{} is out of range 1..=600000", u.timeout_ms),
        ));
    }
    if u.max_ids == 0 || u.max_ids > 1_000_000 {
        return Err(DocError::new(
            "usage.max_ids",
            format!("{} is out of range 1..=1000000", u.max_ids),
        ));
    }
    let same = cluster == kl.cluster;
    let authority = match u.authority {
        Some(a) if a.is_empty() => {
            return Err(DocError::new("usage.authority", "must not be empty"))
        }
        Some(a) => a,
        None if same => kl.authority.clone(),
        None => cluster.clone(),
    };
    let headers = match u.headers {
        None if same => kl.headers.clone(),
        None => Vec::new(),
        Some(h) => {
            let mut out = Vec::new();
            for (k, v) in h {
                let field = format!("usage.headers.{k}");
                out.push((header_name(&field, &k)?, header_value(&field, &v)?));
            }
            out
        }
    };
    Ok(UsageSink {
        cluster,
        path: u.path,
        authority,
        headers,
        interval_s: u.interval_s,
        timeout_ms: u.timeout_ms,
        max_ids: u.max_ids as usize,
    })
}

/// `shadow` as written: `true` (every check), `false`, or an object of booleans `keys`, `ip`,
/// `scopes`, `rate_limits` (each default false; a member named twice is an error).
impl<'de> Deserialize<'de> for Shadow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Shadow, D::Error> {
        d.deserialize_any(ShadowVisitor)
    }
}

struct ShadowVisitor;

impl<'de> serde::de::Visitor<'de> for ShadowVisitor {
    type Value = Shadow;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a boolean or an object of booleans (keys, ip, scopes, rate_limits)")
    }
    fn visit_bool<E>(self, all: bool) -> Result<Shadow, E> {
        Ok(Shadow {
            keys: all,
            ip: all,
            scopes: all,
            rate_limits: all,
        })
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Shadow, A::Error> {
        use serde::de::Error;
        let mut s = Shadow::default();
        let mut seen: Vec<String> = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            if seen.contains(&k) {
                return Err(A::Error::custom(format_args!("duplicate field `{k}`")));
            }
            let slot = match k.as_str() {
                "keys" => &mut s.keys,
                "ip" => &mut s.ip,
                "scopes" => &mut s.scopes,
                "rate_limits" => &mut s.rate_limits,
                _ => {
                    return Err(A::Error::unknown_field(
                        &k,
                        &["keys", "ip", "scopes", "rate_limits"],
                    ))
                }
            };
            *slot = map.next_value()?;
            seen.push(k);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_edits_default_to_the_filter_and_accept_envoy_route() {
        let parse_edits = |v: &str| {
            parse(
                format!(
                    r#"{{"key_list":{{"cluster":"k","path":"/"}},"upstream":{{"edits":{v}}}}}"#
                )
                .as_bytes(),
            )
            .map(|c| c.edits)
        };
        assert_eq!(parse_edits(r#""filter""#), Ok(Edits::Filter));
        assert_eq!(parse_edits(r#""envoy_route""#), Ok(Edits::EnvoyRoute));
        let err = parse_edits(r#""route""#).err().unwrap().to_string();
        assert!(
            err.contains("upstream.edits") && err.contains("\"route\""),
            "{err}"
        );
    }

    const MINIMAL: &str = r#"{"key_list":{"cluster":"keyservice","path":"/v1/keys"}}"#;

    fn err(json: &str) -> String {
        parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_spec_defaults() {
        let c = parse(MINIMAL.as_bytes()).unwrap();
        assert_eq!(c.key_list.authority, "keyservice");
        assert_eq!(c.key_list.refresh_s, 30);
        assert_eq!(c.key_list.timeout_ms, 5000);
        assert_eq!(c.key_list.max_bytes, 33_554_432);
        assert!(!c.key_list.fail_open);
        assert_eq!(c.key_list.max_stale_s, 0);
        assert_eq!(
            c.credentials,
            vec![
                CredentialSource::Header {
                    name: "x-api-key".into(),
                    scheme: None
                },
                CredentialSource::Header {
                    name: "authorization".into(),
                    scheme: Some("Bearer".into())
                }
            ]
        );
        assert_eq!(c.header_style, HeaderStyle::XRateLimit);
        assert!(c.strip_credential);
        assert_eq!(c.key_id_header.as_deref(), Some("x-api-key-id"));
        assert_eq!(c.owner_header.as_deref(), Some("x-api-key-owner"));
        assert!(c.default_limits.is_empty() && c.invalid_key_limit.is_none());
        assert_eq!(c.response(Class::Unavailable).status, 503);
    }

    #[test]
    fn usage_defaults_follow_the_key_list_and_errors_name_the_field() {
        assert!(parse(MINIMAL.as_bytes()).unwrap().usage.is_none());
        let c = parse(
            br#"{"key_list":{"cluster":"ks","path":"/v1/keys","authority":"keys.internal","headers":{"authorization":"Bearer r"}},"usage":{}}"#,
        )
        .unwrap();
        let u = c.usage.unwrap();
        assert_eq!((u.cluster.as_str(), u.path.as_str()), ("ks", "/v1/usage"));
        assert_eq!(u.authority, "keys.internal");
        assert_eq!(u.headers, vec![("authorization".into(), "Bearer r".into())]);
        assert_eq!((u.interval_s, u.timeout_ms, u.max_ids), (10, 5000, 10_000));
        let c = parse(
            br#"{"key_list":{"cluster":"ks","path":"/"},"usage":{"cluster":"other","path":"/u","interval_s":2,"headers":{"X-A":"b"}}}"#,
        )
        .unwrap();
        let u = c.usage.unwrap();
        assert_eq!((u.authority.as_str(), u.interval_s), ("other", 2));
        assert_eq!(u.headers, vec![("x-a".into(), "b".into())]);
        for (json, field) in [
            (r#"{"interval_s":0}"#, "usage.interval_s"),
            (r#"{"interval_s":3601}"#, "usage.interval_s"),
            (r#"{"path":"v1"}"#, "usage.path"),
            (r#"{"cluster":""}"#, "usage.cluster"),
            (r#"{"max_ids":0}"#, "usage.max_ids"),
            (r#"{"timeout_ms":0}"#, "usage.timeout_ms"),
            (r#"{"headers":{"a b":"c"}}"#, "usage.headers"),
            (r#"{"sneeze":1}"#, "usage"),
        ] {
            let e = err(&format!(
                r#"{{"key_list":{{"cluster":"k","path":"/"}},"usage":{json}}}"#
            ));
            assert!(e.contains(field), "{json}: {e}");
        }
    }

    #[test]
    fn spec_example_parses() {
        let json = r#"{
          "key_list": {"cluster": "keyservice", "path": "/v1/keys", "authority": "keys.internal",
            "headers": {"authorization": "Bearer service-token"}, "refresh_s": 30, "timeout_ms": 5000,
            "max_bytes": 33554432, "fail_open": false, "max_stale_s": 0},
          "credentials": [{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"}, {"query": "api_key"}],
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
        }"#;
        let c = parse(json.as_bytes()).unwrap();
        assert_eq!(c.credentials.len(), 3);
        assert_eq!(
            c.key_list.headers,
            vec![("authorization".into(), "Bearer service-token".into())]
        );
        assert_eq!(c.exempt.len(), 3);
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.site, Some(SiteSource::PathSegment(2)));
        assert_eq!(
            c.default_limits,
            vec![Limit {
                limit: 60,
                window_s: 60
            }]
        );
        assert!(c.response(Class::MissingKey).body.contains("unauthorized"));
    }

    #[test]
    fn null_turns_identity_headers_off() {
        let c = parse(
            br#"{"key_list":{"cluster":"k","path":"/"},"upstream":{"key_id_header":null,"owner_header":"X-Org"}}"#,
        )
        .unwrap();
        assert_eq!(c.key_id_header, None);
        assert_eq!(c.owner_header.as_deref(), Some("x-org"));
        assert_eq!(c.edits, Edits::Filter);
        assert!(c.strip_credential);
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let cases: &[(&str, &[&str])] = &[
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"bogus":1}"#,
                &["bogus"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/","refresh":3}}"#,
                &["key_list", "refresh"],
            ),
            (r#"{"key_list":{"path":"/"}}"#, &["cluster"]),
            (
                r#"{"key_list":{"cluster":"k","path":"/","refresh_s":"x"}}"#,
                &["key_list.refresh_s", "x"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/","refresh_s":0}}"#,
                &["key_list.refresh_s", "0"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"v1"}}"#,
                &["key_list.path", "v1"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"ip_allow":["10.0.0.0/8","10.0.0.300/8"]}"#,
                &["ip_allow[1]", "10.0.0.300/8"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"ip_deny":["x"]}"#,
                &["ip_deny[0]", "\"x\""],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"credentials":[{"query":"k","scheme":"B"}]}"#,
                &["credentials[0].scheme"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"credentials":[{}]}"#,
                &["credentials[0]"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"credentials":[{"header":"bad header"}]}"#,
                &["credentials[0].header", "bad header"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"exempt":[{}]}"#,
                &["exempt[0]"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"exempt":[{"path_prefix":"swagger"}]}"#,
                &["exempt[0].path_prefix", "swagger"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"site":{"path_segment":0}}"#,
                &["site.path_segment"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"site":{}}"#,
                &["site"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"routes":[{"scope":"a"}]}"#,
                &["routes[0]"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"rate_limit":{"default":[{"limit":1,"window_s":0}]}}"#,
                &["rate_limit.default[0].window_s", "0"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"rate_limit":{"headers":"draft"}}"#,
                &["rate_limit.headers", "draft"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"invalid_key_limit":{"limit":1}}"#,
                &["invalid_key_limit", "window_s"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"errors":{"teapot":{}}}"#,
                &["errors.teapot"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"errors":{"forbidden":{"status":99}}}"#,
                &["errors.forbidden.status", "99"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"errors":{"forbidden":{"headers":{"x":"a\nb"}}}}"#,
                &["errors.forbidden.headers.x"],
            ),
            (
                r#"{"key_list":{"cluster":"k","path":"/"},"upstream":{"key_id_header":":path"}}"#,
                &["upstream.key_id_header"],
            ),
            ("not json", &["expected"]),
        ];
        for (json, needles) in cases {
            let e = err(json);
            for n in *needles {
                assert!(e.contains(n), "error {e:?} for {json} lacks {n:?}");
            }
        }
    }

    #[test]
    fn methods_are_uppercased_and_paths_normalised() {
        let c = parse(
            br#"{"key_list":{"cluster":"k","path":"/"},"exempt":[{"method":"get","path_prefix":"/a//b/"}],
                "routes":[{"path_exact":"/x/./y","methods":["post"]}]}"#,
        )
        .unwrap();
        assert_eq!(c.exempt[0].method.as_deref(), Some("GET"));
        assert_eq!(c.exempt[0].path, Some(PathMatch::Prefix("/a/b/".into())));
        let r = c.routes.find("POST", "/x/y").unwrap();
        assert_eq!(r.path, PathMatch::Exact("/x/y".into()));
        assert_eq!(r.methods, vec!["POST".to_string()]);
    }
}
