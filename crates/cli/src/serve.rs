//! `keygate serve`: a small HTTP/1.1 server (std only, one thread per connection, keep-alive)
//! that serves the key-list file with a strong ETag and answers `304 Not Modified` to a matching
//! `If-None-Match`. The file is served exactly as it is on disk; it is re-read when its size,
//! mtime, ctime or inode change (so both in-place rewrites and replacement by rename are seen),
//! and each new content is validated and a warning logged when it is not a valid key list (the
//! filter rejects such a list itself and keeps its last good one).

use crate::args::Args;
use crate::{sha256_hex, Failure};
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// A line on stderr; a closed or broken stderr is ignored rather than a reason to panic.
macro_rules! log {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}

pub const OPTIONS: &[&str] = &["--listen", "--path", "--bearer-file"];
pub const DEFAULT_PATH: &str = "/v1/keys";
pub const HEALTH_PATH: &str = "/healthz";

/// Largest request head (request line + headers) accepted; larger gets 431.
const MAX_HEAD: usize = 16 * 1024;
/// Concurrent connections; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 256;
/// Idle keep-alive connections and slow request heads are closed after this.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A file whose mtime is at least this old is trusted not to change without its stamp changing
/// (coarse mtime granularity would otherwise hide a rewrite of the same size in the same tick).
const STABLE_AFTER: Duration = Duration::from_secs(2);

