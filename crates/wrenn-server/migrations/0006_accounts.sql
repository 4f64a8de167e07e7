-- Accounts: sessions, one-time tokens (activation, password reset), OAuth identities, soft
-- deletion of users and a team's BYOC switch. Portable SQL (SQLite and PostgreSQL).
ALTER TABLE users ADD COLUMN deleted_at TEXT;
ALTER TABLE teams ADD COLUMN byoc INTEGER NOT NULL DEFAULT 0;

-- Activation and reset tokens, stored as SHA-256 only; a row is consumed by deleting it.
CREATE TABLE user_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX user_tokens_user ON user_tokens (user_id, purpose);

-- Browser sessions. The cookie carries a random secret whose SHA-256 is `token_hash`; `id` is
-- the public handle shown in the session list. `expires_at` is the absolute end (24 h).
CREATE TABLE sessions (
    id           TEXT PRIMARY KEY,
    token_hash   TEXT NOT NULL UNIQUE,
    csrf_token   TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    team_id      TEXT NOT NULL,
    user_agent   TEXT NOT NULL,
    ip_address   TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    last_seen_at TEXT NOT NULL,
    expires_at   TEXT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE oauth_identities (
    provider         TEXT NOT NULL,
    provider_user_id TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    email            TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    PRIMARY KEY (provider, provider_user_id)
);
CREATE INDEX oauth_identities_user ON oauth_identities (user_id);

CREATE INDEX team_members_user ON team_members (user_id);
CREATE INDEX api_keys_team ON api_keys (team_id);
