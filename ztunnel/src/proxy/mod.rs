//! The proxies: outbound capture (15001), inbound tunnel (15008) and inbound plaintext (15006).
//!
//! Each listener accepts connections and hands each one to its handler in its own task; with
//! QUIC enabled, a UDP endpoint on the tunnel port accepts tunnels too (`inbound_quic.rs`). A set
//! of listeners has a [`Scope`]: inside one enrolled pod's netns ([`Scope::Pod`], the product),
//! it serves that pod, and its sockets to peers and to the application are made in that netns
//! (to the application from the real client's address); on the node's own addresses
//! ([`Scope::Node`], for tests and benchmarks without capture), it serves the local workload
//! that owns the peer address (outbound) or the local address (inbound). Decisions (the outbound [`plan`], the CONNECT
//! validation in [`crate::hbone::server`]) are pure functions; the handlers do the I/O.
//! On drain, listeners stop accepting and tunnel connections send GOAWAY; established
//! connections run on until they end or the daemon's grace period is over.

pub mod conns;
#[cfg(test)]
mod handler_tests;
mod inbound;
mod inbound_plain;
mod inbound_quic;
#[cfg(test)]
mod loopback_tests;
mod outbound;
pub mod outcome;
pub mod peers;
pub mod plan;
#[cfg(test)]
mod slow_peer_tests;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::discovery::{Discovery, Service, State, Workload};
use crate::gate::{self, Gate, WhenFull};
use crate::hbone::budget::{self, BufferBudget};
use crate::hbone::copy::CopyError;
use crate::hbone::pool::Pool;
use crate::identity::{CertManager, Identity};
use crate::metrics::{End, IstioLabels, Metrics};
use crate::net::netns::Netns;
use crate::net::sockets::Sockets;
use crate::net::{reset, ConnectOptions, Origin};
use conns::ConnTable;
pub use inbound::HANDSHAKE_TIMEOUT;
use outcome::{refuse, Outcome};
use peers::{PeerLimits, Peers};

/// Whom a set of listeners serves.
#[derive(Clone, Debug)]
pub enum Scope {
    /// Listeners on the node's addresses, serving every workload of the node.
    Node,
    /// Listeners inside one enrolled pod's netns, serving that pod.
    Pod(Arc<PodScope>),
}

/// The pod a [`Scope::Pod`] serves (shared: every connection's handler holds its scope).
#[derive(Debug)]
pub struct PodScope {
    pub uid: Arc<str>,
    pub netns: Arc<Netns>,
    /// Its first address when it was enrolled (see [`Scope::source_key`]).
    pub addr: IpAddr,
}

impl Scope {
    /// The workload served: for a pod, the pod itself (while discovery still has it on this
    /// node); for the node, the local workload owning `addr`.
    fn workload(&self, pi: &ProxyInputs, state: &State, addr: SocketAddr) -> Option<Arc<Workload>> {
        match self {
            Scope::Node => pi.local_workload(state, addr),
            Scope::Pod(pod) => state
                .workload_by_uid(&pod.uid)
                .filter(|w| &*w.node == pi.node.as_str())
                .cloned(),
        }
    }

    /// The workload served that owns `addr`, a connection's destination: as [`Self::workload`],
    /// and in a pod only when `addr` is one of its addresses. A packet can reach a pod's
    /// capture addressed to another (crafted on a shared bridge, or a broadcast): it reaches
    /// no workload, rather than being carried on from inside the pod.
    fn destination(
        &self,
        pi: &ProxyInputs,
        state: &State,
        addr: SocketAddr,
    ) -> Option<Arc<Workload>> {
        self.workload(pi, state, addr)
            .filter(|w| w.ips.contains(&addr.ip().to_canonical()))
    }

    /// The address an outbound connection from `peer` counts under, among
    /// [`ProxyInputs::sources`] and in the buffer budget: in a pod, the pod's own, whatever
    /// address the connection comes from inside it (a pod may give itself any address, a
    /// neighbour's included, and would otherwise take that neighbour's places); on the node,
    /// the peer's.
    pub fn source_key(&self, peer: IpAddr) -> IpAddr {
        match self {
            Scope::Pod(pod) => pod.addr.to_canonical(),
            Scope::Node => peer.to_canonical(),
        }
    }

