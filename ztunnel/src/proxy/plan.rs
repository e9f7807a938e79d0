//! The outbound plan: where a captured connection goes, as a pure function of the discovery
//! state, the source workload and the original destination (and a `pick` for load balancing).
//!
//! - a Service VIP: the port must be one of the service's; one endpoint of the VIP's address
//!   family is picked and the port mapped to its target port;
//! - a workload that speaks HBONE: tunnel to its IP on 15008, expecting its identity;
//! - a workload that speaks plain TCP, or an address outside the mesh: passthrough;
//! - a mesh workload's 15001/15006/15008: refused, it would loop.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::discovery::{Protocol, State, Workload};
use crate::hbone::consts;
use crate::identity::Identity;

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
}

/// Plans the outbound connection of `source` to `orig_dst`.
pub fn outbound(
    state: &State,
    source: &Workload,
    orig_dst: SocketAddr,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Result<Plan, PlanError> {
    let _ = source;
    let ip = orig_dst.ip().to_canonical();
    let (dst, addr, service) = match state.service_by_vip(ip) {
        Some(svc) => {
            let name = format!("{}/{}", svc.namespace, svc.name);
            let target_port =
                svc.target_port(orig_dst.port())
                    .ok_or_else(|| PlanError::NoServicePort {
                        service: name.clone(),
                        port: orig_dst.port(),
                    })?;
            let candidates: Vec<(&Arc<Workload>, std::net::IpAddr)> = state
                .endpoints_of_vip(ip)
                .iter()
                .filter_map(|w| {
                    w.ips
                        .iter()
                        .find(|a| a.is_ipv4() == ip.is_ipv4())
                        .map(|a| (w, *a))
                })
                .collect();
            if candidates.is_empty() {
                return Err(PlanError::NoEndpoints { service: name });
            }
            let (w, ep_ip) = candidates[pick(candidates.len()) % candidates.len()];
            (w.clone(), SocketAddr::new(ep_ip, target_port), Some(name))
        }
        None => match state.workload_by_ip(ip) {
            Some(w) => (w.clone(), SocketAddr::new(ip, orig_dst.port()), None),
            None => return Ok(Plan::Passthrough { dst_addr: orig_dst }),
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
";

    enum Want {
        Hbone(&'static str, &'static str, Option<&'static str>),
        Pass(&'static str),
        Err(PlanError),
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
            (
                "[fd00::96:1]:80",
                5,
                Want::Hbone("[fd00::2]:8080", "sa-b", Some("demo/b")),
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
}
