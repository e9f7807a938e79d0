//! The node's store of compact Kubernetes entries ([`Store`]) and its translation into the
//! discovery model ([`build`], pure).
//!
//! One bad object never drops the rest: objects that cannot be in the model (a duplicate IP,
//! an invalid identity, a VIP that is a pod IP…) are skipped and reported, and everything else
//! is built. A workload's protocol is HBONE when it is enrolled (see
//! [`crate::discovery::enrollment`]), else TCP. A
//! service's endpoints are the workloads at the ready addresses of its EndpointSlices, and
//! the addresses that are no workload's (an API server's, a host-network pod's); a named
//! `targetPort` is resolved through the slices' ports (unresolved: the port is skipped). A
//! workload's locality is its node's (none while the node is not known).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::objects::{Key, NodeEntry, PodEntry, ServiceEntry, SliceEntry, Target};
use crate::discovery::enrollment::{OtherMesh, Rules};
use crate::discovery::model::{
    Labels, Locality, Namespace, Protocol, Service, ServicePort, State, Workload,
};
use crate::discovery::policy::{AuthorizationPolicy, PeerAuthentication};
use crate::discovery::Error;
use crate::identity::Identity;

/// Everything the node keeps, by (namespace, name).
#[derive(Debug, Default)]
pub struct Store {
    /// By ("", name).
    pub namespaces: BTreeMap<Key, Labels>,
    /// Nodes' localities and addresses, by ("", name).
    pub nodes: BTreeMap<Key, NodeEntry>,
    /// Pods on this node.
    pub pods: BTreeMap<Key, PodEntry>,
    /// Pods on other nodes (lean).
    pub remote_pods: BTreeMap<Key, PodEntry>,
    pub services: BTreeMap<Key, ServiceEntry>,
    pub slices: BTreeMap<Key, SliceEntry>,
    pub authz: BTreeMap<Key, AuthorizationPolicy>,
    pub peer_authn: BTreeMap<Key, PeerAuthentication>,
    /// Istio's own (`security.istio.io/v1`), under the Istio-compatible setting.
    pub istio_authz: BTreeMap<Key, AuthorizationPolicy>,
    pub istio_peer_authn: BTreeMap<Key, PeerAuthentication>,
}

/// Which object a skip is about: a pod (on this node or not) or a service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Of {
    Pod(bool, Key),
    Service(Key),
}

/// What a pod becomes in the model.
#[derive(Debug)]
pub enum PodOutcome {
    /// A workload (it has IPs).
    Workload(Workload),
    /// A pod of this node with no IP yet.
    Pending(Workload),
    /// Not in the model, and why.
    Skipped(String),
}

/// What pod `p` becomes under `rules`, given its namespace's labels, its node's locality,
/// and whether an IP is claimed by more than one pod.
pub fn pod_outcome(
    trust_domain: &str,
    rules: Rules,
    p: &PodEntry,
    ns_labels: Option<&Labels>,
    locality: Option<&Arc<Locality>>,
    claimed_twice: impl Fn(&IpAddr) -> bool,
) -> PodOutcome {
    let what = || format!("pod {}/{}", p.namespace, p.name);
    if let Err(e) = Identity::check(trust_domain, &p.namespace, &p.service_account) {
        return PodOutcome::Skipped(format!("{}: {e}", what()));
    }
    if let Some(ip) = p.ips.iter().find(|ip| claimed_twice(ip)) {
        return PodOutcome::Skipped(format!("{}: IP {ip} is claimed by another pod too", what()));
    }
    let enrolled = rules.pod(ns_labels, &p.labels, p.other_mesh).is_ok();
    // With Istio's objects read, a pod of Istio's ambient mode is reached as Istio's own
    // ztunnel reaches it: through a tunnel to it (Istio's ztunnel answers), never in plaintext.
    let istio_ambient = rules.istio && p.other_mesh == Some(OtherMesh::IstioAmbient);
    let w = Workload {
        uid: p.uid.clone(),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        service_account: p.service_account.clone(),
        node: p.node.clone(),
        ips: (&*p.ips).into(),
        labels: p.labels.clone(),
        protocol: if enrolled || istio_ambient {
            Protocol::Hbone
        } else {
            Protocol::Tcp
        },
        other_mesh: p.other_mesh,
        telemetry: p.telemetry.clone(),
        locality: locality.cloned().unwrap_or_default(),
    };
    match p.ips.is_empty() {
        true => PodOutcome::Pending(w),
        false => PodOutcome::Workload(w),
    }
}