pub fn run(a: &Args) -> Result<(), Failure> {
    let file = match a.positional.as_slice() {
        [f] => PathBuf::from(f),
        [] => return Err(Failure::Usage("serve needs the key-list FILE".into())),
        [_, extra, ..] => return Err(Failure::Usage(format!("unexpected argument {extra:?}"))),
    };
    let listen = a.required("--listen").map_err(Failure::Usage)?;
    let path = a
        .one("--path")
        .map_err(Failure::Usage)?
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    if !path.starts_with('/') || path.contains(['?', '#']) || path.contains(char::is_whitespace) {
        return Err(Failure::Usage(format!(
            "--path: {path:?} must start with '/' and hold no query, fragment or space"
        )));
    }
    let bearer = match a.one("--bearer-file").map_err(Failure::Usage)? {
        None => None,
        Some(f) => {
            let t = fs::read_to_string(f)
                .map_err(|e| Failure::Error(format!("reading --bearer-file {f}: {e}")))?;
            let t = t.trim();
            if t.is_empty() || !t.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err(Failure::Error(format!(
                    "--bearer-file {f}: the token must be non-empty visible ASCII"
                )));
            }
            Some(t.as_bytes().to_vec())
        }
    };
    let addrs: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|e| Failure::Error(format!("--listen {listen}: {e}")))?
        .collect();
    let listener = TcpListener::bind(&addrs[..])
        .map_err(|e| Failure::Error(format!("--listen {listen}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Failure::Error(format!("--listen {listen}: {e}")))?;

    let server = Arc::new(Server {
        file,
        path,
        bearer,
        cache: Mutex::new(Cache::default()),
        connections: AtomicUsize::new(0),
    });
    log!("keygate serve: listening on {local}");
    if let Err(e) = server.current() {
        log!("keygate serve: warning: {e}; answering 503 until it can be read");
    }

    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log!("keygate serve: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map(|p| p.to_string())
            .unwrap_or_else(|_| "?".into());
        if server.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            server.connections.fetch_sub(1, Ordering::SeqCst);
            let mut stream = stream;
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let resp = Response::text(503, "too many connections\n");
            let _ = stream.write_all(&resp.encode(false, false));
            log!("keygate serve: {peer}: refused, {MAX_CONNECTIONS} connections open");
            continue;
        }
        let guard = ConnGuard(server.clone());
        let srv = server.clone();
        let spawned = std::thread::Builder::new()
            .name("keygate-conn".into())
            .spawn(move || {
                let _guard = guard;
                srv.connection(stream, &peer);
            });
        if let Err(e) = spawned {
            log!("keygate serve: cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

struct ConnGuard(Arc<Server>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Server {
    file: PathBuf,
    path: String,
    bearer: Option<Vec<u8>>,
    cache: Mutex<Cache>,
    connections: AtomicUsize,
}

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

struct Snapshot {
    body: Vec<u8>,
    etag: String,
}

#[derive(Default)]
struct Cache {
    stamp: Option<Stamp>,
    /// The stamp is old enough that a change of content implies a change of stamp.
    trusted: bool,
    snap: Option<Arc<Snapshot>>,
    /// Last read error logged, so a missing file is logged once, not on every request.
    problem: Option<String>,
}

struct Request {
    method: String,
    target: String,
    keep_alive: bool,
    has_body: bool,
    if_none_match: Vec<String>,
    authorization: Option<String>,
}

enum Body {
    Empty,
    Owned(Vec<u8>),
    Shared(Arc<Snapshot>),
}

struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Body,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: Body::Owned(body.as_bytes().to_vec()),
        }
    }

    fn json(status: u16, message: &str) -> Response {
        let body = serde_json::json!({ "error": message }).to_string();
        Response {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body: Body::Owned(body.into_bytes()),
        }
    }

    fn body_len(&self) -> usize {
        match &self.body {
            Body::Empty => 0,
            Body::Owned(b) => b.len(),
            Body::Shared(s) => s.body.len(),
        }
    }

    /// The status line and headers, then the body unless `head_only` (HEAD) or the status has
    /// none (304).
    fn encode_head(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nDate: {}\r\nServer: keygate/{}\r\n",
            self.status,
            reason(self.status),
            http_date(SystemTime::now()),
            env!("CARGO_PKG_VERSION")
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if self.status != 304 {
            out.push_str(&format!("Content-Length: {}\r\n", self.body_len()));
        }
        out.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        out.into_bytes()
    }

    fn encode(&self, keep_alive: bool, head_only: bool) -> Vec<u8> {
        let mut out = self.encode_head(keep_alive);
        if !head_only && self.status != 304 {
            match &self.body {
                Body::Empty => {}
                Body::Owned(b) => out.extend_from_slice(b),
                Body::Shared(s) => out.extend_from_slice(&s.body),
            }
        }
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

enum HeadError {
    /// Connection closed or timed out (before or in the middle of a request head).
    Closed,
    TooLarge,
}

impl Server {
    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file's current content, re-read when its stamp changed (or cannot be trusted yet).
    fn current(&self) -> Result<Arc<Snapshot>, String> {
        let mut c = self.lock();
        let shown = self.file.display();
        let meta = match fs::metadata(&self.file) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Err(c.problem(format!("{shown} is not a regular file"))),
            Err(e) => return Err(c.problem(format!("{shown}: {e}"))),
        };
        let stamp = Stamp::of(&meta);
        if c.trusted && c.stamp == Some(stamp) {
            if let Some(s) = &c.snap {
                return Ok(s.clone());
            }
        }
        let read_at = SystemTime::now();
        let body = match fs::read(&self.file) {
            Ok(b) => b,
            Err(e) => return Err(c.problem(format!("{shown}: {e}"))),
        };
        let etag = format!("\"{}\"", sha256_hex(&body));
        let changed = c.snap.as_ref().is_none_or(|s| s.etag != etag);
        if changed {
            match keygate_core::keylist::parse(&body) {
                Ok(list) => log!(
                    "keygate serve: {shown}: {} keys (version {}), ETag {etag}",
                    list.len(),
                    list.version.as_deref().unwrap_or("none")
                ),
                Err(e) => log!(
                    "keygate serve: warning: {shown} is not a valid key list, serving it anyway (the filter will reject it and keep its last good list): {e}"
                ),
            }
        }
        c.trusted = stamp
            .mtime
            .and_then(|m| read_at.duration_since(m).ok())
            .is_some_and(|age| age >= STABLE_AFTER);
        c.stamp = Some(stamp);
        c.problem = None;
        let snap = Arc::new(Snapshot { body, etag });
        c.snap = Some(snap.clone());
        Ok(snap)
    }

    fn connection(&self, mut stream: TcpStream, peer: &str) {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let mut buf: Vec<u8> = Vec::with_capacity(1024);
        loop {
            let end = match read_head(&mut stream, &mut buf) {
                Ok(end) => end,
                Err(HeadError::Closed) => return,
                Err(HeadError::TooLarge) => {
                    let resp = Response::text(431, "request head too large\n");
                    let _ = stream.write_all(&resp.encode(false, false));
                    self.log(peer, "-", "-", &resp);
                    lingering_close(stream);
                    return;
                }
            };
            let parsed = parse_head(buf.get(..end).unwrap_or_default());
            buf.drain(..end);
            let req = match parsed {
                Ok(r) => r,
                Err(status) => {
                    let resp = Response::text(status, &format!("{}\n", reason(status)));
                    let _ = stream.write_all(&resp.encode(false, false));
                    self.log(peer, "-", "-", &resp);
                    lingering_close(stream);
                    return;
                }
            };
            // A request body is not expected; rather than frame it, answer and close.
            let keep_alive = req.keep_alive && !req.has_body;
            let resp = self.respond(&req);
            let head_only = req.method == "HEAD";
            let sent = stream
                .write_all(&resp.encode(keep_alive, head_only))
                .and_then(|_| stream.flush());
            self.log(peer, &req.method, &req.target, &resp);
            if sent.is_err() {
                return;
            }
            if !keep_alive {
                if req.has_body {
                    lingering_close(stream);
                }
                return;
            }
        }
    }

    fn respond(&self, req: &Request) -> Response {
        let path = request_path(&req.target);
        let get_or_head = req.method == "GET" || req.method == "HEAD";
        if path == self.path {
            if !get_or_head {
                let mut r = Response::json(405, "method not allowed");
                r.headers.push(("Allow", "GET, HEAD".into()));
                return r;
            }
            if let Some(token) = &self.bearer {
                if !bearer_matches(req.authorization.as_deref(), token) {
                    let mut r = Response::json(401, "unauthorized");
                    r.headers.push(("WWW-Authenticate", "Bearer".into()));
                    return r;
                }
            }
            let snap = match self.current() {
                Ok(s) => s,
                Err(_) => return Response::json(503, "key list unavailable"),
            };
            let headers = vec![
                ("Content-Type", "application/json".to_string()),
                ("ETag", snap.etag.clone()),
                ("Cache-Control", "no-cache".into()),
            ];
            if if_none_match(&req.if_none_match, &snap.etag) {
                return Response {
                    status: 304,
                    headers,
                    body: Body::Empty,
                };
            }
            return Response {
                status: 200,
                headers,
                body: Body::Shared(snap),
            };
        }
        if path == HEALTH_PATH {
            if !get_or_head {
                let mut r = Response::json(405, "method not allowed");
                r.headers.push(("Allow", "GET, HEAD".into()));
                return r;
            }
            return Response::text(200, "ok\n");
        }
        Response::json(404, "not found")
    }

    fn log(&self, peer: &str, method: &str, target: &str, resp: &Response) {
        let target: String = target
            .chars()
            .take(200)
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        let method: String = method.chars().take(20).collect();
        log!(
            "keygate serve: {peer} \"{method} {target}\" {} {}",
            resp.status,
            resp.body_len()
        );
    }
}

impl Cache {
    /// Records a read problem, logging it when it differs from the last one.
    fn problem(&mut self, msg: String) -> String {
        if self.problem.as_deref() != Some(&msg) {
            log!("keygate serve: warning: {msg}");
            self.problem = Some(msg.clone());
        }
        self.stamp = None;
        self.trusted = false;
        msg
    }
}

/// Reads until `buf` holds a complete request head; returns its length (including the blank
/// line). Bytes after it (a pipelined request) stay in `buf`.
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, HeadError> {
    let mut deadline: Option<Instant> = None;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = head_end(buf) {
            return Ok(end);
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        // The idle timeout applies before the first byte; once a request has started, its
        // whole head must arrive within READ_TIMEOUT.
        let timeout = match deadline {
            None => READ_TIMEOUT,
            Some(d) => d
                .checked_duration_since(Instant::now())
                .filter(|t| !t.is_zero())
                .ok_or(HeadError::Closed)?,
        };
        let _ = stream.set_read_timeout(Some(timeout));
        match stream.read(&mut chunk) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => {
                if deadline.is_none() {
                    deadline = Some(Instant::now() + READ_TIMEOUT);
                }
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(HeadError::Closed),
        }
    }
}

/// Closes after an answer sent before the whole request was read: stop writing, then discard
/// what the client is still sending for a moment, so that closing with unread input does not
/// reset the connection before the client has read the answer.
fn lingering_close(mut stream: TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 4096];
    let mut total = 0usize;
    while total < 1 << 20 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

/// End of the head: after the first empty line (CRLF CRLF, or bare LF LF leniently).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses a request head; `Err` is the status to answer (then the connection is closed).
fn parse_head(head: &[u8]) -> Result<Request, u16> {
    let text = std::str::from_utf8(head).map_err(|_| 400u16)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().ok_or(400u16)?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err(400),
    };
    if !is_token(method) || target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(400);
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Err(505),
        _ => return Err(400),
    };
    let mut req = Request {
        method: method.to_string(),
        target: target.to_string(),
        keep_alive: !http10,
        has_body: false,
        if_none_match: Vec::new(),
        authorization: None,
    };
    let mut content_length: Option<u64> = None;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            return Err(400); // obsolete line folding
        }
        let (name, value) = line.split_once(':').ok_or(400u16)?;
        if !is_token(name) {
            return Err(400);
        }
        let value = value.trim_matches([' ', '\t']);
        match name.to_ascii_lowercase().as_str() {
            "connection" => {
                for opt in value.split(',').map(str::trim) {
                    if opt.eq_ignore_ascii_case("close") {
                        req.keep_alive = false;
                    } else if opt.eq_ignore_ascii_case("keep-alive") && http10 {
                        req.keep_alive = true;
                    }
                }
            }
            "content-length" => {
                let n: u64 = value.parse().map_err(|_| 400u16)?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(400);
                }
                content_length = Some(n);
            }
            "transfer-encoding" => req.has_body = true,
            "if-none-match" => req.if_none_match.push(value.to_string()),
            "authorization" => req.authorization = Some(value.to_string()),
            _ => {}
        }
    }
    if content_length.is_some_and(|n| n > 0) {
        req.has_body = true;
    }
    Ok(req)
}

