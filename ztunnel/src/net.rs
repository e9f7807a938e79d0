//! Socket helpers: marked outbound connections (so capture rules skip the daemon's own
//! traffic), listeners with `SO_REUSEPORT` (so a restarting daemon can take over), and the
//! original destination of a redirected connection (`SO_ORIGINAL_DST`).
//!
//! Listeners steer new connections to the newest daemon ([`steer_to_newest`]): during a
//! rolling update the new daemon's listener joins the old one's `SO_REUSEPORT` group, and from
//! then on every new connection is queued on the new one. The old daemon's queue stops
//! growing at that moment and is emptied by its accept loop long before it drains, so closing
//! its listeners leaves no queued connection to reset, with or without `tcp_migrate_req`.
//!
//! A socket can be made inside a pod's network namespace ([`Origin::netns`]) and, for the
//! daemon's connection to an application on behalf of a remote client, bound to that client's
//! address with `IP_TRANSPARENT` ([`Origin::transparent_src`]), so the application sees the
//! real client address. Its source port is chosen when it connects, not when it is bound
//! (`IP_BIND_ADDRESS_NO_PORT`), so a port is shared by connections to different destinations
//! as a plain `connect`'s is: a client address holds the pod's ephemeral range of connections
//! to each application port, not that many in all. Network namespaces themselves, and running
//! code inside one, are [`netns`]; the proxies reach all of this through the factory of
//! [`sockets`].

pub mod netns;
pub mod sockets;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use netns::Netns;

/// Where a connection comes from: the namespace its socket is made in, and the source address
/// it claims. The default is the daemon's own namespace and an ordinary source.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub netns: Option<Arc<Netns>>,
    pub transparent_src: Option<IpAddr>,
}

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
    let new = || {
        Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )
    };
    let sock = match &origin.netns {
        Some(ns) => ns.run(new)??,
        None => new()?,
    };
    if let Some(src) = origin.transparent_src {
        match src {
            IpAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
            IpAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
        }
        sock.set_reuse_address(true)?;
        // Linux 4.2 and later; an older kernel reserves the port at bind.
        let _ = nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    if let Some(mark) = opts.mark {
        if let Err(e) = sock.set_mark(mark) {
            if !MARK_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot mark the daemon's sockets (needs CAP_NET_ADMIN)");
            }
        }
    }
    sock.set_tcp_nodelay(true)?;
    keepalive(&sock)?;
    let in_progress = match sock.connect(&addr.into()) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
        Err(e) => return Err(e),
    };
    let tcp = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    // A connection on the same host is usually established before `connect` returns: use it
    // at once rather than waiting a reactor turn to be told it is writable.
    if !in_progress || tcp.peer_addr().is_ok() {
        return Ok(tcp);
    }
    let established = async {
        tcp.writable().await?;
        if let Some(e) = tcp.take_error()? {
            return Err(e);
        }
        tcp.peer_addr().map(|_| ())
    };
    match tokio::time::timeout(opts.timeout, established).await {
        Ok(Ok(())) => Ok(tcp),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {:?}", opts.timeout),
        )),
    }
}

/// TCP keepalive, as Istio's ztunnel sets it: a peer gone without a word (its node lost, a
/// NAT entry expired) is found out after 180 s of silence and 9 probes 180 s apart, and its
/// connection ends, rather than holding its half of the proxy for ever. Applications' own
/// keepalives only ever reach the daemon on their node, which answers them.
pub const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(180))
    .with_interval(Duration::from_secs(180))
    .with_retries(9);

/// Sets [`KEEPALIVE`] on a TCP socket.
pub fn keepalive<'a>(sock: impl Into<socket2::SockRef<'a>>) -> io::Result<()> {
    sock.into().set_tcp_keepalive(&KEEPALIVE)
}

/// Binds a listener with `SO_REUSEADDR` and `SO_REUSEPORT`, so that a new daemon process can
/// bind beside the old one during a rolling restart.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    listen_in(None, addr)
}

