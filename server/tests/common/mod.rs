//! A real `repofs-server` (in-process: real mount, real SQLite or PostgreSQL, real
//! HTTP listener) in a temporary directory. Dropping it shuts it down and unmounts,
//! even when the test panics.
#![allow(dead_code, unreachable_pub)]

use anyhow::{Context, Result};
use repofs_server::server::{RunningServer, ServerConfig};
use std::path::{Path, PathBuf};

#[allow(unused_imports)]
pub(crate) use repofs_tests::{commit_file, git, git_cmd, git_fails};

pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub srv: Option<RunningServer>,
    pub home: tempfile::TempDir,
    pub url: String,
    pub config: ServerConfig,
}

impl TestServer {
    pub fn start() -> Result<TestServer> {
        Self::start_with(|_| {})
    }

    pub fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Result<TestServer> {
        let home = tempfile::tempdir()?;
        Self::start_in(home, tweak)
    }

    /// Start on an existing home directory (restarts, fixtures placed in the store).
    pub fn start_in(
        home: tempfile::TempDir,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Result<TestServer> {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("REPOFS_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .try_init();
        std::fs::create_dir_all(home.path().join("store"))?;
        let mut config = ServerConfig::embedded(home.path());
        config.listen = "127.0.0.1:0".parse()?;
        tweak(&mut config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()?;
        let srv = rt.block_on(repofs_server::server::start(config.clone()))?;
        let url = srv.url();
        Ok(TestServer {
            rt,
            srv: Some(srv),
            home,
            url,
            config,
        })
    }

    pub fn mount(&self) -> &Path {
        &self.config.mount_dir
    }

    pub fn srv(&self) -> &RunningServer {
        self.srv.as_ref().expect("running")
    }

    /// Remote URL of an agent's repository.
    pub fn remote(&self, agent: &str) -> String {
        format!("{}/v1/git/{agent}/state.git", self.url)
    }

    /// Create an agent in the default org through the API.
    pub fn create_agent(&self, id: &str) -> Result<()> {
        let (status, body) = self.request(
            "POST",
            "/v1/agents",
            &[],
            Some(format!(r#"{{"name":"{id}","id":"{id}"}}"#)),
        )?;
        anyhow::ensure!(status == 201, "create agent {id}: {status} {body}");
        Ok(())
    }

    /// Create an agent and clone its repository (protocol `version`) into a new
    /// temporary directory; returns the directory and the work tree.
    pub fn agent_clone(&self, agent: &str, version: u8) -> Result<(tempfile::TempDir, PathBuf)> {
        self.create_agent(agent)?;
        let tmp = tempfile::tempdir()?;
        let w = clone(tmp.path(), &self.remote(agent), "w", version, &[])?;
        Ok((tmp, w))
    }

    /// One HTTP request with reqwest; returns (status, body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Result<(u16, String)> {
        let (s, _, b) = self.request_full(method, path, headers, body.map(|b| b.into_bytes()))?;
        Ok((s, String::from_utf8_lossy(&b).into_owned()))
    }

    pub fn request_full(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>)> {
        let url = format!("{}{}", self.url, path);
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        self.rt.block_on(async {
            let client = reqwest::Client::new();
            let mut req = client.request(method, &url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(b) = body {
                req = req.body(b);
            }
            let resp = req.send().await.context("sending request")?;
            let status = resp.status().as_u16();
            let h = resp.headers().clone();
            let b = resp.bytes().await?.to_vec();
            Ok((status, h, b))
        })
    }

    /// A server on a fresh database of the given kind: SQLite in the home directory, or
    /// a new PostgreSQL database on the cluster named by `REPOFS_TEST_PG_URL`.
    /// `Ok(None)` when PostgreSQL is asked for but not configured (and
    /// `REPOFS_TEST_REQUIRE_PG` is not set, which makes that an error).
    pub fn start_on(db: Backend) -> Result<Option<TestServer>> {
        match db {
            Backend::Sqlite => Ok(Some(Self::start()?)),
            Backend::Postgres => match fresh_pg_database()? {
                Some(url) => Ok(Some(Self::start_with(|c| c.database_url = url)?)),
                None => Ok(None),
            },
        }
    }

    /// Shut down (drain, flush, unmount) and give back the home directory.
    pub fn stop(mut self) -> Result<tempfile::TempDir> {
        if let Some(srv) = self.srv.take() {
            self.rt.block_on(srv.shutdown())?;
        }
        let home = std::mem::replace(&mut self.home, tempfile::tempdir()?);
        Ok(home)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(srv) = self.srv.take() {
            let _ = self.rt.block_on(srv.shutdown());
        }
    }
}

/// `git clone` with a protocol version; returns the work tree path.
pub fn clone(dir: &Path, url: &str, name: &str, version: u8, extra: &[&str]) -> Result<PathBuf> {
    let v = format!("protocol.version={version}");
    let mut args = vec!["-c", v.as_str(), "clone", "-q"];
    args.extend_from_slice(extra);
    args.push(url);
    args.push(name);
    git(dir, &args)?;
    Ok(dir.join(name))
}

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Create an empty database on the test cluster; its URL.
pub fn fresh_pg_database() -> Result<Option<String>> {
    let Ok(admin) = std::env::var("REPOFS_TEST_PG_URL") else {
        if std::env::var("REPOFS_TEST_REQUIRE_PG").is_ok() {
            anyhow::bail!("REPOFS_TEST_REQUIRE_PG is set but REPOFS_TEST_PG_URL is not");
        }
        eprintln!("skipping the PostgreSQL variant: REPOFS_TEST_PG_URL is not set");
        return Ok(None);
    };
    let name = format!("repofs_test_{:016x}", rand::random::<u64>());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&admin)
            .await?;
        // `name` is generated here from hex digits only.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await?;
        pool.close().await;
        anyhow::Ok(())
    })?;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    let (base, query) = match admin.split_once('?') {
        Some((_, q)) => (base.to_string(), format!("?{q}")),
        None => (base.to_string(), String::new()),
    };
    Ok(Some(format!("{base}/{name}{query}")))
}
