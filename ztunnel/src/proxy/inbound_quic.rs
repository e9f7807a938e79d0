//! Inbound tunnel over QUIC: connections on UDP 15008 ([`crate::hbone::quic`]).
//!
//! The same contract as the HTTP/2 inbound tunnel ([`super::inbound`]), with the same
//! decisions and the same stream path ([`super::inbound::serve_stream`]): the destination is
//! the local workload owning the address the connection arrived on, and the handshake
//! presents its certificate (chosen per connection) and requires a client certificate of our
//! trust domain; a connection must find a place among the pending handshakes ([`crate::gate`],
//! shared with the HTTP/2 tunnel and fairly between source addresses) or it is refused before
//! any TLS, and it loses that place to a newcomer from an address holding fewer
//! (`inbound_handshake_evicted`) as on HTTP/2.
//! When more than half the places are held, a new connection is first answered with a Retry
//! (`ztunnel_quic_retries_total`): only a peer that receives at its source address comes back
//! with the token and may take a place, so forged source addresses take none.
//! Each stream's header stands for a `CONNECT` and is validated, judged by policy and
//! answered like one; a malformed or late header is `400` (`quic_bad_header`). A connection
//! that breaks the QUIC protocol is counted (`inbound_quic_error`). What a connection may hold
//! unacknowledged for its peer is granted from the node's buffered-bytes budget
//! ([`quic::ServerConn`]). On drain, no new connection
//! is taken (a peer's dial is refused, and it falls back to HTTP/2), a stream opened on a
//! connection already here is refused unprocessed (the peer sends it again on a new
//! connection, as after an HTTP/2 `GOAWAY`), and each connection closes once its streams have
//! ended. A daemon that starts while another still holds the port (a rolling restart) binds
//! it once that one has let it go.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use quinn::{Incoming, RecvStream, SendStream, VarInt};
use tokio::time::Instant;

use super::inbound::{
    destination_cert, revoked, serve_stream, track, Handshake, Peer, HANDSHAKE_TIMEOUT,
};
use super::outcome::{refuse, Outcome};
use super::{ProxyInputs, QuicListener, Scope};
use crate::hbone::answer::Answer;
use crate::hbone::quic;
use crate::hbone::server::Idle;
use crate::identity;
use crate::identity::crl::Usage;
use crate::refusal::Reason;

/// Binds the endpoint if another daemon held it (trying again every [`REBIND`] until it is
/// free, or the daemon drains), then serves it ([`serve`]).
pub(super) async fn serve_listener(pi: Arc<ProxyInputs>, scope: Scope, listener: QuicListener) {
    let endpoint = match listener {
        QuicListener::Bound(ep) => ep,
        QuicListener::Held { netns, addr } => {
            tracing::info!(%addr, "the QUIC tunnel port is held by another daemon (draining?); QUIC tunnels are taken here once it lets it go");
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(REBIND) => {}
                    _ = pi.drained() => return,
                }
                match super::quic_endpoint(netns.as_deref(), addr) {
                    Ok(ep) => {
                        tracing::info!(%addr, "QUIC tunnel port bound");
                        break ep;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "cannot bind the QUIC tunnel port; tunnels here are taken on HTTP/2 only");
                        return;
                    }
                }
            }
        }
    };
    serve(pi, scope, endpoint).await
}

/// Accepts QUIC tunnel connections on `endpoint` until the daemon drains, then refuses them.
/// When the task is dropped (its pod left the mesh, or the drain is over), the endpoint and
/// its connections are closed.
pub(super) async fn serve(pi: Arc<ProxyInputs>, scope: Scope, endpoint: quinn::Endpoint) {
    struct CloseOnDrop(quinn::Endpoint);
    impl Drop for CloseOnDrop {
        fn drop(&mut self) {
            self.0.close(VarInt::from_u32(0), b"stopped");
        }
    }
    let Ok(bound) = endpoint.local_addr() else {
        return;
    };
    let _guard = CloseOnDrop(endpoint.clone());
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    let inflight = pi.begin();
                    let fut = connection(pi.clone(), scope.clone(), incoming, bound);
                    tokio::spawn(crate::task::guarded(fut, inflight));
                }
                None => return,
            },
            _ = pi.drained() => {
                tracing::info!(listener = "inbound_quic", "stopped accepting (draining)");
                break;
            }
        }
    }
    // Draining: a dial is refused (CONNECTION_REFUSED), so that the peer falls back to
    // HTTP/2 at once for that dial (it would wait for a timeout on a silent port, and then
    // keep off QUIC for a while); the connections already here finish their streams.
    while let Some(incoming) = endpoint.accept().await {
        incoming.refuse();
    }
}

