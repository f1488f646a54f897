//! Global mode's wire format: Envoy's Rate Limit Service protocol
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), hand-encoded so that the
//! wasm module carries no protobuf runtime. Only the fields keygate sends or reads are known;
//! every other field of a reply is skipped by its wire type, as protobuf requires.
//!
//! What keygate sends (one request per HTTP request, `hits_addend` 1):
//!
//! ```text
//! RateLimitRequest { domain = <rate_limit.global.domain>, hits_addend = 1,
//!   descriptors = [ { entries = [("keygate_key", <key id>), ("window_s", "<n>")],
//!                     limit = { requests_per_unit = <limit>, unit = SECOND|MINUTE|HOUR|DAY } },
//!                   { entries = [("keygate_owner", <owner>), ("window_s", "<n>")], limit = … } ] }
//! ```
//!
//! The reply's `DescriptorStatus` of each descriptor (same order) becomes a
//! [`LimitState`](crate::ratelimit::LimitState), so headers, 429 and `Retry-After` come out
//! exactly as in local mode.

use crate::config::Limit;
use crate::ratelimit::{self, Counted, LimitState};
use crate::varint;

/// The gRPC service keygate calls.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
/// The gRPC method keygate calls.
pub const METHOD: &str = "ShouldRateLimit";
/// Descriptor entry naming a key's counter (value: the key's `id`).
pub const ENTRY_KEY: &str = "keygate_key";
/// Descriptor entry naming an owner's counter, shared by all its keys (value: the owner).
pub const ENTRY_OWNER: &str = "keygate_owner";
/// Descriptor entry naming the window, in seconds (`1`, `60`, `3600` or `86400`).
pub const ENTRY_WINDOW: &str = "window_s";

/// The windows the protocol can express (its units SECOND, MINUTE, HOUR, DAY), in seconds.
pub const UNIT_WINDOWS_S: [u64; 4] = [1, 60, 3_600, 86_400];

/// The protocol's unit (`RateLimitUnit`) of a window in seconds, if it has one.
pub fn unit_of(window_s: u64) -> Option<u64> {
    match window_s {
        1 => Some(1),
        60 => Some(2),
        3_600 => Some(3),
        86_400 => Some(4),
        _ => None,
    }
}

/// The window in seconds of a protocol unit (`RateLimitResponse.RateLimit.Unit`); MONTH and
/// YEAR have no fixed length and are not accepted.
pub fn window_of(unit: u64) -> Option<u64> {
    UNIT_WINDOWS_S
        .get(usize::try_from(unit.checked_sub(1)?).ok()?)
        .copied()
}

/// The error for a window the protocol cannot express, worded for a message that names the field.
pub fn window_error(window_s: u64) -> String {
    format!(
        "{window_s} is not one of 1, 60, 3600, 86400 (rate_limit.global: the Rate Limit Service counts per second, minute, hour or day)"
    )
}

/// Whose counter a descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Key,
    Owner,
}

/// One descriptor: a counter (subject, its id, the window) and the limit it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor<'a> {
    pub subject: Subject,
    pub id: &'a str,
    pub limit: Limit,
}

/// The descriptors of a request: the key's limits, then its owner's, one per (subject, window).
/// Two limits of one subject with the same window share one counter (as in local mode), so they
/// go out as one descriptor carrying the smaller limit.
pub fn descriptors<'a>(
    key_id: &'a str,
    key_limits: &[Limit],
    owner: &'a str,
    owner_limits: &[Limit],
) -> Vec<Descriptor<'a>> {
    let mut out: Vec<Descriptor<'a>> = Vec::with_capacity(key_limits.len() + owner_limits.len());
    for (subject, id, limits) in [
        (Subject::Key, key_id, key_limits),
        (Subject::Owner, owner, owner_limits),
    ] {
        for l in limits {
            match out
                .iter_mut()
                .find(|d| d.subject == subject && d.limit.window_s == l.window_s)
            {
                Some(d) => d.limit.limit = d.limit.limit.min(l.limit),
                None => out.push(Descriptor {
                    subject,
                    id,
                    limit: *l,
                }),
            }
        }
    }
    out
}

// ---- encoding ----

const LEN: u64 = 2;
const VARINT: u64 = 0;

