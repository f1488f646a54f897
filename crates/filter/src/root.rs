//! The root context of each VM (the main thread's and every worker's): it keeps the VM's view of
//! the published list fresh and forwards the key-list fetch loop's events to
//! `keygate_core::loader`, carrying out what the loader answers (dispatch, count, log).

use super::host::{now_ms, now_ns, HostStore};
use super::http::Http;
use super::metrics::Metrics;
use super::usage::Reporter;
use super::vm::Shared;
use keygate_core::bucket_cache::BucketCache;
use keygate_core::config;
use keygate_core::counters;
use keygate_core::decision::ListState;
use keygate_core::keylist;
use keygate_core::loader::{Answer, Loader, Report};
use keygate_core::publish;
use keygate_core::rls;
use keygate_core::usage::Usage;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// Whether the host can make gRPC calls, asked before global mode is accepted: whether it is
/// Envoy. Envoy answers `plugin_vm_id` in every context (empty, so unanswered, when the
/// configuration sets no `vm_id`) and `xds.node` (the whole node, tens of kB: asked only when
/// the first says nothing). ngx_wasm_module answers neither, and has no gRPC calls (its
/// `proxy_dispatch_grpc_call` is a stub that fails the filter); nginx is otherwise only
/// recognisable inside a request (`ngx.*` properties need one).
fn host_has_grpc_calls() -> bool {
    let answered = |path: Vec<&str>| {
        proxy_wasm::hostcalls::get_property(path)
            .ok()
            .flatten()
            .is_some_and(|v| !v.is_empty())
    };
    answered(vec!["plugin_vm_id"]) || answered(vec!["xds", "node"])
}

/// Also how long a worker may answer from its bucket cache after a new list was published.
const TICK: Duration = Duration::from_millis(100);
/// The tick after a parsed list's response callback, which publishes it.
const PUBLISH_SOON: Duration = Duration::from_millis(1);

/// This build's version, logged on load.
const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
    loader: Loader,
    reporter: Option<Reporter>,
    /// The last value this VM gave `keygate_list_age_seconds` (set when it changes).
    list_age: Cell<Option<u64>>,
}

impl Root {
    fn refresh_view(&self) {
        if let Some(s) = &self.shared {
            let meta = publish::read_meta(&HostStore);
            s.list
                .set(ListState::from_meta(meta.as_ref(), &s.source_id));
        }
    }

    /// `keygate_list_age_seconds`: seconds since the list in force was last fetched (200 or
    /// 304), set when it changes (about once a second per VM; every VM sees the same meta).
    fn record_list_age(&self, now_s: u64) {
        let Some(s) = &self.shared else { return };
        let list = s.list.get();
        if !list.loaded {
            return;
        }
        let age = now_s.saturating_sub(list.fetched_at_s);
        if self.list_age.get() != Some(age) {
            self.list_age.set(Some(age));
            s.metrics.list_age(age);
        }
    }

