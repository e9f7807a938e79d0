//! HBONE between two real daemon processes on the test bed (see `harness/mesh.rs`): bulk
//! integrity, half-close, pooling, identity refusals, CONNECT validation, and a transfer
//! across a certificate renewal; HBONE's forms and headers as Istio's gateways use them
//! (`hbone/forms.rs`, also against Python's `h2`). Needs root, `ip`, `nft` and `python3`
//! with `h2`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::ca::{issue, LocalCa};
use ztunnel::hbone::client;
use ztunnel::identity::Identity;
use ztunnel::net::ConnectOptions;
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, NodeOptions, Wl, A_IP, B_IP, C_IP};

#[path = "hbone/forms.rs"]
mod forms;

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

/// 64 MiB each way, after both daemons have given back their start-up code pages: the code
/// the transfer needs is read back in as it runs.
#[test]
fn bulk_64_mib_each_way_arrives_intact() {
    let mesh = Mesh::default_pair();
    for daemon in [&mesh.a_daemon, &mesh.b_daemon] {
        // At least the code and the read-only data of the executable.
        assert!(wait_for_released_pages(daemon) >= 2);
    }
    mesh.check_bulk_each_way(64 * MIB);
    let m = Mesh::metrics(&mesh.b);
    assert_eq!(
        metric(&m, "ztunnel_hbone_connections_accepted_total", &[]),
        1.0,
        "{m}"
    );
    let m = Mesh::metrics(&mesh.a);
    assert_eq!(
        metric(
            &m,
            "ztunnel_proxied_connections_total",
            &[("direction", "outbound")]
        ),
        1.0,
        "{m}"
    );
}

#[test]
fn half_close_crosses_the_tunnel_both_ways() {
    let mesh = Mesh::default_pair();
    mesh.check_half_close_both_ways();
}

/// A client that writes before the tunnel is up (its first bytes then ride right behind the
/// CONNECT, then those it writes while the answer is in flight, up to 64 KiB; the rest follows
/// through the stream) and half-closes at once: everything arrives, in order, and the source's
/// daemon counts every byte it sent.
#[test]
fn bytes_written_before_the_tunnel_is_up_arrive_in_order_and_are_counted() {
    let mesh = Mesh::default_pair();
    let len = 160 * 1024; // more than the daemon takes before the stream is open
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
    assert_eq!(
        metric(&m, "istio_tcp_sent_bytes_total", &source),
        len as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "istio_tcp_received_bytes_total", &source),
        len as f64,
        "{m}"
    );
}

#[test]
fn hundred_streams_share_one_connection_and_the_next_opens_another() {
    let mesh = Mesh::default_pair();
    mesh.b
        .serve(8080, |l| async move { apps::hold_server(l).await });
    let opened = |ns| {
        metric(
            &Mesh::metrics(ns),
            "ztunnel_pool_connections_opened_total",
            &[],
        )
    };
    // Connect all 100 at once: concurrent first requests must wait for one handshake.
    let conns = mesh
        .a
        .block_on(apps::open_held(B_IP, 8080, 100))
        .expect("connect");
    assert_eq!(conns.len(), 100);
    assert_eq!(
        opened(&mesh.a),
        1.0,
        "100 streams must share one TLS connection"
    );
    let m = Mesh::metrics(&mesh.a);
    assert_eq!(metric(&m, "ztunnel_pool_streams", &[]), 100.0, "{m}");
    let extra = mesh
        .a
        .block_on(apps::open_held(B_IP, 8080, 1))
        .expect("the 101st");
    assert_eq!(
        opened(&mesh.a),
        2.0,
        "the 101st stream must open a second connection"
    );
    assert_eq!(
        metric(
            &Mesh::metrics(&mesh.b),
            "ztunnel_hbone_connections_accepted_total",
            &[]
        ),
        2.0
    );
    drop((conns, extra));
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
    let mesh = Mesh::default_pair();
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

#[test]
fn client_certificate_from_an_untrusted_ca_is_refused() {
    let other_ca = tempfile::tempdir().unwrap();
    let a = NodeOptions {
        ca_dir: Some(other_ca.path().join("ca")),
        ..Default::default()
    };
    let mesh = Mesh::start(a, NodeOptions::default()).expect("test bed");
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
fn server_with_an_unexpected_identity_is_refused() {
    // b's daemon believes its workload runs as `impostor`; a expects `server`.
    let mut wl = ztunnel_e2e::mesh::default_workloads();
    wl[1] = Wl {
        sa: "impostor".into(),
        ..wl[1].clone()
    };
    let b = NodeOptions {
        workloads: wl,
        ..Default::default()
    };
    let mesh = Mesh::start(NodeOptions::default(), b).expect("test bed");
    let (ma, _) = refused_connection(&mesh);
    assert_eq!(
        metric(
            &ma,
            "ztunnel_refusals_total",
            &[("reason", "outbound_tunnel_failed")]
        ),
        1.0,
        "{ma}"
    );
    let log = mesh.a_daemon.log();
    assert!(
        log.contains("impostor"),
        "a's log names the identity it refused:\n{log}"
    );
}

#[test]
fn passthrough_and_plaintext_inbound() {
    let mesh = Mesh::default_pair();
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
