//! The table of live proxied connections (the admin API's `/connections`) and the access log
//! line written when each one closes.
//!
//! A [`Tracked`] guard is created when a connection is accepted; dropping it removes the
//! connection from the table and logs one structured line with addresses, identities,
//! direction, bytes each way, duration, the policy decision and the policy that made it, and
//! how it ended ([`Outcome`], recorded by [`Tracked::fail`]). The guard also reports the
//! connection in Istio's TCP metrics ([`Tracked::report`], or at its end with a response
//! flag). Inbound connections carry what the policy engine needs ([`PolicyFacts`]), so that
//! [`ConnTable::reevaluate`] can close those that a policy change now denies; tunnel streams
//! carry their peer's chain, so that [`ConnTable::revoke`] can close those that revocation
//! lists now revoke; [`ConnTable::close_pod`] closes those from and to a pod leaving the
//! mesh. A handler learns which from [`Tracked::told_to_close`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

use super::outcome::Outcome;
use crate::hbone::copy::ByteCounters;
use crate::identity::crl::PeerChain;
use crate::metrics::{IstioLabels, IstioTcp, Metrics};

/// Which proxy carried a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Captured outbound, tunnelled over HBONE.
    Outbound,
    /// Captured outbound to a destination outside the mesh, sent as plain TCP.
    Passthrough,
    /// Arrived through the tunnel (15008).
    Inbound,
    /// Arrived in plaintext (15006).
    InboundPlaintext,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Passthrough => "passthrough",
            Direction::Inbound => "inbound",
            Direction::InboundPlaintext => "inbound_plaintext",
        }
    }
}

/// What is known about a connection; filled in as the proxy learns it.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ConnFacts {
    /// The peer the daemon accepted the connection from (for a tunnel stream, the tunnel's
    /// source address: never what the peer says of itself).
    pub src_addr: Option<SocketAddr>,
    /// The original client address a tunnel stream's `forwarded` header claims, recorded
    /// beside `src_addr`, never in its place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<SocketAddr>,
    pub dst_addr: Option<SocketAddr>,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    /// `allow` or `deny`, for connections the policy engine judged.
    pub decision: Option<&'static str>,
    /// The policy (`namespace/name`) that decided, when one did.
    pub policy: Option<String>,
    /// The W3C trace context of a tunnel stream: the one the source's daemon started and
    /// sent, which the destination's records too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// What the policy engine needs to judge an inbound connection again.
#[derive(Debug, Clone)]
pub struct PolicyFacts {
    pub src_principal: Option<String>,
    pub src_namespace: Option<String>,
    pub src_ip: IpAddr,
    /// The destination address the connection is for.
    pub dst_ip: IpAddr,
    pub dst_uid: Arc<str>,
    pub dst_port: u16,
}

impl PolicyFacts {
    /// The engine's decision for these facts in `state`; a destination that left discovery is
    /// denied.
    pub fn evaluate(&self, state: &crate::discovery::State) -> crate::policy::Decision {
        use crate::policy::{Conn, Decision, Reason};
        match state.workload_by_uid(&self.dst_uid) {
            Some(w) => state.policy().evaluate(&Conn {
                src_principal: self.src_principal.as_deref(),
                src_namespace: self.src_namespace.as_deref(),
                src_ip: self.src_ip,
                dst_ip: self.dst_ip,
                dst_namespace: &w.namespace,
                dst_labels: &w.labels,
                dst_port: self.dst_port,
            }),
            None => Decision {
                allowed: false,
                reason: Reason::NoAllowMatched,
                policy: None,
                rule: None,
            },
        }
    }
}

/// One live connection.
#[derive(Debug)]
pub struct ConnRecord {
    pub id: u64,
    pub direction: Direction,
    pub facts: Mutex<ConnFacts>,
    pub bytes: ByteCounters,
    pub started: Instant,
    policy_facts: Mutex<Option<PolicyFacts>>,
    /// The chain the tunnel's peer presented, for a tunnel stream.
    peer: OnceLock<Arc<PeerChain>>,
    close: tokio::sync::Notify,
    close_cause: OnceLock<CloseCause>,
}

/// Why the daemon tells a live connection to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// A policy change denies it.
    PolicyDenied,
    /// Its pod (the source of an outbound connection, the destination of an inbound one) is
    /// being released from the mesh: without the pod's rules neither kind can go on (see
    /// `capture::registry`), so they are closed first.
    Released,
    /// A revocation list now revokes its tunnel peer's certificate.
    Revoked,
    /// Its place among the node's proxied connections went to a newcomer: its source held
    /// the most ([`super::ProxyInputs::sources`]).
    Evicted,
}

