//! The in-memory model of the mesh: workloads, namespaces, services and policies, as one
//! immutable [`State`] with the indexes the data path needs (by IP, by uid, by VIP, by name)
//! and every service's endpoints precomputed. Built and validated by [`State::build`]; a state
//! derived from it by a few changes (see [`super::overlay`]) shares its [`Base`] and holds
//! those changes as a small [`Patch`] that every lookup consults first. Readers share a state
//! as `Arc<State>` and never lock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::policy::{AuthorizationPolicy, PeerAuthentication};
use super::Error;
use crate::identity::Identity;

pub use super::enrollment::DATAPLANE_MODE_LABEL;
use super::enrollment::{NotEnrolled, OtherMesh, Rules};
pub use super::interner::Interner;
pub use super::ips::Ips;
use super::istio_entries::Entries;
pub use super::service::{Distribution, PortOverride, Service, ServicePort};
pub use super::telemetry::{Locality, Telemetry};
use super::waypoint;
pub use crate::labels::{Label, Labels};

/// Whether a workload speaks HBONE (is in the mesh) or plain TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
pub enum Protocol {
    #[default]
    #[serde(rename = "HBONE")]
    Hbone,
    #[serde(rename = "TCP")]
    Tcp,
}

/// A pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
    pub node: Arc<str>,
    pub ips: Ips,
    pub labels: Labels,
    pub protocol: Protocol,
    /// Another mesh that handles the pod already (read from its annotations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_mesh: Option<OtherMesh>,
    /// Its workload and canonical service, kept even where its labels are not.
    pub telemetry: Arc<Telemetry>,
    /// Its node's region and zone.
    pub locality: Arc<Locality>,
}

impl Workload {
    /// The workload it belongs to (Istio's name); the pod's own name when none is known. The
    /// names are the model's shared strings: a label set takes them by reference count.
    pub fn workload_name(&self) -> &Arc<str> {
        match &*self.telemetry.workload_name {
            "" => &self.name,
            _ => &self.telemetry.workload_name,
        }
    }

    /// Its canonical service; the workload name when none is known.
    pub fn canonical_name(&self) -> &Arc<str> {
        match &*self.telemetry.canonical_name {
            "" => self.workload_name(),
            _ => &self.telemetry.canonical_name,
        }
    }

    /// Its canonical revision; `latest` when none is known.
    pub fn canonical_revision(&self) -> &Arc<str> {
        static LATEST: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        match &*self.telemetry.canonical_revision {
            "" => LATEST.get_or_init(|| "latest".into()),
            _ => &self.telemetry.canonical_revision,
        }
    }

    /// The workload's SPIFFE identity in `trust_domain` (validated when the state was built).
    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
            .expect("validated when the state was built")
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Namespace {
    pub name: Arc<str>,
    pub labels: Labels,
}

/// Indices by IP, one map per family: an IPv4 entry takes 8 bytes where an `IpAddr` key
/// alone takes 17.
#[derive(Clone, Debug, Default)]
pub(super) struct IpIndex {
    v4: HashMap<std::net::Ipv4Addr, u32>,
    v6: HashMap<std::net::Ipv6Addr, u32>,
}

impl IpIndex {
    /// Maps `ip` to `i`; the index it had, if any.
    pub(super) fn insert(&mut self, ip: IpAddr, i: u32) -> Option<u32> {
        match ip {
            IpAddr::V4(a) => self.v4.insert(a, i),
            IpAddr::V6(a) => self.v6.insert(a, i),
        }
    }

    pub(super) fn remove(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => self.v4.remove(&a),
            IpAddr::V6(a) => self.v6.remove(&a),
        };
    }

    pub(super) fn get(&self, ip: IpAddr) -> Option<u32> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&a),
            IpAddr::V6(a) => self.v6.get(&a),
        }
        .copied()
    }
}

