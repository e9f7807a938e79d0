//! HBONE's forms and headers as Istio's gateways and waypoints use them, against b's daemon
//! from host c, with our own HTTP/2 client and with an independent one (Python's `h2`,
//! `tests/peers/hbone_client.py`): `CONNECT` to a service hostname (in the default cluster
//! domain and in one configured), `forwarded` with `host=`,
//! `traceparent` and `baggage`, the HTTP/2 settings, and peer certificates with several URI
//! SANs on both sides.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde_json::{json, Value};
use ztunnel::net::ConnectOptions;
use ztunnel_e2e::certs::{self, TestCert};
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, NodeOptions, B_IP, C_IP};

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";
const HOST: &str = "server.demo.svc.cluster.local";
const ALT_HOST: &str = "server-alt.demo.svc.cluster.local";
/// What b's daemon answers `200` with: its workload, `server`, with no revision label.
const SERVER_BAGGAGE: &str = "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,k8s.pod.name=server,service.name=server,service.version=latest";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// b's discovery has two services over its workload: `server` (80 → 8080) and `server-alt`
/// (8080 → 8080); b echoes every connection on 8080.
fn bed() -> Mesh {
    bed_with(vec![], vec![])
}

/// [`bed`] with b's daemon run with `args` too, and `policies` in its discovery.
fn bed_with(args: Vec<String>, policies: Vec<Value>) -> Mesh {
    let svc = |name: &str, vip: &str, port: u16| {
        json!({"name": name, "namespace": "demo", "vips": [vip],
               "ports": [{"port": port, "targetPort": 8080}], "selector": {"app": "server"}})
    };
    let b = NodeOptions {
        services: vec![
            svc("server", "10.96.0.10", 80),
            svc("server-alt", "10.96.0.11", 8080),
        ],
        extra_args: args,
        policies,
        ..Default::default()
    };
    let mesh = Mesh::builder().b(b).start();
    mesh.b.serve(8080, |l| async move {
        loop {
            let _ = ztunnel_e2e::apps::echo_one(&l).await;
        }
    });
    mesh
}

fn cert(mesh: &Mesh, name: &str, uris: &[&str]) -> TestCert {
    certs::issue(&mesh.ca_dir, mesh.dir.path(), name, uris).expect("test certificate")
}

/// What one `CONNECT` got: the status, the `baggage` of the answer, and the echo of `payload`.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    baggage: Option<String>,
    echo: String,
}

/// One `CONNECT` from c to b with our client (h2, rustls).
fn connect_ours(mesh: &Mesh, cert: &TestCert, authority: &str, headers: &[(&str, &str)]) -> Answer {
    let cfg = cert.client_config(&[SERVER]);
    let authority = authority.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    mesh.c.block_on(async move {
        let opts = ConnectOptions {
            mark: None,
            timeout: std::time::Duration::from_secs(5),
        };
        let tunnel = format!("{B_IP}:15008").parse().unwrap();
        let (send, conn) = ztunnel::hbone::client::connect(tunnel, cfg, opts)
            .await
            .expect("tunnel");
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority);
        for (k, v) in &headers {
            req = req.header(k, v);
        }
        let mut send = send.ready().await.expect("ready");
        let (resp, mut stream) = send
            .send_request(req.body(()).unwrap(), false)
            .expect("send");
        let resp = resp.await.expect("answer");
        let status = resp.status().as_u16();
        let baggage = resp
            .headers()
            .get("baggage")
            .map(|v| v.to_str().unwrap().to_owned());
        let mut echo = String::new();
        if status == 200 {
            stream
                .send_data(Bytes::from_static(b"ping"), true)
                .expect("data");
            let mut body = resp.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("data");
                let _ = body.flow_control().release_capacity(chunk.len());
                echo.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
        Answer {
            status,
            baggage,
            echo,
        }
    })
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/hbone_client.py")
}

