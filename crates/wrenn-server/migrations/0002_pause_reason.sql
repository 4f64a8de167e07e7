-- Why a capsule was last paused: `user` (the API) or `ttl_expired` (auto-pause).
ALTER TABLE capsules ADD COLUMN pause_reason TEXT;
