//! L4 policy enforced by the destination's daemon on the two-node test bed, decided as Istio's
//! ambient mode decides (istiod's conversion, then ztunnel's matcher), with real traffic:
//!
//! - denials by principal, namespace, port and ipBlock (the source's daemon gets 401, the
//!   application never sees a connection, the access log names the policy); ALLOW semantics;
//! - `when` conditions on the L4 keys (`source.namespace`, `destination.port`, `source.ip`
//!   and `source.principal` with `values` and `notValues`, a plaintext peer's empty
//!   identity), and on an HTTP key: the ALLOW rule dropped whole, the DENY rule left with
//!   nothing to match, HTTP fields beside L4 ones in a DENY denying the whole port;
//! - PeerAuthentication: STRICT vs PERMISSIVE for a plaintext client; DISABLE accepting
//!   plaintext as PERMISSIVE does, at namespace level under a mesh STRICT and at workload
//!   level under a mesh or namespace STRICT, mutual TLS still accepted; `portLevelMtls`
//!   exceptions per target port (STRICT with a PERMISSIVE port, PERMISSIVE with a STRICT one,
//!   a workload without a mode under a namespace STRICT, where a DISABLE port is no exception);
//! - one file holding HTTP fields, `when` conditions, DISABLE and `portLevelMtls` together:
//!   loaded, nothing failing closed, shown by `ztunnel ctl`, deciding as Istio does;
//! - a new DENY closing an established connection; `ztunnel ctl`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::testbed::TestBed;

/// Echoes on `port`, counting the connections the application accepted.
async fn counting_echo(port: u16, accepted: Arc<AtomicUsize>) {
    let l = TcpListener::bind(("0.0.0.0", port)).await.expect("bind");
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

async fn ping(ip: &str, port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect((ip, port)).await?;
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut b))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
    Ok(())
}

fn authz(name: &str, action: &str, rules: Value) -> Value {
    json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": "demo"},
           "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": action, "rules": rules}})
}

fn peer_authn(mode: &str) -> Value {
    json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "PeerAuthentication",
           "metadata": {"name": "mtls", "namespace": "demo"}, "spec": {"mtls": {"mode": mode}}})
}

