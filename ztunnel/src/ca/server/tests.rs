//! The CA server's limits, end to end over real TLS and HTTP/2 on loopback: silent connections
//! from one address capped; every place held by mute connections from a few addresses, yet a
//! newcomer from elsewhere served by eviction while a daemon's single idle connection is
//! kept; requests over the rate and over the in-flight cap answered `429`,
//! each counted, while other addresses are served; connections that never become clients
//! (no TLS, no HTTP/2 preface) closed at the deadline, idle ones closed and the client dialling
//! again, requests whose body never comes holding no place in flight; and the client trying a
//! request refused unanswered on its kept connection once more on a new one; an authorization
//! that cannot be decided answered `500`, one never decided `408`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use ztunnel_proto::ca::SignRequest;

use super::*;
use crate::ca::CaClient;
use crate::gate::Limits;
use crate::identity::{generate_csr, CertSigner, SignError};

const TOKEN: &str = "s3cret";

struct Ca {
    _dir: tempfile::TempDir,
    root: String,
    addr: SocketAddr,
    metrics: Arc<CaMetrics>,
}

async fn start(limits: CaLimits, auth: Arc<dyn SignAuthorizer>) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(LocalCa::load_or_create(dir.path(), "cluster.local").unwrap());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let metrics = Arc::new(CaMetrics::default());
    tokio::spawn(serve(
        l,
        watch::channel(ca.clone()).1,
        auth,
        vec!["localhost".into()],
        metrics.clone(),
        limits,
        std::future::pending(),
    ));
    Ca {
        _dir: dir,
        root: ca.root_pem(),
        addr,
        metrics,
    }
}

fn static_auth() -> Arc<dyn SignAuthorizer> {
    Arc::new(StaticTokenAuthorizer::new(vec![TOKEN.into()]).unwrap())
}

fn client(ca: &Ca) -> CaClient {
    CaClient::new(
        ca.addr.to_string(),
        "localhost".into(),
        &ca.root,
        Some(TOKEN.into()),
    )
    .unwrap()
}

fn request() -> SignRequest {
    let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
    SignRequest {
        csr_pem: generate_csr(&id).unwrap().csr_pem,
        identity: id.to_string(),
        lifetime_secs: 600,
    }
}

fn limits(connections_per_peer: usize, in_flight_per_peer: usize, burst: u32) -> CaLimits {
    CaLimits {
        connections: Limits {
            total: 100,
            per_peer: connections_per_peer,
        },
        streams_per_connection: 64,
        requests_in_flight: Limits {
            total: 100,
            per_peer: in_flight_per_peer,
        },
        burst: NonZeroU32::new(burst).unwrap(),
        refill: Duration::from_secs(3600),
        ..CaLimits::default()
    }
}

/// A TCP connection from `src`.
async fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    sock.connect(to).await
}

/// A connection from `src` that has done its TLS handshake with the CA (ALPN `h2`) and sent
/// nothing since.
async fn tls_from(src: &str, ca: &Ca) -> TlsStream<TcpStream> {
    let roots = crate::identity::root_store(
        &crate::identity::parse_pem_certs(std::slice::from_ref(&ca.root)).unwrap(),
    )
    .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = connect_from(src, ca.addr).await.unwrap();
    TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the CA")
}

/// Waits up to 5 s for `done`.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    for _ in 0..250 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 5 s: {what}");
}

/// A connection from `src` that never speaks; `None` if the CA reset it at once.
async fn silent_from(src: &str, to: SocketAddr) -> Option<TcpStream> {
    let mut s = connect_from(src, to).await.ok()?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await {
        Err(_) => Some(s),
        Ok(Ok(0) | Err(_)) => None,
        Ok(Ok(_)) => panic!("the CA spoke first"),
    }
}

