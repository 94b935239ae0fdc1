//! Observability: counters of store requests, cache hits and bytes moved.
//!
//! Every counter is a relaxed atomic; a snapshot is served as JSON from the mount's
//! `.repofs/stats` file so performance claims can be checked from the outside.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by the store, the cache and the filesystem core.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) store_get: AtomicU64,
    pub(crate) store_head: AtomicU64,
    pub(crate) store_put: AtomicU64,
    pub(crate) store_put_conditional: AtomicU64,
    pub(crate) store_delete: AtomicU64,
    pub(crate) store_list: AtomicU64,
    pub(crate) store_copy: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) store_retries: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
    pub(crate) bytes_up: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) cache_evictions: AtomicU64,
    pub(crate) cache_bytes: AtomicU64,
    pub(crate) ref_updates: AtomicU64,
    pub(crate) ref_conflicts: AtomicU64,
}

/// A point-in-time copy of [`Stats`], as served by `.repofs/stats`.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// GET requests (whole-object downloads).
    pub store_get: u64,
    /// HEAD requests.
    pub store_head: u64,
    /// Unconditional PUT requests (including multipart uploads).
    pub store_put: u64,
    /// Conditional PUT requests (ref compare-and-swap).
    pub store_put_conditional: u64,
    /// DELETE requests.
    pub store_delete: u64,
    /// LIST requests (recursive or by delimiter).
    pub store_list: u64,
    /// Server-side COPY requests.
    pub store_copy: u64,
    /// Store requests that failed (after retries).
    pub store_errors: u64,
    /// Store requests that were retried after a transient error.
    pub store_retries: u64,
    /// Bytes downloaded from the store.
    pub bytes_down: u64,
    /// Bytes uploaded to the store.
    pub bytes_up: u64,
    /// Reads served from the disk cache without a store request.
    pub cache_hits: u64,
    /// Reads that had to download the object.
    pub cache_misses: u64,
    /// Cache entries evicted to stay under `--cache-size`.
    pub cache_evictions: u64,
    /// Bytes currently held by clean cache entries.
    pub cache_bytes: u64,
    /// Refs published to the store.
    pub ref_updates: u64,
    /// Ref publications refused because another writer moved the ref.
    pub ref_conflicts: u64,
}

impl StatsSnapshot {
    /// Total number of store requests of every kind.
    pub fn store_requests(&self) -> u64 {
        self.store_get
            + self.store_head
            + self.store_put
            + self.store_put_conditional
            + self.store_delete
            + self.store_list
            + self.store_copy
    }
}

impl Stats {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Take a snapshot of every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            store_get: l(&self.store_get),
            store_head: l(&self.store_head),
            store_put: l(&self.store_put),
            store_put_conditional: l(&self.store_put_conditional),
            store_delete: l(&self.store_delete),
            store_list: l(&self.store_list),
            store_copy: l(&self.store_copy),
            store_errors: l(&self.store_errors),
            store_retries: l(&self.store_retries),
            bytes_down: l(&self.bytes_down),
            bytes_up: l(&self.bytes_up),
            cache_hits: l(&self.cache_hits),
            cache_misses: l(&self.cache_misses),
            cache_evictions: l(&self.cache_evictions),
            cache_bytes: l(&self.cache_bytes),
            ref_updates: l(&self.ref_updates),
            ref_conflicts: l(&self.ref_conflicts),
        }
    }
}
