//! HBONE data-path benchmarks, each beside raw loopback TCP measured in the same run.
//! See `benches/README.md` for how to run and read them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::net::TcpStream;
use ztunnel::hbone::client;
use ztunnel::hbone::early::Early;
use ztunnel::net::ConnectOptions;
use ztunnel_benches::{pull, push, round_trip, Fixture};

const MIB: usize = 1024 * 1024;

fn throughput(c: &mut Criterion) {
    let f = Fixture::new();
    let mut g = c.benchmark_group("throughput_1_stream");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    let len = 64 * MIB;
    g.throughput(Throughput::Bytes(len as u64));
    g.bench_function("raw_tcp", |b| b.iter(|| f.rt.block_on(push(f.sink, len))));
    g.bench_function("hbone", |b| {
        b.iter(|| f.rt.block_on(push(f.via_tunnel_sink, len)))
    });
    g.bench_function("hbone_quic", |b| {
        b.iter(|| f.rt.block_on(push(f.via_quic_sink, len)))
    });
    g.bench_function("relay_2hops", |b| {
        b.iter(|| f.rt.block_on(push(f.via_relay_sink, len)))
    });
    g.finish();

    // The other way: the application on the tunnel's server side sends, and the inbound
    // daemon's send path (its HTTP/2 send accounting, QUIC's send window) carries it.
    let mut g = c.benchmark_group("throughput_1_stream_download");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(len as u64));
    for (name, addr) in [
        ("raw_tcp", f.source),
        ("hbone", f.via_tunnel_source),
        ("hbone_quic", f.via_quic_source),
        ("relay_2hops", f.via_relay_source),
    ] {
        g.bench_function(name, |b| b.iter(|| f.rt.block_on(pull(addr, len))));
    }
    g.finish();

    let mut g = c.benchmark_group("throughput_8_streams");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    let each = 16 * MIB;
    g.throughput(Throughput::Bytes((8 * each) as u64));
    for (name, addr) in [
        ("raw_tcp", f.sink),
        ("hbone", f.via_tunnel_sink),
        ("hbone_quic", f.via_quic_sink),
        ("relay_2hops", f.via_relay_sink),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                f.rt.block_on(async {
                    let tasks: Vec<_> = (0..8).map(|_| tokio::spawn(push(addr, each))).collect();
                    for t in tasks {
                        t.await.expect("stream");
                    }
                })
            })
        });
    }
    g.finish();
}

fn request_response(c: &mut Criterion) {
    let f = Fixture::new();
    let mut g = c.benchmark_group("rr_1kib");
    let msg = vec![7u8; 1024];
    for (name, addr) in [
        ("raw_tcp", f.echo),
        ("hbone", f.via_tunnel_echo),
        ("hbone_quic", f.via_quic_echo),
        ("relay_2hops", f.via_relay_echo),
    ] {
        let mut s = f.rt.block_on(async {
            let s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            s
        });
        let mut reply = vec![0u8; 1024];
        g.bench_function(name, |b| {
            b.iter(|| f.rt.block_on(round_trip(&mut s, &msg, &mut reply)))
        });
    }
    g.finish();
}

