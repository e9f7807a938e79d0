//! The tunnel pool against the daemon's real inbound proxy on loopback, in-process and
//! without root: mutual TLS and HTTP/2 (or QUIC, where a test says so) as in the daemon,
//! dialling from the process's own namespace. What the pool promises: streams share a
//! connection up to its limit and the next one dials another, an ended stream frees its
//! place, an unused connection is closed after the idle timeout and a spare one (an older
//! connection has room) sooner, whichever order a burst's streams end in, many opens at once
//! are all served on as few connections as the limit allows, a stream opened as the
//! destination drains (HTTP/2: a GOAWAY or the stream refused; QUIC: the stream refused
//! unprocessed, while a held stream keeps the connection open) goes to a newly dialled
//! connection, and an evicted connection (its pod left the mesh) takes no new stream but
//! carries its open one to its end. And what the inbound proxy promises a peer's pool, on
//! both transports: a connection over the peer's cap is closed before it carries a stream
//! (not counted as accepted), a stream over it is answered `429`, and an ended stream's
//! place comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::peers::PeerLimits;
use super::{ProxyInputs, TunnelLimits};
use crate::ca::{issue, LocalCa};
use crate::discovery::Discovery;
use crate::hbone::budget::{self, BufferBudget};
use crate::hbone::copy::ByteCounters;
use crate::hbone::copy_tunnel;
use crate::hbone::early::Early;
use crate::hbone::pool::{
    Pool, PoolError, PoolKey, PoolSettings, QuicSettings, Tunnel, SPARE_IDLE_TIMEOUT,
};
use crate::identity::{CertManager, Identity, WorkloadCert};
use crate::metrics::{Metrics, ReasonLabels};
use crate::net::sockets::Kernel;
use crate::net::ConnectOptions;

pub(super) const SERVER_IP: &str = "127.0.0.2";
pub(super) const DAY: Duration = Duration::from_secs(86400);

pub(super) fn mesh() -> String {
    format!(
        "trustDomain: cluster.local
namespaces:
  - {{name: t, labels: {{ztunnel.dev/dataplane-mode: ambient}}}}
workloads:
  - {{uid: c, name: client, namespace: t, serviceAccount: client, node: n, ips: [127.0.0.1], protocol: HBONE}}
  - {{uid: s, name: server, namespace: t, serviceAccount: server, node: n, ips: [{SERVER_IP}], protocol: HBONE}}
"
    )
}

/// A client pool, the inbound proxy it dials and an echo application behind it.
struct Bed {
    pool: Pool,
    /// The client pool's own metrics.
    metrics: Arc<Metrics>,
    key: PoolKey,
    cert: Arc<WorkloadCert>,
    app: SocketAddr,
    ca: Arc<LocalCa>,
    /// Each inbound proxy's drain switch, oldest first.
    servers: Vec<tokio::sync::watch::Sender<bool>>,
    /// The first inbound proxy's metrics.
    server_metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

pub(super) const CONNECT: ConnectOptions = ConnectOptions {
    mark: None,
    timeout: Duration::from_secs(5),
};

/// Serves the daemon's inbound proxy, with `limits` and certificates from `signer`, on
/// `listener`, and on QUIC at its address too when `quic`; returns its drain switch and its
/// inputs.
pub(super) fn inbound(
    signer: Arc<dyn crate::identity::CertSigner>,
    listener: TcpListener,
    quic: bool,
    limits: TunnelLimits,
) -> (tokio::sync::watch::Sender<bool>, Arc<ProxyInputs>) {
    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    let settings = PoolSettings {
        max_streams: 100,
        idle_timeout: Duration::from_secs(300),
        spare_idle_timeout: SPARE_IDLE_TIMEOUT,
        connect: CONNECT,
        quic: QuicSettings::default(),
        sockets: Kernel::shared(),
    };
    let pi = ProxyInputs::new(
        "n".into(),
        "cluster.local".into(),
        "Kubernetes",
        "cluster.local",
        Discovery::fixed(crate::discovery::parse(&mesh(), "cluster.local").unwrap()),
        CertManager::new(signer, DAY, Default::default()),
        Pool::new(settings, metrics.clone()),
        metrics,
        CONNECT,
        crate::hbone::consts::DEFAULT_MAX_STREAMS,
        limits,
        false,
        draining,
    );
    if quic {
        let ep = super::quic_endpoint(None, listener.local_addr().unwrap()).unwrap();
        tokio::spawn(super::serve_inbound_quic(pi.clone(), ep));
    }
    tokio::spawn(super::serve_inbound(pi.clone(), listener));
    (draining_tx, pi)
}

impl Bed {
    /// A bed whose pool keeps `max_streams` per connection and an unused connection for
    /// `idle_timeout`, a spare one for [`SPARE_IDLE_TIMEOUT`].
    async fn start(max_streams: usize, idle_timeout: Duration) -> Bed {
        Bed::with(max_streams, idle_timeout, SPARE_IDLE_TIMEOUT, false).await
    }

