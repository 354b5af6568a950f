//! Forward-only schema migrations, tracked in SQLite's `user_version`.
//!
//! Never edit a migration that has shipped; append a new one. `tests` migrate from every earlier version.

use rusqlite_migration::{M, Migrations};

/// Each entry is one schema version (index 0 → version 1).
pub const MIGRATIONS: &[&str] = &[
    // 1: enrollment tokens and agents.
    "CREATE TABLE enrollment_tokens (
        id          TEXT PRIMARY KEY,
        token_hash  BLOB NOT NULL UNIQUE,
        note        TEXT NOT NULL DEFAULT '',
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER,
        max_uses    INTEGER,
        uses        INTEGER NOT NULL DEFAULT 0,
        revoked_at  INTEGER
    ) STRICT;
    CREATE TABLE agents (
        id                  TEXT PRIMARY KEY,
        secret_hash         BLOB NOT NULL,
        hostname            TEXT NOT NULL,
        os                  TEXT NOT NULL,
        arch                TEXT NOT NULL,
        agent_version       TEXT NOT NULL,
        agent_commit        TEXT NOT NULL,
        enrolled_at         INTEGER NOT NULL,
        enrollment_token_id TEXT REFERENCES enrollment_tokens(id) ON DELETE SET NULL,
        last_seen_at        INTEGER NOT NULL
    ) STRICT;",
    // 2: audit log.
    "CREATE TABLE audit_events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        remote_addr TEXT,
        user_agent  TEXT,
        agent_id    TEXT,
        platform    TEXT,
        sha256      TEXT,
        source      TEXT,
        detail      TEXT
    ) STRICT;
    CREATE INDEX audit_events_kind ON audit_events(kind, id);",
    // 3: what the agent reports about its own binary and its last update attempt; heartbeat counter.
    "ALTER TABLE agents ADD COLUMN binary_sha256 TEXT;
    ALTER TABLE agents ADD COLUMN last_update_error TEXT;
    ALTER TABLE agents ADD COLUMN heartbeats INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;",
    // 4: one row that readiness rewrites to prove the database can still write.
    "CREATE TABLE write_probe (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        probed_at INTEGER NOT NULL
    ) STRICT;",
    // 5: restic repositories; `password` and `env` are sealed (nonce || XChaCha20-Poly1305 ciphertext), the
    // environment's names are kept in clear (comma-separated).
    "CREATE TABLE repositories (
        name       TEXT PRIMARY KEY,
        url        TEXT NOT NULL,
        password   BLOB NOT NULL,
        env        BLOB,
        env_names  TEXT,
        ca_cert    TEXT,
        auto_init  INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;",
];

pub fn migrations() -> Migrations<'static> {
    Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect())
}

/// The schema version this build writes.
pub fn latest_version() -> usize {
    MIGRATIONS.len()
}
