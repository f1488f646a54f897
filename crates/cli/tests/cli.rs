//! Integration tests of the `keygate` operator binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keygate-cli-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn run_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn new_key(list: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["new", "--list", list.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

fn doc(list: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(list).unwrap()).unwrap()
}

#[test]
fn new_creates_the_list_prints_the_key_once_and_stores_only_its_hash() {
    let dir = TempDir::new("new");
    let list = dir.path("keys.json");
    let out = new_key(&list, &["--id", "key_01", "--owner", "org-7"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = stdout(&out);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line: {printed:?}");
    let key = lines[0];
    assert!(key.starts_with("kg_"), "{key}");
    // 24 random bytes in fixed-width base62: 33 characters.
    assert_eq!(key.len(), 3 + 33, "{key}");
    assert!(key[3..].bytes().all(|b| b.is_ascii_alphanumeric()));

    let text = fs::read_to_string(&list).unwrap();
    assert!(!text.contains(key), "the key itself must never be stored");
    assert!(!text.contains(&key[3..]));
    let d = doc(&list);
    let k = &d["keys"][0];
    assert_eq!(k["id"], "key_01");
    assert_eq!(k["owner"], "org-7");
    assert_eq!(k["hash"], sha256_hex(key.as_bytes()));
    assert!(d["version"].as_str().unwrap().ends_with("#1"));
    assert_eq!(
        dir.entries(),
        vec!["keys.json".to_string()],
        "no lock/temp left"
    );

    // The hash subcommand agrees with the stored hash.
    let h = run(&["hash", key]);
    assert_eq!(stdout(&h).trim(), sha256_hex(key.as_bytes()));

    let ok = run(&["check-keys", list.to_str().unwrap()]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert!(
        stdout(&ok).starts_with("ok: 1 keys (version "),
        "{}",
        stdout(&ok)
    );

    // Two keys never collide.
    let out2 = new_key(&list, &["--id", "key_02", "--owner", "org-7"]);
    assert_eq!(out2.status.code(), Some(0), "{}", stderr(&out2));
    assert_ne!(stdout(&out2), printed);
    assert!(doc(&list)["version"].as_str().unwrap().ends_with("#2"));
}

#[test]
fn new_keeps_the_rest_of_the_document_and_writes_every_given_field() {
    let dir = TempDir::new("fields");
    let list = dir.path("keys.json");
    let original = r#"{"owners":{"org-7":{"status":"active"}},
        "plans":{"free":{"rate_limits":[{"limit":10,"window_s":60}]}},
        "keys":[{"id":"old","hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","owner":"org-7","meta":{"note":"kept"}}],
        "version":"v1"}"#;
    fs::write(&list, original).unwrap();
    let out = new_key(
        &list,
        &[
            "--id",
            "key_02",
            "--owner",
            "org-7",
            "--prefix",
            "ak_live_",
            "--bytes",
            "32",
            "--plan",
            "free",
            "--expires",
            "2030-01-01T00:00:00Z",
            "--scope",
            "contacts:read",
            "--scope=contacts:write",
            "--site",
            "123",
            "--allow-ip",
            "203.0.113.0/24",
            "--allow-ip",
            "2001:db8::1",
            "--limit",
            "60/60",
            "--limit",
            "1000/1h",
            "--status",
            "active",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let key = stdout(&out).trim().to_string();
    assert!(key.starts_with("ak_live_"));
    assert_eq!(key.len(), "ak_live_".len() + 43); // 32 bytes → 43 base62 digits

    let text = fs::read_to_string(&list).unwrap();
    // Field order of the document is kept (owners, plans, keys, version).
    let pos = |s: &str| text.find(s).unwrap();
    assert!(pos("\"owners\"") < pos("\"plans\"") && pos("\"plans\"") < pos("\"keys\""));
    assert!(pos("\"keys\"") < pos("\"version\""));
    let d = doc(&list);
    assert_eq!(d["owners"]["org-7"]["status"], "active");
    assert_eq!(d["plans"]["free"]["rate_limits"][0]["limit"], 10);
    assert_eq!(d["keys"][0]["meta"]["note"], "kept");
    assert_ne!(d["version"], "v1");
    assert!(d["version"].as_str().unwrap().ends_with("#2"));
    let k = &d["keys"][1];
    assert_eq!(k["id"], "key_02");
    assert_eq!(k["hash"], sha256_hex(key.as_bytes()));
    assert_eq!(k["plan"], "free");
    assert_eq!(k["status"], "active");
    assert_eq!(k["expires_at"], "2030-01-01T00:00:00Z");
    assert_eq!(
        k["scopes"],
        serde_json::json!(["contacts:read", "contacts:write"])
    );
    assert_eq!(k["sites"], serde_json::json!(["123"]));
    assert_eq!(
        k["allowed_ips"],
        serde_json::json!(["203.0.113.0/24", "2001:db8::1"])
    );
    assert_eq!(
        k["rate_limits"],
        serde_json::json!([{"limit":60,"window_s":60},{"limit":1000,"window_s":3600}])
    );
    let list_parsed = keygate_core::keylist::parse(&fs::read(&list).unwrap()).unwrap();
    assert_eq!(list_parsed.len(), 2);

    // Unix-seconds expiry is stored as a number.
    let out = new_key(
        &list,
        &[
            "--id",
            "key_03",
            "--owner",
            "org-7",
            "--expires",
            "1900000000",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(doc(&list)["keys"][2]["expires_at"], 1_900_000_000);
}

#[test]
fn new_refuses_bad_input_and_writes_nothing() {
    let dir = TempDir::new("refuse");
    let list = dir.path("keys.json");
    let first = new_key(&list, &["--id", "dup", "--owner", "o"]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let before = fs::read(&list).unwrap();

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--id", "dup", "--owner", "o"], 1, "dup"),
        (
            vec!["--id", "k2", "--owner", "o", "--allow-ip", "1.2.3.4/33"],
            1,
            "1.2.3.4/33",
        ),
        (
            vec!["--id", "k2", "--owner", "o", "--allow-ip", "not-an-ip"],
            1,
            "allowed_ips",
        ),
        (
            vec!["--id", "k2", "--owner", "o", "--plan", "gold"],
            1,
            "gold",
        ),
        (vec!["--id", "k 2", "--owner", "o"], 1, "--id"),
        (vec!["--id", "k2", "--owner", ""], 1, "--owner"),
        (
            vec!["--id", "k2", "--owner", "o", "--expires", "soon"],
            1,
            "--expires",
        ),
        (
            vec!["--id", "k2", "--owner", "o", "--limit", "10"],
            1,
            "--limit",
        ),
        (
            vec!["--id", "k2", "--owner", "o", "--limit", "10/0"],
            1,
            "--limit",
        ),
        (
            vec!["--id", "k2", "--owner", "o", "--status", "paused"],
            1,
            "--status",
        ),
        (
            vec!["--id", "k2", "--owner", "o", "--prefix", "a b"],
            1,
            "--prefix",
        ),
        (
            vec!["--id", "k2", "--owner", "o", "--bytes", "8"],
            2,
            "--bytes",
        ),
        (vec!["--id", "k2"], 2, "--owner"),
        (
            vec!["--id", "k2", "--owner", "o", "--bogus", "x"],
            2,
            "--bogus",
        ),
        (vec!["--id", "k2", "--id", "k3", "--owner", "o"], 2, "--id"),
        (vec!["--id", "k2", "--owner", "o", "extra"], 2, "extra"),
    ];
    for (args, code, needle) in cases {
        let out = new_key(&list, &args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?} printed a key");
        assert!(
            stderr(&out).contains(needle),
            "{args:?}: {:?} lacks {needle:?}",
            stderr(&out)
        );
        assert_eq!(
            fs::read(&list).unwrap(),
            before,
            "{args:?} changed the file"
        );
    }
    assert_eq!(
        dir.entries(),
        vec!["keys.json".to_string()],
        "no lock/temp left"
    );

    // A file that is not a key list is not touched either.
    let bad = dir.path("bad.json");
    fs::write(&bad, "{\"keys\": 3}").unwrap();
    let out = new_key(&bad, &["--id", "k", "--owner", "o"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(fs::read(&bad).unwrap(), b"{\"keys\": 3}");
    fs::write(&bad, "not json").unwrap();
    let out = new_key(&bad, &["--id", "k", "--owner", "o"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(fs::read(&bad).unwrap(), b"not json");
}

#[test]
fn hash_of_an_argument_and_of_stdin_lines() {
    let out = run(&["hash", "test"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n"
    );
    let out = run_stdin(&["hash"], b"test\nkg_abc\r\n\ntest");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        format!(
            "{}\n{}\n{}\n{}\n",
            sha256_hex(b"test"),
            sha256_hex(b"kg_abc"),
            sha256_hex(b""),
            sha256_hex(b"test")
        )
    );
    let out = run_stdin(&["hash"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "");
    let out = run(&["hash", "--", "-dash"]);
    assert_eq!(stdout(&out).trim(), sha256_hex(b"-dash"));
    let out = run(&["hash", "a", "b"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_accepts_good_and_names_the_bad_field() {
    let dir = TempDir::new("config");
    let good = dir.path("good.json");
    fs::write(
        &good,
        r#"{"key_list":{"cluster":"keyservice","path":"/v1/keys"},
            "credentials":[{"header":"x-api-key"}],
            "rate_limit":{"default":[{"limit":60,"window_s":60}]}}"#,
    )
    .unwrap();
    let out = run(&["check-config", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ok\n");

    let bad = dir.path("bad.json");
    fs::write(
        &bad,
        r#"{"key_list":{"cluster":"keyservice","path":"/v1/keys","refresh_s":"soon"}}"#,
    )
    .unwrap();
    let out = run(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("key_list.refresh_s"),
        "{}",
        stderr(&out)
    );

    let out = run_stdin(
        &["check-config", "-"],
        br#"{"key_list":{"cluster":"k","path":"/v1/keys"},"ip_allow":["10.0.0.0/33"]}"#,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("ip_allow"), "{}", stderr(&out));

    // Could not read: exit 3, distinct from an invalid configuration (1).
    let out = run(&["check-config", dir.path("missing.json").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let out = run(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_keys_names_the_bad_field() {
    let dir = TempDir::new("keys");
    let f = dir.path("keys.json");
    fs::write(
        &f,
        r#"{"version":"v9","keys":[{"id":"a","hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","owner":"o"}]}"#,
    )
    .unwrap();
    let out = run(&["check-keys", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The first line as before, then the summary.
    assert_eq!(stdout(&out).lines().next(), Some("ok: 1 keys (version v9)"));
    assert!(
        stdout(&out).contains("summary: 1 active"),
        "{}",
        stdout(&out)
    );

    fs::write(&f, r#"{"keys":[{"id":"a","hash":"abc","owner":"o"}]}"#).unwrap();
    let out = run(&["check-keys", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("keys[0].hash"), "{}", stderr(&out));

    let out = run_stdin(&["check-keys", "-"], br#"{"keys":[]}"#);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("ok: 0 keys (version none)\n"));
}

#[test]
fn help_version_and_usage_errors() {
    for args in [&["help"][..], &["--help"], &["-h"]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(stdout(&out).contains("keygate new --list FILE"), "{args:?}");
    }
    // Each subcommand has its own help (clap), with its usage and the exit statuses.
    for cmd in [
        "new",
        "hash",
        "test",
        "check-config",
        "check-keys",
        "diff",
        "serve",
        "completions",
    ] {
        for args in [&[cmd, "--help"][..], &["help", cmd]] {
            let out = run(args);
            assert_eq!(out.status.code(), Some(0), "{args:?}");
            let text = stdout(&out);
            assert!(
                text.contains(&format!("Usage: keygate {cmd}")),
                "{args:?}: {text}"
            );
            assert!(text.contains("Exit status:"), "{args:?}: {text}");
            assert!(text.contains("--json"), "{args:?}: {text}");
        }
    }
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        format!("keygate {}\n", env!("CARGO_PKG_VERSION"))
    );
    for args in [
        &[][..],
        &["frobnicate"],
        &["serve", "f.json"],
        &["check-keys"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains("Usage:"), "{args:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// serve
// ---------------------------------------------------------------------------------------------

/// The server process, killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(file: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg(file)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("keygate serve: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = err.read_to_end(&mut sink);
    });
    Server { child, addr }
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn connect(addr: &str) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

/// Sends `raw` and reads one response (its body by Content-Length, none for HEAD/304).
fn exchange(conn: &mut BufReader<TcpStream>, raw: &str, head: bool) -> Resp {
    conn.get_mut().write_all(raw.as_bytes()).unwrap();
    read_response(conn, head)
}

fn read_response(conn: &mut BufReader<TcpStream>, head: bool) -> Resp {
    let mut line = String::new();
    conn.read_line(&mut line).unwrap();
    let status: u16 = line
        .split(' ')
        .nth(1)
        .unwrap_or_else(|| panic!("bad status line {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        conn.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.to_string(), v.trim().to_string()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if !head && status != 304 {
        let n: usize = resp.header("content-length").unwrap().parse().unwrap();
        resp.body = vec![0; n];
        conn.read_exact(&mut resp.body).unwrap();
    }
    resp
}

fn get(addr: &str, path: &str, extra: &str) -> Resp {
    let mut c = connect(addr);
    exchange(
        &mut c,
        &format!("GET {path} HTTP/1.1\r\nHost: keys\r\n{extra}Connection: close\r\n\r\n"),
        false,
    )
}

fn etag_of(body: &[u8]) -> String {
    format!("\"{}\"", sha256_hex(body))
}

/// Replaces `file` by rename, as `keygate new` does.
fn replace(file: &Path, data: &[u8]) {
    let tmp = file.with_extension("tmp");
    fs::write(&tmp, data).unwrap();
    fs::rename(&tmp, file).unwrap();
}

#[test]
fn serve_etags_304_changes_and_404() {
    let dir = TempDir::new("serve");
    let file = dir.path("keys.json");
    let v1 = br#"{"version":"v1","keys":[]}"#;
    fs::write(&file, v1).unwrap();
    let srv = serve(&file, &[]);

    let r = get(&srv.addr, "/v1/keys", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v1);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let etag1 = etag_of(v1);
    assert_eq!(r.header("etag"), Some(etag1.as_str()));

    // Conditional requests: exact, in a list, weak form, `*`; a stale tag gets the body.
    for inm in [
        etag1.clone(),
        format!("\"nope\", {etag1}"),
        format!("W/{etag1}"),
        "*".to_string(),
    ] {
        let r = get(&srv.addr, "/v1/keys", &format!("If-None-Match: {inm}\r\n"));
        assert_eq!(r.status, 304, "{inm}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(etag1.as_str()));
    }
    let r = get(&srv.addr, "/v1/keys", "If-None-Match: \"other\"\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v1);

    // Query strings don't matter; other paths are 404; /healthz is 200.
    assert_eq!(get(&srv.addr, "/v1/keys?x=1", "").status, 200);
    assert_eq!(get(&srv.addr, "/v1/keys/extra", "").status, 404);
    assert_eq!(get(&srv.addr, "/", "").status, 404);
    assert_eq!(get(&srv.addr, "/healthz", "").status, 200);

    // Replaced by rename: new body, new ETag; the old ETag no longer matches.
    let v2 = br#"{"version":"v2","keys":[{"id":"a","hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","owner":"o"}]}"#;
    replace(&file, v2);
    let r = get(
        &srv.addr,
        "/v1/keys",
        &format!("If-None-Match: {etag1}\r\n"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v2);
    let etag2 = etag_of(v2);
    assert_eq!(r.header("etag"), Some(etag2.as_str()));

    // Rewritten in place with the same size, immediately: still seen.
    let v3 = br#"{"version":"v3","keys":[{"id":"b","hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","owner":"o"}]}"#;
    assert_eq!(v2.len(), v3.len());
    fs::write(&file, v3).unwrap();
    let r = get(
        &srv.addr,
        "/v1/keys",
        &format!("If-None-Match: {etag2}\r\n"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v3);
    assert_eq!(r.header("etag"), Some(etag_of(v3).as_str()));

    assert!(
        String::from_utf8_lossy(&get(&srv.addr, "/healthz", "").body).starts_with("ok: 1 keys")
    );

    // An invalid list is not served: the last valid one stays, and /healthz says so.
    replace(&file, b"{broken");
    let r = get(&srv.addr, "/v1/keys", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v3);
    assert_eq!(r.header("etag"), Some(etag_of(v3).as_str()));
    let h = get(&srv.addr, "/healthz", "");
    assert_eq!(h.status, 200);
    let text = String::from_utf8_lossy(&h.body).to_string();
    assert!(
        text.starts_with("degraded: ") && text.contains("not a valid key list"),
        "{text}"
    );

    // So does a missing file; serving the file resumes when it is back.
    fs::remove_file(&file).unwrap();
    assert_eq!(get(&srv.addr, "/v1/keys", "").body, v3);
    assert!(
        String::from_utf8_lossy(&get(&srv.addr, "/healthz", "").body).starts_with("degraded: ")
    );
    replace(&file, v1);
    let r = get(&srv.addr, "/v1/keys", "");
    assert_eq!((r.status, r.body.as_slice()), (200, &v1[..]));
    assert_eq!(get(&srv.addr, "/healthz", "").status, 200);
}

#[test]
fn serve_without_a_valid_list_answers_503_and_healthz_fails() {
    let dir = TempDir::new("serve-invalid");
    let file = dir.path("keys.json");
    fs::write(&file, b"{\"keys\": 3}").unwrap();
    let srv = serve(&file, &[]);
    assert_eq!(get(&srv.addr, "/v1/keys", "").status, 503);
    let h = get(&srv.addr, "/healthz", "");
    assert_eq!(h.status, 503);
    assert!(String::from_utf8_lossy(&h.body).contains("no valid key list"));
    // Becomes valid: served, healthy.
    replace(&file, br#"{"keys":[]}"#);
    assert_eq!(get(&srv.addr, "/v1/keys", "").status, 200);
    assert_eq!(get(&srv.addr, "/healthz", "").status, 200);
}

#[test]
fn serve_keep_alive_head_methods_and_bad_requests() {
    let dir = TempDir::new("serve2");
    let file = dir.path("keys.json");
    let v1 = br#"{"keys":[]}"#;
    fs::write(&file, v1).unwrap();
    let srv = serve(&file, &["--path", "/keys.json"]);
    let etag = etag_of(v1);

    // Several requests on one keep-alive connection, including pipelined ones.
    let mut c = connect(&srv.addr);
    let r = exchange(&mut c, "GET /keys.json HTTP/1.1\r\nHost: k\r\n\r\n", false);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v1);
    assert_eq!(r.header("connection"), Some("keep-alive"));
    let r = exchange(
        &mut c,
        &format!("GET /keys.json HTTP/1.1\r\nHost: k\r\nIf-None-Match: {etag}\r\n\r\n"),
        false,
    );
    assert_eq!(r.status, 304);
    let r = exchange(&mut c, "HEAD /keys.json HTTP/1.1\r\nHost: k\r\n\r\n", true);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(v1.len().to_string().as_str())
    );
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    c.get_mut()
        .write_all(
            b"GET /v1/keys HTTP/1.1\r\n\r\nGET /keys.json HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    assert_eq!(read_response(&mut c, false).status, 404); // the default path is not served
    let r = read_response(&mut c, false);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "connection closed after Connection: close");

    // HTTP/1.0 without keep-alive closes.
    let mut c = connect(&srv.addr);
    let r = exchange(&mut c, "GET /keys.json HTTP/1.0\r\n\r\n", false);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));

    // Other methods.
    let r = get(&srv.addr, "/keys.json", "");
    assert_eq!(r.status, 200);
    let mut c = connect(&srv.addr);
    let r = exchange(
        &mut c,
        "DELETE /keys.json HTTP/1.1\r\nConnection: close\r\n\r\n",
        false,
    );
    assert_eq!(r.status, 405);

    // Garbage and oversized heads get an error and a closed connection, never a crash.
    let mut c = connect(&srv.addr);
    let r = exchange(&mut c, "this is not http\r\n\r\n", false);
    assert_eq!(r.status, 400);
    let mut c = connect(&srv.addr);
    let big = format!(
        "GET /keys.json HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = c.get_mut().write_all(big.as_bytes());
    assert_eq!(read_response(&mut c, false).status, 431);
    let mut c = connect(&srv.addr);
    c.get_mut().write_all(b"\xff\xfe\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut c, false).status, 400);
    // A client that goes away mid-request is fine too.
    let mut c = connect(&srv.addr);
    c.get_mut().write_all(b"GET /keys.js").unwrap();
    drop(c);

    // Still serving.
    assert_eq!(get(&srv.addr, "/keys.json", "").status, 200);
}

#[test]
fn serve_with_a_bearer_token() {
    let dir = TempDir::new("serve3");
    let file = dir.path("keys.json");
    fs::write(&file, br#"{"keys":[]}"#).unwrap();
    let token = dir.path("token");
    fs::write(&token, "s3cret-token\n").unwrap();
    let srv = serve(&file, &["--bearer-file", token.to_str().unwrap()]);
    assert_eq!(get(&srv.addr, "/v1/keys", "").status, 401);
    assert_eq!(
        get(&srv.addr, "/v1/keys", "Authorization: Bearer wrong\r\n").status,
        401
    );
    assert_eq!(
        get(
            &srv.addr,
            "/v1/keys",
            "Authorization: Bearer s3cret-token\r\n"
        )
        .status,
        200
    );
    assert_eq!(get(&srv.addr, "/healthz", "").status, 200);
}

#[test]
fn serve_refuses_bad_arguments() {
    let out = run(&["serve", "keys.json"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&[
        "serve",
        "keys.json",
        "--listen",
        "127.0.0.1:0",
        "--path",
        "v1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["serve", "keys.json", "--listen", "not an address"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn concurrent_new_runs_lose_no_key() {
    let dir = TempDir::new("concurrent");
    let list = dir.path("keys.json");
    let children: Vec<(String, Child)> = (0..8)
        .map(|i| {
            let id = format!("key_{i}");
            let child = Command::new(BIN)
                .args(["new", "--list", list.to_str().unwrap(), "--id", &id])
                .args(["--owner", "o"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (id, child)
        })
        .collect();
    let mut keys = Vec::new();
    for (id, child) in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{id}: {}", stderr(&out));
        keys.push((id, stdout(&out).trim().to_string()));
    }
    let d = doc(&list);
    let stored = d["keys"].as_array().unwrap();
    assert_eq!(stored.len(), 8);
    for (id, key) in keys {
        let rec = stored.iter().find(|k| k["id"] == id.as_str()).unwrap();
        assert_eq!(rec["hash"], sha256_hex(key.as_bytes()));
    }
    assert_eq!(dir.entries(), vec!["keys.json".to_string()]);
}

#[test]
fn new_and_check_keys_keep_owner_limits() {
    let dir = TempDir::new("owners");
    let f = dir.path("keys.json");
    fs::write(
        &f,
        r#"{"owners":{"org-7":{"status":"active","rate_limits":[{"limit":100,"window_s":60}]}},"keys":[]}"#,
    )
    .unwrap();
    for id in ["k1", "k2"] {
        let out = run(&[
            "new",
            "--list",
            f.to_str().unwrap(),
            "--id",
            id,
            "--owner",
            "org-7",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(&f).unwrap()).unwrap();
    assert_eq!(
        doc["owners"]["org-7"]["rate_limits"],
        serde_json::json!([{"limit": 100, "window_s": 60}])
    );
    let out = run(&["check-keys", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("ok: 2 keys"));

    fs::write(
        &f,
        r#"{"owners":{"org-7":{"rate_limits":[{"limit":1,"window_s":0}]}},"keys":[]}"#,
    )
    .unwrap();
    let out = run(&["check-keys", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("owners.org-7.rate_limits[0].window_s"),
        "{}",
        stderr(&out)
    );
    let out = run(&[
        "new",
        "--list",
        f.to_str().unwrap(),
        "--id",
        "k3",
        "--owner",
        "org-7",
    ]);
    assert_eq!(out.status.code(), Some(1));
}