    /// The bed, its pool dialling QUIC first when `quic`.
    async fn with(
        max_streams: usize,
        idle_timeout: Duration,
        spare_idle_timeout: Duration,
        quic: bool,
    ) -> Bed {
        let limits = TunnelLimits::default();
        Bed::build(max_streams, idle_timeout, spare_idle_timeout, quic, limits).await
    }

    /// The bed, its inbound proxy holding tunnel peers to `limits`.
    async fn build(
        max_streams: usize,
        idle_timeout: Duration,
        spare_idle_timeout: Duration,
        quic: bool,
        limits: TunnelLimits,
    ) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path(), "cluster.local").unwrap());
        let client: Identity = "spiffe://cluster.local/ns/t/sa/client".parse().unwrap();
        let server: Identity = "spiffe://cluster.local/ns/t/sa/server".parse().unwrap();
        let cert = Arc::new(issue(&ca, &client, DAY).unwrap());
        let app_l = TcpListener::bind((SERVER_IP, 0)).await.unwrap();
        let app = app_l.local_addr().unwrap();
        tokio::spawn(echo(app_l));
        let tunnel_l = crate::net::listen(SocketAddr::new(SERVER_IP.parse().unwrap(), 0)).unwrap();
        let tunnel = tunnel_l.local_addr().unwrap();
        let (drain, inbound_pi) = inbound(ca.clone(), tunnel_l, quic, limits);
        let server_metrics = inbound_pi.metrics.clone();
        let settings = PoolSettings {
            max_streams,
            idle_timeout,
            spare_idle_timeout,
            connect: CONNECT,
            quic: QuicSettings {
                destinations: [tunnel.ip().into()].into_iter().filter(|_| quic).collect(),
            },
            sockets: Kernel::shared(),
        };
        let metrics = Arc::new(Metrics::default());
        Bed {
            pool: Pool::new(settings, metrics.clone()),
            metrics,
            key: PoolKey {
                src: client,
                dst: server,
                addr: tunnel,
                netns: None,
            },
            cert,
            app,
            ca,
            servers: vec![drain],
            server_metrics,
            _dir: dir,
        }
    }

    /// A stream to the application, answered `200` by the inbound proxy.
    async fn open(&self) -> Tunnel {
        self.try_open().await.expect("a tunnel to the application")
    }

    /// A stream to the application, or why the pool could not open one.
    async fn try_open(&self) -> Result<Tunnel, PoolError> {
        let headers = Default::default();
        let early = &mut Early::default();
        self.pool
            .open(&self.key, &self.cert, self.app, &headers, early)
            .await
    }

    /// A bed on `quic` or HTTP/2 whose pool keeps `max_streams` per connection, its inbound
    /// proxy holding tunnel peers to `peers`.
    async fn with_peer_limits(max_streams: usize, quic: bool, peers: PeerLimits) -> Bed {
        let limits = TunnelLimits {
            peers,
            ..Default::default()
        };
        let idle = Duration::from_secs(300);
        Bed::build(max_streams, idle, SPARE_IDLE_TIMEOUT, quic, limits).await
    }

    /// Starts another inbound proxy on the same port, which takes the new connections from
    /// then on (as a daemon replacing another does, see [`crate::net::listen`]).
    fn add_server(&mut self) {
        let l = crate::net::listen(self.key.addr).unwrap();
        let limits = TunnelLimits::default();
        self.servers
            .push(inbound(self.ca.clone(), l, false, limits).0);
    }

    fn dialled(&self) -> u64 {
        self.metrics.pool_connections_opened.get()
    }

    /// Waits (up to 10 s) until the pool holds `n` connections.
    async fn until_connections(&self, n: i64) {
        self.until_connections_within(n, Duration::from_secs(10))
            .await
    }

    async fn until_connections_within(&self, n: i64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.metrics.pool_connections.get() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pool holds {} connections, not {n}",
                self.metrics.pool_connections.get()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn echo(l: TcpListener) {
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_share_a_connection_up_to_its_limit_and_the_next_dials_another() {
    let bed = Bed::start(2, Duration::from_secs(300)).await;
    let a = bed.open().await;
    let b = bed.open().await;
    assert_eq!(
        bed.dialled(),
        1,
        "the second stream shares the first's connection"
    );
    let c = bed.open().await;
    assert_eq!(bed.dialled(), 2, "the third is past the limit of two");
    assert_eq!(bed.metrics.pool_streams.get(), 3);
    drop((a, b, c));
    assert_eq!(
        bed.metrics.pool_streams.get(),
        0,
        "a dropped lease frees its place"
    );
    bed.until_connections(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_dial_failed_is_forgotten() {
    let mut bed = Bed::start(100, Duration::from_secs(300)).await;
    let closed = std::net::TcpListener::bind((SERVER_IP, 0)).unwrap();
    bed.key.addr = closed.local_addr().unwrap();
    drop(closed);
    assert!(bed.try_open().await.is_err(), "nothing listens there");
    // It held the key's namespace handle, for a pod that may have left since.
    assert_eq!(bed.pool.keys_held(), 0);
}

/// Streams that waited for a dial that failed fail with it: the peer is dialled once, not
/// once per waiting stream in turn (a peer dropping packets would hold each for its own
/// connect timeout behind the others).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_waiting_on_a_failed_dial_fail_with_it() {
    let mut bed = Bed::start(100, Duration::from_secs(300)).await;
    let l = TcpListener::bind((SERVER_IP, 0)).await.unwrap();
    bed.key.addr = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    // Closes every connection after a while: every TLS handshake fails, and the first dial
    // is still under way when the other streams ask for one.
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(tcp);
            });
        }
    });
    let (a, b, c) = tokio::join!(bed.try_open(), bed.try_open(), bed.try_open());
    for r in [a, b, c] {
        assert!(
            r.is_err(),
            "a tunnel to a peer that closes every connection"
        );
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(bed.try_open().await.is_err());
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "dialled again"
    );
}

