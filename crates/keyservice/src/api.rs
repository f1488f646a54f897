//! The HTTP surface (SPEC §7): `/v1/keys`, the admin API, `/v1/usage`, `/healthz`, `/metrics`.

use crate::document::{self, Built, Content, Schema};
use crate::error::ApiError;
use crate::metrics::{DocState, Metrics};
use crate::model;
use crate::store::{KeyFilter, Named2, Store, UsageReport};
use crate::util;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keygate_core::response::Class;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::path::Path as FsPath;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use subtle::ConstantTimeEq;

/// Largest admin request body, in bytes.
const ADMIN_BODY: usize = 1 << 20;
/// Largest import body, in bytes.
const IMPORT_BODY: usize = 256 << 20;
/// Largest usage report, in bytes.
const USAGE_BODY: usize = 16 << 20;
/// Most per-key entries in one usage report.
const MAX_USAGE_REPORTS: usize = 100_000;

/// A set of bearer tokens, kept as SHA-256 digests and compared in constant time.
#[derive(Default)]
pub struct Tokens {
    role: &'static str,
    digests: Vec<[u8; 32]>,
}

impl Tokens {
    /// Reads a token file: one token a line; blank lines and lines starting with `#` ignored.
    pub fn load(path: &FsPath, role: &'static str) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {role} tokens {}: {e}", path.display()))?;
        let digests: Vec<[u8; 32]> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|t| Sha256::digest(t.as_bytes()).into())
            .collect();
        if digests.is_empty() {
            return Err(format!(
                "{role} tokens {}: no token in the file",
                path.display()
            ));
        }
        Ok(Tokens { role, digests })
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The identity of `token` (`admin:` + the first 12 hex digits of its SHA-256), if it is
    /// one of these. Every configured digest is compared, in constant time.
    pub fn identify(&self, token: &str) -> Option<String> {
        let d: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = subtle::Choice::from(0u8);
        for t in &self.digests {
            found |= t.ct_eq(&d);
        }
        bool::from(found).then(|| {
            format!(
                "{}:{}",
                self.role,
                util::hex(d.get(..6).unwrap_or_default())
            )
        })
    }
}

/// Everything a request handler needs.
pub struct App {
    pub store: Store,
    pub cache: RwLock<Option<Arc<Built>>>,
    /// What the builder keeps between builds (incremental builds start from it).
    pub builder: Mutex<Option<document::Cache>>,
    /// The last build error, cleared by a good build.
    pub build_error: Mutex<Option<String>>,
    pub metrics: Metrics,
    pub admin: Tokens,
    pub reader: Option<Tokens>,
}

type AppState = State<Arc<App>>;

impl App {
    pub fn current(&self) -> Option<Arc<Built>> {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, b: Built) {
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(b));
        *self.build_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn set_error(&self, e: String) {
        *self.build_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }

    fn error(&self) -> Option<String> {
        self.build_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn admin(app: &App, headers: &HeaderMap) -> Result<String, ApiError> {
    let token = bearer(headers).ok_or(ApiError::Unauthorized)?;
    if app.admin.is_empty() {
        return Err(ApiError::Forbidden(
            "the admin API is off: the service was started without --admin-tokens".into(),
        ));
    }
    app.admin
        .identify(token)
        .ok_or_else(|| ApiError::Forbidden("unknown admin token".into()))
}

/// Reader access: open unless reader tokens are configured; then a reader or admin token.
fn reader(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(readers) = &app.reader else {
        return Ok(());
    };
    let token = bearer(headers).ok_or(ApiError::Unauthorized)?;
    if readers.identify(token).is_some() || app.admin.identify(token).is_some() {
        Ok(())
    } else {
        Err(ApiError::Forbidden("unknown reader token".into()))
    }
}

async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge(limit))
}

async fn read_object(body: Body) -> Result<Map<String, Value>, ApiError> {
    model::parse_object(&read_body(body, ADMIN_BODY).await?)
}

