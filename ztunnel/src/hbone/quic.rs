//! HBONE over QUIC (quinn): the second transport of the same tunnels, on UDP 15008.
//!
//! One QUIC connection per pool key, one bidirectional stream per proxied TCP connection,
//! opened with the stream header of [`ztunnel_proto::quic`] (what `CONNECT` carries) and
//! answered with a status, as the HTTP/2 tunnel answers a `CONNECT`. TLS is the same mutual
//! TLS 1.3 with the same certificates and identity checks (the rustls configurations of
//! [`crate::identity`], with the QUIC ALPN); the transport's receive windows mirror the
//! HTTP/2 tunnel's (4 MiB per stream, 16 MiB per connection) and its keep-alive the pings
//! (10 s, closed after 20 s of silence). What a server connection holds to send is granted
//! from the node's budget ([`ServerConn`]). Each endpoint's UDP socket has buffers large
//! enough for a window's bursts ([`SOCKET_BUFFER`]).
//!
//! Bytes are copied over a stream by [`super::copy_tunnel`].

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{RecvStream, SendStream, TransportConfig, VarInt};
use rustls_pki_types::CertificateDer;
use ztunnel_proto::quic::{self as wire, HeaderError, RequestHeader};

use super::budget::{BufferBudget, OverBudget, Window, FLOOR};
use super::consts;
use super::copy::{CopyError, StreamRecv, StreamSend};
use super::early::Early;
use super::queue::{Queue, CHUNKS_PER_WRITE};
use super::{ConnectHeaders, ADMISSION_WINDOW};
use crate::net::netns::Netns;

/// A peer that does not complete the QUIC handshake within this time is taken as not
/// answering on QUIC: the pool falls back to HTTP/2 ([`super::pool`]).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// A stream whose request header has not arrived by then is refused.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refusal ([`respond`]) waits for the peer to acknowledge it at most.
const REFUSAL_DELIVERY: Duration = Duration::from_secs(2);
/// Application error code of a stream reset because its copy failed or was cut short.
pub(super) const RESET: VarInt = VarInt::from_u32(wire::STREAM_RESET);
/// Application error code of a stream refused unprocessed: the server drains.
const REFUSED: VarInt = VarInt::from_u32(wire::STREAM_REFUSED);

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("QUIC TLS configuration: {0}")]
    Config(String),
    #[error("QUIC connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("QUIC handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("no QUIC answer from {0} within {HANDSHAKE_TIMEOUT:?}")]
    NoAnswer(SocketAddr),
    #[error("QUIC connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("QUIC stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("QUIC stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("QUIC stream header: {0}")]
    Header(#[from] HeaderError),
    #[error("no QUIC stream header within {HEADER_TIMEOUT:?}")]
    HeaderTimeout,
    #[error("QUIC stream refused unprocessed: the peer drains")]
    Refused,
}

impl QuicError {
    /// What a failed dial means for HTTP/2 ([`Fallback`]). A peer that gave no sign of
    /// taking QUIC tunnels (no answer in time, another QUIC version or ALPN) is dialled on
    /// HTTP/2 for a while; one that refused the connection (a daemon that drains, or is at its
    /// handshake cap) only this time. A failed certificate check is no reason: it would fail
    /// on HTTP/2 too, and is refused, not retried elsewhere.
    pub fn fallback(&self) -> Fallback {
        let QuicError::Handshake { source, .. } = self else {
            return match self {
                QuicError::NoAnswer(_) => Fallback::Remember,
                _ => Fallback::No,
            };
        };
        let code = transport_code(source);
        if matches!(
            source,
            quinn::ConnectionError::TimedOut | quinn::ConnectionError::VersionMismatch
        ) || code == Some(quinn::TransportErrorCode::crypto(120))
        {
            Fallback::Remember
        } else if code == Some(quinn::TransportErrorCode::CONNECTION_REFUSED) {
            Fallback::ThisDial
        } else {
            Fallback::No
        }
    }

