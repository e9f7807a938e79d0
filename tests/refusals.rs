//! Captured connections the daemons refuse, on the two-node test bed (`harness/mesh.rs`):
//! plaintext to `b` from `c` (outside the mesh) that reaches `b`'s daemon without a readable
//! original destination, to an address of `b` that is no workload's, to a daemon port, or to a
//! closed application port; an outbound connection of `a`'s workload that reaches `a`'s daemon
//! without a readable original destination, or whose destination is a mesh workload's daemon
//! port; and, with a CA that cannot be reached, a workload without a certificate, as the
//! source of an outbound connection and as the destination of a tunnel; with a CA that
//! refuses the workload's certificate, a daemon that stays ready and counts the refusal. Each is reset, reaches
//! no application, and is counted in `ztunnel_refusals_total{reason}` and logged. Needs root,
//! `ip` and `nft`.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::{self, access_lines, metric, metric_or_zero};
use ztunnel_e2e::mesh::{Mesh, NodeOptions, A_IP, B_IP, C_IP};
use ztunnel_e2e::netns::Netns;

/// Connects from `ns` to `dst`, writes a few bytes and reads: the error the connection ended
/// with, or how many bytes it read (0 at a clean end). Bounded: a connection that neither
/// answers nor ends within 5 s fails the test.
fn exchange(ns: &Netns, dst: SocketAddr) -> std::io::Result<usize> {
    ns.block_on(async move {
        let io = async {
            let mut s = TcpStream::connect(dst).await?;
            s.write_all(b"hello").await?;
            let mut buf = [0u8; 64];
            s.read(&mut buf).await
        };
        tokio::time::timeout(Duration::from_secs(5), io)
            .await
            .expect("the connection was neither answered nor ended within 5 s")
    })
}

/// Asserts that the connection was reset (a refusal), not answered nor ended cleanly.
fn assert_reset(outcome: &std::io::Result<usize>) {
    match outcome {
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        other => panic!("the connection must be reset: {other:?}"),
    }
}

/// Binds the application's listener on `port` in `ns` (all addresses).
fn app(ns: &Netns, port: u16) -> TcpListener {
    ns.block_on(apps::listen(port))
}

/// Asserts that the application accepted no connection within a second from now (called once
/// the refusal has been counted, so after any forwarding would have begun).
fn assert_nothing_accepted(ns: &Netns, l: TcpListener) {
    let accepted = ns.block_on(async move {
        tokio::time::timeout(Duration::from_secs(1), l.accept())
            .await
            .ok()
            .map(|r| r.map(|(_, peer)| peer))
    });
    assert!(
        accepted.is_none(),
        "the application saw a connection: {accepted:?}"
    );
}

/// Waits (up to 5 s) until the daemon in `ns` counts `reason` once; asserts it.
fn assert_refused_once(ns: &Netns, reason: &str) -> String {
    let labels = [("reason", reason)];
    let m = Mesh::metrics_when(ns, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(metric(&m, "ztunnel_refusals_total", &labels), 1.0, "{m}");
    m
}

/// The access-log line of the refused connection to `dst`, with its error.
fn access_error(log: &str, dst: &str) -> String {
    let lines = access_lines(log);
    let line = lines
        .iter()
        .find(|l| l["dst_addr"] == dst)
        .unwrap_or_else(|| panic!("no access line for {dst}:\n{log}"));
    line["error"].as_str().unwrap_or_default().to_owned()
}

/// Plaintext from outside the mesh to one of `b`'s daemon ports (15001, as captured to 15006)
/// is refused as recursion: reset, never handed to a listener of the daemon's own, counted,
/// and its access-log line says why.
#[test]
fn plaintext_to_a_daemon_port_is_refused_as_recursion() {
    let mesh = Mesh::builder().start();
    let dst = format!("{B_IP}:15001");
    assert_reset(&exchange(&mesh.c, dst.parse().unwrap()));
    let m = assert_refused_once(&mesh.b, "inbound_plaintext_recursion");
    for reason in ["outbound_no_original_dst", "outbound_unknown_source"] {
        assert_eq!(
            metric(&m, "ztunnel_refusals_total", &[("reason", reason)]),
            0.0,
            "the outbound listener never saw it: {m}"
        );
    }
    assert_eq!(
        metric(&m, "ztunnel_proxied_connections_total", &[]),
        0.0,
        "{m}"
    );
    let log = mesh.b_daemon.log();
    assert_eq!(access_error(&log, &dst), "recursion", "{log}");
}

/// Plaintext from outside the mesh to a port of `b` where no application listens: the daemon
/// accepted it (it was captured), cannot reach the application, and resets the client;
/// counted, and its access-log line carries the dial's error.
#[test]
fn plaintext_to_a_closed_application_port_is_reset() {
    let mesh = Mesh::builder().start();
    let dst = format!("{B_IP}:8081");
    assert_reset(&exchange(&mesh.c, dst.parse().unwrap()));
    assert_refused_once(&mesh.b, "inbound_plaintext_app_unreachable");
    let log = mesh.b_daemon.log();
    let error = access_error(&log, &dst);
    assert!(
        error.contains("refused"),
        "the dial's error: {error}\n{log}"
    );
}

/// Plaintext from outside the mesh to an address of `b` that no workload has (a second
/// address on its interface) is reset by the daemon: the application listening on every
/// address never sees it; counted and logged.
#[test]
fn plaintext_to_an_address_of_no_local_workload_is_reset() {
    let mesh = Mesh::builder().start();
    mesh.b
        .ip(&["addr", "add", "10.77.0.98/24", "dev", "eth0"])
        .expect("a second address");
    let l = app(&mesh.b, 8080);
    assert_reset(&exchange(&mesh.c, "10.77.0.98:8080".parse().unwrap()));
    assert_refused_once(&mesh.b, "inbound_plaintext_unknown_destination");
    assert_nothing_accepted(&mesh.b, l);
    let log = mesh.b_daemon.log();
    assert!(
        log.contains("inbound plaintext to an unknown workload; refused"),
        "{log}"
    );
}

/// A connection that reaches the plaintext listener (15006) without passing the capture's
/// redirection has no original destination to read (here `b` exempts `c`'s connections to
/// 15006 from connection tracking, so there is none): it is reset, counted and logged.
#[test]
fn a_plaintext_connection_that_was_not_redirected_is_reset() {
    let mesh = Mesh::builder().start();
    mesh.b
        .nft(&format!(
            "table inet zt_untracked {{
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    ip saddr {C_IP} tcp dport 15006 notrack
  }}
  chain output {{
    type filter hook output priority raw; policy accept;
    ip daddr {C_IP} tcp sport 15006 notrack
  }}
}}
"
        ))
        .expect("the untracked rules");
    assert_reset(&exchange(&mesh.c, format!("{B_IP}:15006").parse().unwrap()));
    let m = assert_refused_once(&mesh.b, "inbound_plaintext_no_original_dst");
    assert_eq!(
        metric(&m, "ztunnel_proxied_connections_total", &[]),
        0.0,
        "{m}"
    );
    let log = mesh.b_daemon.log();
    assert!(
        log.contains("inbound plaintext connection was not redirected; refused"),
        "{log}"
    );
}

