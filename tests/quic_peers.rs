//! QUIC peers that do not play by the rules, against a real daemon `b` that accepts tunnels on
//! UDP 15008 (see `harness/mesh.rs`): from a raw QUIC client outside the mesh, the status of
//! each stream header, a client certificate of an untrusted CA refused at the handshake, a
//! header that never completes; a peer that breaks the protocol once authenticated closed on
//! the error and counted. Silent QUIC handshakes are capped per peer, under load new
//! connections must answer a Retry before they take a place, and idle QUIC connections are
//! closed while busy ones are kept. Needs root, `ip` and `nft`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn_proto::crypto::{
    ClientConfig as CryptoClientConfig, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys,
    PacketKey, Session,
};
use quinn_proto::transport_parameters::TransportParameters;
use ztunnel::ca::{issue, LocalCa};
use ztunnel::hbone::early::Early;
use ztunnel::hbone::quic::{self, QuicError, QuicStreamError};
use ztunnel::identity::Identity;
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, NodeOptions, B_IP, C_IP, TRUST_DOMAIN};
use ztunnel_e2e::transport::Transport;
use ztunnel_proto::quic as wire;

use crate::quic_common::*;

/// From `c` (outside the mesh) with a mesh certificate, straight to `b`'s UDP 15008: each
/// stream header gets the status its `CONNECT` would (503 for a closed port and for the
/// daemon's own ports, 400 for an address that is not `b`'s, 400 for a header of another
/// version), and a valid one carries bytes both ways with half-close.
#[test]
fn quic_stream_headers_get_the_contract_status() {
    let mesh = Mesh::builder().b(Transport::Quic.server()).start();
    let server = mesh.b.serve(8080, |l| async move {
        let got = apps::echo_one(&l).await?;
        // Only the valid stream reaches the application.
        let another = tokio::time::timeout(Duration::from_secs(1), l.accept())
            .await
            .is_ok();
        Ok::<_, std::io::Error>((got, another))
    });
    let cfg = quic::client_config(&mesh.client_tls()).expect("QUIC client config");
    let (statuses, garbled, echoed) = mesh.c.block_on(async move {
        let ep = client_endpoint();
        let conn = quic::connect(&ep, tunnel_addr(), cfg)
            .await
            .expect("QUIC handshake with b");
        let mut statuses = Vec::new();
        for target in [
            format!("{B_IP}:8081"),
            format!("{B_IP}:15008"),
            format!("{B_IP}:15001"),
            format!("{C_IP}:8080"),
        ] {
            let status =
                match quic::open_stream(&conn, &header(&target), &mut Early::default()).await {
                    Ok(_) => 200,
                    Err(QuicStreamError::Status(s)) => s.as_u16(),
                    Err(e) => panic!("{target}: no status: {e}"),
                };
            statuses.push((target, status));
        }

        // A header of version 2, written by hand.
        let mut raw = header(&format!("{B_IP}:8080")).encode().unwrap();
        raw[0] = 2;
        let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
        send.write_all(&raw).await.expect("write the header");
        let mut resp = [0u8; wire::RESPONSE_LEN];
        recv.read_exact(&mut resp).await.expect("a response header");
        let status = wire::decode_response(resp).expect("a version-1 response");
        // After a refusal the server ends its side.
        let rest = recv.read_to_end(1024).await.expect("the stream ends");
        let garbled = (status, rest);

        // A valid stream, with bytes right behind the header and more after the answer.
        let early = Bytes::from_static(b"early ");
        let (mut send, mut recv) = quic::open_stream(
            &conn,
            &header(&format!("{B_IP}:8080")),
            &mut Early::of(Some(early)),
        )
        .await
        .expect("a 200 stream");
        send.write_all(b"late").await.unwrap();
        send.finish().unwrap();
        let echoed = recv.read_to_end(1024).await.expect("the echo");
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
        (statuses, garbled, echoed)
    });
    assert_eq!(
        statuses,
        vec![
            (format!("{B_IP}:8081"), 503),
            (format!("{B_IP}:15008"), 503),
            (format!("{B_IP}:15001"), 503),
            (format!("{C_IP}:8080"), 400),
        ]
    );
    assert_eq!(garbled, (400, Vec::new()));
    assert_eq!(echoed, b"early late");
    let (got, another) = mesh.b.join(server).expect("server");
    assert_eq!(got, b"early late");
    assert!(!another, "a refused stream reached the application");

    let m = Mesh::metrics(&mesh.b);
    for (reason, n) in [
        ("quic_bad_header", 1.0),
        ("inbound_app_unreachable", 1.0),
        ("recursion", 2.0),
        ("authority_not_local", 1.0),
    ] {
        assert_eq!(
            metric(&m, "ztunnel_refusals_total", &[("reason", reason)]),
            n,
            "{reason}: {m}"
        );
    }
    expect_metric(&m, "ztunnel_quic_connections_accepted_total", &[], 1.0);
    expect_metric(&m, "ztunnel_hbone_connections_accepted_total", &[], 0.0);
}