/// The addresses `slices` list as ready.
pub fn ready<'a>(slices: &'a [&'a SliceEntry]) -> impl Iterator<Item = &'a IpAddr> + 'a {
    slices.iter().flat_map(|sl| sl.ready.iter())
}

/// What service `s` becomes, given its EndpointSlices, whether a VIP is claimed by another
/// service too, whether an IP is a workload's, and whether it is a node's: the service (none
/// when it is skipped), and the reasons it or some of its ports were skipped. Its endpoints
/// are the workloads at [`ready`] addresses, and the ready addresses that are no workload's
/// and either no pod's (no Pod `targetRef`) or a node's (a host-network pod's):
/// [`Service::not_pods`], reached in plaintext as they are.
pub fn service_outcome(
    s: &ServiceEntry,
    slices: &[&SliceEntry],
    shared_vip: impl Fn(&IpAddr) -> bool,
    workload_ip: impl Fn(&IpAddr) -> bool,
    node_ip: impl Fn(&IpAddr) -> bool,
) -> (Option<Service>, Vec<String>) {
    let what = format!("service {}/{}", s.namespace, s.name);
    if let Some(v) = s.vips.iter().find(|v| shared_vip(v)) {
        return (
            None,
            vec![format!("{what}: VIP {v} is used by another service too")],
        );
    }
    if let Some(v) = s.vips.iter().find(|v| workload_ip(v)) {
        return (None, vec![format!("{what}: VIP {v} is a pod IP")]);
    }
    let mut skipped = Vec::new();
    let mut ports = Vec::new();
    for p in &s.ports {
        let target = match &p.target {
            Target::Number(n) => Some(*n),
            Target::Name(_) => {
                let pname = p.name.as_deref().unwrap_or("");
                slices
                    .iter()
                    .flat_map(|sl| sl.ports.iter())
                    .find(|(n, _)| n == pname)
                    .map(|(_, n)| *n)
            }
        };
        match target {
            Some(t) if t != 0 && p.port != 0 => ports.push(ServicePort {
                port: p.port,
                target_port: t,
            }),
            _ => skipped.push(format!(
                "{what}: port {} has no resolvable target port",
                p.port
            )),
        }
    }
    let mut not_pods: Vec<IpAddr> = slices
        .iter()
        .flat_map(|sl| {
            sl.not_pods
                .iter()
                .chain(sl.ready.iter().filter(|ip| node_ip(ip)))
        })
        .filter(|ip| !workload_ip(ip))
        .copied()
        .collect();
    not_pods.sort_unstable();
    not_pods.dedup();
    let svc = Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vips: s.vips.clone(),
        ports,
        selector: s.selector.clone(),
        not_pods,
        use_waypoint: s.use_waypoint.clone(),
    };
    (Some(svc), skipped)
}

/// Builds the state for the daemon of a node in `trust_domain`, under enrollment `rules`;
/// returns it with the objects that were skipped, and why.
pub fn build(
    trust_domain: &str,
    rules: Rules,
    store: &Store,
) -> (Result<State, Error>, Vec<String>) {
    let (state, skipped) = build_keyed(trust_domain, rules, store);
    (state, skipped.into_iter().map(|(_, why)| why).collect())
}

