//! Istio's ServiceEntries and WorkloadEntries (`networking.istio.io`), read under the
//! Istio-compatible setting for one decision: whether Istio would send the traffic to an
//! address they declare through a waypoint (which [`super::waypoint`] decides), so that the
//! outbound plan refuses it. Nothing else of them is used: traffic to their addresses that no
//! waypoint takes is passed through, as to any address outside the mesh.
//!
//! What they declare, as istiod declares it to Istio's ztunnel:
//! - a ServiceEntry's `spec.addresses` (IP addresses or CIDR ranges), else the addresses
//!   Istio allocated it (`status.addresses`), are Service addresses, whose waypoint is named
//!   by the ServiceEntry's labels, else its namespace's (a waypoint's own has none);
//! - a WorkloadEntry's `spec.address` and the IP `address` of each of a ServiceEntry's
//!   `endpoints` are workload addresses, whose waypoint is named by the WorkloadEntry's labels
//!   (`spec.labels`, overridden by its own) or the endpoint's, else the namespace's.
//!
//! An address is looked up as Istio's ztunnel looks it up: as a workload address first; else
//! as a ServiceEntry's (or a Kubernetes Service's) exact address, the client's namespace's
//! first; else in the ServiceEntries' ranges that hold it, the client's namespace's first,
//! then the longest prefix. Where
//! Istio would pick one of several equally good, each of them is asked (fail closed): the
//! connection is refused if any names a waypoint that takes it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde_json::Value;

use crate::policy::ip_block;

use super::waypoint::{
    self, Traffic, UseWaypoint, GATEWAY_NAME, ISTIO_USE_WAYPOINT, ISTIO_USE_WAYPOINT_NAMESPACE,
};

/// The API group of ServiceEntries and WorkloadEntries.
pub const GROUP: &str = "networking.istio.io";

/// The kind of object an entry comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ServiceEntry,
    WorkloadEntry,
}

impl Kind {
    /// From an object's `kind`.
    pub fn parse(kind: &str) -> Option<Kind> {
        match kind {
            "ServiceEntry" => Some(Kind::ServiceEntry),
            "WorkloadEntry" => Some(Kind::WorkloadEntry),
            _ => None,
        }
    }
}

/// One address an object declares, and what its labels say of its waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// A Service address (one IP, or a range) or a workload's (one IP).
    pub at: IpNet,
    pub traffic: Traffic,
    /// `istio.io/use-waypoint` (`none` for a waypoint's own ServiceEntry).
    pub use_waypoint: Option<Arc<str>>,
    /// `istio.io/use-waypoint-namespace`.
    pub use_waypoint_namespace: Option<Arc<str>>,
    /// A workload's `gateway.networking.k8s.io/gateway-name`.
    pub gateway: Option<Arc<str>>,
}

impl Entry {
    /// What the entry's labels say of its waypoint.
    pub fn own(&self) -> UseWaypoint<'_> {
        UseWaypoint {
            name: self.use_waypoint.as_deref(),
            namespace: self.use_waypoint_namespace.as_deref(),
            gateway: self.gateway.as_deref(),
        }
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} {}/{} ({})",
            self.kind, self.namespace, self.name, self.at
        )
    }
}

