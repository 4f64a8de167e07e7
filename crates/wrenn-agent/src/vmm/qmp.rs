//! A small QMP (QEMU Machine Protocol) client: JSON lines over QEMU's unix socket.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::error::{HostError, Result};

const QMP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| HostError::Vmm(format!("qmp connect {}: {e}", path.display())))?;
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(HostError::Vmm(format!(
                "unexpected qmp greeting: {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value; QMP errors become `HostError::Vmm`.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let m = self.read_message().await?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(HostError::Vmm(format!("qmp {command}: {e}")));
            }
            // Asynchronous events interleave with answers; they are not ours to handle here.
        }
    }

    /// Hands QEMU a copy of `fd` under `name` (`getfd`, the descriptor riding along as
    /// SCM_RIGHTS), for a `fd:<name>` migration: QEMU then needs no path and no helper process
    /// to reach the file.
    pub async fn pass_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        self.execute_with_fd(
            json!({ "execute": "getfd", "arguments": { "fdname": name } }),
            fd,
        )
        .await?;
        Ok(())
    }

    /// Adds a copy of `fd` to QEMU's descriptor set `fdset` (`add-fd`): a file QEMU then opens
    /// as `/dev/fdset/<fdset>` (with the access mode of one of the set's descriptors), which a
    /// VM in its jail could not open by path.
    pub async fn add_fd(&mut self, fdset: u32, fd: BorrowedFd<'_>) -> Result<()> {
        self.execute_with_fd(
            json!({ "execute": "add-fd", "arguments": { "fdset-id": fdset } }),
            fd,
        )
        .await?;
        Ok(())
    }

    /// Runs `command` with `fd` attached to its first byte; its `return`.
    async fn execute_with_fd(&mut self, command: Value, fd: BorrowedFd<'_>) -> Result<Value> {
        let line = format!("{command}\n");
        let bytes = line.as_bytes();
        let sock: &UnixStream = self.writer.as_ref();
        let sent = loop {
            sock.writable().await?;
            match sock.try_io(Interest::WRITABLE, || {
                send_with_fd(sock.as_raw_fd(), bytes, fd.as_raw_fd())
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // The descriptor went with the first byte; the rest of the line follows plainly.
        self.writer.write_all(&bytes[sent..]).await?;
        loop {
            let m = self.read_message().await?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(HostError::Vmm(format!("qmp {}: {e}", command["execute"])));
            }
        }
    }

    async fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = tokio::time::timeout(QMP_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| HostError::Vmm("qmp: no answer".into()))??;
        if n == 0 {
            return Err(HostError::Vmm("qmp: connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| HostError::Vmm(format!("qmp: bad message: {e}")))
    }
}

/// sendmsg(2) of `bytes` with `fd` attached as SCM_RIGHTS; returns the bytes sent.
fn send_with_fd(sock: RawFd, bytes: &[u8], fd: RawFd) -> std::io::Result<usize> {
    let fd_len = std::mem::size_of::<RawFd>() as libc::c_uint;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
    // u64s keep the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: `msghdr` is plain old data; all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which has room for one header and one descriptor
    // (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null and CMSG_DATA lies inside `control`;
    // the descriptor is written unaligned as the data need not be aligned for an int.
    // sendmsg reads `msg`, `iov` (pointing at `bytes`) and `control`, all alive here, and
    // duplicates `fd` into the peer; it keeps no pointer.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
