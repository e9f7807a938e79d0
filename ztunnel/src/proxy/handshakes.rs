//! A cap on tunnel connections that have not finished their mutual-TLS handshake.
//!
//! Until a peer at 15008 has authenticated, it is nobody: each of its connections holds a
//! descriptor, a task and TLS state for up to the handshake timeout. A hostile peer that opens
//! connections and stays silent could otherwise exhaust the daemon's descriptors and memory and
//! keep every other peer out. The gate admits at most `per_peer` pending handshakes from one
//! source address and `per_node` in all; a connection over either limit is refused at once
//! (reset, counted, logged). A [`Permit`] is held from accept until the handshake has ended,
//! whatever its outcome; an authenticated connection no longer counts. The decision is a pure
//! function of the counts ([`HandshakeGate::try_admit`]); nothing here touches a socket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The limits, from the daemon's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Pending handshakes on the whole node.
    pub per_node: usize,
    /// Pending handshakes from one source address.
    pub per_peer: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            per_node: 2048,
            per_peer: 256,
        }
    }
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("too many pending tunnel handshakes on this node ({0})")]
    Node(usize),
    #[error("too many pending tunnel handshakes from this peer ({0})")]
    Peer(usize),
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// The pending handshakes of the node's tunnel listeners.
pub struct HandshakeGate {
    limits: HandshakeLimits,
    counts: Mutex<Counts>,
}

/// One admitted handshake, counted until dropped.
pub struct Permit {
    gate: Arc<HandshakeGate>,
    peer: IpAddr,
}

impl HandshakeGate {
    pub fn new(limits: HandshakeLimits) -> Arc<Self> {
        Arc::new(HandshakeGate {
            limits,
            counts: Mutex::default(),
        })
    }

    /// Admits a handshake from `peer`, or says which limit it is over.
    pub fn try_admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Full> {
        let peer = peer.to_canonical();
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let from_peer = c.by_peer.get(&peer).copied().unwrap_or(0);
        if from_peer >= self.limits.per_peer {
            return Err(Full::Peer(self.limits.per_peer));
        }
        if c.total >= self.limits.per_node {
            return Err(Full::Node(self.limits.per_node));
        }
        c.total += 1;
        *c.by_peer.entry(peer).or_insert(0) += 1;
        Ok(Permit {
            gate: self.clone(),
            peer,
        })
    }

    /// Handshakes pending now (node-wide).
    pub fn pending(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
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
    fn limits_per_peer_and_per_node() {
        let gate = HandshakeGate::new(HandshakeLimits {
            per_node: 3,
            per_peer: 2,
        });
        // (peer, expected outcome), in order, all permits held.
        let steps: &[(&str, Result<(), Full>)] = &[
            ("10.0.0.1", Ok(())),
            ("10.0.0.1", Ok(())),
            ("10.0.0.1", Err(Full::Peer(2))),
            // The IPv4-mapped form is the same peer.
            ("::ffff:10.0.0.1", Err(Full::Peer(2))),
            ("10.0.0.2", Ok(())),
            ("10.0.0.3", Err(Full::Node(3))),
        ];
        let mut held = Vec::new();
        for (peer, want) in steps {
            match (gate.try_admit(ip(peer)), want) {
                (Ok(p), Ok(())) => held.push(p),
                (Err(got), Err(want)) => assert_eq!(got, *want, "{peer}"),
                (got, want) => panic!("{peer}: got {:?}, want {want:?}", got.err()),
            }
        }
        assert_eq!(gate.pending(), 3);
        // A finished handshake frees its place for its peer and for the node.
        held.remove(0);
        assert_eq!(gate.pending(), 2);
        let again = gate.try_admit(ip("10.0.0.1")).expect("a place again");
        assert!(gate.try_admit(ip("10.0.0.3")).is_err());
        drop(again);
        drop(held);
        assert_eq!(gate.pending(), 0);
        assert!(
            gate.counts.lock().unwrap().by_peer.is_empty(),
            "no entry left"
        );
    }
}
