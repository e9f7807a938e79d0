//! Inbound tunnel: mutual-TLS HBONE connections on 15008.
//!
//! The destination workload is the local workload owning the connection's local address; the
//! TLS handshake presents its certificate and requires a client certificate from our trust
//! domain, whose SPIFFE ID is the source identity. Each CONNECT is validated
//! ([`crate::hbone::server::validate`]), then the application is connected and only then `200`
//! is sent. The policy engine judges each stream first (source identity from the peer
//! certificate): a denial is answered `401`, so the application never sees the connection.
//! Before any TLS, a connection must find a place among the pending handshakes
//! ([`crate::gate`]), which are shared fairly between source addresses, or it is reset. It
//! keeps that place until its TLS and HTTP/2 handshakes are both done, unless the gate gives it
//! to a newcomer from an address holding fewer places (the connection is then dropped,
//! `inbound_handshake_evicted`). It must send its first TLS bytes within the first-bytes
//! timeout ([`super::TunnelLimits`], 2 s by default; else it is reset,
//! `inbound_tls_first_bytes_timeout`) and finish both handshakes within [`HANDSHAKE_TIMEOUT`]
//! of being accepted. A few addresses opening silent connections thus hold places for
//! seconds, not ten, and keep out no peer from elsewhere. Refusals are answered with their
//! status, counted and logged; a stream that a later policy change denies is reset. A peer
//! whose chain the revocation lists revoke ([`crate::identity::crl`]) fails its handshake;
//! lists that come to revoke it end its connection as on drain, close its open streams and
//! refuse new ones (`401`). The warnings that a peer can provoke before it has authenticated
//! are throttled ([`crate::throttle`]); the counts never are.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::conns::{ConnFacts, Direction, PolicyFacts, Tracked};
use super::outcome::{refuse, Outcome};
use super::peers::{PeerConn, PeerStream};
use super::{plan, reset, ProxyInputs, Scope};
use crate::discovery::Workload;
use crate::hbone::answer::Answer;
use crate::hbone::copy_tunnel;
use crate::hbone::outflow::{Metered, Outflow};
use crate::hbone::server::{self, ServerConn};
use crate::identity::crl::{PeerChain, Usage};
use crate::identity::{self, Identity, WorkloadCert};
use crate::metrics::End;
use crate::refusal::Reason;

/// A peer that has not finished its TLS and HTTP/2 handshakes by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An authenticated tunnel peer: its address, identity and the chain it presented, the local
/// workload it reached, and its connection's place among what peers hold ([`super::peers`]).
pub(super) struct Peer {
    pub(super) addr: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) identity: Identity,
    pub(super) chain: Arc<PeerChain>,
    pub(super) dst: Arc<Workload>,
    pub(super) dst_identity: Identity,
    pub(super) place: PeerConn,
}

/// Who a tunnel connection's handshake authenticated, and the local workload it reached.
pub(super) struct Handshake {
    pub(super) addr: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) identity: Identity,
    pub(super) chain: PeerChain,
    pub(super) dst: Arc<Workload>,
    pub(super) dst_identity: Identity,
}

impl Peer {
    /// The peer's connection after its handshakes, if its caps allow one more: else `None`
    /// (counted and logged), and the caller closes the connection.
    pub(super) fn admit(pi: &ProxyInputs, h: Handshake) -> Option<Peer> {
        match pi.peers.connect(h.addr.ip(), &h.identity) {
            Ok(place) => Some(Peer {
                addr: h.addr,
                local: h.local,
                identity: h.identity,
                chain: Arc::new(h.chain),
                dst: h.dst,
                dst_identity: h.dst_identity,
                place,
            }),
            Err(over) => {
                crate::refused!(pi.metrics, over.reason(), peer = %h.addr, src = %h.identity, error = %over, "tunnel connection closed: over the peer's cap");
                None
            }
        }
    }

