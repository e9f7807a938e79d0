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
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::consts;
use super::early::Early;
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

/// A client connection after its handshakes: the sender of its requests, the connection to
/// drive, and the chain the server presented (leaf first).
pub type Handshaken = (
    SendRequest<Bytes>,
    Connection<Transport, Bytes>,
    Vec<CertificateDer<'static>>,
);

impl ClientError {
    /// Whether the TLS handshake failed because a revocation list revokes the server's
    /// certificate.
    pub fn revoked(&self) -> bool {
        match self {
            ClientError::Tls { source, .. } => crate::identity::crl::is_revoked_io(source),
            _ => false,
        }
    }

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
    let tcp = net::connect(addr, opts)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let (send, conn, _chain) = handshake(tcp, addr, tls, opts.timeout).await?;
    Ok((send, conn))
}

/// The TLS and HTTP/2 handshakes of a tunnel connection on `tcp`, connected to `addr`, the
/// TLS one within `timeout`.
pub async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    timeout: std::time::Duration,
) -> Result<Handshaken, ClientError> {
    // No SNI is sent (the config disables it); the name only satisfies the API.
    let name = ServerName::IpAddress(addr.ip().into());
    let tls_stream = tokio::time::timeout(timeout, TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| ClientError::Tls {
            addr,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"),
        })?
        .map_err(|source| ClientError::Tls { addr, source })?;
    if tls_stream.get_ref().1.alpn_protocol() != Some(consts::ALPN_H2) {
        return Err(ClientError::Alpn { addr });
    }
    let chain = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(consts::STREAM_WINDOW)
        .initial_connection_window_size(consts::CONNECTION_WINDOW)
        .max_frame_size(consts::MAX_FRAME_SIZE)
        .max_send_buffer_size(consts::MAX_FRAME_SIZE as usize)
        .max_header_list_size(consts::CLIENT_MAX_HEADER_LIST)
        .initial_max_send_streams(consts::CLIENT_ASSUMED_MAX_STREAMS)
        .enable_push(false)
        .handshake(tls_stream)
        .await?;
    Ok((send, conn, chain))
}

/// Builds a classic CONNECT request to `target` with the optional headers.
pub fn connect_request(
    target: SocketAddr,
    headers: &ConnectHeaders,
) -> Result<Request<()>, http::Error> {
    let mut b = Request::builder()
        .method(Method::CONNECT)
        .uri(super::authority(target));
    if let Some(v) = headers.forwarded() {
        b = b.header(consts::FORWARDED, v);
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
    open_stream_with(sender, req, &mut Early::default()).await
}

/// Like [`open_stream`], sending the client's `early` bytes right behind the request: those
/// already taken at once, then those the client writes while the answer is in flight, instead
/// of a round trip later ([`super::early`]). The peer holds them in the stream's flow-control
/// window and forwards them only if it answers `200`.
pub async fn open_stream_with(
    sender: SendRequest<Bytes>,
    req: Request<()>,
    early: &mut Early<'_>,
) -> Result<(SendStream<Bytes>, RecvStream), ClientError> {
    let mut sender = sender.ready().await?;
    let (response, mut send) = sender.send_request(req, false)?;
    // All within the initial stream window (`EARLY_LIMIT`): h2 sends each at once. A stream
    // the peer has already answered and reset (a refusal can arrive before these are sent)
    // takes nothing more; its answer, read below, tells why.
    let sent = early
        .chunks()
        .iter()
        .all(|chunk| send.send_data(chunk.clone(), false).is_ok());
    if !sent {
        early.stop();
    }
    tokio::pin!(response);
    let response = loop {
        tokio::select! {
            biased;
            r = &mut response => break r?,
            more = early.next() => {
                if send.send_data(more, false).is_err() {
                    early.stop();
                }
            }
        }
    };
    if response.status() != StatusCode::OK {
        return Err(ClientError::Status(response.status()));
    }
    Ok((send, response.into_body()))
}

/// Sends a ping every [`consts::PING_INTERVAL`]; returns when one is not answered within
/// [`consts::PING_TIMEOUT`] or the connection failed. Without a ping handle (h2 gives it out
/// once) it never returns.
pub async fn keepalive(ping: Option<PingPong>) -> Result<(), &'static str> {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::{connect_request, open_stream_with};
    use crate::hbone::early::Early;

    /// A peer that answers a `CONNECT` only once `want` bytes of its body have arrived, and
    /// returns them.
    async fn answer_after(l: TcpListener, want: usize) -> Vec<u8> {
        let (tcp, _) = l.accept().await.unwrap();
        let mut conn = h2::server::handshake(tcp).await.unwrap();
        let (req, mut respond) = conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut body = req.into_body();
        let mut got = Vec::new();
        while got.len() < want {
            let data = body.data().await.expect("more body").unwrap();
            let _ = body.flow_control().release_capacity(data.len());
            got.extend_from_slice(&data);
        }
        let ok = Response::builder().status(StatusCode::OK).body(()).unwrap();
        let _send = respond.send_response(ok, false).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        got
    }

    #[tokio::test]
    async fn bytes_written_while_the_answer_is_in_flight_go_out_before_it() {
        // The application's connection to the daemon: `c` is the client, `s` the accepted end.
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(app.local_addr().unwrap()).await.unwrap();
        let (s, _) = app.accept().await.unwrap();
        c.write_all(b"hello").await.unwrap();
        s.readable().await.unwrap();
        let mut early = Early::read(&s).unwrap();
        assert_eq!(early.len(), 5);

        let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = peer.local_addr().unwrap();
        let peer = tokio::spawn(answer_after(peer, 11));
        let (sender, conn) = h2::client::handshake(TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        tokio::spawn(conn);
        // The rest of the request, written once the CONNECT is on its way.
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.write_all(b" world").await.unwrap();
            c
        });
        let req: Request<()> = connect_request(addr, &Default::default()).unwrap();
        let opened = tokio::time::timeout(
            Duration::from_secs(5),
            open_stream_with(sender, req, &mut early),
        )
        .await
        .expect("answered: the late bytes went out before the answer")
        .expect("200");
        assert_eq!(peer.await.unwrap(), b"hello world");
        let kept: Vec<Bytes> = early.chunks().to_vec();
        assert_eq!(kept.concat(), b"hello world", "kept for a retry");
        drop((opened, late));
    }
}