/// Query parameters, each at most once, only the names in `allowed`.
fn query(raw: Option<String>, allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_body(format!("bad query string: {e}")))?;
    let mut out = Map::new();
    for (k, v) in pairs {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad(
                k.clone(),
                format!("unknown query parameter {k:?}"),
            ));
        }
        if out.insert(k.clone(), Value::String(v)).is_some() {
            return Err(ApiError::bad(
                k.clone(),
                format!("query parameter {k:?} given twice"),
            ));
        }
    }
    Ok(out)
}

fn path_id(
    p: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<String, ApiError> {
    p.map(|Path(id)| id)
        .map_err(|_| ApiError::NotFound("no such object".into()))
}

/// The router of every endpoint.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/keys", get(get_keys))
        .route("/v1/usage", post(post_usage))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/admin/keys", get(list_keys).post(create_key))
        .route("/v1/admin/keys/lookup", post(lookup))
        .route(
            "/v1/admin/keys/{id}",
            get(get_key).patch(patch_key).delete(delete_key),
        )
        .route("/v1/admin/keys/{id}/rotate", post(rotate))
        .route("/v1/admin/keys/{id}/usage", get(key_usage))
        .route("/v1/admin/owners", get(list_owners))
        .route(
            "/v1/admin/owners/{id}",
            get(get_owner).put(put_owner).delete(delete_owner),
        )
        .route("/v1/admin/plans", get(list_plans))
        .route(
            "/v1/admin/plans/{id}",
            get(get_plan).put(put_plan).delete(delete_plan),
        )
        .route("/v1/admin/import", post(import))
        .route("/v1/admin/export", get(export))
        .route("/v1/admin/audit", get(audit))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(app.clone(), track))
        .with_state(app)
}

async fn track(State(app): AppState, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = match req.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m.to_string(),
        _ => "other".to_string(),
    };
    let resp = next.run(req).await;
    app.metrics.request(&route, &method, resp.status().as_u16());
    resp
}

/// `GET /v1/keys`: the §2 document in the schema the gateway names (`x-keygate-schema`).
async fn get_keys(State(app): AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    reader(&app, &headers)?;
    let schema = match headers.get("x-keygate-schema") {
        None => document::LATEST,
        Some(v) => v.to_str().ok().and_then(Schema::negotiate).ok_or_else(|| {
            ApiError::bad(
                "x-keygate-schema",
                "expected schema numbers such as 1 or 1,2",
            )
        })?,
    };
    let Some(built) = app.current() else {
        return Err(ApiError::Unavailable(
            "the key-list document is not built yet".into(),
        ));
    };
    let doc = built.doc(schema);
    let etag = HeaderValue::from_str(&doc.etag).map_err(|e| ApiError::Internal(e.to_string()))?;
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::VARY, HeaderValue::from_static("x-keygate-schema")),
        (
            header::HeaderName::from_static("x-keygate-schema"),
            HeaderValue::from(schema as u16),
        ),
    ];
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if document::none_match(inm, &doc.etag) {
            app.metrics.not_modified.fetch_add(1, Ordering::Relaxed);
            let mut r = StatusCode::NOT_MODIFIED.into_response();
            r.headers_mut().insert(header::ETAG, etag);
            r.headers_mut().extend(common);
            return Ok(r);
        }
    }
    let parts = doc.parts.clone();
    let stream =
        futures_util::stream::iter(parts.into_iter().map(Ok::<_, std::convert::Infallible>));
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(doc.len));
    h.insert(header::ETAG, etag);
    h.extend(common);
    Ok(r)
}

