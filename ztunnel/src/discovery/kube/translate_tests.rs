//! The translation from the store's entries to the model, table by table, from Kubernetes
//! objects as JSON through the watchers' own conversions.

use super::super::objects::*;
use super::*;
use crate::discovery::DATAPLANE_MODE_LABEL;
use serde_json::json;

const NODE: &str = "n1";

/// A store filled from Kubernetes objects (JSON), through the same conversions the
/// watchers use.
fn store(objs: &[serde_json::Value]) -> (Store, Vec<String>) {
    store_with(objs, Rules::default())
}

fn store_with(objs: &[serde_json::Value], rules: Rules) -> (Store, Vec<String>) {
    let mut st = Store {
        node: NODE.to_owned(),
        ..Store::default()
    };
    let mut int = Interner::default();
    let mut refused = vec![];
    for o in objs {
        let kind = o["kind"].as_str().unwrap();
        let r: Result<(), String> = (|| {
            match kind {
                "Node" => {
                    let n: LeanNode = serde_json::from_value(o.clone()).unwrap();
                    st.nodes
                        .insert(key_of(&n.metadata), node_entry(&n, &mut int));
                }
                "Namespace" => {
                    let n: k8s_openapi::api::core::v1::Namespace =
                        serde_json::from_value(o.clone()).unwrap();
                    st.namespaces
                        .insert(key_of(&n.metadata), namespace_entry(&n, &mut int));
                }
                "Pod" => {
                    let p: LeanPod = serde_json::from_value(o.clone()).unwrap();
                    if let Some(e) = pod_entry(&p, NODE, rules, &mut int)? {
                        let local = &*e.node == NODE;
                        let m = if local {
                            &mut st.pods
                        } else {
                            &mut st.remote_pods
                        };
                        m.insert(key_of(&p.metadata), e);
                    }
                }
                "Service" => {
                    let s: k8s_openapi::api::core::v1::Service =
                        serde_json::from_value(o.clone()).unwrap();
                    if let Some(e) = service_entry(&s, &mut int)? {
                        st.services.insert(key_of(&s.metadata), e);
                    }
                }
                "EndpointSlice" => {
                    let s: k8s_openapi::api::discovery::v1::EndpointSlice =
                        serde_json::from_value(o.clone()).unwrap();
                    if let Some(e) = slice_entry(&s)? {
                        st.slices.insert(key_of(&s.metadata), e);
                    }
                }
                "ServiceEntry" | "WorkloadEntry" => {
                    let d: kube::api::DynamicObject = serde_json::from_value(o.clone()).unwrap();
                    let k = key_of(&d.metadata);
                    let of = crate::discovery::istio_entries::Kind::parse(kind).unwrap();
                    let e = super::super::networking::entries(of, &d)?.unwrap();
                    match of {
                        crate::discovery::istio_entries::Kind::ServiceEntry => {
                            st.service_entries.insert(k, e)
                        }
                        _ => st.workload_entries.insert(k, e),
                    };
                }
                "Gateway" | "GatewayClass" => {
                    let d: kube::api::DynamicObject = serde_json::from_value(o.clone()).unwrap();
                    let k = key_of(&d.metadata);
                    match kind {
                        "Gateway" => match super::super::gateways::gateway_entry(&d)? {
                            Some(e) => st.gateways.insert(k, e).map(|_| ()),
                            None => None,
                        },
                        _ => (st.gateway_classes)
                            .insert(k, super::super::gateways::class_entry(&d))
                            .map(|_| ()),
                    };
                }
                _ => match policy_entry(o.clone())? {
                    crate::discovery::policy::PolicyObject::Authorization(a) => {
                        st.authz
                            .insert((a.metadata.namespace.clone(), a.metadata.name.clone()), a);
                    }
                    crate::discovery::policy::PolicyObject::PeerAuthentication(p) => {
                        st.peer_authn
                            .insert((p.metadata.namespace.clone(), p.metadata.name.clone()), p);
                    }
                },
            }
            Ok(())
        })();
        if let Err(e) = r {
            refused.push(e);
        }
    }
    (st, refused)
}