fn tag(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint::put(out, field << 3 | wire);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    tag(out, field, LEN);
    varint::put(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_varint(out: &mut Vec<u8>, field: u64, v: u64) {
    tag(out, field, VARINT);
    varint::put(out, v);
}

/// `envoy.config.core.v3.GrpcService { envoy_grpc { cluster_name } }`, serialised: what
/// `proxy_dispatch_grpc_call` takes to name the service's cluster unambiguously (Envoy reads a
/// bare string as a cluster name only when it does not parse as this message).
/// Whether a call that failed `elapsed_ms` after the request was decided failed on its deadline
/// (`timeout_ms`): Envoy ends such a call as an upstream 504, which gRPC reports as UNAVAILABLE,
/// so the time tells a timeout from a refused or reset connection. Envoy arms the call's timer
/// from its event loop's cached clock, which can be a few ms behind the clock the filter read,
/// so a failure within a tenth of the deadline (50 ms at most) of it counts as the deadline.
pub fn failed_on_deadline(elapsed_ms: u64, timeout_ms: u64) -> bool {
    let slack = (timeout_ms / 10).min(50);
    elapsed_ms.saturating_add(slack) >= timeout_ms
}

pub fn grpc_service(cluster: &str) -> Vec<u8> {
    let mut envoy_grpc = Vec::with_capacity(cluster.len() + 2);
    put_bytes(&mut envoy_grpc, 1, cluster.as_bytes());
    let mut out = Vec::with_capacity(envoy_grpc.len() + 3);
    put_bytes(&mut out, 1, &envoy_grpc);
    out
}

/// A serialised `RateLimitRequest` of `descriptors` in `domain`, `hits_addend` 1.
pub fn encode_request(domain: &str, descriptors: &[Descriptor]) -> Vec<u8> {
    let mut out = Vec::with_capacity(domain.len() + 2 + descriptors.len() * 64);
    put_bytes(&mut out, 1, domain.as_bytes());
    let mut d = Vec::with_capacity(64);
    let mut part = Vec::with_capacity(32);
    for desc in descriptors {
        d.clear();
        let name = match desc.subject {
            Subject::Key => ENTRY_KEY,
            Subject::Owner => ENTRY_OWNER,
        };
        let window = desc.limit.window_s.to_string();
        for (k, v) in [(name, desc.id), (ENTRY_WINDOW, window.as_str())] {
            part.clear();
            put_bytes(&mut part, 1, k.as_bytes());
            put_bytes(&mut part, 2, v.as_bytes());
            put_bytes(&mut d, 1, &part);
        }
        // RateLimitOverride { requests_per_unit = 1; unit = 2 } (a unit-less window, which global
        // mode never lets through, goes out as UNKNOWN and the service refuses the override).
        part.clear();
        put_varint(&mut part, 1, desc.limit.limit);
        put_varint(&mut part, 2, unit_of(desc.limit.window_s).unwrap_or(0));
        put_bytes(&mut d, 2, &part);
        put_bytes(&mut out, 2, &d);
    }
    put_varint(&mut out, 3, 1);
    out
}

// ---- decoding ----

/// `RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    fn from(v: u64) -> Code {
        match v {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
}

/// One `DescriptorStatus` of a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    /// `current_limit`: `(requests_per_unit, unit)`, when the service applied a limit.
    pub current_limit: Option<(u64, u64)>,
    pub limit_remaining: u64,
    /// `duration_until_reset`, in milliseconds (rounded up), when the service sent it.
    pub until_reset_ms: Option<u64>,
}

/// The parts of a `RateLimitResponse` keygate uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub overall: Code,
    pub statuses: Vec<Status>,
}

/// A protobuf reader over one message's bytes.
struct Reader<'a>(&'a [u8]);

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| "length too large")?;
        let head = self.0.get(..n).ok_or("truncated field")?;
        self.0 = self.0.get(n..).unwrap_or_default();
        Ok(head)
    }

    /// The next field: `(number, value)`, or `None` at the end of the message.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (number, wire) = (key >> 3, key & 7);
        if number == 0 {
            return Err("field number 0".into());
        }
        let value = match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Other
            }
            2 => {
                let n = self.varint()?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Value::Other
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((number, value)))
    }
}

/// Reads a message's fields, calling `f(number, value)` for each; wrong wire types for a known
/// field are the caller's to refuse.
fn fields<'a>(
    bytes: &'a [u8],
    mut f: impl FnMut(u64, Value<'a>) -> Result<(), String>,
) -> Result<(), String> {
    let mut r = Reader(bytes);
    while let Some((n, v)) = r.field()? {
        f(n, v)?;
    }
    Ok(())
}

