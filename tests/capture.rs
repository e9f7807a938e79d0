//! In-pod capture on the two-node test bed (`harness/testbed.rs`): pods wired by Debian's
//! `bridge` + `host-local` with `ztunnel-cni` chained after them, one daemon per node. Needs
//! root, `ip`, `nft`, `tcpdump` and `containernetworking-plugins`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_e2e::daemon::{access_lines, metric};
use ztunnel_e2e::testbed::{self, TestBed, MARKER, VIP};

/// Accepts `n` connections; answers each with "<name> saw <peer>" after reading to EOF.
async fn reply_server(l: TcpListener, name: &'static str, n: usize) -> Vec<String> {
    let mut peers = Vec::new();
    for _ in 0..n {
        let (mut s, peer) = l.accept().await.expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read");
        s.write_all(format!("{name} saw {} ({} bytes)", peer.ip(), got.len()).as_bytes())
            .await
            .expect("write");
        peers.push(peer.ip().to_string());
    }
    peers
}

async fn listen(port: u16) -> TcpListener {
    TcpListener::bind(("0.0.0.0", port)).await.expect("bind")
}

/// Sends `msg`, half-closes, returns the answer.
async fn request(ip: &str, port: u16, msg: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect((ip, port)).await?;
    s.write_all(msg.as_bytes()).await?;
    s.shutdown().await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[test]
fn pod_to_pod_and_to_a_vip_carry_real_client_addresses_and_only_mtls_crosses_nodes() {
    let bed = TestBed::start();
    let server = bed.pod("server");
    let echo = bed.pod("echo");
    let client = bed.pod("client");
    let srv = server
        .ns
        .spawn(async { reply_server(listen(8080).await, "server", 2).await });
    let ech = echo
        .ns
        .spawn(async { reply_server(listen(8080).await, "echo", 1).await });
    std::thread::sleep(Duration::from_millis(100));

    let pcap = bed.dir().join("underlay.pcap");
    let cap = testbed::start_capture(&bed.nodes[0].ns, "ul0", &pcap).unwrap();
    let msg = format!("hello {MARKER}");
    let (cross, same, vip) = client.ns.block_on(async move {
        (
            request("10.20.2.10", 8080, &msg).await,
            request("10.20.1.12", 8080, &msg).await,
            request(VIP, 80, &msg).await,
        )
    });
    let captured = testbed::stop_capture(cap, &pcap).unwrap();
    let want = format!("saw 10.20.1.10 ({} bytes)", 6 + MARKER.len());
    assert_eq!(cross.unwrap(), format!("server {want}"), "cross-node");
    assert_eq!(same.unwrap(), format!("echo {want}"), "same node");
    assert_eq!(vip.unwrap(), format!("server {want}"), "via the VIP");
    assert_eq!(server.ns.join(srv), vec!["10.20.1.10", "10.20.1.10"]);
    assert_eq!(echo.ns.join(ech), vec!["10.20.1.10"]);

    // Between nodes: TLS to 15008 only, never the application's bytes or port.
    assert!(!captured.marker_seen, "plaintext crossed the underlay");
    assert!(!captured.lines.is_empty(), "the capture saw nothing");
    for l in &captured.lines {
        assert!(l.contains(".15008"), "non-tunnel TCP on the underlay: {l}");
    }

    // Identities, at both ends, from the daemons' own counts and logs.
    let m2 = bed.metrics(1);
    assert_eq!(
        metric(
            &m2,
            "ztunnel_proxied_connections_total",
            &[("direction", "inbound")]
        ),
        2.0,
        "{m2}"
    );
    let log2 = bed.log(1);
    let lines = access_lines(&log2);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["message"] == "connection closed"
                && l["direction"] == "inbound"
                && l["src_identity"] == "spiffe://cluster.local/ns/demo/sa/client"
                && l["dst_identity"] == "spiffe://cluster.local/ns/demo/sa/server"
                && l["src_workload"] == "demo/client"
                && l["bytes_received"] == 6 + MARKER.len()
                && l["decision"] == "allow")
            .count(),
        2,
        "one JSON access line per connection, with identities and bytes: {log2}"
    );
    // The daemon's own gauges: enrolled pods, certificates and their expiry.
    assert_eq!(metric(&m2, "ztunnel_enrolled_pods", &[]), 1.0, "{m2}");
    let m1 = bed.metrics_when(0, "ztunnel_certificates", &[], 2.0);
    assert_eq!(metric(&m1, "ztunnel_enrolled_pods", &[]), 2.0, "{m1}");
    assert_eq!(
        metric(&m1, "ztunnel_certificates", &[]),
        2.0,
        "client and echo: {m1}"
    );
    let expiry = metric(
        &m1,
        "ztunnel_certificate_expiry_seconds",
        &[("identity", "spiffe://cluster.local/ns/demo/sa/client")],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now + 3600.0,
        "a day-long certificate: {expiry} vs {now}"
    );
    let log1 = bed.log(0);
    assert!(
        access_lines(&log1)
            .iter()
            .any(|l| l["direction"] == "inbound"
                && l["src_identity"] == "spiffe://cluster.local/ns/demo/sa/client"
                && l["dst_identity"] == "spiffe://cluster.local/ns/demo/sa/echo"),
        "same-node tunnel with both identities: {log1}"
    );
    let m1 = bed.metrics(0);
    // Outbound: three tunnels' streams from the client; the echo pod's inbound is on n1 too.
    assert_eq!(
        metric(
            &m1,
            "ztunnel_proxied_connections_total",
            &[("direction", "outbound")]
        ),
        3.0,
        "{m1}"
    );
    assert_eq!(
        metric(
            &m1,
            "ztunnel_proxied_connections_total",
            &[("direction", "inbound")]
        ),
        1.0,
        "{m1}"
    );
}

