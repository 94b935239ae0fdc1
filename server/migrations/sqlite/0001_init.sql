-- Tables shared with the reference implementation (only the columns repofs uses,
-- with the reference's names), then repofs's own tables.
CREATE TABLE IF NOT EXISTS organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    is_deleted BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    is_deleted BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    is_deleted BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE IF NOT EXISTS block (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    value TEXT NOT NULL,
    "limit" BIGINT NOT NULL DEFAULT 100000,
    description TEXT,
    read_only BOOLEAN NOT NULL DEFAULT FALSE,
    metadata_ TEXT NOT NULL DEFAULT '{}',
    organization_id TEXT REFERENCES organizations(id),
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    is_deleted BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE IF NOT EXISTS blocks_agents (
    agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    block_id TEXT NOT NULL REFERENCES block(id) ON DELETE CASCADE,
    block_label TEXT NOT NULL,
    PRIMARY KEY (agent_id, block_id),
    UNIQUE (agent_id, block_label)
);

CREATE TABLE IF NOT EXISTS repofs_tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS repofs_sync_state (
    agent_id TEXT PRIMARY KEY REFERENCES agents(id) ON DELETE CASCADE,
    commit_id TEXT,
    synced_at BIGINT,
    last_error TEXT,
    attempts BIGINT NOT NULL DEFAULT 0
);
