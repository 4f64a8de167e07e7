//! The filesystem API: list, mkdir, remove, and streamed reads and writes.
//!
//! Reads and writes move one frame (≤ 1 MiB) at a time, so envd's memory stays constant
//! whatever the file size. Frames are large on purpose: under emulation every file operation
//! (a hop to tokio's blocking pool) and every read call costs far more than the copy itself. A write lands in a temporary file beside the target and is renamed
//! over it only when complete: a broken upload never leaves a half-written file.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use envd_proto::{
    read_frame, write_frame, write_json, ErrorKind, FileEntry, Frame, FrameKind, Response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const CHUNK: usize = envd_proto::MAX_FRAME_LEN as usize;
/// Read buffer of an upload's connection: several frame headers and bodies per read call.
const UPLOAD_READ_BUFFER: usize = 256 * 1024;

pub async fn list(path: String, depth: u32, mut wr: OwnedWriteHalf) {
    let answer = match tokio::task::spawn_blocking(move || list_blocking(&path, depth)).await {
        Ok(Ok(entries)) => Response::Entries { entries },
        Ok(Err(e)) => e,
        Err(e) => crate::error(ErrorKind::Internal, e.to_string()),
    };
    let _ = write_json(&mut wr, &answer).await;
}

pub async fn mkdir(path: String, mut wr: OwnedWriteHalf) {
    let answer = match checked(&path) {
        Err(e) => e,
        Ok(p) if std::fs::symlink_metadata(&p).is_ok() => {
            crate::error(ErrorKind::AlreadyExists, format!("{path} already exists"))
        }
        Ok(p) => match std::fs::create_dir_all(&p) {
            Ok(()) => match entry(&p, &Names::load()) {
                Ok(entry) => Response::Entry {
                    entry: Box::new(entry),
                },
                Err(e) => e,
            },
            Err(e) => io_error(&path, e),
        },
    };
    let _ = write_json(&mut wr, &answer).await;
}

pub async fn remove(path: String, mut wr: OwnedWriteHalf) {
    let answer = match checked(&path) {
        Err(e) => e,
        Ok(p) if p == Path::new("/") => {
            crate::error(ErrorKind::InvalidRequest, "refusing to remove /")
        }
        Ok(p) => match std::fs::symlink_metadata(&p) {
            Err(e) => io_error(&path, e),
            Ok(m) => {
                let r = if m.is_dir() {
                    tokio::fs::remove_dir_all(&p).await
                } else {
                    tokio::fs::remove_file(&p).await
                };
                match r {
                    Ok(()) => Response::Done,
                    Err(e) => io_error(&path, e),
                }
            }
        },
    };
    let _ = write_json(&mut wr, &answer).await;
}

pub async fn read(path: String, mut wr: OwnedWriteHalf) {
    let p = match checked(&path) {
        Ok(p) => p,
        Err(e) => {
            let _ = write_json(&mut wr, &e).await;
            return;
        }
    };
    let file = match tokio::fs::File::open(&p).await {
        Ok(f) => f,
        Err(e) => {
            let _ = write_json(&mut wr, &io_error(&path, e)).await;
            return;
        }
    };
    let size = match file.metadata().await {
        Ok(m) if m.is_dir() => {
            let _ = write_json(
                &mut wr,
                &crate::error(ErrorKind::InvalidRequest, format!("{path} is a directory")),
            )
            .await;
            return;
        }
        Ok(m) => m.len(),
        Err(e) => {
            let _ = write_json(&mut wr, &io_error(&path, e)).await;
            return;
        }
    };
    if write_json(&mut wr, &Response::FileStart { size })
        .await
        .is_err()
    {
        return;
    }
    // A regular file's bytes go from the page cache to the socket by sendfile(2): no copy
    // through envd (under emulation each copy costs more than the disk). Whatever the file
    // holds beyond its size at open (it grew) is read below like any other file's.
    let mut file = if size > 0 && is_regular(&file).await {
        let std_file = file.into_std().await;
        if send_file_frames(&std_file, &mut wr, size).await.is_err() {
            return; // mid-frame: only closing tells the host
        }
        tokio::fs::File::from_std(std_file)
    } else {
        file
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if write_frame(&mut wr, FrameKind::Data, &buf[..n])
                    .await
                    .is_err()
                {
                    return; // the host went away
                }
            }
            Err(e) => {
                let _ = write_json(&mut wr, &io_error(&path, e)).await;
                return;
            }
        }
    }
    let _ = write_json(&mut wr, &Response::Done).await;
}

