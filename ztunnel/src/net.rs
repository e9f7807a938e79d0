//! Socket helpers: marked outbound connections (so capture rules skip the daemon's own
//! traffic), listeners with `SO_REUSEPORT` (so a restarting daemon can take over), and the
//! original destination of a redirected connection (`SO_ORIGINAL_DST`).
//!
//! A socket can be made inside a pod's network namespace ([`Origin::netns`]) and, for the
//! daemon's connection to an application on behalf of a remote client, bound to that client's
//! address with `IP_TRANSPARENT` ([`Origin::transparent_src`]), so the application sees the
//! real client address.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::capture::netns::Netns;

/// Where a connection comes from: the namespace its socket is made in, and the source address
/// it claims. The default is the daemon's own namespace and an ordinary source.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub netns: Option<Arc<Netns>>,
    pub transparent_src: Option<IpAddr>,
}

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
    connect_from(addr, opts, &Origin::default()).await
}

/// Like [`connect`], from `origin`.
pub async fn connect_from(
    addr: SocketAddr,
    opts: ConnectOptions,
    origin: &Origin,
) -> io::Result<TcpStream> {
    let new = || match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let sock = match &origin.netns {
        Some(ns) => ns.run(new)??,
        None => new()?,
    };
    if let Some(src) = origin.transparent_src {
        let s = SockRef::from(&sock);
        match src {
            IpAddr::V4(_) => s.set_ip_transparent_v4(true)?,
            IpAddr::V6(_) => s.set_ip_transparent_v6(true)?,
        }
        s.set_reuse_address(true)?;
        sock.bind(SocketAddr::new(src, 0))?;
    }
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
    listen_in(None, addr)
}

/// Like [`listen`], inside `netns` when given.
pub fn listen_in(netns: Option<&Netns>, addr: SocketAddr) -> io::Result<TcpListener> {
    let new = || match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let sock = match netns {
        Some(ns) => ns.run(new)??,
        None => new()?,
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
