//! How a proxied connection ended: one [`Outcome`] per tracked connection, recorded once
//! ([`Tracked::fail`](super::conns::Tracked::fail)).
//!
//! Each outcome knows the three things the daemon reports of it: the refusal reason it is
//! counted under in `ztunnel_refusals_total` ([`Outcome::reason`], none for a connection that
//! was carried or broke on its own), the `response_flags` Istio's telemetry gives a connection
//! that opened and was not carried ([`Outcome::response_flag`], which also counts it in
//! `istio_tcp_connections_failed_total`), and the `error` field of its access-log line
//! ([`Outcome::text`], empty for [`Outcome::Completed`]). A refusal is counted and logged with
//! its call site's fields through `refuse!`, which records the outcome in the same step.

use std::borrow::Cow;
use std::fmt;

use super::peers::Over;
use crate::hbone::pool::PoolError;
use crate::metrics::ResponseFlag;
use crate::refusal::Reason;

/// How a proxied connection (or tunnel stream) ended. The `String`s are the error that ended
/// it, as the access log shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Carried until both sides ended.
    Completed,
    /// A tunnel request refused by its validation or its plan (no such service, a daemon
    /// port, …) before anything was connected; the access log shows the reason's label.
    Refused(Reason),
    /// A captured outbound connection with nowhere to go.
    NoRoute(String),
    /// A tunnel stream over its peer's cap.
    OverPeerCap(Over),
    /// A QUIC tunnel stream whose header is malformed or missing.
    QuicBadHeader,
    /// Plaintext to one of the daemon's own ports.
    PlaintextRecursion,
    /// Plaintext to a destination whose PeerAuthentication is STRICT.
    PlaintextStrict,
    /// Denied by authorization policy.
    DeniedByPolicy,
    /// No certificate for the source workload's identity.
    NoCertificate(String),
    /// The destination's policy answered the tunnel stream `401`.
    DeniedByDestination(String),
    /// The tunnel to the destination could not be opened; `flag` tells how (TLS, HTTP/2, the
    /// connection itself), as [`PoolError::response_flag`] says.
    TunnelFailed { flag: ResponseFlag, error: String },
    /// The application (a tunnel stream's destination) could not be reached.
    AppUnreachable(String),
    /// The application (a plaintext connection's destination) could not be reached.
    PlaintextAppUnreachable(String),
    /// A passthrough destination (outside the mesh) could not be reached.
    PassthroughUnreachable(String),
    /// Given up while being set up, on an error of the daemon's side or of the client's
    /// socket before its stream was open (the client reset, the `200` could not be sent, …).
    Failed(String),
    /// The copy ended on an error of either side (a reset, a stream error).
    Broken(String),
    /// A tunnel stream reset because its application does not read while the node's
    /// buffered-bytes budget is spent.
    OverBudget(String),
    /// Closed by the daemon: a policy change now denies it.
    PolicyRevoked,
    /// Closed by the daemon: a revocation list now revokes its tunnel peer's certificate.
    CertificateRevoked,
    /// A tunnel stream refused because a revocation list now revokes the certificate its
    /// peer authenticated the connection with.
    PeerRevoked,
    /// No tunnel to the destination: a revocation list revokes its certificate.
    DestinationRevoked(String),
    /// Closed by the daemon: its place among the node's proxied connections went to a
    /// newcomer, its source holding the most.
    Evicted,
    /// Closed by the daemon: its source pod left the mesh.
    SourceReleased,
    /// Closed by the daemon: its destination pod left the mesh.
    DestinationReleased,
}

impl Outcome {
    /// A tunnel that could not be opened: denied by the destination when it answered `401`.
    pub fn tunnel(e: &PoolError) -> Outcome {
        if e.revoked() {
            return Outcome::DestinationRevoked(e.to_string());
        }
        match e.status() {
            Some(http::StatusCode::UNAUTHORIZED) => Outcome::DeniedByDestination(e.to_string()),
            _ => Outcome::TunnelFailed {
                flag: e.response_flag(),
                error: e.to_string(),
            },
        }
    }

