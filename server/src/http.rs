//! HTTP layer: axum routes, request spans, callers, and the mapping of every lower
//! layer's error to a status code. Git work is handed to the `git` module inside
//! `spawn_blocking`; pack bytes stream back through a channel.

use crate::auth::{self, AuthError, Caller, TrustPolicy};
use crate::db::{self, Agent, Db, DbError};
use crate::git::{self, Flavour, GitError, PackOptions, PushPolicy, Sink};
use crate::protocol::{self, Service, V2Command};
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use parking_lot::Mutex;
use repofs::fs::Fs;
use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// Largest upload-pack request body (wants and haves), after decompression.
const MAX_NEGOTIATION_BYTES: usize = 64 << 20;

/// Everything a request handler needs.
pub struct AppState {
    /// The database.
    pub db: Db,
    /// The filesystem core behind the mount.
    pub fs: Fs,
    /// The filesystem's I/O runtime.
    pub io: tokio::runtime::Handle,
    /// Where the store is mounted.
    pub mount_dir: PathBuf,
    /// Who may use the trusted headers.
    pub trust: TrustPolicy,
    /// Pack building.
    pub pack: PackOptions,
    /// Push policy.
    pub push: PushPolicy,
    /// Bounds concurrent pack builds (CPU and memory).
    pub pack_permits: Arc<Semaphore>,
    /// Serialises repository creation per repository.
    pub create_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Block sync.
    pub sync: Arc<crate::sync::SyncManager>,
    /// Server counters.
    pub counters: Arc<crate::metrics::Counters>,
}

/// Errors at the HTTP edge.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400
    #[error("{0}")]
    BadRequest(String),
    /// 401
    #[error("{0}")]
    Unauthorized(String),
    /// 403
    #[error("{0}")]
    Forbidden(String),
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 409
    #[error("{0}")]
    Conflict(String),
    /// 413
    #[error("{0}")]
    TooLarge(String),
    /// 503
    #[error("{0}")]
    Unavailable(String),
    /// 500
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(%status, error = %self, "request failed");
        } else {
            tracing::info!(%status, error = %self, "request refused");
        }
        let mut resp = (
            status,
            Json(serde_json::json!({ "detail": self.to_string() })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"repofs\", charset=\"UTF-8\""),
            );
        }
        resp
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Conflict(m) => ApiError::Conflict(format!("{m} already exists")),
            DbError::NotFound(m) => ApiError::NotFound(format!("{m} not found")),
            DbError::BadUrl(m) => ApiError::Internal(m),
            e => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing | AuthError::Invalid => ApiError::Unauthorized(e.to_string()),
            AuthError::OrgMismatch => ApiError::Forbidden(e.to_string()),
            AuthError::Db(d) => d.into(),
        }
    }
}

impl From<GitError> for ApiError {
    fn from(e: GitError) -> Self {
        match e {
            GitError::BadRequest(m) => ApiError::BadRequest(m),
            GitError::TooLarge(n) => {
                ApiError::TooLarge(format!("push larger than --max-push-bytes ({n} bytes)"))
            }
            GitError::Disconnected => ApiError::BadRequest("client disconnected".into()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

/// Agent ids that are safe as one path component: 1..=255 bytes of ASCII letters,
/// digits, `-`, `_` and `.`, and not `.` or `..`.
pub fn validate_agent_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid agent id {:?}: use 1-255 characters of letters, digits, '-', '_' and '.'",
            truncate(id, 80)
        )))
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Resolve the caller of a request.
pub async fn caller(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    Ok(auth::resolve(
        &state.db,
        &state.trust,
        peer.ip(),
        header_str(headers, "authorization"),
        header_str(headers, "user_id"),
        header_str(headers, "x-organization-id"),
    )
    .await?)
}

/// The agent, if it exists in the caller's org (404 otherwise: no existence leak).
pub async fn agent_for(
    state: &AppState,
    caller: &Caller,
    agent_id: &str,
) -> Result<Agent, ApiError> {
    validate_agent_id(agent_id)?;
    match state.db.agent(agent_id).await? {
        Some(a) if a.organization_id == caller.org_id => Ok(a),
        _ => Err(ApiError::NotFound(format!("agent {agent_id} not found"))),
    }
}

/// `{org}/{agent}/repo.git`
pub fn repo_key(agent: &Agent) -> String {
    format!("{}/{}/repo.git", agent.organization_id, agent.id)
}

impl AppState {
    /// Path of an agent's repository on the mount.
    pub fn repo_path(&self, agent: &Agent) -> PathBuf {
        self.mount_dir.join(repo_key(agent))
    }

