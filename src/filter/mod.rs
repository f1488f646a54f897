//! The proxy-wasm glue: host calls in, pure decisions out. Everything it decides comes from the
//! host-independent modules of the crate.

mod host;
mod http;
mod metrics;
mod nginx;
mod root;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::Root::default()) });
}}
