//! The `keygate_*` metrics (docs/metrics.md): a counter per decision, per shadowed refusal and
//! per fetch outcome, and gauges of the list in force (keys, age). None is per key or per
//! client. Counters follow Prometheus conventions (`_total`), with the decision or fetch result
//! in the name after a dot (`keygate_requests_total.decision.allowed`), which Envoy's
//! `stats_tags` turn into a tag (envoy/prometheus/README.md).

use keygate_core::decision::Kind;
use keygate_core::loader::Fetch;
use keygate_core::response::Class;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

#[derive(Default)]
pub struct Metrics {
    decisions: Vec<Option<u32>>,
    shadow: Vec<Option<u32>>,
    fetches: Vec<Option<u32>>,
    keys_loaded: Option<u32>,
    list_age: Option<u32>,
}

/// The decisions that are not refusals, then `Class::ALL` in order.
const DECISIONS: [&str; 11] = [
    "keygate_requests_total.decision.allowed",
    "keygate_requests_total.decision.exempt",
    "keygate_requests_total.decision.fail_open",
    "keygate_requests_total.decision.whoami",
    "keygate_requests_total.decision.missing_key",
    "keygate_requests_total.decision.invalid_key",
    "keygate_requests_total.decision.expired_key",
    "keygate_requests_total.decision.forbidden",
    "keygate_requests_total.decision.ip_denied",
    "keygate_requests_total.decision.rate_limited",
    "keygate_requests_total.decision.unavailable",
];

/// Refusals decided but let through by `shadow`, in `Class::ALL` order.
const SHADOW: [&str; 7] = [
    "keygate_shadow_refusals_total.decision.missing_key",
    "keygate_shadow_refusals_total.decision.invalid_key",
    "keygate_shadow_refusals_total.decision.expired_key",
    "keygate_shadow_refusals_total.decision.forbidden",
    "keygate_shadow_refusals_total.decision.ip_denied",
    "keygate_shadow_refusals_total.decision.rate_limited",
    "keygate_shadow_refusals_total.decision.unavailable",
];

const FETCHES: [&str; 4] = [
    "keygate_list_fetches_total.result.ok",
    "keygate_list_fetches_total.result.not_modified",
    "keygate_list_fetches_total.result.failed",
    "keygate_list_fetches_total.result.rejected",
];

fn define(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

fn counters(names: &[&str]) -> Vec<Option<u32>> {
    names
        .iter()
        .map(|n| define(MetricType::Counter, n))
        .collect()
}

fn class_index(c: Class) -> usize {
    Class::ALL.iter().position(|x| *x == c).unwrap_or(0)
}

impl Metrics {
    pub fn define() -> Metrics {
        Metrics {
            decisions: counters(&DECISIONS),
            shadow: counters(&SHADOW),
            fetches: counters(&FETCHES),
            keys_loaded: define(MetricType::Gauge, "keygate_keys_loaded"),
            list_age: define(MetricType::Gauge, "keygate_list_age_seconds"),
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    /// One host call per request: a shadowed refusal is counted only as such.
    pub fn decision(&self, kind: Kind) {
        let (set, i) = match kind {
            Kind::Allowed => (&self.decisions, 0),
            Kind::Exempt => (&self.decisions, 1),
            Kind::FailOpen => (&self.decisions, 2),
            Kind::Whoami => (&self.decisions, 3),
            Kind::Refused(c) => (&self.decisions, 4 + class_index(c)),
            Kind::Shadow(c) => (&self.shadow, class_index(c)),
        };
        Self::bump(set.get(i).copied().flatten());
    }

    pub fn fetch(&self, f: Fetch) {
        let i = match f {
            Fetch::Ok => 0,
            Fetch::NotModified => 1,
            Fetch::Failed => 2,
            Fetch::Rejected => 3,
        };
        Self::bump(self.fetches.get(i).copied().flatten());
    }

    pub fn keys_loaded(&self, n: u64) {
        if let Some(id) = self.keys_loaded {
            let _ = hostcalls::record_metric(id, n);
        }
    }

    /// Seconds since the last successful fetch (200 or 304) of the list in force.
    pub fn list_age(&self, seconds: u64) {
        if let Some(id) = self.list_age {
            let _ = hostcalls::record_metric(id, seconds);
        }
    }
}
