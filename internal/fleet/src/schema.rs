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
    // Backups (issue 14). `config_revision` is one fleet-wide counter, bumped by every change to plans, repositories
    // or labels: an agent whose applied revision differs refetches its configuration. Plans keep their list-valued
    // fields as JSON (they are read and written whole). Operations are keyed by their id (`op_` + 32 hex) so a
    // repeated report changes nothing; `seq` orders them for keyset paging. `plan_status` keeps, per agent and plan,
    // what the health state needs, updated with every final report. `snapshots` is what agents last reported.
    // `leases` lets one agent at a time run restic on a repository.
    "ALTER TABLE enrollment_tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE agents ADD COLUMN restic_version TEXT;
    ALTER TABLE agents ADD COLUMN restic_path TEXT;
    ALTER TABLE agents ADD COLUMN restic_error TEXT;
    ALTER TABLE agents ADD COLUMN config_revision INTEGER;
    CREATE TABLE config_revision (
        id       INTEGER PRIMARY KEY CHECK (id = 1),
        revision INTEGER NOT NULL
    ) STRICT;
    INSERT INTO config_revision (id, revision) VALUES (1, 1);
    CREATE TABLE plans (
        name            TEXT PRIMARY KEY,
        repository      TEXT NOT NULL REFERENCES repositories(name) ON DELETE RESTRICT ON UPDATE CASCADE,
        paths           TEXT NOT NULL,
        excludes        TEXT NOT NULL,
        schedule        TEXT NOT NULL,
        timezone        TEXT NOT NULL,
        tags            TEXT NOT NULL,
        one_file_system INTEGER NOT NULL,
        exclude_caches  INTEGER NOT NULL,
        agents          TEXT NOT NULL,
        selector        TEXT NOT NULL,
        timeout_secs    INTEGER NOT NULL,
        jitter_secs     INTEGER NOT NULL,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE operations (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        id          TEXT NOT NULL UNIQUE,
        agent_id    TEXT NOT NULL,
        plan        TEXT NOT NULL,
        kind        TEXT NOT NULL,
        trigger     TEXT NOT NULL,
        status      TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        started_at  INTEGER,
        finished_at INTEGER,
        duration_ms INTEGER,
        summary     TEXT,
        progress    TEXT,
        message     TEXT,
        reason      TEXT,
        exit_code   INTEGER
    ) STRICT;
    CREATE INDEX operations_agent ON operations(agent_id, seq);
    CREATE INDEX operations_plan ON operations(plan, seq);
    CREATE INDEX operations_status ON operations(status, seq);
    CREATE TABLE plan_status (
        agent_id        TEXT NOT NULL,
        plan            TEXT NOT NULL,
        last_operation  TEXT NOT NULL,
        last_status     TEXT NOT NULL,
        last_finished_at INTEGER NOT NULL,
        last_success_at INTEGER,
        PRIMARY KEY (agent_id, plan)
    ) STRICT;
    CREATE TABLE snapshots (
        agent_id TEXT NOT NULL,
        plan     TEXT NOT NULL,
        id       TEXT NOT NULL,
        short_id TEXT NOT NULL,
        time     TEXT NOT NULL,
        hostname TEXT NOT NULL,
        paths    TEXT NOT NULL,
        tags     TEXT NOT NULL,
        PRIMARY KEY (agent_id, plan, id)
    ) STRICT;
    CREATE TABLE leases (
        repository   TEXT PRIMARY KEY,
        agent_id     TEXT NOT NULL,
        operation_id TEXT NOT NULL,
        expires_at   INTEGER NOT NULL
    ) STRICT;",
    // retention: a plan's retention policy (JSON, NULL: keep every snapshot) and what a forget operation removed.
    "ALTER TABLE plans ADD COLUMN retention TEXT;
    ALTER TABLE operations ADD COLUMN forget TEXT;",
    // Restores (issue 15): what an operator asked for, beside its `operations` row (kind `restore`, queued until the
    // agent reports it), and what the agent reported about it (`result`, JSON: target directory and counts).
    "CREATE TABLE restores (
        operation_id TEXT PRIMARY KEY,
        agent_id     TEXT NOT NULL,
        source_agent TEXT,
        plan         TEXT NOT NULL,
        repository   TEXT NOT NULL,
        snapshot     TEXT NOT NULL,
        include      TEXT NOT NULL,
        target       TEXT,
        overwrite    INTEGER NOT NULL,
        result       TEXT
    ) STRICT;",
    // restic served by the server: whether an agent runs its managed restic and why its last install was refused;
    // the restic version a repository requires.
    "ALTER TABLE agents ADD COLUMN restic_managed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN restic_install_error TEXT;
    ALTER TABLE repositories ADD COLUMN min_restic_version TEXT;",
    // Repository maintenance (issue 15). `prune_policy` / `check_policy` are the operator's policies as JSON
    // (`rm_protocol::maintenance::{PrunePolicy, CheckPolicy}`, normalised). A lease with a `maintenance_kind` is a
    // maintenance lease for the firing `maintenance_slot`. `lease_waits` is when a backup last asked for a busy
    // repository's lease (maintenance is not granted while backups wait). `repository_maintenance` keeps, per
    // repository and kind, the operator's run-now request, the last finished run and the newest slot a successful
    // run covered. Operations of a repository (prune, check) name it in `operations.repository`.
    "ALTER TABLE repositories ADD COLUMN prune_policy TEXT;
    ALTER TABLE repositories ADD COLUMN check_policy TEXT;
    ALTER TABLE leases ADD COLUMN maintenance_kind TEXT;
    ALTER TABLE leases ADD COLUMN maintenance_slot INTEGER;
    ALTER TABLE operations ADD COLUMN repository TEXT;
    ALTER TABLE operations ADD COLUMN maintenance TEXT;
    CREATE INDEX operations_repository ON operations(repository, seq) WHERE repository IS NOT NULL;
    CREATE TABLE lease_waits (
        repository TEXT PRIMARY KEY,
        asked_at   INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE repository_maintenance (
        repository        TEXT NOT NULL,
        kind              TEXT NOT NULL,
        requested_at      INTEGER,
        last_operation    TEXT,
        last_status       TEXT,
        last_finished_at  INTEGER,
        last_success_at   INTEGER,
        done_slot         INTEGER,
        PRIMARY KEY (repository, kind)
    ) STRICT;",
    // Maintenance review fixes (issue 15). `lease_waits` is keyed by the waiting backup (repository, agent,
    // operation), so one backup's grant does not forget another that still waits. `maintenance_grants` is the slot
    // each maintenance operation was granted (the only slot its success may cover), until when its lease ran, and
    // whether its holder released it (then its final report is on its way: the slot is not granted again meanwhile).
    // `repository_maintenance.last_slot` orders the last runs by slot, then finish time; `health_*` is the last run
    // whose result says something about the data (a locked, timed-out or cancelled check does not).
    // `maintenance_waits` is when a slot was first held off for waiting backups: after a quarter of its policy's
    // interval it stops yielding to them.
    "DROP TABLE lease_waits;
    CREATE TABLE lease_waits (
        repository   TEXT NOT NULL,
        agent_id     TEXT NOT NULL,
        operation_id TEXT NOT NULL,
        asked_at     INTEGER NOT NULL,
        PRIMARY KEY (repository, agent_id, operation_id)
    ) STRICT;
    CREATE TABLE maintenance_grants (
        agent_id     TEXT NOT NULL,
        operation_id TEXT NOT NULL,
        repository   TEXT NOT NULL,
        kind         TEXT NOT NULL,
        slot         INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL,
        released     INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (agent_id, operation_id)
    ) STRICT;
    CREATE INDEX maintenance_grants_slot ON maintenance_grants(repository, kind, slot);
    ALTER TABLE repository_maintenance ADD COLUMN last_slot INTEGER;
    ALTER TABLE repository_maintenance ADD COLUMN health_status TEXT;
    ALTER TABLE repository_maintenance ADD COLUMN health_slot INTEGER;
    ALTER TABLE repository_maintenance ADD COLUMN health_finished_at INTEGER;
    UPDATE repository_maintenance SET health_status = last_status, health_finished_at = last_finished_at;
    CREATE TABLE maintenance_waits (
        repository       TEXT NOT NULL,
        kind             TEXT NOT NULL,
        slot             INTEGER NOT NULL,
        first_refused_at INTEGER NOT NULL,
        PRIMARY KEY (repository, kind, slot)
    ) STRICT;",
    // Web sessions (issue 16): the operator's page. The cookie's secret is stored only as a hash; `expires_at` is the
    // absolute expiry, `last_seen_at` drives the idle one.
    "CREATE TABLE web_sessions (
        id_hash      BLOB PRIMARY KEY,
        csrf         TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        last_seen_at INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL,
        revoked_at   INTEGER,
        remote_addr  TEXT,
        user_agent   TEXT
    ) STRICT;
    CREATE INDEX web_sessions_expiry ON web_sessions(expires_at);
    -- An operator can revoke an agent's credential (the host page): the agent is refused from then on, its history
    -- stays.
    ALTER TABLE agents ADD COLUMN credential_revoked_at INTEGER;",
    // Web tokens (issue 16): sign-in tokens for the operator's page made by `restic-manager-server web-token create`,
    // stored only as a hash. A session remembers the web token that opened it (NULL: the admin token), so revoking the
    // token ends its sessions.
    "CREATE TABLE web_tokens (
        id          TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL UNIQUE,
        note        TEXT NOT NULL DEFAULT '',
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER,
        revoked_at  INTEGER
    ) STRICT;
    ALTER TABLE web_sessions ADD COLUMN web_token_id TEXT REFERENCES web_tokens(id) ON DELETE CASCADE;
    CREATE INDEX web_sessions_web_token ON web_sessions(web_token_id);",
    // Staged rollouts (issue 17). `agent_builds`: every agent build the server published, archived under
    // `<DataDir>/agent-builds/<sha256>`. `published_builds`: the served build last seen per platform (so a restart does
    // not take an unchanged build for a new one). `released_builds`: the build a platform's hosts run outside any
    // rollout. `rollouts` and `rollout_hosts`: each rollout's strategy, targets, waves and halt (JSON), and its hosts.
    "CREATE TABLE agent_builds (
        sha256        TEXT PRIMARY KEY,
        os            TEXT NOT NULL,
        arch          TEXT NOT NULL,
        size          INTEGER NOT NULL,
        version       TEXT,
        commit_id     TEXT,
        first_seen_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE published_builds (
        os      TEXT NOT NULL,
        arch    TEXT NOT NULL,
        sha256  TEXT NOT NULL,
        seen_at INTEGER NOT NULL,
        PRIMARY KEY (os, arch)
    ) STRICT;
    CREATE TABLE released_builds (
        os          TEXT NOT NULL,
        arch        TEXT NOT NULL,
        sha256      TEXT NOT NULL,
        released_at INTEGER NOT NULL,
        PRIMARY KEY (os, arch)
    ) STRICT;
    CREATE TABLE rollouts (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        state        TEXT NOT NULL,
        strategy     TEXT NOT NULL,
        targets      TEXT NOT NULL,
        waves        TEXT NOT NULL DEFAULT '[]',
        current_wave INTEGER NOT NULL DEFAULT 0,
        wave_done_at INTEGER,
        halt         TEXT,
        created_at   INTEGER NOT NULL,
        started_at   INTEGER,
        finished_at  INTEGER,
        created_by   TEXT NOT NULL
    ) STRICT;
    CREATE TABLE rollout_hosts (
        rollout_id    INTEGER NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
        agent_id      TEXT NOT NULL,
        wave          INTEGER NOT NULL,
        state         TEXT NOT NULL,
        from_sha256   TEXT,
        target_sha256 TEXT NOT NULL,
        rollback      INTEGER NOT NULL DEFAULT 0,
        told_at       INTEGER,
        reported_at   INTEGER,
        verified_at   INTEGER,
        error         TEXT,
        PRIMARY KEY (rollout_id, agent_id)
    ) STRICT;
    CREATE INDEX rollout_hosts_agent ON rollout_hosts(agent_id, rollout_id);
    ALTER TABLE agents ADD COLUMN last_update_sha256 TEXT;",
    // Notifications (issue 19). `notify_channels`: where messages go; `config` the shown part as JSON, `secrets`
    // the write-only part (URL, token, password) sealed as one JSON value. `notify_rules`: which events go to which
    // channel. `notify_states`: the last state seen per subject (`plan:<agent>\t<plan>`, `agent:<id>`,
    // `check:<repository>`, `rollout:<id>`), so a state that holds is never sent again, across restarts too.
    // `notifications`: the queue, one row per message and channel (times in milliseconds), and
    // `notification_attempts` what each attempt got back.
    "CREATE TABLE notify_channels (
        name       TEXT PRIMARY KEY,
        kind       TEXT NOT NULL,
        config     TEXT NOT NULL,
        secrets    BLOB NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE notify_rules (
        name           TEXT PRIMARY KEY,
        channel        TEXT NOT NULL REFERENCES notify_channels(name) ON DELETE CASCADE,
        events         TEXT NOT NULL,
        labels         TEXT NOT NULL,
        warning_digest INTEGER NOT NULL,
        created_at     INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE notify_states (
        subject TEXT PRIMARY KEY,
        state   TEXT NOT NULL,
        since   INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE notifications (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        channel         TEXT NOT NULL REFERENCES notify_channels(name) ON DELETE CASCADE,
        rule            TEXT NOT NULL,
        event           TEXT NOT NULL,
        title           TEXT NOT NULL,
        payload         TEXT NOT NULL,
        status          TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        next_attempt_ms INTEGER,
        give_up_ms      INTEGER NOT NULL,
        delivered_at    INTEGER,
        digest_id       INTEGER
    ) STRICT;
    CREATE INDEX notifications_due ON notifications(status, next_attempt_ms);
    CREATE INDEX notifications_held ON notifications(rule, status);
    CREATE TABLE notification_attempts (
        notification_id INTEGER NOT NULL REFERENCES notifications(id) ON DELETE CASCADE,
        n               INTEGER NOT NULL,
        at              INTEGER NOT NULL,
        ok              INTEGER NOT NULL,
        answer          TEXT NOT NULL,
        PRIMARY KEY (notification_id, n)
    ) STRICT;",
];

pub fn migrations() -> Migrations<'static> {
    Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect())
}

/// The schema version this build writes.
pub fn latest_version() -> usize {
    MIGRATIONS.len()
}
