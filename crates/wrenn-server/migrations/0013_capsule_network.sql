-- A capsule's egress policy, as JSON (`{"internet":bool,"allow_out":[..],"deny_out":[..]}`);
-- NULL: the default, open to every public destination.
ALTER TABLE capsules ADD COLUMN network TEXT;
