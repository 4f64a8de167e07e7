-- Template builds (admin): a recipe run step by step in a capsule, ending in a platform
-- template. `base_template` is '' for a build from an OCI image (`base_image`). `recipe` and
-- `logs` are JSON arrays; `archive` is the uploaded build context
-- waiting on the control plane (cleared when the build ends); `replica` is the control-plane
-- replica running it (a replica that restarts fails only its own interrupted builds).
CREATE TABLE builds (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    base_template TEXT NOT NULL,
    base_image    TEXT,
    recipe        TEXT NOT NULL,
    healthcheck   TEXT,
    vcpus         INTEGER NOT NULL,
    memory_mb     INTEGER NOT NULL,
    disk_size_mb  INTEGER NOT NULL,
    skip_pre_post INTEGER NOT NULL,
    status        TEXT NOT NULL,
    current_step  INTEGER NOT NULL,
    total_steps   INTEGER NOT NULL,
    logs          TEXT NOT NULL,
    error         TEXT,
    sandbox_id    TEXT,
    host_id       TEXT,
    default_user  TEXT,
    default_env   TEXT,
    recipe_hash   TEXT NOT NULL,
    archive       TEXT,
    replica       TEXT,
    builtin       INTEGER NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    started_at    TEXT,
    completed_at  TEXT
);
CREATE INDEX builds_status ON builds (status, created_at);

-- What a built template carries: the user and environment every capsule and exec from it
-- gets, the build that made it, and whether admins may delete it (built-in templates not).
ALTER TABLE templates ADD COLUMN default_user TEXT;
ALTER TABLE templates ADD COLUMN default_env TEXT;
ALTER TABLE templates ADD COLUMN build_id TEXT;
ALTER TABLE templates ADD COLUMN protected INTEGER NOT NULL DEFAULT 0;
-- Built-in templates: what they were made from (a changed recipe rebuilds them).
ALTER TABLE templates ADD COLUMN cache_key TEXT;
