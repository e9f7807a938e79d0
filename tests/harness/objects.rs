//! Kubernetes objects as the discovery tests write them (`kube_discovery.rs` on the real API
//! server, `kube_faults.rs` on the stand-in): the same shapes on both, so that both exercise
//! the daemon's source on the same objects.

use serde_json::{json, Value};
use ztunnel::discovery::DATAPLANE_MODE_LABEL;

/// The API version of the daemon's policy kinds.
pub const POLICY: &str = "security.ztunnel.dev/v1";

/// Namespace `name`, enrolled (labelled ambient) or not.
pub fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({DATAPLANE_MODE_LABEL: "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// Service `ns/name` selecting `app: web`, port 80 to the named port `http`; with
/// `cluster_ip`, that address (else the API server assigns one).
pub fn service(ns: &str, name: &str, cluster_ip: Option<&str>) -> Value {
    let mut spec = json!({"selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]});
    if let Some(vip) = cluster_ip {
        spec["clusterIP"] = json!(vip);
        spec["clusterIPs"] = json!([vip]);
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": spec})
}

/// The EndpointSlice of Service `ns/svc`: one endpoint per `(address, ready)`, port `http`
/// 8080.
pub fn slice(ns: &str, svc: &str, eps: &[(&str, bool)]) -> Value {
    let eps: Vec<_> = eps
        .iter()
        .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-x1"), "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

/// A namespace-wide DENY of the peers of `principal` (a pattern such as `td/ns/x/sa/*`).
pub fn deny(ns: &str, name: &str, principal: &str) -> Value {
    json!({"apiVersion": POLICY, "kind": "AuthorizationPolicy", "metadata": {"name": name, "namespace": ns},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": [principal]}}]}]}})
}