/// The connection-level error a QUIC operation ended with.
fn connection_error(e: &QuicError) -> Option<&quinn::ConnectionError> {
    match e {
        QuicError::Handshake { source, .. } => Some(source),
        QuicError::Connection(c) => Some(c),
        QuicError::Write(quinn::WriteError::ConnectionLost(c)) => Some(c),
        QuicError::Read(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c))) => {
            Some(c)
        }
        _ => None,
    }
}

/// A client whose certificate (of the right trust domain) comes from a CA `b` does not
/// trust, but which itself trusts `b`: `b` closes the connection at the TLS handshake with a
/// TLS alert, no stream gets through, and `b` counts the refusal.
#[test]
fn client_certificate_from_an_untrusted_ca_is_refused_at_the_quic_handshake() {
    let mesh = Mesh::builder().b(Transport::Quic.server()).start();
    let accepted = mesh.b.spawn(async {
        let l = apps::listen(8080).await;
        tokio::time::timeout(Duration::from_secs(3), l.accept())
            .await
            .is_ok()
    });
    let other = tempfile::tempdir().unwrap();
    let other_ca = LocalCa::load_or_create(&other.path().join("ca"), TRUST_DOMAIN).unwrap();
    let mesh_ca = LocalCa::load_or_create(&mesh.ca_dir, TRUST_DOMAIN).unwrap();
    let me: Identity = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
    let mut cert = issue(&other_ca, &me, Duration::from_secs(3600)).unwrap();
    // The client verifies b with the mesh's roots, so only b's check of the client can fail.
    cert.roots = issue(&mesh_ca, &me, Duration::from_secs(3600))
        .unwrap()
        .roots;
    let server: Identity = "spiffe://cluster.local/ns/demo/sa/server".parse().unwrap();
    let cfg = quic::client_config(&cert.client_config(&[server])).unwrap();
    let outcome = mesh.c.block_on(async move {
        let ep = client_endpoint();
        let r = async {
            // On QUIC the client's handshake may complete before the server has judged the
            // client's certificate; the refusal then ends the connection under the stream.
            let conn = quic::connect(&ep, tunnel_addr(), cfg).await?;
            quic::open_stream(
                &conn,
                &header(&format!("{B_IP}:8080")),
                &mut Early::default(),
            )
            .await
            .map(|_| ())
            .map_err(|e| match e {
                QuicStreamError::Quic(q) => q,
                QuicStreamError::Status(s) => panic!("the stream was answered {s}"),
            })
        }
        .await;
        ep.wait_idle().await;
        r
    });
    let err = outcome.expect_err("b must refuse a client certificate of an untrusted CA");
    match connection_error(&err) {
        Some(quinn::ConnectionError::ConnectionClosed(close)) => {
            let code = u64::from(close.error_code);
            assert!(
                (0x100..=0x1ff).contains(&code),
                "b closes with a TLS alert (CRYPTO_ERROR), got {close:?}"
            );
        }
        other => panic!("b must close the connection at the handshake: {err} ({other:?})"),
    }
    let labels = [("reason", "inbound_tls_handshake")];
    let mb = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(metric(&mb, "ztunnel_refusals_total", &labels), 1.0, "{mb}");
    expect_metric(&mb, "ztunnel_quic_connections_accepted_total", &[], 0.0);
    assert!(
        !mesh.b.join(accepted),
        "the application must not see the refused client"
    );
    let log = mesh.b_daemon.log();
    assert!(
        log.contains("QUIC tunnel handshake failed"),
        "b logs the refused handshake:\n{log}"
    );
}