    /// The refusal it is counted under, if it is one.
    pub fn reason(&self) -> Option<Reason> {
        Some(match self {
            Outcome::Refused(reason) => *reason,
            Outcome::NoRoute(_) => Reason::OutboundNoRoute,
            Outcome::OverPeerCap(over) => over.reason(),
            Outcome::QuicBadHeader => Reason::QuicBadHeader,
            Outcome::PlaintextRecursion => Reason::InboundPlaintextRecursion,
            Outcome::PlaintextStrict => Reason::InboundPlaintextStrict,
            Outcome::DeniedByPolicy => Reason::PolicyDenied,
            Outcome::NoCertificate(_) => Reason::OutboundNoCertificate,
            Outcome::DeniedByDestination(_) => Reason::OutboundDeniedByDestination,
            Outcome::TunnelFailed { .. } => Reason::OutboundTunnelFailed,
            Outcome::AppUnreachable(_) => Reason::InboundAppUnreachable,
            Outcome::PlaintextAppUnreachable(_) => Reason::InboundPlaintextAppUnreachable,
            Outcome::OverBudget(_) => Reason::BufferBudget,
            Outcome::PolicyRevoked => Reason::PolicyRevoked,
            Outcome::Evicted => Reason::ProxiedConnectionEvicted,
            Outcome::CertificateRevoked => Reason::CertificateRevoked,
            Outcome::PeerRevoked => Reason::InboundPeerRevoked,
            Outcome::DestinationRevoked(_) => Reason::OutboundPeerRevoked,
            Outcome::Completed
            | Outcome::PassthroughUnreachable(_)
            | Outcome::Failed(_)
            | Outcome::Broken(_)
            | Outcome::SourceReleased
            | Outcome::DestinationReleased => return None,
        })
    }

    /// Istio's `response_flags` for a connection that opened and ended so without being
    /// carried; `None` for one that was carried (its flags are `-`) or is not reported.
    pub fn response_flag(&self) -> Option<ResponseFlag> {
        match self {
            Outcome::DeniedByPolicy | Outcome::PlaintextStrict => Some(ResponseFlag::Deny),
            Outcome::NoCertificate(_) => Some(ResponseFlag::IdentityError),
            Outcome::DestinationRevoked(_) => Some(ResponseFlag::TlsFailure),
            Outcome::PeerRevoked => Some(ResponseFlag::Deny),
            Outcome::DeniedByDestination(_)
            | Outcome::AppUnreachable(_)
            | Outcome::PlaintextAppUnreachable(_)
            | Outcome::PassthroughUnreachable(_) => Some(ResponseFlag::Connect),
            Outcome::TunnelFailed { flag, .. } => Some(*flag),
            Outcome::Completed
            | Outcome::Refused(_)
            | Outcome::NoRoute(_)
            | Outcome::OverPeerCap(_)
            | Outcome::QuicBadHeader
            | Outcome::PlaintextRecursion
            | Outcome::Failed(_)
            | Outcome::Broken(_)
            | Outcome::OverBudget(_)
            | Outcome::PolicyRevoked
            | Outcome::CertificateRevoked
            | Outcome::Evicted
            | Outcome::SourceReleased
            | Outcome::DestinationReleased => None,
        }
    }

