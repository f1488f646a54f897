//! One HTTP request: read what the decision needs in as few host calls as possible, apply the
//! outcome, and set rate-limit headers on the upstream's response, replacing any of the same
//! name the upstream sent (SPEC §4; only there: Envoy also runs the response hook for our own
//! local replies, which carry their headers already). In global mode a request whose key has
//! limits is paused while the Rate Limit Service is asked (`dispatch_grpc_call`), and resumed
//! once `decision::settle` decided on its answer.

use super::host::{now_ms, HostStore};
use super::nginx::{self, Host};
use super::phase;
use super::vm::Shared;
use keygate_core::client_ip;
use keygate_core::config::{Config, Edits};
use keygate_core::decision::{self, GlobalAnswer, Kind, Outcome, Request};
use keygate_core::response::Class;
use keygate_core::rls;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType};
use std::rc::Rc;
use std::time::Duration;

/// gRPC status `DEADLINE_EXCEEDED`: the call outlived `rate_limit.global.timeout_ms`.
const GRPC_DEADLINE_EXCEEDED: u32 = 4;

pub struct Http {
    shared: Rc<Shared>,
    response_headers: Vec<(String, String)>,
    /// Global mode: the outcome waiting for the Rate Limit Service's answer, and when the
    /// call went out (Unix ms).
    pending: Option<(Outcome, u64)>,
}

impl Http {
    pub fn new(shared: Rc<Shared>) -> Http {
        Http {
            shared,
            response_headers: Vec::new(),
            pending: None,
        }
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, _token_id: u32, status_code: u32, response_size: usize) {
        let Some((pending, sent_ms)) = self.pending.take() else {
            return;
        };
        let body = if status_code == 0 {
            hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        // Envoy ends a call that outlived its timeout as an upstream 504, which gRPC maps to
        // UNAVAILABLE: a failure at the deadline is a timeout (`rls::failed_on_deadline`).
        let timeout_ms = self
            .shared
            .config
            .global
            .as_ref()
            .map_or(0, |g| g.timeout_ms);
        let answer = match status_code {
            0 => GlobalAnswer::Reply(&body),
            GRPC_DEADLINE_EXCEEDED => GlobalAnswer::Timeout,
            _ if rls::failed_on_deadline(now_ms().saturating_sub(sent_ms), timeout_ms) => {
                GlobalAnswer::Timeout
            }
            _ => GlobalAnswer::Unavailable,
        };
        let outcome = self.settle(pending, answer, sent_ms);
        if self.apply(outcome, &[], sent_ms / 1000) == Action::Continue
            && hostcalls::resume_http_request().is_err()
        {
            log::warn!("keygate: could not resume the request after the rate limit service");
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let s = &self.shared;
        let mut owned = timed!(phase::READ_HEADERS, self.get_http_request_headers_bytes());
        // nginx hands over header names as the client wrote them; Envoy's are lowercase already.
        for (name, _) in owned.iter_mut() {
            name.make_ascii_lowercase();
        }
        let headers = decision::header_refs(&owned);
        let source = || {
            timed!(
                phase::SOURCE,
                hostcalls::get_property(vec!["source", "address"])
            )
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| client_ip::connection_address(&v))
        };
        let req = Request {
            headers: &headers,
            source: &source,
        };
        let mut list = s.list.get();
        let t_ms = timed!(phase::NOW, now_ms());
        let now = t_ms / 1000;
        let mut outcome = timed!(
            phase::DECIDE,
            decision::decide_cached(
                &s.config,
                &mut list,
                &mut s.buckets.borrow_mut(),
                &HostStore,
                &req,
                now,
            )
        );
        s.list.set(list);
        if let (Some(check), Some(global)) = (outcome.global.as_deref(), &s.config.global) {
            let message = check.request(&global.domain);
            let call = hostcalls::dispatch_grpc_call(
                &s.grpc_service,
                rls::SERVICE,
                rls::METHOD,
                Vec::new(),
                Some(&message),
                Duration::from_millis(global.timeout_ms),
            );
            if call.is_ok() {
                self.pending = Some((outcome, t_ms));
                return Action::Pause;
            }
            outcome = self.settle(outcome, GlobalAnswer::Unavailable, t_ms);
        }
        self.apply(outcome, &headers, now)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let set = std::mem::take(&mut self.response_headers);
        timed!(phase::RESPONSE_HEADERS, self.set_response_headers(set));
        Action::Continue
    }
}

impl Http {
    /// `decision::settle` with the metrics of the global call.
    fn settle(&self, pending: Outcome, answer: GlobalAnswer, sent_ms: u64) -> Outcome {
        let s = &self.shared;
        let (outcome, result) =
            decision::settle(&s.config, &HostStore, pending, answer, sent_ms, now_ms());
        s.metrics.global(result);
        outcome
    }

