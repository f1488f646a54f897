//! The shape nearly every key has, read without serde: an object of the known fields, each once,
//! with plain strings (no escapes), arrays of them, or an unsigned integer `expires_at`. Anything
//! else (escapes, `rate_limits`, unknown fields, nulls, odd numbers, bad syntax) returns `None`
//! and the key goes through serde, which gives every answer and error message; so this path only
//! has to agree with serde on what it accepts. It is most of a million-key list's parse time.

use super::{RawExpiry, RawKey};
use std::borrow::Cow;

struct Cursor<'a> {
    b: &'a [u8],
    /// `b` as text (validated once for many strings, not string by string).
    text: &'a str,
    i: usize,
    /// Newlines passed (only whitespace can hold one), and the index after the last of them.
    lines: usize,
    line_start: usize,
}

impl<'a> Cursor<'a> {
    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            match c {
                b' ' | b'\r' | b'\t' => {}
                b'\n' => {
                    self.lines += 1;
                    self.line_start = self.i + 1;
                }
                _ => return,
            }
            self.i += 1;
        }
    }

    fn next(&mut self) -> Option<u8> {
        let c = *self.b.get(self.i)?;
        self.i += 1;
        Some(c)
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// A string without escapes or control characters, as its raw bytes (UTF-8 unchecked).
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let rest = self.b.get(self.i..)?;
        let len = string_end(rest)?;
        if rest.get(len) != Some(&b'"') {
            return None;
        }
        self.i += len + 1;
        rest.get(..len)
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        let len = self.raw_string()?.len();
        // Between two quotes: character boundaries.
        self.text.get(self.i - 1 - len..self.i - 1)
    }

    /// `[` strings `]`.
    fn strings(&mut self) -> Option<Vec<Cow<'a, str>>> {
        self.eat(b'[')?;
        let mut out = Vec::new();
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
            return Some(out);
        }
        loop {
            self.ws();
            out.push(Cow::Borrowed(self.string()?));
            self.ws();
            match self.next()? {
                b',' => {}
                b']' => return Some(out),
                _ => return None,
            }
        }
    }

    /// An unsigned integer as JSON writes it (no leading zero, no fraction or exponent).
    fn unsigned(&mut self) -> Option<i64> {
        let start = self.i;
        let mut n: i64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
            self.i += 1;
        }
        let digits = self.i - start;
        let leading_zero = digits > 1 && self.b.get(start) == Some(&b'0');
        let continues = matches!(self.peek(), Some(b'.' | b'e' | b'E'));
        (digits > 0 && !leading_zero && !continues).then_some(n)
    }

    /// The key object from here (leading whitespace included, nothing after its `}` read).
    fn key(&mut self) -> Option<RawKey<'a>> {
        let (mut id, mut hash, mut owner, mut status, mut plan) = (None, None, None, None, None);
        let (mut expires_at, mut allowed_ips, mut sites, mut scopes) = (None, None, None, None);
        self.ws();
        self.eat(b'{')?;
        loop {
            self.ws();
            // Names compared as bytes: a name that is not one of these declines anyway.
            let name = self.raw_string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            match name {
                b"id" => text(&mut id, self)?,
                b"hash" => text(&mut hash, self)?,
                b"owner" => text(&mut owner, self)?,
                b"status" => text(&mut status, self)?,
                b"plan" => text(&mut plan, self)?,
                b"expires_at" if expires_at.is_none() => {
                    expires_at = Some(match self.peek()? {
                        b'"' => RawExpiry::Text(Cow::Borrowed(self.string()?)),
                        _ => RawExpiry::Unix(self.unsigned()?),
                    })
                }
                b"allowed_ips" if allowed_ips.is_none() => allowed_ips = Some(self.strings()?),
                b"sites" if sites.is_none() => sites = Some(self.strings()?),
                b"scopes" if scopes.is_none() => scopes = Some(self.strings()?),
                _ => return None,
            }
            self.ws();
            match self.next()? {
                b',' => {}
                b'}' => break,
                _ => return None,
            }
        }
        Some(RawKey {
            id: id?,
            hash: hash?,
            owner: owner?,
            status,
            expires_at,
            allowed_ips: allowed_ips.unwrap_or_default(),
            sites: sites.unwrap_or_default(),
            scopes: scopes.unwrap_or_default(),
            plan,
            rate_limits: None,
        })
    }
}

