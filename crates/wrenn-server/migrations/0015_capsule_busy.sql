-- Until when a capsule is in use (a terminal, a stream, a long exec) on some control-plane
-- replica: the TTL reaper, wherever it runs, does not auto-pause it before then. Replicas
-- renew it while the use lasts; a replica that dies lets it lapse.
ALTER TABLE capsules ADD COLUMN busy_until TEXT;
