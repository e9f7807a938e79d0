//! The QUIC tunnel on loopback: the header against the HTTP/2 request, socket buffers, refusals
//! that outlive their connection, the windows a server connection is given (receive before
//! admission; send, from the node's budget, for a peer that acknowledges nothing), datagrams
//! refused, and which failures fall back to HTTP/2.

use bytes::Bytes;
use quinn::Connection;

use super::*;

#[test]
fn header_and_request_agree() {
    let target = "10.0.0.2:8080".parse().unwrap();
    let headers = ConnectHeaders {
        forwarded_for: Some("10.0.0.1:4000".parse().unwrap()),
        forwarded_host: Some("b.demo.svc.cluster.local".into()),
        baggage: Some("k8s.namespace.name=a".into()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00".into()),
    };
    let h = header(target, &headers);
    assert_eq!(h.authority, "10.0.0.2:8080");
    assert_eq!(
        h.forwarded.as_deref(),
        Some("for=\"10.0.0.1:4000\";host=b.demo.svc.cluster.local")
    );
    // The header stands for the request HTTP/2 sends.
    let h2 = super::super::client::connect_request(target, &headers).unwrap();
    let back = request_of(&h).unwrap();
    assert_eq!(back.uri(), h2.uri());
    assert_eq!(back.headers(), h2.headers());
    let t = super::super::server::validate(&back, "10.0.0.2".parse().unwrap()).unwrap();
    assert_eq!(
        t.authority,
        super::super::server::Authority::Addr("10.0.0.2:8080".parse().unwrap())
    );
    assert_eq!(t.forwarded_for, Some("10.0.0.1:4000".parse().unwrap()));
    assert_eq!(
        t.forwarded_host.as_deref(),
        Some("b.demo.svc.cluster.local")
    );
    assert!(t.traceparent.is_some());
    // An authority that is not one (a path smuggled in) is refused as a CONNECT would be.
    let bad = RequestHeader {
        authority: "10.0.0.2:8080/x".into(),
        ..Default::default()
    };
    let refused =
        request_of(&bad).map(|r| super::super::server::validate(&r, "10.0.0.2".parse().unwrap()));
    assert!(!matches!(refused, Some(Ok(_))));
}

/// The socket gets the buffers asked for, or all the system allows without the capability
/// (twice its `*mem_max`: Linux reports its bookkeeping half too); the default is below both.
#[test]
fn sockets_get_large_buffers() {
    use socket2::{Domain, Socket, Type};
    let max = |f: &str| -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{f}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
    set_buffers(&sock);
    let (rcv, snd) = (
        sock.recv_buffer_size().unwrap(),
        sock.send_buffer_size().unwrap(),
    );
    assert!(rcv >= SOCKET_BUFFER.min(2 * max("rmem_max")), "{rcv}");
    assert!(snd >= SOCKET_BUFFER.min(2 * max("wmem_max")), "{snd}");
    assert!(rcv > max("rmem_default") && snd > max("wmem_default"));
}

/// A connection on loopback with the daemon's configurations and one workload
/// certificate: its server's side and its client's (their endpoints must be kept too).
async fn pair() -> (
    Connection,
    Connection,
    [quinn::Endpoint; 2],
    tempfile::TempDir,
) {
    let (accepted, dialled, endpoints, dir, _) = pair_through(false).await;
    (accepted, dialled, endpoints, dir)
}

/// [`pair`], through a UDP relay when `relayed`: the client dials the relay, which
/// forwards both ways until its flag is set, then drops everything (a peer gone silent
/// that acknowledges nothing).
async fn pair_through(
    relayed: bool,
) -> (
    Connection,
    Connection,
    [quinn::Endpoint; 2],
    tempfile::TempDir,
    Arc<std::sync::atomic::AtomicBool>,
) {
    use crate::ca::{issue, LocalCa};
    use crate::identity::Identity;
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
    let id: Identity = "spiffe://cluster.local/ns/t/sa/a".parse().unwrap();
    let cert = issue(&ca, &id, Duration::from_secs(3600)).unwrap();
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = server_config(&cert.server_config(), 10).unwrap();
    let server = endpoint(None, local, None, Some(config)).unwrap();
    let mut addr = server.local_addr().unwrap();
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if relayed {
        addr = relay(addr, cut.clone()).await;
    }
    let client = endpoint(None, local, None, None).unwrap();
    let config = client_config(&cert.client_config(&[id])).unwrap();
    let (accepted, dialled) = tokio::join!(
        async { server.accept().await.unwrap().await.unwrap() },
        connect(&client, addr, config)
    );
    (accepted, dialled.unwrap(), [server, client], dir, cut)
}

/// A UDP relay to `server` for one client, dropping every datagram once `cut` is set.
async fn relay(server: SocketAddr, cut: Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
    use std::sync::atomic::Ordering;
    use tokio::net::UdpSocket;
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut a, mut b) = ([0u8; 65536], [0u8; 65536]);
        let mut client = None;
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut a) => {
                    client = Some(from);
                    if !cut.load(Ordering::Relaxed) {
                        let _ = back.send(&a[..n]).await;
                    }
                }
                Ok(n) = back.recv(&mut b) => {
                    if let (Some(to), false) = (client, cut.load(Ordering::Relaxed)) {
                        let _ = front.send_to(&b[..n], to).await;
                    }
                }
            }
        }
    });
    addr
}

