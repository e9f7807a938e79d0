//! The daemon's HTTP endpoints: admin (`/config_dump`, `/connections`, `/logging`; localhost
//! only), metrics (`/metrics`, Prometheus text) and readiness (`/healthz/ready`).
//!
//! The node's loopback is shared with every host-network pod, so the one request that changes
//! the daemon (`/logging`) also needs a local credential: `Authorization: Bearer <token>`, the
//! token the daemon writes at start to `<state-dir>/admin-token` (mode 0600, root only). Without
//! it the answer is `401`, counted as `admin_unauthorized`.
//!
//! Each is a small HTTP/1.1 server (hyper). Handlers read shared state; nothing here touches
//! the data path. `/config_dump` never includes private keys. Metrics and readiness listen on
//! every address, so each endpoint caps its open connections ([`ENDPOINT_CONNECTIONS`]: a
//! scraper or a prober needs one or two): a peer over its address's cap is reset; when every
//! place is held, a newcomer from an address holding fewer takes the place of the oldest
//! connection of the address holding the most (which is closed), so a few addresses cannot
//! keep the kubelet's probe or the scraper out; either is counted as `admin_connection_limit`
//! and logged (throttled). A request's headers must arrive within 10 s.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;

use crate::discovery::Discovery;
use crate::gate::{Gate, Limits, WhenFull};
use crate::hbone::pool::Pool;
use crate::identity::CertManager;
use crate::metrics::Metrics;
use crate::proxy::conns::ConnTable;
use crate::refusal::Reason;

/// What the admin endpoints show.
pub struct AdminState {
    /// The node this daemon serves.
    pub node: String,
    pub discovery: Discovery,
    pub certs: Arc<CertManager>,
    pub pool: Pool,
    pub connections: Arc<ConnTable>,
    pub registry: Registry,
    /// Counts refused connections.
    pub metrics: Arc<Metrics>,
    /// Whether the daemon is ready (certificates loaded, discovery synced).
    pub ready: tokio::sync::watch::Receiver<bool>,
    /// Changes the log filter at run time; gets the new directive, returns an error text.
    pub set_log_level: SetLogLevel,
    /// The bearer token `/logging` requires ([`write_token`]).
    pub token: String,
}

/// The file, in the state directory, holding the admin token.
pub const TOKEN_FILE: &str = "admin-token";

/// A fresh random token, written to `<dir>/admin-token` readable by its owner only (the file
/// is replaced, never widened).
pub fn write_token(dir: &std::path::Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| std::io::Error::other("no system randomness"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(dir)?;
    let path = dir.join(TOKEN_FILE);
    let tmp = dir.join(format!(".{TOKEN_FILE}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}

/// Whether `req` carries `Authorization: Bearer <token>` (compared in constant time).
fn authorized<B>(req: &Request<B>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len()
        && !token.is_empty()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type Body = Full<Bytes>;

/// Changes the log filter at run time; gets the new directive, returns an error text.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response")
}

fn json_reply(v: &serde_json::Value) -> Response<Body> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec_pretty(v).unwrap_or_default(),
    )
}

/// The JSON of `/config_dump`.
pub fn config_dump(s: &AdminState) -> serde_json::Value {
    let state = s.discovery.current();
    let certs: Vec<_> = s
        .certs
        .certs()
        .iter()
        .map(|c| {
            json!({
                "identity": c.identity.to_string(),
                "serial": c.serial,
                "notBefore": humantime::format_rfc3339_seconds(c.not_before).to_string(),
                "notAfter": humantime::format_rfc3339_seconds(c.not_after).to_string(),
                "chainLength": c.chain.len(),
                // Roots it trusts peers by: two while a CA root rotation is in progress.
                "roots": c.roots.len(),
            })
        })
        .collect();
    json!({
        "discovery": state.dump(),
        "certificates": certs,
        // Revocation lists in force (`null`: none configured).
        "revocation": {"lists": s.certs.revocation().lists_in_force()},
        "pool": s.pool.connections(),
    })
}

async fn admin(s: Arc<AdminState>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    Ok(match (req.method(), path) {
        (&Method::GET, "/config_dump") => json_reply(&config_dump(&s)),
        (&Method::GET, "/connections") => json_reply(&json!({
            "connections": s.connections.rows(),
            "pool": s.pool.connections(),
        })),
        (&Method::POST, "/logging") | (&Method::PUT, "/logging") if !authorized(&req, &s.token) => {
            crate::refused!(
                s.metrics,
                Reason::AdminUnauthorized,
                "admin /logging refused: no valid token"
            );
            reply(
                Reason::AdminUnauthorized
                    .status()
                    .unwrap_or(StatusCode::UNAUTHORIZED),
                "text/plain",
                format!("a bearer token is required: the one in <state-dir>/{TOKEN_FILE}\n"),
            )
        }
        (&Method::POST, "/logging") | (&Method::PUT, "/logging") => {
            let level = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")))
                .unwrap_or("");
            match (s.set_log_level)(level) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "text/plain",
                    format!("log level set to {level}\n"),
                ),
                Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            }
        }
        (&Method::GET, "/metrics") => metrics(&s),
        (&Method::GET, "/explain") => {
            let q = req.uri().query().unwrap_or("");
            let param = |name: &str| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .unwrap_or("")
                    .to_owned()
            };
            let state = s.discovery.current();
            match crate::explain::explain(&state, &s.node, &param("from"), &param("to")) {
                Ok(e) => json_reply(&serde_json::to_value(&e).unwrap_or_default()),
                Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

fn metrics(s: &AdminState) -> Response<Body> {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            out,
        ),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "encoding failed\n",
        ),
    }
}

async fn metrics_only(
    s: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" | "/stats/prometheus" => metrics(&s),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

async fn readiness(
    s: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz/ready" if *s.ready.borrow() => reply(StatusCode::OK, "text/plain", "ready\n"),
        "/healthz/ready" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

/// Which endpoint set a listener serves.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

/// Open connections to one endpoint, per source address and in all.
pub const ENDPOINT_CONNECTIONS: Limits = Limits {
    total: 256,
    per_peer: 16,
};

/// Serves `endpoint` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    state: Arc<AdminState>,
    shutdown: impl Future<Output = ()>,
) {
    let gate = Gate::with(
        "connections",
        ENDPOINT_CONNECTIONS,
        WhenFull::EvictLargest,
        None,
    );
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let permit = match gate.try_admit(peer.ip()) {
            Ok(p) => p,
            Err(full) => {
                crate::refused!(state.metrics, Reason::AdminConnectionLimit, %peer, ?endpoint, error = %full, "admin connection refused");
                crate::net::reset(tcp);
                continue;
            }
        };
        let state = state.clone();
        let state_metrics = state.metrics.clone();
        tokio::spawn(async move {
            let mut permit = permit;
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move {
                    match endpoint {
                        Endpoint::Admin => admin(state, req).await,
                        Endpoint::Metrics => metrics_only(state, req).await,
                        Endpoint::Readiness => readiness(state, req).await,
                    }
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                done = conn => if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "admin connection error");
                },
                () = permit.evicted() => {
                    crate::refused!(state_metrics, Reason::AdminConnectionLimit, %peer, ?endpoint, "admin connection closed: its place went to a newcomer from an address holding fewer");
                }
            }
        });
    }
}
