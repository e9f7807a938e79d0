//! `explain`: the decision the engine would make for a connection between two endpoints named
//! by an operator (`namespace/name` or an IP; the destination with `:port`), without sending
//! traffic. Pure: it reads a discovery snapshot. A Service VIP destination is explained for
//! one of its endpoints on the daemon's node (its decision is that daemon's to make) and the
//! target port. What the source's daemon would refuse before any policy (its outbound plan's
//! error) is named too.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use crate::discovery::policy::MtlsMode;
use crate::discovery::{State, Workload};
use crate::policy::{Conn, Considered, Decision, Ignored};

/// The explanation `ztunnel ctl explain` prints.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub source: Endpoint,
    pub destination: Endpoint,
    pub port: u16,
    /// `namespace/name` when the destination was a Service VIP.
    pub service: Option<String>,
    /// How the source's daemon would carry it: `hbone` (mutual TLS) or `plaintext`.
    pub transport: &'static str,
    /// Why the source's daemon refuses the connection before any policy, if the source is a
    /// pod it captures and it does (the outbound plan's error: a Service or pod Istio sends
    /// through a waypoint, under the Istio-compatible setting; a Service without an endpoint
    /// for the source; …; for a Service VIP, as planned to the first of its endpoints). The
    /// `decision` is then the destination's, had the connection reached it.
    pub refused_at_source: Option<String>,
    /// The destination's peer-authentication mode for plaintext to this port.
    pub mtls_mode: MtlsMode,
    /// The engine's decision ([`crate::policy::PolicyIndex::evaluate`]'s, by the same code).
    pub decision: Decision,
    /// Every policy that took part: each one applying to the destination, whether a rule of
    /// it matched, and what its conversion dropped and why.
    pub considered: Vec<Considered>,
    /// Policies in scope of the destination that the daemon does not enforce, and why.
    pub ignored: Vec<Ignored>,
}

#[derive(Debug, Serialize)]
pub struct Endpoint {
    pub workload: String,
    pub ip: IpAddr,
    /// The SPIFFE ID, for a workload in the mesh.
    pub identity: Option<String>,
    pub in_mesh: bool,
}

fn find(state: &State, what: &str) -> Result<Arc<Workload>, String> {
    if let Ok(ip) = what.parse::<IpAddr>().map(|ip| ip.to_canonical()) {
        return state
            .workload_by_ip(ip)
            .cloned()
            .ok_or_else(|| format!("no workload has IP {ip}"));
    }
    let (ns, name) = what
        .split_once('/')
        .ok_or_else(|| format!("{what:?} is neither namespace/name nor an IP"))?;
    state
        .workload_by_name(ns, name)
        .cloned()
        .ok_or_else(|| format!("no workload {ns}/{name}"))
}

fn endpoint(state: &State, w: &Workload) -> Endpoint {
    let in_mesh =
        w.protocol == crate::discovery::Protocol::Hbone && state.namespace_enrolled(&w.namespace);
    Endpoint {
        workload: format!("{}/{}", w.namespace, w.name),
        ip: w.ips[0],
        identity: in_mesh.then(|| w.identity(state.trust_domain()).to_string()),
        in_mesh,
    }
}

