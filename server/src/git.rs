//! The libgit2 layer: every git2 call of the server lives here. All of it is blocking;
//! the HTTP layer runs it inside `spawn_blocking` and streams what it writes to a
//! [`Sink`] out through a channel.

use crate::pktline;
use crate::protocol::{
    self, AdvertisedRef, Band, FetchRequest, Filter, ReceiveRequest, RefCommand, RefResult,
    RefsSnapshot,
};
use bytes::Bytes;
use git2::{ObjectType, Oid, Repository};
use repofs::refs::Oid as HexOid;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of the git layer.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The request names something this repository cannot serve.
    #[error("{0}")]
    BadRequest(String),
    /// The push is larger than the configured limit.
    #[error("push of more than {0} bytes refused")]
    TooLarge(u64),
    /// The client went away while the response was being written.
    #[error("client disconnected")]
    Disconnected,
    /// libgit2 failed.
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    /// File I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

type Tx = tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>;

/// Where a response body goes: buffered, then sent in chunks through a channel.
pub struct Sink {
    tx: Tx,
    buf: Vec<u8>,
}

impl Sink {
    /// A sink feeding `tx`.
    pub fn new(tx: Tx) -> Self {
        Sink {
            tx,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    /// Append bytes; sends a chunk once 64 KiB are buffered.
    pub fn write(&mut self, data: &[u8]) -> Result<(), GitError> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(())
    }

    /// Send what is buffered.
    pub fn flush(&mut self) -> Result<(), GitError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| GitError::Disconnected)
    }
}

fn hex(oid: Oid) -> HexOid {
    HexOid::parse(&oid.to_string()).expect("libgit2 ids are hex")
}

fn to_oid(h: &HexOid) -> Result<Oid, GitError> {
    Oid::from_str(h.as_str()).map_err(|_| GitError::BadRequest(format!("bad object id {h}")))
}

/// Open a repository directory (`repo.git`), bare or not.
pub fn open(path: &Path) -> Result<Repository, GitError> {
    Ok(Repository::open_bare(path)?)
}

/// Whether `path` holds a repository.
pub fn exists(path: &Path) -> bool {
    path.join("HEAD").is_file() && path.join("objects").is_dir()
}

/// The refs as the protocol advertises them: `HEAD`, then `refs/*` sorted, with
/// annotated tags peeled. Refs whose object is missing are left out (and logged).
pub fn refs_snapshot(repo: &Repository) -> Result<RefsSnapshot, GitError> {
    let mut snap = RefsSnapshot::default();
    if let Ok(head) = repo.find_reference("HEAD") {
        if let Ok(Some(t)) = head.symbolic_target() {
            snap.head_symref = Some(t.to_string());
        }
        if let Ok(r) = head.resolve() {
            if let Some(oid) = r.target() {
                if repo.odb()?.exists(oid) {
                    snap.head = Some(hex(oid));
                }
            }
        }
    }
    let odb = repo.odb()?;
    for r in repo.references()? {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable ref");
                continue;
            }
        };
        let Ok(name) = r.name() else { continue };
        let name = name.to_string();
        if !name.starts_with("refs/") {
            continue;
        }
        let Some(oid) = r.resolve().ok().and_then(|r| r.target()) else {
            continue;
        };
        if !odb.exists(oid) {
            tracing::warn!(refname = %name, %oid, "ref points to a missing object; not advertised");
            continue;
        }
        let peeled = match repo.find_object(oid, None) {
            Ok(o) if o.kind() == Some(ObjectType::Tag) => {
                o.peel(ObjectType::Any).ok().map(|p| hex(p.id()))
            }
            _ => None,
        };
        snap.refs.push(AdvertisedRef {
            name,
            oid: hex(oid),
            peeled,
        });
    }
    snap.refs
        .sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(snap)
}

/// Who a commit is by.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Name.
    pub name: String,
    /// Email.
    pub email: String,
}

/// Create a bare repository at `path`: `HEAD -> refs/heads/main` and one commit of
/// `files` (path, content). Concurrent creators: the loser of the ref race returns Ok.
pub fn create_repo(
    path: &Path,
    files: &[(String, Vec<u8>)],
    who: &Identity,
) -> Result<(), GitError> {
    let mut opts = git2::RepositoryInitOptions::new();
    opts.bare(true)
        .initial_head("main")
        .mkpath(true)
        .no_reinit(false)
        .external_template(false);
    let repo = Repository::init_opts(path, &opts)?;
    let tree = build_tree(&repo, files)?;
    let sig = git2::Signature::now(&who.name, &who.email)?;
    let tree = repo.find_tree(tree)?;
    let commit = repo.commit(None, &sig, &sig, "Initial commit", &tree, &[])?;
    let res = match repo.reference(
        "refs/heads/main",
        commit,
        false,
        "repofs: create repository",
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.code() == git2::ErrorCode::Exists => Ok(()),
        Err(e) => Err(e.into()),
    };
    res
}

/// Write a tree holding `files` (slash-separated paths) and return its id.
pub fn build_tree(repo: &Repository, files: &[(String, Vec<u8>)]) -> Result<Oid, GitError> {
    #[derive(Default)]
    struct Dir {
        files: Vec<(String, Oid)>,
        dirs: std::collections::BTreeMap<String, Dir>,
    }
    fn write(repo: &Repository, d: &Dir) -> Result<Oid, git2::Error> {
        let mut tb = repo.treebuilder(None)?;
        for (name, oid) in &d.files {
            tb.insert(name, *oid, 0o100644)?;
        }
        for (name, sub) in &d.dirs {
            let oid = write(repo, sub)?;
            tb.insert(name, oid, 0o040000)?;
        }
        tb.write()
    }
    let mut root = Dir::default();
    for (p, content) in files {
        let blob = repo.blob(content)?;
        let mut parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
        let Some(file) = parts.pop() else { continue };
        let mut d = &mut root;
        for c in parts {
            d = d.dirs.entry(c.to_string()).or_default();
        }
        d.files.push((file.to_string(), blob));
    }
    Ok(write(repo, &root)?)
}

// ---------------------------------------------------------------------------
// upload-pack

/// Protocol flavour of a fetch response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// v0/v1 stateless negotiation.
    V0,
    /// v2 `fetch` command.
    V2,
}

/// Tunables of pack building.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Threads libgit2 may use for delta search.
    pub threads: u32,
    /// Where packs of full clones are kept for reuse (`None`: no reuse).
    pub cache_dir: Option<PathBuf>,
    /// Bound of that directory in bytes.
    pub cache_bytes: u64,
    /// Server counters.
    pub counters: std::sync::Arc<crate::metrics::Counters>,
}

/// Full-clone packs, kept on local disk. libgit2 cannot reuse deltas from existing
/// packs, so every clone would recompute them; a clone's pack depends only on the
/// wanted commits and the refs (for include-tag), so it is cached under a hash of
/// those and streamed as is to the next clone of the same state. Builds of one key run
/// once at a time (the others wait and reuse).
struct PackCache<'a> {
    dir: &'a Path,
    key: String,
}

fn pack_cache_locks(
) -> &'static parking_lot::Mutex<HashMap<String, std::sync::Arc<parking_lot::Mutex<()>>>> {
    static LOCKS: std::sync::OnceLock<
        parking_lot::Mutex<HashMap<String, std::sync::Arc<parking_lot::Mutex<()>>>>,
    > = std::sync::OnceLock::new();
    LOCKS.get_or_init(Default::default)
}

impl PackCache<'_> {
    fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.pack", self.key))
    }

    /// Keep the directory under `bound` bytes, oldest (by last use) first.
    fn evict(&self, bound: u64) {
        let Ok(rd) = std::fs::read_dir(self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, p) in files {
            if total <= bound {
                break;
            }
            if std::fs::remove_file(&p).is_ok() {
                total -= len;
            }
        }
    }
}

fn err_line(out: &mut Vec<u8>, msg: &str) {
    pktline::encode_data(out, format!("ERR {msg}\n").as_bytes());
}

