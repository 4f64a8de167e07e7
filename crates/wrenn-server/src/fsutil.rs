//! Files the control plane keeps under its data dir hold credentials (the database, the
//! encryption key, the outbox's links): they are created readable by their owner only.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `bytes` to `path` (created or truncated) with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode through `open`: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

/// Creates `path` if it is missing and makes it, and any file already there, mode 0600,
/// without touching its contents.
pub fn ensure_private_file(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_are_owner_only_even_when_they_existed() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        let f = dir.join("x");
        std::fs::write(&f, b"old").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&f, b"new").unwrap();
        assert_eq!(
            (mode(&f), std::fs::read(&f).unwrap()),
            (0o600, b"new".to_vec())
        );
        let db = dir.join("db");
        std::fs::write(&db, b"keep").unwrap();
        ensure_private_file(&db).unwrap();
        assert_eq!(
            (mode(&db), std::fs::read(&db).unwrap()),
            (0o600, b"keep".to_vec())
        );
        ensure_private_file(&dir.join("new.db")).unwrap();
        assert_eq!(mode(&dir.join("new.db")), 0o600);
    }
}
