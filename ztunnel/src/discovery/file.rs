//! The local file source: the mesh described in one YAML file, reloaded when it changes.
//!
//! ```yaml
//! trustDomain: cluster.local        # optional; must equal the daemon's trust domain
//! namespaces:
//!   - {name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}
//! workloads:
//!   - uid: 6f1c0a          # the pod's uid
//!     name: web-0
//!     namespace: demo
//!     serviceAccount: web
//!     node: node-a
//!     ips: [10.0.1.10]
//!     labels: {app: web}
//!     annotations: {}      # optional; only those that say another mesh handles the pod are read
//!     protocol: HBONE      # HBONE (in the mesh, the default) or TCP (plain)
//!     workloadName: web    # optional: its Deployment, StatefulSet, …; the pod's name by default
//!     locality: us-east1/us-east1-b   # optional: its node's region/zone[/subzone]
//! services:
//!   - {name: web, namespace: demo, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], selector: {app: web}}
//! policies:                # AuthorizationPolicy and PeerAuthentication objects
//!   - {apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {name: p, namespace: demo}, spec: {}}
//! waypoints:               # Istio's ready waypoints (see `waypoint`), any namespace's to use; waypointFor: service by default
//!   - {namespace: demo, name: waypoint, waypointFor: workload}
//! istioEntries:            # Istio's ServiceEntry and WorkloadEntry objects (see `istio_entries`)
//!   - {apiVersion: networking.istio.io/v1, kind: WorkloadEntry, metadata: {name: vm, namespace: demo}, spec: {address: 192.0.2.7}}
//! ```
//!
//! Unknown fields are errors: a typo must never silently widen anything. The watcher polls
//! the file (modification time, length and content); a good file replaces the state, a bad
//! or missing one is logged and the last good state kept.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::enrollment::Rules;
use super::model::{
    Interner, Labels, Locality, Namespace, PortOverride, Protocol, Service, ServicePort, State,
    Workload,
};
use super::policy::PolicyObject;
use super::{istio_entries, waypoint};
use super::{Discovery, Error, Stats};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceEntry {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadEntry {
    uid: String,
    name: String,
    namespace: String,
    service_account: String,
    node: String,
    ips: Vec<IpAddr>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    protocol: Protocol,
    /// The workload it belongs to, as Istio names it (e.g. its Deployment); the label
    /// `service.istio.io/workload-name` overrides it, the pod's name is the default.
    workload_name: Option<String>,
    /// Its node's `<region>/<zone>[/<subzone>]`, as Istio writes a locality.
    locality: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortEntry {
    port: u16,
    target_port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceEntry {
    name: String,
    namespace: String,
    vips: Vec<IpAddr>,
    ports: Vec<PortEntry>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    /// Endpoints that are not workloads (an API server's address), reached as plain TCP.
    #[serde(default)]
    not_pods: Vec<IpAddr>,
    /// Endpoints whose target port is not the port's `targetPort`.
    #[serde(default)]
    port_overrides: Vec<PortOverride>,
    /// `internalTrafficPolicy: Local`: only the endpoints on the source's node.
    #[serde(default)]
    node_local: bool,
    /// `trafficDistribution` (`PreferSameZone`, `PreferClose`, `PreferSameNode`).
    #[serde(default)]
    traffic_distribution: Option<String>,
    /// Only `istio.io/use-waypoint` is read.
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Parses and validates a mesh file for a daemon in `trust_domain`, keeping every workload
/// in full.
pub fn parse(yaml: &str, trust_domain: &str) -> Result<State, Error> {
    parse_for_node(yaml, trust_domain, None)
}

/// Like [`parse`], for the daemon of `node`: workloads on other nodes keep only what
/// outbound routing and identity checks need (no uid, no labels; service endpoints are
/// selected before their labels are dropped), so a large mesh costs each node little.
///
/// Each entry is converted into the model as soon as it is read: no tree of the whole file is
/// ever built.
pub fn parse_for_node(yaml: &str, trust_domain: &str, node: Option<&str>) -> Result<State, Error> {
    let mut b = Builder {
        node,
        ..Default::default()
    };
    let parsed =
        serde_saphyr::with_deserializer_from_str_with_options(yaml, crate::yaml::options(), |de| {
            serde::de::DeserializeSeed::deserialize(&mut b, de)
        });
    if let Some(invalid) = b.invalid.take() {
        return Err(Error::Invalid(invalid));
    }
    parsed.map_err(|e| Error::Parse(e.to_string()))?;
    if let Some(td) = &b.trust_domain {
        if td != trust_domain {
            return Err(Error::Invalid(format!(
                "the file's trustDomain {td} is not the daemon's ({trust_domain})"
            )));
        }
    }
    b.build(trust_domain)
}

/// The model as the file is read, entry by entry.
#[derive(Default)]
struct Builder<'a> {
    node: Option<&'a str>,
    int: Interner,
    trust_domain: Option<String>,
    namespaces: Vec<Namespace>,
    workloads: Vec<Arc<Workload>>,
    /// The labels of remote workloads, needed only to select endpoints: kept in one array,
    /// (`remote_labels[i]` is workload `i`'s range of it), so that they leave no holes in the
    /// heap when they go.
    label_arena: Vec<super::model::Label>,
    remote_labels: Vec<std::ops::Range<usize>>,
    services: Vec<Service>,
    authz: Vec<super::policy::AuthorizationPolicy>,
    peer: Vec<super::policy::PeerAuthentication>,
    /// The first policy object that cannot be identified.
    invalid: Option<String>,
    waypoints: waypoint::Waypoints,
    entries: Vec<istio_entries::Entry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WaypointEntry {
    namespace: String,
    name: String,
    /// `istio.io/waypoint-for` (`service` when not given).
    waypoint_for: Option<String>,
}

const FIELDS: &[&str] = &[
    "trustDomain",
    "namespaces",
    "workloads",
    "services",
    "policies",
    "waypoints",
    "istioEntries",
];

impl Builder<'_> {
    fn namespace(&mut self, n: NamespaceEntry) -> Result<(), String> {
        let ns = Namespace {
            name: self.int.get(&n.name),
            labels: self.int.labels(&n.labels),
        };
        self.namespaces.push(ns);
        Ok(())
    }

    fn workload(&mut self, w: WorkloadEntry) -> Result<(), String> {
        let int = &mut self.int;
        let remote = self.node.is_some_and(|n| n != w.node);
        let name = w.workload_name.as_deref().unwrap_or(&w.name);
        let name = super::telemetry::workload_name(name, None, None, &w.labels);
        let labels = int.labels(&w.labels);
        let start = self.label_arena.len();
        if remote {
            self.label_arena.extend_from_slice(labels.as_slice());
        }
        self.remote_labels.push(start..self.label_arena.len());
        self.workloads.push(Arc::new(Workload {
            uid: if remote { int.get("") } else { w.uid.into() },
            telemetry: int.telemetry(&w.name, name, &w.labels),
            name: w.name.into(),
            namespace: int.get(&w.namespace),
            service_account: int.get(&w.service_account),
            node: int.get(&w.node),
            ips: w.ips.into(),
            // A remote workload keeps only the labels that name its waypoint.
            labels: if remote {
                (labels.iter())
                    .filter(|(k, _)| waypoint::decides_waypoint(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            } else {
                labels
            },
            protocol: w.protocol,
            other_mesh: super::enrollment::OtherMesh::of(|k| {
                w.annotations.get(k).map(String::as_str)
            }),
            locality: int.locality(
                w.locality
                    .as_deref()
                    .map(Locality::parse)
                    .unwrap_or_default(),
            ),
        }));
        Ok(())
    }

    fn service(&mut self, s: ServiceEntry) -> Result<(), String> {
        let label = |k: &str| s.labels.get(k).map(String::as_str);
        let svc = Service {
            name: s.name.into(),
            namespace: self.int.get(&s.namespace),
            vips: s.vips,
            ports: s
                .ports
                .iter()
                .map(|p| ServicePort {
                    port: p.port,
                    target_port: p.target_port,
                })
                .collect(),
            selector: self.int.labels(&s.selector),
            not_pods: s.not_pods,
            port_overrides: {
                let mut o = s.port_overrides;
                o.sort_unstable();
                o
            },
            node_local: s.node_local,
            distribution: s
                .traffic_distribution
                .as_deref()
                .map(super::model::Distribution::parse)
                .unwrap_or_default(),
            use_waypoint: waypoint::service_label(label).map(Into::into),
            use_waypoint_namespace: label(waypoint::ISTIO_USE_WAYPOINT_NAMESPACE).map(Into::into),
        };
        self.services.push(svc);
        Ok(())
    }

    fn policy(&mut self, v: serde_json::Value) -> Result<(), String> {
        match PolicyObject::from_value(v)? {
            PolicyObject::Authorization(a) => self.authz.push(a),
            PolicyObject::PeerAuthentication(p) => self.peer.push(p),
        }
        Ok(())
    }

    fn waypoint(&mut self, w: WaypointEntry) -> Result<(), String> {
        let serves = waypoint::Serves::of(w.waypoint_for.as_deref(), None);
        self.waypoints.insert(&w.namespace, &w.name, serves);
        Ok(())
    }

    fn istio_entry(&mut self, v: serde_json::Value) -> Result<(), String> {
        let kind = istio_entries::checked_kind(&v)?;
        self.entries.extend(istio_entries::parse(kind, &v)?);
        Ok(())
    }

    /// Selects the services' endpoints, drops the remote workloads' labels, builds.
    fn build(self, trust_domain: &str) -> Result<State, Error> {
        let endpoints = {
            let ws: Vec<(&str, &[super::model::Label])> = self
                .workloads
                .iter()
                .zip(&self.remote_labels)
                .map(|(w, r)| {
                    let labels = match r.is_empty() {
                        true => w.labels.as_slice(),
                        false => &self.label_arena[r.clone()],
                    };
                    (&*w.namespace, labels)
                })
                .collect();
            let ss: Vec<(&str, &Labels)> = self
                .services
                .iter()
                .map(|s| (&*s.namespace, &s.selector))
                .collect();
            super::model::select_endpoints(&ws, &ss)
        };
        drop((self.label_arena, self.remote_labels));
        State::build(
            trust_domain,
            self.namespaces,
            self.workloads,
            self.services,
            endpoints,
            self.authz,
            self.peer,
        )
        .map(|s| {
            s.with_waypoints(self.waypoints)
                .with_istio_entries(istio_entries::Entries::new(self.entries))
        })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut Builder<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Builder<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a mesh file (a mapping)")
    }
    /// A key given twice is refused by the parser (serde-saphyr's default).
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        while let Some(key) = m.next_key::<String>()? {
            let b = &mut *self;
            match key.as_str() {
                "trustDomain" => b.trust_domain = Some(m.next_value()?),
                "namespaces" => m.next_value_seed(Each(b, Builder::namespace))?,
                "workloads" => m.next_value_seed(Each(b, Builder::workload))?,
                "services" => m.next_value_seed(Each(b, Builder::service))?,
                "policies" => m.next_value_seed(Each(b, Builder::policy))?,
                "waypoints" => m.next_value_seed(Each(b, Builder::waypoint))?,
                "istioEntries" => m.next_value_seed(Each(b, Builder::istio_entry))?,
                other => return Err(serde::de::Error::unknown_field(other, FIELDS)),
            }
        }
        Ok(())
    }
}

/// A sequence (or nothing) whose elements are handed to a [`Builder`] one at a time, as they are read.
struct Each<'b, 'a, T>(
    &'b mut Builder<'a>,
    fn(&mut Builder<'a>, T) -> Result<(), String>,
);

impl<'de, T: Deserialize<'de>> serde::de::DeserializeSeed<'de> for Each<'_, '_, T> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Each<'_, '_, T> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence")
    }
    /// An empty entry (`workloads:`) is an empty list.
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Each(b, add) = self;
        while let Some(e) = seq.next_element()? {
            if let Err(why) = add(b, e) {
                b.invalid.get_or_insert(why.clone());
                return Err(serde::de::Error::custom(why));
            }
        }
        Ok(())
    }
}

fn read(path: &PathBuf) -> Result<(String, Option<SystemTime>), Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
        path: path.clone(),
        source: e,
    })?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((text, mtime))
}

