//! Build archives: the files `COPY` takes, uploaded as tar, tar.gz or zip and kept as one
//! plain tar whose every entry was checked (relative path without `..`; files, directories
//! and symlinks that stay inside; bounded count and unpacked size).

use std::io::{Read, Seek};
use std::path::{Component, Path};

/// Most entries an archive may hold.
pub const MAX_ENTRIES: usize = 100_000;
/// Most bytes an archive may unpack to (a compressed archive may be far smaller).
pub const MAX_UNPACKED_BYTES: u64 = 2 * 1024 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    #[error("the archive is not a tar, tar.gz or zip file")]
    UnknownFormat,
    #[error("the archive is damaged: {0}")]
    Damaged(String),
    #[error("archive entry {path:?}: {why}")]
    BadEntry { path: String, why: &'static str },
    #[error("the archive holds more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error("the archive unpacks to more than {} MiB", MAX_UNPACKED_BYTES >> 20)]
    TooLarge,
}

fn damaged(e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Damaged(e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Tar,
    Gzip,
    Zip,
}

fn sniff(head: &[u8]) -> Option<Format> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(Format::Gzip)
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Some(Format::Zip)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Some(Format::Tar)
    } else {
        None
    }
}

/// A path inside the archive as it may be unpacked: relative, no `..`, not empty.
fn check_path(path: &Path) -> Result<(), ArchiveError> {
    let bad = |why| ArchiveError::BadEntry {
        path: path.display().to_string(),
        why,
    };
    if path.as_os_str().is_empty() {
        return Err(bad("empty path"));
    }
    for c in path.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(bad("'..' in the path")),
            Component::RootDir | Component::Prefix(_) => return Err(bad("absolute path")),
        }
    }
    Ok(())
}

/// A symlink's target must stay inside the archive's tree.
fn check_link(path: &Path, target: &Path) -> Result<(), ArchiveError> {
    let bad = |why| ArchiveError::BadEntry {
        path: path.display().to_string(),
        why,
    };
    if target.is_absolute() {
        return Err(bad("symlink to an absolute path"));
    }
    let mut depth: i64 = path.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(bad("symlink out of the archive"));
        }
    }
    Ok(())
}

/// Reads the upload at `input` and writes the checked plain tar to `output`.
pub fn normalize(input: &Path, output: &Path) -> Result<(), ArchiveError> {
    let mut file = std::fs::File::open(input).map_err(damaged)?;
    let mut head = [0u8; 512];
    let n = read_up_to(&mut file, &mut head).map_err(damaged)?;
    file.rewind().map_err(damaged)?;
    let format = sniff(&head[..n]).ok_or(ArchiveError::UnknownFormat)?;
    let out = std::fs::File::create(output).map_err(damaged)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(out));
    builder.follow_symlinks(false);
    match format {
        Format::Tar => copy_tar(file, &mut builder)?,
        Format::Gzip => copy_tar(flate2::read::GzDecoder::new(file), &mut builder)?,
        Format::Zip => copy_zip(file, &mut builder)?,
    }
    builder
        .into_inner()
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .map_err(damaged)?;
    Ok(())
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

struct Budget {
    entries: usize,
    bytes: u64,
}

impl Budget {
    fn take(&mut self, size: u64) -> Result<(), ArchiveError> {
        self.entries += 1;
        self.bytes = self.bytes.saturating_add(size);
        if self.entries > MAX_ENTRIES {
            return Err(ArchiveError::TooManyEntries);
        }
        if self.bytes > MAX_UNPACKED_BYTES {
            return Err(ArchiveError::TooLarge);
        }
        Ok(())
    }
}

fn copy_tar<W: std::io::Write>(
    input: impl Read,
    out: &mut tar::Builder<W>,
) -> Result<(), ArchiveError> {
    let mut archive = tar::Archive::new(input);
    let mut budget = Budget {
        entries: 0,
        bytes: 0,
    };
    for entry in archive.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        let path = entry.path().map_err(damaged)?.into_owned();
        check_path(&path)?;
        let kind = entry.header().entry_type();
        let bad = |why| ArchiveError::BadEntry {
            path: path.display().to_string(),
            why,
        };
        let mut header = tar::Header::new_gnu();
        header.set_mode(entry.header().mode().map_err(damaged)? & 0o7777);
        header.set_mtime(entry.header().mtime().unwrap_or(0));
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                budget.take(size)?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(size);
                out.append_data(&mut header, &path, &mut entry)
                    .map_err(damaged)?;
            }
            tar::EntryType::Directory => {
                budget.take(0)?;
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                out.append_data(&mut header, &path, std::io::empty())
                    .map_err(damaged)?;
            }
            tar::EntryType::Symlink => {
                budget.take(0)?;
                let target = entry
                    .link_name()
                    .map_err(damaged)?
                    .ok_or_else(|| bad("symlink without a target"))?
                    .into_owned();
                check_link(&path, &target)?;
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                out.append_link(&mut header, &path, &target)
                    .map_err(damaged)?;
            }
            // Extended headers are read by the tar crate itself.
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            _ => return Err(bad("only files, directories and symlinks are allowed")),
        }
    }
    Ok(())
}

