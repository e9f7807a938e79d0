//! Caps, per source address and in all, on what peers hold before they have proven who they
//! are: tunnel connections still in their TLS handshake, the CA's connections and its signing
//! requests in flight, connections to the admin endpoints.
//!
//! An unauthenticated peer is nobody, yet each connection it opens holds a descriptor, a task
//! and TLS state. Without a cap a hostile peer could exhaust the process's descriptors and
//! memory and keep every other peer out. A [`Gate`] admits at most `per_peer` holders from one
//! source address (IPv4-mapped IPv6 addresses count as the IPv4 address) and `total` in all. A
//! [`Permit`] counts until it is dropped. What a full gate does with a newcomer is the gate's
//! [`WhenFull`]:
//!
//! - [`WhenFull::Refuse`] (the CA's requests in flight, the admin endpoints): the newcomer is
//!   refused, whoever holds the places. Their holders never look for eviction.
//! - [`WhenFull::EvictLargest`] (pending tunnel handshakes, the CA's connections): places are
//!   shared between sources.
//!   A newcomer whose source, even with it, would hold fewer places than the source holding the
//!   most takes the place of that source's oldest holder, which is told
//!   ([`Permit::evicted`]) and must give it up (close its connection). A newcomer from the
//!   largest holder, or from a source that would then hold as many as it, is refused. A few
//!   addresses holding every place therefore keep out nobody who comes from elsewhere; they
//!   only churn among themselves. A source holding a single place is never evicted (the
//!   evicted source holds more than the newcomer's would with it, so at least two).
//!
//! Over the per-peer cap a newcomer is always refused. The decision is a pure function of the
//! holders ([`decide`]); nothing here touches a socket.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;

/// The caps of one gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Holders in all.
    pub total: usize,
    /// Holders from one source address.
    pub per_peer: usize,
}

impl Limits {
    /// The daemon's default for tunnel connections still in their TLS handshake.
    pub const PENDING_HANDSHAKES: Limits = Limits {
        total: 2048,
        per_peer: 256,
    };
}

/// What a gate whose places are all held does with a newcomer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuses it.
    Refuse,
    /// Evicts the oldest holder of the source holding the most, if the newcomer's source would
    /// still hold fewer; else refuses it.
    EvictLargest,
}

/// Which cap refused a peer, and what it counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("too many {what} from this peer ({limit})")]
    Peer { what: &'static str, limit: usize },
    #[error("too many {what} in all ({limit})")]
    Total { what: &'static str, limit: usize },
}

/// What a gate does with one newcomer ([`decide`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A free place.
    Admit,
    /// The place of holder `seq` of `peer`, which is evicted.
    Evict {
        peer: IpAddr,
        seq: u64,
    },
    Refuse(Full),
}

/// The holders of a gate: by source address, each source's in admission order (`seq`).
#[derive(Default)]
pub struct Holders {
    total: usize,
    next_seq: u64,
    by_peer: HashMap<IpAddr, BTreeMap<u64, Slot>>,
}

/// One held place: the sender that tells its permit it was evicted (none at a gate that
/// refuses instead).
type Slot = Option<oneshot::Sender<()>>;

/// What a gate with `limits` does when `peer` (canonical) asks for a place among `holders`.
/// Of several sources holding the most, the one whose oldest holder is the oldest loses it.
pub fn decide(
    limits: Limits,
    when_full: WhenFull,
    holders: &Holders,
    peer: IpAddr,
    what: &'static str,
) -> Decision {
    let from_peer = holders.by_peer.get(&peer).map_or(0, BTreeMap::len);
    if from_peer >= limits.per_peer {
        let limit = limits.per_peer;
        return Decision::Refuse(Full::Peer { what, limit });
    }
    if holders.total < limits.total {
        return Decision::Admit;
    }
    let refuse = Decision::Refuse(Full::Total {
        what,
        limit: limits.total,
    });
    if when_full == WhenFull::Refuse {
        return refuse;
    }
    // The largest holder: most places, then oldest first holder.
    let largest = holders
        .by_peer
        .iter()
        .filter_map(|(p, slots)| slots.keys().next().map(|&oldest| (slots.len(), oldest, *p)))
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    match largest {
        Some((held, seq, largest)) if from_peer + 1 < held => {
            Decision::Evict { peer: largest, seq }
        }
        _ => refuse,
    }
}

/// The holders of one kind of resource.
pub struct Gate {
    what: &'static str,
    limits: Limits,
    when_full: WhenFull,
    /// Set to the number of holders at each change, when given.
    gauge: Option<Gauge>,
    holders: Mutex<Holders>,
}

