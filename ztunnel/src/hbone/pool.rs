//! The tunnel connection pool.
//!
//! Streams to the same [`PoolKey`] (source identity, destination identity, tunnel address)
//! share one TLS connection, up to `max_streams` at once (on HTTP/2 no more than the peer's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`); the next stream opens a second connection. Only one
//! connection is dialled per key at a time: concurrent first requests wait for that one
//! handshake rather than each opening their own. A connection whose driver
//! ended (peer closed, ping timeout, error) is removed at once, so the next stream dials anew;
//! a connection with no streams for `idle_timeout` is closed, and a spare one (see below) for
//! `spare_idle_timeout`. The connections that leave from
//! a pod's network namespace are closed when the pod leaves the mesh ([`Pool::evict_netns`]),
//! so that the pool does not keep the namespace open. A connection whose destination's chain
//! the revocation lists come to revoke ([`crate::identity::crl`]) gets no new stream and is
//! closed the same way.
//!
//! A stream goes to the oldest connection of its key with room, so after a burst the newer
//! connections empty first. A connection without streams is *spare* while an older open
//! connection of its key has room (it gets no stream until that one is full): it is closed
//! after the short `spare_idle_timeout` rather than the idle timeout, so that what a burst
//! opened (each connection holds TLS and HTTP/2 buffers) is given back once the burst is over,
//! while a key keeps one connection for its next stream. Whether a connection is spare is
//! decided again whenever one of its key's connections ends its last stream or gains room.
//!
//! Reservation and idle-closing both happen under the key's lock, so a connection is never
//! closed as idle while a stream is being placed on it.
//!
//! A connection is HTTP/2 over TLS, or QUIC ([`super::quic`]) when the tunnel address is one
//! of the configured QUIC destinations ([`QuicSettings`]). A QUIC dial that gets no answer
//! falls back to HTTP/2 (counted), and that address is dialled on HTTP/2 only for
//! [`QUIC_RETRY_AFTER`]; one the peer refuses (it drains, or is at its handshake cap) falls
//! back this time only; one that fails on its certificates is an error, as on HTTP/2
//! ([`quic::Fallback`]).
//! QUIC connections leave from one UDP endpoint per network namespace, closed with the
//! namespace's connections.
//!
//! A stream whose request gets no answer within twice the connect timeout
//! ([`Pool::answer_timeout`]) is given up ([`PoolError::NoAnswer`]) and its connection taken
//! out of the pool: a peer answers within its own connect timeout to the application (`503`
//! when that fails), so a silent one is wedged or hostile, and the client it would hold is
//! reset instead of waiting for ever.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use ipnet::IpNet;
use parking_lot::Mutex;
use quinn::VarInt;
use rustls::ClientConfig;
use serde::Serialize;

use super::client::{self, ClientError};
use super::early::Early;
use super::quic::{self, Fallback};
use super::{ConnectHeaders, TunnelStream};
use crate::identity::crl::{PeerChain, Usage};
use crate::identity::{Identity, WorkloadCert};
use crate::metrics::Metrics;
use crate::net::netns::Netns;
use crate::net::sockets::Sockets;
use crate::net::ConnectOptions;

#[path = "pool_error.rs"]
mod error;
pub use error::PoolError;

/// What makes two streams share a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    pub dst: Identity,
    pub addr: SocketAddr,
    /// The pod network namespace the connection leaves from (`None`: the daemon's own).
    /// Pods never share a connection, even under one identity: each pod's tunnels leave
    /// from its own address.
    pub netns: Option<Arc<Netns>>,
}

#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub max_streams: usize,
    pub idle_timeout: Duration,
    /// How long a spare connection (see the module's documentation) is kept without streams;
    /// at most `idle_timeout`. [`SPARE_IDLE_TIMEOUT`] in the daemon.
    pub spare_idle_timeout: Duration,
    pub connect: ConnectOptions,
    pub quic: QuicSettings,
    /// Where tunnel connections are dialled from ([`crate::net::sockets`]).
    pub sockets: Arc<dyn Sockets>,
}