/// [`build`], with each skip's object.
pub fn build_keyed(
    trust_domain: &str,
    rules: Rules,
    store: &Store,
) -> (Result<State, Error>, Vec<(Of, String)>) {
    let mut skipped = Vec::new();
    let namespaces: Vec<Namespace> = store
        .namespaces
        .iter()
        .map(|((_, n), l)| Namespace {
            name: n.as_str().into(),
            labels: l.clone(),
        })
        .collect();

    let ns_labels: HashMap<&str, &Labels> = store
        .namespaces
        .iter()
        .map(|((_, n), l)| (n.as_str(), l))
        .collect();
    // Workloads, in (namespace, name) order, this node's first; of two pods claiming one IP
    // (a stale status), neither can be trusted with it: both are skipped.
    let mut ip_count: HashMap<IpAddr, usize> = HashMap::new();
    let pods = || {
        let local = store.pods.iter().map(|(k, p)| (true, k, p));
        local.chain(store.remote_pods.iter().map(|(k, p)| (false, k, p)))
    };
    for (_, _, p) in pods() {
        for ip in p.ips.iter() {
            *ip_count.entry(*ip).or_default() += 1;
        }
    }
    let n = store.pods.len() + store.remote_pods.len();
    let mut workloads = Vec::with_capacity(n);
    let mut index_of_ip: HashMap<IpAddr, usize> = HashMap::with_capacity(n);
    // This node's pods that have no IP yet (being added by the CNI plugin right now).
    let mut pending = Vec::new();
    let locality_of: HashMap<&str, &Arc<Locality>> = store
        .nodes
        .iter()
        .map(|((_, n), e)| (n.as_str(), &e.locality))
        .collect();
    let node_ips = node_ips(store);
    for (local, k, p) in pods() {
        match pod_outcome(
            trust_domain,
            rules,
            p,
            ns_labels.get(&*p.namespace).copied(),
            locality_of.get(&*p.node).copied(),
            |ip| ip_count[ip] > 1,
        ) {
            PodOutcome::Skipped(why) => skipped.push((Of::Pod(local, k.clone()), why)),
            PodOutcome::Pending(w) => pending.push(w),
            PodOutcome::Workload(w) => {
                for ip in p.ips.iter() {
                    index_of_ip.insert(*ip, workloads.len());
                }
                workloads.push(Arc::new(w));
            }
        }
    }

    // Slices by service.
    let mut slices_of: HashMap<(&str, &str), Vec<&SliceEntry>> = HashMap::new();
    for ((ns, _), s) in &store.slices {
        slices_of
            .entry((ns.as_str(), s.service.as_str()))
            .or_default()
            .push(s);
    }
    let mut vip_owner: HashMap<IpAddr, usize> = HashMap::new();
    for s in store.services.values() {
        for v in &s.vips {
            *vip_owner.entry(*v).or_default() += 1;
        }
    }
    let mut services = Vec::new();
    let mut endpoints = Vec::new();
    for (k, s) in &store.services {
        let slices = slices_of
            .get(&(&*s.namespace, &*s.name))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let (svc, why) = service_outcome(
            s,
            slices,
            |v| vip_owner[v] > 1,
            |v| index_of_ip.contains_key(v),
            |v| node_ips.contains(v),
        );
        skipped.extend(why.into_iter().map(|w| (Of::Service(k.clone()), w)));
        let Some(svc) = svc else { continue };
        let mut eps: Vec<usize> = ready(slices)
            .filter_map(|ip| index_of_ip.get(ip).copied())
            .collect();
        eps.sort_unstable();
        eps.dedup();
        services.push(svc);
        endpoints.push(eps);
    }
    let state = State::build(
        trust_domain,
        namespaces,
        workloads,
        services,
        endpoints,
        store
            .authz
            .values()
            .chain(store.istio_authz.values())
            .cloned()
            .collect(),
        store
            .peer_authn
            .values()
            .chain(store.istio_peer_authn.values())
            .cloned()
            .collect(),
    )
    .map(|s| s.with_pending(pending).with_enrollment(rules));
    (state, skipped)
}

/// Every node's IP addresses.
pub fn node_ips(store: &Store) -> std::collections::HashSet<IpAddr> {
    store
        .nodes
        .values()
        .flat_map(|n| n.ips.iter().copied())
        .collect()
}

