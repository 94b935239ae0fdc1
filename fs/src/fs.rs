//! Filesystem core: the namespace over the store, lazy listing and fetching, write-back
//! with git's ordering, ref compare-and-swap and ref events. Knows nothing of FUSE; the
//! adapter in `fuse.rs` only translates arguments and replies.

use crate::cache::DiskCache;
use crate::classify::{classify, org_agent, repo_of, FileClass};
use crate::error::FsError;
use crate::refs::{parse_loose, parse_packed, Oid, RefUpdated, RefValue};
use crate::stats::Stats;
use crate::store::{ObjectInfo, Store, StoreError};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{broadcast, watch};

/// Inode number of the mount's root.
pub const ROOT_INO: u64 = 1;
const CTL_DIR_INO: u64 = 2;
const STATS_INO: u64 = 3;
const FIRST_INO: u64 = 16;
/// Name of the control directory in the mount's root.
pub const CTL_DIR_NAME: &str = ".repofs";
const MAX_NAME: usize = 255;
const TOMBSTONE_TTL: Duration = Duration::from_secs(300);

/// Settings of the filesystem core.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// How long listings and attributes are trusted before the store is asked again.
    pub metadata_ttl: Duration,
    /// Refuse every write with EROFS.
    pub read_only: bool,
    /// Owner reported for every file.
    pub uid: u32,
    /// Group reported for every file.
    pub gid: u32,
    /// Uploads running at once.
    pub upload_concurrency: usize,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            metadata_ttl: Duration::from_secs(1),
            read_only: false,
            uid: 0,
            gid: 0,
            upload_concurrency: 16,
        }
    }
}

/// File or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
}

/// Attributes of a node, as `stat` shows them.
#[derive(Debug, Clone)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// File or directory.
    pub kind: Kind,
    /// Size in bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: SystemTime,
    /// Change time.
    pub ctime: SystemTime,
    /// Permission bits.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// The answer to an open or create.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    /// File handle.
    pub fh: u64,
    /// Keep the kernel page cache from earlier opens (immutable files).
    pub keep_cache: bool,
    /// Bypass the page cache (generated files such as `.repofs/stats`).
    pub direct_io: bool,
}

/// One directory entry.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Inode number.
    pub ino: u64,
    /// Offset of the next entry.
    pub offset: u64,
    /// File or directory.
    pub kind: Kind,
    /// Name.
    pub name: String,
}

/// Receives cache invalidations for the kernel. Calls must not block on the kernel
/// (the FUSE adapter queues them to a thread of their own).
pub trait Invalidator: Send + Sync {
    /// A name in a directory changed or disappeared.
    fn inval_entry(&self, parent: u64, name: &str);
    /// The content or attributes of an inode changed.
    fn inval_inode(&self, ino: u64);
}

#[derive(Debug)]
struct Local {
    path: PathBuf,
    size: u64,
    dirty: bool,
    version: u64,
}

#[derive(Debug, Clone)]
struct Remote {
    etag: String,
    size: u64,
}

impl From<&ObjectInfo> for Remote {
    fn from(i: &ObjectInfo) -> Self {
        Remote {
            etag: i.etag.clone(),
            size: i.size,
        }
    }
}

#[derive(Debug)]
struct FileNode {
    remote: Option<Remote>,
    local: Option<Local>,
    /// Generation at which the store was last known to hold `remote`.
    confirmed: u64,
    writers: u32,
    handles: u32,
}

#[derive(Debug, Default)]
struct DirNode {
    children: BTreeMap<String, u64>,
    listed_at: Option<Instant>,
}

#[derive(Debug)]
enum NodeKind {
    Dir(DirNode),
    File(FileNode),
}

#[derive(Debug)]
struct Node {
    parent: u64,
    name: String,
    kind: NodeKind,
    lookups: u64,
    linked: bool,
    perm: u16,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Node {
    fn file(&self) -> Option<&FileNode> {
        match &self.kind {
            NodeKind::File(f) => Some(f),
            NodeKind::Dir(_) => None,
        }
    }
    fn file_mut(&mut self) -> Option<&mut FileNode> {
        match &mut self.kind {
            NodeKind::File(f) => Some(f),
            NodeKind::Dir(_) => None,
        }
    }
    fn dir(&self) -> Option<&DirNode> {
        match &self.kind {
            NodeKind::Dir(d) => Some(d),
            NodeKind::File(_) => None,
        }
    }
    fn dir_mut(&mut self) -> Option<&mut DirNode> {
        match &mut self.kind {
            NodeKind::Dir(d) => Some(d),
            NodeKind::File(_) => None,
        }
    }
}

#[derive(Debug)]
struct Tree {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Keys deleted by this mount, with the generation of the delete, so a listing that
    /// started earlier does not bring them back.
    tombstones: HashMap<String, (u64, Instant)>,
}

impl Tree {
    fn get(&self, ino: u64) -> Result<&Node, FsError> {
        self.nodes.get(&ino).ok_or(FsError::NotFound)
    }
    fn get_mut(&mut self, ino: u64) -> Result<&mut Node, FsError> {
        self.nodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    fn key(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            let Some(n) = self.nodes.get(&cur) else { break };
            parts.push(n.name.as_str());
            cur = n.parent;
        }
        parts.reverse();
        parts.join("/")
    }

    fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.nodes
            .get(&parent)
            .and_then(|n| n.dir())
            .and_then(|d| d.children.get(name).copied())
    }

    fn add(
        &mut self,
        parent: u64,
        name: &str,
        kind: NodeKind,
        perm: u16,
        mtime: SystemTime,
    ) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_string(),
                kind,
                lookups: 0,
                linked: true,
                perm,
                mtime,
                ctime: mtime,
            },
        );
        if let Some(d) = self.nodes.get_mut(&parent).and_then(|n| n.dir_mut()) {
            d.children.insert(name.to_string(), ino);
        }
        ino
    }

    fn mkdir_p(&mut self, parent: u64, name: &str, listed: bool) -> Option<u64> {
        match self.child(parent, name) {
            Some(ino) => self.nodes.get(&ino).and_then(|n| n.dir()).map(|_| ino),
            None => {
                let dir = DirNode {
                    children: BTreeMap::new(),
                    listed_at: listed.then(Instant::now),
                };
                Some(self.add(parent, name, NodeKind::Dir(dir), 0o755, SystemTime::now()))
            }
        }
    }

    /// Detach `ino` from its parent. Returns the staging file to delete, if the node
    /// can be dropped now.
    fn unlink(&mut self, ino: u64) -> Option<PathBuf> {
        let (parent, name) = match self.nodes.get(&ino) {
            Some(n) if n.linked => (n.parent, n.name.clone()),
            _ => return None,
        };
        if let Some(d) = self.nodes.get_mut(&parent).and_then(|n| n.dir_mut()) {
            if d.children.get(&name) == Some(&ino) {
                d.children.remove(&name);
            }
        }
        let node = self.nodes.get_mut(&ino)?;
        node.linked = false;
        self.maybe_drop(ino)
    }

    fn maybe_drop(&mut self, ino: u64) -> Option<PathBuf> {
        let node = self.nodes.get(&ino)?;
        let busy = node.lookups > 0 || node.linked || node.file().is_some_and(|f| f.handles > 0);
        if busy {
            return None;
        }
        let node = self.nodes.remove(&ino)?;
        match node.kind {
            NodeKind::File(f) => f.local.map(|l| l.path),
            NodeKind::Dir(_) => None,
        }
    }

    fn attr(&self, ino: u64, cfg: &FsConfig) -> Result<Attr, FsError> {
        let n = self.get(ino)?;
        let (kind, size, nlink) = match &n.kind {
            NodeKind::Dir(d) => (Kind::Dir, 4096, 2 + d.children.len() as u32),
            NodeKind::File(f) => {
                let size = match (&f.local, &f.remote) {
                    (Some(l), _) => l.size,
                    (None, Some(r)) => r.size,
                    (None, None) => 0,
                };
                (Kind::File, size, u32::from(n.linked))
            }
        };
        Ok(Attr {
            ino,
            kind,
            size,
            mtime: n.mtime,
            ctime: n.ctime,
            perm: n.perm,
            nlink,
            uid: cfg.uid,
            gid: cfg.gid,
        })
    }
}

type Completion = watch::Receiver<Option<bool>>;