impl ConnRecord {
    fn tell_to_close(&self, cause: CloseCause) {
        // The first cause told is the one reported.
        let _ = self.close_cause.set(cause);
        self.close.notify_one();
    }

    /// Whether this is a connection from (outbound) or to (inbound) one of `ips`.
    fn is_of_pod(&self, ips: &[IpAddr]) -> bool {
        let f = self.facts.lock();
        let pod_side = match self.direction {
            Direction::Outbound | Direction::Passthrough => f.src_addr,
            Direction::Inbound | Direction::InboundPlaintext => f.dst_addr,
        };
        pod_side.is_some_and(|a| ips.contains(&a.ip().to_canonical()))
    }
}

/// A snapshot row of `/connections`.
#[derive(Debug, Serialize)]
pub struct ConnRow {
    pub id: u64,
    pub direction: Direction,
    #[serde(flatten)]
    pub facts: ConnFacts,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u128,
}

/// All live connections, and Istio's TCP families they are reported in.
#[derive(Default)]
pub struct ConnTable {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<ConnRecord>>>,
    istio: IstioTcp,
    /// Notified whenever a connection leaves the table, or a handler counted by the proxy
    /// ends ([`ConnTable::changed`]).
    changed: tokio::sync::Notify,
}

impl ConnTable {
    /// An empty table whose connections are reported in `istio`.
    pub fn new(istio: IstioTcp) -> Self {
        ConnTable {
            istio,
            ..Default::default()
        }
    }

    /// Registers a new connection; the returned guard unregisters and logs it.
    pub fn track(self: &Arc<Self>, direction: Direction, facts: ConnFacts) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let rec = Arc::new(ConnRecord {
            id,
            direction,
            facts: Mutex::new(facts),
            bytes: ByteCounters::default(),
            started: Instant::now(),
            policy_facts: Mutex::default(),
            peer: OnceLock::new(),
            close: tokio::sync::Notify::new(),
            close_cause: OnceLock::new(),
        });
        self.live.lock().insert(id, rec.clone());
        Tracked {
            table: self.clone(),
            rec,
            outcome: Outcome::Completed,
            labels: None,
            report: None,
        }
    }

    /// A future that resolves at the next departure: of a connection from the table, or of a
    /// handler the proxy counts. Take it before checking, so that none is missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Says that something [`ConnTable::changed`] waits for happened.
    pub(super) fn notify_changed(&self) {
        self.changed.notify_waiters();
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Judges every live connection that carries policy facts again in `state`; those now
    /// denied are told to close. Returns how many.
    pub fn reevaluate(&self, state: &crate::discovery::State) -> usize {
        let mut closed = 0;
        for r in self.snapshot() {
            let facts = r.policy_facts.lock().clone();
            let Some(facts) = facts else { continue };
            let d = facts.evaluate(state);
            if !d.allowed {
                {
                    let mut f = r.facts.lock();
                    f.decision = Some("deny");
                    f.policy = d.policy.as_ref().map(|p| p.to_string());
                }
                r.tell_to_close(CloseCause::PolicyDenied);
                closed += 1;
            }
        }
        closed
    }

    /// Tells every tunnel stream whose peer's chain the revocation lists now revoke to close;
    /// returns how many.
    pub fn revoke(&self) -> usize {
        let mut closed = 0;
        for r in self.snapshot() {
            if r.peer.get().is_some_and(|p| !p.trusted()) {
                r.tell_to_close(CloseCause::Revoked);
                closed += 1;
            }
        }
        closed
    }

    /// Tells every connection of the pod with addresses `ips` to close (outbound from it,
    /// inbound to it); returns how many.
    pub fn close_pod(&self, ips: &[IpAddr]) -> usize {
        let doomed: Vec<_> = self
            .snapshot()
            .into_iter()
            .filter(|r| r.is_of_pod(ips))
            .collect();
        for r in &doomed {
            r.tell_to_close(CloseCause::Released);
        }
        doomed.len()
    }

    /// Connections of the pod with addresses `ips` still live.
    pub fn of_pod(&self, ips: &[IpAddr]) -> usize {
        self.snapshot().iter().filter(|r| r.is_of_pod(ips)).count()
    }

    /// Waits until no connection of the pod with addresses `ips` is left, or until
    /// `deadline`: woken by each departure ([`ConnTable::changed`]), never by polling. Returns
    /// how many are left.
    pub async fn until_pod_closed(&self, ips: &[IpAddr], deadline: tokio::time::Instant) -> usize {
        loop {
            let changed = self.changed();
            let left = self.of_pod(ips);
            if left == 0 || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.of_pod(ips);
            }
        }
    }

    fn snapshot(&self) -> Vec<Arc<ConnRecord>> {
        self.live.lock().values().cloned().collect()
    }

    /// A snapshot for the admin API.
    pub fn rows(&self) -> Vec<ConnRow> {
        let live = self.live.lock();
        let mut rows: Vec<ConnRow> = live.values().map(|r| row(r)).collect();
        rows.sort_by_key(|r| r.id);
        rows
    }
}

