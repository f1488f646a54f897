//! A structural scan of the key-list document read in chunks: the elements of the top-level
//! `keys` array are handed over one by one (for serde to parse each), and everything else, the
//! small "head", is kept with `keys` reduced to `[]` so that serde can parse and check it whole.
//!
//! The scanner only tracks strings, escapes and nesting; it validates nothing. Whatever it splits
//! is parsed by serde afterwards, so a malformed document is still rejected: a piece that is not
//! one JSON value fails alone, and a broken skeleton fails in the head.

use std::borrow::Cow;

/// How much of the body is read at once.
pub const CHUNK: usize = 1 << 20;

/// The document's bytes, read by ranges (the host's response buffer, or a slice natively).
pub trait Body {
    /// Up to `max` bytes from `offset`; empty at the end.
    fn read(&mut self, offset: usize, max: usize) -> Cow<'_, [u8]>;
}

impl<F: FnMut(usize, usize) -> Vec<u8>> Body for F {
    fn read(&mut self, offset: usize, max: usize) -> Cow<'_, [u8]> {
        Cow::Owned(self(offset, max))
    }
}

/// A document in memory, handed out `chunk` bytes at a time (tests vary it).
pub struct Slice<'a> {
    pub data: &'a [u8],
    pub chunk: usize,
}

impl Body for Slice<'_> {
    fn read(&mut self, offset: usize, max: usize) -> Cow<'_, [u8]> {
        let start = offset.min(self.data.len());
        let end = start
            .saturating_add(max.min(self.chunk.max(1)))
            .min(self.data.len());
        Cow::Borrowed(self.data.get(start..end).unwrap_or_default())
    }
}

/// Where a byte is in the document: 1-based line, and the bytes before it on its line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// What the scan hands over while it reads.
pub trait Sink {
    /// The `keys` array starts; `head` is everything before it (ending in `"keys":[`).
    fn keys_start(&mut self, head: &[u8]);
    /// One element of `keys`, untrimmed and followed by the `,` or `]` that ended it (so that a
    /// syntax error can be reported as a parse of the whole document would); `at` is where its
    /// first byte is.
    fn element(&mut self, bytes: &[u8], at: Position);
    /// An empty element (`[1,,2]`, `[1,]`) or the end inside `keys` between elements, in order
    /// with the elements: serde never sees those.
    fn syntax_error(&mut self, message: String);
    /// Offered an element that starts with `{` where it lies: `rest` is the rest of the chunk
    /// from its first byte, as far as the chunk is valid UTF-8. A sink that reads it there, in the same pass that finds it, takes
    /// it and says how far it went (up to the `,` or `]` after it, which it must have seen);
    /// otherwise the element is split as usual and handed to [`Sink::element`].
    fn element_in_place(&mut self, _rest: &str) -> Option<Taken> {
        None
    }
}

/// How much of an element a sink took in place (`Sink::element_in_place`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// The bytes taken: the element and the whitespace after it, not its separator.
    pub len: usize,
    /// Newlines in them, and the index after the last one.
    pub lines: usize,
    pub line_start: usize,
}

/// What the scan found besides the elements.
#[derive(Debug, Default)]
pub struct Outline {
    /// The document without the elements of `keys` (empty unless asked for).
    pub head: Vec<u8>,
    /// Where `keys` starts in `head` (exact: nothing before it was left out).
    pub keys_at: Option<Position>,
    /// Top-level member names that came after `keys` (they may change how keys resolve).
    pub names_after_keys: Vec<String>,
    pub elements: usize,
    /// Where the head skips the elements: `(position in the head, position in the document)` of
    /// the byte after each gap, to report the head's errors where they are in the document.
    pub seams: Vec<(Position, Position)>,
}

