//! Kubernetes objects as the node keeps them: each object is reduced to a compact entry the
//! moment it arrives, and the full object is dropped (pure functions, no I/O).
//!
//! - Pods arrive as [`LeanPod`], a `kube::Resource` that deserializes only the fields the model
//!   needs (name, namespace, uid, labels, the annotations that say another mesh handles the
//!   pod, its generated name and controller, deletion time, node, host network, service account, phase, IPs): the rest of the Pod (containers,
//!   managed fields, other annotations, conditions…) is skipped by the JSON decoder and never
//!   allocated. A pod is a workload only if it is not host-network, not terminal
//!   (`Succeeded`/`Failed`: its IP may already belong to another pod) and has an IP; whether
//!   it is being deleted (`deletionTimestamp`) is kept, to settle an IP two pods claim. A pod on
//!   another node keeps no uid and, of its labels, only the enrollment labels
//!   ([`Rules::keeps`]), which is all outbound routing and identity checks need; its service
//!   membership comes from EndpointSlices.
//! - Nodes keep their locality (region and zone, from their topology labels), which their
//!   pods' telemetry reports, and their IP addresses, at which Services reach their
//!   host-network pods.
//! - Services keep name, VIPs (`clusterIPs`; headless and ExternalName services have none and
//!   are not kept), ports with their `targetPort` (a number, or a name resolved against the
//!   EndpointSlices), selector, whether `internalTrafficPolicy` is `Local`, and its
//!   `trafficDistribution` (else Istio's annotation of it).
//! - EndpointSlices keep the service they belong to (`kubernetes.io/service-name`), their named
//!   ports, and the addresses of ready endpoints only (`conditions.ready` absent counts as ready,
//!   as the API documents), each with the Pod its endpoint names (`targetRef`), if any: an
//!   address is an endpoint of the pod the slice names, not of whichever pod holds it now (a
//!   slice lagging behind an address's reuse), as istiod joins them; an address that names no
//!   Pod is an API server's, or a selectorless service's manual one.
//! - Policies go through [`PolicyObject::from_value`], as the file source's do: refused only
//!   when they cannot be identified; an unreadable spec makes a policy that fails closed.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Deserializer};

use crate::discovery::enrollment::{OtherMesh, Rules};
pub use crate::discovery::model::Interner;
use crate::discovery::model::{Distribution, Labels, Locality, Telemetry};

/// Istio's annotation of a Service's traffic distribution (read where the field is not set),
/// or of its namespace's (read where the Service has neither).
pub const ISTIO_TRAFFIC_DISTRIBUTION: &str = "networking.istio.io/traffic-distribution";
use crate::discovery::policy::PolicyObject;
use crate::discovery::waypoint;

/// A Pod with only the fields discovery reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LeanPod {
    #[serde(deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: LeanPodSpec,
    #[serde(default)]
    pub status: LeanPodStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeanPodSpec {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    pub service_account_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeanPodStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

/// Object metadata without managed fields or finalizers, of the owners only the controller,
/// and of the annotations only those [`OtherMesh::of`] reads.
fn lean_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        generate_name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        #[serde(default, deserialize_with = "read_annotations")]
        annotations: Option<BTreeMap<String, String>>,
        owner_references: Option<Vec<OwnerReference>>,
        deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    }
    let m = Meta::deserialize(d)?;
    let controller = m
        .owner_references
        .into_iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    Ok(ObjectMeta {
        name: m.name,
        generate_name: m.generate_name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        annotations: m.annotations,
        owner_references: controller.map(|c| vec![c]),
        deletion_timestamp: m.deletion_timestamp,
        ..Default::default()
    })
}

/// The annotations [`OtherMesh::of`] reads; the others' values are skipped unread.
fn read_annotations<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Option<BTreeMap<String, String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of annotations")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                if OtherMesh::reads(&k) {
                    kept.insert(k.into_owned(), m.next_value::<String>()?);
                } else {
                    m.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok((!kept.is_empty()).then_some(kept))
        }
    }
    d.deserialize_any(Visit)
}

impl kube::Resource for LeanPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A Node with only its name, labels and addresses (the rest of its status, with every image
/// it holds, is skipped).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LeanNode {
    #[serde(deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: LeanNodeStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LeanNodeStatus {
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeAddress {
    #[serde(default)]
    pub address: String,
}

impl kube::Resource for LeanNode {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "Node".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "nodes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A namespace as the daemon keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceEntry {
    pub labels: Labels,
    /// Istio's `networking.istio.io/traffic-distribution` annotation: the traffic
    /// distribution of its Services that set none.
    pub distribution: Option<Distribution>,
}

/// The entry for namespace `ns`.
pub fn namespace_entry(ns: &K8sNamespace, int: &mut Interner) -> NamespaceEntry {
    let meta = &ns.metadata;
    NamespaceEntry {
        labels: meta
            .labels
            .as_ref()
            .map(|l| int.labels(l))
            .unwrap_or_default(),
        distribution: annotated_distribution(meta),
    }
}

/// Istio's `networking.istio.io/traffic-distribution` annotation, if present and not empty
/// (unknown values are [`Distribution::Any`]), as istiod reads it.
fn annotated_distribution(meta: &ObjectMeta) -> Option<Distribution> {
    let a = meta.annotations.as_ref()?;
    a.get(ISTIO_TRAFFIC_DISTRIBUTION)
        .filter(|v| !v.is_empty())
        .map(|v| Distribution::parse(v))
}

/// A node as the daemon keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    /// From its topology labels.
    pub locality: Arc<Locality>,
    /// Its IP addresses (`status.addresses`; host names are left out): where its host-network
    /// pods are reached.
    pub ips: Box<[IpAddr]>,
}

