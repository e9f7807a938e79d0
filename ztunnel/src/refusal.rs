//! Why the daemon refuses a connection, a stream or a request: one [`Reason`] per row of the
//! README's refusal table, with the label it is counted under in
//! `ztunnel_refusals_total{reason}`, whether its warning is throttled, and the HTTP status it
//! is answered with (a refusal of a request or a tunnel stream; `policy_denied` is answered
//! `401` over HBONE and reset in plaintext).
//!
//! Every refusal is recorded through [`refused!`](crate::refused), which counts it and logs one
//! warning carrying its label, so that a refusal can neither be counted under a misspelt label
//! nor go unlogged. Every reason's series is exported from the start, at zero
//! ([`crate::metrics::Metrics::register`]): a dashboard (or a test) that reads a reason which
//! does not exist finds nothing, rather than a zero that looks like good news.
//!
//! Throttled warnings are those a peer can provoke before it authenticates, those of an
//! authenticated peer's requests that cannot be served (malformed, to a daemon port, to an
//! application that is not there: a peer can send them as fast as it likes), and those of
//! outbound connections that cannot be carried (an application retrying in a loop): at most a
//! burst per second per call site ([`crate::throttle`]). The others, policy denials first, are
//! logged every time.

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $label:literal, $throttled:literal, $status:expr;)+) => {
        /// A reason for a refusal; see the module's documentation.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[$doc])* $variant,)+
        }

        impl Reason {
            /// Every reason, in the order of the README's table.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)+];

            /// The value of the `reason` label it is counted under.
            pub const fn label(self) -> &'static str {
                match self {
                    $(Reason::$variant => $label,)+
                }
            }

            /// Whether its warning is throttled.
            pub const fn throttled(self) -> bool {
                match self {
                    $(Reason::$variant => $throttled,)+
                }
            }

            /// The HTTP status a refused request or tunnel stream is answered with; `None` for
            /// a refusal that resets or closes a connection instead.
            pub fn status(self) -> Option<http::StatusCode> {
                let code: Option<u16> = match self {
                    $(Reason::$variant => $status,)+
                };
                code.map(|c| http::StatusCode::from_u16(c).expect("a valid status"))
            }
        }
    };
}

