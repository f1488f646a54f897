//! One HTTP request: read what the decision needs in as few host calls as possible, apply the
//! outcome, and add rate-limit headers to the upstream's response (only there: Envoy also runs
//! the response hook for our own local replies, which carry their headers already).

use super::host::{now_ms, HostStore};
use super::nginx;
use super::phase;
use super::root::Shared;
use crate::client_ip;
use crate::config::{Config, Edits};
use crate::decision::{self, Request};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::ops::Range;
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
        let mut raw = timed!(phase::READ_HEADERS, request_header_bytes());
        let ranges = pair_ranges(&raw);
        // nginx hands over header names as the client wrote them; Envoy's are lowercase already.
        for (name, _) in &ranges {
            if let Some(name) = raw.get_mut(name.clone()) {
                name.make_ascii_lowercase();
            }
        }
        let headers: Vec<(&str, &[u8])> = ranges
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    std::str::from_utf8(raw.get(k.clone())?).ok()?,
                    raw.get(v.clone())?,
                ))
            })
            .collect();
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

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let add = std::mem::take(&mut self.response_headers);
        timed!(phase::RESPONSE_HEADERS, self.add_response_headers(add));
        Action::Continue
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
}

/// The request headers as the host serialises them (their count, each name's and value's
/// length, then `name\0value\0` for each), in one buffer this VM owns. Parsed in place
/// (`pair_ranges`), a request costs one allocation for its headers instead of two per header
/// as with the SDK's `get_http_request_headers_bytes`.
fn request_header_bytes() -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: on success (status 0) the host hands over a buffer it obtained from this module's
    // `proxy_on_memory_allocate` (the SDK's: a boxed `[u8]` of exactly `size` bytes), which is
    // what the SDK's own `get_map_bytes` takes back with `Vec::from_raw_parts` too.
    unsafe {
        if proxy_get_header_map_pairs(0, &mut data, &mut size) != 0 || data.is_null() {
            return Vec::new();
        }
        Vec::from_raw_parts(data, size, size)
    }
}

/// Byte ranges of each header's name and value in `buf` (see `request_header_bytes`); a
/// malformed buffer yields the pairs before the fault.
fn pair_ranges(buf: &[u8]) -> Vec<(Range<usize>, Range<usize>)> {
    let word = |at: usize| {
        buf.get(at..at.checked_add(4)?)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u32::from_le_bytes(b) as usize)
    };
    let Some(n) = word(0) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(n.min(64));
    let Some(mut p) = n.checked_mul(8).and_then(|x| x.checked_add(4)) else {
        return out;
    };
    for i in 0..n {
        let at = 4 + i * 8;
        let (Some(kl), Some(vl)) = (word(at), word(at + 4)) else {
            break;
        };
        let k = p..p.saturating_add(kl);
        let v = k.end.saturating_add(1)..k.end.saturating_add(1).saturating_add(vl);
        if v.end > buf.len() {
            break;
        }
        p = v.end + 1;
        out.push((k, v));
    }
    out
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
    /// One `add` per header: reading the map and writing it back costs several times more,
    /// because the host has to allocate the map's copy inside the VM.
    fn add_response_headers(&self, add: Vec<(String, String)>) {
        for (name, value) in add {
            self.add_http_response_header(&name, &value);
        }
    }
}