/// The entry for `node`.
pub fn node_entry(node: &LeanNode, int: &mut Interner) -> NodeEntry {
    let empty = BTreeMap::new();
    let mut ips: Vec<IpAddr> = node
        .status
        .addresses
        .iter()
        .filter_map(|a| a.address.parse().ok())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    NodeEntry {
        locality: int.locality(Locality::of_node(
            node.metadata.labels.as_ref().unwrap_or(&empty),
        )),
        ips: ips.into(),
    }
}

/// (namespace, name); namespace empty for cluster-scoped objects.
pub type Key = (String, String);

pub fn key_of(meta: &ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A pod as the node keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// Empty for a pod on another node.
    pub uid: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
    pub node: Arc<str>,
    pub ips: Box<[IpAddr]>,
    /// All labels for a local pod; only the enrollment labels for a remote one.
    pub labels: Labels,
    /// Another mesh that handles the pod already.
    pub other_mesh: Option<OtherMesh>,
    /// Its workload and canonical service ([`crate::discovery::telemetry`]).
    pub telemetry: Arc<Telemetry>,
    /// Being deleted (`deletionTimestamp`): of two pods claiming one IP, the one that is not
    /// keeps it ([`crate::discovery::kube::translate::pod_outcome`]).
    pub terminating: bool,
}