    fn netns(&self) -> Option<Arc<Netns>> {
        match self {
            Scope::Node => None,
            Scope::Pod(pod) => Some(pod.netns.clone()),
        }
    }

    /// Where connections to peers leave from.
    fn peer_origin(&self) -> Origin {
        Origin {
            netns: self.netns(),
            transparent_src: None,
        }
    }

    /// Where the connection to the application, on behalf of `client`, comes from: in a pod,
    /// from the client's own address, so the application sees it.
    fn app_origin(&self, client: IpAddr) -> Origin {
        match self {
            Scope::Node => Origin::default(),
            Scope::Pod(pod) => Origin {
                netns: Some(pod.netns.clone()),
                transparent_src: Some(client.to_canonical()),
            },
        }
    }
}

/// What tunnel peers may hold: before their handshakes are done (and for how long), once
/// authenticated, and what streams may hold for slow applications, node-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelLimits {
    /// Places among the pending handshakes, on the node and per source address.
    pub handshakes: gate::Limits,
    /// A TCP tunnel connection that has sent no byte of its TLS handshake by then is closed.
    pub tls_first_bytes_timeout: Duration,
    /// Connections and streams per authenticated peer ([`peers`]).
    pub peers: PeerLimits,
    /// Bytes tunnel streams may hold for their applications, node-wide
    /// ([`crate::hbone::budget`]).
    pub buffered_bytes: usize,
    /// Connections proxied at once for one source address ([`ProxyInputs::sources`]).
    pub connections_per_source: usize,
    /// The local pods' outbound connections proxied at once, node-wide
    /// ([`ProxyInputs::sources`]).
    pub proxied_connections: usize,
}

impl TunnelLimits {
    /// The default of [`TunnelLimits::tls_first_bytes_timeout`].
    pub const TLS_FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(2);
    /// The default of [`TunnelLimits::connections_per_source`]: as many as one address may
    /// have streams at one destination node (`PeerLimits::streams_per_address`).
    pub const CONNECTIONS_PER_SOURCE: usize = 16_384;
    /// The default of [`TunnelLimits::proxied_connections`]: what the DaemonSet's memory
    /// limit holds beside a full buffered-bytes budget (about 15 KiB a connection).
    pub const PROXIED_CONNECTIONS: usize = 40_000;
}

impl Default for TunnelLimits {
    fn default() -> Self {
        TunnelLimits {
            handshakes: gate::Limits::PENDING_HANDSHAKES,
            tls_first_bytes_timeout: Self::TLS_FIRST_BYTES_TIMEOUT,
            peers: PeerLimits::default(),
            buffered_bytes: budget::DEFAULT_LIMIT,
            connections_per_source: Self::CONNECTIONS_PER_SOURCE,
            proxied_connections: Self::PROXIED_CONNECTIONS,
        }
    }
}

/// Everything the proxies share.
pub struct ProxyInputs {
    pub node: String,
    pub trust_domain: String,
    /// The cluster's id, as Istio's telemetry reports it.
    pub cluster_id: Arc<str>,
    /// The cluster's DNS domain (service hostnames).
    pub cluster_domain: Arc<str>,
    pub discovery: Discovery,
    pub certs: Arc<CertManager>,
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    pub connections: Arc<ConnTable>,
    /// How the daemon connects to peers and applications (mark, timeout).
    pub connect: ConnectOptions,
    /// Streams the inbound tunnel server accepts per connection.
    pub max_streams: u32,
    /// Whether tunnels are also accepted on QUIC ([`Listeners::bind`] binds its endpoint).
    pub quic_listen: bool,
    /// Becomes `true` when the daemon drains.
    pub draining: watch::Receiver<bool>,
    /// Tunnel connections still in their handshakes, capped and shared fairly between
    /// sources ([`gate`], [`WhenFull::EvictLargest`]).
    pub handshakes: Arc<Gate>,
    /// How long a tunnel connection on TCP may stay silent before its first TLS bytes.
    pub tls_first_bytes_timeout: Duration,
    /// What authenticated tunnel peers hold.
    pub peers: Arc<Peers>,
    /// What tunnel streams hold for slow applications, node-wide.
    pub budget: Arc<BufferBudget>,
    /// The local pods' captured outbound connections now, for each pod (by its own address,
    /// [`Scope::source_key`]) and node-wide. Each holds a place from accept to close. Over its
    /// pod's cap a connection is reset at once (`outbound_source_limit`). When the node's
    /// places are all held, a newcomer whose pod, even with it, would hold fewer than the pod
    /// holding the most takes the place of that pod's oldest connection, which is closed once
    /// it is set up (`proxied_connection_evicted`); else it is reset. So neither one pod nor
    /// several together can take the daemon's memory and descriptors from the node's other
    /// pods.
    pub sources: Arc<Gate>,
    /// Plaintext clients' connections to the node's workloads (15006) now, for each client
    /// address: over its cap a connection is reset at once
    /// (`inbound_plaintext_source_limit`). Apart from the pods' outbound connections, so that
    /// many client addresses cannot take the pods' places.
    pub plaintext_clients: Arc<Gate>,
    /// The socket factory: the pool's, so that the proxies and their tunnels reach the
    /// network the same way.
    sockets: Arc<dyn Sockets>,
    round_robin: AtomicUsize,
    /// Accepted connections and tunnel streams whose handlers have not finished (including
    /// those not yet in the connection table); drain waits for them.
    inflight: Arc<AtomicUsize>,
}

