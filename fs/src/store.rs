//! Store layer: opens a `STORE_URL` as an object store and wraps every request with a
//! timeout, retries with backoff for transient errors, and request counters.
//!
//! Keys handed to this layer are plain `/`-separated strings relative to the store root
//! (the URL's prefix is applied by [`object_store::prefix::PrefixStore`]).

use crate::stats::Stats;
use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{
    GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    UpdateVersion,
};
use std::fmt;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncReadExt;

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL given on the command line cannot be used.
    #[error("invalid store URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it, with a hint.
        reason: String,
    },
    /// The object does not exist.
    #[error("object {0:?} not found in the store")]
    NotFound(String),
    /// A conditional write found that the object was changed by another writer.
    #[error("object {0:?} was changed by another writer")]
    Conflict(String),
    /// The store does not implement the operation.
    #[error("the store does not support {0}")]
    NotSupported(String),
    /// The request did not finish within the configured timeout (after retries).
    #[error("store request {op} {key:?} timed out after {timeout:?}")]
    Timeout {
        /// Operation name.
        op: &'static str,
        /// Key the request was about.
        key: String,
        /// The per-request timeout.
        timeout: Duration,
    },
    /// Any other store failure (after retries).
    #[error("store request {op} {key:?} failed: {source}")]
    Request {
        /// Operation name.
        op: &'static str,
        /// Key the request was about.
        key: String,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// Local I/O while moving data between the store and a local file.
    #[error("local I/O for {key:?}: {source}")]
    Io {
        /// Key the transfer was about.
        key: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Metadata of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the store root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// ETag (or a synthesized version string when the store gives none).
    pub etag: String,
    /// Last modification time.
    pub mtime: SystemTime,
}

impl ObjectInfo {
    fn from_meta(key: String, meta: &ObjectMeta) -> Self {
        let etag = meta.e_tag.clone().unwrap_or_else(|| {
            format!(
                "synth-{}-{}",
                meta.size,
                meta.last_modified.timestamp_nanos_opt().unwrap_or(0)
            )
        });
        ObjectInfo {
            key,
            size: meta.size,
            etag,
            mtime: SystemTime::from(meta.last_modified),
        }
    }
}

/// Result of a listing by delimiter.
#[derive(Debug, Default)]
pub struct DirListing {
    /// Objects directly under the prefix.
    pub objects: Vec<ObjectInfo>,
    /// Child "directories" (common prefixes), as names relative to the listed prefix.
    pub dirs: Vec<String>,
}

/// Which kind of store a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// `file:///abs/path`
    Local(PathBuf),
    /// `memory://`
    Memory,
    /// `s3://bucket[/prefix]`
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix (may be empty).
        prefix: String,
    },
    /// `gs://bucket[/prefix]`
    Gcs {
        /// Bucket name.
        bucket: String,
        /// Key prefix (may be empty).
        prefix: String,
    },
}

