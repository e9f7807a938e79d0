//! The daemon's Prometheus metrics (`prometheus-client`), registered once and shared.
//!
//! Metric names are part of the contract: dashboards read them. The `istio_tcp_*` families
//! carry the labels Istio's dashboards expect; the `ztunnel_*` families are the daemon's own.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a refusal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
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
    /// Proxied connections, by direction (outbound, inbound, inbound_plaintext, passthrough).
    pub proxied_connections: Family<DirectionLabels, Counter>,
    /// Connections or streams refused, by reason.
    pub refusals: Family<ReasonLabels, Counter>,
    /// Policy decisions, by result (allow, deny).
    pub policy_decisions: Family<ResultLabels, Counter>,
}

impl Metrics {
    /// Registers every metric in `registry` and returns the shared handles.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
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

    /// Counts a refusal.
    pub fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
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