    /// The `error` field of the access-log line.
    pub fn text(&self) -> Cow<'_, str> {
        Cow::Borrowed(match self {
            Outcome::Completed => "",
            Outcome::Refused(reason) => reason.label(),
            Outcome::OverPeerCap(over) => return Cow::Owned(over.to_string()),
            Outcome::QuicBadHeader => "malformed or missing QUIC stream header",
            Outcome::PlaintextRecursion => "recursion",
            Outcome::PlaintextStrict => "plaintext refused by STRICT peer authentication",
            Outcome::DeniedByPolicy => "denied by policy",
            Outcome::PolicyRevoked => "closed: denied by a policy change",
            Outcome::CertificateRevoked => {
                "closed: a revocation list revokes the peer's certificate"
            }
            Outcome::PeerRevoked => "the peer's certificate is revoked",
            Outcome::Evicted => {
                "closed: the node holds as many proxied connections as allowed, its source the most"
            }
            Outcome::SourceReleased => "closed: the source pod left the mesh",
            Outcome::DestinationReleased => "closed: the destination pod left the mesh",
            Outcome::NoRoute(error)
            | Outcome::NoCertificate(error)
            | Outcome::DestinationRevoked(error)
            | Outcome::DeniedByDestination(error)
            | Outcome::TunnelFailed { error, .. }
            | Outcome::AppUnreachable(error)
            | Outcome::PlaintextAppUnreachable(error)
            | Outcome::PassthroughUnreachable(error)
            | Outcome::Failed(error)
            | Outcome::Broken(error)
            | Outcome::OverBudget(error) => error,
        })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// Ends a tracked connection with a refusal: counts and logs the outcome's
/// [`reason`](Outcome::reason) as [`refused!`](crate::refused) does, with the given fields and
/// message, then records the outcome ([`Tracked::fail`](super::conns::Tracked::fail)). An
/// outcome without a reason is recorded only.
///
/// `refuse!(pi, tracked, outcome, fields…, "message")`, with `pi` the
/// [`ProxyInputs`](super::ProxyInputs) and `tracked` a `&mut Tracked` or a `Tracked`.
macro_rules! refuse {
    ($pi:expr, $tracked:expr, $outcome:expr, $($arg:tt)+) => {{
        let outcome: $crate::proxy::outcome::Outcome = $outcome;
        if let Some(reason) = outcome.reason() {
            $crate::refused!($pi.metrics, reason, $($arg)+);
        }
        $tracked.fail(outcome);
    }};
}
pub(super) use refuse;

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> String {
        t.to_owned()
    }

    #[test]
    fn each_outcome_has_its_reason_flag_and_text() {
        use ResponseFlag::{Connect, Deny, H2HandshakeFailure, IdentityError, TlsFailure};
        // (outcome, refusal reason, response flag, access-log text)
        let cases: Vec<(Outcome, Option<Reason>, Option<ResponseFlag>, &str)> = vec![
            (Outcome::Completed, None, None, ""),
            (
                Outcome::Refused(Reason::Recursion),
                Some(Reason::Recursion),
                None,
                "recursion",
            ),
            (
                Outcome::Refused(Reason::MethodNotConnect),
                Some(Reason::MethodNotConnect),
                None,
                "method_not_connect",
            ),
            (
                Outcome::NoRoute(s("destination port 15006 of a mesh workload would loop")),
                Some(Reason::OutboundNoRoute),
                None,
                "destination port 15006 of a mesh workload would loop",
            ),
            (
                Outcome::OverPeerCap(Over::StreamsPerAddress(3)),
                Some(Reason::InboundPeerStreamLimit),
                None,
                "its source address holds 3 tunnel streams, the most allowed",
            ),
            (
                Outcome::QuicBadHeader,
                Some(Reason::QuicBadHeader),
                None,
                "malformed or missing QUIC stream header",
            ),
            (
                Outcome::PlaintextRecursion,
                Some(Reason::InboundPlaintextRecursion),
                None,
                "recursion",
            ),
            (
                Outcome::PlaintextStrict,
                Some(Reason::InboundPlaintextStrict),
                Some(Deny),
                "plaintext refused by STRICT peer authentication",
            ),
            (
                Outcome::DeniedByPolicy,
                Some(Reason::PolicyDenied),
                Some(Deny),
                "denied by policy",
            ),
            (
                Outcome::NoCertificate(s("no certificate yet")),
                Some(Reason::OutboundNoCertificate),
                Some(IdentityError),
                "no certificate yet",
            ),
            (
                Outcome::DeniedByDestination(s("401")),
                Some(Reason::OutboundDeniedByDestination),
                Some(Connect),
                "401",
            ),
            (
                Outcome::TunnelFailed {
                    flag: TlsFailure,
                    error: s("tls"),
                },
                Some(Reason::OutboundTunnelFailed),
                Some(TlsFailure),
                "tls",
            ),
            (
                Outcome::TunnelFailed {
                    flag: H2HandshakeFailure,
                    error: s("h2"),
                },
                Some(Reason::OutboundTunnelFailed),
                Some(H2HandshakeFailure),
                "h2",
            ),
            (
                Outcome::AppUnreachable(s("Connection refused (os error 111)")),
                Some(Reason::InboundAppUnreachable),
                Some(Connect),
                "Connection refused (os error 111)",
            ),
            (
                Outcome::PlaintextAppUnreachable(s("refused")),
                Some(Reason::InboundPlaintextAppUnreachable),
                Some(Connect),
                "refused",
            ),
            (
                Outcome::PassthroughUnreachable(s("refused")),
                None,
                Some(Connect),
                "refused",
            ),
            (Outcome::Failed(s("reset")), None, None, "reset"),
            (Outcome::Broken(s("tcp: reset")), None, None, "tcp: reset"),
            (
                Outcome::OverBudget(s("over budget")),
                Some(Reason::BufferBudget),
                None,
                "over budget",
            ),
            (
                Outcome::PolicyRevoked,
                Some(Reason::PolicyRevoked),
                None,
                "closed: denied by a policy change",
            ),
            (
                Outcome::Evicted,
                Some(Reason::ProxiedConnectionEvicted),
                None,
                "closed: the node holds as many proxied connections as allowed, its source the most",
            ),
            (
                Outcome::SourceReleased,
                None,
                None,
                "closed: the source pod left the mesh",
            ),
            (
                Outcome::DestinationReleased,
                None,
                None,
                "closed: the destination pod left the mesh",
            ),
        ];
        for (outcome, reason, flag, text) in cases {
            assert_eq!(outcome.reason(), reason, "{outcome:?}");
            assert_eq!(outcome.response_flag(), flag, "{outcome:?}");
            assert_eq!(outcome.text(), text, "{outcome:?}");
            assert_eq!(outcome.to_string(), text, "{outcome:?}");
        }
    }

