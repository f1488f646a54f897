//! The `keygate_*` metrics: a counter per decision, fetch outcomes, a gauge of keys loaded, and
//! what only the filter can see of its own footprint (shared-data entries, each VM's linear
//! memory), set once per tick, never per request. None is per key or per client.

use keygate_core::config::FailureMode;
use keygate_core::decision::{GlobalFailure, GlobalResult, Kind};
use keygate_core::loader::Fetch;
use keygate_core::response::Class;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

#[derive(Default)]
pub struct Metrics {
    decisions: Vec<Option<u32>>,
    fetches: Vec<Option<u32>>,
    keys_loaded: Option<u32>,
    shared_entries: Option<u32>,
    vm_memory: Option<u32>,
    /// Global mode only (defined when `rate_limit.global` is set).
    global: Vec<Option<u32>>,
}

/// Per VM: `keygate_vm_memory_bytes.vm<N>` (Prometheus: `keygate_vm_memory_bytes_vm<N>`), N the
/// VM's ordinal in the instance (1, 2, …: the order in which the VMs were configured).
const VM_MEMORY: &str = "keygate_vm_memory_bytes";

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

/// Global mode: calls the Rate Limit Service answered, each way a call failed, and what the
/// failure mode then did.
const GLOBAL: [&str; 7] = [
    "keygate_global_ok",
    "keygate_global_timeout",
    "keygate_global_unavailable",
    "keygate_global_bad_reply",
    "keygate_global_fallback_local",
    "keygate_global_fallback_allow",
    "keygate_global_fallback_deny",
];

fn define(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

impl Metrics {
    /// `vm`: this VM's ordinal, for the per-VM gauge; `global`: global mode's counters too.
    pub fn define(vm: u64, global: bool) -> Metrics {
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
            shared_entries: define(MetricType::Gauge, "keygate_shared_entries"),
            vm_memory: define(MetricType::Gauge, &format!("{VM_MEMORY}.vm{vm}")),
            global: if global {
                GLOBAL
                    .iter()
                    .map(|n| define(MetricType::Counter, n))
                    .collect()
            } else {
                Vec::new()
            },
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
}
