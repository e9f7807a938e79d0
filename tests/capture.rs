//! In-pod capture on the two-node test bed (`harness/testbed.rs`): pods wired by Debian's
//! `bridge` + `host-local` with `ztunnel-cni` chained after them, one daemon per node; a
//! connection to a Service with no endpoint reset at the source, and one straight to the pod's
//! own outbound listener over loopback too (never looped); a client address holding the
//! destination pod's ephemeral range of connections per application port; plaintext captured in
//! a pod but addressed to another address, refused; Istio's telemetry
//! (`capture/telemetry.rs`). Needs root, `ip`, `nft`,
//! `tcpdump` and `containernetworking-plugins`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::{access_lines, expect_metric, metric};
use ztunnel_e2e::for_each_transport;
use ztunnel_e2e::testbed::{self, TestBed, MARKER, VIP, VIP6};
use ztunnel_e2e::transport::Transport;

#[path = "capture/telemetry.rs"]
mod telemetry;

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

/// Sends `msg`, half-closes, returns the answer.
async fn request(ip: &str, port: u16, msg: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect((ip, port)).await?;
    s.write_all(msg.as_bytes()).await?;
    s.shutdown().await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

for_each_transport! {
    /// Pod to pod across nodes (twice: the second stream on the pooled connection), through
    /// the Service's VIP and on the same node, over tunnels of either transport (with QUIC,
    /// `--quic-listen` on both nodes and every pod a QUIC destination): the applications see
    /// the real client address; only the tunnels cross the underlay (TLS to TCP 15008, or
    /// QUIC to UDP 15008 with no TCP at all), never the application's bytes; the tunnels are
    /// accepted in the destination pod's netns and dialled from the source pod's, one
    /// connection per destination pod; both ends log the identities; the daemons' gauges count
    /// the enrolled pods and their certificates.
    fn pod_to_pod_and_to_a_vip_carry_real_client_addresses_and_only_tunnels_cross_nodes(
        t: Transport
    ) {
        let bed = TestBed::builder().transport(t).start();
        let server = bed.pod("server");
        let echo = bed.pod("echo");
        let client = bed.pod("client");
        let srv = server
            .ns
            .serve(8080, |l| async move { reply_server(l, "server", 3).await });
        let ech = echo
            .ns
            .serve(8080, |l| async move { reply_server(l, "echo", 1).await });

        let pcap = bed.dir().join("underlay.pcap");
        let cap = testbed::start_capture(&bed.nodes[0].ns, "ul0", &pcap).unwrap();
        let msg = format!("hello {MARKER}");
        let (cross, again, vip, same) = client.ns.block_on(async move {
            (
                request("10.20.2.10", 8080, &msg).await,
                request("10.20.2.10", 8080, &msg).await,
                request(VIP, 80, &msg).await,
                request("10.20.1.12", 8080, &msg).await,
            )
        });
        let tcp = testbed::stop_capture(cap, &pcap).unwrap();
        let udp = testbed::read_capture(&pcap, "udp").unwrap();
        let want = format!("saw 10.20.1.10 ({} bytes)", 6 + MARKER.len());
        assert_eq!(cross.unwrap(), format!("server {want}"), "cross-node");
        assert_eq!(again.unwrap(), format!("server {want}"), "cross-node, pooled");
        assert_eq!(vip.unwrap(), format!("server {want}"), "via the VIP");
        assert_eq!(same.unwrap(), format!("echo {want}"), "same node");
        assert_eq!(server.ns.join(srv), vec!["10.20.1.10"; 3]);
        assert_eq!(echo.ns.join(ech), vec!["10.20.1.10"]);

        // Between nodes: the tunnel only, never the application's bytes or port.
        assert!(!tcp.marker_seen, "plaintext crossed the underlay");
        match t {
            Transport::Http2 => {
                assert!(!tcp.lines.is_empty(), "the capture saw nothing");
                for l in &tcp.lines {
                    assert!(l.contains(".15008"), "non-tunnel TCP on the underlay: {l}");
                }
            }
            Transport::Quic => {
                assert!(tcp.lines.is_empty(), "TCP on the underlay: {:?}", tcp.lines);
                assert!(!udp.lines.is_empty(), "the capture saw no QUIC");
                for l in &udp.lines {
                    assert!(
                        l.contains("10.20.1.10.") && l.contains("10.20.2.10.15008"),
                        "UDP other than the pods' tunnel on the underlay: {l}"
                    );
                }
            }
        }

        // One tunnel connection into the server pod, carrying its three streams, none of the
        // other transport; identities at both ends, from the daemons' own counts and logs.
        let m2 = bed.metrics(1);
        expect_metric(&m2, t.accepted_metric(), &[], 1.0);
        expect_metric(&m2, t.other().accepted_metric(), &[], 0.0);
        expect_metric(
            &m2,
            "ztunnel_proxied_connections_total",
            &[("direction", "inbound")],
            3.0,
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
            3,
            "one JSON access line per connection, with identities and bytes: {log2}"
        );
        // The daemon's own gauges: enrolled pods, certificates and their expiry.
        expect_metric(&m2, "ztunnel_enrolled_pods", &[], 1.0);
        let m1 = bed.metrics_when(0, "ztunnel_certificates", &[], 2.0);
        expect_metric(&m1, "ztunnel_enrolled_pods", &[], 2.0);
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
        // Outbound: four streams from the client; the echo pod's inbound is on n1 too, on a
        // same-node tunnel of the transport.
        expect_metric(
            &m1,
            "ztunnel_proxied_connections_total",
            &[("direction", "outbound")],
            4.0,
        );
        expect_metric(
            &m1,
            "ztunnel_proxied_connections_total",
            &[("direction", "inbound")],
            1.0,
        );
        expect_metric(&m1, t.accepted_metric(), &[], 1.0);
        expect_metric(&m1, "ztunnel_quic_fallbacks_total", &[], 0.0);
        assert_eq!(
            metric(&m1, "ztunnel_pool_connections_opened_total", &[]),
            2.0,
            "one per destination pod: {m1}"
        );
    }
}

#[test]
fn enrolled_to_plain_is_plain_tcp_and_plain_to_enrolled_arrives_through_15006() {
    let bed = TestBed::start();
    let legacy = bed.pod("legacy-2");
    let server = bed.pod("server");
    let client = bed.pod("client");
    let leg = legacy
        .ns
        .serve(9090, |l| async move { reply_server(l, "legacy", 1).await });
    let srv = server
        .ns
        .serve(8080, |l| async move { reply_server(l, "server", 1).await });

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

/// One client holding connections to two ports of one pod, with the server pod's ephemeral
/// range narrowed to two ports: the destination's daemon connects to the application from the
/// client's address with the source port chosen at connect time by the whole 4-tuple, so each
/// application port takes two connections (four in all), each seen from the real client
/// address. A port reserved when the socket is bound would let two through in all.
#[test]
fn a_client_address_holds_the_pods_port_range_per_application_port() {
    let bed = TestBed::start();
    let server = bed.pod("server");
    server
        .ns
        .exec(
            "sysctl",
            &["-w", "net.ipv4.ip_local_port_range=40000 40001"],
        )
        .expect("narrow the server pod's ephemeral ports");
    /// Accepts two connections; answers each first byte with the peer's address and holds
    /// the connection until the client closes it.
    async fn hold(l: TcpListener) -> Vec<String> {
        let mut held = Vec::new();
        for _ in 0..2 {
            let (mut s, peer) = l.accept().await.expect("accept");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.expect("first byte");
            s.write_all(format!("{}\n", peer.ip()).as_bytes())
                .await
                .expect("answer");
            held.push((s, peer.ip().to_string()));
        }
        let mut peers = Vec::new();
        for (mut s, peer) in held {
            let _ = s.read_to_end(&mut Vec::new()).await;
            peers.push(peer);
        }
        peers
    }
    let apps = [8080, 8081].map(|port| server.ns.serve(port, hold));
    let answers = bed.pod("client").ns.block_on(async {
        let mut open = Vec::new();
        let mut answers = Vec::new();
        for port in [8080, 8080, 8081, 8081] {
            let once = async {
                let mut s = TcpStream::connect(("10.20.2.10", port)).await?;
                s.write_all(b"x").await?;
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).await? == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                Ok::<_, std::io::Error>((s, String::from_utf8_lossy(&line).into_owned()))
            };
            match tokio::time::timeout(Duration::from_secs(10), once).await {
                Ok(Ok((s, answer))) => {
                    open.push(s);
                    answers.push(format!("{port}: {answer}"));
                }
                Ok(Err(e)) => answers.push(format!("{port}: {e}")),
                Err(_) => answers.push(format!("{port}: no answer within 10 s")),
            }
        }
        answers
    });
    let want: Vec<String> = [8080, 8080, 8081, 8081]
        .iter()
        .map(|p| format!("{p}: 10.20.1.10"))
        .collect();
    assert_eq!(answers, want, "{}", bed.log(1));
    for app in apps {
        assert_eq!(server.ns.join(app), ["10.20.1.10", "10.20.1.10"]);
    }
}

/// Asserts that node `i`'s daemon started with a runtime of `n` worker threads.
fn assert_workers(bed: &TestBed, i: usize, n: usize) {
    let log = bed.log(i);
    let want = format!(" workers={n}");
    assert!(
        log.lines()
            .any(|l| l.contains("starting ztunnel") && l.ends_with(&want)),
        "{log}"
    );
}

#[test]
fn dual_stack_pods_are_captured_over_ipv6_too_with_real_client_addresses_and_probes_pass() {
    let bed = TestBed::builder().pods(testbed::dual_stack_pods()).start();
    assert_workers(&bed, 1, 2);
    for name in ["server", "echo", "legacy-2"] {
        bed.pod(name).ns.serve_dual(8080, apps::whoami_server);
    }
    let (client, server) = (bed.pod("client"), bed.pod("server"));

    // Enrolled to enrolled over IPv6 (cross node and same node) and, in the same bed, IPv4.
    let pcap = bed.dir().join("underlay.pcap");
    let cap = testbed::start_capture(&bed.nodes[0].ns, "ul0", &pcap).unwrap();
    let (cross6, same6, vip6, cross4) = client.ns.block_on(async {
        (
            apps::whoami("fd20:2::10", 8080, MARKER).await,
            apps::whoami("fd20:1::12", 8080, MARKER).await,
            apps::whoami(VIP6, 80, MARKER).await,
            apps::whoami("10.20.2.10", 8080, MARKER).await,
        )
    });
    let captured = testbed::stop_capture(cap, &pcap).unwrap();
    assert_eq!(cross6.unwrap(), "fd20:1::10", "cross node, IPv6");
    assert_eq!(same6.unwrap(), "fd20:1::10", "same node, IPv6");
    assert_eq!(vip6.unwrap(), "fd20:1::10", "the service's IPv6 VIP");
    assert_eq!(cross4.unwrap(), "10.20.1.10", "cross node, IPv4");
    assert!(!captured.marker_seen, "plaintext crossed the underlay");
    assert!(
        captured
            .lines
            .iter()
            .any(|l| l.contains("fd20:2::10.15008")),
        "an IPv6 tunnel to the server pod: {:?}",
        captured.lines
    );
    for l in &captured.lines {
        assert!(l.contains(".15008"), "non-tunnel TCP on the underlay: {l}");
    }
    let log2 = bed.log(1);
    assert!(
        access_lines(&log2)
            .iter()
            .any(|l| l["direction"] == "inbound"
                && l["src_identity"] == "spiffe://cluster.local/ns/demo/sa/client"
                && l["dst_addr"] == "[fd20:2::10]:8080"),
        "an mTLS access line for the IPv6 connection: {log2}"
    );

    // Out of the mesh and into it over IPv6: passthrough, and inbound capture to 15006.
    let plain6 = client
        .ns
        .block_on(apps::whoami("fd20:2::11", 8080, "plain"));
    assert_eq!(plain6.unwrap(), "fd20:1::10", "enrolled to plain");
    let into6 = bed
        .pod("legacy-2")
        .ns
        .block_on(apps::whoami("fd20:2::10", 8080, "plain"));
    assert_eq!(into6.unwrap(), "fd20:2::11", "plain to enrolled");
    let m2 = bed.metrics(1);
    for (direction, want) in [("inbound", 3.0), ("inbound_plaintext", 1.0)] {
        let got = metric(
            &m2,
            "ztunnel_proxied_connections_total",
            &[("direction", direction)],
        );
        assert_eq!(got, want, "{direction}: {m2}");
    }

    // A kubelet-style probe from the node over IPv6 leaves with the IPv6 probe address and is
    // let through uncaptured.
    let probe = bed.nodes[1]
        .ns
        .block_on(apps::whoami("fd20:2::10", 8080, "probe"));
    assert_eq!(probe.unwrap(), "fd7a:7475:6e6e:656c::7f");

    // A packet forwarded through the node that claims the node's address as its source is not
    // given the probe address (IPv6 routes it, where IPv4 drops it as a martian): a pod on the
    // other node sends from node 2's underlay address to the server's application. It reaches
    // the pod with its own source, to be captured, and no handshake completes.
    let spoofer = bed.pod("legacy-1");
    spoofer
        .ns
        .ip(&["-6", "addr", "add", "fd77::2/128", "dev", "lo", "nodad"])
        .unwrap();
    let pcap = bed.dir().join("spoofed.pcap");
    let cap = testbed::start_capture(&server.ns, "eth0", &pcap).unwrap();
    let attempt = spoofer.ns.block_on(async {
        let s = tokio::net::TcpSocket::new_v6()?;
        s.bind("[fd77::2]:0".parse().unwrap())?;
        let to = "[fd20:2::10]:8080".parse().unwrap();
        tokio::time::timeout(Duration::from_secs(2), s.connect(to))
            .await
            .map_err(std::io::Error::other)?
    });
    let captured = testbed::stop_capture(cap, &pcap).unwrap();
    assert!(attempt.is_err(), "no handshake: {attempt:?}");
    assert!(
        captured.lines.iter().any(|l| l.contains("fd77::2.")),
        "the spoofed SYN reached the pod with its own source: {:?}",
        captured.lines
    );
    assert!(
        !captured
            .lines
            .iter()
            .any(|l| l.contains("fd7a:7475:6e6e:656c::7f")),
        "given the probe address: {:?}",
        captured.lines
    );

    // The IPv6 policy route and probe-set entry exist while the pod is enrolled, and DEL
    // removes them with the rest.
    let rule = "fwmark 0x111/0xfff lookup 133";
    let probe_set = |bed: &TestBed| {
        bed.nodes[1]
            .ns
            .exec("nft", &["list", "set", "ip6", "ztunnel_node", "enrolled"])
            .unwrap()
    };
    let rules6 = server.ns.ip(&["-6", "rule", "show"]).unwrap();
    assert!(rules6.contains(rule), "{rules6}");
    assert!(
        probe_set(&bed).contains("fd20:2::10"),
        "{}",
        probe_set(&bed)
    );
    let node = bed.node_of(server);
    let outs = node
        .runtime
        .del(&node.conflist, &server.attachment, Some(&server.result))
        .unwrap();
    assert!(
        outs.len() == 2 && outs.iter().all(|o| o.code == 0),
        "both plugins of the chain succeed: {outs:?}"
    );
    let rules6 = server.ns.ip(&["-6", "rule", "show"]).unwrap();
    assert!(!rules6.contains(rule), "{rules6}");
    assert!(
        !probe_set(&bed).contains("fd20:2::10"),
        "{}",
        probe_set(&bed)
    );
}

#[test]
fn dual_stack_quic_tunnels_carry_both_families_over_udp_15008_only() {
    let bed = TestBed::builder()
        .pods(testbed::dual_stack_pods())
        .transport(Transport::Quic)
        .daemon_env(&[
            ("ZTUNNEL_WORKER_THREADS", "3"),
            ("ZTUNNEL_WORKER_THRADS", "4"),
        ])
        .start();
    // The runtime is sized by the setting (2 by default, not one thread per core); a
    // misspelt setting beside it is named in a warning, not silently ignored.
    assert_workers(&bed, 0, 3);
    let log = bed.log(0);
    // The daemon started again with the allocator's tunable (`ztunnel/src/alloc.rs`).
    assert!(
        log.lines().any(|l| l.contains("starting ztunnel")
            && l.contains("glibc_tunables=\"glibc.malloc.tcache_count=0\"")),
        "{log}"
    );
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no setting reads this environment variable"))
        .collect();
    assert!(
        warned.len() == 1 && warned[0].contains("ZTUNNEL_WORKER_THRADS"),
        "{warned:?}"
    );
    bed.pod("server").ns.serve_dual(8080, apps::whoami_server);

    let pcap = bed.dir().join("underlay.pcap");
    let cap = testbed::start_capture(&bed.nodes[0].ns, "ul0", &pcap).unwrap();
    let (first, again, v4) = bed.pod("client").ns.block_on(async {
        (
            apps::whoami("fd20:2::10", 8080, MARKER).await,
            apps::whoami("fd20:2::10", 8080, MARKER).await,
            apps::whoami("10.20.2.10", 8080, MARKER).await,
        )
    });
    let tcp = testbed::stop_capture(cap, &pcap).unwrap();
    let udp = testbed::read_capture(&pcap, "udp").unwrap();
    assert_eq!(first.unwrap(), "fd20:1::10");
    assert_eq!(again.unwrap(), "fd20:1::10", "pooled");
    assert_eq!(v4.unwrap(), "10.20.1.10", "IPv4 beside IPv6");
    assert!(!tcp.marker_seen, "plaintext crossed the underlay");
    assert!(tcp.lines.is_empty(), "TCP on the underlay: {:?}", tcp.lines);
    assert!(!udp.lines.is_empty(), "the capture saw no QUIC");
    for l in &udp.lines {
        assert!(
            (l.contains("fd20:1::10.") && l.contains("fd20:2::10.15008"))
                || (l.contains("10.20.1.10.") && l.contains("10.20.2.10.15008")),
            "UDP other than the pods' tunnels on the underlay: {l}"
        );
    }
    let m2 = bed.metrics(1);
    for (name, want) in [
        // One per destination address, each on the server pod's endpoint of its family.
        ("ztunnel_quic_connections_accepted_total", 2.0),
        ("ztunnel_hbone_connections_accepted_total", 0.0),
    ] {
        assert_eq!(metric(&m2, name, &[]), want, "{name}: {m2}");
    }
    let m1 = bed.metrics(0);
    assert_eq!(
        metric(&m1, "ztunnel_quic_fallbacks_total", &[]),
        0.0,
        "{m1}"
    );
}

/// A connection from an enrolled pod to the Service's VIP while the Service has no endpoint
/// (its one pod, `server`, does not run): the source's daemon has nowhere to send it and
/// resets it at once, counts it as `outbound_no_route` and logs it; no tunnel is opened.
#[test]
fn a_connection_to_a_service_with_no_endpoint_is_reset_at_the_source() {
    let pods = testbed::default_pods()
        .into_iter()
        .filter(|p| p.name != "server")
        .collect();
    let bed = TestBed::builder().pods(pods).start();
    let outcome = bed.pod("client").ns.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), request(VIP, 80, "hello"))
            .await
            .expect("the connection was neither answered nor ended within 5 s")
    });
    match &outcome {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) => {}
        other => panic!("the connection must be reset: {other:?}"),
    }
    let labels = [("reason", "outbound_no_route")];
    let m = bed.metrics_when(0, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(metric(&m, "ztunnel_refusals_total", &labels), 1.0, "{m}");
    assert_eq!(
        metric(&m, "ztunnel_pool_connections_opened_total", &[]),
        0.0,
        "{m}"
    );
    let log = bed.log(0);
    assert!(log.contains("no route; refused"), "{log}");
    let dst = format!("{VIP}:80");
    let line = access_lines(&log)
        .into_iter()
        .find(|l| l["dst_addr"] == dst.as_str())
        .unwrap_or_else(|| panic!("no access line for {dst}:\n{log}"));
    assert_eq!(
        line["error"], "service demo/server has no endpoint",
        "{line}"
    );
}

