//! `keygate new`: generate a key, append its record (hash only) to the key-list file atomically
//! under an advisory lock, print the key once.

use crate::exit::Failure;
use crate::json::Json;
use crate::{print_json, say, sha256_hex, Output};
use clap::{Args, ValueEnum};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const DEFAULT_PREFIX: &str = "kg_";
pub const DEFAULT_BYTES: usize = 24;
pub const MIN_BYTES: usize = 16;
pub const MAX_BYTES: usize = 256;
pub const MAX_PREFIX: usize = 64;
/// How long `new` waits for another `keygate new` holding the list's lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);
const STATUSES: &[&str] = &["active", "disabled", "revoked", "deleted"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Encoding {
    /// 0-9A-Za-z at a fixed width: 24 bytes give 33 characters.
    Base62,
    /// Lowercase hex: 24 bytes give 48 digits.
    Hex,
}

/// The long help of the subcommand.
pub const NEW_LONG_ABOUT: &str = "\
Generate an API key, append its record (SHA-256 only, never the key) to the key-list FILE
(created as {\"keys\":[]} when missing) and print the key once on stdout (with --json: one
object with id, key, hash, owner and expiry).

The file is rewritten atomically (a temporary file beside it, then rename) under an advisory
lock that the operating system releases when the process ends, so concurrent runs never lose a
key and a killed run leaves no stale lock. Its other members keep their order; the output is
pretty-printed JSON (2-space indent); its \"version\" is set to \"<now, RFC 3339>#<number of
keys>\". The new document is validated like the filter does, and nothing is written if it is
invalid.";

#[derive(Args, Debug)]
pub struct NewArgs {
    /// The key-list file to add the key to.
    #[arg(long, value_name = "FILE")]
    pub list: PathBuf,
    /// The key's id (1-256 visible ASCII characters); default: key_ and 16 random hex digits.
    #[arg(long)]
    pub id: Option<String>,
    /// The key's owner (1-256 visible ASCII characters).
    #[arg(long)]
    pub owner: String,
    /// A name for people (the key's "name" member).
    #[arg(long)]
    pub name: Option<String>,
    /// A description for people (the key's "description" member).
    #[arg(long)]
    pub description: Option<String>,
    /// Key prefix: at most 64 of A-Z a-z 0-9 _ - .
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Random bytes from the OS CSPRNG, 16..=256.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(MIN_BYTES as u64..=MAX_BYTES as u64))]
    pub bytes: usize,
    /// How the random bytes are written after the prefix.
    #[arg(long, value_enum, default_value = "base62")]
    pub encoding: Encoding,
    /// The key's plan (must exist in the document's "plans").
    #[arg(long)]
    pub plan: Option<String>,
    /// Expiry: a duration from now (90d, 12h, 30m, 2w), a date (2027-01-01, midnight UTC),
    /// RFC 3339 (2027-01-01T00:00:00Z, stored as written) or Unix seconds (stored as a number).
    #[arg(long, value_name = "WHEN")]
    pub expires: Option<String>,
    /// A scope granted, e.g. contacts:read or contacts:* (repeatable).
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// A site the key may use (repeatable).
    #[arg(long = "site", value_name = "SITE")]
    pub sites: Vec<String>,
    /// A client address or network allowed (repeatable).
    #[arg(long = "allow-ip", value_name = "CIDR")]
    pub allow_ips: Vec<String>,
    /// Own rate limit LIMIT/WINDOW: LIMIT requests per WINDOW seconds; WINDOW may end in s, m,
    /// h or d, e.g. 60/60, 1000/1h (repeatable).
    #[arg(long = "limit", value_name = "L/W")]
    pub limits: Vec<String>,
    /// active (default), disabled, revoked or deleted.
    #[arg(long)]
    pub status: Option<String>,
    #[command(flatten)]
    pub output: Output,
}

