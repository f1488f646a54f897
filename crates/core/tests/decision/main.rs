//! The decisions of SPEC §3 and the responses of §4, driven natively through
//! `keygate_core::decision::decide`. Every expectation here comes from the SPEC text.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

mod fixtures;
mod global_mode;
mod rate_limit_headers;
mod responses;
mod shadow;
mod step01_identity_headers;
mod step02_client_ip;
mod step03_exempt;
mod step04_list_state;
mod step05_credential;
mod step06_invalid_key_limit;
mod step07_lookup;
mod step08_status;
mod step09_key_ips;
mod step10_sites;
mod step11_routes;
mod step12_rate_limits;
mod step13_allowed;