/// The entry for `pod` on the daemon of `node`: `Ok(None)` when the pod is not a workload
/// (host network, terminal, not scheduled, or on another node with no IP yet); `Err` when it
/// is malformed. A pod of this node with no IP yet is kept with empty `ips`: it is the pod
/// the CNI plugin is adding right now, and its IP is in the plugin's request, not yet in the
/// API.
pub fn pod_entry(
    pod: &LeanPod,
    node: &str,
    rules: Rules,
    int: &mut Interner,
) -> Result<Option<PodEntry>, String> {
    let (ns, name) = key_of(&pod.metadata);
    let what = format!("pod {ns}/{name}");
    if pod.spec.host_network == Some(true) {
        return Ok(None);
    }
    if matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let Some(pod_node) = pod.spec.node_name.as_deref().filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    let mut raw: Vec<&str> = pod
        .status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    if raw.is_empty() {
        raw.extend(pod.status.pod_ip.as_deref().filter(|s| !s.is_empty()));
    }
    let local = pod_node == node;
    if raw.is_empty() && !local {
        return Ok(None);
    }
    let ips = raw
        .iter()
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|e| format!("{what}: IP {s:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let controller = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.as_str(), o.name.as_str()));
    let workload = crate::discovery::telemetry::workload_name(
        &name,
        pod.metadata.generate_name.as_deref(),
        controller,
        labels,
    );
    let telemetry = int.telemetry(&name, workload, labels);
    let labels = if local {
        int.labels(labels)
    } else {
        labels
            .iter()
            .filter(|(k, _)| rules.keeps(k))
            .map(|(k, v)| (int.get(k), int.get(v)))
            .collect()
    };
    let annotations = pod.metadata.annotations.as_ref();
    let other_mesh = OtherMesh::of(|k| annotations?.get(k).map(String::as_str));
    Ok(Some(PodEntry {
        uid: if local {
            pod.metadata.uid.as_deref().unwrap_or_default().into()
        } else {
            int.get("")
        },
        name: name.as_str().into(),
        namespace: int.get(&ns),
        service_account: int.get(
            pod.spec
                .service_account_name
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or("default"),
        ),
        node: int.get(pod_node),
        ips: ips.into_boxed_slice(),
        labels,
        other_mesh,
        telemetry,
        terminating: pod.metadata.deletion_timestamp.is_some(),
    }))
}

/// A service port's target: a number, or a port name resolved through the EndpointSlices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortEntry {
    pub name: Option<String>,
    pub port: u16,
    pub target: Target,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceEntry {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortEntry>,
    pub selector: Labels,
    /// `internalTrafficPolicy: Local`.
    pub node_local: bool,
    /// Its `trafficDistribution` if known, else Istio's `networking.istio.io/traffic-distribution`
    /// annotation; `None`: neither, its namespace's applies ([`NamespaceEntry::distribution`]).
    pub distribution: Option<Distribution>,
    /// Its `istio.io/use-waypoint` label, as
    /// [`crate::discovery::waypoint::service_label`] keeps it.
    pub use_waypoint: Option<Arc<str>>,
    /// Its `istio.io/use-waypoint-namespace` label.
    pub use_waypoint_namespace: Option<Arc<str>>,
}

/// The entry for a Service: `Ok(None)` for services without a VIP (headless, ExternalName).
pub fn service_entry(svc: &K8sService, int: &mut Interner) -> Result<Option<ServiceEntry>, String> {
    let (ns, name) = key_of(&svc.metadata);
    let what = format!("service {ns}/{name}");
    let labels = svc.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    let Some(spec) = &svc.spec else {
        return Ok(None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let raw: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let raw: Vec<&str> = raw
        .into_iter()
        .filter(|s| !s.is_empty() && *s != "None")
        .collect();
    if raw.is_empty() {
        return Ok(None);
    }
    let vips = raw
        .iter()
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|e| format!("{what}: VIP {s:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|pr| pr != "TCP") {
            continue; // the mesh carries TCP only
        }
        let port = u16::try_from(p.port).map_err(|_| format!("{what}: port {}", p.port))?;
        let target = match &p.target_port {
            None => Target::Number(port),
            Some(IntOrString::Int(n)) => {
                Target::Number(u16::try_from(*n).map_err(|_| format!("{what}: targetPort {n}"))?)
            }
            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                Ok(n) => Target::Number(n),
                Err(_) => Target::Name(s.clone()),
            },
        };
        ports.push(PortEntry {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port,
            target,
        });
    }
    Ok(Some(ServiceEntry {
        name: name.as_str().into(),
        namespace: int.get(&ns),
        vips,
        ports,
        selector: int.labels(spec.selector.as_ref().unwrap_or(&BTreeMap::new())),
        node_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        distribution: spec
            .traffic_distribution
            .as_deref()
            .map(Distribution::parse)
            .filter(|d| *d != Distribution::Any)
            .or_else(|| annotated_distribution(&svc.metadata)),
        use_waypoint: waypoint::service_label(label).map(Into::into),
        use_waypoint_namespace: label(waypoint::ISTIO_USE_WAYPOINT_NAMESPACE).map(Into::into),
    }))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEntry {
    /// The service it belongs to, in the slice's namespace.
    pub service: String,
    /// Port name ("" when unnamed) → port number on the endpoints.
    pub ports: Vec<(String, u16)>,
    /// Addresses of ready endpoints.
    pub ready: Vec<IpAddr>,
    /// For each of `ready`, the [`pod_key`] of the Pod its endpoint names (`targetRef`), 0
    /// when it names none: an address is a pod's endpoint only while that pod holds it.
    pub pods: Vec<u64>,
}

impl SliceEntry {
    /// Those of `ready` whose endpoint's `targetRef` is not a Pod (or is absent).
    pub fn not_pods(&self) -> impl Iterator<Item = &IpAddr> {
        self.ready
            .iter()
            .zip(&self.pods)
            .filter(|(_, pod)| **pod == 0)
            .map(|(ip, _)| ip)
    }
}

/// A pod's key in [`SliceEntry::pods`]: a hash of its namespace and name, never 0.
pub fn pod_key(namespace: &str, name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (namespace, name).hash(&mut h);
    h.finish().max(1)
}

/// The entry for an EndpointSlice: `Ok(None)` when it names no service.
pub fn slice_entry(s: &EndpointSlice) -> Result<Option<SliceEntry>, String> {
    let Some(service) = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
    else {
        return Ok(None);
    };
    let (ns, name) = key_of(&s.metadata);
    let what = format!("endpointslice {ns}/{name}");
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port?).ok()?;
            Some((p.name.clone().unwrap_or_default(), port))
        })
        .collect();
    let (mut ready, mut pods) = (Vec::new(), Vec::new());
    for ep in &s.endpoints {
        if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        let pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .map(|r| {
                pod_key(
                    r.namespace.as_deref().unwrap_or(&ns),
                    r.name.as_deref().unwrap_or_default(),
                )
            });
        for a in &ep.addresses {
            // FQDN slices carry names, not addresses: nothing the mesh can route to.
            if s.address_type == "FQDN" {
                continue;
            }
            let ip = a
                .parse::<IpAddr>()
                .map_err(|e| format!("{what}: address {a:?}: {e}"))?;
            ready.push(ip);
            pods.push(pod.unwrap_or(0));
        }
    }
    Ok(Some(SliceEntry {
        service: service.clone(),
        ports,
        ready,
        pods,
    }))
}

/// A policy object (AuthorizationPolicy or PeerAuthentication) as JSON, parsed the way the
/// file source parses it: `Err` only for an object that cannot be identified; a spec that
/// cannot be read in full makes a policy that fails closed.
pub fn policy_entry(obj: serde_json::Value) -> Result<PolicyObject, String> {
    PolicyObject::from_value(obj)
}