#[tokio::test]
async fn connections_from_one_address_are_capped_and_others_still_served() {
    let ca = start(limits(4, 64, 256), static_auth()).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        match silent_from("127.0.0.2", ca.addr).await {
            Some(s) => held.push(s),
            None => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (4, 2));
    assert_eq!(ca.metrics.refusals("connection_limit"), 2);
    // Another address is served meanwhile.
    client(&ca).sign(request()).await.expect("signed");
    // A closed connection frees its place (once the CA has seen it close).
    drop(held.pop());
    let mut tries = 0;
    while silent_from("127.0.0.2", ca.addr).await.is_none() {
        tries += 1;
        assert!(tries < 50, "the closed connection's place was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ca.metrics.refusals("connection_limit"), 2 + tries);
}

#[tokio::test]
async fn requests_over_the_rate_get_429_and_other_addresses_do_not_pay() {
    let ca = start(limits(4, 64, 3), static_auth()).await;
    let c = client(&ca);
    for _ in 0..3 {
        c.sign(request()).await.expect("within the burst");
    }
    let err = c.sign(request()).await.unwrap_err();
    assert!(
        matches!(&err, SignError::Refused { status: 429, message } if message.contains("at most 3 at once")),
        "{err}"
    );
    // Refused before the token is judged: a flood with bad tokens costs no authorization.
    let bad = CaClient::new(
        ca.addr.to_string(),
        "localhost".into(),
        &ca.root,
        Some("wrong".into()),
    )
    .unwrap();
    let err = bad.sign(request()).await.unwrap_err();
    assert!(
        matches!(err, SignError::Refused { status: 429, .. }),
        "{err}"
    );
    assert_eq!(ca.metrics.refusals("rate_limited"), 2);
    assert_eq!(ca.metrics.refusals("unknown_token"), 0);
}

/// Holds every authorization until released; counts those waiting.
struct Held {
    waiting: AtomicUsize,
    release: Semaphore,
}

impl SignAuthorizer for Held {
    fn authorize<'a>(
        &'a self,
        _token: Option<&'a str>,
        _identity: &'a Identity,
    ) -> crate::identity::BoxFuture<'a, Result<(), Denied>> {
        Box::pin(async move {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.release.acquire().await.unwrap().forget();
            Ok(())
        })
    }
}

