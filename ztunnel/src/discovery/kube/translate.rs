//! The node's store of compact Kubernetes entries ([`Store`]) and its translation into the
//! discovery model ([`build`], pure).
//!
//! One bad object never drops the rest: objects that cannot be in the model (a duplicate IP,
//! an invalid identity, a VIP that is a pod IP…) are skipped and reported, and everything else
//! is built. A workload's protocol is HBONE when it is enrolled (see
//! [`crate::discovery::enrollment`]), else TCP. A
//! service's endpoints are the workloads at the ready addresses of its EndpointSlices, and
//! the addresses that are no workload's (an API server's, a host-network pod's); target
//! ports are the slices' ports, as kube-proxy's (see [`service_outcome`]). A
//! workload's locality is its node's (none while the node is not known).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::objects::{
    pod_key, Key, NamespaceEntry, NodeEntry, PodEntry, ServiceEntry, SliceEntry, Target,
};
use crate::discovery::enrollment::{OtherMesh, Rules};
use crate::discovery::model::{
    Labels, Locality, Namespace, PortOverride, Protocol, Service, ServicePort, State, Workload,
};
use crate::discovery::policy::{AuthorizationPolicy, PeerAuthentication};
use crate::discovery::Error;
use crate::discovery::{istio_entries, waypoint};
use crate::identity::Identity;

/// Everything the node keeps, by (namespace, name).
#[derive(Debug, Default)]
pub struct Store {
    /// This daemon's node.
    pub node: String,
    /// By ("", name).
    pub namespaces: BTreeMap<Key, NamespaceEntry>,
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
    /// Ready Gateways, and every GatewayClass, under the Istio-compatible setting.
    pub gateways: BTreeMap<Key, super::gateways::GatewayEntry>,
    pub gateway_classes: BTreeMap<Key, super::gateways::ClassEntry>,
    /// What Istio's ServiceEntries and WorkloadEntries declare, under the Istio-compatible
    /// setting.
    pub service_entries: BTreeMap<Key, Arc<[istio_entries::Entry]>>,
    pub workload_entries: BTreeMap<Key, Arc<[istio_entries::Entry]>>,
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
/// and whether another pod keeps one of its IPs from it (see [`build_keyed`]).
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
    let enrolled = rules
        .pod(&p.namespace, ns_labels, &p.labels, p.other_mesh)
        .is_ok();
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

/// The addresses `slices` list as ready, each with the key of the pod its endpoint names (0:
/// none).
pub fn ready<'a>(slices: &'a [&'a SliceEntry]) -> impl Iterator<Item = (&'a IpAddr, u64)> + 'a {
    slices
        .iter()
        .flat_map(|sl| sl.ready.iter().zip(sl.pods.iter().copied()))
}

/// Whether workload `w`, at an address a slice lists, is the endpoint there: the endpoint
/// names no pod, or names `w`'s.
pub fn is_endpoint(w: &Workload, pod: u64) -> bool {
    pod == 0 || pod == pod_key(&w.namespace, &w.name)
}

