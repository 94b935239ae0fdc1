//! Disk cache: whole objects keyed by (store, key, ETag), bounded in bytes with LRU
//! eviction, kept across restarts. Dirty data never lives here: it sits in the staging
//! directory until it is uploaded, and only then is adopted into the cache.

use crate::stats::Stats;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Errors of the cache layer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache directory cannot be used.
    #[error("cache directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Another repofs process holds this cache directory.
    #[error("cache directory {0} is in use by another repofs process (each mount needs its own --cache-dir)")]
    Locked(PathBuf),
    /// Local I/O on a cache or staging file.
    #[error("cache file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<String, (u64, u64)>,
    lru: BTreeMap<u64, String>,
    total: u64,
    tick: u64,
}

impl Index {
    fn touch(&mut self, name: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some((_, t)) = self.entries.get_mut(name) {
            self.lru.remove(t);
            *t = tick;
            self.lru.insert(tick, name.to_string());
        }
    }

    fn add(&mut self, name: String, size: u64) {
        self.remove(&name);
        self.tick += 1;
        self.lru.insert(self.tick, name.clone());
        self.entries.insert(name, (size, self.tick));
        self.total += size;
    }

    fn remove(&mut self, name: &str) -> bool {
        if let Some((size, tick)) = self.entries.remove(name) {
            self.lru.remove(&tick);
            self.total -= size;
            true
        } else {
            false
        }
    }
}

/// The on-disk cache of one mount.
#[derive(Debug)]
pub struct DiskCache {
    data_dir: PathBuf,
    staging_dir: PathBuf,
    capacity: u64,
    store_id: String,
    index: Mutex<Index>,
    stats: Arc<Stats>,
    seq: AtomicU64,
    _lock: File,
}

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Dir {
        path: path.to_path_buf(),
        source,
    }
}

