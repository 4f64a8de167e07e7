-- Who may reach a capsule's ports through the port proxy besides its team. No row: private
-- (the team's API key or an access token), token generation 0. `public_ports` is a JSON
-- array of port numbers; bumping `token_generation` revokes every access token issued before.
CREATE TABLE capsule_proxy_access (
    capsule_id       TEXT PRIMARY KEY,
    public           INTEGER NOT NULL DEFAULT 0,
    public_ports     TEXT NOT NULL DEFAULT '[]',
    token_generation BIGINT NOT NULL DEFAULT 0,
    updated_at       TEXT NOT NULL
);
