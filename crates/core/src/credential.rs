//! Finding the API key in a request (SPEC §3 step 5): the first configured source present,
//! and whether it was given more than once (ambiguous: `invalid_key`, whatever the values).

use crate::config::CredentialSource;
use crate::path;

/// Where the key was found, so it can be stripped before the request goes upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Header(String),
    Query(String),
}

/// The credential of a request (SPEC §3 step 5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// The key (of the first occurrence when ambiguous; never looked up then).
    pub key: Vec<u8>,
    pub location: Location,
    /// Given more than once in its source: the header twice, a header value holding a
    /// comma-separated list (as proxies join repeated headers), or the query parameter twice.
    pub ambiguous: bool,
}

/// `v` without leading and trailing spaces and tabs (HTTP's optional whitespace).
fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The key of a header value under `scheme`: `<scheme> <key>`, scheme case-insensitive.
fn strip_scheme<'a>(value: &'a [u8], scheme: &str) -> Option<&'a [u8]> {
    let value = trim(value);
    let s = scheme.as_bytes();
    let (head, rest) = value.split_at_checked(s.len())?;
    if !head.eq_ignore_ascii_case(s) {
        return None;
    }
    match rest.first() {
        Some(b' ') | Some(b'\t') => Some(trim(rest)),
        _ => None,
    }
}

/// The key a header value holds for a source (empty when it holds none).
fn header_key<'a>(value: &'a [u8], scheme: Option<&str>) -> &'a [u8] {
    match scheme {
        Some(s) => strip_scheme(value, s).unwrap_or_default(),
        None => trim(value),
    }
}

/// The first source present in the request with a non-empty key (SPEC §3 step 5). `headers`
/// are the request's headers (names lowercase, each line as the host gave it); `query` is the
/// raw query string. A source is present when one of its occurrences holds a key; it is then
/// ambiguous when it occurs more than once (whatever the other occurrences hold) or, for a
/// header, when its value holds a comma. Allocates only the key it returns.
pub fn find(
    sources: &[CredentialSource],
    headers: &[(String, Vec<u8>)],
    query: Option<&str>,
) -> Option<Credential> {
    for source in sources {
        match source {
            CredentialSource::Header { name, scheme } => {
                let mut first: Option<&[u8]> = None;
                let mut count = 0usize;
                let mut comma = false;
                for (_, v) in headers.iter().filter(|(k, _)| k == name) {
                    count += 1;
                    comma |= v.contains(&b',');
                    let key = header_key(v, scheme.as_deref());
                    if first.is_none() && !key.is_empty() {
                        first = Some(key);
                    }
                }
                if let Some(key) = first {
                    return Some(Credential {
                        key: key.to_vec(),
                        location: Location::Header(name.clone()),
                        ambiguous: count > 1 || comma,
                    });
                }
            }
            CredentialSource::Query { name } => {
                let Some(q) = query else { continue };
                if let Some((key, count)) = path::query_param_counted(q, name) {
                    if !key.is_empty() {
                        return Some(Credential {
                            key,
                            location: Location::Query(name.clone()),
                            ambiguous: count > 1,
                        });
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<CredentialSource> {
        vec![
            CredentialSource::Header {
                name: "x-api-key".into(),
                scheme: None,
            },
            CredentialSource::Header {
                name: "authorization".into(),
                scheme: Some("Bearer".into()),
            },
            CredentialSource::Query {
                name: "api_key".into(),
            },
        ]
    }

    fn run(headers: &[(&str, &[u8])], query: Option<&str>) -> Option<Credential> {
        let s = sources();
        let headers: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        find(&s, &headers, query)
    }

    #[test]
    fn order_and_scheme() {
        let c = run(
            &[("authorization", b"Bearer abc"), ("x-api-key", b"xyz")],
            None,
        )
        .unwrap();
        assert_eq!(
            (c.key.as_slice(), c.location),
            (&b"xyz"[..], Location::Header("x-api-key".into()))
        );
        let c = run(&[("authorization", b"bEaReR   abc ")], None).unwrap();
        assert_eq!(c.key, b"abc");
        assert_eq!(c.location, Location::Header("authorization".into()));
        assert_eq!(run(&[("authorization", b"Basic abc")], None), None);
        assert_eq!(run(&[("authorization", b"Bearerabc")], None), None);
        assert_eq!(run(&[("authorization", b"Bearer")], None), None);
        assert_eq!(run(&[("authorization", b"Bearer   ")], None), None);
    }

    #[test]
    fn empty_sources_count_as_absent() {
        let c = run(
            &[("x-api-key", b"  "), ("authorization", b"Bearer k2")],
            None,
        )
        .unwrap();
        assert_eq!(c.key, b"k2");
        let c = run(&[("x-api-key", b"")], Some("a=1&api_key=k%2B3")).unwrap();
        assert_eq!(c.key, b"k+3");
        assert_eq!(c.location, Location::Query("api_key".into()));
        assert_eq!(run(&[], Some("api_key=")), None);
        assert_eq!(run(&[], None), None);
    }
}
