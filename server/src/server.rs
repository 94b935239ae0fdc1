//! Startup and shutdown: database, in-process mount, HTTP listener, and the graceful
//! drain → flush → unmount sequence.

use crate::auth::TrustPolicy;
use crate::db::Db;
use crate::git::{PackOptions, PushPolicy};
use crate::http::{self, AppState};
use crate::sync::SyncManager;
use anyhow::{bail, Context, Result};
use parking_lot::Mutex;
use repofs::mount::{self, MountConfig, MountHandle};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Everything `repofs-server serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// STORE_URL of the filesystem.
    pub store_url: String,
    /// `sqlite://...` or `postgres://...`
    pub database_url: String,
    /// Where to mount the store.
    pub mount_dir: PathBuf,
    /// The filesystem's disk cache.
    pub cache_dir: PathBuf,
    /// Its bound in bytes.
    pub cache_size: u64,
    /// How long the filesystem trusts listings (requests revalidate anyway).
    pub metadata_ttl: Duration,
    /// Local scratch space (incoming packs are indexed here first).
    pub tmp_dir: PathBuf,
    /// Addresses besides loopback allowed to send `user_id` / `X-Organization-Id`.
    pub trusted_proxies: Vec<IpAddr>,
    /// Accept non-fast-forward branch updates.
    pub allow_non_fast_forward: bool,
    /// Largest push body.
    pub max_push_bytes: u64,
    /// Concurrent pack builds.
    pub max_pack_builds: usize,
    /// Threads per pack build.
    pub pack_threads: u32,
    /// How long a push waits for the block sync of its commit.
    pub sync_timeout: Duration,
    /// How often every agent is checked for a branch tip that is not synced.
    pub sync_interval: Duration,
    /// Bound of the full-clone pack cache (`cache_dir/packs`); 0 turns it off.
    pub pack_cache_bytes: u64,
}

impl ServerConfig {
    /// The embedded default under `home`: `file://home/store`, SQLite `home/repofs.db`,
    /// mount at `home/mnt`, cache in `home/cache`, listening on 127.0.0.1:8283.
    pub fn embedded(home: impl Into<PathBuf>) -> Self {
        let home: PathBuf = home.into();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        ServerConfig {
            listen: "127.0.0.1:8283".parse().expect("static address"),
            store_url: format!("file://{}", home.join("store").display()),
            database_url: format!("sqlite://{}", home.join("repofs.db").display()),
            mount_dir: home.join("mnt"),
            cache_dir: home.join("cache"),
            cache_size: 2 << 30,
            metadata_ttl: Duration::from_secs(1),
            tmp_dir: home.join("tmp"),
            trusted_proxies: Vec::new(),
            allow_non_fast_forward: false,
            max_push_bytes: 512 << 20,
            max_pack_builds: cores.max(2),
            pack_threads: cores.min(4) as u32,
            sync_timeout: Duration::from_secs(10),
            sync_interval: Duration::from_secs(60),
            pack_cache_bytes: 1 << 30,
        }
    }
}

/// A running server.
pub struct RunningServer {
    addr: SocketAddr,
    state: Arc<AppState>,
    mount: Mutex<Option<MountHandle>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    serve: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    extra: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Shared state (database, filesystem).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Base URL, e.g. `http://127.0.0.1:8283`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting, drain in-flight requests, flush the filesystem, unmount.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(serve) = self.serve.take() {
            match tokio::time::timeout(Duration::from_secs(60), serve).await {
                Ok(r) => r.context("server task")?.context("serving")?,
                Err(_) => tracing::warn!("requests still running after 60 s; unmounting anyway"),
            }
        }
        for t in self.extra.drain(..) {
            t.abort();
        }
        self.state.db.close().await;
        let mount = self.mount.lock().take();
        if let Some(m) = mount {
            tokio::task::spawn_blocking(move || m.unmount())
                .await
                .context("unmount task")?
                .context("flush and unmount")?;
        }
        Ok(())
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(m) = self.mount.lock().take() {
            // Dropping a runtime inside async code panics; unmount on a plain thread.
            let _ = std::thread::spawn(move || drop(m)).join();
        }
    }
}

/// Connect the database, mount the store, bind, and start serving.
pub async fn start(cfg: ServerConfig) -> Result<RunningServer> {
    let db = Db::connect(&cfg.database_url)
        .await
        .with_context(|| format!("opening database {}", redact(&cfg.database_url)))?;
    start_with_db(cfg, db).await
}

/// Like [`start`] with an already-open database.
pub async fn start_with_db(cfg: ServerConfig, db: Db) -> Result<RunningServer> {
    let mut mcfg = MountConfig::new(cfg.store_url.clone(), cfg.mount_dir.clone());
    mcfg.cache_dir = cfg.cache_dir.clone();
    mcfg.cache_size = cfg.cache_size;
    mcfg.metadata_ttl = cfg.metadata_ttl;
    // A stale mount left by a crash is cleared by spawn_mount (without touching it,
    // which could hang on a dead daemon).
    let m = tokio::task::spawn_blocking(move || mount::spawn_mount(&mcfg))
        .await
        .context("mount task")?;
    let m = match m {
        Ok(m) => m,
        Err(e) => bail!(
            "cannot mount {} at {}: {e}\n  if the mountpoint is stale from a crash, run: umount {}",
            cfg.store_url,
            cfg.mount_dir.display(),
            cfg.mount_dir.display()
        ),
    };
    let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || m.unmount()).await;
            bail!("cannot listen on {}: {e}", cfg.listen);
        }
    };
    let addr = listener.local_addr()?;
    let counters = Arc::new(crate::metrics::Counters::default());
    let sync = SyncManager::new(
        db.clone(),
        cfg.mount_dir.clone(),
        cfg.sync_timeout,
        counters.clone(),
    );
    let background = sync.spawn_background(m.subscribe(), cfg.sync_interval);
    let state = Arc::new(AppState {
        db,
        fs: m.fs().clone(),
        io: m.io_handle().context("mount has no I/O runtime")?,
        mount_dir: cfg.mount_dir.clone(),
        trust: TrustPolicy {
            proxies: cfg.trusted_proxies.clone(),
        },
        pack: PackOptions {
            threads: cfg.pack_threads,
            cache_dir: (cfg.pack_cache_bytes > 0).then(|| cfg.cache_dir.join("packs")),
            cache_bytes: cfg.pack_cache_bytes,
            counters: counters.clone(),
        },
        push: PushPolicy {
            allow_non_fast_forward: cfg.allow_non_fast_forward,
            max_bytes: cfg.max_push_bytes,
            tmp_dir: cfg.tmp_dir.clone(),
        },
        pack_permits: Arc::new(Semaphore::new(cfg.max_pack_builds.max(1))),
        create_locks: Mutex::new(Default::default()),
        sync,
        counters,
    });
    let app = http::router(state.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = rx.await;
        })
        .await
    });
    tracing::info!(
        listen = %addr,
        store = %cfg.store_url,
        mount = %cfg.mount_dir.display(),
        database = %redact(&cfg.database_url),
        "repofs-server ready"
    );
    Ok(RunningServer {
        addr,
        state,
        mount: Mutex::new(Some(m)),
        shutdown: Some(tx),
        serve: Some(serve),
        extra: vec![background],
    })
}

/// A database URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}