/// Explains `from` → `to` (`to` is `namespace/name:port`, `ip:port` (`[ip]:port` for IPv6
/// too) or `vip:port`) as the daemon of `node` sees it. A destination on another node is not
/// explained: its daemon decides, and only it holds all of the workload's labels, by which
/// policies select it (other nodes keep only the labels that enroll it).
pub fn explain(state: &State, node: &str, from: &str, to: &str) -> Result<Explanation, String> {
    let src = find(state, from)?;
    let (dst, port) = to
        .rsplit_once(':')
        .ok_or_else(|| format!("{to:?} has no :port"))?;
    // `[fd00::2]:80`, as an IPv6 address is written with a port.
    let dst = dst
        .strip_prefix('[')
        .and_then(|d| d.strip_suffix(']'))
        .unwrap_or(dst);
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port"))?;
    let to_port = port;
    let dialled = dst.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    let (dst, port, service) = match dialled.and_then(|ip| state.service_by_vip(ip)) {
        Some(svc) => {
            let ip = dialled.expect("parsed above");
            let target = svc.target_port(port).ok_or_else(|| {
                format!("service {}/{} has no port {port}", svc.namespace, svc.name)
            })?;
            // An endpoint on this node, whose daemon can answer for it, if the service has one.
            let ep = state
                .endpoints_of_vip(ip)
                .find(|w| &*w.node == node)
                .or_else(|| state.endpoints_of_vip(ip).next())
                .cloned()
                .ok_or_else(|| format!("service {}/{} has no endpoint", svc.namespace, svc.name))?;
            let target = ep
                .ips
                .iter()
                .find(|a| a.is_ipv4() == ip.is_ipv4())
                .and_then(|a| svc.target_port_at(port, *a))
                .unwrap_or(target);
            (ep, target, Some(format!("{}/{}", svc.namespace, svc.name)))
        }
        None => (find(state, dst)?, port, None),
    };
    if &*dst.node != node {
        return Err(format!(
            "{}/{} runs on node {}: ask that node's daemon, which decides, and which alone holds all the labels policies select it by",
            dst.namespace, dst.name, dst.node
        ));
    }
    // What the source dialled: the address given (a VIP, or one of the pod's), else the pod's.
    let dialled = SocketAddr::new(dialled.unwrap_or(dst.ips[0]), to_port);
    // Only a source whose connections its daemon captures is refused by it.
    let captured = src.protocol == crate::discovery::Protocol::Hbone && state.enrolled(&src);
    let refused_at_source = captured
        .then(|| crate::proxy::plan::outbound(state, &src, dialled, &mut |_| 0).err())
        .flatten()
        .map(|e| e.to_string());
    let source = endpoint(state, &src);
    let destination = endpoint(state, &dst);
    let hbone = source.in_mesh && destination.in_mesh;
    let principal = source
        .identity
        .as_deref()
        .filter(|_| hbone)
        .map(|id| id.strip_prefix("spiffe://").unwrap_or(id).to_owned());
    let (decision, considered) = state.policy().evaluate_traced(&Conn {
        src_principal: principal.as_deref(),
        src_namespace: hbone.then_some(&*src.namespace),
        src_ip: source.ip,
        dst_ip: destination.ip,
        dst_namespace: &dst.namespace,
        dst_labels: &dst.labels,
        dst_port: port,
    });
    let mtls_mode = state.policy().mtls_mode(&dst.namespace, &dst.labels, port);
    let ignored = state.policy().ignored_for(&dst.namespace, &dst.labels);
    Ok(Explanation {
        source,
        destination,
        port,
        service,
        transport: if hbone { "hbone" } else { "plaintext" },
        refused_at_source,
        mtls_mode,
        decision,
        considered,
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "
trustDomain: cluster.local
namespaces:
  - {name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}
  - {name: plain}
workloads:
  - {uid: c, name: client, namespace: demo, serviceAccount: client, node: n1, ips: [10.0.0.1], labels: {app: client}}
  - {uid: s, name: server, namespace: demo, serviceAccount: server, node: n2, ips: [10.0.0.2, 'fd00::2'], labels: {app: server}}
  - {uid: l, name: legacy, namespace: plain, serviceAccount: default, node: n2, ips: [10.0.0.3], protocol: TCP}
  - {uid: s1, name: server-1, namespace: demo, serviceAccount: server, node: n1, ips: [10.0.0.4], labels: {app: server}}
services:
  - {name: server, namespace: demo, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: server}}
policies:
  - apiVersion: security.ztunnel.dev/v1
    kind: AuthorizationPolicy
    metadata: {name: only-8080, namespace: demo}
    spec:
      selector: {matchLabels: {app: server}}
      rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}], to: [{operation: {ports: ['8080']}}]}]