#[test]
fn enrolled_to_plain_is_plain_tcp_and_plain_to_enrolled_arrives_through_15006() {
    let bed = TestBed::start();
    let legacy = bed.pod("legacy-2");
    let server = bed.pod("server");
    let client = bed.pod("client");
    let leg = legacy
        .ns
        .spawn(async { reply_server(listen(9090).await, "legacy", 1).await });
    let srv = server
        .ns
        .spawn(async { reply_server(listen(8080).await, "server", 1).await });
    std::thread::sleep(Duration::from_millis(100));

    let pcap = bed.dir().join("underlay.pcap");
    let cap = testbed::start_capture(&bed.nodes[0].ns, "ul0", &pcap).unwrap();
    let msg = format!("hi {MARKER}");
    let out = client
        .ns
        .block_on(async move { request("10.20.2.11", 9090, &msg).await });
    let captured = testbed::stop_capture(cap, &pcap).unwrap();
    assert_eq!(
        out.unwrap(),
        format!("legacy saw 10.20.1.10 ({} bytes)", 3 + MARKER.len())
    );
    assert_eq!(legacy.ns.join(leg), vec!["10.20.1.10"]);
    assert!(
        captured.marker_seen,
        "a pod outside the mesh is reached in plain TCP"
    );
    assert!(captured.lines.iter().any(|l| l.contains("10.20.2.11.9090")));

    let out = legacy
        .ns
        .block_on(async { request("10.20.2.10", 8080, "plain hello").await });
    assert_eq!(out.unwrap(), "server saw 10.20.2.11 (11 bytes)");
    assert_eq!(server.ns.join(srv), vec!["10.20.2.11"]);
    let m2 = bed.metrics(1);
    assert_eq!(
        metric(
            &m2,
            "ztunnel_proxied_connections_total",
            &[("direction", "inbound_plaintext")]
        ),
        1.0,
        "{m2}"
    );
    let m1 = bed.metrics(0);
    assert_eq!(
        metric(
            &m1,
            "ztunnel_proxied_connections_total",
            &[("direction", "passthrough")]
        ),
        1.0,
        "{m1}"
    );
}

/// Accepts one connection, reads to EOF, answers `reply` bytes.
async fn sized_server(l: TcpListener, reply: usize) -> usize {
    let (mut s, _) = l.accept().await.expect("accept");
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.expect("read");
    s.write_all(&vec![b'r'; reply]).await.expect("write");
    got.len()
}

#[test]
fn istio_metrics_at_both_reporters_count_exact_bytes() {
    let bed = TestBed::start();
    let srv = bed
        .pod("server")
        .ns
        .spawn(async { sized_server(listen(8080).await, 333).await });
    std::thread::sleep(Duration::from_millis(100));
    let got = bed.pod("client").ns.block_on(async {
        let mut s = TcpStream::connect((VIP, 80)).await?;
        s.write_all(&[b'q'; 1000]).await?;
        s.shutdown().await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out.len())
    });
    assert_eq!(got.unwrap(), 333);
    assert_eq!(bed.pod("server").ns.join(srv), 1000);
    let common = [
        ("source_workload", "client"),
        ("source_workload_namespace", "demo"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/demo/sa/client",
        ),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "demo"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/demo/sa/server",
        ),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let mut labels = common.to_vec();
        labels.push(("reporter", reporter));
        if reporter == "source" {
            labels.push(("destination_service", "server.demo.svc.cluster.local"));
        }
        // The close is counted when both directions have ended, a moment after the client's.
        let m = bed.metrics_when(node, "istio_tcp_connections_closed_total", &labels, 1.0);
        let value = |name| metric(&m, name, &labels);
        assert_eq!(
            value("istio_tcp_connections_opened_total"),
            1.0,
            "{reporter}: {m}"
        );
        assert_eq!(
            value("istio_tcp_connections_closed_total"),
            1.0,
            "{reporter}: {m}"
        );
        assert_eq!(
            value("istio_tcp_received_bytes_total"),
            1000.0,
            "{reporter}: {m}"
        );
        assert_eq!(
            value("istio_tcp_sent_bytes_total"),
            333.0,
            "{reporter}: {m}"
        );
    }
}