/// Check that every want exists and is allowed: commits reachable from a ref tip
/// (HTTP is stateless, so any reachable commit is accepted), other objects if present.
fn check_wants(repo: &Repository, snap: &RefsSnapshot, wants: &[Oid]) -> Result<(), String> {
    let odb = repo.odb().map_err(|e| e.to_string())?;
    let mut tips: Vec<Oid> = Vec::new();
    let mut advertised: HashSet<Oid> = HashSet::new();
    for r in &snap.refs {
        if let Ok(o) = Oid::from_str(r.oid.as_str()) {
            advertised.insert(o);
            tips.push(o);
        }
        if let Some(p) = r
            .peeled
            .as_ref()
            .and_then(|p| Oid::from_str(p.as_str()).ok())
        {
            advertised.insert(p);
            tips.push(p);
        }
    }
    if let Some(h) = snap
        .head
        .as_ref()
        .and_then(|h| Oid::from_str(h.as_str()).ok())
    {
        advertised.insert(h);
        tips.push(h);
    }
    for w in wants {
        if advertised.contains(w) {
            continue;
        }
        let Ok((_, kind)) = odb.read_header(*w) else {
            return Err(format!("upload-pack: not our ref {w}"));
        };
        if kind == ObjectType::Commit {
            let reachable = tips
                .iter()
                .any(|t| repo.graph_descendant_of(*t, *w).unwrap_or(false));
            if !reachable {
                return Err(format!("upload-pack: not our ref {w}"));
            }
        }
    }
    Ok(())
}

/// The haves we also have (commits only), in the order the client sent them.
fn common_haves(repo: &Repository, haves: &[Oid]) -> Vec<Oid> {
    haves
        .iter()
        .copied()
        .filter(|h| {
            repo.find_object(*h, None)
                .ok()
                .and_then(|o| o.peel(ObjectType::Commit).ok())
                .is_some()
        })
        .collect()
}

/// git's `ok_to_give_up`: every wanted commit has a common commit in its ancestry.
fn ready(repo: &Repository, wants: &[Oid], commons: &[Oid]) -> bool {
    if commons.is_empty() {
        return false;
    }
    let commons: Vec<Oid> = commons.iter().rev().take(64).copied().collect();
    wants.iter().all(|w| {
        let is_commit = repo
            .find_object(*w, None)
            .map(|o| o.kind() == Some(ObjectType::Commit))
            .unwrap_or(false);
        !is_commit
            || commons
                .iter()
                .any(|c| c == w || repo.graph_descendant_of(*w, *c).unwrap_or(false))
    })
}

/// Answer one fetch request (a v0 round or a v2 `fetch`), writing the whole response.
pub fn fetch(
    path: &Path,
    req: &FetchRequest,
    flavour: Flavour,
    opts: &PackOptions,
    sink: &mut Sink,
) -> Result<(), GitError> {
    let repo = open(path)?;
    let snap = refs_snapshot(&repo)?;
    let mut wants: Vec<Oid> = req.wants.iter().map(to_oid).collect::<Result<_, _>>()?;
    for name in &req.want_refs {
        match snap.refs.iter().find(|r| &r.name == name) {
            Some(r) => wants.push(to_oid(&r.oid)?),
            None => {
                let mut out = Vec::new();
                err_line(&mut out, &format!("unknown ref {name}"));
                sink.write(&out)?;
                return sink.flush();
            }
        }
    }
    if wants.is_empty() {
        // git's probe (`0000`) or a fetch of nothing: an empty answer.
        return sink.flush();
    }
    if let Err(msg) = check_wants(&repo, &snap, &wants) {
        let mut out = Vec::new();
        err_line(&mut out, &msg);
        sink.write(&out)?;
        return sink.flush();
    }
    let haves: Vec<Oid> = req.haves.iter().map(to_oid).collect::<Result<_, _>>()?;
    let client_shallows: Vec<Oid> = req
        .shallows
        .iter()
        .map(to_oid)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|o| repo.find_commit(*o).is_ok())
        .collect();
    let commons = common_haves(&repo, &haves);
    let is_ready = ready(&repo, &wants, &commons);

    let shallow = if req.deepens() {
        match compute_shallow(&repo, req, &wants, &client_shallows) {
            Ok(s) => Some(s),
            Err(msg) => {
                let mut out = Vec::new();
                err_line(&mut out, &msg);
                sink.write(&out)?;
                return sink.flush();
            }
        }
    } else {
        None
    };

    let mut out = Vec::new();
    let send_pack;
    match flavour {
        Flavour::V0 => {
            if let Some(s) = &shallow {
                s.encode(&mut out);
                pktline::encode_flush(&mut out);
            }
            if !req.negotiating {
                // Only the wants (a deepen client's first round): the shallow list
                // is the whole answer.
                sink.write(&out)?;
                return sink.flush();
            }
            let detailed = req.has("multi_ack_detailed");
            let multi = detailed || req.has("multi_ack");
            for (i, c) in commons.iter().enumerate() {
                if req.done {
                    break;
                }
                let l = if detailed {
                    format!("ACK {c} common\n")
                } else if multi {
                    format!("ACK {c} continue\n")
                } else if i == 0 {
                    format!("ACK {c}\n")
                } else {
                    continue;
                };
                pktline::encode_data(&mut out, l.as_bytes());
            }
            let last = commons.last().copied();
            if req.done {
                match last {
                    Some(l) if multi => {
                        pktline::encode_data(&mut out, format!("ACK {l}\n").as_bytes())
                    }
                    Some(_) => {}
                    None => pktline::encode_data(&mut out, b"NAK\n"),
                }
                send_pack = true;
            } else {
                let sent_ready = detailed && is_ready;
                if sent_ready {
                    let l = last.expect("ready implies a common commit");
                    pktline::encode_data(&mut out, format!("ACK {l} ready\n").as_bytes());
                }
                if haves.is_empty() || multi {
                    pktline::encode_data(&mut out, b"NAK\n");
                }
                if req.has("no-done") && sent_ready {
                    let l = last.expect("ready implies a common commit");
                    pktline::encode_data(&mut out, format!("ACK {l}\n").as_bytes());
                    send_pack = true;
                } else {
                    send_pack = false;
                }
            }
        }
        Flavour::V2 => {
            if !req.done {
                pktline::encode_data(&mut out, b"acknowledgments\n");
                if commons.is_empty() {
                    pktline::encode_data(&mut out, b"NAK\n");
                }
                for c in &commons {
                    pktline::encode_data(&mut out, format!("ACK {c}\n").as_bytes());
                }
                if is_ready {
                    pktline::encode_data(&mut out, b"ready\n");
                    pktline::encode_delim(&mut out);
                } else {
                    pktline::encode_flush(&mut out);
                    sink.write(&out)?;
                    return sink.flush();
                }
            }
            if let Some(s) = &shallow {
                pktline::encode_data(&mut out, b"shallow-info\n");
                s.encode(&mut out);
                pktline::encode_delim(&mut out);
            }
            pktline::encode_data(&mut out, b"packfile\n");
            send_pack = true;
        }
    }
    sink.write(&out)?;
    if !send_pack {
        return sink.flush();
    }
    let band = match flavour {
        Flavour::V2 => Band::Large,
        Flavour::V0 => Band::from_caps(|c| req.has(c)),
    };
    let progress = !req.has("no-progress") && band != Band::None;
    let selection = Selection {
        wants: &wants,
        commons: &commons,
        client_shallows: &client_shallows,
        shallow: shallow.as_ref(),
        filter: req.filter,
        include_tag: req.has("include-tag"),
        snap: &snap,
    };
    // Full clones (no haves, no shallow, no filter) reuse a cached pack.
    let cache_key = match &opts.cache_dir {
        Some(_)
            if commons.is_empty()
                && shallow.is_none()
                && req.filter.is_none()
                && client_shallows.is_empty() =>
        {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(path.to_string_lossy().as_bytes());
            let mut w: Vec<String> = wants.iter().map(|w| w.to_string()).collect();
            w.sort();
            w.dedup();
            h.update(w.join(",").as_bytes());
            h.update(if selection.include_tag {
                b"tags"
            } else {
                b"none"
            });
            for r in &snap.refs {
                h.update(format!("{} {} {:?}\n", r.name, r.oid, r.peeled).as_bytes());
            }
            Some(hex::encode(h.finalize()))
        }
        _ => None,
    };
    let cache = match (&opts.cache_dir, cache_key) {
        (Some(dir), Some(key)) => Some(PackCache { dir, key }),
        _ => None,
    };
    let res = match &cache {
        Some(c) => write_pack_cached(&repo, &selection, opts, Framing { band, progress }, sink, c),
        None => write_pack(
            &repo,
            &selection,
            opts,
            Framing { band, progress },
            sink,
            None,
            true,
        ),
    };
    match res {
        Ok(()) => {}
        Err(GitError::Disconnected) => return Err(GitError::Disconnected),
        Err(e) => {
            // Tell the client on band 3 (or as ERR) rather than truncating silently.
            let mut out = Vec::new();
            let msg = format!("repofs: pack generation failed: {e}\n");
            if band == Band::None {
                err_line(&mut out, msg.trim_end());
            } else {
                band.encode(&mut out, 3, msg.as_bytes());
            }
            sink.write(&out)?;
            sink.flush()?;
            return Err(e);
        }
    }
    let mut out = Vec::new();
    if band != Band::None {
        pktline::encode_flush(&mut out);
    }
    sink.write(&out)?;
    sink.flush()
}

