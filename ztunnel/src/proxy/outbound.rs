//! Outbound: a captured connection of a local workload, redirected to 15001.
//!
//! A pod holds a place among the node's proxied connections while its connection lasts
//! ([`ProxyInputs::sources`], under the pod's own address whatever the connection's source
//! address is, [`Scope::source_key`]); over its cap the connection is reset at once. Original
//! destination from `SO_ORIGINAL_DST`; source workload from the [`Scope`]; the
//! [`plan`](super::plan) decides HBONE (to the endpoint's 15008, with the source's certificate
//! and the destination's expected identity) or passthrough (plain TCP outside the mesh). A
//! connection that cannot be carried is reset and counted; it is never sent in plaintext to a
//! mesh workload. Its warning is throttled ([`crate::throttle`]): an application retrying in a
//! loop must not flood the node's log.
//!
//! Bytes the client writes before its stream is open (up to 64 KiB) are sent right behind the
//! `CONNECT` ([`Early`]): they go only to the peer whose identity the TLS handshake checked,
//! and that peer forwards them only if it answers `200` (a denied or failed stream discards
//! them), so nothing reaches an application earlier than before, only sooner.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::conns::{CloseCause, ConnFacts, Direction, Tracked};
use super::outcome::{refuse, Outcome};
use super::plan::{self, Plan};
use super::{reset, ProxyInputs, Scope};
use crate::hbone::copy_tunnel;
use crate::hbone::early::Early;
use crate::hbone::pool::{PoolKey, Tunnel};
use crate::hbone::ConnectHeaders;
use crate::metrics::End;
use crate::refusal::Reason;

pub(super) async fn handle(pi: Arc<ProxyInputs>, scope: Scope, tcp: TcpStream, peer: SocketAddr) {
    let mut place = match pi.sources.try_admit(scope.source_key(peer.ip())) {
        Ok(place) => place,
        Err(full) => {
            crate::refused!(pi.metrics, Reason::OutboundSourceLimit, %peer, error = %full, "outbound connection refused: its pod, or the node's pods, have as many proxied as allowed");
            return reset(tcp);
        }
    };
    // The setup is boxed (see `crate::task`): a dial's handshakes make its state large, and
    // only the copy lasts as long as the connection.
    let open = match Box::pin(open(&pi, &scope, tcp, peer)).await {
        Ok(open) => open,
        Err(refused) => return reset(refused),
    };
    match open {
        Open::Passthrough {
            mut tcp,
            mut upstream,
            mut tracked,
        } => super::copy_plain(&pi, &mut place, &mut tracked, &mut tcp, &mut upstream).await,
        Open::Hbone {
            tcp,
            tunnel,
            mut tracked,
        } => {
            let (rd, wr) = tcp.into_split();
            let (bytes, holding) = (
                &tracked.record().bytes,
                pi.budget.holding(scope.source_key(peer.ip())),
            );
            tokio::select! {
                r = copy_tunnel(rd, wr, tunnel.stream, bytes, holding) => {
                    if let Err(e) = r {
                        super::copy_failed(&pi, &mut tracked, e);
                    }
                }
                cause = tracked.told_to_close() => tracked.closed_by_daemon(cause, &pi.metrics),
                () = place.evicted() => tracked.closed_by_daemon(CloseCause::Evicted, &pi.metrics),
            }
            drop(tunnel.lease);
        }
    }
}

/// A connection ready to be copied: its plan carried out up to the first byte.
enum Open {
    Passthrough {
        tcp: TcpStream,
        upstream: TcpStream,
        tracked: Tracked,
    },
    Hbone {
        tcp: TcpStream,
        tunnel: Tunnel,
        tracked: Tracked,
    },
}