/// The path of a request target (origin-form or absolute-form), without query or fragment.
fn request_path(target: &str) -> &str {
    let t = ["http://", "https://"]
        .iter()
        .find_map(|scheme| {
            let rest = target
                .get(..scheme.len())
                .filter(|p| p.eq_ignore_ascii_case(scheme))
                .and_then(|_| target.get(scheme.len()..))?;
            Some(rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/"))
        })
        .unwrap_or(target);
    let end = t.find(['?', '#']).unwrap_or(t.len());
    t.get(..end).unwrap_or(t)
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

/// IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
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
    fn dates() {
        use std::time::UNIX_EPOCH;
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(http_date(t), "Tue, 29 Feb 2000 00:00:00 GMT");
    }

    #[test]
    fn paths() {
        assert_eq!(request_path("/v1/keys?x=1"), "/v1/keys");
        assert_eq!(request_path("http://h:1/v1/keys"), "/v1/keys");
        assert_eq!(request_path("HTTP://h"), "/");
        assert_eq!(request_path("*"), "*");
    }

    #[test]
    fn heads() {
        let r = parse_head(b"GET /v1/keys HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"a\"\r\n\r\n")
            .ok()
            .unwrap();
        assert!(r.keep_alive && !r.has_body);
        assert_eq!(r.if_none_match, vec!["\"a\"".to_string()]);
        let r = parse_head(b"GET / HTTP/1.0\r\n\r\n").ok().unwrap();
        assert!(!r.keep_alive);
        let r = parse_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .ok()
            .unwrap();
        assert!(r.keep_alive);
        let r = parse_head(b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n")
            .ok()
            .unwrap();
        assert!(r.has_body);
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\n folded\r\n\r\n",
            b"\xff / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
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
