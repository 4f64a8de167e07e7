-- Per-team quotas set by platform admins; a NULL limit follows the platform default.
CREATE TABLE team_quotas (
    team_id    TEXT PRIMARY KEY REFERENCES teams(id),
    capsules   BIGINT,
    vcpus      BIGINT,
    memory_mb  BIGINT,
    disk_mb    BIGINT,
    snapshots  BIGINT,
    updated_at TEXT NOT NULL
);