    /// Re-list the repository from the store (fresh refs), then create it if it does
    /// not exist yet.
    pub async fn open_repo(&self, agent: &Agent) -> Result<PathBuf, ApiError> {
        let key = repo_key(agent);
        let fs = self.fs.clone();
        let k = key.clone();
        self.io
            .spawn(async move { fs.revalidate(&k).await })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Unavailable(format!("store: {e}")))?;
        let path = self.repo_path(agent);
        if git::exists(&path) {
            return Ok(path);
        }
        let lock = self
            .create_locks
            .lock()
            .entry(key.clone())
            .or_default()
            .clone();
        let _g = lock.lock().await;
        if git::exists(&path) {
            return Ok(path);
        }
        let blocks = self.db.agent_blocks(&agent.id).await?;
        let mut files: Vec<(String, Vec<u8>)> = blocks
            .iter()
            .map(|b| {
                (
                    format!("{}.md", b.label),
                    crate::blocks::render(b).into_bytes(),
                )
            })
            .collect();
        if files.is_empty() {
            files.push((".letta/config.json".into(), b"{\"version\": 1}\n".to_vec()));
        }
        let p = path.clone();
        let who = git::Identity {
            name: "repofs".into(),
            email: "repofs@localhost".into(),
        };
        tokio::task::spawn_blocking(move || git::create_repo(&p, &files, &who))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
        tracing::info!(repo = %key, "created repository");
        Ok(path)
    }
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/git/{agent_id}/state.git/info/refs", get(info_refs))
        .route(
            "/v1/git/{agent_id}/state.git/git-upload-pack",
            post(upload_pack),
        )
        .route(
            "/v1/git/{agent_id}/state.git/git-receive-pack",
            post(receive_pack),
        )
        .route("/v1/agents", post(create_agent))
        .route("/v1/agents/{agent_id}", get(get_agent))
        .merge(crate::blocks::routes())
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/stats", get(stats))
        .fallback(fallback)
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(state)
}

async fn stats(State(state): State<Arc<AppState>>) -> Response {
    Json(serde_json::json!({
        "server": state.counters.snapshot(),
        "fs": state.fs.stats().snapshot(),
    }))
    .into_response()
}

async fn fallback(req: Request) -> ApiError {
    if req.uri().path().starts_with("/v1/git/") {
        ApiError::BadRequest(
            "invalid repository path: expected /v1/git/{agent_id}/state.git/(info/refs|git-upload-pack|git-receive-pack)".into(),
        )
    } else {
        ApiError::NotFound(format!(
            "no route for {} {}",
            req.method(),
            req.uri().path()
        ))
    }
}

async fn trace_request(req: Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!(
        "request",
        %method,
        %path,
        repo = tracing::field::Empty,
        status = tracing::field::Empty,
        ms = tracing::field::Empty
    );
    let started = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("status", resp.status().as_u16());
    span.record("ms", started.elapsed().as_millis() as u64);
    let _e = span.enter();
    tracing::info!(
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "{method} {path}"
    );
    resp
}

fn git_headers(content_type: &str) -> [(header::HeaderName, HeaderValue); 4] {
    [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).expect("static content type"),
        ),
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, max-age=0, must-revalidate"),
        ),
        (header::PRAGMA, HeaderValue::from_static("no-cache")),
        (
            header::EXPIRES,
            HeaderValue::from_static("Fri, 01 Jan 1980 00:00:00 GMT"),
        ),
    ]
}

