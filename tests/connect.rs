//! CONNECT validation by a real daemon, from a client that holds a valid mesh certificate:
//! reserved ports and closed application ports are 503, a target that is not the connection's
//! local address is 400, a request that is not a CONNECT is 400, a CONNECT without `:authority`
//! (written by hand) is 400, and a CONNECT carrying
//! `:scheme`/`:path` is reset with PROTOCOL_ERROR (RFC 9113 §8.5; h2 does not surface it as a
//! request, so no 400 can be sent). The application sees none of these. A `forwarded` header
//! is recorded in the access log beside the tunnel peer's own address, never in its place. A
//! tunnel connection to an address of no local workload is reset before TLS; a captured
//! connection from an address of no workload is reset by the source's daemon. A peer that
//! repeats a bad request has each one counted, and its warnings throttled and clipped.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::hbone::client;
use ztunnel::net::ConnectOptions;
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, B_IP};
use ztunnel_e2e::raw_h2::{self, Outcome};

/// A tunnel connection to `b` (HTTP/2, 15008) with `cfg`, driven in the background.
async fn tunnel_to_b(cfg: Arc<rustls::ClientConfig>) -> SendRequest<Bytes> {
    let opts = ConnectOptions {
        mark: None,
        timeout: Duration::from_secs(5),
    };
    let tunnel = format!("{B_IP}:15008").parse().unwrap();
    let (send, conn) = client::connect(tunnel, cfg, opts).await.expect("tunnel");
    tokio::spawn(conn);
    send
}

/// The status a `GET` of `path` on `b`'s application port is answered with, on the tunnel
/// connection `send` (a `GET` is never a tunnel: `400`).
async fn get_status(send: &SendRequest<Bytes>, path: &str) -> u16 {
    let get = Request::builder()
        .method(Method::GET)
        .uri(format!("https://{B_IP}:8080{path}"))
        .body(())
        .unwrap();
    match client::open_stream(send.clone(), get).await {
        Ok(_) => 200,
        Err(e) => e.status().expect("an HTTP answer").as_u16(),
    }
}