/// The outcome of a deepen request.
#[derive(Debug, Default)]
struct Shallow {
    /// Commits to send (within the requested depth).
    include: HashSet<Oid>,
    /// The new shallow boundary (commits whose parents are not sent).
    boundary: HashSet<Oid>,
    /// `shallow` lines: boundary commits the client does not already have as shallow.
    new_shallows: Vec<Oid>,
    /// `unshallow` lines: client shallows that now get their parents.
    unshallows: Vec<Oid>,
}

impl Shallow {
    fn encode(&self, out: &mut Vec<u8>) {
        for s in &self.new_shallows {
            pktline::encode_data(out, format!("shallow {s}\n").as_bytes());
        }
        for u in &self.unshallows {
            pktline::encode_data(out, format!("unshallow {u}\n").as_bytes());
        }
    }
}

fn parents(repo: &Repository, c: Oid) -> Vec<Oid> {
    repo.find_commit(c)
        .map(|c| c.parent_ids().collect())
        .unwrap_or_default()
}

fn commit_roots(repo: &Repository, wants: &[Oid]) -> Vec<Oid> {
    wants
        .iter()
        .filter_map(|w| repo.find_object(*w, None).ok())
        .filter_map(|o| o.peel(ObjectType::Commit).ok())
        .map(|o| o.id())
        .collect()
}

fn compute_shallow(
    repo: &Repository,
    req: &FetchRequest,
    wants: &[Oid],
    client_shallows: &[Oid],
) -> Result<Shallow, String> {
    let roots = commit_roots(repo, wants);
    let client_set: HashSet<Oid> = client_shallows.iter().copied().collect();
    let mut s = Shallow::default();
    if let (Some(n), true) = (req.depth, req.deepen_relative) {
        // Depth counted from the client's current shallow boundary: everything the
        // client has (down to its shallows) plus `n` more generations below them.
        let mut depth: HashMap<Oid, u32> = HashMap::new();
        let mut queue: VecDeque<(Oid, u32)> = VecDeque::new();
        let mut seen = HashSet::new();
        for r in &roots {
            queue.push_back((*r, 0));
        }
        while let Some((c, d)) = queue.pop_front() {
            if !seen.insert((c, d)) {
                continue;
            }
            let prev = depth.get(&c).copied();
            if prev.is_some_and(|p| p <= d) {
                continue;
            }
            depth.insert(c, d);
            let nd = if d > 0 || client_set.contains(&c) {
                d + 1
            } else {
                0
            };
            if nd > n {
                continue;
            }
            for p in parents(repo, c) {
                queue.push_back((p, nd));
            }
        }
        for (c, d) in &depth {
            s.include.insert(*c);
            if *d == n && !parents(repo, *c).is_empty() {
                s.boundary.insert(*c);
            }
        }
    } else if let Some(n) = req.depth {
        // Breadth-first from the wants; a commit's depth is its shortest distance.
        let mut depth: HashMap<Oid, u32> = HashMap::new();
        let mut queue: VecDeque<(Oid, u32)> = roots.iter().map(|r| (*r, 1)).collect();
        while let Some((c, d)) = queue.pop_front() {
            if depth.get(&c).is_some_and(|p| *p <= d) {
                continue;
            }
            depth.insert(c, d);
            if d < n {
                for p in parents(repo, c) {
                    queue.push_back((p, d + 1));
                }
            }
        }
        for (c, d) in &depth {
            s.include.insert(*c);
            if *d >= n && !parents(repo, *c).is_empty() {
                s.boundary.insert(*c);
            }
        }
    } else {
        // deepen-since and/or deepen-not: walk from the wants, stopping at commits
        // older than the cutoff or reachable from an excluded ref.
        let mut excluded: HashSet<Oid> = HashSet::new();
        for name in &req.deepen_not {
            let r = repo
                .revparse_single(name)
                .ok()
                .and_then(|o| o.peel(ObjectType::Commit).ok())
                .ok_or_else(|| format!("git upload-pack: deepen-not is not a ref: {name}"))?;
            let mut walk = repo.revwalk().map_err(|e| e.to_string())?;
            walk.push(r.id()).map_err(|e| e.to_string())?;
            for c in walk.flatten() {
                excluded.insert(c);
            }
        }
        let cutoff = req.deepen_since;
        let keep = |c: Oid| -> bool {
            if excluded.contains(&c) {
                return false;
            }
            match cutoff {
                Some(t) => repo
                    .find_commit(c)
                    .map(|c| c.time().seconds() >= t)
                    .unwrap_or(false),
                None => true,
            }
        };
        let mut queue: VecDeque<Oid> = roots.iter().copied().filter(|c| keep(*c)).collect();
        while let Some(c) = queue.pop_front() {
            if !s.include.insert(c) {
                continue;
            }
            for p in parents(repo, c) {
                if keep(p) {
                    queue.push_back(p);
                } else {
                    s.boundary.insert(c);
                }
            }
        }
        if s.include.is_empty() {
            return Err("git upload-pack: no commits selected for shallow requests".into());
        }
    }
    let mut new_shallows: Vec<Oid> = s
        .boundary
        .iter()
        .copied()
        .filter(|b| !client_set.contains(b))
        .collect();
    new_shallows.sort();
    s.new_shallows = new_shallows;
    let mut unshallows: Vec<Oid> = client_shallows
        .iter()
        .copied()
        .filter(|c| s.include.contains(c) && !s.boundary.contains(c))
        .collect();
    unshallows.sort();
    s.unshallows = unshallows;
    Ok(s)
}

struct Selection<'a> {
    wants: &'a [Oid],
    commons: &'a [Oid],
    client_shallows: &'a [Oid],
    shallow: Option<&'a Shallow>,
    filter: Option<Filter>,
    include_tag: bool,
    snap: &'a RefsSnapshot,
}

/// Throttled progress lines on side band 2.
struct Progress {
    last: Instant,
    enabled: bool,
    band: Band,
}

impl Progress {
    fn line(&mut self, sink: &mut Sink, text: &str, force: bool) -> bool {
        if !self.enabled || (!force && self.last.elapsed() < Duration::from_millis(250)) {
            return true;
        }
        self.last = Instant::now();
        let mut out = Vec::new();
        self.band.encode(&mut out, 2, text.as_bytes());
        sink.write(&out).and_then(|_| sink.flush()).is_ok()
    }
}