/// A refusal reaches the peer although the server closes the connection as soon as it has
/// answered (as a draining daemon does once its last stream has ended).
#[tokio::test]
async fn a_refusal_reaches_the_peer_when_the_connection_closes_right_after() {
    let (accepted, conn, _endpoints, _dir) = pair().await;
    let serving = tokio::spawn(async move {
        let (mut send, mut recv) = accepted.accept_bi().await.unwrap();
        read_header(&mut recv).await.unwrap();
        respond(&mut send, &mut recv, StatusCode::UNAUTHORIZED)
            .await
            .unwrap();
        accepted.close(VarInt::from_u32(0), b"draining");
    });
    let header = header(conn.remote_address(), &ConnectHeaders::default());
    let answered = open_stream(&conn, &header, &mut Early::default()).await;
    assert!(
        matches!(
            answered,
            Err(QuicStreamError::Status(StatusCode::UNAUTHORIZED))
        ),
        "{answered:?}"
    );
    serving.await.unwrap();
}

/// Until one of its streams is admitted, a peer has no more than [`ADMISSION_WINDOW`] in
/// flight on a connection, whatever it has to send; then the full window.
#[tokio::test]
async fn a_connection_has_a_small_window_until_a_stream_is_admitted() {
    let (accepted, conn, _endpoints, _dir) = pair().await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // The write goes on as the server's window allows.
    let len = 4 * ADMISSION_WINDOW as usize;
    let writing = tokio::spawn(async move {
        send.write_all(&vec![0u8; len]).await.unwrap();
        send
    });
    let received = || accepted.stats().udp_rx.bytes;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = received();
    assert!(
        before < u64::from(ADMISSION_WINDOW) + 64 * 1024,
        "{before} bytes arrived before admission"
    );
    let served = ServerConn::new(
        accepted.clone(),
        Arc::new(BufferBudget::unlimited()),
        "127.0.0.1".parse().unwrap(),
    );
    let _admitted = served.admit();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while received() < len as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} bytes arrived after admission",
            received()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let written = tokio::time::timeout(Duration::from_secs(5), writing).await;
    assert!(written.is_ok(), "the write ends once the window is open");
}

/// What a server connection may hold for a peer that acknowledges nothing is its send
/// window, granted from the node's budget while it carries an admitted stream and counted
/// there: the full window while the node and the source's windows are under their bounds,
/// the floor when only that fits, nothing beyond the unadmitted window when not even that
/// does or no stream is admitted. The client's credit (4 MiB a stream) is no bound.
#[tokio::test]
async fn a_server_connection_holds_no_more_than_its_budget_grants() {
    use super::super::budget::{source_cap, Held};
    use std::sync::atomic::Ordering;
    let limit = 64 * 1024 * 1024;
    let share = source_cap(limit);
    let unadmitted = UNADMITTED_SEND_WINDOW;
    // (what, held by another source, the connection's source's other windows, whether a
    // stream is admitted, the window)
    let cases = [
        ("under the budget", 0, 0, true, SEND_WINDOW as u64),
        ("the node over its budget", limit, 0, true, unadmitted),
        ("the node near it", limit - FLOOR, 0, true, FLOOR as u64),
        ("the source's share spent", 0, share, true, unadmitted),
        (
            "the share nearly spent",
            0,
            share - FLOOR,
            true,
            FLOOR as u64,
        ),
        ("no stream admitted", 0, 0, false, unadmitted),
    ];
    for (what, other, windows, admit, window) in cases {
        let budget = Arc::new(BufferBudget::new(limit, Default::default()));
        let source: IpAddr = "127.0.0.1".parse().unwrap();
        let mut held = Held::new(budget.clone(), "10.0.0.9".parse().unwrap());
        held.take(other).unwrap();
        let mut others = Window::new(budget.clone(), source);
        assert_eq!(others.grow_to(windows), windows, "{what}: the setup");
        let (accepted, conn, _endpoints, _dir, cut) = pair_through(true).await;
        let served = ServerConn::new(accepted.clone(), budget.clone(), source);
        let (mut csend, _crecv) = conn.open_bi().await.unwrap();
        csend.write_all(b"x").await.unwrap();
        let (mut send, _recv) = accepted.accept_bi().await.unwrap();
        let admitted = admit.then(|| served.admit());
        assert_eq!(served.send_window(), window, "{what}");
        let counted = budget.held() - other - windows;
        let expected = if window == unadmitted { 0 } else { window };
        assert_eq!(counted as u64, expected, "{what}: counted in the budget");
        cut.store(true, Ordering::Relaxed);
        let mut written = 0u64;
        let chunk = vec![0u8; 16 * 1024];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), send.write(&chunk)).await
        {
            written += n as u64;
            assert!(written <= 8 << 20, "{what}: {written} bytes taken");
        }
        assert!(
            written <= window && written + 16 * 1024 > window / 2,
            "{what}: {written} bytes held for a silent peer, window {window}"
        );
        // The last admitted stream ends: the window is given back.
        drop(admitted);
        assert_eq!(served.send_window(), unadmitted, "{what}: after the stream");
        assert_eq!(budget.held(), other + windows, "{what}: given back");
        drop((send, served, accepted, others, held));
        assert_eq!(budget.held(), 0, "{what}: all given back");
    }
}

