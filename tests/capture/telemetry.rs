//! Istio's TCP telemetry on the test bed: after real traffic, every label of every
//! `istio_tcp_*` series at both reporters is compared with a table written from Istio's
//! documentation of its standard metrics (istio.io, "Istio Standard Metrics": the labels of
//! `istio_tcp_*` and what each says), as Istio's ztunnel fills them in, and the bytes are
//! counted exactly. A stream denied at the destination is reported there with its source
//! workload and `response_flags="DENY"`; a plain pod's connection with its workload and an
//! `unknown` principal and security policy. Metrics and readiness answer on IPv4 and IPv6.

use std::collections::BTreeMap;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_e2e::daemon;
use ztunnel_e2e::testbed::{TestBed, VIP};

/// The series of family `name`: each one's labels and value.
fn series(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let mut map = BTreeMap::new();
            for pair in labels.split("\",") {
                let (k, v) = pair.split_once("=\"")?;
                map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
            }
            Some((map, value.parse().ok()?))
        })
        .collect()
}

/// The value of the one series of `name` whose labels are exactly `want`; panics (showing
/// every series of the family) when there is none.
fn exactly(text: &str, name: &str, want: &BTreeMap<String, String>) -> f64 {
    let all = series(text, name);
    all.iter()
        .find(|(l, _)| l == want)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| {
            let shown: Vec<String> = all.iter().map(|(l, v)| format!("{l:?} {v}")).collect();
            panic!(
                "no {name} series with exactly {want:?}; it has:\n{}",
                shown.join("\n")
            )
        })
}

