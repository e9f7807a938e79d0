//! Helpers of the QUIC tests (`quic.rs`, `quic_peers.rs`): the two daemons' QUIC settings,
//! what they report, and a raw QUIC client's endpoint and stream header.

use ztunnel::hbone::quic;
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, NodeOptions, B_IP};
use ztunnel_e2e::netns::Netns;
use ztunnel_proto::quic::RequestHeader;

pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `a` dials `b` on QUIC first.
pub fn quic_client() -> NodeOptions {
    NodeOptions {
        extra_args: args(&["--quic-destinations", B_IP]),
        ..Default::default()
    }
}

/// `b` accepts tunnels on QUIC too.
pub fn quic_server() -> NodeOptions {
    NodeOptions {
        extra_args: args(&["--quic-listen", "true"]),
        ..Default::default()
    }
}

pub fn quic_pair() -> Mesh {
    Mesh::start(quic_client(), quic_server()).expect("start the test bed")
}

/// The pool listing of the daemon in `ns` (admin `/config_dump`): the connections it holds.
pub fn pool(ns: &Netns) -> Vec<serde_json::Value> {
    Mesh::config_dump(ns)["pool"]
        .as_array()
        .expect("the config dump lists the pool")
        .clone()
}

/// Asserts that `name{labels}` in the exposition `m` is `want`, showing `m` when it is not.
pub fn expect_metric(m: &str, name: &str, labels: &[(&str, &str)], want: f64) {
    assert_eq!(metric(m, name, labels), want, "{name}{labels:?} in:\n{m}");
}

pub fn counter(ns: &Netns, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&Mesh::metrics(ns), name, labels)
}

pub fn tunnel_addr() -> std::net::SocketAddr {
    format!("{B_IP}:15008").parse().unwrap()
}

/// A QUIC client endpoint in the namespace of the running task.
pub fn client_endpoint() -> quinn::Endpoint {
    quic::endpoint(None, "0.0.0.0:0".parse().unwrap(), None, None).expect("QUIC endpoint")
}

pub fn header(authority: &str) -> RequestHeader {
    RequestHeader {
        authority: authority.into(),
        ..Default::default()
    }
}
