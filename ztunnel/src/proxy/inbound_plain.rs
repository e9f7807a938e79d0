//! Inbound plaintext: a connection from outside the mesh to a local workload, redirected to
//! 15006. There is no peer identity; it is delivered to the original destination, which must
//! be an address of the workload (a port of 15001/15006/15008 is refused as recursion). The
//! client's address holds a place among the node's proxied connections while it lasts
//! ([`ProxyInputs::sources`](super::ProxyInputs::sources)); over its cap it is reset at once.
//! A destination whose PeerAuthentication is STRICT refuses it; otherwise (PERMISSIVE) the
//! policy engine judges it with no identity. A refused connection is reset before the
//! application sees it; one that a later policy change denies is closed. Refusals are
//! counted; the warnings anyone can provoke (not redirected, unknown destination, STRICT) are
//! throttled ([`crate::throttle`]), while policy denials, an audit trail, are not.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::conns::{ConnFacts, Direction, PolicyFacts};
use super::outcome::{refuse, Outcome};
use super::{reset, ProxyInputs, Scope};
use crate::discovery::policy::MtlsMode;
use crate::hbone::consts;
use crate::metrics::End;
use crate::refusal::Reason;

pub(super) async fn handle(
    pi: Arc<ProxyInputs>,
    scope: Scope,
    mut tcp: TcpStream,
    peer: SocketAddr,
) {
    let mut place = match pi.plaintext_clients.try_admit(peer.ip()) {
        Ok(place) => place,
        Err(full) => {
            crate::refused!(pi.metrics, Reason::InboundPlaintextSourceLimit, %peer, error = %full, "inbound plaintext connection refused: its client address has as many proxied as allowed");
            return reset(tcp);
        }
    };
    let orig = match pi.sockets.original_dst(&tcp) {
        Ok(a) => a,
        Err(e) => {
            crate::refused!(pi.metrics, Reason::InboundPlaintextNoOriginalDst, %peer, error = %e, "inbound plaintext connection was not redirected; refused");
            return reset(tcp);
        }
    };
    let state = pi.discovery.current();
    let Some(dst) = scope.destination(&pi, &state, orig) else {
        crate::refused!(pi.metrics, Reason::InboundPlaintextUnknownDestination, %peer, dst = %orig, "inbound plaintext to an unknown workload; refused");
        return reset(tcp);
    };
    drop(state);
    let mut tracked = pi.connections.track(
        Direction::InboundPlaintext,
        ConnFacts {
            src_addr: Some(peer),
            dst_addr: Some(orig),
            dst_identity: Some(pi.identity_of(&dst).to_string()),
            dst_workload: Some(format!("{}/{}", dst.namespace, dst.name)),
            ..Default::default()
        },
    );
    if consts::RESERVED_PORTS.contains(&orig.port()) {
        refuse!(pi, tracked, Outcome::PlaintextRecursion, %peer, dst = %orig, "plaintext to a daemon port; refused");
        return reset(tcp);
    }
    let state = pi.discovery.current();
    // Reported as Istio reports plaintext: the source workload by address, no principal.
    let src = state.workload_by_ip(peer.ip().to_canonical()).cloned();
    let dst_principal = pi.identity_of(&dst).to_string();
    let service = state
        .services_of(&dst)
        .find(|s| s.targets_at(orig.ip(), orig.port()))
        .cloned();
    tracked.label(pi.istio_labels(
        "destination",
        End {
            workload: src.as_deref(),
            principal: None,
        },
        End {
            workload: Some(&dst),
            principal: Some(&dst_principal),
        },
        service.as_deref(),
        false,
    ));
    if state
        .policy()
        .mtls_mode(&dst.namespace, &dst.labels, orig.port())
        == MtlsMode::Strict
    {
        tracked.update(|f| f.decision = Some("deny"));
        refuse!(pi, tracked, Outcome::PlaintextStrict, %peer, dst = %orig, "plaintext refused: the destination requires mutual TLS (STRICT)");
        return reset(tcp);
    }
    let facts = PolicyFacts {
        src_principal: None,
        src_namespace: None,
        src_ip: peer.ip().to_canonical(),
        dst_ip: orig.ip().to_canonical(),
        dst_uid: dst.uid.clone(),
        dst_port: orig.port(),
    };
    let decision = super::judge(&pi, &state, &tracked, facts);
    drop(state);
    if !decision.allowed {
        refuse!(pi, tracked, Outcome::DeniedByPolicy, %peer, dst = %orig, policy = ?decision.policy, rule = ?decision.rule,
            why = ?decision.reason, "plaintext connection denied by policy");
        return reset(tcp);
    }
    pi.metrics.proxied("inbound_plaintext");
    let mut app = match pi
        .sockets
        .connect(orig, pi.connect, &scope.app_origin(peer.ip()))
        .await
    {
        Ok(a) => a,
        Err(e) => {
            refuse!(pi, tracked, Outcome::PlaintextAppUnreachable(e.to_string()), %peer, dst = %orig, error = %e, "plaintext: application unreachable; reset");
            return reset(tcp);
        }
    };
    tracked.report();
    super::copy_plain(&pi, &mut place, &mut tracked, &mut app, &mut tcp).await
}
