//! The outbound, inbound and inbound-plaintext handlers in-process, without root: one node's
//! proxies on loopback addresses, with [`Redirects`] in place of the capture rules (each
//! outbound or plaintext listener stands for one original destination; a workload's tunnel
//! port is moved to an inbound listener on its address). What is checked is what the daemon
//! promises of a connection: it reaches the application through a mutual-TLS tunnel with both
//! identities known, the bytes a client writes before the tunnel is open arrive first and in
//! order, a destination's policy is enforced (each over HTTP/2 and over QUIC), an address
//! outside the mesh is reached in plain TCP, plain TCP's bytes are reported each way, and each
//! refusal (not redirected, unknown source, denied by the destination's policy, a tunnel that
//! cannot be opened, plaintext to a STRICT workload, a source address over its cap of proxied
//! connections) resets the client and is counted under its reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::conns::{ConnRow, Direction};
use super::{accept_loop, inbound_plain, ProxyInputs, Scope};
use crate::ca::LocalCa;
use crate::discovery::Discovery;
use crate::hbone::consts::HBONE_PORT;
use crate::hbone::pool::{Pool, PoolSettings, QuicSettings};
use crate::identity::CertManager;
use crate::metrics::Metrics;
use crate::net::sockets::Redirects;
use crate::net::ConnectOptions;
use crate::refusal::Reason;

const CLIENT: &str = "127.0.0.1";
const SERVER: &str = "127.0.0.2";
/// A workload whose policy admits only another identity, and only in mutual TLS.
const GUARDED: &str = "127.0.0.3";
/// An address outside the mesh.
const OUTSIDE: &str = "127.0.0.4";
/// A workload whose tunnel port answers, but not with TLS.
const BROKEN: &str = "127.0.0.5";
/// The addresses with an echo application (each on a port of its own).
const APPS: [&str; 3] = [SERVER, GUARDED, OUTSIDE];
/// An address of no workload.
const STRANGER: &str = "127.0.0.9";

fn mesh() -> String {
    format!(
        "trustDomain: cluster.local
namespaces:
  - {{name: t, labels: {{ztunnel.dev/dataplane-mode: ambient}}}}
  - {{name: g, labels: {{ztunnel.dev/dataplane-mode: ambient}}}}
workloads:
  - {{uid: c, name: client, namespace: t, serviceAccount: client, node: n, ips: [{CLIENT}], protocol: HBONE}}
  - {{uid: s, name: server, namespace: t, serviceAccount: server, node: n, ips: [{SERVER}], protocol: HBONE}}
  - {{uid: g, name: guarded, namespace: g, serviceAccount: guarded, node: n, ips: [{GUARDED}], protocol: HBONE, labels: {{app: guarded}}}}
  - {{uid: b, name: broken, namespace: t, serviceAccount: broken, node: n, ips: [{BROKEN}], protocol: HBONE}}
policies:
  - apiVersion: security.ztunnel.dev/v1
    kind: AuthorizationPolicy
    metadata: {{name: only-other, namespace: g}}
    spec:
      selector: {{matchLabels: {{app: guarded}}}}
      rules: [{{from: [{{source: {{principals: [cluster.local/ns/t/sa/other]}}}}]}}]
  - apiVersion: security.ztunnel.dev/v1
    kind: PeerAuthentication
    metadata: {{name: strict, namespace: g}}
    spec: {{mtls: {{mode: STRICT}}}}
"
    )
}

const CONNECT: ConnectOptions = ConnectOptions {
    mark: None,
    timeout: Duration::from_secs(5),
};

/// One node's proxies on loopback and an echo application on each workload address.
struct Node {
    pi: Arc<ProxyInputs>,
    /// The registry the node's metrics are in.
    registry: prometheus_client::registry::Registry,
    redirects: Arc<Redirects>,
    /// The echo application on each of [`APPS`], in that order.
    apps: Vec<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// The node, its pool dialling QUIC when `quic` (its inbound proxies then accept QUIC
    /// too, on their listeners' addresses).
    async fn start(quic: bool) -> Node {
        Node::start_with(quic, super::TunnelLimits::default()).await
    }