/// The same pods with QUIC on: `--quic-listen` on both nodes and every pod a QUIC
/// destination. The tunnel between the nodes is QUIC (UDP 15008 only on the underlay, no TCP
/// at all, never the application's bytes), accepted in the destination pod's netns and dialled
/// from the source pod's (the application sees the real client address), same-node too.
#[test]
fn quic_tunnels_between_pods_carry_real_client_addresses_and_only_udp_15008_crosses_nodes() {
    let bed = TestBed::start_configured(
        testbed::default_pods(),
        Vec::new(),
        &[
            ("ZTUNNEL_QUIC_LISTEN", "true"),
            ("ZTUNNEL_QUIC_DESTINATIONS", "10.20.0.0/16"),
        ],
    )
    .unwrap();
    let server = bed.pod("server");
    let echo = bed.pod("echo");
    let client = bed.pod("client");
    let srv = server
        .ns
        .spawn(async { reply_server(listen(8080).await, "server", 2).await });
    let ech = echo
        .ns
        .spawn(async { reply_server(listen(8080).await, "echo", 1).await });
    std::thread::sleep(Duration::from_millis(100));

    let pcap = bed.dir().join("underlay.pcap");
    let cap = testbed::start_capture(&bed.nodes[0].ns, "ul0", &pcap).unwrap();
    let msg = format!("hello {MARKER}");
    let (cross, again, same) = client.ns.block_on(async move {
        (
            request("10.20.2.10", 8080, &msg).await,
            request("10.20.2.10", 8080, &msg).await,
            request("10.20.1.12", 8080, &msg).await,
        )
    });
    let tcp = testbed::stop_capture(cap, &pcap).unwrap();
    let udp = testbed::read_capture(&pcap, "udp").unwrap();
    let want = format!("saw 10.20.1.10 ({} bytes)", 6 + MARKER.len());
    assert_eq!(cross.unwrap(), format!("server {want}"), "cross-node");
    assert_eq!(
        again.unwrap(),
        format!("server {want}"),
        "cross-node, pooled"
    );
    assert_eq!(same.unwrap(), format!("echo {want}"), "same node");
    assert_eq!(server.ns.join(srv), vec!["10.20.1.10", "10.20.1.10"]);
    assert_eq!(echo.ns.join(ech), vec!["10.20.1.10"]);

    assert!(!tcp.marker_seen, "plaintext crossed the underlay");
    assert!(tcp.lines.is_empty(), "TCP on the underlay: {:?}", tcp.lines);
    assert!(!udp.lines.is_empty(), "the capture saw no QUIC");
    for l in &udp.lines {
        assert!(
            l.contains("10.20.1.10.") && l.contains("10.20.2.10.15008"),
            "UDP other than the pods' tunnel on the underlay: {l}"
        );
    }

    // One QUIC connection into the server pod, carrying both streams; none over HTTP/2.
    let m2 = bed.metrics(1);
    assert_eq!(
        metric(&m2, "ztunnel_quic_connections_accepted_total", &[]),
        1.0,
        "{m2}"
    );
    assert_eq!(
        metric(&m2, "ztunnel_hbone_connections_accepted_total", &[]),
        0.0,
        "{m2}"
    );
    assert_eq!(
        metric(
            &m2,
            "ztunnel_proxied_connections_total",
            &[("direction", "inbound")]
        ),
        2.0,
        "{m2}"
    );
    assert!(
        access_lines(&bed.log(1))
            .iter()
            .any(|l| l["direction"] == "inbound"
                && l["src_identity"] == "spiffe://cluster.local/ns/demo/sa/client"
                && l["dst_identity"] == "spiffe://cluster.local/ns/demo/sa/server"
                && l["decision"] == "allow"),
        "the QUIC stream's identities in the access log"
    );
    let m1 = bed.metrics(0);
    assert_eq!(
        metric(&m1, "ztunnel_quic_fallbacks_total", &[]),
        0.0,
        "{m1}"
    );
    assert_eq!(
        metric(&m1, "ztunnel_quic_connections_accepted_total", &[]),
        1.0,
        "the same-node tunnel to the echo pod: {m1}"
    );
    assert_eq!(
        metric(&m1, "ztunnel_pool_connections_opened_total", &[]),
        2.0,
        "one per destination pod: {m1}"
    );
}