fn row(r: &ConnRecord) -> ConnRow {
    ConnRow {
        id: r.id,
        direction: r.direction,
        facts: r.facts.lock().clone(),
        bytes_sent: r.bytes.sent(),
        bytes_received: r.bytes.received(),
        duration_ms: r.started.elapsed().as_millis(),
    }
}

/// Guard of a tracked connection.
pub struct Tracked {
    table: Arc<ConnTable>,
    rec: Arc<ConnRecord>,
    outcome: Outcome,
    /// Istio's labels for it, until it is reported (boxed: the guard lives in the handler's
    /// future for the connection's life, and the labels only until it is carried).
    labels: Option<Box<IstioLabels>>,
    report: Option<Report>,
}

/// Istio metrics reported for a connection: opened when set, closed with its bytes on drop.
struct Report {
    opened: crate::metrics::Opened,
    /// Reported by the client's daemon (`reporter="source"`).
    at_source: bool,
}

impl Tracked {
    pub fn record(&self) -> &ConnRecord {
        &self.rec
    }

    /// Updates the known facts.
    pub fn update(&self, f: impl FnOnce(&mut ConnFacts)) {
        f(&mut self.rec.facts.lock());
    }

    /// Sets the labels Istio's TCP metrics report the connection with: once it is carried
    /// ([`Tracked::report`]), or when it ends with a response flag before
    /// ([`Tracked::fail`]). A connection never given labels is not in those metrics.
    pub fn label(&mut self, labels: IstioLabels) {
        self.labels = Some(Box::new(labels));
    }

    /// Reports the connection in Istio's TCP metrics with its [labels](Tracked::label): opened
    /// now, closed (with its bytes) when the guard drops.
    pub fn report(&mut self) {
        if let Some(labels) = self.labels.take() {
            self.report = Some(Report {
                opened: self.table.istio.open(&labels),
                at_source: labels.reporter == "source",
            });
        }
    }

    /// Keeps what the policy engine needs to judge this connection again.
    pub fn set_policy_facts(&self, facts: PolicyFacts) {
        *self.rec.policy_facts.lock() = Some(facts);
    }

    /// Records the chain the stream's tunnel peer presented, and says whether the revocation
    /// lists still trust it. Recorded first, judged second: lists that change in between
    /// close the stream through [`ConnTable::revoke`].
    pub fn set_peer(&self, peer: &Arc<PeerChain>) -> bool {
        let _ = self.rec.peer.set(peer.clone());
        peer.trusted()
    }

    /// Resolves when the daemon tells this connection to close, with the cause.
    pub async fn told_to_close(&self) -> CloseCause {
        self.rec.close.notified().await;
        self.rec
            .close_cause
            .get()
            .copied()
            .unwrap_or(CloseCause::PolicyDenied)
    }

    /// Records how the connection ended: its access-log line shows it on close, and one that
    /// ends with a response flag before it was reported is counted in Istio's metrics now
    /// (opened, closed with the flag, and failed). The reason of a refusal is counted by the
    /// caller (`refuse!` in [`super::outcome`]).
    pub fn fail(&mut self, outcome: Outcome) {
        if self.report.is_none() {
            if let (Some(flag), Some(labels)) = (outcome.response_flag(), self.labels.take()) {
                self.table.istio.refused(*labels, flag);
            }
        }
        self.outcome = outcome;
    }

