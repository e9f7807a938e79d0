//! Wire types and constants shared by the ztunnel daemon, its CA and its CNI plugin: the ports
//! of the contract, the socket mark of the daemon's own traffic, the HBONE tunnel's HTTP/2
//! parameters and its QUIC stream header. Anything a peer or another component depends on
//! byte for byte lives here.

pub mod ca;
pub mod enroll;
pub mod quic;

/// Constants of the HBONE tunnel and of in-pod capture.
pub mod hbone {
    use std::time::Duration;

    /// Outbound capture port inside each enrolled pod's netns.
    pub const OUTBOUND_PORT: u16 = 15001;
    /// Inbound plaintext capture port inside each enrolled pod's netns.
    pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
    /// Inbound tunnel (HBONE, mTLS) port.
    pub const HBONE_PORT: u16 = 15008;
    /// Ports that must never be a tunnel's target: reaching them through the tunnel would loop.
    pub const RESERVED_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];

    /// Mark (`SO_MARK`) carried by the daemon's own sockets, so capture rules skip them.
    pub const SOCKET_MARK: u32 = 0x539;
    /// Mask applied when matching [`SOCKET_MARK`] and [`CONNMARK`].
    pub const MARK_MASK: u32 = 0xfff;
    /// Connmark of inbound connections, restored on replies for the policy route.
    pub const CONNMARK: u32 = 0x111;

    /// HTTP/2 per-stream flow-control window.
    pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
    /// HTTP/2 connection flow-control window.
    pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
    /// HTTP/2 maximum frame size.
    pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
    /// Interval between keep-alive pings on a tunnel connection.
    pub const PING_INTERVAL: Duration = Duration::from_secs(10);
    /// A tunnel whose ping is not answered within this time is closed.
    pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
    /// Streams one pooled tunnel connection carries before the pool opens another.
    pub const DEFAULT_MAX_STREAMS: u32 = 100;
    /// Concurrent streams a tunnel client assumes the server accepts per connection until the
    /// server's `SETTINGS` say (the least RFC 9113 recommends a server to allow).
    pub const CLIENT_ASSUMED_MAX_STREAMS: usize = 100;
    /// Concurrent streams a tunnel server accepts per connection (`SETTINGS_MAX_CONCURRENT_STREAMS`),
    /// as Istio's ztunnel advertises; a pool configured for more is allowed that many.
    pub const SERVER_MAX_STREAMS: u32 = 200;
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` a tunnel server advertises, as Istio's ztunnel does.
    pub const SERVER_MAX_HEADER_LIST: u32 = 64 * 1024;
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` a tunnel client advertises, as Istio's ztunnel does.
    pub const CLIENT_MAX_HEADER_LIST: u32 = 16 * 1024;
    /// ALPN protocol of the tunnel.
    pub const ALPN_H2: &[u8] = b"h2";

    /// Request header carrying the original client address: `for="<ip:port>"`.
    pub const FORWARDED: &str = "forwarded";
    /// Request header carrying W3C baggage, e.g. `k8s.namespace.name=<ns>`.
    pub const BAGGAGE: &str = "baggage";
    /// Request header carrying a W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
}
