//! Shared helpers of the end-to-end tests: temporary mounts that always unmount, a
//! git runner, a fault-injecting object store, and store inspection without a mount.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path as StorePath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use repofs::mount::{spawn_mount_with_store, MountConfig, MountHandle};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Run git in `dir` and return stdout; fails with git's stderr if git fails.
pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = git_cmd(dir, args).output().context("running git")?;
    if !out.status.success() {
        bail!(
            "git {} failed in {}: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run git expecting failure; returns stderr.
pub fn git_fails(dir: &Path, args: &[&str]) -> Result<String> {
    let out = git_cmd(dir, args).output().context("running git")?;
    if out.status.success() {
        bail!("git {} unexpectedly succeeded", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A git command with a fixed identity and no user or system config.
pub fn git_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .env("GIT_TERMINAL_PROMPT", "0");
    c
}

/// The repository key the tests use.
pub const REPO: &str = "org-1/agent-1/repo.git";

/// `git init --bare` of [`REPO`] under the mountpoint `mnt`; returns its path.
pub fn init_bare(root: &Path, mnt: &Path) -> Result<PathBuf> {
    let bare = mnt.join(REPO);
    std::fs::create_dir_all(bare.parent().context("repo has a parent")?)?;
    git(
        root,
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            bare.to_str().context("utf-8 path")?,
        ],
    )?;
    Ok(bare)
}

/// A work repository with `n` commits on `main`, each adding one file.
pub fn make_source(dir: &Path, n: usize) -> Result<PathBuf> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    git(&src, &["init", "-q", "-b", "main"])?;
    for i in 0..n {
        commit_file(&src, &format!("notes/n{i}.md"), &format!("note {i}\n"))?;
    }
    Ok(src)
}

/// Write a file and commit it.
pub fn commit_file(repo: &Path, rel: &str, content: &str) -> Result<String> {
    let p = repo.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&p, content)?;
    git(repo, &["add", "-A"])?;
    git(repo, &["commit", "-q", "-m", &format!("write {rel}")])?;
    Ok(git(repo, &["rev-parse", "HEAD"])?.trim().to_string())
}

/// A test mount in a temporary directory; unmounts when dropped, even on panic.
pub struct TestMount {
    /// The mount, `None` after [`TestMount::remount`] took it down.
    pub handle: Option<MountHandle>,
    /// The config used.
    pub config: MountConfig,
    /// The object store behind it.
    pub store: Arc<dyn ObjectStore>,
}

impl TestMount {
    /// Mount `store` at `root/mnt` with a cache in `root/cache-<tag>`.
    pub fn new(
        root: &Path,
        tag: &str,
        store: Arc<dyn ObjectStore>,
        url: &str,
    ) -> Result<TestMount> {
        Self::with(root, tag, store, url, |_| {})
    }

    /// Like [`TestMount::new`], with a chance to change the config first.
    pub fn with(
        root: &Path,
        tag: &str,
        store: Arc<dyn ObjectStore>,
        url: &str,
        tweak: impl FnOnce(&mut MountConfig),
    ) -> Result<TestMount> {
        let mut config = MountConfig::new(url, root.join(format!("mnt-{tag}")));
        config.cache_dir = root.join(format!("cache-{tag}"));
        config.metadata_ttl = Duration::from_millis(500);
        config.retry.backoff = Duration::from_millis(5);
        config.retry.timeout = Duration::from_secs(10);
        tweak(&mut config);
        let handle = spawn_mount_with_store(&config, store.clone())?;
        Ok(TestMount {
            handle: Some(handle),
            config,
            store,
        })
    }

    /// Mount a `file://` store at `root/store`.
    pub fn local(root: &Path, tag: &str) -> Result<TestMount> {
        let dir = root.join("store");
        std::fs::create_dir_all(&dir)?;
        let store = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&dir)?);
        Self::new(root, tag, store, &format!("file://{}", dir.display()))
    }

    /// The mountpoint.
    pub fn path(&self) -> &Path {
        &self.config.mountpoint
    }

    /// The filesystem core.
    pub fn fs(&self) -> &repofs::Fs {
        self.handle.as_ref().expect("mounted").fs()
    }

    /// Flush and unmount.
    pub fn unmount(&mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            h.unmount()?;
        }
        Ok(())
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.unmount();
        }
        if repofs::mount::is_stale_mount(&self.config.mountpoint) {
            let _ = Command::new("umount").arg(&self.config.mountpoint).status();
        }
    }
}

/// Copy every object of a store into a local directory (no mount involved), so git
/// can inspect exactly what the store holds.
pub async fn export_store(store: &dyn ObjectStore, prefix: &str, dest: &Path) -> Result<usize> {
    use futures::StreamExt;
    let p = StorePath::from(prefix);
    let mut list = store.list(Some(&p));
    let mut n = 0;
    while let Some(meta) = list.next().await {
        let meta = meta?;
        let rel = meta
            .location
            .as_ref()
            .strip_prefix(prefix)
            .unwrap_or(meta.location.as_ref())
            .trim_start_matches('/');
        let out = dest.join(rel);
        std::fs::create_dir_all(out.parent().expect("has parent"))?;
        let data = store
            .get_opts(&meta.location, GetOptions::default())
            .await?
            .bytes()
            .await?;
        std::fs::write(out, data)?;
        n += 1;
    }
    // Git needs these directories even when they hold nothing.
    for d in ["refs/heads", "refs/tags", "objects/pack", "objects/info"] {
        std::fs::create_dir_all(dest.join(d))?;
    }
    Ok(n)
}

/// What the fault injector does to matching requests.
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail PUTs whose key contains this text.
    pub fail_put_containing: Mutex<Option<String>>,
    /// Make every request hang (until the client times out).
    pub hang: AtomicBool,
    /// Count of injected failures.
    pub injected: AtomicU64,
}

/// An object store wrapper that injects failures and hangs.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    /// The switches.
    pub faults: Arc<Faults>,
}

impl FaultyStore {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> (Arc<FaultyStore>, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            Arc::new(FaultyStore {
                inner,
                faults: faults.clone(),
            }),
            faults,
        )
    }

    async fn gate(&self) {
        if self.faults.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }

    fn injected_error(&self, what: &str) -> object_store::Error {
        self.faults.injected.fetch_add(1, Ordering::SeqCst);
        object_store::Error::Generic {
            store: "faulty",
            source: format!("injected failure: {what}").into(),
        }
    }
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &StorePath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.gate().await;
        let pat = self
            .faults
            .fail_put_containing
            .lock()
            .expect("lock")
            .clone();
        if let Some(p) = pat {
            if location.as_ref().contains(&p) {
                return Err(self.injected_error(location.as_ref()));
            }
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &StorePath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.gate().await;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &StorePath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.gate().await;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<StorePath>>,
    ) -> BoxStream<'static, object_store::Result<StorePath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&StorePath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&StorePath>,
    ) -> object_store::Result<ListResult> {
        self.gate().await;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &StorePath,
        to: &StorePath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.gate().await;
        self.inner.copy_opts(from, to, options).await
    }
}

/// Bytes of an object, or None.
pub async fn read_object(store: &dyn ObjectStore, key: &str) -> Option<Bytes> {
    store
        .get_opts(&StorePath::from(key), GetOptions::default())
        .await
        .ok()?
        .bytes()
        .await
        .ok()
}
