//! Mounting: turns a [`MountConfig`] into a running filesystem, in-process
//! ([`spawn_mount`], used by the server and the tests) or for the `repofs` binary.

use crate::cache::DiskCache;
use crate::fs::{Fs, FsConfig};
use crate::fuse::{FuseFs, KernelInvalidator};
use crate::refs::RefUpdated;
use crate::stats::Stats;
use crate::store::{RetryPolicy, Store, StoreKind};
use object_store::ObjectStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Errors of setting up a mount.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The store URL or store settings are unusable.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The cache directory is unusable.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// The mountpoint is unusable or the kernel refused the mount.
    #[error("cannot mount at {path}: {reason}")]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// What went wrong, with a hint.
        reason: String,
    },
    /// Unmounting failed.
    #[error("unmount of {path} failed: {source}")]
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Flushing pending writes before unmounting failed.
    #[error("pending writes could not be flushed: {0}")]
    Flush(crate::error::FsError),
}

/// Everything a mount needs.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// `file:///abs/path`, `memory://`, `s3://bucket[/prefix]` or `gs://bucket[/prefix]`.
    pub store_url: String,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Disk cache and staging directory.
    pub cache_dir: PathBuf,
    /// Bound of the disk cache in bytes.
    pub cache_size: u64,
    /// How long listings and attributes are trusted.
    pub metadata_ttl: Duration,
    /// Refuse every write with EROFS.
    pub read_only: bool,
    /// Let other users access the mount (`allow_other`).
    pub allow_other: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// Store request timeout and retries.
    pub retry: RetryPolicy,
}

impl MountConfig {
    /// A configuration with the defaults for everything but the store and mountpoint.
    pub fn new(store_url: impl Into<String>, mountpoint: impl Into<PathBuf>) -> Self {
        let store_url = store_url.into();
        MountConfig {
            cache_dir: default_cache_dir(&store_url),
            store_url,
            mountpoint: mountpoint.into(),
            cache_size: 2 << 30,
            metadata_ttl: Duration::from_secs(1),
            read_only: false,
            allow_other: false,
            threads: 8,
            retry: RetryPolicy::default(),
        }
    }
}

/// `$XDG_CACHE_HOME/repofs/<hash of the store URL>` (or `~/.cache/...`).
pub fn default_cache_dir(store_url: &str) -> PathBuf {
    use sha2::Digest;
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    let h = hex::encode(sha2::Sha256::digest(store_url.as_bytes()));
    base.join("repofs").join(&h[..16])
}

/// Parse a byte size with an optional K/M/G/T suffix (powers of 1024): `512M`, `2G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&t[..i], mult)
        }
        None => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. 512M or 2G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// A mounted filesystem. Dropping it flushes and unmounts.
pub struct MountHandle {
    fs: Fs,
    session: Option<fuser::BackgroundSession>,
    runtime: Option<tokio::runtime::Runtime>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MountHandle({})", self.mountpoint.display())
    }
}

/// Whether `path` is a mountpoint whose FUSE daemon is gone ("Transport endpoint is
/// not connected").
pub fn is_stale_mount(path: &Path) -> bool {
    matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Whether `/proc/mounts` lists a FUSE mount at `path`. Reading the mount table never
/// touches the mount itself, so it cannot hang on a dead daemon.
fn fuse_mount_listed(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().any(|l| {
        let mut f = l.split(' ');
        let (_src, dir, fstype) = (f.next(), f.next(), f.next().unwrap_or(""));
        dir.map(|d| d.replace("\\040", " ")) == Some(want.to_string()) && fstype.starts_with("fuse")
    })
}

/// How a mountpoint that is already mounted answers.
enum Probe {
    /// It answers: a live daemon serves it.
    Alive,
    /// ENOTCONN: the daemon is gone and the kernel knows it.
    Disconnected,
    /// No answer: the daemon died while its own threads were inside the mount, so the
    /// connection is held open by a process that will never answer.
    Hung,
}

fn probe(path: &Path) -> Probe {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    // The stat may block until the connection is aborted; never wait on it inline.
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::metadata(&p).map_err(|e| e.raw_os_error()));
    });
    match rx.recv_timeout(Duration::from_secs(2)) {
        Ok(Ok(_)) => Probe::Alive,
        Ok(Err(Some(libc::ENOTCONN))) => Probe::Disconnected,
        Ok(Err(_)) => Probe::Alive,
        Err(_) => Probe::Hung,
    }
}