fn protocol_version(headers: &HeaderMap) -> u8 {
    let v = header_str(headers, "git-protocol").unwrap_or("");
    if v.split(':').any(|p| p == "version=2") {
        2
    } else if v.split(':').any(|p| p == "version=1") {
        1
    } else {
        0
    }
}

#[derive(serde::Deserialize)]
struct InfoRefsQuery {
    service: Option<String>,
}

async fn git_prelude(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    agent_id: &str,
) -> Result<(Agent, PathBuf), ApiError> {
    validate_agent_id(agent_id)?;
    let caller = caller(state, peer, headers).await?;
    let agent = agent_for(state, &caller, agent_id).await?;
    let span = tracing::Span::current();
    span.record("repo", repo_key(&agent).as_str());
    let path = state.open_repo(&agent).await?;
    Ok((agent, path))
}

async fn info_refs(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(agent_id): Path<String>,
    Query(q): Query<InfoRefsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let service = match q.service.as_deref() {
        None => {
            return Err(ApiError::Forbidden(
                "dumb HTTP is not supported; use a smart git client".into(),
            ))
        }
        Some(s) => Service::parse(s)
            .ok_or_else(|| ApiError::Forbidden(format!("unsupported service {s:?}")))?,
    };
    let (_agent, path) = git_prelude(&state, peer, &headers, &agent_id).await?;
    let version = protocol_version(&headers);
    let body = if service == Service::UploadPack && version == 2 {
        protocol::advertise_v2()
    } else {
        let snap = blocking(move || git::refs_snapshot(&git::open(&path)?)).await?;
        protocol::advertise_v0(service, &snap, version == 1)
    };
    let ct = format!("application/x-{}-advertisement", service.name());
    Ok((git_headers(&ct), body).into_response())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GitError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("worker failed: {e}")))?
        .map_err(ApiError::from)
}

fn is_gzip(headers: &HeaderMap) -> bool {
    header_str(headers, "content-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip"))
}