/// Plans the connection and carries the plan out: the upstream connected, or the tunnel's
/// stream open with the client's first bytes sent. `Err` gives the client's connection back
/// when it was refused (counted and logged), to be reset.
async fn open(
    pi: &ProxyInputs,
    scope: &Scope,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<Open, TcpStream> {
    let orig = match pi.sockets.original_dst(&tcp) {
        Ok(a) => a,
        Err(e) => {
            crate::refused!(pi.metrics, Reason::OutboundNoOriginalDst, %peer, error = %e, "outbound connection was not redirected; refused");
            return Err(tcp);
        }
    };
    if tcp.local_addr().is_ok_and(|l| same_addr(l, orig)) {
        // Not redirected: it came to this listener directly (loopback is never captured), and
        // its original destination is the listener itself; passed through, it would come
        // back here again, and again.
        crate::refused!(pi.metrics, Reason::OutboundNoOriginalDst, %peer, dst = %orig, "outbound connection was not redirected (it is to the outbound listener itself); refused");
        return Err(tcp);
    }
    let state = pi.discovery.current();
    let Some(src) = scope.workload(pi, &state, peer) else {
        crate::refused!(pi.metrics, Reason::OutboundUnknownSource, %peer, dst = %orig, "outbound connection from an unknown workload; refused");
        return Err(tcp);
    };
    let src_id = pi.identity_of(&src);
    let plan = plan::outbound(&state, &src, orig, &mut |n| pi.pick(n));
    // What Istio's telemetry reports of the destination: the workload reached, and the
    // service when the destination was its VIP.
    let service = state.service_by_vip(orig.ip().to_canonical()).cloned();
    let dst_workload = match &plan {
        Ok(Plan::Hbone { dst_workload, .. }) => Some(dst_workload.clone()),
        Ok(Plan::Passthrough { dst_addr }) => {
            state.workload_by_ip(dst_addr.ip().to_canonical()).cloned()
        }
        Err(_) => None,
    };
    drop(state);
    let src_principal = src_id.to_string();
    let dst_principal = dst_workload
        .as_deref()
        .map(|w| pi.identity_of(w).to_string());
    let mutual_tls = matches!(plan, Ok(Plan::Hbone { .. }));
    let labels = pi.istio_labels(
        "source",
        End {
            workload: Some(&src),
            principal: mutual_tls.then_some(src_principal.as_str()),
        },
        End {
            workload: dst_workload.as_deref(),
            principal: dst_principal.as_deref(),
        },
        service.as_deref(),
        mutual_tls,
    );
    let mut tracked = pi.connections.track(
        match plan {
            Ok(Plan::Passthrough { .. }) => Direction::Passthrough,
            _ => Direction::Outbound,
        },
        ConnFacts {
            src_addr: Some(peer),
            dst_addr: Some(orig),
            src_identity: Some(src_id.to_string()),
            src_workload: Some(format!("{}/{}", src.namespace, src.name)),
            ..Default::default()
        },
    );
    tracked.label(labels);
    let plan = match plan {
        Ok(p) => p,
        Err(e) => {
            refuse!(pi, tracked, Outcome::NoRoute(e.to_string()), %peer, dst = %orig, error = %e, "no route; refused");
            return Err(tcp);
        }
    };
    match plan {
        Plan::Passthrough { dst_addr } => {
            pi.metrics.proxied("passthrough");
            let upstream = match pi
                .sockets
                .connect(dst_addr, pi.connect, &scope.peer_origin())
                .await
            {
                Ok(u) => u,
                Err(e) => {
                    tracked.fail(Outcome::PassthroughUnreachable(e.to_string()));
                    return Err(tcp);
                }
            };
            tracked.report();
            Ok(Open::Passthrough {
                tcp,
                upstream,
                tracked,
            })
        }
        Plan::Hbone {
            dst_workload,
            dst_addr,
            tunnel_addr,
            expected_identity,
            ..
        } => {
            tracked.update(|f| {
                f.dst_addr = Some(dst_addr);
                f.dst_identity = Some(expected_identity.to_string());
                f.dst_workload = Some(format!("{}/{}", dst_workload.namespace, dst_workload.name));
            });
            pi.metrics.proxied("outbound");
            // A CA that does not answer holds the connection no longer than a connect would.
            let fetched = tokio::time::timeout(pi.connect.timeout, pi.certs.fetch(&src_id)).await;
            let fetched = fetched.unwrap_or_else(|_| {
                Err(crate::identity::Error::Certificate(format!(
                    "none within {:?}",
                    pi.connect.timeout
                )))
            });
            let cert = match fetched {
                Ok(c) => c,
                Err(e) => {
                    refuse!(pi, tracked, Outcome::NoCertificate(e.to_string()), identity = %src_id, error = %e, "no certificate; refused");
                    return Err(tcp);
                }
            };
            let traceparent = crate::hbone::new_traceparent();
            tracked.update(|f| f.traceparent = Some(traceparent.clone()));
            let headers = ConnectHeaders {
                forwarded_for: Some(peer),
                forwarded_host: service
                    .as_deref()
                    .map(|s| crate::metrics::hostname(s, &pi.cluster_domain)),
                baggage: Some(crate::metrics::baggage(&src, &pi.cluster_id)),
                traceparent: Some(traceparent),
            };
            let key = PoolKey {
                src: src_id,
                dst: expected_identity,
                addr: tunnel_addr,
                netns: scope.peer_origin().netns,
            };
            let mut early = match Early::read(&tcp) {
                Ok(early) => early,
                Err(e) => {
                    tracked.fail(Outcome::Failed(e.to_string()));
                    return Err(tcp);
                }
            };
            let tunnel = match pi
                .pool
                .open(&key, &cert, dst_addr, &headers, &mut early)
                .await
            {
                Ok(t) => t,
                Err(e) => {
                    refuse!(pi, tracked, Outcome::tunnel(&e), dst = %dst_addr, tunnel = %tunnel_addr, error = %e, "tunnel refused");
                    return Err(tcp);
                }
            };
            if !tracked.set_peer(tunnel.peer()) {
                // The lists changed while the stream was being placed.
                let outcome =
                    Outcome::DestinationRevoked("the destination's certificate is revoked".into());
                refuse!(pi, tracked, outcome, dst = %dst_addr, tunnel = %tunnel_addr, "tunnel refused: a revocation list revokes the destination's certificate");
                return Err(tcp);
            }
            tracked.report();
            if let Some(e) = early.take_error() {
                // The client reset while its stream was being opened: the stream is reset too.
                tracked.fail(Outcome::Failed(e.to_string()));
                return Err(tcp);
            }
            tracked
                .record()
                .bytes
                .sent
                .fetch_add(early.len() as u64, Ordering::Relaxed);
            Ok(Open::Hbone {
                tcp,
                tunnel,
                tracked,
            })
        }
    }
}

/// Whether `a` and `b` are the same address (an IPv4-mapped IPv6 one being its IPv4 one).
fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}