    #[test]
    fn a_tunnel_that_could_not_be_opened_is_denied_by_a_401_and_flagged_by_how_it_failed() {
        use crate::hbone::client::ClientError;
        use http::StatusCode;
        let addr: std::net::SocketAddr = "10.0.0.2:15008".parse().unwrap();
        let cases: Vec<(PoolError, Outcome)> = vec![
            (
                ClientError::Status(StatusCode::UNAUTHORIZED).into(),
                Outcome::DeniedByDestination(s("CONNECT refused with status 401 Unauthorized")),
            ),
            (
                ClientError::Status(StatusCode::SERVICE_UNAVAILABLE).into(),
                Outcome::TunnelFailed {
                    flag: ResponseFlag::Connect,
                    error: s("CONNECT refused with status 503 Service Unavailable"),
                },
            ),
            (
                ClientError::Alpn { addr }.into(),
                Outcome::TunnelFailed {
                    flag: ResponseFlag::TlsFailure,
                    error: s("peer 10.0.0.2:15008 did not negotiate h2"),
                },
            ),
            (
                ClientError::H2(h2::Reason::PROTOCOL_ERROR.into()).into(),
                Outcome::TunnelFailed {
                    flag: ResponseFlag::H2HandshakeFailure,
                    error: s("HTTP/2: protocol error: unspecific protocol error detected"),
                },
            ),
            (
                PoolError::NoAnswer(std::time::Duration::from_secs(1)),
                Outcome::TunnelFailed {
                    flag: ResponseFlag::Connect,
                    error: s("no answer to the stream's request within 1s"),
                },
            ),
        ];
        for (e, want) in cases {
            assert_eq!(Outcome::tunnel(&e), want, "{e:?}");
            // The same failure, of a dial that several streams waited for.
            let shared = PoolError::Dial(std::sync::Arc::new(e));
            assert_eq!(Outcome::tunnel(&shared), want, "{shared:?}");
        }
    }
}
