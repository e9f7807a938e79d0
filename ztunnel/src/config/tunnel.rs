//! The daemon's caps on tunnel peers ([`TunnelLimits`]): pending handshakes and how long a
//! silent one may wait, what an authenticated peer may hold, and the node's buffered-bytes
//! budget; parsed with the helpers of [`super`], flags winning over the environment.

use std::time::Duration;

use clap::Args;

use super::{count, duration_within, ConfigError, Env};
use crate::gate::Limits;
use crate::proxy::peers::PeerLimits;
use crate::proxy::TunnelLimits;

/// The flags of [`TunnelLimits`].
#[derive(Args, Debug, Default)]
pub(super) struct TunnelArgs {
    /// Tunnel connections in their TLS handshake, node-wide; more are refused [env: ZTUNNEL_MAX_PENDING_HANDSHAKES] [default: 2048]
    #[arg(long)]
    max_pending_handshakes: Option<String>,
    /// Tunnel connections in their TLS handshake from one source address [env: ZTUNNEL_MAX_PENDING_HANDSHAKES_PER_PEER] [default: 256]
    #[arg(long)]
    max_pending_handshakes_per_peer: Option<String>,
    /// A tunnel connection that has not sent the first bytes of its TLS handshake by then is closed, 100ms to 10s [env: ZTUNNEL_TLS_FIRST_BYTES_TIMEOUT] [default: 2s]
    #[arg(long)]
    tls_first_bytes_timeout: Option<String>,
    /// Authenticated tunnel connections from one source address [env: ZTUNNEL_MAX_PEER_CONNECTIONS_PER_ADDRESS] [default: 256]
    #[arg(long)]
    max_peer_connections_per_address: Option<String>,
    /// Authenticated tunnel connections of one peer identity [env: ZTUNNEL_MAX_PEER_CONNECTIONS_PER_IDENTITY] [default: 1024]
    #[arg(long)]
    max_peer_connections_per_identity: Option<String>,
    /// Tunnel streams from one source address [env: ZTUNNEL_MAX_PEER_STREAMS_PER_ADDRESS] [default: 16384]
    #[arg(long)]
    max_peer_streams_per_address: Option<String>,
    /// Tunnel streams of one peer identity [env: ZTUNNEL_MAX_PEER_STREAMS_PER_IDENTITY] [default: 65536]
    #[arg(long)]
    max_peer_streams_per_identity: Option<String>,
    /// MiB that tunnel streams may hold for applications that do not read them, node-wide [env: ZTUNNEL_MAX_BUFFERED_MIB] [default: 256]
    #[arg(long)]
    max_buffered_mib: Option<String>,
}

const MILLION: u32 = 1_000_000;

impl TunnelArgs {
    pub(super) fn resolve(self, env: Env<'_>) -> Result<TunnelLimits, ConfigError> {
        let d = TunnelLimits::default();
        let handshakes = handshake_limits(
            self.max_pending_handshakes,
            self.max_pending_handshakes_per_peer,
            env,
        )?;
        // Beyond the handshakes' own deadline it would never fire.
        let tls_first_bytes_timeout = duration_within(
            "TLS first bytes timeout",
            self.tls_first_bytes_timeout,
            env,
            "ZTUNNEL_TLS_FIRST_BYTES_TIMEOUT",
            &humantime::format_duration(TunnelLimits::TLS_FIRST_BYTES_TIMEOUT).to_string(),
            (Duration::from_millis(100), crate::proxy::HANDSHAKE_TIMEOUT),
        )?;
        let n = |name, flag, key, default: usize| {
            count(name, flag, env, key, default as u32, MILLION).map(|v| v as usize)
        };
        let peers = PeerLimits {
            connections_per_address: n(
                "max peer connections per address",
                self.max_peer_connections_per_address,
                "ZTUNNEL_MAX_PEER_CONNECTIONS_PER_ADDRESS",
                d.peers.connections_per_address,
            )?,
            connections_per_identity: n(
                "max peer connections per identity",
                self.max_peer_connections_per_identity,
                "ZTUNNEL_MAX_PEER_CONNECTIONS_PER_IDENTITY",
                d.peers.connections_per_identity,
            )?,
            streams_per_address: n(
                "max peer streams per address",
                self.max_peer_streams_per_address,
                "ZTUNNEL_MAX_PEER_STREAMS_PER_ADDRESS",
                d.peers.streams_per_address,
            )?,
            streams_per_identity: n(
                "max peer streams per identity",
                self.max_peer_streams_per_identity,
                "ZTUNNEL_MAX_PEER_STREAMS_PER_IDENTITY",
                d.peers.streams_per_identity,
            )?,
        };
        let buffered_bytes = count(
            "max buffered MiB",
            self.max_buffered_mib,
            env,
            "ZTUNNEL_MAX_BUFFERED_MIB",
            (d.buffered_bytes >> 20) as u32,
            1 << 20,
        )? as usize
            * (1 << 20);
        Ok(TunnelLimits {
            handshakes,
            tls_first_bytes_timeout,
            peers,
            buffered_bytes,
        })
    }
}

/// The caps on pending tunnel handshakes: each 1 to 1 000 000, the per-peer one no larger
/// than the node's.
fn handshake_limits(
    per_node: Option<String>,
    per_peer: Option<String>,
    env: Env<'_>,
) -> Result<Limits, ConfigError> {
    let d = Limits::PENDING_HANDSHAKES;
    let per_node = count(
        "max pending handshakes",
        per_node,
        env,
        "ZTUNNEL_MAX_PENDING_HANDSHAKES",
        d.total as u32,
        MILLION,
    )? as usize;
    let per_peer = count(
        "max pending handshakes per peer",
        per_peer,
        env,
        "ZTUNNEL_MAX_PENDING_HANDSHAKES_PER_PEER",
        d.per_peer as u32,
        MILLION,
    )? as usize;
    if per_peer > per_node {
        return Err(ConfigError::Invalid {
            setting: "max pending handshakes per peer",
            value: per_peer.to_string(),
            reason: format!("must not exceed max pending handshakes ({per_node})"),
        });
    }
    Ok(Limits {
        total: per_node,
        per_peer,
    })
}
