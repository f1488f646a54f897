//! `keygate serve`: serves a key-list file over HTTP/1.1 (hyper on a tokio runtime) with a strong
//! ETag and `304 Not Modified` for a matching `If-None-Match`.
//!
//! The file is re-read when its size, mtime, ctime or inode change (so both in-place rewrites
//! and replacement by rename are seen). Each new content is validated as the filter does; an
//! invalid one (or a file that cannot be read any more) is logged and the last valid list is
//! still served, which `/healthz` reports. With no valid list at all, the key list and
//! `/healthz` answer 503. SIGTERM or SIGINT stop accepting connections and let open requests
//! finish (at most `SHUTDOWN_GRACE`).

use crate::exit::Failure;
use crate::sha256_hex;
use crate::Output;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::fs;
use std::io::{self, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

pub const DEFAULT_PATH: &str = "/v1/keys";
pub const HEALTH_PATH: &str = "/healthz";

/// Largest request head (request line + headers) accepted, in bytes; larger gets 431.
const MAX_HEAD: usize = 16 * 1024;
/// Concurrent connections; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 256;
/// A request head must arrive within this (idle keep-alive connections are closed after it).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A file whose mtime is at least this old is trusted not to change without its stamp changing
/// (coarse mtime granularity would otherwise hide a rewrite of the same size in the same tick).
const STABLE_AFTER: Duration = Duration::from_secs(2);

pub const AFTER_HELP: &str = "\
Endpoints:
  GET|HEAD PATH     the key list as last validated, strong ETag (quoted hex SHA-256 of the
                    bytes), Cache-Control: no-cache, 304 on a matching If-None-Match; 401 without
                    the bearer token when --bearer-file is given; 503 while no valid list exists
  GET|HEAD /healthz 200 \"ok …\" while the file is a valid list; 200 \"degraded …\" while the file
                    is invalid or unreadable and the last valid list is served; 503 with no valid list
  anything else     404 (405 for another method on those paths)

Exit status:
  0  stopped by SIGTERM or SIGINT
  1  --listen cannot be bound, or the bearer token is not visible ASCII
  2  bad usage
  3  the bearer file cannot be read";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `keygate serve: …` lines.
    Text,
    /// One JSON object a line: ts, level, msg and fields.
    Json,
}

/// The long help of the subcommand.
pub const SERVE_LONG_ABOUT: &str = "\
Serve the key-list FILE over HTTP/1.1 with a strong ETag and 304 Not Modified. The file is
re-read whenever it changes (in place or replaced by rename) and validated as the filter does:
an invalid content is logged and the last valid list stays served (/healthz says so). The
bound address is logged first, as \"keygate serve: listening on ADDR\" (--listen 127.0.0.1:0
picks a free port). SIGTERM or SIGINT shut down gracefully.";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The key-list file to serve.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Address to listen on, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// The path the key list is served at.
    #[arg(long, default_value = DEFAULT_PATH, value_parser = parse_path)]
    pub path: String,
    /// Require "Authorization: Bearer <token in TOKEN_FILE>" for the key list.
    #[arg(long, value_name = "TOKEN_FILE")]
    pub bearer_file: Option<PathBuf>,
    /// Log format on stderr (--json is --log-format json).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log only warnings, errors and the listening address (no access log, no reloads).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub output: Output,
}

fn parse_path(p: &str) -> Result<String, String> {
    if !p.starts_with('/') || p.contains(['?', '#']) || p.contains(char::is_whitespace) {
        return Err(format!(
            "{p:?} must start with '/' and hold no query, fragment or space"
        ));
    }
    Ok(p.to_string())
}

// ---------------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Log {
    json: bool,
    quiet: bool,
}

