//! Istio's TCP telemetry: the `istio_tcp_*` families with the label set and the values Istio's
//! ztunnel reports, so that Kiali's graph and Istio's dashboards read them unchanged.
//!
//! Each proxied connection is reported by the daemon at each end: `reporter="source"` by the
//! client's, `reporter="destination"` by the server's. It counts in `opened` when it is
//! accepted for proxying, and in `closed` when it ends, with its `response_flags`: `-` for a
//! connection that was carried, else why it was not (`DENY` by policy, `CONNECT` when the
//! next hop could not be reached, …), which also counts it in `failed`. `received_bytes` is
//! the request direction (client → server) and `sent_bytes` the response direction, at both
//! reporters, as Istio defines them. A value not known is `unknown`, as Istio writes it.
//!
//! Label values (istio/ztunnel `src/proxy/metrics.rs`): `*_workload` is the workload a pod
//! belongs to, `*_canonical_service` and `*_app` its canonical service, `*_canonical_revision`
//! and `*_version` its canonical revision ([`crate::discovery::telemetry`]);
//! `*_principal` the SPIFFE identity (the source's as its certificate proved it);
//! `*_cluster` the cluster's id; `destination_service` the service's hostname
//! (`<name>.<namespace>.svc.cluster.local`) with its name and namespace;
//! `connection_security_policy` `mutual_tls` through a tunnel, else `unknown`;
//! `request_protocol` `tcp`; once either workload is known, `*_region` and `*_zone` its node's
//! ([`crate::discovery::Locality`]).

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::discovery::{Service, Workload};

/// `unknown`, shared.
fn unknown() -> Arc<str> {
    static U: OnceLock<Arc<str>> = OnceLock::new();
    U.get_or_init(|| "unknown".into()).clone()
}

/// The labels of the `istio_tcp_*` families, in Istio's order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IstioLabels {
    /// `source` (the client's daemon) or `destination` (the server's).
    pub reporter: &'static str,
    pub source_workload: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub source_canonical_revision: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub source_app: Arc<str>,
    pub source_version: Arc<str>,
    pub source_cluster: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_service_namespace: Arc<str>,
    pub destination_service_name: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_canonical_revision: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_version: Arc<str>,
    pub destination_cluster: Arc<str>,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
    /// `source_region`, `source_zone`, `destination_region`, `destination_zone`: present once
    /// either end's workload is known, as Istio's ztunnel writes them.
    #[prometheus(flatten)]
    pub locality: Localities,
}

/// The locality labels of a connection, or none.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Localities(Option<LocalityLabels>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalityLabels {
    pub source_region: Arc<str>,
    pub source_zone: Arc<str>,
    pub destination_region: Arc<str>,
    pub destination_zone: Arc<str>,
}

impl EncodeLabelSet for Localities {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(l) => l.encode(encoder),
            None => Ok(()),
        }
    }
}

/// One end of a connection as the labels describe it: its workload, when known, and its
/// principal, when proved (the source's by its certificate, the destination's by ours or by
/// the identity the tunnel expected).
#[derive(Clone, Copy, Debug, Default)]
pub struct End<'a> {
    pub workload: Option<&'a Workload>,
    pub principal: Option<&'a str>,
}

/// Why a connection was not carried, as Istio's `response_flags` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFlag {
    /// Denied by policy.
    Deny,
    /// The next hop (the application, the peer's daemon) could not be reached or refused.
    Connect,
    /// The tunnel's TLS handshake failed.
    TlsFailure,
    /// The tunnel's HTTP/2 handshake failed.
    H2HandshakeFailure,
    /// No certificate for the identity the connection needed.
    IdentityError,
}

impl ResponseFlag {
    pub fn label(self) -> &'static str {
        match self {
            ResponseFlag::Deny => "DENY",
            ResponseFlag::Connect => "CONNECT",
            ResponseFlag::TlsFailure => "TLS_FAILURE",
            ResponseFlag::H2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            ResponseFlag::IdentityError => "IDENTITY_ERROR",
        }
    }
}