#[tokio::test]
async fn requests_over_the_in_flight_cap_get_429_without_waiting() {
    let held = Arc::new(Held {
        waiting: AtomicUsize::new(0),
        release: Semaphore::new(0),
    });
    let ca = start(limits(4, 2, 256), held.clone()).await;
    let c = Arc::new(client(&ca));
    let pending: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.sign(request()).await })
        })
        .collect();
    while held.waiting.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = c.sign(request()).await.unwrap_err();
    assert!(
        matches!(&err, SignError::Refused { status: 429, message } if message.contains("requests in flight from this peer (2)")),
        "{err}"
    );
    assert_eq!(ca.metrics.refusals("too_many_requests"), 1);
    held.release.add_permits(2);
    for p in pending {
        p.await.unwrap().expect("signed once authorized");
    }
    // Answered requests free their places.
    held.release.add_permits(1);
    c.sign(request()).await.expect("signed");
    assert_eq!(held.waiting.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn failed_handshakes_are_counted() {
    let ca = start(CaLimits::default(), static_auth()).await;
    let other = tempfile::tempdir().unwrap();
    let stranger = LocalCa::load_or_create(other.path(), "cluster.local").unwrap();
    let c = CaClient::new(
        ca.addr.to_string(),
        "localhost".into(),
        &stranger.root_pem(),
        Some(TOKEN.into()),
    )
    .unwrap();
    let err = c.sign(request()).await.unwrap_err();
    assert!(matches!(err, SignError::Transport(_)), "{err}");
    for _ in 0..100 {
        if ca.metrics.refusals("tls_handshake") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ca.metrics.refusals("tls_handshake"), 1);
}

#[tokio::test]
async fn connections_that_never_become_clients_are_closed_at_the_deadline() {
    let deadline = Duration::from_millis(1500);
    let ca = start(
        CaLimits {
            connections: Limits {
                total: 8,
                per_peer: 8,
            },
            handshake_timeout: deadline,
            ..limits(8, 64, 256)
        },
        static_auth(),
    )
    .await;
    // Every place: four connections that never send a byte, four that complete TLS and never
    // send the HTTP/2 preface.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect_from("127.0.0.2", ca.addr).await.unwrap());
    }
    let mut mute = Vec::new();
    for _ in 0..4 {
        mute.push(tls_from("127.0.0.3", &ca).await);
    }
    assert_eq!(ca.metrics.connections(), 8);
    // Both addresses hold as many: another connection from either is refused, not evicted.
    assert!(silent_from("127.0.0.3", ca.addr).await.is_none());
    assert_eq!(ca.metrics.refusals("connection_limit"), 1);
    // At the deadline they are closed and counted, and the places are free again.
    eventually("the silent connections closed", || {
        ca.metrics.refusals("tls_timeout") == 4 && ca.metrics.refusals("preface_timeout") == 4
    })
    .await;
    eventually("every place freed", || ca.metrics.connections() == 0).await;
    for mut s in mute {
        let mut b = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .expect("the CA closed the connection")
            {
                Ok(0) | Err(_) => break,
                // Session tickets.
                Ok(_) => continue,
            }
        }
    }
    client(&ca).sign(request()).await.expect("signed");
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_the_client_dials_again() {
    let held = Arc::new(Held {
        waiting: AtomicUsize::new(0),
        release: Semaphore::new(0),
    });
    let ca = start(
        CaLimits {
            idle_timeout: Duration::from_millis(300),
            ..limits(4, 64, 256)
        },
        held.clone(),
    )
    .await;
    let c = Arc::new(client(&ca));
    // A request answered after longer than the idle timeout: an open stream is not idle.
    let slow = {
        let c = c.clone();
        tokio::spawn(async move { c.sign(request()).await })
    };
    eventually("the request waiting", || {
        held.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    held.release.add_permits(1);
    slow.await
        .unwrap()
        .expect("signed on the connection kept open");
    assert_eq!(ca.metrics.connections(), 1);
    // Then nothing: the connection is closed, its place freed.
    eventually("the idle connection closed", || {
        ca.metrics.connections() == 0
    })
    .await;
    // The same client dials again when it next needs the CA.
    held.release.add_permits(1);
    c.sign(request()).await.expect("signed on a new connection");
    assert_eq!(ca.metrics.connections(), 1);
}

#[tokio::test]
async fn a_request_whose_body_never_comes_holds_no_place_in_flight() {
    let ca = start(
        CaLimits {
            request_timeout: Duration::from_millis(800),
            ..limits(4, 2, 256)
        },
        static_auth(),
    )
    .await;
    let (mut send, conn) = h2::client::handshake(tls_from("127.0.0.1", &ca).await)
        .await
        .unwrap();
    tokio::spawn(conn);
    let headers = |method: Method, path: &str| {
        Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .header(http::header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(())
            .unwrap()
    };
    // As many requests as the address may have in flight, headers only, bodies never sent.
    let mut stuck = Vec::new();
    for _ in 0..2 {
        send = send.ready().await.unwrap();
        let (resp, body) = send
            .send_request(headers(Method::POST, SIGN_PATH), false)
            .unwrap();
        stuck.push((resp, body));
    }
    // A later stream on the same connection is answered: the server has seen the others.
    send = send.ready().await.unwrap();
    let (resp, _) = send
        .send_request(headers(Method::GET, "/metrics"), true)
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);
    // A legitimate request from the same address is served meanwhile.
    client(&ca).sign(request()).await.expect("signed");
    assert_eq!(ca.metrics.refusals("too_many_requests"), 0);
    // The bodies' deadline: `408`, counted.
    for (resp, _body) in stuck {
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("answered at the deadline")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    }
    assert_eq!(ca.metrics.refusals("body_timeout"), 2);
}

#[tokio::test]
async fn a_request_refused_unanswered_on_the_kept_connection_is_tried_on_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
    let acceptor = tls_acceptor(&ca, &["localhost".into()]).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    // A server whose first connection answers one request, then refuses the next one
    // unprocessed (`REFUSED_STREAM`, as a closing connection does); later ones answer all.
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            let tls = acceptor.accept(tcp).await.unwrap();
            let mut conn = h2::server::handshake(tls).await.unwrap();
            tokio::spawn(async move {
                let mut answered = 0;
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if first && answered == 1 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else {
                        let resp = Response::builder().status(200).body(()).unwrap();
                        let _ = respond.send_response(resp, true);
                    }
                    answered += 1;
                }
            });
        }
    });
    let c = CaClient::new(addr.to_string(), "localhost".into(), &ca.root_pem(), None).unwrap();
    assert_eq!(c.get("/").await.unwrap().0, 200);
    assert_eq!(
        c.get("/").await.expect("tried again on a new connection").0,
        200
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// Requests that waited for a dial that failed fail with it: the CA is dialled once, not once
/// per waiting request in turn (with a CA dropping packets, each would wait its full timeout
/// behind the others). Once it answers again, a request dials anew.
#[tokio::test]
async fn requests_waiting_on_a_failed_dial_fail_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    // Closes every connection after a while: every TLS handshake fails, and the first dial
    // is still under way when the other requests ask for one.
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(tcp);
            });
        }
    });
    let c = CaClient::new(addr.to_string(), "localhost".into(), &ca.root_pem(), None).unwrap();
    let (a, b, d) = tokio::join!(c.get("/"), c.get("/"), c.get("/"));
    for r in [a, b, d] {
        assert!(matches!(r, Err(SignError::Transport(_))), "{r:?}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one dial");
    assert!(c.get("/").await.is_err());
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "a later request dials");
}

