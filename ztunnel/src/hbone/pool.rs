//! The tunnel connection pool.
//!
//! Streams to the same [`PoolKey`] (source identity, destination identity, tunnel address)
//! share one TLS connection, up to `max_streams` at once; the next stream opens a second
//! connection. Only one connection is dialled per key at a time: concurrent first requests
//! wait for that one handshake rather than each opening their own. A connection whose driver
//! ended (peer closed, ping timeout, error) is removed at once, so the next stream dials anew;
//! a connection with no streams for `idle_timeout` is closed. The connections that leave from
//! a pod's network namespace are closed when the pod leaves the mesh ([`Pool::evict_netns`]),
//! so that the pool does not keep the namespace open.
//!
//! Reservation and idle-closing both happen under the key's lock, so a connection is never
//! closed as idle while a stream is being placed on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::Request;
use rustls::ClientConfig;
use serde::Serialize;

use super::client::{self, ClientError};
use crate::capture::netns::Netns;
use crate::identity::{Identity, WorkloadCert};
use crate::metrics::Metrics;
use crate::net::ConnectOptions;

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

#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub max_streams: usize,
    pub idle_timeout: Duration,
    pub connect: ConnectOptions,
}

/// An open stream and the lease that keeps its connection's stream count.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub lease: Lease,
}

/// Holds one stream slot on a pooled connection; released on drop.
pub struct Lease {
    conn: Arc<Conn>,
    metrics: Arc<Metrics>,
}

impl Lease {
    /// The id of the connection the stream runs on.
    pub fn connection_id(&self) -> u64 {
        self.conn.id
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let key = self.conn.key_state.upgrade();
        let _guard = key
            .as_ref()
            .map(|k| k.conns.lock().unwrap_or_else(|e| e.into_inner()));
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        self.metrics.pool_streams.dec();
    }
}

struct Conn {
    id: u64,
    sender: SendRequest<Bytes>,
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
    closed: AtomicBool,
    key_state: Weak<KeyState>,
    opened: Instant,
    /// Told when the connection is evicted (its pod left the mesh).
    evicted: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct KeyState {
    conns: Mutex<Vec<Arc<Conn>>>,
    dialing: tokio::sync::Mutex<()>,
}

impl KeyState {
    /// Takes a stream slot on an open connection with room, if any.
    fn try_reserve(&self, max: usize) -> Option<Arc<Conn>> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .iter()
            .find(|c| !c.closed.load(Ordering::Acquire) && c.streams.load(Ordering::Acquire) < max)
            .map(|c| {
                c.streams.fetch_add(1, Ordering::AcqRel);
                c.clone()
            })
    }

    fn remove(&self, id: u64) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let before = conns.len();
        conns.retain(|c| c.id != id);
        conns.len() != before
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl PoolError {
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            PoolError::Client(c) => c.status(),
        }
    }
}

