//! `keygate new`: generate a key, append its record (hash only) to the key-list file atomically,
//! print the key once.

use crate::args::Args;
use crate::json::Json;
use crate::{sha256_hex, Failure};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const OPTIONS: &[&str] = &[
    "--list",
    "--id",
    "--owner",
    "--prefix",
    "--bytes",
    "--encoding",
    "--plan",
    "--expires",
    "--scope",
    "--site",
    "--allow-ip",
    "--limit",
    "--status",
];

pub const DEFAULT_PREFIX: &str = "kg_";
pub const DEFAULT_BYTES: usize = 24;
pub const MIN_BYTES: usize = 16;
pub const MAX_BYTES: usize = 256;
pub const MAX_PREFIX: usize = 64;
const STATUSES: &[&str] = &["active", "disabled", "revoked", "deleted"];
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub fn run(a: &Args) -> Result<(), Failure> {
    if let Some(extra) = a.positional.first() {
        return Err(Failure::Usage(format!("unexpected argument {extra:?}")));
    }
    let list = PathBuf::from(a.required("--list").map_err(Failure::Usage)?);
    let id = a.required("--id").map_err(Failure::Usage)?;
    let owner = a.required("--owner").map_err(Failure::Usage)?;
    let prefix = a
        .one("--prefix")
        .map_err(Failure::Usage)?
        .unwrap_or(DEFAULT_PREFIX);
    let bytes = match a.one("--bytes").map_err(Failure::Usage)? {
        None => DEFAULT_BYTES,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (MIN_BYTES..=MAX_BYTES).contains(n))
            .ok_or_else(|| {
                Failure::Usage(format!(
                    "--bytes: {s:?} is not a number in {MIN_BYTES}..={MAX_BYTES}"
                ))
            })?,
    };
    let hex = match a.one("--encoding").map_err(Failure::Usage)? {
        None | Some("base62") => false,
        Some("hex") => true,
        Some(other) => {
            return Err(Failure::Usage(format!(
                "--encoding: {other:?} is not base62 or hex"
            )))
        }
    };
    let plan = a.one("--plan").map_err(Failure::Usage)?;
    let expires = a.one("--expires").map_err(Failure::Usage)?;
    let status = a.one("--status").map_err(Failure::Usage)?;
    let scopes = a.all("--scope");
    let sites = a.all("--site");
    let allow_ips = a.all("--allow-ip");
    let limits = a.all("--limit");

    // Field checks with option-named messages; the document as a whole is validated below.
    if !keygate_core::keylist::valid_name(id) {
        return Err(Failure::Error(format!(
            "--id: {id:?} is not 1-256 visible ASCII characters"
        )));
    }
    if !keygate_core::keylist::valid_name(owner) {
        return Err(Failure::Error(format!(
            "--owner: {owner:?} is not 1-256 visible ASCII characters"
        )));
    }
    if prefix.len() > MAX_PREFIX
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(Failure::Error(format!(
            "--prefix: {prefix:?} must be at most {MAX_PREFIX} letters, digits, '_', '-' or '.'"
        )));
    }
    if let Some(s) = status {
        if !STATUSES.contains(&s) {
            return Err(Failure::Error(format!(
                "--status: {s:?} is not one of {}",
                STATUSES.join(", ")
            )));
        }
    }
    let now = unix_now();
    let expires_json = match expires {
        None => None,
        Some(s) => {
            let (json, at) = parse_expiry(s).ok_or_else(|| {
                Failure::Error(format!(
                    "--expires: {s:?} is not RFC 3339 (e.g. 2027-01-01T00:00:00Z) or Unix seconds"
                ))
            })?;
            if at <= now {
                eprintln!("keygate new: warning: --expires {s} is in the past; the key will be refused as expired_key");
            }
            Some(json)
        }
    };
    let mut limit_json = Vec::new();
    for l in &limits {
        let (limit, window_s) = parse_limit(l).ok_or_else(|| {
            Failure::Error(format!(
                "--limit: {l:?} is not LIMIT/WINDOW (e.g. 60/60, 1000/1h; window units s, m, h, d)"
            ))
        })?;
        limit_json.push(Json::Object(vec![
            ("limit".into(), Json::Number(limit.into())),
            ("window_s".into(), Json::Number(window_s.into())),
        ]));
    }

    let _lock = Lock::acquire(&list)?;
    let mut doc = read_document(&list)?;
    if !matches!(doc, Json::Object(_)) {
        return Err(Failure::Error(format!(
            "{}: the key list is not a JSON object",
            list.display()
        )));
    }
    let n_keys = match doc.get("keys") {
        None => 0,
        Some(Json::Array(keys)) => {
            if keys
                .iter()
                .any(|k| k.get("id").and_then(Json::as_str) == Some(id))
            {
                return Err(Failure::Error(format!(
                    "{}: a key with id {id:?} already exists",
                    list.display()
                )));
            }
            keys.len()
        }
        Some(_) => {
            return Err(Failure::Error(format!(
                "{}: \"keys\" is not an array",
                list.display()
            )))
        }
    };
    if let Some(Json::Object(owners)) = doc.get("owners") {
        let active = owners
            .iter()
            .find(|(k, _)| k == owner)
            .is_some_and(|(_, v)| v.get("status").is_none_or(|s| s.as_str() == Some("active")));
        if !active {
            eprintln!("keygate new: warning: owner {owner:?} is missing from \"owners\" or not active there; the key will be refused as invalid_key until it is");
        }
    }
    if let Some(s) = status.filter(|s| *s != "active") {
        eprintln!("keygate new: warning: the key is created with status {s:?}; it will be refused as expired_key until it is active");
    }

    let key = generate_key(prefix, bytes, hex)?;
    let mut record = vec![
        ("id".to_string(), Json::str(id)),
        ("hash".into(), Json::String(sha256_hex(key.as_bytes()))),
        ("owner".into(), Json::str(owner)),
    ];
    if let Some(s) = status {
        record.push(("status".into(), Json::str(s)));
    }
    if let Some(e) = expires_json {
        record.push(("expires_at".into(), e));
    }
    if !allow_ips.is_empty() {
        record.push(("allowed_ips".into(), Json::strings(&allow_ips)));
    }
    if !sites.is_empty() {
        record.push(("sites".into(), Json::strings(&sites)));
    }
    if !scopes.is_empty() {
        record.push(("scopes".into(), Json::strings(&scopes)));
    }
    if let Some(p) = plan {
        record.push(("plan".into(), Json::str(p)));
    }
    if !limit_json.is_empty() {
        record.push(("rate_limits".into(), Json::Array(limit_json)));
    }

    let version = Json::String(format!(
        "{}#{}",
        keygate_core::time::format_rfc3339(now),
        n_keys + 1
    ));
    match doc.get_mut("version") {
        Some(v) => *v = version,
        None => {
            if let Json::Object(m) = &mut doc {
                m.insert(0, ("version".into(), version));
            }
        }
    }
    match doc.get_mut("keys") {
        Some(Json::Array(keys)) => keys.push(Json::Object(record)),
        _ => {
            if let Json::Object(m) = &mut doc {
                m.push(("keys".into(), Json::Array(vec![Json::Object(record)])));
            }
        }
    }

    let mut out = serde_json::to_vec_pretty(&doc)
        .map_err(|e| Failure::Error(format!("serializing the key list: {e}")))?;
    out.push(b'\n');
    keygate_core::keylist::parse(&out).map_err(|e| {
        Failure::Error(format!(
            "{}: refusing to write an invalid key list (nothing written): {e}",
            list.display()
        ))
    })?;
    write_atomically(&list, &out)
        .map_err(|e| Failure::Error(format!("writing {}: {e}", list.display())))?;

    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{key}")
        .and_then(|_| stdout.flush())
        .map_err(|e| {
            Failure::Error(format!(
                "key {id:?} was added to {} but could not be printed ({e}); revoke it",
                list.display()
            ))
        })
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `--expires`: integer Unix seconds (stored as a number) or RFC 3339 (stored as written).
fn parse_expiry(s: &str) -> Option<(Json, i64)> {
    if let Ok(n) = s.parse::<i64>() {
        return Some((Json::Number(n.into()), n));
    }
    keygate_core::time::parse_rfc3339(s).map(|t| (Json::str(s), t))
}

