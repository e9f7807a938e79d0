//! Hostile and broken peers at a real daemon's tunnel port (15008): peers that connect and
//! never speak or stall in their TLS handshake, bytes that are not TLS, and a peer with a valid
//! mesh certificate that sends a garbled HTTP/2 frame. Each is refused, counted in
//! `ztunnel_refusals_total{reason}` and logged (the warnings throttled). Daemon `b` runs with
//! small caps on pending handshakes (60 on the node, 50 per peer): of a hundred stalled
//! handshakes from one address fifty are held and fifty refused at once; a legitimate client
//! from another address still gets its tunnel; twenty more stalled handshakes from that address
//! all find places, ten of them by evicting the first address's oldest. The held ones are
//! dropped once the handshake timeout (10 s) has passed, and their places are free again.
//! Eight addresses holding every place with silent connections keep no one out: a legitimate
//! tunnel takes the oldest place of one of them, and the silent connections are closed at the
//! first-bytes deadline. Connections held open at the metrics endpoint, which listens on every
//! address, are capped per peer as well, and addresses holding every place of the readiness
//! endpoint keep no prober out. A peer that authenticates and then never sends the HTTP/2 preface is
//! dropped at the same deadline as the TLS handshake, and one that keeps a connection without
//! streams has it closed after twice the pool idle timeout. On the other side, a destination
//! that never answers a `CONNECT` is given up on, and the client it would hold is reset.
//! A peer that policy allows gets no more than its caps of connections and streams, and
//! streams to an application that does not read hold no more than the node's budget of
//! buffered bytes.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::hbone::client;
use ztunnel::net::{self, ConnectOptions};
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, NodeOptions, B_IP};

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