/// A hostile peer that opens a stream and never finishes its header holds nothing for long:
/// the stream is answered `400` once the header timeout passes (counted as `quic_bad_header`),
/// and the same connection's other streams are served meanwhile.
#[test]
fn a_stream_whose_header_never_completes_is_refused_and_blocks_nothing() {
    let mesh = Mesh::builder().b(Transport::Quic.server()).start();
    let server = mesh.b.serve(8080, apps::echo_once);
    let cfg = quic::client_config(&mesh.client_tls()).expect("QUIC client config");
    let (echoed, status, rest) = mesh.c.block_on(async move {
        let ep = client_endpoint();
        let conn = quic::connect(&ep, tunnel_addr(), cfg)
            .await
            .expect("QUIC handshake with b");
        // Two bytes of a header, then silence.
        let raw = header(&format!("{B_IP}:8080")).encode().unwrap();
        let (mut stalled_send, mut stalled_recv) = conn.open_bi().await.expect("open a stream");
        stalled_send.write_all(&raw[..2]).await.expect("write");
        // Meanwhile a well-formed stream on the same connection is served.
        let (mut send, mut recv) = quic::open_stream(
            &conn,
            &header(&format!("{B_IP}:8080")),
            &mut Early::default(),
        )
        .await
        .expect("a 200 stream beside the stalled one");
        send.write_all(b"served").await.unwrap();
        send.finish().unwrap();
        let echoed = recv.read_to_end(1024).await.expect("the echo");
        // The stalled stream gets its answer once the header timeout has passed.
        let mut resp = [0u8; wire::RESPONSE_LEN];
        tokio::time::timeout(Duration::from_secs(20), stalled_recv.read_exact(&mut resp))
            .await
            .expect("an answer to the stalled stream within 20 s")
            .expect("a response header");
        let status = wire::decode_response(resp).expect("a version-1 response");
        let rest = stalled_recv
            .read_to_end(1024)
            .await
            .expect("the stream ends");
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
        (echoed, status, rest)
    });
    assert_eq!(echoed, b"served");
    assert_eq!((status, rest), (400, Vec::new()));
    assert_eq!(mesh.b.join(server).expect("server"), b"served");
    let mb = Mesh::metrics(&mesh.b);
    expect_metric(
        &mb,
        "ztunnel_refusals_total",
        &[("reason", "quic_bad_header")],
        1.0,
    );
    expect_metric(
        &mb,
        "ztunnel_proxied_connections_total",
        &[("direction", "inbound")],
        1.0,
    );
}

/// Silent QUIC peers (each sends its first handshake packet and never another, nor reads the
/// answer) hold at most the per-peer cap of pending handshakes: the rest are refused before
/// any TLS and counted, a legitimate client from another address still gets its tunnel, and
/// the held ones are dropped at the handshake timeout.
#[test]
fn silent_quic_handshakes_are_capped_per_peer_and_keep_no_one_out() {
    let b_opts = NodeOptions {
        extra_args: args(&[
            "--quic-listen",
            "true",
            "--max-pending-handshakes",
            "50",
            "--max-pending-handshakes-per-peer",
            "5",
        ]),
        ..Default::default()
    };
    let mesh = Mesh::builder()
        .a(Transport::Quic.client())
        .b(b_opts)
        .start();
    let cfg = quic::client_config(&mesh.client_tls()).expect("QUIC client config");
    let (counted, release) = tokio::sync::oneshot::channel::<()>();
    // From c: 20 clients, each behind a relay that passes only its first datagram (the
    // Initial with the ClientHello) to b and drops b's answers.
    let silent = mesh.c.spawn(async move {
        let b = tunnel_addr();
        let mut keep = Vec::new();
        for _ in 0..20 {
            let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            let upstream = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
            let relay_addr = relay.local_addr()?;
            let ep = client_endpoint();
            let connecting = ep
                .connect_with(cfg.clone(), relay_addr, B_IP)
                .expect("connect");
            let mut first = vec![0u8; 2048];
            let (n, _) = relay.recv_from(&mut first).await?;
            upstream.send_to(&first[..n], b).await?;
            keep.push((relay, upstream, ep, connecting));
        }
        // Held open until the test has counted.
        let _ = release.await;
        drop(keep);
        Ok::<_, std::io::Error>(())
    });
    let m = Mesh::metrics_when(
        &mesh.b,
        "ztunnel_refusals_total",
        &[("reason", "inbound_handshake_limit")],
        15.0,
    );
    expect_metric(
        &m,
        "ztunnel_refusals_total",
        &[("reason", "inbound_handshake_limit")],
        15.0,
    );

    // Meanwhile a's daemon tunnels a connection to b over QUIC.
    let server = mesh.b.serve(8080, apps::echo_once);
    let echoed = mesh
        .a
        .block_on(apps::send_and_read(B_IP, 8080, b"still served"))
        .expect("a legitimate client");
    assert_eq!(echoed, b"still served");
    assert_eq!(mesh.b.join(server).expect("server"), b"still served");
    let mb = Mesh::metrics(&mesh.b);
    expect_metric(&mb, "ztunnel_quic_connections_accepted_total", &[], 1.0);
    expect_metric(&mb, "ztunnel_hbone_connections_accepted_total", &[], 0.0);

    // The five held are dropped when the handshake timeout (10 s) passes.
    let m = Mesh::metrics_when_within(
        &mesh.b,
        "ztunnel_refusals_total",
        &[("reason", "inbound_tls_timeout")],
        5.0,
        Duration::from_secs(15),
    );
    expect_metric(
        &m,
        "ztunnel_refusals_total",
        &[("reason", "inbound_tls_timeout")],
        5.0,
    );
    let _ = counted.send(());
    mesh.c.join(silent).expect("silent peers");
}