/// A pooled connection as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct ConnInfo {
    pub id: u64,
    pub src: String,
    pub dst: String,
    pub addr: SocketAddr,
    pub streams: usize,
    pub age_secs: u64,
}

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
            }),
        }
    }

    /// Opens a stream for `req` to `key`, on a pooled connection when one has room.
    /// `cert` is the source workload's current certificate (used only to dial). `first`, the
    /// bytes the client already sent (see [`super::copy::read_early`]), goes out right behind
    /// the request (again on a retry); the stream then carries what follows.
    pub async fn open(
        &self,
        key: &PoolKey,
        cert: &Arc<WorkloadCert>,
        req: Request<()>,
        first: Option<Bytes>,
    ) -> Result<Tunnel, PoolError> {
        let ks = self.key_state(key);
        let max = self.inner.settings.max_streams;
        // A pooled connection may be going away (the peer drains, or died unnoticed); a
        // stream it refused was never processed, so it is retried once on a fresh one.
        let mut retried = false;
        loop {
            let (conn, fresh) = match ks.try_reserve(max) {
                Some(c) => (c, false),
                None => {
                    let _dialing = ks.dialing.lock().await;
                    match ks.try_reserve(max) {
                        Some(c) => (c, false),
                        None => (self.dial(key, &ks, cert).await?, true),
                    }
                }
            };
            self.inner.metrics.pool_streams.inc();
            let lease = Lease {
                conn: conn.clone(),
                metrics: self.inner.metrics.clone(),
            };
            let opened =
                client::open_stream_with(conn.sender.clone(), copy_request(&req), first.as_ref());
            match opened.await {
                Ok((send, recv)) => return Ok(Tunnel { send, recv, lease }),
                Err(e) => {
                    if !matches!(e, ClientError::Status(_)) {
                        // The connection itself failed: no new stream may land on it.
                        conn.closed.store(true, Ordering::Release);
                        ks.remove(conn.id);
                    }
                    if !fresh && !retried && e.retryable() {
                        tracing::debug!(conn = conn.id, error = %e, "pooled connection refused the stream; retrying on a new one");
                        retried = true;
                        continue;
                    }
                    return Err(e.into());
                }
            }
        }
    }

    fn key_state(&self, key: &PoolKey) -> Arc<KeyState> {
        let mut keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ks) = keys.get(key) {
            return ks.clone();
        }
        keys.entry(key.clone()).or_default().clone()
    }

    fn client_config(&self, cert: &WorkloadCert, dst: &Identity) -> Arc<ClientConfig> {
        let mut cache = self.inner.tls.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Dials a new connection for `key` (caller holds the key's dial lock) and reserves a
    /// stream on it.
    async fn dial(
        &self,
        key: &PoolKey,
        ks: &Arc<KeyState>,
        cert: &WorkloadCert,
    ) -> Result<Arc<Conn>, ClientError> {
        let tls = self.client_config(cert, &key.dst);
        let origin = crate::net::Origin {
            netns: key.netns.clone(),
            transparent_src: None,
        };
        let (sender, mut connection) =
            client::connect_from(key.addr, tls, self.inner.settings.connect, &origin).await?;
        let ping = connection.ping_pong();
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            sender,
            streams: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            closed: AtomicBool::new(false),
            key_state: Arc::downgrade(ks),
            opened: Instant::now(),
            evicted: Arc::default(),
        });
        ks.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn.clone());
        let metrics = &self.inner.metrics;
        metrics.pool_connections_opened.inc();
        metrics.pool_connections.inc();
        tracing::debug!(id = conn.id, src = %key.src, dst = %key.dst, addr = %key.addr, "tunnel connection opened");

        let weak = Arc::downgrade(&conn);
        let ks = ks.clone();
        let pool = Arc::downgrade(&self.inner);
        let key = key.clone();
        let metrics = metrics.clone();
        let idle_timeout = self.inner.settings.idle_timeout;
        let id = conn.id;
        let evicted = conn.evicted.clone();
        tokio::spawn(async move {
            let idle = watch_idle(weak, ks.clone(), idle_timeout);
            let keepalive = async {
                match ping {
                    Some(p) => client::keepalive(p).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut connection => {
                    if let Err(e) = r {
                        tracing::debug!(id, error = %e, "tunnel connection ended");
                    }
                }
                r = keepalive => {
                    if let Err(why) = r {
                        tracing::warn!(id, why, "tunnel connection closed");
                    }
                }
                _ = idle => {
                    // Removed from the pool; let h2 finish with a GOAWAY once unused.
                    let _ = tokio::time::timeout(Duration::from_secs(5), &mut connection).await;
                }
                _ = evicted.notified() => {
                    tracing::debug!(id, "tunnel connection evicted");
                    let _ = tokio::time::timeout(Duration::from_secs(5), &mut connection).await;
                }
            }
            ks.remove(id);
            metrics.pool_connections.dec();
            if let Some(pool) = pool.upgrade() {
                pool.forget_key_if_unused(&key, ks);
            }
        });
        Ok(conn)
    }

    /// Closes the connections that leave from `netns` (a pod leaving the mesh): no new stream
    /// lands on them, and each ends once its last stream has (within 5 s). Returns how many.
    pub fn evict_netns(&self, netns: &Netns) -> usize {
        let keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = 0;
        for (_, ks) in keys
            .iter()
            .filter(|(k, _)| k.netns.as_deref() == Some(netns))
        {
            let mut conns = ks.conns.lock().unwrap_or_else(|e| e.into_inner());
            for c in conns.drain(..) {
                c.closed.store(true, Ordering::Release);
                c.evicted.notify_one();
                evicted += 1;
            }
        }
        evicted
    }

    /// The open connections, for the admin API and tests.
    pub fn connections(&self) -> Vec<ConnInfo> {
        let keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (key, ks) in keys.iter() {
            for c in ks.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                out.push(ConnInfo {
                    id: c.id,
                    src: key.src.to_string(),
                    dst: key.dst.to_string(),
                    addr: key.addr,
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
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let empty = ks
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        // Held here (ks) and by the map: nobody else is using it.
        if empty && Arc::strong_count(&ks) == 2 {
            keys.remove(key);
        }
    }
}

/// Resolves once the connection has had no stream for `timeout`, after marking it closed and
/// removing it from its key (both under the key's lock, so no stream lands on it meanwhile).
async fn watch_idle(conn: Weak<Conn>, ks: Arc<KeyState>, timeout: Duration) {
    let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::time::sleep(tick).await;
        let Some(c) = conn.upgrade() else { return };
        let mut conns = ks.conns.lock().unwrap_or_else(|e| e.into_inner());
        let idle_for = c
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if c.streams.load(Ordering::Acquire) == 0 && idle_for >= timeout {
            c.closed.store(true, Ordering::Release);
            conns.retain(|x| x.id != c.id);
            tracing::debug!(id = c.id, "idle tunnel connection closed");
            return;
        }
    }
}

/// A copy of a bodiless request (`http::Request` is not `Clone`).
fn copy_request(req: &Request<()>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}
