//! Database layer: one pool over SQLite or PostgreSQL (sqlx's `Any` driver, so every
//! query is written once with `$N` placeholders), migrations, and the queries the
//! server needs. No compile-time query macros.

use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The org every request without credentials from a trusted address belongs to.
pub const DEFAULT_ORG: &str = "org-00000000-0000-4000-8000-000000000000";
/// The user of such requests.
pub const DEFAULT_USER: &str = "user-00000000-0000-4000-8000-000000000000";

/// `SELECT` of an agent's attached blocks, with the columns [`block_row`] decodes,
/// followed by the given `WHERE` clause (the block is `b`, the attachment `ba`).
macro_rules! select_agent_blocks {
    ($where:literal) => {
        concat!(
            "SELECT b.id, ba.block_label AS label, b.value, b.description, b.\"limit\" AS lim, ",
            "CAST(CASE WHEN b.read_only THEN 1 ELSE 0 END AS BIGINT) AS read_only, b.metadata_ ",
            "FROM blocks_agents ba JOIN block b ON b.id = ba.block_id ",
            $where
        )
    };
}
pub(crate) use select_agent_blocks;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is neither `sqlite:` nor `postgres:`.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER:PASS@HOST/DB")]
    BadUrl(String),
    /// A row with that key exists.
    #[error("{0} already exists")]
    Conflict(String),
    /// A referenced row does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Any other database error.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
}

impl DbError {
    fn from_insert(e: sqlx::Error, what: impl Into<String>) -> DbError {
        if let sqlx::Error::Database(d) = &e {
            if d.is_unique_violation() {
                return DbError::Conflict(what.into());
            }
        }
        DbError::Sqlx(e)
    }
}

/// Which database engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// SQLite (the embedded default).
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A user and the org it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// `user-...`
    pub id: String,
    /// Display name.
    pub name: String,
    /// Its org.
    pub organization_id: String,
}

/// An agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Agent {
    /// `agent-...`
    pub id: String,
    /// Display name.
    pub name: String,
    /// Its org.
    pub organization_id: String,
}

/// A block attached to an agent.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Block {
    /// `block-...`
    pub id: String,
    /// Label, may contain `/`.
    pub label: String,
    /// Body.
    pub value: String,
    /// Description.
    pub description: Option<String>,
    /// Character limit.
    pub limit: i64,
    /// Read-only flag.
    pub read_only: bool,
    /// Metadata mapping.
    pub metadata: serde_json::Value,
}