/// `LIMIT/WINDOW`, the window in seconds or with a unit suffix (s, m, h, d).
pub fn parse_limit(s: &str) -> Option<(u64, u64)> {
    let (l, w) = s.split_once('/')?;
    let limit: u64 = l.trim().parse().ok()?;
    let w = w.trim();
    let (digits, mult) = match w.as_bytes().last()? {
        b's' => (&w[..w.len() - 1], 1),
        b'm' => (&w[..w.len() - 1], 60),
        b'h' => (&w[..w.len() - 1], 3600),
        b'd' => (&w[..w.len() - 1], 86_400),
        _ => (w, 1),
    };
    let window: u64 = digits.parse::<u64>().ok()?.checked_mul(mult)?;
    let l = keygate_core::config::Limit {
        limit,
        window_s: window,
    };
    l.validate().ok()?;
    Some((limit, window))
}

/// prefix + `bytes` random bytes from the OS CSPRNG, base62-encoded at a fixed width (so every
/// key of a given `--bytes` has the same length and the encoding loses no entropy), or in
/// lowercase hex with `--encoding hex` (for APIs that document hex keys).
fn generate_key(prefix: &str, bytes: usize, hex: bool) -> Result<String, Failure> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf)
        .map_err(|e| Failure::Error(format!("reading the OS random number generator: {e}")))?;
    let body = if hex {
        buf.iter().map(|b| format!("{b:02x}")).collect()
    } else {
        base62_fixed(&buf)
    };
    Ok(format!("{prefix}{body}"))
}