fn write_pack_cached(
    repo: &Repository,
    sel: &Selection<'_>,
    opts: &PackOptions,
    framing: Framing,
    sink: &mut Sink,
    cache: &PackCache<'_>,
) -> Result<(), GitError> {
    let Framing { band, progress } = framing;
    let path = cache.path();
    // Under the key's lock: find the pack, or build it into the cache (clients of the
    // same state wait for this one build). The lock is released before streaming, so
    // a slow client never holds up the others.
    let (mut file, hit) = {
        let lock = pack_cache_locks()
            .lock()
            .entry(cache.key.clone())
            .or_default()
            .clone();
        let _g = lock.lock();
        match std::fs::File::open(&path) {
            Ok(f) => (f, true),
            Err(_) => {
                let tmp =
                    cache
                        .dir
                        .join(format!(".tmp-{}-{:016x}", cache.key, rand::random::<u64>()));
                let built = std::fs::create_dir_all(cache.dir)
                    .and_then(|()| std::fs::File::create(&tmp))
                    .map_err(GitError::from)
                    .and_then(|mut f| {
                        write_pack(repo, sel, opts, framing, sink, Some(&mut f), false)?;
                        f.sync_data()?;
                        Ok(())
                    });
                match built.and_then(|()| Ok(std::fs::rename(&tmp, &path)?)) {
                    Ok(()) => {}
                    Err(GitError::Disconnected) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(GitError::Disconnected);
                    }
                    Err(e) => {
                        // The cache could not be written (disk full?): stream directly.
                        let _ = std::fs::remove_file(&tmp);
                        tracing::warn!(error = %e, "pack cache write failed; streaming uncached");
                        let quiet = Framing {
                            band,
                            progress: false,
                        };
                        return write_pack(repo, sel, opts, quiet, sink, None, true);
                    }
                }
                cache.evict(opts.cache_bytes);
                (std::fs::File::open(&path)?, false)
            }
        }
    };
    if hit {
        let _ = file.set_modified(std::time::SystemTime::now());
        crate::metrics::Counters::inc(&opts.counters.pack_cache_hits);
        if progress {
            let mut out = Vec::new();
            band.encode(&mut out, 2, b"repofs: reusing a cached pack\n");
            sink.write(&out)?;
        }
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut framed = Vec::with_capacity(buf.len() + 64);
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        framed.clear();
        band.encode(&mut framed, 1, &buf[..n]);
        sink.write(&framed)?;
    }
    tracing::debug!(key = %cache.key, hit, "sent a cached pack");
    Ok(())
}

/// How pack bytes and progress are framed for the client.
#[derive(Debug, Clone, Copy)]
struct Framing {
    band: Band,
    progress: bool,
}

/// Build a pack with libgit2. Its bytes go to `tee` (the pack cache) if given, and to
/// the client when `stream`.
fn write_pack(
    repo: &Repository,
    sel: &Selection<'_>,
    opts: &PackOptions,
    framing: Framing,
    sink: &mut Sink,
    mut tee: Option<&mut std::fs::File>,
    stream: bool,
) -> Result<(), GitError> {
    let Framing { band, progress } = framing;
    let started = Instant::now();
    crate::metrics::Counters::inc(&opts.counters.packs_built);
    let mut pb = repo.packbuilder()?;
    pb.set_threads(opts.threads.max(1));
    let roots = commit_roots(repo, sel.wants);
    let root_set: HashSet<Oid> = roots.iter().copied().collect();
    let client_has: HashSet<Oid> = sel.commons.iter().copied().collect();
    let simple = sel.shallow.is_none() && sel.filter.is_none() && sel.client_shallows.is_empty();

    // Commits being sent (general path only), for include-tag.
    let mut sent_commits: HashSet<Oid> = HashSet::new();
    if simple {
        let mut walk = repo.revwalk()?;
        for r in &roots {
            walk.push(*r)?;
        }
        for h in sel.commons {
            walk.hide(*h)?;
        }
        pb.insert_walk(&mut walk)?;
    } else {
        let commits: Vec<Oid> = match sel.shallow {
            Some(s) => {
                // Everything within the new depth the client does not have. What the
                // client has: the ancestry of its haves, down to its shallow commits.
                let stops: HashSet<Oid> = sel.client_shallows.iter().copied().collect();
                let mut has: HashSet<Oid> = HashSet::new();
                let mut queue: VecDeque<Oid> = sel.commons.iter().copied().collect();
                while let Some(c) = queue.pop_front() {
                    if !has.insert(c) || stops.contains(&c) {
                        continue;
                    }
                    queue.extend(parents(repo, c));
                }
                let mut v: Vec<Oid> = s
                    .include
                    .iter()
                    .copied()
                    .filter(|c| !has.contains(c))
                    .collect();
                // Unshallowed commits are on the client already; their parents are sent.
                v.retain(|c| !s.unshallows.contains(c));
                v
            }
            None => {
                let mut walk = repo.revwalk()?;
                for r in &roots {
                    walk.push(*r)?;
                }
                for h in sel.commons {
                    walk.hide(*h)?;
                }
                for s in sel.client_shallows {
                    // Never walk below what a shallow client has.
                    let _ = walk.hide(*s);
                }
                walk.flatten().collect()
            }
        };
        let commit_set: HashSet<Oid> = commits.iter().copied().collect();
        let boundary: HashSet<Oid> = sel.shallow.map(|s| s.boundary.clone()).unwrap_or_default();
        // Trees the client already has: those of the commits it has at our edge.
        let mut seen: HashSet<Oid> = HashSet::new();
        let mut edges: HashSet<Oid> = client_has.clone();
        for c in &commits {
            if boundary.contains(c) {
                continue;
            }
            for p in parents(repo, *c) {
                if !commit_set.contains(&p) {
                    edges.insert(p);
                }
            }
        }
        if let Some(s) = sel.shallow {
            edges.extend(s.unshallows.iter().copied());
        }
        for e in edges {
            if let Ok(c) = repo.find_commit(e) {
                mark_tree_seen(repo, c.tree_id(), &mut seen)?;
            }
        }
        let filter = sel.filter;
        let odb = repo.odb()?;
        for c in &commits {
            let commit = repo.find_commit(*c)?;
            pb.insert_object(*c, None)?;
            if filter != Some(Filter::TreeZero) {
                insert_tree(repo, &odb, &mut pb, commit.tree_id(), filter, &mut seen)?;
            }
        }
        sent_commits.extend(commits);
    }
    // Wanted objects that are not commits (tags, and blobs of a lazy partial fetch).
    for w in sel.wants {
        if root_set.contains(w) {
            continue;
        }
        let obj = repo.find_object(*w, None)?;
        match obj.kind() {
            Some(ObjectType::Tag) => {
                insert_tag_chain(repo, &mut pb, *w)?;
            }
            Some(ObjectType::Tree) => {
                if sel.filter.is_some() {
                    pb.insert_object(*w, None)?;
                } else {
                    pb.insert_tree(*w)?;
                }
            }
            _ => pb.insert_object(*w, None)?,
        }
    }
    if sel.include_tag {
        for r in &sel.snap.refs {
            let Some(peeled) = &r.peeled else { continue };
            let (Ok(tag), Ok(target)) = (to_oid(&r.oid), to_oid(peeled)) else {
                continue;
            };
            // Sent: in the commit set (general path), or reachable from a want and not
            // from a common commit (revwalk path; a check per annotated tag instead of
            // a second walk of the whole history).
            let reaches = |from: &Oid| {
                *from == target || repo.graph_descendant_of(*from, target).unwrap_or(false)
            };
            let sent = root_set.contains(&target)
                || if simple {
                    roots.iter().any(reaches) && !sel.commons.iter().any(reaches)
                } else {
                    sent_commits.contains(&target)
                };
            if sent {
                insert_tag_chain(repo, &mut pb, tag)?;
            }
        }
    }

    let mut prog = Progress {
        last: Instant::now(),
        enabled: progress,
        band,
    };
    let total = pb.object_count();
    prog.line(
        sink,
        &format!("Enumerating objects: {total}, done.\n"),
        true,
    );
    // The delta search runs inside libgit2 before the first byte of the pack; report
    // on it (through a second handle on the same channel) so a long build shows
    // progress instead of silence.
    sink.flush()?;
    if progress {
        let mut side = Sink::new(sink.tx.clone());
        pb.set_progress_callback(move |stage, cur, tot| {
            if let (git2::PackBuilderStage::Deltafication, true) = (stage, tot > 0) {
                let pct = (cur as u64 * 100) / tot as u64;
                let text = format!("Compressing objects: {pct:>3}% ({cur}/{tot})\r");
                return prog.line(&mut side, &text, false);
            }
            true
        })?;
    }
    let mut chunk = Vec::with_capacity(64 * 1024);
    let mut failed = false;
    let mut tee_failed = false;
    let mut first = true;
    pb.foreach(|data| {
        if first && progress {
            first = false;
            let mut out = Vec::new();
            band.encode(
                &mut out,
                2,
                format!("Compressing objects: 100% ({total}/{total}), done.\n").as_bytes(),
            );
            if sink.write(&out).is_err() {
                failed = true;
                return false;
            }
        }
        if let Some(f) = tee.as_mut() {
            if f.write_all(data).is_err() {
                tee_failed = true;
                return false;
            }
        }
        if !stream {
            return true;
        }
        chunk.clear();
        band.encode(&mut chunk, 1, data);
        if sink.write(&chunk).is_err() {
            failed = true;
            return false;
        }
        true
    })
    .map_err(|e| {
        if failed {
            GitError::Disconnected
        } else if tee_failed {
            GitError::Io(io::Error::other("writing the pack cache failed"))
        } else {
            e.into()
        }
    })?;
    if failed {
        return Err(GitError::Disconnected);
    }
    if tee_failed {
        return Err(GitError::Io(io::Error::other(
            "writing the pack cache failed",
        )));
    }
    tracing::debug!(
        objects = total,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "pack sent"
    );
    Ok(())
}

