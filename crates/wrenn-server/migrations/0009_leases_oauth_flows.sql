-- Leases: which control-plane replica runs a job that must run once (the team stats sampler).
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

-- OAuth flows started and not yet finished (by SHA-256 of their state), so the callback may
-- reach any replica. `user_id` is set for connect flows (linking to a signed-in user).
CREATE TABLE oauth_flows (
    state_hash TEXT PRIMARY KEY,
    provider   TEXT NOT NULL,
    user_id    TEXT,
    expires_at TEXT NOT NULL
);
