//! A head's fields as they were read off the wire, for both sides of the recorder's own
//! HTTP/1.1 (`h1.rs` for clients, `upstream.rs` for the upstream).
//!
//! Building hyper's `HeaderMap` for every head (a name parsed and hashed, a value checked, per
//! field) cost more than the rest of forwarding a request: the fields are kept instead as the
//! head's bytes and where each field lies in them ([`RawFields`]). They are written on as
//! they are (names in their sender's case), copied for the capture as they are (redacted on the
//! tape writer's thread), and made a `HeaderMap` only when hyper is who takes them: an HTTP/2
//! client's response, a pooled upstream client's request, a connection handed over.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// A head's fields: its bytes, and where each field lies. See the module docs.
pub struct RawFields {
    head: Bytes,
    spans: Vec<Span>,
}

/// Where a field lies in its head.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Span {
    name: u32,
    name_len: u32,
    value: u32,
    value_len: u32,
    /// 1 when the field concerns one connection only (RFC 9110, 7.6.1): not forwarded. A
    /// word, not a `bool`, so that a span is five words with no padding between, which
    /// [`RawFields::same_fields`] compares a span at a time.
    hop: u32,
}

impl Span {
    /// The span of `name` and `value`, slices of a head that starts at address `base`.
    pub fn of(base: *const u8, name: &[u8], value: &[u8], hop: bool) -> Span {
        let at = |s: &[u8]| (s.as_ptr() as usize - base as usize) as u32;
        Span {
            name: at(name),
            name_len: name.len() as u32,
            value: at(value),
            value_len: value.len() as u32,
            hop: u32::from(hop),
        }
    }
}

impl RawFields {
    /// Fields of `head` (spans made with [`Span::of`] against its first byte), in the order
    /// they come in it.
    pub fn new(head: Bytes, spans: Vec<Span>) -> RawFields {
        debug_assert!(spans.windows(2).all(|w| w[0].name < w[1].name));
        RawFields { head, spans }
    }

    fn name(&self, s: &Span) -> &[u8] {
        name_in(&self.head, s)
    }

    fn value(&self, s: &Span) -> &[u8] {
        &self.head[s.value as usize..s.value as usize + s.value_len as usize]
    }

