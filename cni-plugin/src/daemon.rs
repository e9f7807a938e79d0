//! The node daemon as the plugin sees it: the [`Daemon`] trait (one enrollment request, one
//! reply) and [`UnixDaemon`], its implementation over the daemon's Unix socket. One request per
//! connection; connecting, writing and reading all share one deadline (`timeout`). A failure
//! to connect is [`CallError::Unreachable`] (the caller may fall back to the daemon's snapshot);
//! anything that goes wrong after the connection is up is [`CallError::Failed`], never
//! "unreachable", because the daemon may already be acting on the request.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ztunnel_proto::enroll::{read_frame, write_frame, FrameError, Reply, Request};

/// Where and how long to talk to the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub socket: PathBuf,
    pub timeout: Duration,
}

/// Why a call produced no reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The connection could not be made (no socket, refused, or timed out).
    #[error("{0}")]
    Unreachable(String),
    /// The connection was made but the exchange failed (i/o, timeout, malformed reply).
    #[error("{0}")]
    Failed(String),
    /// The daemon answered in a protocol version this plugin does not speak.
    #[error("the daemon answered in enrollment protocol version {0}, this plugin speaks {v}", v = ztunnel_proto::enroll::VERSION)]
    Version(u32),
}

/// The node daemon: sends one request and returns its reply.
pub trait Daemon {
    fn call(&self, endpoint: &Endpoint, request: &Request) -> Result<Reply, CallError>;
}

/// The daemon over its Unix socket, with blocking i/o.
pub struct UnixDaemon;

impl Daemon for UnixDaemon {
    fn call(&self, endpoint: &Endpoint, request: &Request) -> Result<Reply, CallError> {
        let deadline = Instant::now() + endpoint.timeout;
        let stream = connect(&endpoint.socket, endpoint.timeout)?;
        let mut conn = Deadlined { stream, deadline };
        let shown = endpoint.socket.display();
        write_frame(&mut conn, request).map_err(|e| failed(&shown, "sending the request", e))?;
        read_frame::<Reply>(&mut conn).map_err(|e| failed(&shown, "reading the reply", e))
    }
}

fn failed(socket: &impl std::fmt::Display, what: &str, e: FrameError) -> CallError {
    match e {
        FrameError::Version(v) => CallError::Version(v),
        FrameError::Io(e) if is_timeout(&e) => {
            CallError::Failed(format!("{what} on {socket}: timed out"))
        }
        e => CallError::Failed(format!("{what} on {socket}: {e}")),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Connects, giving up after `timeout`. A Unix-socket connect blocks when the daemon's accept
/// backlog is full, so it runs on a helper thread; a late connection is dropped with it.
fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, CallError> {
    let (tx, rx) = mpsc::channel();
    let path = socket.to_path_buf();
    std::thread::Builder::new()
        .name("connect".into())
        .spawn(move || {
            let _ = tx.send(UnixStream::connect(&path));
        })
        .map_err(|e| CallError::Unreachable(format!("cannot start the connect thread: {e}")))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(CallError::Unreachable(format!(
            "connecting to {}: {e}",
            socket.display()
        ))),
        Err(_) => Err(CallError::Unreachable(format!(
            "connecting to {}: timed out after {}",
            socket.display(),
            humantime::format_duration(timeout)
        ))),
    }
}

/// A stream whose every read and write ends by `deadline`.
struct Deadlined {
    stream: UnixStream,
    deadline: Instant,
}

impl Deadlined {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        Ok(left)
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use ztunnel_proto::enroll::ErrorKind;

    fn endpoint(dir: &Path, timeout: Duration) -> Endpoint {
        Endpoint {
            socket: dir.join("cni.sock"),
            timeout,
        }
    }

    #[test]
    fn missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let err = UnixDaemon
            .call(
                &endpoint(dir.path(), Duration::from_secs(1)),
                &Request::Status,
            )
            .unwrap_err();
        assert!(matches!(err, CallError::Unreachable(_)), "{err:?}");
    }

    #[test]
    fn exchanges_one_frame() {
        let dir = tempfile::tempdir().unwrap();
        let ep = endpoint(dir.path(), Duration::from_secs(5));
        let listener = UnixListener::bind(&ep.socket).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let req: Request = read_frame(&mut s).unwrap();
            let reply = Reply::Error {
                kind: ErrorKind::NotAvailable,
                message: "warming up".into(),
            };
            write_frame(&mut s, &reply).unwrap();
            req
        });
        let reply = UnixDaemon.call(&ep, &Request::Status).unwrap();
        assert_eq!(
            reply,
            Reply::Error {
                kind: ErrorKind::NotAvailable,
                message: "warming up".into()
            }
        );
        assert_eq!(server.join().unwrap(), Request::Status);
    }

    #[test]
    fn a_silent_daemon_times_out_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let ep = endpoint(dir.path(), Duration::from_millis(200));
        let listener = UnixListener::bind(&ep.socket).unwrap();
        // The daemon holds the connection until the call has returned: only the call's own
        // deadline can end it.
        let (returned, wait) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let _ = wait.recv();
            drop(s);
        });
        let err = UnixDaemon.call(&ep, &Request::Status).unwrap_err();
        returned.send(()).unwrap();
        assert!(
            matches!(err, CallError::Failed(ref m) if m.contains("timed out")),
            "{err:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn another_protocol_version_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ep = endpoint(dir.path(), Duration::from_secs(5));
        let listener = UnixListener::bind(&ep.socket).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _: Request = read_frame(&mut s).unwrap();
            let body = br#"{"version":2,"result":"ok"}"#;
            s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
            s.write_all(body).unwrap();
        });
        let err = UnixDaemon.call(&ep, &Request::Status).unwrap_err();
        assert_eq!(err, CallError::Version(2));
        server.join().unwrap();
    }
}
