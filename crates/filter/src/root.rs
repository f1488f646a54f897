//! The root context of each VM (the main thread's and every worker's). All of them tick and
//! refresh their view of the published list; the one holding the lease in shared data also
//! fetches the key list, validates it and publishes it for all.

use super::host::{now_ms, HostStore};
use super::http::Http;
use super::metrics::{Fetch, Metrics};
use keygate_core::bucket_cache::BucketCache;
use keygate_core::config::{self, Config};
use keygate_core::decision::ListState;
use keygate_core::keylist;
use keygate_core::shared::{self, Publisher, SetError, SharedStore, LEASE};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// Also how long a worker may answer from its bucket cache after a new list was published.
const TICK: Duration = Duration::from_millis(100);
/// A leader that stops renewing (VM gone, thread stuck) is replaced after this long.
const LEASE_MS: u64 = 5_000;
/// Held across parsing and publishing a list, which blocks this thread's ticks for seconds with
/// a million keys: a shorter lease would let another context fetch and parse the same list.
const PUBLISH_LEASE_MS: u64 = 120_000;
const SEQ: &str = "keygate:seq";

/// What every HTTP context of this VM shares with the root.
pub struct Shared {
    pub config: Config,
    pub source_id: String,
    pub list: Cell<ListState>,
    pub buckets: RefCell<BucketCache>,
    pub metrics: Metrics,
    /// Whether the host is nginx (ngx_wasm_module), learnt on the first request.
    pub nginx: Cell<Option<bool>>,
}

#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
    /// Unique among the root contexts of this Envoy instance: the lease holder's name.
    token: u64,
    leader: bool,
    publisher: Publisher,
    next_fetch_ms: Option<u64>,
    in_flight: Option<(u32, u64)>,
    failures: u32,
}

impl Root {
    fn store(&self) -> HostStore {
        HostStore
    }