#[test]
fn connect_requests_get_the_contract_status() {
    let mesh = Mesh::builder().start();
    let accepted = mesh.b.spawn(async {
        let l = apps::listen(8080).await;
        tokio::time::timeout(Duration::from_secs(3), l.accept())
            .await
            .is_ok()
    });
    let cfg = mesh.client_tls();
    let statuses = mesh.c.block_on(async move {
        let send = tunnel_to_b(cfg.clone()).await;
        let mut out = Vec::new();
        for target in [
            format!("{B_IP}:15008"),
            format!("{B_IP}:15001"),
            format!("{B_IP}:8081"),
            "10.77.0.3:8080".into(),
        ] {
            let req =
                client::connect_request(target.parse().unwrap(), &Default::default()).unwrap();
            let status = match client::open_stream(send.clone(), req).await {
                Ok(_) => StatusCode::OK,
                Err(e) => e.status().expect("an HTTP answer"),
            };
            out.push((target, status.as_u16()));
        }
        out.push(("GET".into(), get_status(&send, "/").await));

        // The malformed CONNECT, by hand, on its own TLS connection.
        let tcp = tokio::net::TcpStream::connect(format!("{B_IP}:15008"))
            .await
            .unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from(B_IP).unwrap(), tcp)
            .await
            .unwrap();
        let authority = format!("{B_IP}:8080");
        let outcome = raw_h2::send(
            &mut tls,
            &[
                (":method", "CONNECT"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", &authority),
            ],
        )
        .await
        .unwrap();
        (out, outcome)
    });
    let (out, outcome) = statuses;
    let want = vec![
        (format!("{B_IP}:15008"), 503),
        (format!("{B_IP}:15001"), 503),
        (format!("{B_IP}:8081"), 503),
        ("10.77.0.3:8080".to_string(), 400),
        ("GET".to_string(), 400),
    ];
    assert_eq!(out, want);
    assert_eq!(outcome, Outcome::Reset(1), "PROTOCOL_ERROR");
    assert!(
        !mesh.b.join(accepted),
        "the application must not see any of these"
    );
    let m = Mesh::metrics(&mesh.b);
    assert_eq!(
        metric(&m, "ztunnel_refusals_total", &[("reason", "recursion")]),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "ztunnel_refusals_total",
            &[("reason", "inbound_app_unreachable")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "ztunnel_refusals_total",
            &[("reason", "authority_not_local")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "ztunnel_refusals_total",
            &[("reason", "method_not_connect")]
        ),
        1.0,
        "{m}"
    );
}

/// A peer's `forwarded` header is what it claims of its client: the destination's access log
/// keeps the tunnel's own source address and records the claim beside it, never in its place.
#[test]
fn the_access_log_keeps_the_tunnel_peer_address_beside_a_forwarded_claim() {
    let mesh = Mesh::builder().start();
    mesh.b.serve(8080, |l| async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    let cfg = mesh.client_tls();
    mesh.c.block_on(async move {
        let send = tunnel_to_b(cfg).await;
        let headers = ztunnel::hbone::ConnectHeaders {
            forwarded_for: Some("203.0.113.9:4444".parse().unwrap()),
            ..Default::default()
        };
        let req =
            client::connect_request(format!("{B_IP}:8080").parse().unwrap(), &headers).unwrap();
        let stream = client::open_stream(send, req).await.expect("200");
        drop(stream);
    });
    let line = |log: &str| {
        ztunnel_e2e::daemon::access_lines(log)
            .into_iter()
            .find(|l| l["direction"] == "inbound" && l["forwarded_for"] != "")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while line(&mesh.b_daemon.log()).is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = mesh.b_daemon.log();
    let l = line(&log).unwrap_or_else(|| panic!("no inbound access line:\n{log}"));
    assert_eq!(l["forwarded_for"], "203.0.113.9:4444", "{l}");
    let src = l["src_addr"].as_str().unwrap();
    assert!(
        src.starts_with("10.77.0.3:"),
        "src_addr is the tunnel peer's own address, not the claim: {l}"
    );
}

/// A tunnel connection to an address of the node that is no local workload's (here the
/// node's loopback) is reset before any TLS, with the certificate of no workload ever shown,
/// counted and logged.
#[test]
fn a_tunnel_to_an_address_of_no_local_workload_is_reset_before_tls() {
    let mesh = Mesh::builder().start();
    let cfg = mesh.client_tls();
    let outcome = mesh.b.block_on(async move {
        // The reset can come before the connect has completed on this side.
        let tcp = tokio::net::TcpStream::connect("127.0.0.1:15008").await?;
        tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .map(|_| ())
    });
    let e = outcome.expect_err("a TLS handshake completed");
    assert_ne!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the tunnel port listens on every address"
    );
    let labels = [("reason", "inbound_unknown_destination")];
    let m = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(metric(&m, "ztunnel_refusals_total", &labels), 1.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "ztunnel_refusals_total",
            &[("reason", "inbound_tls_handshake")]
        ),
        0.0,
        "refused before TLS: {m}"
    );
    let log = mesh.b_daemon.log();
    assert!(log.contains("address of no local workload"), "{log}");
}

/// A captured connection whose source address is no local workload's (host `a` given a second
/// address that discovery does not know) is reset at once by the source's daemon, counted and
/// logged: it is never tunnelled under some workload's identity, nor sent in plaintext.
#[test]
fn a_captured_connection_from_an_address_of_no_workload_is_reset() {
    let mesh = Mesh::builder().start();
    mesh.a
        .ip(&["addr", "add", "10.77.0.99/24", "dev", "eth0"])
        .expect("a second address");
    let accepted = mesh.b.spawn(async {
        let l = apps::listen(8080).await;
        tokio::time::timeout(Duration::from_secs(3), l.accept())
            .await
            .is_ok()
    });
    let outcome = mesh.a.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("10.77.0.99:0".parse().unwrap()).unwrap();
        let mut s = sock
            .connect(format!("{B_IP}:8080").parse().unwrap())
            .await?;
        s.write_all(b"hello").await?;
        let mut buf = [0u8; 16];
        s.read(&mut buf).await
    });
    assert!(
        matches!(outcome, Ok(0) | Err(_)),
        "closed or reset, nothing answered: {outcome:?}"
    );
    assert!(!mesh.b.join(accepted), "the application saw the connection");
    let labels = [("reason", "outbound_unknown_source")];
    let m = Mesh::metrics_when(&mesh.a, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(metric(&m, "ztunnel_refusals_total", &labels), 1.0, "{m}");
}