impl StoreKind {
    /// Parse a `STORE_URL`.
    pub fn parse(url: &str) -> Result<StoreKind, StoreError> {
        let bad = |reason: &str| StoreError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if url == "memory://" || url == "memory:" {
            return Ok(StoreKind::Memory);
        }
        if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad(
                    "a file:// URL needs an absolute path, e.g. file:///var/lib/repofs/store",
                ));
            }
            return Ok(StoreKind::Local(PathBuf::from(rest)));
        }
        let (scheme, rest) = if let Some(r) = url.strip_prefix("s3://") {
            ("s3", r)
        } else if let Some(r) = url.strip_prefix("gs://") {
            ("gs", r)
        } else {
            return Err(bad(
                "expected file:///abs/path, memory://, s3://bucket[/prefix] or gs://bucket[/prefix]",
            ));
        };
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p.trim_matches('/')),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(bad("the bucket name is empty"));
        }
        if prefix.split('/').any(|s| s == "." || s == "..") {
            return Err(bad("the prefix may not contain '.' or '..' segments"));
        }
        let (bucket, prefix) = (bucket.to_string(), prefix.to_string());
        Ok(if scheme == "s3" {
            StoreKind::S3 { bucket, prefix }
        } else {
            StoreKind::Gcs { bucket, prefix }
        })
    }

    /// Build the object store this URL names. Credentials, region and endpoint of
    /// S3 and GCS come from the environment (`AWS_*`, `GOOGLE_*`).
    pub fn build(&self) -> Result<Arc<dyn ObjectStore>, StoreError> {
        let err = |url: String, e: object_store::Error| StoreError::InvalidUrl {
            url,
            reason: e.to_string(),
        };
        Ok(match self {
            StoreKind::Memory => Arc::new(object_store::memory::InMemory::new()),
            StoreKind::Local(path) => {
                std::fs::create_dir_all(path).map_err(|e| StoreError::InvalidUrl {
                    url: format!("file://{}", path.display()),
                    reason: format!("cannot create the store directory: {e}"),
                })?;
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(path)
                        .map_err(|e| err(format!("file://{}", path.display()), e))?,
                )
            }
            StoreKind::S3 { bucket, prefix } => {
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| err(format!("s3://{bucket}"), e))?;
                with_prefix(Arc::new(s3), prefix)
            }
            StoreKind::Gcs { bucket, prefix } => {
                let gcs = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| err(format!("gs://{bucket}"), e))?;
                with_prefix(Arc::new(gcs), prefix)
            }
        })
    }
}

fn with_prefix(store: Arc<dyn ObjectStore>, prefix: &str) -> Arc<dyn ObjectStore> {
    if prefix.is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Local(p) => write!(f, "file://{}", p.display()),
            StoreKind::Memory => write!(f, "memory://"),
            StoreKind::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreKind::Gcs { bucket, prefix } => write!(f, "gs://{bucket}/{prefix}"),
        }
    }
}

/// Retry and timeout policy of store requests.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Timeout of one attempt.
    pub timeout: Duration,
    /// Attempts after the first one for transient errors.
    pub retries: u32,
    /// Backoff before the first retry; doubled after each.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            timeout: Duration::from_secs(30),
            retries: 4,
            backoff: Duration::from_millis(50),
        }
    }
}

const CAS_UNKNOWN: u8 = 0;
const CAS_SUPPORTED: u8 = 1;
const CAS_UNSUPPORTED: u8 = 2;

/// Outcome of a compare-and-swap write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasSupport {
    /// The store performed the conditional write itself.
    Native,
    /// The store lacks `PutMode::Update`; the caller must serialize writers.
    Emulated,
}

/// An object store with timeouts, retries and counters.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    stats: Arc<Stats>,
    policy: RetryPolicy,
    cas: Arc<AtomicU8>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Store({})", self.inner)
    }
}

fn is_transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

/// Objects larger than this are uploaded with a multipart upload.
const MULTIPART_THRESHOLD: u64 = 32 * 1024 * 1024;
const MULTIPART_CHUNK: usize = 8 * 1024 * 1024;

