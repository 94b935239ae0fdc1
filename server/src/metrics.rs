//! Server counters, served with the filesystem's at `GET /v1/stats`, so performance
//! claims (pack reuse, sync counts) can be checked on a running server.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters of the server.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packs built by libgit2.
    pub packs_built: AtomicU64,
    /// Full-clone packs served from the pack cache.
    pub pack_cache_hits: AtomicU64,
    /// Pushes that moved at least one ref.
    pub pushes: AtomicU64,
    /// Block syncs that changed the database.
    pub syncs: AtomicU64,
    /// Block sync attempts that failed (and were retried).
    pub sync_failures: AtomicU64,
}

impl Counters {
    /// Add one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A JSON snapshot.
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "packs_built": g(&self.packs_built),
            "pack_cache_hits": g(&self.pack_cache_hits),
            "pushes": g(&self.pushes),
            "syncs": g(&self.syncs),
            "sync_failures": g(&self.sync_failures),
        })
    }
}