    /// Whether the connection, not the stream, failed or takes no more streams (a stream may
    /// be tried on another).
    pub fn connection_failed(&self) -> bool {
        matches!(
            self,
            QuicError::Connection(_)
                | QuicError::Refused
                | QuicError::Write(quinn::WriteError::ConnectionLost(_))
                | QuicError::Read(quinn::ReadExactError::ReadError(
                    quinn::ReadError::ConnectionLost(_)
                ))
        )
    }
}

/// Whether a failed QUIC dial is tried again on HTTP/2 ([`QuicError::fallback`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// No: the failure is the answer.
    No,
    /// Yes, and QUIC is tried again on the next dial.
    ThisDial,
    /// Yes, and the address is dialled on HTTP/2 only for a while.
    Remember,
}

/// What this process derives stateless-reset tokens and connection IDs from, when set
/// ([`use_reset_secret`]).
static NODE_KEYS: OnceLock<NodeKeys> = OnceLock::new();

struct NodeKeys {
    reset: Arc<aws_lc_rs::hmac::Key>,
    /// Signs the connection IDs endpoints hand out, so that the next daemon recognises the
    /// old one's as valid (it drops packets whose IDs it does not, without a reset).
    cid: u64,
}

/// Makes every QUIC endpoint this process creates afterwards derive its stateless-reset
/// tokens and its connection IDs' signatures from `secret` (the node's, kept in its state
/// directory). A daemon that replaces another on the node then answers packets of the old
/// one's connections with a reset their peers accept, so that a peer whose pooled connection
/// outlived the old daemon (its drain grace ran out) learns at its next packet that it is
/// gone, instead of waiting out the idle timeout. Without it each process has random keys.
/// Only the first call counts.
pub fn use_reset_secret(secret: &[u8]) {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let derive = |label: &[u8]| aws_lc_rs::hmac::sign(&key, label);
    let reset =
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, derive(b"quic reset").as_ref());
    let mut cid = [0u8; 8];
    cid.copy_from_slice(&derive(b"quic cid").as_ref()[..8]);
    let _ = NODE_KEYS.set(NodeKeys {
        reset: Arc::new(reset),
        cid: u64::from_le_bytes(cid),
    });
}

fn endpoint_config() -> quinn::EndpointConfig {
    let Some(keys) = NODE_KEYS.get() else {
        return quinn::EndpointConfig::default();
    };
    let mut c = quinn::EndpointConfig::new(keys.reset.clone());
    let cid = keys.cid;
    c.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid)));
    c
}

/// The transport error code a connection was closed with, if any (a TLS alert `a` is the
/// CRYPTO_ERROR `0x100 + a`; `no_application_protocol` is 120).
fn transport_code(e: &quinn::ConnectionError) -> Option<quinn::TransportErrorCode> {
    match e {
        quinn::ConnectionError::TransportError(t) => Some(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => Some(c.error_code),
        _ => None,
    }
}

/// The transport parameters of a tunnel connection: the server takes `max_streams` streams
/// at once, the client none (a server never opens one); `receive_window` bytes may be in
/// flight to it on the whole connection, and `send_window` bytes held in it unacknowledged.
fn transport(max_streams: u32, receive_window: u32, send_window: u64) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(consts::STREAM_WINDOW))
        .receive_window(VarInt::from_u32(receive_window))
        .send_window(send_window)
        // HBONE carries no datagrams: none are accepted (quinn would otherwise keep up to a
        // stream window of them, for the connection's life, for a reader that never comes).
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(consts::PING_INTERVAL))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(consts::PING_TIMEOUT).expect("20 s is a valid timeout"),
        ))
        // Nodes of a cluster are well under this apart (quinn assumes 333 ms, the Internet's
        // RFC 9002 default): a lost first packet (a peer's port being re-bound by the daemon
        // that replaces it) is sent again after about 150 ms, not a second, well within
        // `HANDSHAKE_TIMEOUT`.
        .initial_rtt(Duration::from_millis(50));
    Arc::new(t)
}

