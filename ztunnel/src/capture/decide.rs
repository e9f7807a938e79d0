//! The enrollment decision for a pod: pure, from discovery's [`State`] alone.
//!
//! [`decide`] says whether a pod the CNI plugin (or restart recovery) presents joins the mesh
//! on this node, is not in the mesh, cannot be served yet, or belongs to another mesh. It
//! touches nothing; [`super::registry`] applies it.

use std::net::IpAddr;
use std::sync::Arc;

use ztunnel_proto::enroll::PodRef;

use crate::discovery::enrollment::NotEnrolled;
use crate::discovery::{State, Workload};

/// The enrollment decision for a pod.
#[derive(Debug, PartialEq)]
pub enum Decision {
    Enroll(Arc<Workload>),
    /// Not in the mesh, with the reason.
    NotEnrolled(String),
    /// Should be in the mesh but cannot be served yet (discovery has not caught up).
    TryAgain(String),
    /// Would be in the mesh, but another mesh handles it already, with the reason.
    OtherMesh(String),
}

/// Decides whether the pod joins the mesh on `node`: discovery knows it on this node and
/// enrolls it (see [`crate::discovery::enrollment`]).
pub fn decide(state: &State, node: &str, pod: &PodRef, ips: &[IpAddr]) -> Decision {
    let known = workload_of(state, pod, ips).or_else(|| {
        (pod.uid.is_empty() && !pod.namespace.is_empty())
            .then(|| state.pending_by_name(&pod.namespace, &pod.name))
            .flatten()
    });
    if !pod.namespace.is_empty() && state.namespace_unseen(&pod.namespace) {
        return Decision::TryAgain(format!(
            "namespace {} of pod {} is not known to discovery yet",
            pod.namespace, pod.name
        ));
    }
    let Some(w) = known else {
        if pod.namespace.is_empty() {
            return Decision::NotEnrolled("not a Kubernetes pod (no K8S_POD_NAMESPACE)".into());
        }
        // Under Istio's rules a pod's own label may enroll it: its labels must be known.
        if !state.namespace_enrolled(&pod.namespace) && !state.enrollment().istio {
            return Decision::NotEnrolled(format!("namespace {} is not enrolled", pod.namespace));
        }
        return Decision::TryAgain(format!(
            "pod {}/{} is not known to discovery yet",
            pod.namespace, pod.name
        ));
    };
    match state.enrollment_of(w) {
        Ok(()) => {}
        Err(NotEnrolled::NotAsked) => {
            return Decision::NotEnrolled(format!("namespace {} is not enrolled", w.namespace))
        }
        Err(why @ NotEnrolled::Other(_)) => return Decision::OtherMesh(why.to_string()),
        Err(why) => return Decision::NotEnrolled(why.to_string()),
    }
    if &*w.node != node {
        return Decision::TryAgain(format!(
            "discovery places pod {}/{} on node {}, not {node}",
            w.namespace, w.name, w.node
        ));
    }
    if w.ips.is_empty() {
        // Discovery knows the pod (by uid) but not its IPs yet: they are the ones the
        // plugin was just given.
        if ips.is_empty() {
            return Decision::TryAgain(format!(
                "pod {}/{} has no IP yet, neither in discovery nor in the request",
                w.namespace, w.name
            ));
        }
        return Decision::Enroll(Arc::new(Workload {
            ips: ips.into(),
            ..(**w).clone()
        }));
    }
    Decision::Enroll(w.clone())
}

/// The workload discovery has for `pod`, when it is that pod: by uid when the request names
/// one (a uid is one pod's; a name passes to the pod that replaces it, an address to any pod
/// the node starts next); by namespace and name for a Kubernetes pod without one; by address
/// only for a request that names no Kubernetes pod. So a pod is never served as another pod
/// that held its address or its name while discovery has not caught up with it.
pub fn workload_of<'a>(
    state: &'a State,
    pod: &PodRef,
    ips: &[IpAddr],
) -> Option<&'a Arc<Workload>> {
    if !pod.uid.is_empty() {
        state.workload_by_uid(&pod.uid)
    } else if !pod.namespace.is_empty() {
        state.workload_by_name(&pod.namespace, &pod.name)
    } else {
        ips.iter().find_map(|ip| state.workload_by_ip(*ip))
    }
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
  - {uid: u1, name: web-0, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.1]}
  - {uid: u2, name: web-1, namespace: demo, serviceAccount: web, node: n2, ips: [10.0.0.2]}
  - {uid: u3, name: out, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.3], labels: {ztunnel.dev/dataplane-mode: none}}
  - {uid: u4, name: old, namespace: plain, serviceAccount: default, node: n1, ips: [10.0.0.4]}