/// Per-repository write-back state.
#[derive(Debug, Default)]
struct Repo {
    /// Serializes ref publication (and is the in-process CAS on stores without it).
    ref_lock: tokio::sync::Mutex<()>,
    /// Immutable uploads in flight, by key.
    pending: Mutex<HashMap<String, Completion>>,
    /// Immutable uploads that failed, by key, with the inode holding the data.
    failed: Mutex<HashMap<String, (u64, String)>>,
}

#[derive(Debug)]
struct Handle {
    ino: u64,
    write: bool,
    wrote: std::sync::atomic::AtomicBool,
    file: Mutex<Option<(PathBuf, Arc<File>)>>,
    generated: Option<Vec<u8>>,
}

struct DirHandle {
    entries: Mutex<Option<Vec<DirEntry>>>,
}

struct Inner {
    store: Store,
    cache: DiskCache,
    config: FsConfig,
    stats: Arc<Stats>,
    tree: Mutex<Tree>,
    repos: Mutex<HashMap<String, Arc<Repo>>>,
    list_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    download_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    dir_handles: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    generation: AtomicU64,
    events: broadcast::Sender<RefUpdated>,
    invalidator: Mutex<Option<Arc<dyn Invalidator>>>,
    upload_slots: Arc<tokio::sync::Semaphore>,
    runtime: tokio::runtime::Handle,
}

/// The filesystem core. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Fs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fs({:?})", self.inner.store)
    }
}

fn check_name(name: &str) -> Result<(), FsError> {
    if name.len() > MAX_NAME {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(FsError::Invalid(format!("bad file name {name:?}")));
    }
    Ok(())
}

fn valid_key_segments(rel: &str) -> bool {
    rel.split('/').all(|s| check_name(s).is_ok())
}

enum Source {
    Local(PathBuf),
    Remote { key: String, etag: String },
    Empty,
}

impl Fs {
    /// Build the core over a store and a cache. Background work (uploads) runs on
    /// `runtime`.
    pub fn new(
        store: Store,
        cache: DiskCache,
        config: FsConfig,
        stats: Arc<Stats>,
        runtime: tokio::runtime::Handle,
    ) -> Fs {
        let now = SystemTime::now();
        let mut nodes = HashMap::new();
        let mut root_children = BTreeMap::new();
        root_children.insert(CTL_DIR_NAME.to_string(), CTL_DIR_INO);
        nodes.insert(
            ROOT_INO,
            Node {
                parent: ROOT_INO,
                name: String::new(),
                kind: NodeKind::Dir(DirNode {
                    children: root_children,
                    listed_at: None,
                }),
                lookups: 1,
                linked: true,
                perm: 0o755,
                mtime: now,
                ctime: now,
            },
        );
        let mut ctl_children = BTreeMap::new();
        ctl_children.insert("stats".to_string(), STATS_INO);
        nodes.insert(
            CTL_DIR_INO,
            Node {
                parent: ROOT_INO,
                name: CTL_DIR_NAME.to_string(),
                kind: NodeKind::Dir(DirNode {
                    children: ctl_children,
                    listed_at: Some(Instant::now()),
                }),
                lookups: 1,
                linked: true,
                perm: 0o555,
                mtime: now,
                ctime: now,
            },
        );
        nodes.insert(
            STATS_INO,
            Node {
                parent: CTL_DIR_INO,
                name: "stats".to_string(),
                kind: NodeKind::File(FileNode {
                    remote: None,
                    local: None,
                    confirmed: 0,
                    writers: 0,
                    handles: 0,
                }),
                lookups: 1,
                linked: true,
                perm: 0o444,
                mtime: now,
                ctime: now,
            },
        );
        let (events, _) = broadcast::channel(4096);
        let slots = config.upload_concurrency.max(1);
        Fs {
            inner: Arc::new(Inner {
                store,
                cache,
                config,
                stats,
                tree: Mutex::new(Tree {
                    nodes,
                    next_ino: FIRST_INO,
                    tombstones: HashMap::new(),
                }),
                repos: Mutex::default(),
                list_locks: Mutex::default(),
                download_locks: Mutex::default(),
                handles: Mutex::default(),
                dir_handles: Mutex::default(),
                next_fh: AtomicU64::new(1),
                generation: AtomicU64::new(1),
                events,
                invalidator: Mutex::new(None),
                upload_slots: Arc::new(tokio::sync::Semaphore::new(slots)),
                runtime,
            }),
        }
    }

    /// Subscribe to ref events.
    pub fn subscribe(&self) -> broadcast::Receiver<RefUpdated> {
        self.inner.events.subscribe()
    }

    /// Counters of this filesystem.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }

    /// The store this filesystem serves.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The configuration in force.
    pub fn config(&self) -> &FsConfig {
        &self.inner.config
    }

    /// Install the kernel cache invalidator (done by the FUSE adapter).
    pub fn set_invalidator(&self, inv: Arc<dyn Invalidator>) {
        *self.inner.invalidator.lock() = Some(inv);
    }

    fn invalidate(&self, entries: Vec<(u64, String)>, inodes: Vec<u64>) {
        if entries.is_empty() && inodes.is_empty() {
            return;
        }
        if let Some(inv) = self.inner.invalidator.lock().clone() {
            for (parent, name) in entries {
                inv.inval_entry(parent, &name);
            }
            for ino in inodes {
                inv.inval_inode(ino);
            }
        }
    }

    fn next_gen(&self) -> u64 {
        self.inner.generation.fetch_add(1, Ordering::SeqCst)
    }

    fn repo(&self, repo_key: &str) -> Arc<Repo> {
        self.inner
            .repos
            .lock()
            .entry(repo_key.to_string())
            .or_default()
            .clone()
    }