/// A QUIC client behind a relay on `c` that passes only its first datagram (the Initial with
/// the ClientHello) to `b` and drops whatever comes back: a handshake that never goes on, as
/// from a forged source address. Held until dropped.
async fn silent_quic_peer(
    cfg: quinn::ClientConfig,
) -> (
    tokio::net::UdpSocket,
    tokio::net::UdpSocket,
    quinn::Endpoint,
    quinn::Connecting,
) {
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
    let ep = client_endpoint();
    let connecting = ep
        .connect_with(cfg, relay.local_addr().unwrap(), B_IP)
        .expect("connect");
    let mut first = vec![0u8; 2048];
    let (n, _) = relay.recv_from(&mut first).await.unwrap();
    upstream.send_to(&first[..n], tunnel_addr()).await.unwrap();
    (relay, upstream, ep, connecting)
}

/// Under load (more than half the places among pending handshakes held: 3 of 4 here) a new
/// QUIC connection is answered with a Retry before it may take a place. Silent peers that
/// never read the answer, as a peer behind a forged address could not, then take no place
/// and are not even refused; a legitimate daemon answers the Retry with its token and gets
/// its tunnel on QUIC, not HTTP/2.
#[test]
fn under_load_new_quic_connections_must_prove_their_address() {
    let b_opts = NodeOptions {
        extra_args: args(&[
            "--quic-listen",
            "true",
            "--max-pending-handshakes",
            "4",
            "--max-pending-handshakes-per-peer",
            "4",
        ]),
        ..Default::default()
    };
    let mesh = Mesh::builder()
        .a(Transport::Quic.client())
        .b(b_opts)
        .start();
    let cfg = quic::client_config(&mesh.client_tls()).expect("QUIC client config");
    let pending = |want: f64| {
        let m = Mesh::metrics_when(&mesh.b, "ztunnel_pending_handshakes", &[], want);
        expect_metric(&m, "ztunnel_pending_handshakes", &[], want);
    };
    // Up to half full and one more: each silent peer takes a place (one at a time, so that
    // each finds the gate as the one before left it).
    let mut silent = Vec::new();
    for held in 1..=3 {
        silent.push(mesh.c.block_on(silent_quic_peer(cfg.clone())));
        pending(held as f64);
    }
    // More than half full: the next ones get a Retry, which they never answer.
    for _ in 0..17 {
        silent.push(mesh.c.block_on(silent_quic_peer(cfg.clone())));
    }
    let m = Mesh::metrics_when(&mesh.b, "ztunnel_quic_retries_total", &[], 17.0);
    expect_metric(&m, "ztunnel_quic_retries_total", &[], 17.0);
    expect_metric(
        &m,
        "ztunnel_refusals_total",
        &[("reason", "inbound_handshake_limit")],
        0.0,
    );
    pending(3.0);

    // a's daemon dials b on QUIC, answers the Retry and carries a connection.
    let server = mesh.b.serve(8080, apps::echo_once);
    let echoed = mesh
        .a
        .block_on(apps::send_and_read(B_IP, 8080, b"validated"))
        .expect("a legitimate client");
    assert_eq!(echoed, b"validated");
    assert_eq!(mesh.b.join(server).expect("server"), b"validated");
    let mb = Mesh::metrics(&mesh.b);
    // One Retry for it (more only if its Initial was sent again before the Retry arrived).
    let retries = metric(&mb, "ztunnel_quic_retries_total", &[]);
    assert!(retries >= 18.0, "a's connection had a Retry: {retries}");
    expect_metric(&mb, "ztunnel_quic_connections_accepted_total", &[], 1.0);
    expect_metric(&mb, "ztunnel_hbone_connections_accepted_total", &[], 0.0);
    expect_metric(
        &Mesh::metrics(&mesh.a),
        "ztunnel_quic_fallbacks_total",
        &[],
        0.0,
    );
    mesh.c.block_on(async move { drop(silent) });
}