";

    fn pod(ns: &str, name: &str, uid: &str) -> PodRef {
        PodRef {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn a_pod_known_without_an_ip_enrolls_with_the_plugins_ips() {
        let pending = |ns: &str, name: &str, uid: &str, node: &str| Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: ns.into(),
            service_account: "sa".into(),
            node: node.into(),
            ips: Vec::new().into(),
            labels: Default::default(),
            protocol: crate::discovery::Protocol::Hbone,
            other_mesh: None,
            telemetry: Default::default(),
            locality: Default::default(),
        };
        let s = crate::discovery::parse(MESH, "cluster.local")
            .unwrap()
            .with_pending(vec![
                pending("demo", "fresh", "u20", "n1"),
                pending("demo", "elsewhere", "u21", "n2"),
                pending("plain", "fresh", "u22", "n1"),
            ]);
        let ip: Vec<IpAddr> = vec!["10.0.0.20".parse().unwrap()];
        for (p, ips, want) in [
            (pod("demo", "fresh", "u20"), ip.clone(), Some("u20")),
            (pod("demo", "fresh", ""), ip.clone(), Some("u20")), // by name
            (pod("demo", "fresh", "u20"), vec![], None),         // no IP anywhere
            (pod("demo", "elsewhere", "u21"), ip.clone(), None), // another node
            (pod("plain", "fresh", "u22"), ip.clone(), None),    // namespace not enrolled
        ] {
            match decide(&s, "n1", &p, &ips) {
                Decision::Enroll(w) => {
                    assert_eq!(Some(&*w.uid), want, "{p:?}");
                    assert_eq!(*w.ips, *ips, "{p:?}");
                }
                other => assert_eq!(want, None, "{p:?}: {other:?}"),
            }
        }
        // Still not a workload: nothing routes to it until discovery has its IP.
        assert!(s.workload_by_ip(ip[0]).is_none());
        assert!(s.workload_by_uid("u20").is_some_and(|w| w.ips.is_empty()));
    }

    #[test]
    fn decisions() {
        let s = crate::discovery::parse(MESH, "cluster.local").unwrap();
        let ip = |s: &str| vec![s.parse::<IpAddr>().unwrap()];
        let cases: Vec<(PodRef, Vec<IpAddr>, &str)> = vec![
            (pod("demo", "web-0", "u1"), ip("10.0.0.1"), "enroll"),
            (pod("demo", "web-0", ""), ip("10.0.0.1"), "enroll"), // by name
            (pod("", "", ""), ip("10.0.0.1"), "enroll"),          // by address
            (pod("demo", "web-1", "u2"), ip("10.0.0.2"), "try"),  // other node
            (pod("demo", "new", "u9"), ip("10.0.0.9"), "try"),    // discovery lags
            (pod("demo", "out", "u3"), ip("10.0.0.3"), "not"),    // opted out
            (pod("plain", "old", "u4"), ip("10.0.0.4"), "not"),   // namespace not enrolled
            (pod("plain", "new", "u8"), ip("10.0.0.8"), "not"),   // unknown, plain namespace
            (pod("", "", ""), ip("10.9.9.9"), "not"),             // not a Kubernetes pod
            // Never another pod that held the address or the name: discovery lags.
            (pod("demo", "new", "u9"), ip("10.0.0.1"), "try"),
            (pod("demo", "web-0", "u9"), ip("10.0.0.1"), "try"),
            (pod("demo", "new", ""), ip("10.0.0.1"), "try"),
            (pod("plain", "new", "u9"), ip("10.0.0.1"), "not"),
        ];
        for (p, ips, want) in cases {
            let got = match decide(&s, "n1", &p, &ips) {
                Decision::Enroll(w) => {
                    assert_eq!(&*w.uid, "u1");
                    "enroll"
                }
                Decision::NotEnrolled(_) => "not",
                Decision::TryAgain(_) => "try",
                Decision::OtherMesh(_) => "other",
            };
            assert_eq!(got, want, "{p:?} {ips:?}");
        }
    }

    /// On a source that lists every namespace (Kubernetes), a namespace discovery has not
    /// listed is discovery lag: its pods are tried again, whether the pod is known or not. A
    /// file lists only the namespaces it cares about: the others are not enrolled.
    #[test]
    fn a_namespace_not_seen_yet_is_tried_again_where_every_namespace_is_listed() {
        let mesh = format!(
            "{MESH}  - {{uid: u11, name: early, namespace: newer, serviceAccount: web, node: n1, ips: [10.0.0.11]}}\n"
        );
        let file = crate::discovery::parse(&mesh, "cluster.local").unwrap();
        let cluster = crate::discovery::parse(&mesh, "cluster.local")
            .unwrap()
            .with_all_namespaces();
        let ip = |s: &str| vec![s.parse::<IpAddr>().unwrap()];
        // (pod, want from a file, from a source listing every namespace)
        let cases = [
            (pod("newer", "early", "u11"), ip("10.0.0.11"), "not", "try"),
            (pod("newer", "fresh", "u12"), ip("10.0.0.12"), "not", "try"),
            (pod("plain", "new", "u8"), ip("10.0.0.8"), "not", "not"),
            (
                pod("demo", "web-0", "u1"),
                ip("10.0.0.1"),
                "enroll",
                "enroll",
            ),
            // No namespace (not a Kubernetes pod): by its address, else not in the mesh.
            (pod("", "", ""), ip("10.0.0.1"), "enroll", "enroll"),
            (pod("", "", ""), ip("10.9.9.9"), "not", "not"),
        ];
        for (p, ips, from_file, from_cluster) in cases {
            for (s, want) in [(&file, from_file), (&cluster, from_cluster)] {
                let got = match decide(s, "n1", &p, &ips) {
                    Decision::Enroll(_) => "enroll",
                    Decision::NotEnrolled(_) => "not",
                    Decision::TryAgain(_) => "try",
                    Decision::OtherMesh(_) => "other",
                };
                assert_eq!(got, want, "{p:?}");
            }
        }
    }

    #[test]
    fn decisions_under_istios_rules() {
        let mesh = format!(
            "{MESH}
  - {{uid: u5, name: sidecar, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.5], annotations: {{sidecar.istio.io/status: '{{}}'}}}}
  - {{uid: u6, name: moved, namespace: istio, serviceAccount: web, node: n1, ips: [10.0.0.6]}}
  - {{uid: u7, name: own, namespace: plain, serviceAccount: web, node: n1, ips: [10.0.0.7], labels: {{istio.io/dataplane-mode: ambient}}}}
  - {{uid: u10, name: no, namespace: istio, serviceAccount: web, node: n1, ips: [10.0.0.10], labels: {{istio.io/dataplane-mode: none}}}}
"
        )
        .replace(
            "  - {name: plain}",
            "  - {name: plain}\n  - {name: istio, labels: {istio.io/dataplane-mode: ambient}}",
        );
        let plain = crate::discovery::parse(&mesh, "cluster.local").unwrap();
        let istio = crate::discovery::parse(&mesh, "cluster.local")
            .unwrap()
            .with_enrollment(crate::discovery::enrollment::Rules {
                istio: true,
                ..Default::default()
            });
        let ip = |s: &str| vec![s.parse::<IpAddr>().unwrap()];
        // (pod, want without Istio's rules, with them)
        let cases = [
            (
                pod("demo", "web-0", "u1"),
                ip("10.0.0.1"),
                "enroll",
                "enroll",
            ),
            (
                pod("demo", "sidecar", "u5"),
                ip("10.0.0.5"),
                "other",
                "other",
            ),
            (pod("istio", "moved", "u6"), ip("10.0.0.6"), "not", "enroll"),
            (pod("plain", "own", "u7"), ip("10.0.0.7"), "not", "enroll"),
            (pod("istio", "no", "u10"), ip("10.0.0.10"), "not", "not"),
            // Unknown in a plain namespace: its own label may enroll it under Istio's rules.
            (pod("plain", "new", "u8"), ip("10.0.0.8"), "not", "try"),
        ];
        for (p, ips, without, with) in cases {
            for (s, want) in [(&plain, without), (&istio, with)] {
                let got = match decide(s, "n1", &p, &ips) {
                    Decision::Enroll(w) => {
                        assert_eq!(&*w.uid, &*p.uid);
                        "enroll"
                    }
                    Decision::NotEnrolled(_) => "not",
                    Decision::TryAgain(_) => "try",
                    Decision::OtherMesh(why) => {
                        assert!(why.contains("sidecar.istio.io/status"), "{why}");
                        "other"
                    }
                };
                assert_eq!(got, want, "{p:?} istio={}", s.enrollment().istio);
            }
        }
    }
}