pub fn run(a: &NewArgs) -> Result<(), Failure> {
    let list = &a.list;
    let owner = a.owner.as_str();
    let prefix = a.prefix.as_str();
    let status = a.status.as_deref();
    let generated_id;
    let id = match &a.id {
        Some(id) => id.as_str(),
        None => {
            generated_id = generate_id()?;
            generated_id.as_str()
        }
    };

    // Field checks with option-named messages; the document as a whole is validated below.
    if !keygate_core::keylist::valid_name(id) {
        return Err(Failure::Invalid(format!(
            "--id: {id:?} is not 1-256 visible ASCII characters"
        )));
    }
    if !keygate_core::keylist::valid_name(owner) {
        return Err(Failure::Invalid(format!(
            "--owner: {owner:?} is not 1-256 visible ASCII characters"
        )));
    }
    if prefix.len() > MAX_PREFIX
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(Failure::Invalid(format!(
            "--prefix: {prefix:?} must be at most {MAX_PREFIX} letters, digits, '_', '-' or '.'"
        )));
    }
    if let Some(s) = status {
        if !STATUSES.contains(&s) {
            return Err(Failure::Invalid(format!(
                "--status: {s:?} is not one of {}",
                STATUSES.join(", ")
            )));
        }
    }
    let now = unix_now();
    let expires = match &a.expires {
        None => None,
        Some(s) => {
            let (json, at) = parse_expiry(s, now).ok_or_else(|| {
                Failure::Invalid(format!(
                    "--expires: {s:?} is not a duration (90d, 12h, 30m, 2w), a date (2027-01-01), RFC 3339 (e.g. 2027-01-01T00:00:00Z) or Unix seconds"
                ))
            })?;
            if at <= now {
                eprintln!("keygate new: warning: --expires {s} is in the past; the key will be refused as expired_key");
            }
            Some((json, at))
        }
    };
    let mut limit_json = Vec::new();
    for l in &a.limits {
        let (limit, window_s) = parse_limit(l).ok_or_else(|| {
            Failure::Invalid(format!(
                "--limit: {l:?} is not LIMIT/WINDOW (e.g. 60/60, 1000/1h; window units s, m, h, d)"
            ))
        })?;
        limit_json.push(Json::Object(vec![
            ("limit".into(), Json::Number(limit.into())),
            ("window_s".into(), Json::Number(window_s.into())),
        ]));
    }

    let _lock = lock_list(list)?;
    let mut doc = read_document(list)?;
    if !matches!(doc, Json::Object(_)) {
        return Err(Failure::Invalid(format!(
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
                return Err(Failure::Invalid(format!(
                    "{}: a key with id {id:?} already exists",
                    list.display()
                )));
            }
            keys.len()
        }
        Some(_) => {
            return Err(Failure::Invalid(format!(
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

    let key = generate_key(prefix, a.bytes, a.encoding == Encoding::Hex)?;
    let hash = sha256_hex(key.as_bytes());
    let mut record = vec![
        ("id".to_string(), Json::str(id)),
        ("hash".into(), Json::String(hash.clone())),
        ("owner".into(), Json::str(owner)),
    ];
    if let Some(n) = &a.name {
        record.push(("name".into(), Json::str(n)));
    }
    if let Some(d) = &a.description {
        record.push(("description".into(), Json::str(d)));
    }
    if let Some(s) = status {
        record.push(("status".into(), Json::str(s)));
    }
    if let Some((e, _)) = &expires {
        record.push(("expires_at".into(), e.clone()));
    }
    if !a.allow_ips.is_empty() {
        record.push(("allowed_ips".into(), Json::strings(&a.allow_ips)));
    }
    if !a.sites.is_empty() {
        record.push(("sites".into(), Json::strings(&a.sites)));
    }
    if !a.scopes.is_empty() {
        record.push(("scopes".into(), Json::strings(&a.scopes)));
    }
    if let Some(p) = &a.plan {
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
        Some(v) => *v = version.clone(),
        None => {
            if let Json::Object(m) = &mut doc {
                m.insert(0, ("version".into(), version.clone()));
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

    let out = pretty(&doc)?;
    keygate_core::keylist::parse(&out).map_err(|e| {
        Failure::Invalid(format!(
            "{}: refusing to write an invalid key list (nothing written): {e}",
            list.display()
        ))
    })?;
    write_atomically(list, &out)
        .map_err(|e| Failure::Invalid(format!("writing {}: {e}", list.display())))?;

    let printed = if a.output.json {
        print_json(&serde_json::json!({
            "ok": true,
            "id": id,
            "key": key,
            "hash": hash,
            "owner": owner,
            "expiry": expires.as_ref().map(|(_, at)| keygate_core::time::format_rfc3339(*at)),
            "list": list.display().to_string(),
            "version": version.as_str(),
        }))
    } else {
        say(&format!("{key}\n"))
    };
    printed.map_err(|e| {
        Failure::Invalid(format!(
            "key {id:?} was added to {} but could not be printed ({e:?}); revoke it",
            list.display()
        ))
    })
}

/// The stable pretty form every edited file is written in: 2-space indent, members in their
/// order, a final newline.
pub fn pretty(doc: &Json) -> Result<Vec<u8>, Failure> {
    let mut out = serde_json::to_vec_pretty(doc)
        .map_err(|e| Failure::Invalid(format!("serializing the key list: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

/// A new key id: `key_` and 16 random lowercase hex digits (as the key service makes them).
fn generate_id() -> Result<String, Failure> {
    let mut buf = [0u8; 8];
    getrandom::getrandom(&mut buf)
        .map_err(|e| Failure::Invalid(format!("reading the OS random number generator: {e}")))?;
    Ok(format!(
        "key_{}",
        buf.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// A duration such as `90d`, `12h`, `30m`, `45s`, `2w` (or bare seconds), in seconds.
pub fn parse_duration_s(s: &str) -> Option<i64> {
    let s = s.trim();
    let (digits, mult) = match s.as_bytes().last()? {
        b's' => (s.get(..s.len() - 1)?, 1),
        b'm' => (s.get(..s.len() - 1)?, 60),
        b'h' => (s.get(..s.len() - 1)?, 3600),
        b'd' => (s.get(..s.len() - 1)?, 86_400),
        b'w' => (s.get(..s.len() - 1)?, 7 * 86_400),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i64>().ok()?.checked_mul(mult)
}

/// An instant: Unix seconds, RFC 3339, or a date `YYYY-MM-DD` (midnight UTC), in Unix seconds.
pub fn parse_instant(s: &str) -> Option<i64> {
    if let Ok(n) = s.parse::<i64>() {
        return Some(n);
    }
    if s.len() == 10 {
        return keygate_core::time::parse_rfc3339(&format!("{s}T00:00:00Z"));
    }
    keygate_core::time::parse_rfc3339(s)
}

/// `--expires`: the JSON to store and the instant. Unix seconds are stored as a number, RFC 3339
/// as written, a date or a duration as the RFC 3339 instant it names.
fn parse_expiry(s: &str, now: i64) -> Option<(Json, i64)> {
    if let Ok(n) = s.parse::<i64>() {
        return Some((Json::Number(n.into()), n));
    }
    if let Some(t) = keygate_core::time::parse_rfc3339(s) {
        return Some((Json::str(s), t));
    }
    let at = match parse_instant(s) {
        Some(t) => t,
        None => now.checked_add(parse_duration_s(s).filter(|d| *d > 0)?)?,
    };
    Some((Json::String(keygate_core::time::format_rfc3339(at)), at))
}
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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
        .map_err(|e| Failure::Invalid(format!("reading the OS random number generator: {e}")))?;
    let body = if hex {
        buf.iter().map(|b| format!("{b:02x}")).collect()
    } else {
        keygate_keyservice::base62_fixed(&buf)
    };
    Ok(format!("{prefix}{body}"))
}

fn read_document(list: &Path) -> Result<Json, Failure> {
    let text = match fs::read(list) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Json::Object(vec![("keys".into(), Json::Array(vec![]))]))
        }
        Err(e) => {
            return Err(Failure::Unreadable(format!(
                "reading {}: {e}",
                list.display()
            )))
        }
    };
    serde_json::from_slice(&text)
        .map_err(|e| Failure::Invalid(format!("{}: not valid JSON: {e}", list.display())))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Writes `data` to a temporary file beside `path` (same permissions as the file it replaces),
/// syncs it and renames it over `path`, so readers see the old or the new document, never a mix.
pub fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = parent_dir(path);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    if let Ok(meta) = fs::metadata(path) {
        tmp.as_file().set_permissions(meta.permissions())?;
    }
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Whether `file` (open) is still what `path` names: a rename over `path` replaces it.
fn still_at(file: &fs::File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        path.exists()
    }
}

/// Takes `file`'s exclusive advisory lock (flock), waiting up to `LOCK_WAIT`.
fn lock_exclusive(file: &fs::File, what: &Path) -> Result<(), Failure> {
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Failure::Invalid(format!(
                    "{}: another keygate new has held its lock for {} s",
                    what.display(),
                    LOCK_WAIT.as_secs()
                )))
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(Failure::Invalid(format!("locking {}: {e}", what.display())))
            }
        }
    }
}

/// The advisory lock that serialises edits of `list`: the lock of the file itself (checked to
/// still be the file at that path after waiting, since every edit replaces it by rename), or
/// of its directory while the file does not exist yet. The kernel drops it when the process
/// ends, however it ends; nothing is left on disk.
fn lock_list(list: &Path) -> Result<fs::File, Failure> {
    loop {
        match fs::File::open(list) {
            Ok(f) => {
                lock_exclusive(&f, list)?;
                if still_at(&f, list) {
                    return Ok(f);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let dir = parent_dir(list);
                let d = fs::File::open(dir).map_err(|e| {
                    Failure::Unreadable(format!("opening directory {}: {e}", dir.display()))
                })?;
                lock_exclusive(&d, dir)?;
                if !list.exists() {
                    return Ok(d);
                }
            }
            Err(e) => {
                return Err(Failure::Unreadable(format!(
                    "reading {}: {e}",
                    list.display()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base62_is_fixed_width_and_exact() {
        use keygate_keyservice::base62_fixed;
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

    #[test]
    fn expiries() {
        let now = 1_800_000_000;
        assert_eq!(
            parse_expiry("90d", now),
            Some((
                Json::String(keygate_core::time::format_rfc3339(now + 90 * 86_400)),
                now + 90 * 86_400
            ))
        );
        assert_eq!(
            parse_expiry("2w", now).map(|e| e.1),
            Some(now + 14 * 86_400)
        );
        assert_eq!(
            parse_expiry("2027-01-01", now),
            Some((Json::str("2027-01-01T00:00:00Z"), 1_798_761_600))
        );
        assert_eq!(
            parse_expiry("2027-01-01T00:00:00Z", now),
            Some((Json::str("2027-01-01T00:00:00Z"), 1_798_761_600))
        );
        assert_eq!(
            parse_expiry("1900000000", now),
            Some((Json::Number(1_900_000_000.into()), 1_900_000_000))
        );
        for bad in ["soon", "0d", "d", "-5d", "2027-13-01", ""] {
            assert_eq!(parse_expiry(bad, now), None, "{bad}");
        }
    }
}
