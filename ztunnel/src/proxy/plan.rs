//! The outbound plan: where a captured connection goes, as a pure function of the discovery
//! state, the source workload and the original destination (and a `pick` for load balancing).
//!
//! - a Service VIP: the port must be one of the service's; one endpoint of the VIP's address
//!   family is picked (of a dual-stack service, any endpoint, on its other family's address
//!   when it has none of the VIP's; of a node-local service, one on the source's node; of one
//!   with a traffic distribution, one of the closest, [`crate::discovery::Distribution`]) and
//!   the port mapped to its target port (the endpoint's own, [`Service::port_overrides`]; an
//!   endpoint without a port of a named `targetPort` is not one of that port's);
//!   an endpoint that is not a workload (an API server's address, say:
//!   [`Service::not_pods`]) is passed through, unless its address is contested (below); under
//!   the Istio-compatible setting, a Service Istio sends through a waypoint proxy
//!   ([`State::waypoint_of`]) is refused: the waypoint's policies would be bypassed; so is
//!   one whose VIP an Istio ServiceEntry has too, when Istio would pick that and send it
//!   through a waypoint ([`State::entry_waypoint`]);
//!   so is, addressed directly, a pod whose waypoint takes workloads' traffic
//!   ([`State::workload_waypoint`]);
//! - a workload that speaks HBONE: tunnel to its IP on 15008, expecting its identity;
//! - a workload that speaks plain TCP, or an address outside the mesh: passthrough, unless
//!   (under the Istio-compatible setting) an Istio ServiceEntry or WorkloadEntry declares the
//!   address and Istio would send its traffic through a waypoint ([`State::entry_waypoint`]);
//! - an address two pods claim, neither trusted with it ([`State::contested`]): refused, as
//!   either may be a mesh pod that must not be reached in plaintext;
//! - a mesh workload's 15001/15006/15008: refused, it would loop.
//!
//! The inbound plan ([`inbound`]) is where a validated tunnel stream goes on the local
//! workload, and which service it was for (what Istio's telemetry reports as the destination
//! service).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::discovery::{Protocol, Service, State, Workload};
use crate::hbone::consts;
use crate::hbone::server::{Authority, ConnectTarget};
use crate::identity::Identity;
use crate::refusal::Reason;

/// Where the connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Through a tunnel to the destination workload's daemon.
    Hbone {
        dst_workload: Arc<Workload>,
        /// The `:authority` of the CONNECT: endpoint IP and (target) port.
        dst_addr: SocketAddr,
        /// Where the tunnel connects: endpoint IP, port 15008.
        tunnel_addr: SocketAddr,
        expected_identity: Identity,
        /// `namespace/name` of the service, when the destination was a VIP.
        service: Option<String>,
    },
    /// Plain TCP to the original destination.
    Passthrough { dst_addr: SocketAddr },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
    #[error("service {service} has no endpoint")]
    NoEndpoints { service: String },
    #[error("destination port {0} of a mesh workload would loop")]
    Recursion(u16),
    #[error("address {0} is claimed by two pods, neither trusted with it")]
    Contested(std::net::IpAddr),
    #[error("{target} sends its traffic through waypoint {waypoint} (istio.io/use-waypoint; one not known ready counts), whose policies this daemon cannot enforce")]
    Waypoint { target: String, waypoint: String },
}

