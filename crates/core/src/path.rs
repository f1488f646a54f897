//! Request path handling: the canonical form used for every path rule (exempt, routes, site), and
//! query-string access for query credentials.
//!
//! Matching runs on a normalised copy, never on the raw `:path`, so that spellings an upstream
//! treats as the same resource (`/swagger/../admin`, `/%61dmin`, `//admin`, `\admin`) cannot slip
//! past a rule. The raw path is what goes upstream; only credential stripping rewrites it.

/// Splits Envoy's `:path` into path and query at the first `?`. A `#fragment` (clients should
/// not send one, but nothing stops them) is dropped first, so a `?` inside it is not a query.
pub fn split_query(raw: &str) -> (&str, Option<&str>) {
    let without_fragment = match raw.find('#') {
        Some(i) => &raw[..i],
        None => raw,
    };
    match without_fragment.find('?') {
        Some(i) => (&without_fragment[..i], Some(&without_fragment[i + 1..])),
        None => (without_fragment, None),
    }
}

/// Value of an ASCII hex digit.
fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte encoded by the `XX` of a `%XX` escape, from `s`: what follows the `%`, if well formed.
fn escape_at(s: &[u8]) -> Option<u8> {
    match s {
        [h, l, ..] => Some(hex_val(*h)? << 4 | hex_val(*l)?),
        _ => None,
    }
}

/// The upper-case hex digit of the low four bits of `n`.
fn hex_upper(n: u8) -> u8 {
    match n & 0xF {
        d @ 0..=9 => b'0' + d,
        d => b'A' + (d - 10),
    }
}

/// Bytes that [`normalize`] decodes: the separators the SPEC names (`.`, `/`, `\`) plus every
/// RFC 3986 unreserved character, whose encoded and plain forms are the same URI.
fn decoded_by_normalize(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\')
}