/// `GET /healthz`: 200 when the database answers and the current document is built.
async fn healthz(State(app): AppState) -> Result<Json<Value>, ApiError> {
    let ping = tokio::time::timeout(std::time::Duration::from_secs(2), app.store.ping()).await;
    match ping {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ApiError::Unavailable(format!("database unreachable: {e}"))),
        Err(_) => {
            return Err(ApiError::Unavailable(
                "database did not answer within 2 s".into(),
            ))
        }
    }
    if let Some(e) = app.error() {
        return Err(ApiError::Unavailable(format!(
            "building the key-list document failed: {e}"
        )));
    }
    let Some(b) = app.current() else {
        return Err(ApiError::Unavailable(
            "the key-list document is not built yet".into(),
        ));
    };
    Ok(Json(
        json!({"status": "ok", "generation": b.generation, "keys": b.keys,
        "database": match app.store.kind { crate::store::Kind::Sqlite => "sqlite", crate::store::Kind::Postgres => "postgres" }}),
    ))
}

async fn metrics(State(app): AppState) -> Response {
    let b = app.current();
    let state = DocState {
        keys: b.as_ref().map_or(0, |b| b.keys),
        bytes: b.as_ref().map_or(0, |b| b.v2.len),
        generation: b.as_ref().map_or(0, |b| b.generation),
        built: b.is_some(),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(&state),
    )
        .into_response()
}

fn with_key(record: Value, key: String) -> Value {
    let mut record = record;
    if let Some(o) = record.as_object_mut() {
        o.insert("key".into(), Value::String(key));
    }
    record
}

async fn create_key(
    State(app): AppState,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let actor = admin(&app, &headers)?;
    let m = read_object(body).await?;
    let c = model::create_key(&m, util::now())?;
    let (row, key) = app.store.create_key(&actor, c).await?;
    Ok((StatusCode::CREATED, Json(with_key(row.record(), key))).into_response())
}

async fn list_keys(
    State(app): AppState,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let q = query(q, &["owner", "status", "plan", "limit", "cursor"])?;
    let s = |k: &str| q.get(k).and_then(Value::as_str).map(str::to_string);
    let limit = match s("limit") {
        None => 100,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::bad("limit", format!("{l:?} is not an integer in 1..=1000"))
            })?,
    };
    let status = s("status");
    if let Some(st) = &status {
        if !model::SETTABLE_STATUSES.contains(&st.as_str()) {
            return Err(ApiError::bad(
                "status",
                format!("{st:?} is not one of active, disabled, revoked"),
            ));
        }
    }
    let after = match s("cursor") {
        None => None,
        Some(c) => Some(
            c.strip_prefix("c1")
                .and_then(util::unhex)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::bad("cursor", "not a cursor this service gave"))?,
        ),
    };
    let f = KeyFilter {
        owner: s("owner"),
        status,
        plan: s("plan"),
        after,
        limit: limit + 1,
    };
    let mut rows = app.store.list_keys(&f).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(100));
    let next = if more {
        rows.last()
            .map(|r| format!("c1{}", util::hex(r.id.as_bytes())))
    } else {
        None
    };
    Ok(Json(
        json!({"keys": rows.iter().map(|r| r.record()).collect::<Vec<_>>(), "next_cursor": next}),
    ))
}

async fn get_key(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let id = path_id(id)?;
    let row = app
        .store
        .get_key(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no key {id:?}")))?;
    Ok(Json(row.record()))
}

async fn lookup(
    State(app): AppState,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let m = read_object(body).await?;
    model::check_members(&m, "", &["key"], &[])?;
    let key = match m.get("key") {
        Some(Value::String(k)) if !k.is_empty() => k,
        _ => return Err(ApiError::bad("key", "expected the key, a non-empty string")),
    };
    let hash = util::sha256_hex(key.as_bytes());
    let row = app
        .store
        .lookup(&hash)
        .await?
        .ok_or_else(|| ApiError::NotFound("no key matches".into()))?;
    Ok(Json(row.record()))
}

async fn patch_key(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let actor = admin(&app, &headers)?;
    let id = path_id(id)?;
    let m = read_object(body).await?;
    let p = model::patch_key(&m)?;
    let row = app.store.patch_key(&actor, &id, p).await?;
    Ok(Json(row.record()))
}

async fn rotate(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let actor = admin(&app, &headers)?;
    let id = path_id(id)?;
    let bytes = read_body(body, ADMIN_BODY).await?;
    let m = if bytes.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        model::parse_object(&bytes)?
    };
    let r = model::rotate(&m, util::now())?;
    let (row, key) = app.store.rotate(&actor, &id, r).await?;
    Ok((StatusCode::CREATED, Json(with_key(row.record(), key))).into_response())
}