/// The pool and its engine.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A new id such as `agent-1b4e28ba-2fa1-4d2e-883f-0016d3cca427` (UUID v4 form).
pub fn new_id(prefix: &str) -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{prefix}-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Db {
    /// Connect, create the SQLite file if needed, and run migrations.
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let (kind, url) = if let Some(rest) = url.strip_prefix("sqlite:") {
            let mut u = format!("sqlite:{rest}");
            if !rest.contains("mode=") && !rest.contains(":memory:") {
                u.push_str(if rest.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
            (DbKind::Sqlite, u)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (DbKind::Postgres, url.to_string())
        } else {
            return Err(DbError::BadUrl(url.to_string()));
        };
        let max = if kind == DbKind::Sqlite { 4 } else { 16 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == DbKind::Sqlite {
                        sqlx::query("PRAGMA foreign_keys = ON")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        if kind == DbKind::Sqlite {
            // WAL lets readers run during a sync's write transaction.
            let _ = sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await;
            SQLITE_MIGRATIONS.run(&pool).await?;
        } else {
            POSTGRES_MIGRATIONS.run(&pool).await?;
        }
        let db = Db { pool };
        db.ensure_defaults().await?;
        Ok(db)
    }

    /// The pool, for the sync layer's transactions.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Close the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn ensure_defaults(&self) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO organizations (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(DEFAULT_ORG)
        .bind("default")
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "INSERT INTO users (id, name, organization_id) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(DEFAULT_USER)
        .bind("default")
        .bind(DEFAULT_ORG)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Create an org (for operators and tests).
    pub async fn create_org(&self, id: &str, name: &str) -> Result<(), DbError> {
        sqlx::query("INSERT INTO organizations (id, name) VALUES ($1, $2)")
            .bind(id)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| DbError::from_insert(e, format!("organization {id}")))?;
        Ok(())
    }

    /// Create a user in an org.
    pub async fn create_user(&self, id: &str, name: &str, org: &str) -> Result<User, DbError> {
        if !self.org_exists(org).await? {
            return Err(DbError::NotFound(format!("organization {org}")));
        }
        sqlx::query("INSERT INTO users (id, name, organization_id) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(name)
            .bind(org)
            .execute(&self.pool)
            .await
            .map_err(|e| DbError::from_insert(e, format!("user {id}")))?;
        Ok(User {
            id: id.into(),
            name: name.into(),
            organization_id: org.into(),
        })
    }

    /// Whether an org exists.
    pub async fn org_exists(&self, id: &str) -> Result<bool, DbError> {
        Ok(
            sqlx::query("SELECT id FROM organizations WHERE id = $1 AND is_deleted = FALSE")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    fn user_row(r: &AnyRow) -> Result<User, sqlx::Error> {
        Ok(User {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            organization_id: r.try_get("organization_id")?,
        })
    }

    /// A user by id.
    pub async fn user(&self, id: &str) -> Result<Option<User>, DbError> {
        let row = sqlx::query(
            "SELECT id, name, organization_id FROM users WHERE id = $1 AND is_deleted = FALSE",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(Self::user_row).transpose()?)
    }

    /// The user a token belongs to.
    pub async fn user_by_token(&self, token: &str) -> Result<Option<User>, DbError> {
        let row = sqlx::query(
            "SELECT u.id, u.name, u.organization_id FROM repofs_tokens t \
             JOIN users u ON u.id = t.user_id WHERE t.token_sha256 = $1 AND u.is_deleted = FALSE",
        )
        .bind(token_hash(token))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(Self::user_row).transpose()?)
    }

    /// Create a token for a user; returns the token (only its hash is stored).
    pub async fn create_token(&self, user_id: &str) -> Result<String, DbError> {
        if self.user(user_id).await?.is_none() {
            return Err(DbError::NotFound(format!("user {user_id}")));
        }
        let secret: [u8; 24] = rand::rng().random();
        let token = format!("rfs_{}", hex::encode(secret));
        sqlx::query(
            "INSERT INTO repofs_tokens (id, user_id, token_sha256, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(new_id("token"))
        .bind(user_id)
        .bind(token_hash(&token))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(token)
    }

    /// An agent by id (in any org; callers check the org).
    pub async fn agent(&self, id: &str) -> Result<Option<Agent>, DbError> {
        let row = sqlx::query(
            "SELECT id, name, organization_id FROM agents WHERE id = $1 AND is_deleted = FALSE",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .map(|r| -> Result<Agent, sqlx::Error> {
                Ok(Agent {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    organization_id: r.try_get("organization_id")?,
                })
            })
            .transpose()?)
    }

    /// Create an agent in an org.
    pub async fn create_agent(&self, id: &str, name: &str, org: &str) -> Result<Agent, DbError> {
        sqlx::query("INSERT INTO agents (id, name, organization_id) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(name)
            .bind(org)
            .execute(&self.pool)
            .await
            .map_err(|e| DbError::from_insert(e, format!("agent {id}")))?;
        Ok(Agent {
            id: id.into(),
            name: name.into(),
            organization_id: org.into(),
        })
    }

    /// Every agent (for the periodic sync scan).
    pub async fn all_agents(&self) -> Result<Vec<Agent>, DbError> {
        let rows = sqlx::query(
            "SELECT id, name, organization_id FROM agents WHERE is_deleted = FALSE ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Agent {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    organization_id: r.try_get("organization_id")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// The blocks attached to an agent, by label.
    pub async fn agent_blocks(&self, agent_id: &str) -> Result<Vec<Block>, DbError> {
        let rows = sqlx::query(select_agent_blocks!(
            "WHERE ba.agent_id = $1 AND b.is_deleted = FALSE ORDER BY ba.block_label"
        ))
        .bind(agent_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(block_row).collect()
    }

    /// One block of an agent by label.
    pub async fn agent_block(&self, agent_id: &str, label: &str) -> Result<Option<Block>, DbError> {
        let row = sqlx::query(select_agent_blocks!(
            "WHERE ba.agent_id = $1 AND ba.block_label = $2 AND b.is_deleted = FALSE"
        ))
        .bind(agent_id)
        .bind(label)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(block_row).transpose()
    }
}

/// Decode a block row selected as `id, label, value, description, lim, read_only, metadata_`.
pub fn block_row(r: &AnyRow) -> Result<Block, DbError> {
    let meta: String = r.try_get("metadata_")?;
    Ok(Block {
        id: r.try_get("id")?,
        label: r.try_get("label")?,
        value: r.try_get("value")?,
        description: r.try_get("description")?,
        limit: r.try_get("lim")?,
        read_only: r.try_get::<i64, _>("read_only")? != 0,
        metadata: serde_json::from_str(&meta).unwrap_or_else(|_| serde_json::json!({})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_defaults_tokens_agents() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = Db::connect(&url).await.unwrap();
        // Migrations and defaults are idempotent across restarts.
        let db2 = Db::connect(&url).await.unwrap();
        let u = db2.user(DEFAULT_USER).await.unwrap().unwrap();
        assert_eq!(u.organization_id, DEFAULT_ORG);
        let t = db.create_token(DEFAULT_USER).await.unwrap();
        assert_eq!(
            db.user_by_token(&t).await.unwrap().unwrap().id,
            DEFAULT_USER
        );
        assert!(db.user_by_token("rfs_nope").await.unwrap().is_none());
        assert!(matches!(
            db.create_token("user-missing").await,
            Err(DbError::NotFound(_))
        ));
        db.create_agent("agent-a", "a", DEFAULT_ORG).await.unwrap();
        assert!(matches!(
            db.create_agent("agent-a", "a", DEFAULT_ORG).await,
            Err(DbError::Conflict(_))
        ));
        assert_eq!(db.agent("agent-a").await.unwrap().unwrap().name, "a");
        assert!(db.agent("agent-b").await.unwrap().is_none());
        assert!(matches!(
            Db::connect("mysql://x").await,
            Err(DbError::BadUrl(_))
        ));
        assert!(new_id("agent").starts_with("agent-") && new_id("agent").len() == 42);
    }
}