    /// Counts and logs what the loader reports.
    fn carry_out(&self, report: Report) {
        let Some(s) = &self.shared else { return };
        if let Some(outcome) = report.outcome {
            s.metrics.fetch(outcome);
        }
        if let Some(why) = report.reason {
            log::warn!("keygate: key list fetch failed, keeping the last good list: {why}");
        }
        if let Some(meta) = report.published {
            s.metrics.keys_loaded(meta.keys);
            log::info!(
                "keygate: key list {} published: {} keys in {} buckets (filter {VERSION})",
                meta.version.as_deref().unwrap_or("(no version)"),
                meta.keys,
                1u64 << meta.bits
            );
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

    fn on_fetched(&mut self, call_id: u32, num_headers: usize, body_size: usize) {
        // The loader is taken out while the body is read through `self`.
        let mut loader = std::mem::take(&mut self.loader);
        let answer = if num_headers == 0 {
            Answer::None
        } else {
            let headers = self.get_http_call_response_headers_bytes();
            let header = |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .and_then(|(_, v)| std::str::from_utf8(v).ok())
                    .map(str::to_string)
            };
            Answer::Response {
                status: header(":status").unwrap_or_default(),
                etag: header("etag"),
                body_size,
            }
        };
        // Read in chunks as it is parsed: the body is never copied into this VM whole.
        // ngx_wasm_module ignores the offset of a read, so there it is read once, whole.
        let mut whole: Option<Option<Vec<u8>>> = None;
        let mut read = |offset: usize, max: usize| {
            let len = max.min(body_size.saturating_sub(offset));
            if len == 0 {
                return Vec::new();
            }
            let whole = whole.get_or_insert_with(|| {
                (!self.reads_at_offset(body_size)).then(|| {
                    self.get_http_call_response_body(0, body_size)
                        .unwrap_or_default()
                })
            });
            match whole {
                Some(all) => all.get(offset..offset + len).unwrap_or_default().to_vec(),
                None => self
                    .get_http_call_response_body(offset, len)
                    .unwrap_or_default(),
            }
        };
        let report = loader.on_response(&HostStore, call_id, answer, &mut read, now_ms());
        self.loader = loader;
        self.carry_out(report);
        self.refresh_view();
        if self.loader.has_pending() {
            // Published on the next tick, once Envoy has freed the response body.
            self.set_tick_period(PUBLISH_SOON);
        }
    }
}

impl Context for Root {
    /// The VM is stopping (configuration replaced, Envoy draining): the decisions counted since
    /// the last tick reach Envoy's counters before it goes.
    fn on_done(&mut self) -> bool {
        if let Some(s) = &self.shared {
            s.metrics.flush();
        }
        true
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.loader.awaits(token_id) {
            self.on_fetched(token_id, num_headers, body_size);
        } else if self.reporter.is_some() {
            let status = (num_headers > 0)
                .then(|| self.get_http_call_response_header(":status"))
                .flatten();
            if let Some(r) = &mut self.reporter {
                r.answered(token_id, status);
            }
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
        if config.global.is_some() && !host_has_grpc_calls() {
            log::error!(
                "keygate: configuration rejected: rate_limit.global: this host has no gRPC calls \
                 (ngx_wasm_module implements no proxy_dispatch_grpc_call); global mode needs \
                 Envoy. Remove rate_limit.global to count limits in this instance."
            );
            return false;
        }
        log::info!(
            "keygate: filter {VERSION} configured (shadow: {}, access_log: {})",
            shadow_text(&config.shadow),
            config.access_log
        );
        counters::ensure_counter_slots(&HostStore);
        self.loader
            .configure(&HostStore, &config.key_list, now_ns());
        self.loader.set_deferred_publish(true);
        // Envoy's shared data grows as needed; ngx_wasm_module's zone is fixed and traps when
        // full, so there the records are not staged in it (see `Loader::set_staging`).
        self.loader.set_staging(host_has_grpc_calls());
        self.loader.set_rules(keylist::Rules {
            unit_windows: config.global.is_some(),
        });
        let source_id = config.key_list.source_id();
        let grpc_service = config
            .global
            .as_ref()
            .map(|g| String::from_utf8(rls::grpc_service(&g.cluster)).unwrap_or_default())
            .unwrap_or_default();
        // The token's high bits are the VM's place in the order of configuration.
        let metrics = Metrics::define(self.loader.token() >> 24, config.global.is_some());
        self.reporter = config.usage.as_ref().map(Reporter::configure);
        let usage = config
            .usage
            .as_ref()
            .map(|u| RefCell::new(Usage::new(u.max_ids)));
        self.shared = Some(Rc::new(Shared {
            config,
            source_id,
            list: Cell::new(ListState::default()),
            buckets: RefCell::new(BucketCache::default()),
            metrics,
            grpc_service,
            host: Cell::new(None),
            usage,
        }));
        self.refresh_view();
        if let Some(s) = &self.shared {
            s.metrics.vm_memory();
        }
        self.set_tick_period(TICK);
        true
    }

    fn on_tick(&mut self) {
        let Some(s) = self.shared.clone() else { return };
        s.metrics.flush();
        if self.loader.has_pending() {
            let report = self.loader.publish_pending(&HostStore, now_ms());
            self.carry_out(report);
            self.set_tick_period(TICK);
        }
        self.refresh_view();
        let kl = &s.config.key_list;
        let now = now_ms();
        self.record_list_age(now / 1000);
        let (request, report) = self.loader.tick(&HostStore, now);
        self.carry_out(report);
        if let (Some(r), Some(sink)) = (&mut self.reporter, &s.config.usage) {
            r.tick(&s, sink, self.loader.is_leader());
        }
        s.metrics.vm_memory();
        if self.loader.is_leader() {
            s.metrics
                .shared_entries(publish::shared_entries(&HostStore));
        }
        let Some(request) = request else { return };
        let headers: Vec<(&str, &str)> = request
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let result = self.dispatch_http_call(
            &kl.cluster,
            headers,
            None,
            vec![],
            Duration::from_millis(request.timeout_ms),
        );
        if let Err(e) = &result {
            log::warn!(
                "keygate: key list fetch from cluster {:?} could not start: {e:?}",
                kl.cluster
            );
        }
        let report = self.loader.dispatched(result.map_err(|_| ()), now);
        self.carry_out(report);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Http::new(shared)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The shadowed checks, for the log line on load.
fn shadow_text(s: &config::Shadow) -> String {
    let on: Vec<&str> = [
        (s.keys, "keys"),
        (s.ip, "ip"),
        (s.scopes, "scopes"),
        (s.rate_limits, "rate_limits"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| *name)
    .collect();
    if on.is_empty() {
        "off".to_string()
    } else {
        on.join(",")
    }
}