/// Runs the Python client from c to b: its output, or why it failed (a refused handshake).
fn run_python(
    mesh: &Mesh,
    cert: &TestCert,
    authority: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<String> {
    let (script, addr) = (script(), format!("{B_IP}:15008"));
    let mut args = vec![
        script.to_str().unwrap(),
        &addr,
        authority,
        cert.chain_pem.to_str().unwrap(),
        cert.key_pem.to_str().unwrap(),
        cert.roots_pem.to_str().unwrap(),
        "ping",
    ];
    let extra: Vec<String> = headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
    args.extend(extra.iter().map(String::as_str));
    mesh.c.exec("python3", &args)
}

/// One `CONNECT` from c to b with Python's `h2`; the script's JSON report.
fn connect_python(
    mesh: &Mesh,
    cert: &TestCert,
    authority: &str,
    headers: &[(&str, &str)],
) -> Value {
    let out = run_python(mesh, cert, authority, headers).unwrap_or_else(|e| {
        panic!("python3 with h2 is a prerequisite (scripts/prereqs.sh installs it): {e:#}")
    });
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// b has counted `want` streams from the client to `service` (waiting for the count).
fn opened_for(mesh: &Mesh, service: &str, want: f64) {
    assert_metric(
        &mesh.b,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("destination_service", service),
            ("source_principal", CLIENT),
        ],
        want,
    );
}

/// The daemon in `ns` reaches `want` on the series (waiting for it), or the test fails.
fn assert_metric(ns: &ztunnel_e2e::netns::Netns, name: &str, labels: &[(&str, &str)], want: f64) {
    let m = Mesh::metrics_when(ns, name, labels, want);
    assert_eq!(metric(&m, name, labels), want, "{name}{labels:?}:\n{m}");
}

#[test]
fn service_hostnames_forwarded_host_baggage_and_traceparent_with_our_client() {
    let mesh = bed();
    let client = cert(&mesh, "client", &[CLIENT]);
    let fwd_host = format!("for=\"{C_IP}:4000\";host={ALT_HOST}");
    // A service hostname and port: the local workload's target port, reported as that service.
    let got = connect_ours(
        &mesh,
        &client,
        &format!("{HOST}:80"),
        &[("traceparent", TRACEPARENT)],
    );
    assert_eq!(
        got,
        Answer {
            status: 200,
            baggage: Some(SERVER_BAGGAGE.into()),
            echo: "ping".into()
        }
    );
    opened_for(&mesh, HOST, 1.0);
    // An address: the service is the one `forwarded: host=` names among the workload's…
    let got = connect_ours(
        &mesh,
        &client,
        &format!("{B_IP}:8080"),
        &[("forwarded", &fwd_host)],
    );
    assert_eq!(got.status, 200, "{got:?}");
    opened_for(&mesh, ALT_HOST, 1.0);
    // …else the first whose target port is the stream's.
    let got = connect_ours(&mesh, &client, &format!("{B_IP}:8080"), &[]);
    assert_eq!(got.status, 200, "{got:?}");
    opened_for(&mesh, HOST, 2.0);
    // A hostname or a port b does not know: 503, counted.
    for authority in ["nope.demo.svc.cluster.local:80", &format!("{HOST}:81")] {
        let got = connect_ours(&mesh, &client, authority, &[]);
        assert_eq!(got.status, 503, "{authority}: {got:?}");
    }
    let m = Mesh::metrics(&mesh.b);
    assert_eq!(
        metric(
            &m,
            "ztunnel_refusals_total",
            &[("reason", "inbound_unknown_service")]
        ),
        2.0,
        "{m}"
    );
    // The trace context the client sent is in b's access log for that stream.
    let log = mesh.b_daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("connection closed") && l.contains(TRACEPARENT)),
        "b's access log carries the traceparent:\n{log}"
    );
}

/// With another cluster domain, service hostnames are in it: a `CONNECT` to one is carried and
/// reported under it; one under `cluster.local` names no service.
#[test]
fn service_hostnames_in_the_configured_cluster_domain() {
    let mesh = bed_with(
        vec!["--cluster-domain".into(), "corp.internal".into()],
        vec![],
    );
    let client = cert(&mesh, "client", &[CLIENT]);
    let host = "server.demo.svc.corp.internal";
    let got = connect_ours(&mesh, &client, &format!("{host}:80"), &[]);
    assert_eq!((got.status, got.echo.as_str()), (200, "ping"), "{got:?}");
    opened_for(&mesh, host, 1.0);
    let got = connect_ours(&mesh, &client, &format!("{HOST}:80"), &[]);
    assert_eq!(got.status, 503, "{got:?}");
}

/// A policy on source addresses judges the tunnel's own source address: a peer's
/// `forwarded: for=` is its claim, reported, never trusted by policy.
#[test]
fn ip_blocks_judge_the_tunnels_source_not_the_forwarded_claim() {
    let deny_c = json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-c", "namespace": "demo"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": [format!("{C_IP}/32")]}}]}]}});
    let allow_other = json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-other", "namespace": "demo"},
        "spec": {"rules": [{"from": [{"source": {"ipBlocks": ["10.9.9.9/32"]}}]}]}});
    for policy in [deny_c, allow_other] {
        let mesh = bed_with(vec![], vec![policy.clone()]);
        let client = cert(&mesh, "client", &[CLIENT]);
        let spoofed = [("forwarded", "for=\"10.9.9.9:4000\"")];
        let got = connect_ours(&mesh, &client, &format!("{B_IP}:8080"), &spoofed);
        assert_eq!(got.status, 401, "{}: {got:?}", policy["metadata"]["name"]);
    }
}