/// What a server connection may hold unacknowledged while none of its streams is admitted:
/// refusals and their headers only. Not counted in the node's budget.
pub const UNADMITTED_SEND_WINDOW: u64 = 16 * 1024;

/// What a connection may hold unacknowledged: several milliseconds of a 10 Gbit/s link, far
/// above a cluster's round trip. A client connection (one of the pool's, to a destination
/// daemon) holds it always; a server connection while it carries admitted streams, when the
/// node's budget grants it.
pub const SEND_WINDOW: usize = 2 * 1024 * 1024;

/// One inbound QUIC tunnel connection as its streams see it: the connection, and the send
/// window it has been granted from the node's buffered-bytes budget ([`super::budget`]) for
/// its source.
///
/// quinn keeps what a stream writes until the peer acknowledges it, up to the connection's
/// send window, and the peer grants its own flow-control credit, so that credit is no bound:
/// a peer that acknowledges nothing (while it keeps the connection alive) has quinn hold the
/// whole window. quinn does not say how much of it is held, so the window itself is counted,
/// as held ([`super::budget::Window`]), while the connection carries an admitted stream:
/// - with none, the window is [`UNADMITTED_SEND_WINDOW`], not counted;
/// - an admission grows it to [`SEND_WINDOW`] when the node is under its budget and the
///   source's windows within its share (a sixteenth of the budget), else to 64 KiB
///   ([`super::budget::FLOOR`]) on the same terms, else not at all (its streams are slow,
///   not refused);
/// - when the last admitted stream has ended (its bytes acknowledged, or the stream reset),
///   the window goes back to [`UNADMITTED_SEND_WINDOW`] and the budget gets it back; it also
///   does when the connection ends.
#[derive(Debug)]
pub struct ServerConn {
    conn: quinn::Connection,
    /// The window granted, and how many admitted streams hold it.
    window: parking_lot::Mutex<(Window, usize)>,
}

/// An admitted stream's hold on its connection's send window ([`ServerConn::admit`]).
#[derive(Debug)]
pub struct Admitted(Arc<ServerConn>);

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut w = self.0.window.lock();
        w.1 -= 1;
        if w.1 == 0 && w.0.granted() > 0 {
            w.0.release();
            self.0.conn.set_send_window(UNADMITTED_SEND_WINDOW);
        }
    }
}

impl ServerConn {
    /// A connection from `source`, its window counted in `budget`.
    pub fn new(conn: quinn::Connection, budget: Arc<BufferBudget>, source: IpAddr) -> Arc<Self> {
        Arc::new(ServerConn {
            conn,
            window: parking_lot::Mutex::new((Window::new(budget, source), 0)),
        })
    }

    /// The send window granted now.
    pub fn send_window(&self) -> u64 {
        (self.window.lock().0.granted() as u64).max(UNADMITTED_SEND_WINDOW)
    }

    /// One of its streams was admitted: the receive window opens to the full
    /// [`consts::CONNECTION_WINDOW`] (it was [`ADMISSION_WINDOW`]), and the send window grows
    /// as the budget allows (see the type's documentation) for as long as the stream holds
    /// what this returns.
    pub fn admit(self: &Arc<Self>) -> Admitted {
        self.conn
            .set_receive_window(VarInt::from_u32(consts::CONNECTION_WINDOW));
        let mut w = self.window.lock();
        w.1 += 1;
        let before = w.0.granted();
        if before < SEND_WINDOW && w.0.grow_to(SEND_WINDOW) < FLOOR {
            w.0.grow_to(FLOOR);
        }
        if w.0.granted() > before {
            self.conn
                .set_send_window((w.0.granted() as u64).max(UNADMITTED_SEND_WINDOW));
        }
        Admitted(self.clone())
    }
}