/// The labels of a namespace, interned.
pub fn namespace_labels(
    labels: Option<&BTreeMap<String, String>>,
    int: &mut super::objects::Interner,
) -> Labels {
    labels.map(|l| int.labels(l)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
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
        let mut st = Store::default();
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
                        st.namespaces.insert(
                            key_of(&n.metadata),
                            namespace_labels(n.metadata.labels.as_ref(), &mut int),
                        );
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
    fn istios_labels_and_annotations_under_each_rule() {
        use crate::discovery::enrollment::{
            ISTIO_DATAPLANE_MODE_LABEL, ISTIO_REDIRECTION, ISTIO_SIDECAR_STATUS,
        };
        let istio_ns = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "moved", "labels": {ISTIO_DATAPLANE_MODE_LABEL: "ambient"}}});
        let with = |ns: &str, node: &str, ip: &str, f: &dyn Fn(&mut serde_json::Value)| {
            let mut p = pod(ns, &format!("p{}", &ip[7..]), node, ip);
            f(&mut p);
            p
        };
        let pods = [
            // (pod, protocol without the setting, with it)
            (
                with("moved", NODE, "10.0.0.1", &|_| {}),
                Protocol::Tcp,
                Protocol::Hbone,
            ),
            (
                with("legacy", NODE, "10.0.0.2", &|p| {
                    p["metadata"]["labels"][ISTIO_DATAPLANE_MODE_LABEL] = json!("ambient")
                }),
                Protocol::Tcp,
                Protocol::Hbone,
            ),
            (
                with("demo", NODE, "10.0.0.3", &|p| {
                    p["metadata"]["labels"][ISTIO_DATAPLANE_MODE_LABEL] = json!("none")
                }),
                Protocol::Hbone,
                Protocol::Tcp,
            ),
            (
                with("demo", NODE, "10.0.0.4", &|p| {
                    p["metadata"]["annotations"][ISTIO_SIDECAR_STATUS] =
                        json!("{\"containers\":[]}")
                }),
                Protocol::Tcp,
                Protocol::Tcp,
            ),
            // Remote pods keep what enrollment reads: Istio's label and annotations.
            (
                with("legacy", "n2", "10.0.0.5", &|p| {
                    p["metadata"]["labels"][ISTIO_DATAPLANE_MODE_LABEL] = json!("ambient")
                }),
                Protocol::Tcp,
                Protocol::Hbone,
            ),
            // Istio's ambient mode has it: never enrolled here, but with the setting
            // reached through a tunnel, as Istio's own ztunnel reaches it.
            (
                with("moved", "n2", "10.0.0.6", &|p| {
                    p["metadata"]["annotations"][ISTIO_REDIRECTION] = json!("enabled")
                }),
                Protocol::Tcp,
                Protocol::Hbone,
            ),
        ];
        let istios = "10.0.0.6";
        for istio in [false, true] {
            let rules = Rules { istio };
            let mut objs = vec![ns("demo", true), ns("legacy", false), istio_ns.clone()];
            objs.extend(pods.iter().map(|p| p.0.clone()));
            let (st, refused) = store_with(&objs, rules);
            assert!(refused.is_empty(), "{refused:?}");
            let (s, skipped) = build("cluster.local", rules, &st);
            assert!(skipped.is_empty(), "{skipped:?}");
            let s = s.unwrap();
            assert_eq!(s.namespace_enrolled("moved"), istio);
            for (p, without, with) in &pods {
                let ip = p["status"]["podIP"].as_str().unwrap();
                let w = s.workload_by_ip(ip.parse().unwrap()).unwrap();
                let want = if istio { *with } else { *without };
                assert_eq!(w.protocol, want, "{ip} istio={istio}");
                let enrolled = want == Protocol::Hbone && ip != istios;
                assert_eq!(s.enrolled(w), enrolled, "{ip} istio={istio}");
            }
        }
        let (st, _) = store_with(&[pods[4].0.clone()], Rules { istio: true });
        let r = st.remote_pods.values().next().unwrap();
        assert_eq!(
            r.labels.len(),
            1,
            "only the enrollment label: {:?}",
            r.labels
        );
        let (st, _) = store_with(&[pods[5].0.clone()], Rules { istio: true });
        let r = st.remote_pods.values().next().unwrap();
        assert_eq!(
            r.other_mesh,
            Some(crate::discovery::enrollment::OtherMesh::IstioAmbient)
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

    /// A Service's `istio.io/use-waypoint` label is kept; under the Istio-compatible setting
    /// it (or its namespace's) names the waypoint Istio would send its traffic through.
    #[test]
    fn a_services_waypoint_label_is_kept() {
        let mut labelled = svc("demo", "w", "10.96.0.2", json!(8080));
        labelled["metadata"]["labels"] = json!({"istio.io/use-waypoint": "wp"});
        let objs = vec![
            ns("demo", true),
            svc("demo", "web", "10.96.0.1", json!(8080)),
            labelled,
        ];
        let (st, refused) = store(&objs);
        assert!(refused.is_empty(), "{refused:?}");
        let rules = Rules { istio: true };
        let (s, _) = build("cluster.local", rules, &st);
        let s = s.unwrap();
        let of = |vip: &str| s.waypoint_of(s.service_by_vip(vip.parse().unwrap()).unwrap());
        assert_eq!(of("10.96.0.2"), Some("wp"));
        assert_eq!(of("10.96.0.1"), None);
        let (s, _) = build("cluster.local", Rules::default(), &st);
        let s = s.unwrap();
        let svc = s.service_by_vip("10.96.0.2".parse().unwrap()).unwrap();
        assert_eq!(svc.use_waypoint.as_deref(), Some("wp"));
        assert_eq!(
            s.waypoint_of(svc),
            None,
            "without the Istio-compatible setting"
        );
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
}