    /// A place for a new stream of this peer's, if the revocation lists still trust its chain
    /// (else `401`) and its caps allow one more (else `429`); a refusal is counted, logged and
    /// recorded.
    pub(super) fn stream_place(
        &self,
        pi: &ProxyInputs,
        tracked: &mut Tracked,
    ) -> Result<PeerStream, StatusCode> {
        if !tracked.set_peer(&self.chain) {
            refuse!(pi, tracked, Outcome::PeerRevoked, peer = %self.addr, src = %self.identity, "tunnel stream refused: a revocation list revokes the peer's certificate; 401");
            return Err(Reason::InboundPeerRevoked
                .status()
                .unwrap_or(StatusCode::UNAUTHORIZED));
        }
        self.place.stream().map_err(|over| {
            refuse!(pi, tracked, Outcome::OverPeerCap(over), peer = %self.addr, src = %self.identity, error = %over, "tunnel stream refused: over the peer's cap; 429");
            over.reason().status().unwrap_or(StatusCode::TOO_MANY_REQUESTS)
        })
    }
}

pub(super) async fn handle(pi: Arc<ProxyInputs>, scope: Scope, tcp: TcpStream, peer: SocketAddr) {
    let accepted = Instant::now();
    let Ok(local) = tcp.local_addr() else { return };
    let mut admitted = match pi.handshakes.try_admit(peer.ip()) {
        Ok(permit) => permit,
        Err(full) => {
            crate::refused!(pi.metrics, Reason::InboundHandshakeLimit, %peer, error = %full, "tunnel connection refused before its handshake");
            return reset(tcp);
        }
    };
    // Until both handshakes are done the connection holds a place, which the gate may give to
    // a newcomer from a source holding fewer: then the connection is dropped.
    let handshakes = handshakes(&pi, &scope, tcp, peer, local, accepted);
    let (h2, conn, shared) = tokio::select! {
        done = handshakes => match done {
            Some(done) => done,
            None => return,
        },
        _ = admitted.evicted() => {
            crate::refused!(pi.metrics, Reason::InboundHandshakeEvicted, %peer, "tunnel connection dropped during its handshake: its place went to a peer from an address holding fewer");
            return;
        }
    };
    drop(admitted);
    pi.metrics.hbone_connections_accepted.inc();
    let conn = Arc::new(conn);
    // A connection whose peer the revocation lists come to revoke ends as on drain: no new
    // stream, and its open ones are closed ([`super::conns::ConnTable::revoke`]).
    let drained = {
        let (pi, conn) = (pi.clone(), conn.clone());
        async move {
            tokio::select! {
                () = pi.drained() => {}
                () = conn.chain.until_revoked() => revoked(&conn),
            }
        }
    };
    let idle = pi.pool.serve_idle_timeout();
    let admitted = {
        let shared = shared.clone();
        async move { shared.admitted().await }
    };
    let result = server::serve(h2, idle, drained, admitted, |req, respond| {
        let guard = pi.begin();
        let (conn, shared) = (conn.clone(), shared.clone());
        let fut = stream(pi.clone(), scope.clone(), conn, shared, req, respond);
        crate::task::guarded(fut, guard)
    })
    .await;
    if let Err(e) = result {
        http2_ended(&pi, peer, &conn.identity, e);
    }
}

/// A tunnel connection after both handshakes: its HTTP/2 server side, who it is, and what its
/// streams share ([`ServerConn`]).
type Handshaken = (
    h2::server::Connection<Metered<tokio_rustls::server::TlsStream<TcpStream>>, Bytes>,
    Peer,
    Arc<ServerConn>,
);