/// An HTTP/2 connection from `src`, idle once it has been answered `GET /metrics` (no token
/// needed), as a daemon keeps its connection between renewals.
async fn daemon_connection_from(src: &str, ca: &Ca) -> h2::client::SendRequest<Bytes> {
    let tls = tls_from(src, ca).await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    assert_eq!(metrics_on(send.clone()).await, Some(StatusCode::OK));
    send
}

/// `GET /metrics` on a kept connection: its status, or `None` if the connection is gone.
async fn metrics_on(send: h2::client::SendRequest<Bytes>) -> Option<StatusCode> {
    let mut send = send.ready().await.ok()?;
    let req = Request::get("https://localhost/metrics").body(()).unwrap();
    let (resp, _) = send.send_request(req, true).ok()?;
    Some(resp.await.ok()?.status())
}

/// An HTTP/2 connection to the CA from `src`.
async fn h2_from(src: &str, ca: &Ca) -> h2::client::SendRequest<Bytes> {
    let (send, conn) = h2::client::handshake(tls_from(src, ca).await)
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A sign request's head, with the token.
fn sign_request() -> Request<()> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("https://localhost{SIGN_PATH}"))
        .header(http::header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(())
        .unwrap()
}

/// Whether the CA has closed `s` (session tickets read past), within 5 s.
async fn closed_by_the_ca(s: &mut TlsStream<TcpStream>) -> bool {
    let mut b = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn mute_connections_holding_every_place_keep_out_neither_newcomers_nor_a_daemon() {
    // A deadline far beyond the test: only eviction can admit anyone.
    let ca = start(
        CaLimits {
            connections: Limits {
                total: 13,
                per_peer: 4,
            },
            handshake_timeout: Duration::from_secs(3600),
            ..limits(4, 64, 256)
        },
        static_auth(),
    )
    .await;
    // A daemon's connection, established, answered once, then idle.
    let daemon = daemon_connection_from("127.0.0.5", &ca).await;
    // Every other place: connections from three addresses that complete TLS and never send
    // the HTTP/2 preface.
    let mut mute = Vec::new();
    for src in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        for _ in 0..4 {
            mute.push(tls_from(src, &ca).await);
        }
    }
    assert_eq!(ca.metrics.connections(), 13);
    // A legitimate client from a new address gets its certificate: its connection takes the
    // place of the oldest connection of an address holding the most.
    let legit = client(&ca);
    legit
        .sign(request())
        .await
        .expect("signed during the flood");
    assert_eq!(ca.metrics.refusals(EVICTED), 1);
    assert!(
        closed_by_the_ca(&mut mute[0]).await,
        "the oldest mute connection closed"
    );
    // More newcomers, each from an address of its own, each in place of a mute connection.
    let mut newcomers = Vec::new();
    for src in ["127.0.0.6", "127.0.0.7", "127.0.0.8", "127.0.0.9"] {
        newcomers.push(tls_from(src, &ca).await);
    }
    assert_eq!(ca.metrics.refusals(EVICTED), 5);
    assert_eq!(ca.metrics.refusals("connection_limit"), 0);
    assert_eq!(ca.metrics.connections(), 13);
    // The daemon's single connection, the oldest of all, was never the one to go.
    assert_eq!(metrics_on(daemon).await, Some(StatusCode::OK));
    assert_eq!(ca.metrics.refusals("preface_timeout"), 0);
    drop(legit);
}

