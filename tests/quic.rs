//! HBONE over QUIC between two real daemon processes on the test bed (see `harness/mesh.rs`):
//! `b` accepts tunnels on UDP 15008 (`--quic-listen true`), `a` dials `b` on QUIC first
//! (`--quic-destinations`). Bulk integrity, half-close, bytes written before the tunnel is up
//! and pooling (100 streams a connection) across QUIC tunnels (proved to be QUIC by both
//! daemons' counters and `a`'s pool listing), the fall back to HTTP/2 when `b`
//! does not answer on UDP (counted once, then HTTP/2 only), and an unexpected server identity
//! refused with no fall back. Peers that do not play by the rules are in `quic_peers.rs`.
//! Needs root, `ip` and `nft`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, NodeOptions, Wl, B_IP};
use ztunnel_e2e::netns::Netns;

#[path = "quic/common.rs"]
#[allow(dead_code)]
mod common;
use common::*;

const MIB: usize = 1024 * 1024;

/// 64 MiB each way over a QUIC tunnel, and proof that it was one: `b` accepted one QUIC
/// connection and no TLS-over-TCP one, `a` pools one `quic` connection and fell back never.
#[test]
fn bulk_64_mib_each_way_arrives_intact_over_quic() {
    let mesh = quic_pair();
    mesh.check_bulk_each_way(64 * MIB);

    let mb = Mesh::metrics(&mesh.b);
    expect_metric(&mb, "ztunnel_quic_connections_accepted_total", &[], 1.0);
    expect_metric(&mb, "ztunnel_hbone_connections_accepted_total", &[], 0.0);
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
    // The connection stays pooled (idle timeout 5 min) after its stream ended.
    let listing = pool(&mesh.a);
    assert_eq!(listing.len(), 1, "{listing:?}");
    assert_eq!(listing[0]["transport"], "quic", "{listing:?}");
    assert_eq!(listing[0]["addr"], format!("{B_IP}:15008"), "{listing:?}");
}

#[test]
fn half_close_crosses_the_quic_tunnel_both_ways() {
    let mesh = quic_pair();
    mesh.check_half_close_both_ways();
    // Both streams rode the one QUIC connection.
    let mb = Mesh::metrics(&mesh.b);
    expect_metric(&mb, "ztunnel_quic_connections_accepted_total", &[], 1.0);
    expect_metric(&mb, "ztunnel_hbone_connections_accepted_total", &[], 0.0);
    assert_eq!(counter(&mesh.a, "ztunnel_quic_fallbacks_total", &[]), 0.0);
}

/// A client that writes 40 KiB before the tunnel is up and half-closes at once: its first
/// bytes ride right behind the QUIC stream header, the rest follow on the stream; all arrive
/// in order, and the source's daemon counts every byte each way.
#[test]
fn bytes_written_before_the_quic_tunnel_is_up_arrive_in_order_and_are_counted() {
    let mesh = quic_pair();
    let len = 40 * 1024; // more than the daemon takes with the header (16 KiB)
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
    assert_eq!(pool(&mesh.a)[0]["transport"], "quic");
    assert_eq!(
        counter(&mesh.b, "ztunnel_quic_connections_accepted_total", &[]),
        1.0
    );
}

