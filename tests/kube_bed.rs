//! The in-pod test bed driven entirely by the real Kubernetes API server
//! (`harness::kubebed`): the daemons discover namespaces, pods, services, endpoint slices and
//! policies from it with `deploy/`'s credentials, while the test plays the kubelet and the
//! controllers. Needs root, `ip`, `nft`, `containernetworking-plugins` and the control plane
//! that `scripts/prereqs.sh` builds.
//!
//! - `pods_policies_and_enrollment_follow_the_api_server`: pods of an ambient namespace are
//!   enrolled at CNI ADD and carried in mutual TLS (real client address, the client's identity
//!   at the destination), through the Service's cluster IP too; the API server reached
//!   through the `kubernetes` Service, whose endpoint is no pod, a Service whose endpoint is
//!   a host-network pod, and a selectorless Service on its slice's port (all passed
//!   through); a node-local Service with no endpoint on the client's node refuses it; a plain
//!   pod reaches the server in plaintext; labelling the plain namespace enrolls its running pod without CNI, removing
//!   the label releases it; an `AuthorizationPolicy` written to the API server closes a live
//!   connection it denies and refuses new ones; an ALLOW whose rule names only HTTP methods
//!   keeps its fields, denies as Istio's ambient mode does (the rule matches nothing) and says
//!   why in its status; a DENY with a value the schema lets through but no daemon can read
//!   fails closed and says so; a STRICT PeerAuthentication refuses the plain pod; `deploy/`'s
//!   RBAC for the daemon matches what the daemons did (every grant used, nothing forbidden).
//! - `when_disable_and_port_level_mtls_from_the_api_server`: a workload STRICT with a
//!   PERMISSIVE port, a namespace DISABLE and an ALLOW on `when` conditions, each written to
//!   the API server, accepted as written and deciding as Istio's ambient mode does.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::access_lines;
use ztunnel_e2e::kubebed::{has_table, http_get, spec, wait_for, whoami, Pause};
use ztunnel_e2e::testbed::TestBed;

/// The bed on the real API server with `client` and `legacy` on n1 (`demo`, enrolled, and
/// `plain`, not) and `server` on n2 (`demo`).
fn three_pods_on_the_api_server() -> TestBed {
    TestBed::builder()
        .pods(vec![
            spec("client", "demo", 0, "10.20.1.10"),
            spec("server", "demo", 1, "10.20.2.10"),
            spec("legacy", "plain", 0, "10.20.1.11"),
        ])
        .kube(json!({}))
        .try_start()
        .expect("the bed on the real API server")
}

/// Service `name` in namespace `ns` with `spec`, and one EndpointSlice of it with `ports` and
/// `endpoints` (as the endpoint-slice controller writes it, or a user for a selectorless
/// Service); its cluster IP.
fn service_with_slice(
    cp: &ztunnel_e2e::controlplane::ControlPlane,
    ns: &str,
    name: &str,
    spec: Value,
    ports: Value,
    endpoints: Value,
) -> String {
    let svc = cp
        .apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}))
        .unwrap();
    cp.apply(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints}),
    )
    .unwrap();
    svc[0]["spec"]["clusterIP"].as_str().unwrap().to_string()
}