impl Outline {
    /// The document position of a head position (serde's line and 1-based column).
    pub fn document_position(&self, line: usize, column: usize) -> (usize, usize) {
        match self
            .seams
            .iter()
            .rev()
            .find(|(h, _)| (line, column) > (h.line, h.column))
        {
            None => (line, column),
            Some((h, d)) if h.line == line => (d.line, d.column + (column - h.column)),
            Some((h, d)) => (d.line + (line - h.line), column),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keys {
    Before,
    In,
    After,
}

struct Scanner<'s> {
    sink: &'s mut dyn Sink,
    keep_head: bool,
    out: Outline,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The top-level value is an object (else nothing is streamed).
    object: bool,
    started: bool,
    /// At depth 1: the next string is a member name.
    expect_name: bool,
    name: Option<Vec<u8>>,
    /// The member just named is `keys` and its value has not started.
    keys_named: bool,
    keys: Keys,
    /// An element is open; it started at `elem_from` in this chunk (0 when continued).
    elem_open: bool,
    elem_from: usize,
    elem_at: Position,
    /// The open element was taken in place: only its separator is left.
    elem_taken: bool,
    carry: Vec<u8>,
    after_comma: bool,
    line: usize,
    line_start: usize,
    head_line: usize,
    head_line_start: usize,
}

/// Reads the whole body, `CHUNK` bytes at a time.
pub fn scan(body: &mut dyn Body, keep_head: bool, sink: &mut dyn Sink) -> Outline {
    let mut s = Scanner {
        sink,
        keep_head,
        out: Outline::default(),
        depth: 0,
        in_string: false,
        escaped: false,
        object: false,
        started: false,
        expect_name: false,
        name: None,
        keys_named: false,
        keys: Keys::Before,
        elem_open: false,
        elem_from: 0,
        elem_at: Position::default(),
        elem_taken: false,
        carry: Vec::new(),
        after_comma: false,
        line: 1,
        line_start: 0,
        head_line: 1,
        head_line_start: 0,
    };
    // SPEC §2: a leading byte-order mark is ignored. It is read as three spaces, so that every
    // position reported afterwards is still the document's.
    let bom = starts_with_bom(body);
    let mut offset = 0;
    loop {
        let chunk = body.read(offset, CHUNK);
        if chunk.is_empty() {
            break;
        }
        if bom && offset < crate::json::BOM.len() {
            let mut blanked = chunk.into_owned();
            for b in blanked
                .iter_mut()
                .take(crate::json::BOM.len().saturating_sub(offset))
            {
                *b = b' ';
            }
            s.chunk(&blanked, offset);
            offset += blanked.len();
            continue;
        }
        s.chunk(&chunk, offset);
        offset += chunk.len();
    }
    if s.keys == Keys::In {
        if s.elem_open {
            // A truncated element goes to the head, so that serde reports the EOF in it.
            if s.keep_head {
                let carry = std::mem::take(&mut s.carry);
                let at = s.elem_at;
                s.seam(at);
                s.push_head(&carry);
            }
        } else {
            let what = if s.after_comma { "a value" } else { "a list" };
            let message = format!(
                "invalid JSON: EOF while parsing {what} at line {} column {}",
                s.line,
                offset - s.line_start
            );
            s.sink.syntax_error(message);
        }
    }
    s.out
}

/// Whether the body starts with a UTF-8 byte-order mark (read however small its chunks are).
fn starts_with_bom(body: &mut dyn Body) -> bool {
    let want = crate::json::BOM;
    let mut head = Vec::with_capacity(want.len());
    while head.len() < want.len() {
        let chunk = body.read(head.len(), want.len() - head.len());
        if chunk.is_empty() {
            break;
        }
        head.extend_from_slice(&chunk);
    }
    head.starts_with(want)
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t')
}

impl Scanner<'_> {
    fn push_head(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'\n' {
                self.head_line += 1;
                self.head_line_start = self.out.head.len() + i + 1;
            }
        }
        self.out.head.extend_from_slice(bytes);
    }

    /// The head resumes here at `doc` after a gap.
    fn seam(&mut self, doc: Position) {
        let head = Position {
            line: self.head_line,
            column: self.out.head.len() - self.head_line_start,
        };
        self.out.seams.push((head, doc));
    }

    fn position(&self, abs: usize) -> Position {
        Position {
            line: self.line,
            column: abs - self.line_start,
        }
    }

    fn chunk(&mut self, chunk: &[u8], base: usize) {
        self.elem_from = 0;
        // The chunk as text once, for the elements read in place (an element cut by the chunk's
        // end or holding invalid UTF-8 is then cut short here, declined, and split as usual).
        let text = std::str::from_utf8(chunk).unwrap_or_else(|e| {
            std::str::from_utf8(chunk.get(..e.valid_up_to()).unwrap_or_default())
                .unwrap_or_default()
        });
        let mut i = 0;
        while i < chunk.len() {
            if self.keys == Keys::In && self.depth >= 2 {
                i = self.in_keys(chunk, text, base, i);
            } else {
                if let Some(&b) = chunk.get(i) {
                    self.outside(b, base + i);
                }
                i += 1;
            }
        }
        if self.elem_open {
            self.carry
                .extend_from_slice(chunk.get(self.elem_from..).unwrap_or_default());
        }
    }