/// Base62 of the big-endian number `bytes`, left-padded with `0` to the width of the largest
/// number of that many bytes.
pub fn base62_fixed(bytes: &[u8]) -> String {
    let width = base62(&vec![0xff; bytes.len()]).len();
    let digits = base62(bytes);
    let mut out = String::with_capacity(width);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(&digits);
    out
}

fn base62(bytes: &[u8]) -> String {
    let mut num = bytes.to_vec();
    let mut out = Vec::new();
    while num.iter().any(|&b| b != 0) {
        let mut rem: u32 = 0;
        for b in num.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 62) as u8;
            rem = cur % 62;
        }
        out.extend(BASE62.get(rem as usize));
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

fn read_document(list: &Path) -> Result<Json, Failure> {
    let text = match fs::read(list) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Json::Object(vec![("keys".into(), Json::Array(vec![]))]))
        }
        Err(e) => return Err(Failure::Error(format!("reading {}: {e}", list.display()))),
    };
    serde_json::from_slice(&text)
        .map_err(|e| Failure::Error(format!("{}: not valid JSON: {e}", list.display())))
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Writes `data` to a temporary file beside `path` (same permissions as the file it replaces),
/// syncs it and renames it over `path`, so readers see the old or the new document, never a mix.
fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = sibling(path, &format!(".tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        if let Ok(meta) = fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    } else if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    result
}

/// `FILE.lock`, created exclusively, so that two `keygate new` on the same list don't lose one
/// another's key. Removed on drop.
struct Lock(PathBuf);

impl Lock {
    fn acquire(list: &Path) -> Result<Lock, Failure> {
        let path = sibling(list, ".lock");
        for _ in 0..100 {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => return Ok(Lock(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => {
                    return Err(Failure::Error(format!(
                        "creating lock file {}: {e}",
                        path.display()
                    )))
                }
            }
        }
        Err(Failure::Error(format!(
            "{} exists: another keygate new is running on this list (remove the file if it is stale)",
            path.display()
        )))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base62_is_fixed_width_and_exact() {
        assert_eq!(base62_fixed(&[0, 0]), "000");
        assert_eq!(base62_fixed(&[0xff, 0xff]), "H31");
        assert_eq!(base62_fixed(&[0, 61]), "00z");
        assert_eq!(base62_fixed(&[0, 62]), "010");
        assert_eq!(base62_fixed(&[0; 24]).len(), 33);
        assert_eq!(base62_fixed(&[0xff; 24]).len(), 33);
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit("60/60"), Some((60, 60)));
        assert_eq!(parse_limit("1000/1h"), Some((1000, 3600)));
        assert_eq!(parse_limit("5/2d"), Some((5, 172_800)));
        assert_eq!(parse_limit("5/10s"), Some((5, 10)));
        assert_eq!(parse_limit("5/0"), None);
        assert_eq!(parse_limit("5"), None);
        assert_eq!(parse_limit("x/5"), None);
        assert_eq!(parse_limit("5/m"), None);
    }
}
