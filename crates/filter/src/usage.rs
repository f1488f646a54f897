//! Usage reporting glue (extension `usage`; the logic is `keygate_core::usage`): each VM counts
//! per key in its own memory (`Shared::usage`, one map update per request, no host call); on its
//! tick a VM that does not hold the key-list lease hands its counts over through a proxy-wasm
//! shared queue about once a second, and the lease holder merges them with its own and `POST`s
//! one report per `interval_s` to the key service.

use super::host::now_ms;
use super::vm::Shared;
use keygate_core::config::UsageSink;
use keygate_core::usage::{self, Usage};
use proxy_wasm::hostcalls;
use std::time::Duration;

/// Name of the shared queue every VM of the plugin's `vm_id` hands its counts over through.
const QUEUE: &str = "keygate_usage";
/// Milliseconds between handovers of a worker's counts.
const HANDOVER_MS: u64 = 1_000;
/// At most this many queued batches are merged per tick (the rest waits for the next one); the
/// lease holder drains the queue on every tick (one host call when it is empty).
const MAX_DEQUEUE: usize = 256;

/// The usage part of one root context.
#[derive(Default)]
pub struct Reporter {
    queue: Option<u32>,
    /// Counts merged by this context while it is the lease holder.
    merged: Usage,
    last_handover_ms: u64,
    next_report_ms: u64,
    /// The report in flight: call id and when it was dispatched (Unix ms).
    in_flight: Option<(u32, u64)>,
    instance: Option<String>,
}

impl Reporter {
    /// Sets up the shared queue; `None` when `usage` is off.
    pub fn configure(sink: &UsageSink) -> Reporter {
        let queue = match hostcalls::register_shared_queue(QUEUE) {
            Ok(id) => Some(id),
            Err(e) => {
                log::warn!(
                    "keygate: usage: no shared queue ({e:?}); only this thread's use is reported"
                );
                None
            }
        };
        let instance = hostcalls::get_property(vec!["node", "id"])
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v).ok())
            .filter(|v| !v.is_empty());
        Reporter {
            queue,
            merged: Usage::new(sink.max_ids),
            last_handover_ms: now_ms(),
            next_report_ms: 0,
            in_flight: None,
            instance,
        }
    }

    /// Whether `call_id` is this context's report in flight; forgets it.
    pub fn answered(&mut self, call_id: u32, status: Option<String>) -> bool {
        if self.in_flight.is_none_or(|(id, _)| id != call_id) {
            return false;
        }
        self.in_flight = None;
        match status.as_deref() {
            Some("200") => {}
            Some(s) => log::warn!("keygate: usage report refused with status {s}; counts lost"),
            None => log::warn!("keygate: usage report got no answer; counts lost"),
        }
        true
    }

    /// The tick: hand over (not the lease holder) or merge and report (the lease holder).
    pub fn tick(&mut self, s: &Shared, sink: &UsageSink, leader: bool) {
        let now = now_ms();
        let Some(mine) = &s.usage else { return };
        let due = now >= self.last_handover_ms.saturating_add(HANDOVER_MS) || mine.borrow().full();
        if !leader {
            if !due {
                return;
            }
            self.last_handover_ms = now;
            let mut batch = mine.borrow_mut().take();
            // Counts merged while this context held the lease go to the new holder.
            batch.extend(self.merged.take());
            if batch.is_empty() {
                return;
            }
            if let Some(q) = self.queue {
                if hostcalls::enqueue_shared_queue(q, Some(&usage::encode(&batch))).is_err() {
                    log::debug!("keygate: usage: handover failed; counts lost");
                }
            }
            return;
        }
        for (id, t) in mine.borrow_mut().take() {
            self.merged.merge(&id, &t);
        }
        self.drain_queue();
        if self.next_report_ms == 0 {
            self.next_report_ms = now.saturating_add(sink.interval_s.saturating_mul(1000));
        }
        if let Some((_, at)) = self.in_flight {
            if now > at.saturating_add(sink.timeout_ms).saturating_add(1000) {
                self.in_flight = None;
            } else {
                return;
            }
        }
        if now < self.next_report_ms && !self.merged.full() {
            return;
        }
        self.next_report_ms = now.saturating_add(sink.interval_s.saturating_mul(1000));
        if self.merged.is_empty() {
            return;
        }
        let dropped = self.merged.dropped();
        if dropped > 0 {
            log::warn!(
                "keygate: usage: {dropped} requests not counted (over usage.max_ids {} key ids)",
                sink.max_ids
            );
        }
        let batch = self.merged.take();
        let body = usage::report_json(self.instance.as_deref(), now / 1000, &batch);
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "POST"),
            (":path", &sink.path),
            (":authority", &sink.authority),
            ("content-type", "application/json"),
        ];
        headers.extend(sink.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        match hostcalls::dispatch_http_call(
            &sink.cluster,
            headers,
            Some(&body),
            vec![],
            Duration::from_millis(sink.timeout_ms),
        ) {
            Ok(id) => self.in_flight = Some((id, now)),
            Err(e) => log::warn!(
                "keygate: usage report to cluster {:?} could not start: {e:?}; counts lost",
                sink.cluster
            ),
        }
    }

    fn drain_queue(&mut self) {
        let Some(q) = self.queue else { return };
        for _ in 0..MAX_DEQUEUE {
            match hostcalls::dequeue_shared_queue(q) {
                Ok(Some(bytes)) => {
                    if let Err(e) = self.merged.merge_encoded(&bytes) {
                        log::warn!("keygate: usage: {e}");
                    }
                }
                _ => break,
            }
        }
    }
}
