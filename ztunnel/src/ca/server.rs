//! `ztunnel ca`'s server: HTTP/2 over TLS 1.3, `POST /v1/sign` (see `ztunnel_proto::ca`).
//!
//! Who may have which identity is decided by a [`SignAuthorizer`] (async): a static bearer
//! token list ([`StaticTokenAuthorizer`], compared in constant time) or Kubernetes
//! (`super::kube`). A peer must finish its TLS handshake and send the HTTP/2 client preface
//! within one deadline from the accept, send each request's body within the request timeout
//! and is answered within it again; a connection with no stream for the idle timeout is closed
//! (GOAWAY); a request's headers are capped ([`MAX_HEADER_LIST`], answered `431` beyond: h2
//! keeps no more of them) and so are bodies; connections, streams, requests in flight (from a complete body
//! until answered) and the request rate of each source address are capped ([`super::limits`]);
//! a connection whose place the connection gate gives to a newcomer (every place held, its
//! address holding the most) is closed at once, whatever its stage;
//! every refusal is logged with its reason (never the token; throttled unless it is a `403` to
//! an authenticated caller) and counted in `ztunnel_ca_refusals_total{reason}`; `GET /metrics`
//! on the same port serves the counters.
//!
//! The signing material is a `watch` of [`LocalCa`]: each request signs with the current one,
//! and when it changes (rotation) the serving certificate is re-issued from the new material
//! for the connections accepted from then on.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use ztunnel_proto::ca::{ErrorBody, SignRequest, MAX_BODY, SIGN_PATH};

use tokio::sync::watch;

use super::limits::{Guard, EVICTED};
use super::metrics::CaMetrics;
use super::{Error, LocalCa};
use crate::config::CaLimits;
use crate::hbone::server::Idle;
use crate::identity::{tls::provider, BoxFuture, Identity};

/// How often the rate limiter forgets the addresses that have been quiet long enough.
const FORGET_IDLE_EVERY: Duration = Duration::from_secs(60);

/// The most a request's headers may take, decoded: a signing request carries a path and a
/// bearer token (a projected token is a few KiB). h2's default, 16 MiB, would let every
/// stream of a connection that has not authenticated hold that much while its body is awaited.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// Why a caller may not have an identity: `reason` is a short label for the refusal counter,
/// `detail` the message sent back and logged (never a token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// 401: no token, or one that does not authenticate for this CA.
    #[error("{detail}")]
    Unauthenticated {
        reason: &'static str,
        detail: String,
    },
    /// 403: an authenticated caller that may not have this identity.
    #[error("{detail}")]
    Forbidden {
        reason: &'static str,
        detail: String,
    },
    /// 500: the decision could not be made (e.g. the API server did not answer).
    #[error("{0}")]
    Unavailable(String),
    /// 503: the decision was not attempted, for want of capacity (e.g. too many TokenReviews
    /// in flight); the caller may try again shortly.
    #[error("{detail}")]
    Busy {
        reason: &'static str,
        detail: String,
    },
}

