-- The audit log (who did what, newest first by (created_at, id)), notification channels (their
-- config values encrypted with AES-256-GCM) and the outcome of every delivery to a channel.
CREATE TABLE audit_logs (
    id            TEXT PRIMARY KEY,
    team_id       TEXT,
    actor_type    TEXT NOT NULL,
    actor_id      TEXT NOT NULL,
    actor_name    TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    action        TEXT NOT NULL,
    scope         TEXT NOT NULL,
    status        TEXT NOT NULL,
    metadata      TEXT NOT NULL,
    -- RFC 3339 UTC with microseconds: fixed width, so text order is time order.
    created_at    TEXT NOT NULL
);
CREATE INDEX audit_logs_team_time ON audit_logs (team_id, created_at, id);
CREATE INDEX audit_logs_time ON audit_logs (created_at, id);
CREATE INDEX audit_logs_actor ON audit_logs (actor_id);

CREATE TABLE channels (
    id         TEXT PRIMARY KEY,
    team_id    TEXT NOT NULL,
    name       TEXT NOT NULL,
    provider   TEXT NOT NULL,
    events     TEXT NOT NULL,
    config     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (team_id, name)
);

CREATE TABLE channel_deliveries (
    id           TEXT PRIMARY KEY,
    channel_id   TEXT NOT NULL,
    event        TEXT NOT NULL,
    status       TEXT NOT NULL,
    attempts     BIGINT NOT NULL,
    last_error   TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX channel_deliveries_channel ON channel_deliveries (channel_id, created_at);