#[tokio::test]
async fn an_ended_stream_frees_its_place_for_the_next() {
    let bed = Bed::start(1, Duration::from_secs(300)).await;
    for _ in 0..3 {
        drop(bed.open().await);
    }
    assert_eq!(
        bed.dialled(),
        1,
        "each stream took the place the last one left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_connection_is_closed_after_the_idle_timeout_and_dialled_again() {
    let bed = Bed::start(100, Duration::from_millis(100)).await;
    let held = bed.open().await;
    bed.until_connections(1).await;
    drop(held);
    bed.until_connections(0).await;
    let _again = bed.open().await;
    assert_eq!(bed.dialled(), 2, "a new stream dials a new connection");
}

/// A burst of three connections' worth of streams, ended in `order` (by connection, oldest
/// first = 0): once all have ended, the two spare connections are closed and the oldest stays.
async fn after_a_burst_one_connection_stays(order: [usize; 3]) {
    let bed = Bed::with(
        2,
        Duration::from_secs(300),
        Duration::from_millis(200),
        false,
    )
    .await;
    let mut by_conn: Vec<Option<Vec<Tunnel>>> = Vec::new();
    for _ in 0..3 {
        by_conn.push(Some(vec![bed.open().await, bed.open().await]));
    }
    assert_eq!(bed.dialled(), 3);
    let oldest = bed.pool.connections().iter().map(|c| c.id).min().unwrap();
    for i in order {
        // One stream, then the other: the connection first gains room, then empties. The
        // pauses let the pool look at its connections before the next change.
        let mut streams = by_conn[i].take().unwrap();
        drop(streams.pop());
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(streams);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    bed.until_connections(1).await;
    let left = bed.pool.connections();
    assert_eq!(left[0].id, oldest, "the oldest connection is the one kept");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        bed.metrics.pool_connections.get(),
        1,
        "the kept connection waits for the idle timeout"
    );
    drop(bed.open().await);
    assert_eq!(
        bed.dialled(),
        3,
        "the next stream goes to the kept connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_the_spare_connections_close_when_the_newest_empty_first() {
    after_a_burst_one_connection_stays([2, 1, 0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_the_spare_connections_close_when_the_oldest_empty_first() {
    after_a_burst_one_connection_stays([0, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_the_spare_connections_close_in_any_order() {
    after_a_burst_one_connection_stays([1, 2, 0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_connection_becomes_spare_when_an_older_one_gains_room() {
    let bed = Bed::with(
        2,
        Duration::from_secs(300),
        Duration::from_millis(200),
        false,
    )
    .await;
    let (a, b) = (bed.open().await, bed.open().await);
    let (c, d) = (bed.open().await, bed.open().await);
    assert_eq!(bed.dialled(), 2);
    drop((c, d));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        bed.metrics.pool_connections.get(),
        2,
        "kept while the older connection is full"
    );
    drop(a);
    bed.until_connections(1).await;
    drop(b);
}

/// `n` streams opened at once, each in a task of its own, all held.
async fn open_at_once(bed: &Arc<Bed>, n: usize) -> Vec<Tunnel> {
    let opens: Vec<_> = (0..n)
        .map(|_| {
            let bed = bed.clone();
            tokio::spawn(async move { bed.open().await })
        })
        .collect();
    let mut held = Vec::with_capacity(n);
    for o in opens {
        held.push(o.await.expect("no open panicked"));
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_opens_at_once_are_all_served_on_as_few_connections_as_the_limit_allows() {
    const OPENS: usize = 250;
    let bed = Arc::new(Bed::start(100, Duration::from_secs(300)).await);
    let held = open_at_once(&bed, OPENS).await;
    assert_eq!(bed.metrics.pool_streams.get(), OPENS as i64);
    assert_eq!(bed.dialled(), 3, "250 streams at 100 per connection");
    drop(held);
    assert_eq!(bed.metrics.pool_streams.get(), 0);
}

/// A pool allowed more streams per connection than the destination accepts (its
/// `SETTINGS_MAX_CONCURRENT_STREAMS`, 200 for ours as for Istio's) opens another connection
/// rather than queue streams the peer would never answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_carries_no_more_streams_than_its_peer_allows() {
    const OPENS: usize = 250;
    let bed = Arc::new(Bed::start(300, Duration::from_secs(300)).await);
    let mut held = open_at_once(&bed, OPENS).await;
    assert_eq!(bed.metrics.pool_streams.get(), OPENS as i64);
    assert!(bed.dialled() >= 2, "250 streams on one connection");
    let (mut client, copy) = carry(held.pop().unwrap()).await;
    echoes(&mut client, b"the last stream opened").await;
    drop(client);
    let _ = copy.await;
    drop(held);
    assert_eq!(bed.metrics.pool_streams.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_as_the_destination_drains_goes_to_a_newly_dialled_connection() {
    let mut bed = Bed::start(100, Duration::from_secs(300)).await;
    let held = bed.open().await;
    // A new daemon beside the old one, then the old one drains: its connections get a GOAWAY
    // and it accepts no more. The pool must not fail the next stream: either it has seen the
    // GOAWAY and dials, or the stream is refused and retried on a connection dialled after.
    bed.add_server();
    bed.servers[0].send(true).unwrap();
    for _ in 0..3 {
        drop(bed.open().await);
    }
    assert_eq!(
        bed.dialled(),
        2,
        "one connection dialled after the drain, then reused"
    );
    drop(held);
}

/// A local connection carried by `t`'s stream, as the outbound proxy's copy carries one: the
/// client's end, and the copy (which gives the stream's place back when it ends).
async fn carry(
    t: Tunnel,
) -> (
    TcpStream,
    tokio::task::JoinHandle<Result<(), crate::hbone::copy::CopyError>>,
) {
    let (client, accepted) = crate::hbone::tests::pair().await;
    let copy = tokio::spawn(async move {
        let (rd, wr) = accepted.into_split();
        let budget = BufferBudget::new(budget::DEFAULT_LIMIT, Default::default());
        let counters = ByteCounters::default();
        let holding = budget.holding([127, 0, 0, 1].into());
        let copied = copy_tunnel(rd, wr, t.stream, &counters, holding).await;
        drop(t.lease);
        copied
    });
    (client, copy)
}

/// Sends `msg` through a carried connection and reads back its echo.
async fn echoes(client: &mut TcpStream, msg: &[u8]) {
    let mut echoed = vec![0u8; msg.len()];
    let round_trip = async {
        client.write_all(msg).await?;
        client.read_exact(&mut echoed).await
    };
    tokio::time::timeout(Duration::from_secs(4), round_trip)
        .await
        .expect("the stream still carries bytes")
        .unwrap();
    assert_eq!(echoed, msg);
}

/// A connection on `transport` evicted with a stream open: the next stream dials another, the
/// open one still carries bytes, and the connection closes once that has ended.
async fn an_evicted_connection_carries_its_open_stream_to_its_end(quic: bool) {
    // The pod's namespace is the process's own: the pool dials from it without switching.
    let netns = crate::net::netns::Netns::open(std::path::Path::new("/proc/self/ns/net"))
        .expect("the process's own network namespace");
    let mut bed = Bed::with(100, Duration::from_secs(300), SPARE_IDLE_TIMEOUT, quic).await;
    bed.key.netns = Some(Arc::new(netns));
    let held = bed.open().await;
    let transport = if quic { "quic" } else { "h2" };
    assert_eq!(bed.pool.connections()[0].transport, transport);
    let (mut client, copy) = carry(held).await;
    assert_eq!(bed.pool.evict_netns(bed.key.netns.as_ref().unwrap()), 1);
    let fresh = bed.open().await;
    assert_eq!(
        bed.dialled(),
        2,
        "the evicted connection takes no new stream"
    );
    echoes(&mut client, b"still here").await;
    drop(client);
    copy.await.unwrap().expect("the stream ended cleanly");
    // Closed once its stream has ended, well before the pool's 5 s grace would close it.
    bed.until_connections_within(1, Duration::from_millis(2500))
        .await;
    drop(fresh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_http2_connection_takes_no_new_stream_and_carries_its_open_one_to_its_end() {
    an_evicted_connection_carries_its_open_stream_to_its_end(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_quic_connection_takes_no_new_stream_and_carries_its_open_one_to_its_end() {
    an_evicted_connection_carries_its_open_stream_to_its_end(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_as_a_quic_destination_drains_goes_to_a_newly_dialled_connection() {
    let mut bed = Bed::with(100, Duration::from_secs(300), SPARE_IDLE_TIMEOUT, true).await;
    // A long-lived stream keeps the QUIC connection open through the drain.
    let (mut held, copy) = carry(bed.open().await).await;
    assert_eq!(bed.pool.connections()[0].transport, "quic");
    bed.add_server();
    bed.servers[0].send(true).unwrap();
    // The drained daemon refuses the streams opened on its connection from now on, and the
    // pool sends them again on a connection dialled after the drain (on HTTP/2: the new daemon
    // takes no QUIC).
    for _ in 0..3 {
        let opened = tokio::time::timeout(Duration::from_secs(5), bed.open())
            .await
            .expect("a stream opened during the drain is answered");
        drop(opened);
    }
    assert_eq!(bed.dialled(), 2, "one connection dialled after the drain");
    // The drained daemon's stream runs on.
    echoes(&mut held, b"still here").await;
    drop(held);
    copy.await.unwrap().expect("the stream ended cleanly");
}

/// What the inbound proxy counted under `reason`.
fn refusals(m: &Metrics, reason: crate::refusal::Reason) -> u64 {
    let labels = ReasonLabels {
        reason: reason.label(),
    };
    m.refusals.get_or_create(&labels).get()
}

/// The connection cap (1 per address here), with the pool's connection full: the second
/// connection is closed before it carries a stream, and is not counted as accepted.
async fn a_peer_is_held_to_its_connection_cap(quic: bool) {
    use crate::refusal::Reason;
    let peers = PeerLimits {
        connections_per_address: 1,
        ..Default::default()
    };
    let bed = Bed::with_peer_limits(2, quic, peers).await;
    let accepted = || {
        let m = &bed.server_metrics;
        match quic {
            true => m.quic_connections_accepted.get(),
            false => m.hbone_connections_accepted.get(),
        }
    };
    let (a, b) = (bed.open().await, bed.open().await);
    assert_eq!(accepted(), 1);
    let transport = if quic { "quic" } else { "h2" };
    assert_eq!(bed.pool.connections()[0].transport, transport);
    // The pool's connection is full (2 streams): the next stream dials a second one, which
    // the proxy closes as over the cap.
    let opened = bed.try_open().await;
    assert!(opened.is_err(), "a second connection carried a stream");
    assert_eq!(
        refusals(&bed.server_metrics, Reason::InboundPeerConnectionLimit),
        1
    );
    assert_eq!(
        accepted(),
        1,
        "the refused connection is not counted as accepted"
    );
    drop((a, b));
}

/// The stream cap (2 per address here) on a connection the pool would fill further: the
/// third stream is answered `429` before the application sees it, and once a stream has ended
/// its place is taken again.
async fn a_peer_is_held_to_its_stream_cap(quic: bool) {
    use crate::refusal::Reason;
    let peers = PeerLimits {
        streams_per_address: 2,
        ..Default::default()
    };
    let bed = Bed::with_peer_limits(100, quic, peers).await;
    let (a, b) = (bed.open().await, bed.open().await);
    let third = bed.try_open().await;
    let status = third.err().and_then(|e| e.status());
    assert_eq!(status, Some(http::StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(
        refusals(&bed.server_metrics, Reason::InboundPeerStreamLimit),
        1
    );
    // A place comes back once the proxy has seen a stream end (its copy ends first).
    let (client, copy) = carry(a).await;
    drop(client);
    copy.await.unwrap().expect("the stream ended cleanly");
    let mut again = None;
    for _ in 0..100 {
        match bed.try_open().await {
            Ok(t) => {
                again = Some(t);
                break;
            }
            Err(e) => assert_eq!(e.status(), Some(http::StatusCode::TOO_MANY_REQUESTS)),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the ended stream's place was given back");
    assert_eq!(bed.dialled(), 1, "all on the one admitted connection");
    drop((b, again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_peer_is_held_to_its_connection_cap() {
    a_peer_is_held_to_its_connection_cap(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_peer_is_held_to_its_connection_cap() {
    a_peer_is_held_to_its_connection_cap(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_peer_is_held_to_its_stream_cap() {
    a_peer_is_held_to_its_stream_cap(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_peer_is_held_to_its_stream_cap() {
    a_peer_is_held_to_its_stream_cap(true).await;
}
