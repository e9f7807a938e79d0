//! Socket helpers: marked outbound connections (so capture rules skip the daemon's own
//! traffic), listeners with `SO_REUSEPORT` (so a restarting daemon can take over), and the
//! original destination of a redirected connection (`SO_ORIGINAL_DST`).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How the daemon's outbound sockets are made.
#[derive(Clone, Copy, Debug)]
pub struct ConnectOptions {
    /// `SO_MARK` to set; `None` leaves the socket unmarked.
    pub mark: Option<u32>,
    pub timeout: Duration,
}

static MARK_WARNED: AtomicBool = AtomicBool::new(false);

/// Connects to `addr` with the daemon's mark set and `TCP_NODELAY`.
///
/// Setting a mark needs `CAP_NET_ADMIN`; without it the connection is still made (there are
/// then no capture rules to skip) and a warning is logged once.
pub async fn connect(addr: SocketAddr, opts: ConnectOptions) -> io::Result<TcpStream> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(mark) = opts.mark {
        if let Err(e) = SockRef::from(&sock).set_mark(mark) {
            if !MARK_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot mark the daemon's sockets (needs CAP_NET_ADMIN)");
            }
        }
    }
    sock.set_nodelay(true)?;
    match tokio::time::timeout(opts.timeout, sock.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {:?}", opts.timeout),
        )),
    }
}

/// Binds a listener with `SO_REUSEADDR` and `SO_REUSEPORT`, so that a new daemon process can
/// bind beside the old one during a rolling restart.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// The destination a connection had before a `redirect`/`dnat` rule sent it to us.
///
/// Errors (`ENOENT`) when the connection was not redirected.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}