impl Denied {
    pub fn unauthenticated(reason: &'static str, detail: impl Into<String>) -> Self {
        Denied::Unauthenticated {
            reason,
            detail: detail.into(),
        }
    }
    pub fn forbidden(reason: &'static str, detail: impl Into<String>) -> Self {
        Denied::Forbidden {
            reason,
            detail: detail.into(),
        }
    }
    pub fn status(&self) -> StatusCode {
        match self {
            Denied::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Denied::Forbidden { .. } => StatusCode::FORBIDDEN,
            Denied::Unavailable(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Denied::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Unauthenticated { reason, .. }
            | Denied::Forbidden { reason, .. }
            | Denied::Busy { reason, .. } => reason,
            Denied::Unavailable(_) => "unavailable",
        }
    }
}

/// Decides whether the holder of a bearer token may get a certificate for an identity.
pub trait SignAuthorizer: Send + Sync + 'static {
    fn authorize<'a>(
        &'a self,
        bearer_token: Option<&'a str>,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<(), Denied>>;
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

impl StaticTokenAuthorizer {
    fn check(&self, token: Option<&str>) -> Result<(), Denied> {
        let token = token
            .ok_or_else(|| Denied::unauthenticated("no_token", "missing bearer token"))?
            .as_bytes();
        // Compare against every token so timing does not tell which one matched.
        let ok = self
            .tokens
            .iter()
            .fold(false, |acc, t| acc | constant_time_eq(t, token));
        if ok {
            Ok(())
        } else {
            Err(Denied::unauthenticated("unknown_token", "unknown token"))
        }
    }
}

impl SignAuthorizer for StaticTokenAuthorizer {
    fn authorize<'a>(
        &'a self,
        token: Option<&'a str>,
        _identity: &'a Identity,
    ) -> BoxFuture<'a, Result<(), Denied>> {
        Box::pin(std::future::ready(self.check(token)))
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

/// Serves signing requests on `listener` until `shutdown` resolves, signing with the current
/// value of `ca`, within `limits` ([`super::limits`]).
pub async fn serve(
    listener: TcpListener,
    mut ca: watch::Receiver<Arc<LocalCa>>,
    auth: Arc<dyn SignAuthorizer>,
    server_names: Vec<String>,
    metrics: Arc<CaMetrics>,
    limits: CaLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let mut acceptor = tls_acceptor(&ca.borrow_and_update(), &server_names)?;
    let guard = Arc::new(Guard::new(limits, Some(metrics.connections_gauge())));
    let mut forget = tokio::time::interval(FORGET_IDLE_EVERY);
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
            _ = forget.tick() => {
                guard.forget_idle();
                continue;
            }
            _ = &mut shutdown => return Ok(()),
        };
        let connection = match guard.admit_connection(peer.ip()) {
            Ok(permit) => permit,
            Err(refused) => {
                metrics.refused(refused.reason());
                crate::warn_throttled!(%peer, error = %refused, "CA: connection refused");
                crate::net::reset(tcp);
                continue;
            }
        };
        if ca.has_changed().unwrap_or(false) {
            let current = ca.borrow_and_update().clone();
            match tls_acceptor(&current, &server_names) {
                Ok(a) => {
                    acceptor = a;
                    tracing::info!("CA: serving certificate re-issued from the new material");
                }
                Err(e) => {
                    tracing::error!(error = %e, "CA: cannot re-issue the serving certificate; keeping the old one")
                }
            }
        }
        let (acceptor, ca, auth, metrics, guard) = (
            acceptor.clone(),
            ca.clone(),
            auth.clone(),
            metrics.clone(),
            guard.clone(),
        );
        // One deadline from the accept for the TLS handshake and the HTTP/2 preface.
        let deadline = Instant::now() + guard.limits().handshake_timeout;
        tokio::spawn(async move {
            let mut connection = connection;
            tokio::select! {
                () = connect(tcp, peer, deadline, acceptor, ca, auth, metrics.clone(), guard) => {}
                // Dropping the connection's future closes it, whatever stage it is at.
                () = connection.evicted() => {
                    metrics.refused(EVICTED);
                    crate::warn_throttled!(%peer, "CA: connection closed: its place went to a peer from an address holding fewer");
                }
            }
        });
    }
}

/// Makes one accepted connection a client (TLS, then the HTTP/2 preface, both by `deadline`)
/// and serves it.
#[allow(clippy::too_many_arguments)]
async fn connect(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    acceptor: TlsAcceptor,
    ca: watch::Receiver<Arc<LocalCa>>,
    auth: Arc<dyn SignAuthorizer>,
    metrics: Arc<CaMetrics>,
    guard: Arc<Guard>,
) {
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        // A connection closed before any TLS byte is a TCP probe (readiness): quiet.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return tracing::debug!(%peer, error = %e, "CA: connection closed before TLS")
        }
        Ok(Err(e)) => {
            metrics.refused("tls_handshake");
            return crate::warn_throttled!(%peer, error = %e, "CA: TLS handshake failed");
        }
        Err(_) => {
            metrics.refused("tls_timeout");
            return crate::warn_throttled!(%peer, "CA: TLS handshake timed out");
        }
    };
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(guard.limits().streams_per_connection)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake(tls);
    let conn = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            metrics.refused("http2_error");
            return crate::warn_throttled!(%peer, error = %e, "CA: HTTP/2 handshake failed");
        }
        Err(_) => {
            metrics.refused("preface_timeout");
            return crate::warn_throttled!(%peer, "CA: no HTTP/2 preface in time");
        }
    };
    serve_connection(conn, peer, ca, auth, metrics, guard).await;
}

/// Answers the requests of one connection, each in its own task, until the peer goes away or
/// the connection has been idle (no stream started for the idle timeout and none open): then a
/// GOAWAY, and the connection is dropped once closed or after the request timeout.
async fn serve_connection<T>(
    mut conn: h2::server::Connection<T, Bytes>,
    peer: SocketAddr,
    ca: watch::Receiver<Arc<LocalCa>>,
    auth: Arc<dyn SignAuthorizer>,
    metrics: Arc<CaMetrics>,
    guard: Arc<Guard>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let limits = *guard.limits();
    let mut streams = Idle::new(limits.idle_timeout, Instant::now());
    // The idle check; once draining, the end of the drain.
    let timer = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(timer);
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let held = streams.start(Instant::now());
                    let (ca, auth, metrics, guard) =
                        (ca.clone(), auth.clone(), metrics.clone(), guard.clone());
                    tokio::spawn(async move {
                        answer(req, respond, peer, &ca, &*auth, &metrics, &guard).await;
                        drop(held);
                    });
                }
                // The peer went away.
                Some(Err(e)) if e.is_io() => {
                    return tracing::debug!(%peer, error = %e, "CA: connection ended")
                }
                // A protocol violation (headers far over the cap, a garbled frame): h2 has
                // sent its GOAWAY.
                Some(Err(e)) => {
                    metrics.refused("http2_error");
                    return crate::warn_throttled!(%peer, error = %e, "CA: connection closed on an HTTP/2 error");
                }
                None => return,
            },
            _ = &mut timer => {
                if draining {
                    return tracing::debug!(%peer, "CA: idle connection dropped after its GOAWAY");
                }
                match streams.check(Instant::now()) {
                    Some(later) => timer.as_mut().reset(later),
                    None => {
                        tracing::debug!(%peer, idle = ?limits.idle_timeout, "CA: idle connection closed");
                        draining = true;
                        conn.graceful_shutdown();
                        timer.as_mut().reset(Instant::now() + limits.request_timeout);
                    }
                }
            }
        }
    }
}

