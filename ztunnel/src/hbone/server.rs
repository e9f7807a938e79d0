//! The HBONE server side: HTTP/2 over an accepted mutual-TLS connection, and the validation
//! of each `CONNECT`.
//!
//! [`validate`] is a pure function of the request and the connection's local address:
//! - only classic `CONNECT` is accepted; any other method is `400` (h2 itself resets, with
//!   `PROTOCOL_ERROR`, a `CONNECT` carrying `:scheme` or `:path`, as RFC 9113 §8.5 requires);
//! - `:authority` is either `ip:port`, whose IP must be the connection's local address (`400`),
//!   or `hostname:port`, a service's hostname and port (as Istio's east-west gateways send it),
//!   which the caller resolves to the local workload's target port
//!   ([`crate::proxy::plan::inbound`]); anything else is `400`;
//! - a target port of 15001, 15006 or 15008 would loop and is `503`;
//! - `forwarded` gives the client's address (`for=`) and the service it went through
//!   (`host=`); `traceparent` the W3C trace context. Malformed values are ignored.
//!
//! The caller then applies policy (`401` on deny), connects to the application (`503` on
//! failure) and only then answers `200`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::{Connection, SendResponse};
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::consts;
use super::outflow::Outflow;
use crate::refusal::Reason;

/// What a CONNECT's `:authority` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authority {
    /// The local workload's address and the application port.
    Addr(SocketAddr),
    /// A service's hostname (lower case) and one of its ports.
    Service { host: String, port: u16 },
}

/// A validated CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectTarget {
    pub authority: Authority,
    /// The original client address from `forwarded: for=...`, when present and well formed.
    pub forwarded_for: Option<SocketAddr>,
    /// The service hostname from `forwarded: host=...`, when present and well formed.
    pub forwarded_host: Option<String>,
    /// The W3C `traceparent`, when well formed.
    pub traceparent: Option<String>,
}

/// Validates a request received on a tunnel connection whose local address is `local_ip`: the
/// target, or why it is refused (answered with [`Reason::status`]).
pub fn validate<B>(req: &Request<B>, local_ip: IpAddr) -> Result<ConnectTarget, Reason> {
    if req.method() != Method::CONNECT {
        return Err(Reason::MethodNotConnect);
    }
    let uri = req.uri();
    // The authority first: a URI without one reports a path (`/`) whatever was sent.
    let authority = uri.authority().ok_or(Reason::MissingAuthority)?;
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty()) {
        return Err(Reason::ConnectWithPath);
    }
    let authority = match authority.as_str().parse::<SocketAddr>() {
        Ok(target) => {
            if target.ip().to_canonical() != local_ip.to_canonical() {
                return Err(Reason::AuthorityNotLocal);
            }
            if consts::RESERVED_PORTS.contains(&target.port()) {
                return Err(Reason::Recursion);
            }
            // An IPv4 target written as IPv4-mapped IPv6 is its IPv4 address.
            Authority::Addr(SocketAddr::new(target.ip().to_canonical(), target.port()))
        }
        Err(_) => match (authority.host(), authority.port_u16()) {
            (host, Some(port)) if is_hostname(host) => Authority::Service {
                host: host.to_ascii_lowercase(),
                port,
            },
            _ => return Err(Reason::BadAuthority),
        },
    };
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let forwarded = header(consts::FORWARDED);
    Ok(ConnectTarget {
        authority,
        forwarded_for: forwarded
            .and_then(|v| forwarded_param(v, "for"))
            .and_then(|v| v.parse().ok()),
        forwarded_host: forwarded
            .and_then(|v| forwarded_param(v, "host"))
            .filter(|h| is_hostname(h))
            .map(str::to_ascii_lowercase),
        traceparent: header(consts::TRACEPARENT)
            .filter(|v| is_traceparent(v))
            .map(str::to_owned),
    })
}

/// The value of parameter `key` of a `forwarded` header (RFC 7239), unquoted, e.g. `for` in
/// `for="10.0.0.1:3456";host=web.demo.svc.cluster.local`.
fn forwarded_param<'a>(v: &'a str, key: &str) -> Option<&'a str> {
    v.split([';', ','])
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.trim_matches('"'))
}

/// A DNS name: dot-separated labels of letters, digits and `-`, at least one letter (so that
/// no IP address reads as one).
fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && h.bytes().any(|b| b.is_ascii_alphabetic())
}

/// A W3C trace context: `<2 hex>-<32 hex>-<16 hex>-<2 hex>`, version `ff` excluded.
pub fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    matches!(parts.as_slice(), [ver, trace, parent, flags]
        if hex(ver, 2) && *ver != "ff" && hex(trace, 32) && hex(parent, 16) && hex(flags, 2))
}

