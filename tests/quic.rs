//! HBONE over QUIC between two real daemon processes on the test bed (see `harness/mesh.rs`):
//! the fall back to HTTP/2 when `b` does not answer on UDP (counted once, then HTTP/2 only).
//! What both transports must show (bulk integrity, half-close, bytes written before the tunnel
//! is up, pooling, an unexpected server identity refused with no fall back) is written once
//! for both in `hbone.rs`; peers that do not play by the rules are in `quic_peers.rs`. Needs
//! root, `ip` and `nft`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, NodeOptions, B_IP};
use ztunnel_e2e::netns::Netns;

use crate::quic_common::*;

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
    let mesh = Mesh::builder().a(a).start();
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
    let listing = Mesh::pool(&mesh.a);
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
    assert!(Mesh::pool(&mesh.a).is_empty());

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
    let listing = Mesh::pool(&mesh.a);
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