impl Store {
    /// Wrap an object store.
    pub fn new(inner: Arc<dyn ObjectStore>, stats: Arc<Stats>, policy: RetryPolicy) -> Self {
        Store {
            inner,
            stats,
            policy,
            cas: Arc::new(AtomicU8::new(CAS_UNKNOWN)),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Run `f` with the timeout and retry policy. `f` is called once per attempt.
    async fn run<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        let mut backoff = self.policy.backoff;
        let mut attempt = 0;
        loop {
            let res = tokio::time::timeout(self.policy.timeout, f()).await;
            let retryable = match &res {
                Ok(Ok(_)) => false,
                Ok(Err(e)) => is_transient(e),
                Err(_) => true,
            };
            if retryable && attempt < self.policy.retries {
                attempt += 1;
                Stats::inc(&self.stats.store_retries);
                match &res {
                    Ok(Err(e)) => {
                        tracing::warn!(op, key, attempt, error = %e, "store request failed, retrying")
                    }
                    _ => tracing::warn!(op, key, attempt, "store request timed out, retrying"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            return match res {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(self.map_err(op, key, e)),
                Err(_) => {
                    Stats::inc(&self.stats.store_errors);
                    Err(StoreError::Timeout {
                        op,
                        key: key.to_string(),
                        timeout: self.policy.timeout,
                    })
                }
            };
        }
    }

    fn map_err(&self, op: &'static str, key: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound(key.to_string()),
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => StoreError::Conflict(key.to_string()),
            object_store::Error::NotImplemented { .. }
            | object_store::Error::NotSupported { .. } => {
                StoreError::NotSupported(format!("{op}: {e}"))
            }
            source => {
                Stats::inc(&self.stats.store_errors);
                StoreError::Request {
                    op,
                    key: key.to_string(),
                    source,
                }
            }
        }
    }

    fn path(key: &str) -> StorePath {
        StorePath::from(key)
    }

    /// HEAD an object; `Ok(None)` when it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let path = Self::path(key);
        let res = self
            .run("head", key, || {
                Stats::inc(&self.stats.store_head);
                self.inner.head(&path)
            })
            .await;
        match res {
            Ok(meta) => Ok(Some(ObjectInfo::from_meta(key.to_string(), &meta))),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Download a whole object into memory.
    pub async fn get_bytes(&self, key: &str) -> Result<(Bytes, ObjectInfo), StoreError> {
        let path = Self::path(key);
        let (bytes, meta) = self
            .run("get", key, || async {
                Stats::inc(&self.stats.store_get);
                let r = self.inner.get_opts(&path, GetOptions::default()).await?;
                let meta = r.meta.clone();
                Ok((r.bytes().await?, meta))
            })
            .await?;
        Stats::add(&self.stats.bytes_down, bytes.len() as u64);
        Ok((bytes, ObjectInfo::from_meta(key.to_string(), &meta)))
    }

    /// Download a whole object into `dest` (created or truncated), returning its metadata.
    pub async fn get_to_file(&self, key: &str, dest: &Path) -> Result<ObjectInfo, StoreError> {
        let path = Self::path(key);
        let io = |source| StoreError::Io {
            key: key.to_string(),
            source,
        };
        let stats = &self.stats;
        self.run("get", key, || async {
            Stats::inc(&stats.store_get);
            let r = self.inner.get_opts(&path, GetOptions::default()).await?;
            let meta = r.meta.clone();
            let mut file = std::fs::File::create(dest).map_err(|e| generic_io(dest, e))?;
            let mut stream = r.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                Stats::add(&stats.bytes_down, chunk.len() as u64);
                file.write_all(&chunk).map_err(|e| generic_io(dest, e))?;
            }
            Ok(ObjectInfo::from_meta(key.to_string(), &meta))
        })
        .await
        .map_err(|e| match e {
            StoreError::Request { source, .. }
                if matches!(
                    source,
                    object_store::Error::Generic {
                        store: "local-io",
                        ..
                    }
                ) =>
            {
                io(std::io::Error::other(source.to_string()))
            }
            e => e,
        })
    }

    /// Upload bytes with the given mode.
    async fn put_payload(
        &self,
        key: &str,
        data: Bytes,
        mode: PutMode,
    ) -> Result<ObjectInfo, StoreError> {
        let path = Self::path(key);
        let conditional = !matches!(mode, PutMode::Overwrite);
        let len = data.len() as u64;
        let res = self
            .run("put", key, || {
                if conditional {
                    Stats::inc(&self.stats.store_put_conditional);
                } else {
                    Stats::inc(&self.stats.store_put);
                }
                let opts = PutOptions {
                    mode: mode.clone(),
                    ..Default::default()
                };
                self.inner
                    .put_opts(&path, PutPayload::from_bytes(data.clone()), opts)
            })
            .await?;
        Stats::add(&self.stats.bytes_up, len);
        let etag = match res.e_tag {
            Some(e) => e,
            None => self.head(key).await?.map(|i| i.etag).unwrap_or_default(),
        };
        Ok(ObjectInfo {
            key: key.to_string(),
            size: len,
            etag,
            mtime: SystemTime::now(),
        })
    }

    /// Upload bytes, overwriting any existing object.
    pub async fn put_bytes(&self, key: &str, data: Bytes) -> Result<ObjectInfo, StoreError> {
        self.put_payload(key, data, PutMode::Overwrite).await
    }

    /// Upload a local file, overwriting any existing object. Large files use a
    /// multipart upload and are never held in memory whole.
    pub async fn put_file(&self, key: &str, src: &Path) -> Result<ObjectInfo, StoreError> {
        let io = |source| StoreError::Io {
            key: key.to_string(),
            source,
        };
        let len = std::fs::metadata(src).map_err(io)?.len();
        if len <= MULTIPART_THRESHOLD {
            let data = std::fs::read(src).map_err(io)?;
            return self.put_bytes(key, Bytes::from(data)).await;
        }
        let path = Self::path(key);
        let res = self
            .run("put_multipart", key, || async {
                Stats::inc(&self.stats.store_put);
                let upload = self
                    .inner
                    .put_multipart_opts(&path, Default::default())
                    .await?;
                let mut writer =
                    object_store::WriteMultipart::new_with_chunk_size(upload, MULTIPART_CHUNK);
                let mut file = tokio::fs::File::open(src)
                    .await
                    .map_err(|e| generic_io(src, e))?;
                let mut buf = vec![0u8; MULTIPART_CHUNK];
                loop {
                    let n = file.read(&mut buf).await.map_err(|e| generic_io(src, e))?;
                    if n == 0 {
                        break;
                    }
                    writer.wait_for_capacity(4).await?;
                    writer.write(&buf[..n]);
                }
                writer.finish().await
            })
            .await?;
        Stats::add(&self.stats.bytes_up, len);
        let etag = match res.e_tag {
            Some(e) => e,
            None => self.head(key).await?.map(|i| i.etag).unwrap_or_default(),
        };
        Ok(ObjectInfo {
            key: key.to_string(),
            size: len,
            etag,
            mtime: SystemTime::now(),
        })
    }

    /// Compare-and-swap write: create the object if `expected` is `None`, otherwise
    /// replace it only if its ETag is still `expected`. Returns
    /// [`StoreError::Conflict`] when another writer got there first, and tells whether
    /// the store did the check itself ([`CasSupport::Native`]) or lacks conditional
    /// updates ([`CasSupport::Emulated`], e.g. `LocalFileSystem`), in which case this
    /// method checks with a HEAD first and the caller must serialize writers.
    pub async fn put_cas(
        &self,
        key: &str,
        data: Bytes,
        expected: Option<&str>,
    ) -> Result<(ObjectInfo, CasSupport), StoreError> {
        let mode = match expected {
            None => PutMode::Create,
            Some(etag) => PutMode::Update(UpdateVersion {
                e_tag: Some(etag.to_string()),
                version: None,
            }),
        };
        if self.cas.load(Ordering::Relaxed) != CAS_UNSUPPORTED {
            match self.put_payload(key, data.clone(), mode).await {
                Ok(info) => {
                    if expected.is_some() {
                        self.cas.store(CAS_SUPPORTED, Ordering::Relaxed);
                    }
                    return Ok((info, CasSupport::Native));
                }
                Err(StoreError::NotSupported(what)) => {
                    tracing::info!(%what, "store has no conditional update; serializing ref writes in-process");
                    self.cas.store(CAS_UNSUPPORTED, Ordering::Relaxed);
                }
                Err(StoreError::Conflict(k)) => {
                    // A retried conditional write may have succeeded on an attempt whose
                    // answer was lost; and a writer that stored exactly our bytes leaves
                    // the same state as our write would. Both count as success.
                    if let Ok((current, info)) = self.get_bytes(key).await {
                        if current == data {
                            return Ok((info, CasSupport::Native));
                        }
                    }
                    return Err(StoreError::Conflict(k));
                }
                Err(e) => return Err(e),
            }
        }
        // Emulated: check the current version, then overwrite.
        let current = self.head(key).await?;
        match (expected, current) {
            (None, Some(_)) => return Err(StoreError::Conflict(key.to_string())),
            (Some(_), None) => return Err(StoreError::Conflict(key.to_string())),
            (Some(e), Some(cur)) if cur.etag != e => {
                return Err(StoreError::Conflict(key.to_string()))
            }
            _ => {}
        }
        Stats::inc(&self.stats.store_put_conditional);
        let info = self.put_payload(key, data, PutMode::Overwrite).await?;
        // put_payload counted an unconditional put; move it to the conditional counter.
        self.stats.store_put.fetch_sub(1, Ordering::Relaxed);
        Ok((info, CasSupport::Emulated))
    }

    /// Delete an object; deleting a missing object succeeds.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = Self::path(key);
        match self
            .run("delete", key, || {
                Stats::inc(&self.stats.store_delete);
                self.inner.delete(&path)
            })
            .await
        {
            Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Server-side copy.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let (f, t) = (Self::path(from), Self::path(to));
        self.run("copy", from, || {
            Stats::inc(&self.stats.store_copy);
            self.inner.copy(&f, &t)
        })
        .await
    }

    /// Recursive listing of every object under `prefix` (a directory key, without a
    /// trailing slash; empty for the whole store).
    pub async fn list_recursive(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let p = (!prefix.is_empty()).then(|| Self::path(prefix));
        self.run("list", prefix, || async {
            Stats::inc(&self.stats.store_list);
            let mut out = Vec::new();
            let mut stream = self.inner.list(p.as_ref());
            while let Some(meta) = stream.next().await {
                let meta = meta?;
                out.push(ObjectInfo::from_meta(meta.location.to_string(), &meta));
            }
            Ok(out)
        })
        .await
    }

    /// One level of listing under `prefix` (empty for the store root).
    pub async fn list_dir(&self, prefix: &str) -> Result<DirListing, StoreError> {
        let p = (!prefix.is_empty()).then(|| Self::path(prefix));
        let res = self
            .run("list", prefix, || {
                Stats::inc(&self.stats.store_list);
                self.inner.list_with_delimiter(p.as_ref())
            })
            .await?;
        let strip = |full: &str| -> String {
            let rel = if prefix.is_empty() {
                full
            } else {
                full.strip_prefix(prefix)
                    .map(|r| r.trim_start_matches('/'))
                    .unwrap_or(full)
            };
            rel.to_string()
        };
        Ok(DirListing {
            objects: res
                .objects
                .iter()
                .map(|m| ObjectInfo::from_meta(m.location.to_string(), m))
                .collect(),
            dirs: res
                .common_prefixes
                .iter()
                .map(|p| strip(p.as_ref()))
                .collect(),
        })
    }
}

fn generic_io(path: &Path, e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "local-io",
        source: format!("{}: {e}", path.display()).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(StoreKind::parse("memory://").unwrap(), StoreKind::Memory);
        assert_eq!(
            StoreKind::parse("file:///tmp/x").unwrap(),
            StoreKind::Local("/tmp/x".into())
        );
        assert_eq!(
            StoreKind::parse("s3://b/p/q/").unwrap(),
            StoreKind::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert_eq!(
            StoreKind::parse("gs://b").unwrap(),
            StoreKind::Gcs {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        for bad in ["file://rel/path", "http://x", "s3://", "s3://b/../x", ""] {
            let e = StoreKind::parse(bad).unwrap_err();
            assert!(e.to_string().contains("invalid store URL"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn cas_on_memory_and_local() {
        let dir = tempfile::tempdir().unwrap();
        for inner in [
            Arc::new(object_store::memory::InMemory::new()) as Arc<dyn ObjectStore>,
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap()),
        ] {
            let s = Store::new(inner, Arc::default(), RetryPolicy::default());
            let (a, _) = s.put_cas("r/HEAD", Bytes::from("a"), None).await.unwrap();
            assert!(matches!(
                s.put_cas("r/HEAD", Bytes::from("b"), None).await,
                Err(StoreError::Conflict(_))
            ));
            let (b, _) = s
                .put_cas("r/HEAD", Bytes::from("b"), Some(&a.etag))
                .await
                .unwrap();
            assert_ne!(a.etag, b.etag);
            assert!(matches!(
                s.put_cas("r/HEAD", Bytes::from("c"), Some(&a.etag)).await,
                Err(StoreError::Conflict(_))
            ));
            assert_eq!(s.get_bytes("r/HEAD").await.unwrap().0, Bytes::from("b"));
        }
    }
}