/// The TLS and HTTP/2 handshakes of a tunnel connection accepted at `accepted`: the first TLS
/// bytes within the first-bytes timeout, both handshakes within [`HANDSHAKE_TIMEOUT`].
/// `None` when the connection was refused (counted and logged here).
async fn handshakes(
    pi: &ProxyInputs,
    scope: &Scope,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    accepted: Instant,
) -> Option<Handshaken> {
    let state = pi.discovery.current();
    let Some(dst) = scope.destination(pi, &state, local) else {
        crate::refused!(pi.metrics, Reason::InboundUnknownDestination, %peer, %local, "tunnel connection to an address of no local workload; refused");
        reset(tcp);
        return None;
    };
    drop(state);
    // One deadline for both handshakes: a peer must not hold a connection by authenticating
    // and then never sending the HTTP/2 preface.
    let deadline = accepted + HANDSHAKE_TIMEOUT;
    // A silent peer is let go long before that. The bytes are peeked, not read: rustls reads
    // them as if nothing had looked. An EOF or an error is left to the TLS handshake to report.
    let first_bytes = (accepted + pi.tls_first_bytes_timeout).min(deadline);
    if tokio::time::timeout_at(first_bytes, tcp.peek(&mut [0u8; 1]))
        .await
        .is_err()
    {
        crate::refused!(pi.metrics, Reason::InboundTlsFirstBytesTimeout, %peer, "tunnel connection sent no TLS bytes in time; closed");
        reset(tcp);
        return None;
    }
    let dst_identity = pi.identity_of(&dst);
    let Some(cert) = destination_cert(pi, &dst_identity, deadline).await else {
        reset(tcp);
        return None;
    };
    let acceptor = TlsAcceptor::from(cert.server_config());
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) if crate::identity::crl::is_revoked_io(&e) => {
            crate::refused!(pi.metrics, Reason::InboundPeerRevoked, %peer, error = %e, "tunnel TLS handshake failed: a revocation list revokes the peer's certificate");
            return None;
        }
        Ok(Err(e)) => {
            crate::refused!(pi.metrics, Reason::InboundTlsHandshake, %peer, error = %e, "tunnel TLS handshake failed");
            return None;
        }
        Err(_) => {
            crate::refused!(pi.metrics, Reason::InboundTlsTimeout, %peer, "tunnel TLS handshake timed out");
            return None;
        }
    };
    let presented = tls.get_ref().1.peer_certificates().unwrap_or(&[]);
    let src = match identity::peer_identity(presented, &pi.trust_domain) {
        Ok(id) => id,
        Err(e) => {
            // The handshake's verifier has read the same identity: this is a second line.
            crate::refused!(pi.metrics, Reason::InboundTlsHandshake, %peer, error = %e, "tunnel peer identity unreadable; refused");
            return None;
        }
    };
    let chain = cert.peer_chain(presented, Usage::Client);
    let outflow = Outflow::new(pi.budget.clone(), peer.ip());
    let tls = Metered::new(tls, outflow.clone());
    let h2 = match tokio::time::timeout_at(deadline, server::handshake(tls, pi.max_streams)).await {
        Ok(Ok(h2)) => h2,
        Ok(Err(e)) => {
            http2_ended(pi, peer, &src, e);
            return None;
        }
        Err(_) => {
            crate::refused!(pi.metrics, Reason::InboundHttp2Timeout, %peer, %src, "tunnel HTTP/2 handshake timed out");
            return None;
        }
    };
    let conn = Peer::admit(
        pi,
        Handshake {
            addr: peer,
            local,
            identity: src,
            chain,
            dst,
            dst_identity,
        },
    )?;
    Some((h2, conn, ServerConn::new(outflow)))
}

/// The certificate of a tunnel connection's destination, `dst`, if it comes by `deadline` (a
/// CA that does not answer holds no handshake place for longer); else `None`, the refusal
/// counted and logged. Either transport.
pub(super) async fn destination_cert(
    pi: &ProxyInputs,
    dst: &Identity,
    deadline: Instant,
) -> Option<Arc<WorkloadCert>> {
    match tokio::time::timeout_at(deadline, pi.certs.fetch(dst)).await {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            crate::refused!(pi.metrics, Reason::InboundNoCertificate, identity = %dst, error = %e, "no certificate; tunnel refused");
            None
        }
        Err(_) => {
            crate::refused!(pi.metrics, Reason::InboundNoCertificate, identity = %dst, "no certificate within the handshake's deadline; tunnel refused");
            None
        }
    }
}

/// Logs that a tunnel connection ends because a revocation list now revokes its peer's
/// certificate (its streams are counted as they are closed). Either transport.
pub(super) fn revoked(peer: &Peer) {
    tracing::warn!(peer = %peer.addr, src = %peer.identity, "tunnel connection closed: a revocation list revokes the peer's certificate");
}

