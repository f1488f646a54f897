//! Test support: the service started in-process on 127.0.0.1:0 (its own runtime, stopped on
//! drop), a blocking HTTP client, and a real PostgreSQL server in a temporary directory.
#![allow(dead_code)]

pub mod scenarios;

use keygate_keyservice::{start, Running, ServeArgs};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const ADMIN: &str = "admin-token-1";
pub const ADMIN2: &str = "admin-token-2";
pub const READER: &str = "reader-token-1";

/// A running key service.
pub struct Server {
    pub url: String,
    rt: Option<tokio::runtime::Runtime>,
    running: Option<Running>,
    _dir: tempfile::TempDir,
}

pub struct Options {
    pub readers: bool,
    pub retention_s: u64,
    pub purge_interval_s: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            readers: false,
            retention_s: 30 * 86_400,
            purge_interval_s: 60,
        }
    }
}

impl Server {
    pub fn start(database: &str) -> Server {
        Server::start_with(database, Options::default())
    }

    pub fn start_with(database: &str, o: Options) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path().join("admin.tokens");
        std::fs::write(&admin, format!("# admins\n\n{ADMIN}\n  {ADMIN2}  \n")).unwrap();
        let reader = dir.path().join("reader.tokens");
        std::fs::write(&reader, format!("{READER}\n")).unwrap();
        let args = ServeArgs {
            listen: "127.0.0.1:0".into(),
            database: database.into(),
            admin_tokens: Some(admin),
            reader_tokens: o.readers.then_some(reader),
            retention_s: o.retention_s,
            purge_interval_s: o.purge_interval_s,
            poll_ms: 100,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let running = rt.block_on(start(args)).unwrap();
        let url = format!("http://{}", running.addr);
        Server {
            url,
            rt: Some(rt),
            running: Some(running),
            _dir: dir,
        }
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let (Some(rt), Some(r)) = (self.rt.take(), self.running.take()) {
            let _ = rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), r.stop()).await });
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        http(
            "GET",
            &format!("{}{path}", self.url),
            Some(ADMIN),
            None,
            &[],
        )
    }

    pub fn send(&self, method: &str, path: &str, body: &Value) -> Resp {
        http(
            method,
            &format!("{}{path}", self.url),
            Some(ADMIN),
            Some(&body.to_string()),
            &[],
        )
    }

    pub fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Resp {
        http(method, &format!("{}{path}", self.url), token, body, headers)
    }

    /// Creates a key; returns (record, key).
    pub fn create(&self, body: Value) -> (Value, String) {
        let r = self.send("POST", "/v1/admin/keys", &body);
        assert_eq!(r.status, 201, "{}", r.body);
        let v = r.json();
        let key = v["key"].as_str().unwrap().to_string();
        (v, key)
    }

    /// The served document: (ETag, bytes).
    pub fn document(&self) -> (String, Vec<u8>) {
        let r = self.raw("GET", "/v1/keys", Some(READER), None, &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        (r.header("etag").unwrap(), r.bytes)
    }

    /// Waits until the served document satisfies `f`; panics after `within`.
    pub fn wait_document(&self, within: Duration, f: impl Fn(&Value) -> bool) -> (String, Value) {
        let start = Instant::now();
        loop {
            let (etag, body) = self.document();
            let v: Value = serde_json::from_slice(&body).unwrap();
            if f(&v) {
                return (etag, v);
            }
            assert!(
                start.elapsed() < within,
                "document did not change within {within:?}: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub bytes: Vec<u8>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    /// Asserts a SPEC §7 error answer and returns its `field`.
    pub fn error(&self, status: u16, code: &str) -> Option<String> {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{}", self.body);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            self.body
        );
        v["error"]["field"].as_str().map(str::to_string)
    }
}

pub fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Resp {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(300))
        .build();
    let mut req = agent.request(method, url);
    if let Some(t) = token {
        req = req.set("authorization", &format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some(b) => req.set("content-type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string())))
        .collect();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut bytes).unwrap();
    let body = String::from_utf8_lossy(&bytes).into_owned();
    Resp {
        status,
        headers,
        bytes,
        body,
    }
}

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A SQLite database in a fresh temporary directory.
pub fn sqlite() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("keygate.db").display());
    (dir, url)
}

/// A PostgreSQL server on 127.0.0.1, in a temporary directory, stopped on drop.
pub struct Pg {
    pub url: String,
    bin: PathBuf,
    data: PathBuf,
    as_postgres: bool,
    _dir: tempfile::TempDir,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn find_pg_bin() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut v: Vec<PathBuf> = dirs
            .filter_map(|d| d.ok())
            .map(|d| d.path().join("bin"))
            .collect();
        v.sort();
        v.reverse();
        candidates.extend(v);
    }
    candidates.push("/usr/local/bin".into());
    candidates.push("/usr/bin".into());
    candidates
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
}

impl Pg {
    /// Starts a server, or returns None when `KEYGATE_SKIP_PG=1` and PostgreSQL is missing.
    /// Without that variable a missing PostgreSQL fails the test.
    pub fn start() -> Option<Pg> {
        let Some(bin) = find_pg_bin() else {
            if std::env::var("KEYGATE_SKIP_PG").as_deref() == Ok("1") {
                eprintln!("PostgreSQL not found: skipped (KEYGATE_SKIP_PG=1)");
                return None;
            }
            panic!("PostgreSQL (initdb, pg_ctl) not found: install it (apt-get install postgresql) or set KEYGATE_SKIP_PG=1");
        };
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(ok.success(), "chown postgres");
        }
        let data = dir.path().join("data");
        let mut pg = Pg {
            url: String::new(),
            bin,
            data,
            as_postgres,
            _dir: dir,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                path(&pg.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--locale=C",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let port = free_port();
        let sock = pg._dir.path().to_path_buf();
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            sock.display()
        );
        let log = pg._dir.path().join("log");
        pg.run(
            "pg_ctl",
            &[
                "-D",
                path(&pg.data),
                "-o",
                &opts,
                "-l",
                path(&log),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        pg.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        Some(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = c.args(args).current_dir(self._dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A fresh database on this server.
    pub fn database(&self, name: &str) -> String {
        self.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port(),
                "-U",
                "postgres",
                name,
            ],
        );
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port())
    }

    fn port(&self) -> String {
        self.url
            .rsplit(':')
            .next()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string()
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

impl Drop for Pg {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let _ = c
            .args(["-D", path(&self.data), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
