//! The benchmark fixture: loopback applications and the tunnel between them, in-process.
//!
//! Data path measured (HBONE): client → outbound listener (127.0.0.1) → pooled mTLS HTTP/2
//! stream → the daemon's real inbound proxy (127.0.0.2, workload `server`) → application
//! (127.0.0.2). Both sides are the daemon's own handlers (one in-process node serving both
//! workloads); a table of redirects ([`ztunnel::net::sockets::Redirects`]) stands in for the
//! capture rules, so no root or nftables is needed. The baseline is
//! the same client talking to the same application directly over loopback TCP, in the same run.
//! The QUIC path is the same with a pool that dials QUIC (UDP, the tunnel's port) and the
//! daemon's inbound QUIC server. A third path relays plain TCP through the same hops
//! (`relay`), to show what the layout costs without any tunnel work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use ztunnel::ca::{issue, LocalCa};
use ztunnel::discovery::Discovery;
use ztunnel::hbone::consts::HBONE_PORT;
use ztunnel::hbone::pool::{Pool, PoolSettings, QuicSettings};
use ztunnel::identity::crl::{Crls, Revocation};
use ztunnel::identity::{Identity, WorkloadCert};
use ztunnel::metrics::Metrics;
use ztunnel::net::sockets::Redirects;
use ztunnel::net::ConnectOptions;
use ztunnel::proxy::ProxyInputs;

pub const SERVER_IP: &str = "127.0.0.2";
const DAY: Duration = Duration::from_secs(86400);

/// Applications and tunnel endpoints of one benchmark run.
pub struct Fixture {
    pub rt: Runtime,
    /// Reads until EOF, then answers one byte.
    pub sink: SocketAddr,
    /// Echoes everything.
    pub echo: SocketAddr,
    /// Sends as many bytes as the client asks for ([`pull`]), then closes.
    pub source: SocketAddr,
    /// Tunnel entry to `sink`, `echo` and `source`.
    pub via_tunnel_sink: SocketAddr,
    pub via_tunnel_echo: SocketAddr,
    pub via_tunnel_source: SocketAddr,
    /// The same over QUIC.
    pub via_quic_sink: SocketAddr,
    pub via_quic_echo: SocketAddr,
    pub via_quic_source: SocketAddr,
    /// Plain TCP relayed twice (`relay`): the tunnel's loopback crossings and nothing else.
    pub via_relay_sink: SocketAddr,
    pub via_relay_echo: SocketAddr,
    pub via_relay_source: SocketAddr,
    /// The inbound tunnel listener (for fresh-handshake benchmarks).
    pub tunnel: SocketAddr,
    pub client_cert: Arc<WorkloadCert>,
    pub server_id: Identity,
    _dir: tempfile::TempDir,
}

fn yaml() -> String {
    format!(
        "trustDomain: cluster.local
namespaces:
  - name: bench
    labels: {{ztunnel.dev/dataplane-mode: ambient}}
workloads:
  - {{uid: c, name: client, namespace: bench, serviceAccount: client, node: bench, ips: [127.0.0.1], protocol: HBONE}}
  - {{uid: s, name: server, namespace: bench, serviceAccount: server, node: bench, ips: [{SERVER_IP}], protocol: HBONE}}
"
    )
}

async fn sink(l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    let _ = s.write_all(b"k").await;
                    return;
                }
            }
        });
    }
}

/// Reads the number of bytes wanted (8 bytes, big-endian), sends them, and closes.
async fn source(l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let Ok(mut left) = s.read_u64().await else {
                return;
            };
            let buf = vec![0xa5u8; 256 * 1024];
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = s.shutdown().await;
        });
    }
}