fn copy_zip<W: std::io::Write>(
    input: std::fs::File,
    out: &mut tar::Builder<W>,
) -> Result<(), ArchiveError> {
    let mut zip = zip::ZipArchive::new(input).map_err(damaged)?;
    if zip.len() > MAX_ENTRIES {
        return Err(ArchiveError::TooManyEntries);
    }
    let mut budget = Budget {
        entries: 0,
        bytes: 0,
    };
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).map_err(damaged)?;
        let name = f.name().map_err(damaged)?.to_string();
        let path = std::path::PathBuf::from(name.trim_end_matches('/'));
        check_path(&path)?;
        let mode = f
            .unix_mode()
            .unwrap_or(if f.is_dir() { 0o755 } else { 0o644 });
        let mut header = tar::Header::new_gnu();
        header.set_mode(mode & 0o7777);
        if f.is_dir() {
            budget.take(0)?;
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            out.append_data(&mut header, &path, std::io::empty())
                .map_err(damaged)?;
        } else if mode & 0o170000 == 0o120000 {
            budget.take(0)?;
            let mut target = String::new();
            (&mut f)
                .take(4096)
                .read_to_string(&mut target)
                .map_err(damaged)?;
            let target = std::path::PathBuf::from(target);
            check_link(&path, &target)?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            out.append_link(&mut header, &path, &target)
                .map_err(damaged)?;
        } else {
            let size = f.size();
            budget.take(size)?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            // A lying size in the zip directory fails the copy instead of growing it.
            out.append_data(&mut header, &path, (&mut f).take(size))
                .map_err(damaged)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            // Raw names, so hostile paths can be written.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn normalize_bytes(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, ArchiveError> {
        let dir = tempfile::tempdir().unwrap();
        let (i, o) = (dir.path().join("in"), dir.path().join("out.tar"));
        std::fs::write(&i, bytes).unwrap();
        normalize(&i, &o)?;
        let mut a = tar::Archive::new(std::fs::File::open(&o).unwrap());
        Ok(a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (e.path().unwrap().display().to_string(), data)
            })
            .collect())
    }

    #[test]
    fn tar_gzip_and_zip_become_one_tar() {
        let t = tar_with(&[
            ("app", tar::EntryType::Directory, b"", None),
            ("app/main.py", tar::EntryType::Regular, b"print(1)\n", None),
            ("app/link", tar::EntryType::Symlink, b"", Some("main.py")),
        ]);
        let want = vec![
            ("app".to_string(), vec![]),
            ("app/main.py".to_string(), b"print(1)\n".to_vec()),
            ("app/link".to_string(), vec![]),
        ];
        assert_eq!(normalize_bytes(&t).unwrap(), want);

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&t).unwrap();
        assert_eq!(normalize_bytes(&gz.finish().unwrap()).unwrap(), want);

        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        z.add_directory("app/", opts).unwrap();
        z.start_file("app/main.py", opts).unwrap();
        z.write_all(b"print(1)\n").unwrap();
        let bytes = z.finish().unwrap().into_inner();
        assert_eq!(normalize_bytes(&bytes).unwrap(), want[..2].to_vec());
    }

    #[test]
    fn hostile_entries_are_refused() {
        for (entries, needle) in [
            (
                vec![("../evil", tar::EntryType::Regular, &b"x"[..], None)],
                "'..'",
            ),
            (
                vec![("/etc/passwd", tar::EntryType::Regular, &b"x"[..], None)],
                "absolute",
            ),
            (
                vec![("l", tar::EntryType::Symlink, &b""[..], Some("/etc"))],
                "absolute",
            ),
            (
                vec![("a/l", tar::EntryType::Symlink, &b""[..], Some("../../x"))],
                "out of the archive",
            ),
            (
                vec![("dev", tar::EntryType::Char, &b""[..], None)],
                "only files",
            ),
            (
                vec![("h", tar::EntryType::Link, &b""[..], Some("x"))],
                "only files",
            ),
        ] {
            let e = normalize_bytes(&tar_with(&entries)).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
        assert_eq!(
            normalize_bytes(b"just some text, not an archive").unwrap_err(),
            ArchiveError::UnknownFormat
        );
        assert!(matches!(
            normalize_bytes(&[0x1f, 0x8b, 0, 1, 2, 3]).unwrap_err(),
            ArchiveError::Damaged(_)
        ));
    }
}
