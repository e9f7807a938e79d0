//! The node-mode test bed: three hosts on one bridge. `a` (10.77.0.1) and `b` (10.77.0.2) each
//! run a daemon and carry one workload whose network namespace is the host's own (the layout
//! of in-pod capture, with the daemon inside); `c` (10.77.0.3) is outside the mesh. `a` and
//! `b` have the capture rules, so applications there see plain TCP while the daemons tunnel.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use crate::daemon::{self, Process};
use crate::netns::{self, Netns, Switch};

pub const A_IP: &str = "10.77.0.1";
pub const B_IP: &str = "10.77.0.2";
pub const C_IP: &str = "10.77.0.3";
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Capture rules equivalent to in-pod redirection: outbound TCP (not loopback, not the
/// daemon's marked sockets) to 15001, inbound TCP except 15008 to 15006.
pub fn capture_rules() -> String {
    "table inet zt_test {
  chain output {
    type nat hook output priority -100; policy accept;
    meta mark & 0xfff == 0x539 return
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    meta l4proto tcp redirect to :15001
  }
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }
}
"
    .to_owned()
}

/// An HTTP/2 connection accepted by [`Mesh::serve_tunnels_on_c`].
pub type TunnelConn =
    h2::server::Connection<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, bytes::Bytes>;

/// A workload in the discovery file.
#[derive(Clone, Debug)]
pub struct Wl {
    pub name: &'static str,
    pub sa: String,
    pub node: &'static str,
    pub ip: &'static str,
}

/// The discovery file for a mesh of `workloads`, `services` and `policies` (discovery file
/// entries).
pub fn discovery_yaml(
    trust_domain: &str,
    workloads: &[Wl],
    services: &[serde_json::Value],
    policies: &[serde_json::Value],
) -> String {
    let wls: Vec<_> = workloads
        .iter()
        .map(|w| {
            json!({
                "uid": format!("uid-{}", w.name),
                "name": w.name,
                "namespace": "demo",
                "serviceAccount": w.sa,
                "node": w.node,
                "ips": [w.ip],
                "labels": {"app": w.name},
                "protocol": "HBONE",
            })
        })
        .collect();
    let doc = json!({
        "trustDomain": trust_domain,
        "namespaces": [{"name": "demo", "labels": {"ztunnel.dev/dataplane-mode": "ambient"}}],
        "workloads": wls,
        "services": services,
        "policies": policies,
    });
    serde_saphyr::to_string(&doc).expect("yaml")
}

/// How one daemon of the test bed differs from the default.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub trust_domain: String,
    /// Use this CA directory instead of the shared one.
    pub ca_dir: Option<PathBuf>,
    /// Workloads as this daemon's discovery file describes them.
    pub workloads: Vec<Wl>,
    /// Services of this daemon's discovery file (entries as the file spells them).
    pub services: Vec<serde_json::Value>,
    /// Policies of this daemon's discovery file (objects as the file spells them).
    pub policies: Vec<serde_json::Value>,
    pub extra_args: Vec<String>,
    /// Ask the `ztunnel ca` at this address (trusting the bed's root, with a token file)
    /// instead of signing in-process. A daemon whose CA does not answer never becomes ready:
    /// the bed waits for it to serve its metrics instead.
    pub ca_address: Option<String>,
}

pub fn default_workloads() -> Vec<Wl> {
    vec![
        Wl {
            name: "client",
            sa: "client".into(),
            node: "node-a",
            ip: A_IP,
        },
        Wl {
            name: "server",
            sa: "server".into(),
            node: "node-b",
            ip: B_IP,
        },
    ]
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            trust_domain: TRUST_DOMAIN.into(),
            ca_dir: None,
            workloads: default_workloads(),
            services: Vec::new(),
            policies: Vec::new(),
            extra_args: Vec::new(),
            ca_address: None,
        }
    }
}

/// How the two-node bed is built: each daemon's options, then [`MeshBuilder::start`].
#[derive(Default)]
pub struct MeshBuilder {
    a: NodeOptions,
    b: NodeOptions,
    on_c: Option<&'static str>,
}

