//! The HBONE client: a mutual-TLS connection to a peer's port 15008 running HTTP/2, and
//! classic `CONNECT` streams over it (`:method CONNECT`, `:authority ip:port`, nothing else).
//!
//! A stream is handed back only after the peer answered `200`; any other status is an error
//! carrying that status. The connection's driver task keeps it alive with pings and ends it
//! when a ping goes unanswered (see [`super::consts::PING_TIMEOUT`]).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use h2::{Ping, PingPong, RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::consts;
use super::ConnectHeaders;
use crate::net;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("peer {addr} did not negotiate h2")]
    Alpn { addr: SocketAddr },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("CONNECT refused with status {0}")]
    Status(StatusCode),
    #[error("invalid request: {0}")]
    Request(#[from] http::Error),
}

impl ClientError {
    /// Whether the peer provably did not process the request, so it may be sent again on
    /// another connection: the connection was going away (GOAWAY) or refused the stream.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::H2(e) => {
                e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_io()
            }
            _ => false,
        }
    }

    /// The HTTP status the peer answered, if it answered one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status(s) => Some(*s),
            _ => None,
        }
    }
}

/// A tunnel connection's TLS transport.
pub type Transport = TlsStream<TcpStream>;

/// Opens TCP (marked) and TLS to `addr` and runs the HTTP/2 handshake with the tunnel's
/// settings. Returns the request handle and the connection future the caller must drive.
pub async fn connect(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    opts: net::ConnectOptions,
) -> Result<(SendRequest<Bytes>, Connection<Transport, Bytes>), ClientError> {
    connect_from(addr, tls, opts, &net::Origin::default()).await
}

/// Like [`connect`], with the TCP connection made from `origin` (a pod's netns).
pub async fn connect_from(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    opts: net::ConnectOptions,
    origin: &net::Origin,
) -> Result<(SendRequest<Bytes>, Connection<Transport, Bytes>), ClientError> {
    let tcp = net::connect_from(addr, opts, origin)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    // No SNI is sent (the config disables it); the name only satisfies the API.
    let name = ServerName::IpAddress(addr.ip().into());
    let tls_stream = tokio::time::timeout(opts.timeout, TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| ClientError::Tls {
            addr,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"),
        })?
        .map_err(|source| ClientError::Tls { addr, source })?;
    if tls_stream.get_ref().1.alpn_protocol() != Some(consts::ALPN_H2) {
        return Err(ClientError::Alpn { addr });
    }
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(consts::STREAM_WINDOW)
        .initial_connection_window_size(consts::CONNECTION_WINDOW)
        .max_frame_size(consts::MAX_FRAME_SIZE)
        .max_send_buffer_size(consts::MAX_FRAME_SIZE as usize)
        .enable_push(false)
        .handshake(tls_stream)
        .await?;
    Ok((send, conn))
}

/// Builds a classic CONNECT request to `target` with the optional headers.
pub fn connect_request(
    target: SocketAddr,
    headers: &ConnectHeaders,
) -> Result<Request<()>, http::Error> {
    let mut b = Request::builder()
        .method(Method::CONNECT)
        .uri(super::authority(target));
    if let Some(addr) = headers.forwarded_for {
        b = b.header(consts::FORWARDED, format!("for=\"{addr}\""));
    }
    if let Some(v) = &headers.baggage {
        b = b.header(consts::BAGGAGE, v.as_str());
    }
    if let Some(v) = &headers.traceparent {
        b = b.header(consts::TRACEPARENT, v.as_str());
    }
    b.body(())
}

/// Sends `req` on `sender` and waits for the peer's answer; `200` yields the stream halves.
pub async fn open_stream(
    sender: SendRequest<Bytes>,
    req: Request<()>,
) -> Result<(SendStream<Bytes>, RecvStream), ClientError> {
    open_stream_with(sender, req, None).await
}

/// Like [`open_stream`], sending `first` (bytes the client has already written) right behind
/// the request instead of a round trip later, so that they reach the peer with it. The peer
/// holds them in the stream's flow-control window and forwards them only if it answers `200`.
pub async fn open_stream_with(
    sender: SendRequest<Bytes>,
    req: Request<()>,
    first: Option<&Bytes>,
) -> Result<(SendStream<Bytes>, RecvStream), ClientError> {
    let mut sender = sender.ready().await?;
    let (response, mut send) = sender.send_request(req, false)?;
    if let Some(first) = first {
        // Well within the initial stream window: h2 sends it at once.
        send.send_data(first.clone(), false)?;
    }
    let response = response.await?;
    if response.status() != StatusCode::OK {
        return Err(ClientError::Status(response.status()));
    }
    Ok((send, response.into_body()))
}

/// Sends a ping every [`consts::PING_INTERVAL`]; returns when one is not answered within
/// [`consts::PING_TIMEOUT`] or the connection failed.
pub async fn keepalive(mut ping: PingPong) -> Result<(), &'static str> {
    loop {
        tokio::time::sleep(consts::PING_INTERVAL).await;
        ping.send_ping(Ping::opaque()).map_err(|_| "ping failed")?;
        match tokio::time::timeout(consts::PING_TIMEOUT, poll_fn(|cx| ping.poll_pong(cx))).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err("connection failed"),
            Err(_) => return Err("ping timed out"),
        }
    }
}