impl ProxyInputs {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        trust_domain: String,
        cluster_id: &str,
        cluster_domain: &str,
        discovery: Discovery,
        certs: Arc<CertManager>,
        pool: Pool,
        metrics: Arc<Metrics>,
        connect: ConnectOptions,
        max_streams: u32,
        limits: TunnelLimits,
        quic_listen: bool,
        draining: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(ProxyInputs {
            node,
            trust_domain,
            cluster_id: cluster_id.into(),
            cluster_domain: cluster_domain.into(),
            discovery,
            certs,
            sockets: pool.sockets().clone(),
            pool,
            metrics: metrics.clone(),
            connections: Arc::new(ConnTable::new(metrics.istio.clone())),
            connect,
            max_streams,
            quic_listen,
            draining,
            handshakes: Gate::with(
                "pending tunnel handshakes",
                limits.handshakes,
                WhenFull::EvictLargest,
                Some(metrics.pending_handshakes.clone()),
            ),
            tls_first_bytes_timeout: limits.tls_first_bytes_timeout,
            peers: Peers::new(limits.peers),
            budget: Arc::new(BufferBudget::new(
                limits.buffered_bytes,
                metrics.buffered_bytes.clone(),
            )),
            sources: Gate::with(
                "proxied connections",
                gate::Limits {
                    total: limits.proxied_connections,
                    per_peer: limits.connections_per_source,
                },
                WhenFull::EvictLargest,
                None,
            ),
            plaintext_clients: Gate::new(
                "plaintext connections",
                gate::Limits {
                    total: usize::MAX,
                    per_peer: limits.connections_per_source,
                },
            ),
            round_robin: AtomicUsize::new(0),
            inflight: Arc::default(),
        })
    }

    /// The local workload (on this node) that owns `addr`.
    fn local_workload(&self, state: &State, addr: SocketAddr) -> Option<Arc<Workload>> {
        state
            .workload_by_ip(addr.ip().to_canonical())
            .filter(|w| &*w.node == self.node.as_str())
            .cloned()
    }

    fn identity_of(&self, w: &Workload) -> Identity {
        w.identity(&self.trust_domain)
    }

    /// Istio's labels of a connection reported by this daemon ([`crate::metrics::IstioLabels`]).
    fn istio_labels(
        &self,
        reporter: &'static str,
        src: End<'_>,
        dst: End<'_>,
        service: Option<&Service>,
        mutual_tls: bool,
    ) -> IstioLabels {
        IstioLabels::new(
            reporter,
            &self.cluster_id,
            &self.cluster_domain,
            src,
            dst,
            service,
            mutual_tls,
        )
    }

    /// Handlers running (connections accepted, tunnel streams received) that drain waits for.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Counts a handler until the returned guard drops.
    fn begin(&self) -> Inflight {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        Inflight(self.inflight.clone(), self.connections.clone())
    }

    /// Round-robin choice among `n` endpoints.
    fn pick(&self, n: usize) -> usize {
        self.round_robin.fetch_add(1, Ordering::Relaxed) % n.max(1)
    }

    /// Resolves when the daemon starts draining.
    async fn drained(&self) {
        let mut rx = self.draining.clone();
        let _ = rx.wait_for(|d| *d).await;
    }
}