/// Like [`listen`], inside `netns` when given (where an IPv6 listener is IPv6 only).
pub fn listen_in(netns: Option<&Netns>, addr: SocketAddr) -> io::Result<TcpListener> {
    let new = || match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let sock = match netns {
        Some(ns) => ns.run(new)??,
        None => new()?,
    };
    if netns.is_some() && addr.is_ipv6() {
        // In a pod's netns each family has its own listeners: IPv4 connections stay with the
        // IPv4 one beside it.
        SockRef::from(&sock).set_only_v6(true)?;
    } else if addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
        // Elsewhere `[::]` is both families, whatever the system's default.
        SockRef::from(&sock).set_only_v6(false)?;
    }
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    let listener = sock.listen(1024)?;
    if let Err(e) = steer_to_newest(&listener) {
        // The listener works without it; only a rolling update loses its steering.
        crate::warn_throttled!(%addr, error = %e, "cannot steer the listener's new connections to the newest daemon");
    }
    Ok(listener)
}

/// Sets the program that picks the socket of `listener`'s `SO_REUSEPORT` group for each new
/// connection: a one-instruction classic BPF program returning index 1. A group's sockets are
/// indexed in the order they joined, so while an old and a new daemon both listen, index 1 is
/// the new one's; alone, a socket has no index 1 and the kernel falls back to its usual
/// hashing, which picks it. The program belongs to the group, so it stays after the socket
/// that set it closes; every daemon sets the same one. Joining a group takes the same user:
/// in a pod, a process running as root without a user namespace can join its own pod's
/// groups (and, joining last, take that pod's new connections, as a process with
/// `CAP_NET_ADMIN` could by removing the pod's rules); no other pod's.
pub fn steer_to_newest(listener: &TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut code = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 1,
    }];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: `prog` and the `code` it points to outlive the call, which copies them.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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

/// Closes `tcp` with a reset, so the peer sees a refusal rather than a clean end.
pub fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{connect, listen, ConnectOptions};

    const OPTS: ConnectOptions = ConnectOptions {
        mark: None,
        timeout: Duration::from_secs(5),
    };

    #[tokio::test]
    async fn an_ipv6_listener_outside_a_pod_keeps_the_system_default() {
        // `[::]` in the daemon's own namespace (node mode, the CA) serves both families where
        // the system does: only in-pod listeners, beside their IPv4 twins, are IPv6 only.
        let l = super::listen("[::]:0".parse().unwrap()).unwrap();
        let system = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").unwrap();
        let only_v6 = socket2::SockRef::from(&l).only_v6().unwrap();
        assert_eq!(only_v6, system.trim() == "1");
    }

    #[tokio::test]
    async fn connect_returns_an_established_stream() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = connect(addr, OPTS).await.expect("connect");
        assert_eq!(c.peer_addr().unwrap(), addr);
        assert!(c.nodelay().unwrap());
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(s.peer_addr().unwrap(), c.local_addr().unwrap());
    }

    #[tokio::test]
    async fn connect_to_a_closed_port_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = connect(addr, OPTS).await.expect_err("nothing listens");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn connect_gives_up_after_the_timeout() {
        // A listener whose accept queue is full drops further SYNs: connects then hang.
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let opts = ConnectOptions {
            mark: None,
            timeout: Duration::from_millis(300),
        };
        let mut held = Vec::new();
        for _ in 0..8 {
            match connect(addr, opts).await {
                Ok(c) => held.push(c),
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e:?}");
                    return;
                }
            }
        }
        panic!("{} connections made to a full accept queue", held.len());
    }

    #[tokio::test]
    async fn a_new_listener_beside_an_old_one_takes_every_new_connection() {
        let old = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = old.local_addr().unwrap();
        // Alone, the old listener takes everything (the program's index 1 does not exist).
        let c = connect(addr, OPTS).await.unwrap();
        let (_, peer) = old.accept().await.unwrap();
        assert_eq!(peer, c.local_addr().unwrap());

        let new = listen(addr).unwrap();
        let mut clients = Vec::new();
        for _ in 0..32 {
            clients.push(connect(addr, OPTS).await.unwrap());
        }
        for c in &clients {
            let (_, peer) = tokio::time::timeout(Duration::from_secs(5), new.accept())
                .await
                .expect("queued on the new listener")
                .unwrap();
            assert_eq!(
                peer,
                c.local_addr().unwrap(),
                "in order, on the new listener"
            );
        }
        let queued_on_old = futures::poll!(std::pin::pin!(old.accept())).is_ready();
        assert!(!queued_on_old, "nothing queued on the old listener");

        // Once the old one is gone, the new one alone takes what comes.
        drop(old);
        let c = connect(addr, OPTS).await.unwrap();
        let (_, peer) = new.accept().await.unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
    }
}
