//! `ztunnel ca`'s server: HTTP/2 over TLS 1.3, `POST /v1/sign` (see `ztunnel_proto::ca`).
//!
//! Who may have which identity is decided by a [`SignAuthorizer`]; here a static bearer token
//! list ([`StaticTokenAuthorizer`]), compared in constant time. A peer must finish its TLS
//! handshake within 10 s and send its request within 10 s; bodies are capped; every refusal is
//! logged with its reason.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use ztunnel_proto::ca::{ErrorBody, SignRequest, MAX_BODY, SIGN_PATH};

use super::{Error, LocalCa};
use crate::identity::{tls::provider, Identity};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a caller may not have an identity.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("missing or unknown token")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
}

/// Decides whether the holder of a bearer token may get a certificate for an identity.
pub trait SignAuthorizer: Send + Sync + 'static {
    fn authorize(&self, bearer_token: Option<&str>, identity: &Identity) -> Result<(), Denied>;
}

/// Accepts any identity for a holder of one of a fixed list of tokens.
pub struct StaticTokenAuthorizer {
    tokens: Vec<Vec<u8>>,
}

impl StaticTokenAuthorizer {
    /// One token per non-empty line of `path`.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
        )
        .map_err(|reason| Error::Token {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn new(tokens: Vec<String>) -> Result<Self, String> {
        if tokens.is_empty() {
            return Err("no token".into());
        }
        Ok(StaticTokenAuthorizer {
            tokens: tokens.into_iter().map(String::into_bytes).collect(),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl SignAuthorizer for StaticTokenAuthorizer {
    fn authorize(&self, token: Option<&str>, _identity: &Identity) -> Result<(), Denied> {
        let token = token.ok_or(Denied::Unauthenticated)?.as_bytes();
        // Compare against every token so timing does not tell which one matched.
        let ok = self
            .tokens
            .iter()
            .fold(false, |acc, t| acc | constant_time_eq(t, token));
        if ok {
            Ok(())
        } else {
            Err(Denied::Unauthenticated)
        }
    }
}

fn tls_acceptor(ca: &LocalCa, names: &[String]) -> Result<TlsAcceptor, Error> {
    let (chain_pem, key_pem) = ca.issue_server_cert(names)?;
    let chain = crate::identity::parse_pem_certs(&[chain_pem])?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::Invalid(format!("serving key: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

use rustls_pki_types::pem::PemObject;

/// Serves signing requests on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    ca: Arc<LocalCa>,
    auth: Arc<dyn SignAuthorizer>,
    server_names: Vec<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let acceptor = tls_acceptor(&ca, &server_names)?;
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "CA accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let (acceptor, ca, auth) = (acceptor.clone(), ca.clone(), auth.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return tracing::warn!(%peer, error = %e, "CA: TLS handshake failed"),
                Err(_) => return tracing::warn!(%peer, "CA: TLS handshake timed out"),
            };
            let mut conn = match h2::server::handshake(tls).await {
                Ok(c) => c,
                Err(e) => return tracing::warn!(%peer, error = %e, "CA: HTTP/2 handshake failed"),
            };
            while let Some(Ok((req, respond))) = conn.accept().await {
                let (ca, auth) = (ca.clone(), auth.clone());
                tokio::spawn(async move {
                    let (status, body) =
                        match tokio::time::timeout(REQUEST_TIMEOUT, handle(&ca, &*auth, req)).await
                        {
                            Ok(r) => r,
                            Err(_) => {
                                error(StatusCode::REQUEST_TIMEOUT, "request timed out".into())
                            }
                        };
                    if status != StatusCode::OK {
                        tracing::warn!(%peer, status = status.as_u16(), body = %String::from_utf8_lossy(&body), "CA: request refused");
                    }
                    reply(respond, status, body);
                });
            }
        });
    }
}

fn error(status: StatusCode, msg: String) -> (StatusCode, Bytes) {
    let body = serde_json::to_vec(&ErrorBody { error: msg }).unwrap_or_default();
    (status, body.into())
}

fn reply(mut respond: SendResponse<Bytes>, status: StatusCode, body: Bytes) {
    let resp = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(())
        .expect("static response");
    if let Ok(mut s) = respond.send_response(resp, false) {
        let _ = s.send_data(body, true);
    }
}

async fn read_body(mut body: RecvStream) -> Result<Bytes, (StatusCode, Bytes)> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > MAX_BODY {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large".into(),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

async fn handle(
    ca: &LocalCa,
    auth: &dyn SignAuthorizer,
    req: Request<RecvStream>,
) -> (StatusCode, Bytes) {
    if req.method() != Method::POST || req.uri().path() != SIGN_PATH {
        return error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {} {}", req.method(), req.uri().path()),
        );
    }
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(e) => return e,
    };
    let sign_req: SignRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed request: {e}")),
    };
    let id: Identity = match sign_req.identity.parse() {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match auth.authorize(token.as_deref(), &id) {
        Ok(()) => {}
        Err(d @ Denied::Unauthenticated) => return error(StatusCode::UNAUTHORIZED, d.to_string()),
        Err(d @ Denied::Forbidden(_)) => return error(StatusCode::FORBIDDEN, d.to_string()),
    }
    match ca.sign(&sign_req, SystemTime::now()) {
        Ok(resp) => {
            tracing::info!(identity = %id, "CA: signed");
            (
                StatusCode::OK,
                serde_json::to_vec(&resp).unwrap_or_default().into(),
            )
        }
        Err(Error::BadRequest(m)) => error(StatusCode::BAD_REQUEST, m),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