    fn check_writable(&self) -> Result<(), FsError> {
        if self.inner.config.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn ttl(&self) -> Duration {
        self.inner.config.metadata_ttl
    }

    // ---------------------------------------------------------------- listing

    /// Make sure the directory's content reflects the store within the metadata TTL.
    async fn ensure_listed(&self, dir_ino: u64) -> Result<(), FsError> {
        if dir_ino == CTL_DIR_INO {
            return Ok(());
        }
        let (unit_ino, unit_key, recursive, fresh) = {
            let tree = self.inner.tree.lock();
            let node = tree.get(dir_ino)?;
            if node.dir().is_none() {
                return Err(FsError::NotDir);
            }
            let key = tree.key(dir_ino);
            let (unit_ino, unit_key, recursive) = match repo_of(&key) {
                Some(rp) => {
                    let mut ino = dir_ino;
                    let depth = if rp.rel.is_empty() {
                        0
                    } else {
                        rp.rel.split('/').count()
                    };
                    for _ in 0..depth {
                        ino = tree.get(ino)?.parent;
                    }
                    (ino, rp.repo.to_string(), true)
                }
                None => (dir_ino, key, false),
            };
            let listed_at = tree.get(unit_ino)?.dir().and_then(|d| d.listed_at);
            let fresh = listed_at.is_some_and(|t| t.elapsed() < self.ttl());
            (unit_ino, unit_key, recursive, fresh)
        };
        if fresh {
            return Ok(());
        }
        let lock = self
            .inner
            .list_locks
            .lock()
            .entry(unit_key.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        {
            let tree = self.inner.tree.lock();
            let listed_at = tree.get(unit_ino)?.dir().and_then(|d| d.listed_at);
            if listed_at.is_some_and(|t| t.elapsed() < self.ttl()) {
                return Ok(());
            }
        }
        let generation = self.next_gen();
        if recursive {
            let objects = self.inner.store.list_recursive(&unit_key).await?;
            self.apply_recursive(unit_ino, &unit_key, objects, generation);
        } else {
            let listing = self.inner.store.list_dir(&unit_key).await?;
            self.apply_dir(unit_ino, listing, generation);
        }
        Ok(())
    }

    /// Force the next access of a repository to list it again, and list it now. The
    /// server calls this at the start of each request so it never serves stale refs.
    pub async fn revalidate(&self, repo_key: &str) -> Result<(), FsError> {
        let ino = {
            let mut tree = self.inner.tree.lock();
            let mut cur = ROOT_INO;
            for comp in repo_key.split('/').filter(|c| !c.is_empty()) {
                match tree.child(cur, comp) {
                    Some(i) => cur = i,
                    None => return Ok(()),
                }
            }
            if let Some(d) = tree.get_mut(cur)?.dir_mut() {
                d.listed_at = None;
            }
            cur
        };
        self.ensure_listed(ino).await
    }

    fn is_tombstoned(tree: &Tree, key: &str, generation: u64) -> bool {
        tree.tombstones
            .get(key)
            .is_some_and(|(g, _)| *g > generation)
    }

    /// Merge one object from a listing into the file node at `(parent, name)`.
    /// Returns the inode to invalidate when its content changed.
    fn merge_object(
        tree: &mut Tree,
        parent: u64,
        name: &str,
        info: &ObjectInfo,
        generation: u64,
        seen: &mut HashSet<u64>,
    ) -> Option<u64> {
        match tree.child(parent, name) {
            None => {
                let ino = tree.add(
                    parent,
                    name,
                    NodeKind::File(FileNode {
                        remote: Some(Remote::from(info)),
                        local: None,
                        confirmed: generation,
                        writers: 0,
                        handles: 0,
                    }),
                    file_perm(&info.key),
                    info.mtime,
                );
                seen.insert(ino);
                None
            }
            Some(ino) => {
                seen.insert(ino);
                let node = tree.nodes.get_mut(&ino)?;
                let mtime = info.mtime;
                let f = node.file_mut()?;
                if f.local.is_some() {
                    return None;
                }
                let changed = f.remote.as_ref().is_none_or(|r| r.etag != info.etag);
                f.confirmed = f.confirmed.max(generation);
                if changed {
                    if f.confirmed > generation {
                        return None;
                    }
                    f.remote = Some(Remote::from(info));
                    node.mtime = mtime;
                    Some(ino)
                } else {
                    None
                }
            }
        }
    }

    fn apply_recursive(&self, root: u64, prefix: &str, objects: Vec<ObjectInfo>, generation: u64) {
        let mut inval_inodes = Vec::new();
        let mut inval_entries = Vec::new();
        let mut stale_files = Vec::new();
        {
            let mut tree = self.inner.tree.lock();
            let now = Instant::now();
            tree.tombstones
                .retain(|_, (_, t)| now.duration_since(*t) < TOMBSTONE_TTL);
            let mut seen = HashSet::new();
            for info in &objects {
                let Some(rel) = info
                    .key
                    .strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix('/'))
                else {
                    continue;
                };
                if !valid_key_segments(rel) {
                    tracing::warn!(key = %info.key, "skipping a key that is not a valid path");
                    continue;
                }
                if Self::is_tombstoned(&tree, &info.key, generation) {
                    continue;
                }
                let mut parts: Vec<&str> = rel.split('/').collect();
                let name = parts.pop().unwrap_or_default();
                let mut dir = root;
                let mut ok = true;
                for p in parts {
                    match tree.mkdir_p(dir, p, true) {
                        Some(d) => dir = d,
                        None => {
                            tracing::warn!(key = %info.key, "key conflicts with a file of the same name");
                            ok = false;
                            break;
                        }
                    }
                }
                if !ok {
                    continue;
                }
                if let Some(ino) =
                    Self::merge_object(&mut tree, dir, name, info, generation, &mut seen)
                {
                    inval_inodes.push(ino);
                }
            }
            // Files this mount knew as stored that the listing no longer has.
            let mut stack = vec![root];
            while let Some(d) = stack.pop() {
                let Some(dn) = tree.nodes.get(&d).and_then(|n| n.dir()) else {
                    continue;
                };
                for (name, &ino) in &dn.children {
                    match tree.nodes.get(&ino).map(|n| &n.kind) {
                        Some(NodeKind::Dir(_)) => stack.push(ino),
                        Some(NodeKind::File(f))
                            if f.local.is_none()
                                && f.remote.is_some()
                                && f.confirmed < generation
                                && !seen.contains(&ino) =>
                        {
                            stale_files.push((d, name.clone(), ino));
                        }
                        Some(NodeKind::File(_)) => {}
                        None => {}
                    }
                }
            }
            for (parent, name, ino) in &stale_files {
                tree.unlink(*ino);
                inval_entries.push((*parent, name.clone()));
            }
            // A git directory always has these, even when the store holds nothing under them.
            if tree.child(root, "HEAD").is_some() {
                for path in ["refs/heads", "refs/tags", "objects/pack", "objects/info"] {
                    let mut dir = root;
                    for p in path.split('/') {
                        match tree.mkdir_p(dir, p, true) {
                            Some(d) => dir = d,
                            None => break,
                        }
                    }
                }
            }
            if let Some(d) = tree.nodes.get_mut(&root).and_then(|n| n.dir_mut()) {
                d.listed_at = Some(Instant::now());
            }
        }
        if !stale_files.is_empty() {
            tracing::debug!(
                repo = prefix,
                removed = stale_files.len(),
                "listing dropped files removed from the store"
            );
        }
        self.invalidate(inval_entries, inval_inodes);
    }

    fn apply_dir(&self, dir: u64, listing: crate::store::DirListing, generation: u64) {
        let mut inval_inodes = Vec::new();
        let mut inval_entries = Vec::new();
        {
            let mut tree = self.inner.tree.lock();
            let mut seen = HashSet::new();
            for sub in &listing.dirs {
                let name = sub.trim_end_matches('/');
                if check_name(name).is_err() || (dir == ROOT_INO && name == CTL_DIR_NAME) {
                    continue;
                }
                if let Some(ino) = tree.mkdir_p(dir, name, false) {
                    seen.insert(ino);
                }
            }
            for info in &listing.objects {
                let name = info.key.rsplit('/').next().unwrap_or_default();
                if check_name(name).is_err() {
                    tracing::warn!(key = %info.key, "skipping a key that is not a valid path");
                    continue;
                }
                if (dir == ROOT_INO && name == CTL_DIR_NAME)
                    || Self::is_tombstoned(&tree, &info.key, generation)
                {
                    continue;
                }
                if tree
                    .child(dir, name)
                    .and_then(|i| tree.nodes.get(&i))
                    .is_some_and(|n| n.dir().is_some())
                {
                    continue;
                }
                if let Some(ino) =
                    Self::merge_object(&mut tree, dir, name, info, generation, &mut seen)
                {
                    inval_inodes.push(ino);
                }
            }
            let stale: Vec<(String, u64)> = tree
                .get(dir)
                .ok()
                .and_then(|n| n.dir())
                .map(|d| {
                    d.children
                        .iter()
                        .filter(|(_, ino)| {
                            tree.nodes.get(ino).and_then(|n| n.file()).is_some_and(|f| {
                                f.local.is_none()
                                    && f.remote.is_some()
                                    && f.confirmed < generation
                                    && !seen.contains(ino)
                            })
                        })
                        .map(|(n, i)| (n.clone(), *i))
                        .collect()
                })
                .unwrap_or_default();
            for (name, ino) in stale {
                tree.unlink(ino);
                inval_entries.push((dir, name));
            }
            if let Some(d) = tree.nodes.get_mut(&dir).and_then(|n| n.dir_mut()) {
                d.listed_at = Some(Instant::now());
            }
        }
        self.invalidate(inval_entries, inval_inodes);
    }

    // ---------------------------------------------------------------- metadata ops

    /// Look up `name` in directory `parent`.
    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        if name.len() > MAX_NAME {
            return Err(FsError::NameTooLong);
        }
        self.ensure_listed(parent).await?;
        let mut tree = self.inner.tree.lock();
        let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
        tree.get_mut(ino)?.lookups += 1;
        tree.attr(ino, &self.inner.config)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino < FIRST_INO {
            return;
        }
        let path = {
            let mut tree = self.inner.tree.lock();
            let Some(node) = tree.nodes.get_mut(&ino) else {
                return;
            };
            node.lookups = node.lookups.saturating_sub(n);
            tree.maybe_drop(ino)
        };
        if let Some(p) = path {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Attributes of `ino`. Files inside a repository are revalidated against the
    /// store once the metadata TTL has passed.
    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        if ino == STATS_INO {
            let mut a = self.inner.tree.lock().attr(ino, &self.inner.config)?;
            a.size = self.stats_json().len() as u64;
            return Ok(a);
        }
        let parent = {
            let tree = self.inner.tree.lock();
            let n = tree.get(ino)?;
            (n.linked && n.file().is_some_and(|f| f.local.is_none())).then_some(n.parent)
        };
        if let Some(parent) = parent {
            if let Err(e) = self.ensure_listed(parent).await {
                tracing::warn!(ino, error = %e, "revalidation failed; serving cached attributes");
            }
        }
        self.inner.tree.lock().attr(ino, &self.inner.config)
    }

    /// Change mode, size or times.
    pub async fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        size: Option<u64>,
        mtime: Option<SystemTime>,
    ) -> Result<Attr, FsError> {
        if ino < FIRST_INO && ino != ROOT_INO {
            return Err(FsError::ReadOnly);
        }
        self.check_writable()?;
        if let Some(size) = size {
            let path = self.ensure_local(ino, size > 0).await?;
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            f.set_len(size)?;
            let mut tree = self.inner.tree.lock();
            let node = tree.get_mut(ino)?;
            node.mtime = SystemTime::now();
            if let Some(l) = node.file_mut().and_then(|f| f.local.as_mut()) {
                l.size = size;
                l.dirty = true;
                l.version += 1;
            }
        }
        let mut tree = self.inner.tree.lock();
        let node = tree.get_mut(ino)?;
        if let Some(mode) = mode {
            node.perm = (mode & 0o7777) as u16;
        }
        if let Some(t) = mtime {
            node.mtime = t;
        }
        node.ctime = SystemTime::now();
        tree.attr(ino, &self.inner.config)
    }