fn want_varint(v: Value, what: &str) -> Result<u64, String> {
    match v {
        Value::Varint(x) => Ok(x),
        _ => Err(format!("{what}: wrong wire type")),
    }
}

fn want_bytes<'a>(v: Value<'a>, what: &str) -> Result<&'a [u8], String> {
    match v {
        Value::Bytes(b) => Ok(b),
        _ => Err(format!("{what}: wrong wire type")),
    }
}

fn decode_status(bytes: &[u8]) -> Result<Status, String> {
    let mut s = Status {
        code: Code::Unknown,
        current_limit: None,
        limit_remaining: 0,
        until_reset_ms: None,
    };
    fields(bytes, |n, v| {
        match n {
            1 => s.code = Code::from(want_varint(v, "code")?),
            2 => {
                let (mut rpu, mut unit) = (0, 0);
                fields(want_bytes(v, "current_limit")?, |n, v| {
                    match n {
                        1 => rpu = want_varint(v, "requests_per_unit")?,
                        2 => unit = want_varint(v, "unit")?,
                        _ => {}
                    }
                    Ok(())
                })?;
                s.current_limit = Some((rpu, unit));
            }
            3 => s.limit_remaining = want_varint(v, "limit_remaining")?,
            4 => {
                let (mut seconds, mut nanos) = (0u64, 0u64);
                fields(want_bytes(v, "duration_until_reset")?, |n, v| {
                    match n {
                        1 => seconds = want_varint(v, "seconds")?,
                        2 => nanos = want_varint(v, "nanos")?,
                        _ => {}
                    }
                    Ok(())
                })?;
                // int64/int32 on the wire: a negative value is a 10-byte varint, read as huge.
                if seconds > i64::MAX as u64 || nanos >= 1_000_000_000 {
                    return Err("duration_until_reset out of range".into());
                }
                s.until_reset_ms = Some(
                    seconds
                        .saturating_mul(1000)
                        .saturating_add(nanos.div_ceil(1_000_000)),
                );
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(s)
}

/// Decodes a serialised `RateLimitResponse` (the gRPC message, without its 5-byte frame).
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, String> {
    let mut reply = Reply {
        overall: Code::Unknown,
        statuses: Vec::new(),
    };
    fields(bytes, |n, v| {
        match n {
            1 => reply.overall = Code::from(want_varint(v, "overall_code")?),
            2 => reply
                .statuses
                .push(decode_status(want_bytes(v, "statuses")?)?),
            _ => {}
        }
        Ok(())
    })?;
    Ok(reply)
}

/// The reply as the state of every limit, for the headers and the decision of local mode.
/// `sent_ms` and `now_ms` are when the request went out and when its answer came (Unix ms).
///
/// The reply must have one status per descriptor, an overall code that agrees with them, and
/// no status of unknown code; anything else is a bad reply (the failure mode applies). A status
/// without `current_limit` (the service applies no limit there) describes no limit. The service
/// counted somewhere between `sent_ms` and `now_ms`, so its window ends between
/// `sent_ms + duration_until_reset` and `now_ms + duration_until_reset` (a second more either
/// way for services that send whole seconds): when the epoch-aligned end of the window lies
/// there, that end is used, so headers match local mode exactly; otherwise (a service with
/// windows of its own) the later bound.
pub fn counted(
    descriptors: &[Descriptor],
    reply: &Reply,
    sent_ms: u64,
    now_ms: u64,
) -> Result<Counted, String> {
    if reply.statuses.len() != descriptors.len() {
        return Err(format!(
            "{} statuses for {} descriptors",
            reply.statuses.len(),
            descriptors.len()
        ));
    }
    let over = reply.statuses.iter().any(|s| s.code == Code::OverLimit);
    match reply.overall {
        Code::Unknown => return Err("overall_code UNKNOWN".into()),
        Code::Ok if over => return Err("overall_code OK with a status OVER_LIMIT".into()),
        Code::OverLimit if !over => {
            return Err("overall_code OVER_LIMIT with no status over".into())
        }
        _ => {}
    }
    let sent_ms = sent_ms.min(now_ms);
    let mut states = Vec::with_capacity(descriptors.len());
    for (d, s) in descriptors.iter().zip(&reply.statuses) {
        if s.code == Code::Unknown {
            return Err("a status of code UNKNOWN".into());
        }
        let (limit, window_s) = match s.current_limit {
            Some((rpu, unit)) => (
                rpu,
                window_of(unit).ok_or_else(|| format!("current_limit unit {unit}"))?,
            ),
            None if s.code == Code::OverLimit => (d.limit.limit, d.limit.window_s),
            None => continue,
        };
        let aligned = |t_ms: u64| ratelimit::window_start(t_ms / 1000, window_s) + window_s;
        let reset = match s.until_reset_ms {
            Some(ms) => {
                let earliest = (sent_ms.saturating_add(ms) / 1000).saturating_sub(1);
                let latest = now_ms.saturating_add(ms).div_ceil(1000).saturating_add(1);
                [aligned(sent_ms), aligned(now_ms)]
                    .into_iter()
                    .find(|end| (earliest..=latest).contains(end))
                    .unwrap_or(latest - 1)
            }
            None => aligned(now_ms),
        };
        let count = match s.code {
            Code::OverLimit => limit.saturating_add(1),
            _ => limit.saturating_sub(s.limit_remaining),
        };
        states.push(LimitState {
            limit,
            window_s,
            count,
            reset,
        });
    }
    Ok(Counted { states })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn a_failure_at_the_deadline_is_a_timeout_within_its_slack() {
        assert!(failed_on_deadline(2_000, 2_000));
        assert!(
            failed_on_deadline(1_997, 2_000),
            "timer armed from a clock a few ms behind"
        );
        assert!(failed_on_deadline(1_950, 2_000));
        assert!(!failed_on_deadline(1_949, 2_000));
        assert!(
            !failed_on_deadline(3, 2_000),
            "refused at once: unavailable"
        );
        assert!(
            failed_on_deadline(18, 20) && !failed_on_deadline(17, 20),
            "a tenth of a short one"
        );
        assert!(failed_on_deadline(0, 0));
    }

    fn l(limit: u64, window_s: u64) -> Limit {
        Limit { limit, window_s }
    }

    /// A tiny independent protobuf writer for replies.
    fn msg(fields: &[(u64, Field)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, f) in fields {
            match f {
                Field::V(v) => put_varint(&mut out, *n, *v),
                Field::B(b) => put_bytes(&mut out, *n, b),
            }
        }
        out
    }
    enum Field {
        V(u64),
        B(Vec<u8>),
    }
    use Field::{B, V};

    fn status(code: u64, rpu: u64, unit: u64, remaining: u64, secs: u64) -> Vec<u8> {
        msg(&[
            (1, V(code)),
            (
                2,
                B(msg(&[(1, V(rpu)), (2, V(unit)), (3, B(b"n".to_vec()))])),
            ),
            (3, V(remaining)),
            (4, B(msg(&[(1, V(secs))]))),
        ])
    }

    #[test]
    fn units_and_windows() {
        for (w, u) in [(1, 1), (60, 2), (3600, 3), (86400, 4)] {
            assert_eq!(unit_of(w), Some(u));
            assert_eq!(window_of(u), Some(w));
        }
        assert_eq!(unit_of(7), None);
        assert_eq!(window_of(0), None);
        assert_eq!(window_of(5), None, "MONTH has no fixed length");
        assert!(window_error(7).contains("7 is not one of 1, 60, 3600, 86400"));
    }

    #[test]
    fn request_bytes_are_the_standard_encoding() {
        let d = descriptors("k1", &[l(5, 60)], "org", &[l(100, 86400)]);
        let got = encode_request("dom", &d);
        let entry = |k: &str, v: &str| msg(&[(1, B(k.into())), (2, B(v.into()))]);
        let desc = |k: &str, v: &str, w: &str, rpu: u64, unit: u64| {
            msg(&[
                (1, B(entry(k, v))),
                (1, B(entry("window_s", w))),
                (2, B(msg(&[(1, V(rpu)), (2, V(unit))]))),
            ])
        };
        let want = msg(&[
            (1, B(b"dom".to_vec())),
            (2, B(desc("keygate_key", "k1", "60", 5, 2))),
            (2, B(desc("keygate_owner", "org", "86400", 100, 4))),
            (3, V(1)),
        ]);
        assert_eq!(got, want);
        // Byte for byte: the field keys of the outer message.
        assert_eq!(&got[..5], &[0x0a, 3, b'd', b'o', b'm']);
        assert_eq!(&got[got.len() - 2..], &[0x18, 1]);
    }

    #[test]
    fn same_window_limits_share_one_descriptor_with_the_smaller_limit() {
        let d = descriptors("k", &[l(10, 60), l(3, 60), l(5, 1)], "o", &[l(9, 60)]);
        assert_eq!(
            d,
            vec![
                Descriptor {
                    subject: Subject::Key,
                    id: "k",
                    limit: l(3, 60)
                },
                Descriptor {
                    subject: Subject::Key,
                    id: "k",
                    limit: l(5, 1)
                },
                Descriptor {
                    subject: Subject::Owner,
                    id: "o",
                    limit: l(9, 60)
                },
            ]
        );
        assert!(descriptors("k", &[], "o", &[]).is_empty());
    }

    #[test]
    fn grpc_service_names_the_cluster() {
        assert_eq!(
            grpc_service("rls"),
            vec![0x0a, 5, 0x0a, 3, b'r', b'l', b's']
        );
    }

    #[test]
    fn replies_decode_and_become_limit_states() {
        let now_ms = 1_708_345_166_250; // 34 s before the minute ends
        let bytes = msg(&[
            (1, V(1)),
            (2, B(status(1, 60, 2, 12, 34))),
            (2, B(status(1, 1000, 4, 999, 49_034))),
            // Fields keygate does not read: headers to add, raw body, a fixed64, a fixed32.
            (3, B(msg(&[(1, B(b"x".to_vec())), (2, B(b"y".to_vec()))]))),
            (5, B(b"body".to_vec())),
        ]);
        let mut with_fixed = bytes.clone();
        with_fixed.extend_from_slice(&[(9 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        with_fixed.extend_from_slice(&[(10 << 3) | 5, 1, 2, 3, 4]);
        let reply = decode_reply(&with_fixed).unwrap();
        assert_eq!(reply.overall, Code::Ok);
        assert_eq!(reply.statuses.len(), 2);
        assert_eq!(reply.statuses[0].current_limit, Some((60, 2)));
        assert_eq!(reply.statuses[0].until_reset_ms, Some(34_000));
        let d = descriptors("k", &[l(60, 60)], "o", &[l(1000, 86400)]);
        let c = counted(&d, &reply, now_ms, now_ms).unwrap();
        assert!(c.allowed());
        let t = c.tightest().unwrap();
        assert_eq!((t.limit, t.remaining(), t.window_s), (60, 12, 60));
        assert_eq!(t.reset, 1_708_345_200);
        assert_eq!(
            ratelimit::headers(crate::config::HeaderStyle::XRateLimit, t, now_ms / 1000)[1].1,
            "12"
        );
    }

    #[test]
    fn over_limit_gives_a_refusal_with_retry_after() {
        let now_ms = 1_708_345_166_000;
        let bytes = msg(&[(1, V(2)), (2, B(status(2, 5, 2, 0, 34)))]);
        let d = descriptors("k", &[l(5, 60)], "o", &[]);
        let c = counted(&d, &decode_reply(&bytes).unwrap(), now_ms, now_ms).unwrap();
        assert!(!c.allowed());
        assert_eq!(c.retry_after(now_ms / 1000), 34);
        assert_eq!(c.tightest().unwrap().remaining(), 0);
    }

    #[test]
    fn the_reset_follows_the_service_when_far_from_the_aligned_end() {
        let now_ms = 1_000_010_000;
        let d = descriptors("k", &[l(5, 60)], "o", &[]);
        // Aligned end: 1_000_020; the service says 10 s from now: agrees.
        let r = decode_reply(&msg(&[(1, V(1)), (2, B(status(1, 5, 2, 4, 10)))])).unwrap();
        assert_eq!(
            counted(&d, &r, now_ms, now_ms).unwrap().states[0].reset,
            1_000_020
        );
        // One second off (clocks a moment apart): still the aligned end.
        let r = decode_reply(&msg(&[(1, V(1)), (2, B(status(1, 5, 2, 4, 9)))])).unwrap();
        assert_eq!(
            counted(&d, &r, now_ms, now_ms).unwrap().states[0].reset,
            1_000_020
        );
        // A service with windows of its own (sliding): its end.
        let r = decode_reply(&msg(&[(1, V(1)), (2, B(status(1, 5, 2, 4, 45)))])).unwrap();
        assert_eq!(
            counted(&d, &r, now_ms, now_ms).unwrap().states[0].reset,
            1_000_055
        );
        // Answered 1.7 s after it was sent, counted just after sending: 10 s then, 8.3 s now.
        let r = decode_reply(&msg(&[(1, V(1)), (2, B(status(1, 5, 2, 4, 10)))])).unwrap();
        let c = counted(&d, &r, now_ms, now_ms + 1_700).unwrap();
        assert_eq!(c.states[0].reset, 1_000_020);
        // No duration: the aligned end.
        let s = msg(&[(1, V(1)), (2, B(msg(&[(1, V(5)), (2, V(2))]))), (3, V(4))]);
        let r = decode_reply(&msg(&[(1, V(1)), (2, B(s))])).unwrap();
        assert_eq!(
            counted(&d, &r, now_ms, now_ms).unwrap().states[0].reset,
            1_000_020
        );
    }

    #[test]
    fn a_status_without_a_limit_describes_nothing_unless_over() {
        let d = descriptors("k", &[l(5, 60)], "o", &[l(7, 1)]);
        let ok = msg(&[(1, V(1))]);
        let r = decode_reply(&msg(&[(1, V(1)), (2, B(ok.clone())), (2, B(ok))])).unwrap();
        let c = counted(&d, &r, 120_000, 120_000).unwrap();
        assert!(c.allowed() && c.states.is_empty());
        let over = msg(&[(1, V(2))]);
        let r = decode_reply(&msg(&[(1, V(2)), (2, B(msg(&[(1, V(1))]))), (2, B(over))])).unwrap();
        let c = counted(&d, &r, 120_500, 120_500).unwrap();
        assert!(!c.allowed());
        assert_eq!((c.states[0].limit, c.states[0].window_s), (7, 1));
        assert_eq!(c.retry_after(120), 1);
    }

    #[test]
    fn bad_replies_are_errors_never_panics() {
        let d = descriptors("k", &[l(5, 60)], "o", &[]);
        let ok_status = status(1, 5, 2, 4, 10);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (msg(&[(2, B(ok_status.clone()))]), "UNKNOWN"),
            (msg(&[(1, V(1))]), "0 statuses for 1"),
            (
                msg(&[
                    (1, V(1)),
                    (2, B(ok_status.clone())),
                    (2, B(ok_status.clone())),
                ]),
                "2 statuses",
            ),
            (
                msg(&[(1, V(2)), (2, B(ok_status.clone()))]),
                "no status over",
            ),
            (
                msg(&[(1, V(1)), (2, B(status(2, 5, 2, 0, 10)))]),
                "OK with a status",
            ),
            (msg(&[(1, V(1)), (2, B(status(1, 5, 5, 4, 10)))]), "unit 5"),
            (msg(&[(1, V(1)), (2, B(msg(&[(1, V(7))])))]), "code UNKNOWN"),
        ];
        for (bytes, needle) in cases {
            let e = decode_reply(&bytes)
                .and_then(|r| counted(&d, &r, 1_000_000, 1_000_000))
                .unwrap_err();
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        }
        let malformed: Vec<Vec<u8>> = vec![
            vec![0x08],                   // truncated varint
            vec![0x08, 0x80, 0x80],       // unterminated varint
            vec![0x10, 0x01],             // statuses as a varint
            vec![0x12, 5, 1, 2],          // length past the end
            vec![0x0b],                   // group (wire type 3)
            vec![0x00, 0x01],             // field number 0
            vec![0x0a, 1, 1],             // overall_code as bytes
            vec![0x12, 2, 0x0a, 1],       // status: code as bytes (truncated)
            vec![0x12, 3, 0x22, 1, 0x08], // duration truncated
            [vec![0x08], vec![0xff; 11]].concat(),
            {
                // a negative duration
                let dur = msg(&[(1, V(u64::MAX))]);
                msg(&[(1, V(1)), (2, B(msg(&[(1, V(1)), (4, B(dur))])))])
            },
        ];
        for bytes in malformed {
            assert!(
                decode_reply(&bytes)
                    .and_then(|r| counted(&d, &r, 1_000_000, 1_000_000))
                    .is_err(),
                "{bytes:?}"
            );
        }
        // Every prefix and every single-byte corruption of a good reply: an answer, never a panic.
        let good = msg(&[(1, V(1)), (2, B(ok_status))]);
        for n in 0..good.len() {
            let _ = decode_reply(&good[..n]).and_then(|r| counted(&d, &r, 1_000_000, 1_000_000));
            for b in [0u8, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[n] = b;
                let _ = decode_reply(&bad).and_then(|r| counted(&d, &r, 1_000_000, 1_000_000));
            }
        }
    }
}