async fn delete_key(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<StatusCode, ApiError> {
    let actor = admin(&app, &headers)?;
    let id = path_id(id)?;
    app.store.delete_key(&actor, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn key_usage(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let id = path_id(id)?;
    let q = query(q, &["days"])?;
    let days = match q.get("days").and_then(Value::as_str) {
        None => 90,
        Some(d) => d
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=3660).contains(n))
            .ok_or_else(|| ApiError::bad("days", format!("{d:?} is not an integer in 1..=3660")))?,
    };
    let row = app
        .store
        .get_key(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no key {id:?}")))?;
    let since = util::day(util::now() - (days - 1) * 86_400);
    let per_day = app.store.key_usage(&id, &since).await?;
    Ok(Json(
        json!({"id": row.id, "last_used_at": row.last_used_at.map(util::rfc3339), "days": per_day}),
    ))
}

async fn list_owners(State(app): AppState, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let all = app.store.list_owners().await?;
    Ok(Json(
        json!({"owners": all.iter().map(|o| o.to_json()).collect::<Vec<_>>()}),
    ))
}

async fn list_plans(State(app): AppState, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let all = app.store.list_plans().await?;
    Ok(Json(
        json!({"plans": all.iter().map(|o| o.to_json()).collect::<Vec<_>>()}),
    ))
}

async fn get_owner(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let id = path_id(id)?;
    let o = app
        .store
        .get_owner(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no owner {id:?}")))?;
    Ok(Json(o.to_json()))
}

async fn get_plan(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let id = path_id(id)?;
    let o = app
        .store
        .get_plan(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no plan {id:?}")))?;
    Ok(Json(o.to_json()))
}

fn named_id(id: &str) -> Result<(), ApiError> {
    model::name(&Value::String(id.to_string()), "id").map(|_| ())
}

async fn put_owner(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let actor = admin(&app, &headers)?;
    let id = path_id(id)?;
    named_id(&id)?;
    let m = read_object(body).await?;
    let o = model::owner(&m, "")?;
    let (created, stored) = app.store.put_owner(&actor, &id, o).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(stored.to_json())).into_response())
}

async fn put_plan(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let actor = admin(&app, &headers)?;
    let id = path_id(id)?;
    named_id(&id)?;
    let m = read_object(body).await?;
    let limits = model::plan(&m, "")?;
    let (created, stored) = app.store.put_plan(&actor, &id, limits).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(stored.to_json())).into_response())
}

