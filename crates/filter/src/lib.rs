//! keygate as a proxy-wasm filter (module `keygate.wasm`): host calls in, pure decisions out.
//! Everything it decides comes from `keygate-core`; this crate only reads what the host offers,
//! forwards events and carries out what the core returns. It is compiled for wasm32 only (on
//! other targets the crate is empty, so `cargo build --workspace` works natively).
#![cfg(target_arch = "wasm32")]

/// `timed!(phase, expr)` is `expr`, timed in diagnostic builds (see `phases`).
macro_rules! timed {
    ($phase:expr, $e:expr) => {{
        #[cfg(feature = "phase-timing")]
        let out = crate::phases::time($phase, || $e);
        #[cfg(not(feature = "phase-timing"))]
        let out = {
            let _ = $phase;
            $e
        };
        out
    }};
}

/// The steps of a request that diagnostic builds time (indexes into `phases::NAMES`).
mod phase {
    pub const READ_HEADERS: usize = 1;
    pub const SOURCE: usize = 2;
    pub const NOW: usize = 3;
    pub const DECIDE: usize = 4;
    pub const METRIC: usize = 5;
    pub const WRITE_HEADERS: usize = 6;
    pub const RESPONSE_HEADERS: usize = 7;
    pub const SHARED_GET: usize = 8;
    pub const SHARED_SET: usize = 9;
}

mod host;
mod http;
mod metrics;
mod nginx;
#[cfg(feature = "phase-timing")]
mod phases;
mod root;
mod usage;
mod vm;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    // wasm32 aborts on panic and the host then fails the VM: say why first, at critical level,
    // so the operator's log names the place (the message never holds a key: no key is ever
    // formatted into one).
    std::panic::set_hook(Box::new(|info| {
        let _ = proxy_wasm::hostcalls::log(LogLevel::Critical, &format!("keygate: panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::Root::default()) });
}}