    /// Create a directory.
    pub async fn mkdir(&self, parent: u64, name: &str, mode: u32) -> Result<Attr, FsError> {
        self.check_writable()?;
        check_name(name)?;
        if parent == CTL_DIR_INO || (parent == ROOT_INO && name == CTL_DIR_NAME) {
            return Err(FsError::ReadOnly);
        }
        self.ensure_listed(parent).await?;
        let mut tree = self.inner.tree.lock();
        if tree.child(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        let ino = tree.add(
            parent,
            name,
            NodeKind::Dir(DirNode {
                children: BTreeMap::new(),
                listed_at: Some(Instant::now()),
            }),
            (mode & 0o7777) as u16,
            SystemTime::now(),
        );
        tree.get_mut(ino)?.lookups += 1;
        tree.attr(ino, &self.inner.config)
    }

    /// Remove an empty directory.
    pub async fn rmdir(&self, parent: u64, name: &str) -> Result<(), FsError> {
        self.check_writable()?;
        check_name(name)?;
        self.ensure_listed(parent).await?;
        let ino = self
            .inner
            .tree
            .lock()
            .child(parent, name)
            .ok_or(FsError::NotFound)?;
        if ino < FIRST_INO {
            return Err(FsError::ReadOnly);
        }
        self.ensure_listed(ino).await?;
        let mut tree = self.inner.tree.lock();
        let d = tree.get(ino)?.dir().ok_or(FsError::NotDir)?;
        if !d.children.is_empty() {
            return Err(FsError::NotEmpty);
        }
        tree.unlink(ino);
        Ok(())
    }

    /// List a directory. The listing is taken at `offset == 0` and kept for the handle.
    pub async fn readdir(&self, fh: u64, ino: u64, offset: u64) -> Result<Vec<DirEntry>, FsError> {
        let handle = self
            .inner
            .dir_handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let needs = offset == 0 || handle.entries.lock().is_none();
        if needs {
            self.ensure_listed(ino).await?;
            let tree = self.inner.tree.lock();
            let node = tree.get(ino)?;
            let d = node.dir().ok_or(FsError::NotDir)?;
            let mut entries = vec![
                DirEntry {
                    ino,
                    offset: 1,
                    kind: Kind::Dir,
                    name: ".".into(),
                },
                DirEntry {
                    ino: node.parent,
                    offset: 2,
                    kind: Kind::Dir,
                    name: "..".into(),
                },
            ];
            for (name, &child) in &d.children {
                let kind = match tree.nodes.get(&child).map(|n| &n.kind) {
                    Some(NodeKind::Dir(_)) => Kind::Dir,
                    Some(NodeKind::File(_)) => Kind::File,
                    None => continue,
                };
                let offset = entries.len() as u64 + 1;
                entries.push(DirEntry {
                    ino: child,
                    offset,
                    kind,
                    name: name.clone(),
                });
            }
            *handle.entries.lock() = Some(entries);
        }
        let entries = handle.entries.lock();
        Ok(entries
            .as_ref()
            .map(|e| e.iter().skip(offset as usize).cloned().collect())
            .unwrap_or_default())
    }

    /// Open a directory for listing.
    pub fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        self.inner
            .tree
            .lock()
            .get(ino)?
            .dir()
            .ok_or(FsError::NotDir)?;
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inner.dir_handles.lock().insert(
            fh,
            Arc::new(DirHandle {
                entries: Mutex::new(None),
            }),
        );
        Ok(fh)
    }

    /// Close a directory handle.
    pub fn releasedir(&self, fh: u64) {
        self.inner.dir_handles.lock().remove(&fh);
    }

    // ---------------------------------------------------------------- content