/// A tunnel connection's HTTP/2 ended on an error.
fn http2_ended(pi: &ProxyInputs, peer: SocketAddr, src: &Identity, e: h2::Error) {
    if e.is_io() {
        // The peer went away (reset, closed mid-frame): not a refusal.
        tracing::debug!(%peer, error = %e, "tunnel connection ended with an error");
    } else {
        // A protocol violation (a garbled frame or preface, a flow-control or header-size
        // breach) answered with GOAWAY, or one the peer reported: the connection is closed.
        crate::refused!(pi.metrics, Reason::InboundHttp2Error, %peer, %src, error = %e, "tunnel connection closed on an HTTP/2 error");
    }
}

/// An HTTP/2 tunnel stream's handler: [`serve_stream`], the one future the stream's task
/// holds (see `crate::task`). It runs in that task: nothing of it runs in the connection's
/// own loop ([`server::serve`]).
pub(super) fn stream(
    pi: Arc<ProxyInputs>,
    scope: Scope,
    peer: Arc<Peer>,
    conn: Arc<ServerConn>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> impl Future<Output = ()> + Send + 'static {
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts, ());
    let answer = Answer::H2 {
        respond,
        body,
        conn,
    };
    serve_stream(pi, scope, peer, None, req, answer)
}

/// A stream's record and its place among what its peer holds ([`Peer::stream_place`]).
pub(super) type Placed = (Tracked, PeerStream);

/// Serves a tunnel request received on either transport: tracked and given its place first,
/// unless `placed` already holds both (QUIC takes them before it reads the request); refused
/// when there is no place; else decided ([`admit`]), answered, and once admitted its stream
/// copied to the application until either side ends or the daemon closes it.
///
/// An `async` block rather than an `async fn`, which would keep a second copy of its
/// arguments for the stream's whole life (see `crate::task`); `placed` is filled in place
/// for the same reason.
#[allow(clippy::manual_async_fn)]
pub(super) fn serve_stream(
    pi: Arc<ProxyInputs>,
    scope: Scope,
    peer: Arc<Peer>,
    mut placed: Option<Placed>,
    req: Request<()>,
    answer: Answer,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        if placed.is_none() {
            let mut tracked = track(&pi, &peer);
            match peer.stream_place(&pi, &mut tracked) {
                Ok(place) => placed = Some((tracked, place)),
                Err(status) => return answer.refuse(status).await,
            }
        }
        let Some((tracked, _place)) = placed.as_mut() else {
            return;
        };
        let app = match Box::pin(admit(&pi, &scope, &peer, &req, tracked)).await {
            Ok(app) => app,
            Err(status) => return answer.refuse(status).await,
        };
        // Its headers are not needed while the stream lasts.
        drop(req);
        let stream = match answer.accept(ok_response(&pi, &peer)).await {
            Ok(stream) => stream,
            Err(e) => return tracked.fail(Outcome::Failed(e.to_string())),
        };
        tracked.report();
        let (rd, wr) = app.into_split();
        let (bytes, holding) = (&tracked.record().bytes, pi.budget.holding(peer.addr.ip()));
        tokio::select! {
            r = copy_tunnel(rd, wr, stream, bytes, holding) => {
                if let Err(e) = r {
                    super::copy_failed(&pi, tracked, e);
                }
            }
            cause = tracked.told_to_close() => tracked.closed_by_daemon(cause, &pi.metrics),
        }
    }
}

/// Starts tracking a stream received from `peer` (either transport).
pub(super) fn track(pi: &ProxyInputs, peer: &Peer) -> Tracked {
    pi.connections.track(
        Direction::Inbound,
        ConnFacts {
            src_addr: Some(peer.addr),
            dst_addr: None,
            src_identity: Some(peer.identity.to_string()),
            dst_identity: Some(peer.dst_identity.to_string()),
            src_workload: None,
            dst_workload: Some(format!("{}/{}", peer.dst.namespace, peer.dst.name)),
            ..Default::default()
        },
    )
}

