//! The inbound tunnel when the other side stalls, in-process and without root.
//!
//! - A peer that stops reading: an authenticated HTTP/2 peer (its certificate from the node's
//!   CA, its policy allowing it) opens streams to an application that writes without end, then
//!   reads nothing more from its connection. What the daemon takes from the application for
//!   that peer and cannot send stays within the node's buffered-bytes budget (plus what the
//!   kernel and TLS hold for the one connection), instead of a send buffer per stream.
//! - A CA that does not answer: a connection waiting for its destination's certificate is
//!   refused at the handshakes' deadline rather than holding its place for ever.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket};

use super::loopback_tests::{DAY, SERVER_IP};
use super::{ProxyInputs, TunnelLimits};
use crate::ca::{issue, LocalCa};
use crate::identity::Identity;

/// An application that, once `go` is set, writes to each client until the client is gone.
async fn source(l: TcpListener, go: tokio::sync::watch::Receiver<bool>) {
    let chunk = vec![7u8; 64 * 1024];
    while let Ok((mut s, _)) = l.accept().await {
        let (chunk, mut go) = (chunk.clone(), go.clone());
        tokio::spawn(async move {
            let _ = go.wait_for(|go| *go).await;
            while s.write_all(&chunk).await.is_ok() {}
        });
    }
}

/// A transport whose reads stop for good once `stalled` is set: a peer that no longer reads
/// its socket (its writes still go out).
struct Stall<T> {
    io: T,
    stalled: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Stall<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.stalled.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stall<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What the inbound proxy has read from the application for its streams, in all.
fn taken_from_apps(pi: &ProxyInputs) -> u64 {
    pi.connections.rows().iter().map(|r| r.bytes_sent).sum()
}

/// The inbound proxy on a listener of its own, with `limits` and certificates from `signer`.
fn inbound(
    signer: Arc<dyn crate::identity::CertSigner>,
    limits: TunnelLimits,
) -> (Arc<ProxyInputs>, SocketAddr) {
    let l = crate::net::listen(SocketAddr::new(SERVER_IP.parse().unwrap(), 0)).unwrap();
    let tunnel = l.local_addr().unwrap();
    let (drain, pi) = super::loopback_tests::inbound(signer, l, false, limits);
    // The proxy never drains during a test.
    std::mem::forget(drain);
    (pi, tunnel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_holds_no_more_than_the_node_budget() {
    const STREAMS: usize = 64;
    const LIMIT: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(LocalCa::load_or_create(dir.path(), "cluster.local").unwrap());
    let limits = TunnelLimits {
        buffered_bytes: LIMIT,
        ..Default::default()
    };
    let (pi, tunnel) = inbound(ca.clone(), limits);
    let app_l = TcpListener::bind((SERVER_IP, 0)).await.unwrap();
    let app = app_l.local_addr().unwrap();
    let (go, wait) = tokio::sync::watch::channel(false);
    tokio::spawn(source(app_l, wait));

    // The peer: the client workload's certificate, a socket that takes little, and windows
    // as large as HTTP/2 allows, so that only the daemon's own limits hold it back.
    let client: Identity = "spiffe://cluster.local/ns/t/sa/client".parse().unwrap();
    let server: Identity = "spiffe://cluster.local/ns/t/sa/server".parse().unwrap();
    let cert = issue(&ca, &client, DAY).unwrap();
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(tunnel).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(tunnel.ip().into());
    let tls = tokio_rustls::TlsConnector::from(cert.client_config(&[server]))
        .connect(name, tcp)
        .await
        .unwrap();
    let stalled = Arc::new(AtomicBool::new(false));
    let io = Stall {
        io: tls,
        stalled: stalled.clone(),
    };
    let (mut sender, conn) = h2::client::Builder::new()
        .initial_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, Bytes>(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut held = Vec::new();
    for _ in 0..STREAMS {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(app.to_string())
            .body(())
            .unwrap();
        sender = sender.ready().await.unwrap();
        let (response, send) = sender.send_request(req, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        held.push((send, response));
    }
    stalled.store(true, Ordering::Relaxed);
    go.send_replace(true);

    // Wait until the proxy takes no more from the applications.
    let mut last = taken_from_apps(&pi);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = taken_from_apps(&pi);
        if now == last || tokio::time::Instant::now() > deadline {
            break;
        }
        last = now;
    }
    assert_eq!(pi.connections.rows().len(), STREAMS, "every stream is open");
    // The budget (the connection's floor within it: its source holds nothing else), the chunk
    // each stream has read and waits to send (256 KiB at most), and what the kernel and TLS
    // hold for the one connection (the daemon's send buffer, autotuned up to 4 MiB, and the
    // peer's small one). Without the count, h2 holds a send buffer (1 MiB) per stream.
    let bound = (LIMIT + STREAMS * 256 * 1024 + 8 * 1024 * 1024) as u64;
    assert!(
        last <= bound,
        "the proxy took {last} bytes for a peer that reads nothing (at most {bound})"
    );
    drop(held);
}

/// A CA that never answers.
struct Silent;

impl crate::identity::CertSigner for Silent {
    fn sign(
        &self,
        _: ztunnel_proto::ca::SignRequest,
    ) -> futures::future::BoxFuture<
        '_,
        Result<ztunnel_proto::ca::SignResponse, crate::identity::SignError>,
    > {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_waiting_for_a_certificate_is_refused_at_the_handshake_deadline() {
    let (pi, tunnel) = inbound(Arc::new(Silent), TunnelLimits::default());
    let mut tcp = tokio::net::TcpStream::connect(tunnel).await.unwrap();
    // Its first bytes, so that only the certificate is awaited.
    tcp.write_all(&[0x16]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pi.handshakes.held(), 1, "waiting, its place held");
    let mut buf = [0u8; 16];
    let within = super::HANDSHAKE_TIMEOUT + Duration::from_secs(5);
    let ended = tokio::time::timeout(within, tokio::io::AsyncReadExt::read(&mut tcp, &mut buf));
    assert!(ended.await.is_ok(), "still waiting after {within:?}");
    assert_eq!(pi.handshakes.held(), 0, "its place given back");
    let labels = crate::metrics::ReasonLabels {
        reason: crate::refusal::Reason::InboundNoCertificate.label(),
    };
    assert_eq!(pi.metrics.refusals.get_or_create(&labels).get(), 1);
}