/// A `CONNECT` without `:authority` (which HTTP/2 lets through: only the daemon can refuse it)
/// is answered `400` on its stream, never reaches the application, and is counted as
/// `missing_authority` and logged.
#[test]
fn a_connect_without_authority_is_answered_400() {
    let mesh = Mesh::builder().start();
    let l = mesh.b.block_on(apps::listen(8080));
    let cfg = mesh.client_tls();
    let outcome = mesh.c.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(format!("{B_IP}:15008"))
            .await
            .unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from(B_IP).unwrap(), tcp)
            .await
            .expect("mutual TLS with b");
        let io = raw_h2::send(&mut tls, &[(":method", "CONNECT")]);
        tokio::time::timeout(Duration::from_secs(5), io)
            .await
            .expect("an answer within 5 s")
            .expect("the stream's answer")
    });
    // `:status: 400` is entry 12 of HPACK's static table: an indexed field, 0x80 | 12, first
    // in the response's header block.
    match &outcome {
        Outcome::Headers(block) if block.first() == Some(&0x8c) => {}
        other => panic!("the stream must be answered 400: {other:?}"),
    }
    let labels = [("reason", "missing_authority")];
    let m = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(metric(&m, "ztunnel_refusals_total", &labels), 1.0, "{m}");
    let accepted = mesh.b.block_on(async move {
        tokio::time::timeout(Duration::from_secs(1), l.accept())
            .await
            .is_ok()
    });
    assert!(!accepted, "the application must not see the refused stream");
    let log = mesh.b_daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("CONNECT refused") && l.contains("missing_authority")),
        "{log}"
    );
}

/// An authenticated peer repeating a bad request as fast as it can: each one is answered `400`
/// and counted, but its warnings come through in bursts (at most 10 a second, the next one
/// saying how many were `suppressed`), each showing no more than 256 bytes of the peer's URI.
#[test]
fn a_peer_repeating_a_bad_request_is_counted_every_time_but_logged_in_clipped_bursts() {
    const REQUESTS: usize = 200;
    let mesh = Mesh::builder().start();
    let cfg = mesh.client_tls();
    let long_path = format!("/{}", "x".repeat(8 * 1024));
    let statuses = mesh.c.block_on(async move {
        let send = tunnel_to_b(cfg).await;
        let mut statuses = Vec::new();
        for _ in 0..REQUESTS {
            statuses.push(get_status(&send, &long_path).await);
        }
        statuses
    });
    assert!(statuses.iter().all(|s| *s == 400), "{statuses:?}");
    let labels = [("reason", "method_not_connect")];
    let m = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &labels, REQUESTS as f64);
    assert_eq!(
        metric(&m, "ztunnel_refusals_total", &labels),
        REQUESTS as f64,
        "{m}"
    );
    let log = mesh.b_daemon.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONNECT refused"))
        .collect();
    assert!(
        (1..=REQUESTS / 2).contains(&warnings.len()),
        "{} warnings for {REQUESTS} refusals",
        warnings.len()
    );
    for w in &warnings {
        assert!(w.len() < 1024, "a warning of {} bytes: {w}", w.len());
        assert!(
            w.contains(&"x".repeat(200)),
            "the URI's start is shown: {w}"
        );
    }
}