/// Run an unmount helper, giving up after 10 s (umount(8) can block on a hung mount).
fn run_ok(cmd: &str, args: &[&str], path: &Path) -> bool {
    let Ok(mut child) = std::process::Command::new(cmd)
        .args(args)
        .arg(path)
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    for _ in 0..100 {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => return false,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// The FUSE connection id of the mount at `path` (the minor of its device number),
/// from `/proc/self/mountinfo`.
fn fuse_connection_id(path: &Path) -> Option<u32> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4).map(|d| d.replace("\\040", " ")) == Some(want.to_string()))
            .then(|| f.get(2)?.split(':').nth(1)?.parse().ok())
            .flatten()
    })
}

/// Abort a FUSE connection through the fusectl filesystem (mounting it if needed):
/// every request waiting on it fails, so a dead daemon's stuck threads can exit.
fn abort_fuse_connection(path: &Path) -> bool {
    let Some(id) = fuse_connection_id(path) else {
        return false;
    };
    let ctl = Path::new("/sys/fs/fuse/connections");
    if !ctl.join(id.to_string()).exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "fusectl"])
            .arg(ctl)
            .stderr(std::process::Stdio::null())
            .status();
    }
    let ok = std::fs::write(ctl.join(id.to_string()).join("abort"), "1").is_ok();
    if ok {
        tracing::warn!(mountpoint = %path.display(), connection = id, "aborted the FUSE connection of a dead daemon");
    }
    ok
}

/// Clear a stale mount left by a killed daemon, or explain how to. A mount whose
/// daemon still answers is refused rather than mounted over.
fn clear_stale(path: &Path) -> Result<(), MountError> {
    if !fuse_mount_listed(path) {
        return Ok(());
    }
    match probe(path) {
        Probe::Alive => {
            return Err(MountError::Mount {
                path: path.to_path_buf(),
                reason: "something is already mounted there and answering; unmount it first".into(),
            })
        }
        Probe::Disconnected => {
            tracing::warn!(mountpoint = %path.display(), "mountpoint is stale (a previous daemon died); unmounting it")
        }
        Probe::Hung => tracing::warn!(
            mountpoint = %path.display(),
            "mountpoint does not answer (a previous daemon died inside it); aborting the FUSE connection"
        ),
    }
    // A hung connection must be aborted first: that is what lets the dead daemon's
    // threads, stuck inside its own mount, finish (and its clients see the connection
    // close). A plain umount would only detach the mount and leave them waiting.
    let _ = abort_fuse_connection(path);
    let _ = run_ok("umount", &[], path)
        || run_ok("umount", &["-f"], path)
        || run_ok("fusermount3", &["-u"], path);
    for _ in 0..50 {
        if !fuse_mount_listed(path) {
            return Ok(());
        }
        if run_ok("umount", &[], path) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(MountError::Mount {
        path: path.to_path_buf(),
        reason: format!(
            "a stale mount is in the way; run `umount -f {}` (as root) or `fusermount3 -u {}`",
            path.display(),
            path.display()
        ),
    })
}

/// Mount the store named by `config.store_url`.
pub fn spawn_mount(config: &MountConfig) -> Result<MountHandle, MountError> {
    let kind = StoreKind::parse(&config.store_url)?;
    let store = kind.build()?;
    spawn_mount_with_store(config, store)
}

/// Mount an already-built object store (tests use this to inject faults).
pub fn spawn_mount_with_store(
    config: &MountConfig,
    object_store: Arc<dyn ObjectStore>,
) -> Result<MountHandle, MountError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("repofs-io")
        .enable_all()
        .build()
        .map_err(|e| MountError::Mount {
            path: config.mountpoint.clone(),
            reason: format!("cannot start the I/O runtime: {e}"),
        })?;
    // Clear a dead daemon's mount first: aborting its connection is what lets it
    // exit and release the cache directory's lock.
    clear_stale(&config.mountpoint)?;
    let fs = build_fs(config, object_store, runtime.handle().clone())?;
    std::fs::create_dir_all(&config.mountpoint).map_err(|e| MountError::Mount {
        path: config.mountpoint.clone(),
        reason: format!("cannot create the mountpoint: {e}"),
    })?;
    let mut options = vec![
        fuser::MountOption::FSName(format!("repofs:{}", config.store_url)),
        fuser::MountOption::Subtype("repofs".into()),
        fuser::MountOption::NoAtime,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if config.read_only {
        options.push(fuser::MountOption::RO);
    }
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = options;
    fuse_config.n_threads = Some(config.threads.max(1));
    fuse_config.clone_fd = config.threads > 1;
    if config.allow_other {
        fuse_config.acl = fuser::SessionACL::All;
    }
    let adapter = FuseFs::new(fs.clone(), runtime.handle().clone());
    let session = fuser::spawn_mount(adapter, &config.mountpoint, &fuse_config).map_err(|e| {
        MountError::Mount {
            path: config.mountpoint.clone(),
            reason: if e.kind() == std::io::ErrorKind::PermissionDenied {
                format!("{e} (mounting needs root, or fusermount3 from the fuse3 package)")
            } else {
                e.to_string()
            },
        }
    })?;
    fs.set_invalidator(Arc::new(KernelInvalidator::start(session.notifier())));
    tracing::info!(
        store = %config.store_url,
        mountpoint = %config.mountpoint.display(),
        cache_dir = %config.cache_dir.display(),
        cache_size = config.cache_size,
        metadata_ttl = ?config.metadata_ttl,
        read_only = config.read_only,
        "mounted"
    );
    Ok(MountHandle {
        fs,
        session: Some(session),
        runtime: Some(runtime),
        mountpoint: config.mountpoint.clone(),
    })
}

/// Build the filesystem core without mounting it.
pub fn build_fs(
    config: &MountConfig,
    object_store: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Handle,
) -> Result<Fs, MountError> {
    let stats = Arc::new(Stats::default());
    let store = Store::new(object_store, stats.clone(), config.retry.clone());
    let cache = DiskCache::open(
        &config.cache_dir,
        config.cache_size,
        &config.store_url,
        stats.clone(),
    )?;
    let fs_config = FsConfig {
        metadata_ttl: config.metadata_ttl,
        read_only: config.read_only,
        uid: current_uid(),
        gid: current_gid(),
        upload_concurrency: 16,
    };
    Ok(Fs::new(store, cache, fs_config, stats, rt))
}

fn current_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0)
}