fn ns(name: &str, ambient: bool) -> serde_json::Value {
    let labels = if ambient {
        json!({DATAPLANE_MODE_LABEL: "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": {"app": "web"},
                     "managedFields": [{"manager": "kubelet"}], "annotations": {"a": "b"}},
        "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn svc(ns: &str, name: &str, vip: &str, target: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}]}})
}

/// A slice of `svc` with endpoints (address, ready, its pod's name if it names one).
fn slice(ns: &str, svc: &str, eps: &[(&str, Option<bool>, Option<&str>)]) -> serde_json::Value {
    let eps: Vec<_> = eps
        .iter()
        .map(|(ip, ready, pod)| {
            let target = pod.map(|name| json!({"kind": "Pod", "namespace": ns, "name": name}));
            json!({"addresses": [ip], "conditions": {"ready": ready}, "targetRef": target})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-abc"), "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

#[test]
fn pods_become_workloads_by_the_rules() {
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut p = pod("demo", "p", NODE, "10.0.0.1");
        f(&mut p);
        p
    };
    // (pod, is a workload?, protocol, what)
    let cases: Vec<(serde_json::Value, Option<Protocol>, &str)> = vec![
        (
            with(&|_| {}),
            Some(Protocol::Hbone),
            "running, enrolled namespace",
        ),
        (
            with(&|p| p["spec"]["hostNetwork"] = json!(true)),
            None,
            "host network",
        ),
        (
            with(&|p| p["status"]["phase"] = json!("Succeeded")),
            None,
            "terminal",
        ),
        (
            with(&|p| p["status"]["phase"] = json!("Failed")),
            None,
            "terminal",
        ),
        (
            with(&|p| p["status"] = json!({"phase": "Pending"})),
            None,
            "no IP yet",
        ),
        (
            with(&|p| p["status"]["phase"] = json!("Pending")),
            Some(Protocol::Hbone),
            "pending with an IP (init containers run)",
        ),
        (
            with(&|p| p["metadata"]["labels"][DATAPLANE_MODE_LABEL] = json!("none")),
            Some(Protocol::Tcp),
            "opted out",
        ),
        (
            with(&|p| p["metadata"]["namespace"] = json!("legacy")),
            Some(Protocol::Tcp),
            "namespace not enrolled",
        ),
    ];
    for (p, want, what) in cases {
        let (st, refused) = store(&[ns("demo", true), ns("legacy", false), p]);
        assert!(refused.is_empty(), "{what}: {refused:?}");
        let (s, skipped) = build("cluster.local", Rules::default(), &st);
        assert!(skipped.is_empty(), "{what}: {skipped:?}");
        let s = s.unwrap();
        let got = s
            .workload_by_ip("10.0.0.1".parse().unwrap())
            .map(|w| w.protocol);
        assert_eq!(got, want, "{what}");
        if let Some(w) = s.workload_by_ip("10.0.0.1".parse().unwrap()) {
            assert_eq!(s.enrolled(w), want == Some(Protocol::Hbone), "{what}");
        }
    }
}

#[test]
fn remote_pods_are_lean_local_pods_full() {
    let mut remote = pod("demo", "r", "n2", "10.0.0.2");
    remote["metadata"]["labels"][DATAPLANE_MODE_LABEL] = json!("none");
    let (st, _) = store(&[ns("demo", true), pod("demo", "l", NODE, "10.0.0.1"), remote]);
    let (s, _) = build("cluster.local", Rules::default(), &st);
    let s = s.unwrap();
    let l = s.workload_by_uid("uid-l").unwrap();
    assert_eq!(l.labels.get("app").map(|v| &**v), Some("web"));
    let r = s.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
    assert!(r.uid.is_empty());
    assert_eq!(r.labels.len(), 1, "only the opt-out label: {:?}", r.labels);
    assert!(!s.enrolled(r));
    assert_eq!(&*r.node, "n2");
    assert_eq!(
        r.identity("cluster.local").to_string(),
        "spiffe://cluster.local/ns/demo/sa/web"
    );
}

/// A Deployment's pod is reported as the Deployment, with its canonical service from its
/// labels, on the nodes that keep the pod's labels and on those that do not, and in its
/// node's locality.
#[test]
fn pods_are_named_after_their_controller_on_every_node() {
    let of_deployment = |name: &str, node: &str, ip: &str| {
        let mut p = pod("demo", name, node, ip);
        p["metadata"]["generateName"] = json!("web-5d8f7c-");
        p["metadata"]["labels"] =
            json!({"app": "web", "version": "v2", "pod-template-hash": "5d8f7c"});
        p["metadata"]["ownerReferences"] = json!([
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "not-the-controller", "uid": "u0"},
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f7c", "uid": "u1", "controller": true}
        ]);
        p
    };
    let (st, refused) = store(&[
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "n2", "labels": {"topology.kubernetes.io/region": "eu-west1",
                                                     "topology.kubernetes.io/zone": "eu-west1-b"}},
               "status": {"images": [{"names": ["a"], "sizeBytes": 1}]}}),
        ns("demo", true),
        of_deployment("web-5d8f7c-aaaaa", NODE, "10.0.0.1"),
        of_deployment("web-5d8f7c-bbbbb", "n2", "10.0.0.2"),
        pod("demo", "bare", NODE, "10.0.0.3"),
    ]);
    assert!(refused.is_empty(), "{refused:?}");
    let (s, _) = build("cluster.local", Rules::default(), &st);
    let s = s.unwrap();
    for ip in ["10.0.0.1", "10.0.0.2"] {
        let w = s.workload_by_ip(ip.parse().unwrap()).unwrap();
        assert_eq!(
            (
                &**w.workload_name(),
                &**w.canonical_name(),
                &**w.canonical_revision()
            ),
            ("web", "web", "v2"),
            "{ip}"
        );
    }
    let local = s.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
    let remote = s.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&local.telemetry, &remote.telemetry),
        "replicas share one"
    );
    let bare = s.workload_by_ip("10.0.0.3".parse().unwrap()).unwrap();
    assert_eq!(
        (
            &**bare.workload_name(),
            &**bare.canonical_name(),
            &**bare.canonical_revision()
        ),
        ("bare", "web", "latest")
    );
}

