//! The daemon's Prometheus metrics (`prometheus-client`), registered once and shared.
//!
//! Metric names are part of the contract: dashboards read them. The `istio_tcp_*` families
//! carry the labels Istio's dashboards expect; the `ztunnel_*` families are the daemon's own.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::refusal::Reason;

/// Panics anywhere in the process ([`count_panics`]).
static PANICS: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::default);

/// Logs every panic as an error (with where it happened) and counts it in
/// `ztunnel_panics_total`, before the hook in place (the standard one prints it). A panic in
/// one connection's task ends that task only; one in a long-lived task ends the daemon
/// ([`crate::app::Daemon::until_a_task_ends`]).
pub fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.inc();
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%at, panic = %msg, "panicked");
        previous(info);
    }));
}

/// Asserts that `register` exports each of `lines` (exposition lines, `name value`) into a
/// registry of its own.
#[cfg(test)]
pub(crate) fn assert_exported(register: impl FnOnce(&mut Registry), lines: &[&str]) {
    let mut registry = Registry::default();
    register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in lines {
        assert!(text.lines().any(|l| l == *line), "{line} in:\n{text}");
    }
}

/// The panics counted so far.
pub fn panics() -> u64 {
    PANICS.get()
}

mod istio;
pub use istio::{baggage, hostname, End, IstioLabels, IstioTcp, Opened, ResponseFlag};

/// Every value of `ztunnel_proxied_connections_total{direction}`.
pub const DIRECTIONS: &[&str] = &["outbound", "inbound", "inbound_plaintext", "passthrough"];

/// Labels of a refusal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Labels of per-direction proxy counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// Labels of the policy decision counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Labels of the reconciler's enrollment counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `enroll`, `release` or `enroll_failed`.
    pub action: &'static str,
    pub reason: &'static str,
}

/// Labels of per-certificate gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

/// Every metric the daemon exports.
#[derive(Default)]
pub struct Metrics {
    /// TLS connections the pool opened to peers.
    pub pool_connections_opened: Counter,
    /// TLS connections currently open in the pool.
    pub pool_connections: Gauge,
    /// HBONE streams currently open through the pool.
    pub pool_streams: Gauge,
    /// Inbound tunnel (15008) TLS connections accepted.
    pub hbone_connections_accepted: Counter,
    /// Inbound QUIC tunnel connections (UDP 15008) accepted.
    pub quic_connections_accepted: Counter,
    /// Inbound tunnel connections (either transport) holding a place among the pending
    /// handshakes ([`crate::gate`]).
    pub pending_handshakes: Gauge,
    /// Bytes tunnel streams hold for applications that have not read them yet, node-wide
    /// ([`crate::hbone::budget`]).
    pub buffered_bytes: Gauge,
    /// New QUIC tunnel connections asked to prove their address (a Retry) because the pending
    /// handshakes were more than half full.
    pub quic_retries: Counter,
    /// Tunnel dials that got no answer on QUIC and fell back to HTTP/2.
    pub quic_fallbacks: Counter,
    /// Certificate revocation lists in force.
    pub crl_lists: Gauge,
    /// Revocation files refused (unreadable or malformed); the lists in force were kept.
    pub crl_refused: Counter,
    /// Proxied connections, by direction (outbound, inbound, inbound_plaintext, passthrough).
    pub proxied_connections: Family<DirectionLabels, Counter>,
    /// Connections or streams refused, by reason.
    pub refusals: Family<ReasonLabels, Counter>,
    /// Policy decisions, by result (allow, deny).
    pub policy_decisions: Family<ResultLabels, Counter>,
    /// Istio's TCP families.
    pub istio: IstioTcp,
    /// Pods enrolled on this node (in-pod capture).
    pub enrolled_pods: Gauge,
    /// Workload certificates held.
    pub certificates: Gauge,
    /// Expiry of each held certificate, in seconds since the Unix epoch.
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    /// Certificates the CA refused, by identity (retried).
    pub certificate_refusals: Family<IdentityLabels, Counter>,
    /// Pods enrolled or released by the reconciler (cluster state, not CNI), by reason.
    pub reconciler: Family<ReconcileLabels, Counter>,
    /// Reconciler passes completed.
    pub reconciler_passes: Counter,
    /// Pod annotation patches that failed (retried).
    pub annotation_failures: Counter,
}