/// The bulk of a snapshot: what a [`State`] shares with the states built after it from the
/// same base (see [`super::overlay`]). Its slots (indices in `workloads` and `services`) are
/// stable: a removed workload or service leaves an empty slot, which a later one may take.
#[derive(Debug, Default)]
pub(super) struct Base {
    pub(super) trust_domain: String,
    pub(super) namespaces: Arc<HashMap<Arc<str>, Namespace>>,
    pub(super) workloads: Vec<Option<Arc<Workload>>>,
    /// Slots in `workloads` that hold one.
    pub(super) workload_count: usize,
    /// Indices in `workloads`.
    pub(super) by_ip: IpIndex,
    pub(super) by_uid: HashMap<Arc<str>, Arc<Workload>>,
    pub(super) services: Vec<Option<Arc<Service>>>,
    /// Slots in `services` that hold one.
    pub(super) service_count: usize,
    /// Indices in `services`.
    pub(super) by_vip: HashMap<IpAddr, u32>,
    /// Indices in `services` of every service, sorted by (namespace, name).
    pub(super) services_by_name: Vec<u32>,
    /// Each service's endpoints, as indices in `workloads` (empty for an empty slot).
    pub(super) endpoints: Vec<Box<[u32]>>,
    /// The services (indices in `services`) each workload with a uid is an endpoint of.
    pub(super) services_of_uid: HashMap<Arc<str>, Vec<usize>>,
    pub(super) policies: Arc<Policies>,
    /// This node's pods that have no IP yet; also in `by_uid`.
    pub(super) pending: Vec<Arc<Workload>>,
    /// Which labels enroll a pod.
    pub(super) enrollment: Rules,
    /// Every namespace of the cluster is listed (the Kubernetes source): one that is not has
    /// not been seen by discovery yet.
    pub(super) all_namespaces: bool,
    /// Sorted addresses that two pods claim, neither trusted with them: no workload's.
    pub(super) contested: Box<[IpAddr]>,
    /// The ready waypoints (see [`super::waypoint`]).
    pub(super) waypoints: Arc<waypoint::Waypoints>,
    /// The addresses Istio's ServiceEntries and WorkloadEntries declare.
    pub(super) entries: Arc<Entries>,
}

/// The policies as listed and as compiled.
#[derive(Debug, Default)]
pub(super) struct Policies {
    authz: Vec<AuthorizationPolicy>,
    peer_authn: Vec<PeerAuthentication>,
    index: crate::policy::PolicyIndex,
}

/// The mesh as one immutable snapshot: a shared `Base` and, for a state derived from it by
/// a few changes, the `Patch` of those changes, consulted first.
#[derive(Debug, Default)]
pub struct State {
    pub(super) base: Arc<Base>,
    pub(super) patch: Option<Arc<Patch>>,
}

/// Whether a non-empty `selector` matches `labels` (pairs sorted by key, as in [`Labels`]).
fn selects(selector: &Labels, labels: &[Label]) -> bool {
    let get = |key: &str| {
        labels
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &labels[i].1)
    };
    !selector.is_empty() && selector.iter().all(|(k, v)| get(k) == Some(v))
}

/// The endpoints of each service by its selector: for `services[i]` as (namespace,
/// selector), the indices in `workloads` (as (namespace, labels sorted by key)) of those it
/// selects, in order. An empty selector selects nothing.
///
/// Linear in the input and the output, not in their product: the workloads are indexed by
/// the (namespace, key, value) pairs that some selector uses, and each service filters only
/// the workloads of its rarest pair.
pub fn select_endpoints(
    workloads: &[(&str, &[Label])],
    services: &[(&str, &Labels)],
) -> Vec<Vec<usize>> {
    let mut postings: HashMap<(&str, &str, &str), Vec<usize>> = services
        .iter()
        .flat_map(|(ns, sel)| {
            sel.iter()
                .map(move |(k, v)| ((*ns, &**k, &**v), Vec::new()))
        })
        .collect();
    for (i, (ns, labels)) in workloads.iter().enumerate() {
        for (k, v) in labels.iter() {
            if let Some(p) = postings.get_mut(&(*ns, &**k, &**v)) {
                p.push(i);
            }
        }
    }
    services
        .iter()
        .map(|(ns, sel)| {
            let rarest = sel
                .iter()
                .map(|(k, v)| &postings[&(*ns, &**k, &**v)])
                .min_by_key(|p| p.len());
            rarest
                .into_iter()
                .flatten()
                .copied()
                .filter(|&i| selects(sel, workloads[i].1))
                .collect()
        })
        .collect()
}