/// As on HTTP/2 (`hostile.rs`): a QUIC tunnel connection without streams is closed by the
/// daemon once no stream has started for twice its pool idle timeout (1 s here), although the
/// client's keep-alives would keep it open; one whose stream stays open is kept. The send
/// window the busy one was granted on admission is counted in `b`'s budget of buffered bytes
/// (`ztunnel_buffered_bytes`) while its stream is open, the idle one's not, and given back
/// when the stream ends.
#[test]
fn idle_quic_connections_are_closed_and_busy_ones_kept() {
    let b = NodeOptions {
        extra_args: args(&["--quic-listen", "true", "--pool-idle-timeout", "500ms"]),
        ..Default::default()
    };
    let mesh = Mesh::builder().b(b).start();
    mesh.b.serve(8080, apps::echo_interactive);
    let cfg = quic::client_config(&mesh.client_tls()).expect("QUIC client config");
    let first = cfg.clone();
    let (ep, idle) = mesh.c.block_on(async move {
        let ep = client_endpoint();
        let idle = quic::connect(&ep, tunnel_addr(), first)
            .await
            .expect("QUIC handshake with b");
        (ep, idle)
    });
    let held_while_idle = counter(&mesh.b, "ztunnel_buffered_bytes", &[]);
    let busy = mesh.c.block_on(async move {
        // A bound far above the daemon's 1 s: reaching it means the connection is held.
        let closed = tokio::time::timeout(Duration::from_secs(15), idle.closed()).await;
        assert!(
            closed.is_ok(),
            "the idle connection was closed by the daemon"
        );

        let busy = quic::connect(&ep, tunnel_addr(), cfg)
            .await
            .expect("QUIC handshake with b");
        let (mut send, mut recv) = quic::open_stream(
            &busy,
            &header(&format!("{B_IP}:8080")),
            &mut Early::default(),
        )
        .await
        .expect("a 200 stream");
        tokio::time::sleep(Duration::from_secs(3)).await;
        send.write_all(b"still here").await.unwrap();
        let mut got = [0u8; 10];
        recv.read_exact(&mut got).await.expect("the echo");
        assert_eq!(&got, b"still here");
        assert!(
            busy.close_reason().is_none(),
            "the busy connection was kept"
        );
        (ep, busy, send, recv)
    });
    assert_eq!(held_while_idle, 0.0, "an unadmitted connection's window");
    let granted = quic::SEND_WINDOW as f64;
    let m = Mesh::metrics_when(&mesh.b, "ztunnel_buffered_bytes", &[], granted);
    expect_metric(&m, "ztunnel_buffered_bytes", &[], granted);
    // The stream ends, the connection stays: the window is given back.
    let (ep, busy, mut send, mut recv) = busy;
    let busy = mesh.c.block_on(async move {
        send.finish().unwrap();
        recv.read_to_end(1024).await.expect("the stream ends");
        busy
    });
    let m = Mesh::metrics_when(&mesh.b, "ztunnel_buffered_bytes", &[], 0.0);
    expect_metric(&m, "ztunnel_buffered_bytes", &[], 0.0);
    mesh.c.block_on(async move {
        assert!(busy.close_reason().is_none(), "the connection stayed");
        busy.close(0u32.into(), b"done");
        ep.wait_idle().await;
    });
}

/// A client crypto configuration that tells its QUIC connection the server allows one
/// unidirectional stream where the server allows none (the tunnel uses bidirectional streams
/// only): the connection then opens one, a protocol violation of a broken or hostile peer.
struct ClaimsOneUniStream(Arc<quinn::crypto::rustls::QuicClientConfig>);