/// What service `s` becomes, given its namespace's entry `ns` (its traffic distribution
/// applies where the service sets none), its EndpointSlices, whether a VIP is claimed by another
/// service too, whether an IP is a workload's, and whether it is a node's (`Some(true)`: this
/// daemon's node): the service (none when it is skipped), and the reasons it or some of its
/// ports were skipped.
///
/// - Its endpoints are the workloads at [`ready`] addresses (of the pod the endpoint names,
///   [`is_endpoint`]), and the ready addresses that are
///   no workload's and either no pod's (no Pod `targetRef`) or a node's (a host-network
///   pod's): [`Service::not_pods`], reached in plaintext as they are. Of a node-local service
///   (`internalTrafficPolicy: Local`), only this node's are kept there (the plan keeps the
///   source's node's workloads).
/// - A port's target is where kube-proxy sends it: each slice's port of the same name (the
///   endpoint-slice controller writes the resolved target port there; a selectorless
///   service's slices give their own); the service's `targetPort` number, else the first
///   slice's, is the port's target, and the endpoints of slices that give another are
///   [`Service::port_overrides`]. A named `targetPort` no slice resolves skips the port; the
///   endpoints of the slices that do not resolve it (pods without a port of that name) are
///   overridden with no target (0): they are not endpoints of that port.
pub fn service_outcome(
    s: &ServiceEntry,
    ns: Option<&NamespaceEntry>,
    slices: &[&SliceEntry],
    shared_vip: impl Fn(&IpAddr) -> bool,
    workload_ip: impl Fn(&IpAddr) -> bool,
    node_ip: impl Fn(&IpAddr) -> Option<bool>,
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
    let mut port_overrides = Vec::new();
    for p in &s.ports {
        let pname = p.name.as_deref().unwrap_or("");
        let in_slice = |sl: &SliceEntry| {
            sl.ports
                .iter()
                .find(|(n, t)| n == pname && *t != 0)
                .map(|(_, t)| *t)
        };
        let target = match &p.target {
            Target::Number(n) => Some(*n),
            Target::Name(_) => slices.iter().find_map(|sl| in_slice(sl)),
        };
        match target {
            Some(t) if t != 0 && p.port != 0 => {
                ports.push(ServicePort {
                    port: p.port,
                    target_port: t,
                });
                for sl in slices {
                    let Some(own) = in_slice(sl).filter(|own| *own != t) else {
                        continue;
                    };
                    port_overrides.extend(sl.ready.iter().map(|ip| PortOverride {
                        ip: *ip,
                        port: p.port,
                        target_port: own,
                    }));
                }
                if matches!(p.target, Target::Name(_)) {
                    // A pod without a port of that name is in a slice without the port:
                    // not an endpoint of it (unless another slice lists it with the port).
                    let with: HashSet<&IpAddr> = slices
                        .iter()
                        .filter(|sl| in_slice(sl).is_some())
                        .flat_map(|sl| sl.ready.iter())
                        .collect();
                    let without = slices
                        .iter()
                        .filter(|sl| in_slice(sl).is_none())
                        .flat_map(|sl| sl.ready.iter())
                        .filter(|ip| !with.contains(ip));
                    port_overrides.extend(without.map(|ip| PortOverride {
                        ip: *ip,
                        port: p.port,
                        target_port: 0,
                    }));
                }
            }
            _ => skipped.push(format!(
                "{what}: port {} has no resolvable target port",
                p.port
            )),
        }
    }
    // An address two slices list takes the first's port.
    port_overrides.sort_by_key(|o| (o.ip, o.port));
    port_overrides.dedup_by_key(|o| (o.ip, o.port));
    let mut not_pods: Vec<IpAddr> = slices
        .iter()
        .flat_map(|sl| {
            sl.not_pods()
                .chain(sl.ready.iter().filter(|ip| node_ip(ip).is_some()))
        })
        .filter(|ip| !workload_ip(ip))
        .filter(|ip| !s.node_local || node_ip(ip) == Some(true))
        .copied()
        .collect();
    not_pods.sort_unstable();
    not_pods.dedup();
    let svc = Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vips: s.vips.clone(),
        ports,
        port_overrides,
        node_local: s.node_local,
        distribution: s
            .distribution
            .or(ns.and_then(|n| n.distribution))
            .unwrap_or_default(),
        selector: s.selector.clone(),
        not_pods,
        use_waypoint: s.use_waypoint.clone(),
        use_waypoint_namespace: s.use_waypoint_namespace.clone(),
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
        .map(|((_, n), e)| Namespace {
            name: n.as_str().into(),
            labels: e.labels.clone(),
        })
        .collect();

    let ns_entries: HashMap<&str, &NamespaceEntry> = store
        .namespaces
        .iter()
        .map(|((_, n), e)| (n.as_str(), e))
        .collect();
    // Workloads, in (namespace, name) order, this node's first. Of pods claiming one IP (a
    // stale status, a pod stuck terminating on a lost node whose address went to another), the
    // only one not being deleted keeps it; with no such single one, none can be trusted with
    // it: all are skipped, and the address is contested (refused, never reached in plaintext).
    let mut claims: HashMap<IpAddr, (usize, usize)> = HashMap::new();
    let pods = || {
        let local = store.pods.iter().map(|(k, p)| (true, k, p));
        local.chain(store.remote_pods.iter().map(|(k, p)| (false, k, p)))
    };
    for (_, _, p) in pods() {
        for ip in p.ips.iter() {
            let (all, live) = claims.entry(*ip).or_default();
            *all += 1;
            *live += usize::from(!p.terminating);
        }
    }
    let contested: Vec<IpAddr> = claims
        .iter()
        .filter(|(_, (all, live))| *all > 1 && *live != 1)
        .map(|(ip, _)| *ip)
        .collect();
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
            ns_entries.get(&*p.namespace).map(|e| &e.labels),
            locality_of.get(&*p.node).copied(),
            |ip| {
                let (all, live) = claims[ip];
                all > 1 && (p.terminating || live > 1)
            },
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
            ns_entries.get(&*s.namespace).copied(),
            slices,
            |v| vip_owner[v] > 1,
            |v| index_of_ip.contains_key(v),
            |v| node_ips.get(v).copied(),
        );
        skipped.extend(why.into_iter().map(|w| (Of::Service(k.clone()), w)));
        let Some(svc) = svc else { continue };
        let mut eps: Vec<usize> = ready(slices)
            .filter_map(|(ip, pod)| {
                let i = *index_of_ip.get(ip)?;
                is_endpoint(&workloads[i], pod).then_some(i)
            })
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
    .map(|s| {
        s.with_pending(pending)
            .with_enrollment(rules)
            .with_all_namespaces()
            .with_contested(contested)
            .with_waypoints(waypoints(store))
            .with_istio_entries(istio_entries(store))
    });
    (state, skipped)
}

/// The ready waypoints of `store`: each ready Gateway, taking what its label says, else its
/// class's, else Services' traffic, from the namespaces its listeners let attach. A ready
/// Gateway whose class is not listed (yet: its controller made it ready) and says nothing
/// itself is taken to take every kind.
pub fn waypoints(store: &Store) -> waypoint::Waypoints {
    let mut w = waypoint::Waypoints::default();
    for ((ns, name), g) in &store.gateways {
        let class = store
            .gateway_classes
            .get(&(String::new(), g.class.to_string()));
        let serves = match (&g.waypoint_for, class) {
            (None, None) => waypoint::Serves::ALL,
            (own, class) => waypoint::Serves::of(
                own.as_deref(),
                class.and_then(|c| c.waypoint_for.as_deref()),
            ),
        };
        w.insert_attach(ns, name, serves, g.attach.to_vec());
    }
    w
}

/// The addresses Istio's ServiceEntries and WorkloadEntries of `store` declare.
pub fn istio_entries(store: &Store) -> istio_entries::Entries {
    let all = (store.service_entries.values()).chain(store.workload_entries.values());
    istio_entries::Entries::new(all.flat_map(|e| e.iter().cloned()))
}

/// Every node's IP addresses, each with whether it is this daemon's node's.
pub fn node_ips(store: &Store) -> HashMap<IpAddr, bool> {
    let mut ips = HashMap::new();
    for ((_, name), n) in &store.nodes {
        for ip in n.ips.iter() {
            *ips.entry(*ip).or_default() |= *name == store.node;
        }
    }
    ips
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
