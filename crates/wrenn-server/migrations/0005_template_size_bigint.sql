-- Snapshot sizes pass 2^31 bytes: PostgreSQL's INTEGER is 32-bit (SQLite's is 64-bit already).
-- Rebuilt the portable way (new table, copy, swap), so one migration serves both backends.
CREATE TABLE templates_new (
    team_id        TEXT NOT NULL REFERENCES teams(id),
    name           TEXT NOT NULL,
    kind           TEXT NOT NULL,
    snapshot_id    TEXT NOT NULL,
    host_id        TEXT NOT NULL,
    source_capsule TEXT,
    vcpus          INTEGER NOT NULL,
    memory_mb      INTEGER NOT NULL,
    disk_size_mb   INTEGER NOT NULL,
    size_bytes     BIGINT NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (team_id, name)
);
INSERT INTO templates_new (team_id, name, kind, snapshot_id, host_id, source_capsule, vcpus,
                           memory_mb, disk_size_mb, size_bytes, created_at)
    SELECT team_id, name, kind, snapshot_id, host_id, source_capsule, vcpus,
           memory_mb, disk_size_mb, size_bytes, created_at FROM templates;
DROP TABLE templates;
ALTER TABLE templates_new RENAME TO templates;
