//! Inbound plaintext: a connection from outside the mesh to a local workload, redirected to
//! 15006. There is no peer identity; it is delivered to the original destination (a port of
//! 15001/15006/15008 is refused as recursion). Peer authentication (STRICT refuses this path)
//! and policy apply here in the policy layer.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::conns::{ConnFacts, Direction};
use super::{reset, ProxyInputs, Scope};
use crate::hbone::consts;
use crate::net;

pub(super) async fn handle(
    pi: Arc<ProxyInputs>,
    scope: Scope,
    mut tcp: TcpStream,
    peer: SocketAddr,
) {
    let orig = match net::original_dst(&tcp) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "inbound plaintext connection was not redirected; refused");
            pi.metrics.refused("inbound_plaintext_no_original_dst");
            return reset(tcp);
        }
    };
    let state = pi.discovery.current();
    let Some(dst) = scope.workload(&pi, &state, orig) else {
        tracing::warn!(%peer, dst = %orig, "inbound plaintext to an unknown workload; refused");
        pi.metrics.refused("inbound_plaintext_unknown_destination");
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
        pi.metrics.refused("inbound_plaintext_recursion");
        tracked.fail("recursion");
        return reset(tcp);
    }
    pi.metrics.proxied("inbound_plaintext");
    let mut app = match net::connect_from(orig, pi.connect, &scope.app_origin(peer.ip())).await {
        Ok(a) => a,
        Err(e) => {
            pi.metrics.refused("inbound_plaintext_app_unreachable");
            tracked.fail(&e);
            return reset(tcp);
        }
    };
    match tokio::io::copy_bidirectional(&mut tcp, &mut app).await {
        Ok((from_client, to_client)) => {
            let b = &tracked.record().bytes;
            b.received
                .store(from_client, std::sync::atomic::Ordering::Relaxed);
            b.sent
                .store(to_client, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => tracked.fail(e),
    }
}
