-- Hosts (machines running agents), their one-time registration and rotating refresh tokens
-- (SHA-256 only), tags, and the control plane's own secrets (host-token signing key, the CA
-- that issues agents' TLS certificates).
CREATE TABLE hosts (
    id                TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    team_id           TEXT,
    provider          TEXT,
    availability_zone TEXT,
    arch              TEXT,
    cpu_cores         BIGINT,
    memory_mb         BIGINT,
    disk_gb           BIGINT,
    address           TEXT,
    status            TEXT NOT NULL,
    last_heartbeat_at TEXT,
    created_by        TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);

CREATE TABLE host_tokens (
    token_hash TEXT PRIMARY KEY,
    host_id    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    revoked_at TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX host_tokens_host ON host_tokens (host_id, kind);

CREATE TABLE host_tags (
    host_id TEXT NOT NULL,
    tag     TEXT NOT NULL,
    PRIMARY KEY (host_id, tag)
);

CREATE TABLE platform_secrets (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE INDEX capsules_host_status ON capsules (host_id, status);
