//! The CA's own counters (`prometheus-client`), served at `GET /metrics` on the CA's port:
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `ztunnel_ca_signed_total` | | certificates signed |
//! | `ztunnel_ca_refusals_total` | `reason` | requests and connections refused, by reason (`audience`, `not_daemon`, `no_pod_on_node`, `rate_limited`, `connection_limit`, `connection_evicted`, `tls_handshake`, `tls_timeout`, `preface_timeout`, `body_timeout`, `token_reviews_busy`, …) |
//! | `ztunnel_ca_connections` | | connections open (each holds a place of `--max-connections`) |
//! | `ztunnel_ca_token_reviews_total` | `result` | TokenReviews sent (`authenticated`, `rejected`, `error`) |
//! | `ztunnel_ca_token_reviews_saved_total` | `result` | TokenReviews not sent: answered from the cache (`cached_authenticated`, `cached_rejected`) or by the review of a concurrent request with the same token (`joined`) |
//! | `ztunnel_ca_material_reloads_total` | `result` | signing-material updates (`applied`, `refused`; a Secret's revocation lists that do not parse are `refused` too) |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Every counter of `ztunnel ca`.
pub struct CaMetrics {
    registry: Registry,
    signed: Counter,
    refusals: Family<ReasonLabels, Counter>,
    token_reviews: Family<ResultLabels, Counter>,
    token_reviews_saved: Family<ResultLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    connections: Gauge,
}

impl Default for CaMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = CaMetrics {
            registry: Registry::default(),
            signed: Counter::default(),
            refusals: Family::default(),
            token_reviews: Family::default(),
            token_reviews_saved: Family::default(),
            reloads: Family::default(),
            connections: Gauge::default(),
        };
        registry.register("ztunnel_ca_signed", "Certificates signed", m.signed.clone());
        registry.register(
            "ztunnel_ca_refusals",
            "Signing requests refused, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "ztunnel_ca_token_reviews",
            "TokenReviews sent to the API server, by result",
            m.token_reviews.clone(),
        );
        registry.register(
            "ztunnel_ca_token_reviews_saved",
            "TokenReviews not sent: answered from the cache or by a concurrent review, by how",
            m.token_reviews_saved.clone(),
        );
        registry.register(
            "ztunnel_ca_material_reloads",
            "Signing material updates, by result",
            m.reloads.clone(),
        );
        registry.register(
            "ztunnel_ca_connections",
            "Connections open",
            m.connections.clone(),
        );
        CaMetrics { registry, ..m }
    }
}

impl CaMetrics {
    pub fn signed(&self) {
        self.signed.inc();
    }
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }
    pub fn token_review(&self, result: &'static str) {
        self.token_reviews
            .get_or_create(&ResultLabels { result })
            .inc();
    }
    pub fn token_review_saved(&self, result: &'static str) {
        self.token_reviews_saved
            .get_or_create(&ResultLabels { result })
            .inc();
    }
    /// TokenReviews sent so far with `result` (tests and tools).
    pub fn token_reviews(&self, result: &'static str) -> u64 {
        self.token_reviews
            .get_or_create(&ResultLabels { result })
            .get()
    }
    /// TokenReviews saved so far as `result` (tests and tools).
    pub fn token_reviews_saved(&self, result: &'static str) -> u64 {
        self.token_reviews_saved
            .get_or_create(&ResultLabels { result })
            .get()
    }
    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }
    /// Material updates refused so far (tests and tools).
    pub fn reloads_refused(&self) -> u64 {
        self.reloads
            .get_or_create(&ResultLabels { result: "refused" })
            .get()
    }
    /// The gauge of open connections, for the connection gate to set.
    pub fn connections_gauge(&self) -> Gauge {
        self.connections.clone()
    }
    /// Connections open now (tests and tools).
    pub fn connections(&self) -> i64 {
        self.connections.get()
    }
    /// Refusals counted so far for `reason` (tests and tools).
    pub fn refusals(&self, reason: &'static str) -> u64 {
        self.refusals.get_or_create(&ReasonLabels { reason }).get()
    }
    /// The OpenMetrics text of every counter.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "CA: encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    /// Each series is exported under the name the README gives it (a contract: dashboards
    /// and alerts read them by name).
    #[test]
    fn series_are_exported_under_their_documented_names() {
        let m = super::CaMetrics::default();
        m.signed();
        m.refused("bad_request");
        m.token_review("authenticated");
        m.token_review_saved("cached_authenticated");
        m.reload(false);
        m.connections_gauge().set(3);
        let text = m.encode();
        for line in [
            "ztunnel_ca_signed_total 1",
            "ztunnel_ca_refusals_total{reason=\"bad_request\"} 1",
            "ztunnel_ca_token_reviews_total{result=\"authenticated\"} 1",
            "ztunnel_ca_token_reviews_saved_total{result=\"cached_authenticated\"} 1",
            "ztunnel_ca_material_reloads_total{result=\"refused\"} 1",
            "ztunnel_ca_connections 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