    /// Each field's name and value, in order, hop-by-hop ones included.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.spans.iter().map(|s| (self.name(s), self.value(s)))
    }

    /// The fields that go on to the next hop.
    pub fn forwarded(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.spans
            .iter()
            .filter(|s| s.hop == 0)
            .map(|s| (self.name(s), self.value(s)))
    }

    /// Writes the fields that go on to the next hop, and that `keep` keeps (it sees each
    /// name), as `Name: value` lines. A run of lines written that way already is copied as it
    /// lies in the head, in one piece: a field at a time, a head took some thirty small copies.
    pub fn write_forwarded(&self, out: &mut Vec<u8>, mut keep: impl FnMut(&[u8]) -> bool) {
        let head = &self.head[..];
        // The run of whole lines waiting to be copied: from its first name to past its CRLF.
        let mut run: Option<(usize, usize)> = None;
        for s in self.spans.iter().filter(|s| s.hop == 0) {
            let name = name_in(head, s);
            if !keep(name) {
                continue;
            }
            let (start, colon) = (s.name as usize, (s.name + s.name_len) as usize);
            let end = (s.value + s.value_len) as usize;
            let whole = s.value as usize == colon + 2
                && head.get(colon..colon + 2) == Some(b": ")
                && head.get(end..end + 2) == Some(b"\r\n");
            match run {
                Some((from, to)) if whole && to == start => run = Some((from, end + 2)),
                _ => {
                    if let Some((from, to)) = run.take() {
                        out.extend_from_slice(&head[from..to]);
                    }
                    if whole {
                        run = Some((start, end + 2));
                    } else {
                        push_field(out, name, self.value(s));
                    }
                }
            }
        }
        if let Some((from, to)) = run {
            out.extend_from_slice(&head[from..to]);
        }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// About how many bytes they hold in memory.
    pub fn approx_size(&self) -> usize {
        self.head.len() + self.spans.len() * std::mem::size_of::<Span>()
    }

    /// The same fields in a copy of the head. A head is a slice of its connection's read
    /// buffer: held on by a record in the tape's queue, it would make the connection allocate a
    /// new buffer for its next read.
    pub fn copied(&self) -> RawFields {
        RawFields {
            head: Bytes::copy_from_slice(&self.head),
            spans: self.spans.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Whether `other` holds the same fields as `self`: the same bytes from the first field to
    /// the last, each field in the same place among them. Parsing is a function of those
    /// bytes, so what is worked out from one head's fields holds for the other's. Costs a
    /// comparison of the bytes (a `memcmp`), and less when the lengths or the count differ.
    pub fn same_fields(&self, other: &RawFields) -> bool {
        if self.spans.len() != other.spans.len() {
            return false;
        }
        let (Some(a), Some(b)) = (self.extent(), other.extent()) else {
            return true;
        };
        if a.len() != b.len() {
            return false;
        }
        // Offsets from the extents' starts, compared without a branch per field.
        let (base_a, base_b) = (a.start as u32, b.start as u32);
        let misplaced = (self.spans.iter().zip(&other.spans)).fold(0, |d, (s, t)| {
            d | ((s.name - base_a) ^ (t.name - base_b))
                | (s.name_len ^ t.name_len)
                | ((s.value - base_a) ^ (t.value - base_b))
                | (s.value_len ^ t.value_len)
                | (s.hop ^ t.hop)
        });
        misplaced == 0 && self.head[a] == other.head[b]
    }

    /// Where the fields lie in the head, from the first field's name to the last one's end.
    fn extent(&self) -> Option<std::ops::Range<usize>> {
        let (first, last) = (self.spans.first()?, self.spans.last()?);
        let end = (last.name + last.name_len).max(last.value + last.value_len);
        Some(first.name as usize..end as usize)
    }

    /// The first value of the field `name` (lowercase).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.find(name).map(|s| self.value(s))
    }

    /// The first value of the field `name` (lowercase) among those forwarded.
    pub fn get_forwarded(&self, name: &str) -> Option<&[u8]> {
        self.spans
            .iter()
            .find(|s| s.hop == 0 && self.is(s, name))
            .map(|s| self.value(s))
    }

    /// [`RawFields::get`] as a slice of the head (no copy).
    pub fn get_shared(&self, name: &str) -> Option<Bytes> {
        let s = self.find(name)?;
        let at = s.value as usize;
        Some(self.head.slice(at..at + s.value_len as usize))
    }

    fn find(&self, name: &str) -> Option<&Span> {
        self.spans.iter().find(|s| self.is(s, name))
    }

    fn is(&self, s: &Span, name: &str) -> bool {
        s.name_len as usize == name.len() && token_is(self.name(s), name)
    }

    /// Marks as hop-by-hop the fields `is_hop` says are.
    pub fn mark_hop(&mut self, mut is_hop: impl FnMut(&[u8]) -> bool) {
        for s in &mut self.spans {
            s.hop |= u32::from(is_hop(name_in(&self.head, s)));
        }
    }

    /// Leaves out the fields `keep` refuses.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        let head = &self.head;
        self.spans.retain(|s| keep(name_in(head, s)));
    }

    /// The fields as hyper takes them, hop-by-hop ones included; a field `http` would refuse
    /// is left out (the head parsers accept nothing it would).
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.spans.len());
        for s in &self.spans {
            let name = HeaderName::from_bytes(self.name(s));
            let at = s.value as usize;
            let value =
                HeaderValue::from_maybe_shared(self.head.slice(at..at + s.value_len as usize));
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
        map
    }
}

/// Writes one field as an HTTP/1.1 `Name: value` line.
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    for piece in [name, b": ", value, b"\r\n"] {
        out.extend_from_slice(piece);
    }
}

/// Whether `token`, a field name as httparse read it (RFC 9110 token characters only), is
/// `lower` (lowercase letters, digits and `-`) in any case: eight bytes at a time, each with
/// its 0x20 bit set. That bit is all that tells a letter's cases apart, and among token
/// characters only `-` and the digits match theirs with it set, so the comparison is exact
/// here; `eq_ignore_ascii_case`, which maps byte by byte, cost a tenth of capturing a request
/// for the one `Content-Type` looked up.
fn token_is(token: &[u8], lower: &str) -> bool {
    let lower = lower.as_bytes();
    debug_assert!(lower
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'));
    if token.len() != lower.len() {
        return false;
    }
    let (mut t, mut l) = (token.chunks_exact(8), lower.chunks_exact(8));
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
    (t.by_ref().zip(l.by_ref())).all(|(a, b)| word(a) | 0x2020_2020_2020_2020 == word(b))
        && (t.remainder().iter().zip(l.remainder())).all(|(a, b)| a | 0x20 == *b)
}

/// The name `s` spans in `head`.
fn name_in<'h>(head: &'h [u8], s: &Span) -> &'h [u8] {
    &head[s.name as usize..s.name as usize + s.name_len as usize]
}