/// The QUIC client configuration for a rustls tunnel client configuration (its certificate
/// and expected peer identities), with the QUIC ALPN.
pub fn client_config(tls: &rustls::ClientConfig) -> Result<quinn::ClientConfig, QuicError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Config(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport(0, consts::CONNECTION_WINDOW, SEND_WINDOW as u64));
    Ok(c)
}

/// The QUIC server configuration for a rustls tunnel server configuration, accepting
/// `max_streams` streams at once per connection and requiring the QUIC ALPN. A connection's
/// windows are small until one of its streams is admitted ([`ServerConn::admit`]).
pub fn server_config(
    tls: &rustls::ServerConfig,
    max_streams: u32,
) -> Result<quinn::ServerConfig, QuicError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Config(e.to_string()))?;
    let mut s = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    s.transport_config(transport(
        max_streams,
        ADMISSION_WINDOW,
        UNADMITTED_SEND_WINDOW,
    ));
    // A tunnel's source is its pod's address; it does not move.
    s.migration(false);
    Ok(s)
}

/// A QUIC endpoint on a UDP socket bound to `addr` (inside `netns` when given), its socket
/// marked with `mark` so capture rules skip it. With `server`, it accepts connections (each
/// is then accepted with the certificate of its destination, [`quinn::Incoming::accept_with`]).
///
/// The socket is bound exclusively (no `SO_REUSEPORT`, unlike the TCP listeners): the kernel
/// spreads a shared UDP port's datagrams over its sockets by address, so a second daemon
/// bound beside a draining one would receive datagrams of the old one's connections and
/// reset them. While the port is held, binding fails with `AddrInUse`.
pub fn endpoint(
    netns: Option<&Netns>,
    addr: SocketAddr,
    mark: Option<u32>,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let new = || Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP));
    let sock = match netns {
        Some(ns) => ns.run(new)??,
        None => new()?,
    };
    if let Some(mark) = mark {
        // Without CAP_NET_ADMIN there are no capture rules to skip (see `net::connect_from`).
        let _ = sock.set_mark(mark);
    }
    if netns.is_some() && addr.is_ipv6() {
        // In a pod's netns each family has its own endpoint: the IPv4 one beside it keeps the
        // IPv4 datagrams. Elsewhere `[::]` keeps the system's default (both families).
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    set_buffers(&sock);
    quinn::Endpoint::new(
        endpoint_config(),
        server,
        sock.into(),
        Arc::new(quinn::TokioRuntime),
    )
}

/// The size of each QUIC socket's kernel send and receive buffers.
///
/// A tunnel connection may have 16 MiB in flight ([`consts::CONNECTION_WINDOW`]); while the
/// daemon's thread is busy elsewhere, what arrives waits in the socket, and the default buffer
/// (about 200 KiB) overflows: each dropped datagram is a loss to the congestion controller,
/// which halves the sending rate. This is a limit, not an allocation: an idle socket holds
/// nothing.
pub const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Sets [`SOCKET_BUFFER`] on a QUIC socket, above the system's `rmem_max`/`wmem_max` when the
/// daemon may (`CAP_NET_ADMIN`), else as far as they allow.
fn set_buffers(sock: &socket2::Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let n = SOCKET_BUFFER;
    if setsockopt(sock, sockopt::RcvBufForce, &n).is_err() {
        let _ = sock.set_recv_buffer_size(n);
    }
    if setsockopt(sock, sockopt::SndBufForce, &n).is_err() {
        let _ = sock.set_send_buffer_size(n);
    }
    if let Ok(got) = sock.recv_buffer_size() {
        // Linux reports twice what was set (the other half is its bookkeeping).
        if got < 2 * n {
            tracing::debug!(
                wanted = n,
                got,
                "QUIC socket receive buffer limited by net.core.rmem_max"
            );
        }
    }
}