/// 100 concurrent streams share one QUIC connection (the transport's stream limit agrees
/// with the pool's), and the 101st opens a second QUIC connection.
#[test]
fn hundred_streams_share_one_quic_connection_and_the_next_opens_another() {
    let mesh = quic_pair();
    mesh.b
        .serve(8080, |l| async move { apps::hold_server(l).await });
    let conns = mesh
        .a
        .block_on(apps::open_held(B_IP, 8080, 100))
        .expect("connect");
    assert_eq!(conns.len(), 100);
    let m = Mesh::metrics(&mesh.a);
    assert_eq!(
        metric(&m, "ztunnel_pool_connections_opened_total", &[]),
        1.0,
        "100 streams must share one QUIC connection: {m}"
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
    let mut listing: Vec<(String, u64)> = pool(&mesh.a)
        .iter()
        .map(|c| {
            (
                c["transport"].as_str().unwrap_or_default().to_owned(),
                c["streams"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    listing.sort_by_key(|(_, n)| *n);
    assert_eq!(
        listing,
        vec![("quic".to_owned(), 1), ("quic".to_owned(), 100)]
    );
    let mb = Mesh::metrics(&mesh.b);
    expect_metric(&mb, "ztunnel_quic_connections_accepted_total", &[], 2.0);
    expect_metric(&mb, "ztunnel_hbone_connections_accepted_total", &[], 0.0);
    drop((conns, extra));
}

/// UDP datagrams `ns` received for a port nothing listens on (`Udp: NoPorts`).
fn udp_no_ports(ns: &Netns) -> u64 {
    let snmp = ns
        .exec("cat", &["/proc/net/snmp"])
        .expect("read /proc/net/snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let names = udp.next().expect("Udp header");
    let values = udp.next().expect("Udp values");
    let i = names
        .split_whitespace()
        .position(|n| n == "NoPorts")
        .expect("NoPorts column");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// A round trip on a fresh connection a → b:8080, kept open.
async fn round_trip(msg: &'static [u8]) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect((B_IP, 8080)).await?;
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await?;
    assert_eq!(back, msg);
    Ok(s)
}

/// `b` does not listen on QUIC: `a`'s QUIC dial gets no answer, falls back to HTTP/2 (counted
/// once), and the next dial to `b` shortly after goes straight to HTTP/2: no QUIC packet
/// reaches `b` again and the fallback is not counted again.
#[test]
fn no_quic_answer_falls_back_to_http2_and_is_remembered() {
    let a = NodeOptions {
        // Closes the first pooled connection soon, so the second connection must dial.
        extra_args: args(&[
            "--quic-destinations",
            "10.77.0.0/24",
            "--pool-idle-timeout",
            "300ms",
        ]),
        ..Default::default()
    };
    let mesh = Mesh::start(a, NodeOptions::default()).expect("test bed");
    let server = mesh.b.serve(8080, |l| async move {
        for _ in 0..2 {
            let (s, _) = l.accept().await?;
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
        Ok::<_, std::io::Error>(())
    });
    let no_ports_before = udp_no_ports(&mesh.b);

    let first = mesh
        .a
        .block_on(round_trip(b"one"))
        .expect("first connection");
    let ma = Mesh::metrics(&mesh.a);
    expect_metric(&ma, "ztunnel_quic_fallbacks_total", &[], 1.0);
    let listing = pool(&mesh.a);
    assert_eq!(listing.len(), 1, "{listing:?}");
    assert_eq!(listing[0]["transport"], "h2", "{listing:?}");
    let mb = Mesh::metrics(&mesh.b);
    expect_metric(&mb, "ztunnel_hbone_connections_accepted_total", &[], 1.0);
    expect_metric(&mb, "ztunnel_quic_connections_accepted_total", &[], 0.0);
    let no_ports_after_first = udp_no_ports(&mesh.b);
    assert!(
        no_ports_after_first > no_ports_before,
        "a's QUIC dial must have reached b's UDP 15008 ({no_ports_before} → {no_ports_after_first})"
    );

    // Close the first connection and let its pooled tunnel idle out.
    drop(first);
    let ma = Mesh::metrics_when(&mesh.a, "ztunnel_pool_connections", &[], 0.0);
    expect_metric(&ma, "ztunnel_pool_connections", &[], 0.0);
    assert!(pool(&mesh.a).is_empty());

    let second = mesh
        .a
        .block_on(round_trip(b"two"))
        .expect("second connection");
    let ma = Mesh::metrics(&mesh.a);
    assert_eq!(
        metric(&ma, "ztunnel_pool_connections_opened_total", &[]),
        2.0,
        "the second connection must have dialled again: {ma}"
    );
    assert_eq!(
        metric(&ma, "ztunnel_quic_fallbacks_total", &[]),
        1.0,
        "the second dial must not try QUIC: {ma}"
    );
    let listing = pool(&mesh.a);
    assert_eq!(listing.len(), 1, "{listing:?}");
    assert_eq!(listing[0]["transport"], "h2", "{listing:?}");
    assert_eq!(
        counter(&mesh.b, "ztunnel_hbone_connections_accepted_total", &[]),
        2.0
    );
    assert_eq!(
        udp_no_ports(&mesh.b),
        no_ports_after_first,
        "no QUIC packet may reach b for the second dial"
    );
    drop(second);
    mesh.b.join(server).expect("server");
}

/// `b` presents the certificate of `impostor` on QUIC; `a` expects `server`: the tunnel is
/// refused on the certificate, and not retried on HTTP/2.
#[test]
fn server_with_an_unexpected_identity_is_refused_over_quic_without_fallback() {
    let mut wl = ztunnel_e2e::mesh::default_workloads();
    wl[1] = Wl {
        sa: "impostor".into(),
        ..wl[1].clone()
    };
    let b = NodeOptions {
        workloads: wl,
        ..quic_server()
    };
    let mesh = Mesh::start(quic_client(), b).expect("test bed");
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
    let ma = Mesh::metrics(&mesh.a);
    expect_metric(
        &ma,
        "ztunnel_refusals_total",
        &[("reason", "outbound_tunnel_failed")],
        1.0,
    );
    expect_metric(&ma, "ztunnel_quic_fallbacks_total", &[], 0.0);
    assert!(pool(&mesh.a).is_empty());
    let labels = [("reason", "inbound_tls_handshake")];
    let mb = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(metric(&mb, "ztunnel_refusals_total", &labels), 1.0, "{mb}");
    expect_metric(&mb, "ztunnel_quic_connections_accepted_total", &[], 0.0);
    assert_eq!(
        metric(&mb, "ztunnel_hbone_connections_accepted_total", &[]),
        0.0,
        "no fallback to HTTP/2: {mb}"
    );
    let log = mesh.a_daemon.log();
    assert!(
        log.contains("impostor"),
        "a's log names the identity it refused:\n{log}"
    );
    let log = mesh.b_daemon.log();
    assert!(
        log.contains("QUIC tunnel handshake failed"),
        "b refused the handshake on QUIC:\n{log}"
    );
}