fn new_connections(c: &mut Criterion) {
    let f = Fixture::new();
    let mut g = c.benchmark_group("new_connection");
    // A new TCP connection, one byte echoed, closed: directly, and through a warm pooled
    // tunnel (a new stream, no handshake).
    for (name, addr) in [
        ("raw_tcp", f.echo),
        ("hbone_pooled", f.via_tunnel_echo),
        ("hbone_quic_pooled", f.via_quic_echo),
        ("relay_2hops", f.via_relay_echo),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                f.rt.block_on(async {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    s.set_nodelay(true).unwrap();
                    let mut r = [0u8; 1];
                    round_trip(&mut s, b"x", &mut r).await;
                })
            })
        });
    }
    // A fresh mutual-TLS tunnel connection each time: TCP, TLS 1.3 handshake with both
    // certificates checked, HTTP/2 handshake, CONNECT, one byte echoed.
    let (tls, opts) = dial_settings(&f);
    g.bench_function("hbone_fresh_mtls", |b| {
        b.iter_custom(|iters| fresh_tunnels(&f, iters))
    });
    // The same where both ends check the other's chain against a revocation list of 10 000
    // serials of their CA (`--crl-path`), as a large CA's list would be.
    let with_crl = Fixture::with_revoked(10_000);
    g.bench_function("hbone_fresh_mtls_crl_10k", |b| {
        b.iter_custom(|iters| fresh_tunnels(&with_crl, iters))
    });
    // The same over QUIC: one UDP handshake (TLS 1.3, both certificates checked), a stream
    // with its header and the byte behind it, the echo.
    let quic_config = ztunnel::hbone::quic::client_config(&tls).expect("QUIC config");
    let quic_ep = f.rt.block_on(async {
        ztunnel::hbone::quic::endpoint(None, "127.0.0.1:0".parse().unwrap(), None, None)
            .expect("QUIC endpoint")
    });
    let header = ztunnel::hbone::quic::header(f.echo, &Default::default());
    g.bench_function("hbone_quic_fresh_mtls", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let conn =
                        ztunnel::hbone::quic::connect(&quic_ep, f.tunnel, quic_config.clone())
                            .await
                            .expect("QUIC tunnel");
                    let mut x = Early::of(Some(bytes::Bytes::from_static(b"x")));
                    let (mut tx, mut rx) =
                        ztunnel::hbone::quic::open_stream(&conn, &header, &mut x)
                            .await
                            .expect("stream");
                    let mut got = [0u8; 1];
                    rx.read_exact(&mut got).await.expect("echo");
                    assert_eq!(&got, b"x");
                    let _ = tx.finish();
                    conn.close(0u32.into(), b"done");
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    // The rate of fresh tunnels with handshakes in flight concurrently, as a node sees when
    // many pods start talking at once: tunnels per second, both cores busy.
    let mut g = c.benchmark_group("fresh_mtls_rate");
    const IN_FLIGHT: usize = 8;
    g.throughput(Throughput::Elements(IN_FLIGHT as u64));
    g.bench_function("hbone_fresh_mtls_x8", |b| {
        b.iter(|| {
            f.rt.block_on(async {
                let tasks: Vec<_> = (0..IN_FLIGHT)
                    .map(|_| {
                        let (tls, tunnel, echo) = (tls.clone(), f.tunnel, f.echo);
                        tokio::spawn(fresh_tunnel(tunnel, echo, tls, opts))
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            })
        })
    });
    g.finish();
}

/// `iters` fresh tunnels to `f`'s echo server, each its own TCP, TLS and HTTP/2 handshakes
/// and one byte echoed on one stream; how long they took.
fn fresh_tunnels(f: &Fixture, iters: u64) -> Duration {
    let (tls, opts) = dial_settings(f);
    f.rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            fresh_tunnel(f.tunnel, f.echo, tls.clone(), opts).await;
        }
        start.elapsed()
    })
}

/// How a benchmark dials `f`'s tunnel: the client's TLS configuration and connect options.
fn dial_settings(f: &Fixture) -> (Arc<rustls::ClientConfig>, ConnectOptions) {
    let tls = f
        .client_cert
        .client_config(std::slice::from_ref(&f.server_id));
    let opts = ConnectOptions {
        mark: None,
        timeout: Duration::from_secs(5),
    };
    (tls, opts)
}

/// One fresh tunnel to `tunnel` (TCP, TLS and HTTP/2 handshakes), a stream to `echo`, one
/// byte echoed.
async fn fresh_tunnel(
    tunnel: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    opts: ConnectOptions,
) {
    let (send, conn) = client::connect(tunnel, tls, opts).await.expect("tunnel");
    let driver = tokio::spawn(conn);
    let req = client::connect_request(echo, &Default::default()).unwrap();
    let (mut tx, mut rx) = client::open_stream(send, req).await.expect("stream");
    tx.send_data(bytes::Bytes::from_static(b"x"), true).unwrap();
    let got = rx.data().await.expect("echo").expect("data");
    assert_eq!(&got[..], b"x");
    drop((tx, rx));
    driver.abort();
}

criterion_group!(benches, throughput, request_response, new_connections);
criterion_main!(benches);