/// Dials `addr` from `endpoint`; a peer that does not answer in [`HANDSHAKE_TIMEOUT`] is
/// [`QuicError::NoAnswer`].
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Connection, QuicError> {
    // No SNI is sent (the TLS config disables it); the name only satisfies the API.
    let connecting = endpoint
        .connect_with(config, addr, &addr.ip().to_string())
        .map_err(|source| QuicError::Connect { addr, source })?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(source)) => Err(QuicError::Handshake { addr, source }),
        Err(_) => Err(QuicError::NoAnswer(addr)),
    }
}

/// The peer's certificate chain, as the TLS handshake verified it.
pub fn peer_certificates(conn: &quinn::Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .unwrap_or_default()
}

/// The stream header of a tunnel to `target`: what [`super::client::connect_request`] sends
/// on HTTP/2.
pub fn header(target: SocketAddr, headers: &ConnectHeaders) -> RequestHeader {
    RequestHeader {
        authority: super::authority(target),
        forwarded: headers.forwarded(),
        baggage: headers.baggage.clone(),
        traceparent: headers.traceparent.clone(),
    }
}

/// The `CONNECT` request a stream header stands for, to be validated as one
/// ([`super::server::validate`]); `None` when its authority is not a URI authority.
pub fn request_of(h: &RequestHeader) -> Option<Request<()>> {
    let mut b = Request::builder()
        .method(http::Method::CONNECT)
        .uri(h.authority.as_str());
    for (name, v) in [
        (consts::FORWARDED, &h.forwarded),
        (consts::BAGGAGE, &h.baggage),
        (consts::TRACEPARENT, &h.traceparent),
    ] {
        if let Some(v) = v {
            b = b.header(name, v.as_str());
        }
    }
    b.body(()).ok()
}

/// Opens a stream on `conn` for `header`, sending the client's `early` bytes right behind it
/// (those taken at once, then those written while the answer is in flight; see
/// [`super::early`]), and waits for the answer: `200` yields the stream, another status is
/// [`QuicStreamError::Status`].
pub async fn open_stream(
    conn: &quinn::Connection,
    header: &RequestHeader,
    early: &mut Early<'_>,
) -> Result<(SendStream, RecvStream), QuicStreamError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(QuicError::from)?;
    let mut head = header.encode().map_err(QuicError::from)?;
    for chunk in early.chunks() {
        head.extend_from_slice(chunk);
    }
    match send.write_all(&head).await {
        Ok(()) => {}
        Err(quinn::WriteError::Stopped(code)) if code == REFUSED => {
            return Err(QuicError::Refused.into())
        }
        // The peer read the header and stopped the stream: a refusal, its answer tells why.
        Err(quinn::WriteError::Stopped(_)) => early.stop(),
        Err(e) => return Err(QuicError::from(e).into()),
    }
    let mut resp = [0u8; wire::RESPONSE_LEN];
    {
        let answer = recv.read_exact(&mut resp);
        tokio::pin!(answer);
        loop {
            tokio::select! {
                biased;
                r = &mut answer => {
                    r.map_err(|e| match e {
                        quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code))
                            if code == REFUSED => QuicError::Refused,
                        e => e.into(),
                    })?;
                    break;
                }
                more = early.next() => {
                    // A stream the peer stopped takes nothing more; its answer tells why.
                    if send.write_all(&more).await.is_err() {
                        early.stop();
                    }
                }
            }
        }
    }
    let status = wire::decode_response(resp).map_err(QuicError::from)?;
    if status != 200 {
        let _ = send.reset(RESET);
        return Err(QuicStreamError::Status(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        ));
    }
    Ok((send, recv))
}

#[derive(Debug, thiserror::Error)]
pub enum QuicStreamError {
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("stream refused with status {0}")]
    Status(StatusCode),
}

impl StreamSend for SendStream {
    async fn send(&mut self, chunk: Bytes) -> Result<(), CopyError> {
        self.write_chunk(chunk)
            .await
            .map_err(|e| CopyError::Quic(e.to_string()))
    }

    fn finish(&mut self) -> Result<(), CopyError> {
        SendStream::finish(self).map_err(|_| CopyError::StreamClosed)
    }

