//! HBONE between two real daemon processes on the test bed (see `harness/mesh.rs`): bulk
//! integrity, half-close, bytes written before the tunnel is up, pooling, an unexpected
//! server identity, a `pqc-only` daemon's key exchange and revocation lists published while
//! tunnels are open (`revocation.rs`), each run over HTTP/2 and over QUIC
//! (`for_each_transport!`); identity refusals, CONNECT validation, and a transfer across a
//! certificate renewal; HBONE's forms and headers as Istio's gateways use them
//! (`hbone/forms.rs`, also against Python's `h2`). Needs root, `ip`, `nft` and `python3` with
//! `h2`.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::ca::{issue, LocalCa};
use ztunnel::hbone::client;
use ztunnel::identity::Identity;
use ztunnel::net::ConnectOptions;
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::{expect_metric, metric};
use ztunnel_e2e::for_each_transport;
use ztunnel_e2e::mesh::{Mesh, NodeOptions, Wl, A_IP, B_IP, C_IP};
use ztunnel_e2e::transport::Transport;

#[path = "hbone/forms.rs"]
mod forms;

// The other tests of the two-node bed, in this binary: one link of the harness and the daemon
// library for all of them.
mod connect;
mod quic;
mod quic_peers;
// Helpers of `quic.rs` and `quic_peers.rs`.
#[path = "quic/common.rs"]
mod quic_common;
mod refusals;
mod renewal;
mod revocation;

const MIB: usize = 1024 * 1024;