impl CryptoClientConfig for ClaimsOneUniStream {
    fn start_session(
        self: Arc<Self>,
        version: u32,
        server_name: &str,
        params: &TransportParameters,
    ) -> Result<Box<dyn Session>, quinn_proto::ConnectError> {
        let inner = self.0.clone().start_session(version, server_name, params)?;
        Ok(Box::new(OneUniStreamSession(inner)))
    }
}

/// The rustls session, but for the server's transport parameters it reports: those it
/// received plus `initial_max_streams_uni = 1`.
struct OneUniStreamSession(Box<dyn Session>);

impl Session for OneUniStreamSession {
    fn initial_keys(&self, dst_cid: &quinn_proto::ConnectionId, side: quinn_proto::Side) -> Keys {
        self.0.initial_keys(dst_cid, side)
    }
    fn handshake_data(&self) -> Option<Box<dyn std::any::Any>> {
        self.0.handshake_data()
    }
    fn peer_identity(&self) -> Option<Box<dyn std::any::Any>> {
        self.0.peer_identity()
    }
    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn PacketKey>)> {
        self.0.early_crypto()
    }
    fn early_data_accepted(&self) -> Option<bool> {
        self.0.early_data_accepted()
    }
    fn is_handshaking(&self) -> bool {
        self.0.is_handshaking()
    }
    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, quinn_proto::TransportError> {
        self.0.read_handshake(buf)
    }
    fn transport_parameters(
        &self,
    ) -> Result<Option<TransportParameters>, quinn_proto::TransportError> {
        let Some(params) = self.0.transport_parameters()? else {
            return Ok(None);
        };
        let mut raw = Vec::new();
        params.write(&mut raw);
        // initial_max_streams_uni (id 0x09, one byte long) = 1. The server's is 0, the
        // default, which is never written: the parameter is not there twice.
        raw.extend_from_slice(&[0x09, 0x01, 0x01]);
        Ok(Some(TransportParameters::read(
            quinn_proto::Side::Client,
            &mut raw.as_slice(),
        )?))
    }
    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        self.0.write_handshake(buf)
    }
    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        self.0.next_1rtt_keys()
    }
    fn is_valid_retry(
        &self,
        orig_dst_cid: &quinn_proto::ConnectionId,
        header: &[u8],
        payload: &[u8],
    ) -> bool {
        self.0.is_valid_retry(orig_dst_cid, header, payload)
    }
    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        self.0.export_keying_material(output, label, context)
    }
}

/// A peer that authenticates with a mesh certificate and then breaks the QUIC protocol (it
/// opens a unidirectional stream, which the daemon allows none of): `b` closes the connection
/// with `STREAM_LIMIT_ERROR`, counts `inbound_quic_error` and logs it; the application sees
/// nothing.
#[test]
fn a_quic_connection_closed_on_a_protocol_error_is_counted() {
    let mesh = Mesh::builder().b(Transport::Quic.server()).start();
    let l = mesh.b.block_on(apps::listen(8080));
    let mut tls = (*mesh.client_tls()).clone();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let cfg = quinn::ClientConfig::new(Arc::new(ClaimsOneUniStream(Arc::new(crypto))));
    let closed = mesh.c.block_on(async move {
        let ep = client_endpoint();
        let conn = quic::connect(&ep, tunnel_addr(), cfg)
            .await
            .expect("QUIC handshake with b");
        let mut uni = conn.open_uni().await.expect("a stream b never allowed");
        // The write may fail once b has closed the connection: what b did is in `closed`.
        let _ = uni.write_all(b"not allowed").await;
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("b closes the connection within 5 s");
        ep.wait_idle().await;
        closed
    });
    match &closed {
        quinn::ConnectionError::ConnectionClosed(close) => assert_eq!(
            u64::from(close.error_code),
            0x4,
            "STREAM_LIMIT_ERROR: {close:?}"
        ),
        other => panic!("b must close the connection with a transport error: {other:?}"),
    }
    let labels = [("reason", "inbound_quic_error")];
    let mb = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &labels, 1.0);
    expect_metric(&mb, "ztunnel_refusals_total", &labels, 1.0);
    expect_metric(&mb, "ztunnel_quic_connections_accepted_total", &[], 1.0);
    let accepted = mesh.b.block_on(async move {
        tokio::time::timeout(Duration::from_secs(1), l.accept())
            .await
            .is_ok()
    });
    assert!(!accepted, "the application must not see the broken peer");
    let log = mesh.b_daemon.log();
    assert!(
        log.contains("QUIC tunnel connection closed on an error"),
        "b logs the closed connection:\n{log}"
    );
}