/// A string field, once (a field given twice is serde's error to report).
fn text<'a>(slot: &mut Option<Cow<'a, str>>, c: &mut Cursor<'a>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(Cow::Borrowed(c.string()?));
    Some(())
}

fn cursor(text: &str) -> Cursor<'_> {
    Cursor {
        b: text.as_bytes(),
        text,
        i: 0,
        lines: 0,
        line_start: 0,
    }
}

/// The key, when it has the common shape; `None` sends it to serde.
pub(super) fn parse(bytes: &[u8]) -> Option<RawKey<'_>> {
    let mut c = cursor(std::str::from_utf8(bytes).ok()?);
    let key = c.key()?;
    c.ws();
    (c.i == bytes.len()).then_some(key)
}

/// The key at the start of `rest` (an element of `keys` and whatever of the chunk follows it, as
/// far as it is valid UTF-8),
/// read where it lies, when it has the common shape and is followed by whitespace and the `,`
/// or `]` that ends it: exactly when [`parse`] would accept the element the scan splits there.
/// With it, the bytes before that separator and the newlines in them (`scan::Taken`).
pub(super) fn parse_in_place(rest: &str) -> Option<(RawKey<'_>, crate::scan::Taken)> {
    let mut c = cursor(rest);
    let key = c.key()?;
    c.ws();
    matches!(c.peek()?, b',' | b']').then_some((
        key,
        crate::scan::Taken {
            len: c.i,
            lines: c.lines,
            line_start: c.line_start,
        },
    ))
}