#[test]
fn services_get_ready_endpoints_and_resolved_ports() {
    let base = vec![
        ns("demo", true),
        pod("demo", "a", NODE, "10.0.0.1"),
        pod("demo", "b", "n2", "10.0.0.2"),
        pod("demo", "c", "n2", "10.0.0.3"),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.2"},
                                     {"type": "Hostname", "address": "n2"}],
                       "images": [{"names": ["i"], "sizeBytes": 1}]}}),
    ];
    // (service target, slice endpoints, want target port, want endpoint IPs, want
    // endpoints that are not pods)
    type Case<'a> = (
        serde_json::Value,
        Vec<(&'a str, Option<bool>, Option<&'a str>)>,
        Option<u16>,
        Vec<&'a str>,
        Vec<&'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            json!(8080),
            vec![
                ("10.0.0.1", Some(true), Some("a")),
                ("10.0.0.2", Some(false), Some("b")),
            ],
            Some(8080),
            vec!["10.0.0.1"],
            vec![],
        ),
        (
            json!("http"),
            vec![
                ("10.0.0.2", None, Some("b")),
                ("10.0.0.3", Some(true), Some("c")),
            ],
            Some(8080),
            vec!["10.0.0.2", "10.0.0.3"],
            vec![],
        ),
        // A slice lagging behind an address's reuse names the pod that had it: the pod that
        // holds it now is not an endpoint, nor is the address outside the mesh.
        (
            json!(8080),
            vec![
                ("10.0.0.2", Some(true), Some("gone")),
                ("10.0.0.3", Some(true), Some("c")),
            ],
            Some(8080),
            vec!["10.0.0.3"],
            vec![],
        ),
        // A pod not known (yet): neither a workload nor outside the mesh.
        (
            json!(9090),
            vec![("10.9.9.9", Some(true), Some("x"))],
            Some(9090),
            vec![],
            vec![],
        ),
        // An API server's address, a manual slice's: outside the mesh, ready ones only;
        // a workload's address stays the workload's whatever the slice says.
        (
            json!(6443),
            vec![
                ("192.0.2.10", None, None),
                ("192.0.2.11", Some(false), None),
                ("10.0.0.3", Some(true), None),
            ],
            Some(6443),
            vec!["10.0.0.3"],
            vec!["192.0.2.10"],
        ),
        // Host-network pods, at their node's address: outside the mesh too.
        (
            json!(9100),
            vec![
                ("192.168.1.2", Some(true), Some("exporter-n2")),
                ("192.168.1.3", Some(true), Some("exporter-n3")),
                ("10.0.0.1", Some(true), Some("a")),
            ],
            Some(9100),
            vec!["10.0.0.1"],
            vec!["192.168.1.2"],
        ),
        (json!(8080), vec![], Some(8080), vec![], vec![]),
    ];
    for (target, eps, want_port, want_eps, want_not_pods) in cases {
        let mut objs = base.clone();
        objs.push(svc("demo", "web", "10.96.0.1", target.clone()));
        if !eps.is_empty() {
            objs.push(slice("demo", "web", &eps));
        }
        let (st, refused) = store(&objs);
        assert!(refused.is_empty(), "{refused:?}");
        let (s, _) = build("cluster.local", Rules::default(), &st);
        let s = s.unwrap();
        let vip = "10.96.0.1".parse().unwrap();
        let sv = s.service_by_vip(vip).unwrap();
        assert_eq!(sv.target_port(80), want_port, "{target}");
        let mut got: Vec<String> = s
            .endpoints_of_vip(vip)
            .map(|w| w.ips[0].to_string())
            .collect();
        got.sort();
        assert_eq!(got, want_eps, "{target} {eps:?}");
        let not_pods: Vec<String> = sv.not_pods.iter().map(|ip| ip.to_string()).collect();
        assert_eq!(not_pods, want_not_pods, "{target} {eps:?}");
    }
    // A named port with no slice to resolve it: the port is skipped and said so.
    let mut objs = base.clone();
    objs.push(svc("demo", "web", "10.96.0.1", json!("http")));
    let (st, _) = store(&objs);
    let (s, skipped) = build("cluster.local", Rules::default(), &st);
    assert!(s
        .unwrap()
        .service_by_vip("10.96.0.1".parse().unwrap())
        .unwrap()
        .ports
        .is_empty());
    assert!(
        skipped[0].contains("no resolvable target port"),
        "{skipped:?}"
    );
}

