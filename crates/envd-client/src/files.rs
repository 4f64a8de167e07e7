//! File transfers, one frame at a time in both directions (no copy of a file anywhere).

use std::time::Duration;

use envd_proto::{read_frame, write_frame, write_json, Frame, FrameKind, Request, Response};

use crate::client::{read_response, EnvdClient};
use crate::conn::EnvdConn;
use crate::error::{EnvdError, Result};

/// How long an abandoned upload may take to be cleaned up by envd.
const ABORT_WAIT: Duration = Duration::from_secs(10);
/// How long envd may take to put a finished upload in place (sync and rename).
const FINISH_WAIT: Duration = Duration::from_secs(120);

/// A file being read from the guest, chunk by chunk.
pub struct FileReader {
    conn: EnvdConn,
    pub size: u64,
    done: bool,
}

/// A file being written into the guest.
pub struct FileWriter {
    conn: EnvdConn,
}

impl EnvdClient {
    /// Opens a file for streaming; fails (not found, a directory, ...) before any byte flows.
    pub async fn read_file(&self, path: &str) -> Result<FileReader> {
        let req = Request::ReadFile {
            path: path.to_string(),
        };
        match self.open_with(&req).await? {
            (conn, Response::FileStart { size }) => Ok(FileReader {
                conn,
                size,
                done: false,
            }),
            (_, other) => Err(EnvdError::unexpected("read", other)),
        }
    }

    /// Starts writing a file; send its bytes with [`FileWriter::send`], then
    /// [`FileWriter::finish`]. Dropping the writer before `finish` leaves no file behind.
    pub async fn write_file(&self, path: &str) -> Result<FileWriter> {
        let mut conn = self.connect().await?;
        let req = Request::WriteFile {
            path: path.to_string(),
        };
        write_json(&mut conn, &req).await?;
        Ok(FileWriter { conn })
    }
}

impl FileReader {
    /// The next chunk, or `None` at the end of the file.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        match read_frame(&mut self.conn).await? {
            Some(Frame::Data(b)) => Ok(Some(b)),
            Some(Frame::Json(j)) => match serde_json::from_slice::<Response>(&j) {
                Ok(Response::Done) => {
                    self.done = true;
                    Ok(None)
                }
                Ok(Response::Error { kind, message }) => Err(EnvdError::reported(kind, message)),
                _ => Err(EnvdError::Unavailable(
                    "unexpected frame in file read".into(),
                )),
            },
            _ => Err(EnvdError::Unavailable("file read ended early".into())),
        }
    }
}

impl FileWriter {
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(()); // an empty frame would end the file
        }
        Ok(write_frame(&mut self.conn, FrameKind::Data, bytes).await?)
    }

    /// Abandons the upload and waits until envd has removed what it wrote so far.
    pub async fn abort(mut self) {
        // Any JSON frame in place of data ends the upload as failed (envd-proto's contract).
        if write_frame(&mut self.conn, FrameKind::Json, b"{}")
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(ABORT_WAIT, read_response(&mut self.conn)).await;
        }
    }

    /// Ends the file; it appears in the guest (whole) when this returns its size.
    pub async fn finish(mut self) -> Result<u64> {
        write_frame(&mut self.conn, FrameKind::Data, &[]).await?;
        let answer = tokio::time::timeout(FINISH_WAIT, read_response(&mut self.conn))
            .await
            .map_err(|_| EnvdError::Unavailable("envd did not finish the file".into()))?;
        match answer? {
            Response::Written { size } => Ok(size),
            Response::Error { kind, message } => Err(EnvdError::reported(kind, message)),
            other => Err(EnvdError::unexpected("write", other)),
        }
    }
}