/// The entries of an object of `kind` (its JSON, with `metadata`, `spec` and `status`).
/// An object Istio would not take (a ServiceEntry address that is neither an IP address nor
/// a range: Istio drops the whole ServiceEntry; no namespace) is an error; addresses that are
/// host names are not entries.
pub fn parse(kind: Kind, o: &Value) -> Result<Vec<Entry>, String> {
    let meta = &o["metadata"];
    let namespace: Arc<str> = match meta["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => ns.into(),
        _ => return Err(format!("a {kind:?} without a namespace")),
    };
    let name: Arc<str> = meta["name"].as_str().unwrap_or_default().into();
    let labels = strings(&meta["labels"]);
    let spec = &o["spec"];
    let entry = |at: IpNet, traffic: Traffic, labels: &BTreeMap<&str, &str>| {
        let get = |k: &str| labels.get(k).copied();
        let use_waypoint = match traffic {
            Traffic::Service => waypoint::service_label(get),
            Traffic::Workload => get(ISTIO_USE_WAYPOINT),
        };
        Entry {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
            at,
            traffic,
            use_waypoint: use_waypoint.map(Into::into),
            use_waypoint_namespace: get(ISTIO_USE_WAYPOINT_NAMESPACE).map(Into::into),
            gateway: (traffic == Traffic::Workload)
                .then(|| get(GATEWAY_NAME).map(Into::into))
                .flatten(),
        }
    };
    let ip = |v: &Value| v.as_str().and_then(ip_of);
    let mut entries = Vec::new();
    match kind {
        Kind::WorkloadEntry => {
            let mut merged = strings(&spec["labels"]);
            merged.extend(labels);
            if let Some(a) = ip(&spec["address"]) {
                entries.push(entry(a.into(), Traffic::Workload, &merged));
            }
        }
        Kind::ServiceEntry => {
            let mut vips = Vec::new();
            for a in array(&spec["addresses"]) {
                let a = a.as_str().unwrap_or_default();
                vips.push(address_or_range(a).ok_or_else(|| {
                    format!("spec.addresses: {a:?} is neither an IP address nor a CIDR range")
                })?);
            }
            if vips.is_empty() {
                let allocated = array(&o["status"]["addresses"]).filter_map(|a| ip(&a["value"]));
                vips.extend(allocated.map(IpNet::from));
            }
            for at in vips {
                entries.push(entry(at, Traffic::Service, &labels));
            }
            for ep in array(&spec["endpoints"]) {
                if let Some(a) = ip(&ep["address"]) {
                    entries.push(entry(a.into(), Traffic::Workload, &strings(&ep["labels"])));
                }
            }
        }
    }
    Ok(entries)
}

/// The kind of a ServiceEntry or WorkloadEntry object written by hand (the file source), once
/// its `apiVersion` is checked and it has no field these kinds do not have, where this module
/// reads: a misspelt field or a value of the wrong type must not leave an address or a label
/// undeclared.
pub fn checked_kind(o: &Value) -> Result<Kind, String> {
    let api = o["apiVersion"].as_str().unwrap_or_default();
    let kind = o["kind"].as_str().and_then(Kind::parse);
    let (Some(kind), Some((GROUP, _))) = (kind, api.split_once('/')) else {
        return Err(format!(
            "not a {GROUP} ServiceEntry or WorkloadEntry: {api} {}",
            o["kind"]
        ));
    };
    const LABELS: &[&str] = &[];
    let spec = &o["spec"];
    // Each mapping's path and known fields (none: labels, every value a string).
    let mut mappings: Vec<(String, &Value, &[&str])> = vec![
        (
            String::new(),
            o,
            &["apiVersion", "kind", "metadata", "spec", "status"],
        ),
        (
            "metadata".into(),
            &o["metadata"],
            &["name", "namespace", "labels", "annotations"],
        ),
        ("metadata.labels".into(), &o["metadata"]["labels"], LABELS),
    ];
    match kind {
        Kind::WorkloadEntry => mappings.extend([
            ("spec".into(), spec, WORKLOAD_ENTRY),
            ("spec.labels".into(), &spec["labels"], LABELS),
        ]),
        Kind::ServiceEntry => {
            mappings.push(("spec".into(), spec, SERVICE_ENTRY));
            for field in ["addresses", "endpoints"] {
                let v = &spec[field];
                if !v.is_null() && !v.as_array().is_some_and(|a| a.iter().all(|e| !e.is_null())) {
                    return Err(format!("{kind:?}: spec.{field} is not a list"));
                }
            }
            for (i, ep) in array(&spec["endpoints"]).enumerate() {
                let path = format!("spec.endpoints[{i}]");
                mappings.push((format!("{path}.labels"), &ep["labels"], LABELS));
                mappings.push((path, ep, WORKLOAD_ENTRY));
            }
        }
    }
    for (path, v, known) in mappings {
        let fields = match v {
            Value::Null => continue,
            Value::Object(m) => m,
            _ => return Err(format!("{kind:?}: {path} is not a mapping")),
        };
        for (k, v) in fields {
            if known.is_empty() && !v.is_string() {
                return Err(format!("{kind:?}: {path}.{k} is not a string"));
            }
            if !known.is_empty() && !known.contains(&k.as_str()) {
                let dot = if path.is_empty() { "" } else { "." };
                return Err(format!("{kind:?}: unknown field {path}{dot}{k}"));
            }
        }
    }
    Ok(kind)
}