/// How often a daemon tries to bind a QUIC port another daemon holds: short, since a peer
/// that dials in the gap between the old daemon's exit and the bind gets no answer, and
/// keeps off QUIC for a while ([`crate::hbone::pool::QUIC_RETRY_AFTER`]).
const REBIND: Duration = Duration::from_millis(100);

/// Whether new QUIC connections must prove their address before they take a place: the
/// pending handshakes are more than half full.
fn under_load(pi: &ProxyInputs) -> bool {
    pi.handshakes.held() * 2 > pi.handshakes.limits().total
}

async fn connection(pi: Arc<ProxyInputs>, scope: Scope, incoming: Incoming, bound: SocketAddr) {
    let addr = incoming.remote_address();
    // A datagram's source is easily forged: under load, a new connection is answered with a
    // Retry, and only the Initial that comes back with its token (so from a peer that
    // receives at that address) may take a place.
    let incoming = if !incoming.remote_address_validated() && under_load(&pi) {
        match incoming.retry() {
            Ok(()) => {
                pi.metrics.quic_retries.inc();
                return;
            }
            // Not allowed (it already answered a Retry): judged as any other.
            Err(e) => e.into_incoming(),
        }
    } else {
        incoming
    };
    let mut admitted = match pi.handshakes.try_admit(addr.ip()) {
        Ok(permit) => permit,
        Err(full) => {
            crate::refused!(pi.metrics, Reason::InboundHandshakeLimit, peer = %addr, error = %full, "QUIC tunnel connection refused before its handshake");
            return incoming.refuse();
        }
    };
    let Some(local_ip) = incoming
        .local_ip()
        .or_else(|| (!bound.ip().is_unspecified()).then_some(bound.ip()))
    else {
        crate::refused!(pi.metrics, Reason::InboundUnknownDestination, peer = %addr, "QUIC tunnel connection to an unknown local address; refused");
        return incoming.refuse();
    };
    let local = SocketAddr::new(local_ip, bound.port());
    let state = pi.discovery.current();
    let Some(dst) = scope.destination(&pi, &state, local) else {
        crate::refused!(pi.metrics, Reason::InboundUnknownDestination, peer = %addr, %local, "QUIC tunnel connection to an address of no local workload; refused");
        return incoming.refuse();
    };
    drop(state);
    let dst_identity = pi.identity_of(&dst);
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let Some(cert) = destination_cert(&pi, &dst_identity, deadline).await else {
        return incoming.refuse();
    };
    let config = match quic::server_config(&cert.server_config(), pi.max_streams) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            crate::refused!(pi.metrics, Reason::InboundNoCertificate, identity = %dst_identity, error = %e, "no QUIC configuration; tunnel refused");
            return incoming.refuse();
        }
    };
    let handshake = async {
        match incoming.accept_with(config) {
            Ok(connecting) => connecting.await,
            Err(e) => Err(e),
        }
    };
    let handshake = async {
        tokio::select! {
            done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => Some(done),
            _ = admitted.evicted() => None,
        }
    };
    let conn = match handshake.await {
        None => {
            // The dropped handshake closes the connection.
            crate::refused!(pi.metrics, Reason::InboundHandshakeEvicted, peer = %addr, "QUIC tunnel connection dropped during its handshake: its place went to a peer from an address holding fewer");
            return;
        }
        Some(Ok(Ok(c))) => c,
        Some(Ok(Err(e))) if crate::identity::crl::is_revoked_quic(&e) => {
            crate::refused!(pi.metrics, Reason::InboundPeerRevoked, peer = %addr, error = %e, "QUIC tunnel handshake failed: a revocation list revokes the peer's certificate");
            return;
        }
        Some(Ok(Err(e))) => {
            crate::refused!(pi.metrics, Reason::InboundTlsHandshake, peer = %addr, error = %e, "QUIC tunnel handshake failed");
            return;
        }
        Some(Err(_)) => {
            crate::refused!(pi.metrics, Reason::InboundTlsTimeout, peer = %addr, "QUIC tunnel handshake timed out");
            return;
        }
    };
    drop(admitted);
    let presented = quic::peer_certificates(&conn);
    let identity = match identity::peer_identity(&presented, &pi.trust_domain) {
        Ok(id) => id,
        Err(e) => {
            // The handshake's verifier has read the same identity: this is a second line.
            crate::refused!(pi.metrics, Reason::InboundTlsHandshake, peer = %addr, error = %e, "QUIC tunnel peer identity unreadable; refused");
            conn.close(VarInt::from_u32(1), b"identity");
            return;
        }
    };
    let chain = cert.peer_chain(&presented, Usage::Client);
    let handshake = Handshake {
        addr,
        local,
        identity,
        chain,
        dst,
        dst_identity,
    };
    let Some(peer) = Peer::admit(&pi, handshake) else {
        conn.close(VarInt::from_u32(1), b"peer limit");
        return;
    };
    pi.metrics.quic_connections_accepted.inc();
    let served = quic::ServerConn::new(conn.clone(), pi.budget.clone(), addr.ip());
    let peer = Arc::new(peer);
    // As on HTTP/2 (`hbone::server::serve`): no stream started for this long and none open,
    // and the connection is closed.
    let idle = pi.pool.serve_idle_timeout();
    let mut streams = Idle::new(idle, Instant::now());
    let idle_check = tokio::time::sleep(idle);
    tokio::pin!(idle_check);
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let inflight = pi.begin();
                    let opened = (send, recv, served.clone());
                    let fut = stream(pi.clone(), scope.clone(), peer.clone(), opened);
                    let held = streams.start(Instant::now());
                    tokio::spawn(crate::task::guarded(fut, (inflight, held)));
                }
                Err(e) => {
                    use quinn::ConnectionError as E;
                    match e {
                        E::ApplicationClosed(_) | E::LocallyClosed | E::TimedOut | E::Reset => {
                            tracing::debug!(peer = %addr, error = %e, "QUIC tunnel connection ended")
                        }
                        _ => {
                            crate::refused!(pi.metrics, Reason::InboundQuicError, peer = %addr, src = %peer.identity, error = %e, "QUIC tunnel connection closed on an error");
                        }
                    }
                    return;
                }
            },
            _ = &mut idle_check => match streams.check(Instant::now()) {
                Some(later) => idle_check.as_mut().reset(later),
                None => {
                    tracing::debug!(peer = %addr, ?idle, "idle QUIC tunnel connection closed");
                    conn.close(VarInt::from_u32(0), b"idle");
                    return;
                }
            },
            _ = pi.drained() => break,
            // Ends as on drain: no new stream, and the open ones are closed
            // ([`super::conns::ConnTable::revoke`]).
            _ = peer.chain.until_revoked() => {
                revoked(&peer);
                break;
            }
        }
    }
    // Draining: the peer gets no more stream credit, and the streams it opens from now on
    // are refused unprocessed, so that it sends them again on a new connection; this one
    // closes once its open streams have ended.
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(0));
    loop {
        tokio::select! {
            () = streams.all_closed() => break,
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => quic::refuse_unprocessed(send, recv),
                Err(_) => return,
            },
        }
    }
    conn.close(VarInt::from_u32(0), b"draining");
}

/// A QUIC tunnel stream's handler, given the stream's halves and its connection.
pub(super) async fn stream(
    pi: Arc<ProxyInputs>,
    scope: Scope,
    peer: Arc<Peer>,
    (mut send, mut recv, conn): (SendStream, RecvStream, Arc<quic::ServerConn>),
) {
    let mut tracked = track(&pi, &peer);
    let place = match peer.stream_place(&pi, &mut tracked) {
        Ok(place) => place,
        Err(status) => {
            let _ = quic::respond(&mut send, &mut recv, status).await;
            return;
        }
    };
    let req = match quic::read_header(&mut recv)
        .await
        .map(|h| quic::request_of(&h))
    {
        Ok(Some(req)) => req,
        Ok(None) | Err(_) => {
            refuse!(pi, tracked, Outcome::QuicBadHeader, src = %peer.identity, "{}; 400", Outcome::QuicBadHeader);
            let status = Reason::QuicBadHeader
                .status()
                .unwrap_or(StatusCode::BAD_REQUEST);
            let _ = quic::respond(&mut send, &mut recv, status).await;
            return;
        }
    };
    let answer = Answer::Quic { send, recv, conn };
    serve_stream(pi, scope, peer, Some((tracked, place)), req, answer).await
}