impl Metrics {
    /// Registers every metric in `registry` and returns the shared handles.
    /// The families with a closed set of labels (refusals, directions, policy results) export
    /// every series from the start, at zero.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        for r in Reason::ALL {
            drop(
                m.refusals
                    .get_or_create(&ReasonLabels { reason: r.label() }),
            );
        }
        for &direction in DIRECTIONS {
            drop(
                m.proxied_connections
                    .get_or_create(&DirectionLabels { direction }),
            );
        }
        for result in ["allow", "deny"] {
            drop(m.policy_decisions.get_or_create(&ResultLabels { result }));
        }
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.istio.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.istio.closed.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "TCP connections that were not carried (denied, or the next hop unreachable)",
            m.istio.failed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent in the response direction (server to client)",
            m.istio.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received in the request direction (client to server)",
            m.istio.received_bytes.clone(),
        );
        let zt = registry.sub_registry_with_prefix("ztunnel");
        zt.register(
            "pool_connections_opened",
            "TLS tunnel connections opened by the pool",
            m.pool_connections_opened.clone(),
        );
        zt.register(
            "pool_connections",
            "TLS tunnel connections open in the pool",
            m.pool_connections.clone(),
        );
        zt.register(
            "pool_streams",
            "HBONE streams open through the pool",
            m.pool_streams.clone(),
        );
        zt.register(
            "hbone_connections_accepted",
            "Inbound tunnel TLS connections accepted",
            m.hbone_connections_accepted.clone(),
        );
        zt.register(
            "quic_connections_accepted",
            "Inbound QUIC tunnel connections (UDP 15008) accepted",
            m.quic_connections_accepted.clone(),
        );
        zt.register(
            "pending_handshakes",
            "Inbound tunnel connections still in their handshakes, holding a place among the pending ones",
            m.pending_handshakes.clone(),
        );
        zt.register(
            "buffered_bytes",
            "Bytes received on tunnel streams and not yet written to their applications, node-wide",
            m.buffered_bytes.clone(),
        );
        zt.register(
            "quic_retries",
            "New QUIC tunnel connections asked to validate their address (Retry) under load",
            m.quic_retries.clone(),
        );
        zt.register(
            "quic_fallbacks",
            "Tunnel dials that got no answer on QUIC and fell back to HTTP/2",
            m.quic_fallbacks.clone(),
        );
        zt.register(
            "crl_lists",
            "Certificate revocation lists in force",
            m.crl_lists.clone(),
        );
        zt.register(
            "crl_refused",
            "Revocation files refused (unreadable or malformed); the lists in force were kept",
            m.crl_refused.clone(),
        );
        zt.register(
            "proxied_connections",
            "Connections proxied, by direction",
            m.proxied_connections.clone(),
        );
        zt.register(
            "refusals",
            "Connections or streams refused, by reason",
            m.refusals.clone(),
        );
        zt.register(
            "enrolled_pods",
            "Pods enrolled on this node",
            m.enrolled_pods.clone(),
        );
        zt.register(
            "certificates",
            "Workload certificates held",
            m.certificates.clone(),
        );
        zt.register(
            "certificate_expiry_seconds",
            "Expiry of each held workload certificate (Unix time)",
            m.certificate_expiry.clone(),
        );
        zt.register(
            "certificate_refusals",
            "Workload certificates the CA refused, by identity (each retried)",
            m.certificate_refusals.clone(),
        );
        zt.register(
            "reconciler_actions",
            "Pods enrolled or released by the reconciler, by action and reason",
            m.reconciler.clone(),
        );
        zt.register(
            "reconciler_passes",
            "Reconciler passes completed (on every discovery change and every 10 s)",
            m.reconciler_passes.clone(),
        );
        zt.register(
            "annotation_failures",
            "Pod enrollment annotations that could not be written",
            m.annotation_failures.clone(),
        );
        zt.register(
            "panics",
            "Panics in the process (each logged as an error)",
            PANICS.clone(),
        );
        zt.register(
            "policy_decisions",
            "Authorization decisions, by result",
            m.policy_decisions.clone(),
        );
        m
    }

    /// Counts a policy decision.
    pub fn policy_decision(&self, allowed: bool) {
        self.policy_decisions
            .get_or_create(&ResultLabels {
                result: if allowed { "allow" } else { "deny" },
            })
            .inc();
    }

    /// Counts a refusal; [`crate::refused!`] also logs it.
    pub fn refused(&self, reason: Reason) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.label(),
            })
            .inc();
    }

    /// Counts a proxied connection in `direction`.
    pub fn proxied(&self, direction: &'static str) {
        self.proxied_connections
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }
}