/// Target ports are where kube-proxy sends: each slice's port of the port's name; and a
/// node-local service keeps only this node's host endpoints.
#[test]
fn target_ports_are_the_slices_and_local_services_keep_this_nodes_hosts() {
    let node = |name: &str, ip: &str| {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    };
    let base = vec![
        ns("demo", true),
        pod("demo", "a", NODE, "10.0.0.1"),
        pod("demo", "b", "n2", "10.0.0.2"),
        node(NODE, "192.168.1.1"),
        node("n2", "192.168.1.2"),
    ];
    // A slice of `svc` with its port `name` at `number` and ready endpoints (address,
    // pod name).
    let slice = |name: &str, number: u16, eps: &[(&str, Option<&str>)], i: usize| {
        let eps: Vec<_> = eps
            .iter()
            .map(|(ip, pod)| {
                let target = pod.map(|p| json!({"kind": "Pod", "namespace": "demo", "name": p}));
                json!({"addresses": [ip], "targetRef": target})
            })
            .collect();
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("web-{i}"), "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": name, "port": number}], "endpoints": eps})
    };
    // Host-network agents on this node and n2, and an API server's address.
    let agents = slice(
        "http",
        8080,
        &[
            ("192.168.1.1", Some("agent-n1")),
            ("192.168.1.2", Some("agent-n2")),
            ("192.0.2.7", None),
        ],
        0,
    );
    // (port's name, its targetPort, internalTrafficPolicy, slices, want (port → target),
    // want overrides (ip, target), want not-pods)
    type Case<'a> = (
        Option<&'a str>,
        serde_json::Value,
        &'a str,
        Vec<serde_json::Value>,
        Option<u16>,
        Vec<(&'a str, u16)>,
        Vec<&'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        // A selectorless service, its port with no targetPort (its own number), its own
        // slice naming a database elsewhere on another port: that port.
        (
            Some("db"),
            json!(null),
            "Cluster",
            vec![slice("db", 15432, &[("192.0.2.7", None)], 0)],
            Some(80),
            vec![("192.0.2.7", 15432)],
            vec!["192.0.2.7"],
        ),
        // An unnamed port: the slice's unnamed port.
        (
            None,
            json!(8080),
            "Cluster",
            vec![slice("", 9090, &[("10.0.0.1", Some("a"))], 0)],
            Some(8080),
            vec![("10.0.0.1", 9090)],
            vec![],
        ),
        // A named targetPort mid-rollout: two slices, two numbers; the first is the
        // port's, the other slice's endpoints keep theirs.
        (
            Some("http"),
            json!("http"),
            "Cluster",
            vec![
                slice("http", 8080, &[("10.0.0.1", Some("a"))], 0),
                slice("http", 8081, &[("10.0.0.2", Some("b"))], 1),
            ],
            Some(8080),
            vec![("10.0.0.2", 8081)],
            vec![],
        ),
        // A named targetPort that some pods lack: their slice has no port, they are not
        // endpoints of it.
        (
            Some("http"),
            json!("http"),
            "Cluster",
            vec![
                slice("http", 8080, &[("10.0.0.1", Some("a"))], 0),
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "web-1", "namespace": "demo",
                                 "labels": {"kubernetes.io/service-name": "web"}},
                    "addressType": "IPv4", "ports": [],
                    "endpoints": [{"addresses": ["10.0.0.2"],
                                   "targetRef": {"kind": "Pod", "namespace": "demo", "name": "b"}}]}),
            ],
            Some(8080),
            vec![("10.0.0.2", 0)],
            vec![],
        ),
        // Slices that agree with the service: nothing to override.
        (
            Some("http"),
            json!(8080),
            "Cluster",
            vec![slice("http", 8080, &[("10.0.0.1", Some("a"))], 0)],
            Some(8080),
            vec![],
            vec![],
        ),
        // Node-local: of the host-network endpoints, this node's only; an API server's
        // address is no node's.
        (
            Some("http"),
            json!(8080),
            "Local",
            vec![agents.clone()],
            Some(8080),
            vec![],
            vec!["192.168.1.1"],
        ),
        (
            Some("http"),
            json!(8080),
            "Cluster",
            vec![agents.clone()],
            Some(8080),
            vec![],
            vec!["192.0.2.7", "192.168.1.1", "192.168.1.2"],
        ),
    ];
    for (name, target, policy, slices, want_target, want_overrides, want_not_pods) in cases {
        let mut objs = base.clone();
        let mut port = json!({"port": 80, "targetPort": target, "protocol": "TCP"});
        if let Some(n) = name {
            port["name"] = json!(n);
        }
        objs.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [port],
                     "internalTrafficPolicy": policy}}));
        objs.extend(slices);
        let (st, refused) = store(&objs);
        assert!(refused.is_empty(), "{refused:?}");
        let (s, _) = build("cluster.local", Rules::default(), &st);
        let s = s.unwrap();
        let sv = s.service_by_vip("10.96.0.1".parse().unwrap()).unwrap();
        let what = format!("{name:?} {target} {policy}");
        assert_eq!(sv.target_port(80), want_target, "{what}");
        let overrides: Vec<(String, u16)> = sv
            .port_overrides
            .iter()
            .map(|o| (o.ip.to_string(), o.target_port))
            .collect();
        let want: Vec<(String, u16)> = want_overrides
            .iter()
            .map(|(ip, t)| (ip.to_string(), *t))
            .collect();
        assert_eq!(overrides, want, "{what}");
        for (ip, t) in &want_overrides {
            assert_eq!(
                sv.target_port_at(80, ip.parse().unwrap()),
                Some(*t).filter(|t| *t != 0),
                "{what}"
            );
        }
        let not_pods: Vec<String> = sv.not_pods.iter().map(|ip| ip.to_string()).collect();
        assert_eq!(not_pods, want_not_pods, "{what}");
        assert_eq!(sv.node_local, policy == "Local", "{what}");
    }
}