impl MeshBuilder {
    /// How the daemon on host `a` differs from the default.
    pub fn a(mut self, options: NodeOptions) -> Self {
        self.a = options;
        self
    }

    /// How the daemon on host `b` differs from the default.
    pub fn b(mut self, options: NodeOptions) -> Self {
        self.b = options;
        self
    }

    /// Host `c` is also a destination that the test drives itself: `a`'s discovery knows
    /// workload `name` on `node-c` at [`C_IP`], of ServiceAccount `demo/server`
    /// ([`Mesh::destination_tls`] has its certificate).
    pub fn destination_on_c(mut self, name: &'static str) -> Self {
        self.on_c = Some(name);
        self
    }

    /// Starts the bed; panics when it cannot.
    pub fn start(self) -> Mesh {
        self.try_start().expect("start the test bed")
    }

    /// Starts the bed: hosts, switch, capture rules, then both daemons, ready.
    pub fn try_start(mut self) -> Result<Mesh> {
        if let Some(name) = self.on_c {
            self.a.workloads.push(Wl {
                name,
                sa: "server".into(),
                node: "node-c",
                ip: C_IP,
            });
        }
        Mesh::start(self.a, self.b)
    }
}

/// The running test bed; torn down on drop.
pub struct Mesh {
    pub a_daemon: Process,
    pub b_daemon: Process,
    pub a: Netns,
    pub b: Netns,
    pub c: Netns,
    pub sw: Switch,
    /// The switch port of host `b`: a capture there sees everything `b` sends and receives.
    pub b_port: String,
    pub ca_dir: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Mesh {
    /// `len` bytes each way between `a` and `b`'s port 8080 at once, compared by SHA-256 in
    /// both directions; the application on `b` sees the connection come from `B_IP` (in this
    /// layout the daemon shares the workload's namespace: the tunnel carried it, not the plain
    /// network). Panics when anything differs.
    pub fn check_bulk_each_way(&self, len: usize) {
        use crate::apps::{self, pattern_digest};
        let server = self
            .b
            .serve(8080, move |l| apps::exchange_server(l, 2, len));
        let (digest, n) = self
            .a
            .block_on(async move {
                let s = tokio::net::TcpStream::connect((B_IP, 8080)).await?;
                apps::exchange(s, 1, len).await
            })
            .expect("client exchange");
        let (server_digest, server_n, peer) = self.b.join(server).expect("server exchange");
        assert_eq!((n, server_n), (len, len));
        assert_eq!(
            digest,
            pattern_digest(2, len),
            "server → client bytes differ"
        );
        assert_eq!(
            server_digest,
            pattern_digest(1, len),
            "client → server bytes differ"
        );
        assert_eq!(peer.ip().to_string(), B_IP);
    }

    /// Half-close across the tunnel from `a` to `b`'s port 8080, both ways: a client that
    /// half-closes first still gets the server's answer after its EOF, and a server that
    /// half-closes first still gets what the client sends after reading its EOF. Panics
    /// when either is lost.
    pub fn check_half_close_both_ways(&self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpStream;
        let server = self.b.serve(8080, |l| async move {
            let (mut s, _) = l.accept().await?;
            let mut got = Vec::new();
            s.read_to_end(&mut got).await?;
            s.write_all(format!("got {} bytes", got.len()).as_bytes())
                .await?;
            s.shutdown().await?;
            let (mut s, _) = l.accept().await?;
            s.write_all(b"hello").await?;
            s.shutdown().await?;
            let mut tail = Vec::new();
            s.read_to_end(&mut tail).await?;
            Ok::<_, std::io::Error>(tail)
        });
        let (first, second) = self
            .a
            .block_on(async {
                let mut s = TcpStream::connect((B_IP, 8080)).await?;
                s.write_all(b"ping pong").await?;
                s.shutdown().await?;
                let mut reply = String::new();
                s.read_to_string(&mut reply).await?;

                let mut s = TcpStream::connect((B_IP, 8080)).await?;
                let mut greeting = String::new();
                s.read_to_string(&mut greeting).await?;
                s.write_all(b"after your FIN").await?;
                s.shutdown().await?;
                Ok::<_, std::io::Error>((reply, greeting))
            })
            .expect("client");
        assert_eq!(first, "got 9 bytes", "the answer after the client's FIN");
        assert_eq!(second, "hello", "the server's bytes before its FIN");
        assert_eq!(
            self.b.join(server).expect("server"),
            b"after your FIN",
            "the client's bytes after the server's FIN"
        );
    }
    /// The bed's builder: both daemons with [`NodeOptions::default`] unless told otherwise.
    pub fn builder() -> MeshBuilder {
        MeshBuilder::default()
    }

    fn start(a_opts: NodeOptions, b_opts: NodeOptions) -> Result<Mesh> {
        netns::require_prerequisites();
        let dir = tempfile::tempdir()?;
        let prefix = netns::unique_prefix();
        let sw = Switch::new(&prefix)?;
        let a = Netns::new(&format!("{prefix}-a"))?;
        let b = Netns::new(&format!("{prefix}-b"))?;
        let c = Netns::new(&format!("{prefix}-c"))?;
        sw.attach(&a, &format!("{A_IP}/24"))?;
        let b_port = sw.attach(&b, &format!("{B_IP}/24"))?;
        sw.attach(&c, &format!("{C_IP}/24"))?;
        a.nft(&capture_rules())?;
        b.nft(&capture_rules())?;
        let ca_dir = dir.path().join("ca");
        ztunnel::ca::LocalCa::load_or_create(&ca_dir, TRUST_DOMAIN)?;
        let a_daemon = start_daemon(&a, "node-a", dir.path(), &ca_dir, &a_opts)?;
        let b_daemon = start_daemon(&b, "node-b", dir.path(), &ca_dir, &b_opts)?;
        // A daemon of a remote CA is ready only if that CA answers; it serves its metrics
        // (and its listeners, bound before) either way.
        let wait_on = |o: &NodeOptions| match o.ca_address {
            None => ("127.0.0.1:15021", "/healthz/ready"),
            Some(_) => ("127.0.0.1:15020", "/metrics"),
        };
        let (a_wait, b_wait) = (wait_on(&a_opts), wait_on(&b_opts));
        let mut mesh = Mesh {
            a_daemon,
            b_daemon,
            a,
            b,
            c,
            sw,
            b_port,
            ca_dir,
            dir,
        };
        daemon::wait_ready(
            &mesh.a,
            &mut mesh.a_daemon,
            a_wait.0,
            a_wait.1,
            Duration::from_secs(20),
        )?;
        daemon::wait_ready(
            &mesh.b,
            &mut mesh.b_daemon,
            b_wait.0,
            b_wait.1,
            Duration::from_secs(20),
        )?;
        Ok(mesh)
    }

    /// The metrics text of the daemon in `ns`.
    /// Waits (up to 5 s) until the metric reaches `want` in the daemon of `ns`, since the
    /// far end of a refused connection may count it a moment after the near end sees it;
    /// returns the last exposition read, for the assertion message.
    pub fn metrics_when(ns: &Netns, name: &str, labels: &[(&str, &str)], want: f64) -> String {
        Self::metrics_when_within(ns, name, labels, want, std::time::Duration::from_secs(5))
    }

    /// Like [`Mesh::metrics_when`], waiting up to `limit`.
    pub fn metrics_when_within(
        ns: &Netns,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        limit: std::time::Duration,
    ) -> String {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let m = Self::metrics(ns);
            if crate::daemon::try_metric(&m, name, labels) == Some(want)
                || std::time::Instant::now() > deadline
            {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// A TLS server configuration with the certificate of the workload on host `c` that
    /// [`MeshBuilder::destination_on_c`] added (ServiceAccount `demo/server`), for the test's
    /// own HBONE server on `C_IP:15008` ([`Mesh::serve_tunnels_on_c`]).
    pub fn destination_tls(&self) -> std::sync::Arc<rustls::ServerConfig> {
        use ztunnel::identity::Identity;
        let ca = ztunnel::ca::LocalCa::load_or_create(&self.ca_dir, TRUST_DOMAIN).unwrap();
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/server".parse().unwrap();
        ztunnel::ca::issue(&ca, &id, Duration::from_secs(3600))
            .unwrap()
            .server_config()
    }

    /// The test's own tunnel server on host c, `C_IP:15008` (bound before this returns), with
    /// `tls`: each accepted connection is counted in the result, and once its TLS and HTTP/2
    /// handshakes are done `serve` runs it, in a task of its own; a failed handshake is
    /// dropped.
    pub fn serve_tunnels_on_c<F, Fut>(
        &self,
        tls: std::sync::Arc<rustls::ServerConfig>,
        serve: F,
    ) -> std::sync::Arc<std::sync::atomic::AtomicUsize>
    where
        F: Fn(TunnelConn) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let l = self
            .c
            .block_on(async { tokio::net::TcpListener::bind((C_IP, 15008)).await.unwrap() });
        let counted = accepted.clone();
        let serve = std::sync::Arc::new(serve);
        self.c.spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (acceptor, serve) = (acceptor.clone(), serve.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(conn) = h2::server::handshake(tls).await else {
                        return;
                    };
                    serve(conn).await;
                });
            }
        });
        accepted
    }

    /// A TLS client configuration for a tunnel from outside the nodes: a certificate of the
    /// mesh CA for `…/ns/demo/sa/client`, expecting the server workload's identity.
    pub fn client_tls(&self) -> std::sync::Arc<rustls::ClientConfig> {
        use ztunnel::identity::Identity;
        let ca = ztunnel::ca::LocalCa::load_or_create(&self.ca_dir, TRUST_DOMAIN).unwrap();
        let me: Identity = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
        let cert = ztunnel::ca::issue(&ca, &me, Duration::from_secs(3600)).unwrap();
        let server: Identity = "spiffe://cluster.local/ns/demo/sa/server".parse().unwrap();
        cert.client_config(&[server])
    }

    pub fn metrics(ns: &Netns) -> String {
        daemon::http(ns, "GET", "127.0.0.1:15020", "/metrics")
            .expect("scrape")
            .1
    }

    /// The pool listing of the daemon in `ns` (admin `/config_dump`): the connections it holds.
    pub fn pool(ns: &Netns) -> Vec<serde_json::Value> {
        Self::config_dump(ns)["pool"]
            .as_array()
            .expect("the config dump lists the pool")
            .clone()
    }

    /// The admin `/config_dump` of the daemon in `ns`.
    pub fn config_dump(ns: &Netns) -> serde_json::Value {
        let body = daemon::http(ns, "GET", "127.0.0.1:15000", "/config_dump")
            .expect("config_dump")
            .1;
        serde_json::from_str(&body).expect("config_dump is JSON")
    }
}