/// Which tunnels are tried on QUIC first.
#[derive(Clone, Debug, Default)]
pub struct QuicSettings {
    /// Tunnel addresses (destination pods) dialled on QUIC first; empty: none.
    pub destinations: Vec<IpNet>,
}

impl QuicSettings {
    /// Whether tunnels to `addr` are tried on QUIC first.
    pub fn wants(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        self.destinations.iter().any(|n| n.contains(&ip))
    }
}

/// How long the daemon keeps a spare connection without streams: long enough that a burst
/// that comes back within seconds finds its connections open.
pub const SPARE_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an address that did not answer on QUIC is dialled on HTTP/2 only.
pub const QUIC_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long a connection taken out of the pool (idle, or its pod left) is given to finish
/// its open streams and close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// An open stream and the lease that keeps its connection's stream count.
pub struct Tunnel {
    pub stream: TunnelStream,
    pub lease: Lease,
}

impl Tunnel {
    /// The chain the destination presented on the tunnel's connection.
    pub fn peer(&self) -> &Arc<PeerChain> {
        &self.lease.conn.peer
    }
}

/// Holds one stream slot on a pooled connection; released on drop.
pub struct Lease {
    conn: Arc<Conn>,
    metrics: Arc<Metrics>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let key = self.conn.key_state.upgrade();
        let _guard = key.as_ref().map(|k| k.conns.lock());
        let before = self.conn.streams.fetch_sub(1, Ordering::AcqRel);
        if before == 1 {
            *self.conn.idle_since.lock() = Instant::now();
            self.conn.unused.notify_waiters();
        }
        if before == 1 || before >= self.conn.capacity() {
            // Another of the key's connections may have become spare.
            if let Some(k) = &key {
                k.changed.notify_waiters();
            }
        }
        self.metrics.pool_streams.dec();
    }
}

/// What a pooled connection is.
enum Link {
    H2(SendRequest<Bytes>),
    Quic(quinn::Connection),
}

impl Link {
    /// The transport's name, as the admin API shows it.
    fn transport(&self) -> &'static str {
        match self {
            Link::H2(_) => "h2",
            Link::Quic(_) => "quic",
        }
    }
}

struct Conn {
    id: u64,
    link: Link,
    streams: AtomicUsize,
    /// The pool's setting; see [`Conn::capacity`].
    max_streams: usize,
    idle_since: Mutex<Instant>,
    closed: AtomicBool,
    key_state: Weak<KeyState>,
    opened: Instant,
    /// Told when the connection is evicted (its pod left the mesh).
    evicted: Arc<tokio::sync::Notify>,
    /// Told when its last stream ends.
    unused: Arc<tokio::sync::Notify>,
    /// The chain the destination presented, judged again when the revocation lists change.
    peer: Arc<PeerChain>,
}

impl Conn {
    /// How many streams it carries at once: the pool's setting, and on HTTP/2 no more than
    /// the peer allows (its `SETTINGS_MAX_CONCURRENT_STREAMS`, assumed 100 until they arrive).
    /// A stream over the peer's limit would wait inside the HTTP/2 client, unanswered.
    fn capacity(&self) -> usize {
        match &self.link {
            Link::H2(send) => self.max_streams.min(send.current_max_send_streams()),
            Link::Quic(_) => self.max_streams,
        }
    }
}

#[derive(Default)]
struct KeyState {
    /// Oldest first.
    conns: Mutex<Vec<Arc<Conn>>>,
    dialing: tokio::sync::Mutex<()>,
    /// Dials that failed so far, and the last one's error.
    failed_dials: Mutex<(u64, Option<Arc<PoolError>>)>,
    /// Told when one of the connections ends its last stream or gains room.
    changed: tokio::sync::Notify,
}

impl KeyState {
    /// Takes a stream slot on an open connection with room, dialled after connection
    /// `newer_than`, whose destination the revocation lists still trust, if any.
    fn try_reserve(&self, newer_than: u64) -> Option<Arc<Conn>> {
        let conns = self.conns.lock();
        conns
            .iter()
            .find(|c| {
                c.id > newer_than
                    && !c.closed.load(Ordering::Acquire)
                    && c.streams.load(Ordering::Acquire) < c.capacity()
                    && c.peer.trusted()
            })
            .map(|c| {
                c.streams.fetch_add(1, Ordering::AcqRel);
                c.clone()
            })
    }

