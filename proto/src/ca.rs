//! The certificate signing API between a node daemon and `ztunnel ca`.
//!
//! Transport: HTTP/2 over TLS 1.3 (ALPN `h2`) to the CA's port (default [`DEFAULT_PORT`]).
//! The daemon verifies the CA's serving certificate against the configured root and name.
//!
//! `POST /v1/sign` with `content-type: application/json`, `authorization: Bearer <token>` and a
//! [`SignRequest`] body (at most [`MAX_BODY`] bytes). The daemon generates the key pair and
//! sends only a PKCS#10 CSR whose single SAN is the URI SAN of the requested SPIFFE ID;
//! private keys never leave the node. Answers:
//! - `200` with a [`SignResponse`];
//! - `400` malformed request or CSR (SAN not the requested identity, other trust domain);
//! - `401` missing or unknown token (with the Kubernetes authorizer: a TokenReview that does
//!   not authenticate it for the CA's audience); `403` the caller may not have that identity
//!   (not the node daemon's ServiceAccount, or no active — Pending or Running — pod of that
//!   ServiceAccount on the caller's node);
//! - `500` the CA failed.
//!
//! Every non-200 answer carries an [`ErrorBody`]. `GET /metrics` on the same port serves the
//! CA's counters (OpenMetrics text), without a token.

use serde::{Deserialize, Serialize};

/// Path of the signing endpoint.
pub const SIGN_PATH: &str = "/v1/sign";
/// Default port of `ztunnel ca`.
pub const DEFAULT_PORT: u16 = 15012;
/// Largest request body the CA reads.
pub const MAX_BODY: usize = 64 * 1024;

/// A request to sign a workload certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignRequest {
    /// PEM-encoded PKCS#10 CSR.
    pub csr_pem: String,
    /// The SPIFFE ID the certificate is for.
    pub identity: String,
    /// Requested lifetime in seconds; 0 asks for the CA's maximum. The CA caps it.
    pub lifetime_secs: u64,
}

/// A signed certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignResponse {
    /// The leaf first, then intermediates (never the root), each PEM.
    pub cert_chain_pem: Vec<String>,
    /// The trust bundle: every root a peer's chain may end in, each PEM.
    pub roots_pem: Vec<String>,
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_rejects_unknown_fields() {
        let r = SignRequest {
            csr_pem: "x".into(),
            identity: "spiffe://cluster.local/ns/a/sa/b".into(),
            lifetime_secs: 60,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"csrPem\""), "{json}");
        assert_eq!(serde_json::from_str::<SignRequest>(&json).unwrap(), r);
        let bad = r#"{"csrPem":"x","identity":"y","lifetimeSecs":1,"admin":true}"#;
        assert!(serde_json::from_str::<SignRequest>(bad).is_err());
    }
}