impl State {
    /// Builds and validates a state.
    ///
    /// `endpoints[i]` lists the indices in `workloads` of service `i`'s endpoints, as the
    /// source found them (by selector with `select_endpoints`, before the labels of remote
    /// workloads were dropped; or from EndpointSlices).
    /// Workloads with an empty uid (remote ones, scoped) are not indexed by uid.
    pub fn build(
        trust_domain: &str,
        namespaces: Vec<Namespace>,
        workloads: Vec<Arc<Workload>>,
        services: Vec<Service>,
        endpoints: Vec<Vec<usize>>,
        authz: Vec<AuthorizationPolicy>,
        peer_authn: Vec<PeerAuthentication>,
    ) -> Result<State, Error> {
        let index = crate::policy::PolicyIndex::build(
            &authz,
            &peer_authn,
            &crate::policy::root_namespaces(),
        );
        let mut s = Base {
            trust_domain: trust_domain.to_owned(),
            policies: Arc::new(Policies {
                authz,
                peer_authn,
                index,
            }),
            ..Default::default()
        };
        let mut ns_map = HashMap::with_capacity(namespaces.len());
        for ns in namespaces {
            if ns_map.insert(ns.name.clone(), ns.clone()).is_some() {
                return Err(Error::Invalid(format!(
                    "namespace {} is listed twice",
                    ns.name
                )));
            }
        }
        s.namespaces = Arc::new(ns_map);
        s.workloads.reserve_exact(workloads.len());
        s.by_ip.v4.reserve(workloads.len());
        for w in workloads {
            let what = |w: &Workload| format!("workload {}/{}", w.namespace, w.name);
            Identity::check(trust_domain, &w.namespace, &w.service_account)
                .map_err(|e| Error::Invalid(format!("{}: {e}", what(&w))))?;
            if w.ips.is_empty() {
                return Err(Error::Invalid(format!("{} has no IP", what(&w))));
            }
            if !w.uid.is_empty() && s.by_uid.insert(w.uid.clone(), w.clone()).is_some() {
                return Err(Error::Invalid(format!(
                    "{}: uid {} is used twice",
                    what(&w),
                    w.uid
                )));
            }
            let index = s.workloads.len() as u32;
            for ip in &w.ips {
                if let Some(other) = s.by_ip.insert(*ip, index) {
                    // `other` is `w` itself when it lists the IP twice.
                    let other = s
                        .workloads
                        .get(other as usize)
                        .and_then(Option::as_ref)
                        .unwrap_or(&w);
                    return Err(Error::Invalid(format!(
                        "{}: IP {ip} is also {}/{}",
                        what(&w),
                        other.namespace,
                        other.name
                    )));
                }
            }
            s.workloads.push(Some(w));
        }
        s.workload_count = s.workloads.len();
        for (i, svc) in services.into_iter().enumerate() {
            let what = format!("service {}/{}", svc.namespace, svc.name);
            let zero = svc.ports.iter().any(|p| p.port == 0 || p.target_port == 0);
            if zero {
                return Err(Error::Invalid(format!("{what} has a port 0")));
            }
            let endpoints: Box<[u32]> = endpoints
                .get(i)
                .into_iter()
                .flatten()
                .filter(|&&j| j < s.workloads.len())
                .map(|&j| j as u32)
                .collect();
            let svc = Arc::new(svc);
            let idx = s.services.len();
            for vip in &svc.vips {
                if s.by_vip.insert(*vip, idx as u32).is_some() {
                    return Err(Error::Invalid(format!("{what}: VIP {vip} is used twice")));
                }
                if s.by_ip.get(*vip).is_some() {
                    return Err(Error::Invalid(format!(
                        "{what}: VIP {vip} is a workload IP"
                    )));
                }
            }
            let workloads = endpoints
                .iter()
                .filter_map(|&j| s.workloads[j as usize].as_ref());
            for w in workloads.filter(|w| !w.uid.is_empty()) {
                s.services_of_uid
                    .entry(w.uid.clone())
                    .or_default()
                    .push(idx);
            }
            s.services.push(Some(svc));
            s.endpoints.push(endpoints);
        }
        s.service_count = s.services.len();
        s.services_by_name = Base::sorted_by_name(&s.services);
        if let Some(w) = s.services_by_name.windows(2).find(|w| {
            let (a, b) = (s.service(w[0]), s.service(w[1]));
            (&a.namespace, &a.name) == (&b.namespace, &b.name)
        }) {
            let svc = s.service(w[0]);
            return Err(Error::Invalid(format!(
                "service {}/{} is listed twice",
                svc.namespace, svc.name
            )));
        }
        Ok(State {
            base: Arc::new(s),
            patch: None,
        })
    }