impl IstioLabels {
    /// The labels of a connection between `src` and `dst`, to `service` when it went through
    /// one, reported by `reporter` in cluster `cluster` (of DNS domain `cluster_domain`).
    pub fn new(
        reporter: &'static str,
        cluster: &Arc<str>,
        cluster_domain: &str,
        src: End<'_>,
        dst: End<'_>,
        service: Option<&Service>,
        mutual_tls: bool,
    ) -> IstioLabels {
        let name = |w: Option<&Workload>, f: fn(&Workload) -> &Arc<str>| {
            w.map_or_else(unknown, |w| f(w).clone())
        };
        let principal = |p: Option<&str>| p.map_or_else(unknown, Arc::from);
        let cluster_of = |w: Option<&Workload>| w.map_or_else(unknown, |_| cluster.clone());
        let (s, d) = (src.workload, dst.workload);
        let (svc_host, svc_ns, svc_name) = match service {
            Some(svc) => (
                Arc::from(hostname(svc, cluster_domain)),
                svc.namespace.clone(),
                svc.name.clone(),
            ),
            None => (unknown(), unknown(), unknown()),
        };
        IstioLabels {
            reporter,
            source_workload: name(s, Workload::workload_name),
            source_canonical_service: name(s, Workload::canonical_name),
            source_canonical_revision: name(s, Workload::canonical_revision),
            source_workload_namespace: s.map_or_else(unknown, |w| w.namespace.clone()),
            source_principal: principal(src.principal),
            source_app: name(s, Workload::canonical_name),
            source_version: name(s, Workload::canonical_revision),
            source_cluster: cluster_of(s),
            destination_service: svc_host,
            destination_service_namespace: svc_ns,
            destination_service_name: svc_name,
            destination_workload: name(d, Workload::workload_name),
            destination_canonical_service: name(d, Workload::canonical_name),
            destination_canonical_revision: name(d, Workload::canonical_revision),
            destination_workload_namespace: d.map_or_else(unknown, |w| w.namespace.clone()),
            destination_principal: principal(dst.principal),
            destination_app: name(d, Workload::canonical_name),
            destination_version: name(d, Workload::canonical_revision),
            destination_cluster: cluster_of(d),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if mutual_tls { "mutual_tls" } else { "unknown" },
            locality: Localities((s.is_some() || d.is_some()).then(|| {
                let of = |w: Option<&Workload>, f: fn(&crate::discovery::Locality) -> &Arc<str>| {
                    w.map(|w| f(&w.locality))
                        .filter(|v| !v.is_empty())
                        .map_or_else(unknown, Arc::clone)
                };
                LocalityLabels {
                    source_region: of(s, |l| &l.region),
                    source_zone: of(s, |l| &l.zone),
                    destination_region: of(d, |l| &l.region),
                    destination_zone: of(d, |l| &l.zone),
                }
            })),
        }
    }
}

/// The W3C `baggage` that describes workload `w` of cluster `cluster`, as Istio's ztunnel
/// sends it with a `CONNECT` (the source) and answers it with `200` (the destination):
/// `k8s.cluster.name`, `k8s.namespace.name`, `k8s.pod.name` (the workload name, as istiod
/// types every pod's workload), `service.name`, `service.version`, and when known
/// `cloud.region` and `cloud.availability_zone`.
pub fn baggage(w: &Workload, cluster: &str) -> String {
    let mut b = format!(
        "k8s.cluster.name={cluster},k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
        w.namespace,
        w.workload_name(),
        w.canonical_name(),
        w.canonical_revision()
    );
    use std::fmt::Write;
    if !w.locality.region.is_empty() {
        let _ = write!(b, ",cloud.region={}", w.locality.region);
    }
    if !w.locality.zone.is_empty() {
        let _ = write!(b, ",cloud.availability_zone={}", w.locality.zone);
    }
    b
}

/// A service's hostname: `<name>.<namespace>.svc.<cluster_domain>`.
pub fn hostname(svc: &Service, cluster_domain: &str) -> String {
    format!("{}.{}.svc.{cluster_domain}", svc.name, svc.namespace)
}

/// Istio's TCP families.
#[derive(Default, Clone)]
pub struct IstioTcp {
    pub opened: Family<IstioLabels, Counter>,
    pub closed: Family<IstioLabels, Counter>,
    pub failed: Family<IstioLabels, Counter>,
    pub sent_bytes: Family<IstioLabels, Counter>,
    pub received_bytes: Family<IstioLabels, Counter>,
}

/// The counters a connection that opened adds to when it closes; a few words, not its labels.
#[derive(Debug)]
pub struct Opened {
    closed: Counter,
    received_bytes: Counter,
    sent_bytes: Counter,
}

impl IstioTcp {
    /// Counts a connection opening; the result counts its close.
    pub fn open(&self, labels: &IstioLabels) -> Opened {
        self.opened.get_or_create(labels).inc();
        Opened {
            closed: self.closed.get_or_create(labels).clone(),
            received_bytes: self.received_bytes.get_or_create(labels).clone(),
            sent_bytes: self.sent_bytes.get_or_create(labels).clone(),
        }
    }

    /// Counts a connection that opened and was not carried, for `flag`.
    pub fn refused(&self, mut labels: IstioLabels, flag: ResponseFlag) {
        self.opened.get_or_create(&labels).inc();
        labels.response_flags = flag.label();
        self.closed.get_or_create(&labels).inc();
        self.failed.get_or_create(&labels).inc();
    }
}

impl Opened {
    /// Counts the close of a connection that carried `request` bytes client → server and
    /// `response` bytes back.
    pub fn close(&self, request: u64, response: u64) {
        self.closed.inc();
        self.received_bytes.inc_by(request);
        self.sent_bytes.inc_by(response);
    }
}