/// Asserts that the daemon in `ns` counts `want` refusals for `reason` (waiting a moment for
/// the count, since the far end of a refusal may count it after the near end sees it).
fn assert_refusals(ns: &ztunnel_e2e::netns::Netns, reason: &str, want: usize) {
    let want = want as f64;
    let labels = [("reason", reason)];
    let m = Mesh::metrics_when(ns, "ztunnel_refusals_total", &labels, want);
    assert_eq!(
        metric(&m, "ztunnel_refusals_total", &labels),
        want,
        "{reason}: {m}"
    );
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

/// The node's and each peer's cap on pending handshakes in daemon `b`.
const NODE_CAP: usize = 60;
const PEER_CAP: usize = 50;
/// Stalled handshakes from host `c`: `PEER_CAP` are held, the rest refused.
const STALLED_FROM_C: usize = 100;
/// Stalled handshakes from host `a`: all held, those beyond the free places by evicting `c`'s
/// oldest.
const STALLED_FROM_A: usize = 20;
/// What a stalled handshake sends: the first byte of a TLS record, and nothing more.
const TLS_FIRST_BYTE: &[u8] = &[0x16];
/// The daemon's mark, so that connections from host `a` skip its capture rules.
const MARK: u32 = 0x539;
/// How long a refused connection may take to be closed.
const PROBE: Duration = Duration::from_secs(3);

/// Opens `n` connections to `addr` that send `first` (or nothing) and then never speak again,
/// then tells apart those the daemon closed at once (refused) from those it still holds after
/// `PROBE` (well within the handshake timeout): returns the held ones and the number closed.
async fn silent_peers(
    addr: SocketAddr,
    n: usize,
    mark: Option<u32>,
    first: &[u8],
) -> (Vec<TcpStream>, usize) {
    let opts = ConnectOptions {
        mark,
        timeout: Duration::from_secs(5),
    };
    let mut conns = Vec::new();
    for _ in 0..n {
        // The daemon may reset a refused connection before the connect call has returned.
        match net::connect(addr, opts).await {
            Ok(mut s) => {
                // A refused connection may be reset before this is written.
                let _ = s.write_all(first).await;
                conns.push(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect: {e}"),
        }
    }
    let mut probes = tokio::task::JoinSet::new();
    for mut s in conns {
        probes.spawn(async move {
            let mut b = [0u8; 1];
            match tokio::time::timeout(PROBE, s.read(&mut b)).await {
                Err(_) => Some(s),
                Ok(Ok(0) | Err(_)) => None,
                Ok(Ok(_)) => panic!("a silent peer was sent data before it spoke"),
            }
        });
    }
    let mut held = Vec::new();
    while let Some(probe) = probes.join_next().await {
        held.extend(probe.unwrap());
    }
    let closed = n - held.len();
    (held, closed)
}

/// A tunnel to `b` from host `a` (with the daemon's mark, so that `a`'s capture rules let it
/// by) with a client certificate of the mesh, and a byte echoed through it by an application
/// on `b`; panics with `what` when the tunnel is refused.
fn legit_tunnel(mesh: &Mesh, what: &'static str) {
    let tunnel: SocketAddr = format!("{B_IP}:15008").parse().unwrap();
    let app = mesh.b.spawn(async {
        let l = apps::listen(8080).await;
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(&b).await.unwrap();
    });
    let cfg = mesh.client_tls();
    let echoed = mesh.a.block_on(async move {
        let opts = ConnectOptions {
            mark: Some(MARK),
            timeout: Duration::from_secs(5),
        };
        let (send, conn) = client::connect(tunnel, cfg, opts)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
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
}

#[test]
fn hostile_peers_are_refused_counted_and_keep_no_one_out() {
    let caps = NodeOptions {
        extra_args: vec![
            "--max-pending-handshakes".into(),
            NODE_CAP.to_string(),
            "--max-pending-handshakes-per-peer".into(),
            PEER_CAP.to_string(),
        ],
        ..Default::default()
    };
    let mesh = Mesh::builder().b(caps).start();
    let tunnel: SocketAddr = format!("{B_IP}:15008").parse().unwrap();
    let cfg = mesh.client_tls();

    // A hundred peers from one address start their TLS handshake and stall: the peer's cap
    // holds. (Having sent a byte, they are past the first-bytes deadline.)
    let (from_c, refused) =
        mesh.c
            .block_on(silent_peers(tunnel, STALLED_FROM_C, None, TLS_FIRST_BYTE));
    assert_eq!(
        (from_c.len(), refused),
        (PEER_CAP, STALLED_FROM_C - PEER_CAP),
        "stalled handshakes from one address (held, refused)"
    );

    // While they hold on, a legitimate client from another address gets a tunnel and an answer.
    legit_tunnel(&mesh, "a legitimate tunnel despite the stalled handshakes");

    // Stalled handshakes from that other address: ten find the free places, and ten more take
    // the places of the oldest from `c`, which still holds more.
    let (from_a, refused) = mesh.a.block_on(silent_peers(
        tunnel,
        STALLED_FROM_A,
        Some(MARK),
        TLS_FIRST_BYTE,
    ));
    let evicted = STALLED_FROM_A - (NODE_CAP - PEER_CAP);
    assert_eq!(
        (from_a.len(), refused),
        (STALLED_FROM_A, 0),
        "stalled handshakes from another address once the node is nearly full (held, refused)"
    );

    // The held peers are dropped after the handshake timeout.
    mesh.c.block_on(async move {
        for mut s in from_c {
            read_until_closed(&mut s, Duration::from_secs(20)).await;
        }
    });
    mesh.a.block_on(async move {
        for mut s in from_a {
            read_until_closed(&mut s, Duration::from_secs(20)).await;
        }
    });

    // Their places are free again: the next peers from `c` reach the handshake.
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

    let counted = |reason: &str, want: usize| assert_refusals(&mesh.b, reason, want);
    counted("inbound_handshake_limit", STALLED_FROM_C - PEER_CAP);
    counted("inbound_handshake_evicted", evicted);
    counted("inbound_tls_timeout", NODE_CAP);
    counted("inbound_tls_first_bytes_timeout", 0);
    counted("inbound_tls_handshake", 1);
    counted("inbound_http2_error", 1);
    let log = mesh.b_daemon.log();
    for line in [
        "tunnel connection refused before its handshake",
        "too many pending tunnel handshakes from this peer (50)",
        "its place went to a peer from an address holding fewer",
        "tunnel TLS handshake timed out",
        "tunnel TLS handshake failed",
        "tunnel connection closed on an HTTP/2 error",
    ] {
        assert!(log.contains(line), "not logged: {line}");
    }
    // The refusals and timeouts came in bursts: all counted, but their warnings throttled to a
    // burst per second, so hostile peers cannot flood the log.
    for (warning, events) in [
        ("tunnel TLS handshake timed out", NODE_CAP),
        (
            "tunnel connection refused before its handshake",
            STALLED_FROM_C - PEER_CAP,
        ),
    ] {
        let lines = log.lines().filter(|l| l.contains(warning)).count();
        assert!(
            (1..=events / 2).contains(&lines),
            "{lines} warnings '{warning}' for {events} events"
        );
    }
    // Still serving.
    let (status, _) =
        ztunnel_e2e::daemon::http(&mesh.b, "GET", "127.0.0.1:15021", "/healthz/ready").unwrap();
    assert_eq!(status, 200);

    // The metrics endpoint listens on every address: connections held open there are capped
    // per peer too, and the scrape from another address is still answered.
    let cap = ztunnel::admin::ENDPOINT_CONNECTIONS.per_peer;
    let metrics_addr: SocketAddr = format!("{B_IP}:15020").parse().unwrap();
    let held = mesh.b.block_on(async move {
        let (held, refused) = silent_peers(metrics_addr, cap + 4, Some(MARK), b"").await;
        assert_eq!(
            (held.len(), refused),
            (cap, 4),
            "metrics connections (held, refused)"
        );
        held
    });
    counted("admin_connection_limit", 4);
    assert!(mesh
        .b_daemon
        .log()
        .contains(&format!("too many connections from this peer ({cap})")));
    mesh.b.block_on(async move { drop(held) });
}

/// Source addresses of the flood: host `c`'s own and seven more on its interface.
const FLOOD_SOURCES: [&str; 8] = [
    "10.77.0.3",
    "10.77.0.40",
    "10.77.0.41",
    "10.77.0.42",
    "10.77.0.43",
    "10.77.0.44",
    "10.77.0.45",
    "10.77.0.46",
];
/// Silent connections from each flood source: together they hold every place.
const FLOOD_PER_SOURCE: usize = 8;
const FLOOD_NODE_CAP: usize = FLOOD_SOURCES.len() * FLOOD_PER_SOURCE;
/// Above what each source holds, so that the node's cap, not the peer's, is what they fill.
const FLOOD_PEER_CAP: usize = 2 * FLOOD_PER_SOURCE;

/// A few addresses cannot fill the pending-handshake places: eight source addresses hold every
/// place with connections that never send a byte. Another connection from one of them is
/// refused (its source already holds the most), yet a legitimate tunnel from elsewhere gets
/// through while they hold on: it takes the place of the oldest silent connection of a source
/// holding the most, which is closed and counted. The other silent connections are closed at
/// the first-bytes deadline (5 s here; the TLS handshake's own is 10 s), counted, and every
/// place is free again.
#[test]
fn a_few_addresses_holding_every_place_keep_no_one_out() {
    let b = NodeOptions {
        extra_args: vec![
            "--max-pending-handshakes".into(),
            FLOOD_NODE_CAP.to_string(),
            "--max-pending-handshakes-per-peer".into(),
            FLOOD_PEER_CAP.to_string(),
            "--tls-first-bytes-timeout".into(),
            "5s".into(),
        ],
        ..Default::default()
    };
    let mesh = Mesh::builder().b(b).start();
    for src in &FLOOD_SOURCES[1..] {
        mesh.c
            .ip(&["addr", "add", &format!("{src}/24"), "dev", "eth0"])
            .expect("an address for the flood");
    }
    let tunnel: SocketAddr = format!("{B_IP}:15008").parse().unwrap();
    let sources: Vec<IpAddr> = FLOOD_SOURCES.iter().map(|s| s.parse().unwrap()).collect();

    // The flood: every place held by silent connections, as many from each source.
    let flood = {
        let sources = sources.clone();
        mesh.c.block_on(async move {
            let mut held = Vec::new();
            for _ in 0..FLOOD_PER_SOURCE {
                for &src in &sources {
                    held.push(
                        connect_from(src, tunnel)
                            .await
                            .expect("a place for the flood"),
                    );
                }
            }
            held
        })
    };
    let gauge = |want: usize| {
        let m = Mesh::metrics_when(&mesh.b, "ztunnel_pending_handshakes", &[], want as f64);
        assert_eq!(
            metric(&m, "ztunnel_pending_handshakes", &[]),
            want as f64,
            "pending handshakes: {m}"
        );
    };
    gauge(FLOOD_NODE_CAP);

    // One more from a source of the flood: it would hold more than any other, so it is
    // refused, and no place changes hands.
    let extra = mesh.c.block_on(connect_from(sources[0], tunnel));
    assert_refusals(&mesh.b, "inbound_handshake_limit", 1);
    gauge(FLOOD_NODE_CAP);

    // While the flood holds every place, a legitimate tunnel from elsewhere gets through.
    legit_tunnel(
        &mesh,
        "a legitimate tunnel while silent peers hold every place",
    );
    assert_refusals(&mesh.b, "inbound_handshake_evicted", 1);

    // The silent connections, the one evicted included, are all closed: none waits for the
    // TLS handshake's deadline.
    mesh.c.block_on(async move {
        drop(extra);
        for mut s in flood {
            read_until_closed(&mut s, Duration::from_secs(20)).await;
        }
    });
    assert_refusals(
        &mesh.b,
        "inbound_tls_first_bytes_timeout",
        FLOOD_NODE_CAP - 1,
    );
    assert_refusals(&mesh.b, "inbound_handshake_evicted", 1);
    assert_refusals(&mesh.b, "inbound_handshake_limit", 1);
    assert_refusals(&mesh.b, "inbound_tls_timeout", 0);
    gauge(0);
    let log = mesh.b_daemon.log();
    for line in [
        "too many pending tunnel handshakes in all (64)",
        "its place went to a peer from an address holding fewer",
        "tunnel connection sent no TLS bytes in time; closed",
    ] {
        assert!(log.contains(line), "not logged: {line}");
    }
    // The places are free again: a tunnel from the flood's first source gets through too.
    let cfg = mesh.client_tls();
    mesh.c.block_on(async move {
        let tcp = TcpStream::connect(tunnel).await.unwrap();
        tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from(B_IP).unwrap(), tcp)
            .await
            .expect("TLS once the flood is gone");
    });
}

/// A connection to `addr` from the local address `src`, sending nothing: `None` when the daemon
/// reset it at once (before or just after the connect returned).
async fn connect_from(src: IpAddr, addr: SocketAddr) -> Option<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    let s = match sock.connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("connect from {src}: {e}"),
    };
    Some(s)
}

/// Sixteen addresses holding every place of the readiness endpoint (sixteen connections each,
/// the per-address cap) keep no prober out: the kubelet's probe, from an address holding none,
/// takes the place of the oldest connection of one of them, which is closed and counted, and
/// is answered; the others stay open.
#[test]
fn addresses_holding_every_place_of_the_readiness_endpoint_keep_no_prober_out() {
    let mesh = Mesh::builder().start();
    let limits = ztunnel::admin::ENDPOINT_CONNECTIONS;
    // Loopback addresses of `b`'s own, which the capture leaves alone; the probe comes from
    // `127.0.0.1`.
    let sources: Vec<IpAddr> = (0..limits.total / limits.per_peer)
        .map(|i| format!("127.0.0.{}", 2 + i).parse().unwrap())
        .collect();
    let ready: SocketAddr = "127.0.0.1:15021".parse().unwrap();
    let held = mesh.b.block_on(async move {
        let mut held = Vec::new();
        for _ in 0..limits.per_peer {
            for &src in &sources {
                held.push(connect_from(src, ready).await.expect("a place"));
            }
        }
        held
    });
    assert_eq!(held.len(), limits.total);
    let (status, _) =
        ztunnel_e2e::daemon::http(&mesh.b, "GET", "127.0.0.1:15021", "/healthz/ready")
            .expect("the probe is answered");
    assert_eq!(status, 200);
    assert_refusals(&mesh.b, "admin_connection_limit", 1);
    // Well within the endpoint's 10 s for a request's headers.
    let open = mesh.b.block_on(async move {
        let mut reads = tokio::task::JoinSet::new();
        for mut s in held {
            reads.spawn(async move {
                let mut b = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await {
                    Err(_) => true,
                    Ok(Ok(0) | Err(_)) => false,
                    Ok(Ok(_)) => panic!("a silent holder was sent data"),
                }
            });
        }
        reads
            .join_all()
            .await
            .into_iter()
            .filter(|open| *open)
            .count()
    });
    assert_eq!(open, limits.total - 1, "one holder closed, the others open");
}

/// A peer with a valid mesh certificate that completes TLS and then never sends the HTTP/2
/// preface is dropped at the handshakes' deadline (10 s after it connected), counted and
/// logged: authenticating does not let it hold a connection for ever.
#[test]
fn an_authenticated_peer_that_never_speaks_http2_is_dropped_at_the_deadline() {
    let mesh = Mesh::builder().start();
    let tunnel: SocketAddr = format!("{B_IP}:15008").parse().unwrap();
    let cfg = mesh.client_tls();
    mesh.c.block_on(async move {
        let tcp = TcpStream::connect(tunnel).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from(B_IP).unwrap(), tcp)
            .await
            .expect("TLS");
        // Silent after TLS: the daemon must close it (a bound far above its 10 s).
        read_until_closed(&mut tls, Duration::from_secs(25)).await
    });
    assert_refusals(&mesh.b, "inbound_http2_timeout", 1);
    let log = mesh.b_daemon.log();
    assert!(log.contains("tunnel HTTP/2 handshake timed out"), "{log}");
}

/// A destination that completes the mutual-TLS and HTTP/2 handshakes as the workload it
/// should be, then never answers a `CONNECT` (a wedged or hostile node): the source's daemon
/// gives the stream up after twice its connect timeout (1 s here), resets the client instead
/// of holding it for ever, counts and logs it, and takes the connection out of its pool, so
/// the next stream dials a new one.
#[test]
fn a_destination_that_never_answers_is_given_up_on_and_the_client_reset() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use ztunnel_e2e::mesh::C_IP;

    let a = NodeOptions {
        extra_args: vec!["--connect-timeout".into(), "1s".into()],
        ..Default::default()
    };
    let mesh = Mesh::builder().a(a).destination_on_c("silent").start();
    let tls = mesh.destination_tls();
    let requests = Arc::new(AtomicUsize::new(0));
    let dialled = {
        let requests = requests.clone();
        mesh.serve_tunnels_on_c(tls, move |mut conn| {
            let requests = requests.clone();
            async move {
                // Every request is held, unanswered, while the connection lives.
                let mut held = Vec::new();
                while let Some(Ok(r)) = conn.accept().await {
                    requests.fetch_add(1, Ordering::Relaxed);
                    held.push(r);
                }
            }
        })
    };

    let attempt = || {
        mesh.a.block_on(async {
            let mut s = TcpStream::connect((C_IP, 8080)).await?;
            s.write_all(b"hello").await?;
            let mut buf = [0u8; 16];
            // A bound far above the 2 s the daemon waits: reaching it means the client hangs.
            match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
                Ok(Ok(0)) => Ok("closed"),
                Ok(Ok(_)) => Ok("answered"),
                Ok(Err(_)) => Ok("reset"),
                Err(_) => Ok::<_, std::io::Error>("still waiting"),
            }
        })
    };
    for i in 0..2 {
        let got = attempt().expect("connect");
        assert!(got == "reset" || got == "closed", "attempt {i}: {got}");
    }
    assert_eq!(
        requests.load(Ordering::Relaxed),
        2,
        "both requests reached it"
    );
    assert_eq!(
        dialled.load(Ordering::Relaxed),
        2,
        "the silent connection was taken out of the pool, the next stream dialled anew"
    );
    assert_refusals(&mesh.a, "outbound_tunnel_failed", 2);
    let log = mesh.a_daemon.log();
    assert!(log.contains("no answer to the stream's request"), "{log}");
}

