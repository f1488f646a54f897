//! The `keygate_*` metrics (docs/metrics.md): a counter per decision, per shadowed refusal, per
//! fetch outcome and per global-mode call, gauges of the list in force (keys, age), and what only
//! the filter can see of its own footprint (shared-data entries, each VM's linear memory), set
//! once per tick, never per request. None is per key or per client. The per-request counters
//! (decisions, shadowed refusals) are counted in the VM and added to Envoy's on the VM's next
//! tick (every 100 ms) and when the VM stops: a host call per request saved, a scrape sees a
//! request at most a tick late. Counters follow Prometheus
//! conventions (`_total`), with the decision or fetch result in the name after a dot
//! (`keygate_requests_total.decision.allowed`), which Envoy's `stats_tags` turn into a tag
//! (envoy/prometheus/stats_tags.yaml).

use keygate_core::config::FailureMode;
use keygate_core::decision::{GlobalFailure, GlobalResult, Kind};
use keygate_core::loader::Fetch;
use keygate_core::response::Class;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::Cell;

#[derive(Default)]
pub struct Metrics {
    decisions: Vec<Option<u32>>,
    shadow: Vec<Option<u32>>,
    /// Counts not yet added to `decisions` and `shadow` (same order, shadow after decisions):
    /// see [`Metrics::flush`].
    pending: [Cell<u64>; DECISIONS.len() + SHADOW.len()],
    fetches: Vec<Option<u32>>,
    keys_loaded: Option<u32>,
    shared_entries: Option<u32>,
    vm_memory: Option<u32>,
    /// Global mode only (defined when `rate_limit.global` is set).
    global: Vec<Option<u32>>,
    list_age: Option<u32>,
}

/// Per VM: `keygate_vm_memory_bytes.vm<N>` (Prometheus with the shipped `stats_tags`: `keygate_vm_memory_bytes{vm="<N>"}`), N the
/// VM's ordinal in the instance (1, 2, …: the order in which the VMs were configured).
const VM_MEMORY: &str = "keygate_vm_memory_bytes";

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

/// Global mode: calls to the Rate Limit Service by result, then what `failure_mode` did after
/// each failed one.
const GLOBAL: [&str; 7] = [
    "keygate_global_calls_total.result.ok",
    "keygate_global_calls_total.result.timeout",
    "keygate_global_calls_total.result.unavailable",
    "keygate_global_calls_total.result.bad_reply",
    "keygate_global_fallbacks_total.failure_mode.local",
    "keygate_global_fallbacks_total.failure_mode.allow",
    "keygate_global_fallbacks_total.failure_mode.deny",
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
    /// `vm`: this VM's ordinal, for the per-VM gauge; `global`: global mode's counters too.
    pub fn define(vm: u64, global: bool) -> Metrics {
        Metrics {
            decisions: counters(&DECISIONS),
            shadow: counters(&SHADOW),
            pending: Default::default(),
            fetches: counters(&FETCHES),
            keys_loaded: define(MetricType::Gauge, "keygate_keys_loaded"),
            shared_entries: define(MetricType::Gauge, "keygate_shared_entries"),
            vm_memory: define(MetricType::Gauge, &format!("{VM_MEMORY}.vm{vm}")),
            global: if global {
                counters(&GLOBAL)
            } else {
                Vec::new()
            },
            list_age: define(MetricType::Gauge, "keygate_list_age_seconds"),
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    /// Counts a request's decision (a shadowed refusal only as such), in the VM: no host call
    /// per request; [`Metrics::flush`] adds the counts to Envoy's counters.
    pub fn decision(&self, kind: Kind) {
        let i = match kind {
            Kind::Allowed => 0,
            Kind::Exempt => 1,
            Kind::FailOpen => 2,
            Kind::Whoami => 3,
            Kind::Refused(c) => 4 + class_index(c),
            Kind::Shadow(c) => DECISIONS.len() + class_index(c),
        };
        if let Some(n) = self.pending.get(i) {
            n.set(n.get().saturating_add(1));
        }
    }

    /// Adds the decisions counted since the last flush to Envoy's counters: one host call per
    /// counter that moved. On every tick (100 ms) and when the VM stops.
    pub fn flush(&self) {
        let ids = self.decisions.iter().chain(&self.shadow);
        for (n, id) in self.pending.iter().zip(ids) {
            let count = n.take();
            if count > 0 {
                if let Some(id) = id {
                    let _ =
                        hostcalls::increment_metric(*id, i64::try_from(count).unwrap_or(i64::MAX));
                }
            }
        }
    }

    pub fn global(&self, r: GlobalResult) {
        let bump = |i: usize| Self::bump(self.global.get(i).copied().flatten());
        match r {
            GlobalResult::Answered => bump(0),
            GlobalResult::Failed(why, mode) => {
                bump(match why {
                    GlobalFailure::Timeout => 1,
                    GlobalFailure::Unavailable => 2,
                    GlobalFailure::BadReply => 3,
                });
                bump(match mode {
                    FailureMode::Local => 4,
                    FailureMode::Allow => 5,
                    FailureMode::Deny => 6,
                });
            }
        }
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
        Self::set(self.keys_loaded, n);
    }

    /// Set by the instance's fetcher each tick (`publish::shared_entries`).
    pub fn shared_entries(&self, n: u64) {
        Self::set(self.shared_entries, n);
    }

    /// This VM's linear memory in bytes (it only ever grows).
    pub fn vm_memory(&self) {
        let pages = core::arch::wasm32::memory_size(0) as u64;
        Self::set(self.vm_memory, pages.saturating_mul(65_536));
    }

    fn set(id: Option<u32>, n: u64) {
        if let Some(id) = id {
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
