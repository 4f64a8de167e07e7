-- Copies of a template's snapshot files on hosts other than the one that made it (the
-- template row's `host_id`). A row is written once the host has installed the copy; a row
-- whose snapshot no template names any more is a copy still to be deleted on its host.
CREATE TABLE template_copies (
    snapshot_id TEXT NOT NULL,
    host_id     TEXT NOT NULL,
    size_bytes  BIGINT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, host_id)
);