/// A Service's `trafficDistribution` is kept, else Istio's annotation of it, else its
/// namespace's annotation, as istiod reads them: an unknown field falls through to the
/// annotations, an unknown annotation prefers nothing, an empty one is none.
#[test]
fn a_services_traffic_distribution_is_kept() {
    use crate::discovery::Distribution::{self, *};
    const ISTIO: &str = "networking.istio.io/traffic-distribution";
    let with = |field: Option<&str>, annotation: Option<&str>, of_ns: Option<&str>| {
        let mut s = svc("demo", "web", "10.96.0.1", json!(8080));
        if let Some(f) = field {
            s["spec"]["trafficDistribution"] = json!(f);
        }
        if let Some(a) = annotation {
            s["metadata"]["annotations"] = json!({ISTIO: a});
        }
        let mut n = ns("demo", true);
        if let Some(a) = of_ns {
            n["metadata"]["annotations"] = json!({ISTIO: a});
        }
        let (st, refused) = store(&[n, s]);
        assert!(refused.is_empty(), "{refused:?}");
        let (s, _) = build("cluster.local", Rules::default(), &st);
        let d = s
            .unwrap()
            .service_by_vip("10.96.0.1".parse().unwrap())
            .unwrap()
            .distribution;
        d
    };
    // (field, the Service's annotation, the namespace's, what is kept)
    let cases: [(_, _, _, Distribution); 12] = [
        (None, None, None, Any),
        (Some("PreferClose"), None, None, PreferSameZone),
        (Some("PreferSameZone"), None, None, PreferSameZone),
        (
            Some("PreferSameNode"),
            Some("PreferClose"),
            None,
            PreferSameNode,
        ),
        (
            None,
            Some("prefersamenode"),
            Some("PreferClose"),
            PreferSameNode,
        ),
        (Some("Sideways"), None, None, Any),
        (Some("Sideways"), Some("PreferClose"), None, PreferSameZone),
        (None, None, Some("PreferSameNode"), PreferSameNode),
        (None, Some("Sideways"), Some("PreferSameNode"), Any),
        (None, None, Some("Sideways"), Any),
        (None, Some(""), Some("PreferSameNode"), PreferSameNode),
        (None, None, Some(""), Any),
    ];
    for (field, annotation, of_ns, want) in cases {
        let got = with(field, annotation, of_ns);
        assert_eq!(got, want, "{field:?} {annotation:?} {of_ns:?}");
    }
}