/// Waits until `daemon` has logged that it released its start-up code pages (see
/// `ztunnel::residency`) and returns how many mappings it advised.
fn wait_for_released_pages(daemon: &ztunnel_e2e::daemon::Process) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = daemon.log();
        assert!(
            !log.contains("could not release start-up code pages"),
            "{log}"
        );
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("released the code pages only start-up used"))
        {
            return line
                .split_once("mappings=")
                .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no mapping count in {line:?}"));
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

for_each_transport! {
    /// 64 MiB each way, after both daemons have given back their start-up code pages (the
    /// code the transfer needs is read back in as it runs), and proof of the transport: `b`
    /// accepted one connection of it and none of the other, `a` pools one connection of it
    /// (idle timeout 5 min) after its stream ended and fell back never.
    fn bulk_64_mib_each_way_arrives_intact(t: Transport) {
        let mesh = t.pair();
        for daemon in [&mesh.a_daemon, &mesh.b_daemon] {
            // At least the code and the read-only data of the executable.
            assert!(wait_for_released_pages(daemon) >= 2);
        }
        mesh.check_bulk_each_way(64 * MIB);
        let mb = Mesh::metrics(&mesh.b);
        expect_metric(&mb, t.accepted_metric(), &[], 1.0);
        expect_metric(&mb, t.other().accepted_metric(), &[], 0.0);
        expect_metric(
            &mb,
            "ztunnel_proxied_connections_total",
            &[("direction", "inbound")],
            1.0,
        );
        let ma = Mesh::metrics(&mesh.a);
        expect_metric(&ma, "ztunnel_quic_fallbacks_total", &[], 0.0);
        expect_metric(
            &ma,
            "ztunnel_proxied_connections_total",
            &[("direction", "outbound")],
            1.0,
        );
        expect_metric(&ma, "ztunnel_pool_connections_opened_total", &[], 1.0);
        let listing = Mesh::pool(&mesh.a);
        assert_eq!(listing.len(), 1, "{listing:?}");
        assert_eq!(listing[0]["transport"], t.pool_name(), "{listing:?}");
        assert_eq!(listing[0]["addr"], format!("{B_IP}:15008"), "{listing:?}");
    }

    /// Half-close both ways; both connections ride the one tunnel connection.
    fn half_close_crosses_the_tunnel_both_ways(t: Transport) {
        let mesh = t.pair();
        mesh.check_half_close_both_ways();
        let mb = Mesh::metrics(&mesh.b);
        expect_metric(&mb, t.accepted_metric(), &[], 1.0);
        expect_metric(&mb, t.other().accepted_metric(), &[], 0.0);
        let ma = Mesh::metrics(&mesh.a);
        expect_metric(&ma, "ztunnel_quic_fallbacks_total", &[], 0.0);
    }

    /// A client that writes before the tunnel is up and half-closes at once: its first bytes
    /// ride right behind the CONNECT (HTTP/2) or the stream header (QUIC), then those it
    /// writes while the answer is in flight; the rest follows through the stream. Everything
    /// arrives, in order, and the source's daemon counts every byte each way.
    fn bytes_written_before_the_tunnel_is_up_arrive_in_order_and_are_counted(t: Transport) {
        let mesh = t.pair();
        // More than the daemon takes before the stream is open (64 KiB on HTTP/2, 16 KiB with
        // the QUIC header).
        let len = 160 * 1024;
        let server = mesh.b.serve(8080, apps::echo_once);
        let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let echoed = {
            let sent = sent.clone();
            mesh.a
                .block_on(async move { apps::send_and_read(B_IP, 8080, &sent).await })
                .expect("client")
        };
        assert!(
            mesh.b.join(server).expect("server") == sent,
            "server got other bytes"
        );
        assert!(echoed == sent, "client got other bytes back");
        let source = [("reporter", "source")];
        let m = Mesh::metrics_when(&mesh.a, "istio_tcp_connections_closed_total", &source, 1.0);
        expect_metric(&m, "istio_tcp_sent_bytes_total", &source, len as f64);
        expect_metric(&m, "istio_tcp_received_bytes_total", &source, len as f64);
        assert_eq!(Mesh::pool(&mesh.a)[0]["transport"], t.pool_name());
        expect_metric(&Mesh::metrics(&mesh.b), t.accepted_metric(), &[], 1.0);
    }

    /// 100 concurrent streams share one tunnel connection (on QUIC the transport's stream
    /// limit agrees with the pool's), and the 101st opens a second connection.
    fn hundred_streams_share_one_connection_and_the_next_opens_another(t: Transport) {
        let mesh = t.pair();
        mesh.b
            .serve(8080, |l| async move { apps::hold_server(l).await });
        // Connect all 100 at once: concurrent first requests must wait for one handshake.
        let conns = mesh
            .a
            .block_on(apps::open_held(B_IP, 8080, 100))
            .expect("connect");
        assert_eq!(conns.len(), 100);
        let m = Mesh::metrics(&mesh.a);
        assert_eq!(
            metric(&m, "ztunnel_pool_connections_opened_total", &[]),
            1.0,
            "100 streams must share one connection: {m}"
        );
        expect_metric(&m, "ztunnel_pool_streams", &[], 100.0);
        let extra = mesh
            .a
            .block_on(apps::open_held(B_IP, 8080, 1))
            .expect("the 101st");
        let m = Mesh::metrics(&mesh.a);
        assert_eq!(
            metric(&m, "ztunnel_pool_connections_opened_total", &[]),
            2.0,
            "the 101st stream must open a second connection: {m}"
        );
        expect_metric(&m, "ztunnel_quic_fallbacks_total", &[], 0.0);
        let mut listing: Vec<(String, u64)> = Mesh::pool(&mesh.a)
            .iter()
            .map(|c| {
                (
                    c["transport"].as_str().unwrap_or_default().to_owned(),
                    c["streams"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        listing.sort_by_key(|(_, n)| *n);
        let name = t.pool_name().to_owned();
        assert_eq!(listing, vec![(name.clone(), 1), (name, 100)]);
        let mb = Mesh::metrics(&mesh.b);
        expect_metric(&mb, t.accepted_metric(), &[], 2.0);
        expect_metric(&mb, t.other().accepted_metric(), &[], 0.0);
        drop((conns, extra));
    }

    /// `b`'s daemon believes its workload runs as `impostor` and presents that certificate;
    /// `a` expects `server`: the tunnel is refused on the certificate (at both ends) and not
    /// retried on the other transport, and nothing stays pooled.
    fn server_with_an_unexpected_identity_is_refused(t: Transport) {
        let mut wl = ztunnel_e2e::mesh::default_workloads();
        wl[1] = Wl {
            sa: "impostor".into(),
            ..wl[1].clone()
        };
        let b = NodeOptions {
            workloads: wl,
            ..t.server()
        };
        let mesh = Mesh::builder().a(t.client()).b(b).start();
        let (ma, _) = refused_connection(&mesh);
        expect_metric(
            &ma,
            "ztunnel_refusals_total",
            &[("reason", "outbound_tunnel_failed")],
            1.0,
        );
        expect_metric(&ma, "ztunnel_quic_fallbacks_total", &[], 0.0);
        assert!(Mesh::pool(&mesh.a).is_empty());
        let labels = [("reason", "inbound_tls_handshake")];
        let mb = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &labels, 1.0);
        expect_metric(&mb, "ztunnel_refusals_total", &labels, 1.0);
        expect_metric(&mb, t.accepted_metric(), &[], 0.0);
        expect_metric(&mb, t.other().accepted_metric(), &[], 0.0);
        let log = mesh.a_daemon.log();
        assert!(
            log.contains("impostor"),
            "a's log names the identity it refused:\n{log}"
        );
        let log = mesh.b_daemon.log();
        assert!(
            log.contains(t.handshake_failed_log()),
            "b refused the handshake:\n{log}"
        );
    }

    /// `b` takes the post-quantum hybrid key exchange only (`--tls-key-exchange pqc-only`, as
    /// Istio's `COMPLIANCE_POLICY=pqc`): `a`, on the default, tunnels to it, its first choice
    /// being the hybrid; a peer of the mesh offering X25519 alone is refused at the handshake
    /// and counted.
    fn pqc_only_takes_the_hybrid_and_refuses_a_classical_peer(t: Transport) {
        let mut b = t.server();
        b.extra_args
            .extend(["--tls-key-exchange".into(), "pqc-only".into()]);
        let mesh = Mesh::builder().a(t.client()).b(b).start();
        mesh.check_half_close_both_ways();
        expect_metric(&Mesh::metrics(&mesh.a), "ztunnel_quic_fallbacks_total", &[], 0.0);
        let refused = mesh.c.block_on(classical_handshake(mesh.ca_dir.clone(), t));
        assert!(refused.is_err(), "b must refuse X25519 alone");
        let labels = [("reason", "inbound_tls_handshake")];
        let mb = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &labels, 1.0);
        expect_metric(&mb, "ztunnel_refusals_total", &labels, 1.0);
        expect_metric(&mb, t.accepted_metric(), &[], 1.0);
        let log = mesh.b_daemon.log();
        assert!(
            log.contains(t.handshake_failed_log()),
            "b logs the refused handshake:\n{log}"
        );
    }
}

/// A TLS handshake with `b`'s tunnel port on `t`, by a client holding a certificate of the
/// mesh (from `ca_dir`) whose only key exchange is X25519, as a peer built on ring offers.
async fn classical_handshake(ca_dir: std::path::PathBuf, t: Transport) -> Result<(), String> {
    use std::sync::Arc;
    let ca = LocalCa::load_or_create(&ca_dir, "cluster.local").unwrap();
    let me: Identity = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
    let cert = issue(&ca, &me, Duration::from_secs(3600)).unwrap();
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..(*ztunnel::identity::tls::provider()).clone()
    };
    let server: Identity = "spiffe://cluster.local/ns/demo/sa/server".parse().unwrap();
    let cfg = cert.client_config_with(Arc::new(provider), &[server]);
    match t {
        Transport::Http2 => {
            let opts = ConnectOptions {
                mark: None,
                timeout: Duration::from_secs(5),
            };
            client::connect(quic_common::tunnel_addr(), cfg, opts)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
        Transport::Quic => {
            let cfg = ztunnel::hbone::quic::client_config(&cfg).unwrap();
            let ep = quic_common::client_endpoint();
            // A connection made is dropped (so closed) before the endpoint waits to be idle.
            let r = ztunnel::hbone::quic::connect(&ep, quic_common::tunnel_addr(), cfg)
                .await
                .map(drop)
                .map_err(|e| e.to_string());
            ep.wait_idle().await;
            r
        }
    }
}

/// Runs one connection a → b:8080 that the mesh must refuse; returns the metrics of a and b.
fn refused_connection(mesh: &Mesh) -> (String, String) {
    mesh.b
        .serve(8080, |l| async move { apps::hold_server(l).await });
    let outcome = mesh.a.block_on(async {
        let mut s = TcpStream::connect((B_IP, 8080)).await?;
        s.write_all(b"secret").await?;
        let mut b = [0u8; 6];
        s.read_exact(&mut b).await
    });
    assert!(
        outcome.is_err(),
        "the connection must not get through: {outcome:?}"
    );
    (Mesh::metrics(&mesh.a), Mesh::metrics(&mesh.b))
}

#[test]
fn client_certificate_from_another_trust_domain_is_refused() {
    // A client holding a certificate for `spiffe://other.local/...`, signed by the mesh's own
    // root (so only the trust domain is wrong), that accepts b's real identity: b must refuse it.
    let mesh = Mesh::builder().start();
    let ca = LocalCa::load_or_create(&mesh.ca_dir, "other.local").unwrap();
    let me: Identity = "spiffe://other.local/ns/demo/sa/client".parse().unwrap();
    let cert = issue(&ca, &me, Duration::from_secs(3600)).unwrap();
    let server: Identity = "spiffe://cluster.local/ns/demo/sa/server".parse().unwrap();
    let cfg = cert.client_config(&[server]);
    mesh.b
        .serve(8080, |l| async move { apps::hold_server(l).await });
    let outcome = mesh.c.block_on(async move {
        let opts = ConnectOptions {
            mark: None,
            timeout: Duration::from_secs(5),
        };
        let tunnel = format!("{B_IP}:15008").parse().unwrap();
        let (send, conn) = client::connect(tunnel, cfg, opts).await?;
        tokio::spawn(conn);
        let req =
            client::connect_request(format!("{B_IP}:8080").parse().unwrap(), &Default::default())?;
        client::open_stream(send, req).await.map(|_| ())
    });
    assert!(outcome.is_err(), "b must refuse the foreign trust domain");
    let labels = [("reason", "inbound_tls_handshake")];
    let mb = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(metric(&mb, "ztunnel_refusals_total", &labels), 1.0, "{mb}");
    assert_eq!(
        metric(&mb, "ztunnel_hbone_connections_accepted_total", &[]),
        0.0,
        "{mb}"
    );
}

/// A plugged-in CA as Istio's documentation makes it with `openssl` (RSA 4096 root and
/// intermediate, the signing key PKCS#1, `cert-chain.pem` up to the root): both daemons sign
/// with it, and their tunnels verify the RSA chain both ways.
#[test]
fn a_plugged_in_ca_made_as_istio_documents_it_signs_for_both_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let cacerts = ztunnel_e2e::certs::openssl_cacerts(dir.path()).expect("openssl cacerts");
    let node = || NodeOptions {
        ca_dir: Some(cacerts.clone()),
        ..Default::default()
    };
    let mesh = Mesh::builder().a(node()).b(node()).start();
    mesh.check_bulk_each_way(64 * 1024);
    let ma = Mesh::metrics(&mesh.a);
    expect_metric(
        &ma,
        "ztunnel_proxied_connections_total",
        &[("direction", "outbound")],
        1.0,
    );
    let mb = Mesh::metrics(&mesh.b);
    expect_metric(
        &mb,
        "ztunnel_proxied_connections_total",
        &[("direction", "inbound")],
        1.0,
    );
}

#[test]
fn client_certificate_from_an_untrusted_ca_is_refused() {
    let other_ca = tempfile::tempdir().unwrap();
    let a = NodeOptions {
        ca_dir: Some(other_ca.path().join("ca")),
        ..Default::default()
    };
    let mesh = Mesh::builder().a(a).start();
    let (ma, _) = refused_connection(&mesh);
    let mb = Mesh::metrics_when(
        &mesh.b,
        "ztunnel_refusals_total",
        &[("reason", "inbound_tls_handshake")],
        1.0,
    );
    // Both ends refuse: each sees a chain from a root it does not trust.
    assert_eq!(
        metric(
            &ma,
            "ztunnel_refusals_total",
            &[("reason", "outbound_tunnel_failed")]
        ),
        1.0,
        "{ma}"
    );
    assert_eq!(
        metric(
            &mb,
            "ztunnel_refusals_total",
            &[("reason", "inbound_tls_handshake")]
        ),
        1.0,
        "{mb}"
    );
}

#[test]
fn passthrough_and_plaintext_inbound() {
    let mesh = Mesh::builder().start();
    // a → c: c is not in the mesh, so the connection leaves a as plain TCP from a's address.
    let c_server = mesh.c.serve(9090, |l| async move {
        let (mut s, peer) = l.accept().await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>((buf, peer))
    });
    mesh.a
        .block_on(async {
            let mut s = TcpStream::connect((C_IP, 9090)).await?;
            s.write_all(b"plain to c").await?;
            s.shutdown().await
        })
        .expect("a → c");
    let (buf, peer) = mesh.c.join(c_server).expect("c server");
    assert_eq!(buf, b"plain to c");
    assert_eq!(peer.ip().to_string(), A_IP);
    assert_eq!(
        metric(
            &Mesh::metrics(&mesh.a),
            "ztunnel_proxied_connections_total",
            &[("direction", "passthrough")]
        ),
        1.0
    );

    // c → b: no tunnel from outside the mesh; b's daemon takes it on 15006.
    let b_server = mesh.b.serve(8080, |l| async move {
        let (mut s, _) = l.accept().await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    });
    mesh.c
        .block_on(async {
            let mut s = TcpStream::connect((B_IP, 8080)).await?;
            s.write_all(b"plain to b").await?;
            s.shutdown().await
        })
        .expect("c → b");
    assert_eq!(mesh.b.join(b_server).expect("b server"), b"plain to b");
    assert_eq!(
        metric(
            &Mesh::metrics(&mesh.b),
            "ztunnel_proxied_connections_total",
            &[("direction", "inbound_plaintext")]
        ),
        1.0
    );
}