async fn is_regular(file: &tokio::fs::File) -> bool {
    file.metadata().await.is_ok_and(|m| m.is_file())
}

/// Sends the next `len` bytes of `file` (from its current offset, which moves on) as data
/// frames, each body by sendfile(2). An error may come mid-frame.
async fn send_file_frames(
    file: &std::fs::File,
    wr: &mut OwnedWriteHalf,
    len: u64,
) -> std::io::Result<()> {
    let file_fd = file.as_raw_fd();
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        let mut header = [0u8; 5];
        header[0] = FrameKind::Data as u8;
        header[1..].copy_from_slice(&(n as u32).to_be_bytes());
        wr.write_all(&header).await?;
        let sock: &tokio::net::TcpStream = wr.as_ref();
        let sock_fd = sock.as_raw_fd();
        let mut sent = 0;
        while sent < n {
            sock.writable().await?;
            let step = sock.try_io(tokio::io::Interest::WRITABLE, || {
                // SAFETY: both descriptors are open for the whole call (`file` is borrowed, the
                // socket belongs to `wr`); a null offset makes sendfile use and advance the
                // file's own offset; the count is at most one frame.
                let r = unsafe { libc::sendfile(sock_fd, file_fd, std::ptr::null_mut(), n - sent) };
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            });
            match step {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file shrank while it was read",
                    ))
                }
                Ok(k) => sent += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        left -= n as u64;
    }
    Ok(())
}

pub async fn write(path: String, mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf) {
    let answer = match write_inner(&path, &mut rd).await {
        Ok(size) => Response::Written { size },
        Err(e) => e,
    };
    let _ = write_json(&mut wr, &answer).await;
}

async fn write_inner(path: &str, rd: &mut OwnedReadHalf) -> Result<u64, Response> {
    let p = checked(path)?;
    if p.is_dir() {
        return Err(crate::error(
            ErrorKind::InvalidRequest,
            format!("{path} is a directory"),
        ));
    }
    let parent = p.parent().unwrap_or(Path::new("/")).to_path_buf();
    tokio::fs::create_dir_all(&parent)
        .await
        .map_err(|e| io_error(path, e))?;
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = parent.join(format!(
        ".{name}.wrenn-upload-{}",
        std::process::id() ^ rand_u32()
    ));
    let result = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_error(path, e))?;
        let mut size = 0u64;
        let mut rd = tokio::io::BufReader::with_capacity(UPLOAD_READ_BUFFER, rd);
        loop {
            match read_frame(&mut rd).await {
                Ok(Some(Frame::Data(b))) if b.is_empty() => break,
                Ok(Some(Frame::Data(b))) => {
                    file.write_all(&b).await.map_err(|e| io_error(path, e))?;
                    size += b.len() as u64;
                }
                Ok(_) | Err(_) => {
                    return Err(crate::error(
                        ErrorKind::InvalidRequest,
                        "upload ended before its end marker",
                    ))
                }
            }
        }
        file.sync_all().await.map_err(|e| io_error(path, e))?;
        // Keep an existing file's permissions; new files get the usual 0644.
        if let Ok(m) = std::fs::metadata(&p) {
            let _ = std::fs::set_permissions(&tmp, m.permissions());
        }
        tokio::fs::rename(&tmp, &p)
            .await
            .map_err(|e| io_error(path, e))?;
        Ok(size)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// Paths must be absolute; `..` is resolved lexically so answers name the real place.