/// Judges an inbound connection by the policies of `state`: the decision counted and recorded
/// on `tracked`, and, when it allows, the facts kept on it to judge it again when policies
/// change ([`ConnTable::reevaluate`]).
fn judge(
    pi: &ProxyInputs,
    state: &State,
    tracked: &conns::Tracked,
    facts: conns::PolicyFacts,
) -> crate::policy::Decision {
    let decision = facts.evaluate(state);
    pi.metrics.policy_decision(decision.allowed);
    tracked.update(|f| {
        f.decision = Some(if decision.allowed { "allow" } else { "deny" });
        f.policy = decision.policy.as_ref().map(|p| p.to_string());
    });
    if decision.allowed {
        tracked.set_policy_facts(facts);
    }
    decision
}

/// A proxied stream's copy ended on `e`: recorded, and a stream given up for the node's
/// buffered-bytes budget counted (`buffer_budget`) and logged.
fn copy_failed(pi: &ProxyInputs, tracked: &mut conns::Tracked, e: CopyError) {
    match &e {
        CopyError::OverBudget(over) => {
            refuse!(pi, tracked, Outcome::OverBudget(over.to_string()), error = %over, "tunnel stream reset: the node's buffered-bytes budget is spent, and the stream or its source holds its share (an application or a peer that does not read)");
        }
        _ => tracked.fail(Outcome::Broken(e.to_string())),
    }
}

/// Copies between `tcp` and `other`, both ways, until both directions end or the daemon
/// tells the connection to close. `sent` counts what was read from `tcp`: the client at the
/// source, the application at the destination, as the tunnel's copy counts them.
async fn copy_plain(
    pi: &ProxyInputs,
    place: &mut gate::Permit,
    tracked: &mut conns::Tracked,
    tcp: &mut TcpStream,
    other: &mut TcpStream,
) {
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(tcp, other) => r,
        cause = tracked.told_to_close() => return tracked.closed_by_daemon(cause, &pi.metrics),
        () = place.evicted() => {
            return tracked.closed_by_daemon(conns::CloseCause::Evicted, &pi.metrics)
        }
    };
    match copied {
        Ok((sent, received)) => {
            let b = &tracked.record().bytes;
            b.sent.store(sent, Ordering::Relaxed);
            b.received.store(received, Ordering::Relaxed);
        }
        Err(e) => tracked.fail(Outcome::Broken(e.to_string())),
    }
}

/// One running handler, counted in [`ProxyInputs::inflight`] until dropped (which
/// [`ConnTable::changed`] reports).
struct Inflight(Arc<AtomicUsize>, Arc<ConnTable>);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.notify_changed();
    }
}

/// The listeners of a proxy instance.
pub struct Listeners {
    pub outbound: TcpListener,
    pub inbound: TcpListener,
    pub inbound_plaintext: TcpListener,
    /// The QUIC tunnel endpoint (UDP, the tunnel port), when QUIC is accepted.
    pub quic: Option<QuicListener>,
}

/// The QUIC tunnel endpoint of a set of listeners.
pub enum QuicListener {
    Bound(quinn::Endpoint),
    /// The port is still held by another daemon (a rolling restart: the one draining); the
    /// endpoint is bound once that one lets it go (`inbound_quic.rs`).
    Held {
        netns: Option<Arc<Netns>>,
        addr: SocketAddr,
    },
}

