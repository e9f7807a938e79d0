//! The daemon's caps on tunnel peers ([`TunnelLimits`]): pending handshakes and how long a
//! silent one may wait, what an authenticated peer may hold, the node's buffered-bytes
//! budget, and the connections proxied for one source address and node-wide. Each flag is
//! typed and bounded by its parser ([`super::settings`]); the defaults are
//! [`TunnelLimits::default`]'s; [`TunnelArgs::resolve`] checks what spans two flags.

use std::time::Duration;

use clap::Args;

use super::settings::{caps, count, duration, Origins};
use super::ConfigError;
use crate::gate::Limits;
use crate::proxy::peers::PeerLimits;
use crate::proxy::TunnelLimits;

const MILLION: u32 = 1_000_000;

fn default() -> TunnelLimits {
    TunnelLimits::default()
}

/// The flags of [`TunnelLimits`].
#[derive(Args, Debug)]
pub(super) struct TunnelArgs {
    /// Tunnel connections in their TLS handshake, node-wide; more are refused
    #[arg(long, env = "ZTUNNEL_MAX_PENDING_HANDSHAKES", value_parser = count(MILLION),
          default_value_t = Limits::PENDING_HANDSHAKES.total as u32)]
    max_pending_handshakes: u32,
    /// Tunnel connections in their TLS handshake from one source address
    #[arg(long, env = "ZTUNNEL_MAX_PENDING_HANDSHAKES_PER_PEER", value_parser = count(MILLION),
          default_value_t = Limits::PENDING_HANDSHAKES.per_peer as u32)]
    max_pending_handshakes_per_peer: u32,
    /// A tunnel connection that has not sent the first bytes of its TLS handshake by then is
    /// closed, 100ms to 10s
    // Beyond the handshakes' own deadline it would never fire.
    #[arg(long, env = "ZTUNNEL_TLS_FIRST_BYTES_TIMEOUT", default_value = "2s",
          value_parser = duration(Duration::from_millis(100), crate::proxy::HANDSHAKE_TIMEOUT))]
    tls_first_bytes_timeout: Duration,
    /// Authenticated tunnel connections from one source address
    #[arg(long, env = "ZTUNNEL_MAX_PEER_CONNECTIONS_PER_ADDRESS", value_parser = count(MILLION),
          default_value_t = default().peers.connections_per_address as u32)]
    max_peer_connections_per_address: u32,
    /// Authenticated tunnel connections of one peer identity
    #[arg(long, env = "ZTUNNEL_MAX_PEER_CONNECTIONS_PER_IDENTITY", value_parser = count(MILLION),
          default_value_t = default().peers.connections_per_identity as u32)]
    max_peer_connections_per_identity: u32,
    /// Tunnel streams from one source address
    #[arg(long, env = "ZTUNNEL_MAX_PEER_STREAMS_PER_ADDRESS", value_parser = count(MILLION),
          default_value_t = default().peers.streams_per_address as u32)]
    max_peer_streams_per_address: u32,
    /// Tunnel streams of one peer identity
    #[arg(long, env = "ZTUNNEL_MAX_PEER_STREAMS_PER_IDENTITY", value_parser = count(MILLION),
          default_value_t = default().peers.streams_per_identity as u32)]
    max_peer_streams_per_identity: u32,
    /// MiB that tunnel streams may hold for applications that do not read them, node-wide
    #[arg(long, env = "ZTUNNEL_MAX_BUFFERED_MIB", value_parser = count(1 << 20),
          default_value_t = (default().buffered_bytes >> 20) as u32)]
    max_buffered_mib: u32,
    /// Connections proxied at once for one source address: a local pod's outbound
    /// connections, or a plaintext client's to the node's workloads
    #[arg(long, env = "ZTUNNEL_MAX_CONNECTIONS_PER_SOURCE", value_parser = count(MILLION),
          default_value_t = TunnelLimits::CONNECTIONS_PER_SOURCE as u32)]
    max_connections_per_source: u32,
    /// Local pods' outbound connections proxied at once, node-wide (by default at least
    /// one pod's cap); when all are held, the pod holding the most gives up its oldest to a
    /// newcomer from another
    #[arg(long, env = "ZTUNNEL_MAX_PROXIED_CONNECTIONS", value_parser = count(MILLION),
          default_value_t = TunnelLimits::PROXIED_CONNECTIONS as u32)]
    max_proxied_connections: u32,
}

impl TunnelArgs {
    /// The limits; a per-peer cap (pending handshakes, proxied connections) may not exceed
    /// the node's given with it.
    pub(super) fn resolve(self, origins: &Origins) -> Result<TunnelLimits, ConfigError> {
        // Left to its default, the node's cap is at least one pod's.
        let total = match origins.is_set("max_proxied_connections") {
            true => self.max_proxied_connections,
            false => self
                .max_proxied_connections
                .max(self.max_connections_per_source),
        };
        let sources = caps(
            origins,
            (total, "max_proxied_connections"),
            (
                self.max_connections_per_source,
                "max_connections_per_source",
            ),
        )?;
        Ok(TunnelLimits {
            handshakes: caps(
                origins,
                (self.max_pending_handshakes, "max_pending_handshakes"),
                (
                    self.max_pending_handshakes_per_peer,
                    "max_pending_handshakes_per_peer",
                ),
            )?,
            tls_first_bytes_timeout: self.tls_first_bytes_timeout,
            peers: PeerLimits {
                connections_per_address: self.max_peer_connections_per_address as usize,
                connections_per_identity: self.max_peer_connections_per_identity as usize,
                streams_per_address: self.max_peer_streams_per_address as usize,
                streams_per_identity: self.max_peer_streams_per_identity as usize,
            },
            buffered_bytes: self.max_buffered_mib as usize * (1 << 20),
            connections_per_source: sources.per_peer,
            proxied_connections: sources.total,
        })
    }
}