    fn stats_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(&self.inner.stats.snapshot()).unwrap_or_default();
        v.push(b'\n');
        v
    }

    fn source(&self, ino: u64) -> Result<(Source, String), FsError> {
        let tree = self.inner.tree.lock();
        let key = tree.key(ino);
        let f = tree.get(ino)?.file().ok_or(FsError::IsDir)?;
        let src = match (&f.local, &f.remote) {
            (Some(l), _) => Source::Local(l.path.clone()),
            (None, Some(r)) => Source::Remote {
                key: key.clone(),
                etag: r.etag.clone(),
            },
            (None, None) => Source::Empty,
        };
        Ok((src, key))
    }

    /// Open the cached copy of a stored object, downloading it on a miss.
    async fn fetch(&self, ino: u64, key: &str, etag: &str) -> Result<File, FsError> {
        if let Some(f) = self.inner.cache.get(key, etag) {
            Stats::inc(&self.inner.stats.cache_hits);
            return Ok(f);
        }
        let lock = self
            .inner
            .download_locks
            .lock()
            .entry(key.to_string())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Some(f) = self.inner.cache.get(key, etag) {
            Stats::inc(&self.inner.stats.cache_hits);
            return Ok(f);
        }
        Stats::inc(&self.inner.stats.cache_misses);
        let tmp = self.inner.cache.staging_path();
        let info = match self.inner.store.get_to_file(key, &tmp).await {
            Ok(info) => info,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                self.inner.download_locks.lock().remove(key);
                if matches!(e, StoreError::NotFound(_)) {
                    tracing::warn!(key, "object listed but gone from the store");
                }
                return Err(e.into());
            }
        };
        self.inner.download_locks.lock().remove(key);
        let file = self.inner.cache.adopt(key, &info.etag, &tmp)?;
        if info.etag != etag {
            // The object changed since it was listed: remember the version we now hold.
            let mut tree = self.inner.tree.lock();
            if let Some(f) = tree.nodes.get_mut(&ino).and_then(|n| n.file_mut()) {
                if f.local.is_none() {
                    f.remote = Some(Remote::from(&info));
                }
            }
        }
        Ok(file)
    }

    /// A readable file with the node's current content.
    async fn content_file(&self, ino: u64) -> Result<(PathBuf, Arc<File>), FsError> {
        let (src, _) = self.source(ino)?;
        match src {
            Source::Local(p) => {
                let f = File::open(&p)?;
                Ok((p, Arc::new(f)))
            }
            Source::Remote { key, etag } => {
                let f = self.fetch(ino, &key, &etag).await?;
                Ok((PathBuf::from(format!("remote:{key}:{etag}")), Arc::new(f)))
            }
            Source::Empty => Ok((PathBuf::from("empty"), Arc::new(File::open("/dev/null")?))),
        }
    }

    /// Read the whole content of a (small) file.
    async fn read_all(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let (_, f) = self.content_file(ino).await?;
        let mut buf = Vec::new();
        (&*f).seek(SeekFrom::Start(0))?;
        (&*f).read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// Give the node a local (staging) copy to write to. `keep` copies the stored
    /// content; otherwise the copy starts empty.
    async fn ensure_local(&self, ino: u64, keep: bool) -> Result<PathBuf, FsError> {
        {
            let tree = self.inner.tree.lock();
            let f = tree.get(ino)?.file().ok_or(FsError::IsDir)?;
            if let Some(l) = &f.local {
                return Ok(l.path.clone());
            }
        }
        let staging = self.inner.cache.staging_path();
        let mut size = 0;
        if keep {
            let (_, src) = self.content_file(ino).await?;
            let mut out = File::create(&staging)?;
            (&*src).seek(SeekFrom::Start(0))?;
            size = std::io::copy(&mut &*src, &mut out)?;
        } else {
            File::create(&staging)?;
        }
        let mut tree = self.inner.tree.lock();
        let f = tree.get_mut(ino)?.file_mut().ok_or(FsError::IsDir)?;
        if let Some(l) = &f.local {
            let _ = std::fs::remove_file(&staging);
            return Ok(l.path.clone());
        }
        f.local = Some(Local {
            path: staging.clone(),
            size,
            dirty: false,
            version: 0,
        });
        Ok(staging)
    }

    /// Open a file.
    pub async fn open(&self, ino: u64, flags: i32) -> Result<Opened, FsError> {
        let write = (flags & libc::O_ACCMODE) != libc::O_RDONLY;
        if ino == STATS_INO {
            if write {
                return Err(FsError::ReadOnly);
            }
            let fh = self.new_handle(ino, false, Some(self.stats_json()));
            return Ok(Opened {
                fh,
                keep_cache: false,
                direct_io: true,
            });
        }
        if write {
            self.check_writable()?;
        }
        let (key, parent, local) = {
            let tree = self.inner.tree.lock();
            let n = tree.get(ino)?;
            let f = n.file().ok_or(FsError::IsDir)?;
            (tree.key(ino), n.parent, f.local.is_some())
        };
        let class = classify(&key);
        if !local
            && matches!(
                class,
                FileClass::Ref | FileClass::Mutable | FileClass::Plain
            )
        {
            // Close-to-open: a mutable file is revalidated once the TTL has passed.
            self.ensure_listed(parent).await?;
        }
        if write {
            let trunc = flags & libc::O_TRUNC != 0;
            self.ensure_local(ino, !trunc).await?;
            if trunc {
                self.setattr(ino, None, Some(0), None).await?;
            }
        }
        let keep_cache = class == FileClass::Immutable && !local;
        let fh = self.new_handle(ino, write, None);
        Ok(Opened {
            fh,
            keep_cache,
            direct_io: false,
        })
    }

    fn new_handle(&self, ino: u64, write: bool, generated: Option<Vec<u8>>) -> u64 {
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        {
            let mut tree = self.inner.tree.lock();
            if let Some(f) = tree.nodes.get_mut(&ino).and_then(|n| n.file_mut()) {
                f.handles += 1;
                if write {
                    f.writers += 1;
                }
            }
        }
        self.inner.handles.lock().insert(
            fh,
            Arc::new(Handle {
                ino,
                write,
                wrote: false.into(),
                file: Mutex::new(None),
                generated,
            }),
        );
        fh
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        self.inner
            .handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    /// Create and open a file.
    pub async fn create(
        &self,
        parent: u64,
        name: &str,
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, Opened), FsError> {
        self.check_writable()?;
        check_name(name)?;
        if parent == CTL_DIR_INO || (parent == ROOT_INO && name == CTL_DIR_NAME) {
            return Err(FsError::ReadOnly);
        }
        self.ensure_listed(parent).await?;
        let existing = self.inner.tree.lock().child(parent, name);
        if let Some(ino) = existing {
            if flags & libc::O_EXCL != 0 {
                return Err(FsError::Exists);
            }
            let opened = self.open(ino, flags | libc::O_RDWR).await?;
            let mut tree = self.inner.tree.lock();
            tree.get_mut(ino)?.lookups += 1;
            return Ok((tree.attr(ino, &self.inner.config)?, opened));
        }
        let staging = self.inner.cache.staging_path();
        File::create(&staging)?;
        let ino = {
            let mut tree = self.inner.tree.lock();
            if tree.child(parent, name).is_some() {
                let _ = std::fs::remove_file(&staging);
                return Err(FsError::Exists);
            }
            let ino = tree.add(
                parent,
                name,
                NodeKind::File(FileNode {
                    remote: None,
                    local: Some(Local {
                        path: staging,
                        size: 0,
                        dirty: true,
                        version: 1,
                    }),
                    confirmed: 0,
                    writers: 0,
                    handles: 0,
                }),
                (mode & 0o7777) as u16,
                SystemTime::now(),
            );
            tree.get_mut(ino)?.lookups += 1;
            ino
        };
        let fh = self.new_handle(ino, true, None);
        let attr = self.inner.tree.lock().attr(ino, &self.inner.config)?;
        Ok((
            attr,
            Opened {
                fh,
                keep_cache: false,
                direct_io: false,
            },
        ))
    }

    /// Read up to `size` bytes at `offset`.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let h = self.handle(fh)?;
        if let Some(g) = &h.generated {
            let start = (offset as usize).min(g.len());
            let end = (start + size as usize).min(g.len());
            return Ok(g[start..end].to_vec());
        }
        let current = {
            let (src, _) = self.source(h.ino)?;
            match src {
                Source::Local(p) => Some(p),
                _ => None,
            }
        };
        let cached = {
            let slot = h.file.lock();
            match (&*slot, &current) {
                (Some((p, f)), Some(cur)) if p == cur => Some(f.clone()),
                (Some((p, f)), None)
                    if p.starts_with("remote:") || p == std::path::Path::new("empty") =>
                {
                    Some(f.clone())
                }
                _ => None,
            }
        };
        let file = match cached {
            Some(f) => f,
            None => {
                let (p, f) = self.content_file(h.ino).await?;
                *h.file.lock() = Some((p, f.clone()));
                f
            }
        };
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok(buf)
    }

    /// Write `data` at `offset`.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        self.check_writable()?;
        let h = self.handle(fh)?;
        if !h.write {
            return Err(FsError::BadHandle);
        }
        let path = self.ensure_local(h.ino, true).await?;
        let file = {
            let mut slot = h.file.lock();
            match &*slot {
                Some((p, f)) if *p == path => f.clone(),
                _ => {
                    let f = Arc::new(
                        std::fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(&path)?,
                    );
                    *slot = Some((path.clone(), f.clone()));
                    f
                }
            }
        };
        file.write_all_at(data, offset)?;
        h.wrote.store(true, Ordering::Relaxed);
        let mut tree = self.inner.tree.lock();
        let node = tree.get_mut(h.ino)?;
        node.mtime = SystemTime::now();
        if let Some(l) = node.file_mut().and_then(|f| f.local.as_mut()) {
            l.size = l.size.max(offset + data.len() as u64);
            l.dirty = true;
            l.version += 1;
        }
        Ok(data.len() as u32)
    }

    /// Preallocate: extend the file to `offset + len` if shorter.
    pub async fn fallocate(&self, fh: u64, offset: u64, len: u64) -> Result<(), FsError> {
        let h = self.handle(fh)?;
        let path = self.ensure_local(h.ino, true).await?;
        let f = std::fs::OpenOptions::new().write(true).open(&path)?;
        let end = offset + len;
        if f.metadata()?.len() < end {
            f.set_len(end)?;
            let mut tree = self.inner.tree.lock();
            if let Some(l) = tree
                .get_mut(h.ino)?
                .file_mut()
                .and_then(|f| f.local.as_mut())
            {
                l.size = end;
                l.dirty = true;
                l.version += 1;
            }
        }
        Ok(())
    }

    /// `close()` of a descriptor: files written under their final name are published.
    pub async fn flush(&self, fh: u64) -> Result<(), FsError> {
        let h = self.handle(fh)?;
        if h.wrote.load(Ordering::Relaxed) {
            self.finalize_in_place(h.ino).await?;
        }
        Ok(())
    }

    /// fsync: make the file durable in the store (temporary files stay local).
    pub async fn fsync(&self, fh: u64) -> Result<(), FsError> {
        let h = self.handle(fh)?;
        if h.generated.is_some() {
            return Ok(());
        }
        self.finalize_in_place(h.ino).await
    }

    /// Last close of a handle.
    pub fn release(&self, fh: u64) {
        let Some(h) = self.inner.handles.lock().remove(&fh) else {
            return;
        };
        let mut adopt = None;
        let drop_path = {
            let mut tree = self.inner.tree.lock();
            let key = tree.key(h.ino);
            if let Some(f) = tree.nodes.get_mut(&h.ino).and_then(|n| n.file_mut()) {
                f.handles = f.handles.saturating_sub(1);
                if h.write {
                    f.writers = f.writers.saturating_sub(1);
                }
                let clean = f.local.as_ref().is_some_and(|l| !l.dirty);
                if f.writers == 0 && clean {
                    if let Some(r) = &f.remote {
                        let l = f.local.take().expect("checked");
                        adopt = Some((key, r.etag.clone(), l.path));
                    }
                }
            }
            let p = tree.maybe_drop(h.ino);
            if let Some((key, etag, path)) = &adopt {
                if let Err(e) = self.inner.cache.adopt(key, etag, path) {
                    tracing::warn!(error = %e, "could not move an uploaded file into the cache");
                }
            }
            p
        };
        if let Some(p) = drop_path {
            let _ = std::fs::remove_file(p);
        }
    }

    // ---------------------------------------------------------------- write-back

    /// Publish a file that was written under its final name (on close or fsync).
    async fn finalize_in_place(&self, ino: u64) -> Result<(), FsError> {
        let (key, dirty, linked) = {
            let tree = self.inner.tree.lock();
            let n = tree.get(ino)?;
            let dirty = n
                .file()
                .and_then(|f| f.local.as_ref())
                .is_some_and(|l| l.dirty);
            (tree.key(ino), dirty, n.linked)
        };
        if !dirty || !linked {
            return Ok(());
        }
        match classify(&key) {
            FileClass::Temporary => Ok(()),
            FileClass::Ref => {
                let rp = repo_of(&key).expect("refs live in repositories");
                let repo = self.repo(rp.repo);
                self.publish_ref(&repo, rp.repo, ino, ino).await
            }
            _ => self.upload_node(ino, &key).await,
        }
    }

    /// Upload the node's local content under `key` and mark it clean.
    async fn upload_node(&self, ino: u64, key: &str) -> Result<(), FsError> {
        let (path, version) = {
            let tree = self.inner.tree.lock();
            let f = tree.get(ino)?.file().ok_or(FsError::IsDir)?;
            match &f.local {
                Some(l) if l.dirty => (l.path.clone(), l.version),
                _ => return Ok(()),
            }
        };
        let info = self.inner.store.put_file(key, &path).await?;
        tracing::debug!(key, size = info.size, "uploaded");
        self.mark_stored(ino, key, &info, Some(version));
        Ok(())
    }

    /// Record that the store now holds `info` for the node; adopt the staging file into
    /// the cache when nobody is writing to it.
    fn mark_stored(&self, ino: u64, key: &str, info: &ObjectInfo, version: Option<u64>) {
        let generation = self.next_gen();
        let mut tree = self.inner.tree.lock();
        tree.tombstones.remove(key);
        let Some(f) = tree.nodes.get_mut(&ino).and_then(|n| n.file_mut()) else {
            return;
        };
        f.remote = Some(Remote::from(info));
        f.confirmed = generation;
        let unchanged = match (&f.local, version) {
            (Some(l), Some(v)) => l.version == v,
            _ => true,
        };
        if let Some(l) = f.local.as_mut() {
            if unchanged {
                l.dirty = false;
            }
        }
        if unchanged && f.writers == 0 {
            if let Some(l) = f.local.take() {
                if let Err(e) = self.inner.cache.adopt(key, &info.etag, &l.path) {
                    tracing::warn!(error = %e, "could not move an uploaded file into the cache");
                }
            }
        }
    }

    /// Start uploading an immutable file in the background. A ref published later in
    /// the same repository waits for it.
    fn spawn_upload(&self, repo: Arc<Repo>, ino: u64, key: String) {
        let (tx, rx) = watch::channel(None);
        repo.pending.lock().insert(key.clone(), rx);
        let fs = self.clone();
        let slots = self.inner.upload_slots.clone();
        self.inner.runtime.spawn(async move {
            let _permit = slots.acquire_owned().await;
            // An index is stored only after its pack, so readers never find one alone.
            if let Some(stem) = key.strip_suffix(".idx").or_else(|| key.strip_suffix(".rev")).or_else(|| key.strip_suffix(".bitmap")) {
                let pack = format!("{stem}.pack");
                let waiter = repo.pending.lock().get(&pack).cloned();
                if let Some(mut w) = waiter {
                    let _ = w.wait_for(|v| v.is_some()).await;
                }
            }
            let res = fs.upload_node(ino, &key).await;
            let ok = res.is_ok();
            if let Err(e) = res {
                tracing::error!(key = %key, error = %e, "upload failed; refs of this repository will not be published until it succeeds");
                repo.failed.lock().insert(key.clone(), (ino, e.to_string()));
            }
            repo.pending.lock().remove(&key);
            let _ = tx.send(Some(ok));
        });
    }

    /// Wait until every immutable file finalized so far in `repo` is stored. Uploads
    /// that failed are retried once more here; if they still fail, the barrier fails.
    async fn barrier(&self, repo: &Repo, refname: &str) -> Result<(), FsError> {
        loop {
            let waits: Vec<Completion> = repo.pending.lock().values().cloned().collect();
            if waits.is_empty() {
                break;
            }
            for mut w in waits {
                let _ = w.wait_for(|v| v.is_some()).await;
            }
        }
        let failed: Vec<(String, (u64, String))> = repo
            .failed
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, (ino, _)) in failed {
            let still_there = {
                let tree = self.inner.tree.lock();
                tree.nodes.get(&ino).is_some_and(|n| n.linked) && tree.key(ino) == key
            };
            if still_there {
                if let Err(e) = self.upload_node(ino, &key).await {
                    return Err(FsError::Unpublished {
                        refname: refname.to_string(),
                        reason: format!("{key}: {e}"),
                    });
                }
            }
            repo.failed.lock().remove(&key);
        }
        Ok(())
    }

    /// Flush everything: wait for background uploads and publish every dirty file that
    /// has its final name. Called before unmounting.
    pub async fn flush_all(&self) -> Result<(), FsError> {
        let repos: Vec<(String, Arc<Repo>)> = self
            .inner
            .repos
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut first_err = None;
        for (key, repo) in &repos {
            if let Err(e) = self.barrier(repo, key).await {
                tracing::error!(repo = %key, error = %e, "flush failed");
                first_err.get_or_insert(e);
            }
        }
        let dirty: Vec<u64> = {
            let tree = self.inner.tree.lock();
            tree.nodes
                .iter()
                .filter(|(_, n)| {
                    n.linked
                        && n.file()
                            .and_then(|f| f.local.as_ref())
                            .is_some_and(|l| l.dirty)
                })
                .map(|(i, _)| *i)
                .collect()
        };
        for ino in dirty {
            if let Err(e) = self.finalize_in_place(ino).await {
                tracing::error!(ino, error = %e, "flush of a dirty file failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    // ---------------------------------------------------------------- refs

    /// Current value of `refname` in the repository as this mount sees it: the loose
    /// ref if present, otherwise `packed-refs`. Symbolic refs are followed a few levels.
    async fn resolve_ref(&self, repo_key: &str, refname: &str) -> Result<Option<Oid>, FsError> {
        let mut name = refname.to_string();
        for _ in 0..5 {
            let ino = self.ino_of(&format!("{repo_key}/{name}"));
            let loose = match ino {
                Some(ino) if self.inner.tree.lock().get(ino)?.file().is_some() => {
                    parse_loose(&self.read_all(ino).await?)
                }
                _ => None,
            };
            match loose {
                Some(RefValue::Direct(oid)) => return Ok(Some(oid)),
                Some(RefValue::Symbolic(t)) => {
                    name = t;
                    continue;
                }
                None => return self.packed_value(repo_key, &name).await,
            }
        }
        Ok(None)
    }

    async fn packed_value(&self, repo_key: &str, refname: &str) -> Result<Option<Oid>, FsError> {
        match self.ino_of(&format!("{repo_key}/packed-refs")) {
            Some(ino) => Ok(parse_packed(&self.read_all(ino).await?).remove(refname)),
            None => Ok(None),
        }
    }

    fn ino_of(&self, key: &str) -> Option<u64> {
        let tree = self.inner.tree.lock();
        let mut cur = ROOT_INO;
        for comp in key.split('/') {
            cur = tree.child(cur, comp)?;
        }
        Some(cur)
    }

    fn loose_exists(&self, repo_key: &str, refname: &str) -> bool {
        self.ino_of(&format!("{repo_key}/{refname}"))
            .is_some_and(|i| {
                self.inner
                    .tree
                    .lock()
                    .nodes
                    .get(&i)
                    .is_some_and(|n| n.file().is_some())
            })
    }

    /// Logical values of the refs a write to `rel` can change, before or after it.
    async fn ref_view(
        &self,
        repo_key: &str,
        rel: &str,
        content: Option<&[u8]>,
    ) -> Result<BTreeMap<String, Option<Oid>>, FsError> {
        let mut out = BTreeMap::new();
        if rel == "packed-refs" {
            for (name, oid) in parse_packed(content.unwrap_or_default()) {
                out.insert(name, Some(oid));
            }
            return Ok(out);
        }
        let value = match content.and_then(parse_loose) {
            Some(RefValue::Direct(oid)) => Some(oid),
            Some(RefValue::Symbolic(t)) => self.resolve_ref(repo_key, &t).await?,
            None if rel == "HEAD" => None,
            None => self.packed_value(repo_key, rel).await?,
        };
        out.insert(rel.to_string(), value);
        Ok(out)
    }

    async fn emit_changes(
        &self,
        repo_key: &str,
        rel: &str,
        before: BTreeMap<String, Option<Oid>>,
        after: BTreeMap<String, Option<Oid>>,
    ) {
        let names: std::collections::BTreeSet<&String> =
            before.keys().chain(after.keys()).collect();
        for name in names {
            let old = before.get(name).cloned().flatten();
            let new = after.get(name).cloned().flatten();
            if old == new {
                continue;
            }
            if rel == "packed-refs" && self.loose_exists(repo_key, name) {
                continue; // a loose ref shadows the packed value
            }
            let (org, agent) = match org_agent(repo_key) {
                Some((o, a)) => (Some(o.to_string()), Some(a.to_string())),
                None => (None, None),
            };
            let ev = RefUpdated {
                repo: repo_key.to_string(),
                org,
                agent,
                refname: name.clone(),
                old,
                new,
            };
            tracing::info!(repo = %repo_key, refname = %ev.refname, old = ?ev.old.as_ref().map(|o| o.to_string()), new = ?ev.new.as_ref().map(|o| o.to_string()), "ref updated");
            let _ = self.inner.events.send(ev);
        }
    }

    /// Publish the content of `src` as the ref file at `dst` (they are the same inode
    /// when the ref was written in place). Waits for earlier immutable uploads, then
    /// writes with compare-and-swap, then moves `src` over `dst` in the namespace.
    async fn publish_ref(
        &self,
        repo: &Repo,
        repo_key: &str,
        src: u64,
        dst: u64,
    ) -> Result<(), FsError> {
        let dst_key = self.inner.tree.lock().key(dst);
        let rel = dst_key
            .strip_prefix(repo_key)
            .unwrap_or(&dst_key)
            .trim_start_matches('/')
            .to_string();
        self.publish_ref_at(repo, repo_key, src, &rel, None).await
    }

    async fn publish_ref_at(
        &self,
        repo: &Repo,
        repo_key: &str,
        src: u64,
        rel: &str,
        dest: Option<(u64, String)>,
    ) -> Result<(), FsError> {
        let _guard = repo.ref_lock.lock().await;
        let key = format!("{repo_key}/{rel}");
        self.barrier(repo, rel).await?;
        let new_content = Bytes::from(self.read_all(src).await?);
        let old_ino = self.ino_of(&key);
        let (expected, old_content) = match old_ino {
            Some(ino) => {
                let remote = self
                    .inner
                    .tree
                    .lock()
                    .get(ino)?
                    .file()
                    .and_then(|f| f.remote.clone());
                match remote {
                    Some(r) => {
                        let content = if ino == src {
                            None
                        } else {
                            Some(self.read_all(ino).await?)
                        };
                        (Some(r.etag), content)
                    }
                    None => (None, None),
                }
            }
            None => (None, None),
        };
        let old_content = match (&old_content, old_ino, &expected) {
            (None, Some(ino), Some(etag)) if ino == src => {
                // Written in place: the previous value is the stored version.
                match self.inner.cache.get(&key, etag) {
                    Some(mut f) => {
                        let mut buf = Vec::new();
                        f.read_to_end(&mut buf)?;
                        Some(buf)
                    }
                    None => Some(self.inner.store.get_bytes(&key).await?.0.to_vec()),
                }
            }
            _ => old_content,
        };
        let before = self.ref_view(repo_key, rel, old_content.as_deref()).await?;
        let result = self
            .inner
            .store
            .put_cas(&key, new_content.clone(), expected.as_deref())
            .await;
        let info = match result {
            Ok((info, _)) => info,
            Err(StoreError::Conflict(_)) => {
                Stats::inc(&self.inner.stats.ref_conflicts);
                tracing::warn!(key = %key, "ref moved by another writer; refusing the update");
                // Learn the other writer's value so the next attempt starts from it.
                let _ = self.revalidate(repo_key).await;
                return Err(FsError::RefConflict(rel.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        Stats::inc(&self.inner.stats.ref_updates);
        // Move src over the destination name.
        let mut inval = Vec::new();
        let drop_path = {
            let mut tree = self.inner.tree.lock();
            let mut dropped = None;
            if let Some((parent, name)) = &dest {
                if let Some(old) = tree.child(*parent, name) {
                    if old != src {
                        dropped = tree.unlink(old);
                        inval.push(old);
                    }
                }
                move_node(&mut tree, src, *parent, name);
            }
            dropped
        };
        if let Some(p) = drop_path {
            let _ = std::fs::remove_file(p);
        }
        self.mark_stored(src, &key, &info, None);
        self.invalidate(Vec::new(), inval);
        let after = self.ref_view(repo_key, rel, Some(&new_content)).await?;
        self.emit_changes(repo_key, rel, before, after).await;
        Ok(())
    }

    async fn delete_ref(&self, repo_key: &str, rel: &str, ino: u64) -> Result<(), FsError> {
        let repo = self.repo(repo_key);
        let _guard = repo.ref_lock.lock().await;
        let key = format!("{repo_key}/{rel}");
        let old_content = self.read_all(ino).await.ok();
        let before = self.ref_view(repo_key, rel, old_content.as_deref()).await?;
        self.inner.store.delete(&key).await?;
        Stats::inc(&self.inner.stats.ref_updates);
        let generation = self.next_gen();
        let drop_path = {
            let mut tree = self.inner.tree.lock();
            tree.tombstones
                .insert(key.clone(), (generation, Instant::now()));
            tree.unlink(ino)
        };
        if let Some(p) = drop_path {
            let _ = std::fs::remove_file(p);
        }
        let after = self.ref_view(repo_key, rel, None).await?;
        self.emit_changes(repo_key, rel, before, after).await;
        Ok(())
    }

    // ---------------------------------------------------------------- namespace changes

    async fn wait_pending(&self, key: &str) {
        if let Some(rp) = repo_of(key) {
            let repo = self.repo(rp.repo);
            let w = repo.pending.lock().get(key).cloned();
            if let Some(mut w) = w {
                let _ = w.wait_for(|v| v.is_some()).await;
            }
        }
    }

    /// Remove a file.
    pub async fn unlink(&self, parent: u64, name: &str) -> Result<(), FsError> {
        self.check_writable()?;
        check_name(name)?;
        self.ensure_listed(parent).await?;
        let (ino, key, stored) = {
            let tree = self.inner.tree.lock();
            let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
            if ino < FIRST_INO {
                return Err(FsError::ReadOnly);
            }
            let f = tree.get(ino)?.file().ok_or(FsError::IsDir)?;
            (ino, tree.key(ino), f.remote.is_some())
        };
        let class = classify(&key);
        self.wait_pending(&key).await;
        let stored = stored
            || self
                .inner
                .tree
                .lock()
                .nodes
                .get(&ino)
                .and_then(|n| n.file())
                .is_some_and(|f| f.remote.is_some());
        if stored && class == FileClass::Ref {
            let rp = repo_of(&key).expect("refs live in repositories");
            return self.delete_ref(rp.repo, rp.rel, ino).await;
        }
        if stored && class.is_stored() {
            if class == FileClass::Immutable {
                // Objects are deleted only after everything written before is stored,
                // so a repack's new pack is safe before the old ones go.
                if let Some(rp) = repo_of(&key) {
                    let repo = self.repo(rp.repo);
                    self.barrier(&repo, rp.rel).await?;
                }
            }
            self.inner.store.delete(&key).await?;
        }
        let generation = self.next_gen();
        let drop_path = {
            let mut tree = self.inner.tree.lock();
            if stored {
                tree.tombstones
                    .insert(key.clone(), (generation, Instant::now()));
            }
            let etag = tree
                .nodes
                .get(&ino)
                .and_then(|n| n.file())
                .and_then(|f| f.remote.as_ref())
                .map(|r| r.etag.clone());
            if let Some(etag) = etag {
                self.inner.cache.remove(&key, &etag);
            }
            tree.unlink(ino)
        };
        if let Some(p) = drop_path {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// Rename `parent/name` to `newparent/newname`. `noreplace` is `RENAME_NOREPLACE`.
    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        noreplace: bool,
    ) -> Result<(), FsError> {
        self.check_writable()?;
        check_name(name)?;
        check_name(newname)?;
        self.ensure_listed(parent).await?;
        self.ensure_listed(newparent).await?;
        let (src, dst, src_key, dst_key, src_is_dir) = {
            let tree = self.inner.tree.lock();
            let src = tree.child(parent, name).ok_or(FsError::NotFound)?;
            if src < FIRST_INO
                || newparent == CTL_DIR_INO
                || (newparent == ROOT_INO && newname == CTL_DIR_NAME)
            {
                return Err(FsError::ReadOnly);
            }
            tree.get(newparent)?.dir().ok_or(FsError::NotDir)?;
            let dst = tree.child(newparent, newname);
            if dst == Some(src) {
                return Ok(());
            }
            if noreplace && dst.is_some() {
                return Err(FsError::Exists);
            }
            let src_is_dir = tree.get(src)?.dir().is_some();
            if let Some(d) = dst {
                let dn = tree.get(d)?;
                match (src_is_dir, dn.dir()) {
                    (true, Some(dd)) if !dd.children.is_empty() => return Err(FsError::NotEmpty),
                    (true, None) => return Err(FsError::NotDir),
                    (false, Some(_)) => return Err(FsError::IsDir),
                    _ => {}
                }
            }
            // Moving a directory into itself.
            let mut cur = newparent;
            while cur != ROOT_INO {
                if cur == src {
                    return Err(FsError::Invalid(
                        "cannot move a directory into itself".into(),
                    ));
                }
                cur = tree.get(cur)?.parent;
            }
            let dst_key = {
                let pk = tree.key(newparent);
                if pk.is_empty() {
                    newname.to_string()
                } else {
                    format!("{pk}/{newname}")
                }
            };
            (src, dst, tree.key(src), dst_key, src_is_dir)
        };
        if src_is_dir {
            return self.rename_dir(src, dst, newparent, newname);
        }
        let src_class = classify(&src_key);
        let dst_class = classify(&dst_key);
        self.wait_pending(&src_key).await;
        let (src_stored, src_local) = {
            let tree = self.inner.tree.lock();
            let f = tree.get(src)?.file().ok_or(FsError::IsDir)?;
            (
                f.remote.is_some() && src_class.is_stored(),
                f.local.is_some(),
            )
        };
        let src_ref_before = if src_class == FileClass::Ref && src_stored {
            let rp = repo_of(&src_key).expect("refs live in repositories");
            let content = self.read_all(src).await?;
            Some(self.ref_view(rp.repo, rp.rel, Some(&content)).await?)
        } else {
            None
        };
        match dst_class {
            FileClass::Ref => {
                let rp = repo_of(&dst_key).expect("refs live in repositories");
                let repo = self.repo(rp.repo);
                self.publish_ref_at(
                    &repo,
                    rp.repo,
                    src,
                    rp.rel,
                    Some((newparent, newname.to_string())),
                )
                .await?;
            }
            FileClass::Temporary => {
                if src_stored {
                    self.ensure_local(src, true).await?;
                    {
                        let mut tree = self.inner.tree.lock();
                        if let Some(l) =
                            tree.get_mut(src)?.file_mut().and_then(|f| f.local.as_mut())
                        {
                            l.dirty = true;
                        }
                    }
                }
                self.move_replacing(src, newparent, newname);
            }
            FileClass::Immutable if src_local => {
                let already = dst.is_some_and(|d| {
                    self.inner
                        .tree
                        .lock()
                        .nodes
                        .get(&d)
                        .and_then(|n| n.file())
                        .is_some_and(|f| f.remote.is_some() && f.local.is_none())
                });
                if already {
                    // Same name, same content: the store already has it.
                    let p = self.inner.tree.lock().unlink(src);
                    if let Some(p) = p {
                        let _ = std::fs::remove_file(p);
                    }
                } else {
                    {
                        let mut tree = self.inner.tree.lock();
                        if let Some(l) =
                            tree.get_mut(src)?.file_mut().and_then(|f| f.local.as_mut())
                        {
                            l.dirty = true;
                        }
                    }
                    self.move_replacing(src, newparent, newname);
                    let rp = repo_of(&dst_key).expect("immutable files live in repositories");
                    let repo = self.repo(rp.repo);
                    self.spawn_upload(repo, src, dst_key.clone());
                }
            }
            _ if src_local => {
                let (path, version) = {
                    let tree = self.inner.tree.lock();
                    let l = tree
                        .get(src)?
                        .file()
                        .and_then(|f| f.local.as_ref())
                        .ok_or(FsError::NotFound)?;
                    (l.path.clone(), l.version)
                };
                let info = self.inner.store.put_file(&dst_key, &path).await?;
                self.move_replacing(src, newparent, newname);
                self.mark_stored(src, &dst_key, &info, Some(version));
            }
            _ => {
                // Stored under another name: copy in the store.
                self.inner.store.copy(&src_key, &dst_key).await?;
                let info = self
                    .inner
                    .store
                    .head(&dst_key)
                    .await?
                    .ok_or(FsError::NotFound)?;
                self.move_replacing(src, newparent, newname);
                self.mark_stored(src, &dst_key, &info, None);
            }
        }
        if src_stored && src_key != dst_key {
            self.inner.store.delete(&src_key).await?;
            let generation = self.next_gen();
            self.inner
                .tree
                .lock()
                .tombstones
                .insert(src_key.clone(), (generation, Instant::now()));
            if let (FileClass::Ref, Some(before)) = (src_class, src_ref_before) {
                // A ref renamed away is deleted under its old name.
                let rp = repo_of(&src_key).expect("refs live in repositories");
                let after = self.ref_view(rp.repo, rp.rel, None).await?;
                self.emit_changes(rp.repo, rp.rel, before, after).await;
            }
        }
        Ok(())
    }

    fn move_replacing(&self, src: u64, newparent: u64, newname: &str) {
        let (drop, inval) = {
            let mut tree = self.inner.tree.lock();
            let mut drop = None;
            let mut inval = Vec::new();
            if let Some(old) = tree.child(newparent, newname) {
                if old != src {
                    drop = tree.unlink(old);
                    inval.push(old);
                }
            }
            move_node(&mut tree, src, newparent, newname);
            (drop, inval)
        };
        if let Some(p) = drop {
            let _ = std::fs::remove_file(p);
        }
        self.invalidate(Vec::new(), inval);
    }

    fn rename_dir(
        &self,
        src: u64,
        dst: Option<u64>,
        newparent: u64,
        newname: &str,
    ) -> Result<(), FsError> {
        let mut tree = self.inner.tree.lock();
        // Only directories whose files are all local can move: stored keys would all
        // have to be copied. EXDEV makes `mv` fall back to copy and delete.
        let mut stack = vec![src];
        while let Some(d) = stack.pop() {
            let Some(dn) = tree.nodes.get(&d).and_then(|n| n.dir()) else {
                continue;
            };
            for &c in dn.children.values() {
                match tree.nodes.get(&c).map(|n| &n.kind) {
                    Some(NodeKind::Dir(_)) => stack.push(c),
                    Some(NodeKind::File(f)) if f.remote.is_some() => {
                        return Err(FsError::CrossDevice)
                    }
                    _ => {}
                }
            }
        }
        if let Some(d) = dst {
            tree.unlink(d);
        }
        move_node(&mut tree, src, newparent, newname);
        Ok(())
    }

    /// Hard links are not supported; git falls back to rename.
    pub fn link(&self) -> Result<Attr, FsError> {
        self.check_writable()?;
        Err(FsError::NotSupported("link"))
    }
}

fn move_node(tree: &mut Tree, ino: u64, newparent: u64, newname: &str) {
    let (oldparent, oldname) = match tree.nodes.get(&ino) {
        Some(n) => (n.parent, n.name.clone()),
        None => return,
    };
    if let Some(d) = tree.nodes.get_mut(&oldparent).and_then(|n| n.dir_mut()) {
        if d.children.get(&oldname) == Some(&ino) {
            d.children.remove(&oldname);
        }
    }
    if let Some(d) = tree.nodes.get_mut(&newparent).and_then(|n| n.dir_mut()) {
        d.children.insert(newname.to_string(), ino);
    }
    if let Some(n) = tree.nodes.get_mut(&ino) {
        n.parent = newparent;
        n.name = newname.to_string();
        n.ctime = SystemTime::now();
    }
}

fn file_perm(key: &str) -> u16 {
    if classify(key) == FileClass::Immutable {
        0o444
    } else {
        0o644
    }
}
