//! keygate key service (SPEC §7): owns the API keys in a database (SQLite by default, PostgreSQL
//! for several replicas), serves the key-list document of SPEC §2 to every gateway at
//! `GET /v1/keys`, and offers the admin API under `/v1/admin/`. [`ServeArgs`] and [`run`] are the
//! `keygate keyservice` command; [`KeysCommand`] and [`run_keys`] are the `keygate keys …`
//! client commands that speak to the admin API.
//!
//! Everything here is native code: none of it is in the wasm module.

#![warn(missing_docs)]

mod api;
mod client;
mod document;
mod error;
mod metrics;
mod model;
mod serve;
mod store;
mod util;

pub use client::{run_keys, ClientArgs, KeysCommand};
pub use serve::{run, serve, start, Running, ServeArgs};
pub use util::base62_fixed;
