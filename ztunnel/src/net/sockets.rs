//! Where the proxies and the tunnel pool get their sockets: the one place that reads a
//! redirected connection's original destination and makes the connections they open.
//!
//! The daemon uses [`Kernel`]: `SO_ORIGINAL_DST` and [`super::connect_from`]. A program that
//! runs the proxies without capture rules (the in-process tests, the benchmarks) gives its
//! own [`Sockets`]: a table of original destinations instead of the kernel's, a tunnel port
//! moved to where its test server listens, a fault on demand. Everything the proxies decide
//! from those sockets is the daemon's own code.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::TcpStream;

use super::{ConnectOptions, Origin};

/// A connection being made (see [`Sockets::connect`]).
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;

/// The proxies' socket factory.
pub trait Sockets: Debug + Send + Sync + 'static {
    /// The destination `tcp` had before it was redirected to a proxy's listener.
    fn original_dst(&self, tcp: &TcpStream) -> io::Result<SocketAddr>;

    /// Connects to `addr` from `origin` (a peer's tunnel port, an application, a passthrough
    /// destination).
    fn connect<'a>(
        &'a self,
        addr: SocketAddr,
        opts: ConnectOptions,
        origin: &'a Origin,
    ) -> Connecting<'a>;

    /// Where QUIC datagrams for a tunnel to `addr` are sent.
    fn quic_peer(&self, addr: SocketAddr) -> SocketAddr {
        addr
    }
}

/// The kernel's sockets: what the daemon uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kernel;

impl Kernel {
    /// A shared [`Kernel`], as the proxies hold their factory.
    pub fn shared() -> Arc<dyn Sockets> {
        Arc::new(Kernel)
    }
}

impl Sockets for Kernel {
    fn original_dst(&self, tcp: &TcpStream) -> io::Result<SocketAddr> {
        super::original_dst(tcp)
    }

    fn connect<'a>(
        &'a self,
        addr: SocketAddr,
        opts: ConnectOptions,
        origin: &'a Origin,
    ) -> Connecting<'a> {
        Box::pin(super::connect_from(addr, opts, origin))
    }
}

/// The kernel's sockets, with a table in place of the capture rules, for programs that run
/// the proxies on the host's own addresses without root (the in-process tests, the
/// benchmarks): each listener stands for one original destination, as a rule redirecting that
/// one address would; and connections to some addresses are made to others instead (a peer's
/// tunnel port moved to where a server on loopback listens, for TCP and QUIC alike).
#[derive(Debug, Default)]
pub struct Redirects {
    /// Listener address → the original destination of what it accepts.
    original: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// Address asked for → address connected to.
    moved: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl Redirects {
    /// What the listener on `listener` accepts was meant for `original_dst`.
    pub fn redirect(&self, listener: SocketAddr, original_dst: SocketAddr) {
        self.original.lock().insert(listener, original_dst);
    }

    /// Connections to `addr` are made to `to`.
    pub fn move_to(&self, addr: SocketAddr, to: SocketAddr) {
        self.moved.lock().insert(addr, to);
    }

    fn moved(&self, addr: SocketAddr) -> SocketAddr {
        self.moved.lock().get(&addr).copied().unwrap_or(addr)
    }
}

impl Sockets for Redirects {
    fn original_dst(&self, tcp: &TcpStream) -> io::Result<SocketAddr> {
        let local = tcp.local_addr()?;
        self.original.lock().get(&local).copied().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no redirect to {local}"))
        })
    }

    fn connect<'a>(
        &'a self,
        addr: SocketAddr,
        opts: ConnectOptions,
        origin: &'a Origin,
    ) -> Connecting<'a> {
        Box::pin(super::connect_from(self.moved(addr), opts, origin))
    }

    fn quic_peer(&self, addr: SocketAddr) -> SocketAddr {
        self.moved(addr)
    }
}
