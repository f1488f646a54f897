//! Small helpers: clock, CSPRNG, hashing, hex.

use sha2::{Digest, Sha256};
use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix seconds.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Unix seconds as RFC 3339 UTC (`2026-12-31T00:00:00Z`), the form the filter parses.
pub fn rfc3339(unix: i64) -> String {
    keygate_core::time::format_rfc3339(unix)
}

/// The UTC day (`YYYY-MM-DD`) of Unix seconds.
pub fn day(unix: i64) -> String {
    let (y, m, d) = keygate_core::time::civil_from_days(unix.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Decodes lowercase or uppercase hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| {
            let hi = char::from(*p.first()?).to_digit(16)?;
            let lo = char::from(*p.get(1)?).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// `n` bytes from the operating system's CSPRNG.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    getrandom::getrandom(&mut buf)
        .map_err(|e| format!("reading the OS random number generator: {e}"))?;
    Ok(buf)
}

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Base62 of the big-endian number `bytes`, left-padded with `0` to the width of the largest
/// number of that many bytes (the same encoding as `keygate new`).
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
            *b = u8::try_from(cur / 62).unwrap_or(0);
            rem = cur % 62;
        }
        out.push(BASE62.get(rem as usize).copied().unwrap_or(b'0'));
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// A new key: `prefix` followed by `bytes` random bytes in `encoding` (`hex` or base62).
pub fn generate_key(prefix: &str, bytes: usize, hex_encoding: bool) -> Result<String, String> {
    let buf = random_bytes(bytes)?;
    let body = if hex_encoding {
        hex(&buf)
    } else {
        base62_fixed(&buf)
    };
    Ok(format!("{prefix}{body}"))
}

/// A new key id: `key_` and 16 random lowercase hex digits.
pub fn generate_id() -> Result<String, String> {
    Ok(format!("key_{}", hex(&random_bytes(8)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base62_width_is_fixed() {
        assert_eq!(
            base62_fixed(&[0; 24]).len(),
            base62_fixed(&[0xff; 24]).len()
        );
        assert_eq!(base62_fixed(&[0, 61]), "00z");
    }

    #[test]
    fn keys_have_prefix_and_length() {
        let k = generate_key("minds_", 24, true).unwrap();
        assert!(k.starts_with("minds_"));
        assert_eq!(k.len(), 6 + 48);
        assert!(k[6..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let a = generate_key("mn-abc123-", 24, false).unwrap();
        let b = generate_key("mn-abc123-", 24, false).unwrap();
        assert_ne!(a, b);
        assert!(a[10..].bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn days_and_hex() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(86_399 + 86_400 * 365), "1971-01-01");
        assert_eq!(unhex("0aFf"), Some(vec![10, 255]));
        assert_eq!(unhex("0g"), None);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