    /// Records that the daemon closed the connection for `cause` (logged now, throttled when its
    /// reason is, and on close; a policy change is counted as `policy_revoked`).
    pub fn closed_by_daemon(&mut self, cause: CloseCause, metrics: &Metrics) {
        let outcome = closed_by(cause, self.rec.direction);
        if let Some(reason) = outcome.reason() {
            metrics.refused(reason);
        }
        let f = self.rec.facts.lock().clone();
        let log = match outcome {
            Outcome::PolicyRevoked => "closed: a policy change denies it".into(),
            _ => outcome.text(),
        };
        if outcome.reason().is_some_and(|r| r.throttled()) {
            crate::warn_throttled!(id = self.rec.id, src = ?f.src_addr, src_identity = ?f.src_identity, dst = ?f.dst_addr, "{log}");
        } else {
            tracing::info!(id = self.rec.id, src = ?f.src_addr, src_identity = ?f.src_identity, dst = ?f.dst_addr, "{log}");
        }
        self.fail(outcome);
    }
}

/// How a connection of `direction` ends when the daemon closes it for `cause`.
fn closed_by(cause: CloseCause, direction: Direction) -> Outcome {
    match (cause, direction) {
        (CloseCause::PolicyDenied, _) => Outcome::PolicyRevoked,
        (CloseCause::Revoked, _) => Outcome::CertificateRevoked,
        (CloseCause::Evicted, _) => Outcome::Evicted,
        (CloseCause::Released, Direction::Outbound | Direction::Passthrough) => {
            Outcome::SourceReleased
        }
        (CloseCause::Released, Direction::Inbound | Direction::InboundPlaintext) => {
            Outcome::DestinationReleased
        }
    }
}

/// Below this many rows the table keeps whatever room it has.
const SHRINK_ABOVE: usize = 1024;

/// Gives back the room a burst of connections made in the table (a `HashMap` never shrinks
/// by itself) once it is under a quarter full, keeping room for twice what is left: each
/// shrink halves the table at least, so the rehashing costs O(1) per removed row.
fn shrink_after_burst<V>(live: &mut HashMap<u64, V>) {
    if live.capacity() > SHRINK_ABOVE && live.len() * 4 < live.capacity() {
        live.shrink_to(live.len() * 2);
    }
}

impl Drop for Tracked {
    /// Reports and logs the connection, then takes it out of the table: a connection that has
    /// left the table (which drain and `until_pod_closed` wait for) is in the metrics and the
    /// access log.
    fn drop(&mut self) {
        let r = row(&self.rec);
        if let Some(rep) = &self.report {
            // Bytes: `sent` is what was read from this side's TCP peer. At the source that
            // peer is the client (request direction); at the destination it is the server.
            let (request, response) = if rep.at_source {
                (r.bytes_sent, r.bytes_received)
            } else {
                (r.bytes_received, r.bytes_sent)
            };
            rep.opened.close(request, response);
        }
        let f = &r.facts;
        let fmt_addr = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            target: "access",
            direction = r.direction.as_str(),
            src_addr = %fmt_addr(f.src_addr),
            forwarded_for = %fmt_addr(f.forwarded_for),
            dst_addr = %fmt_addr(f.dst_addr),
            src_identity = f.src_identity.as_deref().unwrap_or(""),
            dst_identity = f.dst_identity.as_deref().unwrap_or(""),
            src_workload = f.src_workload.as_deref().unwrap_or(""),
            dst_workload = f.dst_workload.as_deref().unwrap_or(""),
            bytes_sent = r.bytes_sent,
            bytes_received = r.bytes_received,
            duration_ms = r.duration_ms as u64,
            decision = f.decision.unwrap_or(""),
            policy = f.policy.as_deref().unwrap_or(""),
            traceparent = f.traceparent.as_deref().unwrap_or(""),
            error = &*self.outcome.text(),
            "connection closed"
        );
        {
            let mut live = self.table.live.lock();
            live.remove(&self.rec.id);
            shrink_after_burst(&mut live);
        }
        self.table.notify_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn the_table_gives_back_the_room_of_a_burst() {
        let table = Arc::new(ConnTable::default());
        let capacity = || table.live.lock().capacity();
        let mut burst: Vec<Tracked> = (0..5000)
            .map(|_| table.track(Direction::Outbound, ConnFacts::default()))
            .collect();
        let grown = capacity();
        assert!(grown >= 5000, "{grown}");
        let kept = burst.split_off(4900);
        drop(burst);
        assert!(capacity() <= SHRINK_ABOVE, "{} of {grown}", capacity());
        assert_eq!(table.len(), kept.len());
    }