    fn remove(&self, id: u64) -> bool {
        let mut conns = self.conns.lock();
        let before = conns.len();
        conns.retain(|c| c.id != id);
        conns.len() != before
    }
}

/// A pooled connection as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct ConnInfo {
    pub id: u64,
    pub src: String,
    pub dst: String,
    pub addr: SocketAddr,
    /// `h2` or `quic`.
    pub transport: &'static str,
    pub streams: usize,
    pub age_secs: u64,
}

/// Whose QUIC client endpoint: the network namespace's id (`None`: the daemon's own) and
/// whether it is for IPv6.
type EndpointKey = (Option<(u64, u64)>, bool);

/// The pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Mutex<HashMap<PoolKey, Arc<KeyState>>>,
    tls: Mutex<HashMap<(String, Identity), Arc<ClientConfig>>>,
    settings: PoolSettings,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    /// The QUIC client endpoints of each network namespace, one per address family.
    quic_endpoints: Mutex<HashMap<EndpointKey, quinn::Endpoint>>,
    /// Addresses that did not answer on QUIC, and when.
    quic_unanswered: Mutex<HashMap<SocketAddr, Instant>>,
}

const TLS_CACHE_LIMIT: usize = 4096;

impl Pool {
    pub fn new(settings: PoolSettings, metrics: Arc<Metrics>) -> Self {
        Pool {
            inner: Arc::new(Inner {
                keys: Mutex::default(),
                tls: Mutex::default(),
                settings,
                metrics,
                next_id: AtomicU64::new(1),
                quic_endpoints: Mutex::default(),
                quic_unanswered: Mutex::default(),
            }),
        }
    }

    /// The socket factory tunnel connections are dialled with.
    pub fn sockets(&self) -> &Arc<dyn Sockets> {
        &self.inner.settings.sockets
    }

    /// Opens a stream to `target` (with `headers`) over `key`, on a pooled connection when one
    /// has room.
    /// `cert` is the source workload's current certificate (used only to dial). The client's
    /// `early` bytes (see [`super::early`]) go out right behind the request, those it writes
    /// while the answer is in flight too, all of them again on a retry; the stream then
    /// carries what follows.
    pub async fn open(
        &self,
        key: &PoolKey,
        cert: &Arc<WorkloadCert>,
        target: SocketAddr,
        headers: &ConnectHeaders,
        early: &mut Early<'_>,
    ) -> Result<Tunnel, PoolError> {
        let ks = self.key_state(key);
        let opened = self.open_on(key, &ks, cert, target, headers, early).await;
        if opened.is_err() {
            // A key whose dial failed has no connection to forget it when it ends.
            self.inner.forget_key_if_unused(key, ks);
        }
        opened
    }