/// A connection of `a`'s workload that reaches the outbound listener (15001) without passing
/// the capture's redirection (to `127.0.0.2`, exempted from connection tracking in `a`) has no
/// original destination to read: it is reset, counted and logged, and nothing is tunnelled.
#[test]
fn an_outbound_connection_that_was_not_redirected_is_reset() {
    let mesh = Mesh::builder().start();
    mesh.a
        .nft(
            "table inet zt_untracked {
  chain prerouting {
    type filter hook prerouting priority raw; policy accept;
    ip daddr 127.0.0.2 tcp dport 15001 notrack
    ip saddr 127.0.0.2 tcp sport 15001 notrack
  }
  chain output {
    type filter hook output priority raw; policy accept;
    ip daddr 127.0.0.2 tcp dport 15001 notrack
    ip saddr 127.0.0.2 tcp sport 15001 notrack
  }
}
",
        )
        .expect("the untracked rules");
    assert_reset(&exchange(&mesh.a, "127.0.0.2:15001".parse().unwrap()));
    let m = assert_refused_once(&mesh.a, "outbound_no_original_dst");
    assert_eq!(
        metric(&m, "ztunnel_pool_connections_opened_total", &[]),
        0.0,
        "{m}"
    );
    let log = mesh.a_daemon.log();
    assert!(
        log.contains("outbound connection was not redirected; refused"),
        "{log}"
    );
}

/// An outbound connection of `a`'s workload to a mesh workload's daemon port (`b`'s 15006)
/// has nowhere to go: `a`'s daemon resets it without opening a tunnel (it would loop), counts
/// it and logs it; `b`'s daemon sees nothing of it.
#[test]
fn an_outbound_connection_with_no_route_is_reset_at_the_source() {
    let mesh = Mesh::builder().start();
    let dst = format!("{B_IP}:15006");
    assert_reset(&exchange(&mesh.a, dst.parse().unwrap()));
    let ma = assert_refused_once(&mesh.a, "outbound_no_route");
    assert_eq!(
        metric(&ma, "ztunnel_pool_connections_opened_total", &[]),
        0.0,
        "{ma}"
    );
    let log = mesh.a_daemon.log();
    assert!(log.contains("no route; refused"), "{log}");
    let error = access_error(&log, &dst);
    assert!(error.contains("would loop"), "{error}\n{log}");
    let mb = Mesh::metrics(&mesh.b);
    assert_eq!(
        metric(&mb, "ztunnel_hbone_connections_accepted_total", &[]),
        0.0,
        "{mb}"
    );
    assert_eq!(
        metric(&mb, "ztunnel_proxied_connections_total", &[]),
        0.0,
        "{mb}"
    );
}

/// A CA address where nothing listens (in the daemon's own namespace): every signing
/// request fails at once.
const NO_CA: &str = "127.0.0.1:15012";