    /// The base of a state being built (not shared yet).
    fn base_mut(&mut self) -> &mut Base {
        Arc::get_mut(&mut self.base).expect("a state being built is not shared")
    }

    /// Adds this node's pods that have no IP yet, found by uid only: they are not
    /// workloads (nothing can be routed to them) until discovery learns their IPs, but the
    /// CNI plugin adding one may enroll it with the IPs it was just given
    /// ([`crate::capture::decide::decide`]). A uid already known is left as it is.
    pub fn with_pending(mut self, pending: Vec<Workload>) -> State {
        let base = self.base_mut();
        for w in pending {
            if !w.uid.is_empty() && !base.by_uid.contains_key(&w.uid) {
                let w = Arc::new(w);
                base.by_uid.insert(w.uid.clone(), w.clone());
                base.pending.push(w);
            }
        }
        self
    }

    /// A pod of this node that has no IP yet (see [`State::with_pending`]), by name, for a
    /// runtime that does not pass the pod's uid to the CNI plugin.
    pub fn pending_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.pending()
            .iter()
            .find(|w| &*w.namespace == namespace && &*w.name == name)
    }

    /// This node's pods that have no IP yet.
    pub fn pending(&self) -> &[Arc<Workload>] {
        match self.patch.as_ref().and_then(|p| p.pending.as_ref()) {
            Some(p) => p,
            None => &self.base.pending,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.base.trust_domain
    }
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_at(self.slot_of_ip(ip)?)
    }
    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        if let Some(w) = self.patch.as_ref().and_then(|p| p.by_uid.get(uid)) {
            return w.as_ref();
        }
        self.base.by_uid.get(uid)
    }
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_at(self.slot_of_vip(ip)?)
    }
    /// The workloads a service's selector picks (same namespace); a slot emptied since the
    /// endpoints were chosen is skipped, never a panic on the data path.
    pub fn endpoints_of_vip(
        &self,
        ip: IpAddr,
    ) -> impl Iterator<Item = &Arc<Workload>> + Clone + '_ {
        let endpoints = match self.slot_of_vip(ip) {
            Some(i) => self.endpoints_at(i),
            None => &[],
        };
        endpoints.iter().filter_map(|&j| self.workload_at(j))
    }
    /// Every workload, in no guaranteed order.
    pub fn workloads(&self) -> Workloads<'_> {
        Workloads(self)
    }
    /// The services `w` is an endpoint of, when it has a uid (this node's workloads do).
    pub fn services_of(&self, w: &Workload) -> impl Iterator<Item = &Arc<Service>> {
        self.services_of_uid(&w.uid)
            .iter()
            .filter_map(|&i| self.service_at(i as u32))
    }
    /// The service whose hostname is `host` (`<name>.<namespace>.svc.<cluster_domain>`).
    pub fn service_by_hostname(&self, host: &str, cluster_domain: &str) -> Option<&Arc<Service>> {
        let rest = host.strip_suffix(cluster_domain)?;
        self.service_at(self.service_by_hostname_key(rest.strip_suffix(".svc.")?)?)
    }
    /// Every service, in no guaranteed order.
    pub fn services(&self) -> Services<'_> {
        Services(self)
    }
    /// The workloads scheduled on `node`.
    pub fn local_workloads<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads().iter().filter(move |w| &*w.node == node)
    }
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.base.namespaces.get(name)
    }
    /// The compiled, indexed policies (the engine's input).
    pub fn policy(&self) -> &crate::policy::PolicyIndex {
        &self.base.policies.index
    }
    pub fn authorization_policies(&self) -> &[AuthorizationPolicy] {
        &self.base.policies.authz
    }
    pub fn peer_authentications(&self) -> &[PeerAuthentication] {
        &self.base.policies.peer_authn
    }

    /// The state under these enrollment rules (the default: our labels only).
    pub fn with_enrollment(mut self, rules: Rules) -> State {
        self.base_mut().enrollment = rules;
        self
    }

    /// The enrollment rules in force.
    pub fn enrollment(&self) -> Rules {
        self.base.enrollment
    }

    /// The state of a source that lists every namespace of the cluster (see
    /// [`State::namespace_unseen`]).
    pub fn with_all_namespaces(mut self) -> State {
        self.base_mut().all_namespaces = true;
        self
    }

    /// Marks `ips` as claimed by two pods, neither trusted with them (see [`State::contested`]).
    pub fn with_contested(mut self, mut ips: Vec<IpAddr>) -> State {
        ips.sort_unstable();
        ips.dedup();
        self.base_mut().contested = ips.into();
        self
    }

    /// Whether two pods claim `ip` and neither is trusted with it: it is no workload's, yet a
    /// mesh pod may hold it, so nothing goes to it in plaintext either.
    pub fn contested(&self, ip: IpAddr) -> bool {
        self.base.contested.binary_search(&ip).is_ok()
    }

    /// Whether namespace `name` exists but discovery has not seen it yet: a source that lists
    /// every namespace does not list it. What its pods are is then unknown.
    pub fn namespace_unseen(&self, name: &str) -> bool {
        self.base.all_namespaces && self.namespace(name).is_none()
    }

    /// The ready waypoints this state knows.
    pub fn with_waypoints(mut self, waypoints: waypoint::Waypoints) -> State {
        self.base_mut().waypoints = Arc::new(waypoints);
        self
    }

    /// The addresses Istio's ServiceEntries and WorkloadEntries declare.
    pub fn with_istio_entries(mut self, entries: Entries) -> State {
        self.base_mut().entries = Arc::new(entries);
        self
    }

    /// The ServiceEntry or WorkloadEntry that a pod of namespace `client` reaches at `ip`, and
    /// the waypoint (`namespace/name`) Istio would send that traffic through, under the
    /// Istio-compatible setting (see [`super::istio_entries`]); `service` is the namespace of
    /// the Kubernetes Service whose VIP `ip` is, if any.
    pub fn entry_waypoint(
        &self,
        ip: IpAddr,
        client: &str,
        service: Option<&str>,
    ) -> Option<(String, String)> {
        if !self.base.enrollment.istio {
            return None;
        }
        let entries = self.base.entries.addressed(ip, client, service);
        entries.into_iter().find_map(|e| {
            let waypoint = self.through(e.traffic, &e.namespace, || e.own())?;
            Some((e.to_string(), waypoint))
        })
    }

    /// The waypoint (`namespace/name`) Istio would send `svc`'s traffic through, under the
    /// Istio-compatible setting (see the module's rules).
    pub fn waypoint_of(&self, svc: &Service) -> Option<String> {
        self.through(waypoint::Traffic::Service, &svc.namespace, || {
            waypoint::UseWaypoint {
                name: svc.use_waypoint.as_deref(),
                namespace: svc.use_waypoint_namespace.as_deref(),
                gateway: None,
            }
        })
    }

    /// The waypoint (`namespace/name`) Istio would send the traffic addressed to pod `w`
    /// through, under the Istio-compatible setting (see the module's rules). A pod reached
    /// through a Service does not go through it.
    pub fn workload_waypoint(&self, w: &Workload) -> Option<String> {
        self.through(waypoint::Traffic::Workload, &w.namespace, || {
            waypoint::UseWaypoint::of(|k| w.labels.get(k).map(|v| &**v))
        })
    }

    /// The waypoint `traffic` to an object of `namespace`, whose labels say `own`, goes
    /// through; none without the Istio-compatible setting, which then reads no label.
    fn through<'a>(
        &self,
        traffic: waypoint::Traffic,
        namespace: &str,
        own: impl FnOnce() -> waypoint::UseWaypoint<'a>,
    ) -> Option<String> {
        if !self.base.enrollment.istio {
            return None;
        }
        let ns = self.namespace(namespace).map(|n| &n.labels);
        self.base.waypoints.through(traffic, namespace, own(), ns)
    }

    /// Whether namespace `name` enrolls its pods (see [`super::enrollment`]).
    pub fn namespace_enrolled(&self, name: &str) -> bool {
        self.namespace(name)
            .is_some_and(|n| self.base.enrollment.namespace(name, &n.labels))
    }

    /// The enrolled namespaces, sorted.
    pub fn enrolled_namespaces(&self) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> = self
            .base
            .namespaces
            .keys()
            .filter(|n| self.namespace_enrolled(n))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// What the CNI plugin decides by while this daemon cannot be reached: the enrolled
    /// namespaces, and whether a pod's own labels may enroll it elsewhere.
    pub fn enrollment_snapshot(&self) -> ztunnel_proto::enroll::Snapshot {
        ztunnel_proto::enroll::Snapshot {
            namespaces: self
                .enrolled_namespaces()
                .iter()
                .map(|n| n.to_string())
                .collect(),
            pod_labels_enroll: self.base.enrollment.istio,
        }
    }

    /// The workload named `namespace/name`.
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.workloads()
            .iter()
            .find(|w| &*w.namespace == namespace && &*w.name == name)
    }

    /// Whether `w` is enrolled, and if not, why (see [`super::enrollment`]).
    pub fn enrollment_of(&self, w: &Workload) -> Result<(), NotEnrolled> {
        let ns = self.namespace(&w.namespace).map(|n| &n.labels);
        self.base
            .enrollment
            .pod(&w.namespace, ns, &w.labels, w.other_mesh)
    }

    /// Whether `w` is enrolled.
    pub fn enrolled(&self, w: &Workload) -> bool {
        self.enrollment_of(w).is_ok()
    }

    /// The state as JSON for the admin API.
    pub fn dump(&self) -> serde_json::Value {
        let mut namespaces: Vec<&Namespace> = self.base.namespaces.values().collect();
        namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        serde_json::json!({
            "trustDomain": self.base.trust_domain,
            "namespaces": namespaces,
            "workloads": self.workloads(),
            "services": self.services(),
            "authorizationPolicies": self.base.policies.authz,
            "peerAuthentications": self.base.policies.peer_authn,
        })
    }
}