fn checked(path: &str) -> Result<PathBuf, Response> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(crate::error(
            ErrorKind::InvalidRequest,
            format!("path must be absolute: {path:?}"),
        ));
    }
    let mut out = PathBuf::from("/");
    for c in Path::new(path).components() {
        match c {
            std::path::Component::Normal(s) => out.push(s),
            std::path::Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The guest's filesystem is the user's domain: what it refuses (permissions, read-only mounts,
/// full disks, names too long, ...) is the request's problem; only an I/O error is envd's.
fn io_error(path: &str, e: std::io::Error) -> Response {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        _ if e.raw_os_error() == Some(libc::EIO) => ErrorKind::Internal,
        _ => ErrorKind::InvalidRequest,
    };
    let what = if kind == ErrorKind::NotFound {
        "not found".to_string()
    } else {
        e.to_string()
    };
    crate::error(kind, format!("{path}: {what}"))
}

fn list_blocking(path: &str, depth: u32) -> Result<Vec<FileEntry>, Response> {
    let p = checked(path)?;
    let names = Names::load();
    let root = entry(&p, &names)?;
    if depth == 0 {
        return Ok(vec![root]);
    }
    if root.kind != "directory" {
        return Err(crate::error(
            ErrorKind::InvalidRequest,
            format!("{path} is not a directory"),
        ));
    }
    let mut out = Vec::new();
    walk(&p, depth, &names, &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, depth: u32, names: &Names, out: &mut Vec<FileEntry>) -> Result<(), Response> {
    let rd = std::fs::read_dir(dir).map_err(|e| io_error(&dir.to_string_lossy(), e))?;
    let mut children: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    children.sort();
    for child in children {
        let Ok(e) = entry(&child, names) else {
            continue;
        }; // vanished meanwhile
        let is_dir = e.kind == "directory";
        out.push(e);
        if is_dir && depth > 1 {
            // Unreadable subdirectories are listed but not entered.
            let _ = walk(&child, depth - 1, names, out);
        }
    }
    Ok(())
}

fn entry(p: &Path, names: &Names) -> Result<FileEntry, Response> {
    let path = p.to_string_lossy().into_owned();
    let m = std::fs::symlink_metadata(p).map_err(|e| io_error(&path, e))?;
    let ft = m.file_type();
    let (kind, type_char) = if ft.is_symlink() {
        ("symlink", 'l')
    } else if ft.is_dir() {
        ("directory", 'd')
    } else {
        ("file", '-')
    };
    let mode = m.permissions().mode() & 0o7777;
    Ok(FileEntry {
        name: p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        path,
        kind: kind.to_string(),
        size: m.len(),
        mode,
        permissions: permissions(type_char, mode),
        owner: names.user(m.uid()),
        group: names.group(m.gid()),
        modified_at: m.mtime(),
        symlink_target: if ft.is_symlink() {
            std::fs::read_link(p)
                .ok()
                .map(|t| t.to_string_lossy().into_owned())
        } else {
            None
        },
    })
}

/// `ls -l` style: `-rwxr-xr-x`, with setuid/setgid/sticky shown as s/S, s/S, t/T.
pub fn permissions(type_char: char, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(type_char);
    let bit = |m: u32, c: char| if mode & m != 0 { c } else { '-' };
    let special = |exec: bool, set: bool, on: char, off: char| match (exec, set) {
        (true, true) => on,
        (false, true) => off,
        (true, false) => 'x',
        (false, false) => '-',
    };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(special(mode & 0o100 != 0, mode & 0o4000 != 0, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(special(mode & 0o010 != 0, mode & 0o2000 != 0, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(special(mode & 0o001 != 0, mode & 0o1000 != 0, 't', 'T'));
    s
}

/// User and group names from the guest's /etc/passwd and /etc/group (numeric when unknown).
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn load() -> Self {
        let parse = |file: &str| -> HashMap<u32, String> {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    Some((id, name.to_string()))
                })
                .collect()
        };
        Self {
            users: parse("/etc/passwd"),
            groups: parse("/etc/group"),
        }
    }
    fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }
    fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_strings_match_ls() {
        assert_eq!(permissions('-', 0o755), "-rwxr-xr-x");
        assert_eq!(permissions('d', 0o1777), "drwxrwxrwt");
        assert_eq!(permissions('-', 0o4644), "-rwSr--r--");
        assert_eq!(permissions('l', 0o777), "lrwxrwxrwx");
    }

    #[test]
    fn paths_must_be_absolute_and_are_normalised() {
        assert!(checked("relative").is_err());
        assert!(checked("").is_err());
        assert_eq!(checked("/a/../b/./c").ok(), Some(PathBuf::from("/b/c")));
        assert_eq!(checked("/../..").ok(), Some(PathBuf::from("/")));
    }
}