fn current_gid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .unwrap_or(0)
}

impl MountHandle {
    /// The filesystem core behind the mount.
    pub fn fs(&self) -> &Fs {
        &self.fs
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The filesystem's own I/O runtime; run core futures (such as
    /// [`Fs::revalidate`]) on it from other runtimes.
    pub fn io_handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }

    /// Subscribe to ref events.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<RefUpdated> {
        self.fs.subscribe()
    }

    /// Whether the FUSE session has ended (e.g. someone ran `umount`).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Run a future on the filesystem's own runtime and wait for it. Safe to call from
    /// any thread, including inside another tokio runtime's blocking section.
    fn run_blocking<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let rt = self.runtime.as_ref()?;
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().ok()
    }

    /// Flush pending writes to the store.
    pub fn flush(&self) -> Result<(), MountError> {
        let fs = self.fs.clone();
        match self.run_blocking(async move { fs.flush_all().await }) {
            Some(Err(e)) => Err(MountError::Flush(e)),
            _ => Ok(()),
        }
    }

    /// Flush pending writes, then unmount. Blocks; from async code call it inside
    /// `spawn_blocking`.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), MountError> {
        let flushed = if self
            .session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished())
        {
            self.flush()
        } else {
            Ok(())
        };
        let mut result = flushed;
        if let Some(session) = self.session.take() {
            if let Err(e) = session.umount_and_join() {
                // Busy for a moment (a process that used the mount is still exiting):
                // the session keeps serving, so retry for a few seconds.
                let retried = e.raw_os_error() == Some(libc::EBUSY)
                    && (0..50).any(|_| {
                        std::thread::sleep(Duration::from_millis(100));
                        run_ok("umount", &[], &self.mountpoint)
                    });
                // The kernel may already have dropped the mount (external umount).
                if !retried
                    && (is_stale_mount(&self.mountpoint) || e.raw_os_error() != Some(libc::EINVAL))
                {
                    result = result.and(Err(MountError::Unmount {
                        path: self.mountpoint.clone(),
                        source: e,
                    }));
                }
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        tracing::info!(mountpoint = %self.mountpoint.display(), "unmounted");
        result
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if self.session.is_some() {
            if let Err(e) = self.shutdown() {
                tracing::error!(error = %e, "unmount on drop failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