/// Reads one request's body (within the request timeout), then takes its place in flight
/// and answers it (within the request timeout again).
async fn answer(
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: SocketAddr,
    ca: &watch::Receiver<Arc<LocalCa>>,
    auth: &dyn SignAuthorizer,
    metrics: &CaMetrics,
    guard: &Guard,
) {
    let timeout = guard.limits().request_timeout;
    let (head, body) = req.into_parts();
    let outcome = match tokio::time::timeout(timeout, read_body(body)).await {
        Err(_) => Outcome::refused(
            "body_timeout",
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time".into(),
        ),
        Ok(Err((status, body))) => Outcome {
            status,
            content_type: "application/json",
            body,
            refusal: Some("bad_request"),
        },
        Ok(Ok(body)) => match guard.admit_request(peer.ip()) {
            Ok(_in_flight) => {
                match tokio::time::timeout(timeout, handle(ca, auth, metrics, &head, body)).await {
                    Ok(r) => r,
                    Err(_) => Outcome::refused(
                        "timeout",
                        StatusCode::REQUEST_TIMEOUT,
                        "request timed out".into(),
                    ),
                }
            }
            Err(refused) => Outcome::refused(
                refused.reason(),
                StatusCode::TOO_MANY_REQUESTS,
                refused.to_string(),
            ),
        },
    };
    if let Some(reason) = outcome.refusal {
        metrics.refused(reason);
        let (status, body) = (
            outcome.status.as_u16(),
            String::from_utf8_lossy(&outcome.body),
        );
        // A daemon refused an identity is never throttled; any other caller (a pod's own
        // ServiceAccount token is authenticated too, and refused `not_daemon`) is.
        if outcome.status == StatusCode::FORBIDDEN && reason != "not_daemon" {
            tracing::warn!(%peer, status, reason, %body, "CA: request refused");
        } else {
            crate::warn_throttled!(%peer, status, reason, %body, "CA: request refused");
        }
    }
    reply(respond, outcome.status, outcome.content_type, outcome.body);
}

/// An answer, and the refusal reason to count when it is one.
struct Outcome {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    refusal: Option<&'static str>,
}

impl Outcome {
    fn refused(reason: &'static str, status: StatusCode, msg: String) -> Self {
        let (status, body) = error(status, msg);
        Outcome {
            status,
            content_type: "application/json",
            body,
            refusal: Some(reason),
        }
    }
    fn ok(content_type: &'static str, body: Bytes) -> Self {
        Outcome {
            status: StatusCode::OK,
            content_type,
            body,
            refusal: None,
        }
    }
}

fn error(status: StatusCode, msg: String) -> (StatusCode, Bytes) {
    let body = serde_json::to_vec(&ErrorBody { error: msg }).unwrap_or_default();
    (status, body.into())
}

fn reply(
    mut respond: SendResponse<Bytes>,
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) {
    let resp = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
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
    ca: &watch::Receiver<Arc<LocalCa>>,
    auth: &dyn SignAuthorizer,
    metrics: &CaMetrics,
    req: &http::request::Parts,
    body: Bytes,
) -> Outcome {
    if req.method == Method::GET && req.uri.path() == "/metrics" {
        return Outcome::ok(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode().into(),
        );
    }
    if req.method != Method::POST || req.uri.path() != SIGN_PATH {
        return Outcome::refused(
            "not_found",
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {} {}", req.method, req.uri.path()),
        );
    }
    let token = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let bad = |m: String| Outcome::refused("bad_request", StatusCode::BAD_REQUEST, m);
    let sign_req: SignRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("malformed request: {e}")),
    };
    let id: Identity = match sign_req.identity.parse() {
        Ok(id) => id,
        Err(e) => return bad(e.to_string()),
    };
    if let Err(d) = auth.authorize(token.as_deref(), &id).await {
        return Outcome::refused(d.reason(), d.status(), d.to_string());
    }
    let current = ca.borrow().clone();
    match current.sign(&sign_req, SystemTime::now()) {
        Ok(resp) => {
            metrics.signed();
            tracing::info!(identity = %id, "CA: signed");
            Outcome::ok(
                "application/json",
                serde_json::to_vec(&resp).unwrap_or_default().into(),
            )
        }
        Err(Error::BadRequest(m)) => bad(m),
        Err(e) => Outcome::refused("internal", StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests;