fn start_daemon(
    ns: &Netns,
    node: &str,
    dir: &std::path::Path,
    ca_dir: &std::path::Path,
    o: &NodeOptions,
) -> Result<Process> {
    let file = dir.join(format!("{node}.yaml"));
    std::fs::write(
        &file,
        discovery_yaml(&o.trust_domain, &o.workloads, &o.services, &o.policies),
    )?;
    let ca = o.ca_dir.clone().unwrap_or_else(|| ca_dir.to_path_buf());
    let signer: Vec<String> = match &o.ca_address {
        None => vec!["--ca-dir".into(), ca.display().to_string()],
        Some(address) => {
            let token = dir.join(format!("{node}-ca-token"));
            std::fs::write(&token, "a-token\n")?;
            vec![
                "--ca-address".into(),
                address.clone(),
                "--ca-root-cert".into(),
                ca.join("root-cert.pem").display().to_string(),
                "--ca-token-file".into(),
                token.display().to_string(),
            ]
        }
    };
    let mut args: Vec<String> = vec![
        "run".into(),
        // This test bed installs its own node-wide rules; the daemon listens on its addresses.
        "--capture-mode".into(),
        "node".into(),
        "--node-name".into(),
        node.into(),
        "--trust-domain".into(),
        o.trust_domain.clone(),
        "--discovery-file".into(),
        file.display().to_string(),
        "--drain-grace".into(),
        "1s".into(),
        "--state-dir".into(),
        dir.join(format!("{node}-state")).display().to_string(),
    ];
    args.extend(signer);
    args.extend(o.extra_args.iter().cloned());
    Process::start(ns, node, dir, &args, &[])
}
