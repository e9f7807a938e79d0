//! HBONE: TCP connections carried as HTTP/2 `CONNECT` streams inside mutual-TLS connections
//! to a destination's port 15008, as Istio's ambient mesh speaks it.
//!
//! - [`client`]: open a tunnel connection and `CONNECT` streams over it;
//! - [`pool`]: share tunnel connections per (source identity, destination identity, address);
//! - [`server`]: accept tunnel connections, validate each `CONNECT`, hand streams to a handler;
//! - [`answer`]: answer a received request on either transport, its stream then the tunnel;
//! - [`copy`]: move bytes between a TCP socket and a stream with half-close, one loop for both
//!   transports ([`copy_tunnel`] over a [`TunnelStream`]);
//! - [`budget`], `queue`: count what streams hold for slow applications, node-wide;
//! - [`outflow`]: count what an inbound HTTP/2 connection holds unsent for a slow peer;
//! - [`early`]: send what a client writes before its stream is open right behind the `CONNECT`;
//! - [`quic`]: the same tunnels over QUIC (UDP 15008), one stream per connection.

pub mod answer;
pub mod budget;
pub mod client;
pub mod copy;
pub mod early;
pub mod outflow;
pub mod pool;
mod queue;
pub mod quic;
pub mod server;

pub use ztunnel_proto::hbone as consts;

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use futures::future::Either;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// What a peer may have in flight on a tunnel connection (server side, either transport)
/// until one of its streams has been admitted: enough for a stream's request and the client's
/// early bytes. Until then, whatever it sends (a stream's data while policy and the
/// application's connect are pending, or held back behind a gap in QUIC, waiting for its
/// header) is held by the transport, outside the node's budget of buffered bytes; a peer that
/// policy lets in gets the full window ([`server::ServerConn::admit`], [`quic::ServerConn::admit`]).
pub const ADMISSION_WINDOW: u32 = 256 * 1024;

/// The request headers a client sends with `CONNECT` (all optional on the wire).
#[derive(Clone, Debug, Default)]
pub struct ConnectHeaders {
    /// The original client address, sent as `forwarded: for="<addr>"`.
    pub forwarded_for: Option<SocketAddr>,
    /// The hostname of the service the client connected to, sent as `;host=<hostname>` in
    /// `forwarded` (with `for`).
    pub forwarded_host: Option<String>,
    /// Sent as `baggage`.
    pub baggage: Option<String>,
    /// Sent as `traceparent`.
    pub traceparent: Option<String>,
}

impl ConnectHeaders {
    /// The `forwarded` header's value, when there is one.
    pub fn forwarded(&self) -> Option<String> {
        match (self.forwarded_for, &self.forwarded_host) {
            (Some(addr), Some(host)) => Some(format!("for=\"{addr}\";host={host}")),
            (Some(addr), None) => Some(format!("for=\"{addr}\"")),
            (None, Some(host)) => Some(format!("host={host}")),
            (None, None) => None,
        }
    }
}

/// The two halves of an open tunnel stream, on either transport.
pub enum TunnelStream {
    H2 {
        send: h2::SendStream<Bytes>,
        recv: h2::RecvStream,
        /// The connection's unsent bytes, counted on the server's side ([`outflow`]).
        outflow: Option<std::sync::Arc<outflow::Outflow>>,
    },
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        /// The hold on the connection's send window, on the server's side
        /// ([`quic::ServerConn`]), kept until the copy has ended.
        window: Option<quic::Admitted>,
    },
}

/// Copies `tcp` ⇄ `stream` until both directions have ended, on the stream's transport; what
/// waits for the TCP side is counted in the node's budget, as `holding`.
///
/// Not an `async fn`: the future is the transport's own copy, without a copy of `stream` kept
/// beside it for the connection's whole life (see `crate::task`); QUIC's is boxed, its state
/// being twice HTTP/2's, so that a connection on HTTP/2 carries no room for it.
pub fn copy_tunnel<'a>(
    tcp_read: OwnedReadHalf,
    tcp_write: OwnedWriteHalf,
    stream: TunnelStream,
    counters: &'a copy::ByteCounters,
    holding: budget::Holding<'a>,
) -> impl Future<Output = Result<(), copy::CopyError>> + Send + 'a {
    match stream {
        TunnelStream::H2 {
            send,
            recv,
            outflow,
        } => Either::Left(copy::copy(
            tcp_read,
            tcp_write,
            copy::H2Send::new(send, outflow),
            recv,
            counters,
            holding,
        )),
        TunnelStream::Quic { send, recv, window } => Either::Right(Box::pin(async move {
            let copied = copy::copy(
                tcp_read,
                tcp_write,
                send,
                quic::Chunks::new(recv),
                counters,
                holding,
            )
            .await;
            drop(window);
            copied
        })),
    }
}

/// A new W3C trace context for a connection: version `00`, a random trace id and parent id,
/// no flags (not sampled), as Istio's ztunnel starts one per connection.
pub fn new_traceparent() -> String {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut seed = [0u8; 8];
            let _ = aws_lc_rs::rand::fill(&mut seed);
            u64::from_ne_bytes(seed) | 1
        });
    }
    // xorshift64*: ids that differ per connection, not secrets.
    let next = || {
        STATE.with(|s| {
            let mut x = s.get();
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            s.set(x);
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        })
    };
    format!("00-{:016x}{:016x}-{:016x}-00", next(), next(), next())
}

/// Formats the `:authority` of a CONNECT to `addr`: `ip:port`, IPv6 as `[addr]:port`.
pub fn authority(addr: SocketAddr) -> String {
    addr.to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair on loopback: (client, accepted).
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[test]
    fn new_traceparents_are_well_formed_and_differ() {
        let a = super::new_traceparent();
        let b = super::new_traceparent();
        assert!(super::server::is_traceparent(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn authority_forms() {
        assert_eq!(
            super::authority("10.0.0.1:80".parse().unwrap()),
            "10.0.0.1:80"
        );
        assert_eq!(
            super::authority("[fd00::1]:8080".parse().unwrap()),
            "[fd00::1]:8080"
        );
    }
}