/// A peer that keeps a tunnel connection without streams (answering pings, where a pool would
/// have closed it) has it closed by the daemon once no stream has started for twice the
/// daemon's pool idle timeout (1 s here), with a GOAWAY; a connection whose stream stays open
/// across several such periods is kept, and the stream still works.
#[test]
fn idle_tunnel_connections_are_closed_and_busy_ones_kept() {
    let b = NodeOptions {
        extra_args: vec!["--pool-idle-timeout".into(), "500ms".into()],
        ..Default::default()
    };
    let mesh = Mesh::builder().b(b).start();
    mesh.b.serve(8080, apps::echo_interactive);
    let cfg = mesh.client_tls();
    let tunnel: SocketAddr = format!("{B_IP}:15008").parse().unwrap();
    let opts = ConnectOptions {
        mark: None,
        timeout: Duration::from_secs(5),
    };
    mesh.c.block_on(async move {
        let (_send, conn) = client::connect(tunnel, cfg.clone(), opts)
            .await
            .expect("tunnel");
        // A bound far above the daemon's 1 s: reaching it means the connection is held.
        let ended = tokio::time::timeout(Duration::from_secs(15), conn).await;
        assert!(
            ended.is_ok(),
            "the idle connection was closed by the daemon"
        );

        let (send, conn) = client::connect(tunnel, cfg, opts).await.expect("tunnel");
        let driver = tokio::spawn(conn);
        let req =
            client::connect_request(format!("{B_IP}:8080").parse().unwrap(), &Default::default())
                .unwrap();
        let (mut tx, mut rx) = client::open_stream(send, req).await.expect("200");
        tokio::time::sleep(Duration::from_secs(3)).await;
        tx.send_data(bytes::Bytes::from_static(b"still here"), false)
            .unwrap();
        let got = rx.data().await.expect("echo").unwrap();
        assert_eq!(&got[..], b"still here");
        assert!(!driver.is_finished(), "the busy connection was kept");
    });
}

