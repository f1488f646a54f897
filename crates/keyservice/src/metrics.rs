//! `/metrics`: Prometheus text exposition. Nothing is per key or per client.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters and gauges of one service instance.
#[derive(Default)]
pub struct Metrics {
    /// `(route template, method, status) -> count`.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    pub rebuilds: AtomicU64,
    /// Builds that read every key (the others read only the keys changed).
    pub full_rebuilds: AtomicU64,
    pub rebuild_failures: AtomicU64,
    pub not_modified: AtomicU64,
    pub usage_reports: AtomicU64,
    pub usage_keys: AtomicU64,
    pub purged: AtomicU64,
    /// Sum of build durations, in microseconds.
    build_micros_sum: AtomicU64,
    /// Last build duration, in microseconds.
    build_micros_last: AtomicU64,
}

/// What the document cache reports at scrape time.
pub struct DocState {
    pub keys: usize,
    pub bytes: usize,
    pub generation: i64,
    pub built: bool,
}

impl Metrics {
    pub fn request(&self, route: &str, method: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route.to_string(), method.to_string(), status))
            .or_insert(0) += 1;
    }

    /// Records one document build of `seconds` (`full`: every key read).
    pub fn built(&self, seconds: f64, full: bool) {
        let micros = (seconds * 1e6) as u64;
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
        if full {
            self.full_rebuilds.fetch_add(1, Ordering::Relaxed);
        }
        self.build_micros_sum.fetch_add(micros, Ordering::Relaxed);
        self.build_micros_last.store(micros, Ordering::Relaxed);
    }

    pub fn render(&self, doc: &DocState) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP keygate_keyservice_requests_total HTTP requests by route template, method and status.");
        let _ = writeln!(out, "# TYPE keygate_keyservice_requests_total counter");
        {
            let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            for ((route, method, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "keygate_keyservice_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {n}",
                    escape(route),
                    escape(method)
                );
            }
        }
        let counters = [
            (
                "document_rebuilds_total",
                "Key-list documents built.",
                &self.rebuilds,
            ),
            (
                "document_full_rebuilds_total",
                "Key-list documents built from every key (the others from the keys changed since the previous build).",
                &self.full_rebuilds,
            ),
            (
                "document_rebuild_failures_total",
                "Key-list document builds that failed (the last good one stays served).",
                &self.rebuild_failures,
            ),
            (
                "document_not_modified_total",
                "GET /v1/keys answered 304.",
                &self.not_modified,
            ),
            (
                "usage_reports_total",
                "Usage reports accepted.",
                &self.usage_reports,
            ),
            (
                "usage_key_entries_total",
                "Per-key entries in accepted usage reports.",
                &self.usage_keys,
            ),
            (
                "keys_unlisted_total",
                "Keys taken out of the document after the retention period.",
                &self.purged,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP keygate_keyservice_{name} {help}");
            let _ = writeln!(out, "# TYPE keygate_keyservice_{name} counter");
            let _ = writeln!(
                out,
                "keygate_keyservice_{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let secs = |m: &AtomicU64| m.load(Ordering::Relaxed) as f64 / 1e6;
        let gauges = [
            (
                "document_build_duration_seconds",
                "Wall time of the last document build, in seconds.",
                secs(&self.build_micros_last),
            ),
            (
                "document_build_duration_seconds_sum",
                "Total wall time of document builds, in seconds.",
                secs(&self.build_micros_sum),
            ),
            (
                "document_keys",
                "Keys in the served document.",
                doc.keys as f64,
            ),
            (
                "document_bytes",
                "Bytes of the served document (schema 2).",
                doc.bytes as f64,
            ),
            (
                "document_generation",
                "Generation of the served document.",
                doc.generation as f64,
            ),
            (
                "document_ready",
                "1 when a document has been built.",
                f64::from(u8::from(doc.built)),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP keygate_keyservice_{name} {help}");
            let _ = writeln!(out, "# TYPE keygate_keyservice_{name} gauge");
            let _ = writeln!(out, "keygate_keyservice_{name} {v}");
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