";

    #[test]
    fn explains_by_name_ip_and_vip() {
        let s = crate::discovery::parse(MESH, "cluster.local").unwrap();
        let e = explain(&s, "n2", "demo/client", "demo/server:8080").unwrap();
        assert!(e.decision.allowed, "{e:?}");
        assert_eq!(
            e.decision.policy.as_ref().unwrap().to_string(),
            "demo/only-8080"
        );
        assert_eq!(e.transport, "hbone");
        let e = explain(&s, "n2", "10.0.0.1", "10.0.0.2:9090").unwrap();
        assert!(!e.decision.allowed);
        for v6 in ["[fd00::2]:8080", "fd00::2:8080"] {
            let e = explain(&s, "n2", "demo/client", v6).unwrap();
            assert_eq!(e.destination.workload, "demo/server", "{v6}");
        }
        let e = explain(&s, "n2", "demo/client", "10.96.0.1:80").unwrap();
        assert_eq!((e.port, e.service.as_deref()), (8080, Some("demo/server")));
        assert!(e.decision.allowed);
        let e = explain(&s, "n2", "plain/legacy", "demo/server:8080").unwrap();
        assert_eq!(e.transport, "plaintext");
        assert!(!e.decision.allowed, "no principal for plaintext");
        assert!(explain(&s, "n2", "demo/nobody", "demo/server:80").is_err());
        assert!(explain(&s, "n2", "demo/client", "demo/server").is_err());
        // Asked on another node than the destination's, which decides.
        let elsewhere = explain(&s, "n1", "demo/client", "demo/server:8080").unwrap_err();
        assert!(elsewhere.contains("runs on node n2"), "{elsewhere}");
        // A VIP's endpoint on the asking node, whichever comes first.
        for (node, endpoint) in [("n1", "demo/server-1"), ("n2", "demo/server")] {
            let e = explain(&s, node, "demo/client", "10.96.0.1:80").unwrap();
            assert_eq!(e.destination.workload, endpoint, "asked on {node}");
        }
        assert_eq!(e.refused_at_source, None);
    }

    /// Under the Istio-compatible setting, a Service behind its namespace's waypoint (for
    /// Services) is refused by the source's daemon, whatever the destination would decide; the
    /// pod addressed directly is not.
    #[test]
    fn names_what_the_source_refuses() {
        let yaml = MESH.replace(
            "{name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}",
            "{name: demo, labels: {ztunnel.dev/dataplane-mode: ambient, istio.io/use-waypoint: wp}}",
        ) + "waypoints: [{namespace: demo, name: wp}]\n";
        let istio = crate::discovery::enrollment::Rules {
            istio: true,
            ..Default::default()
        };
        let s = crate::discovery::parse(&yaml, "cluster.local")
            .unwrap()
            .with_enrollment(istio);
        let e = explain(&s, "n2", "demo/client", "10.96.0.1:80").unwrap();
        let refused = e.refused_at_source.unwrap_or_default();
        assert!(refused.contains("waypoint demo/wp"), "{refused}");
        assert!(e.decision.allowed, "the destination's decision");
        let e = explain(&s, "n2", "demo/client", "demo/server:8080").unwrap();
        assert_eq!(e.refused_at_source, None);
        // A source outside the mesh is not captured: its connection goes in plaintext.
        let e = explain(&s, "n2", "plain/legacy", "10.96.0.1:80").unwrap();
        assert_eq!(e.refused_at_source, None);
        // An IPv4-mapped address is the IPv4 one.
        let e = explain(&s, "n2", "::ffff:10.0.0.1", "[::ffff:10.96.0.1]:80").unwrap();
        assert!(e.refused_at_source.is_some(), "{e:?}");
    }
}