#[test]
fn headless_and_external_services_have_no_vip() {
    let mut headless = svc("demo", "h", "None", json!(80));
    headless["spec"]["clusterIPs"] = json!(["None"]);
    let mut ext = svc("demo", "e", "", json!(80));
    ext["spec"] = json!({"type": "ExternalName", "externalName": "example.com"});
    let (st, refused) = store(&[ns("demo", true), headless, ext]);
    assert!(refused.is_empty() && st.services.is_empty(), "{refused:?}");
}

#[test]
fn one_bad_object_is_skipped_and_the_rest_kept() {
    let bad_policy = json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "http", "namespace": "demo"},
        "spec": {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}});
    let unknown_field = json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "typo", "namespace": "demo"},
        "spec": {"rules": [{"from": [{"source": {"principalz": ["x"]}}]}]}});
    let good_policy = json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "demo"}, "spec": {"mtls": {"mode": "STRICT"}}});
    let mut bad_ip = pod("demo", "badip", NODE, "10.0.0.9");
    bad_ip["status"]["podIPs"] = json!([{"ip": "not-an-ip"}]);
    let mut bad_sa = pod("demo", "badsa", NODE, "10.0.0.8");
    bad_sa["spec"]["serviceAccountName"] = json!("Bad/SA");
    let (st, refused) = store(&[
        ns("demo", true),
        pod("demo", "a", NODE, "10.0.0.1"),
        pod("demo", "dup1", "n2", "10.0.0.5"),
        pod("demo", "dup2", "n3", "10.0.0.5"),
        svc("demo", "clash", "10.0.0.1", json!(80)),
        svc("demo", "web", "10.96.0.1", json!(80)),
        bad_policy,
        unknown_field,
        good_policy,
        bad_ip,
        bad_sa,
    ]);
    // Policies are never refused: one with HTTP fields is converted as Istio does, one
    // that cannot be read in full is kept and fails closed.
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused.iter().any(|r| r.contains("not-an-ip")));
    let (s, skipped) = build("cluster.local", Rules::default(), &st);
    let s = s.unwrap();
    assert_eq!(skipped.len(), 4, "{skipped:?}");
    for want in [
        "demo/dup1",
        "demo/dup2",
        "clash: VIP 10.0.0.1 is a pod IP",
        "demo/badsa",
    ] {
        assert!(
            skipped.iter().any(|x| x.contains(want)),
            "{want} in {skipped:?}"
        );
    }
    assert!(s.workload_by_uid("uid-a").is_some());
    assert!(s.service_by_vip("10.96.0.1".parse().unwrap()).is_some());
    assert_eq!(s.peer_authentications().len(), 1);
    let authz = s.authorization_policies();
    assert_eq!(authz.len(), 2);
    let typo = authz.iter().find(|a| a.metadata.name == "typo").unwrap();
    assert!(typo.invalid.as_deref().unwrap().contains("principalz"));
}