/// One admitted holder, counted until dropped or evicted.
pub struct Permit {
    gate: Arc<Gate>,
    peer: IpAddr,
    seq: u64,
    /// Told when the permit is evicted ([`WhenFull::EvictLargest`] only).
    eviction: Option<oneshot::Receiver<()>>,
    evicted: bool,
}

impl Gate {
    /// A gate for `what` (plural, as in "too many {what}") that refuses newcomers when full.
    pub fn new(what: &'static str, limits: Limits) -> Arc<Self> {
        Self::with(what, limits, WhenFull::Refuse, None)
    }

    /// A gate for `what` doing `when_full` when full, setting `gauge` (when given) to the
    /// number of holders at each change.
    pub fn with(
        what: &'static str,
        limits: Limits,
        when_full: WhenFull,
        gauge: Option<Gauge>,
    ) -> Arc<Self> {
        Arc::new(Gate {
            what,
            limits,
            when_full,
            gauge,
            holders: Mutex::default(),
        })
    }

    /// Admits one more holder from `peer`, evicting another if the gate says so ([`decide`]),
    /// or says which cap it is over.
    pub fn try_admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Full> {
        let peer = peer.to_canonical();
        let mut h = self.holders.lock();
        match decide(self.limits, self.when_full, &h, peer, self.what) {
            Decision::Refuse(full) => return Err(full),
            Decision::Admit => h.total += 1,
            Decision::Evict { peer: evicted, seq } => {
                // The evicted place becomes the newcomer's: the total stays.
                if let Some(slots) = h.by_peer.get_mut(&evicted) {
                    if let Some(Some(tell)) = slots.remove(&seq) {
                        let _ = tell.send(());
                    }
                    if slots.is_empty() {
                        h.by_peer.remove(&evicted);
                    }
                }
            }
        }
        let seq = h.next_seq;
        h.next_seq += 1;
        let (slot, eviction) = match self.when_full {
            WhenFull::Refuse => (None, None),
            WhenFull::EvictLargest => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
        };
        h.by_peer.entry(peer).or_default().insert(seq, slot);
        self.report(&h);
        Ok(Permit {
            gate: self.clone(),
            peer,
            seq,
            eviction,
            evicted: false,
        })
    }

    fn report(&self, h: &Holders) {
        if let Some(g) = &self.gauge {
            g.set(h.total as i64);
        }
    }

    /// Holders now, in all.
    pub fn held(&self) -> usize {
        self.holders.lock().total
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }
}