async fn echo(l: TcpListener) {
    loop {
        let Ok((s, _)) = l.accept().await else { return };
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Accepts connections and relays each, as plain TCP, to `to`: two of these in a row make the
/// same three loopback crossings as the tunnel (application → source daemon → destination
/// daemon → application) with no TLS, no HTTP/2 and no policy. What a relay chain adds to raw
/// TCP is what this single-host layout costs by itself; what the tunnel adds beyond it is its
/// own.
async fn relay(l: TcpListener, to: SocketAddr) {
    loop {
        let Ok((a, _)) = l.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let _ = a.set_nodelay(true);
            let Ok(b) = TcpStream::connect(to).await else {
                return;
            };
            let _ = b.set_nodelay(true);
            // One task per direction, as the tunnel's copy loop, with a buffer as large as
            // the one it grows to for bulk flows.
            let (ar, mut aw) = a.into_split();
            let (br, mut bw) = b.into_split();
            let big = |r| tokio::io::BufReader::with_capacity(256 << 10, r);
            tokio::spawn(async move {
                let _ = tokio::io::copy_buf(&mut big(br), &mut aw).await;
                let _ = aw.shutdown().await;
            });
            let _ = tokio::io::copy_buf(&mut big(ar), &mut bw).await;
            let _ = bw.shutdown().await;
        });
    }
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with_revoked(0)
    }

    /// A fixture whose daemon checks every peer, at both ends, against a revocation list of
    /// `revoked` serial numbers of its CA (none is configured when `revoked` is 0).
    pub fn with_revoked(revoked: usize) -> Fixture {
        // As the daemon does at start (see `ztunnel::alloc`).
        ztunnel::alloc::tune();
        // The daemon always has a subscriber (at `info` by default); without one, every span
        // of h2 and rustls would take tracing's `log` fallback, a cost the daemon never pays.
        // Events are formatted, as the daemon's are, and thrown away.
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(std::io::sink)
            .try_init();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = LocalCa::load_or_create(dir.path(), "cluster.local").expect("CA");
        let client_id: Identity = "spiffe://cluster.local/ns/bench/sa/client".parse().unwrap();
        let server_id: Identity = "spiffe://cluster.local/ns/bench/sa/server".parse().unwrap();
        let revocation = match revoked {
            0 => Revocation::default(),
            n => {
                let serials: Vec<String> = (0..n).map(|i| format!("7f{i:014x}")).collect();
                let serials: Vec<&str> = serials.iter().map(String::as_str).collect();
                let now = std::time::SystemTime::now();
                let pem = ca.revocation_list(&serials, 1, now, DAY).expect("list");
                Revocation::new(Crls::parse(pem.as_bytes()).expect("list"))
            }
        };
        let client_cert = issue(&ca, &client_id, DAY).expect("client cert");
        let client_cert = Arc::new(client_cert.with_revocation(revocation.clone()));
        let ca = Arc::new(ca);
        let discovery = Discovery::fixed(
            ztunnel::discovery::parse(&yaml(), "cluster.local").expect("discovery"),
        );
        let f = rt.block_on(async {
            let bind = |ip: &str| {
                let ip = ip.to_owned();
                async move { TcpListener::bind((ip.as_str(), 0)).await.expect("bind") }
            };
            let (sink_l, echo_l) = (bind(SERVER_IP).await, bind(SERVER_IP).await);
            let source_l = bind(SERVER_IP).await;
            let (sink_a, echo_a) = (sink_l.local_addr().unwrap(), echo_l.local_addr().unwrap());
            let source_a = source_l.local_addr().unwrap();
            tokio::spawn(sink(sink_l));
            tokio::spawn(echo(echo_l));
            tokio::spawn(source(source_l));

            let metrics = Arc::new(Metrics::default());
            let connect = ConnectOptions {
                mark: None,
                timeout: Duration::from_secs(5),
            };
            let certs = ztunnel::identity::CertManager::new(ca.clone(), DAY, revocation.clone());
            let (_tx, draining) = tokio::sync::watch::channel(false);
            std::mem::forget(_tx);
            // The daemon's own handlers on both sides; a table stands in for the capture
            // rules: each entry listener is redirected to one application, and the server's
            // tunnel port (TCP and QUIC) is where the inbound proxy listens here.
            let redirects = Arc::new(Redirects::default());
            let settings = PoolSettings {
                max_streams: 100,
                idle_timeout: Duration::from_secs(300),
                spare_idle_timeout: ztunnel::hbone::pool::SPARE_IDLE_TIMEOUT,
                connect,
                quic: QuicSettings::default(),
                sockets: redirects.clone(),
            };
            let proxies = |settings: PoolSettings| {
                ProxyInputs::new(
                    "bench".into(),
                    "cluster.local".into(),
                    "Kubernetes",
                    "cluster.local",
                    discovery.clone(),
                    certs.clone(),
                    Pool::new(settings, metrics.clone()),
                    metrics.clone(),
                    connect,
                    100,
                    ztunnel::proxy::TunnelLimits::default(),
                    true,
                    draining.clone(),
                )
            };
            let pi = proxies(settings.clone());
            let quic_pi = proxies(PoolSettings {
                quic: QuicSettings {
                    destinations: vec![format!("{SERVER_IP}/32").parse().expect("CIDR")],
                },
                ..settings
            });
            let tunnel_l = bind(SERVER_IP).await;
            let tunnel = tunnel_l.local_addr().unwrap();
            redirects.move_to(SocketAddr::new(tunnel.ip(), HBONE_PORT), tunnel);
            let quic = ztunnel::proxy::quic_endpoint(None, tunnel).expect("QUIC endpoint");
            tokio::spawn(ztunnel::proxy::serve_inbound(pi.clone(), tunnel_l));
            tokio::spawn(ztunnel::proxy::serve_inbound_quic(pi.clone(), quic));

            let mut entries = Vec::new();
            for pi in [&pi, &quic_pi] {
                for target in [sink_a, echo_a, source_a] {
                    let l = bind("127.0.0.1").await;
                    let entry = l.local_addr().unwrap();
                    redirects.redirect(entry, target);
                    entries.push(entry);
                    tokio::spawn(ztunnel::proxy::serve_outbound(pi.clone(), l));
                }
            }
            for target in [sink_a, echo_a, source_a] {
                let (first, second) = (bind("127.0.0.1").await, bind(SERVER_IP).await);
                entries.push(first.local_addr().unwrap());
                tokio::spawn(relay(first, second.local_addr().unwrap()));
                tokio::spawn(relay(second, target));
            }
            (sink_a, echo_a, source_a, entries, tunnel)
        });
        let e = &f.3;
        Fixture {
            rt,
            sink: f.0,
            echo: f.1,
            source: f.2,
            via_tunnel_sink: e[0],
            via_tunnel_echo: e[1],
            via_tunnel_source: e[2],
            via_quic_sink: e[3],
            via_quic_echo: e[4],
            via_quic_source: e[5],
            via_relay_sink: e[6],
            via_relay_echo: e[7],
            via_relay_source: e[8],
            tunnel: f.4,
            client_cert,
            server_id,
            _dir: dir,
        }
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
}

/// Sends `len` bytes to a sink at `addr` on a new connection and waits for its answer.
pub async fn push(addr: SocketAddr, len: usize) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    let buf = vec![0x5au8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        s.write_all(&buf[..n]).await.expect("write");
        left -= n;
    }
    s.shutdown().await.expect("shutdown");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("sink answer");
}

/// Asks a source at `addr` for `len` bytes on a new connection and reads them to its end.
pub async fn pull(addr: SocketAddr, len: usize) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    s.write_u64(len as u64).await.expect("ask");
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        match s.read(&mut buf).await.expect("read") {
            0 => break,
            n => got += n,
        }
    }
    assert_eq!(got, len, "bytes from the source");
}

/// One request/response of `msg.len()` bytes over `s` (an echo).
pub async fn round_trip(s: &mut TcpStream, msg: &[u8], reply: &mut [u8]) {
    s.write_all(msg).await.expect("write");
    s.read_exact(reply).await.expect("read");
}