/// Of two pods claiming one IP (a pod stuck terminating on a lost node, its address given to
/// a new pod), the only one not being deleted keeps it; with none or both, neither does, and
/// the address is contested: no workload's, and refused rather than reached in plaintext.
#[test]
fn an_ip_two_pods_claim_goes_to_the_one_not_being_deleted() {
    let deleting = |mut p: serde_json::Value, yes: bool| {
        if yes {
            p["metadata"]["deletionTimestamp"] = json!("2026-12-07T10:00:00Z");
        }
        p
    };
    let ip: IpAddr = "10.0.0.9".parse().unwrap();
    // (the old pod being deleted, the new one being deleted, which has the IP, contested)
    let cases = [
        (false, false, None, true),
        (true, false, Some("new"), false),
        (false, true, Some("old"), false),
        (true, true, None, true),
    ];
    for (old_deleting, new_deleting, want, contested) in cases {
        let objs = [
            ns("demo", true),
            ns("other", true),
            deleting(pod("demo", "old", "n2", "10.0.0.9"), old_deleting),
            deleting(pod("other", "new", NODE, "10.0.0.9"), new_deleting),
        ];
        let (st, refused) = store(&objs);
        assert!(refused.is_empty(), "{refused:?}");
        let (s, skipped) = build("cluster.local", Rules::default(), &st);
        let s = s.unwrap();
        let what = format!("old deleting {old_deleting}, new deleting {new_deleting}");
        assert_eq!(
            s.workload_by_ip(ip).map(|w| w.name.to_string()).as_deref(),
            want,
            "{what}"
        );
        assert_eq!(s.contested(ip), contested, "{what}");
        let lost = if want.is_some() { 1 } else { 2 };
        assert_eq!(
            skipped.iter().filter(|w| w.contains("claimed")).count(),
            lost,
            "{what}: {skipped:?}"
        );
    }
}

#[path = "translate_istio_tests.rs"]
mod istio;