async fn delete_owner(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<StatusCode, ApiError> {
    let actor = admin(&app, &headers)?;
    let id = path_id(id)?;
    app.store.delete_named(&actor, Named2::Owner, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_plan(
    State(app): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<StatusCode, ApiError> {
    let actor = admin(&app, &headers)?;
    let id = path_id(id)?;
    app.store.delete_named(&actor, Named2::Plan, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/admin/import`: a §2 document into the database (see README).
async fn import(
    State(app): AppState,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let actor = admin(&app, &headers)?;
    let bytes = read_body(body, IMPORT_BODY).await?;
    let doc = model::import(&bytes)?;
    Ok(Json(app.store.import(&actor, doc).await?))
}

/// `GET /v1/admin/export`: every key that is not deleted, as a §2 document with metadata.
async fn export(State(app): AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    admin(&app, &headers)?;
    let built = document::build(&app.store, Content::Export)
        .await
        .map_err(ApiError::Internal)?;
    let doc = built.doc(document::LATEST);
    Ok(([(header::CONTENT_TYPE, "application/json")], doc.to_vec()).into_response())
}

async fn audit(
    State(app): AppState,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let q = query(q, &["after", "limit"])?;
    let num = |k: &str, d: i64, max: i64| match q.get(k).and_then(Value::as_str) {
        None => Ok(d),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (0..=max).contains(n))
            .ok_or_else(|| ApiError::bad(k, format!("{s:?} is not an integer in 0..={max}"))),
    };
    let after = num("after", 0, i64::MAX)?;
    let limit = num("limit", 100, 1000)?;
    let entries = app.store.audit_log(after, limit).await?;
    Ok(Json(json!({"entries": entries})))
}

/// `POST /v1/usage`: per-key counts from a gateway (format in README).
async fn post_usage(
    State(app): AppState,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    reader(&app, &headers)?;
    let m = model::parse_object(&read_body(body, USAGE_BODY).await?)?;
    let now = util::now();
    let (at, reports) = usage_body(&m, now)?;
    let (applied, unknown) = app.store.apply_usage(&util::day(at), &reports).await?;
    app.metrics.usage_reports.fetch_add(1, Ordering::Relaxed);
    app.metrics
        .usage_keys
        .fetch_add(applied as u64, Ordering::Relaxed);
    Ok(Json(json!({"accepted": applied, "unknown": unknown})))
}

fn usage_body(m: &Map<String, Value>, now: i64) -> Result<(i64, Vec<UsageReport>), ApiError> {
    model::check_members(m, "", &["instance", "at", "reports"], &[])?;
    if let Some(i) = m.get("instance") {
        model::text(i, "instance", 256, false)?;
    }
    let at = match m.get("at") {
        None | Some(Value::Null) => now,
        Some(v) => model::time(v, "at")?.min(now),
    };
    let Some(Value::Array(items)) = m.get("reports") else {
        return Err(ApiError::bad("reports", "expected an array"));
    };
    if items.len() > MAX_USAGE_REPORTS {
        return Err(ApiError::bad(
            "reports",
            format!("more than {MAX_USAGE_REPORTS} entries"),
        ));
    }
    let count = |v: &Value, f: String| {
        v.as_u64()
            .filter(|n| *n <= 1 << 53)
            .ok_or_else(|| ApiError::bad(f, "expected a non-negative integer"))
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, r) in items.iter().enumerate() {
        let f = |s: &str| format!("reports[{i}].{s}");
        let Value::Object(r) = r else {
            return Err(ApiError::bad(format!("reports[{i}]"), "expected an object"));
        };
        model::check_members(
            r,
            &format!("reports[{i}]."),
            &["id", "allowed", "refused", "last_used_at"],
            &[],
        )?;
        let id = model::name(r.get("id").unwrap_or(&Value::Null), &f("id"))?;
        let allowed = match r.get("allowed") {
            None => 0,
            Some(v) => count(v, f("allowed"))?,
        };
        let mut refused = Vec::new();
        match r.get("refused") {
            None | Some(Value::Null) => {}
            Some(Value::Object(classes)) => {
                for (class, n) in classes {
                    // The refusal classes a usage report may count (SPEC §4).
                    if !Class::ALL.iter().any(|c| c.name() == class) {
                        return Err(ApiError::bad(
                            f(&format!("refused.{class}")),
                            "not a decision class of SPEC §4",
                        ));
                    }
                    refused.push((class.clone(), count(n, f(&format!("refused.{class}")))?));
                }
            }
            Some(_) => return Err(ApiError::bad(f("refused"), "expected an object of counts")),
        }
        let last_used_at = match r.get("last_used_at") {
            None | Some(Value::Null) => None,
            Some(v) => Some(model::time(v, &f("last_used_at"))?.min(now)),
        };
        out.push(UsageReport {
            id,
            allowed,
            refused,
            last_used_at,
        });
    }
    Ok((at, out))
}