/// Plans the outbound connection of `source` to `orig_dst`.
pub fn outbound(
    state: &State,
    source: &Workload,
    orig_dst: SocketAddr,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Result<Plan, PlanError> {
    let ip = orig_dst.ip().to_canonical();
    let (dst, addr, service) = match state.service_by_vip(ip) {
        Some(svc) => {
            let name = format!("{}/{}", svc.namespace, svc.name);
            if let Some(waypoint) = state.waypoint_of(svc) {
                return Err(PlanError::Waypoint {
                    target: format!("service {name}"),
                    waypoint,
                });
            }
            if let Some((target, waypoint)) =
                state.entry_waypoint(ip, &source.namespace, Some(&svc.namespace))
            {
                return Err(PlanError::Waypoint { target, waypoint });
            }
            let port = orig_dst.port();
            if svc.target_port(port).is_none() {
                return Err(PlanError::NoServicePort {
                    service: name,
                    port,
                });
            }
            let family = |a: &std::net::IpAddr| a.is_ipv4() == ip.is_ipv4();
            let dual = svc.vips.iter().any(|v| !family(v));
            // The endpoint's address of the VIP's family, else (a dual-stack service) its
            // other one.
            let address = |ips: &[std::net::IpAddr]| {
                ips.iter()
                    .find(|a| family(a))
                    .or(ips.first().filter(|_| dual))
                    .copied()
            };
            let candidates: Vec<(Option<&Arc<Workload>>, std::net::IpAddr)> = state
                .endpoints_of_vip(ip)
                .filter(|w| !svc.node_local || w.node == source.node)
                .filter_map(|w| address(&w.ips).map(|a| (Some(w), a)))
                .chain(
                    svc.not_pods
                        .iter()
                        .filter(|a| {
                            (dual || family(a))
                                && state.workload_by_ip(**a).is_none()
                                && !state.contested(**a)
                        })
                        .map(|a| (None, *a)),
                )
                .filter(|(_, a)| svc.target_port_at(port, *a).is_some())
                .collect();
            // The closest endpoints, when the service prefers them (an endpoint that is no
            // workload has no known locality).
            let candidates = closest(svc, source, candidates);
            if candidates.is_empty() {
                return Err(PlanError::NoEndpoints { service: name });
            }
            let (w, ep_ip) = candidates[pick(candidates.len()) % candidates.len()];
            let target_port = svc.target_port_at(port, ep_ip).expect("checked above");
            let dst_addr = SocketAddr::new(ep_ip, target_port);
            let Some(w) = w else {
                return Ok(Plan::Passthrough { dst_addr });
            };
            (w.clone(), dst_addr, Some(name))
        }
        None => match state.workload_by_ip(ip) {
            Some(w) => {
                if let Some(waypoint) = state.workload_waypoint(w) {
                    return Err(PlanError::Waypoint {
                        target: format!("pod {}/{}", w.namespace, w.name),
                        waypoint,
                    });
                }
                (w.clone(), SocketAddr::new(ip, orig_dst.port()), None)
            }
            None if state.contested(ip) => return Err(PlanError::Contested(ip)),
            None => match state.entry_waypoint(ip, &source.namespace, None) {
                Some((target, waypoint)) => return Err(PlanError::Waypoint { target, waypoint }),
                None => return Ok(Plan::Passthrough { dst_addr: orig_dst }),
            },
        },
    };
    if dst.protocol == Protocol::Tcp {
        return Ok(Plan::Passthrough { dst_addr: addr });
    }
    if consts::RESERVED_PORTS.contains(&addr.port()) {
        return Err(PlanError::Recursion(addr.port()));
    }
    Ok(Plan::Hbone {
        expected_identity: dst.identity(state.trust_domain()),
        tunnel_addr: SocketAddr::new(addr.ip(), consts::HBONE_PORT),
        dst_addr: addr,
        dst_workload: dst,
        service,
    })
}

/// Of `candidates`, those closest to `source` by `svc`'s traffic distribution (all of them
/// when it has none).
fn closest<'a>(
    svc: &Service,
    source: &Workload,
    candidates: Vec<(Option<&'a Arc<Workload>>, std::net::IpAddr)>,
) -> Vec<(Option<&'a Arc<Workload>>, std::net::IpAddr)> {
    let d = svc.distribution;
    if d == crate::discovery::Distribution::Any {
        return candidates;
    }
    let unknown = crate::discovery::Locality::default();
    let rank = |w: Option<&Arc<Workload>>| match w {
        Some(w) => d.rank(&source.node, &source.locality, &w.node, &w.locality),
        None => d.rank(&source.node, &source.locality, "", &unknown),
    };
    let best = candidates.iter().map(|(w, _)| rank(*w)).max().unwrap_or(0);
    candidates
        .into_iter()
        .filter(|(w, _)| rank(*w) == best)
        .collect()
}

/// Where an inbound tunnel stream goes.
#[derive(Clone, Debug)]
pub struct InboundPlan {
    /// The application: the local workload's address and the target port.
    pub target: SocketAddr,
    /// The service the stream was for, when known.
    pub service: Option<Arc<Service>>,
}

/// Plans a validated CONNECT received on `local_ip`, an address of local workload `dst`:
/// - to a service hostname: that service's target port for the requested port, on `local_ip`
///   (as Istio, the service need not select `dst`: the hostname only chooses the port); a
///   hostname or a port this node does not know is refused; a target port that would loop is
///   [`Reason::Recursion`];
/// - to an address: that address.
///
/// The service reported is the one the hostname named; else, among the services `dst` is an
/// endpoint of, the one `forwarded: host=` names, else the first whose target port is the
/// stream's (Istio's guess).
pub fn inbound(
    state: &State,
    cluster_domain: &str,
    dst: &Workload,
    local_ip: std::net::IpAddr,
    t: &ConnectTarget,
) -> Result<InboundPlan, Reason> {
    match &t.authority {
        Authority::Service { host, port } => {
            let svc = state
                .service_by_hostname(host, cluster_domain)
                .ok_or(Reason::InboundUnknownService)?;
            let target_port = svc
                .target_port_at(*port, local_ip)
                .ok_or(Reason::InboundUnknownService)?;
            if consts::RESERVED_PORTS.contains(&target_port) {
                return Err(Reason::Recursion);
            }
            Ok(InboundPlan {
                target: SocketAddr::new(local_ip, target_port),
                service: Some(svc.clone()),
            })
        }
        Authority::Addr(target) => {
            let mut services = state.services_of(dst);
            let service = match &t.forwarded_host {
                Some(h) => services.find(|s| crate::metrics::hostname(s, cluster_domain) == *h),
                None => None,
            }
            .or_else(|| {
                state
                    .services_of(dst)
                    .find(|s| s.targets_at(target.ip(), target.port()))
            })
            .cloned();
            Ok(InboundPlan {
                target: *target,
                service,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "
namespaces: [{name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}]
workloads:
  - {uid: a, name: a, namespace: demo, serviceAccount: sa-a, node: n1, ips: [10.0.0.1]}
  - {uid: b1, name: b1, namespace: demo, serviceAccount: sa-b, node: n2, ips: [10.0.0.2, 'fd00::2'], labels: {app: b}}
  - {uid: b2, name: b2, namespace: demo, serviceAccount: sa-b, node: n2, ips: [10.0.0.3], labels: {app: b}}
  - {uid: t, name: t, namespace: demo, serviceAccount: sa-t, node: n2, ips: [10.0.0.4], protocol: TCP}
services:
  - {name: b, namespace: demo, vips: [10.96.0.1, 'fd00::96:1'], ports: [{port: 80, targetPort: 8080}], selector: {app: b}}
  - {name: empty, namespace: demo, vips: [10.96.0.2], ports: [{port: 80, targetPort: 8080}], selector: {app: none}}
  - {name: kubernetes, namespace: default, vips: [10.96.0.13], ports: [{port: 443, targetPort: 6443}], notPods: [192.0.2.10, 10.0.0.1]}
  - {name: mixed, namespace: demo, vips: [10.96.0.14], ports: [{port: 80, targetPort: 8080}], selector: {app: b}, notPods: [192.0.2.20]}
  - {name: named, namespace: demo, vips: [10.96.0.15], ports: [{port: 80, targetPort: 8080}], selector: {app: b}, portOverrides: [{ip: 10.0.0.2, port: 80, targetPort: 0}]}
";

    /// Namespaces with waypoints: `w`'s for Services (one Service opting out, another naming
    /// its own), `x`'s for workloads; pods naming waypoints of their own.
    const WAYPOINTS: &str = "
namespaces:
  - {name: w, labels: {ztunnel.dev/dataplane-mode: ambient, istio.io/use-waypoint: ns-waypoint}}
  - {name: v, labels: {ztunnel.dev/dataplane-mode: ambient}}
  - {name: x, labels: {ztunnel.dev/dataplane-mode: ambient, istio.io/use-waypoint: x-wp}}
workloads:
  - {uid: a, name: a, namespace: w, serviceAccount: sa-a, node: n1, ips: [10.0.0.1]}
  - {uid: b1, name: b1, namespace: w, serviceAccount: sa-b, node: n2, ips: [10.0.0.2], labels: {app: b}}
  - {uid: c1, name: c1, namespace: v, serviceAccount: sa-c, node: n2, ips: [10.0.0.3], labels: {app: c, istio.io/use-waypoint: pod-wp}}
  - {uid: c2, name: c2, namespace: w, serviceAccount: sa-c, node: n2, ips: [10.0.0.4], labels: {istio.io/use-waypoint: none}}
  - {uid: c3, name: c3, namespace: v, serviceAccount: sa-c, node: n2, ips: [10.0.0.5], labels: {istio.io/use-waypoint: ns-waypoint, istio.io/use-waypoint-namespace: w}}
  - {uid: d1, name: d1, namespace: x, serviceAccount: sa-d, node: n2, ips: [10.0.0.6], labels: {app: d}}
  - {uid: d2, name: x-wp-0, namespace: x, serviceAccount: sa-d, node: n2, ips: [10.0.0.7], labels: {gateway.networking.k8s.io/gateway-name: x-wp}}
services:
  - {name: c, namespace: v, vips: [10.96.0.4], ports: [{port: 80, targetPort: 8080}], selector: {app: c}}
  - {name: b, namespace: w, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: b}}
  - {name: own, namespace: w, vips: [10.96.0.2], ports: [{port: 80, targetPort: 8080}], selector: {app: b}, labels: {istio.io/use-waypoint: own}}
  - {name: out, namespace: w, vips: [10.96.0.3], ports: [{port: 80, targetPort: 8080}], selector: {app: b}, labels: {istio.io/use-waypoint: none}}
  - {name: d, namespace: x, vips: [10.96.0.5], ports: [{port: 80, targetPort: 8080}], selector: {app: d}}
  - {name: e, namespace: x, vips: [10.96.0.6], ports: [{port: 80, targetPort: 8080}], selector: {app: d}}
waypoints:
  - {namespace: w, name: ns-waypoint}
  - {namespace: x, name: x-wp, waypointFor: workload}
istioEntries:
  - {apiVersion: networking.istio.io/v1, kind: ServiceEntry, metadata: {name: ext, namespace: w},
     spec: {hosts: [ext.example], addresses: [192.0.2.0/24], resolution: STATIC,
           endpoints: [{address: 198.51.100.1}]}}
  - {apiVersion: networking.istio.io/v1, kind: ServiceEntry, metadata: {name: open, namespace: x},
     spec: {hosts: [open.example], addresses: [192.0.2.9]}}
  - {apiVersion: networking.istio.io/v1, kind: ServiceEntry, metadata: {name: shadow, namespace: w},
     spec: {hosts: [shadow.example], addresses: [10.96.0.6]}}
  - {apiVersion: networking.istio.io/v1, kind: WorkloadEntry, metadata: {name: vm, namespace: x},
     spec: {address: 198.51.100.2}}
  - {apiVersion: networking.istio.io/v1, kind: WorkloadEntry, metadata: {name: vm-out, namespace: x,
     labels: {istio.io/use-waypoint: none}}, spec: {address: 198.51.100.3}}
";

    enum Want {
        Hbone(&'static str, &'static str, Option<&'static str>),
        Pass(&'static str),
        Err(PlanError),
    }

    /// Under the Istio-compatible setting what Istio sends through a waypoint is refused: a
    /// Service whose own label or namespace's names a waypoint for Services, a pod addressed
    /// directly whose own label or namespace's names one for workloads, and (failing closed)
    /// whatever names a waypoint not known ready. A pod is reached directly when its waypoint
    /// serves Services only (its namespace's, or in another namespace by its own label), or it
    /// is labelled `none`; a Service likewise when its namespace's waypoint serves workloads
    /// only; a pod behind a waypoint is reached through a Service without one, as Istio sends
    /// only a pod's own traffic through its waypoint; a waypoint's own replica is reached
    /// directly. The addresses of Istio's ServiceEntries and WorkloadEntries are Services'
    /// and workloads' alike. Without the setting the labels mean nothing.
    #[test]
    fn services_and_pods_behind_a_waypoint_are_refused_under_istio_compat() {
        use crate::discovery::enrollment::Rules;
        let plain = crate::discovery::parse(WAYPOINTS, "cluster.local").unwrap();
        let istio = crate::discovery::parse(WAYPOINTS, "cluster.local")
            .unwrap()
            .with_enrollment(Rules {
                istio: true,
                ..Default::default()
            });
        let src = plain.workload_by_uid("a").unwrap().clone();
        let waypoint = |target: &str, waypoint: &str| PlanError::Waypoint {
            target: target.into(),
            waypoint: waypoint.into(),
        };
        let cases = [
            (
                "10.96.0.1:80",
                Some(waypoint("service w/b", "w/ns-waypoint")),
            ),
            ("10.96.0.2:80", Some(waypoint("service w/own", "w/own"))),
            ("10.96.0.3:80", None),
            ("10.0.0.2:8080", None),
            ("10.0.0.3:8080", Some(waypoint("pod v/c1", "v/pod-wp"))),
            ("10.96.0.4:80", None),
            ("10.0.0.4:8080", None),
            ("10.0.0.5:8080", None),
            ("10.0.0.6:8080", Some(waypoint("pod x/d1", "x/x-wp"))),
            ("10.96.0.5:80", None),
            ("10.0.0.7:8080", None),
            // Istio's ServiceEntries and WorkloadEntries: a range of a namespace whose waypoint
            // takes Services; an exact address (which wins over the range) of one whose
            // waypoint takes workloads only; a ServiceEntry's endpoint of the former; a
            // WorkloadEntry of the latter, and one opted out.
            (
                "192.0.2.5:443",
                Some(waypoint(
                    "ServiceEntry w/ext (192.0.2.0/24)",
                    "w/ns-waypoint",
                )),
            ),
            ("192.0.2.9:443", None),
            ("198.51.100.1:80", None),
            (
                "198.51.100.2:80",
                Some(waypoint("WorkloadEntry x/vm (198.51.100.2/32)", "x/x-wp")),
            ),
            ("198.51.100.3:80", None),
            // A Service's VIP that a ServiceEntry of the client's namespace has too: Istio
            // picks the ServiceEntry.
            (
                "10.96.0.6:80",
                Some(waypoint(
                    "ServiceEntry w/shadow (10.96.0.6/32)",
                    "w/ns-waypoint",
                )),
            ),
        ];
        for (dst, want) in cases {
            let d = dst.parse().unwrap();
            assert_eq!(outbound(&istio, &src, d, &mut |_| 0).err(), want, "{dst}");
            assert!(
                outbound(&plain, &src, d, &mut |_| 0).is_ok(),
                "{dst} without"
            );
        }
    }

    /// An address two pods claim, neither trusted with it, is refused: either may be a mesh
    /// pod, which must not be reached in plaintext, directly or as a Service's endpoint.
    #[test]
    fn a_contested_address_is_refused_not_passed_through() {
        let state = crate::discovery::parse(MESH, "cluster.local").unwrap();
        let src = state.workload_by_uid("a").unwrap().clone();
        let ip = "10.0.0.99".parse().unwrap();
        let d = SocketAddr::new(ip, 8080);
        assert_eq!(
            outbound(&state, &src, d, &mut |_| 0),
            Ok(Plan::Passthrough { dst_addr: d })
        );
        let state = state.with_contested(vec![ip]);
        assert_eq!(
            outbound(&state, &src, d, &mut |_| 0),
            Err(PlanError::Contested(ip))
        );
        // Nor through a Service that lists it as an endpoint naming no pod.
        let kubernetes: SocketAddr = "10.96.0.13:443".parse().unwrap();
        let api: SocketAddr = "192.0.2.10:6443".parse().unwrap();
        assert_eq!(
            outbound(&state, &src, kubernetes, &mut |_| 0),
            Ok(Plan::Passthrough { dst_addr: api })
        );
        let state = state.with_contested(vec![ip, api.ip()]);
        assert_eq!(
            outbound(&state, &src, kubernetes, &mut |_| 0),
            Err(PlanError::NoEndpoints {
                service: "default/kubernetes".into()
            })
        );
    }

    #[test]
    fn outbound_table() {
        let state = crate::discovery::parse(MESH, "cluster.local").unwrap();
        let src = state.workload_by_uid("a").unwrap().clone();
        let cases = [
            (
                "10.0.0.2:8080",
                0,
                Want::Hbone("10.0.0.2:8080", "sa-b", None),
            ),
            (
                "10.96.0.1:80",
                0,
                Want::Hbone("10.0.0.2:8080", "sa-b", Some("demo/b")),
            ),
            (
                "10.96.0.1:80",
                1,
                Want::Hbone("10.0.0.3:8080", "sa-b", Some("demo/b")),
            ),
            // An endpoint without the port (of a named `targetPort`) is not one of it.
            (
                "10.96.0.15:80",
                0,
                Want::Hbone("10.0.0.3:8080", "sa-b", Some("demo/named")),
            ),
            (
                "10.96.0.15:80",
                1,
                Want::Hbone("10.0.0.3:8080", "sa-b", Some("demo/named")),
            ),
            (
                "[fd00::96:1]:80",
                4,
                Want::Hbone("[fd00::2]:8080", "sa-b", Some("demo/b")),
            ),
            // A dual-stack service's endpoint with no address of the VIP's family is
            // reached on its other one, as Istio does.
            (
                "[fd00::96:1]:80",
                5,
                Want::Hbone("10.0.0.3:8080", "sa-b", Some("demo/b")),
            ),
            (
                "[fd00::2]:9000",
                0,
                Want::Hbone("[fd00::2]:9000", "sa-b", None),
            ),
            (
                "10.96.0.1:81",
                0,
                Want::Err(PlanError::NoServicePort {
                    service: "demo/b".into(),
                    port: 81,
                }),
            ),
            (
                "10.96.0.2:80",
                0,
                Want::Err(PlanError::NoEndpoints {
                    service: "demo/empty".into(),
                }),
            ),
            // An endpoint that is not a workload is passed through; a workload's address
            // listed as one (10.0.0.1) is not taken for it.
            ("10.96.0.13:443", 0, Want::Pass("192.0.2.10:6443")),
            ("10.96.0.13:443", 1, Want::Pass("192.0.2.10:6443")),
            (
                "10.96.0.14:80",
                1,
                Want::Hbone("10.0.0.3:8080", "sa-b", Some("demo/mixed")),
            ),
            ("10.96.0.14:80", 2, Want::Pass("192.0.2.20:8080")),
            ("10.0.0.4:80", 0, Want::Pass("10.0.0.4:80")),
            ("192.0.2.1:443", 0, Want::Pass("192.0.2.1:443")),
            ("10.0.0.2:15008", 0, Want::Err(PlanError::Recursion(15008))),
            ("10.0.0.2:15001", 0, Want::Err(PlanError::Recursion(15001))),
        ];
        for (dst, n, want) in cases {
            let got = outbound(&state, &src, dst.parse().unwrap(), &mut |_| n);
            match (want, got) {
                (
                    Want::Hbone(addr, sa, svc),
                    Ok(Plan::Hbone {
                        dst_addr,
                        tunnel_addr,
                        expected_identity,
                        service,
                        ..
                    }),
                ) => {
                    assert_eq!(dst_addr.to_string(), addr, "{dst}");
                    assert_eq!(tunnel_addr, SocketAddr::new(dst_addr.ip(), 15008), "{dst}");
                    assert_eq!(expected_identity.service_account(), sa, "{dst}");
                    assert_eq!(service.as_deref(), svc, "{dst}");
                }
                (Want::Pass(addr), Ok(Plan::Passthrough { dst_addr })) => {
                    assert_eq!(dst_addr.to_string(), addr, "{dst}")
                }
                (Want::Err(e), Err(got)) => assert_eq!(got, e, "{dst}"),
                (_, got) => panic!("{dst}: unexpected {got:?}"),
            }
        }
    }

    /// A service with a traffic distribution picks among the endpoints closest to the source
    /// (region, then zone; for `PreferSameNode` then Istio's subzone, then node), spilling
    /// over only when there are none closer.
    #[test]
    fn traffic_distribution_prefers_the_closest_endpoints() {
        let mesh = "
namespaces: [{name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}]
workloads:
  - {uid: a, name: a, namespace: demo, serviceAccount: sa-a, node: n1, ips: [10.0.0.1], locality: r1/z1/s1}
  - {uid: near, name: near, namespace: demo, serviceAccount: sa-b, node: n1, ips: [10.0.0.2], locality: r1/z1/s1, labels: {app: b}}
  - {uid: zone, name: zone, namespace: demo, serviceAccount: sa-b, node: n2, ips: [10.0.0.3], locality: r1/z1/s2, labels: {app: b, off: y}}
  - {uid: sub, name: sub, namespace: demo, serviceAccount: sa-b, node: n5, ips: [10.0.0.6], locality: r1/z1/s1, labels: {app: b, off: y}}
  - {uid: region, name: region, namespace: demo, serviceAccount: sa-b, node: n3, ips: [10.0.0.4], locality: r1/z2, labels: {app: b, far: x}}
  - {uid: far, name: far, namespace: demo, serviceAccount: sa-b, node: n4, ips: [10.0.0.5], locality: r2/z9, labels: {app: b, far: x}}
services:
  - {name: any, namespace: demo, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: b}}
  - {name: zone, namespace: demo, vips: [10.96.0.2], ports: [{port: 80, targetPort: 8080}], selector: {app: b}, trafficDistribution: PreferClose}
  - {name: node, namespace: demo, vips: [10.96.0.3], ports: [{port: 80, targetPort: 8080}], selector: {app: b}, trafficDistribution: PreferSameNode}
  - {name: spill, namespace: demo, vips: [10.96.0.4], ports: [{port: 80, targetPort: 8080}], selector: {far: x}, trafficDistribution: PreferSameZone}
  - {name: subzone, namespace: demo, vips: [10.96.0.5], ports: [{port: 80, targetPort: 8080}], selector: {off: y}, trafficDistribution: PreferSameNode}
";
        let state = crate::discovery::parse(mesh, "cluster.local").unwrap();
        let src = state.workload_by_uid("a").unwrap();
        // The endpoints each service's connections go to, over every pick.
        let reached = |vip: &str| {
            let mut ips: Vec<String> = (0..8)
                .map(
                    |n| match outbound(&state, src, vip.parse().unwrap(), &mut |_| n) {
                        Ok(Plan::Hbone { dst_addr, .. }) => dst_addr.ip().to_string(),
                        other => panic!("{vip}: {other:?}"),
                    },
                )
                .collect();
            ips.sort();
            ips.dedup();
            ips
        };
        assert_eq!(
            reached("10.96.0.1:80"),
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        // The zone's, whatever their subzone.
        assert_eq!(
            reached("10.96.0.2:80"),
            ["10.0.0.2", "10.0.0.3", "10.0.0.6"]
        );
        assert_eq!(reached("10.96.0.3:80"), ["10.0.0.2"]);
        // None in the source's zone: those of its region, not the far one.
        assert_eq!(reached("10.96.0.4:80"), ["10.0.0.4"]);
        // None on the source's node: those of its subzone, not the rest of its zone.
        assert_eq!(reached("10.96.0.5:80"), ["10.0.0.6"]);
    }

    /// A node-local service keeps to the source's node; an endpoint whose slice gives
    /// another target port is reached there, outbound and inbound.
    #[test]
    fn node_local_services_and_endpoints_own_target_ports() {
        let mesh = "
namespaces: [{name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}]
workloads:
  - {uid: a, name: a, namespace: demo, serviceAccount: sa-a, node: n1, ips: [10.0.0.1]}
  - {uid: b1, name: b1, namespace: demo, serviceAccount: sa-b, node: n1, ips: [10.0.0.2], labels: {app: b}}
  - {uid: b2, name: b2, namespace: demo, serviceAccount: sa-b, node: n2, ips: [10.0.0.3], labels: {app: b}}
  - {uid: c, name: c, namespace: demo, serviceAccount: sa-c, node: n3, ips: [10.0.0.4]}
services:
  - {name: local, namespace: demo, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: b}, nodeLocal: true}
  - {name: moved, namespace: demo, vips: [10.96.0.2], ports: [{port: 80, targetPort: 8080}], selector: {app: b}, portOverrides: [{ip: 10.0.0.3, port: 80, targetPort: 8081}]}
";
        let state = crate::discovery::parse(mesh, "cluster.local").unwrap();
        let from = |uid: &str, dst: &str, n: usize| {
            let src = state.workload_by_uid(uid).unwrap();
            match outbound(&state, src, dst.parse().unwrap(), &mut |_| n) {
                Ok(Plan::Hbone { dst_addr, .. }) => Ok(dst_addr.to_string()),
                Ok(p) => panic!("{p:?}"),
                Err(e) => Err(e),
            }
        };
        for n in 0..3 {
            assert_eq!(from("a", "10.96.0.1:80", n), Ok("10.0.0.2:8080".into()));
        }
        assert_eq!(
            from("c", "10.96.0.1:80", 0),
            Err(PlanError::NoEndpoints {
                service: "demo/local".into()
            })
        );
        assert_eq!(from("a", "10.96.0.2:80", 0), Ok("10.0.0.2:8080".into()));
        assert_eq!(from("a", "10.96.0.2:80", 1), Ok("10.0.0.3:8081".into()));
        // Inbound on b2: the hostname's port maps to b2's own target port, and a stream to
        // 8081 is reported for `moved`.
        let b2 = state.workload_by_uid("b2").unwrap();
        let local: std::net::IpAddr = "10.0.0.3".parse().unwrap();
        let target = |authority| ConnectTarget {
            authority,
            forwarded_for: None,
            forwarded_host: None,
            traceparent: None,
        };
        let host = Authority::Service {
            host: "moved.demo.svc.cluster.local".into(),
            port: 80,
        };
        let p = inbound(&state, "cluster.local", b2, local, &target(host)).unwrap();
        assert_eq!(p.target, SocketAddr::new(local, 8081));
        let p = inbound(
            &state,
            "cluster.local",
            b2,
            local,
            &target(Authority::Addr(p.target)),
        )
        .unwrap();
        assert_eq!(p.service.unwrap().name.as_ref(), "moved");
    }

    #[test]
    fn inbound_table() {
        let mut mesh = MESH.to_owned();
        mesh.push_str("  - {name: b-admin, namespace: demo, vips: [10.96.0.3], ports: [{port: 90, targetPort: 9090}, {port: 91, targetPort: 15006}], selector: {app: b}}\n");
        let state = crate::discovery::parse(&mesh, "cluster.local").unwrap();
        let dst = state.workload_by_uid("b1").unwrap().clone();
        let local: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let target = |authority: Authority, host: Option<&str>| ConnectTarget {
            authority,
            forwarded_for: None,
            forwarded_host: host.map(str::to_owned),
            traceparent: None,
        };
        let addr = |port| Authority::Addr(SocketAddr::new(local, port));
        let svc = |host: &str, port| Authority::Service {
            host: host.into(),
            port,
        };
        type Want = Result<(u16, Option<&'static str>), Reason>;
        let cases: Vec<(ConnectTarget, Want)> = vec![
            (target(addr(8080), None), Ok((8080, Some("b")))),
            (target(addr(9090), None), Ok((9090, Some("b-admin")))),
            (target(addr(7000), None), Ok((7000, None))),
            (
                target(addr(8080), Some("b-admin.demo.svc.cluster.local")),
                Ok((8080, Some("b-admin"))),
            ),
            (
                target(addr(8080), Some("elsewhere.demo.svc.cluster.local")),
                Ok((8080, Some("b"))),
            ),
            (
                target(svc("b.demo.svc.cluster.local", 80), None),
                Ok((8080, Some("b"))),
            ),
            (
                target(svc("empty.demo.svc.cluster.local", 80), None),
                Ok((8080, Some("empty"))),
            ),
            (
                target(svc("b.demo.svc.cluster.local", 81), None),
                Err(Reason::InboundUnknownService),
            ),
            (
                target(svc("b.other.svc.cluster.local", 80), None),
                Err(Reason::InboundUnknownService),
            ),
            (
                target(svc("b.demo", 80), None),
                Err(Reason::InboundUnknownService),
            ),
            (
                target(svc("b-admin.demo.svc.cluster.local", 91), None),
                Err(Reason::Recursion),
            ),
        ];
        for (t, want) in cases {
            let got = inbound(&state, "cluster.local", &dst, local, &t).map(|p| {
                assert_eq!(p.target.ip(), local);
                (p.target.port(), p.service.map(|s| s.name.to_string()))
            });
            let want = want.map(|(p, s)| (p, s.map(str::to_owned)));
            assert_eq!(got, want, "{t:?}");
        }
        // Another cluster domain: its hostnames, and only those, name services.
        let inbound_in = |domain: &str, host: &str| {
            let t = target(svc(host, 80), None);
            inbound(&state, domain, &dst, local, &t).map(|p| p.target.port())
        };
        assert_eq!(
            inbound_in("corp.internal", "b.demo.svc.corp.internal"),
            Ok(8080)
        );
        assert_eq!(
            inbound_in("corp.internal", "b.demo.svc.cluster.local"),
            Err(Reason::InboundUnknownService)
        );
    }
}