#[test]
fn an_independent_http2_client_gets_the_same_answers_and_istios_settings() {
    let mesh = bed();
    let client = cert(&mesh, "client", &[CLIENT]);
    let got = connect_python(
        &mesh,
        &client,
        &format!("{HOST}:80"),
        &[("traceparent", TRACEPARENT)],
    );
    assert_eq!(got["status"], 200, "{got}");
    assert_eq!(got["headers"]["baggage"], SERVER_BAGGAGE, "{got}");
    assert_eq!(got["body"], "ping", "{got}");
    assert_eq!(got["settings"]["MAX_CONCURRENT_STREAMS"], 200, "{got}");
    assert_eq!(got["settings"]["MAX_HEADER_LIST_SIZE"], 65536, "{got}");
    opened_for(&mesh, HOST, 1.0);
    let fwd = format!("for=\"{C_IP}:4000\";host={ALT_HOST}");
    let got = connect_python(
        &mesh,
        &client,
        &format!("{B_IP}:8080"),
        &[("forwarded", &fwd)],
    );
    assert_eq!(
        (got["status"].clone(), got["body"].clone()),
        (json!(200), json!("ping"))
    );
    opened_for(&mesh, ALT_HOST, 1.0);
    let got = connect_python(&mesh, &client, "nope.demo.svc.cluster.local:80", &[]);
    assert_eq!(got["status"], 503, "{got}");
    let got = connect_python(&mesh, &client, "a..b:80", &[]);
    assert_eq!(got["status"], 400, "{got}");
}

/// A client certificate with several URI SANs, the first of another trust domain: b accepts
/// it, and reads the first identity of its own trust domain as the source.
#[test]
fn a_client_certificate_with_several_uri_sans_is_accepted_as_istio_accepts_it() {
    let mesh = bed();
    let uris = [
        "spiffe://other.local/ns/demo/sa/client",
        CLIENT,
        "spiffe://cluster.local/ns/demo/sa/later",
    ];
    let client = cert(&mesh, "several", &uris);
    let got = connect_python(&mesh, &client, &format!("{B_IP}:8080"), &[]);
    assert_eq!(got["status"], 200, "{got}");
    opened_for(&mesh, HOST, 1.0);
    // None of them in b's trust domain: the handshake fails.
    let foreign = cert(
        &mesh,
        "foreign",
        &["spiffe://other.local/ns/demo/sa/client"],
    );
    let outcome = run_python(&mesh, &foreign, &format!("{B_IP}:8080"), &[]);
    assert!(
        outcome
            .as_ref()
            .map_or(true, |o| !o.contains("\"status\": 200")),
        "{outcome:?}"
    );
    assert_metric(
        &mesh.b,
        "ztunnel_refusals_total",
        &[("reason", "inbound_tls_handshake")],
        1.0,
    );
}

/// A server certificate with several URI SANs: a's daemon accepts it when one of them is the
/// identity it expects of the destination.
#[test]
fn a_server_certificate_with_several_uri_sans_is_accepted_as_istio_accepts_it() {
    use tokio::io::AsyncWriteExt;
    let mesh = Mesh::builder().destination_on_c("several").start();
    let server = cert(
        &mesh,
        "server",
        &["spiffe://cluster.local/ns/demo/sa/alias", SERVER],
    );
    mesh.serve_tunnels_on_c(server.server_config(), |mut conn| async move {
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let mut send = respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                let mut body = req.into_body();
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    let _ = send.send_data(chunk, false);
                }
                let _ = send.send_data(Bytes::new(), true);
            });
        }
    });
    let echoed = mesh.a.block_on(async {
        let mut s = tokio::net::TcpStream::connect((C_IP, 8080)).await?;
        s.write_all(b"hello").await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut back).await?;
        Ok::<_, std::io::Error>(back)
    });
    assert_eq!(echoed.expect("through the tunnel"), b"hello");
    assert_metric(
        &mesh.a,
        "istio_tcp_connections_closed_total",
        &[("reporter", "source"), ("destination_principal", SERVER)],
        1.0,
    );
}
