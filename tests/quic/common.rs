//! Helpers of the QUIC tests (`quic.rs` and `quic_peers.rs`, modules of the `hbone` binary):
//! what the daemons report, and a raw QUIC client's endpoint and stream header. The daemons'
//! QUIC settings are [`ztunnel_e2e::transport::Transport::Quic`]'s.

use ztunnel::hbone::quic;
pub use ztunnel_e2e::daemon::expect_metric;
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, B_IP};
use ztunnel_e2e::netns::Netns;
use ztunnel_proto::quic::RequestHeader;

pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
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