    fn reset(&mut self) {
        let _ = SendStream::reset(self, RESET);
    }

    async fn delivered(&mut self) {
        // Acknowledged by the peer, stopped by it, or the connection lost: no longer ours.
        let _ = self.stopped().await;
    }
}

/// A QUIC stream's receiving half: up to [`CHUNKS_PER_WRITE`] chunks taken at a time (the
/// peer gets credit for them as they are read).
pub(super) struct Chunks {
    recv: RecvStream,
    chunks: [Bytes; CHUNKS_PER_WRITE],
}

impl Chunks {
    pub(super) fn new(recv: RecvStream) -> Self {
        Chunks {
            recv,
            chunks: Default::default(),
        }
    }
}

impl StreamRecv for Chunks {
    /// How many of the chunks were filled.
    type Arrived = usize;

    async fn arrived(&mut self) -> Result<Option<usize>, CopyError> {
        self.recv
            .read_chunks(&mut self.chunks)
            .await
            .map_err(|e| CopyError::Quic(e.to_string()))
    }

    fn take(&mut self, n: usize, queue: &mut Queue<'_>) -> Result<(), OverBudget> {
        self.chunks[..n]
            .iter_mut()
            .try_for_each(|chunk| queue.push(std::mem::take(chunk)))
    }

    fn written(&mut self, _: usize) -> Result<(), CopyError> {
        Ok(())
    }

    fn stop(&mut self) {
        let _ = self.recv.stop(RESET);
    }
}

/// Reads a stream's request header (server side), within [`HEADER_TIMEOUT`].
pub async fn read_header(recv: &mut RecvStream) -> Result<RequestHeader, QuicError> {
    let read = async {
        let mut prefix = [0u8; wire::PREFIX_LEN];
        recv.read_exact(&mut prefix).await?;
        let len = RequestHeader::fields_len(prefix)?;
        let mut fields = vec![0u8; len];
        recv.read_exact(&mut fields).await?;
        Ok(RequestHeader::decode_fields(&fields)?)
    };
    match tokio::time::timeout(HEADER_TIMEOUT, read).await {
        Ok(r) => r,
        Err(_) => Err(QuicError::HeaderTimeout),
    }
}

/// Answers a stream with `status`. Anything but `200` ends the stream both ways, and returns
/// once the peer has the answer (or after 2 s at most), so that closing the
/// connection then loses nothing.
pub async fn respond(
    send: &mut SendStream,
    recv: &mut RecvStream,
    status: StatusCode,
) -> Result<(), quinn::WriteError> {
    let sent = send
        .write_all(&wire::encode_response(status.as_u16()))
        .await;
    if status != StatusCode::OK {
        let _ = send.finish();
        let _ = recv.stop(RESET);
        if sent.is_ok() {
            // A connection closed now would discard the answer: it waits until the peer has it.
            let _ = tokio::time::timeout(REFUSAL_DELIVERY, send.stopped()).await;
        }
    }
    sent
}

/// Refuses a stream without processing it (the server drains): the client may send its
/// request again on another connection.
pub fn refuse_unprocessed(mut send: SendStream, mut recv: RecvStream) {
    let _ = send.reset(REFUSED);
    let _ = recv.stop(REFUSED);
}

/// The server configuration an endpoint starts with: it presents no certificate, so it
/// completes no handshake. Every connection is accepted with its destination's own
/// configuration instead ([`quinn::Incoming::accept_with`]).
pub fn placeholder_server_config() -> quinn::ServerConfig {
    #[derive(Debug)]
    struct NoCertificate;
    impl rustls::server::ResolvesServerCert for NoCertificate {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }
    let tls = rustls::ServerConfig::builder_with_provider(crate::identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the provider supports TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    server_config(&tls, 1).expect("a TLS 1.3 configuration suits QUIC")
}

#[cfg(test)]
#[path = "quic_tests.rs"]
mod tests;
