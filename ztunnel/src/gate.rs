//! Caps, per source address and in all, on what peers hold before they have proven who they
//! are: tunnel connections still in their TLS handshake, the CA's connections and its signing
//! requests in flight.
//!
//! An unauthenticated peer is nobody, yet each connection it opens holds a descriptor, a task
//! and TLS state. Without a cap a hostile peer could exhaust the process's descriptors and
//! memory and keep every other peer out. A [`Gate`] admits at most `per_peer` holders from one
//! source address (IPv4-mapped IPv6 addresses count as the IPv4 address) and `total` in all;
//! over either the caller refuses at once. A [`Permit`] counts until it is dropped. The decision
//! is a pure function of the counts ([`Gate::try_admit`]); nothing here touches a socket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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

/// Which cap refused a peer, and what it counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("too many {what} from this peer ({limit})")]
    Peer { what: &'static str, limit: usize },
    #[error("too many {what} in all ({limit})")]
    Total { what: &'static str, limit: usize },
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// The holders of one kind of resource.
pub struct Gate {
    what: &'static str,
    limits: Limits,
    counts: Mutex<Counts>,
}

/// One admitted holder, counted until dropped.
pub struct Permit {
    gate: Arc<Gate>,
    peer: IpAddr,
}

impl Gate {
    /// A gate for `what` (plural, as in "too many {what}").
    pub fn new(what: &'static str, limits: Limits) -> Arc<Self> {
        Arc::new(Gate {
            what,
            limits,
            counts: Mutex::default(),
        })
    }

    /// Admits one more holder from `peer`, or says which cap it is over.
    pub fn try_admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Full> {
        let peer = peer.to_canonical();
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let from_peer = c.by_peer.get(&peer).copied().unwrap_or(0);
        let what = self.what;
        if from_peer >= self.limits.per_peer {
            let limit = self.limits.per_peer;
            return Err(Full::Peer { what, limit });
        }
        if c.total >= self.limits.total {
            let limit = self.limits.total;
            return Err(Full::Total { what, limit });
        }
        c.total += 1;
        *c.by_peer.entry(peer).or_insert(0) += 1;
        Ok(Permit {
            gate: self.clone(),
            peer,
        })
    }

    /// Holders now, in all.
    pub fn held(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({} from {})", self.gate.what, self.peer)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.gate.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_peer_and_in_all() {
        let gate = Gate::new(
            "things",
            Limits {
                total: 3,
                per_peer: 2,
            },
        );
        let peer = |limit| {
            Err(Full::Peer {
                what: "things",
                limit,
            })
        };
        let total = |limit| {
            Err(Full::Total {
                what: "things",
                limit,
            })
        };
        // (peer, expected outcome), in order, all permits held.
        let steps: &[(&str, Result<(), Full>)] = &[
            ("10.0.0.1", Ok(())),
            ("10.0.0.1", Ok(())),
            ("10.0.0.1", peer(2)),
            // The IPv4-mapped form is the same peer.
            ("::ffff:10.0.0.1", peer(2)),
            ("10.0.0.2", Ok(())),
            ("10.0.0.3", total(3)),
        ];
        let mut held = Vec::new();
        for (addr, want) in steps {
            match (gate.try_admit(ip(addr)), want) {
                (Ok(p), Ok(())) => held.push(p),
                (Err(got), Err(want)) => assert_eq!(got, *want, "{addr}"),
                (got, want) => panic!("{addr}: got {:?}, want {want:?}", got.err()),
            }
        }
        assert_eq!(gate.held(), 3);
        assert_eq!(
            total(3).unwrap_err().to_string(),
            "too many things in all (3)"
        );
        // A dropped permit frees its place for its peer and in all.
        held.remove(0);
        assert_eq!(gate.held(), 2);
        let again = gate.try_admit(ip("10.0.0.1")).expect("a place again");
        assert!(gate.try_admit(ip("10.0.0.3")).is_err());
        drop(again);
        drop(held);
        assert_eq!(gate.held(), 0);
        assert!(
            gate.counts.lock().unwrap().by_peer.is_empty(),
            "no entry left"
        );
    }
}