impl DiskCache {
    /// Open (or create) a cache in `dir`, bounded to `capacity` bytes of clean data.
    /// `store_id` names the store so one directory never serves another store's bytes.
    pub fn open(
        dir: &Path,
        capacity: u64,
        store_id: &str,
        stats: Arc<Stats>,
    ) -> Result<DiskCache, CacheError> {
        let data_dir = dir.join("v1").join("data");
        let staging_dir = dir.join("v1").join("staging");
        std::fs::create_dir_all(&data_dir).map_err(dir_err(&data_dir))?;
        std::fs::create_dir_all(&staging_dir).map_err(dir_err(&staging_dir))?;
        let lock_path = dir.join("v1").join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(dir_err(&lock_path))?;
        // A previous daemon that is still exiting holds the lock for a moment.
        let mut tries = 0;
        while lock.try_lock().is_err() {
            tries += 1;
            if tries > 50 {
                return Err(CacheError::Locked(dir.to_path_buf()));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // Staged files of a previous process were never acknowledged: drop them.
        for entry in std::fs::read_dir(&staging_dir).map_err(dir_err(&staging_dir))? {
            let entry = entry.map_err(dir_err(&staging_dir))?;
            let _ = std::fs::remove_file(entry.path());
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&data_dir).map_err(dir_err(&data_dir))? {
            let entry = entry.map_err(dir_err(&data_dir))?;
            let Ok(meta) = entry.metadata() else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.len() != 64 {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            found.push((mtime, name, meta.len()));
        }
        found.sort();
        let mut index = Index::default();
        for (_, name, size) in found {
            index.add(name, size);
        }
        let cache = DiskCache {
            data_dir,
            staging_dir,
            capacity,
            store_id: store_id.to_string(),
            index: Mutex::new(index),
            stats,
            seq: AtomicU64::new(0),
            _lock: lock,
        };
        cache.evict();
        Ok(cache)
    }

    fn name(&self, key: &str, etag: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.store_id.as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        h.update([0]);
        h.update(etag.as_bytes());
        hex::encode(h.finalize())
    }

    /// Open the cached copy of `(key, etag)`, if any.
    pub fn get(&self, key: &str, etag: &str) -> Option<File> {
        let name = self.name(key, etag);
        let mut index = self.index.lock();
        if !index.entries.contains_key(&name) {
            return None;
        }
        match File::open(self.data_dir.join(&name)) {
            Ok(f) => {
                index.touch(&name);
                Some(f)
            }
            Err(_) => {
                index.remove(&name);
                self.update_gauge(&index);
                None
            }
        }
    }

    /// Move `src` (a file in the staging directory) into the cache as `(key, etag)` and
    /// return it opened for reading. Evicts old entries to stay under the bound.
    pub fn adopt(&self, key: &str, etag: &str, src: &Path) -> Result<File, CacheError> {
        let name = self.name(key, etag);
        let dest = self.data_dir.join(&name);
        let io = |source| CacheError::Io {
            path: dest.clone(),
            source,
        };
        std::fs::rename(src, &dest).map_err(io)?;
        let file = File::open(&dest).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        {
            let mut index = self.index.lock();
            index.add(name, size);
        }
        self.evict();
        Ok(file)
    }

    /// Forget a cached object (e.g. it was deleted from the store).
    pub fn remove(&self, key: &str, etag: &str) {
        let name = self.name(key, etag);
        let mut index = self.index.lock();
        if index.remove(&name) {
            let _ = std::fs::remove_file(self.data_dir.join(&name));
        }
        self.update_gauge(&index);
    }

    /// A fresh, unique path in the staging directory (not created).
    pub fn staging_path(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.staging_dir.join(format!("{}-{n}", std::process::id()))
    }

    fn evict(&self) {
        let mut index = self.index.lock();
        while index.total > self.capacity {
            let Some((_, name)) = index.lru.pop_first() else {
                break;
            };
            if let Some((size, _)) = index.entries.remove(&name) {
                index.total -= size;
            }
            let _ = std::fs::remove_file(self.data_dir.join(&name));
            Stats::inc(&self.stats.cache_evictions);
        }
        self.update_gauge(&index);
    }

    fn update_gauge(&self, index: &Index) {
        self.stats.cache_bytes.store(index.total, Ordering::Relaxed);
    }

    /// Bytes of clean data currently cached.
    pub fn used(&self) -> u64 {
        self.index.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn put(cache: &DiskCache, key: &str, etag: &str, data: &[u8]) {
        let p = cache.staging_path();
        std::fs::write(&p, data).unwrap();
        cache.adopt(key, etag, &p).unwrap();
    }

    #[test]
    fn lru_bound_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        {
            let cache = DiskCache::open(dir.path(), 250, "s", stats.clone()).unwrap();
            put(&cache, "a", "1", &[1; 100]);
            put(&cache, "b", "1", &[2; 100]);
            assert!(cache.get("a", "1").is_some()); // a is now most recent
            put(&cache, "c", "1", &[3; 100]); // evicts b
            assert!(cache.get("b", "1").is_none());
            assert!(cache.get("a", "1").is_some());
            assert!(
                cache.get("a", "2").is_none(),
                "another etag is another entry"
            );
            assert_eq!(cache.used(), 200);
            assert!(
                DiskCache::open(dir.path(), 250, "s", stats.clone()).is_err(),
                "a second process cannot share the directory"
            );
        }
        let cache = DiskCache::open(dir.path(), 250, "s", stats.clone()).unwrap();
        let mut buf = Vec::new();
        cache
            .get("c", "1")
            .expect("survives restart")
            .read_to_end(&mut buf)
            .unwrap();
        assert_eq!(buf, vec![3; 100]);
        assert_eq!(cache.used(), 200);
        let other = DiskCache::open(&dir.path().join("o"), 250, "other-store", stats).unwrap();
        assert!(other.get("c", "1").is_none());
    }

    #[test]
    fn oversize_entry_still_readable() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 10, "s", Arc::default()).unwrap();
        let p = cache.staging_path();
        std::fs::write(&p, [7; 50]).unwrap();
        let mut f = cache.adopt("k", "e", &p).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        assert_eq!(buf.len(), 50);
        assert_eq!(cache.used(), 0);
    }
}
