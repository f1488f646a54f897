//! keygate-core: everything the keygate proxy-wasm filter decides, with no proxy-wasm dependency,
//! so it is built and tested natively. The filter crate (`crates/filter`, module `keygate.wasm`)
//! only forwards host events here and carries out what comes back; the CLI and the key service
//! reuse the same parsers and validators.

pub mod bucket_cache;
pub mod client_ip;
pub mod config;
pub mod counters;
pub mod credential;
pub mod decision;
pub mod dictionary;
pub mod fuzzing;
pub mod hash_cache;
pub mod ipset;
pub mod json;
pub mod keylist;
pub mod loader;
pub mod path;
pub mod publish;
pub mod ratelimit;
pub mod record;
pub mod response;
pub mod rls;
pub mod routes;
pub mod scan;
pub mod shared;
pub mod time;
pub mod usage;
pub mod varint;