/// Every workload of a [`State`].
#[derive(Clone, Copy)]
pub struct Workloads<'a>(&'a State);

impl<'a> Workloads<'a> {
    pub fn len(&self) -> usize {
        match &self.0.patch {
            Some(p) => p.workload_count,
            None => self.0.base.workload_count,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        let s = self.0;
        let end = s.patch.as_ref().map_or(0, |p| p.workloads_end);
        (0..s.base.workloads.len() as u32)
            .chain(s.base.workloads.len() as u32..end)
            .filter_map(move |i| s.workload_at(i))
    }
}

impl Serialize for Workloads<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// Every service of a [`State`].
#[derive(Clone, Copy)]
pub struct Services<'a>(&'a State);

impl<'a> Services<'a> {
    pub fn len(&self) -> usize {
        match &self.0.patch {
            Some(p) => p.service_count,
            None => self.0.base.service_count,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        let s = self.0;
        let end = s.patch.as_ref().map_or(0, |p| p.services_end);
        (0..s.base.services.len() as u32)
            .chain(s.base.services.len() as u32..end)
            .filter_map(move |i| s.service_at(i))
    }
}

impl Serialize for Services<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl Base {
    /// The service in slot `i`, which holds one.
    fn service(&self, i: u32) -> &Service {
        self.services[i as usize]
            .as_ref()
            .expect("an index lists services only")
    }