/// The index of the first byte of `s` that ends a plain JSON string's contents: `"`, `\\` or a
/// control character (below 0x20). Eight bytes at a time (SWAR: a byte-wise comparison done
/// with 64-bit arithmetic, which wasm has natively), then byte by byte within the word that
/// holds one: key ids, hashes and owner names are tens of bytes, and this scan was the parse's
/// largest single cost (about 1,250 of 6,750 instructions per key, byte by byte).
fn string_end(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero ⇔ its bit 7 is set in `(x − ONES) & !x & HIGH` (exact as to
    // whether any byte is; only the first flagged byte's position is exact, hence the byte-wise
    // finish). Bytes below 0x20 likewise with `x − 0x20·ONES`.
    let special = |x: u64| {
        let quote = x ^ (ONES * u64::from(b'"'));
        let backslash = x ^ (ONES * u64::from(b'\\'));
        ((quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (x.wrapping_sub(ONES * 0x20) & !x))
            & HIGH
    };
    let mut start = 0;
    for word in s.chunks_exact(8) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        if special(u64::from_le_bytes(bytes)) != 0 {
            break;
        }
        start += 8;
    }
    let tail = s.get(start..)?;
    tail.iter()
        .position(|c| *c == b'"' || *c == b'\\' || *c < 0x20)
        .map(|p| start + p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    fn string_end_bytewise(s: &[u8]) -> Option<usize> {
        s.iter()
            .position(|c| *c == b'"' || *c == b'\\' || *c < 0x20)
    }

    #[test]
    fn string_end_finds_each_kind_of_byte_at_every_position() {
        // Every special byte (and its neighbours, which are not special) at every offset of
        // strings of every length up to three words, over a plain and a UTF-8 background.
        for background in [b'a', 0xc3, 0x7f, 0xff, b'!', b'#', b'[', b']', 0x20] {
            for len in 0..=24 {
                for at in 0..=len {
                    for special in [b'"', b'\\', 0x00, 0x1f, 0x0a, 0x21, 0x5b, 0x5d, 0x20] {
                        let mut s = vec![background; len];
                        if let Some(b) = s.get_mut(at) {
                            *b = special;
                        }
                        assert_eq!(string_end(&s), string_end_bytewise(&s), "{s:?}");
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn string_end_agrees_with_the_bytewise_scan(
            s in proptest::collection::vec(
                prop_oneof![
                    8 => 0x20u8..=0xff,
                    1 => Just(b'"'),
                    1 => Just(b'\\'),
                    1 => 0u8..0x20,
                ],
                0..64,
            )
        ) {
            prop_assert_eq!(string_end(&s), string_end_bytewise(&s));
        }
    }

    fn fields(k: &RawKey) -> String {
        let exp = match &k.expires_at {
            None => "-".to_string(),
            Some(RawExpiry::Unix(t)) => format!("u{t}"),
            Some(RawExpiry::Text(s)) => format!("t{s}"),
        };
        format!(
            "{}|{}|{}|{:?}|{exp}|{:?}|{:?}|{:?}|{:?}|{}",
            k.id,
            k.hash,
            k.owner,
            k.status,
            k.allowed_ips,
            k.sites,
            k.scopes,
            k.plan,
            k.rate_limits.is_some()
        )
    }

    /// Whatever this path accepts, serde reads the same way.
    fn agrees(doc: &str) -> bool {
        let fast = parse(doc.as_bytes());
        let de = &mut serde_json::Deserializer::from_str(doc);
        let slow = RawKey::deserialize(&mut *de).and_then(|k| de.end().map(|_| k));
        match (fast, slow) {
            (None, _) => false,
            (Some(f), Ok(s)) => {
                assert_eq!(fields(&f), fields(&s), "{doc}");
                true
            }
            (Some(f), Err(e)) => panic!("accepted {doc:?} as {} but serde says {e}", fields(&f)),
        }
    }

    #[test]
    fn the_common_shapes_are_read_as_serde_reads_them() {
        for doc in [
            r#"{"id":"k1","hash":"ab","owner":"o"}"#,
            " \n{ \"id\" : \"k1\" ,\t\"hash\":\"ab\",\r\n\"owner\":\"o\" } \n",
            r#"{"owner":"o","hash":"ab","id":"k1","status":"revoked","plan":"free"}"#,
            r#"{"id":"k","hash":"h","owner":"o","scopes":["a:*","b"],"sites":[],"allowed_ips":[ "10.0.0.0/8" , "::1" ]}"#,
            r#"{"id":"k","hash":"h","owner":"o","expires_at":0}"#,
            r#"{"id":"k","hash":"h","owner":"o","expires_at":1735689600}"#,
            r#"{"id":"k","hash":"h","owner":"o","expires_at":"2025-01-01T00:00:00Z"}"#,
            r#"{"id":"ünï","hash":"h","owner":"o"}"#,
        ] {
            assert!(agrees(doc), "declined {doc}");
        }
    }

    #[test]
    fn everything_else_goes_to_serde() {
        for doc in [
            r#"{"id":"k\"1","hash":"h","owner":"o"}"#,
            r#"{"id":"k","hash":"h","owner":"o","id":"k2"}"#,
            r#"{"id":"k","hash":"h","owner":"o","scopes":["a"],"scopes":[]}"#,
            r#"{"id":"k","hash":"h"}"#,
            r#"{"id":"k","hash":"h","owner":"o","extra":1}"#,
            r#"{"id":"k","hash":"h","owner":"o","status":null}"#,
            r#"{"id":"k","hash":"h","owner":"o","rate_limits":[]}"#,
            r#"{"id":"k","hash":"h","owner":"o","expires_at":-1}"#,
            r#"{"id":"k","hash":"h","owner":"o","expires_at":01}"#,
            r#"{"id":"k","hash":"h","owner":"o","expires_at":1.5}"#,
            r#"{"id":"k","hash":"h","owner":"o","expires_at":1e3}"#,
            r#"{"id":"k","hash":"h","owner":"o","expires_at":99999999999999999999}"#,
            r#"{"id":"k","hash":"h","owner":"o",}"#,
            r#"{"id":"k","hash":"h","owner":"o"} x"#,
            r#"{"id":"k","hash":"h","owner":"o""#,
            r#"{"id":"k","hash":"h","owner":"o","scopes":["a",]}"#,
            r#"{"id":"k","hash":"h","owner":"o","scopes":"a"}"#,
            "{\"id\":\"k\tx\",\"hash\":\"h\",\"owner\":\"o\"}",
            r#"{}"#,
            r#"[]"#,
            "",
        ] {
            assert!(parse(doc.as_bytes()).is_none(), "accepted {doc}");
        }
        let bad_utf8 = b"{\"id\":\"\xff\",\"hash\":\"h\",\"owner\":\"o\"}";
        assert!(parse(bad_utf8).is_none());
    }

    /// One member of a key as a generator may write it: the known fields with good and odd
    /// values, metadata, unknown names, escapes and repeats.
    fn member() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            Just("id"),
            Just("hash"),
            Just("owner"),
            Just("status"),
            Just("plan"),
            Just("expires_at"),
            Just("allowed_ips"),
            Just("sites"),
            Just("scopes"),
            Just("rate_limits"),
            Just("meta"),
            Just("name"),
            Just("created_at"),
            Just("alowed_ips"),
            Just("i\\u0064"),
            Just("Id"),
        ];
        let value = prop_oneof![
            Just(r#""k""#.to_string()),
            Just(r#""a\"b""#.to_string()),
            Just(r#""é""#.to_string()),
            Just("null".to_string()),
            Just("0".to_string()),
            Just("1735689600".to_string()),
            Just("-1".to_string()),
            Just("1.5".to_string()),
            Just("01".to_string()),
            Just("[]".to_string()),
            Just(r#"["10.0.0.0/8"," ::1 "]"#.to_string()),
            Just(r#"["a",]"#.to_string()),
            Just(r#"[{"limit":1,"window_s":1}]"#.to_string()),
            Just(r#"{"x":1,"x":2}"#.to_string()),
            Just(r#"{}"#.to_string()),
            Just(r#""2025-01-01T00:00:00Z""#.to_string()),
            "[a-z0-9:/*.-]{0,8}".prop_map(|s| format!("{s:?}")),
        ];
        (name, value, prop_oneof![Just(""), Just(" "), Just("\n\t")])
            .prop_map(|(n, v, ws)| format!("{ws}\"{n}\"{ws}:{ws}{v}{ws}"))
    }

    proptest! {
        /// The differential property: on generated keys, whatever the fast path accepts serde
        /// accepts with the same fields, and whatever serde rejects the fast path declines.
        #[test]
        fn fast_path_agrees_with_serde_on_generated_keys(
            members in proptest::collection::vec(member(), 0..8),
            base in any::<bool>(),
            tail in prop_oneof![Just(""), Just(" "), Just(" x"), Just(","), Just("}")],
        ) {
            let mut all = if base {
                vec![r#""id":"k1""#.to_string(), r#""hash":"ab""#.to_string(), r#""owner":"o""#.to_string()]
            } else {
                Vec::new()
            };
            all.extend(members);
            let doc = format!("{{{}}}{tail}", all.join(","));
            let fast = parse(doc.as_bytes());
            let de = &mut serde_json::Deserializer::from_str(&doc);
            let slow = RawKey::deserialize(&mut *de).and_then(|k| de.end().map(|_| k));
            match (fast, slow) {
                (None, _) => {}
                (Some(f), Ok(s)) => prop_assert_eq!(fields(&f), fields(&s)),
                (Some(f), Err(e)) => prop_assert!(false, "fast accepted {} as {} but serde says {}", doc, fields(&f), e),
            }
        }
    }

    #[test]
    fn any_cut_or_mangled_byte_is_declined_or_read_as_serde_reads_it() {
        let doc = r#"{"id":"k-1","hash":"9f86","owner":"org","plan":"p","expires_at":1700000000,"scopes":["a","b:*"],"allowed_ips":["10.0.0.1"]}"#;
        assert!(agrees(doc));
        for cut in 0..doc.len() {
            agrees(&doc[..cut]);
        }
        for at in 0..doc.len() {
            for b in [b'"', b',', b'}', b']', b'\\', b' ', b'0', b'x', b':', b'['] {
                let mut m = doc.as_bytes().to_vec();
                m[at] = b;
                if let Ok(s) = std::str::from_utf8(&m) {
                    agrees(s);
                }
            }
        }
    }
}
