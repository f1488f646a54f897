//! Per-key usage for the key service (extension `usage`): what each worker counts per request,
//! how it is handed over to the instance's reporter, and the report `POST /v1/usage` takes.
//!
//! - **Per request** ([`Usage::record`]): one hash-map update in the VM's own memory, no host
//!   call. A worker keeps at most `max_ids` key ids; use by further ids is dropped (counted in
//!   [`Usage::dropped`]) and [`Usage::full`] asks for an early handover.
//! - **Per handover** (about every second, on the root context's tick): a worker that is not the
//!   instance's lease holder [`Usage::take`]s its counts and sends them, [`encode`]d, through a
//!   proxy-wasm shared queue; the lease holder [`Usage::merge_encoded`]s what it dequeues.
//! - **Per report** (every `interval_s`): the lease holder [`Usage::take`]s the merged counts and
//!   `POST`s [`report_json`]. A lost batch or report loses counts, never a decision.
//!
//! Keys never appear here, only their ids; nothing here is a metric.

use crate::decision::Kind;
use crate::response::Class;
use crate::time::format_rfc3339;
use serde::Serialize;
use std::collections::HashMap;

/// Refusal classes in the order of [`Class::ALL`].
const CLASSES: usize = Class::ALL.len();

/// What one key id did since the last handover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Requests allowed (including identity-endpoint answers).
    pub allowed: u64,
    /// Requests refused, by class in the order of [`Class::ALL`].
    pub refused: [u64; CLASSES],
    /// Latest allowed use, Unix seconds (0: none).
    pub last_used_s: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.allowed = self.allowed.saturating_add(other.allowed);
        for (a, b) in self.refused.iter_mut().zip(other.refused.iter()) {
            *a = a.saturating_add(*b);
        }
        self.last_used_s = self.last_used_s.max(other.last_used_s);
    }
}

/// Per-key counts of one VM (a worker's, or the reporter's merged ones), bounded in size.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    map: HashMap<String, Tally>,
    max_ids: usize,
    dropped: u64,
}

impl Usage {
    /// Empty counts keeping at most `max_ids` key ids.
    pub fn new(max_ids: usize) -> Usage {
        Usage {
            map: HashMap::new(),
            max_ids,
            dropped: 0,
        }
    }

    /// Counts one decision for key `id` at `now_s` (Unix seconds). Decisions without a key id
    /// (missing key, exempt, fail-open) and unknown keys are not per key and not counted here.
    pub fn record(&mut self, id: Option<&str>, kind: Kind, now_s: u64) {
        let Some(id) = id else { return };
        if let Some(t) = self.map.get_mut(id) {
            bump(t, kind, now_s);
            return;
        }
        if self.map.len() >= self.max_ids {
            self.dropped = self.dropped.saturating_add(1);
            return;
        }
        bump(self.map.entry(id.to_string()).or_default(), kind, now_s);
    }

    /// Adds another batch of counts (the reporter merging a worker's), within `max_ids`.
    pub fn merge(&mut self, id: &str, t: &Tally) {
        if let Some(mine) = self.map.get_mut(id) {
            mine.add(t);
        } else if self.map.len() >= self.max_ids {
            self.dropped = self
                .dropped
                .saturating_add(t.allowed)
                .saturating_add(t.refused.iter().sum());
        } else {
            self.map.insert(id.to_string(), *t);
        }
    }

    /// Merges a batch made by [`encode`]; `Err` (and nothing merged) when it is not one.
    pub fn merge_encoded(&mut self, bytes: &[u8]) -> Result<(), String> {
        let batch: Vec<Entry> =
            serde_json::from_slice(bytes).map_err(|e| format!("bad usage batch: {e}"))?;
        for Entry(id, allowed, refused, last_used_s) in batch {
            let t = Tally {
                allowed,
                refused,
                last_used_s,
            };
            self.merge(&id, &t);
        }
        Ok(())
    }

    /// Whether the map reached `max_ids` (hand over early).
    pub fn full(&self) -> bool {
        self.map.len() >= self.max_ids
    }

    /// Whether nothing was counted since the last take.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// How many key ids are counted.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Requests not counted since the last take because the map was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The counts so far, sorted by key id; the map starts afresh (keeping its capacity bound).
    pub fn take(&mut self) -> Vec<(String, Tally)> {
        self.dropped = 0;
        let mut out: Vec<(String, Tally)> = std::mem::take(&mut self.map).into_iter().collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The counts of key `id`, if any.
    pub fn get(&self, id: &str) -> Option<&Tally> {
        self.map.get(id)
    }
}

fn bump(tally: &mut Tally, kind: Kind, now_s: u64) {
    match kind {
        // A shadowed refusal went on like an allowed request (`shadow`).
        Kind::Allowed | Kind::Whoami | Kind::Shadow(_) => {
            tally.allowed = tally.allowed.saturating_add(1);
            tally.last_used_s = tally.last_used_s.max(now_s);
        }
        Kind::Refused(c) => {
            let i = Class::ALL.iter().position(|x| *x == c).unwrap_or(0);
            if let Some(n) = tally.refused.get_mut(i) {
                *n = n.saturating_add(1);
            }
        }
        Kind::Exempt | Kind::FailOpen => {}
    }
}

/// One key's counts as handed over between VMs: `[id, allowed, [refused…], last_used_s]`.
#[derive(serde::Deserialize, Serialize)]
struct Entry(String, u64, [u64; CLASSES], u64);

/// A batch of counts (from [`Usage::take`]) as one shared-queue message.
pub fn encode(batch: &[(String, Tally)]) -> Vec<u8> {
    let entries: Vec<Entry> = batch
        .iter()
        .map(|(id, t)| Entry(id.clone(), t.allowed, t.refused, t.last_used_s))
        .collect();
    serde_json::to_vec(&entries).unwrap_or_default()
}

#[derive(Serialize)]
struct Report<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<&'a str>,
    at: String,
    reports: Vec<KeyReport<'a>>,
}