/// The labels Istio's documentation lists for its TCP metrics, with what each must be for a
/// connection from pod `client` (canonical service `frontend`, revision `r2`, by Istio's
/// labels) to pod `server` (of workload `server-deploy`, label `app: server`,
/// `version: v1`, on a node of zone `eu-west1-b`) through Service `server`, both in namespace
/// `demo` of cluster `Kubernetes` (the client's node has no locality).
fn expected(reporter: &str, flags: &str) -> BTreeMap<String, String> {
    [
        // Who reported it: the client's proxy or the server's.
        ("reporter", reporter),
        // The source: its workload, canonical service and revision, namespace, identity,
        // `app` and `version` (the canonical ones, as ztunnel fills them), cluster.
        ("source_workload", "client"),
        ("source_canonical_service", "frontend"),
        ("source_canonical_revision", "r2"),
        ("source_workload_namespace", "demo"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/demo/sa/client",
        ),
        ("source_app", "frontend"),
        ("source_version", "r2"),
        ("source_cluster", "Kubernetes"),
        // The service the client asked for: host, name, namespace.
        ("destination_service", "server.demo.svc.cluster.local"),
        ("destination_service_name", "server"),
        ("destination_service_namespace", "demo"),
        // The destination, as the source.
        ("destination_workload", "server-deploy"),
        ("destination_canonical_service", "server"),
        ("destination_canonical_revision", "v1"),
        ("destination_workload_namespace", "demo"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/demo/sa/server",
        ),
        ("destination_app", "server"),
        ("destination_version", "v1"),
        ("destination_cluster", "Kubernetes"),
        // L4: the protocol, why it was not carried (`-`: it was), and mutual TLS.
        ("request_protocol", "tcp"),
        ("response_flags", flags),
        ("connection_security_policy", "mutual_tls"),
        // Where each end runs, as Istio's ztunnel adds it.
        ("source_region", "unknown"),
        ("source_zone", "unknown"),
        ("destination_region", "eu-west1"),
        ("destination_zone", "eu-west1-b"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

#[test]
fn istio_tcp_metrics_carry_istios_labels_and_values_at_both_reporters() {
    let bed = TestBed::start();
    // Metrics and readiness answer on both address families of the node (bound on `[::]`).
    for host in ["127.0.0.1", "[::1]"] {
        let ns = &bed.nodes[1].ns;
        let (ready, _) = daemon::http(ns, "GET", &format!("{host}:15021"), "/healthz/ready")
            .unwrap_or_else(|e| panic!("readiness on {host}: {e:#}"));
        assert_eq!(ready, 200, "{host}");
        let (status, body) = daemon::http(ns, "GET", &format!("{host}:15020"), "/metrics")
            .unwrap_or_else(|e| panic!("metrics on {host}: {e:#}"));
        assert!(status == 200 && body.contains("# EOF"), "{host}: {status}");
    }
    bed.edit_discovery(|doc| {
        for w in doc["workloads"].as_array_mut().unwrap() {
            match w["name"].as_str() {
                Some("server") => {
                    w["workloadName"] = json!("server-deploy");
                    w["labels"]["version"] = json!("v1");
                    w["locality"] = json!("eu-west1/eu-west1-b");
                }
                Some("client") => {
                    w["labels"]["service.istio.io/canonical-name"] = json!("frontend");
                    w["labels"]["service.istio.io/canonical-revision"] = json!("r2");
                }
                _ => {}
            }
        }
    })
    .expect("labels");
    let srv = bed.pod("server").ns.serve(8080, |l| async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read");
        s.write_all(&[b'r'; 333]).await.expect("write");
        got.len()
    });
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
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let carried = expected(reporter, "-");
        let pairs: Vec<(&str, &str)> = carried
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // The close is counted when both directions have ended, a moment after the client's.
        let m = bed.metrics_when(node, "istio_tcp_connections_closed_total", &pairs, 1.0);
        for (family, want) in [
            ("istio_tcp_connections_opened_total", 1.0),
            ("istio_tcp_connections_closed_total", 1.0),
            ("istio_tcp_received_bytes_total", 1000.0),
            ("istio_tcp_sent_bytes_total", 333.0),
        ] {
            assert_eq!(exactly(&m, family, &carried), want, "{reporter} {family}");
        }
        assert!(
            series(&m, "istio_tcp_connections_failed_total").is_empty(),
            "{reporter}: nothing failed yet"
        );
    }

    // The same pods, the stream denied by the server's policy.
    bed.edit_discovery(|doc| {
        doc["policies"] = json!([{
            "apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "no-client", "namespace": "demo"},
            "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                     "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]}
        }]);
    })
    .expect("policy");
    let denied = bed.pod("client").ns.block_on(async {
        let mut s = TcpStream::connect((VIP, 80)).await?;
        s.write_all(b"q").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await
    });
    assert!(denied.is_err(), "denied: {denied:?}");
    // At the destination: opened as `-`, closed and failed as `DENY`, the source known.
    let deny = expected("destination", "DENY");
    let pairs: Vec<(&str, &str)> = deny.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let m = bed.metrics_when(1, "istio_tcp_connections_failed_total", &pairs, 1.0);
    assert_eq!(
        exactly(&m, "istio_tcp_connections_failed_total", &deny),
        1.0
    );
    assert_eq!(
        exactly(&m, "istio_tcp_connections_closed_total", &deny),
        1.0
    );
    assert_eq!(
        exactly(
            &m,
            "istio_tcp_connections_opened_total",
            &expected("destination", "-")
        ),
        2.0
    );
    // At the source: the destination refused the stream: `CONNECT`, as Istio's ztunnel says.
    let refused = expected("source", "CONNECT");
    let pairs: Vec<(&str, &str)> = refused
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let m = bed.metrics_when(0, "istio_tcp_connections_failed_total", &pairs, 1.0);
    assert_eq!(
        exactly(&m, "istio_tcp_connections_failed_total", &refused),
        1.0
    );

    // A plain pod's connection (no tunnel, no certificate): its source is known by address,
    // its principal and the security policy are `unknown`, never what discovery says of it.
    let srv = bed.pod("server").ns.serve(8080, |l| async move {
        let (mut s, _) = l.accept().await.expect("accept");
        s.write_all(b"p").await.expect("write");
    });
    let got = bed.pod("legacy-1").ns.block_on(async {
        let mut s = TcpStream::connect(("10.20.2.10", 8080)).await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map(|_| b[0])
    });
    assert_eq!(got.unwrap(), b'p');
    bed.pod("server").ns.join(srv);
    let plain = [
        ("reporter", "destination"),
        ("source_workload_namespace", "plain"),
        ("source_principal", "unknown"),
        ("connection_security_policy", "unknown"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/demo/sa/server",
        ),
    ];
    let m = bed.metrics_when(1, "istio_tcp_connections_opened_total", &plain, 1.0);
    let from_plain: Vec<_> = series(&m, "istio_tcp_connections_opened_total")
        .into_iter()
        .filter(|(l, _)| l["source_workload_namespace"] == "plain")
        .collect();
    assert_eq!(from_plain.len(), 1, "{from_plain:?}");
    let (labels, _) = &from_plain[0];
    assert_eq!(labels["source_workload"], "legacy-1", "{labels:?}");
    assert_eq!(labels["source_principal"], "unknown", "{labels:?}");
    assert_eq!(
        labels["connection_security_policy"], "unknown",
        "{labels:?}"
    );
}
