//! L4 policy enforced by the destination's daemon on the two-node test bed, with real
//! traffic: denials by principal, namespace, port and ipBlock (the source's daemon gets 401,
//! the application never sees a connection, the access log names the policy); ALLOW
//! semantics; STRICT vs PERMISSIVE for a plaintext client; a new DENY closing an established
//! connection; two pods of one node, of two identities, each with its own tunnel connection to
//! one destination and judged by its own identity; `ztunnel ctl`. Istio's finer semantics (`when`, DISABLE, `portLevelMtls`) are
//! in `policy_istio.rs`.

#[path = "policy/bed.rs"]
#[allow(dead_code)]
mod bed;

use std::time::Duration;

use bed::*;

// Policy decided as Istio's ambient mode decides, on the same bed, in this binary.
mod policy_istio;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_e2e::daemon::metric;

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
    let outcome = b.bed.pod("client").ns.join(client);
    assert!(outcome.is_ok(), "the connection was not closed");
    let log = b.bed.log(1);
    assert!(log.contains("closed: denied by a policy change"), "{log}");
    let labels = [("reason", "policy_revoked")];
    let m = b
        .bed
        .metrics_when(1, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(metric(&m, "ztunnel_refusals_total", &labels), 1.0, "{m}");
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
    // The admin API's raw answers (no token needed) hold certificates' facts, never keys.
    for path in ["/config_dump", "/connections"] {
        let (status, body) =
            ztunnel_e2e::daemon::http(&b.bed.nodes[1].ns, "GET", "127.0.0.1:15000", path).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        for key in ["PRIVATE KEY", "BEGIN", "privateKey", "\"key\""] {
            assert!(!body.contains(key), "{path} holds {key:?}: {body}");
        }
    }
    let dump =
        ztunnel_e2e::daemon::http(&b.bed.nodes[1].ns, "GET", "127.0.0.1:15000", "/config_dump")
            .unwrap()
            .1;
    assert!(
        dump.contains("spiffe://cluster.local/ns/demo/sa/server"),
        "the dump lists the certificate: {dump}"
    );
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

/// Two enrolled pods of one node, of two identities, reach the same destination: each has its
/// own tunnel connection, and the destination judges each by its own identity. With an ALLOW
/// for `client` only, `echo` is refused while `client` holds a connection open to the same
/// destination (so a pooled connection carrying `client`'s identity exists and has room): if
/// `echo`'s stream rode it, it would be allowed as `client`. Over HTTP/2 and over QUIC.
#[test]
fn two_pods_never_share_a_tunnel_and_each_is_judged_by_its_own_identity() {
    isolation(Bed::start(), "h2");
}

#[test]
fn two_pods_never_share_a_quic_tunnel_and_each_is_judged_by_its_own_identity() {
    isolation(Bed::start_quic(), "quic");
}

fn isolation(b: Bed, transport: &str) {
    b.bed
        .apply_policies(json!([authz(
            "only-client",
            "ALLOW",
            json!([{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}])
        )]))
        .unwrap();
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let held = b.bed.pod("client").ns.spawn(async move {
        let mut s = TcpStream::connect(("10.20.2.10", 8080)).await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        // Held open while the other pod tries.
        let _ = up_tx.send(());
        let _ = go_rx.await;
        s.write_all(b"pong").await?;
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    });
    up_rx.blocking_recv().expect("client's connection is up");
    let before = b.accepted();
    b.check("echo", "server", 8080, false, "echo is not allowed");
    assert_eq!(b.accepted(), before, "the application never saw echo");
    let pool = b.bed.connections(0)["pool"].clone();
    let srcs: Vec<&str> = pool
        .as_array()
        .expect("the pool is a list")
        .iter()
        .filter(|c| c["addr"] == "10.20.2.10:15008")
        .map(|c| {
            assert_eq!(c["transport"], transport, "{pool}");
            c["src"].as_str().expect("src")
        })
        .collect();
    let mut distinct = srcs.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct,
        [
            "spiffe://cluster.local/ns/demo/sa/client",
            "spiffe://cluster.local/ns/demo/sa/echo"
        ],
        "one tunnel connection per source identity: {pool}"
    );
    go_tx.send(()).unwrap();
    let done = b.bed.pod("client").ns.join(held);
    assert_eq!(&done.expect("client's connection still works")[..], b"pong");
    let log = b.bed.log(1);
    let denied = log
        .lines()
        .filter(|l| l.contains("denied by policy") && l.contains("sa/echo"))
        .count();
    assert!(denied >= 1, "the destination judged echo as echo: {log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("denied by policy") && l.contains("sa/client")),
        "client was never denied"
    );
}