/// What tells that the file may have changed, without reading it: modification time and
/// length. (Content changes are then told by a digest, so the text is not kept.)
#[derive(Clone, Copy, PartialEq, Eq)]
struct Version {
    mtime: Option<SystemTime>,
    len: u64,
}

fn stat(path: &PathBuf) -> Option<Version> {
    let m = std::fs::metadata(path).ok()?;
    Some(Version {
        mtime: m.modified().ok(),
        len: m.len(),
    })
}

fn digest(text: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// Hands memory freed after parsing a large file back to the system (glibc keeps it).
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Loads `path` (which must be valid now) and watches it, polling every `poll`; its states
/// decide enrollment under `rules`. A poll reads the file only when its modification time or
/// length changed, and reloads only when its content did.
pub fn watch_file(
    path: PathBuf,
    trust_domain: String,
    node: Option<String>,
    rules: Rules,
    poll: Duration,
) -> Result<(Discovery, tokio::task::JoinHandle<()>), Error> {
    let (text, _) = read(&path)?;
    let mut version = stat(&path);
    let state = parse_for_node(&text, &trust_domain, node.as_deref())
        .map_err(|e| Error::File {
            path: path.clone(),
            error: Box::new(e),
        })?
        .with_enrollment(rules);
    let mut last = digest(&text);
    drop(text);
    release_freed_memory();
    tracing::info!(
        file = %path.display(),
        workloads = state.workloads().len(),
        services = state.services().len(),
        "discovery loaded"
    );
    let stats = Arc::new(Stats::default());
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(state));
    let disc = Discovery {
        rx,
        stats: stats.clone(),
    };
    let task = tokio::spawn(async move {
        let (mut missing, mut unreadable) = (false, false);
        loop {
            tokio::time::sleep(poll).await;
            let now = stat(&path);
            if now.is_none() != missing {
                missing = now.is_none();
                match missing {
                    true => {
                        tracing::warn!(file = %path.display(), "discovery file gone; keeping the last state")
                    }
                    false => tracing::info!(file = %path.display(), "discovery file back"),
                }
            }
            if now.is_none() || now == version {
                continue;
            }
            let text = match read(&path) {
                Ok((t, _)) => t,
                Err(e) => {
                    if !std::mem::replace(&mut unreadable, true) {
                        tracing::warn!(error = %e, "discovery file unreadable; keeping the last state");
                    }
                    continue;
                }
            };
            unreadable = false;
            version = now;
            let d = digest(&text);
            if d == last {
                continue;
            }
            last = d;
            let parsed = parse_for_node(&text, &trust_domain, node.as_deref())
                .map(|s| s.with_enrollment(rules));
            drop(text);
            match parsed {
                Ok(state) => {
                    tracing::info!(
                        file = %path.display(),
                        workloads = state.workloads().len(),
                        services = state.services().len(),
                        "discovery reloaded"
                    );
                    stats.reloads_ok.inc();
                    if tx.send(Arc::new(state)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    stats.reloads_failed.inc();
                    tracing::warn!(file = %path.display(), error = %e, "bad discovery file; keeping the last good state");
                }
            }
            release_freed_memory();
        }
    });
    Ok((disc, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
trustDomain: cluster.local
namespaces:
  - {name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}
  - {name: legacy}
workloads:
  - {uid: u1, name: web-0, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.1], labels: {app: web}}
  - {uid: u2, name: web-1, namespace: demo, serviceAccount: web, node: n2, ips: [10.0.0.2, 'fd00::2'], labels: {app: web, istio.io/use-waypoint: wp}}
  - {uid: u3, name: old, namespace: legacy, serviceAccount: default, node: n1, ips: [10.0.0.3], protocol: TCP}
  - {uid: u4, name: out, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.4], labels: {ztunnel.dev/dataplane-mode: none}}
waypoints:
  - {namespace: demo, name: wp, waypointFor: service}
services:
  - {name: web, namespace: demo, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: web}}
";

    /// A remote workload keeps only the labels that name its waypoint.
    #[test]
    fn a_node_keeps_remote_workloads_lean_and_their_endpoints() {
        let s = parse_for_node(GOOD, "cluster.local", Some("n1")).unwrap();
        let remote = s.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(remote.labels.len(), 1, "{remote:?}");
        assert!(remote.uid.is_empty(), "{remote:?}");
        let istio = crate::discovery::enrollment::Rules {
            istio: true,
            ..Default::default()
        };
        for (yaml, want) in [
            // Its waypoint, listed, takes Services' traffic only.
            (GOOD.to_owned(), None),
            (GOOD.replace("name: wp,", "name: other,"), Some("demo/wp")),
        ] {
            let s = parse_for_node(&yaml, "cluster.local", Some("n1"))
                .unwrap()
                .with_enrollment(istio);
            let remote = s.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
            assert_eq!(s.workload_waypoint(remote).as_deref(), want);
        }
        assert!(s.workload_by_uid("u2").is_none());
        let local = s.workload_by_uid("u1").unwrap();
        assert_eq!(local.labels.get("app").map(|v| &**v), Some("web"));
        // Endpoints were selected with the remote workload's labels before they were dropped.
        assert_eq!(s.endpoints_of_vip("10.96.0.1".parse().unwrap()).count(), 2);
        assert_eq!(
            remote.identity("cluster.local").to_string(),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
    }

    #[test]
    fn empty_sections_are_empty_lists() {
        let s = parse(
            "namespaces:\nworkloads:\nservices: []\npolicies:\n",
            "cluster.local",
        )
        .unwrap();
        assert!(s.workloads().is_empty() && s.services().is_empty());
    }

    /// Each service gets exactly the workloads of its namespace that carry every label of its
    /// selector, in file order, whichever of its labels is rarest.
    #[test]
    fn endpoints_are_selected_by_namespace_and_every_label() {
        let mut y = String::from("namespaces: [{name: a}, {name: b}]\nworkloads:\n");
        for i in 0..40 {
            let ns = if i % 2 == 0 { "a" } else { "b" };
            y.push_str(&format!(
                "  - {{uid: u{i}, name: w{i}, namespace: {ns}, serviceAccount: s, node: n, ips: [10.0.1.{i}], labels: {{app: x, tier: t{}}}}}\n",
                i % 4
            ));
        }
        y.push_str(
            "services:
  - {name: all-a, namespace: a, vips: [10.96.1.1], ports: [{port: 80, targetPort: 80}], selector: {app: x}}
  - {name: t0-a, namespace: a, vips: [10.96.1.2], ports: [{port: 80, targetPort: 80}], selector: {app: x, tier: t0}}
  - {name: t1-a, namespace: a, vips: [10.96.1.3], ports: [{port: 80, targetPort: 80}], selector: {tier: t1, app: x}}
  - {name: t1-b, namespace: b, vips: [10.96.1.4], ports: [{port: 80, targetPort: 80}], selector: {tier: t1, app: x}}
  - {name: none, namespace: b, vips: [10.96.1.5], ports: [{port: 80, targetPort: 80}], selector: {app: x, tier: t9}}
  - {name: empty, namespace: a, vips: [10.96.1.6], ports: [{port: 80, targetPort: 80}]}
",
        );
        let s = parse(&y, "cluster.local").unwrap();
        let names = |vip: &str| -> Vec<String> {
            s.endpoints_of_vip(vip.parse().unwrap())
                .map(|w| w.name.to_string())
                .collect()
        };
        let want = |f: &dyn Fn(usize) -> bool| -> Vec<String> {
            (0..40).filter(|&i| f(i)).map(|i| format!("w{i}")).collect()
        };
        assert_eq!(names("10.96.1.1"), want(&|i| i % 2 == 0));
        assert_eq!(names("10.96.1.2"), want(&|i| i % 4 == 0));
        assert_eq!(names("10.96.1.3"), Vec::<String>::new(), "t1 is in b only");
        assert_eq!(names("10.96.1.4"), want(&|i| i % 4 == 1));
        assert!(names("10.96.1.5").is_empty());
        assert!(
            names("10.96.1.6").is_empty(),
            "an empty selector selects nothing"
        );
        assert_eq!(
            s.service_by_hostname("t1-b.b.svc.cluster.local", "cluster.local")
                .map(|v| &*v.name),
            Some("t1-b")
        );
        assert!(s
            .service_by_hostname("t1-b.a.svc.cluster.local", "cluster.local")
            .is_none());
    }

    /// The example the README points users to must stay valid and mean what it says.
    #[test]
    fn the_shipped_example_parses() {
        let yaml = include_str!("../../../deploy/local/mesh.yaml");
        let s = parse(yaml, "cluster.local").unwrap();
        assert_eq!(s.workloads().len(), 3);
        assert_eq!(s.endpoints_of_vip("10.96.0.10".parse().unwrap()).count(), 1);
        assert_eq!(s.authorization_policies().len(), 1);
        assert_eq!(s.peer_authentications().len(), 1);
        let old = s.workload_by_ip("10.77.0.3".parse().unwrap()).unwrap();
        assert!(!s.enrolled(old));
    }

    #[test]
    fn parses_a_mesh() {
        let s = parse(GOOD, "cluster.local").unwrap();
        assert_eq!(s.workloads().len(), 4);
        let w = s.workload_by_ip("fd00::2".parse().unwrap()).unwrap();
        assert_eq!(&*w.name, "web-1");
        assert_eq!(
            w.identity("cluster.local").to_string(),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
        assert_eq!(s.endpoints_of_vip("10.96.0.1".parse().unwrap()).count(), 2);
        assert_eq!(s.local_workloads("n1").count(), 3);
        assert!(s.enrolled(w));
        assert!(
            !s.enrolled(s.workload_by_uid("u3").unwrap()),
            "namespace not enrolled"
        );
        assert!(
            !s.enrolled(s.workload_by_uid("u4").unwrap()),
            "pod opted out"
        );
        assert_eq!(s.workload_by_uid("u3").unwrap().protocol, Protocol::Tcp);
        assert!(s.dump()["workloads"].as_array().unwrap().len() == 4);
    }

    #[test]
    fn rejects_invalid_files() {
        let cases = [
            (GOOD.replace("trustDomain: cluster.local", "trustDomain: other.local"), "trustDomain"),
            (GOOD.replace("uid: u2", "uid: u1"), "uid u1"),
            (GOOD.replace("ips: [10.0.0.3]", "ips: [10.0.0.1]"), "10.0.0.1"),
            (GOOD.replace("ips: [10.0.0.3]", "ips: [10.0.0.3, 10.0.0.3]"), "IP 10.0.0.3 is also legacy/old"),
            (GOOD.replace("serviceAccount: default", "serviceAccount: Bad/Name"), "legacy/old"),
            (GOOD.replace("targetPort: 8080", "targetPort: 0"), "port 0"),
            (GOOD.replace("vips: [10.96.0.1]", "vips: [10.0.0.1]"), "workload IP"),
            (GOOD.replace("serviceAccount: web, node: n2", "serviceAcount: web, node: n2"), "serviceAcount"),
            (format!("{GOOD}extra: 1\n"), "extra"),
            (format!("{GOOD}policies: [{{apiVersion: v1, kind: Pod, metadata: {{name: x, namespace: y}}}}]\n"), "apiVersion"),
            (format!("{GOOD}  - {{name: web, namespace: demo, vips: [10.96.0.2], ports: [], selector: {{}}}}\n"), "service demo/web is listed twice"),
            (format!("{GOOD}trustDomain: cluster.local\n"), "duplicate"),
            (GOOD.replace("workloads:", "workloads: 3"), "sequence"),
            (format!("{GOOD}istioEntries: [{{apiVersion: networking.istio.io/v1, kind: ServiceEntry, metadata: {{name: e, namespace: demo}}, spec: {{adresses: [192.0.2.1]}}}}]\n"), "unknown field spec.adresses"),
            (format!("{GOOD}istioEntries: [{{apiVersion: networking.istio.io/v1, kind: WorkloadEntry, metadata: {{name: e, namespace: demo}}, spec: {{address: 192.0.2.1}}, extra: 1}}]\n"), "unknown field extra"),
            (format!("{GOOD}istioEntries: [{{apiVersion: security.istio.io/v1, kind: ServiceEntry, metadata: {{name: e, namespace: demo}}}}]\n"), "not a networking.istio.io"),
            (format!("{GOOD}istioEntries: [{{apiVersion: networking.istio.io/v1, kind: Sidecar, metadata: {{name: e, namespace: demo}}}}]\n"), "not a networking.istio.io"),
            (format!("{GOOD}istioEntries: [{{apiVersion: networking.istio.io/v1, kind: ServiceEntry, metadata: {{name: e, namespace: demo}}, spec: {{addresses: [ext.example]}}}}]\n"), "neither an IP address"),
            (format!("{GOOD}istioEntries: [{{apiVersion: networking.istio.io/v1, kind: ServiceEntry, metadata: {{name: e, namespace: demo, lables: {{}}}}}}]\n"), "unknown field metadata.lables"),
            (format!("{GOOD}istioEntries: [{{apiVersion: networking.istio.io/v1, kind: ServiceEntry, metadata: {{name: e, namespace: demo}}, spec: {{endpoints: [{{adress: 192.0.2.1}}]}}}}]\n"), "unknown field spec.endpoints[0].adress"),
            (format!("{GOOD}istioEntries: [{{apiVersion: networking.istio.io/v1, kind: ServiceEntry, metadata: {{name: e, namespace: demo}}, spec: {{addresses: 192.0.2.1}}}}]\n"), "spec.addresses is not a list"),
            (format!("{GOOD}istioEntries: [{{apiVersion: networking.istio.io/v1, kind: WorkloadEntry, metadata: {{name: e, namespace: demo, labels: {{istio.io/use-waypoint: [a]}}}}, spec: {{address: 192.0.2.1}}}}]\n"), "metadata.labels.istio.io/use-waypoint is not a string"),
            (format!("{GOOD}istioEntries: [{{apiVersion: networking.istio.io/v1, kind: WorkloadEntry, metadata: {{name: e, namespace: demo}}, spec: [1]}}]\n"), "spec is not a mapping"),
        ];
        for (yaml, want) in cases {
            let e = parse(&yaml, "cluster.local").unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let (mut disc, _task) = watch_file(
            path.clone(),
            "cluster.local".into(),
            None,
            Rules::default(),
            Duration::from_millis(20),
        )
        .unwrap();
        assert_eq!(disc.current().workloads().len(), 4);

        // Replaced by rename, as editors and `mv` do.
        let tmp = dir.path().join("new.yaml");
        std::fs::write(&tmp, GOOD.replace("  - {uid: u4, name: out, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.4], labels: {ztunnel.dev/dataplane-mode: none}}\n", "")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(Duration::from_secs(2), disc.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(disc.current().workloads().len(), 3);

        std::fs::write(&path, "workloads: [oops").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            disc.current().workloads().len(),
            3,
            "bad file keeps the last state"
        );
        assert_eq!(disc.reloads_failed(), 1);
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            disc.current().workloads().len(),
            3,
            "missing file keeps the last state"
        );
        assert_eq!(disc.reloads_ok(), 1);
        // Exported under the names the README gives them.
        let mut registry = prometheus_client::registry::Registry::default();
        disc.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series = [
            "ztunnel_discovery_updates_total 1",
            "ztunnel_discovery_update_failures_total 1",
            "ztunnel_discovery_objects_refused_total 0",
        ];
        assert!(
            series.iter().all(|l| text.lines().any(|t| t == *l)),
            "{text}"
        );
    }
}
