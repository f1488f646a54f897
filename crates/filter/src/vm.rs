//! What the root context of a VM shares with every HTTP context it creates.

use super::metrics::Metrics;
use super::nginx::Host;
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
    /// The host (Envoy, or nginx with or without the identity variables), learnt on the
    /// first request.
    pub host: Cell<Option<Host>>,
    /// Global mode: the Rate Limit Service's cluster as a serialised `GrpcService` (what
    /// `dispatch_grpc_call` takes); empty otherwise.
    pub grpc_service: String,
    /// This VM's per-key usage since its last handover (`usage` configured).
    pub usage: Option<RefCell<Usage>>,
}
