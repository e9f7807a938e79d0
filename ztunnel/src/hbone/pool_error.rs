//! How a pool could not open a stream ([`PoolError`]), and what each failure means: the status
//! a peer answered, the response flag Istio's telemetry reports, whether a revocation list is
//! the cause, whether the connection (not only the stream) failed, and whether the stream may
//! be sent again.

use std::sync::Arc;
use std::time::Duration;

use super::super::client::ClientError;
use super::super::quic::{QuicError, QuicStreamError};
use crate::metrics::ResponseFlag;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("no answer to the stream's request within {0:?}")]
    NoAnswer(Duration),
    /// The failure of a dial that several streams waited for.
    #[error(transparent)]
    Dial(Arc<PoolError>),
}

impl PoolError {
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            PoolError::Client(c) => c.status(),
            PoolError::Dial(e) => e.status(),
            _ => None,
        }
    }

    /// How Istio's telemetry reports this failure ([`ResponseFlag`]): a failed TLS or HTTP/2
    /// handshake as such, anything else (unreachable, refused, a status) as `CONNECT`.
    pub fn response_flag(&self) -> ResponseFlag {
        match self {
            PoolError::Client(ClientError::Tls { .. } | ClientError::Alpn { .. }) => {
                ResponseFlag::TlsFailure
            }
            PoolError::Quic(QuicError::Handshake { .. }) => ResponseFlag::TlsFailure,
            PoolError::Client(ClientError::H2(_)) => ResponseFlag::H2HandshakeFailure,
            PoolError::Dial(e) => e.response_flag(),
            _ => ResponseFlag::Connect,
        }
    }

    /// Whether the dial failed because a revocation list revokes the destination's
    /// certificate.
    pub fn revoked(&self) -> bool {
        match self {
            PoolError::Client(c) => c.revoked(),
            PoolError::Quic(QuicError::Handshake { source, .. }) => {
                crate::identity::crl::is_revoked_quic(source)
            }
            PoolError::Dial(e) => e.revoked(),
            _ => false,
        }
    }

    /// Whether the connection failed (not the stream), so no stream may land on it again.
    pub(super) fn connection_failed(&self) -> bool {
        match self {
            PoolError::Dial(e) => e.connection_failed(),
            e => !matches!(
                e,
                PoolError::Client(ClientError::Status(_) | ClientError::Request(_))
            ),
        }
    }

    /// Whether the peer provably did not process the stream, so it may be sent again.
    pub(super) fn retryable(&self) -> bool {
        match self {
            PoolError::Client(c) => c.retryable(),
            PoolError::Quic(q) => q.connection_failed(),
            PoolError::Dial(e) => e.retryable(),
            _ => false,
        }
    }
}

impl From<QuicStreamError> for PoolError {
    fn from(e: QuicStreamError) -> Self {
        match e {
            QuicStreamError::Quic(q) => PoolError::Quic(q),
            // The peer answered, as an HTTP/2 peer answers a CONNECT.
            QuicStreamError::Status(s) => PoolError::Client(ClientError::Status(s)),
        }
    }
}