/// A connection from `pod` to `dst` is reset, at once or as soon as it is open, within 5 s.
fn assert_reset(pod: &testbed::Pod, dst: &'static str) {
    let outcome = pod.ns.block_on(async move {
        let exchange = async {
            // The reset may come before the connect is seen done.
            let mut s = TcpStream::connect(dst).await?;
            s.read(&mut [0u8; 1]).await
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .unwrap_or_else(|_| panic!("{dst}: neither reset nor ended within 5 s"))
    });
    match &outcome {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("{dst}: the connection must be reset: {other:?}"),
    }
}

/// A pod's connection straight to its daemon's outbound listener over loopback
/// (`127.0.0.1:15001`, `127.0.0.2:15001`: loopback is never captured, so its original
/// destination is the listener itself) is reset at once, counted once each; it is never passed
/// through to that destination, which would be the same listener again, each level holding
/// sockets until the pod's ports run out.
#[test]
fn a_pods_connection_to_its_outbound_listener_over_loopback_is_reset_not_looped() {
    let bed = TestBed::builder().start();
    for dst in ["127.0.0.1:15001", "127.0.0.2:15001"] {
        assert_reset(bed.pod("client"), dst);
    }
    let labels = [("reason", "outbound_no_original_dst")];
    let m = bed.metrics_when(0, "ztunnel_refusals_total", &labels, 2.0);
    assert_eq!(metric(&m, "ztunnel_refusals_total", &labels), 2.0, "{m}");
    for direction in ["passthrough", "outbound"] {
        let labels = [("direction", direction)];
        expect_metric(&m, "ztunnel_proxied_connections_total", &labels, 0.0);
    }
    let log = bed.log(0);
    assert!(
        log.contains("it is to the outbound listener itself"),
        "{log}"
    );
}

/// A pod on the same bridge sends a connection to the server pod's MAC address but to another
/// IP address (a route through the server pod, as a crafted frame would): the server's
/// capture takes it all the same, and its daemon refuses it as to no workload
/// (`inbound_plaintext_unknown_destination`), reset at once, rather than carrying it on from
/// inside the server pod to that address with the client's address as its source.
#[test]
fn plaintext_captured_in_a_pod_but_addressed_elsewhere_reaches_no_one() {
    let bed = TestBed::start();
    let legacy = bed.pod("legacy-2");
    legacy
        .ns
        .ip(&["route", "add", "10.99.0.1/32", "via", "10.20.2.10"])
        .unwrap();
    assert_reset(legacy, "10.99.0.1:8080");
    let labels = [("reason", "inbound_plaintext_unknown_destination")];
    let m = bed.metrics_when(1, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(metric(&m, "ztunnel_refusals_total", &labels), 1.0, "{m}");
    let labels = [("direction", "inbound_plaintext")];
    expect_metric(&m, "ztunnel_proxied_connections_total", &labels, 0.0);
    let log = bed.log(1);
    assert!(log.contains("10.99.0.1:8080"), "{log}");
}
