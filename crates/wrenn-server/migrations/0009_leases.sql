-- Leases: which control-plane replica runs a job that must run once (the team stats sampler).
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