    /// [`Pool::open`] on the key's state `ks`.
    async fn open_on(
        &self,
        key: &PoolKey,
        ks: &Arc<KeyState>,
        cert: &Arc<WorkloadCert>,
        target: SocketAddr,
        headers: &ConnectHeaders,
        early: &mut Early<'_>,
    ) -> Result<Tunnel, PoolError> {
        // A pooled connection may be going away (the peer drains, or died unnoticed); a
        // stream it refused was never processed, so it is retried once, on a connection dialled
        // after the refusal: the key's other pooled connections are likely going away too
        // (every connection to a draining peer gets its GOAWAY at once).
        let mut retried = false;
        let mut newer_than = 0;
        loop {
            let (conn, fresh) = match ks.try_reserve(newer_than) {
                Some(c) => (c, false),
                None => {
                    let failed_before = ks.failed_dials.lock().0;
                    let _dialing = ks.dialing.lock().await;
                    match ks.try_reserve(newer_than) {
                        Some(c) => (c, false),
                        None => {
                            // A dial this stream waited for has failed: so does the stream,
                            // rather than dial again behind the others.
                            let shared = {
                                let failed = ks.failed_dials.lock();
                                (failed.0 != failed_before).then(|| failed.1.clone())
                            };
                            if let Some(Some(e)) = shared {
                                return Err(PoolError::Dial(e));
                            }
                            match self.dial(key, ks, cert).await {
                                Ok(c) => (c, true),
                                Err(e) => {
                                    let e = Arc::new(e);
                                    let mut failed = ks.failed_dials.lock();
                                    *failed = (failed.0 + 1, Some(e.clone()));
                                    return Err(PoolError::Dial(e));
                                }
                            }
                        }
                    }
                }
            };
            self.inner.metrics.pool_streams.inc();
            let lease = Lease {
                conn: conn.clone(),
                metrics: self.inner.metrics.clone(),
            };
            let open = async {
                match &conn.link {
                    Link::H2(sender) => {
                        let req =
                            client::connect_request(target, headers).map_err(ClientError::from)?;
                        client::open_stream_with(sender.clone(), req, early)
                            .await
                            .map(|(send, recv)| TunnelStream::H2 {
                                send,
                                recv,
                                outflow: None,
                            })
                            .map_err(PoolError::from)
                    }
                    Link::Quic(c) => quic::open_stream(c, &quic::header(target, headers), early)
                        .await
                        .map(|(send, recv)| TunnelStream::Quic {
                            send,
                            recv,
                            window: None,
                        })
                        .map_err(PoolError::from),
                }
            };
            let within = self.answer_timeout();
            // On timeout the stream is dropped, which resets it.
            let opened = tokio::time::timeout(within, open)
                .await
                .unwrap_or(Err(PoolError::NoAnswer(within)));
            match opened {
                Ok(stream) => {
                    early.release();
                    return Ok(Tunnel { stream, lease });
                }
                Err(e) => {
                    if e.connection_failed() {
                        // The connection itself failed: no new stream may land on it.
                        conn.closed.store(true, Ordering::Release);
                        ks.remove(conn.id);
                    }
                    if !fresh && !retried && e.retryable() {
                        tracing::debug!(conn = conn.id, error = %e, "pooled connection refused the stream; retrying on a new one");
                        retried = true;
                        newer_than = self.inner.next_id.load(Ordering::Relaxed) - 1;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// How long a tunnel connection accepted from a peer may stay without streams before this
    /// daemon closes it: twice the idle timeout of its own pool, so that a peer's pool (with
    /// the same setting) closes its idle connections first and this catches only peers that
    /// keep them for ever.
    pub fn serve_idle_timeout(&self) -> Duration {
        self.inner.settings.idle_timeout * 2
    }

    /// How long a connection without streams is kept: (in use, spare).
    fn idle_timeouts(&self) -> (Duration, Duration) {
        let s = &self.inner.settings;
        (s.idle_timeout, s.spare_idle_timeout.min(s.idle_timeout))
    }

    /// How long a stream's request may wait for the peer's answer: twice the connect timeout,
    /// since the peer answers within its own connect timeout to the application.
    pub fn answer_timeout(&self) -> Duration {
        self.inner.settings.connect.timeout * 2
    }

    fn key_state(&self, key: &PoolKey) -> Arc<KeyState> {
        let mut keys = self.inner.keys.lock();
        if let Some(ks) = keys.get(key) {
            return ks.clone();
        }
        keys.entry(key.clone()).or_default().clone()
    }

    fn client_config(&self, cert: &WorkloadCert, dst: &Identity) -> Arc<ClientConfig> {
        let mut cache = self.inner.tls.lock();
        let k = (cert.serial.clone(), dst.clone());
        if let Some(c) = cache.get(&k) {
            return c.clone();
        }
        if cache.len() >= TLS_CACHE_LIMIT {
            cache.clear();
        }
        let c = cert.client_config(std::slice::from_ref(dst));
        cache.insert(k, c.clone());
        c
    }

    /// Whether a dial to `addr` tries QUIC first: a QUIC destination that has not recently
    /// failed to answer.
    fn tries_quic(&self, addr: SocketAddr) -> bool {
        if !self.inner.settings.quic.wants(addr) {
            return false;
        }
        let mut unanswered = self.inner.quic_unanswered.lock();
        let due = quic_due(unanswered.get(&addr).copied(), Instant::now());
        if due {
            unanswered.remove(&addr);
        }
        due
    }

    /// The QUIC client endpoint of `netns` for `addr`'s family, made on first use.
    fn quic_endpoint(
        &self,
        netns: Option<&Arc<Netns>>,
        addr: SocketAddr,
    ) -> std::io::Result<quinn::Endpoint> {
        let mut eps = self.inner.quic_endpoints.lock();
        let k = (netns.map(|n| n.id()), addr.is_ipv6());
        if let Some(ep) = eps.get(&k) {
            return Ok(ep.clone());
        }
        let any: SocketAddr = match addr {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let ep = quic::endpoint(
            netns.map(|n| &**n),
            any,
            self.inner.settings.connect.mark,
            None,
        )?;
        eps.insert(k, ep.clone());
        Ok(ep)
    }

    /// Dials a new connection for `key` (caller holds the key's dial lock) and reserves a
    /// stream on it: QUIC first when [`Self::tries_quic`], falling back to HTTP/2 when the
    /// peer does not answer on it.
    async fn dial(
        &self,
        key: &PoolKey,
        ks: &Arc<KeyState>,
        cert: &WorkloadCert,
    ) -> Result<Arc<Conn>, PoolError> {
        let tls = self.client_config(cert, &key.dst);
        if self.tries_quic(key.addr) {
            let ep = self
                .quic_endpoint(key.netns.as_ref(), key.addr)
                .map_err(PoolError::Endpoint)?;
            let peer = self.inner.settings.sockets.quic_peer(key.addr);
            match quic::connect(&ep, peer, quic::client_config(&tls)?).await {
                Ok(qc) => {
                    let ends = qc.clone();
                    let peer =
                        Arc::new(cert.peer_chain(&quic::peer_certificates(&qc), Usage::Server));
                    return Ok(
                        self.add(key, ks, Link::Quic(qc), peer, move |id| async move {
                            let e = ends.closed().await;
                            tracing::debug!(id, error = %e, "QUIC tunnel connection ended");
                        }),
                    );
                }
                Err(e) => match e.fallback() {
                    Fallback::No => return Err(e.into()),
                    Fallback::ThisDial => {
                        crate::warn_throttled!(addr = %key.addr, error = %e, "QUIC refused; tunnelling on HTTP/2 this time");
                        self.inner.metrics.quic_fallbacks.inc();
                    }
                    Fallback::Remember => {
                        crate::warn_throttled!(addr = %key.addr, error = %e, "no answer on QUIC; tunnelling on HTTP/2");
                        self.inner.metrics.quic_fallbacks.inc();
                        let mut unanswered = self.inner.quic_unanswered.lock();
                        // Bounded by the destinations that went silent within the period.
                        unanswered.retain(|_, at| at.elapsed() < QUIC_RETRY_AFTER);
                        unanswered.insert(key.addr, Instant::now());
                    }
                },
            }
        }
        let origin = crate::net::Origin {
            netns: key.netns.clone(),
            transparent_src: None,
        };
        let settings = &self.inner.settings;
        let tcp = settings
            .sockets
            .connect(key.addr, settings.connect, &origin)
            .await
            .map_err(|source| ClientError::Connect {
                addr: key.addr,
                source,
            })?;
        let (sender, mut connection, chain) =
            client::handshake(tcp, key.addr, tls, settings.connect.timeout).await?;
        let ping = connection.ping_pong();
        let peer = Arc::new(cert.peer_chain(&chain, Usage::Server));
        Ok(
            self.add(key, ks, Link::H2(sender), peer, move |id| async move {
                tokio::select! {
                    r = connection => {
                        if let Err(e) = r {
                            tracing::debug!(id, error = %e, "tunnel connection ended");
                        }
                    }
                    r = client::keepalive(ping) => {
                        if let Err(why) = r {
                            tracing::warn!(id, why, "tunnel connection closed");
                        }
                    }
                }
            }),
        )
    }

    /// Puts a new connection for `key` in the pool, with one stream reserved, and counts it.
    /// Its `driver` (given its id; it resolves once the connection has ended) runs in a task
    /// that takes the connection out of the pool when it ends, idles out ([`watch_idle`]), is
    /// evicted, or once the revocation lists revoke the destination's `peer` chain. The
    /// streams still open may then finish, and the connection close (a QUIC one is told why;
    /// HTTP/2 sends its GOAWAY once nothing holds it), within [`CLOSE_GRACE`]; what is left
    /// after that is dropped.
    fn add<F>(
        &self,
        key: &PoolKey,
        ks: &Arc<KeyState>,
        link: Link,
        peer: Arc<PeerChain>,
        driver: impl FnOnce(u64) -> F,
    ) -> Arc<Conn>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let transport = link.transport();
        let quic = match &link {
            Link::Quic(qc) => Some(qc.clone()),
            Link::H2(_) => None,
        };
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            link,
            streams: AtomicUsize::new(1),
            max_streams: self.inner.settings.max_streams,
            idle_since: Mutex::new(Instant::now()),
            closed: AtomicBool::new(false),
            key_state: Arc::downgrade(ks),
            opened: Instant::now(),
            evicted: Arc::default(),
            unused: Arc::default(),
            peer,
        });
        ks.conns.lock().push(conn.clone());
        let metrics = &self.inner.metrics;
        metrics.pool_connections_opened.inc();
        metrics.pool_connections.inc();
        tracing::debug!(id = conn.id, src = %key.src, dst = %key.dst, addr = %key.addr, transport, "tunnel connection opened");
        let driver = driver(conn.id);
        let ks = ks.clone();
        let pool = Arc::downgrade(&self.inner);
        let key = key.clone();
        let metrics = self.inner.metrics.clone();
        let (id, evicted, weak) = (conn.id, conn.evicted.clone(), Arc::downgrade(&conn));
        let idle = watch_idle(weak.clone(), ks.clone(), self.idle_timeouts());
        let peer = conn.peer.clone();
        tokio::spawn(async move {
            tokio::pin!(driver);
            let why = tokio::select! {
                () = &mut driver => None,
                () = idle => Some("idle"),
                () = evicted.notified() => Some("evicted"),
                () = peer.until_revoked() => {
                    if let Some(c) = weak.upgrade() {
                        c.closed.store(true, Ordering::Release);
                    }
                    ks.remove(id);
                    tracing::warn!(id, "tunnel connection closed: a revocation list revokes the destination's certificate");
                    Some("revoked")
                }
            };
            if let Some(why) = why {
                tracing::debug!(id, why, "tunnel connection closing");
                let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
                let ended = tokio::select! {
                    () = &mut driver => true,
                    _ = tokio::time::timeout_at(deadline, until_unused(&weak)) => false,
                };
                if !ended {
                    if let Some(qc) = quic {
                        qc.close(VarInt::from_u32(0), why.as_bytes());
                    }
                    let _ = tokio::time::timeout_at(deadline, driver).await;
                }
            }
            ks.remove(id);
            metrics.pool_connections.dec();
            if let Some(pool) = pool.upgrade() {
                pool.forget_key_if_unused(&key, ks);
            }
        });
        conn
    }

    /// Closes the connections that leave from `netns` (a pod leaving the mesh): no new stream
    /// lands on them, and each ends once its last stream has (within the pool's 5 s close
    /// grace). Returns how many.
    pub fn evict_netns(&self, netns: &Netns) -> usize {
        let mut keys = self.inner.keys.lock();
        // The keys of the namespace that nobody uses and that hold no connection go now (they
        // hold the namespace open); the others once their connections have ended.
        keys.retain(|k, ks| {
            k.netns.as_deref() != Some(netns)
                || Arc::strong_count(ks) > 1
                || !ks.conns.lock().is_empty()
        });
        let mut evicted = 0;
        for (_, ks) in keys
            .iter()
            .filter(|(k, _)| k.netns.as_deref() == Some(netns))
        {
            let mut conns = ks.conns.lock();
            for c in conns.drain(..) {
                c.closed.store(true, Ordering::Release);
                c.evicted.notify_one();
                evicted += 1;
            }
        }
        drop(keys);
        // The endpoint's socket closes once its last connection has.
        self.inner
            .quic_endpoints
            .lock()
            .retain(|(ns, _), _| *ns != Some(netns.id()));
        evicted
    }

    /// How many keys the pool holds state for.
    #[cfg(test)]
    pub(crate) fn keys_held(&self) -> usize {
        self.inner.keys.lock().len()
    }

    /// The open connections, for the admin API and tests.
    pub fn connections(&self) -> Vec<ConnInfo> {
        let keys = self.inner.keys.lock();
        let mut out = Vec::new();
        for (key, ks) in keys.iter() {
            for c in ks.conns.lock().iter() {
                out.push(ConnInfo {
                    id: c.id,
                    src: key.src.to_string(),
                    dst: key.dst.to_string(),
                    addr: key.addr,
                    transport: c.link.transport(),
                    streams: c.streams.load(Ordering::Relaxed),
                    age_secs: c.opened.elapsed().as_secs(),
                });
            }
        }
        out
    }
}

impl Inner {
    /// Drops a key's entry once it has no connection and nobody else holds it (a stream
    /// being placed holds it, so an entry is never dropped under a dial in progress).
    fn forget_key_if_unused(&self, key: &PoolKey, ks: Arc<KeyState>) {
        let mut keys = self.keys.lock();
        let empty = ks.conns.lock().is_empty();
        // Held here (ks) and by the map: nobody else is using it.
        if empty && Arc::strong_count(&ks) == 2 {
            keys.remove(key);
        }
    }
}

/// Resolves once the connection has had no stream for its timeout (`timeouts`: the first
/// for a connection in use, the second for a spare one), after marking it closed and removing
/// it from its key (both under the key's lock, so no stream lands on it meanwhile). It sleeps
/// while streams are open until the last one ends (`unused`), and while there are none until
/// its timeout or until another connection of its key changes (`changed`); it never polls.
async fn watch_idle(conn: Weak<Conn>, ks: Arc<KeyState>, timeouts: (Duration, Duration)) {
    loop {
        let Some(c) = conn.upgrade() else { return };
        let unused = c.unused.clone();
        // Both taken before the check, so that a change after it is not missed.
        let last_stream_ended = unused.notified();
        let key_changed = ks.changed.notified();
        let idle_until = {
            let mut conns = ks.conns.lock();
            if c.streams.load(Ordering::Acquire) > 0 {
                None
            } else {
                let since = *c.idle_since.lock();
                let spare = is_spare(&conns, &c);
                let timeout = if spare { timeouts.1 } else { timeouts.0 };
                if since.elapsed() >= timeout {
                    c.closed.store(true, Ordering::Release);
                    conns.retain(|x| x.id != c.id);
                    tracing::debug!(id = c.id, spare, "idle tunnel connection closed");
                    return;
                }
                Some(since + timeout)
            }
        };
        drop(c);
        match idle_until {
            None => last_stream_ended.await,
            Some(at) => tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = key_changed => {}
            },
        }
    }
}

/// Resolves once `conn` has no stream open, or is gone.
async fn until_unused(conn: &Weak<Conn>) {
    loop {
        let Some(c) = conn.upgrade() else { return };
        let unused = c.unused.clone();
        let ended = unused.notified();
        if c.streams.load(Ordering::Acquire) == 0 {
            return;
        }
        drop(c);
        ended.await;
    }
}

/// Whether `c` is spare: an older open connection of its key (`conns`) has room, and so takes
/// every new stream before `c` would.
fn is_spare(conns: &[Arc<Conn>], c: &Conn) -> bool {
    conns.iter().any(|o| {
        o.id < c.id
            && !o.closed.load(Ordering::Acquire)
            && o.streams.load(Ordering::Acquire) < o.capacity()
    })
}

/// Whether a QUIC destination is dialled on QUIC at `now`, given when (if ever) it last went
/// unanswered: not within [`QUIC_RETRY_AFTER`] of that.
fn quic_due(unanswered_at: Option<Instant>, now: Instant) -> bool {
    unanswered_at.is_none_or(|at| now.saturating_duration_since(at) >= QUIC_RETRY_AFTER)
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
