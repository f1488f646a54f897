//! One HTTP request: read what the decision needs in as few host calls as possible, apply the
//! outcome, and add rate-limit headers to the upstream's response (only there: Envoy also runs
//! the response hook for our own local replies, which carry their headers already).

use super::host::{now_ms, HostStore};
use super::nginx;
use super::phase;
use super::vm::Shared;
use keygate_core::client_ip;
use keygate_core::decision::{self, Request};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::rc::Rc;

pub struct Http {
    shared: Rc<Shared>,
    response_headers: Vec<(String, String)>,
}

impl Http {
    pub fn new(shared: Rc<Shared>) -> Http {
        Http {
            shared,
            response_headers: Vec::new(),
        }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let s = &self.shared;
        let mut headers = timed!(phase::READ_HEADERS, self.get_http_request_headers_bytes());
        // nginx hands over header names as the client wrote them; Envoy's are lowercase already.
        for (k, _) in headers.iter_mut() {
            k.make_ascii_lowercase();
        }
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
        let now = timed!(phase::NOW, now_ms() / 1000);
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
        timed!(phase::METRIC, s.metrics.decision(outcome.kind));
        if let Some(u) = &s.usage {
            u.borrow_mut()
                .record(outcome.key_id.as_deref(), outcome.kind, now);
        }
        if let Some(id) = &outcome.key_id {
            log::debug!("keygate: {:?} for key {id}", outcome.kind);
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
        let nginx = match s.nginx.get() {
            Some(known) => known,
            None => {
                let found = nginx::detect();
                s.nginx.set(Some(found));
                found
            }
        };
        self.response_headers = std::mem::take(&mut outcome.response_headers);
        if nginx {
            nginx::apply(&s.config, &headers, &outcome);
            return Action::Continue;
        }
        // One call per edit: a call that returns nothing is far cheaper than reading the whole
        // map back and replacing it (which makes the host allocate inside the VM).
        timed!(phase::WRITE_HEADERS, {
            for name in &outcome.remove_headers {
                self.set_http_request_header(name, None);
            }
            for (name, value) in &outcome.set_headers {
                self.set_http_request_header(name, Some(value));
            }
            if let Some(path) = &outcome.new_path {
                self.set_http_request_header(":path", Some(path));
            }
        });
        #[cfg(feature = "phase-timing")]
        super::phases::request_done();
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let add = std::mem::take(&mut self.response_headers);
        timed!(phase::RESPONSE_HEADERS, self.add_response_headers(add));
        Action::Continue
    }
}

impl Http {
    /// One `add` per header: reading the map and writing it back costs several times more,
    /// because the host has to allocate the map's copy inside the VM.
    fn add_response_headers(&self, add: Vec<(String, String)>) {
        for (name, value) in add {
            self.add_http_response_header(&name, &value);
        }
    }
}