/// A policy object of either kind in `namespace`.
fn object(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.ztunnel.dev/v1", "kind": kind,
           "metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

/// A PeerAuthentication in `namespace` (the root namespace, `ztunnel-system`, for mesh level).
fn pa(namespace: &str, name: &str, spec: Value) -> Value {
    object("PeerAuthentication", namespace, name, spec)
}

/// The daemons' root namespace: policies there without a selector are mesh-wide.
const ROOT: &str = "ztunnel-system";
const SERVER: &str = "10.20.2.10";
const ECHO: &str = "10.20.1.12";

struct Bed {
    bed: TestBed,
    /// Connections the server's application accepted (ports 8080 and 9090, node n2).
    accepted: Arc<AtomicUsize>,
    /// Connections the `echo` pod's application accepted (port 8080, node n1).
    echo_accepted: Arc<AtomicUsize>,
}

impl Bed {
    fn start() -> Bed {
        let bed = TestBed::start();
        let accepted = Arc::new(AtomicUsize::new(0));
        for port in [8080, 9090] {
            bed.pod("server")
                .ns
                .spawn(counting_echo(port, accepted.clone()));
        }
        let echo_accepted = Arc::new(AtomicUsize::new(0));
        bed.pod("echo")
            .ns
            .spawn(counting_echo(8080, echo_accepted.clone()));
        std::thread::sleep(Duration::from_millis(100));
        Bed {
            bed,
            accepted,
            echo_accepted,
        }
    }

    fn from(&self, pod: &str, port: u16) -> std::io::Result<()> {
        self.bed.pod(pod).ns.block_on(ping(SERVER, port))
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connects from `pod` to `dst` (`server` or `echo`) on `port` and asserts the outcome:
    /// allowed, the bytes echoed and the application saw the connection; or refused, and the
    /// application never saw it.
    fn check(&self, pod: &str, dst: &str, port: u16, allowed: bool, what: &str) {
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
    fn refusals(&self, i: usize, reason: &str, want: f64, what: &str) {
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

    /// `ztunnel ctl explain --from <from> --to <to> -o json` on daemon `i`.
    fn explain(&self, i: usize, from: &str, to: &str) -> Value {
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
fn notes(explained: &Value, namespace: &str, name: &str) -> Vec<String> {
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

#[test]
fn denials_by_principal_namespace_port_and_ip_block() {
    let b = Bed::start();
    b.from("client", 8080).expect("allowed before any policy");
    let cases = [
        (
            "deny-principal",
            json!([{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]),
            "client",
            8080,
            ("legacy-2", 8080),
        ),
        (
            "deny-namespace",
            json!([{"from": [{"source": {"namespaces": ["demo"]}}]}]),
            "client",
            8080,
            ("legacy-2", 8080),
        ),
        (
            "deny-port",
            json!([{"to": [{"operation": {"ports": ["8080"]}}]}]),
            "client",
            8080,
            ("client", 9090),
        ),
        (
            "deny-ipblock",
            json!([{"from": [{"source": {"ipBlocks": ["10.20.1.0/24"]}}]}]),
            "client",
            8080,
            ("legacy-2", 8080),
        ),
    ];
    let mut denied_by_destination = 0.0;
    for (name, rules, pod, port, (ok_pod, ok_port)) in cases {
        b.bed
            .apply_policies(json!([authz(name, "DENY", rules)]))
            .unwrap();
        let before = b.accepted();
        let r = b.from(pod, port);
        assert!(r.is_err(), "{name}: {pod} → server:{port} must be denied");
        assert_eq!(
            b.accepted(),
            before,
            "{name}: the application must not see a denied connection"
        );
        // The source's daemon was answered 401.
        denied_by_destination += 1.0;
        let m1 = b.bed.metrics(0);
        let labels = [("reason", "outbound_denied_by_destination")];
        assert_eq!(
            metric(&m1, "ztunnel_refusals_total", &labels),
            denied_by_destination,
            "{name}: {m1}"
        );
        // The destination's access log names the policy (written as the stream ends, a moment
        // after the source saw the refusal).
        let names_it = |log: &str| {
            ztunnel_e2e::daemon::access_lines(log).iter().any(|l| {
                l["decision"] == "deny"
                    && l["policy"] == format!("demo/{name}").as_str()
                    && l["src_identity"] == "spiffe://cluster.local/ns/demo/sa/client"
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !names_it(&b.bed.log(1)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = b.bed.log(1);
        assert!(
            names_it(&log),
            "{name}: no access log line naming the policy:\n{log}"
        );
        // What the policy does not cover still gets through.
        b.from(ok_pod, ok_port)
            .unwrap_or_else(|e| panic!("{name}: {ok_pod} → server:{ok_port}: {e}"));
    }
    b.bed.apply_policies(json!([])).unwrap();
    b.from("client", 8080)
        .expect("allowed again once the policy is gone");
}

#[test]
fn an_allow_policy_denies_what_it_does_not_match() {
    let b = Bed::start();
    let allow_client = authz(
        "allow-client",
        "ALLOW",
        json!([{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/*"]}}], "to": [{"operation": {"ports": ["8080"]}}]}]),
    );
    b.bed.apply_policies(json!([allow_client])).unwrap();
    b.from("client", 8080).expect("matched by the ALLOW rule");
    let before = b.accepted();
    assert!(b.from("client", 9090).is_err(), "port not allowed");
    assert!(
        b.from("legacy-2", 8080).is_err(),
        "plaintext has no principal"
    );
    assert_eq!(b.accepted(), before);
}

#[test]
fn strict_refuses_a_plaintext_client_and_permissive_lets_it_in() {
    let b = Bed::start();
    b.bed.apply_policies(json!([peer_authn("STRICT")])).unwrap();
    let before = b.accepted();
    assert!(
        b.from("legacy-2", 8080).is_err(),
        "STRICT refuses plaintext"
    );
    assert_eq!(b.accepted(), before);
    b.from("client", 8080)
        .expect("mutual TLS is accepted under STRICT");
    let m2 = b.bed.metrics(1);
    assert_eq!(
        metric(
            &m2,
            "ztunnel_refusals_total",
            &[("reason", "inbound_plaintext_strict")]
        ),
        1.0,
        "{m2}"
    );

    b.bed
        .apply_policies(json!([peer_authn("PERMISSIVE")]))
        .unwrap();
    b.from("legacy-2", 8080)
        .expect("PERMISSIVE lets plaintext in");
}

#[test]
fn a_new_deny_closes_an_established_connection() {
    let b = Bed::start();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let client = b.bed.pod("client").ns.spawn(async move {
        let mut s = TcpStream::connect(("10.20.2.10", 8080))
            .await
            .expect("connect");
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("echo");
        tx.send(()).unwrap();
        // Now wait, without sending: the connection must be closed under us.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("established");
    let deny = authz(
        "deny-client",
        "DENY",
        json!([{"from": [{"source": {"namespaces": ["demo"]}}]}]),
    );
    b.bed.apply_policies(json!([deny])).unwrap();
    let loaded = std::time::Instant::now();
    let outcome = b.bed.pod("client").ns.join(client);
    let closed_after = loaded.elapsed();
    assert!(outcome.is_ok(), "the connection was not closed");
    assert!(
        closed_after < Duration::from_secs(1),
        "closed only after {closed_after:?}"
    );
    let log = b.bed.log(1);
    assert!(log.contains("closed: denied by a policy change"), "{log}");
}

/// Runs `ztunnel ctl <args>` inside node `i`'s namespace (where its admin API listens).
fn ctl(bed: &TestBed, i: usize, args: &[&str]) -> String {
    let bin = ztunnel_e2e::daemon::binary("ztunnel");
    let mut all = vec!["ctl"];
    all.extend_from_slice(args);
    let mut a: Vec<&str> = vec![bin.to_str().unwrap()];
    a.extend(all);
    bed.nodes[i].ns.exec(a[0], &a[1..]).expect("ztunnel ctl")
}

#[test]
fn ctl_shows_the_daemon_and_explains_decisions_without_traffic() {
    let b = Bed::start();
    let deny = authz(
        "deny-9090",
        "DENY",
        json!([{"to": [{"operation": {"ports": ["9090"]}}]}]),
    );
    b.bed
        .apply_policies(json!([deny, peer_authn("STRICT")]))
        .unwrap();
    let before = b.accepted();

    let workloads = ctl(&b.bed, 1, &["workloads"]);
    assert!(workloads.starts_with("NAMESPACE"), "{workloads}");
    assert!(
        workloads
            .lines()
            .any(|l| l.contains("server") && l.contains("10.20.2.10")),
        "{workloads}"
    );
    let certs = ctl(&b.bed, 1, &["certs"]);
    assert!(
        certs.contains("spiffe://cluster.local/ns/demo/sa/server"),
        "{certs}"
    );
    assert!(!certs.contains("PRIVATE KEY"));
    let policies = ctl(&b.bed, 1, &["policies"]);
    assert!(
        policies
            .lines()
            .any(|l| l.contains("deny-9090") && l.contains("DENY")),
        "{policies}"
    );
    assert!(
        policies
            .lines()
            .any(|l| l.contains("PeerAuthentication") && l.contains("STRICT")),
        "{policies}"
    );
    let services: Value =
        serde_json::from_str(&ctl(&b.bed, 1, &["services", "-o", "json"])).unwrap();
    assert_eq!(services[0]["vips"][0], "10.96.0.10");

    let explain = ctl(
        &b.bed,
        1,
        &[
            "explain",
            "--from",
            "demo/client",
            "--to",
            "demo/server:9090",
        ],
    );
    assert!(
        explain.contains("decision: DENY") && explain.contains("policy demo/deny-9090 rule 0"),
        "{explain}"
    );
    let explain = ctl(
        &b.bed,
        1,
        &["explain", "--from", "10.20.1.10", "--to", "10.96.0.10:80"],
    );
    assert!(
        explain.contains("decision: ALLOW") && explain.contains("via service demo/server"),
        "{explain}"
    );
    let json: Value = serde_json::from_str(&ctl(
        &b.bed,
        1,
        &[
            "explain",
            "--from",
            "plain/legacy-2",
            "--to",
            "demo/server:8080",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(
        json["decision"]["allowed"], false,
        "STRICT: plaintext is refused"
    );
    assert_eq!(json["transport"], "plaintext");
    assert_eq!(b.accepted(), before, "explain sends no traffic");

    // A live connection shows up with its identities.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let held = b.bed.pod("client").ns.spawn(async move {
        let mut s = TcpStream::connect(("10.20.2.10", 8080)).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        tx.send(()).unwrap();
        let _ = stop_rx.await;
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let conns = ctl(&b.bed, 1, &["connections"]);
    assert!(
        conns.lines().any(|l| l.contains("inbound")
            && l.contains("spiffe://cluster.local/ns/demo/sa/client")
            && l.contains("spiffe://cluster.local/ns/demo/sa/server")),
        "{conns}"
    );
    let _ = stop_tx.send(());
    b.bed.pod("client").ns.join(held);
}

/// `when` conditions on the L4 keys istiod translates for ztunnel (istiod ambient
/// authorization.go `handleRule`, `l4WhenAttributes`: one clause per condition, ANDed), matched
/// as ztunnel's rbac.rs matches them: `values` must hold, `notValues` must not, and a plaintext
/// peer's principal and namespace are empty.
#[test]
fn when_conditions_on_l4_keys() {
    let b = Bed::start();
    // Tunnel streams from n1 refused by the server's daemon (401), and every denial there.
    let (mut denied_by_destination, mut policy_denied) = (0.0, 0.0);

    // ALLOW: both conditions must hold.
    b.bed
        .apply_policies(json!([authz(
            "allow-demo-8080",
            "ALLOW",
            json!([{"when": [{"key": "source.namespace", "values": ["demo"]},
                             {"key": "destination.port", "values": ["8080"]}]}]),
        )]))
        .unwrap();
    let what = "ALLOW when source.namespace=demo and destination.port=8080";
    b.check("client", "server", 8080, true, what);
    b.check("echo", "server", 8080, true, what);
    b.check("client", "server", 9090, false, what);
    denied_by_destination += 1.0;
    // A plaintext peer has no namespace: `source.namespace` never matches it.
    b.check("legacy-2", "server", 8080, false, what);
    policy_denied += 2.0;
    b.refusals(
        0,
        "outbound_denied_by_destination",
        denied_by_destination,
        what,
    );
    b.refusals(1, "policy_denied", policy_denied, what);

    // DENY on a port: that port only, for every peer.
    b.bed
        .apply_policies(json!([authz(
            "deny-9090",
            "DENY",
            json!([{"when": [{"key": "destination.port", "values": ["9090"]}]}]),
        )]))
        .unwrap();
    let what = "DENY when destination.port=9090";
    b.check("client", "server", 9090, false, what);
    denied_by_destination += 1.0;
    b.check("legacy-2", "server", 9090, false, what);
    policy_denied += 2.0;
    b.check("client", "server", 8080, true, what);
    b.check("legacy-2", "server", 8080, true, what);
    b.refusals(
        0,
        "outbound_denied_by_destination",
        denied_by_destination,
        what,
    );
    b.refusals(1, "policy_denied", policy_denied, what);

    // DENY every source address but the client's. A tunnel's source address is the client
    // pod's own (the tunnel leaves from its netns), for the engine as for the application.
    b.bed
        .apply_policies(json!([authz(
            "deny-not-client-ip",
            "DENY",
            json!([{"when": [{"key": "source.ip", "notValues": ["10.20.1.10"]}]}]),
        )]))
        .unwrap();
    let what = "DENY when source.ip notValues 10.20.1.10";
    b.check("client", "server", 8080, true, what);
    b.check("echo", "server", 8080, false, what);
    denied_by_destination += 1.0;
    b.check("legacy-1", "server", 8080, false, what);
    b.check("legacy-2", "server", 8080, false, what);
    policy_denied += 3.0;
    b.refusals(
        0,
        "outbound_denied_by_destination",
        denied_by_destination,
        what,
    );
    b.refusals(1, "policy_denied", policy_denied, what);

    // ALLOW every principal but echo's. A plaintext peer's empty principal is not echo's, so
    // the condition holds for it (rbac.rs: a negative match passes a peer without identity).
    b.bed
        .apply_policies(json!([authz(
            "allow-not-echo",
            "ALLOW",
            json!([{"when": [{"key": "source.principal",
                              "notValues": ["cluster.local/ns/demo/sa/echo"]}]}]),
        )]))
        .unwrap();
    let what = "ALLOW when source.principal notValues demo/sa/echo";
    b.check("client", "server", 8080, true, what);
    b.check("legacy-2", "server", 8080, true, what);
    b.check("echo", "server", 8080, false, what);
    denied_by_destination += 1.0;
    policy_denied += 1.0;
    b.refusals(
        0,
        "outbound_denied_by_destination",
        denied_by_destination,
        what,
    );
    b.refusals(1, "policy_denied", policy_denied, what);

    b.bed.apply_policies(json!([])).unwrap();
    b.check("echo", "server", 9090, true, "no policy");
}

/// A `when` on an HTTP key (here `request.headers[x-user]`), which ztunnel cannot check:
/// istiod ambient authorization.go `handleRule` drops an ALLOW rule naming one whole (the rule
/// allows nothing; the policy still applies); in a DENY rule it emits the condition as an
/// empty match, which ztunnel's rbac.rs skips, so that rule matches nothing, while HTTP
/// fields beside L4 ones are omitted and the L4 rest enforced (`hasEffectiveRules`, "enforced
/// without the HTTP rules").
#[test]
fn a_when_on_an_http_key_drops_an_allow_rule_and_voids_a_deny_rule() {
    let b = Bed::start();
    let (mut denied_by_destination, mut policy_denied) = (0.0, 0.0);

    // Rule 0 would allow 8080 if only its HTTP condition were ignored; it is dropped whole.
    b.bed
        .apply_policies(json!([authz(
            "allow-header",
            "ALLOW",
            json!([
                {"to": [{"operation": {"ports": ["8080"]}}],
                 "when": [{"key": "request.headers[x-user]", "values": ["alice"]}]},
                {"to": [{"operation": {"ports": ["9090"]}}]},
            ]),
        )]))
        .unwrap();
    let what = "ALLOW with an HTTP when key";
    b.check("client", "server", 8080, false, what);
    denied_by_destination += 1.0;
    b.check("legacy-2", "server", 8080, false, what);
    policy_denied += 2.0;
    b.check("client", "server", 9090, true, what);
    b.check("legacy-2", "server", 9090, true, what);
    b.refusals(
        0,
        "outbound_denied_by_destination",
        denied_by_destination,
        what,
    );
    b.refusals(1, "policy_denied", policy_denied, what);
    let e = b.explain(1, "demo/client", "demo/server:8080");
    assert_eq!(e["decision"]["allowed"], false, "{e}");
    assert_eq!(e["decision"]["reason"], "no_allow_matched", "{e}");
    let n = notes(&e, "demo", "allow-header");
    assert!(
        n.len() == 1
            && n[0].contains("rule 0")
            && n[0].contains("request.headers[x-user]")
            && n[0].contains("dropped"),
        "{n:?}"
    );

    // Rule 0 (namespace demo AND the HTTP condition) matches nothing; rule 1 (port 9090 and
    // a method) denies the whole port.
    b.bed
        .apply_policies(json!([authz(
            "deny-header",
            "DENY",
            json!([
                {"from": [{"source": {"namespaces": ["demo"]}}],
                 "when": [{"key": "request.headers[x-user]", "values": ["alice"]}]},
                {"to": [{"operation": {"ports": ["9090"], "methods": ["POST"]}}]},
            ]),
        )]))
        .unwrap();
    let what = "DENY with an HTTP when key and an HTTP method";
    b.check("client", "server", 8080, true, what);
    b.check("echo", "server", 8080, true, what);
    b.check("legacy-2", "server", 8080, true, what);
    b.check("client", "server", 9090, false, what);
    denied_by_destination += 1.0;
    b.check("legacy-2", "server", 9090, false, what);
    policy_denied += 2.0;
    b.refusals(
        0,
        "outbound_denied_by_destination",
        denied_by_destination,
        what,
    );
    b.refusals(1, "policy_denied", policy_denied, what);
    let e = b.explain(1, "demo/client", "demo/server:9090");
    assert_eq!(e["decision"]["allowed"], false, "{e}");
    assert_eq!(e["decision"]["policy"]["name"], "deny-header", "{e}");
    assert_eq!(e["decision"]["rule"], 1, "{e}");
    let n = notes(&e, "demo", "deny-header");
    assert!(
        n.iter()
            .any(|n| n.contains("rule 0") && n.contains("denies nothing")),
        "{n:?}"
    );
    assert!(
        n.iter()
            .any(|n| n.contains("rule 1") && n.contains("more than written")),
        "{n:?}"
    );
}

/// PeerAuthentication DISABLE: for Istio's ambient mode a workload whose effective mode is
/// DISABLE is not STRICT (istiod ambient authorization.go `convertedSelectorPeerAuthentications`
/// treats PERMISSIVE and DISABLE alike), so ztunnel accepts plaintext there, and mutual TLS as
/// always. A namespace-level policy overrides the mesh's, a workload-level one (selector)
/// overrides both, for the workloads it selects only.
#[test]
fn disable_accepts_plaintext_as_permissive_does() {
    let b = Bed::start();
    // Plaintext refused as STRICT by the server's daemon (n2) and by echo's (n1).
    let (mut strict_n2, mut strict_n1) = (0.0, 0.0);
    let strict = || json!({"mtls": {"mode": "STRICT"}});
    let disable = || json!({"mtls": {"mode": "DISABLE"}});
    let server_disable = || {
        pa(
            "demo",
            "server-disable",
            json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "DISABLE"}}),
        )
    };

    b.bed
        .apply_policies(json!([pa(ROOT, "mesh", strict())]))
        .unwrap();
    let what = "mesh STRICT";
    b.check("legacy-2", "server", 8080, false, what);
    strict_n2 += 1.0;
    b.check("legacy-1", "echo", 8080, false, what);
    strict_n1 += 1.0;
    b.check("client", "server", 8080, true, what);
    b.refusals(1, "inbound_plaintext_strict", strict_n2, what);
    b.refusals(0, "inbound_plaintext_strict", strict_n1, what);

    b.bed
        .apply_policies(json!([
            pa(ROOT, "mesh", strict()),
            pa("demo", "ns-disable", disable())
        ]))
        .unwrap();
    let what = "mesh STRICT, namespace DISABLE";
    b.check("legacy-2", "server", 8080, true, what);
    b.check("legacy-1", "server", 9090, true, what);
    b.check("legacy-1", "echo", 8080, true, what);
    b.check("client", "server", 8080, true, what);
    b.check("echo", "server", 9090, true, what);
    b.check("client", "echo", 8080, true, what);

    b.bed
        .apply_policies(json!([pa(ROOT, "mesh", strict()), server_disable()]))
        .unwrap();
    let what = "mesh STRICT, workload DISABLE for app=server";
    b.check("legacy-2", "server", 8080, true, what);
    b.check("legacy-1", "server", 9090, true, what);
    b.check("client", "server", 8080, true, what);
    b.check("legacy-1", "echo", 8080, false, what);
    strict_n1 += 1.0;

    b.bed
        .apply_policies(json!([pa("demo", "ns-strict", strict()), server_disable()]))
        .unwrap();
    let what = "namespace STRICT, workload DISABLE for app=server";
    b.check("legacy-2", "server", 8080, true, what);
    b.check("legacy-1", "server", 9090, true, what);
    b.check("client", "server", 9090, true, what);
    b.check("legacy-1", "echo", 8080, false, what);
    strict_n1 += 1.0;
    b.check("client", "echo", 8080, true, what);
    b.refusals(1, "inbound_plaintext_strict", strict_n2, what);
    b.refusals(0, "inbound_plaintext_strict", strict_n1, what);
}

/// `portLevelMtls` on a workload-level PeerAuthentication, keyed by the workload's target
/// port (the pod's own port here), as istiod ambient authorization.go converts it:
/// `convertPeerAuthentication` makes a DENY of plaintext where the port's effective mode is
/// STRICT, and `convertedSelectorPeerAuthentications` decides whether the workload refers to
/// it or to the static STRICT policy (under an inherited STRICT, only a PERMISSIVE port is an
/// exception: a DISABLE one is not looked for).
#[test]
fn port_level_mtls_makes_exceptions_per_target_port() {
    let b = Bed::start();
    let (mut strict_n2, mut strict_n1) = (0.0, 0.0);
    let server_ports = |spec: Value| {
        let mut spec = spec;
        spec["selector"] = json!({"matchLabels": {"app": "server"}});
        pa("demo", "server-ports", spec)
    };

    b.bed
        .apply_policies(json!([server_ports(json!({
            "mtls": {"mode": "STRICT"}, "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}))]))
        .unwrap();
    let what = "STRICT, 9090 PERMISSIVE";
    b.check("legacy-2", "server", 8080, false, what);
    strict_n2 += 1.0;
    b.check("legacy-2", "server", 9090, true, what);
    b.check("legacy-1", "server", 9090, true, what);
    b.check("client", "server", 8080, true, what);
    b.check("client", "server", 9090, true, what);
    // A workload-level policy reaches only the workloads it selects.
    b.check("legacy-1", "echo", 8080, true, what);
    b.refusals(1, "inbound_plaintext_strict", strict_n2, what);

    b.bed
        .apply_policies(json!([server_ports(json!({
            "mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"8080": {"mode": "STRICT"}}}))]))
        .unwrap();
    let what = "PERMISSIVE, 8080 STRICT";
    b.check("legacy-2", "server", 8080, false, what);
    b.check("legacy-1", "server", 8080, false, what);
    strict_n2 += 2.0;
    b.check("legacy-2", "server", 9090, true, what);
    b.check("client", "server", 8080, true, what);
    b.refusals(1, "inbound_plaintext_strict", strict_n2, what);

    // No mode of its own: the namespace's STRICT is merged into the converted policy.
    b.bed
        .apply_policies(json!([
            pa("demo", "ns-strict", json!({"mtls": {"mode": "STRICT"}})),
            server_ports(json!({"portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}})),
        ]))
        .unwrap();
    let what = "namespace STRICT, workload unset with 9090 PERMISSIVE";
    b.check("legacy-2", "server", 9090, true, what);
    b.check("legacy-2", "server", 8080, false, what);
    strict_n2 += 1.0;
    b.check("legacy-1", "echo", 8080, false, what);
    strict_n1 += 1.0;
    b.check("client", "server", 8080, true, what);

    b.bed
        .apply_policies(json!([
            pa("demo", "ns-strict", json!({"mtls": {"mode": "STRICT"}})),
            server_ports(json!({"portLevelMtls": {"9090": {"mode": "DISABLE"}}})),
        ]))
        .unwrap();
    let what = "namespace STRICT, workload unset with 9090 DISABLE";
    b.check("legacy-2", "server", 9090, false, what);
    b.check("legacy-2", "server", 8080, false, what);
    strict_n2 += 2.0;
    b.check("client", "server", 9090, true, what);
    b.refusals(1, "inbound_plaintext_strict", strict_n2, what);
    b.refusals(0, "inbound_plaintext_strict", strict_n1, what);
}

/// One discovery file with an ALLOW holding HTTP fields and `when` conditions, a mesh STRICT,
/// a namespace DISABLE and a workload PERMISSIVE with a STRICT port: every object loads
/// (both daemons ready, none marked unreadable, none failing closed, `ztunnel ctl` lists them
/// with their modes) and traffic is decided as Istio's ambient mode decides (istiod ambient
/// authorization.go: the HTTP rule dropped from the ALLOW, the `when` conditions ANDed,
/// DISABLE overriding the mesh's STRICT, the STRICT port refusing plaintext).
#[test]
fn one_file_with_http_fields_when_disable_and_port_level_mtls() {
    let b = Bed::start();
    let allow = authz(
        "allow-server",
        "ALLOW",
        json!([
            {"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]},
            {"when": [{"key": "source.principal", "values": ["cluster.local/ns/demo/sa/client"]},
                      {"key": "destination.port", "values": ["9090"]}]},
            {"from": [{"source": {"ipBlocks": ["10.20.2.11/32"]}}]},
        ]),
    );
    let policies = json!([
        allow,
        pa(ROOT, "mesh", json!({"mtls": {"mode": "STRICT"}})),
        pa("demo", "ns-disable", json!({"mtls": {"mode": "DISABLE"}})),
        pa(
            "demo",
            "server-ports",
            json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "PERMISSIVE"},
                   "portLevelMtls": {"8080": {"mode": "STRICT"}}})
        ),
    ]);
    b.bed.apply_policies(policies).unwrap();

    // Loaded: ready, every object read in full, listed with its action or mode.
    for (i, node) in b.bed.nodes.iter().enumerate() {
        let (status, body) =
            ztunnel_e2e::daemon::http(&node.ns, "GET", "127.0.0.1:15021", "/healthz/ready")
                .unwrap();
        assert_eq!(status, 200, "daemon {i}: {body}");
        let log = b.bed.log(i);
        assert!(!log.contains("bad discovery file"), "daemon {i}:\n{log}");
    }
    let (_, body) =
        ztunnel_e2e::daemon::http(&b.bed.nodes[1].ns, "GET", "127.0.0.1:15000", "/config_dump")
            .unwrap();
    let dump: Value = serde_json::from_str(&body).unwrap();
    let authz_dump = dump["discovery"]["authorizationPolicies"]
        .as_array()
        .unwrap();
    let peer_dump = dump["discovery"]["peerAuthentications"].as_array().unwrap();
    assert_eq!((authz_dump.len(), peer_dump.len()), (1, 3), "{body}");
    for p in authz_dump.iter().chain(peer_dump) {
        assert!(p.get("invalid").is_none(), "read in part only: {p}");
    }
    assert_eq!(authz_dump[0]["spec"]["rules"].as_array().unwrap().len(), 3);
    let ports = peer_dump
        .iter()
        .find(|p| p["metadata"]["name"] == "server-ports")
        .unwrap();
    assert_eq!(
        ports["spec"]["portLevelMtls"]["8080"]["mode"], "STRICT",
        "{ports}"
    );
    let listed = ctl(&b.bed, 1, &["policies"]);
    for (name, mode) in [
        ("allow-server", "ALLOW"),
        ("mesh", "STRICT"),
        ("ns-disable", "DISABLE"),
        ("server-ports", "PERMISSIVE"),
    ] {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().any(|w| w == name) && l.contains(mode)),
            "{name} {mode}:\n{listed}"
        );
    }
    // Nothing fails closed; the ALLOW's notes name only its dropped HTTP rule.
    let e = b.explain(1, "demo/client", "demo/server:8080");
    let n = notes(&e, "demo", "allow-server");
    assert!(
        n.len() == 1 && n[0].contains("rule 0") && n[0].contains("methods"),
        "{n:?}"
    );
    for c in e["considered"].as_array().unwrap() {
        for note in c["dropped"].as_array().into_iter().flatten() {
            assert!(!note.to_string().contains("fails closed"), "{e}");
        }
    }
    assert_eq!(e["decision"]["reason"], "no_allow_matched", "{e}");
    let e = b.explain(1, "plain/legacy-2", "demo/server:8080");
    assert_eq!(
        (&e["mtls_mode"], &e["decision"]["reason"]),
        (&json!("STRICT"), &json!("denied_by_peer_authentication")),
        "{e}"
    );
    assert_eq!(e["decision"]["policy"]["name"], "server-ports", "{e}");
    let e = b.explain(1, "plain/legacy-2", "demo/server:9090");
    assert_eq!(e["mtls_mode"], "PERMISSIVE", "{e}");
    assert_eq!(
        (&e["decision"]["policy"]["name"], &e["decision"]["rule"]),
        (&json!("allow-server"), &json!(2)),
        "{e}"
    );
    let e = b.explain(0, "plain/legacy-1", "demo/echo:8080");
    assert_eq!(
        (&e["mtls_mode"], &e["decision"]["allowed"]),
        (&json!("PERMISSIVE"), &json!(true)),
        "{e}"
    );

    // Decided as Istio does.
    let what = "one file";
    // Rule 0 (GET on 8080) is dropped: 8080 is open to nobody.
    b.check("client", "server", 8080, false, what);
    // Rule 1: the client's principal on 9090 only.
    b.check("client", "server", 9090, true, what);
    b.check("echo", "server", 9090, false, what);
    b.refusals(0, "outbound_denied_by_destination", 2.0, what);
    // Rule 2 lets legacy-2 in on 9090 (PERMISSIVE); on 8080 the STRICT port refuses it
    // before any authorization policy is looked at.
    b.check("legacy-2", "server", 9090, true, what);
    b.check("legacy-2", "server", 8080, false, what);
    b.refusals(1, "inbound_plaintext_strict", 1.0, what);
    // legacy-1 matches no ALLOW rule.
    b.check("legacy-1", "server", 9090, false, what);
    b.refusals(1, "policy_denied", 3.0, what);
    // The namespace's DISABLE overrides the mesh's STRICT for echo.
    b.check("legacy-1", "echo", 8080, true, what);
    b.check("client", "echo", 8080, true, what);
    b.refusals(0, "inbound_plaintext_strict", 0.0, what);
}
