//! What one peer, and all peers together, may hold of `ztunnel ca` before anything has said who
//! they are.
//!
//! The CA's callers authenticate per request (a bearer token), so until a request has been
//! judged a peer is nobody, and judging it may cost a TokenReview at the API server. A flood from
//! one address must not exhaust the CA's descriptors, tasks or memory, nor be amplified into a
//! flood of TokenReviews; a legitimate daemon, which keeps one connection and asks for a
//! certificate per local identity at start-up and at each renewal, must never notice. Hence:
//!
//! - connections (from accept until closed): per source address and in all ([`crate::gate`]).
//!   Over the per-address cap the connection is reset before TLS (`connection_limit`). When
//!   every place is held, the gate evicts ([`WhenFull::EvictLargest`]): a newcomer whose
//!   address, even with it, would hold fewer connections than the address holding the most
//!   takes the place of that address's oldest connection, which is closed at once, whatever
//!   it was doing (`connection_evicted`); otherwise the newcomer is reset before TLS
//!   (`connection_limit`). So addresses that fill every place with silent or mute
//!   connections keep out nobody from elsewhere, only churn among themselves, and it is
//!   eviction, not the handshake deadline, that lets the newcomer in;
//! - time to become a client: the TLS handshake and the HTTP/2 client preface must both be
//!   done within [`CaLimits::handshake_timeout`](crate::config::CaLimits::handshake_timeout) of the accept, or the connection is closed
//!   (`tls_timeout`, `preface_timeout`);
//! - time doing nothing: a connection on which no stream has started for
//!   [`CaLimits::idle_timeout`](crate::config::CaLimits::idle_timeout) and none is open is closed with a GOAWAY (the daemon's client
//!   dials again when it next needs the CA);
//! - streams on one connection: HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`, which a conforming
//!   client waits on;
//! - a request's body: at most `MAX_BODY` bytes, all of it within
//!   [`CaLimits::request_timeout`](crate::config::CaLimits::request_timeout) of the headers, or `408` (`body_timeout`); until then the
//!   request holds only its stream;
//! - requests being handled (from a complete body until answered): per source address and in
//!   all; over either, `429` (`too_many_requests`);
//! - requests started per source address (counted once their body is in): a burst, then one
//!   per refill period (GCRA, `governor`); over it, `429` (`rate_limited`).
//!
//! Whom eviction can reach: only an address holding more places than the newcomer's would
//! with it (so at least two), and of it the oldest connection. An address holding a
//! single connection is never evicted: a daemon keeps one connection to the CA, so an idle
//! but authenticated daemon connection, however old, outlives any flood that is not from its
//! own address. What can lose its connection is an address holding many, such as a flooder,
//! or several daemons behind one SNAT address (raise the per-address caps for those, so they
//! are not the largest holder).
//!
//! So a peer that never finishes its handshake, never sends its preface or never opens a
//! stream holds a connection's place for a bounded time, and a request whose body never comes
//! holds its stream for the request timeout and no place in flight. The bodies being read are
//! bounded by the streams: at most `streams_per_connection` × `MAX_BODY` bytes per connection.
//! [`Guard`] makes the admission decisions; the server acts on them and keeps the clocks.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::gauge::Gauge;

use crate::config::CaLimits;
use crate::gate::{Full, Gate, Permit, WhenFull};

/// The refusal reason of a connection closed because its place went to a newcomer.
pub const EVICTED: &str = "connection_evicted";

/// Why a peer was turned away: the refusal counter's label and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Connections(Full),
    #[error("{0}")]
    InFlight(Full),
    #[error("too many requests from this peer: at most {burst} at once, then one per {refill:?}")]
    Rate { burst: NonZeroU32, refill: Duration },
}

impl Refused {
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Connections(_) => "connection_limit",
            Refused::InFlight(_) => "too_many_requests",
            Refused::Rate { .. } => "rate_limited",
        }
    }
}

/// The CA's gates and rate limiter.
pub struct Guard {
    limits: CaLimits,
    connections: Arc<Gate>,
    requests: Arc<Gate>,
    rate: DefaultKeyedRateLimiter<IpAddr>,
}

impl Guard {
    /// The CA's gates; `connections_held` (when given) follows the number of open connections.
    pub fn new(limits: CaLimits, connections_held: Option<Gauge>) -> Self {
        // A zero period would be no limit at all: at least a nanosecond.
        let period = limits.refill.max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("a non-zero period")
            .allow_burst(limits.burst);
        Guard {
            limits,
            connections: Gate::with(
                "connections",
                limits.connections,
                WhenFull::EvictLargest,
                connections_held,
            ),
            requests: Gate::new("requests in flight", limits.requests_in_flight),
            rate: RateLimiter::keyed(quota),
        }
    }

    pub fn limits(&self) -> &CaLimits {
        &self.limits
    }

