//! Hostile and broken peers at a real daemon's tunnel port (15008): a hundred peers that
//! connect and never speak, bytes that are not TLS, and a peer with a valid mesh certificate
//! that sends a garbled HTTP/2 frame. Each is refused, counted in
//! `ztunnel_refusals_total{reason}` and logged (the warnings throttled); while the silent peers
//! hold their connections a legitimate client still gets its tunnel, and the silent ones are
//! dropped once the handshake timeout (10 s) has passed.

use std::net::SocketAddr;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::hbone::client;
use ztunnel::net::ConnectOptions;
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, B_IP};

const SILENT_PEERS: usize = 100;

/// Reads until the peer closes (EOF or reset) and returns what arrived; fails if the peer
/// keeps the connection open past `within`.
async fn read_until_closed<R: AsyncReadExt + Unpin>(r: &mut R, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .expect("the daemon closes the connection");
    got
}

/// The error codes of the GOAWAY frames in an HTTP/2 byte stream (server side: no preface).
fn goaway_codes(mut bytes: &[u8]) -> Vec<u32> {
    let mut codes = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let (kind, payload) = (bytes[3], &bytes[9..]);
        if payload.len() < len {
            break;
        }
        if kind == 0x7 && len >= 8 {
            codes.push(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
        bytes = &payload[len..];
    }
    codes
}

#[test]
fn hostile_peers_are_refused_counted_and_keep_no_one_out() {
    let mesh = Mesh::default_pair();
    let tunnel: SocketAddr = format!("{B_IP}:15008").parse().unwrap();
    let cfg = mesh.client_tls();

    // A hundred peers connect and say nothing.
    let silent = mesh.c.block_on(async move {
        let mut held = Vec::new();
        for _ in 0..SILENT_PEERS {
            held.push(TcpStream::connect(tunnel).await.expect("connect"));
        }
        held
    });

    // While they hold on, a legitimate client gets a tunnel and an answer.
    let app = mesh.b.spawn(async {
        let l = apps::listen(8080).await;
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(&b).await.unwrap();
    });
    let legit_cfg = cfg.clone();
    let echoed = mesh.c.block_on(async move {
        let opts = ConnectOptions {
            mark: None,
            timeout: Duration::from_secs(5),
        };
        let (send, conn) = client::connect(tunnel, legit_cfg, opts)
            .await
            .expect("a legitimate tunnel despite the silent peers");
        tokio::spawn(conn);
        let target = format!("{B_IP}:8080").parse().unwrap();
        let req = client::connect_request(target, &Default::default()).unwrap();
        let (mut tx, mut rx) = client::open_stream(send, req).await.expect("200");
        tx.send_data(bytes::Bytes::from_static(b"x"), false)
            .unwrap();
        rx.data().await.expect("echo").expect("data")
    });
    assert_eq!(&echoed[..], b"x");
    mesh.b.join(app);

    // Bytes that are not TLS: closed at once.
    mesh.c.block_on(async move {
        let mut s = TcpStream::connect(tunnel).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: ztunnel\r\n\r\n")
            .await
            .unwrap();
        read_until_closed(&mut s, Duration::from_secs(5)).await;
    });

    // A valid certificate, then a SETTINGS frame whose length is not a multiple of 6:
    // answered with a GOAWAY carrying an error code, and closed.
    let answer = mesh.c.block_on(async move {
        let tcp = TcpStream::connect(tunnel).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from(B_IP).unwrap(), tcp)
            .await
            .expect("TLS");
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend_from_slice(&[0, 0, 5, 0x4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]);
        tls.write_all(&out).await.unwrap();
        tls.flush().await.unwrap();
        read_until_closed(&mut tls, Duration::from_secs(5)).await
    });
    assert!(
        goaway_codes(&answer).iter().any(|&code| code != 0),
        "a GOAWAY with an error code expected, got {answer:?}"
    );

    // The silent peers are dropped after the handshake timeout.
    mesh.c.block_on(async move {
        for mut s in silent {
            read_until_closed(&mut s, Duration::from_secs(20)).await;
        }
    });

    let counted = |reason: &str, want: f64| {
        let m = Mesh::metrics_when(
            &mesh.b,
            "ztunnel_refusals_total",
            &[("reason", reason)],
            want,
        );
        assert_eq!(
            metric(&m, "ztunnel_refusals_total", &[("reason", reason)]),
            want,
            "{reason}: {m}"
        );
    };
    counted("inbound_tls_timeout", SILENT_PEERS as f64);
    counted("inbound_tls_handshake", 1.0);
    counted("inbound_http2_error", 1.0);
    let log = mesh.b_daemon.log();
    for line in [
        "tunnel TLS handshake timed out",
        "tunnel TLS handshake failed",
        "tunnel connection closed on an HTTP/2 error",
    ] {
        assert!(log.contains(line), "not logged: {line}");
    }
    // The 100 timeouts came within a fraction of a second: all counted, but their warnings
    // throttled to a burst per second, so hostile peers cannot flood the log.
    let timeouts = log
        .lines()
        .filter(|l| l.contains("tunnel TLS handshake timed out"))
        .count();
    assert!(
        (1..SILENT_PEERS / 2).contains(&timeouts),
        "{timeouts} timeout warnings for {SILENT_PEERS} peers"
    );
    // Still serving.
    let (status, _) =
        ztunnel_e2e::daemon::http(&mesh.b, "GET", "127.0.0.1:15021", "/healthz/ready").unwrap();
    assert_eq!(status, 200);
}