    #[tokio::test]
    async fn a_release_waits_for_the_pods_connections_to_leave() {
        let table = Arc::new(ConnTable::default());
        let pod: [IpAddr; 1] = ["10.0.0.5".parse().unwrap()];
        let conn = |src: &str| {
            table.track(
                Direction::Outbound,
                ConnFacts {
                    src_addr: addr(src),
                    dst_addr: addr("10.0.1.9:80"),
                    ..Default::default()
                },
            )
        };
        let (a, b, other) = (
            conn("10.0.0.5:40000"),
            conn("10.0.0.5:40001"),
            conn("10.0.0.6:40000"),
        );
        let leave = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(a);
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(b);
        });
        // Woken by the last departure, long before the deadline (a wait that missed it
        // would sleep for the whole minute).
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        let waited =
            tokio::time::timeout(Duration::from_secs(10), table.until_pod_closed(&pod, far));
        assert_eq!(waited.await.expect("woken by the departures"), 0);
        leave.await.unwrap();

        // One that stays: the wait ends at the deadline and counts it; another pod's
        // connection is not counted.
        let stays = conn("10.0.0.5:40002");
        let soon = tokio::time::Instant::now() + Duration::from_millis(50);
        assert_eq!(table.until_pod_closed(&pod, soon).await, 1);
        drop((stays, other));
    }

    #[tokio::test]
    async fn a_released_pod_closes_its_own_connections_only() {
        let table = Arc::new(ConnTable::default());
        let pod = ["10.0.0.5".parse().unwrap()];
        // (direction, source, destination, told to close)
        let cases = [
            (Direction::Outbound, "10.0.0.5:40000", "10.0.1.9:80", true),
            (
                Direction::Passthrough,
                "10.0.0.5:40001",
                "1.1.1.1:443",
                true,
            ),
            (Direction::Inbound, "10.0.1.9:40002", "10.0.0.5:8080", true),
            (
                Direction::InboundPlaintext,
                "10.0.1.9:40003",
                "[::ffff:10.0.0.5]:8080",
                true,
            ),
            // The pod at the far end of another pod's connections: not its own.
            (
                Direction::Outbound,
                "10.0.1.9:40004",
                "10.0.0.5:8080",
                false,
            ),
            (Direction::Inbound, "10.0.0.5:40005", "10.0.1.9:8080", false),
            (
                Direction::InboundPlaintext,
                "10.0.1.9:40006",
                "10.0.2.1:8080",
                false,
            ),
        ];
        let tracked: Vec<Tracked> = cases
            .iter()
            .map(|(direction, src, dst, _)| {
                let facts = ConnFacts {
                    src_addr: addr(src),
                    dst_addr: addr(dst),
                    ..Default::default()
                };
                table.track(*direction, facts)
            })
            .collect();
        assert_eq!(table.of_pod(&pod), 4);
        assert_eq!(table.close_pod(&pod), 4);
        for (t, (direction, src, _, closed)) in tracked.iter().zip(&cases) {
            // Telling is done by now: a connection told resolves at once.
            let told = tokio::time::timeout(Duration::from_millis(20), t.told_to_close())
                .await
                .ok();
            let want = closed.then_some(CloseCause::Released);
            assert_eq!(told, want, "{direction:?} from {src}");
        }
        drop(tracked);
        assert_eq!(table.of_pod(&pod), 0);
        assert!(table.is_empty());
    }

    #[test]
    fn the_daemon_closing_a_connection_says_which_pod_left_or_that_policy_denies_it() {
        use Direction::*;
        let cases = [
            (CloseCause::PolicyDenied, Outbound, Outcome::PolicyRevoked),
            (CloseCause::PolicyDenied, Inbound, Outcome::PolicyRevoked),
            (
                CloseCause::PolicyDenied,
                InboundPlaintext,
                Outcome::PolicyRevoked,
            ),
            (CloseCause::Released, Outbound, Outcome::SourceReleased),
            (CloseCause::Released, Passthrough, Outcome::SourceReleased),
            (CloseCause::Released, Inbound, Outcome::DestinationReleased),
            (
                CloseCause::Released,
                InboundPlaintext,
                Outcome::DestinationReleased,
            ),
        ];
        for (cause, direction, want) in cases {
            assert_eq!(closed_by(cause, direction), want, "{cause:?} {direction:?}");
        }
    }
}