/// A client connection (the pool's) holds no more than its send window for a destination
/// that acknowledges nothing, though the destination granted a stream more credit.
#[tokio::test]
async fn a_client_connection_holds_no_more_than_its_send_window() {
    use std::sync::atomic::Ordering;
    let budget = Arc::new(BufferBudget::new(1 << 30, Default::default()));
    let (accepted, conn, _endpoints, _dir, cut) = pair_through(true).await;
    let served = ServerConn::new(accepted.clone(), budget, "127.0.0.1".parse().unwrap());
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(b"x").await.unwrap();
    let (_ssend, _srecv) = accepted.accept_bi().await.unwrap();
    let credits = || conn.stats().frame_rx.max_data;
    let before = credits();
    let _admitted = served.admit();
    // The admission's credit (a MAX_DATA frame) reaches the client before the cut.
    tokio::time::timeout(Duration::from_secs(10), async {
        while credits() == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the grown credit reaches the client");
    cut.store(true, Ordering::Relaxed);
    let mut written = 0u64;
    let chunk = vec![0u8; 16 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), send.write(&chunk)).await
    {
        written += n as u64;
        assert!(written <= 8 << 20, "{written} bytes taken");
    }
    let window = SEND_WINDOW as u64;
    assert!(
        written <= window && written + 16 * 1024 > window / 2,
        "{written} bytes held for a silent destination, window {window}"
    );
}

/// Neither end of a tunnel takes datagrams: HBONE has none, and a peer's would be held
/// for the connection's life.
#[tokio::test]
async fn tunnels_take_no_datagrams() {
    let (accepted, conn, _endpoints, _dir) = pair().await;
    assert_eq!(conn.max_datagram_size(), None, "the server takes none");
    assert_eq!(accepted.max_datagram_size(), None, "the client takes none");
    assert!(conn.send_datagram(Bytes::from_static(b"x")).is_err());
}

#[test]
fn which_failures_fall_back_to_http2() {
    let addr: SocketAddr = "10.0.0.2:15008".parse().unwrap();
    let closed = |code: quinn::TransportErrorCode| QuicError::Handshake {
        addr,
        source: quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: Bytes::new(),
        }),
    };
    let handshake = |source| QuicError::Handshake { addr, source };
    let crypto = quinn::TransportErrorCode::crypto;
    let cases = [
        (QuicError::NoAnswer(addr), Fallback::Remember, "no answer"),
        (
            handshake(quinn::ConnectionError::TimedOut),
            Fallback::Remember,
            "handshake timed out",
        ),
        (
            closed(crypto(120)),
            Fallback::Remember,
            "no_application_protocol",
        ),
        (
            closed(quinn::TransportErrorCode::CONNECTION_REFUSED),
            Fallback::ThisDial,
            "a draining or full daemon",
        ),
        (closed(crypto(42)), Fallback::No, "bad_certificate"),
        (closed(crypto(48)), Fallback::No, "unknown_ca"),
        (
            handshake(quinn::ConnectionError::LocallyClosed),
            Fallback::No,
            "closed here",
        ),
        (
            QuicError::Config("x".into()),
            Fallback::No,
            "a local configuration error",
        ),
    ];
    for (e, want, what) in cases {
        assert_eq!(e.fallback(), want, "{what}: {e}");
    }
}