/// A ServiceEntry's `spec` fields.
const SERVICE_ENTRY: &[&str] = &[
    "hosts",
    "addresses",
    "ports",
    "location",
    "resolution",
    "endpoints",
    "workloadSelector",
    "exportTo",
    "subjectAltNames",
];

/// A WorkloadEntry's `spec` fields, which are also a ServiceEntry endpoint's.
const WORKLOAD_ENTRY: &[&str] = &[
    "address",
    "ports",
    "labels",
    "network",
    "locality",
    "weight",
    "serviceAccount",
];

fn array(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// A JSON object's string values, by key.
fn strings(v: &Value) -> BTreeMap<&str, &str> {
    let pairs = v.as_object().into_iter().flatten();
    pairs
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
        .collect()
}

/// An IP address (a host prefix) or a CIDR range as istiod reads it ([`ip_block`]), a range
/// masked to its network.
fn address_or_range(s: &str) -> Option<IpNet> {
    ip_block(s).map(|n| n.trunc())
}

/// An IP address as istiod reads it (an IPv6 one with a zone, `fe80::1%eth0`, without it).
fn ip_of(s: &str) -> Option<IpAddr> {
    (!s.contains('/'))
        .then(|| ip_block(s))
        .flatten()
        .map(|n| n.addr())
}

/// The entries of a state, for lookup by address.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Entries {
    /// Workload addresses and single Service addresses.
    exact: HashMap<IpAddr, Vec<Entry>>,
    /// Service address ranges.
    ranges: Vec<Entry>,
}

impl Entries {
    pub fn new(entries: impl IntoIterator<Item = Entry>) -> Entries {
        let mut e = Entries::default();
        for entry in entries {
            if entry.at.prefix_len() == entry.at.max_prefix_len() {
                e.exact.entry(entry.at.addr()).or_default().push(entry);
            } else {
                e.ranges.push(entry);
            }
        }
        e
    }

    /// The entries that traffic from a pod of namespace `client` to `ip` is addressed to (see
    /// the module's rules). `service` is the namespace of the Kubernetes Service that has `ip`
    /// as a VIP, if any: Istio's ztunnel picks among it and the ServiceEntries of that exact
    /// address alike, and looks no further.
    pub fn addressed(&self, ip: IpAddr, client: &str, service: Option<&str>) -> Vec<&Entry> {
        if let Some(at) = self.exact.get(&ip) {
            let workloads: Vec<&Entry> = (at.iter())
                .filter(|e| e.traffic == Traffic::Workload)
                .collect();
            if !workloads.is_empty() {
                return workloads;
            }
            let own: Vec<&Entry> = at.iter().filter(|e| *e.namespace == *client).collect();
            return match (own.is_empty(), service == Some(client)) {
                (false, _) => own,
                (true, true) => Vec::new(),
                (true, false) => at.iter().collect(),
            };
        }
        if service.is_some() {
            return Vec::new();
        }
        let holding = || self.ranges.iter().filter(|e| e.at.contains(&ip));
        let rank = |e: &Entry| (*e.namespace == *client, e.at.prefix_len());
        let best = holding().map(rank).max();
        holding().filter(|e| Some(rank(e)) == best).collect()
    }
}

#[cfg(test)]
#[path = "istio_entries_tests.rs"]
mod tests;