    /// A new connection from `peer`, perhaps in place of another's (which is told through its
    /// [`Permit::evicted`] and must then close); the permit is held until it closes.
    pub fn admit_connection(&self, peer: IpAddr) -> Result<Permit, Refused> {
        self.connections
            .try_admit(peer)
            .map_err(Refused::Connections)
    }

    /// A new request from `peer`, its body read; the permit is held until it has been
    /// answered. A request refused for being one too many in flight does not spend the peer's
    /// rate.
    pub fn admit_request(&self, peer: IpAddr) -> Result<Permit, Refused> {
        let permit = self.requests.try_admit(peer).map_err(Refused::InFlight)?;
        self.rate
            .check_key(&peer.to_canonical())
            .map_err(|_| Refused::Rate {
                burst: self.limits.burst,
                refill: self.limits.refill,
            })?;
        Ok(permit)
    }

    /// Forgets the addresses whose rate has fully refilled (call now and then: the table
    /// otherwise keeps every address ever seen).
    pub fn forget_idle(&self) {
        self.rate.retain_recent();
    }

    /// Addresses the rate limiter remembers.
    pub fn remembered(&self) -> usize {
        self.rate.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Limits;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn small() -> CaLimits {
        CaLimits {
            connections: Limits {
                total: 3,
                per_peer: 2,
            },
            streams_per_connection: 4,
            requests_in_flight: Limits {
                total: 4,
                per_peer: 3,
            },
            burst: NonZeroU32::new(5).unwrap(),
            refill: Duration::from_secs(3600),
            ..CaLimits::default()
        }
    }

    #[test]
    fn connections_are_capped_per_peer_and_shared_in_all() {
        use futures::FutureExt;
        let g = Guard::new(small(), None);
        let mut a1 = g.admit_connection(ip("10.0.0.1")).unwrap();
        let mut a2 = g.admit_connection(ip("10.0.0.1")).unwrap();
        let e = g.admit_connection(ip("10.0.0.1")).unwrap_err();
        assert_eq!(e.reason(), "connection_limit");
        assert_eq!(e.to_string(), "too many connections from this peer (2)");
        let mut b = g.admit_connection(ip("10.0.0.2")).unwrap();
        // Full: a newcomer from elsewhere takes the place of the largest holder's oldest.
        let _c = g.admit_connection(ip("10.0.0.3")).unwrap();
        assert!(a1.evicted().now_or_never().is_some(), "the oldest evicted");
        assert!(a2.evicted().now_or_never().is_none());
        // One each: nobody holds more than a newcomer would, so it is refused, and an address
        // holding a single connection is never evicted.
        let e = g.admit_connection(ip("10.0.0.4")).unwrap_err();
        assert_eq!(e.reason(), "connection_limit");
        assert_eq!(e.to_string(), "too many connections in all (3)");
        assert!(b.evicted().now_or_never().is_none());
        drop(a1);
        assert!(
            g.admit_connection(ip("10.0.0.4")).is_err(),
            "an evicted connection frees nothing more"
        );
        drop(a2);
        g.admit_connection(ip("10.0.0.4"))
            .expect("a closed connection frees its place");
    }

    #[test]
    fn requests_are_capped_in_flight_and_by_rate() {
        let g = Guard::new(small(), None);
        let a = ip("10.0.0.1");
        // Three in flight, the fourth refused without spending the rate.
        let held: Vec<_> = (0..3).map(|_| g.admit_request(a).unwrap()).collect();
        let e = g.admit_request(a).unwrap_err();
        assert_eq!(e.reason(), "too_many_requests");
        drop(held);
        // Two more fit the burst of five; the sixth is over the rate, while another peer
        // still has its own burst.
        for _ in 0..2 {
            drop(g.admit_request(a).unwrap());
        }
        let e = g.admit_request(a).unwrap_err();
        assert_eq!(e.reason(), "rate_limited");
        assert!(e.to_string().contains("at most 5 at once"), "{e}");
        // The IPv4-mapped form is the same peer.
        assert!(g.admit_request(ip("::ffff:10.0.0.1")).is_err());
        drop(g.admit_request(ip("10.0.0.2")).unwrap());
        assert_eq!(g.remembered(), 2);
        // Neither has refilled within the hour: both remembered.
        g.forget_idle();
        assert_eq!(g.remembered(), 2);
    }

    #[test]
    fn a_peer_whose_rate_has_refilled_is_forgotten() {
        let g = Guard::new(
            CaLimits {
                refill: Duration::from_millis(1),
                ..small()
            },
            None,
        );
        drop(g.admit_request(ip("10.0.0.1")).unwrap());
        assert_eq!(g.remembered(), 1);
        std::thread::sleep(Duration::from_millis(20));
        g.forget_idle();
        assert_eq!(g.remembered(), 0);
    }
}