/// Decides a tunnel request (either transport) and connects the application: validation
/// ([`server::validate`]), the plan ([`plan::inbound`]), then policy, then the connect. `Ok`
/// is the application's connection, and `tracked` has the labels it is reported with once
/// answered `200` ([`Tracked::report`]); `Err` is the status to refuse with, the refusal
/// already logged, counted and recorded. A stream refused after its plan (by policy, or an
/// unreachable application) is reported in Istio's metrics with its flag, the source
/// workload included.
pub(super) async fn admit<B>(
    pi: &ProxyInputs,
    scope: &Scope,
    peer: &Peer,
    req: &Request<B>,
    tracked: &mut Tracked,
) -> Result<TcpStream, StatusCode> {
    let invalid = |reason: Reason, tracked: &mut Tracked| {
        let status = reason.status().unwrap_or(StatusCode::BAD_REQUEST);
        let (uri, method) = (req.uri().to_string(), req.method().as_str());
        refuse!(pi, tracked, Outcome::Refused(reason), src = %peer.identity,
            uri = crate::throttle::shown(&uri), method = crate::throttle::shown(method),
            status = status.as_u16(), "CONNECT refused");
        status
    };
    let connect = match server::validate(req, peer.local.ip()) {
        Ok(t) => t,
        Err(reason) => return Err(invalid(reason, tracked)),
    };
    let state = pi.discovery.current();
    let plan = match plan::inbound(
        &state,
        &pi.cluster_domain,
        &peer.dst,
        peer.local.ip(),
        &connect,
    ) {
        Ok(p) => p,
        Err(reason) => return Err(invalid(reason, tracked)),
    };
    let target = plan.target;
    tracked.update(|f| {
        f.dst_addr = Some(target);
        f.forwarded_for = connect.forwarded_for;
        f.traceparent = connect.traceparent.clone();
    });
    // The source workload: the one at the tunnel peer's address, when its identity agrees.
    let src = state
        .workload_by_ip(peer.addr.ip().to_canonical())
        .filter(|w| w.identity(&pi.trust_domain) == peer.identity)
        .cloned();
    if let Some(w) = &src {
        tracked.update(|f| f.src_workload = Some(format!("{}/{}", w.namespace, w.name)));
    }
    let src_principal = peer.identity.to_string();
    let dst_principal = peer.dst_identity.to_string();
    tracked.label(pi.istio_labels(
        "destination",
        End {
            workload: src.as_deref(),
            principal: Some(&src_principal),
        },
        End {
            workload: Some(&peer.dst),
            principal: Some(&dst_principal),
        },
        plan.service.as_deref(),
        true,
    ));
    let facts = PolicyFacts {
        src_principal: Some(
            src_principal
                .strip_prefix("spiffe://")
                .unwrap_or(&src_principal)
                .to_owned(),
        ),
        src_namespace: Some(peer.identity.namespace().to_owned()),
        src_ip: peer.addr.ip().to_canonical(),
        dst_ip: target.ip().to_canonical(),
        dst_uid: peer.dst.uid.clone(),
        dst_port: target.port(),
    };
    let decision = super::judge(pi, &state, tracked, facts);
    drop(state);
    if !decision.allowed {
        refuse!(pi, tracked, Outcome::DeniedByPolicy, src = %peer.identity, %target,
            policy = ?decision.policy, rule = ?decision.rule, why = ?decision.reason, "denied by policy; 401");
        return Err(Reason::PolicyDenied
            .status()
            .unwrap_or(StatusCode::UNAUTHORIZED));
    }
    pi.metrics.proxied("inbound");
    // The application sees the tunnel peer's address: the source pod's own.
    let origin = scope.app_origin(peer.addr.ip());
    match pi.sockets.connect(target, pi.connect, &origin).await {
        Ok(app) => Ok(app),
        Err(e) => {
            refuse!(pi, tracked, Outcome::AppUnreachable(e.to_string()), %target, error = %e, "application unreachable; 503");
            Err(Reason::InboundAppUnreachable
                .status()
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE))
        }
    }
}

/// The `200` that admits a stream, with the `baggage` of the workload that answers, as Istio's
/// ztunnel sends it.
fn ok_response(pi: &ProxyInputs, peer: &Peer) -> Response<()> {
    Response::builder()
        .status(StatusCode::OK)
        .header(
            crate::hbone::consts::BAGGAGE,
            crate::metrics::baggage(&peer.dst, &pi.cluster_id),
        )
        .body(())
        .unwrap_or_else(|_| Response::new(()))
}