/// Counts the connections an application on `port` accepts; holds each open, reading and
/// echoing when `read`, never reading otherwise.
fn counting_app(
    ns: &ztunnel_e2e::netns::Netns,
    port: u16,
    read: bool,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let l = ns.block_on(async move { apps::listen(port).await });
    ns.spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            if read {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            } else {
                held.push(s);
            }
        }
    });
    accepted
}

/// A peer that policy allows, holding a valid mesh certificate, opens tunnel connections and
/// streams from one address beyond daemon `b`'s caps (3 connections and 5 streams per address
/// here): the fourth connection is closed before it carries a stream
/// (`inbound_peer_connection_limit`), the sixth stream is answered `429` before the
/// application sees it (`inbound_peer_stream_limit`), and a stream that ends gives its place
/// back.
#[test]
fn a_peer_allowed_by_policy_holds_no_more_than_its_connection_and_stream_caps() {
    use std::sync::atomic::Ordering;
    let b = NodeOptions {
        extra_args: [
            "--max-peer-connections-per-address",
            "3",
            "--max-peer-streams-per-address",
            "5",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    let mesh = Mesh::builder().b(b).start();
    let accepted = counting_app(&mesh.b, 8080, true);
    let cfg = mesh.client_tls();
    let tunnel: SocketAddr = format!("{B_IP}:15008").parse().unwrap();
    let target: SocketAddr = format!("{B_IP}:8080").parse().unwrap();
    let opts = ConnectOptions {
        mark: None,
        timeout: Duration::from_secs(5),
    };
    mesh.c.block_on(async move {
        let req = || client::connect_request(target, &Default::default()).unwrap();
        let mut conns = Vec::new();
        for _ in 0..3 {
            let (send, conn) = client::connect(tunnel, cfg.clone(), opts)
                .await
                .expect("tunnel");
            tokio::spawn(conn);
            conns.push(send);
        }
        // The fourth: the daemon closes it once it knows who the peer is, so no stream gets
        // through (the client may or may not have finished its side of the handshakes).
        if let Ok((send, conn)) = client::connect(tunnel, cfg.clone(), opts).await {
            tokio::spawn(conn);
            let fourth = client::open_stream(send, req()).await;
            assert!(fourth.is_err(), "a fourth connection carried a stream");
        }

        let mut streams = Vec::new();
        for i in 0..5 {
            let s = client::open_stream(conns[i % 3].clone(), req())
                .await
                .unwrap_or_else(|e| panic!("stream {i}: {e}"));
            streams.push(s);
        }
        let sixth = client::open_stream(conns[2].clone(), req()).await;
        assert_eq!(
            sixth.err().and_then(|e| e.status()),
            Some(http::StatusCode::TOO_MANY_REQUESTS),
            "the sixth stream"
        );
        // One ends (both ways); its place is given back once the daemon has seen it end.
        let (mut tx, mut rx) = streams.pop().unwrap();
        tx.send_data(bytes::Bytes::new(), true).unwrap();
        while let Some(d) = rx.data().await {
            d.unwrap();
        }
        let mut again = None;
        for _ in 0..100 {
            match client::open_stream(conns[0].clone(), req()).await {
                Ok(s) => {
                    again = Some(s);
                    break;
                }
                Err(e) => assert_eq!(e.status(), Some(http::StatusCode::TOO_MANY_REQUESTS)),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(again.is_some(), "the ended stream's place was given back");
        drop(streams);
    });
    assert_refusals(&mesh.b, "inbound_peer_connection_limit", 1);
    let m = Mesh::metrics(&mesh.b);
    let refused = metric(
        &m,
        "ztunnel_refusals_total",
        &[("reason", "inbound_peer_stream_limit")],
    );
    assert!(refused >= 1.0, "{m}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        6,
        "the application saw the five streams and the one after a place was given back, no other"
    );
    let log = mesh.b_daemon.log();
    assert!(log.contains("over the peer's cap"), "{log}");
}

/// A peer that policy allows pushes data on many streams to an application that never reads.
/// Daemon `b`'s node-wide buffered-bytes budget (1 MiB here) is soon spent, and each stream
/// that keeps receiving beyond what a stream may always hold is reset (`buffer_budget`), what
/// it held given back: the daemon holds about the budget, never a window per stream (each
/// stream here is pushed far more than its window and the socket buffers can take, so every
/// one of them is reset). A stream to an application that reads is served as before.
#[test]
fn streams_to_an_application_that_does_not_read_hold_no_more_than_the_node_budget() {
    let b = NodeOptions {
        extra_args: ["--max-buffered-mib", "1"].map(String::from).to_vec(),
        ..Default::default()
    };
    let mesh = Mesh::builder().b(b).start();
    let _sink = counting_app(&mesh.b, 8080, false);
    let _echo = counting_app(&mesh.b, 8081, true);
    let cfg = mesh.client_tls();
    let tunnel: SocketAddr = format!("{B_IP}:15008").parse().unwrap();
    let opts = ConnectOptions {
        mark: None,
        timeout: Duration::from_secs(5),
    };
    const STREAMS: usize = 8;
    const EACH: usize = 16 << 20;
    let outcomes = mesh.c.block_on(async move {
        let (send, conn) = client::connect(tunnel, cfg, opts).await.expect("tunnel");
        tokio::spawn(conn);
        let target: SocketAddr = format!("{B_IP}:8080").parse().unwrap();
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let req = client::connect_request(target, &Default::default()).unwrap();
            let (mut tx, _rx) = client::open_stream(send.clone(), req).await.expect("200");
            tasks.push(tokio::spawn(async move {
                let chunk = bytes::Bytes::from(vec![7u8; 64 * 1024]);
                let mut sent = 0;
                while sent < EACH {
                    tx.reserve_capacity(chunk.len());
                    // The application never reads: flow control stalls a stream that is not
                    // reset (a bound far above what filling the windows takes).
                    let cap = std::future::poll_fn(|cx| tx.poll_capacity(cx));
                    match tokio::time::timeout(Duration::from_secs(5), cap).await {
                        Err(_) => return ("stalled", sent),
                        Ok(None) | Ok(Some(Err(_))) => return ("reset", sent),
                        Ok(Some(Ok(n))) => {
                            if tx
                                .send_data(chunk.slice(..n.min(chunk.len())), false)
                                .is_err()
                            {
                                return ("reset", sent);
                            }
                            sent += n.min(chunk.len());
                        }
                    }
                }
                ("sent", sent)
            }));
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        // Another stream of the same peer, to an application that reads, still works.
        let echo: SocketAddr = format!("{B_IP}:8081").parse().unwrap();
        let req = client::connect_request(echo, &Default::default()).unwrap();
        let (mut tx, mut rx) = client::open_stream(send, req).await.expect("200");
        tx.send_data(bytes::Bytes::from_static(b"still served"), false)
            .unwrap();
        let got = rx.data().await.expect("echo").unwrap();
        assert_eq!(&got[..], b"still served");
        outcomes
    });
    assert!(
        outcomes.iter().all(|(o, _)| *o == "reset"),
        "every stream is reset once it holds more than its floor on a full node: {outcomes:?}"
    );
    assert_refusals(&mesh.b, "buffer_budget", STREAMS);
    let m = Mesh::metrics(&mesh.b);
    assert!(m.contains("ztunnel_buffered_bytes"), "{m}");
    assert_eq!(
        metric(&m, "ztunnel_buffered_bytes", &[]),
        0.0,
        "what the reset streams held was given back"
    );
    let log = mesh.b_daemon.log();
    assert!(log.contains("buffered-bytes budget is spent"), "{log}");
}