    /// The slots of `services` that hold one, sorted by (namespace, name).
    pub(super) fn sorted_by_name(services: &[Option<Arc<Service>>]) -> Vec<u32> {
        let mut by_name: Vec<u32> = (0..services.len() as u32)
            .filter(|&i| services[i as usize].is_some())
            .collect();
        by_name.sort_by(|&a, &b| {
            let (a, b) = (&services[a as usize], &services[b as usize]);
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
        });
        by_name
    }
}

/// The changes of a state from its base. `None` entries are removals.
#[derive(Clone, Debug, Default)]
pub struct Patch {
    pub(super) workloads: HashMap<u32, Option<Arc<Workload>>>,
    /// One past the last slot of a workload.
    pub(super) workloads_end: u32,
    pub(super) workload_count: usize,
    pub(super) by_ip: HashMap<IpAddr, Option<u32>>,
    pub(super) by_uid: HashMap<Arc<str>, Option<Arc<Workload>>>,
    pub(super) services: HashMap<u32, Option<Arc<Service>>>,
    /// One past the last slot of a service.
    pub(super) services_end: u32,
    pub(super) service_count: usize,
    pub(super) by_vip: HashMap<IpAddr, Option<u32>>,
    /// By `<name>.<namespace>`.
    pub(super) by_name: HashMap<Box<str>, Option<u32>>,
    pub(super) endpoints: HashMap<u32, Box<[u32]>>,
    pub(super) services_of_uid: HashMap<Arc<str>, Vec<usize>>,
    pub(super) pending: Option<Vec<Arc<Workload>>>,
}

impl Patch {
    /// No change from `base`.
    pub(super) fn empty(base: &Base) -> Patch {
        Patch {
            workloads_end: base.workloads.len() as u32,
            workload_count: base.workload_count,
            services_end: base.services.len() as u32,
            service_count: base.service_count,
            ..Default::default()
        }
    }

