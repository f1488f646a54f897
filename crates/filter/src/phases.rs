//! Diagnostic builds only (`--features phase-timing`, see `make wasm-timing`): the host's
//! nanosecond clock around each step of a request, averaged and logged every `EVERY` requests,
//! to see where a request's time goes inside Envoy. Each reading is itself a host call; the
//! `clock` line measures one empty pair of readings so it can be subtracted.

use proxy_wasm::hostcalls;
use std::cell::RefCell;
use std::time::UNIX_EPOCH;

pub const NAMES: [&str; 10] = [
    "clock",
    "read headers",
    "source property",
    "now",
    "decide",
    "metric",
    "write headers",
    "response headers",
    "shared get",
    "shared set",
];
const EVERY: u64 = 20_000;

thread_local! {
    static SUMS: RefCell<([u64; NAMES.len()], [u64; NAMES.len()], u64)> =
        const { RefCell::new(([0; NAMES.len()], [0; NAMES.len()], 0)) };
}

pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Runs `f`, adding its wall time to phase `i`.
pub fn time<T>(i: usize, f: impl FnOnce() -> T) -> T {
    let t0 = now_ns();
    let out = f();
    let dt = now_ns().saturating_sub(t0);
    SUMS.with(|s| {
        let (sums, calls, _) = &mut *s.borrow_mut();
        if let (Some(sum), Some(n)) = (sums.get_mut(i), calls.get_mut(i)) {
            *sum += dt;
            *n += 1;
        }
    });
    out
}

/// Ends one request: measures the clock itself, and logs the averages every `EVERY` requests.
pub fn request_done() {
    time(0, || ());
    SUMS.with(|s| {
        let mut s = s.borrow_mut();
        s.2 += 1;
        if s.2 < EVERY {
            return;
        }
        let line: Vec<String> = NAMES
            .iter()
            .zip(s.0.iter().zip(s.1.iter()))
            .map(|(n, (sum, calls))| {
                let per_call = *sum as f64 / (*calls).max(1) as f64 / 1000.0;
                let per_req = *calls as f64 / s.2 as f64;
                format!("{n} {per_call:.2}us x{per_req:.2}")
            })
            .collect();
        log::warn!("keygate phases over {} requests: {}", s.2, line.join(", "));
        *s = ([0; NAMES.len()], [0; NAMES.len()], 0);
    });
}
