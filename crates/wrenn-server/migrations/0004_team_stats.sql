-- Team statistics (REFERENCE.md): what each team held at each sampler tick (kept 60 days), and
-- the daily integral of its reserved resources (kept for billing-style queries).
CREATE TABLE team_stats_samples (
    team_id       TEXT NOT NULL,
    sampled_at    TEXT NOT NULL,
    running_count INTEGER NOT NULL,
    vcpus         INTEGER NOT NULL,
    memory_mb     INTEGER NOT NULL
);
CREATE INDEX team_stats_samples_by_team_time ON team_stats_samples (team_id, sampled_at);
CREATE INDEX team_stats_samples_by_time ON team_stats_samples (sampled_at);

CREATE TABLE team_usage_daily (
    team_id        TEXT NOT NULL,
    day            TEXT NOT NULL,
    cpu_minutes    DOUBLE PRECISION NOT NULL,
    ram_mb_minutes DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (team_id, day)
);