impl Permit {
    /// Resolves once the gate has given this permit's place to a newcomer; never at a gate
    /// that refuses newcomers instead. The holder should then let go of what it holds (an
    /// evicted permit no longer counts). Cancel-safe.
    pub async fn evicted(&mut self) {
        if self.evicted {
            return;
        }
        match self.eviction.as_mut() {
            // The sender goes only with the place: sent or dropped, the place is gone.
            Some(rx) => {
                let _ = rx.await;
            }
            None => std::future::pending().await,
        }
        self.eviction = None;
        self.evicted = true;
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({} from {})", self.gate.what, self.peer)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut h = self.gate.holders.lock();
        let Some(slots) = h.by_peer.get_mut(&self.peer) else {
            return;
        };
        // An evicted permit's place is someone else's already.
        if slots.remove(&self.seq).is_none() {
            return;
        }
        if slots.is_empty() {
            h.by_peer.remove(&self.peer);
        }
        h.total -= 1;
        self.gate.report(&h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// What one step expects of `try_admit`.
    #[derive(Debug)]
    enum Want {
        Admit,
        /// Admitted, evicting the permit admitted at this step.
        Evicts(usize),
        Peer,
        Total,
        /// Drops the permit admitted at this step (the address is ignored).
        Drop(usize),
    }
    use Want::*;

    /// Runs `steps` through a gate, all permits held unless dropped; returns the gate and the
    /// permits by step (`None`: refused, dropped or evicted).
    fn run(
        name: &str,
        limits: Limits,
        when_full: WhenFull,
        steps: &[(&str, Want)],
    ) -> (Arc<Gate>, Vec<Option<Permit>>) {
        let gate = Gate::with("things", limits, when_full, None);
        let mut held: Vec<Option<Permit>> = Vec::new();
        for (i, (addr, want)) in steps.iter().enumerate() {
            let got = match want {
                Drop(j) => {
                    held[*j].take().expect("a held permit to drop");
                    held.push(None);
                    continue;
                }
                _ => gate.try_admit(ip(addr)),
            };
            match (got, want) {
                (Ok(p), Admit) => {
                    held.push(Some(p));
                }
                (Ok(p), Evicts(j)) => {
                    let victim = held[*j].as_mut().expect("the victim is held");
                    assert!(
                        is_evicted(victim),
                        "{name}: step {i}: step {j}'s permit evicted"
                    );
                    held[*j] = None;
                    held.push(Some(p));
                }
                (Err(Full::Peer { what, limit }), Peer) => {
                    assert_eq!(
                        (what, limit),
                        ("things", limits.per_peer),
                        "{name}: step {i}"
                    );
                    held.push(None);
                }
                (Err(Full::Total { what, limit }), Total) => {
                    assert_eq!((what, limit), ("things", limits.total), "{name}: step {i}");
                    held.push(None);
                }
                (got, want) => panic!("{name}: step {i} ({addr}): got {got:?}, want {want:?}"),
            }
            // No other permit was evicted.
            for (j, p) in held.iter_mut().enumerate() {
                if let Some(p) = p {
                    assert!(
                        !is_evicted(p),
                        "{name}: step {i}: step {j}'s permit evicted too"
                    );
                }
            }
            let live = held.iter().flatten().count();
            assert_eq!(gate.held(), live, "{name}: step {i}: held count");
        }
        (gate, held)
    }

    /// Whether `evicted()` has resolved, without waiting.
    fn is_evicted(p: &mut Permit) -> bool {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let mut cx = Context::from_waker(Waker::noop());
        let fut = std::pin::pin!(p.evicted());
        matches!(fut.poll(&mut cx), Poll::Ready(()))
    }

    const SMALL: Limits = Limits {
        total: 4,
        per_peer: 3,
    };

    #[test]
    fn a_refusing_gate_caps_per_peer_and_in_all() {
        let (gate, held) = run(
            "refusing",
            Limits {
                total: 3,
                per_peer: 2,
            },
            WhenFull::Refuse,
            &[
                ("10.0.0.1", Admit),
                ("10.0.0.1", Admit),
                ("10.0.0.1", Peer),
                // The IPv4-mapped form is the same peer.
                ("::ffff:10.0.0.1", Peer),
                ("10.0.0.2", Admit),
                // Full: refused, although 10.0.0.3 holds nothing.
                ("10.0.0.3", Total),
                // A dropped permit frees its place for its peer and in all.
                ("", Drop(0)),
                ("10.0.0.3", Admit),
                ("10.0.0.1", Total),
            ],
        );
        assert_eq!(
            Full::Total {
                what: "things",
                limit: 3
            }
            .to_string(),
            "too many things in all (3)"
        );
        assert_eq!(gate.held(), 3);
        drop(held);
        assert_eq!(gate.held(), 0);
        assert!(gate.holders.lock().by_peer.is_empty(), "no entry left");
    }

    #[test]
    fn a_fair_gate_evicts_the_largest_holders_oldest() {
        // (name, steps): total 4, 3 per peer.
        let cases: &[(&str, &[(&str, Want)])] = &[
            (
                "fill, then a newcomer from elsewhere evicts the largest holder's oldest",
                &[
                    ("10.0.0.1", Admit),
                    ("10.0.0.1", Admit),
                    ("10.0.0.1", Admit),
                    ("10.0.0.2", Admit),
                    ("10.0.0.3", Evicts(0)),
                    // 10.0.0.1 now holds 2, the others 1 each: the next newcomer from a
                    // source of 1 would hold 2, as many as the largest: refused.
                    ("10.0.0.2", Total),
                    ("10.0.0.4", Evicts(1)),
                ],
            ),
            (
                "the largest holders themselves are refused; of two as large, the older loses",
                &[
                    ("10.0.0.1", Admit),
                    ("10.0.0.1", Admit),
                    ("10.0.0.2", Admit),
                    ("10.0.0.2", Admit),
                    ("10.0.0.1", Total),
                    ("10.0.0.2", Total),
                    // 0 + 1 < 2: a third source gets a place; of the two largest the one
                    // whose oldest holder is oldest loses it.
                    ("10.0.0.3", Evicts(0)),
                    // 10.0.0.3 would hold 2, as many as 10.0.0.2.
                    ("10.0.0.3", Total),
                    ("10.0.0.4", Evicts(2)),
                    // One each: nobody holds more than a newcomer would.
                    ("10.0.0.5", Total),
                    ("10.0.0.1", Total),
                ],
            ),
            (
                "the per-peer cap holds before anything is evicted",
                &[
                    ("10.0.0.1", Admit),
                    ("10.0.0.1", Admit),
                    ("10.0.0.1", Admit),
                    ("10.0.0.1", Peer),
                    ("10.0.0.2", Admit),
                    ("10.0.0.2", Evicts(0)),
                    ("10.0.0.2", Total),
                ],
            ),
            (
                "IPv4-mapped addresses are the IPv4 source",
                &[
                    ("10.0.0.1", Admit),
                    ("::ffff:10.0.0.1", Admit),
                    ("10.0.0.1", Admit),
                    ("::ffff:10.0.0.1", Peer),
                    ("fd00::2", Admit),
                    ("::ffff:10.0.0.2", Evicts(0)),
                    ("10.0.0.2", Total),
                ],
            ),
            (
                "a dropped permit frees its place; a dropped evicted one frees nothing",
                &[
                    ("10.0.0.1", Admit),
                    ("10.0.0.1", Admit),
                    ("10.0.0.1", Admit),
                    ("10.0.0.2", Admit),
                    ("10.0.0.3", Evicts(0)),
                    ("", Drop(1)),
                    ("10.0.0.2", Admit),
                    ("10.0.0.1", Total),
                ],
            ),
        ];
        for (name, steps) in cases {
            let (gate, held) = run(name, SMALL, WhenFull::EvictLargest, steps);
            drop(held);
            assert_eq!(gate.held(), 0, "{name}");
            assert!(
                gate.holders.lock().by_peer.is_empty(),
                "{name}: no entry left"
            );
        }
    }

    #[test]
    fn the_pure_decision() {
        let mut h = Holders::default();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        for (seq, p) in [a, a, b].into_iter().enumerate() {
            h.by_peer.entry(p).or_default().insert(seq as u64 + 7, None);
            h.total += 1;
        }
        let d = |limits, when_full, peer| decide(limits, when_full, &h, peer, "things");
        let full = Limits {
            total: 3,
            per_peer: 3,
        };
        let roomy = Limits {
            total: 4,
            per_peer: 2,
        };
        let total = Decision::Refuse(Full::Total {
            what: "things",
            limit: 3,
        });
        let cases = [
            (
                roomy,
                WhenFull::EvictLargest,
                ip("10.0.0.3"),
                Decision::Admit,
            ),
            (
                roomy,
                WhenFull::EvictLargest,
                a,
                Decision::Refuse(Full::Peer {
                    what: "things",
                    limit: 2,
                }),
            ),
            (full, WhenFull::Refuse, ip("10.0.0.3"), total),
            (
                full,
                WhenFull::EvictLargest,
                ip("10.0.0.3"),
                Decision::Evict { peer: a, seq: 7 },
            ),
            // b would hold 2, as many as a: refused.
            (full, WhenFull::EvictLargest, b, total),
            (full, WhenFull::EvictLargest, a, total),
        ];
        for (limits, when_full, peer, want) in cases {
            assert_eq!(
                d(limits, when_full, peer),
                want,
                "{limits:?} {when_full:?} {peer}"
            );
        }
    }

    #[test]
    fn the_gauge_follows_the_holders() {
        let g = Gauge::default();
        let gate = Gate::with("things", SMALL, WhenFull::EvictLargest, Some(g.clone()));
        let mut held: Vec<_> = (0..3)
            .map(|_| gate.try_admit(ip("10.0.0.1")).unwrap())
            .collect();
        held.push(gate.try_admit(ip("10.0.0.2")).unwrap());
        assert_eq!(g.get(), 4);
        let newcomer = gate.try_admit(ip("10.0.0.3")).unwrap();
        assert_eq!(g.get(), 4, "an eviction keeps the count");
        drop(held);
        assert_eq!(g.get(), 1);
        drop(newcomer);
        assert_eq!(g.get(), 0);
    }

    #[tokio::test]
    async fn an_evicted_holder_is_told() {
        let gate = Gate::with("things", SMALL, WhenFull::EvictLargest, None);
        let mut first = gate.try_admit(ip("10.0.0.1")).unwrap();
        let waiter = tokio::spawn(async move {
            first.evicted().await;
            // Resolved once, it stays resolved.
            first.evicted().await;
            first
        });
        let _rest: Vec<_> = (0..3)
            .map(|i| {
                gate.try_admit(ip(if i < 2 { "10.0.0.1" } else { "10.0.0.2" }))
                    .unwrap()
            })
            .collect();
        let _newcomer = gate.try_admit(ip("10.0.0.3")).unwrap();
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("told")
            .unwrap();
        drop(first);
        assert_eq!(gate.held(), 4, "dropping the evicted permit frees nothing");
    }
}