reasons! {
    /// A connection to the outbound listener whose original destination cannot be read, or
    /// is the listener itself (it was not redirected: a self-call over loopback).
    OutboundNoOriginalDst = "outbound_no_original_dst", true, None;
    /// A captured connection whose source is no local workload.
    OutboundUnknownSource = "outbound_unknown_source", true, None;
    /// A captured connection with nowhere to go (a Service with no ready endpoint, …).
    OutboundNoRoute = "outbound_no_route", true, None;
    /// A captured connection from a pod address that has as many connections proxied as
    /// allowed.
    OutboundSourceLimit = "outbound_source_limit", true, None;
    /// Plaintext inbound from a client address that has as many connections proxied as
    /// allowed.
    InboundPlaintextSourceLimit = "inbound_plaintext_source_limit", true, None;
    /// An open connection (outbound or plaintext inbound) closed to give its place to a
    /// newcomer: the node held as many as allowed, and its source the most.
    ProxiedConnectionEvicted = "proxied_connection_evicted", true, None;
    /// No certificate for the source workload.
    OutboundNoCertificate = "outbound_no_certificate", true, None;
    /// The tunnel to the destination could not be opened.
    OutboundTunnelFailed = "outbound_tunnel_failed", true, None;
    /// The destination's certificate, or one of its chain, is revoked by a revocation list:
    /// no tunnel to it.
    OutboundPeerRevoked = "outbound_peer_revoked", true, None;
    /// The destination's policy answered `401`.
    OutboundDeniedByDestination = "outbound_denied_by_destination", true, None;
    /// A `CONNECT` to a service hostname, or a port of it, this node does not know.
    InboundUnknownService = "inbound_unknown_service", true, Some(503);
    /// A tunnel connection to an address of no local workload.
    InboundUnknownDestination = "inbound_unknown_destination", true, None;
    /// No certificate for the destination workload.
    InboundNoCertificate = "inbound_no_certificate", true, None;
    /// Too many tunnel connections in their handshakes.
    InboundHandshakeLimit = "inbound_handshake_limit", true, None;
    /// A pending handshake whose place went to a newcomer.
    InboundHandshakeEvicted = "inbound_handshake_evicted", true, None;
    /// No TLS byte within the first-bytes timeout.
    InboundTlsFirstBytesTimeout = "inbound_tls_first_bytes_timeout", true, None;
    /// A failed mutual-TLS handshake, a peer certificate without exactly one readable SPIFFE ID
    /// among them (the verifier reads the identity that policy sees).
    InboundTlsHandshake = "inbound_tls_handshake", true, None;
    /// No TLS handshake within its deadline.
    InboundTlsTimeout = "inbound_tls_timeout", true, None;
    /// A tunnel peer whose certificate, or one of its chain, a revocation list revokes: its
    /// handshake fails, or a stream on a connection it opened before is refused, `401`.
    InboundPeerRevoked = "inbound_peer_revoked", true, Some(401);
    /// A tunnel connection closed on an HTTP/2 protocol error.
    InboundHttp2Error = "inbound_http2_error", true, None;
    /// No HTTP/2 preface within the handshakes' deadline.
    InboundHttp2Timeout = "inbound_http2_timeout", true, None;
    /// An authenticated tunnel connection over its peer's cap.
    InboundPeerConnectionLimit = "inbound_peer_connection_limit", true, None;
    /// A tunnel stream over its peer's cap: `429`.
    InboundPeerStreamLimit = "inbound_peer_stream_limit", true, Some(429);
    /// A stream holding more than its share while the node's buffer budget is spent.
    BufferBudget = "buffer_budget", true, None;
    /// A QUIC tunnel stream whose header is malformed or late: `400`.
    QuicBadHeader = "quic_bad_header", true, Some(400);
    /// A QUIC tunnel connection closed on a protocol error.
    InboundQuicError = "inbound_quic_error", true, None;
    /// A tunnel request that is not `CONNECT`: `400`.
    MethodNotConnect = "method_not_connect", true, Some(400);
    /// A `CONNECT` with a scheme or path: `400`.
    ConnectWithPath = "connect_with_path", true, Some(400);
    /// A `CONNECT` without `:authority`: `400`.
    MissingAuthority = "missing_authority", true, Some(400);
    /// A `CONNECT` whose `:authority` is not `ip:port`: `400`.
    BadAuthority = "bad_authority", true, Some(400);
    /// A `CONNECT` to an address other than the connection's own: `400`.
    AuthorityNotLocal = "authority_not_local", true, Some(400);
    /// A `CONNECT` to one of the daemon's own ports: `503`.
    Recursion = "recursion", true, Some(503);
    /// The application port is closed: `503`.
    InboundAppUnreachable = "inbound_app_unreachable", true, Some(503);
    /// Plaintext inbound whose original destination cannot be read.
    InboundPlaintextNoOriginalDst = "inbound_plaintext_no_original_dst", true, None;
    /// Plaintext inbound to an address of no local workload.
    InboundPlaintextUnknownDestination = "inbound_plaintext_unknown_destination", true, None;
    /// Plaintext inbound to one of the daemon's own ports.
    InboundPlaintextRecursion = "inbound_plaintext_recursion", true, None;
    /// Plaintext inbound to a destination that requires mutual TLS.
    InboundPlaintextStrict = "inbound_plaintext_strict", true, None;
    /// Plaintext inbound whose application port is closed.
    InboundPlaintextAppUnreachable = "inbound_plaintext_app_unreachable", true, None;
    /// Too many connections to an admin, metrics or readiness endpoint.
    AdminConnectionLimit = "admin_connection_limit", true, None;
    /// A request to a mutating admin endpoint without the admin token: `401`.
    AdminUnauthorized = "admin_unauthorized", false, Some(401);
    /// Denied by policy.
    PolicyDenied = "policy_denied", false, Some(401);
    /// An open connection closed because a policy change now denies it.
    PolicyRevoked = "policy_revoked", false, None;
    /// An open connection closed because a revocation list now revokes its peer's
    /// certificate.
    CertificateRevoked = "certificate_revoked", false, None;
    /// An enrollment client that sent no request in time.
    EnrollmentTimeout = "enrollment_timeout", false, None;
    /// A malformed enrollment request.
    EnrollmentBadRequest = "enrollment_bad_request", false, None;
    /// A pod that another mesh (Istio) already handles.
    EnrollmentOtherMesh = "enrollment_other_mesh", false, None;
    /// A pod that cannot be enrolled yet: the plugin retries.
    EnrollmentTryAgain = "enrollment_try_again", false, None;
    /// A pod whose enrollment failed.
    EnrollmentFailed = "enrollment_failed", false, None;
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Counts a refusal in `$metrics` ([`crate::metrics::Metrics`]) and logs one warning with its
/// `reason` label and the given fields and message, throttled or not as the reason says.
#[macro_export]
macro_rules! refused {
    ($metrics:expr, $reason:expr, $($arg:tt)+) => {{
        let reason: $crate::refusal::Reason = $reason;
        $metrics.refused(reason);
        if reason.throttled() {
            $crate::warn_throttled!(reason = reason.label(), $($arg)+);
        } else {
            ::tracing::warn!(reason = reason.label(), $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::Reason;
    use std::collections::BTreeSet;

    #[test]
    fn labels_are_distinct_snake_case_and_policy_denials_are_never_throttled() {
        let labels: BTreeSet<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len(), "a label used twice");
        for r in Reason::ALL {
            let l = r.label();
            assert!(
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{l}"
            );
            assert_eq!(r.to_string(), l);
        }
        assert!(!Reason::PolicyDenied.throttled());
        assert!(!Reason::PolicyRevoked.throttled());
        // What a peer can provoke before it authenticates, as fast as it likes.
        for r in [
            Reason::InboundTlsHandshake,
            Reason::InboundTlsFirstBytesTimeout,
            Reason::InboundUnknownDestination,
            Reason::InboundNoCertificate,
            Reason::InboundHandshakeLimit,
        ] {
            assert!(r.throttled(), "{r}");
        }
    }
}