    /// The node, with `limits`.
    async fn start_with(quic: bool, limits: super::TunnelLimits) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path(), "cluster.local").unwrap());
        let redirects = Arc::new(Redirects::default());
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        let settings = PoolSettings {
            max_streams: 100,
            idle_timeout: Duration::from_secs(300),
            spare_idle_timeout: crate::hbone::pool::SPARE_IDLE_TIMEOUT,
            connect: CONNECT,
            quic: QuicSettings {
                destinations: if quic {
                    [SERVER, GUARDED]
                        .map(|ip| format!("{ip}/32").parse().unwrap())
                        .into()
                } else {
                    Vec::new()
                },
            },
            sockets: redirects.clone(),
        };
        let (draining_tx, draining) = tokio::sync::watch::channel(false);
        // The node never drains during a test.
        std::mem::forget(draining_tx);
        let pi = ProxyInputs::new(
            "n".into(),
            "cluster.local".into(),
            "Kubernetes",
            "cluster.local",
            Discovery::fixed(crate::discovery::parse(&mesh(), "cluster.local").unwrap()),
            CertManager::new(ca, Duration::from_secs(86400), Default::default()),
            Pool::new(settings, metrics.clone()),
            metrics,
            CONNECT,
            100,
            limits,
            false,
            draining,
        );
        // A tunnel is accepted only for the address it was dialled at: one listener each.
        for ip in [SERVER, GUARDED] {
            let tunnel = TcpListener::bind((ip, 0)).await.unwrap();
            redirects.move_to(at(ip, HBONE_PORT), tunnel.local_addr().unwrap());
            if quic {
                let ep = super::quic_endpoint(None, tunnel.local_addr().unwrap()).unwrap();
                tokio::spawn(super::serve_inbound_quic(pi.clone(), ep));
            }
            tokio::spawn(super::serve_inbound(pi.clone(), tunnel));
        }
        let not_tls = TcpListener::bind((BROKEN, 0)).await.unwrap();
        redirects.move_to(at(BROKEN, HBONE_PORT), not_tls.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = not_tls.accept().await {
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let mut apps = Vec::new();
        for ip in APPS {
            let app = TcpListener::bind((ip, 0)).await.unwrap();
            apps.push(app.local_addr().unwrap());
            tokio::spawn(echo(app));
        }
        Node {
            pi,
            registry,
            redirects,
            apps,
            _dir: dir,
        }
    }

    /// An outbound listener standing for `original_dst` (`None`: not redirected).
    async fn outbound(&self, original_dst: Option<SocketAddr>) -> SocketAddr {
        let l = TcpListener::bind((CLIENT, 0)).await.unwrap();
        self.serve(l, original_dst, "outbound", super::outbound::handle)
    }

    /// An inbound plaintext listener standing for `original_dst`.
    async fn plaintext(&self, original_dst: SocketAddr) -> SocketAddr {
        let l = TcpListener::bind((SERVER, 0)).await.unwrap();
        self.serve(l, Some(original_dst), "plaintext", inbound_plain::handle)
    }

    /// An outbound listener of the client pod's own ([`Scope::Pod`], in this process's
    /// netns), standing for `original_dst`.
    async fn outbound_of_client_pod(&self, original_dst: SocketAddr) -> SocketAddr {
        let l = TcpListener::bind((CLIENT, 0)).await.unwrap();
        let netns = crate::net::netns::Netns::open(std::path::Path::new("/proc/self/ns/net"));
        let scope = Scope::Pod(Arc::new(super::PodScope {
            uid: "c".into(),
            netns: Arc::new(netns.unwrap()),
            addr: CLIENT.parse().unwrap(),
        }));
        self.serve_in(
            scope,
            l,
            Some(original_dst),
            "outbound",
            super::outbound::handle,
        )
    }

    fn serve<F, Fut>(
        &self,
        l: TcpListener,
        original_dst: Option<SocketAddr>,
        name: &'static str,
        handle: F,
    ) -> SocketAddr
    where
        F: Fn(Arc<ProxyInputs>, Scope, TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.serve_in(Scope::Node, l, original_dst, name, handle)
    }

    fn serve_in<F, Fut>(
        &self,
        scope: Scope,
        l: TcpListener,
        original_dst: Option<SocketAddr>,
        name: &'static str,
        handle: F,
    ) -> SocketAddr
    where
        F: Fn(Arc<ProxyInputs>, Scope, TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let addr = l.local_addr().unwrap();
        if let Some(dst) = original_dst {
            self.redirects.redirect(addr, dst);
        }
        tokio::spawn(accept_loop(self.pi.clone(), scope, l, name, handle));
        addr
    }

    fn app(&self, ip: &str) -> SocketAddr {
        let i = APPS
            .iter()
            .position(|a| *a == ip)
            .expect("an address with an application");
        self.apps[i]
    }

    fn refusals(&self, reason: Reason) -> u64 {
        self.pi
            .metrics
            .refusals
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: reason.label(),
            })
            .get()
    }

    /// Every refusal counted so far, for a failing test's message.
    fn all_refusals(&self) -> Vec<(&'static str, u64)> {
        Reason::ALL
            .iter()
            .map(|r| (r.label(), self.refusals(*r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    fn proxied(&self, direction: &'static str) -> u64 {
        self.pi
            .metrics
            .proxied_connections
            .get_or_create(&crate::metrics::DirectionLabels { direction })
            .get()
    }

    /// The sum of a counter family's series, as `/metrics` exports it.
    fn counter_sum(&self, family: &str) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits (at most 10 s) until no connection of `direction` is left in the table.
    async fn until_closed(&self, direction: Direction) {
        let table = &self.pi.connections;
        let closed = async {
            loop {
                let changed = table.changed();
                if !table.rows().iter().any(|r| r.direction == direction) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("closed within 10 s");
    }

    /// The places held among the pods' outbound connections and the plaintext clients'.
    fn held(&self) -> usize {
        self.pi.sources.held() + self.pi.plaintext_clients.held()
    }

    /// Waits (at most 10 s) until the node's sources hold `n` proxied connections in all.
    async fn until_sources_hold(&self, n: usize) {
        let held = async {
            while self.held() != n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .unwrap_or_else(|_| panic!("{} held, not {n}", self.held()));
    }

    /// The connection table's row of `direction` (exactly one expected).
    fn row(&self, direction: Direction) -> ConnRow {
        let mut rows: Vec<_> = self
            .pi
            .connections
            .rows()
            .into_iter()
            .filter(|r| r.direction == direction)
            .collect();
        assert_eq!(rows.len(), 1, "{direction:?} rows: {rows:?}");
        rows.remove(0)
    }
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

async fn echo(l: TcpListener) {
    while let Ok((s, _)) = l.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// What [`greeter`] says first.
const GREETING: &[u8] = b"hello, this is the application\n";

/// An application that greets each client, then echoes what it sends until it ends.
async fn greeter(l: TcpListener) {
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            s.write_all(GREETING).await?;
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await
        });
    }
}

/// A client connection to `to` from `from`.
async fn connect(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(at(from, 0))?;
    s.connect(to).await
}

/// One connection to `to` from each of `from`, each answered, held open.
async fn hold(from: &[&str], to: SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for f in from {
        let mut s = connect(f, to).await.unwrap();
        assert_eq!(round_trip(&mut s, b"held").await.unwrap(), b"held");
        held.push(s);
    }
    held
}

/// Writes `msg` and reads as many bytes back.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).await?;
    Ok(back)
}

/// A client from `from` to `to` that writes first is reset (the reset can come as soon as the
/// connect), never answered.
async fn assert_reset(from: &str, to: SocketAddr) {
    let attempt = async {
        let mut s = connect(from, to).await?;
        s.write_all(b"hello").await?;
        let mut buf = [0u8; 16];
        s.read(&mut buf).await
    };
    let r = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("refused within 10 s");
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client is reset, not answered: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_connection_reaches_the_application_through_a_tunnel_with_both_identities() {
    for quic in [false, true] {
        let node = Node::start(quic).await;
        let entry = node.outbound(Some(node.app(SERVER))).await;
        let mut s = connect(CLIENT, entry).await.unwrap();
        assert_eq!(round_trip(&mut s, b"ping").await.unwrap(), b"ping");
        let out = node.row(Direction::Outbound);
        let inb = node.row(Direction::Inbound);
        let client = "spiffe://cluster.local/ns/t/sa/client";
        let server = "spiffe://cluster.local/ns/t/sa/server";
        assert_eq!(out.facts.src_identity.as_deref(), Some(client));
        assert_eq!(out.facts.dst_identity.as_deref(), Some(server));
        assert_eq!(out.facts.dst_addr, Some(node.app(SERVER)));
        assert_eq!(
            inb.facts.src_identity.as_deref(),
            Some(client),
            "the destination knows the source by its certificate (QUIC: {quic})"
        );
        assert_eq!(inb.facts.dst_workload.as_deref(), Some("t/server"));
        assert_eq!(inb.facts.decision, Some("allow"));
        assert_eq!(
            inb.facts.traceparent, out.facts.traceparent,
            "both ends record the trace the source started (QUIC: {quic})"
        );
        assert_eq!((node.proxied("outbound"), node.proxied("inbound")), (1, 1));
        assert_eq!(node.pi.metrics.pool_connections_opened.get(), 1);
        assert_eq!(
            node.pi.metrics.quic_fallbacks.get(),
            0,
            "the tunnel is on the transport asked for (QUIC: {quic})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_written_before_the_tunnel_is_open_arrive_first_and_in_order() {
    for quic in [false, true] {
        let node = Node::start(quic).await;
        let entry = node.outbound(Some(node.app(SERVER))).await;
        let mut s = connect(CLIENT, entry).await.unwrap();
        // More than the early-bytes limit (64 KiB), written before any answer could come.
        let msg: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = s.split();
        let (wrote, back) = tokio::join!(w.write_all(&msg), async {
            let mut back = vec![0; msg.len()];
            r.read_exact(&mut back).await.map(|_| back)
        });
        wrote.unwrap();
        assert!(
            back.unwrap() == msg,
            "the echo is what was sent, in order (QUIC: {quic})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_outside_the_mesh_is_reached_in_plain_tcp() {
    let node = Node::start(false).await;
    let entry = node.outbound(Some(node.app(OUTSIDE))).await;
    let mut s = connect(CLIENT, entry).await.unwrap();
    assert_eq!(round_trip(&mut s, b"plain").await.unwrap(), b"plain");
    let row = node.row(Direction::Passthrough);
    assert_eq!(row.facts.dst_addr, Some(node.app(OUTSIDE)));
    assert_eq!(node.proxied("passthrough"), 1);
    assert_eq!(
        node.pi.metrics.pool_connections_opened.get(),
        0,
        "no tunnel"
    );
}

/// The connections the listeners accept, and those the daemon dials (here plain TCP to the
/// application), carry TCP keepalive as Istio's ztunnel sets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_and_dialled_connections_carry_keepalive() {
    let node = Node::start(false).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let l = TcpListener::bind((SERVER, 0)).await.unwrap();
    let entry = node.serve(l, None, "probe", move |_, _, tcp: TcpStream, _| {
        let _ = tx.send(keepalive_of(&tcp));
        async {}
    });
    let _client = connect(CLIENT, entry).await.unwrap();
    let accepted = rx.recv().await.unwrap();
    let dialled = crate::net::connect(node.app(OUTSIDE), CONNECT)
        .await
        .unwrap();
    for got in [accepted, keepalive_of(&dialled)] {
        assert_eq!(
            got,
            Some((Duration::from_secs(180), Duration::from_secs(180), 9))
        );
    }
}

/// A socket's keepalive (idle time, interval, probes), if it is on.
fn keepalive_of(tcp: &TcpStream) -> Option<(Duration, Duration, u32)> {
    let s = socket2::SockRef::from(tcp);
    s.keepalive().unwrap().then(|| {
        let time = s.tcp_keepalive_time().unwrap();
        (
            time,
            s.tcp_keepalive_interval().unwrap(),
            s.tcp_keepalive_retries().unwrap(),
        )
    })
}

/// Plain TCP (passthrough at the source, plaintext at the destination) is reported with the
/// client's bytes as the request and the application's as the response, as the tunnel is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_reports_its_bytes_each_way() {
    let node = Node::start(false).await;
    for (ip, direction) in [
        (OUTSIDE, Direction::Passthrough),
        (SERVER, Direction::InboundPlaintext),
    ] {
        let app = TcpListener::bind((ip, 0)).await.unwrap();
        let dst = app.local_addr().unwrap();
        tokio::spawn(greeter(app));
        let (entry, from) = match direction {
            Direction::Passthrough => (node.outbound(Some(dst)).await, CLIENT),
            _ => (node.plaintext(dst).await, STRANGER),
        };
        let mut s = connect(from, entry).await.unwrap();
        let mut greeting = vec![0; GREETING.len()];
        s.read_exact(&mut greeting).await.unwrap();
        assert_eq!(round_trip(&mut s, b"ping").await.unwrap(), b"ping");
        s.shutdown().await.unwrap();
        assert_eq!(
            s.read(&mut [0u8; 8]).await.unwrap(),
            0,
            "the application ends"
        );
        node.until_closed(direction).await;
    }
    let request = 2 * 4;
    let response = 2 * (GREETING.len() + 4) as u64;
    assert_eq!(node.counter_sum("istio_tcp_received_bytes_total"), request);
    assert_eq!(node.counter_sum("istio_tcp_sent_bytes_total"), response);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_was_not_redirected_is_reset_and_counted() {
    let node = Node::start(false).await;
    let entry = node.outbound(None).await;
    assert_reset(CLIENT, entry).await;
    assert_eq!(node.refusals(Reason::OutboundNoOriginalDst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_from_no_local_workload_is_reset_and_counted() {
    let node = Node::start(false).await;
    let entry = node.outbound(Some(node.app(SERVER))).await;
    assert_reset(STRANGER, entry).await;
    assert_eq!(node.refusals(Reason::OutboundUnknownSource), 1);
    assert_eq!(node.proxied("outbound"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_destination_denies_resets_the_client_and_both_ends_count_it() {
    for quic in [false, true] {
        let node = Node::start(quic).await;
        let entry = node.outbound(Some(node.app(GUARDED))).await;
        // The client writes first, so its bytes can meet a stream already refused and reset.
        assert_reset(CLIENT, entry).await;
        assert_eq!(
            node.refusals(Reason::PolicyDenied),
            1,
            "at the destination (QUIC: {quic}): {:?}",
            node.all_refusals()
        );
        assert_eq!(
            node.refusals(Reason::OutboundDeniedByDestination),
            1,
            "at the source (QUIC: {quic}): {:?}",
            node.all_refusals()
        );
        let denials = node
            .pi
            .metrics
            .policy_decisions
            .get_or_create(&crate::metrics::ResultLabels { result: "deny" })
            .get();
        assert_eq!(denials, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_that_cannot_be_opened_resets_the_client_and_is_counted() {
    let node = Node::start(false).await;
    let entry = node.outbound(Some(at(BROKEN, 8080))).await;
    assert_reset(CLIENT, entry).await;
    assert_eq!(node.refusals(Reason::OutboundTunnelFailed), 1);
    assert_eq!(node.proxied("inbound"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_reaches_a_permissive_workload_and_not_a_strict_one() {
    let node = Node::start(false).await;
    let permissive = node.plaintext(node.app(SERVER)).await;
    let mut s = connect(STRANGER, permissive).await.unwrap();
    assert_eq!(round_trip(&mut s, b"clear").await.unwrap(), b"clear");
    let row = node.row(Direction::InboundPlaintext);
    assert_eq!(row.facts.src_identity, None, "plaintext has no identity");
    assert_eq!(row.facts.decision, Some("allow"));

    let strict = node.plaintext(node.app(GUARDED)).await;
    assert_reset(STRANGER, strict).await;
    assert_eq!(node.refusals(Reason::InboundPlaintextStrict), 1);
}

/// A source address has no more connections proxied at once than its cap (two here), outbound
/// and plaintext alike: one more is reset at once and counted (`outbound_source_limit`,
/// `inbound_plaintext_source_limit`), while another address is served; a place given back is
/// taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_address_over_its_cap_of_proxied_connections_is_reset_and_counted() {
    let limits = super::TunnelLimits {
        connections_per_source: 2,
        ..Default::default()
    };
    let node = Node::start_with(false, limits).await;
    let cases = [
        (
            node.outbound(Some(node.app(OUTSIDE))).await,
            [CLIENT, SERVER],
            Reason::OutboundSourceLimit,
        ),
        (
            node.plaintext(node.app(SERVER)).await,
            [STRANGER, CLIENT],
            Reason::InboundPlaintextSourceLimit,
        ),
    ];
    for (entry, [from, other], reason) in cases {
        let mut held = hold(&[from; 2], entry).await;
        assert_reset(from, entry).await;
        assert_eq!(node.refusals(reason), 1, "{:?}", node.all_refusals());
        let mut s = connect(other, entry).await.unwrap();
        assert_eq!(round_trip(&mut s, b"other").await.unwrap(), b"other");
        drop(s);
        drop(held.pop());
        node.until_sources_hold(1).await;
        let mut s = connect(from, entry).await.unwrap();
        assert_eq!(round_trip(&mut s, b"again").await.unwrap(), b"again");
        drop((s, held));
        node.until_sources_hold(0).await;
        assert_eq!(node.refusals(reason), 1, "{:?}", node.all_refusals());
    }
}

/// A pod's outbound connections count under the pod's own address, whatever address they come
/// from inside it: a pod that gives itself a neighbour's address (root in its netns may) and
/// holds its cap of connections from there is refused its next one, from any address, and the
/// neighbour's own connections are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_holding_connections_from_a_neighbours_address_takes_none_of_its_places() {
    let limits = super::TunnelLimits {
        connections_per_source: 2,
        ..Default::default()
    };
    let node = Node::start_with(false, limits).await;
    let pod = node.outbound_of_client_pod(node.app(OUTSIDE)).await;
    let held = hold(&[SERVER; 2], pod).await;
    assert_reset(STRANGER, pod).await;
    assert_eq!(node.refusals(Reason::OutboundSourceLimit), 1);
    // The neighbour (the server pod, here served on the node's listener by its address).
    let neighbour = node.outbound(Some(node.app(OUTSIDE))).await;
    let mut s = connect(SERVER, neighbour).await.unwrap();
    assert_eq!(round_trip(&mut s, b"mine").await.unwrap(), b"mine");
    assert_eq!(
        node.refusals(Reason::OutboundSourceLimit),
        1,
        "{:?}",
        node.all_refusals()
    );
    drop((s, held));
    node.until_sources_hold(0).await;
}

/// When the node's pods hold as many outbound connections as allowed (four here), a newcomer
/// from a pod holding fewer than the largest takes the place of that pod's oldest connection,
/// which is closed and counted (`proxied_connection_evicted`); the largest pod's other
/// connections run on, and a newcomer of its own, which would leave it the largest, is reset.
/// Plaintext clients' connections take none of the pods' places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_closes_the_oldest_connection_of_the_pod_holding_the_most() {
    let limits = super::TunnelLimits {
        connections_per_source: 3,
        proxied_connections: 4,
        ..Default::default()
    };
    let node = Node::start_with(false, limits).await;
    let plaintext = node.plaintext(node.app(SERVER)).await;
    let mut strangers = hold(&[STRANGER; 3], plaintext).await;
    let entry = node.outbound(Some(node.app(OUTSIDE))).await;
    let mut held = hold(&[CLIENT, CLIENT, CLIENT, SERVER], entry).await;
    assert_eq!(node.refusals(Reason::ProxiedConnectionEvicted), 0);
    assert_eq!(node.pi.sources.held(), 4);

    let mut newcomer = connect(GUARDED, entry).await.unwrap();
    assert_eq!(round_trip(&mut newcomer, b"new").await.unwrap(), b"new");
    let mut buf = [0u8; 8];
    let oldest = tokio::time::timeout(Duration::from_secs(10), held[0].read(&mut buf))
        .await
        .expect("the oldest is closed");
    assert!(
        matches!(oldest, Ok(0)) || oldest.is_err(),
        "closed, not answered: {oldest:?}"
    );
    assert_eq!(node.refusals(Reason::ProxiedConnectionEvicted), 1);
    for s in held[1..].iter_mut().chain(strangers.iter_mut()) {
        assert_eq!(round_trip(s, b"still").await.unwrap(), b"still");
    }
    assert_reset(CLIENT, entry).await;
    assert_eq!(
        node.refusals(Reason::OutboundSourceLimit),
        1,
        "{:?}",
        node.all_refusals()
    );
    assert_eq!(node.refusals(Reason::ProxiedConnectionEvicted), 1);
    drop((held, strangers, newcomer));
    node.until_sources_hold(0).await;
}