impl Log {
    fn line(&self, level: &str, msg: &str, fields: serde_json::Value) {
        let text = if self.json {
            let mut v = serde_json::json!({
                "ts": keygate_core::time::format_rfc3339(crate::newkey::unix_now()),
                "level": level,
                "msg": msg,
            });
            if let (Some(m), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
                m.extend(f);
            }
            v.to_string()
        } else {
            let prefix = if level == "warn" { "warning: " } else { "" };
            format!("keygate serve: {prefix}{msg}")
        };
        // A closed or broken stderr is ignored rather than a reason to stop serving.
        let _ = writeln!(io::stderr(), "{text}");
    }

    fn info(&self, msg: &str, fields: serde_json::Value) {
        if !self.quiet {
            self.line("info", msg, fields);
        }
    }

    fn warn(&self, msg: &str, fields: serde_json::Value) {
        self.line("warn", msg, fields);
    }
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

/// What identifies one version of the file on disk without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: Option<SystemTime>,
    ino: u64,
    dev: u64,
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        #[cfg(unix)]
        let (ino, dev, ctime) = {
            use std::os::unix::fs::MetadataExt;
            (meta.ino(), meta.dev(), (meta.ctime(), meta.ctime_nsec()))
        };
        #[cfg(not(unix))]
        let (ino, dev, ctime) = (0, 0, (0, 0));
        Stamp {
            len: meta.len(),
            mtime: meta.modified().ok(),
            ino,
            dev,
            ctime,
        }
    }
}

/// A valid key list as served.
struct Snapshot {
    body: Bytes,
    etag: String,
    keys: usize,
    version: Option<String>,
    /// Unix seconds it was loaded.
    loaded_at: i64,
}

#[derive(Default)]
struct Cache {
    stamp: Option<Stamp>,
    /// The stamp is old enough that a change of content implies a change of stamp.
    trusted: bool,
    /// The last valid list.
    valid: Option<Arc<Snapshot>>,
    /// What is wrong with the file now (unreadable or invalid), logged once per problem.
    problem: Option<String>,
    /// ETag of the last invalid content, so it is not validated (and logged) again.
    bad_etag: Option<String>,
}

struct Server {
    file: PathBuf,
    path: String,
    bearer: Option<Vec<u8>>,
    cache: Mutex<Cache>,
    log: Log,
}

impl Server {
    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a problem with the file, logging it when it is new.
    fn problem(&self, c: &mut Cache, msg: String) {
        if c.problem.as_deref() != Some(&msg) {
            let serving = match &c.valid {
                Some(s) => format!(
                    "; serving the last valid list ({} keys, version {}, ETag {})",
                    s.keys,
                    s.version.as_deref().unwrap_or("none"),
                    s.etag
                ),
                None => "; no valid list: answering 503".to_string(),
            };
            self.log.warn(
                &format!("{msg}{serving}"),
                serde_json::json!({"problem": msg, "serving_last_valid": c.valid.is_some()}),
            );
            c.problem = Some(msg);
        }
    }