async fn read_small_body(body: Body, gzip: bool) -> Result<Vec<u8>, ApiError> {
    let raw = axum::body::to_bytes(body, MAX_NEGOTIATION_BYTES)
        .await
        .map_err(|e| ApiError::TooLarge(format!("request body: {e}")))?;
    if !gzip {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .take(MAX_NEGOTIATION_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::BadRequest(format!("bad gzip body: {e}")))?;
    if out.len() > MAX_NEGOTIATION_BYTES {
        return Err(ApiError::TooLarge("request body larger than 64 MiB".into()));
    }
    Ok(out)
}

async fn upload_pack(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(agent_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (_agent, path) = git_prelude(&state, peer, &headers, &agent_id).await?;
    let body = read_small_body(body, is_gzip(&headers)).await?;
    let ct = "application/x-git-upload-pack-result";
    let (req, flavour) = if protocol_version(&headers) == 2 {
        match protocol::parse_v2(&body).map_err(|e| ApiError::BadRequest(e.to_string()))? {
            None => return Ok((git_headers(ct), Vec::new()).into_response()),
            Some(V2Command::LsRefs(args)) => {
                let snap = blocking(move || git::refs_snapshot(&git::open(&path)?)).await?;
                return Ok(
                    (git_headers(ct), protocol::ls_refs_response(&snap, &args)).into_response()
                );
            }
            Some(V2Command::ObjectInfo(oids)) => {
                let out = blocking(move || git::object_info(&path, &oids)).await?;
                return Ok((git_headers(ct), out).into_response());
            }
            Some(V2Command::Fetch(f)) => (f, Flavour::V2),
        }
    } else {
        (
            protocol::parse_upload_v0(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?,
            Flavour::V0,
        )
    };
    let permit = state
        .pack_permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::Unavailable("shutting down".into()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let opts = state.pack.clone();
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _e = span.enter();
        let mut sink = Sink::new(tx.clone());
        match git::fetch(&path, &req, flavour, &opts, &mut sink) {
            Ok(()) | Err(GitError::Disconnected) => {}
            Err(e) => {
                tracing::error!(error = %e, "upload-pack failed");
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok((git_headers(ct), Body::from_stream(stream)).into_response())
}

/// A blocking `Read` over a channel of body chunks.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

async fn receive_pack(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(agent_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (agent, path) = git_prelude(&state, peer, &headers, &agent_id).await?;
    let max = state.push.max_bytes;
    if let Some(len) = header_str(&headers, "content-length").and_then(|v| v.parse::<u64>().ok()) {
        if len > max {
            return Err(ApiError::TooLarge(format!(
                "push of {len} bytes is larger than --max-push-bytes ({max} bytes)"
            )));
        }
    }
    let gzip = is_gzip(&headers);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(16);
    let mut stream = body.into_data_stream();
    tokio::spawn(async move {
        while let Some(chunk) = stream.next().await {
            let item = chunk.map_err(|e| e.to_string());
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    let policy = state.push.clone();
    let p = path.clone();
    let outcome = blocking(move || {
        let reader = ChannelReader {
            rx,
            cur: Bytes::new(),
        };
        if gzip {
            git::receive_pack(&p, flate2::read::GzDecoder::new(reader), &policy)
        } else {
            git::receive_pack(&p, reader, &policy)
        }
    })
    .await?;
    let mut response = outcome.response;
    let mut messages = outcome.messages.clone();
    let key = repo_key(&agent);
    if !outcome.updated.is_empty() {
        crate::metrics::Counters::inc(&state.counters.pushes);
    }
    for (name, old, new) in &outcome.updated {
        tracing::info!(repo = %key, refname = %name, %old, %new, "ref updated by push");
    }
    // Read-your-writes: when the default branch moved, wait (bounded) for its sync.
    // The sync itself is started by the filesystem's event for that ref update.
    let head = outcome.head_branch.as_deref();
    if let Some((_, _, new)) = outcome
        .updated
        .iter()
        .find(|(n, _, new)| Some(n.as_str()) == head && !new.is_zero())
    {
        let timeout = state.sync.timeout();
        if !state
            .sync
            .wait_for_commit(&agent, new.as_str(), timeout)
            .await
        {
            let why = state
                .sync
                .status(&state, &agent)
                .await
                .ok()
                .and_then(|s| s.last_error)
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            messages.push(format!(
                "repofs: block sync did not finish within {timeout:?}{why}; it continues in the background"
            ));
        }
    }
    if !messages.is_empty() && !response.is_empty() && outcome.sideband {
        // Progress goes on band 2, before the report (which ends in a flush).
        let mut pre = Vec::new();
        for m in messages {
            outcome
                .band
                .encode(&mut pre, 2, format!("{m}\n").as_bytes());
        }
        pre.extend_from_slice(&response);
        response = pre;
    }
    Ok((
        git_headers("application/x-git-receive-pack-result"),
        response,
    )
        .into_response())
}

#[derive(serde::Deserialize)]
struct CreateAgent {
    name: String,
    id: Option<String>,
}

async fn create_agent(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = caller(&state, peer, &headers).await?;
    let req: CreateAgent = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if req.name.trim().is_empty() || req.name.len() > 1024 {
        return Err(ApiError::BadRequest("name must be 1-1024 bytes".into()));
    }
    let id = req.id.unwrap_or_else(|| db::new_id("agent"));
    validate_agent_id(&id)?;
    let agent = state
        .db
        .create_agent(&id, &req.name, &caller.org_id)
        .await?;
    tracing::info!(agent = %agent.id, org = %agent.organization_id, "agent created");
    Ok((StatusCode::CREATED, Json(agent)).into_response())
}

async fn get_agent(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(agent_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    validate_agent_id(&agent_id)?;
    let caller = caller(&state, peer, &headers).await?;
    let agent = agent_for(&state, &caller, &agent_id).await?;
    Ok(Json(agent).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids() {
        assert!(validate_agent_id("agent-1b4e28ba-2fa1-4d2e-883f-0016d3cca427").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a\0b",
            "a%2Fb",
            "a b",
            &"x".repeat(256),
        ] {
            assert!(validate_agent_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_agent_id(&"x".repeat(255)).is_ok());
    }
}