/// Normalises a path (without its query) for matching.
///
/// - `%XX` decodes (once: `%252E` stays `%252E`) when it encodes `.`, `/`, `\` or an RFC 3986
///   unreserved character; every other escape is kept with its hex in upper case, so `%3f` and
///   `%3F` compare equal. A `%` that does not start a valid escape becomes `%25`, so the output
///   never holds a `%` that a second pass could pair with decoded digits (idempotence).
/// - `\` reads as `/`; each segment's path parameters (a literal `;` to the end of the segment)
///   are removed; runs of `/` merge; `.` and `..` segments resolve, never above the root.
/// - The result starts with `/`. A trailing slash is kept, and a final `.` or `..` segment leaves
///   one (`/a/b/..` → `/a/`), as in RFC 3986 dot-segment removal; an empty path becomes `/`.
pub fn normalize(path: &str) -> String {
    let bytes = path.as_bytes();
    // Pass 1: decode, so that encoded separators and dots take part in segment resolution.
    let mut decoded: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some((&b, rest)) = bytes.get(i..).and_then(<[u8]>::split_first) {
        if b == b'%' {
            match escape_at(rest) {
                Some(b'\\') => decoded.push(b'/'),
                Some(d) if decoded_by_normalize(d) => decoded.push(d),
                Some(d) => {
                    decoded.push(b'%');
                    decoded.push(hex_upper(d >> 4));
                    decoded.push(hex_upper(d));
                }
                None => {
                    decoded.extend_from_slice(b"%25");
                    i += 1;
                    continue;
                }
            }
            i += 3;
        } else {
            decoded.push(if b == b'\\' { b'/' } else { b });
            i += 1;
        }
    }

    // Pass 2: resolve segments. Each segment's path parameters go first (SPEC §3: from a
    // literal `;` to the end of the segment, as servlet containers read them, so `/public/..;/x`
    // is `/x`; `%3B` was kept encoded above and is no delimiter). A final `.`/`..` (or an empty
    // last segment) leaves a trailing `/`.
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded.split(|&b| b == b'/') {
        let seg = match seg.iter().position(|&b| b == b';') {
            Some(at) => seg.get(..at).unwrap_or_default(),
            None => seg,
        };
        trailing_slash = true;
        match seg {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            _ => {
                segments.push(seg);
                trailing_slash = false;
            }
        }
    }

    let mut out: Vec<u8> = Vec::with_capacity(decoded.len() + 1);
    for seg in &segments {
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if trailing_slash || segments.is_empty() {
        out.push(b'/');
    }
    // Only ASCII was substituted for ASCII, so the bytes are still UTF-8; the lossy branch is
    // unreachable but keeps this free of panics.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Whole-segment prefix match on normalised paths: `/swagger` matches `/swagger`, `/swagger/`
/// and `/swagger/ui` but not `/swaggerx`. Trailing slashes on the prefix do not matter (`/api/`
/// also matches `/api`), and `/` matches every path.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The `n`th (1-based) non-empty segment of a normalised path: `/api/123/x`, 2 → `123`.
pub fn segment(path: &str, n: usize) -> Option<&str> {
    let skip = n.checked_sub(1)?;
    path.split('/').filter(|s| !s.is_empty()).nth(skip)
}

/// Percent-decodes `input`, optionally reading `+` as space (form encoding). Malformed `%`
/// sequences are kept literally rather than rejected: the caller only compares the result.
fn decode(input: &[u8], plus_as_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while let Some((&b, rest)) = input.get(i..).and_then(<[u8]>::split_first) {
        match b {
            b'%' => {
                if let Some(d) = escape_at(rest) {
                    out.push(d);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_as_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Full percent-decoding (`+` stays `+`); malformed `%` sequences are kept literally.
pub fn percent_decode(input: &[u8]) -> Vec<u8> {
    decode(input, false)
}

/// Splits one `name=value` query parameter; a parameter without `=` has an empty value.
fn split_param(param: &str) -> (&str, &str) {
    match param.find('=') {
        Some(i) => (&param[..i], &param[i + 1..]),
        None => (param, ""),
    }
}

/// Whether a raw parameter's name, decoded as a query string (`%XX`, and `+` is space), equals
/// `name`. Compared as it is decoded: nothing is allocated per parameter.
fn param_named(param: &str, name: &str) -> bool {
    let (raw_name, _) = split_param(param);
    let raw = raw_name.as_bytes();
    let mut want = name.as_bytes().iter();
    let mut i = 0;
    while let Some((&b, rest)) = raw.get(i..).and_then(<[u8]>::split_first) {
        let (decoded, step) = match b {
            b'%' => match escape_at(rest) {
                Some(d) => (d, 3),
                None => (b'%', 1),
            },
            b'+' => (b' ', 1),
            b => (b, 1),
        };
        if want.next() != Some(&decoded) {
            return false;
        }
        i += step;
    }
    want.next().is_none()
}

/// Value of the first query parameter whose decoded name equals `name`, percent-decoded
/// (SPEC §3 step 5: `%XX` escapes only, `+` stays `+`); a parameter without `=` yields an empty
/// value.
pub fn query_param(query: &str, name: &str) -> Option<Vec<u8>> {
    query_param_counted(query, name).map(|(v, _)| v)
}

/// Like [`query_param`], with how many parameters of that name the query holds (a credential
/// given twice is ambiguous, SPEC §3 step 5).
pub fn query_param_counted(query: &str, name: &str) -> Option<(Vec<u8>, usize)> {
    let mut matching = query
        .split('&')
        .filter(|p| !p.is_empty() && param_named(p, name));
    let first = matching.next()?;
    let count = 1 + matching.count();
    Some((percent_decode(split_param(first).1.as_bytes()), count))
}

/// Removes every occurrence of query parameter `name` (compared as [`query_param`] compares,
/// so whatever it could extract is stripped) from a full `:path`. Everything else, including
/// other parameters, their order and a `#fragment`, is kept byte for byte; the `?` goes when no
/// parameter remains. A path without a matching parameter is returned unchanged.
pub fn remove_query_param(raw_path: &str, name: &str) -> String {
    let (before_fragment, fragment) = match raw_path.find('#') {
        Some(i) => raw_path.split_at(i),
        None => (raw_path, ""),
    };
    let Some(q) = before_fragment.find('?') else {
        return raw_path.to_string();
    };
    let (path, query) = (&before_fragment[..q], &before_fragment[q + 1..]);

    let mut removed = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| {
            let hit = !p.is_empty() && param_named(p, name);
            removed |= hit;
            !hit
        })
        .collect();
    if !removed {
        return raw_path.to_string();
    }

    let mut out = String::with_capacity(raw_path.len());
    out.push_str(path);
    if kept.iter().any(|p| !p.is_empty()) {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    out.push_str(fragment);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_query_cases() {
        assert_eq!(split_query("/a/b"), ("/a/b", None));
        assert_eq!(split_query("/a?x=1"), ("/a", Some("x=1")));
        assert_eq!(split_query("/a?x=1?y=2"), ("/a", Some("x=1?y=2")));
        assert_eq!(split_query("/a?"), ("/a", Some("")));
        assert_eq!(split_query("/a?x=1#frag"), ("/a", Some("x=1")));
        assert_eq!(split_query("/a#frag?x=1"), ("/a", None));
        assert_eq!(split_query(""), ("", None));
        assert_eq!(split_query("?q"), ("", Some("q")));
    }

    fn n(p: &str) -> String {
        normalize(p)
    }

    #[test]
    fn normalize_dot_segments() {
        assert_eq!(n("/swagger/../admin"), "/admin");
        assert_eq!(n("/./a/."), "/a/");
        assert_eq!(n("/a/./b"), "/a/b");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/b/../.."), "/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/../../x"), "/x");
        assert_eq!(n("/a/../../../b/c"), "/b/c");
        assert_eq!(n(".."), "/");
        assert_eq!(n("/..."), "/...");
        assert_eq!(n("/a..b/.c/..d"), "/a..b/.c/..d");
    }

    #[test]
    fn normalize_encoded_separators_and_dots() {
        assert_eq!(n("/%2e%2e/x"), "/x");
        assert_eq!(n("/%2E%2E/x"), "/x");
        assert_eq!(n("/swagger/%2e%2e/admin"), "/admin");
        assert_eq!(n("/swagger%2f..%2fadmin"), "/admin");
        assert_eq!(n("/a%2Fb"), "/a/b");
        assert_eq!(n("/a%2fb"), "/a/b");
        assert_eq!(n("/a%5Cb"), "/a/b");
        assert_eq!(n("/a%5c..%5cb"), "/b");
        assert_eq!(n("/.%2e/admin"), "/admin");
    }

    #[test]
    fn normalize_unreserved_escapes() {
        assert_eq!(n("/%73wagger"), "/swagger");
        assert_eq!(n("/%41%7a%30%2D%5F%7E"), "/Az0-_~");
        assert_eq!(n("/%7e"), "/~");
    }

    #[test]
    fn normalize_other_escapes_kept_uppercase() {
        assert_eq!(n("/a%20b"), "/a%20b");
        assert_eq!(n("/a%3fb"), "/a%3Fb");
        assert_eq!(n("/a%3Fb"), "/a%3Fb");
        assert_eq!(n("/%25"), "/%25");
        assert_eq!(n("/%00"), "/%00");
        assert_eq!(n("/%ff"), "/%FF");
    }

    #[test]
    fn normalize_decodes_once() {
        assert_eq!(n("/%252E%252E/admin"), "/%252E%252E/admin");
        assert_eq!(n("/%252e"), "/%252e");
        assert_eq!(n("/%252F"), "/%252F");
    }

    #[test]
    fn normalize_malformed_percent() {
        assert_eq!(n("/%"), "/%25");
        assert_eq!(n("/%2"), "/%252");
        assert_eq!(n("/%zz"), "/%25zz");
        assert_eq!(n("/a%"), "/a%25");
        // A stray `%` followed by an escape decoding to hex digits must not pair up later.
        assert_eq!(n("/%%341"), "/%2541");
        assert_eq!(n(&n("/%%341")), n("/%%341"));
        assert_eq!(n("/%4%31"), "/%2541");
    }

    #[test]
    fn normalize_removes_path_parameters() {
        assert_eq!(n("/public/..;/admin/users"), "/admin/users");
        assert_eq!(n("/public/..;x=1/admin"), "/admin");
        assert_eq!(n("/public;jsessionid=1/x"), "/public/x");
        assert_eq!(n("/admin;/users"), "/admin/users");
        assert_eq!(n("/.;/admin"), "/admin");
        assert_eq!(n("/a;x/b;y;z/c;"), "/a/b/c");
        assert_eq!(n("/;x/admin"), "/admin");
        assert_eq!(n("/a/;x"), "/a/");
        assert_eq!(n("/a/b/..;"), "/a/");
        assert_eq!(n("/a\\..;\\b"), "/b");
        assert_eq!(n("/a%2F..;%2Fb"), "/b");
        // `%3B` is not a delimiter: it stays in the segment.
        assert_eq!(n("/public%3B/../admin"), "/admin");
        assert_eq!(n("/admin%3bx/users"), "/admin%3Bx/users");
        assert_eq!(n("/..%3B/admin"), "/..%3B/admin");
    }

    #[test]
    fn normalize_slashes() {
        assert_eq!(n("//a///b"), "/a/b");
        assert_eq!(n("\\a\\b"), "/a/b");
        assert_eq!(n("/a\\..\\b"), "/b");
        assert_eq!(n("//"), "/");
        assert_eq!(n("/a/"), "/a/");
        assert_eq!(n("/a//"), "/a/");
        assert_eq!(n(""), "/");
        assert_eq!(n("/"), "/");
        assert_eq!(n("a/b"), "/a/b");
        assert_eq!(n("*"), "/*");
    }

    #[test]
    fn normalize_keeps_non_ascii() {
        assert_eq!(n("/café/../é"), "/é");
        assert_eq!(n("/a;b=c"), "/a");
    }

    #[test]
    fn normalize_idempotent_examples() {
        for p in [
            "/swagger/../admin",
            "/%2e%2e/x",
            "/a%2Fb",
            "//a///b",
            "\\a\\b",
            "/./a/.",
            "/%252E",
            "/%%341",
            "/%2%35%32E",
            "/a%3fb/",
            "",
            "%",
        ] {
            let once = n(p);
            assert_eq!(n(&once), once, "input {p:?}");
            assert!(once.starts_with('/'));
        }
    }

    #[test]
    fn prefix_whole_segments() {
        assert!(prefix_matches("/swagger", "/swagger"));
        assert!(prefix_matches("/swagger", "/swagger/"));
        assert!(prefix_matches("/swagger", "/swagger/ui"));
        assert!(!prefix_matches("/swagger", "/swaggerx"));
        assert!(!prefix_matches("/admin", "/adminx"));
        assert!(!prefix_matches("/admin", "/"));
        assert!(!prefix_matches("/admin/x", "/admin"));
        assert!(prefix_matches("/api/", "/api"));
        assert!(prefix_matches("/api/", "/api/"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/apix"));
        assert!(prefix_matches("/", "/"));
        assert!(prefix_matches("/", "/anything/at/all"));
        assert!(prefix_matches("", "/x"));
        assert!(prefix_matches(
            "/public/v1/contacts",
            "/public/v1/contacts/7"
        ));
    }

    #[test]
    fn prefix_after_normalize_blocks_traversal() {
        let p = n("/swagger/../admin");
        assert!(!prefix_matches("/swagger", &p));
        assert!(prefix_matches("/admin", &p));
        assert!(prefix_matches("/swagger", &n("/%73wagger/ui")));
    }

    #[test]
    fn segment_cases() {
        assert_eq!(segment("/api/123/x", 1), Some("api"));
        assert_eq!(segment("/api/123/x", 2), Some("123"));
        assert_eq!(segment("/api/123/x", 3), Some("x"));
        assert_eq!(segment("/api/123/x", 4), None);
        assert_eq!(segment("/api/123/x", 0), None);
        assert_eq!(segment("/", 1), None);
        assert_eq!(segment("/a/", 1), Some("a"));
        assert_eq!(segment("/a/", 2), None);
        assert_eq!(segment("/a", usize::MAX), None);
    }

    #[test]
    fn percent_decode_cases() {
        assert_eq!(percent_decode(b"a%20b"), b"a b");
        assert_eq!(percent_decode(b"a+b"), b"a+b");
        assert_eq!(percent_decode(b"%2B%2b"), b"++");
        assert_eq!(percent_decode(b"%"), b"%");
        assert_eq!(percent_decode(b"%4"), b"%4");
        assert_eq!(percent_decode(b"%zz%41"), b"%zzA");
        assert_eq!(percent_decode(b"%252E"), b"%2E");
        assert_eq!(percent_decode(b"%ff%00"), [0xff, 0x00]);
        assert_eq!(percent_decode(b""), b"");
    }

    #[test]
    fn query_param_cases() {
        assert_eq!(query_param("api_key=abc", "api_key"), Some(b"abc".to_vec()));
        assert_eq!(
            query_param("a=1&api_key=x%2By+z&api_key=second", "api_key"),
            Some(b"x+y+z".to_vec())
        );
        assert_eq!(
            query_param_counted("a=1&api_key=x%2By+z&api_key=second", "api_key"),
            Some((b"x+y+z".to_vec(), 2))
        );
        assert_eq!(
            query_param_counted("api_key=&api%5Fkey=k", "api_key"),
            Some((Vec::new(), 2))
        );
        assert_eq!(
            query_param("api_key=a%20b+c", "api_key"),
            Some(b"a b+c".to_vec())
        );
        assert_eq!(query_param("api+key=1", "api key"), Some(b"1".to_vec()));
        assert_eq!(query_param("api%2key=1", "api%2key"), Some(b"1".to_vec()));
        assert_eq!(query_param("api_ke=1", "api_key"), None);
        assert_eq!(query_param("api%5Fkey=v", "api_key"), Some(b"v".to_vec()));
        assert_eq!(query_param("api_key", "api_key"), Some(Vec::new()));
        assert_eq!(query_param("api_key=", "api_key"), Some(Vec::new()));
        assert_eq!(query_param("api_key=a=b", "api_key"), Some(b"a=b".to_vec()));
        assert_eq!(query_param("x=1&&y=2", "api_key"), None);
        assert_eq!(query_param("", "api_key"), None);
        assert_eq!(query_param("api_keyx=1", "api_key"), None);
        assert_eq!(query_param("my+key=1", "my key"), Some(b"1".to_vec()));
        assert_eq!(query_param("k=%zz", "k"), Some(b"%zz".to_vec()));
    }

    #[test]
    fn remove_query_param_cases() {
        assert_eq!(remove_query_param("/a?api_key=s", "api_key"), "/a");
        assert_eq!(
            remove_query_param("/a?x=1&api_key=s&y=2", "api_key"),
            "/a?x=1&y=2"
        );
        assert_eq!(
            remove_query_param("/a?api_key=1&x=%2f&api%5Fkey=2&api_key", "api_key"),
            "/a?x=%2f"
        );
        assert_eq!(remove_query_param("/a?x=1", "api_key"), "/a?x=1");
        assert_eq!(remove_query_param("/a?", "api_key"), "/a?");
        assert_eq!(remove_query_param("/a", "api_key"), "/a");
        assert_eq!(
            remove_query_param("/a?api_key=s#frag", "api_key"),
            "/a#frag"
        );
        assert_eq!(
            remove_query_param("/a#x?api_key=s", "api_key"),
            "/a#x?api_key=s"
        );
        assert_eq!(remove_query_param("/a?&api_key=s&", "api_key"), "/a");
        assert_eq!(
            remove_query_param("/a?b=+%20&api_key=s&c", "api_key"),
            "/a?b=+%20&c"
        );
        assert_eq!(remove_query_param("/%2e/?api_key=s", "api_key"), "/%2e/");
    }

    #[test]
    fn removal_covers_what_query_param_finds() {
        let raw = "/x?a=1&api+key=one&api%20key=two";
        let (_, q) = split_query(raw);
        assert_eq!(
            query_param(q.unwrap_or(""), "api key"),
            Some(b"one".to_vec())
        );
        let stripped = remove_query_param(raw, "api key");
        assert_eq!(stripped, "/x?a=1");
        assert_eq!(
            query_param(split_query(&stripped).1.unwrap_or(""), "api key"),
            None
        );
    }
}
