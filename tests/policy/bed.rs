//! The policy tests' bed: the in-pod test bed with counting echo applications on the server
//! (8080, 9090) and the echo pod (8080), policies applied as the discovery file's, and
//! `ztunnel ctl` run on a node.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::testbed::TestBed;
use ztunnel_e2e::transport::Transport;

/// Echoes on `port`, counting the connections the application accepted.
pub async fn counting_echo(l: TcpListener, accepted: Arc<AtomicUsize>) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut b = vec![0u8; 1024];
            while let Ok(n) = s.read(&mut b).await {
                if n == 0 || s.write_all(&b[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}

pub async fn ping(ip: &str, port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect((ip, port)).await?;
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut b))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
    Ok(())
}

pub fn authz(name: &str, action: &str, rules: Value) -> Value {
    json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": "demo"},
           "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": action, "rules": rules}})
}

pub fn peer_authn(mode: &str) -> Value {
    json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "PeerAuthentication",
           "metadata": {"name": "mtls", "namespace": "demo"}, "spec": {"mtls": {"mode": mode}}})
}

/// A policy object of either kind in `namespace`.
pub fn object(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.ztunnel.dev/v1", "kind": kind,
           "metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

/// A PeerAuthentication in `namespace` (the root namespace, `ztunnel-system`, for mesh level).
pub fn pa(namespace: &str, name: &str, spec: Value) -> Value {
    object("PeerAuthentication", namespace, name, spec)
}

/// The daemons' root namespace: policies there without a selector are mesh-wide.
pub const ROOT: &str = "ztunnel-system";
const SERVER: &str = "10.20.2.10";
const ECHO: &str = "10.20.1.12";

pub struct Bed {
    pub bed: TestBed,
    /// Connections the server's application accepted (ports 8080 and 9090, node n2).
    pub accepted: Arc<AtomicUsize>,
    /// Connections the `echo` pod's application accepted (port 8080, node n1).
    pub echo_accepted: Arc<AtomicUsize>,
}

impl Bed {
    pub fn start() -> Bed {
        Self::with(TestBed::start())
    }

    /// The bed with every daemon tunnelling over QUIC between the pods (HTTP/2 only as its
    /// fallback).
    pub fn start_quic() -> Bed {
        Self::with(TestBed::builder().transport(Transport::Quic).start())
    }

    fn with(bed: TestBed) -> Bed {
        let accepted = Arc::new(AtomicUsize::new(0));
        for port in [8080, 9090] {
            let accepted = accepted.clone();
            bed.pod("server")
                .ns
                .serve(port, |l| counting_echo(l, accepted));
        }
        let echo_accepted = Arc::new(AtomicUsize::new(0));
        let accepted_by_echo = echo_accepted.clone();
        bed.pod("echo")
            .ns
            .serve(8080, |l| counting_echo(l, accepted_by_echo));
        Bed {
            bed,
            accepted,
            echo_accepted,
        }
    }

    pub fn from(&self, pod: &str, port: u16) -> std::io::Result<()> {
        self.bed.pod(pod).ns.block_on(ping(SERVER, port))
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connects from `pod` to `dst` (`server` or `echo`) on `port` and asserts the outcome:
    /// allowed, the bytes echoed and the application saw the connection; or refused, and the
    /// application never saw it.
    pub fn check(&self, pod: &str, dst: &str, port: u16, allowed: bool, what: &str) {
        let (ip, seen) = match dst {
            "server" => (SERVER, &self.accepted),
            "echo" => (ECHO, &self.echo_accepted),
            other => panic!("no application on {other}"),
        };
        let before = seen.load(Ordering::SeqCst);
        let r = self.bed.pod(pod).ns.block_on(ping(ip, port));
        let after = seen.load(Ordering::SeqCst);
        if allowed {
            if let Err(e) = r {
                panic!("{what}: {pod} → {dst}:{port} must be allowed: {e}");
            }
            assert_eq!(after, before + 1, "{what}: {pod} → {dst}:{port}");
        } else {
            assert!(r.is_err(), "{what}: {pod} → {dst}:{port} must be refused");
            assert_eq!(
                after, before,
                "{what}: {pod} → {dst}:{port}: the application must not see a refused connection"
            );
        }
    }

    /// Asserts that daemon `i` has counted `want` refusals for `reason` (waiting up to 5 s
    /// for the count to get there).
    pub fn refusals(&self, i: usize, reason: &str, want: f64, what: &str) {
        let labels = [("reason", reason)];
        let m = self
            .bed
            .metrics_when(i, "ztunnel_refusals_total", &labels, want);
        assert_eq!(
            metric(&m, "ztunnel_refusals_total", &labels),
            want,
            "{what}: refusals {reason:?} on daemon {i}\n{m}"
        );
    }

    /// Asserts the policy denials at the server so far: `by_destination` tunnels from n1
    /// refused by the server's daemon, as n1's daemon counts them
    /// (`outbound_denied_by_destination`), and `policy_denied` denials of every kind on n2's.
    pub fn denials(&self, by_destination: f64, policy_denied: f64, what: &str) {
        self.refusals(0, "outbound_denied_by_destination", by_destination, what);
        self.refusals(1, "policy_denied", policy_denied, what);
    }

    /// `ztunnel ctl explain --from <from> --to <to> -o json` on daemon `i`.
    pub fn explain(&self, i: usize, from: &str, to: &str) -> Value {
        let out = ctl(
            &self.bed,
            i,
            &["explain", "--from", from, "--to", to, "-o", "json"],
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("explain: {e}: {out}"))
    }
}

/// The notes (what the conversion dropped or narrowed) of the policy `namespace/name` among
/// those an explanation considered.
pub fn notes(explained: &Value, namespace: &str, name: &str) -> Vec<String> {
    let considered = explained["considered"]
        .as_array()
        .unwrap_or_else(|| panic!("no considered policies: {explained}"));
    let p = considered
        .iter()
        .find(|c| c["policy"]["namespace"] == namespace && c["policy"]["name"] == name)
        .unwrap_or_else(|| panic!("{namespace}/{name} not considered: {explained}"));
    p["dropped"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| n.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Runs `ztunnel ctl <args>` inside node `i`'s namespace (where its admin API listens).
pub fn ctl(bed: &TestBed, i: usize, args: &[&str]) -> String {
    let bin = ztunnel_e2e::daemon::binary("ztunnel");
    let mut all = vec!["ctl"];
    all.extend_from_slice(args);
    let mut a: Vec<&str> = vec![bin.to_str().unwrap()];
    a.extend(all);
    bed.nodes[i].ns.exec(a[0], &a[1..]).expect("ztunnel ctl")
}