    /// Inside the `keys` array: the hot loop over a million elements.
    fn in_keys(&mut self, chunk: &[u8], text: &str, base: usize, mut i: usize) -> usize {
        while i < chunk.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                // Most of the document is string contents: skip to the next byte that matters.
                let Some(n) = chunk
                    .get(i..)
                    .and_then(|rest| rest.iter().position(|c| matches!(c, b'"' | b'\\' | b'\n')))
                else {
                    return chunk.len();
                };
                i += n;
                match chunk.get(i) {
                    Some(b'"') => self.in_string = false,
                    Some(b'\\') => self.escaped = true,
                    _ => {
                        self.line += 1;
                        self.line_start = base + i + 1;
                    }
                }
                i += 1;
                continue;
            }
            let Some(&b) = chunk.get(i) else { break };
            if b == b'\n' {
                self.line += 1;
                self.line_start = base + i + 1;
            }
            if self.depth == 2 && !self.elem_open {
                match b {
                    b',' | b']' | b'}' => {
                        // Nothing since the last separator: an empty element.
                        if b == b',' || self.after_comma {
                            self.empty_element(base + i, b == b',');
                        }
                    }
                    _ if is_space(b) => {}
                    _ => {
                        self.elem_open = true;
                        self.elem_from = i;
                        self.elem_at = self.position(base + i);
                        let taken = if b == b'{' {
                            text.get(i..)
                                .and_then(|rest| self.sink.element_in_place(rest))
                        } else {
                            None
                        };
                        if let Some(t) = taken.filter(|t| t.len > 0) {
                            // Read already: on to its separator (within this chunk).
                            self.elem_taken = true;
                            if t.lines > 0 {
                                self.line += t.lines;
                                self.line_start = base + i + t.line_start;
                            }
                            i += t.len;
                            continue;
                        }
                    }
                }
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 1 {
                        self.end_element(chunk, i);
                        self.keys = Keys::After;
                        self.after_comma = false;
                        if self.keep_head {
                            let at = self.position(base + i);
                            self.seam(at);
                            self.out.head.push(b);
                        }
                        return i + 1;
                    }
                }
                b',' if self.depth == 2 => {
                    self.end_element(chunk, i);
                    self.after_comma = true;
                }
                _ => {}
            }
            i += 1;
        }
        i
    }

    fn end_element(&mut self, chunk: &[u8], end: usize) {
        if !self.elem_open {
            return;
        }
        self.elem_open = false;
        self.out.elements += 1;
        if self.elem_taken {
            self.elem_taken = false;
            return;
        }
        let element = chunk.get(self.elem_from..=end).unwrap_or_default();
        if self.carry.is_empty() {
            self.sink.element(element, self.elem_at);
        } else {
            self.carry.extend_from_slice(element);
            let carry = std::mem::take(&mut self.carry);
            self.sink.element(&carry, self.elem_at);
            self.carry = carry;
            self.carry.clear();
        }
    }

    fn empty_element(&mut self, abs: usize, comma: bool) {
        let p = self.position(abs);
        let what = if comma {
            "expected value"
        } else {
            "trailing comma"
        };
        self.sink.syntax_error(format!(
            "invalid JSON: {what} at line {} column {}",
            p.line,
            p.column + 1
        ));
    }

    /// Any byte outside the elements of `keys`: kept in the head.
    fn outside(&mut self, b: u8, abs: usize) {
        if self.keep_head {
            self.push_head(&[b]);
        }
        if b == b'\n' {
            self.line += 1;
            self.line_start = abs + 1;
        }
        if self.in_string {
            if let Some(name) = self.name.as_mut() {
                name.push(b);
            }
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if let Some(raw) = self.name.take() {
                    self.named(&raw);
                }
            }
            return;
        }
        if is_space(b) {
            return;
        }
        if !self.started {
            self.started = true;
            self.object = b == b'{';
        }
        let member_level = self.depth == 1 && self.object;
        if member_level && self.keys_named && b != b':' {
            self.keys_named = false;
            if b == b'[' && self.keys == Keys::Before {
                self.keys = Keys::In;
                self.depth = 2;
                self.after_comma = false;
                let head_len = self.out.head.len();
                self.out.keys_at = Some(Position {
                    line: self.line,
                    column: abs - self.line_start,
                });
                if self.keep_head {
                    let head = std::mem::take(&mut self.out.head);
                    self.sink
                        .keys_start(head.get(..head_len).unwrap_or_default());
                    self.out.head = head;
                } else {
                    self.sink.keys_start(&[]);
                }
                return;
            }
        }
        match b {
            b'"' => {
                self.in_string = true;
                if member_level && self.expect_name {
                    self.expect_name = false;
                    self.name = Some(vec![b'"']);
                }
            }
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth == 1 {
                    self.expect_name = true;
                }
            }
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b',' if member_level => self.expect_name = true,
            _ => {}
        }
    }

    fn named(&mut self, raw: &[u8]) {
        let Ok(name) = serde_json::from_slice::<Cow<str>>(raw) else {
            return;
        };
        match self.keys {
            Keys::Before => self.keys_named = name == "keys",
            Keys::After => self.out.names_after_keys.push(name.into_owned()),
            Keys::In => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect {
        head_at_start: Option<Vec<u8>>,
        elements: Vec<(String, Position)>,
        error: Option<String>,
    }

    impl Sink for Collect {
        fn keys_start(&mut self, head: &[u8]) {
            self.head_at_start = Some(head.to_vec());
        }
        fn element(&mut self, bytes: &[u8], at: Position) {
            self.elements
                .push((String::from_utf8_lossy(bytes).into_owned(), at));
        }
        fn syntax_error(&mut self, message: String) {
            self.error.get_or_insert(message);
        }
    }

    fn run(doc: &str, chunk: usize) -> (Outline, Collect) {
        let mut c = Collect::default();
        let o = scan(
            &mut Slice {
                data: doc.as_bytes(),
                chunk,
            },
            true,
            &mut c,
        );
        (o, c)
    }

    #[test]
    fn splits_keys_whatever_the_chunks() {
        let doc = "{\"version\":\"v\",\n \"keys\": [ {\"id\":\"a,]}\\\"\"} ,\n[1,{\"x\":[]}], \"s\" ],\"plans\":{\"keys\":[9]}}";
        for chunk in [1, 2, 3, 7, 4096] {
            let (o, c) = run(doc, chunk);
            assert_eq!(
                String::from_utf8(o.head.clone()).unwrap(),
                "{\"version\":\"v\",\n \"keys\": [],\"plans\":{\"keys\":[9]}}",
                "chunk {chunk}"
            );
            assert_eq!(
                c.head_at_start.as_deref(),
                Some(&b"{\"version\":\"v\",\n \"keys\": ["[..])
            );
            let els: Vec<&str> = c
                .elements
                .iter()
                .map(|(s, _)| s[..s.len() - 1].trim())
                .collect();
            assert_eq!(els, ["{\"id\":\"a,]}\\\"\"}", "[1,{\"x\":[]}]", "\"s\""]);
            assert_eq!(
                c.elements[0].1,
                Position {
                    line: 2,
                    column: 11
                }
            );
            assert_eq!(c.elements[1].1, Position { line: 3, column: 0 });
            assert_eq!(o.names_after_keys, ["plans"]);
            assert_eq!(o.keys_at, Some(Position { line: 2, column: 9 }));
            assert!(c.error.is_none());
        }
    }

    #[test]
    fn empty_elements_are_errors() {
        let error = |doc| run(doc, 3).1.error;
        assert!(error(r#"{"keys":[1,]}"#)
            .unwrap()
            .contains("trailing comma"));
        assert!(error(r#"{"keys":[,1]}"#)
            .unwrap()
            .contains("expected value"));
        assert!(error(r#"{"keys":[ ]}"#).is_none());
    }

    #[test]
    fn garbage_never_panics() {
        for doc in [
            "",
            "]]]]",
            "}}{{",
            "\"",
            "{\"keys\":[[[[",
            "{\"keys\"\"keys\":[1]}",
            "[{\"keys\":[1]}]",
        ] {
            for chunk in [1, 5] {
                run(doc, chunk);
            }
        }
    }
}