/// A request whose headers take more than [`super::MAX_HEADER_LIST`] is answered `431` without
/// being kept (its connection serves on); one far over it closes the connection (h2's
/// `GOAWAY`), counted as an HTTP/2 error.
#[tokio::test]
async fn requests_with_oversized_headers_are_refused() {
    let ca = start(limits(4, 8, 256), static_auth()).await;
    let mut send = h2_from("127.0.0.1", &ca).await;
    let oversized = |send: &mut h2::client::SendRequest<Bytes>, filler: usize| {
        let mut req = sign_request();
        let filler = http::HeaderValue::from_str(&"a".repeat(filler)).unwrap();
        req.headers_mut().insert("x-filler", filler);
        send.send_request(req, true).unwrap().0
    };
    let limit = super::MAX_HEADER_LIST as usize;
    let status = tokio::time::timeout(Duration::from_secs(5), oversized(&mut send, limit + 1024))
        .await
        .expect("answered")
        .map(|r| r.status());
    assert!(
        matches!(status, Ok(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)),
        "{status:?}"
    );
    assert_eq!(
        metrics_on(send.clone()).await,
        Some(StatusCode::OK),
        "the connection serves on"
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), oversized(&mut send, 4 * limit))
        .await
        .expect("answered");
    assert!(closed.as_ref().is_err_and(|e| e.is_go_away()), "{closed:?}");
    eventually("the error counted", || {
        ca.metrics.refusals("http2_error") == 1
    })
    .await;
}