#[test]
fn pods_policies_and_enrollment_follow_the_api_server() {
    let bed = three_pods_on_the_api_server();
    let demo = bed.api_namespace("demo");
    let plain = bed.api_namespace("plain");
    bed.pod("server").ns.serve_dual(8080, apps::whoami_server);
    bed.pod("legacy").ns.serve_dual(8080, apps::whoami_server);

    // Enrolled at CNI ADD, from what the API server says of the namespace.
    assert!(has_table(&bed.pod("client").ns));
    assert!(has_table(&bed.pod("server").ns));
    assert!(!has_table(&bed.pod("legacy").ns));

    // In the mesh: the real client address, through the pod IP and the Service's cluster IP.
    wait_for("the server app", || {
        whoami(&bed, "client", "10.20.2.10", 8080).is_ok()
    });
    assert_eq!(
        whoami(&bed, "client", "10.20.2.10", 8080).unwrap(),
        "10.20.1.10"
    );
    let vip = bed.service_vip();
    wait_for(
        "the client's daemon to learn the Service's endpoint",
        || whoami(&bed, "client", &vip, 80).is_ok(),
    );
    assert_eq!(whoami(&bed, "client", &vip, 80).unwrap(), "10.20.1.10");
    // The API server through the `kubernetes` Service (10.96.0.1:443), whose endpoint is the
    // API server's own address, no pod: passed through, as Istio does, and answered (plain
    // HTTP to its TLS port, which it says).
    let api = http_get(&bed, "client", "10.96.0.1", 443);
    assert!(
        api.as_ref()
            .is_ok_and(|a| a.contains("HTTP request to an HTTPS server")),
        "the API server through its Service: {api:?}"
    );
    // A Service whose endpoint is a host-network pod (a node agent on n2, at its node's
    // address): no workload, passed through in plaintext, as Istio does.
    bed.nodes[1].ns.serve_dual(9100, apps::whoami_server);
    let cp = bed.kube.as_ref().unwrap().cp;
    let n2 = &bed.nodes[1].name;
    cp.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "exporter", "namespace": demo, "labels": {"app": "exporter"}},
        "spec": {"nodeName": n2, "hostNetwork": true,
                 "containers": [{"name": "exporter", "image": "exporter"}]}}))
        .unwrap();
    let exporter = service_with_slice(
        cp,
        &demo,
        "exporter",
        json!({"selector": {"app": "exporter"},
               "ports": [{"name": "metrics", "port": 9100, "protocol": "TCP"}]}),
        json!([{"name": "metrics", "port": 9100, "protocol": "TCP"}]),
        json!([{"addresses": ["192.168.77.2"], "conditions": {"ready": true}, "nodeName": n2,
                "targetRef": {"kind": "Pod", "namespace": demo, "name": "exporter"}}]),
    );
    wait_for(
        "the client's daemon to learn the host-network endpoint",
        || whoami(&bed, "client", &exporter, 9100).is_ok(),
    );
    assert_eq!(
        whoami(&bed, "client", &exporter, 9100).unwrap(),
        "10.20.1.10"
    );
    // A selectorless Service (port 5432, no targetPort) whose own slice names an address on
    // another port: reached on the slice's port, as kube-proxy does.
    let external = service_with_slice(
        cp,
        &demo,
        "external",
        json!({"ports": [{"name": "db", "port": 5432, "protocol": "TCP"}]}),
        json!([{"name": "db", "port": 9100, "protocol": "TCP"}]),
        json!([{"addresses": ["192.168.77.2"]}]),
    );
    wait_for(
        "the client's daemon to learn the selectorless Service",
        || whoami(&bed, "client", &external, 5432).is_ok(),
    );
    // Node-local: the exporter's only endpoint is on n2, so the client on n1 is refused.
    cp.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "exporter", "namespace": demo},
        "spec": {"selector": {"app": "exporter"}, "internalTrafficPolicy": "Local",
                 "ports": [{"name": "metrics", "port": 9100, "protocol": "TCP"}]}}))
        .unwrap();
    wait_for("the node-local Service to refuse the client", || {
        whoami(&bed, "client", &exporter, 9100).is_err()
    });
    // A plain pod reaches the server in plaintext (PERMISSIVE by default).
    assert_eq!(
        whoami(&bed, "legacy", "10.20.2.10", 8080).unwrap(),
        "10.20.1.11"
    );
    let client_id = format!("spiffe://cluster.local/ns/{demo}/sa/client");
    let inbound_from_client = |bed: &TestBed| {
        access_lines(&bed.log(1))
            .iter()
            .filter(|l| {
                l["message"] == "connection closed"
                    && l["direction"] == "inbound"
                    && l["src_identity"] == client_id.as_str()
                    && l["src_workload"] == format!("{demo}/client").as_str()
            })
            .count()
    };
    wait_for(
        "the server's daemon to log both tunnelled connections",
        || inbound_from_client(&bed) >= 2,
    );

    // Labelling the plain namespace enrolls its running pod without CNI; removing the label
    // releases it.
    let _pause = Pause::of(&bed, "legacy");
    bed.label_namespace("plain", json!({"ztunnel.dev/dataplane-mode": "ambient"}))
        .unwrap();
    wait_for("legacy enrolled by the label", || {
        has_table(&bed.pod("legacy").ns)
    });
    wait_for("the enrollment annotation", || {
        bed.kube
            .as_ref()
            .unwrap()
            .cp
            .get("v1", "Pod", Some(&plain), "legacy")
            .unwrap()["metadata"]["annotations"]["ztunnel.dev/enrollment"]
            == "enrolled"
    });
    assert_eq!(
        whoami(&bed, "client", "10.20.1.11", 8080).unwrap(),
        "10.20.1.10"
    );
    // Carried in the mesh: the enrolled pod's side saw the client's identity.
    let legacy_id = format!("spiffe://cluster.local/ns/{plain}/sa/legacy");
    wait_for(
        "the tunnel into the relabelled pod in the access log",
        || {
            access_lines(&bed.log(0)).iter().any(|l| {
                l["message"] == "connection closed"
                    && l["direction"] == "inbound"
                    && l["src_identity"] == client_id.as_str()
                    && l["dst_identity"] == legacy_id.as_str()
            })
        },
    );
    bed.label_namespace("plain", json!({})).unwrap();
    wait_for("legacy released", || !has_table(&bed.pod("legacy").ns));

    // A policy written to the API server: a live connection it denies is closed, new ones
    // are refused.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    bed.pod("server").ns.serve(9090, apps::echo_interactive);
    let held = bed.pod("client").ns.spawn(async move {
        let mut s = TcpStream::connect(("10.20.2.10", 9090))
            .await
            .expect("connect");
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("echo");
        tx.send(()).unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("established");
    bed.apply_kube_policies(json!({
        "apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"principals": [client_id.trim_start_matches("spiffe://")]}}]}]}}))
    .unwrap();
    let outcome = bed.pod("client").ns.join(held);
    assert!(outcome.is_ok(), "the denied connection was not closed");
    assert!(
        whoami(&bed, "client", "10.20.2.10", 8080).is_err(),
        "a new connection was let through"
    );
    let log = bed.log(1);
    assert!(log.contains("closed: denied by a policy change"), "{log}");
    // The plain pod is not in the policy's scope of principals: still let in.
    assert_eq!(
        whoami(&bed, "legacy", "10.20.2.10", 8080).unwrap(),
        "10.20.1.11"
    );

    let cp = bed.kube.as_ref().unwrap().cp;
    let condition = |kind: &str, name: &str| -> Value {
        cp.get("security.ztunnel.dev/v1", kind, Some(&demo), name)
            .and_then(|o| {
                o["status"]["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == "ZtunnelAccepted").cloned())
            })
            .unwrap_or(Value::Null)
    };
    wait_for("the DENY's status", || {
        !condition("AuthorizationPolicy", "deny-client").is_null()
    });
    let deny_status = condition("AuthorizationPolicy", "deny-client");
    assert_eq!(deny_status["status"], "True", "{deny_status}");
    assert_eq!(deny_status["reason"], "Accepted", "{deny_status}");
    cp.delete(
        "security.ztunnel.dev/v1",
        "AuthorizationPolicy",
        Some(&demo),
        "deny-client",
    )
    .unwrap();
    wait_for("the client let in again", || {
        whoami(&bed, "client", "10.20.2.10", 8080).is_ok()
    });

    // An ALLOW whose only `to` names HTTP methods. Nothing is pruned (the CRD declares every
    // field of Istio's schema), and as in Istio's ambient mode the node daemon cannot check a
    // method, so the rule matches no connection: with an ALLOW in force, every connection to
    // the server is denied, in the mesh and in plaintext. The status says why.
    bed.apply_kube_policies(json!({
        "apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "get-only", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals": [client_id.trim_start_matches("spiffe://")]}}],
                            "to": [{"operation": {"methods": ["GET"]}}]}]}}))
    .unwrap();
    let stored = cp
        .get(
            "security.ztunnel.dev/v1",
            "AuthorizationPolicy",
            Some(&demo),
            "get-only",
        )
        .unwrap();
    assert_eq!(
        stored["spec"]["rules"][0]["to"][0]["operation"]["methods"][0],
        "GET"
    );
    wait_for("the HTTP-only ALLOW to deny the client", || {
        whoami(&bed, "client", "10.20.2.10", 8080).is_err()
    });
    assert!(whoami(&bed, "legacy", "10.20.2.10", 8080).is_err());
    wait_for("the status of the HTTP-only ALLOW", || {
        condition("AuthorizationPolicy", "get-only")["reason"] == "UnsupportedValue"
    });
    let c = condition("AuthorizationPolicy", "get-only");
    assert!(c["message"].as_str().unwrap().contains("methods"), "{c}");
    cp.delete(
        "security.ztunnel.dev/v1",
        "AuthorizationPolicy",
        Some(&demo),
        "get-only",
    )
    .unwrap();
    wait_for("the client let in again", || {
        whoami(&bed, "client", "10.20.2.10", 8080).is_ok()
    });

    // A value the API server's schema lets through but that is no address (its IPv6 pattern
    // is loose): the DENY fails closed, denying every connection to the server, and says so.
    bed.apply_kube_policies(json!({
        "apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "bad-block", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"ipBlocks": ["1:2:3:4:5:6:7:8:9"]}}]}]}}))
        .unwrap();
    wait_for("the unreadable DENY to fail closed", || {
        whoami(&bed, "client", "10.20.2.10", 8080).is_err()
    });
    wait_for("the status of the unreadable DENY", || {
        condition("AuthorizationPolicy", "bad-block")["reason"] == "Invalid"
    });
    let c = condition("AuthorizationPolicy", "bad-block");
    assert_eq!(c["status"], "False", "{c}");
    assert!(
        c["message"].as_str().unwrap().contains("fails closed"),
        "{c}"
    );
    cp.delete(
        "security.ztunnel.dev/v1",
        "AuthorizationPolicy",
        Some(&demo),
        "bad-block",
    )
    .unwrap();
    wait_for("both let in again", || {
        whoami(&bed, "client", "10.20.2.10", 8080).is_ok()
            && whoami(&bed, "legacy", "10.20.2.10", 8080).is_ok()
    });

    // STRICT from a PeerAuthentication on the API server: the plain pod is refused, the mesh
    // client let in; its status is written too.
    bed.apply_kube_policies(json!({
        "apiVersion": "security.ztunnel.dev/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "demo"},
        "spec": {"mtls": {"mode": "STRICT"}}}))
        .unwrap();
    wait_for("STRICT to refuse the plain pod", || {
        whoami(&bed, "legacy", "10.20.2.10", 8080).is_err()
    });
    assert_eq!(
        whoami(&bed, "client", "10.20.2.10", 8080).unwrap(),
        "10.20.1.10"
    );
    wait_for("the PeerAuthentication's status", || {
        condition("PeerAuthentication", "strict")["reason"] == "Accepted"
    });

    // Node 1's installer, stopped now, would find its DaemonSet there: the plugin stays.
    let (code, said) = bed.installer_removal_check(0);
    assert_eq!(code, Some(1), "{said}");

    // deploy/'s RBAC for the daemon, against what the daemons and installers did: every grant
    // used, nothing forbidden.
    let problems = cp.rbac_problems("ztunnel-system", "ztunnel").unwrap();
    assert!(
        problems.is_empty(),
        "deploy/'s RBAC for the daemon: {problems:#?}"
    );
}

/// `when` conditions, PeerAuthentication DISABLE and `portLevelMtls` written to the API
/// server: each is accepted as written (status `ZtunnelAccepted=True`, `Accepted`) and
/// decides as Istio's ambient mode does, on real traffic.
#[test]
fn when_disable_and_port_level_mtls_from_the_api_server() {
    let bed = three_pods_on_the_api_server();
    let demo = bed.api_namespace("demo");
    let cp = bed.kube.as_ref().unwrap().cp;
    for port in [8080, 9090] {
        bed.pod("server").ns.serve_dual(port, apps::whoami_server);
    }
    wait_for("the server app", || {
        whoami(&bed, "client", "10.20.2.10", 8080).is_ok()
            && whoami(&bed, "legacy", "10.20.2.10", 9090).is_ok()
    });
    let accepted = |kind: &str, name: &str| {
        wait_for(&format!("{kind} {name} accepted as written"), || {
            cp.get("security.ztunnel.dev/v1", kind, Some(&demo), name)
                .and_then(|o| {
                    o["status"]["conditions"]
                        .as_array()
                        .and_then(|c| c.iter().find(|c| c["type"] == "ZtunnelAccepted").cloned())
                })
                .is_some_and(|c| c["status"] == "True" && c["reason"] == "Accepted")
        })
    };
    let pa = |name: &str, spec: Value| {
        json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "PeerAuthentication",
               "metadata": {"name": name, "namespace": "demo"}, "spec": spec})
    };
    let plain_gets = |port: u16| whoami(&bed, "legacy", "10.20.2.10", port).is_ok();
    let client_gets = |port: u16| whoami(&bed, "client", "10.20.2.10", port).is_ok();

    // A STRICT workload with a PERMISSIVE port (istiod's convertPeerAuthentication): plaintext
    // refused on 8080 only; mutual TLS on both.
    bed.apply_kube_policies(pa(
        "server-ports",
        json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "STRICT"},
               "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}),
    ))
    .unwrap();
    wait_for("STRICT on 8080", || !plain_gets(8080));
    assert!(plain_gets(9090), "9090 is PERMISSIVE");
    assert!(client_gets(8080) && client_gets(9090));
    accepted("PeerAuthentication", "server-ports");
    cp.delete(
        "security.ztunnel.dev/v1",
        "PeerAuthentication",
        Some(&demo),
        "server-ports",
    )
    .unwrap();
    wait_for("plaintext let in again", || plain_gets(8080));

    // A namespace STRICT, then the same object turned DISABLE: DISABLE accepts plaintext, as
    // PERMISSIVE does in ambient mode.
    bed.apply_kube_policies(pa("ns", json!({"mtls": {"mode": "STRICT"}})))
        .unwrap();
    wait_for("namespace STRICT", || !plain_gets(8080));
    bed.apply_kube_policies(pa("ns", json!({"mtls": {"mode": "DISABLE"}})))
        .unwrap();
    wait_for("DISABLE lets plaintext in", || plain_gets(8080));
    assert!(client_gets(8080), "mutual TLS still passes");
    accepted("PeerAuthentication", "ns");

    // An ALLOW on `when` conditions (L4 keys, ANDed): the plain pod's address on 9090 only,
    // and anyone from namespace demo.
    bed.apply_kube_policies(json!({
        "apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "when", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW", "rules": [
            {"when": [{"key": "source.ip", "values": ["10.20.1.11"]},
                      {"key": "destination.port", "values": ["9090"]}]},
            {"when": [{"key": "source.namespace", "values": [demo]}]}]}}))
        .unwrap();
    wait_for("the ALLOW in force", || !plain_gets(8080));
    assert!(
        plain_gets(9090),
        "address and port both match the first rule"
    );
    assert!(client_gets(8080) && client_gets(9090), "namespace demo");
    accepted("AuthorizationPolicy", "when");
}
