//! The enrollment server: the Unix socket the CNI plugin connects to.
//!
//! The socket is created mode `0600` in the state directory (mode `0700`), so only root can
//! open it. One request per connection ([`ztunnel_proto::enroll`]): a client that does not
//! send a whole frame within [`REQUEST_TIMEOUT`], sends an oversized or garbled frame, or
//! speaks another protocol version gets an error reply (when it can still be written), a log
//! line and a counted refusal; it never blocks other clients.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use ztunnel_proto::enroll::{self, ErrorKind, FrameError, Reply, Request};

use super::pods::Pods;
use crate::refusal::Reason;

/// How long a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the socket (replacing a stale one left by a previous daemon).
pub fn bind(pods: &Pods) -> std::io::Result<UnixListener> {
    let path = pods.store().socket_path();
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves enrollment requests until the task is dropped.
pub async fn serve(listener: UnixListener, pods: Arc<Pods>) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(one(conn, pods.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "enrollment accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn read_request(conn: &mut UnixStream) -> Result<Request, FrameError> {
    let mut prefix = [0u8; 4];
    conn.read_exact(&mut prefix).await?;
    let mut payload = vec![0u8; enroll::frame_len(prefix)?];
    conn.read_exact(&mut payload).await?;
    enroll::decode(&payload)
}

async fn one(mut conn: UnixStream, pods: Arc<Pods>) {
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut conn)).await {
        Err(_) => {
            crate::refused!(
                pods,
                Reason::EnrollmentTimeout,
                "enrollment client sent no request in time; dropped"
            );
            return;
        }
        Ok(Err(FrameError::Version(v))) => {
            crate::refused!(
                pods,
                Reason::EnrollmentBadRequest,
                version = v,
                "enrollment request of an unsupported protocol version"
            );
            Reply::Error {
                kind: ErrorKind::Unsupported,
                message: FrameError::Version(v).to_string(),
            }
        }
        Ok(Err(FrameError::Io(e))) => {
            crate::refused!(pods, Reason::EnrollmentBadRequest, error = %e, "enrollment client went away mid-request");
            return;
        }
        Ok(Err(e)) => {
            crate::refused!(pods, Reason::EnrollmentBadRequest, error = %e, "malformed enrollment request");
            Reply::Error {
                kind: ErrorKind::Invalid,
                message: e.to_string(),
            }
        }
        Ok(Ok(req)) => {
            tracing::debug!(?req, "enrollment request");
            pods.handle(req).await
        }
    };
    let mut out = Vec::new();
    if enroll::write_frame(&mut out, &reply).is_ok() {
        let _ = conn.write_all(&out).await;
    }
    let _ = conn.shutdown().await;
}
