//! Block sync: keeps each agent's blocks in the database equal to the markdown files
//! at the tip of its repository's default branch.
//!
//! Driven by the filesystem's `RefUpdated` events (whoever moved the ref: an HTTP
//! push, the block API, or `git push` straight into the mount), plus a scan at start
//! and every `interval` that catches events lost in a crash. Syncs of one agent run
//! one at a time and coalesce: a sync always goes to the newest tip. Each sync is one
//! database transaction (upserts, detaches, and the new synced commit), so a crash
//! leaves either the old state or the new one. Failures retry with backoff and are
//! visible in the sync status.

use crate::auth::Caller;
use crate::blocks::{self, BlockUpdate};
use crate::db::{self, Agent, Db, DbError};
use crate::git::{self, SyncPlan, WriteError};
use crate::http::{repo_key, ApiError, AppState};
use parking_lot::Mutex;
use repofs::refs::RefUpdated;
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Per-agent sync bookkeeping.
struct AgentSync {
    /// Sequence number of the newest request.
    requested: AtomicU64,
    /// Sequence number the last finished sync covered.
    done: watch::Sender<u64>,
    /// The commit the database holds the blocks of, after the last finished sync.
    synced: watch::Sender<Option<String>>,
    /// The newest tip a ref event reported. The event is published while the kernel is
    /// still completing the rename, so a read of the ref through the mount right then
    /// can return the old value; the event's own value is authoritative.
    hint: Mutex<Option<String>>,
    /// A runner task is active.
    running: AtomicBool,
    /// The error of the last attempt, if it failed.
    last_error: Mutex<Option<String>>,
    /// What the last sync that changed something did.
    last_report: Mutex<Option<SyncReport>>,
}

/// What `GET /v1/agents/{id}/sync` returns.
#[derive(Debug, serde::Serialize)]
pub struct SyncStatus {
    /// Last synced commit.
    pub commit: Option<String>,
    /// When (ms since the epoch).
    pub synced_at: Option<i64>,
    /// The branch tip differs from the synced commit, or a sync is running.
    pub pending: bool,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
    /// The branch tip now.
    pub tip: Option<String>,
    /// What the last sync of this agent in this process did (statements, time).
    pub last_sync: Option<SyncReport>,
}

/// Counts of one sync, for logs and the benchmark.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct SyncReport {
    /// Labels inserted or updated.
    pub upserted: usize,
    /// Labels detached.
    pub detached: usize,
    /// SQL statements run.
    pub statements: usize,
    /// Whether it compared everything (force push, unknown last commit).
    pub full: bool,
    /// Wall time in microseconds.
    pub micros: u64,
}

/// The sync service.
pub struct SyncManager {
    db: Db,
    mount_dir: PathBuf,
    timeout: Duration,
    agents: Mutex<HashMap<String, Arc<AgentSync>>>,
    /// The most recent sync's report (for tests and the benchmark).
    pub last_report: Mutex<Option<SyncReport>>,
    counters: Arc<crate::metrics::Counters>,
}

impl SyncManager {
    /// A manager over the mount at `mount_dir`.
    pub fn new(
        db: Db,
        mount_dir: PathBuf,
        timeout: Duration,
        counters: Arc<crate::metrics::Counters>,
    ) -> Arc<SyncManager> {
        Arc::new(SyncManager {
            db,
            mount_dir,
            timeout,
            agents: Mutex::new(HashMap::new()),
            last_report: Mutex::new(None),
            counters,
        })
    }

    fn entry(&self, agent_id: &str) -> Arc<AgentSync> {
        self.agents
            .lock()
            .entry(agent_id.to_string())
            .or_insert_with(|| {
                Arc::new(AgentSync {
                    requested: AtomicU64::new(0),
                    done: watch::channel(0).0,
                    synced: watch::channel(None).0,
                    hint: Mutex::new(None),
                    running: AtomicBool::new(false),
                    last_error: Mutex::new(None),
                    last_report: Mutex::new(None),
                })
            })
            .clone()
    }

