//! The `keygate_*` metrics: a counter per decision, fetch outcomes and a gauge of keys loaded.
//! None is per key or per client.

use keygate_core::decision::Kind;
use keygate_core::loader::Fetch;
use keygate_core::response::Class;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

#[derive(Default)]
pub struct Metrics {
    decisions: Vec<Option<u32>>,
    fetches: Vec<Option<u32>>,
    keys_loaded: Option<u32>,
}

const DECISIONS: [&str; 11] = [
    "keygate_allowed",
    "keygate_exempt",
    "keygate_fail_open",
    "keygate_whoami",
    "keygate_missing_key",
    "keygate_invalid_key",
    "keygate_expired_key",
    "keygate_forbidden",
    "keygate_ip_denied",
    "keygate_rate_limited",
    "keygate_unavailable",
];

const FETCHES: [&str; 4] = [
    "keygate_fetch_ok",
    "keygate_fetch_not_modified",
    "keygate_fetch_failed",
    "keygate_fetch_rejected",
];

fn define(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

impl Metrics {
    pub fn define() -> Metrics {
        Metrics {
            decisions: DECISIONS
                .iter()
                .map(|n| define(MetricType::Counter, n))
                .collect(),
            fetches: FETCHES
                .iter()
                .map(|n| define(MetricType::Counter, n))
                .collect(),
            keys_loaded: define(MetricType::Gauge, "keygate_keys_loaded"),
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    pub fn decision(&self, kind: Kind) {
        let i = match kind {
            Kind::Allowed => 0,
            Kind::Exempt => 1,
            Kind::FailOpen => 2,
            Kind::Whoami => 3,
            Kind::Refused(c) => 4 + Class::ALL.iter().position(|x| *x == c).unwrap_or(0),
        };
        Self::bump(self.decisions.get(i).copied().flatten());
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
}