/// Answers a stream with `status` and no body.
pub fn refuse(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder()
        .status(status)
        .body(())
        .expect("static response");
    let _ = respond.send_response(resp, true);
}

/// The streams of a served tunnel connection, for closing it when idle: no stream started for
/// `idle` and none open, and for draining it: [`Idle::all_closed`] resolves when the last
/// stream ends. Shared by [`serve`] and the QUIC inbound loop; a stream start costs a clock
/// read, not a timer reset, and the decision takes the time as a value.
#[derive(Debug)]
pub struct Idle {
    idle: Duration,
    last_start: Instant,
    open: Arc<OpenStreams>,
}

#[derive(Debug, Default)]
struct OpenStreams {
    count: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::Notify,
}

/// Held while a stream is open; its drop ends the stream for [`Idle`].
#[derive(Debug)]
pub struct StreamToken(Arc<OpenStreams>);

impl Drop for StreamToken {
    fn drop(&mut self) {
        self.0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.closed.notify_waiters();
    }
}

impl Idle {
    pub fn new(idle: Duration, now: Instant) -> Idle {
        Idle {
            idle,
            last_start: now,
            open: Arc::default(),
        }
    }

    /// A stream starts at `now`; the token returned is held while it is open.
    pub fn start(&mut self, now: Instant) -> StreamToken {
        self.last_start = now;
        self.open
            .count
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        StreamToken(self.open.clone())
    }

    /// How many streams are open.
    pub fn open(&self) -> usize {
        self.open.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once no stream is open.
    pub async fn all_closed(&self) {
        loop {
            let closed = self.open.closed.notified();
            if self.open() == 0 {
                return;
            }
            closed.await;
        }
    }

    /// At `now`: `None` when the connection is idle (close it), else when to look again.
    pub fn check(&self, now: Instant) -> Option<Instant> {
        let due = self.last_start + self.idle;
        if self.open() > 0 {
            Some(now + self.idle)
        } else if now >= due {
            None
        } else {
            Some(due)
        }
    }
}

/// One inbound HTTP/2 tunnel connection as its streams see it: what it holds unsent for the
/// peer, and whether one of its streams has been admitted.
#[derive(Debug)]
pub struct ServerConn {
    /// What the connection holds unsent for its peer.
    pub outflow: Arc<Outflow>,
    admitted: tokio::sync::Notify,
}

impl ServerConn {
    pub fn new(outflow: Arc<Outflow>) -> Arc<Self> {
        Arc::new(ServerConn {
            outflow,
            admitted: tokio::sync::Notify::new(),
        })
    }

    /// One of the connection's streams was admitted: its receive window opens to the full
    /// [`consts::CONNECTION_WINDOW`] ([`serve`]); until then it is [`super::ADMISSION_WINDOW`].
    pub fn admit(&self) {
        self.admitted.notify_one();
    }

    /// Resolves once a stream has been admitted.
    pub async fn admitted(&self) {
        self.admitted.notified().await
    }
}

/// The HTTP/2 server handshake of a tunnel connection, with the tunnel's settings: ours sent,
/// the client's preface read. The connection's receive window is [`super::ADMISSION_WINDOW`]
/// until [`serve`] is told that a stream was admitted. It waits as long as the client stays
/// silent, so the caller bounds it (the inbound proxy, by the same deadline as the TLS
/// handshake).
pub async fn handshake<T>(io: T, max_streams: u32) -> Result<Connection<T, Bytes>, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    h2::server::Builder::new()
        .initial_window_size(consts::STREAM_WINDOW)
        .initial_connection_window_size(super::ADMISSION_WINDOW)
        .max_frame_size(consts::MAX_FRAME_SIZE)
        .max_send_buffer_size(consts::MAX_FRAME_SIZE as usize)
        .max_concurrent_streams(max_streams.max(consts::SERVER_MAX_STREAMS))
        .max_header_list_size(consts::SERVER_MAX_HEADER_LIST)
        .handshake::<_, Bytes>(io)
        .await
}