    /// Re-reads the file when its stamp changed (or cannot be trusted yet); returns the last
    /// valid list and the current problem.
    fn refresh(&self) -> (Option<Arc<Snapshot>>, Option<String>) {
        let mut c = self.lock();
        let shown = self.file.display().to_string();
        let meta = match fs::metadata(&self.file) {
            Ok(m) if m.is_file() => m,
            Ok(_) => {
                self.problem(&mut c, format!("{shown} is not a regular file"));
                c.stamp = None;
                return (c.valid.clone(), c.problem.clone());
            }
            Err(e) => {
                self.problem(&mut c, format!("{shown}: {e}"));
                c.stamp = None;
                return (c.valid.clone(), c.problem.clone());
            }
        };
        let stamp = Stamp::of(&meta);
        if c.trusted && c.stamp == Some(stamp) {
            return (c.valid.clone(), c.problem.clone());
        }
        let read_at = SystemTime::now();
        let body = match fs::read(&self.file) {
            Ok(b) => b,
            Err(e) => {
                self.problem(&mut c, format!("{shown}: {e}"));
                c.stamp = None;
                return (c.valid.clone(), c.problem.clone());
            }
        };
        c.trusted = stamp
            .mtime
            .and_then(|m| read_at.duration_since(m).ok())
            .is_some_and(|age| age >= STABLE_AFTER);
        c.stamp = Some(stamp);
        let etag = format!("\"{}\"", sha256_hex(&body));
        if c.valid.as_ref().is_some_and(|s| s.etag == etag) {
            if c.problem.take().is_some() {
                self.log
                    .info(&format!("{shown} is valid again"), serde_json::json!({}));
            }
            return (c.valid.clone(), None);
        }
        if c.bad_etag.as_deref() == Some(&etag) {
            return (c.valid.clone(), c.problem.clone());
        }
        match keygate_core::keylist::parse(&body) {
            Ok(list) => {
                self.log.info(
                    &format!(
                        "{shown}: {} keys (version {}), ETag {etag}",
                        list.len(),
                        list.version.as_deref().unwrap_or("none")
                    ),
                    serde_json::json!({"file": shown, "keys": list.len(), "version": list.version, "etag": etag}),
                );
                c.valid = Some(Arc::new(Snapshot {
                    body: Bytes::from(body),
                    etag,
                    keys: list.len(),
                    version: list.version,
                    loaded_at: crate::newkey::unix_now(),
                }));
                c.problem = None;
                c.bad_etag = None;
            }
            Err(e) => {
                c.bad_etag = Some(etag);
                self.problem(&mut c, format!("{shown} is not a valid key list: {e}"));
            }
        }
        (c.valid.clone(), c.problem.clone())
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let get_or_head = req.method() == Method::GET || req.method() == Method::HEAD;
        if path == self.path {
            if !get_or_head {
                return with_allow(json_reply(405, "method not allowed"));
            }
            if let Some(token) = &self.bearer {
                let auth = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                if !bearer_matches(auth, token) {
                    let mut r = json_reply(401, "unauthorized");
                    r.headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    return r;
                }
            }
            let Some(snap) = self.refresh().0 else {
                return json_reply(503, "key list unavailable");
            };
            let inm: Vec<String> = req
                .headers()
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect();
            let not_modified = if_none_match(&inm, &snap.etag);
            let mut r = Response::new(Full::new(if not_modified {
                Bytes::new()
            } else {
                snap.body.clone()
            }));
            *r.status_mut() = if not_modified {
                StatusCode::NOT_MODIFIED
            } else {
                StatusCode::OK
            };
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Ok(v) = HeaderValue::from_str(&snap.etag) {
                h.insert(header::ETAG, v);
            }
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            if !not_modified {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(snap.body.len()));
            }
            return r;
        }
        if path == HEALTH_PATH {
            if !get_or_head {
                return with_allow(json_reply(405, "method not allowed"));
            }
            let (valid, problem) = self.refresh();
            return match (valid, problem) {
                (Some(s), None) => text_reply(
                    200,
                    format!(
                        "ok: {} keys (version {}), ETag {}\n",
                        s.keys,
                        s.version.as_deref().unwrap_or("none"),
                        s.etag
                    ),
                ),
                (Some(s), Some(p)) => text_reply(
                    200,
                    format!(
                        "degraded: {p}; serving the last valid list: {} keys (version {}), ETag {}, loaded at {}\n",
                        s.keys,
                        s.version.as_deref().unwrap_or("none"),
                        s.etag,
                        keygate_core::time::format_rfc3339(s.loaded_at)
                    ),
                ),
                (None, p) => text_reply(
                    503,
                    format!(
                        "unavailable: no valid key list: {}\n",
                        p.as_deref().unwrap_or("not loaded")
                    ),
                ),
            };
        }
        json_reply(404, "not found")
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn json_reply(code: u16, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status(code);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text_reply(code: u16, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status(code);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn with_allow(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    r
}

/// Whether the client asked to keep the connection open (HTTP/1.1 unless `close`; HTTP/1.0
/// only with `keep-alive`).
fn wants_keep_alive(req: &Request<Incoming>) -> bool {
    let tokens: Vec<String> = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    if req.version() == Version::HTTP_10 {
        tokens.iter().any(|t| t == "keep-alive")
    } else {
        !tokens.iter().any(|t| t == "close")
    }
}

/// RFC 9110 §13.1.2: `*`, or any listed entity tag equal to ours under weak comparison.
pub fn if_none_match(values: &[String], etag: &str) -> bool {
    let ours = etag.trim_matches('"');
    for value in values {
        let mut rest = value.as_str();
        loop {
            rest = rest.trim_start_matches([' ', '\t', ',']);
            if rest.is_empty() {
                break;
            }
            if rest.starts_with('*') {
                return true;
            }
            let tag = rest.strip_prefix("W/").unwrap_or(rest);
            let Some(tag) = tag.strip_prefix('"') else {
                break; // malformed: ignore the rest of this field
            };
            let Some(close) = tag.find('"') else {
                break;
            };
            if tag.get(..close) == Some(ours) {
                return true;
            }
            rest = tag.get(close + 1..).unwrap_or("");
        }
    }
    false
}

fn bearer_matches(authorization: Option<&str>, token: &[u8]) -> bool {
    let Some((scheme, given)) = authorization.and_then(|a| a.split_once(' ')) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let given = given.trim().as_bytes();
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

pub fn run(a: &ServeArgs) -> Result<(), Failure> {
    let bearer = match &a.bearer_file {
        None => None,
        Some(f) => {
            let t = fs::read_to_string(f).map_err(|e| {
                Failure::Unreadable(format!("reading --bearer-file {}: {e}", f.display()))
            })?;
            let t = t.trim();
            if t.is_empty() || !t.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err(Failure::Invalid(format!(
                    "--bearer-file {}: the token must be non-empty visible ASCII",
                    f.display()
                )));
            }
            Some(t.as_bytes().to_vec())
        }
    };
    let listen = &a.listen;
    let addrs: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|e| Failure::Invalid(format!("--listen {listen}: {e}")))?
        .collect();
    let std_listener = std::net::TcpListener::bind(&addrs[..])
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .map_err(|e| Failure::Invalid(format!("--listen {listen}: {e}")))?;
    let local = std_listener
        .local_addr()
        .map_err(|e| Failure::Invalid(format!("--listen {listen}: {e}")))?;
    let log = Log {
        json: a.output.json || a.log_format == LogFormat::Json,
        quiet: a.quiet,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Invalid(format!("starting the runtime: {e}")))?;
    // The signal handlers are installed before anything is logged: a caller that stops the
    // server as soon as it says it listens must see a graceful shutdown, not a killed process.
    let signals = {
        let _context = runtime.enter();
        Signals::install()
    };
    // Always logged, first: how a caller that asked for port 0 learns the port.
    log.line(
        "info",
        &format!("listening on {local}"),
        serde_json::json!({"addr": local.to_string()}),
    );
    let server = Arc::new(Server {
        file: a.file.clone(),
        path: a.path.clone(),
        bearer,
        cache: Mutex::new(Cache::default()),
        log,
    });
    server.refresh();
    runtime.block_on(serve_loop(server, std_listener, signals))
}

async fn serve_loop(
    server: Arc<Server>,
    std_listener: std::net::TcpListener,
    signals: Signals,
) -> Result<(), Failure> {
    let listener = tokio::net::TcpListener::from_std(std_listener)
        .map_err(|e| Failure::Invalid(format!("listening: {e}")))?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let shutdown = signals.wait();
    tokio::pin!(shutdown);
    let log = server.log;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    log.warn(&format!("accept: {e}"), serde_json::json!({}));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            signal = &mut shutdown => {
                log.line("info", &format!("{signal}: shutting down"), serde_json::json!({"signal": signal}));
                break;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            use tokio::io::AsyncWriteExt;
            let mut stream = stream;
            let body = "too many connections\n";
            let reply = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ =
                tokio::time::timeout(Duration::from_secs(1), stream.write_all(reply.as_bytes()))
                    .await;
            log.warn(
                &format!("{peer}: refused, {MAX_CONNECTIONS} connections open"),
                serde_json::json!({"peer": peer.to_string()}),
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let srv = server.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let srv = srv.clone();
            async move {
                let keep_alive = wants_keep_alive(&req);
                let mut resp = srv.respond(&req);
                resp.headers_mut().insert(
                    header::CONNECTION,
                    HeaderValue::from_static(if keep_alive { "keep-alive" } else { "close" }),
                );
                if let Ok(v) =
                    HeaderValue::from_str(&format!("keygate/{}", env!("CARGO_PKG_VERSION")))
                {
                    resp.headers_mut().insert(header::SERVER, v);
                }
                let len = resp
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .map_or_else(
                        || {
                            hyper::body::Body::size_hint(resp.body())
                                .exact()
                                .unwrap_or(0)
                                .to_string()
                        },
                        str::to_string,
                    );
                let target: String = req
                    .uri()
                    .to_string()
                    .chars()
                    .take(200)
                    .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                    .collect();
                srv.log.info(
                    &format!(
                        "{peer} \"{} {target}\" {} {len}",
                        req.method(),
                        resp.status().as_u16()
                    ),
                    serde_json::json!({"peer": peer.to_string(), "method": req.method().as_str(),
                                       "target": target, "status": resp.status().as_u16()}),
                );
                if req.method() == Method::HEAD {
                    // The length of the body a GET would get; HEAD sends none.
                    *resp.body_mut() = Full::new(Bytes::new());
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(READ_TIMEOUT)
            .max_buf_size(MAX_HEAD)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            log.warn("connections still open after the grace period; closing them", serde_json::json!({}));
        }
    }
    log.line("info", "stopped", serde_json::json!({}));
    Ok(())
}

/// SIGTERM and SIGINT handlers, installed at once (tokio installs a handler when its stream is
/// made, not when it is first polled).
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installs the handlers; must run inside the runtime's context.
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Signals {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Resolves with the signal's name on SIGTERM or SIGINT.
    async fn wait(self) -> &'static str {
        #[cfg(unix)]
        {
            let (mut term, mut int) = (self.term, self.int);
            tokio::select! {
                Some(_) = async { term.as_mut()?.recv().await } => "SIGTERM",
                Some(_) = async { int.as_mut()?.recv().await } => "SIGINT",
                else => std::future::pending().await,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_lists() {
        let e = "\"abc\"";
        let v = |s: &str| vec![s.to_string()];
        assert!(if_none_match(&v("\"abc\""), e));
        assert!(if_none_match(&v("W/\"abc\""), e));
        assert!(if_none_match(&v("\"x\", \"abc\""), e));
        assert!(if_none_match(&v("\"x\",W/\"abc\""), e));
        assert!(if_none_match(&v("*"), e));
        assert!(if_none_match(&["\"x\"".into(), "\"abc\"".into()], e));
        assert!(!if_none_match(&v("\"x\""), e));
        assert!(!if_none_match(&v("abc"), e));
        assert!(!if_none_match(&v("\"ab"), e));
        assert!(!if_none_match(&v(""), e));
        assert!(!if_none_match(&[], e));
    }

    #[test]
    fn paths() {
        assert!(parse_path("/v1/keys").is_ok());
        assert!(parse_path("v1").is_err());
        assert!(parse_path("/a?b").is_err());
    }

    #[test]
    fn bearer() {
        assert!(bearer_matches(Some("Bearer tok"), b"tok"));
        assert!(bearer_matches(Some("bearer tok"), b"tok"));
        assert!(!bearer_matches(Some("Bearer tok2"), b"tok"));
        assert!(!bearer_matches(Some("Basic tok"), b"tok"));
        assert!(!bearer_matches(None, b"tok"));
    }
}