/// A connection carries at most `streams_per_connection` requests at once: the CA says so in
/// its HTTP/2 settings, and with two requests held open (bodies never sent) a third on the
/// same connection waits until one of them ends, while another connection is served.
#[tokio::test]
async fn a_connection_carries_at_most_its_streams_at_once() {
    let ca = start(
        CaLimits {
            streams_per_connection: 2,
            request_timeout: Duration::from_secs(3600),
            ..limits(4, 8, 256)
        },
        static_auth(),
    )
    .await;
    let (mut send, conn) = h2::client::handshake(tls_from("127.0.0.1", &ca).await)
        .await
        .unwrap();
    tokio::spawn(conn);
    send = send.ready().await.unwrap();
    let settings = send.clone();
    eventually("the CA's settings", || {
        settings.current_max_send_streams() == 2
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        send = send.ready().await.unwrap();
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("https://localhost{SIGN_PATH}"))
            .header(http::header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(())
            .unwrap();
        held.push(send.send_request(req, false).unwrap());
    }
    let third = tokio::spawn(metrics_on(send));
    client(&ca)
        .sign(request())
        .await
        .expect("another connection is served");
    assert!(!third.is_finished(), "a third stream was carried");
    drop(held.remove(0));
    let third = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third is carried once a place is free")
        .unwrap();
    assert_eq!(third, Some(StatusCode::OK));
}

/// A body over `MAX_BODY` is refused `413` before it is all read (it is read before the
/// caller is authenticated), a path that is no endpoint `404`; each counted under its reason,
/// the connection serving on.
#[tokio::test]
async fn oversized_bodies_and_unknown_paths_are_refused_and_counted() {
    let ca = start(limits(4, 8, 256), static_auth()).await;
    let mut send = h2_from("127.0.0.1", &ca).await;
    let post = |send: &mut h2::client::SendRequest<Bytes>, body: usize| {
        let (resp, mut stream) = send.send_request(sign_request(), false).unwrap();
        stream
            .send_data(Bytes::from(vec![b'{'; body]), true)
            .unwrap();
        resp
    };
    // (body size, answer, reason counted)
    let cases = [
        (MAX_BODY + 1, StatusCode::PAYLOAD_TOO_LARGE, "bad_request"),
        (4 * MAX_BODY, StatusCode::PAYLOAD_TOO_LARGE, "bad_request"),
        (MAX_BODY, StatusCode::BAD_REQUEST, "bad_request"),
    ];
    for (n, (size, want, reason)) in cases.into_iter().enumerate() {
        let resp = tokio::time::timeout(Duration::from_secs(5), post(&mut send, size))
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(resp.status(), want, "{size} bytes");
        eventually("the refusal counted", || {
            ca.metrics.refusals(reason) == n as u64 + 1
        })
        .await;
    }
    let req = Request::get("https://localhost/nope").body(()).unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::NOT_FOUND);
    eventually("the 404 counted", || ca.metrics.refusals("not_found") == 1).await;
    assert_eq!(metrics_on(send.clone()).await, Some(StatusCode::OK));
}

/// Answers by token: `unavailable` cannot be decided, `hang` is never answered, any other is
/// allowed.
struct Scripted;

impl SignAuthorizer for Scripted {
    fn authorize<'a>(
        &'a self,
        token: Option<&'a str>,
        _identity: &'a Identity,
    ) -> crate::identity::BoxFuture<'a, Result<(), Denied>> {
        Box::pin(async move {
            match token {
                Some("unavailable") => Err(Denied::Unavailable("the API server is down".into())),
                Some("hang") => std::future::pending().await,
                _ => Ok(()),
            }
        })
    }
}

/// An authorization that cannot be decided is `500` (`unavailable`), one that is never
/// decided `408` at the request timeout (`timeout`); each is counted, and gives back its
/// place in flight, so the peer's next request (one place) is signed.
#[tokio::test]
async fn undecided_authorizations_are_500_or_408_and_counted() {
    let ca = start(
        CaLimits {
            request_timeout: Duration::from_millis(300),
            ..limits(4, 1, 256)
        },
        Arc::new(Scripted),
    )
    .await;
    let with = |token: &str| {
        CaClient::new(
            ca.addr.to_string(),
            "localhost".into(),
            &ca.root,
            Some(token.into()),
        )
        .unwrap()
    };
    for (token, status, reason) in [
        ("unavailable", 500, "unavailable"),
        ("hang", 408, "timeout"),
    ] {
        let client = with(token);
        let answer = tokio::time::timeout(Duration::from_secs(5), client.sign(request()));
        let err = answer.await.expect("answered").unwrap_err();
        assert!(
            matches!(&err, SignError::Refused { status: s, .. } if *s == status),
            "{token}: {err}"
        );
        eventually("the refusal counted", || ca.metrics.refusals(reason) == 1).await;
        with("ok")
            .sign(request())
            .await
            .expect("its place is given back");
    }
}