fn insert_tag_chain(
    repo: &Repository,
    pb: &mut git2::PackBuilder<'_>,
    tag: Oid,
) -> Result<(), GitError> {
    let mut cur = tag;
    for _ in 0..16 {
        let obj = repo.find_object(cur, None)?;
        match obj.kind() {
            Some(ObjectType::Tag) => {
                pb.insert_object(cur, None)?;
                cur = obj.as_tag().expect("kind is tag").target_id();
            }
            Some(ObjectType::Commit) => {
                pb.insert_commit(cur)?;
                return Ok(());
            }
            Some(ObjectType::Tree) => {
                pb.insert_tree(cur)?;
                return Ok(());
            }
            _ => {
                pb.insert_object(cur, None)?;
                return Ok(());
            }
        }
    }
    Ok(())
}

fn mark_tree_seen(repo: &Repository, tree: Oid, seen: &mut HashSet<Oid>) -> Result<(), GitError> {
    if !seen.insert(tree) {
        return Ok(());
    }
    let t = repo.find_tree(tree)?;
    for e in t.iter() {
        match e.kind() {
            Some(ObjectType::Tree) => mark_tree_seen(repo, e.id(), seen)?,
            Some(ObjectType::Blob) => {
                seen.insert(e.id());
            }
            _ => {}
        }
    }
    Ok(())
}