    /// Carries out a decided outcome: a local reply, or the request's edits. `Continue` when
    /// the request goes on upstream.
    /// `now_s`: Unix seconds the request was decided at (for usage's last-used time).
    fn apply(&mut self, mut outcome: Outcome, headers: &[(&str, &[u8])], now_s: u64) -> Action {
        let s = &self.shared;
        let host = match s.host.get() {
            Some(known) => known,
            None => {
                let found = nginx::detect(&s.config);
                s.host.set(Some(found));
                found
            }
        };
        if host == Host::NginxUnmapped && outcome.reply.is_none() {
            // Fail closed: this request would reach the upstream with whatever identity
            // headers the client sent (see `nginx::Host`).
            outcome.kind = Kind::Refused(Class::Unavailable);
            outcome.reply = Some(decision::refusal(&s.config, Class::Unavailable, None));
        }
        timed!(phase::METRIC, s.metrics.decision(outcome.kind));
        if let Some(u) = &s.usage {
            u.borrow_mut()
                .record(outcome.key_id.as_deref(), outcome.kind, now_s);
        }
        if let Kind::Shadow(class) = outcome.kind {
            log::info!(
                "keygate: shadow: would refuse {} (key {}), letting it through",
                class.name(),
                outcome.key_id.as_deref().unwrap_or("-")
            );
        } else if let Some(id) = &outcome.key_id {
            log::debug!("keygate: {:?} for key {id}", outcome.kind);
        }
        if s.config.access_log {
            record_decision(&outcome);
        }

        if let Some(reply) = outcome.reply {
            let headers: Vec<(&str, &str)> = reply
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes()))
                .is_err()
            {
                log::error!("keygate: could not send the local reply");
            }
            return Action::Pause;
        }
        self.response_headers = std::mem::take(&mut outcome.response_headers);
        if host == Host::Nginx {
            nginx::apply(&s.config, headers, &outcome);
            return Action::Continue;
        }
        // One call per edit: a call that returns nothing is far cheaper than reading the whole
        // map back and replacing it (which makes the host allocate inside the VM).
        timed!(phase::WRITE_HEADERS, {
            match s.config.edits {
                Edits::Filter => {
                    for name in &outcome.remove_headers {
                        self.set_http_request_header(name, None);
                    }
                    for (name, value) in &outcome.set_headers {
                        self.set_http_request_header(name, Some(value));
                    }
                }
                // The route removes the credential and identity headers and adds the identity
                // from the filter state: no request-header edit from here (each one makes Envoy
                // clear the stream's route cache), one property per identity value.
                Edits::EnvoyRoute => {
                    for (name, value) in &outcome.set_headers {
                        if let Some(state) = filter_state_name(&s.config, name) {
                            let _ = hostcalls::set_property(vec![state], Some(value.as_bytes()));
                        }
                    }
                }
            }
            if let Some(path) = &outcome.new_path {
                self.set_http_request_header(":path", Some(path));
            }
        });
        #[cfg(feature = "phase-timing")]
        super::phases::request_done();
        Action::Continue
    }
}

/// `access_log`: the decision class and the key's id (never the key) in the stream's filter
/// state, where Envoy's access log reads them (`%FILTER_STATE(wasm.keygate_decision:PLAIN)%`,
/// `%FILTER_STATE(wasm.keygate_decision_key_id:PLAIN)%`). One or two host calls, only when
/// asked for. The id has its own entry: `wasm.keygate_key_id` is `upstream.edits:
/// "envoy_route"`'s identity, which the route sends upstream, and a refused or shadowed key's
/// id must never become one.
fn record_decision(o: &Outcome) {
    let class = o.kind.name();
    let _ = hostcalls::set_property(vec!["keygate_decision"], Some(class.as_bytes()));
    if let Some(id) = &o.key_id {
        let _ = hostcalls::set_property(vec!["keygate_decision_key_id"], Some(id.as_bytes()));
    }
}

/// The filter-state entry (`set_property` name; Envoy stores it as `wasm.<name>`) that carries
/// an identity header's value in `upstream.edits: "envoy_route"`.
fn filter_state_name(cfg: &Config, header: &str) -> Option<&'static str> {
    if cfg.key_id_header.as_deref() == Some(header) {
        Some("keygate_key_id")
    } else if cfg.owner_header.as_deref() == Some(header) {
        Some("keygate_owner")
    } else {
        None
    }
}

impl Http {
    /// One `replace` per header (SPEC §4: keygate's value replaces every one of that name the
    /// upstream sent, so the client sees one): reading the map and writing it back costs several
    /// times more, because the host has to allocate the map's copy inside the VM.
    fn set_response_headers(&self, set: Vec<(String, String)>) {
        for (name, value) in set {
            self.set_http_response_header(&name, Some(&value));
        }
    }
}