    fn repo_path(&self, agent: &Agent) -> PathBuf {
        self.mount_dir.join(repo_key(agent))
    }

    /// Ask for a sync of `agent` to its newest tip; returns its sequence number.
    pub fn request(self: &Arc<Self>, agent: &Agent) -> u64 {
        self.request_tip(agent, None)
    }

    /// Like [`SyncManager::request`], with the tip a ref event reported.
    pub fn request_tip(self: &Arc<Self>, agent: &Agent, tip: Option<&str>) -> u64 {
        let e = self.entry(&agent.id);
        if let Some(t) = tip {
            *e.hint.lock() = Some(t.to_string());
        }
        let seq = e.requested.fetch_add(1, Ordering::SeqCst) + 1;
        if !e.running.swap(true, Ordering::SeqCst) {
            let me = self.clone();
            let agent = agent.clone();
            tokio::spawn(async move { me.run(agent, e).await });
        }
        seq
    }

    /// Wait until the database holds the blocks of `commit` (or of a descendant, when
    /// a later update was synced first); `false` on timeout.
    pub async fn wait_for_commit(&self, agent: &Agent, commit: &str, timeout: Duration) -> bool {
        let e = self.entry(&agent.id);
        let mut rx = e.synced.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut checked: Option<String> = None;
        loop {
            let cur = rx.borrow_and_update().clone();
            if let Some(c) = cur {
                if c == commit {
                    return true;
                }
                if checked.as_deref() != Some(c.as_str()) {
                    let path = self.repo_path(agent);
                    let (anc, desc) = (commit.to_string(), c.clone());
                    let later =
                        tokio::task::spawn_blocking(move || git::is_ancestor(&path, &anc, &desc))
                            .await
                            .unwrap_or(false);
                    if later {
                        return true;
                    }
                    checked = Some(c);
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }

    /// The configured bound of read-your-writes waits.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn run(self: Arc<Self>, agent: Agent, e: Arc<AgentSync>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let target = e.requested.load(Ordering::SeqCst);
            if *e.done.borrow() >= target {
                e.running.store(false, Ordering::SeqCst);
                // A request may have slipped in between the check and the store.
                if e.requested.load(Ordering::SeqCst) > target
                    && !e.running.swap(true, Ordering::SeqCst)
                {
                    continue;
                }
                return;
            }
            let span = tracing::info_span!("sync", agent = %agent.id, repo = %repo_key(&agent));
            let _ = span.enter();
            let hint = e.hint.lock().take();
            match self.sync_once(&agent, hint.as_deref()).await {
                Ok((r, commit)) => {
                    *e.last_error.lock() = None;
                    backoff = Duration::from_millis(200);
                    if commit.is_some() {
                        e.synced.send_replace(commit);
                    }
                    e.done.send_replace(target);
                    if let Some(r) = r {
                        crate::metrics::Counters::inc(&self.counters.syncs);
                        *self.last_report.lock() = Some(r);
                        *e.last_report.lock() = Some(r);
                    }
                }
                Err(err) => {
                    crate::metrics::Counters::inc(&self.counters.sync_failures);
                    if let Some(h) = hint {
                        e.hint.lock().get_or_insert(h);
                    }
                    let msg = err.to_string();
                    tracing::warn!(agent = %agent.id, error = %msg, retry_in = ?backoff, "block sync failed");
                    *e.last_error.lock() = Some(msg.clone());
                    let _ = self.record_error(&agent.id, &msg).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn record_error(&self, agent_id: &str, msg: &str) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO repofs_sync_state (agent_id, last_error, attempts) VALUES ($1, $2, 1) \
             ON CONFLICT (agent_id) DO UPDATE SET last_error = $2, attempts = repofs_sync_state.attempts + 1",
        )
        .bind(agent_id)
        .bind(msg)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    async fn synced_commit(
        &self,
        agent_id: &str,
    ) -> Result<(Option<String>, Option<i64>, Option<String>), DbError> {
        let row = sqlx::query(
            "SELECT commit_id, synced_at, last_error FROM repofs_sync_state WHERE agent_id = $1",
        )
        .bind(agent_id)
        .fetch_optional(self.db.pool())
        .await?;
        Ok(match row {
            Some(r) => (
                r.try_get("commit_id")?,
                r.try_get("synced_at")?,
                r.try_get("last_error")?,
            ),
            None => (None, None, None),
        })
    }

    /// One sync of `agent` to the current tip. `Ok(None)`: nothing to do.
    /// Returns what it did (`None`: nothing to do) and the commit now synced.
    pub async fn sync_once(
        &self,
        agent: &Agent,
        hint: Option<&str>,
    ) -> Result<(Option<SyncReport>, Option<String>), SyncError> {
        let started = Instant::now();
        let (last, _, _) = self.synced_commit(&agent.id).await?;
        let path = self.repo_path(agent);
        let last2 = last.clone();
        let hint2 = hint.map(String::from);
        let plan: SyncPlan = tokio::task::spawn_blocking(move || {
            git::sync_plan(&path, last2.as_deref(), hint2.as_deref())
        })
        .await
        .map_err(|e| SyncError::Other(e.to_string()))??;
        let Some(tip) = plan.tip.as_ref().map(|t| t.to_string()) else {
            return Ok((None, last));
        };
        if last.as_deref() == Some(tip.as_str()) {
            return Ok((None, last));
        }
        let mut report = apply_plan(&self.db, agent, &plan, &tip).await?;
        report.micros = started.elapsed().as_micros() as u64;
        tracing::info!(
            agent = %agent.id,
            commit = %tip,
            upserted = report.upserted,
            detached = report.detached,
            statements = report.statements,
            full = report.full,
            ms = report.micros as f64 / 1000.0,
            "blocks synced"
        );
        Ok((Some(report), Some(tip)))
    }

    /// The sync status of an agent.
    pub async fn status(&self, state: &AppState, agent: &Agent) -> Result<SyncStatus, ApiError> {
        let (commit, synced_at, db_error) = self.synced_commit(&agent.id).await?;
        let path = state.repo_path(agent);
        let tip = tokio::task::spawn_blocking(move || git::head_tip(&path))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
            .map(|t| t.to_string());
        let e = self.entry(&agent.id);
        let running = e.running.load(Ordering::SeqCst);
        let mem_error = e.last_error.lock().clone();
        let last_sync = *e.last_report.lock();
        Ok(SyncStatus {
            last_sync,
            pending: running || (tip.is_some() && tip != commit),
            last_error: mem_error.or(db_error),
            commit,
            synced_at,
            tip,
        })
    }

    /// React to a filesystem event: sync when `HEAD`'s branch (or `HEAD`) moved.
    pub async fn on_event(self: &Arc<Self>, ev: &RefUpdated) {
        let (Some(org), Some(agent_id)) = (&ev.org, &ev.agent) else {
            return;
        };
        if ev.repo != format!("{org}/{agent_id}/repo.git") {
            return;
        }
        if ev.refname != "HEAD" {
            let head = tokio::fs::read_to_string(self.mount_dir.join(&ev.repo).join("HEAD"))
                .await
                .unwrap_or_default();
            let target = head.trim().strip_prefix("ref: ").unwrap_or("");
            if target != ev.refname {
                return;
            }
        }
        match self.db.agent(agent_id).await {
            Ok(Some(a)) if &a.organization_id == org => {
                self.request_tip(&a, ev.new.as_ref().map(|o| o.as_str()));
            }
            Ok(_) => {
                tracing::debug!(repo = %ev.repo, "ref event for a repository without an agent")
            }
            Err(e) => tracing::warn!(error = %e, "cannot look up the agent of a ref event"),
        }
    }

    /// Request a sync of every agent whose branch tip differs from its synced commit.
    pub async fn scan(self: &Arc<Self>) -> Result<usize, DbError> {
        let agents = self.db.all_agents().await?;
        let mut n = 0;
        for a in agents {
            let path = self.repo_path(&a);
            let tip = tokio::task::spawn_blocking(move || git::head_tip(&path)).await;
            let Ok(Ok(Some(tip))) = tip else { continue };
            let (synced, _, _) = self.synced_commit(&a.id).await?;
            if synced.as_deref() != Some(tip.as_str()) {
                self.request(&a);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Listen to the filesystem's events and scan periodically, until the task is
    /// aborted.
    pub fn spawn_background(
        self: &Arc<Self>,
        mut events: tokio::sync::broadcast::Receiver<RefUpdated>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let scanner = {
                let me = me.clone();
                tokio::spawn(async move {
                    loop {
                        match me.scan().await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(
                                agents = n,
                                "sync scan found agents behind their branch tip"
                            ),
                            Err(e) => tracing::warn!(error = %e, "sync scan failed"),
                        }
                        tokio::time::sleep(interval).await;
                    }
                })
            };
            loop {
                match events.recv().await {
                    Ok(ev) => me.on_event(&ev).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "ref events lagged; scanning all agents");
                        let _ = me.scan().await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
            scanner.abort();
        })
    }

    /// Commit a block change (or removal) with libgit2 on the mount, compare-and-swap
    /// on the branch, then wait for its sync. Returns (created, commit).
    pub async fn write_block(
        self: &Arc<Self>,
        state: &AppState,
        agent: &Agent,
        caller: &Caller,
        label: &str,
        update: Option<BlockUpdate>,
    ) -> Result<(bool, String), ApiError> {
        let path = state.open_repo(agent).await?;
        let file = blocks::path_for_label(label);
        let who = git::Identity {
            name: caller.user_name.clone(),
            email: format!("{}@repofs", caller.user_id),
        };
        let msg = match &update {
            Some(_) => format!("Update block {label}"),
            None => format!("Delete block {label}"),
        };
        let f = file.clone();
        let (commit, created) = tokio::task::spawn_blocking(move || {
            git::write_file(&path, &f, &who, &msg, |cur| match update {
                None => Ok(None),
                Some(u) => {
                    if cur.is_none() && u.value.is_none() {
                        return Err(WriteError::NotFound(format!(
                            "{f} does not exist; give a value to create it"
                        )));
                    }
                    let text = blocks::apply_update(cur, &u);
                    let p = blocks::parse(&text);
                    if let Some(e) = p.errors.first() {
                        return Err(WriteError::Invalid(format!("{f}: {e}")));
                    }
                    let limit = p.limit.unwrap_or(blocks::DEFAULT_LIMIT);
                    if p.value.chars().count() as i64 > limit {
                        return Err(WriteError::Invalid(format!(
                            "{f}: value is longer than its limit of {limit}"
                        )));
                    }
                    Ok(Some(text))
                }
            })
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| match e {
            WriteError::NotFound(m) => ApiError::NotFound(m),
            WriteError::Conflict(m) => ApiError::Conflict(m),
            WriteError::Invalid(m) => ApiError::BadRequest(m),
            WriteError::Git(g) => g.into(),
        })?;
        // The filesystem's ref event starts the sync; wait for it to cover the commit.
        if !self
            .wait_for_commit(agent, commit.as_str(), self.timeout)
            .await
        {
            return Err(ApiError::Unavailable(format!(
                "committed {commit}, but the block sync did not finish within {:?}",
                self.timeout
            )));
        }
        Ok((created, commit.to_string()))
    }
}

/// Errors of a sync attempt.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Reading the repository.
    #[error("reading the repository: {0}")]
    Git(#[from] git::GitError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl From<sqlx::Error> for SyncError {
    fn from(e: sqlx::Error) -> Self {
        SyncError::Db(DbError::Sqlx(e))
    }
}

/// Write a plan in one transaction: upserts, detaches, and the synced commit.
async fn apply_plan(
    db: &Db,
    agent: &Agent,
    plan: &SyncPlan,
    tip: &str,
) -> Result<SyncReport, SyncError> {
    let mut report = SyncReport {
        full: plan.full,
        ..Default::default()
    };
    let mut tx = db.pool().begin().await?;
    let mut keep: HashSet<&str> = HashSet::new();
    for f in &plan.upserts {
        keep.insert(f.label.as_str());
        let p = &f.parsed;
        let existing = sqlx::query(db::select_agent_blocks!(
            "WHERE ba.agent_id = $1 AND ba.block_label = $2"
        ))
        .bind(&agent.id)
        .bind(&f.label)
        .fetch_optional(&mut *tx)
        .await?;
        report.statements += 1;
        let meta = |m: &Option<serde_json::Map<String, serde_json::Value>>| {
            m.clone().map(serde_json::Value::Object)
        };
        match existing.as_ref().map(db::block_row).transpose()? {
            Some(b) => {
                let description = p.description.clone().or(b.description.clone());
                let limit = p.limit.unwrap_or(b.limit);
                let read_only = p.read_only.unwrap_or(b.read_only);
                let metadata = meta(&p.metadata).unwrap_or(b.metadata.clone());
                if b.value == p.value
                    && b.description == description
                    && b.limit == limit
                    && b.read_only == read_only
                    && b.metadata == metadata
                {
                    continue;
                }
                sqlx::query(
                    "UPDATE block SET value = $1, description = $2, \"limit\" = $3, read_only = $4, \
                     metadata_ = $5, updated_at = CURRENT_TIMESTAMP WHERE id = $6",
                )
                .bind(&p.value)
                .bind(description)
                .bind(limit)
                .bind(read_only)
                .bind(metadata.to_string())
                .bind(&b.id)
                .execute(&mut *tx)
                .await?;
                report.statements += 1;
            }
            None => {
                let id = db::new_id("block");
                sqlx::query(
                    "INSERT INTO block (id, label, value, description, \"limit\", read_only, metadata_, organization_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&id)
                .bind(&f.label)
                .bind(&p.value)
                .bind(p.description.clone().unwrap_or_else(|| format!("{} block", f.label)))
                .bind(p.limit.unwrap_or(blocks::DEFAULT_LIMIT))
                .bind(p.read_only.unwrap_or(false))
                .bind(meta(&p.metadata).unwrap_or_else(|| serde_json::json!({})).to_string())
                .bind(&agent.organization_id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("INSERT INTO blocks_agents (agent_id, block_id, block_label) VALUES ($1, $2, $3)")
                    .bind(&agent.id)
                    .bind(&id)
                    .bind(&f.label)
                    .execute(&mut *tx)
                    .await?;
                report.statements += 2;
            }
        }
        report.upserted += 1;
    }
    let detach: Vec<String> = if plan.full {
        let rows = sqlx::query("SELECT block_label FROM blocks_agents WHERE agent_id = $1")
            .bind(&agent.id)
            .fetch_all(&mut *tx)
            .await?;
        report.statements += 1;
        rows.iter()
            .filter_map(|r| r.try_get::<String, _>("block_label").ok())
            .filter(|l| !keep.contains(l.as_str()))
            .collect()
    } else {
        plan.removed
            .iter()
            .filter(|l| !keep.contains(l.as_str()))
            .cloned()
            .collect()
    };
    for label in detach {
        let r = sqlx::query("DELETE FROM blocks_agents WHERE agent_id = $1 AND block_label = $2")
            .bind(&agent.id)
            .bind(&label)
            .execute(&mut *tx)
            .await?;
        report.statements += 1;
        if r.rows_affected() > 0 {
            report.detached += 1;
        }
    }
    sqlx::query(
        "INSERT INTO repofs_sync_state (agent_id, commit_id, synced_at, last_error, attempts) VALUES ($1, $2, $3, NULL, 0) \
         ON CONFLICT (agent_id) DO UPDATE SET commit_id = $2, synced_at = $3, last_error = NULL, attempts = 0",
    )
    .bind(&agent.id)
    .bind(tip)
    .bind(db::now_ms())
    .execute(&mut *tx)
    .await?;
    report.statements += 1;
    tx.commit().await?;
    Ok(report)
}