/// The fields of a head written out in full (a start line, then `Name: value` lines), as the
/// parsers would find them. For tests.
#[cfg(test)]
pub(crate) fn read_for_tests(head: &[u8]) -> RawFields {
    let head = Bytes::copy_from_slice(head);
    let mut spans = Vec::new();
    let mut at = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("a start line")
        + 2;
    while let Some(len) = head[at..].windows(2).position(|w| w == b"\r\n") {
        let line = &head[at..at + len];
        if line.is_empty() {
            break;
        }
        let colon = line.iter().position(|&b| b == b':').expect("a field");
        let value = line[colon + 1..].trim_ascii();
        spans.push(Span::of(head.as_ptr(), &line[..colon], value, false));
        at += len + 2;
    }
    RawFields::new(head.clone(), spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(head: &'static [u8], fields: &[(&str, &str, bool)]) -> RawFields {
        let head = Bytes::from_static(head);
        let text = std::str::from_utf8(&head).unwrap();
        let spans = fields
            .iter()
            .map(|(n, v, hop)| {
                let n = &head[text.find(n).unwrap()..][..n.len()];
                let v = &head[text.find(v).unwrap()..][..v.len()];
                Span::of(head.as_ptr(), n, v, *hop)
            })
            .collect();
        RawFields::new(head.clone(), spans)
    }

    #[test]
    fn a_token_is_a_lowercase_name_in_any_case_and_nothing_else() {
        for name in ["content-type", "x-forwarded-for", "te", "x-b3-traceid", "a"] {
            let upper = name.to_ascii_uppercase();
            let mixed: String = (name.chars().enumerate())
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            for token in [name, upper.as_str(), mixed.as_str()] {
                assert!(token_is(token.as_bytes(), name), "{token} is {name}");
            }
            // Every other token character, in every place, and one byte more or less.
            let tchars = (0x21u8..0x7f).filter(|b| !b"\"(),/:;<=>?@[\\]{}".contains(b));
            for at in 0..name.len() {
                for c in tchars.clone() {
                    let mut t = name.as_bytes().to_vec();
                    if t[at].eq_ignore_ascii_case(&c) {
                        continue;
                    }
                    t[at] = c;
                    assert!(
                        !token_is(&t, name),
                        "{} is not {name}",
                        String::from_utf8_lossy(&t)
                    );
                }
            }
            assert!(!token_is(&name.as_bytes()[1..], name));
            assert!(!token_is(format!("{name}x").as_bytes(), name));
        }
    }

    #[test]
    fn fields_read_in_any_case_and_hop_by_hop_ones_are_not_forwarded() {
        let mut f = fields(
            b"Host: a\r\nConnection: x-trace\r\nX-Trace: 1\r\nAccept: */*\r\n",
            &[
                ("Host", "a", false),
                ("Connection", "x-trace", true),
                ("X-Trace", "1", false),
                ("Accept", "*/*", false),
            ],
        );
        assert_eq!(f.get("host"), Some(&b"a"[..]));
        assert_eq!(f.get_shared("accept").as_deref(), Some(&b"*/*"[..]));
        assert_eq!(f.get("x-missing"), None);
        f.mark_hop(|n| n.eq_ignore_ascii_case(b"x-trace"));
        assert_eq!(f.get("x-trace"), Some(&b"1"[..]));
        assert_eq!(f.get_forwarded("x-trace"), None);
        let forwarded: Vec<_> = f.forwarded().map(|(n, _)| n.to_vec()).collect();
        assert_eq!(forwarded, [b"Host".to_vec(), b"Accept".to_vec()]);
        assert_eq!(f.iter().count(), 4);
        assert_eq!(f.to_map().len(), 4);
        let copy = f.copied();
        assert_eq!(
            copy.iter().collect::<Vec<_>>(),
            f.iter().collect::<Vec<_>>()
        );
        assert_eq!(copy.get_forwarded("x-trace"), None);
        assert_eq!(copy.approx_size(), f.approx_size());
        f.retain(|n| n != b"Accept");
        assert_eq!(f.len(), 3);
    }

    #[test]
    fn fields_are_written_on_as_lines_whether_copied_in_runs_or_one_by_one() {
        // Lines as a sender writes them, one with its value padded, one without a space after
        // its colon, and hop-by-hop ones: each written `Name: value`, the hop-by-hop one and those left
        // out not at all.
        let head = "GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nX-Pad:   b  \r\nX-Tight:c\r\nConnection: x-t\r\nX-T: 1\r\nUser-Agent: d\r\nX-Skip: e\r\nX-Last: f\r\n\r\n";
        let mut f = read_for_tests(head.as_bytes());
        f.mark_hop(|n| n.eq_ignore_ascii_case(b"connection") || n.eq_ignore_ascii_case(b"x-t"));
        let mut seen = Vec::new();
        let mut out = Vec::new();
        f.write_forwarded(&mut out, |n| {
            seen.push(String::from_utf8_lossy(n).into_owned());
            n != b"X-Skip"
        });
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Host: a\r\nAccept: */*\r\nX-Pad: b\r\nX-Tight: c\r\nUser-Agent: d\r\nX-Last: f\r\n"
        );
        assert_eq!(
            seen,
            [
                "Host",
                "Accept",
                "X-Pad",
                "X-Tight",
                "User-Agent",
                "X-Skip",
                "X-Last"
            ]
        );
        // Whatever the head, the lines are those written a field at a time.
        let mut one_by_one = Vec::new();
        for (n, v) in f.forwarded().filter(|(n, _)| *n != b"X-Skip") {
            one_by_one.extend_from_slice(&[n, b": ", v, b"\r\n"].concat());
        }
        let mut out = Vec::new();
        f.write_forwarded(&mut out, |n| n != b"X-Skip");
        assert_eq!(out, one_by_one);
    }

    #[test]
    fn the_same_fields_are_told_apart_from_fields_that_differ_in_any_way() {
        // Compared either way round, with the same answer.
        fn same(a: &RawFields, b: &RawFields) -> bool {
            let same = a.same_fields(b);
            assert_eq!(same, b.same_fields(a));
            same
        }
        let fields = "Host: registry\r\nAuthorization: Bearer abc\r\nAccept: */*\r\n\r\n";
        let head =
            |start: &str, fields: &str| read_for_tests(format!("{start}{fields}").as_bytes());
        let one = head("GET /v2/ HTTP/1.1\r\n", fields);
        // Elsewhere in another head (a longer start line): the same fields.
        let two = head("GET /v2/org/app/manifests/latest HTTP/1.1\r\n", fields);
        assert_eq!(one.len(), 3);
        assert!(same(&one, &two) && same(&two, &one));
        // One byte of one value.
        let other = head("GET /v2/ HTTP/1.1\r\n", &fields.replace("abc", "abd"));
        assert!(!same(&one, &other));
        // The same bytes, split otherwise: the field's value is longer by what its name lost.
        let split = head(
            "GET /v2/ HTTP/1.1\r\n",
            &fields.replace("Accept: ", "Accept:  "),
        );
        assert!(!same(&one, &split));
        // The same bytes, a field left out, or one marked hop-by-hop.
        let mut fewer = head("GET /v2/ HTTP/1.1\r\n", fields);
        fewer.retain(|n| n != b"Accept");
        assert!(!same(&one, &fewer));
        let mut middle = head("GET /v2/ HTTP/1.1\r\n", fields);
        middle.retain(|n| n != b"Authorization");
        assert!(!same(&one, &middle) && !same(&fewer, &middle));
        let mut hop = head("GET /v2/ HTTP/1.1\r\n", fields);
        hop.mark_hop(|n| n == b"Accept");
        assert!(!same(&one, &hop));
        // No fields at all.
        let none = head("GET / HTTP/1.1\r\n", "\r\n");
        assert!(same(&none, &head("GET /other HTTP/1.1\r\n", "\r\n")));
        assert!(!same(&none, &one) && !same(&one, &none));
        // The same bytes and as many fields, but not the same ones: a field between the first
        // and the last left out (as an upstream's hop-by-hop fields are), another each time.
        let four = "Host: registry\r\nX-A: 1\r\nX-B: 2\r\nAccept: */*\r\n\r\n";
        let mut no_a = head("GET /v2/ HTTP/1.1\r\n", four);
        no_a.retain(|n| n != b"X-A");
        let mut no_b = head("GET /v2/ HTTP/1.1\r\n", four);
        no_b.retain(|n| n != b"X-B");
        assert!(!same(&no_a, &no_b));
    }
}
