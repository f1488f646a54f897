//! keygate: API-key authentication, IP allow lists and exact per-key rate limits for any HTTP API,
//! as a proxy-wasm filter. Everything outside `filter` is pure Rust that knows nothing of the host
//! ABI, so it is unit-tested natively; `filter` is the thin proxy-wasm glue (wasm32 only).

pub mod bucket_cache;
pub mod client_ip;
pub mod config;
pub mod credential;
pub mod decision;
pub mod dictionary;
pub mod ipset;
pub mod keylist;
pub mod path;
pub mod ratelimit;
pub mod record;
pub mod response;
pub mod routes;
pub mod scan;
pub mod shared;
pub mod time;

#[cfg(target_arch = "wasm32")]
mod filter;
