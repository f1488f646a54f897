//! The trivial API-key filter (configuration T of `make bench`). The plugin configuration is
//! the list of accepted keys' SHA-256, one lowercase hex digest per line. Per request:
//! `x-api-key` read with one host call, hashed, looked up; unknown or missing → 401. Known →
//! the shared counter `trivial/count` is read and written back with its CAS (one attempt, a
//! mismatch is ignored), and three `x-ratelimit-*` headers are added to the response.
//!
//! With `spec-io` as the configuration's first line (configuration S of `make bench`), it also
//! makes every host call SPEC.md asks of keygate on that request, and nothing else: the whole
//! header map is read (a repeated credential must be seen, §3 step 5) and `x-api-key` found in
//! it, the connection's address read (`source.address`, for the IP lists of §3 steps 2 and 9),
//! the clock read (rate-limit windows), and, on an allowed request, the credential removed and
//! the key's id and owner set as request headers (§4), the response's rate-limit headers
//! replacing the upstream's (§4). S − T is what the contract's I/O costs any filter; D − S is
//! what keygate's own logic adds on top of the cheapest filter that keeps the contract.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(TrivialRoot { keys: Rc::new(HashMap::new()), spec_io: false })
    });
}}

const COUNTER: &str = "trivial/count";
const LIMIT: u64 = 4_000_000_000;

struct TrivialRoot {
    keys: Rc<HashMap<[u8; 32], u32>>,
    spec_io: bool,
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let b = s.trim().as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let hi = (*pair.first()? as char).to_digit(16)?;
        let lo = (*pair.get(1)? as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl Context for TrivialRoot {}

impl RootContext for TrivialRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = self
            .get_plugin_configuration()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        let keys: HashMap<[u8; 32], u32> = text
            .lines()
            .filter_map(unhex)
            .enumerate()
            .map(|(i, h)| (h, i as u32))
            .collect();
        self.keys = Rc::new(keys);
        self.spec_io = text.lines().next() == Some("spec-io");
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Trivial {
            keys: self.keys.clone(),
            count: None,
            spec_io: self.spec_io,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Trivial {
    keys: Rc<HashMap<[u8; 32], u32>>,
    count: Option<u64>,
    spec_io: bool,
}

impl Context for Trivial {}

impl HttpContext for Trivial {
    fn on_http_request_headers(&mut self, _n: usize, _end: bool) -> Action {
        let key = if self.spec_io {
            let found = self
                .get_http_request_headers_bytes()
                .into_iter()
                .find(|(name, _)| name == "x-api-key")
                .map(|(_, value)| value);
            let _source = hostcalls::get_property(vec!["source", "address"]);
            let _now = hostcalls::get_current_time();
            found
        } else {
            self.get_http_request_header_bytes("x-api-key")
        };
        let known = key
            .map(|k| {
                let h: [u8; 32] = Sha256::digest(&k).into();
                self.keys.get(&h).copied()
            })
            .unwrap_or(None);
        let Some(index) = known else {
            self.send_http_response(401, vec![], Some(b"unauthorized"));
            return Action::Pause;
        };
        let (count, cas) = match hostcalls::get_shared_data(COUNTER) {
            Ok((Some(v), cas)) => (
                v.get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or(0),
                cas,
            ),
            Ok((None, cas)) => (0, cas),
            Err(_) => (0, None),
        };
        let next = count + 1;
        let _ = hostcalls::set_shared_data(COUNTER, Some(&next.to_le_bytes()), cas);
        self.count = Some(next);
        if self.spec_io {
            self.set_http_request_header("x-api-key", None);
            self.set_http_request_header("x-api-key-id", Some(&format!("key-{index}")));
            self.set_http_request_header("x-api-key-owner", Some(&format!("org-{index}")));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _end: bool) -> Action {
        if let Some(n) = self.count {
            let headers = [
                ("x-ratelimit-limit", LIMIT.to_string()),
                ("x-ratelimit-remaining", LIMIT.saturating_sub(n).to_string()),
                ("x-ratelimit-reset", "60".to_string()),
            ];
            for (name, value) in headers {
                if self.spec_io {
                    self.set_http_response_header(name, Some(&value));
                } else {
                    self.add_http_response_header(name, &value);
                }
            }
        }
        Action::Continue
    }
}
