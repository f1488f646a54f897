//! Finding the API key in a request (SPEC §3 step 5): the first configured source present.

use crate::config::CredentialSource;
use crate::path;

/// Where the key was found, so it can be stripped before the request goes upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Header(String),
    Query(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub key: Vec<u8>,
    pub location: Location,
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

/// The first source present in the request with a non-empty key. `header` looks a lowercase
/// header name up; `query` is the raw query string.
pub fn find<'h>(
    sources: &[CredentialSource],
    header: impl Fn(&str) -> Option<&'h [u8]>,
    query: Option<&str>,
) -> Option<Credential> {
    for source in sources {
        let found = match source {
            CredentialSource::Header { name, scheme } => header(name).and_then(|v| {
                let key = match scheme {
                    Some(s) => strip_scheme(v, s)?,
                    None => trim(v),
                };
                Some((key.to_vec(), Location::Header(name.clone())))
            }),
            CredentialSource::Query { name } => query
                .and_then(|q| path::query_param(q, name))
                .map(|k| (k, Location::Query(name.clone()))),
        };
        if let Some((key, location)) = found {
            if !key.is_empty() {
                return Some(Credential { key, location });
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
        find(
            &s,
            |n| headers.iter().find(|(k, _)| *k == n).map(|(_, v)| *v),
            query,
        )
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
