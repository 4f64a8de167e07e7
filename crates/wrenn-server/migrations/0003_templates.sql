-- Team snapshot templates. The files live on `host_id` under `snapshot_id`; names are unique
-- per team and never reused for different content (overwrite = delete + create).
CREATE TABLE templates (
    team_id        TEXT NOT NULL REFERENCES teams(id),
    name           TEXT NOT NULL,
    kind           TEXT NOT NULL,
    snapshot_id    TEXT NOT NULL,
    host_id        TEXT NOT NULL,
    source_capsule TEXT,
    vcpus          INTEGER NOT NULL,
    memory_mb      INTEGER NOT NULL,
    disk_size_mb   INTEGER NOT NULL,
    size_bytes     INTEGER NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (team_id, name)
);