impl QuicListener {
    /// Binds the endpoint on `addr` (inside `netns` when given), or notes that another
    /// daemon holds it.
    pub fn bind(netns: Option<&Arc<Netns>>, addr: SocketAddr) -> std::io::Result<QuicListener> {
        match quic_endpoint(netns.map(|n| &**n), addr) {
            Ok(ep) => Ok(QuicListener::Bound(ep)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(QuicListener::Held {
                netns: netns.cloned(),
                addr,
            }),
            Err(e) => Err(e),
        }
    }
}

impl Listeners {
    /// Binds the three listeners on `ip` (`SO_REUSEPORT`), and the QUIC endpoint when `quic`
    /// ([`QuicListener::bind`]), inside `netns` when given. Needs a runtime context (the
    /// endpoint registers its socket).
    pub fn bind(netns: Option<&Arc<Netns>>, ip: IpAddr, quic: bool) -> std::io::Result<Listeners> {
        use ztunnel_proto::hbone as c;
        let at = |port| crate::net::listen_in(netns.map(|n| &**n), SocketAddr::new(ip, port));
        Ok(Listeners {
            outbound: at(c::OUTBOUND_PORT)?,
            inbound: at(c::HBONE_PORT)?,
            inbound_plaintext: at(c::INBOUND_PLAINTEXT_PORT)?,
            quic: if quic {
                Some(QuicListener::bind(
                    netns,
                    SocketAddr::new(ip, c::HBONE_PORT),
                )?)
            } else {
                None
            },
        })
    }
}

/// The QUIC tunnel endpoint on `addr` (UDP), inside `netns` when given.
pub fn quic_endpoint(netns: Option<&Netns>, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    crate::hbone::quic::endpoint(
        netns,
        addr,
        Some(crate::hbone::consts::SOCKET_MARK),
        Some(crate::hbone::quic::placeholder_server_config()),
    )
}

/// Runs the accept loops until the daemon drains.
pub async fn serve(pi: Arc<ProxyInputs>, scope: Scope, l: Listeners) {
    let quic = {
        let (pi, scope) = (pi.clone(), scope.clone());
        async move {
            if let Some(q) = l.quic {
                inbound_quic::serve_listener(pi, scope, q).await
            }
        }
    };
    tokio::join!(
        quic,
        accept_loop(
            pi.clone(),
            scope.clone(),
            l.outbound,
            "outbound",
            outbound::handle
        ),
        accept_loop(
            pi.clone(),
            scope.clone(),
            l.inbound,
            "inbound",
            inbound::handle
        ),
        accept_loop(
            pi.clone(),
            scope,
            l.inbound_plaintext,
            "inbound_plaintext",
            inbound_plain::handle
        ),
    );
}

/// Runs only the outbound listener (benchmarks).
pub async fn serve_outbound(pi: Arc<ProxyInputs>, listener: TcpListener) {
    accept_loop(pi, Scope::Node, listener, "outbound", outbound::handle).await
}

/// Runs only the inbound tunnel listener (benchmarks, and nodes that only receive).
pub async fn serve_inbound(pi: Arc<ProxyInputs>, listener: TcpListener) {
    accept_loop(pi, Scope::Node, listener, "inbound", inbound::handle).await
}

/// Runs only the inbound QUIC tunnel endpoint (benchmarks).
pub async fn serve_inbound_quic(pi: Arc<ProxyInputs>, endpoint: quinn::Endpoint) {
    inbound_quic::serve(pi, Scope::Node, endpoint).await
}

async fn accept_loop<F, Fut>(
    pi: Arc<ProxyInputs>,
    scope: Scope,
    listener: TcpListener,
    name: &'static str,
    handle: F,
) where
    F: Fn(Arc<ProxyInputs>, Scope, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let _ = crate::net::keepalive(&tcp);
                    let guard = pi.begin();
                    let fut = handle(pi.clone(), scope.clone(), tcp, peer);
                    tokio::spawn(crate::task::guarded(fut, guard));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    crate::warn_throttled!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = pi.drained() => {
                tracing::info!(listener = name, "stopped accepting (draining)");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The size of the future that a handler of four arguments returns.
    fn future_size4<A, B, C, D, F: std::future::Future>(_: impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The size of the future that a handler of six arguments returns.
    fn future_size6<A, B, C, D, E, G, F: std::future::Future>(
        _: impl Fn(A, B, C, D, E, G) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    /// Each proxied connection holds its handler's future for its whole life (see
    /// `crate::task`): these budgets keep a large short-lived step from being inlined into it.
    #[test]
    fn handlers_futures_stay_small() {
        let outbound = future_size4(super::outbound::handle);
        let inbound = future_size6(super::inbound::stream);
        let inbound_quic = future_size4(super::inbound_quic::stream);
        assert!(outbound <= 2048, "outbound handler: {outbound} bytes");
        assert!(inbound <= 2048, "inbound stream handler: {inbound} bytes");
        assert!(
            inbound_quic <= 2560,
            "inbound QUIC stream handler: {inbound_quic} bytes"
        );
    }
}