    /// A number no other root context of this instance holds (CAS increment of a counter).
    fn take_token(&self) -> u64 {
        let store = self.store();
        for _ in 0..64 {
            let (value, cas) = store.get(SEQ);
            let n = value
                .as_deref()
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            let cas = if value.is_some() { cas } else { None };
            match store.set(SEQ, n.to_string().as_bytes(), cas) {
                Ok(()) => return n,
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Failed) => break,
            }
        }
        now_ms()
    }

    fn refresh_view(&self) {
        if let Some(s) = &self.shared {
            let meta = shared::read_meta(&self.store());
            s.list
                .set(ListState::from_meta(meta.as_ref(), &s.source_id));
        }
    }

    /// Takes or renews the lease for `hold_ms`; true while this context is the instance's fetcher.
    fn hold_lease(&mut self, now: u64, hold_ms: u64) -> bool {
        let store = self.store();
        let (value, cas) = store.get(LEASE);
        let (holder, until) = value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.split_once(':'))
            .and_then(|(h, u)| Some((h.parse::<u64>().ok()?, u.parse::<u64>().ok()?)))
            .unwrap_or((0, 0));
        if holder != self.token && until > now {
            return false;
        }
        let cas = if value.is_some() { cas } else { None };
        let lease = format!("{}:{}", self.token, now + hold_ms);
        store.set(LEASE, lease.as_bytes(), cas).is_ok()
    }

    fn schedule_after_failure(&mut self, now: u64, refresh_s: u64) {
        self.failures = self.failures.saturating_add(1);
        let backoff_s = (1u64 << self.failures.min(16).saturating_sub(1)).min(refresh_s);
        self.next_fetch_ms = Some(now + backoff_s * 1000);
    }

    fn fetch(&mut self, now: u64) {
        let Some(s) = self.shared.clone() else { return };
        let kl = &s.config.key_list;
        let etag = shared::read_meta(&self.store())
            .filter(|m| m.generation > 0 && m.source == s.source_id)
            .and_then(|m| m.etag);
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", &kl.path),
            (":authority", &kl.authority),
            ("accept", "application/json"),
        ];
        if let Some(e) = &etag {
            headers.push(("if-none-match", e));
        }
        for (k, v) in &kl.headers {
            headers.push((k, v));
        }
        match self.dispatch_http_call(
            &kl.cluster,
            headers,
            None,
            vec![],
            Duration::from_millis(kl.timeout_ms),
        ) {
            Ok(token) => {
                self.in_flight = Some((token, now));
                self.next_fetch_ms = Some(now + kl.refresh_s * 1000);
            }
            Err(e) => {
                log::warn!(
                    "keygate: key list fetch from cluster {:?} could not start: {e:?}",
                    kl.cluster
                );
                s.metrics.fetch(Fetch::Failed);
                self.schedule_after_failure(now, kl.refresh_s);
            }
        }
    }

    /// Whether the host honours the offset of a read of the key-list body (ngx_wasm_module
    /// always reads from the start): bytes read at offset 1 must be the same bytes read from 0.
    /// A head of one repeated byte cannot tell, and counts as no.
    fn reads_at_offset(&self, body_size: usize) -> bool {
        if body_size < 2 {
            return true;
        }
        let n = body_size.min(65);
        let head = self.get_http_call_response_body(0, n).unwrap_or_default();
        let tail = self
            .get_http_call_response_body(1, n - 1)
            .unwrap_or_default();
        let telling = head.windows(2).any(|w| w.first() != w.last());
        telling && head.get(1..) == Some(tail.as_slice())
    }

    fn on_fetched(&mut self, num_headers: usize, body_size: usize) {
        let Some(s) = self.shared.clone() else { return };
        let kl = &s.config.key_list;
        let now = now_ms();
        let headers = self.get_http_call_response_headers_bytes();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .map(str::to_string)
        };
        let status = header(":status").unwrap_or_default();
        let outcome = if num_headers == 0 {
            Err((
                Fetch::Failed,
                "no response (connection failure or timeout)".to_string(),
            ))
        } else if status == "304" {
            shared::touch(&self.store(), now / 1000);
            Ok(Fetch::NotModified)
        } else if status != "200" {
            Err((Fetch::Failed, format!("status {status}")))
        } else if body_size > kl.max_bytes {
            Err((
                Fetch::Rejected,
                format!(
                    "body of {body_size} bytes is over max_bytes {}",
                    kl.max_bytes
                ),
            ))
        } else {
            self.hold_lease(now, PUBLISH_LEASE_MS);
            // Read in chunks as it is parsed: the body is never copied into this VM whole.
            // ngx_wasm_module ignores the offset of a read, so there it is read once, whole.
            let whole = if !self.reads_at_offset(body_size) {
                Some(
                    self.get_http_call_response_body(0, body_size)
                        .unwrap_or_default(),
                )
            } else {
                None
            };
            let parsed = {
                let mut body = |offset: usize, max: usize| {
                    let len = max.min(body_size.saturating_sub(offset));
                    if len == 0 {
                        return Vec::new();
                    }
                    match &whole {
                        Some(all) => all.get(offset..offset + len).unwrap_or_default().to_vec(),
                        None => self
                            .get_http_call_response_body(offset, len)
                            .unwrap_or_default(),
                    }
                };
                keylist::read(&mut body, body_size)
            };
            match parsed {
                Err(e) => Err((Fetch::Rejected, format!("document rejected: {e}"))),
                Ok(list) => {
                    let meta = self.publisher.publish(
                        &self.store(),
                        &list,
                        header("etag"),
                        &s.source_id,
                        now / 1000,
                    );
                    s.metrics.keys_loaded(meta.keys);
                    log::info!(
                        "keygate: key list {} published: {} keys in {} buckets",
                        meta.version.as_deref().unwrap_or("(no version)"),
                        meta.keys,
                        1u64 << meta.bits
                    );
                    Ok(Fetch::Ok)
                }
            }
        };
        match outcome {
            Ok(f) => {
                s.metrics.fetch(f);
                self.failures = 0;
            }
            Err((f, why)) => {
                s.metrics.fetch(f);
                log::warn!("keygate: key list fetch failed, keeping the last good list: {why}");
                self.schedule_after_failure(now, kl.refresh_s);
            }
        }
        self.refresh_view();
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.in_flight.is_some_and(|(t, _)| t == token_id) {
            self.in_flight = None;
            self.on_fetched(num_headers, body_size);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let config = match config::parse(&raw) {
            Ok(c) => c,
            Err(e) => {
                log::error!("keygate: configuration rejected: {e}");
                return false;
            }
        };
        shared::ensure_counter_slots(&self.store());
        if self.token == 0 {
            self.token = self.take_token();
        }
        let source_id = config.key_list.source_id();
        self.shared = Some(Rc::new(Shared {
            config,
            source_id,
            list: Cell::new(ListState::default()),
            buckets: RefCell::new(BucketCache::default()),
            metrics: Metrics::define(),
            nginx: Cell::new(None),
        }));
        self.next_fetch_ms = None;
        self.refresh_view();
        self.set_tick_period(TICK);
        true
    }

    fn on_tick(&mut self) {
        let Some(s) = self.shared.clone() else { return };
        self.refresh_view();
        let now = now_ms();
        let was_leader = self.leader;
        self.leader = self.hold_lease(now, LEASE_MS);
        if !self.leader {
            return;
        }
        if !was_leader {
            // Taking over: fetch when the last fetch (by whoever) is due for refresh.
            let list = s.list.get();
            self.next_fetch_ms = Some(if list.loaded {
                (list.fetched_at + s.config.key_list.refresh_s) * 1000
            } else {
                now
            });
        }
        let timeout = s.config.key_list.timeout_ms + 1_000;
        if self
            .in_flight
            .is_some_and(|(_, started)| now > started + timeout)
        {
            // The host never answered: give up on that call.
            self.in_flight = None;
        }
        if self.in_flight.is_none() && self.next_fetch_ms.is_none_or(|t| now >= t) {
            self.fetch(now);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Http::new(shared)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
