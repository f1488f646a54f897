//! `SharedStore` over proxy-wasm shared data, and the clock.

use keygate_core::shared::{SetError, SharedStore};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use std::time::{Duration, UNIX_EPOCH};

pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match timed!(super::phase::SHARED_GET, hostcalls::get_shared_data(key)) {
            // The SDK reports an existing empty value as no value: it exists when it has a CAS.
            Ok((None, Some(cas))) => (Some(Vec::new()), Some(cas)),
            Ok(found) => found,
            Err(_) => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match timed!(
            super::phase::SHARED_SET,
            hostcalls::set_shared_data(key, Some(value), cas)
        ) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(_) => Err(SetError::Failed),
        }
    }
}

/// Milliseconds since the Unix epoch by the host's clock.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// Nanoseconds since the Unix epoch by the host's clock (wraps; for salts, not for time).
pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or(Duration::ZERO)
        .as_nanos() as u64
}