fn insert_tree(
    repo: &Repository,
    odb: &git2::Odb<'_>,
    pb: &mut git2::PackBuilder<'_>,
    tree: Oid,
    filter: Option<Filter>,
    seen: &mut HashSet<Oid>,
) -> Result<(), GitError> {
    if !seen.insert(tree) {
        return Ok(());
    }
    pb.insert_object(tree, None)?;
    let t = repo.find_tree(tree)?;
    for e in t.iter() {
        match e.kind() {
            Some(ObjectType::Tree) => insert_tree(repo, odb, pb, e.id(), filter, seen)?,
            Some(ObjectType::Blob) => {
                let id = e.id();
                if seen.contains(&id) {
                    continue;
                }
                let send = match filter {
                    None => true,
                    Some(Filter::BlobNone) | Some(Filter::TreeZero) => false,
                    Some(Filter::BlobLimit(n)) => {
                        odb.read_header(id).map(|(sz, _)| sz as u64 <= n)?
                    }
                };
                if send {
                    seen.insert(id);
                    pb.insert_object(id, None)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// v2 `object-info`: the size of each object.
pub fn object_info(path: &Path, oids: &[HexOid]) -> Result<Vec<u8>, GitError> {
    let repo = open(path)?;
    let odb = repo.odb()?;
    let mut out = Vec::new();
    pktline::encode_data(&mut out, b"size\n");
    for o in oids {
        let (size, _) = odb
            .read_header(to_oid(o)?)
            .map_err(|_| GitError::BadRequest(format!("object-info: unknown object {o}")))?;
        pktline::encode_data(&mut out, format!("{o} {size}\n").as_bytes());
    }
    pktline::encode_flush(&mut out);
    Ok(out)
}

// ---------------------------------------------------------------------------
// receive-pack

/// Push policy.
#[derive(Debug, Clone)]
pub struct PushPolicy {
    /// Accept updates of branches that are not fast-forwards.
    pub allow_non_fast_forward: bool,
    /// Largest accepted request body (after decompression).
    pub max_bytes: u64,
    /// Local directory for indexing incoming packs before they move to the mount.
    pub tmp_dir: PathBuf,
}

/// What a push did, for the caller (events, sync, logs).
#[derive(Debug, Default)]
pub struct PushOutcome {
    /// The report-status body (already side-band wrapped if asked for).
    pub response: Vec<u8>,
    /// Refs that moved: (name, old, new); zero new = deleted.
    pub updated: Vec<(String, HexOid, HexOid)>,
    /// Push options sent by the client.
    pub push_options: Vec<String>,
    /// The branch `HEAD` points to.
    pub head_branch: Option<String>,
    /// Warnings for the pusher (side band 2).
    pub messages: Vec<String>,
    /// The client asked for side band (so messages can be sent).
    pub sideband: bool,
    /// Which side band.
    pub band: Band,
}

/// A reader that counts bytes and refuses more than a limit.
struct Limited<R> {
    inner: R,
    read: u64,
    max: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.max {
            return Err(io::Error::other(TooLargeMarker));
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct TooLargeMarker;
impl std::fmt::Display for TooLargeMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request too large")
    }
}
impl std::error::Error for TooLargeMarker {}

fn io_to_git(e: io::Error, max: u64) -> GitError {
    if e.get_ref().is_some_and(|i| i.is::<TooLargeMarker>()) {
        GitError::TooLarge(max)
    } else {
        GitError::Io(e)
    }
}

/// Read the command section, index the pack against the repository's objects, check
/// every command, then move refs with compare-and-swap. `body` is the (decompressed)
/// request body. A request that is not a valid receive-pack request fails with
/// [`GitError::BadRequest`] before anything is written.
pub fn receive_pack(
    path: &Path,
    body: impl Read,
    policy: &PushPolicy,
) -> Result<PushOutcome, GitError> {
    let mut body = Limited {
        inner: body,
        read: 0,
        max: policy.max_bytes,
    };
    // 1. The command list. Packets are framed as they arrive and the list is parsed
    // only when a flush ends a section (re-parsing on every read would be quadratic).
    let mut head: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut framed_to = 0;
    let bad = |e: &dyn std::fmt::Display| GitError::BadRequest(e.to_string());
    let req = 'read: loop {
        let n = body
            .read(&mut buf)
            .map_err(|e| io_to_git(e, policy.max_bytes))?;
        if n == 0 {
            return Err(GitError::BadRequest(
                "request ended before the end of the command list".into(),
            ));
        }
        head.extend_from_slice(&buf[..n]);
        loop {
            match pktline::decode(&head[framed_to..]).map_err(|e| bad(&e))? {
                pktline::Decoded::Incomplete { .. } => break,
                pktline::Decoded::Complete { packet, consumed } => {
                    framed_to += consumed;
                    if packet == pktline::Packet::Flush {
                        if let Some(r) = protocol::parse_receive_head(&head).map_err(|e| bad(&e))? {
                            break 'read r;
                        }
                    }
                }
            }
        }
        if head.len() > 16 << 20 {
            return Err(GitError::BadRequest(
                "command list longer than 16 MiB".into(),
            ));
        }
    };
    receive_rest(path, req, head, body, policy, buf)
}

/// The rest of a push once its command list is read: the pack, the checks, the refs.
fn receive_rest(
    path: &Path,
    req: protocol::ReceiveRequest,
    mut head: Vec<u8>,
    mut body: Limited<impl Read>,
    policy: &PushPolicy,
    mut buf: Vec<u8>,
) -> Result<PushOutcome, GitError> {
    let leftover = head.split_off(req.pack_offset);
    if req.commands.is_empty() {
        if !leftover.is_empty()
            || body
                .read(&mut buf)
                .map_err(|e| io_to_git(e, policy.max_bytes))?
                > 0
        {
            return Err(GitError::BadRequest(
                "data after an empty command list".into(),
            ));
        }
        return Ok(PushOutcome::default());
    }
    let repo = open(path)?;

    // 2. The pack, indexed into a local temp dir, then moved into objects/pack.
    let mut unpack_error: Option<String> = None;
    if req.expects_pack() {
        match index_pack(&repo, path, leftover, &mut body, policy) {
            Ok(()) => {}
            Err(GitError::BadRequest(m)) => return Err(GitError::BadRequest(m)),
            Err(GitError::TooLarge(n)) => return Err(GitError::TooLarge(n)),
            Err(e) => unpack_error = Some(e.to_string()),
        }
    } else if !leftover.is_empty()
        || body
            .read(&mut buf)
            .map_err(|e| io_to_git(e, policy.max_bytes))?
            > 0
    {
        return Err(GitError::BadRequest(
            "unexpected data after a delete-only command list".into(),
        ));
    }
    // Re-open so libgit2 sees the new pack.
    let repo = if unpack_error.is_none() {
        open(path)?
    } else {
        repo
    };

    // 3. Check, then update.
    let mut messages = Vec::new();
    let results = update_refs(&repo, &req, unpack_error.as_deref(), policy, &mut messages)?;
    let mut outcome = PushOutcome {
        push_options: req.push_options.clone(),
        head_branch: head_branch(&repo),
        messages,
        // `quiet` only turns off progress; messages about the push still go out.
        sideband: req.has("side-band-64k") || req.has("side-band"),
        band: Band::from_caps(|c| req.has(c)),
        ..Default::default()
    };
    for (cmd, r) in req.commands.iter().zip(&results) {
        if r.error.is_none() {
            outcome
                .updated
                .push((cmd.name.clone(), cmd.old.clone(), cmd.new.clone()));
        }
    }
    let report = protocol::report_status(unpack_error.as_deref(), &results);
    let wants_report = req.has("report-status") || req.has("report-status-v2");
    if wants_report {
        let band = Band::from_caps(|c| req.has(c));
        let mut out = Vec::new();
        band.encode(&mut out, 1, &report);
        if band != Band::None {
            pktline::encode_flush(&mut out);
        }
        outcome.response = out;
    }
    Ok(outcome)
}

fn index_pack(
    repo: &Repository,
    path: &Path,
    leftover: Vec<u8>,
    body: &mut impl Read,
    policy: &PushPolicy,
) -> Result<(), GitError> {
    std::fs::create_dir_all(&policy.tmp_dir)?;
    let tmp = tempfile::Builder::new()
        .prefix("incoming-")
        .tempdir_in(&policy.tmp_dir)?;
    let odb = repo.odb()?;
    // verify=false: libgit2's verification looks every referenced object up in the
    // odb, and each miss rescans objects/pack (over FUSE, minutes for a big push).
    // Connectivity is checked below instead, before any ref moves (check_connected).
    let mut indexer = git2::Indexer::new(Some(&odb), tmp.path(), 0o444, false)?;
    let mut checked_magic = leftover.len() >= 4;
    if checked_magic && &leftover[..4] != b"PACK" {
        return Err(GitError::BadRequest(
            "the data after the commands is not a pack".into(),
        ));
    }
    let mut pending = leftover;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        if !pending.is_empty() {
            if !checked_magic && pending.len() >= 4 {
                if &pending[..4] != b"PACK" {
                    return Err(GitError::BadRequest(
                        "the data after the commands is not a pack".into(),
                    ));
                }
                checked_magic = true;
            }
            if checked_magic {
                indexer.write_all(&pending)?;
                total += pending.len() as u64;
                pending.clear();
            }
        }
        let n = body
            .read(&mut buf)
            .map_err(|e| io_to_git(e, policy.max_bytes))?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
    }
    if !checked_magic {
        return Err(GitError::BadRequest(
            "the pack is missing or truncated".into(),
        ));
    }
    if !pending.is_empty() {
        indexer.write_all(&pending)?;
        total += pending.len() as u64;
    }
    let name = indexer.commit()?;
    let pack = tmp.path().join(format!("pack-{name}.pack"));
    let idx = tmp.path().join(format!("pack-{name}.idx"));
    let count = std::fs::metadata(&idx).map(|m| m.len()).unwrap_or(0);
    // An idx of a 0-object pack is 1072 bytes (header + fanout + trailer); skip those.
    if count <= 1072 {
        return Ok(());
    }
    let pack_dir = path.join("objects").join("pack");
    std::fs::create_dir_all(&pack_dir)?;
    let final_pack = pack_dir.join(format!("pack-{name}.pack"));
    let final_idx = pack_dir.join(format!("pack-{name}.idx"));
    if final_idx.exists() {
        return Ok(());
    }
    // Pack first, index last: readers find packs through their .idx. Each file goes
    // through a temporary name so nobody sees it half written.
    let rnd: u64 = rand::random();
    let tmp_pack = pack_dir.join(format!("tmp_pack_repofs_{rnd:016x}"));
    let tmp_idx = pack_dir.join(format!("tmp_idx_repofs_{rnd:016x}"));
    copy_durable(&pack, &tmp_pack)?;
    std::fs::rename(&tmp_pack, &final_pack)?;
    copy_durable(&idx, &tmp_idx)?;
    std::fs::rename(&tmp_idx, &final_idx)?;
    tracing::info!(pack = %name, bytes = total, "pack received");
    Ok(())
}

fn copy_durable(from: &Path, to: &Path) -> io::Result<()> {
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::File::create(to)?;
    io::copy(&mut src, &mut dst)?;
    dst.sync_all()
}

fn current_target(repo: &Repository, name: &str) -> Option<Oid> {
    repo.find_reference(name).ok().and_then(|r| r.target())
}

fn update_refs(
    repo: &Repository,
    req: &ReceiveRequest,
    unpack_error: Option<&str>,
    policy: &PushPolicy,
    messages: &mut Vec<String>,
) -> Result<Vec<RefResult>, GitError> {
    let head_target = repo
        .find_reference("HEAD")
        .ok()
        .and_then(|h| h.symbolic_target().ok().flatten().map(String::from));
    let odb = repo.odb()?;
    // Pre-checks, nothing written yet.
    let mut errors: Vec<Option<String>> = req
        .commands
        .iter()
        .map(|c| {
            if unpack_error.is_some() {
                return Some("unpacker error".to_string());
            }
            if let Err(e) = check_command(repo, &odb, c, head_target.as_deref(), policy) {
                return Some(e);
            }
            // The default branch becomes blocks: refuse files that cannot.
            if head_target.as_deref() == Some(c.name.as_str()) && !c.new.is_zero() {
                let old = Oid::from_str(c.old.as_str()).ok().filter(|o| !o.is_zero());
                let new = Oid::from_str(c.new.as_str()).ok()?;
                match check_block_files(repo, old, new) {
                    Ok(w) => messages.extend(w),
                    Err(e) => return Some(e),
                }
            }
            None
        })
        .collect();
    let atomic = req.has("atomic");
    if atomic && errors.iter().any(|e| e.is_some()) {
        for e in errors.iter_mut() {
            if e.is_none() {
                *e = Some("atomic push failure".into());
            }
        }
    }
    if errors.iter().all(|e| e.is_some()) {
        return Ok(results(req, errors));
    }
    let msg = "push";
    if atomic {
        if let Err(e) = apply_atomic(repo, &req.commands, msg) {
            for err in errors.iter_mut() {
                *err = Some(format!("atomic transaction failed: {}", e.message()));
            }
        }
    } else {
        for (c, err) in req.commands.iter().zip(errors.iter_mut()) {
            if err.is_some() {
                continue;
            }
            if let Err(e) = apply_one(repo, c, msg) {
                *err = Some(e);
            }
        }
    }
    Ok(results(req, errors))
}

fn results(req: &ReceiveRequest, errors: Vec<Option<String>>) -> Vec<RefResult> {
    req.commands
        .iter()
        .zip(errors)
        .map(|(c, error)| RefResult {
            name: c.name.clone(),
            error,
        })
        .collect()
}

fn check_command(
    repo: &Repository,
    odb: &git2::Odb<'_>,
    c: &RefCommand,
    head_target: Option<&str>,
    policy: &PushPolicy,
) -> Result<(), String> {
    let current = current_target(repo, &c.name);
    let old = if c.old.is_zero() {
        None
    } else {
        Some(to_oid(&c.old).map_err(|e| e.to_string())?)
    };
    if current != old {
        return Err(match current {
            Some(_) if old.is_none() => "already exists".into(),
            _ => "stale info (the ref moved since it was read)".into(),
        });
    }
    if c.new.is_zero() {
        if current.is_none() {
            return Err("no such ref".into());
        }
        if head_target == Some(c.name.as_str()) {
            return Err("refusing to delete the current branch (the default branch)".into());
        }
        return Ok(());
    }
    let new = to_oid(&c.new).map_err(|e| e.to_string())?;
    let Ok((_, kind)) = odb.read_header(new) else {
        return Err(format!("missing object {new}"));
    };
    // Every object reachable from the new value must be here before the ref moves.
    if let Some(commit) = repo
        .find_object(new, None)
        .ok()
        .and_then(|o| o.peel(ObjectType::Commit).ok())
    {
        let old_commit = old
            .and_then(|o| repo.find_object(o, None).ok())
            .and_then(|o| o.peel(ObjectType::Commit).ok())
            .map(|o| o.id());
        check_connected(repo, commit.id(), old_commit)?;
    }
    if c.name.starts_with("refs/heads/") {
        if kind != ObjectType::Commit {
            return Err(format!(
                "trying to write non-commit object {new} to a branch"
            ));
        }
        if let Some(old) = old {
            if !policy.allow_non_fast_forward
                && old != new
                && !repo.graph_descendant_of(new, old).unwrap_or(false)
            {
                return Err("non-fast-forward".into());
            }
        }
    }
    Ok(())
}

/// Walk the commits new since `old` and make sure their trees and blobs are present.
fn check_connected(repo: &Repository, new: Oid, old: Option<Oid>) -> Result<(), String> {
    let mut walk = repo.revwalk().map_err(|e| e.to_string())?;
    walk.push(new).map_err(|e| e.to_string())?;
    if let Some(o) = old {
        let _ = walk.hide(o);
    }
    let odb = repo.odb().map_err(|e| e.to_string())?;
    let mut seen = HashSet::new();
    for c in walk {
        let c = c.map_err(|e| format!("missing commit: {e}"))?;
        let commit = repo
            .find_commit(c)
            .map_err(|e| format!("missing commit {c}: {e}"))?;
        let mut stack = vec![commit.tree_id()];
        while let Some(t) = stack.pop() {
            if !seen.insert(t) {
                continue;
            }
            let tree = repo.find_tree(t).map_err(|_| format!("missing tree {t}"))?;
            for e in tree.iter() {
                match e.kind() {
                    Some(ObjectType::Tree) => stack.push(e.id()),
                    Some(ObjectType::Blob) if seen.insert(e.id()) && !odb.exists(e.id()) => {
                        return Err(format!("missing blob {}", e.id()));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

fn apply_one(repo: &Repository, c: &RefCommand, msg: &str) -> Result<(), String> {
    let res = if c.new.is_zero() {
        let old = to_oid(&c.old).map_err(|e| e.to_string())?;
        match repo.find_reference(&c.name) {
            Ok(mut r) if r.target() == Some(old) => r.delete(),
            Ok(_) => return Err("stale info (the ref moved since it was read)".into()),
            Err(e) => Err(e),
        }
    } else {
        let new = to_oid(&c.new).map_err(|e| e.to_string())?;
        if c.old.is_zero() {
            repo.reference(&c.name, new, false, msg).map(|_| ())
        } else {
            let old = to_oid(&c.old).map_err(|e| e.to_string())?;
            repo.reference_matching(&c.name, new, true, old, msg)
                .map(|_| ())
        }
    };
    res.map_err(|e| match e.code() {
        git2::ErrorCode::Modified | git2::ErrorCode::Exists | git2::ErrorCode::Locked => {
            format!("the ref changed concurrently ({})", e.message())
        }
        _ => format!("failed to update ref: {}", e.message()),
    })
}

fn apply_atomic(repo: &Repository, cmds: &[RefCommand], msg: &str) -> Result<(), git2::Error> {
    let mut tx = repo.transaction()?;
    for c in cmds {
        tx.lock_ref(&c.name)?;
    }
    // Locked: nobody else can move them through this mount; re-check old values.
    for c in cmds {
        let cur = current_target(repo, &c.name);
        let old = if c.old.is_zero() {
            None
        } else {
            Oid::from_str(c.old.as_str()).ok()
        };
        if cur != old {
            return Err(git2::Error::from_str(&format!(
                "{} moved concurrently",
                c.name
            )));
        }
    }
    for c in cmds {
        if c.new.is_zero() {
            tx.remove(&c.name)?;
        } else {
            let new = Oid::from_str(c.new.as_str())?;
            tx.set_target(&c.name, new, None, msg)?;
        }
    }
    tx.commit()
}

// ---------------------------------------------------------------------------
// blocks: push-time checks, sync plans, block writes

/// The branch `HEAD` points to (`refs/heads/main`).
pub fn head_branch(repo: &Repository) -> Option<String> {
    repo.find_reference("HEAD")
        .ok()
        .and_then(|h| h.symbolic_target().ok().flatten().map(String::from))
}

/// A `.md` file of a tree that maps to a block label.
#[derive(Debug, Clone)]
pub struct BlockFile {
    /// Path in the tree.
    pub path: String,
    /// Its label.
    pub label: String,
    /// Parsed content.
    pub parsed: crate::blocks::ParsedBlock,
    /// The file was not valid UTF-8 (decoded lossily).
    pub not_utf8: bool,
}

fn read_block_file(
    repo: &Repository,
    path: &str,
    blob: Oid,
) -> Result<Option<BlockFile>, GitError> {
    let Some(label) = crate::blocks::label_for_path(path) else {
        return Ok(None);
    };
    let blob = repo.find_blob(blob)?;
    let (text, not_utf8) = match std::str::from_utf8(blob.content()) {
        Ok(s) => (s.to_string(), false),
        Err(_) => (String::from_utf8_lossy(blob.content()).into_owned(), true),
    };
    Ok(Some(BlockFile {
        path: path.to_string(),
        label,
        parsed: crate::blocks::parse(&text),
        not_utf8,
    }))
}

/// Changes between two trees as block files: (upserted or changed files, removed
/// paths). `old = None` lists every file of `new`.
fn block_changes(
    repo: &Repository,
    old: Option<&git2::Tree<'_>>,
    new: Option<&git2::Tree<'_>>,
) -> Result<(Vec<BlockFile>, Vec<String>), GitError> {
    let mut opts = git2::DiffOptions::new();
    opts.ignore_submodules(true).skip_binary_check(true);
    let diff = repo.diff_tree_to_tree(old, new, Some(&mut opts))?;
    let mut upserts = Vec::new();
    let mut removed = Vec::new();
    for d in diff.deltas() {
        let path_of = |f: &git2::DiffFile<'_>| f.path().and_then(|p| p.to_str()).map(String::from);
        match d.status() {
            git2::Delta::Deleted => {
                if let Some(p) = path_of(&d.old_file()) {
                    removed.push(p);
                }
            }
            git2::Delta::Added
            | git2::Delta::Modified
            | git2::Delta::Typechange
            | git2::Delta::Renamed
            | git2::Delta::Copied => {
                if d.status() == git2::Delta::Renamed {
                    if let Some(p) = path_of(&d.old_file()) {
                        removed.push(p);
                    }
                }
                let f = d.new_file();
                if f.mode() != git2::FileMode::Blob && f.mode() != git2::FileMode::BlobExecutable {
                    if let Some(p) = path_of(&f) {
                        removed.push(p);
                    }
                    continue;
                }
                if let Some(p) = path_of(&f) {
                    if let Some(b) = read_block_file(repo, &p, f.id())? {
                        upserts.push(b);
                    }
                }
            }
            _ => {}
        }
    }
    Ok((upserts, removed))
}

/// Push-time checks of the files a branch update would turn into blocks. Returns
/// warnings for the pusher, or the reason to refuse (naming the file).
fn check_block_files(repo: &Repository, old: Option<Oid>, new: Oid) -> Result<Vec<String>, String> {
    let new_tree = repo
        .find_commit(new)
        .and_then(|c| c.tree())
        .map_err(|e| e.message().to_string())?;
    let old_tree = old
        .and_then(|o| repo.find_commit(o).ok())
        .and_then(|c| c.tree().ok());
    let (files, _) =
        block_changes(repo, old_tree.as_ref(), Some(&new_tree)).map_err(|e| e.to_string())?;
    let mut warnings = Vec::new();
    for f in files {
        if f.not_utf8 {
            return Err(format!("{}: not valid UTF-8", f.path));
        }
        if let Some(e) = f.parsed.errors.first() {
            return Err(format!("{}: {e}", f.path));
        }
        let limit = f.parsed.limit.unwrap_or(crate::blocks::DEFAULT_LIMIT);
        let n = f.parsed.value.chars().count() as i64;
        if n > limit {
            return Err(format!(
                "{}: value is {n} characters, over its limit of {limit}",
                f.path
            ));
        }
        for w in f.parsed.warnings {
            warnings.push(format!("warning: {}: {w}", f.path));
        }
    }
    Ok(warnings)
}

/// What a sync has to do to bring an agent's blocks to the branch tip.
#[derive(Debug, Default)]
pub struct SyncPlan {
    /// The tip of `HEAD`'s branch (`None`: unborn or no repository).
    pub tip: Option<HexOid>,
    /// `true`: `upserts` is every block file and other labels must be detached.
    pub full: bool,
    /// Block files added or changed.
    pub upserts: Vec<BlockFile>,
    /// Labels whose file is gone (incremental plans only).
    pub removed: Vec<String>,
}

/// Compute a sync plan from `last` (the last synced commit) to the current tip: a tree
/// diff when `last` is an ancestor of the tip, a full listing otherwise.
/// `hint`: the tip a ref event reported, used instead of reading the ref when present.
pub fn sync_plan(
    path: &Path,
    last: Option<&str>,
    hint: Option<&str>,
) -> Result<SyncPlan, GitError> {
    if !exists(path) {
        return Ok(SyncPlan::default());
    }
    let repo = open(path)?;
    let Some(branch) = head_branch(&repo) else {
        return Ok(SyncPlan::default());
    };
    let hinted = hint
        .and_then(|h| Oid::from_str(h).ok())
        .filter(|h| repo.find_commit(*h).is_ok());
    let Some(tip) = hinted.or_else(|| current_target(&repo, &branch)) else {
        return Ok(SyncPlan::default());
    };
    let mut plan = SyncPlan {
        tip: Some(hex(tip)),
        ..Default::default()
    };
    let last = last.and_then(|l| Oid::from_str(l).ok());
    if last == Some(tip) {
        return Ok(plan);
    }
    let tip_tree = repo.find_commit(tip)?.tree()?;
    let incremental_base = last.filter(|l| {
        repo.find_commit(*l).is_ok() && repo.graph_descendant_of(tip, *l).unwrap_or(false)
    });
    match incremental_base {
        Some(base) => {
            let base_tree = repo.find_commit(base)?.tree()?;
            let (upserts, removed) = block_changes(&repo, Some(&base_tree), Some(&tip_tree))?;
            plan.upserts = upserts;
            plan.removed = removed
                .iter()
                .filter_map(|p| crate::blocks::label_for_path(p))
                .collect();
        }
        None => {
            plan.full = true;
            plan.upserts = block_changes(&repo, None, Some(&tip_tree))?.0;
        }
    }
    Ok(plan)
}

/// Why a block write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The file does not exist (delete of an unknown label).
    #[error("{0}")]
    NotFound(String),
    /// The branch moved between read and write (compare-and-swap lost).
    #[error("{0}")]
    Conflict(String),
    /// The new content is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Anything else.
    #[error(transparent)]
    Git(#[from] GitError),
}

impl From<git2::Error> for WriteError {
    fn from(e: git2::Error) -> Self {
        WriteError::Git(GitError::Git(e))
    }
}

/// Commit a change of one file on `HEAD`'s branch with compare-and-swap on the tip.
/// `change` gets the current content (`None` if absent) and returns the new content
/// (`None` deletes). Returns the new commit and whether the file was created.
pub fn write_file(
    path: &Path,
    file: &str,
    who: &Identity,
    message: &str,
    change: impl FnOnce(Option<&str>) -> Result<Option<String>, WriteError>,
) -> Result<(HexOid, bool), WriteError> {
    let repo = open(path)?;
    let branch =
        head_branch(&repo).ok_or_else(|| WriteError::Invalid("HEAD is not a branch".into()))?;
    let tip = current_target(&repo, &branch);
    let base_tree = match tip {
        Some(t) => repo.find_commit(t)?.tree()?,
        None => repo.find_tree(repo.treebuilder(None)?.write()?)?,
    };
    let current = match base_tree.get_path(Path::new(file)) {
        Ok(e) => {
            let blob = repo.find_blob(e.id())?;
            Some(String::from_utf8_lossy(blob.content()).into_owned())
        }
        Err(_) => None,
    };
    let created = current.is_none();
    let new = change(current.as_deref())?;
    let mut ub = git2::build::TreeUpdateBuilder::new();
    match &new {
        Some(content) => {
            let blob = repo.blob(content.as_bytes())?;
            ub.upsert(file, blob, git2::FileMode::Blob);
        }
        None => {
            if current.is_none() {
                return Err(WriteError::NotFound(format!("{file} does not exist")));
            }
            ub.remove(file);
        }
    }
    let tree = repo.find_tree(ub.create_updated(&repo, &base_tree)?)?;
    if let Some(t) = tip {
        if repo.find_commit(t)?.tree_id() == tree.id() {
            return Ok((hex(t), created)); // no change
        }
    }
    let sig = git2::Signature::now(&who.name, &who.email)?;
    let parents: Vec<git2::Commit<'_>> = tip
        .map(|t| repo.find_commit(t))
        .transpose()?
        .into_iter()
        .collect();
    let parent_refs: Vec<&git2::Commit<'_>> = parents.iter().collect();
    let commit = repo.commit(None, &sig, &sig, message, &tree, &parent_refs)?;
    let res = match tip {
        Some(t) => repo
            .reference_matching(&branch, commit, true, t, message)
            .map(|_| ()),
        None => repo.reference(&branch, commit, false, message).map(|_| ()),
    };
    match res {
        Ok(()) => Ok((hex(commit), created)),
        Err(e) => Err(WriteError::Conflict(format!(
            "{branch} moved while the block was being written ({}); retry",
            e.message()
        ))),
    }
}

/// Whether `ancestor` is `descendant` or one of its ancestors.
pub fn is_ancestor(path: &Path, ancestor: &str, descendant: &str) -> bool {
    let (Ok(a), Ok(d)) = (Oid::from_str(ancestor), Oid::from_str(descendant)) else {
        return false;
    };
    a == d
        || open(path)
            .ok()
            .is_some_and(|r| r.graph_descendant_of(d, a).unwrap_or(false))
}

/// The tip of `HEAD`'s branch.
pub fn head_tip(path: &Path) -> Result<Option<HexOid>, GitError> {
    if !exists(path) {
        return Ok(None);
    }
    let repo = open(path)?;
    Ok(head_branch(&repo)
        .and_then(|b| current_target(&repo, &b))
        .map(hex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_cache_evicts_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PackCache {
            dir: dir.path(),
            key: "k".into(),
        };
        let now = std::time::SystemTime::now();
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            let p = dir.path().join(format!("{name}.pack"));
            std::fs::write(&p, vec![0u8; 1000]).unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(now - Duration::from_secs(100 - i as u64 * 10))
                .unwrap();
        }
        cache.evict(2500);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["mid.pack", "new.pack"]);
        cache.evict(0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