/// Runs the HTTP/2 server side of a tunnel connection after its [`handshake`], calling
/// `on_stream` in a new task for each request, until the peer goes away, a ping goes
/// unanswered, or `shutdown` resolves (then a GOAWAY lets open streams finish). A connection
/// on which no stream has started for `idle` and none is open is closed the same way: a
/// peer's pool closes its idle connections itself, and one that keeps them (answering pings)
/// must not hold them for ever. Once `admitted` resolves (a stream was admitted), the
/// connection's receive window opens to [`consts::CONNECTION_WINDOW`].
pub async fn serve<T, F, Fut>(
    mut conn: Connection<T, Bytes>,
    idle: Duration,
    shutdown: impl Future<Output = ()>,
    admitted: impl Future<Output = ()>,
    on_stream: F,
) -> Result<(), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Request<RecvStream>, SendResponse<Bytes>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let keepalive = super::client::keepalive(conn.ping_pong());
    tokio::pin!(keepalive);
    tokio::pin!(shutdown);
    tokio::pin!(admitted);
    let mut open = false;
    let mut streams = Idle::new(idle, Instant::now());
    let idle_check = tokio::time::sleep(idle);
    tokio::pin!(idle_check);
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let (fut, held) = (on_stream(req, respond), streams.start(Instant::now()));
                    tokio::spawn(crate::task::guarded(fut, held));
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            r = &mut keepalive => {
                if let Err(why) = r {
                    tracing::debug!(why, "tunnel connection closed");
                }
                return Ok(());
            }
            _ = &mut shutdown, if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            _ = &mut admitted, if !open => {
                open = true;
                conn.set_target_window_size(consts::CONNECTION_WINDOW);
            }
            _ = &mut idle_check, if !draining => match streams.check(Instant::now()) {
                Some(later) => idle_check.as_mut().reset(later),
                None => {
                    tracing::debug!(?idle, "idle tunnel connection closed");
                    draining = true;
                    conn.graceful_shutdown();
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, uri: &str, fwd: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(f) = fwd {
            b = b.header("forwarded", f);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_connection_is_idle_once_no_stream_started_for_the_period_and_none_is_open() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut idle = Idle::new(s(10), t0);
        assert_eq!(
            idle.check(t0 + s(3)),
            Some(t0 + s(10)),
            "young: look again at the end"
        );
        assert_eq!(idle.check(t0 + s(10)), None, "no stream for the period");
        let token = idle.start(t0 + s(8));
        assert_eq!(idle.open(), 1);
        assert_eq!(idle.check(t0 + s(30)), Some(t0 + s(40)), "a stream is open");
        drop(token);
        assert_eq!(idle.open(), 0);
        assert_eq!(
            idle.check(t0 + s(12)),
            Some(t0 + s(18)),
            "counted from the last start"
        );
        assert_eq!(idle.check(t0 + s(18)), None);
    }

    /// Drain waits for the last stream, and only for it.
    #[tokio::test]
    async fn all_closed_resolves_when_the_last_stream_ends() {
        let mut idle = Idle::new(Duration::from_secs(10), Instant::now());
        idle.all_closed().await;
        let (a, b) = (idle.start(Instant::now()), idle.start(Instant::now()));
        let idle = Arc::new(idle);
        let waiter = tokio::spawn({
            let idle = idle.clone();
            async move { idle.all_closed().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one stream is still open");
        drop(b);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("resolved once both ended")
            .unwrap();
    }

    /// Until one of its streams is admitted, a peer may send no more than
    /// [`super::super::ADMISSION_WINDOW`] on a connection, however many streams it opens and
    /// however long they wait for an answer; then the full window.
    #[tokio::test]
    async fn a_connection_has_a_small_window_until_a_stream_is_admitted() {
        let (c, s) = super::super::tests::pair().await;
        let admit = Arc::new(tokio::sync::Notify::new());
        let server = tokio::spawn({
            let admit = admit.clone();
            async move {
                let conn = handshake(s, 100).await.unwrap();
                // Every stream waits for ever, holding its body unread.
                let pending = |req: Request<RecvStream>, respond: SendResponse<Bytes>| async move {
                    let _held = (req, respond);
                    std::future::pending::<()>().await
                };
                serve(
                    conn,
                    Duration::from_secs(60),
                    std::future::pending(),
                    admit.notified(),
                    pending,
                )
                .await
            }
        });
        let (mut sender, conn) = h2::client::Builder::new()
            .initial_window_size(consts::STREAM_WINDOW)
            .handshake::<_, Bytes>(c)
            .await
            .unwrap();
        tokio::spawn(conn);
        // Eight streams each want a stream window's worth: as much goes as the server grants.
        let granted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut streams = Vec::new();
        for _ in 0..8 {
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri("10.0.0.2:80")
                .body(())
                .unwrap();
            sender = sender.ready().await.unwrap();
            let (_response, mut send) = sender.send_request(req, false).unwrap();
            let granted = granted.clone();
            streams.push(tokio::spawn(async move {
                let mut left = consts::STREAM_WINDOW as usize;
                while left > 0 {
                    send.reserve_capacity(left);
                    let Some(Ok(n)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await
                    else {
                        return;
                    };
                    let n = n.min(left);
                    send.send_data(Bytes::from(vec![0u8; n]), false).unwrap();
                    granted.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    left -= n;
                }
                std::future::pending::<()>().await
            }));
        }
        let sent = || granted.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = sent();
        assert!(
            before <= super::super::ADMISSION_WINDOW as usize,
            "{before} bytes sent before admission"
        );
        admit.notify_one();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while sent() < consts::CONNECTION_WINDOW as usize {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} bytes sent after admission",
                sent()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.abort();
        streams.iter().for_each(|s| s.abort());
    }

    #[test]
    fn validate_table() {
        let local: IpAddr = "10.0.0.2".parse().unwrap();
        type Case = (
            Method,
            &'static str,
            Result<&'static str, (u16, &'static str)>,
        );
        let cases: &[Case] = &[
            (Method::CONNECT, "10.0.0.2:8080", Ok("10.0.0.2:8080")),
            (
                Method::CONNECT,
                "[::ffff:10.0.0.2]:8080",
                Ok("10.0.0.2:8080"),
            ),
            (
                Method::GET,
                "10.0.0.2:8080",
                Err((400, "method_not_connect")),
            ),
            (
                Method::CONNECT,
                "http://10.0.0.2:8080/x",
                Err((400, "connect_with_path")),
            ),
            // What h2 hands over for a CONNECT without `:authority`: a URI of a path alone.
            (Method::CONNECT, "/", Err((400, "missing_authority"))),
            (Method::CONNECT, "/x", Err((400, "missing_authority"))),
            (
                Method::CONNECT,
                "10.0.0.3:8080",
                Err((400, "authority_not_local")),
            ),
            (
                Method::CONNECT,
                "Web.Demo.svc.cluster.local:80",
                Ok("service web.demo.svc.cluster.local:80"),
            ),
            (
                Method::CONNECT,
                "web.demo.svc.cluster.local",
                Err((400, "bad_authority")),
            ),
            (Method::CONNECT, "10.0.0.2", Err((400, "bad_authority"))),
            (Method::CONNECT, "[fd00::2]:x", Err((400, "bad_authority"))),
            (Method::CONNECT, "we_b.demo:80", Err((400, "bad_authority"))),
            (Method::CONNECT, "10.0.0.2:15008", Err((503, "recursion"))),
            (Method::CONNECT, "10.0.0.2:15001", Err((503, "recursion"))),
            (Method::CONNECT, "10.0.0.2:15006", Err((503, "recursion"))),
        ];
        for (m, uri, want) in cases {
            let got = validate(&req(m.clone(), uri, None), local)
                .map(|t| match t.authority {
                    Authority::Addr(a) => a.to_string(),
                    Authority::Service { host, port } => format!("service {host}:{port}"),
                })
                .map_err(|r| (r.status().expect("answered").as_u16(), r.label()));
            let want = want.map(str::to_owned);
            assert_eq!(got, want, "{m} {uri}");
        }
    }

    #[test]
    fn ipv6_authority_and_forwarded() {
        let local: IpAddr = "fd00::2".parse().unwrap();
        let r = req(
            Method::CONNECT,
            "[fd00::2]:80",
            Some("for=\"[fd00::1]:4000\""),
        );
        let t = validate(&r, local).unwrap();
        assert_eq!(
            t.authority,
            Authority::Addr("[fd00::2]:80".parse().unwrap())
        );
        assert_eq!(t.forwarded_for, Some("[fd00::1]:4000".parse().unwrap()));
        let r = req(Method::CONNECT, "[fd00::2]:80", Some("by=x;for=garbage"));
        assert_eq!(validate(&r, local).unwrap().forwarded_for, None);
    }

    #[test]
    fn forwarded_host_and_traceparent_are_read_when_well_formed() {
        let local: IpAddr = "10.0.0.2".parse().unwrap();
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            (
                "for=\"10.0.0.1:4000\";host=Web.demo.svc.cluster.local",
                Some("10.0.0.1:4000"),
                Some("web.demo.svc.cluster.local"),
            ),
            (
                "host=\"web.demo.svc.cluster.local\"",
                None,
                Some("web.demo.svc.cluster.local"),
            ),
            (
                "for=\"10.0.0.1:4000\";host=a b",
                Some("10.0.0.1:4000"),
                None,
            ),
            ("host=", None, None),
        ];
        for (fwd, want_for, want_host) in cases {
            let t = validate(&req(Method::CONNECT, "10.0.0.2:80", Some(fwd)), local).unwrap();
            assert_eq!(
                t.forwarded_for.map(|a| a.to_string()).as_deref(),
                *want_for,
                "{fwd}"
            );
            assert_eq!(t.forwarded_host.as_deref(), *want_host, "{fwd}");
        }
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        for (v, ok) in [
            (good, true),
            (
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                false,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
                false,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319x-b7ad6b7169203331-01",
                false,
            ),
        ] {
            let mut r = req(Method::CONNECT, "10.0.0.2:80", None);
            r.headers_mut().insert("traceparent", v.parse().unwrap());
            let t = validate(&r, local).unwrap();
            assert_eq!(t.traceparent.as_deref(), ok.then_some(v), "{v}");
        }
    }
}
