//! What the root context of a VM shares with every HTTP context it creates.

use super::metrics::Metrics;
use keygate_core::bucket_cache::BucketCache;
use keygate_core::config::Config;
use keygate_core::decision::ListState;
use keygate_core::usage::Usage;
use std::cell::{Cell, RefCell};

/// The configuration and this VM's view of the published list, shared by the root context
/// and every HTTP context of the VM (a VM is single-threaded).
pub struct Shared {
    pub config: Config,
    /// Where the list comes from (`KeyListSource::source_id`), to tell a list fetched for
    /// another configuration.
    pub source_id: String,
    pub list: Cell<ListState>,
    pub buckets: RefCell<BucketCache>,
    pub metrics: Metrics,
    /// Whether the host is nginx (ngx_wasm_module), learnt on the first request.
    pub nginx: Cell<Option<bool>>,
    /// This VM's per-key usage since its last handover (`usage` configured).
    pub usage: Option<RefCell<Usage>>,
}