#[derive(Serialize)]
struct KeyReport<'a> {
    id: &'a str,
    allowed: u64,
    refused: std::collections::BTreeMap<&'static str, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_used_at: Option<String>,
}

/// The body of `POST /v1/usage` (key service README): `instance` (when known), `at` = `now_s`
/// (Unix seconds), one entry per key id with its non-zero refusal classes.
pub fn report_json(instance: Option<&str>, now_s: u64, batch: &[(String, Tally)]) -> Vec<u8> {
    let reports = batch
        .iter()
        .map(|(id, t)| KeyReport {
            id,
            allowed: t.allowed,
            refused: Class::ALL
                .iter()
                .zip(t.refused.iter())
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| (c.name(), *n))
                .collect(),
            last_used_at: (t.last_used_s > 0)
                .then(|| format_rfc3339(i64::try_from(t.last_used_s).unwrap_or(i64::MAX))),
        })
        .collect();
    let report = Report {
        instance,
        at: format_rfc3339(i64::try_from(now_s).unwrap_or(i64::MAX)),
        reports,
    };
    serde_json::to_vec(&report).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn counts_merge_and_report() {
        let mut w1 = Usage::new(10);
        w1.record(Some("a"), Kind::Allowed, 100);
        w1.record(Some("a"), Kind::Allowed, 105);
        w1.record(Some("a"), Kind::Refused(Class::RateLimited), 106);
        w1.record(None, Kind::Refused(Class::MissingKey), 106);
        w1.record(Some("b"), Kind::Refused(Class::IpDenied), 107);
        w1.record(Some("c"), Kind::Exempt, 107);
        let mut w2 = Usage::new(10);
        w2.record(Some("a"), Kind::Whoami, 103);
        w2.record(Some("b"), Kind::Refused(Class::IpDenied), 108);

        let mut leader = Usage::new(10);
        leader.merge_encoded(&encode(&w1.take())).unwrap();
        leader.merge_encoded(&encode(&w2.take())).unwrap();
        assert!(w1.is_empty() && w2.is_empty());
        assert!(leader.merge_encoded(b"[[1]]").is_err());
        let a = leader.get("a").unwrap();
        assert_eq!((a.allowed, a.last_used_s), (3, 105));
        assert_eq!(a.refused[5], 1);
        let batch = leader.take();
        let json: serde_json::Value =
            serde_json::from_slice(&report_json(Some("envoy-1"), 86_400, &batch)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "instance": "envoy-1",
                "at": "1970-01-02T00:00:00Z",
                "reports": [
                    {"id": "a", "allowed": 3, "refused": {"rate_limited": 1},
                     "last_used_at": "1970-01-01T00:01:45Z"},
                    {"id": "b", "allowed": 0, "refused": {"ip_denied": 2}},
                    {"id": "c", "allowed": 0, "refused": {}}
                ]
            })
        );
        let none: serde_json::Value = serde_json::from_slice(&report_json(None, 0, &[])).unwrap();
        assert_eq!(
            none,
            serde_json::json!({"at": "1970-01-01T00:00:00Z", "reports": []})
        );
    }

    #[test]
    fn bounded_by_max_ids() {
        let mut u = Usage::new(2);
        for id in ["a", "b", "c", "d"] {
            u.record(Some(id), Kind::Allowed, 1);
        }
        u.record(Some("a"), Kind::Allowed, 2);
        assert!(u.full());
        assert_eq!((u.len(), u.dropped()), (2, 2));
        assert_eq!(u.get("a").unwrap().allowed, 2);
        let mut m = Usage::new(1);
        m.merge_encoded(&encode(&u.take())).unwrap();
        assert_eq!((m.len(), m.dropped()), (1, 1));
        assert_eq!(u.dropped(), 0);
    }

    #[test]
    fn ids_are_escaped_in_json() {
        let mut u = Usage::new(4);
        u.record(Some("we\"ird\\id"), Kind::Allowed, 1);
        let b = u.take();
        let mut m = Usage::new(4);
        m.merge_encoded(&encode(&b)).unwrap();
        assert_eq!(m.get("we\"ird\\id").unwrap().allowed, 1);
        let v: serde_json::Value = serde_json::from_slice(&report_json(None, 1, &b)).unwrap();
        assert_eq!(v["reports"][0]["id"], "we\"ird\\id");
    }
}