/// Where the test's own refusing CA listens, in `b`'s namespace.
const REFUSING_CA: &str = "127.0.0.1:15013";

/// `b`'s daemon asks a CA that cannot be reached: it is not ready, and its workload has no
/// certificate. A tunnel from `a`'s workload is reset by `b` before any TLS (counted as
/// `inbound_no_certificate`, logged); `a`'s daemon, whose tunnel failed, resets its client;
/// `b`'s application sees nothing.
#[test]
fn a_tunnel_to_a_workload_without_a_certificate_is_refused() {
    let b = NodeOptions {
        ca_address: Some(NO_CA.into()),
        ..Default::default()
    };
    let mesh = Mesh::builder().b(b).start();
    let (status, _) = daemon::http(&mesh.b, "GET", "127.0.0.1:15021", "/healthz/ready")
        .expect("the readiness endpoint answers");
    assert_ne!(status, 200, "a daemon whose CA is unreachable is not ready");
    let l = app(&mesh.b, 8080);
    assert_reset(&exchange(&mesh.a, format!("{B_IP}:8080").parse().unwrap()));
    let mb = assert_refused_once(&mesh.b, "inbound_no_certificate");
    assert_eq!(
        metric(
            &mb,
            "ztunnel_refusals_total",
            &[("reason", "inbound_tls_handshake")]
        ),
        0.0,
        "refused before TLS: {mb}"
    );
    assert_refused_once(&mesh.a, "outbound_tunnel_failed");
    assert_nothing_accepted(&mesh.b, l);
    let log = mesh.b_daemon.log();
    assert!(log.contains("no certificate; tunnel refused"), "{log}");
}

/// `b`'s daemon asks a CA that cannot be reached, so its workload has no certificate: an
/// outbound connection of that workload (to `a`'s application) is reset by `b`'s daemon
/// without any tunnel (never sent in plaintext), counted as `outbound_no_certificate` and
/// logged; `a`'s application sees nothing.
#[test]
fn an_outbound_connection_of_a_workload_without_a_certificate_is_reset() {
    let b = NodeOptions {
        ca_address: Some(NO_CA.into()),
        ..Default::default()
    };
    let mesh = Mesh::builder().b(b).start();
    let l = app(&mesh.a, 8080);
    assert_reset(&exchange(&mesh.b, format!("{A_IP}:8080").parse().unwrap()));
    let mb = assert_refused_once(&mesh.b, "outbound_no_certificate");
    assert_eq!(
        metric(&mb, "ztunnel_pool_connections_opened_total", &[]),
        0.0,
        "{mb}"
    );
    assert_nothing_accepted(&mesh.a, l);
    let ma = Mesh::metrics(&mesh.a);
    assert_eq!(
        metric(&ma, "ztunnel_hbone_connections_accepted_total", &[]),
        0.0,
        "{ma}"
    );
    let log = mesh.b_daemon.log();
    assert!(log.contains("no certificate; refused"), "{log}");
}

/// A CA that answers and refuses `b`'s workload its certificate (a `ztunnel ca` issuing for
/// another trust domain only) makes that one identity's problem, never the node's: `b`'s
/// daemon becomes ready, counts the refusal against that identity
/// (`ztunnel_certificate_refusals_total{identity}`) and logs it, and a tunnel to the workload
/// is refused before TLS (`inbound_no_certificate`) while its application sees nothing.
#[test]
fn a_certificate_the_ca_refuses_leaves_the_daemon_ready_and_is_counted() {
    let b = NodeOptions {
        ca_address: Some(REFUSING_CA.into()),
        ..Default::default()
    };
    let mesh = Mesh::builder().b(b).start();
    let tokens = mesh.dir.path().join("refusing-ca-tokens");
    std::fs::write(&tokens, "a-token\n").unwrap();
    let args: Vec<String> = [
        "ca",
        "--ca-dir",
        &mesh.ca_dir.display().to_string(),
        "--trust-domain",
        "other.local",
        "--listen",
        REFUSING_CA,
        "--token-file",
        &tokens.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut ca = daemon::Process::start(&mesh.b, "refusing-ca", mesh.dir.path(), &args, &[])
        .expect("start the CA");
    let server = [("identity", "spiffe://cluster.local/ns/demo/sa/server")];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = Mesh::metrics(&mesh.b);
        let refused = metric_or_zero(&m, "ztunnel_certificate_refusals_total", &server);
        let (ready, _) = daemon::http(&mesh.b, "GET", "127.0.0.1:15021", "/healthz/ready")
            .expect("the readiness endpoint answers");
        if refused >= 1.0 && ready == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "refusals {refused}, readiness {ready}; CA alive: {}\n{}\n{}",
            ca.alive(),
            ca.log(),
            mesh.b_daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = mesh.b_daemon.log();
    assert!(log.contains("the CA refused a certificate"), "{log}");
    let l = app(&mesh.b, 8080);
    assert_reset(&exchange(&mesh.a, format!("{B_IP}:8080").parse().unwrap()));
    assert_refused_once(&mesh.b, "inbound_no_certificate");
    assert_nothing_accepted(&mesh.b, l);
}