    /// Its entries.
    pub(super) fn size(&self) -> usize {
        self.workloads.len()
            + self.by_ip.len()
            + self.by_uid.len()
            + self.services.len()
            + self.by_vip.len()
            + self.by_name.len()
            + self.endpoints.len()
            + self.services_of_uid.len()
            + self.pending.as_ref().map_or(0, Vec::len)
    }
}

/// Slot lookups of a state: its base, then its patch.
impl State {
    pub(super) fn workload_at(&self, i: u32) -> Option<&Arc<Workload>> {
        if let Some(w) = self.patch.as_ref().and_then(|p| p.workloads.get(&i)) {
            return w.as_ref();
        }
        self.base.workloads.get(i as usize)?.as_ref()
    }
    pub(super) fn slot_of_ip(&self, ip: IpAddr) -> Option<u32> {
        if let Some(i) = self.patch.as_ref().and_then(|p| p.by_ip.get(&ip)) {
            return *i;
        }
        self.base.by_ip.get(ip)
    }
    pub(super) fn service_at(&self, i: u32) -> Option<&Arc<Service>> {
        if let Some(s) = self.patch.as_ref().and_then(|p| p.services.get(&i)) {
            return s.as_ref();
        }
        self.base.services.get(i as usize)?.as_ref()
    }
    pub(super) fn slot_of_vip(&self, ip: IpAddr) -> Option<u32> {
        if let Some(i) = self.patch.as_ref().and_then(|p| p.by_vip.get(&ip)) {
            return *i;
        }
        self.base.by_vip.get(&ip).copied()
    }
    pub(super) fn endpoints_at(&self, i: u32) -> &[u32] {
        if let Some(e) = self.patch.as_ref().and_then(|p| p.endpoints.get(&i)) {
            return e;
        }
        self.base.endpoints.get(i as usize).map_or(&[], |e| e)
    }
    /// The services (slots) the workload with `uid` is an endpoint of.
    pub(super) fn services_of_uid(&self, uid: &str) -> &[usize] {
        if let Some(v) = self.patch.as_ref().and_then(|p| p.services_of_uid.get(uid)) {
            return v;
        }
        self.base.services_of_uid.get(uid).map_or(&[], |v| v)
    }
    /// The slot of the service named by `<name>.<namespace>`.
    pub(super) fn service_by_hostname_key(&self, key: &str) -> Option<u32> {
        if let Some(i) = self.patch.as_ref().and_then(|p| p.by_name.get(key)) {
            return *i;
        }
        let (name, ns) = key.split_once('.')?;
        let b = &self.base;
        let at = b
            .services_by_name
            .binary_search_by(|&i| {
                let s = b.services[i as usize].as_ref().expect("indexed");
                (&*s.namespace, &*s.name).cmp(&(ns, name))
            })
            .ok()?;
        Some(b.services_by_name[at])
    }
}
