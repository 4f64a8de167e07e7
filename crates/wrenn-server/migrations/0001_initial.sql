-- Accounts, teams, API keys and capsules. Timestamps are RFC 3339 UTC strings.
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    password_hash TEXT,
    is_admin      INTEGER NOT NULL DEFAULT 0,
    status        TEXT NOT NULL,
    created_at    TEXT NOT NULL
);

CREATE TABLE teams (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    slug       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    deleted_at TEXT
);

CREATE TABLE team_members (
    team_id    TEXT NOT NULL REFERENCES teams(id),
    user_id    TEXT NOT NULL REFERENCES users(id),
    role       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (team_id, user_id)
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    team_id      TEXT NOT NULL REFERENCES teams(id),
    name         TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    key_prefix   TEXT NOT NULL,
    created_by   TEXT REFERENCES users(id),
    created_at   TEXT NOT NULL,
    last_used_at TEXT
);

CREATE TABLE capsules (
    id             TEXT PRIMARY KEY,
    team_id        TEXT NOT NULL REFERENCES teams(id),
    host_id        TEXT,
    template       TEXT NOT NULL,
    status         TEXT NOT NULL,
    vcpus          INTEGER NOT NULL,
    memory_mb      INTEGER NOT NULL,
    disk_size_mb   INTEGER NOT NULL,
    timeout_sec    INTEGER NOT NULL,
    guest_ip       TEXT NOT NULL DEFAULT '',
    host_ip        TEXT NOT NULL DEFAULT '',
    metadata       TEXT,
    error          TEXT,
    created_at     TEXT NOT NULL,
    started_at     TEXT,
    last_active_at TEXT,
    last_updated   TEXT NOT NULL
);

CREATE INDEX capsules_team_status ON capsules (team_id, status);
